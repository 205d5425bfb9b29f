"""epochal integration for ``report_to="neptune"``: logs a training run to Neptune (1.x client).

Install: ``pip install epochal-neptune``

Usage::

    from epochal_core import Trainer, TrainingArguments
    from epochal_neptune import NeptuneCallback

    # NEPTUNE_MODE=offline keeps the run on local disk (no account, no network).
    args = TrainingArguments(output_dir="out", report_to="none")
    trainer = Trainer(model, args, train_dataset=data,
                      callbacks=[NeptuneCallback(base_namespace="finetuning", log_checkpoints="last")])
    trainer.train()

Neptune's hosted service is being wound down: use offline mode, debug mode or a
Neptune server you operate yourself (see the package README).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from epochal_core.integrations import IntegrationCallback, model_config

if TYPE_CHECKING:
    from epochal_core.control import TrainerControl
    from epochal_core.state import TrainerState
    from epochal_core.training_args import TrainingArguments

__all__ = ["NeptuneCallback"]

CHECKPOINT_MODES = (None, "same", "last", "best")
#: Modes that keep the run on this machine: no credentials needed, and no server to reopen a run on.
LOCAL_MODES = frozenset({"offline", "debug"})
LOGGING_MODES = frozenset({"async", "sync", "offline", "debug"})
#: Monitoring that ``neptune.init_run`` turns on by default; off here unless passed explicitly.
QUIET_RUN_DEFAULTS: dict[str, Any] = {
    "capture_stdout": False, "capture_stderr": False, "capture_hardware_metrics": False,
    "capture_traceback": False, "source_files": [], "git_ref": False,
}


def _neptune_mode(kwargs: dict[str, Any]) -> str:
    return str(kwargs.get("mode") or os.environ.get("NEPTUNE_MODE") or "async")


def _link_or_copy(src: str, dst: str) -> None:
    # A hard link costs no space and survives the checkpoint's rotation; other filesystems get a copy.
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


class NeptuneCallback(IntegrationCallback):
    """Send metrics, parameters and (optionally) checkpoints to a Neptune run.

    The run is created on the first event, on world rank zero only, with
    ``neptune.init_run(project=..., api_token=..., name=..., **neptune_run_kwargs)``.
    stdout/stderr, hardware and traceback capture, source files and git info are
    off unless passed in ``neptune_run_kwargs``. Scalars go to
    ``<base_namespace>/train|eval|test/<key>`` with ``step=global_step``
    (``train/epoch`` is a single value); parameters to
    ``<base_namespace>/trainer_parameters`` and ``<base_namespace>/model_parameters``.

    Args:
        api_token: Neptune API token (default: ``NEPTUNE_API_TOKEN``).
        project: ``workspace/project`` (default: ``NEPTUNE_PROJECT``).
        name: Run name (``sys/name``); default ``TrainingArguments.run_name``, else ``output_dir``.
        base_namespace: Namespace holding everything this callback logs.
        run: An existing ``neptune.Run`` to log to; it is flushed, not stopped, at the end.
        log_parameters: Log the training arguments and the model config.
        log_checkpoints: ``None`` (no upload), ``"same"`` (every checkpoint, under
            ``checkpoints/<folder>``), ``"last"`` (latest only, ``checkpoints/last``) or
            ``"best"`` (best only, ``checkpoints/best``; needs ``load_best_model_at_end``).
        **neptune_run_kwargs: Passed to ``neptune.init_run`` (``mode``, ``tags``,
            ``custom_run_id``, ``capture_hardware_metrics``, ...).

    Raises:
        ValueError: An argument has the wrong type or value, ``run`` is combined with
            run-creation arguments, or (when the run starts) ``log_checkpoints="best"``
            without ``load_best_model_at_end=True``.

    """

    name: ClassVar[str] = "neptune"
    package: ClassVar[str] = "epochal-neptune"
    sdk: ClassVar[str] = "neptune"
    sdk_package: ClassVar[str] = "neptune"

    def __init__(
        self,
        *,
        api_token: str | None = None,
        project: str | None = None,
        name: str | None = None,
        base_namespace: str = "finetuning",
        run: Any = None,
        log_parameters: bool = True,
        log_checkpoints: str | None = None,
        **neptune_run_kwargs: Any,
    ) -> None:
        super().__init__()
        for arg, value in (("api_token", api_token), ("project", project), ("name", name)):
            if value is not None and not isinstance(value, str):
                raise ValueError(f"NeptuneCallback({arg}=...) must be a str or None, got {type(value).__name__}.")
        if not isinstance(base_namespace, str) or not base_namespace.strip("/"):
            raise ValueError(f"NeptuneCallback(base_namespace={base_namespace!r}) must be a non-empty str.")
        if not isinstance(log_parameters, bool):
            raise ValueError(f"NeptuneCallback(log_parameters={log_parameters!r}) must be a bool.")
        if log_checkpoints not in CHECKPOINT_MODES:
            raise ValueError(
                f"NeptuneCallback(log_checkpoints={log_checkpoints!r}) is invalid: use None, 'same', 'last' or 'best'."
            )
        if run is not None and (api_token or project or name or neptune_run_kwargs):
            raise ValueError(
                "NeptuneCallback(run=...) logs to an existing run: api_token, project, name and init_run "
                "arguments would be ignored, so pass them to neptune.init_run instead."
            )
        mode = neptune_run_kwargs.get("mode")
        if mode is not None and mode not in LOGGING_MODES:
            raise ValueError(f"NeptuneCallback(mode={mode!r}) cannot log: use one of {sorted(LOGGING_MODES)}.")
        self.api_token = api_token
        self.project = project
        self.run_name = name
        self.base_namespace = base_namespace.strip("/")
        self.log_parameters = log_parameters
        self.log_checkpoints = log_checkpoints
        self.neptune_run_kwargs = neptune_run_kwargs
        self._user_run = run
        self._run: Any = None
        self._mode = "async"
        #: Mode of the run that ``run_id`` names (restored on resume).
        self.run_mode: str | None = None
        self._staged: list[Path] = []
        self._finished = False

    @property
    def run(self) -> Any:
        """The current (or last) ``neptune.Run``; ``None`` before the first event."""
        return self._run

    @classmethod
    def get_run(cls, trainer: Any) -> Any:
        """Return the Neptune run of ``trainer``'s :class:`NeptuneCallback` (transformers' helper).

        Raises:
            ValueError: The trainer has no NeptuneCallback.

        """
        for callback in trainer.callback_handler.callbacks:
            if isinstance(callback, cls):
                return callback.run
        raise ValueError("The trainer has no NeptuneCallback: add report_to=['neptune'] or callbacks=[...].")

    @classmethod
    def configuration_problem(cls) -> str | None:
        """Why Neptune cannot start from the environment alone, or ``None``."""
        mode = _neptune_mode({})
        if mode not in LOGGING_MODES:
            return f"NEPTUNE_MODE={mode!r} cannot log a run; use one of {sorted(LOGGING_MODES)}."
        missing = [var for var in ("NEPTUNE_API_TOKEN", "NEPTUNE_PROJECT") if not os.environ.get(var)]
        if mode in LOCAL_MODES or not missing:
            return None
        return (
            f"{' and '.join(missing)} not set. Set NEPTUNE_API_TOKEN and NEPTUNE_PROJECT=workspace/project "
            "for a Neptune server, or NEPTUNE_MODE=offline to keep runs on local disk."
        )

    # -- run lifecycle -----------------------------------------------------------------------
    def _check_args(self, args: TrainingArguments) -> None:
        if self.log_checkpoints == "best" and not args.load_best_model_at_end:
            raise ValueError(
                "NeptuneCallback(log_checkpoints='best') needs TrainingArguments(load_best_model_at_end=True) "
                "to know which checkpoint is the best; use log_checkpoints='last' otherwise."
            )

    def init_run_kwargs(self, args: TrainingArguments, resumed: bool) -> dict[str, Any]:
        """Build ``neptune.init_run``'s keyword arguments (``with_id`` when a server run can be reopened)."""
        kwargs = {**QUIET_RUN_DEFAULTS, **self.neptune_run_kwargs}
        for key, value in (("api_token", self.api_token), ("project", self.project),
                           ("name", self.run_name or args.run_name or args.output_dir)):
            if value is not None:
                kwargs[key] = value
        mode = _neptune_mode(kwargs)
        if (resumed and self.run_id and mode not in LOCAL_MODES and self.run_mode not in LOCAL_MODES
                and "with_id" not in kwargs and "custom_run_id" not in kwargs):
            kwargs["with_id"] = self.run_id
        return kwargs

    def setup(self, args: TrainingArguments, state: TrainerState, model: Any, **kwargs: Any) -> None:
        """Start (or reopen) the run and log the parameters."""
        self._check_args(args)
        neptune = self.import_sdk()
        resumed = state.global_step > 0 and self.run_id is not None
        if not resumed:
            self.last_logged_step = -1
        previous = self.run_id
        self._staged = []
        self._finished = False
        if self._user_run is not None:
            self._run = self._user_run
            self._mode = str(getattr(self._run, "_mode", None) or _neptune_mode({}))
        else:
            init_kwargs = self.init_run_kwargs(args, resumed)
            self._mode = _neptune_mode(init_kwargs)
            self._run = neptune.init_run(**init_kwargs)
        run, ns = self._run, self.base_namespace
        if self._mode in LOCAL_MODES:
            # A local run has no server id (sys/id cannot be fetched offline); its folder has this one.
            self.run_id = str(self._run._id)
        else:
            self.run_id = str(run["sys/id"].fetch())
        self.run_mode = self._mode
        if resumed and previous != self.run_id:
            run[f"{ns}/resumed_from"] = str(previous)
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            run["source_code/integrations/epochal-neptune"] = importlib.metadata.version(self.package)
        if self.log_parameters:
            run[f"{ns}/trainer_parameters"] = args.to_sanitized_dict()
            config = model_config(model)
            if config:
                from neptune.utils import stringify_unsupported

                run[f"{ns}/model_parameters"] = stringify_unsupported(config)

    def _staging_dir(self) -> Path:
        data_dir = Path(os.environ.get("NEPTUNE_DATA_DIRECTORY", ".neptune")).resolve()
        return data_dir / "epochal-checkpoints" / str(self.run_id)

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        """Check the arguments against the training arguments (no SDK call)."""
        self._check_args(args)

    def log_metrics(self, metrics: dict[str, float | int], step: int, state: TrainerState) -> None:
        """Append each value at ``step`` (``train/epoch`` is assigned)."""
        for key, value in metrics.items():
            field = self._run[f"{self.base_namespace}/{key}"]
            if key == "train/epoch":
                field.assign(float(value))
            else:
                field.append(float(value), step=step)

    def log_checkpoint(self, path: str, args: TrainingArguments, state: TrainerState) -> None:
        """Upload the committed checkpoint folder as ``log_checkpoints`` asks."""
        mode = self.log_checkpoints
        if mode is None or (mode == "best" and state.best_global_step != state.global_step):
            return
        from neptune.types import FileSet

        source = Path(path)
        # Neptune reads the files later (async upload, or `neptune sync` for offline runs), by which time
        # rotation may have deleted them: stage a copy next to Neptune's own storage.
        staged = self._staging_dir() / source.name
        shutil.rmtree(staged, ignore_errors=True)
        shutil.copytree(source, staged, copy_function=_link_or_copy)
        target = f"{self.base_namespace}/checkpoints/" + (source.name if mode == "same" else mode)
        if mode == "same":
            self._run[target].upload_files(str(staged))
        else:
            self._run[target] = FileSet([str(staged)])
            if self._mode == "offline" and self._staged:
                # Superseded: `neptune sync` skips an upload whose files are gone.
                shutil.rmtree(self._staged.pop(), ignore_errors=True)
        self._staged.append(staged)

    def finish(self, status: str) -> None:
        """Mark the run failed if ``status == "failed"``, then stop it (or flush a run passed in)."""
        run = self._run
        if run is None or self._finished:
            return
        self._finished = True
        try:
            if status == "failed":
                run["sys/failed"] = True
            if self._user_run is None:
                run.stop()
            else:
                run.wait()
        finally:
            if self._mode != "offline" and self._staged:
                # Uploaded (stop() waits for the queue) or never persisted: the staged copies are done with.
                shutil.rmtree(self._staging_dir(), ignore_errors=True)
                self._staged = []

    # -- checkpoint state ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Run id, its mode and the last logged step, saved in ``trainer_state.json``."""
        return {**super().state_dict(), "run_mode": self.run_mode}

    def load_state_dict(self, state: Any) -> None:
        """Restore :meth:`state_dict`'s output; the next run start reopens or links that run."""
        super().load_state_dict(state)
        self.run_mode = state.get("run_mode")
