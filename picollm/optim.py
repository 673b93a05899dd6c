"""AdamW with weight decay on matmul weights only, and the LR schedules: warmup + cosine,
or warmup-stable-decay (WSD)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay the 2-D matmul weights; leave embeddings, norm gains and biases alone
    (decaying a lookup table or a gain only pulls it toward zero for no benefit)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        is_matmul = p.dim() == 2 and id(p) not in embeddings
        (decay if is_matmul else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                   device: torch.device) -> torch.optim.AdamW:
    # The fused kernel does the whole update in one pass; it exists for CUDA and CPU.
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=1e-8,
                             fused=device.type in ("cuda", "cpu"))


def lr_at(step: int, peak: float, warmup: int, total: int, min_ratio: float, schedule: str = "cosine",
          decay_frac: float = 0.2, decay_shape: str = "linear") -> float:
    """Linear warmup over ``warmup`` steps to ``peak``, then down to ``min_ratio * peak`` at
    the last step (``total - 1``): a cosine over all the remaining steps, or (``wsd``) the
    peak held constant until the last ``decay_frac`` of the run, which then decays linearly
    or as 1 - sqrt. A WSD run's constant phase does not depend on its length, so one
    constant-LR run can branch cooldowns to several token budgets (Hägele et al. 2024)."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "wsd":
        decay_start = max(warmup, total - 1 - max(1, round(decay_frac * total)))
        if step <= decay_start:
            return peak
        progress = min(1.0, (step - decay_start) / max(1, total - 1 - decay_start))
        left = 1 - math.sqrt(progress) if decay_shape == "sqrt" else 1 - progress
        return peak * (min_ratio + (1 - min_ratio) * left)
    decay_steps = max(1, total - 1 - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return peak * (min_ratio + (1 - min_ratio) * cosine)
