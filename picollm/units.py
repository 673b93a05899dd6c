"""Numbers and durations written for people: ``1.23M`` tokens, ``1h05m`` of training."""

from __future__ import annotations

import math
from typing import Optional

_SCALES = (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3))


def si(x: Optional[float], digits: int = 3) -> str:
    """``x`` to ``digits`` significant digits with a k/M/B/T suffix: 1234567 -> '1.23M';
    None -> 'n/a'."""
    if x is None:
        return "n/a"
    rounded = float(f"{x:.{digits}g}")  # first, so 999_999 becomes '1M', not '1e+03k'
    for unit, scale in _SCALES:
        if abs(rounded) >= scale:
            return f"{rounded / scale:.{digits}g}{unit}"
    return f"{rounded:.{digits}g}"


def duration(seconds: float) -> str:
    """Whole seconds as '1h05m' from an hour up, else '3m07s' (also '0m30s')."""
    s = max(0, int(round(seconds)))
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def rough_duration(seconds: float) -> str:
    """An estimate to one decimal in the unit that reads best: '30 s', '4.4 min', '1.5 h';
    'unknown' when it could not be estimated."""
    if not math.isfinite(seconds):
        return "unknown"
    if seconds >= 5400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def binary_size(n_bytes: float) -> str:
    """Bytes as MiB, or GiB from a quarter GiB up: '159 MiB', '2.25 GiB'."""
    return f"{n_bytes / 2**30:.2f} GiB" if n_bytes >= 2**28 else f"{n_bytes / 2**20:.0f} MiB"
