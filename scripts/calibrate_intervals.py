"""Do the 95% intervals of picollm.fit mean what they say? A hold-out check on published
runs, and a simulation at a capstone's own design.

    python scripts/calibrate_intervals.py --data ../shared/data/chinchilla_fig4_epoch.csv
    python scripts/calibrate_intervals.py --data PATH --fractions 0.1,0.2 --bootstrap 50 --random
    python scripts/calibrate_intervals.py --capstone runs/capstone --simulations 60   # ~25 s each, one thread

For each hold-out fraction f: the runs with the largest compute (the top f of C = 6ND)
are held out, the parametric law is fitted with a bootstrap over the remaining runs, and
each held-out loss is checked against its prediction interval (the law's bootstrap spread
plus the measured scatter of one run, see picollm.fit.predict_loss). The table shows the
coverage of that interval and of the law-only interval beside it; with --random, a
random hold-out of the same size too (interpolation rather than extrapolation).

With --capstone DIR: the capstone's fitted law (Approach 3 on its seed-averaged points) is
taken as the truth, and --simulations sets of losses are drawn at the design's own (N, D)
with the measured scatter of a point about the law (normal in log loss). Each is fitted
as the capstone fits, with Approach 3's bootstrap resampling whole points and with the
design held fixed (fit_parametric's `resample`); the table shows how often each 95%
interval of the exponent a covers the true one, its median width, and the width an exact
interval would have (2 x 1.96 x the sd of a over the simulations).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from picollm import sweep  # noqa: E402
from picollm.fit import RESAMPLES, fit_parametric, holdout_calibration, read_chinchilla_epoch  # noqa: E402


def calibration_table(n, d, loss, fractions, bootstrap: int, seed: int = 0, random: bool = False,
                      **fit_kwargs) -> list[dict]:
    """holdout_calibration at each fraction (largest compute; then random ones with `random`)."""
    rows = [holdout_calibration(n, d, loss, f, bootstrap=bootstrap, seed=seed, **fit_kwargs) for f in fractions]
    if random:
        rows += [holdout_calibration(n, d, loss, f, bootstrap=bootstrap, seed=seed, largest=False, **fit_kwargs)
                 for f in fractions]
    return rows


def markdown(rows: list[dict], level: float = 0.95) -> str:
    lines = [f"| hold-out | fraction | fit / held | largest fit C | held-out C | coverage ({level:.0%} PI) | "
             "coverage (law only) | median abs error | median PI width | scatter sd | a [95%] |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lo, hi = r["held_compute_range"]
        a_lo, a_hi = r["a_interval"]
        lines.append(f"| {r['holdout']} | {r['holdout_fraction']:g} | {r['n_fit']} / {r['n_held']} | "
                     f"{r['fit_compute_max']:.2e} | {lo:.2e} - {hi:.2e} | {r['coverage']:.0%} | "
                     f"{r['coverage_law_only']:.0%} | {r['median_abs_rel_error']:.2%} | {r['median_rel_width']:.2%} | "
                     f"{r['total_sd']:.2%} | {r['a']:.3f} [{a_lo:.3f}, {a_hi:.3f}] |")
    return "\n".join(lines)


def exponent_coverage(n, d, law, noise_sd: float, simulations: int, bootstrap: int, seed: int = 0,
                      resamples=RESAMPLES, **fit_kwargs) -> dict:
    """Losses drawn `simulations` times from `law` at (n, d) with `noise_sd` of normal scatter
    in log loss, each fitted with every kind of bootstrap in `resamples`: per kind, how many
    95% intervals of a covered law.a and their median width; and the spread of the estimate."""
    n, d = np.asarray(n, dtype=float), np.asarray(d, dtype=float)
    rng = np.random.default_rng(seed)
    estimates, found = [], {m: [] for m in resamples}
    for k in range(simulations):
        loss = law.loss(n, d) * np.exp(rng.normal(0.0, noise_sd, len(n)))
        for m in resamples:
            fit = fit_parametric(n, d, loss, bootstrap=bootstrap, seed=k, resample=m, **fit_kwargs)
            found[m].append(fit.intervals["a"])
        estimates.append(fit.a)
    kinds = {m: {"covered": sum(lo <= law.a <= hi for lo, hi in iv), "median_width": float(np.median(np.diff(iv)))}
             for m, iv in found.items()}
    return {"true_a": law.a, "noise_sd": noise_sd, "simulations": simulations, "bootstrap": bootstrap,
            "sd_a": float(np.std(estimates)), "exact_width": float(2 * 1.96 * np.std(estimates)), "kinds": kinds}


def capstone_coverage(folder: Path, simulations: int, bootstrap: int, seed: int = 0) -> dict:
    """exponent_coverage at a finished capstone's design, law and measured scatter."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import capstone

    results = folder / "sweep" / "results.jsonl"
    if not results.is_file():
        raise SystemExit(f"error: {results} does not exist; give --capstone the --dir of a capstone that has trained.")
    rows = list(sweep.read_table(results).values())  # a resumed sweep's later rows win, as in the capstone
    fits = capstone.fit_all(rows, 0, average=True)
    main = capstone.primary(rows, average=True)
    n, d = ([r[k] for r in main] for k in ("n_params", "n_tokens"))
    return exponent_coverage(n, d, fits.par.law, fits.scatter.total_sd, simulations, bootstrap, seed,
                             delta=capstone.A3_HUBER_DELTA)


def coverage_markdown(cov: dict) -> str:
    lines = [f"true a {cov['true_a']:.3f}, scatter {cov['noise_sd']:.2%} in log loss, {cov['simulations']} "
             f"simulations, {cov['bootstrap']} resamples each; sd of a {cov['sd_a']:.3f}, so an exact 95% interval "
             f"is ~{cov['exact_width']:.3f} wide", "",
             "| Approach 3's bootstrap | covered | coverage | median width |", "|---|---|---|---|"]
    for m, k in cov["kinds"].items():
        lines.append(f"| {m} | {k['covered']} / {cov['simulations']} | {k['covered'] / cov['simulations']:.0%} | "
                     f"{k['median_width']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="Epoch's chinchilla_fig4_epoch.csv")
    p.add_argument("--capstone", help="a capstone's --dir: simulate at its design instead")
    p.add_argument("--simulations", type=int, default=60, help="simulated capstones (with --capstone)")
    p.add_argument("--fractions", default="0.05,0.1,0.2,0.3", help="comma-separated hold-out fractions")
    p.add_argument("--bootstrap", type=int, default=100, help="bootstrap resamples of runs per fit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--random", action="store_true", help="also hold out random runs (interpolation)")
    args = p.parse_args(argv)
    if (args.data is None) == (args.capstone is None):
        p.error("give one of --data (the published runs' hold-out check) or --capstone (a simulation at its design).")
    if args.capstone is not None:
        if args.simulations < 1 or args.bootstrap < 1:
            p.error("--simulations and --bootstrap must be at least 1.")
        start = time.perf_counter()
        cov = capstone_coverage(Path(args.capstone), args.simulations, args.bootstrap, args.seed)
        print(f"{args.capstone} ({time.perf_counter() - start:.0f} s)\n")
        print(coverage_markdown(cov))
        return 0
    try:
        fractions = [float(f) for f in args.fractions.split(",")]
    except ValueError:
        p.error(f"--fractions {args.fractions!r} must be numbers separated by commas, e.g. 0.1,0.2.")
    if not Path(args.data).is_file():
        print(f"error: {args.data} does not exist; give --data the path of chinchilla_fig4_epoch.csv.", file=sys.stderr)
        return 1
    n, d, loss = read_chinchilla_epoch(args.data)
    start = time.perf_counter()
    rows = calibration_table(n, d, loss, fractions, args.bootstrap, args.seed, args.random)
    print(f"{len(loss)} runs from {args.data}; {args.bootstrap} bootstrap resamples per fit "
          f"({time.perf_counter() - start:.0f} s)\n")
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
