"""The optimizers ``TrainingArguments.optim`` names, built from torch's own classes.

Names follow transformers (``adamw_torch``, ``adamw_torch_fused``, ``adafactor``,
``sgd``, ``adagrad``, ``rmsprop``); ``optim_args`` is transformers' string of
``key=value`` pairs, passed on as keyword arguments (numbers parsed as numbers).
"""

from __future__ import annotations

import ast
from typing import Any

import torch

from .args_fields import OPTIMIZER_NAMES

__all__ = ["OPTIMIZER_NAMES", "build_optimizer", "parse_optim_args"]



def parse_optim_args(text: str | None) -> dict[str, Any]:
    """``"momentum=0.9,nesterov=True"`` -> ``{"momentum": 0.9, "nesterov": True}``.

    Raises:
        ValueError: A pair without ``=``.
    """
    parsed: dict[str, Any] = {}
    for pair in (text or "").replace(" ", "").split(","):
        if not pair:
            continue
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"TrainingArguments.optim_args={text!r} is invalid: use 'key=value,key=value'.")
        try:
            parsed[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parsed[key] = value
    return parsed


def build_optimizer(name: str, groups: list[dict[str, Any]], args: Any, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer ``name`` over ``groups`` with ``args``' learning rate, betas, epsilon and ``optim_args``.

    ``adamw_torch`` is fused on CUDA (which also lets a non-finite step be skipped
    without a device sync), as before.

    Raises:
        ValueError: An unknown name, or ``adafactor`` on a torch without it.
    """
    extra = parse_optim_args(args.optim_args)
    lr = args.learning_rate
    if name in ("adamw_torch", "adamw_torch_fused"):
        kw: dict[str, Any] = {"betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon}
        kw["fused"] = name == "adamw_torch_fused" or device.type == "cuda"
        return torch.optim.AdamW(groups, lr=lr, **{**kw, **extra})
    if name == "adafactor":
        adafactor = getattr(torch.optim, "Adafactor", None)
        if adafactor is None:
            raise ValueError("TrainingArguments.optim='adafactor' needs torch >= 2.5 (torch.optim.Adafactor).")
        return adafactor(groups, lr=lr, **extra)  # type: ignore[no-any-return]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, **extra)
    if name == "adagrad":
        return torch.optim.Adagrad(groups, lr=lr, **extra)
    if name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=lr, **extra)
    raise ValueError(f"TrainingArguments.optim={name!r} is invalid: use one of {list(OPTIMIZER_NAMES)}.")
