"""Fitting scaling laws to a sweep of training runs, with intervals that hold for new runs.

Hoffmann et al. 2022's three approaches:
- Approach 1 (`fit_envelope`): the lower envelope of loss over compute across training
  curves (or end-of-schedule losses at several budgets per size); the N attaining it at
  each C gives N_opt ~ C^a.
- Approach 2 (`fit_isoflop`): per compute budget, a parabola of loss vs log N gives
  N_opt(C); power laws N_opt ~ C^a and D_opt ~ C^b are fitted through those minima.
- Approach 3 (`fit_parametric`): fit L(N, D) = E + A/N^alpha + B/D^beta to every run
  with a Huber loss on log loss, L-BFGS from a grid of starts.

Intervals come from bootstraps: over whole runs, or with the design's (N, D) held fixed over
the runs' residuals (always for Approach 2, on request for Approach 3). A new run's
predicted loss (`predict_loss`, `FitResult.predict`) adds the measured scatter of runs
about the law (`measure_scatter`: shape-to-shape and seed-to-seed) to the law's own
uncertainty; `holdout_calibration` checks how often those intervals cover runs larger
than any the fit saw; `exponent_agreement` compares the approaches' exponents.

CLI: python -m picollm.fit results=RESULTS_FILE [out=DIR] [bootstrap=K] [curves=true] [resample=runs]
"""

from __future__ import annotations

import contextlib
import csv
import functools
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

from picollm import cli
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
RESAMPLES = ("runs", "residuals")  # what Approach 3's bootstrap can resample (fit_parametric)


# ---------------------------------------------------------------- parametric fit


@dataclass
class FitResult:
    """A parametric fit: the law, its 95% bootstrap intervals (or None) and the objective."""

    law: ScalingLaw
    intervals: dict[str, tuple[float, float]] | None
    loss: float
    samples: np.ndarray | None = None  # bootstrap fits, columns E, A, alpha, B, beta
    scatter: "Scatter | None" = None  # measured run-to-run scatter around the law (see Scatter)

    E = property(lambda self: self.law.E)
    A = property(lambda self: self.law.A)
    alpha = property(lambda self: self.law.alpha)
    B = property(lambda self: self.law.B)
    beta = property(lambda self: self.law.beta)
    a = property(lambda self: self.law.a)

    def predict(self, n_params, n_tokens, level: float = 0.95, seed: int = 0) -> dict:
        """The loss of one new run at (N, D) with a `level` prediction interval; see predict_loss."""
        return predict_loss(self.law, n_params, n_tokens, self.samples, self.scatter, level, seed)


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


@functools.lru_cache(maxsize=1)
def _openblas_thread_controls() -> tuple:
    """(set, get) function pairs of every OpenBLAS this process has loaded (numpy's and scipy's
    ship their own); empty where none is found (another BLAS, or no /proc)."""
    import ctypes

    try:
        paths = {line.split()[-1] for line in open("/proc/self/maps") if "openblas" in line.lower()}
    except OSError:
        return ()
    controls = []
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for suffix in ("", "64_"):
            for prefix in ("scipy_openblas", "openblas"):
                setter, getter = (getattr(lib, f"{prefix}_{verb}_num_threads{suffix}", None) for verb in ("set", "get"))
                if setter is not None and getter is not None:
                    controls.append((setter, getter))
    return tuple(controls)


@contextlib.contextmanager
def _one_blas_thread():
    """L-BFGS-B's BLAS calls work on 5-vectors, where threads only cost: with OpenBLAS's idle
    threads spinning on a busy 2-core machine, 20 fits took 6.5 s of CPU instead of 0.10 s."""
    controls = _openblas_thread_controls()
    before = [get() for _, get in controls]
    for set_threads, _ in controls:
        set_threads(1)
    try:
        yield
    finally:
        for (set_threads, _), n in zip(controls, before):
            set_threads(n)


def _best_fit(starts: np.ndarray, args: tuple) -> tuple[np.ndarray, float]:
    """Run L-BFGS from every start and keep the lowest objective."""
    best_x, best_f = None, math.inf
    bounds = [(None, None)] * 3 + [(0.0, None)] * 2  # negative exponents are meaningless
    with _one_blas_thread():
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
    # A resample can leave a coefficient unpinned (log A running off to ~1e3): it becomes inf,
    # an honest "unbounded" in that sample's interval, instead of an OverflowError.
    with np.errstate(over="ignore"):
        E, A, B = (float(np.exp(v)) for v in (e, a, b))
    return ScalingLaw(E=E, A=A, alpha=alpha, B=B, beta=beta)


def fit_parametric(
    n_params: Sequence[float],
    n_tokens: Sequence[float],
    losses: Sequence[float],
    delta: float = 1e-3,
    grid: Mapping[str, Sequence[float]] | None = None,
    bootstrap: int = 0,
    seed: int = 0,
    n_starts: int | None = 32,
    resample: str = "runs",
) -> FitResult:
    """Fit L = E + A/N^alpha + B/D^beta the Chinchilla way (Approach 3).

    Minimises the sum of Huber_delta residuals on log loss with L-BFGS from points of
    `grid` (name -> values for a, b, e = log A, log B, log E, alpha and beta; default the
    Chinchilla grid): the `n_starts` with the lowest initial objective, or all of them
    when n_starts is None. `bootstrap` > 0 refits that many resamples and reports 2.5/97.5
    percentiles for E, A, alpha, B, beta and a = beta/(alpha+beta). What is resampled:
    - "runs": whole runs with replacement, for runs gathered from anywhere (the published
      ones, a table of past runs): which (N, D) were tried is itself a sample.
    - "residuals": the (N, D) held fixed and each run's log loss redrawn as the law's value
      plus a residual drawn from all of them (scaled by sqrt(runs / (runs - 5)) for the 5
      fitted parameters), for a designed grid, as Approach 2's bootstrap does: the sizes and
      budgets are the experimenter's choice, and a resample that drops a profile's edge
      sizes asks what a different design would have found, not what other runs of this one
      would. On 180 simulated capstones (three real designs and their measured scatter) its
      95% interval of a covered the true exponent 169 times, against 170 for resampling
      runs, 14-20% narrower and nearer the estimate's true spread (BENCHMARKS.md).
    """
    if resample not in RESAMPLES:
        raise ValueError(f"resample={resample!r} must be 'runs' or 'residuals'.")
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
    scatter = measure_scatter(law, n, d, l)
    if bootstrap <= 0:
        return FitResult(law=law, intervals=None, loss=value, scatter=scatter)

    rng = np.random.default_rng(seed)
    if resample == "residuals":
        fitted = np.log(law.loss(n, d))
        residuals = (logs[2] - fitted) * math.sqrt(len(n) / max(1, len(n) - N_LAW_PARAMETERS))
    samples = []
    for _ in range(bootstrap):
        if resample == "runs":
            idx = rng.integers(0, len(n), size=len(n))
            boot = (logs[0][idx], logs[1][idx], logs[2][idx])
        else:
            boot = (logs[0], logs[1], fitted + rng.choice(residuals, size=len(n)))
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
    return FitResult(law=law, intervals=intervals, loss=value, samples=samples, scatter=scatter)


# ---------------------------------------------------------------- scatter and prediction intervals

N_LAW_PARAMETERS = 5  # E, A, alpha, B, beta: the degrees of freedom a parametric fit uses up


@dataclass
class Scatter:
    """How far single runs fall from a fitted law, in natural-log units of loss (0.01 ~ 1%).

    Runs that share (N, D) exactly are repeats (different seeds). With repeats:
      seed_sd  = pooled within-repeat sd of log loss (seed-to-seed scatter), on
                 `seed_dof` = sum(k_g - 1) degrees of freedom;
      shape_sd = what remains of the residuals of the repeat MEANS around the law once
                 their share of seed noise is taken out:
                 sqrt(max(0, s_means^2 - seed_sd^2 * mean(1/k_g))), with
                 s_means^2 = sum(resid_g^2) / (groups - 5). It holds shape-to-shape scatter
                 (different shapes of similar N) and any misfit of the law.
    Without repeats seed_sd is None and shape_sd is the residual sd itself, which then
    holds both kinds of scatter (each run has its one seed).
    total_sd = sqrt(shape_sd^2 + seed_sd^2) is the scatter of ONE new run around the law;
    `dof` = groups - 5 is what its Student-t quantiles use.
    """

    total_sd: float
    shape_sd: float
    seed_sd: float | None
    dof: int
    seed_dof: int
    groups: int
    runs: int


def _repeat_groups(n: np.ndarray, d: np.ndarray) -> list[np.ndarray]:
    """Indices of runs with the same (N, D) to 1e-9 relative: repeats that differ by seed only."""
    keys = np.round(np.column_stack([np.log(n), np.log(d)]) / 1e-9).astype(np.int64)
    _, inverse = np.unique(keys, axis=0, return_inverse=True)
    return [np.flatnonzero(inverse.ravel() == g) for g in range(inverse.max() + 1)]


def measure_scatter(law: ScalingLaw, n_params, n_tokens, losses) -> Scatter:
    """The measured seed-to-seed and shape-to-shape scatter of runs around `law` (see Scatter)."""
    n, d, l = (np.asarray(v, dtype=float).ravel() for v in (n_params, n_tokens, losses))
    log_l = np.log(l)
    groups = _repeat_groups(n, d)
    means = np.array([log_l[g].mean() for g in groups])
    first = np.array([g[0] for g in groups])
    resid = means - np.log(law.loss(n[first], d[first]))
    dof = max(len(groups) - N_LAW_PARAMETERS, 1)
    var_means = float(resid @ resid) / dof
    seed_dof = sum(len(g) - 1 for g in groups)
    if seed_dof == 0:
        shape = math.sqrt(var_means)
        return Scatter(total_sd=shape, shape_sd=shape, seed_sd=None, dof=dof, seed_dof=0,
                       groups=len(groups), runs=len(l))
    seed_var = sum(float(((log_l[g] - log_l[g].mean()) ** 2).sum()) for g in groups) / seed_dof
    share = seed_var * float(np.mean([1.0 / len(g) for g in groups]))
    shape = math.sqrt(max(var_means - share, 0.0))
    return Scatter(total_sd=math.sqrt(shape**2 + seed_var), shape_sd=shape, seed_sd=math.sqrt(seed_var),
                   dof=dof, seed_dof=seed_dof, groups=len(groups), runs=len(l))


def _bootstrap_log_losses(samples: np.ndarray, n: np.ndarray, d: np.ndarray) -> np.ndarray:
    """log L(N, D) under each bootstrap law: shape (samples, points)."""
    e, a, alpha, b, beta = (samples[:, i:i + 1] for i in range(5))
    with np.errstate(over="ignore", invalid="ignore"):
        log_loss = np.log(e + a / n[None, :] ** alpha + b / d[None, :] ** beta)
    # A resample with an unpinned coefficient (inf, or inf * 0) says nothing about the loss:
    # count it as unbounded above, so it widens the interval instead of turning it into NaN.
    return np.where(np.isnan(log_loss), np.inf, log_loss)


def predict_loss(law: ScalingLaw, n_params, n_tokens, samples: np.ndarray | None = None,
                 scatter: Scatter | None = None, level: float = 0.95, seed: int = 0,
                 draws: int = 4000) -> dict:
    """Predicted loss of ONE new run at each (N, D), with a `level` prediction interval.

    Two sources of uncertainty, added in log-loss space:
      1. the law's own: log L(N, D) under each bootstrap refit in `samples` (columns E,
         A, alpha, B, beta; see fit_parametric's `resample`);
      2. the new run's own scatter about the law: scatter.total_sd (shape-to-shape plus
         seed-to-seed, see Scatter) times a Student-t draw on scatter.dof degrees of freedom.
    log L_new = log L_boot + total_sd * t, drawn `draws` times (bootstrap laws cycled); the
    interval is the central `level` of exp(log L_new). `mean_interval` is source 1 alone:
    where the LAW is, not where a run will land. Without samples only source 2 is used
    (around the point prediction); without scatter only source 1.

    Returns {"loss", "interval", "mean_interval"} with arrays, or floats for scalar input.
    """
    from scipy.stats import t as student_t

    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), e.g. 0.95; got {level}.")
    n, d = (np.atleast_1d(np.asarray(v, dtype=float)) for v in (n_params, n_tokens))
    n, d = np.broadcast_arrays(n, d)
    point = np.log(np.atleast_1d(law.loss(n, d)))
    tail = 100 * (1 - level) / 2
    rng = np.random.default_rng(seed)
    if samples is not None and len(samples):
        boot = _bootstrap_log_losses(np.asarray(samples, dtype=float), n, d)
        mean_iv = np.exp(np.percentile(boot, [tail, 100 - tail], axis=0, method="inverted_cdf"))
        centre = boot[np.arange(draws) % len(boot)]
    else:
        mean_iv = np.exp(np.vstack([point, point]))
        centre = np.broadcast_to(point, (draws, len(point)))
    if scatter is not None and scatter.total_sd > 0:
        noise = scatter.total_sd * student_t.rvs(scatter.dof, size=centre.shape, random_state=rng)
        interval = np.exp(np.percentile(centre + noise, [tail, 100 - tail], axis=0, method="inverted_cdf"))
    else:
        interval = mean_iv
    out = {"loss": np.exp(point), "interval": interval.T, "mean_interval": mean_iv.T}
    if np.ndim(n_params) == 0 and np.ndim(n_tokens) == 0:
        out = {"loss": float(out["loss"][0]), "interval": tuple(float(v) for v in out["interval"][0]),
               "mean_interval": tuple(float(v) for v in out["mean_interval"][0])}
    return out


# ---------------------------------------------------------------- calibration


def holdout_calibration(n_params, n_tokens, losses, holdout_fraction: float, bootstrap: int = 100,
                        level: float = 0.95, seed: int = 0, largest: bool = True, **fit_kwargs) -> dict:
    """How often the prediction interval covers runs larger than any the law saw.

    The `holdout_fraction` of runs with the largest compute (C = 6ND) is held out (with
    largest=False: a random draw of runs instead, which tests interpolation); the law
    is fitted with `bootstrap` resamples on the rest (fit_parametric, **fit_kwargs), and
    each held-out run's loss is checked against its `level` prediction interval
    (predict_loss). Also reported: the coverage of the law-only interval (no scatter), the
    median |error| of the point prediction, and the median interval width, both relative.
    """
    n, d, l = (np.asarray(v, dtype=float).ravel() for v in (n_params, n_tokens, losses))
    if not 0 < holdout_fraction < 1:
        raise ValueError(f"holdout_fraction must be in (0, 1), e.g. 0.1; got {holdout_fraction}.")
    if bootstrap < 1:
        raise ValueError(f"calibration needs bootstrap >= 1 resamples; got {bootstrap}.")
    order = np.argsort(6 * n * d, kind="stable") if largest else np.random.default_rng(seed).permutation(len(n))
    k = max(1, int(round(holdout_fraction * len(n))))
    fit_idx, held_idx = order[:-k], order[-k:]
    fit = fit_parametric(n[fit_idx], d[fit_idx], l[fit_idx], bootstrap=bootstrap, seed=seed, **fit_kwargs)
    pred = fit.predict(n[held_idx], d[held_idx], level=level, seed=seed)
    y = l[held_idx]
    inside = lambda iv: (iv[:, 0] <= y) & (y <= iv[:, 1])
    return {
        "holdout": "largest compute" if largest else "random", "holdout_fraction": holdout_fraction,
        "n_fit": len(fit_idx), "n_held": len(held_idx),
        "fit_compute_max": float((6 * n * d)[fit_idx].max()),
        "held_compute_range": (float((6 * n * d)[held_idx].min()), float((6 * n * d)[held_idx].max())),
        "coverage": float(inside(pred["interval"]).mean()),
        "coverage_law_only": float(inside(pred["mean_interval"]).mean()),
        "median_abs_rel_error": float(np.median(np.abs(pred["loss"] / y - 1))),
        "median_rel_width": float(np.median((pred["interval"][:, 1] - pred["interval"][:, 0]) / pred["loss"])),
        "total_sd": fit.scatter.total_sd, "seed_sd": fit.scatter.seed_sd, "a": fit.a,
        "a_interval": fit.intervals["a"],
    }


# ---------------------------------------------------------------- IsoFLOP fit


@dataclass
class _Frontier:
    """N_opt(C) and D_opt(C) as power laws in log10 space, shared by Approaches 1 and 2.

    `samples` (when bootstrapped) holds one row (a, n_coef, b, d_coef) per resample.
    """

    compute: np.ndarray  # the compute values the frontier points sit at
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
    curves: list[dict] = field(default_factory=list)  # Approach 2: per budget; Approach 1: per run
    warnings: list[str] = field(default_factory=list)
    samples: np.ndarray | None = None  # bootstrap rows (a, n_coef, b, d_coef)

    def predict_n(self, compute):
        """Compute-optimal parameter count at `compute` from the fitted power law."""
        return 10 ** (self.n_coef + self.a * np.log10(compute))

    def predict_d(self, compute):
        """Compute-optimal token count at `compute` from the fitted power law."""
        return 10 ** (self.d_coef + self.b * np.log10(compute))

    def n_interval(self, compute, level: float = 0.95) -> np.ndarray | None:
        """The `level` band of N_opt(compute) over the bootstrap fits: shape (2, len(compute)), or None."""
        if self.samples is None or not len(self.samples):
            return None
        x = np.log10(np.atleast_1d(np.asarray(compute, dtype=float)))
        lines = self.samples[:, 1:2] + self.samples[:, 0:1] * x[None, :]
        tail = 100 * (1 - level) / 2
        return 10 ** np.percentile(lines, [tail, 100 - tail], axis=0)


@dataclass
class IsoFlopResult(_Frontier):
    """Approach 2: per-budget parabola minima and power laws through them.

    Exponents are fitted in log10 space: log10 N_opt = a log10 C + n_coef and
    log10 D_opt = b log10 C + d_coef. Intervals are 95%; `interval_method` says whether
    they come from the regression's standard errors (Student t) or a bootstrap.
    """


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


def profile_minimum(compute: float, n_params, losses) -> tuple[float, bool]:
    """One IsoFLOP profile's loss-optimal N and whether the sizes bracket it: the parabola's
    vertex when they do, else the N of the lowest loss (never an extrapolated vertex)."""
    n, l = (np.asarray(v, dtype=float).ravel() for v in (n_params, losses))
    curve = _budget_minimum(float(compute), n, l, None)
    if curve["bracketed"]:
        return float(curve["n_opt"]), True
    return float(n[int(np.argmin(l))]), False


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
    intervals come from resampling the profiles' residuals (see _isoflop_bootstrap);
    otherwise, or with too few residuals, from the regression's standard error.
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
    samples = None
    if bootstrap > 0:
        with _one_blas_thread():
            samples = _isoflop_bootstrap(c, n, l, d, groups, curves, bootstrap, seed)
        if samples is not None:
            a_int = tuple(float(q) for q in np.percentile(samples[:, 0], [2.5, 97.5]))
            b_int = tuple(float(q) for q in np.percentile(samples[:, 2], [2.5, 97.5]))
            method = (f"bootstrap of the profiles' pooled residuals, sizes held fixed ({len(samples)} resamples, "
                      "2.5/97.5 percentiles)")
        else:
            method += "; no bootstrap: it needs profiles with more than 3 sizes"
    return IsoFlopResult(
        compute=cs, n_opt=n_opt, d_opt=d_opt, loss_opt=np.array([cv["loss_opt"] for cv in good]),
        a=a, b=b, n_coef=n_coef, d_coef=d_coef, a_interval=a_int, b_interval=b_int,
        interval_method=method, curves=curves, warnings=notes, samples=samples,
    )


def _isoflop_bootstrap(c, n, l, d, groups, curves, bootstrap: int, seed: int) -> np.ndarray | None:
    """Rows (a, n_coef, b, d_coef) refitted on resampled profiles, or None when the profiles
    leave fewer than 2 residual degrees of freedom (every one has exactly 3 sizes).

    The budgets and sizes are the experimenter's design, not a sample, so the design is held
    fixed and the run-to-run scatter is what is resampled: each run's loss becomes its
    profile parabola's value times (1 + a relative residual drawn from every profile's
    pooled residuals), the residuals scaled by sqrt(runs / dof) for the 3 coefficients each
    parabola spends. Resampling whole runs instead leaves a 4-5-size profile with 2-3
    distinct sizes, whose parabola's vertex lands far outside the sizes tried (on the
    2026-11-25 capstone that bootstrap gave a 95% interval of [0.21, 1.98] around a = 0.32).
    """
    good = [(g, cv) for g, cv in zip(groups, curves) if math.isfinite(cv["n_opt"])]
    fitted = [np.polyval(cv["coeffs"], np.log10(n[g])) for g, cv in good]
    resid = np.concatenate([l[g] / f - 1 for (g, _), f in zip(good, fitted)])
    dof = sum(len(g) - 3 for g, _ in good)
    if dof < 2:
        return None
    resid = resid * math.sqrt(len(resid) / dof)
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(bootstrap):
        mins = []
        for (g, cv), f in zip(good, fitted):
            losses = f * (1 + rng.choice(resid, size=len(g)))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a resample may come out flat or unbracketed
                cv_b = _budget_minimum(cv["compute"], n[g], losses, None if d is None else d[g])
            if math.isfinite(cv_b["n_opt"]):
                mins.append((cv_b["compute"], cv_b["n_opt"], cv_b["d_opt"]))
        if len(mins) >= 2:
            m = np.array(mins)
            boot.append(_power_law(m[:, 0], m[:, 1])[:2] + _power_law(m[:, 0], m[:, 2])[:2])
    return np.array(boot) if boot else None


# ---------------------------------------------------------------- Approach 1: training-curve envelope


@dataclass
class EnvelopeResult(_Frontier):
    """Approach 1: the lower envelope of loss over compute and the N that attains it.

    `compute` are the grid points (log-spaced) where the envelope's run is bracketed: some
    run with fewer and some with more parameters also reached that compute, so the winner
    is an interior optimum, not merely the only or the last size there. Exponents are
    least squares in log10 space through those points; the intervals come from a bootstrap
    over runs (grid points of one staircase are not independent, so no regression error).
    """

    winners: list = field(default_factory=list)  # run id attaining the envelope at each grid point


def _training_curves(n, d, c, l, run_ids) -> tuple[list[dict], list[str]]:
    """One curve per run id (sorted by compute); runs with one compute value cannot trace one."""
    curves, notes = [], []
    ids = run_ids if run_ids is not None else n  # default: one curve per model size
    for rid in dict.fromkeys(ids.tolist() if isinstance(ids, np.ndarray) else list(ids)):
        idx = np.array([i for i, r in enumerate(ids) if r == rid])
        if len(np.unique(n[idx])) != 1:
            raise ValueError(f"run {rid!r} has rows with different n_params; give each model its own run id.")
        idx = idx[np.argsort(c[idx], kind="stable")]
        if len(np.unique(c[idx])) < 2:
            notes.append(f"run {rid!r} (N={n[idx[0]]:.3g}) has losses at one compute only; it cannot trace a curve.")
            continue
        curves.append({"id": rid, "n_params": float(n[idx[0]]), "compute": c[idx], "losses": l[idx],
                       "flops_per_token": float(np.median(c[idx] / d[idx]))})
    return curves, notes


def _envelope_points(curves: list[dict], log_grid: np.ndarray) -> dict | None:
    """The bracketed envelope on `log_grid` (log10 C): winner's N, D, loss and id per point."""
    loss = np.full((len(curves), len(log_grid)), np.inf)
    for i, cv in enumerate(curves):
        x = np.log10(cv["compute"])
        inside = (log_grid >= x[0]) & (log_grid <= x[-1])
        loss[i, inside] = np.interp(log_grid[inside], x, np.log(cv["losses"]))
    sizes = np.array([cv["n_params"] for cv in curves])
    best = np.argmin(loss, axis=0)
    covered = np.isfinite(loss)
    n_best = sizes[best]
    smaller = (covered & (sizes[:, None] < n_best[None, :])).any(axis=0)
    larger = (covered & (sizes[:, None] > n_best[None, :])).any(axis=0)
    keep = smaller & larger
    if len(np.unique(n_best[keep])) < 2:
        return None
    c = 10 ** log_grid[keep]
    fpt = np.array([curves[k]["flops_per_token"] for k in best[keep]])
    return {"compute": c, "n_opt": n_best[keep], "d_opt": c / fpt,
            "loss_opt": np.exp(loss[best[keep], np.flatnonzero(keep)]),
            "winners": [curves[k]["id"] for k in best[keep]]}


def fit_envelope(
    n_params: Sequence[float],
    n_tokens: Sequence[float],
    compute: Sequence[float],
    losses: Sequence[float],
    run_ids: Sequence | None = None,
    bootstrap: int = 0,
    seed: int = 0,
    grid_points: int = 400,
) -> EnvelopeResult:
    """N_opt(C) ~ C^a from the lower envelope of training curves (Hoffmann et al. Approach 1).

    Rows are points on training curves: (n_params, n_tokens, compute, loss, run id). A
    run's rows trace its curve, log loss interpolated linearly in log C between them (no
    extrapolation). With run_ids None the rows of each model size form one curve, which
    suits end-of-schedule losses of WSD cooldown branches at several budgets per size.
    Mid-run losses of a cosine run are NOT end-of-schedule losses (its LR has not decayed
    yet), which biases the envelope towards models whose schedule ends nearer that compute.

    On `grid_points` log-spaced compute values the envelope is the lowest loss among the
    runs that reached that compute; only points where a smaller and a larger model also
    reached it count (see EnvelopeResult). `bootstrap` > 0 resamples RUNS with replacement
    (a run drawn twice adds nothing, one never drawn is absent) and refits.
    """
    n, d, c, l = (np.asarray(v, dtype=float).ravel() for v in (n_params, n_tokens, compute, losses))
    if not (len(n) == len(d) == len(c) == len(l)) or (run_ids is not None and len(run_ids) != len(n)):
        raise ValueError("n_params, n_tokens, compute, losses (and run_ids) must have the same length.")
    if not all(np.all(np.isfinite(v) & (v > 0)) for v in (n, d, c, l)):
        raise ValueError("n_params, n_tokens, compute and losses must all be positive and finite.")
    ids = None if run_ids is None else list(run_ids)
    curves, notes = _training_curves(n, d, c, l, ids)
    if len(curves) < 3:
        raise ValueError(f"only {len(curves)} run(s) trace a loss curve (losses at 2+ compute values); the envelope "
                         "needs at least 3 model sizes whose curves overlap in compute.")
    lo = min(np.log10(cv["compute"][0]) for cv in curves)
    hi = max(np.log10(cv["compute"][-1]) for cv in curves)
    log_grid = np.linspace(lo, hi, grid_points)
    with _one_blas_thread():  # polyfit's LAPACK on tiny arrays: threads only cost
        return _fit_envelope(curves, notes, log_grid, bootstrap, seed)


def _fit_envelope(curves, notes, log_grid, bootstrap, seed) -> EnvelopeResult:
    env = _envelope_points(curves, log_grid)
    if env is None:
        raise ValueError("the lower envelope is attained by fewer than 2 model sizes with a smaller and a larger "
                         "model beside them; add sizes on both sides of the optimum or overlap the curves more.")
    a, n_coef = np.polyfit(np.log10(env["compute"]), np.log10(env["n_opt"]), 1)
    b, d_coef = np.polyfit(np.log10(env["compute"]), np.log10(env["d_opt"]), 1)
    a_int = b_int = (math.nan, math.nan)
    method = "none (no bootstrap)"
    samples = None
    if bootstrap > 0:
        rng = np.random.default_rng(seed)
        boot = []
        for _ in range(bootstrap):
            drawn = sorted(set(rng.integers(0, len(curves), len(curves)).tolist()))
            e = _envelope_points([curves[k] for k in drawn], log_grid)
            if e is not None:
                x = np.log10(e["compute"])
                boot.append([*np.polyfit(x, np.log10(e["n_opt"]), 1), *np.polyfit(x, np.log10(e["d_opt"]), 1)])
        if boot:
            samples = np.array(boot)
            a_int = tuple(float(q) for q in np.percentile(samples[:, 0], [2.5, 97.5]))
            b_int = tuple(float(q) for q in np.percentile(samples[:, 2], [2.5, 97.5]))
            method = (f"bootstrap over runs ({len(boot)} of {bootstrap} resamples had an envelope, "
                      "2.5/97.5 percentiles)")
    return EnvelopeResult(
        compute=env["compute"], n_opt=env["n_opt"], d_opt=env["d_opt"], loss_opt=env["loss_opt"],
        winners=env["winners"], a=float(a), b=float(b), n_coef=float(n_coef), d_coef=float(d_coef),
        a_interval=a_int, b_interval=b_int, interval_method=method, curves=curves, warnings=notes,
        samples=samples,
    )


def exponent_agreement(estimates: Mapping[str, tuple[float, tuple[float, float] | None]],
                       tolerance: float = 0.1, max_width: float = 0.3) -> dict:
    """Whether estimates of a (name -> (a, 95% interval)) agree: each pair's |difference|
    against `tolerance`, whether their intervals overlap, and each interval's width against
    `max_width` (the capstone's targets: within 0.1, intervals narrower than 0.3)."""
    names = list(estimates)
    width = {k: (iv[1] - iv[0]) if iv is not None and all(map(math.isfinite, iv)) else math.nan
             for k, (_, iv) in estimates.items()}
    pairs = {}
    for i, p in enumerate(names):
        for q in names[i + 1:]:
            (ap, ip), (aq, iq) = estimates[p], estimates[q]
            overlap = None if ip is None or iq is None else bool(max(ip[0], iq[0]) <= min(ip[1], iq[1]))
            pairs[f"{p} vs {q}"] = {"difference": abs(ap - aq), "within_tolerance": abs(ap - aq) <= tolerance,
                                    "intervals_overlap": overlap}
    return {"pairs": pairs, "widths": width,
            "narrow_enough": {k: bool(w < max_width) for k, w in width.items()},
            "tolerance": tolerance, "max_width": max_width}


# ---------------------------------------------------------------- results table


@dataclass
class ResultsTable:
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


def load_results(path: str | Path) -> ResultsTable:
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
    return ResultsTable(n_params=n[ok], n_tokens=d[ok], compute=c[ok], val_loss=l[ok], budget=budget[ok],
                        grouped_by=grouped_by)


def load_curves(path: str | Path) -> dict[str, np.ndarray]:
    """Training curves of a sweep's runs: every evaluation in each ok run's metrics.jsonl.

    Reads the results table at `path` for each run's n_params and run_dir (a relative
    run_dir is looked up from the current folder, then beside the table and its parent).
    Returns rows for fit_envelope: n_params, n_tokens, compute, losses, run_ids. The
    evaluation at step 0 (an untrained model) is left out. A cosine run's mid-run losses
    are not end-of-schedule losses (see fit_envelope).
    """
    from picollm.saved_run import read_metrics  # imports torch: only this path needs it

    path = Path(path)
    rows = _drop_unfinished(path, _read_rows(path))
    out: dict[str, list] = {"n_params": [], "n_tokens": [], "compute": [], "losses": [], "run_ids": []}
    missing = []
    for row in rows:
        run_dir = row.get("run_dir")
        if not run_dir or row.get("n_params") in (None, ""):
            continue
        places = [Path(run_dir)] if Path(run_dir).is_absolute() else \
            [Path(run_dir), path.parent / run_dir, path.parent.parent / run_dir]
        found = next((p for p in places if (p / "metrics.jsonl").is_file()), None)
        if found is None:
            missing.append(str(run_dir))
            continue
        for rec in read_metrics(found)[1]:
            if rec.get("step", 0) > 0 and all(rec.get(k) is not None for k in ("tokens", "flops", "val_loss")) \
                    and math.isfinite(rec["val_loss"]):
                out["n_params"].append(float(row["n_params"]))
                out["n_tokens"].append(float(rec["tokens"]))
                out["compute"].append(float(rec["flops"]))
                out["losses"].append(float(rec["val_loss"]))
                out["run_ids"].append(str(run_dir))
    if missing:
        warnings.warn(f"{path}: no metrics.jsonl for {len(missing)} run(s), e.g. {missing[0]}; they are left out.",
                      stacklevel=2)
    return {k: (v if k == "run_ids" else np.array(v, dtype=float)) for k, v in out.items()}


def read_chinchilla_epoch(path: str | Path, drop_highest: int = 5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, D, loss) from Epoch AI's reconstruction of Chinchilla's runs (Besiroglu et al.
    2024; columns "Model Size", "Training FLOP", "loss"), D = C / (6N). Like Epoch, the
    `drop_highest` runs with the highest loss are left out (unconverged outliers)."""
    path = Path(path)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    need = {"Model Size", "Training FLOP", "loss"}
    if not rows or not need <= set(rows[0]):
        raise ValueError(f"{path} is not Epoch's Chinchilla table: it needs columns {sorted(need)}.")
    n, c, loss = (np.array([float(r[k]) for r in rows]) for k in ("Model Size", "Training FLOP", "loss"))
    keep = np.sort(np.argsort(loss, kind="stable")[:len(loss) - drop_highest])
    return n[keep], c[keep] / (6 * n[keep]), loss[keep]


# ---------------------------------------------------------------- plots

def plot_isoflop(result: IsoFlopResult, path: str | Path) -> Path:
    """Loss vs N for each budget, with its parabola and minimum."""
    from matplotlib import colormaps
    from picollm.figures import new_figure, save_figure  # matplotlib: imported only to plot

    fig = new_figure(figsize=(6.5, 4.5))
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
    return save_figure(fig, path)


def plot_optimal_allocation(result: IsoFlopResult, path: str | Path) -> Path:
    """N_opt(C) and D_opt(C) on log-log axes, fitted lines and the Chinchilla-20 rule."""
    from picollm.figures import new_figure, save_figure  # matplotlib: imported only to plot

    fig = new_figure(figsize=(6.5, 4.5))
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
    return save_figure(fig, path)


def plot_predicted_vs_measured(law: ScalingLaw, n, d, loss, path: str | Path, intervals=None) -> Path:
    """Each run's measured loss against the law's prediction, coloured by compute; with
    `intervals` (rows lo, hi, e.g. predict_loss(...)["interval"]) as horizontal bars."""
    n, d, loss = (np.asarray(v, dtype=float) for v in (n, d, loss))
    pred = law.loss(n, d)
    from picollm.figures import new_figure, save_figure  # matplotlib: imported only to plot

    fig = new_figure(figsize=(5, 5))
    ax = fig.add_subplot()
    if intervals is not None:
        iv = np.asarray(intervals, dtype=float)
        ax.errorbar(pred, loss, xerr=[pred - iv[:, 0], iv[:, 1] - pred], fmt="none", ecolor="0.6", lw=0.8,
                    label="95% prediction interval")
    sc = ax.scatter(pred, loss, c=np.log10(6 * n * d), s=14, cmap="viridis", zorder=3)
    fig.colorbar(sc, ax=ax, label="log10 C (6ND)")
    lo, hi = min(pred.min(), loss.min()), max(pred.max(), loss.max())
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x")
    ax.set_xlabel("predicted loss")
    ax.set_ylabel("measured loss")
    rmse = float(np.sqrt(np.mean((np.log(pred) - np.log(loss)) ** 2)))
    ax.set_title(f"Parametric fit (RMSE of log loss {rmse:.4f})")
    ax.legend()
    return save_figure(fig, path)


def _law_band(samples: np.ndarray, compute: np.ndarray, level: float = 0.95) -> np.ndarray:
    """The `level` band of N_opt(C) over bootstrap laws (rows E, A, alpha, B, beta)."""
    _, a, alpha, b, beta = (samples[:, i:i + 1] for i in range(5))
    g = (alpha * a / (beta * b)) ** (1.0 / (alpha + beta))
    n = g * (compute[None, :] / 6.0) ** (beta / (alpha + beta))
    tail = 100 * (1 - level) / 2
    return np.percentile(n, [tail, 100 - tail], axis=0)


def plot_frontier(path: str | Path, envelope: EnvelopeResult | None = None, isoflop: IsoFlopResult | None = None,
                  parametric: FitResult | None = None) -> Path:
    """N_opt(C) from each approach given, with 95% bootstrap bands where there are samples."""
    fits = [f for f in (envelope, isoflop) if f is not None]
    c_all = np.concatenate([f.compute for f in fits]) if fits else np.array([1e15, 1e21])
    cs = np.geomspace(c_all.min() / 3, c_all.max() * 3, 60)
    from picollm.figures import new_figure, save_figure  # matplotlib: imported only to plot

    fig = new_figure(figsize=(6.5, 4.5))
    ax = fig.add_subplot()
    for fr, name, color in ((envelope, "Approach 1 (envelope)", "C2"), (isoflop, "Approach 2 (IsoFLOP)", "C0")):
        if fr is None:
            continue
        pts = np.unique(np.column_stack([fr.compute, fr.n_opt]), axis=0)[:: max(1, len(fr.compute) // 40)]
        ax.scatter(pts[:, 0], pts[:, 1], color=color, s=12)
        ax.plot(cs, fr.predict_n(cs), color=color, label=f"{name}: a = {fr.a:.3f}")
        band = fr.n_interval(cs)
        if band is not None:
            ax.fill_between(cs, band[0], band[1], color=color, alpha=0.15, lw=0)
    if parametric is not None:
        ax.plot(cs, [parametric.law.optimal(c)[0] for c in cs], color="C3",
                label=f"Approach 3 (parametric): a = {parametric.a:.3f}")
        if parametric.samples is not None:
            band = _law_band(parametric.samples, cs)
            ax.fill_between(cs, band[0], band[1], color="C3", alpha=0.15, lw=0)
    ax.plot(cs, [chinchilla_optimal(c)[0] for c in cs], "k--", lw=1, label="Chinchilla D = 20N")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("compute C (FLOPs)")
    ax.set_ylabel("compute-optimal N")
    ax.set_title("Frontier N_opt(C), 95% bootstrap bands")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


# ---------------------------------------------------------------- CLI


def _fmt_interval(iv: tuple[float, float] | None) -> str:
    return "" if iv is None else f"  [{iv[0]:.4g}, {iv[1]:.4g}]"


USAGE = """usage: python -m picollm.fit results=FILE [out=DIR] [bootstrap=K] [curves=true] [resample=runs]
Fit scaling laws (Approaches 1, 2 and 3) to a sweep's results table; plots go to out."""


@dataclass
class FitArgs:
    results: str = cli.required("CSV or JSON-lines file with n_params, n_tokens, compute, val_loss (a sweep's "
                                "results.jsonl works as is; its budget column groups the IsoFLOP profiles)")
    out: str = cli.setting(".", "folder for the plots", shown=". (the current folder)")
    bootstrap: int = cli.setting(100, "bootstrap resamples of runs for 95% intervals (0: none)")
    curves: bool = cli.setting(False, "Approach 1 from each run's metrics.jsonl evaluations (run_dir column) "
                                      "instead of the end-of-schedule losses of each size")
    resample: str = cli.setting("runs", "Approach 3's bootstrap: runs (whole runs with replacement) or residuals "
                                        "(the (N, D) held fixed, as for a designed sweep)")


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status 0: fitted (a fit that needs more runs is reported as skipped); 1: the table
    or the plot folder is unusable, with one sentence on stderr."""
    args = cli.parse(None if argv is None else list(argv), "fit", USAGE, FitArgs)
    if args.bootstrap < 0:
        raise SystemExit(f"error: bootstrap={args.bootstrap} must be 0 (no resampling) or more.")
    if args.resample not in RESAMPLES:
        raise SystemExit(f"error: resample={args.resample} must be runs or residuals.")
    try:
        with warnings.catch_warnings(record=True) as dropped:
            warnings.simplefilter("always")
            table = load_results(args.results)
            curves = load_curves(args.results) if args.curves else None
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)  # an unusable out fails before the fits, not after
        print(f"{len(table.val_loss)} runs from {args.results}")
        for note in dropped:
            print(f"  note: {note.message}")
        _report_fits(table, out, args.bootstrap, curves, args.resample)
    except OSError as err:
        if err.filename is None:  # load_results's own sentence
            print(f"error: {err}", file=sys.stderr)
        else:
            print(f"error: could not write {err.filename} ({err.strerror}); give out= a writable folder.",
                  file=sys.stderr)
        return 1
    except (ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def _report_fits(table: ResultsTable, out: Path, bootstrap: int, curves: dict | None = None,
                 resample: str = "runs") -> None:
    par = _report_parametric(table, out, bootstrap, resample)
    iso = _report_isoflop(table, out, bootstrap)
    env = _report_envelope(table, bootstrap, curves)
    _report_side_by_side(env, iso, par)
    if env is not None or iso is not None or par is not None:
        print(f"  plot: {plot_frontier(out / 'frontier.png', env, iso, par)}")


def _report_parametric(table: ResultsTable, out: Path, bootstrap: int, resample: str = "runs") -> FitResult | None:
    print("\nApproach 3: L(N, D) = E + A/N^alpha + B/D^beta  (Huber on log loss, L-BFGS)")
    if len(table.val_loss) < 5:
        print(f"  skipped: {len(table.val_loss)} runs; fitting 5 parameters needs at least 5.")
        return None
    fit = fit_parametric(table.n_params, table.n_tokens, table.val_loss, bootstrap=bootstrap, resample=resample)
    iv = fit.intervals or {}
    for k in ("E", "A", "alpha", "B", "beta", "a"):
        print(f"  {k:6s} = {getattr(fit, k):.4g}{_fmt_interval(iv.get(k))}")
    sc = fit.scatter
    seed = "no repeats of one (N, D)" if sc.seed_sd is None else f"seed-to-seed {100 * sc.seed_sd:.2f}%"
    print(f"  scatter of one run about the law: {100 * sc.total_sd:.2f}% (shape-to-shape {100 * sc.shape_sd:.2f}%, "
          f"{seed}; {sc.runs} runs at {sc.groups} (N, D) points)")
    pred = fit.predict(table.n_params, table.n_tokens)
    inside = (pred["interval"][:, 0] <= table.val_loss) & (table.val_loss <= pred["interval"][:, 1])
    print(f"  95% prediction intervals ({'law bootstrap + ' if fit.samples is not None else ''}scatter) "
          f"cover {inside.sum()}/{len(inside)} of the fitted runs")
    path = plot_predicted_vs_measured(fit.law, table.n_params, table.n_tokens, table.val_loss,
                                      out / "predicted_vs_measured.png", intervals=pred["interval"])
    print(f"  plot: {path}")
    return fit


def _report_isoflop(table: ResultsTable, out: Path, bootstrap: int) -> IsoFlopResult | None:
    by = "the nominal budget column" if table.grouped_by == "budget" else "equal compute"
    print(f"\nApproach 2: IsoFLOP profiles (runs grouped by {by})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # listed in the result and printed below
            groups = table.compute if table.budget is None else table.budget
            iso = fit_isoflop(groups, table.n_params, table.val_loss, table.n_tokens, bootstrap=bootstrap)
    except ValueError as err:
        print(f"  skipped: {err}")
        return None
    for msg in iso.warnings:
        print(f"  warning: {msg}")
    print(f"  N_opt ~ C^a: a = {iso.a:.4f}{_fmt_interval(iso.a_interval)}")
    print(f"  D_opt ~ C^b: b = {iso.b:.4f}{_fmt_interval(iso.b_interval)}")
    print(f"  intervals: {iso.interval_method}")
    print(f"  plots: {plot_isoflop(iso, out / 'isoflop.png')}, "
          f"{plot_optimal_allocation(iso, out / 'optimal_allocation.png')}")
    return iso


def _report_envelope(table: ResultsTable, bootstrap: int, curves: dict | None) -> EnvelopeResult | None:
    source = ("training curves (metrics.jsonl evaluations)" if curves is not None
              else "end-of-schedule losses, one curve per model size")
    print(f"\nApproach 1: lower envelope of loss over compute ({source})")
    rows = curves if curves is not None else {"n_params": table.n_params, "n_tokens": table.n_tokens,
                                             "compute": table.compute, "losses": table.val_loss, "run_ids": None}
    try:
        env = fit_envelope(rows["n_params"], rows["n_tokens"], rows["compute"], rows["losses"],
                           rows["run_ids"], bootstrap=bootstrap)
    except ValueError as err:
        print(f"  skipped: {err}")
        return None
    print(f"  N_opt ~ C^a: a = {env.a:.4f}{_fmt_interval(env.a_interval)}")
    print(f"  D_opt ~ C^b: b = {env.b:.4f}{_fmt_interval(env.b_interval)}")
    print(f"  {len(env.compute)} bracketed compute points from {len(env.curves)} curves; intervals: "
          f"{env.interval_method}")
    if env.warnings:
        print(f"  note: {len(env.warnings)} run(s) have one compute value and trace no curve")
    return env


def _report_side_by_side(env, iso, par) -> None:
    estimates = {}
    if env is not None:
        estimates["Approach 1"] = (env.a, env.a_interval)
    if iso is not None:
        estimates["Approach 2"] = (iso.a, iso.a_interval)
    if par is not None:
        estimates["Approach 3"] = (par.a, (par.intervals or {}).get("a"))
    print("\nCompute-optimal exponent a (N_opt ~ C^a), side by side (Chinchilla: ~0.5)")
    for name, (a, iv) in estimates.items():
        print(f"  {name}: a = {a:.4f}{_fmt_interval(iv)}")
    agree = exponent_agreement(estimates)
    for pair, v in agree["pairs"].items():
        overlap = "" if v["intervals_overlap"] is None else \
            f", intervals {'overlap' if v['intervals_overlap'] else 'do not overlap'}"
        print(f"  {pair}: |difference| = {v['difference']:.4f} "
              f"({'within' if v['within_tolerance'] else 'outside'} {agree['tolerance']}){overlap}")


if __name__ == "__main__":
    raise SystemExit(main())
