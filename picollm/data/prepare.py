"""Turn a corpus into a prepared dataset dir: tokenizer + token shards + meta.json.

Layout of the dir: `tokenizer.json` (trained bpe only), `train_000.bin ...`,
`val_000.bin ...`, `meta.json` (the same settings always give the same bytes) and
`stats.json` (timings). Each document becomes `[BOS] + tokens(doc)`, in a seeded
shuffled order of the whole corpus, so the first tokens come from all of it; a run then
samples its sequences from the first `data.pool_tokens` of them (see plan.stream_tokens).

Preparation is idempotent (a matching dir is reused), atomic (built in a hidden sibling,
`.<name>.build-<key>`, and renamed into place only when complete) and resumable: an
interrupted build keeps its completed shards and its corpus position in that sibling,
and a rerun continues from them to the same bytes an uninterrupted build writes.
Tokenization runs in `data.workers` processes (default: every core); the output does
not depend on how many.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import tiktoken

from picollm.data import shards, sources
from picollm.data.shards import PreparedDataError
from picollm.files import atomic_open, write_atomic
from picollm.tokenizer import (
    TokenizerError,
    bos_id,
    encode_array,
    load_tokenizer,
    save_tokenizer,
    tokenizer_fingerprint,
    train_bpe,
    vocab_size_problem,
)
from picollm.units import duration, si

try:
    import fcntl
except ImportError:  # not on Windows: builds are then not guarded against a concurrent twin
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

META_FORMAT = "picollm-prepared"
META_VERSION = 2  # 2: documents in a seeded shuffled order; timings moved to stats.json
SHUFFLE_SEED = 0  # the corpus order; part of the dataset key
DEFAULT_SHARD_TOKENS = 100_000_000
DEFAULT_VAL_TOKENS = 1_000_000
# Text per encoding task: a process round trip costs well under 1% of encoding it, and
# stopping at the token budget wastes at most a few batches per worker.
BATCH_CHARS = 1 << 20
_IN_FLIGHT_PER_WORKER = 2  # batches queued per worker, so none waits for the reader
PROGRESS_EVERY_S = 5.0
_RESUME_FORMAT = "picollm-prepare-resume"
_RESUME_FILE = "resume.json"


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
    stats: dict[str, Any] = field(default_factory=dict, repr=False)  # timings of the build (stats.json)


class PreparationInterrupted(KeyboardInterrupt):
    """Ctrl-C during a build; the partial build stays in `build_dir` and a rerun continues it."""

    def __init__(self, build_dir: Path, shards_done: int, docs_done: int):
        super().__init__(build_dir, shards_done, docs_done)
        self.build_dir, self.shards_done, self.docs_done = build_dir, shards_done, docs_done

    def sentence(self) -> str:
        return (
            f"interrupted: data preparation stopped; rerun the same command to continue from what it kept "
            f"in {self.build_dir} ({self.shards_done} complete shards, {self.docs_done:,} documents)."
        )


# ------------------------------------------------------------------ config


def validate_tokenizer_config(tok_cfg: Any) -> None:
    """Cheap checks of tokenizer.name / vocab_size / train_chars before any work."""
    if not tok_cfg.name:
        raise ValueError("tokenizer.name is empty; use bpe (train one) or a tiktoken name such as gpt2.")
    if tok_cfg.name == "bpe":
        if problem := vocab_size_problem(tok_cfg.vocab_size):
            raise ValueError(problem)
        if not isinstance(tok_cfg.train_chars, int) or tok_cfg.train_chars <= 0:
            raise ValueError(f"tokenizer.train_chars={tok_cfg.train_chars!r} must be a positive int (e.g. 20_000_000).")


def usable_cpus() -> int:
    """The cores this process may run on (its affinity: a container's or a job's share, not the host's)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def resolve_workers(data_cfg: Any, num_proc: int | None = None) -> int:
    """Tokenizer processes: num_proc, else data.workers, else every usable core."""
    workers = num_proc if num_proc is not None else getattr(data_cfg, "workers", None)
    if workers is None:
        return usable_cpus()
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise PreparedDataError(
            f"data.workers={workers!r} must be a positive number of processes, or null for every core."
        )
    return workers


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
        "shuffle_seed": SHUFFLE_SEED,
        "tokenizer": tok,
        "val_tokens": _val_tokens(data_cfg),
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def default_dir(data_cfg: Any, tok_cfg: Any, key: str) -> Path:
    tok = f"bpe{tok_cfg.vocab_size}" if tok_cfg.name == "bpe" else Path(str(tok_cfg.name)).stem
    tok = "".join(c if c.isalnum() or c in "-_." else "-" for c in tok)
    return Path(data_cfg.cache_dir).expanduser() / f"{sources.source_label(data_cfg)}-{tok}-{key[:12]}"


def check_fits(data: PreparedData, seq_len: int) -> None:
    """Refuse prepared data too small for one training sequence or one evaluation window."""
    need = seq_len + 1
    if data.n_train_tokens < need:
        raise PreparedDataError(
            f"the corpus gave {data.n_train_tokens:,} train tokens, fewer than one training sequence of "
            f"seq_len + 1 = {need:,}; add text to the corpus or lower model.seq_len."
        )
    if data.n_val_tokens < need:
        raise PreparedDataError(
            f"the held-out split has {data.n_val_tokens:,} tokens, fewer than one evaluation window of "
            f"seq_len + 1 = {need:,}; add text to the corpus, raise data.val_fraction or lower model.seq_len."
        )


# ------------------------------------------------------------------ progress


@dataclass(frozen=True)
class PrepareProgress:
    """Where a build stands; handed to the progress callback after every encoded batch."""

    docs: int  # documents of the (shuffled) corpus consumed
    train_tokens: int
    val_tokens: int
    target_tokens: int  # train tokens requested
    shards_done: int  # completed shard files, train and val
    seconds: float  # since this run of the build started (a resumed build counts anew)
    new_tokens: int  # tokens this run of the build produced
    total_docs: int | None = None  # documents in the corpus, when known without reading it
    train_done: bool = False
    start_fraction: float = 0.0  # fraction() when this run started (a resumed build starts above 0)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / max(self.seconds, 1e-9)

    def fraction(self) -> float | None:
        """How far along, by the train budget or the whole corpus, whichever ends first."""
        by_docs = self.docs / self.total_docs if self.total_docs else None
        if self.train_done:  # only the held-out split is still filling
            return by_docs
        by_tokens = min(self.train_tokens / self.target_tokens, 1.0)
        return by_tokens if by_docs is None else max(by_tokens, by_docs)

    def eta_seconds(self) -> float | None:
        f = self.fraction()
        if f is None or f <= self.start_fraction:
            return None
        return self.seconds * (1.0 - f) / (f - self.start_fraction)

    def line(self) -> str:
        parts = [f"prepare: {self.docs:,} docs", f"{si(self.train_tokens)} train + {si(self.val_tokens)} val tokens",
                 f"{si(self.tokens_per_second)} tokens/s"]
        f, eta = self.fraction(), self.eta_seconds()
        if f is not None:
            parts.append(f"{f:.0%}")
        if eta is not None:
            parts.append(f"ETA {duration(eta)}")
        elif self.train_done:
            parts.append("filling the held-out split")
        return ", ".join(parts)


class ProgressPrinter:
    """The default progress callback: one line on stdout at most every `every_s` seconds."""

    def __init__(self, every_s: float = PROGRESS_EVERY_S, file: Any = None):
        self.every_s, self.file = every_s, file
        self.last = time.monotonic()  # the first line comes after every_s: quick builds stay quiet

    def __call__(self, progress: PrepareProgress) -> None:
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            print(progress.line(), file=self.file or sys.stdout, flush=True)


# ------------------------------------------------------------------ entry


# ~60 lines: ten keyword parameters on their own lines; the body is reuse, lock, build, rename.
def prepare_data(
    data_cfg: Any,
    tok_cfg: Any,
    n_train_tokens: int,
    out_dir: Path | None = None,
    num_proc: int | None = None,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    progress: Callable[[PrepareProgress], None] | None = None,
    batch_chars: int = BATCH_CHARS,
) -> PreparedData:
    """Make sure a prepared dir with >= n_train_tokens train tokens exists (or the whole corpus).

    Reuses a matching dir; otherwise builds one (continuing an interrupted build of the same
    data) and swaps it in atomically. `num_proc` overrides data.workers (tokenizer processes);
    `progress` is called after every encoded batch (default: a ProgressPrinter). Ctrl-C raises
    PreparationInterrupted (a KeyboardInterrupt) and keeps the partial build for a rerun.
    """
    sources.validate_source(data_cfg)  # also refuses empty, binary and non-UTF-8 files
    validate_tokenizer_config(tok_cfg)
    workers = resolve_workers(data_cfg, num_proc)
    if n_train_tokens <= 0 or shard_tokens <= 0 or batch_chars <= 0:
        raise ValueError(
            f"n_train_tokens={n_train_tokens}, shard_tokens={shard_tokens} and batch_chars={batch_chars} "
            f"must be positive."
        )
    key = dataset_key(data_cfg, tok_cfg)
    out_dir = Path(out_dir) if out_dir is not None else default_dir(data_cfg, tok_cfg, key)
    found = _complete_or_none(out_dir, key, n_train_tokens)
    if found is not None:
        return found
    if out_dir.is_dir() and not (out_dir / "meta.json").exists() and any(out_dir.iterdir()):
        raise PreparedDataError(
            f"{out_dir} exists but is not a picollm prepared data dir; choose another out_dir or delete it."
        )

    build = build_dir(out_dir, key)
    lock, waited = _lock_build_dir(build)
    try:
        found = _complete_or_none(out_dir, key, n_train_tokens) if waited else None
        if found is not None:  # the twin process we waited for built it
            shutil.rmtree(build, ignore_errors=True)
            return found
        old_meta = _read_meta_or_none(out_dir)
        reusable_tok = None
        if old_meta is not None and old_meta.get("key") == key:  # same settings, just too few tokens
            reusable_tok = (out_dir / "tokenizer.json", old_meta["tokenizer"]["fingerprint"])
        try:
            meta = _build(data_cfg, tok_cfg, n_train_tokens, build, key, workers, shard_tokens, batch_chars,
                          reusable_tok, progress if progress is not None else ProgressPrinter())
            _swap_into_place(build, out_dir)
        except KeyboardInterrupt:
            shards_done, docs_done = _resume_summary(build)
            raise PreparationInterrupted(build, shards_done, docs_done) from None
        except BaseException:
            shutil.rmtree(build, ignore_errors=True)
            raise
    finally:
        if lock is not None:
            os.close(lock)
    log.info(
        "prepared %s: %d train / %d val tokens from %d docs",
        out_dir, meta["n_train_tokens"], meta["n_val_tokens"], meta["n_docs"],
    )
    return load_prepared(out_dir)


def build_dir(out_dir: Path, key: str) -> Path:
    """Where the data for out_dir is built (and an interrupted build waits to be continued)."""
    return out_dir.with_name(f".{out_dir.name}.build-{key[:16]}")


def _complete_or_none(out_dir: Path, key: str, n_train_tokens: int) -> PreparedData | None:
    """The prepared dir at out_dir if it is intact and has what is asked for."""
    meta = _read_meta_or_none(out_dir)
    if meta is None or meta.get("key") != key:
        return None
    if meta["n_train_tokens"] < n_train_tokens and not meta["corpus_exhausted"]:
        return None
    try:
        return dataclasses.replace(load_prepared(out_dir), reused=True)
    except (PreparedDataError, TokenizerError) as e:
        log.warning("prepared data in %s is damaged (%s); rebuilding it", out_dir, e)
        return None


def _lock_build_dir(build: Path) -> tuple[int | None, bool]:
    """Create `build` and hold an exclusive lock on it (the returned fd; and whether we had to
    wait), so two processes preparing the same data never write one dir: the second waits,
    then finds the data done."""
    waited = False
    while True:
        build.mkdir(parents=True, exist_ok=True)
        if fcntl is None:
            return None, waited
        fd = os.open(build, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process preparing the same data in {build}", flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
            waited = True
        with contextlib.suppress(FileNotFoundError):
            if os.stat(build).st_ino == os.fstat(fd).st_ino:
                return fd, waited
        os.close(fd)  # the dir we waited on was moved into place or removed: lock the one there now


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    # A directory cannot be os.replace'd onto a non-empty one, so move the old aside first;
    # a crash in between leaves no out_dir at all, which simply triggers a rebuild.
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}-{time.time_ns()}")
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------ tokenizer


def _corpus(data_cfg: Any) -> Iterator[str]:
    """The documents in the order they are tokenized: a seeded shuffle of the whole corpus."""
    return sources.iter_documents(data_cfg, shuffle_seed=SHUFFLE_SEED)


def _first_chars(docs: Iterable[str], n_chars: int) -> Iterator[str]:
    """The first n_chars characters of the concatenated docs, doc by doc."""
    left = n_chars
    for doc in docs:
        if left <= 0:
            return
        yield doc[:left]
        left -= len(doc)


def _reuse_tokenizer(candidates: list[tuple[Path, str]], build: Path) -> tiktoken.Encoding | None:
    """A tokenizer an earlier build of the same data trained, if intact (training is deterministic)."""
    for path, fingerprint in candidates:
        if not path.is_file():
            continue
        try:
            enc = load_tokenizer(path)
        except ValueError:
            continue
        if tokenizer_fingerprint(enc) != fingerprint:
            continue
        if path != build / "tokenizer.json":
            shutil.copy2(path, build / "tokenizer.json")
        return enc
    return None


def _get_tokenizer(
    tok_cfg: Any, data_cfg: Any, build: Path, candidates: list[tuple[Path, str]]
) -> tuple[tiktoken.Encoding, str, float]:
    """(encoding, ref stored in meta, seconds spent training)."""
    if tok_cfg.name != "bpe":
        enc = load_tokenizer(tok_cfg.name)
        if Path(str(tok_cfg.name)).is_file():  # copy a user's file so the dir is self-contained
            save_tokenizer(enc, build / "tokenizer.json")
            return enc, "tokenizer.json", 0.0
        return enc, str(tok_cfg.name), 0.0
    enc = _reuse_tokenizer(candidates, build)
    if enc is not None:
        return enc, "tokenizer.json", 0.0
    t0 = time.perf_counter()
    val_fraction = float(data_cfg.val_fraction)
    train_docs = (d for d in _corpus(data_cfg) if not sources.is_val_doc(d, val_fraction))
    enc = train_bpe(_first_chars(train_docs, tok_cfg.train_chars), tok_cfg.vocab_size)
    seconds = time.perf_counter() - t0
    log.info("trained a %d-token bpe tokenizer in %.1fs", enc.n_vocab, seconds)
    save_tokenizer(enc, build / "tokenizer.json")
    return enc, "tokenizer.json", seconds


# ------------------------------------------------------------------ token streams


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

    def buffered_tokens(self) -> np.ndarray:
        """The tokens not yet in a shard file (what a resume state must keep)."""
        return np.concatenate(self.buffer) if self.buffer else np.empty(0, dtype=self.dtype)

    def restore(self, files: list[dict[str, Any]], total: int, buffered: np.ndarray) -> None:
        self.files, self.total = list(files), int(total)
        self.buffer = [buffered.astype(self.dtype, copy=False)] if len(buffered) else []
        self.buffered = len(buffered)

    def _flush(self, n: int) -> None:
        stream = np.concatenate(self.buffer) if len(self.buffer) > 1 else self.buffer[0]
        name = f"{self.prefix}_{len(self.files):03d}.bin"
        shards.write_shard(self.directory / name, stream[:n], self.vocab_size)
        self.files.append({"file": name, "n_tokens": int(n)})
        rest = stream[n:]
        self.buffer = [rest] if len(rest) else []
        self.buffered = len(rest)


@dataclass
class _Batch:
    """Consecutive documents of the corpus, as handed to one encoding task."""

    start: int  # ordinal (position in the corpus order) of the first document
    texts: list[str]
    drop_train: bool  # train already had its budget when the batch was read: encode only val docs

    @property
    def end(self) -> int:
        return self.start + len(self.texts)


class _BatchReader:
    """Reads the corpus into batches of about batch_chars characters."""

    def __init__(self, docs: Iterator[str], start: int, batch_chars: int, train_done: Callable[[], bool]):
        self.docs, self.next_ordinal, self.batch_chars, self.train_done = docs, start, batch_chars, train_done

    def next_batch(self) -> _Batch | None:
        texts, chars = [], 0
        for doc in self.docs:
            texts.append(doc)
            chars += len(doc)
            if chars >= self.batch_chars:
                break
        if not texts:
            return None
        batch = _Batch(self.next_ordinal, texts, self.train_done())
        self.next_ordinal = batch.end
        return batch

    def more_after(self, ordinal: int) -> bool:
        """Whether the corpus has a document after `ordinal`."""
        return self.next_ordinal > ordinal + 1 or next(self.docs, None) is not None


class _BuildState:
    """The train and val streams being written and where in the corpus they stand.

    Every decision is made per document in corpus order, so the result does not depend on
    how documents were batched, on the number of workers, or on where a build was resumed:
    train takes documents until it holds n_train_tokens; val takes the first val_tokens of
    held-out documents (the same for every budget, so runs are scored on the same tokens);
    reading stops once both are satisfied.
    """

    def __init__(self, train: _ShardWriter, val: _ShardWriter, target: int):
        self.train, self.val, self.target = train, val, target
        # The last train doc stays pending: if the corpus has no val doc at all, it becomes
        # the val doc instead (so val is never empty).
        self.pending: np.ndarray | None = None
        self.position = 0  # documents consumed (the ordinal of the next one)
        self.n_train_docs = self.n_val_docs = 0
        self.train_done = False
        self.skipped_train = False  # a train document was left out for the budget
        self.finished = False  # train and val both satisfied: reading stopped

    @property
    def train_tokens(self) -> int:
        return self.train.total + (len(self.pending) if self.pending is not None else 0)

    @property
    def shards_done(self) -> int:
        return len(self.train.files) + len(self.val.files)

    def apply(self, batch: _Batch, is_val: np.ndarray, sizes: np.ndarray, stream: np.ndarray) -> None:
        """Take the batch's encoded documents in order (`stream`: [BOS]+tokens each, `sizes` long;
        size 0 for the train documents of a drop_train batch, which were not encoded)."""
        take_train = np.zeros(len(sizes), dtype=bool)
        take_val = np.zeros(len(sizes), dtype=bool)
        train_tokens, val_tokens, val_max = self.train_tokens, self.val.total, self.val.max_tokens or 0
        finish = None
        for i, (val, size) in enumerate(zip(is_val.tolist(), sizes.tolist())):
            if val:
                if val_tokens < val_max:
                    take_val[i] = True
                    val_tokens += size
                    self.n_val_docs += 1
                    if val_tokens >= val_max and self.train_done:
                        finish = i
                        break
            elif not self.train_done:
                take_train[i] = True
                train_tokens += size
                self.n_train_docs += 1
                if train_tokens >= self.target:
                    self.train_done = True
                    if val_tokens >= val_max:
                        finish = i
                        break
            else:
                self.skipped_train = True
        self._write(stream, sizes, take_train, take_val)
        self.position = batch.end if finish is None else batch.start + finish + 1
        self.finished = finish is not None

    def _write(self, stream: np.ndarray, sizes: np.ndarray, take_train: np.ndarray, take_val: np.ndarray) -> None:
        if take_val.any():
            self.val.add(stream[np.repeat(take_val, sizes)])
        if take_train.any():
            part = stream[np.repeat(take_train, sizes)]
            last = int(sizes[np.flatnonzero(take_train)[-1]])
            if self.pending is not None:
                self.train.add(self.pending)
            self.train.add(part[:-last])
            self.pending = part[-last:].copy()  # a copy: a view would keep the whole batch alive

    def close(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        if self.pending is not None:
            if self.n_val_docs == 0 and self.train.total > 0:
                self.val.add(self.pending)
                self.n_val_docs, self.n_train_docs = 1, self.n_train_docs - 1
            else:
                self.train.add(self.pending)
            self.pending = None
        return self.train.close(), self.val.close()

    # ------------------------------------------------------------ resume

    def save(self, build: Path, ident: dict[str, Any]) -> None:
        """Write the resume state: buffers first, then the JSON that names them (atomically)."""
        buffers = f"resume-{self.position}.npz"
        pending = self.pending if self.pending is not None else np.empty(0, dtype=self.train.dtype)
        with atomic_open(build / buffers) as f:
            np.savez(f, train=self.train.buffered_tokens(), val=self.val.buffered_tokens(), pending=pending)
        state = {
            **ident, "buffers": buffers, "has_pending": self.pending is not None, "position": self.position,
            "n_train_docs": self.n_train_docs, "n_val_docs": self.n_val_docs, "train_done": self.train_done,
            "skipped_train": self.skipped_train, "train_tokens": self.train_tokens,
            "train": {"files": self.train.files, "total": self.train.total},
            "val": {"files": self.val.files, "total": self.val.total},
        }
        write_atomic(build / _RESUME_FILE, json.dumps(state, indent=1))
        for old in build.glob("resume-*.npz"):
            if old.name != buffers:
                old.unlink(missing_ok=True)

    def restore(self, build: Path, state: dict[str, Any]) -> bool:
        """Continue from a saved state; False (self unchanged) if it cannot serve this build."""
        if state["train_done"] or state["train_tokens"] >= self.target:
            return False  # it was cut for another budget: the documents it took may differ
        try:
            for entry in state["train"]["files"] + state["val"]["files"]:
                if shards.shard_info(build / entry["file"]).n_tokens != entry["n_tokens"]:
                    return False
            with np.load(build / state["buffers"]) as saved:
                train, val, pending = saved["train"], saved["val"], saved["pending"]
        except (OSError, ValueError, KeyError):
            return False
        self.train.restore(state["train"]["files"], state["train"]["total"], train)
        self.val.restore(state["val"]["files"], state["val"]["total"], val)
        self.pending = pending.astype(self.train.dtype) if state["has_pending"] else None
        self.position, self.train_done = int(state["position"]), bool(state["train_done"])
        self.n_train_docs, self.n_val_docs = int(state["n_train_docs"]), int(state["n_val_docs"])
        self.skipped_train = bool(state["skipped_train"])
        return True


def _read_resume(build: Path, ident: dict[str, Any]) -> dict[str, Any] | None:
    try:
        state = json.loads((build / _RESUME_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict) or any(state.get(k) != v for k, v in ident.items() if k != "tokenizer"):
        return None
    return state


def _resume_summary(build: Path) -> tuple[int, int]:
    """(complete shards, documents consumed) that a rerun continues from."""
    try:
        state = json.loads((build / _RESUME_FILE).read_text(encoding="utf-8"))
        return len(state["train"]["files"]) + len(state["val"]["files"]), int(state["position"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0, 0


def _clear_except(build: Path, keep: set[str]) -> None:
    for entry in build.iterdir():
        if entry.name in keep:
            continue
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()


# ------------------------------------------------------------------ encoding


@dataclass(frozen=True)
class _EncodeSpec:
    """What an encoding task needs besides the texts (sent once to each worker)."""

    enc: tiktoken.Encoding
    bos: int
    dtype: str
    val_fraction: float


def _encode_batch(spec: _EncodeSpec, texts: list[str], drop_train: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(is_val, sizes, stream): which texts are held out, and every text as [BOS] + tokens,
    concatenated, with each one's length in it (0 for train texts when drop_train)."""
    is_val = np.fromiter((sources.is_val_doc(t, spec.val_fraction) for t in texts), dtype=bool, count=len(texts))
    arrays = [encode_array(spec.enc, t) if v or not drop_train else None for t, v in zip(texts, is_val.tolist())]
    sizes = np.fromiter((0 if a is None else len(a) + 1 for a in arrays), dtype=np.int64, count=len(arrays))
    stream = np.empty(int(sizes.sum()), dtype=spec.dtype)
    pos = 0
    for a in arrays:
        if a is not None:
            stream[pos] = spec.bos
            stream[pos + 1 : pos + 1 + len(a)] = a
            pos += 1 + len(a)
    return is_val, sizes, stream


_worker_spec: _EncodeSpec | None = None


def _init_worker(spec: _EncodeSpec) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: no worker tracebacks
    global _worker_spec
    _worker_spec = spec


def _encode_in_worker(texts: list[str], drop_train: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    assert _worker_spec is not None, "worker not initialised"
    return _encode_batch(_worker_spec, texts, drop_train)


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """Block Ctrl-C while worker processes are started. They inherit the block through
    spawn (before their own initializer could ignore it), so Ctrl-C never prints a traceback
    per worker; here a Ctrl-C that arrives meanwhile waits until the block lifts instead
    of being lost, as it was when the parent ignored SIGINT for that moment."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class _Encoder:
    """Encodes batches in `workers` processes, or with one worker in this process.
    Both run the same function, so they give the same bytes."""

    def __init__(self, spec: _EncodeSpec, workers: int):
        self.spec, self.workers = spec, workers
        self.pool: ProcessPoolExecutor | None = None
        if workers > 1:
            # spawn, not fork: the parent may run threads (torch, Arrow) that fork would copy mid-lock.
            self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_init_worker, initargs=(spec,))
            with _sigint_ignored():  # the pool starts a process per submit while none is idle
                for _ in range(workers):  # start them all now: they boot while the corpus is opened
                    self.pool.submit(int)

    @property
    def capacity(self) -> int:
        return 1 if self.workers == 1 else _IN_FLIGHT_PER_WORKER * self.workers

    def submit(self, batch: _Batch) -> Future:
        if self.workers == 1:
            done: Future = Future()
            done.set_result(_encode_batch(self.spec, batch.texts, batch.drop_train))
            return done
        assert self.pool is not None
        with _sigint_ignored():  # in case the pool replaces a process
            return self.pool.submit(_encode_in_worker, batch.texts, batch.drop_train)

    def __enter__(self) -> _Encoder:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.pool is not None:  # drop batches read ahead; wait for the running ones (one batch each)
            self.pool.shutdown(wait=True, cancel_futures=True)


def _tokenize_corpus(
    data_cfg: Any, enc: tiktoken.Encoding, state: _BuildState, workers: int, batch_chars: int,
    after_batch: Callable[[], None],
) -> bool:
    """Encode the corpus from state.position on into state's streams; True if documents remain."""
    size = sources.corpus_bytes(data_cfg)
    if size is not None and size <= batch_chars:
        workers = 1  # one batch holds the whole corpus: starting processes would only cost time
    docs = islice(_corpus(data_cfg), state.position, None)  # a resumed build skips what it has
    reader = _BatchReader(docs, state.position, batch_chars, lambda: state.train_done)
    spec = _EncodeSpec(enc, bos_id(enc), state.train.dtype.str, float(data_cfg.val_fraction))
    with _Encoder(spec, workers) as encoder:
        in_flight: deque[tuple[_Batch, Future]] = deque()
        while True:
            while len(in_flight) < encoder.capacity and (batch := reader.next_batch()) is not None:
                in_flight.append((batch, encoder.submit(batch)))
            if not in_flight:
                return False
            batch, result = in_flight.popleft()
            try:
                encoded = result.result()
            except BrokenProcessPool as e:
                raise PreparedDataError(
                    f"a tokenizer worker process died ({e}); if prepare_data runs from a script, guard the call "
                    f"with `if __name__ == '__main__':` (workers are spawned), or set data.workers=1."
                ) from e
            state.apply(batch, *encoded)
            after_batch()
            if state.finished:
                return reader.more_after(state.position - 1)


# ------------------------------------------------------------------ build


# ~60 lines: ten parameters on their own lines; the body is resume, tokenize, finish.
def _build(
    data_cfg: Any,
    tok_cfg: Any,
    n_train_tokens: int,
    build: Path,
    key: str,
    workers: int,
    shard_tokens: int,
    batch_chars: int,
    reusable_tok: tuple[Path, str] | None,
    progress: Callable[[PrepareProgress], None],
) -> dict[str, Any]:
    """Fill `build` with tokenizer, shards, stats.json and (last, marking it complete) meta.json,
    continuing from the resume state an interrupted build of the same data left there."""
    (build / "meta.json").unlink(missing_ok=True)
    ident = {"format": _RESUME_FORMAT, "key": key, "shard_tokens": shard_tokens}
    resume = _read_resume(build, ident)
    candidates = [(build / "tokenizer.json", resume["tokenizer"])] if resume else []
    candidates += [reusable_tok] if reusable_tok else []
    enc, tok_ref, train_seconds = _get_tokenizer(tok_cfg, data_cfg, build, candidates)
    keep_tok = {"tokenizer.json"} if tok_ref == "tokenizer.json" else set()
    vocab = enc.n_vocab
    shards.dtype_code_for(vocab)  # refuses vocabularies that do not fit a shard
    ident["tokenizer"] = tokenizer_fingerprint(enc)
    state = _BuildState(
        train=_ShardWriter(build, "train", vocab, shard_tokens),
        val=_ShardWriter(build, "val", vocab, shard_tokens, max_tokens=_val_tokens(data_cfg)),
        target=n_train_tokens,
    )
    resumed = resume is not None and resume.get("tokenizer") == ident["tokenizer"] and state.restore(build, resume)
    if resumed:
        log.info("continuing the interrupted preparation in %s from document %d", build, state.position)
    else:
        _clear_except(build, keep_tok)
        state.save(build, ident)  # from now on an interruption does not cost the tokenizer

    t0, start_position, start_tokens = time.perf_counter(), state.position, state.train_tokens + state.val.total
    after_batch = _progress_reporter(data_cfg, state, build, ident, n_train_tokens, progress, t0, start_tokens)
    more_docs = _tokenize_corpus(data_cfg, enc, state, workers, batch_chars, after_batch)
    seconds = time.perf_counter() - t0
    if state.position < 2:
        raise sources.DataSourceError(
            f"the corpus has {state.position} non-empty document(s); at least 2 are needed for a train and a val split."
        )
    train_files, val_files = state.close()
    if state.train.total == 0:
        raise sources.DataSourceError(
            f"every document landed in the val split; lower data.val_fraction={data_cfg.val_fraction} or add documents."
        )
    meta = _meta(data_cfg, tok_cfg, key, enc, tok_ref, n_train_tokens, state, more_docs, shard_tokens,
                 train_files, val_files)
    new_tokens = state.train.total + state.val.total - start_tokens
    stats = {
        "tokenizer_train_seconds": round(train_seconds, 3),
        "tokenize_seconds": round(seconds, 3),
        "tokens_per_second": round(new_tokens / max(seconds, 1e-9)),
        "workers": workers,
        "resumed_at_doc": start_position if resumed else None,
    }
    # The resume state goes before meta.json appears: a complete dir never carries one.
    (build / _RESUME_FILE).unlink()
    _clear_except(build, keep_tok | {e["file"] for e in train_files + val_files})
    (build / "stats.json").write_text(json.dumps(stats, indent=2), encoding="utf-8")
    (build / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return meta


def _progress_reporter(data_cfg: Any, state: "_BuildState", build: Path, ident: dict, n_train_tokens: int,
                       progress: Callable[[PrepareProgress], None], t0: float, start_tokens: int) -> Callable[[], None]:
    """What runs after each tokenized batch: the resume state is saved when a shard was
    written (each save is a file), and ``progress`` gets a snapshot whose ETA counts from
    where this session started (a resumed build's earlier work is not this session's speed)."""
    total_docs = sources.count_documents(data_cfg, SHUFFLE_SEED)
    saved_shards = state.shards_done

    def snapshot(start_fraction: float) -> PrepareProgress:
        return PrepareProgress(
            docs=state.position, train_tokens=state.train_tokens, val_tokens=state.val.total,
            target_tokens=n_train_tokens, shards_done=state.shards_done, seconds=time.perf_counter() - t0,
            new_tokens=state.train_tokens + state.val.total - start_tokens, total_docs=total_docs,
            train_done=state.train_done, start_fraction=start_fraction,
        )

    start_fraction = snapshot(0.0).fraction() or 0.0

    def after_batch() -> None:
        nonlocal saved_shards
        if state.shards_done > saved_shards:
            state.save(build, ident)
            saved_shards = state.shards_done
        progress(snapshot(start_fraction))

    return after_batch


def _meta(data_cfg: Any, tok_cfg: Any, key: str, enc: Any, tok_ref: str, n_train_tokens: int, state: "_BuildState",
          more_docs: bool, shard_tokens: int, train_files: list, val_files: list) -> dict[str, Any]:
    """meta.json of a finished build: what was asked for, what the corpus gave, where the shards are."""
    return {
        "format": META_FORMAT,
        "version": META_VERSION,
        "shard_format_version": shards.FORMAT_VERSION,
        "key": key,
        "source_fingerprint": sources.source_fingerprint(data_cfg),
        "source": data_cfg.source,
        "shuffle_seed": SHUFFLE_SEED,
        "tokenizer": {
            "name": str(tok_cfg.name),
            "ref": tok_ref,
            "fingerprint": tokenizer_fingerprint(enc),
            "train_chars": int(tok_cfg.train_chars) if tok_cfg.name == "bpe" else None,
        },
        "vocab_size": enc.n_vocab,
        "bos_id": bos_id(enc),
        "n_train_tokens_requested": int(n_train_tokens),
        "n_train_tokens": state.train.total,
        "n_val_tokens": state.val.total,
        "n_docs": state.position,
        "n_train_docs": state.n_train_docs,
        "n_val_docs": state.n_val_docs,
        # Exhausted: every train document of the corpus is in the train stream.
        "corpus_exhausted": not state.skipped_train and not more_docs,
        "val_fraction": float(data_cfg.val_fraction),
        "val_tokens_max": _val_tokens(data_cfg),
        "shard_tokens": shard_tokens,
        "train_shards": train_files,
        "val_shards": val_files,
    }


# ------------------------------------------------------------------ load


def _read_meta_or_none(directory: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT or meta.get("version") != META_VERSION:
        return None
    return meta


def load_prepared(directory: str | os.PathLike, check_ids: bool = True) -> PreparedData:
    """Open a prepared dir, checking meta.json, the tokenizer and every shard (header, size,
    and with check_ids that every token id is inside the vocabulary: one read of each shard)."""
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
            shard = shards.shard_info(directory / entry["file"])
            if shard.n_tokens != entry["n_tokens"] or shard.vocab_size != meta["vocab_size"]:
                raise shards.ShardError(
                    f"token shard {shard.path} does not match meta.json (tokens or vocab_size); "
                    f"delete the prepared data directory {directory} and rerun data preparation."
                )
            if check_ids:
                shards.check_token_ids(shard)
            paths.append(shard.path)
        return paths

    train_paths, val_paths = check(meta["train_shards"]), check(meta["val_shards"])
    try:
        stats = json.loads((directory / "stats.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        stats = {}  # timings only: nothing depends on them
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
        stats=stats,
    )


def main(argv: list[str] | None = None) -> None:
    """`python -m picollm.data.prepare [overrides]`: train the tokenizer and write the shards
    a run's plan needs (the speedrun's tokenizer and data stages). Reuses what exists, and
    continues what an interrupted run of it left."""
    from picollm import cli
    from picollm.config import ConfigError
    from picollm.plan import plan_from_config

    cfg = cli.parse(argv, "prepare", "usage: python -m picollm.data.prepare [overrides...]  (the same overrides as train)")
    try:
        validate_tokenizer_config(cfg.tokenizer)
        plan = plan_from_config(cfg)
        data = prepare_data(cfg.data, cfg.tokenizer, plan.stream_tokens)
        check_fits(data, plan.gpt_config().seq_len)
    except (ConfigError, ValueError, RuntimeError) as err:
        raise SystemExit(f"error: {err}")
    except PreparationInterrupted as stop:
        print(stop.sentence(), file=sys.stderr, flush=True)
        raise SystemExit(130)
    except KeyboardInterrupt:
        print("interrupted before any data was written; rerun the same command to start again.",
              file=sys.stderr, flush=True)
        raise SystemExit(130)
    state = "reused" if data.reused else "prepared"
    print(f"{state} {data.dir}: {data.n_train_tokens:,} train / {data.n_val_tokens:,} val tokens, "
          f"vocabulary {data.vocab_size}, tokenizer {data.tokenizer_ref}")


if __name__ == "__main__":
    main()
