"""Batch-invariant attention: a query's output depends on its own sequence only, never on the rest of the batch.

What makes the default path batch-dependent (measured, see docs/determinism.md):

- decodes are padded to the longest context in the step; a softmax or a product that reduces over more
  (masked) keys may round differently, so a sequence's output moves in the last bits with its neighbours;
- a prefill chunk that starts at position 0 attends to its fresh K/V with SDPA, a later chunk to keys read
  back from the cache with an explicit mask, so how the scheduler splits a prompt (which depends on what else
  runs, and on prefix-cache hits) changes its numbers.

Here every query token, decode or prefill, is computed one way: its context is read back from the cache
(where this step's K/V are already written), padded to the next multiple of ``BUCKET`` positions (a function
of its own position only), and goes through the decode kernel (``TorchSDPABackend._decode``: one
``[G, D] x [D, Kpad]`` product per query and KV head in a batched matmul, whose per-item result does not
depend on how many items the call holds). Queries are grouped by padded length so one call serves many.

The linear layers are the other half: ``BatchAdaptiveLinear`` switches weight format by batch rows, so in
batch-invariant mode the loader keeps one format (model/loading.py). The sampler draws each request's tokens
from its own generator and works row by row already.
"""

from __future__ import annotations

import torch

from tokenmill.model.attention import AttentionMetadata, KVCache, TorchSDPABackend, _slots

BUCKET = 128  # contexts are padded to a multiple of this many positions
MAX_KEYS_PER_CALL = 8192  # queries x padded length per kernel call: bounds the gathered keys (~12 MB here)


def invariant_attention(q: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q [T, H, D] for the step's tokens, whose K/V are already in ``kv_cache`` -> output [T, H, D]."""
    out = torch.empty_like(q)
    for rows, group in query_groups(meta):
        part = TorchSDPABackend._decode(q.index_select(0, rows), kv_cache, group, scale, batch_invariant=True)
        out.index_copy_(0, rows, part)
    return out


def query_groups(meta: AttentionMetadata) -> list[tuple[torch.Tensor, AttentionMetadata]]:
    """(rows [n] of the step's tokens, decode-style metadata of their contexts padded to one length), built once
    per step (and window) and shared by every layer."""
    if meta._invariant_groups is None:
        meta._invariant_groups = _build_groups(meta)
    return meta._invariant_groups


def _build_groups(meta: AttentionMetadata) -> list[tuple[torch.Tensor, AttentionMetadata]]:
    by_length: dict[int, list[tuple[int, torch.Tensor]]] = {}  # padded length -> (row, context slots)
    row = 0
    for seq in meta._seqs:  # in the step's token order: decodes first, then prefill chunks
        total = seq.num_computed_tokens + seq.num_new_tokens
        slots = _slots(seq.block_table, 0, total, meta._block_size)  # positions 0 .. total - 1
        for pos in range(seq.num_computed_tokens, total):
            first = 0 if meta.window is None else max(0, pos - meta.window + 1)
            context = slots[first:pos + 1]
            by_length.setdefault(-(-len(context) // BUCKET) * BUCKET, []).append((row, context))
            row += 1
    groups = []
    for length, items in sorted(by_length.items()):
        per_call = max(1, MAX_KEYS_PER_CALL // length)
        for start in range(0, len(items), per_call):
            groups.append(_group(items[start:start + per_call], length, meta._device))
    return groups


def _group(items: list[tuple[int, torch.Tensor]], length: int, device) -> tuple[torch.Tensor, AttentionMetadata]:
    gather = torch.empty(len(items), length, dtype=torch.long)
    lens = torch.tensor([len(context) for _, context in items])
    for i, (_, context) in enumerate(items):
        gather[i, :len(context)] = context
        gather[i, len(context):] = context[0]  # padding points at a real slot; the mask hides it
    padding = torch.arange(length)[None, :] >= lens[:, None]  # [n, length], True = no key there
    rows = torch.tensor([r for r, _ in items], dtype=torch.long, device=device)
    group = AttentionMetadata(slot_mapping=rows, num_decode_tokens=len(items), decode_gather_index=gather.to(device),
                              decode_padding=padding[:, None, None, :].to(device), prefills=[])
    return rows, group
