"""One training run per ``output_dir``: an exclusive OS lock held while ``train()`` runs.

Two runs writing checkpoints into one folder corrupt each other (one rotates or
renames the other's temporary folders). The run therefore takes an exclusive,
non-blocking lock on ``<output_dir>/.epochal-run.lock`` before it trains and
keeps it until ``train()`` returns. The lock is the operating system's
(``flock`` on POSIX, ``msvcrt.locking`` on Windows): it belongs to the open
file, so it vanishes with the process however that ends (a SIGKILL or a power
cut leaves no stale lock to clean up by hand). Evaluating, predicting or
resuming from a finished run's folder does not need it.

Why not the ``filelock`` package: the core depends on torch, tqdm and
typing-extensions only, and ``filelock`` opens its lock file with ``O_TRUNC``,
so a refused contender would erase the holder's pid and host that this module
writes into the file for the error message.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from types import TracebackType

__all__ = ["LOCK_NAME", "OutputDirInUseError", "RunLock"]

#: The lock file inside ``output_dir``.
LOCK_NAME = ".epochal-run.lock"


class OutputDirInUseError(RuntimeError):
    """Another live run holds the lock of the same ``output_dir``."""


def _try_lock(fd: int) -> bool:
    if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _describe_holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        holder = json.loads(os.read(fd, 4096).decode() or "{}")
    except (OSError, ValueError):
        holder = {}
    if not holder:  # the holder is between taking the lock and writing its name
        return "another process"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"pid {holder.get('pid')} on host {holder.get('host')!r} (since {started})"


class RunLock:
    """Exclusive lock of one ``output_dir`` for the lifetime of a training run.

    Args:
        output_dir: The run's output folder (created if missing).

    Raises:
        OutputDirInUseError: From :meth:`acquire`, when another live run holds it;
            the message names the holder (pid and host) and the fix.
    """

    def __init__(self, output_dir: str | os.PathLike[str]) -> None:
        self.path = Path(output_dir) / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock, or raise :class:`OutputDirInUseError` at once (never waits)."""
        if self._fd is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # No O_TRUNC: a refused contender must not erase the holder's name.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if not _try_lock(fd):
            holder = _describe_holder(fd)
            os.close(fd)
            raise OutputDirInUseError(
                f"output_dir {str(self.path.parent)!r} is in use by another training run ({holder}): two runs "
                "in one folder would overwrite each other's checkpoints. Give this run another "
                "TrainingArguments.output_dir, or wait until that run ends (its lock goes away with its process)."
            )
        os.ftruncate(fd, 0)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        os.write(fd, json.dumps(record).encode())
        self._fd = fd

    def release(self) -> None:
        """Let the lock go (closing the file releases the OS lock); a no-op when not held."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)  # a later reader finds no stale holder name
        except OSError:
            pass
        os.close(fd)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
