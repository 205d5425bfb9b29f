"""epochal integration for ``report_to="dvclive"``: metrics, parameters and models with DVCLive.

Install with ``pip install epochal-dvclive``. Every scalar log becomes a row of
``<dir>/plots/metrics/<name>.tsv`` at ``step == state.global_step``; the training
arguments go to ``<dir>/params.yaml`` as transformers writes them (``args.to_dict()``
at the top level), with the model config under ``config``; the latest values to
``<dir>/metrics.json``. ``dir`` defaults to ``<output_dir>/dvclive``.

Example:
    ```python
    from epochal_core import Trainer, TrainingArguments
    from epochal_dvclive import DVCLiveCallback

    args = TrainingArguments(output_dir="out", report_to="none")
    trainer = Trainer(model, args, train_dataset=data, callbacks=[DVCLiveCallback(log_model=True)])
    trainer.train()  # out/dvclive/plots/metrics/loss.tsv, out/dvclive/params.yaml, ...
    ```

``report_to=["dvclive"]`` builds the callback with its defaults (``HF_DVCLIVE_LOG_MODEL`` still applies).

"""

from __future__ import annotations

import csv
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from epochal_core.integrations import IntegrationCallback, model_config

if TYPE_CHECKING:
    from collections.abc import Iterator

    from dvclive.live import Live
    from epochal_core.control import TrainerControl
    from epochal_core.state import TrainerState
    from epochal_core.training_args import TrainingArguments

__all__ = ["DVCLiveCallback"]

logger = logging.getLogger(__name__)

_TRUE_VALUES = {"1", "ON", "YES", "TRUE"}


def _yaml_safe(value: Any) -> Any:
    """Plain YAML types only: params.yaml refuses arbitrary objects (dtypes, enums, paths)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): _yaml_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_yaml_safe(v) for v in value]
    return str(value)


def _number(text: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


@contextmanager
def _no_dvc_autoinit(sdk_live: Any) -> Iterator[None]:
    """Keep ``Live()`` from running ``dvc init`` (and staging files) in a git repo that has no DVC repo."""

    def existing_repo_only() -> Any:
        from dvc.exceptions import NotDvcRepoError  # type: ignore[import-untyped]
        from dvc.repo import Repo  # type: ignore[import-untyped]
        from dvc.scm import SCMError  # type: ignore[import-untyped]

        try:
            return Repo()
        except (NotDvcRepoError, SCMError):
            return None

    original = sdk_live.get_dvc_repo
    sdk_live.get_dvc_repo = existing_repo_only
    try:
        yield
    finally:
        sdk_live.get_dvc_repo = original


class DVCLiveCallback(IntegrationCallback):
    """Sends logs, parameters and (optionally) checkpoints to `DVCLive <https://dvc.org/doc/dvclive>`_.

    Args:
        live: An existing ``dvclive.Live`` to log to. It is used as given (its ``dir``,
            ``resume``, ...), and ended on train end.
        log_model: ``True`` copies the final model (the best checkpoint with
            ``load_best_model_at_end``, else the newest one) into ``<dir>/artifacts`` at
            train end; ``"all"`` tracks every checkpoint with ``dvc add`` as it is saved.
            ``None`` reads ``HF_DVCLIVE_LOG_MODEL`` (``true``/``1``/``yes``/``on`` or ``all``).
            Both need a DVC repository; without one a warning is given once.
        **kwargs: Passed to ``dvclive.Live`` when this callback creates it. Defaults:
            ``dir=<output_dir>/dvclive``, ``dvcyaml`` next to ``dir`` (never inside it),
            ``save_dvc_exp=False``, and ``resume=True`` when training resumes from a checkpoint.

    Raises:
        TypeError: ``live`` is not a ``dvclive.Live``.
        ValueError: ``log_model`` is not ``None``, ``True``, ``False`` or ``"all"``, or both
            ``live`` and ``**kwargs`` are given.

    """

    name: ClassVar[str] = "dvclive"
    package: ClassVar[str] = "epochal-dvclive"
    sdk: ClassVar[str] = "dvclive"
    sdk_package: ClassVar[str] = "dvclive"
    # DVCLive's own naming (``eval_loss`` -> ``eval/loss``), as in transformers, not rewrite_logs.
    rewrite_keys: ClassVar[bool] = False

    def __init__(self, live: Live | None = None, log_model: bool | str | None = None, **kwargs: Any) -> None:
        super().__init__()
        if live is not None:
            sdk_live = self.import_sdk().Live
            if not isinstance(live, sdk_live):
                raise TypeError(f"DVCLiveCallback(live=...) expects a dvclive.Live, got {type(live).__name__}.")
            if kwargs:
                raise ValueError(
                    f"DVCLiveCallback got live=... and Live arguments {sorted(kwargs)}; pass one or the other."
                )
        if log_model is None:
            env = os.getenv("HF_DVCLIVE_LOG_MODEL", "FALSE")
            log_model = True if env.upper() in _TRUE_VALUES else "all" if env.lower() == "all" else False
        if log_model not in (True, False, "all"):
            raise ValueError(f"DVCLiveCallback(log_model={log_model!r}): use None, True, False or 'all'.")
        self._user_live = live
        self.live: Live | None = live
        self._log_model: bool | str = log_model
        self._live_kwargs = kwargs
        self._last_rows: dict[str, tuple[int, float | int]] = {}
        self._warned_no_repo = False
        self._last_checkpoint: str | None = None

    # -- run lifecycle -----------------------------------------------------------------
    def setup(self, args: TrainingArguments, state: TrainerState, model: Any, **kwargs: Any) -> None:
        """Create (or resume) the ``Live`` run and log the training arguments and model config."""
        dvclive = self.import_sdk()
        resuming = state.global_step > 0
        if self._user_live is not None:
            self.live = self._user_live
        else:
            options: dict[str, Any] = {
                "dir": os.path.join(args.output_dir, "dvclive"), "save_dvc_exp": False, "resume": resuming,
            }
            options.update(self._live_kwargs)
            options.setdefault("dvcyaml", os.path.join(os.path.dirname(os.fspath(options["dir"])), "dvc.yaml"))
            if options["save_dvc_exp"]:
                self.live = dvclive.Live(**options)
            else:
                with _no_dvc_autoinit(self.import_sdk("dvclive.live")):
                    self.live = dvclive.Live(**options)
        live = self._require_live()
        self.run_id = os.path.abspath(live.dir)
        self._last_rows = {}
        self._last_checkpoint = None
        if resuming:
            self._drop_rows_after(live, state.global_step)
        # transformers' DVCLiveCallback.setup: live.log_params(args.to_dict()); the model config is epochal's addition.
        params = args.to_dict()
        config = model_config(model)
        if config is not None:
            params["config"] = config
        live.log_params(_yaml_safe(params))

    def log_metrics(self, metrics: dict[str, float | int], step: int, state: TrainerState) -> None:
        """Write each metric as a row at ``step`` (``state.global_step``), then sync the summary."""
        from dvclive.utils import standardize_metric_name

        live = self._require_live()
        live.step = step
        for key, value in metrics.items():
            name = standardize_metric_name(key, "dvclive.huggingface")
            value = int(value) if isinstance(value, bool) else value
            # One row per (metric, step): "epoch" comes with the train, eval and summary logs of one step.
            if self._last_rows.get(name) == (step, value):
                continue
            live.log_metric(name, value)
            self._last_rows[name] = (step, value)
        live.sync()  # type: ignore[no-untyped-call]

    def log_checkpoint(self, path: str, args: TrainingArguments, state: TrainerState) -> None:
        """With ``log_model="all"``, track the committed checkpoint with ``dvc add``."""
        self._last_checkpoint = path
        if self._log_model == "all" and self._has_repo():
            self._require_live().log_artifact(
                path, type="model", name="checkpoint", meta={"step": state.global_step, "epoch": state.epoch},
            )

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        """With ``log_model=True``, copy the final model into ``<dir>/artifacts``; then end the run."""
        if state.is_world_process_zero and self._initialized and self._log_model is True and self._has_repo():
            found = self._final_model(args, state)
            if found is None:
                logger.warning("DVCLiveCallback(log_model=True): no checkpoint in %s to log.", args.output_dir)
            else:
                name, folder = found
                self._require_live().log_artifact(
                    str(folder), type="model", name=name, copy=True,
                    meta={"step": state.global_step, "checkpoint": folder.name},
                )
        return super().on_train_end(args, state, control, **kwargs)

    def finish(self, status: str) -> None:
        """End the run; DVCLive has no failed status, so a crash also ends it with what was logged."""
        if self.live is not None:
            self.live.end()  # type: ignore[no-untyped-call]
        if self._user_live is None:
            self.live = None

    def log_location(self) -> str | None:
        """DVCLive's folder (``metrics.json``, ``plots/metrics/*.tsv``, ``params.yaml``; see ``dvc plots show``)."""
        return self.run_id

    # -- helpers -------------------------------------------------------------------------
    def _require_live(self) -> Live:
        if self.live is None:
            raise RuntimeError("DVCLiveCallback: the Live run is not set up (setup() was not called).")
        return self.live

    def _has_repo(self) -> bool:
        # dvclive's log_artifact skips with a warning per call without a repo; warn once instead.
        if getattr(self.live, "_dvc_repo", None) is not None:
            return True
        if not self._warned_no_repo:
            self._warned_no_repo = True
            logger.warning(
                "DVCLiveCallback(log_model=%r): no DVC repository here, models are not logged. "
                "Run `dvc init` in the project first.", self._log_model,
            )
        return False

    def _final_model(self, args: TrainingArguments, state: TrainerState) -> tuple[str, Path] | None:
        """``("best", folder)`` with ``load_best_model_at_end``, else ``("last", newest checkpoint)``."""
        best = state.best_model_checkpoint
        if args.load_best_model_at_end and best and Path(best).is_dir():
            return "best", Path(best)
        if self._last_checkpoint is not None and Path(self._last_checkpoint).is_dir():
            return "last", Path(self._last_checkpoint)
        from epochal_core.checkpoint import latest_checkpoint  # imports torch: only when needed

        newest = latest_checkpoint(args.output_dir)
        return ("last", newest) if newest is not None else None

    @staticmethod
    def _drop_rows_after(live: Live, step: int) -> None:
        """Drop rows past the resumed ``step`` (they are logged again) and rebuild the summary."""
        root = Path(live.plots_dir) / "metrics"
        summary: dict[str, Any] = {}
        for tsv in sorted(root.rglob("*.tsv")) if root.is_dir() else []:
            with tsv.open(encoding="utf-8", newline="") as fobj:
                reader = csv.DictReader(fobj, delimiter="\t")
                fields = list(reader.fieldnames or [])
                rows = list(reader)
            kept = [row for row in rows if int(row["step"]) <= step]
            if not kept:
                tsv.unlink()
                continue
            if len(kept) != len(rows):
                with tsv.open("w", encoding="utf-8", newline="") as fobj:
                    writer = csv.DictWriter(fobj, fields, delimiter="\t", lineterminator=os.linesep)
                    writer.writeheader()
                    writer.writerows(kept)
            *parents, leaf = tsv.relative_to(root).with_suffix("").parts
            node = summary
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = _number(kept[-1][fields[-1]])
        live.summary = {**summary, "step": step}
        live.step = step
        live.make_summary()  # type: ignore[no-untyped-call]
