"""Weights & Biases integration for epochal: ``report_to="wandb"``.

Install with ``pip install epochal-wandb``::

    from epochal_core import Trainer, TrainingArguments

    args = TrainingArguments(output_dir="out", report_to=["wandb"], run_name="baseline")
    Trainer(model, args, train_dataset=data).train()

It logs what transformers' ``WandbCallback`` logs, under the same names, so runs
of both line up in one project: the config ``{**model.config, **args}`` plus
``model/num_parameters``, every log under ``train/``/``eval/``/``test/`` with
``train/global_step`` as the x-axis, and the end-of-training figures
(``train_runtime``, ``train_loss``, ...) in the run summary. ``WANDB_MODE=offline``
keeps the run on local disk. ``wandb`` is imported only when the run starts, on
world rank zero.
"""

from __future__ import annotations

import logging
import netrc
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import urlparse

from epochal_core.integrations import IntegrationCallback, args_and_model_config

if TYPE_CHECKING:
    from epochal_core.control import TrainerControl
    from epochal_core.state import TrainerState
    from epochal_core.training_args import TrainingArguments

__all__ = ["WandbCallback"]

logger = logging.getLogger(__name__)

#: ``WANDB_LOG_MODEL`` values: upload the final model, every checkpoint too, or nothing.
LOG_MODEL_MODES = ("end", "checkpoint", "false")
#: End-of-training figures transformers writes to the run summary instead of the history.
SUMMARY_KEYS = frozenset({"train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss",
                          "total_flos"})
#: The x-axis of every chart (transformers' name).
STEP_METRIC = "train/global_step"
_TRUE = frozenset({"1", "true", "yes", "on"})
_LOCAL_MODES = frozenset({"offline", "dryrun", "disabled"})


def _log_model_mode(value: str | None) -> str:
    """``WANDB_LOG_MODEL`` as one of :data:`LOG_MODEL_MODES`.

    Raises:
        ValueError: For a value that is none of them (transformers warns and uploads nothing).
    """
    mode = (value or "false").strip().lower()
    if mode in _TRUE:  # transformers' deprecated boolean form meant "end"
        logger.warning("WANDB_LOG_MODEL=%s is deprecated: use 'end' (the same) or 'checkpoint'.", value)
        return "end"
    if mode in ("0", "no", "off", ""):
        return "false"
    if mode not in LOG_MODEL_MODES:
        raise ValueError(f"WANDB_LOG_MODEL={value!r} is invalid: use one of {list(LOG_MODEL_MODES)} (or unset it).")
    return mode


def _has_api_key() -> bool:
    """Whether ``WANDB_API_KEY`` or a ``~/.netrc`` entry for the W&B host (what ``wandb login`` writes) is set."""
    if os.environ.get("WANDB_API_KEY", "").strip():
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        return bool(host) and netrc.netrc(path).authenticators(str(host)) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _num_parameters(model: Any) -> int | None:
    counter = getattr(model, "num_parameters", None)
    if callable(counter):
        return int(counter())
    parameters = getattr(model, "parameters", None)
    return sum(p.numel() for p in parameters()) if callable(parameters) else None


class WandbCallback(IntegrationCallback):
    """Sends logs to a Weights & Biases run (transformers' ``WandbCallback``).

    Environment variables (the same as transformers'): ``WANDB_PROJECT`` (default
    ``"huggingface"``), ``WANDB_LOG_MODEL`` (``"end"``: upload the final model;
    ``"checkpoint"``: every checkpoint too; ``"false"``, the default: nothing),
    ``WANDB_WATCH`` (``"gradients"``, ``"parameters"`` or ``"all"``: ``wandb.watch``
    the model; default ``"false"``). wandb reads its own (``WANDB_MODE``,
    ``WANDB_API_KEY``, ``WANDB_DIR``, ``WANDB_ENTITY``, ``WANDB_RUN_ID``, ...).

    A run started by the user (``wandb.run`` set when training starts) is logged to
    and left open; a run this callback starts is finished at the end of training,
    with exit code 1 when training crashed, and is resumed (same run id) when
    training resumes from a checkpoint.

    Raises:
        ValueError: At setup, for an invalid ``WANDB_LOG_MODEL``.
        ImportError: At setup, when ``wandb`` is not installed.

    """

    name: ClassVar[str] = "wandb"
    package: ClassVar[str] = "epochal-wandb"
    sdk: ClassVar[str] = "wandb"
    sdk_package: ClassVar[str] = "wandb"

    def __init__(self) -> None:
        # Cheap and free of side effects (no SDK import, file or network): the run starts in setup().
        super().__init__()
        #: The live ``wandb`` run between setup and finish.
        self.run: Any = None
        self._wandb: Any = None
        self._owns_run = False
        self._log_model = "false"
        self._artifact_name = ""
        self._location: str | None = None  # the run URL or offline folder, for log_location()

    @classmethod
    def configuration_problem(cls) -> str | None:
        """Why W&B would prompt for a login under ``report_to="all"``, or ``None``.

        ``WANDB_DISABLED`` (transformers v4's switch) set to a true value also skips it there.
        """
        if os.environ.get("WANDB_DISABLED", "").strip().lower() in _TRUE:
            return "W&B is disabled by WANDB_DISABLED; unset it to log to W&B."
        try:
            _log_model_mode(os.environ.get("WANDB_LOG_MODEL"))
        except ValueError as err:
            return str(err)
        if os.environ.get("WANDB_MODE", "").strip().lower() in _LOCAL_MODES or _has_api_key():
            return None
        return (
            "W&B runs online by default and no API key is configured: set WANDB_API_KEY (or run `wandb login`), "
            "or set WANDB_MODE=offline to keep runs on local disk."
        )

    # -- run lifecycle -------------------------------------------------------------------------
    def setup(self, args: TrainingArguments, state: TrainerState, model: Any, **kwargs: Any) -> None:
        """Start (or resume, or join the user's) run and log the config."""
        self._log_model = _log_model_mode(os.environ.get("WANDB_LOG_MODEL"))
        wandb = self._wandb = self.import_sdk()
        config = args_and_model_config(args, model)
        peft_config = getattr(model, "peft_config", None)
        if peft_config is not None:
            config = {"peft_config": peft_config, **config}
        self._owns_run = wandb.run is None
        if self._owns_run:
            init_args: dict[str, Any] = {"project": os.environ.get("WANDB_PROJECT") or "huggingface"}
            if args.run_name:
                init_args["name"] = args.run_name
            if self.run_id is not None:
                # A checkpoint's run (or this instance's earlier one): append to it.
                init_args.update(id=self.run_id, resume="allow")
            self.run = wandb.init(**init_args)
        else:
            self.run = wandb.run
        run = self.run
        self.run_id = run.id
        self._location = getattr(run, "url", None) or (os.path.dirname(run.dir) if getattr(run, "dir", None) else None)
        run.config.update(config, allow_val_change=True)
        num_parameters = _num_parameters(model)
        if num_parameters is not None:
            run.config.update({"model/num_parameters": num_parameters}, allow_val_change=True)
        run.define_metric(STEP_METRIC)
        run.define_metric("*", step_metric=STEP_METRIC, step_sync=True)
        if self.resuming:
            # Online, the resumed run knows the last step it holds (a crash may have logged past the checkpoint).
            last = run.summary.get(STEP_METRIC)
            if isinstance(last, (int, float)):
                self.skip_through_step = max(self.skip_through_step, int(last))
        watch = os.environ.get("WANDB_WATCH", "false").strip().lower()
        if watch in ("gradients", "parameters", "all") and model is not None:
            run.watch(model, log=watch, log_freq=max(100, state.logging_steps))
        default_name = args.run_name is None or args.run_name == args.output_dir
        self._artifact_name = f"model-{run.id if default_name else run.name}"
        if self._log_model != "false" and model is not None:
            artifact = wandb.Artifact(self._artifact_name, type="model", metadata={
                "model_config": config, "num_parameters": num_parameters, "initial_model": True,
            })
            with artifact.new_file("model_architecture.txt") as fobj:
                fobj.write(str(model))
            run.log_artifact(artifact, aliases=["base_model"])

    def log_location(self) -> str | None:
        """The run's URL, or its local folder when W&B runs offline (``wandb sync <folder>`` uploads it)."""
        return self._location

    def log_metrics(self, metrics: dict[str, float | int], step: int, state: TrainerState) -> None:
        """Log ``metrics`` with ``train/global_step``; the end-of-training figures go to the summary."""
        self._log(metrics, step)

    def log_texts(self, texts: dict[str, str], step: int, state: TrainerState) -> None:
        """Log string values in the history, like numbers."""
        self._log(texts, step)

    def _log(self, values: dict[str, Any], step: int) -> None:
        row: dict[str, Any] = {}
        for key, value in values.items():
            plain = key[6:] if key.startswith("train/") else None
            if plain in SUMMARY_KEYS:
                self.run.summary[plain] = value
            else:
                row[key] = value
        if row:
            row[STEP_METRIC] = step
            self.run.log(row)

    def log_checkpoint(self, path: str, args: TrainingArguments, state: TrainerState) -> None:
        """With ``WANDB_LOG_MODEL=checkpoint``, upload the committed checkpoint folder as a model artifact."""
        if self._log_model != "checkpoint":
            return
        artifact = self._wandb.Artifact(self._artifact_name, type="model", metadata=self._numeric_summary())
        artifact.add_dir(path)  # copied into wandb's staging area now: rotation may delete the folder later
        epoch = round(state.epoch or 0.0, 2)
        self.run.log_artifact(artifact, aliases=[f"epoch_{epoch}", f"checkpoint_global_step_{state.global_step}"])

    def _numeric_summary(self) -> dict[str, Any]:
        summary = {k: v for k, v in dict(self.run.summary).items()
                   if isinstance(v, (int, float)) and not k.startswith("_")}
        summary["model/num_parameters"] = self.run.config.get("model/num_parameters")
        return summary

    def _log_final_model(self, args: TrainingArguments, state: TrainerState, model: Any) -> None:
        # transformers builds a throwaway Trainer to call save_model (which broke several times, #34701):
        # the weights and the architecture are all it needs.
        import torch

        if args.load_best_model_at_end and args.metric_for_best_model:
            metadata: dict[str, Any] = {
                f"eval/{args.metric_for_best_model.removeprefix('eval_')}": state.best_metric,
                "train/total_floss": state.total_flos,
                "model/num_parameters": self.run.config.get("model/num_parameters"),
            }
        else:
            metadata = self._numeric_summary()
        metadata["final_model"] = True
        artifact = self._wandb.Artifact(self._artifact_name, type="model", metadata=metadata)
        with tempfile.TemporaryDirectory() as folder:
            unwrapped = getattr(model, "module", model)  # DDP
            torch.save(unwrapped.state_dict(), Path(folder) / "pytorch_model.bin")
            (Path(folder) / "model_architecture.txt").write_text(str(unwrapped), encoding="utf-8")
            artifact.add_dir(folder)
        self.run.log_artifact(artifact, aliases=["final_model"])

    def finish(self, status: str) -> None:
        """Finish a run this callback started (exit code 1 when ``status == "failed"``); leave a user's run open."""
        run, self.run = self.run, None
        if run is None or not self._owns_run:
            return
        run.finish(exit_code=1 if status == "failed" else 0)

    # -- events ------------------------------------------------------------------------------------
    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        """Upload the final model if ``WANDB_LOG_MODEL`` asks for it, then finish the run."""
        model = kwargs.get("model")
        if self.run is not None and state.is_world_process_zero and self._log_model != "false" and model is not None:
            self._log_final_model(args, state, model)
        super().on_train_end(args, state, control, **kwargs)

    def on_predict(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, metrics: Any = None,
        **kwargs: Any,
    ) -> Any:
        """Log the ``test/`` metrics; after training, reopen the same run for them and finish it again."""
        self.log_prediction_metrics(args, state, metrics, kwargs)
