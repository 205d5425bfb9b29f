"""Checkpoints that are either complete or ignored.

A checkpoint is written into a hidden temporary folder beside its final place,
every file is fsynced, a manifest (``COMPLETE``, listing each file and its size)
is written last, and the folder is renamed to ``checkpoint-<step>`` (an atomic
rename on POSIX file systems). Old checkpoints are rotated only after the new
one is committed. Readers trust a folder only if its manifest exists and every
listed file has the listed size, so a crash at any moment leaves either the
previous set of checkpoints or the new one, never a half-written folder that
resume would pick.

Everything is loaded with ``torch.load(weights_only=True)``: a tampered file
cannot run code, it fails with :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any

import torch

__all__ = [
    "COMMIT_MARKER",
    "PREFIX_CHECKPOINT_DIR",
    "CheckpointError",
    "DeferredFsync",
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
]

logger = logging.getLogger(__name__)

PREFIX_CHECKPOINT_DIR = "checkpoint"
COMMIT_MARKER = "COMPLETE"
_TMP_PREFIX = ".tmp-"
_CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, tampered with or of the wrong kind."""


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


def save_file(obj: Any, path: str | os.PathLike[str], *, fsync: DeferredFsync | None = None) -> None:
    """``torch.save`` ``obj`` to ``path`` and fsync it (when ``fsync`` waits, if given)."""
    file = open(path, "wb")  # noqa: SIM115 - closed by finish_file, possibly later
    try:
        torch.save(obj, file)
    except BaseException:
        file.close()
        raise
    finish_file(file, fsync)


def write_text(text: str, path: str | os.PathLike[str], *, fsync: DeferredFsync | None = None) -> None:
    """Write ``text`` (UTF-8) to ``path`` and fsync it (when ``fsync`` waits, if given)."""
    file = open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed by finish_file, possibly later
    try:
        file.write(text)
    except BaseException:
        file.close()
        raise
    finish_file(file, fsync)


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


def is_complete(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a committed checkpoint whose files all have their recorded sizes."""
    folder = Path(path)
    try:
        manifest = json.loads((folder / COMMIT_MARKER).read_text(encoding="utf-8"))
        files = manifest["files"]
        return all((folder / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


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
                logger.warning("Ignoring incomplete checkpoint %s (no valid %s manifest).", child, COMMIT_MARKER)
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


def commit(tmp: Path, final: Path) -> None:
    """Write the manifest into ``tmp`` and atomically rename it to ``final``."""
    files = {
        str(p.relative_to(tmp)): p.stat().st_size
        for p in sorted(tmp.rglob("*"))
        if p.is_file() and p.name != COMMIT_MARKER
    }
    write_text(json.dumps({"format": 1, "files": files}, indent=1, sort_keys=True), tmp / COMMIT_MARKER)
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


# -- what a training checkpoint holds ------------------------------------------------

WEIGHTS_NAME = "pytorch_model.bin"
OPTIMIZER_NAME = "optimizer.pt"
SCHEDULER_NAME = "scheduler.pt"
SCALER_NAME = "scaler.pt"
TRAINING_ARGS_NAME = "training_args.json"


def rng_state() -> dict[str, Any]:
    """Every RNG stream training draws from, in a ``weights_only``-loadable form."""
    import random
    import sys

    state: dict[str, Any] = {"python": random.getstate(), "cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        state["cuda"] = torch.cuda.get_rng_state_all()
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        kind, keys, pos, has_gauss, cached = numpy.random.get_state()
        state["numpy"] = (kind, keys.tolist(), pos, has_gauss, cached)
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state`'s output."""
    import random
    import sys

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy = sys.modules.get("numpy")
    if "numpy" in state and numpy is not None:
        kind, keys, pos, has_gauss, cached = state["numpy"]
        numpy.random.set_state((kind, numpy.asarray(keys, dtype=numpy.uint32), pos, has_gauss, cached))


def _state_key(callback: Any) -> str:
    return str(getattr(callback, "state_key", None) or type(callback).__name__)


def _stateful(objects: list[Any]) -> list[Any]:
    from .callback import ExportableState

    def has_pair(o: Any) -> bool:
        return callable(getattr(o, "state_dict", None)) and callable(getattr(o, "load_state_dict", None))

    return [o for o in objects if isinstance(o, ExportableState) or has_pair(o)]


def _export(obj: Any) -> dict[str, Any]:
    from .callback import ExportableState

    if isinstance(obj, ExportableState):
        return obj.state()
    return {"state_dict": obj.state_dict()}


def collect_callback_states(callbacks: list[Any], control: Any) -> dict[str, Any]:
    """``stateful_callbacks`` for ``trainer_state.json``: rebuilt at every save, never appended to.

    The key is the callback's ``state_key`` attribute, else its class name
    (transformers' format). Callbacks sharing a key are stored as a list in
    callback order, so two instances of one class never collide.
    """
    grouped: dict[str, list[dict[str, Any]]] = {}
    for obj in _stateful([*callbacks, control]):
        grouped.setdefault(_state_key(obj), []).append(_export(obj))
    return {key: states[0] if len(states) == 1 else states for key, states in grouped.items()}


def restore_callback_states(saved: dict[str, Any], callbacks: list[Any], control: Any) -> None:
    """Restore saved states onto the current callbacks, in place and in order, reporting mismatches."""
    from .callback import ExportableState

    current: dict[str, list[Any]] = {}
    for obj in _stateful([*callbacks, control]):
        current.setdefault(_state_key(obj), []).append(obj)
    for key, states in saved.items():
        states = states if isinstance(states, list) else [states]
        targets = current.pop(key, [])
        if not targets:
            logger.warning("The checkpoint holds state for %r, which is not among the current callbacks; ignored.", key)
            continue
        if len(targets) != len(states):
            logger.warning(
                "The checkpoint holds %d state(s) for %r but there are %d such callback(s) now; "
                "restoring the first %d in order.",
                len(states), key, len(targets), min(len(states), len(targets)),
            )
        for obj, data in zip(targets, states):
            if obj is control:
                for flag, value in data.get("args", {}).items():
                    setattr(obj, flag, value)
            elif isinstance(obj, ExportableState):
                saved_args = data.get("args", {})
                now_args = obj.state().get("args", {})
                if saved_args != now_args:
                    logger.warning(
                        "%s was saved with args %s and is now built with %s; keeping the new args and "
                        "restoring its attributes.", key, saved_args, now_args,
                    )
                for attr, value in data.get("attributes", {}).items():
                    setattr(obj, attr, value)
            else:
                obj.load_state_dict(data.get("state_dict", {}))
    for key in current:
        logger.warning("The checkpoint holds no state for callback %r; it starts fresh.", key)


def save_training_checkpoint(trainer: Any) -> Path:
    """Write and commit ``checkpoint-<global_step>`` for ``trainer``; return its path.

    Under torch.distributed, world rank 0 writes the model, optimizer, schedule
    and state once, every rank writes its own RNG state, and rank 0 commits only
    after a barrier proves all ranks are done.
    """
    from .distributed import barrier

    args, state = trainer.args, trainer.state
    rank, world = trainer.dist.rank, trainer.dist.world_size
    # Integrations must have processed every event (e.g. created their run) before
    # their state (the run id) is saved.
    trainer._drain_reporters()
    root = Path(args.output_dir)
    step = state.global_step
    final = root / f"{PREFIX_CHECKPOINT_DIR}-{step}"
    tmp = temporary_dir(root, step, "w")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash at this very step
        tmp.mkdir(parents=True)
    barrier()
    # Every file starts its write-back as soon as it is written; all are fsynced when the block ends.
    with deferred_fsync() as fsync:
        if rank == 0:
            save_file(trainer.model.state_dict(), tmp / WEIGHTS_NAME, fsync=fsync)
            if not args.save_only_model:
                save_file(trainer.optimizer.state_dict(), tmp / OPTIMIZER_NAME, fsync=fsync)
                save_file(trainer.lr_scheduler.state_dict(), tmp / SCHEDULER_NAME, fsync=fsync)
                if trainer.scaler is not None:
                    save_file(trainer.scaler.state_dict(), tmp / SCALER_NAME, fsync=fsync)
        if not args.save_only_model:
            save_file(rng_state(), tmp / (f"rng_state_{rank}.pth" if world > 1 else "rng_state.pth"), fsync=fsync)
        # On every rank: load_best_model_at_end reads it, and the ranks must agree on it.
        if state.best_global_step is not None:
            best = root / f"{PREFIX_CHECKPOINT_DIR}-{state.best_global_step}"
            if state.best_global_step == step or best.is_dir():
                state.best_model_checkpoint = str(best)
        if rank == 0:
            state.stateful_callbacks = collect_callback_states(trainer.callback_handler.callbacks, trainer.control)
            record = trainer._log_store.persist(root, state.log_history, fsync)
            write_text(trainer._log_store.state_json(state, record), tmp / "trainer_state.json", fsync=fsync)
            write_text(args.to_json_string(), tmp / TRAINING_ARGS_NAME, fsync=fsync)
    barrier()
    if rank == 0:
        commit(tmp, final)
        rotate_checkpoints(root, args.save_total_limit, keep=state.best_model_checkpoint)
    barrier()
    return final


def load_training_checkpoint(trainer: Any, path: Path) -> Any:
    """Restore ``trainer`` from committed checkpoint ``path``; return the restored control (or ``None``).

    Raises:
        CheckpointError: A file is missing, truncated or unsafe (the message names it).
    """
    from .state import TrainerState

    args = trainer.args
    try:
        state = TrainerState.load_from_json(str(path / "trainer_state.json"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"Checkpoint file {str(path / 'trainer_state.json')!r} is unreadable: {err}") from err
    state.is_local_process_zero = trainer.is_local_process_zero()
    state.is_world_process_zero = trainer.is_world_process_zero()
    trainer._log_store.restore(state, path, args.output_dir)
    trainer.state = state
    trainer.model.load_state_dict(load_file(path / WEIGHTS_NAME))
    if not (path / OPTIMIZER_NAME).exists():
        raise CheckpointError(
            f"{str(path)!r} holds no optimizer state (saved with save_only_model=True?): it cannot resume "
            "training. Load its weights with model.load_state_dict instead."
        )
    trainer.optimizer.load_state_dict(load_file(path / OPTIMIZER_NAME, map_location=trainer.device))
    trainer.lr_scheduler.load_state_dict(load_file(path / SCHEDULER_NAME))
    if trainer.scaler is not None and (path / SCALER_NAME).exists():
        trainer.scaler.load_state_dict(load_file(path / SCALER_NAME))
    rank, world = trainer.dist.rank, trainer.dist.world_size
    rng_file = path / (f"rng_state_{rank}.pth" if world > 1 else "rng_state.pth")
    if rng_file.exists():
        set_rng_state(load_file(rng_file))
    else:
        logger.warning("%s is missing: RNG streams are not restored, so the run will not be bit-identical.", rng_file)
    if not args.restore_callback_states_from_checkpoint:
        return None
    restore_callback_states(state.stateful_callbacks, trainer.callback_handler.callbacks, trainer.control)
    return trainer.control
