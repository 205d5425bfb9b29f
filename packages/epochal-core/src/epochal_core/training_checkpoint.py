"""What a training checkpoint holds, saved from and restored into a :class:`TrainingSnapshot`.

The Trainer hands over a snapshot of the objects a checkpoint covers (model,
optimizer, schedule, scaler, state, control, callbacks, where the process sits in
the job); this module never reads the Trainer itself. Files are written through
:class:`~epochal_core.checkpoint.FolderWriter` (checksummed while written, fsynced
together) and committed atomically by :mod:`epochal_core.checkpoint`.
"""

from __future__ import annotations

import logging
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .callback_states import collect_callback_states, restore_callback_states
from .checkpoint import (
    PREFIX_CHECKPOINT_DIR,
    CheckpointError,
    FolderWriter,
    commit,
    deferred_fsync,
    load_file,
    rotate_checkpoints,
    temporary_dir,
    verify_checkpoint,
)
from .control import TrainerControl
from .distributed import barrier
from .foreign_checkpoint import is_transformers_checkpoint, load_model_weights
from .fsdp import OPTIMIZER_DIR, is_sharded, is_sharded_checkpoint, load_sharded, save_sharded
from .log_history import LogHistoryStore
from .model_files import WEIGHTS_NAME, adopt_written, has_save_pretrained, load_model_files, write_model_files
from .save_failures import save_failed
from .state import TRAINER_STATE_NAME, TrainerState
from .training_args import TrainingArguments

__all__ = [
    "OPTIMIZER_NAME",
    "SCALER_NAME",
    "SCHEDULER_NAME",
    "TRAINER_STATE_NAME",
    "TRAINING_ARGS_NAME",
    "WEIGHTS_NAME",
    "TrainingSnapshot",
    "load_training_checkpoint",
    "rng_file_name",
    "rng_state",
    "save_training_checkpoint",
    "set_rng_state",
]

logger = logging.getLogger(__name__)

OPTIMIZER_NAME = "optimizer.pt"
SCHEDULER_NAME = "scheduler.pt"
SCALER_NAME = "scaler.pt"
TRAINING_ARGS_NAME = "training_args.json"


@dataclass
class TrainingSnapshot:
    """The live objects a training checkpoint saves and restores, handed over by the Trainer.

    Restoring loads into these objects in place (model, optimizer, schedule,
    scaler, callbacks, control) and returns the restored :class:`TrainerState`.

    Args:
        args: The run's training arguments.
        state: The trainer state to save.
        control: The control whose flags are saved with the callback states.
        model: The unwrapped model.
        optimizer: The optimizer.
        lr_scheduler: The learning-rate schedule.
        scaler: The fp16 gradient scaler, if any.
        callbacks: Every callback, in order (their states are saved).
        log_store: Where ``log_history`` is appended outside the checkpoint.
        rank: This process's world rank.
        world_size: Processes in the job.
        device: Where optimizer state is loaded to.
        processing_class: The tokenizer or processor; saved with the model when it has ``save_pretrained``.
        sharded: Save the model and optimizer as DCP shards, every rank its own (``fsdp``).
    """

    args: TrainingArguments
    state: TrainerState
    control: TrainerControl
    model: nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    scaler: torch.amp.GradScaler | None
    callbacks: list[Any]
    log_store: LogHistoryStore
    rank: int = 0
    world_size: int = 1
    device: torch.device | str = "cpu"
    processing_class: Any = None
    sharded: bool = False  # issue 20: model and optimizer as DCP shards (fsdp)


def rng_file_name(rank: int, world_size: int) -> str:
    """The RNG-state file of ``rank`` (one per rank under torch.distributed)."""
    return f"rng_state_{rank}.pth" if world_size > 1 else "rng_state.pth"


def rng_state() -> dict[str, Any]:
    """Every RNG stream training draws from, in a ``weights_only``-loadable form."""
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
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy = sys.modules.get("numpy")
    if "numpy" in state and numpy is not None:
        kind, keys, pos, has_gauss, cached = state["numpy"]
        numpy.random.set_state((kind, numpy.asarray(keys, dtype=numpy.uint32), pos, has_gauss, cached))


def _best_checkpoint(root: Path, state: TrainerState) -> str | None:
    """The best model's checkpoint folder, once it exists (or is the one being saved)."""
    if state.best_global_step is None:
        return state.best_model_checkpoint
    best = root / f"{PREFIX_CHECKPOINT_DIR}-{state.best_global_step}"
    if state.best_global_step == state.global_step or best.is_dir():
        return str(best)
    return state.best_model_checkpoint


def _write_files(snap: TrainingSnapshot, writer: FolderWriter, root: Path) -> None:
    """Write this rank's share of the checkpoint: rank 0 the shared files, every rank its RNG state."""
    args, state = snap.args, snap.state
    if snap.sharded:  # every rank writes its shards (a collective), before rank 0's shared files
        optimizer = None if args.save_only_model else snap.optimizer
        writer.files.update(save_sharded(snap.model, optimizer, writer.folder, snap.rank))
    if snap.rank == 0:
        if not snap.sharded:
            # save_pretrained (transformers, PEFT: the adapter alone) when the model has it, else the state_dict.
            write_model_files(snap.model, writer)
        if has_save_pretrained(snap.processing_class):
            adopt_written(writer, snap.processing_class.save_pretrained)
        if not args.save_only_model and not snap.sharded:
            writer.save(snap.optimizer.state_dict(), OPTIMIZER_NAME)
        if not args.save_only_model:
            writer.save(snap.lr_scheduler.state_dict(), SCHEDULER_NAME)
            if snap.scaler is not None:
                writer.save(snap.scaler.state_dict(), SCALER_NAME)
    if not args.save_only_model:
        writer.save(rng_state(), rng_file_name(snap.rank, snap.world_size))
    if snap.rank == 0:
        state.stateful_callbacks = collect_callback_states(snap.callbacks, snap.control)
        record = snap.log_store.persist(root, state.log_history, writer.fsync)
        writer.write_text(snap.log_store.state_json(state, record), TRAINER_STATE_NAME)
        writer.write_text(args.to_json_string(), TRAINING_ARGS_NAME)
    writer.record(snap.rank)


def save_training_checkpoint(snap: TrainingSnapshot) -> Path:
    """Write and commit ``checkpoint-<global_step>`` from ``snap``; return its path.

    Under torch.distributed, world rank 0 writes the model, optimizer, schedule
    and state once, every rank writes its own RNG state, and rank 0 commits only
    after a barrier proves all ranks are done. Integrations must have processed
    their queued events before (their run ids are part of the callback states).
    """
    root = Path(snap.args.output_dir)
    step = snap.state.global_step
    tmp = temporary_dir(root, step, "w")
    if snap.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash at this very step
        tmp.mkdir(parents=True)
    barrier()
    # On every rank: load_best_model_at_end reads it, and the ranks must agree on it.
    snap.state.best_model_checkpoint = _best_checkpoint(root, snap.state)
    final = root / f"{PREFIX_CHECKPOINT_DIR}-{step}"
    try:
        # Every file starts its write-back as soon as it is written; all are fsynced when the block ends.
        with deferred_fsync() as fsync:
            _write_files(snap, FolderWriter(tmp, fsync), root)
        barrier()
        if snap.rank == 0:
            commit(tmp, final)
    except OSError as err:  # a full disk, a file-size limit, a folder gone read-only
        raise save_failed(err, root, step, tmp) from err
    if snap.rank == 0:
        rotate_checkpoints(root, snap.args.save_total_limit, keep=snap.state.best_model_checkpoint)
    barrier()
    return final


def _restore_foreign_rng(rng_file: Path) -> None:
    # transformers pickles numpy's RNG state as an ndarray, which weights_only loading refuses.
    try:
        set_rng_state(load_file(rng_file))
    except (CheckpointError, KeyError, TypeError, ValueError) as err:
        logger.warning("%s could not be read safely (%s): RNG streams are not restored.", rng_file, err)


def _load_state(snap: TrainingSnapshot, path: Path) -> TrainerState:
    try:
        state = TrainerState.load_from_json(str(path / TRAINER_STATE_NAME))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"Checkpoint file {str(path / TRAINER_STATE_NAME)!r} is unreadable: {err}") from err
    state.is_local_process_zero = snap.state.is_local_process_zero
    state.is_world_process_zero = snap.state.is_world_process_zero
    snap.log_store.restore(state, path, snap.args.output_dir)
    return state


def _load_shards(snap: TrainingSnapshot, path: Path) -> None:
    """Load an ``fsdp`` checkpoint's DCP shards, resharded to this job's world size (any, one included)."""
    if not is_sharded_checkpoint(path):
        raise CheckpointError(
            f"{str(path)!r} was saved without fsdp (pytorch_model.bin): resume it without fsdp, or start "
            "the fsdp run from its weights (model.load_state_dict before building the Trainer)."
        )
    if not (path / OPTIMIZER_DIR).is_dir():
        raise CheckpointError(
            f"{str(path)!r} holds no optimizer state (saved with save_only_model=True?): it cannot resume "
            "training. Load its weights with epochal_core.fsdp.load_sharded(model, None, path) instead."
        )
    load_sharded(snap.model, snap.optimizer, path)


def load_training_checkpoint(snap: TrainingSnapshot, path: Path) -> tuple[TrainerState, TrainerControl | None]:
    """Restore ``snap``'s objects from committed checkpoint ``path``, after checking every file.

    Returns:
        The restored state, and the restored control (``None`` when callback states
        are not restored: ``restore_callback_states_from_checkpoint=False``).

    Raises:
        CheckpointChanged: A file changed after the save (the message names it).
        CheckpointError: A file is missing, truncated or unsafe (the message names it).
    """
    foreign = is_transformers_checkpoint(path)
    if not foreign:
        verify_checkpoint(path)
    state = _load_state(snap, path)
    if is_sharded_checkpoint(path) or is_sharded(snap.model):
        _load_shards(snap, path)  # issue 20
    else:
        if foreign:  # issue 18: written by transformers' Trainer (model.safetensors or pytorch_model.bin)
            snap.model.load_state_dict(load_model_weights(path))
        else:
            load_model_files(snap.model, path)
        if not (path / OPTIMIZER_NAME).exists():
            raise CheckpointError(
                f"{str(path)!r} holds no optimizer state (saved with save_only_model=True?): it cannot resume "
                "training. Load its weights with model.load_state_dict instead."
            )
        snap.optimizer.load_state_dict(load_file(path / OPTIMIZER_NAME, map_location=snap.device))
    snap.lr_scheduler.load_state_dict(load_file(path / SCHEDULER_NAME))
    if snap.scaler is not None and (path / SCALER_NAME).exists():
        snap.scaler.load_state_dict(load_file(path / SCALER_NAME))
    rng_file = path / rng_file_name(snap.rank, snap.world_size)
    if rng_file.exists() and foreign:
        _restore_foreign_rng(rng_file)
    elif rng_file.exists():
        set_rng_state(load_file(rng_file))
    else:
        logger.warning("%s is missing: RNG streams are not restored, so the run will not be bit-identical.", rng_file)
    if not snap.args.restore_callback_states_from_checkpoint:
        return state, None
    restore_callback_states(state.stateful_callbacks, snap.callbacks, snap.control)
    return state, snap.control
