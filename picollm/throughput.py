"""Measure achieved training throughput on this machine (the budget.minutes probe, the
dtype probe of train.dtype=auto on CPU, and the benchmarks): whole training steps on
random tokens, built like the trainer's (host batch copied in, forward + backward,
gradient clipping, the loss read back, the optimizer), so the probe predicts training; and
evaluation's forward passes (measure_eval_flops), which the capstone's estimate times too."""

from __future__ import annotations

import contextlib
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from multiprocessing import get_context

import torch

from picollm.hardware import DTYPES, DeviceInfo
from picollm.model import GPT, GPTConfig
from picollm.optim import make_optimizer


def autocast(hw: DeviceInfo):
    """Mixed precision for bf16/fp16; fp32 runs without autocast."""
    if hw.dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(hw.device.type, dtype=DTYPES[hw.dtype])


def _training_step(gcfg: GPTConfig, micro_batch: int, hw: DeviceInfo, compile: bool = False,
                   activation_checkpointing: bool = False, optimizer: str = "adamw"):
    """A closure running one training step as the trainer does, in ``hw.dtype``."""
    torch.manual_seed(0)
    model = GPT(gcfg).to(hw.device)
    model.activation_checkpointing = activation_checkpointing
    opt = make_optimizer(model, 1e-4, 0.1, (0.9, 0.95), hw.device, kind=optimizer, dtype=hw.dtype)  # Muon's step costs more
    params = [p for p in model.parameters() if p.requires_grad]
    run = torch.compile(model) if compile else model
    host = torch.randint(0, gcfg.vocab_size, (micro_batch, gcfg.seq_len + 1))

    def step(variant: DeviceInfo = hw) -> float:
        x = host[:, :-1].to(hw.device, non_blocking=True)
        y = host[:, 1:].to(hw.device, non_blocking=True)
        with autocast(variant):
            loss = run(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())  # the trainer reads the loss back every step too

    return step


def measure_train_flops(gcfg: GPTConfig, micro_batch: int, hw: DeviceInfo, seconds: float = 10.0,
                        compile: bool = False, activation_checkpointing: bool = False,
                        warmup_steps: int = 2, return_details: bool = False, optimizer: str = "adamw"):
    """Model FLOP/s (flops_per_token x tokens / time, docs/conventions.md) after ``warmup_steps``
    untimed steps, timing whole steps until ``seconds`` have passed (at least two). The
    rate is total tokens over total time, not a best or median step: a budget is spent
    at the mean rate, slow steps included."""
    step = _training_step(gcfg, micro_batch, hw, compile, activation_checkpointing, optimizer)
    for _ in range(warmup_steps):
        step()
    _sync(hw)
    times = []
    start = time.perf_counter()
    while len(times) < 2 or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        step()
        _sync(hw)
        times.append(time.perf_counter() - t0)
    step_time = sum(times) / len(times)
    tokens = micro_batch * gcfg.seq_len
    rate = gcfg.flops_per_token() * tokens / step_time
    if return_details:
        return {"flops_per_s": rate, "step_time": step_time, "tokens_per_s": tokens / step_time, "steps": len(times)}
    return rate


def measure_eval_flops(gcfg: GPTConfig, batch: int, hw: DeviceInfo, seconds: float = 1.0) -> float:
    """Model FLOP/s of evaluation (forward passes without gradients over ``batch`` sequences,
    a third of a training step's FLOPs per token) after one untimed pass: an evaluation's
    speed per FLOP is not training's (no backward; its own batch)."""
    torch.manual_seed(0)
    model = GPT(gcfg).to(hw.device).eval()
    x, y = (torch.randint(0, gcfg.vocab_size, (batch, gcfg.seq_len), device=hw.device) for _ in range(2))
    passes, start = -1, 0.0
    with torch.no_grad():
        while passes < 2 or time.perf_counter() - start < seconds:
            with autocast(hw):
                float(model(x, y, reduction="none").sum())
            if passes < 0:
                _sync(hw)
                start = time.perf_counter()
            passes += 1
    _sync(hw)
    return gcfg.flops_per_token() / 3 * batch * gcfg.seq_len * passes / (time.perf_counter() - start)


def _one_thread_rates(job: tuple) -> tuple[float, float]:
    gcfg, micro, eval_batch, hw, seconds = job
    torch.set_num_threads(1)
    return measure_train_flops(gcfg, micro, hw, seconds), measure_eval_flops(gcfg, eval_batch, hw, seconds / 2)


def _start_worker(_) -> None:
    torch.set_num_threads(1)
    time.sleep(0.5)  # long enough that every worker takes one of these, so all have started


def rates_side_by_side(jobs: list[tuple[GPTConfig, int, int]], hw: DeviceInfo, processes: int,
                       seconds: float = 1.0) -> list[dict]:
    """Each (shape, micro-batch, evaluation batch) job's FLOP/s per process while `processes`
    single-thread processes run it at once, as a sweep's workers do: {"train": , "eval": },
    each the mean over the processes (training timed for `seconds`, evaluation for half).
    One process alone reads faster than it will run beside others (the cores share caches and
    memory bandwidth; on a shared host, more): on the 2-core AVX2 EPYC the capstone's points
    took 1.1-1.5x what lone probes said. The workers start (and import torch) before the first
    timing, so the processes of a job overlap."""
    full = [(g, micro, batch, hw, seconds) for g, micro, batch in jobs]
    if processes == 1:
        measured = [[_one_thread_rates(job)] for job in full]
    else:
        with ProcessPoolExecutor(processes, mp_context=get_context("spawn")) as pool:
            list(pool.map(_start_worker, range(processes)))
            measured = [list(pool.map(_one_thread_rates, [job] * processes)) for job in full]
    return [{"train": sum(r[0] for r in runs) / len(runs), "eval": sum(r[1] for r in runs) / len(runs)}
            for runs in measured]


def time_dtypes(gcfg: GPTConfig, micro_batch: int, hw: DeviceInfo, dtypes=("fp32", "bf16"),
                seconds: float = 2.0, rounds: int = 3, decisive: float = 4.0, decisive_s: float = 1.0) -> dict:
    """Seconds per training step in each dtype on this shape and micro-batch: one model,
    the dtypes interleaved (a neighbour's load hits both alike), best of ``rounds`` after a
    warm-up step each. Stops adding rounds once ``seconds`` have passed (at least one),
    and times none when a warm-up step was already ``decisive``x the other's and over
    ``decisive_s``: bf16 without bf16 units takes ~10x fp32, seconds a step on the CPU
    speedrun's model, and a round more would not change the answer."""
    start = time.perf_counter()
    step = _training_step(gcfg, micro_batch, hw)
    variants = {d: replace(hw, dtype=d) for d in dtypes}
    warm = {}
    for d, v in variants.items():  # warm-up: first-call allocations and kernel selection
        t0 = time.perf_counter()
        step(v)
        _sync(hw)
        warm[d] = time.perf_counter() - t0
    slowest, fastest = max(warm.values()), min(warm.values())
    if len(warm) > 1 and slowest > decisive * fastest and slowest > decisive_s:
        return {"step_seconds": warm, "seconds": time.perf_counter() - start, "rounds": 0}
    best, timed = {d: float("inf") for d in dtypes}, 0
    while timed < max(1, rounds):
        for d, v in variants.items():
            t0 = time.perf_counter()
            step(v)
            _sync(hw)
            best[d] = min(best[d], time.perf_counter() - t0)
        timed += 1
        if time.perf_counter() - start > seconds:
            break
    return {"step_seconds": best, "seconds": time.perf_counter() - start, "rounds": timed}


def _sync(hw: DeviceInfo) -> None:
    if hw.is_cuda:
        torch.cuda.synchronize(hw.device)
