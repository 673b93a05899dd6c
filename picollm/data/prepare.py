"""Turn a corpus into a prepared dataset dir: tokenizer + token shards + meta.json.

Layout of the dir: `tokenizer.json` (trained bpe only), `train_000.bin ...`,
`val_000.bin ...`, `meta.json`. Each document becomes `[BOS] + tokens(doc)`, in
corpus order. Preparation is idempotent (a matching dir is reused) and atomic (built
in a temporary sibling and renamed into place only when complete).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tiktoken

from picollm.data import shards, sources
from picollm.tokenizer import (
    MIN_VOCAB,
    bos_id,
    encode_batch,
    load_tokenizer,
    save_tokenizer,
    tokenizer_fingerprint,
    train_bpe,
)

log = logging.getLogger(__name__)

META_FORMAT = "picollm-prepared"
META_VERSION = 1
DEFAULT_SHARD_TOKENS = 100_000_000
DEFAULT_VAL_TOKENS = 1_000_000
_MIN_BATCH_CHARS = 1 << 16  # small enough to stop near the target, big enough for threads
_MAX_BATCH_CHARS = 1 << 23
_CHARS_PER_TOKEN_GUESS = 5  # generous: overshooting a batch is cheaper than another round trip


class PreparedDataError(ValueError):
    """A prepared dataset dir is missing, incomplete or inconsistent."""


@dataclass
class PreparedData:
    dir: Path
    tokenizer: tiktoken.Encoding
    tokenizer_ref: str  # what load_tokenizer() takes: a tokenizer.json path or a tiktoken name
    bos_id: int
    vocab_size: int
    train_shards: list[Path]
    val_shards: list[Path]
    n_train_tokens: int
    n_val_tokens: int
    corpus_exhausted: bool
    n_docs: int
    reused: bool = False  # True when prepare_data found a matching dir and did no work
    meta: dict[str, Any] = field(default_factory=dict, repr=False)


# ------------------------------------------------------------------ config


def validate_tokenizer_config(tok_cfg: Any) -> None:
    """Cheap checks of tokenizer.name / vocab_size / train_chars before any work."""
    if not tok_cfg.name:
        raise ValueError("tokenizer.name is empty; use bpe (train one) or a tiktoken name such as gpt2.")
    if tok_cfg.name == "bpe":
        v = tok_cfg.vocab_size
        if not isinstance(v, int) or v < MIN_VOCAB:
            raise ValueError(f"tokenizer.vocab_size={v!r} is too small; a bpe tokenizer needs at least {MIN_VOCAB}.")
        if v >= shards.MAX_VOCAB:
            raise ValueError(f"tokenizer.vocab_size={v} does not fit the uint32 token shards; use a value below 2**32.")
        if not isinstance(tok_cfg.train_chars, int) or tok_cfg.train_chars <= 0:
            raise ValueError(f"tokenizer.train_chars={tok_cfg.train_chars!r} must be a positive int (e.g. 20_000_000).")


def _val_tokens(data_cfg: Any) -> int:
    return int(getattr(data_cfg, "val_tokens", None) or DEFAULT_VAL_TOKENS)


def dataset_key(data_cfg: Any, tok_cfg: Any) -> str:
    """What determines a prepared dir's content (besides how many tokens were requested)."""
    tok: dict[str, Any] = {"name": str(tok_cfg.name)}
    if tok_cfg.name == "bpe":  # the trained tokenizer's fingerprint is unknown before training
        tok.update(vocab_size=int(tok_cfg.vocab_size), train_chars=int(tok_cfg.train_chars))
    elif Path(str(tok_cfg.name)).is_file():  # a user's tokenizer file: key on its content
        tok["sha256"] = hashlib.sha256(Path(str(tok_cfg.name)).read_bytes()).hexdigest()
    ident = {
        "version": [META_VERSION, shards.FORMAT_VERSION],
        "source": sources.source_fingerprint(data_cfg),
        "tokenizer": tok,
        "val_tokens": _val_tokens(data_cfg),
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def default_dir(data_cfg: Any, tok_cfg: Any, key: str) -> Path:
    tok = f"bpe{tok_cfg.vocab_size}" if tok_cfg.name == "bpe" else Path(str(tok_cfg.name)).stem
    tok = "".join(c if c.isalnum() or c in "-_." else "-" for c in tok)
    return Path(data_cfg.cache_dir).expanduser() / f"{sources.source_label(data_cfg)}-{tok}-{key[:12]}"


# ------------------------------------------------------------------ entry


def prepare_data(
    data_cfg: Any,
    tok_cfg: Any,
    n_train_tokens: int,
    out_dir: Path | None = None,
    num_proc: int | None = None,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
) -> PreparedData:
    """Make sure a prepared dir with >= n_train_tokens train tokens exists (or the whole corpus).

    Reuses a matching dir; otherwise builds a new one and swaps it in atomically.
    """
    sources.validate_source(data_cfg)
    validate_tokenizer_config(tok_cfg)
    if n_train_tokens <= 0 or shard_tokens <= 0:
        raise ValueError(f"n_train_tokens={n_train_tokens} and shard_tokens={shard_tokens} must be positive.")
    key = dataset_key(data_cfg, tok_cfg)
    out_dir = Path(out_dir) if out_dir is not None else default_dir(data_cfg, tok_cfg, key)

    old_meta = _read_meta_or_none(out_dir)
    if old_meta is not None and old_meta.get("key") == key and (
        old_meta["n_train_tokens"] >= n_train_tokens or old_meta["corpus_exhausted"]
    ):
        try:
            return dataclasses.replace(load_prepared(out_dir), reused=True)
        except (shards.ShardError, PreparedDataError) as e:
            log.warning("prepared data in %s is damaged (%s); rebuilding it", out_dir, e)
    elif out_dir.is_dir() and not (out_dir / "meta.json").exists() and any(out_dir.iterdir()):
        raise PreparedDataError(
            f"{out_dir} exists but is not a picollm prepared data dir; choose another out_dir or delete it."
        )

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        reusable_tok = None
        if old_meta is not None and old_meta.get("key") == key:  # same settings, just too few tokens
            reusable_tok = (out_dir / "tokenizer.json", old_meta["tokenizer"]["fingerprint"])
        meta = _build(data_cfg, tok_cfg, n_train_tokens, tmp, key, num_proc, shard_tokens, reusable_tok)
        _swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info(
        "prepared %s: %d train / %d val tokens from %d docs",
        out_dir, meta["n_train_tokens"], meta["n_val_tokens"], meta["n_docs"],
    )
    return load_prepared(out_dir)


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    # A directory cannot be os.replace'd onto a non-empty one, so move the old aside first;
    # a crash in between leaves no out_dir at all, which simply triggers a rebuild.
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------ build


def _train_docs(data_cfg: Any) -> Iterator[str]:
    val_fraction = float(data_cfg.val_fraction)
    return (d for d in sources.iter_documents(data_cfg) if not sources.is_val_doc(d, val_fraction))


def _first_chars(docs: Iterable[str], n_chars: int) -> Iterator[str]:
    """The first n_chars characters of the concatenated docs, doc by doc."""
    left = n_chars
    for doc in docs:
        if left <= 0:
            return
        yield doc[:left]
        left -= len(doc)


def _reuse_tokenizer(reusable: tuple[Path, str] | None, tmp: Path) -> tiktoken.Encoding | None:
    """The previous build's tokenizer if it is intact (training is deterministic, so it is ours)."""
    if reusable is None or not reusable[0].is_file():
        return None
    try:
        enc = load_tokenizer(reusable[0])
    except ValueError:
        return None
    if tokenizer_fingerprint(enc) != reusable[1]:
        return None
    shutil.copy2(reusable[0], tmp / "tokenizer.json")
    return enc


def _get_tokenizer(
    tok_cfg: Any, data_cfg: Any, tmp: Path, reusable: tuple[Path, str] | None
) -> tuple[tiktoken.Encoding, str, float]:
    """(encoding, ref stored in meta, seconds spent training)."""
    if tok_cfg.name != "bpe":
        enc = load_tokenizer(tok_cfg.name)
        if Path(str(tok_cfg.name)).is_file():  # copy a user's file so the dir is self-contained
            save_tokenizer(enc, tmp / "tokenizer.json")
            return enc, "tokenizer.json", 0.0
        return enc, str(tok_cfg.name), 0.0
    enc = _reuse_tokenizer(reusable, tmp)
    if enc is not None:
        return enc, "tokenizer.json", 0.0
    t0 = time.perf_counter()
    enc = train_bpe(_first_chars(_train_docs(data_cfg), tok_cfg.train_chars), tok_cfg.vocab_size)
    seconds = time.perf_counter() - t0
    log.info("trained a %d-token bpe tokenizer in %.1fs", enc.n_vocab, seconds)
    save_tokenizer(enc, tmp / "tokenizer.json")
    return enc, "tokenizer.json", seconds


class _ShardWriter:
    """Accumulates a token stream and writes it as fixed-size shards `<prefix>_NNN.bin`."""

    def __init__(self, directory: Path, prefix: str, vocab_size: int, shard_tokens: int, max_tokens: int | None = None):
        self.directory, self.prefix, self.vocab_size = directory, prefix, vocab_size
        self.shard_tokens, self.max_tokens = shard_tokens, max_tokens
        self.dtype = shards.DTYPES[shards.dtype_code_for(vocab_size)]
        self.buffer: list[np.ndarray] = []
        self.buffered = 0
        self.total = 0
        self.files: list[dict[str, Any]] = []

    @property
    def full(self) -> bool:
        return self.max_tokens is not None and self.total >= self.max_tokens

    def add(self, tokens: np.ndarray) -> None:
        if self.max_tokens is not None:
            tokens = tokens[: self.max_tokens - self.total]
        if not len(tokens):
            return
        self.buffer.append(tokens)
        self.buffered += len(tokens)
        self.total += len(tokens)
        while self.buffered >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def close(self) -> list[dict[str, Any]]:
        if self.buffered:
            self._flush(self.buffered)
        return self.files

    def _flush(self, n: int) -> None:
        stream = np.concatenate(self.buffer) if len(self.buffer) > 1 else self.buffer[0]
        name = f"{self.prefix}_{len(self.files):03d}.bin"
        shards.write_shard(self.directory / name, stream[:n], self.vocab_size)
        self.files.append({"file": name, "n_tokens": int(n)})
        rest = stream[n:]
        self.buffer = [rest] if len(rest) else []
        self.buffered = len(rest)


def _doc_stream(token_lists: list[list[int]], bos: int, dtype: np.dtype) -> np.ndarray:
    """Concatenate documents as [BOS] + tokens(doc) each."""
    out = np.empty(sum(len(t) for t in token_lists) + len(token_lists), dtype=dtype)
    pos = 0
    for toks in token_lists:
        out[pos] = bos
        out[pos + 1 : pos + 1 + len(toks)] = toks
        pos += 1 + len(toks)
    return out


def _batches(docs: Iterator[str], chars_wanted: Any) -> Iterator[list[str]]:
    """Group docs into batches of roughly chars_wanted() characters."""
    batch, chars = [], 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc)
        if chars >= chars_wanted():
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


@dataclass
class _Streams:
    """What tokenizing the corpus produced."""

    train: _ShardWriter
    val: _ShardWriter
    n_docs: int = 0
    n_train_docs: int = 0
    n_val_docs: int = 0
    exhausted: bool = True
    seconds: float = 0.0


def _tokenize_corpus(
    data_cfg: Any, enc: tiktoken.Encoding, streams: _Streams, n_train_tokens: int, threads: int
) -> _Streams:
    """Stream documents, split train/val, tokenize in parallel batches, stop once train has enough."""
    bos, val_fraction = bos_id(enc), float(data_cfg.val_fraction)
    train, val = streams.train, streams.val
    # The last train doc read stays pending until the next batch: if reading ends with
    # no val doc at all, it becomes the val doc instead (so val is never empty).
    pending: np.ndarray | None = None
    t0 = time.perf_counter()

    def chars_wanted() -> int:
        left = max(n_train_tokens - train.total, 0) * _CHARS_PER_TOKEN_GUESS
        return min(max(left, _MIN_BATCH_CHARS), _MAX_BATCH_CHARS)

    docs = iter(sources.iter_documents(data_cfg))
    train_done, skipped_train = False, False
    for batch in _batches(docs, chars_wanted):
        flags = [sources.is_val_doc(d, val_fraction) for d in batch]
        streams.n_docs += len(batch)
        if train_done:
            # Train has its budget; read on only to fill the held-out split, so the val set
            # (the first val_tokens of val documents in corpus order) is the same for every
            # budget and runs of different sizes are scored on the same tokens.
            val_docs = [d for d, v in zip(batch, flags) if v]
            skipped_train = skipped_train or len(val_docs) < len(batch)
            if val_docs:
                val.add(_doc_stream(encode_batch(enc, val_docs, threads), bos, val.dtype))
                streams.n_val_docs += len(val_docs)
            if val.full:
                break
            continue
        encoded = encode_batch(enc, batch, threads)
        val_lists = [t for t, v in zip(encoded, flags) if v]
        train_lists = [t for t, v in zip(encoded, flags) if not v]
        streams.n_val_docs += len(val_lists)
        streams.n_train_docs += len(train_lists)
        if val_lists and not val.full:
            val.add(_doc_stream(val_lists, bos, val.dtype))
        if train_lists:
            if pending is not None:
                train.add(pending)
            train.add(_doc_stream(train_lists[:-1], bos, train.dtype))
            pending = _doc_stream(train_lists[-1:], bos, train.dtype)
        if train.total >= n_train_tokens:
            train_done = True
            if val.full:
                break
    # Exhausted: every train document of the corpus is in the train stream.
    rest_empty = next(docs, None) is None
    streams.exhausted = (not train_done) or (rest_empty and not skipped_train)
    if streams.n_docs < 2:
        raise sources.DataSourceError(
            f"the corpus has {streams.n_docs} non-empty document(s); at least 2 are needed for a train and a val split."
        )
    if pending is not None:
        if streams.n_val_docs == 0 and train.total > 0:
            val.add(pending)
            streams.n_val_docs, streams.n_train_docs = 1, streams.n_train_docs - 1
        else:
            train.add(pending)
    if train.total == 0:
        raise sources.DataSourceError(
            f"every document landed in the val split; lower data.val_fraction={val_fraction} or add documents."
        )
    streams.seconds = time.perf_counter() - t0
    return streams


def _build(
    data_cfg: Any,
    tok_cfg: Any,
    n_train_tokens: int,
    tmp: Path,
    key: str,
    num_proc: int | None,
    shard_tokens: int,
    reusable_tok: tuple[Path, str] | None,
) -> dict[str, Any]:
    """Fill `tmp` with tokenizer, shards and (last, marking it complete) meta.json."""
    enc, tok_ref, train_seconds = _get_tokenizer(tok_cfg, data_cfg, tmp, reusable_tok)
    vocab = enc.n_vocab
    shards.dtype_code_for(vocab)  # refuses vocabularies that do not fit a shard
    threads = num_proc or os.cpu_count() or 1
    streams = _Streams(
        train=_ShardWriter(tmp, "train", vocab, shard_tokens),
        val=_ShardWriter(tmp, "val", vocab, shard_tokens, max_tokens=_val_tokens(data_cfg)),
    )
    _tokenize_corpus(data_cfg, enc, streams, n_train_tokens, threads)
    train_files, val_files = streams.train.close(), streams.val.close()
    n_tokens = streams.train.total + streams.val.total
    meta = {
        "format": META_FORMAT,
        "version": META_VERSION,
        "shard_format_version": shards.FORMAT_VERSION,
        "key": key,
        "source_fingerprint": sources.source_fingerprint(data_cfg),
        "source": data_cfg.source,
        "tokenizer": {
            "name": str(tok_cfg.name),
            "ref": tok_ref,
            "fingerprint": tokenizer_fingerprint(enc),
            "train_chars": int(tok_cfg.train_chars) if tok_cfg.name == "bpe" else None,
        },
        "vocab_size": vocab,
        "bos_id": bos_id(enc),
        "n_train_tokens_requested": int(n_train_tokens),
        "n_train_tokens": streams.train.total,
        "n_val_tokens": streams.val.total,
        "n_docs": streams.n_docs,
        "n_train_docs": streams.n_train_docs,
        "n_val_docs": streams.n_val_docs,
        "corpus_exhausted": streams.exhausted,
        "val_fraction": float(data_cfg.val_fraction),
        "val_tokens_max": _val_tokens(data_cfg),
        "shard_tokens": shard_tokens,
        "train_shards": train_files,
        "val_shards": val_files,
        "stats": {
            "tokenizer_train_seconds": round(train_seconds, 3),
            "tokenize_seconds": round(streams.seconds, 3),
            "tokens_per_second": round(n_tokens / max(streams.seconds, 1e-9)),
            "threads": threads,
        },
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return meta


# ------------------------------------------------------------------ load


def _read_meta_or_none(directory: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT or meta.get("version") != META_VERSION:
        return None
    return meta


def load_prepared(directory: str | os.PathLike) -> PreparedData:
    """Open a prepared dir, checking meta.json, the tokenizer and every shard header."""
    directory = Path(directory)
    meta = _read_meta_or_none(directory)
    if meta is None:
        raise PreparedDataError(
            f"{directory} has no readable meta.json of version {META_VERSION}; "
            f"run data preparation (prepare_data) again."
        )
    tok_meta = meta["tokenizer"]
    ref = str(directory / tok_meta["ref"]) if tok_meta["ref"] == "tokenizer.json" else tok_meta["ref"]
    enc = load_tokenizer(ref)
    if tokenizer_fingerprint(enc) != tok_meta["fingerprint"] or enc.n_vocab != meta["vocab_size"]:
        raise PreparedDataError(
            f"the tokenizer {ref} does not match the one {directory} was prepared with; "
            f"delete {directory} and rerun data preparation."
        )

    def check(entries: list[dict[str, Any]]) -> list[Path]:
        paths = []
        for entry in entries:
            info = shards.shard_info(directory / entry["file"])
            if info.n_tokens != entry["n_tokens"] or info.vocab_size != meta["vocab_size"]:
                raise shards.ShardError(
                    f"token shard {info.path} does not match meta.json (tokens or vocab_size); "
                    f"delete the prepared data directory {directory} and rerun data preparation."
                )
            paths.append(info.path)
        return paths

    train_paths, val_paths = check(meta["train_shards"]), check(meta["val_shards"])
    return PreparedData(
        dir=directory,
        tokenizer=enc,
        tokenizer_ref=ref,
        bos_id=int(meta["bos_id"]),
        vocab_size=int(meta["vocab_size"]),
        train_shards=train_paths,
        val_shards=val_paths,
        n_train_tokens=int(meta["n_train_tokens"]),
        n_val_tokens=int(meta["n_val_tokens"]),
        corpus_exhausted=bool(meta["corpus_exhausted"]),
        n_docs=int(meta["n_docs"]),
        meta=meta,
    )


def main(argv: list[str] | None = None) -> None:
    """`python -m picollm.data.prepare [overrides]`: train the tokenizer and write the shards
    a run's plan needs (the speedrun's tokenizer and data stages). Reuses what exists."""
    import sys

    from picollm.config import ConfigError, load_config, parse_cli
    from picollm.plan import plan_from_config

    overrides = parse_cli(sys.argv[1:] if argv is None else argv,
                          "usage: python -m picollm.data.prepare [overrides...]  (the same overrides as train)")
    try:
        cfg = load_config(overrides)
        validate_tokenizer_config(cfg.tokenizer)
        plan = plan_from_config(cfg)
        data = prepare_data(cfg.data, cfg.tokenizer, plan.stream_tokens)
    except (ConfigError, ValueError, RuntimeError) as err:
        raise SystemExit(f"error: {err}")
    state = "reused" if data.reused else "prepared"
    print(f"{state} {data.dir}: {data.n_train_tokens:,} train / {data.n_val_tokens:,} val tokens, "
          f"vocabulary {data.vocab_size}, tokenizer {data.tokenizer_ref}")


if __name__ == "__main__":
    main()
