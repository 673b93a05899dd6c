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
from picollm.runs import load_run  # noqa: E402
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
    with pytest.raises(SystemExit, match=r"out=.*precious exists and is not an exported model folder"):
        main([f"run_dir={runs['llama']}", f"out={keep}"])
    assert (keep / "notes.txt").read_text() == "mine"
    with pytest.raises(SystemExit, match=r"run_dir .* does not exist"):
        main([f"run_dir={tmp_path / 'nope'}", f"out={tmp_path / 'x'}"])
    cfg = GPTConfig(n_layer=1, n_head=1, d_model=8, seq_len=8, vocab_size=300)
    cfg.arch = "mamba"  # GPTConfig rejects it up front; hf_config must still refuse, not guess
    with pytest.raises(ExportError, match="has no Hugging Face equivalent"):
        hf_config(cfg, 299)
