import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from epochal_core import EarlyStoppingCallback, ExportableState, Trainer, TrainerCallback, TrainingArguments
from epochal_core.checkpoint import (
    COMMIT_MARKER,
    CheckpointChanged,
    CheckpointError,
    is_complete,
    latest_checkpoint,
    verify_checkpoint,
)
from epochal_core.testing import CrashAt, ScriptedFailure
from helpers_core import DictDataset, TinyRegressor

TESTS = str(Path(__file__).parent)


def make_args(out, **kw):
    base = dict(output_dir=str(out), report_to="none", disable_tqdm=True, learning_rate=0.05,
                per_device_train_batch_size=4, gradient_accumulation_steps=2, logging_steps=1, save_steps=5,
                max_steps=12, seed=7)
    base.update(kw)
    return TrainingArguments(**base)


def run(out, resume=None, callbacks=None, **kw):
    torch.manual_seed(0)
    trainer = Trainer(TinyRegressor(dropout=0.2), make_args(out, **kw), train_dataset=DictDataset(40),
                      callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def comparable(history):
    skip = ("runtime", "per_second")
    return [{k: v for k, v in h.items() if not any(s in k for s in skip)} for h in history[:-1]]


def test_resume_is_bit_identical_mid_epoch_with_accumulation_and_shuffling(tmp_path):
    straight = run(tmp_path / "a")
    # 40 samples / batch 4 / accumulation 2 = 5 updates per epoch; crash at 7, resume from checkpoint-5.
    with pytest.raises(ScriptedFailure):
        run(tmp_path / "b", callbacks=[CrashAt(7)])
    resumed = run(tmp_path / "b", resume=True)
    assert resumed.state.global_step == 12
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    sa, sb = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    for key in sa:
        for name in sa[key]:
            assert torch.equal(torch.as_tensor(sa[key][name]), torch.as_tensor(sb[key][name]))
    assert straight.lr_scheduler.state_dict() == resumed.lr_scheduler.state_dict()
    assert comparable(straight.state.log_history) == comparable(resumed.state.log_history)


def test_resume_mid_epoch_with_dataloader_path(tmp_path):
    kw = dict(max_steps=7, gradient_accumulation_steps=1, per_device_train_batch_size=8, save_steps=3)
    straight = run(tmp_path / "a", **kw)
    with pytest.raises(ScriptedFailure):
        run(tmp_path / "b", callbacks=[CrashAt(4)], **kw)
    resumed = run(tmp_path / "b", resume=True, **kw)
    for a, b in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)


def test_resume_ignores_and_reports_incomplete_checkpoints(tmp_path, caplog):
    out = tmp_path / "out"
    run(out, max_steps=5, save_steps=2)
    broken = out / "checkpoint-9"
    broken.mkdir()
    (broken / "pytorch_model.bin").write_bytes(b"half")  # no manifest: an interrupted save
    (out / ".tmp-checkpoint-10-w").mkdir()
    assert not is_complete(broken)
    assert latest_checkpoint(out).name == "checkpoint-5"
    assert "Ignoring incomplete checkpoint" in caplog.text and "checkpoint-9" in caplog.text
    assert "interrupted" in caplog.text
    resumed = run(out, resume=True, max_steps=6, save_steps=2)
    assert resumed.state.global_step == 6


def test_manifest_records_each_files_checksum_as_written(tmp_path):
    """Every file of a checkpoint is in the manifest with its size and the SHA-256 of its bytes on disk."""
    import hashlib

    out = tmp_path / "out"
    run(out, max_steps=5)
    folder = out / "checkpoint-5"
    manifest = json.loads((folder / COMMIT_MARKER).read_text())
    on_disk = sorted(p.name for p in folder.iterdir() if p.name != COMMIT_MARKER)
    assert sorted(manifest["files"]) == on_disk
    assert {"pytorch_model.bin", "optimizer.pt", "trainer_state.json", "rng_state.pth"} <= set(on_disk)
    for name, entry in manifest["files"].items():
        data = (folder / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name


def _flip_one_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("change", ["flipped-byte", "truncated", "deleted"])
@pytest.mark.parametrize("resume", ["latest", "path"])
def test_file_changed_after_the_save_is_refused_naming_it(tmp_path, change, resume):
    """A committed checkpoint whose file changed is refused: the error names the file and says it changed."""
    out = tmp_path / "out"
    run(out, max_steps=5)
    target = out / "checkpoint-5" / "optimizer.pt"
    if change == "flipped-byte":
        _flip_one_byte(target)
    elif change == "truncated":
        with open(target, "r+b") as f:
            f.truncate(10)
    else:
        target.unlink()
    assert is_complete(out / "checkpoint-5")  # committed: not an interrupted save
    with pytest.raises(CheckpointChanged, match=r"optimizer\.pt' changed after the save") as raised:
        run(out, resume=True if resume == "latest" else str(out / "checkpoint-5"), max_steps=8)
    assert "not an interrupted save" in str(raised.value)


def test_interrupted_save_is_reported_as_interrupted_not_changed(tmp_path):
    out = tmp_path / "out"
    run(out, max_steps=5)
    (out / "checkpoint-5" / COMMIT_MARKER).unlink()
    with pytest.raises(ValueError, match="the save was interrupted"):
        run(out, resume=str(out / "checkpoint-5"))
    with pytest.raises(CheckpointError, match="the save was interrupted") as raised:
        verify_checkpoint(out / "checkpoint-5")
    assert not isinstance(raised.value, CheckpointChanged)


def test_tampered_checkpoint_fails_safely_naming_the_file(tmp_path):
    """Even with a manifest rewritten to match, a file holding code is refused at load."""
    import hashlib

    out = tmp_path / "out"
    run(out, max_steps=5)
    ckpt = out / "checkpoint-5"

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    torch.save({"state": Evil()}, ckpt / "optimizer.pt")
    manifest = json.loads((ckpt / COMMIT_MARKER).read_text())
    data = (ckpt / "optimizer.pt").read_bytes()
    manifest["files"]["optimizer.pt"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / COMMIT_MARKER).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"optimizer\.pt.*cannot be loaded safely"):
        run(out, resume=str(ckpt))
    assert not (tmp_path / "pwned").exists()


class Counter(TrainerCallback, ExportableState):
    def __init__(self, tag="x"):
        self.tag = tag
        self.count = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.count += 1 if self.tag == "a" else 10

    def state(self):
        return {"args": {"tag": self.tag}, "attributes": {"count": self.count}}


class Tracked(TrainerCallback):
    def __init__(self):
        self.seen = []

    def on_log(self, args, state, control, **kwargs):
        self.seen.append(state.global_step)

    def state_dict(self):
        return {"seen": list(self.seen)}

    def load_state_dict(self, data):
        self.seen = list(data["seen"])


def test_callback_states_are_restored_per_instance_in_order(tmp_path):
    out = tmp_path / "out"
    run(out, max_steps=5, callbacks=[Counter("a"), Counter("b"), Tracked()])
    saved = json.loads((out / "checkpoint-5" / "trainer_state.json").read_text())["stateful_callbacks"]
    assert saved["Counter"] == [{"args": {"tag": "a"}, "attributes": {"count": 5}},
                                {"args": {"tag": "b"}, "attributes": {"count": 50}}]
    assert saved["Tracked"] == {"state_dict": {"seen": [1, 2, 3, 4, 5]}}  # saved before the summary log
    a, b, tracked = Counter("a"), Counter("b"), Tracked()
    trainer = run(out, resume=True, max_steps=7, callbacks=[a, b, tracked])
    assert (a.count, b.count) == (7, 70)
    assert tracked.seen == [1, 2, 3, 4, 5, 6, 7, 7]
    assert [type(cb).__name__ for cb in trainer.callback_handler.callbacks][1:4] == ["Counter", "Counter", "Tracked"]


class StopAt(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3:
            control.should_training_stop = True


def test_stopped_run_stays_stopped_and_finished_run_can_be_extended(tmp_path):
    stopped = tmp_path / "stopped"
    run(stopped, max_steps=10, save_steps=5, callbacks=[StopAt()])
    assert latest_checkpoint(stopped).name == "checkpoint-3"  # the early stop was saved
    again = run(stopped, resume=True, max_steps=10, save_steps=5)
    assert again.state.global_step == 3
    finished = tmp_path / "finished"
    run(finished, max_steps=5)
    extended = run(finished, resume=True, max_steps=8)
    assert extended.state.global_step == 8


def test_early_stopping_patience_survives_resume(tmp_path):
    cb = EarlyStoppingCallback(early_stopping_patience=5)
    out = tmp_path / "out"
    trainer = Trainer(TinyRegressor(), make_args(out, max_steps=4, eval_strategy="steps", eval_steps=1, save_steps=4,
                                                 metric_for_best_model="loss", learning_rate=0.0),
                      train_dataset=DictDataset(40), eval_dataset=DictDataset(8, 1), callbacks=[cb])
    trainer.train()
    assert cb.early_stopping_patience_counter == 3  # lr 0: no improvement after the first eval
    fresh = EarlyStoppingCallback(early_stopping_patience=5)
    Trainer(TinyRegressor(), make_args(out, max_steps=6, eval_strategy="steps", eval_steps=1, save_steps=4,
                                       metric_for_best_model="loss", learning_rate=0.0),
            train_dataset=DictDataset(40), eval_dataset=DictDataset(8, 1), callbacks=[fresh]).train(True)
    assert fresh.early_stopping_patience_counter == 5


class NaNAt(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = TinyRegressor()
        self.calls = 0

    def forward(self, x, labels=None):
        out = self.inner(x, labels)
        self.calls += 1
        if self.calls == 3:
            out["loss"] = out["loss"] * float("nan")
        return out


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_nonfinite_loss_never_reaches_the_weights(tmp_path, policy):
    model = NaNAt()
    trainer = Trainer(model, make_args(tmp_path / "o", gradient_accumulation_steps=1, save_strategy="no",
                                       nonfinite_policy=policy), train_dataset=DictDataset(40))
    trainer.train()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    if policy == "skip":
        assert trainer.state.global_step == 12
        skipped = [h for h in trainer.state.log_history if h.get("nonfinite_steps_skipped")]
        assert [h["step"] for h in skipped] == [3]
    else:
        assert trainer.state.global_step == 3


SCRIPT = """
import os, signal, sys, time
sys.path.insert(0, {tests!r})
import torch
from helpers_core import DictDataset, TinyRegressor
from epochal_core import Trainer, TrainerCallback, TrainingArguments
import epochal_core.checkpoint as ck
kill_kind, kill_at = {kill!r}
if kill_kind == "save":
    real, calls = ck.save_file, [0]
    def save_file(obj, path, **kwargs):
        calls[0] += 1
        if calls[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        real(obj, path, **kwargs)
    ck.save_file = save_file
class Hook(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        if kill_kind == "step" and state.global_step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if kill_kind == "term" and state.global_step == kill_at:
            os.kill(os.getpid(), signal.SIGTERM)
        if kill_kind in ("int", "int2") and state.global_step == kill_at:
            os.kill(os.getpid(), signal.SIGINT)
            if kill_kind == "int2":
                os.kill(os.getpid(), signal.SIGINT)
torch.manual_seed(0)
args = TrainingArguments(output_dir={out!r}, report_to="none", disable_tqdm=True, max_steps=12, save_steps=3,
                         per_device_train_batch_size=4, logging_steps=1, seed=7)
t = Trainer(TinyRegressor(), args, train_dataset=DictDataset(40), callbacks=[Hook()])
t.train(resume_from_checkpoint=True if any(p.startswith("checkpoint-") for p in os.listdir({out!r})) else None)
print("done", t.state.global_step, t.preempted)
"""


def _train(out, kill):
    out.mkdir(exist_ok=True)
    code = SCRIPT.format(tests=TESTS, out=str(out), kill=kill)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_sigkill_at_many_points_always_resumes(tmp_path):
    # Checkpoints at steps 3, 6, 9, 12; each save writes 4 files (weights, optimizer, scheduler, rng):
    # kill inside the 2nd save's writes, between saves, right after a save, and during the last save.
    kill_points = [("save", 5), ("save", 6), ("save", 8), ("step", 5), ("step", 7), ("save", 14)]
    reference = None
    for i, kill in enumerate(kill_points):
        out = tmp_path / f"run{i}"
        first = _train(out, kill)
        assert first.returncode == -signal.SIGKILL, first.stderr
        second = _train(out, ("none", 0))
        assert second.returncode == 0, second.stderr
        assert "done 12" in second.stdout
        weights = torch.load(out / "checkpoint-12" / "pytorch_model.bin", weights_only=True)
        if reference is None:
            clean = _train(tmp_path / "clean", ("none", 0))
            assert clean.returncode == 0, clean.stderr
            reference = torch.load(tmp_path / "clean" / "checkpoint-12" / "pytorch_model.bin", weights_only=True)
        for name in reference:
            assert torch.equal(weights[name], reference[name]), (kill, name)
    print(f"kill points tried: {len(kill_points)}")


@pytest.mark.slow
def test_sigterm_saves_at_the_step_boundary_and_exits_cleanly(tmp_path):
    out = tmp_path / "run"
    proc = _train(out, ("term", 4))
    assert proc.returncode == 0, proc.stderr
    assert "done 4 True" in proc.stdout
    assert "Received SIGTERM" in proc.stderr and "resumes it" in proc.stderr
    assert latest_checkpoint(out).name == "checkpoint-4"
    resumed = _train(out, ("none", 0))
    assert "done 12 False" in resumed.stdout


def test_log_history_is_stored_once_and_restored_whole(tmp_path, monkeypatch):
    import epochal_core.log_history as lh

    monkeypatch.setattr(lh, "LOG_HISTORY_TAIL", 3)
    straight = run(tmp_path / "a", max_steps=10)
    with pytest.raises(ScriptedFailure):
        run(tmp_path / "b", max_steps=10, callbacks=[CrashAt(7)])
    saved = json.loads((tmp_path / "b" / "checkpoint-5" / "trainer_state.json").read_text())
    assert [h["step"] for h in saved["log_history"]] == [3, 4, 5]  # only the tail inline
    record = saved["stateful_callbacks"][lh.RECORD_KEY]["attributes"]
    assert record["lines"] == 5
    files = list((tmp_path / "b").glob("log_history-*.jsonl"))
    assert [f.name for f in files] == [record["file"]]
    resumed = run(tmp_path / "b", resume=True, max_steps=10)
    assert comparable(straight.state.log_history) == comparable(resumed.state.log_history)
    # The file never holds the crashed run's steps 6-7 twice: one line per log of the final history.
    assert len(files[0].read_text().splitlines()) == len(resumed.state.log_history) - 1  # summary log not saved


def test_checkpoint_without_its_log_history_file_resumes_with_the_tail(tmp_path, monkeypatch, caplog):
    import epochal_core.log_history as lh

    monkeypatch.setattr(lh, "LOG_HISTORY_TAIL", 2)
    out = tmp_path / "out"
    with pytest.raises(ScriptedFailure):
        run(out, max_steps=10, callbacks=[CrashAt(6)])
    for f in out.glob("log_history-*.jsonl"):
        f.unlink()
    resumed = run(out, resume=True, max_steps=10)
    assert "Cannot read the full log history" in caplog.text
    assert [h["step"] for h in resumed.state.log_history[:3]] == [4, 5, 6]


@pytest.mark.slow
def test_first_sigint_stops_gracefully_and_second_aborts(tmp_path):
    graceful = _train(tmp_path / "once", ("int", 4))
    assert graceful.returncode == 0, graceful.stderr
    assert "done 4 True" in graceful.stdout and "Received SIGINT" in graceful.stderr
    assert latest_checkpoint(tmp_path / "once").name == "checkpoint-4"
    aborted = _train(tmp_path / "twice", ("int2", 4))
    assert aborted.returncode != 0
    assert "KeyboardInterrupt" in aborted.stderr and "done" not in aborted.stdout
    assert latest_checkpoint(tmp_path / "twice").name == "checkpoint-3"  # no save after the abort


def test_deferred_fsync_waits_for_every_file_and_reports_its_errors(tmp_path):
    """fsync on a pipe fails for real (EINVAL): the failure reaches the saver, so nothing is committed."""
    from epochal_core.checkpoint import deferred_fsync, save_file

    read_end, write_end = os.pipe()
    os.close(read_end)
    pipe = os.fdopen(write_end, "wb")
    with pytest.raises(OSError) as raised, deferred_fsync() as fsync:
        save_file({"w": torch.ones(3)}, tmp_path / "ok.pt", fsync=fsync)
        fsync.submit(pipe)
    assert raised.value.errno == errno.EINVAL
    assert pipe.closed
    assert torch.load(tmp_path / "ok.pt", weights_only=True)["w"].tolist() == [1.0, 1.0, 1.0]

    read_end, write_end = os.pipe()
    os.close(read_end)
    pipe = os.fdopen(write_end, "wb")
    with pytest.raises(KeyError), deferred_fsync() as fsync:  # the block's own error wins
        fsync.submit(pipe)
        raise KeyError("boom")
    assert pipe.closed


def test_checksum_of_large_and_small_chunks_matches_the_file(tmp_path):
    """Tensors above the overlap threshold are hashed on the helper thread; the digest is still the file's."""
    import hashlib

    from epochal_core.checkpoint import save_file

    state = {"big": torch.arange(600_000, dtype=torch.float32), "small": torch.ones(3), "step": 7}  # 2.4 MB + bytes
    entry = save_file(state, tmp_path / "state.pt")
    data = (tmp_path / "state.pt").read_bytes()
    assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert torch.equal(torch.load(tmp_path / "state.pt", weights_only=True)["big"], state["big"])
