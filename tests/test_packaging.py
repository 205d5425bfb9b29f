"""Package metadata consistency across ``packages/*`` (DESIGN.md section 2, CONVENTIONS.md 1, 2, 7, 12).

Read from the ``pyproject.toml`` files and the source tree, nothing installed is
trusted, except for the slow tests at the end: they build each package's wheel
and resolve each integration's alone, as ``pip install epochal-<word>`` would in a
fresh environment, to show that it pulls in its SDK and nothing of the other
integrations, and the meta-package's with all of them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections import Counter
from email.parser import Parser
from pathlib import Path
from typing import Any

import pytest
from epochal_core.discovery import KNOWN_INTEGRATIONS
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the workspace supports 3.10, where tomllib is missing
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
GROUP = "epochal.integrations"
CORE = "epochal-core"
#: DESIGN.md section 2: the core depends on these only.
CORE_DEPENDENCIES = {"torch", "typing-extensions", "tqdm"}
#: The meta-package depends on everything and registers nothing.
META = "epochal"
#: The one integration that may build on another (DESIGN.md section 2): its distribution -> the base's.
BUILDS_ON = {"epochal-dagshub": "epochal-mlflow"}
#: Workspace-only: installed by `uv run` from the root, never published nor part of the meta-package.
DEMO = "epochal-demo"
#: Distribution -> report_to name, where it is not the distribution's word (epochal-comet: "comet_ml").
KNOWN_NAMES = {dist: name for name, dist in KNOWN_INTEGRATIONS.items()}

PACKAGE_DIRS = sorted(p.parent for p in ROOT.glob("packages/*/pyproject.toml"))
INTEGRATION_DIRS = [p for p in PACKAGE_DIRS if p.name.startswith("epochal-") and p.name not in (CORE, DEMO)]
#: What the meta-package pins: every package but itself and the workspace-only demo.
META_MEMBERS = {p.name for p in PACKAGE_DIRS if p.name not in (META, DEMO)}


def load(folder: Path) -> dict[str, Any]:
    with (folder / "pyproject.toml").open("rb") as fobj:
        data: dict[str, Any] = tomllib.load(fobj)
    return data


def project(folder: Path) -> dict[str, Any]:
    return dict(load(folder)["project"])


def dependencies(folder: Path) -> list[Requirement]:
    return [Requirement(line) for line in project(folder).get("dependencies", [])]


def word(folder: Path) -> str:
    return folder.name.removeprefix("epochal-")


def import_name(folder: Path) -> str:
    return folder.name.replace("-", "_")


def sdks_of(folder: Path) -> set[str]:
    """The SDK an integration requires: one, or none when it writes its tracker's format itself."""
    skip = {CORE, BUILDS_ON.get(folder.name)}
    return {canonicalize_name(r.name) for r in dependencies(folder) if canonicalize_name(r.name) not in skip}


def base_of(folder: Path) -> Path | None:
    """The integration package ``folder`` is declared to build on, if any."""
    base = BUILDS_ON.get(folder.name)
    return folder.parent / base if base is not None else None


def next_release(version: Version) -> str:
    """The first version a compatible range must exclude: next minor below 1.0, next major from 1.0."""
    return f"0.{version.minor + 1}.0" if version.major == 0 else f"{version.major + 1}.0.0"


@pytest.fixture(params=PACKAGE_DIRS, ids=[p.name for p in PACKAGE_DIRS])
def package(request: pytest.FixtureRequest) -> Path:
    return Path(request.param)


@pytest.fixture(params=INTEGRATION_DIRS, ids=[p.name for p in INTEGRATION_DIRS])
def integration(request: pytest.FixtureRequest) -> Path:
    return Path(request.param)


# -- the workspace as a whole ---------------------------------------------------------------------------


def test_workspace_has_the_core_and_integrations() -> None:
    assert ROOT / "packages" / CORE in PACKAGE_DIRS
    assert INTEGRATION_DIRS


def test_one_version_for_all_packages() -> None:
    versions = {p.name: project(p)["version"] for p in PACKAGE_DIRS}
    assert len(set(versions.values())) == 1, versions
    init = (ROOT / "packages" / CORE / "src" / "epochal_core" / "__init__.py").read_text(encoding="utf-8")
    match = re.search(r'^__version__ = "([^"]+)"', init, re.MULTILINE)
    assert match and match.group(1) == versions[CORE], "epochal_core.__version__ differs from its pyproject"


def test_meta_package_pins_every_package() -> None:
    """``epochal`` (the meta-package) depends on every package at exactly this version."""
    meta = ROOT / "packages" / META
    version = project(meta)["version"]
    pins = {canonicalize_name(r.name): str(r.specifier) for r in dependencies(meta)}
    assert pins == {name: f"=={version}" for name in META_MEMBERS}


def test_demo_is_workspace_only() -> None:
    """The demo: installed by ``uv run`` from the root, absent from the meta-package and from the core."""
    root = load(ROOT)
    assert DEMO in {canonicalize_name(Requirement(r).name) for r in root["project"]["dependencies"]}
    assert project(ROOT / "packages" / DEMO)["scripts"] == {"epochal-demo": "epochal_demo.demo:main"}
    assert DEMO not in {canonicalize_name(r.name) for r in dependencies(ROOT / "packages" / META)}
    core = ROOT / "packages" / CORE
    assert "scripts" not in project(core)
    # Vendoring the core (copying its folder) copies no demo.
    assert not [p for p in (core / "src").rglob("*.py") if "demo" in p.read_text(encoding="utf-8").lower()]


def test_same_python_requirement_everywhere() -> None:
    wanted = {p.name: project(p).get("requires-python") for p in PACKAGE_DIRS}
    wanted["(root)"] = load(ROOT)["project"].get("requires-python")
    assert len(set(wanted.values())) == 1, wanted


def test_root_installs_every_package_from_the_workspace() -> None:
    root = load(ROOT)
    names = {p.name for p in PACKAGE_DIRS}
    assert {canonicalize_name(Requirement(r).name) for r in root["project"]["dependencies"]} == names
    sources = root["tool"]["uv"]["sources"]
    assert {name for name, source in sources.items() if source == {"workspace": True}} >= names
    assert root["tool"]["uv"]["workspace"]["members"] == ["packages/*"]


def test_test_file_names_are_unique() -> None:
    """One pytest session runs every package's tests; a file name may appear only once."""
    files = [p.name for p in ROOT.glob("packages/*/tests/test_*.py")] + [p.name for p in ROOT.glob("tests/test_*.py")]
    assert [name for name, n in Counter(files).items() if n > 1] == []


def test_no_forbidden_imports_between_packages() -> None:
    """``tools/check_imports.py --check``: the core imports no package, integrations only the core."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "check_imports.py"), "--check"],
        capture_output=True, text=True, check=False, timeout=60,
    )
    assert done.returncode == 0, done.stderr


def test_import_check_catches_an_integration_importing_another(tmp_path: Path) -> None:
    """The checker itself: a synthetic workspace with the two forbidden kinds of import fails ``--check``."""
    sources = {
        "epochal-core/src/epochal_core/__init__.py": "from epochal_alpha import AlphaCallback\n",
        "epochal-alpha/src/epochal_alpha/__init__.py": "from epochal_core import TrainerCallback\n",
        "epochal-beta/src/epochal_beta/__init__.py": (
            "import importlib\nfrom typing import TYPE_CHECKING\nfrom . import _impl\n"
            "if TYPE_CHECKING:\n    import epochal_alpha.sub\n"
        ),
        "epochal-beta/src/epochal_beta/_impl.py": "def f():\n    return importlib.import_module('epochal_alpha')\n",
    }
    for name, text in sources.items():
        (tmp_path / "packages" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "packages" / name).write_text(text)
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "check_imports.py"), "--check", "--root", str(tmp_path)],
        capture_output=True, text=True, check=False, timeout=60,
    )
    assert done.returncode == 1
    assert sorted(line for line in done.stderr.splitlines() if line.startswith("forbidden")) == [
        "forbidden import: packages/epochal-beta/src/epochal_beta/__init__.py:5: epochal_beta imports epochal_alpha",
        "forbidden import: packages/epochal-beta/src/epochal_beta/_impl.py:2: epochal_beta imports epochal_alpha",
        "forbidden import: packages/epochal-core/src/epochal_core/__init__.py:1: epochal_core imports epochal_alpha",
    ]


def test_meta_package_is_generated_and_current() -> None:
    """``tools/sync_meta_package.py --check``: the meta-package's pins and re-exports match the packages."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "sync_meta_package.py"), "--check"],
        capture_output=True, text=True, check=False, timeout=60,
    )
    assert done.returncode == 0, done.stderr


def _synthetic_workspace(root: Path, exports: dict[str, str]) -> None:
    """``packages/<name>`` for each ``name -> __init__ source``, plus an empty meta-package."""
    for name, source in exports.items():
        src = root / "packages" / name / "src" / name.replace("-", "_")
        src.mkdir(parents=True)
        (src / "__init__.py").write_text(source)
        (root / "packages" / name / "pyproject.toml").write_text(f'[project]\nname = "{name}"\nversion = "1.2.0"\n')
    (root / "packages" / META).mkdir(parents=True)
    (root / "packages" / META / "pyproject.toml").write_text(
        '[project]\nname = "epochal"\nversion = "1.2.0"\ndependencies = [\n]\n\n[tool.x]\ny = 1\n'
    )


def _sync_meta(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "sync_meta_package.py"), "--root", str(root), *args],
        capture_output=True, text=True, check=False, timeout=60,
    )


def test_meta_generator_writes_pins_and_lazy_re_exports(tmp_path: Path) -> None:
    _synthetic_workspace(tmp_path, {
        "epochal-core": '__all__ = ["Trainer", "__version__", "set_seed"]\nTrainer = 1\nset_seed = 2\n',
        "epochal-alpha": '__all__ = ("AlphaCallback",)\nAlphaCallback = 3\n',
    })
    stale = _sync_meta(tmp_path, "--check")
    assert stale.returncode == 1
    assert "out of date: packages/epochal/pyproject.toml" in stale.stderr
    assert "run `python tools/sync_meta_package.py`" in stale.stderr

    assert _sync_meta(tmp_path).returncode == 0
    assert _sync_meta(tmp_path, "--check").returncode == 0
    pyproject = (tmp_path / "packages" / META / "pyproject.toml").read_text()
    pins = 'dependencies = [\n    "epochal-core==1.2.0",\n    "epochal-alpha==1.2.0",\n]\n'
    assert f"{pins}\n[tool.x]\ny = 1\n" in pyproject, "the rest of the file is kept"
    assert pyproject.endswith(
        "\n\n[tool.uv.sources]\nepochal-core = { workspace = true }\nepochal-alpha = { workspace = true }\n"
    )
    init = (tmp_path / "packages" / META / "src" / "epochal" / "__init__.py").read_text()
    namespace: dict[str, Any] = {}
    exec(compile(init, "epochal/__init__.py", "exec"), namespace)
    assert namespace["__all__"] == ["AlphaCallback", "Trainer", "__version__", "set_seed"]
    assert namespace["_SOURCES"] == {"Trainer": "epochal_core", "set_seed": "epochal_core",
                                     "AlphaCallback": "epochal_alpha"}
    assert namespace["__version__"] == "1.2.0"

    (tmp_path / "packages" / "epochal-alpha" / "src" / "epochal_alpha" / "__init__.py").write_text(
        '__all__ = ["AlphaCallback", "BetaCallback"]\n'
    )
    assert "out of date: packages/epochal/src/epochal/__init__.py" in _sync_meta(tmp_path, "--check").stderr


@pytest.mark.parametrize(("alpha", "message"), [
    ('__all__ = ["Trainer"]\n', "'Trainer' is exported by both epochal_core and epochal_alpha"),
    ("__all__ = [name for name in dir()]\n", "__all__ must be a literal list of strings"),
    ("AlphaCallback = 3\n", "no __all__; list the package's public names in it"),
], ids=["name-exported-twice", "computed-all", "no-all"])
def test_meta_generator_refuses_an_ambiguous_workspace(tmp_path: Path, alpha: str, message: str) -> None:
    _synthetic_workspace(tmp_path, {"epochal-core": '__all__ = ["Trainer"]\n', "epochal-alpha": alpha})
    done = _sync_meta(tmp_path)
    assert done.returncode == 1
    assert message in done.stderr
    assert not (tmp_path / "packages" / META / "src").exists(), "nothing is written on an error"


# -- every package --------------------------------------------------------------------------------------


def test_layout_and_names(package: Path) -> None:
    meta = project(package)
    assert meta["name"] == package.name, "folder name == distribution name"
    assert meta.get("readme") == "README.md" and (package / "README.md").is_file()
    assert (package / "README.md").read_text(encoding="utf-8").strip()
    src = package / "src" / import_name(package)
    assert (src / "__init__.py").is_file(), f"src layout: {src}"
    assert (src / "py.typed").is_file(), "py.typed marks the package as typed"
    assert load(package)["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"] == [
        f"src/{import_name(package)}"
    ]
    assert list((package / "tests").glob("test_*.py")), "each package has its own tests"


def test_no_dev_tools_in_packages(package: Path) -> None:
    """Dev tools live in the root ``dev`` group only (one lock, one dev group)."""
    data = load(package)
    assert "dependency-groups" not in data
    assert not {"dev", "test", "tests"} & set(data["project"].get("optional-dependencies", {}))


def test_core_depends_on_no_workspace_package() -> None:
    core = ROOT / "packages" / CORE
    assert {canonicalize_name(r.name) for r in dependencies(core)} == CORE_DEPENDENCIES
    assert GROUP not in project(core).get("entry-points", {})


#: Packages an integration may require beside its SDK because the SDK picks them up when installed
#: (the same table as test_contract.SDK_COMPANIONS, keyed by distribution).
SDK_COMPANIONS = {
    "epochal-tensorboard": {"crc32c"},  # tensorboardX's native CRC-32C (issue 16); pure Python without it
}


def test_integration_dependencies(integration: Path) -> None:
    """The core in a compatible range, and at most one SDK (never another integration)."""
    version = Version(project(integration)["version"])
    deps = dependencies(integration)
    core = [r for r in deps if canonicalize_name(r.name) == CORE]
    assert len(core) == 1, f"{integration.name} must depend on {CORE}"
    spec = core[0].specifier
    assert spec.contains(version), f"{core[0]} excludes the current core {version}"
    assert spec.contains(Version(f"{version.major}.{version.minor}.{version.micro + 1}")), \
        f"{core[0]} pins the core: use a compatible range (CONVENTIONS.md 12)"
    assert not spec.contains(Version(next_release(version))), f"{core[0]} has no upper bound"
    base = BUILDS_ON.get(integration.name)
    sources = {CORE: {"workspace": True}}
    if base is not None:
        [on_base] = [r for r in deps if canonicalize_name(r.name) == base]
        assert on_base.specifier == spec, f"{on_base}: the same compatible range as the core"
        sources[base] = {"workspace": True}
    companions = SDK_COMPANIONS.get(integration.name, set())
    others = [r for r in deps if canonicalize_name(r.name) not in {CORE, base, *companions}]
    assert len(others) <= 1, f"one SDK at most, not {[str(r) for r in others]}"
    for sdk in others:
        assert not canonicalize_name(sdk.name).startswith("epochal"), "an integration never depends on another"
        assert not sdk.url and not sdk.marker, f"SDK {sdk} must be a plain, unconditional requirement"
    assert load(integration)["tool"]["uv"]["sources"] == sources


def test_integration_entry_point(integration: Path) -> None:
    points = project(integration).get("entry-points", {})
    assert set(points) == {GROUP}, f"only the {GROUP!r} group, got {sorted(points)}"
    ((name, value),) = points[GROUP].items()
    module, _, cls = value.partition(":")
    assert module == import_name(integration)
    assert re.fullmatch(r"[A-Z][A-Za-z0-9]*Callback", cls), value
    assert cls.lower() == word(integration).replace("-", "") + "callback"
    text = (integration / "src" / module / "__init__.py").read_text(encoding="utf-8")
    assert re.search(rf"\b{cls}\b", text), f"{module} does not define or re-export {cls}"
    assert name == KNOWN_NAMES.get(integration.name, word(integration)), "report_to name of the package"


def test_integration_has_its_test_file(integration: Path) -> None:
    assert (integration / "tests" / f"test_{word(integration).replace('-', '_')}.py").is_file()


# -- built wheels, resolved alone (slow: builds and a resolution against the package index) -------------


def _uv() -> str:
    found = os.environ.get("UV") or shutil.which("uv")
    if not found:
        pytest.skip("uv is not on PATH")
    return found


def _uv_env(cache: Path) -> dict[str, str]:
    """The environment of a ``uv`` subprocess.

    The root conftest points HTTP(S)_PROXY at a closed port and HOME at a temp
    folder. uv runs offline (``UV_OFFLINE``): everything it needs (hatchling, torch,
    the SDKs) is in ``cache`` from the ``uv sync`` that installed this workspace, so
    the tests never reach past loopback, and a missing file fails instead of being
    downloaded. Its cache is ``cache`` (see the ``uv_cache`` fixture).
    """
    env = dict(os.environ)
    env.pop("VIRTUAL_ENV", None)
    env["UV_OFFLINE"] = "1"
    env["UV_CACHE_DIR"] = str(cache)
    env["UV_NO_PROGRESS"] = "1"
    return env


def _run_uv(args: list[str], cache: Path, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    kwargs.setdefault("cwd", ROOT)
    done = subprocess.run(
        [_uv(), *args], env=_uv_env(cache), capture_output=True, text=True, check=False, timeout=300, **kwargs,
    )
    if done.returncode != 0 and re.search(r"error sending request|dns error|Connection refused|timed out", done.stderr):
        pytest.skip(f"the package index is unreachable: {done.stderr.strip().splitlines()[-1]}")
    assert done.returncode == 0, done.stderr
    return done


@pytest.fixture(scope="module")
def uv_cache() -> Path:
    """The user's uv cache, the one ``uv sync`` filled for this workspace (``UV_CACHE_DIR`` if set).

    A fresh virtual environment then gets torch and the SDKs from it as hard links, in
    about a second; a temp cache would download gigabytes (torch's CUDA wheels) per
    session. uv writes into it only what it would write for ``uv sync``: the built
    epochal wheels and any index metadata it revalidates.
    """
    env = dict(os.environ)
    if os.name == "posix":  # the real home: the root conftest moved HOME
        import pwd

        env["HOME"] = pwd.getpwuid(os.getuid()).pw_dir
    if "UV_CACHE_DIR" not in env:
        done = subprocess.run([_uv(), "cache", "dir"], env=env, capture_output=True, text=True, check=True, timeout=60)
        env["UV_CACHE_DIR"] = done.stdout.strip()
    return Path(env["UV_CACHE_DIR"])


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory, uv_cache: Path) -> dict[str, Path]:
    """Every workspace package built once as a wheel: distribution name -> file."""
    out = tmp_path_factory.mktemp("wheels")
    _run_uv(["build", "--all-packages", "--wheel", "--out-dir", str(out)], uv_cache)
    built: dict[str, Path] = {canonicalize_name(p.name.split("-")[0]): p for p in out.glob("*.whl")}
    assert set(built) == {p.name for p in PACKAGE_DIRS}, sorted(built)
    return built


def wheel_metadata(path: Path) -> tuple[Any, str]:
    """The wheel's ``METADATA`` (parsed) and ``entry_points.txt``."""
    with zipfile.ZipFile(path) as zf:
        info = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        points = next((n for n in zf.namelist() if n.endswith(".dist-info/entry_points.txt")), None)
        return Parser().parsestr(zf.read(info).decode()), zf.read(points).decode() if points else ""


def _resolve(direct: dict[str, Path], cache: Path) -> set[str]:
    """Distribution names ``uv pip compile`` resolves for these wheels given as direct requirements.

    Direct wheel URLs mean no epochal-* name is ever looked up on the public index.
    """
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    done = _run_uv(
        ["pip", "compile", "-", "--python-version", python, "--no-header", "--no-annotate", "--quiet"],
        cache, input="".join(f"{name} @ {path.as_uri()}\n" for name, path in sorted(direct.items())),
    )
    return {
        canonicalize_name(re.split(r"\s*(?:==| @ )", line.strip(), maxsplit=1)[0])
        for line in done.stdout.splitlines() if line.strip() and not line.lstrip().startswith("#")
    }


@pytest.mark.slow
def test_wheel_installs_its_sdk_and_nothing_of_the_other_integrations(
    integration: Path, wheels: dict[str, Path], uv_cache: Path
) -> None:
    """Issue 5 item 6: the wheel alone resolves to the core + its SDK (+ theirs), no other integration."""
    wheel = wheels[integration.name]
    metadata, points = wheel_metadata(wheel)
    assert metadata["Name"] == integration.name and metadata["Version"] == project(integration)["version"]
    requires = [Requirement(r) for r in metadata.get_all("Requires-Dist") or []]
    base = base_of(integration)
    assert {canonicalize_name(r.name) for r in requires} == {CORE, *sdks_of(integration)} | (
        {base.name} if base else set()
    )
    assert all(r.url is None for r in requires), "a workspace source leaked into the wheel's metadata"
    assert f"[{GROUP}]" in points and f"= {import_name(integration)}:" in points
    with zipfile.ZipFile(wheel) as zf:
        assert f"{import_name(integration)}/py.typed" in zf.namelist()

    # The wheels as direct requirements (the base's too): the core must satisfy the integration's range.
    own = {integration, *([base] if base else [])}
    resolved = _resolve({p.name: wheels[p.name] for p in own} | {CORE: wheels[CORE]}, uv_cache)
    assert {CORE, *(p.name for p in own), *(sdk for p in own for sdk in sdks_of(p))} <= resolved, sorted(resolved)
    for other in INTEGRATION_DIRS:
        if other not in own:
            assert other.name not in resolved
            assert not sdks_of(other) & resolved, f"{integration.name} pulls in {sdks_of(other)}"
    assert {name for name in resolved if name.startswith("epochal")} == {CORE, *(p.name for p in own)}


@pytest.mark.slow
def test_meta_wheel_pins_every_package_and_resolves_with_their_wheels(
    wheels: dict[str, Path], uv_cache: Path
) -> None:
    """``pip install epochal``: exact pins of every package, no entry point of its own, every SDK resolved."""
    meta = ROOT / "packages" / META
    metadata, points = wheel_metadata(wheels[META])
    version = project(meta)["version"]
    requires = [Requirement(r) for r in metadata.get_all("Requires-Dist") or []]
    assert {canonicalize_name(r.name): str(r.specifier) for r in requires} == {
        name: f"=={version}" for name in META_MEMBERS
    }
    assert points == "", "the meta-package registers nothing (each integration registers itself)"
    with zipfile.ZipFile(wheels[META]) as zf:
        assert {"epochal/__init__.py", "epochal/py.typed"} <= set(zf.namelist())

    resolved = _resolve(wheels, uv_cache)
    assert {p.name for p in PACKAGE_DIRS} <= resolved
    for integration in INTEGRATION_DIRS:
        assert sdks_of(integration) <= resolved, f"{integration.name}'s SDK is missing"


# -- the install stories: fresh virtual environments from the built wheels (slow) -------------------------
#
# Each story installs wheels into a new venv with `uv pip install`, pinned to the versions in uv.lock
# (so every file comes from the uv cache), then runs Python there. Torch and the SDKs are hard links
# from the cache: a venv with torch takes about a second on one file system.

#: Tracker SDKs of transformers' integrations: none may come with the core, and an integration
#: brings its own only.
TRACKER_SDKS = {
    "azureml-core", "clearml", "codecarbon", "comet-ml", "dagshub", "dvclive", "flytekit", "mlflow",
    "mlflow-skinny", "neptune", "neptune-client", "tensorboard", "tensorboardx", "wandb",
}

_TINY_RUN = """
import sys
from epochal_core import Trainer, TrainingArguments
from epochal_core.testing import TinyRegressor, tiny_dataset

report_to = sys.argv[1].split(",") if len(sys.argv) > 1 else "all"
args = TrainingArguments(output_dir="out", max_steps=4, logging_steps=2, save_steps=4, report_to=report_to,
                         disable_tqdm=True)
trainer = Trainer(model=TinyRegressor(), args=args, train_dataset=tiny_dataset(32))
trainer.train()
import epochal_core
print("trained", trainer.state.global_step, sorted(type(cb).__name__ for cb in trainer.callback_handler.callbacks),
      epochal_core.__file__)
"""


@pytest.fixture(scope="module")
def lock_constraints(tmp_path_factory: pytest.TempPathFactory, uv_cache: Path) -> Path:
    """Every third-party version of uv.lock as a constraints file."""
    path = tmp_path_factory.mktemp("constraints") / "constraints.txt"
    _run_uv(["export", "--frozen", "--no-hashes", "--no-emit-workspace", "--all-packages", "--no-dev",
             "--no-header", "--no-annotate", "--quiet", "--output-file", str(path)], uv_cache)
    return path


class Venv:
    """A fresh virtual environment of this interpreter, filled by ``uv pip install``."""

    def __init__(self, folder: Path, cache: Path, constraints: Path) -> None:
        self.folder, self.cache, self.constraints = folder, cache, constraints
        _run_uv(["venv", "--quiet", "--python", sys.executable, str(folder)], cache)
        self.python = folder / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
        self.baseline: set[str] = set()

    def install(self, *requirements: str | Path) -> None:
        _run_uv(["pip", "install", "--quiet", "--python", str(self.python), "--constraint", str(self.constraints),
                 *map(str, requirements)], self.cache)

    def distributions(self) -> set[str]:
        done = self.run("-c", "import importlib.metadata as m; print(*(d.metadata['Name'] for d in m.distributions()))")
        return {canonicalize_name(line) for line in done.stdout.split()}

    def run(self, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        # The root conftest's environment (temp HOME, trackers offline, strict integrations) applies here too.
        env = {k: v for k, v in os.environ.items() if k not in {"VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"}}
        done = subprocess.run([str(self.python), *args], cwd=cwd or self.folder, env=env, capture_output=True,
                              text=True, check=False, timeout=300)
        assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
        return done


@pytest.fixture(scope="module")
def core_venv(tmp_path_factory: pytest.TempPathFactory, uv_cache: Path, lock_constraints: Path,
              wheels: dict[str, Path]) -> Venv:
    venv = Venv(tmp_path_factory.mktemp("venvs") / "core", uv_cache, lock_constraints)
    venv.install(wheels[CORE])
    venv.baseline = venv.distributions()  # before a test adds the plot extra
    return venv


def _workspace_sdks() -> set[str]:
    return set().union(*(sdks_of(folder) for folder in INTEGRATION_DIRS))


@pytest.mark.slow
def test_core_alone_installs_no_tracker_sdk_and_trains(
    core_venv: Venv, tmp_path: Path, wheels: dict[str, Path]
) -> None:
    installed = core_venv.baseline
    assert {CORE, *CORE_DEPENDENCIES} <= installed
    assert not installed & (TRACKER_SDKS | _workspace_sdks()), sorted(installed & TRACKER_SDKS)
    assert {name for name in installed if name.startswith("epochal")} == {CORE}
    listing = core_venv.run("-m", "epochal_core", "integrations").stdout
    assert all(line.endswith("not installed") for line in listing.splitlines()[1:]), listing

    done = core_venv.run("-c", _TINY_RUN, cwd=tmp_path)  # report_to="all": nothing installed, nothing added
    assert "trained 4 ['DefaultFlowCallback', 'PrinterCallback']" in done.stdout, done.stdout
    assert str(core_venv.folder) in done.stdout.split()[-1], "the installed core ran"

    # The plot extra: matplotlib only, and `python -m epochal_core plot` draws the run just made.
    core_venv.install(f"epochal-core[plot] @ {wheels[CORE].as_uri()}")
    assert "matplotlib" in core_venv.distributions() - installed
    png = Path(core_venv.run("-m", "epochal_core", "plot", "out", cwd=tmp_path).stdout.strip())
    assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_core_plus_dvclive_adds_that_sdk_only(
    core_venv: Venv, tmp_path_factory: pytest.TempPathFactory, uv_cache: Path, lock_constraints: Path,
    wheels: dict[str, Path], tmp_path: Path,
) -> None:
    dvclive = ROOT / "packages" / "epochal-dvclive"
    venv = Venv(tmp_path_factory.mktemp("venvs") / "dvclive", uv_cache, lock_constraints)
    venv.install(wheels[CORE], wheels[dvclive.name])
    added = venv.distributions() - core_venv.baseline
    assert {dvclive.name, *sdks_of(dvclive)} <= added
    assert {name for name in added if name.startswith("epochal")} == {dvclive.name}
    assert not added & (TRACKER_SDKS | _workspace_sdks()) - sdks_of(dvclive) - {"dvc"}, sorted(added)

    done = venv.run("-c", _TINY_RUN, "dvclive", cwd=tmp_path)
    assert "DVCLiveCallback" in done.stdout, done.stdout
    steps = (tmp_path / "out" / "dvclive" / "plots" / "metrics" / "loss.tsv").read_text().splitlines()
    assert [line.split("\t")[0] for line in steps[1:]] == ["2", "4"], steps


@pytest.mark.slow
def test_meta_package_installs_everything_and_re_exports_it(
    tmp_path_factory: pytest.TempPathFactory, uv_cache: Path, lock_constraints: Path, wheels: dict[str, Path],
    tmp_path: Path,
) -> None:
    venv = Venv(tmp_path_factory.mktemp("venvs") / "meta", uv_cache, lock_constraints)
    venv.install(*wheels.values())
    installed = venv.distributions()
    assert {p.name for p in PACKAGE_DIRS} | _workspace_sdks() <= installed
    done = venv.run("-c", (
        "from epochal import Trainer, TensorBoardCallback\n"
        "import epochal_core, epochal_tensorboard\n"
        "assert Trainer is epochal_core.Trainer and TensorBoardCallback is epochal_tensorboard.TensorBoardCallback\n"
        "print('ok', epochal_core.__file__)\n"
    ), cwd=tmp_path)
    assert done.stdout.startswith("ok ") and str(venv.folder) in done.stdout
    listing = venv.run("-m", "epochal_core", "integrations").stdout
    for folder in INTEGRATION_DIRS:
        assert any(f" {folder.name} " in line and "not installed" not in line for line in listing.splitlines()), listing


_VENDORED_RUN = """
import importlib.metadata, sys
from pathlib import Path
import epochal_core
assert Path(epochal_core.__file__).parent == Path.cwd() / "epochal_core", epochal_core.__file__
try:
    importlib.metadata.distribution("epochal-core")
    sys.exit("epochal-core is installed: this is not a vendored copy")
except importlib.metadata.PackageNotFoundError:
    pass
""" + _TINY_RUN


@pytest.mark.slow
def test_vendored_core_trains_in_a_bare_project(
    tmp_path_factory: pytest.TempPathFactory, uv_cache: Path, lock_constraints: Path, tmp_path: Path,
) -> None:
    """Copy ``src/epochal_core`` into a project whose venv has only torch, tqdm and typing-extensions."""
    venv = Venv(tmp_path_factory.mktemp("venvs") / "bare", uv_cache, lock_constraints)
    venv.install(*sorted(CORE_DEPENDENCIES))
    assert not {name for name in venv.distributions() if name.startswith("epochal")}
    project = tmp_path / "project"
    shutil.copytree(ROOT / "packages" / CORE / "src" / "epochal_core", project / "epochal_core",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (project / "train.py").write_text(_VENDORED_RUN)
    done = venv.run("train.py", cwd=project)
    assert "trained 4 ['DefaultFlowCallback', 'PrinterCallback']" in done.stdout, done.stdout
    assert (project / "out" / "checkpoint-4" / "COMPLETE").is_file()
