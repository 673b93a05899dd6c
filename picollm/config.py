"""Config schema (dataclasses, so Hydra type-checks every override) and composition.

Every entry point composes the same tree from ``configs/`` with Hydra's compose API,
so ``python -m picollm.train``, ``picollm.plan`` and the tests see identical configs
and nothing writes Hydra output folders behind the user's back.
"""

from __future__ import annotations

import difflib
import math
import re
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable, List, Optional

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A config that cannot work; the message names the field and the fix."""


@dataclass
class ModelSchema:
    arch: str = "llama"  # llama | gpt2
    depth: Optional[int] = None  # one knob: n_layer=depth, d_model=depth*aspect_ratio
    n_layer: Optional[int] = None
    d_model: Optional[int] = None
    n_head: Optional[int] = None
    head_dim: int = 64
    aspect_ratio: int = 64
    seq_len: int = 256
    mlp_hidden: Optional[int] = None
    qk_norm: bool = True
    rope_theta: float = 10000.0
    max_depth: int = 48  # the largest depth the budget solver may pick


@dataclass
class TokenizerSchema:
    name: str = "bpe"  # bpe (trained on the run's corpus) or a tiktoken name: gpt2, cl100k_base, ...
    vocab_size: int = 8192
    train_chars: int = 20_000_000


@dataclass
class DataSchema:
    source: str = "pystdlib"  # pystdlib | files | hf
    paths: List[str] = field(default_factory=list)
    format: str = "auto"  # auto | text | json | parquet
    text_field: str = "text"
    hf_name: Optional[str] = None
    hf_config: Optional[str] = None
    hf_split: str = "train"
    streaming: bool = True
    val_fraction: float = 0.01
    val_tokens: int = 1_000_000
    max_docs: Optional[int] = None
    # A run draws its sequences at random from the first max(D, pool_tokens) tokens of the
    # shuffled corpus (all of it when smaller): whole files are large, so the first D tokens
    # alone would be a few dozen documents for a short run. 0: exactly the first D tokens.
    pool_tokens: int = 1 << 24
    workers: Optional[int] = None  # processes for tokenization; None: all cores
    cache_dir: str = "${oc.env:PICOLLM_CACHE,${oc.env:HOME,.}/.cache/picollm}/data"


@dataclass
class BudgetSchema:
    compute: Optional[float] = None  # training FLOPs
    params: Optional[float] = None  # N, as docs/conventions.md counts it
    tokens: Optional[float] = None  # D
    minutes: Optional[float] = None  # wall clock for the training stage on this machine
    tokens_per_param: float = 20.0  # r in D = r * N
    probe_seconds: float = 10.0  # how long the throughput probe of budget.minutes runs (at most 5% of it)


@dataclass
class TrainSchema:
    steps: Optional[int] = None  # overrides the derived number of steps
    batch_tokens: Optional[int] = None  # global batch; derived from compute when unset
    micro_batch: Optional[int] = None  # sequences per forward pass per process; auto when unset
    lr: Optional[float] = None  # peak LR; derived from compute when unset
    min_lr_ratio: float = 0.1
    # cosine: warmup, then cosine decay to min_lr_ratio * lr at the last step.
    # wsd: warmup, constant lr, then the last decay_frac of the steps decay to
    # min_lr_ratio * lr (linear, or 1-sqrt; Hägele et al. 2024).
    schedule: str = "cosine"  # cosine | wsd
    decay_frac: float = 0.2
    decay_shape: str = "linear"  # linear | sqrt (wsd's decay)
    warmup_steps: Optional[int] = None
    warmup_frac: float = 0.03
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    dtype: str = "auto"  # auto | bf16 | fp32 | fp16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    compile: bool = False
    activation_checkpointing: bool = False
    parallel: str = "ddp"  # ddp | fsdp (FSDP2: parameters, gradients and AdamW state sharded over processes)
    optimizer: str = "adamw"  # adamw | muon (Muon for the blocks' matrices, AdamW for the rest; picollm/optim.py)
    muon_lr_ratio: float = 3.0  # Muon's LR as a multiple of the AdamW LR (measured; picollm/optim.py)
    seed: int = 1337
    eval_every: Optional[int] = None  # steps; default about ten evaluations per run
    eval_tokens: int = 262_144
    eval_at_start: bool = True  # also evaluate the untrained model (a sweep point, scored by its last, skips it)
    save_every: Optional[int] = None  # steps; default about ten checkpoints per run
    save_at: List[int] = field(default_factory=list)  # also save after these steps, kept (run_dir/saved_at)
    keep_checkpoints: int = 2
    log_every: int = 10  # progress line every k steps (metrics.jsonl gets every step)
    resume: str = "auto"  # auto | never | PATH
    num_threads: Optional[int] = None  # CPU threads for torch; default all cores
    peak_flops: Optional[float] = None  # the MFU yardstick; unset: measured (CPU) or published (GPU)
    report: bool = True  # write report.md (with samples) at the end of the run
    # Bad steps: a non-finite loss or gradient norm skips the update. After max_bad_steps in
    # a row: rollback (to the last good checkpoint, LR scaled by rollback_lr_scale) or stop.
    max_bad_steps: int = 3
    on_bad_steps: str = "rollback"  # rollback | stop
    rollback_lr_scale: float = 0.5
    max_rollbacks: int = 3
    spike_sigmas: float = 6.0  # a loss this many running std devs above its running mean is a spike


@dataclass
class DebugSchema:
    """Fault injection for tests and drills, not for training: the loss of each listed step
    becomes NaN, or one gradient element inf, once (a rollback replays the step cleanly)."""
    nan_loss_at_steps: List[int] = field(default_factory=list)
    inf_grad_at_steps: List[int] = field(default_factory=list)
    # From this step on (until slow_steps_until, if set) each step takes slow_step_seconds
    # longer: a machine that slowed after the plan's probe (and recovered), for
    # budget.minutes' deadline.
    slow_steps_from: Optional[int] = None
    slow_steps_until: Optional[int] = None
    slow_step_seconds: float = 0.0
    # Seconds the trainer sleeps before its first step: work after the plan that it could not
    # foresee (a first run preparing its data), for budget.minutes' deadline.
    slow_start_seconds: float = 0.0
    # The plan's throughput probe reports the machine this many times slower than it measured:
    # a machine that sped up after planning, for budget.minutes' deadline.
    probe_slowdown: float = 1.0


@dataclass
class SampleSchema:
    prompts: List[str] = field(default_factory=lambda: ["def ", "import ", "class "])
    max_tokens: int = 64
    temperature: float = 0.8
    top_k: Optional[int] = 50
    seed: int = 0


@dataclass
class WandbSchema:
    mode: str = "disabled"  # disabled | offline | online
    project: str = "picollm"
    name: Optional[str] = None
    entity: Optional[str] = None  # team or user the run is logged under; unset: wandb's default
    group: Optional[str] = None  # groups runs in the UI, e.g. one sweep
    tags: List[str] = field(default_factory=list)


@dataclass
class PlanSchema:
    """The run plan (python -m picollm.plan) and the law the run's report judges its loss by."""
    format: str = "text"  # text | json
    law: str = "epoch"  # the fitted law the report predicts the run's loss with: epoch | chinchilla | PATH


@dataclass
class CalcSchema:
    """The calculator (python -m picollm.calculator): arithmetic on the scaling laws, no run.
    Its budget comes from the budget group (budget.compute, budget.params, tokens_per_param)."""
    view: Optional[str] = None  # compute | time | params | inference
    format: str = "text"  # text | json
    law: str = "epoch"  # the fitted law judging losses: epoch | chinchilla | PATH to a sweep's summary.json
    gpu: Optional[str] = None  # a name from hardware.GPU_PEAKS; unset: this machine, probed
    n_gpus: int = 1
    hours: Optional[float] = None  # wall-clock budget of the time view
    mfu: float = 0.4  # model FLOPs utilisation assumed on the named GPU
    price_per_hour: Optional[float] = None  # per GPU, in your currency
    inference_tokens: Optional[float] = None  # tokens the model will serve in its lifetime
    target_loss: Optional[float] = None  # the inference view's loss target


@dataclass
class SweepSchema:
    """An IsoFLOP grid (python -m picollm.sweep); each run gets the other overrides."""
    budgets: List[float] = field(default_factory=list)  # compute budgets C in FLOPs
    sizes: int = 5  # model sizes per budget
    span: float = 4.0  # mixed families: sizes log-spaced from N_opt/span to N_opt*span (a family: consecutive rungs)
    dir: Optional[str] = None  # where run dirs, results.jsonl, plots and summary go
    bootstrap: int = 100  # resamples for the fits' 95% intervals (0: regression intervals only)
    fit: bool = True
    # Sizes come from ONE shape family: d_model = n_layer * model.aspect_ratio exactly, heads of
    # model.head_dim, n_layer >= min_layers. mix_families=true allows any aspect within 2x and 1 layer.
    min_layers: int = 2
    mix_families: bool = False
    # cosine: every point trains from scratch. wsd: per size one warmup+constant run to its
    # largest budget, checkpointed where each smaller budget's decay starts, and a short
    # cooldown branched from each (train.decay_frac / decay_shape set the decay).
    schedule: str = "cosine"  # cosine | wsd
    workers: Optional[int] = None  # parallel single-thread processes; unset: one per core on CPU


@dataclass
class Config:
    run_dir: Optional[str] = None
    model: ModelSchema = field(default_factory=ModelSchema)
    tokenizer: TokenizerSchema = field(default_factory=TokenizerSchema)
    data: DataSchema = field(default_factory=DataSchema)
    budget: BudgetSchema = field(default_factory=BudgetSchema)
    train: TrainSchema = field(default_factory=TrainSchema)
    sample: SampleSchema = field(default_factory=SampleSchema)
    wandb: WandbSchema = field(default_factory=WandbSchema)
    plan: PlanSchema = field(default_factory=PlanSchema)
    calc: CalcSchema = field(default_factory=CalcSchema)
    sweep: SweepSchema = field(default_factory=SweepSchema)
    debug: DebugSchema = field(default_factory=DebugSchema)
    extra: Any = None  # free-form slot for experiment notes


def _register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="picollm_schema", node=Config)
    for group, schema in (("model", ModelSchema), ("tokenizer", TokenizerSchema), ("data", DataSchema),
                          ("budget", BudgetSchema), ("train", TrainSchema)):
        cs.store(group=group, name=f"{group}_schema", node=schema)


_register()


# ----------------------------------------------------------------------------- value rules
# One pass over the composed config refuses every value that cannot work, before any command
# does work: a Rule takes (key, value) and returns the sentence refusing it, or None.

Rule = Callable[[str, Any], Optional[str]]

# Kept here so composing a config needs no torch; tests/test_config.py checks they match
# picollm.model.ARCHS and picollm.calculator.VIEWS.
ARCHS = ("llama", "gpt2")
CALC_VIEWS = ("compute", "time", "params", "inference")


def _or_list(choices) -> str:
    """('a', 'b', 'c') -> 'a, b or c'."""
    choices = list(choices)
    return choices[0] if len(choices) == 1 else f"{', '.join(choices[:-1])} or {choices[-1]}"


def _bounds_text(lo, hi, lo_open: bool, hi_open: bool) -> str:
    if hi is None:
        if lo_open:
            return "positive" if lo == 0 else f"above {lo}"
        return f"at least {lo}"
    return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


def number(lo=None, hi=None, *, lo_open: bool = False, hi_open: bool = False, nullable: bool = False,
           text: Optional[str] = None) -> Rule:
    """A finite number within [lo, hi] (either end open or absent); null allowed if ``nullable``."""
    bounds = text or _bounds_text(lo, hi, lo_open, hi_open)
    or_null = " (or null)" if nullable else ""

    def rule(key: str, value: Any) -> Optional[str]:
        if value is None:
            return None if nullable else f"{key} is unset; it must be {bounds}."
        if not math.isfinite(value):
            return f"{key}={value} is not a finite number; it must be {bounds}{or_null}."
        too_low = lo is not None and (value <= lo if lo_open else value < lo)
        too_high = hi is not None and (value >= hi if hi_open else value > hi)
        return f"{key}={value} must be {bounds}{or_null}." if too_low or too_high else None
    return rule


def at_least(lo: int, nullable: bool = False) -> Rule:
    return number(lo, nullable=nullable)


def positive(nullable: bool = False) -> Rule:
    return number(0, lo_open=True, nullable=nullable)


SEED = number(0, 2**63, hi_open=True, text="from 0 to 2**63 - 1")


def one_of(*choices: str, path: Optional[str] = None, nullable: bool = False) -> Rule:
    """One of ``choices``; with ``path`` (what the file should be) also an existing file's path."""
    allowed = _or_list(list(choices) + ([path] if path else []))

    def rule(key: str, value: Any) -> Optional[str]:
        if (value is None and nullable) or value in choices:
            return None
        if path and value and Path(str(value)).expanduser().exists():
            return None
        if path:
            return f"{key}={value!r} is not {_or_list(choices)} and no such path exists; use {allowed}."
        return f"{key}={value!r} is unknown; use {allowed}."
    return rule


def device_name(key: str, value: Any) -> Optional[str]:
    if re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(value)):
        return None
    return f"{key}={value!r} is unknown; use auto, cpu, cuda or cuda:N (N: the GPU index)."


def each(rule: Rule) -> Rule:
    """``rule`` for every item of a list."""
    def check(key: str, values: Any) -> Optional[str]:
        return next((p for i, v in enumerate(values or []) if (p := rule(f"{key}[{i}]", v))), None)
    return check


def _lazy_one_of(module: str, name: str, **kw) -> Rule:
    """one_of the keys of a table in a light module, imported when the check runs."""
    def rule(key: str, value: Any) -> Optional[str]:
        import importlib
        return one_of(*getattr(importlib.import_module(module), name), **kw)(key, value)
    return rule


def _vocab_size(key: str, value: Any) -> Optional[str]:
    from picollm.tokenizer import vocab_size_problem  # the range lives with the tokenizer; imported when checked

    return vocab_size_problem(value)


RULES: dict[str, Rule] = {
    "model.arch": one_of(*ARCHS),
    "model.depth": at_least(1, nullable=True),
    "model.n_layer": at_least(1, nullable=True),
    "model.d_model": at_least(1, nullable=True),
    "model.n_head": at_least(1, nullable=True),
    "model.head_dim": at_least(1),
    "model.aspect_ratio": at_least(1),
    "model.seq_len": at_least(1),
    "model.mlp_hidden": at_least(1, nullable=True),
    "model.rope_theta": positive(),
    "model.max_depth": at_least(1),
    "tokenizer.vocab_size": _vocab_size,
    "tokenizer.train_chars": at_least(1),
    "data.source": _lazy_one_of("picollm.data.sources", "SOURCES"),
    "data.format": _lazy_one_of("picollm.data.sources", "FORMATS"),
    "data.val_fraction": number(0, 1, lo_open=True, hi_open=True),
    "data.val_tokens": at_least(1),
    "data.max_docs": number(2, nullable=True, text="at least 2 (one document for validation)"),
    "data.pool_tokens": at_least(0),
    "data.workers": at_least(1, nullable=True),
    "budget.compute": positive(nullable=True),
    "budget.params": positive(nullable=True),
    "budget.tokens": positive(nullable=True),
    "budget.minutes": positive(nullable=True),
    "budget.tokens_per_param": positive(),
    "budget.probe_seconds": positive(),
    "train.steps": at_least(1, nullable=True),
    "train.batch_tokens": at_least(1, nullable=True),
    "train.micro_batch": at_least(1, nullable=True),
    "train.lr": positive(nullable=True),
    "train.min_lr_ratio": number(0, 1),
    "train.schedule": one_of("cosine", "wsd"),
    "train.decay_frac": number(0, 1, lo_open=True),
    "train.decay_shape": one_of("linear", "sqrt"),
    "train.warmup_steps": at_least(0, nullable=True),
    "train.warmup_frac": number(0, 1, hi_open=True),
    "train.weight_decay": at_least(0),
    "train.beta1": number(0, 1, hi_open=True),
    "train.beta2": number(0, 1, hi_open=True),
    "train.grad_clip": number(0, text="at least 0 (0 turns clipping off)"),
    "train.dtype": one_of("auto", "bf16", "fp32", "fp16"),
    "train.device": device_name,
    "train.parallel": one_of("ddp", "fsdp"),
    "train.optimizer": _lazy_one_of("picollm.optim", "OPTIMIZERS"),
    "train.muon_lr_ratio": positive(),
    "train.seed": SEED,
    "train.eval_every": at_least(1, nullable=True),
    "train.eval_tokens": at_least(1),
    "train.save_every": at_least(1, nullable=True),
    "train.save_at": each(at_least(1)),
    "train.keep_checkpoints": at_least(1),
    "train.log_every": at_least(1),
    "train.resume": one_of("auto", "never", path="a path to a step_*.pt checkpoint"),
    "train.num_threads": at_least(1, nullable=True),
    "train.peak_flops": positive(nullable=True),
    "train.max_bad_steps": at_least(1),
    "train.on_bad_steps": one_of("rollback", "stop"),
    "train.rollback_lr_scale": number(0, 1, lo_open=True),
    "train.max_rollbacks": at_least(0),
    "train.spike_sigmas": positive(),
    "sample.max_tokens": at_least(1),
    "sample.temperature": number(0, text="at least 0 (0 is greedy decoding)"),
    "sample.top_k": at_least(1, nullable=True),
    "sample.seed": SEED,
    "debug.nan_loss_at_steps": each(at_least(0)),
    "debug.inf_grad_at_steps": each(at_least(0)),
    "debug.slow_steps_from": at_least(0, nullable=True),
    "debug.slow_steps_until": at_least(0, nullable=True),
    "debug.slow_step_seconds": at_least(0),
    "debug.slow_start_seconds": at_least(0),
    "debug.probe_slowdown": positive(),
    "wandb.mode": one_of("disabled", "offline", "online"),
    "plan.format": one_of("text", "json"),
    "plan.law": _lazy_one_of("picollm.scaling", "LAWS", path="a path to a fitted law's JSON (a sweep's summary.json)"),
    "calc.view": one_of(*CALC_VIEWS, nullable=True),
    "calc.format": one_of("text", "json"),
    "calc.law": _lazy_one_of("picollm.scaling", "LAWS", path="a path to a fitted law's JSON (a sweep's summary.json)"),
    "calc.gpu": _lazy_one_of("picollm.hardware", "GPU_PEAKS", nullable=True),
    "calc.n_gpus": at_least(1),
    "calc.hours": positive(nullable=True),
    "calc.mfu": number(0, 1, lo_open=True, text="in (0, 1], e.g. 0.4 for 40%"),
    "calc.price_per_hour": at_least(0, nullable=True),
    "calc.inference_tokens": at_least(0, nullable=True),
    "calc.target_loss": positive(nullable=True),
    "sweep.budgets": each(positive()),
    "sweep.sizes": at_least(1),
    "sweep.span": number(1, lo_open=True),
    "sweep.bootstrap": at_least(0),
    "sweep.min_layers": at_least(1),
    "sweep.schedule": one_of("cosine", "wsd"),
    "sweep.workers": at_least(1, nullable=True),
}


def value_problems(cfg: DictConfig) -> list[str]:
    """The sentence for every value in ``cfg`` that RULES refuses, in RULES order."""
    problems = (rule(key, OmegaConf.select(cfg, key)) for key, rule in RULES.items())
    return [p for p in problems if p]


def combination_problems(cfg: DictConfig) -> list[str]:
    """Settings that are each valid but cannot work together."""
    t = cfg.get("train")
    if t is not None and t.get("optimizer") == "muon" and t.get("parallel") == "fsdp":
        return ["train.optimizer=muon orthogonalizes whole weight matrices, which train.parallel=fsdp splits "
                "across processes; use train.parallel=ddp (Muon keeps one buffer per matrix, half of AdamW's state) "
                "or train.optimizer=adamw."]
    return []


def unknown_keys(node: Any, schema: type = None, prefix: str = "") -> list[str]:
    """Dotted keys in ``node`` that the schema dataclass does not have (``+key=value``
    additions slip past Hydra's own check). ``extra`` (typed Any) is free-form."""
    schema = schema or Config
    hints = typing.get_type_hints(schema)
    found = []
    for key in node.keys():
        path = f"{prefix}{key}"
        if key not in hints:
            found.append(path)
        elif is_dataclass(hints[key]) and isinstance(node[key], DictConfig):
            found += unknown_keys(node[key], hints[key], path + ".")
    return found


# The calculator's settings that left the plan group for its own (calc.*), and the command
# that takes them now: an old command line is pointed there instead of refused as a typo.
MOVED_TO_CALC = ("view", "gpu", "n_gpus", "hours", "mfu", "price_per_hour", "inference_tokens", "target_loss")


def _moved_to_calc_message(key: str, value: Optional[str]) -> Optional[str]:
    group, _, name = key.partition(".")
    if group != "plan" or name not in MOVED_TO_CALC:
        return None
    return (f"{key} is a setting of the calculator now, not of the run plan; run "
            f"`python -m picollm.calculator calc.{name}={'...' if value is None else value}` instead.")


def _unknown_key_message(key: str, command: str = "python -m picollm.plan", value: Optional[str] = None) -> str:
    moved = _moved_to_calc_message(key, value)
    if moved:
        return moved
    parent, _, name = key.rpartition(".")
    schema = Config
    for part in filter(None, parent.split(".")):
        schema = typing.get_type_hints(schema).get(part, Config)
    siblings = [f.name for f in fields(schema)] if is_dataclass(schema) else []
    close = difflib.get_close_matches(name, siblings, n=1)
    hint = f" (did you mean {parent + '.' if parent else ''}{close[0]}?)" if close else ""
    return (f"{key} is not a picollm setting{hint}; remove it or fix its spelling "
            f"(`{command} --help` lists the groups, `{command} --cfg job` every field).")


def hydra_message(err: Exception, see: str = "`python -m picollm.plan --help` for the groups") -> str:
    """Hydra's whole message (the options it lists are the fix) and its cause's, minus its
    search path and the schema entries it offers as options; the cause's first line, which
    names the bad value, joins the lead."""
    text = str(err).strip()
    text = text.split("\nConfig search path:")[0]
    lines = [line for line in text.splitlines() if not re.fullmatch(r"\s+\w+_schema", line)]
    lead, detail = lines[0], lines[1:]
    cause = str(err.__cause__ or "").strip().splitlines()
    if cause:
        lead += f": {cause[0]}"
        detail += cause[1:]
    detail_text = "\n".join(detail).strip("\n")
    return f"bad config or override ({lead}); see {see}." + (f"\n{detail_text}" if detail_text else "")


def load_config(overrides: Optional[List[str]] = None, config_name: str = "config",
                command: str = "python -m picollm.plan") -> DictConfig:
    """Compose ``configs/<config_name>.yaml`` with command-line style overrides, refusing
    unknown keys and out-of-range values (ConfigError, one sentence per problem). ``command``
    is the one whose --help the messages point to."""
    overrides = list(overrides or [])
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=overrides)
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException) as err:
        text = str(err).strip()
        unknown = re.match(r"Could not override '([^']+)'", text)
        if unknown:
            value = re.search(r"use \+" + re.escape(unknown.group(1)) + r"=(\S*)", text)  # Hydra's own hint
            raise ConfigError(_unknown_key_message(unknown.group(1), command,
                                                   value.group(1) if value else None)) from None
        raise ConfigError(hydra_message(err, f"`{command} --help` for the groups")) from None
    problems = ([_unknown_key_message(k, command) for k in unknown_keys(cfg)] or value_problems(cfg)
                or combination_problems(cfg))
    if problems:
        raise ConfigError(" ".join(problems))
    return cfg


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


