"""Quantized weights: exact GGUF conversions, QuantLinear against float matmul, and the default model.

The reference for the conversions is the ``gguf`` package's own dequantizer; for the layer, a float
matmul with the dequantized weight; for the model, the same GGUF file fully dequantized (float32).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from tokenmill.model import quant
from tokenmill.model.gguf import RawQuantTensor, read_gguf
from tokenmill.model.layers import make_linear
from tokenmill.model.source import resolve_model

Q4_0, Q4_1, Q8_0 = (int(GGMLQuantizationType[n]) for n in ("Q4_0", "Q4_1", "Q8_0"))


@pytest.fixture(scope="module")
def default_gguf():
    return read_gguf(resolve_model("smollm2-135m-instruct")[0])


def _synthetic_blocks(ggml_type: int, n: int = 48, k: int = 96, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(raw blocks [n, bytes], gguf's dequantization [n, k]) of random data quantized by gguf itself."""
    w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)
    w[0] = 3.0  # a constant row: Q4_1's scale is 0 there
    raw = gguf_quantize(w, GGMLQuantizationType(ggml_type))
    return raw, gguf_dequantize(raw, GGMLQuantizationType(ggml_type))


def _kernel_dequantize(layer: quant.QuantLinear) -> torch.Tensor:
    """The weight as the packed kernel sees it: identity input -> W.T, so W = (I @ W.T).T."""
    return layer(torch.eye(layer.in_features)).t()


@pytest.mark.parametrize("ggml_type", [Q4_0, Q4_1, Q8_0])
def test_synthetic_blocks_dequantize_like_gguf(ggml_type):
    raw, ref = _synthetic_blocks(ggml_type)
    w = quant.from_gguf(ggml_type, raw, ref.shape)
    assert torch.equal(w.dequantize(), torch.from_numpy(ref))
    # float32 compute: the packed int4 layout reproduces gguf's values to float32 rounding
    layer = quant.QuantLinear([w], compute_dtype=torch.float32)
    torch.testing.assert_close(_kernel_dequantize(layer), torch.from_numpy(ref), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["blk.3.attn_q.weight", "blk.7.ffn_down.weight", "token_embd.weight"])
def test_default_model_tensors_dequantize_like_gguf(default_gguf, name):
    info = default_gguf.tensors[name]  # Q4_1 layers, Q8_0 embedding
    rows = slice(0, 1024)  # the embedding is 49152 rows; a slice of whole rows keeps the test fast
    data, shape = info.data[rows], (min(1024, info.shape[0]), info.shape[1])
    ref = torch.from_numpy(gguf_dequantize(data, info.ggml_type)).reshape(shape)
    w = quant.from_gguf(int(info.ggml_type), data, shape)
    assert torch.equal(w.dequantize(), ref)
    layer = quant.QuantLinear([w], compute_dtype=torch.float32)
    torch.testing.assert_close(_kernel_dequantize(layer), ref, rtol=1e-6, atol=1e-6)
    # bfloat16 compute (the default): equal up to bf16 rounding of scales and outputs
    bf16 = _kernel_dequantize(quant.QuantLinear([w]))
    torch.testing.assert_close(bf16, ref, rtol=2**-7, atol=2**-7 * ref.abs().max().item())


def _close_to_float_matmul(layer: torch.nn.Module, w: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor):
    ref = x @ w.t() + (0 if bias is None else bias)
    out = layer(x)
    assert out.shape == ref.shape and out.dtype == x.dtype
    # bf16 activations and scales: ~3 significant digits of each product, fp32 accumulation
    err = (out - ref).abs().max().item()
    assert err <= 1e-2 * ref.abs().max().item(), err


@pytest.mark.parametrize("ggml_type", [Q4_0, Q4_1, Q8_0])
def test_quant_linear_matches_float_matmul(ggml_type):
    raw, ref = _synthetic_blocks(ggml_type, n=64, k=128, seed=1)
    layer = quant.QuantLinear([quant.from_gguf(ggml_type, raw, ref.shape)])
    x = torch.randn(2, 5, 128)  # any leading dims
    _close_to_float_matmul(layer, torch.from_numpy(ref), None, x)


def test_fused_mixed_parts_with_bias_match_float_matmul():
    """q (Q4_1) + k (Q8_0) + v (float -> int8) in one layer, as make_linear fuses q/k/v."""
    raw_q, ref_q = _synthetic_blocks(Q4_1, n=64, k=96, seed=2)
    raw_k, ref_k = _synthetic_blocks(Q8_0, n=32, k=96, seed=3)
    v = torch.randn(32, 96)
    biases = [torch.randn(64), torch.randn(32), torch.randn(32)]
    layer = make_linear([RawQuantTensor(Q4_1, raw_q, ref_q.shape), RawQuantTensor(Q8_0, raw_k, ref_k.shape), v],
                        biases, torch.float32, torch.device("cpu"))
    assert isinstance(layer, quant.QuantLinear)
    w = torch.cat([torch.from_numpy(ref_q), torch.from_numpy(ref_k), quant.quantize_int8(v).dequantize()])
    _close_to_float_matmul(layer, w, torch.cat(biases), torch.randn(7, 96))


@pytest.mark.parametrize("parts", [[quant.GGML_Q8_0], [quant.GGML_Q8_0, quant.GGML_Q8_0]])
def test_all_int8_layer_matches_float_matmul(parts):
    raws = [_synthetic_blocks(t, n=32, k=64, seed=i) for i, t in enumerate(parts)]
    layer = quant.QuantLinear([quant.from_gguf(t, r, ref.shape) for t, (r, ref) in zip(parts, raws, strict=True)])
    assert layer.all_int8
    _close_to_float_matmul(layer, torch.cat([torch.from_numpy(ref) for _, ref in raws]), None, torch.randn(3, 64))


def test_split_int8_into_nibbles_is_exact():
    # float16 scale x 8-bit code needs 19 bits: both halves and their sum are exact in float32
    w = quant.Int8Weight(q=torch.arange(-128, 128, dtype=torch.int8).reshape(8, 32),
                         scale=(torch.rand(8, 1) + 0.5).half().float())  # Q8_0 scales are float16
    hi, lo = w.split()
    assert int(hi.q.max()) <= 15 and int(lo.q.max()) <= 15
    assert torch.equal(hi.dequantize() + lo.dequantize(), w.dequantize())


def test_quantize_float_weights_within_half_a_step():
    w = torch.randn(40, 64) * torch.linspace(0.01, 3, 64)
    w4, w8 = quant.quantize_int4(w), quant.quantize_int8(w)
    step4 = w4.scale.repeat_interleave(32, dim=1)
    step8 = w8.scale.repeat_interleave(32, dim=1)
    assert ((w4.dequantize() - w).abs() <= step4 / 2 + 1e-5).all()
    assert ((w8.dequantize() - w).abs() <= step8 / 2 + 1e-6).all()
    _close_to_float_matmul(quant.QuantLinear([w4]), w4.dequantize(), None, torch.randn(4, 64))


def test_quantize_linear_weights_skips_embedding_head_and_odd_widths():
    tensors = {"model.layers.0.self_attn.q_proj.weight": torch.randn(64, 64),
               "model.layers.0.mlp.down_proj.weight": torch.randn(64, 48),  # 48 % 32 != 0
               "model.embed_tokens.weight": torch.randn(100, 64), "lm_head.weight": torch.randn(100, 64)}
    out = quant.quantize_linear_weights(tensors, "int4")
    assert isinstance(out["model.layers.0.self_attn.q_proj.weight"], quant.Int4Weight)
    assert all(out[n] is tensors[n] for n in list(tensors)[1:])
    assert isinstance(quant.quantize_linear_weights(tensors, "int8")["model.layers.0.self_attn.q_proj.weight"],
                      quant.Int8Weight)
    assert quant.quantize_linear_weights(tensors, "auto") is tensors
    assert quant.keep_quantized_types("none", "gguf") == frozenset()
    assert quant.keep_quantized_types("auto", "hf") == frozenset()
    assert quant.keep_quantized_types("auto", "gguf") == {Q4_0, Q4_1, Q8_0, quant.GGML_Q5_0, quant.GGML_Q4_K}


def test_bad_input_raises_value_error():
    raw, ref = _synthetic_blocks(Q4_1)
    with pytest.raises(ValueError, match="ggml_type"):
        quant.from_gguf(int(GGMLQuantizationType.Q6_K), raw, ref.shape)
    with pytest.raises(ValueError, match="bytes"):
        quant.from_gguf(Q4_1, raw[:-1], ref.shape)
    with pytest.raises(ValueError, match="in_features"):
        quant.quantize_int4(torch.randn(4, 40))
    with pytest.raises(ValueError, match="share in_features"):
        quant.QuantLinear([quant.quantize_int4(torch.randn(4, 32)), quant.quantize_int4(torch.randn(4, 64))])


# A paragraph the model did not see in this form: perplexity is measured on it in both modes.
PARAGRAPH = (
    "The lighthouse stood on a narrow spit of rock at the mouth of the harbor. Every evening the keeper "
    "climbed the spiral stairs, trimmed the wick and wound the clockwork that turned the great lens. "
    "Ships coming home through the fog watched for its slow white flash, counted the seconds between "
    "beams, and knew from the rhythm which coast they had reached. When the light was finally "
    "automated, the town kept the keeper's cottage as a small museum of maps, logbooks and brass tools."
)
PROMPTS = ["What is the capital of France?", "Name three primary colors.", "What is 2 + 2?",
           "Translate 'good morning' into Spanish.", "Who wrote Romeo and Juliet?"]


def _run(mode: str) -> tuple[list[list[int]], float, str]:
    from tokenmill import LLM, SamplingParams

    # float32 KV: this test is about the weight formats (the KV types have tests/engine/test_kv_cache_dtype.py)
    llm = LLM(quantization=mode, dtype="float32", max_num_seqs=8, kv_cache_memory_gb=0.05, kv_cache_dtype="float32")
    greedy = SamplingParams(temperature=0, max_tokens=24)
    outs = llm.chat([[{"role": "user", "content": p}] for p in PROMPTS], greedy)
    ids = llm.get_tokenizer().encode(PARAGRAPH)
    scored = llm.generate([ids], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0))[0]
    nll = -sum(pos[t].logprob for pos, t in zip(scored.prompt_logprobs[1:], ids[1:], strict=True))
    return [o.outputs[0].token_ids for o in outs], math.exp(nll / (len(ids) - 1)), outs[0].outputs[0].text


@pytest.fixture
def one_thread():
    # two OpenMP threads on a shared 2-core machine stall on each other; one thread is 5-10x faster here
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_default_model_packed_and_auto_match_float32(one_thread):
    none_ids, none_ppl, _ = _run("none")
    # the packed GGUF weights alone: greedy text agrees with float32 on most prompts
    packed_ids, packed_ppl, packed_paris = _run("int4")
    assert "Paris" in packed_paris
    same = sum(a == b for a, b in zip(packed_ids, none_ids, strict=True))
    assert same >= 4, (same, packed_ids, none_ids)
    assert abs(packed_ppl / none_ppl - 1) < 0.01, (packed_ppl, none_ppl)
    # auto adds the dense bf16 copy for prefill and large batches (on CPUs with native bf16): bf16
    # arithmetic flips greedy near-ties now and then, so its quality gate is the perplexity
    _, auto_ppl, auto_paris = _run("auto")
    assert "Paris" in auto_paris
    assert abs(auto_ppl / none_ppl - 1) < 0.01, (auto_ppl, none_ppl)


@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_hf_model_quantized_on_load_matches_its_dequantized_float_model(mode, monkeypatch):
    """--quantization int4|int8 on float (HF) weights: the model equals the float model built from the
    same quantized-then-dequantized weights: to float32 rounding with float32 kernel activations,
    and within bfloat16 rounding (amplified by this random model's large weights) by default."""
    from tests.model.test_llama import Seq, alloc_caches, block_tables, make_hf_model, random_tokens, run_step
    from tokenmill.config import model_config_from_hf
    from tokenmill.model.registry import build_model

    hf = make_hf_model("llama", tie_word_embeddings=False, attention_bias=True)
    config = model_config_from_hf(hf.config.to_dict())
    tensors = quant.quantize_linear_weights(dict(hf.state_dict()), mode)
    dense = {n: quant.dequantize(w) if quant.is_quantized(w) else w for n, w in tensors.items()}
    tokens = random_tokens(20, seed=5)

    def logits(t: dict) -> torch.Tensor:
        model = build_model(config, t, torch.float32, torch.device("cpu"))
        seq = Seq(tokens, block_tables(1)[0])
        return run_step(model, alloc_caches(config), [(seq, len(tokens))])[0], model

    exp, _ = logits(dense)
    out, ours = logits(tensors)
    assert sum(isinstance(m, quant.QuantLinear) for m in ours.modules()) == 4 * config.num_hidden_layers
    assert (out - exp).abs().max() <= 0.05 * exp.abs().max()
    assert (out.argmax(-1) == exp.argmax(-1)).float().mean() >= 0.9
    monkeypatch.setattr(quant, "pick_compute_dtype", lambda device: torch.float32)
    out32, _ = logits(tensors)
    torch.testing.assert_close(out32, exp, rtol=1e-4, atol=1e-4)


def test_default_model_compiled_decode_gives_the_eager_tokens():
    # what `tokenmill serve` runs by default: the packed model with its decode steps compiled. Default cache
    # size, so the compiled graphs are the ones a default server compiles (and finds in the compile cache).
    from tokenmill import LLM, SamplingParams

    greedy = SamplingParams(temperature=0, max_tokens=24)
    conversations = [[{"role": "user", "content": p}] for p in PROMPTS]
    runs = {}
    for compile_decode in (False, True):
        llm = LLM(compile=compile_decode)
        runs[compile_decode] = [o.outputs[0] for o in llm.chat(conversations, greedy, use_tqdm=False)]
        del llm
    assert "Paris" in runs[True][0].text
    same = sum(a.token_ids == b.token_ids for a, b in zip(runs[False], runs[True], strict=True))
    assert same >= 4, ([o.text for o in runs[False]], [o.text for o in runs[True]])
