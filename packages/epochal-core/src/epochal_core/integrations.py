"""``IntegrationCallback``: the shared base of every tracker integration.

It does, once, what each integration would otherwise repeat: rank-zero gating,
lazy SDK import with the install hint, lazy run creation, key rewriting
(``train/``, ``eval/``, ``test/``), flattening nested hyperparameters, dropping
non-scalar values (one warning per key), keeping the tracker's run id in the
checkpoint so a resumed training continues the same run, not sending again the
steps that run already holds, and finishing the run on train end
(``"finished"``) or on a crash (``"failed"``).

A subclass sets :attr:`~IntegrationCallback.sdk` and implements :meth:`setup`,
:meth:`log_metrics` and :meth:`finish`; it may implement :meth:`log_texts`,
:meth:`log_checkpoint`, :meth:`end_batch` and :meth:`log_location`.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar

from .callback import TrainerCallback
from .discovery import install_hint

if TYPE_CHECKING:
    from .control import TrainerControl
    from .state import TrainerState
    from .training_args import TrainingArguments

__all__ = [
    "IntegrationCallback",
    "args_and_model_config",
    "env_flag",
    "flatten_params",
    "model_config",
    "rewrite_key",
    "rewrite_logs",
    "split_scalars",
]

logger = logging.getLogger(__name__)

#: What transformers' integrations accept as "true" in an environment variable (``ENV_VARS_TRUE_VALUES``).
_TRUE_VALUES = frozenset({"1", "ON", "YES", "TRUE"})


def env_flag(name: str, default: bool = False) -> bool:
    """Read a boolean environment variable the way transformers' integrations do.

    ``1``, ``on``, ``yes`` and ``true`` (any case) are true; any other set value is
    false; an unset or empty variable gives ``default``.
    """
    value = os.environ.get(name, "").strip()
    return value.upper() in _TRUE_VALUES if value else default


def rewrite_key(key: str) -> str:
    """``eval_x`` → ``eval/x``, ``test_x`` → ``test/x``, anything else → ``train/x`` (transformers' scheme)."""
    if key.startswith("eval_"):
        return "eval/" + key[5:]
    if key.startswith("test_"):
        return "test/" + key[5:]
    return "train/" + key


def rewrite_logs(logs: Mapping[str, Any]) -> dict[str, Any]:
    """Apply :func:`rewrite_key` to every key of ``logs``."""
    return {rewrite_key(key): value for key, value in logs.items()}


def flatten_params(params: Mapping[str, Any], sep: str = "/", prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings into ``{"a/b": value}`` (hyperparameter views need flat keys)."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, sep, name))
        else:
            flat[name] = value
    return flat


def split_scalars(values: Mapping[str, Any]) -> tuple[dict[str, float | int], list[str]]:
    """Keep ``int``/``float``/``bool`` values and one-element tensors; return them and the dropped keys."""
    kept: dict[str, float | int] = {}
    dropped: list[str] = []
    for key, value in values.items():
        if isinstance(value, (bool, int, float)):
            kept[key] = value
        elif hasattr(value, "numel") and hasattr(value, "item") and value.numel() == 1:
            kept[key] = value.item()
        else:
            dropped.append(key)
    return kept, dropped


def model_config(model: Any) -> dict[str, Any] | None:
    """The model's configuration as a dict (``model.config.to_dict()`` or a dict ``config``), if any."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    if hasattr(config, "to_dict"):
        return dict(config.to_dict())
    if isinstance(config, Mapping):
        return dict(config)
    return None


def args_and_model_config(args: TrainingArguments, model: Any) -> dict[str, Any]:
    """The flat parameter dict transformers' W&B and MLflow callbacks log: the model config, then the arguments.

    ``{**model.config.to_dict(), **args.to_dict()}``: on a name both have, the
    training argument wins, as in transformers.
    """
    return {**(model_config(model) or {}), **args.to_dict()}


class IntegrationCallback(TrainerCallback):
    """Base class of tracker integrations.

    Events run on world rank zero only (one tracker run per job, not one per
    process). The run is created lazily by :meth:`setup` on the first event that
    needs it; construction never touches the SDK, files or the network.

    Class attributes a subclass sets:

    Attributes:
        name: The ``report_to`` name (``"tensorboard"``).
        package: The epochal distribution (``"epochal-tensorboard"``).
        sdk: Import name of the SDK (``"dvclive"``; empty when the integration needs none).
        sdk_package: Distribution name of the SDK (``"dvclive"``; empty when it needs none).
        rewrite_keys: Rewrite log keys with :func:`rewrite_logs` (default ``True``).
    """

    name: ClassVar[str] = ""
    package: ClassVar[str] = ""
    sdk: ClassVar[str] = ""
    sdk_package: ClassVar[str] = ""
    rewrite_keys: ClassVar[bool] = True
    #: When the event being handled was emitted on the training thread (``time.time()``), or ``None``
    #: when it runs there now. epochal's reporter runs queued events up to
    #: :data:`~epochal_core.background.BATCH_INTERVAL` seconds later and sets this before each
    #: one, so a tracker that accepts a timestamp records when the log happened.
    event_time: float | None = None
    #: Whether the run being set up continues a tracker run restored from a checkpoint
    #: (:meth:`load_state_dict` restored :attr:`run_id` and training starts past step 0).
    #: Set before :meth:`setup`, which reopens :attr:`run_id` when it is true.
    resuming: bool = False
    #: Logs at a ``global_step`` up to this one are not sent: the resumed tracker run holds
    #: them. Set before :meth:`setup` (``-1``, or the checkpoint step on resume); a setup
    #: that can ask the tracker for its last step may raise it.
    skip_through_step: int = -1

    def __init__(self) -> None:
        self._initialized = False
        self._warned_keys: set[str] = set()
        #: Tracker run id, saved in checkpoints and restored on resume.
        self.run_id: str | None = None
        #: Highest ``global_step`` already sent to the tracker (restored on resume).
        self.last_logged_step: int = -1
        self._restored = False  # load_state_dict() restored a run id: the next setup resumes it

    # -- configuration ---------------------------------------------------------
    @classmethod
    def configuration_problem(cls) -> str | None:
        """Why this integration cannot start without interaction, or ``None`` if it can.

        Under ``report_to="all"`` a non-``None`` answer skips the integration with
        one warning containing this text (it should say how to configure it).
        """
        return None

    def import_sdk(self, module: str | None = None, package: str | None = None) -> ModuleType:
        """Import the SDK (or ``module``), or raise ``ImportError`` with the install command."""
        module = module or self.sdk
        try:
            return importlib.import_module(module)
        except ImportError as err:
            raise ImportError(install_hint(package or self.sdk_package or module, type(self).__name__)) from err

    # -- hooks for subclasses ----------------------------------------------------
    def setup(self, args: TrainingArguments, state: TrainerState, model: Any, **kwargs: Any) -> None:
        """Create (or resume, when :attr:`run_id` is set) the tracker run and log hyperparameters."""
        raise NotImplementedError

    def log_metrics(self, metrics: dict[str, float | int], step: int, state: TrainerState) -> None:
        """Send scalar ``metrics`` (keys already rewritten) at ``step``."""
        raise NotImplementedError

    def log_texts(self, texts: dict[str, str], step: int, state: TrainerState) -> None:
        """Send string values (keys already rewritten) at ``step``.

        Not overriding it means the tracker shows no text: strings are then dropped
        with one warning per key, like any other non-scalar.
        """

    def log_checkpoint(self, path: str, args: TrainingArguments, state: TrainerState) -> None:
        """Called after checkpoint ``path`` was committed; upload it if configured. Default: nothing."""

    def end_batch(self) -> None:
        """Write out what the integration buffered; epochal's reporter calls it after each batch of events.

        The reporter runs queued events in batches (at most
        :data:`~epochal_core.background.BATCH_INTERVAL` seconds apart while events
        arrive) and calls this after each batch, on its thread, and after each
        event it runs on the training thread. Buffering writes until then costs one
        system call per batch instead of one per log. Default: nothing.
        """

    def finish(self, status: str) -> None:
        """Flush and close the run; ``status`` is ``"finished"`` or ``"failed"``.

        Also called after :meth:`setup` raised part-way: release whatever it created.
        """
        raise NotImplementedError

    def log_location(self) -> str | None:
        """Where the user opens this run's logs (a folder, a file or a URL), or ``None`` when unknown.

        The end-of-training summary prints it, one line per integration. It is called on
        world rank zero after :meth:`finish`, so return what :meth:`setup` recorded (not
        an SDK object that ``finish`` closed), and keep it cheap: no network. Default: ``None``.
        """
        return None

    # -- shared helpers ------------------------------------------------------------
    def hyperparameters(self, args: TrainingArguments, model: Any) -> dict[str, Any]:
        """Training arguments and the model config as one nested dict: ``{"args": ..., "config": ...}``.

        The layout of transformers' ``CometCallback.setup`` (``{"args": args.to_dict(),
        "config": model.config.to_dict()}``), so flattened names line up with its runs.
        """
        params: dict[str, Any] = {"args": args.to_dict()}
        config = model_config(model)
        if config is not None:
            params["config"] = config
        return params

    def scalars(self, logs: Mapping[str, Any]) -> dict[str, float | int]:
        """Rewrite keys (if enabled) and keep scalars, warning once per dropped key (strings included)."""
        return self._split_logs(logs, takes_text=False)[0]

    def _ensure_setup(self, args: TrainingArguments, state: TrainerState, kwargs: dict[str, Any]) -> None:
        if not self._initialized:
            # Marked first, so a setup that fails part-way still gets finish("failed").
            self._initialized = True
            self._prepare_resume(state)
            self.setup(args, state, kwargs.get("model"), **{k: v for k, v in kwargs.items() if k != "model"})

    def _prepare_resume(self, state: TrainerState) -> None:
        # Once per restored state: a later setup of the same instance (predict after training) starts afresh.
        self.resuming = bool(self.__dict__.get("_restored")) and state.global_step > 0
        self._restored = False
        # The resumed trainer restarts at the checkpoint step: what the tracker got up to it (and up to the
        # last step the checkpoint saw logged) is already there; an appending tracker would record it twice.
        self.skip_through_step = max(self.last_logged_step, state.global_step) if self.resuming else -1

    # -- events ----------------------------------------------------------------------
    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> Any:
        """Create the run on world rank zero."""
        if state.is_world_process_zero:
            self._ensure_setup(args, state, kwargs)

    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs: Any = None, **kwargs: Any
    ) -> Any:
        """Send the scalars of ``logs`` at ``state.global_step``."""
        self._handle_log(args, state, logs, kwargs)

    def queued_log_handler(self) -> Callable[[TrainingArguments, TrainerState, Any, dict[str, Any]], None] | None:
        """What epochal's reporter calls for a queued ``on_log``, or ``None`` to call ``on_log``.

        When a subclass does not override :meth:`on_log`, the reporter calls its body
        with the keyword arguments as one dict: unpacking seven keywords into a call
        costs more than the rest of the event.
        """
        return self._handle_log if type(self).on_log is IntegrationCallback.on_log else None

    def _handle_log(self, args: TrainingArguments, state: TrainerState, logs: Any, kwargs: dict[str, Any]) -> None:
        if not state.is_world_process_zero or not logs:
            return
        if not self._initialized:
            self._ensure_setup(args, state, {k: v for k, v in kwargs.items() if k != "logs"})
        if state.global_step <= self.skip_through_step:
            return
        metrics, texts = self._split_logs(logs)
        if metrics:
            self.log_metrics(metrics, state.global_step, state)
        if texts:
            self.log_texts(texts, state.global_step, state)
        if (metrics or texts) and state.global_step > self.last_logged_step:
            self.last_logged_step = state.global_step

    def _split_logs(
        self, logs: Mapping[str, Any], takes_text: bool | None = None
    ) -> tuple[dict[str, float | int], dict[str, str]]:
        # One pass per log. (Caching each key's tracker name saved 1.5 us per log, 0.04 % of a
        # tiny model's steps at logging_steps=10: not worth its code; tools/bench/README.md.)
        rename = self.rewrite_keys
        if takes_text is None:
            # Strings go to log_texts when the subclass implements it, else they are dropped like any non-scalar.
            takes_text = type(self).log_texts is not IntegrationCallback.log_texts
        metrics: dict[str, float | int] = {}
        texts: dict[str, str] = {}
        for key, value in logs.items():
            name = rewrite_key(key) if rename else key
            kind = type(value)
            if kind is float or kind is int or kind is bool:
                metrics[name] = value
            elif kind is str and takes_text:
                texts[name] = value
            else:
                kept, dropped = split_scalars({name: value})
                metrics.update(kept)
                if dropped:
                    self._warn_dropped(name, value)
        return metrics, texts

    def _warn_dropped(self, key: str, value: Any) -> None:
        if key not in self._warned_keys:
            self._warned_keys.add(key)
            logger.warning(
                "%s: dropped %r, a %s is not a scalar this tracker can log.", type(self).__name__, key,
                type(value).__name__,
            )

    def log_prediction_metrics(
        self, args: TrainingArguments, state: TrainerState, metrics: Any, kwargs: dict[str, Any]
    ) -> None:
        """Send ``predict()``'s ``test/`` metrics: for an ``on_predict`` override (W&B and Comet have one).

        After training the run is closed, so it is reopened (the same run id) for them and
        finished again; on world rank zero only.
        """
        if not state.is_world_process_zero or not metrics:
            return
        opened = not self._initialized
        self._ensure_setup(args, state, kwargs)
        self.log_metrics(self.scalars(metrics), state.global_step, state)
        if opened:
            self._initialized = False
            self.finish("finished")

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        """Pass the committed checkpoint to :meth:`log_checkpoint`."""
        if state.is_world_process_zero and self._initialized:
            checkpoint = kwargs.get("checkpoint")
            if checkpoint is not None:
                self.log_checkpoint(str(checkpoint), args, state)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        """Finish the run with status ``"finished"``."""
        if state.is_world_process_zero and self._initialized:
            self._initialized = False
            self.finish("finished")

    def on_exception(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> Any:
        """Flush and finish the run with status ``"failed"``."""
        if state.is_world_process_zero and self._initialized:
            self._initialized = False
            self.finish("failed")

    # -- checkpoint state ------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The tracker run id and last logged step, saved in ``trainer_state.json``."""
        return {"run_id": self.run_id, "last_logged_step": self.last_logged_step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output so :meth:`setup` can resume the same run (see :attr:`resuming`)."""
        self.run_id = state.get("run_id")
        self.last_logged_step = int(state.get("last_logged_step", -1))
        self._restored = self.run_id is not None
