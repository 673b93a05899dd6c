"""The cost of running one training job as several processes on this machine.

    python scripts/bench_dist.py [--steps 12] [--nproc 2]

Trains the reference shape (6x384, seq 256, vocab 8192, global batch 16 x 256 tokens)
for the same steps three ways: one process using every core; ``--nproc`` processes
under torchrun with DDP; the same with FSDP2. Each run measures its own matmul peak
(per process, with the threads it has) and reports MFU against peak x processes, so
the ratios hold on a noisy machine. Reported: median step time after the first two
steps, tokens/s, MFU, and each run's rank-0 peak memory (RSS on CPU, allocated memory
on CUDA), which is where FSDP's sharding shows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHAPE = ["model=reference", "model.seq_len=256", "tokenizer.vocab_size=8192", "train.batch_tokens=4096",
         "train.micro_batch=4", "train.dtype=fp32", "train.eval_tokens=16384", "train.report=false",
         "train.log_every=1000"]


def run(cmd: list[str], env: dict) -> None:
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")


def summarize(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"][2:]  # the first steps include warm-up work
    final = json.loads((run_dir / "final.json").read_text())
    return {"step_s": statistics.median(r["dt"] for r in train), "tok_s": statistics.median(r["tok_per_s"] for r in train),
            "mfu": statistics.median(r["mfu"] for r in train), "peak_mib": final["peak_memory_mib"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--nproc", type=int, default=2)
    args = p.parse_args()
    cores = os.cpu_count() or 1
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    common = SHAPE + [f"train.steps={args.steps}", "train.eval_every=100000", "train.save_every=100000"]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        run([sys.executable, "-m", "picollm.train", *common, f"run_dir={tmp}/one"], env)
        results["1 process"] = summarize(Path(tmp) / "one")
        threads = max(1, cores // args.nproc)
        for mode in ("ddp", "fsdp"):
            run_dir = Path(tmp) / mode
            run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
                 "-m", "picollm.train", *common, f"train.parallel={mode}", f"train.num_threads={threads}",
                 f"run_dir={run_dir}"], {**env, "OMP_NUM_THREADS": str(threads)})
            results[f"{args.nproc} processes, {mode}"] = summarize(run_dir)
    base = results["1 process"]["tok_s"]
    print(f"reference shape, {args.steps} steps of 4096 tokens, {cores} cores; median step after the first two")
    print("| run | step (s) | tokens/s | vs 1 process | MFU | rank-0 peak memory |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['step_s']:.3f} | {r['tok_s']:,.0f} | {r['tok_s'] / base:.2f}x | {r['mfu']:.1%} | "
              f"{r['peak_mib']:,.0f} MiB |")


if __name__ == "__main__":
    main()
