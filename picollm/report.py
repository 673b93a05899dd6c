"""A run's report: what was planned, what happened, how well it did, with plots.

    python -m picollm.report run_dir=runs/cpu [samples=true] [checkpoint=STEP]
    python -m picollm.report compare runs=[runs/a,runs/b] [out=DIR]

Writes run_dir/report.md plus loss.png, throughput.png and lr.png beside it. Everything
comes from files in run_dir (plan.json, metrics.jsonl, eval.json, config.yaml), so a
report can be rebuilt at any time, also while the run is still training.
"""

from __future__ import annotations

import json
import math
import platform
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, List, Optional, Union

import torch
from matplotlib.ticker import PercentFormatter
from omegaconf import OmegaConf

from picollm import cli
from picollm.figures import new_figure, save_figure
from picollm.files import write_atomic
from picollm.saved_run import (NOT_SAVED, LoadedRun, NotSavedError, RunError, check_run_dir, load_run, read_events,
                               read_metrics, saving)
from picollm.units import duration, si

if TYPE_CHECKING:  # annotations only: scaling is imported where a law is read
    from picollm.scaling import ScalingLaw

REPO = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- formatting

def fenced(text: str) -> str:
    """A code block whose fence is longer than any backtick run inside ``text``."""
    longest, run = 0, 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    fence = "`" * max(3, longest + 1)
    return f"{fence}\n{text}\n{fence}"


def table(rows: list[tuple[str, str]]) -> list[str]:
    return ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]


# ----------------------------------------------------------------------------- plots

def plot_loss(train: list[dict], evals: list[dict], path: Path) -> None:
    """Train and val loss against tokens (left) and training FLOPs (right)."""
    fig = new_figure(figsize=(11, 4))
    for ax, key, label in zip(fig.subplots(1, 2, sharey=True), ("tokens", "flops"), ("tokens", "training FLOPs")):
        if train:
            ax.plot([r[key] for r in train], [r["loss"] for r in train], lw=0.8, alpha=0.7, label="train loss")
        if evals:
            ax.plot([r[key] for r in evals], [r["val_loss"] for r in evals], "o-", ms=4, label="val loss")
        ax.set_xlabel(label)
        ax.set_title(f"loss vs {label}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.axes[0].set_ylabel("loss (nats/token)")
    save_figure(fig, path)


def plot_pair(train: list[dict], keys: tuple[str, str], labels: tuple[str, str], title: str, path: Path,
              log_second: bool = False) -> None:
    """Two stacked panels of per-step train metrics sharing the step axis."""
    fig = new_figure(figsize=(7, 5))
    axes = fig.subplots(2, 1, sharex=True)
    for ax, key, label in zip(axes, keys, labels):
        points = [(r["step"], r[key]) for r in train if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), lw=0.9)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if log_second and any(r.get(keys[1]) for r in train):
        axes[1].set_yscale("log")
    if keys[1] == "mfu":
        axes[1].yaxis.set_major_formatter(PercentFormatter(1.0))
    axes[0].set_title(title)
    axes[1].set_xlabel("step")
    save_figure(fig, path)


# ----------------------------------------------------------------------------- content

def git_commit() -> str:
    """The picollm commit the report was written with, or 'unknown' outside a git checkout."""
    if not (REPO / ".git").exists():  # an installed package: a parent repo's commit would mislead
        return "unknown"
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"], capture_output=True, text=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + (" (with uncommitted changes)" if dirty else "")


def final_eval(run_dir: Path, evals: list[dict]) -> Optional[dict]:
    """eval.json (the full held-out split) when present, else the last in-training evaluation."""
    path = run_dir / "eval.json"
    if path.is_file():
        try:
            return {**json.loads(path.read_text()), "source": "eval.json (full validation split)"}
        except ValueError:
            pass
    if evals:
        return {**evals[-1], "source": f"last evaluation during training (step {evals[-1]['step']})"}
    return None


def plan_section(plan: dict) -> list[str]:
    g = plan["model"]
    return ["## Plan", "", f"Budget: {plan['budget']}", ""] + table([
        ("model", f"{g['arch']}, n_layer={g['n_layer']}, d_model={g['d_model']}, n_head={g['n_head']}, "
                  f"seq_len={g['seq_len']}, vocab={g['vocab_size']}"),
        ("N (matmul params)", f"{si(plan['n_params'])} ({plan['n_params']:,})"),
        ("total params", f"{si(plan['n_params_total'])} ({plan['n_params_total']:,})"),
        ("D (tokens)", f"{si(plan['n_tokens'])} ({plan['n_tokens']:,})"),
        ("D/N", f"{plan['tokens_per_param']:.1f}"),
        ("C (FLOPs)", f"{plan['compute']:.3e} ({si(plan['flops_per_token'])} FLOPs/token)"),
        ("steps", f"{plan['steps']:,}"),
        ("batch", f"{plan['tokens_per_step']:,} tokens/step = {plan['batch_seqs']} seqs "
                  f"({plan['world_size']} proc x {plan['micro_batch']} micro x {plan['accum_steps']} accum)"),
        ("LR", f"{plan['lr']:.2e} peak -> {plan['min_lr']:.2e}, warmup {plan['warmup_steps']} steps, "
                f"{plan.get('schedule') or 'cosine'}"),
        ("device", f"{plan['device']}, {plan['dtype']}"),
        ("estimated time", f"{duration(plan['est_seconds'])} ({plan['est_source']})"
         if math.isfinite(plan.get("est_seconds", math.nan)) else "n/a"),  # NaN when no peak was known
    ]) + [f"\n> warning: {w}" for w in plan.get("warnings") or []]


def happened_section(plan: dict, train: list[dict]) -> list[str]:
    if not train:
        return ["## What happened", "", "No training steps are recorded in metrics.jsonl yet."]
    last = train[-1]
    mfus = [r["mfu"] for r in train if r.get("mfu") is not None]
    data_tokens = plan.get("data_tokens")
    skipped = sum(1 for r in train if r.get("skipped"))
    return ["## What happened", ""] + table([
        ("steps done", f"{last['step']:,} of {plan['steps']:,} planned"),
        ("tokens", f"{si(last['tokens'])} ({last['tokens']:,})"),
        ("FLOPs", f"{last['flops']:.3e}"),
        ("train wall clock", duration(sum(r["dt"] for r in train))),
        ("median throughput", f"{si(statistics.median(r['tok_per_s'] for r in train))} tok/s"),
        ("median MFU", f"{statistics.median(mfus):.1%}" if mfus else "n/a (no peak FLOP/s known)"),
        ("epochs", f"{last['tokens'] / data_tokens:.2f} (of {si(data_tokens)} train tokens)" if data_tokens else "n/a"),
        ("skipped steps", f"{skipped} (non-finite loss or gradient)"),
        ("last train loss", f"{last['loss']:.4f}"),
    ])


def configured_law(run_dir: Path) -> Optional[tuple[str, "ScalingLaw"]]:
    """The law named by the run's ``plan.law`` (see scaling.load_law), or None when the
    run names none or its file is gone: the report goes on without the prediction."""
    from picollm.scaling import load_law

    cfg_path = run_dir / "config.yaml"
    name = OmegaConf.load(cfg_path).get("plan", {}).get("law") if cfg_path.is_file() else None
    if not name:
        return None
    try:
        return load_law(str(name))
    except ValueError:
        return None


def result_section(final: Optional[dict], plan: dict, law: Optional[tuple] = None) -> list[str]:
    if final is None:
        return ["## Result", "", "No evaluation yet; run python -m picollm.evaluate run_dir=..."]
    rows = [
        ("val_loss", f"{final['val_loss']:.4f}"),
        ("val_bpb", f"{final['val_bpb']:.4f}"),
        ("val tokens", f"{final['val_tokens']:,}"),
        ("step", str(final.get("step", "n/a"))),
    ]
    notes = []
    if law is not None:
        name, fitted = law
        rows.append((f"{name} law's prediction for this (N, D)", f"{fitted.loss(plan['n_params'], plan['n_tokens']):.4f}"))
        if name in ("epoch", "chinchilla"):
            notes = ["", f"The {name} law was fitted to Chinchilla's runs (MassiveText, a 32k SentencePiece "
                         "tokenizer), so its level in nats/token does not transfer to this corpus and tokenizer; "
                         "compare its trend across runs, or set plan.law to a law fitted on your own sweep."]
    return ["## Result", "", f"From {final['source']}:", ""] + table(rows) + notes


def events_section(events: list[dict]) -> list[str]:
    """Skipped steps, loss spikes and rollbacks, as the trainer logged them."""
    lines = ["## Events", ""]
    if not events:
        return lines + ["None: no skipped steps, loss spikes or rollbacks.", ""]
    counts = {}
    for e in events:
        counts[e["event"]] = counts.get(e["event"], 0) + 1
    lines += [", ".join(f"{n} {name.replace('_', ' ')}{'s' if n > 1 else ''}" for name, n in counts.items()), "",
              "| step | event | details |", "|---|---|---|"]
    for e in events[:50]:
        details = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in e.items()
                            if k not in ("kind", "event", "step"))
        lines.append(f"| {e['step']} | {e['event'].replace('_', ' ')} | {details} |")
    if len(events) > 50:
        lines.append(f"| ... | {len(events) - 50} more in metrics.jsonl | |")
    return lines + [""]


def environment_section(plan: dict) -> list[str]:
    return ["## Environment", ""] + table([
        ("picollm commit", git_commit()),
        ("torch", torch.__version__),
        ("python", platform.python_version()),
        ("platform", platform.platform()),
        ("training device", f"{plan['device']} ({plan['dtype']})"),
        ("world size", f"{plan.get('world_size', 1)} process(es)"),
    ])


def write_report(run_dir: Union[str, Path], samples: Optional[list[str]] = None) -> Path:
    """Write run_dir/report.md and its plots; ``samples`` are texts to show verbatim."""
    run_dir = check_run_dir(run_dir)
    plan_path = run_dir / "plan.json"
    if not plan_path.is_file():
        raise RunError(f"run_dir {run_dir} has no plan.json, so it is not a picollm run (or training never started); "
                       f"train it first with python -m picollm.train run_dir={run_dir}.")
    plan = json.loads(plan_path.read_text())
    train, evals = read_metrics(run_dir)

    lines = [f"# picollm run report: {run_dir.name}", "", f"Run directory: `{run_dir.resolve()}`", ""]
    lines += plan_section(plan) + [""]
    lines += happened_section(plan, train) + [""]
    lines += result_section(final_eval(run_dir, evals), plan, configured_law(run_dir)) + [""]
    lines += events_section(read_events(run_dir))
    lines += ["## Plots", "", "![loss vs tokens and FLOPs](loss.png)", "", "![throughput](throughput.png)", "",
              "![learning rate and gradient norm](lr.png)", ""]
    if samples:
        lines += ["## Samples", ""]
        for text in samples:
            lines += [fenced(text), ""]
    lines += environment_section(plan)

    # Everything is computed; now the writes, each failure naming its file (e.g. a read-only run_dir).
    with saving(run_dir / "loss.png", "the report") as path:
        plot_loss(train, evals, path)
    with saving(run_dir / "throughput.png", "the report") as path:
        plot_pair(train, ("tok_per_s", "mfu"), ("tokens / s", "MFU"), "throughput", path)
    with saving(run_dir / "lr.png", "the report") as path:
        plot_pair(train, ("lr", "grad_norm"), ("learning rate", "grad norm"), "schedule", path, log_second=True)
    with saving(run_dir / "report.md", "the report") as out:
        write_atomic(out, "\n".join(lines) + "\n")  # a reader never sees half a report
    return out


def run_samples(run_dir: Union[str, Path], checkpoint: Optional[str] = None,
                loaded: Optional["LoadedRun"] = None) -> list[str]:
    """Prompt + continuation for each of the run's configured sample.prompts, from
    ``loaded`` (e.g. the model training just finished, in memory), else from the
    checkpoint (latest by default) loaded from disk."""
    from picollm.sample import generate_text  # sampling pulls in the model; only needed here

    run = loaded if loaded is not None else load_run(run_dir, checkpoint)
    s = run.config.sample
    return [p + generate_text(run, p, s.max_tokens, s.temperature, s.top_k, s.seed) for p in s.prompts]


# ----------------------------------------------------------------------------- command line

RUN_USAGE = """usage: python -m picollm.report [run] run_dir=DIR [samples=true] [checkpoint=STEP|PATH]
       python -m picollm.report compare runs=[DIR,DIR,...] [out=DIR]   (--help after compare for its settings)
Writes DIR/report.md with loss.png, throughput.png and lr.png; samples=true adds samples for
the run's sample.prompts from the latest (or the given) checkpoint. Exit status 3: a file of
the report could not be written (e.g. a read-only DIR); the message names it."""


@dataclass
class ReportArgs:
    run_dir: str = cli.required("the run to report on")
    samples: bool = cli.setting(False, "add samples for the run's sample.prompts (loads the model)")
    checkpoint: Optional[str] = cli.setting(None, "the checkpoint the samples come from (step or path)",
                                            shown="the newest valid one")


def _report_run(argv: list[str]) -> None:
    args = cli.parse(argv, "report run", RUN_USAGE, ReportArgs)
    try:
        samples = run_samples(args.run_dir, args.checkpoint) if args.samples else None
        path = write_report(args.run_dir, samples)
    except NotSavedError as err:
        _not_saved(err)
    except (RunError, ValueError) as err:
        raise SystemExit(f"error: {err}")
    print(f"wrote {path}")


def _not_saved(err: NotSavedError) -> None:
    """Exit with NOT_SAVED (3): the report was computed but a file of it could not be written."""
    print(f"error: {err}", file=sys.stderr)
    raise SystemExit(NOT_SAVED)


# ----------------------------------------------------------------------------- comparing runs

def run_summary(run_dir: Path) -> dict:
    """The numbers one row of the comparison table needs, from files in run_dir."""
    run_dir = check_run_dir(run_dir)
    plan_path = run_dir / "plan.json"
    if not plan_path.is_file():
        raise RunError(f"run_dir {run_dir} has no plan.json, so it is not a picollm run; "
                       "pass the directories of runs you trained.")
    plan = json.loads(plan_path.read_text())
    train, evals = read_metrics(run_dir)
    mfus = [r["mfu"] for r in train if r.get("mfu") is not None]
    return {"run_dir": run_dir, "plan": plan, "evals": evals, "final": final_eval(run_dir, evals),
            "steps_done": train[-1]["step"] if train else 0,
            "wall": sum(r["dt"] for r in train),
            "tok_per_s": statistics.median(r["tok_per_s"] for r in train) if train else None,
            "mfu": statistics.median(mfus) if mfus else None}


def run_labels(run_dirs: list[Path]) -> list[str]:
    """Folder names, or full paths where two runs share a name."""
    names = [d.name for d in run_dirs]
    return [n if names.count(n) == 1 else str(d) for n, d in zip(names, run_dirs)]


def compare_table(summaries: list[dict], labels: list[str]) -> list[str]:
    lines = ["| run | N | D | D/N | C (FLOPs) | steps | val_loss | val_bpb | train wall clock | median tok/s | median MFU |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, s in zip(labels, summaries):
        plan, final = s["plan"], s["final"]
        lines.append(" | ".join([
            f"| {label}", si(plan["n_params"]), si(plan["n_tokens"]), f"{plan['tokens_per_param']:.3g}",
            f"{plan['compute']:.3e}", f"{s['steps_done']:,} of {plan['steps']:,}",
            f"{final['val_loss']:.4f}" if final else "n/a", f"{final['val_bpb']:.4f}" if final else "n/a",
            duration(s["wall"]), si(s["tok_per_s"]), f"{s['mfu']:.1%}" if s["mfu"] is not None else "n/a"]) + " |")
    return lines


def plot_compare(summaries: list[dict], labels: list[str], key: str, xlabel: str, path: Path) -> None:
    """Val loss of every run against tokens or FLOPs, log x (step 0 has x=0, so it is left out)."""
    fig = new_figure(figsize=(7, 4))
    ax = fig.add_subplot()
    for label, s in zip(labels, summaries):
        points = [(r[key], r["val_loss"]) for r in s["evals"] if r.get(key)]
        if points:
            ax.plot(*zip(*points), "o-", ms=3, label=label)
    if ax.lines:
        ax.set_xscale("log")
        ax.legend()
    ax.set_xlabel(xlabel)
    ax.set_ylabel("val loss (nats/token)")
    ax.set_title(f"val loss vs {xlabel}")
    ax.grid(alpha=0.3, which="both")
    save_figure(fig, path)


def write_compare(run_dirs: list[Union[str, Path]], out: Union[str, Path] = "compare") -> Path:
    """out/compare.md (one table, one row per run) with val_loss_vs_tokens.png and val_loss_vs_flops.png."""
    if not run_dirs:
        raise RunError("no runs to compare; pass run directories, e.g. python -m picollm.report compare "
                       "runs=[runs/a,runs/b].")
    summaries = [run_summary(Path(d)) for d in run_dirs]
    labels = run_labels([s["run_dir"] for s in summaries])
    out = Path(out).expanduser()
    with saving(out, "the comparison"):
        out.mkdir(parents=True, exist_ok=True)
    lines = ["# picollm run comparison", ""] + compare_table(summaries, labels) + [
        "", "val_loss / val_bpb come from each run's eval.json when present, else its last evaluation during training.",
        "", "## Runs", ""] + [f"- {label}: `{s['run_dir'].resolve()}`" for label, s in zip(labels, summaries)] + [
        "", "## Plots", "", "![val loss vs tokens](val_loss_vs_tokens.png)", "",
        "![val loss vs FLOPs](val_loss_vs_flops.png)", ""]
    for key, xlabel, name in (("tokens", "tokens", "val_loss_vs_tokens.png"), ("flops", "FLOPs", "val_loss_vs_flops.png")):
        with saving(out / name, "the comparison") as path:
            plot_compare(summaries, labels, key, xlabel, path)
    with saving(out / "compare.md", "the comparison") as path:
        write_atomic(path, "\n".join(lines) + "\n")
    return path


COMPARE_USAGE = """usage: python -m picollm.report compare runs=[RUN_DIR,RUN_DIR,...] [out=DIR]
Writes DIR/compare.md (default DIR: compare/) with one table of every run (N, D, D/N, C, steps,
val_loss, val_bpb, wall clock, tok/s, MFU) and val loss vs tokens / FLOPs plots overlaying all runs."""


@dataclass
class CompareArgs:
    runs: List[str] = cli.setting([], "the run directories, one row each")
    out: str = cli.setting("compare", "the folder for compare.md and the plots")


def _compare(argv: list[str]) -> None:
    args = cli.parse(argv, "report compare", COMPARE_USAGE, CompareArgs)
    try:
        path = write_compare(list(args.runs), args.out)
    except NotSavedError as err:
        _not_saved(err)
    except (RunError, ValueError, KeyError) as err:
        raise SystemExit(f"error: {err}")
    print(f"wrote {path}")


# Subcommands: `python -m picollm.report [NAME] key=value ...`; without a name, "run". Each parses
# its own settings through picollm.cli.
COMMANDS: dict[str, Callable[[list[str]], None]] = {"run": _report_run, "compare": _compare}


def main(argv: Optional[list] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    name = "run"
    if argv and "=" not in argv[0] and not argv[0].startswith("-"):
        name = argv.pop(0)
    if name not in COMMANDS:
        raise SystemExit(f"error: unknown report command {name!r}; use one of {', '.join(COMMANDS)}.")
    COMMANDS[name](argv)


if __name__ == "__main__":
    main()
