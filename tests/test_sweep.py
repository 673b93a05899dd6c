"""IsoFLOP sweeps: the grid's N/D/C arithmetic, per-run schedules, skip on rerun, failures."""

import json
import math
import warnings

import pytest

from conftest import TINY
from picollm import sweep
from picollm.config import ConfigError, load_config
from picollm.fit import load_runs
from picollm.scaling import chinchilla_optimal

BUDGETS = [1e9, 3e9]
# Narrow heads and a fixed small batch so the tiny models span a range of sizes in seconds.
GRID = TINY + ["model.head_dim=16", "model.aspect_ratio=32", "train.batch_tokens=1024", "train.device=cpu",
               "train.eval_tokens=1024", "train.save_every=100000", "train.eval_every=100000",
               "sweep.sizes=3", "sweep.bootstrap=0",
               f"sweep.budgets=[{','.join(map(str, BUDGETS))}]"]


class Counting:
    """Trains for real, counts calls, and breaks one point with an impossible override."""

    def __init__(self, fail: str | None = None):
        self.fail, self.calls = fail, []

    def __call__(self, overrides):
        self.calls.append(overrides)
        if self.fail and any(o.endswith("/" + self.fail) for o in overrides):
            overrides = overrides + ["train.micro_batch=3"]  # 3 does not divide the batch
        return sweep.train_point(overrides)


def test_grid_brackets_the_optimum_and_rejects_bad_settings(tmp_path):
    cfg = load_config(TINY + ["model.head_dim=16", "model.aspect_ratio=32", "sweep.sizes=3",
                              "model.seq_len=64", "sweep.budgets=[3e10,3e11]"])
    points = sweep.grid(cfg)
    assert len(points) == 6 and len({p.name for p in points}) == 6
    for c in (3e10, 3e11):
        ns = [p.shape.num_params() for p in points if p.budget == c]
        assert ns == sorted(ns) and ns[0] < chinchilla_optimal(c)[0] < ns[-1]
    with pytest.raises(ConfigError, match="sweep.budgets"):
        sweep.grid(load_config(TINY))
    with pytest.raises(ConfigError, match="sweep.dir"):
        sweep.run_sweep(GRID)
    with pytest.raises(ConfigError, match="model.depth"):
        sweep.run_sweep(GRID + [f"sweep.dir={tmp_path}", "model.depth=3"])


def test_sweep_trains_tables_skips_and_survives_a_failure(tmp_path):
    out = tmp_path / "sweep"
    overrides = GRID + [f"sweep.dir={out}"]
    names = [p.name for p in sweep.grid(load_config(overrides))]
    broken = names[2]  # the largest model of the smallest budget
    first = Counting(fail=broken)
    summary = sweep.run_sweep(overrides, train=first, log=lambda s: None)
    assert len(first.calls) == 6 and summary["failed"] == [broken]

    rows = sweep.read_table(out / sweep.RESULTS)
    assert set(rows) == set(names)
    assert rows[broken]["status"] == "failed" and "micro_batch" in rows[broken]["error"]
    for name, r in rows.items():
        if name == broken:
            continue
        assert r["status"] == "ok" and math.isfinite(r["val_loss"]) and r["val_bpb"] > 0
        plan = json.loads((out / name / "plan.json").read_text())
        fpt, step_tokens = plan["flops_per_token"], plan["tokens_per_step"]
        # D = C / flops_per_token rounded to whole steps; compute is the plan's actual FLOPs.
        assert abs(r["n_tokens"] - r["budget"] / fpt) <= step_tokens / 2
        assert r["n_tokens"] == r["steps"] * step_tokens and r["compute"] == fpt * r["n_tokens"]
        assert r["n_params"] == plan["n_params"] and plan["model"]["n_layer"] == r["n_layer"]
        # The schedule spans exactly this run's own steps: warmup, then cosine to min_lr at the last.
        train = [json.loads(l) for l in (out / name / "metrics.jsonl").read_text().splitlines()]
        train = [m for m in train if m.get("kind") == "train"]
        assert [m["step"] for m in train] == list(range(1, r["steps"] + 1))
        assert train[-1]["lr"] == pytest.approx(plan["min_lr"])
    assert len({r["steps"] for r in rows.values() if r["steps"]}) > 2  # each size has its own length

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the failed row is dropped with a warning
        runs = load_runs(out / sweep.RESULTS)
    assert len(runs.val_loss) == 5
    assert (out / "summary.json").exists() and (out / "summary.md").exists()
    assert json.loads((out / "summary.json").read_text())["parametric"] is not None

    # Rerun: finished points are skipped (no training, final.json untouched); the failed one is retried.
    mtimes = {n: (out / n / "final.json").stat().st_mtime_ns for n in names if n != broken}
    second = Counting()
    summary = sweep.run_sweep(overrides, train=second, log=lambda s: None)
    assert [o for call in second.calls for o in call if o.startswith("run_dir=")] == [f"run_dir={out / broken}"]
    assert summary["failed"] == []
    assert mtimes == {n: (out / n / "final.json").stat().st_mtime_ns for n in mtimes}
    assert sweep.read_table(out / sweep.RESULTS)[broken]["status"] == "ok"


def test_a_signal_stops_the_sweep_instead_of_failing_the_point(tmp_path):
    """SIGTERM/Ctrl-C inside a point (the trainer raises Interrupted after saving) ends the
    sweep; the point is not recorded as failed, so a rerun resumes it."""
    from picollm.train import Interrupted

    def interrupted(overrides):
        raise Interrupted(15)

    out = tmp_path / "sweep"
    with pytest.raises(Interrupted):
        sweep.run_sweep(GRID + [f"sweep.dir={out}"], train=interrupted, log=lambda s: None)
    assert not sweep.read_table(out / sweep.RESULTS)
