"""Write the skeleton of a new integration package and register it in the workspace.

``python tools/new_integration.py NAME SDK`` creates ``packages/epochal-NAME``:

- ``pyproject.toml``: the core in a compatible range, the SDK, the
  ``epochal.integrations`` entry point (``<report_to> = "epochal_NAME:<Class>"``);
- ``src/epochal_NAME/__init__.py``: one :class:`~epochal_core.integrations.IntegrationCallback`
  subclass of the usual shape (class attributes, a constructor free of side
  effects, ``configuration_problem``, ``setup`` / ``log_metrics`` / ``finish``),
  with ``TODO`` where the SDK calls go; and ``py.typed``;
- ``README.md``;
- ``tests/test_NAME.py``: read-back and resume tests driven by
  ``epochal_core.testing.scripted_run``; they fail until ``read_back`` reads what
  the SDK wrote (a skeleton must not pass for an integration that logs nothing);

then adds the package to the root ``pyproject.toml`` (``dependencies`` and
``[tool.uv.sources]``) and re-runs ``tools/sync_meta_package.py``. The skeleton
passes the contract test (``tests/test_contract.py``) as written.

The report_to name and class name default to what the project documents for
NAME (``KNOWN_INTEGRATIONS`` in the core; DESIGN.md's class names need
``--class-name`` when they are not ``<Name>Callback``)::

    python tools/new_integration.py wandb wandb --sdk-package "wandb>=0.19" --class-name WandbCallback
    python tools/new_integration.py azureml azureml.core --sdk-package azureml-core --class-name AzureMLCallback
    uv lock && uv sync --all-packages
"""

from __future__ import annotations

import argparse
import ast
import re
import subprocess
import sys
from pathlib import Path
from string import Template

ROOT = Path(__file__).resolve().parents[1]
CORE = "epochal-core"
_WORD = re.compile(r"[a-z][a-z0-9]*(?:-[a-z0-9]+)*")
_REQUIREMENT_NAME = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
_VERSION = re.compile(r'^version = "([^"]+)"$', re.MULTILINE)


class ScaffoldError(Exception):
    """The package cannot be written as asked (bad name, already there, inconsistent names)."""


# -- templates (string.Template: ``$name``; ``$$`` is a literal dollar) ---------------------------------

PYPROJECT = Template('''\
[project]
name = "$dist"
version = "$version"
description = "epochal integration: report_to=\\"$report_to\\"."
readme = "README.md"
requires-python = "$requires_python"
license = "Apache-2.0"
dependencies = [
    "$core_requirement",
    "$sdk_requirement",
]

[project.entry-points."epochal.integrations"]
$report_to = "$module:$cls"

[build-system]
requires = ["hatchling>=1.26"]
build-backend = "hatchling.build"

[tool.hatch.build.targets.wheel]
packages = ["src/$module"]

[tool.uv.sources]
epochal-core = { workspace = true }
''')

MODULE = Template('''\
"""$title integration for epochal: ``report_to="$report_to"``.

Install with ``pip install $dist``::

    from epochal_core import Trainer, TrainingArguments

    args = TrainingArguments(output_dir="out", report_to=["$report_to"])
    Trainer(model, args, train_dataset=data).train()

To configure it in code, pass ``callbacks=[$cls(...)]`` (and leave ``"$report_to"``
out of ``report_to``). ``$sdk`` is imported only when the run starts, on world rank zero.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from epochal_core.integrations import IntegrationCallback

if TYPE_CHECKING:
    from epochal_core.state import TrainerState
    from epochal_core.training_args import TrainingArguments

__all__ = ["$cls"]


class $cls(IntegrationCallback):
    """Sends logs to $title (transformers' ``$cls``).

    TODO: the environment variables transformers' callback honours
    (../shared/reference/transformers-callbacks.md section 7).

    Raises:
        ImportError: At setup, when ``$sdk_package`` is not installed.

    """

    name: ClassVar[str] = "$report_to"
    package: ClassVar[str] = "$dist"
    sdk: ClassVar[str] = "$sdk"
    sdk_package: ClassVar[str] = "$sdk_package"

    def __init__(self) -> None:
        # Cheap and free of side effects (no SDK import, file or network): the run starts in setup().
        super().__init__()
        #: The SDK's run between setup and finish.
        self.run: Any = None

    @classmethod
    def configuration_problem(cls) -> str | None:
        """Why $title cannot start without interaction under ``report_to="all"``, or ``None``."""
        # TODO: when credentials are missing and no offline mode is set, say which variable to set.
        return None

    def setup(self, args: TrainingArguments, state: TrainerState, model: Any, **kwargs: Any) -> None:
        """Start the run (reopen :attr:`run_id` when :attr:`resuming`) and log the hyperparameters."""
        sdk = self.import_sdk()
        # TODO: start or reopen the run with the SDK; keep its id in self.run_id (saved in checkpoints);
        # log self.hyperparameters(args, model) under the names transformers' callback uses.
        self.run = sdk

    def log_metrics(self, metrics: dict[str, float | int], step: int, state: TrainerState) -> None:
        """Send ``metrics`` (keys already ``train/``, ``eval/``, ``test/``) at ``step``."""
        # TODO: send them, e.g. self.run.log(metrics, step=step).

    def finish(self, status: str) -> None:
        """Flush and close the run; ``status`` is ``"finished"`` or ``"failed"``."""
        run, self.run = self.run, None
        if run is None:
            return
        # TODO: close the run, marked as failed when status == "failed".
''')

README = Template('''\
# $dist

Sends epochal training metrics to $title (`report_to="$report_to"`).

```bash
pip install $dist
```

## Usage

```python
from epochal_core import Trainer, TrainingArguments

args = TrainingArguments(output_dir="out", report_to=["$report_to"], logging_steps=10)
Trainer(model, args, train_dataset=train_ds).train()
```

To configure it in code, pass the callback yourself (and leave `$report_to` out of `report_to`):

```python
from $module import $cls

Trainer(model, TrainingArguments(output_dir="out", report_to="none"), train_dataset=train_ds,
        callbacks=[$cls()]).train()
```

## What is logged

TODO: a table (when, what, SDK call), with the names transformers' `$cls` uses.

## Environment variables

TODO: the variables transformers' callback honours, and the SDK's own.

## Resume

The run id is kept in each checkpoint; `train(resume_from_checkpoint=...)` continues the same run,
and steps the run already holds are not sent again.

## Differences from transformers' `$cls`, and why

TODO.
''')

TEST = Template('''\
"""$cls against the real $sdk SDK offline, reading back what it wrote."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from epochal_core.integrations import rewrite_logs
from epochal_core.state import TrainerState
from epochal_core.testing import ScriptedFailure, scripted_run
from $module import $cls


def read_back(folder: Path) -> list[tuple[str, int, float]]:
    """``(name, step, value)`` of every metric the SDK wrote under ``folder``, in the SDK's own format."""
    raise NotImplementedError(
        "TODO: parse what $sdk wrote offline (recipes in ../shared/reference/sdk-offline.md)"
    )


def expected(log_history: list[dict[str, Any]]) -> list[tuple[str, int, float]]:
    """``(name, step, value)`` of every number in ``log_history``, keys rewritten as the callback sends them."""
    return [
        (key, entry["step"], value)
        for entry in log_history
        for key, value in rewrite_logs({k: v for k, v in entry.items() if k != "step"}).items()
        if isinstance(value, (int, float))
    ]


def test_scripted_run_reads_back_as_log_history(tmp_path: Path) -> None:
    run = scripted_run($cls(), output_dir=tmp_path / "out")
    assert sorted(read_back(tmp_path)) == sorted(expected(run.state.log_history))


def test_resume_continues_the_run_and_sends_no_step_twice(tmp_path: Path) -> None:
    first = $cls()
    with pytest.raises(ScriptedFailure):
        scripted_run(first, output_dir=tmp_path / "out", max_steps=10, fail_at_step=6)
    state = TrainerState.load_from_json(str(tmp_path / "out" / "checkpoint-5" / "trainer_state.json"))
    second = $cls()
    second.load_state_dict(state.stateful_callbacks["$cls"]["state_dict"])
    run = scripted_run(second, output_dir=tmp_path / "out", max_steps=10, start_step=5, state=state)
    assert second.run_id == first.run_id
    assert sorted(read_back(tmp_path)) == sorted(expected(run.state.log_history))
''')


# -- names ---------------------------------------------------------------------------------------------


def known_integrations(root: Path) -> dict[str, str]:
    """``KNOWN_INTEGRATIONS`` (report_to name -> distribution) read from the core's AST, wherever it lives."""
    for path in sorted((root / "packages" / CORE / "src" / "epochal_core").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in tree.body:
            target = node.target if isinstance(node, ast.AnnAssign) else None
            if isinstance(node, ast.Assign) and len(node.targets) == 1:
                target = node.targets[0]
            if isinstance(target, ast.Name) and target.id == "KNOWN_INTEGRATIONS" and node.value is not None:
                known: dict[str, str] = ast.literal_eval(node.value)
                return known
    return {}


def workspace_version(root: Path) -> tuple[str, str]:
    """The core's version and ``requires-python`` (one of each for the whole workspace)."""
    text = (root / "packages" / CORE / "pyproject.toml").read_text(encoding="utf-8")
    version = _VERSION.search(text)
    python = re.search(r'^requires-python = "([^"]+)"$', text, re.MULTILINE)
    if version is None or python is None:
        raise ScaffoldError(f"packages/{CORE}/pyproject.toml has no version or requires-python line")
    return version.group(1), python.group(1)


def core_requirement(version: str) -> str:
    """``epochal-core>=X.Y.Z,<next``: next minor below 1.0, next major from 1.0 (CONVENTIONS.md 12)."""
    major, minor = (int(part) for part in version.split(".")[:2])
    upper = f"0.{minor + 1}" if major == 0 else f"{major + 1}"
    return f"{CORE}>={version},<{upper}"


def names(root: Path, word: str, sdk: str, report_to: str | None, class_name: str | None,
          sdk_requirement: str | None) -> dict[str, str]:
    """Every name of the package, checked against each other and against the core's known names."""
    if not _WORD.fullmatch(word):
        raise ScaffoldError(f"NAME={word!r} is invalid: use lowercase letters, digits and dashes, like 'wandb'.")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*", sdk):
        raise ScaffoldError(f"SDK={sdk!r} is invalid: give the SDK's import name, like 'wandb' or 'azureml.core'.")
    dist = f"epochal-{word}"
    known = known_integrations(root)
    documented = {d: n for n, d in known.items()}.get(dist)
    report_to = report_to or documented or word
    if known.get(report_to, dist) != dist:
        raise ScaffoldError(f"--report-to={report_to!r} belongs to {known[report_to]}, not {dist}.")
    if report_to not in known and report_to != word:
        raise ScaffoldError(
            f"--report-to={report_to!r} differs from NAME={word!r}: add it to KNOWN_INTEGRATIONS in the core, "
            "or use the same word for both."
        )
    cls = class_name or "".join(part.capitalize() for part in word.split("-")) + "Callback"
    if not re.fullmatch(r"[A-Z][A-Za-z0-9]*Callback", cls) or cls.lower() != word.replace("-", "") + "callback":
        raise ScaffoldError(
            f"--class-name={cls!r} is invalid: it must spell NAME plus 'Callback' in any case, like "
            f"{word.replace('-', '').capitalize()}Callback."
        )
    requirement = sdk_requirement or sdk.partition(".")[0].replace("_", "-")
    match = _REQUIREMENT_NAME.match(requirement)
    if match is None:
        raise ScaffoldError(f"--sdk-package={requirement!r} is not a requirement, like 'wandb>=0.19'.")
    version, python = workspace_version(root)
    return {
        "word": word, "dist": dist, "module": dist.replace("-", "_"), "cls": cls, "report_to": report_to,
        "sdk": sdk, "sdk_package": match.group(1), "sdk_requirement": requirement.strip(),
        "version": version, "requires_python": python, "core_requirement": core_requirement(version),
        "title": cls.removesuffix("Callback"),
    }


# -- writing --------------------------------------------------------------------------------------------


def files(n: dict[str, str]) -> dict[str, str]:
    """Path inside the package folder -> content."""
    return {
        "pyproject.toml": PYPROJECT.substitute(n),
        "README.md": README.substitute(n),
        f"src/{n['module']}/__init__.py": MODULE.substitute(n),
        f"src/{n['module']}/py.typed": "",
        f"tests/test_{n['word'].replace('-', '_')}.py": TEST.substitute(n),
    }


def _insert_sorted(block: list[str], line: str, after: int) -> list[str]:
    """``block`` with ``line`` added among ``block[after:]`` in sorted order (the head stays first)."""
    head, tail = block[:after], block[after:]
    return head + sorted({*tail, line})


def register(root: Path, dist: str) -> None:
    """Add ``dist`` to the root ``pyproject.toml``'s ``dependencies`` and ``[tool.uv.sources]``."""
    path = root / "pyproject.toml"
    text = path.read_text(encoding="utf-8")
    deps = re.search(r"^dependencies = \[\n((?:    .*\n)*)\]\n", text, re.MULTILINE)
    sources = re.search(r"^\[tool\.uv\.sources\]\n((?:.+\n)*)", text, re.MULTILINE)
    if deps is None or sources is None:
        raise ScaffoldError("the root pyproject.toml needs a multi-line `dependencies = [` list and [tool.uv.sources]")
    # The meta-package and the core stay first; integrations follow by name.
    dep_lines = _insert_sorted(deps.group(1).splitlines(), f'    "{dist}",', 2)
    source_lines = _insert_sorted(sources.group(1).splitlines(), f"{dist} = {{ workspace = true }}", 2)
    text = (text[:sources.start(1)] + "".join(f"{line}\n" for line in source_lines) + text[sources.end(1):])
    text = text[:deps.start(1)] + "".join(f"{line}\n" for line in dep_lines) + text[deps.end(1):]
    path.write_text(text, encoding="utf-8")


def create(root: Path, n: dict[str, str]) -> Path:
    """Write the package, register it and regenerate the meta-package; return its folder."""
    folder = root / "packages" / n["dist"]
    if folder.exists():
        raise ScaffoldError(f"{folder} already exists; delete it first to start again.")
    for relative, content in files(n).items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")
    register(root, n["dist"])
    sync = root / "tools" / "sync_meta_package.py"
    done = subprocess.run([sys.executable, str(sync), "--root", str(root)], capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        raise ScaffoldError(f"tools/sync_meta_package.py failed:\n{done.stderr}")
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("name", help="the package's word: epochal-NAME, epochal_NAME, tests/test_NAME.py")
    parser.add_argument("sdk", help="the SDK's import name (wandb, mlflow, azureml.core)")
    parser.add_argument("--report-to", help="the report_to name (default: the documented one, else NAME)")
    parser.add_argument("--class-name", help="the callback class (default: <Name>Callback)")
    parser.add_argument("--sdk-package", help="the SDK requirement, with a version range (default: SDK's name)")
    parser.add_argument("--root", type=Path, default=ROOT, help="workspace root (default: this checkout)")
    ns = parser.parse_args(argv)
    try:
        n = names(ns.root, ns.name, ns.sdk, ns.report_to, ns.class_name, ns.sdk_package)
        folder = create(ns.root, n)
    except ScaffoldError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {folder.relative_to(ns.root)} ({n['cls']}, report_to={n['report_to']!r}); next:\n"
          f"  uv lock && uv sync --all-packages\n"
          f"  fill in the TODOs, then: uv run pytest {folder.relative_to(ns.root)} tests/test_contract.py -q")
    return 0


if __name__ == "__main__":
    sys.exit(main())
