"""Hydra composition: groups, experiments, schema checks and the bad inputs that never
reach planning (unknown presets, datasets, paths, sequences longer than the model)."""

import pytest
import torch

from picollm.config import ConfigError, load_config
from picollm.train import run


def test_groups_compose_and_experiments_override_them():
    cfg = load_config(["experiment=speedrun_cpu"])
    assert cfg.data.source == "pystdlib" and cfg.budget.minutes == 10 and cfg.tokenizer.vocab_size == 2048
    gpu = load_config(["experiment=speedrun_gpu"])
    assert gpu.data.hf_name == "HuggingFaceFW/fineweb-edu" and gpu.budget.compute == 1e18
    assert load_config(["model=gpt2"]).model.arch == "gpt2"
    assert load_config(["model=reference"]).model.d_model == 384
    # Command-line overrides win over the experiment.
    assert load_config(["experiment=speedrun_cpu", "budget.minutes=2"]).budget.minutes == 2


@pytest.mark.parametrize("override, message", [
    ("model=nosuchpreset", "nosuchpreset"),
    ("train.stepz=3", "stepz"),
    ("train.steps=abc", "abc"),
    ("data=nosuchdata", "nosuchdata"),
])
def test_unknown_presets_keys_and_bad_types_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config([override])


def test_unknown_data_source_fails_before_any_work(tiny, tmp_path):
    with pytest.raises(Exception, match="data.source"):
        run(load_config(tiny + ["data.source=nosuch", "train.steps=1"]))
    assert not (tmp_path / "run" / "plan.json").exists()


def test_missing_data_path_fails_before_any_work(tiny, tmp_path):
    with pytest.raises(Exception, match="no such file"):
        run(load_config(tiny + ["data=files", f"data.paths=[{tmp_path / 'missing.txt'}]", "train.steps=1"]))
    assert not (tmp_path / "run" / "plan.json").exists()


def test_sequence_longer_than_the_model_is_refused():
    from picollm.model import GPT, GPTConfig
    model = GPT(GPTConfig(n_layer=1, n_head=1, d_model=32, seq_len=16, vocab_size=64))
    with pytest.raises(ValueError, match="longer than model.seq_len=16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_local_parquet_corpus_trains_offline(tiny, tmp_path, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    import sysconfig
    from pathlib import Path
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:80]
    texts = [f.read_text(errors="replace") for f in files]
    pq.write_table(pa.table({"text": texts}), tmp_path / "corpus.parquet")
    final = run(load_config(tiny + ["data=files", f"data.paths=[{tmp_path / 'corpus.parquet'}]",
                                    "train.steps=3", "train.batch_tokens=128"]))
    assert final["steps"] == 3 and final["val_loss"] > 0


def test_unknown_parallel_mode_fails_before_any_work(tiny, tmp_path):
    with pytest.raises(ConfigError, match=r"train.parallel='zero' is unknown; use ddp or fsdp\."):
        run(load_config(tiny + ["train.parallel=zero", "train.steps=1"]))
    assert not (tmp_path / "run" / "plan.json").exists()


def test_fsdp_refuses_fp16_loss_scaling():
    from picollm.parallel import check_mode
    with pytest.raises(ValueError, match="train.parallel=fsdp does not support fp16"):
        check_mode("fsdp", "fp16")
    check_mode("fsdp", "bf16")
    check_mode("ddp", "fp16")
