"""Failures users hit in the field: two runs in one folder, a full disk, a stalled tracker, resume past the end."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from epochal_core.run_lock import LOCK_NAME, OutputDirInUseError, RunLock

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
