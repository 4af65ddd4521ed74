"""Batch-invariant attention: a query's output is bit-identical whatever else is in the step (decode padding,
prefill chunk splits), and a prefill row equals the decode of the same position."""

from __future__ import annotations

import pytest
import torch

from tokenmill.model.attention import AttentionMetadata, SeqSlice, TorchSDPABackend

BS, H, HKV, D = 16, 9, 3, 64


@pytest.fixture(scope="module")
def cache() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(3000 * BS, HKV, D, generator=g), torch.randn(3000 * BS, HKV, D, generator=g)


def _attend(cache, seqs: list[SeqSlice], q: torch.Tensor, batch_invariant: bool) -> torch.Tensor:
    meta = AttentionMetadata.build(seqs, BS, "cpu", batch_invariant=batch_invariant)
    k, v = cache[0][meta.slot_mapping].clone(), cache[1][meta.slot_mapping].clone()  # rewrite what is there
    return TorchSDPABackend().forward(q, k, v, cache, meta, scale=D ** -0.5)


def _other(i: int, length: int) -> SeqSlice:
    first = 10 + 130 * i
    return SeqSlice(list(range(first, first + (length + BS - 1) // BS)), length - 1, 1)


@pytest.mark.parametrize("other_len", [40, 300, 1000])
@pytest.mark.parametrize("count", [1, 15])
def test_a_decode_does_not_depend_on_the_other_decodes(cache, other_len, count):
    q = torch.randn(count + 1, H, D, generator=torch.Generator().manual_seed(1))
    target = SeqSlice([0, 1, 2], 36, 1)  # 37 positions
    alone = _attend(cache, [target], q[:1], batch_invariant=True)
    for pos in (0, count):
        seqs = [_other(i, other_len) for i in range(count)]
        seqs.insert(pos, target)
        qq = torch.cat([q[1:1 + pos], q[:1], q[1 + pos:]])
        assert torch.equal(_attend(cache, seqs, qq, batch_invariant=True)[pos], alone[0])


def test_a_prompt_gives_the_same_outputs_in_one_chunk_in_two_and_as_decodes(cache):
    q = torch.randn(37, H, D, generator=torch.Generator().manual_seed(2))
    one = _attend(cache, [SeqSlice([0, 1, 2], 0, 37)], q, batch_invariant=True)
    first = _attend(cache, [SeqSlice([0, 1, 2], 0, 20)], q[:20], batch_invariant=True)
    second = _attend(cache, [SeqSlice([0, 1, 2], 20, 17)], q[20:], batch_invariant=True)
    assert torch.equal(torch.cat([first, second]), one)
    last = _attend(cache, [SeqSlice([0, 1, 2], 36, 1)], q[36:], batch_invariant=True)
    assert torch.equal(last[0], one[36])
    # and the invariant mode computes the same attention as the default path, to rounding
    default = _attend(cache, [SeqSlice([0, 1, 2], 0, 37)], q, batch_invariant=False)
    torch.testing.assert_close(one, default, rtol=1e-4, atol=1e-5)
