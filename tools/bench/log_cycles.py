"""What logging every step costs a training step, in simulated CPU cycles (deterministic).

    uv run --group bench python tools/bench/log_cycles.py          # ~20 min on 2 cores; needs valgrind
    uv run --group bench python tools/bench/log_cycles.py --steps 100 --variants "no logging" "+ tensorboard"

Wall-clock ratios on this 2-core shared machine move by several percent between runs, more
than the cost being measured, and ``log_instructions.py`` counts instructions only: it misses
that a log's code, run once between two training steps, finds the CPU caches filled by the
step (measured with a timer around ``Trainer.log`` in the loop: about three times its cost in
a tight loop). This script runs the real Trainer on the tiny workload (MLP 32-64-2, batch 32,
DataLoader, AdamW, clipping; ``disable_tqdm=True``) under ``valgrind --tool=callgrind
--cache-sim=yes --branch-sim=yes`` and counts ``--steps`` steps in the middle of training: the
simulation starts at step 120 (imports, set-up and the first steps run at valgrind's lowest
slowdown), the counters are zeroed at step 160 and dumped ``--steps`` steps later. By step 160
the simulated caches are warm, and what a real run does once (tensorboardX's import on the
reporter's thread) has been done.

Work that epochal batches by time (the console's lines every 0.1 s, the reporters' queues and
TensorBoard's writer thread every 0.2 s) would come ~100 times more often
under valgrind, which runs the program ~100 times slower: batches of one or two logs instead
of the hundred or so of a real run, and a count that depends on timing. So here those
intervals are set to never, and at the last counted step all of it is done at once (the
lines written, the queues run, the TensorBoard events written), inside the count:
one batch per ``--steps`` logs, as at a real run's pace of ~700 steps/s with 0.2 s batches.
Per step:

  instructions   instructions executed (all threads: the TensorBoard writer's too)
  cycles         valgrind's cycle estimate: Ir + 10 x (L1 misses + mispredicted branches)
                 + 100 x last-level misses, for its simulated caches of this machine's sizes

and each variant's cycles per step relative to "no logging" (what the loop would keep if
time followed the estimate). Variants: "no logging"; "log every step" with the printer
removed (the log machinery alone); "+ printer" (a line per log, to os.devnull);
"+ tensorboard" (printer removed); "+ printer + tensorboard" (the defaults).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Any

VARIANTS = {
    "no logging": {"logging_steps": None, "console": False},
    "log every step": {"logging_steps": 1, "console": False},
    "+ printer": {"logging_steps": 1, "console": True},
    "+ tensorboard": {"logging_steps": 1, "console": False, "report_to": ["tensorboard"]},
    "+ printer + tensorboard": {"logging_steps": 1, "console": True, "report_to": ["tensorboard"]},
}
#: callgrind's event names, as its summary line lists them.
_EVENTS = ("Ir", "I1mr", "ILmr", "Dr", "D1mr", "DLmr", "Dw", "D1mw", "DLmw", "Bc", "Bcm", "Bi", "Bim")


#: Steps at which the child starts valgrind's simulation and zeroes its counters.
_INSTRUMENT_AT, _ZERO_AT = 120, 160


def child(variant: str, steps: int) -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import torch
    from benchlib import TINY, epochal_trainer, make_data, silence_loggers
    from epochal_core import PrinterCallback, TrainerCallback, reporting

    class Markers(TrainerCallback):
        # Runs in every variant alike, so its own cost cancels out of the ratios.
        def on_step_end(self, args: object, state: Any, control: object, **kwargs: object) -> None:
            step = state.global_step
            if step == _INSTRUMENT_AT:
                # callgrind_control waits for valgrind to take the command: keep executing meanwhile.
                control_process = subprocess.Popen(["callgrind_control", "-i", "on", str(os.getpid())],
                                                   stdout=subprocess.DEVNULL)
                while control_process.poll() is None:
                    sum(range(1000))
            elif step == _ZERO_AT:
                finish_batches()  # what a real run does once (a new layout's tables) stays out of the count
                os.getppid()  # valgrind --zero-before=getppid
            elif step == _ZERO_AT + steps:
                finish_batches()
                os.getpgrp()  # valgrind --dump-before=getpgrp

    def finish_batches() -> None:
        for callback in trainer.callback_handler.callbacks:
            if isinstance(callback, PrinterCallback):
                callback._write_pending()
        trainer._drain_reporters()
        for callback in trainer.callback_handler.callbacks:
            writer = getattr(callback, "event_writer", None)
            if writer is not None:  # TensorBoard's writer thread
                writer.write_out()

    torch.set_num_threads(1)
    silence_loggers()
    never = 1e9
    reporting.BATCH_INTERVAL = never  # the reporters run their queues only when drained
    with contextlib.suppress(ImportError):
        from epochal_tensorboard import _writer

        _writer.WRITE_INTERVAL = never  # TensorBoard's writer thread writes only when asked
    options = dict(VARIANTS[variant])
    console = options.pop("console")
    w = TINY.scaled(steps=_ZERO_AT + steps + 10, warm=1)
    trainer = epochal_trainer(w, make_data(w).dicts, callbacks=[Markers()], **options)
    printer = trainer.pop_callback(PrinterCallback)
    if console:
        printer.write_interval = never
        trainer.add_callback(printer)
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        trainer.train()


def events(variant: str, steps: int) -> dict[str, int]:
    """callgrind's counts over ``steps`` steps of ``variant``."""
    with tempfile.TemporaryDirectory() as out:
        subprocess.run(
            ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--cache-sim=yes", "--branch-sim=yes",
             "--zero-before=getppid", "--dump-before=getpgrp", f"--callgrind-out-file={out}/cg",
             sys.executable, __file__, "--child", variant, str(steps)],
            capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"}, check=True,
        )
        with open(f"{out}/cg.1") as f:  # the dump at the last counted step
            text = f.read()
    names = re.search(r"^events: (.+)$", text, re.M)
    totals = re.search(r"^summary: (.+)$", text, re.M)
    if names is None or totals is None:
        raise RuntimeError(f"no totals in callgrind's output for {variant!r}")
    return {name: int(value) / steps for name, value in zip(names.group(1).split(), totals.group(1).split())}


def cycles(counts: dict[str, float]) -> float:
    """valgrind's cycle estimate (KCachegrind's CEst without bus events)."""
    l1 = counts["I1mr"] + counts["D1mr"] + counts["D1mw"]
    last_level = counts["ILmr"] + counts["DLmr"] + counts["DLmw"]
    return counts["Ir"] + 10 * (l1 + counts["Bcm"] + counts["Bim"]) + 100 * last_level


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200, help="steps counted (default 200)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="valgrind runs at once")
    p.add_argument("--child", nargs=2, metavar=("VARIANT", "STEPS"), help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    if ns.child:
        child(ns.child[0], int(ns.child[1]))
        return 0
    if shutil.which("valgrind") is None:
        print("valgrind is not installed: nothing to count.", file=sys.stderr)
        return 1
    variants = ["no logging", *[v for v in ns.variants if v != "no logging"]]
    print(f"### One training step, tiny workload (callgrind, {ns.steps} steps counted)\n")
    print("| variant | instructions per step | cycles per step (estimate) | L1 misses per step "
          "| mispredicted branches per step | cycles ratio to no logging |")
    print("|---|---|---|---|---|---|")
    with concurrent.futures.ThreadPoolExecutor(max_workers=ns.jobs) as pool:  # each run is its own process
        runs = {v: pool.submit(events, v, ns.steps) for v in variants}
        base = None
        for variant in variants:
            step = runs[variant].result()
            est = cycles(step)
            base = base or est
            l1 = step["I1mr"] + step["D1mr"] + step["D1mw"]
            print(f"| {variant} | {step['Ir']:,.0f} | {est:,.0f} | {l1:,.0f} | {step['Bcm'] + step['Bim']:,.0f} "
                  f"| {base / est:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
