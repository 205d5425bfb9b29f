"""Checkpoints written by transformers' Trainer: recognising them and reading their model weights.

transformers writes no ``COMPLETE`` manifest, so nothing proves such a folder was
written whole; epochal resumes one only when its path is passed explicitly, with
a warning. Its weights are ``pytorch_model.bin`` or ``model.safetensors``; the
latter is read with the ``safetensors`` package when it is installed (it is not a
core dependency: ``pip install safetensors``).
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

from .checkpoint import COMMIT_MARKER, CheckpointError, load_file

__all__ = ["SAFE_WEIGHTS_NAME", "is_transformers_checkpoint", "load_model_weights"]

SAFE_WEIGHTS_NAME = "model.safetensors"
_BIN_WEIGHTS_NAME = "pytorch_model.bin"
_STATE_NAME = "trainer_state.json"


def is_transformers_checkpoint(path: str | os.PathLike[str]) -> bool:
    """A folder with transformers' files (state, weights, ``training_args.bin``) and no epochal manifest.

    ``training_args.bin`` (epochal writes ``training_args.json``) tells it from an
    epochal checkpoint whose save was interrupted, which must stay refused.
    """
    folder = Path(path)
    has_weights = (folder / SAFE_WEIGHTS_NAME).is_file() or (folder / _BIN_WEIGHTS_NAME).is_file()
    transformers_files = (folder / _STATE_NAME).is_file() and (folder / "training_args.bin").is_file()
    return not (folder / COMMIT_MARKER).exists() and transformers_files and has_weights


def load_model_weights(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The state dict in ``path``: ``pytorch_model.bin``, else ``model.safetensors``.

    Raises:
        CheckpointError: No weights file, or ``model.safetensors`` without the ``safetensors`` package.
    """
    folder = Path(path)
    if (folder / _BIN_WEIGHTS_NAME).is_file():
        return load_file(folder / _BIN_WEIGHTS_NAME)  # type: ignore[no-any-return]
    safe = folder / SAFE_WEIGHTS_NAME
    if not safe.is_file():
        raise CheckpointError(f"{os.fspath(folder)!r} holds no {_BIN_WEIGHTS_NAME} or {SAFE_WEIGHTS_NAME}.")
    try:
        safetensors_torch = importlib.import_module("safetensors.torch")
    except ImportError as err:
        raise CheckpointError(
            f"{os.fspath(safe)!r} is a safetensors file and the safetensors package is not installed: "
            "pip install safetensors."
        ) from err
    weights: dict[str, Any] = safetensors_torch.load_file(str(safe), device="cpu")
    return weights
