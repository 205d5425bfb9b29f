"""Callback dispatch cost (issue 7.2): epochal's CallbackHandler vs transformers'.

    uv run --group bench python tools/bench/dispatch.py            # ~2 min
    uv run --group bench python tools/bench/dispatch.py --quick

Part 1, handler in a tight loop: the four per-update events (on_step_begin,
on_pre_optimizer_step, on_optimizer_step, on_step_end) are called on a handler
holding the default callbacks (DefaultFlowCallback + PrinterCallback), plus 10
callbacks that override nothing, or 10 whose on_step_end is a no-op. Same
args/state/control objects for every call; configurations interleaved, median
of rounds. The "added" column is the difference to the default handler.

Part 2, full loop: the tiny workload (TensorDataset for epochal, so the
per-step floor is low) with 0 / 10 do-nothing / 10 on_step_end callbacks, run
in lockstep; added us/step = 1/rate - 1/rate(0 callbacks), from CPU time and from
the median step time. transformers with 0 / 10 on_step_end callbacks for comparison.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from benchlib import (
    TINY,
    Result,
    Variant,
    eprint,
    importable,
    interleave,
    make_data,
    median,
    run_epochal,
    run_transformers,
    silence_loggers,
    table,
    temp_dir,
)

N_CALLBACKS = 10


def make_callbacks(base: type, kind: str) -> list[Any]:
    if kind == "none":
        return []
    if kind == "nothing":
        cls = type("Nothing", (base,), {})
    else:
        def on_step_end(self: Any, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            return None

        cls = type("StepEnd", (base,), {"on_step_end": on_step_end})
    # Distinct classes, so no "already have one" warning and no dedup anywhere.
    return [type(f"{cls.__name__}{i}", (cls,), {})() for i in range(N_CALLBACKS)]


def epochal_handler(kind: str) -> tuple[Any, Any, Any, Any]:
    from epochal_core import (
        CallbackHandler,
        DefaultFlowCallback,
        PrinterCallback,
        TrainerCallback,
        TrainerControl,
        TrainerState,
        TrainingArguments,
    )

    args = TrainingArguments(output_dir=temp_dir("dispatch-"), report_to="none", logging_strategy="no",
                             save_strategy="no", max_steps=10**9)
    state = TrainerState(max_steps=10**9)
    handler = CallbackHandler([DefaultFlowCallback(), *make_callbacks(TrainerCallback, kind), PrinterCallback()])
    return handler, args, state, TrainerControl()


def hf_handler(kind: str) -> tuple[Any, Any, Any, Any]:
    from transformers import TrainingArguments
    from transformers.trainer_callback import (
        CallbackHandler,
        DefaultFlowCallback,
        PrinterCallback,
        TrainerCallback,
        TrainerControl,
        TrainerState,
    )

    args = TrainingArguments(output_dir=temp_dir("dispatch-"), report_to="none", logging_strategy="no",
                             save_strategy="no", max_steps=10**9, use_cpu=True)
    state = TrainerState(max_steps=10**9, logging_steps=500, eval_steps=500, save_steps=500)
    callbacks = [DefaultFlowCallback(), *make_callbacks(TrainerCallback, kind), PrinterCallback()]
    handler = CallbackHandler(callbacks, None, None, None, None)
    return handler, args, state, TrainerControl()


def time_handler(setup: tuple[Any, Any, Any, Any], n: int, only_step_end: bool) -> float:
    """Microseconds per 'update' (4 events) or per on_step_end call."""
    handler, args, state, control = setup
    t0 = time.perf_counter()
    if only_step_end:
        for _ in range(n):
            control = handler.on_step_end(args, state, control)
    else:
        for _ in range(n):
            control = handler.on_step_begin(args, state, control)
            control = handler.on_pre_optimizer_step(args, state, control)
            control = handler.on_optimizer_step(args, state, control)
            control = handler.on_step_end(args, state, control)
    return (time.perf_counter() - t0) / n * 1e6


def part1(n: int, rounds: int) -> str:
    libs: dict[str, Callable[[str], tuple[Any, Any, Any, Any]]] = {"epochal": epochal_handler}
    if importable("transformers"):
        libs["transformers"] = hf_handler
    kinds = ["none", "nothing", "step_end"]
    setups = {(lib, kind): fn(kind) for lib, fn in libs.items() for kind in kinds}
    samples: dict[tuple[str, str, bool], list[float]] = {}
    for _ in range(rounds):
        for key, setup in setups.items():
            for only in (True, False):
                samples.setdefault((*key, only), []).append(time_handler(setup, n, only))
    rows = []
    for lib in libs:
        for kind in kinds:
            step_end = median(samples[(lib, kind, True)])
            update = median(samples[(lib, kind, False)])
            added_se = step_end - median(samples[(lib, "none", True)])
            added_up = update - median(samples[(lib, "none", False)])
            label = {"none": "default callbacks only", "nothing": f"+{N_CALLBACKS} overriding nothing",
                     "step_end": f"+{N_CALLBACKS} no-op on_step_end"}[kind]
            rows.append([lib, label, f"{step_end:.2f}", f"{added_se:+.2f}", f"{update:.2f}", f"{added_up:+.2f}"])
    return (f"### Handler in a tight loop ({n} calls x {rounds} rounds, median)\n\n"
            + table(rows, ["library", "callbacks", "on_step_end us", "added us", "4 step events us",
                           "added us/update"]))


def part2(steps: int, rounds: int, anchors: bool) -> str:
    w = TINY.scaled(steps=steps, warm=min(100, steps // 4))
    data = make_data(w)
    from epochal_core import TrainerCallback

    variants: list[Variant] = [
        ("epochal, 0 extra", lambda w: run_epochal(w, data.tensors)),
        ("epochal, +10 overriding nothing",
         lambda w: run_epochal(w, data.tensors, callbacks=make_callbacks(TrainerCallback, "nothing"))),
        ("epochal, +10 no-op on_step_end",
         lambda w: run_epochal(w, data.tensors, callbacks=make_callbacks(TrainerCallback, "step_end"))),
    ]
    if anchors and importable("transformers"):
        from transformers import TrainerCallback as HFCallback

        variants += [
            ("transformers, 0 extra", lambda w: run_transformers(w, data.dicts)),
            ("transformers, +10 no-op on_step_end",
             lambda w: run_transformers(w, data.dicts, callbacks=make_callbacks(HFCallback, "step_end"))),
        ]
    # One transformers Trainer per lockstep round would be needed for strict safety (accelerate's
    # GradientState is process-wide), so the transformers pair runs one after the other.
    ep = [v for v in variants if v[0].startswith("epochal")]
    hf = [v for v in variants if v[0].startswith("transformers")]
    res: dict[str, list[Result]] = interleave(ep, w, rounds, warmup=w.scaled(w.warm + 20, w.warm), lockstep=50)
    if hf:
        res.update(interleave(hf, w, rounds, warmup=w.scaled(w.warm + 20, w.warm)))
    rows = []
    for name, rs in res.items():
        base = res[("epochal" if name.startswith("epochal") else "transformers") + ", 0 extra"]
        added_cpu = median([1e6 / r.cpu - 1e6 / b.cpu for r, b in zip(rs, base)])
        added_p50 = median([1e6 / r.p50 - 1e6 / b.p50 for r, b in zip(rs, base)])
        rows.append([name, f"{median([r.steady for r in rs]):.1f}", f"{1e6 / median([r.cpu for r in rs]):.0f}",
                     f"{added_cpu:+.1f}", f"{added_p50:+.1f}"])
    return (f"### Full loop, tiny workload ({steps} steps, {rounds} rounds; epochal on its TensorDataset path "
            "in lockstep, transformers on dicts one after the other)\n\n"
            + table(rows, ["variant", "steps/s", "cpu us/step", "added cpu us/step", "added p50 us/step"]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-anchors", action="store_true", help="skip transformers in the full-loop part")
    ns = p.parse_args(argv)
    torch.set_num_threads(1)
    silence_loggers()
    n, rounds, steps, loop_rounds = (2000, 3, 300, 1) if ns.quick else (20000, 7, 2000, 3)
    print(part1(n, rounds))
    print()
    eprint("[dispatch] full loop")
    print(part2(steps, loop_rounds, not ns.no_anchors))
    return 0


if __name__ == "__main__":
    sys.exit(main())
