"""``epochal-demo``: train a tiny character-level GPT on Python's own standard library source.

It runs through the ``epochal`` meta-package, as a user who installed it would:
the text is a fixed list of ``.py`` files read from the standard library folder
(no download), the model is a small causal transformer written here, and the
loop is epochal's :class:`~epochal.Trainer` with periodic evaluation, rotating
checkpoints, early stopping, the progress bar, and TensorBoard and DVCLive logs
(``--report-to``). The defaults take about a minute on two CPU cores. At the end
the Trainer prints its summary (steps, time, eval loss, best checkpoint, where
each tracker's logs are); the demo then draws the run's curves into
``training_curves.png`` with :func:`epochal_core.plot.plot_run` and prints a
sample generated from a prompt, the picture and the output folder.

Run it with ``epochal-demo`` (or ``python -m epochal_demo``); ``--help``
lists the settings.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import sysconfig
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from epochal import (
    EarlyStoppingCallback,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
    set_seed,
)
from epochal_core.plot import plot_run
from torch import nn
from torch.utils.data import Dataset

__all__ = ["CharTokenizer", "CharWindows", "TinyGPT", "generate", "load_stdlib_text", "main"]

DEFAULT_OUTPUT_DIR = "epochal-demo-output"
#: The trackers the demo logs to (both write local files: no account, no network).
DEFAULT_REPORT_TO = ("tensorboard", "dvclive")

# A fixed, ordered list so the corpus is the same on every run of a given Python.
# Files missing from a version (e.g. modules turned into packages) are skipped.
STDLIB_FILES = (
    "argparse.py",
    "ast.py",
    "calendar.py",
    "collections/__init__.py",
    "configparser.py",
    "contextlib.py",
    "csv.py",
    "dataclasses.py",
    "difflib.py",
    "enum.py",
    "fractions.py",
    "functools.py",
    "gettext.py",
    "heapq.py",
    "inspect.py",
    "ipaddress.py",
    "json/decoder.py",
    "json/encoder.py",
    "logging/__init__.py",
    "os.py",
    "pathlib.py",
    "pprint.py",
    "random.py",
    "shutil.py",
    "statistics.py",
    "string.py",
    "subprocess.py",
    "tarfile.py",
    "tempfile.py",
    "textwrap.py",
    "threading.py",
    "typing.py",
    "uuid.py",
    "zipfile.py",
)


def stdlib_dir() -> Path:
    """Return the folder that holds the standard library's ``.py`` sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def load_stdlib_text(max_chars: int, root: Path | None = None) -> tuple[str, list[str]]:
    """Concatenate the :data:`STDLIB_FILES` found under ``root``, cut to ``max_chars``.

    Args:
        max_chars: Most characters returned.
        root: Standard library folder; default :func:`stdlib_dir`.

    Returns:
        The text and the relative names of the files it was read from.

    Raises:
        FileNotFoundError: None of the files exists (a Python installed without its sources).

    """
    root = stdlib_dir() if root is None else root
    parts: list[str] = []
    used: list[str] = []
    total = 0
    for name in STDLIB_FILES:
        if total >= max_chars:
            break
        path = root / name
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        used.append(name)
        total += len(text) + 1
    if not parts:
        raise FileNotFoundError(
            f"No standard library sources found in {os.fspath(root)!r} (this Python ships without .py files). "
            "Pass a text file with --text-file."
        )
    return "\n".join(parts)[:max_chars], used


class CharTokenizer:
    """Maps characters to ids and back, with the vocabulary of a text.

    Args:
        text: Every character of this text gets an id, in sorted order.

    """

    def __init__(self, text: str) -> None:
        self.chars = sorted(set(text))
        self.index = {c: i for i, c in enumerate(self.chars)}

    @property
    def vocab_size(self) -> int:
        """Number of distinct characters."""
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        """Ids of the characters of ``text`` that are in the vocabulary (others are dropped)."""
        return [self.index[c] for c in text if c in self.index]

    def decode(self, ids: Sequence[int]) -> str:
        """Return the text of ``ids``."""
        return "".join(self.chars[i] for i in ids)


class CharWindows(Dataset[dict[str, torch.Tensor]]):
    """Fixed windows over a token sequence, for next-character prediction.

    Item ``i`` starts at ``i * stride``; ``labels`` are ``input_ids`` shifted by one.

    Args:
        data: 1-D tensor of token ids.
        block_size: Tokens per window.
        stride: Distance between window starts.

    Raises:
        ValueError: ``data`` is too short for one window, or a size is not positive.

    """

    def __init__(self, data: torch.Tensor, block_size: int, stride: int) -> None:
        if block_size < 1 or stride < 1:
            raise ValueError(f"block_size={block_size} and stride={stride} must both be >= 1.")
        if data.numel() < block_size + 1:
            raise ValueError(
                f"The text has {data.numel()} tokens, too few for one window of block_size={block_size}: "
                "use more text or a smaller block size."
            )
        self.data = data
        self.block_size = block_size
        self.stride = stride

    def __len__(self) -> int:
        return (self.data.numel() - self.block_size - 1) // self.stride + 1

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        start = index * self.stride
        chunk = self.data[start : start + self.block_size + 1]
        return {"input_ids": chunk[:-1], "labels": chunk[1:]}


class _Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then an MLP."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_heads, c // self.n_heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.ln2(x))  # type: ignore[no-any-return]


class TinyGPT(nn.Module):
    """A small GPT: token and position embeddings, causal blocks, a head tied to the embedding.

    Args:
        vocab_size: Number of token ids.
        block_size: Longest sequence it accepts.
        d_model: Width of the residual stream (a multiple of ``n_heads``).
        n_layers: Number of transformer blocks.
        n_heads: Attention heads per block.

    Raises:
        ValueError: ``d_model`` is not a multiple of ``n_heads``.

    """

    def __init__(self, vocab_size: int, block_size: int, d_model: int, n_layers: int, n_heads: int) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be a multiple of n_heads={n_heads}.")
        self.block_size = block_size
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(block_size, d_model)
        self.blocks = nn.ModuleList(_Block(d_model, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.apply(self._init_weights)
        self.head.weight = self.tok_emb.weight

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Return ``{"logits"}`` and, given ``labels``, the mean cross-entropy as ``"loss"``.

        Args:
            input_ids: ``(batch, time)`` token ids, ``time <= block_size``.
            labels: ``(batch, time)`` next-token ids, or ``None``.

        """
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.tok_emb(input_ids) + self.pos_emb(positions)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
        return out


@torch.no_grad()
def generate(
    model: TinyGPT, prompt_ids: Sequence[int], length: int, temperature: float = 0.8, seed: int = 0
) -> list[int]:
    """Sample ``length`` tokens after ``prompt_ids`` with temperature sampling.

    Args:
        model: The trained model (left in eval mode).
        prompt_ids: Non-empty list of token ids to continue.
        length: Tokens to add.
        temperature: Softmax temperature (> 0); lower is more conservative.
        seed: Seed of the sampling generator, so a sample is reproducible.

    Returns:
        The prompt ids followed by the sampled ids.

    """
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    ids = list(prompt_ids)
    for _ in range(length):
        context = torch.tensor([ids[-model.block_size :]], device=device)
        logits = model(context)["logits"][0, -1].float().cpu()
        probs = torch.softmax(logits / temperature, dim=-1)
        ids.append(int(torch.multinomial(probs, 1, generator=generator)))
    return ids


class _TimeBudget(TrainerCallback):
    """Stops training after ``seconds``, logging and evaluating once more so the last losses are current."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start = 0.0

    def on_train_begin(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        self.start = time.monotonic()

    def on_step_end(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        if time.monotonic() - self.start >= self.seconds and state.global_step < state.max_steps:
            control.should_training_stop = True
            control.should_evaluate = True
            control.should_log = True
        return control


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """Build the command-line parser of ``epochal-demo``."""
    p = argparse.ArgumentParser(
        prog="epochal-demo",
        description="Train a tiny character-level GPT on Python's standard library source with epochal's Trainer.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--output-dir", help=f"Output folder (default: a new ./{DEFAULT_OUTPUT_DIR}[-N]).")
    p.add_argument("--max-steps", type=_positive_int, default=500, help="Optimizer updates.")
    p.add_argument("--seconds", type=_positive_float, help="Also stop after this many seconds of training.")
    p.add_argument("--eval-steps", type=_positive_int, default=50, help="Evaluate and checkpoint every N steps.")
    p.add_argument("--batch-size", type=_positive_int, default=32)
    p.add_argument("--block-size", type=_positive_int, default=64, help="Characters of context.")
    p.add_argument("--d-model", type=_positive_int, default=128)
    p.add_argument("--layers", type=_positive_int, default=3)
    p.add_argument("--heads", type=_positive_int, default=4)
    p.add_argument("--learning-rate", type=_positive_float, default=2e-3)
    p.add_argument("--max-chars", type=_positive_int, default=1_000_000, help="Cap on the training text.")
    p.add_argument("--text-file", help="Train on this UTF-8 file instead of the standard library source.")
    p.add_argument("--prompt", default="def ", help="Start of the generated sample.")
    p.add_argument("--sample-chars", type=int, default=200, help="Characters to generate.")
    p.add_argument("--temperature", type=_positive_float, default=0.8)
    p.add_argument("--report-to", nargs="+", default=list(DEFAULT_REPORT_TO), metavar="NAME",
                   help="'none', 'all' or integration names.")
    p.add_argument("--no-plot", action="store_true", help="Do not draw training_curves.png.")
    p.add_argument("--cpu", action="store_true", help="Train on the CPU even if an accelerator is present.")
    p.add_argument("--threads", type=_positive_int, help="CPU threads for torch (default: torch's choice).")
    p.add_argument("--seed", type=int, default=42)
    return p


def _fresh_output_dir() -> Path:
    base = Path.cwd() / DEFAULT_OUTPUT_DIR
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def _eval_losses(log_history: list[dict[str, Any]]) -> list[tuple[int, float]]:
    return [(int(e["step"]), float(e["eval_loss"])) for e in log_history if "eval_loss" in e]


def _load_data(opts: argparse.Namespace) -> tuple[str, str, CharTokenizer, torch.Tensor, CharWindows, CharWindows]:
    """The text, where it came from, its tokenizer and encoding, and the training and evaluation windows."""
    if opts.text_file:
        text = Path(opts.text_file).read_text(encoding="utf-8", errors="replace")[: opts.max_chars]
        source = opts.text_file
    else:
        text, files = load_stdlib_text(opts.max_chars)
        source = f"{len(files)} standard library files in {stdlib_dir()}"
    tokenizer = CharTokenizer(text)
    data = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    split = int(0.95 * data.numel())
    # Overlapping training windows give more distinct samples; eval windows do not overlap.
    train_ds = CharWindows(data[:split], opts.block_size, max(opts.block_size // 2, 1))
    eval_ds = CharWindows(data[split:], opts.block_size, opts.block_size)
    return text, source, tokenizer, data, train_ds, eval_ds


def _training_arguments(opts: argparse.Namespace, output_dir: Path) -> TrainingArguments:
    """The demo's TrainingArguments: evaluate and save together, keep the best, stop early."""
    report_to: str | list[str] = opts.report_to[0] if opts.report_to in (["none"], ["all"]) else opts.report_to
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=opts.max_steps,
        per_device_train_batch_size=opts.batch_size,
        per_device_eval_batch_size=2 * opts.batch_size,
        learning_rate=opts.learning_rate,
        weight_decay=0.1,
        lr_scheduler_type="cosine",
        warmup_ratio=0.05,
        logging_steps=max(opts.eval_steps // 2, 1),
        eval_strategy="steps",
        eval_steps=opts.eval_steps,
        save_strategy="steps",
        save_steps=opts.eval_steps,
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        report_to=report_to,
        seed=opts.seed,
        use_cpu=opts.cpu,
    )


def main(argv: list[str] | None = None) -> int:
    """Run the demo.

    Args:
        argv: Command-line arguments (default ``sys.argv[1:]``).

    Returns:
        ``0`` on success, ``1`` when the text cannot be read or is too short.

    """
    opts = build_parser().parse_args(argv)
    output_dir = (Path(opts.output_dir) if opts.output_dir else _fresh_output_dir()).resolve()

    try:
        text, source, tokenizer, data, train_ds, eval_ds = _load_data(opts)
    except (OSError, ValueError) as err:
        print(f"epochal-demo: {err}", file=sys.stderr)
        return 1

    if opts.threads is not None:
        # On a shared or busy machine, fewer threads than cores avoids OpenMP oversubscription stalls.
        torch.set_num_threads(opts.threads)
    set_seed(opts.seed)  # the Trainer seeds too, but only after the model is built
    model = TinyGPT(tokenizer.vocab_size, opts.block_size, opts.d_model, opts.layers, opts.heads)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"Text: {len(text):,} characters from {source}; vocabulary of {tokenizer.vocab_size} characters; "
        f"{len(train_ds):,} training and {len(eval_ds):,} evaluation windows of {opts.block_size}.\n"
        f"Model: {n_params:,} parameters ({opts.layers} layers, d_model {opts.d_model}, {opts.heads} heads); "
        f"initial loss should be near ln({tokenizer.vocab_size}) = {math.log(tokenizer.vocab_size):.2f}."
    )

    args = _training_arguments(opts, output_dir)
    callbacks: list[TrainerCallback] = [EarlyStoppingCallback(early_stopping_patience=3)]
    if opts.seconds is not None:
        callbacks.append(_TimeBudget(opts.seconds))
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, callbacks=callbacks)
    print(f"Training on {trainer.device} for up to {opts.max_steps} steps.")
    trainer.train()  # ends with the Trainer's summary: steps, time, eval loss, where the logs are
    trainer.save_model()
    trainer.save_state()
    (output_dir / "vocab.json").write_text(json.dumps(tokenizer.chars), encoding="utf-8")

    # Two more lines under the Trainer's summary: how far the eval loss came, and the picture of the run.
    losses = _eval_losses(trainer.state.log_history)
    if len(losses) > 1:
        (first_step, first), (last_step, last) = losses[0], losses[-1]
        print(f"  eval_loss went from {first:.4f} (step {first_step}) to {last:.4f} (step {last_step})")
    if not opts.no_plot:
        print(f"  training curves: {plot_run(output_dir)}")

    prompt_ids = tokenizer.encode(opts.prompt) or data[:1].tolist()
    # `model` is the object the Trainer trained, with the best weights loaded in place.
    sample = tokenizer.decode(generate(model, prompt_ids, max(opts.sample_chars, 0), opts.temperature, opts.seed))
    print(f"\nSample (temperature {opts.temperature}):\n{'-' * 40}\n{sample}\n{'-' * 40}")
    print(f"Output folder: {output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
