"""The results file: ``results.json``, its versioned schema, and how it is written and read.

``results.json`` (schema ``attnzoo.bench/1.5``)::

    {"schema": "attnzoo.bench/1.5", "status": "complete" | "interrupted" | "running", "created", "finished", "wall_s",
     "command", "machine": {...}, "config": {...}, "memory_method": "...",
     "efficiency": [row, ...], "efficiency_length": [entry, ...], "approximation": [row, ...], "quality": [row, ...],
     "fresh_memory": [row, ...], "suites": [row, ...], "presses": [row, ...], "fidelity": [row, ...],
     "dynamic": [row, ...]}

Every row keeps its case (method, backend, pattern, mode, length, shapes, device, dtype) and ``status`` (``ok``,
``unsupported``, ``error``, ``oom``, ``timeout``, ``crashed``, ``skipped``) with a ``reason``. ``fresh_memory`` (the
peak memory of one call in a fresh process, :mod:`attnzoo.bench.fresh`) and ``suites`` (the rows of a named suite,
:mod:`attnzoo.bench.suites`) came with version 1.1, ``presses`` (the KV-cache press quality suite,
:mod:`attnzoo.bench.suites.presses`) with 1.2, ``fidelity`` (approximate attention inside a pretrained model,
:mod:`attnzoo.bench.suites.fidelity`) with 1.3, ``dynamic`` (the D family at equal density,
:mod:`attnzoo.bench.suites.dynamic`) with 1.4, the quality study's row fields (``setting``, ``lr``, ``sweep``,
``sizes``, ``layer``: :mod:`attnzoo.bench.suites.quality`) with 1.5. A reader accepts any ``attnzoo.bench/1.x`` file
(sections missing from an older file read as empty lists); a later major version is refused with a clear error.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from attnzoo.errors import fail

SCHEMA = "attnzoo.bench/1.5"
SCHEMA_MAJOR = 1
SECTIONS = (
    "efficiency", "efficiency_length", "approximation", "quality", "fresh_memory", "suites", "presses", "fidelity",
    "dynamic",
)


def _finite(x: Any) -> Any:
    """``x`` with NaN and infinities replaced by None, so that the file is strict JSON."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def save_results(path: Path, results: dict[str, Any]) -> None:
    """Write ``results`` atomically (a temporary file renamed over ``path``) as strict JSON."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_finite(results), indent=1, default=str, allow_nan=False))
    tmp.replace(path)


def load_results(path: str | Path) -> dict[str, Any]:
    """Read a results file, checking its schema."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise fail("results", "an existing results.json file", str(path)) from None
    except json.JSONDecodeError as e:
        raise fail("results", "a JSON file written by attnzoo bench", f"{path}: {e}") from None
    schema = data.get("schema") if isinstance(data, dict) else None
    if not isinstance(schema, str) or not schema.startswith("attnzoo.bench/"):
        raise fail("results", f"a results file with schema {SCHEMA!r}", f"{path} with schema {schema!r}")
    major = schema.split("/", 1)[1].split(".")[0]
    if major != str(SCHEMA_MAJOR):
        raise fail("results", f"schema version {SCHEMA_MAJOR}.x (this attnzoo reads {SCHEMA!r})", schema)
    for section in SECTIONS:
        if not isinstance(data.get(section, []), list):
            raise fail("results", f"a list under {section!r}", type(data[section]).__name__)
        data.setdefault(section, [])
    return data


