"""Paged attention (AttentionMetadata + TorchSDPABackend) against a naive per-sequence attention."""

from __future__ import annotations

import pytest
import torch

from tokenmill.model.attention import AttentionMetadata, SeqSlice, TorchSDPABackend

H, HKV, D = 4, 2, 8
BLOCK_SIZE = 4
NUM_BLOCKS = 32
SCALE = D ** -0.5


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first_pos: int) -> torch.Tensor:
    """q [n, H, D] at positions first_pos.., k/v [first_pos + n, HKV, D] -> [n, H, D], causal, GQA."""
    k = k.repeat_interleave(H // HKV, dim=1)  # [L, H, D]
    v = v.repeat_interleave(H // HKV, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * SCALE  # [H, n, L]
    q_pos = torch.arange(first_pos, first_pos + q.shape[0])[:, None]
    scores = scores.masked_fill(torch.arange(k.shape[0])[None, :] > q_pos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


class Case:
    """A sequence with random K/V for all its positions, num_cached of them already in the cache."""

    def __init__(self, length: int, num_new: int, blocks: list[int], gen: torch.Generator) -> None:
        self.k = torch.randn(length, HKV, D, generator=gen)
        self.v = torch.randn(length, HKV, D, generator=gen)
        self.q = torch.randn(num_new, H, D, generator=gen)
        self.num_cached, self.num_new, self.blocks = length - num_new, num_new, blocks

    def slots(self, start: int, stop: int) -> list[int]:
        return [self.blocks[i // BLOCK_SIZE] * BLOCK_SIZE + i % BLOCK_SIZE for i in range(start, stop)]


def make_cases(specs: list[tuple[int, int]], seed: int = 0) -> list[Case]:
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(NUM_BLOCKS, generator=gen).tolist()  # shuffled, non-contiguous block tables
    return [Case(length, new, perm[i * 6:(i + 1) * 6], gen) for i, (length, new) in enumerate(specs)]


def run(cases: list[Case], dtype: torch.dtype = torch.float32):
    """Prefill each case's cached part into the cache, then attend the new tokens in one batch."""
    k_cache = torch.zeros(NUM_BLOCKS * BLOCK_SIZE, HKV, D, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    for c in cases:
        idx = torch.tensor(c.slots(0, c.num_cached), dtype=torch.long)
        k_cache[idx], v_cache[idx] = c.k[:c.num_cached].to(dtype), c.v[:c.num_cached].to(dtype)
    meta = AttentionMetadata.build([SeqSlice(c.blocks, c.num_cached, c.num_new) for c in cases], BLOCK_SIZE, "cpu")
    q = torch.cat([c.q for c in cases]).to(dtype)
    k = torch.cat([c.k[c.num_cached:] for c in cases]).to(dtype)
    v = torch.cat([c.v[c.num_cached:] for c in cases]).to(dtype)
    out = TorchSDPABackend().forward(q, k, v, (k_cache, v_cache), meta, SCALE)
    return out, meta, k_cache, v_cache


def test_mixed_batch_matches_naive_attention():
    # three decodes (contexts 1, 7 and 13 tokens), a chunked prefill at position 9, a fresh prefill
    cases = make_cases([(2, 1), (8, 1), (14, 1), (14, 5), (6, 6)])
    out, meta, _, _ = run(cases)
    assert meta.num_decode_tokens == 3 and len(meta.prefills) == 2
    assert not meta.decode_unpadded  # contexts of 1, 7 and 13 tokens: two rows padded
    assert meta.prefills[1].gather_index is None  # fresh prefill attends to its own K/V only
    start = 0
    for c in cases:
        expected = naive_attention(c.q, c.k, c.v, c.num_cached)
        torch.testing.assert_close(out[start:start + c.num_new], expected, atol=1e-5, rtol=1e-5)
        start += c.num_new


@pytest.mark.parametrize("specs", [[(9, 1)], [(7, 1), (7, 1), (7, 1)]], ids=["one", "same-length"])
def test_unpadded_decodes_match_naive_attention(specs):
    # one decode runs unmasked (SDPA); decodes of one length have nothing padded either but take the matmuls
    cases = make_cases(specs, seed=4)
    out, meta, _, _ = run(cases)
    assert meta.decode_unpadded == (len(cases) == 1)
    for i, c in enumerate(cases):
        torch.testing.assert_close(out[i:i + 1], naive_attention(c.q, c.k, c.v, c.num_cached), atol=1e-5, rtol=1e-5)


def test_new_keys_and_values_land_in_their_slots():
    cases = make_cases([(5, 1), (9, 4)], seed=1)
    _, meta, k_cache, v_cache = run(cases)
    slots = cases[0].slots(4, 5) + cases[1].slots(5, 9)
    assert meta.slot_mapping.tolist() == slots
    torch.testing.assert_close(k_cache[slots], torch.cat([cases[0].k[4:], cases[1].k[5:]]))
    torch.testing.assert_close(v_cache[slots], torch.cat([cases[0].v[4:], cases[1].v[5:]]))


def test_one_token_prompt_first_and_one_token_chunk_after_a_prefill():
    # a 1-token fresh prompt among the decodes is a decode with a context of one; a 1-token chunk
    # after a prefill is a prefill slice that gathers its context
    cases = make_cases([(1, 1), (7, 1), (5, 5), (11, 1)], seed=2)
    out, meta, _, _ = run(cases)
    assert meta.num_decode_tokens == 2 and len(meta.prefills) == 2
    start = 0
    for c in cases:
        torch.testing.assert_close(out[start:start + c.num_new], naive_attention(c.q, c.k, c.v, c.num_cached),
                                   atol=1e-5, rtol=1e-5)
        start += c.num_new


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_cache_close_to_float32(dtype):
    cases = make_cases([(6, 1), (10, 3), (4, 4)], seed=3)
    out, _, k_cache, _ = run(cases, dtype)
    assert out.dtype == dtype and k_cache.dtype == dtype
    start = 0
    for c in cases:
        expected = naive_attention(c.q, c.k, c.v, c.num_cached)
        torch.testing.assert_close(out[start:start + c.num_new].float(), expected, atol=3e-2, rtol=3e-2)
        start += c.num_new
