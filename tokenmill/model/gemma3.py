"""Gemma 3 (text): the Llama block with Gemma's changes, over the paged KV cache.

What differs from Llama (``llama.py``):
- RMSNorm scales by ``(1 + w)`` and computes in float32; four norms per layer (before and after attention,
  before and after the MLP) and an RMSNorm over each head of q and k;
- the MLP gate is tanh-approximated GELU (GeGLU);
- embeddings are multiplied by sqrt(hidden_size) (rounded to the model dtype, as transformers does);
- attention is scaled by ``query_pre_attn_scalar ** -0.5``;
- five of every six layers attend over a sliding window (``sliding_window`` tokens, rotary base
  ``rope_local_base_freq``); the sixth attends globally with ``rope_theta`` (and ``rope_scaling``).

GGUF files store the norm weights as ``1 + w`` (llama.cpp multiplies by the weight directly); the loader
subtracts 1 so that the tensors are the Hugging Face checkpoint's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from tokenmill.config import ModelConfig
from tokenmill.model.attention import AttentionBackend, AttentionMetadata, KVCache, TorchSDPABackend
from tokenmill.model.base import CausalLMBase, Weights, hf_eos_ids
from tokenmill.model.layers import GatedMLP, RotaryEmbedding
from tokenmill.model.llama import LlamaAttention, check_kv_caches, make_lm_head

SLIDING_WINDOW_PATTERN = 6  # layer i is global when (i + 1) % 6 == 0, as in transformers and llama.cpp
LOCAL_ROPE_BASE = 10000.0


class GemmaRMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * (1 + w), computed in float32 and rounded once, as transformers does."""

    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.scale = nn.Parameter((1.0 + weight.float()).contiguous(), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.rms_norm(x.float(), (x.shape[-1],), self.scale, self.eps).to(x.dtype)


class Gemma3DecoderLayer(nn.Module):
    """x + post_norm(attn(norm(x))), then x + post_norm(mlp(norm(x)))."""

    def __init__(self, config: ModelConfig, weights: Weights, index: int, backend: AttentionBackend) -> None:
        super().__init__()
        p, eps = f"model.layers.{index}", config.rms_norm_eps

        def norm(name: str) -> GemmaRMSNorm:
            return GemmaRMSNorm(weights.float(f"{p}.{name}.weight"), eps)

        attn = f"{p}.self_attn"
        self.is_sliding = config.layer_window(index) is not None
        self.input_layernorm = norm("input_layernorm")
        self.self_attn = LlamaAttention(
            config, weights.linear([f"{attn}.{x}_proj.weight" for x in "qkv"], require_bias=config.attention_bias),
            weights.linear([f"{attn}.o_proj.weight"]), backend, config.layer_window(index),
            norm("self_attn.q_norm"), norm("self_attn.k_norm"))
        self.post_attention_layernorm = norm("post_attention_layernorm")
        self.pre_feedforward_layernorm = norm("pre_feedforward_layernorm")
        mlp = f"{p}.mlp"
        self.mlp = GatedMLP(weights.linear([f"{mlp}.gate_proj.weight", f"{mlp}.up_proj.weight"]),
                            weights.linear([f"{mlp}.down_proj.weight"]), config.intermediate_size, config.hidden_act)
        self.post_feedforward_layernorm = norm("post_feedforward_layernorm")

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: KVCache,
                meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, meta))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma3ForCausalLM(CausalLMBase):
    """Gemma 3 text model (Gemma3ForCausalLM, GGUF ``gemma3``), tied embeddings."""

    architectures = ("gemma3", "gemma3_text")
    hf_architectures = {"Gemma3ForCausalLM": "gemma3"}
    gguf_layer_names = {
        "attn_norm.weight": "input_layernorm.weight", "post_attention_norm.weight": "post_attention_layernorm.weight",
        "ffn_norm.weight": "pre_feedforward_layernorm.weight",
        "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
        "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
        "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
        "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight",
        "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
        "ffn_down.weight": "mlp.down_proj.weight",
    }

    def __init__(self, config: ModelConfig, tensors: Mapping[str, Any], dtype: torch.dtype,
                 device: torch.device, backend: AttentionBackend | None = None) -> None:
        super().__init__()
        self.config = config
        backend = backend or TorchSDPABackend()
        weights = Weights(tensors, dtype, torch.device(device))
        self.embed = weights.embedding("model.embed_tokens.weight")
        # transformers multiplies by sqrt(hidden) rounded to the model dtype
        self.embed_scale = float(torch.tensor(config.hidden_size ** 0.5, dtype=dtype))
        self.rotary = RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope_theta,
                                      config.rope_scaling, dtype, weights.device)
        self.rotary_local = RotaryEmbedding(config.head_dim, config.max_position_embeddings,
                                            config.rope_local_theta or LOCAL_ROPE_BASE, None, dtype, weights.device)
        self.layers = nn.ModuleList(Gemma3DecoderLayer(config, weights, i, backend)
                                    for i in range(config.num_hidden_layers))
        self.norm = GemmaRMSNorm(weights.float("model.norm.weight"), config.rms_norm_eps)
        self.lm_head = make_lm_head(config, weights, tensors)
        weights.check_all_used()

    # ---- config and tensor names ----------------------------------------------------------------

    @classmethod
    def config_from_hf(cls, cfg: dict[str, Any], arch: str) -> ModelConfig:
        cfg = cfg.get("text_config", cfg)  # a Gemma3ForConditionalGeneration config nests the text model
        heads, layers = cfg["num_attention_heads"], cfg["num_hidden_layers"]
        pattern = cfg.get("sliding_window_pattern") or SLIDING_WINDOW_PATTERN
        layer_types = cfg.get("layer_types") or [
            "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]
        if cfg.get("final_logit_softcapping") or cfg.get("attn_logit_softcapping"):
            raise ValueError("Gemma 3: logit soft-capping is not supported")
        return ModelConfig(
            architecture="gemma3", vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"], num_hidden_layers=layers, num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads, head_dim=cfg.get("head_dim", 256),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=cfg.get("rope_theta", 1_000_000.0),
            rope_scaling=cfg.get("rope_scaling"), max_position_embeddings=cfg.get("max_position_embeddings", 32768),
            tie_word_embeddings=cfg.get("tie_word_embeddings", True), attention_bias=cfg.get("attention_bias", False),
            bos_token_id=cfg.get("bos_token_id"), eos_token_ids=hf_eos_ids(cfg),
            hidden_act=cfg.get("hidden_activation") or "gelu_pytorch_tanh", qk_norm=True,
            sliding_window=cfg.get("sliding_window", 4096), layer_types=layer_types,
            rope_local_theta=cfg.get("rope_local_base_freq", LOCAL_ROPE_BASE),
            query_pre_attn_scalar=cfg.get("query_pre_attn_scalar", 256))

    @classmethod
    def config_from_gguf(cls, gf: Any, arch: str) -> ModelConfig:
        from tokenmill.model.gguf import gguf_config_fields

        md, fields = gf.metadata, gguf_config_fields(gf, arch)
        layers = fields["num_hidden_layers"]
        pattern = md.get(f"{arch}.attention.sliding_window_pattern", SLIDING_WINDOW_PATTERN)
        if isinstance(pattern, list):  # one bool per layer: True = sliding
            layer_types = ["sliding_attention" if s else "full_attention" for s in pattern]
        else:
            layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]
        if md.get(f"{arch}.final_logit_softcapping"):
            raise ValueError(f"{gf.path!r}: Gemma 3 logit soft-capping is not supported")
        window = md.get(f"{arch}.attention.sliding_window")
        # llama.cpp's scale: 1/sqrt(head_dim), except the 27B model (62 layers): 1/sqrt(hidden / heads)
        scalar = fields["hidden_size"] // fields["num_attention_heads"] if layers == 62 else fields["head_dim"]
        return ModelConfig(architecture="gemma3", **{
            **fields, "hidden_act": "gelu_pytorch_tanh", "qk_norm": True, "sliding_window": window or None,
            "layer_types": layer_types if window else None,
            "rope_local_theta": float(md.get(f"{arch}.rope.freq_base_swa", LOCAL_ROPE_BASE)),
            "query_pre_attn_scalar": float(scalar)})

    @classmethod
    def convert_gguf_tensor(cls, config: ModelConfig, hf_name: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor - 1.0 if hf_name.endswith("norm.weight") else tensor  # GGUF stores 1 + w

    @classmethod
    def layer_tensor_names(cls, config: ModelConfig) -> tuple[list[str], list[str]]:
        norms = ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm", "self_attn.q_norm", "self_attn.k_norm"]
        linears = [*(f"self_attn.{p}_proj" for p in "qkvo"), *(f"mlp.{p}_proj" for p in ("gate", "up", "down"))]
        required = [f"{n}.weight" for n in norms + linears]
        if config.attention_bias:
            required += [f"self_attn.{p}_proj.bias" for p in "qkv"]
        return required, []

    # ---- forward ------------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache],
                meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: [T] -> hidden states [T, hidden] (final norm applied); K/V written to kv_caches."""
        check_kv_caches(kv_caches, len(self.layers))
        x = self.embed(input_ids) * self.embed_scale  # [T, hidden]
        rope_global = self.rotary.lookup(positions)  # (cos, sin), [T, 1, D] each
        rope_local = self.rotary_local.lookup(positions)
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            cos, sin = rope_local if layer.is_sliding else rope_global
            x = layer(x, cos, sin, kv_cache, meta)
        return self.norm(x)

