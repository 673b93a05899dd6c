"""Real torchrun on CPU (gloo): two processes match one process sample for sample (DDP and
FSDP2), runs move between world sizes and checkpoint layouts, and torchrun's elastic
restart resumes by itself."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from picollm import checkpoint as ckpt
from picollm.config import load_config
from picollm.saved_run import load_run
from picollm.export import load_weights
from picollm.train import run
from tests.conftest import TINY

REPO = Path(__file__).resolve().parents[1]
# One thread per process: two processes on two cores, no oversubscription.
BASE = TINY + ["train.batch_tokens=256", "train.micro_batch=2", "train.dtype=fp32", "train.warmup_steps=2",
               "train.eval_every=1000", "train.num_threads=1",
        "train.peak_flops=1e11"]  # skip the per-process peak measurement: start-up dominates these tests

pytestmark = pytest.mark.slow


def torchrun(nproc, overrides, *extra, wait=True, console_script=False, check=True):
    """``torchrun -m picollm.train``, or with the installed ``picollm-train`` console script;
    ``check`` asserts that it succeeded."""
    target = ["--no-python", str(Path(sys.executable).with_name("picollm-train"))] if console_script else \
        ["-m", "picollm.train"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *extra,
           *target, *overrides]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 or not check, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def losses(run_dir):
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["kind"] == "train":
            out[r["step"]] = r["loss"]
    return out


def weights(run_dir, step):
    return ckpt.load_checkpoint(ckpt.step_path(run_dir, step))["model"]


def drop_checkpoints(run_dir, *steps):
    """As if the run had stopped before these saves."""
    for step in steps:
        path = ckpt.step_path(run_dir, step)
        ckpt.manifest_path(path).unlink()
        shutil.rmtree(path) if path.is_dir() else path.unlink()


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process: the reference for two processes with half the accumulation."""
    run_dir = tmp_path_factory.mktemp("single") / "run"
    run(load_config(BASE + ["train.steps=6", f"run_dir={run_dir}"]))
    torch.set_num_threads(os.cpu_count())
    return run_dir


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ddp") / "run"
    torchrun(2, BASE + ["train.steps=6", f"run_dir={run_dir}"])
    return run_dir


def test_two_processes_match_one_with_twice_the_accumulation(ddp, single):
    run_dir = ddp
    plan = json.loads((run_dir / "plan.json").read_text())
    single_plan = json.loads((single / "plan.json").read_text())
    assert plan["world_size"] == 2 and single_plan["world_size"] == 1
    assert plan["accum_steps"] * 2 == single_plan["accum_steps"]  # same global batch, split over ranks
    a, b = losses(single), losses(run_dir)
    assert sorted(b) == list(range(1, 7))  # rank 0 alone wrote metrics, once per step
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5)
    for k, w in weights(single, 6).items():
        torch.testing.assert_close(weights(run_dir, 6)[k], w, rtol=1e-4, atol=1e-5)
    assert not list(run_dir.glob(".hydra")) and "rank" not in " ".join(p.name for p in run_dir.iterdir())


def test_a_two_process_run_resumes_on_one_process_and_back(tmp_path, single):
    run_dir = tmp_path / "mixed"
    torchrun(2, BASE + ["train.steps=6", "train.save_every=2", f"run_dir={run_dir}"])
    for step in (4, 6):  # as if stopped after step 2
        for suffix in (".pt", ".json"):
            (ckpt.ckpt_dir(run_dir) / f"step_{step:07d}{suffix}").unlink(missing_ok=True)
    run(load_config(BASE + ["train.steps=6", "train.save_every=2", f"run_dir={run_dir}"]))
    torch.set_num_threads(os.cpu_count())
    a, b = losses(single), losses(run_dir)
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5)
    # ...and from one process back to two.
    for suffix in (".pt", ".json"):
        (ckpt.ckpt_dir(run_dir) / f"step_0000006{suffix}").unlink()
    torchrun(2, BASE + ["train.steps=6", "train.save_every=2", f"run_dir={run_dir}"])
    for step in a:
        assert losses(run_dir)[step] == pytest.approx(a[step], rel=1e-5)


def test_unsplittable_batch_fails_on_every_rank_with_one_message(tmp_path):
    out = torchrun(2, BASE + ["train.steps=2", "train.batch_tokens=96", "model.seq_len=32", "train.micro_batch=1",
                              f"run_dir={tmp_path / 'bad'}"], check=False)
    assert out.returncode != 0
    text = out.stdout + out.stderr
    assert text.count("not divisible by the world size 2") == 2  # both ranks, the same sentence


def test_elastic_restart_resumes_after_a_worker_is_killed(tmp_path, single):
    run_dir = tmp_path / "elastic"
    overrides = BASE + ["train.steps=6", "train.save_every=1", f"run_dir={run_dir}"]
    proc = torchrun(2, overrides, "--max-restarts=2", wait=False)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not ckpt.list_checkpoints(run_dir):
            time.sleep(0.05)
        assert ckpt.list_checkpoints(run_dir), "no checkpoint appeared"
        workers = subprocess.run(["pgrep", "-f", "picollm.train", "-P", str(proc.pid)], capture_output=True, text=True)
        pids = [int(p) for p in workers.stdout.split()]
        assert pids, "could not find a worker process"
        os.kill(pids[-1], signal.SIGKILL)
        out, _ = proc.communicate(timeout=240)
    finally:  # never leave torchrun or its workers (in sessions of their own) behind
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        for pid in [proc.pid, *map(int, children)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert proc.returncode == 0, out[-3000:]
    assert "resumed from" in out and "connectFullMesh" not in out  # the restart met no stale peer address
    a, b = losses(single), losses(run_dir)
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5)


# ----------------------------------------------------------------------------- FSDP2

def test_fsdp_matches_ddp_and_its_sharded_checkpoints_move_between_world_sizes(tmp_path, single, ddp):
    run_dir = tmp_path / "fsdp"
    overrides = BASE + ["train.steps=6", "train.save_every=2", "train.keep_checkpoints=5", "train.parallel=fsdp",
                        f"run_dir={run_dir}"]
    torchrun(2, overrides)
    step2 = ckpt.step_path(run_dir, 2)
    assert step2.is_dir() and sorted(p.name for p in step2.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert json.loads(ckpt.manifest_path(step2).read_text())["format"] == "dcp"
    assert ckpt.verify(step2) is None
    a, b, ref = losses(ddp), losses(run_dir), losses(single)
    assert sorted(b) == list(range(1, 7))
    for step in a:  # FSDP reduce-scatters instead of all-reducing: same sums, other order
        assert b[step] == pytest.approx(a[step], rel=1e-5)
    exported = load_weights(run_dir).state_dict()  # gathered from the shards at the end of the run
    assert json.loads((run_dir / "final.json").read_text())["peak_memory_mib"] > 0
    for k, w in weights(ddp, 6).items():
        torch.testing.assert_close(exported[k], w, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(weights(run_dir, 6)[k], w, rtol=1e-4, atol=1e-5)  # the DCP folder, read whole

    # Resharding: continue the 2-process checkpoint of step 2 on 4 FSDP processes...
    drop_checkpoints(run_dir, 4, 6)
    out = torchrun(4, overrides)
    assert "continuing a 2-process run on 4" in out.stdout and "FSDP2 over 4 processes" in out.stdout
    assert len(list(ckpt.step_path(run_dir, 6).glob("*.distcp"))) == 4
    for step in ref:
        assert losses(run_dir)[step] == pytest.approx(ref[step], rel=1e-5)
    # ...and its 4-way sharded step 4 on one plain process, which reads the shards whole.
    drop_checkpoints(run_dir, 6)
    run(load_config(overrides))
    torch.set_num_threads(os.cpu_count())
    assert not ckpt.step_path(run_dir, 6).is_dir()  # one process writes the one-file layout
    for step in ref:
        assert losses(run_dir)[step] == pytest.approx(ref[step], rel=1e-5)

    # A corrupt shard is caught by the manifest; the previous checkpoint is used instead.
    shard = next(ckpt.step_path(run_dir, 4).glob("__1_0.distcp"))
    shard.write_bytes(shard.read_bytes()[:-8])
    assert "truncated" in ckpt.verify(ckpt.step_path(run_dir, 4))


def test_fsdp_bad_steps_skip_on_every_rank_and_roll_back_to_a_sharded_checkpoint(tmp_path):
    run_dir = tmp_path / "fsdp"
    torchrun(2, BASE + ["train.steps=8", "train.save_every=2", "train.keep_checkpoints=5", "train.parallel=fsdp",
                        "debug.inf_grad_at_steps=[3,4,5]", f"run_dir={run_dir}"])
    final = json.loads((run_dir / "final.json").read_text())
    assert final["rollbacks"] == 1 and final["skipped_steps"] == 3 and final["steps"] == 8
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rollback = next(e for e in events if e.get("event") == "rollback")
    assert rollback["lr_scale"] == 0.5 and rollback["checkpoint"].endswith("step_0000004")  # a sharded folder


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"), reason="needs root to mount a small tmpfs")
def test_fsdp_full_disk_fails_on_every_rank_and_keeps_the_previous_checkpoint(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)]).returncode != 0:
        pytest.skip("could not mount a tmpfs here")
    try:
        run_dir = disk / "run"
        # One sharded checkpoint (~1.9 MB over two shards) fits in 3 MB; a second does not.
        out = torchrun(2, BASE + ["train.steps=6", "train.save_every=1", "train.parallel=fsdp",
                                  f"run_dir={run_dir}"], check=False)
        assert out.returncode != 0
        text = out.stdout + out.stderr
        assert text.count("could not write checkpoint") == 2 and "free disk space" in text  # both ranks, one sentence
        assert ckpt.list_checkpoints(run_dir) == [1] and ckpt.verify(ckpt.step_path(run_dir, 1)) is None
        assert not list(ckpt.ckpt_dir(run_dir).glob(".*tmp"))  # the half-written folder is gone
    finally:
        subprocess.run(["umount", str(disk)])


def test_fsdp_bf16_from_the_console_script_and_consolidation_into_one_file(tmp_path, single):
    """bf16 gathered weights with fp32 gradient reduction (gloo), launched through the
    installed picollm-train script; then its sharded checkpoint becomes one file."""
    run_dir = tmp_path / "bf16"
    torchrun(2, BASE + ["train.steps=6", "train.parallel=fsdp", "train.dtype=bf16", f"run_dir={run_dir}"],
             console_script=True)
    a, b = losses(single), losses(run_dir)
    assert sorted(b) == sorted(a)
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=2e-2)
    assert any(b[step] != a[step] for step in a)  # the policy did cast: bf16 rounding shows
    assert json.loads((run_dir / "plan.json").read_text())["dtype"] == "bf16"

    out_file = tmp_path / "whole.pt"
    cli = subprocess.run([sys.executable, "-m", "picollm.checkpoint", f"src={ckpt.step_path(run_dir, 6)}", f"out={out_file}"],
                         cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert cli.returncode == 0, cli.stderr
    assert ckpt.verify(out_file) is None
    whole = ckpt.load_checkpoint(out_file)
    assert whole["step"] == 6 and set(whole["optimizer"]["state"]) == set(whole["model"])  # name-keyed AdamW state
    for k, w in load_weights(run_dir).state_dict().items():  # fp32 master weights, gathered at the end
        torch.testing.assert_close(whole["model"][k], w, rtol=0, atol=0)
    # It is an ordinary checkpoint: evaluation loads it like any step_*.pt.
    loaded = load_run(run_dir, checkpoint=out_file)
    assert loaded.plan["steps"] == 6
    bad = subprocess.run([sys.executable, "-m", "picollm.checkpoint", f"src={out_file}", f"out={tmp_path / 'x.pt'}"],
                         cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert bad.returncode != 0 and "is not a sharded checkpoint folder" in bad.stderr


def test_two_nodes_without_a_shared_cache_each_prepare_the_same_data(tmp_path, single):
    """Multi-node: the first process of every node prepares the data in that node's own
    cache (deterministically, so the shards agree) while its other processes wait on the
    store; the ranks then check that every node holds the same data. Two torchrun agents
    with --nnodes=2 on this machine, each with its own PICOLLM_CACHE, stand in for two nodes."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_dir = tmp_path / "twonodes"
    overrides = BASE + ["train.steps=6", f"run_dir={run_dir}"]
    procs = []
    for node in range(2):
        cache = tmp_path / f"cache{node}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
               f"--node_rank={node}", "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "picollm.train",
               *overrides]
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PICOLLM_CACHE": str(cache)}
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    metas = [next((tmp_path / f"cache{n}" / "data").glob("*/meta.json")).read_text() for n in range(2)]
    assert metas[0] == metas[1]  # built twice, independently, byte for byte the same
    a, b = losses(single), losses(run_dir)
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5)


def test_budget_minutes_deadline_cuts_every_rank_at_the_same_step(tmp_path):
    """Both processes slow down after the probe: the deadline shortens the run on both ranks
    at the same step (ranks that disagreed would hang in the last step's checkpoint)."""
    run_dir = tmp_path / "deadline"
    torchrun(2, BASE + [f"run_dir={run_dir}", "budget.minutes=0.4", "debug.slow_steps_from=1",
                        "debug.slow_step_seconds=0.05"])
    plan = json.loads((run_dir / "plan.json").read_text())
    final = json.loads((run_dir / "final.json").read_text())
    cuts = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"deadline"' in line]
    assert cuts and final["steps"] == cuts[-1]["last_step"] < plan["steps"] == final["planned_steps"]
    assert ckpt.list_checkpoints(run_dir)[-1] == final["steps"]
