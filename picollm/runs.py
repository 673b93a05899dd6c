"""Plain ``key=value`` arguments for the commands that read a saved run (sample, evaluate,
report, export); the run itself is opened by ``picollm.saved_run``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional


# ----------------------------------------------------------------------------- key=value CLIs

def parse_args(argv: list[str], spec: dict[str, Callable[[str], Any]], usage: str,
               required: tuple[str, ...] = ()) -> dict[str, Any]:
    """Plain ``key=value`` arguments (no Hydra: these commands read a run, not a config).
    ``spec`` maps each accepted key to a converter; ``--help`` prints ``usage``."""
    if any(a in ("-h", "--help") for a in argv):
        print(usage)
        raise SystemExit(0)
    out: dict[str, Any] = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise SystemExit(f"error: argument {arg!r} is not key=value; {usage.splitlines()[0]}")
        if key not in spec:
            raise SystemExit(f"error: unknown setting {key!r}; accepted: {', '.join(spec)}.")
        try:
            out[key] = spec[key](value)
        except ValueError:
            kind = TYPE_NAMES.get(spec[key], "value")
            raise SystemExit(f"error: {key}={value!r} is not a valid {kind}.") from None
    missing = [k for k in required if k not in out]
    if missing:
        raise SystemExit(f"error: {missing[0]}= is required; {usage.splitlines()[0]}")
    return out


def optional_int(value: str) -> Optional[int]:
    """An int, or none/null for "unset" (e.g. top_k=none)."""
    return None if value.lower() in ("", "none", "null") else int(value)


def boolean(value: str) -> bool:
    lowered = value.lower()
    if lowered not in ("1", "0", "true", "false", "yes", "no"):
        raise ValueError(value)
    return lowered in ("1", "true", "yes")


TYPE_NAMES = {int: "integer", float: "number", str: "string", optional_int: "integer or none", boolean: "true/false"}
