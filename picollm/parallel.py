"""How the model is spread over processes (``train.parallel``).

ddp:  every process holds the whole model, gradients and AdamW state; DDP averages the
      gradients (once per step: the other micro-batches run under ``no_sync``).
fsdp: FSDP2 (``fully_shard``) splits parameters, gradients and AdamW state over the
      processes, one unit per transformer block plus the root (embedding, final norm,
      head), and gathers a block's weights only while it runs (the root stays gathered
      from its forward to the end of its backward). With bf16 the gathered
      weights are bf16 and gradients are reduced in fp32. Use it when the model's training
      state does not fit on one GPU.

With one process both are the plain model. The state-dict helpers below give name-keyed
model and optimizer state for any of the three, in the form torch.distributed.checkpoint
uses, so checkpoints move between modes and world sizes.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from torch.distributed.tensor import DTensor

from picollm.dist import DistInfo

MODES = ("ddp", "fsdp")


def check_mode(mode: str, dtype: str) -> None:
    if mode not in MODES:
        raise ValueError(f"train.parallel={mode!r} is unknown; use ddp or fsdp.")
    if mode == "fsdp" and dtype == "fp16":
        raise ValueError("train.parallel=fsdp does not support fp16 loss scaling; use train.dtype=bf16 or fp32, "
                         "or train.parallel=ddp.")


def is_sharded(mode: str, rank_info: DistInfo) -> bool:
    return mode == "fsdp" and rank_info.enabled


def wrap(model: nn.Module, mode: str, rank_info: DistInfo, device: torch.device, dtype: str) -> nn.Module:
    """The module the training step calls. FSDP shards ``model`` in place (it stays the
    module to evaluate and save); DDP returns a wrapper around it."""
    if not rank_info.enabled:
        return model
    if mode == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if dtype == "bf16"
                  else MixedPrecisionPolicy())
        for block in model.blocks:
            fully_shard(block, mp_policy=policy)
        # The root (embedding, final norm, head) is the biggest unit of a small model and the
        # backward needs it again at once: keep it gathered from forward to backward instead of
        # gathering it twice per micro-batch. Moves the shards to the mesh's device.
        fully_shard(model, mp_policy=policy, reshard_after_forward=False)
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def local_value(t: torch.Tensor) -> torch.Tensor:
    """A replicated DTensor (e.g. FSDP's gradient norm) as a plain tensor."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a (possibly sharded) tensor, for in-place edits."""
    return t.to_local() if isinstance(t, DTensor) else t


def training_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Name-keyed model and optimizer state: this rank's shards under FSDP, else whole."""
    return get_state_dict(model, optimizer)


def load_training_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_sd: dict, optim_sd: dict,
                        sharded: bool) -> None:
    """Load whole, name-keyed state (from any checkpoint) into the model and optimizer;
    under FSDP each rank keeps its own shard."""
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                   options=StateDictOptions(full_state_dict=sharded))


def gathered_model_state(model: nn.Module) -> dict:
    """Collective: an FSDP model's whole weights, on CPU in rank 0 (empty elsewhere)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
