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
from picollm.export import load_weights
from picollm.train import TrainError, run
from picollm.trainer import SpikeDetector
from tests.conftest import TINY, prepare_first

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
    deadline = time.time() + timeout  # a safety net: the wait ends on progress
    while time.time() < deadline and proc.poll() is None:
        if len(new_train_records(run_dir, 0)) >= n:
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


def new_train_records(run_dir, skip_lines):
    """Train records logged after the first ``skip_lines`` lines; a line still being
    written is skipped, not parsed."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines()[skip_lines:]:
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if r.get("kind") == "train":
            out.append(r)
    return out


class Progress:
    """What one attempt has done so far, read from run_dir: the kill test acts on this."""

    def __init__(self, run_dir):
        self.run_dir, self.d = Path(run_dir), ckpt.ckpt_dir(run_dir)
        metrics = self.run_dir / "metrics.jsonl"
        self.lines = len(metrics.read_text().splitlines()) if metrics.exists() else 0
        self.plan_mtime = self.mtime(self.run_dir / "plan.json")
        self.checkpoints, self.temps = set(ckpt.list_checkpoints(run_dir)), set(self.temp_files())

    @staticmethod
    def mtime(path):
        return path.stat().st_mtime_ns if path.exists() else None

    def temp_files(self):
        return [p.name for p in self.d.iterdir() if ckpt.TMP_RE.match(p.name)] if self.d.is_dir() else []

    def steps(self):
        return [r["step"] for r in new_train_records(self.run_dir, self.lines)]

    def reached(self, kind, n=0):
        if kind == "startup":  # plan.json rewritten: past the data checks, before the first step
            return self.mtime(self.run_dir / "plan.json") != self.plan_mtime
        if kind == "steps":  # n steps done in this attempt
            return len(self.steps()) >= n
        if kind == "save":  # a save under way (a new temporary file) or just done (a new checkpoint)
            return bool(set(self.temp_files()) - self.temps or set(ckpt.list_checkpoints(self.run_dir)) - self.checkpoints)
        if kind == "end":  # the last step logged: the final evaluation, save and export are next
            return n in self.steps()
        raise ValueError(kind)


def kill_when(proc, progress, kind, n=0, timeout=180):
    """SIGKILL ``proc`` once ``progress`` reached the point; True if it was killed, False if it
    exited by itself first. The timeout is only a safety net against a hung run."""
    deadline = time.time() + timeout
    while proc.poll() is None:
        if progress.reached(kind, n):
            proc.kill()
            break
        assert time.time() < deadline, f"attempt never reached {kind} {n}"
        time.sleep(0.002)
    return proc.wait(timeout=60) == -signal.SIGKILL


@pytest.mark.slow
def test_repeated_sigkill_loses_at_most_one_save_interval(tmp_path, reference):
    """Killed with SIGKILL mid-step, at a save, during start-up, at a save again and after the
    last step (in the final evaluation, save or export); each rerun resumes, and the finished
    run is bitwise the uninterrupted one. Kills follow the run's progress, not the clock."""
    run_dir = tmp_path / "run"
    schedule = [("steps", 3), ("save", 0), ("startup", 0), ("save", 0), ("end", 12)]
    kills = 0
    for kind, n in schedule + [(None, 0)]:
        before = ckpt.list_checkpoints(run_dir)
        progress = Progress(run_dir)
        proc = start(run_dir)
        if kind is None:
            out, _ = proc.communicate(timeout=300)
            assert proc.returncode == 0, out
            break
        killed = kill_when(proc, progress, kind, n)
        out = proc.stdout.read()
        assert killed, f"the run ended before the kill at {kind} {n}:\n{out}"
        kills += 1
        after = ckpt.list_checkpoints(run_dir)
        assert not before or after[-1] >= before[-1]  # checkpoints only move forward
        # What the kill cost: steps done since the newest valid checkpoint, at most one interval.
        latest = ckpt.latest_valid(run_dir)
        resume_at = int(latest.stem.split("_")[1]) if latest else 0
        assert max(losses(run_dir), default=0) - resume_at <= 2
    assert kills == len(schedule)
    assert ckpt.list_checkpoints(run_dir)[-1] == 12
    for step in ckpt.list_checkpoints(run_dir):
        assert ckpt.verify(ckpt.ckpt_dir(run_dir) / f"step_{step:07d}.pt") is None
    assert not [p.name for p in ckpt.ckpt_dir(run_dir).iterdir() if p.name.startswith(".")]  # no temp files left
    assert not (ckpt.ckpt_dir(run_dir) / "corrupt").exists()  # a kill never leaves a corrupt checkpoint
    assert losses(run_dir) == losses(reference)
    assert same_weights(checkpoint_state(run_dir, 12)["model"], checkpoint_state(reference, 12)["model"])
    assert (run_dir / "model.safetensors").exists() and (run_dir / "final.json").exists()


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
                                    "debug.nan_loss_at_steps=[2]", f"run_dir={run_dir}"]))
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
                                    "debug.inf_grad_at_steps=[1]", f"run_dir={run_dir}"]))
    assert final["skipped_steps"] == 1
    assert records(run_dir)[2][-1]["skipped"]
    assert same_weights(checkpoint_state(run_dir, 1)["model"], checkpoint_state(run_dir, 2)["model"])


def test_consecutive_bad_steps_roll_back_with_a_lower_lr(tmp_path):
    run_dir = tmp_path / "run"
    final = run(load_config(BASE + ["train.steps=10", "train.save_every=2", "train.keep_checkpoints=5",
                                    "debug.nan_loss_at_steps=[4,5,6]", "train.max_bad_steps=3",
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
        run(load_config(BASE + ["train.steps=8", "debug.nan_loss_at_steps=[1,2,3]", "train.on_bad_steps=stop",
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


def test_a_setting_that_does_not_define_the_run_never_blocks_a_resume(tmp_path):
    """Resume compatibility lists the settings that define a run, so a setting added later
    (or anything under extra) continues the run without joining any list."""
    from picollm.plan import config_changes
    run_dir = tmp_path / "run"
    run(load_config(BASE + ["train.steps=4", f"run_dir={run_dir}"]))
    saved = checkpoint_state(run_dir, 4)["config"]
    newer = json.loads(json.dumps(saved))
    newer["train"]["a_future_setting"], newer["wandb"]["another"], newer["a_future_group"] = 1, 2, {"x": 3}
    assert config_changes(saved, newer) == []
    newer["train"]["seed"] += 1
    assert config_changes(saved, newer) == ["train.seed"]
    final = run(load_config(BASE + ["train.steps=6", "extra={note: continued}", f"run_dir={run_dir}"]))
    assert final["steps"] == 6 and sorted(losses(run_dir)) == list(range(1, 7))


def test_extending_a_finished_run_continues_its_schedule(tmp_path):
    run_dir = tmp_path / "run"
    run(load_config(BASE + ["train.steps=4", f"run_dir={run_dir}"]))
    final = run(load_config(BASE + ["train.steps=8", f"run_dir={run_dir}"]))
    assert final["steps"] == 8 and sorted(losses(run_dir)) == list(range(1, 9))
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["steps"] == 8 and records(run_dir)[8][-1]["lr"] == pytest.approx(plan["min_lr"])
    # Dropping train.steps would let the budget re-derive another run: one sentence, nothing trained.
    with pytest.raises(ConfigError, match=r"holds a run of train.steps=8; resume it with train.steps=8"):
        run(load_config(BASE + [f"run_dir={run_dir}"]))
    assert sorted(losses(run_dir)) == list(range(1, 9))


def test_final_weights_load_without_training_state(tmp_path):
    run_dir = tmp_path / "run"
    run(load_config(BASE + ["train.steps=3", f"run_dir={run_dir}"]))
    model = load_weights(run_dir).eval()
    from picollm.saved_run import load_run
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
    run(load_config(BASE + ["train.steps=8", "train.save_every=2", "debug.nan_loss_at_steps=[3,4,5]",
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


# ----------------------------------------------------------------------------- retention and corrupt checkpoints

def corrupt(path):
    """A torn write: the checkpoint keeps its manifest but loses its tail."""
    target = max(Path(path).iterdir(), key=lambda p: p.stat().st_size) if Path(path).is_dir() else Path(path)
    with open(target, "r+b") as f:
        f.truncate(target.stat().st_size // 2)


def test_corrupt_newer_checkpoints_never_displace_valid_ones(tmp_path, capsys):
    """A run restarted behind a corrupt step 500 keeps its own steps 10, 20, 30 (the newest
    two of them), sets the corrupt one aside, and a rerun would resume from step 30."""
    ckpt.save_checkpoint(tmp_path, 500, {"step": 500, "model": {}}, keep=2)
    corrupt(ckpt.step_path(tmp_path, 500))
    ckpt.save_checkpoint(tmp_path, 10, {"step": 10, "model": {}}, keep=2)
    assert ckpt.list_checkpoints(tmp_path) == [10]
    assert "step_0000500.pt is corrupt" in capsys.readouterr().err
    for step in (20, 30):
        ckpt.save_checkpoint(tmp_path, step, {"step": step, "model": {}}, keep=2)
    assert ckpt.list_checkpoints(tmp_path) == [20, 30]
    assert ckpt.latest_valid(tmp_path) == ckpt.step_path(tmp_path, 30)
    aside = ckpt.ckpt_dir(tmp_path) / "corrupt"
    assert sorted(p.name for p in aside.iterdir()) == ["step_0000500.json", "step_0000500.pt"]  # moved, not deleted


def test_the_checkpoint_just_saved_survives_newer_valid_ones(tmp_path):
    """A run resumed from an earlier checkpoint (train.resume=PATH) keeps what it saves, even
    with keep=1 and a valid newer-numbered checkpoint beside it."""
    ckpt.save_checkpoint(tmp_path, 500, {"step": 500}, keep=1)
    ckpt.save_checkpoint(tmp_path, 10, {"step": 10}, keep=1)
    assert ckpt.list_checkpoints(tmp_path) == [10, 500]
    ckpt.save_checkpoint(tmp_path, 20, {"step": 20}, keep=1)
    assert ckpt.list_checkpoints(tmp_path) == [20, 500]


def test_a_second_corrupt_copy_of_a_step_is_set_aside_beside_the_first(tmp_path):
    for _ in range(2):
        ckpt.save_checkpoint(tmp_path, 500, {"step": 500}, keep=2)
        corrupt(ckpt.step_path(tmp_path, 500))
        ckpt.save_checkpoint(tmp_path, 10, {"step": 10}, keep=2)
    names = sorted(p.name for p in (ckpt.ckpt_dir(tmp_path) / "corrupt").iterdir())
    assert names == ["step_0000500-1.json", "step_0000500-1.pt", "step_0000500.json", "step_0000500.pt"]


def test_pruning_hashes_each_checkpoint_once_per_process(tmp_path, monkeypatch):
    """Verification is cached by size, mtime and inode: ten saves hash no old checkpoint twice,
    and a checkpoint changed on disk is hashed again."""
    ckpt.save_checkpoint(tmp_path, 1, {"step": 1}, keep=3)
    ckpt._VERIFIED.clear()  # as in a fresh process that resumed from this run_dir
    hashed = []
    real = ckpt._verify
    monkeypatch.setattr(ckpt, "_verify", lambda path: hashed.append(Path(path).name) or real(path))
    for step in range(2, 12):
        ckpt.save_checkpoint(tmp_path, step, {"step": step}, keep=3)
    assert hashed == ["step_0000001.pt"]  # the new ones were hashed while being written
    corrupt(ckpt.step_path(tmp_path, 10))
    ckpt.save_checkpoint(tmp_path, 12, {"step": 12}, keep=3)
    assert hashed == ["step_0000001.pt", "step_0000010.pt"]  # only the changed one again
    assert ckpt.list_checkpoints(tmp_path) == [9, 11, 12]


def test_sharded_checkpoints_follow_the_same_retention_rule(tmp_path):
    """Real DCP folders written by a one-process gloo group: a corrupt newer folder is set
    aside and the new valid folders are kept."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        def save(step):
            tensors = {"model": {"w": torch.full((64,), float(step))}, "optimizer": {}}
            return ckpt.save_sharded(tmp_path, step, tensors, {"step": step}, is_main=True, keep=2)
        corrupt(save(500))
        for step in (10, 20, 30):
            save(step)
    finally:
        dist.destroy_process_group()
    assert ckpt.list_checkpoints(tmp_path) == [20, 30]
    assert (ckpt.ckpt_dir(tmp_path) / "corrupt" / "step_0000500").is_dir()
    latest = ckpt.latest_valid(tmp_path)
    assert latest.name == "step_0000030" and torch.equal(ckpt.load_checkpoint(latest)["model"]["w"], torch.full((64,), 30.0))
    assert not [p.name for p in ckpt.ckpt_dir(tmp_path).iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_a_rerun_behind_corrupt_checkpoints_keeps_its_own_and_resumes_from_them(tmp_path, reference, capsys):
    """End to end: every checkpoint of a finished run is corrupt; a rerun starts from step 0,
    is stopped part-way, and the next rerun resumes where it stopped (before, retention had
    deleted the new checkpoints in favour of the corrupt steps 8 and 12, so it began at 0 again)."""
    run_dir = tmp_path / "run"
    run(load_config(BASE + ["train.steps=12", "train.save_every=4", f"run_dir={run_dir}"]))
    assert ckpt.list_checkpoints(run_dir) == [8, 12]
    for step in (8, 12):
        corrupt(ckpt.step_path(run_dir, step))
    (run_dir / "metrics.jsonl").unlink()  # only the reruns' records from here on
    proc = start(run_dir)
    assert wait_for_steps(run_dir, 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out
    stopped_at = max(losses(run_dir))
    assert stopped_at < 8 and ckpt.list_checkpoints(run_dir)[-1] == stopped_at
    capsys.readouterr()
    run(load_config(BASE + ["train.steps=12", "train.save_every=2", f"run_dir={run_dir}"]))
    assert f"at step {stopped_at}" in capsys.readouterr().out
    assert all(len(rs) == 1 for step, rs in records(run_dir).items() if step <= stopped_at)  # not trained twice
    assert losses(run_dir) == losses(reference)


# ----------------------------------------------------------------------------- writers

WRITER = """
import sys, time
from pathlib import Path
import torch
from picollm import checkpoint as ckpt
run_dir, go = Path(sys.argv[1]), Path(sys.argv[2])
state = {"step": 1, "model": {"w": torch.arange(200_000, dtype=torch.float32)}}
print("ready", flush=True)
while not go.exists():
    time.sleep(0.001)
for _ in range(25):
    ckpt.save_checkpoint(run_dir, 1, state, keep=2)
"""


@pytest.mark.slow
def test_two_processes_saving_the_same_checkpoint_do_not_collide(tmp_path):
    """Both write step 1 at once, 25 times each: their temporary files have different names,
    so neither fails (with one shared name, one would rename the other's file away)."""
    go = tmp_path / "go"
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path / "run"), str(go)], cwd=REPO, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": str(REPO)}) for _ in range(2)]
    for w in writers:
        assert w.stdout.readline().strip() == "ready"  # both imported torch: start together
    go.touch()
    for w in writers:
        out, _ = w.communicate(timeout=120)
        assert w.returncode == 0, out
    assert ckpt.list_checkpoints(tmp_path / "run") == [1]
    assert ckpt.verify(ckpt.step_path(tmp_path / "run", 1)) is None
    assert not [p.name for p in ckpt.ckpt_dir(tmp_path / "run").iterdir() if p.name.startswith(".")]


def test_a_failed_write_removes_only_its_own_temporary_file(tmp_path):
    d = ckpt.ckpt_dir(tmp_path)
    d.mkdir(parents=True)
    (d / "step_0000003.pt").mkdir()  # the rename onto it fails
    (d / "step_0000003.pt" / "x").touch()
    live = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:  # another writer, alive, in the middle of its own save of the same step
        other = d / f".step_0000003.pt.{ckpt.HOST}.{live.pid}.0123abcd.tmp"
        other.write_bytes(b"half a checkpoint")
        with pytest.raises(ckpt.CheckpointError, match="could not write checkpoint"):
            ckpt.save_checkpoint(tmp_path, 3, {"step": 3})
        assert sorted(p.name for p in d.iterdir()) == [other.name, "step_0000003.pt"]
        ckpt.save_checkpoint(tmp_path, 4, {"step": 4})  # a later save sweeps dead writers' files only
        assert other.exists()
    finally:
        live.communicate(b"")
    ckpt.save_checkpoint(tmp_path, 5, {"step": 5})
    assert not other.exists()  # its writer is dead now


def test_a_directory_fsync_the_filesystem_refuses_is_best_effort(tmp_path, monkeypatch):
    """Some network filesystems answer fsync on a directory with EINVAL. None is available
    here, so os.fsync raises it for directory descriptors only; file fsyncs stay real."""
    import errno
    import stat
    real_fsync = os.fsync
    answer = {"errno": errno.EINVAL}

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(answer["errno"], os.strerror(answer["errno"]))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    path = ckpt.save_checkpoint(tmp_path, 1, {"step": 1, "model": {"w": torch.ones(3)}})
    assert ckpt.verify(path) is None and ckpt.load_checkpoint(path)["step"] == 1
    answer["errno"] = errno.EIO  # a real I/O error still stops the save
    with pytest.raises(ckpt.CheckpointError, match="could not write checkpoint .*Input/output error"):
        ckpt.save_checkpoint(tmp_path, 2, {"step": 2})


# ----------------------------------------------------------------------------- not a checkpoint

def test_anything_but_a_checkpoint_is_refused_in_one_sentence(tmp_path):
    from safetensors.torch import save_file
    good = ckpt.save_checkpoint(tmp_path / "run", 2, {"step": 2, "model": {"w": torch.ones(1000)}})
    (tmp_path / "notes.txt").write_text("step 2 looked fine\n")
    save_file({"w": torch.ones(4)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "some_folder").mkdir()
    truncated = tmp_path / "step_0000002.pt"
    truncated.write_bytes(good.read_bytes()[:2000])  # copied without its manifest, and torn
    torch.save({"w": torch.ones(2)}, tmp_path / "weights.pt")  # a torch file, but only weights
    cases = {"notes.txt": "not a file written by torch.save", "model.safetensors": "not a file written by torch.save",
             "some_folder": "a folder without train_state.pt", "run": "a run directory, not a checkpoint",
             "step_0000002.pt": "torch.load cannot read it", "weights.pt": "a torch file without a step and model state"}
    for name, why in cases.items():
        with pytest.raises(ckpt.CheckpointError) as err:
            ckpt.load_checkpoint(tmp_path / name)
        message = str(err.value)
        assert message.startswith(f"{tmp_path / name} is not a picollm checkpoint ({why}")
        assert message.endswith("pass a checkpoints/step_XXXXXXX.pt file or checkpoints/step_XXXXXXX folder "
                                "written by picollm.train.")
        assert "\n" not in message and "Traceback" not in message
    assert ckpt.load_checkpoint(good)["step"] == 2


def test_train_resume_pointing_at_a_text_file_fails_with_that_sentence(tmp_path):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(ckpt.CheckpointError, match="notes.txt is not a picollm checkpoint"):
        run(load_config(BASE + ["train.steps=2", "train.peak_flops=1e11", f"train.resume={tmp_path / 'notes.txt'}",
                                f"run_dir={tmp_path / 'run'}"]))
    assert not ckpt.list_checkpoints(tmp_path / "run")


# ----------------------------------------------------------------------------- RNG state per rank

def draws():
    import numpy as np
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_rng_state_on_cpu_round_trips_exactly_and_holds_no_device_entry():
    state = ckpt.rng_state(torch.device("cpu"))
    assert set(state) == {"python", "numpy", "torch"}  # CPU: torch's generator is the device's
    expected = draws()
    draws()
    ckpt.set_rng_state(state, torch.device("cpu"))
    assert draws() == expected


def saved_states(world_size):
    import numpy as np
    states = []
    for rank in range(world_size):
        torch.manual_seed(rank)
        random.seed(rank)
        np.random.seed(rank)
        states.append(ckpt.rng_state(torch.device("cpu")))
    return states


@pytest.mark.parametrize("saved,resumed", [(8, 2), (2, 8), (1, 1)])
def test_each_rank_resumes_its_own_rng_state_or_a_distinct_deterministic_one(saved, resumed):
    states = saved_states(saved)
    chosen = [ckpt.rank_rng_state(states, rank) for rank in range(resumed)]
    for rank in range(min(saved, resumed)):
        assert chosen[rank] is states[rank]
    streams = []
    for state in chosen:
        ckpt.set_rng_state(state, torch.device("cpu"))
        streams.append(draws())
    assert len(set(map(str, streams))) == resumed  # no two ranks share a stream
    again = ckpt.rank_rng_state(saved_states(saved), resumed - 1)
    ckpt.set_rng_state(again, torch.device("cpu"))
    assert draws() == streams[-1]  # a substitute is the same on every resume


@pytest.fixture
def cuda_untouchable(monkeypatch):
    def touched(*args, **kwargs):
        raise AssertionError("CUDA was touched")
    for name in ("is_available", "current_device", "get_rng_state", "set_rng_state", "set_rng_state_all",
                 "manual_seed", "device"):
        monkeypatch.setattr(torch.cuda, name, touched)


def test_an_old_per_gpu_rng_state_restores_on_cpu_without_touching_cuda(cuda_untouchable):
    """Checkpoints used to hold every visible GPU's state (here 8); on a CPU device they
    restore the CPU generators and leave CUDA alone."""
    state = ckpt.rng_state(torch.device("cpu"))
    state["cuda"] = [torch.zeros(16, dtype=torch.uint8) for _ in range(8)]
    expected = draws()
    ckpt.set_rng_state(state, torch.device("cpu"))
    assert draws() == expected
    substitute = ckpt.rank_rng_state([state], 5)
    ckpt.set_rng_state(substitute, torch.device("cpu"))  # its device seed is ignored on CPU too


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_rng_state_on_a_gpu_holds_and_restores_only_that_device():
    device = torch.device("cuda", torch.cuda.device_count() - 1)
    state = ckpt.rng_state(device)
    assert state["device"]["index"] == device.index and state["device"]["state"].dtype == torch.uint8
    expected = torch.rand(4, device=device).tolist()
    ckpt.set_rng_state(state, device)
    assert torch.rand(4, device=device).tolist() == expected
    old = {**state, "cuda": [state.pop("device")["state"]] * 8}  # the old per-GPU list, more GPUs than here
    ckpt.set_rng_state(old, device)
    assert torch.rand(4, device=device).tolist() == expected


@pytest.mark.slow
def test_a_run_resumed_after_a_deadline_cut_can_move_its_end_out_again(tmp_path):
    """A budget.minutes run cut while the machine was slow is resumed from a checkpoint saved
    after the cut, on a machine back to speed: its deadline moves the end past the cut step
    and the data keeps coming (the loader once stopped at the cut step, and the resumed run
    ended in a StopIteration traceback there)."""
    run_dir = tmp_path / "run"
    prepare_first(TINY)
    cmd = [sys.executable, "-m", "picollm.train", *TINY, f"run_dir={run_dir}", "budget.minutes=0.4",
           "train.dtype=fp32"]
    # 0.05 s more a step: 1.5x a planned step beside another CPU-heavy process, 3x idle here.
    # The first check (at 1/20 of the planned steps) cuts; SIGTERM then saves at once, and the
    # resumed run checks its pace again at 2/20, early in the schedule, where the end may
    # still move out.
    slow = subprocess.Popen(cmd + ["debug.slow_steps_from=1", "debug.slow_step_seconds=0.05"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics, waited = run_dir / "metrics.jsonl", time.time() + 300  # a safety net: the wait ends on progress
    while slow.poll() is None and '"deadline"' not in (metrics.read_text() if metrics.is_file() else ""):
        assert time.time() < waited, "the slow run never cut its schedule"
        time.sleep(0.01)
    slow.send_signal(signal.SIGTERM)
    out, _ = slow.communicate(timeout=120)
    assert slow.returncode == 128 + signal.SIGTERM, out[-3000:]
    cut_last = checkpoint_state(run_dir, ckpt.list_checkpoints(run_dir)[-1])["stats"]["deadline"]["last"]
    assert cut_last < json.loads((run_dir / "plan.json").read_text())["steps"]

    fast = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert fast.returncode == 0, fast.stdout[-3000:] + fast.stderr[-3000:]
    assert "Traceback" not in fast.stderr
    final = json.loads((run_dir / "final.json").read_text())
    assert final["steps"] > cut_last, (final["steps"], cut_last)
