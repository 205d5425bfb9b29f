"""Failures users hit in the field: two runs in one folder, a full disk, a stalled tracker, resume past the end."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from epochal_core import IntegrationStalled, Trainer, TrainerCallback, TrainingArguments
from epochal_core import checkpoint as ckpt
from epochal_core.run_lock import LOCK_NAME, OutputDirInUseError, RunLock
from epochal_core.testing import CrashAt, ScriptedFailure
from helpers_core import DictDataset, TinyRegressor
from helpers_field_failures import StallingTracker

_HOLD_LOCK = textwrap.dedent(
    """
    import sys
    from epochal_core.run_lock import RunLock
    lock = RunLock(sys.argv[1])
    lock.acquire()
    print("locked", flush=True)
    sys.stdin.read()  # hold it until the test kills us or closes stdin
    """
)


def _start_holder(output_dir: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(output_dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_process_on_the_same_output_dir_is_refused_naming_the_holder(tmp_path: Path) -> None:
    holder = _start_holder(tmp_path)
    try:
        with pytest.raises(OutputDirInUseError) as info:
            RunLock(tmp_path).acquire()
        message = str(info.value)
        assert f"pid {holder.pid}" in message
        assert socket.gethostname() in message
        assert str(tmp_path) in message and "another TrainingArguments.output_dir" in message
        # A refused contender leaves the holder's name in place for the next one.
        with pytest.raises(OutputDirInUseError, match=f"pid {holder.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_dies_with_a_sigkilled_holder(tmp_path: Path) -> None:
    holder = _start_holder(tmp_path)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert (tmp_path / LOCK_NAME).exists()  # the file stays; the OS lock does not
    with RunLock(tmp_path) as lock:
        assert lock.held
    assert not lock.held


def test_a_released_lock_can_be_taken_again_in_the_same_process(tmp_path: Path) -> None:
    first = RunLock(tmp_path)
    first.acquire()
    with pytest.raises(OutputDirInUseError, match=f"pid {os.getpid()}"):
        RunLock(tmp_path).acquire()
    first.release()
    first.release()  # idempotent
    with RunLock(tmp_path):
        pass


# -- the run lock through the Trainer ----------------------------------------------------------------

TESTS = str(Path(__file__).parent)


def _trainer(out: Path, callbacks: list[Any] | None = None, eval_dataset: Any = None, **kw: Any) -> Trainer:
    base: dict[str, Any] = dict(output_dir=str(out), report_to="none", disable_tqdm=True, per_device_train_batch_size=4,
                                logging_steps=1, save_steps=2, max_steps=4, seed=0)
    base.update(kw)
    torch.manual_seed(0)
    return Trainer(TinyRegressor(), TrainingArguments(**base), train_dataset=DictDataset(40),
                   eval_dataset=eval_dataset, callbacks=callbacks)


def _checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-"))


def test_a_live_runs_folder_refuses_train_but_not_evaluate_predict_or_a_later_resume(tmp_path: Path) -> None:
    _trainer(tmp_path).train()
    other = RunLock(tmp_path)
    other.acquire()  # released by the finished run; now "another live run" holds it
    try:
        trainer = _trainer(tmp_path, eval_dataset=DictDataset(8), max_steps=6)
        assert "eval_loss" in trainer.evaluate()
        assert trainer.predict(DictDataset(8)).predictions.shape[0] == 8
        with pytest.raises(OutputDirInUseError, match=f"pid {os.getpid()}"):
            trainer.train(resume_from_checkpoint=True)
        assert trainer.state.global_step == 0 and _checkpoints(tmp_path) == ["checkpoint-2", "checkpoint-4"]
    finally:
        other.release()
    assert trainer.train(resume_from_checkpoint=True).global_step == 6
    assert ckpt.is_complete(tmp_path / "checkpoint-6")


def test_the_lock_is_released_when_training_fails(tmp_path: Path) -> None:
    with pytest.raises(ScriptedFailure):
        _trainer(tmp_path, callbacks=[CrashAt(3)]).train()
    with RunLock(tmp_path) as lock:
        assert lock.held


_TRAIN_AND_HOLD = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    from epochal_core import Trainer, TrainerCallback, TrainingArguments
    from helpers_core import DictDataset, TinyRegressor

    class HoldAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                print("training", flush=True)
                sys.stdin.read()  # until the test kills us

    args = TrainingArguments(output_dir=sys.argv[1], report_to="none", disable_tqdm=True, per_device_train_batch_size=4,
                             logging_steps=1, save_steps=2, max_steps=6, seed=0)
    Trainer(TinyRegressor(), args, train_dataset=DictDataset(40), callbacks=[HoldAt()]).train()
    """
)


@pytest.mark.slow
def test_a_second_trainer_is_refused_while_another_process_trains_and_a_sigkilled_one_frees_the_folder(
    tmp_path: Path,
) -> None:
    proc = subprocess.Popen([sys.executable, "-c", _TRAIN_AND_HOLD.format(tests=TESTS), str(tmp_path)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert "training\n" in iter(proc.stdout.readline, "")  # after the console's log lines
        trainer = _trainer(tmp_path, max_steps=6)
        with pytest.raises(OutputDirInUseError) as info:
            trainer.train(resume_from_checkpoint=True)
        assert f"pid {proc.pid}" in str(info.value) and socket.gethostname() in str(info.value)
        assert trainer.state.global_step == 0
    finally:
        proc.kill()
        proc.wait()
    # The killed run left checkpoint-2 and no lock: the next run resumes from it.
    assert trainer.train(resume_from_checkpoint=True).global_step == 6
    assert _checkpoints(tmp_path) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]


# -- resume never passes max_steps -------------------------------------------------------------------


class _StepCounter(TrainerCallback):
    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.steps.append(state.global_step)


def test_resuming_a_finished_run_with_the_same_max_steps_trains_no_step_and_writes_no_checkpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _trainer(tmp_path, max_steps=6, save_steps=3).train()
    written = {p: p.stat().st_mtime_ns for p in (tmp_path / "checkpoint-6").iterdir()}
    counter = _StepCounter()
    result = _trainer(tmp_path, callbacks=[counter], max_steps=6, save_steps=3).train(resume_from_checkpoint=True)
    assert counter.steps == [] and result.global_step == 6
    assert _checkpoints(tmp_path) == ["checkpoint-3", "checkpoint-6"]
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "checkpoint-6").iterdir()} == written
    assert "nothing to train" in caplog.text
    # A larger max_steps still extends the run.
    extend = _StepCounter()
    _trainer(tmp_path, callbacks=[extend], max_steps=9, save_steps=3).train(resume_from_checkpoint=True)
    assert extend.steps == [7, 8, 9] and _checkpoints(tmp_path)[-1] == "checkpoint-9"


# -- bounded waits on integrations -------------------------------------------------------------------


def _worker_of(tracker: StallingTracker) -> threading.Thread | None:
    return next((t for t in threading.enumerate() if t.name == f"epochal-{tracker.name}"), None)


def _release(tracker: StallingTracker, worker: threading.Thread | None) -> None:
    tracker.release.set()
    if worker is not None:
        worker.join(30)
        assert not worker.is_alive()


def test_a_tracker_stalled_from_step_5_is_detached_and_the_step_10_checkpoint_is_still_written(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tracker = StallingTracker(stall_from=5)
    trainer = _trainer(tmp_path, callbacks=[tracker], max_steps=12, save_steps=10, integration_timeout=0.5,
                       strict_integrations=False)
    worker = None
    try:
        with caplog.at_level(logging.WARNING):
            result = trainer.train()
        worker = _worker_of(tracker)
    finally:
        _release(tracker, worker)
    assert result.global_step == 12 and ckpt.is_complete(tmp_path / "checkpoint-10")
    [failure] = trainer.integration_failures
    assert failure.name == "stalling" and failure.event == "on_log" and isinstance(failure.error, IntegrationStalled)
    warning = next(r.getMessage() for r in caplog.records if "stalled" in r.getMessage())
    assert "Integration 'stalling' stalled: its on_log call has not returned after" in warning
    undelivered = int(re.search(r"; (\d+) event\(s\) were not delivered", warning).group(1))  # type: ignore[union-attr]
    assert undelivered >= 5  # the logs of steps 6 to 9 at least, and the stuck one
    # Detached: once released, the stuck call returns and nothing after it is ever delivered.
    assert tracker.calls[-1] == ("log", 5)
    assert [step for what, step in tracker.calls] == [1, 2, 3, 4, 5]


def test_a_tracker_stalled_closing_its_run_does_not_hold_the_end_of_training(tmp_path: Path) -> None:
    tracker = StallingTracker(stall_from="finish")
    trainer = _trainer(tmp_path, callbacks=[tracker], max_steps=3, save_steps=100, integration_timeout=0.3,
                       strict_integrations=False)
    worker = None
    try:
        result = trainer.train()
        worker = _worker_of(tracker)
        assert tracker.stuck.is_set()
    finally:
        _release(tracker, worker)
    assert result.global_step == 3
    [failure] = trainer.integration_failures
    assert failure.event == "on_train_end" and isinstance(failure.error, IntegrationStalled)


def test_strict_mode_raises_on_a_stalled_tracker(tmp_path: Path) -> None:
    tracker = StallingTracker(stall_from=2)
    trainer = _trainer(tmp_path, callbacks=[tracker], max_steps=6, save_steps=4, integration_timeout=0.3,
                       strict_integrations=True)
    try:
        with pytest.raises(IntegrationStalled, match="'stalling' stalled"):
            trainer.train()
        worker = _worker_of(tracker)
    finally:
        tracker.release.set()
    _release(tracker, worker)
    assert not (tmp_path / "checkpoint-4").exists()  # strict: the stall stops the run before the save
    with RunLock(tmp_path):
        pass


_SIGTERM_WITH_STALL = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from epochal_core import Trainer, TrainerCallback, TrainingArguments
    from helpers_core import DictDataset, TinyRegressor
    from helpers_field_failures import StallingTracker

    tracker = StallingTracker(stall_from=5)  # never released: the process must exit anyway

    class TermAt7(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 7:
                assert tracker.stuck.wait(60), "the tracker never stalled"
                os.kill(os.getpid(), signal.SIGTERM)

    args = TrainingArguments(output_dir=sys.argv[1], report_to="none", disable_tqdm=True, per_device_train_batch_size=4,
                             logging_steps=1, save_steps=100, max_steps=50, seed=0, integration_timeout=0.5,
                             strict_integrations=False)
    trainer = Trainer(TinyRegressor(), args, train_dataset=DictDataset(40), callbacks=[tracker, TermAt7()])
    trainer.train()
    print("preempted", trainer.preempted, trainer.state.global_step, len(trainer.integration_failures), flush=True)
    """
)


@pytest.mark.slow
def test_sigterm_with_a_stalled_tracker_still_saves_and_exits_normally(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", _SIGTERM_WITH_STALL.format(tests=TESTS), str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "preempted True 7 1" in proc.stdout
    assert "Integration 'stalling' stalled" in proc.stderr
    assert ckpt.is_complete(tmp_path / "checkpoint-7")


# -- a full disk ------------------------------------------------------------------------------------

_FILL_AFTER_FIRST_SAVE = textwrap.dedent(
    """
    import json, os, resource, shutil, signal, sys
    sys.path.insert(0, {tests!r})
    from epochal_core import CheckpointSaveError, Trainer, TrainerCallback, TrainingArguments
    from epochal_core.checkpoint import is_complete
    from helpers_core import DictDataset, TinyRegressor

    out, mode = sys.argv[1], sys.argv[2]
    ballast = os.path.join(out, "ballast")

    class FillAfterFirstSave(TrainerCallback):
        def on_save(self, args, state, control, checkpoint=None, **kwargs):
            if state.global_step != 5:
                return
            if mode == "fsize":  # a file-size limit: writes past 64 bytes fail with EFBIG
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (64, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
            else:  # a real small file system: fill it up to a few KB
                free = shutil.disk_usage(out).free
                with open(ballast, "wb") as f:
                    f.write(b"0" * max(free - 4096, 0))

    def trainer(callbacks):
        args = TrainingArguments(output_dir=out, report_to="none", disable_tqdm=True, per_device_train_batch_size=4,
                                 logging_steps=1, save_steps=5, max_steps=10, seed=0)
        return Trainer(TinyRegressor(), args, train_dataset=DictDataset(40), callbacks=callbacks)

    report = {{}}
    try:
        trainer([FillAfterFirstSave()]).train()
    except CheckpointSaveError as err:
        report.update(message=str(err), errno=err.errno, cause=repr(err.__cause__))
    report["left"] = sorted(os.listdir(out))
    report["complete5"] = is_complete(os.path.join(out, "checkpoint-5"))
    if mode == "mount":  # make room and resume in the same namespace (the mount dies with it)
        os.remove(ballast)
        report["resumed"] = trainer([]).train(resume_from_checkpoint=True).global_step
        report["complete10"] = is_complete(os.path.join(out, "checkpoint-10"))
    print(json.dumps(report), flush=True)
    """
)


def _disk_full_report(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _assert_names_everything(report: dict[str, Any], out: Path, reason: str) -> None:
    message = report["message"]
    assert "checkpoint-10" in message and str(out) in message and reason in message, message
    assert "the last checkpoint (checkpoint-5) took" in message and "bytes are free now" in message
    assert "earlier checkpoints are intact" in message and "resume_from_checkpoint=True" in message
    assert "inline_container" not in message
    # The partial folder is gone; the previous checkpoint is complete.
    assert not [name for name in report["left"] if name.startswith(".tmp")], report["left"]
    assert "checkpoint-10" not in report["left"] and report["complete5"]


@pytest.mark.slow
def test_a_file_size_limit_during_a_save_names_it_removes_the_partial_folder_and_resume_works(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", _FILL_AFTER_FIRST_SAVE.format(tests=TESTS), str(tmp_path), "fsize"],
                          capture_output=True, text=True, timeout=120)
    report = _disk_full_report(proc)
    assert report["errno"] == errno.EFBIG and "File too large" in report["message"]
    _assert_names_everything(report, tmp_path, "There is no room for the file")
    assert _trainer(tmp_path, save_steps=5, max_steps=10).train(resume_from_checkpoint=True).global_step == 10
    assert ckpt.is_complete(tmp_path / "checkpoint-10")


def _can_mount_tmpfs() -> bool:
    if not sys.platform.startswith("linux") or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", 'd=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs "$d"'],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.slow
def test_enospc_on_a_small_filesystem_names_the_sizes_warns_before_and_resumes_after_making_room(
    tmp_path: Path,
) -> None:
    if not _can_mount_tmpfs():
        pytest.skip("cannot mount a tmpfs here (needs unprivileged user namespaces: unshare -rm)")
    mount = ['mount -t tmpfs -o size=1m tmpfs "$1" && exec "$2" -c "$3" "$1" mount']
    proc = subprocess.run(
        ["unshare", "-rm", "sh", "-c", *mount, "sh", str(tmp_path), sys.executable,
         _FILL_AFTER_FIRST_SAVE.format(tests=TESTS)],
        capture_output=True, text=True, timeout=120,
    )
    report = _disk_full_report(proc)
    assert report["errno"] == errno.ENOSPC and "No space left on device" in report["message"]
    _assert_names_everything(report, tmp_path, "The disk is full")
    assert "less than the last checkpoint (checkpoint-5) took" in proc.stderr  # warned before the save
    assert report["resumed"] == 10 and report["complete10"]
