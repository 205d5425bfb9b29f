"""Resolving ``report_to`` names to integration classes through entry points.

Integrations register in the entry-point group ``epochal.integrations`` as
``<report_to name> = "module:Class"``. Names are listed from package metadata
without importing anything; only the classes ``report_to`` asks for are imported.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

# importlib.metadata and importlib.util are imported where used: together they are
# about half of the protocol's import time, and only a Trainer needs them.

__all__ = [
    "ENTRY_POINT_GROUP",
    "KNOWN_INTEGRATIONS",
    "IntegrationInfo",
    "available_integrations",
    "install_hint",
    "resolve_report_to",
]

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "epochal.integrations"

#: ``report_to`` names of the integrations the epochal project publishes, with
#: their distribution, so a known-but-missing name gets the exact install command.
#: (This is documentation of the project's own packages, not a registry: classes
#: are only ever found through entry points.)
KNOWN_INTEGRATIONS: dict[str, str] = {
    "azure_ml": "epochal-azureml",
    "clearml": "epochal-clearml",
    "codecarbon": "epochal-codecarbon",
    "comet_ml": "epochal-comet",
    "dagshub": "epochal-dagshub",
    "dvclive": "epochal-dvclive",
    "flyte": "epochal-flyte",
    "mlflow": "epochal-mlflow",
    "neptune": "epochal-neptune",
    "tensorboard": "epochal-tensorboard",
    "wandb": "epochal-wandb",
}

# Never selected by "all": they need an environment of their own (as in transformers).
_EXPLICIT_ONLY = frozenset({"flyte"})


def install_hint(package: str, what: str) -> str:
    """The one wording used everywhere for a missing package."""
    return f"{what} requires the package {package!r}: install it with `pip install {package}` (or `uv add {package}`)."


@dataclass(frozen=True)
class IntegrationInfo:
    """An installed integration, known from metadata only.

    Args:
        name: The ``report_to`` name.
        value: ``"module:Class"`` of the callback.
        distribution: Distribution that declared it.
        version: That distribution's version.
    """

    name: str
    value: str
    distribution: str
    version: str

    @property
    def module(self) -> str:
        """Module that holds the callback class."""
        return self.value.partition(":")[0]

    def load(self) -> type[Any]:
        """Import and return the callback class."""
        from importlib.metadata import EntryPoint

        return EntryPoint(self.name, self.value, ENTRY_POINT_GROUP).load()  # type: ignore[no-any-return]

    def sdk_status(self) -> str:
        """The SDK requirements of the distribution and their installed versions, from metadata only."""
        import re
        from importlib.metadata import PackageNotFoundError, distribution, version

        try:
            requires = distribution(self.distribution).requires or []
        except PackageNotFoundError:
            return "?"
        parts = []
        for req in requires:
            if "extra ==" in req:
                continue
            name = re.split(r"[\s<>=!~;\[(]", req, maxsplit=1)[0]
            if name.startswith("epochal"):
                continue
            try:
                parts.append(f"{name} {version(name)}")
            except PackageNotFoundError:
                parts.append(f"{name} MISSING")
        return ", ".join(parts) or "none needed"

    def importable(self) -> bool:
        """Whether the integration module can be found, without importing it."""
        try:
            import importlib.util

            return importlib.util.find_spec(self.module) is not None
        except (ImportError, ValueError):
            return False


def available_integrations() -> dict[str, IntegrationInfo]:
    """Every installed integration by name, sorted, read from entry-point metadata."""
    found: dict[str, IntegrationInfo] = {}
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist
        info = IntegrationInfo(
            ep.name,
            ep.value,
            dist.metadata["Name"] if dist is not None else "?",
            dist.version if dist is not None else "?",
        )
        if ep.name in found and found[ep.name].value != ep.value:
            logger.warning(
                "Two packages register report_to name %r (%s and %s); using %s.",
                ep.name, found[ep.name].distribution, info.distribution, found[ep.name].distribution,
            )
            continue
        found.setdefault(ep.name, info)
    return dict(sorted(found.items()))


def resolve_report_to(report_to: str | list[str]) -> list[tuple[str, type[Any], bool]]:
    """Turn ``report_to`` into ``(name, class, explicit)`` triples, importing only those.

    ``"all"`` means every installed integration except explicit-only ones
    (``flyte``); ``"none"`` means none.

    Raises:
        ValueError: An unknown name (the message lists the known ones), or a
            known one that is not installed (the message gives the package).
    """
    installed = available_integrations()
    if report_to == "none":
        return []
    explicit = report_to != "all"
    names = list(report_to) if explicit else [n for n in installed if n not in _EXPLICIT_ONLY]
    resolved = []
    for name in names:
        info = installed.get(name)
        if info is None:
            if name in KNOWN_INTEGRATIONS:
                hint = install_hint(KNOWN_INTEGRATIONS[name], f"report_to={name!r}")
                raise ValueError(f"report_to={name!r} is not installed. {hint}")
            known = sorted(set(installed) | set(KNOWN_INTEGRATIONS))
            raise ValueError(f"report_to={name!r} is unknown: known names are {known} (or 'all', 'none').")
        resolved.append((name, info.load(), explicit))
    return resolved
