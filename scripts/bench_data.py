"""Tokenizer training, data preparation and loader throughput on the embedded corpus.

    python scripts/bench_data.py [--vocab 8192] [--train-chars 20000000]

The loader figure is set against the training step's own appetite: the tokens/s a
training step of the reference shape consumes (scripts/bench_train.py) is several
orders of magnitude below what the loader can hand out, so it is never the bottleneck.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--train-chars", type=int, default=20_000_000)
    args = p.parse_args()

    from picollm.data.loader import PackedLoader
    from picollm.data.prepare import prepare_data
    from picollm.data.sources import iter_documents
    from picollm.tokenizer import train_bpe

    data_cfg = SimpleNamespace(source="pystdlib", paths=[], format="auto", text_field="text", hf_name=None,
                               hf_config=None, hf_split="train", streaming=True, val_fraction=0.005,
                               val_tokens=1_000_000, max_docs=None, cache_dir=tempfile.mkdtemp())
    tok_cfg = SimpleNamespace(name="bpe", vocab_size=args.vocab, train_chars=args.train_chars)
    rows = []

    docs = list(iter_documents(data_cfg))
    chars = sum(map(len, docs))
    text, total = [], 0
    for d in docs:
        text.append(d)
        total += len(d)
        if total >= args.train_chars:
            break
    t0 = time.perf_counter()
    train_bpe(text, args.vocab)
    dt = time.perf_counter() - t0
    rows.append(("BPE training (rustbpe)", f"{total / 1e6:.1f}M chars, vocab {args.vocab}", f"{dt:.1f} s",
                 f"{total / dt / 1e6:.2f}M chars/s"))

    t0 = time.perf_counter()
    data = prepare_data(data_cfg, tok_cfg, n_train_tokens=10**12)  # the whole corpus
    dt = time.perf_counter() - t0
    n = data.n_train_tokens + data.n_val_tokens
    rows.append(("prepare (tokenizer + encode + shards)", f"pystdlib, {chars / 1e6:.1f}M chars -> {n / 1e6:.2f}M tokens",
                 f"{dt:.1f} s", f"{n / dt / 1e6:.2f}M tokens/s end to end"))
    t0 = time.perf_counter()
    prepare_data(data_cfg, tok_cfg, n_train_tokens=10**12)
    rows.append(("prepare again (reuse)", "same source + tokenizer", f"{time.perf_counter() - t0:.2f} s", "-"))

    for seq_len, micro in ((256, 16), (1024, 32)):
        loader = PackedLoader(data.train_shards, seq_len, global_batch=micro * 8, micro_batch=micro, seed=0)
        steps = 200
        t0 = time.perf_counter()
        for s in range(steps):
            for m in range(loader.accum_steps):
                loader.get_micro_batch(s, m)
        dt = time.perf_counter() - t0
        tok = steps * loader.accum_steps * micro * seq_len
        rows.append((f"loader get_micro_batch, seq {seq_len}, micro {micro}", "random order, memmapped shards",
                     f"{dt / (steps * loader.accum_steps) * 1e3:.3f} ms/batch", f"{tok / dt / 1e6:.1f}M tokens/s"))

    print("| what | input | time | throughput |")
    print("|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print(f"\ntokens per char on pystdlib at vocab {args.vocab}: {n / chars:.3f}")


if __name__ == "__main__":
    main()
