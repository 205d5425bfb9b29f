"""``TrainingArguments.fsdp`` / ``fsdp_config`` in transformers' spelling, checked and read into an :class:`FsdpPlan`.

Torch-free (``TrainingArguments`` imports it); :mod:`epochal_core.fsdp` applies the
plan with torch's FSDP2 (``fully_shard``). Only what FSDP2 does is accepted: the
knobs of the older ``FullyShardedDataParallel`` wrapper that FSDP2 has no
counterpart for are refused with the fix instead of being silently ignored.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["FSDP_CONFIG_KEYS", "FSDP_OPTIONS", "FsdpPlan", "normalise_fsdp", "normalise_fsdp_config", "plan_fsdp"]

#: The ``fsdp`` words epochal maps onto FSDP2 (transformers' ``FSDPOption`` values).
FSDP_OPTIONS = ("full_shard", "shard_grad_op", "offload", "auto_wrap")
_REFUSED_OPTIONS = {
    "no_shard": "FSDP without sharding is data parallelism: leave fsdp unset and launch with torchrun (DDP).",
    "hybrid_shard": "hybrid sharding needs a 2-D device mesh, which epochal does not build; use 'full_shard'.",
    "hybrid_shard_zero2": "hybrid sharding needs a 2-D device mesh, which epochal does not build; use 'shard_grad_op'.",
}
#: ``fsdp_config`` keys (after dropping transformers' optional ``fsdp_`` prefix).
FSDP_CONFIG_KEYS = (
    "min_num_params", "transformer_layer_cls_to_wrap", "reshard_after_forward", "offload_params",
    "state_dict_type", "version", "use_orig_params", "activation_checkpointing",
)
_WRAP_KEYS = ("min_num_params", "transformer_layer_cls_to_wrap")


def _bad(field: str, value: Any, fix: str) -> ValueError:
    return ValueError(f"TrainingArguments.{field}={value!r} is invalid: {fix}")


@dataclass(frozen=True)
class FsdpPlan:
    """How the model is sharded, read from ``fsdp`` and ``fsdp_config``.

    Args:
        reshard_after_forward: Free the gathered parameters after the forward pass
            (``full_shard``, ZeRO-3) or keep them until the backward (``shard_grad_op``, ZeRO-2).
        offload: Keep the sharded parameters, gradients and optimizer state on the CPU.
        auto_wrap: Shard submodules as units of their own (else the whole model is one unit).
        layer_classes: Class names of the submodules to shard as units.
        min_num_params: Shard a submodule once it holds this many parameters not yet in a unit.
    """

    reshard_after_forward: bool = True
    offload: bool = False
    auto_wrap: bool = False
    layer_classes: tuple[str, ...] = ()
    min_num_params: int = 0


def normalise_fsdp(value: Any) -> list[str]:
    """``fsdp`` as a list of options (``""``/``[]``/``False``/``None``: off; ``True``: ``["full_shard"]``).

    Raises:
        ValueError: An option that is unknown or that epochal refuses, with the fix.
    """
    if value is None or value is False or value == "" or (isinstance(value, (list, tuple)) and not value):
        return []  # [] too: TrainingArguments(**args.to_dict()) must round-trip
    if value is True:
        return ["full_shard"]
    words = value.split() if isinstance(value, str) else value
    if not isinstance(words, (list, tuple)) or not all(isinstance(w, str) for w in words):
        raise _bad("fsdp", value, "use a string of options such as 'full_shard auto_wrap', or a list of them.")
    options = list(dict.fromkeys(w.strip().lower() for w in words))
    for option in options:
        if option in _REFUSED_OPTIONS:
            raise _bad("fsdp", value, _REFUSED_OPTIONS[option])
        if option not in FSDP_OPTIONS:
            raise _bad("fsdp", value, f"{option!r} is not an FSDP option; use some of {list(FSDP_OPTIONS)}.")
    strategies = [o for o in options if o in ("full_shard", "shard_grad_op")]
    if len(strategies) != 1:
        raise _bad(
            "fsdp", value,
            "name exactly one sharding strategy, 'full_shard' or 'shard_grad_op', e.g. 'full_shard auto_wrap'.",
        )
    return options


def normalise_fsdp_config(value: Any, fsdp: list[str]) -> dict[str, Any]:
    """``fsdp_config`` as a dict without transformers' ``fsdp_`` key prefix (a str is a JSON file's path).

    Raises:
        ValueError: A config without ``fsdp``, an unreadable file, an unknown key, or a
            value FSDP2 cannot honour; the message names the key and the fix.
    """
    if value is None:
        return {}
    if isinstance(value, (str, os.PathLike)):
        try:
            with open(value, encoding="utf-8") as file:
                value = json.load(file)
        except (OSError, ValueError) as err:
            raise _bad("fsdp_config", value, f"the JSON file cannot be read ({err}).") from err
    if not isinstance(value, dict):
        raise _bad("fsdp_config", value, "use a dict, or the path of a JSON file holding one.")
    config = {(k[5:] if k.startswith("fsdp_") else k): v for k, v in value.items()}
    if config and not fsdp:
        raise _bad("fsdp_config", value, "it only applies with fsdp set, e.g. fsdp='full_shard auto_wrap'.")
    unknown = sorted(set(config) - set(FSDP_CONFIG_KEYS))
    if unknown:
        raise _bad(
            "fsdp_config", value,
            f"unknown or unsupported keys {unknown} (FSDP2 has no such setting); use only {list(FSDP_CONFIG_KEYS)}.",
        )
    refusals: dict[str, tuple[Callable[[Any], bool], str]] = {
        "version": (lambda v: v not in (2, "2"), "only FSDP2 (fully_shard) is supported: remove the key or use 2."),
        "use_orig_params": (lambda v: v is False, "FSDP2 always keeps the original parameters: remove the key."),
        "activation_checkpointing": (
            lambda v: bool(v), "use TrainingArguments(gradient_checkpointing=True) (the model's own checkpointing)."
        ),
        "state_dict_type": (
            lambda v: str(v).upper() not in ("SHARDED_STATE_DICT", "SHARDED"),
            "checkpoints are always sharded (DCP, reshardable on load); Trainer.save_model() writes the "
            "consolidated state dict. Remove the key.",
        ),
    }
    for key, (refused, fix) in refusals.items():
        if key in config and refused(config[key]):
            raise _bad(f"fsdp_config[{key!r}]", config[key], fix)
    return config


def plan_fsdp(fsdp: list[str], config: dict[str, Any]) -> FsdpPlan | None:
    """The :class:`FsdpPlan` of normalised ``fsdp`` and ``fsdp_config``; ``None`` when FSDP is off.

    Raises:
        ValueError: Wrap settings without ``auto_wrap``, both wrap policies at once, a
            ``reshard_after_forward`` that contradicts the strategy, or a bad value.
    """
    if not fsdp:
        return None
    wrap = [k for k in _WRAP_KEYS if config.get(k) not in (None, [], "", 0)]
    if wrap and "auto_wrap" not in fsdp:
        raise _bad("fsdp", " ".join(fsdp), f"fsdp_config sets {wrap}: add 'auto_wrap' to fsdp to use them.")
    if len(wrap) > 1:
        raise _bad("fsdp_config", config, "set min_num_params or transformer_layer_cls_to_wrap, not both.")
    classes = config.get("transformer_layer_cls_to_wrap") or []
    if isinstance(classes, str):
        classes = [c.strip() for c in classes.split(",") if c.strip()]
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise _bad("fsdp_config['transformer_layer_cls_to_wrap']", classes, "use a list of class names.")
    min_params = config.get("min_num_params") or 0
    if not isinstance(min_params, int) or min_params < 0:
        raise _bad("fsdp_config['min_num_params']", min_params, "use an integer >= 0.")
    reshard = "full_shard" in fsdp
    if "reshard_after_forward" in config and bool(config["reshard_after_forward"]) != reshard:
        raise _bad(
            "fsdp_config['reshard_after_forward']", config["reshard_after_forward"],
            f"it contradicts fsdp={' '.join(fsdp)!r}: 'full_shard' reshards after the forward pass, "
            "'shard_grad_op' does not. Remove the key or change the strategy.",
        )
    offload = "offload" in fsdp or bool(config.get("offload_params"))
    return FsdpPlan(reshard, offload, "auto_wrap" in fsdp, tuple(classes), min_params)
