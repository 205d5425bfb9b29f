"""ClearML integration for epochal: ``report_to="clearml"``.

Install with ``pip install epochal-clearml``. Scalars, the training arguments,
the model configuration and (optionally) the checkpoints go to a ClearML task,
named and laid out as transformers' ``ClearMLCallback`` does::

    from epochal_core import Trainer, TrainingArguments

    args = TrainingArguments(output_dir="out", report_to="clearml")
    Trainer(model, args, train_dataset=data).train()

``clearml`` is imported only when the task starts, on world rank zero. What
``Task.init`` would otherwise do to the training process is contained:

- it reseeds ``random``, numpy and torch with 1337 (turned off: the Trainer
  seeds), and binding frameworks draws from the global ``random``
  (``auto_connect_frameworks=False`` by default: epochal reports explicitly);
- on Linux it forks a reporter process, a copy of the training process whose
  shutdown takes ten seconds (turned off: reports go through threads);
- it replaces the SIGTERM/SIGINT handlers; epochal starts the task on its
  reporter thread, where Python refuses signal handlers, so the Trainer's
  save-on-SIGTERM stays in place;
- it sets ``CLEARML_PROC_MASTER_ID`` and leaves it set after closing, so a
  later process started from this one joins the closed task (put back when
  the task closes);
- it writes ``~/.clearml/.session.json``; with ``CLEARML_CACHE_DIR`` set, that
  file goes into the cache folder too, so a configured ClearML leaves HOME alone.

Offline (``CLEARML_OFFLINE_MODE=1``), ClearML cannot register models
(``OutputModel`` fails with ``'DummyModel' object has no attribute 'locked'``,
clearml/clearml#1172): checkpoints are then stored as task artifacts in the
offline session instead.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from epochal_core.integrations import IntegrationCallback, model_config

if TYPE_CHECKING:
    from epochal_core.state import TrainerState
    from epochal_core.training_args import TrainingArguments

__all__ = ["ClearMLCallback"]

logger = logging.getLogger(__name__)

_MISSING = object()
_ENV_PREFIXES = ("CLEARML_", "TRAINS_")
_TRUE = frozenset({"1", "ON", "YES", "TRUE"})
#: Logged with ``report_single_value`` (one value per task), as transformers does.
SINGLE_VALUES = frozenset(
    {"train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss", "total_flos", "epoch"}
)
HPARAMS_SECTION = "Transformers"
MODEL_CONFIG_SECTION = "Model Configuration"


def _env_true(name: str, default: bool) -> bool:
    value = os.environ.get(name, "").strip()
    return value.upper() in _TRUE if value else default


class ClearMLCallback(IntegrationCallback):
    """Sends logs to a ClearML task (transformers' ``ClearMLCallback``).

    Environment variables (the same as transformers): ``CLEARML_PROJECT``
    (default ``"HuggingFace Transformers"``), ``CLEARML_TASK`` (default
    ``"Trainer"``) and ``CLEARML_LOG_MODEL`` (default true when the callback
    creates the task, false when it joins a task already running). Constructor
    arguments win over them.

    Logs: ``train_runtime``, ``train_samples_per_second``,
    ``train_steps_per_second``, ``train_loss``, ``total_flos`` and ``epoch`` as
    single values; ``eval_x`` as scalar ``eval``/``x``, ``test_x`` as
    ``test``/``x``, anything else as ``train``/``key``, at ``global_step``.
    Hyperparameters: the training arguments (``*_token`` fields left out) in
    section ``Transformers``; the model config as configuration object
    ``Model Configuration``. A training resumed from a checkpoint continues the
    same task (``continue_last_task``) at the same iterations, without sending a step twice.

    Args:
        project_name: ClearML project; default ``CLEARML_PROJECT``.
        task_name: Task name; default ``CLEARML_TASK``.
        log_model: Store each checkpoint (a model online, an artifact offline);
            default ``CLEARML_LOG_MODEL``.
        auto_connect_frameworks: Passed to ``Task.init``. The default ``False``
            keeps ClearML from patching torch, matplotlib, joblib and others
            (epochal logs explicitly); repository detection stays on.
        report_in_subprocess: Let ClearML fork its reporter process on Linux
            (its default) instead of reporting from threads.
        task_init_kwargs: More keyword arguments for ``Task.init``.

    Raises:
        ImportError: At setup, when ``clearml`` is not installed.
    """

    name: ClassVar[str] = "clearml"
    package: ClassVar[str] = "epochal-clearml"
    sdk: ClassVar[str] = "clearml"
    sdk_package: ClassVar[str] = "clearml"
    rewrite_keys: ClassVar[bool] = False  # ClearML has its own title/series scheme

    def __init__(
        self,
        project_name: str | None = None,
        task_name: str | None = None,
        log_model: bool | None = None,
        auto_connect_frameworks: Any = False,
        report_in_subprocess: bool = False,
        task_init_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.project_name = project_name
        self.task_name = task_name
        self.log_model = log_model
        self.auto_connect_frameworks = auto_connect_frameworks
        self.report_in_subprocess = report_in_subprocess
        self.task_init_kwargs = dict(task_init_kwargs or {})
        #: The ClearML task between setup and finish.
        self.task: Any = None
        self._logger: Any = None
        self._owns_task = False
        self._log_model = False
        self._offline = False
        self._routes: dict[str, tuple[str, str] | None] = {}  # log key -> (title, series), None: single value
        self._restore: list[tuple[Any, str, Any]] = []  # class attributes to put back after the task closed
        self._environ: dict[str, str] | None = None  # ClearML's environment variables before Task.init

    @classmethod
    def configuration_problem(cls) -> str | None:
        """Why ClearML would need a server it has no credentials for under ``report_to="all"``, else ``None``."""
        if _env_true("CLEARML_OFFLINE_MODE", False) or os.environ.get("CLEARML_API_ACCESS_KEY"):
            return None
        files = [os.environ.get("CLEARML_CONFIG_FILE", ""), "~/clearml.conf", "~/.clearml.conf"]
        if any(name and os.path.isfile(os.path.expanduser(name)) for name in files):
            return None
        return (
            "ClearML has no server credentials (no clearml.conf, CLEARML_API_ACCESS_KEY unset): run "
            "`clearml-init`, or set CLEARML_OFFLINE_MODE=1 to write offline sessions."
        )

    def setup(self, args: TrainingArguments, state: TrainerState, model: Any, **kwargs: Any) -> None:
        """Join the running task or create one (continuing it on resume); log hyperparameters and model config."""
        clearml = self.import_sdk()
        task_cls = clearml.Task
        current = task_cls.current_task()
        if current is not None:
            # Running inside a task someone else started (a pipeline, an agent, the user's Task.init).
            self.task, self._owns_task = current, False
            default_log_model = False
        else:
            self._contain(clearml)
            init_kwargs: dict[str, Any] = {
                "project_name": self.project_name or os.environ.get("CLEARML_PROJECT", "HuggingFace Transformers"),
                "task_name": self.task_name or os.environ.get("CLEARML_TASK", "Trainer"),
                "auto_connect_frameworks": self.auto_connect_frameworks,
                "output_uri": True,
            }
            if self.resuming and self.run_id:
                # Continue that task with iteration offset 0: epochal logs global steps, which already
                # continue where the checkpoint left off (True would shift them past its last iteration).
                init_kwargs.update(reuse_last_task_id=self.run_id, continue_last_task=0)
            init_kwargs.update(self.task_init_kwargs)
            self.task, self._owns_task = task_cls.init(**init_kwargs), True
            default_log_model = True
        self.run_id = str(self.task.id)
        self._offline = bool(task_cls.is_offline())
        self._log_model = self.log_model if self.log_model is not None else _env_true(
            "CLEARML_LOG_MODEL", default_log_model
        )
        self._logger = self.task.get_logger()
        params = {k: v for k, v in args.to_dict().items() if not k.endswith("_token")}
        section = HPARAMS_SECTION
        self.task.update_parameters({f"{section}/{k}": v for k, v in params.items()})
        # Epochal never applies UI overrides to a run (transformers' default); the flags say so in the UI.
        self.task.set_parameter(f"{section}/_ignore_hparams_ui_overrides_", True, value_type=bool)
        config = model_config(model)
        if config is not None:
            self.task.set_parameter(f"{section}/_ignore_model_config_ui_overrides_", True, value_type=bool)
            self.task.set_configuration_object(
                name=MODEL_CONFIG_SECTION, config_dict=config, description="The configuration of the model."
            )

    def _contain(self, clearml: Any) -> None:
        task_cls = clearml.Task
        # Task.init reseeds random/numpy/torch with 1337 unless the default seed is None.
        self._restore.append((task_cls, "_random_seed", task_cls.__dict__.get("_random_seed", _MISSING)))
        task_cls.set_random_seed(None)
        if not self.report_in_subprocess:
            self._restore.append((task_cls, "_report_subprocess_enabled",
                                  task_cls.__dict__.get("_report_subprocess_enabled", _MISSING)))
            task_cls._report_subprocess_enabled = False
        # Task.init marks this process as the task's master in CLEARML_PROC_MASTER_ID and leaves it set
        # after close(): a later process started from here would take itself for a part of that task.
        self._environ = {k: v for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES)}
        if os.environ.get("CLEARML_CACHE_DIR"):
            from clearml.config import get_cache_dir
            from clearml.config.cache import SessionCache

            self._restore.append((SessionCache, "SESSION_CACHE_FOLDER", SessionCache.__dict__["SESSION_CACHE_FOLDER"]))
            SessionCache.SESSION_CACHE_FOLDER = str(get_cache_dir())

    def _route(self, key: str) -> tuple[str, str] | None:
        route = self._routes.get(key)
        if route is None and key not in self._routes:
            if key in SINGLE_VALUES:
                route = None
            elif key.startswith("eval_"):
                route = ("eval", key[5:])
            elif key.startswith("test_"):
                route = ("test", key[5:])
            else:
                route = ("train", key)
            self._routes[key] = route
        return route

    def log_metrics(self, metrics: dict[str, float | int], step: int, state: TrainerState) -> None:
        """Report each value as transformers does: a single value or a ``title``/``series`` scalar at ``step``."""
        report_scalar, report_single = self._logger.report_scalar, self._logger.report_single_value
        for key, value in metrics.items():
            route = self._route(key)
            if route is None:
                report_single(name=key, value=value)
            else:
                report_scalar(title=route[0], series=route[1], value=value, iteration=step)

    def log_checkpoint(self, path: str, args: TrainingArguments, state: TrainerState) -> None:
        """Store the checkpoint when model logging is on: a ClearML model online, an artifact offline."""
        if not self._log_model or self.task is None:
            return
        name = Path(path).name
        if self._offline:
            self.task.upload_artifact(name=name, artifact_object=Path(path), wait_on_upload=True)
            return
        clearml = self.import_sdk()
        output_model = clearml.OutputModel(task=self.task, name=name)
        output_model.update_weights_package(
            weights_path=path, target_filename=name, iteration=state.global_step, auto_delete_file=False
        )

    def finish(self, status: str) -> None:
        """Close the task the callback created (marked failed first on a crash); flush a joined one."""
        task, self.task = self.task, None
        try:
            if task is None:
                return
            if not self._owns_task:
                task.flush(wait_for_uploads=True)
                return
            if status == "failed":
                task.mark_failed(ignore_errors=True, status_reason="training failed", force=True)
            task.close()
        finally:
            if self._environ is not None:
                for key in [k for k in os.environ if k.startswith(_ENV_PREFIXES)]:
                    if key not in self._environ:
                        del os.environ[key]
                os.environ.update(self._environ)
                self._environ = None
            for owner, attr, value in reversed(self._restore):
                if value is _MISSING:
                    if attr in owner.__dict__:
                        delattr(owner, attr)
                else:
                    setattr(owner, attr, value)
            self._restore.clear()
