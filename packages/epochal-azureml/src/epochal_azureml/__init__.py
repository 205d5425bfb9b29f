"""AzureML integration for epochal: ``report_to="azure_ml"``.

Install with ``pip install epochal-azureml``. Each number of each log goes to
the AzureML run the training job runs in (``Run.get_context()``), under its own
key, as transformers' ``AzureMLCallback`` does::

    from epochal_core import Trainer, TrainingArguments

    args = TrainingArguments(output_dir="out", report_to="azure_ml")
    Trainer(model, args, train_dataset=data).train()

Outside an AzureML job, ``Run.get_context()`` is AzureML's offline run, which
prints each metric (``Attempted to log scalar metric loss: ...``) and stores
nothing. The SDK is ``azureml-core`` (the v1 SDK transformers uses; the
``azureml-sdk`` meta-package adds nothing the callback needs and pins numpy
below 2.3.3). It is imported only when training starts, and starts no threads,
files or network calls of its own there.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, ClassVar

from epochal_core.integrations import IntegrationCallback

if TYPE_CHECKING:
    from epochal_core.state import TrainerState
    from epochal_core.training_args import TrainingArguments

__all__ = ["AzureMLCallback"]


class AzureMLCallback(IntegrationCallback):
    """Sends logs to the current AzureML run (transformers' ``AzureMLCallback``).

    Keys are sent as they are (``loss``, ``eval_loss``: no ``train/`` prefix),
    each with ``description`` set to the key; values that are not numbers are
    dropped, with one warning per key (transformers drops them silently). The
    run belongs to the AzureML job: the callback flushes it when training ends
    but never completes or fails it. A training resumed from a checkpoint in
    the same AzureML run does not send again the steps that run already holds.

    Environment: none of its own (as transformers); the AzureML job sets the
    ``AZUREML_*`` variables ``Run.get_context()`` reads. ``report_to="all"``
    leaves it out when ``AZUREML_RUN_ID`` is not set (outside a job).

    Args:
        azureml_run: An ``azureml.core.Run`` to log to instead of ``Run.get_context()``.

    Raises:
        ImportError: At setup, when ``azureml-core`` is not installed.
    """

    name: ClassVar[str] = "azure_ml"
    package: ClassVar[str] = "epochal-azureml"
    sdk: ClassVar[str] = "azureml.core.run"
    sdk_package: ClassVar[str] = "azureml-core"
    rewrite_keys: ClassVar[bool] = False  # transformers logs AzureML keys unchanged

    def __init__(self, azureml_run: Any = None) -> None:
        super().__init__()
        #: The AzureML run logged to (set at setup unless given).
        self.azureml_run: Any = azureml_run
        self._given = azureml_run is not None

    @classmethod
    def configuration_problem(cls) -> str | None:
        """Outside an AzureML job, why ``report_to="all"`` leaves AzureML out; ``None`` inside one."""
        if os.environ.get("AZUREML_RUN_ID"):
            return None
        return (
            "not running in an AzureML job (AZUREML_RUN_ID is not set): its offline run would only print "
            "every metric. Name 'azure_ml' in report_to to log anyway."
        )

    def setup(self, args: TrainingArguments, state: TrainerState, model: Any, **kwargs: Any) -> None:
        """Take the job's run (``Run.get_context()``) unless one was given."""
        if not self._given:
            self.azureml_run = self.import_sdk().Run.get_context()
        run_id = str(self.azureml_run.id)
        if self.resuming and run_id != self.run_id:
            # A new AzureML run (another job) holds none of the steps the checkpoint's run got.
            self.skip_through_step = -1
        self.run_id = run_id

    def log_metrics(self, metrics: dict[str, float | int], step: int, state: TrainerState) -> None:
        """``run.log(key, value, description=key)`` for each metric."""
        log = self.azureml_run.log
        for key, value in metrics.items():
            log(key, value, description=key)

    def finish(self, status: str) -> None:
        """Flush what the run buffered; the AzureML job ends the run itself."""
        run = self.azureml_run
        if run is not None:
            run.flush()
        if not self._given:
            self.azureml_run = None
