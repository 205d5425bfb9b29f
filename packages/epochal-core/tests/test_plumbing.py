import logging
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from epochal_core import IntegrationCallback, Trainer, TrainerCallback, TrainingArguments
from epochal_core.discovery import KNOWN_INTEGRATIONS, resolve_report_to
from helpers_core import DictDataset, TinyRegressor


def make_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), report_to="none", disable_tqdm=True, max_steps=10,
                logging_steps=1, save_strategy="no", strict_integrations=False)
    base.update(kw)
    return TrainingArguments(**base)


class Collecting(IntegrationCallback):
    """A real IntegrationCallback whose 'tracker' is a list (the SDK under test is the plumbing itself)."""

    name = "collecting"

    def __init__(self, gate=None, fail_on_step=None):
        super().__init__()
        self.gate = gate
        self.fail_on_step = fail_on_step
        self.logged = []
        self.status = None
        self.threads = set()

    def setup(self, args, state, model, **kwargs):
        self.run_id = "run-1"

    def log_metrics(self, metrics, step, state):
        self.threads.add(threading.current_thread().name)
        if self.gate is not None:
            self.gate.wait(timeout=30)
        if step == self.fail_on_step:
            raise ConnectionError("tracker server down")
        self.logged.append((step, metrics))

    def finish(self, status):
        self.status = status


def test_unknown_report_to_lists_known_names():
    with pytest.raises(ValueError, match=r"report_to='nope' is unknown: known names are \[.*'tensorboard'.*\]"):
        resolve_report_to(["nope"])


def test_known_but_missing_integration_names_the_package(monkeypatch):
    # A known name whose package is not installed (the workspace installs every real one).
    monkeypatch.setitem(KNOWN_INTEGRATIONS, "fancytracker", "epochal-fancytracker")
    with pytest.raises(ValueError, match=r"pip install epochal-fancytracker"):
        resolve_report_to(["fancytracker"])


def test_slow_integration_does_not_block_training(tmp_path):
    """The tracker is blocked for the whole run; training still reaches its last step."""
    gate = threading.Event()
    tracker = Collecting(gate=gate)
    seen_at_end = []

    class Release(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == state.max_steps:
                seen_at_end.append(len(tracker.logged))
                gate.set()

    trainer = Trainer(TinyRegressor(), make_args(tmp_path), train_dataset=DictDataset(), callbacks=[tracker, Release()])
    trainer.train()
    assert seen_at_end == [0]  # nothing was logged yet when training finished its steps
    assert [step for step, _ in tracker.logged] == [*range(1, 11), 10]  # drained at train end, in order
    assert tracker.threads == {"epochal-collecting"}
    assert tracker.logged[0][1]["train/loss"] == trainer.state.log_history[0]["loss"]
    assert tracker.status == "finished"


def test_full_queue_makes_training_wait_and_drops_nothing(tmp_path, caplog):
    """Capacity 3, a tracker held until the queue is full: training waits, nothing passes 3, every log arrives.

    No sleep: a watcher thread polls (with a wide deadline) until the queue is full, which can only
    last while training waits for room, and only then lets the tracker go on.
    """
    gate = threading.Event()
    tracker = Collecting(gate=gate)
    backlogs = []

    class WatchBacklog(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            backlogs.append(trainer._reporters[0].backlog)

    args = make_args(tmp_path, max_steps=40)
    trainer = Trainer(TinyRegressor(), args, train_dataset=DictDataset(), callbacks=[tracker, WatchBacklog()])
    reporter = trainer._reporters[0]
    reporter.capacity = 3
    seen_full = []

    def release_when_full():
        deadline = time.monotonic() + 60
        while reporter.backlog < reporter.capacity and time.monotonic() < deadline:
            threading.Event().wait(0.001)  # polling interval, not a wait for an outcome
        seen_full.append(reporter.backlog)
        gate.set()

    watcher = threading.Thread(target=release_when_full)
    watcher.start()
    with caplog.at_level(logging.WARNING):
        trainer.train()
    watcher.join()
    assert seen_full == [3]  # it filled up while the tracker was held
    assert [step for step, _ in tracker.logged] == [*range(1, 41), 40]
    assert max(backlogs) <= 3  # never past its capacity
    assert caplog.text.count("queue of 3 events is full") == 1


def test_reporter_rejects_an_empty_queue():
    from epochal_core.background import Reporter

    with pytest.raises(ValueError, match=r"capacity=0.*at least 1"):
        Reporter(Collecting(), "collecting", capacity=0)


def test_failing_integration_is_disabled_and_training_finishes(tmp_path, caplog):
    tracker = Collecting(fail_on_step=3)
    trainer = Trainer(TinyRegressor(), make_args(tmp_path), train_dataset=DictDataset(), callbacks=[tracker])
    with caplog.at_level(logging.WARNING):
        out = trainer.train()
    assert out.global_step == 10
    assert [step for step, _ in tracker.logged] == [1, 2]
    assert [(f.name, f.event) for f in trainer.integration_failures] == [("collecting", "on_log")]
    assert isinstance(trainer.integration_failures[0].error, ConnectionError)
    assert caplog.text.count("tracker server down") >= 1
    assert "these integrations failed and were disabled: collecting" in caplog.text


def test_strict_mode_surfaces_integration_errors(tmp_path):
    tracker = Collecting(fail_on_step=3)
    trainer = Trainer(TinyRegressor(), make_args(tmp_path, strict_integrations=True), train_dataset=DictDataset(),
                      callbacks=[tracker])
    with pytest.raises(ConnectionError, match="tracker server down"):
        trainer.train()


def test_crash_finishes_integrations_as_failed_and_reraises_unchanged(tmp_path):
    tracker = Collecting()
    boom = RuntimeError("out of memory (simulated)")

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 4:
                raise boom

    trainer = Trainer(TinyRegressor(), make_args(tmp_path), train_dataset=DictDataset(), callbacks=[tracker, Crash()])
    with pytest.raises(RuntimeError) as info:
        trainer.train()
    assert info.value is boom
    assert tracker.status == "failed"
    assert [step for step, _ in tracker.logged] == [1, 2, 3]  # pending logs flushed before finishing


THIRD_PARTY = '''
from epochal_core import TrainerCallback, IntegrationCallback

class Plain(TrainerCallback):
    """Subclasses the protocol directly; still runs through the reporter."""
    logs = []
    def on_log(self, args, state, control, logs=None, **kwargs):
        import threading
        Plain.logs.append((state.global_step, threading.current_thread().name))

class NeedsLogin(IntegrationCallback):
    name = "needs_login"
    @classmethod
    def configuration_problem(cls):
        return "set NEEDS_LOGIN_TOKEN to use it"
'''

SCRIPT = '''
import logging, sys, torch
logging.basicConfig(level=logging.WARNING)
sys.path.insert(0, {tests!r})
from helpers_core import DictDataset, TinyRegressor
from epochal_core import Trainer, TrainingArguments
from epochal_core.discovery import available_integrations
import thirdparty_cb
print("names", sorted(available_integrations()))
args = TrainingArguments(output_dir={out!r}, report_to={report_to!r}, max_steps=3, logging_steps=1,
                         save_strategy="no", disable_tqdm=True)
trainer = Trainer(TinyRegressor(), args, train_dataset=DictDataset())
print("callbacks", [type(cb).__name__ for cb in trainer.callback_handler.callbacks])
if {report_to!r} != "all":  # under "all" every installed integration would start: construction is the point
    trainer.train()
    print("logs", thirdparty_cb.Plain.logs)
'''


@pytest.mark.parametrize("report_to", [["plain"], "all"])
def test_third_party_package_adds_a_report_to_name_with_one_entry_point(tmp_path, report_to):
    site = tmp_path / "site"
    dist = site / "thirdparty_cb-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-cb\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[epochal.integrations]\nplain = thirdparty_cb:Plain\nneeds_login = thirdparty_cb:NeedsLogin\n"
    )
    (site / "thirdparty_cb.py").write_text(textwrap.dedent(THIRD_PARTY))
    script = SCRIPT.format(tests=str(__import__("pathlib").Path(__file__).parent), out=str(tmp_path / "o"),
                           report_to=report_to)
    env = {**__import__("os").environ, "PYTHONPATH": str(site)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "'plain'" in proc.stdout and "'needs_login'" in proc.stdout
    if report_to == "all":
        assert "skipping 'needs_login': set NEEDS_LOGIN_TOKEN to use it" in proc.stderr
        assert "'Plain'" in proc.stdout and "'NeedsLogin'" not in proc.stdout
        assert "'TensorBoardCallback'" in proc.stdout  # the workspace's own integrations come from entry points too
    else:
        logs = "logs [(1, 'epochal-plain'), (2, 'epochal-plain'), (3, 'epochal-plain'), (3, 'epochal-plain')]"
        assert logs in proc.stdout


def test_cli_lists_integrations_without_importing_them():
    proc = subprocess.run(
        [sys.executable, "-c", "import sys, runpy; sys.argv=['x','integrations'];"
         "from epochal_core.discovery import KNOWN_INTEGRATIONS;"
         "KNOWN_INTEGRATIONS['fancytracker'] = 'epochal-fancytracker';"  # known, not installed
         "runpy.run_module('epochal_core', run_name='__main__', alter_sys=True)"],
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["report_to", "distribution", "version", "sdk"]
    assert any(line.startswith("dvclive") and "epochal-dvclive" in line and "dvclive 3." in line for line in lines)
    # TensorBoard's column lists tensorboardX and the native checksum it picks up.
    assert any(line.startswith("tensorboard") and "epochal-tensorboard" in line and "tensorboardx 2." in line
               and "crc32c" in line for line in lines)
    assert any(line.startswith("fancytracker") and "not installed" in line for line in lines)


def test_a_log_reaches_log_metrics_under_the_tracker_names_and_non_scalars_are_dropped():
    """Numbers go to log_metrics under transformers' rewritten names; lists are dropped with one warning."""

    class Tracker(IntegrationCallback):
        name = "tracker"

        def log_metrics(self, metrics, step, state):
            sent.append((metrics, step))

    sent = []
    tracker = Tracker()
    logs = {"loss": 0.5, "grad_norm": 1, "eval_loss": 0.25, "total_flos": 2.0, "done": True, "weights": [1.0]}
    metrics, texts = tracker._split_logs(logs)
    assert metrics == {"train/loss": 0.5, "train/grad_norm": 1, "eval/loss": 0.25, "train/total_flos": 2.0,
                       "train/done": True}
    assert texts == {}
