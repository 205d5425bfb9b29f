"""A picture of a run: training loss, eval metrics and learning rate against steps, as a PNG.

Needs matplotlib (``pip install 'epochal-core[plot]'``), imported only when a
picture is drawn: the core never depends on it. Usage::

    python -m epochal_core plot out/              # writes out/training_curves.png
    python -m epochal_core plot out/ --output run.png --size 1600x1000

or from Python, ``plot_run("out")``. The history is read from what a run leaves
in its ``output_dir``: ``trainer_state.json`` (written by ``trainer.save_state()``)
or the newest complete checkpoint, whose history is read back whole from the
``log_history-<run>.jsonl`` file it records (as resume does), whichever is further
along; without either, the newest ``log_history-*.jsonl`` file. Drawing uses
matplotlib's Agg canvas directly (no pyplot, no display, no global backend change).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .discovery import install_hint
from .state import TRAINER_STATE_NAME, TrainerState

__all__ = ["DEFAULT_FILE_NAME", "DEFAULT_SIZE", "RunHistory", "plot_log_history", "plot_run", "read_log_history"]

#: Where :func:`plot_run` writes the picture inside ``output_dir`` unless told otherwise.
DEFAULT_FILE_NAME = "training_curves.png"
#: Width and height of the picture in pixels.
DEFAULT_SIZE = (1200, 900)
_DPI = 100
# Evaluation timings are not metrics of the model.
_NOT_METRICS = ("_runtime", "_per_second")


@dataclass
class RunHistory:
    """A run's ``log_history`` and where it was read from.

    Args:
        entries: The logs, oldest first, each with its ``step``.
        source: The file they were read from.
    """

    entries: list[dict[str, Any]]
    source: Path


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _from_state_file(path: Path) -> tuple[int, list[dict[str, Any]]]:
    state = TrainerState.load_from_json(str(path))
    return state.global_step, state.log_history


def _from_checkpoint(checkpoint: Path) -> tuple[int, list[dict[str, Any]]]:
    # Imported here: it loads torch, which the other sources do not need.
    from .log_history import LogHistoryStore

    state = TrainerState.load_from_json(str(checkpoint / TRAINER_STATE_NAME))
    LogHistoryStore().restore(state, checkpoint, checkpoint.parent)
    return state.global_step, state.log_history


def read_log_history(output_dir: str | os.PathLike[str]) -> RunHistory:
    """Read the ``log_history`` of the run that wrote ``output_dir``.

    Args:
        output_dir: The run's ``TrainingArguments.output_dir``.

    Raises:
        FileNotFoundError: ``output_dir`` is not a folder, or holds no log history.
    """
    root = Path(output_dir)
    if not root.is_dir():
        raise FileNotFoundError(
            f"output_dir={str(root)!r} is not a folder: pass the output_dir of a training run."
        )
    from .checkpoint import latest_checkpoint

    found: list[tuple[int, int, list[dict[str, Any]], Path]] = []
    final = root / TRAINER_STATE_NAME
    if final.is_file():
        step, entries = _from_state_file(final)
        found.append((step, 1, entries, final))  # on a tie, the whole history saved at the end wins
    checkpoint = latest_checkpoint(root)
    if checkpoint is not None:
        step, entries = _from_checkpoint(checkpoint)
        found.append((step, 0, entries, checkpoint / TRAINER_STATE_NAME))
    if found:
        _, _, entries, source = max(found, key=lambda item: item[:2])
        return RunHistory(entries, source)
    streams = sorted(root.glob("log_history-*.jsonl"), key=lambda p: p.stat().st_mtime)
    if streams:
        lines = streams[-1].read_text(encoding="utf-8").splitlines()
        return RunHistory([json.loads(line) for line in lines if line.strip()], streams[-1])
    raise FileNotFoundError(
        f"No log history in output_dir={str(root)!r}: it holds no {TRAINER_STATE_NAME}, no complete "
        "checkpoint-* folder and no log_history-*.jsonl file. Pass the output_dir of a run that saved a "
        "checkpoint (save_strategy) or called trainer.save_state()."
    )


def _series(entries: list[dict[str, Any]]) -> dict[str, tuple[list[float], list[float]]]:
    """``name -> (steps, values)`` for every number logged under a name worth drawing."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    for entry in entries:
        step = _number(entry.get("step"))
        if step is None:
            continue
        for key, raw in entry.items():
            value = _number(raw)
            wanted = key in ("loss", "learning_rate") or (key.startswith("eval_") and not key.endswith(_NOT_METRICS))
            if value is None or not wanted:
                continue
            steps, values = series.setdefault(key, ([], []))
            steps.append(step)
            values.append(value)
    return series


def _load_matplotlib() -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(
            install_hint("matplotlib", "Plotting a run (`python -m epochal_core plot`)")
            + " The extra `pip install 'epochal-core[plot]'` installs it too."
        ) from err
    return Figure, FigureCanvasAgg


def plot_log_history(
    entries: list[dict[str, Any]],
    path: str | os.PathLike[str],
    *,
    title: str | None = None,
    size: tuple[int, int] = DEFAULT_SIZE,
) -> Path:
    """Draw ``entries`` (a ``log_history``) into the PNG file ``path``.

    One panel each, against the step, where the history has them: the training
    ``loss`` with ``eval_loss``; the other ``eval_*`` metrics; the ``learning_rate``.

    Args:
        entries: ``state.log_history`` or what :func:`read_log_history` returned.
        path: The PNG file to write (its folder is created).
        title: A title above the panels.
        size: Width and height of the picture in pixels.

    Raises:
        ImportError: matplotlib is not installed (the message says how to install it).
        ValueError: ``size`` is not two positive integers, or ``entries`` hold nothing to draw.
    """
    width, height = size
    if not (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0):
        raise ValueError(f"size={size!r} must be (width, height) in pixels, both positive integers, e.g. (1200, 900).")
    series = _series(entries)
    eval_metrics = sorted(k for k in series if k.startswith("eval_") and k != "eval_loss")
    panels: list[tuple[str, list[str]]] = [
        ("loss", [k for k in ("loss", "eval_loss") if k in series]),
        ("eval metrics", eval_metrics),
        ("learning rate", ["learning_rate"] if "learning_rate" in series else []),
    ]
    panels = [(label, keys) for label, keys in panels if keys]
    if not panels:
        raise ValueError(
            f"Nothing to draw: none of the {len(entries)} log entries has a numeric loss, eval_* metric or "
            "learning_rate with a step."
        )
    figure_class, canvas_class = _load_matplotlib()
    figure = figure_class(figsize=(width / _DPI, height / _DPI), dpi=_DPI, layout="constrained")
    canvas_class(figure)
    axes = figure.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (label, keys) in zip(axes, panels):
        for key in keys:
            steps, values = series[key]
            # A single point draws no line; a marker keeps it visible.
            ax.plot(steps, values, label=key, marker="o" if len(steps) < 30 else None, markersize=3)
        ax.set_ylabel(label)
        finite = [v for k in keys for v in series[k][1] if math.isfinite(v)]
        if label == "loss" and finite and min(finite) > 0 and max(finite) / min(finite) > 20:
            ax.set_yscale("log")  # a loss that falls by decades would be a flat line after its first drop
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    axes[-1].set_xlabel("step")
    if title:
        figure.suptitle(title)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, format="png", dpi=_DPI)
    return target


def plot_run(
    output_dir: str | os.PathLike[str],
    output: str | os.PathLike[str] | None = None,
    *,
    size: tuple[int, int] = DEFAULT_SIZE,
) -> Path:
    """Draw the curves of the run in ``output_dir`` into a PNG and return its path.

    Args:
        output_dir: The run's ``TrainingArguments.output_dir``.
        output: The PNG file to write (default ``<output_dir>/training_curves.png``).
        size: Width and height of the picture in pixels.

    Raises:
        FileNotFoundError: ``output_dir`` holds no log history.
        ImportError: matplotlib is not installed (the message says how to install it).
        ValueError: The history holds nothing to draw, or ``size`` is invalid.
    """
    _load_matplotlib()  # before reading anything: a missing matplotlib is the first thing to say
    history = read_log_history(output_dir)
    target = Path(output) if output is not None else Path(output_dir) / DEFAULT_FILE_NAME
    return plot_log_history(history.entries, target, title=str(Path(output_dir).resolve().name), size=size)
