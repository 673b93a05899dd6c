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


# ----------------------------------------------------------------------------- value rules

@pytest.mark.parametrize("override, message", [
    ("model.head_dim=0", "model.head_dim=0 must be at least 1."),
    ("model.aspect_ratio=-4", "model.aspect_ratio=-4 must be at least 1."),
    ("model.depth=0", "model.depth=0 must be at least 1 (or null)."),
    ("model.max_depth=0", "model.max_depth=0 must be at least 1."),
    ("model.seq_len=0", "model.seq_len=0 must be at least 1."),
    ("model.arch=mamba", "model.arch='mamba' is unknown; use llama or gpt2."),
    ("train.batch_tokens=0", "train.batch_tokens=0 must be at least 1 (or null)."),
    ("train.micro_batch=-1", "train.micro_batch=-1 must be at least 1 (or null)."),
    ("train.num_threads=0", "train.num_threads=0 must be at least 1 (or null)."),
    ("train.warmup_steps=-1", "train.warmup_steps=-1 must be at least 0 (or null)."),
    ("train.warmup_frac=1", "train.warmup_frac=1.0 must be in [0, 1)."),
    ("train.min_lr_ratio=1.5", "train.min_lr_ratio=1.5 must be in [0, 1]."),
    ("train.lr=0", "train.lr=0.0 must be positive (or null)."),
    ("train.lr=inf", "train.lr=inf is not a finite number; it must be positive (or null)."),
    ("train.eval_tokens=0", "train.eval_tokens=0 must be at least 1."),
    ("train.keep_checkpoints=0", "train.keep_checkpoints=0 must be at least 1."),
    ("train.seed=-1", "train.seed=-1 must be from 0 to 2**63 - 1."),
    (f"train.seed={2**63}", f"train.seed={2**63} must be from 0 to 2**63 - 1."),
    ("train.grad_clip=-1", "train.grad_clip=-1.0 must be at least 0 (0 turns clipping off)."),
    ("train.dtype=fp8", "train.dtype='fp8' is unknown; use auto, bf16, fp32 or fp16."),
    ("train.device=gpu0", "train.device='gpu0' is unknown; use auto, cpu, cuda or cuda:N (N: the GPU index)."),
    ("train.on_bad_steps=retry", "train.on_bad_steps='retry' is unknown; use rollback or stop."),
    ("train.resume=/no/such/step.pt", "train.resume='/no/such/step.pt' is not auto or never and no such path "
                                      "exists; use auto, never or a path to a step_*.pt checkpoint."),
    ("debug.nan_loss_at_steps=[3,-1]", "debug.nan_loss_at_steps[1]=-1 must be at least 0."),
    ("data.val_fraction=0", "data.val_fraction=0.0 must be in (0, 1)."),
    ("data.val_fraction=1", "data.val_fraction=1.0 must be in (0, 1)."),
    ("data.workers=0", "data.workers=0 must be at least 1 (or null)."),
    ("data.format=csv", "data.format='csv' is unknown; use auto, text, json or parquet."),
    ("budget.compute=nan", "budget.compute=nan is not a finite number; it must be positive (or null)."),
    ("budget.params=-inf", "budget.params=-inf is not a finite number; it must be positive (or null)."),
    ("budget.tokens=0", "budget.tokens=0.0 must be positive (or null)."),
    ("budget.minutes=-5", "budget.minutes=-5.0 must be positive (or null)."),
    ("budget.tokens_per_param=0", "budget.tokens_per_param=0.0 must be positive."),
    ("sample.temperature=nan", "sample.temperature=nan is not a finite number; it must be at least 0"),
    ("sample.temperature=-0.5", "sample.temperature=-0.5 must be at least 0 (0 is greedy decoding)."),
    ("sample.top_k=0", "sample.top_k=0 must be at least 1 (or null)."),
    ("sample.max_tokens=0", "sample.max_tokens=0 must be at least 1."),
    ("wandb.mode=onlin", "wandb.mode='onlin' is unknown; use disabled, offline or online."),
    ("plan.format=yaml", "plan.format='yaml' is unknown; use text or json."),
    ("calc.view=cards", "calc.view='cards' is unknown; use compute, time, params or inference."),
    ("plan.law=kaplan", "plan.law='kaplan' is not chinchilla or epoch and no such path exists;"),
    ("calc.mfu=1.5", "calc.mfu=1.5 must be in (0, 1], e.g. 0.4 for 40%."),
    ("sweep.budgets=[1e12,-3]", "sweep.budgets[1]=-3.0 must be positive."),
    ("sweep.span=1", "sweep.span=1.0 must be above 1."),
])
def test_out_of_range_values_are_refused_naming_field_and_range(override, message):
    with pytest.raises(ConfigError) as err:
        load_config([override])
    assert message in str(err.value)


def test_every_problem_is_named_in_one_pass():
    with pytest.raises(ConfigError) as err:
        load_config(["model.depth=0", "train.lr=nan", "wandb.mode=x"])
    assert str(err.value) == ("model.depth=0 must be at least 1 (or null). train.lr=nan is not a finite number; it "
                              "must be positive (or null). wandb.mode='x' is unknown; use disabled, offline or online.")


def test_values_inside_the_ranges_pass(tmp_path):
    law = tmp_path / "summary.json"
    law.write_text("{}")
    cfg = load_config(["train.device=cuda:3", "train.warmup_frac=0", "train.min_lr_ratio=1", "train.grad_clip=0",
                       "train.seed=0", "sample.temperature=0", "sample.top_k=null", "data.val_fraction=0.5",
                       f"plan.law={law}", f"train.resume={law}", "train.warmup_steps=0", "calc.gpu=a100"])
    assert cfg.train.device == "cuda:3" and cfg.plan.law == str(law) and cfg.sample.top_k is None


def _schema_fields(schema, prefix=""):
    """(dotted key, type) of every leaf field of a schema dataclass."""
    import dataclasses
    import typing
    for f in dataclasses.fields(schema):
        kind = typing.get_type_hints(schema)[f.name]
        if dataclasses.is_dataclass(kind):
            yield from _schema_fields(kind, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", kind


def test_every_numeric_field_has_a_rule():
    """A new numeric field must get a range in RULES (this fails until it does)."""
    import typing
    from picollm.config import RULES, Config
    numeric = {int, float, typing.Optional[int], typing.Optional[float], typing.List[int], typing.List[float]}
    missing = [key for key, kind in _schema_fields(Config) if kind in numeric and key not in RULES]
    assert missing == []
    assert set(RULES) <= {key for key, _ in _schema_fields(Config)}  # no rule for a field that is gone


def test_enumerations_match_the_modules_that_use_them():
    from picollm import calculator, config, model
    assert config.ARCHS == model.ARCHS and config.CALC_VIEWS == calculator.VIEWS


def test_every_shipped_preset_and_experiment_composes():
    from picollm.config import CONFIG_DIR
    for group in sorted(p for p in CONFIG_DIR.iterdir() if p.is_dir()):
        for preset in sorted(group.glob("*.yaml")):
            load_config([f"{group.name}={preset.stem}"])


# ----------------------------------------------------------------------------- unknown keys, Hydra's messages

@pytest.mark.parametrize("override, key", [
    ("+train.foo=1", "train.foo"), ("++train.foo=1", "train.foo"), ("+foo=1", "foo"), ("++wandb.x.y=1", "wandb.x"),
])
def test_added_keys_the_schema_lacks_are_refused(override, key):
    with pytest.raises(ConfigError, match=rf"^{key} is not a picollm setting; remove it or fix its spelling"):
        load_config([override])


def test_misspelled_key_gets_the_close_match():
    for override in ("train.stepz=3", "+train.stepz=3"):
        with pytest.raises(ConfigError, match=r"^train.stepz is not a picollm setting \(did you mean train.steps\?\)"):
            load_config([override])


def test_added_keys_under_extra_and_existing_keys_are_accepted():
    cfg = load_config(["+extra.note=baseline", "++train.steps=3"])
    assert cfg.extra.note == "baseline" and cfg.train.steps == 3


def test_hydra_errors_keep_their_detail():
    with pytest.raises(ConfigError) as err:
        load_config(["model=gpt3"])
    lead, *detail = str(err.value).splitlines()
    assert lead == ("bad config or override (In 'config': Could not find 'model/gpt3'); "
                    "see `python -m picollm.plan --help` for the groups.")
    assert detail[0] == "Available options in 'model':"
    assert [d.strip() for d in detail[1:]] == ["default", "gpt2", "reference", "tiny"]  # no schema or search path
    with pytest.raises(ConfigError, match=r"train.steps=abc: Value 'abc' of type 'str' could not be converted"):
        load_config(["train.steps=abc"])


def test_new_schema_fields():
    cfg = load_config(["wandb.entity=team", "wandb.group=sweep1", "wandb.tags=[a,b]", "data.workers=3"])
    assert (cfg.wandb.entity, cfg.wandb.group, list(cfg.wandb.tags), cfg.data.workers) == ("team", "sweep1",
                                                                                           ["a", "b"], 3)
    default = load_config([])
    assert default.wandb.entity is None and default.wandb.group is None and list(default.wandb.tags) == []
    assert default.data.workers is None


@pytest.mark.parametrize("module", ["picollm.train", "picollm.plan", "picollm.data.prepare", "picollm.sweep"])
def test_every_command_refuses_a_bad_value_before_any_work(module, tmp_path):
    import importlib
    run_dir, sweep_dir = tmp_path / "run", tmp_path / "sweep"
    argv = ["model=tiny", "wandb.mode=onlin", f"run_dir={run_dir}", f"sweep.dir={sweep_dir}", "sweep.budgets=[1e9]"]
    with pytest.raises(SystemExit, match=r"^error: wandb.mode='onlin' is unknown; use disabled, offline or online\.$"):
        importlib.import_module(module).main(argv)
    assert not run_dir.exists() and not sweep_dir.exists()
