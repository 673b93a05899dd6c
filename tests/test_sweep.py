"""IsoFLOP sweeps: the grid's N/D/C arithmetic, per-run schedules, skip on rerun, failures."""

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY
from picollm import sweep
from picollm.config import ConfigError, load_config
from picollm import fit
from picollm.fit import load_results
from picollm.scaling import chinchilla_optimal

BUDGETS = [3e9, 9e9]
# Narrow heads and a fixed small batch so the tiny models span a range of sizes in seconds.
GRID = TINY + ["model.head_dim=16", "model.aspect_ratio=16", "train.batch_tokens=1024", "train.device=cpu",
               "train.dtype=fp32", "train.peak_flops=1e11",  # no probes: the points are seconds long
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
    cfg = load_config(TINY + ["model.head_dim=16", "model.aspect_ratio=16", "sweep.sizes=3",
                              "model.seq_len=64", "sweep.budgets=[3e11,3e12]"])
    points = sweep.grid(cfg)
    assert len(points) == 6 and len({p.name for p in points}) == 6
    for c in (3e11, 3e12):
        ns = [p.shape.num_params() for p in points if p.budget == c]
        assert ns == sorted(ns) and ns[0] < chinchilla_optimal(c)[0] < ns[-1]
    with pytest.raises(ConfigError, match="sweep.budgets"):
        sweep.grid(load_config(TINY))
    with pytest.raises(ConfigError, match="sweep.dir"):
        sweep.run_sweep(GRID)
    with pytest.raises(ConfigError, match="model.depth"):
        sweep.run_sweep(GRID + [f"sweep.dir={tmp_path}", "model.depth=3"])


@pytest.mark.slow  # 12 tiny runs
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
        table = load_results(out / sweep.RESULTS)
    assert len(table.val_loss) == 5
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

    # Rerun with another LR: the finished points were not trained as now planned, so the sweep
    # stops before training anything instead of reusing them, and the table stays as it was.
    table_before = (out / sweep.RESULTS).read_text()
    third = Counting()
    with pytest.raises(ConfigError, match="trained for .* at LR .* but this sweep plans .* give a new sweep.dir"):
        sweep.run_sweep(overrides + ["train.lr=0.0123"], train=third, log=lambda s: None)
    assert third.calls == [] and (out / sweep.RESULTS).read_text() == table_before


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


def test_sizes_come_from_one_family_that_recurs_across_budgets(tmp_path):
    cfg = load_config(TINY + ["model.head_dim=16", "model.aspect_ratio=16", "sweep.sizes=3", "model.seq_len=64",
                              "sweep.budgets=[3e10,1e11,3e11]"])
    points = sweep.grid(cfg)
    for p in points:
        g = p.shape
        assert g.d_model == 16 * g.n_layer and g.n_layer >= 2 and g.n_head * 16 == g.d_model
    by_size = {}
    for p in points:
        by_size.setdefault(p.size, []).append(p)
    assert max(len(same) for same in by_size.values()) >= 2  # shapes recur: WSD branches need that
    for same in by_size.values():  # one LR, batch and warmup per size, at every budget
        assert len({p.settings for p in same}) == 1
    assert "d_model/n_layer = 16" in sweep.family_text(cfg)

    mixed = load_config(TINY + ["model.head_dim=16", "model.aspect_ratio=16", "sweep.sizes=3", "model.seq_len=64",
                                "sweep.budgets=[3e10]", "sweep.mix_families=true"])
    shapes = sweep.sweep_shapes(mixed)
    assert any(s.n_layer == 1 for s in shapes) and any(s.d_model != 16 * s.n_layer for s in shapes)
    assert "mixed" in sweep.family_text(mixed)
    with pytest.raises(ConfigError, match="aspect ratio a multiple of the head size"):
        sweep.grid(load_config(TINY + ["model.head_dim=48", "model.aspect_ratio=7", "model.max_depth=5",
                                       "sweep.budgets=[3e10]"]))
    with pytest.raises(ConfigError, match="sweep.schedule"):
        sweep.run_sweep(GRID + [f"sweep.dir={tmp_path}", "train.schedule=wsd"])


WSD = TINY + ["model.head_dim=16", "model.aspect_ratio=16", "train.batch_tokens=512", "train.device=cpu",
              "train.dtype=fp32", "train.peak_flops=1e11", "train.eval_tokens=1024", "train.save_every=3", "train.eval_every=100000",
              "sweep.sizes=2", "sweep.bootstrap=0", "sweep.fit=false", "sweep.schedule=wsd",
              "sweep.budgets=[2e9,6e9]"]


def _train_records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [m for m in map(json.loads, lines) if m.get("kind") == "train"]


@pytest.mark.slow  # 8 tiny runs, 2 spawned workers
def test_wsd_branches_cool_down_from_the_trunk_and_workers_do_not_change_numbers(tmp_path):
    from picollm.optim import lr_at
    from picollm.trainer import SAVED_AT

    one, two = tmp_path / "one", tmp_path / "two"
    summary = sweep.run_sweep(WSD + [f"sweep.dir={one}", "sweep.workers=1"], log=lambda s: None)
    points = {p.name: p for p in sweep.grid(load_config(WSD))}
    rows = sweep.read_table(one / sweep.RESULTS)
    assert summary["failed"] == [] and set(rows) == set(points)
    branches = [p for p in points.values() if p.branch_of]
    assert len(branches) == 2
    for p in branches:
        trunk, row = points[p.branch_of], rows[p.name]
        assert trunk.save_at == [p.branch_step] and trunk.steps > p.steps > p.branch_step > 0
        # the trunk kept its branch checkpoint although retention (keep 2, a save every 3 steps) pruned the others
        assert (one / trunk.name / SAVED_AT / "checkpoints" / f"step_{p.branch_step:07d}.pt").exists()
        # The branch is a true p.steps-step WSD run: its whole LR curve (the trunk's constant part,
        # then its own cooldown) is the schedule of that length, ending at min_lr.
        s = p.settings
        records = _train_records(one / p.name)
        assert [m["step"] for m in records] == list(range(1, p.steps + 1))
        expected = [lr_at(i, s.lr, s.warmup_steps, p.steps, 0.1, "wsd", 0.2, "linear") for i in range(p.steps)]
        assert [m["lr"] for m in records] == pytest.approx(expected)
        assert records[p.branch_step]["lr"] < s.lr == records[p.branch_step - 1]["lr"]
        trunk_records = _train_records(one / trunk.name)
        assert [m["loss"] for m in records[:p.branch_step]] == [m["loss"] for m in trunk_records[:p.branch_step]]
        assert row["steps"] == p.steps and row["n_tokens"] == p.steps * s.batch_tokens
        assert row["spent"] == p.flops_per_step * (p.steps - p.branch_step) and math.isfinite(row["val_loss"])
    flops = summary["flops"]
    assert flops["trained"] < flops["cosine_grid"]
    assert flops["cosine_grid"] == pytest.approx(sum(r["compute"] for r in rows.values()))
    assert "of the" in (one / "summary.md").read_text()

    # Two worker processes: the same points, bit for bit.
    summary = sweep.run_sweep(WSD + [f"sweep.dir={two}", "sweep.workers=2"], log=lambda s: None)
    assert summary["workers"] == 2 and summary["failed"] == []
    assert {n: r["val_loss"] for n, r in sweep.read_table(two / sweep.RESULTS).items()} == \
        {n: r["val_loss"] for n, r in rows.items()}


def _capstone_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "capstone.py"
    spec = importlib.util.spec_from_file_location("capstone", path)
    capstone = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(capstone)
    return capstone


def test_capstone_plan_spans_30x_and_holds_out_10x(capsys):
    """--estimate plans without training: the grid spans >= 30x, the held-out run is 10x the
    largest budget, and WSD trains less than the cosine grid."""
    from pathlib import Path

    capstone = _capstone_script()
    full = capstone.FULL
    assert max(full["budgets"]) / min(full["budgets"]) >= 30 and capstone.HELD_OUT_FACTOR == 10
    est = capstone.estimate(full, Path("unused"), gflops=10.0)
    assert est["held_out_flops"] == pytest.approx(10 * max(full["budgets"]), rel=0.05)
    # The sequential design trains every point from scratch (no WSD trunk reuse; see the
    # capstone's docstring), so its sweep costs exactly the cosine-equivalent grid.
    assert est["sweep_flops"] == pytest.approx(est["cosine_grid_flops"]) and "one family" in est["family"]
    # The final evaluation on the whole held-out split is planned too: forward passes only.
    no_eval = dict(full, overrides=full["overrides"] + ["train.eval_tokens=1"])
    lean = capstone.estimate(no_eval, Path("unused"), gflops=10.0)
    assert est["sweep_seconds"] > lean["sweep_seconds"] and est["held_out_seconds"] > lean["held_out_seconds"]
    assert capstone.main(["--estimate", "--gflops", "10"]) == 0
    assert "held-out" in capsys.readouterr().out


def test_capstone_estimate_probes_each_shape_side_by_side_and_calibrates_on_real_runs(tmp_path):
    """Without --gflops the estimate probes every (shape, batch) for real, training and
    evaluation, in as many single-thread processes at once as will train it (the 2 sweep
    workers, the held-out pair); then trains two real points and scales every estimate by
    their measured time over the probes' (with the evaluation's true size, the held-out split's)."""
    capstone = _capstone_script()
    speeds = capstone.Speeds()
    spec = capstone.QUICK
    est = capstone.estimate(spec, tmp_path, None, speeds, probe_seconds=0.05)
    rates = speeds.rates
    assert rates and {k[3] for k in rates} == {2}
    assert all(0 < r[kind] < math.inf for r in rates.values() for kind in ("train", "eval"))
    _, ladder, settings = capstone.family(spec, tmp_path)
    planned = {(p.shape.n_layer, p.shape.d_model, p.settings.batch_tokens)
               for d in capstone.planned_design(spec, ladder)
               for p in capstone.budget_points(spec, d, settings)}
    assert planned <= {k[:3] for k in rates} and len({k[2] for k in rates}) > 1  # the batch rule's batches

    # The calibration: two real points, both evaluated once (no step-0 evaluation in a sweep).
    trial = capstone.calibration_points(spec, tmp_path)
    rows = sweep.read_table(tmp_path / "calibration" / sweep.RESULTS)
    assert [rows[p.name]["status"] for p in trial] == ["ok", "ok"] and trial[1].seed == capstone.second_seed(spec)
    for p in trial:
        evals = [json.loads(line) for line in (Path(rows[p.name]["run_dir"]) / "metrics.jsonl").read_text().splitlines()
                 if '"eval"' in line]
        assert [e["step"] for e in evals] == [p.steps]
    val_tokens = evals[0]["val_tokens"]
    cal = est["calibration"]
    assert cal["val_tokens"] == val_tokens <= 2048  # QUICK's train.eval_tokens caps it

    def probed(point, processes=2):
        r = rates[(point.shape.n_layer, point.shape.d_model, point.settings.batch_tokens, processes)]
        return (point.spent / r["train"],
                point.shape.flops_per_token() / 3 * val_tokens / r["eval"] + capstone.PER_POINT_SECONDS)

    finals = [json.loads((Path(rows[p.name]["run_dir"]) / "final.json").read_text()) for p in trial]
    trained = sum(f["train_seconds"] for f in finals)
    rest = sum(rows[p.name]["seconds"] for p in trial) - trained
    assert 0 < trained and 0 < rest
    assert cal["train_factor"] == pytest.approx(trained / sum(probed(p)[0] for p in trial), rel=1e-9)
    assert cal["rest_factor"] == pytest.approx(rest / sum(probed(p)[1] for p in trial), rel=1e-9)
    held = capstone.held_out_points(spec, {"name": est["held_out_shape"], "compute": capstone.HELD_OUT_FACTOR * max(spec["budgets"]),
                                           "n_target": next(s.num_params() for s in ladder
                                                            if est["held_out_shape"].endswith(f"_L{s.n_layer}_d{s.d_model}"))})
    train_s, rest_s = probed(held[0])
    assert est["held_out_seconds"] == pytest.approx(cal["train_factor"] * train_s + cal["rest_factor"] * rest_s, rel=1e-9)
    assert est["measuring_seconds"] > 0
    assert capstone.planned_seconds(est) == pytest.approx(est["measuring_seconds"] + est["sweep_seconds"]
                                                          + est["extension_seconds"] + est["held_out_seconds"])

    again = capstone.estimate(spec, tmp_path, None, speeds, probe_seconds=0.05)  # shared: no new probes or runs
    assert again["sweep_seconds"] == est["sweep_seconds"] and again["calibration"] is cal
    finished = lambda: {p.name: (Path(rows[p.name]["run_dir"]) / "final.json").stat().st_mtime_ns for p in trial}
    before = finished()
    fresh = capstone.estimate(spec, tmp_path, None, capstone.Speeds(), probe_seconds=0.05)  # a rerun: found trained
    assert fresh["calibration"]["train_s"] == pytest.approx(trained) and finished() == before
    # A partial calibration (one point missing: it was stopped, or failed) trains both again, side by side.
    sweep.write_table(tmp_path / "calibration" / sweep.RESULTS, {trial[0].name: rows[trial[0].name]})
    capstone.estimate(spec, tmp_path, None, capstone.Speeds(), probe_seconds=0.05)
    after = finished()
    assert all(after[name] != before[name] for name in before)
    assert set(sweep.read_table(tmp_path / "calibration" / sweep.RESULTS)) == {p.name for p in trial}


def test_capstone_scale_auto_fits_the_hour_and_a_folder_keeps_its_scale(tmp_path, capsys):
    """--scale auto picks the largest scale (<= 1, in steps of 0.01) whose estimate fits
    TARGET_MINUTES; a folder keeps the scale it ran at (auto reuses it) and refuses another,
    since point names carry their budgets."""
    from pathlib import Path

    capstone = _capstone_script()
    planned = lambda scale, gflops: capstone.planned_seconds(
        capstone.estimate(capstone.scaled(capstone.FULL, scale), Path("unused"), gflops))
    assert capstone.fitting_scale(capstone.FULL, Path("unused"), 1000.0) == 1.0  # fits already: unchanged
    slow = 4.0  # GFLOP/s: too slow for the hour at scale 1
    auto = capstone.fitting_scale(capstone.FULL, Path("unused"), slow)
    assert 0 < auto < 1 and planned(auto, slow) <= 60 * capstone.TARGET_MINUTES < planned(1.0, slow)
    assert planned(auto + 0.05, slow) > 60 * capstone.TARGET_MINUTES  # near the largest that fits
    assert capstone.main(["--estimate", "--gflops", str(slow), "--scale", "auto", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"--scale auto: {auto:.2f}" in out and "over 60 min" not in out
    (tmp_path / "scale.json").write_text("0.7")
    assert capstone.claimed_scale("auto", tmp_path) == 0.7 and capstone.claimed_scale("0.7", tmp_path) == 0.7
    with pytest.raises(SystemExit, match="was run at --scale 0.7"):
        capstone.claimed_scale("1", tmp_path)
    with pytest.raises(SystemExit, match="positive number or 'auto'"):
        capstone.claimed_scale("big", tmp_path / "new")
    (tmp_path / "old" / "sweep").mkdir(parents=True)  # a folder from before the record: its scale is unknown
    with pytest.raises(SystemExit, match="from before scales were recorded"):
        capstone.claimed_scale("auto", tmp_path / "old")
    assert capstone.claimed_scale("0.86", tmp_path / "old") == 0.86
    (tmp_path / "scale.json").write_text("{garbled")
    with pytest.raises(SystemExit, match="is not a number"):
        capstone.claimed_scale("auto", tmp_path)
    assert (tmp_path / "scale.json").read_text() == "{garbled"  # refused, not overwritten


def test_capstone_trains_at_its_scanned_lr_and_the_scan_trains_each_lr(tmp_path, capsys):
    """Every FULL point trains at FULL_LR (a set train.lr wins over the planner's rule), and
    --scan-lr trains the scan points at each LR it is given (the LR reaches the run) and names
    the one with the lower loss."""
    capstone = _capstone_script()
    assert capstone.family(capstone.FULL, tmp_path)[2].lr == capstone.FULL_LR
    assert capstone.family(capstone.QUICK, tmp_path)[2].lr != capstone.FULL_LR  # the planner's, untouched
    spec = dict(capstone.QUICK, scan=[(3e8, 2)])
    got = capstone.scan_lr(spec, tmp_path, [3e-3, 3e-2], log=lambda *_: None)
    (name, by_lr), = got["losses"].items()
    assert set(by_lr) == {"0.003", "0.03"} and all(math.isfinite(v) for v in by_lr.values())
    assert by_lr["0.003"] != by_lr["0.03"] and got["best"][name] == min((0.003, 0.03), key=lambda lr: by_lr[repr(lr)])
    for lr in (0.003, 0.03):
        assert sweep.read_table(tmp_path / "lr_scan" / f"lr_{lr:g}" / "sweep" / sweep.RESULTS)[name]["lr"] == lr
    assert json.loads((tmp_path / "lr_scan.json").read_text()) == json.loads(json.dumps(got))
    capstone.print_scan(got)
    assert f"best: {name} at {got['best'][name]}" in capsys.readouterr().out


def test_batch_follows_the_run_length_not_the_size():
    """SizeSettings.for_tokens: the batch is batch_tokens x sqrt(tokens / batch_at_tokens) in
    whole sequences, between a quarter of batch_tokens and batch_tokens; the warmup keeps its
    tokens, the LR stays; without batch_at_tokens every run keeps the settings."""
    common = sweep.SizeSettings(lr=0.012, batch_tokens=1024, warmup_steps=20, batch_at_tokens=1.2e6)
    # 1024 x sqrt(D / 1.2e6): 4e5 -> 591 = 9.2 sequences of 64; 2e5 -> 418 = 6.53;
    # 3e5 -> 512 exactly; 1e5 -> 296 = 4.6; 1e3 -> 30, below the floor of 256.
    for tokens, batch in ((5e6, 1024), (1.2e6, 1024), (1e6, 960), (4e5, 576), (3e5, 512), (2e5, 448),
                          (1e5, 320), (1e3, 256)):
        got = common.for_tokens(tokens, 64)
        assert (got.batch_tokens, got.lr) == (batch, 0.012)
        assert got.warmup_steps == round(20 * 1024 / batch)
    assert common.for_tokens(1e5, 128).batch_tokens == 256  # whole sequences of 128: 2.3 -> 2
    assert common.for_tokens(4e5, 1024).batch_tokens == 1024  # never below one sequence
    plain = sweep.SizeSettings(lr=0.012, batch_tokens=1024, warmup_steps=20)
    assert plain.for_tokens(1e3, 64) is plain

    # The capstone: within a budget the short runs (large sizes) get the smaller batches, every
    # point still trains its budget (tokens = C / FLOPs per token, to a step), and the held-out
    # run, millions of tokens long, keeps the common batch.
    from pathlib import Path

    capstone = _capstone_script()
    spec = capstone.scaled(capstone.FULL, 0.67)
    _, ladder, settings = capstone.family(spec, Path("unused"))
    assert settings.batch_tokens == 1024 and settings.batch_at_tokens == capstone.BATCH_AT_TOKENS
    seen = set()
    for design in capstone.planned_design(spec, ladder):
        points = capstone.budget_points(spec, design, settings)[:len(design.sizes)]  # by size, smallest first
        batches = [p.settings.batch_tokens for p in points]
        assert batches == sorted(batches, reverse=True)
        for p in points:
            tokens = p.steps * p.settings.batch_tokens
            assert abs(tokens - p.budget / p.shape.flops_per_token()) <= p.settings.batch_tokens / 2
            assert p.settings == settings.for_tokens(p.budget / p.shape.flops_per_token(), 64)
        seen |= set(batches)
    assert min(seen) == 256 and max(seen) == 1024 and len(seen) > 5 and all(b % 64 == 0 for b in seen)
    held = capstone.held_out_point(ladder, settings, 10 * max(spec["budgets"]), 3e5)
    assert held.settings.batch_tokens == 1024 and held.settings.lr == capstone.FULL_LR


def test_capstone_seeds_replace_both_seeds_of_every_point(tmp_path):
    """--seeds A,B trains the first seed through train.seed and the repeats at B; one seed
    twice is refused before anything trains."""
    capstone = _capstone_script()
    spec = dict(capstone.QUICK, second_seed=12, overrides=capstone.QUICK["overrides"] + ["train.seed=11"])
    _, ladder, settings = capstone.family(spec, tmp_path)
    design = sweep.design_budget(ladder, spec["budgets"][0], [], 3, 3)
    points = capstone.budget_points(spec, design, settings)
    assert sorted({p.seed for p in points}, key=str) == [12, None] and all(p.name.endswith("_s12") for p in points[3:])
    assert load_config(spec["overrides"]).train.seed == 11
    with pytest.raises(SystemExit, match="repeats one seed"):
        capstone.main(["--quick", "--seeds", "5,5", "--estimate", "--dir", str(tmp_path)])


def test_capstone_refuses_to_mix_seeds_in_one_folder(tmp_path):
    """The first seed's points carry no seed in their names, so a folder keeps the seeds it
    was started with: other seeds are refused with the way out, and nothing is rewritten."""
    capstone = _capstone_script()
    ours = dict(capstone.QUICK, second_seed=12, overrides=capstone.QUICK["overrides"] + ["train.seed=11"])
    capstone.claim_seeds(ours, tmp_path / "new")
    capstone.claim_seeds(ours, tmp_path / "new")  # the same seeds again: a resume
    with pytest.raises(SystemExit, match="--seeds 11,12 or give a new --dir"):
        capstone.claim_seeds(capstone.QUICK, tmp_path / "new")
    assert json.loads((tmp_path / "new" / "seeds.json").read_text()) == [11, 12]
    (tmp_path / "old" / "sweep").mkdir(parents=True)  # a folder from before the record: the defaults
    with pytest.raises(SystemExit, match="seeds 1337,7, not 11,12"):
        capstone.claim_seeds(ours, tmp_path / "old")
    assert not (tmp_path / "old" / "seeds.json").exists()
    capstone.claim_seeds(capstone.QUICK, tmp_path / "old")


def test_capstone_fits_approach_3_with_its_huber_threshold():
    """The capstone's Approach 3 is fit_parametric with A3_HUBER_DELTA, not the library's
    Chinchilla default (1e-3), which differs on noisy points."""
    capstone = _capstone_script()
    rng = np.random.default_rng(0)
    rows = []
    for budget in (1e11, 3e11, 1e12, 3e12):
        for n in (2e4, 4e4, 8e4, 1.6e5, 3.2e5):
            d = budget / (6 * n)
            loss = (1.8 + 300 / n**0.55 + 60 / d**0.3) * math.exp(rng.normal(0, 0.015))
            rows.append({"name": f"{budget:g}_{n:g}", "budget": budget, "n_params": n, "n_tokens": d,
                         "compute": budget, "val_loss": loss, "status": "ok", "seed": None})
    n, d, loss = ([r[k] for r in rows] for k in ("n_params", "n_tokens", "val_loss"))
    ours = capstone.fit_all(rows, bootstrap=0).par.law
    assert ours == fit.fit_parametric(n, d, loss, delta=capstone.A3_HUBER_DELTA).law
    assert ours != fit.fit_parametric(n, d, loss).law
    # Its intervals hold the design fixed; the report gives the whole-run interval beside them.
    fits = capstone.fit_all(rows, bootstrap=6)
    kinds = {m: fit.fit_parametric(n, d, loss, delta=capstone.A3_HUBER_DELTA, bootstrap=6, resample=m).intervals["a"]
             for m in ("residuals", "runs")}
    assert capstone.A3_RESAMPLE == "residuals" and kinds["residuals"] != kinds["runs"]
    assert fits.par.intervals["a"] == kinds["residuals"] and fits.a_interval_runs == kinds["runs"]
    text = "\n".join(capstone.fit_lines(fits, capstone.exponents(fits)))
    lo, hi = kinds["runs"]
    assert "(N, D) held fixed" in text and f"whole runs resampled instead (Chinchilla's way): a in [{lo:.3f}, {hi:.3f}]" in text


def test_capstone_averages_seeds_only_when_asked():
    """With every size at two seeds the profiles use each size's mean; otherwise the
    default-seed run alone (a repeat at some sizes only would bend the profile)."""
    capstone = _capstone_script()
    row = lambda n, seed, loss, status="ok": {"name": f"{n}_{seed}", "budget": 1e11, "n_params": n, "n_tokens": 1e6,
                                                "compute": 1e11, "val_loss": loss, "status": status, "seed": seed}
    rows = [row(100, None, 4.0), row(100, 7, 4.2), row(200, None, 3.9), row(200, 7, 4.1), row(300, None, 3.95),
            row(300, 7, None, "failed")]
    assert {r["n_params"]: r["val_loss"] for r in capstone.primary(rows)} == {100: 4.0, 200: 3.9, 300: 3.95}
    mean = {r["n_params"]: (r["val_loss"], r["seeds"]) for r in capstone.primary(rows, average=True)}
    assert mean == {100: (pytest.approx(4.1), 2), 200: (pytest.approx(4.0), 2), 300: (3.95, 1)}
    assert all(r["seed"] is None for r in capstone.primary(rows, average=True))


def test_capstone_reports_overtraining_measured_beside_predicted():
    """Runs drawn from a known law in the capstone's shape (the same sizes at several budgets):
    the report's over-training table has, at each budget, every smaller size that reaches the
    reference's loss within its runs, with a measured D* near the law's."""
    from picollm.scaling import ScalingLaw

    capstone = _capstone_script()
    law = ScalingLaw(E=1.8, A=400.0, alpha=0.33, B=1500.0, beta=0.37)
    rows = []
    for budget in (1e19, 3e19, 1e20, 3e20):
        for size in (2e8, 3e8, 5e8, 8e8):
            d = budget / (6 * size)
            rows.append({"name": f"C{budget:.0e}_{size:.0e}", "budget": budget, "n_params": size, "n_tokens": d,
                         "compute": budget, "val_loss": law.loss(size, d), "status": "ok", "seed": None})
    rows.append(dict(rows[0], name="repeat", seed=7, val_loss=rows[0]["val_loss"] * 1.05))  # never a reference
    fits = capstone.fit_all(rows, bootstrap=8)
    got = capstone.overtraining(rows, fits)
    at_1e19 = {r["n_small"]: r for r in got if r["budget"] == 1e19}
    assert set(at_1e19) == {2e8, 3e8} and all(r["n_ref"] == 5e8 for r in at_1e19.values())
    for r in at_1e19.values():  # interpolated across a 3.3x step in D: within 10% (see test_scaling)
        assert r["measured_d"] == pytest.approx(r["predicted"]["d_small"], rel=0.1)
        assert r["predicted_band"] is not None
    text = "\n".join(capstone.overtraining_lines(got))
    assert "## Over-training, measured" in text and "| 1e+19 | 500,000,000 (" in text


def _ladder():
    cfg = load_config(["model.head_dim=8", "model.aspect_ratio=8", "model.seq_len=64", "tokenizer.vocab_size=512"])
    return sorted(sweep.sweep_shapes(cfg), key=lambda s: s.num_params())


def test_sequential_design_centres_each_budget_on_the_frontier_before_it():
    """Each later budget's sizes bracket a known synthetic frontier (a = 0.4, far below
    Chinchilla-20's N_opt) extrapolated from the minima of the budgets before it; the repeats
    are the sizes nearest that target."""
    ladder = _ladder()
    frontier = lambda c: 30e3 * (c / 1e11) ** 0.4
    minima = []
    for c in (1e11, 1e12, 1e13, 1e14):
        design = sweep.design_budget(ladder, c, minima, sizes=4, repeats=2)
        ns = [s.num_params() for s in design.sizes]
        assert ns == sorted(ns) and len(ns) == 4 and ns[0] < frontier(c) < ns[-1]
        near = sorted(ns, key=lambda n: abs(math.log(n / design.target)))[:2]
        assert sorted(r.num_params() for r in design.repeats) == sorted(near)
        if minima:  # centred on the extrapolation, not on Chinchilla-20 (3-8x larger here)
            assert design.target == pytest.approx(frontier(c), rel=0.35 if len(minima) == 1 else 1e-6)
        minima.append((c, frontier(c)))
    # One minimum extrapolates with slope 0.5; a noisy pair's slope is clipped.
    assert sweep.extrapolate_n_opt([(1e11, 3e4)], 1e13) == pytest.approx((3e5, 0.5))
    assert sweep.extrapolate_n_opt([(1e11, 3e4), (1e12, 3e4)], 1e13)[1] == 0.25


def test_sequential_design_extends_an_edge_minimum_until_bracketed():
    ladder = _ladder()
    ns = [s.num_params() for s in ladder]
    bowl = lambda centre: (lambda n: math.log(n / centre) ** 2)  # a profile with its minimum at `centre`
    tried = {n: bowl(30e3)(n) for n in ns[2:6]}  # 82k..342k: the minimum lies below the smallest
    added = []
    while (rung := sweep.edge_rung(ladder, tried)) is not None:
        added.append(rung.num_params())
        tried[rung.num_params()] = bowl(30e3)(rung.num_params())
    assert added == [ns[1], ns[0]]  # 33k is best and again at the edge; with 16k, 16k < 33k < 82k brackets it
    tried = {n: bowl(2e6)(n) for n in ns[2:6]}
    assert sweep.edge_rung(ladder, tried).num_params() == ns[6]  # the next rung up
    assert sweep.edge_rung(ladder, {n: bowl(1e3)(n) for n in ns[:3]}) is None  # the ladder's floor
    # The profile's minimum: the vertex when bracketed, else the best size, never extrapolated.
    n_min, bracketed = fit.profile_minimum(1e12, ns[1:5], [bowl(1e5)(n) for n in ns[1:5]])
    assert bracketed and n_min == pytest.approx(1e5, rel=0.2)
    assert fit.profile_minimum(1e12, ns[2:6], [bowl(1e4)(n) for n in ns[2:6]]) == (ns[2], False)


def test_an_orphaned_worker_starts_no_further_point(tmp_path, monkeypatch):
    """A worker whose sweep process died returns at once instead of training the chain it
    was queued, so nothing trains that nobody records."""
    cfg = load_config(GRID + [f"sweep.dir={tmp_path}"])
    chain = sweep.grid(cfg)[:2]
    calls = []
    monkeypatch.setattr(sweep._orphaned, "is_set", lambda: True)
    assert sweep._run_chain(chain, tmp_path, GRID, lambda o: calls.append(o) or {}, None) == [None]
    assert calls == []
