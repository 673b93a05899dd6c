"""The training loop (Hydra overrides on the command line).

    python -m picollm.train budget.minutes=10 run_dir=runs/cpu
    torchrun --standalone --nproc_per_node=2 -m picollm.train budget.compute=1e15

Order of work: compose and check the config, plan (cheap, before any data work), prepare
tokenizer + shards, train with periodic evaluation and checkpoints, then a final
evaluation, samples and the report. Every output lands in ``run_dir``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import secrets
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from picollm import checkpoint as ckpt
from picollm import dist, hardware, parallel
from picollm import cli
from picollm.config import ConfigError
from picollm.data.loader import PackedLoader, TokenStream
from picollm.data.prepare import (PreparationInterrupted, PreparedData, check_fits, load_prepared, prepare_data,
                                  validate_tokenizer_config)
from picollm.data.sources import validate_source
from picollm.evaluate import evaluate, token_byte_lengths
from picollm.model import GPT
from picollm.optim import lr_at, make_optimizer, set_lr
from picollm.plan import Plan, _strip_harmless, plan_for_run, save_plan
from picollm.run_lock import RunLock, RunLockedError
from picollm.throughput import autocast

# train.save_at checkpoints go to run_dir/saved_at/checkpoints/, where retention never prunes them.
SAVED_AT = "saved_at"


class TrainError(RuntimeError):
    pass


def log(msg: str, info: Optional[dist.DistInfo] = None) -> None:
    if info is None or info.is_main:
        print(msg, flush=True)


# ----------------------------------------------------------------------------- run setup

def default_run_dir(cfg: DictConfig) -> str:
    """Where a run without ``run_dir`` goes: ``runs/run-<hash of the settings that define
    the run>``. The same command (also a torchrun restart of it) maps to the same directory,
    so "rerun the same command" resumes; settings that do not change the run (intervals,
    wandb, resume, ...) do not change the name."""
    defining = _strip_harmless(OmegaConf.to_container(cfg, resolve=True))
    digest = hashlib.sha256(json.dumps(defining, sort_keys=True, default=str).encode()).hexdigest()
    return f"runs/run-{digest[:10]}"


def resolve_run_dir(cfg: DictConfig, info: dist.DistInfo) -> Path:
    """The configured run_dir (or the default one for this config), created, checked
    writable and locked against a second run, with one error sentence on every rank."""
    run_dir = Path(cfg.run_dir or default_run_dir(cfg)).expanduser().resolve()
    error, lock = None, None
    if info.is_main:  # the other ranks of this run share rank 0's lock
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            probe = run_dir / f".write_test.{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
            lock = RunLock(run_dir).acquire()
        except OSError as err:
            error = f"run_dir {run_dir} is not writable ({err.strerror}); pick another run_dir."
        except RunLockedError as err:
            error = str(err)
    error = dist.broadcast_object(error)  # every rank stops with the same sentence
    if error:
        raise TrainError(error)
    return run_dir, lock


def prepare(cfg: DictConfig, plan: Plan, info: dist.DistInfo) -> PreparedData:
    """The first process of every node prepares (or reuses) the data in that node's cache;
    preparation is deterministic, so nodes that share no storage build the same shards.
    The other processes wait through the store, without a collective timeout (preparing
    billions of tokens takes a while), then every rank checks that all nodes hold the same
    data. A failure stops every rank with the preparing rank's sentence."""
    if not info.enabled:
        return _prepare_here(cfg, plan)
    result = None
    if info.local_rank == 0:
        try:
            result = _prepare_here(cfg, plan)
            outcome = {"dir": str(result.dir), "fingerprint": _data_fingerprint(result)}
        except (TrainError, KeyboardInterrupt) as err:
            outcome = {"error": str(err) or "data preparation was interrupted"}
            dist.publish(f"data/node{info.node}", outcome)
            raise
        dist.publish(f"data/node{info.node}", outcome)
    outcomes = [dist.wait_for(f"data/node{n}", f"node {n}'s first process to prepare the data")
                for n in range(info.n_nodes)]
    errors = [o["error"] for o in outcomes if "error" in o]
    if errors:
        raise TrainError(errors[0])
    if len({o["fingerprint"] for o in outcomes}) > 1:
        raise TrainError("the nodes prepared different data (their shard fingerprints differ); give every node the "
                         "same data config and corpus, or put data.cache_dir on storage all nodes share.")
    mine = outcomes[info.node]["dir"]
    return result if result is not None else load_prepared(mine)


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


# ----------------------------------------------------------------------------- training

class MetricsLog:
    """metrics.jsonl (every step and every evaluation) and optional wandb, rank 0 only.

    wandb: the run id is kept in ``run_dir/wandb_id``, so a resumed run continues the same
    wandb run. Records are logged against wandb's own step counter (which only grows) with
    the training step as the x-axis metric, because wandb drops records whose step goes
    backwards, as it does after a rollback or a resume from an earlier checkpoint."""

    def __init__(self, run_dir: Path, cfg: DictConfig, enabled: bool) -> None:
        self.enabled = enabled
        self.file = open(run_dir / "metrics.jsonl", "a") if enabled else None
        self.wandb = None
        if enabled and cfg.wandb.mode != "disabled":
            self.wandb = _wandb_run(run_dir, cfg)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


def _wandb_run(run_dir: Path, cfg: DictConfig):
    import wandb

    id_file = run_dir / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
    w = cfg.wandb
    run = wandb.init(project=w.project, entity=w.entity, group=w.group, tags=list(w.tags),
                     name=w.name or run_dir.name, id=run_id, resume="allow", dir=str(run_dir), mode=w.mode,
                     config=OmegaConf.to_container(cfg, resolve=True))
    id_file.write_text(run_id)
    run.define_metric("step")
    run.define_metric("*", step_metric="step")
    return run


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
        # CPU auto: the plan times both dtypes on the run's shape (or a resume reads its choice).
        device = hardware.describe(t.device, t.dtype, measure=info.is_main, peak_flops=t.peak_flops,
                                   decide_dtype_later=True)
        parallel.check_mode(t.parallel, device.dtype)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if info.enabled and device.is_cuda:  # each rank on its own GPU
        device.device = torch.device("cuda", info.local_rank)
    run_dir, lock = resolve_run_dir(cfg, info)
    with contextlib.ExitStack() as cleanup:
        if lock is not None:
            cleanup.callback(lock.release)
            cleanup.enter_context(_console_log(run_dir / "train.log"))
        log(f"run_dir      {run_dir}", info)
        return _train_in(run_dir, cfg, info, device)


def _train_in(run_dir: Path, cfg: DictConfig, info: dist.DistInfo, device: hardware.DeviceInfo) -> dict:
    t = cfg.train
    resume_path = _find_resume(cfg, run_dir)
    # FSDP reads a sharded checkpoint's tensors straight into its shards later (Trainer.restore).
    whole = not parallel.is_sharded(t.parallel, info)
    resume_state = ckpt.load_checkpoint(resume_path, tensors=whole) if resume_path else None
    plan = plan_for_run(cfg, device, info, run_dir, resume_state)
    device = _train_as_planned(device, plan, info)
    if plan.world_size != info.world_size:
        plan = _reshard(plan, info)
    log(plan.card(), info)
    if t.parallel == "fsdp":
        log("parallel     FSDP2 over " + (f"{info.world_size} processes: parameters, gradients and AdamW state "
                                          "sharded; checkpoints are sharded folders" if info.enabled else
                                          "one process: nothing to shard, so the plain model trains"), info)

    data = prepare(cfg, plan, info)
    try:
        check_fits(data, plan.gpt_config().seq_len)  # every rank, the same sentence
    except ValueError as err:
        raise TrainError(str(err)) from None
    plan.with_data(data.n_train_tokens, data.corpus_exhausted)
    if info.is_main:
        save_plan(run_dir, cfg, plan)
        log(f"data         {data.dir} ({data.n_train_tokens:,} train / {data.n_val_tokens:,} val tokens, "
            f"{plan.epochs:.2f} epochs{', reused' if data.reused else ''})", info)
        _copy_tokenizer(data, run_dir)
    if plan.model["vocab_size"] != data.vocab_size:
        raise TrainError(f"the prepared data has vocabulary {data.vocab_size} but the plan expects "
                         f"{plan.model['vocab_size']}; delete the plan in run_dir or use a new run_dir.")

    trainer = Trainer(cfg, info, device, plan, data, run_dir)
    if resume_state is not None:
        trainer.restore(resume_state)
        if trainer.step < plan.steps:  # a finished run that is merely rerun was not resumed
            trainer.event("resume", checkpoint=str(resume_path), world_size=info.world_size)
        log(f"resumed from {resume_path} at step {trainer.step}", info)
    del resume_state
    with _StopOnSignal() as stopper:
        return trainer.fit(stopper)


def _train_as_planned(device: hardware.DeviceInfo, plan: Plan, info: dist.DistInfo) -> hardware.DeviceInfo:
    """Train in the plan's dtype (recorded when it was measured, so a rerun or a resume
    never decides again), with that dtype's peak as the MFU yardstick: this machine's,
    measured once on rank 0 and shared."""
    device = hardware.with_dtype(device, plan.dtype, plan.dtype_reason)
    if info.enabled:
        device.peak_flops, device.peak_source = dist.broadcast_object((device.peak_flops, device.peak_source))
    return device


@contextlib.contextmanager
def _console_log(path: Path):
    """Everything this process prints also goes to ``path`` (appended across resumes)."""
    with open(path, "a", buffering=1) as file:
        file.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(sys.argv)}\n")
        saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(sys.stdout, file), _Tee(sys.stderr, file)
        try:
            yield
        finally:
            sys.stdout, sys.stderr = saved


class _Tee:
    def __init__(self, stream, file) -> None:
        self.stream, self.file = stream, file

    def write(self, text: str) -> int:
        self.file.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.file.flush()
        self.stream.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding, ...
        return getattr(self.stream, name)


def _reshard(plan: Plan, info: dist.DistInfo) -> Plan:
    """A run continued on a different number of processes: the global batch and the
    sample order are properties of the run, so only the accumulation split changes."""
    per_step = info.world_size * plan.micro_batch
    if plan.batch_seqs % per_step:
        raise TrainError(f"this run's global batch of {plan.batch_seqs} sequences cannot be split over "
                         f"{info.world_size} processes x micro-batch {plan.micro_batch}; use a world size that divides "
                         f"{plan.batch_seqs // plan.micro_batch}.")
    log(f"continuing a {plan.world_size}-process run on {info.world_size}: accumulation "
        f"{plan.accum_steps} -> {plan.batch_seqs // per_step} steps, same global batch and sample order", info)
    plan.world_size, plan.accum_steps = info.world_size, plan.batch_seqs // per_step
    return plan


class _StopOnSignal:
    """SIGTERM / SIGINT (preemption, Ctrl-C) set a flag; the loop finishes the current step,
    saves and exits. A second Ctrl-C interrupts at once."""

    def __enter__(self):
        self.signum, self.previous = None, {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False


class Trainer:
    """Model, optimizer, data cursor and run bookkeeping for one run; ``fit`` is the loop."""

    def __init__(self, cfg: DictConfig, info: dist.DistInfo, device: hardware.DeviceInfo, plan: Plan,
                 data: PreparedData, run_dir: Path) -> None:
        t = self.t = cfg.train
        self.cfg, self.info, self.device, self.plan, self.data, self.run_dir = cfg, info, device, plan, data, run_dir
        gcfg = self.gcfg = plan.gpt_config()
        torch.manual_seed(t.seed)
        self.sharded = parallel.is_sharded(t.parallel, info)
        # Under FSDP the full model is built on the host and its shards moved to the device,
        # so every mode starts from the same weights.
        self.model = GPT(gcfg).to("cpu" if self.sharded else device.device)
        self.model.activation_checkpointing = t.activation_checkpointing
        self.train_model = parallel.wrap(self.model, t.parallel, info, device.device, device.dtype)
        if t.compile:
            self.train_model = torch.compile(self.train_model)
        # The optimizer comes after wrapping: FSDP replaces the parameters with sharded ones.
        self.optimizer = make_optimizer(self.model, plan.lr, t.weight_decay, (t.beta1, t.beta2), device.device,
                                        t.optimizer, t.muon_lr_ratio)
        # fp16 (GPUs without bf16; also runs on CPU): the scaler skips steps whose scaled
        # gradients overflow and lowers the scale. That is its job, not a bad step.
        self.scaler = torch.amp.GradScaler(device.device.type) if device.dtype == "fp16" else None
        # max_tokens pins the stream length, so a cache later rebuilt larger by another run
        # (a strict superset: same prefix) leaves this run's sample order unchanged.
        self.loader = PackedLoader(data.train_shards, gcfg.seq_len, plan.batch_seqs, plan.micro_batch, t.seed,
                                   info.rank, info.world_size, max_tokens=plan.stream_tokens)
        self.step = 0
        self.stats = {"skipped_steps": 0, "best_val_loss": None, "best_step": None, "train_seconds": 0.0,
                      "lr_scale": 1.0, "rollbacks": 0, "scaler_skips": 0}
        self.metrics = MetricsLog(run_dir, cfg, info.is_main)
        self.byte_lengths = token_byte_lengths(data.tokenizer, gcfg.vocab_size)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.injected: set = set()
        self.spikes = SpikeDetector(t.spike_sigmas)

    # ---------------------------------------------------------------- state
    def state(self) -> dict:
        """Everything a resume needs. Model and optimizer state are keyed by parameter name
        (this rank's shards under FSDP, so FSDP saves them with DCP, not here)."""
        model_sd, optim_sd = parallel.training_state(self.model, self.optimizer)
        return {
            "step": self.step, "model": model_sd, "optimizer": optim_sd,
            "scaler": self.scaler.state_dict() if self.scaler else None, "loader": self.loader.state_dict(),
            "rng": dist.all_gather_object(ckpt.rng_state(self.device.device)),  # each rank's, its own GPU only
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "plan": self.plan.to_dict(), "stats": dict(self.stats),
            "tokenizer": {"ref": self.data.tokenizer_ref, "bos_id": self.data.bos_id,
                          "vocab_size": self.data.vocab_size},
            "torch_version": torch.__version__,
        }

    def restore(self, state: dict, keep_stats: tuple = ()) -> None:
        """Continue from a checkpoint of either layout, saved with any world size."""
        rows = state["model"]["embed.weight"].shape[0] if state["model"] and "embed.weight" in state["model"] else None
        if rows is not None and rows != self.gcfg.padded_vocab:
            raise TrainError(f"this checkpoint's embedding has {rows} rows, saved before the vocabulary was padded to a "
                             f"multiple of 128 ({self.gcfg.padded_vocab}); its optimizer state cannot continue here. "
                             "Evaluate, sample or export it, or continue it with the picollm version that started it.")
        if state["model"] is None:  # a sharded checkpoint read without tensors (FSDP): DCP reshards
            ckpt.load_sharded(Path(state["path"]), self.model, self.optimizer)
        else:
            parallel.load_training_state(self.model, self.optimizer, state["model"], state["optimizer"], self.sharded)
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.loader.load_state_dict(state["loader"])
        ckpt.set_rng_state(ckpt.rank_rng_state(state["rng"], self.info.rank), self.device.device)
        self.step = int(state["step"])
        kept = {k: self.stats[k] for k in keep_stats}
        self.stats.update(state.get("stats", {}))
        self.stats.update(kept)

    def save(self, into: Optional[Path] = None, keep: Optional[int] = None) -> None:
        """Every rank contributes its RNG state; rank 0 writes (under FSDP every rank writes
        its shards). A failed write is fatal but leaves the earlier checkpoints intact.
        ``into``/``keep``: another run_dir-like folder and retention (0 keeps all)."""
        into = into or self.run_dir
        keep = self.t.keep_checkpoints if keep is None else keep
        state = self.state()
        if self.sharded:
            tensors = {"model": state.pop("model"), "optimizer": state.pop("optimizer")}
            try:
                ckpt.save_sharded(into, self.step, tensors, state, self.info.is_main,
                                  keep=keep, extra_keep=self.stats["best_step"])
            except ckpt.CheckpointError as err:
                raise TrainError(str(err)) from None
            return
        error = None
        if self.info.is_main:
            try:
                ckpt.save_checkpoint(into, self.step, state, keep=keep, extra_keep=self.stats["best_step"])
            except ckpt.CheckpointError as err:
                error = str(err)
        error = dist.broadcast_object(error)
        if error:
            raise TrainError(error)

    def event(self, name: str, **fields) -> None:
        self.metrics.write({"kind": "event", "event": name, "step": self.step, **fields})

    # ---------------------------------------------------------------- evaluation
    def evaluate(self) -> dict:
        plan = self.plan
        result = evaluate(self.model, self.data.val_shards, self.gcfg.seq_len, plan.micro_batch, self.byte_lengths,
                          lambda: autocast(self.device), self.t.eval_tokens, self.device.device, self.info.rank,
                          self.info.world_size, lockstep=self.sharded)
        best = self.stats["best_val_loss"]
        if best is None or result["val_loss"] < best:
            self.stats["best_val_loss"], self.stats["best_step"] = result["val_loss"], self.step
        tokens = self.step * plan.tokens_per_step
        self.metrics.write({"kind": "eval", "step": self.step, "tokens": tokens,
                            "flops": tokens * plan.flops_per_token, **result})
        log(f"eval step {self.step}: val_loss {result['val_loss']:.4f}, val_bpb {result['val_bpb']:.4f}", self.info)
        return result

    # ---------------------------------------------------------------- one step
    def train_step(self, batches) -> "StepResult":
        """Forward/backward over the accumulation micro-batches, clip, update unless the
        loss or gradient norm is non-finite (under fp16 the loss scaler decides)."""
        plan, info = self.plan, self.info
        step = self.step
        loss_sum = torch.zeros((), device=self.device.device)
        for micro in range(plan.accum_steps):
            s, m, x, y = next(batches)
            assert (s, m) == (step, micro), "loader out of step"
            x = x.to(self.device.device, non_blocking=True)
            y = y.to(self.device.device, non_blocking=True)
            last = micro == plan.accum_steps - 1
            # DDP reduces gradients once per step; FSDP reduce-scatters every micro-batch so that
            # gradients stay sharded (its memory saving).
            defer = info.enabled and not self.sharded and not last
            sync = self.train_model.no_sync() if defer else contextlib.nullcontext()
            with sync:
                with autocast(self.device):
                    loss = self.train_model(x, y)
                if step in self.t.inject_nan_loss and step not in self.injected:
                    loss = loss * float("nan")
                scaled = loss / plan.accum_steps  # k micro-batches == one batch k times larger
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            loss_sum += loss.detach()
        if step in self.t.inject_inf_grad and step not in self.injected:
            parallel.local_shard(self.params[0].grad).view(-1)[0] = float("inf")
        if step in self.t.inject_nan_loss or step in self.t.inject_inf_grad:
            self.injected.add(step)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        clip = self.t.grad_clip if self.t.grad_clip > 0 else float("inf")
        grad_norm = parallel.local_value(torch.nn.utils.clip_grad_norm_(self.params, clip))
        loss_mean = float(dist.all_reduce_mean(loss_sum / plan.accum_steps))
        grad_norm = float(grad_norm)
        if self.scaler is not None:
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)  # skips the update itself on inf/nan gradients
            self.scaler.update()  # ...and then lowers the scale
            new_scale = self.scaler.get_scale()
            result = StepResult(loss_mean, grad_norm, updated=new_scale >= scale, loss_scale=new_scale,
                                bad=not math.isfinite(loss_mean) or new_scale < MIN_LOSS_SCALE)
        else:
            finite = math.isfinite(loss_mean) and math.isfinite(grad_norm)
            if finite:
                self.optimizer.step()
            result = StepResult(loss_mean, grad_norm, updated=finite, bad=not finite)
        self.optimizer.zero_grad(set_to_none=True)
        return result

    def handle_bad_step(self, bad_streak: int) -> bool:
        """After too many non-finite steps in a row: roll back (True) or stop (raises)."""
        t = self.t
        if bad_streak < t.max_bad_steps:
            return False
        latest = ckpt.latest_valid(self.run_dir) if self.info.is_main else None
        latest = dist.broadcast_object(str(latest) if latest else None)
        if t.on_bad_steps == "stop" or latest is None or self.stats["rollbacks"] >= t.max_rollbacks:
            why = ("no checkpoint to roll back to" if latest is None and t.on_bad_steps == "rollback" else
                   f"{self.stats['rollbacks']} rollbacks already" if t.on_bad_steps == "rollback" else
                   "train.on_bad_steps=stop")
            raise TrainError(f"{bad_streak} non-finite steps in a row at step {self.step} ({why}); stopping. "
                             "Lower train.lr, check the data, or resume from an earlier checkpoint.")
        state = ckpt.load_checkpoint(Path(latest), tensors=not self.sharded)
        self.restore(state, keep_stats=("skipped_steps", "scaler_skips", "rollbacks", "lr_scale", "train_seconds"))
        self.stats["rollbacks"] += 1
        self.stats["lr_scale"] *= t.rollback_lr_scale
        self.event("rollback", checkpoint=latest, lr_scale=self.stats["lr_scale"])
        log(f"rolled back to {latest} (step {self.step}); LR now scaled by {self.stats['lr_scale']:g}", self.info)
        return True

    # ---------------------------------------------------------------- the loop
    def fit(self, stopper: "_StopOnSignal") -> dict:
        plan, t, info = self.plan, self.t, self.info
        already_done = self.step >= plan.steps and ckpt.list_checkpoints(self.run_dir)
        if already_done:
            log(f"run in {self.run_dir} is already complete ({plan.steps} steps); nothing to train. "
                "For a new run, set run_dir (or raise train.steps to extend this one).", info)
            return self.finish(None, trained=False)
        if self.step == 0:
            self.evaluate()
        peak = hardware.combined_peak(self.device, info.world_size) or 0  # this machine's, not the plan's
        window_start, window_steps, bad_streak, last_val = time.perf_counter(), 0, 0, None
        batches = self.loader.batches(self.step, plan.steps)
        while self.step < plan.steps:
            step_start = time.perf_counter()
            lr = self.stats["lr_scale"] * lr_at(self.step, plan.lr, plan.warmup_steps, plan.steps, t.min_lr_ratio,
                                                t.schedule, t.decay_frac, t.decay_shape)
            set_lr(self.optimizer, lr)  # each group its own multiple (Muon's differs from AdamW's)
            result = self.train_step(batches)
            loss, grad_norm = result.loss, result.grad_norm
            if self.device.is_cuda:
                torch.cuda.synchronize(self.device.device)
            dt = time.perf_counter() - step_start
            self.stats["train_seconds"] += dt
            self.step += 1
            tok_s = plan.tokens_per_step / dt
            record = {
                "kind": "train", "step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                "tokens": self.step * plan.tokens_per_step, "flops": self.step * plan.tokens_per_step * plan.flops_per_token,
                "tok_per_s": tok_s, "mfu": tok_s * plan.flops_per_token / peak if peak else None, "dt": dt,
                "skipped": not result.updated, "time": time.time(),
            }
            if result.loss_scale is not None:
                record["loss_scale"] = result.loss_scale
            self.metrics.write(record)
            if not result.bad:
                bad_streak = 0
                if result.updated:
                    spike = self.spikes.update(loss)
                    if spike:
                        self.event("spike", **spike)
                        log(f"step {self.step}: loss spike {loss:.4f} (running mean {spike['mean']:.4f})", info)
                else:  # the fp16 loss scaler skipped an overflow and lowered its scale: its job, not a bad step
                    self.stats["scaler_skips"] += 1
            else:
                bad_streak += 1
                self.stats["skipped_steps"] += 1
                self.event("skipped_step", loss=loss, grad_norm=grad_norm, loss_scale=result.loss_scale)
                what = "non-finite loss or collapsed loss scale" if self.scaler else "non-finite loss or gradient norm"
                log(f"step {self.step}: {what}; update skipped ({bad_streak} in a row)", info)
                if self.handle_bad_step(bad_streak):
                    bad_streak = 0
                    batches.close()  # stop the old prefetch thread before restarting at the rollback step
                    batches = self.loader.batches(self.step, plan.steps)
                    continue
            window_steps += 1
            if self.step % max(1, t.log_every) == 0 or self.step in (plan.steps, 1):
                rate = (time.perf_counter() - window_start) / window_steps
                mfu = f" | MFU {tok_s * plan.flops_per_token / peak:.1%}" if peak else ""
                log(f"step {self.step}/{plan.steps} | loss {loss:.4f} | lr {lr:.2e} | gnorm {grad_norm:.2f} "
                    f"| {tok_s / 1e3:.1f}k tok/s{mfu} | ETA {_eta(rate * (plan.steps - self.step))}", info)
                window_start, window_steps = time.perf_counter(), 0
            if self.step == plan.steps:
                break
            if self.step % plan.eval_every == 0:
                last_val = self.evaluate()
            stop = dist.any_rank(stopper.signum is not None)  # every rank stops at the same step
            if self.step % plan.save_every == 0 or stop:
                self.save()
            if self.step in t.save_at:  # kept apart from retention: a sweep branches cooldowns from these
                self.save(self.run_dir / SAVED_AT, keep=0)
            if stop:
                name = signal.Signals(stopper.signum).name if stopper.signum else "a signal on another rank"
                log(f"stopped by {name} after step {self.step}; checkpoint saved in {self.run_dir}. "
                    f"Rerun the same command to resume (it continues in run_dir={self.run_dir}).", info)
                self.metrics.close()
                raise Interrupted(stopper.signum or signal.SIGTERM)
        last_val = self.evaluate()
        self.save()
        return self.finish(last_val, trained=True)

    def finish(self, last_val: Optional[dict], trained: bool) -> dict:
        self.metrics.close()
        final = {"steps": self.plan.steps, "skipped_steps": self.stats["skipped_steps"],
                 "rollbacks": self.stats["rollbacks"],
                 "scaler_skips": self.stats["scaler_skips"], "train_seconds": self.stats["train_seconds"],
                 "best_val_loss": self.stats["best_val_loss"], "best_step": self.stats["best_step"],
                 "peak_memory_mib": hardware.peak_memory_mib(self.device.device), **(last_val or {})}
        exported = dist.broadcast_object((self.run_dir / "model.safetensors").exists())
        if trained or not exported:
            whole = self._whole_model()
            if self.info.is_main:
                export_weights(whole, self.run_dir)
        if self.info.is_main:
            if trained or not (self.run_dir / "final.json").exists():
                (self.run_dir / "final.json").write_text(json.dumps(final, indent=2))
            else:
                final = json.loads((self.run_dir / "final.json").read_text())
            if trained and self.t.report:
                self.write_report()
        return final

    def _whole_model(self) -> Optional[GPT]:
        """Collective under FSDP: the unsharded model in rank 0 (None on the other ranks)."""
        if not self.sharded:
            return self.model
        weights = parallel.gathered_model_state(self.model)
        if not self.info.is_main:
            return None
        whole = GPT(self.gcfg)
        whole.load_state_dict(weights)
        return whole

    def write_report(self) -> None:
        """report.md with samples; a failure here is reported but never fails the run."""
        from picollm.report import run_samples, write_report

        try:
            path = write_report(self.run_dir, samples=run_samples(self.run_dir))
            log(f"report: {path}", self.info)
        except Exception as err:  # the training result is already safe on disk
            log(f"warning: could not write the report ({err}); run python -m picollm.report run_dir={self.run_dir}",
                self.info)


class SpikeDetector:
    """Running mean and variance of the loss (EMA); a loss ``sigmas`` std devs above the
    mean (and 5% above it, so a flat curve's tiny variance does not cry wolf) is a spike."""

    def __init__(self, sigmas: float, beta: float = 0.95, warmup: int = 20) -> None:
        self.sigmas, self.beta, self.warmup = sigmas, beta, warmup
        self.mean, self.var, self.seen = None, 0.0, 0

    def update(self, loss: float) -> Optional[dict]:
        if self.mean is None:
            self.mean = loss
            return None
        dev, std = loss - self.mean, math.sqrt(self.var)
        self.seen += 1
        spike = self.seen > self.warmup and dev > self.sigmas * std and dev > 0.05 * self.mean
        result = {"loss": loss, "mean": self.mean, "std": std} if spike else None
        self.mean += (1 - self.beta) * dev
        self.var = self.beta * (self.var + (1 - self.beta) * dev * dev)
        return result


MIN_LOSS_SCALE = 1.0  # below this, gradients overflow fp16 even unscaled: the run is diverging


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    updated: bool  # the optimizer stepped
    bad: bool  # counts toward the bad-step streak (rollback / stop)
    loss_scale: Optional[float] = None  # fp16 only


class Interrupted(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = int(signum)


def export_weights(model: GPT, run_dir: Path) -> None:
    """The final model as safetensors plus its JSON config: loadable with
    ``picollm.train.load_weights`` and no optimizer state."""
    from safetensors.torch import save_model

    tmp = run_dir / f".model.safetensors.{os.getpid()}.tmp"
    save_model(model, str(tmp))  # handles gpt2's tied embedding/head
    os.replace(tmp, run_dir / "model.safetensors")
    (run_dir / "model_config.json").write_text(json.dumps(model.config_dict(), indent=2))


def load_weights(run_dir: Path, device="cpu") -> GPT:
    from safetensors.torch import load_model

    from picollm.model import GPTConfig

    cfg = GPTConfig(**json.loads((Path(run_dir) / "model_config.json").read_text()))
    model = GPT(cfg)
    load_model(model, str(Path(run_dir) / "model.safetensors"), device=str(device))
    return model.to(device)


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
