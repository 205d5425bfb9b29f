"""``label_smoothing_factor``: transformers' ``LabelSmoother`` through torch's cross-entropy.

``torch.nn.functional.cross_entropy(label_smoothing=eps, ignore_index=-100)`` computes
the same value as transformers' hand-written smoother ((1 - eps) * NLL + eps * the
mean of -log p over classes, averaged over the labels that are not -100).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["smoothed_cross_entropy"]


def smoothed_cross_entropy(outputs: Any, labels: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Label-smoothed cross-entropy of the model's logits against ``labels`` (``-100`` ignored).

    Raises:
        ValueError: The outputs carry no logits.
    """
    if isinstance(outputs, Mapping):
        logits = outputs.get("logits")
    elif isinstance(outputs, (list, tuple)):
        logits = outputs[1] if len(outputs) > 1 and outputs[0].dim() == 0 else outputs[0]
    elif isinstance(outputs, torch.Tensor):
        logits = outputs
    else:
        logits = getattr(outputs, "logits", None)
    if not isinstance(logits, torch.Tensor):
        raise ValueError(
            "TrainingArguments.label_smoothing_factor needs the model's logits (a tensor, 'logits' in a dict, "
            f"or .logits); forward returned a {type(outputs).__name__}."
        )
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100, label_smoothing=epsilon
    )
