"""Text corpora, all read through Hugging Face `datasets`, plus the train/val split.

`cfg` is any object with the DataConfig attributes: source ("pystdlib" | "files" |
"hf"), paths, format, text_field, hf_name, hf_config, hf_split, streaming,
val_fraction, cache_dir, max_docs.

Documents come in file order, or, given a shuffle seed, in a seeded order of the whole
corpus (what data preparation uses, so a short run sees documents from all of it).
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import logging
import os
import sys
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from picollm.errors import root_cause

log = logging.getLogger(__name__)

SOURCES = ("pystdlib", "files", "hf")
FORMATS = ("auto", "text", "json", "parquet")
_EXT_FORMAT = {".json": "json", ".jsonl": "json", ".ndjson": "json", ".parquet": "parquet"}
_COMPRESSION = {".gz", ".bz2", ".xz", ".zst", ".lz4"}
_GLOB_CHARS = set("*?[")
_READ_BATCH = 256  # rows per Arrow batch: cheap iteration without holding the corpus
_SNIFF_BYTES = 8192  # enough to tell text from binary, cheap even for thousands of files
_MAX_BAD_FRACTION = 0.25  # undecodable or control characters; random bytes give ~0.5, text ~0
# Control bytes that never occur in text (tab, newlines, form feed, escape are allowed).
_CONTROL_BYTES = bytes(b for b in range(32) if b not in b"\t\n\v\f\r\x1b") + b"\x7f"
HF_SHUFFLE_BUFFER = 10_000  # documents held by the streamed-source shuffle buffer


class DataSourceError(ValueError):
    """The configured corpus cannot be found or read."""


# ----------------------------------------------------------------- validation


def validate_source(cfg: Any) -> None:
    """Cheap up-front checks (no network; local files: their first few KB): raise DataSourceError if unusable."""
    if cfg.source not in SOURCES:
        raise DataSourceError(f"data.source={cfg.source!r} is unknown; use one of {', '.join(SOURCES)}.")
    if not 0.0 < float(cfg.val_fraction) < 1.0:
        raise DataSourceError(f"data.val_fraction={cfg.val_fraction} must be strictly between 0 and 1.")
    if cfg.max_docs is not None and int(cfg.max_docs) < 2:
        raise DataSourceError(
            f"data.max_docs={cfg.max_docs} leaves no room for a validation split; use at least 2 or null."
        )
    if cfg.source == "files":
        usable_files(cfg)
    elif cfg.source == "hf" and not cfg.hf_name:
        raise DataSourceError("data.source=hf needs data.hf_name (e.g. HuggingFaceFW/fineweb-edu).")


def resolve_files(cfg: Any) -> tuple[str, list[Path]]:
    """Expand data.paths (files, globs, dirs) into a sorted file list and its format."""
    if cfg.format not in FORMATS:
        raise DataSourceError(f"data.format={cfg.format!r} is unknown; use one of {', '.join(FORMATS)}.")
    paths = [cfg.paths] if isinstance(cfg.paths, (str, os.PathLike)) else list(cfg.paths or [])
    if not paths:
        raise DataSourceError(
            "data.source=files needs data.paths; point it at .txt/.jsonl/.parquet files, globs or dirs."
        )
    files: list[Path] = []
    for raw in paths:
        p = os.path.expanduser(str(raw))
        if _GLOB_CHARS & set(p):
            matches = [Path(m) for m in sorted(glob.glob(p, recursive=True)) if Path(m).is_file()]
            if not matches:
                raise DataSourceError(f"data.paths: glob {p} matches no files; fix the pattern or the directory.")
            files += matches
        elif Path(p).is_dir():
            found = sorted(f for f in Path(p).rglob("*") if f.is_file() and not _hidden(f, Path(p)))
            if not found:
                raise DataSourceError(
                    f"data.paths: directory {p} contains no files; put .txt/.jsonl/.parquet files in it."
                )
            files += found
        elif Path(p).is_file():
            files.append(Path(p))
        else:
            raise DataSourceError(
                f"data.paths: no such file: {p}; point data.paths at existing .txt/.jsonl/.parquet files."
            )
    files = list(dict.fromkeys(f.resolve() for f in files))  # dedupe, keep order
    return _file_format(cfg.format, files), files


def usable_files(cfg: Any) -> tuple[str, list[Path]]:
    """resolve_files without the files that cannot be documents (empty, binary, not UTF-8).

    Skipping binary files is warned about once (naming them); if nothing usable is left,
    one DataSourceError names the problem of each file.
    """
    fmt, files = resolve_files(cfg)
    problems = {f: p for f in files if (p := file_problem(f, fmt)) is not None}
    kept = [f for f in files if f not in problems]
    if not kept:
        if len(files) == 1:
            raise DataSourceError(f"data.paths: {files[0]} {problems[files[0]]}; {_FILES_FIX}")
        raise DataSourceError(
            f"data.paths: none of the {len(files)} files is usable ({_describe(problems)}); {_FILES_FIX}"
        )
    skipped = {f: p for f, p in problems.items() if p != _EMPTY}  # empty files add nothing anyway
    if skipped:
        _warn_once(
            f"skipping {len(skipped)} of {len(files)} files in data.paths that are not text: {_describe(skipped)}"
        )
    return fmt, kept


_EMPTY = "is empty"
_FILES_FIX = "point data.paths at UTF-8 text, .jsonl or .parquet files."
_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:  # validation and loading both screen the files
        _warned.add(message)
        log.warning(message)


def _describe(problems: dict[Path, str], show: int = 3) -> str:
    parts = [f"{f} {p}" for f, p in list(problems.items())[:show]]
    if len(problems) > show:
        parts.append(f"and {len(problems) - show} more")
    return ", ".join(parts)


def file_problem(path: Path, fmt: str) -> str | None:
    """Why `path` cannot hold documents of format `fmt` (judged from its first bytes), or None."""
    st = os.stat(path)
    return _sniff(str(path), fmt, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=65536)
def _sniff(path: str, fmt: str, size: int, mtime_ns: int) -> str | None:
    # size and mtime are part of the cache key: a rewritten file is sniffed again.
    if size == 0:
        return _EMPTY
    if Path(path).suffix.lower() in _COMPRESSION:
        return None  # datasets decompresses these; their raw bytes say nothing
    with open(path, "rb") as f:
        head = f.read(_SNIFF_BYTES)
    if fmt == "parquet":
        return None if head[:4] == b"PAR1" else "is not a parquet file (no PAR1 magic bytes)"
    if b"\0" in head:
        return "is binary (it contains NUL bytes)"
    text = head.decode("utf-8", errors="replace")
    bad = text.count("\ufffd") + len(head) - len(head.translate(None, _CONTROL_BYTES))
    if bad > _MAX_BAD_FRACTION * len(text):
        return f"is not UTF-8 text ({bad / len(text):.0%} of its first characters are undecodable or control bytes)"
    return None


def _hidden(f: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in f.relative_to(root).parts)


def _file_format(fmt: str, files: list[Path]) -> str:
    if fmt != "auto":
        return fmt
    kinds = set()
    for f in files:
        suffixes = [s.lower() for s in f.suffixes]
        while suffixes and suffixes[-1] in _COMPRESSION:
            suffixes.pop()
        kinds.add(_EXT_FORMAT.get(suffixes[-1] if suffixes else "", "text"))
    if len(kinds) > 1:
        raise DataSourceError(
            f"data.paths mixes formats ({', '.join(sorted(kinds))}); use files of one format or set data.format."
        )
    return kinds.pop()


# -------------------------------------------------------------------- loading


def pystdlib_files() -> tuple[Path, list[Path]]:
    """The running Python's standard library .py files (site-packages excluded), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    rel: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Prune while walking: site-packages can hold 10x more files than the stdlib.
        dirnames[:] = [d for d in dirnames if d not in ("site-packages", "__pycache__")]
        base = Path(dirpath).relative_to(root)
        rel += [(base / f).as_posix() for f in filenames if f.endswith(".py")]
    return root, [root / r for r in sorted(rel)]


def load_corpus(cfg: Any, shuffle_seed: int | None = None):
    """The configured corpus as a `datasets.Dataset` or `IterableDataset` (with the text column).

    With `shuffle_seed`, the documents come in a seeded order of the whole corpus: local
    sources (pystdlib, files) are shuffled completely, a streamed Hugging Face dataset with
    a seeded buffer (see `_shuffled`).
    """
    validate_source(cfg)
    import datasets

    if cfg.source == "pystdlib":
        root, names = _pystdlib_names(shuffle_seed)
        texts = [(root / n).read_text(encoding="utf-8", errors="replace") for n in names]
        return datasets.Dataset.from_dict({"text": texts, "path": names})
    if cfg.source == "files":
        fmt, files = usable_files(cfg)
        streaming = bool(cfg.streaming)
        if shuffle_seed is not None:
            files = [files[i] for i in hash_order([str(f) for f in files], shuffle_seed)]
            # Rows of json/parquet files are shuffled across files, which needs random access:
            # datasets converts them once to an Arrow cache beside our prepared data.
            streaming = streaming and fmt == "text"
        # Text files: one document per file; undecodable bytes become U+FFFD like pystdlib.
        kwargs: dict[str, Any] = {"sample_by": "document", "encoding_errors": "replace"} if fmt == "text" else {}
        # Keep datasets' Arrow copies and lock files beside our prepared data, not in ~/.cache.
        kwargs["cache_dir"] = str(Path(cfg.cache_dir).expanduser() / "hf_datasets")
        try:
            ds = datasets.load_dataset(
                fmt, data_files=[str(f) for f in files], split="train", streaming=streaming, **kwargs
            )
        except Exception as e:
            raise DataSourceError(
                f"could not read data.paths as {fmt} ({root_cause(e)}); check the files or set data.format."
            ) from e
        return ds if shuffle_seed is None or fmt == "text" else _shuffled(ds, shuffle_seed)
    try:
        ds = datasets.load_dataset(cfg.hf_name, cfg.hf_config, split=cfg.hf_split, streaming=bool(cfg.streaming))
    except datasets.exceptions.DatasetNotFoundError as e:
        raise DataSourceError(
            f"Hugging Face dataset {cfg.hf_name!r} was not found (or is gated); check data.hf_name, "
            f"or log in with `hf auth login` if it is private."
        ) from e
    except ConnectionError as e:
        raise DataSourceError(
            f"could not reach the Hugging Face Hub for {cfg.hf_name!r} ({e}); connect to the network, "
            f"or use a non-streaming copy already in the local cache with HF_DATASETS_OFFLINE=1."
        ) from e
    except (ValueError, FileNotFoundError) as e:  # bad config name / split, missing files
        raise DataSourceError(
            f"could not load Hugging Face dataset {cfg.hf_name!r} (config={cfg.hf_config!r}, "
            f"split={cfg.hf_split!r}): {e}; fix data.hf_config / data.hf_split."
        ) from e
    return ds if shuffle_seed is None else _shuffled(ds, shuffle_seed)


def _shuffled(ds: Any, seed: int) -> Any:
    """`ds` in a seeded order: a full permutation of a map-style Dataset; for a streamed
    IterableDataset (too large to hold) datasets' shard-order shuffle plus a seeded buffer
    of HF_SHUFFLE_BUFFER documents, which mixes locally only but needs no random access."""
    if hasattr(ds, "select") and hasattr(ds, "__len__"):
        return ds.select(hash_order(range(len(ds)), seed))
    return ds.shuffle(seed=seed, buffer_size=HF_SHUFFLE_BUFFER)


def hash_order(keys: Sequence[Any], seed: int) -> np.ndarray:
    """A seeded permutation of range(len(keys)), derived only from the keys' text and the seed.

    Unlike an RNG's permutation it is the same on every Python/numpy version, and an item
    keeps its relative place when others are added or removed.
    """
    if isinstance(keys, range):  # row numbers: a vectorised integer hash (splitmix64)
        with np.errstate(over="ignore"):
            z = np.arange(len(keys), dtype=np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15) % 2**64)
            z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            z = z ^ (z >> np.uint64(31))
        return np.argsort(z, kind="stable")
    digests = [hashlib.blake2b(f"{seed}\0{k}".encode("utf-8", "surrogatepass"), digest_size=8).digest() for k in keys]
    return np.array(sorted(range(len(keys)), key=digests.__getitem__), dtype=np.int64)


def corpus_bytes(cfg: Any) -> int | None:
    """An upper bound on the corpus' characters (its file sizes), when known without reading it."""
    if cfg.source == "pystdlib":
        return sum(os.stat(f).st_size for f in pystdlib_files()[1])
    if cfg.source == "files":
        fmt, files = usable_files(cfg)
        if fmt != "parquet" and not any(f.suffix.lower() in _COMPRESSION for f in files):
            return sum(os.stat(f).st_size for f in files)
    return None


def count_documents(cfg: Any, shuffle_seed: int | None = None) -> int | None:
    """How many documents iter_documents(cfg, shuffle_seed) yields at most, when known
    without reading them (not for a streamed Hugging Face dataset)."""
    if cfg.source == "pystdlib":
        n: int | None = len(pystdlib_files()[1])
    elif cfg.source == "files" and usable_files(cfg)[0] == "text":
        n = len(usable_files(cfg)[1])
    elif cfg.source == "hf" and cfg.streaming:
        n = None
    else:  # a map-style Dataset knows its rows (datasets caches it, so iterating loads it again cheaply)
        ds = load_corpus(cfg, shuffle_seed)
        n = len(ds) if hasattr(ds, "__len__") else None
    if cfg.max_docs is not None:
        n = int(cfg.max_docs) if n is None else min(n, int(cfg.max_docs))
    return n


def _text_column(cfg: Any) -> str:
    return "text" if cfg.source == "pystdlib" else cfg.text_field


def _pystdlib_names(shuffle_seed: int | None) -> tuple[Path, list[str]]:
    root, files = pystdlib_files()
    names = [f.relative_to(root).as_posix() for f in files]
    if shuffle_seed is not None:  # one document per file: shuffling files shuffles documents
        names = [names[i] for i in hash_order(names, shuffle_seed)]
    return root, names


def _pystdlib_batches(shuffle_seed: int | None) -> Iterator[list[str]]:
    # Read file by file: no Arrow copy of the whole library before the first document.
    root, names = _pystdlib_names(shuffle_seed)
    for i in range(0, len(names), _READ_BATCH):
        yield [(root / n).read_text(encoding="utf-8", errors="replace") for n in names[i : i + _READ_BATCH]]


def iter_documents(cfg: Any, shuffle_seed: int | None = None) -> Iterator[str]:
    """Every non-empty document of the corpus (up to data.max_docs): in file order, or in
    the seeded order of the whole corpus given `shuffle_seed` (max_docs then samples it).
    The same documents in the same order as load_corpus(cfg, shuffle_seed)."""
    if cfg.source == "pystdlib":
        validate_source(cfg)
        batches, field = _pystdlib_batches(shuffle_seed), "text"
    else:
        ds = load_corpus(cfg, shuffle_seed)
        field = _text_column(cfg)
        batches = _guarded(cfg, _text_batches(ds, field))
    remaining = None if cfg.max_docs is None else int(cfg.max_docs)
    for texts in batches:
        for text in texts:
            if not text:  # empty docs would add only a separator
                continue
            if not isinstance(text, str):
                raise DataSourceError(
                    f"data.text_field={field!r} holds {type(text).__name__}, not text; pick a string column."
                )
            yield text
            if remaining is not None:
                remaining -= 1
                if remaining == 0:
                    return


def _text_batches(ds: Any, field: str) -> Iterator[list]:
    columns = ds.column_names
    if columns is None:  # streaming datasets may not know their columns until read
        first = next(iter(ds), None)
        columns = list(first) if first is not None else [field]
    if field not in columns:
        raise DataSourceError(
            f"data.text_field={field!r} is not a column of the corpus; available columns: {', '.join(columns)}."
        )
    for batch in ds.select_columns([field]).iter(batch_size=_READ_BATCH):
        yield batch[field]


def _guarded(cfg: Any, batches: Iterator[list]) -> Iterator[list]:
    """Re-raise read errors as one DataSourceError: streaming sources only fail once read."""
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except DataSourceError:
            raise
        except Exception as e:
            raise DataSourceError(
                f"reading data.source={cfg.source} failed ({root_cause(e)}); fix or remove the bad input."
            ) from e
        yield batch


# ---------------------------------------------------------------- val split


def doc_hash01(text: str) -> float:
    """A stable pseudo-random number in [0, 1) derived from the document's text."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def is_val_doc(text: str, val_fraction: float) -> bool:
    """A document is validation iff its text hash falls below val_fraction.

    Hashing the text (not the position) makes the split independent of corpus order
    and sends identical duplicates to the same side, so no text is in both splits.
    """
    return doc_hash01(text) < val_fraction


# -------------------------------------------------------------- fingerprint


def source_fingerprint(cfg: Any) -> str:
    """sha256 identifying the corpus and split settings (not the tokenizer)."""
    ident: dict[str, Any] = {
        "source": cfg.source,
        "val_fraction": float(cfg.val_fraction),
        "max_docs": cfg.max_docs,
    }
    if cfg.source == "pystdlib":
        root, files = pystdlib_files()
        ident["python"] = sys.version
        ident["stdlib"] = str(root)
        ident["files"] = [len(files), sum(os.stat(f).st_size for f in files)]
    elif cfg.source == "files":
        fmt, files = resolve_files(cfg)
        ident["format"] = fmt
        ident["text_field"] = cfg.text_field
        stats = [os.stat(f) for f in files]
        ident["files"] = [[str(f), st.st_size, st.st_mtime_ns] for f, st in zip(files, stats)]
    else:
        validate_source(cfg)
        ident.update(name=cfg.hf_name, config=cfg.hf_config, split=cfg.hf_split, text_field=cfg.text_field)
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def source_label(cfg: Any) -> str:
    """A short human-readable name for directory names, e.g. 'fineweb-edu' or 'pystdlib'."""
    if cfg.source == "hf":
        label = str(cfg.hf_name).rstrip("/").split("/")[-1]
    elif cfg.source == "files":
        paths = [cfg.paths] if isinstance(cfg.paths, (str, os.PathLike)) else list(cfg.paths)
        label = Path(str(paths[0]).split("*")[0].rstrip("/")).name.split(".")[0] or "files"
    else:
        label = "pystdlib"
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in label)[:40] or "data"
