"""TensorBoard integration for epochal (``report_to="tensorboard"``), writing through tensorboardX.

Install::

    pip install epochal-tensorboard      # and, to look at the logs: pip install tensorboard

Usage::

    from epochal_core import Trainer, TrainingArguments

    args = TrainingArguments(output_dir="out", report_to=["tensorboard"], logging_steps=10)
    Trainer(model=model, args=args, train_dataset=data).train()
    # tensorboard --logdir out/runs

Or configured (with ``report_to="none"``, so it is not added twice)::

    from epochal_tensorboard import TensorBoardCallback

    args = TrainingArguments(output_dir="out", report_to="none")
    Trainer(model=model, args=args, train_dataset=data, callbacks=[TensorBoardCallback(log_dir="tb/exp1")])

Events, summaries, HParams records and the record files (framing, CRC-32C, with
the native ``crc32c`` package) are tensorboardX's. This module keeps only what is
epochal's: the names (transformers' ``TensorBoardCallback`` tags), the purge
marker that hides a crashed run's steps on resume, and where the writing happens.
tensorboardX's ``SummaryWriter`` hands every event to a ``multiprocessing.Queue``
read by a writer thread; here the callback runs on epochal's reporter thread and
writes each log as one event through tensorboardX's synchronous ``EventsWriter``,
so a log costs the training thread the reporter's hand-off and nothing more.

``import tensorboardX`` also imports comet_ml when that is installed (seconds of
CPU, and comet's import hooks): tensorboardX is imported in :meth:`setup`, which
runs on the reporter thread, never on the training thread's start-up path.
"""

from __future__ import annotations

import inspect
import itertools
import json
import logging
import os
import re
import time
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from epochal_core import IntegrationCallback
from epochal_core.integrations import flatten_params, model_config

if TYPE_CHECKING:
    from epochal_core.state import TrainerState
    from epochal_core.training_args import TrainingArguments

__all__ = ["TensorBoardCallback"]

logger = logging.getLogger(__name__)

#: Environment variable naming the log directory (transformers v5).
LOGGING_DIR_ENV = "TENSORBOARD_LOGGING_DIR"

# tensorboardX names event files by the second they were opened and opens them with "wb": a
# per-process serial in the suffix keeps two writers opened within one second from sharing a file.
_writer_serial = itertools.count()
# What tensorboardX's add_scalar does to a tag (its summary._clean_tag), so tags match transformers' runs.
_INVALID_TAG_CHARACTERS = re.compile(r"[^-/\w.]")


def _clean_tag(tag: str) -> str:
    return _INVALID_TAG_CHARACTERS.sub("_", tag).lstrip("/")


def _hparam_value(value: Any) -> Any:
    # The HParams view shows numbers, strings and booleans; anything else (lists, enums) as its text.
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


class TensorBoardCallback(IntegrationCallback):
    """Writes training logs to TensorBoard event files (transformers' ``TensorBoardCallback``).

    On train begin (world rank zero) it logs what transformers logs: the training
    arguments as the text ``args`` (``args.to_json_string()``) and the model config,
    if the model has one, as the text ``model_config``. It also records the
    flattened hyperparameters (``args/<field>``, ``config/<key>``) for TensorBoard's
    HParams view, with the run's end status (success or failure). Every log becomes
    one event holding its scalars at ``global_step``, tagged as transformers tags them
    (``train/``, ``eval/``, ``test/``); strings become text; other values are dropped
    with one warning per key.

    Events are written on epochal's reporter thread through tensorboardX's
    ``EventsWriter``, handed to the operating system after each batch of events
    (so a live TensorBoard sees a log within about 0.2 s), and ``fsync``-ed at
    every checkpoint and at the end.

    The log directory is ``log_dir``, else ``$TENSORBOARD_LOGGING_DIR``, else
    ``args.logging_dir`` (``<output_dir>/runs``), with ``state.trial_name``
    appended during a hyperparameter search. When a run resumes from a checkpoint
    at step ``N``, its file starts with tensorboardX's purge marker at ``N + 1``
    (what ``SummaryWriter(purge_step=...)`` writes), so TensorBoard discards what a
    crashed run wrote after that checkpoint and every step appears once.

    Args:
        tb_writer: A ``SummaryWriter`` (tensorboardX, ``torch.utils.tensorboard``, or
            anything with their ``add_scalar``/``add_text``/``flush``/``close``) to use
            instead of the built-in writer. It is used as given: no purge on resume and
            no HParams records; it is closed at train end.
        log_dir: Directory of the event files; overrides the environment and ``args``.

    Attributes:
        tb_writer: The ``SummaryWriter`` passed in, or ``None`` with the built-in writer.
        event_writer: The built-in writer (tensorboardX's ``EventsWriter``) from train
            begin to train end, or ``None``.

    Raises:
        ImportError: At setup, when tensorboardX is not installed (built-in writer only).
        OSError: When the log directory cannot be created or written; epochal's
            reporter then disables the integration (or re-raises in strict mode).
    """

    name = "tensorboard"
    package = "epochal-tensorboard"
    sdk = "tensorboardX"
    sdk_package = "tensorboardX"

    def __init__(self, tb_writer: Any = None, *, log_dir: str | os.PathLike[str] | None = None) -> None:
        super().__init__()
        self.tb_writer = tb_writer
        self.log_dir = os.fspath(log_dir) if log_dir is not None else None
        self.event_writer: Any = None
        self._pending = False  # events written since the last hand-off to the operating system
        self._tbx: Any = None  # tensorboardX's modules this callback uses, imported by setup
        self._walltime_kwarg = False  # whether tb_writer's add_scalar/add_text take walltime=

    def resolve_log_dir(self, args: TrainingArguments, state: TrainerState) -> str:
        """Return the event-file directory: ``log_dir``, ``$TENSORBOARD_LOGGING_DIR``, then ``args.logging_dir``."""
        base = self.log_dir or os.environ.get(LOGGING_DIR_ENV) or args.logging_dir \
            or os.path.join(args.output_dir, "runs")
        base = os.path.expanduser(base)
        return os.path.join(base, state.trial_name) if state.trial_name else base

    # -- IntegrationCallback hooks ---------------------------------------------------
    def setup(self, args: TrainingArguments, state: TrainerState, model: Any, **kwargs: Any) -> None:
        """Open the event file (with a purge marker on resume) and log the run's configuration."""
        step = state.global_step  # a resumed run adds its own records next to the first ones
        texts = {"args": args.to_json_string()}
        to_json = getattr(getattr(model, "config", None), "to_json_string", None)
        if callable(to_json):
            texts["model_config"] = to_json()
        elif (config := model_config(model)) is not None:
            texts["model_config"] = json.dumps(config, indent=2, sort_keys=True, default=str)
        if self.tb_writer is not None:
            parameters = inspect.signature(self.tb_writer.add_scalar).parameters.values()
            self._walltime_kwarg = any(p.name == "walltime" or p.kind is p.VAR_KEYWORD for p in parameters)
            self.log_texts(texts, step, state)
            self.tb_writer.flush()
            return
        self.import_sdk()  # the install hint if missing; imports comet_ml too when installed (see the docstring)
        self._tbx = tbx = SimpleNamespace(**{
            name: self.import_sdk(f"tensorboardX.{module}")
            for name, module in [("summary", "summary"), ("events", "event_file_writer"), ("event", "proto.event_pb2"),
                                 ("hparams", "proto.plugin_hparams_pb2"), ("api", "proto.api_pb2")]
        })
        Event, SessionLog = tbx.event.Event, tbx.event.SessionLog
        logdir = self.resolve_log_dir(args, state)
        os.makedirs(logdir, exist_ok=True)
        self.event_writer = tbx.events.EventsWriter(os.path.join(logdir, "events"),
                                         f".{os.getpid()}.{next(_writer_serial):06d}")
        self.run_id = logdir
        if step > 0:  # resuming a checkpoint: hide what a crash left after it (SummaryWriter's purge_step)
            self.event_writer.write_event(Event(step=step + 1, file_version="brain.Event:2"))
            self.event_writer.write_event(Event(step=step + 1, session_log=SessionLog(status=SessionLog.START)))
        self.log_texts(texts, step, state)
        hparams = {k: _hparam_value(v) for k, v in flatten_params(self.hyperparameters(args, model)).items()}
        experiment, session_start, _ = tbx.summary.hparams(hparams, {})
        self._write(experiment, step)
        self._write(session_start, step)
        self.end_batch()  # the run's configuration reaches the file before the first log

    def log_metrics(self, metrics: dict[str, float | int], step: int, state: TrainerState) -> None:
        """Write every metric at ``step`` (one event holding them all with the built-in writer)."""
        if self.event_writer is not None:
            event = self._tbx.event.Event(wall_time=self.event_time or time.time(), step=step)
            add = event.summary.value.add
            for tag, value in metrics.items():
                add(tag=_clean_tag(tag), simple_value=value)
            self.event_writer.write_event(event)
            self._pending = True
            return
        writer = self._user_writer()
        stamp = {"walltime": self.event_time} if self._walltime_kwarg else {}
        for tag, value in metrics.items():
            writer.add_scalar(tag, float(value), step, **stamp)

    def log_texts(self, texts: dict[str, str], step: int, state: TrainerState) -> None:
        """``add_text`` each string at ``step`` (tag ``<name>/text_summary``, as transformers' writer does)."""
        if self.event_writer is not None:
            for tag, value in texts.items():
                self._write(self._tbx.summary.text(tag, value), step)
            return
        writer = self._user_writer()
        stamp = {"walltime": self.event_time} if self._walltime_kwarg else {}
        for tag, value in texts.items():
            writer.add_text(tag, value, step, **stamp)

    def end_batch(self) -> None:
        """Hand the events written since the last batch to the operating system (no ``fsync``)."""
        if self._pending and self.event_writer is not None:
            self._pending = False
            # EventsWriter.flush() also fsyncs (2-3 ms here); that is kept for checkpoints and the end.
            self.event_writer._py_recordio_writer._writer.flush()

    def log_checkpoint(self, path: str, args: TrainingArguments, state: TrainerState) -> None:
        """``fsync`` at each checkpoint, so the events it covers are on disk (a resume purges what follows)."""
        if self.event_writer is not None:
            self._pending = False
            self.event_writer.flush()
        elif self.tb_writer is not None:
            self.tb_writer.flush()

    def finish(self, status: str) -> None:
        """Record the end status for the HParams view (``"failed"`` → failure), then flush and close."""
        if self.tb_writer is not None:
            self.tb_writer.close()
            return
        writer, self.event_writer = self.event_writer, None
        if writer is None:
            return
        try:
            tbx = self._tbx
            outcome = tbx.api.Status.Value("STATUS_SUCCESS" if status == "finished" else "STATUS_FAILURE")
            end = tbx.hparams.SessionEndInfo(status=outcome, end_time_secs=time.time())
            content = tbx.hparams.HParamsPluginData(session_end_info=end, version=0).SerializeToString()
            # The record tensorboardX's summary.hparams() builds for the end, with this run's status.
            summaries = tbx.summary  # it re-exports the Summary protos
            metadata = summaries.SummaryMetadata(
                plugin_data=summaries.SummaryMetadata.PluginData(plugin_name="hparams", content=content))
            value = summaries.Summary.Value(tag="_hparams_/session_end_info", metadata=metadata)
            self._write(summaries.Summary(value=[value]), None, writer)
        finally:
            self._pending = False
            writer.close()  # flush, fsync and close

    # -- helpers ----------------------------------------------------------------------
    def _write(self, summary: Any, step: int | None, writer: Any = None) -> None:
        event = self._tbx.event.Event(wall_time=self.event_time or time.time(), summary=summary)
        if step:
            event.step = step
        (writer or self.event_writer).write_event(event)
        self._pending = True

    def _user_writer(self) -> Any:
        writer = self.tb_writer
        if writer is None:
            raise RuntimeError("TensorBoardCallback: the writer is closed; training has already ended.")
        return writer
