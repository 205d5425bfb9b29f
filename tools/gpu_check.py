"""CUDA checks the CPU test suite cannot make: mixed precision, the sync-free non-finite skip, device syncs, FSDP.

Run on a machine with a GPU (not part of the tests)::

    PYTHONPATH=packages/epochal-core/src python3 tools/gpu_check.py

Prints one line per check and exits non-zero if one fails. The FSDP check launches this
script again under ``torchrun`` (one process per GPU, at most 2) as ``--fsdp-worker OUT``.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import warnings

import torch
from epochal_core import Trainer, TrainerCallback, TrainingArguments
from torch import nn

results: list[tuple[str, bool, str]] = []


class MLP(nn.Module):
    def __init__(self, nan_at: int | None = None) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 1))
        self.nan_at = nan_at
        self.calls = 0

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        loss = nn.functional.mse_loss(self.net(x).squeeze(-1).float(), y)
        return loss * float("nan") if self.calls == self.nan_at else loss


def data(n: int = 4096) -> torch.utils.data.TensorDataset:
    x = torch.randn(n, 64, generator=torch.Generator().manual_seed(0))
    return torch.utils.data.TensorDataset(x, x[:, :8].sum(-1))


def args(**kw: object) -> TrainingArguments:
    base: dict[str, object] = dict(output_dir=tempfile.mkdtemp(), report_to="none", disable_tqdm=True,
                                   per_device_train_batch_size=64, max_steps=60, logging_steps=20,
                                   save_strategy="no", learning_rate=1e-3)
    base.update(kw)
    return TrainingArguments(**base)  # type: ignore[arg-type]


def check(name: str, ok: bool, detail: str) -> None:
    results.append((name, ok, detail))
    print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)


def losses(trainer: Trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def fsdp_worker(out: str) -> None:
    """One rank of the FSDP check: bf16 mixed precision over NCCL, a sharded save, a resume, save_model."""
    import torch.distributed as dist

    if not dist.is_initialized():  # one GPU: torchrun sets WORLD_SIZE=1, and a 1-rank group still shards
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    fsdp = {"bf16": True, "fsdp": "full_shard auto_wrap", "fsdp_config": {"min_num_params": 10_000},
            "save_strategy": "steps", "save_steps": 20, "logging_steps": 10, "output_dir": out}
    model = MLP()
    compute: list[torch.dtype] = []
    model.net[0].register_forward_pre_hook(lambda module, inputs: compute.append(module.weight.dtype))
    t = Trainer(model, args(max_steps=40, **fsdp), train_dataset=data())
    t.train()
    resumed = Trainer(MLP(), args(max_steps=60, **fsdp), train_dataset=data())
    resumed.train(resume_from_checkpoint=True)
    resumed.save_model(os.path.join(out, "final"))
    master = {str(p.dtype) for p in t.model.parameters()}
    if t.is_world_process_zero():
        saved = torch.load(os.path.join(out, "final", "pytorch_model.bin"), weights_only=True)
        report = {
            "backend": dist.get_backend(), "world": dist.get_world_size(), "wrapped": type(t.model).__name__,
            "losses": losses(t), "resumed_losses": losses(resumed), "resumed_step": resumed.state.global_step,
            "compute_dtype": str(compute[-1]), "master_dtypes": sorted(master),
            "saved_finite": all(bool(torch.isfinite(v).all()) for v in saved.values()),
            "saved_shapes": {k: list(v.shape) for k, v in saved.items()},
        }
        with open(os.path.join(out, "fsdp-report.json"), "w") as file:
            json.dump(report, file)


def check_fsdp() -> None:
    """Launch :func:`fsdp_worker` under torchrun and check what rank 0 reported."""
    out = tempfile.mkdtemp()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nproc = max(1, min(torch.cuda.device_count(), 2))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={port}", __file__, "--fsdp-worker", out]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        with open(os.path.join(out, "fsdp-report.json")) as file:
            r = json.load(file)
    except OSError:
        check("FSDP2 with NCCL and bf16", False, f"exit {proc.returncode}: {proc.stdout[-1500:]}{proc.stderr[-3000:]}")
        return
    ls = r["losses"]
    ok = (proc.returncode == 0 and r["backend"] == "nccl" and r["wrapped"].startswith("FSDP")
          and r["compute_dtype"] == "torch.bfloat16" and r["master_dtypes"] == ["torch.float32"]
          and all(map(math.isfinite, ls + r["resumed_losses"])) and ls[-1] < ls[0]
          and r["resumed_step"] == 60 and r["saved_finite"] and r["saved_shapes"]["net.0.weight"] == [256, 64])
    check(f"FSDP2 with NCCL and bf16 on {r['world']} GPU(s)", ok,
          f"backend={r['backend']}, compute {r['compute_dtype']}, master {r['master_dtypes']}, "
          f"loss {ls[0]:.4f} -> {ls[-1]:.4f}, resumed to step {r['resumed_step']}, exit {proc.returncode}")


if len(sys.argv) == 3 and sys.argv[1] == "--fsdp-worker":
    fsdp_worker(sys.argv[2])
    sys.exit(0)

for precision in ("fp16", "bf16"):
    t = Trainer(MLP(), args(**{precision: True}), train_dataset=data())
    t.train()
    ls = losses(t)
    finite = all(math.isfinite(v) for v in ls) and all(torch.isfinite(p).all() for p in t.model.parameters())
    check(f"{precision} on {t.device}", finite and ls[-1] < ls[0],
          f"loss {ls[0]:.4f} -> {ls[-1]:.4f}, scaler={t.scaler is not None}")

t = Trainer(MLP(nan_at=5), args(logging_steps=10, max_steps=20), train_dataset=data())
fused = t.create_optimizer().defaults.get("fused")
t.train()
skipped = [h.get("nonfinite_steps_skipped") for h in t.state.log_history if "loss" in h]
check("sync-free non-finite skip (fused AdamW)",
      bool(fused) and skipped[0] == 1 and all(torch.isfinite(p).all() for p in t.model.parameters())
      and t.state.global_step == 20, f"fused={fused}, skipped per log={skipped}, steps={t.state.global_step}")


caught: list[warnings.WarningMessage] = []


class SyncsPerStep(TrainerCallback):
    """Counts synchronizing ops (torch's sync debug mode) between consecutive step ends."""

    def __init__(self) -> None:
        self.seen = 0
        self.per_step: dict[int, int] = {}

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        now = sum("synchroniz" in str(w.message).lower() for w in caught)
        if now > self.seen:
            self.per_step[state.global_step] = now - self.seen
        self.seen = now


Trainer(MLP(), args(max_steps=5), train_dataset=data()).train()  # warm-up: lazy inits sync once
counter = SyncsPerStep()
t = Trainer(MLP(), args(max_steps=40, logging_steps=20), train_dataset=data(), callbacks=[counter])
torch.cuda.set_sync_debug_mode("warn")
with warnings.catch_warnings(record=True) as record:
    warnings.simplefilter("always")
    caught = record
    t.train()
torch.cuda.set_sync_debug_mode(0)
# The sync reading a log happens after on_step_end of that step, so it shows at the next step end.
bad = {s: n for s, n in counter.per_step.items() if s not in (1, 21)}
check("no device sync per step unless a log is due", not bad,
      f"steps whose preceding step synced: {counter.per_step} (logs at 20, 40)")
check_fsdp()
print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
sys.exit(0 if all(ok for _, ok, _ in results) else 1)
