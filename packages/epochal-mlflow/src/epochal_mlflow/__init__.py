"""MLflow integration for epochal: ``report_to="mlflow"``.

Install with ``pip install epochal-mlflow``::

    from epochal_core import Trainer, TrainingArguments

    args = TrainingArguments(output_dir="out", report_to=["mlflow"], run_name="baseline")
    Trainer(model, args, train_dataset=data).train()   # MLFLOW_TRACKING_URI picks the store

It logs what transformers' ``MLflowCallback`` logs, under the same names: the
parameters ``{**model.config, **args}``, every log's numbers under their own keys
(``loss``, ``eval_loss``: MLflow's keys are not rewritten) at ``step=global_step``,
and the tags of ``MLFLOW_TAGS``. Where transformers fails, this one does not: a
crashed training ends its run as ``FAILED``; ``MLFLOW_RUN_ID`` reattaches to that
run; long or many parameters are sent in batches within MLflow's limits; a
training resumed from a checkpoint continues its run. ``mlflow`` is imported
only when the run starts, on world rank zero.

Everything goes through ``MlflowClient`` with the run id, not through MLflow's
"active run": that one is per thread, and epochal runs integrations on a
background thread.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from typing import TYPE_CHECKING, Any, ClassVar

from epochal_core.integrations import IntegrationCallback, args_and_model_config, env_flag, flatten_params

if TYPE_CHECKING:
    from epochal_core.control import TrainerControl
    from epochal_core.state import TrainerState
    from epochal_core.training_args import TrainingArguments

__all__ = ["MLflowCallback"]

logger = logging.getLogger(__name__)

#: Characters MLflow accepts in a metric or parameter name; others become ``_`` (as transformers v5 does).
_INVALID_NAME_CHARS = re.compile(r"[^0-9A-Za-z_\-. :/]")


def sanitize_name(key: str) -> str:
    """``key`` with the characters MLflow rejects in names replaced by ``_``."""
    return _INVALID_NAME_CHARS.sub("_", key)


class MLflowCallback(IntegrationCallback):
    """Sends logs to an MLflow run (transformers' ``MLflowCallback``).

    Environment variables (the same as transformers'): ``MLFLOW_TRACKING_URI``,
    ``MLFLOW_EXPERIMENT_NAME`` (created if missing), ``MLFLOW_RUN_ID`` (log to that
    existing run), ``MLFLOW_NESTED_RUN`` (start a child of the user's active run),
    ``MLFLOW_TAGS`` (a JSON object of tags), ``MLFLOW_FLATTEN_PARAMS`` (flatten nested
    parameters as ``a.b``), ``MLFLOW_MAX_LOG_PARAMS`` (log only the first N),
    ``HF_MLFLOW_LOG_ARTIFACTS`` (upload each checkpoint folder) and
    ``DISABLE_MLFLOW_INTEGRATION=TRUE`` (skipped under ``report_to="all"``).

    The run: the checkpoint's when training resumes; else ``MLFLOW_RUN_ID``'s; else
    the run the user started (``mlflow.start_run()`` before the Trainer was built),
    logged to and left open; else a new run named ``run_name``. A run this callback
    started or reopened ends ``FINISHED``, or ``FAILED`` when training crashed.

    Args:
        tracking_uri: Tracking store (default: ``MLFLOW_TRACKING_URI``, else MLflow's default).

    Raises:
        ValueError: At setup, for invalid ``MLFLOW_TAGS`` or ``MLFLOW_MAX_LOG_PARAMS``.
        ImportError: At setup, when ``mlflow`` is not installed.

    """

    name: ClassVar[str] = "mlflow"
    package: ClassVar[str] = "epochal-mlflow"
    sdk: ClassVar[str] = "mlflow"
    sdk_package: ClassVar[str] = "mlflow"
    #: transformers sends MLflow the Trainer's own keys (``loss``, ``eval_loss``), not ``train/loss``.
    rewrite_keys: ClassVar[bool] = False

    def __init__(self, tracking_uri: str | None = None) -> None:
        # Cheap and free of side effects (no SDK import, file or network): the run starts in setup().
        super().__init__()
        self.tracking_uri = tracking_uri
        #: The ``MlflowClient`` between setup and finish.
        self.client: Any = None
        self._owns_run = False
        self._user_run_id: str | None = None
        self._pending: list[Any] = []  # metrics buffered until the reporter's batch ends
        self._log_artifacts = False
        self._metric_names: dict[str, str] = {}  # log key -> sanitized metric name, computed once per key

    @classmethod
    def configuration_problem(cls) -> str | None:
        """``DISABLE_MLFLOW_INTEGRATION=TRUE`` skips MLflow under ``report_to="all"``; it needs no login."""
        if os.environ.get("DISABLE_MLFLOW_INTEGRATION", "FALSE").strip().upper() == "TRUE":
            return "MLflow is disabled by DISABLE_MLFLOW_INTEGRATION=TRUE; unset it to log to MLflow."
        return None

    # -- run lifecycle -------------------------------------------------------------------------
    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        """Note the user's active MLflow run, if they imported mlflow and started one (no import here)."""
        # MLflow's active run belongs to the thread that started it: this event runs on the training thread.
        mlflow = sys.modules.get("mlflow")
        active = mlflow.active_run() if mlflow is not None and hasattr(mlflow, "active_run") else None
        self._user_run_id = active.info.run_id if active is not None else None

    def setup(self, args: TrainingArguments, state: TrainerState, model: Any, **kwargs: Any) -> None:
        """Open the run (see the class docstring for which) and log parameters and tags."""
        tags = self._env_tags()
        max_params = self._env_max_params()
        self._log_artifacts = env_flag("HF_MLFLOW_LOG_ARTIFACTS")
        self.import_sdk()
        from mlflow.tracking import MlflowClient

        self.client = client = MlflowClient(tracking_uri=self.tracking_uri)
        self._pending = []
        env_run_id = os.environ.get("MLFLOW_RUN_ID") or None
        nested = env_flag("MLFLOW_NESTED_RUN")
        if self.run_id is not None and (self.resuming or self._owns_run):
            self._reopen(self.run_id)  # the checkpoint's run, or this instance's earlier one
        elif env_run_id is not None:
            self._reopen(env_run_id)
        elif self._user_run_id is not None and not nested:
            self.run_id, self._owns_run = self._user_run_id, False
        else:
            run_tags = {"mlflow.runName": args.run_name} if args.run_name else {}
            if nested and self._user_run_id is not None:
                run_tags["mlflow.parentRunId"] = self._user_run_id
            run = client.create_run(self._experiment_id(), run_name=args.run_name, tags=run_tags)
            self.run_id, self._owns_run = run.info.run_id, True
        if self.resuming:
            self.skip_through_step = max(self.skip_through_step, self._last_logged_step())
        self._log_params(args_and_model_config(args, model), max_params)
        if tags:
            from mlflow.entities import RunTag

            client.log_batch(str(self.run_id), tags=[RunTag(str(k), str(v)) for k, v in tags.items()])

    def _reopen(self, run_id: str) -> None:
        # get_run raises a clear MlflowException (RESOURCE_DOES_NOT_EXIST) for an unknown id.
        self.client.get_run(run_id)
        self.client.update_run(run_id, status="RUNNING")
        self.run_id, self._owns_run = run_id, True

    def _experiment_id(self) -> str:
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME")
        if name:
            experiment = self.client.get_experiment_by_name(name)
            return str(experiment.experiment_id if experiment is not None else self.client.create_experiment(name))
        return os.environ.get("MLFLOW_EXPERIMENT_ID") or "0"  # MLflow's "Default" experiment

    def _last_logged_step(self) -> int:
        """The highest step of any metric the run holds (a crash may have logged past its checkpoint)."""
        run = self.client.get_run(self.run_id)
        steps = [m.step for key in run.data.metrics for m in self.client.get_metric_history(self.run_id, key)]
        return max(steps, default=-1)

    @staticmethod
    def _env_tags() -> dict[str, Any]:
        raw = os.environ.get("MLFLOW_TAGS")
        if not raw:
            return {}
        try:
            tags = json.loads(raw)
        except json.JSONDecodeError as err:
            raise ValueError(f"MLFLOW_TAGS={raw!r} is not JSON: set it to an object like '{{\"team\": \"nlp\"}}'.") \
                from err
        if not isinstance(tags, dict):
            raise ValueError(f"MLFLOW_TAGS={raw!r} must be a JSON object like '{{\"team\": \"nlp\"}}'.")
        return tags

    @staticmethod
    def _env_max_params() -> int | None:
        raw = os.environ.get("MLFLOW_MAX_LOG_PARAMS", "").strip()
        if not raw:
            return None
        if not raw.isdigit():
            raise ValueError(f"MLFLOW_MAX_LOG_PARAMS={raw!r} must be a whole number of parameters (or unset).")
        return int(raw)

    def _log_params(self, params: dict[str, Any], max_params: int | None) -> None:
        """Log ``params`` in batches within MLflow's limits: long values truncated, existing ones kept."""
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        run_id = str(self.run_id)

        if env_flag("MLFLOW_FLATTEN_PARAMS"):
            params = flatten_params(params, sep=".")
        items = list(params.items())[:max_params] if max_params is not None else list(params.items())
        # MLflow refuses to change a logged parameter: a reopened run keeps its values (and says which differ).
        existing = self.client.get_run(run_id).data.params
        batch: list[Any] = []
        truncated: list[str] = []
        changed: list[str] = []
        for key, value in items:
            name, text = sanitize_name(str(key)), str(value)
            if len(text) > MAX_PARAM_VAL_LENGTH:
                text = text[:MAX_PARAM_VAL_LENGTH]
                truncated.append(name)
            if name in existing:
                if existing[name] != text:
                    changed.append(name)
                continue
            batch.append(Param(name, text))
        if truncated:
            logger.warning("MLflowCallback: parameter values longer than MLflow's %d characters were truncated: %s.",
                           MAX_PARAM_VAL_LENGTH, ", ".join(truncated))
        if changed:
            logger.warning("MLflowCallback: run %s already has other values for %s; MLflow keeps the first ones.",
                           run_id, ", ".join(changed))
        for start in range(0, len(batch), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(run_id, params=batch[start:start + MAX_PARAMS_TAGS_PER_BATCH])

    def log_metrics(self, metrics: dict[str, float | int], step: int, state: TrainerState) -> None:
        """Buffer ``metrics`` at ``step``; :meth:`end_batch` sends them in one request."""
        from mlflow.entities import Metric

        stamp = int((self.event_time or time.time()) * 1000)
        names = self._metric_names
        for key, value in metrics.items():
            name = names.get(key)
            if name is None:
                name = sanitize_name(key)
                if len(names) < 1024:  # bounded: a run that invents keys must not grow it forever
                    names[key] = name
            self._pending.append(Metric(name, float(value), stamp, step))

    def end_batch(self) -> None:
        """Send the buffered metrics in batches of MLflow's largest size."""
        if not self._pending or self.client is None:
            return
        from mlflow.utils.validation import MAX_METRICS_PER_BATCH

        pending, self._pending = self._pending, []
        for start in range(0, len(pending), MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=pending[start:start + MAX_METRICS_PER_BATCH])

    def log_checkpoint(self, path: str, args: TrainingArguments, state: TrainerState) -> None:
        """With ``HF_MLFLOW_LOG_ARTIFACTS``, upload the committed checkpoint folder under its own name."""
        self.end_batch()
        if self._log_artifacts:
            self.client.log_artifacts(self.run_id, path, artifact_path=os.path.basename(path))

    def finish(self, status: str) -> None:
        """Send what is buffered, then end a run this callback started or reopened as FINISHED or FAILED."""
        client = self.client
        if client is None:
            return
        try:
            self.end_batch()
        finally:
            self.client = None
            if self._owns_run and self.run_id is not None:
                client.set_terminated(self.run_id, status="FAILED" if status == "failed" else "FINISHED")
