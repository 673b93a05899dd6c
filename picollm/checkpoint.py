"""Checkpoints: atomic save, verified load, retention.

Layout: ``run_dir/checkpoints/step_0000123.pt`` plus ``step_0000123.json`` (a manifest
with size and sha256). A checkpoint counts only once its manifest exists, and both are
written to temporary names, fsynced and renamed into place, so a crash at any moment
leaves either the old set or the new one, never a half-written "latest". Temporary names
carry the writer's host, pid and a random suffix, so two writers never share one; a later
save removes those whose writer died. Retention keeps the newest valid checkpoints: a
corrupt one never counts and is moved to ``checkpoints/corrupt/``, never kept in place of
a valid one.

FSDP runs write a sharded checkpoint instead: ``step_0000123/`` is a
torch.distributed.checkpoint (DCP) folder, one file per rank plus ``train_state.pt``
(step, data cursor, RNG, config, plan), with the same kind of manifest listing every
file. DCP reshards on load, so any number of processes can resume it, and
``python -m picollm.checkpoint src=SRC out=OUT.pt`` consolidates it into one ordinary file.

Model and optimizer state are keyed by parameter name (torch.distributed.checkpoint's
state_dict form) in both layouts, so either layout resumes under DDP or FSDP.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import re
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from picollm import cli
from picollm.errors import root_cause
from picollm.files import HOST, TMP_RE, fsync_dir, pid_alive, temp_path, write_atomic

CKPT_RE = re.compile(r"^step_(\d{7,})(\.pt)?$")
TRAIN_STATE = "train_state.pt"  # the non-tensor part of a sharded checkpoint


class CheckpointError(RuntimeError):
    pass


def ckpt_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def rng_state(device=None) -> dict:
    """This process's RNG state: Python, NumPy, torch's CPU generator and, on a GPU, the
    generator of the one device this process trains on (``device``; None means the current
    CUDA device when there is one)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    gpu = _rng_device(device)
    if gpu is not None:
        state["device"] = {"type": "cuda", "index": gpu.index, "state": torch.cuda.get_rng_state(gpu)}
    return state


def set_rng_state(state: dict, device=None) -> None:
    """Restore ``state`` into this process; the device part only into ``device``'s generator.
    Older checkpoints hold every visible GPU's state (``"cuda"``, a list): the entry matching
    the device index is used when there is one, else entry 0. A CPU device never touches CUDA."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    gpu = _rng_device(device)
    if gpu is None:
        return
    saved = _saved_device_state(state, gpu.index)
    if saved is None:  # saved on CPU: the device generator stays as the seed left it
        return
    if "seed" in saved:  # a substitute for a rank the saving run did not have (rank_rng_state)
        with torch.cuda.device(gpu):
            torch.cuda.manual_seed(saved["seed"])
    else:
        torch.cuda.set_rng_state(saved["state"], gpu)


def rank_rng_state(states, rank: int) -> dict:
    """The RNG state rank ``rank`` resumes with, from a checkpoint's per-rank list. A rank the
    saving run had gets its own state; a rank it did not have (the world grew) gets a fresh
    state seeded from the saved states and its rank, so two resumes agree and no two ranks
    share a stream (copying rank 0's would give them identical dropout masks)."""
    if isinstance(states, dict):  # a single state, not a per-rank list
        states = [states]
    if rank < len(states):
        return states[rank]
    digest = hashlib.sha256(b"picollm-rank-rng")
    for saved in states:
        digest.update(saved["torch"].numpy().tobytes())
    digest.update(str(rank).encode())
    seed = int.from_bytes(digest.digest()[:8], "little") >> 1  # 63 bits: every generator takes it
    return {"python": random.Random(seed).getstate(), "numpy": np.random.RandomState(seed % 2**32).get_state(),
            "torch": torch.Generator().manual_seed(seed).get_state(), "device": {"type": "cuda", "seed": seed}}


def _rng_device(device) -> Optional[torch.device]:
    """The CUDA device whose generator is this process's, or None (on CPU torch's own
    generator is the device's); a CPU device is decided without asking CUDA anything."""
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


def _saved_device_state(state: dict, index: int) -> Optional[dict]:
    if state.get("device") is not None:
        return state["device"]
    per_gpu = state.get("cuda")  # the old format: one state per visible GPU of the saving process
    if per_gpu:
        return {"state": per_gpu[index] if index < len(per_gpu) else per_gpu[0]}
    return None


LEGACY_TMP_RE = re.compile(r"^\.step_\d{7,}(\.pt|\.json)?\.tmp$")  # older versions' shared names


def _sweep_dead_writers(d: Path) -> None:
    """Remove temporary files and folders whose writer died on this host (a kill mid-save);
    a live writer's, or one from another host, stays."""
    for p in d.iterdir():
        m = TMP_RE.match(p.name)
        if m:
            if m["host"] != HOST or pid_alive(int(m["pid"])):
                continue
        elif not LEGACY_TMP_RE.match(p.name):
            continue
        with contextlib.suppress(OSError):
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def _write_failed(path: Path, err: BaseException) -> CheckpointError:
    return CheckpointError(f"could not write checkpoint {path} ({root_cause(err)}); free disk space or fix the "
                           "permissions of the run directory. Earlier checkpoints are untouched.")


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
    _prune(d, keep, extra_keep, just_saved=step)
    return path


def write_file(path: Path, state: dict) -> None:
    """One-file checkpoint ``path`` and its manifest, both atomically."""
    data = _to_bytes(state)
    write_atomic(path, data)
    manifest = {"step": state.get("step"), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    write_atomic(path.with_suffix(".json"), json.dumps(manifest).encode())
    fsync_dir(path.parent)
    _remember(path, None)  # hashed as written: pruning need not read it back


def save_sharded(run_dir: Path, step: int, tensors: dict, train_state: dict, is_main: bool, keep: int = 2,
                 extra_keep: Optional[int] = None) -> Path:
    """Collective: every rank writes its shards of ``tensors`` (DCP) into a temporary
    folder; rank 0 adds ``train_state``, renames the folder into place and then writes the
    manifest, which is what makes it count. Raises CheckpointError on every rank if any failed."""
    import torch.distributed.checkpoint as dcp

    from picollm import dist

    d = ckpt_dir(run_dir)
    final = d / f"step_{step:07d}"
    error, tmp_name = None, None
    if is_main:  # rank 0 names the temporary folder every rank writes into
        tmp_name = temp_path(final).name
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            error = str(_write_failed(final, err))
    gathered = dist.all_gather_object((error, tmp_name))
    errors = [e for e, _ in gathered]
    tmp = d / next(name for _, name in gathered if name)
    if not any(errors):
        try:
            dcp.save(tensors, checkpoint_id=str(tmp))  # raises on every rank if any rank failed
        except (OSError, dcp.api.CheckpointException) as err:  # the latter derives from BaseException
            error = str(_write_failed(final, err))
        if is_main and error is None:
            try:
                write_atomic(tmp / TRAIN_STATE, _to_bytes(train_state))
                files = {p.name: _file_digest(p) for p in sorted(tmp.iterdir()) if p.is_file()}
                if final.exists():  # an earlier attempt that never got its manifest: not a checkpoint
                    shutil.rmtree(final)
                os.replace(tmp, final)
                manifest = {"step": step, "format": "dcp", "files": files}
                write_atomic(final.with_suffix(".json"), json.dumps(manifest).encode())
                fsync_dir(d)
                _remember(final, None)
            except OSError as err:
                error = str(_write_failed(final, err))
        errors = dist.all_gather_object(error)
    error = next((e for e in errors if e), None)
    if error:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(error)
    if is_main:
        _prune(d, keep, extra_keep, just_saved=step)
    return final


def save_training_state(run_dir: Path, step: int, state: dict, sharded: bool, is_main: bool, keep: int = 2,
                        extra_keep: Optional[int] = None) -> None:
    """Collective: the checkpoint after ``step`` in the layout the run's parallelism needs.
    Sharded (FSDP): a DCP folder every rank writes its shards into (``model`` and
    ``optimizer`` are taken out of ``state``). Otherwise one file that rank 0 writes. A
    failed write raises CheckpointError on every rank and leaves the earlier checkpoints."""
    if sharded:
        tensors = {"model": state.pop("model"), "optimizer": state.pop("optimizer")}
        save_sharded(run_dir, step, tensors, state, is_main, keep=keep, extra_keep=extra_keep)
        return
    from picollm import dist

    def write() -> None:  # on rank 0; every rank learns whether it worked
        save_checkpoint(run_dir, step, state, keep=keep, extra_keep=extra_keep)

    dist.from_main(write, catch=(CheckpointError,), raise_as=CheckpointError)


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


def _prune(d: Path, keep: int, extra_keep: Optional[int], just_saved: Optional[int] = None) -> None:
    """Keep the newest ``keep`` valid checkpoints, ``extra_keep`` and the one just saved
    (keep <= 0 keeps all). Corrupt ones never count: they are moved to ``corrupt/``, so a
    run restarted behind a corrupt newer-numbered checkpoint keeps its new valid ones."""
    _sweep_dead_writers(d)
    valid = []
    for step in list_checkpoints(d.parent):
        path = step_path(d.parent, step)
        problem = verify(path, cached=True)
        if problem is None:
            valid.append(step)
        else:
            _set_aside(path, problem)
    if keep <= 0:
        return
    kept = set(valid[-keep:]) | {extra_keep, just_saved}
    for step in valid:
        if step not in kept:
            (d / f"step_{step:07d}.json").unlink(missing_ok=True)  # manifest first: without it, not a checkpoint
            (d / f"step_{step:07d}.pt").unlink(missing_ok=True)
            shutil.rmtree(d / f"step_{step:07d}", ignore_errors=True)


def _set_aside(path: Path, problem: str) -> None:
    """Move a corrupt checkpoint and its manifest into ``corrupt/``: out of the way of
    resume and retention, but not deleted (it may be worth a look)."""
    aside = path.parent / "corrupt"
    manifest = manifest_path(path)
    try:
        aside.mkdir(exist_ok=True)
        n = 0
        while (aside / _numbered(path.name, n)).exists() or (aside / _numbered(manifest.name, n)).exists():
            n += 1
        os.replace(manifest, aside / _numbered(manifest.name, n))  # first: without it, not a checkpoint
        if path.exists():
            os.replace(path, aside / _numbered(path.name, n))
    except OSError as err:
        print(f"warning: checkpoint {path} is corrupt ({problem}) and could not be moved aside ({err}); "
              "it is ignored.", file=sys.stderr)
        return
    print(f"warning: checkpoint {path} is corrupt ({problem}); moved it to {aside} so it does not displace "
          "valid checkpoints.", file=sys.stderr)


def _numbered(name: str, n: int) -> str:
    if n == 0:
        return name
    stem, dot, suffix = name.partition(".")
    return f"{stem}-{n}{dot}{suffix}"


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


# path -> (fingerprint, verify's answer): a checkpoint is hashed once per process while
# its files keep their size, mtime and inode.
_VERIFIED: dict = {}


def _fingerprint(path: Path) -> Optional[tuple]:
    try:
        files = [manifest_path(path)] + (sorted(path.iterdir()) if is_sharded(path) else [path])
        return tuple((p.name, st.st_ino, st.st_size, st.st_mtime_ns) for p in files for st in [p.stat()])
    except OSError:
        return None


def _remember(path: Path, problem: Optional[str]) -> None:
    fingerprint = _fingerprint(path)
    if fingerprint is not None:
        _VERIFIED[str(path)] = (fingerprint, problem)


def verify(path: Path, cached: bool = False) -> Optional[str]:
    """None when the checkpoint matches its manifest, else what is wrong. ``cached`` reuses
    this process's earlier answer while the files' size, mtime and inode are unchanged."""
    path = Path(path)
    if cached:
        hit = _VERIFIED.get(str(path))
        if hit is not None and hit[0] == _fingerprint(path):
            return hit[1]
    fingerprint = _fingerprint(path)
    problem = _verify(path)
    if fingerprint is not None and fingerprint == _fingerprint(path):  # unchanged while hashing
        _VERIFIED[str(path)] = (fingerprint, problem)
    return problem


def _verify(path: Path) -> Optional[str]:
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
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return f"unreadable ({err})"
    if len(data) != manifest.get("bytes"):
        return f"truncated: {len(data)} bytes, manifest says {manifest.get('bytes')}"
    if hashlib.sha256(data).hexdigest() != manifest.get("sha256"):
        return "checksum mismatch"
    return None


def load_checkpoint(path: Path, map_location="cpu", tensors: bool = True) -> dict:
    """The checkpoint as one dict. A sharded one is read whole into this process (no
    collectives) unless ``tensors=False``, which returns only its train state, with
    ``model`` and ``optimizer`` None, for a caller that reads the shards itself. Anything
    that is not a picollm checkpoint gets a CheckpointError saying so, not a pickle error."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; point train.resume at an existing checkpoint "
                              "(a step_*.pt file or a step_* folder).")
    if manifest_path(path).exists():
        problem = verify(path)
        if problem:
            raise CheckpointError(f"checkpoint {path} is corrupt ({problem}); resume from an earlier one.")
    elif is_sharded(path) and not (path / TRAIN_STATE).is_file():
        what = ("a run directory, not a checkpoint" if (path / "checkpoints").is_dir() else
                f"a folder without {TRAIN_STATE}")
        raise _not_a_checkpoint(path, what)
    elif not is_sharded(path) and not _looks_like_torch_save(path):
        raise _not_a_checkpoint(path, "not a file written by torch.save")
    if not is_sharded(path):
        state = _torch_load(path, path, map_location)
        if not (isinstance(state, dict) and {"step", "model"} <= state.keys()):
            raise _not_a_checkpoint(path, "a torch file without a step and model state")
        return state
    state = _torch_load(path / TRAIN_STATE, path, map_location)
    if not (isinstance(state, dict) and "step" in state):
        raise _not_a_checkpoint(path, f"its {TRAIN_STATE} holds no training state")
    state.update(model=None, optimizer=None, path=str(path))
    if tensors:
        state.update(_read_whole(path))
    return state


def _not_a_checkpoint(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path} is not a picollm checkpoint ({what}); pass a checkpoints/step_XXXXXXX.pt file "
                           "or checkpoints/step_XXXXXXX folder written by picollm.train.")


def _looks_like_torch_save(path: Path) -> bool:
    """torch.save writes a zip archive (or, in its legacy format, a pickle): a cheap check
    that turns away text, safetensors and the like before torch.load tries to unpickle them."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head == b"PK\x03\x04" or head[:1] == b"\x80"


def _torch_load(file: Path, checkpoint: Path, map_location):
    try:
        return torch.load(file, map_location=map_location, weights_only=False)
    except Exception as err:  # a truncated zip, a foreign pickle: whatever torch says, the answer is the same
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise _not_a_checkpoint(checkpoint, f"torch.load cannot read it: {reason}") from None


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
        problem = verify(path, cached=True)
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


USAGE = """usage: python -m picollm.checkpoint src=SRC out=OUT.pt
Consolidate the sharded (FSDP) checkpoint folder SRC into the single file OUT.pt."""


@dataclass
class CheckpointArgs:
    src: str = cli.required("a sharded checkpoint folder, run_dir/checkpoints/step_*")
    out: str = cli.required("the .pt file to write (with its manifest beside it)")


def main(argv: Optional[list] = None) -> None:
    args = cli.parse(argv, "checkpoint", USAGE, CheckpointArgs)
    try:
        out = consolidate(Path(args.src), Path(args.out))
    except CheckpointError as err:
        raise SystemExit(f"error: {err}")
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
