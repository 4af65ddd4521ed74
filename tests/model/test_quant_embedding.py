"""The quantized embedding lookup (QuantEmbedding): rows gathered from the packed GGUF table are exactly the
rows a float copy of the whole table gives, and no float copy is kept."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import quantize as gguf_quantize

from tokenmill.model.base import FloatEmbedding, Weights
from tokenmill.model.gguf import RawQuantTensor, read_gguf
from tokenmill.model.quant import QuantEmbedding
from tokenmill.model.source import resolve_model

NAME = "model.embed_tokens.weight"


def _lookups(raw: RawQuantTensor, ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows of the quantized lookup, rows of the float copy) that a model in ``dtype`` would embed."""
    weights = Weights({NAME: raw}, dtype, torch.device("cpu"))
    quantized = weights.embedding(NAME)
    assert isinstance(quantized, QuantEmbedding)
    return quantized(ids), FloatEmbedding(weights.float(NAME))(ids)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_default_model_q8_0_table_gives_the_float_copy_rows(dtype):
    gf = read_gguf(resolve_model("smollm2-135m-instruct")[0])
    info = gf.tensors["token_embd.weight"]
    assert info.ggml_type == GGMLQuantizationType.Q8_0
    rows = 4096  # whole rows of the 49152-row table keep the float copy small; ids cover all of them
    raw = RawQuantTensor(info.ggml_type, info.data[:rows], (rows, info.shape[1]))
    ids = torch.cat([torch.arange(rows), torch.randint(0, rows, (256,), generator=torch.Generator().manual_seed(0))])
    got, expected = _lookups(raw, ids, dtype)
    assert got.dtype == expected.dtype == dtype
    assert torch.equal(got, expected)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q5_0", "Q8_0"])
def test_q4_q5_q8_tables_give_the_float_copy_rows(kind):
    w = np.random.default_rng(1).standard_normal((300, 64)).astype(np.float32)
    w[7] = 0.5  # a constant row (Q4_1's scale is 0 there)
    ggml_type = GGMLQuantizationType[kind]
    raw = RawQuantTensor(ggml_type, gguf_quantize(w, ggml_type).reshape(300, -1), (300, 64))
    ids = torch.tensor([0, 7, 299, 7, 150, 3])
    got, expected = _lookups(raw, ids, torch.float32)
    assert torch.equal(got, expected)


def test_table_is_kept_packed_not_as_floats():
    gf = read_gguf(resolve_model("smollm2-135m-instruct")[0])
    info = gf.tensors["token_embd.weight"]
    vocab, hidden = info.shape
    embed = Weights({NAME: RawQuantTensor(info.ggml_type, info.data, info.shape)}, torch.float32,
                    torch.device("cpu")).embedding(NAME)
    kept = sum(t.numel() * t.element_size() for t in embed.buffers())
    # one int8 per weight plus a float32 scale per 32: the file's 34 bytes per 32 weights, scales widened
    assert kept == vocab * hidden + vocab * hidden // 32 * 4
    assert kept < vocab * hidden * 4 / 3.5


def test_tied_quantized_lm_head_gives_exact_float32_values_for_each_rows_best_logits():
    # the packed lm_head's logits are bfloat16-rounded (ties on the 0.125 grid); refine_top_logits recomputes
    # each row's best REFINED_LOGITS in float32 from the table's rows and leaves the rest as they were
    from tokenmill.model.base import REFINED_LOGITS, refine_top_logits

    gf = read_gguf(resolve_model("smollm2-135m-instruct")[0])
    info = gf.tensors["token_embd.weight"]
    rows = 2048
    raw = RawQuantTensor(info.ggml_type, info.data[:rows], (rows, info.shape[1]))
    weights = Weights({NAME: raw}, torch.float32, torch.device("cpu"))
    table, dense = weights.embedding(NAME), weights.float(NAME)  # [V, H] float32: the exact values
    hidden = torch.randn(3, dense.shape[1], generator=torch.Generator().manual_seed(0)) * 4
    exact = hidden @ dense.T  # [3, V]
    rounded = exact.to(torch.bfloat16).float()
    refined = rounded.clone()
    refine_top_logits(refined, hidden, table)
    top = rounded.topk(REFINED_LOGITS, dim=-1).indices
    torch.testing.assert_close(refined.gather(1, top), exact.gather(1, top), rtol=0, atol=1e-4)
    untouched = torch.ones_like(refined, dtype=torch.bool).scatter_(1, top, False)
    assert torch.equal(refined[untouched], rounded[untouched])
    assert (refined.gather(1, top) != rounded.gather(1, top)).any()  # the rounding was there to undo
    # one row alone gets the same values as in the batch
    alone = rounded[1:2].clone()
    refine_top_logits(alone, hidden[1:2], table)
    assert torch.equal(alone, refined[1:2])
