"""The few lines printed when training ends: steps, time, eval metric, best checkpoint, where the logs went.

:func:`format_run_summary` builds the text from the trainer's state (pure, so it is
tested on its own); :func:`print_run_summary` is what the Trainer calls once its
integrations have finished. It prints on world rank zero only, and only while a
console callback (:class:`~epochal_core.ProgressCallback` or
:class:`~epochal_core.PrinterCallback`) is attached: a user who removed both asked
for a silent console. Each integration names its logs through
:meth:`~epochal_core.IntegrationCallback.log_location`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .integrations import IntegrationCallback
from .progress import PrinterCallback, ProgressCallback

if TYPE_CHECKING:
    from .state import TrainerState
    from .training_args import TrainingArguments

__all__ = ["format_run_summary", "print_run_summary", "summary_metric"]


def summary_metric(args: TrainingArguments) -> str:
    """The eval metric reported: ``metric_for_best_model`` (with its ``eval_`` prefix), else ``eval_loss``."""
    name = args.metric_for_best_model or "loss"
    return name if name.startswith("eval_") else f"eval_{name}"


def _number(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else str(value)


def _metric_line(args: TrainingArguments, state: TrainerState) -> str | None:
    key = summary_metric(args)
    seen = [(int(e.get("step", 0)), float(e[key])) for e in state.log_history if isinstance(e.get(key), (int, float))]
    if not seen:
        return None
    last_step, last = seen[-1]
    if args.metric_for_best_model and state.best_metric is not None:
        best, best_step = state.best_metric, state.best_global_step
    else:  # no ranking metric configured: the lowest loss is the best one
        best_step, best = (max if args.greater_is_better else min)(seen, key=lambda s: s[1])
    return f"{key}: last {_number(last)} (step {last_step}), best {_number(best)} (step {best_step})"


def format_run_summary(
    args: TrainingArguments,
    state: TrainerState,
    metrics: Mapping[str, float],
    log_locations: Iterable[tuple[str, str | None]] = (),
    failed: Sequence[str] = (),
) -> str:
    """The end-of-training summary.

    Args:
        args: The run's arguments (output folder, ranking metric).
        state: The state at the end of training (steps, epoch, log history, best checkpoint).
        metrics: The final train log (``train_runtime``, ``train_loss``, ...).
        log_locations: ``(report_to name, folder/file/URL or None)`` per integration.
        failed: Names of integrations that failed and were disabled.

    Returns:
        A few lines, without a trailing newline.
    """
    runtime = float(metrics.get("train_runtime", 0.0))
    head = f"Training finished: {state.global_step} steps"
    if state.epoch is not None:
        head += f" ({state.epoch:.2f} epochs)"
    head += f" in {runtime:.1f} s"
    if "train_loss" in metrics:
        head += f", mean train loss {_number(float(metrics['train_loss']))}"
    lines = [head]
    metric = _metric_line(args, state)
    if metric is not None:
        lines.append(f"  {metric}")
    if state.best_model_checkpoint:
        lines.append(f"  best checkpoint: {state.best_model_checkpoint}")
    lines.append(f"  output folder: {args.output_dir}")
    failed_names = set(failed)
    for name, location in log_locations:
        if name in failed_names:
            where = "failed and was disabled (see the warning above)"
        else:
            where = location or "(this integration does not say where)"
        lines.append(f"  {name} logs: {where}")
    return "\n".join(lines)


def _log_location(callback: IntegrationCallback) -> str | None:
    try:
        return callback.log_location()
    except Exception as err:  # a summary line must never fail the end of training
        return f"(unknown: {type(err).__name__}: {err})"


def print_run_summary(trainer: Any, metrics: Mapping[str, float]) -> str | None:
    """Print :func:`format_run_summary` for ``trainer``'s finished run; return the text (``None``: not printed).

    Nothing is printed off world rank zero, or when neither a ``ProgressCallback``
    nor a ``PrinterCallback`` is attached.
    """
    callbacks = trainer.callback_handler.callbacks
    if not trainer.is_world_process_zero() or not any(
        isinstance(cb, (ProgressCallback, PrinterCallback)) for cb in callbacks
    ):
        return None
    locations = [
        (cb.name or type(cb).__name__, _log_location(cb)) for cb in callbacks if isinstance(cb, IntegrationCallback)
    ]
    failed = [failure.name for failure in trainer.integration_failures]
    text = format_run_summary(trainer.args, trainer.state, metrics, locations, failed)
    print(text, flush=True)
    return text
