"""``python -m epochal_core``: list the installed integrations, or draw a run's curves.

- ``python -m epochal_core integrations`` lists the ``report_to`` integrations and
  their SDKs from package metadata only (no integration or SDK is imported).
- ``python -m epochal_core plot OUTPUT_DIR [--output PNG] [--size WxH]`` draws the
  training loss, eval metrics and learning rate of the run in ``OUTPUT_DIR``
  against steps into a PNG and prints its path (needs matplotlib:
  ``pip install 'epochal-core[plot]'``).
"""

from __future__ import annotations

import argparse
import sys


def _list_integrations() -> int:
    from .discovery import KNOWN_INTEGRATIONS, available_integrations

    found = available_integrations()
    rows = [("report_to", "distribution", "version", "sdk")]
    rows += [(i.name, i.distribution, i.version, i.sdk_status() if i.importable() else "module missing")
             for i in found.values()]
    rows += [(name, dist, "-", "not installed") for name, dist in KNOWN_INTEGRATIONS.items() if name not in found]
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


def _size(text: str) -> tuple[int, int]:
    width, sep, height = text.lower().partition("x")
    if sep and width.isdigit() and height.isdigit() and int(width) > 0 and int(height) > 0:
        return int(width), int(height)
    raise argparse.ArgumentTypeError(f"--size {text!r} must be WIDTHxHEIGHT in pixels, e.g. 1200x900")


def _plot(output_dir: str, output: str | None, size: tuple[int, int]) -> int:
    from .plot import plot_run

    try:
        path = plot_run(output_dir, output, size=size)
    except (ImportError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command named in ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    from .plot import DEFAULT_FILE_NAME, DEFAULT_SIZE

    parser = argparse.ArgumentParser(prog="python -m epochal_core")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{integrations,plot}")
    commands.add_parser("integrations", help="list the report_to integrations and their SDKs")
    plot = commands.add_parser("plot", help="draw a run's loss, eval metrics and learning rate into a PNG")
    plot.add_argument("output_dir", metavar="OUTPUT_DIR", help="the run's TrainingArguments.output_dir")
    plot.add_argument("-o", "--output", help=f"the PNG to write (default: OUTPUT_DIR/{DEFAULT_FILE_NAME})")
    plot.add_argument("--size", type=_size, default=DEFAULT_SIZE, metavar="WxH",
                      help="picture size in pixels (default: {}x{})".format(*DEFAULT_SIZE))
    args = parser.parse_args(argv)
    if args.command == "plot":
        return _plot(args.output_dir, args.output, args.size)
    return _list_integrations()


if __name__ == "__main__":
    sys.exit(main())
