"""The optimizers (``train.optimizer``) and the LR schedules: warmup + cosine, or
warmup-stable-decay (WSD).

adamw: AdamW (fused) for everything; weight decay on the matmul weights only.
muon:  Muon (``torch.optim.Muon``) for the 2-D matrices inside the transformer blocks
       (qkv, proj, MLP up/down), AdamW as above for the embeddings, the LM head, norm gains
       and biases, as one optimizer object.

LR rules. The schedule gives one LR, the AdamW LR (``train.lr``, or the derived rule
``min(cap, 0.3118 * C**-0.125)``); each parameter group runs at its own multiple of it
(``lr_ratio``): AdamW groups 1, Muon groups ``train.muon_lr_ratio`` (default 3). Muon
scales its update with ``adjust_lr_fn="match_rms_adamw"`` (0.2 * sqrt(max(rows, cols)),
Liu et al. 2025), which makes its update's RMS about AdamW's, so the AdamW rule carries
over up to that constant ratio. Measured on CPU (llama 2 x 128, vocab 2048, 98 steps at the
LR 3e-3 the old cap gave): ratio 1, 3, 10, 30 gave validation loss 5.64, 5.42, 5.37, 5.55
(AdamW 5.50), so the best Muon LR was 3e-2. The derived LR at that budget (8e11 FLOPs) is now
1e-2 (plan.LR_CAP), so the default ratio is 3: the same Muon LR of 3e-2. Muon's weight decay
is ``train.weight_decay`` too, decoupled as torch applies it: each step shrinks a matrix by
lr_muon * wd (so ratio times AdamW's shrink).

Muon orthogonalizes each update with a few Newton-Schulz iterations, matmuls that torch
always runs in bf16. A run that trains in fp32 runs them in fp32 instead: ``train.dtype=auto``
picks fp32 on a CPU only where bf16 is slower, and on a CPU without bf16 units (AVX2 only)
torch's bf16 iterations made a 2 x 128 Muon step ~5x an AdamW step.

adamw is the default: Muon reaches a lower loss for the same tokens, but its update
(Newton-Schulz, fixed cost per step) makes small-batch CPU steps ~20% slower, and at
the smallest budget measured AdamW got the lower loss for the same training time."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.optim._muon as torch_muon


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


OPTIMIZERS = ("adamw", "muon")


def muon_matrices(model: nn.Module) -> list[torch.Tensor]:
    """The hidden matrices: every trainable 2-D weight inside the transformer blocks. The
    embeddings and the LM head map tokens in and out; orthogonalizing them is not what
    Muon is for."""
    return [p for p in model.blocks.parameters() if p.requires_grad and p.dim() == 2]


def newton_schulz_fp32(update: torch.Tensor, ns_coefficients: tuple[float, float, float], ns_steps: int,
                       eps: float) -> torch.Tensor:
    """torch.optim.Muon's orthogonalization (the same quintic iteration and coefficients),
    with its matmuls in fp32 rather than bf16."""
    a, b, c = ns_coefficients
    tall = update.size(0) > update.size(1)
    x = update.float().T if tall else update.float()
    x = x / x.norm().clamp(min=eps)  # spectral norm at most 1
    for _ in range(ns_steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon for some parameters and AdamW for the rest, seen as one optimizer: one list of
    param_groups (Muon's first), one state and one state_dict, so checkpoints (by parameter
    name), the LR schedule, gradient clipping and the GradScaler handle it like any other.
    The two torch optimizers do the updates on the groups and state held here.
    ``fp32_newton_schulz`` swaps torch's bf16 orthogonalization for ``newton_schulz_fp32``
    while Muon steps (torch offers no option for it)."""

    def __init__(self, muon: torch.optim.Muon, adamw: torch.optim.AdamW, fp32_newton_schulz: bool = False) -> None:
        self.muon, self.adamw = muon, adamw
        self.orthogonalize = newton_schulz_fp32 if fp32_newton_schulz else None
        if self.orthogonalize and not callable(getattr(torch_muon, "_zeropower_via_newtonschulz", None)):
            raise RuntimeError("this torch's Muon has no _zeropower_via_newtonschulz to run in fp32; "
                               "train in bf16 or use train.optimizer=adamw.")
        super().__init__(muon.param_groups + adamw.param_groups, defaults={})
        self._share()

    def _share(self) -> None:
        # load_state_dict replaces self.state and self.param_groups: point the two at the
        # current ones before every step.
        n = len(self.muon.param_groups)
        self.muon.param_groups, self.adamw.param_groups = self.param_groups[:n], self.param_groups[n:]
        self.muon.state = self.adamw.state = self.state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._share()
        if self.orthogonalize is None:
            self.muon.step()
        else:
            torchs = torch_muon._zeropower_via_newtonschulz
            torch_muon._zeropower_via_newtonschulz = self.orthogonalize
            try:
                self.muon.step()
            finally:
                torch_muon._zeropower_via_newtonschulz = torchs
        self.adamw.step()
        return loss


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                   device: torch.device, kind: str = "adamw", muon_lr_ratio: float = 10.0,
                   dtype: str = "bf16") -> torch.optim.Optimizer:
    """The optimizer ``kind`` names (OPTIMIZERS); ``lr`` is the AdamW LR (see the module's LR
    rules). ``dtype`` is the run's training dtype: fp32 runs Muon's Newton-Schulz in fp32."""
    if kind not in OPTIMIZERS:
        raise ValueError(f"train.optimizer={kind!r} is unknown; use one of {', '.join(OPTIMIZERS)}.")
    hidden = {id(p) for p in muon_matrices(model)} if kind == "muon" else set()
    groups = [{**g, "params": [p for p in g["params"] if id(p) not in hidden]}
              for g in param_groups(model, weight_decay)]
    # The fused kernel does the whole update in one pass; it exists for CUDA and CPU.
    adamw = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8, fused=device.type in ("cuda", "cpu"))
    if kind == "adamw":
        return adamw
    muon = torch.optim.Muon([{"params": muon_matrices(model), "lr_ratio": muon_lr_ratio}], lr=lr * muon_lr_ratio,
                            weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw")
    return MuonWithAdamW(muon, adamw, fp32_newton_schulz=dtype == "fp32")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The schedule's LR for this step: each group runs at its own multiple of it."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_ratio", 1.0)


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
