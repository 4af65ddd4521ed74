"""Attention over the paged KV cache.

The cache of one layer is two tensors ``k_cache, v_cache: [num_slots, num_kv_heads, head_dim]``
where slot = block_id * block_size + offset. A step's tokens are flattened into one batch:
first the decode tokens (one query per sequence), then the prefill chunks. The model runner
builds one ``AttentionMetadata`` per step; every layer reuses it.

The backend interface is ``AttentionBackend.forward``; ``TorchSDPABackend`` implements it with
``torch.nn.functional.scaled_dot_product_attention`` for prefill chunks and two batched matmuls
for the decodes (faster than SDPA for one query per sequence). It gathers only the slots the batch
uses (never the whole cache): per decode step and layer that is
``2 * batch * padded_context_len * num_kv_heads * head_dim`` elements.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

KVCache = tuple[torch.Tensor, torch.Tensor]  # (k_cache, v_cache), each [num_slots, Hkv, D]


@dataclass
class SeqSlice:
    """What attention needs to know about one sequence in this step."""

    block_table: list[int]
    num_computed_tokens: int  # tokens already in the cache before this step
    num_new_tokens: int  # tokens computed in this step (1 for a decode)


@dataclass
class PrefillSlice:
    """One prefill chunk inside the flattened batch."""

    query_start: int  # offset in the flattened token dimension
    query_len: int
    # None when the chunk starts at position 0: attend to the fresh K/V (causally when attn_mask is None).
    gather_index: torch.Tensor | None  # [context_len + query_len] slots, in position order
    attn_mask: torch.Tensor | None  # [query_len, context_len + query_len] bool, True = attend


@dataclass
class AttentionMetadata:
    """Per-step inputs of attention, shared by all layers."""

    slot_mapping: torch.Tensor  # [T] slot where each new token's K/V is written
    num_decode_tokens: int  # the first num_decode_tokens tokens are single-token decodes
    decode_gather_index: torch.Tensor | None  # [Bd, Kmax] slots of each decode's context (padded)
    decode_padding: torch.Tensor | None  # [Bd, 1, 1, Kmax] bool, True = padding no query may attend
    prefills: list[PrefillSlice]
    # tensors derived from the above on first use and then shared by every layer of the step
    _derived: dict[str, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)
    # what build() was given, for the sliding-window variants (windowed()), built once per step and window
    _seqs: list[SeqSlice] = field(default_factory=list, repr=False, compare=False)
    _block_size: int = field(default=1, repr=False, compare=False)
    _device: torch.device | str = field(default="cpu", repr=False, compare=False)
    _windowed: dict[int, AttentionMetadata] = field(default_factory=dict, repr=False, compare=False)

    def decode_rows(self, num_kv_heads: int) -> torch.Tensor:
        """[Bd * Hkv * Kmax] rows of a layer's cache seen as [num_slots * Hkv, D], in [Bd, Hkv, Kmax] order."""
        if "rows" not in self._derived:
            idx = self.decode_gather_index  # [Bd, Kmax]
            heads = torch.arange(num_kv_heads, device=idx.device)
            self._derived["rows"] = (idx[:, None, :] * num_kv_heads + heads[None, :, None]).view(-1)
        return self._derived["rows"]

    def windowed(self, window: int) -> AttentionMetadata:
        """This step's metadata for a sliding-window layer: each query attends only to the last ``window``
        positions (itself included), so decodes gather only those slots and prefill masks cut older keys.
        Built on first use and then shared by every layer with that window."""
        if window not in self._windowed:
            self._windowed[window] = AttentionMetadata.build(self._seqs, self._block_size, self._device, window)
        return self._windowed[window]

    @staticmethod
    def build(seqs: list[SeqSlice], block_size: int, device: torch.device | str,
              window: int | None = None) -> AttentionMetadata:
        """Build the metadata for sequences given decode-first (``num_new_tokens == 1`` first); with
        ``window``, for layers that see only the last ``window`` positions (see ``windowed``)."""
        slots: list[int] = []
        decode_contexts: list[list[int]] = []
        prefills: list[PrefillSlice] = []
        offset = 0
        for seq in seqs:
            total = seq.num_computed_tokens + seq.num_new_tokens
            # the earliest position any query of this step may see: query p sees keys p - window < k <= p
            first = 0 if window is None else max(0, seq.num_computed_tokens - window + 1)
            seq_slots = _slots(seq.block_table, first, total, block_size)  # positions first .. total - 1
            slots.extend(seq_slots[seq.num_computed_tokens - first:])
            if seq.num_new_tokens == 1 and not prefills:
                decode_contexts.append(seq_slots)
            else:
                prefills.append(_prefill_slice(seq, seq_slots, first, offset, device, window))
            offset += seq.num_new_tokens
        decode_gather, decode_padding = _decode_tensors(decode_contexts, device)
        return AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
            num_decode_tokens=len(decode_contexts),
            decode_gather_index=decode_gather,
            decode_padding=decode_padding,
            prefills=prefills,
            _seqs=seqs, _block_size=block_size, _device=device,
        )


def _slots(block_table: list[int], start: int, end: int, block_size: int) -> list[int]:
    return [block_table[i // block_size] * block_size + i % block_size for i in range(start, end)]


def _prefill_slice(seq: SeqSlice, seq_slots: list[int], first: int, offset: int, device,
                   window: int | None) -> PrefillSlice:
    ctx, q = seq.num_computed_tokens, seq.num_new_tokens
    if ctx == 0 and (window is None or q <= window):  # causal over the fresh K/V: nothing to gather or mask
        return PrefillSlice(offset, q, None, None)
    # query i sits at position ctx + i and sees keys first .. ctx + i (and none at or before ctx + i - window)
    key_pos = torch.arange(first, ctx + q, device=device)
    query_pos = torch.arange(ctx, ctx + q, device=device)
    mask = key_pos[None, :] <= query_pos[:, None]
    if window is not None:
        mask &= key_pos[None, :] > query_pos[:, None] - window
    # a chunk that starts at position 0 attends to its fresh K/V, only masked
    gather = None if ctx == 0 else torch.tensor(seq_slots, dtype=torch.long, device=device)
    return PrefillSlice(offset, q, gather, mask)


def _decode_tensors(contexts: list[list[int]], device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if not contexts:
        return None, None
    kmax = max(len(c) for c in contexts)
    gather = torch.zeros(len(contexts), kmax, dtype=torch.long)
    lens = torch.tensor([len(c) for c in contexts])
    for i, c in enumerate(contexts):
        gather[i, :len(c)] = torch.tensor(c, dtype=torch.long)
    padding = torch.arange(kmax)[None, :] >= lens[:, None]  # [Bd, Kmax]
    return gather.to(device), padding[:, None, None, :].to(device)


class AttentionBackend(Protocol):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache,
                meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """q: [T, H, D], k/v: [T, Hkv, D] for the new tokens -> output [T, H, D].

        Writes the new k/v into ``kv_cache`` at ``meta.slot_mapping`` first."""
        ...


class TorchSDPABackend:
    """Paged attention in plain torch ops (CPU and CUDA): SDPA for prefill chunks, matmuls for decodes."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache,
                meta: AttentionMetadata, scale: float) -> torch.Tensor:
        k_cache, v_cache = kv_cache
        k_cache.index_copy_(0, meta.slot_mapping, k.to(k_cache.dtype))
        v_cache.index_copy_(0, meta.slot_mapping, v.to(v_cache.dtype))
        nd = meta.num_decode_tokens
        if not meta.prefills:  # all decodes: no output buffer to fill piecewise
            return self._decode(q, k_cache, v_cache, meta, scale)
        out = torch.empty_like(q)
        if nd:
            out[:nd] = self._decode(q[:nd], k_cache, v_cache, meta, scale)
        for p in meta.prefills:
            sl = slice(p.query_start, p.query_start + p.query_len)
            out[sl] = self._prefill(q[sl], k[sl], v[sl], k_cache, v_cache, p, scale)
        return out

    @staticmethod
    def _decode(q, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        # Two batched matmuls rather than SDPA: for one query per sequence, torch's CPU SDPA with a
        # mask and GQA was several times slower (and ~10x in bfloat16 on AVX2).
        bd, h, d = q.shape
        hkv = k_cache.shape[1]
        # Gather each decode's context straight into [Bd, Hkv, Kmax, D] (one copy, contiguous
        # batches for the matmuls) by selecting rows of the cache seen as [num_slots * Hkv, D];
        # index_select copies whole rows, ~10x faster on CPU than advanced indexing.
        kmax = meta.decode_gather_index.shape[1]
        rows = meta.decode_rows(hkv)  # [Bd * Hkv * Kmax]
        keys = k_cache.view(-1, d).index_select(0, rows).view(bd, hkv, kmax, d).to(q.dtype)
        values = v_cache.view(-1, d).index_select(0, rows).view(bd, hkv, kmax, d).to(q.dtype)
        # GQA: the G = H / Hkv query heads of a group share their K/V head, no repeat needed
        qg = (q * scale).reshape(bd, hkv, h // hkv, d)  # [Bd, Hkv, G, D]
        scores = torch.matmul(qg, keys.transpose(-1, -2))  # [Bd, Hkv, G, Kmax]
        scores = scores.masked_fill(meta.decode_padding, float("-inf"))  # [Bd, 1, 1, Kmax]
        probs = scores.softmax(-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(probs, values).reshape(bd, h, d)  # [Bd, H, D]

    @staticmethod
    def _prefill(q, k, v, k_cache, v_cache, p: PrefillSlice, scale: float) -> torch.Tensor:
        qh = q.transpose(0, 1)[None]  # [1, H, q, D]
        if p.gather_index is None:
            keys, values = k.transpose(0, 1)[None], v.transpose(0, 1)[None]
            out = F.scaled_dot_product_attention(qh, keys, values, attn_mask=p.attn_mask,
                                                 is_causal=p.attn_mask is None, scale=scale, enable_gqa=True)
        else:
            keys = k_cache.index_select(0, p.gather_index).transpose(0, 1)[None].to(q.dtype)
            values = v_cache.index_select(0, p.gather_index).transpose(0, 1)[None].to(q.dtype)
            out = F.scaled_dot_product_attention(qh, keys, values, attn_mask=p.attn_mask, scale=scale,
                                                 enable_gqa=True)
        return out[0].transpose(0, 1)  # [q, H, D]
