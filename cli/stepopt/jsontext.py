"""Strict JSON for every machine-readable output (``--json``, ``export --to json``, ``eval`` tables).

Python's ``json`` writes an infinite float as ``Infinity``, which is not JSON (RFC 8259): strict
parsers (``jq``, JavaScript's ``JSON.parse``, Python's ``json.loads`` with ``parse_constant``
raising) reject it. Grids from pure noise begin at ``sigma = inf`` (and ``lam = -inf``), so stepopt
writes a non-finite float as a *string*: ``"inf"``, ``"-inf"`` (and ``"nan"``, which no valid output
holds). ``float(value)`` reads each back in Python (YAML schedule files keep ``.inf``).

>>> json_text({"sigmas": [float("inf"), 1.5], "lam": -float("inf")})
'{"sigmas": ["inf", 1.5], "lam": "-inf"}'
"""

from __future__ import annotations

import json
import math
from typing import Any


def strict(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by ``"inf"``, ``"-inf"`` or ``"nan"`` (containers copied)."""
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    return obj


def json_text(obj: Any, indent: int | None = None) -> str:
    """Strict JSON text of ``obj`` (non-finite floats as strings; other unknown values by ``str``)."""
    return json.dumps(strict(obj), indent=indent, default=_fallback, allow_nan=False)


def _fallback(value: Any) -> Any:
    # numpy scalars and 0-d arrays become Python numbers (then strings if non-finite); anything else its str.
    item = getattr(value, "item", None)
    if callable(item):
        try:
            out = item()
        except (TypeError, ValueError):
            return str(value)
        if isinstance(out, (int, float, bool, str)):
            return strict(out)
    return str(value)
