"""Fault tolerance: signals, kill -9, bad steps, corrupt checkpoints, full disks, config
changes on resume, and the final exported weights. Every resume is checked against an
uninterrupted run, bitwise in fp32 on CPU."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from picollm import checkpoint as ckpt
from picollm.config import ConfigError, load_config
from picollm.train import SpikeDetector, TrainError, load_weights, run
from tests.conftest import TINY

REPO = Path(__file__).resolve().parents[1]
BASE = TINY + ["train.batch_tokens=256", "train.dtype=fp32", "train.warmup_steps=2", "train.eval_every=1000"]


def records(run_dir, kind="train"):
    """Metrics by step; a step logged twice (replayed after a crash) keeps its last record."""
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["kind"] == kind:
            out.setdefault(r["step"], []).append(r)
    return out


def losses(run_dir):
    return {step: rs[-1]["loss"] for step, rs in records(run_dir).items()}


def checkpoint_state(run_dir, step):
    return ckpt.load_checkpoint(ckpt.ckpt_dir(run_dir) / f"step_{step:07d}.pt")


def same_weights(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 12-step run every resume is compared against."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run(load_config(BASE + ["train.steps=12", f"run_dir={run_dir}"]))
    return run_dir


def start(run_dir, *extra):
    cmd = [sys.executable, "-m", "picollm.train", *BASE, "train.steps=12", "train.save_every=2", "train.peak_flops=1e11",
           f"run_dir={run_dir}", *extra]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})


def wait_for_steps(run_dir, n, proc, timeout=120):
    deadline = time.time() + timeout
    path = Path(run_dir) / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if path.exists() and len(records(run_dir)) >= n:
            return True
        time.sleep(0.01)
    return False


def test_sigterm_saves_and_the_rerun_continues_exactly(tmp_path, reference):
    run_dir = tmp_path / "run"
    proc = start(run_dir, "train.steps=12")
    assert wait_for_steps(run_dir, 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "stopped by SIGTERM" in out and "Rerun the same command" in out
    stopped_at = ckpt.list_checkpoints(run_dir)[-1]
    assert 3 <= stopped_at < 12 and max(losses(run_dir)) == stopped_at
    run(load_config(BASE + ["train.steps=12", "train.save_every=2", f"run_dir={run_dir}"]))
    assert losses(run_dir) == losses(reference)
    assert same_weights(checkpoint_state(run_dir, 12)["model"], checkpoint_state(reference, 12)["model"])


@pytest.mark.slow
def test_repeated_sigkill_loses_at_most_one_save_interval(tmp_path, reference):
    run_dir = tmp_path / "run"
    rng = random.Random(0)
    kills = 0
    for attempt in range(12):
        before = ckpt.list_checkpoints(run_dir)
        proc = start(run_dir)
        if kills < 5:
            time.sleep(rng.uniform(1.0, 4.0))  # anywhere: start-up, a step, an eval or a save
            if proc.poll() is None:
                proc.kill()
                kills += 1
            proc.wait(timeout=60)
        else:
            out, _ = proc.communicate(timeout=300)
            assert proc.returncode == 0, out
        after = ckpt.list_checkpoints(run_dir)
        if before and after:  # checkpoints only move forward
            assert after[-1] >= before[-1]
        if proc.returncode != 0 and (run_dir / "metrics.jsonl").exists():
            # What the kill cost: steps done since the newest valid checkpoint, at most one interval.
            latest = ckpt.latest_valid(run_dir)
            resume_at = int(latest.stem.split("_")[1]) if latest else 0
            assert max(losses(run_dir), default=0) - resume_at <= 2
        if proc.returncode == 0:
            break
    assert kills >= 3
    assert ckpt.list_checkpoints(run_dir)[-1] == 12
    for step in ckpt.list_checkpoints(run_dir):
        assert ckpt.verify(ckpt.ckpt_dir(run_dir) / f"step_{step:07d}.pt") is None
    assert not list(ckpt.ckpt_dir(run_dir).glob(".*.tmp"))
    assert losses(run_dir) == losses(reference)
    assert same_weights(checkpoint_state(run_dir, 12)["model"], checkpoint_state(reference, 12)["model"])


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(tmp_path, reference, capsys):
    run_dir = tmp_path / "run"
    run(load_config(BASE + ["train.steps=12", "train.save_every=4", "train.keep_checkpoints=3",
                            f"run_dir={run_dir}"]))
    d = ckpt.ckpt_dir(run_dir)
    for suffix in (".pt", ".json"):
        (d / f"step_0000012{suffix}").unlink()  # as if killed before the final save
    with open(d / "step_0000008.pt", "r+b") as f:
        f.truncate(1000)  # a torn write of the newest remaining checkpoint
    run(load_config(BASE + ["train.steps=12", "train.save_every=4", f"run_dir={run_dir}"]))
    out = capsys.readouterr().out
    assert "step_0000008.pt is corrupt" in out and "at step 4" in out
    assert losses(run_dir) == losses(reference)


def test_nan_loss_skips_the_update_and_leaves_state_untouched(tmp_path):
    run_dir = tmp_path / "run"
    final = run(load_config(BASE + ["train.steps=4", "train.save_every=1", "train.keep_checkpoints=10",
                                    "train.inject_nan_loss=[2]", f"run_dir={run_dir}"]))
    assert final["skipped_steps"] == 1
    steps = records(run_dir)
    assert steps[3][-1]["skipped"] and not steps[2][-1]["skipped"] and not steps[4][-1]["skipped"]
    before, after = checkpoint_state(run_dir, 2), checkpoint_state(run_dir, 3)
    assert same_weights(before["model"], after["model"])
    for a, b in zip(before["optimizer"]["state"].values(), after["optimizer"]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    events = records(run_dir, "event")
    assert events[3][0]["event"] == "skipped_step"


def test_inf_gradient_skips_the_update(tmp_path):
    run_dir = tmp_path / "run"
    final = run(load_config(BASE + ["train.steps=4", "train.save_every=1", "train.keep_checkpoints=10",
                                    "train.inject_inf_grad=[1]", f"run_dir={run_dir}"]))
    assert final["skipped_steps"] == 1
    assert records(run_dir)[2][-1]["skipped"]
    assert same_weights(checkpoint_state(run_dir, 1)["model"], checkpoint_state(run_dir, 2)["model"])


def test_consecutive_bad_steps_roll_back_with_a_lower_lr(tmp_path):
    run_dir = tmp_path / "run"
    final = run(load_config(BASE + ["train.steps=10", "train.save_every=2", "train.keep_checkpoints=5",
                                    "train.inject_nan_loss=[4,5,6]", "train.max_bad_steps=3",
                                    f"run_dir={run_dir}"]))
    assert final["rollbacks"] == 1 and final["skipped_steps"] == 3 and final["steps"] == 10
    events = [r for rs in records(run_dir, "event").values() for r in rs]
    rollback = next(e for e in events if e["event"] == "rollback")
    assert rollback["lr_scale"] == 0.5 and rollback["step"] == 6  # back to the save after step 6
    train = records(run_dir)
    # Step 7 ran twice: bad at the scheduled LR, then again after the rollback at half of it.
    assert len(train[7]) == 2 and train[7][0]["skipped"] and not train[7][1]["skipped"]
    assert train[7][1]["lr"] == pytest.approx(0.5 * train[7][0]["lr"])
    assert train[10][-1]["lr"] > 0 and not train[10][-1]["skipped"]


def test_bad_steps_stop_with_a_clear_message(tmp_path):
    with pytest.raises(TrainError, match="3 non-finite steps in a row.*train.on_bad_steps=stop"):
        run(load_config(BASE + ["train.steps=8", "train.inject_nan_loss=[1,2,3]", "train.on_bad_steps=stop",
                                f"run_dir={tmp_path / 'run'}"]))


def test_spike_detector_flags_a_jump_and_not_noise():
    det = SpikeDetector(sigmas=6.0)
    rng = random.Random(0)
    noise = [det.update(3.0 - 0.01 * i + rng.gauss(0, 0.02)) for i in range(60)]
    assert not any(noise)
    spike = det.update(4.5)
    assert spike and spike["loss"] == 4.5 and spike["mean"] == pytest.approx(2.5, abs=0.2)


def test_changed_model_is_refused_and_harmless_changes_are_logged(tmp_path, capsys):
    run_dir = tmp_path / "run"
    overrides = BASE + ["train.steps=4", "train.save_every=2", f"run_dir={run_dir}"]
    run(load_config(overrides))
    with pytest.raises(ConfigError, match="different model.d_model"):
        run(load_config(overrides + ["model.d_model=128"]))
    with pytest.raises(ConfigError, match="different train.lr"):
        run(load_config(overrides + ["train.lr=0.1"]))
    capsys.readouterr()
    run(load_config(overrides + ["train.eval_every=3"]))
    assert "resuming with changed train.eval_every" in capsys.readouterr().out


def test_extending_a_finished_run_continues_its_schedule(tmp_path):
    run_dir = tmp_path / "run"
    run(load_config(BASE + ["train.steps=4", f"run_dir={run_dir}"]))
    final = run(load_config(BASE + ["train.steps=8", f"run_dir={run_dir}"]))
    assert final["steps"] == 8 and sorted(losses(run_dir)) == list(range(1, 9))
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["steps"] == 8 and records(run_dir)[8][-1]["lr"] == pytest.approx(plan["min_lr"])


def test_final_weights_load_without_training_state(tmp_path):
    run_dir = tmp_path / "run"
    run(load_config(BASE + ["train.steps=3", f"run_dir={run_dir}"]))
    model = load_weights(run_dir).eval()
    from picollm.runs import load_run
    reference = load_run(run_dir).model
    x = torch.randint(0, 300, (2, 16))
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    assert json.loads((run_dir / "model_config.json").read_text())["n_layer"] == 2


def test_unwritable_run_dir_fails_before_any_work(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(TrainError, match="not writable"):
        run(load_config(BASE + ["train.steps=2", f"run_dir={blocker / 'run'}"]))


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"), reason="needs root to mount a small tmpfs")
def test_full_disk_fails_clearly_and_keeps_the_previous_checkpoint(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)]).returncode != 0:
        pytest.skip("could not mount a tmpfs here")
    try:
        run_dir = disk / "run"
        # One checkpoint (~1.9 MB: weights + two AdamW moments) fits in 3 MB; a second does not.
        with pytest.raises(TrainError, match="could not write checkpoint .* free disk space"):
            run(load_config(BASE + ["train.steps=6", "train.save_every=1", f"run_dir={run_dir}"]))
        assert ckpt.list_checkpoints(run_dir) == [1]
        assert ckpt.verify(ckpt.ckpt_dir(run_dir) / "step_0000001.pt") is None
        assert not list(ckpt.ckpt_dir(run_dir).glob(".*tmp"))
    finally:
        subprocess.run(["umount", str(disk)])


def test_a_checkpoint_with_index_keyed_optimizer_state_still_resumes_exactly(tmp_path):
    """Checkpoints key optimizer state by parameter name now; ones written before (keyed by
    index, as optimizer.state_dict() gives it) still resume bit for bit."""
    from picollm.model import GPT, GPTConfig
    from picollm.optim import make_optimizer
    from picollm.parallel import load_training_state

    run_dir = tmp_path / "run"
    overrides = BASE + ["train.steps=6", "train.save_every=2", "train.keep_checkpoints=5", f"run_dir={run_dir}"]
    run(load_config(overrides))
    first = losses(run_dir)
    final_weights = checkpoint_state(run_dir, 6)["model"]
    old = checkpoint_state(run_dir, 2)
    assert set(old["optimizer"]["state"]) == set(old["model"])  # the current layout: by name
    model = GPT(GPTConfig(**old["plan"]["model"]))
    optimizer = make_optimizer(model, 1e-3, 0.1, (0.9, 0.95), torch.device("cpu"))
    load_training_state(model, optimizer, old["model"], old["optimizer"], sharded=False)
    old["optimizer"] = optimizer.state_dict()  # the layout earlier versions wrote
    assert all(isinstance(k, int) for k in old["optimizer"]["state"])
    for step in (2, 4, 6):
        ckpt.manifest_path(ckpt.step_path(run_dir, step)).unlink()
    ckpt.write_file(ckpt.ckpt_dir(run_dir) / "step_0000002.pt", old)
    run(load_config(overrides))
    assert losses(run_dir) == first
    assert same_weights(checkpoint_state(run_dir, 6)["model"], final_weights)


def test_retention_keeps_the_newest_and_the_best(tmp_path):
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(tmp_path, step, {"step": step}, keep=2, extra_keep=2)
    assert ckpt.list_checkpoints(tmp_path) == [2, 3, 4]
    ckpt.save_checkpoint(tmp_path, 5, {"step": 5}, keep=2, extra_keep=None)
    assert ckpt.list_checkpoints(tmp_path) == [4, 5]


def test_report_lists_skipped_steps_and_rollbacks(tmp_path):
    from picollm.report import write_report
    run_dir = tmp_path / "run"
    run(load_config(BASE + ["train.steps=8", "train.save_every=2", "train.inject_nan_loss=[3,4,5]",
                            f"run_dir={run_dir}"]))
    text = write_report(run_dir).read_text()
    assert "## Events" in text and "3 skipped steps, 1 rollback" in text
    assert "| 4 | rollback |" in text  # bad steps 4-6; the newest checkpoint then is step 4


def test_bf16_resume_matches_the_uninterrupted_run(tmp_path):
    """The contract's bf16 half: per-step losses equal within 1e-6 absolute (on CPU the
    bf16 kernels are deterministic, so this is tight; on GPU allow ~1e-3)."""
    base = TINY + ["train.batch_tokens=256", "train.dtype=bf16", "train.warmup_steps=2", "train.eval_every=1000",
                   "train.steps=6", "train.save_every=3"]
    run(load_config(base + [f"run_dir={tmp_path / 'full'}"]))
    part = tmp_path / "part"
    run(load_config(base + [f"run_dir={part}"]))
    for suffix in (".pt", ".json"):
        (ckpt.ckpt_dir(part) / f"step_0000006{suffix}").unlink()
    run(load_config(base + [f"run_dir={part}"]))
    full, resumed = losses(tmp_path / "full"), losses(part)
    assert sorted(resumed) == list(range(1, 7))
    for step in full:
        assert resumed[step] == pytest.approx(full[step], abs=1e-6)


def test_report_shows_law_prediction_world_size_and_resumes(tmp_path):
    """The report states what the configured law predicted for this (N, D), the world size,
    and each resume as an event; a law fitted by a sweep can be named by its summary.json."""
    from picollm.report import write_report
    from picollm.scaling import EPOCH, ScalingLaw
    run_dir = tmp_path / "run"
    run(load_config(BASE + ["train.steps=4", "train.save_every=2", f"run_dir={run_dir}"]))
    for suffix in (".pt", ".json"):
        (ckpt.ckpt_dir(run_dir) / f"step_0000004{suffix}").unlink()
    run(load_config(BASE + ["train.steps=4", "train.save_every=2", f"run_dir={run_dir}"]))
    plan = json.loads((run_dir / "plan.json").read_text())
    text = write_report(run_dir).read_text()
    assert f"| epoch law's prediction for this (N, D) | {EPOCH.loss(plan['n_params'], plan['n_tokens']):.4f} |" in text
    assert "| world size | 1 process(es) |" in text
    assert "| 2 | resume |" in text
    mine = ScalingLaw(E=1.0, A=50.0, alpha=0.3, B=80.0, beta=0.3)
    (tmp_path / "summary.json").write_text(json.dumps({"parametric": {"E": 1.0, "A": 50.0, "alpha": 0.3,
                                                                       "B": 80.0, "beta": 0.3, "a": 0.5}}))
    run(load_config(BASE + ["train.steps=4", "train.save_every=2", f"plan.law={tmp_path / 'summary.json'}",
                            f"run_dir={run_dir}"]))
    text = write_report(run_dir).read_text()
    assert f"| summary.json law's prediction for this (N, D) | {mine.loss(plan['n_params'], plan['n_tokens']):.4f} |" in text
