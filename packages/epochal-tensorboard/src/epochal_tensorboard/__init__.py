"""TensorBoard integration for epochal (``report_to="tensorboard"``), written with tensorboardX.

Install::

    pip install epochal-tensorboard

Usage::

    from epochal_core import Trainer, TrainingArguments

    args = TrainingArguments(output_dir="out", report_to=["tensorboard"], logging_steps=10)
    Trainer(model=model, args=args, train_dataset=data).train()
    # tensorboard --logdir out/runs

Or configured (with ``report_to="none"``, so it is not added twice)::

    from epochal_tensorboard import TensorBoardCallback

    args = TrainingArguments(output_dir="out", report_to="none")
    Trainer(model=model, args=args, train_dataset=data, callbacks=[TensorBoardCallback(log_dir="tb/exp1")])
"""

from __future__ import annotations

import itertools
import json
import os
import threading
from typing import TYPE_CHECKING, Any

from epochal_core.integrations import IntegrationCallback, flatten_params, model_config

if TYPE_CHECKING:
    from epochal_core.state import TrainerState
    from epochal_core.training_args import TrainingArguments

__all__ = ["LOGGING_DIR_ENV", "TensorBoardCallback"]

#: Environment variable naming the log directory (transformers v5).
LOGGING_DIR_ENV = "TENSORBOARD_LOGGING_DIR"

# tensorboardX names event files by the second and host only, so two writers opened in one
# directory within the same second would truncate each other's file; a per-process serial
# (zero-padded so files sort in creation order) keeps every file.
_writer_serial = itertools.count()


def _hparam_value(value: Any) -> str | bool | int | float | None:
    # The hparams plugin accepts strings, bools and numbers only; None means "unset".
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    return str(value)


def _session_end(failed: bool) -> Any:
    # tensorboardX's hparams() always reports success; build the record to say how the run ended.
    from tensorboardX.proto.api_pb2 import Status  # type: ignore[import-untyped]
    from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData, SessionEndInfo  # type: ignore[import-untyped]
    from tensorboardX.proto.summary_pb2 import Summary, SummaryMetadata  # type: ignore[import-untyped]

    info = SessionEndInfo(status=Status.Value("STATUS_FAILURE" if failed else "STATUS_SUCCESS"))
    content = HParamsPluginData(session_end_info=info, version=0).SerializeToString()
    metadata = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="hparams", content=content))
    return Summary(value=[Summary.Value(tag="_hparams_/session_end_info", metadata=metadata)])


class TensorBoardCallback(IntegrationCallback):
    """Writes training logs to TensorBoard event files with a tensorboardX ``SummaryWriter``.

    On train begin (world rank zero) it logs the training arguments as the text
    ``args``, the model config (if the model has one) as the text
    ``model_config``, and the flattened hyperparameters for TensorBoard's HParams
    view. Every log becomes ``add_scalar(tag, value, global_step)`` after the
    ``train/``/``eval/``/``test/`` rewriting; strings become ``add_text``; other
    values are dropped with one warning per key. Events reach the disk every
    ``flush_secs``, at every checkpoint, and when training ends or fails (then the
    writer is closed). transformers flushes after every log; an fsync per log
    halved training speed on a small model, so epochal does not.

    The log directory is ``log_dir``, else ``$TENSORBOARD_LOGGING_DIR``, else
    ``args.logging_dir`` (``<output_dir>/runs``), with ``state.trial_name``
    appended during a hyperparameter search. When a run resumes from a
    checkpoint at step ``N``, the writer starts with ``purge_step=N + 1``, so
    TensorBoard discards what a crashed run wrote after that checkpoint and
    every step appears once.

    Args:
        tb_writer: A ``SummaryWriter`` (tensorboardX, or ``torch.utils.tensorboard``)
            to use instead of creating one. It is used as given: no purge on resume,
            and the HParams record is skipped unless it is a tensorboardX writer.
        log_dir: Directory of the event files; overrides the environment and ``args``.
        flush_secs: Seconds between the writer thread's own flushes (tensorboardX's option;
            default 10, so a live TensorBoard stays current).

    Raises:
        ImportError: At the start of training, when tensorboardX is not installed
            (the message gives the install command).
        OSError: When the log directory cannot be created or written; epochal's
            reporter then disables the integration (or re-raises in strict mode).
        RuntimeError: On a log after tensorboardX's writer thread has died.

    """

    name = "tensorboard"
    package = "epochal-tensorboard"
    sdk = "tensorboardX"
    sdk_package = "tensorboardX"

    def __init__(self, tb_writer: Any = None, *, log_dir: str | os.PathLike[str] | None = None,
                 flush_secs: int = 10) -> None:
        super().__init__()
        self.tb_writer = tb_writer
        self.log_dir = os.fspath(log_dir) if log_dir is not None else None
        self.flush_secs = flush_secs
        self._own_writer = tb_writer is None
        self._tbx_writer = False

    def resolve_log_dir(self, args: TrainingArguments, state: TrainerState) -> str:
        """Return the event-file directory: ``log_dir``, ``$TENSORBOARD_LOGGING_DIR``, then ``args.logging_dir``."""
        base = self.log_dir or os.environ.get(LOGGING_DIR_ENV) or args.logging_dir \
            or os.path.join(args.output_dir, "runs")
        base = os.path.expanduser(base)
        return os.path.join(base, state.trial_name) if state.trial_name else base

    # -- IntegrationCallback hooks ---------------------------------------------------
    def setup(self, args: TrainingArguments, state: TrainerState, model: Any, **kwargs: Any) -> None:
        """Create the writer (purging steps after the checkpoint on resume) and log the run's configuration."""
        tbx = self.import_sdk()
        if self._own_writer:
            logdir = self.resolve_log_dir(args, state)
            self.tb_writer = tbx.SummaryWriter(
                logdir=logdir,
                # A run starting past step 0 resumes a checkpoint: hide what a crash left after it.
                purge_step=state.global_step + 1 if state.global_step > 0 else None,
                flush_secs=self.flush_secs,
                filename_suffix=f".{os.getpid()}.{next(_writer_serial):06d}",
            )
            self.run_id = logdir
        writer = self.tb_writer
        # At the start step: a resumed run adds its own record next to the first one.
        step = state.global_step
        writer.add_text("args", args.to_json_string(), step)
        to_json = getattr(getattr(model, "config", None), "to_json_string", None)
        if callable(to_json):
            writer.add_text("model_config", to_json(), step)
        elif (config_dict := model_config(model)) is not None:
            writer.add_text("model_config", json.dumps(config_dict, indent=2, sort_keys=True, default=str), step)
        # HParams records are tensorboardX protos: only its own writer can take them.
        self._tbx_writer = isinstance(writer, tbx.SummaryWriter)
        if self._tbx_writer:
            from tensorboardX.summary import hparams  # type: ignore[import-untyped]

            params = {k: _hparam_value(v) for k, v in flatten_params(self.hyperparameters(args, model)).items()}
            _, session_start, _ = hparams(params, {})
            writer._get_file_writer().add_summary(session_start, step)
        writer.flush()

    def log_metrics(self, metrics: dict[str, float | int], step: int, state: TrainerState) -> None:
        """Write every metric at ``step`` as one event (flushed by the writer's timer, checkpoints and the end)."""
        self._write(metrics, {}, step)

    def finish(self, status: str) -> None:
        """Record the end status for the HParams view (``"failed"`` → failure), flush and close the writer."""
        writer = self.tb_writer
        if writer is None:
            return
        try:
            if self._tbx_writer and self._writer_alive():
                writer._get_file_writer().add_summary(_session_end(failed=status != "finished"))
        finally:
            if self._writer_alive():
                writer.close()
            if self._own_writer:
                self.tb_writer = None

    def log_checkpoint(self, path: str, args: TrainingArguments, state: TrainerState) -> None:
        """Flush at each checkpoint, so the events it covers are on disk (a resume purges what follows)."""
        if self.tb_writer is not None and self._writer_alive():
            self.tb_writer.flush()

    def log_texts(self, texts: dict[str, str], step: int, state: TrainerState) -> None:
        """``add_text`` each string at ``step`` (as transformers does)."""
        self._write({}, texts, step)

    # -- internals --------------------------------------------------------------------
    def _write(self, metrics: dict[str, float | int], texts: dict[str, str], step: int) -> None:
        writer = self.tb_writer
        if writer is None:
            raise RuntimeError("TensorBoardCallback: the writer is closed; training has already ended.")
        if not self._writer_alive():
            # Adding events now would fill its queue and then block this thread (and so training) for good.
            raise RuntimeError(
                "TensorBoardCallback: tensorboardX's event writer thread has died (its traceback was printed), "
                "so nothing more can be written."
            )
        if metrics and self._tbx_writer:
            # One event holding every scalar of the log, instead of one event (and one
            # queue hand-off to the writer thread) per scalar: the same records for readers.
            from tensorboardX.proto.summary_pb2 import Summary
            from tensorboardX.summary import _clean_tag  # type: ignore[import-untyped]

            values = [Summary.Value(tag=_clean_tag(tag), simple_value=float(v)) for tag, v in metrics.items()]
            writer._get_file_writer().add_summary(Summary(value=values), step)
        else:
            for tag, value in metrics.items():
                writer.add_scalar(tag, float(value), step)
        for tag, text in texts.items():
            writer.add_text(tag, text, step)

    def _writer_alive(self) -> bool:
        # tensorboardX writes from a thread of its own; when that thread dies (disk full, I/O error),
        # add_* calls block once its small queue is full, and close() blocks too.
        file_writer = getattr(self.tb_writer, "file_writer", None)
        worker = getattr(getattr(file_writer, "event_writer", None), "_worker", None)
        return not isinstance(worker, threading.Thread) or worker.is_alive()
