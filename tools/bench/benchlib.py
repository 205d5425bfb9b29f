"""Shared pieces of the epochal benchmarks: workloads, a framework-neutral clock, runners, statistics.

Every runner trains the *same* model (same init, seed 0), with the same AdamW
(built here, passed to each framework), the same linear-decay schedule stepped
once per optimizer update, gradient clipping at 1.0, the same data and the same
number of optimizer steps. No evaluation, no checkpoints, no tracker unless a
benchmark asks for one.

Timing is framework-neutral: the model's ``forward`` ticks a :class:`Clock`.
"steady" steps/s counts the forwards after the first ``warm`` ones up to the last
one (per-step cost only: no setup, no teardown); "e2e" steps/s is ``steps /
wall time of the train call`` (includes dataloader/trainer setup inside
``train()``/``fit()`` and, for integrations, draining their queue at the end).

Console output of every framework (tqdm bars, printed logs) goes to
``os.devnull`` while a run is timed: formatting costs are paid, a terminal's are not.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import itertools
import logging
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

MAX_GRAD_NORM = 1.0
_TEMP_DIRS: list[str] = []


def temp_dir(prefix: str) -> str:
    """A temporary folder removed when the process exits (trainers want an output_dir)."""
    path = tempfile.mkdtemp(prefix=prefix)
    _TEMP_DIRS.append(path)
    return path


@atexit.register
def _cleanup() -> None:
    for path in _TEMP_DIRS:
        shutil.rmtree(path, ignore_errors=True)


@dataclass(frozen=True)
class Workload:
    name: str
    sizes: tuple[int, ...]
    batch_size: int
    steps: int
    n_samples: int
    warm: int  # forwards excluded from the steady-state window
    lr: float = 1e-3

    def scaled(self, steps: int, warm: int) -> Workload:
        return Workload(self.name, self.sizes, self.batch_size, steps, self.n_samples, warm, self.lr)


#: 32-64-2 MLP, batch 32: per-step framework overhead is a large share of the step.
TINY = Workload("tiny", (32, 64, 2), 32, 2000, 32 * 1000, 100)
#: 256-1024-1024-10 MLP (~1.3M params), batch 128: compute dominates (~20-30 ms/step on 1 thread).
MEDIUM = Workload("medium", (256, 1024, 1024, 10), 128, 80, 128 * 100, 10)


# -- clock and model --------------------------------------------------------------------


class Clock:
    """Ticked by the model's forward; framework-neutral step timing."""

    def __init__(self, warm: int, keep_all: bool = True) -> None:
        self.warm = warm
        self.keep_all = keep_all
        self.calls = 0
        self.t_warm = 0.0
        self.t_last = 0.0
        self.c_warm = 0.0
        self.c_last = 0.0
        self.times: list[float] = []

    def tick(self) -> None:
        self.calls += 1
        t = time.perf_counter()
        c = time.process_time()
        if self.calls == self.warm:
            self.t_warm = t
            self.c_warm = c
        self.t_last = t
        self.c_last = c
        if self.keep_all:
            self.times.append(t)

    def p50_rate(self) -> float:
        """1 / median step time in the steady window (robust to other processes' spikes)."""
        t = self.times[self.warm - 1 :]
        return 1.0 / statistics.median(b - a for a, b in itertools.pairwise(t))

    def cpu_rate(self) -> float:
        """Steps per CPU-second of this process (all its threads) in the steady window."""
        return (self.calls - self.warm) / (self.c_last - self.c_warm)

    def steady_rate(self) -> float:
        if self.calls <= self.warm:
            raise RuntimeError(f"only {self.calls} forwards, fewer than warm={self.warm}")
        return (self.calls - self.warm) / (self.t_last - self.t_warm)


class Baton:
    """Round-robin turns between variant threads: exactly one runs at a time."""

    def __init__(self, names: Sequence[str], chunk: int) -> None:
        self.order = list(names)
        self.active = set(names)
        self.chunk = chunk
        self.events = {n: threading.Event() for n in names}
        self.lock = threading.Lock()

    def _next(self, name: str) -> str | None:
        i = self.order.index(name)
        for k in range(1, len(self.order) + 1):
            candidate = self.order[(i + k) % len(self.order)]
            if candidate in self.active:
                return candidate
        return None

    def wait_turn(self, name: str) -> None:
        self.events[name].wait()
        self.events[name].clear()

    def yield_turn(self, name: str) -> None:
        with self.lock:
            nxt = self._next(name)
        if nxt is None or nxt == name:
            return
        self.events[nxt].set()
        self.wait_turn(name)

    def finish(self, name: str) -> None:
        with self.lock:
            self.active.discard(name)
            nxt = self._next(name)
        if nxt is not None:
            self.events[nxt].set()


class LockstepClock(Clock):
    """A clock that hands the CPU to the next variant every ``chunk`` forwards.

    Only step intervals that ran entirely within one turn are counted (the one
    spanning a hand-over is dropped), so every variant is measured on the same
    moments of a noisy machine, ``chunk`` steps at a time.
    """

    def __init__(self, warm: int, baton: Baton, name: str) -> None:
        super().__init__(warm)
        self.baton = baton
        self.name = name
        self.last: float | None = None
        self.last_c = 0.0
        self.acc = 0.0
        self.acc_cpu = 0.0
        self.n = 0
        self.wait_total = 0.0
        self.intervals: list[float] = []
        #: Mean step time of each turn's counted steps, in turn order: turn k of every variant in
        #: a round ran in the same cycle, so the k-th entries of two variants are a close pair.
        self.turns: list[float] = []
        self._turn_acc = 0.0
        self._turn_n = 0
        #: Called inside the last counted step of each turn: work a variant left to its own
        #: background threads (a reporter's queue) is done, and charged, within its turn.
        self.before_handover: Callable[[], None] | None = None

    def tick(self) -> None:
        now = time.perf_counter()
        c = time.process_time()
        self.calls += 1
        if self.last is not None and self.calls > self.warm:
            self.acc += now - self.last
            self.acc_cpu += c - self.last_c
            self.n += 1
            self.intervals.append(now - self.last)
            self._turn_acc += now - self.last
            self._turn_n += 1
        self.t_last = now
        if self.before_handover is not None and self.calls % self.baton.chunk == self.baton.chunk - 1:
            self.before_handover()
        if self.calls % self.baton.chunk == 0:
            if self._turn_n:
                self.turns.append(self._turn_acc / self._turn_n)
            self._turn_acc, self._turn_n = 0.0, 0
            w0 = time.perf_counter()
            self.baton.yield_turn(self.name)
            self.wait_total += time.perf_counter() - w0
            self.last = None
        else:
            self.last, self.last_c = now, c

    def steady_rate(self) -> float:
        return self.n / self.acc

    def cpu_rate(self) -> float:
        return self.n / self.acc_cpu

    def p50_rate(self) -> float:
        return 1.0 / statistics.median(self.intervals)


_LOCAL = threading.local()


def new_clock(w: Workload) -> Clock:
    """A plain clock, or a lockstep one when called from a variant thread of :func:`run_lockstep`."""
    baton = getattr(_LOCAL, "baton", None)
    if baton is None:
        return Clock(w.warm)
    return LockstepClock(w.warm, baton, _LOCAL.name)


class MLP(nn.Module):
    """``forward(x, labels)`` returns ``{"loss", "logits"}`` (what transformers' Trainer expects)."""

    def __init__(self, sizes: Sequence[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(sizes)):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)
        self.clock: Clock | None = None

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.clock is not None:
            self.clock.tick()
        logits = self.net(x)
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def make_model(w: Workload, clock: Clock | None = None) -> MLP:
    torch.manual_seed(0)
    model = MLP(w.sizes)
    model.clock = clock
    return model


def make_optim(model: nn.Module, w: Workload) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (torch defaults for the implementation) and a linear decay to 0 over ``w.steps``."""
    opt = torch.optim.AdamW(model.parameters(), lr=w.lr, weight_decay=0.0)
    total = w.steps

    def linear(step: int) -> float:
        return max(0.0, (total - step) / total)

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, linear)


# -- data -------------------------------------------------------------------------------


class DictDataset(Dataset[dict[str, torch.Tensor]]):
    """Map-style dataset of ``{"x", "labels"}`` samples (goes through a DataLoader + collate in every framework)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x = x
        self.y = y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


@dataclass
class Data:
    x: torch.Tensor
    y: torch.Tensor
    dicts: DictDataset = field(init=False)
    tensors: TensorDataset = field(init=False)

    def __post_init__(self) -> None:
        self.dicts = DictDataset(self.x, self.y)
        self.tensors = TensorDataset(self.x, self.y)


def make_data(w: Workload) -> Data:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(w.n_samples, w.sizes[0], generator=g)
    y = torch.randint(0, w.sizes[-1], (w.n_samples,), generator=g)
    return Data(x, y)


# -- environment ------------------------------------------------------------------------


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Send stdout/stderr (bars, printed logs) to os.devnull and silence framework loggers/warnings."""
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def silence_loggers() -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "transformers",
                 "accelerate", "epochal_core"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with contextlib.suppress(Exception):
        import transformers

        transformers.logging.set_verbosity_error()


def importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


@dataclass
class Result:
    steady: float  # steps/s, per-step cost only (mean over the steady window)
    e2e: float  # steps/s over the whole train()/fit() call
    p50: float = 0.0  # 1 / median step time in the steady window
    cpu: float = 0.0  # steps per CPU-second of the process in the steady window
    extra: dict[str, Any] = field(default_factory=dict)


def _timed(train: Callable[[], Any], clock: Clock, steps: int) -> Result:
    gc.collect()
    lockstep = isinstance(clock, LockstepClock)
    t0 = time.perf_counter()
    # In lockstep mode the caller silenced the process once (redirections are process-global).
    with contextlib.nullcontext() if lockstep else quiet():
        out = train()
    t1 = time.perf_counter()
    waited = clock.wait_total if isinstance(clock, LockstepClock) else 0.0
    res = Result(clock.steady_rate(), steps / (t1 - t0 - waited), clock.p50_rate() if clock.keep_all else 0.0,
                 clock.cpu_rate())
    res.extra["t_after_last_forward"] = t1 - clock.t_last
    if isinstance(clock, LockstepClock):
        res.extra["turns"] = clock.turns
    res.extra["out"] = out
    return res


# -- runners ----------------------------------------------------------------------------


def run_hand_dataloader(w: Workload, data: Data, device: str = "cpu") -> Result:
    """(a) The hand-written loop: DataLoader over the dict dataset, clip, AdamW, schedule."""
    clock = new_clock(w)
    model = make_model(w, clock).to(device)
    opt, sched = make_optim(model, w)
    params = [p for p in model.parameters() if p.requires_grad]

    def train() -> None:
        loader = DataLoader(data.dicts, batch_size=w.batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(0))
        model.train()
        step = 0
        while step < w.steps:
            for batch in loader:
                if device != "cpu":
                    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                loss = model(**batch)["loss"]
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                if step == w.steps:
                    break
        if device != "cpu":
            torch.cuda.synchronize()

    return _timed(train, clock, w.steps)


def run_hand_indexed(w: Workload, data: Data, device: str = "cpu") -> Result:
    """(a') The physical limit: whole batches indexed from tensors (no per-sample fetch, no collate)."""
    clock = new_clock(w)
    model = make_model(w, clock).to(device)
    opt, sched = make_optim(model, w)
    params = [p for p in model.parameters() if p.requires_grad]
    x_all, y_all = data.x.to(device), data.y.to(device)

    def train() -> None:
        model.train()
        step = 0
        g = torch.Generator().manual_seed(0)
        n, bs = len(x_all), w.batch_size
        while step < w.steps:
            perm = torch.randperm(n, generator=g).to(device)
            for start in range(0, n, bs):
                idx = perm[start : start + bs]
                loss = model(x_all[idx], y_all[idx])["loss"]
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                if step == w.steps:
                    break
        if device != "cpu":
            torch.cuda.synchronize()

    return _timed(train, clock, w.steps)


def epochal_trainer(
    w: Workload,
    dataset: Any,
    *,
    tqdm: bool = False,
    callbacks: list[Any] | None = None,
    report_to: str | list[str] = "none",
    logging_steps: int | None = None,
    clock: Clock | None = None,
    output_dir: str | None = None,
    device: str = "cpu",
    own_optimizer: bool = False,
    **extra: Any,
) -> Any:
    """An epochal Trainer on ``w``.

    ``own_optimizer=True`` lets the Trainer build its AdamW and linear schedule from the
    arguments, as a user does; otherwise it gets the same objects the hand loops use.
    """
    from epochal_core import Trainer, TrainingArguments

    clock = clock or new_clock(w)
    model = make_model(w, clock)
    opt, sched = (None, None) if own_optimizer else make_optim(model.to(device), w)
    args = TrainingArguments(
        output_dir=output_dir or temp_dir("epochal-bench-"),
        max_steps=w.steps,
        per_device_train_batch_size=w.batch_size,
        learning_rate=w.lr,
        max_grad_norm=MAX_GRAD_NORM,
        report_to=report_to,
        save_strategy="no",
        logging_strategy="steps" if logging_steps else "no",
        logging_steps=logging_steps or 500,
        disable_tqdm=not tqdm,
        use_cpu=device == "cpu",
        seed=0,
        **{"lr_scheduler_type": "linear", "weight_decay": 0.0, **extra},
    )
    return Trainer(model=model, args=args, train_dataset=dataset, optimizers=(opt, sched), callbacks=callbacks)


def run_epochal(w: Workload, dataset: Any, console: bool = True, **kwargs: Any) -> Result:
    """(b) epochal's Trainer with its default callbacks.

    ``console=False`` removes the PrinterCallback (no line printed per log). In
    lockstep, the trainer's reporters are drained and TensorBoard writers written
    out before each hand-over, so their threads' work is charged to this variant's
    own turn.
    """
    from epochal_core import PrinterCallback

    clock = new_clock(w)
    trainer = epochal_trainer(w, dataset, clock=clock, **kwargs)
    if not console:
        trainer.remove_callback(PrinterCallback)
    if isinstance(clock, LockstepClock):
        # Integrations' background work (reporter queues, the TensorBoard writer's flusher) is done
        # within this variant's own turn, never charged to the next variant's.
        def finish_background_work() -> None:
            trainer._drain_reporters()
            for callback in trainer.callback_handler.callbacks:
                write_out = getattr(getattr(callback, "tb_writer", None), "write_out", None)
                if callable(write_out):  # the writer exists from train begin on
                    write_out()

        clock.before_handover = finish_background_work
    res = _timed(trainer.train, clock, w.steps)
    res.extra["trainer"] = trainer
    return res


def hf_trainer(
    w: Workload,
    dataset: Any,
    *,
    tqdm: bool = False,
    callbacks: list[Any] | None = None,
    report_to: str | list[str] = "none",
    logging_steps: int | None = None,
    clock: Clock | None = None,
    device: str = "cpu",
) -> Any:
    from transformers import Trainer as HFTrainer
    from transformers import TrainingArguments as HFArgs

    clock = clock or new_clock(w)
    model = make_model(w, clock)
    opt, sched = make_optim(model.to(device), w)
    args = HFArgs(
        output_dir=temp_dir("hf-bench-"),
        max_steps=w.steps,
        per_device_train_batch_size=w.batch_size,
        learning_rate=w.lr,
        max_grad_norm=MAX_GRAD_NORM,
        report_to=report_to,
        save_strategy="no",
        logging_strategy="steps" if logging_steps else "no",
        logging_steps=logging_steps or 500,
        disable_tqdm=not tqdm,
        use_cpu=device == "cpu",
        seed=0,
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )
    return HFTrainer(model=model, args=args, train_dataset=dataset, optimizers=(opt, sched), callbacks=callbacks)


def run_transformers(w: Workload, dataset: Any, **kwargs: Any) -> Result:
    """(c) transformers' Trainer on the same work."""
    clock = new_clock(w)
    trainer = hf_trainer(w, dataset, clock=clock, **kwargs)
    return _timed(trainer.train, clock, w.steps)


def run_lightning(w: Workload, data: Data, *, tqdm: bool = False, device: str = "cpu") -> Result:
    """(d) Lightning on the same work (logger, checkpointing and model summary off)."""
    import lightning.pytorch as pl

    silence_loggers()  # lightning sets its loggers' levels when imported
    clock = new_clock(w)
    model = make_model(w, clock)

    class Lit(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            return self.model(**batch)["loss"]

        def configure_optimizers(self) -> Any:
            opt, sched = make_optim(self.model, w)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    with quiet():
        trainer = pl.Trainer(
            accelerator="cpu" if device == "cpu" else "gpu",
            devices=1,
            max_steps=w.steps,
            gradient_clip_val=MAX_GRAD_NORM,
            gradient_clip_algorithm="norm",
            enable_progress_bar=tqdm,
            enable_checkpointing=False,
            logger=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            default_root_dir=temp_dir("pl-bench-"),
        )
    loader = DataLoader(data.dicts, batch_size=w.batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))
    lit = Lit()
    return _timed(lambda: trainer.fit(lit, loader), clock, w.steps)


# -- statistics and printing ------------------------------------------------------------


Variant = tuple[str, Callable[[Workload], Result]]


def run_lockstep(variants: Sequence[Variant], w: Workload, chunk: int) -> dict[str, Result]:
    """Run all variants "at once": one thread each, taking turns every ``chunk`` training steps."""
    baton = Baton([n for n, _ in variants], chunk)
    results: dict[str, Result] = {}
    errors: dict[str, BaseException] = {}

    threads_wanted = torch.get_num_threads()

    def body(name: str, fn: Callable[[Workload], Result]) -> None:
        # OpenMP's thread count is per OS thread: without this a new thread's matmuls use every core.
        torch.set_num_threads(threads_wanted)
        _LOCAL.baton = baton
        _LOCAL.name = name
        baton.wait_turn(name)
        try:
            results[name] = fn(w)
        except BaseException as err:
            errors[name] = err
        finally:
            baton.finish(name)

    threads = [threading.Thread(target=body, args=(n, f), daemon=True) for n, f in variants]
    with quiet():
        for t in threads:
            t.start()
        baton.events[variants[0][0]].set()
        for t in threads:
            t.join()
    if errors:
        name, err = next(iter(errors.items()))
        raise RuntimeError(f"variant {name!r} failed: {err!r}") from err
    return results


def interleave(variants: Sequence[Variant], w: Workload, repeats: int,
               warmup: Workload | None = None, log: Callable[[str], None] | None = None,
               lockstep: int = 0) -> dict[str, list[Result]]:
    """Run every variant ``repeats`` times on ``w``, rotating the order each round.

    A short warm-up round on ``warmup`` (lazy imports, allocator) runs first and is discarded.
    With ``lockstep`` > 0, each round runs the variants in lockstep (:func:`run_lockstep`,
    turns of ``lockstep`` steps) instead of one after the other.
    """
    out: dict[str, list[Result]] = {name: [] for name, _ in variants}
    if warmup is not None:
        for _name, fn in variants:
            fn(warmup)
        if log:
            log("  warm-up round done")
    n = len(variants)
    for r in range(repeats):
        rotated = [variants[(k + r) % n] for k in range(n)]
        if lockstep:
            for name, res in run_lockstep(rotated, w, lockstep).items():
                out[name].append(res)
            continue
        for name, fn in rotated:
            out[name].append(fn(w))
        if log:
            log(f"  round {r + 1}/{repeats} done")
    return out


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def paired_ratios(results: dict[str, list[Result]], base: str, attr: str = "steady") -> dict[str, list[float]]:
    """Per-round ratio of each variant to ``base`` (same round: same machine conditions)."""
    b = [getattr(r, attr) for r in results[base]]
    return {name: [getattr(r, attr) / bv for r, bv in zip(rs, b)] for name, rs in results.items()}


def turn_ratios(results: dict[str, list[Result]], base: str) -> dict[str, list[float]]:
    """Per-turn ratio of each variant's steps/s to ``base``'s in the same cycle, pooled over rounds.

    Needs lockstep results. A round of 2000 tiny steps in turns of 50 gives 38 pairs, each
    taken within about a second of machine time, so bursts of other processes' load cancel
    far better than in the per-round ratios; the median of several hundred pairs is the
    figure to trust when effects are a few percent.
    """
    out: dict[str, list[float]] = {}
    for name, rs in results.items():
        pairs: list[float] = []
        for res, base_res in zip(rs, results[base]):
            pairs += [b / t for t, b in zip(res.extra["turns"], base_res.extra["turns"])]
        out[name] = pairs
    return out


def fmt_spread(values: Sequence[float]) -> str:
    """Median and interquartile range."""
    q1, q2, q3 = statistics.quantiles(values, n=4)
    return f"{q2:.3f} [{q1:.3f}-{q3:.3f}]"


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(wd) for c, wd in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (wd + 2) for wd in widths) + "|")
    return "\n".join(lines)


def fmt_ratio(values: Sequence[float]) -> str:
    return f"{median(values):.3f} [{min(values):.3f}-{max(values):.3f}]"


def eprint(*args: Any) -> None:
    print(*args, file=sys.__stderr__, flush=True)


def environment() -> str:
    import platform

    parts = [f"python {platform.python_version()}", f"torch {torch.__version__}",
             f"threads {torch.get_num_threads()}", f"cpus {os.cpu_count()}"]
    for mod in ("transformers", "accelerate", "lightning"):
        with contextlib.suppress(Exception):
            parts.append(f"{mod} {__import__(mod).__version__}")
    return ", ".join(parts)
