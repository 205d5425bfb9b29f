"""The ``Trainer``: a lean PyTorch loop that drives the callback protocol.

Constructor, attributes, events and log keys follow transformers' Trainer, so
code and callbacks written for it port by changing imports. The model is any
``torch.nn.Module`` that returns a loss: a tensor, a mapping with ``"loss"``, an
object with ``.loss``, or a tuple whose first item is the loss (or give
``compute_loss_func``). A batch that is a mapping is passed as keyword
arguments (``model(**batch)``), a tuple or list positionally, anything else as
the single argument.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from . import checkpoint as ckpt
from .background import IntegrationFailure, Reporter
from .control import TrainerControl
from .data import EpochBatchSampler, TensorBatchLoader, has_length, is_iterable_dataset, supports_batch_indexing
from .discovery import resolve_report_to
from .distributed import all_reduce_, barrier, broadcast_object, dist_info, ensure_process_group, sync_flags
from .flow import DefaultFlowCallback
from .handler import CallbackHandler
from .integrations import IntegrationCallback
from .log_history import LogHistoryStore
from .loss_tracking import LossTracker
from .preemption import PreemptionGuard
from .progress import PrinterCallback, ProgressCallback
from .run_lock import OutputDirInUseError, RunLock
from .save_failures import DiskSpaceWatch
from .schedules import get_scheduler
from .state import TrainerState
from .training_args import TrainingArguments
from .training_checkpoint import (
    TRAINER_STATE_NAME,
    WEIGHTS_NAME,
    TrainingSnapshot,
    load_training_checkpoint,
    save_training_checkpoint,
)
from .training_plan import TrainingPlan, plan_training

__all__ = ["EvalPrediction", "PredictionOutput", "TrainOutput", "Trainer", "set_seed"]

logger = logging.getLogger(__name__)

# The flags callbacks may set differently per rank; synchronised at step boundaries under DDP.
_CONTROL_FLAGS = ("should_training_stop", "should_epoch_stop", "should_save", "should_evaluate", "should_log")


class EvalPrediction(NamedTuple):
    """What ``compute_metrics`` receives: CPU tensors concatenated over the whole dataset.

    Args:
        predictions: Model predictions (logits).
        label_ids: Labels, or ``None`` when the batches carry none.
    """

    predictions: Any
    label_ids: Any


class PredictionOutput(NamedTuple):
    """Result of :meth:`Trainer.predict`.

    Args:
        predictions: Concatenated predictions (CPU tensors).
        label_ids: Concatenated labels, or ``None``.
        metrics: ``test_loss`` (when the model returns one), timing and ``compute_metrics`` results.
    """

    predictions: Any
    label_ids: Any
    metrics: dict[str, float]


class TrainOutput(NamedTuple):
    """Result of :meth:`Trainer.train`.

    Args:
        global_step: Optimizer updates done in total.
        training_loss: Mean training loss over the updates of this call.
        metrics: The final summary log (runtime, throughput, loss).
    """

    global_step: int
    training_loss: float
    metrics: dict[str, float]


def set_seed(seed: int) -> None:
    """Seed Python's, NumPy's (if loaded) and torch's generators on every device."""
    random.seed(seed)
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _move(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return type(batch)({k: _move(v, device) for k, v in batch.items()}) if type(batch) is not dict else {  # type: ignore
            k: _move(v, device) for k, v in batch.items()
        }
    if isinstance(batch, (list, tuple)):
        moved = [_move(v, device) for v in batch]
        if isinstance(batch, list):
            return moved
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)
    return batch


def _grad_norm(params: Iterable[torch.Tensor]) -> torch.Tensor:
    norms = [torch.linalg.vector_norm(p.grad.detach().float()) for p in params if p.grad is not None]
    norm: torch.Tensor = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
    return norm


def _describe(obj: Any) -> str:
    if isinstance(obj, Mapping):
        return f"a {type(obj).__name__} with keys {list(obj)}"
    if isinstance(obj, torch.Tensor):
        return f"a tensor of shape {tuple(obj.shape)}"
    return f"a {type(obj).__name__}"


def _concat(chunks: list[Any]) -> Any:
    if not chunks:
        return None
    first = chunks[0]
    if isinstance(first, torch.Tensor):
        if first.dim() == 0:
            return torch.stack(chunks)
        return torch.cat(chunks)
    if isinstance(first, (list, tuple)):
        return type(first)(_concat([c[i] for c in chunks]) for i in range(len(first)))
    if isinstance(first, Mapping):
        return {k: _concat([c[k] for c in chunks]) for k in first}
    return chunks


def _detach_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, (list, tuple)):
        return type(value)(_detach_cpu(v) for v in value)
    if isinstance(value, Mapping):
        return {k: _detach_cpu(v) for k, v in value.items()}
    return value


def _checked_arguments(model: Any, args: Any, eval_dataset: Any) -> tuple[nn.Module, TrainingArguments]:
    """The model and ``args`` (or the defaults), after checking the Trainer's arguments fit together."""
    if args is None:
        args = TrainingArguments(output_dir="trainer_output")
        logger.info("No `TrainingArguments` passed, using `output_dir=%s`.", args.output_dir)
    if not isinstance(args, TrainingArguments):
        raise TypeError(f"args must be a TrainingArguments, got {type(args).__name__}.")
    if model is None or not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    if args.eval_strategy != "no" and eval_dataset is None:
        raise ValueError(
            f"TrainingArguments.eval_strategy={args.eval_strategy!r} needs an eval_dataset: "
            "pass eval_dataset=... to the Trainer, or set eval_strategy='no'."
        )
    return model, args


@dataclass
class _Run:
    """What one ``train()`` call carries from one phase to the next."""

    plan: TrainingPlan
    loader: Iterable[Any]
    model: nn.Module  # wrapped (DDP) when distributed
    params: list[torch.Tensor]
    losses: LossTracker
    guard: str  # see Trainer._guard_mode
    start_time: float = 0.0
    start_step: int = 0
    last_logged: int = 0
    last_saved: int = -1
    micro_batches: int = 1
    update_loss: torch.Tensor = field(default_factory=lambda: torch.zeros(()))
    grad_norm: torch.Tensor | None = None
    learning_rate: float = 0.0


class Trainer:
    """Trains, evaluates and checkpoints a PyTorch model, emitting transformers' callback events.

    Args:
        model: The ``torch.nn.Module`` to train. It is moved to the training device.
        args: Training arguments; defaults to ``TrainingArguments(output_dir="trainer_output")``.
        data_collator: Turns a list of samples into a batch; default: torch's ``default_collate``.
        train_dataset: A map-style ``Dataset`` (or any sized, indexable sequence), or an iterable
            (then ``max_steps`` is required).
        eval_dataset: Dataset for evaluation, or a dict of them (metrics prefixed per name).
        processing_class: Tokenizer or processor; only passed to callbacks.
        compute_metrics: ``EvalPrediction -> dict`` of extra metrics (predictions are gathered only if set).
        callbacks: Extra callbacks (instances or classes), after the integrations.
        optimizers: ``(optimizer, scheduler)``; either may be ``None`` to get AdamW / the
            ``lr_scheduler_type`` schedule.
        compute_loss_func: ``(outputs, labels, num_items_in_batch=None) -> loss``; labels are
            taken out of a mapping batch before the forward pass.
        preprocess_logits_for_metrics: ``(logits, labels) -> logits`` applied per evaluation batch.

    Raises:
        ValueError: An inconsistent setup (evaluation without an eval dataset, fp16 on
            a device without it, an unknown ``report_to`` name, ...).
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        args: TrainingArguments | None = None,
        data_collator: Callable[[list[Any]], Any] | None = None,
        train_dataset: Dataset[Any] | Iterable[Any] | None = None,
        eval_dataset: Dataset[Any] | Iterable[Any] | Mapping[str, Any] | None = None,
        processing_class: Any = None,
        compute_metrics: Callable[[EvalPrediction], Mapping[str, float]] | None = None,
        callbacks: list[Any] | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, Any] = (None, None),
        compute_loss_func: Callable[..., torch.Tensor] | None = None,
        preprocess_logits_for_metrics: Callable[[Any, Any], Any] | None = None,
    ) -> None:
        model, args = _checked_arguments(model, args, eval_dataset)
        self.args = args
        self.dist = dist_info()
        self.device = self._select_device()
        self._check_precision()
        self.is_distributed = ensure_process_group(args.ddp_backend, args.ddp_timeout, self.device)
        set_seed(args.seed)
        optimizer, lr_scheduler = optimizers
        self.model = model.to(self.device)
        self.model_wrapped: nn.Module = self.model
        self.data_collator = data_collator
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self.processing_class = processing_class
        self.compute_metrics = compute_metrics
        self.compute_loss_func = compute_loss_func
        self.preprocess_logits_for_metrics = preprocess_logits_for_metrics
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.scaler: torch.amp.GradScaler | None = None
        #: Integrations that failed (and were disabled) during the runs of this Trainer.
        self.integration_failures: list[IntegrationFailure] = []
        #: Set when the last ``train()`` stopped because of SIGTERM/SIGINT.
        self.preempted = False
        self._training = False
        self._reporters: list[Reporter] = []
        self._disk_space = DiskSpaceWatch()
        self.callback_handler = CallbackHandler(
            [DefaultFlowCallback()], self.model, processing_class, optimizer, lr_scheduler
        )
        self._add_default_callbacks(callbacks or [])
        self.state = TrainerState(
            is_local_process_zero=self.is_local_process_zero(), is_world_process_zero=self.is_world_process_zero()
        )
        self.control = TrainerControl()
        self._log_store = LogHistoryStore()
        self.control = self.callback_handler.on_init_end(self.args, self.state, self.control)

    # -- setup ---------------------------------------------------------------------
    def _select_device(self) -> torch.device:
        if not self.args.use_cpu and torch.cuda.is_available():
            return torch.device("cuda", self.dist.local_rank if self.dist.enabled else torch.cuda.current_device())
        if not self.args.use_cpu and getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")

    def _check_precision(self) -> None:
        if self.args.fp16 and self.device.type != "cuda":
            raise ValueError(
                f"TrainingArguments.fp16=True is invalid on device {self.device.type!r}: float16 training "
                "needs CUDA. Use bf16=True on this device, or train in float32."
            )
        if self.args.bf16 and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError(
                "TrainingArguments.bf16=True is invalid: this GPU does not support bfloat16. Use fp16=True instead."
            )

    def _add_default_callbacks(self, callbacks: list[Any]) -> None:
        """Add the integrations, the user's callbacks, then the console (after the flow: transformers' order)."""
        for name, integration in self._build_integrations():
            self.add_callback(integration, _name=name)
        for cb in callbacks:
            self.add_callback(cb)
        self.callback_handler.add_callback(PrinterCallback() if self.args.disable_tqdm else ProgressCallback())

    def _build_integrations(self) -> list[tuple[str, Any]]:
        built = []
        for name, cls, explicit in resolve_report_to(self.args.report_to):  # type: ignore[arg-type]
            problem = cls.configuration_problem() if hasattr(cls, "configuration_problem") else None
            if problem and not explicit:
                logger.warning("report_to='all': skipping %r: %s", name, problem)
                continue
            try:
                built.append((name, cls()))
            except Exception as err:
                if explicit:
                    raise
                logger.warning("report_to='all': skipping %r, it failed to start: %s", name, err)
        return built

    def add_callback(self, callback: Any, *, _name: str | None = None) -> None:
        """Append a callback (instance or class). Integrations run off the training thread."""
        cb = callback() if isinstance(callback, type) else callback
        target = None
        if _name is not None or isinstance(cb, IntegrationCallback):
            name = _name or getattr(cb, "name", "") or type(cb).__name__
            target = Reporter(
                cb, name, strict=bool(self.args.strict_integrations), failures=self.integration_failures,
                timeout=self.args.integration_timeout,
            )
            self._reporters.append(target)
        self.callback_handler.add_callback(cb, target=target)

    def pop_callback(self, callback: Any) -> Any:
        """Remove and return the first callback of that class (or that instance); ``None`` if absent."""
        return self.callback_handler.pop_callback(callback)

    def remove_callback(self, callback: Any) -> None:
        """Remove the first callback of that class (or that instance); never raises."""
        self.callback_handler.remove_callback(callback)

    def is_local_process_zero(self) -> bool:
        """Whether this process is rank 0 on its node."""
        return self.dist.local_rank == 0

    def is_world_process_zero(self) -> bool:
        """Whether this process is rank 0 of the job."""
        return self.dist.rank == 0

    # -- data ----------------------------------------------------------------------------
    def _make_loader(self, dataset: Any, batch_size: int, *, train: bool) -> Iterable[Any]:
        args = self.args
        pin = args.dataloader_pin_memory and self.device.type == "cuda"
        if is_iterable_dataset(dataset):
            return DataLoader(
                dataset, batch_size=batch_size, collate_fn=self.data_collator,
                num_workers=args.dataloader_num_workers, pin_memory=pin,
            )
        sampler = EpochBatchSampler(
            len(dataset), batch_size, shuffle=train,
            seed=args.data_seed if args.data_seed is not None else args.seed,
            drop_last=args.dataloader_drop_last and train,
            rank=self.dist.rank, world_size=self.dist.world_size, pad_shards=train,
        )
        if supports_batch_indexing(dataset, self.data_collator, args.dataloader_num_workers):
            return TensorBatchLoader(dataset, sampler)
        # A private generator: creating an iterator then draws worker seeds from it, not from
        # the global RNG, so a resumed run's dropout stream matches an uninterrupted one.
        generator = torch.Generator().manual_seed(sampler.seed)
        return DataLoader(
            dataset, batch_sampler=sampler, collate_fn=self.data_collator,
            num_workers=args.dataloader_num_workers, pin_memory=pin, generator=generator,
        )

    def get_train_dataloader(self) -> Iterable[Any]:
        """The training batches: seeded per epoch, sharded across ranks, resumable."""
        if self.train_dataset is None:
            raise ValueError("Trainer.train() needs a train_dataset: pass train_dataset=... to the Trainer.")
        return self._make_loader(self.train_dataset, self.args.per_device_train_batch_size, train=True)

    def get_eval_dataloader(self, eval_dataset: Any = None) -> Iterable[Any]:
        """The evaluation batches, in order, sharded across ranks without padding."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("Evaluation needs an eval_dataset: pass one to the Trainer or to evaluate().")
        return self._make_loader(dataset, self.args.per_device_eval_batch_size, train=False)

    def get_test_dataloader(self, test_dataset: Any) -> Iterable[Any]:
        """The prediction batches, in order."""
        return self._make_loader(test_dataset, self.args.per_device_eval_batch_size, train=False)

    # -- optimisation --------------------------------------------------------------------
    def create_optimizer(self) -> torch.optim.Optimizer:
        """AdamW with weight decay on matrices only (biases and norm weights are not decayed).

        Fused on CUDA, which also lets a non-finite step be skipped without a device sync.
        """
        if self.optimizer is None:
            args = self.args
            params = [p for p in self.model.parameters() if p.requires_grad]
            groups = [
                {"params": [p for p in params if p.ndim >= 2], "weight_decay": args.weight_decay},
                {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
            ]
            if args.weight_decay == 0:
                # Nothing is decayed: one group does the same update with one pass of the optimizer's
                # per-group work instead of two (transformers keeps two).
                groups = [{"params": params, "weight_decay": 0.0}]
            groups = [g for g in groups if g["params"]]
            self.optimizer = torch.optim.AdamW(
                groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                fused=self.device.type == "cuda",
            )
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None) -> Any:
        """The ``lr_scheduler_type`` schedule with warmup, unless one was given."""
        if self.lr_scheduler is None:
            self.lr_scheduler = get_scheduler(
                self.args.lr_scheduler_type, optimizer or self.optimizer,  # type: ignore[arg-type]
                self.args.get_warmup_steps(num_training_steps), num_training_steps,
            )
        return self.lr_scheduler

    def create_optimizer_and_scheduler(self, num_training_steps: int) -> None:
        """Create the optimizer and the schedule (kept if given in ``optimizers``)."""
        self.create_optimizer()
        self.create_scheduler(num_training_steps)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.args.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        if self.args.fp16:
            return torch.autocast(self.device.type, dtype=torch.float16)
        return contextlib.nullcontext()

    # -- forward / loss ---------------------------------------------------------------------
    def _forward(self, model: nn.Module, inputs: Any) -> Any:
        if isinstance(inputs, Mapping):
            return model(**inputs)
        if isinstance(inputs, (list, tuple)):
            return model(*inputs)
        return model(inputs)

    def _labels(self, inputs: Any, pop: bool) -> Any:
        if isinstance(inputs, Mapping):
            for name in self.args.label_names or ("labels",):
                if name in inputs:
                    return inputs.pop(name) if pop else inputs[name]  # type: ignore
            return None
        if isinstance(inputs, (list, tuple)) and len(inputs) >= 2:
            return inputs[-1]
        return None

    @staticmethod
    def _extract_loss(outputs: Any) -> torch.Tensor | None:
        if isinstance(outputs, torch.Tensor):
            return outputs
        if isinstance(outputs, Mapping):
            loss = outputs.get("loss")
        elif isinstance(outputs, (list, tuple)) and outputs and isinstance(outputs[0], torch.Tensor):
            loss = outputs[0] if outputs[0].dim() == 0 else None
        else:
            loss = getattr(outputs, "loss", None)
        return loss if isinstance(loss, torch.Tensor) else None

    def compute_loss(
        self, model: nn.Module, inputs: Any, return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        """Run the model on ``inputs`` and return its loss (and outputs if asked).

        Raises:
            ValueError: The model returned no loss; the message says what it returned.
        """
        if self.compute_loss_func is not None:
            if isinstance(inputs, Mapping):
                inputs = dict(inputs)
            labels = self._labels(inputs, pop=True)
            if isinstance(inputs, (list, tuple)) and len(inputs) >= 2:
                inputs = inputs[:-1]
            outputs = self._forward(model, inputs)
            loss = self.compute_loss_func(outputs, labels, num_items_in_batch=num_items_in_batch)
        else:
            outputs = self._forward(model, inputs)
            loss = self._extract_loss(outputs)  # type: ignore
            if loss is None:
                raise ValueError(
                    f"The model did not return a loss: forward returned {_describe(outputs)}. Return a scalar "
                    "tensor, a dict with 'loss', an object with .loss, or a tuple starting with the loss; "
                    "or pass compute_loss_func=... to the Trainer."
                )
        if loss.dim() != 0:
            raise ValueError(
                f"The loss must be a scalar tensor, got shape {tuple(loss.shape)}: reduce it (e.g. .mean())."
            )
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model: nn.Module, inputs: Any, num_micro_batches: int = 1) -> torch.Tensor:
        """Forward and backward one micro-batch; return the detached loss scaled by ``1/num_micro_batches``."""
        inputs = _move(inputs, self.device)
        with self._autocast():
            loss = self.compute_loss(model, inputs)
        if num_micro_batches > 1:
            loss = loss / num_micro_batches
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()
        return loss.detach()  # type: ignore

    def _to_host(self, tensor: torch.Tensor) -> list[float]:
        return tensor.detach().float().reshape(-1).tolist()

    def _read_scalars(self, scalars: list[torch.Tensor]) -> list[float]:
        """Read 0-d tensors in one transfer; under torch.distributed, their mean over ranks.

        (The loss differs per rank; a skip count or a gradient norm is the same on every rank.)
        """
        if self.is_distributed:
            stacked = torch.stack([t.detach().float().reshape(()) for t in scalars])
            all_reduce_(stacked)
            stacked /= self.dist.world_size
            return self._to_host(stacked)
        if self.device.type == "cpu":
            # Reading a CPU scalar is a memory load; stacking would cost more than it saves.
            return [t.item() for t in scalars]
        return self._to_host(torch.stack([t.detach().float().reshape(()) for t in scalars]))

    # -- training ------------------------------------------------------------------------------
    def _resolve_checkpoint(self, resume_from_checkpoint: str | bool | os.PathLike[str] | None) -> Path | None:
        if resume_from_checkpoint is None or resume_from_checkpoint is False:
            return None
        if resume_from_checkpoint is True:
            found = ckpt.latest_checkpoint(self.args.output_dir)
            if found is None:
                raise ValueError(
                    f"resume_from_checkpoint=True but {self.args.output_dir!r} holds no complete checkpoint. "
                    "Pass a checkpoint folder, or train from scratch with resume_from_checkpoint=None."
                )
            return found
        path = Path(resume_from_checkpoint)
        if not ckpt.is_complete(path):
            raise ValueError(
                f"resume_from_checkpoint={os.fspath(path)!r} is not a complete checkpoint (missing folder, "
                f"or no valid {ckpt.COMMIT_MARKER} manifest: the save was interrupted). "
                "Use resume_from_checkpoint=True to pick the newest complete one."
            )
        return path

    def train(self, resume_from_checkpoint: str | bool | os.PathLike[str] | None = None) -> TrainOutput:
        """Train the model.

        Args:
            resume_from_checkpoint: ``True`` resumes from the newest complete checkpoint
                in ``output_dir``; a path resumes from that checkpoint. Weights,
                optimizer, schedule, scaler, RNG streams, data position and
                callback states are restored. A run a callback stopped early stays
                stopped; a run that reached ``max_steps`` can be extended.

        Returns:
            ``TrainOutput(global_step, training_loss, metrics)``.

        Raises:
            CheckpointChanged: A file of the checkpoint to resume changed after it was saved.
            OutputDirInUseError: Another live run holds ``output_dir`` (raised on every rank).
        """
        with self._output_dir_lock():
            return self._train_locked(resume_from_checkpoint)

    @contextlib.contextmanager
    def _output_dir_lock(self) -> Iterator[None]:
        """Hold ``output_dir``'s run lock while training: world rank 0 takes it, every rank learns the outcome."""
        lock = RunLock(self.args.output_dir) if self.is_world_process_zero() else None
        refusal: str | None = None
        if lock is not None:
            try:
                lock.acquire()
            except OutputDirInUseError as err:
                refusal = str(err)
        # Under torchrun every rank raises the same error instead of waiting at the next collective.
        refusal = broadcast_object(refusal, self.device) if self.is_distributed else refusal
        if refusal is not None:
            raise OutputDirInUseError(refusal if lock is not None else f"world rank 0 refused to train: {refusal}")
        try:
            yield
        finally:
            if lock is not None:
                lock.release()

    def _train_locked(self, resume_from_checkpoint: str | bool | os.PathLike[str] | None) -> TrainOutput:
        checkpoint = self._resolve_checkpoint(resume_from_checkpoint)
        set_seed(self.args.seed)
        self.preempted = False
        with PreemptionGuard(self.args.save_on_preemption) as guard:
            self._preemption = guard
            self._training = True
            try:
                return self._inner_training_loop(checkpoint)
            except BaseException as err:
                self._finalize_failure(err)
                raise
            finally:
                self._training = False

    def _drain_reporters(self) -> None:
        for reporter in self._reporters:
            reporter.drain()

    def _finalize_failure(self, err: BaseException) -> None:
        # Every callback hears about the crash (integrations mark their runs
        # failed and flush); handler errors are logged, never mask `err`.
        self.callback_handler.on_exception(self.args, self.state, self.control, exception=err)
        for reporter in self._reporters:
            with contextlib.suppress(Exception):
                reporter.drain()

    def _wrap_model(self) -> nn.Module:
        if not self.is_distributed:
            return self.model
        if isinstance(self.model_wrapped, nn.parallel.DistributedDataParallel):
            return self.model_wrapped
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(
            self.model, device_ids=device_ids,
            find_unused_parameters=bool(self.args.ddp_find_unused_parameters),
        )

    def _inner_training_loop(self, checkpoint: Path | None) -> TrainOutput:
        run = self._plan_run()
        if checkpoint is not None and not self._resume(run, checkpoint):
            return TrainOutput(self.state.global_step, 0.0, {})
        first_epoch, skip = run.plan.resume_position(self.state.global_step, self.args.ignore_data_skip)
        self._begin_training(run)
        for epoch in range(first_epoch, run.plan.num_train_epochs):
            self._train_epoch(run, epoch, skip if epoch == first_epoch else 0)
            if self.control.should_training_stop:
                break
        return self._finish_training(run)

    # -- the phases of a run ---------------------------------------------------------------
    def _plan_run(self) -> _Run:
        """Plan the run, build fresh state, optimizer, schedule and scaler, and wrap the model."""
        args = self.args
        loader = self.get_train_dataloader()
        plan = plan_training(args, len(loader) if has_length(loader) else None)  # type: ignore[arg-type]
        self.state = TrainerState(
            is_local_process_zero=self.is_local_process_zero(), is_world_process_zero=self.is_world_process_zero()
        )
        self._log_store = LogHistoryStore()
        self.state.train_batch_size = args.per_device_train_batch_size
        self.state.compute_steps(args, plan.max_steps)
        self.create_optimizer_and_scheduler(plan.max_steps)
        if args.fp16 and self.scaler is None:
            self.scaler = torch.amp.GradScaler(self.device.type)
        self.model_wrapped = self._wrap_model()
        guard = self._guard_mode()
        # On the CPU the guard reads the loss and the gradient norm at every update anyway (a memory
        # load), so they are summed as Python floats: no tensor op per update, none at a log.
        on_host = guard == "read" and self.device.type == "cpu" and not self.is_distributed
        return _Run(
            plan, loader, self.model_wrapped, [p for p in self.model.parameters() if p.requires_grad],
            LossTracker(self.device, on_host=on_host), guard,
        )

    def _guard_mode(self) -> str:
        """How the non-finite guard checks an update: ``off``, ``on_device`` (no sync) or ``read``."""
        # With fp16 the GradScaler owns overflow: it skips the step and lowers the scale
        # (early steps overflow by design), so the guard stays out of its way.
        if self.args.nonfinite_policy == "off" or self.scaler is not None:
            return "off"
        # Fused AdamW skips its update on the device when found_inf is set: no host sync.
        fused = getattr(self.optimizer, "defaults", {}).get("fused", False)
        if self.args.nonfinite_policy == "skip" and self.device.type == "cuda" and fused:
            return "on_device"
        return "read"

    def _snapshot(self) -> TrainingSnapshot:
        """The objects a training checkpoint saves and restores."""
        return TrainingSnapshot(
            self.args, self.state, self.control, self.model, self.optimizer,  # type: ignore[arg-type]
            self.lr_scheduler, self.scaler, self.callback_handler.callbacks, self._log_store,
            rank=self.dist.rank, world_size=self.dist.world_size, device=self.device,
        )

    def _resume(self, run: _Run, checkpoint: Path) -> bool:
        """Restore ``checkpoint``; return ``False`` when it belongs to a run a callback stopped."""
        self.state, restored_control = load_training_checkpoint(self._snapshot(), checkpoint)
        self.state.compute_steps(self.args, run.plan.max_steps)
        run.last_saved = self.state.global_step
        if restored_control is not None and restored_control.should_training_stop and (
            self.state.global_step < self.state.max_steps
        ):
            logger.warning(
                "The checkpoint %s was saved by a run a callback stopped early at step %d; it stays stopped. "
                "Train from scratch, or resume with restore_callback_states_from_checkpoint=False to continue.",
                checkpoint, self.state.global_step,
            )
            return False
        if self.state.global_step >= run.plan.max_steps:
            # Checked here, not by the flow at the next step end: that would train (and save) one step more.
            logger.warning(
                "The checkpoint %s is at step %d and max_steps is %d: nothing to train, no checkpoint written. "
                "Raise max_steps (or num_train_epochs) to extend the run.",
                checkpoint, self.state.global_step, run.plan.max_steps,
            )
            return False
        return True

    def _begin_training(self, run: _Run) -> None:
        handler = self.callback_handler
        handler.model = self.model
        handler.optimizer = self.optimizer
        handler.lr_scheduler = self.lr_scheduler
        handler.train_dataloader = run.loader
        self.state.init_training_references(self, run.plan.max_steps, run.plan.num_train_epochs)
        run.start_time = time.perf_counter()
        run.start_step = run.last_logged = self.state.global_step
        run.model.train()
        run.model.zero_grad(set_to_none=True)
        self.control = handler.on_train_begin(self.args, self.state, self.control)
        if self.args.eval_on_start:
            self.evaluate()

    def _epoch_batches(self, run: _Run, epoch: int, skip: int) -> Iterable[Any]:
        """The batches of ``epoch`` after the first ``skip`` (already trained before a resume)."""
        sampler = getattr(run.loader, "batch_sampler", None)
        if isinstance(sampler, EpochBatchSampler):
            sampler.set_epoch(epoch, skip)
            return iter(run.loader)
        iterator = iter(run.loader)
        if skip:
            logger.warning("Resuming inside an epoch of an iterable dataset: the skipped batches are re-read.")
            for _ in range(skip):
                next(iterator, None)
        return iterator

    def _train_epoch(self, run: _Run, epoch: int, skip: int) -> None:
        handler = self.callback_handler
        self.control = handler.on_epoch_begin(self.args, self.state, self.control)
        step = skip - 1
        for inputs in self._epoch_batches(run, epoch, skip):
            step += 1
            is_update = self._train_batch(run, inputs, step)
            if is_update:
                self._end_update(run, epoch + (step + 1) / run.plan.batches_per_epoch)
            # Under DDP a flag raised mid-accumulation waits for the step boundary's sync.
            if (self.control.should_epoch_stop or self.control.should_training_stop) and (
                is_update or not self.is_distributed
            ):
                break
        if step < skip:
            logger.warning("The training dataloader yielded no batch in epoch %d; stopping.", epoch)
            self.control.should_training_stop = True
        self.control = handler.on_epoch_end(self.args, self.state, self.control)
        self._sync_control()
        self._maybe_log_save_evaluate(run)

    def _train_batch(self, run: _Run, inputs: Any, step: int) -> bool:
        """Forward and backward micro-batch ``step`` of the epoch; return whether an update is due."""
        plan = run.plan
        first = step % plan.accumulation == 0
        if first:
            self.control = self.callback_handler.on_step_begin(self.args, self.state, self.control)
            run.micro_batches = (
                min(plan.accumulation, plan.batches_per_epoch - step) if plan.sized else plan.accumulation
            )
        is_update = (step + 1) % plan.accumulation == 0 or step + 1 == plan.batches_per_epoch
        if self.is_distributed and not is_update:
            with run.model.no_sync():  # type: ignore[operator]
                loss = self.training_step(run.model, inputs, run.micro_batches)
        else:
            loss = self.training_step(run.model, inputs, run.micro_batches)
        # The first micro-batch's loss starts the sum: no zeroing op per update.
        run.update_loss = loss if first else run.update_loss + loss
        if not is_update:
            self.control = self.callback_handler.on_substep_end(self.args, self.state, self.control)
        return is_update

    def _end_update(self, run: _Run, epoch: float) -> None:
        """Clip, check, step the optimizer and the schedule, then emit the step's events, logs and saves."""
        args, handler = self.args, self.callback_handler
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # type: ignore[arg-type]
        if args.max_grad_norm > 0:
            run.grad_norm = torch.nn.utils.clip_grad_norm_(run.params, args.max_grad_norm)
        skip = self._check_update(run)
        self.control = handler.on_pre_optimizer_step(args, self.state, self.control)
        if not skip:
            if self.scaler is not None:
                self.scaler.step(self.optimizer)  # type: ignore[arg-type]
                self.scaler.update()
            else:
                self.optimizer.step()  # type: ignore[union-attr]
        self.control = handler.on_optimizer_step(args, self.state, self.control)
        run.learning_rate = self.lr_scheduler.get_last_lr()[0]
        self.lr_scheduler.step()
        # What model.zero_grad(set_to_none=True) does, without walking the module tree every update.
        for param in run.params:
            param.grad = None
        self.state.global_step += 1
        self.state.epoch = epoch
        self.control = handler.on_step_end(args, self.state, self.control)
        if self._sync_control(preemption=True):
            # Save as an ordinary checkpoint (not a "stopped" one), then stop.
            self.preempted = True
            self.control.should_save = True
        self._maybe_log_save_evaluate(run)
        if self.preempted:
            self.control.should_training_stop = True

    def _check_update(self, run: _Run) -> bool:
        """Record the update's loss; return whether the non-finite guard skips the update."""
        loss, grad_norm = run.update_loss, run.grad_norm
        if run.guard == "off":
            run.losses.add(loss)
            return False
        # Under DDP the all-reduced gradients are the same on every rank, a rank's own loss
        # is not: deciding on them keeps the replicas identical.
        if self.is_distributed:
            checked = [grad_norm if grad_norm is not None else _grad_norm(run.params)]
        else:
            checked = [loss] if grad_norm is None else [loss, grad_norm]
        if run.guard == "on_device":
            bad = ~torch.isfinite(torch.stack(checked)).all()
            self.optimizer.found_inf = bad.float()  # type: ignore[union-attr]
            run.losses.add_unless(loss, bad)
            return False
        # Reading scalars costs less than a chain of tiny tensor ops on the CPU.
        values = [value.item() for value in checked]
        norm = values[-1] if grad_norm is not None and not self.is_distributed else None
        if all(map(math.isfinite, values)):
            run.losses.add_read(loss, values[0], norm)
            return False
        run.losses.skip(norm)
        self._on_nonfinite(loss, grad_norm)
        return True

    def _finish_training(self, run: _Run) -> TrainOutput:
        """Save a stopped run, load the best model, log the summary and emit ``on_train_end``."""
        args = self.args
        if (
            self.control.should_training_stop
            and not self.preempted
            and self.state.global_step < run.plan.max_steps
            and args.save_strategy in ("steps", "epoch")
            and run.last_saved != self.state.global_step
        ):
            # A callback stopped the run early: save it, so resuming knows it is finished.
            self.control.should_save = True
            self._maybe_log_save_evaluate(run)
        if args.load_best_model_at_end and self.state.best_model_checkpoint and not self.preempted:
            barrier()
            self._load_best_model()
        metrics = self._summary(run)
        self.log(metrics)
        self.control = self.callback_handler.on_train_end(args, self.state, self.control)
        self._drain_reporters()
        if self.integration_failures:
            logger.warning(
                "Training finished, but these integrations failed and were disabled: %s",
                ", ".join(f"{f.name} ({f.event}: {f.error!r})" for f in self.integration_failures),
            )
        if self.preempted:
            logger.warning(
                "Training stopped at step %d because of %s; the checkpoint in %s resumes it "
                "(train(resume_from_checkpoint=True)).",
                self.state.global_step, self._preemption.requested, args.output_dir,
            )
        return TrainOutput(self.state.global_step, metrics["train_loss"], metrics)

    def _summary(self, run: _Run) -> dict[str, float]:
        """The final log: runtime, throughput, FLOs and the mean training loss of this call."""
        steps_done = self.state.global_step - run.start_step
        runtime = time.perf_counter() - run.start_time
        samples = steps_done * self.args.per_device_train_batch_size * run.plan.accumulation * self.dist.world_size
        return {
            "train_runtime": runtime,
            "train_samples_per_second": samples / runtime if runtime > 0 else 0.0,
            "train_steps_per_second": steps_done / runtime if runtime > 0 else 0.0,
            "total_flos": float(self.state.total_flos),
            "train_loss": run.losses.total(self._read_scalars) / max(steps_done, 1),
        }

    def _sync_control(self, preemption: bool = False) -> bool:
        """Make the control flags the same on every rank; return whether any rank got a stop signal.

        Under DDP a flag raised on one rank (a callback stopping, saving, a SIGTERM)
        is raised on all, with one small all-reduce (MAX) that carries the preemption
        request too; in one process nothing is exchanged. ``preemption=False`` leaves
        the signal to the next step boundary.
        """
        guard = getattr(self, "_preemption", None)
        requested = preemption and guard is not None and guard.requested is not None
        if not self.is_distributed:
            return requested
        control = self.control
        synced = sync_flags([requested, *(getattr(control, flag) for flag in _CONTROL_FLAGS)], self.device)
        for flag, value in zip(_CONTROL_FLAGS, synced[1:]):
            setattr(control, flag, value)
        return synced[0]

    def _on_nonfinite(self, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> None:
        what = f"loss={loss.item()}" + (f", grad_norm={grad_norm.item()}" if grad_norm is not None else "")
        if self.args.nonfinite_policy == "stop":
            logger.error("Non-finite values at step %d (%s): the update was skipped and training stops.",
                         self.state.global_step + 1, what)
            self.control.should_training_stop = True
        else:
            logger.warning(
                "Non-finite values at step %d (%s): the update was skipped.", self.state.global_step + 1, what
            )
        self.optimizer.zero_grad(set_to_none=True)  # type: ignore[union-attr]

    def _maybe_log_save_evaluate(self, run: _Run) -> None:
        if self.control.should_log and self.state.global_step > run.last_logged:
            self._log_training(run)
            # Callbacks ran: under DDP, agree again on what happens next (only on steps with events).
            self._sync_control()
        if self.control.should_evaluate:
            metrics = self.evaluate()
            is_new_best = self._determine_best_metric(metrics)
            if self.args.save_strategy == "best":
                self.control.should_save = is_new_best
            self._sync_control()
        if self.control.should_save:
            path = self._save_checkpoint()
            run.last_saved = self.state.global_step
            self.control = self.callback_handler.on_save(self.args, self.state, self.control, checkpoint=path)
            self._sync_control()

    def _log_training(self, run: _Run) -> None:
        """Log the mean loss since the last log, the gradient norm, the learning rate and any skips."""
        loss_sum, skipped, norm = run.losses.take(run.grad_norm, self._read_scalars)
        steps = self.state.global_step - run.last_logged
        logs: dict[str, float] = {"loss": loss_sum / max(steps - skipped, 1)}
        if norm is not None:
            logs["grad_norm"] = norm
        logs["learning_rate"] = run.learning_rate
        if skipped:
            logs["nonfinite_steps_skipped"] = skipped
        run.last_logged = self.state.global_step
        self.log(logs)

    def _save_checkpoint(self) -> Path:
        # Integrations must have processed every event (e.g. created their run) before
        # their state (the run id) is saved.
        self._drain_reporters()
        if self.is_world_process_zero():
            self._disk_space.before_save(self.args.output_dir)
        path = save_training_checkpoint(self._snapshot())
        if self.is_world_process_zero():
            self._disk_space.saved(path)
        return path

    def _determine_best_metric(self, metrics: Mapping[str, float]) -> bool:
        name = self.args.metric_for_best_model
        if name is None:
            return False
        key = name if name.startswith("eval_") else f"eval_{name}"
        if key not in metrics:
            raise KeyError(
                f"TrainingArguments.metric_for_best_model={name!r}: the evaluation returned no {key!r}. "
                f"Available: {sorted(metrics)}."
            )
        value = float(metrics[key])
        best = self.state.best_metric
        better = best is None or (value > best if self.args.greater_is_better else value < best)
        if better:
            self.state.best_metric = value
            self.state.best_global_step = self.state.global_step
        return better

    def _load_best_model(self) -> None:
        path = Path(self.state.best_model_checkpoint or "")
        logger.info("Loading best model from %s (score: %s).", path, self.state.best_metric)
        self.model.load_state_dict(ckpt.load_file(path / WEIGHTS_NAME, map_location=self.device))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Record ``logs`` (plus ``epoch``) in ``state.log_history`` and emit ``on_log``.

        Values are never rounded: loggers receive them exactly.
        """
        if self.state.epoch is not None:
            logs["epoch"] = self.state.epoch
        self.state.log_history.append({**logs, "step": self.state.global_step})
        self.control = self.callback_handler.on_log(self.args, self.state, self.control, logs)

    # -- evaluation -------------------------------------------------------------------------------
    def evaluate(
        self, eval_dataset: Any = None, ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        """Evaluate and return metrics prefixed ``<metric_key_prefix>_`` (``eval_loss``, ...).

        A dict of datasets evaluates each under ``<prefix>_<name>``. Emits
        ``on_prediction_step`` per batch, then ``on_log`` and ``on_evaluate``.
        """
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if isinstance(dataset, Mapping):
            merged: dict[str, float] = {}
            for name, ds in dataset.items():
                merged.update(self.evaluate(ds, ignore_keys, f"{metric_key_prefix}_{name}"))
            return merged
        dataloader = self.get_eval_dataloader(dataset)
        output = self._prediction_loop(dataloader, metric_key_prefix, need_predictions=self.compute_metrics is not None)
        self.log(output.metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, output.metrics)
        if not self._training:
            # Outside training nothing drains later: the caller expects its metrics to be logged.
            self._drain_reporters()
        return output.metrics

    def predict(
        self, test_dataset: Any, ignore_keys: list[str] | None = None, metric_key_prefix: str = "test"
    ) -> PredictionOutput:
        """Predict on ``test_dataset``; emits ``on_prediction_step`` per batch and ``on_predict`` (no ``on_log``)."""
        dataloader = self.get_test_dataloader(test_dataset)
        output = self._prediction_loop(dataloader, metric_key_prefix, need_predictions=True)
        self.control = self.callback_handler.on_predict(self.args, self.state, self.control, output.metrics)
        if not self._training:
            self._drain_reporters()
        return output

    def prediction_step(self, model: nn.Module, inputs: Any) -> tuple[torch.Tensor | None, Any, Any]:
        """Return ``(loss, predictions, labels)`` for one batch, without gradients."""
        inputs = _move(inputs, self.device)
        labels = self._labels(inputs, pop=False)
        with torch.no_grad(), self._autocast():
            if self.compute_loss_func is not None and labels is not None:
                loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
            else:
                outputs = self._forward(model, inputs)
                loss = self._extract_loss(outputs)
        if isinstance(outputs, torch.Tensor):
            predictions = None if outputs.dim() == 0 else outputs
        elif isinstance(outputs, Mapping):
            rest = {k: v for k, v in outputs.items() if k != "loss"}
            predictions = rest.get("logits", next(iter(rest.values()), None) if len(rest) == 1 else rest or None)
        elif isinstance(outputs, (list, tuple)):
            rest = list(outputs[1:] if loss is not None and outputs and outputs[0] is loss else outputs)  # type: ignore
            predictions = rest[0] if len(rest) == 1 else tuple(rest) or None  # type: ignore
        else:
            predictions = getattr(outputs, "logits", None)
        return loss, predictions, labels

    def _prediction_loop(self, dataloader: Iterable[Any], prefix: str, *, need_predictions: bool) -> PredictionOutput:
        handler = self.callback_handler
        handler.eval_dataloader = dataloader
        model = self.model
        was_training = model.training
        model.eval()
        start = time.perf_counter()
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        count = torch.zeros((), device=self.device, dtype=torch.float64)
        has_loss = False
        preds: list[Any] = []
        labels: list[Any] = []
        batches = 0
        try:
            for inputs in dataloader:
                loss, logits, label = self.prediction_step(model, inputs)
                size = self._batch_size(inputs)
                if loss is not None:
                    has_loss = True
                    loss_sum += loss.detach().double() * size
                    count += size
                if need_predictions and not self.args.prediction_loss_only:
                    if self.preprocess_logits_for_metrics is not None and logits is not None:
                        logits = self.preprocess_logits_for_metrics(logits, label)
                    if logits is not None:
                        preds.append(_detach_cpu(logits))
                    if label is not None:
                        labels.append(_detach_cpu(label))
                batches += 1
                self.control = handler.on_prediction_step(self.args, self.state, self.control)
        finally:
            model.train(was_training)
        # An iterable dataset is not sharded: every rank saw all of it, and gathering would repeat it.
        if self.is_distributed and isinstance(getattr(dataloader, "batch_sampler", None), EpochBatchSampler):
            totals = torch.stack([loss_sum, count, torch.tensor(float(has_loss), device=self.device).double()])
            all_reduce_(totals)
            loss_sum, count, has_loss = totals[0], totals[1], bool(totals[2] > 0)
            if need_predictions:
                preds, labels = self._gather_objects(preds), self._gather_objects(labels)
        predictions = _concat(preds)
        label_ids = _concat(labels)
        metrics: dict[str, float] = {}
        if has_loss:
            metrics[f"{prefix}_loss"] = self._to_host(loss_sum / count.clamp(min=1))[0]
        if self.compute_metrics is not None and predictions is not None:
            extra = self.compute_metrics(EvalPrediction(predictions, label_ids))
            for key, value in dict(extra).items():
                metrics[key if key.startswith(f"{prefix}_") else f"{prefix}_{key}"] = value
        runtime = time.perf_counter() - start
        num_samples = float(count.item()) if has_loss else float(batches)
        metrics[f"{prefix}_runtime"] = runtime
        metrics[f"{prefix}_samples_per_second"] = num_samples / runtime if runtime > 0 else 0.0
        metrics[f"{prefix}_steps_per_second"] = batches / runtime if runtime > 0 else 0.0
        return PredictionOutput(predictions, label_ids, metrics)

    def _gather_objects(self, chunks: list[Any]) -> list[Any]:
        gathered: list[Any] = [None] * self.dist.world_size
        torch.distributed.all_gather_object(gathered, chunks)
        # Evaluation shards are contiguous blocks in rank order, so concatenating keeps dataset order.
        return [c for part in gathered for c in part]

    @staticmethod
    def _batch_size(inputs: Any) -> int:
        if isinstance(inputs, torch.Tensor):
            return int(inputs.shape[0]) if inputs.dim() else 1
        values = inputs.values() if isinstance(inputs, Mapping) else inputs if isinstance(inputs, (list, tuple)) else []
        for value in values:
            if isinstance(value, torch.Tensor) and value.dim():
                return int(value.shape[0])
        return 1

    # -- saving ---------------------------------------------------------------------------------
    def save_model(self, output_dir: str | None = None) -> None:
        """Save the model's weights (``pytorch_model.bin``) atomically, on world rank zero."""
        if not self.is_world_process_zero():
            return
        target = Path(output_dir or self.args.output_dir)
        target.mkdir(parents=True, exist_ok=True)
        tmp = target / f".{WEIGHTS_NAME}.tmp"
        ckpt.save_file(self.model.state_dict(), tmp)
        os.replace(tmp, target / WEIGHTS_NAME)

    def save_state(self) -> None:
        """Write ``trainer_state.json`` into ``output_dir`` (world rank zero)."""
        if self.is_world_process_zero():
            Path(self.args.output_dir).mkdir(parents=True, exist_ok=True)
            self.state.save_to_json(os.path.join(self.args.output_dir, TRAINER_STATE_NAME))

