"""Test kit: drive a callback through a realistic scripted run, without a model or data.

Integration packages use :func:`scripted_run` to exercise their callback the way
the Trainer does (same events, order, kwargs, log keys and flag resets), then
read back what their SDK wrote and compare it with ``run.state.log_history``.
"""

from __future__ import annotations

import os
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .background import IntegrationFailure, Reporter
from .callback import TrainerCallback
from .callback_states import collect_callback_states
from .checkpoint import atomic_checkpoint
from .control import TrainerControl
from .flow import DefaultFlowCallback
from .handler import CallbackHandler
from .state import TrainerState
from .training_args import TrainingArguments
from .training_checkpoint import TRAINER_STATE_NAME, WEIGHTS_NAME

__all__ = [
    "CrashAt",
    "DropoutRegressor",
    "ScriptedFailure",
    "ScriptedRun",
    "TinyRegressor",
    "WaitAt",
    "scripted_run",
    "tiny_dataset",
    "tiny_model",
]


class ScriptedFailure(RuntimeError):
    """The error :func:`scripted_run` raises at ``fail_at_step`` to exercise crash handling."""


class CrashAt(TrainerCallback):
    """Raises :class:`ScriptedFailure` ``"crash at step N"`` in a real training run.

    Args:
        step: The global step to crash at.
        before_next_step: Crash when step ``step + 1`` begins (after step ``step``'s
            log, evaluation and checkpoint) instead of when step ``step`` ends (before them).
    """

    def __init__(self, step: int, *, before_next_step: bool = False) -> None:
        self.step = step
        self.before_next_step = before_next_step

    def on_step_begin(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """Crash here when ``before_next_step``."""
        if self.before_next_step and state.global_step == self.step:
            raise ScriptedFailure(f"crash at step {self.step}")

    def on_step_end(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """Crash here unless ``before_next_step``."""
        if not self.before_next_step and state.global_step == self.step:
            raise ScriptedFailure(f"crash at step {self.step}")


class TinyRegressor(torch.nn.Module):
    """Linear model whose ``forward(x, y)`` returns the MSE loss, with a ``config`` as trackers see it."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 1)
        self.config = {"in_features": 4, "note": None}

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Return the mean squared error of the prediction."""
        return torch.nn.functional.mse_loss(self.linear(x).squeeze(-1), y)


class DropoutRegressor(TinyRegressor):
    """:class:`TinyRegressor` with dropout on its input: every step draws from torch's global generator.

    Its trained weights therefore change if anything reseeds or draws from that
    generator during training (an SDK's ``torch.manual_seed``), which is what
    tests of "the integration does not change the training" need to detect.
    """

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Return the mean squared error of the prediction from the input with half its features dropped."""
        return super().forward(torch.nn.functional.dropout(x, 0.5, self.training), y)


class WaitAt(TrainerCallback):
    """At the end of step ``step``, waits until ``ready()`` is true, then optionally signals its own process.

    Integrations start their tracker run on their reporter thread, a moment after
    training began. Waiting for it makes sure the SDK's start happens *during*
    training, so a test sees what it does to the running training (reseeding,
    signal handlers); ``send`` then delivers a real signal (``signal.SIGTERM``)
    while the SDK is live.

    Args:
        step: The global step to wait at.
        ready: Returns true once the integration is up (polled every 10 ms).
        send: Signal to send to this process after ``ready()``, if any.
        timeout: Seconds to wait before raising ``TimeoutError``.
    """

    def __init__(self, step: int, ready: Callable[[], bool], send: int | None = None, timeout: float = 120.0) -> None:
        self.step = step
        self.ready = ready
        self.send = send
        self.timeout = timeout

    def on_step_end(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """Wait for ``ready()`` at ``step``, then send ``send``."""
        if state.global_step != self.step:
            return
        deadline = time.monotonic() + self.timeout
        while not self.ready():
            if time.monotonic() > deadline:
                raise TimeoutError(f"WaitAt: not ready after {self.timeout} s at step {self.step}")
            time.sleep(0.01)
        if self.send is not None:
            os.kill(os.getpid(), signal.Signals(self.send))


def tiny_dataset(n: int = 32, seed: int = 0) -> torch.utils.data.TensorDataset:
    """A ``TensorDataset`` of ``(x, y)`` with 4 features and ``y = x.sum(-1)``, for :class:`TinyRegressor`."""
    x = torch.randn(n, 4, generator=torch.Generator().manual_seed(seed))
    return torch.utils.data.TensorDataset(x, x.sum(-1))


def tiny_model() -> Any:
    """A two-layer torch model with a ``config`` dict, as trackers see real models."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    model.config = {"hidden_size": 8, "num_layers": 2, "activation": "relu"}  # type: ignore[assignment]
    return model


@dataclass
class ScriptedRun:
    """What a scripted run did.

    Args:
        state: Final state; ``state.log_history`` is every log the callback received.
        events: Events dispatched, in order.
        checkpoints: Checkpoint folders announced through ``on_save``.
        failures: Integration failures recorded by the reporter (non-strict mode).
    """

    state: TrainerState
    events: list[str] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)
    failures: list[IntegrationFailure] = field(default_factory=list)


def _loss(step: int) -> float:
    return 2.0 / (step + 1) + 0.01 * (step % 3)


def scripted_run(
    callback: TrainerCallback,
    *,
    output_dir: str | os.PathLike[str] | None = None,
    max_steps: int = 10,
    steps_per_epoch: int = 5,
    logging_steps: int = 2,
    eval_steps: int = 5,
    save_steps: int = 5,
    start_step: int = 0,
    fail_at_step: int | None = None,
    through_reporter: bool = True,
    strict: bool = True,
    model: Any = None,
    extra_logs: dict[str, Any] | None = None,
    args: TrainingArguments | None = None,
    state: TrainerState | None = None,
) -> ScriptedRun:
    """Run ``callback`` through the events of a training run of ``max_steps`` steps.

    Logs carry ``loss``, ``grad_norm``, ``learning_rate`` and ``epoch`` every
    ``logging_steps``; evaluations ``eval_loss``/``eval_accuracy``/timings every
    ``eval_steps``; checkpoints are real (empty-weight) folders every
    ``save_steps``; the run ends with the train-summary log. ``start_step``
    simulates a resumed run (pass ``state`` from a previous run's checkpoint).

    Args:
        callback: The callback under test.
        output_dir: Where checkpoint folders go (a temp dir by default).
        max_steps: Steps of the run.
        steps_per_epoch: Steps per epoch.
        logging_steps: Logging interval.
        eval_steps: Evaluation interval.
        save_steps: Checkpoint interval.
        start_step: First step already done (resume).
        fail_at_step: Raise :class:`ScriptedFailure` after this step, after
            emitting ``on_exception`` as the Trainer does.
        through_reporter: Dispatch through the background :class:`Reporter`
            integrations get in a real run.
        strict: Re-raise integration errors (else record them in ``failures``).
        model: Passed as ``model`` (default :func:`tiny_model`).
        extra_logs: Extra keys added to every training log (e.g. a non-scalar).
        args: Arguments to use (default: built from the intervals above).
        state: State to continue from (resume).

    Raises:
        ScriptedFailure: When ``fail_at_step`` is reached.
    """
    out = Path(output_dir) if output_dir is not None else Path(tempfile.mkdtemp(prefix="epochal-scripted-"))
    if args is None:
        args = TrainingArguments(
            output_dir=str(out), max_steps=max_steps, logging_steps=logging_steps, eval_strategy="steps",
            eval_steps=eval_steps, save_steps=save_steps, report_to="none", run_name="scripted-run",
            disable_tqdm=True,
        )
    failures: list[IntegrationFailure] = []
    target: Any = Reporter(callback, getattr(callback, "name", "callback"), strict=strict, failures=failures) \
        if through_reporter else None
    handler = CallbackHandler([DefaultFlowCallback()], model=model if model is not None else tiny_model())
    handler.add_callback(callback, target=target)
    run = ScriptedRun(state or TrainerState(), failures=failures)
    handler.add_callback(_EventRecorder(run.events))
    script = _Script(args, handler, run, out, target, max_steps, steps_per_epoch, extra_logs or {})
    try:
        script.play(start_step, fail_at_step)
    finally:
        if isinstance(target, Reporter):
            target.close()
    return run


class _EventRecorder(TrainerCallback):
    """Appends the name of every event it receives, after every other callback (like the progress bar)."""

    order = 1000

    def __init__(self, events: list[str]) -> None:
        self.events = events


for _event in ("on_init_end", "on_train_begin", "on_epoch_begin", "on_step_begin", "on_substep_end",
               "on_pre_optimizer_step", "on_optimizer_step", "on_step_end", "on_log", "on_evaluate",
               "on_prediction_step", "on_save", "on_epoch_end", "on_train_end", "on_exception"):
    setattr(_EventRecorder, _event, lambda self, a, s, c, _e=_event, **kw: self.events.append(_e))


class _Script:
    """The Trainer's sequence of events and flag handling, without a model or data."""

    def __init__(self, args: TrainingArguments, handler: CallbackHandler, run: ScriptedRun, out: Path,
                 target: Any, max_steps: int, steps_per_epoch: int, extra_logs: dict[str, Any]) -> None:
        self.args, self.handler, self.run, self.out, self.target = args, handler, run, out, target
        self.max_steps, self.steps_per_epoch, self.extra_logs = max_steps, steps_per_epoch, extra_logs
        self.state = run.state
        self.state.max_steps = max_steps
        self.state.num_train_epochs = -(-max_steps // steps_per_epoch)
        self.state.compute_steps(args, max_steps)
        self.control = TrainerControl()

    def play(self, start_step: int, fail_at_step: int | None) -> None:
        args, st, handler = self.args, self.state, self.handler
        try:
            self.control = handler.on_init_end(args, st, self.control)
            self.control = handler.on_train_begin(args, st, self.control)
            st.global_step = start_step
            while st.global_step < self.max_steps and not self.control.should_training_stop:
                self.control = handler.on_epoch_begin(args, st, self.control)
                for _ in range(self.steps_per_epoch):
                    if st.global_step >= self.max_steps:
                        break
                    self.step(fail_at_step)
                    if self.control.should_training_stop:
                        break
                self.control = handler.on_epoch_end(args, st, self.control)
            self.log({"train_runtime": 1.5, "train_samples_per_second": 100.0, "train_steps_per_second": 6.0,
                      "total_flos": 0.0, "train_loss": 0.7})
            self.control = handler.on_train_end(args, st, self.control)
        except ScriptedFailure as err:
            handler.on_exception(args, st, self.control, exception=err)
            raise

    def step(self, fail_at_step: int | None) -> None:
        args, st, handler = self.args, self.state, self.handler
        self.control = handler.on_step_begin(args, st, self.control)
        self.control = handler.on_pre_optimizer_step(args, st, self.control)
        self.control = handler.on_optimizer_step(args, st, self.control)
        st.global_step += 1
        st.epoch = st.global_step / self.steps_per_epoch
        self.control = handler.on_step_end(args, st, self.control)
        if fail_at_step is not None and st.global_step == fail_at_step:
            raise ScriptedFailure(f"scripted failure at step {fail_at_step}")
        if self.control.should_log:
            lr = 1e-3 * (1 - st.global_step / self.max_steps)
            self.log({"loss": _loss(st.global_step), "grad_norm": 0.5, "learning_rate": lr, **self.extra_logs})
        if self.control.should_evaluate:
            self.evaluate()
        if self.control.should_save:
            self.save()

    def log(self, logs: dict[str, Any]) -> None:
        st = self.state
        logs["epoch"] = st.epoch
        st.log_history.append({**logs, "step": st.global_step})
        self.control = self.handler.on_log(self.args, st, self.control, logs)

    def evaluate(self) -> None:
        st = self.state
        for _ in range(2):
            self.control = self.handler.on_prediction_step(self.args, st, self.control)
        metrics = {
            "eval_loss": _loss(st.global_step) + 0.1, "eval_accuracy": min(1.0, 0.5 + st.global_step / 40),
            "eval_runtime": 0.5, "eval_samples_per_second": 64.0, "eval_steps_per_second": 4.0,
        }
        self.log(dict(metrics))
        self.control = self.handler.on_evaluate(self.args, st, self.control, metrics)

    def save(self) -> None:
        # A committed checkpoint like the Trainer's (manifest, callback states), so
        # ``latest_checkpoint`` finds it and a resumed scripted run can load its state.
        st = self.state
        if isinstance(self.target, Reporter):
            self.target.drain()
        st.stateful_callbacks = collect_callback_states(self.handler.callbacks, self.control)
        with atomic_checkpoint(self.out, st.global_step) as tmp:
            (tmp / WEIGHTS_NAME).write_bytes(b"weights")
            st.save_to_json(str(tmp / TRAINER_STATE_NAME))
        folder = self.out / f"checkpoint-{st.global_step}"
        self.run.checkpoints.append(str(folder))
        self.control = self.handler.on_save(self.args, st, self.control, checkpoint=folder)
