"""Checkpoints: atomic save, verified load, retention.

Layout: ``run_dir/checkpoints/step_0000123.pt`` plus ``step_0000123.json`` (a manifest
with size and sha256). A checkpoint counts only once its manifest exists, and both are
written to temporary names, fsynced and renamed into place, so a crash at any moment
leaves either the old set or the new one, never a half-written "latest".

FSDP runs write a sharded checkpoint instead: ``step_0000123/`` is a
torch.distributed.checkpoint (DCP) folder, one file per rank plus ``train_state.pt``
(step, data cursor, RNG, config, plan), with the same kind of manifest listing every
file. DCP reshards on load, so any number of processes can resume it, and
``python -m picollm.checkpoint SRC OUT.pt`` consolidates it into one ordinary file.

Model and optimizer state are keyed by parameter name (torch.distributed.checkpoint's
state_dict form) in both layouts, so either layout resumes under DDP or FSDP.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch

CKPT_RE = re.compile(r"^step_(\d{7,})(\.pt)?$")
TRAIN_STATE = "train_state.pt"  # the non-tensor part of a sharded checkpoint


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


def _write_failed(path: Path, err: BaseException) -> CheckpointError:
    return CheckpointError(f"could not write checkpoint {path} ({_root_cause(err)}); free disk space or fix the "
                           "permissions of the run directory. Earlier checkpoints are untouched.")


def _root_cause(err: BaseException) -> str:
    """The OS's words for the failure, also when a library wrapped it: DCP collects each
    rank's exception, and torch.save's zip writer reports a full disk only as a bad position."""
    failures = getattr(err, "failures", None)  # torch.distributed.checkpoint's CheckpointException
    if failures:
        err = next(iter(failures.values()))[0]
    while err.__cause__ is not None:
        err = err.__cause__
    if getattr(err, "strerror", None):
        return err.strerror
    if "unexpected pos" in str(err):
        return "a short write: the disk is probably full"
    return str(err).splitlines()[0][:200]


def save_checkpoint(run_dir: Path, step: int, state: dict, keep: int = 2, extra_keep: Optional[int] = None) -> Path:
    """Write ``state`` as the checkpoint after ``step`` completed steps; keep the newest
    ``keep`` (and ``extra_keep``, e.g. the best by validation loss)."""
    d = ckpt_dir(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"step_{step:07d}.pt"
    try:
        write_file(path, state)
    except OSError as err:
        raise _write_failed(path, err) from None
    _prune(d, keep, extra_keep)
    return path


def write_file(path: Path, state: dict) -> None:
    """One-file checkpoint ``path`` and its manifest, both atomically."""
    data = _to_bytes(state)
    try:
        _write_atomic(path, data)
        manifest = {"step": state.get("step"), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        _write_atomic(path.with_suffix(".json"), json.dumps(manifest).encode())
        _fsync_dir(path.parent)
    except OSError:
        for leftover in (path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.stem}.json.tmp")):
            leftover.unlink(missing_ok=True)
        raise


def save_sharded(run_dir: Path, step: int, tensors: dict, train_state: dict, is_main: bool, keep: int = 2,
                 extra_keep: Optional[int] = None) -> Path:
    """Collective: every rank writes its shards of ``tensors`` (DCP) into a temporary
    folder; rank 0 adds ``train_state``, renames the folder into place and then writes the
    manifest, which is what makes it count. Raises CheckpointError on every rank if any failed."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    d = ckpt_dir(run_dir)
    final, tmp = d / f"step_{step:07d}", d / f".step_{step:07d}.tmp"
    error = None
    if is_main:
        try:
            d.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # left by a crash mid-save
        except OSError as err:
            error = str(_write_failed(final, err))
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    if not any(errors):
        try:
            dcp.save(tensors, checkpoint_id=str(tmp))  # raises on every rank if any rank failed
        except (OSError, dcp.api.CheckpointException) as err:  # the latter derives from BaseException
            error = str(_write_failed(final, err))
        if is_main and error is None:
            try:
                _write_atomic(tmp / TRAIN_STATE, _to_bytes(train_state))
                files = {p.name: _file_digest(p) for p in sorted(tmp.iterdir()) if p.is_file()}
                if final.exists():  # an earlier attempt that never got its manifest: not a checkpoint
                    shutil.rmtree(final)
                os.replace(tmp, final)
                manifest = {"step": step, "format": "dcp", "files": files}
                _write_atomic(final.with_suffix(".json"), json.dumps(manifest).encode())
                _fsync_dir(d)
            except OSError as err:
                error = str(_write_failed(final, err))
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
    error = next((e for e in errors if e), None)
    if error:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(error)
    if is_main:
        _prune(d, keep, extra_keep)
    return final


def _to_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _file_digest(path: Path) -> dict:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": h.hexdigest()}


def _prune(d: Path, keep: int, extra_keep: Optional[int]) -> None:
    steps = sorted(list_checkpoints(d.parent))
    doomed = steps[:-keep] if keep > 0 else []
    for step in doomed:
        if step == extra_keep:
            continue
        (d / f"step_{step:07d}.json").unlink(missing_ok=True)  # manifest first: without it, not a checkpoint
        (d / f"step_{step:07d}.pt").unlink(missing_ok=True)
        shutil.rmtree(d / f"step_{step:07d}", ignore_errors=True)


def list_checkpoints(run_dir: Path) -> list[int]:
    d = ckpt_dir(run_dir)
    if not d.is_dir():
        return []
    return sorted({int(m.group(1)) for p in d.iterdir() if (m := CKPT_RE.match(p.name))
                   and (d / f"step_{m.group(1)}.json").exists()})


def step_path(run_dir: Path, step: int) -> Path:
    """Step ``step``'s checkpoint: the one file, or the sharded folder."""
    single = ckpt_dir(run_dir) / f"step_{step:07d}.pt"
    return single if single.exists() else single.with_suffix("")


def is_sharded(path: Path) -> bool:
    return Path(path).is_dir()


def manifest_path(path: Path) -> Path:
    return path.with_suffix(".json") if path.suffix == ".pt" else path.with_name(path.name + ".json")


def verify(path: Path) -> Optional[str]:
    """None when the checkpoint matches its manifest, else what is wrong."""
    path = Path(path)
    try:
        manifest = json.loads(manifest_path(path).read_text())
        if is_sharded(path):
            for name, want in manifest["files"].items():
                if not (path / name).is_file():
                    return f"missing file {name}"
                got = _file_digest(path / name)
                if got["bytes"] != want["bytes"]:
                    return f"truncated: {name} has {got['bytes']} bytes, manifest says {want['bytes']}"
                if got["sha256"] != want["sha256"]:
                    return f"checksum mismatch in {name}"
            return None
        data = path.read_bytes()
    except (OSError, ValueError, KeyError) as err:
        return f"unreadable ({err})"
    if len(data) != manifest.get("bytes"):
        return f"truncated: {len(data)} bytes, manifest says {manifest.get('bytes')}"
    if hashlib.sha256(data).hexdigest() != manifest.get("sha256"):
        return "checksum mismatch"
    return None


def load_checkpoint(path: Path, map_location="cpu", tensors: bool = True) -> dict:
    """The checkpoint as one dict. A sharded one is read whole into this process (no
    collectives) unless ``tensors=False``, which returns only its train state, with
    ``model`` and ``optimizer`` None, for a caller that reads the shards itself."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; point train.resume at an existing checkpoint "
                              "(a step_*.pt file or a step_* folder).")
    problem = verify(path) if manifest_path(path).exists() else None
    if problem:
        raise CheckpointError(f"checkpoint {path} is corrupt ({problem}); resume from an earlier one.")
    if not is_sharded(path):
        return torch.load(path, map_location=map_location, weights_only=False)
    if not (path / TRAIN_STATE).is_file():
        raise CheckpointError(f"{path} is not a picollm sharded checkpoint (no {TRAIN_STATE}); "
                              "point train.resume at a step_* folder written by picollm.train.")
    state = torch.load(path / TRAIN_STATE, map_location=map_location, weights_only=False)
    state.update(model=None, optimizer=None, path=str(path))
    if tensors:
        state.update(_read_whole(path))
    return state


def _read_whole(path: Path) -> dict:
    """Every tensor of a DCP folder, unsharded, in this process alone; this is what
    torch.distributed.checkpoint.format_utils.dcp_to_torch_save does before its torch.save."""
    # The public dcp.load fills only the keys it is given; these two are what dcp_to_torch_save
    # uses to read everything without knowing the keys (and without a process group).
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    whole: dict = {}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        _load_state_dict(whole, storage_reader=FileSystemReader(str(path)), planner=_EmptyStateDictLoadPlanner(),
                         no_dist=True)
    return whole


def load_sharded(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Collective: read a DCP checkpoint straight into this run's (FSDP) shards; DCP
    reshards, so the saving run may have had any number of processes."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    target = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(target, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=target["model"], optim_state_dict=target["optimizer"])


def latest_valid(run_dir: Path, log=print) -> Optional[Path]:
    """The newest checkpoint that verifies; corrupt ones are reported and skipped."""
    for step in reversed(list_checkpoints(run_dir)):
        path = step_path(run_dir, step)
        problem = verify(path)
        if problem is None:
            return path
        log(f"warning: checkpoint {path} is corrupt ({problem}); falling back to the previous one.")
    return None


def consolidate(src: Path, out: Path) -> Path:
    """A sharded checkpoint as one ordinary file (with manifest) that resumes, evaluates,
    samples and exports like any other."""
    src, out = Path(src), Path(out)
    if not is_sharded(src):
        raise CheckpointError(f"{src} is not a sharded checkpoint folder; pass a checkpoints/step_* folder.")
    state = load_checkpoint(src)
    state.pop("path", None)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_file(out, state)
    except OSError as err:
        raise _write_failed(out, err) from None
    return out


def main(argv: Optional[list] = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0].startswith("-"):
        raise SystemExit("usage: python -m picollm.checkpoint SRC OUT.pt\n"
                         "Consolidate the sharded (FSDP) checkpoint folder SRC into the single file OUT.pt.")
    try:
        out = consolidate(Path(args[0]), Path(args[1]))
    except CheckpointError as err:
        raise SystemExit(f"error: {err}")
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
