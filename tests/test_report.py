"""After training: loading a run, sampling, the evaluate CLI and the report.

One tiny real run (4 steps, checkpoints at steps 2 and 4) is trained once for the module.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
from pathlib import Path
from typing import Iterator

import pytest
import torch

from picollm import evaluate, report, sample
from picollm.config import load_config
from picollm.data.prepare import load_prepared
from picollm.saved_run import RunError, load_run, read_metrics
from picollm.train import run as train_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SEQ_LEN = 64  # model=tiny


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("after_training")
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PICOLLM_CACHE", str(root / "cache"))  # data.cache_dir resolves it at compose time
        mp.setenv("HF_HUB_OFFLINE", "1")
        cfg = load_config([
            "model=tiny", "tokenizer.vocab_size=300", "tokenizer.train_chars=100000", "data.max_docs=100",
            "data.val_tokens=4096", "train.steps=4", "train.batch_tokens=512", "train.eval_every=2",
            "train.save_every=2", "train.eval_tokens=1024", "sample.max_tokens=16", f"run_dir={root / 'run'}",
            # One thread: a model this small spends more time syncing threads than computing.
            "train.num_threads=1",
        ])
        train_run(cfg)
        yield root / "run"
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def loaded(run_dir: Path):
    return load_run(run_dir)


# ----------------------------------------------------------------------------- loading a run

def test_load_run_picks_latest_checkpoint_or_the_one_asked_for(run_dir: Path, loaded) -> None:
    assert loaded.step == 4 and not loaded.model.training
    assert loaded.tokenizer.n_vocab == 300 and loaded.bos_id == 299
    assert loaded.plan["steps"] == 4 and loaded.config.train.steps == 4
    assert load_run(run_dir, checkpoint="2").step == 2
    assert load_run(run_dir, checkpoint=str(run_dir / "checkpoints" / "step_0000002.pt")).step == 2
    with pytest.raises(RunError, match=r"checkpoint 3 does not exist .*steps available: 2, 4"):
        load_run(run_dir, checkpoint="3")


def test_missing_run_and_run_without_checkpoint(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(RunError, match=f"run_dir {missing} does not exist"):
        load_run(missing)
    with pytest.raises(RunError, match=rf"run_dir {tmp_path} has no checkpoint yet; train it first with "
                                       rf"python -m picollm.train run_dir={tmp_path}"):
        load_run(tmp_path)


def test_corrupt_latest_checkpoint_falls_back(run_dir: Path, tmp_path: Path, capsys) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run_dir / "checkpoints", copy / "checkpoints")
    shutil.copy(run_dir / "tokenizer.json", copy)
    latest = copy / "checkpoints" / "step_0000004.pt"
    latest.write_bytes(latest.read_bytes()[:-10])
    assert load_run(copy).step == 2
    assert "step_0000004.pt is corrupt" in capsys.readouterr().err
    with pytest.raises(RunError, match="is corrupt"):
        load_run(copy, checkpoint="4")


def test_read_metrics_keeps_the_latest_record_per_step(tmp_path: Path) -> None:
    lines = [{"kind": "train", "step": 1, "loss": 5.0}, {"kind": "eval", "step": 0, "val_loss": 6.0},
             {"kind": "train", "step": 2, "loss": 4.0}, {"kind": "train", "step": 2, "loss": 3.5}]
    text = "\n".join(json.dumps(r) for r in lines) + '\n{"kind": "train", "st'  # torn last line
    (tmp_path / "metrics.jsonl").write_text(text)
    train, evals = read_metrics(tmp_path)
    assert [(r["step"], r["loss"]) for r in train] == [(1, 5.0), (2, 3.5)]
    assert [r["step"] for r in evals] == [0]
    assert read_metrics(tmp_path / "missing") == ([], [])


# ----------------------------------------------------------------------------- sampling

def test_sampling_is_deterministic_per_seed(loaded) -> None:
    texts = [sample.generate_text(loaded, "def ", 24, temperature=1.0, top_k=None, seed=s) for s in (0, 0, 1, 2)]
    assert all(isinstance(t, str) for t in texts)
    assert texts[0] == texts[1]
    assert len(set(texts[1:])) > 1  # seeds change the text


def test_streamed_text_equals_decoding_the_tokens(loaded) -> None:
    """Pieces split multi-byte characters across tokens correctly: joined they are the decode."""
    prompt = "naïve 数据 = "
    text = sample.generate_text(loaded, prompt, 40, temperature=1.0, top_k=None, seed=3)
    idx = torch.tensor([[loaded.bos_id] + loaded.tokenizer.encode_ordinary(prompt)])
    ids = []
    for token in loaded.model.generate(idx, 40, 1.0, None, torch.Generator().manual_seed(3)):
        if int(token) == loaded.bos_id:
            break
        ids.append(int(token))
    assert text == loaded.tokenizer.decode(ids)


def test_sample_cli_streams_prompt_and_continuation(run_dir: Path, loaded, capsys) -> None:
    sample.main([f"run_dir={run_dir}", "prompt='def '", "max_tokens=12", "seed=5", "temperature=1.0", "top_k=null"])
    out = capsys.readouterr().out
    assert out == "def " + sample.generate_text(loaded, "def ", 12, 1.0, None, 5) + "\n"


def test_sample_errors(run_dir: Path, tmp_path: Path, loaded) -> None:
    with pytest.raises(SystemExit, match='prompt is empty; pass prompt="..."'):
        sample.main([f"run_dir={run_dir}", "prompt="])
    with pytest.raises(sample.SampleError, match="prompt is empty"):
        sample.generate_text(loaded, "")
    with pytest.raises(SystemExit, match="does not exist"):
        sample.main([f"run_dir={tmp_path / 'nope'}", "prompt=x"])
    with pytest.raises(SystemExit, match="has no checkpoint yet"):
        sample.main([f"run_dir={tmp_path}", "prompt=x"])
    with pytest.raises(SystemExit, match="unknown setting 'temp'"):
        sample.main([f"run_dir={run_dir}", "prompt=x", "temp=1"])
    with pytest.raises(SystemExit, match="prompt= is required"):
        sample.main([f"run_dir={run_dir}"])


@pytest.mark.parametrize("argument, message", [
    ("temperature=nan", "temperature=nan must be a finite number: 0 (greedy) or positive."),
    ("temperature=inf", "temperature=inf must be a finite number: 0 (greedy) or positive."),
    ("temperature=-1", "temperature=-1.0 must be a finite number: 0 (greedy) or positive."),
    ("max_tokens=0", "max_tokens=0 must be at least 1."),
    ("top_k=0", "top_k=0 must be at least 1, or none for no top-k filtering."),
    ("seed=-1", "seed=-1 must be from 0 to 2**63 - 1."),
    ("device=gpu0", "device='gpu0' is unknown; use auto, cpu, cuda or cuda:N (N: the GPU index)."),
])
def test_sample_arguments_are_refused_in_one_sentence(tmp_path: Path, argument: str, message: str) -> None:
    # The run_dir does not exist: an argument error must come before any attempt to load it.
    with pytest.raises(SystemExit) as err:
        sample.main([f"run_dir={tmp_path / 'nope'}", "prompt=x", argument])
    assert str(err.value) == f"error: {message}"


def test_nan_temperature_is_refused_by_the_library_call_too(loaded) -> None:
    with pytest.raises(sample.SampleError, match="temperature=nan must be a finite number"):
        sample.generate_text(loaded, "def ", 4, temperature=float("nan"))


# ----------------------------------------------------------------------------- evaluate CLI

def test_evaluate_cli_uses_the_full_validation_split(run_dir: Path, capsys) -> None:
    evaluate.main([f"run_dir={run_dir}"])
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((run_dir / "eval.json").read_text())
    assert printed == saved
    assert math.isfinite(saved["val_loss"]) and math.isfinite(saved["val_bpb"]) and saved["step"] == 4
    # dtype=auto evaluates in the dtype the run measured faster, not in a guess from CPU flags.
    assert saved["dtype"] == json.loads((run_dir / "plan.json").read_text())["dtype"]
    cache = run_dir.parent / "cache" / "data"
    (data_dir,) = [d for d in cache.iterdir() if d.name.startswith("pystdlib-bpe300-")]
    n_val = load_prepared(data_dir).n_val_tokens
    assert saved["val_tokens"] == (n_val - 1) // SEQ_LEN * SEQ_LEN  # every full window
    assert saved["val_tokens"] > 1024  # more than the in-training train.eval_tokens cap
    buckets = saved["loss_by_position"]
    assert [(b["first"], b["last"]) for b in buckets] == [(0, 15), (16, 31), (32, 63)]  # seq_len 64
    # Same forward passes: the position-weighted mean of the buckets is val_loss.
    mean = sum(b["loss"] * (b["last"] - b["first"] + 1) for b in buckets) / SEQ_LEN
    assert mean == pytest.approx(saved["val_loss"], rel=1e-9)

    evaluate.main([f"run_dir={run_dir}", "checkpoint=2", "max_tokens=640"])
    capped = json.loads((run_dir / "eval.json").read_text())
    assert capped["step"] == 2 and capped["val_tokens"] == 640
    evaluate.main([f"run_dir={run_dir}"])  # leave the full evaluation for the report tests
    capsys.readouterr()


def test_the_evaluation_batch_changes_the_speed_not_the_numbers(run_dir: Path) -> None:
    """A tiny micro-batch is evaluated in batches raised towards EVAL_BATCH_TOKENS (at most 4x
    it); the windows and so the loss are the same at any batch size."""
    assert evaluate.eval_batch_size(4, 64) == 16 and evaluate.eval_batch_size(16, 64) == 32  # 4x, or the cap
    assert evaluate.eval_batch_size(32, 1024) == 32 and evaluate.eval_batch_size(1, 1024) == 2  # never below
    loaded = load_run(run_dir)
    data = evaluate.find_prepared(loaded)
    lengths = evaluate.token_byte_lengths(loaded.tokenizer, loaded.model.cfg.vocab_size)
    results = [evaluate.evaluate(loaded.model, data.val_shards, SEQ_LEN, batch, lengths, contextlib.nullcontext)
               for batch in (1, 3, 16)]
    assert len({r["val_tokens"] for r in results}) == 1 and results[0]["val_tokens"] > 16 * SEQ_LEN
    for r in results[1:]:
        assert r["val_loss"] == pytest.approx(results[0]["val_loss"], rel=1e-6)
        assert r["val_bpb"] == pytest.approx(results[0]["val_bpb"], rel=1e-6)


def test_the_run_records_its_prepared_data_and_evaluation_reads_it(run_dir: Path) -> None:
    (data_dir,) = [d for d in (run_dir.parent / "cache" / "data").iterdir() if d.name.startswith("pystdlib-bpe300-")]
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["data_dir"] == str(data_dir) and plan["data_key"] == load_prepared(data_dir).meta["key"]
    run = load_run(run_dir)
    # Re-deriving the folder (from the tokenizer's path or the data config) would look elsewhere.
    run.tokenizer_ref, run.config.data.cache_dir = str(run_dir / "elsewhere" / "tokenizer.json"), str(run_dir / "x")
    assert evaluate.find_prepared(run).dir == data_dir


def test_evaluate_cli_errors(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="does not exist"):
        evaluate.main([f"run_dir={tmp_path / 'nope'}"])
    with pytest.raises(SystemExit, match="has no checkpoint yet"):
        evaluate.main([f"run_dir={tmp_path}"])
    with pytest.raises(SystemExit, match="run_dir= is required"):
        evaluate.main([])
    with pytest.raises(SystemExit, match=r"^error: dtype='fp8' is unknown; use auto, fp32, bf16 or fp16\.$"):
        evaluate.main([f"run_dir={tmp_path / 'nope'}", "dtype=fp8"])
    with pytest.raises(SystemExit, match=r"^error: device='gpu0' is unknown"):
        evaluate.main([f"run_dir={tmp_path / 'nope'}", "device=gpu0"])


def _copy_run(run_dir: Path, tmp_path: Path) -> Path:
    """A copy the test may break; its prepared data stays where the original's is."""
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return copy


# An unwritable output is simulated by a folder where the file should go: the write fails
# (EISDIR) for root too, whereas chmod does not stop root, which runs these tests here. The
# chmod variant below runs where it can (as a normal user) and is skipped as root.

def test_evaluate_prints_the_numbers_it_could_not_save(run_dir: Path, tmp_path: Path, capsys) -> None:
    copy = _copy_run(run_dir, tmp_path)
    (copy / "eval.json").unlink(missing_ok=True)
    (copy / "eval.json").mkdir()
    with pytest.raises(SystemExit) as err:
        evaluate.main([f"run_dir={copy}", "max_tokens=640"])
    assert err.value.code == 3  # saved_run.NOT_SAVED: computed and printed, not saved
    out, stderr = capsys.readouterr()
    printed = json.loads(out)
    assert printed["val_tokens"] == 640 and math.isfinite(printed["val_loss"])
    assert stderr == (f"error: could not write {copy / 'eval.json'} (Is a directory), so this evaluation is not "
                      "saved; make that path writable (permissions, free space, no folder of that name) and rerun "
                      "the same command.\n")
    assert (copy / "eval.json").is_dir() and not (copy / ".eval.json.tmp").exists()  # nothing left behind


def _read_only(directory: Path) -> bool:
    """chmod the folder read-only; False (and restored) if this user can write anyway (root)."""
    directory.chmod(0o555)
    try:
        (directory / ".probe").write_text("x")
    except PermissionError:
        return True
    (directory / ".probe").unlink()
    directory.chmod(0o755)
    return False


def test_evaluate_and_report_on_a_read_only_run_dir(run_dir: Path, tmp_path: Path, capsys) -> None:
    copy = _copy_run(run_dir, tmp_path)
    if not _read_only(copy):
        pytest.skip("chmod does not stop this user (root) from writing")
    try:
        with pytest.raises(SystemExit) as err:
            evaluate.main([f"run_dir={copy}", "max_tokens=640"])
        assert err.value.code == 3
        out, stderr = capsys.readouterr()
        assert json.loads(out)["val_tokens"] == 640
        assert stderr.startswith(f"error: could not write {copy / 'eval.json'} (Permission denied)")
        with pytest.raises(SystemExit) as err:
            report.main([f"run_dir={copy}"])
        assert err.value.code == 3
        # The copied plots are the user's own files and get overwritten; report.md's temporary cannot be created.
        assert capsys.readouterr().err.startswith(f"error: could not write {copy / 'report.md'} (Permission denied), "
                                                  "so the report is not saved")
    finally:
        copy.chmod(0o755)


# ----------------------------------------------------------------------------- report

def _report(run_dir: Path) -> str:
    return (run_dir / "report.md").read_text()


def test_report_markdown_and_plots(run_dir: Path, capsys) -> None:
    evaluate.main([f"run_dir={run_dir}"])
    capsys.readouterr()
    bpb = json.loads((run_dir / "eval.json").read_text())["val_bpb"]
    n_params = json.loads((run_dir / "plan.json").read_text())["n_params"]
    path = report.write_report(run_dir, samples=["def tricky():\n    ```\n"])
    text = path.read_text()
    assert path == run_dir / "report.md"
    assert f"{bpb:.4f}" in text and "eval.json (full validation split)" in text
    assert f"{n_params:,}" in text
    assert "| steps done | 4 of 4 planned |" in text and "| skipped steps | 0" in text
    assert "````\ndef tricky():\n    ```\n\n````" in text  # fence longer than the sample's backticks
    for name in ("loss.png", "throughput.png", "lr.png"):
        data = (run_dir / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000
        assert f"]({name})" in text


def test_report_without_eval_json_uses_last_evaluation(run_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    copy.mkdir()
    for name in ("plan.json", "metrics.jsonl"):
        shutil.copy(run_dir / name, copy)
    _, evals = read_metrics(copy)
    report.write_report(copy)
    text = _report(copy)
    assert f"{evals[-1]['val_bpb']:.4f}" in text and "last evaluation during training (step 4)" in text
    assert "## Samples" not in text


def test_report_cli_with_samples(run_dir: Path, capsys) -> None:
    report.main([f"run_dir={run_dir}", "samples=true"])
    assert "wrote" in capsys.readouterr().out
    text = _report(run_dir)
    assert "## Samples" in text
    for prompt in ("def ", "import ", "class "):  # the default sample.prompts
        assert re.search(r"`{3,}\n" + re.escape(prompt), text)


def test_compare_two_runs(run_dir: Path, tmp_path: Path, capsys) -> None:
    other = run_dir.parent / "run_short"
    if not other.exists():
        train_run(load_config([
            "model=tiny", "model.seq_len=32", "tokenizer.vocab_size=300", "tokenizer.train_chars=100000",
            "data.max_docs=100", "data.val_tokens=4096", "train.steps=2", "train.batch_tokens=256",
            "train.eval_every=1", "train.eval_tokens=512", "train.num_threads=1", f"run_dir={other}"]))
    out = tmp_path / "cmp"
    report.main(["compare", f"runs=[{run_dir},{other}]", f"out={out}"])
    assert "wrote" in capsys.readouterr().out
    text = (out / "compare.md").read_text()
    assert len([line for line in text.splitlines() if line.startswith("|")]) == 4  # header, rule, 2 runs
    assert "| run | N | D | D/N | C (FLOPs) | steps | val_loss | val_bpb | train wall clock | median tok/s" in text
    final = json.loads((run_dir / "eval.json").read_text())
    assert f"| {run_dir.name} |" in text and f"{final['val_loss']:.4f}" in text and "| 4 of 4 |" in text
    assert "| run_short |" in text and "| 2 of 2 |" in text
    for name in ("val_loss_vs_tokens.png", "val_loss_vs_flops.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000 and f"]({name})" in text


def test_compare_errors(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="no runs to compare"):
        report.main(["compare"])
    with pytest.raises(SystemExit, match="has no plan.json"):
        report.main(["compare", f"runs=[{tmp_path}]"])
    with pytest.raises(SystemExit, match="does not exist"):
        report.main(["compare", f"runs=[{tmp_path / 'nope'}]"])
    assert not (tmp_path / "compare").exists()  # nothing written when a run is unusable


def test_report_names_the_file_it_could_not_write(run_dir: Path, tmp_path: Path, capsys) -> None:
    copy = _copy_run(run_dir, tmp_path)
    (copy / "report.md").unlink(missing_ok=True)
    (copy / "report.md").mkdir()  # in the way of the report (see the note above the evaluate test)
    with pytest.raises(SystemExit) as err:
        report.main([f"run_dir={copy}"])
    assert err.value.code == 3
    out, stderr = capsys.readouterr()
    assert out == ""
    assert stderr == (f"error: could not write {copy / 'report.md'} (Is a directory), so the report is not saved; "
                      "make that path writable (permissions, free space, no folder of that name) and rerun the "
                      "same command.\n")
    assert not (copy / ".report.md.tmp").exists()


def test_compare_names_the_folder_it_could_not_create(run_dir: Path, tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit) as err:
        report.main(["compare", f"runs=[{run_dir}]", f"out={blocker / 'cmp'}"])
    assert err.value.code == 3
    assert capsys.readouterr().err.startswith(f"error: could not write {blocker / 'cmp'} (Not a directory), "
                                              "so the comparison is not saved")


def test_report_cli_errors(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="does not exist"):
        report.main([f"run_dir={tmp_path / 'nope'}"])
    with pytest.raises(SystemExit, match="has no plan.json"):
        report.main([f"run_dir={tmp_path}"])
    with pytest.raises(SystemExit, match="unknown report command 'bogus'"):
        report.main(["bogus", f"run_dir={tmp_path}"])


def test_plan_section_names_the_schedule(run_dir: Path) -> None:
    plan = json.loads((run_dir / "plan.json").read_text())
    assert "steps, cosine" in "\n".join(report.plan_section(plan))
    plan["schedule"] = "wsd: constant, then the last 20% decay linear"
    assert "steps, wsd: constant, then the last 20% decay linear" in "\n".join(report.plan_section(plan))
