"""Plan calculator views (python -m picollm.plan plan.view=...): numbers and bad input."""

import json
import math

import pytest

from picollm.config import ConfigError, load_config
from picollm.plan import calculator, format_view, main
from picollm.scaling import CHINCHILLA, EPOCH, GPU_PEAK_FLOPS, compare_allocations, inference_optimal


def calc(*overrides: str) -> dict:
    return calculator(load_config(list(overrides)))


def test_compute_view_matches_compare_allocations():
    res = calc("plan.view=compute", "budget.compute=1e21", "plan.law=chinchilla")
    assert res["rows"] == compare_allocations(1e21, CHINCHILLA, "chinchilla")
    chin = res["rows"][0]
    assert chin["rule"] == "chinchilla-20"
    assert chin["n_params"] == pytest.approx(math.sqrt(1e21 / 120))  # N = sqrt(C / (6*20))
    assert chin["tokens_per_param"] == pytest.approx(20)
    assert calc("plan.view=compute", "budget.compute=1e21")["rows"][1]["rule"] == "epoch-optimal"


def test_time_view_on_a_named_gpu():
    res = calc("plan.view=time", "plan.gpu=h100-sxm", "plan.hours=10", "plan.mfu=0.5", "plan.n_gpus=2",
               "plan.price_per_hour=3")
    c = 10 * 3600 * GPU_PEAK_FLOPS["h100-sxm"] * 0.5 * 2
    assert res["compute"] == pytest.approx(c)
    assert res["cost"] == pytest.approx(10 * 3 * 2)
    assert res["rows"] == compare_allocations(c, EPOCH, "epoch")


def test_time_view_on_this_machine_uses_the_probe():
    res = calculator(load_config(["plan.view=time", "plan.hours=0.5", "model.seq_len=64", "tokenizer.vocab_size=512"]),
                     measure_flops=lambda gcfg, micro, device: 2e9)
    assert res["measured_flops"] == pytest.approx(2e9)
    assert res["compute"] == pytest.approx(2e9 * 1800)


def test_params_view_arithmetic():
    res = calc("plan.view=params", "budget.params=1e9", "plan.gpu=a100", "plan.mfu=0.4", "plan.price_per_hour=2")
    assert res["n_tokens"] == pytest.approx(2e10)
    assert res["compute"] == pytest.approx(6 * 1e9 * 2e10)
    seconds = 1.2e20 / (GPU_PEAK_FLOPS["a100"] * 0.4)
    assert res["seconds"] == pytest.approx(seconds)
    assert res["cost"] == pytest.approx(seconds / 3600 * 2)
    assert "gpu" not in calc("plan.view=params", "budget.params=1e9")


def test_inference_view_matches_inference_optimal():
    res = calc("plan.view=inference", "plan.inference_tokens=1e13", "budget.compute=1e21")
    loss = EPOCH.optimal_loss(1e21)
    assert res["target_loss"] == pytest.approx(loss)
    n0, d0 = inference_optimal(EPOCH, loss, 0.0)
    n1, d1 = inference_optimal(EPOCH, loss, 1e13)
    assert res["rows"][0]["n_params"] == pytest.approx(n0) and res["rows"][1]["n_params"] == pytest.approx(n1)
    assert n1 < n0 and d1 > d0  # serving many tokens favours a smaller model trained longer
    life0, life1 = 6 * n0 * d0 + 2 * n0 * 1e13, 6 * n1 * d1 + 2 * n1 * 1e13
    assert res["lifetime_savings"] == pytest.approx(1 - life1 / life0)
    by_loss = calc("plan.view=inference", "plan.inference_tokens=1e12", "plan.target_loss=2.5")
    assert by_loss["target_loss"] == 2.5


@pytest.mark.parametrize("overrides, words", [
    (["plan.view=time", "plan.gpu=h99", "plan.hours=1"], ["h99", "h100-sxm", "a100"]),
    (["plan.view=compute"], ["budget.compute"]),
    (["plan.view=compute", "budget.compute=1e20", "plan.law=kaplan"], ["plan.law", "epoch"]),
    (["plan.view=bogus"], ["plan.view", "inference"]),
    (["plan.view=params"], ["budget.params"]),
    (["plan.view=time", "plan.gpu=a100"], ["plan.hours"]),
    (["plan.view=time", "plan.gpu=a100", "plan.hours=1", "plan.mfu=1.5"], ["mfu"]),
    (["plan.view=inference", "budget.compute=1e20"], ["plan.inference_tokens"]),
    (["plan.view=inference", "plan.inference_tokens=1e9"], ["plan.target_loss"]),
    (["plan.view=inference", "plan.inference_tokens=1e9", "plan.target_loss=1.0"], ["unreachable"]),
])
def test_bad_input_gets_one_clear_sentence(overrides, words):
    with pytest.raises(ValueError) as info:
        calc(*overrides)
    for w in words:
        assert w in str(info.value)


def test_cli_text_and_json(capsys):
    main(["plan.view=compute", "budget.compute=1e20"])
    text = capsys.readouterr().out
    assert "chinchilla-20" in text and "kaplan" in text and "D/N" in text
    main(["plan.view=params", "budget.params=1e8", "plan.format=json"])
    res = json.loads(capsys.readouterr().out)
    assert res["compute"] == pytest.approx(6 * 1e8 * 2e9)
    with pytest.raises(SystemExit, match="unknown"):
        main(["plan.view=time", "plan.gpu=nope", "plan.hours=1"])
    for view in (calc("plan.view=inference", "plan.inference_tokens=1e12", "plan.target_loss=2.4"),
                 calc("plan.view=time", "plan.gpu=t4", "plan.hours=2", "plan.price_per_hour=0.5")):
        assert format_view(view)


def test_compute_view_takes_a_law_from_a_sweep_summary(tmp_path):
    """plan.law accepts a path (the config and the report do); the calculator must too."""
    import json as _json

    from picollm.config import ConfigError, load_config
    from picollm.plan import calculator
    from picollm.scaling import EPOCH

    summary = tmp_path / "summary.json"
    summary.write_text(_json.dumps({"parametric": {"E": EPOCH.E, "A": EPOCH.A, "alpha": EPOCH.alpha, "B": EPOCH.B,
                                                   "beta": EPOCH.beta}}))
    from_file = calculator(load_config(["plan.view=compute", "budget.compute=1e21", f"plan.law={summary}"]))
    named = calculator(load_config(["plan.view=compute", "budget.compute=1e21", "plan.law=epoch"]))
    assert from_file["law"] == "summary.json"
    assert [r["n_params"] for r in from_file["rows"]] == [r["n_params"] for r in named["rows"]]
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ConfigError, match="nor a readable JSON file"):
        calculator(load_config(["plan.view=compute", "budget.compute=1e21", f"plan.law={bad}"]))
