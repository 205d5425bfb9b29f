"""Evaluation as a transformers user writes it: only the import line differs from a transformers script."""

import json

import numpy as np
import pytest
import torch
from epochal_core import EvalPrediction, Trainer, TrainerCallback, TrainingArguments
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.data import Dataset


class TokenDataset(Dataset):
    """Sequences of lengths that change per batch: tokens and per-token labels."""

    def __init__(self, lengths):
        gen = torch.Generator().manual_seed(0)
        self.items = [
            {"input_ids": torch.randint(0, 10, (n,), generator=gen), "labels": torch.randint(0, 3, (n,), generator=gen)}
            for n in lengths
        ]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def pad_collator(features):
    """What DataCollatorForTokenClassification does: pad each batch to its own longest sequence."""
    longest = max(len(f["input_ids"]) for f in features)
    ids = torch.zeros(len(features), longest, dtype=torch.long)
    labels = torch.full((len(features), longest), -100, dtype=torch.long)
    for row, f in enumerate(features):
        ids[row, : len(f["input_ids"])] = f["input_ids"]
        labels[row, : len(f["labels"])] = f["labels"]
    return {"input_ids": ids, "labels": labels}


class TokenClassifier(nn.Module):
    def __init__(self, return_hidden=True):
        super().__init__()
        self.return_hidden = return_hidden
        self.embed = nn.Embedding(10, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, input_ids, labels=None):
        hidden = self.embed(input_ids)
        logits = self.head(hidden)
        out = {"logits": logits, "hidden_states": hidden} if self.return_hidden else {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits.reshape(-1, 3), labels.reshape(-1), ignore_index=-100)
        return out


class LogitsOnly(nn.Module):
    """A model that returns bare logits: the loss is the Trainer subclass's job."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 2)

    def forward(self, x):
        return self.linear(x)


class PairDataset(Dataset):
    def __init__(self, n=10):
        gen = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 4, generator=gen)
        self.y = (self.x[:, 0] > 0).long()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def args_for(tmp_path, **kw):
    return TrainingArguments(
        output_dir=str(tmp_path / "out"), report_to="none", disable_tqdm=True,
        per_device_train_batch_size=4, per_device_eval_batch_size=4, **kw,
    )


def compute_metrics(eval_pred):
    # The canonical transformers metric: numpy in, a numpy scalar out.
    logits, labels = eval_pred
    predictions = np.argmax(logits, axis=-1)
    mask = labels != -100
    return {"accuracy": (predictions[mask] == labels[mask]).mean()}


def test_predictions_are_numpy_padded_with_minus_100_across_batch_lengths(tmp_path):
    lengths = [3, 3, 3, 3, 7, 7, 7, 7, 5, 5]  # batches of width 3, 7 and 5
    trainer = Trainer(TokenClassifier(), args_for(tmp_path), data_collator=pad_collator)
    output = trainer.predict(TokenDataset(lengths), ignore_keys=["hidden_states"])
    assert isinstance(output.predictions, np.ndarray) and isinstance(output.label_ids, np.ndarray)
    assert output.predictions.shape == (10, 7, 3) and output.label_ids.shape == (10, 7)
    # The first batch (width 3) is padded to 7 with -100, predictions and labels alike.
    assert (output.predictions[:4, 3:] == -100).all() and (output.label_ids[:4, 3:] == -100).all()
    assert (output.predictions[4:8] != -100).all()
    assert (output.label_ids[:4, :3] >= 0).all()


def test_compute_metrics_gets_numpy_and_numpy_scalars_become_python_floats(tmp_path):
    seen = {}

    class MetricsSpy(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            seen.update(metrics)

    lengths = [4, 4, 4, 4, 6, 6, 6, 6]
    trainer = Trainer(
        TokenClassifier(return_hidden=False),
        args_for(tmp_path, eval_strategy="epoch", num_train_epochs=1, save_strategy="no"),
        data_collator=pad_collator, train_dataset=TokenDataset(lengths), eval_dataset=TokenDataset(lengths),
        compute_metrics=compute_metrics, callbacks=[MetricsSpy()],
    )
    trainer.train()
    assert type(seen["eval_accuracy"]) is float and type(seen["eval_loss"]) is float
    trainer.save_state()
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    evals = [entry for entry in state["log_history"] if "eval_accuracy" in entry]
    assert evals and isinstance(evals[0]["eval_accuracy"], float)


class CountHostCopies(TorchFunctionMode):
    """Counts the real device-to-host copies (``Tensor.cpu``) made while it is active."""

    def __init__(self):
        super().__init__()
        self.copies = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.cpu:
            self.copies += 1
        return func(*args, **(kwargs or {}))


def test_predictions_stay_on_device_until_the_end_or_eval_accumulation_steps(tmp_path):
    lengths = [5] * 24  # 6 batches of 4
    data = TokenDataset(lengths)
    trainer = Trainer(TokenClassifier(), args_for(tmp_path), data_collator=pad_collator)
    with CountHostCopies() as mode:
        trainer.predict(data, ignore_keys=["hidden_states"])
    assert mode.copies == 2  # predictions and labels, once each at the end
    trainer = Trainer(TokenClassifier(), args_for(tmp_path, eval_accumulation_steps=2), data_collator=pad_collator)
    with CountHostCopies() as mode:
        output = trainer.predict(data, ignore_keys=["hidden_states"])
    assert mode.copies == 6  # every 2 of the 6 batches
    assert output.predictions.shape == (24, 5, 3)


def test_compute_loss_override_gives_eval_loss(tmp_path):
    class WeightedLossTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            logits = model(**inputs)
            loss = nn.functional.cross_entropy(logits, labels, weight=torch.tensor([1.0, 2.0]))
            return (loss, logits) if return_outputs else loss

    # As in transformers: the model's forward takes no labels, so label_names says which key holds them.
    trainer = WeightedLossTrainer(
        LogitsOnly(),
        args_for(
            tmp_path, max_steps=2, eval_strategy="steps", eval_steps=2, save_strategy="no", label_names=["labels"]
        ),
        train_dataset=PairDataset(), eval_dataset=PairDataset(), compute_metrics=compute_metrics,
    )
    trainer.train()
    metrics = trainer.evaluate()
    assert "eval_loss" in metrics and "eval_accuracy" in metrics
    assert metrics["eval_loss"] > 0


def test_prediction_step_and_training_step_overrides_with_transformers_signatures(tmp_path):
    calls = {"prediction_step": [], "training_step": 0}

    class MyTrainer(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            calls["training_step"] += 1
            return super().training_step(model, inputs, num_items_in_batch)

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            calls["prediction_step"].append((prediction_loss_only, ignore_keys))
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    trainer = MyTrainer(
        TokenClassifier(), args_for(tmp_path, max_steps=2, save_strategy="no"),
        data_collator=pad_collator, train_dataset=TokenDataset([4] * 8),
    )
    trainer.train()
    output = trainer.predict(TokenDataset([4] * 4), ignore_keys=["hidden_states"])
    assert calls["training_step"] == 2
    assert calls["prediction_step"] == [(False, ["hidden_states"])]
    # ignore_keys dropped the hidden states: the predictions are the logits alone.
    assert output.predictions.shape == (4, 4, 3)
    both = trainer.predict(TokenDataset([4] * 4))
    assert isinstance(both.predictions, tuple) and len(both.predictions) == 2


def test_keys_to_ignore_at_inference_of_the_model_config(tmp_path):
    class Config:
        keys_to_ignore_at_inference = ["hidden_states"]

    model = TokenClassifier()
    model.config = Config()
    trainer = Trainer(model, args_for(tmp_path), data_collator=pad_collator)
    output = trainer.predict(TokenDataset([4] * 4))
    assert output.predictions.shape == (4, 4, 3)


def test_samples_per_second_counts_samples_not_batches(tmp_path):
    trainer = Trainer(LogitsOnly(), args_for(tmp_path))
    output = trainer.predict(PairDataset(10))  # no loss: 10 samples in 3 batches
    ratio = output.metrics["test_samples_per_second"] / output.metrics["test_steps_per_second"]
    assert abs(ratio - 10 / 3) < 1e-9


def test_eval_prediction_unpacks_like_transformers():
    pred = EvalPrediction(predictions=np.zeros((2, 3)), label_ids=np.ones(2))
    logits, labels = pred
    assert logits.shape == (2, 3) and labels.shape == (2,)


def test_remove_unused_columns_drops_keys_forward_does_not_take(tmp_path):
    class WithExtras(PairDataset):
        def __getitem__(self, i):
            return {**super().__getitem__(i), "idx": i, "text": f"sample {i}"}

    # LogitsOnly.forward takes only x: "labels" has no label parameter to match, so it goes too.
    output = Trainer(LogitsOnly(), args_for(tmp_path)).predict(WithExtras(8))
    assert output.predictions.shape == (8, 2) and output.label_ids is None
    kept = Trainer(LogitsOnly(), args_for(tmp_path, label_names=["labels"], remove_unused_columns=True))
    model_inputs = []
    kept.model.register_forward_pre_hook(
        lambda module, args, kwargs: model_inputs.append(set(kwargs)), with_kwargs=True
    )
    try:
        kept.predict(WithExtras(8))
    except TypeError:
        pass  # labels are kept (label_names) and LogitsOnly.forward does not take them
    assert model_inputs == [{"x", "labels"}]
    raw = Trainer(LogitsOnly(), args_for(tmp_path, remove_unused_columns=False))
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        raw.predict(WithExtras(8))


def test_label_names_default_to_forward_label_parameters(tmp_path):
    class QuestionAnsweringToy(nn.Module):
        def forward(self, x, start_positions=None, end_positions=None):
            return x

    class Classifier(nn.Module):
        def forward(self, x, label_ids=None, labels_mask=None):
            return x

    assert Trainer(Classifier(), args_for(tmp_path)).label_names == ["label_ids", "labels_mask"]
    assert Trainer(QuestionAnsweringToy(), args_for(tmp_path)).label_names == ["start_positions", "end_positions"]
    assert Trainer(Classifier(), args_for(tmp_path, label_names=["y"])).label_names == ["y"]
