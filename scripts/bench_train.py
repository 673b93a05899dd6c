"""Training throughput and MFU on this machine, against its own measured matmul peak.

    python scripts/bench_train.py                       # reference shape + speedrun model
    python scripts/bench_train.py --quick               # fewer variants, shorter timing

Each variant runs in a fresh subprocess (so its peak RSS is its own) and reports model
FLOP/s (flops_per_token x tokens / median step time, docs/conventions.md) as a fraction of the best
of square matmuls in the same dtype, or fp32 where faster (picollm.hardware.cpu_peak, the same
yardstick the trainer's MFU uses), measured in the same process just before. Prints a markdown table and writes JSON next to it with --out.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

REFERENCE = dict(n_layer=6, d_model=384, n_head=6, seq_len=256, vocab_size=8192)
SPEEDRUN = dict(n_layer=2, d_model=128, n_head=2, seq_len=256, vocab_size=2048)


def child(args: argparse.Namespace) -> None:
    import torch

    from picollm.hardware import describe, measure_matmul_peak
    from picollm.model import GPTConfig
    from picollm.throughput import measure_train_flops

    shape = json.loads(args.shape)
    hw = describe("auto", args.dtype, measure=False)
    peak = measure_matmul_peak(hw.dtype) if not hw.is_cuda else None
    if hw.is_cuda:
        hw = describe("auto", args.dtype)
        peak = hw.peak_flops
    result = measure_train_flops(GPTConfig(**shape), args.micro_batch, hw, args.seconds, compile=args.compile,
                                 activation_checkpointing=args.ckpt, return_details=True)
    result.update(peak_flops=peak, mfu=result["flops_per_s"] / peak, dtype=hw.dtype, device=hw.name,
                  max_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  threads=torch.get_num_threads())
    if hw.is_cuda:
        result["max_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(result))


def run_variant(name, shape, micro_batch, dtype, compile, ckpt, seconds):
    cmd = [sys.executable, __file__, "--child", "--shape", json.dumps(shape), "--micro-batch", str(micro_batch),
           "--dtype", dtype, "--seconds", str(seconds)] + (["--compile"] if compile else []) + (["--ckpt"] if ckpt else [])
    start = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        print(f"{name}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
        return None
    result = json.loads(line[7:])
    result.update(name=name, micro_batch=micro_batch, compile=compile, ckpt=ckpt, wall=time.time() - start)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--shape", default=json.dumps(REFERENCE))
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--ckpt", action="store_true")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    seconds = 8.0 if args.quick else args.seconds
    variants = [
        ("reference, auto dtype", REFERENCE, 16, "auto", False, False),
        ("reference, auto dtype, compiled", REFERENCE, 16, "auto", True, False),
        ("reference, activation checkpointing", REFERENCE, 16, "auto", False, True),
        ("reference, bf16 autocast", REFERENCE, 16, "bf16", False, False),
        ("reference, fp32", REFERENCE, 16, "fp32", False, False),
        ("speedrun model (2x128, vocab 2048)", SPEEDRUN, 16, "auto", False, False),
        ("speedrun model, compiled", SPEEDRUN, 16, "auto", True, False),
    ]
    if args.quick:
        variants = variants[:3]
    rows = [r for v in variants if (r := run_variant(*v, seconds)) is not None]
    print("| variant | dtype | step (s) | tokens/s | model TFLOP/s | peak TFLOP/s (same run) | MFU | peak RSS (MiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['dtype']} | {r['step_time']:.3f} | {r['tokens_per_s']:,.0f} | "
              f"{r['flops_per_s'] / 1e12:.4f} | {r['peak_flops'] / 1e12:.4f} | {r['mfu']:.1%} | {r['max_rss_mib']:.0f} |")
    if rows:
        print(f"\ndevice: {rows[0]['device']}, torch threads {rows[0]['threads']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
