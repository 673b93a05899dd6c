"""Exporting a run to a Hugging Face folder: transformers loads it with no custom code
and computes the same logits; AutoTokenizer encodes like our tiktoken encoding."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from picollm.config import load_config  # noqa: E402
from picollm.export import ExportError, export_run, hf_config, main  # noqa: E402
from picollm.model import GPTConfig  # noqa: E402
from picollm.saved_run import load_run  # noqa: E402
from picollm.train import run as train_run  # noqa: E402
from tests.conftest import TINY  # noqa: E402

VARIANTS = {"qwen3": [], "llama": ["model.qk_norm=false"], "gpt2": ["model.arch=gpt2"]}
HF_CLASS = {"qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export")
    threads = torch.get_num_threads()
    out = {}
    for name, extra in VARIANTS.items():
        cfg = load_config(TINY + extra + ["train.steps=3", "train.batch_tokens=128", "train.num_threads=1",
                                          f"run_dir={root / name}"])
        train_run(cfg)
        out[name] = root / name
    torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def exported(runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {name: export_run(run_dir, root / name) for name, run_dir in runs.items()}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_transformers_loads_export_and_matches_logits(name: str, runs, exported) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = exported[name]
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= {
        p.name for p in folder.iterdir()}
    hf, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    assert type(hf).__name__ == HF_CLASS[name]
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    # Same keys and shapes as the real class built from the config alone.
    fresh = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in hf.state_dict().items()}

    ours = load_run(runs[name]).model
    # vocab 300 trains with a 384-row embedding/head; HF gets exactly the 300 real rows
    assert (ours.cfg.vocab_size, ours.cfg.padded_vocab, ours.embed.weight.shape[0]) == (300, 384, 384)
    assert hf.config.vocab_size == 300 and hf.get_input_embeddings().weight.shape[0] == 300
    assert hf.get_output_embeddings().weight.shape[0] == 300
    hf.eval()
    gen = torch.Generator().manual_seed(0)
    for batch, length in ((2, ours.cfg.seq_len), (3, 7)):
        idx = torch.randint(0, ours.cfg.vocab_size, (batch, length), generator=gen)
        with torch.no_grad():
            diff = (hf(idx).logits - ours(idx)).abs().max().item()
        assert diff < 1e-4, f"{name}: logits differ by {diff}"
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["bos_token_id"] == generation["eos_token_id"] == load_run(runs[name]).bos_id


def test_auto_tokenizer_matches_tiktoken(runs, exported) -> None:
    from transformers import AutoTokenizer

    enc = load_run(runs["qwen3"]).tokenizer
    tok = AutoTokenizer.from_pretrained(exported["qwen3"])
    rng = random.Random(0)
    alphabet = "abcXYZ019 _\n\t.,'\"(){}<>|-+=*é漢字😀ß"
    texts = ["def f(x):\n    return x ** 2  # square\n\n", "It's 12345 o'clock, they'll  say\r\n",
             "  leading and trailing spaces  ", "ünïcödé 漢字 😀 emoji"]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(50)]
    for text in texts:
        ids = enc.encode_ordinary(text)
        assert tok.encode(text, add_special_tokens=False) == ids, text
        assert tok(text).input_ids == [enc.n_vocab - 1] + ids, text  # BOS first, as in training
        assert tok.decode(ids) == text
    assert tok.bos_token_id == tok.eos_token_id == enc.n_vocab - 1
    assert tok.convert_tokens_to_ids("<|bos|>") == enc.n_vocab - 1


def test_cli_and_refusals(runs, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cli"
    main([f"run_dir={runs['llama']}", f"out={out}", "checkpoint=3", "tokenizer=false"])
    assert "LlamaForCausalLM" in capsys.readouterr().out
    assert (out / "model.safetensors").is_file() and not (out / "tokenizer.json").exists()
    # Re-exporting over an earlier export replaces it; any other non-empty folder is refused.
    main([f"run_dir={runs['llama']}", f"out={out}"])
    assert (out / "tokenizer.json").is_file()
    keep = tmp_path / "precious"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match=r"out=.*precious is not empty and is not a picollm export"):
        main([f"run_dir={runs['llama']}", f"out={keep}"])
    assert (keep / "notes.txt").read_text() == "mine"
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(SystemExit, match=r"out=.*a_file is a file, not a folder"):
        main([f"run_dir={runs['llama']}", f"out={tmp_path / 'a_file'}"])
    with pytest.raises(SystemExit, match=r"run_dir .* does not exist"):
        main([f"run_dir={tmp_path / 'nope'}", f"out={tmp_path / 'x'}"])
    cfg = GPTConfig(n_layer=1, n_head=1, d_model=8, seq_len=8, vocab_size=300)
    cfg.arch = "mamba"  # GPTConfig rejects it up front; hf_config must still refuse, not guess
    with pytest.raises(ExportError, match="has no Hugging Face equivalent"):
        hf_config(cfg, 299)


# --- the exported tokenizer adds BOS, as training does -----------------------------------------

@pytest.mark.parametrize("name", ["qwen3", "gpt2"])
def test_exported_tokenizer_and_model_score_text_like_picollm(name: str, runs, exported) -> None:
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = load_run(runs[name])
    folder = exported[name]
    tok = AutoTokenizer.from_pretrained(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    text = "def add(a, b):\n    return a + b\n"
    ids = tok(text).input_ids
    # Training documents are [BOS] + tokens: the tokenizer called plainly gives exactly that.
    assert ids == [run.bos_id] + run.tokenizer.encode_ordinary(text)
    assert 8 < len(ids) <= run.model.cfg.seq_len
    assert Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text).ids == ids  # without transformers too
    assert AutoTokenizer.from_pretrained(folder, add_bos_token=True)(text).input_ids == ids  # lm-eval's flag: no 2nd BOS
    assert json.loads((folder / "tokenizer_config.json").read_text())["add_bos_token"] is True
    x = torch.tensor([ids])
    with torch.no_grad():
        ours = run.model(x[:, :-1], x[:, 1:]).item()
        theirs = hf(**tok(text, return_tensors="pt"), labels=x).loss.item()
    assert abs(theirs - ours) < 1e-4, (theirs, ours)


# --- the out folder belongs to the user: only picollm's own files change ---------------------------

def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_foreign_model_folder_is_refused_and_left_intact(runs, tmp_path: Path) -> None:
    foreign = tmp_path / "someone-elses-model"
    (foreign / "lm_eval").mkdir(parents=True)
    (foreign / "config.json").write_text('{"model_type": "llama"}')
    (foreign / "model.safetensors").write_bytes(b"\x00weights" * 100)
    (foreign / "lm_eval" / "results.json").write_text('{"acc": 0.5}')
    before = _snapshot(foreign)
    with pytest.raises(SystemExit) as err:
        main([f"run_dir={runs['llama']}", f"out={foreign}"])
    message = str(err.value.code)
    assert message.startswith(f"error: out={foreign} is not empty and is not a picollm export")
    assert "nothing in it was touched" in message and "pick an empty or new directory for out=" in message
    assert _snapshot(foreign) == before
    assert sorted(p.name for p in foreign.iterdir()) == ["config.json", "lm_eval", "model.safetensors"]
    # The refusal comes before any loading: a missing run_dir is not even looked at.
    with pytest.raises(SystemExit, match="is not a picollm export"):
        main([f"run_dir={tmp_path / 'no-such-run'}", f"out={foreign}"])


def test_reexport_keeps_user_files_and_replaces_its_own(runs, tmp_path: Path) -> None:
    out = tmp_path / "hf"
    main([f"run_dir={runs['llama']}", f"out={out}"])
    marker = json.loads((out / "picollm_export.json").read_text())
    assert marker["files"] == sorted(["model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                                      "tokenizer_config.json", "special_tokens_map.json", "picollm_export.json"])
    assert sorted(p.name for p in out.iterdir()) == marker["files"]
    # What README's lm_eval example writes, and a note of the user's own.
    (out / "lm_eval" / "hf").mkdir(parents=True)
    (out / "lm_eval" / "hf" / "results.json").write_text('{"acc": 0.25}')
    (out / "notes.md").write_text("my notes")
    (out / "config.json").write_text("stale")  # picollm's own file, to be replaced
    good = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(b"stale")
    user = {k: v for k, v in _snapshot(out).items() if k.startswith("lm_eval") or k == "notes.md"}

    main([f"run_dir={runs['llama']}", f"out={out}", "tokenizer=false"])
    assert {k: v for k, v in _snapshot(out).items() if k in user} == user
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert (out / "model.safetensors").read_bytes() == good
    # picollm's tokenizer files from the earlier export are gone (this export has none)
    assert not any((out / name).exists() for name in ("tokenizer.json", "tokenizer_config.json",
                                                      "special_tokens_map.json"))
    marker = json.loads((out / "picollm_export.json").read_text())
    assert marker["files"] == ["config.json", "generation_config.json", "model.safetensors", "picollm_export.json"]
    assert marker["step"] == 3 and marker["run_dir"] == str(runs["llama"].resolve())
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no staging or temp files left

    # A marker from before markers listed files still marks the folder as picollm's.
    (out / "picollm_export.json").write_text(json.dumps({"run_dir": "elsewhere", "step": 1}))
    (out / ".picollm-export-999999999").mkdir()  # staging left by a killed export (no such pid)
    main([f"run_dir={runs['llama']}", f"out={out}"])
    assert (out / "tokenizer.json").is_file() and not (out / ".picollm-export-999999999").exists()
    assert {k: v for k, v in _snapshot(out).items() if k in user} == user


def test_user_file_with_a_picollm_name_is_not_overwritten(runs, tmp_path: Path) -> None:
    out = tmp_path / "hf"
    main([f"run_dir={runs['llama']}", f"out={out}", "tokenizer=false"])
    (out / "tokenizer.json").write_text("the user's own tokenizer")  # not in picollm's marker
    before = _snapshot(out)
    with pytest.raises(SystemExit, match=r"holds a tokenizer.json that picollm.export did not write"):
        main([f"run_dir={runs['llama']}", f"out={out}"])
    assert _snapshot(out) == before
    # A marker naming paths outside the folder is not trusted as picollm's.
    (out / "picollm_export.json").write_text(json.dumps({"files": ["../victim.txt"]}))
    (tmp_path / "victim.txt").write_text("keep")
    with pytest.raises(SystemExit, match="is not a picollm export"):
        main([f"run_dir={runs['llama']}", f"out={out}", "tokenizer=false"])
    assert (tmp_path / "victim.txt").read_text() == "keep"
