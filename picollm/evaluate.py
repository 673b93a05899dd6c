"""Validation loss and bits per byte on a fixed, deterministic set of held-out tokens.

bits per byte = (sum of per-token losses in nats) / (ln 2 * bytes those tokens decode
to). It does not depend on the tokenizer, so runs with different vocabularies compare.
Targets that are the BOS separator have no bytes and are left out of the bpb sums (they
still count in val_loss, the plain mean over all target tokens).
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import tiktoken
import torch

from picollm import cli, dist, hardware
from picollm.data.loader import ValLoader
from picollm.data.prepare import PreparedData, dataset_key, default_dir, load_prepared
from picollm.config import device_name, one_of
from picollm.files import write_atomic
from picollm.saved_run import NOT_SAVED, LoadedRun, NotSavedError, RunError, load_run
from picollm.throughput import autocast
from picollm.tokenizer import tokenizer_fingerprint


def token_byte_lengths(enc: tiktoken.Encoding, vocab_size: int) -> torch.Tensor:
    """Bytes each token id decodes to; special tokens and ids past the encoding get 0."""
    lengths = torch.zeros(vocab_size, dtype=torch.int64)
    specials = set(enc.special_tokens_set)
    special_ids = {enc.encode_single_token(s) for s in specials}
    for i in range(min(vocab_size, enc.n_vocab)):
        if i in special_ids:
            continue
        try:
            lengths[i] = len(enc.decode_single_token_bytes(i))
        except KeyError:  # holes in some encodings' id ranges
            pass
    return lengths


def position_buckets(seq_len: int, first: int = 16) -> list[tuple[int, int]]:
    """Half-open position ranges [0, 16), [16, 32), [32, 64), ...: equal width at the start,
    then doubling, so a long context still gives a handful of buckets."""
    buckets, start, end = [], 0, min(first, seq_len)
    while start < seq_len:
        buckets.append((start, end))
        start, end = end, min(max(2 * end, first), seq_len)
    return buckets


# Evaluation batches of at least this many tokens: a tiny model's training micro-batch (256
# tokens in the CPU capstone's short runs) leaves a forward pass overhead-bound, and a large
# batch spills the caches. On the AVX2 EPYC, one thread, the capstone's shapes evaluated
# fastest at 2048 tokens: 1.0-1.5x their 256-1024-token micro-batches, while 4096 tokens ran
# 0.75-0.97x 2048 (scripts/bench_eval.py, BENCHMARKS.md). The windows evaluated do not
# depend on the batch (ValLoader).
EVAL_BATCH_TOKENS = 2048


def eval_batch_size(micro_batch: int, seq_len: int) -> int:
    """Sequences per evaluation batch: the training micro-batch, raised towards
    EVAL_BATCH_TOKENS but to at most 4x it, so its logits stay within a few times training's
    (training also holds every layer's activations and their gradients)."""
    return max(micro_batch, min(4 * micro_batch, EVAL_BATCH_TOKENS // seq_len))


@torch.no_grad()
def evaluate(model: torch.nn.Module, val_shards: Sequence, seq_len: int, batch_size: int,
             byte_lengths: torch.Tensor, autocast_ctx, max_tokens: Optional[int] = None,
             device: torch.device = torch.device("cpu"), rank: int = 0, world_size: int = 1,
             by_position: bool = False, lockstep: bool = False) -> dict:
    """val_loss, val_bpb, val_tokens; with ``by_position`` also ``loss_by_position``, the mean
    loss of targets in each of ``position_buckets(seq_len)`` (from the same forward passes).
    ``lockstep``: every forward pass is a collective (FSDP), so a rank with fewer batches
    runs throwaway passes until all ranks have made the same number."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # nats all, tokens, nats bpb, bytes
    # Every window is full, so each position has the same count: count / seq_len.
    position_nats = torch.zeros(seq_len, dtype=torch.float64, device=device)
    lengths = byte_lengths.to(device)
    loader = ValLoader(val_shards, seq_len, batch_size, max_tokens, rank, world_size)
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        with autocast_ctx():
            losses = model(x, y, reduction="none").double()
        nbytes = lengths[y.reshape(-1)]
        has_bytes = nbytes > 0
        position_nats += losses.view(y.shape).sum(dim=0)
        sums += torch.stack([losses.sum(), torch.tensor(float(losses.numel()), dtype=torch.float64, device=device),
                             losses[has_bytes].sum(), nbytes.sum().double()])
    if lockstep:
        most = len(ValLoader(val_shards, seq_len, batch_size, max_tokens, 0, world_size))  # rank 0 has the most
        for _ in range(most - len(loader)):
            with autocast_ctx():
                model(torch.zeros(1, seq_len, dtype=torch.long, device=device))
    dist.all_reduce_sum(sums)
    model.train(was_training)
    nats, count, nats_bpb, nbytes = sums.tolist()
    if count == 0:
        raise ValueError("the validation split has no full window of seq_len+1 tokens; "
                         "raise data.val_fraction or data.val_tokens, or lower model.seq_len.")
    result = {"val_loss": nats / count, "val_bpb": nats_bpb / (math.log(2) * max(nbytes, 1.0)),
              "val_tokens": int(count)}
    if by_position:
        dist.all_reduce_sum(position_nats)
        windows = count / seq_len
        result["loss_by_position"] = [
            {"first": a, "last": b - 1, "loss": position_nats[a:b].sum().item() / (windows * (b - a))}
            for a, b in position_buckets(seq_len)]
    return result


# ----------------------------------------------------------------------------- command line
#     python -m picollm.evaluate run_dir=runs/cpu [checkpoint=STEP|PATH] [max_tokens=N]

EVAL_USAGE = """usage: python -m picollm.evaluate run_dir=DIR [checkpoint=STEP|PATH] [max_tokens=N] [device=auto|cpu|cuda]
                                [dtype=auto|fp32|bf16|fp16]
Validation loss and bits per byte on the run's whole held-out split (or its first max_tokens
tokens), plus the mean loss per position bucket (loss_by_position: 0-15, 16-31, 32-63, ...);
writes run_dir/eval.json and prints it. Exit status 3: printed, but eval.json could not be written."""


@dataclass
class EvaluateArgs:
    run_dir: str = cli.required("the run to evaluate")
    checkpoint: Optional[str] = cli.setting(None, "a step number or a checkpoint path", shown="the newest valid one")
    max_tokens: Optional[int] = cli.setting(None, "evaluate the split's first N tokens", shown="null (the whole split)")
    device: str = cli.setting("auto", "auto, cpu, cuda or cuda:N")
    dtype: str = cli.setting("auto", "auto (what the run measured faster), fp32, bf16 or fp16")


class EvalError(RuntimeError):
    pass


def find_prepared(run: LoadedRun) -> PreparedData:
    """The prepared data a run trained on: the directory its plan recorded. Runs from before
    the plan recorded it: the directory its tokenizer came from, else where prepare_data
    puts data for the run's config (a tiktoken tokenizer has no file)."""
    if run.plan.get("data_dir"):
        candidates = [Path(run.plan["data_dir"])]
    else:
        candidates = _derived_data_dirs(run)
    for directory in candidates:
        if not (directory / "meta.json").is_file():
            continue
        try:
            data = load_prepared(directory)
        except (ValueError, RuntimeError, OSError) as err:
            raise EvalError(f"the prepared data in {directory} is damaged ({err})") from None
        if run.plan.get("data_key") and data.meta.get("key") != run.plan["data_key"]:
            raise EvalError(f"the prepared data in {directory} was rebuilt with other settings than run_dir "
                            f"{run.run_dir} trained on; rerun the run's training command to rebuild it.")
        if data.meta["tokenizer"]["fingerprint"] != tokenizer_fingerprint(run.tokenizer):
            raise EvalError(f"the prepared data in {directory} was tokenized with a different tokenizer than "
                            f"run_dir {run.run_dir}; rerun the run's training command to rebuild it.")
        return data
    where = " or ".join(str(d) for d in candidates) or "the data cache"
    raise EvalError(f"the prepared data of run_dir {run.run_dir} is missing (looked in {where}); rerun the run's "
                    "training command (same settings) to rebuild it: a finished run only re-prepares its data.")


def _derived_data_dirs(run: LoadedRun) -> list[Path]:
    candidates = []
    ref = Path(run.tokenizer_ref)
    if ref.name == "tokenizer.json":
        candidates.append(ref.parent)
    try:
        cfg = run.config
        candidates.append(default_dir(cfg.data, cfg.tokenizer, dataset_key(cfg.data, cfg.tokenizer)))
    except (ValueError, OSError):  # e.g. a files source whose files are gone: the first candidate may still do
        pass
    return candidates


def evaluate_run(run: LoadedRun, max_tokens: Optional[int] = None, dtype: str = "auto") -> dict:
    """Evaluate a loaded run (picollm.saved_run.load_run) on its held-out split."""
    data = find_prepared(run)
    if dtype == "auto" and run.device.type == "cpu" and run.plan.get("dtype") in hardware.CPU_DTYPES:
        dtype = run.plan["dtype"]  # the run measured which dtype is faster for this model on a CPU
    hw = hardware.describe(str(run.device), dtype, measure=False)
    seq_len = run.model.cfg.seq_len
    start = time.perf_counter()
    batch = eval_batch_size(int(run.plan.get("micro_batch") or 8), seq_len)
    result = evaluate(run.model, data.val_shards, seq_len, batch,
                      token_byte_lengths(run.tokenizer, run.model.cfg.vocab_size), lambda: autocast(hw),
                      max_tokens, run.device, by_position=True)
    return {"step": run.step, "checkpoint": str(run.path), **result, "val_split_tokens": data.n_val_tokens,
            "max_tokens": max_tokens, "data_dir": str(data.dir), "device": str(run.device), "dtype": hw.dtype,
            "seconds": round(time.perf_counter() - start, 3)}


def _check_arguments(args) -> None:
    """The command's arguments, before the model loads."""
    if args.max_tokens is not None and args.max_tokens < 1:
        raise EvalError(f"max_tokens={args.max_tokens} must be positive, or left out for the whole split.")
    for problem in (device_name("device", args.device), one_of("auto", "fp32", "bf16", "fp16")("dtype", args.dtype)):
        if problem:
            raise EvalError(problem)


def main(argv: Optional[list] = None) -> None:
    """Prints the evaluation and writes it to run_dir/eval.json. Exit status 1: nothing was
    evaluated; NOT_SAVED (3): the numbers were printed but eval.json could not be written."""
    args = cli.parse(argv, "evaluate", EVAL_USAGE, EvaluateArgs)
    try:
        _check_arguments(args)
        run = load_run(args.run_dir, args.checkpoint, hardware.pick_device(args.device))
        result = evaluate_run(run, args.max_tokens, args.dtype)
    except (RunError, EvalError, ValueError) as err:
        raise SystemExit(f"error: {err}")
    text = json.dumps(result, indent=2)
    out = run.run_dir / "eval.json"
    try:
        write_atomic(out, text + "\n")  # never leave a half-written eval.json
    except OSError as err:
        print(text)  # the numbers are the result: show them even when they cannot be saved
        print(f"error: {NotSavedError(out, err, 'this evaluation')}", file=sys.stderr)
        raise SystemExit(NOT_SAVED) from None
    print(text)


if __name__ == "__main__":
    main()
