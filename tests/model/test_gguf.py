"""GGUF loading: config, tensors and raw quantized blocks against transformers' GGUF loader and
against the tiny Hugging Face models they were converted from."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize
from safetensors.torch import load_file

from tokenmill.model.gguf import (
    GGUFFile,
    GGUFTensorInfo,
    RawQuantTensor,
    model_config_from_gguf,
    read_gguf,
)
from tokenmill.model.gguf_tensors import dequantize_tensor, load_gguf_tensors
from tokenmill.model.source import load_checkpoint

COMPARED_LAYERS = (0, 1, 29)


@pytest.fixture(scope="module")
def default_gguf(default_model_path):
    return read_gguf(str(default_model_path))


@pytest.fixture(scope="module")
def hf_gguf_state_dict(default_model_path):
    """transformers' GGUF loading pieces on the gguf package's own reader, for the compared layers:
    its metadata -> config key table, name map, numpy dequantization and llama Q/K permutation undo.
    (AutoConfig.from_pretrained(gguf_file=...) does the same but also parses the whole vocabulary.)"""
    import transformers
    from gguf import GGUFReader
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor, get_gguf_hf_weights_map

    reader = GGUFReader(str(default_model_path))
    values = {hf: reader.fields[f"llama.{key}"].contents() for key, hf in GGUF_CONFIG_MAPPING["llama"].items()
              if f"llama.{key}" in reader.fields}
    config = transformers.LlamaConfig(**values)
    with torch.device("meta"):  # only the parameter names are needed for the name map
        skeleton = transformers.LlamaForCausalLM(config)
    name_map = get_gguf_hf_weights_map(skeleton)
    processor = LlamaTensorProcessor(config=values)
    wanted = ("token_embd.", "output_norm.", *(f"blk.{i}." for i in COMPARED_LAYERS))
    tensors = {}
    for t in reader.tensors:
        if t.name.startswith(wanted):
            weights = processor.process(dequantize(t.data, t.tensor_type), t.name).weights
            tensors[name_map[t.name]] = torch.from_numpy(np.array(weights))
    return config, tensors


def _subset(gf: GGUFFile, prefixes: tuple[str, ...]) -> GGUFFile:
    """The same file restricted to some tensors (dequantizing all 272 is slow on a shared CPU)."""
    return GGUFFile(gf.path, gf.metadata, {k: v for k, v in gf.tensors.items() if k.startswith(prefixes)})


@pytest.fixture(scope="module")
def dense(default_gguf):
    """Our float32 tensors of the compared layers."""
    subset = _subset(default_gguf, ("token_embd.", "output_norm.", *(f"blk.{i}." for i in COMPARED_LAYERS)))
    return load_gguf_tensors(subset, model_config_from_gguf(default_gguf), torch.float32)


def test_config_matches_transformers(default_gguf, hf_gguf_state_dict):
    hf_config, _ = hf_gguf_state_dict
    cfg = model_config_from_gguf(default_gguf)
    assert cfg.architecture == "llama"
    for ours, theirs in [("vocab_size", "vocab_size"), ("hidden_size", "hidden_size"),
                         ("intermediate_size", "intermediate_size"), ("num_hidden_layers", "num_hidden_layers"),
                         ("num_attention_heads", "num_attention_heads"),
                         ("num_key_value_heads", "num_key_value_heads"), ("head_dim", "head_dim"),
                         ("rope_theta", "rope_theta"), ("max_position_embeddings", "max_position_embeddings")]:
        assert getattr(cfg, ours) == getattr(hf_config, theirs), ours
    assert cfg.rms_norm_eps == pytest.approx(hf_config.rms_norm_eps)
    assert cfg.tie_word_embeddings and not cfg.attention_bias
    assert (cfg.bos_token_id, cfg.eos_token_ids) == (1, [2])


def test_dequantized_tensors_match_transformers(dense, hf_gguf_state_dict):
    _, theirs = hf_gguf_state_dict
    ours = dense
    assert "lm_head.weight" not in ours  # tied
    assert len(theirs) == len(ours) == 2 + 9 * len(COMPARED_LAYERS)
    for name, expected in theirs.items():
        assert ours[name].dtype == torch.float32
        assert ours[name].shape == expected.shape, name
        assert torch.equal(ours[name], expected), name


def test_dtype_casts_weights(default_gguf, dense):
    for gguf_name, name in [("blk.1.ffn_up.weight", "model.layers.1.mlp.up_proj.weight"),
                            ("output_norm.weight", "model.norm.weight")]:
        bf16 = dequantize_tensor(default_gguf.tensors[gguf_name], torch.bfloat16)
        assert bf16.dtype == torch.bfloat16
        assert torch.equal(bf16, dense[name].to(torch.bfloat16))


def test_keep_quantized_returns_permuted_raw_blocks(default_gguf, dense):
    cfg = model_config_from_gguf(default_gguf)
    raw = load_gguf_tensors(default_gguf, cfg, torch.float32, keep_quantized=frozenset({int(T.Q4_1)}))
    q = raw["model.layers.1.self_attn.q_proj.weight"]
    k = raw["model.layers.1.self_attn.k_proj.weight"]
    assert isinstance(q, RawQuantTensor) and q.ggml_type == int(T.Q4_1)
    assert q.shape == (576, 576) and q.data.dtype == np.uint8 and q.data.shape == (576, 576 // 32 * 20)
    assert k.shape == (192, 576)
    for name, t in [("model.layers.1.self_attn.q_proj.weight", q), ("model.layers.1.self_attn.k_proj.weight", k),
                    ("model.layers.1.mlp.down_proj.weight", raw["model.layers.1.mlp.down_proj.weight"])]:
        # dequantizing the handed-over rows gives the HF-ordered dense weight: rows moved whole
        assert torch.equal(torch.from_numpy(dequantize(t.data, T.Q4_1)), dense[name]), name
    # types not asked for are dequantized as usual
    assert isinstance(raw["model.embed_tokens.weight"], torch.Tensor)  # Q8_0
    assert isinstance(raw["model.norm.weight"], torch.Tensor)  # F32


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0, T.Q4_1])
def test_fast_dequantizers_match_gguf_reference(qtype):
    values = np.random.default_rng(0).normal(size=(8, 128)).astype(np.float32)
    blocks = quantize(values, qtype)
    info = GGUFTensorInfo("w", (8, 128), qtype, blocks)
    assert torch.equal(dequantize_tensor(info, torch.float32), torch.from_numpy(dequantize(blocks, qtype)))


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q5_K, T.Q6_K])
def test_k_quant_blocks_dequantize_to_shape(qtype):
    # no numpy quantizer exists for k-quants: build valid blocks with small f16 scales
    from gguf import GGML_QUANT_SIZES

    block, nbytes = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, size=(4, 2, nbytes), dtype=np.uint8)
    scale_at = {T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [nbytes - 2]}[qtype]
    for at in scale_at:  # f16 d / dmin fields: 0.01 keeps every value finite
        blocks[..., at:at + 2] = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
    data = blocks.reshape(4, 2 * nbytes)
    out = dequantize_tensor(GGUFTensorInfo("w", (4, 2 * block), qtype, data), torch.float32)
    assert out.shape == (4, 2 * block) and torch.isfinite(out).all()
    assert torch.equal(out, torch.from_numpy(dequantize(data, qtype)))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("ggml_type", ["F32", "F16", "BF16", "Q8_0"])
def test_tiny_gguf_round_trip(tiny_gguf_model, tiny_hf_model, arch, ggml_type):
    """A tiny HF model converted to GGUF (Q/K permuted for llama) loads back to its own weights."""
    ckpt = load_checkpoint(str(tiny_gguf_model(arch, ggml_type)))
    expected = load_file(str(tiny_hf_model(arch) / "model.safetensors"))
    assert ckpt.format == "gguf" and ckpt.config.architecture == arch
    assert ckpt.config.attention_bias == (arch == "qwen2")
    assert (ckpt.config.num_attention_heads, ckpt.config.num_key_value_heads, ckpt.config.head_dim) == (4, 2, 16)
    assert sorted(ckpt.tensors) == sorted(expected)
    tol = {"F32": 0.0, "F16": 1e-3, "BF16": 1e-2, "Q8_0": 2e-2}[ggml_type]
    for name, t in expected.items():
        got = ckpt.tensors[name]
        assert got.shape == t.shape, name
        torch.testing.assert_close(got, t.float(), atol=tol * t.abs().max().item(), rtol=0, msg=name)


def test_tiny_gguf_untied_has_lm_head(tiny_gguf_model):
    ckpt = load_checkpoint(str(tiny_gguf_model("llama", "F32", tie=False)))
    assert not ckpt.config.tie_word_embeddings
    assert not torch.equal(ckpt.tensors["lm_head.weight"], ckpt.tensors["model.embed_tokens.weight"])


def test_no_loaded_tensor_keeps_the_files_memory_map(default_gguf, default_model_path):
    # F32 tensors (the norms) are copied out of the map: one view would keep every page of the file the loader
    # read resident for the life of the process
    tensors = load_gguf_tensors(default_gguf, model_config_from_gguf(default_gguf), torch.float32)
    ranges = [tuple(int(x, 16) for x in line.split()[0].split("-"))
              for line in open("/proc/self/maps") if line.rstrip().endswith(str(default_model_path))]
    assert ranges  # the file is mapped while default_gguf lives
    inside = [name for name, t in tensors.items() if isinstance(t, torch.Tensor)
              and any(lo <= t.data_ptr() < hi for lo, hi in ranges)]
    assert not inside, inside[:3]
