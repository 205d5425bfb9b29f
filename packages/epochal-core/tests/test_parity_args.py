"""TrainingArguments fields a transformers script sets: only the import line differs from transformers."""

import logging
import math

import pytest
import torch
from epochal_core import Trainer, TrainingArguments
from epochal_core import args_fields as fields_module
from epochal_core.schedules import get_scheduler
from helpers_parity import Classifier, Points, args_for
from torch import nn
from torch.utils.data import Dataset


@pytest.mark.parametrize(("field", "alternative"), [
    ("evaluation_strategy", "eval_strategy"),
    ("deepspeed", "torchrun"),
    ("no_cuda", "use_cpu=True"),
    ("logging_nan_inf_filter", "nonfinite_policy"),
])
def test_transformers_field_epochal_lacks_names_the_alternative(field, alternative):
    with pytest.raises(TypeError, match=rf"TrainingArguments\.{field} is a transformers field.*{alternative}"):
        TrainingArguments(output_dir="out", **{field: "steps"})


def test_misspelt_field_suggests_the_right_one():
    with pytest.raises(TypeError, match=r"unknown field 'learning_rat'\. Did you mean 'learning_rate'\?"):
        TrainingArguments(output_dir="out", learning_rat=1e-3)


def test_wrong_type_names_the_field():
    with pytest.raises(TypeError, match=r"TrainingArguments\.learning_rate='5e-5' is invalid: it must be float.*5e-05"):
        TrainingArguments(output_dir="out", learning_rate="5e-5")
    with pytest.raises(TypeError, match=r"TrainingArguments\.fp16='yes'.*must be bool"):
        TrainingArguments(output_dir="out", fp16="yes")


def test_no_effect_fields_are_accepted_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(fields_module, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="epochal_core"):
        for _ in range(2):
            args = TrainingArguments(output_dir="out", overwrite_output_dir=True, do_train=True, do_eval=True,
                                     push_to_hub=False, hub_model_id=None)
    warned = [r.getMessage() for r in caplog.records if "has no effect" in r.getMessage()]
    assert sorted(m.split("=")[0].split(".")[1].split(" ")[0] for m in warned) == [
        "do_eval", "do_train", "overwrite_output_dir"
    ]
    assert args.overwrite_output_dir is True and args.to_dict()["do_train"] is True


@pytest.mark.parametrize(("optim", "optim_args", "expected"), [
    ("adamw_torch", None, torch.optim.AdamW),
    ("adamw_torch_fused", None, torch.optim.AdamW),
    ("adafactor", None, getattr(torch.optim, "Adafactor", None)),
    ("sgd", "momentum=0.9,nesterov=True", torch.optim.SGD),
    ("adagrad", None, torch.optim.Adagrad),
    ("rmsprop", "alpha=0.95", torch.optim.RMSprop),
])
def test_optim_builds_that_optimizer_and_trains(tmp_path, optim, optim_args, expected):
    if expected is None:
        pytest.skip("this torch has no torch.optim.Adafactor")
    model = Classifier()
    before = model.linear.weight.detach().clone()
    trainer = Trainer(model, args_for(tmp_path, optim=optim, optim_args=optim_args, max_steps=2, learning_rate=0.1),
                      train_dataset=Points())
    trainer.train()
    assert type(trainer.optimizer) is expected
    assert not torch.equal(before, model.linear.weight)
    if optim == "sgd":
        group = trainer.optimizer.param_groups[0]
        assert group["momentum"] == 0.9 and group["nesterov"] is True
    if optim == "adamw_torch_fused":
        assert trainer.optimizer.defaults["fused"] is True


def _lrs(name, total=10, warmup=2, **kwargs):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total,
                          scheduler_specific_kwargs=kwargs)
    values = []
    for _ in range(total):
        values.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return values


def test_schedules_follow_transformers_formulas():
    # transformers' values, written out from optimization.py's definitions.
    restarts = _lrs("cosine_with_restarts", num_cycles=2)
    assert restarts[:2] == [0.0, 0.5] and restarts[2] == 1.0
    assert math.isclose(restarts[6], 1.0)  # progress 0.5 with two cycles: the second cycle starts
    poly = _lrs("polynomial", lr_end=0.1, power=2.0)
    assert math.isclose(poly[6], (1.0 - 0.1) * (1 - 4 / 8) ** 2 + 0.1)
    min_lr = _lrs("cosine_with_min_lr", min_lr=0.2)
    assert min(min_lr[2:]) >= 0.2 and math.isclose(min_lr[6], 0.2 + 0.8 * 0.5)
    wsd = _lrs("warmup_stable_decay", num_decay_steps=4, decay_type="linear")
    assert wsd[2:6] == [1.0] * 4 and math.isclose(wsd[7], 0.75) and math.isclose(wsd[9], 0.25)
    inv = _lrs("inverse_sqrt", timescale=4)
    assert math.isclose(inv[6], 1 / math.sqrt((6 + 4 - 2) / 4))
    with pytest.raises(ValueError, match="num_decay_steps is required"):
        _lrs("warmup_stable_decay")
    with pytest.raises(ValueError, match=r"unknown keyword\(s\) \['cycles'\]"):
        _lrs("cosine", cycles=3)


def test_lr_scheduler_kwargs_reach_the_schedule(tmp_path):
    trainer = Trainer(Classifier(), args_for(
        tmp_path, max_steps=8, learning_rate=0.1, lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr": 0.05}, logging_steps=1,
    ), train_dataset=Points(32))
    trainer.train()
    rates = [entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry]
    assert len(rates) == 8 and min(rates) >= 0.05 - 1e-12 and rates[0] == pytest.approx(0.1)


class ConstantScore:
    """compute_metrics that never improves, so a plateau schedule must lower the rate."""

    def __call__(self, eval_pred):
        return {"score": 1.0}


def test_reduce_lr_on_plateau_steps_on_the_eval_metric(tmp_path):
    trainer = Trainer(Classifier(), args_for(
        tmp_path, max_steps=4, learning_rate=0.1, eval_strategy="steps", eval_steps=1,
        lr_scheduler_type="reduce_lr_on_plateau", lr_scheduler_kwargs={"patience": 0, "factor": 0.5},
        metric_for_best_model="score",
    ), train_dataset=Points(), eval_dataset=Points(4), compute_metrics=ConstantScore())
    trainer.train()
    # Four evaluations: the first sets the best, the three others do not improve.
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)


def test_reduce_lr_on_plateau_passed_through_optimizers(tmp_path):
    model = Classifier()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=0, factor=0.5)
    trainer = Trainer(model, args_for(
        tmp_path, max_steps=3, eval_strategy="steps", eval_steps=1, metric_for_best_model="score",
    ), train_dataset=Points(), eval_dataset=Points(4), compute_metrics=ConstantScore(),
        optimizers=(optimizer, plateau))
    trainer.train()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**2)


def test_label_smoothing_factor_smooths_train_and_eval_loss(tmp_path):
    data = Points(8)
    trainer = Trainer(Classifier(), args_for(tmp_path, label_smoothing_factor=0.1, max_steps=1),
                      eval_dataset=data, train_dataset=data)
    metrics = trainer.evaluate()
    with torch.no_grad():
        logits = trainer.model(data.x)["logits"]
    smoothed = nn.functional.cross_entropy(logits, data.y, label_smoothing=0.1).item()
    plain = nn.functional.cross_entropy(logits, data.y).item()
    assert metrics["eval_loss"] == pytest.approx(smoothed, rel=1e-5) and smoothed != pytest.approx(plain)


def test_dataloader_worker_fields_reach_the_dataloader(tmp_path):
    trainer = Trainer(Classifier(), args_for(
        tmp_path, dataloader_num_workers=1, dataloader_persistent_workers=True, dataloader_prefetch_factor=4,
    ), train_dataset=Points())
    loader = trainer.get_train_dataloader()
    assert loader.persistent_workers is True and loader.prefetch_factor == 4


class TokenModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 2)

    def forward(self, input_ids, labels=None):
        return {"loss": self.embed(input_ids).pow(2).mean()}


class Tokens(Dataset):
    def __len__(self):
        return 12

    def __getitem__(self, i):
        return {"input_ids": torch.arange(5) % 10, "labels": torch.tensor(0)}


def test_include_num_input_tokens_seen_counts_tokens_and_num_tokens(tmp_path):
    trainer = Trainer(TokenModel(), args_for(tmp_path, include_num_input_tokens_seen=True, num_train_epochs=1),
                      train_dataset=Tokens())
    trainer.train()
    assert trainer.state.num_input_tokens_seen == 12 * 5
    loader = trainer.get_train_dataloader()
    assert trainer.num_tokens(loader) == 60 and trainer.num_tokens(loader, max_steps=2) == 40


@pytest.mark.slow
def test_torch_compile_compiles_the_model_in_place(tmp_path):
    model = Classifier()
    trainer = Trainer(model, args_for(tmp_path, torch_compile_backend="eager", max_steps=2), train_dataset=Points())
    trainer.train()
    assert trainer.args.torch_compile is True
    assert model._compiled_call_impl is not None  # what nn.Module.compile sets
    assert set(model.state_dict()) == {"linear.weight", "linear.bias"}
