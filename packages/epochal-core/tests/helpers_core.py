"""Shared helpers of the core tests: tiny models, datasets and an event recorder."""

from __future__ import annotations

from typing import Any

import torch
from epochal_core import EVENTS, TrainerCallback
from torch import nn
from torch.utils.data import TensorDataset


class TinyRegressor(nn.Module):
    """Linear regression returning a dict with the loss, as HF models do."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 1)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        out = self.linear(self.drop(x)).squeeze(-1)
        result = {"logits": out}
        if labels is not None:
            result["loss"] = nn.functional.mse_loss(out, labels)
        return result


class DictDataset(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Map-style dataset of {"x", "labels"} samples (goes through the DataLoader path)."""

    def __init__(self, n: int = 64, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 4, generator=gen)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1 * torch.randn(n, generator=gen)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


def tensor_dataset(n: int = 64, seed: int = 0) -> TensorDataset:
    ds = DictDataset(n, seed)
    return TensorDataset(ds.x, ds.y)


class Recorder(TrainerCallback):
    """Records every event (name, global_step) and the kwargs keys it received."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []
        self.kwargs: dict[str, set[str]] = {}


def _make(event: str) -> Any:
    def method(self: Recorder, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.events.append((event, state.global_step))
        self.kwargs.setdefault(event, set()).update(kwargs)

    return method


for _event in EVENTS:
    setattr(Recorder, _event, _make(_event))
