"""DVCLiveCallback against the real dvclive SDK, reading back the plain files it writes."""

from __future__ import annotations

import csv
import json
import logging
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from dvclive.utils import standardize_metric_name
from epochal_core import Trainer, TrainingArguments
from epochal_core.testing import CrashAt, TinyRegressor, scripted_run, tiny_dataset
from epochal_dvclive import DVCLiveCallback


def read_rows(live_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every ``plots/metrics/**.tsv`` as ``{metric name: [(step, value), ...]}``, in file order."""
    root = live_dir / "plots" / "metrics"
    out: dict[str, list[tuple[int, float]]] = {}
    for tsv in sorted(root.rglob("*.tsv")):
        name = tsv.relative_to(root).with_suffix("").as_posix()
        with tsv.open(encoding="utf-8", newline="") as fobj:
            reader = csv.DictReader(fobj, delimiter="\t")
            assert reader.fieldnames == ["step", tsv.stem]
            out[name] = [(int(row["step"]), float(row[tsv.stem])) for row in reader]
    return out


def expected_rows(log_history: list[dict[str, Any]]) -> dict[str, dict[int, float]]:
    """``log_history`` as ``{standardised metric name: {global_step: value}}``."""
    out: dict[str, dict[int, float]] = {}
    for entry in log_history:
        for key, value in entry.items():
            if key != "step":
                out.setdefault(standardize_metric_name(key, "dvclive.huggingface"), {})[entry["step"]] = float(value)
    return out


def assert_rows_match(live_dir: Path, log_history: list[dict[str, Any]]) -> None:
    rows = read_rows(live_dir)
    expected = expected_rows(log_history)
    assert set(rows) == set(expected)
    for name, points in rows.items():
        steps = [step for step, _ in points]
        assert steps == sorted(set(steps)), f"{name}: a step is logged twice or out of order: {steps}"
        assert dict(points) == expected[name], name


def make_trainer(output_dir: Path, max_steps: int, callbacks: list[Any] | None = None, **kwargs: Any) -> Trainer:
    data = tiny_dataset(40)
    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=max_steps, logging_steps=1, save_steps=5, per_device_train_batch_size=8,
        learning_rate=0.05, report_to=["dvclive"], disable_tqdm=True, **kwargs,
    )
    return Trainer(TinyRegressor(), args, train_dataset=data, callbacks=callbacks)


def test_scripted_run_writes_every_log_at_global_step(tmp_path: Path) -> None:
    run = scripted_run(DVCLiveCallback(), output_dir=tmp_path / "out")

    live_dir = tmp_path / "out" / "dvclive"
    assert_rows_match(live_dir, run.state.log_history)
    assert (live_dir / "plots" / "metrics" / "eval" / "loss.tsv").is_file()
    assert (live_dir / "plots" / "metrics" / "train" / "runtime.tsv").is_file()
    params = yaml.safe_load((live_dir / "params.yaml").read_text())
    assert params["max_steps"] == 10
    assert params["run_name"] == "scripted-run"
    assert params["config"] == {"hidden_size": 8, "num_layers": 2, "activation": "relu"}
    summary = json.loads((live_dir / "metrics.json").read_text())
    assert summary["step"] == 10
    assert summary["eval"]["loss"] == run.state.log_history[-2]["eval_loss"]
    # dvc.yaml sits next to the live dir (inside it dvclive duplicates its entries); nothing lands in the CWD.
    dvcyaml = yaml.safe_load((tmp_path / "out" / "dvc.yaml").read_text())
    assert dvcyaml["params"] == ["dvclive/params.yaml"]
    assert not (live_dir / "dvc.yaml").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_trainer_run_rows_match_log_history(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path / "out", max_steps=6)
    trainer.train()

    assert trainer.integration_failures == []
    assert_rows_match(tmp_path / "out" / "dvclive", trainer.state.log_history)
    assert [step for step, _ in read_rows(tmp_path / "out" / "dvclive")["loss"]] == [1, 2, 3, 4, 5, 6]
    params = yaml.safe_load((tmp_path / "out" / "dvclive" / "params.yaml").read_text())
    assert params["learning_rate"] == 0.05
    assert params["config"] == {"in_features": 4, "note": None}


def test_resume_continues_the_run_without_duplicate_rows(tmp_path: Path) -> None:
    live_dir = tmp_path / "out" / "dvclive"
    first = make_trainer(tmp_path / "out", max_steps=10, callbacks=[CrashAt(8)])
    with pytest.raises(RuntimeError, match="crash at step 8"):
        first.train()
    # The crash ended the run with what was logged: steps 6 and 7 are past the checkpoint of step 5.
    assert [step for step, _ in read_rows(live_dir)["loss"]] == [1, 2, 3, 4, 5, 6, 7]
    assert json.loads((live_dir / "metrics.json").read_text())["step"] == 7

    second = make_trainer(tmp_path / "out", max_steps=10)
    second.train(resume_from_checkpoint=True)

    assert second.integration_failures == []
    assert [step for step, _ in read_rows(live_dir)["loss"]] == list(range(1, 11))
    assert_rows_match(live_dir, second.state.log_history)
    assert json.loads((live_dir / "metrics.json").read_text())["step"] == 10
    saved = json.loads((tmp_path / "out" / "checkpoint-5" / "trainer_state.json").read_text())
    assert str(live_dir.resolve()) in json.dumps(saved["stateful_callbacks"])


class BreakLiveDirAt(DVCLiveCallback):
    """Real dvclive, broken from the callback's own thread so the failure point is deterministic.

    No offline mode makes dvclive fail mid-run, so the live dir is replaced by a regular
    file just before the metrics of ``step`` are written; dvclive then raises an OSError.
    """

    def __init__(self, step: int) -> None:
        super().__init__()
        self.break_step = step

    def log_metrics(self, metrics: dict[str, float | int], step: int, state: Any) -> None:
        if step == self.break_step and self.live is not None:
            live_dir = Path(self.live.dir)
            shutil.rmtree(live_dir)
            live_dir.write_text("not a directory")
        super().log_metrics(metrics, step, state)


def test_sdk_failure_is_isolated_unless_strict(tmp_path: Path) -> None:
    run = scripted_run(BreakLiveDirAt(4), output_dir=tmp_path / "out", strict=False)
    assert run.events[-1] == "on_train_end"
    assert len(run.failures) == 1
    assert run.failures[0].name == "dvclive"
    assert run.failures[0].event == "on_log"
    assert isinstance(run.failures[0].error, OSError)


def test_sdk_failure_surfaces_in_strict_mode(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        scripted_run(BreakLiveDirAt(4), output_dir=tmp_path / "out", strict=True)


def test_construction_has_no_side_effects_and_validates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    DVCLiveCallback()
    DVCLiveCallback(log_model="all", dir="elsewhere", report="md")
    assert list(tmp_path.iterdir()) == []
    assert DVCLiveCallback.configuration_problem() is None

    with pytest.raises(TypeError, match=r"expects a dvclive\.Live, got str"):
        DVCLiveCallback(live="dvclive")
    with pytest.raises(ValueError, match="log_model='end'"):
        DVCLiveCallback(log_model="end")
    monkeypatch.setenv("HF_DVCLIVE_LOG_MODEL", "true")
    assert DVCLiveCallback()._log_model is True
    monkeypatch.setenv("HF_DVCLIVE_LOG_MODEL", "ALL")
    assert DVCLiveCallback()._log_model == "all"
    assert DVCLiveCallback(log_model=False)._log_model is False


def test_user_live_and_kwargs(tmp_path: Path) -> None:
    from dvclive import Live

    live = Live(dir=str(tmp_path / "mine"), save_dvc_exp=False, dvcyaml=None)
    with pytest.raises(ValueError, match="one or the other"):
        DVCLiveCallback(live=live, dir="x")
    run = scripted_run(DVCLiveCallback(live=live), output_dir=tmp_path / "out")
    assert_rows_match(tmp_path / "mine", run.state.log_history)

    # Live arguments reach dvclive (transformers drops them).
    scripted_run(DVCLiveCallback(dir=str(tmp_path / "custom"), dvcyaml=None), output_dir=tmp_path / "out2")
    assert (tmp_path / "custom" / "params.yaml").is_file()
    assert not (tmp_path / "out2" / "dvclive").exists()
    assert not (tmp_path / "dvc.yaml").exists()


def git(*args: str) -> str:
    cmd = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args]
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def test_git_repo_without_dvc_is_left_alone(tmp_path: Path) -> None:
    git("init", "-q")
    git("commit", "-q", "--allow-empty", "-m", "init")
    run = scripted_run(DVCLiveCallback(), output_dir=tmp_path / "out")

    assert_rows_match(tmp_path / "out" / "dvclive", run.state.log_history)
    assert not (tmp_path / ".dvc").exists()
    assert git("status", "--porcelain") == "?? out/\n"
    assert git("for-each-ref", "refs/exps") == ""


def test_log_model_with_a_dvc_repo(tmp_path: Path) -> None:
    from dvc.repo import Repo

    Repo.init(str(tmp_path), no_scm=True).close()
    scripted_run(DVCLiveCallback(log_model="all"), output_dir=tmp_path / "all")
    assert (tmp_path / "all" / "checkpoint-5.dvc").is_file()
    assert (tmp_path / "all" / "checkpoint-10.dvc").is_file()
    artifacts = yaml.safe_load((tmp_path / "all" / "dvc.yaml").read_text())["artifacts"]
    assert artifacts["checkpoint"]["path"] == "checkpoint-10"
    assert artifacts["checkpoint"]["type"] == "model"

    scripted_run(DVCLiveCallback(log_model=True), output_dir=tmp_path / "end")
    copied = tmp_path / "end" / "dvclive" / "artifacts" / "checkpoint-10" / "pytorch_model.bin"
    assert copied.read_bytes() == b"weights"
    artifacts = yaml.safe_load((tmp_path / "end" / "dvc.yaml").read_text())["artifacts"]
    assert artifacts["last"]["path"] == "dvclive/artifacts/checkpoint-10"


def test_log_model_without_a_dvc_repo_warns_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        run = scripted_run(DVCLiveCallback(log_model="all"), output_dir=tmp_path / "out")
    assert run.failures == []
    messages = [r.getMessage() for r in caplog.records]
    assert sum("no DVC repository" in m for m in messages) == 1
    assert not any("A DVC repo is required" in m for m in messages)
    assert not list((tmp_path / "out").glob("*.dvc"))


# -- names: what transformers' DVCLiveCallback records ----------------------------------------------------

# transformers' DVCLiveCallback (src/transformers/integrations/integration_utils.py):
#   setup:  live.log_params(args.to_dict())  -> params.yaml holds the TrainingArguments fields at the top level;
#   on_log: live.log_metric(standardize_metric_name(key, "dvclive.huggingface"), value) for each loggable value,
#           then live.next_step()  -> plots/metrics/loss.tsv, eval/loss.tsv, train/runtime.tsv, ...
TRANSFORMERS_PARAMS = {"learning_rate", "max_steps", "output_dir", "run_name", "seed", "logging_steps",
                       "per_device_train_batch_size"}
TRANSFORMERS_METRICS = {"loss", "grad_norm", "learning_rate", "epoch", "eval/loss", "eval/accuracy", "train/runtime",
                        "train/loss"}


def test_names_are_the_ones_transformers_records(tmp_path: Path) -> None:
    """params.yaml keys and metric files equal those of transformers' calls on a second Live run."""
    from dvclive import Live
    from dvclive.plots import Metric

    out = tmp_path / "out"
    args = TrainingArguments(output_dir=str(out), max_steps=10, logging_steps=2, eval_strategy="steps",
                             eval_steps=5, save_steps=5, report_to="none", run_name="scripted-run", disable_tqdm=True)
    run = scripted_run(DVCLiveCallback(), output_dir=out, args=args)
    ours = yaml.safe_load((out / "dvclive" / "params.yaml").read_text())
    assert set(ours) >= TRANSFORMERS_PARAMS
    assert set(read_rows(out / "dvclive")) >= TRANSFORMERS_METRICS

    anchor_dir = tmp_path / "anchor" / "dvclive"
    live = Live(dir=str(anchor_dir), save_dvc_exp=False, dvcyaml=str(tmp_path / "anchor" / "dvc.yaml"))
    live.log_params(args.to_dict())
    for entry in run.state.log_history:
        for key, value in entry.items():
            if key != "step" and Metric.could_log(value):
                live.log_metric(standardize_metric_name(key, "dvclive.huggingface"), value)
        live.next_step()
    live.end()
    theirs = yaml.safe_load((anchor_dir / "params.yaml").read_text())
    # The same names; the model config is epochal's addition, under "config".
    assert set(ours) - {"config"} == set(theirs)
    assert set(read_rows(out / "dvclive")) == set(read_rows(anchor_dir))
