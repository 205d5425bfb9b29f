"""The built-in writer: tensorboardX's ``EventsWriter``, run on a thread of its own.

The training thread only appends what a log holds (tags, values, step, time) to a
deque: no lock, no protobuf. The writer's thread imports tensorboardX when it starts
(``import tensorboardX`` also imports comet_ml when that is installed: seconds of
CPU, kept off the training thread), opens the event file, and every
:data:`WRITE_INTERVAL` seconds turns what is pending into tensorboardX ``Event``
records, writes them and hands the file's buffer to the operating system.
:meth:`EventWriter.flush` (``fsync``) and :meth:`EventWriter.close` are requests the
thread serves, so every record is written by that one thread, in order.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from types import ModuleType, SimpleNamespace
from typing import Any

#: Seconds between two write-outs while training runs (a live TensorBoard sees a log within this time).
WRITE_INTERVAL = 0.2
# What tensorboardX's add_scalar does to a tag (its summary._clean_tag), so tags match transformers' runs.
_INVALID_TAG_CHARACTERS = re.compile(r"[^-/\w.]")


def clean_tag(tag: str) -> str:
    """The tag as tensorboardX's ``add_scalar`` writes it: characters other than ``-/_.`` and word ones → ``_``."""
    return _INVALID_TAG_CHARACTERS.sub("_", tag).lstrip("/")


class EventWriter:
    """One event file, written through tensorboardX on the writer's own thread.

    Args:
        logdir: Existing directory of the event file.
        filename_suffix: Appended to tensorboardX's file name (``events.out.tfevents.<time>.<host>``).
        start_step: Step of the run's first records (the checkpoint's step when resuming).
        purge: Start the file with tensorboardX's purge marker at ``start_step + 1``.
        texts: Texts written at ``start_step`` (``args``, ``model_config``).
        hparams: Flat hyperparameters for the HParams view.
        import_module: Imports a module or raises ``ImportError`` with the install hint.
    """

    def __init__(self, logdir: str, filename_suffix: str, *, start_step: int, purge: bool,
                 texts: Mapping[str, str], hparams: Mapping[str, Any],
                 import_module: Callable[[str], ModuleType]) -> None:
        self.logdir = logdir
        self._filename_suffix = filename_suffix
        self._import = import_module
        self._events: Any = None  # tensorboardX's EventsWriter, once the thread opened the file
        self._tbx: Any = None
        # deque.append and popleft are atomic: the training thread appends, the writer's thread pops.
        self._pending: deque[tuple[Any, ...]] = deque([("start", start_step, purge, dict(texts), dict(hparams))])
        self._requests: deque[tuple[str, threading.Event]] = deque()
        self._wake = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="epochal-tensorboard-writer", daemon=True)
        self._thread.start()

    # -- the training thread -------------------------------------------------------------
    def add_scalars(self, tags: tuple[str, ...], values: tuple[float | int, ...], step: int,
                    walltime: float) -> None:
        """Queue one event holding ``tags[i]: values[i]`` at ``step``."""
        if self._error is not None:
            raise self._error
        self._pending.append(("scalars", tags, values, step, walltime))

    def add_texts(self, texts: Mapping[str, str], step: int, walltime: float) -> None:
        """Queue each text (``<tag>/text_summary``, as ``SummaryWriter.add_text``) at ``step``."""
        if self._error is not None:
            raise self._error
        self._pending.append(("texts", dict(texts), step, walltime))

    def write_out(self) -> None:
        """Wait until everything queued so far is handed to the operating system (no ``fsync``)."""
        self._request("write_out")

    def flush(self) -> None:
        """Wait until everything queued so far is written and ``fsync``-ed."""
        self._request("flush")

    def close(self, failed: bool = False) -> None:
        """Write what is queued and the HParams end status (failure when ``failed``), ``fsync``, close."""
        self._request("failed" if failed else "finished")

    def _request(self, action: str) -> None:
        done = threading.Event()
        self._requests.append((action, done))
        self._wake.set()
        # Bounded waits: a thread that died on an error serves no more requests.
        while not done.wait(1.0) and self._thread.is_alive():
            pass
        if self._error is not None:
            raise self._error

    # -- the writer's thread ---------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                self._write_pending()
                while self._requests:
                    action, done = self._requests.popleft()
                    try:
                        self._write_pending()
                        if action == "flush":
                            self._events.flush()  # tensorboardX's flush: the file's buffer, then fsync
                        elif action in ("finished", "failed"):
                            self._write_end(failed=action == "failed")
                            self._events.close()
                            return
                    finally:
                        done.set()
                self._wake.wait(WRITE_INTERVAL)
                self._wake.clear()
        except BaseException as err:  # raised on the training thread by its next call
            self._error = err
            if self._events is not None:
                with contextlib.suppress(Exception):
                    self._events.close()
            while self._requests:
                self._requests.popleft()[1].set()

    def _write_pending(self) -> None:
        pending = self._pending
        if not pending:
            return
        for _ in range(len(pending)):  # what is pending now; later items wait for the next write-out
            item = pending.popleft()
            kind = item[0]
            if kind == "scalars":
                _, tags, values, step, walltime = item
                event = self._tbx.event.Event(wall_time=walltime, step=step)
                add = event.summary.value.add
                for tag, value in zip(tags, values):
                    add(tag=clean_tag(tag), simple_value=value)
                self._events.write_event(event)
            elif kind == "texts":
                _, texts, step, walltime = item
                for tag, text in texts.items():
                    self._write_summary(self._tbx.summary.text(tag, text), step, walltime)
            else:
                self._open(*item[1:])
        # To the operating system; EventsWriter.flush() would also fsync (2-3 ms), kept for checkpoints.
        self._events._py_recordio_writer._writer.flush()

    def _open(self, start_step: int, purge: bool, texts: dict[str, str], hparams: dict[str, Any]) -> None:
        self._tbx = tbx = SimpleNamespace(**{
            name: self._import(f"tensorboardX.{module}")
            for name, module in [("summary", "summary"), ("events", "event_file_writer"), ("event", "proto.event_pb2"),
                                 ("hparams", "proto.plugin_hparams_pb2"), ("api", "proto.api_pb2")]
        })
        self._events = tbx.events.EventsWriter(os.path.join(self.logdir, "events"), self._filename_suffix)
        now = time.time()
        if purge:  # what SummaryWriter(purge_step=start_step + 1) writes: TensorBoard hides later steps of older files
            Event, SessionLog = tbx.event.Event, tbx.event.SessionLog
            self._events.write_event(Event(step=start_step + 1, file_version="brain.Event:2"))
            self._events.write_event(Event(step=start_step + 1, session_log=SessionLog(status=SessionLog.START)))
        for tag, text in texts.items():
            self._write_summary(tbx.summary.text(tag, text), start_step, now)
        experiment, session_start, _ = tbx.summary.hparams(hparams, {})
        self._write_summary(experiment, start_step, now)
        self._write_summary(session_start, start_step, now)

    def _write_end(self, failed: bool) -> None:
        # The record tensorboardX's summary.hparams() builds for a session's end, with this run's status.
        tbx = self._tbx
        status = tbx.api.Status.Value("STATUS_FAILURE" if failed else "STATUS_SUCCESS")
        end = tbx.hparams.SessionEndInfo(status=status, end_time_secs=time.time())
        content = tbx.hparams.HParamsPluginData(session_end_info=end, version=0).SerializeToString()
        summaries = tbx.summary  # it re-exports the Summary protos
        metadata = summaries.SummaryMetadata(
            plugin_data=summaries.SummaryMetadata.PluginData(plugin_name="hparams", content=content))
        value = summaries.Summary.Value(tag="_hparams_/session_end_info", metadata=metadata)
        self._write_summary(summaries.Summary(value=[value]), None, time.time())

    def _write_summary(self, summary: Any, step: int | None, walltime: float) -> None:
        event = self._tbx.event.Event(wall_time=walltime, summary=summary)
        if step:
            event.step = step
        self._events.write_event(event)
