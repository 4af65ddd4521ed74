"""Qwen3 (dense): the Llama block plus an RMSNorm over each head of q and k before rotary, no q/k/v bias."""

from __future__ import annotations

from typing import Any

from tokenmill.config import ModelConfig
from tokenmill.model.base import LLAMA_GGUF_LAYER_NAMES
from tokenmill.model.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Qwen3ForCausalLM / GGUF ``qwen3``; the forward is Llama's with ``config.qk_norm`` set."""

    architectures = ("qwen3",)
    hf_architectures = {"Qwen3ForCausalLM": "qwen3"}
    gguf_layer_names = {**LLAMA_GGUF_LAYER_NAMES, "attn_q_norm.weight": "self_attn.q_norm.weight",
                        "attn_k_norm.weight": "self_attn.k_norm.weight"}

    @classmethod
    def config_from_hf(cls, cfg: dict[str, Any], arch: str) -> ModelConfig:
        config = super().config_from_hf(cfg, arch)
        config.qk_norm = True
        return config

    @classmethod
    def config_from_gguf(cls, gf: Any, arch: str) -> ModelConfig:
        config = super().config_from_gguf(gf, arch)
        config.qk_norm = True
        return config
