"""epochal-core: a PyTorch Trainer with transformers' callback protocol.

Install with ``pip install epochal-core``. Quick start::

    from epochal_core import Trainer, TrainingArguments

    trainer = Trainer(model=model, args=TrainingArguments(output_dir="out", report_to="none"),
                      train_dataset=train_ds, eval_dataset=eval_ds)
    trainer.train()

The protocol names (``TrainerCallback``, ``TrainerState``, ``TrainerControl``,
``ExportableState``, ``CallbackHandler``, the built-in callbacks and
``TrainingArguments``) import without torch; ``Trainer`` and the names that need
torch are loaded on first access.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .callback import EVENTS, ExportableState, TrainerCallback
from .control import TrainerControl
from .early_stopping import EarlyStoppingCallback
from .flow import DefaultFlowCallback
from .handler import CallbackHandler
from .integrations import IntegrationCallback
from .progress import PrinterCallback, ProgressCallback
from .state import TrainerState
from .training_args import TrainingArguments

if TYPE_CHECKING:
    from .background import IntegrationStalled
    from .checkpoint import CheckpointChanged, CheckpointError
    from .run_lock import OutputDirInUseError
    from .save_failures import CheckpointSaveError
    from .trainer import EvalPrediction, PredictionOutput, Trainer, TrainOutput, set_seed

__version__ = "0.1.0"

# name -> module, imported on first attribute access (these import torch).
_LAZY = {
    "Trainer": "trainer",
    "TrainOutput": "trainer",
    "EvalPrediction": "trainer",
    "PredictionOutput": "trainer",
    "set_seed": "trainer",
    "CheckpointChanged": "checkpoint",
    "CheckpointError": "checkpoint",
    "CheckpointSaveError": "save_failures",
    "IntegrationStalled": "background",
    "OutputDirInUseError": "run_lock",
}

__all__ = [
    "EVENTS",
    "CallbackHandler",
    "CheckpointChanged",
    "CheckpointError",
    "CheckpointSaveError",
    "DefaultFlowCallback",
    "EarlyStoppingCallback",
    "EvalPrediction",
    "ExportableState",
    "IntegrationCallback",
    "IntegrationStalled",
    "OutputDirInUseError",
    "PredictionOutput",
    "PrinterCallback",
    "ProgressCallback",
    "TrainOutput",
    "Trainer",
    "TrainerCallback",
    "TrainerControl",
    "TrainerState",
    "TrainingArguments",
    "__version__",
    "set_seed",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'epochal_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
