"""Time to loss: picollm's `budget.minutes` run against nanoGPT's README CPU recipe,
same data, same tokenizer, same wall clock, scored on the same held-out tokens.

    python scripts/bench_time_to_loss.py --nanogpt PATH --minutes 2,5,10 --out DIR
    python scripts/bench_time_to_loss.py --shapes auto,2x128,4x128h4s64 --minutes 2,5 --out DIR

PATH is a nanoGPT checkout (github.com/karpathy/nanoGPT; needs only torch and numpy).
What happens:
1. picollm prepares its pystdlib corpus (the Python standard library's sources) with its
   BPE tokenizer at vocab 2048, and the same train/held-out token streams are written in
   nanoGPT's format (train.bin / val.bin as uint16, meta.pkl with vocab_size) to
   DIR/nanogpt_data.
2. nanoGPT's iteration time is calibrated on this machine (a short run of the recipe,
   two copies side by side, as in the real runs), so that for a budget of M minutes
   max_iters (= lr_decay_iters) makes its WHOLE process last M minutes.
3. For every budget M and M/2, nanoGPT and picollm run SIDE BY SIDE (at the same time),
   each with ONE thread (OMP_NUM_THREADS=1, train.num_threads=1), so both see the same
   load on a shared machine. Wall seconds are each whole process, start to exit.
4. Both final models are scored in fp32 on the SAME held-out tokens (picollm's validation
   split): every token but the first is predicted, by windows of each model's own
   context length (nanoGPT 64, picollm its model.seq_len).
5. DIR/summary.md (table and time-to-loss verdict), DIR/results.json, and one plot,
   DIR/time_to_loss.png: held-out loss against wall-clock minutes for both.

The nanoGPT recipe (its README, "I only have a macbook"): config/train_shakespeare_char.py
--device=cpu --compile=False --eval_iters=20 --log_interval=1 --block_size=64
--batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000
--lr_decay_iters=2000 --dropout=0.0; here with max_iters scaled to the budget, eight
evaluations per run (as 250 of 2000 in the recipe) and always_save_checkpoint=True so
ckpt.pt holds the final weights.

--shapes trains picollm alone at each budget with explicit shapes (LxD, optional hH heads
and sS seq_len; `auto` lets the plan choose), optionally a peak LR (`@0.01`) and an
optimizer (`+muon`), two at a time side by side, scored the same way: the measurement
behind plan.py's tiny-budget size rule, its LR cap, and Muon against AdamW.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 2048
PICOLLM_DATA = [f"tokenizer.vocab_size={VOCAB}"]  # data=pystdlib and tokenizer=bpe are the defaults
NANOGPT_RECIPE = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
                  "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
                  "--n_embd=128", "--dropout=0.0"]
NANOGPT_EVALS = 8  # evaluation intervals per run, as the recipe's 250 of 2000 iterations
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore",
              "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}


# ------------------------------------------------------------------ data

def prepare(out: Path) -> dict:
    """picollm's own preparation of the whole corpus, then the same streams as nanoGPT files."""
    sys.path.insert(0, str(ROOT))
    from picollm.config import load_config
    from picollm.data.loader import TokenStream
    from picollm.data.prepare import prepare_data

    cfg = load_config(PICOLLM_DATA)
    data = prepare_data(cfg.data, cfg.tokenizer, 10**15)  # more than the corpus holds: all of it
    nano = out / "nanogpt_data"
    nano.mkdir(parents=True, exist_ok=True)
    for split, shards in (("train", data.train_shards), ("val", data.val_shards)):
        stream = TokenStream(shards)
        tokens = np.empty(len(stream), dtype=np.int64)
        stream.read_into(0, tokens)
        assert tokens.max() < 2**16, "uint16 files need a vocabulary below 65536"
        tokens.astype(np.uint16).tofile(nano / f"{split}.bin")
    with open(nano / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": data.vocab_size}, f)
    return {"dir": str(data.dir), "nanogpt_dir": str(nano), "train_tokens": data.n_train_tokens,
            "val_tokens": data.n_val_tokens, "vocab_size": data.vocab_size}


def held_out_tokens(nano_dir: Path) -> np.ndarray:
    return np.fromfile(nano_dir / "val.bin", dtype=np.uint16).astype(np.int64)


# ------------------------------------------------------------------ processes

class Job:
    """One whole training process; its output lines are kept with the second they appeared."""

    def __init__(self, name: str, cmd: list, cwd: Path, log: Path):
        self.name, self.cmd, self.cwd, self.log = name, cmd, cwd, log
        self.lines: list[tuple[float, str]] = []
        self.wall = None
        self.rc = None

    def start(self) -> None:
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, cwd=self.cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env={**os.environ, **ONE_THREAD})
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        with open(self.log, "w") as f:
            f.write("$ " + " ".join(map(str, self.cmd)) + "\n")
            for line in self.proc.stdout:
                t = time.perf_counter() - self.t0
                self.lines.append((t, line.rstrip("\n")))
                f.write(f"[{t:8.2f}s] {line}")
                f.flush()
        # Timed here, as the process exits: the jobs are waited for one after another, so a
        # wall read in wait() would give a job that ended first its partner's wall.
        self.rc = self.proc.wait()
        self.wall = time.perf_counter() - self.t0

    def wait(self) -> "Job":
        self.reader.join()
        if self.rc != 0:
            print(f"  {self.name} failed (exit {self.rc}); see {self.log}: {self.error()}", flush=True)
        return self

    def error(self) -> str | None:
        """The failed process's last line (picollm's refusals are one sentence)."""
        return None if self.rc == 0 else (self.lines[-1][1] if self.lines else f"exit {self.rc}")


def side_by_side(jobs: list) -> list:
    """Start the jobs together and wait for all: they share the machine's load."""
    names = " and ".join(j.name for j in jobs)
    print(f"  running side by side, one thread each: {names}", flush=True)
    for j in jobs:
        j.start()
    return [j.wait() for j in jobs]


def nanogpt_cmd(nanogpt: Path, data_dir: Path, out_dir: Path, iters: int) -> list:
    interval = max(1, iters // NANOGPT_EVALS)
    return [sys.executable, "train.py", *NANOGPT_RECIPE, f"--dataset={data_dir}", f"--out_dir={out_dir}",
            f"--max_iters={iters}", f"--lr_decay_iters={iters}", f"--eval_interval={interval}",
            "--always_save_checkpoint=True"]


def picollm_cmd(run_dir: Path, minutes: float, extra: list) -> list:
    return [sys.executable, "-m", "picollm.train", *PICOLLM_DATA, f"budget.minutes={minutes:g}",
            "train.num_threads=1", f"run_dir={run_dir}", *extra]


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    return path


# ------------------------------------------------------------------ nanoGPT calibration

def calibrate(nanogpt: Path, data_dir: Path, out: Path, iters: int) -> dict:
    """Seconds per iteration, per evaluation and fixed (start-up, exit) of the recipe,
    from two copies run side by side (the load the real runs see)."""
    jobs = [Job(f"nanoGPT calibration {i}", nanogpt_cmd(nanogpt, data_dir, fresh(out / f"calib{i}"), iters),
                nanogpt, out / "logs" / f"nanogpt_calibration{i}.log") for i in range(2)]
    done = side_by_side(jobs)
    if any(j.rc for j in done):
        raise SystemExit(f"nanoGPT's calibration run failed: {next(j.error() for j in done if j.rc)}")
    fits = [_split_time(j, iters) for j in done]
    fit = {k: float(np.mean([f[k] for f in fits])) for k in fits[0]}
    print(f"  nanoGPT: {fit['iter_s'] * 1e3:.1f} ms/iteration, {fit['eval_s']:.2f} s/evaluation, "
          f"{fit['fixed_s']:.1f} s start-up and exit", flush=True)
    return fit


def _split_time(job: Job, iters: int) -> dict:
    iter_t, after_eval = [], []
    prev, saw_eval = None, False
    for t, line in job.lines:
        if line.startswith("step "):
            saw_eval = True
        elif line.startswith("iter "):
            if prev is not None:
                (after_eval if saw_eval else iter_t).append(t - prev)
            prev, saw_eval = t, False
    iter_s = float(np.median(iter_t))
    eval_s = max(0.0, float(np.median(after_eval)) - iter_s) if after_eval else 0.0
    n_evals = iters // max(1, iters // NANOGPT_EVALS) + 1
    fixed = job.wall - (iters + 1) * iter_s - n_evals * eval_s
    return {"iter_s": iter_s, "eval_s": eval_s, "fixed_s": max(0.0, fixed)}


def iters_for(minutes: float, fit: dict) -> int:
    seconds = 60 * minutes - fit["fixed_s"] - (NANOGPT_EVALS + 1) * fit["eval_s"]
    iters = max(NANOGPT_EVALS, int(seconds / fit["iter_s"]))
    return iters - iters % NANOGPT_EVALS  # evaluations land on the last iteration


# ------------------------------------------------------------------ scoring

def mean_loss(logits_fn, tokens: np.ndarray, ctx: int, rows: int = 32) -> float:
    """Mean next-token cross-entropy over tokens[1:], each predicted from the window of up
    to ``ctx`` tokens it falls in (non-overlapping windows); fp32, one model at a time."""
    import torch
    import torch.nn.functional as F

    n = len(tokens) - 1
    starts = list(range(0, n, ctx))
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(starts), rows):
            group = starts[i:i + rows]
            lengths = {min(ctx, n - s) for s in group}
            for length in sorted(lengths):  # the last window may be shorter
                chunk = [s for s in group if min(ctx, n - s) == length]
                x = torch.from_numpy(np.stack([tokens[s:s + length] for s in chunk]))
                y = torch.from_numpy(np.stack([tokens[s + 1:s + length + 1] for s in chunk]))
                logits = logits_fn(x, y).float()
                total += F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum").item()
    return total / n


def score_picollm(run_dir: Path, tokens: np.ndarray) -> tuple[float, int]:
    sys.path.insert(0, str(ROOT))
    from picollm.export import load_weights

    model = load_weights(run_dir).float().eval()
    return mean_loss(lambda x, y: model(x), tokens, model.cfg.seq_len), model.cfg.seq_len


def score_nanogpt(nanogpt: Path, out_dir: Path, tokens: np.ndarray) -> tuple[float, int]:
    import torch

    spec = importlib.util.spec_from_file_location("nanogpt_model", nanogpt / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ckpt = torch.load(out_dir / "ckpt.pt", map_location="cpu", weights_only=False)
    model = mod.GPT(mod.GPTConfig(**ckpt["model_args"]))
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()})
    model.eval()
    ctx = ckpt["model_args"]["block_size"]
    return mean_loss(lambda x, y: model(x, y)[0], tokens, ctx), ctx  # with targets it returns every position


# ------------------------------------------------------------------ curves

PICO_EVAL = re.compile(r"eval step (\d+): val_loss ([0-9.]+)")
NANO_EVAL = re.compile(r"step (\d+): train loss [0-9.]+, val loss ([0-9.]+)")


def curve(job: Job, pattern) -> list:
    """(minutes since the process started, own periodic held-out loss) from its log lines."""
    return [(t / 60, float(m.group(2))) for t, line in job.lines if (m := pattern.search(line))]


def picollm_shape(run_dir: Path) -> str:
    g = json.loads((run_dir / "model_config.json").read_text())
    plan = json.loads((run_dir / "plan.json").read_text())
    return (f"{g['n_layer']}x{g['d_model']} h{g['n_head']} seq{g['seq_len']} N={plan['n_params'] / 1e6:.2f}M "
            f"D={plan['n_tokens'] / 1e6:.2f}M {plan['dtype']} lr {plan['lr']:.3g}")


# ------------------------------------------------------------------ the comparison

def compare(args, info: dict, out: Path) -> dict:
    nanogpt = Path(args.nanogpt).resolve()
    if not (nanogpt / "train.py").exists() or not (nanogpt / "model.py").exists():
        raise SystemExit(f"--nanogpt {nanogpt} has no train.py/model.py; point it at a nanoGPT checkout.")
    data_dir = Path(info["nanogpt_dir"])
    tokens = held_out_tokens(data_dir)
    print("calibrating nanoGPT's iteration time on this machine", flush=True)
    fit = calibrate(nanogpt, data_dir, out, args.calib_iters)
    budgets = sorted({m for b in args.minutes for m in (b, b / 2)})
    rows = []
    for m in budgets:
        iters = iters_for(m, fit)
        print(f"budget {m:g} min: nanoGPT max_iters={iters}, picollm budget.minutes={m:g}", flush=True)
        nano_dir, pico_dir = fresh(out / f"nanogpt-{m:g}min"), fresh(out / f"picollm-{m:g}min")
        nano = Job(f"nanoGPT {m:g} min", nanogpt_cmd(nanogpt, data_dir, nano_dir, iters), nanogpt,
                   out / "logs" / f"nanogpt-{m:g}min.log")
        pico = Job(f"picollm {m:g} min", picollm_cmd(pico_dir, m, args.picollm_args), ROOT,
                   out / "logs" / f"picollm-{m:g}min.log")
        side_by_side([nano, pico])
        if nano.rc or pico.rc:  # recorded and reported; the other budgets still run
            rows.append({"minutes": m, "error": "; ".join(f"{j.name}: {j.error()}" for j in (nano, pico) if j.rc)})
            _write(out, args, info, fit, rows, tokens)
            continue
        nano_loss, nano_ctx = score_nanogpt(nanogpt, nano_dir, tokens)
        pico_loss, pico_ctx = score_picollm(pico_dir, tokens)
        row = {"minutes": m, "nanogpt_iters": iters, "nanogpt_loss": nano_loss, "nanogpt_ctx": nano_ctx,
               "nanogpt_wall_s": nano.wall, "picollm_loss": pico_loss, "picollm_ctx": pico_ctx,
               "picollm_wall_s": pico.wall, "picollm_wall_over_budget": pico.wall / (60 * m),
               "picollm_model": picollm_shape(pico_dir),
               "nanogpt_curve": curve(nano, NANO_EVAL), "picollm_curve": curve(pico, PICO_EVAL)}
        print(f"  nanoGPT {nano_loss:.4f} in {nano.wall:.0f} s | picollm {pico_loss:.4f} in {pico.wall:.0f} s "
              f"({row['picollm_model']})", flush=True)
        rows.append(row)
        _write(out, args, info, fit, rows, tokens)  # partial results survive an interrupted run
    return _write(out, args, info, fit, rows, tokens)


def time_to_reach(rows: list, target: float) -> tuple[float | None, bool]:
    """picollm's wall seconds to reach ``target`` (its final losses against its walls,
    interpolated linearly between budgets), and whether that is only an upper bound (its
    shortest run already reached it); None when no budget reached it."""
    pts = sorted((r["picollm_wall_s"], r["picollm_loss"]) for r in rows)
    if pts[0][1] <= target:
        return pts[0][0], True
    for (w0, l0), (w1, l1) in zip(pts, pts[1:]):
        if l1 <= target < l0:
            return w0 + (w1 - w0) * (l0 - target) / (l0 - l1), False
    return None, False


def verdicts(rows: list, asked: list) -> list:
    out = []
    rows = [r for r in rows if "error" not in r]
    by_m = {r["minutes"]: r for r in rows}
    for m in asked:
        if m not in by_m:
            continue
        r = by_m[m]
        t, upper_bound = time_to_reach(rows, r["nanogpt_loss"])
        half = by_m.get(m / 2)
        out.append({"minutes": m, "nanogpt_loss": r["nanogpt_loss"], "nanogpt_wall_s": r["nanogpt_wall_s"],
                    "picollm_lower_at_same_budget": r["picollm_loss"] < r["nanogpt_loss"],
                    "picollm_seconds_to_reach": t, "upper_bound": upper_bound,
                    "ratio": t / r["nanogpt_wall_s"] if t is not None else None,
                    "picollm_half_budget_loss": half["picollm_loss"] if half else None,
                    "half_budget_reaches": half is not None and half["picollm_loss"] <= r["nanogpt_loss"]})
    return out


def _write(out: Path, args, info: dict, fit: dict, rows: list, tokens) -> dict:
    res = {"machine_note": "every pair ran side by side, one thread each (OMP_NUM_THREADS=1, train.num_threads=1)",
           "data": info, "held_out_tokens_scored": int(len(tokens) - 1), "nanogpt_calibration": fit,
           "nanogpt_recipe": NANOGPT_RECIPE, "picollm_args": PICOLLM_DATA + args.picollm_args, "rows": rows,
           "verdicts": verdicts(rows, args.minutes)}
    (out / "results.json").write_text(json.dumps(res, indent=2))
    (out / "summary.md").write_text(summary(res))
    plot(res, out / "time_to_loss.png")
    return res


def summary(res: dict) -> str:
    rows = res["rows"]
    lines = ["# Time to loss: picollm vs nanoGPT's README CPU recipe",
             "",
             f"Same data (pystdlib, BPE {VOCAB}), both scored in fp32 on the same {res['held_out_tokens_scored']:,} "
             f"held-out tokens (picollm's validation split), each at its own context length. "
             f"Each pair ran side by side, one thread each; wall = the whole process, start to exit.",
             "",
             "| budget (min) | nanoGPT loss | picollm loss | nanoGPT wall (s) | picollm wall (s) | picollm wall / budget | "
             "nanoGPT iters | picollm model |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["minutes"]):
        if "error" in r:
            lines.append(f"| {r['minutes']:g} | failed: {r['error']} | | | | | | |")
            continue
        lines.append(f"| {r['minutes']:g} | {r['nanogpt_loss']:.4f} (ctx {r['nanogpt_ctx']}) | {r['picollm_loss']:.4f} "
                     f"(ctx {r['picollm_ctx']}) | {r['nanogpt_wall_s']:.0f} | {r['picollm_wall_s']:.0f} | "
                     f"{r['picollm_wall_over_budget']:.3f} | {r['nanogpt_iters']} | {r['picollm_model']} |")
    lines += ["", "## Time to reach nanoGPT's final loss (target: at most half its wall clock)", ""]
    for v in res["verdicts"]:
        within = "within" if v["upper_bound"] else "in"  # its shortest run already got there
        reach = (f"picollm reaches it {within} {v['picollm_seconds_to_reach']:.0f} s = {v['ratio']:.2f} x nanoGPT's "
                 f"{v['nanogpt_wall_s']:.0f} s" if v["ratio"] is not None else "picollm did not reach it at any budget run")
        half = (f"; picollm at {v['minutes'] / 2:g} min: {v['picollm_half_budget_loss']:.4f} "
                f"({'reaches' if v['half_budget_reaches'] else 'does NOT reach'} it)"
                if v["picollm_half_budget_loss"] is not None else "")
        ok = v["ratio"] is not None and v["ratio"] <= 0.5
        verdict = ("UNDECIDED: picollm's shortest run already reached it; add a smaller budget to --minutes"
                   if v["upper_bound"] and not ok else "PASS" if ok else "FAIL")
        lines.append(f"- {v['minutes']:g} min: nanoGPT {v['nanogpt_loss']:.4f}; {reach}{half}. **{verdict}** (<= 0.5)")
    c = res["nanogpt_calibration"]
    lines += ["", f"nanoGPT calibration (two copies side by side): {c['iter_s'] * 1e3:.1f} ms/iteration, "
              f"{c['eval_s']:.2f} s/evaluation, {c['fixed_s']:.1f} s start-up and exit.", ""]
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from picollm.figures import new_figure, save_figure

    rows = [r for r in res["rows"] if "error" not in r]
    if not rows:
        return
    fig = new_figure(figsize=(7.5, 4.8))
    ax = fig.add_subplot()
    for who, color in (("nanogpt", "tab:orange"), ("picollm", "tab:blue")):
        label = "nanoGPT README CPU recipe" if who == "nanogpt" else "picollm budget.minutes"
        pts = sorted((r[f"{who}_wall_s"] / 60, r[f"{who}_loss"]) for r in rows)
        ax.plot(*zip(*pts), "o-", color=color, lw=2, label=f"{label}: final, same held-out tokens")
        for i, r in enumerate(rows):
            c = r[f"{who}_curve"][1:]  # from the first evaluation after step 0 (the untrained model)
            if c:
                ax.plot(*zip(*c), ".:", color=color, lw=1, ms=3, alpha=0.7,
                        label=f"{label}: its own periodic evals" if i == 0 else None)
    ax.set_xlabel("wall clock of the whole process (minutes; one thread each, run side by side)")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title(f"Time to loss on pystdlib, BPE {VOCAB}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


# ------------------------------------------------------------------ shapes (the size rule's evidence)

SHAPE = re.compile(r"^(\d+)x(\d+)(?:h(\d+))?(?:s(\d+))?$")
LR = re.compile(r"^\d*\.?\d+(?:e-?\d+)?$")


def shape_overrides(spec: str) -> list:
    """Overrides for one --shapes entry: SHAPE[@LR][+OPTIMIZER], SHAPE being auto or LxD[hH][sS]."""
    from picollm.optim import OPTIMIZERS

    spec, _, optimizer = spec.partition("+")
    if optimizer and optimizer not in OPTIMIZERS:
        raise SystemExit(f"--shapes entry {spec}+{optimizer}: the optimizer after + must be one of "
                         f"{', '.join(OPTIMIZERS)}, e.g. auto+muon.")
    shape, _, lr = spec.partition("@")
    if lr and not LR.match(lr):
        raise SystemExit(f"--shapes entry {spec!r}: the peak LR after @ must be a number, e.g. auto@0.01.")
    extra = ([f"train.lr={lr}"] if lr else []) + ([f"train.optimizer={optimizer}"] if optimizer else [])
    if shape == "auto":
        return extra
    m = SHAPE.match(shape)
    if not m:
        raise SystemExit(f"--shapes entry {spec!r} is not LxD[hH][sS][@LR][+OPTIMIZER] (e.g. 4x128h4s64 or "
                         "2x128@0.01+muon) or auto[@LR][+OPTIMIZER].")
    layers, width, heads, seq = m.groups()
    return ([f"model.n_layer={layers}", f"model.d_model={width}"] + ([f"model.n_head={heads}"] if heads else [])
            + ([f"model.seq_len={seq}"] if seq else []) + extra)


def shapes(args, info: dict, out: Path) -> dict:
    specs = args.shapes.split(",")
    tokens = held_out_tokens(Path(info["nanogpt_dir"]))
    rows = []
    for m in args.minutes:
        for i in range(0, len(specs), 2):
            pair = specs[i:i + 2]
            jobs = [Job(f"picollm {s} {m:g} min",
                        picollm_cmd(fresh(out / f"shape-{s}-{m:g}min"), m,
                                    ["train.report=false", *shape_overrides(s), *args.picollm_args]),
                        ROOT, out / "logs" / f"shape-{s}-{m:g}min.log") for s in pair]
            side_by_side(jobs)
            for s, j in zip(pair, jobs):
                run_dir = out / f"shape-{s}-{m:g}min"
                if j.rc:
                    continue
                loss, ctx = score_picollm(run_dir, tokens)
                rows.append({"minutes": m, "shape": s, "model": picollm_shape(run_dir), "loss": loss, "ctx": ctx,
                             "wall_s": j.wall, "curve": curve(j, PICO_EVAL)})
                print(f"  {s} at {m:g} min: {loss:.4f} ({rows[-1]['model']}, {j.wall:.0f} s)", flush=True)
            (out / "shapes.json").write_text(json.dumps(rows, indent=2))
    lines = ["| budget (min) | shape | model | held-out loss | wall (s) |", "|---|---|---|---|---|"]
    lines += [f"| {r['minutes']:g} | {r['shape']} | {r['model']} | {r['loss']:.4f} (ctx {r['ctx']}) | {r['wall_s']:.0f} |"
              for r in sorted(rows, key=lambda r: (r["minutes"], r["loss"]))]
    (out / "shapes.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return {"rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nanogpt", help="path to a nanoGPT checkout (not needed with --shapes)")
    p.add_argument("--minutes", default="2,5,10", help="budgets in minutes, comma-separated (each M also runs M/2)")
    p.add_argument("--out", required=True, help="output directory (runs, logs, summary.md, results.json, the plot)")
    p.add_argument("--calib-iters", type=int, default=200, help="iterations of nanoGPT's calibration run")
    p.add_argument("--shapes", default=None,
                   help="picollm shapes (peak LRs, optimizers) to compare instead, e.g. auto,2x128,4x128h4s64, "
                        "auto,auto@0.01 or auto,auto+muon")
    p.add_argument("--picollm-args", default="", help="extra picollm overrides, space-separated")
    args = p.parse_args()
    args.minutes = [float(x) for x in args.minutes.split(",")]
    args.picollm_args = args.picollm_args.split()
    if any(not m > 0 for m in args.minutes):
        raise SystemExit("--minutes must be positive numbers, e.g. --minutes 2,5,10.")
    if args.shapes is None and not args.nanogpt:
        raise SystemExit("--nanogpt PATH is required (a nanoGPT checkout), unless --shapes is given.")
    for spec in (args.shapes or "auto").split(","):
        shape_overrides(spec)  # a bad entry is refused before any preparation or training
    out = Path(args.out).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    print("preparing picollm's pystdlib data (BPE 2048) and writing it in nanoGPT's format", flush=True)
    info = prepare(out)
    print(f"  {info['train_tokens']:,} train / {info['val_tokens']:,} held-out tokens -> {info['nanogpt_dir']}",
          flush=True)
    if args.shapes is not None:
        shapes(args, info, out)
        return
    res = compare(args, info, out)
    print(summary(res))
    print(f"wrote {out / 'summary.md'}, {out / 'results.json'} and {out / 'time_to_loss.png'}")


if __name__ == "__main__":
    main()
