"""``TrainerControl``: the flags callbacks set to steer the training loop."""

from __future__ import annotations

import dataclasses
from typing import Any

from .callback import ExportableState

__all__ = ["TrainerControl"]


@dataclasses.dataclass
class TrainerControl(ExportableState):
    """Flags that steer the loop; reset at the same points as transformers'.

    Args:
        should_training_stop: Stop training. Never reset during a run; a restored
            early stop is honoured on resume (see the Trainer docs).
        should_epoch_stop: End the current epoch; reset when the next epoch begins.
        should_save: Save a checkpoint now; reset at the next step and after ``on_save``.
        should_evaluate: Evaluate now; reset at the next step and after ``on_evaluate``.
        should_log: Log the training loss now; reset at the next step and after ``on_log``.
    """

    should_training_stop: bool = False
    should_epoch_stop: bool = False
    should_save: bool = False
    should_evaluate: bool = False
    should_log: bool = False

    def _new_training(self) -> None:
        self.should_training_stop = False

    def _new_epoch(self) -> None:
        self.should_epoch_stop = False

    def _new_step(self) -> None:
        self.should_save = False
        self.should_evaluate = False
        self.should_log = False

    def state(self) -> dict[str, Any]:
        """Return the flags in the ``ExportableState`` format."""
        return {"args": dataclasses.asdict(self), "attributes": {}}
