"""Check the import boundaries between workspace packages (uv cannot enforce them).

Rules (DESIGN.md section 2, CONVENTIONS.md item 7), checked on every module under
``packages/*/src`` by reading its AST (nothing is imported):

- ``epochal_core`` imports nothing from another workspace package (it stays vendorable);
- an integration imports ``epochal_core`` and itself, never another integration;
- the meta-package ``epochal`` may import every package (it re-exports them).

Plain ``import``/``from ... import`` statements count wherever they are (also under
``TYPE_CHECKING`` or inside functions), and so do ``importlib.import_module("...")``
and ``__import__("...")`` calls with a literal name.

Usage::

    python tools/check_imports.py            # print the workspace import graph
    python tools/check_imports.py --check    # exit 1 and list the violations, if any
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = "epochal_core"
#: May import every workspace package.
META = "epochal"
#: Declared exceptions: importer -> workspace packages it may import besides the core.
#: (DESIGN.md allows epochal-dagshub to build on epochal-mlflow, if it says so here.)
ALLOWED: dict[str, frozenset[str]] = {
    # DagsHub's tracking is MLflow's protocol: DagsHubCallback subclasses MLflowCallback.
    "epochal_dagshub": frozenset({"epochal_mlflow"}),
}


@dataclass(frozen=True)
class Import:
    """One import of a workspace package by a module of another one."""

    path: Path
    line: int
    importer: str
    imported: str

    def describe(self, root: Path) -> str:
        try:
            where = self.path.relative_to(root)
        except ValueError:
            where = self.path
        return f"{where}:{self.line}: {self.importer} imports {self.imported}"


def workspace_packages(root: Path) -> dict[str, Path]:
    """Top-level import name -> its ``src/<name>`` folder, for every ``packages/*/src/*`` package."""
    found: dict[str, Path] = {}
    for src in sorted(root.glob("packages/*/src")):
        for folder in sorted(src.iterdir()):
            if folder.is_dir() and (folder / "__init__.py").is_file():
                found[folder.name] = folder
    return found


def _imported_names(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """``(line, absolute module name)`` of every import in ``tree`` (relative imports stay in the package)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:
                yield node.lineno, node.module
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            first = node.args[0]
            if name in {"import_module", "__import__"} and isinstance(first, ast.Constant) \
                    and isinstance(first.value, str) and not first.value.startswith("."):
                yield node.lineno, first.value


def cross_imports(root: Path) -> list[Import]:
    """Every import, in ``packages/*/src``, of a workspace package other than the importer itself."""
    packages = workspace_packages(root)
    found: list[Import] = []
    for importer, folder in packages.items():
        for path in sorted(folder.rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for line, module in _imported_names(tree):
                top = module.partition(".")[0]
                if top in packages and top != importer:
                    found.append(Import(path, line, importer, top))
    return found


def allowed(item: Import) -> bool:
    """Whether ``item`` respects the rules in the module docstring."""
    if item.importer == META:
        return True
    if item.importer == CORE:
        return False
    return item.imported == CORE or item.imported in ALLOWED.get(item.importer, frozenset())


def violations(root: Path = ROOT) -> list[str]:
    """One line per forbidden import (empty when the workspace is clean)."""
    return [item.describe(root) for item in cross_imports(root) if not allowed(item)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="exit 1 if an import crosses a forbidden boundary")
    parser.add_argument("--root", type=Path, default=ROOT, help="workspace root (default: this checkout)")
    options = parser.parse_args(argv)
    root: Path = options.root.resolve()
    if not workspace_packages(root):
        print(f"no packages/*/src/<package> under {root}", file=sys.stderr)
        return 2
    if options.check:
        bad = violations(root)
        for line in bad:
            print(f"forbidden import: {line}", file=sys.stderr)
        if bad:
            print(
                f"{len(bad)} forbidden import(s): the core imports no workspace package, and an integration "
                "imports only epochal_core (shared code belongs in the core).",
                file=sys.stderr,
            )
            return 1
        print(f"imports ok: {len(workspace_packages(root))} packages")
        return 0
    edges: dict[str, set[str]] = {name: set() for name in workspace_packages(root)}
    for item in cross_imports(root):
        edges[item.importer].add(item.imported)
    for importer, imported in edges.items():
        mark = "" if all(allowed(Import(Path(), 0, importer, other)) for other in imported) else "  <- FORBIDDEN"
        print(f"{importer} -> {', '.join(sorted(imported)) or '(nothing in the workspace)'}{mark}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
