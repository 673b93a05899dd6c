"""The benchmark scripts' own argument handling (their measurements live in BENCHMARKS.md)."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch


def _script(name: str):
    path = Path(__file__).resolve().parent.parent / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def test_time_to_loss_shapes_take_an_optional_peak_lr_and_optimizer():
    bench = _script("bench_time_to_loss")
    assert bench.shape_overrides("auto") == []
    assert bench.shape_overrides("auto@0.006") == ["train.lr=0.006"]
    assert bench.shape_overrides("4x128h4s64@1.2e-2") == ["model.n_layer=4", "model.d_model=128", "model.n_head=4",
                                                          "model.seq_len=64", "train.lr=1.2e-2"]
    assert bench.shape_overrides("auto+muon") == ["train.optimizer=muon"]
    assert bench.shape_overrides("2x128@0.01+muon") == ["model.n_layer=2", "model.d_model=128", "train.lr=0.01",
                                                        "train.optimizer=muon"]
    with pytest.raises(SystemExit, match="the peak LR after @ must be a number"):
        bench.shape_overrides("auto@fast")
    with pytest.raises(SystemExit, match="the optimizer after \\+ must be one of adamw, muon"):
        bench.shape_overrides("auto+sgd")
    with pytest.raises(SystemExit, match="is not LxD"):
        bench.shape_overrides("wide@0.01")


def test_nanogpt_bench_refuses_dtypes_without_its_fp32_yardstick(tmp_path):
    """--dtypes must include fp32 (the comparison is against nanoGPT's fp32 CPU default) and
    nothing but fp32 and bf16; refused before nanoGPT is even looked for."""
    bench = _script("bench_nanogpt")
    for bad in ("bf16", "fp32,fp16"):
        with pytest.raises(SystemExit, match="--dtypes takes fp32"):
            bench.main(["--nanogpt", str(tmp_path / "absent"), "--dtypes", bad])
    threads = torch.get_num_threads()
    with pytest.raises(SystemExit, match="does not exist"):  # fp32 alone passes the check
        bench.main(["--nanogpt", str(tmp_path / "absent"), "--dtypes", "fp32", "--threads", "1"])
    assert torch.get_num_threads() == threads  # a refused call leaves this process's threads alone


def test_eval_bench_times_each_shape_at_both_batches(capsys):
    """bench_eval prints one row per case: the capstone micro-batch, the raised evaluation batch
    (4x it for the capstone's 4-16-sequence micro-batches, capped at 2048 tokens) and a ratio."""
    threads = torch.get_num_threads()
    try:
        _script("bench_eval").main(["--rounds", "1"])
    finally:
        torch.set_num_threads(threads)
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| L")]
    assert len(rows) == 6
    for shape, micro, wide, at_micro, at_wide, ratio in rows:
        assert int(wide) == max(int(micro), min(4 * int(micro), 32)) and float(at_micro) > 0 and float(at_wide) > 0
        assert float(ratio.strip().rstrip("x")) == pytest.approx(float(at_wide) / float(at_micro), rel=0.03)
