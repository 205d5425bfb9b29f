"""MLflowCallback against the real mlflow SDK: a local file store, and a real ``mlflow server``.

The server (SQLite backend, local artifacts) is started once for this module on
127.0.0.1 and stopped after it; it takes tens of seconds to come up, so the tests that
need a server share it. Everything is read back with ``MlflowClient``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from epochal_core import Trainer, TrainingArguments
from epochal_core.state import TrainerState
from epochal_core.testing import CrashAt, ScriptedFailure, TinyRegressor, scripted_run, tiny_dataset
from epochal_mlflow import MLflowCallback, sanitize_name
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

SERVER_START_DEADLINE = 240.0  # seconds; it usually takes 35-40 s here, more on a loaded machine


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``mlflow server`` on 127.0.0.1 (SQLite backend), stopped with its process group after the module."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    # No job runner: without this flag the server spawns a job runner and 7 huey consumers.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = (root / "server.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--artifacts-destination", str(root / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_DEADLINE
        while True:  # poll until healthy (or the deadline), never a fixed wait
            assert process.poll() is None, (root / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "mlflow server did not become healthy"
            time.sleep(0.25)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
        log.close()


@pytest.fixture
def local_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MLFLOW_RUN_ID", "MLFLOW_TAGS", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_NESTED_RUN", "MLFLOW_FLATTEN_PARAMS",
                 "MLFLOW_MAX_LOG_PARAMS", "HF_MLFLOW_LOG_ARTIFACTS", "DISABLE_MLFLOW_INTEGRATION"):
        monkeypatch.delenv(name, raising=False)


def history(client: MlflowClient, run_id: str) -> list[tuple[str, int, float]]:
    """``(key, step, value)`` of every metric value the run holds."""
    keys = client.get_run(run_id).data.metrics
    return [(key, m.step, m.value) for key in keys for m in client.get_metric_history(run_id, key)]


def expected(log_history: list[dict[str, Any]]) -> list[tuple[str, int, float]]:
    """What transformers' MLflowCallback sends: the Trainer's own keys (not rewritten), numbers only."""
    return [(sanitize_name(key), entry["step"], float(value)) for entry in log_history
            for key, value in entry.items() if key != "step" and isinstance(value, (int, float))]


def trainer_args(out: Path, **overrides: Any) -> TrainingArguments:
    kwargs: dict[str, Any] = dict(
        output_dir=str(out), max_steps=4, per_device_train_batch_size=8, logging_steps=1, save_steps=2,
        report_to=["mlflow"], run_name="tiny", disable_tqdm=True, use_cpu=True,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


# -- local store --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_local_store_reads_back_as_log_history(local_store: str, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TAGS", '{"team": "nlp", "stage": 2}')
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "epochal-tests")
    callback = MLflowCallback()
    run = scripted_run(callback, output_dir=tmp_path / "out", extra_logs={"hist": [1, 2]})

    client = MlflowClient(local_store)
    got = client.get_run(str(callback.run_id))
    assert sorted(history(client, got.info.run_id)) == sorted(expected(run.state.log_history))
    assert "hist" not in got.data.metrics  # non-scalar dropped
    assert got.info.status == "FINISHED"
    assert got.info.run_name == "scripted-run"
    assert client.get_experiment(got.info.experiment_id).name == "epochal-tests"
    assert {"team": "nlp", "stage": "2"}.items() <= got.data.tags.items()
    # transformers' parameters: the model config and the arguments, in one flat dict, as strings.
    assert got.data.params["hidden_size"] == "8" and got.data.params["activation"] == "relu"
    assert got.data.params["max_steps"] == "10" and got.data.params["output_dir"] == str(tmp_path / "out")


class FlakyMLflow(MLflowCallback):
    """A local MLflow store never fails to log, so to show an SDK call raising mid-run the real
    client's ``log_batch`` is made to raise for metrics past step 5 (the only fake here)."""

    def setup(self, args: Any, state: TrainerState, model: Any, **kwargs: Any) -> None:
        super().setup(args, state, model, **kwargs)
        real = self.client.log_batch

        def log_batch(run_id: str, metrics: Any = (), **kw: Any) -> None:
            if any(m.step > 5 for m in metrics):
                raise ConnectionError("tracking server went away")
            real(run_id, metrics=metrics, **kw)

        self.client.log_batch = log_batch


def test_sdk_raising_mid_run_is_isolated_and_the_run_ends_failed(local_store: str, tmp_path: Path) -> None:
    callback = FlakyMLflow()
    run = scripted_run(callback, output_dir=tmp_path / "out", strict=False)

    assert run.state.global_step == 10 and run.events[-1] == "on_train_end"  # training finished
    assert [(f.name, type(f.error)) for f in run.failures] == [("mlflow", ConnectionError)]
    client = MlflowClient(local_store)
    assert client.get_run(str(callback.run_id)).info.status == "FAILED"
    # Buffered metrics are sent at the latest when a checkpoint is saved: those up to checkpoint-5 made it.
    assert max(step for _, step, _ in history(client, str(callback.run_id))) == 5


@pytest.mark.slow
def test_user_run_is_logged_to_and_left_open(local_store: str, tmp_path: Path) -> None:
    import mlflow

    mlflow.set_tracking_uri(local_store)
    try:
        with mlflow.start_run() as user_run:
            callback = MLflowCallback()
            scripted_run(callback, output_dir=tmp_path / "out", max_steps=4)
            assert callback.run_id == user_run.info.run_id
            assert MlflowClient(local_store).get_run(user_run.info.run_id).info.status == "RUNNING"
            assert "loss" in MlflowClient(local_store).get_run(user_run.info.run_id).data.metrics
    finally:
        mlflow.set_tracking_uri(None)


def test_configuration_problem_and_invalid_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert MLflowCallback.configuration_problem() is None  # a local store needs no login
    monkeypatch.setenv("DISABLE_MLFLOW_INTEGRATION", "true")
    assert "DISABLE_MLFLOW_INTEGRATION=TRUE" in str(MLflowCallback.configuration_problem())
    monkeypatch.delenv("DISABLE_MLFLOW_INTEGRATION")
    monkeypatch.setenv("MLFLOW_TAGS", "team=nlp")
    with pytest.raises(ValueError, match=r"MLFLOW_TAGS='team=nlp' is not JSON"):
        scripted_run(MLflowCallback(), output_dir=tmp_path / "out", max_steps=2)


# -- a real server ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_server_crash_fails_the_run_and_resume_continues_it_without_a_step_twice(
    server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    monkeypatch.setenv("HF_MLFLOW_LOG_ARTIFACTS", "true")
    out = tmp_path / "out"
    ds = tiny_dataset()
    # The crash comes after step 3 was logged: the run holds a step past its last checkpoint (2).
    crashing = Trainer(TinyRegressor(), trainer_args(out), train_dataset=ds,
                       callbacks=[CrashAt(3, before_next_step=True)])
    with pytest.raises(ScriptedFailure):
        crashing.train()
    saved = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    run_id = saved["stateful_callbacks"]["MLflowCallback"]["state_dict"]["run_id"]
    client = MlflowClient(server)
    assert client.get_run(run_id).info.status == "FAILED"
    crashed = history(client, run_id)

    resumed = Trainer(TinyRegressor(), trainer_args(out, eval_strategy="steps", eval_steps=2, eval_on_start=True),
                      train_dataset=ds, eval_dataset=ds)
    resumed.train(resume_from_checkpoint=out / "checkpoint-2")

    got = client.get_run(run_id)
    assert got.info.status == "FINISHED"
    assert len(client.search_runs([got.info.experiment_id])) == 1, "resume started a second run"
    both = history(client, run_id)
    assert {step for _, step, _ in crashed} == {1, 2, 3}
    new = list(both)
    for point in crashed:  # still there, unchanged
        new.remove(point)
    assert {step for _, step, _ in new} == {4}, "the resumed run logged a step the run already held"
    # As sets: an SQL store keeps one row per (key, step, value, millisecond), and `epoch` repeats within a step.
    assert set(new) == set(expected([e for e in resumed.state.log_history if e["step"] > 3]))
    assert [a.path for a in client.list_artifacts(run_id)] == ["checkpoint-2", "checkpoint-4"]


@pytest.mark.slow
def test_server_mlflow_run_id_reattaches_and_many_long_params_are_batched(
    server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = MlflowClient(server)
    existing = client.create_run("0", run_name="made-elsewhere")
    client.log_param(existing.info.run_id, "origin", "notebook")
    client.set_terminated(existing.info.run_id)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    monkeypatch.setenv("MLFLOW_RUN_ID", existing.info.run_id)

    model = TinyRegressor()
    n_keys = 2 * MAX_PARAMS_TAGS_PER_BATCH + 30  # more than two batches
    model.config = {f"layer_{i}": i for i in range(n_keys)} | {"long_value": "x" * (MAX_PARAM_VAL_LENGTH + 500)}
    callback = MLflowCallback()
    run = scripted_run(callback, output_dir=tmp_path / "out", model=model, max_steps=4)

    assert callback.run_id == existing.info.run_id
    got = client.get_run(existing.info.run_id)
    assert got.info.status == "FINISHED"
    params = got.data.params
    assert params["origin"] == "notebook"
    assert all(params[f"layer_{i}"] == str(i) for i in range(n_keys))
    assert params["long_value"] == "x" * MAX_PARAM_VAL_LENGTH  # truncated to MLflow's limit, not dropped
    # As sets: an SQL store keeps one row per (key, step, value, millisecond), and `epoch` repeats within a step.
    assert set(history(client, existing.info.run_id)) == set(expected(run.state.log_history))
