"""torchrun process-group setup and teardown, and the few collectives the trainer needs.

A plain ``python -m picollm.train`` is a world of one; under torchrun the env variables
RANK / WORLD_SIZE / LOCAL_RANK select the process's place, gloo on CPU, NCCL on CUDA.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device_name: str = "auto") -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    info = DistInfo(int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), world)
    if world > 1 and not dist.is_initialized():
        use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
        if use_cuda:
            torch.cuda.set_device(info.local_rank)
        timeout = datetime.timedelta(minutes=30)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=timeout,
                                **_elastic_store(info, timeout))
    return info


def _elastic_store(info: DistInfo, timeout: datetime.timedelta) -> dict:
    """Under torchrun's c10d rendezvous every restart of the worker group talks to the same
    agent-hosted TCPStore, and torch adds no per-attempt prefix, so a restarted worker can
    read the address a dead worker of the previous attempt published and fail to connect
    (or hang). Prefixing the store with the restart count keeps each attempt to itself."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), info.world_size,
                          is_master=False, timeout=timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return {"store": dist.PrefixStore(f"picollm/attempt_{attempt}", store), "rank": info.rank,
            "world_size": info.world_size}


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s value on every rank (a plan, a run directory, an error)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t
