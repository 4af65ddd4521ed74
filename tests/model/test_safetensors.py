"""Hugging Face folders: tiny random models saved by transformers load back to the same tensors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tokenmill.model.safetensors import load_hf_config, load_hf_tensors, safetensors_files
from tokenmill.model.source import load_checkpoint


def _saved_state_dict(folder) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in safetensors_files(folder):
        tensors.update(load_file(str(f)))
    return tensors


@pytest.mark.parametrize("arch,tie,bias", [("llama", True, False), ("llama", False, False),
                                           ("llama", False, True), ("qwen2", True, False)])
def test_round_trip(tiny_hf_model, arch, tie, bias):
    import transformers

    folder = tiny_hf_model(arch, tie=tie, bias=bias)
    ckpt = load_checkpoint(str(folder))
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder).state_dict()
    assert (ckpt.format, ckpt.name, ckpt.path) == ("hf", folder.name, str(folder))
    cfg = ckpt.config
    assert cfg.architecture == arch and cfg.tie_word_embeddings == tie
    assert cfg.attention_bias == (bias or arch == "qwen2")
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size, cfg.vocab_size, cfg.head_dim) == (2, 64, 4, 2, 128, 49152, 16)
    expected = {k: v for k, v in ref.items() if not (tie and k == "lm_head.weight")}
    assert sorted(ckpt.tensors) == sorted(expected)
    for name, t in expected.items():
        assert torch.equal(ckpt.tensors[name], t), name
    assert ckpt.tokenizer.eos_token_ids == [2] and cfg.eos_token_ids == [2]
    assert ckpt.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]).endswith("<|im_start|>assistant\n")


def test_dtype_cast(tiny_hf_model):
    folder = tiny_hf_model("llama")
    tensors = load_hf_tensors(folder, load_hf_config(folder), torch.bfloat16)
    ref = _saved_state_dict(folder)
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    name = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(tensors[name], ref[name].to(torch.bfloat16))


def test_sharded_checkpoint(tiny_hf_model, tmp_path):
    import transformers

    src = tiny_hf_model("llama", tie=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(src)
    model.save_pretrained(tmp_path, max_shard_size="2MB")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, tmp_path / f)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(safetensors_files(tmp_path)) > 1
    ckpt = load_checkpoint(str(tmp_path))
    for name, t in model.state_dict().items():
        assert torch.equal(ckpt.tensors[name], t), name


def _copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_generation_config_eos_ids_are_added(tiny_hf_model, tmp_path):
    folder = _copy_model(tiny_hf_model("llama"), tmp_path / "m")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    ckpt = load_checkpoint(str(folder))
    assert ckpt.config.eos_token_ids == [2, 0]
    assert ckpt.tokenizer.eos_token_ids == [2, 0]


def test_missing_tensor_raises(tiny_hf_model, tmp_path):
    folder = _copy_model(tiny_hf_model("llama"), tmp_path / "m")
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing 1 tensors.*layers\.1\.mlp\.up_proj"):
        load_checkpoint(str(folder))


def test_missing_shard_raises(tiny_hf_model, tmp_path):
    folder = _copy_model(tiny_hf_model("llama"), tmp_path / "m")
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(ValueError, match="missing shard"):
        load_checkpoint(str(folder))


def test_no_weights_raises(tiny_hf_model, tmp_path):
    folder = _copy_model(tiny_hf_model("llama"), tmp_path / "m")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        load_checkpoint(str(folder))


@pytest.mark.parametrize("patch,match", [
    ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, "unsupported architecture"),
    ({"quantization_config": {"quant_method": "gptq"}}, "pre-quantized"),
])
def test_unsupported_config_raises(tiny_hf_model, tmp_path, patch, match):
    folder = _copy_model(tiny_hf_model("llama"), tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, **patch}))
    with pytest.raises(ValueError, match=match):
        load_checkpoint(str(folder))


def test_corrupt_config_raises(tiny_hf_model, tmp_path):
    folder = _copy_model(tiny_hf_model("llama"), tmp_path / "m")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        load_checkpoint(str(folder))
