"""DDP scaling of the epochal Trainer: samples/s of 1 process vs 2 processes (gloo on CPU, or NCCL on GPUs).

Run it as a plain script; it launches itself with ``torchrun`` for each setting::

    uv run python tools/bench/ddp_scaling.py [--steps 60] [--batch 16]

Each process trains the same small transformer-like model (token embedding, two
pre-norm encoder layers, a vocabulary head; about 0.17 M parameters) on random
token sequences with the same per-process batch, so 2 processes handle twice
the samples per step (weak scaling). Throughput counts the steps after a
warm-up, on rank 0. Settings:

- ``1 proc x 1 thread``: the per-process baseline;
- ``2 procs x 1 thread``: data parallel; the ratio to the baseline is the scaling;
- ``1 proc x N threads``: the same cores given to one process instead (N = processes x threads
  of the 2-process run), the fair "same machine" comparison on a CPU box.

On a 2-core machine the 2-process run uses every core for compute *and* for
gloo's all-reduce, so expect well under 2x; the figure shows the overhead of the
loop and of gradient synchronisation, not what GPUs or more cores would reach.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

VOCAB, SEQ, DIM = 512, 32, 64


class TinyLM(nn.Module):
    """Next-token model: embedding, two transformer encoder layers, a linear head; returns the loss."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.pos = nn.Parameter(torch.zeros(SEQ, DIM))
        layer = nn.TransformerEncoderLayer(DIM, nhead=4, dim_feedforward=4 * DIM, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Return the cross-entropy of predicting ``labels`` from ``input_ids``."""
        hidden = self.encoder(self.embed(input_ids) + self.pos)
        return nn.functional.cross_entropy(self.head(hidden).reshape(-1, VOCAB), labels.reshape(-1))


def worker(steps: int, batch: int, warmup: int, result: Path) -> None:
    """Train under torchrun and write rank 0's steady-state samples/s to ``result``."""
    from epochal_core import Trainer, TrainerCallback, TrainingArguments

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.start = 0.0
            self.end = 0.0

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == warmup:
                self.start = time.perf_counter()
            self.end = time.perf_counter()

    world = int(os.environ.get("WORLD_SIZE", 1))
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (steps * batch * world, SEQ + 1), generator=gen)
    data = torch.utils.data.TensorDataset(tokens[:, :-1], tokens[:, 1:])
    torch.manual_seed(0)
    clock = Clock()
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=batch, max_steps=steps,
                                 save_strategy="no", report_to="none", disable_tqdm=True, logging_steps=10**9)
        trainer = Trainer(TinyLM(), args, train_dataset=data, callbacks=[clock])
        trainer.train()
    if trainer.is_world_process_zero():
        rate = (steps - warmup) * batch * world / (clock.end - clock.start)
        result.write_text(json.dumps({"samples_per_s": rate, "world": world}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(nproc: int, threads: int, steps: int, batch: int, warmup: int) -> float:
    """Run the worker with ``torchrun --nproc_per_node=nproc``; return rank 0's samples/s."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}", __file__, "--worker",
               "--steps", str(steps), "--batch", str(batch), "--warmup", str(warmup), "--result", str(result)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
        return float(json.loads(result.read_text())["samples_per_s"])


def main() -> None:
    """Parse the arguments; run one worker, or every setting and print the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=10, help="steps not timed")
    parser.add_argument("--batch", type=int, default=16, help="per-process batch size")
    parser.add_argument("--repeats", type=int, default=2, help="runs per setting (best kept)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.worker:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 1)))
        worker(opts.steps, opts.batch, opts.warmup, opts.result)
        return
    cores = os.cpu_count() or 1
    settings = [("1 proc x 1 thread", 1, 1), ("2 procs x 1 thread", 2, 1), ("1 proc x 2 threads", 1, 2)]
    print(f"cores: {cores}; torch {torch.__version__}; per-process batch {opts.batch}, {opts.steps} steps "
          f"({opts.warmup} warm-up), best of {opts.repeats}")
    rates: dict[str, float] = {}
    for label, nproc, threads in settings:
        rates[label] = max(launch(nproc, threads, opts.steps, opts.batch, opts.warmup) for _ in range(opts.repeats))
        print(f"  {label:<20} {rates[label]:10.1f} samples/s")
    base = rates["1 proc x 1 thread"]
    print(f"scaling 2 procs / 1 proc (1 thread each):   {rates['2 procs x 1 thread'] / base:.2f}x")
    same_cores = rates["2 procs x 1 thread"] / rates["1 proc x 2 threads"]
    print(f"2 procs x 1 thread / 1 proc x 2 threads:    {same_cores:.2f}x")
    if cores <= 2:
        print("caveat: this machine has <= 2 cores: both processes share them with gloo's all-reduce "
              "and the OS, so the ratio understates what more cores or GPUs give.")


if __name__ == "__main__":
    main()
