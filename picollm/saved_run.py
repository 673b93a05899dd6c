"""A saved run directory, opened: its checkpoint, model, tokenizer and metrics.

Shared by ``picollm.sample``, ``picollm.evaluate``, ``picollm.report`` and
``picollm.export`` so they agree on which checkpoint "the run" means and fail with the
same clear messages.
"""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Union

import tiktoken
import torch
from omegaconf import DictConfig, OmegaConf

from picollm import checkpoint as ckpt
from picollm.model import GPT, GPTConfig
from picollm.tokenizer import TokenizerError, load_tokenizer


class RunError(RuntimeError):
    """A run directory or checkpoint that cannot be used; the message says how to fix it."""


# Exit status of evaluate/report when the result was computed (and printed) but a file of it
# could not be written, e.g. a read-only run_dir: non-zero because an artefact is missing,
# and not 1, so a script can tell "nothing to report" from "computed, not saved".
NOT_SAVED = 3


class NotSavedError(RunError):
    """A result was computed but writing ``path`` failed; the message says why and what to do."""

    def __init__(self, path: Path, err: OSError, what: str):
        self.path = path
        reason = err.strerror or type(err).__name__
        super().__init__(f"could not write {path} ({reason}), so {what} is not saved; make that path writable "
                         "(permissions, free space, no folder of that name) and rerun the same command.")


@contextlib.contextmanager
def saving(path: Path, what: str) -> Iterator[Path]:
    """Turn an OSError while writing ``path`` into NotSavedError naming it."""
    try:
        yield path
    except OSError as err:
        raise NotSavedError(path, err, what) from None


@dataclass
class LoadedRun:
    run_dir: Path
    path: Path  # the checkpoint file the weights came from
    step: int
    model: GPT  # in eval mode
    tokenizer: tiktoken.Encoding
    tokenizer_ref: str  # what training loaded: the prepared data's tokenizer.json, or a tiktoken name
    bos_id: int
    plan: dict
    config: DictConfig
    device: torch.device


def check_run_dir(run_dir: Union[str, Path]) -> Path:
    path = Path(run_dir).expanduser()
    if not path.is_dir():
        raise RunError(f"run_dir {run_dir} does not exist; check the path, or train a run there first with "
                       f"python -m picollm.train run_dir={run_dir}.")
    return path


def checkpoint_path(run_dir: Path, checkpoint: Union[None, int, str, Path] = None) -> Path:
    """The checkpoint to use: the newest valid one, a step number, or a file path."""
    if checkpoint is None or str(checkpoint) in ("", "latest"):
        path = ckpt.latest_valid(run_dir, log=lambda msg: print(msg, file=sys.stderr))
        if path is not None:
            return path
        if ckpt.list_checkpoints(run_dir):
            raise RunError(f"every checkpoint in run_dir {run_dir} is corrupt; retrain the run in a new run_dir.")
        raise RunError(f"run_dir {run_dir} has no checkpoint yet; train it first with "
                       f"python -m picollm.train run_dir={run_dir}.")
    text = str(checkpoint)
    if text.isdigit():
        path = ckpt.step_path(run_dir, int(text))
    else:
        path = Path(text).expanduser()
        if not path.exists() and (run_dir / path).exists():  # relative to the run dir
            path = run_dir / path
    if not path.exists():
        steps = ", ".join(map(str, ckpt.list_checkpoints(run_dir))) or "none"
        raise RunError(f"checkpoint {checkpoint} does not exist in run_dir {run_dir} (steps available: {steps}); "
                       "pass checkpoint=STEP or a path to a step_*.pt file or step_* folder.")
    if ckpt.manifest_path(path).exists() and (problem := ckpt.verify(path)):
        raise RunError(f"checkpoint {path} is corrupt ({problem}); pass checkpoint= an earlier step.")
    return path


def run_tokenizer(run_dir: Path, state: dict) -> tiktoken.Encoding:
    """run_dir/tokenizer.json (the run's own copy), else the reference in the checkpoint."""
    local = run_dir / "tokenizer.json"
    try:
        if local.is_file():
            head = json.loads(local.read_text(encoding="utf-8"))
            # train.py writes {"tiktoken": name} for named encodings instead of copying them.
            return load_tokenizer(head["tiktoken"] if "tiktoken" in head else local)
        return load_tokenizer(state["tokenizer"]["ref"])
    except (TokenizerError, ValueError, KeyError) as err:
        raise RunError(f"could not load the tokenizer of run_dir {run_dir} ({err}); "
                       "restore its tokenizer.json or the prepared data directory.") from None


def load_run(run_dir: Union[str, Path], checkpoint: Union[None, int, str, Path] = None,
             device: Union[str, torch.device] = "cpu") -> LoadedRun:
    """Model (eval mode, on ``device``), tokenizer, plan and config of a run's checkpoint."""
    run_dir = check_run_dir(run_dir)
    path = checkpoint_path(run_dir, checkpoint)
    try:
        state = ckpt.load_checkpoint(path)
    except ckpt.CheckpointError as err:
        raise RunError(str(err)) from None
    except Exception as err:  # an unreadable pickle: not a checkpoint at all
        raise RunError(f"checkpoint {path} could not be read ({type(err).__name__}); pass checkpoint= another step.") from None
    if not isinstance(state, dict) or not {"model", "plan", "config", "tokenizer"} <= state.keys():
        raise RunError(f"{path} is not a picollm checkpoint; pass checkpoint= a checkpoint written by picollm.train.")

    device = torch.device(device)
    model = GPT(GPTConfig(**state["plan"]["model"]))
    model.load_state_dict(state["model"])
    model.to(device).eval()

    enc = run_tokenizer(run_dir, state)
    expected = int(state["tokenizer"]["vocab_size"])
    if enc.n_vocab != expected:
        raise RunError(f"the tokenizer in run_dir {run_dir} has {enc.n_vocab} tokens but the checkpoint was trained "
                       f"with {expected}; restore the run's own tokenizer.json.")
    return LoadedRun(run_dir=run_dir, path=path, step=int(state["step"]), model=model, tokenizer=enc,
                     tokenizer_ref=str(state["tokenizer"]["ref"]), bos_id=int(state["tokenizer"]["bos_id"]), plan=state["plan"],
                     config=OmegaConf.create(state["config"]), device=device)


def _records(run_dir: Union[str, Path]) -> Iterator[dict]:
    """Every well-formed record of metrics.jsonl; a torn last line (a crash mid-write) is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "step" in record:
            yield record


def read_metrics(run_dir: Union[str, Path]) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) from metrics.jsonl, each sorted by step. A resumed
    run re-logs the steps after its last checkpoint, so the latest record of each step wins."""
    latest: dict[str, dict[int, dict]] = {"train": {}, "eval": {}}
    for record in _records(run_dir):
        if record.get("kind") in latest:
            latest[record["kind"]][int(record["step"])] = record
    ordered = lambda records: [records[s] for s in sorted(records)]
    return ordered(latest["train"]), ordered(latest["eval"])


def read_events(run_dir: Union[str, Path]) -> list[dict]:
    """Every event the trainer logged (skipped steps, loss spikes, rollbacks), in order.
    Unlike train records they are never deduplicated: a replayed step's event still happened."""
    return [r for r in _records(run_dir) if r.get("kind") == "event"]
