"""FlyteCallback against the real flytekit, inside locally executed tasks, read back from the deck HTML.

Calling a ``@task`` function runs it locally: flytekit writes the task's
``deck.html`` under ``$TMPDIR/flyte*/.../local_flytekit/<hash>/`` and the
synced checkpoints under ``$TMPDIR/flyte*/``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import torch
from epochal_core import Trainer, TrainingArguments
from epochal_core.testing import DropoutRegressor, tiny_dataset
from epochal_flyte import FlyteCallback


@pytest.fixture(scope="module")
def flytekit() -> Any:
    # Importing flytekit replaces the process's SIGINT handler; keep pytest's.
    previous = signal.getsignal(signal.SIGINT)
    import flytekit

    signal.signal(signal.SIGINT, previous)
    return flytekit


class Tables(HTMLParser):
    """The text of every ``<table>`` cell of a page: a list of rows per table."""

    def __init__(self, page: str) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self._cell: str | None = None
        self.feed(page)

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag == "table":
            self.tables.append([])
        elif tag == "tr" and self.tables:
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = ""

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self.tables and self.tables[-1]:
            self.tables[-1][-1].append(self._cell)
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell += data


def files_named(name: str) -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob(f"flyte*/**/{name}"))


def trainer_args(out: Path, **overrides: Any) -> TrainingArguments:
    kwargs: dict[str, Any] = dict(output_dir=str(out), max_steps=4, per_device_train_batch_size=8, logging_steps=1,
                                  save_steps=2, report_to=["flyte"], disable_tqdm=True, use_cpu=True)
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


@pytest.mark.slow
def test_inside_a_task_deck_shows_the_log_history_and_checkpoints_sync(flytekit: Any, tmp_path: Path) -> None:
    decks_before, synced_before = files_named("deck.html"), files_named("COMPLETE")
    histories: dict[str, list[dict[str, Any]]] = {}
    weights: dict[str, dict[str, torch.Tensor]] = {}

    def train(report_to: list[str]) -> None:
        torch.manual_seed(0)
        trainer = Trainer(DropoutRegressor(), trainer_args(tmp_path / "-".join(["out", *report_to]),
                                                           report_to=report_to), train_dataset=tiny_dataset())
        trainer.train()
        histories[str(report_to)] = trainer.state.log_history
        weights[str(report_to)] = trainer.model.state_dict()

    @flytekit.task(enable_deck=True, deck_fields=())
    def train_task() -> None:
        train([])
        train(["flyte"])

    train_task()

    [deck] = files_named("deck.html") - decks_before
    history = histories[str(["flyte"])]
    [table] = [t for t in Tables(deck.read_text(encoding="utf-8")).tables if t and "loss" in t[0]]
    header, *rows = table
    assert header == list(dict.fromkeys(key for entry in history for key in entry))
    assert rows == [[str(entry[key]) if key in entry else "" for key in header] for entry in history]
    assert "Log History" in deck.read_text(encoding="utf-8")
    # Each checkpoint was saved to the task's checkpoint store (the last one is what is there now).
    synced = files_named("COMPLETE") - synced_before
    assert synced, "no checkpoint reached the task's checkpoint store"
    saved_steps = {json.loads((p.parent / "trainer_state.json").read_text())["global_step"] for p in synced}
    assert saved_steps == {4}
    # Flyte's task machinery changed nothing about the training.
    reference, logged = weights[str([])], weights[str(["flyte"])]
    assert all(torch.equal(logged[k], reference[k]) for k in reference)


def test_outside_a_task_is_skipped_with_one_warning(
    flytekit: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    trainer = Trainer(DropoutRegressor(), trainer_args(tmp_path / "out"), train_dataset=tiny_dataset())
    with caplog.at_level(logging.WARNING, logger="epochal_flyte"):
        trainer.train()
        trainer.train(resume_from_checkpoint=True)
    warnings = [r for r in caplog.records if r.name == "epochal_flyte"]
    assert len(warnings) == 1 and "not running inside a Flyte task" in warnings[0].getMessage()
    assert trainer.state.global_step == 4 and not trainer.integration_failures
    [callback] = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, FlyteCallback)]
    assert callback.checkpoint is None


SIGTERM_SCRIPT = """
import json, signal, sys
from epochal_core import Trainer, TrainingArguments
from epochal_core.testing import DropoutRegressor, WaitAt, scripted_run, tiny_dataset
from epochal_flyte import FlyteCallback
# Outside a task, with flytekit not imported: the callback must not import it (that replaces SIGINT's handler).
scripted_run(FlyteCallback(), max_steps=2)
result = {"flytekit imported outside a task": "flytekit" in sys.modules}
from flytekit import task
@task(deck_fields=())
def train() -> None:
    args = TrainingArguments(output_dir=sys.argv[1], max_steps=50, per_device_train_batch_size=8, logging_steps=1,
                             save_steps=1000, report_to=["flyte"], disable_tqdm=True, use_cpu=True)
    trainer = Trainer(DropoutRegressor(), args, train_dataset=tiny_dataset())
    [callback] = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, FlyteCallback)]
    trainer.add_callback(WaitAt(2, ready=lambda: callback.checkpoint is not None, send=signal.SIGTERM))
    trainer.train()
    result.update(step=trainer.state.global_step, preempted=trainer.preempted)
train()
print(json.dumps(result))
"""


@pytest.mark.slow
def test_sigterm_inside_a_task_still_saves_and_stops_and_no_import_outside(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-c", SIGTERM_SCRIPT, str(out)], capture_output=True, text=True,
                          timeout=300, env=os.environ.copy(), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "not running inside a Flyte task (flytekit is not imported)" in done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {
        "flytekit imported outside a task": False, "step": 2, "preempted": True,
    }
    assert (out / "checkpoint-2" / "COMPLETE").is_file()
    assert "Received SIGTERM" in done.stderr
