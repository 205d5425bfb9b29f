"""Collecting evaluation outputs as transformers does: on the device, padded with -100, numpy at the end.

Predictions and labels of each batch stay on the device (no host sync per
batch); every ``eval_accumulation_steps`` batches, or at the end, they are
concatenated there in one pass and move to the host once, as numpy arrays.
(transformers concatenates the growing result with each batch, which copies it
again at every batch: quadratic in the number of batches.) Batches whose
second dimension differs (sequences of different lengths) are concatenated
padded with ``-100``, transformers' ``nested_concat`` rule. numpy is not a core
dependency: without it the host copies stay CPU tensors.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["EvalAccumulator", "concat_many", "nested_concat", "to_python_numbers"]

PADDING_INDEX = -100


def _numpy() -> Any:
    if importlib.util.find_spec("numpy") is None:
        return None
    import numpy

    return numpy


def _pad_and_concat(first: Any, second: Any, padding_index: int) -> Any:
    """Concatenate on dim 0, padding dim 1 to the longer of the two (tensors or numpy arrays)."""
    is_tensor = isinstance(first, torch.Tensor)
    if is_tensor:
        first = first.reshape(1) if first.dim() == 0 else first
        second = second.reshape(1) if second.dim() == 0 else second
    elif first.ndim == 0:
        first, second = first.reshape(1), second.reshape(1)
    if first.ndim == 1 or first.shape[1] == second.shape[1]:
        return torch.cat((first, second)) if is_tensor else _numpy().concatenate((first, second))
    shape = (first.shape[0] + second.shape[0], max(first.shape[1], second.shape[1]), *first.shape[2:])
    if is_tensor:
        out = first.new_full(shape, padding_index)
    else:
        out = _numpy().full(shape, padding_index, dtype=first.dtype)
    out[: first.shape[0], : first.shape[1]] = first
    out[first.shape[0] :, : second.shape[1]] = second
    return out


def nested_concat(first: Any, second: Any, padding_index: int = PADDING_INDEX) -> Any:
    """Concatenate two (nested tuples/lists/dicts of) tensors or arrays, padding dim 1 with ``padding_index``."""
    if first is None:
        return second
    if isinstance(first, (list, tuple)):
        return type(first)(nested_concat(a, b, padding_index) for a, b in zip(first, second))
    if isinstance(first, Mapping):
        return {k: nested_concat(v, second[k], padding_index) for k, v in first.items()}
    return _pad_and_concat(first, second, padding_index)


def concat_many(chunks: list[Any], padding_index: int = PADDING_INDEX) -> Any:
    """Concatenate a list of (nested) tensors in one pass, padding dim 1 to the widest with ``padding_index``."""
    first = chunks[0]
    if isinstance(first, (list, tuple)):
        return type(first)(concat_many([c[i] for c in chunks], padding_index) for i in range(len(first)))
    if isinstance(first, Mapping):
        return {k: concat_many([c[k] for c in chunks], padding_index) for k in first}
    if not isinstance(first, torch.Tensor):
        result = None
        for chunk in chunks:
            result = nested_concat(result, chunk, padding_index)
        return result
    tensors = [c.reshape(1) if c.dim() == 0 else c for c in chunks]
    if tensors[0].dim() == 1 or all(t.shape[1:] == tensors[0].shape[1:] for t in tensors):
        return torch.cat(tensors)
    width = max(t.shape[1] for t in tensors)
    out = tensors[0].new_full((sum(t.shape[0] for t in tensors), width, *tensors[0].shape[2:]), padding_index)
    row = 0
    for t in tensors:
        out[row : row + t.shape[0], : t.shape[1]] = t
        row += t.shape[0]
    return out


def _to_host(value: Any) -> Any:
    """Detach and copy to the host: numpy arrays when numpy is installed (bfloat16 read as float32)."""
    if isinstance(value, (list, tuple)):
        return type(value)(_to_host(v) for v in value)
    if isinstance(value, Mapping):
        return {k: _to_host(v) for k, v in value.items()}
    if not isinstance(value, torch.Tensor):
        return value
    value = value.detach()
    if value.dtype == torch.bfloat16:
        value = value.float()  # numpy has no bfloat16
    value = value.cpu()
    return value.numpy() if _numpy() is not None else value


class EvalAccumulator:
    """Predictions (or labels) of one evaluation: device-side until :meth:`flush`, then on the host.

    Args:
        padding_index: Fill value of the padding added when lengths differ.
    """

    def __init__(self, padding_index: int = PADDING_INDEX) -> None:
        self.padding_index = padding_index
        self._device: list[Any] = []
        self._host: Any = None

    def add(self, value: Any) -> None:
        """Keep one batch's (detached) tensors on their device."""
        if value is not None:
            self._device.append(_detach(value))

    def flush(self) -> None:
        """Concatenate what is on the device and move it to the host (one transfer), appending it there."""
        if not self._device:
            return
        on_device = concat_many(self._device, self.padding_index)
        self._device = []
        self._host = nested_concat(self._host, _to_host(on_device), self.padding_index)

    def result(self) -> Any:
        """Everything added, on the host (numpy arrays when numpy is installed); ``None`` if nothing."""
        self.flush()
        return self._host


def _detach(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (list, tuple)):
        return type(value)(_detach(v) for v in value)
    if isinstance(value, Mapping):
        return {k: _detach(v) for k, v in value.items()}
    return value


def to_python_numbers(value: Any) -> Any:
    """Turn tensors and numpy scalars (in dicts and lists too) into Python numbers, transformers' rule.

    One-element tensors and arrays become ``int``/``float``/``bool``; other values pass through.
    """
    if isinstance(value, Mapping):
        return {k: to_python_numbers(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_python_numbers(v) for v in value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "size", None) == 1 and type(value).__module__ == "numpy":
        return item()
    return value
