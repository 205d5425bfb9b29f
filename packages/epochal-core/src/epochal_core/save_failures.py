"""Checkpoint saves that fail in the field: a full disk, a file-size limit, a folder gone read-only.

torch reports a failed write through a Python file as ``RuntimeError: [enforce fail
at inline_container.cc] unexpected pos ...``, which says nothing about space. The
checkpoint writer keeps the ``OSError`` behind it (see ``checkpoint._write``), and
:func:`save_failed` turns it into a :class:`CheckpointSaveError` that names the
checkpoint, the folder and the OS error (for a full disk: the bytes the last
checkpoint took and the bytes free now), removes the partial temporary folder and
says that the earlier checkpoints are intact and how to resume. :class:`DiskSpaceWatch`
warns once, before a save, when the free space is already smaller than the last
checkpoint.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from pathlib import Path

from .checkpoint import list_checkpoints

__all__ = ["CheckpointSaveError", "DiskSpaceWatch", "checkpoint_size", "save_failed"]

logger = logging.getLogger(__name__)

#: The errors that mean "no room": a full disk, a quota, a file-size limit.
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class CheckpointSaveError(OSError):
    """Writing a training checkpoint failed; the message names it, the folder, the OS error and the way back.

    It is an ``OSError`` (same ``errno`` as the cause, which is its ``__cause__``), so
    code that catches ``OSError`` around ``train()`` still does.
    """

    def __init__(self, message: str, cause: OSError) -> None:
        super().__init__(cause.errno, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def checkpoint_size(path: str | os.PathLike[str]) -> int:
    """Bytes the files of checkpoint folder ``path`` take (0 when it is unreadable)."""
    total = 0
    for file in Path(path).rglob("*"):
        try:
            if file.is_file():
                total += file.stat().st_size
        except OSError:
            continue
    return total


def _newest_checkpoint(output_dir: str | os.PathLike[str]) -> Path | None:
    found = list_checkpoints(output_dir)  # quietly: resume reports incomplete folders, not every save
    return found[-1] if found else None


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def save_failed(err: OSError, output_dir: str | os.PathLike[str], step: int, tmp: Path) -> CheckpointSaveError:
    """Remove the partial folder ``tmp`` and describe the failed save of ``checkpoint-<step>``.

    Args:
        err: The OS error the write raised.
        output_dir: The run's output folder.
        step: The step of the checkpoint that was being written.
        tmp: Its temporary folder (removed here).

    Returns:
        The error to raise (from ``err``).
    """
    shutil.rmtree(tmp, ignore_errors=True)
    root = Path(output_dir)
    last = _newest_checkpoint(root)
    parts = [f"Saving checkpoint-{step} into {str(root)!r} failed: {err}."]
    if err.errno in _NO_SPACE:
        free = _free_bytes(root)
        free_text = f"{free:,} bytes are free now" if free is not None else "the free space is unknown"
        took = "no earlier checkpoint"
        if last is not None:
            took = f"the last checkpoint ({last.name}) took {checkpoint_size(last):,} bytes"
        what = "The disk is full" if err.errno == errno.ENOSPC else "There is no room for the file"
        parts.append(f"{what}: {took} and {free_text}.")
    parts.append(f"Its partial folder {tmp.name!r} was removed.")
    if last is not None:
        parts.append(
            f"The earlier checkpoints are intact (newest: {str(last)!r}): make room (or set save_total_limit, or "
            "another output_dir), then resume with trainer.train(resume_from_checkpoint=True)."
        )
    else:
        parts.append("No earlier checkpoint exists: make room, then train again.")
    return CheckpointSaveError(" ".join(parts), err)


class DiskSpaceWatch:
    """Warns once when, before a save, the free space is smaller than the last checkpoint.

    The last checkpoint is the one this watch saw saved (:meth:`saved`), else the newest
    complete one in ``output_dir`` (looked up once: a resumed run's).
    """

    def __init__(self) -> None:
        self.warned = False
        self._last: tuple[str, int] | None = None  # (name, bytes) of the last checkpoint

    def saved(self, path: str | os.PathLike[str]) -> None:
        """Remember checkpoint ``path``, just committed, as the last one."""
        self._last = (Path(path).name, checkpoint_size(path))

    def before_save(self, output_dir: str | os.PathLike[str]) -> None:
        """Check the free space of ``output_dir`` against the last checkpoint (warns at most once)."""
        if self.warned:
            return
        if self._last is None:
            newest = _newest_checkpoint(output_dir)
            if newest is None:
                return
            self.saved(newest)
        assert self._last is not None
        name, size = self._last
        free = _free_bytes(Path(output_dir))
        if free is not None and free < size:
            self.warned = True
            logger.warning(
                "Only %s bytes are free in %r, less than the last checkpoint (%s) took (%s bytes): the next save "
                "will probably fail. Make room, or set save_total_limit to rotate old checkpoints.",
                f"{free:,}", os.fspath(output_dir), name, f"{size:,}",
            )
