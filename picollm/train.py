"""The training loop (Hydra overrides on the command line).

    python -m picollm.train budget.minutes=10 run_dir=runs/cpu
    torchrun --standalone --nproc_per_node=2 -m picollm.train budget.compute=1e15

Order of work: compose and check the config, plan (cheap, before any data work), prepare
tokenizer + shards, train with periodic evaluation and checkpoints, then a final
evaluation, samples and the report. Every output lands in ``run_dir``.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig, OmegaConf

from picollm import checkpoint as ckpt
from picollm import dist, hardware
from picollm.config import ConfigError, load_config, parse_cli
from picollm.data.loader import PackedLoader
from picollm.data.prepare import PreparedData, load_prepared, prepare_data, validate_tokenizer_config
from picollm.data.sources import validate_source
from picollm.evaluate import evaluate, token_byte_lengths
from picollm.model import GPT
from picollm.optim import lr_at, make_optimizer
from picollm.plan import Plan, plan_for_run, save_plan
from picollm.throughput import autocast

class TrainError(RuntimeError):
    pass


def log(msg: str, info: Optional[dist.DistInfo] = None) -> None:
    if info is None or info.is_main:
        print(msg, flush=True)


# ----------------------------------------------------------------------------- run setup

def resolve_run_dir(cfg: DictConfig, info: dist.DistInfo) -> Path:
    """The configured run_dir, or runs/<UTC time> picked by rank 0 so all ranks agree."""
    name = cfg.run_dir
    if not name and info.is_main:
        name = "runs/" + datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    name = dist.broadcast_object(name)
    run_dir = Path(name).expanduser().resolve()
    if info.is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            probe = run_dir / ".write_test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            raise TrainError(f"run_dir {run_dir} is not writable ({err.strerror}); pick another run_dir.") from None
    return run_dir


def prepare(cfg: DictConfig, plan: Plan, info: dist.DistInfo) -> PreparedData:
    """Rank 0 prepares (or reuses) the data; the others wait and then load it."""
    result, error = None, None
    if info.is_main:
        try:
            result = prepare_data(cfg.data, cfg.tokenizer, plan.stream_tokens)
        except Exception as err:  # report on every rank, then stop
            error = f"data preparation failed: {err}"
    error = dist.broadcast_object(error)
    if error:
        raise TrainError(error)
    directory = dist.broadcast_object(str(result.dir) if result else None)
    return result if info.is_main else load_prepared(directory)


# ----------------------------------------------------------------------------- training

class MetricsLog:
    """metrics.jsonl (every step and every evaluation) and optional wandb, rank 0 only."""

    def __init__(self, run_dir: Path, cfg: DictConfig, enabled: bool) -> None:
        self.enabled = enabled
        self.file = open(run_dir / "metrics.jsonl", "a") if enabled else None
        self.wandb = None
        if enabled and cfg.wandb.mode != "disabled":
            import wandb

            self.wandb = wandb.init(project=cfg.wandb.project, name=cfg.wandb.name or run_dir.name,
                                    dir=str(run_dir), mode=cfg.wandb.mode,
                                    config=OmegaConf.to_container(cfg, resolve=True))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"])

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


def _eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def run(cfg: DictConfig) -> dict:
    """Train according to ``cfg``; returns the final metrics."""
    info = dist.setup(cfg.train.device)
    try:
        return _run(cfg, info)
    finally:
        dist.teardown()


def _run(cfg: DictConfig, info: dist.DistInfo) -> dict:
    t = cfg.train
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    # Cheap checks first: nothing expensive happens with a config that cannot work.
    try:
        validate_source(cfg.data)
        validate_tokenizer_config(cfg.tokenizer)
        device = hardware.describe(t.device, t.dtype, measure=info.is_main)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if info.enabled:  # one measured peak for all ranks; each rank on its own GPU
        device.peak_flops, device.peak_source = dist.broadcast_object((device.peak_flops, device.peak_source))
        if device.is_cuda:
            device.device = torch.device("cuda", info.local_rank)
    run_dir = resolve_run_dir(cfg, info)

    resume_path = _find_resume(cfg, run_dir)
    resume_state = ckpt.load_checkpoint(resume_path) if resume_path else None
    plan = plan_for_run(cfg, device, info, run_dir, resume_state)
    if plan.world_size != info.world_size:
        raise TrainError(f"this run was planned for {plan.world_size} processes, not {info.world_size}; "
                         "launch it with the same number of processes.")
    log(plan.card(), info)

    data = prepare(cfg, plan, info)
    plan.with_data(data.n_train_tokens, data.corpus_exhausted)
    if info.is_main:
        save_plan(run_dir, cfg, plan)
        log(f"data         {data.dir} ({data.n_train_tokens:,} train / {data.n_val_tokens:,} val tokens, "
            f"{plan.epochs:.2f} epochs{', reused' if data.reused else ''})", info)
        _copy_tokenizer(data, run_dir)

    gcfg = plan.gpt_config()
    if gcfg.vocab_size != data.vocab_size:
        raise TrainError(f"the prepared data has vocabulary {data.vocab_size} but the plan expects {gcfg.vocab_size}; "
                         "delete the plan in run_dir or use a new run_dir.")
    torch.manual_seed(t.seed)
    model = GPT(gcfg).to(device.device)
    model.activation_checkpointing = t.activation_checkpointing
    optimizer = make_optimizer(model, plan.lr, t.weight_decay, (t.beta1, t.beta2), device.device)
    scaler = torch.amp.GradScaler("cuda") if device.dtype == "fp16" else None
    # max_tokens pins the stream length, so a cache later rebuilt larger by another run
    # (a strict superset: same prefix) leaves this run's sample order unchanged.
    loader = PackedLoader(data.train_shards, gcfg.seq_len, plan.batch_seqs, plan.micro_batch, t.seed,
                          info.rank, info.world_size, max_tokens=plan.stream_tokens)

    start_step, stats = 0, {"skipped_steps": 0, "best_val_loss": None, "train_seconds": 0.0}
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        if scaler is not None and resume_state.get("scaler"):
            scaler.load_state_dict(resume_state["scaler"])
        loader.load_state_dict(resume_state["loader"])
        rngs = resume_state["rng"]
        ckpt.set_rng_state(rngs[info.rank] if info.rank < len(rngs) else rngs[0])
        start_step = int(resume_state["step"])
        stats.update(resume_state.get("stats", {}))
        log(f"resumed from {resume_path} at step {start_step}", info)
    resume_state = None  # free the memory

    train_model = model
    if info.enabled:
        ids = [device.device.index] if device.is_cuda else None
        train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if t.compile:
        train_model = torch.compile(train_model)

    metrics = MetricsLog(run_dir, cfg, info.is_main)
    byte_lengths = token_byte_lengths(data.tokenizer, gcfg.vocab_size)
    eval_batch = plan.micro_batch
    amp = lambda: autocast(device)

    def run_eval(step: int, max_tokens: Optional[int]) -> dict:
        result = evaluate(model, data.val_shards, gcfg.seq_len, eval_batch, byte_lengths, amp, max_tokens,
                          device.device, info.rank, info.world_size)
        best = stats["best_val_loss"]
        stats["best_val_loss"] = result["val_loss"] if best is None else min(best, result["val_loss"])
        metrics.write({"kind": "eval", "step": step, "tokens": step * plan.tokens_per_step,
                       "flops": step * plan.tokens_per_step * plan.flops_per_token, **result})
        log(f"eval step {step}: val_loss {result['val_loss']:.4f}, val_bpb {result['val_bpb']:.4f}", info)
        return result

    def save(step: int) -> None:
        state = {
            "step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler else None, "loader": loader.state_dict(),
            "rng": _gather_rng(info), "config": OmegaConf.to_container(cfg, resolve=True),
            "plan": plan.to_dict(), "stats": dict(stats),
            "tokenizer": {"ref": data.tokenizer_ref, "bos_id": data.bos_id, "vocab_size": data.vocab_size},
            "torch_version": torch.__version__,
        }
        if info.is_main:
            ckpt.save_checkpoint(run_dir, step, state, keep=t.keep_checkpoints)
        dist.barrier()

    if start_step == 0:
        run_eval(0, t.eval_tokens)
    params = [p for p in model.parameters() if p.requires_grad]
    tokens_per_step = plan.tokens_per_step
    peak = (plan.peak_flops or 0) * info.world_size
    log_every = max(1, t.log_every)
    window_start, window_steps = time.perf_counter(), 0
    last_val = None
    batches = loader.batches(start_step, plan.steps)
    for step in range(start_step, plan.steps):
        step_start = time.perf_counter()
        lr = lr_at(step, plan.lr, plan.warmup_steps, plan.steps, t.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=device.device)
        for micro in range(plan.accum_steps):
            s, m, x, y = next(batches)
            assert (s, m) == (step, micro), "loader out of step"
            x, y = x.to(device.device, non_blocking=True), y.to(device.device, non_blocking=True)
            last = micro == plan.accum_steps - 1
            sync = contextlib.nullcontext() if last or not info.enabled else train_model.no_sync()
            with sync:
                with amp():
                    loss = train_model(x, y)
                scaled = loss / plan.accum_steps  # k micro-batches == one batch k times larger
                (scaler.scale(scaled) if scaler else scaled).backward()
            loss_sum += loss.detach()
        if scaler is not None:
            scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip if t.grad_clip > 0 else float("inf"))
        loss_mean = dist.all_reduce_mean(loss_sum / plan.accum_steps)
        finite = bool(torch.isfinite(grad_norm)) and bool(torch.isfinite(loss_mean))
        if scaler is not None:
            scaler.step(optimizer)  # skips the update itself on inf/nan gradients
            scaler.update()
        elif finite:
            optimizer.step()
        if not finite:
            stats["skipped_steps"] += 1
            log(f"step {step}: non-finite loss or gradient norm; update skipped", info)
        optimizer.zero_grad(set_to_none=True)
        if device.is_cuda:
            torch.cuda.synchronize(device.device)
        dt = time.perf_counter() - step_start
        stats["train_seconds"] += dt
        done = step + 1
        tok_s = tokens_per_step / dt
        flops_s = tok_s * plan.flops_per_token
        metrics.write({
            "kind": "train", "step": done, "loss": float(loss_mean), "lr": lr, "grad_norm": float(grad_norm),
            "tokens": done * tokens_per_step, "flops": done * tokens_per_step * plan.flops_per_token,
            "tok_per_s": tok_s, "mfu": flops_s / peak if peak else None, "dt": dt, "skipped": not finite,
            "time": time.time(),
        })
        window_steps += 1
        if info.is_main and (done % log_every == 0 or done == plan.steps or done == start_step + 1):
            elapsed = time.perf_counter() - window_start
            rate = elapsed / window_steps
            mfu = f" | MFU {flops_s / peak:.1%}" if peak else ""
            log(f"step {done}/{plan.steps} | loss {float(loss_mean):.4f} | lr {lr:.2e} | gnorm {float(grad_norm):.2f} "
                f"| {tok_s / 1e3:.1f}k tok/s{mfu} | ETA {_eta(rate * (plan.steps - done))}")
            window_start, window_steps = time.perf_counter(), 0
        if done % plan.eval_every == 0 and done != plan.steps:
            last_val = run_eval(done, t.eval_tokens)
        if done % plan.save_every == 0 and done != plan.steps:
            save(done)

    if start_step < plan.steps or not ckpt.list_checkpoints(run_dir):
        last_val = run_eval(plan.steps, t.eval_tokens)
        save(plan.steps)
    else:
        log(f"run in {run_dir} is already complete ({plan.steps} steps); nothing to train.", info)
    metrics.close()
    final = {"steps": plan.steps, "skipped_steps": stats["skipped_steps"], "train_seconds": stats["train_seconds"],
             **(last_val or {})}
    if info.is_main:
        (run_dir / "final.json").write_text(json.dumps(final, indent=2))
    return final


def _gather_rng(info: dist.DistInfo) -> list:
    """Every rank's RNG state, in rank order, saved by rank 0."""
    state = ckpt.rng_state()
    if not info.enabled:
        return [state]
    states = [None] * info.world_size
    torch.distributed.all_gather_object(states, state)
    return states


def _find_resume(cfg: DictConfig, run_dir: Path) -> Optional[Path]:
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


def _copy_tokenizer(data: PreparedData, run_dir: Path) -> None:
    """Keep the run self-contained: sampling and export find the tokenizer in run_dir."""
    src = Path(data.tokenizer_ref)
    if src.exists():
        (run_dir / "tokenizer.json").write_bytes(src.read_bytes())
    else:
        (run_dir / "tokenizer.json").write_text(json.dumps({"tiktoken": data.tokenizer_ref}))


def main(argv: Optional[list] = None) -> None:
    overrides = parse_cli(sys.argv[1:] if argv is None else argv,
                          "usage: python -m picollm.train [overrides...]   e.g. budget.minutes=10 run_dir=runs/x")
    try:
        run(load_config(overrides))
    except (ConfigError, TrainError, ckpt.CheckpointError) as err:
        raise SystemExit(f"error: {err}")
    except KeyboardInterrupt:
        raise SystemExit("interrupted; rerun the same command to resume from the last checkpoint.")


if __name__ == "__main__":
    main()
