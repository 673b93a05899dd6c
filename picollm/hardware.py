"""What the device can do: which dtype to train in, its peak FLOP/s, and its memory.

MFU is only meaningful against the peak of the dtype actually used on the device
actually used, so the CPU peak is measured (best of a few square matmuls) rather
than looked up, and GPUs use their published dense peaks.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass, replace
from typing import Callable, NamedTuple, Optional

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

class GpuSpec(NamedTuple):
    device_name: str  # a substring of torch.cuda.get_device_name() that identifies the GPU
    peaks: dict  # dtype -> dense peak FLOP/s


# The one GPU peak table: dense (no 2:4 sparsity) tensor-core FLOP/s from the vendor's
# datasheets, by the name the calculator takes (calc.gpu=...). bf16 where the GPU has it;
# fp16 for Volta/Turing, which have no bf16 units; fp32 is the plain (non-tensor) rate.
# A device takes the first entry whose device_name its name contains, so every name that is
# a prefix of another comes after it (H100 PCIe before H100, A100 and A10G before A10,
# L40S and L40 before L4).
GPU_PEAKS: dict[str, GpuSpec] = {
    "h200": GpuSpec("H200", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),  # SXM: the H100 SXM's compute
    "h100-pcie": GpuSpec("H100 PCIe", {"bf16": 756e12, "fp16": 756e12, "fp32": 51e12}),
    "h100-sxm": GpuSpec("H100", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),
    "a100": GpuSpec("A100", {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}),
    # AWS G5's A10G has no NVIDIA datasheet; AWS and its users quote 70 TFLOP/s of tensor
    # compute and 35 of fp32, the A10's 125 and 31.2 shifted from tensor to CUDA cores.
    "a10g": GpuSpec("A10G", {"bf16": 70e12, "fp16": 70e12, "fp32": 35e12}),
    "a10": GpuSpec("A10", {"bf16": 125e12, "fp16": 125e12, "fp32": 31.2e12}),
    "l40s": GpuSpec("L40S", {"bf16": 362e12, "fp16": 362e12, "fp32": 91.6e12}),
    "l40": GpuSpec("L40", {"bf16": 181e12, "fp16": 181e12, "fp32": 90.5e12}),
    "l4": GpuSpec("L4", {"bf16": 121e12, "fp16": 121e12, "fp32": 30.3e12}),
    "rtx4090": GpuSpec("RTX 4090", {"bf16": 165e12, "fp16": 165e12, "fp32": 82.6e12}),  # fp32 accumulate
    "rtx3090": GpuSpec("RTX 3090", {"bf16": 71e12, "fp16": 71e12, "fp32": 35.6e12}),  # fp32 accumulate
    "v100": GpuSpec("V100", {"fp16": 125e12, "fp32": 15.7e12}),  # SXM2
    "t4": GpuSpec("T4", {"fp16": 65e12, "fp32": 8.1e12}),
}

# Each calc.gpu's peak in the dtype it trains in: bf16 where it has it, else fp16.
GPU_PEAK_FLOPS: dict[str, float] = {name: spec.peaks.get("bf16", spec.peaks.get("fp16")) for name, spec in GPU_PEAKS.items()}


def published_peak(device_name: str, dtype: str) -> Optional[float]:
    """The datasheet peak of ``dtype`` on the GPU torch calls ``device_name``; None when
    the table has no such GPU or dtype."""
    spec = next((s for s in GPU_PEAKS.values() if s.device_name in device_name), None)
    return spec.peaks.get(dtype) if spec else None


@dataclass
class DeviceInfo:
    device: torch.device
    name: str
    dtype: str  # the dtype training runs in: fp32 | bf16 | fp16
    peak_flops: Optional[float]  # for that dtype; None when unknown
    peak_source: str  # "published" | "measured" | "given" | "unknown" | "pending" (measured once dtype is known)
    memory_bytes: int  # what a run may use: free GPU memory, or available RAM
    dtype_reason: str = ""  # why this dtype, for the plan card
    dtype_pending: bool = False  # CPU auto: the plan times both dtypes on the run's shape and picks


    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device asks for CUDA but no GPU is visible; use train.device=cpu or auto.")
    return dev


def square_matmul_flops(dtype: str, max_size: int = 4096, repeats: int = 3, budget_s: float = 1.5) -> float:
    """Best FLOP/s of square matmuls in ``dtype`` on the CPU. Sizes double from 256 while
    the next size's products (8x the work each) still fit in what is left of ``budget_s``:
    small products underrate the peak, but this runs inside a budget.minutes run's wall
    clock, where one 4096 product takes 1.6 s on a slow core and one bf16 1024 product
    2 s on a CPU without bf16 units (fp32 peaked by 2048 on every CPU measured)."""
    best, size, start = 0.0, 256, time.perf_counter()
    while size <= max_size:
        a = torch.randn(size, size, dtype=DTYPES[dtype])
        b = torch.randn(size, size, dtype=DTYPES[dtype])
        a @ b  # warm the kernels up
        fastest = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            fastest = min(fastest, time.perf_counter() - t0)
        best = max(best, 2 * size**3 / fastest)
        if time.perf_counter() - start + 8 * fastest * (repeats + 1) > budget_s:
            break
        size *= 2
    return best


def cpu_peak(dtype: str, measure: Callable[[str], float] = square_matmul_flops) -> float:
    """The CPU's MFU yardstick for training in ``dtype``: its best square matmul, or fp32's
    where that is faster. A CPU without bf16 units computes bf16 no faster than by widening
    it to fp32, and there a forced-bf16 run's thin products even beat its own square ones,
    so the bf16 square peak alone once gave MFUs near 400%; against fp32's peak the waste shows."""
    own = measure(dtype)
    return own if dtype == "fp32" else max(own, measure("fp32"))


_square_matmul_flops_once = functools.lru_cache(maxsize=None)(square_matmul_flops)


def measure_matmul_peak(dtype: str) -> float:
    """``cpu_peak``, each dtype's squares measured once per process (a bf16 yardstick's fp32
    figure serves a later fp32 one too)."""
    return cpu_peak(dtype, _square_matmul_flops_once)


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16: bf16 matmuls may beat fp32 here. Only a first guess: whether
    they do on a given model shape is measured (``pick_faster_dtype``)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("amx_bf16", "avx512_bf16"))


def resolve_dtype(requested: str, device: torch.device) -> tuple[str, str]:
    """(dtype, why). On CPU, ``auto`` answers the CPU-flag guess; the plan replaces it by
    a measurement on the run's own shape (``DeviceInfo.dtype_pending``)."""
    if requested not in ("auto", *DTYPES):
        raise ValueError(f"train.dtype={requested!r} is unknown; use auto, bf16, fp32 or fp16.")
    if requested != "auto":
        if requested == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError("this GPU has no bf16 support; use train.dtype=fp16 (loss-scaled) or fp32.")
        return requested, f"train.dtype={requested}"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", "auto: this GPU has bf16"
        return "fp16", "auto: this GPU has no bf16 (fp16 with loss scaling)"
    if cpu_has_fast_bf16():
        return "bf16", "auto: guessed from the CPU flags (AMX/AVX512-BF16), not measured"
    return "fp32", "auto: guessed from the CPU flags (no bf16 units), not measured"


CPU_DTYPES = ("fp32", "bf16")  # what auto chooses between on CPU (fp16 is for GPUs without bf16)


def pick_faster_dtype(step_seconds: dict, probe_seconds: float) -> tuple[str, str]:
    """(dtype, why) from measured seconds per training step of each candidate dtype."""
    fast = min(step_seconds, key=step_seconds.get)
    slow = max(step_seconds, key=step_seconds.get)
    if fast == slow:
        return fast, f"auto: {fast}, the only dtype measured"
    ratio = step_seconds[slow] / step_seconds[fast]
    return fast, (f"auto: {fast} step {ratio:.2f}x as fast as {slow} on this CPU and shape, "
                  f"measured ({probe_seconds:.1f} s probe)")


def with_dtype(hw: DeviceInfo, dtype: str, reason: str, measure: bool = True) -> DeviceInfo:
    """``hw`` training in ``dtype``: the MFU yardstick becomes that dtype's peak
    (measured on CPU, published on GPUs; a given peak stays)."""
    peak, source = hw.peak_flops, hw.peak_source
    if dtype != hw.dtype or source == "pending":
        if source == "given":
            pass
        elif hw.is_cuda:
            peak = published_peak(hw.name, dtype)
            source = "published" if peak else "unknown"
        elif measure and source in ("measured", "pending"):
            peak, source = measure_matmul_peak(dtype), "measured"
        else:
            peak, source = None, "unknown"
    return replace(hw, dtype=dtype, peak_flops=peak, peak_source=source, dtype_reason=reason, dtype_pending=False)


def combined_peak(hw: "DeviceInfo", world_size: int) -> Optional[float]:
    """The MFU yardstick of a run on ``world_size`` processes: every GPU brings its own
    peak, while CPU processes share one machine's cores, whose peak counts once."""
    if not hw.peak_flops:
        return None
    return hw.peak_flops * (world_size if hw.is_cuda else 1)


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def peak_memory_mib(device: torch.device) -> float:
    """This process's peak memory so far: allocated device memory on CUDA, resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def describe(device_name: str = "auto", dtype: str = "auto", measure: bool = True,
             peak_flops: Optional[float] = None, decide_dtype_later: bool = False) -> DeviceInfo:
    """The device, its dtype and that dtype's peak. ``decide_dtype_later`` (the planner):
    CPU ``auto`` stays pending, to be measured on the run's shape, and its peak is measured
    only once the dtype is chosen (``with_dtype``)."""
    device = pick_device(device_name)
    dt, why = resolve_dtype(dtype, device)
    pending = decide_dtype_later and dtype == "auto" and device.type == "cpu"
    if peak_flops:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
        return DeviceInfo(device, name, dt, float(peak_flops), "given", available_memory(device), why, pending)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = published_peak(name, dt)
        source = "published" if peak else "unknown"
    elif pending:
        name, peak, source = _cpu_name(), None, "pending" if measure else "unknown"
    else:
        name = _cpu_name()
        peak = measure_matmul_peak(dt) if measure else None
        source = "measured" if measure else "unknown"
    return DeviceInfo(device, name, dt, peak, source, available_memory(device), why, pending)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"CPU ({os.cpu_count()} cores)"
