"""Tests of epochal_tensorboard: its event files, read back with TensorBoard's own reader (which checks every CRC)."""

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
from epochal_tensorboard import LOGGING_DIR_ENV, EventFileWriter, TensorBoardCallback, crc32c
from tensorboard.backend.event_processing.event_accumulator import SCALARS, TENSORS, EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.compat.proto.event_pb2 import Event
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
    assert hparams["start"]["model/activation"] == "relu"
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


# -- the event-file writer ---------------------------------------------------------------------------


def test_crc32c_matches_tensorboards_reader() -> None:
    from epochal_tensorboard import _masked_crc
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    data = bytes(range(256)) * 2
    for n in [*range(40), 63, 64, 65, 255, 512]:
        assert _masked_crc(data[:n]) == masked_crc32c(data[:n]).to_bytes(4, "little"), n


def test_reader_checks_the_crcs_it_reads(tmp_path: Path) -> None:
    """A flipped byte is caught by TensorBoard's reader: the round trips in this file verify every CRC."""
    from tensorboard.compat.tensorflow_stub.errors import DataLossError
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import PyRecordReader_New

    writer = EventFileWriter(tmp_path)
    writer.write_scalars({"a": 1.0, "b": 2.5}, global_step=7, walltime=123.0)
    writer.close()
    assert read_scalars(tmp_path) == {"a": [(7, 1.0)], "b": [(7, 2.5)]}
    raw = bytearray(Path(writer.path).read_bytes())
    raw[-6] ^= 0x01  # inside the last event's data
    Path(writer.path).write_bytes(bytes(raw))
    # The loader stops at the bad record (it may be a half-written one); the record reader says why.
    assert len(list(EventFileLoader(writer.path).Load())) == 1  # only the file-version event is left
    reader = PyRecordReader_New(writer.path)
    reader.GetNext()
    with pytest.raises(DataLossError, match="failed event crc32 check"):
        reader.GetNext()


def read_scalar_events(path: str, count: int) -> list[tuple[int, float, dict[str, float]]]:
    """The first ``count`` events after the file version, read record by record (a bad CRC raises)."""
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import PyRecordReader_New

    reader = PyRecordReader_New(path)
    reader.GetNext()  # the file version
    events = []
    for _ in range(count):
        reader.GetNext()  # raises DataLossError on a bad CRC
        event = Event.FromString(reader.record())
        events.append((event.step, event.wall_time, {v.tag: v.simple_value for v in event.summary.value}))
    return events


def test_every_scalar_event_shape_gets_a_valid_crc(tmp_path: Path) -> None:
    """Per-log CRCs come from per-shape templates: steps of every varint width, tag sets, a long event."""
    writer = EventFileWriter(tmp_path)
    long_log = {f"eval/metric_number_{i:02d}": float(i) for i in range(20)}  # past the templated size
    written = []
    for step in [0, 1, 127, 128, 16383, 16384, 2**21, 2**40]:
        for values in ({"train/loss": step / 3.0}, {"train/loss": 1.5, "train/lr": -2.0, "train/ok": True}, long_log):
            writer.write_scalars(values, global_step=step, walltime=1_700_000_000.0 + step)
            written.append((step, values))
    writer.close()
    for (step, values), (got_step, wall_time, got) in zip(written, read_scalar_events(writer.path, len(written))):
        assert got_step == step and wall_time == 1_700_000_000.0 + step
        assert got == pytest.approx({tag: float(value) for tag, value in values.items()})


def test_values_beyond_float32_are_written_as_infinite(tmp_path: Path) -> None:
    """A diverging loss (1e39) is shown as inf, as protobuf stores it, instead of failing the integration."""
    writer = EventFileWriter(tmp_path)
    writer.write_scalars({"loss": 1e39, "neg": -1e300, "ok": 2.0, "nan": float("nan")}, global_step=1)
    writer.close()
    got = read_scalars(tmp_path)
    assert got["loss"] == [(1, math.inf)] and got["neg"] == [(1, -math.inf)] and got["ok"] == [(1, 2.0)]
    assert math.isnan(got["nan"][0][1])


def test_writer_api_matches_summary_writer_for_scalars_and_text(tmp_path: Path) -> None:
    writer = EventFileWriter(tmp_path, filename_suffix=".x")
    writer.add_scalar("loss", 0.5, 3)
    writer.add_scalar("bad tag!", 1, global_step=4)
    writer.add_text("note", "héllo", 5)
    writer.write_scalars({"big_step": 2.0}, global_step=2**40)
    writer.flush()
    assert read_scalars(tmp_path) == {"loss": [(3, 0.5)], "bad_tag_": [(4, 1.0)], "big_step": [(2**40, 2.0)]}
    assert read_texts(tmp_path) == {"note": [(5, "héllo")]}
    writer.close()
    writer.close()  # twice is fine
    assert writer.closed and writer.path.endswith(".x")
    with pytest.raises(ValueError, match="is closed"):
        writer.add_scalar("loss", 1.0, 6)


def test_a_writer_never_truncates_another_ones_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import epochal_tensorboard

    monkeypatch.setattr(epochal_tensorboard.time, "time", lambda: 1_700_000_000.0)  # the same second
    first = EventFileWriter(tmp_path, filename_suffix=".1")
    first.add_scalar("a", 1.0, 1)
    first.close()
    with pytest.raises(FileExistsError):
        EventFileWriter(tmp_path, filename_suffix=".1")
    second = EventFileWriter(tmp_path, filename_suffix=".2")
    second.add_scalar("a", 2.0, 2)
    second.close()
    assert read_scalars(tmp_path) == {"a": [(1, 1.0), (2, 2.0)]}


def test_construction_has_no_side_effects(tmp_path: Path) -> None:
    before = set(tmp_path.rglob("*"))
    callback = TensorBoardCallback(log_dir=tmp_path / "tb")
    TensorBoardCallback()
    assert set(tmp_path.rglob("*")) == before
    assert callback.tb_writer is None
    assert TensorBoardCallback.configuration_problem() is None


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
    assert not callback.run_inline  # the built-in writer runs inline (see the next tests)
    trainer = Trainer(model=TinyRegressor(), args=trainer_args(tmp_path / "out", save_strategy="no", report_to="none"),
                      train_dataset=tiny_dataset(), callbacks=[callback])
    trainer.train()
    times = [e.wall_time for e in accumulate(tmp_path / "mine").Scalars("train/loss")]
    assert len(times) == 6
    assert all(t % 10 == 0 and t >= 1_600_000_000.0 for t in times)  # stamps, not the writer's time.time()
    assert times == sorted(times) and len(set(times)) == 6


def test_the_built_in_writer_runs_on_the_training_thread(tmp_path: Path) -> None:
    """A log is an append to the writer's queue on the training thread; its own thread writes the file."""
    import threading

    seen: set[str] = set()

    class Spy(TensorBoardCallback):
        def log_metrics(self, metrics: Any, step: int, state: TrainerState) -> None:
            seen.add(threading.current_thread().name)
            super().log_metrics(metrics, step, state)

    trainer = Trainer(model=TinyRegressor(), args=trainer_args(tmp_path / "out", report_to="none"),
                      train_dataset=tiny_dataset(), callbacks=[Spy()])
    trainer.train()
    assert seen == {threading.main_thread().name}
    assert_same_scalars(read_scalars(tmp_path / "out" / "runs"), expected_scalars(trainer.state.log_history))
    with pytest.raises(ValueError, match="flush_interval=0"):
        EventFileWriter(tmp_path / "x", flush_interval=0)


def test_logs_reach_the_file_while_training_runs(tmp_path: Path) -> None:
    """A live TensorBoard sees each log within a fraction of a second, even when no further log follows."""
    import time

    from epochal_core import TrainerCallback

    seen: list[int] = []
    out = tmp_path / "out"

    class Peek(TrainerCallback):
        def on_step_end(self, args: Any, state: TrainerState, control: Any, **kwargs: Any) -> None:
            if state.global_step == 3:  # before step 3's log: steps 1 and 2 were logged
                # Training waits here, so no further log comes: the reporter's own wake-up
                # (every 0.2 s) must write them. Polled, with a bound far above that.
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
        if self.tb_writer is not None:
            self.tb_writer.close()


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
    # The first write-out after the disk filled up fails with ENOSPC: the writer's background
    # write-out, or the checkpoint's flush when the step-5 save comes first.
    assert isinstance(failure.error, OSError) and failure.error.errno == errno.ENOSPC
    # The writer's thread found it; the next log or save on the training thread reports it.
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


def test_a_run_imports_no_tensorboard_package(tmp_path: Path) -> None:
    """No tensorboardX (which imports comet_ml when installed), no tensorboard: only the format is written."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from epochal_core import Trainer, TrainingArguments\n"
        "from epochal_core.testing import TinyRegressor, tiny_dataset\n"
        f"args = TrainingArguments(output_dir={str(tmp_path / 'out')!r}, report_to=['tensorboard'], max_steps=3,\n"
        "                          logging_steps=1, disable_tqdm=True, use_cpu=True, save_strategy='no')\n"
        "Trainer(model=TinyRegressor(), args=args, train_dataset=tiny_dataset()).train()\n"
        "print(sorted(m for m in ('tensorboardX', 'tensorboard', 'comet_ml') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert [s for s, _ in read_scalars(tmp_path / "out" / "runs")["train/loss"]] == [1, 2, 3]


@pytest.mark.parametrize("count", [1, 23, 24, 300])
def test_runs_of_events_are_encoded_together_with_valid_crcs(tmp_path: Path, count: int) -> None:
    """A run of same-shape logs is encoded at once (pure Python below 24 events, torch from 24 on)."""
    writer = EventFileWriter(tmp_path, flush_interval=None)
    written = []
    for i in range(count):
        step = 120 + i  # crosses the 1- to 2-byte varint boundary at 128: two shapes
        values = {"train/loss": 1 / (i + 1), "train/lr": -3e-4 * i, "train/big": 1e39 * (i % 2), "train/n": i}
        writer.write_scalars(values, global_step=step, walltime=1_700_000_000.0 + i / 7)
        written.append((step, values))
    writer.close()
    for (step, values), (got_step, wall_time, got) in zip(written, read_scalar_events(writer.path, count)):
        assert got_step == step and wall_time == 1_700_000_000.0 + (step - 120) / 7
        want = {tag: float(value) if abs(value) < 1e38 else math.inf for tag, value in values.items()}
        assert got == pytest.approx(want, rel=1e-6)
