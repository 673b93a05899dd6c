"""Paths only a GPU can exercise (skipped cleanly without one), and torch.compile on CPU."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from picollm.config import load_config
from picollm.train import run

REPO = Path(__file__).resolve().parents[1]
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
def test_cuda_fp16_steps_go_through_the_grad_scaler(tiny, tmp_path):
    """fp16 autocast with loss scaling: the scaler's state is live and saved with the run."""
    from picollm import checkpoint as ckpt

    run_dir = tmp_path / "fp16"
    run(load_config(tiny + ["train.steps=4", "train.batch_tokens=256", "train.warmup_steps=1", "train.device=cuda",
                            "train.dtype=fp16", f"run_dir={run_dir}"]))
    final = json.loads((run_dir / "final.json").read_text())
    assert final["rollbacks"] == 0 and math.isfinite(final["val_loss"])
    scaler = ckpt.load_checkpoint(ckpt.step_path(run_dir, 4))["scaler"]
    assert scaler is not None and 0 < scaler["scale"] <= 2.0**16  # halved on overflow, never grown in 4 steps


@cuda
def test_cuda_compiled_bf16_trains_like_eager(tiny, tmp_path):
    if not torch.cuda.is_bf16_supported():
        pytest.skip("GPU without bf16")
    base = tiny + ["train.steps=4", "train.batch_tokens=256", "train.warmup_steps=1", "train.device=cuda",
                   "train.dtype=bf16"]
    run(load_config(base + [f"run_dir={tmp_path / 'eager'}"]))
    run(load_config(base + ["train.compile=true", f"run_dir={tmp_path / 'compiled'}"]))
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert len(compiled) == 4
    for a, b in zip(eager, compiled):  # the same bf16 math, fused differently
        assert b == pytest.approx(a, abs=0.05)


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
        # Both ranks leave together: a rank that tore gloo down while its peer was still in a
        # collective aborted the peer once in a full-suite run ("terminate called without an
        # active exception").
        torch_dist.barrier()
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


# ----------------------------------------------------------------------------- scripts/gpu_check.sh on CPU

GPU_CHECK = REPO / "scripts" / "gpu_check.sh"


def gpu_check(*args, env=None):
    return subprocess.run(["bash", str(GPU_CHECK), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_gpu_check_script_parses():
    out = subprocess.run(["bash", "-n", str(GPU_CHECK)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_gpu_check_refuses_in_one_sentence_without_a_visible_gpu(tmp_path):
    hidden = gpu_check(env={"CUDA_VISIBLE_DEVICES": "", "GPU_CHECK_DIR": str(tmp_path / "check")})
    refusals = [hidden]
    if not torch.cuda.is_available():  # here nvidia-smi finds nothing either
        refusals.append(gpu_check(env={"GPU_CHECK_DIR": str(tmp_path / "check")}))
    for out in refusals:
        assert out.returncode == 2 and out.stdout == ""
        assert out.stderr.count("\n") == 1 and "no CUDA device is visible" in out.stderr
        assert not (tmp_path / "check").exists()  # refused before any setup or training


def stop_after_first_checkpoint(overrides, run_dir) -> int:
    """The resume stage's first half: SIGTERM once a checkpoint manifest exists."""
    proc = subprocess.Popen([sys.executable, "-m", "picollm.train", *overrides], cwd=REPO, env=os.environ.copy(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while proc.poll() is None and not list((run_dir / "checkpoints").glob("step_*.json")):
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()


def write_stages(out, **codes):
    (out / "stages.tsv").write_text("".join(f"{name}\t{rc}\n" for name, rc in codes.items()))


@pytest.mark.slow
def test_gpu_check_summary_of_real_runs(tiny, tmp_path):
    """The summary the GPU check prints, computed from real (tiny, CPU) runs of each stage."""
    out = tmp_path / "check"
    base = [o for o in tiny if not o.startswith("run_dir=")] + [
        "train.batch_tokens=256", "train.micro_batch=2", "train.warmup_steps=1", "train.eval_every=1000"]
    run(load_config(base + ["train.steps=6", "train.dtype=fp32", f"run_dir={out / 'perf'}"]))
    run(load_config(base + ["train.steps=3", "train.dtype=fp16", f"run_dir={out / 'fp16'}"]))
    resume = base + ["train.steps=30", "train.save_every=1", "train.dtype=fp32", f"run_dir={out / 'resume'}"]
    first = stop_after_first_checkpoint(resume, out / "resume")
    run(load_config(resume))  # the same command again
    write_stages(out, tests=0, perf=0, fp16=0, resume_first=first, resume_second=0)

    done = gpu_check("--summarize", str(out))
    summary = json.loads((out / "summary.json").read_text())
    stages = summary["stages"]
    assert first == 143, "SIGTERM should stop the run after a save (exit 128 + 15)"
    assert stages["tests"]["status"] == "PASS"
    perf = stages["perf"]
    plan = json.loads((out / "perf" / "plan.json").read_text())
    final = json.loads((out / "perf" / "final.json").read_text())
    tok_s = [r["tok_per_s"] for r in map(json.loads, (out / "perf" / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "train"]
    assert perf["tok_per_s"] == pytest.approx(sorted(tok_s[3:])[1])  # median of the later half (steps 4-6)
    assert perf["est_memory_mib"] == pytest.approx(plan["memory"]["total"] / 2**20)
    assert perf["memory_ratio"] == pytest.approx(final["peak_memory_mib"] / perf["est_memory_mib"])
    assert perf["memory_check"] == ("PASS" if abs(perf["memory_ratio"] - 1) <= 0.25 else "FAIL")
    assert perf["time_ratio"] == pytest.approx(final["train_seconds"] / plan["est_seconds"])
    assert perf["mfu_check"] == "n/a"  # the 45% target is an H100's
    assert stages["fp16"]["status"] == "PASS" and stages["fp16"]["rollbacks"] == 0
    resumed_at = stages["resume"]["resumed_at"]  # the step the SIGTERM's save was made at
    assert stages["resume"]["status"] == "PASS" and len(resumed_at) == 1 and 1 <= resumed_at[0] < 30
    assert done.returncode == (0 if summary["passed"] else 1)
    assert summary["passed"] == (perf["memory_check"] == "PASS")  # CPU RSS may miss the device estimate
    assert done.stdout == (out / "summary.md").read_text() and "| resume | PASS |" in done.stdout

    # Failures are collected, each with its reason, and make the exit status non-zero.
    write_stages(out, tests=1, perf=0, fp16=0, resume_first=0, resume_second=0)
    (out / "fp16" / "final.json").unlink()
    failed = gpu_check("--summarize", str(out))
    stages = json.loads((out / "summary.json").read_text())["stages"]
    assert failed.returncode == 1 and "# GPU check: FAIL" in failed.stdout
    assert stages["tests"]["status"] == "FAIL" and stages["fp16"]["why"] == "no plan.json/final.json"
    assert "exited 0, not 143" in stages["resume"]["why"]
