"""Tests of epochal_tensorboard: its event files (tensorboardX's), read back with TensorBoard's own reader."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from epochal_core import Trainer, TrainerState, TrainingArguments
from epochal_core.integrations import rewrite_logs
from epochal_core.testing import CrashAt, ScriptedFailure, TinyRegressor, scripted_run, tiny_dataset
from epochal_tensorboard import LOGGING_DIR_ENV, TensorBoardCallback
from tensorboard.backend.event_processing.event_accumulator import SCALARS, TENSORS, EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.plugins.hparams import plugin_data_pb2
from tensorboard.util import tensor_util

# -- reading back ------------------------------------------------------------------------------


def accumulate(logdir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(logdir), size_guidance={SCALARS: 0, TENSORS: 0})
    acc.Reload()
    return acc


def read_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = accumulate(logdir)
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def read_texts(logdir: Path) -> dict[str, list[tuple[int, str]]]:
    acc = accumulate(logdir)
    texts = {}
    for tag in acc.Tags()["tensors"]:
        if tag.endswith("/text_summary"):
            texts[tag.removesuffix("/text_summary")] = [
                (e.step, tensor_util.make_ndarray(e.tensor_proto).item().decode()) for e in acc.Tensors(tag)
            ]
    return texts


def read_hparams(logdir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for raw in accumulate(logdir).PluginTagToContent("hparams").values():
        data = plugin_data_pb2.HParamsPluginData.FromString(raw)
        if data.HasField("session_start_info"):
            out["start"] = {k: v.string_value or v.bool_value or v.number_value
                            for k, v in data.session_start_info.hparams.items()}
        if data.HasField("session_end_info"):
            out["status"] = data.session_end_info.status
    return out


def expected_scalars(log_history: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard should show for these logs: rewritten tags, each value at its log's step."""
    expected: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for entry in log_history:
        logs = {k: v for k, v in entry.items() if k != "step"}
        for tag, value in rewrite_logs(logs).items():
            if isinstance(value, (int, float)):
                expected[tag].append((entry["step"], float(value)))
    return dict(expected)


def assert_same_scalars(got: dict[str, list[tuple[int, float]]], want: dict[str, list[tuple[int, float]]]) -> None:
    assert sorted(got) == sorted(want)
    for tag, points in want.items():
        assert [s for s, _ in got[tag]] == [s for s, _ in points], tag
        # Event files store float32.
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in points], rel=1e-6, abs=1e-7), tag


# -- scripted runs -------------------------------------------------------------------------------


def test_scripted_run_writes_every_scalar_with_its_step(tmp_path: Path) -> None:
    logdir = tmp_path / "tb"
    run = scripted_run(TensorBoardCallback(log_dir=logdir), output_dir=tmp_path / "out")

    assert_same_scalars(read_scalars(logdir), expected_scalars(run.state.log_history))
    assert {"train/loss", "train/grad_norm", "eval/loss", "eval/accuracy", "train/train_runtime"} <= set(
        read_scalars(logdir)
    )
    texts = read_texts(logdir)
    assert json.loads(texts["args"][0][1])["run_name"] == "scripted-run"
    assert json.loads(texts["model_config"][0][1]) == {"activation": "relu", "hidden_size": 8, "num_layers": 2}
    hparams = read_hparams(logdir)
    assert hparams["start"]["args/max_steps"] == 10.0
    assert hparams["start"]["config/activation"] == "relu"
    assert hparams["status"] == 1  # STATUS_SUCCESS


def test_strings_are_text_and_other_values_dropped_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    logdir = tmp_path / "tb"
    with caplog.at_level(logging.WARNING):
        run = scripted_run(
            TensorBoardCallback(log_dir=logdir), output_dir=tmp_path / "out",
            extra_logs={"phase": "warmup", "histogram": [1, 2, 3]},
        )

    train_steps = [e["step"] for e in run.state.log_history if "phase" in e]
    assert read_texts(logdir)["train/phase"] == [(step, "warmup") for step in train_steps]
    assert "train/histogram" not in read_scalars(logdir)
    dropped = [r for r in caplog.records if "train/histogram" in r.getMessage()]
    assert len(dropped) == 1


def test_log_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none")
    state = TrainerState()
    assert TensorBoardCallback().resolve_log_dir(args, state) == str(tmp_path / "out" / "runs")
    monkeypatch.setenv(LOGGING_DIR_ENV, "~/tb-env")
    assert TensorBoardCallback().resolve_log_dir(args, state) == os.path.expanduser("~/tb-env")
    assert TensorBoardCallback(log_dir=tmp_path / "x").resolve_log_dir(args, state) == str(tmp_path / "x")
    state.trial_name = "trial-3"
    assert TensorBoardCallback(log_dir="x").resolve_log_dir(args, state) == os.path.join("x", "trial-3")


def test_user_writer_is_used(tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tmp_path / "mine"))
    run = scripted_run(TensorBoardCallback(writer), output_dir=tmp_path / "out")

    assert_same_scalars(read_scalars(tmp_path / "mine"), expected_scalars(run.state.log_history))
    assert json.loads(read_texts(tmp_path / "mine")["args"][0][1])["run_name"] == "scripted-run"
    assert not (tmp_path / "out" / "runs").exists()


# -- a real Trainer ----------------------------------------------------------------------------------


def trainer_args(out: Path, **kwargs: Any) -> TrainingArguments:
    defaults: dict[str, Any] = dict(
        output_dir=str(out), report_to=["tensorboard"], max_steps=6, logging_steps=1, save_steps=3,
        per_device_train_batch_size=4, disable_tqdm=True, use_cpu=True,
    )
    return TrainingArguments(**{**defaults, **kwargs})


def test_trainer_run_matches_log_history(tmp_path: Path) -> None:
    trainer = Trainer(model=TinyRegressor(), args=trainer_args(tmp_path / "out"), train_dataset=tiny_dataset())
    trainer.train()

    logdir = tmp_path / "out" / "runs"
    assert_same_scalars(read_scalars(logdir), expected_scalars(trainer.state.log_history))
    assert [s for s, _ in read_scalars(logdir)["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert json.loads(read_texts(logdir)["args"][0][1])["max_steps"] == 6
    assert trainer.integration_failures == []


def test_a_user_writer_runs_on_the_reporter_thread_with_each_logs_own_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reporter runs a passed-in writer up to 0.2 s late; each event keeps the training thread's time."""
    import epochal_core.background
    from torch.utils.tensorboard import SummaryWriter

    emitted = iter(1_600_000_000.0 + 10 * i for i in range(1000))  # the reporter's clock only, not the writer's
    monkeypatch.setattr(epochal_core.background, "_now", lambda: next(emitted))
    callback = TensorBoardCallback(SummaryWriter(log_dir=str(tmp_path / "mine")))
    assert not callback.run_inline  # a writer passed in is queued (the built-in one runs inline)
    trainer = Trainer(model=TinyRegressor(), args=trainer_args(tmp_path / "out", save_strategy="no", report_to="none"),
                      train_dataset=tiny_dataset(), callbacks=[callback])
    trainer.train()
    times = [e.wall_time for e in accumulate(tmp_path / "mine").Scalars("train/loss")]
    assert len(times) == 6
    assert all(t % 10 == 0 and t >= 1_600_000_000.0 for t in times)  # stamps, not the writer's time.time()
    assert times == sorted(times) and len(set(times)) == 6


def test_the_built_in_writer_writes_every_record_on_its_own_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The training thread only queues; tensorboardX's EventsWriter is called from the writer's thread alone."""
    import threading

    from tensorboardX.event_file_writer import EventsWriter

    writers: list[str] = []
    write_event = EventsWriter.write_event

    def spy(self: Any, event: Any) -> Any:
        writers.append(threading.current_thread().name)
        return write_event(self, event)

    monkeypatch.setattr(EventsWriter, "write_event", spy)
    callback = TensorBoardCallback()
    assert callback.run_inline  # a log is an append on the training thread
    trainer = Trainer(model=TinyRegressor(), args=trainer_args(tmp_path / "out", report_to="none"),
                      train_dataset=tiny_dataset(), callbacks=[callback])
    trainer.train()
    assert len(writers) > 6 and set(writers) == {"epochal-tensorboard-writer"}
    assert_same_scalars(read_scalars(tmp_path / "out" / "runs"), expected_scalars(trainer.state.log_history))


def test_logs_reach_the_file_while_training_runs(tmp_path: Path) -> None:
    """A live TensorBoard sees each log within a fraction of a second, even when no further log follows."""
    import time

    from epochal_core import TrainerCallback

    seen: list[int] = []
    out = tmp_path / "out"

    class Peek(TrainerCallback):
        def on_step_end(self, args: Any, state: TrainerState, control: Any, **kwargs: Any) -> None:
            if state.global_step == 3:  # before step 3's log: steps 1 and 2 were logged
                # Training waits here, so no further log comes: the writer's own wake-up
                # (every 0.2 s) must hand them to the file. Polled, with a bound far above that.
                deadline = time.monotonic() + 30
                while len(seen) < 2 and time.monotonic() < deadline:
                    time.sleep(0.05)
                    if (out / "runs").is_dir():
                        seen[:] = [s for s, _ in read_scalars(out / "runs").get("train/loss", [])]

    trainer = Trainer(model=TinyRegressor(), args=trainer_args(out, max_steps=4, save_strategy="no"),
                      train_dataset=tiny_dataset(), callbacks=[Peek()])
    trainer.train()
    assert seen == [1, 2]


def test_trainer_crash_and_resume_writes_each_step_once(tmp_path: Path) -> None:
    out = tmp_path / "out"
    crashed = Trainer(
        model=TinyRegressor(), args=trainer_args(out), train_dataset=tiny_dataset(),
        callbacks=[CrashAt(5, before_next_step=True)],
    )
    with pytest.raises(ScriptedFailure):
        crashed.train()
    assert read_hparams(out / "runs")["status"] == 2  # STATUS_FAILURE: the crash closed the writer

    resumed = Trainer(model=TinyRegressor(), args=trainer_args(out), train_dataset=tiny_dataset())
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-3"))

    steps = [s for s, _ in read_scalars(out / "runs")["train/loss"]]
    assert steps == [1, 2, 3, 4, 5, 6]
    want = expected_scalars(resumed.state.log_history)
    assert_same_scalars(read_scalars(out / "runs"), want)


# -- resume ------------------------------------------------------------------------------------------


def test_resume_purges_steps_logged_after_the_checkpoint(tmp_path: Path) -> None:
    logdir, out = tmp_path / "tb", tmp_path / "out"
    # Crash after step 6 was logged; the last checkpoint is step 5. "crash_only" is logged only
    # by the crashed run, so nothing but the purge can remove its steps 6.
    crashed = TensorBoardCallback(log_dir=logdir)
    with pytest.raises(ScriptedFailure):
        scripted_run(crashed, output_dir=out, logging_steps=1, fail_at_step=7, extra_logs={"crash_only": 1.0})
    assert crashed.last_logged_step == 6

    state = TrainerState.load_from_json(str(out / "checkpoint-5" / "trainer_state.json"))
    before = [e for e in state.log_history if e["step"] <= 5]
    resumed = TensorBoardCallback(log_dir=logdir)
    resumed.load_state_dict({"run_id": str(logdir), "last_logged_step": 5})
    run = scripted_run(resumed, output_dir=out, logging_steps=1, start_step=5, state=state)

    files = sorted(logdir.glob("events.out.tfevents.*"))
    assert len(files) == 2
    resumed_events = list(EventFileLoader(str(files[1])).Load())
    assert any(e.HasField("session_log") and e.step == 6 for e in resumed_events[:3])

    scalars = read_scalars(logdir)
    for tag, points in scalars.items():
        if tag != "train/epoch":  # logged by every log, so legitimately several times per step
            assert len({s for s, _ in points}) == len(points), f"{tag} has a step twice: {points}"
    assert [s for s, _ in scalars["train/crash_only"]] == [1, 2, 3, 4, 5]
    assert [s for s, _ in scalars["train/loss"]] == list(range(1, 11))
    assert_same_scalars(scalars, expected_scalars(run.state.log_history))
    assert run.state.log_history[: len(before)] == before


# -- failures ----------------------------------------------------------------------------------------


def test_unusable_log_dir_is_isolated_when_not_strict(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with caplog.at_level(logging.WARNING):
        run = scripted_run(TensorBoardCallback(log_dir=blocker / "tb"), output_dir=tmp_path / "out", strict=False)

    assert run.state.global_step == 10
    assert len(run.failures) == 1
    assert run.failures[0].event == "on_train_begin"
    assert isinstance(run.failures[0].error, OSError)
    assert any("failed in on_train_begin" in r.getMessage() for r in caplog.records)


def test_unusable_log_dir_raises_when_strict(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError):
        scripted_run(TensorBoardCallback(log_dir=blocker / "tb"), output_dir=tmp_path / "out", strict=True)


def fill_disk_under(logdir: Path) -> tuple[int, int]:
    """Point the open event file of ``logdir`` at /dev/full, as if the disk had just filled up.

    Every later write to it fails with a real ENOSPC from the kernel (even as root), which no
    directory setting can produce mid-run. Returns ``(fd, saved duplicate of the original)``.
    """
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(logdir)) and "tfevents" in target:
            saved = os.dup(fd)
            full = os.open("/dev/full", os.O_WRONLY)
            os.dup2(full, fd)
            os.close(full)
            return fd, saved
    raise AssertionError(f"no open event file under {logdir}")


class DiskFullAt(TensorBoardCallback):
    """The callback under test; the disk fills up just before the log of ``step``."""

    def __init__(self, step: int, log_dir: Path) -> None:
        super().__init__(log_dir=log_dir)
        self.step = step
        self.filled: tuple[int, int] | None = None

    def on_log(self, args: Any, state: TrainerState, control: Any, logs: Any = None, **kwargs: Any) -> Any:
        if state.global_step == self.step and self.filled is None:
            assert self.event_writer is not None
            self.event_writer.write_out()  # the writer's thread has opened the file and written what came before
            self.filled = fill_disk_under(Path(self.log_dir or ""))
        return super().on_log(args, state, control, logs, **kwargs)

    def free_disk(self) -> None:
        if self.filled is None:
            return
        fd, saved = self.filled
        with contextlib.suppress(OSError):
            # Only if the writer did not close that descriptor meanwhile (it may be reused).
            if os.readlink(f"/proc/self/fd/{fd}") == "/dev/full":
                os.dup2(saved, fd)
        os.close(saved)
        if self.event_writer is not None:
            with contextlib.suppress(OSError):
                self.event_writer.close()  # re-raises the writer's error


@pytest.fixture
def disk_full(tmp_path: Path) -> Iterator[DiskFullAt]:
    if not os.path.exists("/dev/full") or not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs Linux /dev/full and /proc")
    callback = DiskFullAt(4, tmp_path / "tb")
    yield callback
    callback.free_disk()


def test_disk_full_mid_run_disables_the_integration(
    disk_full: DiskFullAt, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        run = scripted_run(disk_full, output_dir=tmp_path / "out", strict=False)

    assert run.state.global_step == 10
    assert disk_full.filled is not None
    assert len(run.failures) == 1
    failure = run.failures[0]
    # The writer's first write-out after the disk filled up fails with ENOSPC; the training thread's
    # next call to the writer (a log, or the step-5 checkpoint's fsync) raises it.
    assert isinstance(failure.error, OSError) and failure.error.errno == errno.ENOSPC
    assert failure.event in {"on_log", "on_save"}
    assert any("was disabled; training continues" in r.getMessage() for r in caplog.records)
    # What reached the file before the disk filled up is intact and readable.
    disk_full.free_disk()
    disk_full.filled = None
    assert json.loads(read_texts(tmp_path / "tb")["args"][0][1])["run_name"] == "scripted-run"
    steps = [s for s, _ in read_scalars(tmp_path / "tb").get("train/loss", [])]
    assert steps == [2, 4][: len(steps)]


def test_disk_full_mid_run_raises_when_strict(disk_full: DiskFullAt, tmp_path: Path) -> None:
    with pytest.raises(OSError) as raised:
        scripted_run(disk_full, output_dir=tmp_path / "out", strict=True)
    assert raised.value.errno == errno.ENOSPC


def test_a_user_writer_is_closed_at_train_end_and_failures_in_it_are_isolated(tmp_path: Path) -> None:
    class BrokenWriter:
        def __init__(self) -> None:
            self.closed = False

        def add_text(self, tag: str, text: str, step: int) -> None:
            pass

        def add_scalar(self, tag: str, value: float, step: int) -> None:
            raise ConnectionResetError("remote filesystem went away")

        def flush(self) -> None:
            pass

        def close(self) -> None:
            self.closed = True

    writer = BrokenWriter()
    run = scripted_run(TensorBoardCallback(writer), output_dir=tmp_path / "out", strict=False)

    assert run.state.global_step == 10
    assert [(f.event, type(f.error)) for f in run.failures] == [("on_log", ConnectionResetError)]
    assert writer.closed  # the failure closed the run




# -- names: what transformers' TensorBoardCallback writes ------------------------------------------------

# transformers' TensorBoardCallback (src/transformers/integrations/integration_utils.py):
#   on_train_begin: tb_writer.add_text("args", args.to_json_string()) and, when the model has a config,
#                   tb_writer.add_text("model_config", model.config.to_json_string());
#   on_log:         for k, v in rewrite_logs(logs).items(): add_scalar(k, v, state.global_step) for int/float,
#                   add_text(k, v, state.global_step) for str.
# SummaryWriter.add_text stores a text under "<tag>/text_summary"; rewrite_logs maps eval_x -> eval/x,
# test_x -> test/x, anything else -> train/x.
TRANSFORMERS_TEXT_TAGS = {"args/text_summary", "model_config/text_summary"}
TRANSFORMERS_TRAIN_TAGS = {"train/loss", "train/grad_norm", "train/learning_rate", "train/epoch"}
TRANSFORMERS_EVAL_TAGS = {"eval/loss", "eval/accuracy", "eval/runtime", "eval/samples_per_second",
                          "eval/steps_per_second"}
TRANSFORMERS_SUMMARY_TAGS = {"train/train_runtime", "train/train_samples_per_second", "train/train_steps_per_second",
                             "train/total_flos", "train/train_loss"}


def test_tags_are_the_ones_transformers_writes(tmp_path: Path) -> None:
    """Read back from the event files: the same tags as transformers' callback driven through tensorboardX."""
    from tensorboardX import SummaryWriter

    logdir = tmp_path / "tb"
    run = scripted_run(TensorBoardCallback(log_dir=logdir), output_dir=tmp_path / "out")
    acc = accumulate(logdir)
    ours = set(acc.Tags()["scalars"]) | {t for t in acc.Tags()["tensors"] if t.endswith("/text_summary")}
    keys = {k for entry in run.state.log_history for k in entry if k != "step"}
    want = TRANSFORMERS_TEXT_TAGS | set(rewrite_logs(dict.fromkeys(keys)))
    assert ours == want
    assert ours >= TRANSFORMERS_TRAIN_TAGS | TRANSFORMERS_EVAL_TAGS | TRANSFORMERS_SUMMARY_TAGS | TRANSFORMERS_TEXT_TAGS

    # transformers' calls, made on tensorboardX's own SummaryWriter, give the same tags.
    writer = SummaryWriter(logdir=str(tmp_path / "anchor"))
    writer.add_text("args", "{}")  # transformers: args.to_json_string()
    writer.add_text("model_config", "{}")  # transformers: model.config.to_json_string()
    for entry in run.state.log_history:
        for key, value in rewrite_logs({k: v for k, v in entry.items() if k != "step"}).items():
            writer.add_scalar(key, value, entry["step"])
    writer.close()
    anchor = accumulate(tmp_path / "anchor")
    assert set(anchor.Tags()["scalars"]) | set(anchor.Tags()["tensors"]) == ours


def test_tags_are_cleaned_as_tensorboardx_cleans_them(tmp_path: Path) -> None:
    from tensorboardX import SummaryWriter

    logdir = tmp_path / "tb"
    scripted_run(TensorBoardCallback(log_dir=logdir), output_dir=tmp_path / "out", extra_logs={"odd key!": 1.0})
    writer = SummaryWriter(logdir=str(tmp_path / "anchor"))
    writer.add_scalar("train/odd key!", 1.0, 1)
    writer.close()
    [anchor_tag] = accumulate(tmp_path / "anchor").Tags()["scalars"]
    assert anchor_tag == "train/odd_key_"
    assert anchor_tag in read_scalars(logdir)


def test_a_diverged_value_is_written_as_infinite(tmp_path: Path) -> None:
    """Event files hold float32: 1e39 reads back as inf (protobuf's conversion), the integration keeps going."""
    logdir = tmp_path / "tb"
    run = scripted_run(TensorBoardCallback(log_dir=logdir), output_dir=tmp_path / "out",
                       extra_logs={"diverged": 1e39, "gone": float("nan")})
    assert not run.failures
    scalars = read_scalars(logdir)
    assert {v for _, v in scalars["train/diverged"]} == {math.inf}
    assert all(math.isnan(v) for _, v in scalars["train/gone"])


def test_two_runs_in_one_directory_within_a_second_keep_both_files(tmp_path: Path) -> None:
    logdir = tmp_path / "tb"
    scripted_run(TensorBoardCallback(log_dir=logdir), output_dir=tmp_path / "a", max_steps=2)
    scripted_run(TensorBoardCallback(log_dir=logdir), output_dir=tmp_path / "b", max_steps=2)
    assert len(list(logdir.glob("events.out.tfevents.*"))) == 2
    assert [s for s, _ in read_scalars(logdir)["train/loss"]] == [2, 2]


# -- tensorboardX, comet_ml and the training thread -------------------------------------------------------

_RUN = """
import json, sys, threading, torch
importers = {}

class Spy:
    # Records which thread executes the modules below (an import, not a mere find_spec).
    def find_spec(self, name, path=None, target=None):
        if name in BLOCKED:
            raise ImportError(f"{name} blocked: as if not installed")
        if name not in ("tensorboardX", "comet_ml"):
            return None
        for finder in sys.meta_path:
            spec = finder.find_spec(name, path, target) if finder is not self and hasattr(finder, "find_spec") \
                else None
            if spec is not None:
                execute = spec.loader.exec_module

                def exec_module(module, execute=execute, name=name):
                    importers.setdefault(name, threading.current_thread().name)
                    execute(module)

                spec.loader.exec_module = exec_module
                return spec
        return None

BLOCKED = set(sys.argv[2:])
sys.meta_path.insert(0, Spy())
from epochal_core import Trainer, TrainingArguments
from epochal_core.testing import TinyRegressor, tiny_dataset
args = TrainingArguments(output_dir=sys.argv[1], report_to=["tensorboard"], max_steps=8, logging_steps=1,
                         disable_tqdm=True, use_cpu=True, save_strategy="no", seed=7)
torch.manual_seed(0)  # the same initial weights in both processes
trainer = Trainer(model=TinyRegressor(), args=args, train_dataset=tiny_dataset())
trainer.train()
weights = {k: v.tolist() for k, v in trainer.model.state_dict().items()}
print(json.dumps({"weights": weights, "importers": importers, "failures": len(trainer.integration_failures),
                  "comet_ml": "comet_ml" in sys.modules}))
"""


def _train_in_subprocess(out: Path, blocked: list[str]) -> dict[str, Any]:
    import subprocess
    import sys

    env = dict(os.environ)
    # comet_ml as a user gets it: its import hooks on (the test session turns them off).
    env.pop("COMET_DISABLE_AUTO_LOGGING", None)
    done = subprocess.run([sys.executable, "-c", _RUN, str(out), *blocked], capture_output=True, text=True,
                          timeout=300, check=False, env=env)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.slow
def test_tensorboardx_and_comet_ml_load_off_the_training_thread_and_change_no_weights(tmp_path: Path) -> None:
    """A TensorBoard-only run with every package installed (comet_ml comes with tensorboardX) trains the
    same weights as one where only epochal-core and epochal-tensorboard are installed."""
    pytest.importorskip("comet_ml")
    everything = _train_in_subprocess(tmp_path / "all", [])
    alone = _train_in_subprocess(tmp_path / "alone", ["comet_ml", "epochal", "epochal_comet", "epochal_dvclive",
                                                      "epochal_neptune", "dvclive", "neptune"])
    assert everything["comet_ml"] and not alone["comet_ml"]
    assert everything["failures"] == alone["failures"] == 0
    # tensorboardX (and with it comet_ml) was imported by the writer's thread, not the training thread.
    assert everything["importers"]["tensorboardX"] == "epochal-tensorboard-writer"
    assert everything["importers"]["comet_ml"] == "epochal-tensorboard-writer"
    assert everything["weights"] == alone["weights"]
    assert [s for s, _ in read_scalars(tmp_path / "all" / "runs")["train/loss"]] == list(range(1, 9))
