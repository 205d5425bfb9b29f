"""Saving and restoring callback states (``TrainerState.stateful_callbacks``), transformers' format."""

from __future__ import annotations

import logging
from typing import Any

from .callback import ExportableState

__all__ = ["collect_callback_states", "restore_callback_states"]

logger = logging.getLogger(__name__)


def _state_key(callback: Any) -> str:
    return str(getattr(callback, "state_key", None) or type(callback).__name__)


def _stateful(objects: list[Any]) -> list[Any]:
    def has_pair(o: Any) -> bool:
        return callable(getattr(o, "state_dict", None)) and callable(getattr(o, "load_state_dict", None))

    return [o for o in objects if isinstance(o, ExportableState) or has_pair(o)]


def _export(obj: Any) -> dict[str, Any]:
    if isinstance(obj, ExportableState):
        return obj.state()
    return {"state_dict": obj.state_dict()}


def collect_callback_states(callbacks: list[Any], control: Any) -> dict[str, Any]:
    """``stateful_callbacks`` for ``trainer_state.json``: rebuilt at every save, never appended to.

    The key is the callback's ``state_key`` attribute, else its class name
    (transformers' format). Callbacks sharing a key are stored as a list in
    callback order, so two instances of one class never collide.
    """
    grouped: dict[str, list[dict[str, Any]]] = {}
    for obj in _stateful([*callbacks, control]):
        grouped.setdefault(_state_key(obj), []).append(_export(obj))
    return {key: states[0] if len(states) == 1 else states for key, states in grouped.items()}


def restore_callback_states(saved: dict[str, Any], callbacks: list[Any], control: Any) -> None:
    """Restore saved states onto the current callbacks, in place and in order, reporting mismatches."""
    current: dict[str, list[Any]] = {}
    for obj in _stateful([*callbacks, control]):
        current.setdefault(_state_key(obj), []).append(obj)
    for key, states in saved.items():
        states = states if isinstance(states, list) else [states]
        targets = current.pop(key, [])
        if not targets:
            logger.warning("The checkpoint holds state for %r, which is not among the current callbacks; ignored.", key)
            continue
        if len(targets) != len(states):
            logger.warning(
                "The checkpoint holds %d state(s) for %r but there are %d such callback(s) now; "
                "restoring the first %d in order.",
                len(states), key, len(targets), min(len(states), len(targets)),
            )
        for obj, data in zip(targets, states):
            if obj is control:
                for flag, value in data.get("args", {}).items():
                    setattr(obj, flag, value)
            elif isinstance(obj, ExportableState):
                saved_args = data.get("args", {})
                now_args = obj.state().get("args", {})
                if saved_args != now_args:
                    logger.warning(
                        "%s was saved with args %s and is now built with %s; keeping the new args and "
                        "restoring its attributes.", key, saved_args, now_args,
                    )
                for attr, value in data.get("attributes", {}).items():
                    setattr(obj, attr, value)
            else:
                obj.load_state_dict(data.get("state_dict", {}))
    for key in current:
        logger.warning("The checkpoint holds no state for callback %r; it starts fresh.", key)
