"""``DefaultFlowCallback``: turns the logging/eval/save schedule into control flags."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .callback import TrainerCallback

if TYPE_CHECKING:
    from .control import TrainerControl
    from .state import TrainerState
    from .training_args import TrainingArguments

__all__ = ["DefaultFlowCallback"]


class DefaultFlowCallback(TrainerCallback):
    """Sets ``should_log``/``should_evaluate``/``should_save``/``should_training_stop``.

    Same rules as transformers v5: at the last step a steps-based evaluation runs
    if the step is not already an evaluation step, and a steps-based save always
    runs (epoch-based runs save at the epoch end, so there is no duplicate save).
    """

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        """Raise the flags due at the end of an update step."""
        step = state.global_step
        if step == 1 and args.logging_first_step:
            control.should_log = True
        if args.logging_strategy == "steps" and step % state.logging_steps == 0:
            control.should_log = True
        eval_due = args.eval_strategy == "steps" and args.eval_delay <= step
        if eval_due and step % state.eval_steps == 0:
            control.should_evaluate = True
        if args.save_strategy == "steps" and state.save_steps > 0 and step % state.save_steps == 0:
            control.should_save = True
        if step >= state.max_steps:
            control.should_training_stop = True
            if eval_due and step % state.eval_steps != 0:
                control.should_evaluate = True
            if args.save_strategy == "steps":
                control.should_save = True
        return control

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        """Raise the flags due at the end of an epoch."""
        if args.logging_strategy == "epoch":
            control.should_log = True
        if args.eval_strategy == "epoch" and args.eval_delay <= state.epoch:
            control.should_evaluate = True
        if args.save_strategy == "epoch":
            control.should_save = True
        return control
