"""ClearMLCallback against the real clearml SDK offline, read back from its offline session archives.

The root conftest sets ``CLEARML_OFFLINE_MODE=1`` and ``CLEARML_CACHE_DIR``: each task's
session is zipped to ``$CLEARML_CACHE_DIR/offline/<task id>.zip`` when it closes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from epochal_clearml import ClearMLCallback
from epochal_core import Trainer, TrainingArguments
from epochal_core.testing import CrashAt, DropoutRegressor, WaitAt, scripted_run, tiny_dataset

SINGLE = {"train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss", "total_flos", "epoch"}


class Session:
    """One offline session archive: ``task.json`` and the events of ``metrics.jsonl``."""

    def __init__(self, task_id: str) -> None:
        path = Path(os.environ["CLEARML_CACHE_DIR"]) / "offline" / f"{task_id}.zip"
        with zipfile.ZipFile(path) as zf:
            self.names = zf.namelist()
            self.task: dict[str, Any] = json.loads(zf.read("task.json"))
            lines = zf.read("metrics.jsonl").decode().splitlines()
        self.events = [e for line in lines if line.strip() for e in json.loads(line)]

    def scalars(self) -> list[tuple[str, str, int, float]]:
        return [(e["metric"], e["variant"], e["iter"], e["value"]) for e in self.events
                if e["type"] == "training_stats_scalar" and e["metric"] != "Summary"]

    def single_values(self) -> dict[str, float]:
        return {e["variant"]: e["value"] for e in self.events  # the last report of each name wins
                if e["type"] == "training_stats_scalar" and e["metric"] == "Summary"}

    def hyperparams(self, section: str = "Transformers") -> dict[str, str]:
        return {k: v["value"] for k, v in self.task["hyperparams"][section].items()}


def expected(log_history: list[dict[str, Any]]) -> tuple[list[tuple[str, str, int, float]], dict[str, float]]:
    """transformers' ClearML layout of ``log_history``: ``(title, series, step, value)`` scalars and single values."""
    scalars, singles = [], {}
    for entry in log_history:
        for key, value in entry.items():
            if key == "step" or not isinstance(value, (int, float)):
                continue
            if key in SINGLE:
                singles[key] = value
            elif key.startswith(("eval_", "test_")):
                scalars.append((key[:4], key[5:], entry["step"], value))
            else:
                scalars.append(("train", key, entry["step"], value))
    return scalars, singles


def tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def trainer_args(out: Path, **overrides: Any) -> TrainingArguments:
    kwargs: dict[str, Any] = dict(
        output_dir=str(out), max_steps=4, per_device_train_batch_size=8, logging_steps=1, save_steps=2,
        report_to=["clearml"], disable_tqdm=True, use_cpu=True,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def clearml_callback(trainer: Trainer) -> ClearMLCallback:
    [callback] = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, ClearMLCallback)]
    return callback


@pytest.mark.slow
def test_scripted_run_reads_back_as_transformers_logs_it(tmp_path: Path) -> None:
    home = Path(os.environ["HOME"])
    home_before = tree(home)
    callback = ClearMLCallback()
    run = scripted_run(callback, output_dir=tmp_path / "out", extra_logs={"hist": [1, 2]})

    session = Session(str(callback.run_id))
    scalars, singles = expected(run.state.log_history)
    assert sorted(session.scalars()) == sorted(scalars)
    assert session.single_values() == singles
    assert (session.task["project_name"], session.task["name"]) == ("HuggingFace Transformers", "Trainer")
    params = session.hyperparams()
    assert params["max_steps"] == "10" and params["logging_steps"] == "2" and params["run_name"] == "scripted-run"
    assert params["_ignore_hparams_ui_overrides_"] == "True"
    config = session.task["configuration"]["Model Configuration"]["value"]
    assert "hidden_size = 8" in config and 'activation = "relu"' in config
    # The model: each checkpoint as an artifact of the session (ClearML cannot register models offline).
    artifacts = {a["key"]: a for a in session.task["execution"]["artifacts"]}
    assert set(artifacts) == {"checkpoint-5", "checkpoint-10"}
    assert "trainer_state.json" in artifacts["checkpoint-10"]["type_data"]["preview"]
    assert any(n.endswith("artifacts/checkpoint-10/checkpoint-10.zip") for n in session.names)
    # Contained: the session file went to CLEARML_CACHE_DIR, nothing into HOME or the working directory.
    assert tree(home) == home_before
    assert sorted(os.listdir(tmp_path)) == ["out"]


@pytest.mark.slow
def test_env_vars_name_the_task_and_turn_model_logging_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLEARML_PROJECT", "epochal-tests")
    monkeypatch.setenv("CLEARML_TASK", "tiny")
    monkeypatch.setenv("CLEARML_LOG_MODEL", "false")
    callback = ClearMLCallback()
    scripted_run(callback, output_dir=tmp_path / "out", max_steps=5)
    session = Session(str(callback.run_id))
    assert (session.task["project_name"], session.task["name"]) == ("epochal-tests", "tiny")
    assert session.task["execution"]["artifacts"] == []


@pytest.mark.slow
def test_resume_continues_the_same_task_and_sends_no_step_twice(tmp_path: Path) -> None:
    out = tmp_path / "out"
    ds = tiny_dataset()
    crashing = Trainer(DropoutRegressor(), trainer_args(out), train_dataset=ds, callbacks=[CrashAt(3)])
    with pytest.raises(RuntimeError, match="crash at step 3"):
        crashing.train()
    task_id = str(clearml_callback(crashing).run_id)
    assert {step for *_, step, _ in Session(task_id).scalars()} == {1, 2}

    resumed = Trainer(DropoutRegressor(), trainer_args(out, max_steps=5), train_dataset=ds)
    resumed.train(resume_from_checkpoint=out / "checkpoint-2")
    assert clearml_callback(resumed).run_id == task_id

    scalars = Session(task_id).scalars()  # both sessions, in the one continued task
    keys = [(title, series, step) for title, series, step, _ in scalars]
    assert len(keys) == len(set(keys)), "a step was sent twice"
    assert {step for _, _, step in keys} == {1, 2, 3, 4, 5}
    later = [entry for entry in resumed.state.log_history if entry["step"] > 2]
    assert sorted(s for s in scalars if s[2] > 2) == sorted(expected(later)[0])


@pytest.mark.slow
def test_training_results_unchanged_and_no_reporter_process(tmp_path: Path) -> None:
    torch.manual_seed(0)
    plain = Trainer(DropoutRegressor(), trainer_args(tmp_path / "without", report_to=[], max_steps=6, save_steps=100),
                    train_dataset=tiny_dataset())
    plain.train()

    torch.manual_seed(0)
    trainer = Trainer(DropoutRegressor(), trainer_args(tmp_path / "with", max_steps=6, save_steps=100),
                      train_dataset=tiny_dataset())
    callback = clearml_callback(trainer)
    forks: list[int] = []

    def still_a_fork(child: psutil.Process, cmdline: list[str]) -> bool:
        # A child forked to run a program (ClearML runs git to detect the repository) shows our
        # command line only until it execs: it is a reporter process if it still does after a
        # generous deadline (a reporter lives as long as the task).
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            try:
                if child.cmdline() != cmdline or child.status() == psutil.STATUS_ZOMBIE:
                    return False
            except psutil.NoSuchProcess:
                return False
            try:
                child.wait(timeout=0.05)  # returns at once when it exits
                return False
            except psutil.TimeoutExpired:
                pass
        return True

    def record_forks() -> bool:
        me = psutil.Process()
        cmdline = me.cmdline()
        for child in me.children(recursive=True):
            try:
                if child.cmdline() == cmdline and still_a_fork(child, cmdline):
                    forks.append(child.pid)
            except psutil.NoSuchProcess:
                pass
        return True

    # Task.init runs during training (while dropout draws from torch's generator), then the probe looks
    # for the reporter process ClearML forks by default on Linux.
    trainer.add_callback(WaitAt(1, ready=lambda: callback.task is not None))
    trainer.add_callback(WaitAt(3, ready=record_forks))
    trainer.train()

    assert forks == [], "ClearML forked a reporter process"
    reference, weights = plain.model.state_dict(), trainer.model.state_dict()
    assert all(torch.equal(weights[k], reference[k]) for k in reference), "ClearML changed the training"


SIGTERM_SCRIPT = """
import json, signal, sys
from epochal_clearml import ClearMLCallback
from epochal_core import Trainer, TrainingArguments
from epochal_core.testing import DropoutRegressor, WaitAt, tiny_dataset
args = TrainingArguments(output_dir=sys.argv[1], max_steps=50, per_device_train_batch_size=8, logging_steps=1,
                         save_steps=1000, report_to=["clearml"], disable_tqdm=True, use_cpu=True)
trainer = Trainer(DropoutRegressor(), args, train_dataset=tiny_dataset())
[callback] = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, ClearMLCallback)]
trainer.add_callback(WaitAt(2, ready=lambda: callback.task is not None, send=signal.SIGTERM))
trainer.train()
print(json.dumps({"step": trainer.state.global_step, "preempted": trainer.preempted, "task": callback.run_id}))
"""


@pytest.mark.slow
def test_sigterm_still_saves_and_stops_with_clearml_running(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-c", SIGTERM_SCRIPT, str(out)], capture_output=True, text=True,
                          timeout=300, env=os.environ.copy(), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert (result["step"], result["preempted"]) == (2, True)
    assert (out / "checkpoint-2" / "COMPLETE").is_file()
    assert "Received SIGTERM" in done.stderr
    assert {step for *_, step, _ in Session(result["task"]).scalars()} == {1, 2}  # the task was closed


def test_constructing_imports_nothing_and_defaults_match_transformers() -> None:
    callback = ClearMLCallback()
    assert callback.task is None and callback.run_id is None
    assert ClearMLCallback.name == "clearml"


def test_report_to_all_leaves_out_clearml_without_credentials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert ClearMLCallback.configuration_problem() is None  # offline (root conftest)
    monkeypatch.delenv("CLEARML_OFFLINE_MODE")
    problem = ClearMLCallback.configuration_problem()
    assert problem is not None and "CLEARML_OFFLINE_MODE=1" in problem
    trainer = Trainer(DropoutRegressor(), trainer_args(tmp_path / "out", report_to="all"), train_dataset=tiny_dataset())
    assert not any(isinstance(cb, ClearMLCallback) for cb in trainer.callback_handler.callbacks)
    (tmp_path / "clearml.conf").write_text("api { credentials { access_key: x, secret_key: y } }\n")
    monkeypatch.setenv("CLEARML_CONFIG_FILE", str(tmp_path / "clearml.conf"))
    assert ClearMLCallback.configuration_problem() is None
