"""WandbCallback against the real wandb SDK offline, reading back the ``.wandb`` files it wrote.

wandb >= 0.30 ships no reader for its offline run files (``wandb sync --view`` and the
Python datastore are gone), so :func:`read_run` parses them: LevelDB-log framing around
``wandb_internal_pb2.Record`` messages, the protobuf schema wandb itself ships. Runs are
read after ``wandb.teardown()``: before it, a finished run's file may still be incomplete.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import wandb
from epochal_core import Trainer, TrainingArguments
from epochal_core.integrations import rewrite_logs
from epochal_core.state import TrainerState
from epochal_core.testing import CrashAt, ScriptedFailure, TinyRegressor, scripted_run, tiny_dataset
from epochal_wandb import SUMMARY_KEYS, WandbCallback
from wandb.proto import wandb_internal_pb2

BLOCK, HEADER = 32768, 7


@dataclass
class RunFile:
    """What one offline run directory holds."""

    run_id: str = ""
    project: str = ""
    name: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    artifacts: list[Any] = field(default_factory=list)
    exit_code: int | None = None

    def metrics(self) -> list[tuple[str, int, Any]]:
        """``(name, train/global_step, value)`` of every user value in the history."""
        return [(key, row["train/global_step"], value) for row in self.history for key, value in row.items()
                if not key.startswith("_") and key != "train/global_step"]


def _records(path: Path) -> Any:
    data = path.read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:HEADER])
    assert (ident, magic) == (b":W&B", 0xBEE1)
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # block trailer
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == 1:
            yield wandb_internal_pb2.Record.FromString(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield wandb_internal_pb2.Record.FromString(pending + chunk)
            pending = b""


def _items(updates: Any) -> dict[str, Any]:
    return {(item.key or "/".join(item.nested_key)): json.loads(item.value_json) for item in updates}


def read_run(folder: Path) -> RunFile:
    [path] = folder.glob("run-*.wandb")
    run = RunFile()
    for record in _records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.run_id, run.project, run.name = record.run.run_id, record.run.project, record.run.display_name
            run.config.update(_items(record.run.config.update))
        elif kind == "config":
            run.config.update(_items(record.config.update))
        elif kind == "history":
            run.history.append(_items(record.history.item))
        elif kind == "summary":
            run.summary.update(_items(record.summary.update))
        elif kind == "artifact":
            run.artifacts.append(record.artifact)
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    return run


@pytest.fixture
def wandb_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "wandb"
    folder.mkdir()
    monkeypatch.setenv("WANDB_DIR", str(folder))
    for name in ("WANDB_PROJECT", "WANDB_LOG_MODEL", "WANDB_WATCH", "WANDB_RUN_ID", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    wandb.teardown()  # settings are read once per wandb session: start a fresh one with this folder
    yield folder
    wandb.teardown()


def runs(folder: Path) -> list[RunFile]:
    """Every offline run under ``folder``, oldest first, once wandb finished writing them."""
    wandb.teardown()
    return [read_run(d) for d in sorted((folder / "wandb").glob("offline-run-*"), key=lambda d: d.stat().st_mtime_ns)]


def expected(log_history: list[dict[str, Any]]) -> tuple[list[tuple[str, int, Any]], dict[str, Any]]:
    """What transformers' WandbCallback sends for ``log_history``: history rows and summary values."""
    rows, summary = [], {}
    for entry in log_history:
        logs = {k: v for k, v in entry.items() if k != "step"}
        for key, value in logs.items():
            if key in SUMMARY_KEYS:
                summary[key] = value
        rest = {k: v for k, v in logs.items() if k not in SUMMARY_KEYS}
        rows += [(key, entry["step"], value) for key, value in rewrite_logs(rest).items()
                 if isinstance(value, (int, float))]
    return rows, summary


def trainer_args(out: Path, **overrides: Any) -> TrainingArguments:
    kwargs: dict[str, Any] = dict(
        output_dir=str(out), max_steps=4, per_device_train_batch_size=8, logging_steps=1, save_steps=2,
        report_to=["wandb"], run_name="tiny", disable_tqdm=True, use_cpu=True,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


# -- what is logged --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_scripted_run_reads_back_as_log_history(wandb_dir: Path, tmp_path: Path) -> None:
    run = scripted_run(WandbCallback(), output_dir=tmp_path / "out", extra_logs={"hist": [1, 2]})

    [written] = runs(wandb_dir)
    rows, summary = expected(run.state.log_history)
    assert sorted(written.metrics()) == sorted(rows)
    assert {k: written.summary[k] for k in summary} == summary
    assert not any(name == "train/hist" for name, _, _ in written.metrics())  # non-scalar dropped
    assert (written.project, written.name, written.exit_code) == ("huggingface", "scripted-run", 0)
    # transformers' config: the model config and the arguments in one flat dict, and the parameter count.
    assert written.config["hidden_size"] == 8 and written.config["activation"] == "relu"
    assert written.config["max_steps"] == 10 and written.config["output_dir"] == str(tmp_path / "out")
    assert written.config["model/num_parameters"] == sum(p.numel() for p in torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)).parameters())


@pytest.mark.slow
def test_project_and_log_model_follow_the_environment(
    wandb_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``WANDB_PROJECT``; ``WANDB_LOG_MODEL=checkpoint``: each checkpoint, then the final weights, no Trainer built."""
    monkeypatch.setenv("WANDB_PROJECT", "epochal-tests")
    monkeypatch.setenv("WANDB_LOG_MODEL", "checkpoint")
    model = TinyRegressor()
    scripted_run(WandbCallback(), output_dir=tmp_path / "out", model=model)

    [written] = runs(wandb_dir)
    assert written.project == "epochal-tests"
    aliases = [sorted(set(a.aliases) - {"latest"}) for a in written.artifacts]
    assert aliases == [["base_model"], ["checkpoint_global_step_5", "epoch_1.0"],
                       ["checkpoint_global_step_10", "epoch_2.0"], ["final_model"]]
    assert {a.name for a in written.artifacts} == {f"model-{written.name}"}
    final = {entry.path: entry.local_path for entry in written.artifacts[-1].manifest.contents}
    assert set(final) == {"pytorch_model.bin", "model_architecture.txt"}
    weights = torch.load(final["pytorch_model.bin"], weights_only=True)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    checkpoint = {entry.path for entry in written.artifacts[1].manifest.contents}
    assert {"pytorch_model.bin", "trainer_state.json"} <= checkpoint


# -- resume and failures -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_resume_continues_the_same_run_and_logs_no_step_twice(wandb_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    ds = tiny_dataset()
    crashing = Trainer(TinyRegressor(), trainer_args(out), train_dataset=ds, callbacks=[CrashAt(3)])
    with pytest.raises(ScriptedFailure, match="crash at step 3"):
        crashing.train()
    saved = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    run_id = saved["stateful_callbacks"]["WandbCallback"]["state_dict"]["run_id"]

    # eval_on_start evaluates again at the checkpoint step: the run already holds step 2.
    resumed = Trainer(TinyRegressor(), trainer_args(out, eval_strategy="steps", eval_steps=2, eval_on_start=True),
                      train_dataset=ds, eval_dataset=ds)
    resumed.train(resume_from_checkpoint=out / "checkpoint-2")

    first, second = runs(wandb_dir)
    assert first.run_id == second.run_id == run_id
    assert (first.exit_code, second.exit_code) == (1, 0)  # the crash is recorded as a failed run
    # The crashed run holds the checkpoint's history; the resumed one what came after it.
    assert sorted(first.metrics()) == sorted(expected(saved["log_history"])[0])
    assert sorted(second.metrics()) == sorted(expected([e for e in resumed.state.log_history if e["step"] > 2])[0])
    assert {step for _, step, _ in first.metrics()} == {1, 2}
    assert {step for _, step, _ in second.metrics()} == {3, 4}, "a step the run holds was logged again"


class FlakyWandb(WandbCallback):
    """Offline wandb never fails to log, so to show an SDK call raising mid-run the real run's
    ``log`` is made to raise from step 4 on (the only fake here)."""

    def setup(self, args: Any, state: TrainerState, model: Any, **kwargs: Any) -> None:
        super().setup(args, state, model, **kwargs)
        real_log = self.run.log

        def log(row: dict[str, Any], *a: Any, **kw: Any) -> None:
            if row.get("train/global_step", 0) >= 4:
                raise ConnectionError("wandb backend went away")
            real_log(row, *a, **kw)

        self.run.log = log


@pytest.mark.slow
def test_sdk_raising_mid_run_is_isolated_and_the_run_ends_failed(wandb_dir: Path, tmp_path: Path) -> None:
    run = scripted_run(FlakyWandb(), output_dir=tmp_path / "out", strict=False)

    assert run.state.global_step == 10 and run.events[-1] == "on_train_end"  # training finished
    assert [(f.name, type(f.error)) for f in run.failures] == [("wandb", ConnectionError)]
    [written] = runs(wandb_dir)
    assert written.exit_code == 1
    assert max(step for _, step, _ in written.metrics()) == 2


# -- configuration -------------------------------------------------------------------------------------------
def test_configuration_problem_and_invalid_log_model(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_LOG_MODEL", raising=False)
    monkeypatch.setenv("WANDB_MODE", "online")
    problem = WandbCallback.configuration_problem()
    assert problem is not None and "WANDB_API_KEY" in problem and "WANDB_MODE=offline" in problem
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password secret\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert WandbCallback.configuration_problem() is None  # `wandb login` wrote a key
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_LOG_MODEL", "sometimes")
    problem = WandbCallback.configuration_problem()
    assert problem is not None and "WANDB_LOG_MODEL='sometimes'" in problem
    with pytest.raises(ValueError, match=r"WANDB_LOG_MODEL='sometimes' is invalid: use one of \['end'"):
        scripted_run(WandbCallback(), output_dir=tmp_path / "out", max_steps=2)
    monkeypatch.setenv("WANDB_DISABLED", "true")
    assert "WANDB_DISABLED" in str(WandbCallback.configuration_problem())
