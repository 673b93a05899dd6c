"""Chinchilla arithmetic: how to split a compute budget between parameters and tokens.

Conventions (docs/conventions.md): N counts the parameters that cost FLOPs per token, D counts
training tokens, and a training run costs C ~= 6*N*D FLOPs. Everything here is plain
arithmetic on floats (numpy arrays work where noted); nothing imports torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

PF_DAY = 1e15 * 86400  # FLOPs in one petaflop/s-day, Kaplan et al.'s compute unit


def chinchilla_optimal(compute: float, tokens_per_param: float = 20.0) -> tuple[float, float]:
    """(N, D) spending `compute` with D = r*N: solving C = 6*N*(r*N) gives N = sqrt(C/(6r))."""
    if compute <= 0 or tokens_per_param <= 0:
        raise ValueError(
            f"compute ({compute}) and tokens_per_param ({tokens_per_param}) must both be positive."
        )
    n = math.sqrt(compute / (6.0 * tokens_per_param))
    return n, tokens_per_param * n


@dataclass(frozen=True)
class ScalingLaw:
    """L(N, D) = E + A / N**alpha + B / D**beta (Hoffmann et al. 2022, eq. 2)."""

    E: float
    A: float
    alpha: float
    B: float
    beta: float

    @property
    def a(self) -> float:
        """Exponent of N_opt(C) ~ C**a; D_opt grows as C**(1 - a)."""
        return self.beta / (self.alpha + self.beta)

    def loss(self, n_params, n_tokens):
        """Predicted loss; broadcasts over numpy arrays."""
        n = np.asarray(n_params, dtype=float)
        d = np.asarray(n_tokens, dtype=float)
        out = self.E + self.A / n**self.alpha + self.B / d**self.beta
        return float(out) if out.ndim == 0 else out

    def optimal(self, compute: float) -> tuple[float, float]:
        """Loss-minimising (N, D) under 6*N*D = C, in closed form (Hoffmann et al. eq. 4)."""
        if compute <= 0:
            raise ValueError(f"compute must be positive, got {compute}.")
        s = self.alpha + self.beta
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / s)
        n = g * (compute / 6.0) ** (self.beta / s)
        return n, (compute / 6.0) / n

    def optimal_loss(self, compute: float) -> float:
        """Predicted loss at the compute-optimal (N, D)."""
        return self.loss(*self.optimal(compute))

    def tokens_per_param(self, compute: float) -> float:
        """D/N at the compute-optimal point; it drifts with C unless alpha == beta."""
        n, d = self.optimal(compute)
        return d / n


# Hoffmann et al. 2022, eq. 10 (their Approach 3 fit).
CHINCHILLA = ScalingLaw(E=1.69, A=406.4, alpha=0.34, B=410.7, beta=0.28)
# Besiroglu et al. 2024, "Chinchilla Scaling: A replication attempt": refit of the same data.
EPOCH = ScalingLaw(E=1.8172, A=482.01, alpha=0.3478, B=2085.43, beta=0.3658)
LAWS: dict[str, ScalingLaw] = {"chinchilla": CHINCHILLA, "epoch": EPOCH}


def load_law(name: str) -> tuple[str, ScalingLaw]:
    """(label, law) for ``plan.law``: a named law, or a JSON file with E, A, alpha, B, beta
    (top level, or under "law" or "parametric" as in a sweep's summary.json). Raises
    ValueError with one sentence when the file cannot serve."""
    if name in LAWS:
        return name, LAWS[name]
    import json
    from pathlib import Path

    path = Path(str(name)).expanduser()
    try:
        data = json.loads(path.read_text())
        data = data.get("law") or data.get("parametric") or data  # a sweep's summary.json keeps it under "parametric"
        return path.name, ScalingLaw(**{k: float(data[k]) for k in ("E", "A", "alpha", "B", "beta")})
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"plan.law={name} is neither {' nor '.join(LAWS)} nor a readable JSON file with E, A, alpha, "
                         f"B and beta ({type(err).__name__}: {err}); name a law or point at a sweep's summary.json.")


def _tokens_for_loss(law: ScalingLaw, n_params: float, loss: float) -> float:
    """D that reaches `loss` with N params, or inf where N alone cannot get there."""
    gap = loss - law.E - law.A / n_params**law.alpha
    return (law.B / gap) ** (1.0 / law.beta) if gap > 0 else math.inf


def inference_optimal(
    law: ScalingLaw, loss: float, inference_tokens: float
) -> tuple[float, float]:
    """(N, D) reaching `loss` with the least lifetime compute 6*N*D + 2*N*inference_tokens.

    Sardana et al. 2023: serving many tokens favours a smaller model trained for longer.
    With inference_tokens = 0 this is the compute-optimal point for that loss.
    """
    from scipy.optimize import minimize_scalar

    if inference_tokens < 0:
        raise ValueError(f"inference_tokens must be >= 0, got {inference_tokens}.")
    if loss <= law.E:
        raise ValueError(
            f"loss {loss} is unreachable: the law's irreducible loss E is {law.E}; "
            "ask for a loss above E."
        )
    # Below n_min even infinite data cannot reach the loss (D -> inf as N -> n_min).
    log_n_min = math.log(law.A / (loss - law.E)) / law.alpha

    def log_cost(log_n: float) -> float:
        # log(6ND + 2NI), kept in log space because D explodes near n_min.
        gap = loss - law.E - law.A * math.exp(-law.alpha * log_n)
        if gap <= 0:
            return math.inf
        log_d = (math.log(law.B) - math.log(gap)) / law.beta
        log_i = math.log(2.0 * inference_tokens) if inference_tokens > 0 else -math.inf
        return log_n + np.logaddexp(math.log(6.0) + log_d, log_i)

    # A coarse grid first finds the basin (the cost has a wall at n_min), then Brent polishes.
    grid = log_n_min + np.geomspace(1e-6, 50.0, 400)
    costs = np.array([log_cost(x) for x in grid])
    i = int(np.argmin(costs))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    res = minimize_scalar(log_cost, bounds=(lo, hi), method="bounded", options={"xatol": 1e-10})
    n = math.exp(res.x)
    return n, _tokens_for_loss(law, n, loss)


def lifetime_compute(n_params, n_tokens, inference_tokens=0.0):
    """Training plus inference FLOPs: 6*N*D to train, 2*N per token served (Sardana et al.)."""
    return 6.0 * np.asarray(n_params) * np.asarray(n_tokens) + 2.0 * np.asarray(n_params) * np.asarray(inference_tokens)


def overtraining_crossover(law: ScalingLaw, compute: float, size_ratio: float) -> dict:
    """When does a smaller model trained longer beat the Chinchilla-optimal one (Sardana et al.)?

    The reference is law.optimal(compute): (N_c, D_c) with loss L_c and lifetime cost
    compute + 2*N_c*I for I inference tokens. The alternative has N_s = size_ratio * N_c
    and spends the SAME lifetime compute, so it trains on
        D_s(I) = (compute + 2*I*(N_c - N_s)) / (6*N_s)
    tokens: every token served is cheaper on it, and the saving buys training. At I = 0 the
    reference wins (it is compute-optimal); the crossover is the I* where L(N_s, D_s) = L_c:
        D_s* = (B / (L_c - E - A/N_s^alpha))^(1/beta),  I* = (6*N_s*D_s* - compute) / (2*(N_c - N_s)).
    Beyond I* the smaller model is better at equal total compute. When N_s alone cannot
    reach L_c (L_c - E - A/N_s^alpha <= 0) the crossover is infinite.

    Returns n_ref, d_ref, loss_ref, n_small, d_small (= D_s*), tokens_per_param_small,
    inference_tokens (I*), total_compute (compute + 2*N_c*I*), reachable.
    """
    if compute <= 0:
        raise ValueError(f"compute must be positive, got {compute}.")
    if not 0 < size_ratio < 1:
        raise ValueError(f"size_ratio must be in (0, 1): the alternative is smaller than the compute-optimal model; "
                         f"got {size_ratio}.")
    n_ref, d_ref = law.optimal(compute)
    return inference_crossover(law, n_ref, d_ref, size_ratio * n_ref)


def inference_crossover(law: ScalingLaw, n_ref: float, d_ref: float, n_small: float,
                        loss_ref: float | None = None) -> dict:
    """overtraining_crossover for a given reference run (N_ref, D_ref), e.g. one that was
    trained: the smaller model N_small needs D_small* tokens to match loss_ref (default the
    law's L(N_ref, D_ref)), and the inference tokens I* at which the two lifetimes cost the
    same are (6*N_small*D_small* - 6*N_ref*D_ref) / (2*(N_ref - N_small))."""
    if not 0 < n_small < n_ref:
        raise ValueError(f"n_small ({n_small:.4g}) must be positive and below n_ref ({n_ref:.4g}).")
    loss_ref = law.loss(n_ref, d_ref) if loss_ref is None else float(loss_ref)
    d_small = _tokens_for_loss(law, n_small, loss_ref)
    return crossover_from_tokens(n_ref, d_ref, loss_ref, n_small, d_small)


def crossover_from_tokens(n_ref: float, d_ref: float, loss_ref: float, n_small: float, d_small: float) -> dict:
    """The crossover's arithmetic once D_small* (the smaller model's tokens to match loss_ref)
    is known, from a law or measured; d_small = inf means it never matches."""
    compute = 6.0 * n_ref * d_ref
    reachable = math.isfinite(d_small)
    infer = (6.0 * n_small * d_small - compute) / (2.0 * (n_ref - n_small)) if reachable else math.inf
    return {"n_ref": n_ref, "d_ref": d_ref, "loss_ref": loss_ref, "n_small": n_small, "d_small": d_small,
            "tokens_per_param_small": d_small / n_small, "inference_tokens": infer,
            "total_compute": compute + 2.0 * n_ref * infer, "reachable": reachable}


def measured_tokens_for_loss(n_tokens, losses, target: float) -> float:
    """D where a model's measured losses (at several token counts) reach `target`, by linear
    interpolation of log loss in log D between the two runs around it; inf when even its
    longest run is above target, nan when its shortest is already below (no bracket)."""
    d, l = (np.asarray(v, dtype=float) for v in (n_tokens, losses))
    order = np.argsort(d)
    d, l = d[order], l[order]
    if l.min() > target:
        return math.inf
    if l[0] <= target:
        return math.nan
    k = int(np.argmax(l <= target))  # first run at or below target; the one before is above
    x0, x1, y0, y1 = math.log(d[k - 1]), math.log(d[k]), math.log(l[k - 1]), math.log(l[k])
    return math.exp(x0 + (math.log(target) - y0) * (x1 - x0) / (y1 - y0))


def reference_run(groups, losses, budget: float | None = None) -> int:
    """Index of the lowest-loss run in the IsoFLOP group `budget` (default the largest):
    the measured compute-optimal run that over-training is compared against. `groups` is
    each run's nominal budget (or its compute)."""
    groups, losses = np.asarray(groups, dtype=float), np.asarray(losses, dtype=float)
    target = groups.max() if budget is None else budget
    at = np.flatnonzero(np.isclose(groups, target, rtol=1e-6))
    if len(at) == 0:
        raise ValueError(f"no runs at budget {target:.3g}; the table's budgets are {sorted(set(groups.tolist()))}.")
    return int(at[np.argmin(losses[at])])


def crossover_rows(n_params, n_tokens, losses, ref: int, law: ScalingLaw, samples=None) -> list[dict]:
    """Over-training, measured beside predicted: for every model smaller than run `ref` with
    runs at two or more token counts, the tokens D* it needs to reach ref's loss and the
    inference budget I* beyond which it wins at equal lifetime compute (Sardana et al.),
    measured (D* interpolated between its runs) and from `law` (with a 95% band over the
    bootstrap laws `samples`, rows of E, A, alpha, B, beta)."""
    n, d, l = (np.asarray(v, dtype=float) for v in (n_params, n_tokens, losses))
    n_ref, d_ref, l_ref = n[ref], d[ref], l[ref]
    rows = []
    for n_small in sorted(set(n[n < n_ref].tolist())):
        mine = n == n_small
        if mine.sum() < 2:
            continue
        d_meas = measured_tokens_for_loss(d[mine], l[mine], l_ref)
        measured = crossover_from_tokens(n_ref, d_ref, l_ref, n_small, d_meas) if math.isfinite(d_meas) else None
        # The law predicts against its own loss at the reference: its bias at N_ref cancels.
        predicted = inference_crossover(law, n_ref, d_ref, n_small)
        band = None
        if samples is not None:
            draws = [inference_crossover(ScalingLaw(*s), n_ref, d_ref, n_small)["inference_tokens"] for s in samples]
            # inverted_cdf picks drawn values, so a band that reaches "never" (inf) says so.
            band = tuple(float(q) for q in np.quantile(draws, [0.025, 0.975], method="inverted_cdf"))
        rows.append({"n_small": n_small, "tokens": d[mine].tolist(), "losses": l[mine].tolist(),
                     "measured_d": d_meas, "measured": measured, "predicted": predicted, "predicted_band": band})
    return rows


def kaplan_optimal(compute: float) -> tuple[float, float]:
    """Kaplan et al. 2020 compute-efficient allocation, for comparison with Chinchilla.

    Source: Kaplan et al. 2020, Table 6 / Figure 14: N_opt = 1.3e9 * C_min**0.73 with C in
    PF-days (1 PF-day = 8.64e19 FLOPs); N there excludes embeddings. D = C / (6N).
    """
    if compute <= 0:
        raise ValueError(f"compute must be positive, got {compute}.")
    n = 1.3e9 * (compute / PF_DAY) ** 0.73
    return n, compute / (6.0 * n)


def compute_for_time(seconds: float, peak_flops: float, mfu: float, n_gpus: int = 1) -> float:
    """Model FLOPs a run achieves: wall time * peak * MFU * number of GPUs."""
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu must be in (0, 1], got {mfu}; e.g. 0.4 for 40%.")
    if seconds < 0 or peak_flops <= 0 or n_gpus < 1:
        raise ValueError("seconds must be >= 0, peak_flops > 0 and n_gpus >= 1.")
    return seconds * peak_flops * mfu * n_gpus


def cost(seconds: float, price_per_hour: float, n_gpus: int = 1) -> float:
    """Rental cost of `n_gpus` for `seconds` at `price_per_hour` per GPU."""
    return seconds / 3600.0 * price_per_hour * n_gpus


def compare_allocations(
    compute: float, law: ScalingLaw | None = None, law_name: str | None = None
) -> list[dict]:
    """Rows comparing Chinchilla-20, a law's optimum and Kaplan at one compute budget.

    Losses are predicted by `law` (EPOCH when omitted), so every row is judged alike.
    """
    law = EPOCH if law is None else law
    if law_name is None:
        law_name = next((k for k, v in LAWS.items() if v == law), "fitted")
    rules = [
        ("chinchilla-20", chinchilla_optimal(compute)),
        (f"{law_name}-optimal", law.optimal(compute)),
        ("kaplan", kaplan_optimal(compute)),
    ]
    return [
        {
            "rule": rule,
            "n_params": n,
            "n_tokens": d,
            "tokens_per_param": d / n,
            "loss": law.loss(n, d),
        }
        for rule, (n, d) in rules
    ]
