"""``python -m epochal_core integrations``: list the ``report_to`` integrations and their SDKs.

Reads package metadata only: no integration or SDK is imported.
"""

from __future__ import annotations

import argparse
import sys

from .discovery import KNOWN_INTEGRATIONS, available_integrations


def main(argv: list[str] | None = None) -> int:
    """Print each integration's name, distribution, version and its SDK's installed version."""
    parser = argparse.ArgumentParser(prog="python -m epochal_core")
    parser.add_argument("command", choices=["integrations"], help="what to list")
    parser.parse_args(argv)
    found = available_integrations()
    rows = [("report_to", "distribution", "version", "sdk")]
    rows += [(i.name, i.distribution, i.version, i.sdk_status() if i.importable() else "module missing")
             for i in found.values()]
    rows += [(name, dist, "-", "not installed") for name, dist in KNOWN_INTEGRATIONS.items() if name not in found]
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
