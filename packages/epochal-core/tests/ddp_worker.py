"""Training script the DDP tests launch with ``torchrun`` (and call in-process for 1-process references).

``python ddp_worker.py CONFIG.json`` runs each entry of ``CONFIG["runs"]`` in turn in
the same process group and writes ``<run output_dir>/result-<rank>.json``. The
script is an ordinary single-process training script: nothing in it knows about
DDP except the test hooks (a callback acting on one rank only, a rank that dies).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from epochal_core import Trainer, TrainerCallback, TrainingArguments
from epochal_core.integrations import IntegrationCallback
from epochal_core.testing import tiny_dataset
from helpers_core import DictDataset, TinyRegressor

RANK = int(os.environ.get("RANK", 0))


class OneRankHook(TrainerCallback):
    """Test hooks that act on one rank only, at one step: raise flags, wait for a signal, die."""

    def __init__(self, hooks: dict[str, Any], out: Path) -> None:
        self.hooks = hooks
        self.out = out
        self.signalled = threading.Event()
        self.progress: Any = None
        self.bar_seen = False

    def _mine(self, key: str, state: Any) -> bool:
        hook = self.hooks.get(key)
        return hook is not None and hook["rank"] == RANK and hook["step"] == state.global_step

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if "sigterm" in self.hooks:
            previous = signal.getsignal(signal.SIGTERM)

            def seen(signum: int, frame: Any) -> None:
                self.signalled.set()
                previous(signum, frame)  # type: ignore[operator]

            signal.signal(signal.SIGTERM, seen)

    def on_step_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        hook = self.hooks.get("nan")
        if hook is not None and hook["rank"] == RANK and hook["step"] == state.global_step + 1:
            # This rank's loss (only) is NaN for one micro-batch of step ``step``.
            def poison(module: Any, inputs: Any, output: Any) -> Any:
                handle.remove()
                return {**output, "loss": output["loss"] * float("nan")}

            handle = model.register_forward_hook(poison)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.bar_seen |= getattr(self.progress, "training_bar", None) is not None
        if self._mine("save", state):
            control.should_save = True
        if self._mine("stop", state):
            control.should_training_stop = True
        if self._mine("die", state):
            os._exit(3)
        if self._mine("sigterm", state):
            (self.out / "victim.pid").write_text(str(os.getpid()))
            # Hold this rank (and so, at the next collective, all ranks) until the test's signal lands.
            if not self.signalled.wait(120):
                raise RuntimeError("no SIGTERM arrived")

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if self._mine("stop_on_log", state):
            control.should_training_stop = True


class FileTracker(IntegrationCallback):
    """A tracker that writes its run into a file named after the rank that created it."""

    name = "file-tracker"

    def __init__(self, out: Path) -> None:
        super().__init__()
        self.out = out
        self.lines: list[str] = []

    def setup(self, args: Any, state: Any, model: Any, **kwargs: Any) -> None:
        self.path = self.out / f"tracker-rank{RANK}.jsonl"

    def log_metrics(self, metrics: dict[str, float | int], step: int, state: Any) -> None:
        self.lines.append(json.dumps({"step": step, **metrics}))

    def finish(self, status: str) -> None:
        self.path.write_text("\n".join([*self.lines, status]))


def _count_metric(pred: Any) -> dict[str, float]:
    return {"count": float(len(pred.predictions)), "pred_sum": float(pred.predictions.astype("float64").sum())}


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    """Train as ``cfg`` says and return (and write) what the test compares."""
    out = Path(cfg["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = TinyRegressor(dropout=cfg.get("dropout", 0.0))
    # A map-style dataset goes through the DataLoader, a TensorDataset through batch indexing.
    train = DictDataset(cfg["n"]) if cfg.get("dict_dataset") else tiny_dataset(cfg["n"])
    optimizers: tuple[Any, Any] = (None, None)
    if cfg.get("sgd"):
        optimizers = (torch.optim.SGD(model.parameters(), lr=cfg["sgd"]), None)
    hook = OneRankHook(cfg.get("hooks", {}), out)
    args = TrainingArguments(output_dir=str(out), report_to="none", logging_steps=1, seed=3, disable_tqdm=False,
                             **cfg.get("args", {}))
    eval_n = cfg.get("eval_n")
    trainer = Trainer(
        model, args, train_dataset=train, eval_dataset=tiny_dataset(eval_n, seed=1) if eval_n else None,
        compute_metrics=_count_metric if eval_n else None, optimizers=optimizers,
        callbacks=[hook, FileTracker(out)],
    )
    hook.progress = trainer.callback_handler.callbacks[-1]
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=cfg.get("resume"))
    report = {
        "rank": RANK,
        "world": trainer.dist.world_size,
        "global_step": result.global_step,
        "train_loss": result.training_loss,
        "seconds": time.perf_counter() - start,
        "preempted": trainer.preempted,
        "is_world_process_zero": trainer.state.is_world_process_zero,
        "is_local_process_zero": trainer.state.is_local_process_zero,
        "wrapped": type(trainer.model_wrapped).__name__,
        "progress_bar": hook.bar_seen,
        "history": trainer.state.log_history,
        "best_model_checkpoint": trainer.state.best_model_checkpoint,
        "weights": {k: v.tolist() for k, v in trainer.model.state_dict().items()},
    }
    if eval_n:
        report["eval"] = trainer.evaluate()
    (out / f"result-{RANK}.json").write_text(json.dumps(report))
    return report


if __name__ == "__main__":
    config = json.loads(Path(sys.argv[1]).read_text())
    for run_cfg in config["runs"]:
        run(run_cfg)
