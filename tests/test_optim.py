"""AdamW parameter groups and the warmup + cosine learning-rate schedule."""

import math

import pytest
import torch
import torch.nn as nn

from picollm.model import GPT, GPTConfig
from picollm.optim import lr_at, make_optimizer, param_groups


def tiny(arch):
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=2, d_model=32, seq_len=16, vocab_size=61, arch=arch))


# --- parameter groups -------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_param_groups_decay_only_matmul_weights(arch):
    model = tiny(arch)
    groups = param_groups(model, weight_decay=0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    decay, no_decay = ({id(p) for p in g["params"]} for g in groups)

    # every parameter exactly once across the groups
    listed = [id(p) for g in groups for p in g["params"]]
    assert len(listed) == len(set(listed))
    assert set(listed) == {id(p) for p in model.parameters()}

    # expected membership, derived from the module types
    linear_w = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    embeds = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    norms = {id(p) for m in model.modules() if isinstance(m, (nn.LayerNorm, nn.RMSNorm)) for p in m.parameters()}
    biases = {id(m.bias) for m in model.modules() if isinstance(m, nn.Linear) and m.bias is not None}
    assert decay == linear_w - embeds
    assert no_decay == embeds | norms | biases
    assert norms and embeds
    assert id(model.blocks[0].attn.qkv.weight) in decay
    assert id(model.blocks[1].mlp.down.weight) in decay
    assert id(model.embed.weight) in no_decay

    if arch == "gpt2":
        # the tied embedding/head is one tensor, listed once, not decayed
        assert model.lm_head.weight is model.embed.weight
        assert listed.count(id(model.embed.weight)) == 1
        assert id(model.pos_embed.weight) in no_decay
        assert biases and len(no_decay) == 2 + len(norms) + len(biases)
    else:
        assert id(model.lm_head.weight) in decay
        assert not biases
        assert len(decay) == 4 * 2 + 1  # qkv, proj, up, down per layer + head
    cfg = model.cfg
    head_padding = (cfg.padded_vocab - cfg.vocab_size) * cfg.d_model  # llama's untied head holds the padding rows
    assert sum(p.numel() for p in groups[0]["params"]) == model.num_params() + (
        -cfg.vocab_size * cfg.d_model if arch == "gpt2" else head_padding)


def test_param_groups_skip_frozen_parameters():
    model = tiny("llama")
    model.embed.weight.requires_grad_(False)
    listed = {id(p) for g in param_groups(model, 0.1) for p in g["params"]}
    assert id(model.embed.weight) not in listed
    assert len(listed) == sum(1 for p in model.parameters()) - 1


# --- make_optimizer ---------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_make_optimizer_steps_on_cpu(arch):
    model = tiny(arch)
    opt = make_optimizer(model, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), device=torch.device("cpu"))
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["fused"] is True
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["lr"] == 1e-2
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randint(0, 61, (2, 16))
    loss0 = model(x, x).item()
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        model(x, x).backward()
        opt.step()
    for n, p in model.named_parameters():
        assert torch.isfinite(p).all(), n
        assert not torch.equal(p, before[n]), f"{n} did not change"
    assert model(x, x).item() < loss0


def test_weight_decay_applies_only_to_the_decay_group():
    """With zero gradients AdamW's update is zero, leaving only decoupled decay:
    decayed weights shrink by (1 - lr*wd), everything else stays put."""
    model = tiny("gpt2")
    lr, wd = 0.1, 0.5
    opt = make_optimizer(model, lr=lr, weight_decay=wd, betas=(0.9, 0.95), device=torch.device("cpu"))
    before = {id(p): p.detach().clone() for p in model.parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    decay, no_decay = opt.param_groups
    for p in decay["params"]:
        torch.testing.assert_close(p.detach(), before[id(p)] * (1 - lr * wd))
    for p in no_decay["params"]:
        assert torch.equal(p.detach(), before[id(p)])


# --- learning-rate schedule -------------------------------------------------------------------

@pytest.mark.parametrize("warmup,total,min_ratio", [(10, 100, 0.1), (1, 20, 0.0), (100, 1001, 0.05), (7, 9, 0.2)])
def test_lr_schedule_shape(warmup, total, min_ratio):
    peak = 3e-3
    lrs = [lr_at(s, peak, warmup, total, min_ratio) for s in range(total)]
    assert lrs[0] == pytest.approx(peak / warmup)
    assert lrs[warmup - 1] == pytest.approx(peak)
    assert lrs[warmup] == pytest.approx(peak)
    assert lrs[-1] == pytest.approx(min_ratio * peak)
    # linear warmup: equal increments
    for s in range(warmup):
        assert lrs[s] == pytest.approx(peak * (s + 1) / warmup)
    # monotone non-increasing after warmup, strictly while decaying
    after = lrs[warmup:]
    assert all(b < a for a, b in zip(after, after[1:]))
    assert max(lrs) == pytest.approx(peak)
    assert min(after) == pytest.approx(min_ratio * peak)


@pytest.mark.parametrize("min_ratio", [0.0, 0.1, 0.5])
def test_lr_cosine_midpoint(min_ratio):
    peak, warmup, total = 1.0, 10, 111  # 100 decay steps: midpoint at step 60
    assert lr_at(60, peak, warmup, total, min_ratio) == pytest.approx((1 + min_ratio) / 2 * peak)
    # cosine, not linear: a quarter of the way it is above the linear interpolation
    q = lr_at(35, peak, warmup, total, min_ratio)
    assert q == pytest.approx(peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi / 4))))
    assert q > peak * (1 - 0.25 * (1 - min_ratio))


def test_lr_without_warmup_starts_at_peak():
    peak = 2e-3
    assert lr_at(0, peak, 0, 50, 0.1) == pytest.approx(peak)
    assert lr_at(49, peak, 0, 50, 0.1) == pytest.approx(0.1 * peak)
    assert lr_at(49, peak, 0, 99, 0.1) == pytest.approx((1 + 0.1) / 2 * peak)  # midpoint
    assert lr_at(1, peak, 0, 50, 0.1) < peak


def test_lr_past_the_end_stays_at_the_floor():
    peak = 1e-3
    for step in (100, 101, 500):
        assert lr_at(step, peak, 10, 101, 0.1) == pytest.approx(0.1 * peak)
    assert 0.1 * peak <= lr_at(0, peak, 0, 1, 0.1) <= peak  # one-step run: no division by zero


@pytest.mark.parametrize("shape", ["linear", "sqrt"])
def test_wsd_schedule_holds_the_peak_then_decays_in_its_last_fraction(shape):
    peak, warmup, total, frac, floor = 1e-3, 10, 100, 0.2, 0.1
    lrs = [lr_at(s, peak, warmup, total, floor, "wsd", frac, shape) for s in range(total)]
    assert lrs[warmup - 1] == pytest.approx(peak)
    start = total - 1 - round(frac * total)  # step 79: the last step at the peak
    assert all(lr == pytest.approx(peak) for lr in lrs[warmup:start + 1])
    assert lrs[-1] == pytest.approx(floor * peak)
    assert all(a > b for a, b in zip(lrs[start:], lrs[start + 1:]))  # strictly down to the end
    middle = (start + total - 1) // 2
    progress = (middle - start) / (total - 1 - start)
    left = 1 - progress if shape == "linear" else 1 - math.sqrt(progress)
    assert lrs[middle] == pytest.approx(peak * (floor + (1 - floor) * left))
    # The constant phase does not depend on the run's length: a longer run branches off later.
    longer = [lr_at(s, peak, warmup, 200, floor, "wsd", frac, shape) for s in range(start + 1)]
    assert longer == lrs[:start + 1]


def test_wsd_run_trains_and_shows_its_schedule_on_the_plan(tmp_path):
    from picollm.config import load_config
    from picollm.train import run
    from tests.conftest import TINY

    run_dir = tmp_path / "wsd"
    run(load_config(TINY + ["train.steps=10", "train.batch_tokens=128", "train.warmup_steps=2", "train.schedule=wsd",
                            "train.decay_frac=0.3", f"run_dir={run_dir}"]))
    import json as _json

    plan = _json.loads((run_dir / "plan.json").read_text())
    lrs = [r["lr"] for r in map(_json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
           if r["kind"] == "train"]
    assert "wsd" in plan["schedule"] and lrs[2] == lrs[5] == pytest.approx(plan["lr"])
    assert lrs[-1] == pytest.approx(plan["min_lr"])
