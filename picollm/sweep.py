"""IsoFLOP sweeps: a grid of compute budgets x model sizes, trained, tabled and fitted.

    python -m picollm.sweep sweep.budgets=[1e12,3e12,1e13] sweep.sizes=5 sweep.dir=sweeps/a \
        model.seq_len=128 tokenizer.vocab_size=1024 sweep.schedule=wsd

Design:
- ``sweep.*`` settings live in ``SweepSchema`` (config.py), so Hydra type-checks them. Every
  other override is passed to each run unchanged (after ``train.eval_at_start=false``: a point
  is scored by its last evaluation); each run's own config keeps ``sweep`` at its defaults,
  so changing the grid never invalidates a finished run.
- One shape family: sizes come from the ladder n_layer = min_layers, min_layers+1, ... with
  d_model = n_layer * model.aspect_ratio exactly and heads of model.head_dim, so the loss
  differences between points come from size, not from shape (mixing aspect ratios 4x apart
  adds ~0.1 of shape-to-shape scatter at this scale). ``sweep.mix_families=true`` allows any
  aspect within 2x of model.aspect_ratio and 1-layer models, as an explicit opt-in.
- For budget C the sizes are ``sweep.sizes`` consecutive rungs of the ladder centred (in
  log N) on the Chinchilla-20 optimum N_opt = sqrt(C/(6r)) (mixed families: the shapes
  nearest to targets from N_opt/span to N_opt*span); the same shapes recur across budgets,
  which the WSD schedule needs.
- Hyperparameters: every point trains with ONE peak LR, batch and warmup, those the planner
  derives for the smallest size at the smallest budget (user-set train.lr / batch_tokens /
  warmup_steps win), so sizes differ only in size, not in step count per token. Each point then runs train.steps = round(C / (6N-ish
  flops_per_token * batch_tokens)) steps. The WSD branches need this (a branch continues
  its trunk's run), and the cosine grid uses the same rule so the two compare like for like.
- ``sweep.schedule=wsd``: per size, the largest-budget point is the trunk: a WSD run that
  also saves (train.save_at, never pruned) after the last constant-LR step of every smaller
  budget. Each smaller budget's point copies that checkpoint into its own run_dir and
  resumes there with its own train.steps (picollm.train's "extend": only train.steps
  differs), so it trains just its cooldown (the last train.decay_frac of its steps) and
  ends with a true end-of-schedule loss. ``spent`` in the table counts the FLOPs a point
  trained itself; the summary compares their sum with the cosine grid's.
- Workers: chains of points (a size's trunk then its branches under wsd; single points
  under cosine) run in ``sweep.workers`` spawned processes (default on CPU: one per core).
  On CPU every point trains with one thread unless train.num_threads is set: tiny models
  are overhead-bound, so 2 single-thread processes beat 1 two-thread process on 2 cores,
  and a fixed thread count keeps the numbers bit-identical for any worker count (the
  thread count changes the last digits of the loss).
- A run that raises is recorded with status "failed" and its error sentence; the sweep
  goes on. ``results.jsonl`` (one JSON object per point, rewritten atomically after every
  point) has n_params, n_tokens, compute (the plan's actual FLOPs), spent, val_loss,
  val_bpb, budget (the nominal C, used to group IsoFLOP profiles), n_layer, d_model, steps,
  schedule, branch_of, run_dir, seconds, status, error. ``fit.load_results`` reads it. A point
  with status ok and a final.json is skipped on rerun; failed points are retried.
- At the end: IsoFLOP fit (N_opt ~ C^a, D_opt ~ C^b), the parametric law when >= 5 points
  succeeded, plots, and summary.json / summary.md.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import threading
import time
import traceback
import warnings
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from omegaconf import DictConfig

from picollm import checkpoint as ckpt
from picollm import cli
from picollm.config import ConfigError, load_config
from picollm.files import write_atomic
from picollm.hardware import describe
from picollm.model import GPTConfig
from picollm.optim import lr_at
from picollm.plan import make_plan, shape_kwargs, vocab_size_for
from picollm.scaling import chinchilla_optimal
from picollm.train import Interrupted, run
from picollm.trainer import SAVED_AT

RESULTS = "results.jsonl"
# Keys the sweep sets per point; the same keys in the user's overrides would clash.
POINT_KEYS = ("model.depth", "model.n_layer", "model.d_model", "model.n_head", "budget.compute", "run_dir",
              "train.steps", "train.schedule", "train.save_at")
MIN_PARAMETRIC_POINTS = 5


@dataclass(frozen=True)
class SizeSettings:
    """What a size keeps at every budget: peak LR, global batch in tokens, warmup steps, and
    optionally the run length (tokens) at which that batch is right (`for_tokens`)."""
    lr: float
    batch_tokens: int
    warmup_steps: int
    batch_at_tokens: Optional[float] = None

    def for_tokens(self, tokens: float, seq_len: int) -> SizeSettings:
        """The settings of a run of `tokens` tokens. With batch_at_tokens, the batch follows the
        run length, not the model size: batch_tokens x sqrt(tokens / batch_at_tokens), kept
        within a quarter of batch_tokens and batch_tokens, in whole sequences of seq_len (the
        optimal batch grows with the tokens trained, independent of N: Bergsma et al. 2025,
        "Power Lines"). Whole sequences, not powers of 2 (until 2026-12-08), so that runs of
        nearly equal length never land an octave apart. The warmup keeps its tokens and the
        peak LR stays (on the CPU capstone's short runs, an LR scaled with sqrt(batch) moved
        the loss by -0.5% to +0.5%, no consistent gain)."""
        if self.batch_at_tokens is None:
            return self
        ideal = self.batch_tokens * math.sqrt(tokens / self.batch_at_tokens)
        lo, hi = math.ceil(self.batch_tokens / 4 / seq_len), max(1, self.batch_tokens // seq_len)
        batch = min(hi, max(lo, round(ideal / seq_len))) * seq_len
        return SizeSettings(self.lr, batch, max(1, round(self.warmup_steps * self.batch_tokens / batch)))


@dataclass
class Point:
    budget: float
    shape: GPTConfig
    steps: int = 0
    settings: Optional[SizeSettings] = None
    schedule: str = "cosine"
    save_at: list = field(default_factory=list)  # a WSD trunk: where its branches start
    branch_of: Optional[str] = None  # a WSD branch: its trunk's name...
    branch_step: Optional[int] = None  # ...and the checkpoint (completed steps) it continues
    seed: Optional[int] = None  # a repeat with this train.seed (the seed-to-seed scatter); None: the run's default

    @property
    def name(self) -> str:
        mant, exp = f"{self.budget:.2e}".split("e")
        repeat = "" if self.seed is None else f"_s{self.seed}"
        return f"C{mant.rstrip('0').rstrip('.')}e{int(exp)}_L{self.shape.n_layer}_d{self.shape.d_model}{repeat}"

    @property
    def size(self) -> tuple[int, int]:
        return self.shape.n_layer, self.shape.d_model

    @property
    def flops_per_step(self) -> int:
        return self.shape.flops_per_token() * self.settings.batch_tokens

    @property
    def spent(self) -> float:
        """FLOPs this point trains itself (a branch only its cooldown)."""
        return float(self.flops_per_step * (self.steps - (self.branch_step or 0)))

    def overrides(self, sweep_dir: Path) -> list[str]:
        g, s = self.shape, self.settings
        out = ["model.depth=null", f"model.n_layer={g.n_layer}", f"model.d_model={g.d_model}",
               f"model.n_head={g.n_head}", f"run_dir={sweep_dir / self.name}", f"train.schedule={self.schedule}"]
        if s is None:  # a bare point (e.g. a held-out run): the planner sizes it from the budget
            return out + [f"budget.compute={self.budget!r}"]
        out += [f"train.steps={self.steps}", f"train.lr={s.lr!r}", f"train.batch_tokens={s.batch_tokens}",
                f"train.warmup_steps={s.warmup_steps}"]
        if self.save_at:
            out.append(f"train.save_at=[{','.join(map(str, self.save_at))}]")
        if self.seed is not None:
            out.append(f"train.seed={self.seed}")
        return out


# ---------------------------------------------------------------- the grid


def family_shapes(m: DictConfig, vocab_size: int, min_layers: int = 2) -> list[GPTConfig]:
    """The ladder of one family: d_model = n_layer * aspect_ratio exactly (a multiple of
    head_dim), for n_layer from min_layers to max_depth."""
    common = shape_kwargs(m, vocab_size)
    shapes = [GPTConfig(n_layer=L, d_model=L * m.aspect_ratio, n_head=L * m.aspect_ratio // m.head_dim, **common)
              for L in range(min_layers, m.max_depth + 1) if (L * m.aspect_ratio) % m.head_dim == 0]
    if not shapes:
        raise ConfigError(f"no depth from sweep.min_layers={min_layers} to model.max_depth={m.max_depth} gives a "
                          f"d_model = n_layer x model.aspect_ratio={m.aspect_ratio} divisible by model.head_dim="
                          f"{m.head_dim}; make the aspect ratio a multiple of the head size.")
    return shapes


def candidate_shapes(m: DictConfig, vocab_size: int, min_layers: int = 1) -> list[GPTConfig]:
    """Mixed families (opt-in): every (n_layer, d_model) with d_model a multiple of head_dim
    and an aspect ratio d_model/n_layer within 2x of model.aspect_ratio."""
    common = shape_kwargs(m, vocab_size)
    shapes = []
    for n_layer in range(min_layers, m.max_depth + 1):
        lo, hi = n_layer * m.aspect_ratio / 2, n_layer * m.aspect_ratio * 2
        for heads in range(1, int(hi // m.head_dim) + 1):
            d_model = heads * m.head_dim
            if lo <= d_model <= hi:
                shapes.append(GPTConfig(n_layer=n_layer, d_model=d_model, n_head=heads, **common))
    if not shapes:
        raise ConfigError(f"no model shape has d_model (a multiple of model.head_dim={m.head_dim}) within 2x of "
                          f"model.aspect_ratio={m.aspect_ratio} per layer; lower model.head_dim.")
    return shapes


def sweep_shapes(cfg: DictConfig) -> list[GPTConfig]:
    vocab = vocab_size_for(cfg.tokenizer)
    if cfg.sweep.mix_families:
        return candidate_shapes(cfg.model, vocab, min(1, cfg.sweep.min_layers))
    return family_shapes(cfg.model, vocab, cfg.sweep.min_layers)


def family_text(cfg: DictConfig) -> str:
    m, sw = cfg.model, cfg.sweep
    if sw.mix_families:
        return (f"mixed families (sweep.mix_families=true): aspect ratios within 2x of {m.aspect_ratio}, "
                f"heads of {m.head_dim}, any depth")
    return (f"one family: d_model/n_layer = {m.aspect_ratio}, head_dim {m.head_dim}, "
            f"n_layer >= {sw.min_layers}")


def pick_sizes(shapes: list[GPTConfig], n_opt: float, sizes: int, span: float,
               ladder: bool = False) -> list[GPTConfig]:
    """`sizes` shapes sorted by N. On a family's `ladder` (already log-spaced): the run of
    consecutive rungs centred on n_opt in log N, so the profile has sizes on both sides.
    Otherwise the distinct shapes nearest to targets log-spaced in [n_opt/span, n_opt*span]
    (ties to the shallower shape)."""
    if sizes < 1 or span <= 1:
        raise ConfigError(f"sweep.sizes={sizes} must be >= 1 and sweep.span={span} above 1.")
    if sizes > len(shapes):
        raise ConfigError(f"sweep.sizes={sizes} exceeds the {len(shapes)} model shapes available; lower it "
                          "or raise model.max_depth.")
    if ladder:
        rungs = sorted(shapes, key=lambda s: s.num_params())
        logs = [math.log(s.num_params()) for s in rungs]
        start = min(range(len(rungs) - sizes + 1),
                    key=lambda i: abs(sum(logs[i:i + sizes]) / sizes - math.log(n_opt)))
        return rungs[start:start + sizes]
    targets = np.geomspace(n_opt / span, n_opt * span, sizes) if sizes > 1 else np.array([n_opt])
    chosen: list[GPTConfig] = []
    for target in targets:
        free = [s for s in shapes if s not in chosen]
        chosen.append(min(free, key=lambda s: (abs(math.log(s.num_params() / target)), s.n_layer)))
    return sorted(chosen, key=lambda s: s.num_params())


def size_settings(cfg: DictConfig, shape: GPTConfig, budget: float) -> SizeSettings:
    """The planner's LR, batch and warmup for `shape` at `budget` (its smallest in the grid,
    so the batch leaves enough steps and the warmup fits every budget of the size)."""
    run_cfg = cfg.copy()
    g = shape
    run_cfg.model.depth, run_cfg.model.n_layer, run_cfg.model.d_model, run_cfg.model.n_head = \
        None, g.n_layer, g.d_model, g.n_head
    run_cfg.budget.compute = budget
    plan = make_plan(run_cfg, describe(run_cfg.train.device, run_cfg.train.dtype, measure=False))
    return SizeSettings(lr=plan.lr, batch_tokens=plan.tokens_per_step, warmup_steps=plan.warmup_steps)


def last_constant_step(steps: int, settings: SizeSettings, t: DictConfig) -> int:
    """Completed steps after the last step at the peak LR of a `steps`-step WSD run: where
    its cooldown branches off a longer constant-LR run."""
    at_peak = [i for i in range(steps) if lr_at(i, 1.0, settings.warmup_steps, steps, t.min_lr_ratio, "wsd",
                                              t.decay_frac, t.decay_shape) == 1.0]
    return (at_peak[-1] + 1) if at_peak else 0


def grid(cfg: DictConfig) -> list[Point]:
    """The sweep's points, budget by budget, smallest model first, each with its steps and
    its size's settings; under wsd the trunks carry save_at and the others branch_of."""
    sw = cfg.sweep
    if not sw.budgets:
        raise ConfigError("sweep.budgets is empty; give compute budgets in FLOPs, e.g. sweep.budgets=[1e12,3e12,1e13].")
    if any(not c > 0 for c in sw.budgets):
        raise ConfigError(f"sweep.budgets={list(sw.budgets)} must all be positive FLOP counts.")
    shapes = sweep_shapes(cfg)
    r = cfg.budget.tokens_per_param
    points = []
    for c in sorted(float(c) for c in sw.budgets):
        n_opt = chinchilla_optimal(c, r)[0]
        picked = pick_sizes(shapes, n_opt, sw.sizes, sw.span, ladder=not sw.mix_families)
        if sw.sizes >= 3 and not picked[0].num_params() < n_opt < picked[-1].num_params():
            warnings.warn(f"budget C={c:.3g}: the sizes ({picked[0].num_params():,}..{picked[-1].num_params():,}) "
                          f"do not bracket N_opt~{n_opt:,.0f}; change the budget or model.head_dim/aspect_ratio.")
        points += [Point(c, s, schedule=sw.schedule) for s in picked]
    # ONE LR, batch and warmup for every point: the planner's for the smallest size at the
    # smallest budget. Per-size settings (each size's own smallest budget) gave the larger
    # sizes 2-4x larger batches, so 4-16x fewer steps, and at these scales the step count
    # moved the loss more than the size did (CPU capstone, 2026-11-24: a came out 0.07).
    common = size_settings(cfg, points[0].shape, points[0].budget)
    for p in points:
        p.settings = common
        p.steps = max(1, round(p.budget / p.flops_per_step))
        if p.steps <= p.settings.warmup_steps:
            raise ConfigError(f"{p.name} gets {p.steps} steps, no more than its {p.settings.warmup_steps} warmup steps; "
                              "raise the smallest budget or lower train.batch_tokens.")
    if sw.schedule == "wsd":
        _link_branches(points, cfg.train)
    return points


def _link_branches(points: list[Point], t: DictConfig) -> None:
    """Per size: the longest run is the trunk; every shorter one branches off it."""
    by_size: dict = {}
    for p in points:
        by_size.setdefault(p.size, []).append(p)
    for same in by_size.values():
        trunk = max(same, key=lambda p: p.steps)
        for p in same:
            if p is not trunk:
                p.branch_of, p.branch_step = trunk.name, last_constant_step(p.steps, p.settings, t)
        trunk.save_at = sorted({p.branch_step for p in same if p.branch_of and p.branch_step > 0})


def chains(points: list[Point]) -> list[list[Point]]:
    """Independent groups, each trained in order: a trunk and its branches, or one point."""
    groups: dict = {}
    for p in points:
        key = (p.size, p.seed) if p.schedule == "wsd" else p.name  # a seed repeat never shares a trunk
        groups.setdefault(key, []).append(p)
    ordered = [sorted(g, key=lambda p: (p.branch_of is not None, p.budget)) for g in groups.values()]
    return sorted(ordered, key=lambda g: -sum(p.spent for p in g))  # longest first: better packing


def cosine_grid_flops(points: list[Point]) -> float:
    return float(sum(p.flops_per_step * p.steps for p in points))


# ---------------------------------------------------------------- a sequential design
# Budgets trained smallest first, each one's sizes centred on the N_opt its predecessors'
# IsoFLOP minima extrapolate to (at small scale the optimum can sit far from Chinchilla-20's,
# where a fixed grid misses it), and widened at an edge minimum until the profile brackets it.


@dataclass
class BudgetDesign:
    """The sizes one budget trains and why."""
    budget: float
    target: float  # the N_opt its sizes are centred on
    reason: str  # where the target comes from, in words
    sizes: list[GPTConfig]
    repeats: list[GPTConfig]  # sizes trained again with a second seed: the nearest to the target


def extrapolate_n_opt(minima: list[tuple[float, float]], budget: float, first_slope: float = 0.5,
                      slope_range: tuple[float, float] = (0.25, 0.75)) -> tuple[float, float]:
    """(N_opt at `budget`, the exponent used) from earlier budgets' minima [(C, N)]: one minimum
    extrapolates with `first_slope`; two or more with the least-squares exponent through them,
    clipped to `slope_range` (two noisy minima can give any slope; the target only centres
    the sizes, and an edge minimum still widens them)."""
    if not minima:
        raise ValueError("no earlier minimum to extrapolate from; centre the first budget on a prior N_opt.")
    log_c, log_n = (np.log([m[i] for m in minima]) for i in (0, 1))
    slope = first_slope if len(minima) == 1 else float(np.clip(np.polyfit(log_c, log_n, 1)[0], *slope_range))
    return float(np.exp(log_n.mean() + slope * (math.log(budget) - log_c.mean()))), slope


def design_budget(ladder: list[GPTConfig], budget: float, minima: list[tuple[float, float]], sizes: int,
                  repeats: int = 0, prior_n: Optional[float] = None) -> BudgetDesign:
    """`sizes` consecutive rungs of the family `ladder` centred on the extrapolated N_opt (the
    first budget, with no minima yet: on `prior_n`, default Chinchilla-20's), and the `repeats`
    rungs nearest that target to train again with a second seed."""
    if minima:
        target, slope = extrapolate_n_opt(minima, budget)
        reason = (f"extrapolated from {len(minima)} earlier minimum(a) with exponent {slope:.2f}"
                  + (" (one budget so far: 0.5)" if len(minima) == 1 else ""))
    else:
        target = prior_n or chinchilla_optimal(budget)[0]
        reason = "prior N_opt" if prior_n else "Chinchilla-20 N_opt = sqrt(C/120) (first budget)"
    picked = pick_sizes(ladder, target, sizes, 2.0, ladder=True)
    nearest = sorted(picked, key=lambda s: abs(math.log(s.num_params() / target)))
    return BudgetDesign(budget, target, reason, picked, sorted(nearest[:repeats], key=lambda s: s.num_params()))


def edge_rung(ladder: list[GPTConfig], losses: dict[int, float]) -> Optional[GPTConfig]:
    """The next rung beyond the profile's edge when its lowest loss (`losses`: N -> loss over
    the consecutive rungs tried) is at the smallest or largest size tried; None when the
    minimum is inside, or the ladder has no rung on that side."""
    rungs = sorted(ladder, key=lambda s: s.num_params())
    ns = [s.num_params() for s in rungs]
    tried = sorted(losses)
    best = min(tried, key=losses.get)
    if len(tried) < 2 or tried[0] < best < tried[-1]:
        return None
    i = ns.index(best) + (1 if best == tried[-1] else -1)
    return rungs[i] if 0 <= i < len(rungs) else None


# ---------------------------------------------------------------- the table


def read_table(path: Path) -> dict[str, dict]:
    """Rows of results.jsonl by run name (later rows win)."""
    if not path.exists():
        return {}
    rows = {}
    for k, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise ConfigError(f"{path} line {k} is not valid JSON; fix or delete that line and rerun.") from None
            rows[row["name"]] = row
    return rows


def write_table(path: Path, rows: dict[str, dict]) -> None:
    """Atomic rewrite: a crash mid-write never loses finished points."""
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows.values()))


def is_done(row: Optional[dict], sweep_dir: Path) -> bool:
    return bool(row) and row.get("status") == "ok" and (sweep_dir / row["name"] / "final.json").exists()


def refuse_changed_points(points: list[Point], rows: dict, sweep_dir: Path) -> None:
    """Stop before training when a finished point of the same name was trained with other
    steps, batch or LR than planned now (e.g. after a change of the design's settings): it
    would be reused as if it were the planned run."""
    for p in points:
        row = rows.get(p.name)
        if p.settings is None or not is_done(row, sweep_dir):
            continue
        then = (row.get("steps"), row.get("batch_tokens"), row.get("lr"))
        now = (p.steps, p.settings.batch_tokens, p.settings.lr)
        if any(a is not None and a != b for a, b in zip(then, now)):  # a table from before a column: unchecked
            raise ConfigError(f"{sweep_dir} holds {p.name} trained for {then[0]} steps of {then[1]} tokens at LR "
                              f"{then[2]}, but this sweep plans {now[0]} steps of {now[1]} tokens at LR {now[2]}; "
                              "give a new sweep.dir, or rerun with the settings it was trained with.")


def train_point(overrides: list[str]) -> dict:
    """One run in this process; returns its final metrics. Tests replace this to inject faults."""
    return run(load_config(overrides))


def branch_from_trunk(point: Point, sweep_dir: Path) -> None:
    """Seed a branch's run_dir with its trunk's constant-LR checkpoint (and the trunk's
    metrics up to there, so the branch has a whole training curve). A branch that already
    has checkpoints of its own (an interrupted cooldown) resumes from those instead."""
    run_dir, trunk = sweep_dir / point.name, sweep_dir / point.branch_of
    if ckpt.list_checkpoints(run_dir) or not point.branch_step:
        return
    source = ckpt.step_path(trunk / SAVED_AT, point.branch_step)
    if not source.exists():
        raise ConfigError(f"the trunk {point.branch_of} has no checkpoint after step {point.branch_step} in "
                          f"{source.parent}; delete the trunk's run_dir and rerun the sweep to retrain it.")
    target = ckpt.ckpt_dir(run_dir)
    target.mkdir(parents=True, exist_ok=True)
    for path in (source, ckpt.manifest_path(source)):
        (shutil.copytree if path.is_dir() else shutil.copy2)(path, target / path.name)
    metrics = trunk / "metrics.jsonl"
    if metrics.exists():
        kept = [line for line in metrics.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= point.branch_step]
        (run_dir / "metrics.jsonl").write_text("".join(line + "\n" for line in kept))


def run_point(point: Point, sweep_dir: Path, overrides: list[str], train: Callable[[list[str]], dict]) -> dict:
    """Train one point (a branch from its trunk's checkpoint); its results row, failed or not."""
    start, final, error = time.perf_counter(), None, None
    try:
        if point.branch_of:
            branch_from_trunk(point, sweep_dir)
        final = train(overrides)
    except (KeyboardInterrupt, Interrupted):  # the user stopped the sweep, not a failed point
        raise
    except Exception as err:  # one bad point must not stop the grid
        error = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        (sweep_dir / f"{point.name}.error.txt").write_text(traceback.format_exc())
    return _row(point, sweep_dir, final, time.perf_counter() - start, error)


def _row(point: Point, sweep_dir: Path, final: Optional[dict], seconds: float, error: Optional[str]) -> dict:
    run_dir = sweep_dir / point.name
    g = point.shape
    row = {"name": point.name, "budget": point.budget, "n_layer": g.n_layer, "d_model": g.d_model,
           "n_head": g.n_head, "n_params": g.num_params(), "n_tokens": None, "compute": None, "steps": None,
           "spent": point.spent if point.settings else None, "schedule": point.schedule,
           "branch_of": point.branch_of, "branch_step": point.branch_step,
           "lr": point.settings.lr if point.settings else None,
           "batch_tokens": point.settings.batch_tokens if point.settings else None,
           "seed": point.seed, "val_loss": None, "val_bpb": None, "run_dir": str(run_dir), "seconds": round(seconds, 2),
           "status": "failed" if error else "ok", "error": error}
    plan_file = run_dir / "plan.json"
    if plan_file.exists():  # the plan's actual tokens and compute (whole steps)
        plan = json.loads(plan_file.read_text())
        row.update(n_params=plan["n_params"], n_tokens=plan["n_tokens"], compute=plan["compute"], steps=plan["steps"])
    if final:
        row.update(val_loss=final.get("val_loss"), val_bpb=final.get("val_bpb"))
    return row


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def worker_count(cfg: DictConfig, n_chains: int) -> int:
    """sweep.workers, or on CPU one single-thread process per core (measured faster for tiny
    models than one process using every core), never more than there are chains."""
    if cfg.sweep.workers is not None:
        return max(1, min(cfg.sweep.workers, n_chains))
    return max(1, min(usable_cores(), n_chains)) if on_cpu(cfg) else 1


def on_cpu(cfg: DictConfig) -> bool:
    import torch
    return cfg.train.device == "cpu" or (cfg.train.device == "auto" and not torch.cuda.is_available())


def _run_chain(chain: list[Point], sweep_dir: Path, base: list[str], train: Callable, log_file: Optional[str]) -> list:
    """A worker's job: the chain's points in order (a branch needs its trunk first)."""
    if log_file:  # the runs' own train.log keep their output; the console stays readable
        sys.stdout = sys.stderr = open(log_file, "a", buffering=1)
    rows = []
    for point in chain:
        if _orphaned.is_set():  # the sweep process is gone: never start a run nobody will record
            return rows + [None]
        try:
            rows.append(run_point(point, sweep_dir, base + point.overrides(sweep_dir), train))
        except (KeyboardInterrupt, Interrupted):
            return rows + [None]  # None: stopped here
    return rows


# ~60 lines: one pass in order (compose, plan the points, train them, fit), kept together to read as one.
def run_sweep(overrides: list[str], train: Optional[Callable[[list[str]], dict]] = None,
              log: Callable[[str], None] = print, points: Optional[list[Point]] = None) -> dict:
    """Train every missing point of the grid (or of `points`, a design chosen by the caller,
    e.g. a sequential one), then fit; returns the summary dict."""
    train = train or train_point
    cfg = load_config(overrides)
    if not cfg.sweep.dir:
        raise ConfigError("sweep.dir is not set; give a folder for the sweep, e.g. sweep.dir=sweeps/first.")
    clash = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in POINT_KEYS]
    if clash:
        hint = " (use sweep.schedule)" if clash[0].lstrip("+~").startswith("train.schedule") else ""
        raise ConfigError(f"{clash[0]} is chosen per point by the sweep{hint}; drop it from the command.")
    if any(cfg.budget[k] is not None for k in ("params", "tokens", "minutes")):
        raise ConfigError("the sweep sets budget.compute per point; drop budget.params/tokens/minutes.")
    # A point is scored by its last evaluation: evaluating the untrained model too doubled a short
    # point's evaluation time. Put first, so a user's train.eval_at_start=true wins.
    base = ["train.eval_at_start=false"] + [o for o in overrides if not o.lstrip("+~").startswith("sweep.")]
    sweep_dir = Path(cfg.sweep.dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    table = sweep_dir / RESULTS
    rows = read_table(table)
    points = grid(cfg) if points is None else points
    refuse_changed_points(points, rows, sweep_dir)
    todo = [[p for p in chain if not is_done(rows.get(p.name), sweep_dir)] for chain in chains(points)]
    todo = [chain for chain in todo if chain]
    for p in points:
        if is_done(rows.get(p.name), sweep_dir):
            log(f"{p.name}: done, skipped")
    # A caller's own train function (tests inject faults with one) runs in this process.
    workers = worker_count(cfg, len(todo)) if train is train_point else 1
    if on_cpu(cfg) and cfg.train.num_threads is None:  # the thread count can change the last digits
        base = base + ["train.num_threads=1"]  # harmless to a resume
    log(f"{len(points)} points ({family_text(cfg)}; schedule {cfg.sweep.schedule}); "
        f"{sum(len(c) for c in todo)} to train in {workers} worker(s)")
    done = 0

    def record(row: dict) -> None:
        nonlocal done
        done += 1
        rows[row["name"]] = row
        write_table(table, rows)
        status = "ok" if row["status"] == "ok" else f"FAILED: {row['error']}"
        loss = f"val_loss {row['val_loss']:.4f}, " if row.get("val_loss") is not None else ""
        log(f"[{done}/{sum(len(c) for c in todo)}] {row['name']}: N={row['n_params']:,} {loss}{row['seconds']:.0f}s {status}")

    stopped = False
    if workers == 1:
        for chain in todo:
            for point in chain:
                log(f"{point.name}: N={point.shape.num_params():,}, {point.steps} steps"
                    + (f" (cooldown from step {point.branch_step} of {point.branch_of})" if point.branch_of else ""))
                record(run_point(point, sweep_dir, base + point.overrides(sweep_dir), train))
    else:
        stopped = _run_parallel(todo, sweep_dir, base, train, workers, record)
    if stopped:
        raise Interrupted(2)
    summary = fit_sweep(list(rows.values()), sweep_dir, cfg.sweep.bootstrap) if cfg.sweep.fit else {}
    summary["points"] = len(points)
    summary["family"] = family_text(cfg)
    summary["schedule"] = cfg.sweep.schedule
    summary["workers"] = workers
    summary["flops"] = {"trained": float(sum(p.spent for p in points)), "cosine_grid": cosine_grid_flops(points)}
    summary["failed"] = [r["name"] for r in rows.values() if r["status"] != "ok"]
    (sweep_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=_jsonable))
    (sweep_dir / "summary.md").write_text(summary_markdown(summary, list(rows.values())))
    return summary


_orphaned = threading.Event()  # set in a worker whose sweep process died


def _stop_with_parent(parent: int) -> None:
    """Worker initializer: if the sweep process dies (SIGTERM, kill), SIGTERM this worker,
    so its trainer saves a checkpoint and stops instead of training on as an orphan, and
    mark it orphaned: the executor may already have queued it the next chain (seen in the
    CPU capstone, 2026-11-24: an orphan started a fresh 3e12 point)."""
    import signal

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        _orphaned.set()
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True).start()


def _run_parallel(todo: list[list[Point]], sweep_dir: Path, base: list[str], train: Callable, workers: int,
                  record: Callable[[dict], None]) -> bool:
    """Chains in `workers` spawned processes; True when a signal stopped the sweep."""
    stopped = False
    log_file = str((sweep_dir / "workers.log").resolve())
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"), initializer=_stop_with_parent,
                             initargs=(os.getpid(),)) as pool:
        pending = {pool.submit(_run_chain, chain, sweep_dir, base, train, log_file) for chain in todo}
        try:
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    for row in future.result():
                        if row is None:
                            stopped = True
                        else:
                            record(row)
        except KeyboardInterrupt:  # the workers got the signal too: they save and return
            for future in pending:
                future.cancel()
            stopped = True
    return stopped

# ---------------------------------------------------------------- fits


def _jsonable(x):
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    return str(x)


def fit_sweep(rows: list[dict], out: Path, bootstrap: int = 0) -> dict:
    """IsoFLOP fit grouped by nominal budget, parametric fit with >= 5 points, plots."""
    from picollm import fit

    ok = [r for r in rows if r["status"] == "ok" and r.get("val_loss") is not None and math.isfinite(r["val_loss"])]
    summary: dict = {"ok_points": len(ok), "isoflop": None, "parametric": None, "notes": []}
    if not ok:
        summary["notes"].append("no successful points; nothing to fit.")
        return summary
    budget, n, d, loss = (np.array([r[k] for r in ok], dtype=float) for k in ("budget", "n_params", "n_tokens", "val_loss"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the result lists them
            iso = fit.fit_isoflop(budget, n, loss, d, bootstrap=bootstrap)
        summary["isoflop"] = {"a": iso.a, "a_interval": iso.a_interval, "b": iso.b, "b_interval": iso.b_interval,
                              "interval_method": iso.interval_method, "compute": iso.compute, "n_opt": iso.n_opt,
                              "d_opt": iso.d_opt, "loss_opt": iso.loss_opt, "n_coef": iso.n_coef,
                              "d_coef": iso.d_coef, "warnings": iso.warnings}
        fit.plot_isoflop(iso, out / "isoflop.png")
        fit.plot_optimal_allocation(iso, out / "optimal_allocation.png")
    except ValueError as err:
        summary["notes"].append(f"IsoFLOP fit skipped: {err}")
    if len(ok) >= MIN_PARAMETRIC_POINTS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            par = fit.fit_parametric(n, d, loss, bootstrap=bootstrap)
        law = par.law
        summary["parametric"] = {"E": law.E, "A": law.A, "alpha": law.alpha, "B": law.B, "beta": law.beta,
                                 "a": law.a, "intervals": par.intervals, "objective": par.loss,
                                 "samples": par.samples}
        fit.plot_predicted_vs_measured(law, n, d, loss, out / "predicted_vs_measured.png")
    else:
        summary["notes"].append(f"parametric fit skipped: {len(ok)} points, needs {MIN_PARAMETRIC_POINTS}.")
    return summary


def summary_markdown(summary: dict, rows: list[dict]) -> str:
    """The results table and fits as markdown."""
    lines = ["| run | C (budget) | N | D | D/N | C (actual) | steps | val_loss | val_bpb | s | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["budget"], r["n_params"])):
        dn = f"{r['n_tokens'] / r['n_params']:.1f}" if r.get("n_tokens") else ""
        num = lambda k, f: format(r[k], f) if r.get(k) is not None else ""
        status = r["status"] if r["status"] == "ok" else f"failed: {r.get('error')}"
        if r.get("branch_of"):
            status += f" (cooldown from step {r['branch_step']})"
        lines.append(f"| {r['name']} | {r['budget']:.3g} | {r['n_params']:,} | {num('n_tokens', ',')} | {dn} | "
                     f"{num('compute', '.3e')} | {num('steps', 'd')} | {num('val_loss', '.4f')} | "
                     f"{num('val_bpb', '.4f')} | {r['seconds']:.0f} | {status} |")
    lines += ["", f"Sizes: {summary['family']}." if summary.get("family") else ""]
    flops = summary.get("flops")
    if flops:
        lines.append(f"Schedule: {summary.get('schedule')}; trained {flops['trained']:.3e} FLOPs, "
                     f"{flops['trained'] / flops['cosine_grid']:.0%} of the {flops['cosine_grid']:.3e} that training "
                     "every point from scratch (the cosine grid) takes.")
    iso, par = summary.get("isoflop"), summary.get("parametric")
    if iso:
        lines += ["", "IsoFLOP (Approach 2):",
                  f"- N_opt ~ C^a: a = {iso['a']:.3f} [{iso['a_interval'][0]:.3f}, {iso['a_interval'][1]:.3f}]",
                  f"- D_opt ~ C^b: b = {iso['b']:.3f} [{iso['b_interval'][0]:.3f}, {iso['b_interval'][1]:.3f}]",
                  f"- intervals: {iso['interval_method']}"]
        lines += [f"- warning: {w}" for w in iso["warnings"]]
    if par:
        iv = par["intervals"] or {}
        fmt = lambda k: f"{par[k]:.4g}" + (f" [{iv[k][0]:.4g}, {iv[k][1]:.4g}]" if k in iv else "")
        lines += ["", "Parametric L = E + A/N^alpha + B/D^beta (Approach 3):",
                  "- " + ", ".join(f"{k} = {fmt(k)}" for k in ("E", "A", "alpha", "B", "beta", "a"))]
    lines += [f"- note: {n}" for n in summary.get("notes", [])]
    return "\n".join(lines) + "\n"


USAGE = ("usage: python -m picollm.sweep sweep.budgets=[1e12,3e12] sweep.sizes=5 sweep.dir=DIR "
         "[overrides for every run...]")


def main(argv: Optional[list] = None) -> None:
    overrides = list(sys.argv[1:] if argv is None else argv)
    cfg = cli.parse(overrides, "sweep", USAGE)  # exits on --help, --cfg job or bad input; else argv is overrides
    try:
        summary = run_sweep(overrides)
    except (ConfigError, ValueError) as err:
        raise SystemExit(f"error: {err}")
    except Interrupted as stop:
        print("sweep stopped; rerun the same command to continue (the interrupted point resumes from its checkpoint).")
        raise SystemExit(128 + stop.signum)
    print((Path(cfg.sweep.dir) / "summary.md").read_text())
    if summary["failed"]:
        print(f"{len(summary['failed'])} point(s) failed: {', '.join(summary['failed'])}; rerun to retry them.")


if __name__ == "__main__":
    main()
