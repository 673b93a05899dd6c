"""Evaluation speed at the training micro-batch against evaluate.eval_batch_size's batch.

    python scripts/bench_eval.py            # one thread, the CPU capstone's shapes
    python scripts/bench_eval.py --threads 2

For each shape and training micro-batch: one model, forward passes without gradients (as
picollm.evaluate runs them, the loss read back) at the micro-batch and at the raised batch,
interleaved in many short rounds (~2k tokens each) so a neighbour's load hits both alike;
the best round of each and their ratio. (Timing each batch for a second in turn, with a new
model each time, swung by 1.5x from run to run on the shared 2-core box.)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from picollm.evaluate import eval_batch_size  # noqa: E402
from picollm.hardware import describe  # noqa: E402
from picollm.model import GPT, GPTConfig  # noqa: E402

SEQ = 64  # the capstone's sequence length and vocabulary
CASES = [(2, 1024), (3, 1024), (4, 512), (6, 256), (6, 512), (8, 1024)]  # (layers, training batch tokens)


def best_flops(model: GPT, batches: list[int], rounds: int) -> dict[int, float]:
    """Evaluation FLOP/s (flops_per_token / 3 a token) of each batch size: best of `rounds`."""
    g = model.cfg
    data = {b: [torch.randint(0, g.vocab_size, (b, g.seq_len)) for _ in range(2)] for b in batches}
    best = {b: 0.0 for b in batches}
    with torch.no_grad():
        for b, (x, y) in data.items():
            model(x, y, reduction="none")  # first-call allocations
        for _ in range(rounds):
            for b, (x, y) in data.items():
                passes = max(1, 2048 // (b * g.seq_len)) * 2
                start = time.perf_counter()
                for _ in range(passes):
                    float(model(x, y, reduction="none").sum())
                rate = g.flops_per_token() / 3 * b * g.seq_len * passes / (time.perf_counter() - start)
                best[b] = max(best[b], rate)
    return best


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=15)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    hw = describe("cpu", "fp32", measure=False)
    print(f"{hw.name}, {args.threads} thread(s), fp32, seq {SEQ}, vocab 512, best of {args.rounds} interleaved rounds")
    print("| shape | micro-batch (seqs) | eval batch (seqs) | GFLOP/s at micro | GFLOP/s at eval batch | ratio |")
    print("|---|---|---|---|---|---|")
    for layers, batch_tokens in CASES:
        gcfg = GPTConfig(n_layer=layers, n_head=layers, d_model=8 * layers, seq_len=SEQ, vocab_size=512)
        micro = min(16, batch_tokens // SEQ)  # the capstone's micro-batch (capstone.micro_batch)
        wide = eval_batch_size(micro, SEQ)
        torch.manual_seed(0)
        best = best_flops(GPT(gcfg).eval(), sorted({micro, wide}), args.rounds)
        print(f"| L{layers}_d{8 * layers} | {micro} | {wide} | {best[micro] / 1e9:.3g} | {best[wide] / 1e9:.3g} | "
              f"{best[wide] / best[micro]:.2f}x |")


if __name__ == "__main__":
    main()
