"""AzureMLCallback against the real azureml-core SDK offline, read back from what its offline run prints.

Outside an AzureML job (the root conftest unsets every ``AZUREML_*`` variable),
``Run.get_context()`` is an ``_OfflineRun`` whose ``log`` prints
``Attempted to log scalar metric <name>:\\n<value>`` and stores nothing: its
printed output is the run's log here.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
from epochal_azureml import AzureMLCallback
from epochal_core import Trainer, TrainingArguments
from epochal_core.state import TrainerState
from epochal_core.testing import CrashAt, TinyRegressor, scripted_run, tiny_dataset

LOGGED = re.compile(r"^Attempted to log scalar metric (\S+):\n(.*)$", re.MULTILINE)


def read_back(printed: str) -> list[tuple[str, float]]:
    """``(name, value)`` of every metric the offline run was asked to log, in order."""
    return [(name, float(value)) for name, value in LOGGED.findall(printed)]


def expected(log_history: list[dict[str, Any]]) -> list[tuple[str, float]]:
    """Every number of ``log_history`` under its own key (AzureML keys are not rewritten), in order."""
    return [(key, float(value)) for entry in log_history for key, value in entry.items()
            if key != "step" and isinstance(value, (int, float))]


def tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.mark.slow
def test_scripted_run_reaches_the_runs_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = Path(os.environ["HOME"])
    home_before = tree(home)
    callback = AzureMLCallback()
    run = scripted_run(callback, output_dir=tmp_path / "out", extra_logs={"note": "text"})

    assert read_back(capsys.readouterr().out) == expected(run.state.log_history)
    assert str(callback.run_id).startswith("OfflineRun_")
    assert tree(home) == home_before and sorted(os.listdir(tmp_path)) == ["out"]


def trainer_args(out: Path, **overrides: Any) -> TrainingArguments:
    kwargs: dict[str, Any] = dict(output_dir=str(out), max_steps=4, per_device_train_batch_size=8, logging_steps=1,
                                  save_steps=2, report_to="none", disable_tqdm=True, use_cpu=True)
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


@pytest.mark.slow
def test_resume_in_the_same_run_sends_no_step_twice(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from azureml.core.run import Run

    azureml_run = Run.get_context()
    out, ds = tmp_path / "out", tiny_dataset()
    crashing = Trainer(TinyRegressor(), trainer_args(out), train_dataset=ds,
                       callbacks=[AzureMLCallback(azureml_run=azureml_run), CrashAt(3)])
    with pytest.raises(RuntimeError, match="crash at step 3"):
        crashing.train()
    # eval_on_start evaluates again at the checkpoint step: the run already has step 2, so it is not sent.
    resumed = Trainer(TinyRegressor(), trainer_args(out, eval_strategy="steps", eval_steps=2, eval_on_start=True),
                      train_dataset=ds, eval_dataset=ds, callbacks=[AzureMLCallback(azureml_run=azureml_run)])
    resumed.train(resume_from_checkpoint=out / "checkpoint-2")
    assert any("eval_loss" in e and e["step"] == 2 for e in resumed.state.log_history)

    sent = expected(crashing.state.log_history) + expected([e for e in resumed.state.log_history if e["step"] > 2])
    assert read_back(capsys.readouterr().out) == sent


def test_another_run_gets_every_step(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A checkpoint from another AzureML run (another job) holds steps that run has, not this one.
    callback = AzureMLCallback()
    callback.load_state_dict({"run_id": "OfflineRun_of_an_earlier_job", "last_logged_step": 5})
    run = scripted_run(callback, output_dir=tmp_path / "out", max_steps=8, start_step=2,
                       state=TrainerState(global_step=2))
    assert {e["step"] for e in run.state.log_history} >= {4, 5}  # at or below the checkpoint's last logged step
    assert read_back(capsys.readouterr().out) == expected(run.state.log_history)


def test_report_to_all_leaves_out_azureml_outside_a_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = Trainer(TinyRegressor(), trainer_args(tmp_path / "out", report_to="all"), train_dataset=tiny_dataset())
    assert not any(isinstance(cb, AzureMLCallback) for cb in trainer.callback_handler.callbacks)
    monkeypatch.setenv("AZUREML_RUN_ID", "run-1")
    assert AzureMLCallback.configuration_problem() is None
    trainer = Trainer(TinyRegressor(), trainer_args(tmp_path / "out", report_to="all"), train_dataset=tiny_dataset())
    assert any(isinstance(cb, AzureMLCallback) for cb in trainer.callback_handler.callbacks)
