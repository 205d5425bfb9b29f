"""torch.distributed glue: the launcher's environment, process group, and small collectives.

Nothing here is home-made scale-out: ``torchrun`` (or any launcher that sets
``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``) starts the processes,
and this module only reads that environment and calls ``torch.distributed``.
Every helper is a no-op in a single process.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "DistInfo", "all_reduce_", "any_rank", "barrier", "broadcast_object", "dist_info", "ensure_process_group",
    "sync_flags",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the job.

    Args:
        rank: Global rank.
        local_rank: Rank on this node.
        world_size: Number of processes.
    """

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        """More than one process."""
        return self.world_size > 1


def dist_info() -> DistInfo:
    """Read the rank layout from torch.distributed, else from the launcher's environment."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0)), dist.get_world_size())
    return DistInfo(
        int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    )


def ensure_process_group(backend: str | None, timeout_s: float, device: torch.device) -> bool:
    """Initialise the default process group when launched by torchrun; return whether distributed.

    ``timeout_s`` bounds how long a collective waits for a dead or stuck peer
    before the job fails with an error (``TrainingArguments.ddp_timeout``).
    """
    info = dist_info()
    if not info.enabled:
        return False
    if not dist.is_initialized():
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (``sum`` or ``max``); no-op in one process."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor


def sync_flags(flags: Sequence[bool], device: torch.device) -> list[bool]:
    """OR each flag over all ranks with one small all-reduce (MAX); the local values in one process.

    Every rank must call it at the same point with the same number of flags.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return list(flags)
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v > 0) for v in t.tolist()]


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` is true on any rank (one tiny all-reduce; local value in one process)."""
    return sync_flags([flag], device)[0]


def broadcast_object(obj: Any, device: torch.device) -> Any:
    """World rank 0's ``obj`` on every rank (a picklable object; ``obj`` itself in one process).

    ``device`` is this rank's device: NCCL needs the pickled bytes on this rank's GPU.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=device)
    return box[0]
