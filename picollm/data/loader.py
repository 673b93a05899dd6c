"""Packed-token loaders over token shards, with a global order independent of world size.

Train contract (the trainer, DDP and resume rely on it):
- The stream is all train shards concatenated (memory-mapped, never copied whole);
  T tokens, M = (T - 1) // seq_len sequences; sequence j = tokens[j*L : j*L + L + 1].
- Epoch e visits sequences in `np.random.default_rng([seed, e]).permutation(M)`;
  global sample g is sequence perm_{g // M}[g % M].
- Step s uses global samples [s*B, (s+1)*B). With world size W, accumulation k and
  micro batch b = B // (W*k), micro-step m of rank r takes samples
  s*B + (m*W + r)*b + [0, b). One process with k=2 sees what two with k=1 see.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from picollm.data.shards import PreparedDataError, read_shard

STATE_VERSION = 1


class TokenStream:
    """Read-only view of several shards as one virtual token array."""

    def __init__(self, shard_paths: Sequence[str | os.PathLike], max_tokens: int | None = None):
        # Plain ndarray views of the memmaps: indexing a np.memmap subclass is several times slower.
        self.arrays = [read_shard(p).view(np.ndarray) for p in shard_paths]
        lengths = [len(a) for a in self.arrays]
        self.starts = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        total = int(self.starts[-1])
        self.n_tokens = total if max_tokens is None else min(total, int(max_tokens))

    def __len__(self) -> int:
        return self.n_tokens

    def read_into(self, start: int, out: np.ndarray) -> None:
        """Fill `out` with tokens[start : start + len(out)], crossing shard boundaries."""
        if start < 0 or start + len(out) > self.n_tokens:
            raise IndexError(f"token range [{start}, {start + len(out)}) is outside the stream of {self.n_tokens}.")
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        pos = 0
        while pos < len(out):
            local = start + pos - int(self.starts[i])
            n = min(len(self.arrays[i]) - local, len(out) - pos)
            out[pos : pos + n] = self.arrays[i][local : local + n]
            pos += n
            i += 1

    def read_rows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """Rows tokens[s : s + length] for each s in `starts`, as an int64 [len(starts), length] array."""
        starts = np.asarray(starts, dtype=np.int64)
        out = np.empty((len(starts), length), dtype=np.int64)
        if not len(starts):
            return out
        if starts.min() < 0 or starts.max() + length > self.n_tokens:
            raise IndexError(f"a window of {length} tokens falls outside the stream of {self.n_tokens}.")
        shard = np.searchsorted(self.starts, starts, side="right") - 1
        inside = starts + length <= self.starts[shard + 1]
        offsets = np.arange(length, dtype=np.int64)
        # One fancy-indexing gather per shard for rows that do not cross a shard boundary
        # (the common case); the few that do are copied piece by piece.
        for s in np.unique(shard[inside]):
            rows = np.flatnonzero(inside & (shard == s))
            local = starts[rows] - self.starts[s]
            out[rows] = self.arrays[s][local[:, None] + offsets]
        for row in np.flatnonzero(~inside):
            self.read_into(int(starts[row]), out[row])
        return out


def _to_xy(buf: np.ndarray, pin: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(np.ascontiguousarray(buf[:, :-1]))
    y = torch.from_numpy(np.ascontiguousarray(buf[:, 1:]))
    if pin:  # page-locked memory lets .to(device, non_blocking=True) overlap the copy
        x, y = x.pin_memory(), y.pin_memory()
    return x, y


class PackedLoader:
    """Deterministic packed-sequence batches for one rank; see the module docstring."""

    def __init__(
        self,
        shards: Sequence[str | os.PathLike],
        seq_len: int,
        global_batch: int,
        micro_batch: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        max_tokens: int | None = None,
        pin_memory: bool | None = None,
        prefetch: int = 4,
    ):
        for name, value in (("seq_len", seq_len), ("global_batch", global_batch), ("micro_batch", micro_batch),
                            ("world_size", world_size)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}={value!r} must be a positive int.")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size}).")
        if global_batch % (world_size * micro_batch):
            raise ValueError(
                f"global batch of {global_batch} sequences is not divisible by world_size*micro_batch = "
                f"{world_size * micro_batch}; pick a global batch that is a multiple of it or change micro_batch."
            )
        self.stream = TokenStream(shards, max_tokens)
        self.seq_len, self.global_batch, self.micro_batch = seq_len, global_batch, micro_batch
        self.seed, self.rank, self.world_size = int(seed), rank, world_size
        self.accum_steps = global_batch // (world_size * micro_batch)
        self.n_tokens = len(self.stream)
        self.n_sequences = (self.n_tokens - 1) // seq_len
        if self.n_sequences < 1:
            raise PreparedDataError(
                f"the train stream has {self.n_tokens:,} tokens, too few for one training sequence of "
                f"seq_len + 1 = {seq_len + 1:,}; add text to the corpus (or prepare more tokens) "
                f"or lower model.seq_len."
            )
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.prefetch = max(1, prefetch)
        self.next_step = 0  # the cursor: first step not yet fully handed out by batches()
        self._perms: dict[int, np.ndarray] = {}
        self._perm_lock = threading.Lock()

    # ---------------------------------------------------------------- order

    def permutation(self, epoch: int) -> np.ndarray:
        """The visiting order of sequences in `epoch` (cached: the two most recent epochs)."""
        with self._perm_lock:
            perm = self._perms.get(epoch)
            if perm is None:
                perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_sequences)
                self._perms[epoch] = perm
                for old in sorted(self._perms)[:-2]:
                    del self._perms[old]
            return perm

    def sample_ids(self, step: int, micro_step: int) -> np.ndarray:
        """Global sample indices of (step, micro_step) for this rank."""
        if not 0 <= micro_step < self.accum_steps or step < 0:
            raise IndexError(f"micro_step={micro_step} must be in [0, {self.accum_steps}) and step={step} >= 0.")
        b = self.micro_batch
        first = step * self.global_batch + (micro_step * self.world_size + self.rank) * b
        return np.arange(first, first + b, dtype=np.int64)

    def sequence_ids(self, step: int, micro_step: int) -> np.ndarray:
        """Which packed sequences (0..M-1) make up (step, micro_step) for this rank."""
        g = self.sample_ids(step, micro_step)
        epochs, within = np.divmod(g, self.n_sequences)
        out = np.empty_like(g)
        for e in np.unique(epochs):  # a micro batch may straddle an epoch boundary
            sel = epochs == e
            out[sel] = self.permutation(int(e))[within[sel]]
        return out

    # ---------------------------------------------------------------- data

    def get_micro_batch(self, step: int, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) int64 tensors of shape [micro_batch, seq_len]; y is x shifted by one token."""
        buf = self.stream.read_rows(self.sequence_ids(step, micro_step) * self.seq_len, self.seq_len + 1)
        return _to_xy(buf, self.pin_memory)

    def batches(
        self, start_step: int | None = None, end_step: int | None = None
    ) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
        """Yield (step, micro_step, x, y) from start_step (default: the cursor) on.

        A background thread prepares the next few micro batches while the caller
        computes; the order is fixed by the indices, so threading changes nothing.
        The cursor moves to step+1 just before the last micro-step of `step` is yielded.
        """
        start = self.next_step if start_step is None else int(start_step)
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        done = object()

        def put(item: Any) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.05)
                    return True
                except queue.Full:
                    continue
            return False

        def work() -> None:
            try:
                step = start
                while end_step is None or step < end_step:
                    for m in range(self.accum_steps):
                        if not put((step, m, *self.get_micro_batch(step, m))):
                            return
                    step += 1
                put(done)
            except BaseException as e:  # hand the error to the consumer instead of dying silently
                put(e)

        worker = threading.Thread(target=work, name="picollm-loader", daemon=True)
        worker.start()
        try:
            while True:
                item = q.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                step, m = item[0], item[1]
                if m == self.accum_steps - 1:
                    self.next_step = step + 1
                yield item
        finally:
            stop.set()
            worker.join()

    # ---------------------------------------------------------------- resume

    def state_dict(self) -> dict[str, int]:
        return {
            "version": STATE_VERSION,
            "next_step": self.next_step,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "global_batch": self.global_batch,
            "n_sequences": self.n_sequences,
            "n_tokens": self.n_tokens,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore the cursor; refuses a state whose data order would differ from this loader's."""
        mine = self.state_dict()
        keys = ("seed", "seq_len", "global_batch", "n_sequences", "n_tokens")
        diff = [f"{k} {state.get(k)!r} vs {mine[k]!r}" for k in keys if state.get(k) != mine[k]]
        if diff or state.get("version") != STATE_VERSION:
            raise ValueError(
                f"loader state does not match this run ({'; '.join(diff) or 'state version'}), so the data order "
                f"would differ; resume with the same prepared data, seq_len, global batch and seed, or start fresh."
            )
        self.next_step = int(state["next_step"])


class ValLoader:
    """Fixed, sequential, non-overlapping windows over the val stream (same every time).

    Window i is tokens[i*L : i*L + L + 1]; a trailing partial window is dropped, and
    `max_tokens` caps the windows at max_tokens // L. Batch i goes to rank i % world_size.
    """

    def __init__(
        self,
        val_shards: Sequence[str | os.PathLike],
        seq_len: int,
        batch_size: int,
        max_tokens: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ):
        if seq_len <= 0 or batch_size <= 0:
            raise ValueError(f"seq_len={seq_len} and batch_size={batch_size} must be positive.")
        self.stream = TokenStream(val_shards)
        self.seq_len, self.batch_size, self.rank, self.world_size = seq_len, batch_size, rank, world_size
        n = max((len(self.stream) - 1) // seq_len, 0)
        self.n_windows = n if max_tokens is None else min(n, int(max_tokens) // seq_len)

    def __len__(self) -> int:
        """Number of batches this rank yields."""
        n_batches = -(-self.n_windows // self.batch_size)
        return len(range(self.rank, n_batches, self.world_size))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        L = self.seq_len
        n_batches = -(-self.n_windows // self.batch_size)
        for i in range(self.rank, n_batches, self.world_size):
            first = i * self.batch_size
            windows = np.arange(first, min(first + self.batch_size, self.n_windows), dtype=np.int64)
            yield _to_xy(self.stream.read_rows(windows * L, L + 1), pin=False)
