"""Real training runs with all four integrations at once, read back from what each SDK wrote.

One Trainer (TinyRegressor, a few steps, a log every step, an evaluation and a
checkpoint every 3 steps) reports to TensorBoard, DVCLive, Comet and Neptune
together, each in its offline mode (root conftest). Every tracker must then hold
exactly ``trainer.state.log_history``: the same steps and the same values
(TensorBoard stores float32). A second run breaks one tracker mid-run and
checks that training and the others carry on (``strict_integrations=False``).
"""

from __future__ import annotations

import csv
import json
import os
import zipfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from epochal_core import Trainer, TrainerCallback, TrainerState, TrainingArguments
from epochal_core.integrations import rewrite_logs
from epochal_core.testing import TinyRegressor, tiny_dataset

pytestmark = pytest.mark.slow  # four SDK imports (~20 s in a fresh process), then two short runs

REPORT_TO = ["tensorboard", "dvclive", "comet_ml", "neptune"]
NEPTUNE_NS = "finetuning"  # NeptuneCallback's default base_namespace
Points = dict[str, list[tuple[int, float]]]


@pytest.fixture
def offline_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Per-test offline stores of Comet and Neptune, so only this run's output is read back."""
    dirs = {"comet": tmp_path / "comet_offline", "neptune": tmp_path / "neptune_data"}
    monkeypatch.setenv("COMET_OFFLINE_DIRECTORY", str(dirs["comet"]))
    monkeypatch.setenv("NEPTUNE_DATA_DIRECTORY", str(dirs["neptune"]))
    for name in ("COMET_MODE", "COMET_API_KEY", "COMET_EXPERIMENT_KEY", "COMET_LOG_ASSETS", "TENSORBOARD_LOGGING_DIR"):
        monkeypatch.delenv(name, raising=False)
    return dirs


def make_trainer(out: Path, callbacks: list[Any] | None = None, **overrides: Any) -> Trainer:
    args = TrainingArguments(**{
        "output_dir": str(out), "report_to": REPORT_TO, "max_steps": 6, "logging_steps": 1,
        "eval_strategy": "steps", "eval_steps": 3, "save_steps": 3, "per_device_train_batch_size": 8,
        "learning_rate": 0.05, "run_name": "end-to-end", "disable_tqdm": True, "use_cpu": True, **overrides,
    })
    return Trainer(TinyRegressor(), args, train_dataset=tiny_dataset(32), eval_dataset=tiny_dataset(16, seed=1),
                   callbacks=callbacks)


def callback_named(trainer: Trainer, name: str) -> Any:
    (found,) = [cb for cb in trainer.callback_handler.callbacks if getattr(cb, "name", None) == name]
    return found


# -- what each tracker should hold, from log_history ---------------------------------------------------


def numeric(entry: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in entry.items() if k != "step" and isinstance(v, (int, float))}


def expected_rewritten(log_history: list[dict[str, Any]]) -> Points:
    """``train/x``, ``eval/x`` keys (as TensorBoard, Comet and Neptune name them), every (step, value) in order."""
    out: Points = defaultdict(list)
    for entry in log_history:
        for key, value in rewrite_logs(numeric(entry)).items():
            out[key].append((entry["step"], value))
    return dict(out)


def expected_dvclive(log_history: list[dict[str, Any]]) -> dict[str, dict[int, float]]:
    """DVCLive's own names (``eval_loss`` -> ``eval/loss``, ``loss`` -> ``loss``): one row per metric and step."""
    from dvclive.utils import standardize_metric_name

    out: dict[str, dict[int, float]] = defaultdict(dict)
    for entry in log_history:
        for key, value in numeric(entry).items():
            out[standardize_metric_name(key, "dvclive.huggingface")][entry["step"]] = value
    return dict(out)


# -- reading back what each SDK wrote ------------------------------------------------------------------


def tensorboard_scalars(logdir: Path) -> Points:
    from tensorboard.backend.event_processing.event_accumulator import (  # type: ignore[import-untyped]
        SCALARS,
        EventAccumulator,
    )

    acc = EventAccumulator(str(logdir), size_guidance={SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def dvclive_rows(live_dir: Path, plots: str = "plots") -> Points:
    """``<live_dir>/plots/metrics/**.tsv`` as ``{metric: [(step, value), ...]}`` in file order."""
    root = live_dir / plots / "metrics"
    out: Points = {}
    for tsv in sorted(root.rglob("*.tsv")):
        with tsv.open(encoding="utf-8", newline="") as fobj:
            reader = csv.DictReader(fobj, delimiter="\t")
            assert reader.fieldnames == ["step", tsv.stem], tsv
            out[tsv.relative_to(root).with_suffix("").as_posix()] = [
                (int(row["step"]), float(row[tsv.stem])) for row in reader
            ]
    return out


def comet_archive(folder: Path, key: str) -> tuple[list[tuple[str, int, float]], dict[str, Any]]:
    """Metrics ``(name, step, value)`` and ``log_other`` values of the offline archive of experiment ``key``."""
    found = []
    for path in sorted(folder.glob("*.zip")):
        with zipfile.ZipFile(path) as zf:
            if json.loads(zf.read("experiment.json"))["offline_id"] == key:
                found.append([json.loads(line) for line in zf.read("messages.json").decode().splitlines() if line])
    assert len(found) == 1, f"{len(found)} offline archives of experiment {key} in {folder}"
    (messages,) = found
    metrics = [
        (m["metric"]["metricName"], m["metric"]["step"], m["metric"]["metricValue"])
        for m in (msg["payload"] for msg in messages if msg["type"] == "metric_msg")
        if m["metric"]["metricName"].startswith(("train/", "eval/"))
    ]
    others = {msg["payload"]["key"]: msg["payload"]["value"] for msg in messages if msg["type"] == "log_other"}
    return metrics, others


def neptune_run(data_dir: Path, run_id: str) -> tuple[Points, dict[str, Any]]:
    """Series and assigned values of an offline run, replayed from its operation log as ``neptune sync`` does."""
    from neptune.internal.operation import LogFloats, Operation

    (folder,) = (data_dir / "offline").glob(f"run__{run_id}__*")
    series: Points = defaultdict(list)
    values: dict[str, Any] = {}
    for log in sorted(folder.glob("data-*.log"), key=lambda p: int(p.stem.split("-")[1])):
        for line in log.read_text(encoding="utf-8").splitlines():
            op = Operation.from_dict(json.loads(line)["obj"])
            path = "/".join(op.path)
            if isinstance(op, LogFloats):
                series[path].extend((int(v.step or 0), v.value) for v in op.values)
            elif type(op).__name__.startswith("Assign"):
                values[path] = op.value  # type: ignore[attr-defined]
    return dict(series), values


# -- comparisons --------------------------------------------------------------------------------------


def assert_tensorboard_matches(logdir: Path, log_history: list[dict[str, Any]]) -> None:
    got, want = tensorboard_scalars(logdir), expected_rewritten(log_history)
    assert sorted(got) == sorted(want)
    for tag, points in want.items():
        assert [s for s, _ in got[tag]] == [s for s, _ in points], tag
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in points], rel=1e-6, abs=1e-7), tag  # float32


def assert_dvclive_matches(live_dir: Path, log_history: list[dict[str, Any]], plots: str = "plots") -> None:
    got, want = dvclive_rows(live_dir, plots), expected_dvclive(log_history)
    assert sorted(got) == sorted(want)
    for name, rows in got.items():
        steps = [s for s, _ in rows]
        assert steps == sorted(set(steps)), f"{name}: a step twice or out of order: {steps}"
        assert dict(rows) == want[name], name


def assert_comet_matches(folder: Path, key: str, log_history: list[dict[str, Any]]) -> None:
    metrics, others = comet_archive(folder, key)
    want = [(tag, step, value) for tag, points in expected_rewritten(log_history).items() for step, value in points]
    assert sorted(metrics) == sorted(want)
    assert others["status"] == "finished"


def assert_neptune_matches(data_dir: Path, run_id: str, log_history: list[dict[str, Any]]) -> None:
    series, values = neptune_run(data_dir, run_id)
    want = {f"{NEPTUNE_NS}/{tag}": points for tag, points in expected_rewritten(log_history).items()}
    epoch = want.pop(f"{NEPTUNE_NS}/train/epoch")  # a single value, not a series
    assert {k: v for k, v in series.items() if k.startswith(f"{NEPTUNE_NS}/")} == want
    assert values[f"{NEPTUNE_NS}/train/epoch"] == epoch[-1][1]
    assert values["sys/failed"] is False


def assert_run_shape(trainer: Trainer, out: Path) -> list[dict[str, Any]]:
    history = trainer.state.log_history
    assert trainer.state.global_step == 6
    assert [e["step"] for e in history if "loss" in e] == [1, 2, 3, 4, 5, 6]
    assert [e["step"] for e in history if "eval_loss" in e] == [3, 6]
    assert "train_loss" in history[-1]
    assert (out / "checkpoint-3").is_dir() and (out / "checkpoint-6").is_dir()
    return history


# -- the runs -------------------------------------------------------------------------------------------


def test_four_trackers_hold_the_same_history(tmp_path: Path, offline_dirs: dict[str, Path]) -> None:
    out = tmp_path / "out"
    trainer = make_trainer(out)  # strict: the root conftest sets EPOCHAL_STRICT_INTEGRATIONS=1
    assert trainer.args.strict_integrations is True
    tensorboard, dvclive, comet, neptune = (callback_named(trainer, name) for name in REPORT_TO)

    trainer.train()

    assert trainer.integration_failures == []
    history = assert_run_shape(trainer, out)
    assert Path(tensorboard.run_id) == out / "runs"
    assert_tensorboard_matches(out / "runs", history)
    assert Path(dvclive.run_id) == out / "dvclive"
    assert_dvclive_matches(out / "dvclive", history)
    assert_comet_matches(offline_dirs["comet"], comet.run_id, history)
    assert_neptune_matches(offline_dirs["neptune"], neptune.run_id, history)


class BreakDVCLiveAfterSave(TrainerCallback):
    """Once checkpoint ``step`` is saved, DVCLive's ``plots`` folder becomes a regular file.

    Integrations run before user callbacks, and ``on_save`` waits for their queues, so
    DVCLive has written every row up to ``step`` (kept aside in ``plots-before-fault``)
    and its next write (the log of ``step + 1``) fails with a real OSError from the SDK.
    """

    def __init__(self, step: int, live_dir: Path) -> None:
        self.step = step
        self.live_dir = live_dir

    def on_save(self, args: TrainingArguments, state: TrainerState, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step:
            plots = self.live_dir / "plots"
            plots.rename(self.live_dir / "plots-before-fault")
            plots.write_text("a file where DVCLive keeps its plots folder")


def test_one_tracker_failing_mid_run_leaves_training_and_the_others_intact(
    tmp_path: Path, offline_dirs: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "out"
    trainer = make_trainer(out, callbacks=[BreakDVCLiveAfterSave(3, out / "dvclive")], strict_integrations=False)
    comet, neptune = callback_named(trainer, "comet_ml"), callback_named(trainer, "neptune")

    trainer.train()

    history = assert_run_shape(trainer, out)
    [failure] = trainer.integration_failures
    assert (failure.name, failure.event) == ("dvclive", "on_log")
    assert isinstance(failure.error, OSError), repr(failure.error)
    assert f"{os.sep}dvclive{os.sep}" in failure.traceback  # raised inside the SDK
    assert "failed in on_log and was disabled; training continues" in caplog.text
    # The others hold the whole run.
    assert_tensorboard_matches(out / "runs", history)
    assert_comet_matches(offline_dirs["comet"], comet.run_id, history)
    assert_neptune_matches(offline_dirs["neptune"], neptune.run_id, history)
    # DVCLive holds every step up to the fault.
    assert_dvclive_matches(out / "dvclive", [e for e in history if e["step"] <= 3], plots="plots-before-fault")
