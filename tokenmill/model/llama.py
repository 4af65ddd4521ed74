"""The Llama-family decoder (Llama, SmolLM, Mistral, Qwen2) over the paged KV cache.

One forward runs the flattened batch of a step: T tokens from any mix of decodes and prefill
chunks, each with its own position; attention sorts out which token sees which keys through the
step's ``AttentionMetadata``. The layers are built straight from the checkpoint tensors (Hugging
Face names), with q/k/v and gate/up fused into one matmul each. Qwen3 and Phi-3 reuse these layers
in their own files; Gemma 3 reuses the attention.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from tokenmill.config import ModelConfig
from tokenmill.model.attention import AttentionBackend, AttentionMetadata, KVCache, TorchSDPABackend
from tokenmill.model.base import CausalLMBase, Weights
from tokenmill.model.layers import GatedMLP, RMSNorm, RotaryEmbedding, make_linear
from tokenmill.model.quant import is_quantized


class LlamaAttention(nn.Module):
    """Self-attention: fused qkv projection, optional q/k norms, rotary embedding, paged attention (over
    a sliding window on a sliding layer), output projection."""

    def __init__(self, config: ModelConfig, qkv_proj: nn.Module, o_proj: nn.Module, backend: AttentionBackend,
                 window: int | None = None, q_norm: nn.Module | None = None,
                 k_norm: nn.Module | None = None) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = (config.query_pre_attn_scalar or config.head_dim) ** -0.5
        self.backend, self.window = backend, window
        self.qkv_proj, self.o_proj = qkv_proj, o_proj
        self.q_norm, self.k_norm = q_norm, k_norm

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: KVCache,
                meta: AttentionMetadata) -> torch.Tensor:
        t, h, hkv, d = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x)  # [T, (H + 2 Hkv) * D]
        qk = qkv[:, :(h + hkv) * d].view(t, h + hkv, d)
        if self.q_norm is not None:  # per-head RMSNorm of q and k, before rotary
            qk = torch.cat([self.q_norm(qk[:, :h]), self.k_norm(qk[:, h:])], dim=1)
        # q and k rotate together: one rotary op per layer instead of two
        qk = RotaryEmbedding.apply(qk, cos, sin)  # [T, H + Hkv, D]
        v = qkv[:, (h + hkv) * d:].view(t, hkv, d)
        layer_meta = meta if self.window is None else meta.windowed(self.window)
        out = self.backend.forward(qk[:, :h], qk[:, h:], v, kv_cache, layer_meta, self.scale)  # [T, H, D]
        return self.o_proj(out.reshape(t, h * d))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, weights: Weights, index: int, backend: AttentionBackend,
                 fused_names: bool = False) -> None:
        super().__init__()
        prefix = f"model.layers.{index}"
        self.input_layernorm = RMSNorm(weights.float(f"{prefix}.input_layernorm.weight"), config.rms_norm_eps)
        attn, mlp = f"{prefix}.self_attn", f"{prefix}.mlp"
        # Phi-3 stores q/k/v and gate/up already fused; the others store them apart and we fuse them here
        qkv = [f"{attn}.qkv_proj.weight"] if fused_names else [f"{attn}.{p}_proj.weight" for p in "qkv"]
        gate_up = [f"{mlp}.gate_up_proj.weight"] if fused_names else [f"{mlp}.{p}_proj.weight" for p in ("gate", "up")]
        q_norm = k_norm = None
        if config.qk_norm:
            q_norm = RMSNorm(weights.float(f"{attn}.q_norm.weight"), config.rms_norm_eps)
            k_norm = RMSNorm(weights.float(f"{attn}.k_norm.weight"), config.rms_norm_eps)
        self.self_attn = LlamaAttention(
            config, weights.linear(qkv, require_bias=config.attention_bias), weights.linear([f"{attn}.o_proj.weight"]),
            backend, config.layer_window(index), q_norm, k_norm)
        self.post_attention_layernorm = RMSNorm(
            weights.float(f"{prefix}.post_attention_layernorm.weight"), config.rms_norm_eps)
        self.mlp = GatedMLP(weights.linear(gate_up), weights.linear([f"{mlp}.down_proj.weight"]),
                            config.intermediate_size, config.hidden_act)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: KVCache,
                meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(CausalLMBase):
    """Llama-family causal LM; also serves Qwen2 and Mistral (q/k/v bias from ``config.attention_bias``,
    Mistral's sliding window from ``config.sliding_window``).

    Built from a dict of Hugging Face-named tensors; missing tensors, or tensors it would not use,
    raise ValueError. The model never picks a device: weights go to ``device`` in ``dtype``.
    """

    architectures = ("llama", "mistral", "qwen2")
    hf_architectures = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
    fused_names = False  # checkpoint stores qkv_proj / gate_up_proj (Phi-3)

    def __init__(self, config: ModelConfig, tensors: Mapping[str, Any], dtype: torch.dtype,
                 device: torch.device, backend: AttentionBackend | None = None) -> None:
        super().__init__()
        self.config = config
        backend = backend or TorchSDPABackend()
        weights = Weights(tensors, dtype, torch.device(device))
        self.embed = weights.embedding("model.embed_tokens.weight")
        self.rotary = RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope_theta,
                                      config.rope_scaling, dtype, weights.device)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, weights, i, backend, self.fused_names)
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(weights.float("model.norm.weight"), config.rms_norm_eps)
        self.lm_head = make_lm_head(config, weights, tensors)
        weights.check_all_used()

    @classmethod
    def config_from_hf(cls, cfg: dict[str, Any], arch: str) -> ModelConfig:
        config = super().config_from_hf(cfg, arch)
        config.attention_bias = cfg.get("attention_bias", arch == "qwen2")  # Qwen2 always has q/k/v biases
        return config

    @classmethod
    def gguf_row_permutation(cls, config: ModelConfig, hf_name: str) -> int | None:
        # llama.cpp's converter interleaves the rotary halves of Llama's Q/K rows (not Qwen2's)
        if config.architecture != "llama":
            return None
        if hf_name.endswith("q_proj.weight"):
            return config.num_attention_heads
        if hf_name.endswith("k_proj.weight"):
            return config.num_key_value_heads
        return None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache],
                meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: [T] long (the flattened batch of this step) -> hidden states [T, hidden].

        Writes each token's K/V into ``kv_caches`` (one (k, v) pair per layer, [num_slots, Hkv, D])
        at ``meta.slot_mapping``. The final norm is applied; pass the rows to sample to ``compute_logits``.
        """
        check_kv_caches(kv_caches, len(self.layers))
        x = self.embed(input_ids)  # [T, hidden]
        cos, sin = self.rotary.lookup(positions)  # [T, 1, D] each, shared by all layers
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x = layer(x, cos, sin, kv_cache, meta)
        return self.norm(x)



def check_kv_caches(kv_caches: list[KVCache], num_layers: int) -> None:
    if len(kv_caches) != num_layers:
        raise ValueError(f"kv_caches: expected {num_layers} layers, got {len(kv_caches)}")


def make_lm_head(config: ModelConfig, weights: Weights, tensors: Mapping[str, Any]) -> nn.Module | None:
    """The output projection, or None when it is the (float) embedding table itself."""
    if not config.tie_word_embeddings:
        return weights.linear(["lm_head.weight"])
    if "lm_head.weight" in tensors:
        weights.used.add("lm_head.weight")  # some tied checkpoints store a copy; the tie wins, as in HF
    embed = tensors["model.embed_tokens.weight"]
    # A quantized tied embedding (GGUF Q8_0): the head, read whole every decode step, keeps the
    # packed weight; the lookup uses a float copy (only T rows of it are read per step).
    return make_linear([embed], None, weights.dtype, weights.device) if is_quantized(embed) else None
