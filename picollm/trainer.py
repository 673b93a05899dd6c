"""The training loop of one run, meant to be read top to bottom.

``Trainer.__init__`` builds what the plan describes: model, optimizer, loss scaler, data
loader. ``Trainer.train`` is the loop: each step trains (``train_step``), is recorded and
checked, and then the ``Cadence`` says whether to evaluate and save now. The last step is
no exception, so the final evaluation and checkpoint happen inside the loop; ``finish``
then exports the weights, final.json and the report. Around the loop: checkpoint state
(``state``, ``restore``, ``save``; the checkpoint module picks the layout), bad steps
(skipped; too many in a row roll back or stop), and the signals that stop a run cleanly.
The signals and the loss-spike detector live here because the loop is their only user.
"""

from __future__ import annotations

import contextlib
import collections
import json
import math
import signal
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig, OmegaConf

from picollm import checkpoint as ckpt
from picollm import dist, hardware, parallel
from picollm.data.loader import PackedLoader
from picollm.data.prepare import PreparedData
from picollm.evaluate import eval_batch_size, evaluate, token_byte_lengths
from picollm.export import export_weights
from picollm.model import GPT
from picollm.optim import lr_at, make_optimizer, set_lr
from picollm.plan import Plan, process_age
from picollm.throughput import autocast
from picollm.train_log import MetricsLog, log
from picollm.units import duration

# train.save_at checkpoints go to run_dir/saved_at/checkpoints/, where retention never prunes them.
SAVED_AT = "saved_at"
MIN_LOSS_SCALE = 1.0  # below this, gradients overflow fp16 even unscaled: the run is diverging
FRESH_STATS = {"skipped_steps": 0, "best_val_loss": None, "best_step": None, "train_seconds": 0.0,
               "lr_scale": 1.0, "rollbacks": 0, "scaler_skips": 0, "deadline": None}
# budget.minutes: the loop checks its pace DEADLINE_CHECKS times over the run and shortens the
# schedule once the steps left would end more than DEADLINE_SLACK past the training time planned.
# A shared machine that slowed by 15-20% after the probe made a 10-minute run take 11.9 minutes.
# When the machine is faster than the probe measured, the end moves out, up to DEADLINE_STRETCH
# times the plan's steps: a probe that underrated the machine by 7% once ended a 2-minute run 8 s
# early with all its planned steps done.
# The pace is measured over the last DEADLINE_WINDOW checks (a fifth of the run): over one
# check's steps it swings by +-10% on a shared box. The end moves out until the last
# DEADLINE_SETTLED of the schedule: when it moved out only in the plan's first half, a cut after
# it was final, and three runs of 2.5 and 5 minutes ended 6-7% early.
DEADLINE_CHECKS = 20
DEADLINE_SLACK = 1.02
DEADLINE_STRETCH = 1.25
DEADLINE_WINDOW = 4
DEADLINE_SETTLED = 0.1


class TrainError(RuntimeError):
    """A run that cannot go on; the message says why and what to do."""


class Interrupted(Exception):
    """A signal stopped the run after saving a checkpoint; exit status 128 + signum."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = int(signum)


@dataclass(frozen=True)
class Cadence:
    """When the loop evaluates, saves and prints: every plan.eval_every, plan.save_every and
    train.log_every steps; the last step always evaluates and saves; a stop signal saves at
    once; train.save_at steps also save into run_dir/saved_at, kept apart from retention."""
    last: int
    eval_every: int
    save_every: int
    log_every: int
    save_at: frozenset = frozenset()

    @classmethod
    def of(cls, plan: Plan, t: DictConfig) -> "Cadence":
        return cls(plan.steps, plan.eval_every, plan.save_every, max(1, t.log_every), frozenset(t.save_at))

    def evaluate(self, step: int) -> bool:
        return step == self.last or step % self.eval_every == 0

    def may_stop(self, step: int) -> bool:
        return step != self.last  # a signal during the last step lets the run finish instead

    def save(self, step: int, stopping: bool) -> bool:
        return step == self.last or stopping or step % self.save_every == 0

    def keep(self, step: int) -> bool:
        return step in self.save_at and step != self.last  # a sweep branches cooldowns from these

    def print(self, step: int) -> bool:
        return step in (1, self.last) or step % self.log_every == 0


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    updated: bool  # the optimizer stepped
    bad: bool  # counts toward the bad-step streak (rollback / stop)
    loss_scale: Optional[float] = None  # fp16 only


class Trainer:
    """Model, optimizer, data cursor and run bookkeeping for one run; ``train`` is the loop."""

    def __init__(self, cfg: DictConfig, rank_info: dist.DistInfo, hw: hardware.DeviceInfo, plan: Plan,
                 data: PreparedData, run_dir: Path) -> None:
        t = self.t = cfg.train
        self.cfg, self.rank_info, self.hw, self.plan, self.data, self.run_dir = cfg, rank_info, hw, plan, data, run_dir
        self.torch_device = hw.device
        gcfg = self.gcfg = plan.gpt_config()
        torch.manual_seed(t.seed)
        self.sharded = parallel.is_sharded(t.parallel, rank_info)
        # Under FSDP the full model is built on the host and its shards moved to the device,
        # so every mode starts from the same weights.
        self.model = GPT(gcfg).to("cpu" if self.sharded else self.torch_device)
        self.model.activation_checkpointing = t.activation_checkpointing
        self.train_model = parallel.wrap(self.model, t.parallel, rank_info, self.torch_device, hw.dtype)
        if t.compile:
            self.train_model = torch.compile(self.train_model)
        self.forward = self.train_model  # a micro-batch's loss (FaultDrill may wrap it)
        # The optimizer comes after wrapping: FSDP replaces the parameters with sharded ones.
        self.optimizer = make_optimizer(self.model, plan.lr, t.weight_decay, (t.beta1, t.beta2), self.torch_device,
                                        t.optimizer, t.muon_lr_ratio, hw.dtype)
        # fp16 (GPUs without bf16; also runs on CPU): the scaler skips steps whose scaled
        # gradients overflow and lowers the scale. That is its job, not a bad step.
        self.scaler = torch.amp.GradScaler(self.torch_device.type) if hw.dtype == "fp16" else None
        # max_tokens pins the stream length, so a cache later rebuilt larger by another run
        # (a strict superset: same prefix) leaves this run's sample order unchanged.
        self.loader = PackedLoader(data.train_shards, gcfg.seq_len, plan.batch_seqs, plan.micro_batch, t.seed,
                                   rank_info.rank, rank_info.world_size, max_tokens=plan.stream_tokens)
        self.step, self.stats, self.bad_streak = 0, dict(FRESH_STATS), 0
        self.cadence = Cadence.of(plan, t)
        self.metrics = MetricsLog(run_dir, cfg, rank_info.is_main)
        self.byte_lengths = token_byte_lengths(data.tokenizer, gcfg.vocab_size)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.spikes = SpikeDetector(t.spike_sigmas)
        self.peak = hardware.combined_peak(hw, rank_info.world_size) or 0  # this machine's, not the plan's
        d = cfg.debug
        if d.nan_loss_at_steps or d.inf_grad_at_steps or d.slow_steps_from is not None or d.slow_start_seconds:
            FaultDrill(d).install(self)
        self.mark_pace()
        self.late_start = 0.0  # budget.minutes: seconds between the plan and the first step it did not foresee

    # ---------------------------------------------------------------- the loop
    def train(self, stopper: "StopOnSignal") -> dict:
        """From the current step to the plan's last; returns final.json's numbers."""
        plan = self.plan
        self.cadence = replace(self.cadence, last=last_step(plan, self.stats))  # a resumed deadline's
        self.mark_pace()
        if self.step == 0 and plan.time_budget is not None:
            self.late_start = late_start(plan.time_budget, process_age())
        last_val = self.evaluate() if self.step == 0 and self.t.eval_at_start else None
        progress = ProgressLine(plan, self.peak, self.rank_info)
        # To the furthest step the deadline may move the end to, not the current end: a resumed
        # or rolled-back run may move its end out again (keep_deadline); close() stops the
        # prefetch early.
        batches = self.loader.batches(self.step, furthest_step(plan))
        while self.step < self.cadence.last:
            lr = self.apply_lr()
            started = time.perf_counter()
            result = self.train_step(batches)
            if self.hw.is_cuda:
                torch.cuda.synchronize(self.torch_device)
            dt = time.perf_counter() - started
            self.stats["train_seconds"] += dt
            self.step += 1
            tok_s = self.record(result, lr, dt)
            self.check(result)
            if result.bad and self.roll_back_if_due():
                batches.close()  # stop the old prefetch thread before restarting at the rollback step
                batches = self.loader.batches(self.step, furthest_step(plan))
                self.mark_pace()  # the deadline's pace restarts here
                continue
            progress.step_done(self.step, self.cadence.last, self.cadence.print(self.step), result, lr, tok_s)
            self.keep_deadline()  # before the cadence: a step the deadline makes the last evaluates and saves
            if self.cadence.evaluate(self.step):
                last_val = self.evaluate()
            # Every rank stops at the same step, whichever received the signal.
            stop = self.cadence.may_stop(self.step) and dist.any_rank(stopper.signum is not None)
            if self.cadence.save(self.step, stop):
                self.save()
            if self.cadence.keep(self.step):
                self.save(self.run_dir / SAVED_AT, keep=0)
            if stop:
                self.stop(stopper.signum)
        batches.close()  # a deadline can end the run before the loader's last step
        return self.finish(last_val)

    def apply_lr(self) -> float:
        """This step's LR from the schedule, times the rollbacks' scale, set on every group
        (each at its own multiple: Muon's differs from AdamW's)."""
        plan, t = self.plan, self.t
        lr = self.stats["lr_scale"] * lr_at(self.step, plan.lr, plan.warmup_steps, self.cadence.last, t.min_lr_ratio,
                                            t.schedule, t.decay_frac, t.decay_shape)
        set_lr(self.optimizer, lr)
        return lr

    def mark_pace(self) -> None:
        """Start the deadline's pace afresh at this step (a start, resume or rollback)."""
        self.pace_marks = collections.deque([(self.step, self.stats["train_seconds"])], maxlen=DEADLINE_WINDOW)

    def keep_deadline(self) -> None:
        """budget.minutes: when the pace over the last DEADLINE_WINDOW checks would end
        training more than DEADLINE_SLACK past the time the plan left for it (the machine
        slowed after the probe), less what the process spent after the plan before its first
        step (late_start), the run ends at the step that fits instead, the LR decaying over
        the new length. When the end would fall over two slacks inside (the pace came back
        after a cut, or the probe underrated the machine) before the last DEADLINE_SETTLED of
        the steps, the end moves out to a slack inside, at most to furthest_step: a neighbour's
        burst at the start once cut 7% of a 5-minute run that then ended 18 s early. Checked
        DEADLINE_CHECKS times a run, after the warmup, on every rank at the same steps with
        the slowest rank's numbers, so all ranks cut alike."""
        plan, last = self.plan, self.cadence.last
        if (plan.time_budget is None or self.step >= last or self.step < plan.warmup_steps
                or self.step % max(1, plan.steps // DEADLINE_CHECKS)):
            return
        spent = self.stats["train_seconds"]
        since_step, since_spent = self.pace_marks[0]
        pace = (spent - since_spent) / max(1, self.step - since_step)
        self.pace_marks.append((self.step, spent))
        spent, pace, late = dist.max_over_ranks([spent, pace, self.late_start])
        allowed = plan.time_budget["train_s"] - late
        end = spent + pace * (last - self.step)
        if end > DEADLINE_SLACK * allowed:  # cut to the step that ends on time
            new_last, why = min(last, self.step + max(0, int((allowed - spent) / pace))), "past"
        elif (last < furthest_step(plan) and end < allowed / DEADLINE_SLACK**2
              and self.step <= (1 - DEADLINE_SETTLED) * last):
            # Out to end a slack inside: a cut now needs the pace 4% slower, so the noise
            # between checks does not move the end back and forth. A longer schedule raises
            # the LR at this step (never above the peak; by a few % of it for a move of a few %
            # late in the run); not in the schedule's last tenth, so the run ends its decay.
            fits = self.step + max(0, int((allowed / DEADLINE_SLACK - spent) / pace))
            new_last, why = min(furthest_step(plan), fits), "inside"
            if new_last <= last:
                return
        else:
            return
        self.stats["deadline"] = {"planned": plan.steps, "last": new_last}
        self.cadence = replace(self.cadence, last=new_last)
        self.event("deadline", planned_steps=plan.steps, last_step=new_last, train_seconds=spent,
                   seconds_per_step=pace, planned_train_seconds=allowed, late_start_seconds=late)
        log(f"step {self.step}: at {pace:.3g} s/step training would end {abs(end - allowed):.0f} s {why} "
            f"the {allowed:.0f} s left for it{f' ({late:.0f} s went to a late start)' if late >= 1 else ''}; "
            f"the run now ends at step {new_last} (the LR decays over that length)",
            self.rank_info)

    def record(self, result: StepResult, lr: float, dt: float) -> float:
        """The step's record in metrics.jsonl; returns its tokens per second."""
        plan = self.plan
        tok_s = plan.tokens_per_step / dt
        tokens = self.step * plan.tokens_per_step
        record = {
            "kind": "train", "step": self.step, "loss": result.loss, "lr": lr, "grad_norm": result.grad_norm,
            "tokens": tokens, "flops": tokens * plan.flops_per_token, "tok_per_s": tok_s,
            "mfu": tok_s * plan.flops_per_token / self.peak if self.peak else None, "dt": dt,
            "skipped": not result.updated, "time": time.time(),
        }
        if result.loss_scale is not None:
            record["loss_scale"] = result.loss_scale
        self.metrics.write(record)
        return tok_s

    def check(self, result: StepResult) -> None:
        """The step's health: a bad step lengthens the streak; a good one may be a loss spike."""
        if result.bad:
            self.bad_streak += 1
            self.stats["skipped_steps"] += 1
            self.event("skipped_step", loss=result.loss, grad_norm=result.grad_norm, loss_scale=result.loss_scale)
            what = "non-finite loss or collapsed loss scale" if self.scaler else "non-finite loss or gradient norm"
            log(f"step {self.step}: {what}; update skipped ({self.bad_streak} in a row)", self.rank_info)
            return
        self.bad_streak = 0
        if not result.updated:  # the fp16 loss scaler skipped an overflow and lowered its scale: its job
            self.stats["scaler_skips"] += 1
        elif spike := self.spikes.update(result.loss):
            self.event("spike", **spike)
            log(f"step {self.step}: loss spike {result.loss:.4f} (running mean {spike['mean']:.4f})", self.rank_info)

    def stop(self, signum: Optional[int]) -> None:
        name = signal.Signals(signum).name if signum else "a signal on another rank"
        log(f"stopped by {name} after step {self.step}; checkpoint saved in {self.run_dir}. "
            f"Rerun the same command to resume (it continues in run_dir={self.run_dir}).", self.rank_info)
        self.metrics.close()
        raise Interrupted(signum or signal.SIGTERM)

    # ---------------------------------------------------------------- one step
    def train_step(self, batches) -> StepResult:
        """One optimizer step: the micro-batches' gradients, then the update."""
        return self.update(self.accumulate(batches))

    def accumulate(self, batches) -> torch.Tensor:
        """Forward and backward over this step's micro-batches; returns their summed loss."""
        plan, step = self.plan, self.step
        loss_sum = torch.zeros((), device=self.torch_device)
        for micro in range(plan.accum_steps):
            s, m, x, y = next(batches)
            assert (s, m) == (step, micro), "loader out of step"
            x = x.to(self.torch_device, non_blocking=True)
            y = y.to(self.torch_device, non_blocking=True)
            # DDP reduces gradients once per step; FSDP reduce-scatters every micro-batch so that
            # gradients stay sharded (its memory saving).
            defer = self.rank_info.enabled and not self.sharded and micro < plan.accum_steps - 1
            with self.train_model.no_sync() if defer else contextlib.nullcontext():
                with autocast(self.hw):
                    loss = self.forward(x, y)
                scaled = loss / plan.accum_steps  # k micro-batches == one batch k times larger
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            loss_sum += loss.detach()
        return loss_sum

    def update(self, loss_sum: torch.Tensor) -> StepResult:
        """Clip and step, unless the loss or gradient norm is non-finite (under fp16 the
        loss scaler decides and lowers its scale)."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        clip = self.t.grad_clip if self.t.grad_clip > 0 else float("inf")
        grad_norm = parallel.local_value(torch.nn.utils.clip_grad_norm_(self.params, clip))
        loss_mean = float(dist.all_reduce_mean(loss_sum / self.plan.accum_steps))
        grad_norm = float(grad_norm)
        if self.scaler is not None:
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)  # skips the update itself on inf/nan gradients
            self.scaler.update()  # ...and then lowers the scale
            new_scale = self.scaler.get_scale()
            result = StepResult(loss_mean, grad_norm, updated=new_scale >= scale, loss_scale=new_scale,
                                bad=not math.isfinite(loss_mean) or new_scale < MIN_LOSS_SCALE)
        else:
            finite = math.isfinite(loss_mean) and math.isfinite(grad_norm)
            if finite:
                self.optimizer.step()
            result = StepResult(loss_mean, grad_norm, updated=finite, bad=not finite)
        self.optimizer.zero_grad(set_to_none=True)
        return result

    def roll_back_if_due(self) -> bool:
        """After train.max_bad_steps bad steps in a row: roll back to the newest valid
        checkpoint with a lower LR (True), or stop with a sentence (raises)."""
        t = self.t
        if self.bad_streak < t.max_bad_steps:
            return False
        latest = dist.from_main(lambda: ckpt.latest_valid(self.run_dir))
        if t.on_bad_steps == "stop" or latest is None or self.stats["rollbacks"] >= t.max_rollbacks:
            why = ("no checkpoint to roll back to" if latest is None and t.on_bad_steps == "rollback" else
                   f"{self.stats['rollbacks']} rollbacks already" if t.on_bad_steps == "rollback" else
                   "train.on_bad_steps=stop")
            raise TrainError(f"{self.bad_streak} non-finite steps in a row at step {self.step} ({why}); stopping. "
                             "Lower train.lr, check the data, or resume from an earlier checkpoint.")
        state = ckpt.load_checkpoint(latest, tensors=not self.sharded)
        self.restore(state, keep_stats=("skipped_steps", "scaler_skips", "rollbacks", "lr_scale", "train_seconds",
                                        "deadline"))
        self.stats["rollbacks"] += 1
        self.stats["lr_scale"] *= t.rollback_lr_scale
        self.bad_streak = 0
        self.event("rollback", checkpoint=str(latest), lr_scale=self.stats["lr_scale"])
        log(f"rolled back to {latest} (step {self.step}); LR now scaled by {self.stats['lr_scale']:g}", self.rank_info)
        return True

    # ---------------------------------------------------------------- evaluation
    def evaluate(self) -> dict:
        plan = self.plan
        # budget.minutes may plan fewer tokens than train.eval_tokens (plan._time_budget)
        eval_tokens = (plan.time_budget or {}).get("eval_tokens", self.t.eval_tokens)
        result = evaluate(self.model, self.data.val_shards, self.gcfg.seq_len,
                          eval_batch_size(plan.micro_batch, self.gcfg.seq_len), self.byte_lengths,
                          lambda: autocast(self.hw), eval_tokens, self.torch_device, self.rank_info.rank,
                          self.rank_info.world_size, lockstep=self.sharded)
        best = self.stats["best_val_loss"]
        if best is None or result["val_loss"] < best:
            self.stats["best_val_loss"], self.stats["best_step"] = result["val_loss"], self.step
        tokens = self.step * plan.tokens_per_step
        self.metrics.write({"kind": "eval", "step": self.step, "tokens": tokens,
                            "flops": tokens * plan.flops_per_token, **result})
        log(f"eval step {self.step}: val_loss {result['val_loss']:.4f}, val_bpb {result['val_bpb']:.4f}", self.rank_info)
        return result

    # ---------------------------------------------------------------- checkpoints
    def state(self) -> dict:
        """Everything a resume needs. Model and optimizer state are keyed by parameter name
        (this rank's shards under FSDP, so FSDP saves them with DCP, not here)."""
        model_sd, optim_sd = parallel.training_state(self.model, self.optimizer)
        return {
            "step": self.step, "model": model_sd, "optimizer": optim_sd,
            "scaler": self.scaler.state_dict() if self.scaler else None, "loader": self.loader.state_dict(),
            "rng": dist.all_gather_object(ckpt.rng_state(self.torch_device)),  # each rank's, its own GPU only
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "plan": self.plan.to_dict(), "stats": dict(self.stats),
            "tokenizer": {"ref": self.data.tokenizer_ref, "bos_id": self.data.bos_id,
                          "vocab_size": self.data.vocab_size},
            "torch_version": torch.__version__,
        }

    def resume(self, state: dict, path: Path) -> None:
        """Continue from the checkpoint at ``path`` (``state``, already loaded)."""
        self.restore(state)
        self.event("resume", checkpoint=str(path), world_size=self.rank_info.world_size)
        log(f"resumed from {path} at step {self.step}", self.rank_info)

    def restore(self, state: dict, keep_stats: tuple = ()) -> None:
        """Continue from a checkpoint of either layout, saved with any world size."""
        rows = state["model"]["embed.weight"].shape[0] if state["model"] and "embed.weight" in state["model"] else None
        if rows is not None and rows != self.gcfg.padded_vocab:
            raise TrainError(f"this checkpoint's embedding has {rows} rows, saved before the vocabulary was padded to a "
                             f"multiple of 128 ({self.gcfg.padded_vocab}); its optimizer state cannot continue here. "
                             "Evaluate, sample or export it, or continue it with the picollm version that started it.")
        if state["model"] is None:  # a sharded checkpoint read without tensors (FSDP): DCP reshards
            ckpt.load_sharded(Path(state["path"]), self.model, self.optimizer)
        else:
            parallel.load_training_state(self.model, self.optimizer, state["model"], state["optimizer"], self.sharded)
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.loader.load_state_dict(state["loader"])
        ckpt.set_rng_state(ckpt.rank_rng_state(state["rng"], self.rank_info.rank), self.torch_device)
        self.step = int(state["step"])
        kept = {k: self.stats[k] for k in keep_stats}
        self.stats.update(state.get("stats", {}))
        self.stats.update(kept)

    def save(self, into: Optional[Path] = None, keep: Optional[int] = None) -> None:
        """This step's checkpoint, every rank taking part. A failed write stops the run and
        leaves the earlier checkpoints. ``into``/``keep``: another run_dir-like folder and
        its retention (0 keeps all)."""
        try:
            ckpt.save_training_state(into or self.run_dir, self.step, self.state(), self.sharded, self.rank_info.is_main,
                                     keep=self.t.keep_checkpoints if keep is None else keep,
                                     extra_keep=self.stats["best_step"])
        except ckpt.CheckpointError as err:
            raise TrainError(str(err)) from None

    def event(self, name: str, **fields) -> None:
        self.metrics.write({"kind": "event", "event": name, "step": self.step, **fields})

    # ---------------------------------------------------------------- the end
    def finish(self, last_val: Optional[dict]) -> dict:
        """After the last step: model.safetensors, final.json and the report, on rank 0."""
        self.metrics.close()
        final = final_numbers(self.plan, self.stats, self.torch_device, last_val)
        whole = self._whole_model()
        if self.rank_info.is_main:
            export_weights(whole, self.run_dir)
            (self.run_dir / "final.json").write_text(json.dumps(final, indent=2))
            if self.t.report:
                self.write_report(whole)
        return final

    def _whole_model(self) -> Optional[GPT]:
        """Collective under FSDP: the unsharded model in rank 0 (None on the other rank_info)."""
        if not self.sharded:
            return self.model
        weights = parallel.gathered_model_state(self.model)
        if not self.rank_info.is_main:
            return None
        whole = GPT(self.gcfg)
        whole.load_state_dict(weights)
        return whole

    def write_report(self, model: GPT) -> None:
        """report.md with samples from the model in memory; a failure here is reported but
        never fails the run."""
        from picollm.report import run_samples, write_report
        from picollm.saved_run import LoadedRun

        here = LoadedRun(run_dir=self.run_dir, path=ckpt.step_path(self.run_dir, self.step), step=self.step,
                         model=model, tokenizer=self.data.tokenizer, tokenizer_ref=self.data.tokenizer_ref,
                         bos_id=self.data.bos_id, plan=self.plan.to_dict(), config=self.cfg,
                         device=next(model.parameters()).device)
        try:
            path = write_report(self.run_dir, samples=run_samples(self.run_dir, loaded=here))
            log(f"report: {path}", self.rank_info)
        except Exception as err:  # the training result is already safe on disk
            log(f"warning: could not write the report ({err}); run python -m picollm.report run_dir={self.run_dir}",
                self.rank_info)


def late_start(time_budget: dict, age: float) -> float:
    """budget.minutes: the seconds this process (``age`` old) spent between planning and its
    first step beyond what the plan took out (start-up and probes): preparing data on a first
    run, building the model. They come out of training, so the whole process ends on time."""
    planned = sum(time_budget.get(k, 0.0) for k in ("startup_s", "dtype_probe_s", "throughput_probe_s"))
    return max(0.0, age - planned)


def furthest_step(plan: Plan) -> int:
    """The furthest budget.minutes' deadline may move a run's end (Trainer.keep_deadline)."""
    return plan.steps if plan.time_budget is None else int(plan.steps * DEADLINE_STRETCH)


def last_step(plan: Plan, stats: dict) -> int:
    """The run's last step: the plan's, or the one budget.minutes' deadline moved it to
    (Trainer.keep_deadline), as long as the plan's step count is the one it moved."""
    cut = stats.get("deadline")
    return cut["last"] if cut and cut["planned"] == plan.steps else plan.steps


def final_numbers(plan: Plan, stats: dict, device: torch.device, last_val: Optional[dict]) -> dict:
    """final.json: the run's totals and its last evaluation."""
    return {"steps": last_step(plan, stats), "planned_steps": plan.steps,
            "skipped_steps": stats["skipped_steps"], "rollbacks": stats["rollbacks"],
            "scaler_skips": stats["scaler_skips"], "train_seconds": stats["train_seconds"],
            "best_val_loss": stats["best_val_loss"], "best_step": stats["best_step"],
            "peak_memory_mib": hardware.peak_memory_mib(device), **(last_val or {})}


def close_finished_run(run_dir: Path, plan: Plan, state: dict, rank_info: dist.DistInfo, device: torch.device) -> dict:
    """A finished run started again: nothing to train, so no model, optimizer or loader is
    built. What a first session stopped after its last save did not write (the exported
    weights, final.json) comes from the checkpoint; returns final.json's numbers."""
    log(f"run in {run_dir} is already complete ({last_step(plan, state.get('stats', {}))} steps); nothing to train. "
        "For a new run, set run_dir (or raise train.steps to extend this one).", rank_info)

    def close() -> dict:
        if not (run_dir / "model.safetensors").exists():
            export_weights(_checkpoint_model(plan, state), run_dir)
        path = run_dir / "final.json"
        if path.exists():
            return json.loads(path.read_text())
        final = final_numbers(plan, {**FRESH_STATS, **state.get("stats", {})}, device, None)
        path.write_text(json.dumps(final, indent=2))
        return final
    return dist.from_main(close)


def _checkpoint_model(plan: Plan, state: dict) -> GPT:
    """The model of a loaded checkpoint (a sharded one read whole, in this process)."""
    weights = state["model"] if state["model"] is not None else ckpt.load_checkpoint(Path(state["path"]))["model"]
    model = GPT(plan.gpt_config())
    model.load_state_dict(weights)
    return model


class ProgressLine:
    """The console line of every train.log_every steps, its ETA from the steps since the last."""

    def __init__(self, plan: Plan, peak: float, rank_info: dist.DistInfo) -> None:
        self.plan, self.peak, self.rank_info = plan, peak, rank_info
        self.since, self.steps = time.perf_counter(), 0

    def step_done(self, step: int, last: int, now: bool, result: StepResult, lr: float, tok_s: float) -> None:
        self.steps += 1
        if not now:
            return
        plan = self.plan
        rate = (time.perf_counter() - self.since) / self.steps
        mfu = f" | MFU {tok_s * plan.flops_per_token / self.peak:.1%}" if self.peak else ""
        log(f"step {step}/{last} | loss {result.loss:.4f} | lr {lr:.2e} | gnorm {result.grad_norm:.2f} "
            f"| {tok_s / 1e3:.1f}k tok/s{mfu} | ETA {duration(rate * (last - step))}", self.rank_info)
        self.since, self.steps = time.perf_counter(), 0


class SpikeDetector:
    """Running mean and variance of the loss (EMA); a loss ``sigmas`` std devs above the
    mean (and 5% above it, so a flat curve's tiny variance does not cry wolf) is a spike."""

    def __init__(self, sigmas: float, beta: float = 0.95, warmup: int = 20) -> None:
        self.sigmas, self.beta, self.warmup = sigmas, beta, warmup
        self.mean, self.var, self.seen = None, 0.0, 0

    def update(self, loss: float) -> Optional[dict]:
        if self.mean is None:
            self.mean = loss
            return None
        dev, std = loss - self.mean, math.sqrt(self.var)
        self.seen += 1
        spike = self.seen > self.warmup and dev > self.sigmas * std and dev > 0.05 * self.mean
        result = {"loss": loss, "mean": self.mean, "std": std} if spike else None
        self.mean += (1 - self.beta) * dev
        self.var = self.beta * (self.var + (1 - self.beta) * dev * dev)
        return result


class StopOnSignal:
    """SIGTERM / SIGINT (preemption, Ctrl-C) set a flag; the loop finishes the current step,
    saves and exits. A second Ctrl-C interrupts at once."""

    def __enter__(self):
        self.signum, self.previous = None, {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False


class FaultDrill:
    """The debug group's drills, for tests. Installed only when set, around the trainer's
    forward and accumulation, so the loop itself knows nothing of it: the first time a
    listed step runs, its loss becomes NaN or one gradient element inf (a rollback replays
    the step cleanly); steps from slow_steps_from on (until slow_steps_until) take longer;
    and installing it waits slow_start_seconds (a late start before the first step)."""

    def __init__(self, debug: DictConfig) -> None:
        self.nan_loss, self.inf_grad = set(debug.nan_loss_at_steps), set(debug.inf_grad_at_steps)
        self.slow_from, self.slow_until = debug.slow_steps_from, debug.slow_steps_until
        self.slow_seconds = debug.slow_step_seconds
        self.slow_start = debug.slow_start_seconds
        self.done: set = set()

    def install(self, trainer: Trainer) -> None:
        time.sleep(self.slow_start)  # after the plan, before the first step: Trainer.late_start counts it
        forward, accumulate = trainer.forward, trainer.accumulate

        def nan_forward(x, y):
            loss = forward(x, y)
            return loss * float("nan") if self._due(trainer.step, self.nan_loss) else loss

        def inf_accumulate(batches):
            until = float("inf") if self.slow_until is None else self.slow_until
            if self.slow_from is not None and self.slow_from <= trainer.step < until:
                time.sleep(self.slow_seconds)  # a machine that slowed down: the step's time counts it
            loss_sum = accumulate(batches)
            if self._due(trainer.step, self.inf_grad):
                parallel.local_shard(trainer.params[0].grad).view(-1)[0] = float("inf")
            if trainer.step in self.nan_loss | self.inf_grad:
                self.done.add(trainer.step)
            return loss_sum

        trainer.forward, trainer.accumulate = nan_forward, inf_accumulate

    def _due(self, step: int, steps: set) -> bool:
        return step in steps and step not in self.done
