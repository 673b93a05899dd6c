"""The calculator: arithmetic on the scaling laws for budgets you are not training now.

    python -m picollm.calculator calc.view=compute budget.compute=1e21 [calc.law=chinchilla]
    python -m picollm.calculator calc.view=time calc.gpu=h100-sxm calc.hours=24 [calc.n_gpus=8 calc.price_per_hour=2.5]
    python -m picollm.calculator calc.view=time calc.hours=1        # this machine, probed
    python -m picollm.calculator calc.view=params budget.params=1e9 calc.gpu=a100
    python -m picollm.calculator calc.view=inference calc.inference_tokens=1e13 budget.compute=1e21

Views: compute (Chinchilla-20 vs a fitted law's optimum vs Kaplan at one C), time (C from
wall-clock hours on a named GPU, or on this machine by the plan's throughput probe), params
(D = r N and C = 6 N D for a size) and inference (compute-optimal vs inference-optimal sizing
for a loss and a lifetime of served tokens). Settings: the calc group (picollm/config.py),
plus budget.compute / budget.params / budget.tokens_per_param. Only calc.view=time without
calc.gpu measures anything; everything else is arithmetic in scaling.py. calc.format=json
prints the result as JSON.
"""

from __future__ import annotations

import json
from typing import Callable, Optional

from omegaconf import DictConfig, OmegaConf

from picollm import cli
from picollm.config import ConfigError
from picollm.hardware import GPU_PEAK_FLOPS
# The time view on this machine probes it the way budget.minutes does; the number formats
# are the plan card's, so both tools print alike.
from picollm.plan import dtype_probe, make_plan, planner_device, throughput_probe
from picollm.units import rough_duration, si
from picollm.scaling import compare_allocations, compute_for_time, cost, inference_optimal, load_law

VIEWS = ("compute", "time", "params", "inference")  # calc.view; config.CALC_VIEWS repeats it, torch-free


def _law(cfg: DictConfig):
    """(label, law) of calc.law: a named law or a sweep's summary.json."""
    try:
        return load_law(cfg.calc.law)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _gpu_peak(name: str) -> float:
    if name not in GPU_PEAK_FLOPS:
        raise ConfigError(f"calc.gpu={name!r} is unknown; use one of {', '.join(GPU_PEAK_FLOPS)}.")
    return GPU_PEAK_FLOPS[name]


def _need(value, name: str, example: str):
    if value is None:
        raise ConfigError(f"{name} is not set; this view needs it, e.g. {example}.")
    if not value > 0:
        raise ConfigError(f"{name}={value} must be positive.")
    return float(value)


def _gpu_time(cfg: DictConfig, compute: float) -> dict:
    """Seconds and cost of `compute` FLOPs on the named GPU(s), when one is named."""
    c = cfg.calc
    if c.gpu is None:
        return {}
    per_second = compute_for_time(1.0, _gpu_peak(c.gpu), c.mfu, c.n_gpus)  # validates mfu and n_gpus
    seconds = compute / per_second
    out = {"gpu": c.gpu, "n_gpus": c.n_gpus, "mfu": c.mfu, "seconds": seconds}
    if c.price_per_hour is not None:
        out["cost"] = cost(seconds, c.price_per_hour, c.n_gpus)
    return out


def compute_view(cfg: DictConfig, compute: Optional[float] = None) -> dict:
    """Chinchilla-20 vs the named law's optimum vs Kaplan at one compute budget."""
    c = compute if compute is not None else _need(cfg.budget.compute, "budget.compute", "budget.compute=1e18")
    label, law = _law(cfg)
    return {"view": "compute", "compute": c, "law": label, "rows": compare_allocations(c, law, label)}


def _compute_on_named_gpu(c: DictConfig) -> tuple[float, float, dict]:
    """(seconds, C, source) of calc.hours on calc.n_gpus x calc.gpu at calc.mfu."""
    hours = _need(c.hours, "calc.hours", "calc.hours=24")
    seconds, peak = hours * 3600, _gpu_peak(c.gpu)
    source = {"hours": hours, "gpu": c.gpu, "n_gpus": c.n_gpus, "mfu": c.mfu, "peak_flops": peak}
    return seconds, compute_for_time(seconds, peak, c.mfu, c.n_gpus), source


def _compute_on_this_machine(cfg: DictConfig, measure_flops: Optional[Callable]) -> tuple[float, float, dict]:
    """(seconds, C, source) of calc.hours (or budget.minutes) here, at the rate the plan's
    throughput probe measures for the shape that budget would train."""
    c = cfg.calc
    minutes = c.hours * 60 if c.hours is not None else cfg.budget.minutes
    minutes = _need(minutes, "calc.hours (or budget.minutes)", "calc.hours=1, or calc.gpu=h100-sxm calc.hours=24")
    as_minutes = OmegaConf.create(OmegaConf.to_container(cfg))  # a writable copy
    as_minutes.budget.minutes = minutes
    plan = make_plan(as_minutes, planner_device(cfg, measure=measure_flops is None),
                     measure_flops=measure_flops or throughput_probe(as_minutes),
                     measure_dtypes=None if measure_flops else dtype_probe)
    rate = plan.compute / plan.est_seconds
    seconds = minutes * 60
    return seconds, rate * seconds, {"hours": seconds / 3600, "machine": plan.device, "measured_flops": rate}


def time_view(cfg: DictConfig, measure_flops: Optional[Callable] = None) -> dict:
    """Compute from wall time on a named GPU (or this machine, probed), then the compute view."""
    c = cfg.calc
    if c.gpu is not None:
        seconds, compute, source = _compute_on_named_gpu(c)
    else:
        seconds, compute, source = _compute_on_this_machine(cfg, measure_flops)
    out = compute_view(cfg, compute)
    out.update(view="time", **source)
    if c.price_per_hour is not None:
        out["cost"] = cost(seconds, c.price_per_hour, c.n_gpus)
    return out


def params_view(cfg: DictConfig) -> dict:
    """D = r N and C = 6 N D for a parameter count, with GPU time and cost when a GPU is named."""
    n = _need(cfg.budget.params, "budget.params", "budget.params=1e9")
    r = cfg.budget.tokens_per_param
    d = r * n
    return {"view": "params", "n_params": n, "tokens_per_param": r, "n_tokens": d, "compute": 6 * n * d,
            **_gpu_time(cfg, 6 * n * d)}


def _target_loss(cfg: DictConfig, law) -> float:
    """calc.target_loss, or the loss of the compute-optimal model at budget.compute."""
    c = cfg.calc
    if c.target_loss is not None and cfg.budget.compute is not None:
        raise ConfigError("calc.target_loss and budget.compute both set the loss target; set only one.")
    if c.target_loss is not None:
        return float(c.target_loss)
    if cfg.budget.compute is not None:
        return law.optimal_loss(_need(cfg.budget.compute, "budget.compute", "budget.compute=1e21"))
    raise ConfigError("the inference view needs a target: calc.target_loss=L or budget.compute=C "
                      "(the loss of the compute-optimal model at C).")


def inference_view(cfg: DictConfig) -> dict:
    """Compute-optimal vs inference-optimal sizing for a loss and a lifetime of served tokens."""
    law, c = _law(cfg)[1], cfg.calc
    tokens = c.inference_tokens
    if tokens is None or tokens < 0:
        raise ConfigError("calc.inference_tokens must be set to the tokens served (>= 0), e.g. calc.inference_tokens=1e12.")
    loss = _target_loss(cfg, law)
    try:
        rows = []
        for rule, served in (("compute-optimal", 0.0), ("inference-optimal", float(tokens))):
            n, d = inference_optimal(law, loss, served)
            rows.append({"rule": rule, "n_params": n, "n_tokens": d, "tokens_per_param": d / n,
                         "train_compute": 6 * n * d, "lifetime_compute": 6 * n * d + 2 * n * tokens})
    except ValueError as err:
        raise ConfigError(str(err)) from None
    saved = 1 - rows[1]["lifetime_compute"] / rows[0]["lifetime_compute"]
    return {"view": "inference", "law": c.law, "target_loss": loss, "inference_tokens": float(tokens),
            "rows": rows, "lifetime_savings": saved}


def calculate(cfg: DictConfig, measure_flops: Optional[Callable] = None) -> dict:
    """The result of calc.view as a dict. ``measure_flops`` stands in for this machine's
    throughput probe (calc.view=time without calc.gpu)."""
    view = cfg.calc.view
    if view == "compute":
        return compute_view(cfg)
    if view == "time":
        return time_view(cfg, measure_flops)
    if view == "params":
        return params_view(cfg)
    if view == "inference":
        return inference_view(cfg)
    if view is None:
        raise ConfigError(f"calc.view is not set; pick one of {', '.join(VIEWS)}, e.g. calc.view=compute budget.compute=1e21.")
    raise ConfigError(f"calc.view={view!r} is unknown; use one of {', '.join(VIEWS)}.")


def _table(rows: list[dict], cols: list[tuple[str, str, Callable]]) -> list[str]:
    cells = [[head for head, _, _ in cols]] + [[fmt(r[key]) for _, key, fmt in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]


def format_view(res: dict) -> str:
    """A readable rendering of a calculator result."""
    v, lines = res["view"], []
    money = lambda x: f"{x:,.2f}"
    if v in ("compute", "time"):
        if v == "time":
            where = (f"{res['n_gpus']} x {res['gpu']} at {res['mfu']:.0%} MFU" if "gpu" in res
                     else f"{res['machine']} at a measured {res['measured_flops'] / 1e9:.3g} GFLOP/s")
            lines.append(f"{res['hours']:g} h on {where} -> C = {res['compute']:.3e} FLOPs"
                         + (f", cost {money(res['cost'])}" if "cost" in res else ""))
        lines.append(f"compute C = {res['compute']:.3e} FLOPs; losses predicted by the {res['law']} law")
        lines += _table(res["rows"], [("rule", "rule", str), ("N", "n_params", si), ("D", "n_tokens", si),
                                      ("D/N", "tokens_per_param", lambda x: f"{x:.1f}"),
                                      ("loss", "loss", lambda x: f"{x:.4f}")])
    elif v == "params":
        lines.append(f"N = {si(res['n_params'])}  D = {res['tokens_per_param']:g} N = {si(res['n_tokens'])}  "
                     f"C = 6ND = {res['compute']:.3e} FLOPs")
        if "gpu" in res:
            lines.append(f"time on {res['n_gpus']} x {res['gpu']} at {res['mfu']:.0%} MFU: {rough_duration(res['seconds'])}"
                         + (f", cost {money(res['cost'])}" if "cost" in res else ""))
    elif v == "inference":
        lines.append(f"target loss {res['target_loss']:.4f} ({res['law']} law), serving {res['inference_tokens']:.3g} tokens")
        lines += _table(res["rows"], [("rule", "rule", str), ("N", "n_params", si), ("D", "n_tokens", si),
                                      ("D/N", "tokens_per_param", lambda x: f"{x:.1f}"),
                                      ("train C", "train_compute", lambda x: f"{x:.3e}"),
                                      ("lifetime C", "lifetime_compute", lambda x: f"{x:.3e}")])
        lines.append(f"lifetime compute saved by the inference-optimal model: {res['lifetime_savings']:.1%}")
    return "\n".join(lines)


USAGE = ("usage: python -m picollm.calculator calc.view=compute|time|params|inference [overrides...]"
         "  (calc.format=json for JSON only)")


def main(argv: Optional[list] = None) -> None:
    cfg = cli.parse(argv, "calculator", USAGE)
    try:
        res = calculate(cfg)
    except (ConfigError, ValueError) as err:
        raise SystemExit(f"error: {err}")
    print(json.dumps(res, indent=2) if cfg.calc.format == "json" else format_view(res))


if __name__ == "__main__":
    main()
