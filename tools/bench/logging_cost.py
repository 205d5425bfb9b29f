"""Cost of logging every step and every 10 steps (issues 7.3, 16): epochal's TensorBoard vs transformers.

    uv run --group bench python tools/bench/logging_cost.py            # ~2-3 min
    uv run --group bench python tools/bench/logging_cost.py --quick

Tiny workload (MLP 32-64-2, batch 32, 2000 steps, dict dataset through a
DataLoader), ``disable_tqdm=True`` everywhere (PrinterCallback prints each log,
into os.devnull). epochal's variants run in lockstep (turns of 250 steps, about
0.1 s at 2500 steps/s as the method in benchlib describes; shorter turns charge the
writer thread's hand-over more often), so all of them see the same moments of this noisy machine; in the
last counted step of each turn a variant drains its reporter queues and the
TensorBoard writer's thread writes out, so that work is done, and charged, within
the variant's own turn (this only shrinks its batches: it can overstate the cost,
never hide it).
transformers' variants run one after the other (its writer thread cannot be
drained), rotated every round:

  no logging         logging_strategy="no", report_to="none"
  log every step     logging_steps=1, report_to="none" (the log machinery + printing)
  + tensorboard      logging_steps=1, report_to=["tensorboard"]
  tqdm bar on        logging_steps=1 with the default progress bar, which writes each
                     log above the bar (epochal only)
  console off        the same, PrinterCallback removed (epochal only): what printing
                     a line per log costs
  every 10 steps     logging_steps=10, the realistic setting (epochal only)

"wall" is the training loop's steady steps/s (what the loop loses on this
2-core machine, the integration's threads running beside it); "cpu" is steps per
CPU-second of the whole process (all threads: the total work); "e2e" is the whole
train() call, which for epochal includes draining the reporter queue at the end.
"""

from __future__ import annotations

import argparse
import sys

import torch
from benchlib import (
    TINY,
    Result,
    Variant,
    eprint,
    fmt_ratio,
    fmt_spread,
    importable,
    interleave,
    make_data,
    median,
    paired_ratios,
    run_epochal,
    run_transformers,
    silence_loggers,
    table,
    turn_ratios,
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-anchors", action="store_true")
    p.add_argument("--only", nargs="+", metavar="VARIANT",
                   help="run only these of epochal's variants (and \"no logging\"), e.g. for more rounds")
    p.add_argument("--lockstep", type=int, default=250, metavar="STEPS",
                   help="turn length for epochal's variants (default 250); 0 runs them one after the other")
    ns = p.parse_args(argv)
    torch.set_num_threads(1)
    silence_loggers()
    w = TINY
    rounds = ns.rounds
    if ns.quick:
        w, rounds = TINY.scaled(steps=300, warm=50), 1
    data = make_data(w)
    groups: list[tuple[str, list[Variant]]] = [("epochal", [
        ("no logging", lambda w: run_epochal(w, data.dicts)),
        ("log every step", lambda w: run_epochal(w, data.dicts, logging_steps=1)),
        ("log every step + tensorboard",
         lambda w: run_epochal(w, data.dicts, logging_steps=1, report_to=["tensorboard"])),
        ("log every step, tqdm bar on", lambda w: run_epochal(w, data.dicts, logging_steps=1, tqdm=True)),
        ("log every step, console off", lambda w: run_epochal(w, data.dicts, console=False, logging_steps=1)),
        ("log every step + tensorboard, console off",
         lambda w: run_epochal(w, data.dicts, console=False, logging_steps=1, report_to=["tensorboard"])),
        ("log every 10 steps", lambda w: run_epochal(w, data.dicts, logging_steps=10)),
        ("log every 10 steps + tensorboard",
         lambda w: run_epochal(w, data.dicts, logging_steps=10, report_to=["tensorboard"])),
    ])]
    if ns.only:
        known = {name for name, _ in groups[0][1]}
        if unknown := set(ns.only) - known:
            p.error(f"--only: unknown variant(s) {sorted(unknown)}; choose from {sorted(known)}")
        groups[0][1][:] = [(name, run) for name, run in groups[0][1] if name == "no logging" or name in ns.only]
    if not ns.no_anchors and importable("transformers"):
        groups.append(("transformers", [
            ("no logging", lambda w: run_transformers(w, data.dicts)),
            ("log every step", lambda w: run_transformers(w, data.dicts, logging_steps=1)),
            ("log every step + tensorboard",
             lambda w: run_transformers(w, data.dicts, logging_steps=1, report_to=["tensorboard"])),
        ]))
    rows = []
    for lib, variants in groups:
        eprint(f"[logging] {lib}")
        res: dict[str, list[Result]] = interleave(variants, w, rounds, warmup=w.scaled(w.warm + 20, w.warm),
                                                  log=eprint, lockstep=ns.lockstep if lib == "epochal" else 0)
        ratios = {a: paired_ratios(res, "no logging", a) for a in ("steady", "cpu", "e2e")}
        turns = turn_ratios(res, "no logging") if all("turns" in r.extra for rs in res.values() for r in rs) else {}
        for name, rs in res.items():
            rows.append([lib, name, f"{median([r.steady for r in rs]):.1f}",
                         fmt_spread(turns[name]) if name in turns else "-", fmt_ratio(ratios["steady"][name]),
                         f"{median(ratios['cpu'][name]):.3f}", f"{median(ratios['e2e'][name]):.3f}",
                         f"{median([r.extra['t_after_last_forward'] for r in rs]) * 1e3:.0f}"])
    print(f"### Logging every step, tiny workload ({w.steps} steps, {rounds} rounds)\n")
    print(table(rows, ["library", "variant", "steps/s", "per-turn ratio, median [IQR]", "wall ratio to no logging",
                       "cpu ratio", "e2e ratio",
                       "ms after last forward"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
