"""A slow tracker (issue 3): what a 50 ms-per-log integration costs the training loop.

    uv run --group bench python tools/bench/slow_tracker.py            # ~1.5 min
    uv run --group bench python tools/bench/slow_tracker.py --quick

The tracker is an ``IntegrationCallback`` subclass passed in ``callbacks=``, so
epochal runs it through its background ``Reporter`` (queue of
``reporting.QUEUE_CAPACITY`` = 10,000 events; when full, the training thread
waits for room: nothing is dropped). Its ``log_metrics`` sleeps 50 ms (an HTTP
round trip: the GIL is released). Tiny workload, dict dataset,
``logging_steps=1``, ``--steps`` optimizer steps (default 300: the queue never
fills, and draining the backlog at train end takes ~steps x 50 ms).

Rows:
  baseline          logging every step, no tracker
  queued            the slow tracker on the reporter thread (default queue)
  queued, full      the same with the reporter's queue cut to --small-queue events after
                    construction (private attribute; shows the documented policy: once full,
                    the loop runs at the tracker's pace)
  inline            the same callback with ``run_inline = True`` (on the training thread)
  queued, CPU-bound a tracker that *computes* for 5 ms per log (holds the GIL): the
                    background thread then competes with the loop for the interpreter

Loop steps/s is the steady rate of the training loop (forwards ``warm``..last);
"drain" is the time from the last forward to train() returning (the queue
catching up, the final summary log included).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from typing import Any

import torch
from benchlib import TINY, Clock, Workload, _timed, epochal_trainer, eprint, make_data, silence_loggers, table


def tracker_class(delay: float, *, busy: bool = False, inline: bool = False) -> type:
    from epochal_core import IntegrationCallback

    class SlowTracker(IntegrationCallback):
        name = "slow"
        run_inline = inline

        def __init__(self) -> None:
            super().__init__()
            self.logged = 0

        def setup(self, args: Any, state: Any, model: Any, **kwargs: Any) -> None:
            pass

        def log_metrics(self, metrics: dict[str, float | int], step: int, state: Any) -> None:
            if busy:
                end = time.perf_counter() + delay
                while time.perf_counter() < end:
                    pass
            else:
                time.sleep(delay)
            self.logged += 1

        def finish(self, status: str) -> None:
            pass

    return SlowTracker


def run(w: Workload, data: Any, tracker: Any = None, small_queue: int = 0) -> dict[str, float]:
    clock = Clock(w.warm)
    callbacks = [tracker] if tracker is not None else None
    trainer = epochal_trainer(w, data.dicts, logging_steps=1, callbacks=callbacks, clock=clock)
    if small_queue:
        trainer._reporters[0].capacity = small_queue
    res = _timed(trainer.train, clock, w.steps)
    times = clock.times
    out = {"loop": res.steady, "drain_s": res.extra["t_after_last_forward"], "e2e": res.e2e,
           "logged": float(tracker.logged) if tracker is not None else float("nan")}
    if small_queue:
        gaps = [b - a for a, b in itertools.pairwise(times)]
        early = gaps[w.warm : small_queue - 10]
        late = gaps[small_queue + 20 :]
        out["early"] = 1 / statistics.mean(early) if early else float("nan")
        out["late"] = 1 / statistics.mean(late) if late else float("nan")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--delay", type=float, default=0.05)
    p.add_argument("--small-queue", type=int, default=100)
    ns = p.parse_args(argv)
    torch.set_num_threads(1)
    silence_loggers()
    steps, small = (60, 20) if ns.quick else (ns.steps, ns.small_queue)
    w = TINY.scaled(steps=steps, warm=10)
    data = make_data(w)
    run(w.scaled(steps=30, warm=10), data)  # warm-up
    rows = []
    base_rates = []
    results: list[tuple[str, dict[str, float]]] = []
    plan: list[tuple[str, Any, int]] = [
        ("baseline (log every step, no tracker)", None, 0),
        ("queued: 50 ms sleep per log", tracker_class(ns.delay)(), 0),
        ("baseline (log every step, no tracker)", None, 0),
        (f"queued, queue cut to {small}: 50 ms sleep", tracker_class(ns.delay)(), small),
        ("inline (run_inline=True): 50 ms sleep", tracker_class(ns.delay, inline=True)(), 0),
        ("queued: 5 ms CPU-bound per log (holds the GIL)", tracker_class(0.005, busy=True)(), 0),
        ("baseline (log every step, no tracker)", None, 0),
    ]
    for name, tracker, q in plan:
        eprint(f"[slow tracker] {name}")
        out = run(w, data, tracker, q)
        if tracker is None:
            base_rates.append(out["loop"])
        results.append((name, out))
    base = statistics.median(base_rates)
    seen_base = False
    for name, out in results:
        if name.startswith("baseline"):
            if seen_base:
                continue
            seen_base = True
            out = {**out, "loop": base}
        extra = ""
        if "early" in out:
            extra = f"before full: {out['early']:.0f} steps/s, after: {out['late']:.1f} steps/s"
        rows.append([name, f"{out['loop']:.1f}", f"{out['loop'] / base:.3f}", f"{out['drain_s']:.2f}",
                     f"{out['e2e']:.1f}", "" if out["logged"] != out["logged"] else f"{out['logged']:.0f}", extra])
    print(f"### Slow tracker, tiny workload, {steps} steps, logging_steps=1 (baseline: median of 3 runs)\n")
    print(table(rows, ["variant", "loop steps/s", "ratio to baseline", "drain s", "e2e steps/s",
                       "logs delivered", "queue"]))
    print(f"\nExpected drain for the queued 50 ms tracker: about {steps} x {ns.delay * 1e3:.0f} ms = "
          f"{steps * ns.delay:.1f} s (every log is delivered; the loop does not wait for them).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
