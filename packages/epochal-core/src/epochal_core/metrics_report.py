"""``log_metrics`` / ``save_metrics`` as transformers writes them (console table, ``*_results.json``)."""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Mapping
from typing import Any

__all__ = ["format_metrics", "metrics_table", "write_metrics"]


def _secs_to_timedelta(secs: float) -> str:
    msec = int(abs(secs - int(secs)) * 100)
    return f"{datetime.timedelta(seconds=int(secs))}.{msec:02d}"


def format_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Transformers' ``metrics_format``: runtimes as ``h:mm:ss.cc``, FLOs in GF, floats to 4 decimals."""
    formatted = dict(metrics)
    for key, value in formatted.items():
        if "_mem_" in key:
            formatted[key] = f"{value >> 20}MB"
        elif "_runtime" in key:
            formatted[key] = _secs_to_timedelta(value)
        elif key == "total_flos":
            formatted[key] = f"{int(value) >> 30}GF"
        elif isinstance(value, float):
            formatted[key] = round(value, 4)
    return formatted


def metrics_table(split: str, metrics: Mapping[str, Any]) -> str:
    """The block ``log_metrics`` prints: a header and one aligned ``key = value`` line per metric."""
    formatted = format_metrics(metrics)
    k_width = max((len(str(k)) for k in formatted), default=0)
    v_width = max((len(str(v)) for v in formatted.values()), default=0)
    lines = [f"***** {split} metrics *****"]
    lines += [f"  {key: <{k_width}} = {formatted[key]!s:>{v_width}}" for key in sorted(formatted)]
    return "\n".join(lines)


def write_metrics(output_dir: str, split: str, metrics: Mapping[str, Any], combined: bool = True) -> None:
    """Write ``<split>_results.json`` and, with ``combined``, merge into ``all_results.json`` (sorted, indent 4)."""
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, f"{split}_results.json"), "w") as f:
        json.dump(dict(metrics), f, indent=4, sort_keys=True)
    if combined:
        path = os.path.join(output_dir, "all_results.json")
        merged: dict[str, Any] = {}
        if os.path.exists(path):
            with open(path) as f:
                merged = json.load(f)
        merged.update(metrics)
        with open(path, "w") as f:
            json.dump(merged, f, indent=4, sort_keys=True)
