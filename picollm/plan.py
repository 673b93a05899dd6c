"""The run plan: model shape, token budget and hyperparameters derived from the budget.

    python -m picollm.plan budget.compute=1e15            # the plan card
    python -m picollm.plan budget.minutes=10 plan.format=json

Rules (README "How N and D are derived"):
- budget.compute=C: N_opt = sqrt(C / (6 r)); the depth whose N is nearest (log scale);
  D = C / flops_per_token.  budget.params=N: nearest depth, D = r N.  budget.tokens=D:
  N = D / r unless the model is explicit.  budget.minutes=M: a short probe measures this
  machine's training FLOP/s, C = FLOP/s * 60 M, then as for compute.  No budget and an
  explicit model: D = r N.
- Global batch (tokens) ~ 0.292 C^0.3271 and peak LR ~ 0.3118 C^-0.125 (the compute-
  optimal hyperparameter fits of DeepSeek LLM, Bi et al. 2024), LR capped at 3e-3; batch
  rounded to a power of two in sequences and halved while the run would have < 50 steps.
- Warmup: warmup_frac of the steps. Cosine decay to min_lr_ratio * peak at the last step.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

from omegaconf import DictConfig, OmegaConf

from picollm import dist, hardware

from picollm.config import ConfigError, load_config, parse_cli, to_yaml
from picollm.model import GPTConfig
from picollm.scaling import chinchilla_optimal

# n_vocab of tiktoken's named encodings, so planning never needs their files.
NAMED_VOCABS = {"gpt2": 50257, "r50k_base": 50257, "p50k_base": 50281, "cl100k_base": 100277,
                "o200k_base": 200019}
LR_CAP = 3e-3
MIN_STEPS = 50
ASSUMED_MFU = {"cuda": 0.35, "cpu": 0.3}  # for the wall-clock estimate when nothing was measured
UNMEASURED_PEAK = {"cuda": 1e14, "cpu": 1e11}  # the first guess of budget.minutes when no peak is known yet
# budget.minutes: what besides the training steps the run spends inside its wall clock.
EVALS_PER_RUN = 12  # at step 0, ~10 on the default interval (steps // 10), and the final one
EVAL_SHARE = 0.05  # of budget.minutes the default evaluation interval may spend (fewer evals when short)
CHECKPOINT_BYTES_PER_S = 200e6  # fp32 weights + AdamW state to disk, a conservative local-disk rate
REPORT_SECONDS = 5.0  # report.md with samples after the last step (train.report), planned


def vocab_size_for(tok: DictConfig) -> int:
    if tok.name == "bpe":
        if not 257 < tok.vocab_size < 2**32:
            raise ConfigError(f"tokenizer.vocab_size={tok.vocab_size} must be above 257 (256 bytes + BOS) "
                              "and below 2**32 (the largest shard token dtype).")
        return int(tok.vocab_size)
    if tok.name not in NAMED_VOCABS:
        raise ConfigError(f"tokenizer.name={tok.name!r} is unknown; use bpe or one of {', '.join(NAMED_VOCABS)}.")
    return NAMED_VOCABS[tok.name]


def model_config(m: DictConfig, vocab_size: int, depth: Optional[int] = None) -> GPTConfig:
    """GPTConfig from the model group: explicit n_layer/d_model, or one depth knob."""
    common = dict(seq_len=m.seq_len, vocab_size=vocab_size, arch=m.arch, mlp_hidden=m.mlp_hidden,
                  qk_norm=m.qk_norm, rope_theta=m.rope_theta)
    try:
        if depth is None and m.n_layer is not None:
            if m.d_model is None:
                raise ConfigError("model.n_layer is set but model.d_model is not; set both, or use model.depth.")
            n_head = m.n_head or max(1, m.d_model // m.head_dim)
            return GPTConfig(n_layer=m.n_layer, d_model=m.d_model, n_head=n_head, **common)
        depth = depth if depth is not None else m.depth
        if depth is None:
            raise ConfigError("no model size: set model.depth, model.n_layer+model.d_model, or a budget.")
        return GPTConfig.from_depth(depth, aspect_ratio=m.aspect_ratio, head_dim=m.head_dim, **common)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def model_is_explicit(m: DictConfig) -> bool:
    return m.n_layer is not None or m.depth is not None


def nearest_model(m: DictConfig, vocab_size: int, n_target: float) -> GPTConfig:
    """The depth whose N is nearest to ``n_target`` in log space."""
    best = None
    for depth in range(1, m.max_depth + 1):
        cand = model_config(m, vocab_size, depth)
        gap = abs(math.log(cand.num_params() / n_target))
        if best is None or gap < best[0]:
            best = (gap, cand)
    return best[1]


# budget.minutes on a CPU: Chinchilla's D = 20 N turns a few minutes into a 1-layer, 1-head
# model (N = 184k at vocab 2048). Measured with this rule against that 1x64, budget.minutes
# side by side, one thread each, the same 438k held-out tokens (bench_time_to_loss.py
# --shapes auto,1x64h1): 5 min 4.230 vs 4.448 (the floor wins by 0.22 nats); 2 min 4.811 vs
# 4.782 (loses 0.03); 2 min on a 10x-loaded machine 5.378 vs 5.257 (C ~ 1e12, loses 0.12).
# The floor needs many small steps: at equal D, 2x128 with 106 steps (the compute rule's
# batch) scored 5.241, with 424 steps of a 4x smaller batch 4.857. Measurements, not laws.
MINUTES_MIN_DEPTH = 2
MINUTES_MIN_HEADS = 2
MINUTES_MIN_STEPS = 400  # budget.minutes halves the batch while the run has fewer steps,
MINUTES_MIN_BATCH_TOKENS = 1024  # but not below the smallest batch measured (4 x 256)


def minutes_model(m: DictConfig, vocab_size: int, n_target: float) -> GPTConfig:
    """The shape budget.minutes trains: nearest_model, lifted to the shallowest depth with at
    least MINUTES_MIN_DEPTH layers and MINUTES_MIN_HEADS heads (never past model.max_depth)."""
    gcfg = nearest_model(m, vocab_size, n_target)
    depth = gcfg.n_layer
    while depth < m.max_depth and (depth < MINUTES_MIN_DEPTH or model_config(m, vocab_size, depth).n_head < MINUTES_MIN_HEADS):
        depth += 1
    return gcfg if depth == gcfg.n_layer else model_config(m, vocab_size, depth)


def estimate_memory(gcfg: GPTConfig, micro_batch: int, dtype: str, activation_checkpointing: bool,
                    shards: int = 1) -> dict:
    """Peak training memory in bytes, by part. Weights, gradients and AdamW's two moments
    are fp32; activations are what autograd keeps per layer (about 12 d + 4 h values per
    token for this block shape, 2 bytes each under bf16/fp16 autocast), or only each
    block's input under activation checkpointing plus one block being recomputed; the
    logits add about 3 fp32 copies of (tokens x vocab) for softmax and its gradient.
    Under FSDP over ``shards`` processes the fp32 states are split ``shards`` ways, plus
    the gathered weights and gradients of two blocks (running and prefetched) and the root."""
    total = gcfg.num_params(total=True)
    tokens = micro_batch * gcfg.seq_len
    act_bytes = 4 if dtype == "fp32" else 2
    per_layer = tokens * (12 * gcfg.d_model + 4 * gcfg.hidden) * act_bytes
    if activation_checkpointing:
        activations = gcfg.n_layer * tokens * gcfg.d_model * act_bytes + per_layer
    else:
        activations = gcfg.n_layer * per_layer
    logits = 3 * tokens * gcfg.vocab_size * 4
    gathered = 0
    if shards > 1:  # whole weights and their not-yet-reduced gradients, in the compute dtype
        block = (gcfg.num_params() - gcfg.d_model * gcfg.vocab_size) // gcfg.n_layer
        root = total - gcfg.n_layer * block  # embedding, head, final norm
        gathered = (2 * block + root) * act_bytes * 2
    parts = {"weights": 4 * total // shards + gathered, "gradients": 4 * total // shards,
             "optimizer": 8 * total // shards, "activations": activations + logits}
    parts["total"] = sum(parts.values())
    return parts


@dataclass
class Plan:
    model: dict
    n_params: int
    n_params_total: int
    n_tokens: int
    tokens_per_param: float
    flops_per_token: int
    compute: float
    steps: int
    tokens_per_step: int
    batch_seqs: int
    micro_batch: int
    accum_steps: int
    world_size: int
    warmup_steps: int
    lr: float
    min_lr: float
    eval_every: int
    save_every: int
    est_seconds: float
    est_source: str
    budget: str
    device: str
    dtype: str
    peak_flops: Optional[float]
    memory: dict
    memory_available: int
    stream_tokens: int = 0  # train tokens the loader reads; fixed at planning so resumes keep the order
    epochs: Optional[float] = None
    data_tokens: Optional[int] = None
    warnings: list = field(default_factory=list)
    schedule: str = "cosine"  # how the LR goes from lr to min_lr, for the card
    dtype_reason: str = ""  # why this dtype (auto on CPU: measured); a resume keeps plan.dtype
    time_budget: Optional[dict] = None  # budget.minutes: seconds by part (start-up, probes, evals, training)
    optimizer: str = "adamw"  # for the card: which optimizer and, for muon, its LR multiple

    def to_dict(self) -> dict:
        return asdict(self)

    def gpt_config(self) -> GPTConfig:
        return GPTConfig(**self.model)

    def with_data(self, train_tokens: int, corpus_exhausted: bool) -> "Plan":
        """Fill in epochs once the data is prepared (only known then)."""
        self.data_tokens = int(min(train_tokens, self.stream_tokens))
        train_tokens = self.data_tokens
        self.epochs = self.n_tokens / train_tokens if corpus_exhausted else min(1.0, self.n_tokens / train_tokens)
        if self.epochs > 4:
            msg = (f"the run repeats its data {self.epochs:.1f} times (more than ~4 epochs stops helping, "
                   "Muennighoff et al. 2023); use a larger corpus or a smaller budget.")
            self.warnings.append(msg)
            warnings.warn(msg)
        return self

    def card(self) -> str:
        g = self.model
        mem = self.memory
        lines = [
            "── picollm run plan " + "─" * 44,
            f"budget       {self.budget}",
            f"model        {g['arch']}  n_layer={g['n_layer']} d_model={g['d_model']} n_head={g['n_head']} "
            f"seq_len={g['seq_len']} vocab={g['vocab_size']}",
            f"params       N={_si(self.n_params)} (matmul weights incl. LM head), total {_si(self.n_params_total)}",
            f"tokens       D={_si(self.n_tokens)}  D/N={self.tokens_per_param:.1f}",
            f"compute      C={self.compute:.3e} FLOPs  ({_si(self.flops_per_token)} FLOPs/token)",
            f"batch        {_si(self.tokens_per_step)} tokens/step = {self.batch_seqs} seqs "
            f"= {self.world_size} proc x {self.micro_batch} micro x {self.accum_steps} accum",
            f"schedule     {self.steps} steps, warmup {self.warmup_steps}, lr {self.lr:.2e} -> {self.min_lr:.2e} ({self.schedule})",
            f"device       {self.device}, {self.dtype}, peak "
            + (f"{self.peak_flops / 1e12:.3g} TFLOP/s" if self.peak_flops else "unknown"),
            f"optimizer    {self.optimizer}",
            *([f"dtype        {self.dtype_reason}"] if self.dtype_reason else []),
            f"time         ~{_duration(self.est_seconds)} ({self.est_source})",
            *([f"wall clock   {_time_budget_line(self.time_budget)}"] if self.time_budget else []),
            f"memory       ~{_gib(mem['total'])} peak (weights {_gib(mem['weights'])}, grads {_gib(mem['gradients'])}, "
            f"adam {_gib(mem['optimizer'])}, activations {_gib(mem['activations'])}) of {_gib(self.memory_available)}",
            "data         " + (f"{_si(self.data_tokens)} train tokens available, {self.epochs:.2f} epochs"
                               if self.epochs is not None else "not prepared yet (epochs known after prepare)"),
        ]
        lines += [f"warning      {w}" for w in self.warnings]
        return "\n".join(lines + ["─" * 64])


def make_plan(cfg: DictConfig, device_info, world_size: int = 1,
              measure_flops: Optional[Callable] = None, measure_dtypes: Optional[Callable] = None,
              startup_seconds: float = 0.0, clock: Callable[[], float] = time.perf_counter) -> Plan:
    """Resolve the budget into a full plan.

    ``measure_flops(gpt_cfg, micro_batch, device_info)`` returns achieved training FLOP/s
    on this machine in ``device_info.dtype``; budget.minutes needs it.
    ``measure_dtypes(gpt_cfg, micro_batch, device_info)`` returns ``{"step_seconds":
    {dtype: s}, "seconds": probe cost}``; it decides train.dtype=auto on CPU
    (``device_info.dtype_pending``), else the CPU-flag guess stands.
    ``startup_seconds``: what this process spent before planning, taken out of budget.minutes
    with the probes' own time (read from ``clock``)."""
    b, t = cfg.budget, cfg.train
    vocab = vocab_size_for(cfg.tokenizer)
    chosen = [k for k in ("compute", "params", "tokens", "minutes") if b[k] is not None]
    if len(chosen) > 1:
        raise ConfigError(f"budget sets {' and '.join('budget.' + k for k in chosen)}; set only one of them.")
    for k in chosen:
        if not b[k] > 0:
            raise ConfigError(f"budget.{k}={b[k]} must be positive.")
    if b.tokens_per_param <= 0:
        raise ConfigError(f"budget.tokens_per_param={b.tokens_per_param} must be positive.")
    r = b.tokens_per_param
    explicit = model_is_explicit(cfg.model)
    measured_rate, time_budget = None, None
    probe_seconds = {"dtype": 0.0, "throughput": 0.0}
    # The probe measures one process. GPUs add up; CPU processes share one machine's cores.
    devices = world_size if device_info.is_cuda else 1

    if "minutes" in chosen:
        if measure_flops is None:
            raise ConfigError("budget.minutes needs a throughput probe on this machine; run it through picollm.train or picollm.plan.")
        seconds = 60.0 * b.minutes
        # First guess from the peak, then re-measure on the chosen shape until it settles.
        # The probe runs what training will run: the same micro-batch and dtype.
        rate = devices * (device_info.peak_flops or UNMEASURED_PEAK[device_info.device.type]) * ASSUMED_MFU[device_info.device.type]
        gcfg, tried = None, set()
        for _ in range(3):
            guess = model_config(cfg.model, vocab) if explicit else minutes_model(cfg.model, vocab, chinchilla_optimal(rate * seconds, r)[0])
            if (guess.n_layer, guess.d_model) in tried:
                break
            tried.add((guess.n_layer, guess.d_model))
            gcfg = guess
            micro = _probe_micro(t, gcfg, rate * seconds, world_size, device_info)
            device_info = _settle_dtype(device_info, gcfg, micro, measure_dtypes, probe_seconds, clock)
            start = clock()
            rate = devices * measure_flops(gcfg, micro, device_info)
            probe_seconds["throughput"] += clock() - start
            if explicit:
                break
        time_budget = _time_budget(seconds, startup_seconds, probe_seconds, gcfg, rate, t)
        if not explicit:
            gcfg = minutes_model(cfg.model, vocab, chinchilla_optimal(rate * time_budget["train_s"], r)[0])
            time_budget = _time_budget(seconds, startup_seconds, probe_seconds, gcfg, rate, t)
        measured_rate = rate
        compute = rate * time_budget["train_s"]
        n_tokens = compute / gcfg.flops_per_token()
        budget = (f"{b.minutes:g} min, {_duration(time_budget['train_s'])} of it training at a measured "
                  f"{rate / 1e9:.3g} GFLOP/s" + (f" ({devices} GPUs)" if devices > 1 else "") + f" -> C={compute:.3e}")
    elif "compute" in chosen:
        gcfg = model_config(cfg.model, vocab) if explicit else nearest_model(cfg.model, vocab, chinchilla_optimal(b.compute, r)[0])
        n_tokens, budget = b.compute / gcfg.flops_per_token(), f"compute C={b.compute:.3e} FLOPs"
    elif "params" in chosen:
        if explicit:
            raise ConfigError("budget.params picks the model size, but the model is set explicitly; drop one of them.")
        gcfg = nearest_model(cfg.model, vocab, b.params)
        n_tokens, budget = r * gcfg.num_params(), f"params N~{_si(b.params)}, D = {r:g} N"
    elif "tokens" in chosen:
        gcfg = model_config(cfg.model, vocab) if explicit else nearest_model(cfg.model, vocab, b.tokens / r)
        n_tokens, budget = b.tokens, f"tokens D={_si(b.tokens)}"
    else:
        if not explicit and t.steps is None:
            raise ConfigError("no budget: set one of budget.compute, budget.params, budget.tokens, budget.minutes, "
                              "or give an explicit model (model.depth or model.n_layer+model.d_model).")
        gcfg = model_config(cfg.model, vocab)
        n_tokens, budget = r * gcfg.num_params(), f"explicit model, D = {r:g} N"

    fpt = gcfg.flops_per_token()
    seq = gcfg.seq_len
    batch_seqs = _global_batch(t, fpt * n_tokens, n_tokens, seq, world_size, minutes="minutes" in chosen)
    tokens_per_step = batch_seqs * seq

    if t.steps is not None:
        if t.steps < 1:
            raise ConfigError(f"train.steps={t.steps} must be at least 1.")
        steps = int(t.steps)
    else:
        if n_tokens < tokens_per_step:
            raise ConfigError(f"the budget gives {_si(n_tokens)} tokens, less than one step of {_si(tokens_per_step)} tokens; "
                              "raise the budget or lower train.batch_tokens.")
        steps = int(round(n_tokens / tokens_per_step))
    n_tokens = steps * tokens_per_step
    compute = fpt * n_tokens

    shards = world_size if t.parallel == "fsdp" else 1
    micro, memory = _micro_batch(t, gcfg, batch_seqs // world_size, device_info, shards)
    if device_info.dtype_pending:  # not a minutes budget: measure on the final shape and micro-batch
        device_info = _settle_dtype(device_info, gcfg, micro, measure_dtypes, probe_seconds, clock)
        micro, memory = _micro_batch(t, gcfg, batch_seqs // world_size, device_info, shards)
    accum = batch_seqs // (world_size * micro)

    lr = t.lr if t.lr is not None else min(LR_CAP, 0.3118 * compute ** -0.125)
    warmup = t.warmup_steps if t.warmup_steps is not None else int(round(t.warmup_frac * steps))
    if warmup >= steps and steps > 1:
        raise ConfigError(f"warmup of {warmup} steps does not fit in a {steps}-step run; lower train.warmup_steps.")

    if measured_rate is not None:
        est, source = compute / measured_rate, "measured throughput"
    elif device_info.peak_flops:
        mfu = ASSUMED_MFU[device_info.device.type]
        est, source = compute / (device_info.peak_flops * mfu * devices), f"assuming {mfu:.0%} MFU"
    else:
        est, source = float("nan"), "no peak known for this device"

    every = max(1, steps // 10)
    return Plan(
        model=asdict(gcfg), n_params=gcfg.num_params(), n_params_total=gcfg.num_params(total=True),
        n_tokens=n_tokens, tokens_per_param=n_tokens / gcfg.num_params(), flops_per_token=fpt,
        compute=float(compute), steps=steps, tokens_per_step=tokens_per_step, batch_seqs=batch_seqs,
        micro_batch=micro, accum_steps=accum, world_size=world_size, warmup_steps=warmup, lr=float(lr),
        min_lr=float(lr * t.min_lr_ratio), eval_every=t.eval_every or _eval_every(steps, time_budget),
        save_every=t.save_every or every,
        est_seconds=float(est), est_source=source, budget=budget, device=device_info.name,
        dtype=device_info.dtype, peak_flops=device_info.peak_flops, memory=memory, dtype_reason=device_info.dtype_reason,
        time_budget=time_budget,
        memory_available=device_info.memory_bytes, stream_tokens=n_tokens + seq + 1,
        optimizer=("adamw" if t.optimizer == "adamw" else
                   f"muon (lr x{t.muon_lr_ratio:g}) for the blocks' matrices, adamw for the rest"),
        schedule=("cosine" if t.schedule == "cosine" else
                  f"wsd: constant, then the last {t.decay_frac:.0%} decay {t.decay_shape}"),
    )


# Settings that may change between the plan and a resume without changing the run.
HARMLESS = ("train.eval_every", "train.save_every", "train.save_at", "train.log_every", "train.keep_checkpoints", "train.resume",
            "train.eval_tokens", "train.num_threads", "train.compile", "train.device", "wandb", "sample", "plan",
            "run_dir", "budget.probe_seconds", "data.cache_dir", "extra", "train.max_bad_steps", "train.on_bad_steps",
            "train.rollback_lr_scale", "train.max_rollbacks", "train.spike_sigmas", "train.inject_nan_loss",
            "train.inject_inf_grad", "train.peak_flops", "train.report", "train.parallel",
            "sweep")  # the sweep's own settings never change a run


def _strip_harmless(container: dict, ignore=HARMLESS) -> dict:
    out = json.loads(json.dumps(container))
    for key in ignore:
        node, *rest = key.split(".")
        if not rest:
            out.pop(node, None)
        elif isinstance(out.get(node), dict):
            out[node].pop(rest[0], None)
    return out


def config_changes(old: dict, new: dict, ignore=HARMLESS) -> list[str]:
    """Dotted names of the fields that differ, ignoring the harmless ones by default."""
    a, b = _strip_harmless(old, ignore), _strip_harmless(new, ignore)
    changed = []
    for group in sorted(set(a) | set(b)):
        x, y = a.get(group), b.get(group)
        if isinstance(x, dict) and isinstance(y, dict):
            changed += [f"{group}.{k}" for k in sorted(set(x) | set(y)) if x.get(k) != y.get(k)]
        elif x != y:
            changed.append(group)
    return changed


def plan_for_run(cfg: DictConfig, device: hardware.DeviceInfo, info: dist.DistInfo, run_dir: Path,
                 resume_state: Optional[dict]) -> Plan:
    """Reuse the plan saved in run_dir when the config is the same (a rerun, a resume,
    a budget.minutes run that must not re-probe); otherwise plan afresh on rank 0."""
    current = OmegaConf.to_container(cfg, resolve=True)
    saved_cfg = run_dir / "config.yaml"
    saved_plan = run_dir / "plan.json"
    if resume_state is not None:
        changed = config_changes(resume_state["config"], current)
        extend = changed == ["train.steps"]
        if changed and not extend:
            raise ConfigError(f"run_dir {run_dir} holds a run with a different {', '.join(changed)}; resuming would "
                              "mix two runs. Restore those settings, or use a new run_dir.")
        harmless = [c for c in config_changes(resume_state["config"], current, ignore=("run_dir",)) if c not in changed]
        if harmless and info.is_main:
            print(f"resuming with changed {', '.join(harmless)} (harmless: the run's data, model and schedule are unchanged)")
        plan = Plan(**resume_state["plan"])
        if extend:
            if cfg.train.steps is None:  # the budget would re-derive a different run
                old_steps = resume_state["config"]["train"]["steps"]
                raise ConfigError(f"run_dir {run_dir} holds a run of train.steps={old_steps}; resume it with "
                                  f"train.steps={old_steps} (or more, to extend it), or use a new run_dir.")
            if cfg.train.steps < resume_state["step"]:
                raise ConfigError(f"train.steps={cfg.train.steps} is below the {resume_state['step']} steps already done.")
            print(f"extending the run from {plan.steps} to {cfg.train.steps} steps; the LR schedule is "
                  "stretched to the new end and the data stream keeps its length (more epochs).")
            plan.steps, plan.n_tokens = int(cfg.train.steps), int(cfg.train.steps) * plan.tokens_per_step
            plan.compute = float(plan.n_tokens * plan.flops_per_token)
        return plan
    plan = None
    if info.is_main and saved_plan.exists() and saved_cfg.exists():
        old = OmegaConf.to_container(OmegaConf.load(saved_cfg), resolve=True)
        if not config_changes(old, current):
            plan = Plan(**json.loads(saved_plan.read_text()))
            plan.warnings = []
    error = None
    if info.is_main and plan is None:
        try:
            plan = make_plan(cfg, device, world_size=info.world_size, measure_flops=_probe(cfg),
                             measure_dtypes=_dtype_probe, startup_seconds=process_age())
        except ConfigError as err:
            error = str(err)
    error = dist.broadcast_object(error)
    if error:
        raise ConfigError(error)
    return dist.broadcast_object(plan)


def save_plan(run_dir: Path, cfg: DictConfig, plan: Plan) -> None:
    """Write plan.json and the resolved config.yaml that produced it into run_dir."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    from picollm.files import write_atomic  # a kill mid-write never leaves a torn plan for the rerun

    write_atomic(run_dir / "config.yaml", to_yaml(cfg))
    write_atomic(run_dir / "plan.json", json.dumps(plan.to_dict(), indent=2))


# CPU micro-steps of more tokens than this gained nothing in tokens/s, measured at 1 thread
# from the 2x128 speedrun model to the 6x384 reference shape, and 16k-token ones lost 15-50%
# (a (tokens x vocab) logits block far beyond the caches): /tmp/bench notes in BENCHMARKS.md.
CPU_MICRO_TOKENS = 4096


def _micro_batch(t: DictConfig, gcfg: GPTConfig, per_rank: int, device_info, shards: int = 1) -> tuple[int, dict]:
    """The requested micro-batch, or the largest power of two dividing the per-process
    batch that fits in 85% of the device's memory (CPU: at most CPU_MICRO_TOKENS tokens
    per micro-step, so 16 sequences of 256 and 32 of 128)."""
    limit = 0.85 * device_info.memory_bytes
    mem = lambda b: estimate_memory(gcfg, b, device_info.dtype, t.activation_checkpointing, shards)
    if t.micro_batch is not None:
        if t.micro_batch < 1 or per_rank % t.micro_batch:
            raise ConfigError(f"train.micro_batch={t.micro_batch} does not divide the {per_rank} sequences each process "
                              "takes per step; pick a divisor or change train.batch_tokens.")
        if mem(t.micro_batch)["total"] > limit:
            raise ConfigError(f"train.micro_batch={t.micro_batch} needs ~{_gib(mem(t.micro_batch)['total'])} but only "
                              f"{_gib(device_info.memory_bytes)} is available; lower it or set train.activation_checkpointing=true.")
        return t.micro_batch, mem(t.micro_batch)
    cap = 64 if device_info.is_cuda else max(1, CPU_MICRO_TOKENS // gcfg.seq_len)
    b = 1
    while b * 2 <= min(per_rank, cap) and per_rank % (b * 2) == 0:
        b *= 2
    while b > 1 and mem(b)["total"] > limit:
        b //= 2
    if mem(b)["total"] > limit:
        raise ConfigError(f"the model needs ~{_gib(mem(b)['total'])} even at micro-batch 1 but only "
                          f"{_gib(device_info.memory_bytes)} is available; use a smaller model or seq_len, "
                          "or train.activation_checkpointing=true.")
    return b, mem(b)


def _global_batch(t: DictConfig, compute: float, n_tokens: float, seq: int, world_size: int,
                  minutes: bool = False) -> int:
    """Global batch in sequences: train.batch_tokens, or the compute rule halved while the
    run would have fewer than MIN_STEPS steps (budget.minutes: MINUTES_MIN_STEPS, down to
    MINUTES_MIN_BATCH_TOKENS)."""
    min_steps = MINUTES_MIN_STEPS if minutes else MIN_STEPS
    min_seqs = max(world_size, math.ceil(MINUTES_MIN_BATCH_TOKENS / seq) if minutes else 1)
    if t.batch_tokens is not None:
        if t.batch_tokens % seq:
            raise ConfigError(f"train.batch_tokens={t.batch_tokens} is not a multiple of model.seq_len={seq}; "
                              f"use a multiple such as {max(1, round(t.batch_tokens / seq)) * seq}.")
        batch_seqs = t.batch_tokens // seq
    else:
        batch_seqs = _pow2(max(1.0, 0.292 * compute ** 0.3271 / seq))
        if t.steps is None:
            while batch_seqs > min_seqs and n_tokens / (batch_seqs * seq) < min_steps:
                batch_seqs //= 2
        batch_seqs = max(batch_seqs, world_size)
        batch_seqs += (-batch_seqs) % world_size
    if batch_seqs % world_size:
        raise ConfigError(f"global batch of {batch_seqs} sequences is not divisible by the world size {world_size}; "
                          f"set train.batch_tokens to a multiple of {world_size * seq}.")
    return batch_seqs


def _probe_micro(t: DictConfig, gcfg: GPTConfig, compute: float, world_size: int, device_info) -> int:
    """The micro-batch training would use at this shape and compute, for the probes."""
    n_tokens = compute / gcfg.flops_per_token()
    batch = _global_batch(t, compute, n_tokens, gcfg.seq_len, world_size, minutes=True)
    shards = world_size if t.parallel == "fsdp" else 1
    return _micro_batch(t, gcfg, batch // world_size, device_info, shards)[0]


def _settle_dtype(device_info, gcfg: GPTConfig, micro: int, measure_dtypes: Optional[Callable],
                  probe_seconds: dict, clock: Callable[[], float]):
    """train.dtype=auto on CPU: time a training step in each dtype on this shape and
    micro-batch and train in the faster (without a probe, the CPU-flag guess stands).
    Either way the peak of the chosen dtype becomes the MFU yardstick."""
    if not device_info.dtype_pending:
        return device_info
    start = clock()
    if measure_dtypes is None:
        settled = hardware.with_dtype(device_info, device_info.dtype, device_info.dtype_reason)
    else:
        timed = measure_dtypes(gcfg, micro, device_info)
        dtype, why = hardware.pick_faster_dtype(timed["step_seconds"], timed["seconds"])
        settled = hardware.with_dtype(device_info, dtype, why)
    probe_seconds["dtype"] += clock() - start
    return settled


def _time_budget(seconds: float, startup: float, probes: dict, gcfg: GPTConfig, rate: float, t: DictConfig) -> dict:
    """budget.minutes is the whole training process's wall clock: take out what was spent
    before and during planning (measured) and what evaluations, checkpoints and the end of
    the run will spend (planned at the measured rate); the rest is training."""
    one_eval_s = t.eval_tokens * gcfg.flops_per_token() / 3 / rate  # forward only: 1/3 of a step's FLOPs
    if t.eval_every is None:  # as many as EVAL_SHARE of the budget pays for: at least the first and the last
        evals = int(min(EVALS_PER_RUN, max(2, EVAL_SHARE * seconds // one_eval_s)))
    else:  # an explicit interval: as many as the steps allow, estimated from the rate
        steps_guess = max(1.0, seconds * rate / gcfg.flops_per_token() / (t.batch_tokens or 2**16))
        evals = int(2 + steps_guess // t.eval_every)
    eval_s = evals * one_eval_s
    saves = 11 if t.save_every is None else 1 + seconds / 60  # one a minute at most, as a bound
    save_s = saves * 16 * gcfg.num_params(total=True) / CHECKPOINT_BYTES_PER_S
    parts = {"budget_s": seconds, "evals": evals, "startup_s": startup, "dtype_probe_s": probes["dtype"],
             "throughput_probe_s": probes["throughput"], "evals_s": eval_s + save_s,
             "finish_s": (REPORT_SECONDS if t.report else 0.0) + save_s / saves}  # + the exported weights
    spent = sum(v for k, v in parts.items() if k.endswith("_s") and k != "budget_s")
    if spent >= 0.9 * seconds:
        raise ConfigError(f"budget.minutes={seconds / 60:g} leaves no time to train: {_overheads(parts)} take "
                          f"~{spent:.0f} s; raise budget.minutes, or lower budget.probe_seconds or train.eval_tokens.")
    parts["train_s"] = seconds - spent
    return parts


def _eval_every(steps: int, time_budget: Optional[dict]) -> int:
    """About ten evaluations per run; a budget.minutes run, the number its time budget planned
    (the first and the last are always there)."""
    if time_budget is None:
        return max(1, steps // 10)
    return max(1, math.ceil(steps / max(1, time_budget["evals"] - 1)))  # never one more than planned


def _overheads(tb: dict) -> str:
    return (f"start-up {tb['startup_s']:.0f} s + dtype probe {tb['dtype_probe_s']:.1f} s"
            f" + throughput probe {tb['throughput_probe_s']:.1f} s + {tb['evals']} evals/checkpoints ~{tb['evals_s']:.0f} s"
            f" + export/report ~{tb['finish_s']:.0f} s")


def _time_budget_line(tb: dict) -> str:
    return f"{_duration(tb['budget_s'])} = {_overheads(tb)} + training {_duration(tb['train_s'])}"


def process_age() -> float:
    """Seconds since this process started (interpreter and imports included): the start-up
    a budget.minutes run has already spent when it plans. Counted only in a picollm command
    (python -m picollm.X, torchrun -m ...): a library caller's age (a test session, a
    notebook) says nothing about a run. 0 where /proc is missing."""
    main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if not (main_spec and main_spec.name.startswith("picollm.")):
        return 0.0
    try:
        with open("/proc/self/stat") as f:
            start_ticks = float(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def _pow2(x: float) -> int:
    return 2 ** max(0, int(round(math.log2(x))))


def _si(x: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def _gib(x: float) -> str:
    return f"{x / 2**30:.2f} GiB" if x >= 2**28 else f"{x / 2**20:.0f} MiB"


def _duration(s: float) -> str:
    if not math.isfinite(s):
        return "unknown"
    return f"{s / 3600:.1f} h" if s >= 5400 else f"{s / 60:.1f} min" if s >= 90 else f"{s:.0f} s"


def _probe(cfg: DictConfig) -> Callable:
    from picollm.throughput import measure_train_flops

    return lambda gcfg, micro, device: measure_train_flops(gcfg, micro, device, cfg.budget.probe_seconds,
                                                           optimizer=cfg.train.optimizer)


def _dtype_probe(gcfg: GPTConfig, micro: int, device) -> dict:
    from picollm.throughput import time_dtypes

    return time_dtypes(gcfg, micro, device, hardware.CPU_DTYPES)


def _planner_device(cfg: DictConfig, measure: bool = True):
    """The device as the planner sees it: CPU auto dtype left to the plan's measurement."""
    return hardware.describe(cfg.train.device, cfg.train.dtype, measure=measure, peak_flops=cfg.train.peak_flops,
                             decide_dtype_later=True)


# ---------------------------------------------------------------- calculator views
# python -m picollm.plan plan.view=compute|time|params|inference: pure arithmetic on the
# scaling laws (scaling.py); only plan.view=time without plan.gpu probes this machine.

VIEWS = ("card", "compute", "time", "params", "inference")


def _law(cfg: DictConfig):
    """(label, law) of plan.law: a named law or a sweep's summary.json."""
    from picollm.scaling import load_law

    try:
        return load_law(cfg.plan.law)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _gpu_peak(name: str) -> float:
    from picollm.scaling import GPU_PEAK_FLOPS

    if name not in GPU_PEAK_FLOPS:
        raise ConfigError(f"plan.gpu={name!r} is unknown; use one of {', '.join(GPU_PEAK_FLOPS)}.")
    return GPU_PEAK_FLOPS[name]


def _need(value, name: str, example: str):
    if value is None:
        raise ConfigError(f"{name} is not set; this view needs it, e.g. {example}.")
    if not value > 0:
        raise ConfigError(f"{name}={value} must be positive.")
    return float(value)


def _gpu_time(cfg: DictConfig, compute: float) -> dict:
    """Seconds and cost of `compute` FLOPs on the named GPU(s), when one is named."""
    from picollm.scaling import compute_for_time, cost

    p = cfg.plan
    if p.gpu is None:
        return {}
    peak = _gpu_peak(p.gpu)
    per_second = compute_for_time(1.0, peak, p.mfu, p.n_gpus)  # validates mfu and n_gpus
    seconds = compute / per_second
    out = {"gpu": p.gpu, "n_gpus": p.n_gpus, "mfu": p.mfu, "seconds": seconds}
    if p.price_per_hour is not None:
        out["cost"] = cost(seconds, p.price_per_hour, p.n_gpus)
    return out


def compute_view(cfg: DictConfig, compute: Optional[float] = None) -> dict:
    """Chinchilla-20 vs the named law's optimum vs Kaplan at one compute budget."""
    from picollm.scaling import compare_allocations

    c = compute if compute is not None else _need(cfg.budget.compute, "budget.compute", "budget.compute=1e18")
    label, law = _law(cfg)
    return {"view": "compute", "compute": c, "law": label, "rows": compare_allocations(c, law, label)}


def time_view(cfg: DictConfig, measure_flops: Optional[Callable] = None) -> dict:
    """Compute from wall time on a named GPU (or this machine, probed), then the compute view."""
    from picollm.scaling import compute_for_time, cost

    p = cfg.plan
    if p.gpu is not None:
        hours = _need(p.hours, "plan.hours", "plan.hours=24")
        seconds = hours * 3600
        c = compute_for_time(seconds, _gpu_peak(p.gpu), p.mfu, p.n_gpus)
        source = {"gpu": p.gpu, "n_gpus": p.n_gpus, "mfu": p.mfu, "peak_flops": _gpu_peak(p.gpu)}
    else:  # this machine: the plan's throughput probe, as budget.minutes does
        minutes = p.hours * 60 if p.hours is not None else cfg.budget.minutes
        minutes = _need(minutes, "plan.hours (or budget.minutes)", "plan.hours=1, or plan.gpu=h100-sxm plan.hours=24")
        c2 = OmegaConf.create(OmegaConf.to_container(cfg))  # a writable copy
        c2.budget.minutes = minutes
        plan = make_plan(c2, _planner_device(cfg, measure=measure_flops is None), measure_flops=measure_flops or _probe(c2),
                         measure_dtypes=None if measure_flops else _dtype_probe)
        rate = plan.compute / plan.est_seconds
        seconds = minutes * 60
        hours, c = seconds / 3600, rate * seconds
        source = {"machine": plan.device, "measured_flops": rate}
    out = compute_view(cfg, c)
    out.update(view="time", hours=hours, **source)
    if p.price_per_hour is not None:
        out["cost"] = cost(seconds, p.price_per_hour, p.n_gpus)
    return out


def params_view(cfg: DictConfig) -> dict:
    """D = r N and C = 6 N D for a parameter count, with GPU time and cost when a GPU is named."""
    n = _need(cfg.budget.params, "budget.params", "budget.params=1e9")
    r = cfg.budget.tokens_per_param
    d = r * n
    return {"view": "params", "n_params": n, "tokens_per_param": r, "n_tokens": d, "compute": 6 * n * d,
            **_gpu_time(cfg, 6 * n * d)}


def inference_view(cfg: DictConfig) -> dict:
    """Compute-optimal vs inference-optimal sizing for a loss and a lifetime of served tokens."""
    from picollm.scaling import inference_optimal

    law, p = _law(cfg)[1], cfg.plan
    tokens = p.inference_tokens
    if tokens is None or tokens < 0:
        raise ConfigError("plan.inference_tokens must be set to the tokens served (>= 0), e.g. plan.inference_tokens=1e12.")
    if p.target_loss is not None and cfg.budget.compute is not None:
        raise ConfigError("plan.target_loss and budget.compute both set the loss target; set only one.")
    if p.target_loss is not None:
        loss = float(p.target_loss)
    elif cfg.budget.compute is not None:
        loss = law.optimal_loss(_need(cfg.budget.compute, "budget.compute", "budget.compute=1e21"))
    else:
        raise ConfigError("the inference view needs a target: plan.target_loss=L or budget.compute=C "
                          "(the loss of the compute-optimal model at C).")
    try:
        rows = []
        for rule, served in (("compute-optimal", 0.0), ("inference-optimal", float(tokens))):
            n, d = inference_optimal(law, loss, served)
            rows.append({"rule": rule, "n_params": n, "n_tokens": d, "tokens_per_param": d / n,
                         "train_compute": 6 * n * d, "lifetime_compute": 6 * n * d + 2 * n * tokens})
    except ValueError as err:
        raise ConfigError(str(err)) from None
    saved = 1 - rows[1]["lifetime_compute"] / rows[0]["lifetime_compute"]
    return {"view": "inference", "law": p.law, "target_loss": loss, "inference_tokens": float(tokens),
            "rows": rows, "lifetime_savings": saved}


def calculator(cfg: DictConfig, measure_flops: Optional[Callable] = None) -> dict:
    """The result of plan.view (any view but card) as a dict."""
    view = cfg.plan.view
    if view == "compute":
        return compute_view(cfg)
    if view == "time":
        return time_view(cfg, measure_flops)
    if view == "params":
        return params_view(cfg)
    if view == "inference":
        return inference_view(cfg)
    raise ConfigError(f"plan.view={view!r} is unknown; use one of {', '.join(VIEWS)}.")


def _table(rows: list[dict], cols: list[tuple[str, str, Callable]]) -> list[str]:
    cells = [[head for head, _, _ in cols]] + [[fmt(r[key]) for _, key, fmt in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]


def format_view(res: dict) -> str:
    """A readable rendering of a calculator result."""
    v, lines = res["view"], []
    money = lambda x: f"{x:,.2f}"
    if v in ("compute", "time"):
        if v == "time":
            where = (f"{res['n_gpus']} x {res['gpu']} at {res['mfu']:.0%} MFU" if "gpu" in res
                     else f"{res['machine']} at a measured {res['measured_flops'] / 1e9:.3g} GFLOP/s")
            lines.append(f"{res['hours']:g} h on {where} -> C = {res['compute']:.3e} FLOPs"
                         + (f", cost {money(res['cost'])}" if "cost" in res else ""))
        lines.append(f"compute C = {res['compute']:.3e} FLOPs; losses predicted by the {res['law']} law")
        lines += _table(res["rows"], [("rule", "rule", str), ("N", "n_params", _si), ("D", "n_tokens", _si),
                                      ("D/N", "tokens_per_param", lambda x: f"{x:.1f}"),
                                      ("loss", "loss", lambda x: f"{x:.4f}")])
    elif v == "params":
        lines.append(f"N = {_si(res['n_params'])}  D = {res['tokens_per_param']:g} N = {_si(res['n_tokens'])}  "
                     f"C = 6ND = {res['compute']:.3e} FLOPs")
        if "gpu" in res:
            lines.append(f"time on {res['n_gpus']} x {res['gpu']} at {res['mfu']:.0%} MFU: {_duration(res['seconds'])}"
                         + (f", cost {money(res['cost'])}" if "cost" in res else ""))
    elif v == "inference":
        lines.append(f"target loss {res['target_loss']:.4f} ({res['law']} law), serving {res['inference_tokens']:.3g} tokens")
        lines += _table(res["rows"], [("rule", "rule", str), ("N", "n_params", _si), ("D", "n_tokens", _si),
                                      ("D/N", "tokens_per_param", lambda x: f"{x:.1f}"),
                                      ("train C", "train_compute", lambda x: f"{x:.3e}"),
                                      ("lifetime C", "lifetime_compute", lambda x: f"{x:.3e}")])
        lines.append(f"lifetime compute saved by the inference-optimal model: {res['lifetime_savings']:.1%}")
    return "\n".join(lines)


def plan_from_config(cfg: DictConfig) -> Plan:
    """The plan a single-process command works from: the run's own (reused or recorded
    in run_dir) when run_dir is set, else a fresh one, probing for budget.minutes."""
    device = _planner_device(cfg)
    if not cfg.run_dir:
        return make_plan(cfg, device, measure_flops=_probe(cfg), measure_dtypes=_dtype_probe,
                         startup_seconds=process_age())
    plan = plan_for_run(cfg, device, dist.DistInfo(), Path(cfg.run_dir), None)
    save_plan(Path(cfg.run_dir), cfg, plan)
    return plan


def main(argv: Optional[list] = None) -> None:
    overrides = parse_cli(sys.argv[1:] if argv is None else argv,
                          "usage: python -m picollm.plan [overrides...]  (plan.format=json for JSON only)")
    try:
        cfg = load_config(overrides)
        if cfg.plan.view != "card":  # a calculator view: arithmetic, no run plan
            res = calculator(cfg)
            print(json.dumps(res, indent=2) if cfg.plan.format == "json" else format_view(res))
            return
        plan = plan_from_config(cfg)
    except (ConfigError, ValueError) as err:
        raise SystemExit(f"error: {err}")
    if cfg.plan.format == "json":
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print(plan.card())


if __name__ == "__main__":
    main()
