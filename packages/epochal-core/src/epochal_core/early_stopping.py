"""``EarlyStoppingCallback``: stop when the monitored metric stops improving."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from .callback import ExportableState, TrainerCallback

if TYPE_CHECKING:
    from .control import TrainerControl
    from .state import TrainerState
    from .training_args import TrainingArguments

__all__ = ["EarlyStoppingCallback"]

logger = logging.getLogger(__name__)


class EarlyStoppingCallback(TrainerCallback, ExportableState):
    """Stops training after ``early_stopping_patience`` evaluations without improvement.

    Improvement means beating ``state.best_metric`` (kept by the Trainer) by more
    than ``early_stopping_threshold`` in the direction of ``greater_is_better``.
    The patience counter is saved in checkpoints and restored on resume, and a
    run it stopped stays stopped when resumed.

    Args:
        early_stopping_patience: Evaluations without improvement before stopping (>= 1).
        early_stopping_threshold: Absolute improvement that counts (>= 0).

    Raises:
        ValueError: On a bad argument here, or at train begin when
            ``metric_for_best_model`` is unset or evaluation is off.
    """

    def __init__(self, early_stopping_patience: int = 1, early_stopping_threshold: float | None = 0.0) -> None:
        if not isinstance(early_stopping_patience, int) or early_stopping_patience < 1:
            raise ValueError(
                f"early_stopping_patience={early_stopping_patience!r} is invalid: pass an integer >= 1."
            )
        threshold = 0.0 if early_stopping_threshold is None else float(early_stopping_threshold)
        if threshold < 0:
            raise ValueError(f"early_stopping_threshold={early_stopping_threshold!r} is invalid: pass a value >= 0.")
        self.early_stopping_patience = early_stopping_patience
        self.early_stopping_threshold = threshold
        self.early_stopping_patience_counter = 0

    def check_metric_value(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, metric_value: float
    ) -> None:
        """Reset the counter on an improvement, else count one more evaluation without one."""
        best = state.best_metric
        if best is None:
            self.early_stopping_patience_counter = 0
            return
        better = metric_value > best if args.greater_is_better else metric_value < best
        if better and abs(metric_value - best) > self.early_stopping_threshold:
            self.early_stopping_patience_counter = 0
        else:
            self.early_stopping_patience_counter += 1

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> Any:
        """Check that the arguments make early stopping possible."""
        if args.metric_for_best_model is None:
            raise ValueError(
                "EarlyStoppingCallback requires TrainingArguments.metric_for_best_model; "
                "got None. Set it, e.g. metric_for_best_model='loss'."
            )
        if args.eval_strategy == "no":
            raise ValueError(
                "EarlyStoppingCallback requires evaluation; got eval_strategy='no'. "
                "Set eval_strategy='steps' or 'epoch'."
            )
        if not args.load_best_model_at_end:
            logger.warning(
                "Using EarlyStoppingCallback without load_best_model_at_end=True. "
                "Once training is finished, the best model will not be loaded automatically."
            )

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, metrics: Any = None, **kwargs: Any
    ) -> Any:
        """Count this evaluation and stop training when patience runs out."""
        key = args.metric_for_best_model or "loss"
        if not key.startswith("eval_"):
            key = f"eval_{key}"
        value = (metrics or {}).get(key)
        if value is None:
            logger.warning(
                "early stopping required metric_for_best_model, but did not find %s so early stopping is disabled",
                key,
            )
            return
        self.check_metric_value(args, state, control, float(value))
        if self.early_stopping_patience_counter >= self.early_stopping_patience:
            control.should_training_stop = True

    def state(self) -> dict[str, Any]:
        """Return the patience settings and the counter."""
        return {
            "args": {
                "early_stopping_patience": self.early_stopping_patience,
                "early_stopping_threshold": self.early_stopping_threshold,
            },
            "attributes": {"early_stopping_patience_counter": self.early_stopping_patience_counter},
        }
