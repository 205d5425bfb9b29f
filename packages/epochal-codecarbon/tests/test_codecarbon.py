"""CodeCarbonCallback against the real codecarbon SDK (its offline tracker), read back from its emissions CSV."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from epochal_codecarbon import CodeCarbonCallback
from epochal_core import Trainer, TrainingArguments
from epochal_core.state import TrainerState
from epochal_core.testing import DropoutRegressor, ScriptedFailure, WaitAt, scripted_run, tiny_dataset


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def trainer_args(out: Path, **overrides: Any) -> TrainingArguments:
    kwargs: dict[str, Any] = dict(
        output_dir=str(out), max_steps=6, per_device_train_batch_size=8, logging_steps=1, save_steps=100,
        report_to=["codecarbon"], disable_tqdm=True, use_cpu=True,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def codecarbon_callback(trainer: Trainer) -> CodeCarbonCallback:
    [callback] = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, CodeCarbonCallback)]
    return callback


@pytest.fixture
def lookups(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every non-loopback host name the process tries to resolve (the conftest then refuses it)."""
    seen: list[str] = []
    real = socket.getaddrinfo

    def recording(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host not in (None, "localhost") and not str(host).startswith(("127.", "::1", "0.0.0.0")):
            seen.append(str(host))
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", recording)
    return seen


@pytest.mark.slow
def test_trainer_run_writes_one_offline_row_for_the_whole_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lookups: list[str]
) -> None:
    monkeypatch.setenv("CODECARBON_COUNTRY_ISO_CODE", "FRA")
    home = Path(os.environ["HOME"])
    home_before = tree(home)
    threads_before = set(threading.enumerate())
    out = tmp_path / "out"
    torch.manual_seed(0)
    plain = Trainer(DropoutRegressor(), trainer_args(tmp_path / "plain", report_to=[]), train_dataset=tiny_dataset())
    plain.train()

    torch.manual_seed(0)
    trainer = Trainer(DropoutRegressor(), trainer_args(out), train_dataset=tiny_dataset())
    callback = codecarbon_callback(trainer)
    # The tracker starts (on the reporter thread) while training runs; training waits for it at step 1.
    trainer.add_callback(WaitAt(1, ready=lambda: callback.tracker is not None))
    trainer.train()

    [row] = rows(out / "emissions.csv")  # in output_dir, as transformers; one row for the run
    assert float(row["emissions"]) == pytest.approx(callback.emissions_kg)
    assert float(row["energy_consumed"]) > 0 and float(row["duration"]) > 0
    assert (row["country_iso_code"], row["country_name"]) == ("FRA", "France")  # the offline tracker
    assert lookups == [], f"CodeCarbon tried to reach {lookups}"
    # Contained: the training is unchanged, the tracker's threads are gone, HOME and the CWD untouched.
    reference, weights = plain.model.state_dict(), trainer.model.state_dict()
    assert all(torch.equal(weights[k], reference[k]) for k in reference), "CodeCarbon changed the training"
    assert not [t for t in set(threading.enumerate()) - threads_before if not t.name.startswith("epochal-")]
    assert tree(home) == home_before
    assert sorted(os.listdir(tmp_path)) == ["out", "plain"]


def test_emissions_go_where_the_user_points_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CODECARBON_OUTPUT_DIR", str(tmp_path / "from-env"))
    scripted_run(CodeCarbonCallback(), output_dir=tmp_path / "out", max_steps=2)
    explicit = CodeCarbonCallback(output_dir=tmp_path / "explicit", country_iso_code="CAN", project_name="p")
    scripted_run(explicit, output_dir=tmp_path / "out", max_steps=2)

    assert len(rows(tmp_path / "from-env" / "emissions.csv")) == 1
    [row] = rows(tmp_path / "explicit" / "emissions.csv")
    assert (row["country_iso_code"], row["project_name"]) == ("CAN", "p")
    assert not (tmp_path / "out" / "emissions.csv").exists()


def test_only_world_rank_zero_tracks(tmp_path: Path) -> None:
    callback = CodeCarbonCallback()
    scripted_run(callback, output_dir=tmp_path / "out", max_steps=2, state=TrainerState(is_world_process_zero=False))
    assert callback.emissions_file is None
    assert not (tmp_path / "out" / "emissions.csv").exists()


def test_crash_still_writes_the_emissions_up_to_it(tmp_path: Path) -> None:
    callback = CodeCarbonCallback()
    with pytest.raises(ScriptedFailure):
        scripted_run(callback, output_dir=tmp_path / "out", max_steps=10, fail_at_step=6)
    [row] = rows(tmp_path / "out" / "emissions.csv")
    assert float(row["emissions"]) == pytest.approx(callback.emissions_kg)


def test_a_tracker_that_measured_nothing_is_an_error(tmp_path: Path) -> None:
    # CodeCarbon swallows its own failures (stop() then returns None): epochal reports them.
    callback = CodeCarbonCallback(tracker_kwargs={"tracking_mode": "not-a-mode"})
    with pytest.raises(RuntimeError, match="CodeCarbon measured nothing"):
        scripted_run(callback, output_dir=tmp_path / "out", max_steps=2)


SIGTERM_SCRIPT = """
import json, signal, sys
from epochal_codecarbon import CodeCarbonCallback
from epochal_core import Trainer, TrainingArguments
from epochal_core.testing import DropoutRegressor, WaitAt, tiny_dataset
args = TrainingArguments(output_dir=sys.argv[1], max_steps=50, per_device_train_batch_size=8, logging_steps=1,
                         save_steps=1000, report_to=["codecarbon"], disable_tqdm=True, use_cpu=True)
trainer = Trainer(DropoutRegressor(), args, train_dataset=tiny_dataset())
[callback] = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, CodeCarbonCallback)]
trainer.add_callback(WaitAt(2, ready=lambda: callback.tracker is not None, send=signal.SIGTERM))
trainer.train()
print(json.dumps({"step": trainer.state.global_step, "preempted": trainer.preempted}))
"""


@pytest.mark.slow
def test_sigterm_still_saves_and_stops_with_the_tracker_running(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-c", SIGTERM_SCRIPT, str(out)], capture_output=True, text=True,
                          timeout=300, env=os.environ.copy(), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"step": 2, "preempted": True}
    assert (out / "checkpoint-2" / "COMPLETE").is_file()
    assert len(rows(out / "emissions.csv")) == 1  # the tracker was stopped at the clean end
    assert signal.SIGTERM.name in done.stderr
