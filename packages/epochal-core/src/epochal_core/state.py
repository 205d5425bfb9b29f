"""``TrainerState``: the run's counters and history, saved as ``trainer_state.json``.

Field names, defaults and the JSON layout match transformers', so tools that read
transformers' ``trainer_state.json`` read epochal's unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .training_args import TrainingArguments

__all__ = ["TRAINER_STATE_NAME", "TrainerState"]

logger = logging.getLogger(__name__)

TRAINER_STATE_NAME = "trainer_state.json"


@dataclasses.dataclass
class TrainerState:
    """State of a training run. One "step" is one optimizer update.

    Args:
        epoch: Fractional epoch (``2.5`` is half-way through the third epoch).
        global_step: Optimizer updates completed.
        max_steps: Updates this run will do.
        logging_steps: Absolute logging interval (ratios are resolved by :meth:`compute_steps`).
        eval_steps: Absolute evaluation interval.
        save_steps: Absolute checkpoint interval.
        train_batch_size: Per-device batch size used for training.
        num_train_epochs: Whole epochs this run will do.
        num_input_tokens_seen: Input tokens trained on, counted when ``include_num_input_tokens_seen=True``.
        total_flos: Floating-point operations of training so far, from the model's own estimate
            (``floating_point_ops``, or transformers' 6 x tokens x parameters); 0 without one.
        log_history: Every log of the run, each with its ``step``.
        best_metric: Best value of ``metric_for_best_model`` so far.
        best_global_step: Step at which :attr:`best_metric` was reached.
        best_model_checkpoint: Checkpoint folder of the best model, if one was saved.
        is_local_process_zero: This process is rank 0 on its node.
        is_world_process_zero: This process is rank 0 of the whole job.
        is_hyper_param_search: Always ``False`` (no built-in search); kept for compatibility.
        trial_name: Kept for compatibility.
        trial_params: Kept for compatibility.
        stateful_callbacks: Saved callback states: ``{key: state}``, or ``{key: [state, ...]}``
            when several callbacks share a key (in callback order).
    """

    epoch: float = 0.0
    global_step: int = 0
    max_steps: int = 0
    logging_steps: int = 500
    eval_steps: int = 500
    save_steps: int = 500
    train_batch_size: int | None = None
    num_train_epochs: int = 0
    num_input_tokens_seen: int = 0
    total_flos: float = 0.0
    log_history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    best_metric: float | None = None
    best_global_step: int | None = None
    best_model_checkpoint: str | None = None
    is_local_process_zero: bool = True
    is_world_process_zero: bool = True
    is_hyper_param_search: bool = False
    trial_name: str | None = None
    trial_params: dict[str, Any] | None = None
    stateful_callbacks: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        # transformers accepts None for both and normalises them.
        if self.log_history is None:
            self.log_history = []
        if self.stateful_callbacks is None:
            self.stateful_callbacks = {}

    def to_json_string(self) -> str:
        """Serialise like transformers: sorted keys, indent 2, trailing newline."""
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    def save_to_json(self, json_path: str) -> None:
        """Write the state to ``json_path`` (UTF-8)."""
        with open(json_path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())

    @classmethod
    def load_from_json(cls, json_path: str) -> TrainerState:
        """Read a state written by epochal or by transformers.

        Keys this version does not know (a newer writer) are dropped with one
        warning instead of failing, unlike transformers.
        """
        with open(json_path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict):
            raise ValueError(f"{json_path} does not hold a JSON object; it is not a trainer state file.")
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            logger.warning("Ignoring unknown keys %s in %s (written by a newer version?).", unknown, json_path)
        return cls(**{k: v for k, v in data.items() if k in known})

    def compute_steps(self, args: TrainingArguments, max_steps: int) -> None:
        """Turn ratio intervals (``0 < value < 1``) into absolute step counts."""
        for kind in ("logging", "eval", "save"):
            value = getattr(args, f"{kind}_steps")
            if value is None:
                continue
            if value < 1:
                value = math.ceil(max_steps * value)
            setattr(self, f"{kind}_steps", int(value))

    def init_training_references(self, trainer: Any, max_steps: int, num_train_epochs: int, trial: Any = None) -> None:
        """Record the run's totals and this process's ranks from ``trainer``."""
        self.max_steps = max_steps
        self.num_train_epochs = num_train_epochs
        self.is_local_process_zero = trainer.is_local_process_zero()
        self.is_world_process_zero = trainer.is_world_process_zero()
        self.trial_params = None
