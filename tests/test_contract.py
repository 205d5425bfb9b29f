"""The integration contract, checked for every installed ``epochal.integrations`` entry point.

Parametrized by discovery (``available_integrations()``, metadata only), so a new
integration is held to the contract the moment its package registers: the class
loads, follows the callback protocol, constructs offline with no side effects,
survives a full scripted run in strict mode, and its names and distribution
metadata agree with each other (DESIGN.md sections 2 and 3, CONVENTIONS.md 1-5, 9, 12).
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import threading
from importlib.metadata import distribution, packages_distributions
from pathlib import Path
from typing import Any

import epochal_core
import pytest
from epochal_core import EVENTS, TrainerCallback
from epochal_core.discovery import KNOWN_INTEGRATIONS, IntegrationInfo, available_integrations
from epochal_core.testing import scripted_run
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
#: The one integration that may build on another (DESIGN.md section 2): its distribution -> the base's.
BUILDS_ON = {"epochal-dagshub": "epochal-mlflow"}
INTEGRATIONS = available_integrations()
NAMES = sorted(INTEGRATIONS)


@pytest.fixture(params=NAMES)
def info(request: pytest.FixtureRequest) -> IntegrationInfo:
    return INTEGRATIONS[request.param]


def word_of(info: IntegrationInfo) -> str | None:
    """``"comet"`` for ``epochal-comet``; ``None`` for a third-party distribution."""
    dist = canonicalize_name(info.distribution)
    return dist.removeprefix("epochal-") if dist.startswith("epochal-") else None


def requirements(info: IntegrationInfo) -> list[Requirement]:
    """The unconditional requirements of ``info``'s distribution (extras left out)."""
    reqs = [Requirement(line) for line in distribution(info.distribution).requires or []]
    return [r for r in reqs if r.marker is None or "extra" not in str(r.marker)]


def sdk_requirements(info: IntegrationInfo) -> list[Requirement]:
    """Its own SDK: neither the core nor the integration it is declared to build on."""
    skip = {"epochal-core", BUILDS_ON.get(canonicalize_name(info.distribution))}
    return [r for r in requirements(info) if canonicalize_name(r.name) not in skip]


def sdk_modules(info: IntegrationInfo) -> set[str]:
    """Top-level modules installed by the SDK distributions ``info`` requires."""
    wanted = {canonicalize_name(r.name) for r in sdk_requirements(info)}
    return {module for module, dists in packages_distributions().items()
            if wanted & {canonicalize_name(d) for d in dists}}


def tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")} if folder.exists() else set()


# -- discovery -----------------------------------------------------------------------------------


def test_every_workspace_integration_is_discovered() -> None:
    """Each ``packages/epochal-<word>`` (but the core and the demo) registers at least one entry point here."""
    workspace = {p.name for p in ROOT.glob("packages/epochal-*") if p.name not in ("epochal-core", "epochal-demo")}
    registered = {canonicalize_name(i.distribution) for i in INTEGRATIONS.values()}
    assert workspace, "no integration package found under packages/"
    assert workspace <= registered, f"installed but not registered: {sorted(workspace - registered)}"


# -- the class -----------------------------------------------------------------------------------


def test_class_loads_and_follows_the_protocol(info: IntegrationInfo) -> None:
    cls = info.load()
    assert inspect.isclass(cls) and issubclass(cls, TrainerCallback), f"{info.value} is not a TrainerCallback"
    events = {name for name in dir(cls) if name.startswith("on_") and callable(getattr(cls, name))}
    assert events <= set(EVENTS), f"{cls.__name__} defines methods that are no event: {sorted(events - set(EVENTS))}"
    for name in sorted(events):
        method = getattr(cls, name)
        if method is getattr(TrainerCallback, name):
            continue
        params = list(inspect.signature(method).parameters.values())
        positional = [p.name for p in params[1:4]]
        assert positional == ["args", "state", "control"], f"{cls.__name__}.{name}{inspect.signature(method)}"
        assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params), \
            f"{cls.__name__}.{name} must accept **kwargs (new keywords must not break it)"


def test_names_agree(info: IntegrationInfo) -> None:
    """Entry-point name == ``name`` attribute; class ``<Word>Callback`` in ``epochal_<word>``."""
    cls = info.load()
    assert getattr(cls, "name", None) == info.name, \
        f"{cls.__name__}.name = {getattr(cls, 'name', None)!r}, entry point = {info.name!r}"
    word = word_of(info)
    if word is None:  # a third-party package: only the report_to name is ours to check
        assert info.name not in KNOWN_INTEGRATIONS, f"{info.distribution} claims epochal's name {info.name!r}"
        return
    assert info.module == f"epochal_{word.replace('-', '_')}"
    assert cls.__module__.partition(".")[0] == info.module
    assert cls.__name__.lower() == word.replace("-", "") + "callback", cls.__name__
    assert KNOWN_INTEGRATIONS.get(info.name, info.distribution) == info.distribution
    if info.name not in KNOWN_INTEGRATIONS:
        assert info.name == word
    assert getattr(cls, "package", info.distribution) == info.distribution


def test_distribution_metadata_is_consistent(info: IntegrationInfo) -> None:
    """Same version as the core, a compatible core range, one SDK at most (the one the class imports)."""
    cls = info.load()
    if word_of(info) is not None:
        assert info.version == epochal_core.__version__, "one version for all packages"
    core = [r for r in requirements(info) if canonicalize_name(r.name) == "epochal-core"]
    assert len(core) == 1, f"{info.distribution} must depend on epochal-core"
    assert core[0].url is None, f"{info.distribution} depends on a path/URL core: {core[0]}"
    assert core[0].specifier.contains(epochal_core.__version__), f"{core[0]} excludes the installed core"
    base = BUILDS_ON.get(canonicalize_name(info.distribution))
    if base is not None:
        assert base in {canonicalize_name(r.name) for r in requirements(info)}, f"{info.distribution} builds on {base}"
    sdks = sdk_requirements(info)
    assert len(sdks) <= 1, f"{info.distribution} must depend on one SDK at most, not {[str(r) for r in sdks]}"
    declared = getattr(cls, "sdk_package", "")
    if not sdks:
        # No SDK: the integration writes its tracker's format itself, and says so.
        assert not declared and not getattr(cls, "sdk", ""), f"{cls.__name__} names an SDK it does not require"
        assert info.sdk_status() == "none needed"
        return
    assert not canonicalize_name(sdks[0].name).startswith("epochal"), "an integration depends on another one"
    if declared:
        assert canonicalize_name(declared) == canonicalize_name(sdks[0].name), \
            f"{cls.__name__}.sdk_package={declared!r}, but the distribution requires {sdks[0]}"
    sdk_version = Version(distribution(sdks[0].name).version)
    assert sdks[0].specifier.contains(sdk_version, prereleases=True), f"installed {sdks[0].name} {sdk_version}"
    assert info.sdk_status() != "?" and "MISSING" not in info.sdk_status()


# -- construction ----------------------------------------------------------------------------------


def test_constructs_with_no_arguments_and_no_side_effects(info: IntegrationInfo, tmp_path: Path) -> None:
    cls = info.load()
    home = Path(os.environ["HOME"])
    cwd = Path.cwd()
    assert cwd == tmp_path  # root conftest
    before = (tree(cwd), tree(home))
    threads = set(threading.enumerate())

    callback = cls()

    assert (tree(cwd), tree(home)) == before, "construction created files"
    assert not set(threading.enumerate()) - threads, "construction started threads"
    problem = cls.configuration_problem() if hasattr(cls, "configuration_problem") else None
    assert problem is None or (isinstance(problem, str) and problem.strip()), repr(problem)
    assert isinstance(callback, TrainerCallback)


_FRESH_PROCESS = """
import json, os, sys, threading
from epochal_core.discovery import available_integrations
info = available_integrations()[sys.argv[1]]
threads = threading.active_count()
callback = info.load()()
print(json.dumps({
    "modules": sorted(m for m in sys.modules if m.partition(".")[0] in set(sys.argv[2:])),
    "files": sorted(os.listdir(".")) + sorted(os.listdir(os.environ["HOME"])),
    "threads": threading.active_count() - threads,
}))
"""


def test_importing_and_constructing_leaves_the_sdk_unimported(info: IntegrationInfo, tmp_path: Path) -> None:
    """In a fresh process: no SDK import, file or thread until the run starts (lazy SDK import)."""
    modules = sdk_modules(info)
    required = [str(r) for r in sdk_requirements(info)]
    assert modules or not required, f"cannot find the modules of {required}"
    (tmp_path / "home").mkdir()
    env = {**os.environ, "HOME": str(tmp_path / "home")}
    done = subprocess.run(
        [sys.executable, "-c", _FRESH_PROCESS, info.name, *sorted(modules)],
        cwd=tmp_path / "home", env=env, capture_output=True, text=True, check=False, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen == {"modules": [], "files": [], "threads": 0}


# -- a full scripted run ------------------------------------------------------------------------------


def test_survives_a_full_scripted_run_offline_and_strict(info: IntegrationInfo, tmp_path: Path) -> None:
    cls = info.load()
    home = Path(os.environ["HOME"])
    home_before = tree(home)

    run = scripted_run(cls(), output_dir=tmp_path / "out", strict=True)

    assert run.failures == []
    assert run.state.global_step == 10
    assert run.events[-1] == "on_train_end"
    assert [Path(c).name for c in run.checkpoints] == ["checkpoint-5", "checkpoint-10"]
    assert tree(home) == home_before, f"{cls.__name__} wrote into HOME: {sorted(tree(home) - home_before)}"


def test_state_dict_survives_json(info: IntegrationInfo) -> None:
    """Callback state goes into ``trainer_state.json``: it must be JSON and load back."""
    cls = info.load()
    callback: Any = cls()
    if not hasattr(callback, "state_dict"):
        pytest.skip(f"{cls.__name__} keeps no checkpoint state")
    saved = json.loads(json.dumps(callback.state_dict()))
    fresh: Any = cls()
    fresh.load_state_dict(saved)
    assert json.loads(json.dumps(fresh.state_dict())) == saved


def test_every_documented_report_to_name_is_installed() -> None:
    """Each ``report_to`` name of the protocol resolves to an installed epochal package in this workspace."""
    missing = {name: dist for name, dist in KNOWN_INTEGRATIONS.items() if name not in INTEGRATIONS}
    assert not missing, f"documented but not installed: {missing}"
    for name, dist in KNOWN_INTEGRATIONS.items():
        if name in INTEGRATIONS:
            assert canonicalize_name(INTEGRATIONS[name].distribution) == dist, (name, INTEGRATIONS[name].distribution)
