"""epochal-demo: ``uv run epochal-demo`` trains a tiny character-level GPT with epochal's Trainer.

A workspace-only package: it is not part of the ``epochal`` meta-package and is
not needed to use epochal. It lives outside ``epochal-core`` so that vendoring
the core copies no demo. See :mod:`epochal_demo.demo`.
"""

from __future__ import annotations

from .demo import CharTokenizer, CharWindows, TinyGPT, generate, load_stdlib_text, main

__all__ = ["CharTokenizer", "CharWindows", "TinyGPT", "generate", "load_stdlib_text", "main"]
