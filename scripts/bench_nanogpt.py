"""picollm against nanoGPT's model.py, side by side: whole training steps in one process.

    python scripts/bench_nanogpt.py --nanogpt /path/to/nanoGPT            # reference shape
    python scripts/bench_nanogpt.py --nanogpt /path/to/nanoGPT --shape speedrun
    python scripts/bench_nanogpt.py --nanogpt ... --baseline /path/to/old/picollm/checkout
    python scripts/bench_nanogpt.py --nanogpt ... --dtypes fp32   # a CPU without bf16 units

nanoGPT is not part of picollm: fetch it (git clone https://github.com/karpathy/nanoGPT)
and pass the folder holding its model.py. Each variant is one model with its own AdamW
(nanoGPT's configure_optimizers, picollm's make_optimizer) taking forward + backward +
optimizer steps on the same random tokens; the variants take turns, one step each per
round, so a noisy neighbour slows them all alike. One thread by default (--threads), timed
by the thread's CPU time (--clock cpu): on an idle machine it equals wall time, and on a
shared one it leaves out the time spent waiting for a core. --clock wall for wall time.

The two architectures differ (picollm: RMSNorm, rotary, QK-norm, SwiGLU, untied head;
nanoGPT: LayerNorm, learned positions, GELU, tied head), so both tokens/s and model FLOP/s
are reported, each from the model's own FLOPs per token (picollm: flops_per_token();
nanoGPT: 6N + 12 L H Q T from its estimate_mfu). MFU is against the best square matmul of
the same dtype, or of fp32 where that is faster, measured in this run
(picollm.hardware.cpu_peak, after every round, by the same clock as the steps; the best
is kept).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from unittest import mock

import torch

from picollm import hardware
from picollm.hardware import cpu_peak
from picollm.model import GPT, GPTConfig
from picollm.optim import make_optimizer

SHAPES = {
    "reference": dict(n_layer=6, d_model=384, n_head=6, seq_len=256, vocab_size=8192),
    "speedrun": dict(n_layer=2, d_model=128, n_head=2, seq_len=256, vocab_size=2048),
}
LR, WEIGHT_DECAY, BETAS = 1e-4, 0.1, (0.9, 0.95)


@dataclass
class Variant:
    name: str
    dtype: str  # fp32 | bf16
    step: Callable[[], None]
    flops_per_token: int
    times: list  # (wall, cpu) seconds per timed step


def load_module(name: str, path: Path):
    """Import one file as a module under its own name (a nanoGPT or an older picollm
    model.py beside the picollm being measured)."""
    if not path.is_file():
        sys.exit(f"{path} does not exist; pass the folder that holds it.")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def autocast(dtype: str):
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=torch.bfloat16)


def make_step(model, opt, x, dtype: str, nanogpt: bool) -> Callable[[], None]:
    inputs, targets = x[:, :-1].contiguous(), x[:, 1:].contiguous()  # as nanoGPT's get_batch makes them

    def step() -> None:
        with autocast(dtype):
            out = model(inputs, targets)
        loss = out[1] if nanogpt else out  # nanoGPT returns (logits, loss)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def nanogpt_variant(module, shape: dict, dtype: str, x) -> Variant:
    cfg = module.GPTConfig(n_layer=shape["n_layer"], n_head=shape["n_head"], n_embd=shape["d_model"],
                           block_size=shape["seq_len"], vocab_size=shape["vocab_size"], bias=False, dropout=0.0)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its parameter counts
        torch.manual_seed(0)
        model = module.GPT(cfg)
        opt = model.configure_optimizers(WEIGHT_DECAY, LR, BETAS, "cpu")
    L, H, T = cfg.n_layer, cfg.n_head, cfg.block_size
    flops = 6 * model.get_num_params() + 12 * L * H * (cfg.n_embd // H) * T  # its estimate_mfu
    return Variant(f"nanoGPT {dtype}", dtype, make_step(model, opt, x, dtype, True), flops, [])


def picollm_variant(gpt_class, config_class, shape: dict, dtype: str, x, label: str = "picollm",
                    compile: bool = False) -> Variant:
    torch.manual_seed(0)
    model = gpt_class(config_class(**shape))
    opt = make_optimizer(model, LR, WEIGHT_DECAY, BETAS, torch.device("cpu"))
    run = torch.compile(model) if compile else model
    name = f"{label} {dtype}" + (" compiled" if compile else "")
    return Variant(name, dtype, make_step(run, opt, x, dtype, False), model.flops_per_token(), [])


def timed(step: Callable[[], None]) -> tuple[float, float]:
    """Wall and CPU seconds of one step. With one thread, torch computes on the calling
    thread, so its CPU time is the step's compute time, however busy the machine is."""
    wall, cpu = time.perf_counter(), time.thread_time()
    step()
    return time.perf_counter() - wall, time.thread_time() - cpu


def matmul_peak(dtype: str, clock: str) -> float:
    """picollm's yardstick (``hardware.cpu_peak``), measured afresh (training caches it per
    process) and timed by the benchmark's clock so MFU compares like with like."""
    if clock == "wall":
        return cpu_peak(dtype)
    with mock.patch.object(hardware.time, "perf_counter", time.thread_time):
        return cpu_peak(dtype)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nanogpt", required=True, help="folder of a nanoGPT checkout (holds model.py)")
    p.add_argument("--shape", choices=sorted(SHAPES), default="reference")
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=7, help="timed steps per variant, taken in turns")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                   help="time steps by this thread's CPU time (default; needs --threads 1) or wall time")
    p.add_argument("--dtypes", default="fp32,bf16",
                   help="comma-separated dtypes to time (fp32 alone on a CPU without bf16 units, where bf16 "
                        "steps take ~10x longer and only slow the rounds down)")
    p.add_argument("--compile", action="store_true", help="add picollm bf16 under torch.compile")
    p.add_argument("--baseline", default=None,
                   help="another picollm checkout whose model.py is timed beside this one")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)

    dtypes = args.dtypes.split(",")
    if "fp32" not in dtypes or set(dtypes) - {"fp32", "bf16"}:
        sys.exit(f"--dtypes takes fp32 (nanoGPT's CPU default, the yardstick) and optionally bf16, got {args.dtypes!r}.")
    if args.clock == "cpu" and args.threads != 1:
        sys.exit("--clock cpu times the calling thread only, so it needs --threads 1; add --clock wall.")
    shape = SHAPES[args.shape]
    nanogpt = load_module("nanogpt_model", Path(args.nanogpt) / "model.py")
    torch.set_num_threads(args.threads)  # after every check, so a refused call changes nothing
    torch.manual_seed(0)
    x = torch.randint(0, shape["vocab_size"], (args.micro_batch, shape["seq_len"] + 1))
    variants = []
    for dtype in dtypes:
        variants.append(nanogpt_variant(nanogpt, shape, dtype, x))
        variants.append(picollm_variant(GPT, GPTConfig, shape, dtype, x))
        if args.baseline:
            old = load_module("picollm_baseline_model", Path(args.baseline) / "picollm" / "model.py")
            variants.append(picollm_variant(old.GPT, old.GPTConfig, shape, dtype, x, label="picollm baseline"))
    if args.compile:
        variants.append(picollm_variant(GPT, GPTConfig, shape, "bf16", x, compile=True))

    for v in variants:
        for _ in range(args.warmup):
            v.step()
    peaks = {}
    for _ in range(args.rounds):
        for v in variants:
            v.times.append(timed(v.step))
        peaks = {dt: max(peaks.get(dt, 0.0), matmul_peak(dt, args.clock)) for dt in {v.dtype for v in variants}}
    report(variants, peaks, args, shape)


def report(variants: list[Variant], peaks: dict, args, shape: dict) -> None:
    tokens = args.micro_batch * shape["seq_len"]
    rows = []
    for v in variants:
        clocked = [cpu if args.clock == "cpu" else wall for wall, cpu in v.times]
        best, median = min(clocked), statistics.median(clocked)
        rows.append(dict(name=v.name, dtype=v.dtype, best_s=best, median_s=median, tokens_per_s=tokens / median,
                         median_wall_s=statistics.median(wall for wall, _ in v.times),
                         flops_per_token=v.flops_per_token, flops_per_s=v.flops_per_token * tokens / median,
                         mfu=v.flops_per_token * tokens / median / peaks[v.dtype], times=v.times))
    by_name = {r["name"]: r for r in rows}
    nano_fp32 = by_name["nanoGPT fp32"]
    nano_best = max((r for r in rows if r["name"].startswith("nanoGPT")), key=lambda r: r["tokens_per_s"])
    print(f"shape {args.shape} {shape}, micro-batch {args.micro_batch}, {args.threads} thread(s), "
          f"{args.rounds} interleaved rounds, {args.clock} clock (median step; best in brackets; wall median last)")
    print("matmul peak this run: " + ", ".join(f"{dt} {peak / 1e9:.1f} GFLOP/s" for dt, peak in sorted(peaks.items())) + "\n")
    print("| variant | s/step median (best) | tokens/s | FLOPs/token | model GFLOP/s | MFU (same dtype) "
          "| tokens/s vs nanoGPT fp32 | vs best nanoGPT | FLOP/s vs best nanoGPT | wall s/step |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['median_s']:.3f} ({r['best_s']:.3f}) | {r['tokens_per_s']:,.0f} | "
              f"{r['flops_per_token'] / 1e6:.1f}M | {r['flops_per_s'] / 1e9:.1f} | {r['mfu']:.1%} | "
              f"{r['tokens_per_s'] / nano_fp32['tokens_per_s']:.2f}x | "
              f"{r['tokens_per_s'] / nano_best['tokens_per_s']:.2f}x | "
              f"{r['flops_per_s'] / nano_best['flops_per_s']:.2f}x | {r['median_wall_s']:.3f} |")
    print(f"\nbest nanoGPT: {nano_best['name']}")
    if args.out:
        Path(args.out).write_text(json.dumps(dict(shape=shape, args=vars(args), peaks=peaks, rows=rows), indent=2))


if __name__ == "__main__":
    main()
