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

The cache may hold K/V in a narrower type than the model computes in (``--kv-cache-dtype``): a 16-bit
float cache is cast on write and the gathered rows are cast back; an int8 cache (``Int8KVCache``) stores
``round(x / s)`` with one float32 scale ``s = max|x| / 127`` per token and head, and the decode folds the
scales into the attention scores and probabilities instead of dequantizing every gathered row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F


class Int8KVCache(NamedTuple):
    """One layer's int8 K/V cache: ``x = code * scale`` per token and head (``quantize_kv``)."""

    k: torch.Tensor  # int8 [num_slots, Hkv, D]
    v: torch.Tensor  # int8 [num_slots, Hkv, D]
    scales: torch.Tensor  # float32 [num_slots, Hkv, 2]: K's scale, V's scale (one gather reads both)


# (k_cache, v_cache), each [num_slots, Hkv, D] in a float type, or an Int8KVCache
KVCache = tuple[torch.Tensor, torch.Tensor] | Int8KVCache


def quantize_kv(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """k, v [T, Hkv, D] -> (int8 codes [2, T, Hkv, D], float32 scales [T, Hkv, 2]): symmetric per token and
    head, ``scale = max|x| / 127`` (an all-zero head gets a tiny scale and zero codes)."""
    kv = torch.stack((k, v)).float()  # [2, T, Hkv, D]
    amax = kv.abs().amax(-1).clamp_min_(1e-30)  # [2, T, Hkv]
    codes = (kv * (127 / amax)[..., None]).round_().to(torch.int8)  # |x| / amax <= 1: no clamp needed
    return codes, (amax / 127).permute(1, 2, 0)


def write_kv(kv_cache: KVCache, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Store the step's k/v [T, Hkv, D] at ``slots`` [T], converted to the cache's type."""
    if isinstance(kv_cache, Int8KVCache):
        codes, scales = quantize_kv(k, v)
        kv_cache.k.index_copy_(0, slots, codes[0])
        kv_cache.v.index_copy_(0, slots, codes[1])
        kv_cache.scales.index_copy_(0, slots, scales)
        return
    k_cache, v_cache = kv_cache
    k_cache.index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.index_copy_(0, slots, v.to(v_cache.dtype))


def stored_kv(kv_cache: KVCache, k: torch.Tensor, v: torch.Tensor,
              dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """k, v [T, Hkv, D] as a later ``gather_kv`` of their slots will read them: rounded to the cache's type.

    A fresh prompt attends to its own K/V through this, so that it computes exactly what the same prompt
    computes when its K/V come from the prefix cache or from an earlier chunk: a request's output does not
    depend on whether its prefix was cached."""
    if isinstance(kv_cache, Int8KVCache):
        codes, scales = quantize_kv(k, v)
        scales = scales.to(dtype)  # [T, Hkv, 2]
        return _convert(codes[0], dtype) * scales[..., 0:1], _convert(codes[1], dtype) * scales[..., 1:2]
    cache_dtype = kv_cache[0].dtype
    if cache_dtype == dtype:
        return k, v
    return k.to(cache_dtype).to(dtype), v.to(cache_dtype).to(dtype)


def gather_kv(kv_cache: KVCache, slots: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V [len(slots), Hkv, D] of the given slots, dequantized to ``dtype``."""
    if isinstance(kv_cache, Int8KVCache):
        scales = kv_cache.scales.index_select(0, slots).to(dtype)  # [n, Hkv, 2]
        return (_convert(kv_cache.k.index_select(0, slots), dtype) * scales[..., 0:1],
                _convert(kv_cache.v.index_select(0, slots), dtype) * scales[..., 1:2])
    k_cache, v_cache = kv_cache
    return _convert(k_cache.index_select(0, slots), dtype), _convert(v_cache.index_select(0, slots), dtype)


def _convert(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in ``dtype``. Into a fresh tensor with copy_: on CPU, ``.to()`` from int8 and 16-bit floats to float32
    took 1.5-3x longer than copy_ (torch 2.13, 52k elements)."""
    return x if x.dtype == dtype else torch.empty_like(x, dtype=dtype).copy_(x)


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
    # one decode sequence: no row to pad, so attention runs unmasked. Known on the host, so a compiled
    # decode branches on a Python bool, not on a tensor read back mid-graph. (Batches whose contexts are all
    # one length need no padding either, but gained only 1-5% unmasked and would need their own compiled graph.)
    decode_unpadded: bool = False
    # batch-invariant mode: every query is computed alone over its padded context (model/batch_invariant.py)
    batch_invariant: bool = False
    window: int | None = None  # the sliding window these metadata were built for (None: full attention)
    # tensors derived from the above on first use and then shared by every layer of the step
    _derived: dict[str, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)
    # what build() was given, for the sliding-window variants (windowed()), built once per step and window
    _seqs: list[SeqSlice] = field(default_factory=list, repr=False, compare=False)
    _block_size: int = field(default=1, repr=False, compare=False)
    _device: torch.device | str = field(default="cpu", repr=False, compare=False)
    _windowed: dict[int, AttentionMetadata] = field(default_factory=dict, repr=False, compare=False)
    _invariant_groups: list | None = field(default=None, repr=False, compare=False)

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
            self._windowed[window] = AttentionMetadata.build(self._seqs, self._block_size, self._device, window,
                                                             self.batch_invariant)
        return self._windowed[window]

    @staticmethod
    def build(seqs: list[SeqSlice], block_size: int, device: torch.device | str,
              window: int | None = None, batch_invariant: bool = False) -> AttentionMetadata:
        """Build the metadata for sequences given decode-first (``num_new_tokens == 1`` first); with
        ``window``, for layers that see only the last ``window`` positions (see ``windowed``)."""
        # Work per block, not per token: a sequence's slots come from its block ids in one tensor op,
        # so the Python cost of a step grows with blocks (context / block_size), not with context.
        decodes = seqs[:_num_leading_decodes(seqs)]
        slot_parts: list[torch.Tensor] = []
        decode_gather = decode_padding = None
        if decodes:
            decode_gather, decode_padding, decode_slots = _decode_tensors(decodes, block_size, window)
            slot_parts.append(decode_slots)
        prefills: list[PrefillSlice] = []
        offset = len(decodes)
        for seq in seqs[len(decodes):]:
            total = seq.num_computed_tokens + seq.num_new_tokens
            # the earliest position any query of this step may see: query p sees keys p - window < k <= p
            first = 0 if window is None else max(0, seq.num_computed_tokens - window + 1)
            seq_slots = _slots(seq.block_table, first, total, block_size)  # positions first .. total - 1
            slot_parts.append(seq_slots[seq.num_computed_tokens - first:])
            prefills.append(_prefill_slice(seq, seq_slots, first, offset, device, window))
            offset += seq.num_new_tokens
        slot_mapping = slot_parts[0] if len(slot_parts) == 1 else torch.cat(slot_parts) if slot_parts else \
            torch.zeros(0, dtype=torch.long)
        return AttentionMetadata(
            slot_mapping=slot_mapping.to(device),
            num_decode_tokens=len(decodes),
            decode_gather_index=None if decode_gather is None else decode_gather.to(device),
            decode_padding=None if decode_padding is None else decode_padding.to(device),
            prefills=prefills, decode_unpadded=len(decodes) == 1, batch_invariant=batch_invariant, window=window,
            _seqs=seqs, _block_size=block_size, _device=device,
        )


def _num_leading_decodes(seqs: list[SeqSlice]) -> int:
    """How many sequences at the front are single-token decodes (they come first in a step's batch)."""
    n = 0
    while n < len(seqs) and seqs[n].num_new_tokens == 1:
        n += 1
    return n


def _slots(block_table: list[int], start: int, end: int, block_size: int) -> torch.Tensor:
    """Cache slots [end - start] of positions start .. end - 1, built from the blocks they fall in."""
    first_block, last_block = start // block_size, (end - 1) // block_size + 1
    blocks = torch.tensor(block_table[first_block:last_block], dtype=torch.long)
    slots = (blocks[:, None] * block_size + torch.arange(block_size)).view(-1)
    skip = start - first_block * block_size
    return slots[skip:skip + end - start]


def _prefill_slice(seq: SeqSlice, seq_slots: torch.Tensor, first: int, offset: int, device,
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
    gather = None if ctx == 0 else seq_slots.to(device)
    return PrefillSlice(offset, q, gather, mask)


def _decode_tensors(decodes: list[SeqSlice], block_size: int, window: int | None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gather [Bd, Kmax] slots of each decode's context, padding [Bd, 1, 1, Kmax] True = no key there,
    slots [Bd] where each decode's new token goes), from the decodes' block tables padded to one tensor."""
    totals = torch.tensor([s.num_computed_tokens + 1 for s in decodes])  # positions 0 .. total - 1 exist
    num_blocks = max(len(s.block_table) for s in decodes)
    table = torch.tensor([s.block_table + [0] * (num_blocks - len(s.block_table)) for s in decodes],
                         dtype=torch.long)
    slots = (table[:, :, None] * block_size + torch.arange(block_size)).view(len(decodes), -1)  # [Bd, blocks*bs]
    new_slots = slots.gather(1, (totals - 1)[:, None]).view(-1)
    if window is None:
        lens, kmax = totals, int(totals.max())
        gather = slots[:, :kmax]
    else:  # only the last ``window`` positions: each row starts at its own first visible position
        firsts = (totals - window).clamp(min=0)
        lens = totals - firsts
        kmax = int(lens.max())
        cols = (firsts[:, None] + torch.arange(kmax)).clamp(max=slots.shape[1] - 1)
        gather = slots.gather(1, cols)
    padding = torch.arange(kmax)[None, :] >= lens[:, None]  # [Bd, Kmax]
    # padded columns point at real slots (any: no query attends to them), so the gather stays in range
    return gather.contiguous(), padding[:, None, None, :], new_slots


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
        write_kv(kv_cache, meta.slot_mapping, k, v)
        if meta.batch_invariant:
            from tokenmill.model.batch_invariant import invariant_attention  # it builds on this backend

            return invariant_attention(q, kv_cache, meta, scale)
        nd = meta.num_decode_tokens
        if not meta.prefills:  # all decodes: no output buffer to fill piecewise
            return self._decode(q, kv_cache, meta, scale)
        out = torch.empty_like(q)
        if nd:
            out[:nd] = self._decode(q[:nd], kv_cache, meta, scale)
        for p in meta.prefills:
            sl = slice(p.query_start, p.query_start + p.query_len)
            out[sl] = self._prefill(q[sl], k[sl], v[sl], kv_cache, p, scale)
        return out

    @staticmethod
    def _decode(q, kv_cache: KVCache, meta: AttentionMetadata, scale: float,
                batch_invariant: bool = False) -> torch.Tensor:
        """One query per sequence over its gathered context. ``batch_invariant``: with matmuls, whose result for
        one sequence does not depend on how many the call holds (SDPA's CPU kernel splits its work by batch)."""
        bd, h, d = q.shape
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        hkv = k_cache.shape[1]
        # Gather each decode's context straight into [Bd, Hkv, Kmax, D] (one copy, contiguous
        # batches for the matmuls) by selecting rows of the cache seen as [num_slots * Hkv, D];
        # index_select copies whole rows, ~10x faster on CPU than advanced indexing.
        kmax = meta.decode_gather_index.shape[1]
        rows = meta.decode_rows(hkv)  # [Bd * Hkv * Kmax]
        keys = _convert(k_cache.view(-1, d).index_select(0, rows).view(bd, hkv, kmax, d), q.dtype)
        values = _convert(v_cache.view(-1, d).index_select(0, rows).view(bd, hkv, kmax, d), q.dtype)
        # GQA: the G = H / Hkv query heads of a group share their K/V head (no repeat needed): G queries
        # over the same keys
        qg = q.reshape(bd, hkv, h // hkv, d)  # [Bd, Hkv, G, D]
        int8 = isinstance(kv_cache, Int8KVCache)
        if not int8 and not batch_invariant and meta.decode_unpadded:
            # One sequence: unmasked SDPA, ~1.5x faster per layer than the matmuls below; with a padding mask
            # it was no faster at 4 to 32 sequences
            out = F.scaled_dot_product_attention(qg, keys, values, scale=scale)
            return out.reshape(bd, h, d)  # [Bd, H, D]
        scores = torch.matmul(qg * scale, keys.transpose(-1, -2))  # [Bd, Hkv, G, Kmax]
        if int8:
            # q . (c * s) = (q . c) * s, and sum_j p_j (c_j * s_j) = sum_j (p_j * s_j) c_j: scale the G scores
            # and probabilities of a key, not its D elements
            scales = kv_cache.scales.view(-1, 2).index_select(0, rows).to(q.dtype)  # [Bd * Hkv * Kmax, 2]
            scales = scales.view(bd, hkv, 1, kmax, 2)
            scores = scores * scales[..., 0]
        scores = scores.masked_fill(meta.decode_padding, float("-inf"))  # [Bd, 1, 1, Kmax]
        probs = scores.softmax(-1, dtype=torch.float32).to(q.dtype)
        if int8:
            probs = probs * scales[..., 1]
        return torch.matmul(probs, values).reshape(bd, h, d)  # [Bd, H, D]

    @staticmethod
    def _prefill(q, k, v, kv_cache: KVCache, p: PrefillSlice, scale: float) -> torch.Tensor:
        qh = q.transpose(0, 1)[None]  # [1, H, q, D]
        if p.gather_index is None:  # the fresh K/V, as the cache holds them (see stored_kv)
            keys, values = stored_kv(kv_cache, k, v, q.dtype)
            keys, values = keys.transpose(0, 1)[None], values.transpose(0, 1)[None]
            out = F.scaled_dot_product_attention(qh, keys, values, attn_mask=p.attn_mask,
                                                 is_causal=p.attn_mask is None, scale=scale, enable_gqa=True)
        else:
            keys, values = gather_kv(kv_cache, p.gather_index, q.dtype)  # [context + q, Hkv, D] each
            out = F.scaled_dot_product_attention(qh, keys.transpose(0, 1)[None], values.transpose(0, 1)[None],
                                                 attn_mask=p.attn_mask, scale=scale, enable_gqa=True)
        return out[0].transpose(0, 1)  # [q, H, D]

