"""The ``epochal-demo`` console script, run with tiny settings (a few seconds on a CPU)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from epochal_core import checkpoint as ckpt
from epochal_demo import CharTokenizer, CharWindows, TinyGPT, generate, load_stdlib_text, main

TINY = [
    "--cpu",
    "--max-chars", "20000",
    "--max-steps", "12",
    "--eval-steps", "4",
    "--batch-size", "8",
    "--block-size", "16",
    "--d-model", "32",
    "--layers", "1",
    "--heads", "2",
    "--learning-rate", "1e-2",
    "--sample-chars", "40",
]


def _eval_losses(output_dir: Path) -> list[float]:
    state = json.loads((output_dir / "trainer_state.json").read_text(encoding="utf-8"))
    return [entry["eval_loss"] for entry in state["log_history"] if "eval_loss" in entry]


def test_demo_trains_checkpoints_and_samples(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "demo"
    assert main([*TINY, "--output-dir", str(out_dir)]) == 0
    printed = capsys.readouterr().out

    checkpoints = ckpt.list_checkpoints(out_dir)
    assert checkpoints, f"no checkpoint in {sorted(p.name for p in out_dir.iterdir())}"
    assert len(checkpoints) <= 2  # save_total_limit=2
    assert all(ckpt.is_complete(c) for c in checkpoints)
    assert (out_dir / "pytorch_model.bin").is_file()
    assert json.loads((out_dir / "vocab.json").read_text(encoding="utf-8"))

    losses = _eval_losses(out_dir)
    assert len(losses) >= 2
    assert losses[-1] < losses[0], losses

    assert f"Output folder: {out_dir.resolve()}" in printed
    assert "First eval loss:" in printed and "Last eval loss:" in printed
    sample = re.search(r"Sample \(temperature [^)]*\):\n-{40}\n(.*)\n-{40}\n", printed, re.DOTALL)
    assert sample is not None, printed
    assert sample.group(1).startswith("def ")
    assert len(sample.group(1)) == len("def ") + 40


def test_demo_time_budget_stops_early_with_a_final_eval_and_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "budget"
    args = [*TINY, "--max-steps", "1000", "--seconds", "0.001", "--sample-chars", "5", "--output-dir", str(out_dir)]
    assert main(args) == 0
    capsys.readouterr()
    state = json.loads((out_dir / "trainer_state.json").read_text(encoding="utf-8"))
    assert state["global_step"] == 1
    assert len(_eval_losses(out_dir)) == 1
    assert [c.name for c in ckpt.list_checkpoints(out_dir)] == ["checkpoint-1"]


def test_demo_reports_text_too_short(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "tiny.txt"
    text.write_text("abc", encoding="utf-8")
    assert main(["--cpu", "--text-file", str(text), "--output-dir", str(tmp_path / "out")]) == 1
    assert "too few for one window" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_stdlib_text_is_deterministic_and_capped() -> None:
    first, files = load_stdlib_text(5000)
    again, _ = load_stdlib_text(5000)
    assert first == again
    assert len(first) == 5000
    assert files


def test_char_windows_shift_labels_by_one() -> None:
    tok = CharTokenizer("hello world")
    data = torch.tensor(tok.encode("hello world"))
    windows = CharWindows(data, block_size=4, stride=2)
    assert len(windows) == 4
    item = windows[1]
    assert tok.decode(item["input_ids"].tolist()) == "llo "
    assert tok.decode(item["labels"].tolist()) == "lo w"
    with pytest.raises(IndexError):
        windows[len(windows)]


def test_tiny_gpt_loss_and_generation() -> None:
    torch.manual_seed(0)
    model = TinyGPT(vocab_size=10, block_size=8, d_model=16, n_layers=1, n_heads=2)
    ids = torch.randint(0, 10, (3, 8))
    out = model(ids, ids)
    assert out["logits"].shape == (3, 8, 10)
    assert out["loss"].dim() == 0
    assert abs(out["loss"].item() - torch.log(torch.tensor(10.0)).item()) < 0.5
    sample = generate(model, [1, 2], length=20, seed=3)
    assert sample[:2] == [1, 2] and len(sample) == 22
    assert sample == generate(model, [1, 2], length=20, seed=3)
