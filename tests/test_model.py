"""The GPT module: parameter and FLOP counts, config validation, KV-cached generation,
causality, trainability, activation checkpointing and bf16 autocast."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from picollm.model import GPT, GPTConfig, KVCache

TINY = dict(n_layer=2, n_head=2, d_model=32, seq_len=16, vocab_size=61)


def tiny(arch="llama", **kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**TINY, "arch": arch, **kw}))


def linear_weight_count(model: nn.Module) -> int:
    """N measured from the instantiated modules: every nn.Linear weight, each module once
    (so a tied LM head is still counted: it costs FLOPs per token)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def padding_rows(cfg: GPTConfig) -> int:
    """Weights in the head's padding rows (padded_vocab - vocab_size): real matmul work,
    deliberately not part of N."""
    return (cfg.padded_vocab - cfg.vocab_size) * cfg.d_model


# --- parameter counts -------------------------------------------------------------------

@pytest.mark.parametrize("shape", [
    dict(n_layer=2, n_head=2, d_model=32, seq_len=16, vocab_size=61),
    dict(n_layer=3, n_head=4, d_model=64, seq_len=8, vocab_size=100, mlp_hidden=96),
    dict(n_layer=1, n_head=3, d_model=48, seq_len=5, vocab_size=7),
])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_num_params_matches_hand_formula_and_modules(arch, shape):
    cfg = GPTConfig(arch=arch, **shape)
    L, d, V = cfg.n_layer, cfg.d_model, cfg.vocab_size
    if arch == "llama":
        hidden = shape.get("mlp_hidden") or 64 * math.ceil(8 * d / 3 / 64)
        by_hand = L * (4 * d * d + 3 * d * hidden) + d * V
    else:
        hidden = shape.get("mlp_hidden") or 4 * d
        by_hand = L * (4 * d * d + 2 * d * hidden) + d * V
    assert cfg.hidden == hidden
    assert cfg.num_params() == by_hand

    model = GPT(cfg)
    assert model.num_params() == by_hand
    assert linear_weight_count(model) == by_hand + padding_rows(cfg)
    # parameters() deduplicates the tied embedding/head; the padding rows (in the head, and in
    # llama's separate embedding) are the only difference from the true total
    tables = 1 if arch == "gpt2" else 2
    assert model.num_params(total=True) == sum(p.numel() for p in model.parameters()) - tables * padding_rows(cfg)
    if arch == "gpt2":
        assert model.lm_head.weight is model.embed.weight
        assert cfg.num_params(total=True) == by_hand + cfg.seq_len * d + sum(
            p.numel() for n, p in model.named_parameters() if p.dim() == 1)
    else:
        assert model.lm_head.weight is not model.embed.weight
        assert cfg.num_params(total=True) == by_hand + V * d + sum(
            p.numel() for p in model.parameters() if p.dim() == 1)


def test_num_params_total_without_qk_norm():
    model = tiny("llama", qk_norm=False, vocab_size=128)  # aligned: no padding rows
    assert model.blocks[0].attn.q_norm is None
    assert model.num_params(total=True) == sum(p.numel() for p in model.parameters())


def test_gpt2_small_has_the_published_124m_parameters():
    cfg = GPTConfig(arch="gpt2", n_layer=12, n_head=12, d_model=768, seq_len=1024, vocab_size=50257)
    assert cfg.num_params(total=True) == 124_439_808
    assert cfg.num_params() == 12 * (4 * 768**2 + 8 * 768**2) + 768 * 50257
    with torch.device("meta"):  # the real module, without allocating or initialising it
        model = GPT(cfg)
    # The module holds 50,304 rows (47 of padding); the count is of the architecture.
    assert cfg.padded_vocab == 50304 and model.embed.weight.shape == (50304, 768)
    assert sum(p.numel() for p in model.parameters()) - padding_rows(cfg) == 124_439_808
    assert linear_weight_count(model) - padding_rows(cfg) == cfg.num_params()


# --- FLOPs per token ----------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("L,H,d,T,V", [(2, 2, 32, 16, 61), (12, 12, 768, 1024, 50257)])
def test_flops_per_token_by_hand(arch, L, H, d, T, V):
    cfg = GPTConfig(arch=arch, n_layer=L, n_head=H, d_model=d, seq_len=T, vocab_size=V)
    assert cfg.flops_per_token() == 6 * cfg.num_params() + 12 * L * d * T


def _math_sdpa(q, k, v, attn_mask=None, is_causal=False, **_):
    """Reference attention as explicit matmuls, so FlopCounterMode sees them on CPU
    (it has no formula for the CPU flash kernel)."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    if is_causal:
        attn_mask = torch.ones(q.size(-2), k.size(-2), dtype=torch.bool).tril()
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_flops_per_token_matches_measured_matmul_flops(arch, monkeypatch):
    model = tiny(arch, seq_len=32)
    cfg = model.cfg
    B, T = 2, cfg.seq_len
    x = torch.randint(0, cfg.vocab_size, (B, T))
    tokens = B * T

    # Linear layers alone (SDPA is not counted on CPU): forward = 2N, forward+backward = 6N,
    # plus the head's padding rows (vocab 61 -> 128), which the hardware computes but N omits.
    pad = padding_rows(cfg)
    assert pad == (128 - 61) * cfg.d_model
    with FlopCounterMode(display=False) as fc:
        logits = model(x)
    assert fc.get_total_flops() == 2 * (cfg.num_params() + pad) * tokens
    with FlopCounterMode(display=False) as fc:
        model(x, x).backward()
    assert fc.get_total_flops() == 6 * (cfg.num_params() + pad) * tokens

    # With attention as explicit matmuls: QK^T and AV over the full T x T (no causal
    # discount) add 4*L*d*T per token forward, and 3x that for training -> 12*L*d*T.
    monkeypatch.setattr(F, "scaled_dot_product_attention", _math_sdpa)
    with FlopCounterMode(display=False) as fc:
        logits_math = model(x)
    assert fc.get_total_flops() == (2 * (cfg.num_params() + pad) + 4 * cfg.n_layer * cfg.d_model * T) * tokens
    torch.testing.assert_close(logits_math, logits, atol=1e-5, rtol=1e-5)
    with FlopCounterMode(display=False) as fc:
        model(x, x).backward()
    assert fc.get_total_flops() == (cfg.flops_per_token() + 6 * pad) * tokens


# --- config validation ----------------------------------------------------------------------

@pytest.mark.parametrize("depth,head_dim,d_model", [(1, 64, 64), (6, 64, 384), (12, 64, 768),
                                                    (5, 128, 384), (3, 48, 192), (7, 96, 480)])
def test_from_depth(depth, head_dim, d_model):
    cfg = GPTConfig.from_depth(depth, head_dim=head_dim, vocab_size=100)
    assert cfg.n_layer == depth
    assert cfg.d_model == d_model
    assert cfg.d_model % head_dim == 0 and cfg.d_model >= depth * 64
    assert cfg.d_model - depth * 64 < head_dim  # rounded up to the nearest multiple
    assert cfg.n_head == d_model // head_dim and cfg.head_dim == head_dim
    assert cfg.vocab_size == 100


def test_from_depth_aspect_ratio_and_kwargs():
    cfg = GPTConfig.from_depth(4, aspect_ratio=32, head_dim=32, arch="gpt2", seq_len=64)
    assert (cfg.d_model, cfg.n_head, cfg.arch, cfg.seq_len) == (128, 4, "gpt2", 64)


@pytest.mark.parametrize("kw,words", [
    (dict(d_model=30, n_head=4), ["d_model=30", "n_head=4", "divisible"]),
    (dict(arch="mamba"), ["arch", "mamba", "llama", "gpt2"]),
    (dict(d_model=30, n_head=10), ["even head dimension", "3"]),
    (dict(n_layer=0), ["n_layer", "positive"]),
    (dict(vocab_size=-1), ["vocab_size", "positive"]),
])
def test_bad_configs_raise_clear_errors(kw, words):
    with pytest.raises(ValueError) as err:
        GPTConfig(**{**TINY, **kw})
    for w in words:
        assert w in str(err.value)


def test_odd_head_dim_is_fine_without_rope():
    cfg = GPTConfig(**{**TINY, "arch": "gpt2", "d_model": 30, "n_head": 10})
    assert cfg.head_dim == 3
    assert GPT(cfg)(torch.zeros(1, 4, dtype=torch.long)).shape == (1, 4, TINY["vocab_size"])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_sequence_longer_than_seq_len_raises(arch):
    model = tiny(arch).eval()
    T = model.cfg.seq_len
    model(torch.zeros(1, T, dtype=torch.long))  # exactly seq_len is fine
    with pytest.raises(ValueError, match=rf"{T + 1} tokens is longer than model.seq_len={T}"):
        model(torch.zeros(1, T + 1, dtype=torch.long))
    cache = KVCache(model.cfg, 1, "cpu", torch.float32)
    model(torch.zeros(1, T - 2, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="longer than model.seq_len"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=cache)


# --- behaviour of a fresh / trained model ------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_initial_loss_is_near_uniform(arch):
    model = tiny(arch, vocab_size=512, seq_len=32, d_model=64)
    torch.manual_seed(1)
    x = torch.randint(0, 512, (8, 32))
    y = torch.randint(0, 512, (8, 32))
    with torch.no_grad():
        loss = model(x, y).item()
    assert abs(loss - math.log(512)) < 1.0


def test_loss_reduction_none_matches_mean():
    model = tiny()
    x = torch.randint(0, 61, (2, 8))
    with torch.no_grad():
        per_token = model(x, x, reduction="none")
        assert per_token.shape == (16,)
        torch.testing.assert_close(per_token.mean(), model(x, x))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_causality(arch):
    model = tiny(arch).eval()
    T = model.cfg.seq_len
    torch.manual_seed(2)
    x = torch.randint(0, model.cfg.vocab_size, (2, T))
    with torch.no_grad():
        base = model(x)
        for t in (0, 5, T - 1):
            x2 = x.clone()
            x2[:, t] = (x2[:, t] + 1) % model.cfg.vocab_size
            out = model(x2)
            torch.testing.assert_close(out[:, :t], base[:, :t], atol=1e-6, rtol=0)
            assert (out[:, t:] - base[:, t:]).abs().amax(-1).min() > 1e-4  # later positions do see it


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_overfits_a_single_batch(arch):
    model = tiny(arch, d_model=64, n_head=4, seq_len=32, vocab_size=64)
    torch.manual_seed(3)
    x = torch.randint(0, 64, (2, 32))  # 64 random targets to memorise
    y = torch.randint(0, 64, (2, 32))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    first = None
    for _ in range(25):
        loss = model(x, y)
        first = first if first is not None else loss.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert first > 3.5
    assert loss.item() < 0.5


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_activation_checkpointing_same_loss_and_grads(arch):
    model = tiny(arch).train()
    x = torch.randint(0, model.cfg.vocab_size, (3, model.cfg.seq_len))

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(x, x.roll(-1, 1))
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss_ref, grads_ref = loss_and_grads()
    model.activation_checkpointing = True
    loss_ckpt, grads_ckpt = loss_and_grads()
    assert grads_ref.keys() == grads_ckpt.keys()
    torch.testing.assert_close(loss_ckpt, loss_ref, atol=1e-6, rtol=0)
    for name in grads_ref:
        assert grads_ref[name].abs().sum() > 0, name
        torch.testing.assert_close(grads_ckpt[name], grads_ref[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # CPU rms_norm perf note
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_bf16_autocast_on_cpu(arch):
    model = tiny(arch, d_model=64, n_head=4)
    x = torch.randint(0, model.cfg.vocab_size, (4, model.cfg.seq_len))
    y = x.roll(-1, 1)
    ref = model(x, y).item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
        loss = model(x, y)
    assert logits.dtype == torch.bfloat16  # autocast did reach the matmuls
    assert loss.dtype == torch.float32
    loss.backward()
    assert math.isfinite(loss.item())
    assert abs(loss.item() - ref) < 0.05
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(p.dtype == torch.float32 for p in model.parameters())


# --- KV cache and generation ---------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_kv_cache_logits_match_full_recompute(arch):
    model = tiny(arch).eval()
    T = model.cfg.seq_len
    torch.manual_seed(4)
    x = torch.randint(0, model.cfg.vocab_size, (2, T))
    with torch.no_grad():
        full = model(x)
        # prefill 5 tokens, then one token at a time
        cache = KVCache(model.cfg, 2, "cpu", torch.float32)
        pieces = [model(x[:, :5], cache=cache)]
        for t in range(5, T):
            pieces.append(model(x[:, t:t + 1], cache=cache))
        assert cache.pos == T
        torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)
        # chunks of several new tokens after a prefill (uses the explicit mask path)
        cache = KVCache(model.cfg, 2, "cpu", torch.float32)
        pieces = [model(x[:, a:b], cache=cache) for a, b in ((0, 3), (3, 7), (7, 8), (8, T))]
        torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_generate_with_and_without_cache_agree(arch):
    model = tiny(arch).train()
    T = model.cfg.seq_len
    torch.manual_seed(5)
    prompt = torch.randint(0, model.cfg.vocab_size, (2, 3))
    n_new = T - prompt.size(1) + 1  # the last token is predicted from a full window
    with_cache = list(model.generate(prompt, n_new, temperature=0, use_cache=True))
    without = list(model.generate(prompt, n_new, temperature=0, use_cache=False))
    assert len(with_cache) == n_new and all(t.shape == (2, 1) for t in with_cache)
    assert torch.equal(torch.cat(with_cache, 1), torch.cat(without, 1))
    assert model.training  # generate restores the mode it found
    # the greedy tokens are the argmax of a full recompute
    seq = torch.cat([prompt, *with_cache], 1)
    with torch.no_grad():
        model.eval()
        expected = model(seq[:, :T]).argmax(-1)[:, prompt.size(1) - 1:]
    assert torch.equal(seq[:, prompt.size(1):], expected)


def test_generate_with_a_full_cache_restarts_from_the_recent_half_window():
    model = tiny("gpt2").eval()
    T = model.cfg.seq_len
    prompt = torch.randint(0, model.cfg.vocab_size, (2, 4))
    toks = list(model.generate(prompt, T - 4 + 2, temperature=0))
    seq = torch.cat([prompt, *toks[:-1]], 1)  # the context the last token was predicted from
    assert seq.size(1) == T + 1
    with torch.no_grad():
        expected = model(seq[:, -(T // 2):])[:, -1].argmax(-1, keepdim=True)
    assert torch.equal(toks[-1], expected)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_prompt_longer_than_seq_len_is_cropped(arch):
    model = tiny(arch).eval()
    T = model.cfg.seq_len
    prompt = torch.randint(0, model.cfg.vocab_size, (2, T + 5))
    with torch.no_grad():
        expected = model(prompt[:, -T:])[:, -1].argmax(-1, keepdim=True)
    for use_cache in (True, False):
        assert torch.equal(next(model.generate(prompt, 1, temperature=0, use_cache=use_cache)), expected)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generate_past_seq_len(arch):
    model = tiny(arch)
    prompt = torch.randint(0, model.cfg.vocab_size, (1, 4))
    for use_cache in (True, False):
        out = list(model.generate(prompt, 2 * model.cfg.seq_len + 3, temperature=1.0, use_cache=use_cache,
                                  generator=torch.Generator().manual_seed(0)))
        assert len(out) == 2 * model.cfg.seq_len + 3
        toks = torch.cat(out, 1)
        assert toks.min() >= 0 and toks.max() < model.cfg.vocab_size


def test_sampling_is_deterministic_with_a_seeded_generator():
    model = tiny()
    prompt = torch.randint(0, model.cfg.vocab_size, (2, 2))

    def sample(seed, **kw):
        gen = torch.Generator().manual_seed(seed)
        return torch.cat(list(model.generate(prompt, 10, temperature=1.0, generator=gen, **kw)), 1)

    a = sample(0)
    assert torch.equal(a, sample(0))
    assert torch.equal(a, sample(0, use_cache=False))  # same logits -> same draws
    assert not torch.equal(a, sample(1))
    k = sample(0, top_k=5)
    assert torch.equal(k, sample(0, top_k=5))


def test_top_k_one_equals_greedy():
    model = tiny("gpt2")
    prompt = torch.randint(0, model.cfg.vocab_size, (3, 2))
    greedy = torch.cat(list(model.generate(prompt, 12, temperature=0)), 1)
    top1 = torch.cat(list(model.generate(prompt, 12, temperature=1.5, top_k=1,
                                         generator=torch.Generator().manual_seed(7))), 1)
    assert torch.equal(greedy, top1)


def test_top_k_restricts_samples_to_the_k_most_likely():
    model = tiny()
    prompt = torch.randint(0, model.cfg.vocab_size, (64, 3))
    with torch.no_grad():
        top3 = model.eval()(prompt)[:, -1].topk(3, -1).indices
    nxt = next(model.generate(prompt, 1, temperature=5.0, top_k=3, generator=torch.Generator().manual_seed(0)))
    assert (nxt == top3).any(-1).all()


# --- vocabulary padding ------------------------------------------------------------------------------

@pytest.mark.parametrize("vocab,padded", [(50257, 50304), (8192, 8192), (1000, 1024), (61, 128), (128, 128),
                                          (129, 256), (100277, 100352)])
def test_padded_vocab_is_the_next_multiple_of_128(vocab, padded):
    cfg = GPTConfig(**{**TINY, "vocab_size": vocab})
    assert cfg.padded_vocab == padded
    assert cfg.vocab_size == vocab  # the tokenizer's vocabulary is what the config keeps


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_padding_changes_neither_n_nor_flops(arch):
    # 1000 and 999 both pad to 1024: N and FLOPs follow the true vocabulary, one row of d apart.
    a, b = (GPTConfig(**{**TINY, "arch": arch, "vocab_size": v}) for v in (1000, 999))
    assert a.padded_vocab == b.padded_vocab == 1024
    assert a.num_params() - b.num_params() == TINY["d_model"]
    assert a.flops_per_token() - b.flops_per_token() == 6 * TINY["d_model"]
    assert a.num_params() == GPTConfig(**{**TINY, "arch": arch, "vocab_size": 1024}).num_params() - 24 * TINY["d_model"]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_logits_cover_only_the_true_vocabulary(arch):
    model = tiny(arch, vocab_size=1000).eval()
    assert model.lm_head.weight.shape == (1024, model.cfg.d_model) == model.embed.weight.shape
    x = torch.randint(0, 1000, (2, 9))
    with torch.no_grad():
        logits = model(x)
        assert logits.shape == (2, 9, 1000)
        cache = KVCache(model.cfg, 2, "cpu", torch.float32)
        assert model(x, cache=cache).shape == (2, 9, 1000)
        # the loss is the cross-entropy over exactly those 1000 columns
        expected = F.cross_entropy(logits.reshape(-1, 1000), x.roll(-1, 1).reshape(-1))
        torch.testing.assert_close(model(x, x.roll(-1, 1)), expected)
    # padding rows start at zero and, never predicted, get no gradient
    assert not model.lm_head.weight[1000:].any()
    model.train()
    model(x, x.roll(-1, 1)).backward()
    assert not model.lm_head.weight.grad[1000:].any()
    assert model.lm_head.weight.grad[:1000].abs().sum() > 0


def _head_favouring_padding(vocab: int) -> GPT:
    """A gpt2 model whose final hidden state is the unit vector e0 for every input, with head
    column 0 zero on real rows and 100 on padding rows: a full-width head would always pick padding."""
    model = tiny("gpt2", vocab_size=vocab).eval()
    with torch.no_grad():
        model.norm_f.weight.zero_()
        model.norm_f.bias.zero_()
        model.norm_f.bias[0] = 1.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[vocab:, 0] = 100.0
    return model


def test_generation_never_samples_a_padding_id():
    vocab = 100
    model = _head_favouring_padding(vocab)
    prompt = torch.randint(0, vocab, (16, 3))
    with torch.no_grad():  # the bias bites: at full width, every argmax is a padding id
        full = model.lm_head(model.norm_f(model.embed(prompt)))
        assert (full.argmax(-1) >= vocab).all()
    gen = torch.Generator().manual_seed(0)
    for kw in (dict(temperature=1.0), dict(temperature=3.0, top_k=50), dict(temperature=0)):
        for use_cache in (True, False):
            toks = torch.cat(list(model.generate(prompt, 20, generator=gen, use_cache=use_cache, **kw)), 1)
            assert toks.max() < vocab, kw
    # with uniform real logits, sampling covers the real vocabulary, not just a few ids
    toks = torch.cat(list(model.generate(prompt, 20, temperature=1.0, generator=gen)), 1)
    assert toks.unique().numel() > vocab // 2


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_aligned_vocab_state_dict_is_unchanged(arch):
    # 8192 (the default bpe) and any multiple of 128 have no padding: checkpoints keep their shapes.
    model = tiny(arch, vocab_size=256)
    assert model.embed.weight.shape == (256, model.cfg.d_model) == model.lm_head.weight.shape
    keys = {"embed.weight", "lm_head.weight", "norm_f.weight"} | ({"pos_embed.weight", "norm_f.bias"} if arch == "gpt2" else set())
    assert keys <= set(model.state_dict())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_checkpoint_from_before_padding_loads_with_the_same_logits(arch):
    # An unpadded state dict (vocab_size rows) as written before padding existed.
    model = tiny(arch, vocab_size=300).eval()
    old = {k: (v[:300].clone() if k in ("embed.weight", "lm_head.weight") else v.clone())
           for k, v in model.state_dict().items()}
    assert old["embed.weight"].shape[0] == 300
    fresh = tiny(arch, vocab_size=300, seq_len=TINY["seq_len"]).eval()
    with torch.no_grad():
        fresh.lm_head.weight.fill_(3.0)
        fresh.embed.weight.fill_(3.0)
    fresh.load_state_dict(old)
    assert not fresh.lm_head.weight[300:].any() and not fresh.embed.weight[300:].any()
    x = torch.randint(0, 300, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), atol=0, rtol=0)


# --- CPU fast paths: same math as the plain modules ----------------------------------------

def plain_loss(model, x, y):
    """The plain head + cross-entropy (the path GPUs, torch.compile and evaluation take)."""
    logits = model.lm_head(model.norm_f(model.blocks[0](model.embed(x), model.rope_cos, model.rope_sin)))
    logits = logits[..., :model.cfg.vocab_size]
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_chunked_head_loss_matches_the_plain_loss_and_gradients(dtype, monkeypatch):
    import picollm.model as model_module

    monkeypatch.setattr(model_module, "LOSS_CHUNK_ELEMENTS", 128 * 5)  # 5 rows a chunk: a ragged last chunk
    model = tiny(n_layer=1)  # vocab 61 padded to 128: padding columns must get no probability
    x, y = torch.randint(0, 61, (3, 16)), torch.randint(0, 61, (3, 16))
    results = []
    for chunked in (True, False):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss = model(x, y) if chunked else plain_loss(model, x, y)
        (loss * 0.5).backward()  # a scaled loss (gradient accumulation) scales the gradients
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (loss_c, grads_c), (loss_p, grads_p) = results
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == "fp32" else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(loss_c, loss_p, **tol)
    for gc, gp in zip(grads_c, grads_p):
        torch.testing.assert_close(gc, gp, **tol)
    assert model.lm_head.weight.grad[61:].abs().max() == 0  # padding rows learn nothing


def test_evaluation_and_per_token_losses_keep_the_plain_path():
    model = tiny()
    x = torch.randint(0, 61, (2, 16))
    per_token = model(x, x, reduction="none")
    with torch.no_grad():
        mean = model(x, x)
    assert per_token.shape == (32,) and per_token.grad_fn is not None
    torch.testing.assert_close(per_token.mean(), mean)


@pytest.mark.parametrize("shape", [(4, 8, 32), (2, 8, 3, 16)])
def test_rms_norm_matches_nn_rmsnorm_forward_and_backward(shape):
    from picollm.model import RMSNorm

    torch.manual_seed(0)
    ours, ref = RMSNorm(shape[-1], eps=1e-6), nn.RMSNorm(shape[-1], eps=1e-6)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ref.weight.copy_(ours.weight)
    # a strided input, like the QK-norm's slice of the fused qkv projection
    x = torch.randn(*shape[:-1], 2 * shape[-1])[..., :shape[-1]].requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    grad = torch.randn(shape)
    ours(x).backward(grad)
    ref(x_ref).backward(grad)
    torch.testing.assert_close(ours(x), ref(x_ref))
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad)

    # bf16 input (QK-norm under autocast): the fused kernel, within bf16 rounding of fp32
    xb = x.detach().bfloat16().requires_grad_(True)
    out = ours(xb)
    out.backward(grad.bfloat16())
    assert out.dtype == torch.bfloat16 and xb.grad.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref(x_ref.detach()), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(xb.grad.float(), x_ref.grad, atol=3e-2, rtol=3e-2)


def test_rms_norm_keeps_the_state_dict_keys():
    keys = set(tiny().state_dict())
    assert "blocks.0.norm1.weight" in keys and "blocks.0.attn.q_norm.weight" in keys and "norm_f.weight" in keys
