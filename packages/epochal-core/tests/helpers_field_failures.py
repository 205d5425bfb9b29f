"""A tracker that stalls like a hung network request, for the bounded-wait tests.

A fake on purpose: no tracker SDK's offline mode can be made to hang on demand,
and a stall is exactly what these tests need. It records every call it received,
so a test can show that a detached tracker is never called again.
"""

from __future__ import annotations

import threading
from typing import Any

from epochal_core import IntegrationCallback


class StallingTracker(IntegrationCallback):
    """Its calls block on :attr:`release` from ``stall_from`` on (a step, or ``"finish"`` for the run's end).

    Args:
        stall_from: The first global step whose log never returns, or ``"finish"``
            to stall only when the run is closed (``on_train_end``).
    """

    name = "stalling"

    def __init__(self, stall_from: int | str = 5) -> None:
        super().__init__()
        self.stall_from = stall_from
        #: Set it (at teardown) to let the stuck call return.
        self.release = threading.Event()
        #: Set when a call starts blocking.
        self.stuck = threading.Event()
        #: What the tracker received: ("log", step), ("checkpoint", path), ("finish", status).
        self.calls: list[tuple[str, Any]] = []

    def setup(self, args: Any, state: Any, model: Any, **kwargs: Any) -> None:
        """Nothing to start."""

    def _block(self) -> None:
        self.stuck.set()
        self.release.wait()

    def log_metrics(self, metrics: dict[str, float | int], step: int, state: Any) -> None:
        """Record the log; never return from ``stall_from`` on."""
        if isinstance(self.stall_from, int) and step >= self.stall_from:
            self._block()
        self.calls.append(("log", step))

    def log_checkpoint(self, path: str, args: Any, state: Any) -> None:
        """Record the checkpoint."""
        self.calls.append(("checkpoint", path))

    def finish(self, status: str) -> None:
        """Record the close; never return when ``stall_from == "finish"``."""
        if self.stall_from == "finish":
            self._block()
        self.calls.append(("finish", status))
