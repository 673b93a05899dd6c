"""torchrun process groups, and every collective picollm calls itself.

A plain ``python -m picollm.train`` is a world of one; under torchrun the env variables
RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE select the process's place.

Backends: ``cpu:gloo`` on CPU and ``cpu:gloo,cuda:nccl`` on CUDA. The small collectives
picollm issues itself (stop flags, broadcast objects, metric sums) then work whichever
device their tensor lives on: a CPU tensor goes through gloo, a CUDA tensor through NCCL,
and DDP/FSDP's gradient traffic stays on NCCL. CPU runs take the same code path with the
same backend string format. No other module calls ``torch.distributed`` collectives
directly (a test checks this).

Waiting for slow work on another rank (data preparation) does not use a collective, whose
timeout is meant for a stuck peer: ``publish``/``wait_for`` go through the rendezvous
store with their own, generous limit and say on every rank what they wait for.
"""

from __future__ import annotations

import datetime
import os
import pickle
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)  # a peer that is stuck, not slow
_store: Optional[dist.Store] = None  # this attempt's key-value store, for publish/wait_for


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def node(self) -> int:
        """This process's node (machine) index; ranks are laid out node by node."""
        return self.rank // self.local_world_size

    @property
    def n_nodes(self) -> int:
        return max(1, self.world_size // self.local_world_size)


def rank_info_from_env() -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return DistInfo(rank=int(os.environ.get("RANK", "0")), local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                    world_size=world, local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", str(world))))


def backend_for(use_cuda: bool) -> str:
    """gloo for CPU tensors always, NCCL beside it for CUDA tensors."""
    return "cpu:gloo,cuda:nccl" if use_cuda else "cpu:gloo"


def setup(device_name: str = "auto") -> DistInfo:
    global _store
    rank_info = rank_info_from_env()
    if rank_info.enabled and not dist.is_initialized():
        use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
        if use_cuda:
            torch.cuda.set_device(rank_info.local_rank)
        _store = _attempt_store(rank_info)
        dist.init_process_group(backend=backend_for(use_cuda), timeout=COLLECTIVE_TIMEOUT, store=_store,
                                rank=rank_info.rank, world_size=rank_info.world_size)
    return rank_info


def _attempt_store(rank_info: DistInfo) -> dist.Store:
    """The rendezvous TCPStore, prefixed with torchrun's restart count.

    Under torchrun's c10d rendezvous every restart of the worker group talks to the same
    agent-hosted store, and torch adds no per-attempt prefix, so a restarted worker can
    read the address a dead worker of the previous attempt published and fail to connect
    (or hang). The prefix keeps each attempt to itself. Without an agent store (a manual
    launch with MASTER_ADDR/MASTER_PORT), rank 0 hosts the store, as env:// would."""
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), rank_info.world_size,
                          is_master=rank_info.is_main and not agent, timeout=COLLECTIVE_TIMEOUT)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"picollm/attempt_{attempt}", store)


def teardown() -> None:
    global _store
    if dist.is_initialized():
        dist.destroy_process_group()
    _store = None


# ----------------------------------------------------------------------------- collectives

def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s value on every rank (a plan, a run directory, an error)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list:
    """Every rank's value, in rank order, on every rank."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In place, on the tensor's own device (gloo for CPU tensors, NCCL for CUDA ones)."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t


def any_rank(flag: bool) -> bool:
    """True on every rank if it is True on any (e.g. a signal reached one rank)."""
    return max_over_ranks([1.0 if flag else 0.0])[0] > 0


def max_over_ranks(values: list) -> list:
    """Each value's maximum over the ranks (every rank gets the same list)."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)  # CPU: the gloo half of the backend
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def from_main(work: Callable[[], Any], catch: tuple = (), raise_as: type = RuntimeError) -> Any:
    """Rank 0 does ``work`` and every rank gets its result (a plan, a path, a flag). If it
    raises one of ``catch``, every rank raises ``raise_as`` with that sentence, so all ranks
    stop together with the same message. A world of one simply does the work."""
    result, error = None, None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            result = work()
        except catch as err:
            error = str(err)
    result, error = broadcast_object((result, error))
    if error is not None:
        raise raise_as(error)
    return result


# ----------------------------------------------------------------------------- slow waits

WAIT_LIMIT = datetime.timedelta(hours=12)  # data preparation at GPU scale takes tens of minutes, not hours


def publish(key: str, value: Any) -> None:
    """Make ``value`` readable by every rank's ``wait_for(key)``; no-op in a world of one."""
    if _store is not None:
        _store.set(key, pickle.dumps(value))


def from_each_node(rank_info: DistInfo, key: str, work: Callable[[], dict], what: str, catch: tuple = ()) -> list[dict]:
    """Node-local work, such as data in a cache each node keeps: the first process of every
    node runs ``work`` and publishes its outcome (a small picklable dict); every rank then
    waits for all nodes through the store, without a collective timeout, and gets their
    outcomes in node order. A failure in ``catch`` is published as ``{"error": sentence}``
    (so the other nodes stop too) and re-raised on the node that hit it."""
    if rank_info.local_rank == 0:
        try:
            outcome = work()
        except catch as err:
            sentence = str(err) or f"node {rank_info.node} was interrupted before it could {what}"
            publish(f"{key}/node{rank_info.node}", {"error": sentence})
            raise
        publish(f"{key}/node{rank_info.node}", outcome)
    return [wait_for(f"{key}/node{n}", f"node {n}'s first process to {what}") for n in range(rank_info.n_nodes)]


def wait_for(key: str, what: str, limit: datetime.timedelta = WAIT_LIMIT, poll_s: float = 1.0,
             say: Callable[[str], None] = lambda m: print(m, flush=True), every_s: float = 60.0) -> Any:
    """The value another rank ``publish``-ed under ``key``, polling without a collective
    timeout and saying every ``every_s`` seconds what this rank waits for."""
    if _store is None:
        raise RuntimeError("wait_for needs an initialised process group")
    rank = dist.get_rank()
    start = last_said = time.monotonic()
    if not _store.check([key]):  # say it only when there is something to wait for
        say(f"rank {rank}: waiting for {what}")
    while not _store.check([key]):
        now = time.monotonic()
        if now - start > limit.total_seconds():
            raise TimeoutError(f"rank {rank} waited {limit} for {what} and gave up; check the log of the rank that "
                               "does that work.")
        if now - last_said >= every_s:
            say(f"rank {rank}: still waiting for {what} ({(now - start) / 60:.0f} min so far)")
            last_said = now
        time.sleep(poll_s)
    return pickle.loads(_store.get(key))
