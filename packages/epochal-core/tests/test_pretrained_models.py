"""Models with ``save_pretrained`` (transformers, PEFT): tiny real models built from configs, nothing downloaded.

transformers and peft are test-only dependencies; importing transformers takes seconds, so
each library is imported once per module (fixtures) and each training run is shared.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
from epochal_core import Trainer, TrainerCallback, TrainingArguments
from epochal_core.checkpoint import COMMIT_MARKER

pytestmark = pytest.mark.slow

VOCAB = 32
SEQ = 8
WORDS = ["[UNK]", "[PAD]", *(f"w{i}" for i in range(VOCAB - 2))]


@pytest.fixture(scope="module")
def hf() -> Any:
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers


@pytest.fixture(scope="module")
def peft() -> Any:
    import peft

    return peft


def gpt2(hf: Any, seed: int = 0, width: int = 16) -> Any:
    torch.manual_seed(seed)
    config = hf.GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=width, n_layer=2, n_head=2)
    return hf.GPT2LMHeadModel(config)


def classifier(hf: Any, seed: int = 0) -> Any:
    torch.manual_seed(seed)
    config = hf.BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=SEQ, num_labels=3,
    )
    return hf.BertForSequenceClassification(config)


def tokenizer(hf: Any) -> Any:
    """A real fast tokenizer built in code (word level over WORDS)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return hf.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


class TokenData(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Random token sequences; ``labels`` are the tokens (causal LM) or a class id."""

    def __init__(self, n: int = 16, classes: int | None = None, seed: int = 1) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(2, VOCAB, (n, SEQ), generator=gen)
        self.labels = self.ids if classes is None else torch.randint(0, classes, (n,), generator=gen)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def trainable_state(model: Any) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}


class SnapshotOnSave(TrainerCallback):
    """Copies the trainable weights at every save (what the checkpoint must give back)."""

    def __init__(self) -> None:
        self.saved: dict[int, dict[str, torch.Tensor]] = {}

    def on_save(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self.saved[state.global_step] = trainable_state(model)


def args(out: Path, **overrides: Any) -> TrainingArguments:
    base: dict[str, Any] = dict(
        output_dir=str(out), max_steps=4, per_device_train_batch_size=4, per_device_eval_batch_size=4,
        learning_rate=1e-2, logging_steps=2, save_steps=2, report_to="none", disable_tqdm=True, use_cpu=True,
    )
    return TrainingArguments(**{**base, **overrides})


def best_at_step_2_args(out: Path) -> TrainingArguments:
    return args(
        out, eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
        metric_for_best_model="score", greater_is_better=True,
    )


def scores_best_first() -> Any:
    """compute_metrics whose score falls: the best model is the first evaluated (step 2)."""
    scores = iter([2.0, 1.0])
    shapes: list[tuple[int, ...]] = []

    def compute(pred: Any) -> dict[str, float]:
        shapes.append(tuple(pred.predictions.shape))
        return {"score": next(scores, 0.0)}

    compute.shapes = shapes  # type: ignore[attr-defined]
    return compute


def same_params(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def train_recorded(model: Any, data: Any, training_args: TrainingArguments, **kwargs: Any) -> tuple[Trainer, Any]:
    snapshots = SnapshotOnSave()
    trainer = Trainer(model=model, args=training_args, train_dataset=data, eval_dataset=data,
                      callbacks=[snapshots], **kwargs)
    trainer.train()
    return trainer, snapshots


def logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


# -- GPT-2 (causal LM): save_model, checkpoints, best model, resume, FLOs, ModelOutput in evaluation ----------------
@pytest.fixture(scope="module")
def gpt2_run(hf: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("gpt2")
    data = TokenData()
    compute = scores_best_first()
    trainer, snapshots = train_recorded(
        gpt2(hf), data, best_at_step_2_args(out), processing_class=tokenizer(hf), compute_metrics=compute
    )
    return {"out": out, "data": data, "trainer": trainer, "saved": snapshots.saved, "shapes": compute.shapes}


def test_gpt2_save_model_opens_with_from_pretrained(hf: Any, gpt2_run: dict[str, Any]) -> None:
    trainer, final = gpt2_run["trainer"], gpt2_run["out"] / "final"
    trainer.save_model(str(final))
    names = {p.name for p in final.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert "pytorch_model.bin" not in names and not any(n.startswith(".tmp") for n in names)
    reloaded = hf.AutoModelForCausalLM.from_pretrained(final)
    ids = gpt2_run["data"].ids[:4]
    assert torch.equal(logits(reloaded, ids), logits(trainer.model, ids))
    reloaded_tokenizer = hf.AutoTokenizer.from_pretrained(final)
    assert reloaded_tokenizer("w1 w5 w7")["input_ids"] == trainer.processing_class("w1 w5 w7")["input_ids"]


def test_gpt2_checkpoint_is_the_library_format_in_the_manifest(gpt2_run: dict[str, Any]) -> None:
    ckpt = gpt2_run["out"] / "checkpoint-2"
    manifest = json.loads((ckpt / COMMIT_MARKER).read_text())["files"]
    assert "pytorch_model.bin" not in manifest
    for name in ("model.safetensors", "config.json", "tokenizer.json", "optimizer.pt"):
        assert manifest[name]["crc32"] == f"{zlib.crc32((ckpt / name).read_bytes()):08x}", name
    assert set(manifest) == {str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file()} - {COMMIT_MARKER}


def test_gpt2_load_best_model_at_end_reloads_the_best_checkpoint(hf: Any, gpt2_run: dict[str, Any]) -> None:
    trainer, saved = gpt2_run["trainer"], gpt2_run["saved"]
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2")
    assert not same_params(saved[2], saved[4])  # the two candidates differ, so the check below can fail
    assert same_params(trainable_state(trainer.model), saved[2])
    # The same weights as the library's own loader reads from that checkpoint.
    from_library = hf.AutoModelForCausalLM.from_pretrained(gpt2_run["out"] / "checkpoint-2")
    assert same_params(trainable_state(from_library), saved[2])


def test_gpt2_resume_is_bit_exact_and_keeps_total_flos(hf: Any, gpt2_run: dict[str, Any]) -> None:
    first = gpt2_run["trainer"]
    resumed = Trainer(model=gpt2(hf, seed=5), args=args(gpt2_run["out"], save_strategy="no"),
                      train_dataset=gpt2_run["data"])
    resumed.train(resume_from_checkpoint=str(gpt2_run["out"] / "checkpoint-2"))
    assert same_params(trainable_state(resumed.model), gpt2_run["saved"][4])
    assert resumed.state.total_flos == first.state.total_flos > 0


def test_gpt2_total_flos_is_the_models_estimate(gpt2_run: dict[str, Any]) -> None:
    model = gpt2_run["trainer"].model
    # 4 updates of 4 sequences of SEQ tokens; 6 FLOs per token and non-embedding parameter.
    expected = 6 * model.num_parameters(exclude_embeddings=True) * 4 * 4 * SEQ
    assert gpt2_run["trainer"].state.total_flos == expected
    summary = [log for log in gpt2_run["trainer"].state.log_history if "total_flos" in log]
    assert [log["total_flos"] for log in summary] == [expected]


def test_gpt2_model_output_in_evaluation(gpt2_run: dict[str, Any]) -> None:
    trainer, data = gpt2_run["trainer"], gpt2_run["data"]
    assert gpt2_run["shapes"] == [(len(data), SEQ, VOCAB)] * 2  # the logits of the ModelOutput, all batches
    metrics = trainer.evaluate()
    trainer.model.eval()
    with torch.no_grad():
        losses = [trainer.model(input_ids=data.ids[i:i + 4], labels=data.ids[i:i + 4]).loss for i in range(0, 16, 4)]
    assert metrics["eval_loss"] == pytest.approx(torch.stack(losses).mean().item(), rel=1e-6)


# -- sequence classifier -------------------------------------------------------------------------------------------
def test_sequence_classifier_round_trip_and_bit_exact_resume(hf: Any, tmp_path: Path) -> None:
    data = TokenData(classes=3)
    trainer, snapshots = train_recorded(classifier(hf), data, args(tmp_path))
    trainer.save_model(str(tmp_path / "final"))
    reloaded = hf.AutoModelForSequenceClassification.from_pretrained(tmp_path / "final")
    assert torch.equal(logits(reloaded, data.ids), logits(trainer.model, data.ids))
    resumed = Trainer(model=classifier(hf, seed=9), args=args(tmp_path, save_strategy="no"), train_dataset=data)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert same_params(trainable_state(resumed.model), snapshots.saved[4])


# -- LoRA (PEFT) ---------------------------------------------------------------------------------------------------
def lora(hf: Any, peft: Any) -> Any:
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True, task_type="CAUSAL_LM")
    return peft.get_peft_model(gpt2(hf, width=64), config)  # wide enough for the base to dwarf the adapter


@pytest.fixture(scope="module")
def lora_run(hf: Any, peft: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("lora")
    data = TokenData()
    trainer, snapshots = train_recorded(lora(hf, peft), data, best_at_step_2_args(out),
                                        compute_metrics=scores_best_first())
    return {"out": out, "data": data, "trainer": trainer, "saved": snapshots.saved}


def test_lora_save_model_writes_the_adapter_that_from_pretrained_opens(hf: Any, peft: Any, lora_run: Any) -> None:
    trainer, final = lora_run["trainer"], lora_run["out"] / "final"
    trainer.save_model(str(final))
    names = {p.name for p in final.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= names
    assert "model.safetensors" not in names and "pytorch_model.bin" not in names
    reloaded = peft.PeftModel.from_pretrained(gpt2(hf, width=64), final)  # the same base, built from the same seed
    ids = lora_run["data"].ids[:4]
    assert torch.equal(logits(reloaded, ids), logits(trainer.model, ids))


def test_lora_checkpoint_holds_the_adapter_not_the_base(lora_run: dict[str, Any]) -> None:
    ckpt = lora_run["out"] / "checkpoint-2"
    manifest = json.loads((ckpt / COMMIT_MARKER).read_text())["files"]
    assert "adapter_model.safetensors" in manifest and "model.safetensors" not in manifest
    model = lora_run["trainer"].model
    adapter_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    base_bytes = sum(p.numel() * p.element_size() for p in model.get_base_model().parameters())
    weights = (ckpt / "adapter_model.safetensors").stat().st_size
    assert adapter_bytes <= weights < base_bytes / 20, (adapter_bytes, weights, base_bytes)


def test_lora_best_model_and_bit_exact_resume(hf: Any, peft: Any, lora_run: dict[str, Any]) -> None:
    trainer, saved = lora_run["trainer"], lora_run["saved"]
    assert not same_params(saved[2], saved[4])
    assert same_params(trainable_state(trainer.model), saved[2])  # load_best_model_at_end restored the adapter
    resumed = Trainer(model=lora(hf, peft), args=args(lora_run["out"], save_strategy="no"),
                      train_dataset=lora_run["data"])
    resumed.train(resume_from_checkpoint=str(lora_run["out"] / "checkpoint-2"))
    assert same_params(trainable_state(resumed.model), saved[4])


def test_weights_that_do_not_fit_the_model_are_refused_by_name(hf: Any, gpt2_run: Any, lora_run: Any) -> None:
    from epochal_core.checkpoint import CheckpointError
    from epochal_core.model_files import load_model_files

    with pytest.raises(CheckpointError, match=r"gpt2.*checkpoint-2.*do not fit the model \(BertFor"):
        load_model_files(classifier(hf), gpt2_run["out"] / "checkpoint-2")
    with pytest.raises(CheckpointError, match=r"do not fit the model \(GPT2LMHeadModel\).*size mismatch"):
        load_model_files(gpt2(hf, width=32), gpt2_run["out"] / "checkpoint-2")
    with pytest.raises(CheckpointError, match=r"holds adapter weights .* has no PEFT adapters.*get_peft_model"):
        load_model_files(gpt2(hf, width=64), lora_run["out"] / "checkpoint-2")


# -- gradient checkpointing ----------------------------------------------------------------------------------------
def block_forwards(hf: Any, tmp_path: Path, **overrides: Any) -> int:
    model = gpt2(hf)
    calls = []
    # Counted inside the block's MLP forward: the recompute runs it again (without the module's hooks).
    mlp = model.transformer.h[0].mlp
    forward = mlp.forward

    def counted(*a: Any, **k: Any) -> Any:
        calls.append(1)
        return forward(*a, **k)

    mlp.forward = counted
    trainer = Trainer(model=model, args=args(tmp_path, max_steps=1, save_strategy="no", **overrides),
                      train_dataset=TokenData())
    trainer.train()
    return len(calls)


def test_gradient_checkpointing_recomputes_the_blocks(hf: Any, tmp_path: Path) -> None:
    assert block_forwards(hf, tmp_path) == 1
    # The backward pass runs the checkpointed block's forward again.
    assert block_forwards(hf, tmp_path, gradient_checkpointing=True,
                          gradient_checkpointing_kwargs={"use_reentrant": False}) == 2


def test_gradient_checkpointing_on_a_lora_model_still_trains_every_adapter_weight(
    hf: Any, peft: Any, tmp_path: Path
) -> None:
    # The base (embeddings included) is frozen: without inputs that require grad, a checkpointed
    # block would give the adapter no gradient at all.
    config = peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False)
    model = peft.get_peft_model(gpt2(hf), config)
    before = trainable_state(model)
    Trainer(model=model, args=args(tmp_path, max_steps=1, save_strategy="no", gradient_checkpointing=True),
            train_dataset=TokenData()).train()
    after = trainable_state(model)
    assert [k for k in before if torch.equal(before[k], after[k])] == []


def test_gradient_checkpointing_on_a_model_without_it_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"gradient_checkpointing=True is invalid for Linear.*set gradient_checkp"):
        Trainer(model=torch.nn.Linear(2, 1), args=args(tmp_path, gradient_checkpointing=True))


# -- the core stays free of both libraries -------------------------------------------------------------------------
def test_core_import_and_a_plain_run_load_neither_library(tmp_path: Path) -> None:
    script = f"""
import sys, torch
import epochal_core
from epochal_core import Trainer, TrainingArguments
from epochal_core import model_files, model_conventions, training_checkpoint
model = torch.nn.Linear(4, 1)
data = torch.utils.data.TensorDataset(torch.randn(8, 4), torch.randn(8, 1))
args = TrainingArguments(output_dir={str(tmp_path)!r}, max_steps=2, save_steps=1, report_to="none",
                         disable_tqdm=True, use_cpu=True)
trainer = Trainer(model=model, args=args, train_dataset=data, compute_loss_func=lambda o, y, **k: ((o - y) ** 2).mean())
trainer.train()
trainer.save_model()
Trainer(model=torch.nn.Linear(4, 1), args=args, train_dataset=data,
        compute_loss_func=lambda o, y, **k: ((o - y) ** 2).mean()).train(resume_from_checkpoint=True)
print(sorted(m for m in ("transformers", "peft", "safetensors") if m in sys.modules))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "pytorch_model.bin").is_file()  # other models keep today's format
