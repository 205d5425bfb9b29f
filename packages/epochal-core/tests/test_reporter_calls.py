"""An integration is called by one thread at a time, though its events run on two.

Queued events and ``end_batch`` run on the reporter's thread; ``on_save``,
``on_train_end`` and ``on_exception`` run on the training thread after a drain. The
reporter's thread also calls ``end_batch`` on quiet wake-ups (every
``BATCH_INTERVAL``), so without mutual exclusion it could write out a buffer while
``finish`` closes it (seen as ``ValueError: I/O operation on closed file``).
"""

from __future__ import annotations

import threading
from typing import Any

from epochal_core import IntegrationCallback, Trainer, TrainingArguments
from epochal_core.background import BATCH_INTERVAL
from epochal_core.testing import TinyRegressor, tiny_dataset


class _SlowFinish(IntegrationCallback):
    """``finish`` stays open long enough for several of the reporter's wake-ups, watching for ``end_batch``."""

    name = "slow-finish"

    def __init__(self) -> None:
        super().__init__()
        self.finishing = False
        self.called_during_finish = threading.Event()
        self.end_batches = 0

    def setup(self, args: Any, state: Any, model: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float | int], step: int, state: Any) -> None:
        pass

    def end_batch(self) -> None:
        self.end_batches += 1
        if self.finishing:
            self.called_during_finish.set()

    def finish(self, status: str) -> None:
        self.finishing = True
        # Not a sleep to pass: the wait ends early (and the test fails) as soon as end_batch overlaps.
        self.called_during_finish.wait(timeout=5 * BATCH_INTERVAL)
        self.finishing = False


def test_end_batch_never_overlaps_finish(tmp_path: Any) -> None:
    probe = _SlowFinish()
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", max_steps=4, logging_steps=1,
                             save_strategy="no", disable_tqdm=True, use_cpu=True, strict_integrations=True)
    Trainer(TinyRegressor(), args, train_dataset=tiny_dataset(32), callbacks=[probe]).train()
    assert probe.end_batches > 0  # the reporter did write out batches
    assert not probe.called_during_finish.is_set(), "end_batch ran on the reporter's thread while finish ran"
