"""TensorBoard integration for epochal (``report_to="tensorboard"``), with a built-in event-file writer.

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

The event-file format (TFRecord framing of ``tensorflow.Event`` protocol buffers)
is small and stable, so this module writes it itself: scalars, text, the HParams
records and the purge marker that hides a crashed run's steps on resume. Going
through tensorboardX instead cost an import of several seconds (it also imports
comet_ml when that is installed, with comet's global hooks) and, per log, a
pickled multiprocessing queue, two more threads and a slower checksum. Any
``SummaryWriter`` (tensorboardX or ``torch.utils.tensorboard``) can still be
passed as ``tb_writer`` for histograms, images and the rest.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import json
import logging
import math
import operator
import os
import re
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from epochal_core.integrations import IntegrationCallback, flatten_params, model_config

if TYPE_CHECKING:
    from epochal_core.state import TrainerState
    from epochal_core.training_args import TrainingArguments

# The user-facing names (what the meta-package `epochal` re-exports). FLUSH_INTERVAL, LOGGING_DIR_ENV,
# clean_tag and crc32c are documented module attributes too, importable from here only.
__all__ = ["EventFileWriter", "TensorBoardCallback"]

logger = logging.getLogger(__name__)

#: Environment variable naming the log directory (transformers v5).
LOGGING_DIR_ENV = "TENSORBOARD_LOGGING_DIR"

# Two writers opened in one directory within the same second must not share a file name:
# a per-process serial (zero-padded so files sort in creation order) keeps them apart.
_writer_serial = itertools.count()


# -- CRC32C (Castagnoli), as TFRecord framing needs ------------------------------------------------

@functools.cache
def _crc_tables() -> tuple[list[int], ...]:
    # Slicing-by-8 tables, built on first use (a few ms) so importing the module stays free.
    base = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        base.append(crc)
    tables = [base]
    for _ in range(7):
        prev = tables[-1]
        tables.append([(prev[i] >> 8) ^ base[prev[i] & 0xFF] for i in range(256)])
    return tuple(tables)


def crc32c(data: bytes) -> int:
    """CRC-32C of ``data`` (pure Python, 8 bytes per step; ``crc32c(b"123456789") == 0xE3069283``)."""
    t0, t1, t2, t3, t4, t5, t6, t7 = _crc_tables()
    crc = 0xFFFFFFFF
    words = len(data) // 8
    it = iter(struct.unpack_from(f"<{2 * words}I", data))
    for lo, hi in zip(it, it):
        lo ^= crc
        crc = (t7[lo & 0xFF] ^ t6[(lo >> 8) & 0xFF] ^ t5[(lo >> 16) & 0xFF] ^ t4[lo >> 24]
               ^ t3[hi & 0xFF] ^ t2[(hi >> 8) & 0xFF] ^ t1[(hi >> 16) & 0xFF] ^ t0[hi >> 24])
    for byte in data[8 * words:]:
        crc = t0[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _mask(crc: int) -> bytes:
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def _masked_crc(data: bytes) -> bytes:
    return _mask(crc32c(data))


# _DISTANCE_TABLES[d][b]: what byte ``b`` followed by ``d`` more bytes adds to the CRC register (the CRC
# is linear in the data, so the CRC of a message that differs from a known one in a few bytes
# is the known CRC XOR these contributions). Grown on demand, up to _MAX_TEMPLATED.
_DISTANCE_TABLES: list[list[int]] = []
_DISTANCE_LOCK = threading.Lock()
_MAX_TEMPLATED = 256


def _distance_tables(longest: int) -> list[list[int]]:
    with _DISTANCE_LOCK:
        t0 = _crc_tables()[0]
        if not _DISTANCE_TABLES:
            _DISTANCE_TABLES.append(list(t0))
        while len(_DISTANCE_TABLES) <= longest:
            _DISTANCE_TABLES.append([(x >> 8) ^ t0[x & 0xFF] for x in _DISTANCE_TABLES[-1]])
        return _DISTANCE_TABLES


class _ScalarLayout:
    """One shape of scalar event (its tags, the width of its step), encoded a run of events at a time.

    An event of this shape is ``0x09 <wall time> [0x10 <step>] 0x2a <length> (<tag head> <value>)...``:
    only the wall time, the step and the values change from log to log. A run of ``n`` events of
    one shape is encoded by C-level operations over the run, not per event: the records are the
    template repeated ``n`` times, the changing bytes of all events are packed by one ``struct``
    call and copied in column by column (one extended-slice assignment per byte position), and
    the CRC of every record is the template's XOR one table lookup per changing byte, computed
    column by column (with ``map``, or with torch operations for runs of 24 events or more).
    A log then costs the training thread an append to the writer's queue.
    """

    __slots__ = ("_torch_tables", "changing_format", "columns", "crc_offset", "fields", "record_template", "size",
                 "tables", "template_crc")

    def __init__(self, heads: list[bytes], step_width: int) -> None:
        summary_length = sum(len(head) + 4 for head in heads)
        summary_prefix = b"\x2a" + _varint(summary_length)
        # The event with every changing byte zero, and where those bytes are.
        step_part = b"\x10" + bytes(step_width) if step_width else b""
        template = b"\x09" + bytes(8) + step_part + summary_prefix + b"".join(head + bytes(4) for head in heads)
        # The changing bytes of one event, as packed: the values, the step, the wall time.
        positions: list[int] = []
        offset = 9 + len(step_part) + len(summary_prefix)
        for head in heads:
            offset += len(head)
            positions += range(offset, offset + 4)
            offset += 4
        positions += [*range(10, 10 + step_width), *range(1, 9)]
        tables = _distance_tables(len(template))
        #: Per changing byte: its table of CRC contributions.
        self.tables = [tables[len(template) - 1 - position] for position in positions]
        self.template_crc = crc32c(template)
        #: ``struct`` format of one event's changing bytes, and their count.
        self.changing_format = f"{len(heads)}f{step_width}sd"
        self.size = len(positions)
        #: Items one event adds to a run: its values, its step bytes, its wall time.
        self.fields = len(heads) + 2
        header = _record_header(len(template))
        self.record_template = header + template + bytes(4)
        self.columns = [len(header) + position for position in positions]
        self.crc_offset = len(header) + len(template)
        self._torch_tables: Any = None

    def encode(self, run: list[Any]) -> bytearray:
        """The records of a run: ``run`` holds each event's values, step bytes and wall time, in a row."""
        count = len(run) // self.fields
        packer = _run_packer(self.changing_format, count)
        try:
            changing = packer.pack(*run)
        except OverflowError:
            run = [value if type(value) is bytes else _float32(value) for value in run]
            changing = packer.pack(*run)
        size, stride = self.size, len(self.record_template)
        records = bytearray(self.record_template * count)
        for index, column in enumerate(self.columns):
            records[column::stride] = changing[index::size]
        packed = self._masked_crcs_tensor(changing, count) if count >= _TENSOR_RUN else \
            self._masked_crcs(changing, count)
        for byte in range(4):
            records[self.crc_offset + byte::stride] = packed[byte::4]
        return records

    def _masked_crcs(self, changing: bytes, count: int) -> bytes:
        # Column by column: each map runs over the whole run in C.
        size = self.size
        crcs = [self.template_crc] * count
        for index, table in enumerate(self.tables):
            crcs = list(map(operator.xor, crcs, map(table.__getitem__, changing[index::size])))
        # The TFRecord mask: (crc >> 15 | crc << 17) + 0xA282EAD8, on 32 bits.
        rotated = map(operator.or_, map(operator.rshift, crcs, itertools.repeat(15)),
                      map(operator.lshift, crcs, itertools.repeat(17)))
        masked = map(operator.and_, map(operator.add, rotated, itertools.repeat(0xA282EAD8)),
                     itertools.repeat(0xFFFFFFFF))
        return struct.pack(f"<{count}I", *masked)

    def _masked_crcs_tensor(self, changing: bytes, count: int) -> bytes:
        # The same with torch (a dependency of epochal-core): a few dozen whole-run operations
        # instead of two Python-level calls per changing byte, and the GIL released while they run.
        import torch

        tables = self._torch_tables
        if tables is None:
            flat = torch.tensor(self.tables, dtype=torch.int64).reshape(-1)
            offsets = torch.arange(self.size, dtype=torch.int64) * 256
            tables = self._torch_tables = (flat, offsets)
        flat, offsets = tables
        data = torch.frombuffer(bytearray(changing), dtype=torch.uint8).view(count, self.size)
        parts = flat[data.long() + offsets]  # [count, size]: each changing byte's contribution
        while parts.shape[1] > 1:  # XOR-reduce the columns, halving
            half = parts.shape[1] // 2
            folded = parts[:, :half] ^ parts[:, half:2 * half]
            if parts.shape[1] % 2:
                folded[:, 0] ^= parts[:, -1]
            parts = folded
        crc = parts[:, 0] ^ self.template_crc
        masked = (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
        # Little-endian int64s: the low 4 bytes of each are the 32-bit value.
        return bytes(masked.view(torch.uint8).view(count, 8)[:, :4].reshape(-1).tolist())


@functools.lru_cache(maxsize=256)
def _run_packer(event_format: str, count: int) -> struct.Struct:
    # Run lengths repeat (a batch interval's worth of logs): each format is compiled once.
    return struct.Struct("<" + event_format * count)


@functools.lru_cache(maxsize=4096)
def _record_header(length: int) -> bytes:
    # Lengths repeat from log to log: their framing is computed once.
    header = struct.pack("<Q", length)
    return header + _masked_crc(header)


def _record(data: bytes) -> bytes:
    """One TFRecord: length, its masked CRC, the data, the data's masked CRC."""
    return _record_header(len(data)) + data + _masked_crc(data)


# -- protocol-buffer encoding of the few messages written (field numbers from TensorFlow's protos) ---

def _varint(value: int) -> bytes:
    value &= 0xFFFFFFFFFFFFFFFF  # negative int64 as protobuf does: ten bytes of two's complement
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _delimited(key: int, payload: bytes) -> bytes:
    return bytes((key,)) + _varint(len(payload)) + payload


#: Runs at least this long get their CRCs from torch operations over the whole run.
_TENSOR_RUN = 24
#: Pending events that trigger a write-out on their own, whatever the interval.
_PENDING_LIMIT = 8192
#: Default seconds between two background write-outs of an EventFileWriter (a live TensorBoard
#: sees a log within this time).
FLUSH_INTERVAL = 0.2
_DOUBLE = struct.Struct("<d").pack
_FLOAT32_MAX = 3.4028234663852886e38
_INVALID_TAG_CHARACTERS = re.compile(r"[^-/\w.]")

# Event: wall_time=1 (double), step=2 (int64), file_version=3, summary=5, session_log=7.
# Summary: value=1. Value: tag=1, simple_value=2 (float), tensor=8, metadata=9.
# SummaryMetadata: plugin_data=1 {plugin_name=1, content=2}.
_SESSION_LOG_START = b"\x08\x01"  # SessionLog{status: START}
_STATUS_SUCCESS, _STATUS_FAILURE = 1, 2  # tensorboard.hparams.Status


def _float32(value: float) -> float:
    # Event files store float32: a value beyond its range is shown as infinite (what protobuf
    # does), instead of struct's OverflowError disabling the integration when a loss diverges.
    try:
        value = float(value)
    except OverflowError:  # an int beyond even a double's range
        return math.inf if value > 0 else -math.inf
    return value if abs(value) <= _FLOAT32_MAX or value != value else math.copysign(math.inf, value)


def _pack_floats(values: list[float], count: int) -> bytes:
    try:
        return struct.pack(f"<{count}f", *values)
    except OverflowError:
        return struct.pack(f"<{count}f", *map(_float32, values))


def clean_tag(tag: str) -> str:
    """The tag as TensorBoard accepts it: characters other than ``-/_.`` and word characters become ``_``."""
    return _INVALID_TAG_CHARACTERS.sub("_", tag).lstrip("/")


def _event(step: int, wall_time: float, body: bytes) -> bytes:
    return b"\x09" + _DOUBLE(wall_time) + (b"\x10" + _varint(step) if step else b"") + body


def _plugin_metadata(plugin: str, content: bytes = b"") -> bytes:
    data = _delimited(0x0A, plugin.encode()) + (_delimited(0x12, content) if content else b"")
    return _delimited(0x4A, _delimited(0x0A, data))


def _text_value(tag: str, text: str) -> bytes:
    # TensorProto{dtype: DT_STRING (7), tensor_shape: {dim: [{size: 1}]}, string_val: [text]}
    tensor = b"\x08\x07" + _delimited(0x12, _delimited(0x12, b"\x08\x01")) + _delimited(0x42, text.encode())
    body = _delimited(0x0A, f"{clean_tag(tag)}/text_summary".encode()) + _plugin_metadata("text") \
        + _delimited(0x42, tensor)
    return _delimited(0x0A, body)


def _hparam(value: Any) -> bytes | None:
    # google.protobuf.Value: number_value=2 (double), string_value=3, bool_value=4.
    if value is None:
        return None
    if isinstance(value, bool):
        return b"\x20" + (b"\x01" if value else b"\x00")
    if isinstance(value, (int, float)):
        return b"\x11" + _DOUBLE(float(value))
    return _delimited(0x1A, str(value).encode())


def _hparams_value(tag: str, plugin_data: bytes) -> bytes:
    body = _delimited(0x0A, tag.encode()) + _plugin_metadata("hparams", plugin_data)
    return _delimited(0x0A, body)


def _session_start(hparams: Mapping[str, Any], start_time: float) -> bytes:
    entries = b""
    for key, value in hparams.items():
        encoded = _hparam(value)
        if encoded is not None:
            entries += _delimited(0x0A, _delimited(0x0A, key.encode()) + _delimited(0x12, encoded))
    info = entries + b"\x29" + _DOUBLE(start_time)  # SessionStartInfo{hparams=1, start_time_secs=5}
    return _hparams_value("_hparams_/session_start_info", _delimited(0x1A, info))  # HParamsPluginData=3


def _session_end(status: int, end_time: float) -> bytes:
    info = b"\x08" + _varint(status) + b"\x11" + _DOUBLE(end_time)  # SessionEndInfo{status=1, end_time_secs=2}
    return _hparams_value("_hparams_/session_end_info", _delimited(0x22, info))  # HParamsPluginData=4


# -- the writer --------------------------------------------------------------------------------------

class EventFileWriter:
    """Writes one TensorBoard event file: scalars, text and HParams records.

    Its ``add_scalar``/``add_text``/``flush``/``close`` take the arguments of
    ``SummaryWriter``'s methods of the same names, so code written against
    ``callback.tb_writer`` keeps working for those. An event is kept in the
    process (a scalar event as its values, to be encoded with its run) until a
    write-out: by a background thread every ``flush_interval`` seconds while
    events are pending, by :meth:`write_out`, :meth:`flush` (which also
    ``fsync``-s: at checkpoints) or :meth:`close`, or when 8192 events are
    pending. Safe to use from several threads. An error of a background
    write-out (a full disk) is raised by the next call.

    Args:
        logdir: Directory of the event file (created if missing).
        purge_step: When given, TensorBoard discards events of this run with a
            step at or above it that were written before this file (what a
            crashed run wrote after the checkpoint now resumed).
        filename_suffix: Appended to the file name.
        flush_interval: Seconds between background write-outs; ``None`` writes
            only on :meth:`write_out`, :meth:`flush`, :meth:`close` or 8192 events.

    Raises:
        OSError: When the directory or the file cannot be created.
        ValueError: For a ``flush_interval`` that is not a positive number or ``None``.
    """

    def __init__(self, logdir: str | os.PathLike[str], *, purge_step: int | None = None,
                 filename_suffix: str = "", flush_interval: float | None = FLUSH_INTERVAL) -> None:
        if flush_interval is not None and not flush_interval > 0:
            raise ValueError(
                f"EventFileWriter(flush_interval={flush_interval!r}): use a number of seconds > 0, "
                "or None to write only on write_out/flush/close."
            )
        self.logdir = os.fspath(logdir)
        os.makedirs(self.logdir, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}{filename_suffix}"
        #: Path of the event file.
        self.path = os.path.join(self.logdir, name)
        # O_EXCL: never truncate another writer's file.
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        # _io_lock keeps encoding and writing in file order (held by a write-out, never by an append).
        self._io_lock = threading.RLock()
        self._buffer = bytearray()
        # Events not yet encoded, in order: (layout, values, step bytes, wall time) for a scalar event,
        # (None, record) for a record already encoded. deque.append is atomic, so adding an event
        # takes no lock (a log pays for no lock code); a write-out pops what it finds.
        self._events: deque[tuple[Any, ...]] = deque()
        self._flush_interval = flush_interval
        self._flusher: threading.Thread | None = None
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._scalar_heads: dict[str, bytes] = {}
        self._layouts: dict[tuple[tuple[str, ...], int], _ScalarLayout] = {}
        now = time.time()
        self._write(_event(0, now, _delimited(0x1A, b"brain.Event:2")))
        if purge_step is not None:
            self._write(_event(purge_step, now, _delimited(0x3A, _SESSION_LOG_START)))
        self.write_out()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._fd is None

    def _write(self, event: bytes) -> None:
        self._add((None, _record(event)))

    def _check_error(self) -> None:
        if self._error is not None:
            raise self._error  # the background write-out failed: the caller reports it

    def _add(self, item: tuple[Any, ...]) -> None:
        # One pending event (see _events); starts the flusher; writes out when too many are pending.
        self._check_error()
        if self._fd is None:
            raise ValueError(f"EventFileWriter: {self.path} is closed; nothing more can be written to it.")
        events = self._events
        events.append(item)
        if self._flusher is None and self._flush_interval is not None:
            self._flusher = threading.Thread(target=self._flush_loop, name="epochal-tensorboard-flush", daemon=True)
            self._flusher.start()
        if len(events) >= _PENDING_LIMIT:
            self.write_out()

    def _flush_loop(self) -> None:
        assert self._flush_interval is not None
        while not self._stop.wait(self._flush_interval):
            if self._events:
                try:
                    self.write_out()
                except Exception as err:  # reported by the next call on the training thread
                    self._error = err
                    return

    def write_out(self) -> None:
        """Encode the pending events and hand them to the operating system (one ``write``).

        A background thread does this every ``flush_interval`` seconds while events are pending.
        """
        with self._io_lock:
            fd = self._fd
            if fd is None:
                return
            buffer, pop = self._buffer, self._events.popleft
            # Consecutive scalar events of one layout are encoded together (see _ScalarLayout).
            layout: _ScalarLayout | None = None
            run: list[Any] = []
            for _ in range(len(self._events)):  # what is pending now; later events wait for the next write-out
                item = pop()
                if item[0] is not layout:
                    if run:
                        buffer += layout.encode(run)  # type: ignore[union-attr]  # a run has a layout
                        run = []
                    layout = item[0]
                if layout is None:
                    buffer += item[1]
                else:
                    run.extend(item[1])
                    run.append(item[2])
                    run.append(item[3])
            if run:
                buffer += layout.encode(run)  # type: ignore[union-attr]
            # A failed write keeps what was not written, to retry at the next write-out.
            while buffer:
                written = os.write(fd, buffer)
                del buffer[:written]

    def _scalar_head(self, tag: str) -> bytes:
        # Summary.Value{tag, simple_value}: everything but the 4 value bytes, once per tag.
        head = self._scalar_heads.get(tag)
        if head is None:
            inner = _delimited(0x0A, clean_tag(tag).encode()) + b"\x15"
            head = self._scalar_heads[tag] = b"\x0a" + _varint(len(inner) + 4) + inner
        return head

    def write_scalars(self, values: Mapping[str, float], global_step: int | None = None,
                      walltime: float | None = None) -> None:
        """Write every ``tag: value`` as one event at ``global_step`` (what one log becomes)."""
        self._append_scalars(tuple(values), values.values(), global_step, walltime)

    def _append_scalars(self, tags: tuple[str, ...], values: Iterable[float], global_step: int | None,
                        walltime: float | None) -> None:
        # write_scalars with the tags and the values apart (TensorBoardCallback's log builds no dict).
        step = global_step or 0
        # The step's varint, inline for the common widths (this runs for every log).
        if 0 <= step < 0x80:
            step_bytes = bytes((step,)) if step else b""
        elif 0 < step < 0x4000:
            step_bytes = bytes(((step & 0x7F) | 0x80, step >> 7))
        else:
            step_bytes = _varint(step)
        key = (tags, len(step_bytes))
        layout = self._layouts.get(key)
        if layout is None:
            heads = [self._scalar_head(tag) for tag in tags]
            if 12 + len(step_bytes) + sum(len(head) + 4 for head in heads) > _MAX_TEMPLATED:
                packed = _pack_floats(list(values), len(heads))
                summary = b"".join([head + packed[4 * i:4 * i + 4] for i, head in enumerate(heads)])
                self._write(_event(step, walltime or time.time(), _delimited(0x2A, summary)))
                return
            layout = self._layouts[key] = _ScalarLayout(heads, len(step_bytes))
        # Encoded with the rest of its run at a write-out (see _ScalarLayout).
        self._add((layout, tuple(values), step_bytes, walltime or time.time()))

    def add_scalar(self, tag: str, scalar_value: float, global_step: int | None = None,
                   walltime: float | None = None) -> None:
        """Write one scalar (``SummaryWriter.add_scalar``)."""
        self.write_scalars({tag: scalar_value}, global_step, walltime)

    def add_text(self, tag: str, text_string: str, global_step: int | None = None,
                 walltime: float | None = None) -> None:
        """Write ``text_string`` for TensorBoard's Text tab, under ``<tag>/text_summary`` (as SummaryWriter does)."""
        self._write(_event(global_step or 0, walltime or time.time(), _delimited(0x2A, _text_value(tag, text_string))))

    def add_hparams_start(self, hparams: Mapping[str, Any], global_step: int | None = None) -> None:
        """Write the HParams session start with these flat hyperparameters (``None`` values are left out)."""
        now = time.time()
        self._write(_event(global_step or 0, now, _delimited(0x2A, _session_start(hparams, now))))

    def add_hparams_end(self, failed: bool, global_step: int | None = None) -> None:
        """Write the HParams session end: success, or failure when ``failed``."""
        now = time.time()
        status = _STATUS_FAILURE if failed else _STATUS_SUCCESS
        self._write(_event(global_step or 0, now, _delimited(0x2A, _session_end(status, now))))

    def flush(self) -> None:
        """Write out the pending events and make everything written so far durable (``fsync``)."""
        self._check_error()
        with self._io_lock:
            self.write_out()
            if self._fd is not None:
                os.fsync(self._fd)

    def close(self) -> None:
        """Write out, ``fsync`` and close the file; later writes raise ``ValueError``. Closing twice does nothing.

        Raises the error of a failed background write-out, if one happened (the file is closed anyway).
        """
        self._stop.set()
        flusher = self._flusher
        if flusher is not None and flusher is not threading.current_thread():
            flusher.join()
        with self._io_lock:
            fd = self._fd
            if fd is None:
                return
            try:
                self._check_error()
                self.write_out()
                os.fsync(fd)
            finally:
                self._fd = None
                self._events.clear()
                self._buffer.clear()
                os.close(fd)


@functools.lru_cache(maxsize=64)
def _takes_walltime(writer_class: type[Any], method: str) -> bool:
    # SummaryWriter's methods take ``walltime``; a minimal writer passed as tb_writer may not.
    try:
        parameters = inspect.signature(getattr(writer_class, method)).parameters.values()
    except (AttributeError, TypeError, ValueError):
        return False
    return any(p.name == "walltime" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


# -- the callback --------------------------------------------------------------------------------------

class TensorBoardCallback(IntegrationCallback):
    """Writes training logs to TensorBoard event files.

    On train begin (world rank zero) it logs the training arguments as the text
    ``args``, the model config (if the model has one) as the text
    ``model_config``, and the flattened hyperparameters for TensorBoard's HParams
    view. Every log becomes one event holding its scalars at ``global_step``,
    after the ``train/``/``eval/``/``test/`` rewriting; strings become text;
    other values are dropped with one warning per key. With the built-in writer
    the events run on the training thread, where a log costs an append to the
    writer's queue; the writer's own thread encodes and writes them at most
    :data:`FLUSH_INTERVAL` seconds later, and they are ``fsync``-ed at every
    checkpoint and at the end. The run's end status (success or failure) goes to
    the HParams view.

    The log directory is ``log_dir``, else ``$TENSORBOARD_LOGGING_DIR``, else
    ``args.logging_dir`` (``<output_dir>/runs``), with ``state.trial_name``
    appended during a hyperparameter search. When a run resumes from a
    checkpoint at step ``N``, the new file starts with a purge marker at
    ``N + 1``, so TensorBoard discards what a crashed run wrote after that
    checkpoint and every step appears once.

    Args:
        tb_writer: A ``SummaryWriter`` (tensorboardX, ``torch.utils.tensorboard``, or
            anything with their ``add_scalar``/``add_text``/``flush``/``close``) to use
            instead of the built-in writer. It is used as given: no purge on resume and
            no HParams records; it is closed at train end.
        log_dir: Directory of the event files; overrides the environment and ``args``.

    Attributes:
        tb_writer: The writer in use: the one passed in, or, from train begin to
            train end, the built-in :class:`EventFileWriter`.

    Raises:
        OSError: When the log directory cannot be created or written; epochal's
            reporter then disables the integration (or re-raises in strict mode).
    """

    name = "tensorboard"
    package = "epochal-tensorboard"
    # No SDK: the event-file format is written by this module (see the module docstring).
    sdk = ""
    sdk_package = ""

    def __init__(self, tb_writer: Any = None, *, log_dir: str | os.PathLike[str] | None = None) -> None:
        super().__init__()
        self.tb_writer = tb_writer
        self.log_dir = os.fspath(log_dir) if log_dir is not None else None
        self._own_writer = tb_writer is None
        # The built-in writer's log is an append to its queue (its flusher thread encodes and writes):
        # cheaper on the training thread than a hand-off to the reporter's. A writer passed in
        # may do more per call, so it runs on the reporter's thread.
        self.run_inline = self._own_writer
        # A subclass that overrides log_metrics gets every log there.
        self._values_direct = type(self).log_metrics is TensorBoardCallback.log_metrics

    def resolve_log_dir(self, args: TrainingArguments, state: TrainerState) -> str:
        """Return the event-file directory: ``log_dir``, ``$TENSORBOARD_LOGGING_DIR``, then ``args.logging_dir``."""
        base = self.log_dir or os.environ.get(LOGGING_DIR_ENV) or args.logging_dir \
            or os.path.join(args.output_dir, "runs")
        base = os.path.expanduser(base)
        return os.path.join(base, state.trial_name) if state.trial_name else base

    # -- IntegrationCallback hooks ---------------------------------------------------
    def setup(self, args: TrainingArguments, state: TrainerState, model: Any, **kwargs: Any) -> None:
        """Open the event file (with a purge marker on resume) and log the run's configuration."""
        if self._own_writer:
            logdir = self.resolve_log_dir(args, state)
            self.tb_writer = EventFileWriter(
                logdir,
                # A run starting past step 0 resumes a checkpoint: hide what a crash left after it.
                purge_step=state.global_step + 1 if state.global_step > 0 else None,
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
        if isinstance(writer, EventFileWriter):
            writer.add_hparams_start(flatten_params(self.hyperparameters(args, model)), step)
        writer.flush()

    def log_values(self, names: tuple[str, ...], values: Iterable[float | int], step: int,
                   state: TrainerState) -> None:
        """Write a log of numbers at ``step``: to the built-in writer as its values, no dict in between."""
        writer = self._writer()
        if self._values_direct and isinstance(writer, EventFileWriter):
            writer._append_scalars(names, values, step, self.event_time)
        else:
            super().log_values(names, values, step, state)

    def log_metrics(self, metrics: dict[str, float | int], step: int, state: TrainerState) -> None:
        """Write every metric at ``step`` (one event with the built-in writer)."""
        writer = self._writer()
        # Stamped with when the log happened, not when the reporter's thread got to it.
        if isinstance(writer, EventFileWriter):
            writer.write_scalars(metrics, step, self.event_time)
        else:
            stamp = {"walltime": self.event_time} if _takes_walltime(writer.__class__, "add_scalar") else {}
            for tag, value in metrics.items():
                writer.add_scalar(tag, float(value), step, **stamp)

    def log_texts(self, texts: dict[str, str], step: int, state: TrainerState) -> None:
        """``add_text`` each string at ``step`` (as transformers does)."""
        writer = self._writer()
        stamp = {"walltime": self.event_time} if _takes_walltime(writer.__class__, "add_text") else {}
        for tag, text in texts.items():
            writer.add_text(tag, text, step, **stamp)

    def log_checkpoint(self, path: str, args: TrainingArguments, state: TrainerState) -> None:
        """``fsync`` at each checkpoint, so the events it covers are on disk (a resume purges what follows)."""
        if self.tb_writer is not None:
            self.tb_writer.flush()

    def finish(self, status: str) -> None:
        """Record the end status for the HParams view (``"failed"`` → failure), then flush and close."""
        writer = self.tb_writer
        if writer is None:
            return
        try:
            if isinstance(writer, EventFileWriter) and not writer.closed:
                writer.add_hparams_end(failed=status != "finished")
        finally:
            if self._own_writer:
                self.tb_writer = None
            writer.close()

    def _writer(self) -> Any:
        writer = self.tb_writer
        if writer is None:
            raise RuntimeError("TensorBoardCallback: the writer is closed; training has already ended.")
        return writer
