"""Token shard files: a 64-byte header followed by the raw tokens.

Header (little-endian): magic b"PICOTOKS" | format version u32 | dtype code u32
(2 = uint16, 4 = uint32, i.e. bytes per token) | token count u64 | vocab size u64 |
32 zero bytes. Tokens are uint16 when the vocabulary fits (<= 65536), else uint32.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from picollm.files import atomic_open

MAGIC = b"PICOTOKS"
FORMAT_VERSION = 1
HEADER = struct.Struct("<8sIIQQ32x")
HEADER_SIZE = HEADER.size  # 64
DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}
MAX_VOCAB = 2**32


class PreparedDataError(ValueError):
    """A prepared dataset dir is missing, incomplete, inconsistent or too small for the run."""


class ShardError(PreparedDataError):
    """A shard file is missing, corrupt or inconsistent with its header."""


@dataclass(frozen=True)
class ShardInfo:
    path: Path
    version: int
    dtype_code: int
    n_tokens: int
    vocab_size: int

    @property
    def dtype(self) -> np.dtype:
        return DTYPES[self.dtype_code]


def dtype_code_for(vocab_size: int) -> int:
    """Bytes per token for a vocabulary: 2 if every id fits in uint16, else 4."""
    if not 0 < vocab_size <= MAX_VOCAB:
        raise ValueError(f"vocab_size={vocab_size} does not fit a uint32 shard; it must be between 1 and 2**32.")
    return 2 if vocab_size <= 2**16 else 4


def write_shard(path: str | os.PathLike, tokens: np.ndarray | list[int], vocab_size: int) -> Path:
    """Atomically write `tokens` to `path` (tmp file in the same dir, fsync, rename)."""
    path = Path(path)
    code = dtype_code_for(vocab_size)
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"shard tokens must be a 1-D array, got shape {arr.shape}.")
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
        raise ValueError(
            f"token id {int(arr.max()) if arr.max() >= vocab_size else int(arr.min())} is outside "
            f"[0, {vocab_size}); the tokenizer and vocab_size disagree."
        )
    data = np.ascontiguousarray(arr, dtype=DTYPES[code])
    with atomic_open(path, sync_dir=True) as f:
        f.write(HEADER.pack(MAGIC, FORMAT_VERSION, code, data.size, vocab_size))
        f.write(memoryview(data).cast("B"))
    return path


def _fail(path: Path, problem: str) -> ShardError:
    return ShardError(
        f"token shard {path} {problem}; delete the prepared data directory {path.parent} and rerun data preparation."
    )


def shard_info(path: str | os.PathLike) -> ShardInfo:
    """Read and check a shard's header (and that the file size matches it)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER_SIZE)
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        raise _fail(path, "does not exist") from None
    if len(raw) < HEADER_SIZE:
        raise _fail(path, f"is only {len(raw)} bytes, shorter than the {HEADER_SIZE}-byte header")
    magic, version, code, count, vocab = HEADER.unpack(raw)
    if magic != MAGIC:
        raise _fail(path, f"has magic {magic!r}, not {MAGIC!r} (not a picollm shard)")
    if version != FORMAT_VERSION:
        raise _fail(path, f"has format version {version}, this picollm reads version {FORMAT_VERSION}")
    if code not in DTYPES:
        raise _fail(path, f"has unknown token dtype code {code} (expected 2 or 4)")
    if code != dtype_code_for(max(vocab, 1)):
        raise _fail(path, f"stores {code}-byte tokens for vocab_size {vocab}, which is inconsistent")
    expected = HEADER_SIZE + count * code
    if size != expected:
        problem = f"is {size} bytes but its header promises {expected} ({count} tokens); it is truncated or corrupt"
        raise _fail(path, problem)
    return ShardInfo(path, version, code, count, vocab)


def check_token_ids(shard: ShardInfo) -> None:
    """Refuse a shard holding ids outside [0, its header's vocab_size) (one pass over the file).

    Damage there would otherwise surface as an IndexError in the embedding mid-training.
    """
    if shard.n_tokens == 0 or np.iinfo(shard.dtype).max < shard.vocab_size:
        return  # every id the dtype can hold is in the vocabulary
    top = int(read_shard(shard.path).max())
    if top >= shard.vocab_size:
        raise _fail(shard.path, f"holds token id {top}, outside its vocabulary of {shard.vocab_size} (damaged data)")


def read_shard(path: str | os.PathLike) -> np.ndarray:
    """Memory-map a shard's tokens read-only after checking its header and size."""
    shard = shard_info(path)
    if shard.n_tokens == 0:
        return np.empty(0, dtype=shard.dtype)  # mmap cannot map zero bytes
    return np.memmap(shard.path, dtype=shard.dtype, mode="r", offset=HEADER_SIZE, shape=(shard.n_tokens,))
