"""``TrainingArguments``: what to train, how, and what to log, with transformers' names.

Only what epochal implements is accepted. Every inconsistent combination raises
``ValueError`` at construction with the field, the value and the fix. Importing
this module does not import torch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

from .args_fields import (
    OPTIMIZER_NAMES,
    SCHEDULER_TYPES,
    check_field_types,
    reject_unknown_fields,
    warn_no_effect_fields,
)
from .fsdp_options import FsdpPlan, normalise_fsdp, normalise_fsdp_config, plan_fsdp

__all__ = ["SCHEDULER_TYPES", "TrainingArguments"]

logger = logging.getLogger(__name__)

_STRATEGIES = ("no", "steps", "epoch")
_NONFINITE_POLICIES = ("skip", "stop", "off")


def _bad(field: str, value: Any, fix: str) -> ValueError:
    return ValueError(f"TrainingArguments.{field}={value!r} is invalid: {fix}")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


@dataclasses.dataclass
class TrainingArguments:
    """Arguments of a training run. Names and defaults follow transformers.

    Intervals (``logging_steps``, ``eval_steps``, ``save_steps``) accept an integer
    number of steps, or a float in ``(0, 1)`` meaning a fraction of the total steps.

    Args:
        output_dir: Where checkpoints and the final model go.
        eval_strategy: ``"no"``, ``"steps"`` or ``"epoch"``.
        per_device_train_batch_size: Training batch size per process.
        per_device_eval_batch_size: Evaluation batch size per process.
        gradient_accumulation_steps: Micro-batches per optimizer update.
        eval_delay: Epochs (epoch strategy) or steps to wait before the first evaluation.
        learning_rate: Peak learning rate of the default AdamW optimizer.
        weight_decay: Decoupled weight decay, not applied to biases and norm weights.
        adam_beta1: AdamW beta1.
        adam_beta2: AdamW beta2.
        adam_epsilon: AdamW epsilon.
        optim: ``"adamw_torch"`` (fused on CUDA), ``"adamw_torch_fused"``, ``"adafactor"``,
            ``"sgd"``, ``"adagrad"`` or ``"rmsprop"`` (torch's classes).
        optim_args: Extra optimizer arguments, transformers' ``"key=value,key=value"`` string.
        label_smoothing_factor: Label smoothing of the cross-entropy loss computed from
            ``logits`` and ``labels`` (the model's own loss is replaced, as in transformers).
        max_grad_norm: Clip the global gradient norm to this value; ``0`` disables clipping.
        num_train_epochs: Epochs to train (a float trains a fraction of the last one).
        max_steps: If > 0, total optimizer updates; overrides ``num_train_epochs``.
        lr_scheduler_type: A schedule of :data:`SCHEDULER_TYPES` (transformers' names).
        lr_scheduler_kwargs: Extra arguments of the schedule (``num_cycles``, ``min_lr``, ...).
        warmup_ratio: Fraction of the steps used for linear warmup.
        warmup_steps: Warmup steps; overrides ``warmup_ratio`` when > 0.
        logging_dir: Directory for integrations that write files (TensorBoard);
            default ``<output_dir>/runs``.
        logging_strategy: ``"no"``, ``"steps"`` or ``"epoch"``.
        logging_first_step: Also log after the first step.
        logging_steps: Logging interval.
        include_num_input_tokens_seen: Count ``state.num_input_tokens_seen`` (the
            elements of ``input_ids``, or of the batch's first tensor), summed over ranks.
        save_strategy: ``"no"``, ``"steps"``, ``"epoch"`` or ``"best"``.
        save_steps: Checkpoint interval.
        save_total_limit: Keep at most this many checkpoints (the best one is never deleted).
        save_only_model: Save weights only (no optimizer, scheduler or RNG: resume is impossible).
        seed: Seed set at the start of training.
        data_seed: Seed of the data order; defaults to ``seed``.
        bf16: Autocast to bfloat16 (CPU or a device that supports it).
        fp16: Autocast to float16 with loss scaling (CUDA only).
        torch_compile: Compile the model with ``torch.compile`` before training.
        torch_compile_backend: ``torch.compile`` backend (setting it turns compilation on).
        torch_compile_mode: ``torch.compile`` mode (setting it turns compilation on).
        disable_tqdm: Print logs instead of showing a bar. Default: the bar, unless
            logging is quieter than WARNING.
        report_to: ``"all"`` (every installed epochal integration), ``"none"``, or a list of names.
        run_name: Run name given to trackers; defaults to ``output_dir``.
        eval_steps: Evaluation interval; defaults to ``logging_steps``.
        dataloader_num_workers: Worker processes of the data loader.
        dataloader_drop_last: Drop the last incomplete training batch.
        dataloader_pin_memory: Pin host memory when training on an accelerator.
        dataloader_persistent_workers: Keep the loader's worker processes between epochs.
        dataloader_prefetch_factor: Batches each worker loads ahead (needs workers).
        load_best_model_at_end: Load the best checkpoint when training ends.
        metric_for_best_model: Metric that ranks checkpoints (``"loss"`` means ``eval_loss``).
        greater_is_better: Whether a larger metric is better. Default: ``False`` for
            names ending in ``loss``, else ``True``.
        eval_on_start: Evaluate once before the first step.
        restore_callback_states_from_checkpoint: Restore callback state on resume
            (default ``True``, unlike transformers).
        use_cpu: Train on the CPU even if an accelerator is present.
        ignore_data_skip: On resume, do not skip the batches already seen in the current epoch.
        label_names: Batch keys that hold labels. Default: the model's ``forward``
            parameters whose name contains ``label`` (transformers' rule), else ``["labels"]``.
        remove_unused_columns: Drop the keys of mapping samples that the model's
            ``forward`` does not take (label names are kept), as transformers does.
        prediction_loss_only: In evaluation, compute only the loss.
        eval_accumulation_steps: Move predictions to the host every this many evaluation
            batches (default: keep them on the device until the end, one transfer).
        ddp_backend: torch.distributed backend; default ``"nccl"`` on CUDA, else ``"gloo"``.
        ddp_timeout: Seconds a collective may wait before the job fails (default 1800).
        ddp_find_unused_parameters: Passed to ``DistributedDataParallel``.
        nonfinite_policy: What to do when the loss or gradient norm is NaN/Inf, checked
            before the optimizer step: ``"skip"`` the update (default), ``"stop"``
            training, or ``"off"``. With ``fp16`` the loss scaler handles overflow
            instead (it skips the step and lowers the scale). On CUDA the check needs no
            device sync with a fused optimizer (the default one is); with another
            optimizer it reads two scalars per update, a sync per step: pass a fused
            one, or use ``"off"``, where that matters.
        save_on_preemption: On SIGTERM/SIGINT, finish the step, save a checkpoint and stop.
        strict_integrations: Re-raise integration errors instead of disabling the
            integration. Default: the ``EPOCHAL_STRICT_INTEGRATIONS`` environment variable.
        gradient_checkpointing: Call the model's ``gradient_checkpointing_enable`` (transformers
            models have it): recompute activations in the backward pass to save memory.
        gradient_checkpointing_kwargs: Passed to ``gradient_checkpointing_enable`` (e.g.
            ``{"use_reentrant": False}``).
        fsdp: Fully sharded data parallelism (FSDP2) under torchrun, in transformers' words:
            ``"full_shard"`` or ``"shard_grad_op"``, plus ``"auto_wrap"`` and/or ``"offload"``
            (e.g. ``"full_shard auto_wrap"``); ``True`` means ``"full_shard"``. Normalised to a list.
        fsdp_config: Dict (or JSON file path) with ``transformer_layer_cls_to_wrap`` (class
            names) or ``min_num_params`` for ``auto_wrap``, and ``reshard_after_forward``,
            ``offload_params``; keys may carry transformers' ``fsdp_`` prefix.

    The transformers fields ``overwrite_output_dir``, ``do_train``/``do_eval``/``do_predict``,
    the ``hub_*`` fields and ``skip_memory_metrics`` are accepted with no effect (one warning).
    Another transformers field epochal lacks raises ``TypeError`` naming the alternative.
        integration_timeout: Seconds one call of an integration may run while training
            waits on it (before a checkpoint, at the end, on an error, on SIGTERM, at exit,
            on a full queue). A call running longer declares the integration stalled: it is
            reported, detached and training goes on (strict mode raises instead). Default 60.

    Raises:
        ValueError: For an invalid value or an inconsistent combination.
        TypeError: For an unknown field, or a value of the wrong type.
    """

    output_dir: str = "trainer_output"
    # transformers' fields with no effect here: accepted, one warning when set (args_fields.NO_EFFECT_FIELDS).
    overwrite_output_dir: bool = False
    do_train: bool = False
    do_eval: bool = False
    do_predict: bool = False
    eval_strategy: str = "no"
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    eval_delay: float = 0
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    optim: str = "adamw_torch"
    optim_args: str | None = None
    max_grad_norm: float = 1.0
    label_smoothing_factor: float = 0.0
    num_train_epochs: float = 3.0
    max_steps: int = -1
    lr_scheduler_type: str = "linear"
    lr_scheduler_kwargs: dict[str, Any] | None = None
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    logging_dir: str | None = None
    logging_strategy: str = "steps"
    logging_first_step: bool = False
    logging_steps: float = 500
    include_num_input_tokens_seen: bool = False
    save_strategy: str = "steps"
    save_steps: float = 500
    save_total_limit: int | None = None
    save_only_model: bool = False
    seed: int = 42
    data_seed: int | None = None
    bf16: bool = False
    fp16: bool = False
    torch_compile: bool = False
    torch_compile_backend: str | None = None
    torch_compile_mode: str | None = None
    disable_tqdm: bool | None = None
    report_to: str | list[str] | None = "all"
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_strategy: str = "every_save"
    hub_token: str | None = None
    hub_private_repo: bool | None = None
    hub_always_push: bool = False
    skip_memory_metrics: bool = True
    run_name: str | None = None
    eval_steps: float | None = None
    dataloader_num_workers: int = 0
    dataloader_drop_last: bool = False
    dataloader_pin_memory: bool = True
    dataloader_persistent_workers: bool = False
    dataloader_prefetch_factor: int | None = None
    load_best_model_at_end: bool = False
    metric_for_best_model: str | None = None
    greater_is_better: bool | None = None
    eval_on_start: bool = False
    restore_callback_states_from_checkpoint: bool = True
    use_cpu: bool = False
    ignore_data_skip: bool = False
    label_names: list[str] | None = None
    remove_unused_columns: bool = True
    prediction_loss_only: bool = False
    eval_accumulation_steps: int | None = None
    ddp_backend: str | None = None
    ddp_timeout: int = 1800
    ddp_find_unused_parameters: bool | None = None
    nonfinite_policy: str = "skip"
    save_on_preemption: bool = True
    strict_integrations: bool | None = None
    # issue 21: models with transformers' conventions.
    gradient_checkpointing: bool = False
    gradient_checkpointing_kwargs: dict[str, Any] | None = None
    # issue 20: fully sharded data parallelism (FSDP2, torch's fully_shard)
    fsdp: str | list[str] | bool | None = ""
    fsdp_config: dict[str, Any] | str | None = None
    # issue 22: field failures
    integration_timeout: float = 60.0

    def __post_init__(self) -> None:
        self.output_dir = os.fspath(self.output_dir)
        if self.logging_dir is not None:
            self.logging_dir = os.fspath(self.logging_dir)
        check_field_types(self)
        warn_no_effect_fields(self)
        if self.torch_compile_backend is not None or self.torch_compile_mode is not None:
            self.torch_compile = True
        if self.logging_dir is None:
            self.logging_dir = os.path.join(self.output_dir, "runs")
        self._check_choices()
        self._check_numbers()
        if self.eval_strategy == "steps" and self.eval_steps is None:
            self.eval_steps = self.logging_steps
        strategies = {"logging": self.logging_strategy, "eval": self.eval_strategy, "save": self.save_strategy}
        for kind, strategy in strategies.items():
            self._check_interval(f"{kind}_steps", getattr(self, f"{kind}_steps"), strategy == "steps")
        self._resolve_best_model()
        self.report_to = self._normalise_report_to(self.report_to)
        if self.disable_tqdm is None:
            self.disable_tqdm = logging.getLogger("epochal_core").getEffectiveLevel() > logging.WARNING
        if self.strict_integrations is None:
            self.strict_integrations = _env_flag("EPOCHAL_STRICT_INTEGRATIONS")
        if (
            isinstance(self.integration_timeout, bool)
            or not isinstance(self.integration_timeout, (int, float))
            or not 0 < self.integration_timeout < float("inf")
        ):
            raise _bad("integration_timeout", self.integration_timeout, "use a finite number of seconds > 0 (e.g. 60).")
        if self.label_names is not None and (
            isinstance(self.label_names, str) or not all(isinstance(n, str) for n in self.label_names)
        ):
            raise _bad("label_names", self.label_names, "use a list of batch keys, e.g. ['labels'].")
        self._resolve_fsdp()  # issue 20

    def _check_choices(self) -> None:
        """Fields that take one of a set of names, and the settings that go with them."""
        for name in ("eval_strategy", "logging_strategy"):
            value = getattr(self, name)
            if value not in _STRATEGIES:
                raise _bad(name, value, f"use one of {list(_STRATEGIES)}.")
        if self.save_strategy not in (*_STRATEGIES, "best"):
            raise _bad("save_strategy", self.save_strategy, f"use one of {[*_STRATEGIES, 'best']}.")
        if self.lr_scheduler_type not in SCHEDULER_TYPES:
            raise _bad("lr_scheduler_type", self.lr_scheduler_type, f"use one of {list(SCHEDULER_TYPES)}.")
        if self.optim not in OPTIMIZER_NAMES:
            raise _bad("optim", self.optim, f"use one of {list(OPTIMIZER_NAMES)}.")
        if self.lr_scheduler_kwargs is not None and not isinstance(self.lr_scheduler_kwargs, dict):
            raise _bad("lr_scheduler_kwargs", self.lr_scheduler_kwargs, "use a dict, e.g. {'num_cycles': 2}.")
        if self.lr_scheduler_type == "reduce_lr_on_plateau":
            if self.eval_strategy == "no":
                raise _bad("eval_strategy", "no", "lr_scheduler_type='reduce_lr_on_plateau' steps on an eval metric.")
            if self.metric_for_best_model is None:
                self.metric_for_best_model = "loss"
        if not 0.0 <= self.label_smoothing_factor < 1.0:
            raise _bad("label_smoothing_factor", self.label_smoothing_factor, "use a value in [0, 1).")
        if self.dataloader_prefetch_factor is not None and self.dataloader_num_workers == 0:
            raise _bad(
                "dataloader_prefetch_factor", self.dataloader_prefetch_factor,
                "it needs dataloader_num_workers > 0 (torch's DataLoader rule).",
            )
        if self.eval_accumulation_steps is not None and self.eval_accumulation_steps < 1:
            raise _bad("eval_accumulation_steps", self.eval_accumulation_steps, "use None or an integer >= 1.")
        if self.nonfinite_policy not in _NONFINITE_POLICIES:
            raise _bad("nonfinite_policy", self.nonfinite_policy, f"use one of {list(_NONFINITE_POLICIES)}.")

    def _check_numbers(self) -> None:
        """Sizes, rates and limits: each within its range."""
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise _bad(name, value, "use an integer >= 1.")
        if not isinstance(self.dataloader_num_workers, int) or self.dataloader_num_workers < 0:
            raise _bad("dataloader_num_workers", self.dataloader_num_workers, "use an integer >= 0.")
        if self.learning_rate < 0:
            raise _bad("learning_rate", self.learning_rate, "use a value >= 0.")
        if self.weight_decay < 0:
            raise _bad("weight_decay", self.weight_decay, "use a value >= 0.")
        if self.max_grad_norm is None or self.max_grad_norm < 0:
            raise _bad("max_grad_norm", self.max_grad_norm, "use a value > 0 to clip, or 0 to disable clipping.")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise _bad("warmup_ratio", self.warmup_ratio, "use a fraction in [0, 1].")
        if self.warmup_steps < 0:
            raise _bad("warmup_steps", self.warmup_steps, "use an integer >= 0.")
        if self.max_steps == 0 or (self.max_steps < 0 and self.num_train_epochs <= 0):
            raise _bad(
                "max_steps" if self.max_steps == 0 else "num_train_epochs",
                self.max_steps if self.max_steps == 0 else self.num_train_epochs,
                "train for at least one step: set max_steps > 0 or num_train_epochs > 0.",
            )
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise _bad("save_total_limit", self.save_total_limit, "use None (keep all) or an integer >= 1.")
        if self.ddp_timeout <= 0:
            raise _bad("ddp_timeout", self.ddp_timeout, "use a number of seconds > 0.")
        if self.bf16 and self.fp16:
            raise _bad("fp16", self.fp16, "choose one of bf16 and fp16, not both.")

    def _resolve_fsdp(self) -> None:
        self.fsdp = normalise_fsdp(self.fsdp)
        self.fsdp_config = normalise_fsdp_config(self.fsdp_config, self.fsdp)
        plan_fsdp(self.fsdp, self.fsdp_config)  # raises on a combination FSDP2 cannot honour
        if self.fsdp and self.fp16:
            raise _bad(
                "fp16", self.fp16,
                "fp16 loss scaling is not supported with fsdp; use bf16=True (FSDP2 mixed precision, no scaler).",
            )

    @property
    def fsdp_plan(self) -> FsdpPlan | None:
        """How the model is sharded (``None`` without ``fsdp``)."""
        return plan_fsdp(self.fsdp, self.fsdp_config)  # type: ignore[arg-type]

    @staticmethod
    def _check_interval(name: str, value: float | None, required: bool) -> None:
        if value is None:
            if required:
                raise _bad(name, value, "set an interval: an integer >= 1, or a fraction in (0, 1).")
            return
        if value <= 0:
            if required:
                raise _bad(name, value, "use an integer >= 1, or a fraction in (0, 1) of the total steps.")
            return
        if value > 1 and value != int(value):
            raise _bad(name, value, "values above 1 are a number of steps and must be whole.")

    def _resolve_best_model(self) -> None:
        if self.save_strategy == "best" and self.metric_for_best_model is None:
            raise _bad("metric_for_best_model", None, "save_strategy='best' needs a metric, e.g. 'loss'.")
        if self.load_best_model_at_end:
            if self.eval_strategy == "no":
                raise _bad("eval_strategy", "no", "load_best_model_at_end=True needs evaluation ('steps' or 'epoch').")
            if self.save_strategy not in ("best", self.eval_strategy):
                raise _bad(
                    "save_strategy",
                    self.save_strategy,
                    f"load_best_model_at_end=True needs save_strategy equal to eval_strategy "
                    f"({self.eval_strategy!r}) or 'best'.",
                )
            if self.eval_strategy == "steps" and self.save_strategy == "steps":
                ev = self.eval_steps if self.eval_steps is not None else self.logging_steps
                sv = self.save_steps
                if (ev < 1) != (sv < 1) or (ev >= 1 and sv % ev != 0) or (ev < 1 and round(sv / ev, 9) % 1 != 0):
                    raise _bad(
                        "save_steps",
                        sv,
                        f"load_best_model_at_end=True needs save_steps to be a multiple of eval_steps ({ev}).",
                    )
            if self.metric_for_best_model is None:
                self.metric_for_best_model = "loss"
        if self.metric_for_best_model is not None and self.greater_is_better is None:
            self.greater_is_better = not self.metric_for_best_model.endswith("loss")

    @staticmethod
    def _normalise_report_to(value: Any) -> str | list[str]:
        if value is None:
            return "all"
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise _bad("report_to", value, "use 'all', 'none', or a list of integration names.")
        names: list[str] = list(dict.fromkeys(value))  # drop repeats, keep order
        if names in (["all"], ["none"]):
            return str(names[0])
        if "all" in names or "none" in names:
            raise _bad("report_to", value, "'all' and 'none' cannot be combined with other names.")
        return names

    @property
    def train_batch_size(self) -> int:
        """Per-process training batch size."""
        return self.per_device_train_batch_size

    @property
    def eval_batch_size(self) -> int:
        """Per-process evaluation batch size."""
        return self.per_device_eval_batch_size

    def get_warmup_steps(self, num_training_steps: int) -> int:
        """Warmup steps for a run of ``num_training_steps``."""
        if self.warmup_steps > 0:
            return self.warmup_steps
        return int(-(-num_training_steps * self.warmup_ratio // 1))

    def to_dict(self) -> dict[str, Any]:
        """All fields as a plain dict."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def to_json_string(self) -> str:
        """All fields as indented JSON."""
        return json.dumps(self.to_dict(), indent=2, default=str)

    def to_sanitized_dict(self) -> dict[str, Any]:
        """Fields with values limited to ``bool/int/float/str`` (others as ``str``), for hparam views."""
        return {
            k: v if isinstance(v, (bool, int, float, str)) else str(v)
            for k, v in self.to_dict().items()
        }


# An unknown keyword names the field and the alternative instead of dataclasses' bare TypeError.
TrainingArguments.__init__ = reject_unknown_fields(TrainingArguments.__init__)  # type: ignore[method-assign]
