"""The training loop end to end on tiny real runs (real tokenizer, shards, loader)."""

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch

from picollm.checkpoint import ckpt_dir, list_checkpoints, load_checkpoint
from picollm.config import load_config
from picollm.train import run
from tests.conftest import TINY, prepare_first

REPO = Path(__file__).resolve().parents[1]


def train(overrides):
    cfg = load_config(overrides)
    final = run(cfg)
    run_dir = Path(cfg.run_dir)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return final, run_dir, [r for r in records if r["kind"] == "train"], [r for r in records if r["kind"] == "eval"]


def final_weights(run_dir):
    step = list_checkpoints(run_dir)[-1]
    return load_checkpoint(ckpt_dir(run_dir) / f"step_{step:07d}.pt")["model"]


def test_tiny_run_learns_and_writes_its_outputs(tiny, monkeypatch):
    from picollm import report

    def from_disk(*args, **kwargs):
        raise AssertionError("the end-of-run report samples the model in memory, not a checkpoint from disk")
    monkeypatch.setattr(report, "load_run", from_disk)
    final, run_dir, steps, evals = train(tiny + ["budget.tokens=60000", "train.dtype=fp32", "train.report=true"])
    for name in ("config.yaml", "plan.json", "metrics.jsonl", "tokenizer.json", "final.json", "report.md", "loss.png",
                 "model.safetensors"):
        assert (run_dir / name).exists(), name
    plan = json.loads((run_dir / "plan.json").read_text())
    assert len(steps) == plan["steps"] and steps[-1]["tokens"] == plan["n_tokens"]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == plan["steps"]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0, "validation loss did not fall"
    assert math.isfinite(final["val_bpb"]) and final["val_bpb"] > 0
    # FLOPs bookkeeping follows docs/conventions.md: C = flops_per_token * tokens.
    assert steps[-1]["flops"] == plan["flops_per_token"] * plan["n_tokens"]
    # Warmup starts at peak/warmup and cosine ends at min_lr on the last step.
    assert steps[0]["lr"] == pytest.approx(plan["lr"] / plan["warmup_steps"])
    assert steps[-1]["lr"] == pytest.approx(plan["min_lr"])
    assert all(r["mfu"] is not None and r["mfu"] > 0 for r in steps)
    assert list_checkpoints(run_dir)[-1] == plan["steps"]
    report = (run_dir / "report.md").read_text()
    assert "## Samples" in report and f"{final['val_bpb']:.4f}" in report


def test_accumulation_matches_one_big_batch(tmp_path):
    base = ["train.steps=4", "train.batch_tokens=256", "train.dtype=fp32", "train.warmup_steps=1",
            "train.lr=3e-3"]
    from tests.conftest import TINY
    _, run_a, steps_a, _ = train(TINY + base + ["train.micro_batch=8", f"run_dir={tmp_path / 'a'}"])
    _, run_b, steps_b, _ = train(TINY + base + ["train.micro_batch=2", f"run_dir={tmp_path / 'b'}"])
    plan_b = json.loads((run_b / "plan.json").read_text())
    assert plan_b["accum_steps"] == 4
    for a, b in zip(steps_a, steps_b):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    wa, wb = final_weights(run_a), final_weights(run_b)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)


def test_a_run_can_skip_evaluating_the_untrained_model(tmp_path):
    """train.eval_at_start=false (what a sweep's points use) drops the step-0 evaluation only:
    the run trains and ends exactly as it does with it."""
    base = TINY + ["train.steps=4", "train.batch_tokens=256", "train.dtype=fp32", "train.warmup_steps=1",
                   "train.lr=3e-3", "train.eval_every=2"]
    final_a, _, steps_a, evals_a = train(base + [f"run_dir={tmp_path / 'a'}"])
    final_b, _, steps_b, evals_b = train(base + ["train.eval_at_start=false", f"run_dir={tmp_path / 'b'}"])
    assert [e["step"] for e in evals_a] == [0, 2, 4] and [e["step"] for e in evals_b] == [2, 4]
    assert [s["loss"] for s in steps_a] == [s["loss"] for s in steps_b]
    assert final_b["val_loss"] == final_a["val_loss"] and final_b["best_step"] == 4


def test_gradient_clipping_bounds_the_update(tmp_path):
    """Adam's first step moves each weight by ~lr whatever the gradient scale, unless the
    clipped gradient is far below eps: a clip of 1e-12 must freeze the weights."""
    from tests.conftest import TINY
    base = TINY + ["train.steps=1", "train.batch_tokens=128", "train.dtype=fp32", "train.warmup_steps=0",
                   "train.lr=1e-2", "train.weight_decay=0"]
    _, run_free, steps_free, _ = train(base + ["train.grad_clip=0", f"run_dir={tmp_path / 'free'}"])
    _, run_clip, steps_clip, _ = train(base + ["train.grad_clip=1e-12", f"run_dir={tmp_path / 'clip'}"])
    # The logged norm is the one before clipping, the same in both runs.
    assert steps_free[0]["grad_norm"] == pytest.approx(steps_clip[0]["grad_norm"], rel=1e-6)
    torch.manual_seed(1337)
    from picollm.model import GPT
    from picollm.plan import Plan
    init = GPT(Plan(**json.loads((run_free / "plan.json").read_text())).gpt_config()).state_dict()
    w_free, w_clip = final_weights(run_free), final_weights(run_clip)
    key = "blocks.0.attn.qkv.weight"
    moved_free = (w_free[key] - init[key]).abs().mean().item()
    moved_clip = (w_clip[key] - init[key]).abs().mean().item()
    assert moved_free > 5e-3
    assert moved_clip < 1e-4


def test_bf16_autocast_on_cpu(tmp_path):
    from tests.conftest import TINY
    base = TINY + ["train.steps=3", "train.batch_tokens=256", "train.warmup_steps=1"]
    _, _, s32, _ = train(base + ["train.dtype=fp32", f"run_dir={tmp_path / 'a'}"])
    _, run16, s16, _ = train(base + ["train.dtype=bf16", f"run_dir={tmp_path / 'b'}"])
    assert json.loads((run16 / "plan.json").read_text())["dtype"] == "bf16"
    for a, b in zip(s32, s16):
        assert math.isfinite(b["loss"]) and b["loss"] == pytest.approx(a["loss"], abs=0.05)


def test_resume_is_bitwise_exact_in_fp32(tmp_path):
    from tests.conftest import TINY
    base = TINY + ["train.steps=6", "train.batch_tokens=256", "train.dtype=fp32", "train.warmup_steps=2"]
    _, run_full, full, _ = train(base + [f"run_dir={tmp_path / 'full'}"])
    part = tmp_path / "part"
    train(base + ["train.save_every=3", "train.eval_every=100", f"run_dir={part}"])
    # Drop the final checkpoint and the log lines after step 3, as if killed right after the save.
    for step in list_checkpoints(part):
        if step > 3:
            for suffix in (".pt", ".json"):
                (ckpt_dir(part) / f"step_{step:07d}{suffix}").unlink()
    lines = [l for l in (part / "metrics.jsonl").read_text().splitlines()
             if json.loads(l)["kind"] == "train" and json.loads(l)["step"] <= 3]
    (part / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    _, _, resumed, _ = train(base + ["train.save_every=3", "train.eval_every=100", f"run_dir={part}"])
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full]
    wa, wb = final_weights(run_full), final_weights(part)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_finished_run_is_not_trained_again(tiny, monkeypatch):
    overrides = tiny + ["train.steps=2", "train.batch_tokens=128"]
    train(overrides)
    run_dir = Path(load_config(overrides).run_dir)
    before = (run_dir / "metrics.jsonl").read_text()
    (run_dir / "model.safetensors").unlink()  # as if stopped after the last save, before the export

    def never(*args, **kwargs):
        raise AssertionError("a finished run must not build a model, optimizer and loader")
    monkeypatch.setattr("picollm.train.Trainer", never)
    final, _, _, _ = train(overrides)
    assert (run_dir / "model.safetensors").exists()
    assert final["steps"] == 2
    assert (run_dir / "metrics.jsonl").read_text() == before


def test_resume_never_refuses_an_existing_run(tiny):
    overrides = tiny + ["train.steps=1", "train.batch_tokens=128"]
    train(overrides)
    from picollm.train import TrainError
    with pytest.raises(TrainError, match="already has checkpoints"):
        train(overrides + ["train.resume=never"])


def test_wandb_offline_writes_a_local_run(tiny, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    _, run_dir, _, _ = train(tiny + ["train.steps=2", "train.batch_tokens=128", "wandb.mode=offline"])
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert offline and any(offline[0].rglob("*.wandb"))


@pytest.mark.slow
def test_speedrun_honours_a_run_dir_override_in_every_stage(tmp_path):
    """`bash speedrun.sh run_dir=X` once trained in X and then evaluated in runs/speedrun-cpu."""
    run_dir = tmp_path / "speedrun"
    overrides = [o for o in TINY if not o.startswith("train.report")] + [
        f"run_dir={run_dir}", "budget.minutes=null", "train.steps=3", "train.dtype=fp32"]
    env = {**os.environ, "RUN_DIR": str(tmp_path / "not-this-one")}
    out = subprocess.run(["bash", str(REPO / "speedrun.sh"), *overrides], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for name in ("plan.json", "final.json", "eval.json", "report.md", "stage_times.tsv", "model.safetensors"):
        assert (run_dir / name).exists(), name
    assert not (tmp_path / "not-this-one").exists()
    stages = [line.split("\t")[0] for line in (run_dir / "stage_times.tsv").read_text().splitlines()]
    assert stages == ["plan", "data", "train", "evaluate", "sample", "report"]


def test_fp16_loss_scaler_skips_are_not_bad_steps(tiny):
    """With GradScaler an inf gradient is the scaler doing its job (skip, lower the scale);
    four in a row (more than max_bad_steps) must not roll back or stop the run. torch runs
    fp16 autocast and GradScaler on CPU, so this is the GPU code path."""
    final, run_dir, steps, _ = train(tiny + ["train.steps=8", "train.batch_tokens=128", "train.dtype=fp16",
                                             "debug.inf_grad_at_steps=[2,3,4,5]", "train.save_every=100"])
    assert final["rollbacks"] == 0 and final["skipped_steps"] == 0
    assert final["scaler_skips"] >= 4
    scales = {r["step"]: r["loss_scale"] for r in steps}
    assert [r["skipped"] for r in steps if r["step"] in (3, 4, 5, 6)] == [True] * 4
    assert scales[6] == scales[2] / 16  # halved once per overflow
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert not [e for e in events if e.get("event") in ("rollback", "skipped_step")]


def test_fp16_non_finite_losses_still_count_toward_a_rollback(tiny):
    from picollm.train import TrainError

    with pytest.raises(TrainError, match="3 non-finite steps in a row"):
        train(tiny + ["train.steps=8", "train.batch_tokens=128", "train.dtype=fp16", "train.on_bad_steps=stop",
                      "debug.nan_loss_at_steps=[2,3,4]"])


def test_a_second_run_in_the_same_run_dir_is_refused(tiny, tmp_path):
    """Two trainings in one run_dir once interleaved their metrics silently."""
    from picollm.run_lock import RunLock
    from picollm.train import TrainError

    run_dir = Path([o for o in tiny if o.startswith("run_dir=")][0].split("=", 1)[1])
    run_dir.mkdir(parents=True)
    with RunLock(run_dir):  # as if another training held it
        with pytest.raises(TrainError, match="is in use by pid"):
            train(tiny + ["train.steps=1", "train.batch_tokens=128"])
    assert not (run_dir / "metrics.jsonl").exists()
    train(tiny + ["train.steps=1", "train.batch_tokens=128"])  # free again once released
    assert (run_dir / "train.log").read_text().count("run_dir") >= 1


def test_without_run_dir_the_same_command_maps_to_the_same_directory(tmp_path, monkeypatch):
    """"Rerun the same command" must resume even when no run_dir was given."""
    from picollm.train import default_run_dir

    monkeypatch.chdir(tmp_path)
    base = TINY + ["train.steps=2", "train.batch_tokens=128"]
    a, b = default_run_dir(load_config(base)), default_run_dir(load_config(list(reversed(base))))
    assert a == b and a.startswith("runs/run-")
    assert default_run_dir(load_config(base + ["train.log_every=7", "train.save_every=1"])) == a  # harmless
    assert default_run_dir(load_config(base + ["train.seed=2"])) != a
    first = run(load_config(base))
    assert (tmp_path / a / "final.json").exists() and first["steps"] == 2
    again = run(load_config(base))  # finds its finished run instead of starting a new one
    assert again == first and len(list((tmp_path / "runs").iterdir())) == 1


def test_wandb_resumed_run_continues_the_same_wandb_run(tiny, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    base = tiny + ["train.batch_tokens=128", "wandb.mode=offline", "wandb.group=g1", "wandb.tags=[a,b]"]
    _, run_dir, _, _ = train(base + ["train.steps=2"])
    first_id = (run_dir / "wandb_id").read_text()
    train(base + ["train.steps=3"])  # extends the finished run
    assert (run_dir / "wandb_id").read_text() == first_id
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(first_id in p.name for p in runs)  # both sessions log to one wandb run


def test_no_module_but_dist_calls_torch_distributed_collectives():
    """Every collective goes through picollm.dist, which is correct on gloo and NCCL."""
    import re

    pattern = re.compile(r"(torch\.distributed|\bdist)\.(all_reduce|all_gather|all_gather_object|broadcast|"
                         r"broadcast_object_list|barrier|reduce|reduce_scatter|gather|scatter|send|recv)\(")
    offenders = []
    for path in (REPO / "picollm").rglob("*.py"):
        if path.name == "dist.py":
            continue
        text = path.read_text()
        if "import torch.distributed as dist" in text or re.search(r"torch\.distributed\.\w+\(", text):
            offenders += [f"{path.name}: {m.group(0)}" for m in pattern.finditer(text) if m.group(1) != "dist"
                          or "import torch.distributed as dist" in text]
    assert not offenders, offenders


def test_resuming_a_checkpoint_saved_before_vocab_padding_is_refused_in_one_sentence(tiny):
    """vocab 300 pads to 384 rows; a checkpoint with 300 (saved before padding) cannot
    continue (its AdamW moments are 300 rows wide), and says so instead of a shape error."""
    import torch as _torch

    from picollm.checkpoint import write_file
    from picollm.train import TrainError

    base = tiny + ["train.batch_tokens=128", "train.save_every=1"]
    _, run_dir, _, _ = train(base + ["train.steps=1"])
    path = ckpt_dir(run_dir) / "step_0000001.pt"
    state = load_checkpoint(path)
    state["model"]["embed.weight"] = state["model"]["embed.weight"][:300].clone()
    write_file(path, state)
    with pytest.raises(TrainError, match="saved before the vocabulary was padded"):
        train(base + ["train.steps=2"])


def test_auto_dtype_is_measured_once_and_a_resume_keeps_it(tiny, monkeypatch):
    """train.dtype=auto on CPU: the plan's dtype probe decides (here an injected timing in
    which fp32 wins), plan.json records it with the reason, and extending the run resumes
    in that dtype without probing again."""
    from picollm import plan as planmod
    calls = []

    def fp32_wins(gcfg, micro, device):
        calls.append(micro)
        return {"step_seconds": {"fp32": 1.0, "bf16": 2.5}, "seconds": 0.1}
    monkeypatch.setattr(planmod, "dtype_probe", fp32_wins)
    base = tiny + ["train.steps=2", "train.batch_tokens=128", "train.dtype=auto"]
    _, run_dir, _, _ = train(base)
    saved = json.loads((run_dir / "plan.json").read_text())
    assert saved["dtype"] == "fp32" and "2.50x as fast as bf16" in saved["dtype_reason"] and len(calls) == 1

    def never(*args):
        raise AssertionError("a resumed run must not decide its dtype again")
    monkeypatch.setattr(planmod, "dtype_probe", never)
    _, _, steps, _ = train(tiny + ["train.steps=3", "train.batch_tokens=128", "train.dtype=auto"])
    assert [s["step"] for s in steps][-1] == 3
    assert json.loads((run_dir / "plan.json").read_text())["dtype"] == "fp32"


@pytest.mark.slow
def test_budget_minutes_takes_a_late_start_out_of_training(tmp_path):
    """8 s pass between the plan and the first step that the plan did not foresee (a first
    run preparing its data does this): the deadline takes them out of the training time, so
    training ends that much earlier, with the LR decayed, and the whole process stays on time."""
    import sys

    from picollm.trainer import DEADLINE_SLACK

    LATE = 8.0
    run_dir = tmp_path / "run"
    # train.eval_tokens far above what 5% of the budget pays for, and a validation split larger
    # than what it does pay for: the plan evaluates fewer tokens, and training uses its number.
    tiny = [o for o in TINY if not o.startswith("data.val_fraction")] + ["data.val_fraction=0.5"]
    prepare_first(tiny)  # the only late start is the drilled one
    cmd = [sys.executable, "-m", "picollm.train", *tiny, f"run_dir={run_dir}", "budget.minutes=0.5",
           "train.dtype=fp32", f"debug.slow_start_seconds={LATE}", "train.eval_tokens=1000000"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    plan = json.loads((run_dir / "plan.json").read_text())
    final = json.loads((run_dir / "final.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    cuts = [r for r in records if r.get("event") == "deadline"]
    assert cuts and cuts[-1]["late_start_seconds"] >= LATE, cuts
    left = plan["time_budget"]["train_s"] - cuts[-1]["late_start_seconds"]
    # The deadline ended the run; not necessarily before the plan's steps: a probe slowed by a
    # neighbour plans fewer steps than the machine then makes (see the next test). Time is the check.
    assert final["steps"] == cuts[-1]["last_step"]
    assert final["train_seconds"] < 1.15 * DEADLINE_SLACK * left, (final["train_seconds"], left)
    assert final["train_seconds"] < plan["time_budget"]["train_s"] - LATE / 2, (final, plan["time_budget"])
    steps = [r for r in records if r["kind"] == "train"]
    assert steps[-1]["lr"] < 0.2 * plan["lr"]  # decayed over the shortened run
    evals = [r for r in records if r["kind"] == "eval"]
    assert evals and all(0 < r["val_tokens"] <= plan["time_budget"]["eval_tokens"] < 1_000_000 for r in evals)


@pytest.mark.slow
def test_budget_minutes_uses_the_time_left_when_the_machine_outpaces_the_probe(tmp_path):
    """The probe reports the machine 3x slower than it is (a neighbour's job ended after the
    plan): the first deadline check finds the planned steps would end far inside the time
    planned and moves the end out, past the plan's steps, up to DEADLINE_STRETCH times them
    (a probe that underrated the machine once ended a 2-minute run 8 s early). The LR decays
    over the new length, and the run evaluates and saves at its last step."""
    import sys

    from picollm.trainer import DEADLINE_STRETCH

    run_dir = tmp_path / "run"
    prepare_first(TINY)
    cmd = [sys.executable, "-m", "picollm.train", *TINY, f"run_dir={run_dir}", "budget.minutes=0.3",
           "train.dtype=fp32", "debug.probe_slowdown=3"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    plan = json.loads((run_dir / "plan.json").read_text())
    final = json.loads((run_dir / "final.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    moves = [r["last_step"] for r in records if r.get("event") == "deadline"]
    assert moves and moves[0] == int(DEADLINE_STRETCH * plan["steps"]) > plan["steps"], (moves, plan["steps"])
    # Later checks may still cut (a neighbour's burst), to the step that then fits.
    assert final["planned_steps"] == plan["steps"] and final["steps"] == moves[-1]
    steps = [r for r in records if r["kind"] == "train"]
    assert steps[-1]["step"] == final["steps"] and steps[-1]["lr"] < 0.2 * plan["lr"]  # decayed over the new length
    assert [r for r in records if r["kind"] == "eval"][-1]["step"] == final["steps"]
    assert list_checkpoints(run_dir)[-1] == final["steps"]


@pytest.mark.slow
def test_budget_minutes_keeps_its_deadline_when_the_machine_slows_and_recovers(tmp_path):
    """Steps 1-19 each take 0.1 s longer than the probe measured (a machine that slowed after
    planning, then recovered): at that pace the planned steps would overrun the training
    time planned, so the run shortens its schedule; once the pace is back, a later check in
    the schedule's first nine tenths moves the end out again to the step that now fits.
    The LR decays over the final length, the run evaluates and saves at its last step, and
    ends near the time planned. Run again, it is complete: the end is part of the
    checkpoint."""
    import sys

    from picollm.trainer import DEADLINE_SLACK, DEADLINE_STRETCH

    # A planned step takes ~0.05 s idle (~0.1 s beside another CPU-heavy process), so slow
    # steps are 2-3x that. The deadline checks every 1/20 of the planned steps (8-32 steps,
    # from a 2x slower machine to a 2x faster one): the first check cuts, and the checks
    # after step 20 may move the end out again.
    SLOW, UNTIL = 0.1, 20
    run_dir = tmp_path / "run"
    prepare_first(TINY)
    cmd = [sys.executable, "-m", "picollm.train", *TINY, f"run_dir={run_dir}", "budget.minutes=0.4",
           "train.dtype=fp32", "debug.slow_steps_from=1", f"debug.slow_steps_until={UNTIL}",
           f"debug.slow_step_seconds={SLOW}"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    plan = json.loads((run_dir / "plan.json").read_text())
    final = json.loads((run_dir / "final.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    allowed = plan["time_budget"]["train_s"]
    moves = [r["last_step"] for r in records if r.get("event") == "deadline"]
    assert moves and moves[0] < plan["steps"], moves  # cut while slow
    assert max(moves[1:], default=0) > moves[0], moves  # moved out again once the pace was back
    assert final["planned_steps"] == plan["steps"] and final["steps"] == moves[-1] <= DEADLINE_STRETCH * plan["steps"]
    assert final["train_seconds"] < 1.15 * DEADLINE_SLACK * allowed, (final["train_seconds"], allowed)
    steps = [r for r in records if r["kind"] == "train"]
    assert steps[-1]["step"] == final["steps"] and steps[-1]["lr"] < 0.2 * plan["lr"]  # decayed over the new length
    assert [r for r in records if r["kind"] == "eval"][-1]["step"] == final["steps"]
    assert list_checkpoints(run_dir)[-1] == final["steps"]

    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "already complete" in again.stdout + again.stderr, again.stderr[-2000:]
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == len(records)
