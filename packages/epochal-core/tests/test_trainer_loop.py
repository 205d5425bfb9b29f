import math

import pytest
import torch
from epochal_core import EarlyStoppingCallback, Trainer, TrainerCallback, TrainingArguments
from epochal_core.data import EpochBatchSampler
from epochal_core.schedules import get_scheduler
from helpers_core import DictDataset, Recorder, TinyRegressor, tensor_dataset
from torch import nn
from torch.overrides import TorchFunctionMode

COMMON_KWARGS = {"model", "processing_class", "optimizer", "lr_scheduler", "train_dataloader", "eval_dataloader"}


def make_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), report_to="none", disable_tqdm=True, learning_rate=0.05,
                per_device_train_batch_size=8, per_device_eval_batch_size=8)
    base.update(kw)
    return TrainingArguments(**base)


def expected_events(n_batches, ga, max_steps, log, ev, save, eval_batches):
    """transformers' event order (v5 flow, all strategies 'steps'), derived from its documented loop."""
    seq = ["on_init_end", "on_train_begin"]
    per_epoch = n_batches // ga + int(n_batches % ga > 0)
    epochs = math.ceil(max_steps / per_epoch)
    gs, last_logged, stop = 0, 0, False
    for _ in range(epochs):
        seq.append("on_epoch_begin")
        for step in range(n_batches):
            if step % ga == 0:
                seq.append("on_step_begin")
            if not ((step + 1) % ga == 0 or step + 1 == n_batches):
                seq.append("on_substep_end")
                continue
            seq += ["on_pre_optimizer_step", "on_optimizer_step", "on_step_end"]
            gs += 1
            do_log, do_eval, do_save = gs % log == 0, gs % ev == 0, gs % save == 0
            if gs >= max_steps:
                stop, do_save = True, True
                do_eval = do_eval or gs % ev != 0
            if do_log and gs > last_logged:
                seq.append("on_log")
                last_logged = gs
            if do_eval:
                seq += ["on_prediction_step"] * eval_batches + ["on_log", "on_evaluate"]
            if do_save:
                seq.append("on_save")
            if stop:
                break
        seq.append("on_epoch_end")
        if stop:
            break
    return [*seq, "on_log", "on_train_end"]


@pytest.mark.parametrize(
    ("n", "ga", "epochs", "max_steps"),
    [(64, 1, 3, -1), (64, 3, 2, -1), (64, 1, 3, 10), (40, 2, 2, 4)],
    ids=["transformers-example", "grad-accum-remainder", "max-steps-mid-epoch", "grad-accum-max-steps"],
)
def test_event_sequence_matches_transformers(tmp_path, n, ga, epochs, max_steps):
    rec = Recorder()
    args = make_args(tmp_path, num_train_epochs=epochs, max_steps=max_steps, gradient_accumulation_steps=ga,
                     eval_strategy="steps", eval_steps=5, logging_steps=3, save_steps=10)
    trainer = Trainer(TinyRegressor(), args, train_dataset=tensor_dataset(n), eval_dataset=tensor_dataset(16, 1),
                      callbacks=[rec])
    trainer.train()
    n_batches = n // 8
    total = max_steps if max_steps > 0 else epochs * (n_batches // ga + int(n_batches % ga > 0))
    assert [e for e, _ in rec.events] == expected_events(n_batches, ga, total, 3, 5, 10, 2)
    assert trainer.state.global_step == total
    for event, keys in rec.kwargs.items():
        assert keys >= COMMON_KWARGS, event
    assert "logs" in rec.kwargs["on_log"] and "metrics" in rec.kwargs["on_evaluate"]


def test_log_keys_and_values_match_transformers(tmp_path):
    args = make_args(tmp_path, max_steps=6, logging_steps=2, eval_strategy="steps", eval_steps=3, save_strategy="no")
    trainer = Trainer(TinyRegressor(), args, train_dataset=DictDataset(), eval_dataset=DictDataset(16, 1))
    trainer.train()
    history = trainer.state.log_history
    train_logs = [h for h in history if "loss" in h]
    assert list(train_logs[0]) == ["loss", "grad_norm", "learning_rate", "epoch", "step"]
    eval_logs = [h for h in history if "eval_loss" in h]
    assert set(eval_logs[0]) == {"eval_loss", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second",
                                 "epoch", "step"}
    summary = history[-1]
    assert set(summary) == {"train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos",
                            "train_loss", "epoch", "step"}
    # Learning rate of the step logged (before the scheduler advanced), linear decay from 0.05 over 6 steps.
    assert train_logs[0]["learning_rate"] == pytest.approx(0.05 * (6 - 1) / 6)
    assert train_logs[0]["epoch"] == pytest.approx(2 / 8)  # not rounded
    assert [h["step"] for h in train_logs] == [2, 4, 6]


def test_matches_a_hand_written_loop(tmp_path):
    """Same data order, grad accumulation, clipping and schedule as a plain PyTorch loop: same weights."""
    ds = DictDataset(48)
    args = make_args(tmp_path, max_steps=5, gradient_accumulation_steps=2, per_device_train_batch_size=4,
                     max_grad_norm=0.5, warmup_steps=2, weight_decay=0.01, save_strategy="no", seed=3)
    torch.manual_seed(0)
    model = TinyRegressor()
    reference = TinyRegressor()
    reference.load_state_dict(model.state_dict())
    Trainer(model, args, train_dataset=ds).train()

    decay = [p for p in reference.parameters() if p.ndim >= 2]
    no_decay = [p for p in reference.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=0.05)
    sched = get_scheduler("linear", opt, 2, 5)
    sampler = EpochBatchSampler(len(ds), 4, shuffle=True, seed=3)
    batches = [ds.x[idx] for idx in sampler], [ds.y[idx] for idx in sampler]
    for update in range(5):
        for micro in range(2):
            i = update * 2 + micro
            loss = nn.functional.mse_loss(reference.linear(batches[0][i]).squeeze(-1), batches[1][i]) / 2
            loss.backward()
        nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
        opt.step()
        sched.step()
        opt.zero_grad()
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b)


def test_model_without_loss_gets_a_clear_error(tmp_path):
    class NoLoss(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 1)

        def forward(self, x, labels=None):
            return {"logits": self.linear(x)}

    trainer = Trainer(NoLoss(), make_args(tmp_path, max_steps=1), train_dataset=DictDataset())
    with pytest.raises(ValueError, match=r"did not return a loss: forward returned a dict with keys \['logits'\]"):
        trainer.train()


def test_compute_loss_func_and_tuple_batches(tmp_path):
    model = nn.Linear(4, 1)

    def loss_fn(outputs, labels, num_items_in_batch=None):
        return nn.functional.mse_loss(outputs.squeeze(-1), labels)

    trainer = Trainer(model, make_args(tmp_path, max_steps=4, logging_steps=1, save_strategy="no"),
                      train_dataset=tensor_dataset(), compute_loss_func=loss_fn)
    out = trainer.train()
    assert out.global_step == 4 and math.isfinite(out.training_loss)


def test_compute_metrics_and_predict(tmp_path):
    seen = {}

    def metrics(pred):
        seen["shapes"] = (tuple(pred.predictions.shape), tuple(pred.label_ids.shape))
        return {"mae": float((pred.predictions - pred.label_ids).abs().mean())}

    trainer = Trainer(TinyRegressor(), make_args(tmp_path, max_steps=2, save_strategy="no"),
                      train_dataset=DictDataset(), eval_dataset=DictDataset(20, 1), compute_metrics=metrics)
    result = trainer.evaluate()
    assert seen["shapes"] == ((20,), (20,))
    assert {"eval_loss", "eval_mae"} <= set(result)
    rec = Recorder()
    trainer.add_callback(rec)
    pred = trainer.predict(DictDataset(12, 2))
    assert pred.predictions.shape == (12,) and "test_loss" in pred.metrics and "test_mae" in pred.metrics
    assert [e for e, _ in rec.events] == ["on_prediction_step"] * 2 + ["on_predict"]  # no on_log, as transformers


class DeviceReads(TorchFunctionMode):
    """Records the global step at every read of a floating-point tensor's value into Python.

    Counts what the code does to tensors (``item``, ``tolist``, ``cpu``, ``bool``, ``float``,
    ``numpy``), not a counter the Trainer keeps on itself. Integer tensors (the sampler's index
    permutation, read once per epoch) are not training values.
    """

    READS = frozenset({"item", "tolist", "cpu", "__bool__", "__float__", "numpy"})

    def __init__(self, state_of):
        super().__init__()
        self.state_of = state_of
        self.steps = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.READS and args and isinstance(args[0], torch.Tensor) \
                and args[0].is_floating_point():
            self.steps.append(self.state_of().global_step)
        return func(*args, **(kwargs or {}))


def _train_counting_reads(tmp_path, **kw):
    model = TinyRegressor()
    # SGD: torch's AdamW reads its own step counter (a float tensor) at every update on the CPU.
    trainer = Trainer(model, make_args(tmp_path, save_strategy="no", **kw), train_dataset=tensor_dataset(),
                      optimizers=(torch.optim.SGD(model.parameters(), lr=0.05), None))
    reads = DeviceReads(lambda: trainer.state)
    with reads:
        trainer.train()
    return trainer, reads.steps


def test_device_is_read_only_when_a_log_is_due(tmp_path):
    """The loss stays on the device between logs: every read of a tensor value happens at a logging step.

    (With the non-finite guard on, a CPU run reads the loss at every update for the check
    anyway, so it sums it on the host instead: see the next test.)
    """
    trainer, steps = _train_counting_reads(tmp_path, max_steps=20, logging_steps=5, nonfinite_policy="off")
    log_steps = [h["step"] for h in trainer.state.log_history if "loss" in h]
    assert log_steps == [5, 10, 15, 20]
    assert set(steps) == set(log_steps)  # reads at every log (and the summary at 20), at no other step
    assert len(steps) <= 3 * len(log_steps) + 1  # loss, skip count, grad norm per log; the summary's loss


def test_cpu_guard_sums_on_the_host_with_the_same_logs(tmp_path):
    """Summing the guard's reads as floats logs what summing tensors logs.

    The guard reads each update (so the read counter sees every step): the sums need no other read.
    """
    runs = {}
    for policy in ("skip", "off"):
        runs[policy] = _train_counting_reads(tmp_path / policy, max_steps=12, logging_steps=4,
                                             nonfinite_policy=policy)
    (host, host_reads), (device, device_reads) = runs["skip"], runs["off"]
    assert sorted(set(host_reads)) == list(range(12))  # the guard's read before each update's step count rises
    assert len(host_reads) == 2 * 12  # loss and gradient norm, once per update: nothing at a log
    assert set(device_reads) == {4, 8, 12}
    keys = ("step", "loss", "grad_norm", "learning_rate", "epoch")
    host_logs = [h[k] for h in host.state.log_history if "loss" in h for k in keys]
    device_logs = [h[k] for h in device.state.log_history if "loss" in h for k in keys]
    assert len(host_logs) == 3 * len(keys)
    assert host_logs == pytest.approx(device_logs, rel=1e-6)
    host_loss = host.state.log_history[-1]["train_loss"]
    assert host_loss == pytest.approx(device.state.log_history[-1]["train_loss"], rel=1e-6)


def test_early_stopping_and_best_model(tmp_path):
    class Worsening(TrainerCallback):
        """Makes eval loss rise after step 4 so early stopping has something to do."""

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            if state.global_step > 4:
                metrics["eval_loss"] = 10.0 + state.global_step

    args = make_args(tmp_path, max_steps=40, eval_strategy="steps", eval_steps=2, save_steps=2, logging_steps=2,
                     load_best_model_at_end=True, metric_for_best_model="loss", save_total_limit=1)
    # Worsening runs before EarlyStopping (registered first), so it sees the edited metric.
    trainer = Trainer(TinyRegressor(), args, train_dataset=DictDataset(), eval_dataset=DictDataset(16, 1),
                      callbacks=[Worsening(), EarlyStoppingCallback(early_stopping_patience=2)])
    trainer.train()
    assert trainer.state.global_step == 8  # best at 4, two evaluations without improvement
    assert trainer.state.best_global_step == 4
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-4")
    kept = sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*"))
    assert kept == ["checkpoint-4", "checkpoint-8"]  # limit 1 + the best one


def test_iterable_dataset_needs_max_steps(tmp_path):
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            for i in range(1000):
                yield {"x": torch.ones(4) * (i % 3), "labels": torch.tensor(1.0)}

    with pytest.raises(ValueError, match="max_steps"):
        Trainer(TinyRegressor(), make_args(tmp_path), train_dataset=Stream()).train()
    out = Trainer(TinyRegressor(), make_args(tmp_path, max_steps=3, save_strategy="no"), train_dataset=Stream()).train()
    assert out.global_step == 3


def test_eval_strategy_without_eval_dataset_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="eval_dataset"):
        Trainer(TinyRegressor(), make_args(tmp_path, eval_strategy="epoch"), train_dataset=DictDataset())


def test_fp16_on_cpu_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="fp16=True is invalid on device 'cpu'"):
        Trainer(TinyRegressor(), make_args(tmp_path, fp16=True, use_cpu=True), train_dataset=DictDataset())


class DtypeProbe(TinyRegressor):
    """Records the dtype its linear layer computes in, as seen inside ``forward``."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x, labels=None):
        out = self.linear(x)
        self.seen.append(out.dtype)
        loss = nn.functional.mse_loss(out.squeeze(-1).float(), labels)
        return {"loss": loss, "logits": out.squeeze(-1)}


@pytest.mark.parametrize(("bf16", "dtype"), [(True, torch.bfloat16), (False, torch.float32)], ids=["bf16", "fp32"])
def test_bf16_runs_forward_under_autocast(tmp_path, bf16, dtype):
    """With bf16=True the forward pass computes in bfloat16 (autocast active), in training and evaluation."""
    model = DtypeProbe()
    args = make_args(tmp_path, bf16=bf16, use_cpu=True, max_steps=3, save_strategy="no")
    trainer = Trainer(model, args, train_dataset=DictDataset(), eval_dataset=DictDataset(8, 1))
    out = trainer.train()
    trainer.evaluate()
    assert len(model.seen) == 3 + 1
    assert set(model.seen) == {dtype}
    assert math.isfinite(out.training_loss)
    assert model.linear.weight.dtype == torch.float32  # autocast casts the computation, not the weights


@pytest.mark.parametrize("name", ["linear", "cosine", "constant", "constant_with_warmup"])
def test_schedules_match_transformers_formulas(name):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = get_scheduler(name, opt, 2, 10)
    lrs = []
    for _ in range(10):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    warm = [0.0, 0.5]
    if name == "constant":
        assert lrs == [1.0] * 10
    elif name == "constant_with_warmup":
        assert lrs == [*warm, *[1.0] * 8]
    elif name == "linear":
        assert lrs == pytest.approx([*warm, *[(10 - s) / 8 for s in range(2, 10)]])
    else:
        assert lrs == pytest.approx([*warm, *[0.5 * (1 + math.cos(math.pi * (s - 2) / 8)) for s in range(2, 10)]])


@pytest.mark.parametrize("disable_tqdm", [False, True], ids=["progress-bar", "printer"])
def test_console_prints_every_log_line_once_and_in_order(tmp_path, capsys, disable_tqdm):
    """Fast logs are written in groups (above the bar: one redraw per group), none lost or reordered."""
    from epochal_core.progress import format_logs_line

    args = make_args(tmp_path, max_steps=40, logging_steps=1, disable_tqdm=disable_tqdm, eval_strategy="steps",
                     eval_steps=20)
    trainer = Trainer(TinyRegressor(), args, train_dataset=DictDataset(), eval_dataset=DictDataset(n=8))
    trainer.train()
    out = capsys.readouterr().out  # tqdm.write prints to stdout, the bar to stderr
    lines = [line for line in out.splitlines() if line.startswith("{")]
    expected = [format_logs_line({k: v for k, v in entry.items() if k != "step"})
                for entry in trainer.state.log_history]
    assert lines == expected  # 40 train logs, 2 evaluations and the summary, each once, in order
    assert len(expected) == 43


@pytest.mark.parametrize(("max_steps", "steps_per_epoch", "logging_steps", "eval_steps", "save_steps"),
                         [(10, 5, 2, 5, 5), (7, 3, 1, 2, 3)], ids=["default-script", "uneven"])
def test_scripted_run_emits_the_real_trainers_events_in_order(tmp_path, max_steps, steps_per_epoch,
                                                              logging_steps, eval_steps, save_steps):
    """epochal_core.testing.scripted_run, which integration tests rely on, matches a real Trainer's event order."""
    from epochal_core.testing import scripted_run

    scripted = scripted_run(TrainerCallback(), output_dir=tmp_path / "scripted", max_steps=max_steps,
                            steps_per_epoch=steps_per_epoch, logging_steps=logging_steps, eval_steps=eval_steps,
                            save_steps=save_steps, through_reporter=False)
    args = make_args(tmp_path / "real", max_steps=max_steps, logging_steps=logging_steps, eval_strategy="steps",
                     eval_steps=eval_steps, save_steps=save_steps)
    recorder = Recorder()
    trainer = Trainer(TinyRegressor(), args, train_dataset=DictDataset(8 * steps_per_epoch),
                      eval_dataset=DictDataset(16, 1), callbacks=[recorder])  # 2 evaluation batches, as scripted
    trainer.train()
    assert scripted.events == [event for event, _ in recorder.events]
    assert [h["step"] for h in scripted.state.log_history] == [h["step"] for h in trainer.state.log_history]


def test_training_plan_counts_updates_epochs_and_the_resume_position(tmp_path):
    from epochal_core.training_plan import plan_training

    plan = plan_training(make_args(tmp_path, gradient_accumulation_steps=3, num_train_epochs=2), 10)
    assert (plan.updates_per_epoch, plan.max_steps, plan.num_train_epochs) == (4, 8, 2)  # 3+3+3+1 batches
    assert plan.resume_position(5, ignore_data_skip=False) == (1, 3)  # epoch 1, one update (3 batches) in
    assert plan.resume_position(5, ignore_data_skip=True) == (1, 0)
    stream = plan_training(make_args(tmp_path, max_steps=7), None)
    assert (stream.sized, stream.batches_per_epoch, stream.updates_per_epoch) == (False, 7, 7)
    with pytest.raises(ValueError, match=r"max_steps=-1 is invalid: the train_dataset has no length"):
        plan_training(make_args(tmp_path), None)
    with pytest.raises(ValueError, match="yields no batch"):
        plan_training(make_args(tmp_path), 0)
