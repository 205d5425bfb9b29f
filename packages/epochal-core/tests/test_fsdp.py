"""FSDP2 for real: ``torchrun`` with gloo on CPU, 2 processes, compared with DDP and one process.

Two launches carry every check (each launch costs seconds): the first trains FSDP, DDP
and a preempted FSDP run side by side; the second resumes the preempted run (same world
size), resumes a one-process checkpoint on two ranks, then loses a rank. One-process
references and the 2 -> 1 resume run in this process while a launch runs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import fsdp_worker
import pytest
import torch
from epochal_core import TrainingArguments
from epochal_core.checkpoint import COMMIT_MARKER, CheckpointChanged, is_complete, verify_checkpoint
from test_ddp import assert_same_weights, launch, losses

WORKER = Path(__file__).with_name("fsdp_worker.py")
WRAP = {"fsdp": "full_shard auto_wrap", "fsdp_config": {"transformer_layer_cls_to_wrap": ["Block"]}}


def results(out_dir: Path, world: int = 2) -> list[dict[str, Any]]:
    return [json.loads((out_dir / f"result-{rank}.json").read_text()) for rank in range(world)]


def fsdp_launch(tmp_path: Path, runs: list[dict[str, Any]], name: str) -> Any:
    return launch(tmp_path, runs, name=name, worker=WORKER)


def test_fsdp_arguments_use_transformers_spellings_and_refuse_what_fsdp2_cannot_do(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), fsdp="full_shard auto_wrap offload",
                             fsdp_config={"fsdp_min_num_params": 1000})
    assert args.fsdp == ["full_shard", "auto_wrap", "offload"]
    assert args.fsdp_config == {"min_num_params": 1000}
    plan = args.fsdp_plan
    assert plan is not None and (plan.reshard_after_forward, plan.offload, plan.min_num_params) == (True, True, 1000)
    assert TrainingArguments(fsdp="shard_grad_op").fsdp_plan.reshard_after_forward is False  # type: ignore[union-attr]
    assert TrainingArguments(fsdp=True).fsdp == ["full_shard"]
    assert TrainingArguments().fsdp_plan is None
    config_file = tmp_path / "fsdp.json"
    config_file.write_text(json.dumps({"transformer_layer_cls_to_wrap": ["Block"]}))
    assert TrainingArguments(fsdp="full_shard auto_wrap", fsdp_config=str(config_file)).fsdp_plan.layer_classes == (
        "Block",)  # type: ignore[union-attr]
    refused = [
        ({"fsdp": "no_shard"}, "fsdp", "leave fsdp unset"),
        ({"fsdp": "hybrid_shard"}, "fsdp", "2-D device mesh"),
        ({"fsdp": "full_shard sharded"}, "fsdp", "'sharded' is not an FSDP option"),
        ({"fsdp": "offload"}, "fsdp", "exactly one sharding strategy"),
        ({"fsdp": "full_shard shard_grad_op"}, "fsdp", "exactly one sharding strategy"),
        ({"fsdp_config": {"min_num_params": 10}}, "fsdp_config", "only applies with fsdp"),
        ({"fsdp": "full_shard", "fsdp_config": {"min_num_params": 10}}, "fsdp", "add 'auto_wrap'"),
        ({"fsdp": "full_shard", "fsdp_config": {"backward_prefetch": "x"}}, "fsdp_config", "FSDP2 has no such"),
        ({"fsdp": "full_shard", "fsdp_config": {"version": 1}}, "fsdp_config['version']", "only FSDP2"),
        ({"fsdp": "full_shard", "fsdp_config": {"state_dict_type": "FULL_STATE_DICT"}},
         "fsdp_config['state_dict_type']", "always sharded"),
        ({"fsdp": "shard_grad_op", "fsdp_config": {"reshard_after_forward": True}},
         "fsdp_config['reshard_after_forward']", "contradicts"),
        ({"fsdp": "full_shard auto_wrap", "fsdp_config": {"min_num_params": 5, "transformer_layer_cls_to_wrap": "B"}},
         "fsdp_config", "not both"),
        ({"fsdp": "full_shard", "fsdp_config": {"activation_checkpointing": True}},
         "fsdp_config['activation_checkpointing']", "gradient_checkpointing=True"),
        ({"fsdp": "full_shard", "fp16": True}, "fp16", "use bf16=True"),
    ]
    for kwargs, field, fix in refused:
        with pytest.raises(ValueError, match=rf"TrainingArguments\.{re.escape(field)}=") as err:
            TrainingArguments(output_dir=str(tmp_path), **kwargs)
        assert fix in str(err.value), (kwargs, str(err.value))


def test_auto_wrap_picks_units_by_class_or_by_parameter_count():
    from epochal_core.fsdp import _wrap_units
    from epochal_core.fsdp_options import FsdpPlan

    model = fsdp_worker.TinyMLP()
    by_class = _wrap_units(model, FsdpPlan(auto_wrap=True, layer_classes=("Block",)))
    assert by_class == [model.blocks[1], model.blocks[0]]  # children before parents
    # Each Block holds 72 parameters; the ModuleList then holds none that are not in a unit.
    by_count = _wrap_units(model, FsdpPlan(auto_wrap=True, min_num_params=72))
    assert by_count == [model.blocks[1].linear, model.blocks[0].linear]
    assert _wrap_units(model, FsdpPlan(auto_wrap=True, min_num_params=144)) == [model.blocks]
    assert _wrap_units(model, FsdpPlan()) == []
    with pytest.raises(ValueError, match=r"transformer_layer_cls_to_wrap.*no module of class \['Layer'\]"):
        _wrap_units(model, FsdpPlan(auto_wrap=True, layer_classes=("Layer",)))
    with pytest.raises(ValueError, match="nothing says what to wrap"):
        _wrap_units(model, FsdpPlan(auto_wrap=True))


def _single(cfg: dict[str, Any], out: Path, **arg_overrides: Any) -> dict[str, Any]:
    """The one-process run with the same global batch (8 per step)."""
    return fsdp_worker.run({**cfg, "output_dir": str(out), "args": {
        **cfg["args"], "per_device_train_batch_size": 8, **arg_overrides}})


@pytest.mark.slow
def test_fsdp_matches_ddp_and_one_process_preempts_and_reshards_checkpoints(tmp_path):
    # FSDP and DDP, 4 per rank x 2 ranks x 2 micro-batches; clipping active; eval shards 19 + 18 in batches of 3
    # (7 and 6 batches: the shorter rank pads its forwards); early stopping ends the run.
    common = {"n": 48, "eval_n": 37, "patience": 1, "args": {
        "per_device_train_batch_size": 4, "per_device_eval_batch_size": 3, "gradient_accumulation_steps": 2,
        "num_train_epochs": 6, "learning_rate": 0.08, "max_grad_norm": 0.5, "eval_strategy": "steps",
        "eval_steps": 2, "save_steps": 2, "metric_for_best_model": "eval_loss", "load_best_model_at_end": True,
        "save_total_limit": 2}}
    sharded = {**common, "output_dir": str(tmp_path / "fsdp"), "args": {**common["args"], **WRAP}}
    ddp = {**common, "output_dir": str(tmp_path / "ddp")}
    # shard_grad_op with offload, an SGD built before the Trainer (re-pointed at the shards), SIGTERM on rank 1.
    plain = {"n": 40, "sgd": 0.05, "args": {"fsdp": "shard_grad_op offload", "per_device_train_batch_size": 4,
                                            "max_steps": 8, "save_steps": 4, "lr_scheduler_type": "constant"}}
    preempted = {**plain, "output_dir": str(tmp_path / "preempted"), "hooks": {"sigterm": {"rank": 1, "step": 3}}}
    proc = fsdp_launch(tmp_path, [sharded, ddp, preempted], "a")
    single = _single(sharded, tmp_path / "single", per_device_eval_batch_size=6)
    straight = _single(plain, tmp_path / "straight")  # also leaves a one-process checkpoint-4 for 1 -> 2
    pid_file = tmp_path / "preempted" / "victim.pid"
    deadline = time.monotonic() + 240
    while not pid_file.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pid_file.exists(), proc.communicate()[0]
    os.kill(int(pid_file.read_text()), signal.SIGTERM)  # one worker, not torchrun
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, output

    f0, f1 = results(tmp_path / "fsdp")
    d0, _ = results(tmp_path / "ddp")
    assert (f0["wrapped"], d0["wrapped"]) == ("FSDPTinyMLP", "DistributedDataParallel")
    assert losses(f0) == losses(f1)  # the logged loss is the mean over ranks, on every rank
    torch.testing.assert_close(torch.tensor(losses(f0)), torch.tensor(losses(d0)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(losses(f0)), torch.tensor(losses(single)), rtol=1e-5, atol=1e-6)
    norms = [h["grad_norm"] for h in f0["history"] if "grad_norm" in h]
    assert max(norms) > 0.5  # clipping was active: the norm is the global one, as DDP's
    torch.testing.assert_close(torch.tensor(norms), torch.tensor([h["grad_norm"] for h in d0["history"]
                                                                  if "grad_norm" in h]), rtol=1e-5, atol=1e-6)
    assert f0["global_step"] == d0["global_step"] == single["global_step"] < 18  # early stopping fired
    assert f0["seen"] == f1["seen"]  # every callback saw the same state on both ranks
    evals = [[s[1], s[3]] for s in f0["seen"] if s[0] == "eval"]
    assert evals == [[s[1], s[3]] for s in single["seen"] if s[0] == "eval"] and len(evals) >= 3
    assert Path(f0["best_model_checkpoint"]).name == Path(single["best_model_checkpoint"]).name
    assert_same_weights(f0["weights"], d0["weights"], atol=1e-5)  # save_model(): one consolidated state dict
    assert_same_weights(f0["weights"], single["weights"], atol=1e-5)
    assert "weights" not in f1
    for report in (f0, f1):
        assert report["eval"]["eval_count"] == 37  # gathered, padding forwards dropped
        assert report["eval"]["eval_loss"] == pytest.approx(single["eval"]["eval_loss"], rel=1e-5)
    assert [p.name for p in (tmp_path / "fsdp").glob("tracker-*")] == ["tracker-rank0.jsonl"]
    # A sharded checkpoint: each rank's DCP files, in the manifest with their checksums.
    checkpoint = Path(f0["best_model_checkpoint"])
    verify_checkpoint(checkpoint)
    manifest = json.loads((checkpoint / COMMIT_MARKER).read_text())["files"]
    for folder in ("pytorch_model_fsdp_0", "optimizer_0"):
        assert {f"{folder}/__0_0.distcp", f"{folder}/__1_0.distcp", f"{folder}/.metadata"} <= set(manifest)
    assert "pytorch_model.bin" not in manifest and {"rng_state_0.pth", "rng_state_1.pth"} <= set(manifest)
    changed = tmp_path / "changed"
    shutil.copytree(checkpoint, changed)
    shard = changed / "optimizer_0" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # same size, one bit pattern flipped: only the checksum rank 1 recorded can tell
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointChanged, match=r"optimizer_0/__1_0\.distcp"):
        verify_checkpoint(changed)

    assert output.count("Received SIGTERM") == 1
    p0, p1 = results(tmp_path / "preempted")
    assert p0["preempted"] and p1["preempted"] and p0["global_step"] == p1["global_step"] == 3
    assert [p.name for p in (tmp_path / "preempted").glob("checkpoint-*")] == ["checkpoint-3"]
    assert is_complete(tmp_path / "preempted" / "checkpoint-3")

    # Second launch: resume the preempted run (2 ranks), resume the one-process checkpoint-4 on 2 ranks
    # (1 -> 2), then rank 1 dies. Meanwhile, here: the 2-rank checkpoint-3 resumed in one process (2 -> 1),
    # next to an interrupted save at step 6 that must be ignored.
    two_to_one = tmp_path / "two_to_one"
    two_to_one.mkdir()
    shutil.copytree(tmp_path / "preempted" / "checkpoint-3", two_to_one / "checkpoint-3")
    shutil.copytree(tmp_path / "preempted" / "checkpoint-3", two_to_one / "checkpoint-6")
    (two_to_one / "checkpoint-6" / COMMIT_MARKER).unlink()
    resumed = {**preempted, "hooks": {}, "resume": True}
    one_to_two = {**plain, "output_dir": str(tmp_path / "one_to_two"),
                  "resume": str(tmp_path / "straight" / "checkpoint-4")}
    dies = {"n": 64, "output_dir": str(tmp_path / "dies"), "hooks": {"die": {"rank": 1, "step": 3}},
            "args": {**WRAP, "per_device_train_batch_size": 4, "max_steps": 100_000, "ddp_timeout": 30,
                     "save_strategy": "no"}}
    proc = fsdp_launch(tmp_path, [resumed, one_to_two, dies], "b")
    back = _single({**plain, "resume": True}, two_to_one)
    output, _ = proc.communicate(timeout=240)  # the timeout is the hang detector
    assert proc.returncode != 0, output
    assert "exitcode  : 3" in output or "exitcode: 3" in output, output
    assert not (tmp_path / "dies" / "result-0.json").exists()

    s = straight
    r0, r1 = results(tmp_path / "preempted")
    assert r0["global_step"] == r1["global_step"] == 8
    assert_same_weights(r0["weights"], s["weights"], atol=1e-5)  # same world size: continues exactly
    assert losses(r0)[-5:] == pytest.approx(losses(s)[-5:], rel=1e-5)
    o0, _ = results(tmp_path / "one_to_two")
    assert o0["global_step"] == 8 and o0["world"] == 2
    assert_same_weights(o0["weights"], s["weights"], atol=1e-5)  # 1 -> 2: DCP resharded weights and SGD state
    assert back["global_step"] == 8 and back["world"] == 1
    assert_same_weights(back["weights"], s["weights"], atol=1e-5)  # 2 -> 1, from checkpoint-3 (not the broken 6)
    assert losses(back)[-5:] == pytest.approx(losses(s)[-5:], rel=1e-5)
