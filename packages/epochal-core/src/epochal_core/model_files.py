"""A model's weights on disk: the model's own ``save_pretrained`` format when it has one.

transformers and PEFT models carry ``save_pretrained``. What it writes (``config.json``
and ``model.safetensors``; for a PEFT model ``adapter_config.json`` and
``adapter_model.safetensors``, the adapter alone) is what their users open with
``from_pretrained``, so :func:`write_model_files` calls it when the model (unwrapped
from DDP or ``torch.compile``) has it. The check is duck-typed: the core never imports
either library. Any other model keeps ``pytorch_model.bin`` (its ``state_dict``).

:func:`load_model_files` puts such weights back into the live model object (resume,
``load_best_model_at_end``) without unpickling anything: ``*.safetensors`` files are read
with the ``safetensors`` package (installed with transformers and PEFT; not a dependency
of the core), ``*.bin`` files with ``torch.load(weights_only=True)``. An adapter folder
is loaded by the model's own ``load_adapter`` (PEFT maps the saved keys onto each named
adapter; the library's own code does it, not a copy of it here).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from .checkpoint import CheckpointError, FolderWriter, deferred_fsync, load_file

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "SAFE_WEIGHTS_NAME",
    "WEIGHTS_NAME",
    "adopt_written",
    "has_save_pretrained",
    "load_model_files",
    "save_model_folder",
    "unwrap_model",
    "write_model_files",
]

#: What a model without ``save_pretrained`` is saved as (its ``state_dict``, ``torch.save``\ d).
WEIGHTS_NAME = "pytorch_model.bin"
SAFE_WEIGHTS_NAME = "model.safetensors"
_SAFE_INDEX_NAME = "model.safetensors.index.json"
_WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"
ADAPTER_CONFIG_NAME = "adapter_config.json"
_ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DDP / DataParallel / ``torch.compile`` wrappers (any depth)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = cast(nn.Module, model.module)
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = cast(nn.Module, model._orig_mod)
        else:
            return model


def has_save_pretrained(obj: Any) -> bool:
    """Whether ``obj`` saves itself in a library format (transformers, PEFT, tokenizers)."""
    return callable(getattr(obj, "save_pretrained", None))


def write_model_files(model: nn.Module, writer: FolderWriter) -> list[str]:
    """Write ``model``'s weights into ``writer``'s folder; return the names written.

    With ``save_pretrained`` the library writes into the folder (safetensors, its
    default) and every new file is recorded, checksummed and fsynced by ``writer``;
    otherwise the ``state_dict`` is saved as :data:`WEIGHTS_NAME`.
    """
    inner = unwrap_model(model)
    if not has_save_pretrained(inner):
        writer.save(inner.state_dict(), WEIGHTS_NAME)
        return [WEIGHTS_NAME]
    return adopt_written(writer, getattr(inner, "save_pretrained"))  # noqa: B009 - duck-typed


def adopt_written(writer: FolderWriter, save: Callable[[str], Any]) -> list[str]:
    """Let ``save(folder)`` write into ``writer``'s folder; record (hash, fsync) the files it added."""
    folder = writer.folder
    before = {p for p in folder.rglob("*") if p.is_file()}
    save(os.fspath(folder))
    added = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p not in before)
    for name in added:
        writer.adopt(name)
    return added


def _read(path: Path) -> dict[str, torch.Tensor]:
    """A weights file as a ``state_dict``, never unpickling."""
    if path.suffix != ".safetensors":
        state: dict[str, torch.Tensor] = load_file(path)
        return state
    try:
        from safetensors.torch import load_file as load_safetensors
    except ImportError as err:
        raise CheckpointError(
            f"{os.fspath(path)!r} is a safetensors file, and reading it needs the safetensors package: "
            "pip install safetensors (transformers and peft install it)."
        ) from err
    try:
        return load_safetensors(path)
    except FileNotFoundError as err:
        raise CheckpointError(f"Checkpoint file {os.fspath(path)!r} is missing.") from err
    except Exception as err:
        raise CheckpointError(
            f"Checkpoint file {os.fspath(path)!r} cannot be read ({type(err).__name__}: {err}): "
            "it is truncated or corrupted. Resume from another checkpoint."
        ) from err


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The full-model weights in ``folder``: one file, or the shards its index lists."""
    for single, index in ((SAFE_WEIGHTS_NAME, _SAFE_INDEX_NAME), (WEIGHTS_NAME, _WEIGHTS_INDEX_NAME)):
        if (folder / single).is_file():
            return _read(folder / single)
        if (folder / index).is_file():
            try:
                shards = sorted(set(json.loads((folder / index).read_text(encoding="utf-8"))["weight_map"].values()))
            except (OSError, ValueError, KeyError, AttributeError) as err:
                raise CheckpointError(f"Checkpoint file {os.fspath(folder / index)!r} is unreadable: {err}") from err
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(_read(folder / shard))
            return state
    raise CheckpointError(
        f"{os.fspath(folder)!r} holds no model weights: none of {SAFE_WEIGHTS_NAME}, {_SAFE_INDEX_NAME}, "
        f"{WEIGHTS_NAME}, {_WEIGHTS_INDEX_NAME}, {ADAPTER_CONFIG_NAME}."
    )


def _load_full(model: nn.Module, folder: Path) -> None:
    state = _read_weights(folder)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # a tensor of another shape
        problems = [line.strip() for line in str(err).splitlines()[1:]]
        raise CheckpointError(
            f"The weights in {os.fspath(folder)!r} do not fit the model ({type(model).__name__}): "
            f"{'; '.join(problems[:3])}{' ...' if len(problems) > 3 else ''}. "
            "Build the same architecture as the one saved."
        ) from err
    # save_pretrained leaves tied weights out (GPT-2's lm_head shares the embedding's
    # storage): a missing key is fine when its tensor is one that was loaded.
    current = model.state_dict(keep_vars=True)
    loaded = {current[key].data_ptr() for key in state if key in current}
    untied = [key for key in missing if current[key].data_ptr() not in loaded]
    if untied or unexpected:
        raise CheckpointError(
            f"The weights in {os.fspath(folder)!r} do not fit the model ({type(model).__name__}): "
            f"missing {untied[:5]}{'...' if len(untied) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''}. Build the same architecture as the one saved."
        )


def _load_adapters(model: nn.Module, folder: Path) -> None:
    load = getattr(model, "load_adapter", None)
    names = list(getattr(model, "peft_config", None) or {})
    if not callable(load) or not names:
        raise CheckpointError(
            f"{os.fspath(folder)!r} holds adapter weights ({ADAPTER_CONFIG_NAME}), but the model "
            f"({type(model).__name__}) has no PEFT adapters to load them into. Wrap the base model with "
            "peft.get_peft_model(...) as when it was saved."
        )
    for name in names:
        # PEFT's save_pretrained writes the "default" adapter at the top, any other in a folder of its name.
        source = folder if name == "default" else folder / name
        if not any((source / file).is_file() for file in _ADAPTER_FILES):
            raise CheckpointError(f"{os.fspath(source)!r} holds no weights for the model's adapter {name!r}.")
        # is_trainable=True: load into the existing adapter without switching the model to eval mode.
        load(os.fspath(source), adapter_name=name, is_trainable=True)


def load_model_files(model: nn.Module, folder: str | os.PathLike[str]) -> None:
    """Load the weights :func:`write_model_files` (or the library itself) wrote in ``folder`` into ``model``.

    Raises:
        CheckpointError: No weights, a damaged file, weights of another architecture,
            or adapter weights for a model without adapters; the message names the file.
    """
    inner = unwrap_model(model)
    path = Path(folder)
    was_training = inner.training
    try:
        if (path / ADAPTER_CONFIG_NAME).is_file():
            _load_adapters(inner, path)
        else:
            _load_full(inner, path)
    finally:
        inner.train(was_training)


def save_model_folder(model: nn.Module, target: str | os.PathLike[str], processing_class: Any = None) -> list[str]:
    """Write ``model`` (and ``processing_class``, if it has ``save_pretrained``) into ``target``.

    The files are written into a temporary folder inside ``target``, fsynced, then each
    moved into place with an atomic rename: a crash never leaves a half-written file
    under a final name. Returns the names written.
    """
    folder = Path(target)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".tmp-save-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        with deferred_fsync() as fsync:
            writer = FolderWriter(tmp, fsync)
            names = write_model_files(model, writer)
            if has_save_pretrained(processing_class):
                names += adopt_written(writer, processing_class.save_pretrained)
        for name in names:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp / name, folder / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return names
