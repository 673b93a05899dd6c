"""The tiny-budget size rule of budget.minutes (plan.minutes_model), without training:
the throughput is faked, so these check the rule, not this machine."""

import pytest
import torch

from picollm.config import load_config
from picollm.hardware import DeviceInfo
from picollm.plan import (MIN_STEPS, MINUTES_MIN_BATCH_TOKENS, MINUTES_MIN_DEPTH, MINUTES_MIN_HEADS,
                          MINUTES_MIN_STEPS, make_plan, minutes_model, nearest_model)

VOCAB = 2048
CPU = DeviceInfo(torch.device("cpu"), "test cpu", "fp32", 1e11, "measured", 16 * 2**30)


def model_group(*overrides):
    return load_config([f"tokenizer.vocab_size={VOCAB}", *overrides]).model


def test_a_tiny_target_is_lifted_from_one_layer_and_one_head_to_the_floor():
    m = model_group()
    assert nearest_model(m, VOCAB, 1e5).n_layer == 1  # Chinchilla alone: the degenerate shape
    g = minutes_model(m, VOCAB, 1e5)
    assert (g.n_layer, g.d_model, g.n_head) == (MINUTES_MIN_DEPTH, 64 * MINUTES_MIN_DEPTH, MINUTES_MIN_HEADS)


@pytest.mark.parametrize("n_target", [2e6, 1e7, 1e8, 1e9])
def test_targets_above_the_floor_keep_the_chinchilla_shape(n_target):
    m = model_group()
    assert minutes_model(m, VOCAB, n_target) == nearest_model(m, VOCAB, n_target)


def test_wide_heads_lift_the_depth_until_there_are_two_heads():
    m = model_group("model.head_dim=128")  # depth 2 is 128 wide: one head of 128
    assert nearest_model(m, VOCAB, 1e5).n_head == 1
    g = minutes_model(m, VOCAB, 1e5)
    assert g.n_head >= MINUTES_MIN_HEADS and g.n_layer >= MINUTES_MIN_DEPTH
    assert model_group("model.head_dim=128").max_depth >= g.n_layer


def test_model_max_depth_caps_the_floor():
    m = model_group("model.max_depth=1")
    assert minutes_model(m, VOCAB, 1e5).n_layer == 1


@pytest.mark.parametrize("gflops", [10, 20, 60])
def test_a_two_minute_plan_on_a_slow_cpu_is_not_degenerate(gflops):
    """Fake probes at a few one-core rates: the Chinchilla size would be one layer."""
    cfg = load_config(["budget.minutes=3", f"tokenizer.vocab_size={VOCAB}"])
    p = make_plan(cfg, CPU, measure_flops=lambda *args, **kw: gflops * 1e9)
    assert p.model["n_layer"] >= MINUTES_MIN_DEPTH and p.model["n_head"] >= MINUTES_MIN_HEADS
    # The floor comes with enough optimizer steps: the batch is halved, down to the smallest measured.
    assert p.steps >= MINUTES_MIN_STEPS or p.tokens_per_step == MINUTES_MIN_BATCH_TOKENS
    assert p.tokens_per_step >= MINUTES_MIN_BATCH_TOKENS


def test_an_explicit_shape_is_never_changed():
    cfg = load_config(["budget.minutes=2", f"tokenizer.vocab_size={VOCAB}", "model.n_layer=1", "model.d_model=64"])
    p = make_plan(cfg, CPU, measure_flops=lambda *args, **kw: 2e10)
    assert (p.model["n_layer"], p.model["n_head"]) == (1, 1)


def test_other_budgets_keep_nearest_model():
    """The floor is a measured wall-clock rule; budget.compute keeps the Chinchilla size."""
    p = make_plan(load_config(["budget.compute=1e12", f"tokenizer.vocab_size={VOCAB}"]), CPU)
    assert p.model["n_layer"] == nearest_model(model_group(), VOCAB, (1e12 / 120) ** 0.5).n_layer == 1


def test_the_step_minimum_is_for_minutes_budgets_only():
    """budget.compute keeps the compute rule's batch (halved only below MIN_STEPS steps)."""
    p = make_plan(load_config(["budget.compute=2e12", f"tokenizer.vocab_size={VOCAB}"]), CPU)
    assert MIN_STEPS <= p.steps < MINUTES_MIN_STEPS


def test_budget_minutes_trains_at_the_rate_of_the_micro_batch_it_probed():
    """The batch (so the micro-batch) follows from the time left to train, not the whole
    budget: a micro-batch the shape probes did not run is probed too, and the plan's compute
    is the rate measured at the micro-batch training uses. Here small micro-steps are slow,
    as they are on a CPU, so planning from a larger one's rate would overrun the budget."""
    probed = []

    def measure(gcfg, micro, device_info):
        probed.append(micro)
        return 5e10 * min(1.0, micro / 16)  # 16 sequences or more run at full speed

    # 2.5 minutes: the first probe's micro-batch (8) leaves a batch of 4 (a budget that moves
    # with the planned overheads: 3 minutes did until evaluations got cheaper on short budgets)
    cfg = load_config(["budget.minutes=2.5", f"tokenizer.vocab_size={VOCAB}"])
    p = make_plan(cfg, CPU, measure_flops=measure)
    assert p.micro_batch < 16 and len(set(probed)) > 1  # the case this is about: the batch shrank after the probes
    assert probed[-1] == p.micro_batch
    rate = 5e10 * p.micro_batch / 16
    assert p.compute == pytest.approx(rate * p.time_budget["train_s"], rel=0.01)  # up to whole steps


@pytest.mark.parametrize("world_size", [1, 2])
def test_budget_minutes_on_a_cpu_does_not_accumulate(world_size):
    """Time is the budget: a global batch of one micro-step per process buys as many tokens
    per second as a larger one and more optimizer steps. Here the compute rule alone would
    take 16k tokens at 10 minutes; budget.compute at the same C keeps it."""
    from picollm.plan import CPU_MICRO_TOKENS

    cfg = load_config(["budget.minutes=10", f"tokenizer.vocab_size={VOCAB}"])
    p = make_plan(cfg, CPU, world_size=world_size, measure_flops=lambda *args, **kw: 4e11)
    assert p.tokens_per_step == world_size * CPU_MICRO_TOKENS and p.accum_steps == 1
    same_c = make_plan(load_config([f"budget.compute={p.compute}", f"tokenizer.vocab_size={VOCAB}",
                                    f"model.n_layer={p.model['n_layer']}", f"model.d_model={p.model['d_model']}"]),
                       CPU, world_size=world_size)
    assert same_c.tokens_per_step > p.tokens_per_step and same_c.accum_steps > 1
