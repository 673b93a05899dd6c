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
  optimal hyperparameter fits of DeepSeek LLM, Bi et al. 2024), LR capped at 1e-2; batch
  rounded to a power of two in sequences and halved while the run would have < 50 steps.
- Warmup: warmup_frac of the steps. Cosine decay to min_lr_ratio * peak at the last step.
make_plan runs these as named steps (docs/conventions.md, "The plan's derivations"). The
scaling-law arithmetic for other budgets (compute, time, params, inference views) is the
calculator's: python -m picollm.calculator.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

from omegaconf import DictConfig, OmegaConf

from picollm import cli, dist, hardware

from picollm.config import ConfigError, to_yaml
from picollm.model import GPTConfig
from picollm.scaling import chinchilla_optimal
from picollm.tokenizer import vocab_size_problem
from picollm.units import binary_size, rough_duration, si

# n_vocab of tiktoken's named encodings, so planning never needs their files.
NAMED_VOCABS = {"gpt2": 50257, "r50k_base": 50257, "p50k_base": 50281, "cl100k_base": 100277,
                "o200k_base": 200019}
# The global batch and the peak LR follow the compute-optimal hyperparameter fits of DeepSeek
# LLM (Bi et al. 2024, arXiv:2401.02954, §3.1), power laws in the compute budget C in FLOPs:
#   B_opt = 0.2920 · C^0.3271 tokens        eta_opt = 0.3118 · C^−0.1250
DEEPSEEK_BATCH_COEF, DEEPSEEK_BATCH_EXP = 0.292, 0.3271
DEEPSEEK_LR_COEF, DEEPSEEK_LR_EXP = 0.3118, -0.125
# Below ~9e11 FLOPs the LR fit, extrapolated far below the compute DeepSeek measured, passes
# 1e-2 and keeps rising. Measured on CPU (BENCHMARKS.md, "The planner's LR cap"): from 2.4e12
# to 2e13 FLOPs the optimum was 6e-3 to 1.2e-2, where the fit itself lands (6.8e-3 to 8.9e-3),
# and at 1e12 it was 1.2e-2. The old cap of 3e-3 cost 1.7-2.4% of loss at 1-5 CPU minutes,
# and 3.1-4.6% at 1e12.
LR_CAP = 1e-2
MIN_STEPS = 50
ASSUMED_MFU = {"cuda": 0.35, "cpu": 0.3}  # for the wall-clock estimate when nothing was measured
UNMEASURED_PEAK = {"cuda": 1e14, "cpu": 1e11}  # the first guess of budget.minutes when no peak is known yet
# budget.minutes: what besides the training steps the run spends inside its wall clock.
EVALS_PER_RUN = 12  # at step 0, ~10 on the default interval (steps // 10), and the final one
EVAL_SHARE = 0.05  # of budget.minutes the default evaluation interval may spend (fewer evals when short)
# ... and when even the first and the last would spend more, fewer tokens each, down to this
# (two evaluations of train.eval_tokens took 19 s of a 1-minute run on the AVX2 EPYC).
EVAL_MIN_TOKENS = 32_768
CHECKPOINT_BYTES_PER_S = 200e6  # fp32 weights + AdamW state to disk, a conservative local-disk rate
REPORT_SECONDS = 5.0  # report.md with samples after the last step (train.report), planned


def vocab_size_for(tok: DictConfig) -> int:
    if tok.name == "bpe":
        problem = vocab_size_problem(tok.vocab_size)
        if problem:
            raise ConfigError(problem)
        return int(tok.vocab_size)
    if tok.name not in NAMED_VOCABS:
        raise ConfigError(f"tokenizer.name={tok.name!r} is unknown; use bpe or one of {', '.join(NAMED_VOCABS)}.")
    return NAMED_VOCABS[tok.name]


def shape_kwargs(m: DictConfig, vocab_size: int) -> dict:
    """The GPTConfig arguments the model group gives every shape; only the size varies."""
    return dict(seq_len=m.seq_len, vocab_size=vocab_size, arch=m.arch, mlp_hidden=m.mlp_hidden,
                qk_norm=m.qk_norm, rope_theta=m.rope_theta)


def model_config(m: DictConfig, vocab_size: int, depth: Optional[int] = None) -> GPTConfig:
    """GPTConfig from the model group: explicit n_layer/d_model, or one depth knob."""
    common = shape_kwargs(m, vocab_size)
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
# batch) scored 5.241, with 424 steps of a 4x smaller batch 4.857. At equal tokens more
# steps kept winning at 10 minutes too (BENCHMARKS.md, "Time to loss"), but a micro-batch of
# 1k tokens trains at half the tokens/s of 4k here, so a larger minimum needs an equal-time
# measurement first. Measurements, not laws.
MINUTES_MIN_DEPTH = 2
MINUTES_MIN_HEADS = 2
MINUTES_MIN_STEPS = 400  # budget.minutes halves the batch while the run has fewer steps,
MINUTES_MIN_BATCH_TOKENS = 1024  # but not below the smallest batch measured (4 x 256)
# ...and on a CPU never accumulates: the global batch is at most one micro-step per process.
# Accumulation buys no tokens/s once a micro-step fills the cores, and at equal time (10
# minutes, 2 x 128, one thread) a 4k-token batch scored 3.283 against the compute rule's 8k
# at 3.369 (BENCHMARKS.md, "Time to loss").


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


@dataclass(frozen=True)
class Plan:
    """Everything a run trains by. Made once and never changed: ``plan_for_run`` drafts it
    before any data work (a fresh ``make_plan``, or the plan a rerun or resume recorded),
    ``final_plan`` completes it from the data and the process group."""
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
    data_dir: Optional[str] = None  # the prepared data the run trains on (evaluation reads it from here)
    data_key: Optional[str] = None  # what identifies that data: its meta.json key (settings + tokenizer)

    def to_dict(self) -> dict:
        return asdict(self)

    def gpt_config(self) -> GPTConfig:
        return GPTConfig(**self.model)

    def card(self) -> str:
        g = self.model
        mem = self.memory
        lines = [
            "── picollm run plan " + "─" * 44,
            f"budget       {self.budget}",
            f"model        {g['arch']}  n_layer={g['n_layer']} d_model={g['d_model']} n_head={g['n_head']} "
            f"seq_len={g['seq_len']} vocab={g['vocab_size']}",
            f"params       N={si(self.n_params)} (matmul weights incl. LM head), total {si(self.n_params_total)}",
            f"tokens       D={si(self.n_tokens)}  D/N={self.tokens_per_param:.1f}",
            f"compute      C={self.compute:.3e} FLOPs  ({si(self.flops_per_token)} FLOPs/token)",
            f"batch        {si(self.tokens_per_step)} tokens/step = {self.batch_seqs} seqs "
            f"= {self.world_size} proc x {self.micro_batch} micro x {self.accum_steps} accum",
            f"schedule     {self.steps} steps, warmup {self.warmup_steps}, lr {self.lr:.2e} -> {self.min_lr:.2e} ({self.schedule})",
            f"device       {self.device}, {self.dtype}, peak "
            + (f"{self.peak_flops / 1e12:.3g} TFLOP/s" if self.peak_flops else "unknown"),
            f"optimizer    {self.optimizer}",
            *([f"dtype        {self.dtype_reason}"] if self.dtype_reason else []),
            f"time         ~{rough_duration(self.est_seconds)} ({self.est_source})",
            *([f"wall clock   {_time_budget_line(self.time_budget)}"] if self.time_budget else []),
            f"memory       ~{binary_size(mem['total'])} peak (weights {binary_size(mem['weights'])}, grads {binary_size(mem['gradients'])}, "
            f"adam {binary_size(mem['optimizer'])}, activations {binary_size(mem['activations'])}) of {binary_size(self.memory_available)}",
            "data         " + (f"{si(self.data_tokens)} train tokens available, {self.epochs:.2f} epochs"
                               if self.epochs is not None else "not prepared yet (epochs known after prepare)"),
        ]
        lines += [f"warning      {w}" for w in self.warnings]
        return "\n".join(lines + ["─" * 64])


def make_plan(cfg: DictConfig, device_info, world_size: int = 1,
              measure_flops: Optional[Callable] = None, measure_dtypes: Optional[Callable] = None,
              startup_seconds: float = 0.0, clock: Callable[[], float] = time.perf_counter) -> Plan:
    """Resolve the budget into a full plan (docs/conventions.md, "The plan's derivations").

    ``measure_flops(gpt_cfg, micro_batch, device_info)`` returns achieved training FLOP/s
    on this machine in ``device_info.dtype``; budget.minutes needs it.
    ``measure_dtypes(gpt_cfg, micro_batch, device_info)`` returns ``{"step_seconds":
    {dtype: s}, "seconds": probe cost}``; it decides train.dtype=auto on CPU
    (``device_info.dtype_pending``), else the CPU-flag guess stands.
    ``startup_seconds``: what this process spent before planning, taken out of budget.minutes
    with the probes' own time (read from ``clock``)."""
    t = cfg.train
    vocab = vocab_size_for(cfg.tokenizer)
    kind = budget_kind(cfg.budget)
    probes = Probes(measure_flops, measure_dtypes, clock)
    # The model and the tokens D, by budget kind (budget.minutes also settles the dtype).
    if kind == "minutes":
        sizing, device_info = size_for_minutes(cfg, vocab, device_info, world_size, probes, startup_seconds)
    else:
        sizing = SIZE_BY_BUDGET[kind](cfg, vocab)
    gcfg = sizing.model
    fpt, seq = gcfg.flops_per_token(), gcfg.seq_len
    # The global batch, then D and C in whole steps of it: what the run will actually spend.
    minutes = kind == "minutes"
    batch_seqs = global_batch(t, fpt * sizing.n_tokens, sizing.n_tokens, seq, world_size, minutes=minutes,
                              max_seqs=minutes_batch_cap(device_info, seq, world_size) if minutes else None)
    tokens_per_step = batch_seqs * seq
    steps = step_count(t, sizing.n_tokens, tokens_per_step)
    n_tokens = steps * tokens_per_step
    compute = fpt * n_tokens
    shards = world_size if t.parallel == "fsdp" else 1
    device_info, micro, memory = settle_micro_batch(t, gcfg, batch_seqs // world_size, device_info, shards, probes)
    # The LR schedule: the peak from C, the warmup, the decay (schedule_label; optim.lr_at).
    lr = peak_lr(t, compute)
    warmup = warmup_steps(t, steps)
    est, source = estimate_seconds(compute, sizing.measured_rate, device_info, _devices(device_info, world_size))
    return Plan(
        model=asdict(gcfg), n_params=gcfg.num_params(), n_params_total=gcfg.num_params(total=True),
        n_tokens=n_tokens, tokens_per_param=n_tokens / gcfg.num_params(), flops_per_token=fpt,
        compute=float(compute), steps=steps, tokens_per_step=tokens_per_step, batch_seqs=batch_seqs,
        micro_batch=micro, accum_steps=batch_seqs // (world_size * micro), world_size=world_size,
        warmup_steps=warmup, lr=float(lr), min_lr=float(lr * t.min_lr_ratio),
        eval_every=t.eval_every or _eval_every(steps, sizing.time_budget), save_every=t.save_every or max(1, steps // 10),
        est_seconds=float(est), est_source=source, budget=sizing.budget, device=device_info.name,
        dtype=device_info.dtype, peak_flops=device_info.peak_flops, memory=memory, dtype_reason=device_info.dtype_reason,
        time_budget=sizing.time_budget,
        memory_available=device_info.memory_bytes, stream_tokens=max(n_tokens + seq + 1, int(cfg.data.pool_tokens)),
        optimizer=optimizer_label(t), schedule=schedule_label(t),
    )


# The settings that define a run: a resume refuses a change to any of them (train.steps
# alone extends the run), and the default run_dir is a hash of them. A group named with
# None defines the run with every field; everything else (intervals, logging, retention,
# devices, wandb, debug, sweep, extra, ...) may change between sessions of one run, so a
# new setting is harmless unless it is added here. (data.workers and data.streaming do not
# change the tokens; they stay so that existing default run_dir hashes keep their value.)
DEFINING = {
    "model": None,
    "tokenizer": None,
    "data": ("source", "paths", "format", "text_field", "hf_name", "hf_config", "hf_split", "streaming",
             "val_fraction", "val_tokens", "max_docs", "workers", "pool_tokens"),
    "budget": ("compute", "params", "tokens", "minutes", "tokens_per_param"),
    "train": ("steps", "batch_tokens", "micro_batch", "lr", "min_lr_ratio", "schedule", "decay_frac", "decay_shape",
              "warmup_steps", "warmup_frac", "weight_decay", "beta1", "beta2", "grad_clip", "dtype",
              "activation_checkpointing", "optimizer", "muon_lr_ratio", "seed"),
}


def defining_settings(config: dict) -> dict:
    """The part of a resolved config (a plain dict) that defines the run (a copy)."""
    out = {}
    for group, names in DEFINING.items():
        node = config.get(group)
        if isinstance(node, dict):
            out[group] = {k: v for k, v in node.items() if names is None or k in names}
    if "data" in out:  # a run saved before data.pool_tokens existed read exactly its first D tokens
        out["data"].setdefault("pool_tokens", 0)
    return json.loads(json.dumps(out))


def _differences(a: dict, b: dict) -> list[str]:
    """Dotted names (group.field, or a top-level key) of what differs between two config dicts."""
    changed = []
    for group in sorted(set(a) | set(b)):
        x, y = a.get(group), b.get(group)
        if isinstance(x, dict) and isinstance(y, dict):
            changed += [f"{group}.{k}" for k in sorted(set(x) | set(y)) if x.get(k) != y.get(k)]
        elif x != y:
            changed.append(group)
    return changed


def config_changes(old: dict, new: dict) -> list[str]:
    """Dotted names of the run-defining fields that differ between two resolved configs."""
    return _differences(defining_settings(old), defining_settings(new))


def plan_for_run(cfg: DictConfig, device: hardware.DeviceInfo, rank_info: dist.DistInfo, run_dir: Path,
                 resume_state: Optional[dict]) -> Plan:
    """The draft plan, made before any data work so that every refusal comes first: the
    plan the resumed checkpoint recorded (if this config may continue it), the plan a rerun
    of the same config saved in run_dir (a budget.minutes run must not re-probe), or a
    fresh one made on rank 0. ``final_plan`` completes it."""
    if resume_state is not None:
        draft = _resumed_plan(cfg, run_dir, resume_state, rank_info.is_main)
    else:
        draft = dist.from_main(lambda: _saved_plan(cfg, run_dir) or make_plan(
            cfg, device, world_size=rank_info.world_size, measure_flops=throughput_probe(cfg), measure_dtypes=dtype_probe,
            startup_seconds=process_age()), catch=(ConfigError,), raise_as=ConfigError)
    accumulation(draft, rank_info.world_size)  # refuses a world size that cannot split the batch, before data work
    return draft


def _saved_plan(cfg: DictConfig, run_dir: Path) -> Optional[Plan]:
    """The plan saved in run_dir by a run of the same (defining) config, else None."""
    saved_cfg, saved_plan = run_dir / "config.yaml", run_dir / "plan.json"
    if not (saved_plan.exists() and saved_cfg.exists()):
        return None
    old = OmegaConf.to_container(OmegaConf.load(saved_cfg), resolve=True)
    if config_changes(old, OmegaConf.to_container(cfg, resolve=True)):
        return None
    return replace(Plan(**json.loads(saved_plan.read_text())), warnings=[])  # final_plan finds them again


def _resumed_plan(cfg: DictConfig, run_dir: Path, state: dict, say: bool) -> Plan:
    """The plan the checkpoint recorded, when this config may continue it: no defining
    field changed, or train.steps alone (an extension, applied by final_plan)."""
    current = OmegaConf.to_container(cfg, resolve=True)
    changed = config_changes(state["config"], current)
    if changed and changed != ["train.steps"]:
        raise ConfigError(f"run_dir {run_dir} holds a run with a different {', '.join(changed)}; resuming would "
                          "mix two runs. Restore those settings, or use a new run_dir.")
    if changed:
        old_steps = state["config"]["train"]["steps"]
        if cfg.train.steps is None:  # the budget would re-derive a different run
            raise ConfigError(f"run_dir {run_dir} holds a run of train.steps={old_steps}; resume it with "
                              f"train.steps={old_steps} (or more, to extend it), or use a new run_dir.")
        if cfg.train.steps < state["step"]:
            raise ConfigError(f"train.steps={cfg.train.steps} is below the {state['step']} steps already done.")
    harmless = [c for c in _differences(state["config"], current) if c not in changed and c != "run_dir"]
    if harmless and say:
        print(f"resuming with changed {', '.join(harmless)} (harmless: the run's data, model and schedule are unchanged)")
    return replace(Plan(**state["plan"]), warnings=[])  # final_plan finds them again


@dataclass(frozen=True)
class DataFacts:
    """What the plan takes from the prepared data, known only once it is prepared."""
    dir: str
    key: str  # meta.json's key: the settings and tokenizer that determine the tokens
    train_tokens: int
    corpus_exhausted: bool

    @classmethod
    def of(cls, data) -> "DataFacts":
        """From a picollm.data.prepare.PreparedData."""
        return cls(str(data.dir), str(data.meta.get("key", "")), int(data.n_train_tokens), bool(data.corpus_exhausted))


def final_plan(draft: Plan, data: DataFacts, world_size: int, steps: Optional[int]) -> Plan:
    """The plan the run trains by, made once from the draft and what only this session
    knows: ``steps`` (train.steps; a resumed run given a new number is extended: the LR
    schedule stretches to the new end, the data stream keeps its length, so more epochs),
    the accumulation split over ``world_size`` processes, and the prepared data."""
    changes = {**_extension(draft, steps), **accumulation(draft, world_size)}
    n_tokens = changes.get("n_tokens", draft.n_tokens)
    data_tokens = int(min(data.train_tokens, draft.stream_tokens))
    epochs = n_tokens / data_tokens if data.corpus_exhausted else min(1.0, n_tokens / data_tokens)
    return replace(draft, **changes, data_tokens=data_tokens, epochs=epochs, data_dir=data.dir, data_key=data.key,
                   warnings=list(draft.warnings) + _epoch_warnings(epochs))


def _extension(plan: Plan, steps: Optional[int]) -> dict:
    if steps is None or steps == plan.steps:
        return {}
    n_tokens = int(steps) * plan.tokens_per_step
    return {"steps": int(steps), "n_tokens": n_tokens, "compute": float(n_tokens * plan.flops_per_token)}


def accumulation(plan: Plan, world_size: int) -> dict:
    """``world_size`` and ``accum_steps`` for a run on ``world_size`` processes: the global
    batch and the sample order belong to the run, so only the accumulation split changes."""
    per_step = world_size * plan.micro_batch
    if plan.batch_seqs % per_step:
        raise ConfigError(f"this run's global batch of {plan.batch_seqs} sequences cannot be split over "
                          f"{world_size} processes x micro-batch {plan.micro_batch}; use a world size that divides "
                          f"{plan.batch_seqs // plan.micro_batch}.")
    return {"world_size": world_size, "accum_steps": plan.batch_seqs // per_step}


def _epoch_warnings(epochs: float) -> list[str]:
    if epochs <= 4:
        return []
    msg = (f"the run repeats its data {epochs:.1f} times (more than ~4 epochs stops helping, "
           "Muennighoff et al. 2023); use a larger corpus or a smaller budget.")
    warnings.warn(msg)
    return [msg]


def save_plan(run_dir: Path, cfg: DictConfig, plan: Plan) -> None:
    """Write plan.json and the resolved config.yaml that produced it into run_dir."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    from picollm.files import write_atomic  # a kill mid-write never leaves a torn plan for the rerun

    write_atomic(run_dir / "config.yaml", to_yaml(cfg))
    write_atomic(run_dir / "plan.json", json.dumps(plan.to_dict(), indent=2))


# ---------------------------------------------------------------- model and tokens, by budget kind

BUDGET_KINDS = ("compute", "params", "tokens", "minutes")


def budget_kind(b: DictConfig) -> Optional[str]:
    """The one budget that is set (None: none is), refusing two at once and values <= 0."""
    chosen = [k for k in BUDGET_KINDS if b[k] is not None]
    if len(chosen) > 1:
        raise ConfigError(f"budget sets {' and '.join('budget.' + k for k in chosen)}; set only one of them.")
    for k in chosen:
        if not b[k] > 0:
            raise ConfigError(f"budget.{k}={b[k]} must be positive.")
    if b.tokens_per_param <= 0:
        raise ConfigError(f"budget.tokens_per_param={b.tokens_per_param} must be positive.")
    return chosen[0] if chosen else None


@dataclass
class Sizing:
    """What a budget decides: the model, the training tokens D before rounding to whole
    steps, and the card's budget line; budget.minutes adds its measured rate and time budget."""
    model: GPTConfig
    n_tokens: float
    budget: str
    measured_rate: Optional[float] = None
    time_budget: Optional[dict] = None


def size_for_compute(cfg: DictConfig, vocab: int) -> Sizing:
    """budget.compute=C: the depth nearest N_opt = sqrt(C / (6 r)) (or the explicit model);
    D = C / flops_per_token."""
    b = cfg.budget
    gcfg = (model_config(cfg.model, vocab) if model_is_explicit(cfg.model)
            else nearest_model(cfg.model, vocab, chinchilla_optimal(b.compute, b.tokens_per_param)[0]))
    return Sizing(gcfg, b.compute / gcfg.flops_per_token(), f"compute C={b.compute:.3e} FLOPs")


def size_for_params(cfg: DictConfig, vocab: int) -> Sizing:
    """budget.params=N: the depth nearest N; D = r N."""
    b, r = cfg.budget, cfg.budget.tokens_per_param
    if model_is_explicit(cfg.model):
        raise ConfigError("budget.params picks the model size, but the model is set explicitly; drop one of them.")
    gcfg = nearest_model(cfg.model, vocab, b.params)
    return Sizing(gcfg, r * gcfg.num_params(), f"params N~{si(b.params)}, D = {r:g} N")


def size_for_tokens(cfg: DictConfig, vocab: int) -> Sizing:
    """budget.tokens=D: the depth nearest N = D / r (or the explicit model); D as given."""
    b = cfg.budget
    gcfg = (model_config(cfg.model, vocab) if model_is_explicit(cfg.model)
            else nearest_model(cfg.model, vocab, b.tokens / b.tokens_per_param))
    return Sizing(gcfg, b.tokens, f"tokens D={si(b.tokens)}")


def size_for_explicit_model(cfg: DictConfig, vocab: int) -> Sizing:
    """No budget: the explicit model, D = r N (train.steps, when set, fixes the length)."""
    r = cfg.budget.tokens_per_param
    if not model_is_explicit(cfg.model) and cfg.train.steps is None:
        raise ConfigError("no budget: set one of budget.compute, budget.params, budget.tokens, budget.minutes, "
                          "or give an explicit model (model.depth or model.n_layer+model.d_model).")
    gcfg = model_config(cfg.model, vocab)
    return Sizing(gcfg, r * gcfg.num_params(), f"explicit model, D = {r:g} N")


SIZE_BY_BUDGET: dict[Optional[str], Callable[[DictConfig, int], Sizing]] = {
    "compute": size_for_compute, "params": size_for_params, "tokens": size_for_tokens, None: size_for_explicit_model}


def size_for_minutes(cfg: DictConfig, vocab: int, device_info, world_size: int, probes: "Probes",
                     startup_seconds: float) -> tuple[Sizing, "hardware.DeviceInfo"]:
    """budget.minutes=M: C = the measured rate x the training time M minutes leave after
    start-up, probes, evaluations, checkpoints and the report; then sized as for compute
    (minutes_model), or the explicit model. Also returns the device with its dtype settled."""
    b, t, r = cfg.budget, cfg.train, cfg.budget.tokens_per_param
    if probes.measure_flops is None:
        raise ConfigError("budget.minutes needs a throughput probe on this machine; run it through picollm.train or picollm.plan.")
    seconds = 60.0 * b.minutes
    gcfg, rate, device_info, probed_micro = _probe_until_settled(cfg, vocab, seconds, device_info, world_size, probes)
    time_budget = _time_budget(seconds, startup_seconds, probes.seconds, gcfg, rate, t)
    if not model_is_explicit(cfg.model):  # size for the time left to train, not the whole budget
        gcfg = minutes_model(cfg.model, vocab, chinchilla_optimal(rate * time_budget["train_s"], r)[0])
        time_budget = _time_budget(seconds, startup_seconds, probes.seconds, gcfg, rate, t)
    # The time left to train, not the whole budget, sets the batch and so the micro-batch;
    # a micro-batch the probe did not run is probed (1k-token micro-steps ran at half the
    # tokens/s of 4k ones here, and a plan from the wrong rate overran its budget by 17%).
    for _ in range(2):
        micro = _probe_micro(t, gcfg, rate * time_budget["train_s"], world_size, device_info)
        if micro == probed_micro:
            break
        rate, probed_micro = _devices(device_info, world_size) * probes.throughput(gcfg, micro, device_info), micro
        time_budget = _time_budget(seconds, startup_seconds, probes.seconds, gcfg, rate, t)
    compute = rate * time_budget["train_s"]
    devices = _devices(device_info, world_size)
    budget = (f"{b.minutes:g} min, {rough_duration(time_budget['train_s'])} of it training at a measured "
              f"{rate / 1e9:.3g} GFLOP/s" + (f" ({devices} GPUs)" if devices > 1 else "") + f" -> C={compute:.3e}")
    return Sizing(gcfg, compute / gcfg.flops_per_token(), budget, rate, time_budget), device_info


def _probe_until_settled(cfg: DictConfig, vocab: int, seconds: float, device_info, world_size: int,
                         probes: "Probes") -> tuple[GPTConfig, float, "hardware.DeviceInfo", int]:
    """(shape, rate, device, micro-batch probed) of budget.minutes: a first guess of the rate
    from the peak, then the shape that rate buys, probed, until the shape stops changing (at
    most three probes). The probe runs what training will run: the same micro-batch and dtype."""
    t, r = cfg.train, cfg.budget.tokens_per_param
    explicit = model_is_explicit(cfg.model)
    devices, kind = _devices(device_info, world_size), device_info.device.type
    rate = devices * (device_info.peak_flops or UNMEASURED_PEAK[kind]) * ASSUMED_MFU[kind]
    gcfg, tried = None, set()
    for _ in range(3):
        guess = (model_config(cfg.model, vocab) if explicit
                 else minutes_model(cfg.model, vocab, chinchilla_optimal(rate * seconds, r)[0]))
        if (guess.n_layer, guess.d_model) in tried:
            break
        tried.add((guess.n_layer, guess.d_model))
        gcfg = guess
        micro = _probe_micro(t, gcfg, rate * seconds, world_size, device_info)
        device_info = probes.settle_dtype(device_info, gcfg, micro)
        rate = devices * probes.throughput(gcfg, micro, device_info)
        if explicit:
            break
    return gcfg, rate, device_info, micro


def _devices(device_info, world_size: int) -> int:
    """How many times one process's measured rate a run gets: the probe measures one
    process; GPUs add up, while CPU processes share one machine's cores."""
    return world_size if device_info.is_cuda else 1


@dataclass
class Probes:
    """How the planner measures this machine (budget.minutes; train.dtype=auto on CPU) and the
    seconds its measurements took, which come out of budget.minutes."""
    measure_flops: Optional[Callable] = None
    measure_dtypes: Optional[Callable] = None
    clock: Callable[[], float] = time.perf_counter
    seconds: dict = field(default_factory=lambda: {"dtype": 0.0, "throughput": 0.0})

    def throughput(self, gcfg: GPTConfig, micro: int, device_info) -> float:
        """One process's training FLOP/s on this shape and micro-batch, timed."""
        start = self.clock()
        rate = self.measure_flops(gcfg, micro, device_info)
        self.seconds["throughput"] += self.clock() - start
        return rate

    def settle_dtype(self, device_info, gcfg: GPTConfig, micro: int):
        """train.dtype=auto on CPU: time a training step in each dtype on this shape and
        micro-batch and train in the faster (without a probe, the CPU-flag guess stands).
        Either way the peak of the chosen dtype becomes the MFU yardstick."""
        if not device_info.dtype_pending:
            return device_info
        start = self.clock()
        if self.measure_dtypes is None:
            settled = hardware.with_dtype(device_info, device_info.dtype, device_info.dtype_reason)
        else:
            timed = self.measure_dtypes(gcfg, micro, device_info)
            dtype, why = hardware.pick_faster_dtype(timed["step_seconds"], timed["seconds"])
            settled = hardware.with_dtype(device_info, dtype, why)
        self.seconds["dtype"] += self.clock() - start
        return settled


def _time_budget(seconds: float, startup: float, probes: dict, gcfg: GPTConfig, rate: float, t: DictConfig) -> dict:
    """budget.minutes is the whole training process's wall clock: take out what was spent
    before and during planning (measured) and what evaluations, checkpoints and the end of
    the run will spend (planned at the measured rate); the rest is training."""
    eval_tokens = t.eval_tokens
    one_eval_s = eval_tokens * gcfg.flops_per_token() / 3 / rate  # forward only: 1/3 of a step's FLOPs
    if t.eval_every is None:  # as many as EVAL_SHARE of the budget pays for: at least the first and the last
        evals = int(min(EVALS_PER_RUN, max(2, EVAL_SHARE * seconds // one_eval_s)))
        if evals * one_eval_s > EVAL_SHARE * seconds:  # even those two: fewer tokens each, down to a floor
            eval_tokens = max(min(t.eval_tokens, EVAL_MIN_TOKENS),
                              int(eval_tokens * EVAL_SHARE * seconds / (evals * one_eval_s)))
            one_eval_s = eval_tokens * gcfg.flops_per_token() / 3 / rate
    else:  # an explicit interval: as many as the steps allow, estimated from the rate
        steps_guess = max(1.0, seconds * rate / gcfg.flops_per_token() / (t.batch_tokens or 2**16))
        evals = int(2 + steps_guess // t.eval_every)
    eval_s = (evals - (not t.eval_at_start)) * one_eval_s  # the planned first one is skipped with eval_at_start=false
    saves = 11 if t.save_every is None else 1 + seconds / 60  # one a minute at most, as a bound
    save_s = saves * 16 * gcfg.num_params(total=True) / CHECKPOINT_BYTES_PER_S
    parts = {"budget_s": seconds, "evals": evals, "eval_tokens": eval_tokens, "startup_s": startup,
             "dtype_probe_s": probes["dtype"],
             "throughput_probe_s": probes["throughput"], "evals_s": eval_s + save_s,
             "finish_s": (REPORT_SECONDS if t.report else 0.0) + save_s / saves}  # + the exported weights
    spent = sum(v for k, v in parts.items() if k.endswith("_s") and k != "budget_s")
    if spent >= 0.9 * seconds:
        raise ConfigError(f"budget.minutes={seconds / 60:g} leaves no time to train: {_overheads(parts)} take "
                          f"~{spent:.0f} s; raise budget.minutes, or lower budget.probe_seconds or train.eval_tokens.")
    parts["train_s"] = seconds - spent
    return parts


def _overheads(tb: dict) -> str:
    each = f" of {si(tb['eval_tokens'])} tokens" if "eval_tokens" in tb else ""
    return (f"start-up {tb['startup_s']:.0f} s + dtype probe {tb['dtype_probe_s']:.1f} s"
            f" + throughput probe {tb['throughput_probe_s']:.1f} s + {tb['evals']} evals{each}/checkpoints"
            f" ~{tb['evals_s']:.0f} s"
            f" + export/report ~{tb['finish_s']:.0f} s")


def _time_budget_line(tb: dict) -> str:
    return f"{rough_duration(tb['budget_s'])} = {_overheads(tb)} + training {rough_duration(tb['train_s'])}"


# ---------------------------------------------------------------- batch, steps, LR, schedule

def deepseek_batch_tokens(compute: float) -> float:
    """DeepSeek LLM's compute-optimal global batch in tokens, B_opt = 0.2920 · C^0.3271."""
    return DEEPSEEK_BATCH_COEF * compute ** DEEPSEEK_BATCH_EXP


def deepseek_lr(compute: float) -> float:
    """DeepSeek LLM's compute-optimal peak LR, eta_opt = 0.3118 · C^−0.1250."""
    return DEEPSEEK_LR_COEF * compute ** DEEPSEEK_LR_EXP


# CPU micro-steps of more tokens than this gained nothing in tokens/s, measured at 1 thread
# from the 2x128 speedrun model to the 6x384 reference shape, and 16k-token ones lost 15-50%
# (a (tokens x vocab) logits block far beyond the caches): /tmp/bench notes in BENCHMARKS.md.
CPU_MICRO_TOKENS = 4096


def _micro_batch(t: DictConfig, gcfg: GPTConfig, per_rank: int, device_info, shards: int = 1) -> tuple[int, dict]:
    """The requested micro-batch, or the largest divisor of the per-process batch that fits
    in 85% of the device's memory: on a GPU a power of two, at most 64 sequences; on a CPU
    any divisor (a batch of 11 sequences is one micro-step of 11, not eleven of 1) of at most
    CPU_MICRO_TOKENS tokens, so 16 sequences of 256 and 32 of 128."""
    limit = 0.85 * device_info.memory_bytes
    mem = lambda b: estimate_memory(gcfg, b, device_info.dtype, t.activation_checkpointing, shards)
    if t.micro_batch is not None:
        if t.micro_batch < 1 or per_rank % t.micro_batch:
            raise ConfigError(f"train.micro_batch={t.micro_batch} does not divide the {per_rank} sequences each process "
                              "takes per step; pick a divisor or change train.batch_tokens.")
        if mem(t.micro_batch)["total"] > limit:
            raise ConfigError(f"train.micro_batch={t.micro_batch} needs ~{binary_size(mem(t.micro_batch)['total'])} but only "
                              f"{binary_size(device_info.memory_bytes)} is available; lower it or set train.activation_checkpointing=true.")
        return t.micro_batch, mem(t.micro_batch)
    cap = 64 if device_info.is_cuda else max(1, CPU_MICRO_TOKENS // gcfg.seq_len)
    fits = [b for b in range(min(per_rank, cap), 0, -1)
            if per_rank % b == 0 and (not device_info.is_cuda or b & (b - 1) == 0)]
    b = next((b for b in fits if mem(b)["total"] <= limit), 1)
    if mem(b)["total"] > limit:
        raise ConfigError(f"the model needs ~{binary_size(mem(b)['total'])} even at micro-batch 1 but only "
                          f"{binary_size(device_info.memory_bytes)} is available; use a smaller model or seq_len, "
                          "or train.activation_checkpointing=true.")
    return b, mem(b)


def settle_micro_batch(t: DictConfig, gcfg: GPTConfig, per_rank: int, device_info, shards: int,
                       probes: Probes) -> tuple["hardware.DeviceInfo", int, dict]:
    """(device, micro-batch, memory estimate). A CPU dtype still to be measured (every budget
    but minutes, whose probes settled it) is timed on the final shape and micro-batch, and
    the micro-batch chosen again for the dtype that won."""
    micro, memory = _micro_batch(t, gcfg, per_rank, device_info, shards)
    if device_info.dtype_pending:
        device_info = probes.settle_dtype(device_info, gcfg, micro)
        micro, memory = _micro_batch(t, gcfg, per_rank, device_info, shards)
    return device_info, micro, memory


def global_batch(t: DictConfig, compute: float, n_tokens: float, seq: int, world_size: int,
                 minutes: bool = False, max_seqs: Optional[int] = None) -> int:
    """Global batch in sequences: train.batch_tokens, or DeepSeek's batch fit at ``compute``
    rounded to a power of two in sequences, at most ``max_seqs`` (budget.minutes on a CPU: one
    micro-step per process, see minutes_batch_cap), and halved while the run would have fewer
    than MIN_STEPS steps (budget.minutes: MINUTES_MIN_STEPS, down to MINUTES_MIN_BATCH_TOKENS);
    at least one sequence per process, and a multiple of the processes."""
    min_steps = MINUTES_MIN_STEPS if minutes else MIN_STEPS
    min_seqs = max(world_size, math.ceil(MINUTES_MIN_BATCH_TOKENS / seq) if minutes else 1)
    if t.batch_tokens is not None:
        if t.batch_tokens % seq:
            raise ConfigError(f"train.batch_tokens={t.batch_tokens} is not a multiple of model.seq_len={seq}; "
                              f"use a multiple such as {max(1, round(t.batch_tokens / seq)) * seq}.")
        batch_seqs = t.batch_tokens // seq
    else:
        batch_seqs = _pow2(max(1.0, deepseek_batch_tokens(compute) / seq))
        if max_seqs is not None:
            batch_seqs = min(batch_seqs, max_seqs)
        if t.steps is None:
            while batch_seqs > min_seqs and n_tokens / (batch_seqs * seq) < min_steps:
                batch_seqs //= 2
        batch_seqs = max(batch_seqs, world_size)
        batch_seqs += (-batch_seqs) % world_size
    if batch_seqs % world_size:
        raise ConfigError(f"global batch of {batch_seqs} sequences is not divisible by the world size {world_size}; "
                          f"set train.batch_tokens to a multiple of {world_size * seq}.")
    return batch_seqs


def minutes_batch_cap(device_info, seq: int, world_size: int) -> Optional[int]:
    """budget.minutes' largest global batch in sequences: on a CPU one micro-step of
    CPU_MICRO_TOKENS per process (see MINUTES_MIN_STEPS); on a GPU no cap (not measured)."""
    return None if device_info.is_cuda else world_size * max(1, CPU_MICRO_TOKENS // seq)


def _probe_micro(t: DictConfig, gcfg: GPTConfig, compute: float, world_size: int, device_info) -> int:
    """The micro-batch training would use at this shape and compute, for the probes."""
    n_tokens = compute / gcfg.flops_per_token()
    batch = global_batch(t, compute, n_tokens, gcfg.seq_len, world_size, minutes=True,
                         max_seqs=minutes_batch_cap(device_info, gcfg.seq_len, world_size))
    shards = world_size if t.parallel == "fsdp" else 1
    return _micro_batch(t, gcfg, batch // world_size, device_info, shards)[0]


def step_count(t: DictConfig, n_tokens: float, tokens_per_step: int) -> int:
    """train.steps, or the budget's tokens in whole steps of the global batch."""
    if t.steps is not None:
        if t.steps < 1:
            raise ConfigError(f"train.steps={t.steps} must be at least 1.")
        return int(t.steps)
    if n_tokens < tokens_per_step:
        raise ConfigError(f"the budget gives {si(n_tokens)} tokens, less than one step of {si(tokens_per_step)} tokens; "
                          "raise the budget or lower train.batch_tokens.")
    return int(round(n_tokens / tokens_per_step))


def peak_lr(t: DictConfig, compute: float) -> float:
    """train.lr, or DeepSeek's LR fit at the run's compute, capped at LR_CAP. DeepSeek's C
    leaves out the vocabulary's FLOPs and ours counts the LM head: a starting point, not a
    tuned optimum."""
    return t.lr if t.lr is not None else min(LR_CAP, deepseek_lr(compute))


def warmup_steps(t: DictConfig, steps: int) -> int:
    """train.warmup_steps, or train.warmup_frac of the steps; shorter than the run."""
    warmup = t.warmup_steps if t.warmup_steps is not None else int(round(t.warmup_frac * steps))
    if warmup >= steps and steps > 1:
        raise ConfigError(f"warmup of {warmup} steps does not fit in a {steps}-step run; lower train.warmup_steps.")
    return warmup


def schedule_label(t: DictConfig) -> str:
    """How the LR goes from the peak to min_lr (optim.lr_at computes it), for the card."""
    if t.schedule == "cosine":
        return "cosine"
    return f"wsd: constant, then the last {t.decay_frac:.0%} decay {t.decay_shape}"


def optimizer_label(t: DictConfig) -> str:
    if t.optimizer == "adamw":
        return "adamw"
    return f"muon (lr x{t.muon_lr_ratio:g}) for the blocks' matrices, adamw for the rest"


def estimate_seconds(compute: float, measured_rate: Optional[float], device_info, devices: int) -> tuple[float, str]:
    """(wall-clock seconds, how they were estimated): C over the measured rate, else over
    ASSUMED_MFU of the peak on every device."""
    if measured_rate is not None:
        return compute / measured_rate, "measured throughput"
    if device_info.peak_flops:
        mfu = ASSUMED_MFU[device_info.device.type]
        return compute / (device_info.peak_flops * mfu * devices), f"assuming {mfu:.0%} MFU"
    return float("nan"), "no peak known for this device"


def _eval_every(steps: int, time_budget: Optional[dict]) -> int:
    """About ten evaluations per run; a budget.minutes run, the number its time budget planned
    (the first and the last are always there)."""
    if time_budget is None:
        return max(1, steps // 10)
    return max(1, math.ceil(steps / max(1, time_budget["evals"] - 1)))  # never one more than planned


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


# A probe takes at most this share of budget.minutes (and at least PROBE_MIN_SECONDS): at the
# full 10 s, the probes and start-up took ~30% of a 1-minute run on the AVX2 EPYC.
PROBE_SHARE, PROBE_MIN_SECONDS = 0.05, 2.0


def probe_seconds(budget: DictConfig) -> float:
    """How long one throughput probe runs: budget.probe_seconds, or less on short budgets."""
    if budget.minutes is None:
        return budget.probe_seconds
    return min(budget.probe_seconds, max(PROBE_MIN_SECONDS, PROBE_SHARE * 60 * budget.minutes))


def throughput_probe(cfg: DictConfig) -> Callable:
    from picollm.throughput import measure_train_flops

    seconds, slowdown = probe_seconds(cfg.budget), cfg.debug.probe_slowdown
    return lambda gcfg, micro, device: measure_train_flops(gcfg, micro, device, seconds,
                                                           optimizer=cfg.train.optimizer) / slowdown


def dtype_probe(gcfg: GPTConfig, micro: int, device) -> dict:
    from picollm.throughput import time_dtypes

    return time_dtypes(gcfg, micro, device, hardware.CPU_DTYPES)


def planner_device(cfg: DictConfig, measure: bool = True):
    """The device as the planner sees it: CPU auto dtype left to the plan's measurement."""
    return hardware.describe(cfg.train.device, cfg.train.dtype, measure=measure, peak_flops=cfg.train.peak_flops,
                             decide_dtype_later=True)


def plan_from_config(cfg: DictConfig) -> Plan:
    """The plan a single-process command works from: the run's own (reused or recorded
    in run_dir) when run_dir is set, else a fresh one, probing for budget.minutes."""
    device = planner_device(cfg)
    if not cfg.run_dir:
        return make_plan(cfg, device, measure_flops=throughput_probe(cfg), measure_dtypes=dtype_probe,
                         startup_seconds=process_age())
    plan = plan_for_run(cfg, device, dist.DistInfo(), Path(cfg.run_dir), None)
    save_plan(Path(cfg.run_dir), cfg, plan)
    return plan


USAGE = "usage: python -m picollm.plan [overrides...]  (plan.format=json for JSON only)"


def main(argv: Optional[list] = None) -> None:
    cfg = cli.parse(argv, "plan", USAGE)
    try:
        plan = plan_from_config(cfg)
    except (ConfigError, ValueError) as err:
        raise SystemExit(f"error: {err}")
    if cfg.plan.format == "json":
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print(plan.card())


if __name__ == "__main__":
    main()
