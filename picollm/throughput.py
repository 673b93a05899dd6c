"""Measure achieved training throughput on this machine (the budget.minutes probe and
the benchmarks): full forward + backward + AdamW steps on random tokens."""

from __future__ import annotations

import contextlib
import time

import torch

from picollm.hardware import DTYPES, DeviceInfo
from picollm.model import GPT, GPTConfig
from picollm.optim import make_optimizer


def autocast(info: DeviceInfo):
    """Mixed precision for bf16/fp16; fp32 runs without autocast."""
    if info.dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(info.device.type, dtype=DTYPES[info.dtype])


def measure_train_flops(gcfg: GPTConfig, micro_batch: int, info: DeviceInfo, seconds: float = 10.0,
                        compile: bool = False, activation_checkpointing: bool = False,
                        warmup_steps: int = 2, return_details: bool = False):
    """Model FLOP/s (DESIGN's flops_per_token x tokens / time) after ``warmup_steps``
    untimed steps, timing whole steps until ``seconds`` have passed (at least two)."""
    torch.manual_seed(0)
    model = GPT(gcfg).to(info.device)
    model.activation_checkpointing = activation_checkpointing
    opt = make_optimizer(model, 1e-4, 0.1, (0.9, 0.95), info.device)
    run = torch.compile(model) if compile else model
    x = torch.randint(0, gcfg.vocab_size, (micro_batch, gcfg.seq_len + 1), device=info.device)

    def step():
        with autocast(info):
            loss = run(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup_steps):
        step()
    _sync(info)
    times = []
    start = time.perf_counter()
    while len(times) < 2 or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        step()
        _sync(info)
        times.append(time.perf_counter() - t0)
    step_time = sorted(times)[len(times) // 2]  # the median resists a noisy neighbour
    tokens = micro_batch * gcfg.seq_len
    rate = gcfg.flops_per_token() * tokens / step_time
    if return_details:
        return {"flops_per_s": rate, "step_time": step_time, "tokens_per_s": tokens / step_time, "steps": len(times)}
    return rate


def _sync(info: DeviceInfo) -> None:
    if info.is_cuda:
        torch.cuda.synchronize(info.device)
