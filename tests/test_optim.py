"""The optimizers (AdamW; Muon with AdamW), their parameter groups and the learning-rate schedules."""

import math

import pytest
import torch
import torch.nn as nn

from picollm.model import GPT, GPTConfig
from picollm.optim import MuonWithAdamW, lr_at, make_optimizer, param_groups, set_lr


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


# --- Muon ---------------------------------------------------------------------------------------

CPU = torch.device("cpu")


def train_steps(model, opt, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(n):
        x = torch.randint(0, 61, (2, 16), generator=gen)
        opt.zero_grad(set_to_none=True)
        loss = model(x, x)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_muon_takes_the_blocks_matrices_and_adamw_the_rest(arch):
    model = tiny(arch)
    opt = make_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), device=CPU, kind="muon",
                         muon_lr_ratio=3.0)
    assert isinstance(opt, MuonWithAdamW)
    muon_group, decay, no_decay = opt.param_groups
    hidden = {id(m.weight) for b in model.blocks for m in (b.attn.qkv, b.attn.proj, b.mlp.up, b.mlp.down)}
    assert {id(p) for p in muon_group["params"]} == hidden
    assert muon_group["adjust_lr_fn"] == "match_rms_adamw" and muon_group["weight_decay"] == 0.1
    assert muon_group["lr"] == pytest.approx(3e-3) and muon_group["lr_ratio"] == 3.0
    # AdamW keeps its decay rule for what is left: the untied head decays, embeddings and norms do not.
    adamw = param_groups(model, 0.1)
    assert {id(p) for p in decay["params"]} == {id(p) for p in adamw[0]["params"]} - hidden
    assert {id(p) for p in no_decay["params"]} == {id(p) for p in adamw[1]["params"]}
    assert [decay["weight_decay"], no_decay["weight_decay"]] == [0.1, 0.0] and decay["fused"] is True
    assert (id(model.lm_head.weight) in {id(p) for p in decay["params"]}) == (arch == "llama")
    listed = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(listed) == sorted({id(p) for p in model.parameters()})  # each parameter exactly once

    set_lr(opt, 2e-3)  # the schedule's LR: AdamW groups take it, Muon its multiple
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(6e-3), 2e-3, 2e-3]

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = train_steps(model, opt, 4)
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    for n, p in model.named_parameters():
        assert not torch.equal(p, before[n]), f"{n} did not change"
    assert all(set(opt.state[p]) == {"momentum_buffer"} for p in muon_group["params"])
    assert all(set(opt.state[p]) == {"step", "exp_avg", "exp_avg_sq"} for p in no_decay["params"])


def test_muon_update_is_orthogonalized_and_scaled_like_adamw():
    """One Muon step moves a matrix by lr * 0.2 * sqrt(max dim) times an approximately
    orthogonal matrix: singular values around 1 (five Newton-Schulz steps leave the gradient's
    smallest directions short of 1 and may overshoot to ~1.2), so the update's RMS is about
    0.2 * lr, AdamW's typical RMS, whatever the matrix's shape."""
    model = tiny("llama")
    lr = 1e-2
    opt = make_optimizer(model, lr=lr, weight_decay=0.0, betas=(0.9, 0.95), device=CPU, kind="muon",
                         muon_lr_ratio=1.0)
    w = model.blocks[0].mlp.up.weight
    before = w.detach().clone()
    train_steps(model, opt, 1)
    update = (before - w.detach()) / (lr * 0.2 * math.sqrt(max(w.shape)))
    singular = torch.linalg.svdvals(update)
    assert singular.max() < 1.5 and 0.7 < singular.median() < 1.3



def test_fp32_runs_orthogonalize_in_fp32_and_bf16_runs_as_torch_does():
    """torch's Muon runs Newton-Schulz in bf16, ~5x an AdamW step on a CPU without bf16
    units; an fp32 run swaps in the same iteration in fp32 for its steps only. Checked
    against the iteration done independently in float64: the fp32 path lands within fp32
    rounding of it, torch's bf16 path only within bf16's."""
    import torch.optim._muon as torch_muon

    from picollm.optim import newton_schulz_fp32

    torchs = torch_muon._zeropower_via_newtonschulz
    g = torch.randn(48, 32, generator=torch.Generator().manual_seed(0))
    coefficients = (3.4445, -4.7750, 2.0315)

    def float64_reference(update):
        tall = update.shape[0] > update.shape[1]
        x = update.double().T if tall else update.double()
        x = x / x.norm()
        for _ in range(5):
            gram = x @ x.T
            x = 3.4445 * x + (-4.7750 * gram + 2.0315 * gram @ gram) @ x
        return (x.T if tall else x).float()
    expected = float64_reference(g)
    ours = newton_schulz_fp32(g, coefficients, 5, 1e-7)
    assert ours.dtype == torch.float32 and ours.shape == g.shape
    assert (ours - expected).abs().max() < 1e-5
    assert (torchs(g, coefficients, 5, 1e-7).float() - expected).abs().max() > 1e-3  # bf16 rounding

    lr, moved = 1e-2, {}
    for dtype in ("fp32", "bf16"):
        model = tiny("llama")
        opt = make_optimizer(model, lr=lr, weight_decay=0.0, betas=(0.9, 0.95), device=CPU, kind="muon",
                             muon_lr_ratio=1.0, dtype=dtype)
        w = model.blocks[0].mlp.up.weight
        before = w.detach().clone()
        train_steps(model, opt, 1)
        moved[dtype] = (before - w.detach()) / (lr * 0.2 * math.sqrt(max(w.shape)))
        assert torch_muon._zeropower_via_newtonschulz is torchs  # restored after the step
    # Step one with momentum 0.95 and Nesterov is (1 - 0.95**2) g + 0.95 (1 - 0.95) g: a
    # multiple of g, which the normalisation removes, so the update is NS(g) itself.
    model = tiny("llama")
    train_steps(model, torch.optim.SGD(model.parameters(), lr=0.0), 1)  # the same first gradient
    expected = float64_reference(model.blocks[0].mlp.up.weight.grad)
    assert (moved["fp32"] - expected).abs().max() < 1e-4
    assert (moved["bf16"] - expected).abs().max() > 1e-3

@pytest.mark.parametrize("ratio", [1.0, 1.5])
def test_muon_weight_decay_is_adamws_at_its_own_lr_on_zero_gradients(ratio):
    """Zero gradients leave only the decoupled decay: Muon's matrices shrink by
    (1 - ratio * lr * wd), AdamW's by (1 - lr * wd), the rest stay put."""
    model = tiny("llama")
    lr, wd = 0.1, 0.5
    opt = make_optimizer(model, lr=lr, weight_decay=wd, betas=(0.9, 0.95), device=CPU, kind="muon",
                         muon_lr_ratio=ratio)
    before = {id(p): p.detach().clone() for p in model.parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    muon_group, decay, no_decay = opt.param_groups
    for p in muon_group["params"]:
        torch.testing.assert_close(p.detach(), before[id(p)] * (1 - ratio * lr * wd))
    for p in decay["params"]:
        torch.testing.assert_close(p.detach(), before[id(p)] * (1 - lr * wd))
    assert all(torch.equal(p.detach(), before[id(p)]) for p in no_decay["params"])


def test_muon_state_round_trips_through_the_name_keyed_checkpoint_state():
    """Save after 3 steps as the trainer does (parallel.training_state), load into a fresh
    model and optimizer, take 3 more steps: bitwise what the uninterrupted one did."""
    from picollm import parallel

    model = tiny("llama")
    opt = make_optimizer(model, lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95), device=CPU, kind="muon",
                         muon_lr_ratio=2.0)
    train_steps(model, opt, 3)
    model_sd, optim_sd = (torch.utils._pytree.tree_map(lambda v: v.clone() if torch.is_tensor(v) else v, sd)
                          for sd in parallel.training_state(model, opt))
    assert any(k.endswith("qkv.weight") for k in optim_sd["state"])
    continued = train_steps(model, opt, 3, seed=1)

    fresh = tiny("llama")
    fresh_opt = make_optimizer(fresh, lr=1.0, weight_decay=0.1, betas=(0.9, 0.95), device=CPU, kind="muon")
    parallel.load_training_state(fresh, fresh_opt, model_sd, optim_sd, sharded=False)
    assert fresh_opt.param_groups[0]["lr_ratio"] == 2.0
    assert train_steps(fresh, fresh_opt, 3, seed=1) == continued
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters()))


@pytest.mark.slow
def test_muon_run_resumes_bitwise(tmp_path):
    """CPU fp32: resume a copy of a finished run from its step-3 checkpoint, and steps 4-6
    repeat the uninterrupted run's losses and weights exactly."""
    import shutil

    from picollm import checkpoint as ckpt
    from picollm.config import load_config
    from picollm.train import run
    from tests.conftest import TINY
    from tests.test_resume import checkpoint_state, losses, records

    base = TINY + ["train.batch_tokens=256", "train.dtype=fp32", "train.warmup_steps=2", "train.eval_every=1000",
                   "train.steps=6", "train.save_every=3", "train.optimizer=muon"]
    full, part = tmp_path / "full", tmp_path / "part"
    run(load_config(base + [f"run_dir={full}"]))
    final = checkpoint_state(full, 6)
    assert any("momentum_buffer" in s for s in final["optimizer"]["state"].values())  # Muon's own state
    shutil.copytree(full, part)
    for suffix in (".pt", ".json"):
        (ckpt.ckpt_dir(part) / f"step_0000006{suffix}").unlink()
    run(load_config(base + [f"run_dir={part}"]))
    assert [len(records(part)[step]) for step in range(1, 7)] == [1, 1, 1, 2, 2, 2]  # 4-6 ran again
    assert losses(part) == losses(full)
    resumed = checkpoint_state(part, 6)["model"]
    assert all(torch.equal(final["model"][k], resumed[k]) for k in final["model"])


def test_muon_with_fsdp_is_refused_in_one_sentence():
    from picollm.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"train.optimizer=muon .* train.parallel=fsdp .*; use train.parallel=ddp"):
        load_config(["train.optimizer=muon", "train.parallel=fsdp"])
    with pytest.raises(ConfigError, match="train.optimizer='sgd' is unknown; use adamw or muon"):
        load_config(["train.optimizer=sgd"])


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
