"""Graceful preemption: SIGTERM (and a first SIGINT) request a save and a clean stop.

The signal handler only sets a flag; the Trainer checks it at the next step
boundary, saves a checkpoint, runs the end-of-training events and returns.
Nothing runs concurrently with the training step (unlike a save from a signal
thread). A second SIGINT aborts at once with ``KeyboardInterrupt``. Previous
handlers are restored when training ends.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any

__all__ = ["PreemptionGuard"]

logger = logging.getLogger(__name__)


class PreemptionGuard:
    """Context manager that turns SIGTERM/SIGINT into a stop request.

    Attributes:
        requested: Name of the signal received, or ``None``.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None and signum == signal.SIGINT:
            # Second Ctrl-C: the user wants out now.
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        if self.requested is None:
            logger.warning(
                "Received %s: finishing the current step, saving a checkpoint and stopping "
                "(press Ctrl-C again to abort at once).",
                name,
            )
        self.requested = name

    def __enter__(self) -> PreemptionGuard:
        if self.enabled:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
