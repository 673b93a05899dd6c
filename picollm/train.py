"""Train a run (Hydra overrides on the command line).

    python -m picollm.train budget.minutes=10 run_dir=runs/cpu
    torchrun --standalone --nproc_per_node=2 -m picollm.train budget.compute=1e15

The order of work (``_train_in``): check the config (cheap, before anything expensive),
claim the run directory, draft the plan (every refusal comes here, before any data
work), prepare the tokenizer and shards, complete the plan from the data, then train
(picollm/trainer.py: periodic and final evaluation and checkpoints, the exported weights,
samples and the report). A finished run that is started again stops before building
anything. Every output lands in ``run_dir``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from picollm import checkpoint as ckpt
from picollm import dist, hardware, parallel
from picollm import cli
from picollm.config import ConfigError
from picollm.data.loader import TokenStream
from picollm.data.prepare import (PreparationInterrupted, PreparedData, check_fits, load_prepared, prepare_data,
                                  validate_tokenizer_config)
from picollm.data.sources import validate_source
from picollm.plan import DataFacts, Plan, defining_settings, final_plan, plan_for_run, save_plan
from picollm.run_lock import RunLock, RunLockedError
from picollm.train_log import console_log, log
from picollm.trainer import Interrupted, StopOnSignal, Trainer, TrainError, close_finished_run, last_step


def run(cfg: DictConfig) -> dict:
    """Train according to ``cfg``; returns the final metrics."""
    rank_info = dist.setup(cfg.train.device)
    try:
        return _run(cfg, rank_info)
    finally:
        dist.teardown()


def _run(cfg: DictConfig, rank_info: dist.DistInfo) -> dict:
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    hw = check_config(cfg, rank_info)
    run_dir, lock = resolve_run_dir(cfg, rank_info)
    with contextlib.ExitStack() as cleanup:
        if lock is not None:
            cleanup.callback(lock.release)
            cleanup.enter_context(console_log(run_dir / "train.log"))
        log(f"run_dir      {run_dir}", rank_info)
        return _train_in(run_dir, cfg, rank_info, hw)


def _train_in(run_dir: Path, cfg: DictConfig, rank_info: dist.DistInfo, hw: hardware.DeviceInfo) -> dict:
    resume_path = find_resume(cfg, run_dir)
    # FSDP reads a sharded checkpoint's tensors straight into its shards later (Trainer.restore).
    whole = not parallel.is_sharded(cfg.train.parallel, rank_info)
    resume_state = ckpt.load_checkpoint(resume_path, tensors=whole) if resume_path else None
    draft = plan_for_run(cfg, hw, rank_info, run_dir, resume_state)
    hw = train_as_planned(hw, draft, rank_info)
    data = prepare(cfg, draft, rank_info)
    check_data(data, draft)
    plan = final_plan(draft, DataFacts.of(data), rank_info.world_size, cfg.train.steps)
    announce(plan, draft, data, cfg, rank_info)
    if rank_info.is_main:
        save_plan(run_dir, cfg, plan)  # the run's inputs, the prepared data's place included
        _copy_tokenizer(data, run_dir)
    if (resume_state is not None and resume_state["step"] >= last_step(plan, resume_state.get("stats", {}))
            and ckpt.list_checkpoints(run_dir)):
        return close_finished_run(run_dir, plan, resume_state, rank_info, hw.device)
    trainer = Trainer(cfg, rank_info, hw, plan, data, run_dir)
    if resume_state is not None:
        trainer.resume(resume_state, resume_path)
    del resume_state
    with StopOnSignal() as stopper:
        return trainer.train(stopper)


# ----------------------------------------------------------------------------- before the plan

def check_config(cfg: DictConfig, rank_info: dist.DistInfo) -> hardware.DeviceInfo:
    """Cheap checks first, so nothing expensive happens with a config that cannot work;
    returns the device this process trains on."""
    t = cfg.train
    try:
        validate_source(cfg.data)
        validate_tokenizer_config(cfg.tokenizer)
        # CPU auto: the plan times both dtypes on the run's shape (or a resume reads its choice).
        hw = hardware.describe(t.device, t.dtype, measure=rank_info.is_main, peak_flops=t.peak_flops,
                               decide_dtype_later=True)
        parallel.check_mode(t.parallel, hw.dtype)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if rank_info.enabled and hw.is_cuda:  # each rank on its own GPU
        hw = replace(hw, device=torch.device("cuda", rank_info.local_rank))
    return hw


def default_run_dir(cfg: DictConfig) -> str:
    """Where a run without ``run_dir`` goes: ``runs/run-<hash of the settings that define
    the run>``. The same command (also a torchrun restart of it) maps to the same directory,
    so "rerun the same command" resumes; settings that do not change the run (intervals,
    wandb, resume, ...) do not change the name."""
    defining = defining_settings(OmegaConf.to_container(cfg, resolve=True))
    digest = hashlib.sha256(json.dumps(defining, sort_keys=True, default=str).encode()).hexdigest()
    return f"runs/run-{digest[:10]}"


def resolve_run_dir(cfg: DictConfig, rank_info: dist.DistInfo) -> tuple[Path, Optional[RunLock]]:
    """The configured run_dir (or the default one for this config), created, checked
    writable and locked against a second run, with one error sentence on every rank."""
    run_dir = Path(cfg.run_dir or default_run_dir(cfg)).expanduser().resolve()
    lock = None

    def claim() -> None:  # rank 0; the other ranks of this run share its lock
        nonlocal lock
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            probe = run_dir / f".write_test.{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
            lock = RunLock(run_dir).acquire()
        except OSError as err:
            raise TrainError(f"run_dir {run_dir} is not writable ({err.strerror}); pick another run_dir.") from None

    dist.from_main(claim, catch=(TrainError, RunLockedError), raise_as=TrainError)
    return run_dir, lock


def find_resume(cfg: DictConfig, run_dir: Path) -> Optional[Path]:
    """The checkpoint to continue from (train.resume), or None for a fresh start."""
    mode = cfg.train.resume
    existing = ckpt.list_checkpoints(run_dir)
    if mode == "never":
        if existing:
            raise TrainError(f"run_dir {run_dir} already has checkpoints and train.resume=never; use a new run_dir "
                             "or train.resume=auto to continue it.")
        return None
    if mode == "auto":
        return ckpt.latest_valid(run_dir) if existing else None
    path = Path(mode).expanduser()
    if not path.exists():
        raise TrainError(f"train.resume={mode} does not exist; use auto, never, or a path to a step_*.pt checkpoint.")
    return path


def train_as_planned(hw: hardware.DeviceInfo, plan: Plan, rank_info: dist.DistInfo) -> hardware.DeviceInfo:
    """Train in the plan's dtype (recorded when it was measured, so a rerun or a resume
    never decides again), with that dtype's peak as the MFU yardstick: this machine's,
    measured once on rank 0 and shared."""
    hw = hardware.with_dtype(hw, plan.dtype, plan.dtype_reason)
    if rank_info.enabled:
        peak_flops, peak_source = dist.broadcast_object((hw.peak_flops, hw.peak_source))
        hw = replace(hw, peak_flops=peak_flops, peak_source=peak_source)
    return hw


# ----------------------------------------------------------------------------- the data

def prepare(cfg: DictConfig, plan: Plan, rank_info: dist.DistInfo) -> PreparedData:
    """The first process of every node prepares (or reuses) the data in that node's cache;
    preparation is deterministic, so nodes that share no storage build the same shards.
    The other processes wait (dist.from_each_node), then every rank checks that all nodes
    hold the same data. A failure stops every rank with the preparing rank's sentence."""
    if not rank_info.enabled:
        return _prepare_here(cfg, plan)
    result = None

    def prepare_and_describe() -> dict:
        nonlocal result
        result = _prepare_here(cfg, plan)
        return {"dir": str(result.dir), "fingerprint": _data_fingerprint(result)}

    outcomes = dist.from_each_node(rank_info, "data", prepare_and_describe, "prepare the data",
                                   catch=(TrainError, KeyboardInterrupt))
    errors = [o["error"] for o in outcomes if "error" in o]
    if errors:
        raise TrainError(errors[0])
    if len({o["fingerprint"] for o in outcomes}) > 1:
        raise TrainError("the nodes prepared different data (their shard fingerprints differ); give every node the "
                         "same data config and corpus, or put data.cache_dir on storage all nodes share.")
    return result if result is not None else load_prepared(outcomes[rank_info.node]["dir"])


def _prepare_here(cfg: DictConfig, plan: Plan) -> PreparedData:
    try:
        return prepare_data(cfg.data, cfg.tokenizer, plan.stream_tokens)
    except (ValueError, OSError) as err:  # bad input, a full disk: the data code's own sentence
        raise TrainError(f"data preparation failed: {err}") from None


def _data_fingerprint(data: PreparedData, head_tokens: int = 1 << 22) -> str:
    """What must agree between nodes: the tokenizer, the held-out split's size and the
    first tokens of the training stream (a node's cache may hold a longer stream, which
    is fine: the loader reads a fixed-length prefix)."""
    h = hashlib.sha256(json.dumps([data.meta["tokenizer"]["fingerprint"], data.bos_id, data.vocab_size,
                                   data.n_val_tokens]).encode())
    stream = TokenStream(data.train_shards, max_tokens=min(head_tokens, data.n_train_tokens))
    head = np.empty(len(stream), dtype=np.int64)
    stream.read_into(0, head)
    h.update(head.tobytes())
    return h.hexdigest()


def check_data(data: PreparedData, plan: Plan) -> None:
    """The prepared data fits the plan (every rank, the same sentence)."""
    try:
        check_fits(data, plan.gpt_config().seq_len)
    except ValueError as err:
        raise TrainError(str(err)) from None
    if plan.model["vocab_size"] != data.vocab_size:
        raise TrainError(f"the prepared data has vocabulary {data.vocab_size} but the plan expects "
                         f"{plan.model['vocab_size']}; delete the plan in run_dir or use a new run_dir.")


def _copy_tokenizer(data: PreparedData, run_dir: Path) -> None:
    """Keep the run self-contained: sampling and export find the tokenizer in run_dir."""
    src = Path(data.tokenizer_ref)
    if src.exists():
        (run_dir / "tokenizer.json").write_bytes(src.read_bytes())
    else:
        (run_dir / "tokenizer.json").write_text(json.dumps({"tiktoken": data.tokenizer_ref}))


def announce(plan: Plan, draft: Plan, data: PreparedData, cfg: DictConfig, rank_info: dist.DistInfo) -> None:
    """The plan card, and what this session changed from the recorded plan."""
    if plan.steps != draft.steps:
        log(f"extending the run from {draft.steps} to {plan.steps} steps; the LR schedule is stretched to the new "
            "end and the data stream keeps its length (more epochs).", rank_info)
    if plan.world_size != draft.world_size:
        log(f"continuing a {draft.world_size}-process run on {plan.world_size}: accumulation "
            f"{draft.accum_steps} -> {plan.accum_steps} steps, same global batch and sample order", rank_info)
    log(plan.card(), rank_info)
    if cfg.train.parallel == "fsdp":
        log("parallel     FSDP2 over " + (f"{rank_info.world_size} processes: parameters, gradients and AdamW state "
                                          "sharded; checkpoints are sharded folders" if rank_info.enabled else
                                          "one process: nothing to shard, so the plain model trains"), rank_info)
    log(f"data         {data.dir} ({data.n_train_tokens:,} train / {data.n_val_tokens:,} val tokens, "
        f"{plan.epochs:.2f} epochs{', reused' if data.reused else ''})", rank_info)


USAGE = ("usage: python -m picollm.train [overrides...]   e.g. budget.minutes=10 run_dir=runs/x\n"
         "       python -m picollm.train -m run_dir=runs/grid model.depth=2,3   (one run per value, in turn)")


def main(argv: Optional[list] = None) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _exit_now(lambda: _main(argv))
    _main(argv)


def _main(argv: Optional[list]) -> None:
    try:
        for cfg in cli.parse_runs(argv, "train", USAGE):  # one config, or one per -m point
            run(cfg)
    except (ConfigError, TrainError, ckpt.CheckpointError) as err:
        raise SystemExit(f"error: {err}")
    except Interrupted as stop:
        raise SystemExit(128 + stop.signum)
    except PreparationInterrupted as stop:
        raise SystemExit(f"interrupted: {stop.sentence()}")
    except KeyboardInterrupt:
        raise SystemExit("interrupted; rerun the same command to resume from the last checkpoint.")


def _exit_now(body) -> None:
    """Under torchrun, leave without interpreter shutdown once everything is written.

    FSDP2 keeps the gloo process group alive past destroy_process_group, and a gloo
    worker thread that runs into Python's shutdown aborts the process ("terminate called
    without an active exception", exit -6), which torchrun counts as a failed worker and
    restarts. Every file is closed by now, so skipping the shutdown loses nothing."""
    code = 0
    try:
        body()
    except SystemExit as done:
        if isinstance(done.code, str):
            print(done.code, file=sys.stderr)
            code = 1
        else:
            code = done.code or 0
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
