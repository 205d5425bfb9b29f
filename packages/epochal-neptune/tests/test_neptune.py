"""NeptuneCallback against the real neptune 1.x client in offline mode (conftest sets NEPTUNE_MODE=offline).

Every check reads back what neptune wrote: the JSON-lines operation log of the
offline run (``$NEPTUNE_DATA_DIRECTORY/offline/run__<id>__*/data-N.log``),
decoded with neptune's own ``Operation.from_dict`` (the one ``neptune sync`` uses).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from epochal_core import Trainer, TrainerState, TrainingArguments
from epochal_core.integrations import rewrite_logs
from epochal_core.testing import ScriptedFailure, TinyRegressor, scripted_run, tiny_dataset
from epochal_neptune import NeptuneCallback
from neptune.internal.operation import LogFloats, Operation, UploadFileSet

NS = "finetuning"


@dataclass
class OfflineRun:
    """An offline run replayed from its operation log."""

    folder: Path
    values: dict[str, Any] = field(default_factory=dict)
    series: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    uploads: dict[str, list[tuple[list[str], bool]]] = field(default_factory=dict)


def read_run(run_id: str | None) -> OfflineRun:
    data_dir = Path(os.environ["NEPTUNE_DATA_DIRECTORY"])
    (folder,) = (data_dir / "offline").glob(f"run__{run_id}__*")
    run = OfflineRun(folder)
    logs = sorted(folder.glob("data-*.log"), key=lambda p: int(p.stem.split("-")[1]))
    for log in logs:
        for line in log.read_text().splitlines():
            op = Operation.from_dict(json.loads(line)["obj"])
            path = "/".join(op.path)
            if isinstance(op, LogFloats):
                run.series.setdefault(path, []).extend((v.step, v.value) for v in op.values)
            elif isinstance(op, UploadFileSet):
                run.uploads.setdefault(path, []).append((list(op.file_globs), bool(op.reset)))
            elif type(op).__name__.startswith("Assign"):
                run.values[path] = op.value
    return run


def expected_series(log_history: list[dict[str, Any]], min_step: int = -1) -> dict[str, list[tuple[float, float]]]:
    expected: dict[str, list[tuple[float, float]]] = {}
    for entry in log_history:
        step = entry["step"]
        if step <= min_step:
            continue
        for key, value in rewrite_logs({k: v for k, v in entry.items() if k != "step"}).items():
            if key != "train/epoch" and isinstance(value, (int, float)):
                expected.setdefault(f"{NS}/{key}", []).append((step, float(value)))
    return expected


def logged_series(run: OfflineRun) -> dict[str, list[tuple[float, float]]]:
    return {k: v for k, v in run.series.items() if k.startswith(f"{NS}/")}


def neptune_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("Neptune")]


def tiny_trainer(output_dir: Path, max_steps: int, **kwargs: Any) -> Trainer:
    callbacks = kwargs.pop("callbacks", None)
    data = tiny_dataset()
    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=8, logging_steps=1,
        learning_rate=0.05, disable_tqdm=True, **kwargs,
    )
    return Trainer(TinyRegressor(), args, train_dataset=data, eval_dataset=data, callbacks=callbacks)


def neptune_callback(trainer: Trainer) -> NeptuneCallback:
    (callback,) = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, NeptuneCallback)]
    return callback


# -- (1) scripted run --------------------------------------------------------------------------
def test_scripted_run_logs_every_scalar_at_its_step(caplog: pytest.LogCaptureFixture) -> None:
    callback = NeptuneCallback()
    run = scripted_run(callback, extra_logs={"note": "not a scalar"})

    logged = read_run(callback.run_id)
    assert logged_series(logged) == expected_series(run.state.log_history)
    assert logged.values[f"{NS}/train/epoch"] == run.state.log_history[-1]["epoch"]
    assert f"{NS}/train/note" not in logged.series and "train/note" in caplog.text
    assert logged.values[f"{NS}/trainer_parameters/max_steps"] == 10
    assert logged.values[f"{NS}/trainer_parameters/run_name"] == "scripted-run"
    assert logged.values["sys/name"] == "scripted-run"
    assert logged.values[f"{NS}/model_parameters/hidden_size"] == 8
    assert logged.values[f"{NS}/model_parameters/activation"] == "relu"
    assert logged.values["sys/failed"] is False
    assert not logged.uploads.get(f"{NS}/checkpoints")
    assert neptune_threads() == []  # stopped at train end


def test_same_and_last_checkpoints_are_staged_and_uploaded(tmp_path: Path) -> None:
    same, last = NeptuneCallback(log_checkpoints="same"), NeptuneCallback(log_checkpoints="last")
    run = scripted_run(same, output_dir=tmp_path / "a")
    scripted_run(last, output_dir=tmp_path / "b")

    uploads = read_run(same.run_id).uploads
    originals: dict[Path, str] = {}
    for checkpoint in run.checkpoints:
        ((globs, reset),) = uploads[f"{NS}/checkpoints/{Path(checkpoint).name}"]
        assert not reset and Path(globs[0]) != Path(checkpoint)
        originals[Path(globs[0])] = (Path(checkpoint) / "trainer_state.json").read_text()
    # The staged copies outlive the rotation of the checkpoint folders.
    for checkpoint in run.checkpoints:
        shutil.rmtree(checkpoint)
    assert {staged: (staged / "trainer_state.json").read_text() for staged in originals} == originals

    last_uploads = read_run(last.run_id).uploads[f"{NS}/checkpoints/last"]
    assert [Path(globs[0]).name for globs, _ in last_uploads] == ["checkpoint-5", "checkpoint-10"]
    assert all(reset for _, reset in last_uploads)
    # Offline, the superseded staged copy is removed (`neptune sync` skips an upload with no files).
    assert not Path(last_uploads[0][0][0]).exists() and Path(last_uploads[1][0][0]).is_dir()


# -- (2) real Trainer ----------------------------------------------------------------------------
def test_trainer_run_matches_log_history(tmp_path: Path) -> None:
    trainer = tiny_trainer(tmp_path, max_steps=4, eval_strategy="steps", eval_steps=2, save_steps=2,
                           report_to=["neptune"])
    trainer.train()

    callback = neptune_callback(trainer)
    logged = read_run(callback.run_id)
    assert NeptuneCallback.get_run(trainer) is callback.run
    assert logged_series(logged) == expected_series(trainer.state.log_history)
    assert {step for step, _ in logged.series[f"{NS}/train/loss"]} == {1, 2, 3, 4}
    assert logged.values[f"{NS}/trainer_parameters/report_to"] == "['neptune']"
    assert logged.values[f"{NS}/model_parameters/note"] == "None"
    assert logged.values["sys/failed"] is False


# -- (3) resume ------------------------------------------------------------------------------------
def test_resume_reopens_a_server_run_by_its_saved_id(monkeypatch: pytest.MonkeyPatch) -> None:
    args = TrainingArguments(output_dir="out", report_to="none")
    monkeypatch.setenv("NEPTUNE_MODE", "async")
    callback = NeptuneCallback(project="team/proj", capture_hardware_metrics=True)
    callback.load_state_dict({"run_id": "PROJ-7", "last_logged_step": 8, "run_mode": "async"})
    kwargs = callback.init_run_kwargs(args, resumed=True)
    assert kwargs["with_id"] == "PROJ-7" and kwargs["project"] == "team/proj" and kwargs["name"] == "out"
    assert kwargs["capture_hardware_metrics"] is True and kwargs["capture_stdout"] is False
    assert "with_id" not in callback.init_run_kwargs(args, resumed=False)
    # The same run through the user's own custom_run_id, which must not be combined with with_id.
    assert "with_id" not in NeptuneCallback(custom_run_id="job-1").init_run_kwargs(args, resumed=True)
    # A run saved offline exists on no server: it cannot be reopened.
    callback.load_state_dict({"run_id": "3f2a", "last_logged_step": 8, "run_mode": "offline"})
    assert "with_id" not in callback.init_run_kwargs(args, resumed=True)


def test_resume_from_an_older_checkpoint_skips_steps_already_logged() -> None:
    callback = NeptuneCallback()
    callback.load_state_dict({"run_id": "previous-run", "last_logged_step": 8, "run_mode": "offline"})
    state = TrainerState(global_step=5, epoch=1.0)
    run = scripted_run(callback, start_step=5, state=state)

    logged = read_run(callback.run_id)
    assert callback.run_id != "previous-run"
    assert logged.values[f"{NS}/resumed_from"] == "previous-run"
    assert logged_series(logged) == expected_series(run.state.log_history, min_step=8)
    assert {step for values in logged_series(logged).values() for step, _ in values} == {10}
    assert callback.state_dict() == {"run_id": callback.run_id, "last_logged_step": 10, "run_mode": "offline"}


def test_trainer_resume_links_runs_without_duplicate_steps(tmp_path: Path) -> None:
    best = {"eval_strategy": "steps", "eval_steps": 2, "save_steps": 2, "load_best_model_at_end": True,
            "metric_for_best_model": "eval_loss", "save_total_limit": 1, "report_to": "none"}
    first = tiny_trainer(tmp_path, max_steps=4, callbacks=[NeptuneCallback(log_checkpoints="best")], **best)
    first.train()
    first_cb = neptune_callback(first)
    saved = json.loads((tmp_path / "checkpoint-4" / "trainer_state.json").read_text())["stateful_callbacks"]
    assert saved["NeptuneCallback"]["state_dict"] == {
        "run_id": first_cb.run_id, "last_logged_step": 4, "run_mode": "offline",
    }
    uploads = read_run(first_cb.run_id).uploads[f"{NS}/checkpoints/best"]
    best_steps = [int(Path(globs[0]).name.split("-")[1]) for globs, _ in uploads]
    assert best_steps[-1] == first.state.best_global_step

    second = tiny_trainer(tmp_path, max_steps=6, callbacks=[NeptuneCallback(log_checkpoints="best")], **best)
    second.train(resume_from_checkpoint=True)
    second_cb = neptune_callback(second)

    before, after = read_run(first_cb.run_id), read_run(second_cb.run_id)
    assert second_cb.run_id != first_cb.run_id  # offline runs cannot be reopened: the new one links back
    assert after.values[f"{NS}/resumed_from"] == first_cb.run_id
    assert logged_series(after) == expected_series(second.state.log_history, min_step=4)
    for key, values in logged_series(after).items():
        assert min(step for step, _ in values) > max((s for s, _ in before.series.get(key, [])), default=0)


# -- (4) failures ------------------------------------------------------------------------------------
# "eval_loss/ema" becomes the series eval/loss/ema at step 2, so at step 5 neptune cannot append to eval/loss,
# which is now a namespace: the real SDK raising mid-run (neptune 1.14 raises AttributeError there).
CLASH = {"eval_loss/ema": 0.5}


def raised_in_neptune(tb: Any) -> bool:
    return any(f"{os.sep}neptune{os.sep}" in str(entry.path) for entry in tb)


def test_sdk_error_mid_run_disables_the_integration_and_closes_the_run() -> None:
    callback = NeptuneCallback()
    run = scripted_run(callback, strict=False, extra_logs=CLASH)

    assert run.state.global_step == 10 and run.events[-1] == "on_train_end"
    ((failure,),) = [run.failures]
    assert failure.event == "on_log" and f"{os.sep}neptune{os.sep}" in failure.traceback
    logged = read_run(callback.run_id)
    assert logged.values["sys/failed"] is True
    assert [step for step, _ in logged.series[f"{NS}/train/loss"]] == [2, 4]
    assert f"{NS}/eval/loss" not in logged.series
    assert neptune_threads() == []


def test_sdk_error_surfaces_in_strict_mode() -> None:
    callback = NeptuneCallback()
    with pytest.raises(Exception) as raised:  # whatever neptune raises must surface
        scripted_run(callback, strict=True, extra_logs=CLASH)
    assert raised_in_neptune(raised.traceback)
    assert read_run(callback.run_id).values["sys/failed"] is True
    assert neptune_threads() == []


def test_training_crash_marks_the_run_failed() -> None:
    callback = NeptuneCallback()
    with pytest.raises(ScriptedFailure):
        scripted_run(callback, fail_at_step=3)
    logged = read_run(callback.run_id)
    assert logged.values["sys/failed"] is True
    assert [step for step, _ in logged.series[f"{NS}/train/loss"]] == [2]
    assert neptune_threads() == []


# -- (5) construction and configuration -----------------------------------------------------------
def test_construction_has_no_side_effects(tmp_path: Path) -> None:
    code = (
        "import os, sys, threading\n"
        "from epochal_neptune import NeptuneCallback\n"
        "cb = NeptuneCallback(project='team/proj', log_checkpoints='last', tags=['a'])\n"
        "assert cb.run is None and cb.run_id is None\n"
        "assert 'neptune' not in sys.modules and 'torch' not in sys.modules, 'SDK imported'\n"
        "assert threading.active_count() == 1 and os.listdir('.') == [], 'side effect'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"log_checkpoints": "all"}, "log_checkpoints='all'.*None, 'same', 'last' or 'best'"),
        ({"base_namespace": ""}, "base_namespace"),
        ({"log_parameters": "yes"}, "log_parameters"),
        ({"project": 3}, "project=.*must be a str"),
        ({"run": object(), "name": "x"}, "existing run"),
        ({"mode": "read-only"}, "cannot log"),
    ],
)
def test_invalid_arguments_raise_value_error(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        NeptuneCallback(**kwargs)


def test_best_checkpoints_need_load_best_model_at_end() -> None:
    data_dir = Path(os.environ["NEPTUNE_DATA_DIRECTORY"]) / "offline"
    runs_before = set(data_dir.iterdir()) if data_dir.exists() else set()
    with pytest.raises(ValueError, match="load_best_model_at_end=True"):
        scripted_run(NeptuneCallback(log_checkpoints="best"))
    assert (set(data_dir.iterdir()) if data_dir.exists() else set()) == runs_before


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({"NEPTUNE_MODE": "offline"}, None),
        ({"NEPTUNE_MODE": "debug"}, None),
        ({"NEPTUNE_MODE": "async", "NEPTUNE_API_TOKEN": "t", "NEPTUNE_PROJECT": "w/p"}, None),
        ({}, "NEPTUNE_API_TOKEN and NEPTUNE_PROJECT not set.*NEPTUNE_MODE=offline"),
        ({"NEPTUNE_API_TOKEN": "t"}, "^NEPTUNE_PROJECT not set"),
        ({"NEPTUNE_MODE": "read-only"}, "cannot log"),
    ],
)
def test_configuration_problem(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], problem: str | None) -> None:
    for var in ("NEPTUNE_MODE", "NEPTUNE_API_TOKEN", "NEPTUNE_PROJECT"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    found = NeptuneCallback.configuration_problem()
    if problem is None:
        assert found is None
    else:
        assert found is not None
        assert re.search(problem, found), found


def test_debug_mode_logs_in_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEPTUNE_MODE", "debug")
    seen: dict[str, Any] = {}

    class Probe(NeptuneCallback):
        def finish(self, status: str) -> None:
            seen["loss"] = self.run[f"{NS}/train/loss"].fetch_values()["value"].tolist()
            super().finish(status)

    callback = Probe(log_checkpoints="last")
    run = scripted_run(callback)
    # Debug mode's in-memory backend keeps values but not their steps (fetch_values reports step 0).
    expected = [value for _, value in expected_series(run.state.log_history)[f"{NS}/train/loss"]]
    assert seen["loss"] == expected
    assert not (Path(os.environ["NEPTUNE_DATA_DIRECTORY"]) / "epochal-checkpoints" / callback.run_id).exists()


# -- names: what transformers' NeptuneCallback records ----------------------------------------------------

# transformers' NeptuneCallback (src/transformers/integrations/integration_utils.py), base_namespace "finetuning":
#   on_train_begin: run["finetuning/trainer_parameters"] = args.to_sanitized_dict()
#                   run["finetuning/model_parameters"] = stringify_unsupported(model.config.to_dict())
#   on_log:         for name, value in rewrite_logs(logs).items(): "train/epoch" is assigned
#                   (run["finetuning/train/epoch"] = value), everything else .log(value, step=state.global_step).
TRANSFORMERS_FIELDS = {f"{NS}/trainer_parameters/learning_rate", f"{NS}/trainer_parameters/max_steps",
                       f"{NS}/trainer_parameters/run_name", f"{NS}/model_parameters/hidden_size",
                       f"{NS}/train/epoch"}
TRANSFORMERS_SERIES = {f"{NS}/train/loss", f"{NS}/train/grad_norm", f"{NS}/train/learning_rate", f"{NS}/eval/loss",
                       f"{NS}/eval/accuracy", f"{NS}/train/train_runtime"}


def test_names_are_the_ones_transformers_records(tmp_path: Path) -> None:
    """Field and series paths read back from the offline run equal those of transformers' calls on a second run."""
    import neptune
    from epochal_core.testing import tiny_model
    from neptune.utils import stringify_unsupported

    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=10, logging_steps=2, eval_strategy="steps",
                             eval_steps=5, save_steps=5, report_to="none", run_name="scripted-run", disable_tqdm=True)
    callback = NeptuneCallback()
    run = scripted_run(callback, output_dir=tmp_path / "out", args=args)
    ours = read_run(callback.run_id)
    assert set(ours.values) >= TRANSFORMERS_FIELDS
    assert set(ours.series) >= TRANSFORMERS_SERIES

    anchor = neptune.init_run(mode="offline", capture_stdout=False, capture_stderr=False,
                              capture_hardware_metrics=False, capture_traceback=False, git_ref=False, source_files=[])
    anchor[f"{NS}/trainer_parameters"] = args.to_sanitized_dict()
    anchor[f"{NS}/model_parameters"] = stringify_unsupported(tiny_model().config)
    for entry in run.state.log_history:
        for name, value in rewrite_logs({k: v for k, v in entry.items() if k != "step"}).items():
            if name == "train/epoch":
                anchor[f"{NS}/{name}"] = value
            else:
                anchor[f"{NS}/{name}"].append(value, step=entry["step"])
    anchor_id = anchor._id
    anchor.stop()
    theirs = read_run(anchor_id)
    assert {k for k in ours.values if k.startswith(f"{NS}/")} == {k for k in theirs.values if k.startswith(f"{NS}/")}
    assert set(ours.series) == set(theirs.series)
