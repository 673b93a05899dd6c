"""The CPU scaling-law capstone: a shape-consistent WSD IsoFLOP sweep, fits, and one held-out
prediction at 10x the largest fit budget, written down before that run trains.

    python scripts/capstone.py             # full: 4 budgets spanning 30x + the held-out run, ~40 min on 2 cores
    python scripts/capstone.py --quick     # tiny version for validation, a few minutes
    python scripts/capstone.py --estimate  # planned FLOPs and time (a 1 s throughput probe per shape), trains nothing

Steps: sweep (picollm.sweep, resumable; 2 single-thread workers) -> IsoFLOP (Approach 2) and
parametric (Approach 3) fits with intervals -> the compute-optimal family shape at 10x the
largest budget and its predicted loss with a 95% interval to prediction.json BEFORE it
trains -> train it -> capstone.md with the plots.

Grid choice (made from --estimate before any held-out result; do not tune it after one):
- One shape family, aspect ratio d_model/n_layer = 8, head size 8, 2+ layers, vocabulary 512,
  sequence 64. The first capstone mixed 1-layer models and aspect ratios 4x apart, and the
  shape-to-shape scatter (~0.1 in loss) swamped the size effect. A narrow family keeps
  the ladder fine (N = 16k, 33k, 82k, 129k, 190k, 342k, 459k, ...: about 1.5-2.5x per
  rung) so 4 consecutive rungs can be centred on N_opt even at the smallest budget.
- Budgets 1e11, 3e11, 1e12, 3e12 FLOPs: the 30x span the issue asks for. The held-out run at
  10x the largest (3e13) costs about as much as the whole sweep, so the largest budget
  is what 40 minutes allow: the WSD sweep trains ~1.4e13 FLOPs (the cosine grid would
  need ~1.8e13), the held-out run 3e13; --estimate measures this machine's rate per shape.
- 4 sizes per budget (consecutive rungs around N_opt): 3 points fix a parabola, the fourth
  checks it; 5 would push the smallest budget's profile onto 1-layer-like 16k models.
- sweep.schedule=wsd (constant LR, last 20% decayed linearly): one trunk per size gives
  every smaller budget's point as a cooldown branch (Hagele et al. 2024), so sizes that
  recur across budgets cost one run.
- Every point, and the held-out run, trains with one LR, batch and warmup (the planner's
  for the smallest size at the smallest budget) and the same schedule. The first full run
  (2026-11-24) gave each size the planner's settings at its own smallest budget: larger
  sizes got 2-4x larger batches and 4-16x fewer steps, the 3e12 profile's minimum fell on
  its smallest size and a came out 0.07. That was seen in the sweep, before the held-out
  run trained; the held-out run was stopped, this rule changed, and the capstone rerun.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from picollm import fit, sweep  # noqa: E402
from picollm.config import load_config  # noqa: E402
from picollm.hardware import describe  # noqa: E402
from picollm.scaling import ScalingLaw  # noqa: E402
from picollm.train import Interrupted  # noqa: E402

# Only the end-of-schedule evaluation counts for a WSD point (mid-run losses of a constant-LR
# run are not end-of-schedule losses), so no periodic evaluations: they would cost ~25%.
COMMON = ["model.head_dim=8", "model.aspect_ratio=8", "train.device=cpu", "train.dtype=fp32",
          "train.report=false", "train.log_every=1000", "train.eval_every=1000000",
          "sweep.schedule=wsd", "sweep.workers=2"]
FULL = dict(budgets=[1e11, 3e11, 1e12, 3e12], sizes=4, bootstrap=200,
            overrides=["model.seq_len=64", "tokenizer.vocab_size=512", "train.eval_tokens=65536"] + COMMON)
QUICK = dict(budgets=[3e8, 1e9, 3e9], sizes=3, bootstrap=30,
             overrides=["model=tiny", "model.seq_len=32", "tokenizer.vocab_size=300", "tokenizer.train_chars=300000",
                        "data.max_docs=150", "data.val_fraction=0.05", "train.eval_tokens=2048",
                        "train.batch_tokens=256"] + COMMON)
HELD_OUT_FACTOR = 10.0
TARGET_MINUTES = 40
PER_POINT_SECONDS = 4.0  # start-up, plan, evaluations and export of one point, measured on the tiny runs


def sweep_overrides(spec: dict, out: Path) -> list[str]:
    budgets = ",".join(repr(float(c)) for c in spec["budgets"])
    return spec["overrides"] + [f"sweep.budgets=[{budgets}]", f"sweep.sizes={spec['sizes']}",
                                f"sweep.bootstrap={spec['bootstrap']}", f"sweep.dir={out / 'sweep'}"]


# ---------------------------------------------------------------- the plan and its cost


def held_out_point(spec: dict, out: Path, n_target: float) -> sweep.Point:
    """The family shape nearest n_target at 10x the largest budget, trained exactly as the
    sweep's points are: the sweep's one LR, batch and warmup, and its schedule."""
    cfg = load_config(sweep_overrides(spec, out))
    c = HELD_OUT_FACTOR * max(spec["budgets"])
    shape = min(sweep.sweep_shapes(cfg), key=lambda s: abs(math.log(s.num_params() / n_target)))
    point = sweep.Point(c, shape, schedule=cfg.sweep.schedule, settings=sweep.grid(cfg)[0].settings)
    point.steps = max(1, round(c / point.flops_per_step))
    return point


def shape_rate(point: sweep.Point, threads: int, seconds: float = 1.0) -> float:
    """Measured training FLOP/s of the point's shape and micro-batch with `threads` threads."""
    import torch

    from picollm.throughput import measure_train_flops

    torch.set_num_threads(threads)
    micro = min(16, point.settings.batch_tokens // point.shape.seq_len)
    return measure_train_flops(point.shape, micro, describe("cpu", "fp32", measure=False), seconds)


def estimate(spec: dict, out: Path, gflops: float | None) -> dict:
    """Planned FLOPs of the sweep (WSD as trained, and the cosine grid it replaces) and of the
    held-out run, and the wall time: chains packed on the workers at each shape's measured
    single-thread rate (or `gflops` for all), the held-out run alone with 2 threads."""
    cfg = load_config(sweep_overrides(spec, out))
    points = sweep.grid(cfg)
    held = held_out_point(spec, out, _chinchilla_n(HELD_OUT_FACTOR * max(spec["budgets"])))
    rates: dict = {}
    for p in points + [held]:
        if p.size not in rates:
            rates[p.size] = gflops * 1e9 if gflops else shape_rate(p, 1)
    chain_seconds = sorted((sum(p.spent / rates[p.size] + PER_POINT_SECONDS for p in chain)
                            for chain in sweep.chains(points)), reverse=True)
    workers = [0.0] * sweep.worker_count(cfg, len(chain_seconds))
    for s in chain_seconds:  # longest first onto the least loaded worker, as the pool does
        workers[workers.index(min(workers))] += s
    held_rate = gflops * 1e9 if gflops else shape_rate(held, 2)
    return {"points": len(points), "sizes": len(rates) - 1, "family": sweep.family_text(cfg),
            "sweep_flops": sum(p.spent for p in points), "cosine_grid_flops": sweep.cosine_grid_flops(points),
            "held_out_flops": held.flops_per_step * held.steps, "held_out_shape": held.name,
            "sweep_seconds": max(workers), "held_out_seconds": held.spent / held_rate + PER_POINT_SECONDS,
            "rates_gflops": {f"L{k[0]}_d{k[1]}": round(v / 1e9, 2) for k, v in rates.items()}}


def _chinchilla_n(c: float) -> float:
    return math.sqrt(c / 120)


def print_estimate(est: dict) -> None:
    total = est["sweep_seconds"] + est["held_out_seconds"]
    print(f"grid: {est['points']} points, {est['family']}")
    print(f"sweep: {est['sweep_flops']:.3g} FLOPs trained (WSD; the cosine grid: {est['cosine_grid_flops']:.3g}), "
          f"~{est['sweep_seconds'] / 60:.1f} min on the workers")
    print(f"held-out: {est['held_out_shape']}, {est['held_out_flops']:.3g} FLOPs, ~{est['held_out_seconds'] / 60:.1f} min")
    print(f"total: ~{total / 60:.0f} min (training GFLOP/s per shape, one thread: {est['rates_gflops']})")
    if total > TARGET_MINUTES * 60:  # the time is about linear in the budgets
        print(f"over {TARGET_MINUTES} min: --scale {TARGET_MINUTES * 60 / total:.2f} would fit; decide before the "
              "first run, never after seeing a held-out result")


# ---------------------------------------------------------------- prediction


def _law(par: dict) -> ScalingLaw:
    return ScalingLaw(E=par["E"], A=par["A"], alpha=par["alpha"], B=par["B"], beta=par["beta"])


def optimal_n(summary: dict, c: float) -> tuple[float, str]:
    """N_opt at c from a settled Approach 2 law, else Approach 3's."""
    iso, par = summary.get("isoflop"), summary.get("parametric")
    if iso and not iso["warnings"] and iso["a"] > 0:
        return 10 ** (iso["n_coef"] + iso["a"] * math.log10(c)), "Approach 2 (IsoFLOP minima)"
    return _law(par).optimal(c)[0], "Approach 3 (parametric law)"


def predict(summary: dict, rows: list[dict], n: float, d: float) -> dict:
    """Loss from the parametric law with a 95% interval: the fit helper's prediction interval
    (bootstrap laws plus the measured run-to-run scatter) where it exists, else the spread
    of the bootstrap laws alone."""
    par = summary["parametric"]
    law = _law(par)
    samples = np.asarray(par["samples"], dtype=float) if par.get("samples") is not None else None
    if hasattr(fit, "predict_loss") and hasattr(fit, "measure_scatter"):
        ok = [r for r in rows if r["status"] == "ok" and r.get("val_loss")]
        scatter = fit.measure_scatter(law, [r["n_params"] for r in ok], [r["n_tokens"] for r in ok],
                                      [r["val_loss"] for r in ok])
        p = fit.predict_loss(law, n, d, samples=samples, scatter=scatter)
        return {"loss": float(p["loss"]), "interval": [float(x) for x in np.ravel(p["interval"])],
                "interval_method": "fit.predict_loss: bootstrap laws + measured run scatter"}
    out = {"loss": float(law.loss(n, d)), "interval": None, "interval_method": "bootstrap laws only"}
    if samples is not None:
        losses = samples[:, 0] + samples[:, 1] / n ** samples[:, 2] + samples[:, 3] / d ** samples[:, 4]
        out["interval"] = [float(q) for q in np.percentile(losses, [2.5, 97.5])]
    return out


# ---------------------------------------------------------------- report


def plot_prediction(summary: dict, rows: list[dict], pred: dict, measured: float | None, path: Path) -> None:
    """Predicted vs measured: every sweep point and the held-out run with its interval."""
    from picollm.figures import new_figure, save_figure

    law = _law(summary["parametric"])
    ok = [r for r in rows if r["status"] == "ok" and r.get("val_loss")]
    fig = new_figure(figsize=(5, 5))
    ax = fig.add_subplot()
    ax.scatter([law.loss(r["n_params"], r["n_tokens"]) for r in ok], [r["val_loss"] for r in ok], s=14,
               label="sweep points (fit)")
    if measured is not None:
        lo, hi = pred["interval"] or (pred["loss"], pred["loss"])
        ax.errorbar([pred["loss"]], [measured], xerr=[[pred["loss"] - lo], [hi - pred["loss"]]], fmt="o",
                    color="crimson", capsize=4, label=f"held-out (10x), 95% interval")
    values = [r["val_loss"] for r in ok] + ([measured] if measured else [])
    lims = [min(values) * 0.97, max(values) * 1.03]
    ax.plot(lims, lims, "k--", lw=0.8)
    ax.set(xlabel="predicted loss", ylabel="measured loss", title="Predicted vs measured")
    ax.legend()
    save_figure(fig, path)


def report(spec: dict, summary: dict, pred: dict, measured: float | None, out: Path, est: dict) -> str:
    iso, par = summary.get("isoflop"), summary.get("parametric")
    table = (out / "sweep" / "summary.md").read_text()
    lines = ["# picollm CPU capstone", "",
             f"{len(spec['budgets'])} budgets ({min(spec['budgets']):.3g} to {max(spec['budgets']):.3g} FLOPs, "
             f"{max(spec['budgets']) / min(spec['budgets']):.0f}x) x {spec['sizes']} sizes, {summary.get('family')}; "
             f"schedule {summary.get('schedule')}. Overrides: `{' '.join(spec['overrides'])}`.", "",
             f"Planned before training (--estimate): sweep ~{est['sweep_seconds'] / 60:.0f} min, held-out "
             f"~{est['held_out_seconds'] / 60:.0f} min.", "",
             "## Runs and fits", "", table, "",
             "![IsoFLOP curves](sweep/isoflop.png) ![fitted frontier](sweep/optimal_allocation.png) "
             "![predicted vs measured](prediction.png)", "",
             "**How N_opt grows with compute (N_opt ∝ C^a; Chinchilla: a ≈ 0.5):**"]
    if iso:
        lo, hi = iso["a_interval"]
        lines.append(f"- Approach 2 (IsoFLOP minima): a = {iso['a']:.3f} (95% [{lo:.3f}, {hi:.3f}])"
                     + ("; warnings: " + "; ".join(iso["warnings"]) if iso["warnings"] else ""))
    if par:
        iv = (par.get("intervals") or {}).get("a")
        lines.append(f"- Approach 3 (parametric law): a = beta/(alpha+beta) = {par['a']:.3f}"
                     + (f" (95% [{iv[0]:.3f}, {iv[1]:.3f}])" if iv else ""))
    lines.append(f"Approach 1 and the three side by side: `python -m picollm.fit results={out / 'sweep' / sweep.RESULTS}`.")
    lines += ["", "## Held-out prediction", "",
              f"Budget C = {pred['compute']:.3g} ({HELD_OUT_FACTOR:g}x the largest); N_opt {pred['n_target']:,.0f} from "
              f"{pred['n_source']} -> {pred['name']} (N={pred['n_params']:,}, D={pred['n_tokens']:,}).",
              f"- predicted (prediction.json, written before training): {pred['loss']:.4f}"
              + (f" (95% [{pred['interval'][0]:.4f}, {pred['interval'][1]:.4f}], {pred['interval_method']})"
                 if pred.get("interval") else "")]
    if measured is not None:
        err = measured - pred["loss"]
        inside = bool(pred.get("interval")) and pred["interval"][0] <= measured <= pred["interval"][1]
        lines.append(f"- measured: {measured:.4f} (error {err:+.4f}, {100 * err / measured:+.1f}%, "
                     + ("inside" if inside else "outside") + " the 95% interval)")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny grid for validation (minutes)")
    p.add_argument("--dir", default=None, help="output folder (default runs/capstone or runs/capstone-quick)")
    p.add_argument("--estimate", action="store_true", help="print the planned FLOPs and time and stop")
    p.add_argument("--gflops", type=float, default=None,
                   help="assume this training GFLOP/s for every shape instead of probing each for 1 s")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply every budget (span and held-out factor unchanged) to fit the time "
                        "--estimate reports; choose it before the first run, never after a held-out result")
    args = p.parse_args(argv)
    spec = dict(QUICK if args.quick else FULL)
    spec["budgets"] = [args.scale * c for c in spec["budgets"]]
    out = Path(args.dir or ("runs/capstone-quick" if args.quick else "runs/capstone"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bracketing warnings repeat in the sweep's own log
        est = estimate(spec, out, args.gflops)
    print_estimate(est)
    if args.estimate:
        return 0

    start = time.perf_counter()
    try:
        summary = sweep.run_sweep(sweep_overrides(spec, out))
    except Interrupted as stop:
        print("capstone stopped; rerun the same command to continue where it left off.")
        return 128 + stop.signum
    rows = list(sweep.read_table(out / "sweep" / sweep.RESULTS).values())
    if not summary.get("parametric"):
        raise SystemExit("error: the parametric fit is missing (too few successful runs); see sweep/summary.md and rerun.")
    pred_file = out / "prediction.json"
    if not pred_file.exists():  # the first prediction stands; reruns never rewrite it after the fact
        c = HELD_OUT_FACTOR * max(spec["budgets"])
        n_target, source = optimal_n(summary, c)
        point = held_out_point(spec, out, n_target)
        n, d = point.shape.num_params(), point.steps * point.settings.batch_tokens
        pred = {"compute": c, "n_target": n_target, "n_source": source, "name": point.name, "n_params": n,
                "n_tokens": d, "steps": point.steps, "lr": point.settings.lr,
                "batch_tokens": point.settings.batch_tokens, "warmup_steps": point.settings.warmup_steps,
                "n_layer": point.shape.n_layer, "d_model": point.shape.d_model, "written_at": time.time(),
                "sweep_minutes": (time.perf_counter() - start) / 60, **predict(summary, rows, n, d)}
        pred_file.write_text(json.dumps(pred, indent=2))
    pred = json.loads(pred_file.read_text())
    print(f"prediction for {pred['name']}: loss {pred['loss']:.4f} {pred.get('interval')}")
    point = held_out_point(spec, out, pred["n_target"])
    assert point.name == pred["name"], "the held-out point must be the one predicted"
    extra = ["train.num_threads=2"]  # it trains alone
    final = sweep.train_point(spec["overrides"] + extra + point.overrides(out))
    measured = final.get("val_loss")
    plot_prediction(summary, rows, pred, measured, out / "prediction.png")
    (out / "capstone.md").write_text(report(spec, summary, pred, measured, out, est))
    print((out / "capstone.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
