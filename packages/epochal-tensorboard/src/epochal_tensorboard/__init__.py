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
the native ``crc32c`` package) are tensorboardX's. This package keeps only what is
epochal's: the names (transformers' ``TensorBoardCallback`` tags), the purge
marker that hides a crashed run's steps on resume, and where the writing happens
(see ``_writer``). tensorboardX's ``SummaryWriter`` hands every event to a
``multiprocessing.Queue`` read by a writer thread; here a log costs the training
thread one append to a deque, and a thread of the writer's own builds the events
and writes them through tensorboardX's synchronous ``EventsWriter``.

``import tensorboardX`` also imports comet_ml when that is installed (seconds of
CPU, and comet's import hooks): it happens on the writer's thread, never on the
training thread's start-up path, and constructing the callback imports nothing.
"""

from __future__ import annotations

import importlib.util
import inspect
import itertools
import json
import os
import time
from typing import TYPE_CHECKING, Any

from epochal_core import IntegrationCallback
from epochal_core.integrations import flatten_params, model_config

from ._writer import EventWriter

if TYPE_CHECKING:
    from epochal_core.state import TrainerState
    from epochal_core.training_args import TrainingArguments

__all__ = ["TensorBoardCallback"]

#: Environment variable naming the log directory (transformers v5).
LOGGING_DIR_ENV = "TENSORBOARD_LOGGING_DIR"

# tensorboardX names event files by the second they were opened and opens them with "wb": a
# per-process serial in the suffix keeps two writers opened within one second from sharing a file.
_writer_serial = itertools.count()


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

    With the built-in writer a log costs the training thread one append to a
    deque (the callback sets ``run_inline``); the writer's own thread writes the
    events through tensorboardX's ``EventsWriter`` and hands them to the operating
    system every 0.2 s (a live TensorBoard sees a log within that time), and they
    are ``fsync``-ed at every checkpoint and at the end. A ``tb_writer`` you pass
    runs on epochal's reporter thread instead, like other integrations.

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
        event_writer: The built-in writer (an ``EventWriter`` around tensorboardX's
            ``EventsWriter``) from train begin to train end, or ``None``.

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
        self.event_writer: EventWriter | None = None
        # The built-in writer's log is an append (its thread does the rest): cheaper on the training
        # thread than the reporter's hand-off. A writer passed in may do more per call: it is queued.
        self.run_inline = tb_writer is None
        self._walltime_kwarg = False  # whether tb_writer's add_scalar/add_text take walltime=

    def resolve_log_dir(self, args: TrainingArguments, state: TrainerState) -> str:
        """Return the event-file directory: ``log_dir``, ``$TENSORBOARD_LOGGING_DIR``, then ``args.logging_dir``."""
        base = self.log_dir or os.environ.get(LOGGING_DIR_ENV) or args.logging_dir \
            or os.path.join(args.output_dir, "runs")
        base = os.path.expanduser(base)
        return os.path.join(base, state.trial_name) if state.trial_name else base

    # -- IntegrationCallback hooks ---------------------------------------------------
    def setup(self, args: TrainingArguments, state: TrainerState, model: Any, **kwargs: Any) -> None:
        """Start the writer (with a purge marker on resume) and log the run's configuration."""
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
        if importlib.util.find_spec(self.sdk) is None:
            self.import_sdk()  # raises ImportError with the install command
        logdir = self.resolve_log_dir(args, state)
        os.makedirs(logdir, exist_ok=True)  # an unusable directory fails here, on train begin
        self.run_id = logdir
        hparams = {k: _hparam_value(v) for k, v in flatten_params(self.hyperparameters(args, model)).items()}
        # The writer's thread imports tensorboardX (and comet_ml with it, when installed) and opens the file.
        self.event_writer = EventWriter(
            logdir, f".{os.getpid()}.{next(_writer_serial):06d}", start_step=step, purge=step > 0, texts=texts,
            hparams=hparams, import_module=self.import_sdk,
        )

    def log_metrics(self, metrics: dict[str, float | int], step: int, state: TrainerState) -> None:
        """Write every metric at ``step`` (one event with the built-in writer)."""
        if self.event_writer is not None:
            self.event_writer.add_scalars(tuple(metrics), tuple(metrics.values()), step, time.time())
            return
        writer = self._user_writer()
        stamp = {"walltime": self.event_time} if self._walltime_kwarg else {}
        for tag, value in metrics.items():
            writer.add_scalar(tag, float(value), step, **stamp)

    def log_texts(self, texts: dict[str, str], step: int, state: TrainerState) -> None:
        """``add_text`` each string at ``step`` (tag ``<name>/text_summary``, as transformers' writer does)."""
        if self.event_writer is not None:
            self.event_writer.add_texts(texts, step, time.time())
            return
        writer = self._user_writer()
        stamp = {"walltime": self.event_time} if self._walltime_kwarg else {}
        for tag, value in texts.items():
            writer.add_text(tag, value, step, **stamp)

    def log_checkpoint(self, path: str, args: TrainingArguments, state: TrainerState) -> None:
        """``fsync`` at each checkpoint, so the events it covers are on disk (a resume purges what follows)."""
        if self.event_writer is not None:
            self.event_writer.flush()
        elif self.tb_writer is not None:
            self.tb_writer.flush()

    def finish(self, status: str) -> None:
        """Record the end status for the HParams view (``"failed"`` → failure), then flush and close."""
        if self.tb_writer is not None:
            self.tb_writer.close()
            return
        writer, self.event_writer = self.event_writer, None
        if writer is not None:
            writer.close(failed=status != "finished")

    def log_location(self) -> str | None:
        """The event-file folder (open it with ``tensorboard --logdir <folder>``)."""
        if self.tb_writer is not None:
            get_logdir = getattr(self.tb_writer, "get_logdir", None)
            return os.path.abspath(get_logdir()) if callable(get_logdir) else None
        return os.path.abspath(self.run_id) if self.run_id else None

    def _user_writer(self) -> Any:
        writer = self.tb_writer
        if writer is None:
            raise RuntimeError("TensorBoardCallback: the writer is closed; training has already ended.")
        return writer
