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


# ----------------------------------------------------------------------------- FSDP2 root on CPU

def _root_gathered_worker(rank: int, store_dir: str) -> None:
    """One of two gloo processes: which units are gathered between forward and backward."""
    import torch.distributed as torch_dist
    from torch.distributed.tensor import DTensor

    from picollm import parallel
    from picollm.dist import DistInfo
    from picollm.model import GPT, GPTConfig

    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", init_method=f"file://{store_dir}/store", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = GPT(GPTConfig(n_layer=2, n_head=2, d_model=64, seq_len=16, vocab_size=128))
        parallel.wrap(model, "fsdp", DistInfo(rank, rank, 2), torch.device("cpu"), "fp32")
        x = torch.randint(0, 128, (2, 16))
        gathered = lambda p: not isinstance(p, DTensor)  # FSDP2 swaps in the plain tensor while unsharded
        seen = {}
        for step in range(2):
            loss = model(x, x)
            seen[f"head_after_forward_{step}"] = gathered(model.lm_head.weight)
            seen[f"block_after_forward_{step}"] = gathered(model.blocks[0].mlp.up.weight)
            loss.backward()
            seen[f"head_after_backward_{step}"] = gathered(model.lm_head.weight)
        (Path(store_dir) / f"rank{rank}.json").write_text(json.dumps(seen))
    finally:
        torch_dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp_keeps_the_root_gathered_from_forward_to_backward(tmp_path):
    """The root (embedding, final norm, head) is not freed after forward only to be gathered
    again by the backward; blocks are, and everything is sharded again after backward."""
    import torch.multiprocessing as mp

    mp.spawn(_root_gathered_worker, args=(str(tmp_path),), nprocs=2, join=True)
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for step in (0, 1):
            assert seen[f"head_after_forward_{step}"] is True
            assert seen[f"block_after_forward_{step}"] is False
            assert seen[f"head_after_backward_{step}"] is False
