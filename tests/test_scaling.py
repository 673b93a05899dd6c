"""Chinchilla arithmetic, checked against hand calculations and brute-force searches."""

import math

import numpy as np
import pytest
from scipy.optimize import brentq

from picollm.hardware import GPU_PEAK_FLOPS
from picollm.scaling import (
    CHINCHILLA,
    EPOCH,
    LAWS,
    ScalingLaw,
    chinchilla_optimal,
    compare_allocations,
    compute_for_time,
    cost,
    crossover_from_tokens,
    crossover_rows,
    inference_crossover,
    inference_optimal,
    kaplan_optimal,
    lifetime_compute,
    measured_tokens_for_loss,
    overtraining_crossover,
    reference_run,
)


def loss_at_equal_lifetime_compute(law: ScalingLaw, compute: float, size_ratio: float, inference_tokens) -> np.ndarray:
    """L(N_s, D_s(I)) of the smaller model (see overtraining_crossover) for each inference
    budget I, computed directly: the oracle the crossover's closed form is checked against."""
    n_ref, _ = law.optimal(compute)
    n_small = size_ratio * n_ref
    d_small = (compute + 2.0 * np.asarray(inference_tokens, dtype=float) * (n_ref - n_small)) / (6.0 * n_small)
    return law.loss(n_small, d_small)


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


# ---------------------------------------------------------------- over-training (Sardana et al.)


def test_overtraining_crossover_hand_arithmetic():
    # L = 1/sqrt(N) + 1/sqrt(D): at C = 6e12 the optimum is N = D = 1e6 with L = 2e-3.
    # N_s = 0.64e6 has 1/sqrt(N_s) = 1.25e-3, so it needs 1/sqrt(D) = 0.75e-3: D = 1/5.625e-7
    # = 1,777,777.8 tokens, which cost 6 * 0.64e6 * 1,777,777.8 = 6.8267e12 FLOPs; the
    # 0.8267e12 more than C are paid by 2 * (1e6 - 0.64e6) = 7.2e5 FLOPs saved per inference
    # token, so I* = 0.8267e12 / 7.2e5 = 1,148,148 tokens.
    law = ScalingLaw(E=0.0, A=1.0, alpha=0.5, B=1.0, beta=0.5)
    out = overtraining_crossover(law, 6e12, 0.64)
    assert (out["n_ref"], out["d_ref"], out["loss_ref"]) == pytest.approx((1e6, 1e6, 2e-3))
    assert out["n_small"] == pytest.approx(6.4e5)
    assert out["d_small"] == pytest.approx(1_777_777.78, rel=1e-8)
    assert out["inference_tokens"] == pytest.approx(1_148_148.15, rel=1e-8)
    assert out["total_compute"] == pytest.approx(6e12 + 2e6 * 1_148_148.15, rel=1e-8)
    assert out["reachable"]
    # At I*, both models cost the same over their lifetime and reach the same loss.
    i_star = out["inference_tokens"]
    assert lifetime_compute(out["n_small"], out["d_small"], i_star) == pytest.approx(lifetime_compute(1e6, 1e6, i_star))
    assert loss_at_equal_lifetime_compute(law, 6e12, 0.64, i_star) == pytest.approx(2e-3)


@pytest.mark.parametrize("law", [CHINCHILLA, EPOCH], ids=["chinchilla", "epoch"])
@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.8])
def test_overtraining_crossover_matches_a_root_search(law, ratio):
    """The closed form against brentq on L(N_s, D_s(I)) - L_c, and the sign on either side."""
    c = 1e21
    out = overtraining_crossover(law, c, ratio)
    gap = lambda i: loss_at_equal_lifetime_compute(law, c, ratio, i) - out["loss_ref"]
    assert gap(0.0) > 0  # no inference: the compute-optimal model wins
    root = brentq(gap, 0.0, 1e6 * out["d_ref"], xtol=1e-6 * out["d_ref"], rtol=1e-12)
    assert out["inference_tokens"] == pytest.approx(root, rel=1e-6)
    assert gap(0.5 * root) > 0 > gap(2.0 * root)


def test_overtraining_crossover_unreachable_and_bad_input():
    law = ScalingLaw(E=0.0, A=1.0, alpha=0.5, B=1.0, beta=0.5)
    # N_s = N_c / 4 has A/N_s^alpha = 2e-3 = L_c already: no amount of data reaches L_c.
    out = overtraining_crossover(law, 6e12, 0.25)
    assert not out["reachable"] and out["inference_tokens"] == math.inf
    with pytest.raises(ValueError, match="size_ratio must be in"):
        overtraining_crossover(law, 6e12, 1.0)
    with pytest.raises(ValueError, match="n_small"):
        inference_crossover(law, 1e6, 1e6, 2e6)


def test_inference_crossover_from_a_trained_reference():
    law = ScalingLaw(E=0.0, A=1.0, alpha=0.5, B=1.0, beta=0.5)
    # A reference that is not compute-optimal (N = 1e6, D = 4e6: L = 1.5e-3); N_s = 0.64e6
    # needs 1/sqrt(D) = 0.25e-3: D = 1.6e7; I* = (6*0.64e6*1.6e7 - 6*1e6*4e6) / 7.2e5.
    out = inference_crossover(law, 1e6, 4e6, 6.4e5)
    assert out["d_small"] == pytest.approx(1.6e7)
    assert out["inference_tokens"] == pytest.approx((6.144e13 - 2.4e13) / 7.2e5)
    same = crossover_from_tokens(1e6, 4e6, 1.5e-3, 6.4e5, 1.6e7)
    assert same["inference_tokens"] == pytest.approx(out["inference_tokens"])


def test_measured_tokens_for_loss_interpolates_in_log_log():
    # Loss 3e-3 at 1e6 tokens, 2e-3 at 4e6: 2.5e-3 lies log(2.5/3)/log(2/3) = 0.4497 of the way
    # in log D, at 1e6 * 4**0.4497 = 1.865e6.
    assert measured_tokens_for_loss([4e6, 1e6, 1.6e7], [2e-3, 3e-3, 1.5e-3], 2.5e-3) == pytest.approx(1.8652e6, rel=1e-4)
    assert measured_tokens_for_loss([1e6, 4e6], [3e-3, 2e-3], 1e-3) == math.inf  # never reached
    assert math.isnan(measured_tokens_for_loss([1e6, 4e6], [3e-3, 2e-3], 4e-3))  # below already: no bracket


def test_overtraining_script_measured_beside_predicted(tmp_path, capsys):
    """Runs drawn from a known law: the measured crossover (interpolated between runs) lands
    near the law's prediction; sizes not trained long enough say 'never'."""
    import importlib.util
    import json
    from pathlib import Path

    law = ScalingLaw(E=1.8, A=400.0, alpha=0.33, B=1500.0, beta=0.37)
    rows = []
    for budget in (1e19, 3e19, 1e20, 3e20, 1e21):
        for size in (2e8, 3e8, 5e8, 8e8):
            d = budget / (6 * size)
            rows.append({"budget": budget, "n_params": size, "n_tokens": d, "compute": budget,
                         "val_loss": law.loss(size, d), "status": "ok"})
    table = tmp_path / "results.jsonl"
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    law_file = tmp_path / "law.json"
    law_file.write_text(json.dumps({"E": law.E, "A": law.A, "alpha": law.alpha, "B": law.B, "beta": law.beta}))
    path = Path(__file__).resolve().parent.parent / "scripts" / "overtraining.py"
    spec = importlib.util.spec_from_file_location("overtraining_script", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    assert script.main([str(table), "--budget", "1e19", "--law", str(law_file)]) == 0
    text = capsys.readouterr().out
    # At 1e19 the law's best of the four sizes is 5e8 (its optimum is 5.5e8).
    assert "reference: N=5e+08" in text
    runs = script.load_results(table)
    ref = reference_run(runs.budget, runs.val_loss, 1e19)
    got = {r["n_small"]: r for r in crossover_rows(runs.n_params, runs.n_tokens, runs.val_loss, ref, law)}
    assert set(got) == {2e8, 3e8}
    for r in got.values():
        # Linear interpolation in log-log across a 3.3x step in D of a curve that bends
        # (convex in log-log): measured 5% off the exact D*, so 10%.
        assert r["measured_d"] == pytest.approx(r["predicted"]["d_small"], rel=0.1)
        # I* = (6 N_s D* - C) / (2 dN) magnifies D*'s relative error by 6 N_s D* / (6 N_s D* - C).
        train_small = 6 * r["n_small"] * r["predicted"]["d_small"]
        magnified = 0.1 * train_small / (train_small - 6 * runs.n_params[ref] * runs.n_tokens[ref])
        assert r["measured"]["inference_tokens"] == pytest.approx(r["predicted"]["inference_tokens"], rel=magnified)
    assert "| 2e+08 | 0.40 |" in text and "| 3e+08 | 0.60 |" in text
