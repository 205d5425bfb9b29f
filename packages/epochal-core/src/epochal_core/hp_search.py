"""``Trainer.hyperparameter_search`` with Optuna (an optional dependency), transformers' behaviour.

Each trial sets the ``TrainingArguments`` fields its search space returns, builds a
fresh model through ``model_init``, trains, evaluates, and reports the objective.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

__all__ = ["BestRun", "default_compute_objective", "default_hp_space_optuna", "run_optuna"]


class BestRun(NamedTuple):
    """The best trial: its number, objective value, hyperparameters (and Optuna's study summary)."""

    run_id: str
    objective: float | list[float]
    hyperparameters: dict[str, Any]
    run_summary: Any = None


def default_compute_objective(metrics: Mapping[str, float]) -> float:
    """``eval_loss`` when it is the only metric, else the sum of the metrics (transformers' default)."""
    rest = dict(metrics)
    loss = rest.pop("eval_loss", None)
    rest.pop("epoch", None)
    for key in list(rest):
        if key.endswith(("_runtime", "_per_second", "_compilation_time")):
            rest.pop(key)
    return float(loss) if not rest and loss is not None else float(sum(rest.values()))


def default_hp_space_optuna(trial: Any) -> dict[str, Any]:
    """Transformers' default search space."""
    return {
        "learning_rate": trial.suggest_float("learning_rate", 1e-6, 1e-4, log=True),
        "num_train_epochs": trial.suggest_int("num_train_epochs", 1, 5),
        "seed": trial.suggest_int("seed", 1, 40),
        "per_device_train_batch_size": trial.suggest_categorical("per_device_train_batch_size", [4, 8, 16, 32, 64]),
    }


def load_optuna() -> Any:
    """Import Optuna, or explain how to install it.

    Raises:
        ImportError: Optuna is not installed.
    """
    try:
        return importlib.import_module("optuna")
    except ImportError as err:
        raise ImportError(
            "Trainer.hyperparameter_search needs Optuna, which is not installed: pip install optuna "
            "(epochal supports the 'optuna' backend only)."
        ) from err


def run_optuna(
    trainer: Any,
    hp_space: Callable[[Any], dict[str, Any]] | None,
    compute_objective: Callable[[dict[str, float]], float],
    n_trials: int,
    direction: str | list[str],
    **kwargs: Any,
) -> BestRun:
    """Run an Optuna study over ``trainer`` and return the best trial."""
    optuna = load_optuna()
    space = hp_space or default_hp_space_optuna
    base_args = trainer.args

    def objective(trial: Any) -> float:
        params = space(trial)
        unknown = [k for k in params if not hasattr(base_args, k)]
        if unknown:
            raise ValueError(f"hyperparameter_search: the search space sets unknown TrainingArguments fields {unknown}")
        trainer.args = dataclasses.replace(copy.copy(base_args), **params)
        trainer.train(trial=trial)
        metrics = trainer.evaluate()
        return compute_objective(metrics)

    study = optuna.create_study(direction=direction, **kwargs)
    try:
        study.optimize(objective, n_trials=n_trials)
    finally:
        trainer.args = base_args
    best = study.best_trial
    return BestRun(str(best.number), best.value, best.params, study)
