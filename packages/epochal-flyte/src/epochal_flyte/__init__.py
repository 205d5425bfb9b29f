"""Flyte integration for epochal: ``report_to="flyte"``.

Install with ``pip install epochal-flyte``. Inside a Flyte task, each committed
checkpoint is synced to the task's checkpoint store and, when training ends,
the log history becomes a "Log History" deck, as with transformers'
``FlyteCallback``::

    from flytekit import current_context, task
    from epochal_core import Trainer, TrainingArguments

    @task(enable_deck=True)
    def train() -> None:
        args = TrainingArguments(output_dir="out", report_to="flyte")
        trainer = Trainer(model, args, train_dataset=data)
        trainer.train(resume_from_checkpoint=current_context().checkpoint.restore())

Where transformers differs, and why:

- Outside a Flyte task transformers' callback raises in its constructor, so
  ``report_to="flyte"`` breaks ``Trainer(...)``; here it is skipped with one
  warning and training goes on.
- The deck table is written here from ``state.log_history`` (every key a
  column, values at full precision, HTML-escaped). transformers renders it with
  pandas through ``flytekitplugins-deck-standard``: two more packages (pandas
  alone is tens of MB) for one static table, and it rounds to six decimals.
- Only world rank zero syncs checkpoints and writes the deck (transformers
  writes a deck on every rank).

The integration never imports ``flytekit`` itself unless it is already imported
(a Flyte task always has imported it): importing it replaces the process's
SIGINT handler. Flyte's context belongs to the thread that runs the task, so
this integration runs on the training thread (it does nothing per log).
"""

from __future__ import annotations

import html
import logging
import sys
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from epochal_core.callback import TrainerCallback
from epochal_core.integrations import IntegrationCallback

if TYPE_CHECKING:
    from epochal_core.state import TrainerState
    from epochal_core.training_args import TrainingArguments

__all__ = ["FlyteCallback"]

logger = logging.getLogger(__name__)

DECK_NAME = "Log History"


def log_history_table(log_history: Iterable[Mapping[str, Any]]) -> str:
    """An HTML table of ``log_history``: one row per entry, one column per key (in order of first appearance)."""
    rows = list(log_history)
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    head = "".join(f"<th>{html.escape(str(name))}</th>" for name in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(row[name])) if name in row else ''}</td>" for name in columns) + "</tr>"
        for row in rows
    )
    return f'<table class="table table-striped"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


class FlyteCallback(IntegrationCallback):
    """Syncs checkpoints to Flyte and shows the log history in a deck (transformers' ``FlyteCallback``).

    Environment: none (as transformers).

    Args:
        save_log_history: Add the "Log History" deck when training ends (also
            after a crash, with the logs up to it).
        sync_checkpoints: Save each committed checkpoint with the task's
            ``current_context().checkpoint``; resume with
            ``trainer.train(resume_from_checkpoint=current_context().checkpoint.restore())``.
    """

    name: ClassVar[str] = "flyte"
    package: ClassVar[str] = "epochal-flyte"
    sdk: ClassVar[str] = "flytekit"
    sdk_package: ClassVar[str] = "flytekit"
    # flytekit keeps the task's context per thread: only the training thread sees it.
    run_inline = True
    # The deck is built from state.log_history at the end: no event per log.
    on_log = TrainerCallback.on_log  # type: ignore[assignment]

    def __init__(self, save_log_history: bool = True, sync_checkpoints: bool = True) -> None:
        super().__init__()
        self.save_log_history = save_log_history
        self.sync_checkpoints = sync_checkpoints
        #: The task's checkpoint store while inside a task, else ``None``.
        self.checkpoint: Any = None
        self._state: TrainerState | None = None
        self._warned = False

    def setup(self, args: TrainingArguments, state: TrainerState, model: Any, **kwargs: Any) -> None:
        """Find the running Flyte task's checkpoint store, or warn once that there is no task."""
        self.checkpoint, self._state = None, None
        problem = "flytekit is not imported"
        if "flytekit" in sys.modules:
            flytekit = self.import_sdk()
            try:
                self.checkpoint = flytekit.current_context().checkpoint
            except NotImplementedError as err:  # flytekit's answer outside a task
                problem = str(err)
        if self.checkpoint is None:
            if not self._warned:
                self._warned = True
                logger.warning(
                    "FlyteCallback: not running inside a Flyte task (%s), so checkpoints are not synced and no "
                    "deck is written; training continues. Run the Trainer inside a flytekit @task, or drop "
                    "'flyte' from report_to.", problem,
                )
            return
        self._state = state

    def log_metrics(self, metrics: dict[str, float | int], step: int, state: TrainerState) -> None:
        """Nothing: the deck is written from the log history when training ends."""

    def log_checkpoint(self, path: str, args: TrainingArguments, state: TrainerState) -> None:
        """Save the committed checkpoint folder to the task's checkpoint store."""
        if self.sync_checkpoints and self.checkpoint is not None:
            logger.info("Syncing checkpoint %s to Flyte.", path)
            self.checkpoint.save(path)

    def finish(self, status: str) -> None:
        """Add the "Log History" deck to the task."""
        state, self._state, self.checkpoint = self._state, None, None
        if state is None or not self.save_log_history:
            return
        from flytekit import Deck  # type: ignore[import-untyped]

        Deck(DECK_NAME, log_history_table(state.log_history))
