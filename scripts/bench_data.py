"""Tokenizer training, data preparation (1 vs 2 worker processes) and loader throughput
on the embedded corpus.

    python scripts/bench_data.py [--vocab 8192] [--train-chars 20000000] [--workers 1,2]

The tokenize rows prepare the whole corpus with the tokenizer already trained, once per
worker count, and check that every count writes the same bytes. "stage" is the
tokenize stage's own tokens/s (reading, worker start-up and shard writing included);
"steady" leaves out the start-up (from the first encoded batch to the last). The CPU
seconds (this process + its worker processes) show the work the workers add: on a busy
machine the wall-clock speed-up is bounded by the cores actually free, so the bench
prints the load average too.

The loader figure is set against the training step's own appetite: the tokens/s a
training step of the reference shape consumes (scripts/bench_train.py) is several
orders of magnitude below what the loader can hand out, so it is never the bottleneck.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace


def _dir_bytes(directory: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(directory.iterdir()) if f.name != "stats.json"}


def _cpu_seconds() -> float:
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def _tokenize(data_cfg: SimpleNamespace, tokenizer: Path, workers: int, out: Path) -> tuple[object, float, float]:
    """Prepare the whole corpus with a ready tokenizer: (prepared data, steady-state tokens/s, CPU seconds)."""
    from picollm.data.prepare import prepare_data

    ticks: list[tuple[float, int]] = []

    def progress(p) -> None:
        ticks.append((time.perf_counter(), p.train_tokens + p.val_tokens))

    tok_cfg = SimpleNamespace(name=str(tokenizer), vocab_size=None, train_chars=None)
    cpu = _cpu_seconds()
    data = prepare_data(data_cfg, tok_cfg, n_train_tokens=10**12, out_dir=out, num_proc=workers, progress=progress)
    (t0, n0), (t1, n1) = ticks[0], ticks[-1]
    return data, (n1 - n0) / max(t1 - t0, 1e-9), _cpu_seconds() - cpu


def main() -> None:  # one benchmark read top to bottom: arguments, the timed variants, the table
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--train-chars", type=int, default=20_000_000)
    p.add_argument("--workers", default="1,2", help="worker counts to compare, e.g. 1,2,4")
    args = p.parse_args()

    from picollm.data.loader import PackedLoader
    from picollm.data.prepare import prepare_data
    from picollm.data.sources import iter_documents
    from picollm.tokenizer import train_bpe

    cache = Path(tempfile.mkdtemp())
    data_cfg = SimpleNamespace(source="pystdlib", paths=[], format="auto", text_field="text", hf_name=None,
                               hf_config=None, hf_split="train", streaming=True, val_fraction=0.005,
                               val_tokens=1_000_000, max_docs=None, cache_dir=str(cache))
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
    data = prepare_data(data_cfg, tok_cfg, n_train_tokens=10**12)  # the whole corpus, every core
    dt = time.perf_counter() - t0
    n = data.n_train_tokens + data.n_val_tokens
    rows.append((f"prepare (tokenizer + encode + shards, {data.stats['workers']} workers)",
                 f"pystdlib, {chars / 1e6:.1f}M chars -> {n / 1e6:.2f}M tokens",
                 f"{dt:.1f} s", f"{n / dt / 1e6:.2f}M tokens/s end to end"))
    t0 = time.perf_counter()
    prepare_data(data_cfg, tok_cfg, n_train_tokens=10**12)
    rows.append(("prepare again (reuse)", "same source + tokenizer", f"{time.perf_counter() - t0:.2f} s", "-"))

    base, reference = None, None
    load_before = os.getloadavg()[0]
    for workers in (int(w) for w in args.workers.split(",")):
        out = cache / f"tokenize-{workers}"
        prepared, steady, cpu = _tokenize(data_cfg, data.dir / "tokenizer.json", workers, out)
        stage = prepared.stats["tokens_per_second"]
        base = base or stage
        same = reference is None or _dir_bytes(out) == reference
        reference = reference or _dir_bytes(out)
        rows.append((f"tokenize, {workers} worker process{'es' * (workers > 1)}",
                     f"{n / 1e6:.2f}M tokens, {'same bytes' if same else 'DIFFERENT BYTES'}",
                     f"{prepared.stats['tokenize_seconds']:.2f} s ({cpu:.1f} CPU s)",
                     f"{stage / 1e6:.2f}M tokens/s stage ({stage / base:.2f}x), {steady / 1e6:.2f}M steady"))

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
    print(f"\ntokens per char on pystdlib at vocab {args.vocab}: {n / chars:.3f}; {os.cpu_count()} CPUs, "
          f"load average {load_before:.2f} before the tokenize rows, {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
