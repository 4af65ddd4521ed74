"""Shared fixtures: the default GGUF model's path and tiny random Hugging Face models built on demand."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from tokenmill.config import DEFAULT_MODEL
from tokenmill.model.gguf import read_gguf, tokenizer_from_gguf
from tokenmill.model.source import resolve_model

# Architecture of every tiny model; small enough that building and loading one takes well under a second.
TINY_DIMS = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
             "intermediate_size": 128, "max_position_embeddings": 512}


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module of tiny models: two threads on the shared 2-core machine wait
    on each other and run slower. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """Path of the default model's GGUF file (SmolLM2-135M-Instruct, Q4_1)."""
    return Path(resolve_model(DEFAULT_MODEL)[0])


@pytest.fixture(scope="session")
def tiny_hf_model(tmp_path_factory: pytest.TempPathFactory,
                  default_model_path: Path) -> Callable[..., Path]:
    """Factory: ``tiny_hf_model(arch="llama"|"qwen2", tie=True, bias=False, vocab_size=None, **overrides)``.

    Builds a random 2-layer model with transformers (seeded, so the weights are the same every run),
    save_pretrained's it with the default model's tokenizer and chat template, and returns the folder.
    Folders are cached per argument tuple for the whole session.
    """
    cache: dict[tuple, Path] = {}
    tokenizer = tokenizer_from_gguf(read_gguf(str(default_model_path)))

    def build(arch: str = "llama", tie: bool = True, bias: bool = False, vocab_size: int | None = None,
              **overrides: Any) -> Path:
        key = (arch, tie, bias, vocab_size, tuple(sorted(overrides.items())))
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"tiny-{arch}")
            _save_tiny_model(folder, arch, tie, bias, vocab_size or tokenizer.vocab_size, overrides)
            tokenizer.save_hf(folder)
            cache[key] = folder
        return cache[key]

    return build


def _save_tiny_model(folder: Path, arch: str, tie: bool, bias: bool, vocab_size: int,
                     overrides: dict[str, Any]) -> None:
    import transformers  # test-only dependency, imported where needed

    kwargs = {**TINY_DIMS, "vocab_size": vocab_size, "tie_word_embeddings": tie,
              "bos_token_id": 1, "eos_token_id": 2}
    if arch == "llama":
        config = transformers.LlamaConfig(**{"attention_bias": bias, **kwargs, **overrides})
        model_cls = transformers.LlamaForCausalLM
    elif arch == "qwen2":  # Qwen2 always has q/k/v biases
        config = transformers.Qwen2Config(**{**kwargs, **overrides})
        model_cls = transformers.Qwen2ForCausalLM
    else:
        raise ValueError(f"tiny_hf_model: arch must be 'llama' or 'qwen2', got {arch!r}")
    torch.manual_seed(0)
    model = model_cls(config).eval()
    if getattr(config, "attention_bias", True):  # HF initializes biases to zero; make them matter
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.normal_(0.0, 0.02)
    model.save_pretrained(folder)


@pytest.fixture(scope="session")
def tiny_gguf_model(tmp_path_factory: pytest.TempPathFactory, tiny_hf_model: Callable[..., Path],
                    default_model_path: Path) -> Callable[..., Path]:
    """Factory: ``tiny_gguf_model(arch="llama"|"qwen2", ggml_type="F32", tie=True)`` -> a .gguf file.

    Converts ``tiny_hf_model(arch, tie=tie)`` the way llama.cpp does (llama Q/K rows permuted, 2-D
    weights stored as ``ggml_type``: F32, F16, BF16, Q8_0, Q4_0 or Q4_1; norms and biases F32) with
    the default model's tokenizer metadata. Cached per argument tuple.
    """
    cache: dict[tuple, Path] = {}
    tok_md = {k: v for k, v in read_gguf(str(default_model_path)).metadata.items() if k.startswith("tokenizer.")}

    def build(arch: str = "llama", ggml_type: str = "F32", tie: bool = True) -> Path:
        key = (arch, ggml_type, tie)
        if key not in cache:
            path = tmp_path_factory.mktemp(f"gguf-{arch}") / f"tiny-{arch}-{ggml_type}.gguf"
            _write_tiny_gguf(path, tiny_hf_model(arch, tie=tie), arch, ggml_type, tok_md)
            cache[key] = path
        return cache[key]

    return build


def _write_tiny_gguf(path: Path, hf_folder: Path, arch: str, ggml_type: str, tok_md: dict[str, Any]) -> None:
    import gguf
    import numpy as np
    from safetensors.torch import load_file

    cfg = TINY_DIMS
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    for key, value in tok_md.items():
        if isinstance(value, list):
            w.add_array(key, value)
        elif isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        else:
            w.add_string(key, value)
    qtype = gguf.GGMLQuantizationType[ggml_type]
    hf_to_gguf = {v: k for k, v in _gguf_names(cfg["num_hidden_layers"]).items()}
    for name, t in load_file(str(hf_folder / "model.safetensors")).items():
        a = t.float().numpy()
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            n = heads if ".q_proj." in name else kv_heads
            # llama.cpp's order: per head, the two rotary halves interleaved row by row
            a = a.reshape(n, 2, a.shape[0] // n // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)
        if a.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            w.add_tensor(hf_to_gguf[name], gguf.quants.quantize(np.ascontiguousarray(a), qtype), raw_dtype=qtype)
        else:
            w.add_tensor(hf_to_gguf[name], np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _gguf_names(n_layers: int) -> dict[str, str]:
    """GGUF tensor name -> Hugging Face name, written out independently of tokenmill's own table."""
    names = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
    per_layer = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                 "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                 "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                 "ffn_down": "mlp.down_proj"}
    for i in range(n_layers):
        for g, h in per_layer.items():
            for kind in ("weight", "bias"):
                names[f"blk.{i}.{g}.{kind}"] = f"model.layers.{i}.{h}.{kind}"
    return names
