"""Every ``ValueError`` of ``TrainingArguments``: each names the field, the bad value and the fix."""

from __future__ import annotations

import inspect
import re
import traceback

import pytest
from epochal_core import TrainingArguments
from epochal_core import training_args as module

BEST = {"load_best_model_at_end": True, "eval_strategy": "steps"}

# (arguments, field named, value named, words of the fix)
CASES = [
    ({"eval_strategy": "sometimes"}, "eval_strategy", "'sometimes'", "use one of ['no', 'steps', 'epoch']"),
    ({"logging_strategy": "often"}, "logging_strategy", "'often'", "use one of ['no', 'steps', 'epoch']"),
    ({"save_strategy": "always"}, "save_strategy", "'always'", "'best']"),
    ({"lr_scheduler_type": "cosine_restarts"}, "lr_scheduler_type", "'cosine_restarts'", "'warmup_stable_decay']"),
    ({"nonfinite_policy": "ignore"}, "nonfinite_policy", "'ignore'", "['skip', 'stop', 'off']"),
    ({"per_device_train_batch_size": 0}, "per_device_train_batch_size", "0", "use an integer >= 1"),
    ({"gradient_accumulation_steps": 1.5}, "gradient_accumulation_steps", "1.5", "it must be int, not float"),
    ({"dataloader_num_workers": -1}, "dataloader_num_workers", "-1", "use an integer >= 0"),
    ({"learning_rate": -0.1}, "learning_rate", "-0.1", "use a value >= 0"),
    ({"weight_decay": -0.01}, "weight_decay", "-0.01", "use a value >= 0"),
    ({"max_grad_norm": -1.0}, "max_grad_norm", "-1.0", "or 0 to disable clipping"),
    ({"warmup_ratio": 1.5}, "warmup_ratio", "1.5", "use a fraction in [0, 1]"),
    ({"warmup_steps": -3}, "warmup_steps", "-3", "use an integer >= 0"),
    ({"max_steps": 0}, "max_steps", "0", "set max_steps > 0 or num_train_epochs > 0"),
    ({"num_train_epochs": 0}, "num_train_epochs", "0", "set max_steps > 0 or num_train_epochs > 0"),
    ({"save_total_limit": 0}, "save_total_limit", "0", "use None (keep all) or an integer >= 1"),
    ({"ddp_timeout": 0}, "ddp_timeout", "0", "use a number of seconds > 0"),
    ({"bf16": True, "fp16": True}, "fp16", "True", "choose one of bf16 and fp16, not both"),
    ({"logging_steps": None}, "logging_steps", "None", "set an interval"),
    ({"save_steps": 0}, "save_steps", "0", "use an integer >= 1, or a fraction in (0, 1)"),
    ({"logging_steps": 2.5}, "logging_steps", "2.5", "must be whole"),
    ({"save_strategy": "best"}, "metric_for_best_model", "None", "save_strategy='best' needs a metric"),
    ({"load_best_model_at_end": True}, "eval_strategy", "'no'", "load_best_model_at_end=True needs evaluation"),
    ({**BEST, "save_strategy": "epoch"}, "save_strategy", "'epoch'", "needs save_strategy equal to eval_strategy"),
    ({**BEST, "eval_steps": 3, "save_steps": 5}, "save_steps", "5", "a multiple of eval_steps (3)"),
    ({"report_to": 5}, "report_to", "5", "use 'all', 'none', or a list of integration names"),
    ({"report_to": ["all", "wandb"]}, "report_to", "['all', 'wandb']", "cannot be combined with other names"),
    ({"label_names": "labels"}, "label_names", "'labels'", "use a list of batch keys"),
    ({"optim": "adamw_apex_fused"}, "optim", "'adamw_apex_fused'", "'adamw_torch_fused'"),
    ({"lr_scheduler_kwargs": "num_cycles=2"}, "lr_scheduler_kwargs", "'num_cycles=2'", "use a dict"),
    ({"lr_scheduler_type": "reduce_lr_on_plateau"}, "eval_strategy", "'no'", "steps on an eval metric"),
    ({"label_smoothing_factor": 1.0}, "label_smoothing_factor", "1.0", "use a value in [0, 1)"),
    ({"dataloader_prefetch_factor": 2}, "dataloader_prefetch_factor", "2", "needs dataloader_num_workers > 0"),
    ({"eval_accumulation_steps": 0}, "eval_accumulation_steps", "0", "use None or an integer >= 1"),
    # issue 20 (the fsdp/fsdp_config errors of fsdp_options.py are in test_fsdp.py)
    ({"fsdp": "full_shard", "fp16": True}, "fp16", "True", "use bf16=True"),
    ({"integration_timeout": 0}, "integration_timeout", "0", "use a finite number of seconds > 0"),
]


def _raise_line(err: BaseException) -> int:
    """The line of training_args.py that raised ``err``."""
    frames = [f for f in traceback.extract_tb(err.__traceback__) if f.filename == module.__file__]
    return frames[-1].lineno


@pytest.mark.parametrize(("kwargs", "field", "value", "fix"), CASES, ids=[c[1] + "-" + c[2] for c in CASES])
def test_bad_value_is_rejected_naming_field_value_and_fix(kwargs, field, value, fix):
    with pytest.raises(ValueError) as raised:
        TrainingArguments(output_dir="out", **kwargs)
    message = str(raised.value)
    assert message.startswith(f"TrainingArguments.{field}={value} is invalid: "), message
    assert fix in message


def test_every_value_error_path_is_exercised():
    """Each ``raise _bad(...)`` line of training_args.py is reached by one of the cases above."""
    source = inspect.getsource(module).splitlines()
    raising = {number for number, line in enumerate(source, start=1) if re.match(r"\s*raise _bad\(", line)}
    reached = set()
    for kwargs, *_ in CASES:
        with pytest.raises(ValueError) as raised:
            TrainingArguments(output_dir="out", **kwargs)
        if isinstance(raised.value, TypeError):
            continue  # a type check (args_fields.check_field_types), not a raise _bad(...) site
        reached.add(_raise_line(raised.value))
    assert raising, "no raise sites found: the pattern is stale"
    assert reached == raising, f"not exercised: lines {sorted(raising - reached)}"


@pytest.mark.parametrize("extra", [{}, {"fsdp": "full_shard auto_wrap", "fsdp_config": {"min_num_params": 10}}])
def test_to_dict_round_trips_through_the_constructor(extra):
    """Scripts rebuild arguments with TrainingArguments(**args.to_dict()); every normalised field must load back."""
    args = TrainingArguments(output_dir="out", **extra)
    again = TrainingArguments(**args.to_dict())
    assert again.to_dict() == args.to_dict()
