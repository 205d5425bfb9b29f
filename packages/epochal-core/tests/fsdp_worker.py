"""Training script the FSDP tests launch with ``torchrun`` (and call in-process for 1-process references).

Same shape as ``ddp_worker.py`` (whose test hooks and tracker it reuses), with a
model of several blocks so ``auto_wrap`` has units to shard. The final weights are
read back from what ``Trainer.save_model()`` wrote (one consolidated state dict),
never from the rank's own shards.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from ddp_worker import RANK, FileTracker, OneRankHook, _count_metric
from epochal_core import EarlyStoppingCallback, Trainer, TrainerCallback, TrainingArguments
from epochal_core.testing import tiny_dataset
from torch import nn


class Block(nn.Module):
    """A residual layer: the unit ``transformer_layer_cls_to_wrap`` names."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + torch.tanh(self.linear(h))


class TinyMLP(nn.Module):
    """4 -> 8 -> two blocks -> 1 regression, returning a dict with the loss as HF models do."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.blocks = nn.ModuleList([Block(8), Block(8)])
        self.out = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        pred = self.out(h).sum(-1)  # not a view: FSDP2 warns about views returned by a root module
        result = {"logits": pred}
        if labels is not None:
            result["loss"] = nn.functional.mse_loss(pred, labels)
        return result


class StateSeen(TrainerCallback):
    """What every callback sees, per event: the same on every rank is the claim under test."""

    def __init__(self) -> None:
        self.seen: list[list[Any]] = []

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.seen.append(["step", state.global_step, state.epoch, control.should_save, control.should_evaluate])

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Any = None, **kwargs: Any) -> None:
        self.seen.append(["eval", state.global_step, state.best_metric, state.best_global_step,
                          round(metrics["eval_loss"], 6)])


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    """Train as ``cfg`` says and return (and write) what the test compares."""
    out = Path(cfg["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = TinyMLP()
    optimizers: tuple[Any, Any] = (None, None)
    if cfg.get("sgd"):  # built before the Trainer shards the model: it must follow the new parameters
        optimizers = (torch.optim.SGD(model.parameters(), lr=cfg["sgd"]), None)
    hook, seen = OneRankHook(cfg.get("hooks", {}), out), StateSeen()
    callbacks: list[Any] = [hook, seen, FileTracker(out)]
    if cfg.get("patience"):
        callbacks.append(EarlyStoppingCallback(cfg["patience"]))
    args = TrainingArguments(output_dir=str(out), report_to="none", logging_steps=1, seed=3, disable_tqdm=True,
                             **cfg.get("args", {}))
    eval_n = cfg.get("eval_n")
    trainer = Trainer(
        model, args, train_dataset=tiny_dataset(cfg["n"]),
        eval_dataset=tiny_dataset(eval_n, seed=1) if eval_n else None,
        compute_metrics=_count_metric if eval_n else None, optimizers=optimizers, callbacks=callbacks,
    )
    result = trainer.train(resume_from_checkpoint=cfg.get("resume"))
    report: dict[str, Any] = {
        "rank": RANK,
        "world": trainer.dist.world_size,
        "global_step": result.global_step,
        "preempted": trainer.preempted,
        "wrapped": type(trainer.model_wrapped).__name__,
        "history": trainer.state.log_history,
        "seen": seen.seen,
        "best_model_checkpoint": trainer.state.best_model_checkpoint,
    }
    if eval_n:
        report["eval"] = trainer.evaluate()
    trainer.save_model(str(out / "final"))  # every rank takes part in gathering the shards
    if trainer.is_world_process_zero():
        saved = torch.load(out / "final" / "pytorch_model.bin", weights_only=True)
        report["weights"] = {k: v.tolist() for k, v in saved.items()}
    (out / f"result-{RANK}.json").write_text(json.dumps(report))
    return report


if __name__ == "__main__":
    config = json.loads(Path(sys.argv[1]).read_text())
    for run_cfg in config["runs"]:
        run(run_cfg)
