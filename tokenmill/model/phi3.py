"""Phi-3: the Llama block with q/k/v and gate/up stored already fused in the checkpoint
(``qkv_proj``, ``gate_up_proj``), and an optional sliding window on every layer."""

from __future__ import annotations

from typing import Any

from tokenmill.config import ModelConfig
from tokenmill.model.base import LLAMA_GGUF_LAYER_NAMES
from tokenmill.model.llama import LlamaForCausalLM

_FUSED = {"attn_qkv.weight": "self_attn.qkv_proj.weight", "ffn_up.weight": "mlp.gate_up_proj.weight"}


class Phi3ForCausalLM(LlamaForCausalLM):
    """Phi3ForCausalLM / GGUF ``phi3``. Its fused weights are exactly the layers' fused matmuls: the
    q, k, v rows in that order; gate rows then up rows."""

    architectures = ("phi3",)
    hf_architectures = {"Phi3ForCausalLM": "phi3"}
    gguf_layer_names = {**{k: v for k, v in LLAMA_GGUF_LAYER_NAMES.items()
                           if not k.startswith(("attn_q", "attn_k", "attn_v", "ffn_gate", "ffn_up"))}, **_FUSED}
    fused_names = True

    @classmethod
    def config_from_hf(cls, cfg: dict[str, Any], arch: str) -> ModelConfig:
        if cfg.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError("Phi-3: partial_rotary_factor != 1 is not supported")
        scaling = cfg.get("rope_scaling") or {}
        if (scaling.get("rope_type") or scaling.get("type")) in ("longrope", "su"):
            raise ValueError("Phi-3: longrope rope scaling (the 128k models) is not supported")
        return super().config_from_hf(cfg, arch)

    @classmethod
    def config_from_gguf(cls, gf: Any, arch: str) -> ModelConfig:
        if "rope_factors_long.weight" in gf.tensors:
            raise ValueError(f"{gf.path!r}: Phi-3 longrope (rope_factors_long) is not supported")
        config = super().config_from_gguf(gf, arch)
        config.sliding_window = gf.metadata.get(f"{arch}.attention.sliding_window") or None
        return config

    @classmethod
    def layer_tensor_names(cls, config: ModelConfig) -> tuple[list[str], list[str]]:
        linears = ["self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"]
        required = ["input_layernorm.weight", "post_attention_layernorm.weight", *(f"{n}.weight" for n in linears)]
        return required, [f"{n}.bias" for n in linears]
