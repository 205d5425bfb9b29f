"""CometCallback against the real comet_ml SDK in offline mode, read back from its archives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
from epochal_comet import CometCallback
from epochal_core import Trainer, TrainingArguments
from epochal_core.integrations import rewrite_logs
from epochal_core.state import TrainerState
from epochal_core.testing import CrashAt, ScriptedFailure, TinyRegressor, scripted_run, tiny_dataset

PREFIXES = ("train/", "eval/", "test/")


@pytest.fixture
def offline_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "comet_offline"
    monkeypatch.setenv("COMET_OFFLINE_DIRECTORY", str(folder))
    monkeypatch.setenv("COMET_START_ONLINE", "false")
    for name in ("COMET_MODE", "COMET_API_KEY", "COMET_LOG_ASSETS", "COMET_PROJECT_NAME", "COMET_EXPERIMENT_KEY"):
        monkeypatch.delenv(name, raising=False)
    return folder


class Archive:
    """One offline archive: ``experiment.json`` plus the JSON lines of ``messages.json``."""

    def __init__(self, path: Path) -> None:
        with zipfile.ZipFile(path) as zf:
            self.meta: dict[str, Any] = json.loads(zf.read("experiment.json"))
            lines = zf.read("messages.json").decode().splitlines()
        self.messages = [json.loads(line) for line in lines if line.strip()]

    def payloads(self, kind: str) -> list[dict[str, Any]]:
        return [m["payload"] for m in self.messages if m["type"] == kind]

    def metrics(self) -> list[tuple[str, int, float, float | None]]:
        out = []
        for payload in self.payloads("metric_msg"):
            m = payload["metric"]
            if m["metricName"].startswith(PREFIXES):
                out.append((m["metricName"], m["step"], m["metricValue"], m.get("epoch")))
        return out

    def params(self) -> dict[str, Any]:
        params = {}
        for payload in self.payloads("parameter_msg"):
            p = payload.get("param") or payload["params"]  # list values come under "params"
            if p.get("source") != "auto-logged":
                params[p["paramName"]] = p["paramValue"]
        return params

    def others(self) -> dict[str, Any]:
        return {p["key"]: p["value"] for p in self.payloads("log_other")}


def archives(folder: Path) -> list[Archive]:
    found = sorted(folder.glob("*.zip"), key=lambda p: p.stat().st_mtime_ns)
    return [Archive(p) for p in found]


def expected_metrics(log_history: list[dict[str, Any]]) -> list[tuple[str, int, float, float | None]]:
    out = []
    for entry in log_history:
        logs = {k: v for k, v in entry.items() if k != "step"}
        for key, value in rewrite_logs(logs).items():
            if isinstance(value, (int, float)):
                out.append((key, entry["step"], value, entry.get("epoch")))
    return out


def trainer_args(out: Path, **overrides: Any) -> TrainingArguments:
    kwargs: dict[str, Any] = dict(
        output_dir=str(out), max_steps=4, per_device_train_batch_size=8, logging_steps=1, save_steps=2,
        report_to=["comet_ml"], run_name="tiny", disable_tqdm=True, use_cpu=True,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


# -- (1) scripted run -------------------------------------------------------------------------------
def test_scripted_run_metrics_and_parameters_round_trip(offline_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run = scripted_run(CometCallback(project_name="epochal-tests"), output_dir=out, extra_logs={"hist": [1, 2]})

    [archive] = archives(offline_dir)
    got = archive.metrics()
    assert sorted(got) == sorted(expected_metrics(run.state.log_history))
    assert not any(name == "train/hist" for name, *_ in got)  # non-scalar dropped
    params = archive.params()
    assert params["args|output_dir"] == str(out)
    assert params["args|max_steps"] == 10
    assert params["args|logging_steps"] == 2
    assert params["config|hidden_size"] == 8
    assert params["config|activation"] == "relu"
    others = archive.others()
    assert others["Name"] == "scripted-run"
    assert others["status"] == "finished"
    assert archive.meta["project_name"] == "epochal-tests"
    assert not run.failures


def test_log_assets_uploads_output_dir(offline_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMET_LOG_ASSETS", "true")
    scripted_run(CometCallback(), output_dir=tmp_path / "out", max_steps=5)
    [archive] = archives(offline_dir)
    names = {p["additional_params"].get("fileName") for p in archive.payloads("file_upload")}
    assert {"pytorch_model.bin", "trainer_state.json"} <= names


# -- (2) real Trainer --------------------------------------------------------------------------------
def test_trainer_run_matches_log_history(offline_dir: Path, tmp_path: Path) -> None:
    ds = tiny_dataset()
    trainer = Trainer(TinyRegressor(), trainer_args(tmp_path / "out"), train_dataset=ds)
    [callback] = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, CometCallback)]
    trainer.train()
    trainer.predict(ds)

    first, second = archives(offline_dir)
    assert sorted(first.metrics()) == sorted(expected_metrics(trainer.state.log_history))
    assert first.params()["args|run_name"] == "tiny"
    assert first.params()["config|in_features"] == 4
    # predict() after train() reopens the same experiment for the test metrics
    assert first.meta["offline_id"] == second.meta["offline_id"] == callback.run_id
    assert second.meta["resume_strategy"] == "get"
    assert {name for name, *_ in second.metrics()} >= {"test/loss", "test/runtime"}
    assert {step for _, step, *_ in second.metrics()} == {4}
    assert not trainer.integration_failures


# -- (3) resume ----------------------------------------------------------------------------------------
def test_resume_continues_the_same_experiment(offline_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    ds = tiny_dataset()
    crashing = Trainer(TinyRegressor(), trainer_args(out), train_dataset=ds, callbacks=[CrashAt(3)])
    with pytest.raises(RuntimeError, match="crash at step 3"):
        crashing.train()
    [crashed] = archives(offline_dir)
    assert crashed.others()["status"] == "failed"
    assert crashed.others()["error"] == "ScriptedFailure: crash at step 3"
    key = crashed.meta["offline_id"]
    saved = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert saved["stateful_callbacks"]["CometCallback"]["state_dict"]["run_id"] == key

    # eval_on_start re-evaluates at the checkpoint step: that step must not be sent again.
    resumed = Trainer(
        TinyRegressor(), trainer_args(out, eval_strategy="steps", eval_steps=2, eval_on_start=True),
        train_dataset=ds, eval_dataset=ds,
    )
    resumed.train(resume_from_checkpoint=out / "checkpoint-2")
    assert any(e.get("eval_loss") is not None and e["step"] == 2 for e in resumed.state.log_history)

    continued = archives(offline_dir)[-1]
    assert continued.meta["offline_id"] == key
    assert continued.meta["resume_strategy"] == "get"  # `comet upload` appends it to the first archive's experiment
    steps = {step for _, step, *_ in continued.metrics()}
    assert steps == {3, 4}
    new_logs = [e for e in resumed.state.log_history if e["step"] > 2]
    assert sorted(continued.metrics()) == sorted(expected_metrics(new_logs))
    assert continued.others()["status"] == "finished"


# -- (4) failures ----------------------------------------------------------------------------------------
class FlakyComet(CometCallback):
    """Comet's offline logging never raises, so to show an SDK call failing mid-run the
    real experiment's ``log_metrics`` is made to raise from step 4 on (the only fake here)."""

    def setup(self, args: Any, state: Any, model: Any, **kwargs: Any) -> None:
        super().setup(args, state, model, **kwargs)
        real = self.experiment.log_metrics

        def log_metrics(metrics: dict[str, Any], step: int | None = None, **kw: Any) -> None:
            if step is not None and step >= 4:
                raise ConnectionError("comet backend unavailable")
            real(metrics, step=step, **kw)

        self.experiment.log_metrics = log_metrics


@pytest.mark.parametrize("strict", [False, True])
def test_sdk_error_mid_run(offline_dir: Path, strict: bool) -> None:
    if strict:
        with pytest.raises(ConnectionError, match="backend unavailable"):
            scripted_run(FlakyComet(), strict=True)
    else:
        run = scripted_run(FlakyComet(), strict=False)
        assert [(f.event, type(f.error)) for f in run.failures] == [("on_log", ConnectionError)]
        assert run.state.global_step == 10
    # Either way the experiment was closed as failed, with what it got before the error.
    [archive] = archives(offline_dir)
    assert archive.others()["status"] == "failed"
    assert archive.others()["error"] == "ConnectionError: comet backend unavailable"
    assert {step for _, step, *_ in archive.metrics()} == {2}


@pytest.mark.parametrize("strict", [False, True])
def test_sdk_error_at_start(tmp_path: Path, offline_dir: Path, strict: bool) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the offline directory should be")
    callback = CometCallback(offline_directory=str(blocker / "sub"))
    if strict:
        with pytest.raises(Exception, match="not-a-dir"):
            scripted_run(callback, strict=True)
    else:
        run = scripted_run(callback, strict=False)
        assert [f.event for f in run.failures] == ["on_train_begin"]
        assert run.state.global_step == 10
    assert callback.experiment is None


def test_training_crash_marks_experiment_failed(offline_dir: Path) -> None:
    with pytest.raises(ScriptedFailure):
        scripted_run(CometCallback(), fail_at_step=6)
    [archive] = archives(offline_dir)
    assert archive.others()["status"] == "failed"
    assert archive.others()["error"] == "ScriptedFailure: scripted failure at step 6"
    assert max(step for _, step, *_ in archive.metrics()) == 5


def test_invalid_comet_mode_is_an_error(offline_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMET_MODE", "disabled")
    with pytest.raises(ValueError, match="COMET_MODE='disabled'"):
        scripted_run(CometCallback(), max_steps=2)
    assert "COMET_MODE" in (CometCallback.configuration_problem() or "")


def test_mode_get_uses_comet_experiment_key(offline_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMET_MODE", "get")
    with pytest.raises(ValueError, match="COMET_EXPERIMENT_KEY"):
        scripted_run(CometCallback(), max_steps=2)
    key = "0123456789abcdef0123456789abcdef"
    monkeypatch.setenv("COMET_EXPERIMENT_KEY", key)
    scripted_run(CometCallback(), max_steps=2)
    [archive] = archives(offline_dir)
    assert (archive.meta["offline_id"], archive.meta["resume_strategy"]) == (key, "get")


def test_scripted_resume_skips_steps_already_logged(offline_dir: Path, tmp_path: Path) -> None:
    first = CometCallback()
    run = scripted_run(first, output_dir=tmp_path / "a", max_steps=5)
    second = CometCallback()
    second.load_state_dict({"run_id": first.run_id, "last_logged_step": 5})
    state = TrainerState.load_from_json(os.path.join(run.checkpoints[-1], "trainer_state.json"))
    scripted_run(second, output_dir=tmp_path / "b", max_steps=10, start_step=5, state=state)
    a, b = archives(offline_dir)
    assert a.meta["offline_id"] == b.meta["offline_id"] == second.run_id
    assert min(step for _, step, *_ in b.metrics()) == 6


# -- (5) construction and configuration ------------------------------------------------------------------
def test_construction_has_no_side_effects(tmp_path: Path) -> None:
    code = (
        "import os, sys\n"
        "from epochal_comet import CometCallback\n"
        "cb = CometCallback(online=True, project_name='p')\n"
        "assert 'comet_ml' not in sys.modules, 'comet_ml imported'\n"
        "assert cb.experiment is None and cb.run_id is None\n"
        "assert os.listdir('.') == [], os.listdir('.')\n"
    )
    workdir = tmp_path / "empty"
    workdir.mkdir()
    subprocess.run([sys.executable, "-c", code], cwd=workdir, check=True, env=os.environ.copy())


def test_configuration_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("COMET_API_KEY", "COMET_MODE", "COMET_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("COMET_START_ONLINE", "true")
    problem = CometCallback.configuration_problem()
    assert problem is not None and "COMET_API_KEY" in problem and "COMET_START_ONLINE=false" in problem
    monkeypatch.delenv("COMET_START_ONLINE")  # Comet's default is online
    assert CometCallback.configuration_problem() == problem

    monkeypatch.setenv("COMET_START_ONLINE", "false")
    assert CometCallback.configuration_problem() is None
    monkeypatch.setenv("COMET_START_ONLINE", "true")
    monkeypatch.setenv("COMET_MODE", "offline")
    assert CometCallback.configuration_problem() is None
    monkeypatch.delenv("COMET_MODE")
    monkeypatch.setenv("COMET_API_KEY", "abc")
    assert CometCallback.configuration_problem() is None


def test_configuration_problem_reads_comet_config_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("COMET_API_KEY", "COMET_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("COMET_START_ONLINE", "true")
    (tmp_path / ".comet.config").write_text("[comet]\napi_key = abc\n")
    monkeypatch.setenv("COMET_CONFIG", str(tmp_path))
    assert CometCallback.configuration_problem() is None


def test_report_to_all_skips_unconfigured_online_comet(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("COMET_API_KEY", raising=False)
    monkeypatch.setenv("COMET_START_ONLINE", "true")
    args = trainer_args(tmp_path / "out", report_to="all")
    trainer = Trainer(TinyRegressor(), args, train_dataset=tiny_dataset())
    assert not any(isinstance(cb, CometCallback) for cb in trainer.callback_handler.callbacks)
    assert "COMET_API_KEY" in caplog.text


# -- names: what transformers' CometCallback records -------------------------------------------------------

# transformers' CometCallback (src/transformers/integrations/integration_utils.py):
#   setup:  experiment.__internal_api__log_parameters__({"args": args.to_dict(), "config": model.config.to_dict()},
#                                                       framework="transformers", source="manual", flatten_nested=True)
#           Comet flattens nested parameters with "|": "args|learning_rate", "config|hidden_size".
#   on_log: experiment.__internal_api__log_metrics__(rewrite_logs(logs), step=state.global_step, epoch=state.epoch)
TRANSFORMERS_PARAMS = {"args|learning_rate", "args|max_steps", "args|output_dir", "args|run_name", "args|seed",
                       "args|logging_steps", "args|per_device_train_batch_size", "config|hidden_size",
                       "config|num_layers", "config|activation"}
TRANSFORMERS_METRICS = {"train/loss", "train/grad_norm", "train/learning_rate", "train/epoch", "eval/loss",
                        "eval/accuracy", "train/train_runtime", "train/train_loss"}


def test_names_are_the_ones_transformers_records(offline_dir: Path, tmp_path: Path) -> None:
    """Parameter and metric names read back from the archive equal those of transformers' calls on Comet."""
    import comet_ml
    from epochal_core.testing import tiny_model

    out = tmp_path / "out"
    args = TrainingArguments(output_dir=str(out), max_steps=10, logging_steps=2, eval_strategy="steps",
                             eval_steps=5, save_steps=5, report_to="none", run_name="scripted-run", disable_tqdm=True)
    run = scripted_run(CometCallback(), output_dir=out, args=args)
    [ours] = archives(offline_dir)
    assert set(ours.params()) >= TRANSFORMERS_PARAMS
    assert {name for name, *_ in ours.metrics()} >= TRANSFORMERS_METRICS

    # transformers' own calls, on a second offline experiment, for the same run.
    anchor = comet_ml.start(online=False, experiment_config=comet_ml.ExperimentConfig(
        offline_directory=str(tmp_path / "anchor"), log_code=False, log_git_metadata=False, log_git_patch=False,
        log_env_details=False, auto_output_logging=False, parse_args=False, log_graph=False))
    anchor.__internal_api__log_parameters__({"args": args.to_dict(), "config": tiny_model().config},
                                            framework="transformers", source="manual", flatten_nested=True)
    for entry in run.state.log_history:
        logs = {k: v for k, v in entry.items() if k != "step"}
        anchor.__internal_api__log_metrics__(rewrite_logs(logs), step=entry["step"], epoch=entry.get("epoch"),
                                             framework="transformers")
    anchor.end()
    [theirs] = archives(tmp_path / "anchor")
    assert set(ours.params()) == set(theirs.params())
    assert {name for name, *_ in ours.metrics()} == {name for name, *_ in theirs.metrics()}
