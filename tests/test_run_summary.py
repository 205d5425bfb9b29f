"""The end-of-training summary, from real short runs with TensorBoard and DVCLive offline.

The lines are checked against what the run left on disk: the step count and eval
losses of ``log_history``, the best checkpoint's folder, TensorBoard's event files
and DVCLive's ``metrics.json`` in the folders the summary names.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from epochal_core import PrinterCallback, ProgressCallback, Trainer, TrainerCallback, TrainingArguments
from epochal_core.run_summary import format_run_summary
from epochal_core.testing import TinyRegressor, tiny_dataset

pytestmark = pytest.mark.slow  # imports tensorboardX and dvclive, then short runs


def make_trainer(out: Path, callbacks: list[Any] | None = None, **overrides: Any) -> Trainer:
    args = TrainingArguments(**{
        "output_dir": str(out), "report_to": ["tensorboard", "dvclive"], "max_steps": 6, "logging_steps": 2,
        "eval_strategy": "steps", "eval_steps": 2, "save_steps": 2, "per_device_train_batch_size": 8,
        "load_best_model_at_end": True, "learning_rate": 0.05, "disable_tqdm": True, "use_cpu": True,
        **overrides,
    })
    return Trainer(TinyRegressor(), args, train_dataset=tiny_dataset(32), eval_dataset=tiny_dataset(16, seed=1),
                   callbacks=callbacks)


def summary_of(printed: str) -> list[str]:
    lines = printed.splitlines()
    (start,) = [i for i, line in enumerate(lines) if line.startswith("Training finished: ")]
    return lines[start:]


def field(lines: list[str], label: str) -> str:
    (value,) = [line.split(": ", 1)[1] for line in lines if line.startswith(f"  {label}: ")]
    return value


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Trainer, list[str]]:
    import contextlib
    import io

    out = tmp_path_factory.mktemp("summary") / "out"
    trainer = make_trainer(out)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        trainer.train()
    return trainer, summary_of(printed.getvalue())


def test_summary_names_steps_time_and_the_eval_metric_of_the_log_history(
    finished_run: tuple[Trainer, list[str]],
) -> None:
    trainer, lines = finished_run
    head = re.fullmatch(r"Training finished: (\d+) steps \(([\d.]+) epochs\) in ([\d.]+) s, mean train loss (\S+)",
                        lines[0])
    assert head is not None, lines
    assert int(head.group(1)) == trainer.state.global_step == 6
    evals = [(e["step"], e["eval_loss"]) for e in trainer.state.log_history if "eval_loss" in e]
    best_step, best = min(evals, key=lambda e: e[1])
    assert field(lines, "eval_loss") == (
        f"last {evals[-1][1]:.4g} (step {evals[-1][0]}), best {best:.4g} (step {best_step})"
    )
    assert field(lines, "best checkpoint") == trainer.state.best_model_checkpoint
    assert Path(field(lines, "best checkpoint")).name == f"checkpoint-{best_step}"
    assert field(lines, "output folder") == trainer.args.output_dir


def test_summary_names_the_folders_each_tracker_wrote(finished_run: tuple[Trainer, list[str]]) -> None:
    _, lines = finished_run
    tensorboard = Path(field(lines, "tensorboard logs"))
    assert tensorboard.is_absolute() and list(tensorboard.glob("events.out.tfevents.*")), tensorboard
    dvclive = Path(field(lines, "dvclive logs"))
    assert dvclive.is_absolute()
    assert "eval" in json.loads((dvclive / "metrics.json").read_text(encoding="utf-8"))
    assert len([line for line in lines if line.endswith(" logs: " + str(tensorboard))]) == 1


class _BreakDVCLive(TrainerCallback):
    """Makes DVCLive's run raise from its second log on (no offline mode makes an SDK fail mid-run)."""

    def __init__(self, trainer_ref: list[Trainer]) -> None:
        self.trainer_ref = trainer_ref

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if state.global_step == 3:
            callbacks = self.trainer_ref[0].callback_handler.callbacks
            (live,) = [cb for cb in callbacks if getattr(cb, "name", "") == "dvclive"]
            live.log_metrics = _raise


def _raise(*args: Any, **kwargs: Any) -> None:
    raise OSError("disk full (scripted)")


def test_a_failed_integration_is_named_as_failed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    holder: list[Trainer] = []
    trainer = make_trainer(tmp_path / "out", callbacks=[_BreakDVCLive(holder)], strict_integrations=False,
                           eval_strategy="no", load_best_model_at_end=False)
    holder.append(trainer)
    trainer.train()
    lines = summary_of(capsys.readouterr().out)
    assert field(lines, "dvclive logs") == "failed and was disabled (see the warning above)"
    assert list(Path(field(lines, "tensorboard logs")).glob("events.out.tfevents.*"))
    assert not any(line.startswith("  eval_loss") or "best checkpoint" in line for line in lines)


@pytest.mark.parametrize("console", [ProgressCallback, PrinterCallback])
def test_printed_with_either_console_callback_and_not_without(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], console: type[TrainerCallback]
) -> None:
    trainer = make_trainer(tmp_path / "out", report_to="none", eval_strategy="no", load_best_model_at_end=False,
                           disable_tqdm=console is PrinterCallback)
    trainer.train()
    assert summary_of(capsys.readouterr().out)[0].startswith("Training finished: 6 steps")
    trainer.remove_callback(console)
    trainer.train()
    assert "Training finished" not in capsys.readouterr().out


def test_only_world_rank_zero_prints(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trainer = make_trainer(tmp_path / "out", report_to="none", eval_strategy="no", load_best_model_at_end=False)
    # A one-process run stands in for another rank: tests/test_ddp.py runs real processes, but for the
    # trainer's loop, not its console.
    trainer.is_world_process_zero = lambda: False  # type: ignore[method-assign]
    trainer.train()
    assert "Training finished" not in capsys.readouterr().out


def test_best_metric_follows_metric_for_best_model() -> None:
    args = TrainingArguments(output_dir="o", metric_for_best_model="accuracy", greater_is_better=True)
    from epochal_core import TrainerState

    state = TrainerState(global_step=4, epoch=1.0, best_metric=0.9, best_global_step=2,
                         best_model_checkpoint="o/checkpoint-2",
                         log_history=[{"eval_accuracy": 0.9, "step": 2}, {"eval_accuracy": 0.7, "step": 4}])
    text = format_run_summary(args, state, {"train_runtime": 1.25, "train_loss": 0.5}, [("wandb", None)])
    assert text.splitlines() == [
        "Training finished: 4 steps (1.00 epochs) in 1.2 s, mean train loss 0.5",
        "  eval_accuracy: last 0.7 (step 4), best 0.9 (step 2)",
        "  best checkpoint: o/checkpoint-2",
        "  output folder: o",
        "  wandb logs: (this integration does not say where)",
    ]
