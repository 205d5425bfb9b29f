"""Learning-rate schedules with warmup, built on ``torch.optim.lr_scheduler.LambdaLR``.

The multipliers match transformers' schedules of the same names (``optimization.py``),
including their ``lr_scheduler_kwargs``. They are module-level functions bound with
``functools.partial``, so a scheduler's ``state_dict`` holds only numbers and loads
with ``weights_only=True``. ``reduce_lr_on_plateau`` is torch's ``ReduceLROnPlateau``,
stepped by the Trainer with the evaluation metric.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch

from .args_fields import SCHEDULER_TYPES

__all__ = ["SCHEDULER_TYPES", "get_scheduler"]



def _warmup(step: int, warmup: int) -> float:
    return step / max(1, warmup)


def _constant(step: int) -> float:
    return 1.0


def _constant_with_warmup(step: int, *, warmup: int) -> float:
    return _warmup(step, warmup) if step < warmup else 1.0


def _linear(step: int, *, warmup: int, total: int) -> float:
    if step < warmup:
        return _warmup(step, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def _cosine(step: int, *, warmup: int, total: int, num_cycles: float = 0.5, min_lr_rate: float = 0.0) -> float:
    if step < warmup:
        return _warmup(step, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    factor = 0.5 * (1.0 + math.cos(math.pi * num_cycles * 2.0 * progress))
    return max(0.0, factor * (1 - min_lr_rate) + min_lr_rate)


def _cosine_with_restarts(step: int, *, warmup: int, total: int, num_cycles: int = 1) -> float:
    if step < warmup:
        return _warmup(step, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    if progress >= 1.0:
        return 0.0
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((num_cycles * progress) % 1.0))))


def _polynomial(step: int, *, warmup: int, total: int, lr_init: float, lr_end: float, power: float) -> float:
    if step < warmup:
        return _warmup(step, warmup)
    if step > total:
        return lr_end / lr_init
    remaining = 1 - (step - warmup) / max(1, total - warmup)
    return float(((lr_init - lr_end) * remaining**power + lr_end) / lr_init)


def _inverse_sqrt(step: int, *, warmup: int, timescale: int) -> float:
    if step < warmup:
        return _warmup(step, warmup)
    return 1.0 / math.sqrt((step + timescale - warmup) / timescale)


def _warmup_stable_decay(
    step: int, *, warmup: int, stable: int, decay: int, min_lr_ratio: float, decay_type: str, num_cycles: float
) -> float:
    if step < warmup:
        return _warmup(step, warmup) * (1 - min_lr_ratio) + min_lr_ratio
    if step < warmup + stable:
        return 1.0
    if step < warmup + stable + decay:
        progress = (step - warmup - stable) / max(1, decay)
        if decay_type == "linear":
            factor = 1.0 - progress
        elif decay_type == "1-sqrt":
            factor = 1.0 - math.sqrt(progress)
        else:
            factor = 0.5 * (1.0 + math.cos(math.pi * num_cycles * 2.0 * progress))
        return max(0.0, factor * (1 - min_lr_ratio) + min_lr_ratio)
    return min_lr_ratio


def _bad_kwargs(name: str, problem: str) -> ValueError:
    return ValueError(f"lr_scheduler_type={name!r}: {problem} (set it in TrainingArguments.lr_scheduler_kwargs).")


def get_scheduler(
    name: str,
    optimizer: torch.optim.Optimizer,
    num_warmup_steps: int,
    num_training_steps: int,
    scheduler_specific_kwargs: dict[str, Any] | None = None,
) -> Any:
    """Build the schedule ``name`` (one of :data:`SCHEDULER_TYPES`), transformers' signature.

    Args:
        name: The schedule.
        optimizer: The optimizer whose learning rate it drives.
        num_warmup_steps: Steps of linear warmup from 0.
        num_training_steps: Total optimizer updates.
        scheduler_specific_kwargs: ``lr_scheduler_kwargs``: ``num_cycles`` (cosine
            kinds), ``lr_end``/``power`` (polynomial), ``min_lr``/``min_lr_rate``
            (cosine_with_min_lr), ``num_decay_steps``, ``num_stable_steps``,
            ``min_lr_ratio``, ``decay_type`` (warmup_stable_decay), ``timescale``
            (inverse_sqrt), or ``ReduceLROnPlateau``'s arguments.

    Raises:
        ValueError: For an unknown ``name`` or a missing or unknown keyword.
    """
    kw = dict(scheduler_specific_kwargs or {})
    warmup, total = num_warmup_steps, num_training_steps
    lr_init = float(optimizer.defaults["lr"])
    try:
        if name == "reduce_lr_on_plateau":
            return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, **kw)
        if name == "constant":
            fn: Any = _constant
        elif name == "constant_with_warmup":
            fn = partial(_constant_with_warmup, warmup=warmup)
        elif name == "linear":
            fn = partial(_linear, warmup=warmup, total=total)
        elif name == "cosine":
            fn = partial(_cosine, warmup=warmup, total=total, num_cycles=kw.pop("num_cycles", 0.5))
        elif name == "cosine_with_restarts":
            fn = partial(_cosine_with_restarts, warmup=warmup, total=total, num_cycles=kw.pop("num_cycles", 1))
        elif name == "polynomial":
            lr_end, power = kw.pop("lr_end", 1e-7), kw.pop("power", 1.0)
            if not lr_init > lr_end:
                raise _bad_kwargs(name, f"lr_end ({lr_end}) must be smaller than the learning rate ({lr_init})")
            fn = partial(_polynomial, warmup=warmup, total=total, lr_init=lr_init, lr_end=lr_end, power=power)
        elif name == "inverse_sqrt":
            timescale = kw.pop("timescale", None) or (warmup or 10_000)
            fn = partial(_inverse_sqrt, warmup=warmup, timescale=timescale)
        elif name == "cosine_with_min_lr":
            min_lr, rate = kw.pop("min_lr", None), kw.pop("min_lr_rate", None)
            if (min_lr is None) == (rate is None):
                raise _bad_kwargs(name, "set exactly one of min_lr and min_lr_rate")
            rate = rate if rate is not None else min_lr / lr_init
            fn = partial(_cosine, warmup=warmup, total=total, num_cycles=kw.pop("num_cycles", 0.5), min_lr_rate=rate)
        elif name == "warmup_stable_decay":
            if "num_decay_steps" not in kw:
                raise _bad_kwargs(name, "num_decay_steps is required")
            decay = int(kw.pop("num_decay_steps"))
            stable = kw.pop("num_stable_steps", None)
            stable = total - warmup - decay if stable is None else int(stable)
            decay_type = kw.pop("decay_type", "cosine")
            if decay_type not in ("cosine", "linear", "1-sqrt"):
                raise _bad_kwargs(name, f"decay_type={decay_type!r} is unknown: use 'cosine', 'linear' or '1-sqrt'")
            fn = partial(
                _warmup_stable_decay, warmup=warmup, stable=stable, decay=decay,
                min_lr_ratio=kw.pop("min_lr_ratio", 0.0), decay_type=decay_type, num_cycles=kw.pop("num_cycles", 0.5),
            )
        else:
            raise ValueError(f"lr_scheduler_type={name!r} is invalid: use one of {list(SCHEDULER_TYPES)}.")
    except TypeError as err:
        raise _bad_kwargs(name, f"invalid keyword: {err}") from err
    if kw:
        raise _bad_kwargs(name, f"unknown keyword(s) {sorted(kw)}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
