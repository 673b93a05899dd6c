"""The budget planner against independent arithmetic, and its clear refusals."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from picollm.config import ConfigError, load_config
from picollm.hardware import DeviceInfo
from picollm.plan import estimate_memory, make_plan, model_config
from picollm.units import si

REPO = Path(__file__).resolve().parents[1]
CPU = DeviceInfo(torch.device("cpu"), "test cpu", "fp32", 1e11, "measured", 16 * 2**30)


def plan(*overrides, device=CPU, world_size=1, measure=None):
    return make_plan(load_config(list(overrides)), device, world_size=world_size, measure_flops=measure)


def test_compute_budget_picks_the_chinchilla_size():
    C = 1e15
    p = plan(f"budget.compute={C}", "tokenizer.vocab_size=2048")
    n_opt = math.sqrt(C / (6 * 20))  # C = 6 N (20 N)
    # The chosen depth is the nearest in log space among all depths.
    cfg = load_config(["tokenizer.vocab_size=2048"]).model
    sizes = [model_config(cfg, 2048, d).num_params() for d in range(1, 30)]
    best = min(sizes, key=lambda n: abs(math.log(n / n_opt)))
    assert p.n_params == best
    # D = C / flops_per_token, up to rounding to whole steps.
    assert p.n_tokens == pytest.approx(C / p.flops_per_token, rel=0.5 * p.tokens_per_step / p.n_tokens + 1e-9)
    assert p.compute == p.flops_per_token * p.n_tokens
    assert p.tokens_per_step * p.steps == p.n_tokens


def test_params_budget_gives_twenty_tokens_per_param():
    p = plan("budget.params=5e6", "tokenizer.vocab_size=4096")
    assert p.n_tokens == pytest.approx(20 * p.n_params, rel=p.tokens_per_step / p.n_tokens)
    p = plan("budget.params=5e6", "budget.tokens_per_param=100", "tokenizer.vocab_size=4096")
    assert p.tokens_per_param == pytest.approx(100, rel=0.02)


def test_tokens_budget_is_exact_in_whole_steps():
    p = plan("model=tiny", "budget.tokens=65536", "train.batch_tokens=4096")
    assert p.n_tokens == 65536 and p.steps == 16


def test_a_short_run_samples_from_a_pool_larger_than_its_tokens():
    """The loader's stream (stream_tokens) is max(D + seq_len + 1, data.pool_tokens): a run of
    D tokens draws its sequences at random from the pool, and data.pool_tokens=0 reads exactly
    its first D tokens; a run longer than the pool reads its own D."""
    short = plan("model=tiny", "budget.tokens=65536", "train.batch_tokens=4096")
    assert short.stream_tokens == 1 << 24 > short.n_tokens
    exact = plan("model=tiny", "budget.tokens=65536", "train.batch_tokens=4096", "data.pool_tokens=0")
    assert exact.stream_tokens == 65536 + short.model["seq_len"] + 1
    long = plan("model=tiny", "budget.tokens=65536", "train.batch_tokens=4096", "data.pool_tokens=1000")
    assert long.stream_tokens == exact.stream_tokens


def test_a_run_saved_before_the_pool_existed_resumes_as_pool_zero():
    """A config saved before data.pool_tokens existed read exactly its first D tokens: it
    matches data.pool_tokens=0, and the new default is a change the resume refuses."""
    from omegaconf import OmegaConf

    from picollm.plan import config_changes

    now = OmegaConf.to_container(load_config(["model=tiny"]), resolve=True)
    old = json.loads(json.dumps(now))
    del old["data"]["pool_tokens"]
    exact = OmegaConf.to_container(load_config(["model=tiny", "data.pool_tokens=0"]), resolve=True)
    assert config_changes(old, exact) == []
    assert config_changes(old, now) == ["data.pool_tokens"]


def test_explicit_model_defaults_to_twenty_tokens_per_param():
    p = plan("model=reference")
    assert p.n_params == 13_762_560  # 6 * (4*384^2 + 3*384*1024) + 384*8192
    assert p.n_tokens == pytest.approx(20 * p.n_params, rel=p.tokens_per_step / p.n_tokens)


def test_minutes_budget_converts_measured_throughput_into_compute():
    calls = []

    def measure(gcfg, micro, device):
        calls.append(gcfg.num_params())
        return 2e10  # FLOP/s

    p = plan("budget.minutes=10", "tokenizer.vocab_size=2048", measure=measure)
    assert calls, "the probe was not run"
    C = 2e10 * 600
    train_s = p.time_budget["train_s"]  # 600 s less the planned evaluations and end of run
    assert 0.8 * 600 < train_s < 600
    assert p.compute == pytest.approx(2e10 * train_s, rel=p.tokens_per_step / p.n_tokens + 1e-6)
    assert p.est_seconds == pytest.approx(train_s, rel=0.05)
    assert p.est_source == "measured throughput"


def test_minutes_budget_counts_every_gpu_but_cpu_processes_share_the_cores():
    """The probe measures one process: 8 GPUs deliver 8 times its rate, while 2 CPU
    processes share one machine's cores and deliver its rate once."""
    measure = lambda gcfg, micro, device: 2e10
    gpu = DeviceInfo(torch.device("cuda", 0), "test gpu", "bf16", 1e15, "published", 80 * 2**30)
    one_gpu = plan("budget.minutes=10", "tokenizer.vocab_size=2048", device=gpu, measure=measure)
    eight = plan("budget.minutes=10", "tokenizer.vocab_size=2048", device=gpu, world_size=8, measure=measure)
    train_s = one_gpu.time_budget["train_s"]
    assert eight.compute == pytest.approx(8 * 2e10 * eight.time_budget["train_s"], rel=0.02)
    assert one_gpu.compute == pytest.approx(2e10 * train_s, rel=0.02)
    assert eight.est_seconds == pytest.approx(eight.time_budget["train_s"], rel=0.05)  # same wall clock, 8x the work
    two_cpu = plan("budget.minutes=10", "tokenizer.vocab_size=2048", world_size=2, measure=measure)
    assert two_cpu.compute == pytest.approx(2e10 * two_cpu.time_budget["train_s"], rel=0.02)
    assert two_cpu.est_seconds == pytest.approx(two_cpu.time_budget["train_s"], rel=0.05)


def test_mfu_yardstick_is_the_current_device_counted_once_per_device():
    from picollm.hardware import combined_peak

    gpu = DeviceInfo(torch.device("cuda", 0), "test gpu", "bf16", 1e15, "published", 80 * 2**30)
    assert combined_peak(gpu, 8) == 8e15
    assert combined_peak(CPU, 2) == CPU.peak_flops  # processes share the cores
    assert combined_peak(DeviceInfo(torch.device("cpu"), "x", "fp32", None, "unknown", 1), 1) is None


def test_cpu_yardstick_of_a_half_dtype_is_never_below_fp32s_peak():
    """A forced bf16 run on a CPU without bf16 units once reported MFU near 400%: its thin
    products beat its own (slow) square ones. fp32 is always there to widen bf16 into."""
    from picollm.hardware import cpu_peak, square_matmul_flops

    measured = []

    def fake(rates):
        def measure(dtype):
            measured.append(dtype)
            return rates[dtype]
        return measure
    assert cpu_peak("bf16", fake({"fp32": 9e10, "bf16": 1e9})) == 9e10  # no bf16 units: fp32's peak
    assert cpu_peak("bf16", fake({"fp32": 9e10, "bf16": 3e11})) == 3e11  # bf16 units: its own
    measured.clear()
    assert cpu_peak("fp32", fake({"fp32": 9e10, "bf16": 3e11})) == 9e10 and measured == ["fp32"]
    # The real measurement stops after the first size once the next cannot fit its budget.
    assert cpu_peak("fp32", lambda dtype: square_matmul_flops(dtype, budget_s=0.0)) > 0


def test_derived_hyperparameters_follow_the_documented_rules():
    p = plan("budget.compute=1e18", "tokenizer.vocab_size=32768", "model.seq_len=1024")
    assert p.lr == pytest.approx(0.3118 * p.compute ** -0.125)  # far above the cap's reach (~9e11)
    assert plan("budget.compute=1e10", "tokenizer.vocab_size=2048").lr == 1e-2  # the fit would give 1.7e-2
    raw = 0.292 * (p.flops_per_token * 1e18 / p.flops_per_token) ** 0.3271 / 1024
    assert p.batch_seqs == 2 ** round(math.log2(raw))
    assert p.warmup_steps == round(0.03 * p.steps)
    assert p.min_lr == pytest.approx(0.1 * p.lr)
    p = plan("budget.compute=1e18", "tokenizer.vocab_size=32768", "train.lr=1e-3", "train.warmup_steps=7")
    assert p.lr == 1e-3 and p.warmup_steps == 7


def test_plan_json_has_the_documented_keys():
    keys = {"n_params", "n_params_total", "n_tokens", "tokens_per_param", "flops_per_token", "compute", "steps",
            "tokens_per_step", "warmup_steps", "lr", "est_seconds"}
    assert keys <= set(plan("model=tiny").to_dict())


def test_memory_estimate_counts_adam_state_and_shrinks_with_checkpointing():
    g = model_config(load_config(["model=reference"]).model, 8192)
    full = estimate_memory(g, 16, "bf16", False)
    ckpt = estimate_memory(g, 16, "bf16", True)
    total = g.num_params(total=True)
    assert full["weights"] == 4 * total and full["optimizer"] == 8 * total
    assert ckpt["activations"] < full["activations"]


def test_fsdp_memory_estimate_divides_the_states_by_the_shards():
    g = model_config(load_config(["model=reference"]).model, 8192)
    total = g.num_params(total=True)
    one, eight = estimate_memory(g, 16, "bf16", False), estimate_memory(g, 16, "bf16", False, shards=8)
    assert eight["optimizer"] == 8 * total // 8 and eight["gradients"] == 4 * total // 8
    block = 4 * g.d_model ** 2 + 3 * g.d_model * g.hidden  # attention + SwiGLU matmuls of one block
    root = total - g.n_layer * block  # embedding, head and the norms
    assert eight["weights"] == 4 * total // 8 + (2 * block + root) * 2 * 2  # + gathered bf16 weights and grads
    assert eight["activations"] == one["activations"]  # sharding the states leaves activations alone
    p1 = plan("model=reference", "train.batch_tokens=16384", "train.parallel=fsdp")
    assert p1.memory["weights"] == 4 * total  # one process: nothing to shard
    p2 = plan("model=reference", "train.batch_tokens=16384", "train.parallel=fsdp", world_size=2)
    assert p2.memory["optimizer"] == 8 * total // 2


def test_micro_batch_shrinks_to_fit_and_refuses_when_nothing_fits():
    small = DeviceInfo(torch.device("cpu"), "small", "fp32", 1e11, "measured", 600 * 2**20)
    p = plan("model=reference", "train.batch_tokens=16384", device=small)
    assert p.micro_batch < 16 and p.memory["total"] <= 0.85 * small.memory_bytes
    tiny_mem = DeviceInfo(torch.device("cpu"), "tiny", "fp32", 1e11, "measured", 64 * 2**20)
    with pytest.raises(ConfigError, match="even at micro-batch 1"):
        plan("model=reference", device=tiny_mem)
    with pytest.raises(ConfigError, match="train.micro_batch=16 needs"):
        plan("model=reference", "train.micro_batch=16", "train.batch_tokens=16384", device=small)


@pytest.mark.parametrize("overrides, message", [
    (["model=tiny", "model.n_head=3"], "not divisible by model.n_head"),
    (["model=tiny", "train.batch_tokens=100"], "not a multiple of model.seq_len"),
    (["model=tiny", "train.batch_tokens=4096", "train.micro_batch=3"], "does not divide"),
    (["model=tiny", "budget.tokens=10"], "less than one step"),
    (["model=tiny", "budget.tokens=1000", "train.batch_tokens=4096"], "less than one step"),
    (["budget.compute=1e15", "budget.tokens=1e6"], "set only one"),
    (["budget.params=1e6", "model=tiny"], "model is set explicitly"),
    (["budget.compute=-5"], "must be positive"),
    (["tokenizer.vocab_size=5000000000"], "below 2\\*\\*32"),
    (["tokenizer.name=nope", "model=tiny"], "tokenizer.name='nope' is unknown"),
    (["model=tiny", "model.arch=mamba"], "model.arch='mamba' is unknown"),
    ([], "no budget"),
    (["model=tiny", "train.steps=10", "train.warmup_steps=10"], "does not fit"),
])
def test_configs_that_cannot_work_fail_with_one_clear_sentence(overrides, message):
    with pytest.raises(ConfigError, match=message):
        plan(*overrides)


def test_batch_not_divisible_by_world_size():
    with pytest.raises(ConfigError, match="not divisible by the world size 3"):
        plan("model=tiny", "train.batch_tokens=256", world_size=3)


def test_plan_cli_prints_only_json(tmp_path):
    out = subprocess.run([sys.executable, "-m", "picollm.plan", "model=tiny", "plan.format=json"],
                         cwd=REPO, capture_output=True, text=True, check=True)
    data = json.loads(out.stdout)
    assert data["n_params"] == 2 * (4 * 64 * 64 + 3 * 64 * 192) + 64 * 8192


def test_plan_cli_error_is_one_line_and_exit_code_nonzero():
    out = subprocess.run([sys.executable, "-m", "picollm.plan", "model=tiny", "model.n_head=3"],
                         cwd=REPO, capture_output=True, text=True)
    assert out.returncode != 0
    assert out.stderr.strip().startswith("error: ") and len(out.stderr.strip().splitlines()) == 1


def test_prepare_cli_plans_a_minutes_budget_without_a_run_dir(capsys):
    """The data stage plans like the plan stage: budget.minutes runs the probe there too."""
    from picollm.data.prepare import main as prepare_main
    from tests.conftest import TINY
    prepare_main(TINY + ["budget.minutes=2"])
    out = capsys.readouterr().out
    assert ("prepared " in out or "reused " in out) and "vocabulary 300" in out


# ---------------------------------------------------------------- dtype by measurement, the minutes budget kept

def pending_cpu(monkeypatch, guess="bf16"):
    """CPU with train.dtype=auto as the planner sees it: the dtype is to be measured; the
    matmul peak of each dtype is a fixed fake (its real measurement takes seconds)."""
    from picollm import hardware
    monkeypatch.setattr(hardware, "measure_matmul_peak", lambda dtype: {"fp32": 1e11, "bf16": 3e11}[dtype])
    return DeviceInfo(torch.device("cpu"), "test cpu", guess, None, "pending", 16 * 2**30, "flags guess", True)


def timings(fp32, bf16, cost=2.0):
    calls = []

    def measure_dtypes(gcfg, micro, device):
        calls.append((gcfg.n_layer, gcfg.d_model, micro))
        return {"step_seconds": {"fp32": fp32, "bf16": bf16}, "seconds": cost}
    return measure_dtypes, calls


def test_dtype_probe_stops_at_the_warm_up_when_it_already_decides():
    """Real steps of a tiny model in both dtypes. A warm-up gap past the thresholds ends the
    probe there (bf16 on a CPU without bf16 units: ~10x, seconds a step); otherwise rounds
    are timed as before."""
    from picollm.model import GPTConfig
    from picollm.throughput import time_dtypes

    gcfg, cpu = GPTConfig(n_layer=2, n_head=2, d_model=32, seq_len=16, vocab_size=61), CPU
    decided = time_dtypes(gcfg, 2, cpu, decisive=1.0, decisive_s=0.0)  # any gap decides
    assert decided["rounds"] == 0 and set(decided["step_seconds"]) == {"fp32", "bf16"}
    timed = time_dtypes(gcfg, 2, cpu, decisive=float("inf"))
    assert timed["rounds"] >= 1 and all(0 < s < float("inf") for s in timed["step_seconds"].values())


@pytest.mark.parametrize("fp32, bf16, winner", [(1.8, 1.0, "bf16"), (1.0, 3.0, "fp32")])
def test_auto_dtype_on_cpu_is_the_measured_faster_one(monkeypatch, fp32, bf16, winner):
    measure_dtypes, calls = timings(fp32, bf16)
    p = make_plan(load_config(["model=tiny", "budget.tokens=1e6"]), pending_cpu(monkeypatch, guess="bf16"),
                  measure_dtypes=measure_dtypes)
    assert p.dtype == winner
    assert calls == [(p.model["n_layer"], p.model["d_model"], p.micro_batch)]  # on the run's shape and micro-batch
    assert p.peak_flops == {"fp32": 1e11, "bf16": 3e11}[winner]  # MFU against the chosen dtype's peak
    ratio = max(fp32, bf16) / min(fp32, bf16)
    line = next(l for l in p.card().splitlines() if l.startswith("dtype"))
    assert f"{winner} step {ratio:.2f}x as fast as" in line and "measured" in line and "2.0 s probe" in line


def test_explicit_dtype_is_not_probed(monkeypatch):
    from picollm import hardware
    monkeypatch.setattr(hardware, "measure_matmul_peak", lambda dtype: 1e11)

    def never(*args):
        raise AssertionError("an explicit train.dtype must not be probed")
    for dtype in ("fp32", "bf16"):
        device = hardware.describe("cpu", dtype, decide_dtype_later=True)
        assert not device.dtype_pending
        p = make_plan(load_config(["model=tiny", "budget.tokens=1e6", f"train.dtype={dtype}"]), device,
                      measure_dtypes=never)
        assert p.dtype == dtype and p.dtype_reason == f"train.dtype={dtype}"


def test_minutes_probe_runs_in_the_chosen_dtype_at_the_planned_micro_batch(monkeypatch):
    measure_dtypes, _ = timings(fp32=1.0, bf16=2.0)  # fp32 wins, although the flags guessed bf16
    probed = []

    def measure(gcfg, micro, device):
        probed.append((device.dtype, micro, gcfg.n_layer, gcfg.d_model))
        return 2e10
    p = make_plan(load_config(["budget.minutes=10", "tokenizer.vocab_size=2048"]), pending_cpu(monkeypatch),
                  measure_flops=measure, measure_dtypes=measure_dtypes)
    assert p.dtype == "fp32" and {d for d, *_ in probed} == {"fp32"}
    assert (p.micro_batch, p.model["n_layer"], p.model["d_model"]) in [(m, l, d) for _, m, l, d in probed]


def test_throughput_probe_takes_at_most_5_percent_of_a_short_budget():
    from picollm.plan import probe_seconds

    def seconds(*overrides):
        return probe_seconds(load_config(["model=tiny", *overrides]).budget)
    assert seconds("budget.minutes=10") == 10.0  # budget.probe_seconds, the default
    assert seconds("budget.minutes=1") == pytest.approx(3.0)  # 5% of 60 s
    assert seconds("budget.minutes=0.2") == 2.0  # never under 2 s
    assert seconds("budget.minutes=1", "budget.probe_seconds=1") == 1.0  # an explicit shorter probe stands
    assert seconds("budget.tokens=1e6") == 10.0


def test_minutes_budget_takes_out_start_up_probes_evals_and_the_report(monkeypatch):
    """Injected timings: start-up 7 s, every clock reading 3 s after the last, so each
    probe costs 3 s; the rest of the budget, less planned evaluations and the end of
    the run, is the training time the compute is sized for."""
    from itertools import count
    measure_dtypes, _ = timings(fp32=2.0, bf16=1.0)
    ticks = count(0.0, 3.0)
    p = make_plan(load_config(["budget.minutes=5", "tokenizer.vocab_size=2048", "train.eval_tokens=65536"]),
                  pending_cpu(monkeypatch), measure_flops=lambda g, m, d: 2e10, measure_dtypes=measure_dtypes,
                  startup_seconds=7.0, clock=lambda: next(ticks))
    tb = p.time_budget
    assert tb["budget_s"] == 300 and tb["startup_s"] == 7.0
    assert tb["dtype_probe_s"] == 3.0 and tb["throughput_probe_s"] > 0 and tb["throughput_probe_s"] % 3 == 0
    fpt = p.flops_per_token
    one_eval = 65536 * fpt / 3 / 2e10  # a forward pass over eval_tokens
    assert 2 <= tb["evals"] <= 12 and tb["evals_s"] >= tb["evals"] * one_eval
    assert tb["evals"] == 12 or (tb["evals"] + 1) * one_eval > 0.05 * 300  # fewer only when 5% of the budget pays no more
    evals_run = 2 + len(range(p.eval_every, p.steps, p.eval_every))  # step 0, the interval, the final one
    assert evals_run <= tb["evals"]
    spent = tb["startup_s"] + tb["dtype_probe_s"] + tb["throughput_probe_s"] + tb["evals_s"] + tb["finish_s"]
    assert tb["train_s"] == pytest.approx(300 - spent)
    assert p.compute == pytest.approx(2e10 * tb["train_s"], rel=p.tokens_per_step / p.n_tokens + 1e-6)
    assert "wall clock   5.0 min = start-up 7 s" in p.card() and "+ training" in p.card()


def test_minutes_budget_evaluates_fewer_tokens_when_two_evaluations_overrun_their_share():
    """Two full evaluations (the first and the last) once took 19 s of a 1-minute run: a
    budget.minutes run evaluates fewer tokens each until they fit 5% of it, down to a floor."""
    from picollm.plan import EVAL_MIN_TOKENS, EVAL_SHARE

    def budget(minutes, rate):
        return make_plan(load_config([f"budget.minutes={minutes}", "tokenizer.vocab_size=2048"]), CPU,
                         measure_flops=lambda g, m, d: rate, startup_seconds=3.0)
    p = budget(2, 2e10)
    tb, fpt = p.time_budget, p.flops_per_token
    assert tb["evals"] == 2 and EVAL_MIN_TOKENS < tb["eval_tokens"] < 262_144
    assert 2 * tb["eval_tokens"] * fpt / 3 / 2e10 == pytest.approx(EVAL_SHARE * 120, rel=1e-3)
    assert f"2 evals of {si(tb['eval_tokens'])} tokens/checkpoints" in p.card()
    assert budget(0.5, 1e10).time_budget["eval_tokens"] == EVAL_MIN_TOKENS  # the floor
    assert budget(60, 2e10).time_budget["eval_tokens"] == 262_144  # train.eval_tokens when they fit


def test_minutes_budget_too_small_for_its_overheads_is_refused(monkeypatch):
    with pytest.raises(ConfigError, match="leaves no time to train"):
        make_plan(load_config(["budget.minutes=0.2", "model=tiny"]), CPU, measure_flops=lambda g, m, d: 2e10,
                  startup_seconds=11.0)


def test_a_rerun_keeps_the_recorded_dtype_without_probing(monkeypatch, tmp_path):
    from picollm import dist, plan as planmod
    cfg = load_config(["model=tiny", "budget.tokens=1e6", f"run_dir={tmp_path}"])
    measure_dtypes, calls = timings(fp32=1.0, bf16=2.0)
    monkeypatch.setattr(planmod, "dtype_probe", measure_dtypes)
    first = planmod.plan_for_run(cfg, pending_cpu(monkeypatch), dist.DistInfo(), tmp_path, None)
    planmod.save_plan(tmp_path, cfg, first)
    assert first.dtype == "fp32" and len(calls) == 1
    monkeypatch.setattr(planmod, "dtype_probe", timings(fp32=2.0, bf16=1.0)[0])  # the machine changed its mind
    again = planmod.plan_for_run(cfg, pending_cpu(monkeypatch), dist.DistInfo(), tmp_path, None)
    assert again.dtype == "fp32" and again.dtype_reason == first.dtype_reason and len(calls) == 1


def test_the_plan_is_made_once_and_never_changed():
    """The draft is frozen; final_plan makes a new plan from it, the data and the world size."""
    import dataclasses

    from picollm.plan import DataFacts, final_plan
    draft = plan("model=tiny", "budget.tokens=1e6", "train.batch_tokens=2048", "data.pool_tokens=0", world_size=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        draft.steps = 1
    facts = DataFacts("/data/x", "key", train_tokens=draft.stream_tokens // 8, corpus_exhausted=True)
    with pytest.warns(UserWarning, match="repeats its data"):
        done = final_plan(draft, facts, world_size=1, steps=draft.steps * 2)
    assert (draft.epochs, draft.data_dir, draft.world_size, draft.warnings) == (None, None, 2, [])
    assert done.steps == 2 * draft.steps and done.n_tokens == 2 * draft.n_tokens  # a resumed run, extended
    assert done.compute == done.n_tokens * done.flops_per_token
    assert done.world_size == 1 and done.accum_steps == 2 * draft.accum_steps  # same global batch
    assert done.data_dir == "/data/x" and done.data_key == "key" and done.data_tokens == draft.stream_tokens // 8
    assert done.epochs == pytest.approx(done.n_tokens / done.data_tokens) and len(done.warnings) == 1


@pytest.mark.parametrize("seq, micro", [(128, 32), (256, 16), (1024, 4)])
def test_cpu_micro_batch_is_capped_by_tokens_per_micro_step(seq, micro):
    from picollm.plan import CPU_MICRO_TOKENS
    p = plan("model=tiny", f"model.seq_len={seq}", f"train.batch_tokens={64 * seq}")
    assert p.micro_batch == micro == CPU_MICRO_TOKENS // seq and p.accum_steps == 64 // micro


@pytest.mark.parametrize("seqs, micro", [(11, 11), (24, 24), (96, 48), (100, 50)])
def test_cpu_micro_batch_is_the_largest_divisor_under_the_cap(seqs, micro):
    """A CPU run takes any divisor of its batch (11 sequences: one micro-step of 11, not eleven
    of 1); the cap of CPU_MICRO_TOKENS (64 sequences of 64) still holds."""
    p = plan("model=tiny", "model.seq_len=64", f"train.batch_tokens={64 * seqs}")
    assert p.micro_batch == micro and p.accum_steps == seqs // micro


def test_muon_is_named_on_the_card_and_timed_by_the_probe(monkeypatch):
    """Muon's update costs more per step than AdamW's, so a budget.minutes probe must time it."""
    import picollm.throughput
    from picollm.plan import throughput_probe

    seen = {}
    monkeypatch.setattr(picollm.throughput, "measure_train_flops",
                        lambda gcfg, micro, device, seconds, optimizer: seen.setdefault("optimizer", optimizer) and 1e10)
    cfg = load_config(["budget.compute=1e13", "tokenizer.vocab_size=2048", "train.optimizer=muon"])
    throughput_probe(cfg)(model_config(cfg.model, 2048, 2), 4, CPU)
    assert seen == {"optimizer": "muon"}
    card = make_plan(cfg, CPU).card()
    assert "optimizer    muon (lr x3) for the blocks' matrices, adamw for the rest" in card
    assert "optimizer    adamw" in plan("budget.compute=1e13", "tokenizer.vocab_size=2048").card()


def test_minutes_budget_reserves_no_time_for_a_skipped_first_evaluation():
    """train.eval_at_start=false: the same evaluations are planned, less the one at step 0,
    so the time kept for evaluating shrinks by one evaluation (a forward pass over eval_tokens)."""
    from picollm.model import GPTConfig
    from picollm.plan import _time_budget

    gcfg, rate = GPTConfig(n_layer=2, d_model=64, n_head=2, seq_len=64, vocab_size=512), 1e10
    probes = {"dtype": 1.0, "throughput": 3.0}
    parts = {flag: _time_budget(300.0, 5.0, probes, gcfg, rate,
                                load_config(["train.eval_tokens=65536", f"train.eval_at_start={flag}"]).train)
             for flag in ("true", "false")}
    assert parts["true"]["evals"] == parts["false"]["evals"] >= 2
    one_eval = 65536 * gcfg.flops_per_token() / 3 / rate
    assert parts["true"]["evals_s"] - parts["false"]["evals_s"] == pytest.approx(one_eval)
