"""Data pipeline: shards, sources, the val split, preparation and the packed loaders."""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import dataclasses

import numpy as np
import pytest
import torch

from picollm.data import prepare, shards, sources
from picollm.data.loader import PackedLoader, TokenStream, ValLoader
from picollm.data.prepare import (
    PreparationInterrupted,
    PreparedDataError,
    PrepareProgress,
    ProgressPrinter,
    check_fits,
    load_prepared,
    prepare_data,
)
from picollm.data.shards import HEADER_SIZE, ShardError, read_shard, shard_info, write_shard
from picollm.data.sources import DataSourceError, is_val_doc, iter_documents
from picollm.tokenizer import bos_id


def split_documents(docs: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """(train, val) by `is_val_doc`, with prepare's fallback: if val would be empty the last
    train doc moves to val, so val is never empty once there are two documents."""
    train = [d for d in docs if not is_val_doc(d, val_fraction)]
    val = [d for d in docs if is_val_doc(d, val_fraction)]
    if not val and len(train) >= 2:
        val.append(train.pop())
    return train, val


def epochs_for(loader: PackedLoader, steps: int) -> float:
    """How many passes over the train stream `steps` optimizer steps of `loader` make."""
    return steps * loader.global_batch / loader.n_sequences


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach the network: force Hugging Face offline mode."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)


def data_cfg(tmp_path: Path, **overrides: Any) -> SimpleNamespace:
    cfg = dict(
        source="files", paths=[], format="auto", text_field="text", hf_name=None, hf_config=None,
        hf_split="train", streaming=True, val_fraction=0.05, cache_dir=str(tmp_path / "cache"), max_docs=None,
    )
    cfg.update(overrides)
    return SimpleNamespace(**cfg)


def tok_cfg(**overrides: Any) -> SimpleNamespace:
    return SimpleNamespace(**{"name": "bpe", "vocab_size": 320, "train_chars": 100_000, **overrides})


WORDS = "the of model token data loss scale compute chinchilla über naïve 数据 😀 12 345 def return".split()


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(20, 120))]
        docs.append(f"doc {i}: " + " ".join(words) + ("\n\n  indented\r\n" if i % 3 == 0 else "."))
    return docs


def write_jsonl(path: Path, docs: list[str]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": i, "text": d}) + "\n")
    return path


# ===================================================================== shards


@pytest.mark.parametrize("vocab,dtype", [(1000, np.uint16), (65536, np.uint16), (70_000, np.uint32)])
def test_shard_round_trip(tmp_path: Path, vocab: int, dtype: type) -> None:
    tokens = np.array([0, 1, vocab - 1, 5, vocab // 2] * 7, dtype=np.int64)
    path = write_shard(tmp_path / "s.bin", tokens, vocab)
    data = read_shard(path)
    assert data.dtype == dtype and np.array_equal(data, tokens)
    info = shard_info(path)
    assert (info.n_tokens, info.vocab_size, info.version) == (35, vocab, shards.FORMAT_VERSION)
    assert info.dtype_code == np.dtype(dtype).itemsize
    assert path.stat().st_size == HEADER_SIZE + 35 * np.dtype(dtype).itemsize
    assert os.listdir(tmp_path) == ["s.bin"]  # atomic write leaves no temp file
    with pytest.raises(ValueError):
        data[0] = 1  # read-only


def test_empty_shard(tmp_path: Path) -> None:
    write_shard(tmp_path / "e.bin", [], 300)
    assert len(read_shard(tmp_path / "e.bin")) == 0


def _corrupt(path: Path, offset: int, payload: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(payload)] = payload
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda p: _corrupt(p, 0, b"NOTTOKS!"), "magic"),
        (lambda p: _corrupt(p, 8, (99).to_bytes(4, "little")), "format version 99"),
        (lambda p: _corrupt(p, 12, (3).to_bytes(4, "little")), "dtype code 3"),
        (lambda p: p.write_bytes(p.read_bytes()[:-2]), "truncated"),
        (lambda p: p.write_bytes(p.read_bytes() + b"\0\0"), "truncated or corrupt"),
        (lambda p: p.write_bytes(p.read_bytes()[:10]), "shorter than"),
        (lambda p: p.unlink(), "does not exist"),
    ],
)
def test_bad_shards_are_refused(tmp_path: Path, damage: Any, message: str) -> None:
    path = write_shard(tmp_path / "train_000.bin", np.arange(100), 1000)
    damage(path)
    with pytest.raises(ShardError, match=message) as err:
        read_shard(path)
    assert str(path) in str(err.value) and "rerun data preparation" in str(err.value)


def test_out_of_range_tokens_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="outside"):
        write_shard(tmp_path / "s.bin", [1, 2, 300], 300)
    with pytest.raises(ValueError, match="outside"):
        write_shard(tmp_path / "s.bin", [-1, 2], 300)
    with pytest.raises(ValueError, match="2\\*\\*32"):
        write_shard(tmp_path / "s.bin", [1], 2**32 + 1)
    assert os.listdir(tmp_path) == []


def test_failed_write_keeps_old_shard_and_leaves_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_shard(tmp_path / "s.bin", [1, 2, 3], 300)

    def boom(src: Any, dst: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(shards.os, "replace", boom)
    with pytest.raises(OSError):
        write_shard(path, [7, 7, 7, 7], 300)
    assert os.listdir(tmp_path) == ["s.bin"]
    assert list(read_shard(path)) == [1, 2, 3]


# ==================================================================== sources


def test_pystdlib_yields_python_files(tmp_path: Path) -> None:
    cfg = data_cfg(tmp_path, source="pystdlib", max_docs=5)
    sources.validate_source(cfg)
    docs = list(iter_documents(cfg))
    assert len(docs) == 5 and all(isinstance(d, str) and d for d in docs)
    root, files = sources.pystdlib_files()
    assert len(files) > 500 and all("site-packages" not in f.parts for f in files)
    assert files == sorted(files, key=lambda f: f.relative_to(root).as_posix())
    assert sources.source_fingerprint(cfg) == sources.source_fingerprint(cfg)


def test_text_files_are_one_document_per_file(tmp_path: Path) -> None:
    texts = ["first doc\nwith two lines\n", "second doc", "third\n\n\ndoc with blank lines\n"]
    for i, t in enumerate(texts):
        (tmp_path / f"{i}.txt").write_text(t)
    cfg = data_cfg(tmp_path, paths=[str(tmp_path / "*.txt")])
    assert list(iter_documents(cfg)) == texts
    by_dir = data_cfg(tmp_path, paths=[str(tmp_path)], format="text")
    assert list(iter_documents(by_dir)) == texts


@pytest.mark.parametrize("streaming", [True, False])
def test_jsonl_and_parquet_files(tmp_path: Path, streaming: bool) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = make_docs(30)
    write_jsonl(tmp_path / "a.jsonl", docs[:20])
    pq.write_table(pa.table({"body": docs[20:], "n": list(range(10))}), tmp_path / "b.parquet")
    cfg = data_cfg(tmp_path, paths=[str(tmp_path / "a.jsonl")], streaming=streaming)
    assert list(iter_documents(cfg)) == docs[:20]
    cfg = data_cfg(tmp_path, paths=[str(tmp_path / "b.parquet")], text_field="body", streaming=streaming)
    assert list(iter_documents(cfg)) == docs[20:]
    cfg.max_docs = 4
    assert list(iter_documents(cfg)) == docs[20:24]


def test_missing_text_field_lists_columns(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", ["x", "y"])
    cfg = data_cfg(tmp_path, paths=[str(tmp_path / "a.jsonl")], text_field="content")
    with pytest.raises(DataSourceError, match="'content'.*available columns: id, text"):
        list(iter_documents(cfg))


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(source="web"), "data.source='web' is unknown"),
        (dict(paths=["/nope/missing.txt"]), "no such file: /nope/missing.txt"),
        (dict(paths=["/nope/*.jsonl"]), "matches no files"),
        (dict(paths=[]), "needs data.paths"),
        (dict(format="csv", paths=["{tmp}/a.jsonl"]), "data.format='csv' is unknown"),
        (dict(paths=["{tmp}/a.jsonl", "{tmp}/b.txt"]), "mixes formats"),
        (dict(source="hf", hf_name=None), "needs data.hf_name"),
        (dict(val_fraction=0.0), "val_fraction"),
    ],
)
def test_validate_source_errors(tmp_path: Path, overrides: dict[str, Any], message: str) -> None:
    write_jsonl(tmp_path / "a.jsonl", ["x"])
    (tmp_path / "b.txt").write_text("y")
    overrides = {k: [p.format(tmp=tmp_path) for p in v] if k == "paths" else v for k, v in overrides.items()}
    with pytest.raises(DataSourceError, match=message):
        sources.validate_source(data_cfg(tmp_path, **overrides))


def test_unknown_hf_dataset_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def not_found(*args: Any, **kwargs: Any) -> None:
        raise datasets.exceptions.DatasetNotFoundError("Dataset 'nobody/nothing' doesn't exist on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", not_found)  # never touch the network
    cfg = data_cfg(tmp_path, source="hf", hf_name="nobody/nothing")
    with pytest.raises(DataSourceError, match="'nobody/nothing' was not found"):
        list(iter_documents(cfg))


def test_hf_source_reads_the_configured_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls = []

    def fake_load(name: str, config: Any, split: str, streaming: bool) -> Any:
        calls.append((name, config, split, streaming))
        return datasets.Dataset.from_dict({"content": ["a", "", "b"], "url": ["u1", "u2", "u3"]}).to_iterable_dataset()

    monkeypatch.setattr(datasets, "load_dataset", fake_load)  # stands in for the Hub
    cfg = data_cfg(tmp_path, source="hf", hf_name="org/corpus", hf_config="sample", text_field="content")
    assert list(iter_documents(cfg)) == ["a", "b"]  # empty documents are skipped
    assert calls[0] == ("org/corpus", "sample", "train", True)


@pytest.mark.parametrize("streaming", [True, False])
def test_hf_corpus_is_shuffled_with_a_seed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, streaming: bool) -> None:
    import datasets

    docs = [f"document {i}" for i in range(500)]

    def fake_load(name: str, config: Any, split: str, streaming: bool) -> Any:
        ds = datasets.Dataset.from_dict({"text": docs})
        return ds.to_iterable_dataset(num_shards=4) if streaming else ds

    monkeypatch.setattr(datasets, "load_dataset", fake_load)  # stands in for the Hub
    cfg = data_cfg(tmp_path, source="hf", hf_name="org/corpus", streaming=streaming)
    shuffled = list(iter_documents(cfg, shuffle_seed=0))
    assert sorted(shuffled) == sorted(docs) and shuffled != docs
    assert shuffled == list(iter_documents(cfg, shuffle_seed=0))  # seeded: every build reads the same order
    assert list(iter_documents(cfg)) == docs


def test_unreadable_files_give_clear_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{broken json\n')
    with pytest.raises(DataSourceError, match="reading data.source=files failed"):
        list(iter_documents(data_cfg(tmp_path, paths=[str(bad)])))
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"caf\xe9\n")  # not UTF-8: decoded with replacement, like pystdlib
    assert list(iter_documents(data_cfg(tmp_path, paths=[str(latin)]))) == ["caf\ufffd\n"]


def _noise(n: int, seed: int, nul: bool) -> bytes:
    rng = random.Random(seed)
    return bytes(rng.randrange(0 if nul else 1, 256) for _ in range(n))


def test_empty_binary_and_random_files_are_refused_before_any_work(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    program = tmp_path / "program"
    shutil.copy(sys.executable, program)  # a real executable, passed as if it were text
    noise = tmp_path / "noise.txt"
    noise.write_bytes(_noise(5000, 0, nul=False))  # no NUL byte: judged by how much of it decodes
    random_dir = tmp_path / "random"
    random_dir.mkdir()
    for i in range(3):
        (random_dir / f"r{i}.txt").write_bytes(_noise(5000, i, nul=True))
    cases = [
        (empty, f"data.paths: {empty} is empty; point data.paths at UTF-8 text"),
        (program, "is binary \\(it contains NUL bytes\\)"),
        (noise, "is not UTF-8 text \\(\\d+% of its first characters are undecodable or control bytes\\)"),
        (random_dir, "none of the 3 files is usable \\(.*r0.txt is binary.*r1.txt.*r2.txt"),
    ]
    for path, message in cases:
        cfg = data_cfg(tmp_path, paths=[str(path)])
        with pytest.raises(DataSourceError, match=message):
            prepare_data(cfg, tok_cfg(), n_train_tokens=1000)
    assert not Path(cfg.cache_dir).exists()  # refused before writing anything


def test_non_text_files_among_text_are_skipped_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    texts = [d.replace("\r", "") for d in make_docs(4)]  # text files are read with universal newlines
    for i, text in enumerate(texts):
        (corpus / f"doc{i}.txt").write_text(text)
    (corpus / "blob.txt").write_bytes(_noise(3000, 1, nul=True))
    (corpus / "noise.txt").write_bytes(_noise(3000, 2, nul=False))
    (corpus / "latin1.txt").write_bytes("café crème brûlée, a latin-1 file\n".encode("latin-1"))
    cfg = data_cfg(tmp_path, paths=[str(corpus)])
    with caplog.at_level(logging.WARNING, logger="picollm.data.sources"):
        sources.validate_source(cfg)
        docs = list(iter_documents(cfg))
    assert sorted(docs) == sorted(texts + ["caf\ufffd cr\ufffdme br\ufffdl\ufffde, a latin-1 file\n"])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings  # validation and loading screen the files; one warning
    assert "skipping 2 of 7 files" in warnings[0] and "blob.txt is binary" in warnings[0]
    assert "noise.txt is not UTF-8 text" in warnings[0]


def test_shuffled_order_is_seeded_and_spans_the_corpus(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(200):
        (corpus / f"f{i:03d}.txt").write_text(f"file {i} " + make_docs(1, seed=i)[0])
    cfg = data_cfg(tmp_path, paths=[str(corpus)])
    in_order = list(iter_documents(cfg))
    shuffled = list(iter_documents(cfg, shuffle_seed=0))
    assert [int(d.split()[1]) for d in in_order] == list(range(200))
    assert sorted(shuffled) == sorted(in_order) and shuffled != in_order
    assert shuffled == list(iter_documents(cfg, shuffle_seed=0)) != list(iter_documents(cfg, shuffle_seed=1))
    first = [int(d.split()[1]) for d in shuffled[:20]]
    assert max(first) >= 150 and sum(i >= 100 for i in first) >= 5  # drawn from the whole corpus
    cfg.max_docs = 20  # max_docs samples the shuffled corpus
    assert list(iter_documents(cfg, shuffle_seed=0)) == shuffled[:20]


@pytest.mark.parametrize("streaming", [True, False])
def test_shuffle_mixes_rows_of_one_jsonl_file(tmp_path: Path, streaming: bool) -> None:
    docs = make_docs(100)
    cfg = data_cfg(tmp_path, paths=[str(write_jsonl(tmp_path / "a.jsonl", docs))], streaming=streaming)
    shuffled = list(iter_documents(cfg, shuffle_seed=0))
    assert sorted(shuffled) == sorted(docs)
    assert sum(docs.index(d) >= 50 for d in shuffled[:10]) >= 3  # not just a local mix of the first rows


def test_pystdlib_shuffle_reads_from_all_of_the_library(tmp_path: Path) -> None:
    root, files = sources.pystdlib_files()
    paths = sources.load_corpus(data_cfg(tmp_path, source="pystdlib"), shuffle_seed=0)["path"]
    assert sorted(paths) == sorted(f.relative_to(root).as_posix() for f in files)
    rank = {p: i for i, p in enumerate(sorted(paths))}
    first = [rank[p] for p in paths[:30]]
    assert max(first) > 0.8 * len(files) and min(first) < 0.2 * len(files)
    # iter_documents reads the files one by one, in the same order as load_corpus.
    docs = list(iter_documents(data_cfg(tmp_path, source="pystdlib", max_docs=5), shuffle_seed=0))
    texts = [(root / p).read_text(encoding="utf-8", errors="replace") for p in paths[:50]]
    assert docs == [t for t in texts if t][:5]  # empty files (some __init__.py) are no documents


def test_hash_order_is_a_fixed_permutation() -> None:
    # Fixed values: the corpus order may not change with the Python or numpy version.
    assert sources.hash_order(range(8), 0).tolist() == [0, 7, 3, 1, 5, 4, 6, 2]
    assert sources.hash_order(["a", "b", "c", "d"], 0).tolist() == [2, 3, 0, 1]
    assert sorted(sources.hash_order(range(1000), 5).tolist()) == list(range(1000))


def test_val_split_is_by_document_and_deterministic() -> None:
    docs = make_docs(2000)
    train, val = split_documents(docs, 0.1)
    assert (train, val) == split_documents(docs, 0.1)
    assert not set(train) & set(val) and len(train) + len(val) == len(docs)
    assert 0.07 < len(val) / len(docs) < 0.13
    # Order-independent (hash of the text, not the position); duplicates stay together.
    shuffled = docs[::-1] + docs[:50]
    _, val2 = split_documents(shuffled, 0.1)
    assert set(val2) == set(val)
    assert all(is_val_doc(d, 0.1) == (d in set(val)) for d in docs[:50])


def test_val_split_never_empty_with_two_docs() -> None:
    docs = ["alpha", "beta"]
    train, val = split_documents(docs, 1e-9)
    assert len(train) == 1 and len(val) == 1


def test_source_fingerprint_tracks_files_and_settings(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", ["one", "two"])
    cfg = data_cfg(tmp_path, paths=[str(path)])
    fp = sources.source_fingerprint(cfg)
    assert fp == sources.source_fingerprint(data_cfg(tmp_path, paths=[str(path)]))
    assert fp != sources.source_fingerprint(data_cfg(tmp_path, paths=[str(path)], val_fraction=0.1))
    write_jsonl(path, ["one", "two", "three"])
    assert fp != sources.source_fingerprint(cfg)


# ==================================================================== prepare


@pytest.fixture()
def corpus_cfg(tmp_path: Path) -> SimpleNamespace:
    path = write_jsonl(tmp_path / "docs.jsonl", make_docs(300))
    return data_cfg(tmp_path, paths=[str(path)], val_fraction=0.1)


def _split_docs(stream: np.ndarray, bos: int) -> list[np.ndarray]:
    starts = np.flatnonzero(stream == bos)
    assert len(stream) and starts[0] == 0, "the stream must start with BOS"
    return np.split(stream, starts[1:])


def _stream(paths: list[Path]) -> np.ndarray:
    return np.concatenate([np.asarray(read_shard(p)) for p in paths])


def test_prepare_full_corpus_round_trips(corpus_cfg: SimpleNamespace) -> None:
    p = prepare_data(corpus_cfg, tok_cfg(), n_train_tokens=10**9, shard_tokens=5000)
    docs = list(iter_documents(corpus_cfg, shuffle_seed=prepare.SHUFFLE_SEED))  # the order prepare reads
    assert sorted(docs) == sorted(iter_documents(corpus_cfg)) and docs != list(iter_documents(corpus_cfg))
    train_docs, val_docs = split_documents(docs, corpus_cfg.val_fraction)
    assert p.corpus_exhausted and p.n_docs == 300 and not p.reused
    assert p.vocab_size == 320 and p.bos_id == bos_id(p.tokenizer) == 319
    assert len(p.train_shards) > 1 and all(shard_info(s).n_tokens <= 5000 for s in p.train_shards)
    train = _stream(p.train_shards)
    assert len(train) == p.n_train_tokens
    pieces = _split_docs(train, p.bos_id)
    assert [p.tokenizer.decode(piece[1:].tolist()) for piece in pieces] == train_docs
    val = _stream(p.val_shards)
    assert len(val) == p.n_val_tokens > 0
    assert [p.tokenizer.decode(piece[1:].tolist()) for piece in _split_docs(val, p.bos_id)] == val_docs
    meta = json.loads((p.dir / "meta.json").read_text())
    assert meta["n_train_tokens"] == p.n_train_tokens and meta["tokenizer"]["ref"] == "tokenizer.json"
    assert p.dir.parent == Path(corpus_cfg.cache_dir) and "bpe320" in p.dir.name
    assert sorted(set(os.listdir(p.dir.parent)) - {"hf_datasets"}) == [p.dir.name]  # no temp dirs left


def test_prepare_is_idempotent(corpus_cfg: SimpleNamespace) -> None:
    first = prepare_data(corpus_cfg, tok_cfg(), n_train_tokens=10**9)
    mtimes = {f: f.stat().st_mtime_ns for f in first.dir.iterdir()}
    again = prepare_data(corpus_cfg, tok_cfg(), n_train_tokens=10**9)
    assert again.reused and again.dir == first.dir
    assert {f: f.stat().st_mtime_ns for f in again.dir.iterdir()} == mtimes


def test_prepare_rebuilds_on_changed_vocab_or_source(corpus_cfg: SimpleNamespace, tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    first = prepare_data(corpus_cfg, tok_cfg(), n_train_tokens=10**9, out_dir=out)
    other_vocab = prepare_data(corpus_cfg, tok_cfg(vocab_size=300), n_train_tokens=10**9, out_dir=out)
    assert not other_vocab.reused and other_vocab.vocab_size == 300
    assert sorted(set(os.listdir(tmp_path)) - {"cache"}) == ["docs.jsonl", "prepared"]  # old dir swapped out
    write_jsonl(Path(corpus_cfg.paths[0]), make_docs(300, seed=1))
    other_source = prepare_data(corpus_cfg, tok_cfg(vocab_size=300), n_train_tokens=10**9, out_dir=out)
    assert not other_source.reused
    assert other_source.meta["source_fingerprint"] != first.meta["source_fingerprint"]
    # The default dir is keyed by vocab: different settings never overwrite each other.
    a = prepare_data(corpus_cfg, tok_cfg(), n_train_tokens=10**9)
    b = prepare_data(corpus_cfg, tok_cfg(vocab_size=300), n_train_tokens=10**9)
    assert a.dir != b.dir and a.dir.exists() and b.dir.exists()


def test_prepare_stops_early_and_extends_on_demand(corpus_cfg: SimpleNamespace) -> None:
    full = prepare_data(corpus_cfg, tok_cfg(), n_train_tokens=10**9, out_dir=Path(corpus_cfg.cache_dir) / "full")
    small = prepare_data(corpus_cfg, tok_cfg(), n_train_tokens=2000)
    assert 2000 <= small.n_train_tokens < full.n_train_tokens and not small.corpus_exhausted
    assert small.n_val_tokens > 0
    # The held-out split does not depend on the train budget: both runs score the same tokens.
    assert np.array_equal(np.concatenate([read_shard(p) for p in small.val_shards]),
                          np.concatenate([read_shard(p) for p in full.val_shards]))
    # Same tokenizer, and the small stream is a prefix of the full one.
    assert small.meta["tokenizer"]["fingerprint"] == full.meta["tokenizer"]["fingerprint"]
    assert np.array_equal(_stream(small.train_shards), _stream(full.train_shards)[: small.n_train_tokens])
    assert prepare_data(corpus_cfg, tok_cfg(), n_train_tokens=1000).reused  # fewer: reuse
    bigger = prepare_data(corpus_cfg, tok_cfg(), n_train_tokens=small.n_train_tokens + 1)
    assert not bigger.reused and bigger.n_train_tokens > small.n_train_tokens and bigger.dir == small.dir
    assert bigger.stats["tokenizer_train_seconds"] == 0.0  # the deterministic tokenizer was reused


def test_prepare_tiny_corpus_still_has_val(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", make_docs(3))
    cfg = data_cfg(tmp_path, paths=[str(path)], val_fraction=1e-6)
    p = prepare_data(cfg, tok_cfg(vocab_size=260), n_train_tokens=10**9)
    assert p.n_val_tokens > 0 and p.n_train_tokens > 0 and p.meta["n_val_docs"] == 1


def test_load_prepared_detects_damage(corpus_cfg: SimpleNamespace) -> None:
    p = prepare_data(corpus_cfg, tok_cfg(), n_train_tokens=10**9, shard_tokens=5000)
    victim = p.train_shards[1]
    victim.write_bytes(victim.read_bytes()[:-1])
    with pytest.raises(ShardError, match=victim.name):
        load_prepared(p.dir)
    repaired = prepare_data(corpus_cfg, tok_cfg(), n_train_tokens=10**9, shard_tokens=5000)  # rebuilds
    assert not repaired.reused and load_prepared(repaired.dir).n_train_tokens == p.n_train_tokens
    (p.dir / "meta.json").unlink()
    with pytest.raises(PreparedDataError, match="meta.json"):
        load_prepared(p.dir)


def test_prepare_never_clobbers_foreign_dirs_or_leaves_half_dirs(corpus_cfg: SimpleNamespace, tmp_path: Path) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(PreparedDataError, match="not a picollm prepared data dir"):
        prepare_data(corpus_cfg, tok_cfg(), n_train_tokens=100, out_dir=foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"

    def crash(progress: prepare.PrepareProgress) -> None:
        raise RuntimeError("simulated crash")  # mid-build: shards exist, meta.json does not

    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare_data(corpus_cfg, tok_cfg(), n_train_tokens=100, out_dir=tmp_path / "out", progress=crash)
    assert not (tmp_path / "out").exists()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".out")]


def test_prepare_rejects_impossible_vocab(corpus_cfg: SimpleNamespace) -> None:
    with pytest.raises(ValueError, match="2\\*\\*32"):
        prepare_data(corpus_cfg, tok_cfg(vocab_size=2**32), n_train_tokens=100)
    with pytest.raises(ValueError, match="too small"):
        prepare_data(corpus_cfg, tok_cfg(vocab_size=100), n_train_tokens=100)


def _dir_bytes(directory: Path) -> dict[str, bytes]:
    """Every file of a prepared dir except the timings."""
    return {f.name: f.read_bytes() for f in sorted(directory.iterdir()) if f.name != "stats.json"}


def _files_corpus(tmp_path: Path, n: int = 200) -> SimpleNamespace:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(n):
        (corpus / f"f{i:03d}.txt").write_text(f"file {i} " + make_docs(1, seed=i)[0])
    return data_cfg(tmp_path, paths=[str(corpus)], val_fraction=0.1, val_tokens=3000)


def test_a_small_budget_reads_documents_from_the_whole_corpus(tmp_path: Path) -> None:
    cfg = _files_corpus(tmp_path)
    small = prepare_data(cfg, tok_cfg(), n_train_tokens=3000, out_dir=tmp_path / "a")
    assert 3000 <= small.n_train_tokens < 4000 and not small.corpus_exhausted
    pieces = _split_docs(_stream(small.train_shards), small.bos_id)
    seen = [int(small.tokenizer.decode(p[1:].tolist()).split()[1]) for p in pieces]
    # The order hashes the files' absolute paths, so it changes with pytest's temporary
    # folder: bounds that ~22 files drawn from 200 miss about once in 10,000 (150 failed 1 in 50).
    assert len(seen) < 50 and max(seen) >= 120 and sum(i >= 100 for i in seen) >= len(seen) // 4
    assert seen != sorted(seen)
    again = prepare_data(cfg, tok_cfg(), n_train_tokens=3000, out_dir=tmp_path / "b")
    assert not again.reused and _dir_bytes(again.dir) == _dir_bytes(small.dir)


def test_a_short_run_trains_on_sequences_from_the_whole_pool(tmp_path: Path) -> None:
    """The plan's stream is the pool (data.pool_tokens), not the run's own D tokens: the
    sequences of a run of ~3,000 tokens come from documents across the corpus; cut to its
    first D tokens (data.pool_tokens=0) they come from the few documents read first."""
    cfg = _files_corpus(tmp_path)
    data = prepare_data(cfg, tok_cfg(), n_train_tokens=1 << 24, out_dir=tmp_path / "a")
    assert data.corpus_exhausted
    seq, batch, steps = 16, 8, 24  # 3,072 tokens, ~10% of the stream
    stream = _stream(data.train_shards)

    def files_read(max_tokens: int) -> set[int]:
        loader = PackedLoader(data.train_shards, seq, batch, batch, seed=3, max_tokens=max_tokens)
        files = set()
        for step in range(steps):
            for j in loader.sequence_ids(step, 0):
                start = int(j) * seq
                bos = np.flatnonzero(stream[: start + 1] == data.bos_id)  # the document this sequence starts in
                words = data.tokenizer.decode(stream[bos[-1] + 1 : bos[-1] + 12].tolist()).split()
                files.add(int(words[1]))
        return files

    pooled = files_read(1 << 24)
    first = files_read(steps * batch * seq + seq + 1)
    assert len(pooled) >= 2 * len(first) and sum(i >= 100 for i in pooled) >= len(pooled) // 4
    assert len(pooled) >= 60, (len(pooled), len(first))  # 113 of 180 train files; the first tokens: 21


@pytest.mark.parametrize("budget", [2500, 10**9])
def test_worker_processes_write_the_same_bytes_as_one(corpus_cfg: SimpleNamespace, tmp_path: Path, budget: int) -> None:
    one = prepare_data(corpus_cfg, tok_cfg(), budget, out_dir=tmp_path / "one", num_proc=1, batch_chars=4000,
                       shard_tokens=3000)
    children = []
    two = prepare_data(corpus_cfg, tok_cfg(), budget, out_dir=tmp_path / "two", num_proc=2, batch_chars=4000,
                       shard_tokens=3000, progress=lambda p: children.append(len(multiprocessing.active_children())))
    assert max(children) >= 2 and len(children) > 3  # batches really went to two worker processes
    assert one.stats["workers"] == 1 and two.stats["workers"] == 2
    assert _dir_bytes(one.dir) == _dir_bytes(two.dir)
    assert (budget < 10**9) == (not one.corpus_exhausted)


def _stop_after_first_shard(progress: PrepareProgress) -> None:
    if progress.shards_done >= 1:
        raise KeyboardInterrupt  # what Ctrl-C raises, at a point where a shard is complete


@pytest.mark.parametrize("budget", [5000, 10**9])
def test_interrupted_preparation_resumes_to_identical_bytes(
    corpus_cfg: SimpleNamespace, tmp_path: Path, budget: int
) -> None:
    kwargs = dict(num_proc=1, batch_chars=3000, shard_tokens=2000)
    reference = prepare_data(corpus_cfg, tok_cfg(), budget, out_dir=tmp_path / "reference", **kwargs)
    out = tmp_path / "out"
    with pytest.raises(PreparationInterrupted) as stop:
        prepare_data(corpus_cfg, tok_cfg(), budget, out_dir=out, progress=_stop_after_first_shard, **kwargs)
    assert isinstance(stop.value, KeyboardInterrupt) and stop.value.shards_done >= 1
    assert "rerun the same command to continue from what it kept" in stop.value.sentence()
    assert not out.exists()  # nothing a rerun or a trainer could take for finished data
    build = stop.value.build_dir
    assert (build / "resume.json").is_file() and (build / "train_000.bin").is_file()
    first_shard = (build / "train_000.bin").stat().st_mtime_ns

    resumed = prepare_data(corpus_cfg, tok_cfg(), budget, out_dir=out, **{**kwargs, "num_proc": 2})
    assert resumed.stats["resumed_at_doc"] == stop.value.docs_done > 0
    assert (out / "train_000.bin").stat().st_mtime_ns == first_shard  # kept, not rewritten
    assert _dir_bytes(resumed.dir) == _dir_bytes(reference.dir)
    assert not build.exists() and not (out / "resume.json").exists()


def test_a_resume_state_cut_for_a_larger_budget_is_not_reused(corpus_cfg: SimpleNamespace, tmp_path: Path) -> None:
    kwargs = dict(num_proc=1, batch_chars=3000, shard_tokens=2000)
    with pytest.raises(PreparationInterrupted):
        prepare_data(corpus_cfg, tok_cfg(), 10**9, out_dir=tmp_path / "out", progress=_stop_after_first_shard,
                     **kwargs)
    small = prepare_data(corpus_cfg, tok_cfg(), 1000, out_dir=tmp_path / "out", **kwargs)
    assert small.stats["resumed_at_doc"] is None  # its first shard already holds more than 1000 tokens
    fresh = prepare_data(corpus_cfg, tok_cfg(), 1000, out_dir=tmp_path / "fresh", **kwargs)
    assert _dir_bytes(small.dir) == _dir_bytes(fresh.dir)


def test_progress_lines(corpus_cfg: SimpleNamespace) -> None:
    out = io.StringIO()
    prepare_data(corpus_cfg, tok_cfg(), 10**9, num_proc=1, batch_chars=20_000,
                 progress=ProgressPrinter(every_s=0, file=out))
    lines = out.getvalue().splitlines()
    assert len(lines) > 3  # one per batch here; the default prints at most every few seconds
    pattern = (r"prepare: [\d,]+ docs, [\d.]+k? train \+ [\d.]+k? val tokens, [\d.]+[kM]? tokens/s, "
               r"\d+%(, ETA \dm\d\ds)?")
    assert all(re.fullmatch(pattern, line) for line in lines), lines
    assert lines[-1].startswith("prepare: 300 docs") and ", 100%" in lines[-1]


def test_progress_fraction_and_eta() -> None:
    p = PrepareProgress(docs=50, train_tokens=100, val_tokens=10, target_tokens=1000, shards_done=0, seconds=10.0,
                        new_tokens=110, total_docs=200)
    assert p.fraction() == 0.25 and p.eta_seconds() == pytest.approx(30.0)  # the corpus ends before the budget
    assert p.line() == "prepare: 50 docs, 100 train + 10 val tokens, 11 tokens/s, 25%, ETA 0m30s"
    budget_bound = dataclasses.replace(p, train_tokens=500, start_fraction=0.25)
    assert budget_bound.fraction() == 0.5 and budget_bound.eta_seconds() == pytest.approx(20.0)  # 0.25 in 10 s
    val_phase = dataclasses.replace(p, train_done=True, total_docs=None)
    assert val_phase.eta_seconds() is None and val_phase.line().endswith("filling the held-out split")


def test_damaged_token_ids_are_refused_on_load(corpus_cfg: SimpleNamespace) -> None:
    p = prepare_data(corpus_cfg, tok_cfg(), n_train_tokens=10**9, shard_tokens=5000)
    victim = p.train_shards[1]
    _corrupt(victim, HEADER_SIZE + 2 * 123, (400).to_bytes(2, "little"))  # vocab is 320
    with pytest.raises(ShardError, match=f"{victim.name} holds token id 400, outside its vocabulary of 320") as err:
        load_prepared(p.dir)
    assert isinstance(err.value, PreparedDataError) and isinstance(err.value, ValueError)
    assert "rerun data preparation" in str(err.value)
    assert load_prepared(p.dir, check_ids=False).n_train_tokens == p.n_train_tokens
    repaired = prepare_data(corpus_cfg, tok_cfg(), n_train_tokens=10**9, shard_tokens=5000)
    assert not repaired.reused and int(read_shard(repaired.train_shards[1]).max()) < 320


def test_a_corpus_too_small_for_one_sequence_is_one_sentence(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", ["a tiny document", "another tiny one", "and a third"])
    p = prepare_data(data_cfg(tmp_path, paths=[str(path)]), tok_cfg(vocab_size=257), n_train_tokens=10**9)
    check_fits(p, seq_len=8)
    message = (f"the corpus gave {p.n_train_tokens} train tokens, fewer than one training sequence of "
               f"seq_len \\+ 1 = 65; add text to the corpus or lower model.seq_len.")
    with pytest.raises(PreparedDataError, match=message):
        check_fits(p, seq_len=64)
    with pytest.raises(PreparedDataError, match="fewer than one evaluation window of seq_len \\+ 1 = 33"):
        check_fits(dataclasses.replace(p, n_train_tokens=10**6), seq_len=32)
    with pytest.raises(PreparedDataError, match="too few for one training sequence of seq_len \\+ 1 = 65"):
        PackedLoader(p.train_shards, seq_len=64, global_batch=2, micro_batch=2, seed=0)


def test_workers_setting(tmp_path: Path) -> None:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert prepare.resolve_workers(SimpleNamespace()) == cores  # data.workers absent: every usable core
    assert prepare.resolve_workers(SimpleNamespace(workers=None)) == cores
    assert prepare.resolve_workers(SimpleNamespace(workers=3)) == 3
    assert prepare.resolve_workers(SimpleNamespace(workers=3), num_proc=1) == 1
    for bad in (0, -2, "4", True):
        with pytest.raises(PreparedDataError, match=f"data.workers={bad!r} must be a positive number"):
            prepare.resolve_workers(SimpleNamespace(workers=bad))


def test_a_second_process_waits_for_the_build_then_reuses_it(
    corpus_cfg: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    finished = prepare_data(corpus_cfg, tok_cfg(), 10**9, out_dir=tmp_path / "elsewhere")
    out = tmp_path / "out"
    build = prepare.build_dir(out, prepare.dataset_key(corpus_cfg, tok_cfg()))
    lock, _ = prepare._lock_build_dir(build)  # a twin process is building the same data
    results: list[Any] = []
    waiter = threading.Thread(target=lambda: results.append(prepare_data(corpus_cfg, tok_cfg(), 10**9, out_dir=out)))
    waiter.start()
    seen = ""
    while "waiting for another process" not in seen and waiter.is_alive():
        seen += capsys.readouterr().out
        time.sleep(0.01)
    assert "waiting for another process preparing the same data" in seen and not results
    for f in finished.dir.iterdir():  # the twin completes: its build dir is renamed into place
        shutil.copy2(f, build / f.name)
    os.replace(build, out)
    os.close(lock)
    waiter.join()
    assert results[0].reused and results[0].dir == out and not build.exists()


@pytest.mark.slow
def test_ctrl_c_in_the_prepare_command_is_one_line_and_a_rerun_continues(tmp_path: Path) -> None:
    env = {**os.environ, "PICOLLM_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "picollm.data.prepare", "model=tiny", "tokenizer.vocab_size=2048",
           "tokenizer.train_chars=200000", "budget.tokens=1e9"]
    # A child inherits an *ignored* SIGINT through exec (and Python then installs no
    # KeyboardInterrupt handler), so give it the default, as an interactive shell does,
    # whatever earlier code in this pytest process did to SIGINT.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    data = tmp_path / "cache" / "data"
    while proc.poll() is None and not list(data.glob(".*.build-*/resume.json")):
        time.sleep(0.02)  # the tokenizer is trained and tokenizing has begun
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole process group, workers included
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("interrupted: data preparation stopped")
    assert "rerun the same command to continue" in err
    assert not [d for d in data.iterdir() if (d / "meta.json").exists()]  # nothing looks finished
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0 and "prepared " in rerun.stdout, rerun.stderr
    (prepared,) = [d for d in data.iterdir() if (d / "meta.json").exists()]
    assert json.loads((prepared / "stats.json").read_text())["resumed_at_doc"] is not None


# ===================================================================== loader


@pytest.fixture()
def position_shards(tmp_path: Path) -> tuple[list[Path], int]:
    """Uneven shards whose token at stream position i is i (so windows are checkable)."""
    T, cuts = 5003, [0, 700, 700, 2901, 5003]  # includes an empty shard
    paths = [
        write_shard(tmp_path / f"train_{i:03d}.bin", np.arange(a, b), vocab_size=70_000)
        for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:]))
    ]
    return paths, T


def test_token_stream_crosses_shards(position_shards: tuple[list[Path], int]) -> None:
    paths, T = position_shards
    stream = TokenStream(paths)
    out = np.empty(3000, dtype=np.int64)
    stream.read_into(650, out)
    assert len(stream) == T and np.array_equal(out, np.arange(650, 3650))
    with pytest.raises(IndexError):
        stream.read_into(T - 10, out)


def test_packing_windows(position_shards: tuple[list[Path], int]) -> None:
    paths, T = position_shards
    L = 64
    ld = PackedLoader(paths, seq_len=L, global_batch=8, micro_batch=4, seed=0)
    assert ld.n_sequences == (T - 1) // L and ld.accum_steps == 2
    x, y = ld.get_micro_batch(3, 1)
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (4, L)
    for row, j in zip(range(4), ld.sequence_ids(3, 1)):
        assert torch.equal(x[row], torch.arange(j * L, j * L + L))
        assert torch.equal(y[row], x[row] + 1)


def _samples(ld: PackedLoader, steps: range) -> list[int]:
    """Sequence ids seen, in (step, micro_step) order, read back from the data itself."""
    firsts = [ld.get_micro_batch(s, m)[0][:, 0] for s in steps for m in range(ld.accum_steps)]
    return [int(v) // ld.seq_len for batch in firsts for v in batch]


def test_every_sequence_once_per_epoch_and_epochs_roll_over(position_shards: tuple[list[Path], int]) -> None:
    paths, _ = position_shards
    ld = PackedLoader(paths, seq_len=50, global_batch=6, micro_batch=3, seed=1)
    M = ld.n_sequences  # 100: epochs end mid-step
    steps = range(-(-3 * M // ld.global_batch))
    seen = _samples(ld, steps)
    for e in range(3):
        epoch = seen[e * M : (e + 1) * M]
        assert sorted(epoch) == list(range(M))
        assert epoch == ld.permutation(e).tolist()
    assert seen[:M] != seen[M : 2 * M]  # a fresh order each epoch
    assert epochs_for(ld, len(steps)) == pytest.approx(len(steps) * 6 / M)


def test_order_is_independent_of_world_size(position_shards: tuple[list[Path], int]) -> None:
    paths, _ = position_shards
    B, b, seed = 8, 2, 123
    layouts = {}
    for W, k in [(1, 4), (2, 2), (4, 1)]:
        per_step: dict[int, dict[int, list[int]]] = {}
        for r in range(W):
            ld = PackedLoader(paths, seq_len=32, global_batch=B, micro_batch=b, seed=seed, rank=r, world_size=W)
            assert ld.accum_steps == k
            for s in range(40):  # crosses an epoch boundary (M = 156)
                for m in range(k):
                    slot = m * W + r
                    per_step.setdefault(s, {})[slot] = (ld.get_micro_batch(s, m)[0][:, 0] // 32).tolist()
        layouts[(W, k)] = [sum((per_step[s][slot] for slot in sorted(per_step[s])), []) for s in range(40)]
    assert layouts[(1, 4)] == layouts[(2, 2)] == layouts[(4, 1)]
    first_epoch = sum(layouts[(1, 4)][:19], [])  # 19 steps = 152 of the 156 sequences of epoch 0
    assert len(set(first_epoch)) == 152 and set(first_epoch) <= set(range(156))


def test_divisibility_error(position_shards: tuple[list[Path], int]) -> None:
    message = "global batch of 10 sequences is not divisible by world_size\\*micro_batch = 4"
    with pytest.raises(ValueError, match=message):
        PackedLoader(position_shards[0], seq_len=16, global_batch=10, micro_batch=2, seed=0, world_size=2)
    with pytest.raises(ValueError, match="too few"):
        PackedLoader(position_shards[0], seq_len=10_000, global_batch=2, micro_batch=2, seed=0)


def test_batches_iterator_and_resume(position_shards: tuple[list[Path], int]) -> None:
    paths, _ = position_shards
    kwargs = dict(seq_len=40, global_batch=8, micro_batch=2, seed=7)
    a = PackedLoader(paths, **kwargs)
    it = a.batches()
    for _ in range(3 * a.accum_steps):  # run three full steps, then "checkpoint"
        step, m, x, y = next(it)
    assert (step, m) == (2, 3)
    state = a.state_dict()
    assert state["next_step"] == 3
    expected = [next(it) for _ in range(2 * a.accum_steps)]
    it.close()  # stops and joins the prefetch thread

    b = PackedLoader(paths, **kwargs)
    b.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON round trip
    got = list(b.batches(end_step=5))
    assert [(s, m) for s, m, _, _ in got] == [(s, m) for s, m, _, _ in expected]
    assert all(torch.equal(g[2], e[2]) and torch.equal(g[3], e[3]) for g, e in zip(got, expected))
    assert b.next_step == 5


@pytest.mark.parametrize("change", [dict(seq_len=20), dict(global_batch=16), dict(seed=8), dict(max_tokens=4000)])
def test_mismatched_loader_state_refused(position_shards: tuple[list[Path], int], change: dict[str, int]) -> None:
    kwargs = dict(seq_len=40, global_batch=8, micro_batch=2, seed=7)
    state = PackedLoader(position_shards[0], **kwargs).state_dict()
    other = PackedLoader(position_shards[0], **{**kwargs, **change})
    with pytest.raises(ValueError, match="loader state does not match"):
        other.load_state_dict(state)


def test_loader_surfaces_worker_errors(position_shards: tuple[list[Path], int]) -> None:
    ld = PackedLoader(position_shards[0], seq_len=40, global_batch=8, micro_batch=2, seed=7)
    ld.stream.arrays = []  # simulate an unreadable stream
    with pytest.raises(Exception):
        next(ld.batches())


def test_val_windows_are_fixed_and_sequential(position_shards: tuple[list[Path], int]) -> None:
    paths, T = position_shards
    L = 100
    batches = list(ValLoader(paths, seq_len=L, batch_size=7))
    assert [len(x) for x, _ in batches] == [7] * 7 + [(T - 1) // L - 49]
    starts = torch.cat([x[:, 0] for x, _ in batches]).tolist()
    assert starts == list(range(0, ((T - 1) // L) * L, L))  # non-overlapping, in order, last partial dropped
    assert all(torch.equal(y, x + 1) for x, y in batches)
    again = list(ValLoader(paths, seq_len=L, batch_size=7))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    capped = ValLoader(paths, seq_len=L, batch_size=7, max_tokens=1000)
    assert capped.n_windows == 10
    ranks = [list(ValLoader(paths, L, 7, rank=r, world_size=3)) for r in range(3)]
    assert sorted(int(v) for r in ranks for x, _ in r for v in x[:, 0]) == starts


def test_prepared_data_feeds_the_loader(corpus_cfg: SimpleNamespace) -> None:
    p = prepare_data(corpus_cfg, tok_cfg(), n_train_tokens=10**9, shard_tokens=3000)
    ld = PackedLoader(p.train_shards, seq_len=32, global_batch=4, micro_batch=4, seed=0)
    x, y = ld.get_micro_batch(0, 0)
    stream = _stream(p.train_shards)
    j = int(ld.sequence_ids(0, 0)[0])
    assert x[0].tolist() == stream[j * 32 : j * 32 + 32].tolist()
    assert int(x.max()) < p.vocab_size
    assert sum(1 for _ in ValLoader(p.val_shards, 32, 4)) >= 1
