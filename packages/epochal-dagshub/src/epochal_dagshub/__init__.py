"""DagsHub integration for epochal: ``report_to="dagshub"``.

Install with ``pip install epochal-dagshub``::

    import dagshub
    from epochal_core import Trainer, TrainingArguments

    dagshub.init(repo_owner="alice", repo_name="my-repo", mlflow=True)  # sets MLFLOW_TRACKING_URI
    args = TrainingArguments(output_dir="out", report_to=["dagshub"])
    Trainer(model, args, train_dataset=data).train()

DagsHub's experiment tracking is an MLflow server, so :class:`DagsHubCallback` is
:class:`epochal_mlflow.MLflowCallback` (this package depends on ``epochal-mlflow``)
plus the DagsHub repository that ``MLFLOW_TRACKING_URI`` names: with
``HF_DAGSHUB_LOG_ARTIFACTS`` it uploads ``output_dir`` there when training ends.
``dagshub`` is imported only when the run starts, on world rank zero.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import urlparse

from epochal_core.integrations import env_flag
from epochal_mlflow import MLflowCallback

if TYPE_CHECKING:
    from epochal_core.control import TrainerControl
    from epochal_core.state import TrainerState
    from epochal_core.training_args import TrainingArguments

__all__ = ["DagsHubCallback"]

#: Folder of the repository that ``HF_DAGSHUB_LOG_ARTIFACTS`` uploads ``output_dir`` into (transformers' name).
ARTIFACTS_DIR = "artifacts"


def repository_of(tracking_uri: str) -> tuple[str, str]:
    """``(owner, name)`` of the DagsHub repository a tracking URI points to.

    ``https://dagshub.com/alice/my-repo.mlflow`` gives ``("alice", "my-repo")``: the
    last two parts of the URI's path, the name cut at its first dot (as transformers
    does, but from the URL's path rather than split on ``os.sep``).

    Raises:
        RuntimeError: The URI's path has fewer than two parts.
    """
    parts = [part for part in urlparse(tracking_uri).path.split("/") if part]
    if len(parts) < 2 or not parts[-1].split(".")[0]:
        raise RuntimeError(
            f"DagsHubCallback cannot tell the repository from MLFLOW_TRACKING_URI={tracking_uri!r}: it must end in "
            "/<owner>/<repo>.mlflow, as `dagshub.init(repo_owner=..., repo_name=..., mlflow=True)` sets it."
        )
    return parts[-2], parts[-1].split(".")[0]


def _token_cache() -> Path:
    # dagshub's own default (appdirs.user_cache_dir("dagshub")), without importing it.
    override = os.environ.get("DAGSHUB_CLIENT_TOKENS_CACHE")
    if override:
        return Path(override)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "dagshub" / "tokens"


def _missing_configuration(tracking_uri: str | None, token_cache: Path) -> list[str]:
    """What DagsHub lacks to start without a browser login, each with how to set it."""
    missing = []
    if not tracking_uri:
        missing.append("the repository: set MLFLOW_TRACKING_URI=https://dagshub.com/<owner>/<repo>.mlflow "
                       "(or call dagshub.init(repo_owner=..., repo_name=..., mlflow=True))")
    has_password = os.environ.get("DAGSHUB_USERNAME") and os.environ.get("DAGSHUB_PASSWORD")
    if not (os.environ.get("DAGSHUB_USER_TOKEN") or has_password or token_cache.is_file()):
        missing.append("a token: set DAGSHUB_USER_TOKEN (or run `dagshub login`); without one dagshub "
                       "starts a browser login")
    return missing


class DagsHubCallback(MLflowCallback):
    """Logs to DagsHub's MLflow server and uploads artifacts to the repository (transformers' ``DagsHubCallback``).

    Everything :class:`~epochal_mlflow.MLflowCallback` does and honours, plus the
    environment variables of transformers' callback: ``MLFLOW_TRACKING_URI``
    (required: the repository is read from it), ``HF_DAGSHUB_LOG_ARTIFACTS`` (upload
    ``output_dir`` to the repository's ``artifacts/`` when training ends), ``BRANCH``
    (default ``"main"``) and ``HF_DAGSHUB_MODEL_NAME`` (kept as :attr:`model_name`;
    transformers does not use it either). dagshub reads its own
    (``DAGSHUB_USER_TOKEN``, ``DAGSHUB_CLIENT_HOST``, ...).

    Args:
        tracking_uri: DagsHub's MLflow URI (default: ``MLFLOW_TRACKING_URI``).

    Raises:
        RuntimeError: At setup, when the repository or a token is not configured
            (the message says which, and how to set it).
        ImportError: At setup, when ``dagshub`` is not installed.

    """

    name: ClassVar[str] = "dagshub"
    package: ClassVar[str] = "epochal-dagshub"
    sdk: ClassVar[str] = "dagshub"
    sdk_package: ClassVar[str] = "dagshub"

    def __init__(self, tracking_uri: str | None = None) -> None:
        super().__init__(tracking_uri=tracking_uri)
        #: The ``dagshub.upload.Repo`` between setup and finish.
        self.repo: Any = None
        self.model_name = "main"
        self._upload_artifacts = False

    @classmethod
    def configuration_problem(cls) -> str | None:
        """What DagsHub lacks to start without a browser login under ``report_to="all"``, or ``None``."""
        missing = _missing_configuration(os.environ.get("MLFLOW_TRACKING_URI"), _token_cache())
        return f"DagsHub needs {' and '.join(missing)}." if missing else None

    def setup(self, args: TrainingArguments, state: TrainerState, model: Any, **kwargs: Any) -> None:
        """Check the configuration, bind the repository, then start the MLflow run."""
        tracking_uri = self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        # The checks come before the SDK: without a token, dagshub.upload.Repo() starts a browser login.
        missing = _missing_configuration(tracking_uri, _token_cache())
        if missing or tracking_uri is None:
            raise RuntimeError(f"DagsHubCallback needs {' and '.join(missing)}.")
        owner, repo_name = repository_of(tracking_uri)
        self.import_sdk()
        from dagshub.upload.wrapper import Repo

        self._upload_artifacts = env_flag("HF_DAGSHUB_LOG_ARTIFACTS")
        self.model_name = os.environ.get("HF_DAGSHUB_MODEL_NAME") or "main"
        self.repo = Repo(owner=owner, name=repo_name, branch=os.environ.get("BRANCH") or "main",
                         token=os.environ.get("DAGSHUB_USER_TOKEN") or None)
        super().setup(args, state, model, **kwargs)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        """Upload ``output_dir`` to the repository if ``HF_DAGSHUB_LOG_ARTIFACTS`` asks, then end the MLflow run."""
        # transformers replaces MLflow's on_train_end here, so its run is never ended; this one ends it.
        try:
            if self.repo is not None and state.is_world_process_zero and self._upload_artifacts:
                self.repo.directory(ARTIFACTS_DIR).add_dir(args.output_dir)
        finally:
            super().on_train_end(args, state, control, **kwargs)
