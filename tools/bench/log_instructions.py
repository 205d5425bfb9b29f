"""What one log costs, in CPU instructions counted by valgrind (deterministic, unlike time on a shared box).

    uv run --group bench python tools/bench/log_instructions.py            # ~8 min on 2 cores; needs valgrind
    uv run --group bench python tools/bench/log_instructions.py --logs 500

Wall-clock ratios on this 2-core shared machine move by 2-3 % between runs, as much as the
effects being tuned. Instruction counts do not. For each variant this runs the log path
(``Trainer.log`` minus the tensor reads: the log dict, ``log_history``, the handler's ``on_log``
with the default flow callback) ``--logs`` times and 0 times under ``valgrind --tool=callgrind``,
and prints the difference per log:

  base          no callback takes on_log (console off, no integration)
  printer       + the PrinterCallback (one line per log, to os.devnull)
  tensorboard   + TensorBoard through its Reporter, as report_to sets it up, with its writer's
                encoding (flush interval long enough for runs of a few hundred events, as when
                logging every step of a fast loop; the whole program runs ~50x slower under valgrind)
  printer+tensorboard

torch is imported in every variant, as in training. For scale: one step of the tiny workload
(32-64-2 MLP, batch 32, DataLoader, AdamW, clipping) is about 2.6 million instructions, so
26,000 instructions per log are 1 % of a step.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile

VARIANTS = ("base", "printer", "tensorboard", "printer+tensorboard")


def child(variant: str, logs: int) -> None:
    import torch  # noqa: F401  (as in a training run; the writer's long runs use it)
    from epochal_core.background import Reporter
    from epochal_core.control import TrainerControl
    from epochal_core.flow import DefaultFlowCallback
    from epochal_core.handler import CallbackHandler
    from epochal_core.progress import PrinterCallback
    from epochal_core.state import TrainerState
    from epochal_core.training_args import TrainingArguments

    folder = tempfile.mkdtemp()
    args = TrainingArguments(output_dir=folder, logging_steps=1, report_to="none", disable_tqdm=True)
    state, control = TrainerState(), TrainerControl()
    handler = CallbackHandler([DefaultFlowCallback()] + ([PrinterCallback()] if "printer" in variant else []))
    reporter = None
    if "tensorboard" in variant:
        from epochal_tensorboard import EventFileWriter, TensorBoardCallback

        assert EventFileWriter.__init__.__kwdefaults__ is not None
        EventFileWriter.__init__.__kwdefaults__["flush_interval"] = 4.0  # runs of a few hundred under valgrind
        callback = TensorBoardCallback(log_dir=folder)
        reporter = Reporter(callback, "tensorboard")
        handler.add_callback(callback, target=reporter)
        control = handler.on_train_begin(args, state, control)
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        for i in range(1, 30 + logs):  # 30 warm-up logs in both runs
            state.global_step = i
            state.epoch = i / 1000
            entry = {"loss": 0.69 - i * 1e-6, "grad_norm": 0.5 + i * 1e-6, "learning_rate": 1e-3 * (1 - i / 1e5),
                     "epoch": state.epoch}
            state.log_history.append({**entry, "step": i})
            control = handler.on_log(args, state, control, entry)
        if reporter is not None:
            handler.on_train_end(args, state, control)
            reporter.close()
    shutil.rmtree(folder, ignore_errors=True)


def instructions(variant: str, logs: int) -> int:
    with tempfile.TemporaryDirectory() as out:
        result = subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}/cg", sys.executable, __file__,
             "--child", variant, str(logs)],
            capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"}, check=True,
        )
    for line in result.stderr.splitlines():
        if "Collected :" in line:
            return int(line.split()[-1])
    raise RuntimeError(f"no instruction count in valgrind's output:\n{result.stderr[-2000:]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--logs", type=int, default=2000)
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="valgrind runs at once")
    p.add_argument("--child", nargs=2, metavar=("VARIANT", "LOGS"), help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    if ns.child:
        child(ns.child[0], int(ns.child[1]))
        return 0
    if shutil.which("valgrind") is None:
        print("valgrind is not installed: nothing to count.", file=sys.stderr)
        return 1
    print(f"### Instructions per log ({ns.logs} logs, callgrind)\n")
    print("| variant | instructions per log | % of a tiny-workload step (2.6 M) |")
    print("|---|---|---|")
    with concurrent.futures.ThreadPoolExecutor(max_workers=ns.jobs) as pool:  # each run is its own process
        counts = {(v, n): pool.submit(instructions, v, n) for v in VARIANTS for n in (0, ns.logs)}
        for variant in VARIANTS:
            per_log = (counts[variant, ns.logs].result() - counts[variant, 0].result()) / ns.logs
            print(f"| {variant} | {per_log:,.0f} | {100 * per_log / 2.6e6:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
