"""IsoFLOP sweeps: a grid of compute budgets x model sizes, trained, tabled and fitted.

    python -m picollm.sweep sweep.budgets=[1e12,3e12,1e13] sweep.sizes=5 sweep.dir=sweeps/a \
        model.seq_len=128 tokenizer.vocab_size=1024

Design:
- ``sweep.*`` settings live in ``SweepSchema`` (config.py), so Hydra type-checks them. Every
  other override is passed to each run unchanged; each run's own config keeps ``sweep`` at
  its defaults, so changing the grid never invalidates a finished run.
- For budget C the sizes are log-spaced from N_opt/span to N_opt*span around the
  Chinchilla-20 optimum N_opt = sqrt(C/(6r)); each target gets the nearest (n_layer,
  d_model) shape with d_model a multiple of model.head_dim and d_model/n_layer within 2x of
  model.aspect_ratio. Each run is planned with ``budget.compute=C`` and its explicit shape,
  so D = C / flops_per_token and its LR schedule spans exactly its own steps.
- Runs train in-process one after another (fast: no interpreter start per point). A run
  that raises is recorded with status "failed" and its error sentence; the sweep goes on.
- ``results.jsonl`` (one JSON object per point, rewritten atomically after every point) has
  n_params, n_tokens, compute (the plan's actual FLOPs), val_loss, val_bpb, budget (the
  nominal C, used to group IsoFLOP profiles because actual compute differs by < 1 step),
  n_layer, d_model, steps, run_dir, seconds, status, error. ``fit.load_runs`` reads it.
  A point with status ok and a final.json is skipped on rerun; failed points are retried.
- At the end: IsoFLOP fit (N_opt ~ C^a, D_opt ~ C^b), the parametric law when >= 5 points
  succeeded, plots, and summary.json / summary.md.
"""

from __future__ import annotations

import json
import math
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from omegaconf import DictConfig

from picollm.config import ConfigError, load_config, parse_cli
from picollm.model import GPTConfig
from picollm.plan import vocab_size_for
from picollm.scaling import chinchilla_optimal
from picollm.train import Interrupted, run

RESULTS = "results.jsonl"
# Keys the sweep sets per point; the same keys in the user's overrides would clash.
POINT_KEYS = ("model.depth", "model.n_layer", "model.d_model", "model.n_head", "budget.compute", "run_dir")
MIN_PARAMETRIC_POINTS = 5


@dataclass
class Point:
    budget: float
    shape: GPTConfig

    @property
    def name(self) -> str:
        mant, exp = f"{self.budget:.2e}".split("e")
        return f"C{mant.rstrip('0').rstrip('.')}e{int(exp)}_L{self.shape.n_layer}_d{self.shape.d_model}"

    def overrides(self, sweep_dir: Path) -> list[str]:
        g = self.shape
        return ["model.depth=null", f"model.n_layer={g.n_layer}", f"model.d_model={g.d_model}",
                f"model.n_head={g.n_head}", f"budget.compute={self.budget!r}", f"run_dir={sweep_dir / self.name}"]


# ---------------------------------------------------------------- the grid


def candidate_shapes(m: DictConfig, vocab_size: int) -> list[GPTConfig]:
    """Every (n_layer, d_model) with d_model a multiple of head_dim and an aspect ratio
    d_model/n_layer within 2x of model.aspect_ratio: finer steps in N than depth alone."""
    common = dict(seq_len=m.seq_len, vocab_size=vocab_size, arch=m.arch, mlp_hidden=m.mlp_hidden,
                  qk_norm=m.qk_norm, rope_theta=m.rope_theta)
    shapes = []
    for n_layer in range(1, m.max_depth + 1):
        lo, hi = n_layer * m.aspect_ratio / 2, n_layer * m.aspect_ratio * 2
        for heads in range(1, int(hi // m.head_dim) + 1):
            d_model = heads * m.head_dim
            if lo <= d_model <= hi:
                shapes.append(GPTConfig(n_layer=n_layer, d_model=d_model, n_head=heads, **common))
    if not shapes:
        raise ConfigError(f"no model shape has d_model (a multiple of model.head_dim={m.head_dim}) within 2x of "
                          f"model.aspect_ratio={m.aspect_ratio} per layer; lower model.head_dim.")
    return shapes


def pick_sizes(shapes: list[GPTConfig], n_opt: float, sizes: int, span: float) -> list[GPTConfig]:
    """`sizes` distinct shapes nearest to targets log-spaced in [n_opt/span, n_opt*span],
    sorted by N. Ties go to the aspect ratio nearest the shapes' median, for tidy models."""
    if sizes < 1 or span <= 1:
        raise ConfigError(f"sweep.sizes={sizes} must be >= 1 and sweep.span={span} above 1.")
    if sizes > len(shapes):
        raise ConfigError(f"sweep.sizes={sizes} exceeds the {len(shapes)} model shapes available; lower it.")
    targets = np.geomspace(n_opt / span, n_opt * span, sizes) if sizes > 1 else np.array([n_opt])
    chosen: list[GPTConfig] = []
    for target in targets:
        free = [s for s in shapes if s not in chosen]
        chosen.append(min(free, key=lambda s: (abs(math.log(s.num_params() / target)), s.n_layer)))
    return sorted(chosen, key=lambda s: s.num_params())


def grid(cfg: DictConfig) -> list[Point]:
    """The sweep's points, budget by budget, smallest model first."""
    sw = cfg.sweep
    if not sw.budgets:
        raise ConfigError("sweep.budgets is empty; give compute budgets in FLOPs, e.g. sweep.budgets=[1e12,3e12,1e13].")
    if any(not c > 0 for c in sw.budgets):
        raise ConfigError(f"sweep.budgets={list(sw.budgets)} must all be positive FLOP counts.")
    shapes = candidate_shapes(cfg.model, vocab_size_for(cfg.tokenizer))
    r = cfg.budget.tokens_per_param
    points = []
    for c in sorted(float(c) for c in sw.budgets):
        n_opt = chinchilla_optimal(c, r)[0]
        picked = pick_sizes(shapes, n_opt, sw.sizes, sw.span)
        if sw.sizes >= 3 and not picked[0].num_params() < n_opt < picked[-1].num_params():
            warnings.warn(f"budget C={c:.3g}: the sizes ({picked[0].num_params():,}..{picked[-1].num_params():,}) "
                          f"do not bracket N_opt~{n_opt:,.0f}; change the budget or model.head_dim/aspect_ratio.")
        points += [Point(c, s) for s in picked]
    return points


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
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows.values()))
    tmp.replace(path)


def is_done(row: Optional[dict], sweep_dir: Path) -> bool:
    return bool(row) and row.get("status") == "ok" and (sweep_dir / row["name"] / "final.json").exists()


def train_point(overrides: list[str]) -> dict:
    """One run in this process; returns its final metrics. Tests replace this to inject faults."""
    return run(load_config(overrides))


def _row(point: Point, sweep_dir: Path, final: Optional[dict], seconds: float, error: Optional[str]) -> dict:
    run_dir = sweep_dir / point.name
    g = point.shape
    row = {"name": point.name, "budget": point.budget, "n_layer": g.n_layer, "d_model": g.d_model,
           "n_head": g.n_head, "n_params": g.num_params(), "n_tokens": None, "compute": None, "steps": None,
           "val_loss": None, "val_bpb": None, "run_dir": str(run_dir), "seconds": round(seconds, 2),
           "status": "failed" if error else "ok", "error": error}
    plan_file = run_dir / "plan.json"
    if plan_file.exists():  # the plan's actual tokens and compute (whole steps)
        plan = json.loads(plan_file.read_text())
        row.update(n_params=plan["n_params"], n_tokens=plan["n_tokens"], compute=plan["compute"], steps=plan["steps"])
    if final:
        row.update(val_loss=final.get("val_loss"), val_bpb=final.get("val_bpb"))
    return row


def run_sweep(overrides: list[str], train: Optional[Callable[[list[str]], dict]] = None,
              log: Callable[[str], None] = print) -> dict:
    """Train every missing point of the grid, then fit; returns the summary dict."""
    train = train or train_point
    cfg = load_config(overrides)
    if not cfg.sweep.dir:
        raise ConfigError("sweep.dir is not set; give a folder for the sweep, e.g. sweep.dir=sweeps/first.")
    clash = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in POINT_KEYS]
    if clash:
        raise ConfigError(f"{clash[0]} is chosen per point by the sweep; drop it from the command.")
    if any(cfg.budget[k] is not None for k in ("params", "tokens", "minutes")):
        raise ConfigError("the sweep sets budget.compute per point; drop budget.params/tokens/minutes.")
    base = [o for o in overrides if not o.lstrip("+~").startswith("sweep.")]
    sweep_dir = Path(cfg.sweep.dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    table = sweep_dir / RESULTS
    rows = read_table(table)
    points = grid(cfg)
    for i, point in enumerate(points, 1):
        if is_done(rows.get(point.name), sweep_dir):
            log(f"[{i}/{len(points)}] {point.name}: done, skipped")
            continue
        log(f"[{i}/{len(points)}] {point.name}: N={point.shape.num_params():,} training")
        start, final, error = time.perf_counter(), None, None
        try:
            final = train(base + point.overrides(sweep_dir))
        except (KeyboardInterrupt, Interrupted):  # the user stopped the sweep, not a failed point
            raise
        except Exception as err:  # one bad point must not stop the grid
            error = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            (sweep_dir / f"{point.name}.error.txt").write_text(traceback.format_exc())
            log(f"[{i}/{len(points)}] {point.name}: FAILED: {error}")
        rows[point.name] = _row(point, sweep_dir, final, time.perf_counter() - start, error)
        write_table(table, rows)
    summary = fit_sweep(list(rows.values()), sweep_dir, cfg.sweep.bootstrap) if cfg.sweep.fit else {}
    summary["points"] = len(points)
    summary["failed"] = [r["name"] for r in rows.values() if r["status"] != "ok"]
    (sweep_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=_jsonable))
    (sweep_dir / "summary.md").write_text(summary_markdown(summary, list(rows.values())))
    return summary


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
        lines.append(f"| {r['name']} | {r['budget']:.3g} | {r['n_params']:,} | {num('n_tokens', ',')} | {dn} | "
                     f"{num('compute', '.3e')} | {num('steps', 'd')} | {num('val_loss', '.4f')} | "
                     f"{num('val_bpb', '.4f')} | {r['seconds']:.0f} | {status} |")
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


def main(argv: Optional[list] = None) -> None:
    overrides = parse_cli(sys.argv[1:] if argv is None else argv,
                          "usage: python -m picollm.sweep sweep.budgets=[1e12,3e12] sweep.sizes=5 sweep.dir=DIR "
                          "[overrides for every run...]")
    try:
        summary = run_sweep(overrides)
    except (ConfigError, ValueError) as err:
        raise SystemExit(f"error: {err}")
    except Interrupted as stop:
        print("sweep stopped; rerun the same command to continue (the interrupted point resumes from its checkpoint).")
        raise SystemExit(128 + stop.signum)
    print((Path(load_config(overrides).sweep.dir) / "summary.md").read_text())
    if summary["failed"]:
        print(f"{len(summary['failed'])} point(s) failed: {', '.join(summary['failed'])}; rerun to retry them.")


if __name__ == "__main__":
    main()
