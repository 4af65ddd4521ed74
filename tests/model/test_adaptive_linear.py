"""BatchAdaptiveLinear: the dense bf16 copy is the int4 weight, small batches take the int4 kernel."""

import pytest
import torch

from tokenmill.model.adaptive_linear import (
    BatchAdaptiveLinear,
    bucket_rows,
    cpu_has_native_bf16,
    dense_weight,
    make_batch_adaptive,
)
from tokenmill.model.quant import QuantLinear, quantize_int4, quantize_int8


@pytest.mark.parametrize("quantize", [quantize_int4, quantize_int8])
def test_dense_weight_is_the_dequantized_weight_in_bf16(quantize):
    torch.manual_seed(0)
    w = quantize(torch.randn(48, 64) * 0.05)
    quant = QuantLinear([w], bias=torch.randn(48))
    dense = dense_weight(quant)
    assert dense.dtype == torch.bfloat16 and dense.shape == (48, 64)
    assert torch.allclose(dense.float(), w.dequantize(), atol=2e-3, rtol=1e-2)


def test_small_batches_take_the_int4_kernel_and_large_ones_the_dense_product():
    torch.manual_seed(1)
    quant = QuantLinear([quantize_int4(torch.randn(32, 64) * 0.05)], bias=torch.randn(32))
    layer = BatchAdaptiveLinear(quant, min_dense_rows=4)
    small, large = torch.randn(3, 64), torch.randn(2, 5, 64)
    assert torch.equal(layer(small), quant(small))  # exactly the int4 path
    out = layer(large)
    assert out.shape == (2, 5, 32) and out.dtype == torch.float32
    assert torch.allclose(out, quant(large), atol=3e-2, rtol=2e-2)


def test_make_batch_adaptive_wraps_every_quantized_projection_but_a_huge_lm_head(monkeypatch):
    model = torch.nn.Sequential(QuantLinear([quantize_int4(torch.randn(32, 64))]), torch.nn.Linear(32, 8))
    model.lm_head = QuantLinear([quantize_int4(torch.randn(64, 64))])
    monkeypatch.setattr("tokenmill.model.adaptive_linear.MAX_DENSE_LM_HEAD_BYTES", 2 * 64 * 64 - 1)
    assert make_batch_adaptive(model) == 1
    assert isinstance(model[0], BatchAdaptiveLinear) and isinstance(model[1], torch.nn.Linear)
    assert isinstance(model.lm_head, QuantLinear)


def test_default_model_keeps_both_forms_on_a_native_bf16_cpu():
    if not cpu_has_native_bf16():
        pytest.skip("this CPU has no native bf16: the int4 form alone is used")
    from tokenmill import LLM, SamplingParams

    llm = LLM(kv_cache_memory_gb=0.05)
    model = llm.engine.core.runner.model
    assert any(isinstance(m, BatchAdaptiveLinear) for m in model.modules())
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0]
    assert "Paris" in out.outputs[0].text


def test_dense_rows_are_bucketed_and_the_padding_never_shows():
    assert [bucket_rows(m) for m in (8, 9, 16, 17, 63, 64, 65, 129, 500)] == [8, 16, 16, 24, 64, 64, 72, 144, 512]
    assert len({bucket_rows(m) for m in range(8, 513)}) == 32  # shapes oneDNN builds a kernel for
    assert all(m <= bucket_rows(m) < m * 1.125 for m in range(64, 5000))
    torch.manual_seed(2)
    quant = QuantLinear([quantize_int4(torch.randn(32, 64) * 0.05)], bias=torch.randn(32))
    layer = BatchAdaptiveLinear(quant, min_dense_rows=4)
    x = torch.randn(9, 64)  # runs as 16 rows
    expected = torch.nn.functional.linear(x.bfloat16(), layer.dense, quant.bias.bfloat16()).float()
    assert torch.allclose(layer(x), expected, atol=1e-2, rtol=1e-2) and layer(x).shape == (9, 32)
