import json
import logging
import subprocess
import sys

import pytest
from epochal_core import (
    EVENTS,
    CallbackHandler,
    DefaultFlowCallback,
    EarlyStoppingCallback,
    ExportableState,
    PrinterCallback,
    ProgressCallback,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

TRANSFORMERS_EVENTS = {
    "on_init_end", "on_train_begin", "on_train_end", "on_epoch_begin", "on_epoch_end", "on_step_begin",
    "on_pre_optimizer_step", "on_optimizer_step", "on_substep_end", "on_step_end", "on_evaluate", "on_predict",
    "on_save", "on_log", "on_prediction_step", "on_push_begin",
}


def test_callback_has_all_transformers_events_plus_on_exception():
    assert set(EVENTS) == TRANSFORMERS_EVENTS | {"on_exception"}
    cb = TrainerCallback()
    for event in EVENTS:
        assert getattr(cb, event)(None, None, None, metrics={}) is None


def test_protocol_import_does_not_import_torch():
    code = "import sys, epochal_core; from epochal_core import TrainerCallback, TrainerState, TrainerControl, " \
           "TrainingArguments, EarlyStoppingCallback, ProgressCallback; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_state_json_round_trip_matches_transformers_layout(tmp_path):
    state = TrainerState(global_step=7, best_metric=0.5, log_history=[{"loss": 1.0, "step": 7}])
    path = tmp_path / "trainer_state.json"
    state.save_to_json(str(path))
    text = path.read_text()
    assert text.endswith("\n")
    data = json.loads(text)
    assert list(data) == sorted(data)  # sort_keys like transformers
    for field in ("epoch", "global_step", "max_steps", "logging_steps", "eval_steps", "save_steps",
                  "train_batch_size", "num_train_epochs", "num_input_tokens_seen", "total_flos", "log_history",
                  "best_metric", "best_global_step", "best_model_checkpoint", "is_local_process_zero",
                  "is_world_process_zero", "is_hyper_param_search", "trial_name", "trial_params",
                  "stateful_callbacks"):
        assert field in data
    assert TrainerState.load_from_json(str(path)) == state


def test_state_loads_file_with_unknown_keys(tmp_path, caplog):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"global_step": 3, "log_history": None, "future_field": 1}))
    with caplog.at_level(logging.WARNING):
        state = TrainerState.load_from_json(str(path))
    assert state.global_step == 3 and state.log_history == []
    assert "future_field" in caplog.text


def test_compute_steps_resolves_ratios():
    args = TrainingArguments(output_dir="o", logging_steps=0.1, eval_strategy="steps", eval_steps=0.25,
                             save_steps=7, report_to="none")
    state = TrainerState()
    state.compute_steps(args, 95)
    assert (state.logging_steps, state.eval_steps, state.save_steps) == (10, 24, 7)


def test_control_state_and_private_resets():
    control = TrainerControl(should_log=True, should_save=True, should_evaluate=True, should_epoch_stop=True,
                             should_training_stop=True)
    assert control.state()["args"]["should_training_stop"] is True
    control._new_step()
    assert not (control.should_log or control.should_save or control.should_evaluate)
    control._new_epoch()
    assert not control.should_epoch_stop
    control._new_training()
    assert not control.should_training_stop


def test_handler_resets_flags_at_transformers_points():
    handler = CallbackHandler([DefaultFlowCallback()])
    args = TrainingArguments(output_dir="o", report_to="none")
    state, control = TrainerState(), TrainerControl(True, True, True, True, True)
    handler.on_step_begin(args, state, control)
    assert not (control.should_log or control.should_evaluate or control.should_save)
    control.should_log = control.should_evaluate = control.should_save = True
    handler.on_log(args, state, control, logs={})
    assert not control.should_log and control.should_save
    handler.on_evaluate(args, state, control, metrics={})
    assert not control.should_evaluate
    handler.on_save(args, state, control)
    assert not control.should_save
    handler.on_epoch_begin(args, state, control)
    assert not control.should_epoch_stop and control.should_training_stop
    handler.on_train_begin(args, state, control)
    assert not control.should_training_stop


class Counting(TrainerCallback):
    def __init__(self):
        self.calls = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.calls += 1


def test_handler_dispatches_only_overridden_events():
    cb = Counting()
    handler = CallbackHandler([DefaultFlowCallback(), cb])
    assert handler._dispatch["on_log"] == []
    assert len(handler._dispatch["on_step_end"]) == 2
    args = TrainingArguments(output_dir="o", report_to="none")
    state = TrainerState(max_steps=10)
    handler.on_step_end(args, state, TrainerControl())
    assert cb.calls == 1


def test_returned_control_replaces_it_for_the_next_callback():
    replacement = TrainerControl(should_save=True)
    seen = []

    class Replace(TrainerCallback):
        def on_log(self, args, state, control, **kwargs):
            return replacement

    class See(TrainerCallback):
        def on_log(self, args, state, control, **kwargs):
            seen.append(control)

    handler = CallbackHandler([DefaultFlowCallback(), Replace(), See()])
    out = handler.on_log(TrainingArguments(output_dir="o", report_to="none"), TrainerState(), TrainerControl(), logs={})
    assert seen == [replacement] and out is replacement


def test_add_pop_remove_by_class_and_instance(caplog):
    a, b = Counting(), Counting()
    handler = CallbackHandler([DefaultFlowCallback(), a])
    with caplog.at_level(logging.WARNING):
        handler.add_callback(b)
    assert "there is already one" in caplog.text and str(Counting) in caplog.text
    assert handler.pop_callback(Counting) is a
    assert handler.pop_callback(a) is None  # already gone: no error
    handler.remove_callback(a)  # absent instance: no error (transformers raises)
    handler.remove_callback(b)
    assert handler.pop_callback(Counting) is None
    handler.add_callback(PrinterCallback)  # a class is instantiated
    assert isinstance(handler.callbacks[-1], PrinterCallback)
    assert handler.callback_list.splitlines() == ["DefaultFlowCallback", "PrinterCallback"]


def test_handler_warns_without_flow_callback(caplog):
    with caplog.at_level(logging.WARNING):
        CallbackHandler([ProgressCallback()])
    assert "DefaultFlowCallback" in caplog.text


def test_order_attribute_sorts_dispatch():
    calls = []

    class Late(TrainerCallback):
        order = 10

        def on_log(self, args, state, control, **kwargs):
            calls.append("late")

    class Early(TrainerCallback):
        order = -10

        def on_log(self, args, state, control, **kwargs):
            calls.append("early")

    handler = CallbackHandler([DefaultFlowCallback(), Late(), Early()])
    handler.on_log(TrainingArguments(output_dir="o", report_to="none"), TrainerState(), TrainerControl(), logs={})
    assert calls == ["early", "late"]


def test_on_exception_calls_every_handler_even_if_one_raises():
    calls = []

    class Boom(TrainerCallback):
        def on_exception(self, args, state, control, **kwargs):
            calls.append("boom")
            raise RuntimeError("handler failed")

    class Fine(TrainerCallback):
        def on_exception(self, args, state, control, exception=None, **kwargs):
            calls.append(type(exception).__name__)

    handler = CallbackHandler([DefaultFlowCallback(), Boom(), Fine()])
    errors = handler.on_exception(TrainingArguments(output_dir="o", report_to="none"), TrainerState(),
                                  TrainerControl(), exception=ValueError("x"))
    assert calls == ["boom", "ValueError"] and len(errors) == 1


def test_exportable_state_round_trip():
    cb = EarlyStoppingCallback(3, 0.1)
    cb.early_stopping_patience_counter = 2
    clone = EarlyStoppingCallback.from_state(cb.state())
    assert clone.state() == cb.state()
    with pytest.raises(NotImplementedError):
        ExportableState().state()


@pytest.mark.parametrize("kwargs", [{"early_stopping_patience": 0}, {"early_stopping_threshold": -1.0}])
def test_early_stopping_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError, match="early_stopping"):
        EarlyStoppingCallback(**kwargs)


def test_early_stopping_errors_are_real_exceptions_not_asserts():
    cb = EarlyStoppingCallback()
    with pytest.raises(ValueError, match="metric_for_best_model"):
        cb.on_train_begin(TrainingArguments(output_dir="o", report_to="none"), TrainerState(), TrainerControl())


def test_printer_does_not_mutate_logs(capsys):
    logs = {"loss": 0.123456789, "total_flos": 5.0}
    PrinterCallback().on_log(None, TrainerState(), TrainerControl(), logs=logs)
    assert logs == {"loss": 0.123456789, "total_flos": 5.0}
    assert "0.1235" in capsys.readouterr().out


@pytest.mark.parametrize("release", ["should_evaluate", "should_save", "should_training_stop", "on_prediction_step",
                                     "on_train_end", "on_exception"])
def test_printer_holds_fast_lines_until_slow_work_or_the_end(capsys, release):
    """During training, logs closer than ``write_interval`` are printed together, in order, as logged;
    held lines go out before an evaluation, a save, the stop, or at the end or on an error."""
    state, control = TrainerState(), TrainerControl()
    printer = PrinterCallback(write_interval=3600)
    printer.on_log(None, state, control, logs={"loss": 1.0})  # outside training: each log at once
    printer.on_log(None, state, control, logs={"loss": 2.0})
    assert capsys.readouterr().out == "{'loss': 1.0}\n{'loss': 2.0}\n"
    printer.on_train_begin(None, state, control)
    logs = {"loss": 3.0}
    printer.on_log(None, state, control, logs=logs)
    logs["loss"] = 99.0  # another callback changing the dict later does not change the line
    printer.on_step_end(None, state, control)
    printer.on_log(None, state, control, logs={"loss": 4.0})
    assert capsys.readouterr().out == ""  # held: the interval has not passed
    if release.startswith("should_"):
        setattr(control, release, True)
        printer.on_log(None, state, control, logs={"loss": 5.0})
    else:
        getattr(printer, release)(None, state, control)
    expected = ["{'loss': 3.0}", "{'loss': 4.0}"] + (["{'loss': 5.0}"] if release.startswith("should_") else [])
    assert capsys.readouterr().out.splitlines() == expected


def test_printer_writes_held_lines_once_the_interval_passes(capsys, monkeypatch):
    from types import SimpleNamespace

    import epochal_core.progress as progress

    now = [100.0]
    monkeypatch.setattr(progress, "time", SimpleNamespace(monotonic=lambda: now[0]))
    state, control = TrainerState(), TrainerControl()
    printer = PrinterCallback(write_interval=0.1)
    printer.on_train_begin(None, state, control)
    printer.on_log(None, state, control, logs={"loss": 1.0})  # nothing written yet: at once
    now[0] += 0.05
    printer.on_log(None, state, control, logs={"loss": 2.0})
    printer.on_step_end(None, state, control)
    assert capsys.readouterr().out == "{'loss': 1.0}\n"
    now[0] += 0.06  # 0.11 s after the last write: the next step end writes the held line
    printer.on_step_end(None, state, control)
    assert capsys.readouterr().out == "{'loss': 2.0}\n"
    unheld = PrinterCallback(write_interval=0)
    unheld.on_train_begin(None, state, control)
    for value in (1.0, 2.0):
        unheld.on_log(None, state, control, logs={"loss": value})
        assert capsys.readouterr().out == f"{{'loss': {value}}}\n"


@pytest.mark.parametrize("callback", [PrinterCallback, ProgressCallback])
@pytest.mark.parametrize("interval", [-1.0, float("nan")])
def test_console_callbacks_reject_a_bad_write_interval(callback, interval):
    with pytest.raises(ValueError, match=r"write_interval=(-1\.0|nan): must be a number of seconds >= 0"):
        callback(write_interval=interval)


def test_printed_log_line_is_the_formatted_dict():
    """The printer's fast path prints exactly ``str(format_logs(logs))``: .4g floats, cut strings, no total_flos."""
    import random

    from epochal_core.progress import format_logs, format_logs_line

    rng = random.Random(0)
    values = [0.0, -0.0, 1.0, 2.0, 100.0, 12345.6, 1e-5, 1.5e-7, 1e20, 0.6931, -3.25, float("nan"), float("inf"),
              123456789.0, 1 / 3, 9999.5, 99999.0]
    values += [rng.uniform(-1, 1) * 10 ** rng.randint(-12, 12) for _ in range(2000)]
    for value in values:
        logs = {"loss": value, "epoch": 1, "note": "x" * 150, "ok": True, "total_flos": 5.0, "tag": "hi"}
        assert format_logs_line(logs) == str(format_logs(logs)), value
    assert format_logs_line({"loss": 0.123456, "total_flos": 1e12}) == "{'loss': 0.1235}"
    # Logs of floats only take the cached-template path: the same text, whatever the values and keys.
    for i in range(0, len(values) - 3):
        logs = {"loss": values[i], "grad_norm": values[i + 1], "learning_rate": values[i + 2], "epoch": values[i + 3]}
        assert format_logs_line(logs) == str(format_logs(logs)), logs
    odd_keys = {"100%": 0.5, "it's": 1.25, 'say "hi"': 2.5, "%s": 0.125, "": 3.5}
    assert format_logs_line(odd_keys) == str(format_logs(odd_keys))
    assert format_logs_line({}) == "{}"
