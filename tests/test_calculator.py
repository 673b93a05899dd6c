"""Calculator views (python -m picollm.calculator calc.view=...): numbers and bad input."""

import json
import math

import pytest

from picollm.config import ConfigError, load_config
from picollm.calculator import calculate, format_view, main
from picollm.hardware import GPU_PEAK_FLOPS
from picollm.scaling import CHINCHILLA, EPOCH, compare_allocations, inference_optimal


def calc(*overrides: str) -> dict:
    return calculate(load_config(list(overrides)))


def test_compute_view_matches_compare_allocations():
    res = calc("calc.view=compute", "budget.compute=1e21", "calc.law=chinchilla")
    assert res["rows"] == compare_allocations(1e21, CHINCHILLA, "chinchilla")
    chin = res["rows"][0]
    assert chin["rule"] == "chinchilla-20"
    assert chin["n_params"] == pytest.approx(math.sqrt(1e21 / 120))  # N = sqrt(C / (6*20))
    assert chin["tokens_per_param"] == pytest.approx(20)
    assert calc("calc.view=compute", "budget.compute=1e21")["rows"][1]["rule"] == "epoch-optimal"


def test_time_view_on_a_named_gpu():
    res = calc("calc.view=time", "calc.gpu=h100-sxm", "calc.hours=10", "calc.mfu=0.5", "calc.n_gpus=2",
               "calc.price_per_hour=3")
    c = 10 * 3600 * GPU_PEAK_FLOPS["h100-sxm"] * 0.5 * 2
    assert res["compute"] == pytest.approx(c)
    assert res["cost"] == pytest.approx(10 * 3 * 2)
    assert res["rows"] == compare_allocations(c, EPOCH, "epoch")


def test_time_view_on_this_machine_uses_the_probe():
    res = calculate(load_config(["calc.view=time", "calc.hours=0.5", "model.seq_len=64", "tokenizer.vocab_size=512"]),
                     measure_flops=lambda gcfg, micro, device: 2e9)
    assert res["measured_flops"] == pytest.approx(2e9)
    assert res["compute"] == pytest.approx(2e9 * 1800)


def test_params_view_arithmetic():
    res = calc("calc.view=params", "budget.params=1e9", "calc.gpu=a100", "calc.mfu=0.4", "calc.price_per_hour=2")
    assert res["n_tokens"] == pytest.approx(2e10)
    assert res["compute"] == pytest.approx(6 * 1e9 * 2e10)
    seconds = 1.2e20 / (GPU_PEAK_FLOPS["a100"] * 0.4)
    assert res["seconds"] == pytest.approx(seconds)
    assert res["cost"] == pytest.approx(seconds / 3600 * 2)
    assert "gpu" not in calc("calc.view=params", "budget.params=1e9")


def test_inference_view_matches_inference_optimal():
    res = calc("calc.view=inference", "calc.inference_tokens=1e13", "budget.compute=1e21")
    loss = EPOCH.optimal_loss(1e21)
    assert res["target_loss"] == pytest.approx(loss)
    n0, d0 = inference_optimal(EPOCH, loss, 0.0)
    n1, d1 = inference_optimal(EPOCH, loss, 1e13)
    assert res["rows"][0]["n_params"] == pytest.approx(n0) and res["rows"][1]["n_params"] == pytest.approx(n1)
    assert n1 < n0 and d1 > d0  # serving many tokens favours a smaller model trained longer
    life0, life1 = 6 * n0 * d0 + 2 * n0 * 1e13, 6 * n1 * d1 + 2 * n1 * 1e13
    assert res["lifetime_savings"] == pytest.approx(1 - life1 / life0)
    by_loss = calc("calc.view=inference", "calc.inference_tokens=1e12", "calc.target_loss=2.5")
    assert by_loss["target_loss"] == 2.5


@pytest.mark.parametrize("overrides, words", [
    (["calc.view=time", "calc.gpu=h99", "calc.hours=1"], ["h99", "h100-sxm", "a100"]),
    (["calc.view=compute"], ["budget.compute"]),
    (["calc.view=compute", "budget.compute=1e20", "calc.law=kaplan"], ["calc.law", "epoch"]),
    (["calc.view=bogus"], ["calc.view", "inference"]),
    (["calc.view=params"], ["budget.params"]),
    (["calc.view=time", "calc.gpu=a100"], ["calc.hours"]),
    (["calc.view=time", "calc.gpu=a100", "calc.hours=1", "calc.mfu=1.5"], ["mfu"]),
    (["calc.view=inference", "budget.compute=1e20"], ["calc.inference_tokens"]),
    (["calc.view=inference", "calc.inference_tokens=1e9"], ["calc.target_loss"]),
    (["calc.view=inference", "calc.inference_tokens=1e9", "calc.target_loss=1.0"], ["unreachable"]),
])
def test_bad_input_gets_one_clear_sentence(overrides, words):
    with pytest.raises(ValueError) as info:
        calc(*overrides)
    for w in words:
        assert w in str(info.value)


def test_cli_text_and_json(capsys):
    main(["calc.view=compute", "budget.compute=1e20"])
    text = capsys.readouterr().out
    assert "chinchilla-20" in text and "kaplan" in text and "D/N" in text
    main(["calc.view=params", "budget.params=1e8", "calc.format=json"])
    res = json.loads(capsys.readouterr().out)
    assert res["compute"] == pytest.approx(6 * 1e8 * 2e9)
    with pytest.raises(SystemExit, match="unknown"):
        main(["calc.view=time", "calc.gpu=nope", "calc.hours=1"])
    for view in (calc("calc.view=inference", "calc.inference_tokens=1e12", "calc.target_loss=2.4"),
                 calc("calc.view=time", "calc.gpu=t4", "calc.hours=2", "calc.price_per_hour=0.5")):
        assert format_view(view)


def test_compute_view_takes_a_law_from_a_sweep_summary(tmp_path):
    """calc.law accepts a path (the config and the report do); the calculator must too."""
    import json as _json

    from picollm.config import ConfigError, load_config
    from picollm.calculator import calculate
    from picollm.scaling import EPOCH

    summary = tmp_path / "summary.json"
    summary.write_text(_json.dumps({"parametric": {"E": EPOCH.E, "A": EPOCH.A, "alpha": EPOCH.alpha, "B": EPOCH.B,
                                                   "beta": EPOCH.beta}}))
    from_file = calculate(load_config(["calc.view=compute", "budget.compute=1e21", f"calc.law={summary}"]))
    named = calculate(load_config(["calc.view=compute", "budget.compute=1e21", "calc.law=epoch"]))
    assert from_file["law"] == "summary.json"
    assert [r["n_params"] for r in from_file["rows"]] == [r["n_params"] for r in named["rows"]]
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ConfigError, match="nor a readable JSON file"):
        calculate(load_config(["calc.view=compute", "budget.compute=1e21", f"calc.law={bad}"]))


def test_the_plan_command_points_calculator_settings_to_the_calculator():
    """The calculator left the plan command: its old settings get the new command line."""
    from picollm.plan import main as plan_main

    with pytest.raises(SystemExit) as err:
        plan_main(["plan.view=time"])
    assert "python -m picollm.calculator calc.view=time" in str(err.value)
    with pytest.raises(ConfigError, match="calc.gpu=a100"):
        load_config(["plan.gpu=a100", "plan.hours=2"])
    assert load_config(["calc.view=time", "calc.gpu=a100"]).calc.gpu == "a100"


def test_one_gpu_table_matches_each_device_to_its_own_entry():
    """A device takes the first entry whose name its own contains: no entry may hide a later
    one (the A10 entry used to give an A10G the A10's 125 TFLOP/s instead of its ~70)."""
    from picollm.hardware import GPU_PEAKS, published_peak

    specs = list(GPU_PEAKS.values())
    for i, spec in enumerate(specs):
        assert not any(earlier.device_name in spec.device_name for earlier in specs[:i]), spec
        assert published_peak(f"NVIDIA {spec.device_name}", "fp32") == spec.peaks["fp32"]
    assert published_peak("NVIDIA A10G", "bf16") == GPU_PEAK_FLOPS["a10g"] == 70e12
    assert published_peak("NVIDIA A10", "bf16") == GPU_PEAK_FLOPS["a10"] == 125e12
    assert published_peak("NVIDIA A100-SXM4-80GB", "bf16") == 312e12
    assert published_peak("NVIDIA H100 80GB HBM3", "bf16") == GPU_PEAK_FLOPS["h100-sxm"] == 989e12
    assert published_peak("Tesla T4", "bf16") is None and GPU_PEAK_FLOPS["t4"] == 65e12  # no bf16: fp16
