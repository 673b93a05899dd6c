"""Byte-level BPE tokenizers: train our own with rustbpe, or load a tiktoken one.

Everything is a `tiktoken.Encoding` in the end, so encoding is fast (Rust, threaded)
and a trained tokenizer and `gpt2` are interchangeable for the rest of picollm.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Optional

import numpy as np
import tiktoken

from picollm.files import write_atomic

BOS = "<|bos|>"
ENDOFTEXT = "<|endoftext|>"
TOKENIZER_FORMAT = "picollm-tokenizer"
TOKENIZER_VERSION = 1

# GPT-4's split regex with one change: numbers split into groups of 1-2 digits
# instead of 1-3 (as nanochat does). At small vocabularies this spends fewer merges
# on the ~1000 three-digit strings and keeps arithmetic-ish text regular.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}|"""
    r""" ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)

MIN_VOCAB = 257  # 256 byte tokens + BOS; anything smaller cannot encode every byte
VOCAB_LIMIT = 2**32  # a vocabulary stays below it: token shards store ids as uint32 at most


def vocab_size_problem(vocab_size: Any) -> Optional[str]:
    """Why ``vocab_size`` cannot be a trained tokenizer's vocabulary, in one sentence, or
    None: the one range the config check, the data preparation and the trainer share."""
    use = f"use an int of at least {MIN_VOCAB} (256 bytes + BOS) and below 2**32 (the largest shard token dtype)."
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool):
        return f"tokenizer.vocab_size={vocab_size!r} is not an int; {use}"
    if not MIN_VOCAB <= vocab_size < VOCAB_LIMIT:
        side = "small" if vocab_size < MIN_VOCAB else "large"
        return f"tokenizer.vocab_size={vocab_size} is out of range (too {side}); {use}"
    return None


class TokenizerError(ValueError):
    """A tokenizer could not be trained, saved or loaded."""


def train_bpe(texts: Iterable[str], vocab_size: int, name: str | None = None) -> tiktoken.Encoding:
    """Train a byte-level BPE on `texts`; the result has exactly `vocab_size` ids, BOS last.

    Deterministic: the same texts and vocab_size give identical merge ranks.
    """
    if problem := vocab_size_problem(vocab_size):
        raise TokenizerError(problem)
    import rustbpe  # imported lazily: only training needs it

    quiet = logging.getLogger("rustbpe")
    if quiet.level == logging.NOTSET:  # rustbpe logs every 1% of merges at INFO; keep ours readable
        quiet.setLevel(logging.WARNING)
    trainer = rustbpe.Tokenizer()
    # rustbpe's vocab counts the 256 byte tokens plus merges; BOS takes the last id.
    trainer.train_from_iterator(iter(texts), vocab_size - 1, pattern=SPLIT_PATTERN)
    ranks = {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}
    if len(ranks) != vocab_size - 1:
        raise TokenizerError(
            f"the training text only supports {len(ranks) + 1} tokens, fewer than "
            f"tokenizer.vocab_size={vocab_size}; lower vocab_size or raise tokenizer.train_chars."
        )
    return _make_encoding(name or f"picollm-bpe-{vocab_size}", trainer.get_pattern(), ranks, {BOS: vocab_size - 1})


def _make_encoding(name: str, pattern: str, ranks: dict[bytes, int], specials: dict[str, int]) -> tiktoken.Encoding:
    n_vocab = len(ranks) + len(specials)
    if sorted(list(ranks.values()) + list(specials.values())) != list(range(n_vocab)):
        raise TokenizerError(f"tokenizer {name!r} has non-contiguous token ids; the file is corrupt, retrain it.")
    return tiktoken.Encoding(
        name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials, explicit_n_vocab=n_vocab
    )


def _parts(enc: tiktoken.Encoding) -> tuple[str, dict[bytes, int], dict[str, int]]:
    # tiktoken keeps these private; they are stable across releases and the only way
    # to serialise or fingerprint an Encoding.
    return enc._pat_str, enc._mergeable_ranks, enc._special_tokens


def save_tokenizer(enc: tiktoken.Encoding, path: str | os.PathLike) -> Path:
    """Write `enc` as one JSON file (pattern, base64 merge ranks in rank order, specials)."""
    pattern, ranks, specials = _parts(enc)
    by_rank = sorted(ranks.items(), key=lambda kv: kv[1])
    if [rank for _, rank in by_rank] != list(range(len(by_rank))):
        raise TokenizerError(f"tokenizer {enc.name!r} has gaps in its merge ranks, so it cannot be saved.")
    payload = {
        "format": TOKENIZER_FORMAT,
        "version": TOKENIZER_VERSION,
        "name": enc.name,
        "pattern": pattern,
        "n_vocab": enc.n_vocab,
        "special_tokens": specials,
        "mergeable_ranks": [base64.b64encode(token).decode("ascii") for token, _ in by_rank],
    }
    return write_atomic(path, json.dumps(payload))  # a crash never leaves a half-written tokenizer


def load_tokenizer(ref: str | os.PathLike) -> tiktoken.Encoding:
    """Load a tokenizer from a file written by `save_tokenizer`, or a tiktoken name like "gpt2"."""
    ref_str = str(ref)
    path = Path(ref_str)
    if path.is_dir() and (path / "tokenizer.json").is_file():  # a prepared data dir
        path = path / "tokenizer.json"
    if path.is_file() or path.suffix == ".json" or os.sep in ref_str:
        return _load_file(path)
    if ref_str not in tiktoken.list_encoding_names():
        raise TokenizerError(
            f"unknown tokenizer {ref_str!r}: not a file and not a tiktoken encoding; use a path to a "
            f"tokenizer.json or one of {', '.join(tiktoken.list_encoding_names())}."
        )
    try:
        return tiktoken.get_encoding(ref_str)
    except (OSError, ImportError) as e:  # requests.ConnectionError is an OSError
        raise TokenizerError(
            f"tiktoken encoding {ref_str!r} is not cached and could not be downloaded ({type(e).__name__}); "
            f"run once with network access so tiktoken caches it (see TIKTOKEN_CACHE_DIR), "
            f"or train your own with tokenizer.name=bpe."
        ) from e


def _load_file(path: Path) -> tiktoken.Encoding:
    if not path.is_file():
        raise TokenizerError(f"tokenizer file {path} does not exist; check the path or re-run data preparation.")
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        if payload.get("format") != TOKENIZER_FORMAT or payload.get("version") != TOKENIZER_VERSION:
            raise ValueError("not a picollm tokenizer file of a supported version")
        ranks = {base64.b64decode(tok): rank for rank, tok in enumerate(payload["mergeable_ranks"])}
        specials = {str(k): int(v) for k, v in payload["special_tokens"].items()}
        enc = _make_encoding(str(payload["name"]), str(payload["pattern"]), ranks, specials)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise TokenizerError(
            f"tokenizer file {path} is unreadable ({e}); delete it and re-run data preparation."
        ) from e
    if enc.n_vocab != payload["n_vocab"]:
        raise TokenizerError(f"tokenizer file {path} is inconsistent (n_vocab); delete it and re-run data preparation.")
    return enc


def bos_id(enc: tiktoken.Encoding) -> int:
    """The document separator id: `<|bos|>` for trained tokenizers, `<|endoftext|>` for OpenAI's."""
    specials = _parts(enc)[2]
    for token in (BOS, ENDOFTEXT):
        if token in specials:
            return specials[token]
    raise TokenizerError(f"tokenizer {enc.name!r} has neither {BOS} nor {ENDOFTEXT}; use a bpe or gpt-style tokenizer.")


def tokenizer_fingerprint(enc: tiktoken.Encoding) -> str:
    """sha256 over pattern, merge ranks and special tokens (the name is deliberately ignored)."""
    pattern, ranks, specials = _parts(enc)
    h = hashlib.sha256()
    h.update(pattern.encode("utf-8") + b"\0")
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        h.update(rank.to_bytes(4, "little") + len(token).to_bytes(4, "little") + token)
    h.update(json.dumps(sorted(specials.items())).encode("utf-8"))
    return h.hexdigest()



def encode_array(enc: tiktoken.Encoding, text: str) -> np.ndarray:
    """One document's tokens as a uint32 array, exactly as `encode_ordinary` (special-token text
    stays plain text) but without building a Python list of ints."""
    try:
        return enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=())
    except UnicodeEncodeError:  # lone surrogates: replaced, as encode_ordinary does
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        return enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=())
