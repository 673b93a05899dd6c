"""Sample text from a trained run, streaming it as it is generated.

    python -m picollm.sample run_dir=runs/cpu prompt='"def fib(n):"' max_tokens=100 temperature=0.8 top_k=50 seed=0

The prompt is prefixed with BOS (every training document starts with it), and the same
seed gives the same text. Settings left out come from the run's ``sample`` config.
"""

from __future__ import annotations

import codecs
import math
import sys
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from picollm import cli, hardware
from picollm.config import device_name
from picollm.saved_run import LoadedRun, RunError, load_run

USAGE = """usage: python -m picollm.sample run_dir=DIR prompt='"TEXT"' [max_tokens=N] [temperature=T] [top_k=K|null]
                              [seed=S] [checkpoint=STEP|PATH] [device=auto|cpu|cuda]
Streams the model's continuation of TEXT; unset settings come from the run's config (sample.*).
temperature=0 is greedy decoding; top_k=null samples from the full distribution."""


@dataclass
class SampleArgs:
    run_dir: str = cli.required("the run to sample from")
    prompt: str = cli.required("the text to continue; quote it for spaces or punctuation: prompt='\"def f(x):\"'")
    max_tokens: int = cli.from_run("sample.max_tokens", "tokens to generate at most")
    temperature: float = cli.from_run("sample.temperature", "0 is greedy decoding")
    top_k: Optional[int] = cli.from_run("sample.top_k", "sample among the k likeliest tokens; null: all")
    seed: int = cli.from_run("sample.seed", "the same seed gives the same text")
    checkpoint: Optional[str] = cli.setting(None, "a step number or a checkpoint path", shown="the newest valid one")
    device: str = cli.setting("auto", "auto, cpu, cuda or cuda:N")


# The settings a run's config supplies when the command line leaves them out (run.config.sample).
RUN_DEFAULTS = {"max_tokens": 64, "temperature": 0.8, "top_k": 50, "seed": 0}


class SampleError(ValueError):
    pass


def _check(prompt: str, max_tokens: int, temperature: float, top_k: Optional[int], seed: int = 0) -> None:
    if not prompt:
        raise SampleError('prompt is empty; pass prompt="..." with the text to continue.')
    if max_tokens < 1:
        raise SampleError(f"max_tokens={max_tokens} must be at least 1.")
    if not math.isfinite(temperature) or temperature < 0:  # NaN compares False with everything
        raise SampleError(f"temperature={temperature} must be a finite number: 0 (greedy) or positive.")
    if top_k is not None and top_k < 1:
        raise SampleError(f"top_k={top_k} must be at least 1, or none for no top-k filtering.")
    if not 0 <= seed < 2**63:
        raise SampleError(f"seed={seed} must be from 0 to 2**63 - 1.")


def _check_arguments(args) -> None:
    """The command's own arguments, before the model loads; unset ones come from the run's
    config, which load_config already checked."""
    value = lambda key, fallback: args[key] if cli.given(args, key) else fallback
    _check(args.prompt, value("max_tokens", 1), value("temperature", 0.0), value("top_k", None), value("seed", 0))
    if problem := device_name("device", args.device):
        raise SampleError(problem)


def stream_text(run: LoadedRun, prompt: str, max_tokens: int = 64, temperature: float = 0.8,
                top_k: Optional[int] = 50, seed: int = 0) -> Iterator[str]:
    """Yield the continuation of ``prompt`` piece by piece; stops early if the model ends
    the document (emits BOS)."""
    _check(prompt, max_tokens, temperature, top_k, seed)
    enc = run.tokenizer
    # encode_ordinary, as in data preparation: "<|bos|>" typed in a prompt stays plain text.
    ids = [run.bos_id] + enc.encode_ordinary(prompt)
    idx = torch.tensor([ids], dtype=torch.long, device=run.device)
    generator = torch.Generator(device=run.device).manual_seed(seed)
    # A token can end mid-way through a multi-byte character; the incremental decoder
    # holds those bytes back until the character is complete.
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for token in run.model.generate(idx, max_tokens, temperature, top_k, generator):
        tid = int(token)
        if tid == run.bos_id:
            break
        piece = decoder.decode(enc.decode_single_token_bytes(tid))
        if piece:
            yield piece
    tail = decoder.decode(b"", final=True)
    if tail:
        yield tail


def generate_text(run: LoadedRun, prompt: str, max_tokens: int = 64, temperature: float = 0.8,
                  top_k: Optional[int] = 50, seed: int = 0) -> str:
    """The continuation of ``prompt`` (without the prompt itself)."""
    return "".join(stream_text(run, prompt, max_tokens, temperature, top_k, seed))


def main(argv: Optional[list] = None) -> None:
    args = cli.parse(argv, "sample", USAGE, SampleArgs)
    try:
        _check_arguments(args)  # fail before loading the model
        run = load_run(args.run_dir, args.checkpoint, hardware.pick_device(args.device))
        defaults = run.config.get("sample") or {}
        settings = {k: args[k] if cli.given(args, k) else defaults.get(k, fallback) for k, fallback in RUN_DEFAULTS.items()}
        sys.stdout.write(args.prompt)
        for piece in stream_text(run, args.prompt, **settings):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    except (RunError, SampleError, ValueError) as err:
        raise SystemExit(f"error: {err}")


if __name__ == "__main__":
    main()
