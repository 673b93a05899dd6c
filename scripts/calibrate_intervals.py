"""Do the 95% prediction intervals of picollm.fit mean what they say? A hold-out check.

    python scripts/calibrate_intervals.py --data ../shared/data/chinchilla_fig4_epoch.csv
    python scripts/calibrate_intervals.py --data PATH --fractions 0.1,0.2 --bootstrap 50 --random

For each hold-out fraction f: the runs with the largest compute (the top f of C = 6ND)
are held out, the parametric law is fitted with a bootstrap over the remaining runs, and
each held-out loss is checked against its prediction interval (the law's bootstrap spread
plus the measured scatter of one run, see picollm.fit.predict_loss). The table shows the
coverage of that interval and of the law-only interval beside it; with --random, a
random hold-out of the same size too (interpolation rather than extrapolation).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from picollm.fit import holdout_calibration, read_chinchilla_epoch  # noqa: E402


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="Epoch's chinchilla_fig4_epoch.csv")
    p.add_argument("--fractions", default="0.05,0.1,0.2,0.3", help="comma-separated hold-out fractions")
    p.add_argument("--bootstrap", type=int, default=100, help="bootstrap resamples of runs per fit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--random", action="store_true", help="also hold out random runs (interpolation)")
    args = p.parse_args(argv)
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
