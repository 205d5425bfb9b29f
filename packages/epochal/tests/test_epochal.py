"""The meta-package: every public name re-exported, and nothing imported until it is used (issue 7.5)."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from importlib.metadata import packages_distributions, requires
from pathlib import Path

import epochal
import pytest
from epochal_core.discovery import available_integrations
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[3]
#: The packages the meta-package re-exports: all but the workspace-only demo (tools/sync_meta_package.py).
WORKSPACE_MODULES = sorted(
    folder.name.replace("-", "_") for folder in ROOT.glob("packages/epochal-*")
    if (folder / "pyproject.toml").is_file() and folder.name != "epochal-demo"
)


def tracker_sdk_modules() -> set[str]:
    """Top-level modules of the SDKs every installed integration requires (as tests/test_contract.py finds them)."""
    required = {canonicalize_name(Requirement(line).name)
                for info in available_integrations().values() for line in requires(info.distribution) or []}
    sdks = required - {"epochal-core"}
    return {module for module, dists in packages_distributions().items()
            if sdks & {canonicalize_name(d) for d in dists}}


_FRESH_PROCESS = """
import json, sys
watched = set(sys.argv[1:])
seen = {}
def loaded(label):
    seen[label] = sorted({m.partition(".")[0] for m in sys.modules} & watched)

import epochal
loaded("import epochal")
from epochal import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
loaded("protocol names")
callbacks = [getattr(epochal, name)() for name in epochal.__all__ if name.endswith("Callback")
             and name != "IntegrationCallback" and issubclass(getattr(epochal, name), epochal.IntegrationCallback)]
loaded("every integration callback constructed")
from epochal import Trainer
loaded("Trainer")
from epochal_core.testing import scripted_run
run = scripted_run(epochal.DVCLiveCallback(), output_dir="out", max_steps=2, logging_steps=1, eval_steps=2,
                   save_steps=2)
assert run.failures == [], run.failures
loaded("a DVCLive callback used")
print(json.dumps({"seen": seen, "callbacks": sorted(type(c).__name__ for c in callbacks)}))
"""


def test_import_epochal_imports_no_tracker_sdk_until_a_callback_is_used(tmp_path: Path) -> None:
    """In a fresh process: torch only with the Trainer, an SDK only once its callback runs."""
    sdks = tracker_sdk_modules()
    assert {"dvclive", "comet_ml", "neptune"} <= sdks, sorted(sdks)
    watched = sorted({*sdks, "torch", *WORKSPACE_MODULES})
    done = subprocess.run(
        [sys.executable, "-c", _FRESH_PROCESS, *watched],
        cwd=tmp_path, capture_output=True, text=True, check=False, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    seen = {label: set(modules) for label, modules in result["seen"].items()}

    assert seen["import epochal"] == set(), "import epochal imports nothing until a name is used"
    assert seen["protocol names"] == {"epochal_core"}, "the protocol names import no torch"
    # Every installed integration's callback is re-exported (and was constructed above).
    assert result["callbacks"] == sorted(info.value.partition(":")[2] for info in available_integrations().values())
    assert {"CometCallback", "DVCLiveCallback", "NeptuneCallback", "TensorBoardCallback"} <= set(result["callbacks"])
    assert not seen["every integration callback constructed"] & sdks
    assert "torch" not in seen["every integration callback constructed"]
    assert "torch" in seen["Trainer"] and not seen["Trainer"] & sdks
    # The watch does see SDKs: using a callback imports its SDK, and no other tracker's.
    assert "dvclive" in seen["a DVCLive callback used"]
    assert not {"comet_ml", "neptune"} & seen["a DVCLive callback used"]


@pytest.mark.parametrize("module_name", WORKSPACE_MODULES)
def test_every_public_name_of_every_package_is_the_same_object_in_epochal(module_name: str) -> None:
    module = importlib.import_module(module_name)
    public = [name for name in module.__all__ if not name.startswith("__")]
    assert public, f"{module_name} exports nothing"
    for name in public:
        assert name in epochal.__all__
        assert getattr(epochal, name) is getattr(module, name), name


def test_all_dir_and_star_import_agree() -> None:
    namespace: dict[str, object] = {}
    exec("from epochal import *", namespace)
    exported = set(epochal.__all__)
    assert exported <= set(namespace) and exported <= set(dir(epochal))
    assert namespace["Trainer"] is importlib.import_module("epochal_core").Trainer
    assert len(epochal.__all__) == len(exported), "a name is listed twice"


def test_version_is_the_workspace_version() -> None:
    assert epochal.__version__ == importlib.import_module("epochal_core").__version__


def test_an_unknown_name_raises_the_usual_errors() -> None:
    with pytest.raises(AttributeError, match="module 'epochal' has no attribute 'TrainerCallbak'"):
        epochal.TrainerCallbak  # noqa: B018
    with pytest.raises(ImportError, match="cannot import name 'WandbCallbak'"):
        exec("from epochal import WandbCallbak", {})
