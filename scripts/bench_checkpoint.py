"""Checkpoint save/load time and size, and the cost of saving at the default interval.

    python scripts/bench_checkpoint.py

For each shape: one real training step (so AdamW has its state), then the median of a
few atomic saves (serialize + fsync + rename + manifest) and verified loads, and the
overhead = save time / (save interval x step time), with the default interval of a
run's steps / 10 evaluated for the shape's Chinchilla-sized run.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from picollm import checkpoint as ckpt
from picollm.hardware import describe
from picollm.model import GPT, GPTConfig
from picollm.optim import make_optimizer
from picollm.throughput import measure_train_flops

SHAPES = {
    "speedrun model (2x128, vocab 2048)": GPTConfig(n_layer=2, d_model=128, n_head=2, seq_len=256, vocab_size=2048),
    "reference (6x384, vocab 8192)": GPTConfig(n_layer=6, d_model=384, n_head=6, seq_len=256, vocab_size=8192),
}


def main() -> None:
    hw = describe("auto", "auto", measure=False)
    print("| model | checkpoint size | save (s) | load + verify (s) | step (s) | default interval | overhead |")
    print("|---|---|---|---|---|---|---|")
    for name, gcfg in SHAPES.items():
        model = GPT(gcfg)
        opt = make_optimizer(model, 1e-3, 0.1, (0.9, 0.95), torch.device("cpu"))
        x = torch.randint(0, gcfg.vocab_size, (4, gcfg.seq_len + 1))
        model(x[:, :-1], x[:, 1:]).backward()
        opt.step()
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": [ckpt.rng_state()], "step": 1}
        with tempfile.TemporaryDirectory() as d:
            saves, loads = [], []
            for i in range(5):
                t0 = time.perf_counter()
                path = ckpt.save_checkpoint(Path(d), i + 1, state, keep=2)
                saves.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                ckpt.load_checkpoint(path)
                loads.append(time.perf_counter() - t0)
            size = path.stat().st_size
        step = measure_train_flops(gcfg, 16, hw, seconds=5, return_details=True)["step_time"]
        tokens_per_step = 16 * gcfg.seq_len
        steps = 20 * gcfg.num_params() / tokens_per_step  # a D = 20 N run at this batch
        interval = max(1, int(steps // 10))
        save = statistics.median(saves)
        print(f"| {name} | {size / 2**20:.1f} MiB | {save:.3f} | {statistics.median(loads):.3f} | {step:.3f} | "
              f"{interval} steps | {save / (interval * step):.3%} |")


if __name__ == "__main__":
    main()
