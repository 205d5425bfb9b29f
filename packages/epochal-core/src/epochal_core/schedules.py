"""Learning-rate schedules with linear warmup, built on ``torch.optim.lr_scheduler.LambdaLR``."""

from __future__ import annotations

import math
from functools import partial

import torch

__all__ = ["get_scheduler"]


def _constant(step: int) -> float:
    return 1.0


def _constant_with_warmup(step: int, *, warmup: int) -> float:
    return step / max(1, warmup) if step < warmup else 1.0


def _linear(step: int, *, warmup: int, total: int) -> float:
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def _cosine(step: int, *, warmup: int, total: int) -> float:
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def get_scheduler(
    name: str, optimizer: torch.optim.Optimizer, num_warmup_steps: int, num_training_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Build the schedule ``name`` (``linear``, ``cosine``, ``constant``, ``constant_with_warmup``).

    The multipliers match transformers' schedules of the same names. They are
    module-level functions bound with ``functools.partial``, so the scheduler's
    ``state_dict`` stays picklable-free and loads with ``weights_only=True``.

    Raises:
        ValueError: For an unknown ``name``.
    """
    if name == "constant":
        fn = _constant
    elif name == "constant_with_warmup":
        fn = partial(_constant_with_warmup, warmup=num_warmup_steps)
    elif name == "linear":
        fn = partial(_linear, warmup=num_warmup_steps, total=num_training_steps)
    elif name == "cosine":
        fn = partial(_cosine, warmup=num_warmup_steps, total=num_training_steps)
    else:
        raise ValueError(
            f"lr_scheduler_type={name!r} is invalid: use one of linear, cosine, constant, constant_with_warmup."
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
