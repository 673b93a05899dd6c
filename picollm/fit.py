"""Fitting scaling laws to a sweep of training runs, and plotting the fits.

Two of Hoffmann et al. 2022's approaches:
- Approach 3 (`fit_parametric`): fit L(N, D) = E + A/N^alpha + B/D^beta to every run
  with a Huber loss on log loss, L-BFGS from a grid of starts, bootstrap intervals.
- Approach 2 (`fit_isoflop`): per compute budget, a parabola of loss vs log N gives
  N_opt(C); power laws N_opt ~ C^a and D_opt ~ C^b are fitted through those minima.

CLI: python -m picollm.fit RESULTS_FILE [--out DIR] [--bootstrap K]
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from scipy.optimize import minimize

from picollm.scaling import ScalingLaw, chinchilla_optimal

# Hoffmann et al.'s grid of starting points (their Appendix D.2).
CHINCHILLA_GRID: dict[str, Sequence[float]] = {
    "alpha": np.arange(0.0, 2.01, 0.5),
    "beta": np.arange(0.0, 2.01, 0.5),
    "e": np.arange(-1.0, 1.51, 0.5),
    "a": np.arange(0.0, 25.1, 5.0),
    "b": np.arange(0.0, 25.1, 5.0),
}
_ORDER = ("a", "b", "e", "alpha", "beta")  # layout of the parameter vector theta


# ---------------------------------------------------------------- parametric fit


@dataclass
class FitResult:
    """A parametric fit: the law, its 95% bootstrap intervals (or None) and the objective."""

    law: ScalingLaw
    intervals: dict[str, tuple[float, float]] | None
    loss: float
    samples: np.ndarray | None = None  # bootstrap fits, columns E, A, alpha, B, beta

    E = property(lambda self: self.law.E)
    A = property(lambda self: self.law.A)
    alpha = property(lambda self: self.law.alpha)
    B = property(lambda self: self.law.B)
    beta = property(lambda self: self.law.beta)
    a = property(lambda self: self.law.a)


def _huber_objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray,
                     log_l: np.ndarray, delta: float) -> tuple[float, np.ndarray]:
    """Sum of Huber(LSE(a - alpha log N, b - beta log D, e) - log L) and its gradient.

    Scaled by 1/delta so the objective is O(|r|) and the L-BFGS tolerances mean the same
    whatever delta is. Written with few numpy calls: it runs thousands of times per fit.
    """
    a, b, e, alpha, beta = theta
    t1 = a - alpha * log_n
    t2 = b - beta * log_d
    top = np.maximum(np.maximum(t1, t2), e)
    w1, w2, w3 = np.exp(t1 - top), np.exp(t2 - top), np.exp(e - top)
    total = w1 + w2 + w3
    r = top + np.log(total) - log_l
    c = np.clip(r, -delta, delta)  # Huber'(r)
    value = c @ (r - 0.5 * c)  # = 0.5 r^2 inside delta, delta(|r| - delta/2) outside
    g = c / total  # chain rule through the LSE: d LSE / d t_k = w_k / total
    g1, g2 = g * w1, g * w2
    grad = np.array([g1.sum(), g2.sum(), g @ w3, -(g1 @ log_n), -(g2 @ log_d)])
    return value / delta, grad / delta


def _grid_starts(grid: Mapping[str, Sequence[float]]) -> np.ndarray:
    missing = set(_ORDER) - set(grid)
    if missing:
        raise ValueError(f"grid is missing values for {sorted(missing)}; it needs {_ORDER}.")
    return np.array(list(itertools.product(*(grid[k] for k in _ORDER))), dtype=float)


def _screen(starts: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray,
            delta: float, keep: int | None) -> np.ndarray:
    """The `keep` starts with the lowest objective (all of them when keep is None).

    Ranking starts by their objective before optimising is a shortcut on Chinchilla's
    procedure: on the Chinchilla data about 40% of the 5400 grid starts reach the global
    optimum, among them the ten best-ranked, so L-BFGS from the best few dozen finds the
    full grid's optimum at a hundredth of the cost.
    """
    if keep is None or keep >= len(starts):
        return starts
    a, b, e, alpha, beta = (starts[:, i:i + 1] for i in range(5))
    lse = np.logaddexp(np.logaddexp(a - alpha * log_n, b - beta * log_d), e)
    r = np.abs(lse - log_l)
    value = np.where(r <= delta, 0.5 * r**2, delta * (r - 0.5 * delta)).sum(axis=1)
    return starts[np.argsort(value, kind="stable")[:keep]]


def _best_fit(starts: np.ndarray, args: tuple) -> tuple[np.ndarray, float]:
    """Run L-BFGS from every start and keep the lowest objective."""
    best_x, best_f = None, math.inf
    bounds = [(None, None)] * 3 + [(0.0, None)] * 2  # negative exponents are meaningless
    for x0 in starts:
        res = minimize(_huber_objective, x0, args=args, jac=True, method="L-BFGS-B",
                       bounds=bounds, options={"maxiter": 2000, "ftol": 1e-12, "gtol": 1e-10})
        if np.isfinite(res.fun) and res.fun < best_f:
            best_x, best_f = res.x, float(res.fun)
    if best_x is None:
        raise RuntimeError("every L-BFGS start failed; check the data for zeros or NaNs.")
    return best_x, best_f


def _theta_to_law(theta: np.ndarray) -> ScalingLaw:
    a, b, e, alpha, beta = (float(v) for v in theta)
    return ScalingLaw(E=math.exp(e), A=math.exp(a), alpha=alpha, B=math.exp(b), beta=beta)


def fit_parametric(
    n_params: Sequence[float],
    n_tokens: Sequence[float],
    losses: Sequence[float],
    delta: float = 1e-3,
    grid: Mapping[str, Sequence[float]] | None = None,
    bootstrap: int = 0,
    seed: int = 0,
    n_starts: int | None = 32,
) -> FitResult:
    """Fit L = E + A/N^alpha + B/D^beta the Chinchilla way (Approach 3).

    Minimises the sum of Huber_delta residuals on log loss with L-BFGS from points of
    `grid` (name -> values for a, b, e = log A, log B, log E, alpha and beta; default the
    Chinchilla grid): the `n_starts` with the lowest initial objective, or all of them
    when n_starts is None. `bootstrap` > 0 resamples runs with replacement that many times
    and reports 2.5/97.5 percentiles for E, A, alpha, B, beta and a = beta/(alpha+beta).
    """
    n, d, l = (np.asarray(v, dtype=float).ravel() for v in (n_params, n_tokens, losses))
    if not (len(n) == len(d) == len(l)):
        raise ValueError(f"n_params, n_tokens and losses differ in length: {len(n)}, {len(d)}, {len(l)}.")
    if len(n) < 5:
        raise ValueError(f"need at least 5 runs to fit 5 parameters, got {len(n)}.")
    if not (np.all(n > 0) and np.all(d > 0) and np.all(l > 0) and np.all(np.isfinite(l))):
        raise ValueError("n_params, n_tokens and losses must all be positive and finite.")
    logs = (np.log(n), np.log(d), np.log(l))
    grid_starts = _grid_starts(CHINCHILLA_GRID if grid is None else grid)
    theta, value = _best_fit(_screen(grid_starts, *logs, delta, n_starts), (*logs, delta))
    law = _theta_to_law(theta)
    if bootstrap <= 0:
        return FitResult(law=law, intervals=None, loss=value)

    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(bootstrap):
        idx = rng.integers(0, len(n), size=len(n))
        boot = (logs[0][idx], logs[1][idx], logs[2][idx])
        # The full-data optimum is nearly always in the resample's basin; a few screened
        # grid starts guard against the cases where it is not, at a fraction of the grid's cost.
        starts = np.vstack([theta, _screen(grid_starts, *boot, delta, 4)])
        s = _theta_to_law(_best_fit(starts, (*boot, delta))[0])
        samples.append([s.E, s.A, s.alpha, s.B, s.beta])
    samples = np.array(samples)
    cols = {"E": samples[:, 0], "A": samples[:, 1], "alpha": samples[:, 2],
            "B": samples[:, 3], "beta": samples[:, 4],
            "a": samples[:, 4] / (samples[:, 2] + samples[:, 4])}
    intervals = {k: (float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5)))
                 for k, v in cols.items()}
    return FitResult(law=law, intervals=intervals, loss=value, samples=samples)


# ---------------------------------------------------------------- IsoFLOP fit


@dataclass
class IsoFlopResult:
    """Approach 2: per-budget parabola minima and power laws through them.

    Exponents are fitted in log10 space: log10 N_opt = a log10 C + n_coef and
    log10 D_opt = b log10 C + d_coef. Intervals are 95%; `interval_method` says whether
    they come from the regression's standard errors (Student t) or a bootstrap.
    """

    compute: np.ndarray  # budgets that gave a usable parabola
    n_opt: np.ndarray
    d_opt: np.ndarray
    loss_opt: np.ndarray
    a: float
    b: float
    n_coef: float
    d_coef: float
    a_interval: tuple[float, float]
    b_interval: tuple[float, float]
    interval_method: str
    curves: list[dict] = field(default_factory=list)  # per budget: data, parabola, flags
    warnings: list[str] = field(default_factory=list)

    def predict_n(self, compute):
        """Compute-optimal parameter count at `compute` from the fitted power law."""
        return 10 ** (self.n_coef + self.a * np.log10(compute))

    def predict_d(self, compute):
        """Compute-optimal token count at `compute` from the fitted power law."""
        return 10 ** (self.d_coef + self.b * np.log10(compute))


def _group_budgets(compute: np.ndarray, rtol: float = 1e-6) -> list[np.ndarray]:
    """Indices of runs grouped by equal compute (within a relative tolerance)."""
    order = np.argsort(compute)
    groups, current = [], [order[0]]
    for i in order[1:]:
        if abs(compute[i] - compute[current[0]]) <= rtol * compute[current[0]]:
            current.append(i)
        else:
            groups.append(np.array(current))
            current = [i]
    groups.append(np.array(current))
    return groups


def _budget_minimum(c: float, n: np.ndarray, l: np.ndarray, d: np.ndarray | None) -> dict:
    """Fit loss = p(log10 N) for one budget; return its minimum and diagnostics."""
    x = np.log10(n)
    curve = {"compute": c, "n_params": n, "losses": l, "coeffs": None,
             "n_opt": math.nan, "d_opt": math.nan, "loss_opt": math.nan,
             "bracketed": False, "problem": None}
    if len(np.unique(x)) < 3:
        curve["problem"] = f"budget C={c:.3g} has {len(np.unique(x))} model sizes; a parabola needs 3."
        return curve
    coeffs = np.polyfit(x, l, 2)
    curve["coeffs"] = coeffs
    if coeffs[0] <= 0:
        curve["problem"] = f"budget C={c:.3g}: loss vs log N is not convex (no minimum); skipped."
        return curve
    x_opt = -coeffs[1] / (2 * coeffs[0])
    curve["n_opt"] = 10**x_opt
    curve["loss_opt"] = float(np.polyval(coeffs, x_opt))
    if d is None:
        curve["d_opt"] = c / (6 * curve["n_opt"])
    else:
        # Tokens actually trained, read off a line through log D vs log N at the minimum.
        slope, icpt = np.polyfit(x, np.log10(d), 1)
        curve["d_opt"] = 10 ** (icpt + slope * x_opt)
    # Bracketed: the best measured run is not at an end and the vertex lies inside the grid.
    best = int(np.argmin(l))
    inside = x.min() < x_opt < x.max()
    curve["bracketed"] = bool(inside and x.min() < x[best] < x.max())
    if not curve["bracketed"]:
        side = "larger" if x_opt >= x.max() or x[best] == x.max() else "smaller"
        curve["problem"] = (f"budget C={c:.3g}: the loss minimum (N~{curve['n_opt']:.3g}) is at or "
                            f"beyond the edge of the sizes tried; add {side} models for this budget.")
    return curve


def _power_law(c: np.ndarray, y: np.ndarray) -> tuple[float, float, tuple[float, float]]:
    """Least squares log10 y = slope log10 c + icpt, with a 95% t interval on the slope."""
    from scipy.stats import t as student_t

    x, v = np.log10(c), np.log10(y)
    (slope, icpt), cov = np.polyfit(x, v, 1, cov="unscaled")
    dof = len(x) - 2
    if dof < 1:
        return float(slope), float(icpt), (math.nan, math.nan)
    resid = v - (icpt + slope * x)
    se = math.sqrt(cov[0, 0] * (resid @ resid) / dof)
    half = student_t.ppf(0.975, dof) * se
    return float(slope), float(icpt), (float(slope - half), float(slope + half))


def fit_isoflop(
    compute: Sequence[float],
    n_params: Sequence[float],
    losses: Sequence[float],
    n_tokens: Sequence[float] | None = None,
    bootstrap: int = 0,
    seed: int = 0,
) -> IsoFlopResult:
    """Fit N_opt(C) and D_opt(C) from IsoFLOP profiles (Hoffmann et al. Approach 2).

    Runs sharing a compute value (relative tolerance 1e-6) form one profile. D_opt is
    C/(6 N_opt), or read from `n_tokens` when given. Budgets with fewer than 3 sizes or a
    non-convex profile are skipped; budgets whose minimum is not bracketed by the sizes
    tried are kept but warned about (see `warnings`). With `bootstrap` > 0 the exponent
    intervals come from resampling runs within each budget; otherwise from the
    regression's standard error.
    """
    c, n, l = (np.asarray(v, dtype=float).ravel() for v in (compute, n_params, losses))
    d = None if n_tokens is None else np.asarray(n_tokens, dtype=float).ravel()
    if not (len(c) == len(n) == len(l)) or (d is not None and len(d) != len(c)):
        raise ValueError("compute, n_params, losses (and n_tokens) must have the same length.")
    if len(c) == 0:
        raise ValueError("no runs to fit.")
    if not all(np.all(np.isfinite(v) & (v > 0)) for v in (c, n, l) + (() if d is None else (d,))):
        raise ValueError("compute, n_params, losses and n_tokens must all be positive and finite.")
    groups = _group_budgets(c)
    curves = [_budget_minimum(c[g[0]], n[g], l[g], None if d is None else d[g]) for g in groups]
    notes = [cv["problem"] for cv in curves if cv["problem"]]
    for msg in notes:
        warnings.warn(msg, stacklevel=2)
    good = [cv for cv in curves if math.isfinite(cv["n_opt"])]
    if len(good) < 2:
        raise ValueError(
            f"only {len(good)} compute budget(s) gave a usable loss minimum; IsoFLOP fitting needs "
            "at least 2 budgets, each with 3 or more model sizes around the optimum."
        )
    cs = np.array([cv["compute"] for cv in good])
    n_opt = np.array([cv["n_opt"] for cv in good])
    d_opt = np.array([cv["d_opt"] for cv in good])
    a, n_coef, a_int = _power_law(cs, n_opt)
    b, d_coef, b_int = _power_law(cs, d_opt)
    method = "regression standard error (Student t, 95%)"

    if bootstrap > 0:
        rng = np.random.default_rng(seed)
        good_groups = [g for g, cv in zip(groups, curves) if math.isfinite(cv["n_opt"])]
        a_s, b_s = [], []
        for _ in range(bootstrap):
            mins = []
            for g in good_groups:
                gi = rng.choice(g, size=len(g), replace=True)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # resamples may be degenerate
                    cv = _budget_minimum(c[g[0]], n[gi], l[gi], None if d is None else d[gi])
                if math.isfinite(cv["n_opt"]):
                    mins.append((cv["compute"], cv["n_opt"], cv["d_opt"]))
            if len(mins) >= 2:
                m = np.array(mins)
                a_s.append(_power_law(m[:, 0], m[:, 1])[0])
                b_s.append(_power_law(m[:, 0], m[:, 2])[0])
        if a_s:
            a_int = tuple(float(q) for q in np.percentile(a_s, [2.5, 97.5]))
            b_int = tuple(float(q) for q in np.percentile(b_s, [2.5, 97.5]))
            method = f"bootstrap over runs within budgets ({len(a_s)} resamples, 2.5/97.5 percentiles)"

    return IsoFlopResult(
        compute=cs, n_opt=n_opt, d_opt=d_opt, loss_opt=np.array([cv["loss_opt"] for cv in good]),
        a=a, b=b, n_coef=n_coef, d_coef=d_coef, a_interval=a_int, b_interval=b_int,
        interval_method=method, curves=curves, warnings=notes,
    )


# ---------------------------------------------------------------- results table


@dataclass
class Runs:
    """Columns of a results table as float arrays."""

    n_params: np.ndarray
    n_tokens: np.ndarray
    compute: np.ndarray
    val_loss: np.ndarray
    # The IsoFLOP grouping: a sweep's nominal budget per run where the table has one, else the
    # actual compute (a sweep's sizes round to whole steps, so their actual compute differs).
    budget: np.ndarray | None = None
    grouped_by: str = "compute"


def _read_rows(path: Path) -> list[dict]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a text file; give a CSV or JSON-lines results table.") from None
    is_json = path.suffix.lower() in (".jsonl", ".ndjson", ".json") or text.lstrip().startswith("{")
    if is_json:
        rows = []
        for k, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}: line {k} is not valid JSON ({err.msg}); fix or delete that line.") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path}: line {k} is not a JSON object with named columns; fix or delete that line.")
                rows.append(row)
        return rows
    return list(csv.DictReader(text.splitlines()))


def _drop_unfinished(path: Path, rows: list[dict]) -> list[dict]:
    """A sweep's results.jsonl also lists failed runs (status "failed"); only finished ones fit."""
    kept = [r for r in rows if r.get("status") in (None, "", "ok")]
    if len(kept) < len(rows):
        warnings.warn(f"{path}: dropped {len(rows) - len(kept)} run(s) whose status is not ok.", stacklevel=3)
    return kept


def load_runs(path: str | Path) -> Runs:
    """Read a sweep's results (CSV or JSON lines, e.g. the sweep's own results.jsonl) with columns
    n_params, n_tokens, compute, val_loss and optionally budget and status.

    Other columns are ignored. A missing n_tokens or compute is derived from C = 6*N*D;
    runs whose val_loss is empty or not finite (diverged, unfinished), or whose status is not
    ok, are dropped with a warning.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"results file {path} does not exist; check the path (a sweep writes "
                                "SWEEP_DIR/results.jsonl).")
    if not path.is_file():
        raise ValueError(f"results file {path} is a folder; give the table inside it, e.g. {path / 'results.jsonl'}.")
    rows = _read_rows(path)
    if not rows:
        raise ValueError(f"{path} holds no runs (it is empty or only a header); run the sweep first, or give "
                         "a table with one row per run.")
    present = set().union(*rows)
    if not {"n_params", "val_loss"} <= present or not {"n_tokens", "compute"} & present:
        raise ValueError(
            f"{path} needs columns n_params, val_loss and at least one of n_tokens, compute; "
            f"found {sorted(present)}."
        )
    rows = _drop_unfinished(path, rows)

    def column(name: str) -> np.ndarray:
        # Blank or absent cells become NaN so that one bad row does not hide the rest.
        values = []
        for k, r in enumerate(rows, 1):
            cell = r.get(name)
            try:
                values.append(math.nan if cell in (None, "") else float(cell))
            except (TypeError, ValueError):
                raise ValueError(f"{path}: run {k} has {name}={cell!r}, which is not a number; fix or delete "
                                 "that run.") from None
        return np.array(values, dtype=float)

    n, d, c, l, budget = (column(k) for k in ("n_params", "n_tokens", "compute", "val_loss", "budget"))
    d = np.where(np.isnan(d), c / (6 * n), d)
    c = np.where(np.isnan(c), 6 * n * d, c)
    ok = np.isfinite(l)
    if not ok.all():
        warnings.warn(f"{path}: dropped {int((~ok).sum())} run(s) whose val_loss is missing or "
                      "not finite.", stacklevel=2)
    bad = np.flatnonzero(ok & ~(np.isfinite(n) & np.isfinite(d) & np.isfinite(c)))
    if len(bad):
        raise ValueError(f"{path}: run {bad[0] + 1} lacks n_params or both n_tokens and compute.")
    for name, values in (("n_params", n), ("n_tokens", d), ("compute", c), ("val_loss", l)):
        nonpositive = np.flatnonzero(ok & ~(values > 0))
        if len(nonpositive):
            k = nonpositive[0]
            raise ValueError(f"{path}: run {k + 1} has {name}={values[k]:g}; it must be positive.")
    has_budget = ok & np.isfinite(budget) & (budget > 0)
    grouped_by = "budget" if has_budget.any() else "compute"
    budget = np.where(has_budget, budget, c)
    return Runs(n_params=n[ok], n_tokens=d[ok], compute=c[ok], val_loss=l[ok], budget=budget[ok],
                grouped_by=grouped_by)


# ---------------------------------------------------------------- plots


def _figure(**kw):
    # An explicit Agg canvas: no display needed and pyplot's global state left alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kw)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def plot_isoflop(result: IsoFlopResult, path: str | Path) -> Path:
    """Loss vs N for each budget, with its parabola and minimum."""
    from matplotlib import colormaps

    fig = _figure(figsize=(6.5, 4.5))
    ax = fig.add_subplot()
    cmap = colormaps["viridis"]
    curves = sorted(result.curves, key=lambda cv: cv["compute"])
    for i, cv in enumerate(curves):
        color = cmap(i / max(len(curves) - 1, 1))
        ax.scatter(cv["n_params"], cv["losses"], color=color, s=14, label=f"C={cv['compute']:.2g}")
        if cv["coeffs"] is not None and cv["coeffs"][0] > 0:
            x = np.log10(cv["n_params"])
            xs = np.linspace(x.min(), x.max(), 100)
            ax.plot(10**xs, np.polyval(cv["coeffs"], xs), color=color, lw=1)
            ax.scatter([cv["n_opt"]], [cv["loss_opt"]], color=color, marker="*", s=90,
                       edgecolor="black", linewidths=0.5, zorder=3)
    ax.set_xscale("log")
    ax.set_xlabel("parameters N")
    ax.set_ylabel("validation loss")
    ax.set_title("IsoFLOP profiles (stars: fitted minima)")
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def plot_optimal_allocation(result: IsoFlopResult, path: str | Path) -> Path:
    """N_opt(C) and D_opt(C) on log-log axes, fitted lines and the Chinchilla-20 rule."""
    fig = _figure(figsize=(6.5, 4.5))
    ax = fig.add_subplot()
    cs = np.geomspace(result.compute.min() / 3, result.compute.max() * 3, 50)
    ax.scatter(result.compute, result.n_opt, color="C0", label="N_opt (IsoFLOP minima)")
    ax.plot(cs, result.predict_n(cs), color="C0", label=f"N ~ C^{result.a:.3f}")
    ax.scatter(result.compute, result.d_opt, color="C1", label="D_opt")
    ax.plot(cs, result.predict_d(cs), color="C1", label=f"D ~ C^{result.b:.3f}")
    chin = np.array([chinchilla_optimal(c) for c in cs])
    ax.plot(cs, chin[:, 0], "C0--", lw=1, label="Chinchilla D=20N: N")
    ax.plot(cs, chin[:, 1], "C1--", lw=1, label="Chinchilla D=20N: D")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("compute C (FLOPs)")
    ax.set_ylabel("parameters / tokens")
    ax.set_title("Compute-optimal allocation")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_predicted_vs_measured(law: ScalingLaw, n, d, loss, path: str | Path) -> Path:
    """Each run's measured loss against the law's prediction, coloured by compute."""
    n, d, loss = (np.asarray(v, dtype=float) for v in (n, d, loss))
    pred = law.loss(n, d)
    fig = _figure(figsize=(5, 5))
    ax = fig.add_subplot()
    sc = ax.scatter(pred, loss, c=np.log10(6 * n * d), s=14, cmap="viridis")
    fig.colorbar(sc, ax=ax, label="log10 C (6ND)")
    lo, hi = min(pred.min(), loss.min()), max(pred.max(), loss.max())
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x")
    ax.set_xlabel("predicted loss")
    ax.set_ylabel("measured loss")
    rmse = float(np.sqrt(np.mean((np.log(pred) - np.log(loss)) ** 2)))
    ax.set_title(f"Parametric fit (RMSE of log loss {rmse:.4f})")
    ax.legend()
    return _save(fig, path)


# ---------------------------------------------------------------- CLI


def _fmt_interval(iv: tuple[float, float] | None) -> str:
    return "" if iv is None else f"  [{iv[0]:.4g}, {iv[1]:.4g}]"


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status 0: fitted (a fit that needs more runs is reported as skipped); 1: the table
    or the plot folder is unusable, with one sentence on stderr."""
    p = argparse.ArgumentParser(prog="python -m picollm.fit",
                                description="Fit scaling laws to a sweep's results table.")
    p.add_argument("results", help="CSV or JSON-lines file with n_params, n_tokens, compute, val_loss "
                                   "(a sweep's results.jsonl works as is; its budget column groups the IsoFLOP profiles)")
    p.add_argument("--out", default=".", help="folder for the plots (default: current folder)")
    p.add_argument("--bootstrap", type=int, default=0, help="bootstrap resamples for 95%% intervals")
    args = p.parse_args(argv)
    if args.bootstrap < 0:
        p.error(f"--bootstrap {args.bootstrap} must be 0 (no resampling) or more.")
    try:
        with warnings.catch_warnings(record=True) as dropped:
            warnings.simplefilter("always")
            runs = load_runs(args.results)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)  # an unusable --out fails before the fits, not after
        print(f"{len(runs.val_loss)} runs from {args.results}")
        for note in dropped:
            print(f"  note: {note.message}")
        _report_fits(runs, out, args.bootstrap)
    except OSError as err:
        if err.filename is None:  # load_runs's own sentence
            print(f"error: {err}", file=sys.stderr)
        else:
            print(f"error: could not write {err.filename} ({err.strerror}); give --out a writable folder.",
                  file=sys.stderr)
        return 1
    except (ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def _report_fits(runs: Runs, out: Path, bootstrap: int) -> None:
    print("\nApproach 3: L(N, D) = E + A/N^alpha + B/D^beta  (Huber on log loss, L-BFGS)")
    if len(runs.val_loss) < 5:
        print(f"  skipped: {len(runs.val_loss)} runs; fitting 5 parameters needs at least 5.")
    else:
        fit = fit_parametric(runs.n_params, runs.n_tokens, runs.val_loss, bootstrap=bootstrap)
        iv = fit.intervals or {}
        for k in ("E", "A", "alpha", "B", "beta", "a"):
            print(f"  {k:6s} = {getattr(fit, k):.4g}{_fmt_interval(iv.get(k))}")
        path = plot_predicted_vs_measured(fit.law, runs.n_params, runs.n_tokens, runs.val_loss,
                                          out / "predicted_vs_measured.png")
        print(f"  plot: {path}")

    by = "the nominal budget column" if runs.grouped_by == "budget" else "equal compute"
    print(f"\nApproach 2: IsoFLOP profiles (runs grouped by {by})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # listed in the result and printed below
            groups = runs.compute if runs.budget is None else runs.budget
            iso = fit_isoflop(groups, runs.n_params, runs.val_loss, runs.n_tokens, bootstrap=bootstrap)
    except ValueError as err:
        print(f"  skipped: {err}")
        return
    for msg in iso.warnings:
        print(f"  warning: {msg}")
    print(f"  N_opt ~ C^a: a = {iso.a:.4f}{_fmt_interval(iso.a_interval)}")
    print(f"  D_opt ~ C^b: b = {iso.b:.4f}{_fmt_interval(iso.b_interval)}")
    print(f"  intervals: {iso.interval_method}")
    print(f"  plots: {plot_isoflop(iso, out / 'isoflop.png')}, "
          f"{plot_optimal_allocation(iso, out / 'optimal_allocation.png')}")


if __name__ == "__main__":
    raise SystemExit(main())
