"""The training loss summed between logs, and the updates skipped as non-finite.

One object keeps the bookkeeping of a training run, in one of two places:

- on the device (the default): tensors that a log reads once, so no update
  waits for the device;
- on the host, when the non-finite guard reads every update's loss anyway (on
  the CPU that read is a memory load): Python floats, so neither an update nor a
  log runs a tensor op for it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["LossTracker"]

#: Reads 0-d tensors to the host as one list (averaged over ranks under torch.distributed).
Reader = Callable[[list[torch.Tensor]], list[float]]


class LossTracker:
    """Sums the loss of each update taken and counts the updates skipped, between two logs.

    Args:
        device: Where the sums live when they are kept on the device.
        on_host: Keep the sums as Python floats (the guard reads each update's values anyway).
    """

    def __init__(self, device: torch.device, *, on_host: bool) -> None:
        self.on_host = on_host
        self._loss = torch.zeros((), device=device)
        self._skipped = torch.zeros((), device=device)
        self._host_loss = 0.0
        self._host_skipped = 0
        self._host_norm: float | None = None
        #: The loss summed into the logs so far (for ``train_loss``).
        self.logged = 0.0

    def add(self, loss: torch.Tensor) -> None:
        """Add the loss of an update nobody read (the guard is off)."""
        self._loss += loss

    def add_unless(self, loss: torch.Tensor, bad: torch.Tensor) -> None:
        """Add ``loss`` unless the 0-d boolean ``bad`` is set, and count it as skipped if it is: no host sync."""
        self._loss += torch.where(bad, torch.zeros_like(loss), loss)
        self._skipped += bad

    def add_read(self, loss: torch.Tensor, value: float, norm: float | None) -> None:
        """Add an update whose loss the guard read as ``value`` (and the gradient norm as ``norm``)."""
        if self.on_host:
            self._host_loss += value
            self._host_norm = norm
        else:
            self._loss += loss

    def skip(self, norm: float | None) -> None:
        """Count one update the guard skipped."""
        if self.on_host:
            self._host_skipped += 1
            self._host_norm = norm
        else:
            self._skipped += 1

    def take(self, grad_norm: torch.Tensor | None, read: Reader) -> tuple[float, int, float | None]:
        """The loss sum and the skipped count since the last call, and the last gradient norm; resets the sums.

        Reads the device once (through ``read``), or not at all when the sums are on the host.
        """
        if self.on_host:
            loss, skipped = self._host_loss, self._host_skipped
            self._host_loss, self._host_skipped = 0.0, 0
            self.logged += loss
            return loss, skipped, self._host_norm
        values = read([self._loss, self._skipped] + ([grad_norm] if grad_norm is not None else []))
        self._loss.zero_()
        skipped = int(values[1])
        if skipped:
            self._skipped.zero_()
        self.logged += values[0]
        return values[0], skipped, values[2] if grad_norm is not None else None

    def total(self, read: Reader) -> float:
        """The loss summed over every update of the run, logged or not."""
        return self.logged + (self._host_loss if self.on_host else read([self._loss])[0])
