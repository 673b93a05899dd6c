"""Over-training, measured: when does a smaller model trained longer beat the compute-optimal one?

    python scripts/overtraining.py SWEEP_DIR/results.jsonl [--budget C] [--law summary.json] [--bootstrap K]

The reference is the run with the lowest loss at the budget (default: the largest in the
table), i.e. the measured compute-optimal model (N_ref, D_ref, L_ref). Every smaller model
with runs at two or more token counts (a WSD sweep gives one per budget) is compared with
it at equal lifetime compute, training plus 2N FLOPs per inference token (Sardana et al.
2024): the crossover is the inference budget I* beyond which the smaller model wins,
    I* = (6 N_s D_s* - 6 N_ref D_ref) / (2 (N_ref - N_s)),
where D_s* is the tokens it needs to reach L_ref. Measured D_s*: interpolated between its
runs (log loss vs log D). Predicted D_s*: from the law fitted to the same table (or
--law), with a 95% interval over bootstrap refits. Both are printed side by side.
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from picollm.fit import fit_parametric, load_results  # noqa: E402
from picollm.scaling import crossover_rows, load_law, reference_run  # noqa: E402


def _fmt(x: float) -> str:
    return "never" if x == math.inf else ("not bracketed" if math.isnan(x) else f"{x:.3g}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", help="a sweep's results.jsonl (or CSV with n_params, n_tokens, val_loss)")
    p.add_argument("--budget", type=float, default=None, help="the reference budget (default: the largest)")
    p.add_argument("--law", default=None, help="a law JSON (a sweep's summary.json) instead of fitting the table")
    p.add_argument("--bootstrap", type=int, default=100, help="bootstrap refits for the predicted band")
    args = p.parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            table = load_results(args.results)
            samples = None
            if args.law:
                law = load_law(args.law)[1]
            else:
                fit = fit_parametric(table.n_params, table.n_tokens, table.val_loss, bootstrap=args.bootstrap)
                law, samples = fit.law, fit.samples
        groups = table.budget if table.budget is not None else table.compute
        ref = reference_run(groups, table.val_loss, args.budget)
        rows = crossover_rows(table.n_params, table.n_tokens, table.val_loss, ref, law, samples)
    except (OSError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    n_ref, d_ref = table.n_params[ref], table.n_tokens[ref]
    print(f"reference: N={n_ref:.4g}, D={d_ref:.4g} (D/N {d_ref / n_ref:.1f}), "
          f"measured loss {table.val_loss[ref]:.4f}; law: E={law.E:.3g} A={law.A:.3g} alpha={law.alpha:.3g} "
          f"B={law.B:.3g} beta={law.beta:.3g}")
    if not rows:
        print("no smaller model has runs at two or more token counts; a WSD sweep (sweep.schedule=wsd) gives them.")
        return 0
    print("\n| N small | N/N_ref | D* measured | D* predicted | I* measured (tokens) | I* predicted [95%] |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        pred, meas = r["predicted"], r["measured"]
        band = f" [{_fmt(r['predicted_band'][0])}, {_fmt(r['predicted_band'][1])}]" if r["predicted_band"] else ""
        print(f"| {r['n_small']:.4g} | {r['n_small'] / table.n_params[ref]:.2f} | {_fmt(r['measured_d'])} | "
              f"{_fmt(pred['d_small'])} | {_fmt(meas['inference_tokens']) if meas else _fmt(r['measured_d'])} | "
              f"{_fmt(pred['inference_tokens'])}{band} |")
    print("\nI*: inference tokens beyond which the smaller model, trained on the compute the cheaper inference "
          "saves, reaches a lower loss than the reference at equal lifetime compute.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
