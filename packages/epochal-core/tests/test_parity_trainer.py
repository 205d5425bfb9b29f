"""Trainer methods and callback behaviour a transformers script relies on: only the imports differ."""

import importlib.util
import json
import logging
import random
import re
import shutil
import sys
from unittest.mock import patch

import numpy as np
import pytest
import torch
from epochal_core import (
    ExportableState,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from epochal_core.handler import CallbackHandler
from helpers_parity import Classifier, Points, args_for
from torch import nn
from torch.utils.data import Dataset


def test_run_glue_epilogue_log_metrics_save_metrics_save_state(tmp_path, capsys):
    trainer = Trainer(Classifier(), args_for(tmp_path, max_steps=2), train_dataset=Points(seed=5),
                      eval_dataset=Points(8, seed=5))
    train_result = trainer.train()
    metrics = train_result.metrics
    metrics["train_samples"] = 16
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    eval_metrics = trainer.evaluate()
    trainer.save_metrics("eval", eval_metrics)
    printed = capsys.readouterr().out
    assert "***** train metrics *****" in printed
    runtime_line = next(line for line in printed.splitlines() if line.startswith("  train_runtime"))
    assert runtime_line.split("=")[1].strip().startswith("0:00:")  # h:mm:ss.cc, transformers' format
    assert re.search(r"^  train_samples +=  +16$", printed, re.MULTILINE)  # keys left-, values right-aligned
    out = tmp_path / "out"
    assert json.loads((out / "train_results.json").read_text())["train_samples"] == 16
    combined = json.loads((out / "all_results.json").read_text())
    assert "train_loss" in combined and "eval_loss" in combined
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2


def test_model_init_builds_a_fresh_model_for_every_train(tmp_path):
    built = []

    def model_init():
        built.append(Classifier())
        return built[-1]

    trainer = Trainer(model_init=model_init, args=args_for(tmp_path, max_steps=2), train_dataset=Points(seed=5))
    trainer.train()
    first = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    assert len(built) == 3 and trainer.model is built[-1]
    # Same seed, fresh model and optimizer: the second run ends where the first did.
    for key, value in trainer.model.state_dict().items():
        torch.testing.assert_close(value, first[key])
    with pytest.raises(ValueError, match=r"model_init=.*optimizers="):
        model = Classifier()
        Trainer(model_init=model_init, args=args_for(tmp_path), optimizers=(torch.optim.SGD(model.parameters()), None))


def test_hyperparameter_search_without_optuna_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # what Python does when optuna is not installed: import fails
    trainer = Trainer(model_init=Classifier, args=args_for(tmp_path, max_steps=1), train_dataset=Points(seed=5),
                      eval_dataset=Points(4, seed=5))
    with pytest.raises(ImportError, match="pip install optuna"):
        trainer.hyperparameter_search(direction="minimize", n_trials=2)
    with pytest.raises(ValueError, match="'optuna' only"):
        trainer.hyperparameter_search(backend="ray")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("optuna") is None, reason="optuna is not installed")
def test_hyperparameter_search_with_optuna_trains_a_fresh_model_per_trial(tmp_path):
    built = []

    def model_init(trial):
        built.append(trial)
        return Classifier()

    def hp_space(trial):
        return {"learning_rate": trial.suggest_float("learning_rate", 1e-3, 1e-1, log=True)}

    args = args_for(tmp_path, max_steps=2)
    trainer = Trainer(model_init=model_init, args=args, train_dataset=Points(seed=5), eval_dataset=Points(8, seed=5))
    best_run = trainer.hyperparameter_search(hp_space=hp_space, n_trials=3, direction="minimize")
    study = best_run.run_summary
    assert len(study.trials) == 3 and len(built) == 4 and built[0] is None  # construction, then one per trial
    assert best_run.objective == min(t.value for t in study.trials)
    assert 1e-3 <= best_run.hyperparameters["learning_rate"] <= 1e-1
    assert trainer.args is args  # the search leaves the Trainer's own arguments as they were


class MyTestTrainerCallback(TrainerCallback):
    """transformers' test callback: records nothing, exists to be added twice."""


def test_duplicate_callback_warning_names_the_callback_in_the_message():
    # transformers' test_event_flow, with the patched logger of epochal's handler.
    with patch("epochal_core.handler.logger.warning") as warn_mock:
        Trainer(Classifier(), TrainingArguments(output_dir="out", report_to="none", disable_tqdm=True),
                callbacks=[MyTestTrainerCallback, MyTestTrainerCallback])
        assert str(MyTestTrainerCallback) in warn_mock.call_args[0][0]


def test_missing_flow_callback_warning_lists_the_callbacks_in_the_message():
    with patch("epochal_core.handler.logger.warning") as warn_mock:
        CallbackHandler([MyTestTrainerCallback()])
        message = warn_mock.call_args[0][0]
    assert "DefaultFlowCallback" in message and "MyTestTrainerCallback" in message


class MyTestExportableCallback(TrainerCallback, ExportableState):
    def __init__(self, my_test_state="test"):
        self.my_test_state = my_test_state

    def state(self):
        return {"args": {"my_test_state": self.my_test_state}}


def test_stateful_callback_is_rebuilt_from_its_saved_args(tmp_path):
    args = args_for(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    Trainer(Classifier(), args, train_dataset=Points(seed=5),
            callbacks=[MyTestExportableCallback("another value")]).train()
    callback = MyTestExportableCallback()
    trainer = Trainer(Classifier(), args_for(tmp_path, max_steps=3, save_strategy="steps", save_steps=2),
                      train_dataset=Points(seed=5), callbacks=[callback])
    trainer.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    assert callback.my_test_state == "another value"


def test_model_returning_bare_logits_is_told_it_returned_no_loss(tmp_path):
    class LogitsModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 3)

        def forward(self, x, labels=None):
            return self.linear(x)

    trainer = Trainer(LogitsModel(), args_for(tmp_path, max_steps=1), train_dataset=Points(seed=5))
    with pytest.raises(ValueError, match=r"did not return a loss: forward returned a tensor of shape \(4, 3\)") as err:
        trainer.train()
    assert ".mean()" not in str(err.value)


def test_items_the_default_collator_cannot_batch_name_the_item_type_and_data_collator(tmp_path):
    class Ragged(Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return {"x": torch.ones(i + 1), "labels": torch.tensor(0)}

    trainer = Trainer(Classifier(), args_for(tmp_path, max_steps=1), train_dataset=Ragged())
    with pytest.raises(TypeError, match=r"items \(dict \{'x': Tensor, 'labels': Tensor\}\).*data_collator="):
        trainer.train()


def test_metric_for_best_model_without_compute_metrics_fails_at_construction(tmp_path):
    args = args_for(tmp_path, eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=1,
                    load_best_model_at_end=True, metric_for_best_model="accuracy")
    with pytest.raises(ValueError, match=r"metric_for_best_model='accuracy'.*compute_metrics"):
        Trainer(Classifier(), args, train_dataset=Points(seed=5), eval_dataset=Points(4, seed=5))


def _as_transformers_checkpoint(folder):
    """Rewrite an epochal checkpoint in the layout transformers' Trainer writes (files named as it names them):
    no manifest, model.safetensors, an RNG file holding numpy's state as an ndarray, training_args.bin."""
    from safetensors.torch import save_file

    (folder / "COMPLETE").unlink()
    weights = torch.load(folder / "pytorch_model.bin", weights_only=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "model.safetensors"))
    (folder / "pytorch_model.bin").unlink()
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.get_rng_state()},
               folder / "rng_state.pth")
    torch.save({"output_dir": "elsewhere"}, folder / "training_args.bin")
    (folder / "training_args.json").unlink()


def test_resume_a_checkpoint_written_by_transformers_with_one_warning(tmp_path, caplog):
    pytest.importorskip("safetensors")
    first = Trainer(Classifier(), args_for(tmp_path, max_steps=2, save_strategy="steps", save_steps=2),
                    train_dataset=Points(seed=5))
    first.train()
    source = tmp_path / "out" / "checkpoint-2"
    foreign = tmp_path / "hf" / "checkpoint-2"
    shutil.copytree(source, foreign)
    _as_transformers_checkpoint(foreign)
    saved_weights = {k: v.clone() for k, v in first.model.state_dict().items()}
    model = Classifier()
    trainer = Trainer(model, args_for(tmp_path, output_dir=str(tmp_path / "resumed"), max_steps=3),
                      train_dataset=Points(seed=5))
    loaded = {}
    trainer.add_callback(_CaptureWeights(loaded))
    with caplog.at_level(logging.WARNING, logger="epochal_core"):
        trainer.train(resume_from_checkpoint=str(foreign))
    warnings = [r.getMessage() for r in caplog.records if "not written atomically" in r.getMessage()]
    assert len(warnings) == 1 and str(foreign) in warnings[0]
    assert trainer.state.global_step == 3 and set(loaded) == set(saved_weights)
    for key, value in loaded.items():
        torch.testing.assert_close(value, saved_weights[key])
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        (foreign / "model.safetensors").unlink()
        Trainer(Classifier(), args_for(tmp_path, max_steps=3), train_dataset=Points(seed=5)).train(
            resume_from_checkpoint=str(foreign))


class _CaptureWeights(TrainerCallback):
    """Copies the model's weights when training begins (right after the resume restored them)."""

    def __init__(self, into):
        self.into = into

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.into.update({k: v.clone() for k, v in model.state_dict().items()})
