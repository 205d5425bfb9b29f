"""Optional model methods the Trainer uses when a model has them (transformers' conventions).

Duck-typed, so the core imports no model library:

- ``gradient_checkpointing=True`` calls the model's ``activation_checkpointing_enable``
  (transformers 5's name) or ``gradient_checkpointing_enable`` (4.x, PEFT forwards it
  to the base model); a model with neither gets a clear error at construction.
- ``state.total_flos`` counts the model's ``floating_point_ops(inputs)`` when it has one
  (transformers 4.x models); else, for a model with ``num_parameters`` and a
  ``main_input_name`` (transformers 5, where the estimate moved into its Trainer), the
  same estimate: 6 x input tokens x non-embedding parameters. The parameter count is
  taken once per run, not walked every step as transformers' Trainer does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

__all__ = ["enable_gradient_checkpointing", "flops_counter"]


def enable_gradient_checkpointing(model: nn.Module, kwargs: Mapping[str, Any] | None) -> None:
    """Turn on the model's own gradient (activation) checkpointing.

    Args:
        model: The unwrapped model.
        kwargs: ``TrainingArguments.gradient_checkpointing_kwargs`` (passed to
            ``torch.utils.checkpoint.checkpoint`` by the model), or ``None``.

    Raises:
        ValueError: The model has no method to enable it.
    """
    for name in ("activation_checkpointing_enable", "gradient_checkpointing_enable"):
        method = getattr(model, name, None)
        if callable(method):
            method(dict(kwargs) if kwargs is not None else None)
            return
    raise ValueError(
        f"TrainingArguments.gradient_checkpointing=True is invalid for {type(model).__name__}: the model has no "
        "gradient_checkpointing_enable() (transformers models have it). Wrap its blocks in "
        "torch.utils.checkpoint.checkpoint(...) yourself, or set gradient_checkpointing=False."
    )


def flops_counter(model: nn.Module) -> Callable[[Any], float] | None:
    """A function ``inputs -> floating-point operations`` of one forward and backward, or ``None``.

    ``None`` when the model offers no estimate (``state.total_flos`` then stays 0, as
    in transformers).
    """
    own = getattr(model, "floating_point_ops", None)
    if callable(own):
        return lambda inputs: float(own(inputs)) if isinstance(inputs, Mapping) else 0.0
    count = getattr(model, "num_parameters", None)
    main_input = getattr(model, "main_input_name", None)
    if not callable(count) or not isinstance(main_input, str):
        return None
    per_token = 6.0 * float(count(exclude_embeddings=True))

    def estimate(inputs: Any) -> float:
        if isinstance(inputs, Mapping) and main_input in inputs:
            return per_token * float(inputs[main_input].numel())
        return 0.0

    return estimate
