"""Checkpoint folders that are either complete and unchanged, or refused.

A checkpoint is written into a hidden temporary folder beside its final place,
every file is fsynced, a manifest (``COMPLETE``, listing each file with its size
and CRC-32) is written last, and the folder is renamed to ``checkpoint-<step>``
(an atomic rename on POSIX file systems). Old checkpoints are rotated only after
the new one is committed. A crash at any moment leaves either the previous set of
checkpoints or the new one, never a half-written folder that resume would pick.

Two ways a folder can be unusable, told apart in every message:

- *interrupted*: no valid manifest (the save never committed). Such folders are
  ignored, with a warning.
- *changed after the save*: the manifest is there but a file's size or checksum
  differs from it (edited, truncated, bit rot). :func:`verify_checkpoint` raises
  :class:`CheckpointChanged` naming the file.

Checksums are computed while a file is written (:class:`FolderWriter` feeds the
bytes ``torch.save`` hands to the file through the checksum), so saving never
reads a file back. The checksum is zlib's CRC-32, the one zip, gzip and PNG use
for the same job: it catches every changed byte and every burst of up to 32 bits,
at about 7 GB/s here (CRC-32 runs at 2 GB/s and made a save cost 1.67x a bare
one, see ``tools/bench/README.md``). It is not a defence against a forger, and
need not be: loading runs no code whatever the bytes are (below).
Everything is loaded with ``torch.load(weights_only=True)``: a tampered file
cannot run code, it fails with :class:`CheckpointError` naming the file.

This module knows nothing about training; :mod:`epochal_core.training_checkpoint`
decides what a training checkpoint holds.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any

import torch

__all__ = [
    "COMMIT_MARKER",
    "PREFIX_CHECKPOINT_DIR",
    "CheckpointChanged",
    "CheckpointError",
    "DeferredFsync",
    "FolderWriter",
    "atomic_checkpoint",
    "checkpoint_step",
    "deferred_fsync",
    "finish_file",
    "is_complete",
    "latest_checkpoint",
    "list_checkpoints",
    "load_file",
    "rotate_checkpoints",
    "save_file",
    "verify_checkpoint",
]

logger = logging.getLogger(__name__)

PREFIX_CHECKPOINT_DIR = "checkpoint"
COMMIT_MARKER = "COMPLETE"
_TMP_PREFIX = ".tmp-"
#: Per-rank lists of the files a rank wrote (with their checksums), merged into the manifest at commit.
_PART_PREFIX = ".files-"
#: Manifest versions: 1 recorded sizes only; 2 records ``{"size", "crc32"}`` per file.
MANIFEST_FORMAT = 2
_CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, tampered with or of the wrong kind."""


class CheckpointChanged(CheckpointError):
    """A file of a committed checkpoint differs from its manifest: it changed after the save."""


def _fsync_dir(path: Path) -> None:
    # Persist the directory entry itself (the rename), not only file contents.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_and_close(file: IO[Any]) -> None:
    try:
        os.fsync(file.fileno())
    finally:
        file.close()


_ADVISE = getattr(os, "posix_fadvise", None)  # Linux and most Unixes; not macOS or Windows


class DeferredFsync:
    r"""Makes several files durable for little more than the cost of one ``fsync``.

    Each file handed to :meth:`submit` starts its write-back to the disk at once
    (``posix_fadvise(POSIX_FADV_DONTNEED)``, which on Linux queues the dirty pages
    without waiting), so the disk works while the next file is serialized;
    :meth:`wait` then ``fsync``\ s and closes every file, by which time most of the
    data is on the disk. Fsyncing each file right after writing it instead made the
    next file's writes wait for the journal commit. Use it through
    :func:`deferred_fsync`, which waits before it returns.
    """

    def __init__(self) -> None:
        self._files: list[IO[Any]] = []

    def submit(self, file: IO[Any]) -> None:
        """Start writing ``file`` (already flushed) back to the disk; fsync and close it in :meth:`wait`."""
        self._files.append(file)
        if _ADVISE is not None:
            with suppress(OSError):  # only a hint: a pipe or an odd file system may refuse it
                _ADVISE(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)

    def wait(self, raise_errors: bool = True) -> None:
        """Fsync and close every submitted file; re-raise the first error (if ``raise_errors``)."""
        error: BaseException | None = None
        files, self._files = self._files, []
        for file in files:
            try:
                _fsync_and_close(file)
            except Exception as err:  # keep closing the others
                error = error or err
        if error is not None and raise_errors:
            raise error


@contextmanager
def deferred_fsync() -> Iterator[DeferredFsync]:
    """Yield a :class:`DeferredFsync`; on exit, wait until every file given to it is durable."""
    syncer = DeferredFsync()
    done = False
    try:
        yield syncer
        done = True
    finally:
        # After an error in the block, its exception wins over an fsync's.
        syncer.wait(raise_errors=done)


def finish_file(file: IO[Any], fsync: DeferredFsync | None) -> None:
    """Flush ``file``, then fsync and close it: now, or when ``fsync`` waits, if given."""
    file.flush()
    if fsync is not None:
        fsync.submit(file)
    else:
        _fsync_and_close(file)


#: Chunks at least this large are hashed on a helper thread while the training thread writes them.
_OVERLAP_BYTES = 1 << 20
_hasher: ThreadPoolExecutor | None = None


def _hash_thread() -> ThreadPoolExecutor:
    global _hasher
    if _hasher is None:  # created on the first large save, not at import
        _hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="epochal-checksum")
    return _hasher


class _ChecksummingWriter:
    """A write-only binary file that feeds every byte written through it to a running CRC-32.

    A large chunk (a tensor's storage) is checksummed on a helper thread while this
    thread copies it into the file: both release the GIL. The chunk is checksummed
    before :meth:`write` returns, in order.
    """

    def __init__(self, file: IO[bytes]) -> None:
        self.file = file
        self.crc = 0
        self.size = 0
        #: The OS error of a failed write: torch replaces it by its own RuntimeError.
        self.error: OSError | None = None

    def _update(self, data: Any) -> None:
        self.crc = zlib.crc32(data, self.crc)

    @property
    def checksum(self) -> str:
        """The CRC-32 of everything written so far, as 8 hex digits."""
        return f"{self.crc:08x}"

    def write(self, data: Any) -> int:
        size = memoryview(data).nbytes
        self.size += size
        try:
            if size < _OVERLAP_BYTES:
                self._update(data)
                return self.file.write(data)
            hashed = _hash_thread().submit(self._update, data)
            try:
                return self.file.write(data)
            finally:
                hashed.result()
        except OSError as err:
            self.error = self.error or err
            raise

    def flush(self) -> None:
        self.file.flush()


def _write(path: str | os.PathLike[str], fill: Any, fsync: DeferredFsync | None) -> dict[str, Any]:
    """Open ``path``, let ``fill`` write into a hashing wrapper, fsync; return ``{"size", "crc32"}``."""
    file = open(path, "wb")  # noqa: SIM115 - closed by finish_file, possibly later
    writer = _ChecksummingWriter(file)
    try:
        fill(writer)
    except BaseException as err:
        with suppress(OSError):  # flushing the buffer fails the same way; the first error is the one
            file.close()
        if writer.error is not None and writer.error is not err:
            # torch.save reports a failed write as "enforce fail at inline_container.cc ... unexpected
            # pos": raise the OS error (no space, file too large) that caused it.
            raise writer.error from err
        raise
    finish_file(file, fsync)
    return {"size": writer.size, "crc32": writer.checksum}


def save_file(obj: Any, path: str | os.PathLike[str], *, fsync: DeferredFsync | None = None) -> dict[str, Any]:
    """``torch.save`` ``obj`` to ``path`` and fsync it (when ``fsync`` waits, if given).

    Returns:
        ``{"size": bytes, "crc32": hex}`` of what was written, computed while writing.
    """
    return _write(path, lambda file: torch.save(obj, file), fsync)


def write_text(text: str, path: str | os.PathLike[str], *, fsync: DeferredFsync | None = None) -> dict[str, Any]:
    """Write ``text`` (UTF-8) to ``path`` and fsync it (when ``fsync`` waits, if given).

    Returns:
        ``{"size": bytes, "crc32": hex}`` of what was written.
    """
    return _write(path, lambda file: file.write(text.encode("utf-8")), fsync)


class FolderWriter:
    """Writes files into a checkpoint's temporary folder and records each one's size and CRC-32.

    Files are fsynced together when ``fsync`` waits. :meth:`record` leaves this
    rank's list in the folder, for :func:`commit` to merge into the manifest: under
    torch.distributed every rank writes its own files and rank 0 commits them all.

    Args:
        folder: The temporary folder (from :func:`temporary_dir` or :func:`atomic_checkpoint`).
        fsync: Where each file's fsync is deferred to.
    """

    def __init__(self, folder: Path, fsync: DeferredFsync | None = None) -> None:
        self.folder = folder
        self.fsync = fsync
        self.files: dict[str, dict[str, Any]] = {}

    def save(self, obj: Any, name: str) -> None:
        """``torch.save`` ``obj`` as ``name``."""
        self.files[name] = save_file(obj, self.folder / name, fsync=self.fsync)

    def write_text(self, text: str, name: str) -> None:
        """Write ``text`` (UTF-8) as ``name``."""
        self.files[name] = write_text(text, self.folder / name, fsync=self.fsync)

    def adopt(self, name: str) -> None:
        """Record ``name``, written into the folder by other code (a library's ``save_pretrained``).

        The file is read once to checksum it (from the page cache, just written) and fsynced with the others.
        """
        file = open(self.folder / name, "rb")  # noqa: SIM115 - closed by finish_file, possibly later
        try:
            crc = size = 0
            while chunk := file.read(1 << 20):
                crc = zlib.crc32(chunk, crc)
                size += len(chunk)
        except BaseException:
            file.close()
            raise
        finish_file(file, self.fsync)
        self.files[name] = {"size": size, "crc32": f"{crc:08x}"}

    def record(self, rank: int = 0) -> None:
        """Leave the list of files written by this rank in the folder (fsynced with the files)."""
        write_text(json.dumps(self.files), self.folder / f"{_PART_PREFIX}{rank}.json", fsync=self.fsync)


def load_file(path: str | os.PathLike[str], map_location: Any = "cpu") -> Any:
    """Load a checkpoint file safely (``weights_only=True``).

    Raises:
        CheckpointError: The file is missing, truncated or holds anything but
            tensors and plain containers; the message names the file.
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError as err:
        raise CheckpointError(f"Checkpoint file {os.fspath(path)!r} is missing.") from err
    except Exception as err:
        raise CheckpointError(
            f"Checkpoint file {os.fspath(path)!r} cannot be loaded safely ({type(err).__name__}: {err}). "
            "It is truncated, corrupted, or holds objects other than tensors and plain containers; "
            "epochal never unpickles arbitrary objects. Resume from another checkpoint."
        ) from err


def checkpoint_step(path: str | os.PathLike[str]) -> int | None:
    """The step of a ``checkpoint-<step>`` folder, else ``None``."""
    match = _CHECKPOINT_RE.match(Path(path).name)
    return int(match.group(1)) if match else None


def _read_manifest(folder: Path) -> dict[str, dict[str, Any]] | None:
    """The manifest's ``name -> {"size", "crc32"?}``; ``None`` without a valid one (an interrupted save)."""
    try:
        manifest = json.loads((folder / COMMIT_MARKER).read_text(encoding="utf-8"))
        files = manifest["files"]
        # Format 1 recorded the size alone.
        return {str(name): entry if isinstance(entry, dict) else {"size": int(entry)} for name, entry in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def is_complete(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a committed checkpoint: its manifest exists and is valid.

    Cheap (one small read): it says the save finished, not that the files are
    unchanged since; :func:`verify_checkpoint` checks those.
    """
    return _read_manifest(Path(path)) is not None


def _crc32_of(path: Path) -> str:
    crc = 0
    buffer = bytearray(1 << 20)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as file:
        while n := file.readinto(buffer):
            crc = zlib.crc32(view[:n], crc)
    return f"{crc:08x}"


def verify_checkpoint(path: str | os.PathLike[str]) -> None:
    """Check every file of committed checkpoint ``path`` against its manifest (size, then CRC-32).

    Raises:
        CheckpointError: ``path`` has no valid manifest: the save was interrupted.
        CheckpointChanged: A listed file is missing, or its size or checksum differs from
            the manifest: it changed after the save. The message names the file.
    """
    folder = Path(path)
    files = _read_manifest(folder)
    if files is None:
        raise CheckpointError(
            f"{os.fspath(folder)!r} is not a complete checkpoint: it has no valid {COMMIT_MARKER} manifest "
            "(the save was interrupted). Resume from another checkpoint."
        )
    for name, entry in sorted(files.items()):
        file = folder / name
        try:
            size = file.stat().st_size
        except FileNotFoundError:
            problem = "it is missing (deleted after the save)"
        else:
            if size != entry["size"]:
                problem = f"its size is {size} bytes where the save wrote {entry['size']}"
            elif "crc32" in entry and _crc32_of(file) != entry["crc32"]:
                problem = "its CRC-32 differs from the one recorded while saving"
            else:
                continue
        raise CheckpointChanged(
            f"Checkpoint file {os.fspath(file)!r} changed after the save: {problem}. The checkpoint was "
            "committed complete, so the file was modified or corrupted afterwards (not an interrupted save). "
            "Restore the file, or resume from another checkpoint."
        )


def list_checkpoints(output_dir: str | os.PathLike[str], *, report: bool = False) -> list[Path]:
    """Committed checkpoints in ``output_dir``, oldest first.

    With ``report=True``, incomplete ``checkpoint-*`` folders and leftover
    temporary folders are reported with a warning (they are never used).
    """
    root = Path(output_dir)
    if not root.is_dir():
        return []
    complete: list[tuple[int, Path]] = []
    for child in root.iterdir():
        step = checkpoint_step(child)
        if step is not None and child.is_dir():
            if is_complete(child):
                complete.append((step, child))
            elif report:
                logger.warning(
                    "Ignoring incomplete checkpoint %s (no valid %s manifest: the save was interrupted).",
                    child, COMMIT_MARKER,
                )
        elif report and child.name.startswith(_TMP_PREFIX + PREFIX_CHECKPOINT_DIR):
            logger.warning("Ignoring unfinished checkpoint write %s (interrupted save).", child)
    return [path for _, path in sorted(complete)]


def latest_checkpoint(output_dir: str | os.PathLike[str]) -> Path | None:
    """The newest committed checkpoint in ``output_dir``, reporting skipped ones."""
    found = list_checkpoints(output_dir, report=True)
    return found[-1] if found else None


def temporary_dir(output_dir: str | os.PathLike[str], step: int, token: str) -> Path:
    """The temporary folder all ranks write checkpoint ``step`` into (same file system as the target)."""
    return Path(output_dir) / f"{_TMP_PREFIX}{PREFIX_CHECKPOINT_DIR}-{step}-{token}"


def _recorded_files(tmp: Path) -> dict[str, dict[str, Any]]:
    """Merge (and remove) the per-rank lists :meth:`FolderWriter.record` left in ``tmp``."""
    files: dict[str, dict[str, Any]] = {}
    for part in sorted(tmp.glob(f"{_PART_PREFIX}*.json")):
        files.update(json.loads(part.read_text(encoding="utf-8")))
        part.unlink()
    return files


def commit(tmp: Path, final: Path) -> None:
    """Write the manifest into ``tmp`` and atomically rename it to ``final``.

    Files a :class:`FolderWriter` wrote carry the checksum computed while writing;
    any other file (written straight into the folder) is hashed here, its one read.
    """
    recorded = _recorded_files(tmp)
    files = {}
    for path in sorted(tmp.rglob("*")):
        name = str(path.relative_to(tmp))
        if path.is_file() and name != COMMIT_MARKER:
            files[name] = recorded.get(name) or {"size": path.stat().st_size, "crc32": _crc32_of(path)}
    manifest = {"format": MANIFEST_FORMAT, "files": files}
    write_text(json.dumps(manifest, indent=1, sort_keys=True), tmp / COMMIT_MARKER)
    _fsync_dir(tmp)
    if final.exists():
        # Saving the same step twice (rare: a resumed run re-saving): keep the old
        # one until the new one is in place.
        stale = final.with_name(f"{_TMP_PREFIX}old-{final.name}-{uuid.uuid4().hex[:8]}")
        os.replace(final, stale)
        os.replace(tmp, final)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)


@contextmanager
def atomic_checkpoint(output_dir: str | os.PathLike[str], step: int) -> Iterator[Path]:
    """Yield a temporary folder to write checkpoint ``step`` into; commit it on success.

    On an exception the temporary folder is removed and the error propagates;
    the previous checkpoints are untouched. (Single process; the Trainer's
    distributed save uses :func:`temporary_dir` and :func:`commit` with barriers.)
    """
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    tmp = temporary_dir(root, step, uuid.uuid4().hex[:8])
    tmp.mkdir()
    try:
        yield tmp
        commit(tmp, root / f"{PREFIX_CHECKPOINT_DIR}-{step}")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def rotate_checkpoints(output_dir: str | os.PathLike[str], limit: int | None, keep: str | None = None) -> list[Path]:
    """Delete the oldest committed checkpoints beyond ``limit``, never ``keep``.

    Returns the deleted folders. Called only after a new checkpoint committed.
    Leftover temporary folders of earlier crashed saves are removed too.
    """
    root = Path(output_dir)
    if root.is_dir():
        for child in root.iterdir():
            if child.name.startswith(_TMP_PREFIX) and child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
    if limit is None:
        return []
    found = list_checkpoints(root)
    keep_path = Path(keep).resolve() if keep else None
    removable = [p for p in found if p.resolve() != keep_path]
    excess = len(found) - limit
    # With limit=1 and a best checkpoint that is not the newest, keep both (as transformers does).
    if keep_path is not None and limit == 1 and found and found[-1].resolve() != keep_path:
        excess = len(found) - 2
    deleted = []
    for path in removable[: max(0, excess)]:
        shutil.rmtree(path, ignore_errors=True)
        deleted.append(path)
    return deleted
