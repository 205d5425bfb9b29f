"""CodeCarbon integration for epochal: ``report_to="codecarbon"``.

Install with ``pip install epochal-codecarbon``. The energy used and CO2
emitted by the whole training run are tracked and written to CodeCarbon's
``emissions.csv``, by world rank zero only (one row per training run)::

    from epochal_core import Trainer, TrainingArguments

    args = TrainingArguments(output_dir="out", report_to="codecarbon")
    Trainer(model, args, train_dataset=data).train()     # writes out/emissions.csv

Where transformers differs, and why: transformers' callback uses CodeCarbon's
online ``EmissionsTracker``, which looks the machine's country up over the
network (geojs.io, ipinfo.io, then three cloud metadata addresses) every run.
epochal always uses the ``OfflineEmissionsTracker``: set the country with
``country_iso_code`` or ``CODECARBON_COUNTRY_ISO_CODE`` (CodeCarbon uses the
world average without one). transformers tracks on every node's local rank
zero; epochal tracks once per job (world rank zero), so multi-node runs measure
one machine, not the sum. CodeCarbon's own configuration (``CODECARBON_*``
variables, ``.codecarbon.config`` files) applies as usual.

``codecarbon`` is imported only when training starts. It neither reseeds random
generators nor installs signal handlers; it measures from two timer threads,
which ``stop()`` ends.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, ClassVar

from epochal_core.callback import TrainerCallback
from epochal_core.integrations import IntegrationCallback

if TYPE_CHECKING:
    from epochal_core.state import TrainerState
    from epochal_core.training_args import TrainingArguments

__all__ = ["CodeCarbonCallback"]


class CodeCarbonCallback(IntegrationCallback):
    """Tracks the run's emissions with CodeCarbon's offline tracker (transformers' ``CodeCarbonCallback``).

    The tracker starts with training and stops when it ends, or when it
    crashes (the emissions up to the crash are written then).

    Args:
        output_dir: Folder of ``emissions.csv`` (created if missing); default
            CodeCarbon's configured ``output_dir`` (``CODECARBON_OUTPUT_DIR``),
            else ``TrainingArguments.output_dir`` (as transformers).
        country_iso_code: Three-letter country code of the machine's grid
            (``"FRA"``); default ``CODECARBON_COUNTRY_ISO_CODE``.
        project_name: CodeCarbon's ``project_name`` column; default CodeCarbon's.
        tracker_kwargs: More keyword arguments for ``codecarbon.OfflineEmissionsTracker``.

    Raises:
        ImportError: At setup, when ``codecarbon`` is not installed.
        RuntimeError: When training ends, if CodeCarbon measured nothing (it
            swallows its own errors; its log says why).
    """

    name: ClassVar[str] = "codecarbon"
    package: ClassVar[str] = "epochal-codecarbon"
    sdk: ClassVar[str] = "codecarbon"
    sdk_package: ClassVar[str] = "codecarbon"
    # Logs and checkpoints mean nothing to an emissions tracker: not dispatched at all.
    on_log = TrainerCallback.on_log  # type: ignore[assignment]
    on_save = TrainerCallback.on_save

    def __init__(
        self,
        output_dir: str | os.PathLike[str] | None = None,
        country_iso_code: str | None = None,
        project_name: str | None = None,
        tracker_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.output_dir = output_dir
        self.country_iso_code = country_iso_code
        self.project_name = project_name
        self.tracker_kwargs = dict(tracker_kwargs or {})
        #: The running ``OfflineEmissionsTracker`` between setup and finish.
        self.tracker: Any = None
        #: Where the last run's ``emissions.csv`` went.
        self.emissions_file: str | None = None
        #: Kilograms of CO2-equivalent the last run emitted (``None`` until it ends).
        self.emissions_kg: float | None = None

    def setup(self, args: TrainingArguments, state: TrainerState, model: Any, **kwargs: Any) -> None:
        """Start an offline tracker writing to the resolved output folder."""
        codecarbon = self.import_sdk()
        from codecarbon.core.config import get_hierarchical_config

        configured = get_hierarchical_config()  # type: ignore[no-untyped-call]
        tracker_kwargs = dict(self.tracker_kwargs)
        output_dir = self.output_dir or configured.get("output_dir") or args.output_dir
        # The offline tracker swallows a missing folder (and then measures nothing): create it here.
        os.makedirs(output_dir, exist_ok=True)
        tracker_kwargs.setdefault("output_dir", os.fspath(output_dir))
        if self.country_iso_code is not None:
            tracker_kwargs.setdefault("country_iso_code", self.country_iso_code)
        if self.project_name is not None:
            tracker_kwargs.setdefault("project_name", self.project_name)
        output_file = tracker_kwargs.get("output_file") or configured.get("output_file") or "emissions.csv"
        self.emissions_file = os.path.join(tracker_kwargs["output_dir"], output_file)
        self.emissions_kg = None
        self.tracker = codecarbon.OfflineEmissionsTracker(**tracker_kwargs)
        self.tracker.start()

    def log_metrics(self, metrics: dict[str, float | int], step: int, state: TrainerState) -> None:
        """Nothing: CodeCarbon records energy, not training metrics."""

    def finish(self, status: str) -> None:
        """Stop the tracker, which writes the run's row to ``emissions.csv``."""
        tracker, self.tracker = self.tracker, None
        if tracker is None:
            return
        self.emissions_kg = tracker.stop()
        if self.emissions_kg is None:
            raise RuntimeError(
                f"CodeCarbon measured nothing and wrote no row to {self.emissions_file!r}: its tracker failed "
                "(it logs why under the 'codecarbon' logger; set CODECARBON_LOG_LEVEL=warning to see it)."
            )
