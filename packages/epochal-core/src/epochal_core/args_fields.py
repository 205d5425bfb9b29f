"""What ``TrainingArguments`` knows of transformers' fields beyond its own, and its type checks.

Kept apart from :mod:`epochal_core.training_args` so that module stays about
epochal's own fields. Importing this module does not import torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
from typing import Any

__all__ = [
    "NO_EFFECT_FIELDS",
    "OPTIMIZER_NAMES",
    "SCHEDULER_TYPES",
    "UNSUPPORTED_FIELDS",
    "FieldTypeError",
    "check_field_types",
    "reject_unknown_fields",
    "warn_no_effect_fields",
]

logger = logging.getLogger("epochal_core.training_args")

SCHEDULER_TYPES = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
    "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "warmup_stable_decay",
)
OPTIMIZER_NAMES = ("adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adagrad", "rmsprop")

#: transformers' fields accepted with no effect here (one warning when set), with why.
NO_EFFECT_FIELDS: dict[str, str] = {
    "overwrite_output_dir": "epochal never deletes output_dir; resuming is explicit (resume_from_checkpoint)",
    "do_train": "scripts decide what to run; the Trainer does not read it",
    "do_eval": "evaluation follows eval_strategy",
    "do_predict": "scripts decide what to run; the Trainer does not read it",
    "push_to_hub": "epochal has no Hub integration; upload output_dir yourself",
    "hub_model_id": "epochal has no Hub integration",
    "hub_strategy": "epochal has no Hub integration",
    "hub_token": "epochal has no Hub integration",
    "hub_private_repo": "epochal has no Hub integration",
    "hub_always_push": "epochal has no Hub integration",
    "skip_memory_metrics": "epochal reports no memory metrics",
}

#: transformers' fields epochal does not take, with what to use instead.
UNSUPPORTED_FIELDS: dict[str, str] = {
    "evaluation_strategy": "use eval_strategy (transformers renamed it)",
    "per_gpu_train_batch_size": "use per_device_train_batch_size",
    "per_gpu_eval_batch_size": "use per_device_eval_batch_size",
    "no_cuda": "use use_cpu=True",
    "use_mps_device": "MPS is used automatically when present; use_cpu=True to avoid it",
    "deepspeed": "not supported; use DDP through torchrun (and FSDP where epochal offers it)",
    "tf32": "set torch.backends.cuda.matmul.allow_tf32 = True in your script",
    "half_precision_backend": "mixed precision is torch.autocast; use bf16=True or fp16=True",
    "fp16_opt_level": "apex is not supported; use fp16=True (torch.autocast)",
    "fp16_backend": "use fp16=True (torch.autocast)",
    "bf16_full_eval": "evaluation runs under the same autocast as training (bf16=True)",
    "fp16_full_eval": "evaluation runs under the same autocast as training (fp16=True)",
    "full_determinism": "call torch.use_deterministic_algorithms(True) in your script",
    "group_by_length": "not supported; pass a dataset already grouped, or your own sampler in a subclass",
    "length_column_name": "not supported (no group_by_length)",
    "auto_find_batch_size": "not supported; set per_device_train_batch_size",
    "local_rank": "torchrun sets LOCAL_RANK; epochal reads it",
    "log_level": "use logging.getLogger('epochal_core').setLevel(...)",
    "log_level_replica": "use logging.getLogger('epochal_core').setLevel(...) on other ranks",
    "logging_nan_inf_filter": "use nonfinite_policy ('skip', 'stop' or 'off')",
    "save_safetensors": "checkpoints are torch files; model.safetensors is read when resuming",
    "neftune_noise_alpha": "not supported; add the noise in your model's forward",
    "use_liger_kernel": "not supported; patch the model before passing it",
    "torchdynamo": "use torch_compile=True",
    "jit_mode_eval": "not supported; use torch_compile=True",
    "use_ipex": "not supported",
    "past_index": "not supported; return the state from forward and handle it in compute_loss",
    "ray_scope": "hyperparameter_search supports Optuna only",
    "accelerator_config": "epochal does not use accelerate; torchrun and TrainingArguments fields cover it",
    "dispatch_batches": "epochal does not use accelerate",
    "split_batches": "epochal does not use accelerate",
    "include_inputs_for_metrics": "not supported; compute input-based metrics in a callback",
    "include_for_metrics": "not supported; compute input-based metrics in a callback",
    "batch_eval_metrics": "not supported; compute_metrics runs once on the whole evaluation",
    "eval_do_concat_batches": "predictions are always concatenated (padded with -100)",
    "average_tokens_across_devices": "not supported",
    "debug": "not supported",
}

_warned: set[str] = set()


def reject_unknown_fields(init: Any) -> Any:
    """Wrap a dataclass ``__init__`` so an unknown keyword names the field and the alternative."""

    @functools.wraps(init)
    def checked_init(self: Any, *args: Any, **kwargs: Any) -> None:
        known = {f.name for f in dataclasses.fields(self)}
        for name in kwargs:
            if name in known:
                continue
            if name in UNSUPPORTED_FIELDS:
                raise TypeError(
                    f"TrainingArguments.{name} is a transformers field epochal does not support: "
                    f"{UNSUPPORTED_FIELDS[name]}."
                )
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise TypeError(f"TrainingArguments got an unknown field {name!r}.{hint}")
        init(self, *args, **kwargs)

    return checked_init


def warn_no_effect_fields(args: Any) -> None:
    """Warn once per process for each no-effect field set away from its default."""
    defaults = {f.name: f.default for f in dataclasses.fields(args)}
    for name, why in NO_EFFECT_FIELDS.items():
        if getattr(args, name) != defaults[name] and name not in _warned:
            _warned.add(name)
            logger.warning("TrainingArguments.%s has no effect in epochal: %s.", name, why)


class FieldTypeError(TypeError, ValueError):
    """A field holds a value of the wrong type (both a ``TypeError`` and a ``ValueError``)."""


_SIMPLE_TYPES: dict[str, tuple[type, ...]] = {
    "float": (int, float),
    "int": (int,),
    "bool": (bool,),
    "str": (str,),
}


def check_field_types(args: Any) -> None:
    """Raise a ``TypeError`` naming the field when a number, flag or string field holds another type.

    Raises:
        FieldTypeError: ``learning_rate="5e-5"`` and the like.
    """
    for f in dataclasses.fields(args):
        parts = [p.strip() for p in str(f.type).split("|")]
        optional = "None" in parts
        parts = [p for p in parts if p != "None"]
        if len(parts) != 1 or parts[0] not in _SIMPLE_TYPES:
            continue
        value = getattr(args, f.name)
        if value is None:
            continue  # the value checks word what None means for each field
        expected = _SIMPLE_TYPES[parts[0]]
        ok = isinstance(value, expected) and not (parts[0] in ("int", "float") and isinstance(value, bool))
        if not ok:
            hint = f" (write {f.name}={float(value)!r})" if _is_number_text(value) and parts[0] == "float" else ""
            raise FieldTypeError(
                f"TrainingArguments.{f.name}={value!r} is invalid: it must be {parts[0]}"
                f"{' or None' if optional else ''}, not {type(value).__name__}.{hint}"
            )


def _is_number_text(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        float(value)
    except ValueError:
        return False
    return True
