"""Numbers and durations written for people: ``1.23M`` tokens, ``1h05m`` of training."""

from __future__ import annotations

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
