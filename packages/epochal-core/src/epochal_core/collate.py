"""torch's ``default_collate`` with an error that says what the items were and what to pass instead."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch.utils.data import default_collate

__all__ = ["default_collate_explained"]


def _describe_item(item: Any) -> str:
    if isinstance(item, Mapping):
        fields = ", ".join(f"{k!r}: {type(v).__name__}" for k, v in item.items())
        return f"{type(item).__name__} {{{fields}}}"
    if isinstance(item, (list, tuple)):
        return f"{type(item).__name__} of {', '.join(type(v).__name__ for v in item)}"
    return type(item).__name__


def default_collate_explained(features: list[Any]) -> Any:
    """``default_collate(features)``; a failure names the dataset's item type and ``data_collator``.

    Raises:
        TypeError: torch could not batch the items (sequences of different lengths, strings in
            tensors, custom objects).
    """
    try:
        return default_collate(features)
    except (TypeError, RuntimeError) as err:
        item = _describe_item(features[0]) if features else "nothing"
        raise TypeError(
            f"The Trainer could not batch the dataset's items ({item}) with torch's default_collate: {err}. "
            "Pass data_collator=... to the Trainer: a function that turns a list of these items into a batch "
            "(e.g. padding sequences to one length)."
        ) from err
