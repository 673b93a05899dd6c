"""Chinchilla arithmetic, checked against hand calculations and brute-force searches."""

import math

import numpy as np
import pytest
from scipy.optimize import brentq

from picollm.scaling import (
    CHINCHILLA,
    EPOCH,
    GPU_PEAK_FLOPS,
    LAWS,
    ScalingLaw,
    chinchilla_optimal,
    compare_allocations,
    compute_for_time,
    cost,
    inference_optimal,
    kaplan_optimal,
)


def test_chinchilla_optimal_identities():
    for c in (1e15, 3.3e18, 5.76e23):
        for r in (1.0, 20.0, 100.0):
            n, d = chinchilla_optimal(c, r)
            assert 6 * n * d == pytest.approx(c, rel=1e-12)
            assert d / n == pytest.approx(r, rel=1e-12)


def test_chinchilla_optimal_hand_arithmetic():
    # Chinchilla's budget: 5.76e23 / 120 = 4.8e21, sqrt = 6.928e10 params; D = 20N = 1.386e12.
    n, d = chinchilla_optimal(5.76e23)
    assert n == pytest.approx(6.928e10, rel=1e-3)
    assert d == pytest.approx(1.386e12, rel=1e-3)
    # The paper's 70B / 1.4T is within a few percent.
    assert n == pytest.approx(70e9, rel=0.03)
    assert d == pytest.approx(1.4e12, rel=0.03)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="positive"):
        chinchilla_optimal(-1.0)
    with pytest.raises(ValueError):
        CHINCHILLA.optimal(0.0)
    with pytest.raises(ValueError, match="mfu"):
        compute_for_time(3600, 1e12, 1.5)


def _brute_force_optimum(law: ScalingLaw, c: float) -> float:
    """N minimising the loss along 6ND = C, by a dense log grid then a finer one."""
    ns = np.geomspace(1e3, 1e16, 200_001)
    i = np.argmin(law.loss(ns, c / (6 * ns)))
    ns = np.geomspace(ns[i - 1], ns[i + 1], 20_001)
    return float(ns[np.argmin(law.loss(ns, c / (6 * ns)))])


@pytest.mark.parametrize("law", [CHINCHILLA, EPOCH, ScalingLaw(1.0, 50.0, 0.5, 900.0, 0.2)])
@pytest.mark.parametrize("c", [1e17, 1e21, 1e25])
def test_law_optimal_matches_brute_force(law, c):
    n, d = law.optimal(c)
    assert 6 * n * d == pytest.approx(c, rel=1e-12)
    assert n == pytest.approx(_brute_force_optimum(law, c), rel=1e-3)
    assert law.optimal_loss(c) == pytest.approx(law.loss(n, d))
    assert law.tokens_per_param(c) == pytest.approx(d / n)


def test_chinchilla_law_at_chinchilla_compute():
    # By hand: G = (0.34*406.4 / (0.28*410.7))^(1/0.62) = 1.20157^1.6129 = 1.3447;
    # (C/6)^(0.28/0.62) = (9.6e22)^0.45161 = 10^(22.98227*0.45161) = 2.393e10;
    # N = 3.218e10 (eq. 10 famously implies ~32B, not 70B), D = 9.6e22 / N = 2.983e12.
    n, d = CHINCHILLA.optimal(5.76e23)
    assert n == pytest.approx(3.218e10, rel=0.01)
    assert d == pytest.approx(2.983e12, rel=0.01)


def test_loss_broadcasts_over_arrays():
    n = np.array([1e8, 1e9])
    d = np.array([2e9, 2e10])
    out = EPOCH.loss(n, d)
    assert out.shape == (2,)
    assert out[1] == pytest.approx(1.8172 + 482.01 / 1e9**0.3478 + 2085.43 / 2e10**0.3658)
    assert isinstance(EPOCH.loss(1e9, 2e10), float)
    assert set(LAWS) == {"chinchilla", "epoch"}


@pytest.mark.parametrize("law", [CHINCHILLA, EPOCH])
def test_inference_optimal_without_inference_is_compute_optimal(law):
    target = law.optimal_loss(1e21)
    n, d = inference_optimal(law, target, 0.0)
    # Independently: the compute whose optimum reaches exactly this loss.
    c = brentq(lambda c: law.optimal_loss(c) - target, 1e19, 1e23, rtol=1e-14)
    n_ref, d_ref = law.optimal(c)
    assert n == pytest.approx(n_ref, rel=1e-4)
    assert d == pytest.approx(d_ref, rel=1e-4)
    assert law.loss(n, d) == pytest.approx(target, rel=1e-9)


def test_more_inference_means_smaller_model_more_tokens():
    target = EPOCH.optimal_loss(1e22)
    points = [inference_optimal(EPOCH, target, i) for i in (0.0, 1e11, 1e12, 1e13)]
    ns = [p[0] for p in points]
    ds = [p[1] for p in points]
    assert ns == sorted(ns, reverse=True) and len(set(ns)) == 4
    assert ds == sorted(ds)
    for n, d in points:
        assert EPOCH.loss(n, d) == pytest.approx(target, rel=1e-9)
    # Optimality: nudging N either way (D re-solved for the loss) costs more.
    inf = 1e12
    n0, d0 = points[2]

    def lifetime(n):
        gap = target - EPOCH.E - EPOCH.A / n**EPOCH.alpha
        d = (EPOCH.B / gap) ** (1 / EPOCH.beta)
        return 6 * n * d + 2 * n * inf

    assert lifetime(n0) <= min(lifetime(n0 * 1.02), lifetime(n0 / 1.02))


def test_unreachable_loss_is_a_clear_error():
    with pytest.raises(ValueError, match="unreachable"):
        inference_optimal(EPOCH, EPOCH.E, 1e12)
    with pytest.raises(ValueError, match="unreachable"):
        inference_optimal(CHINCHILLA, 1.0, 0.0)
    with pytest.raises(ValueError, match="inference_tokens"):
        inference_optimal(EPOCH, 3.0, -1.0)


def test_kaplan_allocation():
    # 1 PF-day (8.64e19 FLOPs) -> N = 1.3e9 by construction of Kaplan's fit.
    n, d = kaplan_optimal(8.64e19)
    assert n == pytest.approx(1.3e9, rel=1e-9)
    assert 6 * n * d == pytest.approx(8.64e19)
    # 1000x the compute -> 1000^0.73 = 155.0x the parameters.
    assert kaplan_optimal(8.64e22)[0] / n == pytest.approx(155.0, rel=1e-3)
    for c in (1e22, 5.76e23, 1e25):
        assert kaplan_optimal(c)[0] > chinchilla_optimal(c)[0]
        assert kaplan_optimal(c)[0] > CHINCHILLA.optimal(c)[0]


def test_time_and_cost_helpers():
    c = compute_for_time(3600, GPU_PEAK_FLOPS["h100-sxm"], 0.4)
    assert c == pytest.approx(3600 * 989e12 * 0.4)
    assert compute_for_time(3600, 1e12, 0.5, n_gpus=8) == pytest.approx(8 * 1.8e15)
    assert cost(7200, 2.5) == pytest.approx(5.0)
    assert cost(1800, 2.0, n_gpus=8) == pytest.approx(8.0)
    assert all(v > 1e13 for v in GPU_PEAK_FLOPS.values())


def test_compare_allocations():
    rows = compare_allocations(1e21)
    assert [r["rule"] for r in rows] == ["chinchilla-20", "epoch-optimal", "kaplan"]
    for r in rows:
        assert 6 * r["n_params"] * r["n_tokens"] == pytest.approx(1e21)
        assert r["tokens_per_param"] == pytest.approx(r["n_tokens"] / r["n_params"])
        assert r["loss"] == pytest.approx(EPOCH.loss(r["n_params"], r["n_tokens"]))
    # The law's own optimum is the lowest loss it predicts at this budget.
    assert rows[1]["loss"] == min(r["loss"] for r in rows)
    fitted = ScalingLaw(1.5, 300.0, 0.3, 1000.0, 0.3)
    rows = compare_allocations(1e21, fitted)
    assert rows[1]["rule"] == "fitted-optimal"
    assert rows[1]["loss"] == pytest.approx(fitted.optimal_loss(1e21))
    assert compare_allocations(1e21, CHINCHILLA)[1]["rule"] == "chinchilla-optimal"
