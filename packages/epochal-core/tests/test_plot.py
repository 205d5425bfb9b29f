"""``python -m epochal_core plot``: a real run's history drawn into a PNG that opens as an image of the asked size."""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from epochal_core import Trainer, TrainingArguments
from epochal_core.__main__ import main
from epochal_core.plot import DEFAULT_FILE_NAME, read_log_history
from epochal_core.testing import TinyRegressor, tiny_dataset

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the PNG header (signature, then the IHDR chunk)."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE, f"{path} is not a PNG file"
    assert head[12:16] == b"IHDR"
    width, height = struct.unpack(">II", head[16:24])
    return width, height


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    """A real 12-step run: logs every 2 steps, evaluates every 4, saves at steps 6 and 12."""
    out = tmp_path_factory.mktemp("plot-run") / "out"
    args = TrainingArguments(output_dir=str(out), max_steps=12, logging_steps=2, eval_strategy="steps",
                             eval_steps=4, save_steps=6, per_device_train_batch_size=8, learning_rate=0.05,
                             report_to="none", disable_tqdm=True)
    trainer = Trainer(model=TinyRegressor(), args=args, train_dataset=tiny_dataset(64),
                      eval_dataset=tiny_dataset(16, seed=1))
    trainer.train()
    return out, trainer.state.log_history


@pytest.mark.slow
def test_plot_of_a_real_run_is_a_png_of_the_requested_size(
    run: tuple[Path, list[dict[str, Any]]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, _ = run
    target = tmp_path / "pictures" / "run.png"
    assert main(["plot", str(out), "--output", str(target), "--size", "640x480"]) == 0
    assert capsys.readouterr().out.strip() == str(target)
    assert png_size(target) == (640, 480)

    from matplotlib.image import imread

    pixels = imread(target)  # decodes the whole file: a truncated or corrupt PNG raises here
    assert pixels.shape[:2] == (480, 640)
    assert pixels[..., :3].std() > 0.05, "the picture is blank"


@pytest.mark.slow
def test_plot_writes_into_the_output_dir_by_default(
    run: tuple[Path, list[dict[str, Any]]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "copy"
    shutil.copytree(run[0], out)
    assert main(["plot", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out / DEFAULT_FILE_NAME)
    assert png_size(out / DEFAULT_FILE_NAME) == (1200, 900)


def test_history_comes_whole_from_the_newest_checkpoint_and_its_log_file(
    run: tuple[Path, list[dict[str, Any]]],
) -> None:
    """The checkpoint at step 12 holds every log but the train summary logged after it."""
    out, logged = run
    history = read_log_history(out)
    assert history.source == out / "checkpoint-12" / "trainer_state.json"
    assert history.entries == logged[:-1]
    assert "train_runtime" in logged[-1]
    assert [e["step"] for e in history.entries if "eval_loss" in e] == [4, 8, 12]


def test_history_from_trainer_state_json_when_it_is_further_along(
    run: tuple[Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    out = tmp_path / "copy"
    shutil.copytree(run[0], out)
    shutil.rmtree(out / "checkpoint-12")
    from epochal_core.state import TrainerState

    TrainerState(global_step=12, log_history=run[1]).save_to_json(str(out / "trainer_state.json"))
    history = read_log_history(out)
    assert history.source == out / "trainer_state.json"
    assert history.entries == run[1]


def test_history_from_the_log_file_alone(run: tuple[Path, list[dict[str, Any]]], tmp_path: Path) -> None:
    out = tmp_path / "copy"
    shutil.copytree(run[0], out, ignore=shutil.ignore_patterns("checkpoint-*"))
    history = read_log_history(out)
    assert history.source.name.startswith("log_history-") and history.source.suffix == ".jsonl"
    assert history.entries == run[1][:-1]


def test_an_output_dir_without_history_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["plot", str(tmp_path / "empty")]) == 1
    err = capsys.readouterr().err
    assert f"No log history in output_dir={str(tmp_path / 'empty')!r}" in err
    assert "called trainer.save_state()" in err

    assert main(["plot", str(tmp_path / "missing")]) == 1
    assert "is not a folder" in capsys.readouterr().err


def test_a_bad_size_names_the_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["plot", str(tmp_path), "--size", "640"])
    assert exc.value.code == 2
    assert "--size '640' must be WIDTHxHEIGHT in pixels" in capsys.readouterr().err


_BLOCK_MATPLOTLIB = """
import importlib.abc, runpy, sys

class NoMatplotlib(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoMatplotlib())
sys.argv = ["python -m epochal_core", "plot", sys.argv[1]]
runpy.run_module("epochal_core", run_name="__main__", alter_sys=True)
"""


def test_missing_matplotlib_says_how_to_install_it(run: tuple[Path, list[dict[str, Any]]]) -> None:
    proc = subprocess.run([sys.executable, "-c", _BLOCK_MATPLOTLIB, str(run[0])],
                          capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "requires the package 'matplotlib': install it with `pip install matplotlib`" in proc.stderr
    assert "pip install 'epochal-core[plot]'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (run[0] / DEFAULT_FILE_NAME).exists()


def test_the_core_and_its_cli_do_not_import_matplotlib() -> None:
    script = ("import sys, epochal_core, epochal_core.plot, epochal_core.__main__; "
              "print(sorted(m for m in sys.modules if m.split('.')[0] in ('matplotlib', 'torch'))[:3])")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120)
    assert proc.stdout.strip() == "[]"
