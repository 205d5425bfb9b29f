"""The callback protocol: :class:`TrainerCallback` and :class:`ExportableState`.

Signatures and event names match ``transformers.TrainerCallback``, so a callback
written for transformers ports by changing its imports. This module imports
neither torch nor anything heavy: defining a callback costs nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from typing_extensions import Self

    from .control import TrainerControl
    from .state import TrainerState
    from .training_args import TrainingArguments

__all__ = ["EVENTS", "ExportableState", "TrainerCallback"]

#: Every event a callback can receive, in the order a training run first emits them.
#: ``on_exception`` is epochal's addition (transformers has no crash event).
EVENTS: tuple[str, ...] = (
    "on_init_end",
    "on_train_begin",
    "on_epoch_begin",
    "on_step_begin",
    "on_substep_end",
    "on_pre_optimizer_step",
    "on_optimizer_step",
    "on_step_end",
    "on_prediction_step",
    "on_log",
    "on_evaluate",
    "on_predict",
    "on_save",
    "on_epoch_end",
    "on_train_end",
    "on_push_begin",
    "on_exception",
)


class TrainerCallback:
    """Base class for objects that react to the events of a training run.

    Every event method is a no-op here; override the ones you need. Each receives
    the :class:`~epochal_core.TrainingArguments`, the :class:`~epochal_core.TrainerState`
    and the :class:`~epochal_core.TrainerControl` positionally, plus keyword
    arguments: ``model``, ``processing_class``, ``optimizer``, ``lr_scheduler``,
    ``train_dataloader``, ``eval_dataloader`` always; ``metrics`` for
    ``on_evaluate``/``on_predict``; ``logs`` for ``on_log``; ``exception`` for
    ``on_exception``. Accept ``**kwargs`` so new keywords never break you.

    An event may return a :class:`~epochal_core.TrainerControl`; it then replaces
    the control object handed to the next callback (the transformers contract).
    Mutating ``control`` in place works too.

    Only overridden events are dispatched: the handler looks at the class once
    when the callback is added, so an unused event costs nothing.

    Class attributes (epochal additions, all optional):

    Attributes:
        order: Sort key among callbacks of the same group (lower runs first);
            ties keep insertion order. Default ``0``.
        run_inline: For integrations resolved from ``report_to``: ``True`` runs the
            events on the training thread instead of the background reporter
            queue (an instance may set it too, before the Trainer takes it). Use it
            when the callback must see the live objects, or when its events cost
            less than handing them to another thread (a log written to a local
            buffer: epochal's TensorBoard writer). An inline integration must never
            block: ``TrainingArguments.integration_timeout`` cannot bound a call on
            the training thread.
    """

    order: ClassVar[int] = 0
    run_inline: bool = False

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        """Called at the end of ``Trainer.__init__``."""

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> Any:
        """Called at the beginning of training."""

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        """Called at the end of training (also after a graceful preemption stop)."""

    def on_epoch_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> Any:
        """Called at the beginning of an epoch."""

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        """Called at the end of an epoch."""

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> Any:
        """Called at the beginning of an update step (several micro-batches with accumulation)."""

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> Any:
        """Called after gradient clipping and before ``optimizer.step()``: gradients are final."""

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> Any:
        """Called after ``optimizer.step()`` and before the gradients are zeroed."""

    def on_substep_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> Any:
        """Called after each micro-batch of an accumulation window except the last."""

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        """Called at the end of an update step, after ``state.global_step`` was incremented."""

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        """Called after an evaluation phase, with ``metrics``."""

    def on_predict(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, float],
        **kwargs: Any,
    ) -> Any:
        """Called after a successful ``Trainer.predict``, with ``metrics``."""

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        """Called after a checkpoint was committed to disk."""

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        """Called after ``logs`` were appended to ``state.log_history``, with ``logs``."""

    def on_prediction_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> Any:
        """Called after each batch of an evaluation or prediction loop."""

    def on_push_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> Any:
        """Called before a model is pushed to a hub (kept for protocol parity; epochal never pushes)."""

    def on_exception(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> Any:
        """Called when training fails, with ``exception``; the error is re-raised afterwards.

        epochal addition. Integrations mark their run failed and flush here. Every
        callback gets this event even if another one raises while handling it.
        """


class ExportableState:
    """Mixin for callbacks whose state is saved in checkpoints (transformers' protocol).

    :meth:`state` returns ``{"args": constructor kwargs, "attributes": attributes
    to set after construction}``; both must be JSON-serialisable. epochal restores
    the state on resume by default, keyed per instance, in order.
    """

    def state(self) -> dict[str, Any]:
        """Return ``{"args": {...}, "attributes": {...}}`` describing this object."""
        raise NotImplementedError("You must implement a `state` function to utilize this class.")

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Self:
        """Build an instance from :meth:`state`'s output."""
        instance = cls(**state.get("args", {}))
        for key, value in state.get("attributes", {}).items():
            setattr(instance, key, value)
        return instance
