"""Parsing and formatting of sizes (bytes) and durations (seconds).

Every boundary of agentcg takes and returns plain numbers in base units: bytes as
`int`, seconds as `float`. These helpers turn human input into those units and refuse
anything ambiguous with `InvalidInput`.
"""
from __future__ import annotations

import math
import re

from agentcg.errors import InvalidInput

Bytes = int
Seconds = float

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1024, "kb": 1000, "kib": 1024,
    "m": 1024**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1024**3, "gb": 1000**3, "gib": 1024**3,
    "t": 1024**4, "tb": 1000**4, "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")

_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}
_DURATION_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-z]*)\s*$")


def parse_size(text: str | int, *, what: str = "size") -> Bytes:
    """'300M', '1.5GiB', '185.5MB', '4096' -> bytes.

    Bare K/M/G/T are binary (like the kernel's memory.max and docker); 'KB', 'MB',
    'GB' are decimal (like podman stats); 'KiB', 'MiB', 'GiB' are binary.
    """
    if isinstance(text, bool):
        raise InvalidInput(f"{what}: expected a size such as 512M or 2GiB, got {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise InvalidInput(f"{what}: a size cannot be negative ({text})")
        return text
    match = _SIZE_RE.match(str(text))
    if not match:
        raise InvalidInput(f"{what}: expected a size such as 512M, 2GiB or 185.5MB, got {text!r}")
    number, unit = match.groups()
    factor = _SIZE_UNITS.get(unit.lower())
    if factor is None:
        raise InvalidInput(
            f"{what}: unknown unit {unit!r} in {text!r}; use B, K/KiB, M/MiB, G/GiB, KB, MB or GB"
        )
    return int(round(float(number) * factor))


def parse_duration(text: str | float | int, *, what: str = "duration") -> Seconds:
    """'100ms', '2s', '1.5', '5min' -> seconds. A bare number is seconds."""
    if isinstance(text, bool):
        raise InvalidInput(f"{what}: expected a duration such as 100ms or 2s, got {text!r}")
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        match = _DURATION_RE.match(str(text).lower())
        if not match:
            raise InvalidInput(f"{what}: expected a duration such as 100ms, 2s or 5min, got {text!r}")
        number, unit = match.groups()
        factor = _DURATION_UNITS.get(unit or "s")
        if factor is None:
            raise InvalidInput(f"{what}: unknown unit {unit!r} in {text!r}; use ns, us, ms, s, min or h")
        value = float(number) * factor
    if value < 0 or math.isnan(value) or math.isinf(value):
        raise InvalidInput(f"{what}: must be a finite, non-negative duration, got {text!r}")
    return value


def format_bytes(value: float) -> str:
    """Binary units, three significant figures: 1536 -> '1.50 KiB'."""
    sign = "-" if value < 0 else ""
    value = abs(float(value))
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{sign}{value:.0f} {unit}" if unit == "B" else f"{sign}{value:.3g} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_seconds(value: float) -> str:
    if value < 1e-3:
        return f"{value * 1e6:.0f} us"
    if value < 1:
        return f"{value * 1e3:.3g} ms"
    return f"{value:.3g} s"
