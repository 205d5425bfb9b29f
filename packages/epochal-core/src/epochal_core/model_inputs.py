"""What a model's ``forward`` takes: label names and the batch keys it accepts (transformers' rules).

Used for the ``label_names`` default and ``remove_unused_columns``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from .collate import default_collate_explained

__all__ = ["RemoveUnusedKeysCollator", "forward_parameters", "model_label_names"]


def forward_parameters(model: Any) -> list[str] | None:
    """Names ``model.forward`` takes; ``None`` when it takes ``**kwargs`` (any key) or has no signature."""
    forward = getattr(model, "forward", None)
    if forward is None:
        return None
    try:
        params = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return [name for name, p in params.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL]


def model_label_names(model: Any) -> list[str]:
    """The ``forward`` parameters containing ``label`` (transformers' ``find_labels``).

    A question-answering class also gets ``start_positions``/``end_positions``.
    """
    # The model's class, not a wrapper's: DDP's forward takes *args/**kwargs.
    forward = getattr(type(model), "forward", None)
    try:
        names = list(inspect.signature(forward).parameters) if forward is not None else []
    except (TypeError, ValueError):
        return []
    if "QuestionAnswering" in type(model).__name__:
        return [n for n in names if "label" in n or n in ("start_positions", "end_positions")]
    return [n for n in names if "label" in n]


class RemoveUnusedKeysCollator:
    """Drops the keys of each mapping sample that ``forward`` does not take, then collates.

    transformers' ``RemoveColumnsCollator`` for datasets that are not HF
    ``datasets``: extra keys (an id, the raw text) never reach the model.

    Args:
        collate_fn: The collator to call on the trimmed samples; ``None``: torch's ``default_collate``.
        kept: The keys to keep.
    """

    def __init__(self, collate_fn: Callable[[list[Any]], Any] | None, kept: set[str]) -> None:
        self.collate_fn = collate_fn if collate_fn is not None else default_collate_explained
        self.kept = kept

    def __call__(self, features: list[Any]) -> Any:
        """Collate ``features`` without their unused keys."""
        if features and isinstance(features[0], Mapping) and any(k not in self.kept for k in features[0]):
            features = [{k: v for k, v in f.items() if k in self.kept} for f in features]
        return self.collate_fn(features)
