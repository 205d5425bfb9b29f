"""Fully sharded data parallelism with torch's own pieces: FSDP2 and distributed checkpoints.

Nothing here shards by hand. :func:`shard_model` applies an :class:`FsdpPlan` with
``torch.distributed.fsdp.fully_shard`` (its ``MixedPrecisionPolicy`` for ``bf16``,
its ``CPUOffloadPolicy`` for ``offload``); checkpoints go through
``torch.distributed.checkpoint`` (DCP), every rank writing its own shards, with the
model and optimizer state dicts from ``torch.distributed.checkpoint.state_dict``
(keyed by parameter name, so DCP reshards them on load to any world size, one
process included). What this module adds is the glue the Trainer needs: the wrap
policy, re-pointing an optimizer built before sharding at the sharded parameters,
the global gradient norm, the per-rank checksums for the checkpoint manifest, and
one consolidated state dict for ``save_model()``.

FSDP2 and DCP are imported when first used: together they cost about as much
import time as torch itself, which a run without ``fsdp`` should not pay.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .checkpoint import _crc32_of, _fsync_dir
from .fsdp_options import FsdpPlan

__all__ = [
    "MODEL_DIR",
    "OPTIMIZER_DIR",
    "full_model_state_dict",
    "global_grad_norm",
    "is_sharded",
    "is_sharded_checkpoint",
    "load_sharded",
    "plain_tensor",
    "save_sharded",
    "shard_model",
]

logger = logging.getLogger(__name__)

#: DCP folders inside a checkpoint (transformers' names for its sharded FSDP checkpoints).
MODEL_DIR = "pytorch_model_fsdp_0"
OPTIMIZER_DIR = "optimizer_0"


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` was sharded by ``fully_shard`` (without importing FSDP when nothing did)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(model, fsdp.FSDPModule)


def _wrap_units(model: nn.Module, plan: FsdpPlan) -> list[nn.Module]:
    """The submodules to shard as units of their own, children before their parents."""
    if not plan.auto_wrap:
        return []
    classes = set(plan.layer_classes) or set(getattr(model, "_no_split_modules", None) or ())
    if not classes and not plan.min_num_params:
        raise ValueError(
            "TrainingArguments.fsdp includes 'auto_wrap' but nothing says what to wrap: set "
            "fsdp_config={'transformer_layer_cls_to_wrap': ['MyBlock']} or {'min_num_params': 1_000_000}."
        )
    units: list[nn.Module] = []
    if classes:
        found = {type(m).__name__ for m in model.modules()}
        missing = sorted(classes - found)
        if missing and plan.layer_classes:
            raise ValueError(
                f"TrainingArguments.fsdp_config['transformer_layer_cls_to_wrap']={list(plan.layer_classes)!r} "
                f"is invalid: the model has no module of class {missing}. Classes in the model: {sorted(found)}."
            )
        units = [m for m in model.modules() if m is not model and type(m).__name__ in classes]
        return units[::-1]
    # Post-order: a module is a unit once the parameters not already in a unit below it reach the minimum.
    covered: set[int] = set()
    for module in list(model.modules())[:0:-1]:
        own = [p for p in module.parameters() if id(p) not in covered]
        if sum(p.numel() for p in own) >= plan.min_num_params:
            units.append(module)
            covered.update(id(p) for p in own)
    return units


def shard_model(
    model: nn.Module, plan: FsdpPlan, device: torch.device, *, bf16: bool,
    optimizer: torch.optim.Optimizer | None = None,
) -> nn.Module:
    """Shard ``model`` in place with ``fully_shard`` over all ranks; return it.

    ``fully_shard`` replaces every parameter by a sharded one: an ``optimizer`` built
    before (it holds no state yet) is re-pointed at the new parameters, matched by name.

    Raises:
        ValueError: The wrap policy names classes the model does not have.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    if device.type == "cuda":
        torch.cuda.set_device(device)  # the mesh and NCCL use the current device
    before = {id(p): name for name, p in model.named_parameters()}
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    kwargs: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": plan.reshard_after_forward}
    if bf16:
        # Compute in bfloat16, reduce gradients and keep the sharded master weights in float32.
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if plan.offload:
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=device.type == "cuda")  # pinning needs CUDA
    for unit in _wrap_units(model, plan):
        fully_shard(unit, **kwargs)
    fully_shard(model, **kwargs)
    if optimizer is not None:
        after = dict(model.named_parameters())
        if any(optimizer.state.values()):
            raise ValueError("The optimizer already holds state: it must be fresh when the model is sharded.")
        for group in optimizer.param_groups:
            group["params"] = [after[before[id(p)]] if id(p) in before else p for p in group["params"]]
    return model


def plain_tensor(value: torch.Tensor) -> torch.Tensor:
    """The full value of a ``DTensor`` (a collective: every rank calls it), else ``value``."""
    tensor_module = sys.modules.get("torch.distributed.tensor")
    return value.full_tensor() if tensor_module and isinstance(value, tensor_module.DTensor) else value


def global_grad_norm(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all gradients across every rank's shards (a collective under FSDP)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return plain_tensor(torch.nn.utils.get_total_norm(grads)).float()


def full_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """One consolidated CPU state dict on world rank 0 (empty elsewhere); every rank must call it."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full: dict[str, torch.Tensor] = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )  # type: ignore[assignment]
    return full


@contextmanager
def _dcp() -> Iterator[tuple[Any, Any, bool]]:
    """DCP and its state-dict module, and whether this is one process (DCP's own warning about it silenced)."""
    import torch.distributed.checkpoint as dcp
    import torch.distributed.checkpoint.state_dict as state_dict

    no_dist = not (dist.is_available() and dist.is_initialized())
    with warnings.catch_warnings():
        if no_dist:  # one process is intended (a resume at world size 1), not a missing process group
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield dcp, state_dict, no_dist


def save_sharded(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, folder: Path, rank: int
) -> dict[str, dict[str, Any]]:
    """Write the model (and optimizer) state with DCP into ``folder``; every rank calls it.

    Returns:
        ``name -> {"size", "crc32"}`` of the files this rank wrote, relative to ``folder``,
        for the checkpoint manifest. DCP writes (and fsyncs) its own files, so each rank
        hashes its own after the write: the ranks hash in parallel and rank 0's commit reads
        none of them again.
    """
    with _dcp() as (dcp, sd, no_dist):
        model_sd, optim_sd = sd.get_state_dict(model, optimizer) if optimizer is not None else (
            sd.get_model_state_dict(model), None)
        parts = [(MODEL_DIR, {"model": model_sd})]
        if optim_sd is not None:
            parts.append((OPTIMIZER_DIR, {"optimizer": optim_sd}))
        for name, state in parts:
            dcp.save(state, checkpoint_id=folder / name, no_dist=no_dist)
            if rank == 0:
                _fsync_dir(folder / name)  # DCP fsyncs the files; the folder's entries too
    files: dict[str, dict[str, Any]] = {}
    for name, _ in parts:
        # DCP names each rank's data files ``__<rank>_<n>.distcp``; the coordinator (rank 0) writes ``.metadata``.
        mine = list((folder / name).glob(f"__{rank}_*.distcp"))
        if rank == 0:
            mine.append(folder / name / ".metadata")
        for path in mine:
            files[str(path.relative_to(folder))] = {"size": path.stat().st_size, "crc32": _crc32_of(path)}
    return files


def is_sharded_checkpoint(path: Path) -> bool:
    """Whether checkpoint ``path`` holds DCP shards (written under ``fsdp``) rather than ``pytorch_model.bin``."""
    return (path / MODEL_DIR / ".metadata").is_file()


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer | None, path: Path) -> None:
    """Load DCP checkpoint ``path`` into ``model`` (and ``optimizer``), resharding to this job's layout.

    Works for any world size the checkpoint was written with, sharded model or not,
    one process included (every rank of the job calls it).
    """
    with _dcp() as (dcp, sd, no_dist):
        if optimizer is None or not (path / OPTIMIZER_DIR / ".metadata").is_file():
            model_sd = sd.get_model_state_dict(model)
            dcp.load({"model": model_sd}, checkpoint_id=path / MODEL_DIR, no_dist=no_dist)
            sd.set_model_state_dict(model, model_sd)
            return
        model_sd, optim_sd = sd.get_state_dict(model, optimizer)
        dcp.load({"model": model_sd}, checkpoint_id=path / MODEL_DIR, no_dist=no_dist)
        dcp.load({"optimizer": optim_sd}, checkpoint_id=path / OPTIMIZER_DIR, no_dist=no_dist)
        sd.set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
