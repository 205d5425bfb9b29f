"""Console output: ``ProgressCallback`` (tqdm bars) and ``PrinterCallback`` (plain prints)."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .callback import TrainerCallback

if TYPE_CHECKING:
    from tqdm.auto import tqdm as Tqdm  # type: ignore[import-untyped]

    from .control import TrainerControl
    from .state import TrainerState
    from .training_args import TrainingArguments

__all__ = ["PrinterCallback", "ProgressCallback", "format_logs", "format_logs_line"]


def format_logs(logs: Mapping[str, Any], max_str_len: int = 100) -> dict[str, Any]:
    """Return a copy of ``logs`` made for reading: floats as ``.4g``, long strings cut, no ``total_flos``.

    Rounding is a display concern: loggers always receive the exact values.
    """
    shown: dict[str, Any] = {}
    for key, value in logs.items():
        if type(value) is float and key != "total_flos":  # the common case first: runs for every log
            shown[key] = float(f"{value:.4g}")
            continue
        if key == "total_flos":
            continue
        if isinstance(value, str) and len(value) > max_str_len:
            value = (
                f"[String too long to display, length: {len(value)} > {max_str_len}. "
                "Consider increasing `max_str_len` if needed.]"
            )
        elif isinstance(value, float):
            value = float(f"{value:.4g}")
        shown[key] = value
    return shown


def format_logs_line(logs: Mapping[str, Any], max_str_len: int = 100) -> str:
    """The line printed for ``logs``: ``str(format_logs(logs, max_str_len))``.

    (A cache of %-templates per set of keys made this 4.6 us faster per log; at
    ``logging_steps=10`` of a tiny model's 0.5 ms steps that is 0.1 %: not worth its lines.)
    """
    return str(format_logs(logs, max_str_len))


class _HeldLines:
    """Log lines held back and written together, at most ``write_interval`` seconds apart.

    Formatting a line inside a training step costs about three times what it costs in a run of
    lines: by the next log, the step has pushed its code and data out of the CPU caches. So each
    log is copied as it comes (``dict(logs)``: later changes by other callbacks do not show) and
    the lines are built in one go when written. Every log is printed exactly once and in order.
    """

    max_str_len: int
    write_interval: float
    _held: list[dict[str, Any]]
    _last_write: float

    def _hold_lines(self, max_str_len: int, write_interval: float) -> None:
        if not write_interval >= 0:  # also catches nan
            raise ValueError(f"write_interval={write_interval!r}: must be a number of seconds >= 0 "
                             "(0 writes each log as it comes).")
        self.max_str_len = max_str_len
        self.write_interval = write_interval
        self._held = []
        self._last_write = -math.inf

    def _lines_due(self) -> bool:
        return bool(self._held) and time.monotonic() - self._last_write >= self.write_interval

    def _take_lines(self) -> str | None:
        # The held lines as one text (None: none held); restarts the interval.
        self._last_write = time.monotonic()
        if not self._held:
            return None
        max_str_len = self.max_str_len
        text = "\n".join([format_logs_line(logs, max_str_len) for logs in self._held])
        self._held.clear()
        return text


def _slow_work_follows(control: TrainerControl) -> bool:
    # After this log the trainer evaluates, saves or stops: waiting lines go out before that.
    return control.should_evaluate or control.should_save or control.should_training_stop


class ProgressCallback(TrainerCallback, _HeldLines):
    """Shows a tqdm bar for training and for each evaluation, on world rank zero.

    Logs are written above the bar, formatted by :func:`format_logs`. The bar is
    refreshed at most ``mininterval`` seconds apart (tqdm's own throttle), so a
    fast loop does not pay for terminal writes. Log lines are throttled the same
    way: writing above a bar clears and redraws it (about 50 us each time), and
    formatting lines one at a time between steps costs several times more than in
    a run, so lines that come less than ``write_interval`` seconds after the last
    write wait and go out together, in order, at the next log or step past the
    interval, before an evaluation, a save or the end of training, and at the end.
    Every line is printed exactly once; a log every step no longer costs a redraw
    per step. ``write_interval=0`` writes each log as it comes.

    Args:
        max_str_len: Longest string value printed as is.
        write_interval: Seconds between two writes of log lines above the bar.
    """

    def __init__(self, max_str_len: int = 100, write_interval: float = 0.1) -> None:
        self.training_bar: Tqdm | None = None
        self.prediction_bar: Tqdm | None = None
        self._hold_lines(max_str_len, write_interval)
        self.current_step = 0

    def _write_pending(self) -> None:
        text = self._take_lines()
        if text is not None and self.training_bar is not None:
            self.training_bar.write(text)

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> Any:
        """Open the training bar (at the restored step when resuming)."""
        if state.is_world_process_zero:
            from tqdm.auto import tqdm

            self.training_bar = tqdm(total=state.max_steps, initial=state.global_step, dynamic_ncols=True)
        self.current_step = state.global_step

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        """Advance the training bar (and write log lines that waited past the interval)."""
        if self.training_bar is not None:
            self.training_bar.update(state.global_step - self.current_step)
            self.current_step = state.global_step
            if self._lines_due():
                self._write_pending()

    def on_prediction_step(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        eval_dataloader: Any = None,
        **kwargs: Any,
    ) -> Any:
        """Advance (or open) the evaluation bar."""
        if not state.is_world_process_zero:
            return
        if self.prediction_bar is None:
            try:
                total = len(eval_dataloader)
            except TypeError:
                return
            from tqdm.auto import tqdm

            self._write_pending()  # above the training bar, before the evaluation bar opens

            self.prediction_bar = tqdm(total=total, leave=self.training_bar is None, dynamic_ncols=True)
        self.prediction_bar.update(1)

    def _close_prediction_bar(self) -> None:
        if self.prediction_bar is not None:
            self.prediction_bar.close()
            self.prediction_bar = None

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        """Close the evaluation bar."""
        self._close_prediction_bar()

    def on_predict(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, metrics: Any = None, **kwargs: Any
    ) -> Any:
        """Close the evaluation bar."""
        self._close_prediction_bar()

    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs: Any = None, **kwargs: Any
    ) -> Any:
        """Write the logs above the training bar (lines less than ``write_interval`` apart go out together)."""
        if self.training_bar is not None and logs is not None:
            self._held.append(dict(logs))
            if self._lines_due() or _slow_work_follows(control):
                self._write_pending()

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        """Write the waiting log lines and close the training bar."""
        if self.training_bar is not None:
            self._write_pending()
            self.training_bar.close()
            self.training_bar = None

    on_exception = on_train_end


class PrinterCallback(TrainerCallback, _HeldLines):
    """Prints each log on local rank zero; used instead of the bar when ``disable_tqdm`` is set.

    Unlike transformers' it never mutates the shared ``logs`` dict. During training,
    logs less than ``write_interval`` seconds apart are printed together (formatting a
    line between two steps costs several times more than in a run of lines): a line
    waits at most until the next step or log past the interval, and always goes out
    before an evaluation, a save, the end of training or an error. Outside training
    (``evaluate()`` alone) and with ``write_interval=0`` each log is printed as it
    comes. Every log is printed exactly once, in order.

    Args:
        max_str_len: Longest string value printed as is.
        write_interval: Seconds between two writes of log lines during training.
    """

    def __init__(self, max_str_len: int = 100, write_interval: float = 0.1) -> None:
        self._hold_lines(max_str_len, write_interval)
        self._training = False

    def _write_pending(self) -> None:
        text = self._take_lines()
        if text is not None:
            sys.stdout.write(text + "\n")  # one write for the whole run of lines

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> Any:
        """Start holding back lines that come faster than ``write_interval``."""
        self._training = True

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        """Print the lines that waited past the interval."""
        if self._held and self._lines_due():
            self._write_pending()

    def on_prediction_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                           **kwargs: Any) -> Any:
        """Print waiting lines before an evaluation runs."""
        if self._held:
            self._write_pending()

    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs: Any = None, **kwargs: Any
    ) -> Any:
        """Print the logs (during training, lines less than ``write_interval`` apart go out together)."""
        if state.is_local_process_zero and logs is not None:
            self._held.append(dict(logs))
            if not self._training or self._lines_due() or _slow_work_follows(control):
                self._write_pending()

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        """Print the waiting lines."""
        self._training = False
        self._write_pending()

    on_exception = on_train_end
