"""Comet integration for epochal: ``report_to="comet_ml"``.

Install with ``pip install epochal-comet``. Metrics, training arguments and the
model config go to a Comet experiment, online or as an offline archive::

    from epochal_core import Trainer, TrainingArguments
    from epochal_comet import CometCallback

    args = TrainingArguments(output_dir="out", report_to="comet_ml", run_name="baseline")
    trainer = Trainer(model, args, train_dataset=data)  # or callbacks=[CometCallback(online=False)]
    trainer.train()

``comet_ml`` is imported only when the experiment starts; its import replaces
``sys.excepthook`` and, unless ``COMET_DISABLE_AUTO_LOGGING=1``, installs import
hooks that patch torch and other libraries.
"""

from __future__ import annotations

import configparser
import copy
import os
import threading
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from epochal_core.integrations import IntegrationCallback

if TYPE_CHECKING:
    from epochal_core.control import TrainerControl
    from epochal_core.state import TrainerState
    from epochal_core.training_args import TrainingArguments

__all__ = ["CometCallback"]

_MODES = ("get_or_create", "create", "get")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _env_bool(name: str) -> bool | None:
    value = os.environ.get(name, "").strip().lower()
    return True if value in _TRUE else False if value in _FALSE else None


def _env_mode() -> tuple[str | None, bool | None]:
    """``COMET_MODE`` as ``(mode, online)``; ``online``/``offline`` are transformers' deprecated aliases."""
    value = os.environ.get("COMET_MODE", "").strip().lower()
    if not value:
        return None, None
    if value in ("online", "offline"):
        return None, value == "online"
    if value in _MODES:
        return value, None
    raise ValueError(f"COMET_MODE={value!r} is invalid: use one of {list(_MODES)} (or unset it).")


def _configured_api_key() -> bool:
    """Whether an API key is set in the environment or in a ``.comet.config`` file Comet reads."""
    if os.environ.get("COMET_API_KEY", "").strip():
        return True
    paths = [Path("./.comet.config"), Path("~/.comet.config").expanduser()]
    override = os.environ.get("COMET_CONFIG")
    if override:
        path = Path(override).expanduser()
        paths.insert(0, path / ".comet.config" if path.is_dir() else path)
    for path in paths:
        parser = configparser.ConfigParser(strict=False, interpolation=None)
        try:
            parser.read(path)
        except (configparser.Error, OSError, UnicodeDecodeError):
            continue
        if parser.get("comet", "api_key", fallback="").strip():
            return True
    return False


class CometCallback(IntegrationCallback):
    """Sends logs to a Comet experiment (transformers' ``CometCallback``).

    Environment variables (the same as transformers): ``COMET_MODE``
    (``get_or_create``, ``create`` or ``get``; ``online``/``offline`` accepted),
    ``COMET_START_ONLINE``, ``COMET_PROJECT_NAME``, ``COMET_EXPERIMENT_KEY``,
    ``COMET_OFFLINE_DIRECTORY`` and ``COMET_LOG_ASSETS`` (default false).
    Constructor arguments win over them.

    Args:
        project_name: Comet project; default ``COMET_PROJECT_NAME`` or Comet's default.
        online: Log to the server (``True``) or to an offline archive (``False``);
            default ``COMET_START_ONLINE`` (Comet's default is online).
        mode: ``"get_or_create"``, ``"create"`` or ``"get"``; default ``COMET_MODE``.
        log_assets: Upload ``output_dir`` when training ends; default ``COMET_LOG_ASSETS``, else ``False``.
        log_graph: Log the model's graph (its ``repr``) with ``set_model_graph``.
        offline_directory: Where offline archives go; default ``COMET_OFFLINE_DIRECTORY``.
        experiment_config: A ``comet_ml.ExperimentConfig`` replacing the offline-safe
            default (no code, git, environment, stdout or CO2 capture).

    Raises:
        ValueError: At setup, for an invalid ``mode`` or ``COMET_MODE``.
        ImportError: At setup, when ``comet_ml`` is not installed.

    """

    name = "comet_ml"
    package = "epochal-comet"
    sdk = "comet_ml"
    sdk_package = "comet-ml"

    def __init__(
        self,
        project_name: str | None = None,
        online: bool | None = None,
        mode: str | None = None,
        log_assets: bool | None = None,
        log_graph: bool = False,
        offline_directory: str | None = None,
        experiment_config: Any = None,
    ) -> None:
        super().__init__()
        self.project_name = project_name
        self.online = online
        self.mode = mode
        self.log_assets = log_assets
        self.log_graph = log_graph
        self.offline_directory = offline_directory
        self.experiment_config = experiment_config
        #: The live ``comet_ml`` experiment between setup and finish.
        self.experiment: Any = None
        self._key_lock = threading.Lock()
        self._continue = False  # the key names an experiment that already exists
        self._output_dir: str | None = None
        self._location: str | None = None  # the experiment URL or offline archive, for log_location()
        self._error: str | None = None

    @classmethod
    def configuration_problem(cls) -> str | None:
        """Why Comet would need credentials or interaction under ``report_to="all"``, else ``None``."""
        try:
            _, online = _env_mode()
        except ValueError as err:
            return str(err)
        if online is None:
            online = _env_bool("COMET_START_ONLINE")
        if online is False or _configured_api_key():
            return None
        return (
            "Comet runs online by default and no API key is configured: set COMET_API_KEY "
            "(or run `comet login`), or set COMET_START_ONLINE=false to write offline archives."
        )

    def _key(self) -> str:
        # state_dict() runs on the training thread and may come before setup() ran on the
        # reporter thread, so the key is chosen up front and shared under a lock.
        with self._key_lock:
            if self.run_id is None:
                self.run_id = os.environ.get("COMET_EXPERIMENT_KEY") or uuid.uuid4().hex
            return self.run_id

    def setup(self, args: TrainingArguments, state: TrainerState, model: Any, **kwargs: Any) -> None:
        """Start (or continue, on resume) the experiment and log the arguments and model config."""
        env_mode, env_online = _env_mode()
        mode = self.mode or env_mode
        if mode is not None and mode not in _MODES:
            raise ValueError(f"CometCallback(mode={mode!r}) is invalid: use one of {list(_MODES)}.")
        if self._continue:
            mode = "get"
        elif mode == "get" and not os.environ.get("COMET_EXPERIMENT_KEY"):
            raise ValueError("Comet mode 'get' continues an existing experiment: set COMET_EXPERIMENT_KEY to its key.")
        online = self.online if self.online is not None else env_online
        if self.log_assets is None:
            self.log_assets = _env_bool("COMET_LOG_ASSETS") is True
        self._output_dir = args.output_dir
        self._error = None
        comet_ml = self.import_sdk()
        config = copy.copy(self.experiment_config) or comet_ml.ExperimentConfig(
            log_code=False, log_graph=False, parse_args=False, log_git_metadata=False, log_git_patch=False,
            log_env_details=False, log_env_gpu=False, log_env_host=False, log_env_cpu=False,
            log_env_network=False, log_env_disk=False, auto_output_logging=False, auto_log_co2=False,
        )
        if self.offline_directory is not None:
            config.offline_directory = self.offline_directory
        # transformers leaves the default run name (output_dir) to Comet's generated names.
        if config.name is None and args.run_name and args.run_name != args.output_dir:
            config.name = args.run_name
        self.experiment = comet_ml.start(
            project_name=self.project_name, experiment_key=self._key(), mode=mode, online=online,
            experiment_config=config,
        )
        self._continue = True
        archive_name = getattr(self.experiment, "_get_offline_archive_file_name", None)
        if callable(archive_name):  # offline: the name the archive gets when the experiment ends
            directory = os.path.abspath(str(self.experiment.offline_directory))
            self._location = os.path.join(directory, archive_name())
        else:
            self._location = getattr(self.experiment, "url", None)
        # transformers' CometCallback.setup logs {"args": args.to_dict(), "config": model.config.to_dict()}
        # flattened by Comet ("args|learning_rate", "config|hidden_size"); log_parameters flattens the same way.
        self.experiment.log_parameters(self.hyperparameters(args, model))
        if self.log_graph and model is not None:
            self.experiment.set_model_graph(model)

    def log_location(self) -> str | None:
        """The experiment's URL, or the offline archive (``comet upload <archive>`` sends it)."""
        return self._location

    def log_metrics(self, metrics: dict[str, float | int], step: int, state: TrainerState) -> None:
        """Log ``metrics`` at ``step`` with the current epoch."""
        self.experiment.log_metrics(metrics, step=step, epoch=state.epoch)

    def finish(self, status: str) -> None:
        """Upload ``output_dir`` if asked (success only), record ``status`` and end the experiment."""
        experiment, self.experiment = self.experiment, None
        if experiment is None:
            return
        try:
            if status == "finished" and self.log_assets and self._output_dir and os.path.isdir(self._output_dir):
                experiment.log_asset_folder(self._output_dir, recursive=True)
            # Comet has no public "crashed" flag; a logged status is what the UI can filter on.
            experiment.log_other("status", status)
            if self._error is not None:
                experiment.log_other("error", self._error)
                self._error = None
        finally:
            experiment.end()

    def on_predict(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, metrics: Any = None,
        **kwargs: Any,
    ) -> Any:
        """Log the ``test/`` metrics; after training, reopen the same experiment for them and end it again."""
        self.log_prediction_metrics(args, state, metrics, kwargs)

    def on_exception(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> Any:
        """Record the error and end the experiment with status ``"failed"``."""
        error = kwargs.get("exception")
        if error is not None:
            self._error = f"{type(error).__name__}: {error}"
        super().on_exception(args, state, control, **kwargs)

    def state_dict(self) -> dict[str, Any]:
        """Return the experiment key (chosen now if the experiment has not started yet) and the last logged step."""
        self._key()
        return super().state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the experiment key so the resumed run continues the same experiment."""
        super().load_state_dict(state)
        self._continue = self.run_id is not None
