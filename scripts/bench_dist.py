"""The cost (or gain) of running one training job as several processes on this machine.

    python scripts/bench_dist.py [--steps 12] [--nproc 2]
    python scripts/bench_dist.py --shape speedrun --dtype bf16 --modes ddp --rounds 3 [--baseline TREE]

Trains one shape for the same steps several ways: one process using every core; ``--nproc``
processes under torchrun with DDP; the same with FSDP2. ``--shape reference``: 6x384, seq
256, vocab 8192, a global batch of 16 x 256 tokens. ``--shape speedrun``: the CPU
speedrun's model, 2x128, vocab 2048, 16 x 256 tokens per process (the global batch grows
with the processes, as budget.minutes plans it on a CPU). ``--rounds`` alternates the ways,
round after round, so a noisy machine slows all of them alike; ``--baseline`` adds another
picollm tree's one-process run to every round. Each run measures its own matmul peak (per
process, with the threads it has) and reports MFU against peak x processes. Reported per
way: median step time after the first two steps, tokens/s, MFU and rank-0 peak memory
(RSS on CPU, allocated memory on CUDA), each the median over rounds, and tokens/s against
one process in the same round.
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
SHAPES = {
    "reference": ["model=reference", "model.seq_len=256", "tokenizer.vocab_size=8192", "train.batch_tokens=4096",
                  "train.micro_batch=4"],
    "speedrun": ["model.n_layer=2", "model.d_model=128", "model.n_head=2", "model.seq_len=256",
                 "tokenizer.vocab_size=2048", "train.micro_batch=16"],
}
PER_PROCESS_BATCH = {"speedrun": 4096}  # tokens per process; the reference shape keeps one global batch
COMMON = ["train.eval_tokens=16384", "train.report=false", "train.log_every=1000"]


def run(cmd: list[str], env: dict, cwd: Path = REPO) -> None:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
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
    p.add_argument("--shape", choices=sorted(SHAPES), default="reference")
    p.add_argument("--dtype", default="fp32", help="train.dtype for every run (fp32, bf16 or auto)")
    p.add_argument("--modes", default="ddp,fsdp", help="comma-separated: ddp, fsdp")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--baseline", type=Path, help="another picollm tree whose one-process run joins every round")
    args = p.parse_args()
    cores = os.cpu_count() or 1
    threads = max(1, cores // args.nproc)
    common = SHAPES[args.shape] + COMMON + [f"train.dtype={args.dtype}", f"train.steps={args.steps}",
                                            "train.eval_every=100000", "train.save_every=100000"]

    def batch(procs: int) -> list[str]:
        per = PER_PROCESS_BATCH.get(args.shape)
        return [f"train.batch_tokens={per * procs}"] if per else []

    ways = {"1 process": ([sys.executable, "-m", "picollm.train", *common, *batch(1)], REPO, {})}
    if args.baseline:
        ways["1 process, baseline tree"] = ([sys.executable, "-m", "picollm.train", *common, *batch(1)],
                                            args.baseline.resolve(), {})
    for mode in filter(None, args.modes.split(",")):
        ways[f"{args.nproc} processes, {mode}"] = (
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
             "-m", "picollm.train", *common, *batch(args.nproc), f"train.parallel={mode}",
             f"train.num_threads={threads}"], REPO, {"OMP_NUM_THREADS": str(threads)})
    results: dict = {name: [] for name in ways}
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.rounds):
            for i, (name, (cmd, tree, extra)) in enumerate(ways.items()):
                run_dir = Path(tmp) / f"r{k}_{i}"
                run(cmd + [f"run_dir={run_dir}"], {**os.environ, "PYTHONPATH": str(tree), **extra}, tree)
                results[name].append(summarize(run_dir))
    ratios = {name: [r["tok_s"] / b["tok_s"] for r, b in zip(rs, results["1 process"])] for name, rs in results.items()}
    print(f"{args.shape} shape, {args.steps} steps, dtype {args.dtype}, {cores} cores, {args.rounds} round(s); "
          "median step after the first two, medians over rounds")
    print("| run | step (s) | tokens/s | vs 1 process (per round) | MFU | rank-0 peak memory |")
    print("|---|---|---|---|---|---|")
    for name, rs in results.items():
        med = {key: statistics.median(r[key] for r in rs) for key in rs[0]}
        per_round = " / ".join(f"{x:.2f}x" for x in ratios[name])
        print(f"| {name} | {med['step_s']:.3f} | {med['tok_s']:,.0f} | {per_round} | {med['mfu']:.1%} | "
              f"{med['peak_mib']:,.0f} MiB |")


if __name__ == "__main__":
    main()
