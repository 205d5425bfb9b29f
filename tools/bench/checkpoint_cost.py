"""Checkpoint cost (issues 7.6 and 4.9).

    uv run --group bench python tools/bench/checkpoint_cost.py            # ~1-2 min
    uv run --group bench python tools/bench/checkpoint_cost.py --quick

Part 1 (7.6): saving the medium model (MLP 256-1024-1024-10, ~1.3M params) with
its AdamW state after 3 steps, via ``epochal_core.training_checkpoint.save_training_checkpoint``
(the Trainer's own path: weights, optimizer, scheduler, RNG, trainer_state.json,
training_args.json, the log_history append, manifest, every file fsynced, atomic
rename) against a bare
``torch.save({"model", "optimizer"})`` into one file plus one fsync. Interleaved,
median of ``--repeats``; each save writes a new folder/file, removed untimed.

Part 2 (4.9): a run that logs every step and checkpoints every 10 steps, on a
tiny model, simulated through the public API: 10 x ``trainer.log(...)`` then
``save_training_checkpoint(trainer._snapshot())`` (``save_total_limit=2``), 1000 times.
Reported: median save time of checkpoints 1-10 vs 991-1000, the size of
``trainer_state.json``, and the total. It measures the public behaviour (save
time as the history grows), whatever the storage of ``log_history`` is.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from benchlib import MEDIUM, TINY, Workload, epochal_trainer, make_data, quiet, silence_loggers, table


def trained_trainer(w: Workload, output_dir: str, **extra: object) -> object:
    data = make_data(w)
    trainer = epochal_trainer(w.scaled(steps=3, warm=0), data.tensors, output_dir=output_dir, **extra)
    with quiet():
        trainer.train()
    return trainer


def part1(repeats: int) -> str:
    from epochal_core.training_checkpoint import save_training_checkpoint

    root = Path(tempfile.mkdtemp(prefix="ckpt-bench-", dir=os.environ.get("BENCH_DIR")))
    trainer = trained_trainer(MEDIUM, str(root / "epochal"))
    model, opt = trainer.model, trainer.optimizer  # type: ignore[attr-defined]
    n_params = sum(p.numel() for p in model.parameters())

    def epochal_save(i: int) -> float:
        trainer.state.global_step = 1000 + i  # type: ignore[attr-defined]
        t0 = time.perf_counter()
        path = save_training_checkpoint(trainer._snapshot())  # type: ignore[attr-defined]
        dt = time.perf_counter() - t0
        shutil.rmtree(path)
        return dt

    def bare_save(i: int) -> float:
        path = root / f"bare-{i}.pt"
        t0 = time.perf_counter()
        with open(path, "wb") as f:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, f)
            f.flush()
            os.fsync(f.fileno())
        dt = time.perf_counter() - t0
        path.unlink()
        return dt

    e, b = [], []
    epochal_save(-1)
    bare_save(-1)
    for i in range(repeats):
        if i % 2:
            e.append(epochal_save(i))
            b.append(bare_save(i))
        else:
            b.append(bare_save(i))
            e.append(epochal_save(i))
    ratios = [x / y for x, y in zip(e, b)]
    shutil.rmtree(root, ignore_errors=True)
    rows = [
        ["bare torch.save(model+optimizer) + fsync", f"{statistics.median(b) * 1e3:.1f}", "1.00"],
        ["epochal save_training_checkpoint", f"{statistics.median(e) * 1e3:.1f}",
         f"{statistics.median(ratios):.2f} [{min(ratios):.2f}-{max(ratios):.2f}]"],
    ]
    return (f"### Checkpoint save, medium model ({n_params / 1e6:.2f}M params + AdamW state), "
            f"median of {repeats}\n\n" + table(rows, ["save", "ms", "ratio to bare (target <= 1.2)"]))


def part2(checkpoints: int, every: int) -> str:
    from epochal_core.training_checkpoint import save_training_checkpoint

    root = tempfile.mkdtemp(prefix="history-bench-", dir=os.environ.get("BENCH_DIR"))
    trainer = trained_trainer(TINY, root, save_total_limit=2)
    state = trainer.state  # type: ignore[attr-defined]
    state.log_history.clear()
    times: list[float] = []
    sizes: list[int] = []
    step = 0
    with quiet():
        for _ in range(checkpoints):
            for _ in range(every):
                step += 1
                state.global_step = step
                state.epoch = step / 1000
                trainer.log({"loss": 0.6931 + 1e-4 * step, "grad_norm": 0.5 + 1e-5 * step,  # type: ignore
                             "learning_rate": 1e-3 * (1 - step / 10**6)})
            t0 = time.perf_counter()
            path = save_training_checkpoint(trainer._snapshot())  # type: ignore[attr-defined]
            times.append(time.perf_counter() - t0)
            sizes.append(sum(f.stat().st_size for f in path.iterdir()))
    shutil.rmtree(root, ignore_errors=True)
    k = min(10, checkpoints // 2)
    first, last = statistics.median(times[:k]), statistics.median(times[-k:])
    rows = [
        [f"checkpoints 1-{k}", f"{first * 1e3:.1f}", "1.00", f"{sizes[0] / 1e3:.0f}"],
        [f"checkpoints {checkpoints - k + 1}-{checkpoints}", f"{last * 1e3:.1f}", f"{last / first:.2f}",
         f"{sizes[-1] / 1e3:.0f}"],
    ]
    return (f"### log_history growth: log every step, checkpoint every {every} steps, {checkpoints} checkpoints "
            f"({checkpoints * every} logs), tiny model\n\n"
            + table(rows, ["saves", "median ms", "ratio to first", "checkpoint folder kB"])
            + f"\n\nTotal time in the {checkpoints} saves: {sum(times):.1f} s "
            f"(the same {checkpoints} saves at the first saves' cost: {first * checkpoints:.1f} s).")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--checkpoints", type=int, default=1000)
    ns = p.parse_args(argv)
    torch.set_num_threads(1)
    silence_loggers()
    repeats, checkpoints = (3, 100) if ns.quick else (ns.repeats, ns.checkpoints)
    print(part1(repeats))
    print()
    print(part2(checkpoints, 10))
    return 0


if __name__ == "__main__":
    sys.exit(main())
