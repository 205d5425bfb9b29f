"""Data-parallel training for real: ``torchrun`` with the gloo backend on CPU, 2 processes.

Each test launches ``ddp_worker.py`` (an unchanged training script) with
``python -m torch.distributed.run`` and reads back what every rank wrote.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import ddp_worker
import pytest
import torch
from epochal_core.checkpoint import is_complete
from epochal_core.testing import tiny_dataset
from helpers_core import TinyRegressor

WORKER = Path(__file__).with_name("ddp_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(
    tmp_path: Path, runs: list[dict[str, Any]], *, launcher_args: list[str] | None = None, name: str = "cfg",
    port: int | None = None, worker: Path = WORKER,
) -> subprocess.Popen[str]:
    """Start ``torchrun`` on the worker; a single node of 2 processes unless ``launcher_args`` say otherwise."""
    config = tmp_path / f"{name}.json"
    config.write_text(json.dumps({"runs": runs}))
    rendezvous = launcher_args or ["--nproc_per_node=2"]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", *rendezvous,
        "--master_addr=127.0.0.1", f"--master_port={port or free_port()}", str(worker), str(config),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def finish(proc: subprocess.Popen[str], timeout: float = 180) -> str:
    """Wait for the job (the timeout is the hang detector) and return its output; fail on a non-zero exit."""
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


def results(out_dir: Path, world: int = 2) -> list[dict[str, Any]]:
    return [json.loads((out_dir / f"result-{rank}.json").read_text()) for rank in range(world)]


def losses(report: dict[str, Any]) -> list[float]:
    return [entry["loss"] for entry in report["history"] if "loss" in entry]


def assert_same_weights(a: dict[str, Any], b: dict[str, Any], atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(torch.tensor(a[key]), torch.tensor(b[key]), atol=atol, rtol=1e-5, msg=key)


def reference_ddp_sgd(
    n: int, bs: int, ga: int, world: int, epochs: int, lr: float, seed: int
) -> tuple[list[float], Any]:
    """What DDP means, written out: each epoch's seeded permutation padded to a multiple of
    ``world`` and strided over the ranks; per update, the rank's micro-batch mean losses
    averaged over the accumulation group and over the ranks (DDP averages the gradients)."""
    torch.manual_seed(0)
    model = TinyRegressor()
    x, y = tiny_dataset(n).tensors
    trajectory = []
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        padded = torch.cat([perm, perm[: (-n) % world]])
        shards = [padded[rank::world] for rank in range(world)]
        micro = [[s[i : i + bs] for i in range(0, len(s), bs)] for s in shards]
        for start in range(0, len(micro[0]), ga):
            group = range(start, min(start + ga, len(micro[0])))
            model.zero_grad()
            total = 0.0
            for rank in range(world):
                for m in group:
                    idx = micro[rank][m]
                    loss = model(x[idx], y[idx])["loss"] / len(group) / world
                    loss.backward()
                    total += loss.item()
            with torch.no_grad():
                for p in model.parameters():
                    p -= lr * p.grad
            trajectory.append(total)
    return trajectory, model.state_dict()


def test_one_process_runs_no_collective(tmp_path, monkeypatch):
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a collective in a single process")

    for name in ("all_reduce", "barrier", "all_gather_object", "broadcast"):
        monkeypatch.setattr(torch.distributed, name, refuse)
    report = ddp_worker.run({"output_dir": str(tmp_path), "n": 32, "eval_n": 9, "args": {
        "per_device_train_batch_size": 4, "num_train_epochs": 1, "eval_strategy": "epoch", "save_steps": 3}})
    assert (report["world"], report["global_step"], report["wrapped"]) == (1, 8, "TinyRegressor")


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    # a: 32 samples, 4 per rank = 8 per step; eval on 37 samples (uneven shards 19 + 18), best-model saving.
    a = {"output_dir": str(tmp_path / "a"), "n": 32, "eval_n": 37, "args": {
        "per_device_train_batch_size": 4, "num_train_epochs": 2, "eval_strategy": "epoch",
        "save_strategy": "best", "metric_for_best_model": "eval_loss", "load_best_model_at_end": True,
        "learning_rate": 0.05}}
    # b: 37 samples (the shards are padded to 19 each), gradient accumulation with a short last group.
    b = {"output_dir": str(tmp_path / "b"), "n": 37, "sgd": 0.05, "args": {
        "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "num_train_epochs": 2,
        "lr_scheduler_type": "constant", "max_grad_norm": 0.0, "save_strategy": "no"}}
    proc = launch(tmp_path, [a, b])
    single = ddp_worker.run({**a, "output_dir": str(tmp_path / "single"),
                             "args": {**a["args"], "per_device_train_batch_size": 8}})
    finish(proc)

    r0, r1 = results(tmp_path / "a")
    assert losses(r0) == losses(r1)  # the logged loss is the mean over ranks, on every rank
    torch.testing.assert_close(torch.tensor(losses(r0)), torch.tensor(losses(single)), rtol=1e-5, atol=1e-6)
    assert len(losses(r0)) == 8
    assert_same_weights(r0["weights"], single["weights"])  # no "module." prefix: the unwrapped model
    assert r0["weights"] == r1["weights"]
    for report in (r0, r1):
        assert report["wrapped"] == "DistributedDataParallel"
        assert report["eval"]["eval_count"] == 37  # gathered, no sample dropped or counted twice
        assert report["eval"]["eval_pred_sum"] == pytest.approx(single["eval"]["eval_pred_sum"], rel=1e-5)
        assert report["eval"]["eval_loss"] == pytest.approx(single["eval"]["eval_loss"], rel=1e-5)
        assert Path(report["best_model_checkpoint"]).name == Path(single["best_model_checkpoint"]).name
    assert (r0["is_world_process_zero"], r0["is_local_process_zero"]) == (True, True)
    assert (r1["is_world_process_zero"], r1["is_local_process_zero"]) == (False, False)
    assert (r0["progress_bar"], r1["progress_bar"]) == (True, False)
    # One tracker run, created and finished on rank 0, with every training log.
    assert [p.name for p in (tmp_path / "a").glob("tracker-*")] == ["tracker-rank0.jsonl"]
    tracked = (tmp_path / "a" / "tracker-rank0.jsonl").read_text().splitlines()
    assert tracked[-1] == "finished" and sum('"train/loss"' in line for line in tracked) == 8
    checkpoint = Path(r0["best_model_checkpoint"])
    assert is_complete(checkpoint)
    names = {p.name for p in checkpoint.iterdir()}
    assert {"rng_state_0.pth", "rng_state_1.pth", "pytorch_model.bin", "optimizer.pt"} <= names
    assert "rng_state.pth" not in names

    b0, b1 = results(tmp_path / "b")
    expected_losses, expected_weights = reference_ddp_sgd(37, 4, 2, 2, 2, 0.05, seed=3)
    assert len(losses(b0)) == len(expected_losses) == 6
    torch.testing.assert_close(torch.tensor(losses(b0)), torch.tensor(expected_losses), rtol=1e-5, atol=1e-6)
    assert_same_weights(b0["weights"], {k: v.tolist() for k, v in expected_weights.items()})
    assert b0["weights"] == b1["weights"]


@pytest.mark.slow
def test_two_nodes_agree_on_flags_a_callback_raises_on_one_rank(tmp_path):
    common = {"n": 64, "args": {"per_device_train_batch_size": 4, "max_steps": 30, "save_steps": 100}}
    runs = [
        # Rank 1 alone asks for a save at step 2 and a stop at step 3 (on_step_end).
        {**common, "output_dir": str(tmp_path / "step_end"),
         "hooks": {"save": {"rank": 1, "step": 2}, "stop": {"rank": 1, "step": 3}}},
        # Rank 0 alone stops from on_log, after the step boundary's synchronisation.
        {**common, "output_dir": str(tmp_path / "on_log"), "hooks": {"stop_on_log": {"rank": 0, "step": 5}}},
        # Rank 1 alone has a NaN loss at step 2: both ranks skip that update (no clipping to catch it).
        {"n": 64, "output_dir": str(tmp_path / "nan"), "hooks": {"nan": {"rank": 1, "step": 2}},
         "args": {"per_device_train_batch_size": 4, "max_steps": 4, "max_grad_norm": 0.0, "save_strategy": "no"}},
    ]
    port = free_port()
    nodes = [
        launch(tmp_path, runs, name=f"node{node}", port=port,
               launcher_args=["--nnodes=2", "--nproc_per_node=1", f"--node_rank={node}"])
        for node in (0, 1)
    ]
    for proc in nodes:
        finish(proc)

    r0, r1 = results(tmp_path / "step_end")
    assert r0["global_step"] == r1["global_step"] == 3
    assert r0["weights"] == r1["weights"]
    assert [p.name for p in sorted((tmp_path / "step_end").glob("checkpoint-*"))] == ["checkpoint-2", "checkpoint-3"]
    # Each "node" has its own local rank 0; only one process is the world's rank 0.
    assert (r0["is_world_process_zero"], r0["is_local_process_zero"]) == (True, True)
    assert (r1["is_world_process_zero"], r1["is_local_process_zero"]) == (False, True)
    r0, r1 = results(tmp_path / "on_log")
    assert r0["global_step"] == r1["global_step"] == 5
    r0, r1 = results(tmp_path / "nan")
    assert r0["weights"] == r1["weights"]
    assert [h.get("nonfinite_steps_skipped") for h in r0["history"] if "loss" in h] == [None, 1, None, None]
    assert losses(r0) == losses(r1) and all(v == v for v in losses(r0))  # the skipped NaN is not logged


@pytest.mark.slow
def test_sigterm_to_one_worker_saves_once_and_the_run_resumes_exactly(tmp_path):
    # Dropout and a map-style dataset: the resumed run needs each rank's RNG and data position.
    common = {"n": 40, "dropout": 0.2, "dict_dataset": True,
              "args": {"per_device_train_batch_size": 4, "max_steps": 8, "save_steps": 100}}
    straight = {**common, "output_dir": str(tmp_path / "straight")}
    preempted = {**common, "output_dir": str(tmp_path / "preempted"), "hooks": {"sigterm": {"rank": 1, "step": 4}}}
    proc = launch(tmp_path, [straight, preempted])
    pid_file = tmp_path / "preempted" / "victim.pid"
    deadline = time.monotonic() + 120
    while not pid_file.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pid_file.exists(), proc.communicate()[0]
    os.kill(int(pid_file.read_text()), signal.SIGTERM)  # one worker, not torchrun
    output = finish(proc)

    assert output.count("Received SIGTERM") == 1
    p0, p1 = results(tmp_path / "preempted")
    assert p0["preempted"] and p1["preempted"]
    assert p0["global_step"] == p1["global_step"] == 4
    assert [p.name for p in (tmp_path / "preempted").glob("checkpoint-*")] == ["checkpoint-4"]
    checkpoint = tmp_path / "preempted" / "checkpoint-4"
    assert is_complete(checkpoint)
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in checkpoint.iterdir()}
    saved = torch.load(checkpoint / "pytorch_model.bin", weights_only=True)
    assert not any(key.startswith("module.") for key in saved)

    finish(launch(tmp_path, [{**preempted, "hooks": {}, "resume": True}], name="resume"))
    s0, _ = results(tmp_path / "straight")
    r0, r1 = results(tmp_path / "preempted")
    assert r0["global_step"] == r1["global_step"] == 8
    assert_same_weights(r0["weights"], s0["weights"])
    assert losses(r0)[-4:] == pytest.approx(losses(s0)[-4:], rel=1e-5)


@pytest.mark.slow
def test_a_dead_rank_fails_the_job_instead_of_hanging(tmp_path):
    run = {"output_dir": str(tmp_path / "dies"), "n": 64, "hooks": {"die": {"rank": 1, "step": 3}},
           "args": {"per_device_train_batch_size": 4, "max_steps": 100_000, "ddp_timeout": 20, "save_strategy": "no"}}
    proc = launch(tmp_path, [run])
    # The subprocess timeout is the hang detector; ddp_timeout bounds the survivors' wait.
    output, _ = proc.communicate(timeout=150)
    assert proc.returncode != 0, output
    assert "exitcode  : 3" in output or "exitcode: 3" in output, output
    assert not (tmp_path / "dies" / "result-0.json").exists()
