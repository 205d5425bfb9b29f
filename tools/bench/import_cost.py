"""Import cost (issue 7.5), fresh subprocesses, bytecode compiled first.

    uv run --group bench python tools/bench/import_cost.py            # ~1 min (+ compile on first run)
    uv run --group bench python tools/bench/import_cost.py --quick

Each snippet runs in a fresh ``python`` (``sys.executable``); the time is measured
inside the child around the import statement (interpreter start-up excluded),
snippets interleaved, median of ``--repeats`` runs after one discarded warm-up
run each (OS page cache). Before timing, the venv's site-packages and the
workspace ``src`` folders are byte-compiled (``compileall``; ``PYTHONDONTWRITEBYTECODE``
only stops *writing* caches, existing ones are read); ``__pycache__`` folders this
script creates under ``packages/`` are removed at the end so they never reach git.

It also checks that importing ``epochal_core`` plus every integration module,
or the meta-package ``epochal``, and constructing each integration callback, loads no tracker SDK
(dvclive, comet_ml, neptune, nor tensorboardX/tensorboard), and prints which a
TensorBoard callback that ran (``on_train_begin`` to ``on_train_end``) loaded:
tensorboardX, and comet_ml with it when installed (tensorboardX imports it). In
training that import runs on the reporter's thread. (That the other SDKs load once
their callback is used is tested in ``tests/test_contract.py``.)
"""

from __future__ import annotations

import argparse
import compileall
import json
import shutil
import site
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SDKS = ("tensorboardX", "tensorboard", "dvclive", "comet_ml", "neptune")

TEMPLATE = """
import sys, time, json
t0 = time.perf_counter()
{code}
dt = time.perf_counter() - t0
print(json.dumps({{"s": dt, "torch": "torch" in sys.modules,
                   "sdks": sorted(m for m in {sdks!r} if m in sys.modules)}}))
"""

SNIPPETS = {
    "epochal_core protocol names": "import epochal_core\nfrom epochal_core import (TrainerCallback, TrainerState, "
    "TrainerControl, TrainingArguments, CallbackHandler, DefaultFlowCallback, ProgressCallback)",
    "import torch": "import torch",
    "from epochal_core import Trainer": "from epochal_core import Trainer",
    "epochal_core + 4 integration modules": "import epochal_core, epochal_tensorboard, epochal_dvclive, "
    "epochal_comet, epochal_neptune",
    "... + construct the 4 callbacks": "import epochal_core, epochal_tensorboard, epochal_dvclive, "
    "epochal_comet, epochal_neptune\nepochal_tensorboard.TensorBoardCallback(); "
    "epochal_dvclive.DVCLiveCallback(); epochal_comet.CometCallback(); epochal_neptune.NeptuneCallback()",
    "import epochal (meta)": "import epochal",
    "from epochal import the 4 callbacks + construct": "from epochal import (TensorBoardCallback, "
    "DVCLiveCallback, CometCallback, NeptuneCallback)\nTensorBoardCallback(); DVCLiveCallback(); "
    "CometCallback(); NeptuneCallback()",
    "from epochal import Trainer": "from epochal import Trainer",
}
ANCHORS = {
    "from transformers import Trainer": "from transformers import Trainer",
    "import lightning.pytorch": "import lightning.pytorch",
}
USED = """
import sys, tempfile, epochal_tensorboard
from epochal_core import TrainingArguments, TrainerState, TrainerControl
cb = epochal_tensorboard.TensorBoardCallback(log_dir=tempfile.mkdtemp())
cb.on_train_begin(TrainingArguments(output_dir=tempfile.mkdtemp(), report_to="none"), TrainerState(),
                  TrainerControl(), model=None)
cb.on_train_end(TrainingArguments(output_dir=tempfile.mkdtemp(), report_to="none"), TrainerState(), TrainerControl())
print("SDK modules loaded by a TensorBoard callback that ran:",
      sorted(m for m in {sdks!r} if m in sys.modules) or "none")
"""


def compile_bytecode() -> list[Path]:
    """Byte-compile site-packages and the workspace sources; return the __pycache__ dirs created under packages/."""
    src_dirs = sorted(ROOT.glob("packages/*/src"))
    before = {p for d in src_dirs for p in d.rglob("__pycache__")}
    for sp in site.getsitepackages():
        compileall.compile_dir(sp, quiet=2, workers=2)
    for d in src_dirs:
        compileall.compile_dir(str(d), quiet=2)
    return sorted({p for d in src_dirs for p in d.rglob("__pycache__")} - before)


def run_child(code: str) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-c", TEMPLATE.format(code=code, sdks=SDKS)],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--no-anchors", action="store_true")
    p.add_argument("--no-compile", action="store_true")
    ns = p.parse_args(argv)
    created: list[Path] = []
    try:
        if not ns.no_compile:
            print("compiling bytecode...", file=sys.stderr, flush=True)
            created = compile_bytecode()
        snippets = dict(SNIPPETS)
        if not ns.no_anchors:
            snippets.update(ANCHORS)
        repeats = 2 if ns.quick else ns.repeats
        for code in snippets.values():  # warm-up: page cache
            run_child(code)
        samples: dict[str, list[dict[str, object]]] = {k: [] for k in snippets}
        for _ in range(repeats):
            for name, code in snippets.items():
                samples[name].append(run_child(code))
        med = {k: statistics.median(float(s["s"]) for s in v) * 1e3 for k, v in samples.items()}  # type: ignore
        # Same-round differences to `import torch` (its own time swings by hundreds of ms here).
        paired = {k: statistics.median((float(a["s"]) - float(b["s"])) * 1e3  # type: ignore[arg-type]
                                       for a, b in zip(v, samples["import torch"])) for k, v in samples.items()}
        rows = []
        targets = {"epochal_core protocol names": "< 50 ms",
                   "from epochal_core import Trainer": "< import torch + 150 ms",
                   "import epochal (meta)": "no tracker SDK",
                   "from epochal import the 4 callbacks + construct": "no tracker SDK"}
        for name, v in samples.items():
            last = v[-1]
            rows.append([name, f"{med[name]:.0f}", f"{min(float(s['s']) for s in v) * 1e3:.0f}",  # type: ignore
                         f"{paired[name]:+.0f}" if last["torch"] else "", str(last["torch"]),
                         ", ".join(last["sdks"]) or "none", targets.get(name, "")])  # type: ignore
        print(f"### Import cost, fresh subprocesses, median of {repeats} (bytecode compiled)\n")
        header = ["import", "median ms", "min ms", "minus import torch (paired median)", "torch loaded",
                  "SDKs loaded", "target"]
        print(_table(rows, header))
        used = subprocess.run([sys.executable, "-c", USED.format(sdks=SDKS)], capture_output=True, text=True,
                              cwd=ROOT, check=True)
        print("\n" + used.stdout.strip())
    finally:
        for path in created:
            shutil.rmtree(path, ignore_errors=True)
    return 0


def _table(rows: list[list[str]], header: list[str]) -> str:
    sys.path.insert(0, str(Path(__file__).parent))
    from benchlib import table

    return table(rows, header)


if __name__ == "__main__":
    sys.exit(main())
