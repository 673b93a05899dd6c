"""The GPT model: config, parameter and FLOP counts, forward pass, KV-cached generation.

Two architectures share one module:
- ``llama`` (default): pre-norm RMSNorm, rotary embeddings, QK-norm, SwiGLU MLP, no
  biases, untied embedding and LM head. Hugging Face's Llama / Qwen3 classes express
  exactly this shape (Qwen3 when QK-norm is on), which keeps export a renaming job.
- ``gpt2``: LayerNorm with biases, learned positions, GELU MLP, tied embedding/head.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

ARCHS = ("llama", "gpt2")
VOCAB_ALIGN = 128  # embedding/head rows are padded to a multiple of this (matmul tile friendly)


@dataclass
class GPTConfig:
    n_layer: int = 6
    n_head: int = 6
    d_model: int = 384
    seq_len: int = 256
    vocab_size: int = 8192
    arch: str = "llama"
    mlp_hidden: Optional[int] = None  # None: 4*d for gpt2; ~8/3*d (multiple of 64) for SwiGLU
    qk_norm: bool = True  # llama only
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"model.arch={self.arch!r} is unknown; use one of {', '.join(ARCHS)}.")
        for name in ("n_layer", "n_head", "d_model", "seq_len", "vocab_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"model.{name} must be a positive integer, got {getattr(self, name)}.")
        if self.d_model % self.n_head:
            raise ValueError(
                f"model.d_model={self.d_model} is not divisible by model.n_head={self.n_head}; "
                "pick a head count that divides the width."
            )
        if self.arch == "llama" and self.head_dim % 2:
            raise ValueError(
                f"rotary embeddings need an even head dimension, got d_model/n_head={self.head_dim}; "
                "change model.n_head or model.d_model."
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def padded_vocab(self) -> int:
        """Rows of the embedding and LM head: vocab_size rounded up to a multiple of 128.
        A 50,257-wide head (gpt2) runs measurably slower than a 50,304-wide one; the extra
        rows are never looked up, predicted or exported."""
        return VOCAB_ALIGN * math.ceil(self.vocab_size / VOCAB_ALIGN)

    @property
    def hidden(self) -> int:
        if self.mlp_hidden:
            return int(self.mlp_hidden)
        if self.arch == "gpt2":
            return 4 * self.d_model
        # SwiGLU has three matrices, so ~8/3*d keeps the MLP at the cost of a 4*d GELU MLP.
        return 64 * math.ceil(8 * self.d_model / 3 / 64)

    @classmethod
    def from_depth(cls, depth: int, aspect_ratio: int = 64, head_dim: int = 64, **kw) -> "GPTConfig":
        """Derive width and heads from depth alone: d_model = depth*aspect_ratio, rounded up
        to a multiple of head_dim. One knob makes model-size sweeps a single integer."""
        d_model = head_dim * max(1, math.ceil(depth * aspect_ratio / head_dim))
        return cls(n_layer=depth, d_model=d_model, n_head=d_model // head_dim, **kw)

    # --- counts (docs/conventions.md: N = every matmul weight incl. the LM head; no embeddings, norms, biases)
    # N, the total and FLOPs per token count the tokenizer's true vocabulary, not padded_vocab:
    # they describe the architecture (GPT-2 small stays 124,439,808 parameters), and scaling
    # fits, budgets and MFU must not change with a kernel-efficiency detail. The padding rows
    # cost 6 * (padded_vocab - vocab_size) * d_model extra training FLOPs per token, counted nowhere.
    def num_params(self, total: bool = False) -> int:
        d, h, L, V = self.d_model, self.hidden, self.n_layer, self.vocab_size
        attn = 4 * d * d
        mlp = (3 if self.arch == "llama" else 2) * d * h
        n = L * (attn + mlp) + d * V  # the LM head costs FLOPs even when tied
        if not total:
            return n
        if self.arch == "llama":
            norms = L * 2 * d + d + (L * 2 * self.head_dim if self.qk_norm else 0)
            return n + V * d + norms  # untied input embedding
        # gpt2: tied head (already counted), learned positions, LayerNorm weight+bias, biases
        norms = (2 * L + 1) * 2 * d
        biases = L * (3 * d + d + h + d)
        return n + self.seq_len * d + norms + biases

    def flops_per_token(self) -> int:
        """Training FLOPs per token (PaLM convention): 6N for forward+backward of every
        matmul plus 12*L*d*T for attention scores and values over the full sequence."""
        return 6 * self.num_params() + 12 * self.n_layer * self.d_model * self.seq_len


# Logits elements per chunk of the CPU loss (8 MiB in fp32): 256 rows at vocab 8192.
LOSS_CHUNK_ELEMENTS = 1 << 21


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm (same parameters and state-dict keys) with a cheaper backward.

    The gain is cast to the input's dtype so bf16 activations under autocast reach torch's
    fused forward kernel (mixed dtypes fall back to separate ops, with a warning). Torch has
    no fused RMSNorm backward on CPU: autograd differentiates pow/mean/rsqrt/mul one op at a
    time (~24 ms fwd+bwd at (16, 256, 384) fp32, against 2.5 ms for LayerNorm); the closed
    form below takes ~11.5 ms (interleaved micro-benchmark, one thread)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RMSNormFunction.apply(x, self.weight.to(x.dtype), self.eps or torch.finfo(x.dtype).eps)


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        return F.rms_norm(x, (x.shape[-1],), weight, eps)

    @staticmethod
    def backward(ctx, grad):
        # y = x * r * w with r = (mean(x^2) + eps)^-1/2 per row:
        # dx = r * (g w) - x * r^3 * mean(g w x),  dw = sum over rows of g * x * r.
        x, weight = ctx.saved_tensors
        d = x.shape[-1]
        rstd = torch.rsqrt(torch.linalg.vecdot(x, x).float().unsqueeze(-1) / d + ctx.eps)
        grad_w = grad * weight
        coef = (torch.linalg.vecdot(grad_w, x).float().unsqueeze(-1) * rstd.pow(3) / -d).to(x.dtype)
        rstd = rstd.to(x.dtype)
        dx = torch.addcmul(grad_w * rstd, x, coef)
        dweight = (x * rstd * grad).flatten(0, -2).sum(0, dtype=torch.float32)
        return dx, dweight.to(weight.dtype), None


class _ChunkedHeadLoss(torch.autograd.Function):
    """Mean cross-entropy of ``h @ weight.T`` over the first ``vocab_size`` columns, a few
    hundred rows at a time, with the gradients taken on the spot (softmax minus one-hot is
    known as soon as a chunk's logits are). The (tokens x vocab) logits, their softmax
    and its gradient are never held whole: at the reference shape those are 67-134 MB
    tensors that a CPU page-faults in afresh every step and streams through memory several
    times. Same math as the plain path, in the same dtypes (matmuls in ``dtype``, softmax
    in fp32); 8-10% of a reference bf16 step, ~15% of the speedrun model's."""

    @staticmethod
    def forward(ctx, h, weight, targets, vocab_size, dtype):
        rows = max(16, LOSS_CHUNK_ELEMENTS // weight.shape[0])
        with torch.autocast(h.device.type, enabled=False):
            h_c, w_c = h.to(dtype), weight.to(dtype)
            n = h.shape[0]
            grad_h = torch.empty_like(h_c)
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device)
            loss = torch.zeros((), dtype=torch.float32, device=h.device)
            for start in range(0, n, rows):
                h_rows, t = h_c[start:start + rows], targets[start:start + rows, None]
                logits = torch.mm(h_rows, w_c.t()).float()
                logits[:, vocab_size:] = float("-inf")  # padding columns get zero probability
                # -log softmax at the target = log(sum exp(logits - peak)) + peak - target logit; the
                # softmax is made in place: about half the time of log_softmax then exp (BENCHMARKS.md).
                target = logits.gather(1, t)
                peak = logits.amax(dim=-1, keepdim=True)
                probs = logits.sub_(peak).exp_()
                total = probs.sum(dim=-1, keepdim=True)
                loss += (total.log() + peak - target).sum()
                dlogits = probs.mul_(total.reciprocal().div_(n))  # (softmax - one-hot) / n
                dlogits = dlogits.scatter_add_(1, t, torch.full(t.shape, -1.0 / n, device=h.device)).to(dtype)
                torch.mm(dlogits, w_c, out=grad_h[start:start + rows])
                if dtype == torch.float32:  # (addmm_ would be invisible to FlopCounterMode)
                    torch.addmm(grad_w, dlogits.t(), h_rows, out=grad_w)
                else:  # no mixed-dtype addmm on CPU: a bf16 product, accumulated in fp32
                    grad_w += torch.mm(dlogits.t(), h_rows)
        ctx.save_for_backward(grad_h.to(h.dtype), grad_w.to(weight.dtype))
        return loss / n

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss, grad_w * grad_loss, None, None, None


def _norm(cfg: GPTConfig, dim: int) -> nn.Module:
    if cfg.arch == "gpt2":
        return nn.LayerNorm(dim, eps=1e-5)
    return RMSNorm(dim, eps=cfg.norm_eps)


def _rope_tables(head_dim: int, length: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # "rotate half" layout, as in HF Llama
    return angles.cos().float(), angles.sin().float()


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class KVCache:
    """Preallocated keys/values for every layer; ``pos`` is the number of cached tokens."""

    def __init__(self, cfg: GPTConfig, batch: int, device, dtype) -> None:
        shape = (batch, cfg.n_head, cfg.seq_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.pos = 0


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        bias = cfg.arch == "gpt2"
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=bias)
        self.use_rope = cfg.arch == "llama"
        self.q_norm = RMSNorm(cfg.head_dim, eps=cfg.norm_eps) if self.use_rope and cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, eps=cfg.norm_eps) if self.q_norm is not None else None

    def forward(self, x, cos, sin, cache: Optional[KVCache] = None, layer: int = 0):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim).unbind(2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, hd)
        if self.use_rope:
            q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            start, end = cache.pos, cache.pos + T
            cache.k[layer][:, :, start:end] = k
            cache.v[layer][:, :, start:end] = v
            k_all, v_all = cache.k[layer][:, :, :end], cache.v[layer][:, :, :end]
            if start == 0:
                y = F.scaled_dot_product_attention(q, k_all, v_all, is_causal=True)
            else:  # new queries see every cached key and the causal part of their own chunk
                mask = torch.ones(T, end, dtype=torch.bool, device=x.device).tril(diagonal=start)
                y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.swiglu = cfg.arch == "llama"
        bias = not self.swiglu
        self.up = nn.Linear(cfg.d_model, (2 if self.swiglu else 1) * cfg.hidden, bias=bias)
        self.down = nn.Linear(cfg.hidden, cfg.d_model, bias=bias)

    def forward(self, x):
        if self.swiglu:
            gate, up = self.up(x).chunk(2, dim=-1)
            return self.down(F.silu(gate) * up)
        return self.down(F.gelu(self.up(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.norm1, self.attn = _norm(cfg, cfg.d_model), Attention(cfg)
        self.norm2, self.mlp = _norm(cfg, cfg.d_model), MLP(cfg)

    def forward(self, x, cos, sin, cache=None, layer=0):
        x = x + self.attn(self.norm1(x), cos, sin, cache, layer)
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.padded_vocab, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.seq_len, cfg.d_model) if cfg.arch == "gpt2" else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = _norm(cfg, cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.padded_vocab, bias=False)
        if cfg.arch == "gpt2":
            self.lm_head.weight = self.embed.weight
        cos, sin = _rope_tables(cfg.head_dim, cfg.seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.activation_checkpointing = False
        self.reset_parameters()
        self.register_load_state_dict_pre_hook(_pad_vocab_rows)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Fan-in scaled normal init; the two projections that write into the residual
        stream are further scaled by 1/sqrt(2*n_layer) so its variance stays O(1) with depth."""
        cfg = self.cfg
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=module.in_features ** -0.5)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.RMSNorm, nn.LayerNorm)):
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        residual_std = cfg.d_model ** -0.5 / math.sqrt(2 * cfg.n_layer)
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, std=residual_std)
            nn.init.normal_(block.mlp.down.weight, std=cfg.hidden ** -0.5 / math.sqrt(2 * cfg.n_layer))
        if cfg.arch == "gpt2":  # tied: the table doubles as the head, so keep it small
            nn.init.normal_(self.embed.weight, std=0.02)
            nn.init.normal_(self.pos_embed.weight, std=0.01)
        else:
            nn.init.normal_(self.embed.weight, std=1.0)
            nn.init.normal_(self.lm_head.weight, std=0.5 * cfg.d_model ** -0.5)
        # Padding rows are never used; zeros make that visible in a checkpoint.
        self.embed.weight[cfg.vocab_size:].zero_()
        self.lm_head.weight[cfg.vocab_size:].zero_()

    def num_params(self, total: bool = False) -> int:
        return self.cfg.num_params(total)

    def flops_per_token(self) -> int:
        return self.cfg.flops_per_token()

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None, reduction: str = "mean"):
        """Logits for ``idx`` (B, T); with ``targets`` the cross-entropy loss instead."""
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.cfg.seq_len:
            raise ValueError(f"sequence of {start + T} tokens is longer than model.seq_len={self.cfg.seq_len}.")
        x = self.embed(idx)
        if self.pos_embed is not None:
            x = x + self.pos_embed(torch.arange(start, start + T, device=idx.device))
        cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]
        for i, block in enumerate(self.blocks):
            if self.activation_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin, cache, i)
        if cache is not None:
            cache.pos += T
        h = self.norm_f(x)
        if targets is not None and self._chunked_loss(h, reduction):
            dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else h.dtype
            return _ChunkedHeadLoss.apply(h.reshape(B * T, -1), self.lm_head.weight, targets.reshape(-1),
                                          self.cfg.vocab_size, dtype)
        # The head runs at its padded width (the fast shape); the padding columns are sliced
        # off so no caller can predict, sample or score a padding id.
        logits = self.lm_head(h)[..., :self.cfg.vocab_size]
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), reduction=reduction)

    def _chunked_loss(self, h: torch.Tensor, reduction: str) -> bool:
        """The chunked head+loss is for CPU training steps: GPUs (and torch.compile, which
        fuses the plain path itself) keep the plain one, and evaluation (no gradient, or
        per-token losses) gains nothing from computing gradients."""
        return (h.device.type == "cpu" and reduction == "mean" and torch.is_grad_enabled()
                and h.requires_grad and not torch.compiler.is_compiling())

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: Optional[int] = None, generator: Optional[torch.Generator] = None,
                 use_cache: bool = True) -> Iterator[torch.Tensor]:
        """Yield one new token per row of ``idx`` at a time. temperature 0 means greedy.
        With the cache, only new tokens are run through the model; when the context
        reaches seq_len, the cache is rebuilt from the most recent half of the window."""
        was_training = self.training
        self.eval()
        seq, cache = idx, None
        dtype = next(self.parameters()).dtype
        try:
            for _ in range(max_new_tokens):
                if not use_cache:
                    logits = self(seq[:, -self.cfg.seq_len:])
                elif cache is None or cache.pos >= self.cfg.seq_len:
                    keep = self.cfg.seq_len if cache is None else self.cfg.seq_len // 2
                    cache = KVCache(self.cfg, seq.size(0), seq.device, dtype)
                    logits = self(seq[:, -keep:], cache=cache)
                else:
                    logits = self(seq[:, -1:], cache=cache)
                logits = logits[:, -1, :].float()
                nxt = _sample(logits, temperature, top_k, generator)
                seq = torch.cat([seq, nxt], dim=1)
                yield nxt
        finally:
            self.train(was_training)

    def config_dict(self) -> dict:
        return asdict(self.cfg)


def _pad_vocab_rows(module: GPT, state_dict: dict, prefix: str, *args) -> None:
    """Load a checkpoint written before the vocabulary was padded: its embedding and head have
    exactly vocab_size rows, so append zero rows up to padded_vocab. Aligned ones pass untouched."""
    cfg = module.cfg
    if cfg.padded_vocab == cfg.vocab_size:
        return
    for name in ("embed.weight", "lm_head.weight"):
        weight = state_dict.get(prefix + name)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.size(0) == cfg.vocab_size:
            state_dict[prefix + name] = F.pad(weight, (0, 0, 0, cfg.padded_vocab - cfg.vocab_size))


def _sample(logits: torch.Tensor, temperature: float, top_k: Optional[int],
            generator: Optional[torch.Generator]) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)
