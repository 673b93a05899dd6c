"""Paths only a GPU can exercise (skipped cleanly without one), and torch.compile on CPU."""

import json
import math
from pathlib import Path

import pytest
import torch

from picollm.config import load_config
from picollm.train import run

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def losses(run_dir):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"]


@cuda
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_cuda_mixed_precision_matches_fp32(tiny, tmp_path, dtype):
    if dtype == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("GPU without bf16")
    base = tiny + ["train.steps=5", "train.batch_tokens=256", "train.warmup_steps=1", "train.device=cuda"]
    run(load_config(base + ["train.dtype=fp32", f"run_dir={tmp_path / 'fp32'}"]))
    run(load_config(base + [f"train.dtype={dtype}", f"run_dir={tmp_path / dtype}"]))
    for a, b in zip(losses(tmp_path / "fp32"), losses(tmp_path / dtype)):
        assert math.isfinite(b) and b == pytest.approx(a, abs=0.05)


@cuda
def test_cuda_auto_dtype_is_bf16_or_fp16(tiny):
    cfg = load_config(tiny + ["train.steps=1", "train.batch_tokens=128", "train.device=cuda"])
    run(cfg)
    plan = json.loads((Path(cfg.run_dir) / "plan.json").read_text())
    assert plan["dtype"] == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    assert plan["peak_flops"] is None or plan["peak_flops"] > 1e13


@pytest.mark.slow
def test_compiled_model_trains_like_eager_on_cpu(tiny, tmp_path):
    base = tiny + ["model.n_layer=1", "train.steps=3", "train.batch_tokens=128", "train.warmup_steps=1",
                   "train.dtype=fp32"]
    run(load_config(base + [f"run_dir={tmp_path / 'eager'}"]))
    run(load_config(base + ["train.compile=true", f"run_dir={tmp_path / 'compiled'}"]))
    for a, b in zip(losses(tmp_path / "eager"), losses(tmp_path / "compiled")):
        assert b == pytest.approx(a, rel=1e-4)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_nccl_fsdp_bf16_matches_ddp(tmp_path):
    """FSDP2 on NCCL with bf16 gathered weights and fp32 reduction, against DDP on the same GPUs."""
    from tests.test_dist import BASE, losses as step_losses, torchrun

    common = [o for o in BASE if not o.startswith("train.dtype")] + ["train.steps=6", "train.device=cuda",
                                                                       "train.dtype=bf16"]
    torchrun(2, common + [f"run_dir={tmp_path / 'ddp'}"])
    torchrun(2, common + ["train.parallel=fsdp", f"run_dir={tmp_path / 'fsdp'}"])
    a, b = step_losses(tmp_path / "ddp"), step_losses(tmp_path / "fsdp")
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=0.05)
