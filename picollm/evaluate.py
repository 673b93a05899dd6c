"""Validation loss and bits per byte on a fixed, deterministic set of held-out tokens.

bits per byte = (sum of per-token losses in nats) / (ln 2 * bytes those tokens decode
to). It does not depend on the tokenizer, so runs with different vocabularies compare.
Targets that are the BOS separator have no bytes and are left out of the bpb sums (they
still count in val_loss, the plain mean over all target tokens).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import tiktoken
import torch

from picollm import dist
from picollm.data.loader import ValLoader


def token_byte_lengths(enc: tiktoken.Encoding, vocab_size: int) -> torch.Tensor:
    """Bytes each token id decodes to; special tokens and ids past the encoding get 0."""
    lengths = torch.zeros(vocab_size, dtype=torch.int64)
    specials = set(enc.special_tokens_set)
    special_ids = {enc.encode_single_token(s) for s in specials}
    for i in range(min(vocab_size, enc.n_vocab)):
        if i in special_ids:
            continue
        try:
            lengths[i] = len(enc.decode_single_token_bytes(i))
        except KeyError:  # holes in some encodings' id ranges
            pass
    return lengths


@torch.no_grad()
def evaluate(model: torch.nn.Module, val_shards: Sequence, seq_len: int, batch_size: int,
             byte_lengths: torch.Tensor, autocast_ctx, max_tokens: Optional[int] = None,
             device: torch.device = torch.device("cpu"), rank: int = 0, world_size: int = 1) -> dict:
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # nats all, tokens, nats bpb, bytes
    lengths = byte_lengths.to(device)
    for x, y in ValLoader(val_shards, seq_len, batch_size, max_tokens, rank, world_size):
        x, y = x.to(device), y.to(device)
        with autocast_ctx():
            losses = model(x, y, reduction="none").double()
        nbytes = lengths[y.reshape(-1)]
        has_bytes = nbytes > 0
        sums += torch.stack([losses.sum(), torch.tensor(float(losses.numel()), dtype=torch.float64, device=device),
                             losses[has_bytes].sum(), nbytes.sum().double()])
    dist.all_reduce_sum(sums)
    model.train(was_training)
    nats, count, nats_bpb, nbytes = sums.tolist()
    if count == 0:
        raise ValueError("the validation split has no full window of seq_len+1 tokens; "
                         "raise data.val_fraction or data.val_tokens, or lower model.seq_len.")
    return {"val_loss": nats / count, "val_bpb": nats_bpb / (math.log(2) * max(nbytes, 1.0)),
            "val_tokens": int(count)}
