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
import inspect
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
from .collate import default_collate_explained
from .control import TrainerControl
from .data import EpochBatchSampler, TensorBatchLoader, has_length, is_iterable_dataset, supports_batch_indexing
from .discovery import resolve_report_to
from .distributed import all_reduce_, barrier, broadcast_object, dist_info, ensure_process_group, sync_flags
from .eval_gather import EvalAccumulator, nested_concat, to_python_numbers
from .flow import DefaultFlowCallback
from .foreign_checkpoint import is_transformers_checkpoint
from .fsdp import (
    full_model_state_dict,
    global_grad_norm,
    is_sharded,
    is_sharded_checkpoint,
    load_sharded,
    plain_tensor,
    shard_model,
)
from .handler import CallbackHandler
from .hp_search import BestRun, default_compute_objective, run_optuna
from .integrations import IntegrationCallback
from .label_smoothing import smoothed_cross_entropy
from .log_history import LogHistoryStore
from .loss_tracking import LossTracker
from .metrics_report import format_metrics, metrics_table, write_metrics
from .model_conventions import enable_gradient_checkpointing, flops_counter
from .model_files import WEIGHTS_NAME, load_model_files, save_model_folder, unwrap_model
from .model_inputs import RemoveUnusedKeysCollator, forward_parameters, model_label_names
from .optimizers import build_optimizer
from .preemption import PreemptionGuard
from .progress import PrinterCallback, ProgressCallback
from .run_lock import OutputDirInUseError, RunLock
from .run_summary import print_run_summary
from .save_failures import DiskSpaceWatch
from .schedules import get_scheduler
from .state import TrainerState
from .training_args import TrainingArguments
from .training_checkpoint import (
    TRAINER_STATE_NAME,
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
    """What ``compute_metrics`` receives: numpy arrays concatenated over the whole dataset.

    As in transformers, batches whose second dimension differs are padded with
    ``-100``. Without numpy installed they are CPU tensors.

    Args:
        predictions: Model predictions (logits).
        label_ids: Labels, or ``None`` when the batches carry none.
    """

    predictions: Any
    label_ids: Any


class PredictionOutput(NamedTuple):
    """Result of :meth:`Trainer.predict`.

    Args:
        predictions: Concatenated predictions (numpy arrays, padded with -100 where lengths differ).
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


def _is_array_like(value: Any) -> bool:
    """A tensor, or a (nested) list/tuple of them: what evaluation can gather as predictions."""
    if isinstance(value, torch.Tensor):
        return True
    return isinstance(value, (list, tuple)) and bool(value) and all(_is_array_like(v) for v in value)


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


def _concat_host(chunks: list[Any]) -> Any:
    """Concatenate the host results of every rank (padding with -100 where lengths differ)."""
    result = None
    for chunk in chunks:
        if chunk is not None:
            result = nested_concat(result, chunk)
    return result


def _checked_arguments(
    model: Any, args: Any, eval_dataset: Any, compute_metrics: Any = None
) -> tuple[nn.Module, TrainingArguments]:
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
    metric = args.metric_for_best_model
    if metric is not None and compute_metrics is None and metric.removeprefix("eval_") != "loss":
        raise ValueError(
            f"TrainingArguments.metric_for_best_model={metric!r} is invalid here: without compute_metrics "
            "evaluation produces only eval_loss. Pass compute_metrics=... returning that metric, or use "
            "metric_for_best_model='loss'."
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
        model_init: Returns a fresh model (takes no argument, or the Optuna trial); called at
            construction when ``model`` is ``None`` and at the start of every ``train()``.

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
        model_init: Callable[..., nn.Module] | None = None,
    ) -> None:
        self.model_init = model_init
        if model_init is not None:
            if optimizers[0] is not None or optimizers[1] is not None:
                raise ValueError(
                    "Trainer(model_init=..., optimizers=...) is invalid: each train() builds a fresh model, "
                    "which the given optimizer does not hold. Subclass and override create_optimizer_and_scheduler."
                )
            if model is None:
                model = self.call_model_init()
        model, args = _checked_arguments(model, args, eval_dataset, compute_metrics)
        self.args = args
        self.dist = dist_info()
        self.device = self._select_device()
        self._check_precision()
        self.is_distributed = ensure_process_group(args.ddp_backend, args.ddp_timeout, self.device)
        set_seed(args.seed)
        optimizer, lr_scheduler = optimizers
        self.model = model.to(self.device)
        self.model_wrapped: nn.Module = self.model
        if args.gradient_checkpointing:
            enable_gradient_checkpointing(unwrap_model(self.model), args.gradient_checkpointing_kwargs)
        # FLOs of the micro-batches since state.total_flos was last updated (see _store_flos).
        self._count_flos: Callable[[Any], float] | None = None
        self._pending_flos = 0.0
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
        collate_fn = self._collator()
        workers: dict[str, Any] = {}
        if args.dataloader_num_workers > 0:
            workers["persistent_workers"] = args.dataloader_persistent_workers
            if args.dataloader_prefetch_factor is not None:
                workers["prefetch_factor"] = args.dataloader_prefetch_factor
        if is_iterable_dataset(dataset):
            return DataLoader(
                dataset, batch_size=batch_size, collate_fn=collate_fn,
                num_workers=args.dataloader_num_workers, pin_memory=pin, **workers,
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
            dataset, batch_sampler=sampler, collate_fn=collate_fn,
            num_workers=args.dataloader_num_workers, pin_memory=pin, generator=generator, **workers,
        )

    def _collator(self) -> Callable[[list[Any]], Any] | None:
        """The data collator, behind one that drops the keys ``forward`` does not take (``remove_unused_columns``)."""
        collator = self.data_collator if self.data_collator is not None else default_collate_explained
        if not self.args.remove_unused_columns:
            return collator
        params = forward_parameters(self.model)
        if params is None:
            return collator
        # transformers' signature columns: forward's parameters, "label", "label_ids" and the label names.
        kept = {*params, "label", "label_ids", *(self.args.label_names or model_label_names(self.model))}
        return RemoveUnusedKeysCollator(self.data_collator, kept)

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
            self.optimizer = build_optimizer(args.optim, groups, args, self.device)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None) -> Any:
        """The ``lr_scheduler_type`` schedule with warmup, unless one was given."""
        if self.lr_scheduler is None:
            self.lr_scheduler = get_scheduler(
                self.args.lr_scheduler_type, optimizer or self.optimizer,  # type: ignore[arg-type]
                self.args.get_warmup_steps(num_training_steps), num_training_steps,
                self.args.lr_scheduler_kwargs,
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

    @property
    def label_names(self) -> list[str]:
        """Batch keys holding labels.

        ``args.label_names``, else the model's ``forward`` parameters whose name
        contains ``label`` (transformers' rule), else ``["labels"]``.
        """
        if self.args.label_names is not None:
            return list(self.args.label_names)
        return model_label_names(self.model) or ["labels"]

    def _labels(self, inputs: Any, pop: bool) -> Any:
        if isinstance(inputs, Mapping):
            for name in self.label_names:
                if name in inputs:
                    return inputs.pop(name) if pop else inputs[name]  # type: ignore
            return None
        if isinstance(inputs, (list, tuple)) and len(inputs) >= 2:
            return inputs[-1]
        return None

    @staticmethod
    def _extract_loss(outputs: Any) -> torch.Tensor | None:
        if isinstance(outputs, torch.Tensor):
            # A bare tensor is a loss only when it is a scalar; anything else is logits.
            return outputs if outputs.dim() == 0 else None
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
        smoothing = self.args.label_smoothing_factor
        if smoothing and isinstance(inputs, Mapping) and "labels" in inputs and self.compute_loss_func is None:
            # transformers' LabelSmoother: the labels are taken out and the loss is computed from the logits.
            inputs = dict(inputs)
            labels = inputs.pop("labels")
            outputs = self._forward(model, inputs)
            loss = smoothed_cross_entropy(outputs, labels, smoothing)
        elif self.compute_loss_func is not None:
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
                per_sample = (
                    " If it is a per-sample loss, reduce it in forward (e.g. .mean())."
                    if isinstance(outputs, torch.Tensor) and outputs.dim() == 1 else ""
                )
                raise ValueError(
                    f"The model did not return a loss: forward returned {_describe(outputs)}. Return a scalar "
                    "tensor, a dict with 'loss', an object with .loss, or a tuple starting with the loss; "
                    f"or pass compute_loss_func=... to the Trainer.{per_sample}"
                )
        if loss.dim() != 0:
            raise ValueError(
                f"The loss must be a scalar tensor, got shape {tuple(loss.shape)}: reduce it (e.g. .mean())."
            )
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model: nn.Module, inputs: Any, num_items_in_batch: Any = None) -> torch.Tensor:
        """Forward and backward one micro-batch (transformers' signature).

        Returns the detached loss divided by the micro-batches of this update
        (``gradient_accumulation_steps``, fewer at the end of an epoch).
        """
        inputs = _move(inputs, self.device)
        num_micro_batches = getattr(self, "_micro_batches", 1)
        with self._autocast():
            loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
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
        if is_transformers_checkpoint(path):
            logger.warning(
                "Resuming from %s, a checkpoint without a %s manifest (written by transformers' Trainer?): "
                "it was not written atomically and its files cannot be verified.", path, ckpt.COMMIT_MARKER,
            )
            return path
        if not ckpt.is_complete(path):
            raise ValueError(
                f"resume_from_checkpoint={os.fspath(path)!r} is not a complete checkpoint (missing folder, "
                f"or no valid {ckpt.COMMIT_MARKER} manifest: the save was interrupted). "
                "Use resume_from_checkpoint=True to pick the newest complete one."
            )
        return path

    def call_model_init(self, trial: Any = None) -> nn.Module:
        """Build a model with ``model_init`` (passing ``trial`` when it takes an argument).

        Raises:
            RuntimeError: ``model_init`` takes more than one argument or returned ``None``.
        """
        init = self.model_init
        if init is None:
            raise RuntimeError("call_model_init needs Trainer(model_init=...).")
        takes = len(inspect.signature(init).parameters)
        if takes > 1:
            raise RuntimeError(f"model_init should take 0 or 1 argument (the trial), it takes {takes}.")
        model = init() if takes == 0 else init(trial)
        if model is None:
            raise RuntimeError("model_init returned None: it must return a torch.nn.Module.")
        return model

    def _fresh_model(self, trial: Any) -> None:
        """``model_init``: a new model (seeded like transformers), and a new optimizer and schedule for it."""
        set_seed(self.args.seed)
        self.model = self.call_model_init(trial).to(self.device)
        self.model_wrapped = self.model
        self.callback_handler.model = self.model
        self.optimizer, self.lr_scheduler = None, None
        self._compiled = False

    def log_metrics(self, split: str, metrics: dict[str, Any]) -> None:
        """Print ``metrics`` as transformers does (``***** train metrics *****`` and aligned lines), on world rank 0."""
        if self.is_world_process_zero():
            print(metrics_table(split, metrics))

    def metrics_format(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """Metrics formatted for reading: runtimes as ``h:mm:ss.cc``, floats rounded to 4 decimals."""
        return format_metrics(metrics)

    def save_metrics(self, split: str, metrics: dict[str, Any], combined: bool = True) -> None:
        """Write ``<split>_results.json`` (and merge into ``all_results.json``) in ``output_dir``, on world rank 0."""
        if self.is_world_process_zero():
            write_metrics(self.args.output_dir, split, metrics, combined)

    def hyperparameter_search(
        self,
        hp_space: Callable[[Any], dict[str, Any]] | None = None,
        compute_objective: Callable[[dict[str, float]], float] | None = None,
        n_trials: int = 20,
        direction: str | list[str] = "minimize",
        backend: str | None = None,
        hp_name: Callable[[Any], str] | None = None,
        **kwargs: Any,
    ) -> BestRun:
        """Search hyperparameters with Optuna (``pip install optuna``), transformers' signature.

        Every trial sets the fields ``hp_space(trial)`` returns, trains a fresh model from
        ``model_init`` and evaluates; ``compute_objective(metrics)`` (default: ``eval_loss``,
        or the sum of the metrics) is minimised or maximised.

        Raises:
            ImportError: Optuna is not installed.
            ValueError: Another backend, or no ``model_init``.
        """
        if backend not in (None, "optuna"):
            raise ValueError(f"hyperparameter_search(backend={backend!r}) is invalid: epochal supports 'optuna' only.")
        if self.model_init is None:
            raise ValueError("hyperparameter_search needs Trainer(model_init=...): each trial trains a fresh model.")
        return run_optuna(
            self, hp_space, compute_objective or default_compute_objective, n_trials, direction, **kwargs
        )

    def train(
        self,
        resume_from_checkpoint: str | bool | os.PathLike[str] | None = None,
        trial: Any = None,
        ignore_keys_for_eval: list[str] | None = None,
    ) -> TrainOutput:
        """Train the model.

        Args:
            resume_from_checkpoint: ``True`` resumes from the newest complete checkpoint
                in ``output_dir``; a path resumes from that checkpoint. Weights,
                optimizer, schedule, scaler, RNG streams, data position and
                callback states are restored. A run a callback stopped early stays
                stopped; a run that reached ``max_steps`` can be extended.
            trial: The Optuna trial (``hyperparameter_search``), passed to ``model_init``.
            ignore_keys_for_eval: Output keys left out of the predictions of evaluations during training.

        Returns:
            ``TrainOutput(global_step, training_loss, metrics)``.

        Raises:
            CheckpointChanged: A file of the checkpoint to resume changed after it was saved.
            OutputDirInUseError: Another live run holds ``output_dir`` (raised on every rank).
        """
        with self._output_dir_lock():
            return self._train_locked(resume_from_checkpoint, trial, ignore_keys_for_eval)

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

    def _train_locked(
        self,
        resume_from_checkpoint: str | bool | os.PathLike[str] | None,
        trial: Any,
        ignore_keys_for_eval: list[str] | None,
    ) -> TrainOutput:
        checkpoint = self._resolve_checkpoint(resume_from_checkpoint)
        if self.model_init is not None:
            self._fresh_model(trial)
        self._ignore_keys_for_eval = ignore_keys_for_eval
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
        if self.args.fsdp:
            return self._shard_model()
        if not self.is_distributed:
            return self.model
        if isinstance(self.model_wrapped, nn.parallel.DistributedDataParallel):
            return self.model_wrapped
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(
            self.model, device_ids=device_ids,
            find_unused_parameters=bool(self.args.ddp_find_unused_parameters),
        )

    def _shard_model(self) -> nn.Module:
        """Shard the model with FSDP2 over all ranks (issue 20); one process without a process group trains it whole."""
        plan = self.args.fsdp_plan
        if plan is None or is_sharded(self.model):
            return self.model
        if not torch.distributed.is_initialized():
            logger.info("fsdp in one process: the model is trained whole; checkpoints are still sharded (DCP).")
            return self.model
        shard_model(self.model, plan, self.device, bf16=self.args.bf16, optimizer=self.optimizer)
        return self.model

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
        self._maybe_compile()
        self.model_wrapped = self._wrap_model()
        self._count_flos, self._pending_flos = flops_counter(unwrap_model(self.model)), 0.0
        guard = self._guard_mode()
        # On the CPU the guard reads the loss and the gradient norm at every update anyway (a memory
        # load), so they are summed as Python floats: no tensor op per update, none at a log.
        on_host = guard == "read" and self.device.type == "cpu" and not self.is_distributed
        return _Run(
            plan, loader, self.model_wrapped, [p for p in self.model.parameters() if p.requires_grad],
            LossTracker(self.device, on_host=on_host), guard,
        )

    def _maybe_compile(self) -> None:
        """``torch_compile``: compile the model in place (its ``state_dict`` keys stay the same)."""
        args = self.args
        if args.torch_compile and not getattr(self, "_compiled", False):
            options = {"backend": args.torch_compile_backend or "inductor", "mode": args.torch_compile_mode}
            self.model.compile(**options)
            self._compiled = True

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
            rank=self.dist.rank, world_size=self.dist.world_size, device=self.device, sharded=bool(self.args.fsdp),
            processing_class=self.processing_class,
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
        self._micro_batches = run.micro_batches
        if self.args.include_num_input_tokens_seen:
            self._count_input_tokens(inputs)
        if self._count_flos is not None:
            self._pending_flos += self._count_flos(inputs)
        if not is_update and isinstance(run.model, nn.parallel.DistributedDataParallel):
            with run.model.no_sync():
                loss = self.training_step(run.model, inputs)
        else:
            loss = self.training_step(run.model, inputs)
        # The first micro-batch's loss starts the sum: no zeroing op per update.
        run.update_loss = loss if first else run.update_loss + loss
        if not is_update:
            self.control = self.callback_handler.on_substep_end(self.args, self.state, self.control)
        return is_update

    def _count_input_tokens(self, inputs: Any) -> None:
        """Add the batch's input tokens to ``state.num_input_tokens_seen`` (shapes only: no device sync)."""
        name = getattr(self.model, "main_input_name", "input_ids")
        if isinstance(inputs, Mapping):
            tensor = inputs.get(name)
        else:
            tensor = inputs[0] if isinstance(inputs, (list, tuple)) and inputs else inputs
        if not isinstance(tensor, torch.Tensor):
            if not getattr(self, "_warned_tokens", False):
                self._warned_tokens = True
                logger.warning(
                    "include_num_input_tokens_seen=True but the batch has no %r tensor: tokens are not counted.", name
                )
            return
        tokens = tensor.numel()
        if self.is_distributed:
            # Ranks' batches can differ in length: sum them (one small collective per micro-batch, as transformers).
            total = torch.tensor([float(tokens)], device=self.device)
            all_reduce_(total)
            tokens = int(total.item())
        self.state.num_input_tokens_seen += tokens

    @staticmethod
    def num_tokens(train_dl: Iterable[Any], max_steps: int | None = None) -> int:
        """Tokens (``input_ids`` elements) in ``train_dl``; with ``max_steps``: the first batch's times it."""
        train_tokens = 0
        try:
            for batch in train_dl:
                tokens = batch["input_ids"].numel()
                if max_steps is not None:
                    return int(tokens * max_steps)
                train_tokens += tokens
        except (KeyError, TypeError, IndexError):
            logger.warning("Cannot get num_tokens from dataloader: its batches hold no 'input_ids'.")
        return train_tokens

    def _end_update(self, run: _Run, epoch: float) -> None:
        """Clip, check, step the optimizer and the schedule, then emit the step's events, logs and saves."""
        args, handler = self.args, self.callback_handler
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # type: ignore[arg-type]
        if args.max_grad_norm > 0:
            # Under fsdp the norm of the sharded (DTensor) gradients is the global one, read in full.
            run.grad_norm = plain_tensor(torch.nn.utils.clip_grad_norm_(run.params, args.max_grad_norm))
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
        if not isinstance(self.lr_scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.lr_scheduler.step()  # a plateau schedule steps on the eval metric instead
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
            if grad_norm is None:
                grad_norm = global_grad_norm(run.params) if is_sharded(self.model) else _grad_norm(run.params)
            checked = [grad_norm]
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
        print_run_summary(self, metrics)
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
        self._store_flos()
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
            metrics = self.evaluate(ignore_keys=getattr(self, "_ignore_keys_for_eval", None))
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
        self._store_flos()
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
        self._store_flos()
        if self.is_world_process_zero():
            self._disk_space.before_save(self.args.output_dir)
        path = save_training_checkpoint(self._snapshot())
        if self.is_world_process_zero():
            self._disk_space.saved(path)
        return path

    def _store_flos(self) -> None:
        """Add the FLOs counted since the last call (summed over ranks) to ``state.total_flos``.

        Called where every rank is (a log, a save, the end), like transformers' ``store_flos``:
        one small all-reduce there under torch.distributed, nothing per step.
        """
        if self._count_flos is None:
            return
        flos = self._pending_flos
        if self.is_distributed:
            flos = all_reduce_(torch.tensor(flos, dtype=torch.float64, device=self.device)).item()
        self.state.total_flos += flos
        self._pending_flos = 0.0

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
        if is_sharded_checkpoint(path):  # every rank loads its shards
            load_sharded(self.model, None, path)
            return
        load_model_files(self.model, path)

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
        output = self._prediction_loop(
            dataloader, metric_key_prefix, need_predictions=self.compute_metrics is not None, ignore_keys=ignore_keys
        )
        self.log(output.metrics)
        self._step_plateau_schedule(output.metrics, metric_key_prefix)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, output.metrics)
        if not self._training:
            # Outside training nothing drains later: the caller expects its metrics to be logged.
            self._drain_reporters()
        return output.metrics

    def _step_plateau_schedule(self, metrics: Mapping[str, float], prefix: str) -> None:
        """Step a ``ReduceLROnPlateau`` schedule (built or given) with the eval metric, during training."""
        if not self._training or not isinstance(self.lr_scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            return
        name = self.args.metric_for_best_model or "loss"
        key = name if name.startswith(f"{prefix}_") else f"{prefix}_{name}"
        if key not in metrics:
            raise KeyError(
                f"lr_scheduler is ReduceLROnPlateau and steps on {key!r}, which the evaluation did not return "
                f"(available: {sorted(metrics)}). Set TrainingArguments.metric_for_best_model."
            )
        self.lr_scheduler.step(metrics[key])

    def predict(
        self, test_dataset: Any, ignore_keys: list[str] | None = None, metric_key_prefix: str = "test"
    ) -> PredictionOutput:
        """Predict on ``test_dataset``; emits ``on_prediction_step`` per batch and ``on_predict`` (no ``on_log``)."""
        dataloader = self.get_test_dataloader(test_dataset)
        output = self._prediction_loop(dataloader, metric_key_prefix, need_predictions=True, ignore_keys=ignore_keys)
        self.control = self.callback_handler.on_predict(self.args, self.state, self.control, output.metrics)
        if not self._training:
            self._drain_reporters()
        return output

    def prediction_step(
        self, model: nn.Module, inputs: Any, prediction_loss_only: bool, ignore_keys: list[str] | None = None
    ) -> tuple[torch.Tensor | None, Any, Any]:
        """Return ``(loss, predictions, labels)`` for one batch, without gradients (transformers' signature).

        When the batch carries labels the loss comes from :meth:`compute_loss`, so an
        override of it gives ``eval_loss`` too. ``ignore_keys`` are output keys left
        out of the predictions (default: the model config's ``keys_to_ignore_at_inference``).
        """
        inputs = _move(inputs, self.device)
        labels = self._labels(inputs, pop=False)
        if ignore_keys is None:
            ignore_keys = list(getattr(getattr(self.model, "config", None), "keys_to_ignore_at_inference", []) or [])
        with torch.no_grad(), self._autocast():
            if labels is not None and self._loss_from_compute_loss():
                loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
            else:
                outputs = self._forward(model, inputs)
                loss = self._extract_loss(outputs)
        if loss is not None:
            loss = loss.detach().mean()
        if prediction_loss_only:
            return loss, None, None
        predictions: Any
        if isinstance(outputs, torch.Tensor):
            predictions = None if outputs.dim() == 0 else outputs
        elif isinstance(outputs, Mapping):
            # Caches (transformers' past_key_values: a DynamicCache object) are no predictions: only
            # tensors and nested lists of them can be gathered and concatenated.
            rest = {k: v for k, v in outputs.items() if k != "loss" and k not in ignore_keys and _is_array_like(v)}
            if "logits" in rest and len(rest) == 1:
                predictions = rest["logits"]
            else:
                values = tuple(rest.values())
                predictions = values[0] if len(values) == 1 else values or None
        elif isinstance(outputs, (list, tuple)):
            rest = list(outputs[1:] if loss is not None and outputs and outputs[0] is loss else outputs)  # type: ignore
            predictions = rest[0] if len(rest) == 1 else tuple(rest) or None
        else:
            predictions = getattr(outputs, "logits", None)
        return loss, predictions, labels

    def _loss_from_compute_loss(self) -> bool:
        """Whether evaluation takes its loss from ``compute_loss`` (overridden, or ``compute_loss_func`` given)."""
        return (
            self.compute_loss_func is not None
            or self.args.label_smoothing_factor > 0
            or type(self).compute_loss is not Trainer.compute_loss
        )

    def _prediction_loop(
        self, dataloader: Iterable[Any], prefix: str, *, need_predictions: bool, ignore_keys: list[str] | None = None
    ) -> PredictionOutput:
        handler = self.callback_handler
        handler.eval_dataloader = dataloader
        model = self.model
        was_training = model.training
        model.eval()
        start = time.perf_counter()
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        loss_samples = 0
        num_samples = 0
        has_loss = False
        loss_only = self.args.prediction_loss_only or not need_predictions
        preds, labels = EvalAccumulator(), EvalAccumulator()
        accumulation = self.args.eval_accumulation_steps
        batches = 0
        padding = self._fsdp_eval_padding(dataloader)
        try:
            for inputs in dataloader:
                size = self._batch_size(inputs)
                loss, logits, label = self.prediction_step(model, inputs, loss_only, ignore_keys=ignore_keys)
                num_samples += size
                if loss is not None:
                    has_loss = True
                    loss_sum += loss.double() * size
                    loss_samples += size
                if not loss_only:
                    if self.preprocess_logits_for_metrics is not None and logits is not None:
                        logits = self.preprocess_logits_for_metrics(logits, label)
                    preds.add(logits)
                    labels.add(label)
                batches += 1
                self.control = handler.on_prediction_step(self.args, self.state, self.control)
                if accumulation is not None and batches % accumulation == 0:
                    preds.flush()
                    labels.flush()
            for _ in range(padding):  # fsdp: a forward is a collective, so every rank runs as many
                self.prediction_step(model, inputs, True)
        finally:
            model.train(was_training)
        predictions, label_ids = preds.result(), labels.result()
        # An iterable dataset is not sharded: every rank saw all of it, and gathering would repeat it.
        if self.is_distributed and isinstance(getattr(dataloader, "batch_sampler", None), EpochBatchSampler):
            counts = torch.tensor([float(loss_samples), float(num_samples), float(has_loss)], device=self.device)
            totals = torch.cat([loss_sum.reshape(1), counts.double()])
            all_reduce_(totals)
            loss_sum, loss_samples, num_samples = totals[0], int(totals[1].item()), int(totals[2].item())
            has_loss = bool(totals[3] > 0)
            if not loss_only:
                predictions = _concat_host(self._gather_objects([predictions]))
                label_ids = _concat_host(self._gather_objects([label_ids]))
        metrics: dict[str, Any] = {}
        if self.compute_metrics is not None and predictions is not None:
            extra = self.compute_metrics(EvalPrediction(predictions, label_ids))
            metrics = to_python_numbers(dict(extra))
        if has_loss:
            metrics[f"{prefix}_loss"] = self._to_host(loss_sum / max(loss_samples, 1))[0]
        metrics = {key if key.startswith(f"{prefix}_") else f"{prefix}_{key}": value for key, value in metrics.items()}
        runtime = time.perf_counter() - start
        metrics[f"{prefix}_runtime"] = runtime
        metrics[f"{prefix}_samples_per_second"] = num_samples / runtime if runtime > 0 else 0.0
        metrics[f"{prefix}_steps_per_second"] = batches / runtime if runtime > 0 else 0.0
        return PredictionOutput(predictions, label_ids, metrics)

    def _fsdp_eval_padding(self, dataloader: Iterable[Any]) -> int:
        """Extra forwards this rank runs (results dropped) so every rank runs as many as the longest shard.

        Under fsdp each forward all-gathers parameters: a rank with one batch fewer
        (uneven evaluation shards) would leave the others waiting.
        """
        if not (is_sharded(self.model) and isinstance(getattr(dataloader, "batch_sampler", None), EpochBatchSampler)):
            return 0
        mine = len(dataloader)  # type: ignore[arg-type]
        longest = int(all_reduce_(torch.tensor([mine], device=self.device), op="max").item())
        if mine == 0 and longest:
            raise ValueError(
                "Evaluation under fsdp needs at least one batch per rank: use more evaluation samples than ranks."
            )
        return longest - mine

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
        """Save the model into ``output_dir`` (default ``args.output_dir``), on world rank zero.

        A model with ``save_pretrained`` (transformers, PEFT; unwrapped from DDP or
        ``torch.compile``) writes its own format, safetensors, which the library's
        ``from_pretrained`` opens; a PEFT model writes its adapter only. Any other model
        is saved as ``pytorch_model.bin`` (its ``state_dict``). ``processing_class`` is
        saved too when it has ``save_pretrained``. Each file is written and fsynced in a
        temporary folder, then renamed into place.

        Under ``fsdp`` every rank must call it: the shards are gathered into one
        consolidated state dict (on the CPU) that rank zero writes as ``pytorch_model.bin``.
        """
        state = full_model_state_dict(self.model) if is_sharded(self.model) else None
        if not self.is_world_process_zero():
            return
        if state is None:
            save_model_folder(self.model, output_dir or self.args.output_dir, self.processing_class)
            return
        target = Path(output_dir or self.args.output_dir)
        target.mkdir(parents=True, exist_ok=True)
        tmp = target / f".{WEIGHTS_NAME}.tmp"
        ckpt.save_file(state, tmp)
        os.replace(tmp, target / WEIGHTS_NAME)

    def save_state(self) -> None:
        """Write ``trainer_state.json`` into ``output_dir`` (world rank zero)."""
        if self.is_world_process_zero():
            Path(self.args.output_dir).mkdir(parents=True, exist_ok=True)
            self.state.save_to_json(os.path.join(self.args.output_dir, TRAINER_STATE_NAME))

