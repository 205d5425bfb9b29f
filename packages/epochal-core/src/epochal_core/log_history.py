"""Checkpointing ``state.log_history`` at a cost that does not grow with the run.

transformers rewrites the whole ``log_history`` into every checkpoint's
``trainer_state.json``, so a long run pays O(n) per checkpoint and O(n²) over
its life. epochal appends each log once to ``<output_dir>/log_history-<run>.jsonl``
(fsynced with the checkpoint; one file per training run started from scratch, so
a new run in the same folder never rewrites what older checkpoints point to) and
puts only the newest :data:`LOG_HISTORY_TAIL` entries inline, plus the file position in ``stateful_callbacks`` under
:data:`RECORD_KEY` (a key transformers' loader tolerates). Resume reads the file
up to the recorded position, so ``log_history`` comes back whole; without the
file (a checkpoint copied elsewhere) the inline tail is used, with a warning.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

from .checkpoint import DeferredFsync, finish_file
from .state import TrainerState

__all__ = ["LOG_HISTORY_TAIL", "RECORD_KEY", "LogHistoryStore"]

logger = logging.getLogger(__name__)

#: Entries of ``log_history`` written inline into each checkpoint's ``trainer_state.json``.
LOG_HISTORY_TAIL = 100
RECORD_KEY = "epochal.log_history"


class LogHistoryStore:
    """Appends ``log_history`` to a JSON-lines file; remembers how much of it is durable."""

    def __init__(self) -> None:
        self.file = f"log_history-{uuid.uuid4().hex[:8]}.jsonl"
        self.lines = 0
        self.bytes = 0

    def persist(self, output_dir: str | os.PathLike[str], history: list[dict[str, Any]],
                fsync: DeferredFsync | None = None) -> dict[str, Any]:
        """Append the entries not yet written, fsync, and return the record to store in the checkpoint.

        With ``fsync``, the fsync happens when it waits: the caller must wait for it before
        committing the checkpoint that stores the record (every save fsyncs the file again,
        so a record is only ever committed behind a successful fsync).
        """
        path = Path(output_dir) / self.file
        path.parent.mkdir(parents=True, exist_ok=True)
        file = open(path, "r+b" if path.exists() else "wb")  # noqa: SIM115 - closed by finish_file
        try:
            # Anything past the last recorded position belongs to a run that crashed
            # (or an older run in this folder): it is not part of this history.
            file.truncate(self.bytes)
            file.seek(self.bytes)
            data = "".join(json.dumps(entry) + "\n" for entry in history[self.lines :]).encode("utf-8")
            file.write(data)
        except BaseException:
            file.close()
            raise
        finish_file(file, fsync)
        self.lines = len(history)
        self.bytes += len(data)
        return {"args": {}, "attributes": {"file": self.file, "lines": self.lines, "bytes": self.bytes}}

    def state_json(self, state: TrainerState, record: dict[str, Any]) -> str:
        """``trainer_state.json`` text with the inline tail and the record, without copying the history."""
        data = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
        data["log_history"] = state.log_history[-LOG_HISTORY_TAIL:]
        data["stateful_callbacks"] = {**state.stateful_callbacks, RECORD_KEY: record}
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    def restore(self, state: TrainerState, checkpoint: Path, output_dir: str | os.PathLike[str]) -> None:
        """Rebuild ``state.log_history`` from the file next to ``checkpoint`` and resume appending.

        Pops the record from ``state.stateful_callbacks``. Appending continues in
        ``output_dir``; if that is another folder, the file there is rewritten at
        the next checkpoint.
        """
        record = state.stateful_callbacks.pop(RECORD_KEY, None)
        if record is None:  # written by transformers or an older epochal: the inline history is whole
            self.lines = self.bytes = 0
            return
        attrs = record.get("attributes", {})
        lines, size = int(attrs.get("lines", 0)), int(attrs.get("bytes", 0))
        source = checkpoint.parent / str(attrs.get("file", ""))
        try:
            with open(source, "rb") as f:
                raw = f.read(size)
            entries = [json.loads(line) for line in raw.decode("utf-8").splitlines()]
            complete = len(raw) == size and len(entries) == lines
            reason = f"it holds {len(entries)} entries where {lines} were recorded"
        except (OSError, ValueError) as err:
            complete, reason = False, str(err)
        if complete:
            state.log_history = entries
            if source.parent.resolve() == Path(output_dir).resolve():
                self.file, self.lines, self.bytes = source.name, lines, size
            return
        logger.warning(
            "Cannot read the full log history from %s (%s); resuming with the %d newest entries stored in "
            "the checkpoint.", source, reason, len(state.log_history),
        )
        self.lines = self.bytes = 0
