"""Config schema (dataclasses, so Hydra type-checks every override) and composition.

Every entry point composes the same tree from ``configs/`` with Hydra's compose API,
so ``python -m picollm.train``, ``picollm.plan`` and the tests see identical configs
and nothing writes Hydra output folders behind the user's back.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

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
    cache_dir: str = "${oc.env:PICOLLM_CACHE,${oc.env:HOME,.}/.cache/picollm}/data"


@dataclass
class BudgetSchema:
    compute: Optional[float] = None  # training FLOPs
    params: Optional[float] = None  # N, as DESIGN counts it
    tokens: Optional[float] = None  # D
    minutes: Optional[float] = None  # wall clock for the training stage on this machine
    tokens_per_param: float = 20.0  # r in D = r * N
    probe_seconds: float = 10.0  # how long the throughput probe of budget.minutes runs


@dataclass
class TrainSchema:
    steps: Optional[int] = None  # overrides the derived number of steps
    batch_tokens: Optional[int] = None  # global batch; derived from compute when unset
    micro_batch: Optional[int] = None  # sequences per forward pass per process; auto when unset
    lr: Optional[float] = None  # peak LR; derived from compute when unset
    min_lr_ratio: float = 0.1
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
    seed: int = 1337
    eval_every: Optional[int] = None  # steps; default about ten evaluations per run
    eval_tokens: int = 262_144
    save_every: Optional[int] = None  # steps; default about ten checkpoints per run
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
    # Fault injection for tests and drills: make these steps' loss NaN / gradients inf once.
    inject_nan_loss: List[int] = field(default_factory=list)
    inject_inf_grad: List[int] = field(default_factory=list)


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


@dataclass
class PlanSchema:
    format: str = "text"  # text | json
    # Calculator views (pure arithmetic; see picollm/plan.py): card | compute | time | params | inference
    view: str = "card"
    law: str = "epoch"  # the fitted law judging losses: epoch | chinchilla
    gpu: Optional[str] = None  # a name from scaling.GPU_PEAK_FLOPS; unset: this machine, probed
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
    span: float = 4.0  # sizes run log-spaced from N_opt/span to N_opt*span
    dir: Optional[str] = None  # where run dirs, results.jsonl, plots and summary go
    bootstrap: int = 100  # resamples for the fits' 95% intervals (0: regression intervals only)
    fit: bool = True


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
    sweep: SweepSchema = field(default_factory=SweepSchema)
    extra: Any = None  # free-form slot for experiment notes


def _register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="picollm_schema", node=Config)
    for group, schema in (("model", ModelSchema), ("tokenizer", TokenizerSchema), ("data", DataSchema),
                          ("budget", BudgetSchema), ("train", TrainSchema)):
        cs.store(group=group, name=f"{group}_schema", node=schema)


_register()


def load_config(overrides: Optional[List[str]] = None, config_name: str = "config") -> DictConfig:
    """Compose ``configs/<config_name>.yaml`` with command-line style overrides."""
    overrides = list(overrides or [])
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=overrides)
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException) as err:
        first = str(err).strip().splitlines()[0]
        raise ConfigError(f"bad config or override ({first}); see `python -m picollm.plan --help` for the groups.") from None
    return cfg


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def parse_cli(argv: List[str], usage: str) -> List[str]:
    """Overrides from argv; ``--help`` prints usage plus the available groups and exits."""
    if any(a in ("-h", "--help") for a in argv):
        groups = sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir())
        lines = [usage, "", "config groups (pick with group=name):"]
        for g in groups:
            names = sorted(f.stem for f in (CONFIG_DIR / g).glob("*.yaml"))
            lines.append(f"  {g}: {', '.join(names)}")
        lines.append("any field: key=value, e.g. budget.minutes=5 train.dtype=fp32 model.depth=4")
        print("\n".join(lines))
        raise SystemExit(0)
    bad = [a for a in argv if a.startswith("-")]
    if bad:
        raise SystemExit(f"unknown option {bad[0]}; pass settings as Hydra overrides like budget.minutes=5.")
    return argv


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")
