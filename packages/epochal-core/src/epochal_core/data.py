"""Data order and loading: a seeded, resumable, shardable batch sampler and fast batch fetching.

The order of epoch ``e`` depends only on ``(seed, e)``, never on the global RNG,
so a run resumed in the middle of an epoch sees exactly the batches it would
have seen, and skipping the consumed ones costs no data loading.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, IterableDataset, TensorDataset

__all__ = ["EpochBatchSampler", "TensorBatchLoader", "has_length"]


def has_length(obj: Any) -> bool:
    """Whether ``len(obj)`` works."""
    try:
        len(obj)
    except (TypeError, NotImplementedError):
        return False
    return True


class EpochBatchSampler:
    """Yields lists of dataset indices for one epoch at a time.

    Args:
        length: Dataset size.
        batch_size: Samples per batch (per process).
        shuffle: Shuffle with a generator seeded by ``seed + epoch``.
        seed: Base seed of the order.
        drop_last: Drop the last incomplete batch of each process's shard.
        rank: This process's index among ``world_size``.
        world_size: Number of processes sharing the data.
        pad_shards: Shard by stride and pad the shards to equal length by repeating
            the first indices (training under DDP needs every rank to do the same
            number of steps). Without it, shards are contiguous and unpadded
            (evaluation: no sample counted twice).
    """

    def __init__(
        self,
        length: int,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        pad_shards: bool = False,
    ) -> None:
        self.length = length
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.pad_shards = pad_shards
        self.epoch = 0
        self.skip_batches = 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Select the epoch to iterate and how many of its first batches to skip."""
        self.epoch = epoch
        self.skip_batches = skip_batches

    def _bounds(self) -> tuple[int, int]:
        # Unpadded shards (evaluation) are contiguous blocks in rank order, so the
        # gathered results concatenate back into dataset order.
        base, extra = divmod(self.length, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (1 if self.rank < extra else 0)

    def _shard_size(self) -> int:
        if self.pad_shards:
            return -(-self.length // self.world_size)
        start, stop = self._bounds()
        return stop - start

    def __len__(self) -> int:
        size = self._shard_size()
        return size // self.batch_size if self.drop_last else -(-size // self.batch_size)

    def indices(self) -> torch.Tensor:
        """This process's indices for the current epoch, in order."""
        if self.shuffle:
            gen = torch.Generator()
            gen.manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.length, generator=gen)
        else:
            order = torch.arange(self.length)
        if not self.pad_shards:
            start, stop = self._bounds()
            return order[start:stop]
        if self.length % self.world_size:
            pad = self.world_size - self.length % self.world_size
            order = torch.cat([order, order[:pad]])
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        idx = self.indices().tolist()
        stop = len(self) * self.batch_size
        for start in range(self.skip_batches * self.batch_size, stop, self.batch_size):
            yield idx[start : start + self.batch_size]


class TensorBatchLoader:
    """Loads whole batches by indexing tensors, skipping per-sample fetch and collation.

    Used for a :class:`~torch.utils.data.TensorDataset` with no custom collator and
    no workers: one ``index_select`` per tensor replaces ``batch_size`` item
    lookups plus ``default_collate``. Same order, same resume position as the
    ``DataLoader`` path because both draw from the same :class:`EpochBatchSampler`.
    """

    def __init__(self, dataset: TensorDataset, batch_sampler: EpochBatchSampler) -> None:
        self.dataset = dataset
        self.batch_sampler = batch_sampler

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[list[torch.Tensor]]:
        tensors = self.dataset.tensors
        sampler = self.batch_sampler
        idx = sampler.indices()
        bs = sampler.batch_size
        for start in range(sampler.skip_batches * bs, len(sampler) * bs, bs):
            chunk = idx[start : start + bs]
            yield [t[chunk] for t in tensors]


def supports_batch_indexing(dataset: Any, collate_fn: Callable[..., Any] | None, num_workers: int) -> bool:
    """Whether :class:`TensorBatchLoader` can replace a ``DataLoader`` for ``dataset``."""
    return type(dataset) is TensorDataset and collate_fn is None and num_workers == 0


def is_iterable_dataset(dataset: Dataset[Any] | Sequence[Any] | Any) -> bool:
    """Whether ``dataset`` must be iterated rather than indexed."""
    return isinstance(dataset, IterableDataset) or not (hasattr(dataset, "__getitem__") and has_length(dataset))
