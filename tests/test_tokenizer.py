"""Tokenizer: training, exact round trips, determinism, save/load, BOS handling, errors."""

from __future__ import annotations

import json
import random
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import tiktoken

from picollm.tokenizer import (
    BOS,
    TokenizerError,
    bos_id,
    encode_array,
    load_tokenizer,
    save_tokenizer,
    tokenizer_fingerprint,
    train_bpe,
)

VOCAB = 512
STDLIB_FILES = ["textwrap.py", "string.py", "json/decoder.py", "json/encoder.py", "difflib.py", "argparse.py"]
UNICODE_DOC = "Grüße aus Köln. 中文字符 日本語 한국어 emoji 😀👍🏽 ünïcödé ñ 1234567 " * 50


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = [(root / f).read_text(encoding="utf-8") for f in STDLIB_FILES]
    assert sum(map(len, docs)) > 200_000  # a few hundred KB of varied text
    return docs + [UNICODE_DOC]


@pytest.fixture(scope="module")
def enc(corpus: list[str]) -> tiktoken.Encoding:
    return train_bpe(corpus, VOCAB)


def _random_text(rng: random.Random, n: int) -> str:
    # Any code point except surrogates (which are not valid in UTF-8 text).
    pools = [(0, 0x7F), (0x80, 0x7FF), (0x800, 0xD7FF), (0xE000, 0xFFFF), (0x10000, 0x10FFFF)]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(pools)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


ODD_TEXTS = [
    "",
    "hello world",
    "  leading and trailing spaces   ",
    " " * 97,
    "\t\t\n\n\n\r\n \r\n\t",
    "a\x00b\x00\x00c",
    "def f():\r\n    return 1\r\n",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flags 🇩🇪🇯🇵",
    "中文字符 日本語 한국어 العربية עברית",
    "combining e\u0301 a\u0308 zero\u200bwidth \ufeffbom",
    "\U0010ffff max code point \U0001f600",
    "12345678901234567890 3.14159 1e-10 0xFF",
    "<|bos|> <|endoftext|> <|fim_prefix|>",
    "".join(chr(i) for i in range(256)),
    "x" * 5000,
]


@pytest.mark.parametrize("text", ODD_TEXTS)
def test_round_trip_exact_on_odd_text(enc: tiktoken.Encoding, text: str) -> None:
    assert enc.decode(enc.encode_ordinary(text)) == text


def test_round_trip_exact_on_random_text(enc: tiktoken.Encoding) -> None:
    rng = random.Random(0)
    texts = [_random_text(rng, rng.randint(0, 300)) for _ in range(300)]
    for text in texts:  # through encode_array, the encoder data preparation uses
        assert enc.decode(encode_array(enc, text).tolist()) == text


def test_encode_array_matches_encode_ordinary(enc: tiktoken.Encoding) -> None:
    # data preparation encodes with encode_array: it must give exactly encode_ordinary's ids,
    # special-token text as plain text and lone surrogates replaced included.
    rng = random.Random(1)
    texts = ODD_TEXTS + [_random_text(rng, 200) for _ in range(50)] + ["lone \ud800 surrogate \udfff"]
    for text in texts:
        ids = encode_array(enc, text)
        assert ids.dtype == np.uint32 and ids.tolist() == enc.encode_ordinary(text)
    assert BOS in ODD_TEXTS[-3] and bos_id(enc) not in encode_array(enc, ODD_TEXTS[-3]).tolist()


def test_vocab_size_exact_and_bos_last(enc: tiktoken.Encoding) -> None:
    assert enc.n_vocab == VOCAB
    assert bos_id(enc) == VOCAB - 1
    assert enc.special_tokens_set == {BOS}
    assert enc.max_token_value == VOCAB - 1


def test_training_compresses(enc: tiktoken.Encoding, corpus: list[str]) -> None:
    text = corpus[0]
    assert len(enc.encode_ordinary(text)) < len(text.encode("utf-8")) / 2


def test_training_is_deterministic(enc: tiktoken.Encoding, corpus: list[str]) -> None:
    again = train_bpe(corpus, VOCAB)
    assert again._mergeable_ranks == enc._mergeable_ranks
    assert tokenizer_fingerprint(again) == tokenizer_fingerprint(enc)


def test_fingerprint_ignores_name_but_not_ranks(enc: tiktoken.Encoding, corpus: list[str]) -> None:
    renamed = tiktoken.Encoding(
        "other", pat_str=enc._pat_str, mergeable_ranks=enc._mergeable_ranks, special_tokens=enc._special_tokens
    )
    assert tokenizer_fingerprint(renamed) == tokenizer_fingerprint(enc)
    assert tokenizer_fingerprint(train_bpe(corpus, VOCAB - 1)) != tokenizer_fingerprint(enc)


def test_save_load_round_trip(enc: tiktoken.Encoding, corpus: list[str], tmp_path: Path) -> None:
    path = save_tokenizer(enc, tmp_path / "tokenizer.json")
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.json"]  # no temp file left
    loaded = load_tokenizer(path)
    assert loaded.name == enc.name and loaded.n_vocab == enc.n_vocab
    assert tokenizer_fingerprint(loaded) == tokenizer_fingerprint(enc)
    sample = corpus[1][:20_000] + UNICODE_DOC
    assert loaded.encode_ordinary(sample) == enc.encode_ordinary(sample)
    assert bos_id(loaded) == bos_id(enc)
    assert load_tokenizer(tmp_path).n_vocab == VOCAB  # a prepared dir holding tokenizer.json works too


def test_special_tokens_in_text_are_plain_text(enc: tiktoken.Encoding) -> None:
    text = f"a {BOS} b <|endoftext|>"
    ids = encode_array(enc, text).tolist()  # the encoder data preparation uses
    assert bos_id(enc) not in ids
    assert enc.decode(ids) == text


def test_bos_id_of_gpt_style_encoding() -> None:
    ranks = {bytes([i]): i for i in range(256)}
    eot = {"<|endoftext|>": 256}
    gpt_like = tiktoken.Encoding("gpt", pat_str=r"\S+|\s+", mergeable_ranks=ranks, special_tokens=eot)
    assert bos_id(gpt_like) == 256
    bare = tiktoken.Encoding("bare", pat_str=r"\S+|\s+", mergeable_ranks=ranks, special_tokens={})
    with pytest.raises(TokenizerError, match="neither"):
        bos_id(bare)


def test_bad_refs_give_clear_errors(enc: tiktoken.Encoding, tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="unknown tokenizer 'no-such-tokenizer'"):
        load_tokenizer("no-such-tokenizer")
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(TokenizerError, match="unreadable"):
        load_tokenizer(bad)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(TokenizerError, match="unreadable"):
        load_tokenizer(wrong)


def test_uncached_tiktoken_name_says_how_to_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import tiktoken.load
    import tiktoken.registry

    def no_network(blobpath: str) -> bytes:
        raise ConnectionError(f"no network for {blobpath}")

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # an empty cache
    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    with pytest.raises(TokenizerError, match="not cached.*tokenizer.name=bpe"):
        load_tokenizer("gpt2")


def test_vocab_out_of_range_or_unreachable(corpus: list[str]) -> None:
    with pytest.raises(TokenizerError, match="out of range"):
        train_bpe(corpus, 100)
    with pytest.raises(TokenizerError, match="only supports"):
        train_bpe(["tiny text"], 1000)
