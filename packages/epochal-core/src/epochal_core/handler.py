"""``CallbackHandler``: calls the callbacks, in order, only for the events they override."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from .callback import EVENTS, TrainerCallback

if TYPE_CHECKING:
    from .control import TrainerControl
    from .state import TrainerState
    from .training_args import TrainingArguments

__all__ = ["CallbackHandler", "overridden_events"]

logger = logging.getLogger(__name__)

_COMMON_KWARGS = ("model", "processing_class", "optimizer", "lr_scheduler", "train_dataloader", "eval_dataloader")


def overridden_events(callback: object) -> frozenset[str]:
    """Return the events ``callback`` actually implements.

    A :class:`TrainerCallback` subclass implements an event when its class defines
    the method anew; an object that does not subclass it (duck typing) implements
    every event method it has. A wrapper can declare its events in
    ``__epochal_events__``.
    """
    declared = getattr(callback, "__epochal_events__", None)
    if declared is not None:
        return frozenset(declared)
    cls = type(callback)
    if isinstance(callback, TrainerCallback):
        return frozenset(e for e in EVENTS if getattr(cls, e, None) is not getattr(TrainerCallback, e))
    return frozenset(e for e in EVENTS if callable(getattr(callback, e, None)))


class CallbackHandler(TrainerCallback):
    """Holds the Trainer's callbacks and dispatches events to them.

    Differences from transformers, all additive:

    * an event calls only the callbacks that override it; the per-event lists are
      computed when the callback list changes, not at every event;
    * ``remove_callback`` never raises, whether given a class or an instance
      (transformers raises ``ValueError`` for a missing instance);
    * callbacks are dispatched by their ``order`` attribute, ties in insertion order;
    * ``on_exception`` calls every callback even if one of them raises.

    Args:
        callbacks: Callback instances or classes (a class is instantiated with no arguments).
        model: The model, passed to callbacks as ``model``.
        processing_class: Passed to callbacks as ``processing_class``.
        optimizer: Passed to callbacks as ``optimizer``.
        lr_scheduler: Passed to callbacks as ``lr_scheduler``.
    """

    def __init__(
        self,
        callbacks: Iterable[Any],
        model: Any = None,
        processing_class: Any = None,
        optimizer: Any = None,
        lr_scheduler: Any = None,
    ) -> None:
        self.callbacks: list[Any] = []
        # Dispatch targets: a callback, or the reporter that runs it off the hot path.
        self._targets: dict[int, Any] = {}
        self._dispatch: dict[str, list[Callable[..., Any]]] = {}
        self._kwargs: dict[str, Any] = dict.fromkeys(_COMMON_KWARGS)
        self.model = model
        self.processing_class = processing_class
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        for cb in callbacks:
            self.add_callback(cb)
        from .flow import DefaultFlowCallback

        if not any(isinstance(cb, DefaultFlowCallback) for cb in self.callbacks):
            # The names are formatted into the message itself (transformers' tests read its first argument).
            logger.warning(
                "The Trainer will not work properly if you don't have a `DefaultFlowCallback` in its callbacks. "
                "You should add one before training with `trainer.add_callback(DefaultFlowCallback)`. "
                f"The current list of callbacks is\n:{self.callback_list}"
            )

    # The six common keyword arguments live in one dict built once; assigning an
    # attribute updates it, so an event never rebuilds its kwargs.
    def __setattr__(self, name: str, value: Any) -> None:
        if name in _COMMON_KWARGS:
            self._kwargs[name] = value
        object.__setattr__(self, name, value)

    @property
    def callback_list(self) -> str:
        """The class names of the callbacks, one per line."""
        return "\n".join(cb.__class__.__name__ for cb in self.callbacks)

    def add_callback(self, callback: Any, *, target: Any = None) -> None:
        """Append a callback instance, or a class to instantiate with no arguments.

        ``target`` is the object that receives the events instead (the Trainer
        passes a background reporter for integrations).
        """
        cb = callback() if isinstance(callback, type) else callback
        cb_class = callback if isinstance(callback, type) else callback.__class__
        if any(c.__class__ is cb_class for c in self.callbacks):
            logger.warning(
                f"You are adding a {cb_class} to the callbacks of this Trainer, but there is already one. "
                f"The current list of callbacks is\n:{self.callback_list}"
            )
        self.callbacks.append(cb)
        self._targets[id(cb)] = cb if target is None else target
        self._rebuild()

    def target_of(self, callback: Any) -> Any:
        """Return the object that receives ``callback``'s events (itself, or its reporter)."""
        return self._targets[id(callback)]

    def _find(self, callback: Any) -> int | None:
        for i, cb in enumerate(self.callbacks):
            if (isinstance(callback, type) and isinstance(cb, callback)) or cb is callback:
                return i
        return None

    def pop_callback(self, callback: Any) -> Any:
        """Remove and return the first callback of that class (or that instance); ``None`` if absent."""
        index = self._find(callback)
        if index is None:
            return None
        cb = self.callbacks.pop(index)
        target = self._targets.pop(id(cb))
        if target is not cb and hasattr(target, "close"):
            target.close()
        self._rebuild()
        return cb

    def remove_callback(self, callback: Any) -> None:
        """Remove the first callback of that class (or that instance); do nothing if absent."""
        self.pop_callback(callback)

    def _rebuild(self) -> None:
        ordered = sorted(self.callbacks, key=lambda c: getattr(c, "order", 0))
        dispatch: dict[str, list[Callable[..., Any]]] = {event: [] for event in EVENTS}
        for cb in ordered:
            target = self._targets[id(cb)]
            for event in overridden_events(target):
                dispatch[event].append(getattr(target, event))
        self._dispatch = dispatch

    def call_event(
        self, event: str, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        """Call ``event`` on every callback that overrides it; return the final control."""
        methods = self._dispatch[event]
        if not methods:
            return control
        kw = {**self._kwargs, **kwargs} if kwargs else self._kwargs
        for method in methods:
            result = method(args, state, control, **kw)
            if result is not None:
                control = result
        return control

    # Events, with transformers' flag resets before the callbacks run.
    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        """Dispatch ``on_init_end``."""
        return self.call_event("on_init_end", args, state, control)

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> Any:
        """Reset ``should_training_stop`` and dispatch ``on_train_begin``."""
        control.should_training_stop = False
        return self.call_event("on_train_begin", args, state, control)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        """Dispatch ``on_train_end``."""
        return self.call_event("on_train_end", args, state, control)

    def on_epoch_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> Any:
        """Reset ``should_epoch_stop`` and dispatch ``on_epoch_begin``."""
        control.should_epoch_stop = False
        return self.call_event("on_epoch_begin", args, state, control)

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        """Dispatch ``on_epoch_end``."""
        return self.call_event("on_epoch_end", args, state, control)

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> Any:
        """Reset the log/evaluate/save flags and dispatch ``on_step_begin``."""
        control.should_log = False
        control.should_evaluate = False
        control.should_save = False
        return self.call_event("on_step_begin", args, state, control)

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> Any:
        """Dispatch ``on_pre_optimizer_step``."""
        return self.call_event("on_pre_optimizer_step", args, state, control)

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> Any:
        """Dispatch ``on_optimizer_step``."""
        return self.call_event("on_optimizer_step", args, state, control)

    def on_substep_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> Any:
        """Dispatch ``on_substep_end``."""
        return self.call_event("on_substep_end", args, state, control)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        """Dispatch ``on_step_end``."""
        return self.call_event("on_step_end", args, state, control)

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, metrics: Any = None, **kwargs: Any
    ) -> Any:
        """Reset ``should_evaluate`` and dispatch ``on_evaluate`` with ``metrics``."""
        control.should_evaluate = False
        return self.call_event("on_evaluate", args, state, control, metrics=metrics)

    def on_predict(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, metrics: Any = None, **kwargs: Any
    ) -> Any:
        """Dispatch ``on_predict`` with ``metrics``."""
        return self.call_event("on_predict", args, state, control, metrics=metrics)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        """Reset ``should_save`` and dispatch ``on_save`` (epochal adds ``checkpoint=<folder>``)."""
        control.should_save = False
        return self.call_event("on_save", args, state, control, **kwargs)

    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs: Any = None, **kwargs: Any
    ) -> Any:
        """Reset ``should_log`` and dispatch ``on_log`` with ``logs``."""
        control.should_log = False
        return self.call_event("on_log", args, state, control, logs=logs)

    def on_prediction_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> Any:
        """Dispatch ``on_prediction_step``."""
        return self.call_event("on_prediction_step", args, state, control)

    def on_push_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> Any:
        """Dispatch ``on_push_begin`` with any extra keyword arguments."""
        return self.call_event("on_push_begin", args, state, control, **kwargs)

    def on_exception(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> Any:
        """Call ``on_exception`` on every callback; one failing handler never stops the others.

        Errors raised by handlers are logged with their traceback and returned in
        a list, so the caller can re-raise the original exception unchanged.
        """
        errors: list[BaseException] = []
        kw = {**self._kwargs, **kwargs}
        for method in self._dispatch["on_exception"]:
            try:
                method(args, state, control, **kw)
            except Exception as err:  # the original error matters more than a handler's
                logger.error("on_exception handler %r raised; continuing with the others.", method, exc_info=True)
                errors.append(err)
        return errors
