"""Per-step framework overhead (issue 7): hand-written loops vs epochal vs transformers vs Lightning.

    uv run --group bench python tools/bench/overhead.py            # both workloads, ~4 min
    uv run --group bench python tools/bench/overhead.py --quick    # smoke run

Variants, run interleaved in this process (order rotated every round, one
warm-up round first), all on the same model init, data, AdamW, linear schedule,
clipping at 1.0, optimizer-step count, one torch thread, with logging, evaluation
and checkpointing off (``logging_strategy="no"`` / ``logger=False``). The tiny
workload is the one users measure: MLP 32-64-2, batch 32, 1500 steps.

  a    hand loop, default DataLoader over a map-style dataset of dicts (default_collate)
  a'   hand loop indexing whole batches from tensors (the physical limit)
  b    epochal Trainer as a user runs it: its own AdamW and linear schedule from
       TrainingArguments, same dict dataset, tqdm off (PrinterCallback) / on (bar into os.devnull)
  b"   epochal Trainer given the hand loop's optimizer and schedule objects (loop cost alone)
  b'   epochal Trainer on a TensorDataset (its TensorBatchLoader fast path)
  c    transformers Trainer, same dict dataset, tqdm off / on
  d    Lightning, same DataLoader, progress bar off / on

Ratios to (a): "turn" is the median over every lockstep turn of the two
variants' steps/s in the same cycle (the figure to trust on a shared machine);
"steady" and "e2e" are medians of per-round ratios (per-step cost after the
first ``warm`` forwards; the whole ``train()``/``fit()`` call, setup included,
which is what a stopwatch around ``train()`` sees).
"""

from __future__ import annotations

import argparse
import sys

import torch
from benchlib import (
    MEDIUM,
    TINY,
    Data,
    Result,
    Variant,
    Workload,
    environment,
    eprint,
    fmt_ratio,
    fmt_spread,
    importable,
    interleave,
    make_data,
    median,
    paired_ratios,
    run_epochal,
    run_hand_dataloader,
    run_hand_indexed,
    run_lightning,
    run_transformers,
    silence_loggers,
    table,
    turn_ratios,
)

TARGETS = {
    ("tiny", "b  epochal, tqdm off"): 0.95,
    ("tiny", "b  epochal, tqdm on"): 0.90,
    ("medium", "b  epochal, tqdm off"): 0.99,
    ("medium", "b  epochal, tqdm on"): 0.99,
}


BASE = "a  hand loop, DataLoader"


def variant_groups(data: Data, anchors: bool, device: str) -> list[list[Variant]]:
    """Two groups (tqdm off, tqdm on), each with (a) as its base.

    One transformers Trainer per group: accelerate's GradientState is a process-wide
    singleton, so two of them must not run in lockstep.
    """
    hf = anchors and importable("transformers") and importable("accelerate")
    pl = anchors and importable("lightning") and device == "cpu"
    off: list[Variant] = [
        (BASE, lambda w: run_hand_dataloader(w, data, device)),
        ("a' hand loop, indexed batches", lambda w: run_hand_indexed(w, data, device)),
        ("b  epochal, tqdm off", lambda w: run_epochal(w, data.dicts, device=device, own_optimizer=True)),
        ('b" epochal given the loop\'s optimizer', lambda w: run_epochal(w, data.dicts, device=device)),
        ("b' epochal TensorDataset, tqdm off",
         lambda w: run_epochal(w, data.tensors, device=device, own_optimizer=True)),
    ]
    on: list[Variant] = [
        (BASE, lambda w: run_hand_dataloader(w, data, device)),
        ("b  epochal, tqdm on", lambda w: run_epochal(w, data.dicts, tqdm=True, device=device, own_optimizer=True)),
    ]
    if hf:
        off.append(("c  transformers, tqdm off", lambda w: run_transformers(w, data.dicts, device=device)))
        on.append(("c  transformers, tqdm on", lambda w: run_transformers(w, data.dicts, tqdm=True, device=device)))
    if pl:
        off.append(("d  lightning, bar off", lambda w: run_lightning(w, data, device=device)))
        on.append(("d  lightning, bar on", lambda w: run_lightning(w, data, tqdm=True, device=device)))
    return [off, on]


ORDER = [
    BASE, "a' hand loop, indexed batches", "b  epochal, tqdm off", "b  epochal, tqdm on",
    'b" epochal given the loop\'s optimizer',
    "b' epochal TensorDataset, tqdm off", "c  transformers, tqdm off", "c  transformers, tqdm on",
    "d  lightning, bar off", "d  lightning, bar on",
]


def report(w: Workload, groups: list[dict[str, list[Result]]], mode: str) -> str:
    results: dict[str, list[Result]] = {}
    ratios: dict[str, dict[str, list[float]]] = {"steady": {}, "p50": {}, "cpu": {}, "e2e": {}}
    turns: dict[str, list[float]] = {}
    for g in groups:
        for attr in ratios:
            for name, values in paired_ratios(g, BASE, attr).items():
                ratios[attr].setdefault(name, values)
        if all("turns" in r.extra for rs in g.values() for r in rs):
            for name, values in turn_ratios(g, BASE).items():
                turns.setdefault(name, values)
        for name, rs in g.items():
            results.setdefault(name, rs)
    rows = []
    for name in sorted(results, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER)):
        rs = results[name]
        target = TARGETS.get((w.name, name))
        verdict = ""
        if target is not None:
            got = median(turns[name]) if name in turns else median(ratios["steady"][name])
            verdict = f">= {target}: " + ("met" if got >= target else "MISSED")
        rows.append([
            name,
            f"{median([r.steady for r in rs]):.1f}",
            f"{1e6 / median([r.steady for r in rs]):.0f}",
            fmt_spread(turns[name]) if name in turns else "-",
            fmt_ratio(ratios["steady"][name]),
            f"{median(ratios['p50'][name]):.3f}",
            f"{median(ratios['cpu'][name]):.3f}",
            f"{median(ratios['e2e'][name]):.3f}",
            verdict,
        ])
    rounds = len(results[BASE])
    head = (f"### {w.name}: MLP {'-'.join(map(str, w.sizes))}, batch {w.batch_size}, {w.steps} steps "
            f"(steady window: steps {w.warm}..{w.steps}), {rounds} rounds, {mode}")
    note = ("steps/s and us/step: steady state (mean over the window). Ratios to (a): turn = per lockstep turn, "
            "pooled over rounds (median [IQR]); the others per round (median [min-max] for wall): wall = steady "
            "steps/s; p50 = 1/median step time; cpu = steps per CPU-second of the process; e2e = the whole "
            "train()/fit() call (setup and teardown included). Target verdicts use the turn ratio.")
    return head + "\n\n" + table(
        rows, ["variant", "steps/s", "us/step", "turn ratio to a", "wall ratio to a", "p50 ratio", "cpu ratio",
               "e2e ratio", "target"]) + "\n\n" + note


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer steps and rounds (smoke run; figures are noisy)")
    p.add_argument("--repeats", type=int, default=None, help="rounds per workload (default 4 tiny, 3 medium)")
    p.add_argument("--workloads", default="tiny,medium")
    p.add_argument("--no-anchors", action="store_true", help="skip transformers and Lightning")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda; Lightning is skipped on cuda")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--lockstep", type=int, default=50,
                   help="variants take turns every N tiny steps (N//12 medium steps) inside one round (default 50); "
                   "0 = one after the other")
    ns = p.parse_args(argv)
    torch.set_num_threads(ns.threads)
    silence_loggers()
    print(f"environment: {environment()}, device {ns.device}\n")
    for name in ns.workloads.split(","):
        # The tiny run users time: 1500 steps (a warm-up of 100 forwards is left out of "steady").
        w = {"tiny": TINY.scaled(steps=1500, warm=100), "medium": MEDIUM}[name]
        repeats = ns.repeats or (4 if name == "tiny" else 3)
        if ns.quick:
            w = w.scaled(steps=300 if name == "tiny" else 20, warm=50 if name == "tiny" else 5)
            repeats = 1
        warm = w.scaled(steps=w.warm + 20, warm=w.warm)
        data = make_data(w)
        eprint(f"[{name}] {repeats} rounds")
        # Turns of ~0.1 s: 50 tiny steps, 4 medium ones.
        chunk = ns.lockstep if ns.lockstep <= 0 or name == "tiny" else max(2, ns.lockstep // 12)
        groups = [
            interleave(g, w, repeats, warmup=warm, log=eprint, lockstep=chunk)
            for g in variant_groups(data, not ns.no_anchors, ns.device)
        ]
        mode = f"lockstep turns of {chunk} steps" if chunk else "variants one after the other"
        print(report(w, groups, mode))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
