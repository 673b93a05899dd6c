"""Checkpoints: atomic save, verified load, retention.

Layout: ``run_dir/checkpoints/step_0000123.pt`` plus ``step_0000123.json`` (a manifest
with size and sha256). A checkpoint counts only once its manifest exists, and both are
written to temporary names, fsynced and renamed into place, so a crash at any moment
leaves either the old set or the new one, never a half-written "latest".
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
from pathlib import Path
from typing import Optional

import numpy as np
import torch

CKPT_RE = re.compile(r"^step_(\d{7,})\.pt$")


class CheckpointError(RuntimeError):
    pass


def ckpt_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: Path, step: int, state: dict, keep: int = 2, extra_keep: Optional[int] = None) -> Path:
    """Write ``state`` as the checkpoint after ``step`` completed steps; keep the newest
    ``keep`` (and ``extra_keep``, e.g. the best by validation loss)."""
    d = ckpt_dir(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    path = d / f"step_{step:07d}.pt"
    try:
        _write_atomic(path, data)
        manifest = {"step": step, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        _write_atomic(path.with_suffix(".json"), json.dumps(manifest).encode())
        _fsync_dir(d)
    except OSError as err:
        for leftover in (d / f".{path.name}.tmp", d / f".{path.with_suffix('.json').name}.tmp"):
            leftover.unlink(missing_ok=True)
        raise CheckpointError(f"could not write checkpoint {path} ({err.strerror}); free disk space or fix the "
                              "permissions of the run directory. Earlier checkpoints are untouched.") from None
    _prune(d, keep, extra_keep)
    return path


def _prune(d: Path, keep: int, extra_keep: Optional[int]) -> None:
    steps = sorted(list_checkpoints(d.parent))
    doomed = steps[:-keep] if keep > 0 else []
    for step in doomed:
        if step == extra_keep:
            continue
        for suffix in (".json", ".pt"):  # manifest first: without it the file is not a checkpoint
            (d / f"step_{step:07d}{suffix}").unlink(missing_ok=True)


def list_checkpoints(run_dir: Path) -> list[int]:
    d = ckpt_dir(run_dir)
    if not d.is_dir():
        return []
    return sorted(int(m.group(1)) for p in d.iterdir() if (m := CKPT_RE.match(p.name))
                  and p.with_suffix(".json").exists())


def verify(path: Path) -> Optional[str]:
    """None when the file matches its manifest, else what is wrong."""
    manifest_path = path.with_suffix(".json")
    try:
        manifest = json.loads(manifest_path.read_text())
        data = path.read_bytes()
    except (OSError, ValueError) as err:
        return f"unreadable ({err})"
    if len(data) != manifest.get("bytes"):
        return f"truncated: {len(data)} bytes, manifest says {manifest.get('bytes')}"
    if hashlib.sha256(data).hexdigest() != manifest.get("sha256"):
        return "checksum mismatch"
    return None


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; point train.resume at an existing step_*.pt file.")
    problem = verify(path) if path.with_suffix(".json").exists() else None
    if problem:
        raise CheckpointError(f"checkpoint {path} is corrupt ({problem}); resume from an earlier one.")
    return torch.load(path, map_location=map_location, weights_only=False)


def latest_valid(run_dir: Path, log=print) -> Optional[Path]:
    """The newest checkpoint that verifies; corrupt ones are reported and skipped."""
    for step in reversed(list_checkpoints(run_dir)):
        path = ckpt_dir(run_dir) / f"step_{step:07d}.pt"
        problem = verify(path)
        if problem is None:
            return path
        log(f"warning: checkpoint {path} is corrupt ({problem}); falling back to the previous one.")
    return None
