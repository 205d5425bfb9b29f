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


#: ``"'key': "`` for the keys printed so far (keys repeat from log to log).
_KEY_PREFIXES: dict[str, str] = {}
#: Per tuple of keys: the line as a %-template and the ``.4g`` format of its values (``None``: no fast path).
_LINE_FORMATS: dict[tuple[str, ...], tuple[str, str] | None] = {}
#: Bound of both caches: a run that invents keys must not grow them forever.
_CACHE_LIMIT = 1024


def _line_formats(keys: tuple[str, ...]) -> tuple[str, str] | None:
    formats = None
    if keys and "total_flos" not in keys:
        template = "{" + ", ".join(repr(key).replace("%", "%%") + ": %s" for key in keys) + "}"
        formats = (template, "\x00".join(["%.4g"] * len(keys)))
    if len(_LINE_FORMATS) < _CACHE_LIMIT:
        _LINE_FORMATS[keys] = formats
    return formats


def format_logs_line(logs: Mapping[str, Any], max_str_len: int = 100) -> str:
    """``str(format_logs(logs, max_str_len))``, built directly (it runs for every printed log).

    A log of floats only (every training log) is formatted by two C-level ``%``
    operations on templates cached per set of keys.
    """
    keys = tuple(logs)
    formats = _LINE_FORMATS[keys] if keys in _LINE_FORMATS else _line_formats(keys)
    if formats is not None:
        values = tuple(logs.values())
        for value in values:
            if type(value) is not float:
                break
        else:
            template, value_format = formats
            texts = value_format % values
            # Without an exponent, nan or inf, repr(float(text)) is the .4g text itself, with ".0"
            # added when it has no "." (1 -> 1.0); the loop below handles the rest (1e+04 -> 10000.0).
            if "e" not in texts and "n" not in texts:
                parts = texts.split("\x00")
                if texts.count(".") != len(parts):  # a text has at most one "."
                    parts = [part if "." in part else part + ".0" for part in parts]
                return template % tuple(parts)
    items = []
    for key, value in logs.items():
        if type(value) is float and key != "total_flos":
            text = f"{value:.4g}"
            if "." not in text or "e" in text:
                text = repr(float(text))
            prefix = _KEY_PREFIXES.get(key)
            if prefix is None:
                prefix = f"{key!r}: "
                if len(_KEY_PREFIXES) < _CACHE_LIMIT:
                    _KEY_PREFIXES[key] = prefix
            items.append(prefix + text)
        elif key != "total_flos":
            items.append(f"{key!r}: {format_logs({key: value}, max_str_len)[key]!r}")
    return "{" + ", ".join(items) + "}"


class ProgressCallback(TrainerCallback):
    """Shows a tqdm bar for training and for each evaluation, on world rank zero.

    Logs are written above the bar, formatted by :func:`format_logs`. The bar is
    refreshed at most ``mininterval`` seconds apart (tqdm's own throttle), so a
    fast loop does not pay for terminal writes. Log lines are throttled the same
    way: writing above a bar clears and redraws it (about 50 us each time), so
    lines that come less than ``write_interval`` seconds after the last write
    wait and go out together, in order, at the next log or step past the
    interval, before an evaluation bar opens, and at the end. Every line is
    printed exactly once; a log every step no longer costs a redraw per step.

    Args:
        max_str_len: Longest string value printed as is.
        write_interval: Seconds between two writes of log lines above the bar.
    """

    def __init__(self, max_str_len: int = 100, write_interval: float = 0.1) -> None:
        self.training_bar: Tqdm | None = None
        self.prediction_bar: Tqdm | None = None
        self.max_str_len = max_str_len
        self.write_interval = write_interval
        self.current_step = 0
        self._pending: list[str] = []
        self._last_write = -math.inf

    def _write_pending(self) -> None:
        if self._pending and self.training_bar is not None:
            self.training_bar.write("\n".join(self._pending))
        self._pending.clear()
        self._last_write = time.monotonic()

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
            if self._pending and time.monotonic() - self._last_write >= self.write_interval:
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
            self._pending.append(format_logs_line(logs, self.max_str_len))
            if time.monotonic() - self._last_write >= self.write_interval:
                self._write_pending()

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        """Write the waiting log lines and close the training bar."""
        if self.training_bar is not None:
            self._write_pending()
            self.training_bar.close()
            self.training_bar = None

    on_exception = on_train_end


class PrinterCallback(TrainerCallback):
    """Prints each log on local rank zero; used instead of the bar when ``disable_tqdm`` is set.

    Unlike transformers' it never mutates the shared ``logs`` dict.
    """

    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs: Any = None, **kwargs: Any
    ) -> Any:
        """Print the logs."""
        if state.is_local_process_zero and logs is not None:
            # One write instead of print's two.
            sys.stdout.write(format_logs_line(logs) + "\n")
