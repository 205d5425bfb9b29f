"""Generate the meta-package ``packages/epochal`` from the other workspace packages.

Two things in ``packages/epochal`` are generated, never edited by hand
(CONVENTIONS.md item 11):

- the ``dependencies`` list of its ``pyproject.toml``: every other workspace
  package except the workspace-only ones (:data:`WORKSPACE_ONLY`: the demo),
  pinned to exactly the meta-package's version (and its
  ``[tool.uv.sources]`` table, so uv takes them from the workspace);
- ``src/epochal/__init__.py``: every name in each package's ``__all__`` (read
  from the AST of its ``__init__.py``, nothing is imported), re-exported lazily
  so ``import epochal`` imports neither torch nor any integration, let alone a
  tracker SDK. ``__version__`` is the meta-package's own.

Two packages exporting the same name is an error (the flat ``epochal`` namespace
would silently hide one of them): rename one, or leave it out of its ``__all__``.

Usage::

    python tools/sync_meta_package.py            # rewrite the generated parts
    python tools/sync_meta_package.py --check    # exit 1 if they are out of date (CI)
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = "epochal-core"
META = "epochal"
#: Workspace-only packages the meta-package leaves out (not published, not part of the API).
WORKSPACE_ONLY = frozenset({"epochal-demo"})
GENERATE_COMMAND = "python tools/sync_meta_package.py"

_DEPENDENCIES = re.compile(r"^dependencies = \[\n(?:.*\n)*?\]\n", re.MULTILINE)
_SOURCES_TABLE = re.compile(r"^\[tool\.uv\.sources\]\n(?:.+\n)*", re.MULTILINE)
_VERSION = re.compile(r'^version = "([^"]+)"$', re.MULTILINE)


class MetaPackageError(Exception):
    """The workspace cannot produce a meta-package (a name exported twice, an ``__all__`` that is not literal)."""


@dataclass(frozen=True)
class Package:
    """One workspace package the meta-package re-exports."""

    distribution: str
    module: str
    exports: tuple[str, ...]


def _exports(init: Path) -> tuple[str, ...]:
    """The literal ``__all__`` of ``init``, without dunder names."""
    tree = ast.parse(init.read_text(encoding="utf-8"), filename=str(init))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            try:
                names = ast.literal_eval(node.value)
            except ValueError:
                names = None
            if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
                raise MetaPackageError(f"{init}: __all__ must be a literal list of strings to be re-exported")
            return tuple(n for n in names if not (n.startswith("__") and n.endswith("__")))
    raise MetaPackageError(f"{init}: no __all__; list the package's public names in it to re-export them")


def packages(root: Path) -> list[Package]:
    """The packages to re-export: the core first, then the others by name."""
    found: list[Package] = []
    for pyproject in sorted(root.glob("packages/*/pyproject.toml")):
        folder = pyproject.parent
        if folder.name == META or folder.name in WORKSPACE_ONLY:
            continue
        module = folder.name.replace("-", "_")
        found.append(Package(folder.name, module, _exports(folder / "src" / module / "__init__.py")))
    found.sort(key=lambda p: (p.distribution != CORE, p.distribution))
    return found


def _kind(name: str) -> int:
    """isort's groups, in ruff's order: CONSTANTS, then Classes, then functions and variables."""
    return 0 if name.isupper() else 1 if name[:1].isupper() else 2


def _import_order(name: str) -> tuple[int, str, str]:
    """The order ruff's isort wants inside ``from x import (...)``: by kind, then case-insensitive."""
    return (_kind(name), name.lower(), name)


def _all_order(name: str) -> tuple[int, str]:
    """The order of ``__all__`` (as in epochal_core): by kind, then by code point."""
    return (_kind(name), name)


def _sources(found: list[Package]) -> dict[str, str]:
    """Public name -> module that defines it; a name exported by two packages is an error."""
    sources: dict[str, str] = {}
    for package in found:
        for name in package.exports:
            if name in sources:
                raise MetaPackageError(
                    f"{name!r} is exported by both {sources[name]} and {package.module}; "
                    "the epochal namespace is flat, so rename one or drop it from that package's __all__"
                )
            sources[name] = package.module
    return sources


def meta_version(root: Path) -> str:
    """The meta-package's version (the workspace has one version; tests/test_packaging.py checks it)."""
    text = (root / "packages" / META / "pyproject.toml").read_text(encoding="utf-8")
    match = _VERSION.search(text)
    if match is None:
        raise MetaPackageError(f"packages/{META}/pyproject.toml has no version line")
    return match.group(1)


def render_pyproject(current: str, found: list[Package], version: str) -> str:
    """``current`` with its ``dependencies`` list (exact pins) and ``[tool.uv.sources]`` table regenerated."""
    if not _DEPENDENCIES.search(current):
        raise MetaPackageError(f"packages/{META}/pyproject.toml has no multi-line `dependencies = [` list")
    pins = "".join(f'    "{p.distribution}=={version}",\n' for p in found)
    text = _DEPENDENCIES.sub(lambda _: f"dependencies = [\n{pins}]\n", current, count=1)
    sources = "[tool.uv.sources]\n" + "".join(f"{p.distribution} = {{ workspace = true }}\n" for p in found)
    if _SOURCES_TABLE.search(text):
        return _SOURCES_TABLE.sub(lambda _: sources, text, count=1)
    return f"{text.rstrip()}\n\n{sources}"


_INIT_HEAD = '''\
"""epochal: the PyTorch Trainer with transformers' callback protocol, and every integration.

Install with ``pip install epochal`` (the core and every tracker integration; each
is also published alone, e.g. ``pip install epochal-core epochal-tensorboard``)::

    from epochal import EarlyStoppingCallback, Trainer, TrainingArguments

    args = TrainingArguments(output_dir="out", report_to=["tensorboard"])
    Trainer(model=model, args=args, train_dataset=train_ds).train()

Every name in the ``__all__`` of these packages is importable from here, the same
object as in its own package:

{modules}

Names load on first use: ``import epochal`` imports neither torch nor any
integration, and a tracker's SDK is imported only when its callback starts a run.

Generated by ``{command}`` from each package's ``__all__``; do not edit.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

'''

_INIT_TAIL = '''

def __getattr__(name: str) -> Any:
    module = _SOURCES.get(name)
    if module is None:
        raise AttributeError(f"module 'epochal' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
'''


def render_init(found: list[Package], version: str) -> str:
    """The meta-package's ``__init__.py``."""
    sources = _sources(found)
    modules = "\n".join(f"- ``{p.module}`` ({p.distribution})" for p in found)
    lines = [_INIT_HEAD.format(modules=modules, command=GENERATE_COMMAND), "if TYPE_CHECKING:\n"]
    for package in sorted(found, key=lambda p: p.module):
        names = sorted(package.exports, key=_import_order)
        if names:
            lines.append(f"    from {package.module} import (\n")
            lines.extend(f"        {name},\n" for name in names)
            lines.append("    )\n")
    lines.append(f'\n__version__ = "{version}"\n\n')
    lines.append("# Public name -> the module that defines it, imported on first access.\n")
    lines.append("_SOURCES: dict[str, str] = {\n")
    lines.extend(f'    "{name}": "{module}",\n' for name, module in sources.items())
    lines.append("}\n\n__all__ = [\n")
    lines.extend(f'    "{name}",\n' for name in sorted([*sources, "__version__"], key=_all_order))
    lines.append("]\n")
    lines.append(_INIT_TAIL)
    return "".join(lines)


def generated(root: Path, found: list[Package]) -> dict[Path, str]:
    """Each generated file -> the text it should have, re-exporting ``found``."""
    meta = root / "packages" / META
    version = meta_version(root)
    pyproject = meta / "pyproject.toml"
    return {
        pyproject: render_pyproject(pyproject.read_text(encoding="utf-8"), found, version),
        meta / "src" / "epochal" / "__init__.py": render_init(found, version),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="exit 1 if a generated file is out of date")
    parser.add_argument("--root", type=Path, default=ROOT, help="workspace root (default: this checkout)")
    options = parser.parse_args(argv)
    root: Path = options.root.resolve()
    if not (root / "packages" / META / "pyproject.toml").is_file():
        print(f"no packages/{META}/pyproject.toml under {root}", file=sys.stderr)
        return 2
    try:
        found = packages(root)
        wanted = generated(root, found)
    except MetaPackageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    stale = [path for path, text in wanted.items() if not path.is_file() or path.read_text(encoding="utf-8") != text]
    if options.check:
        for path in stale:
            print(f"out of date: {path.relative_to(root)}", file=sys.stderr)
        if stale:
            print(f"run `{GENERATE_COMMAND}` (then `uv lock` if the dependencies changed)", file=sys.stderr)
            return 1
        print(f"meta-package up to date: {len(found)} packages re-exported")
        return 0
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(wanted[path], encoding="utf-8")
        print(f"wrote {path.relative_to(root)}")
    if not stale:
        print("meta-package already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
