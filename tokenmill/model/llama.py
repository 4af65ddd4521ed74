"""The Llama-family decoder (Llama, SmolLM, Mistral, Qwen2) over the paged KV cache.

One forward runs the flattened batch of a step: T tokens from any mix of decodes and prefill
chunks, each with its own position; attention sorts out which token sees which keys through the
step's ``AttentionMetadata``. The layers are built straight from the checkpoint tensors (Hugging
Face names), with q/k/v and gate/up fused into one matmul each.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.config import ModelConfig
from tokenmill.model.attention import AttentionBackend, AttentionMetadata, KVCache, TorchSDPABackend
from tokenmill.model.layers import GatedMLP, RMSNorm, RotaryEmbedding, make_linear
from tokenmill.model.quant import dequantize, is_quantized

# Tensors some checkpoints carry that the model recomputes or does not use.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class _Weights:
    """Reads checkpoint tensors by Hugging Face name, remembering which ones were used."""

    def __init__(self, tensors: Mapping[str, Any], dtype: torch.dtype, device: torch.device) -> None:
        self.tensors, self.dtype, self.device = tensors, dtype, device
        self.used: set[str] = set()

    def raw(self, name: str) -> Any:
        if name not in self.tensors:
            raise ValueError(f"checkpoint is missing tensor {name!r}")
        self.used.add(name)
        return self.tensors[name]

    def float(self, name: str) -> torch.Tensor:
        t = self.raw(name)
        t = dequantize(t) if is_quantized(t) else t  # e.g. a Q8_0 embedding table, gathered row by row
        return t.to(device=self.device, dtype=self.dtype).contiguous()

    def linear(self, names: list[str], require_bias: bool = False) -> nn.Module:
        """One (fused) linear layer from the named weights, with their biases when the checkpoint has them
        (Llama's attention_bias / mlp_bias put biases on o_proj and the MLP too)."""
        bias_names = [n.removesuffix(".weight") + ".bias" for n in names]
        with_bias = require_bias or any(b in self.tensors for b in bias_names)
        biases = [self.raw(b) for b in bias_names] if with_bias else None
        return make_linear([self.raw(n) for n in names], biases, self.dtype, self.device)

    def check_all_used(self) -> None:
        unused = [n for n in self.tensors if n not in self.used and not n.endswith(_IGNORED_SUFFIXES)]
        if unused:
            raise ValueError(f"checkpoint has {len(unused)} tensors this model does not use, e.g. {unused[:3]}")


class LlamaAttention(nn.Module):
    """Self-attention: fused qkv projection, rotary embedding, paged attention, output projection."""

    def __init__(self, config: ModelConfig, weights: _Weights, prefix: str, backend: AttentionBackend) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = config.head_dim ** -0.5
        self.backend = backend
        names = [f"{prefix}.{p}_proj.weight" for p in "qkv"]
        self.qkv_proj = weights.linear(names, require_bias=config.attention_bias)
        self.o_proj = weights.linear([f"{prefix}.o_proj.weight"])

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: KVCache,
                meta: AttentionMetadata) -> torch.Tensor:
        t, h, hkv, d = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x)  # [T, (H + 2 Hkv) * D]
        # q and k rotate together: one rotary op per layer instead of two
        qk = RotaryEmbedding.apply(qkv[:, :(h + hkv) * d].view(t, h + hkv, d), cos, sin)  # [T, H + Hkv, D]
        v = qkv[:, (h + hkv) * d:].view(t, hkv, d)
        out = self.backend.forward(qk[:, :h], qk[:, h:], v, kv_cache, meta, self.scale)  # [T, H, D]
        return self.o_proj(out.reshape(t, h * d))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, weights: _Weights, index: int, backend: AttentionBackend) -> None:
        super().__init__()
        prefix = f"model.layers.{index}"
        self.input_layernorm = RMSNorm(weights.float(f"{prefix}.input_layernorm.weight"), config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, weights, f"{prefix}.self_attn", backend)
        self.post_attention_layernorm = RMSNorm(
            weights.float(f"{prefix}.post_attention_layernorm.weight"), config.rms_norm_eps)
        mlp = f"{prefix}.mlp"
        self.mlp = GatedMLP(weights.linear([f"{mlp}.gate_proj.weight", f"{mlp}.up_proj.weight"]),
                            weights.linear([f"{mlp}.down_proj.weight"]), config.intermediate_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: KVCache,
                meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(nn.Module):
    """Llama-family causal LM; also serves Qwen2 and Mistral (q/k/v bias from ``config.attention_bias``).

    Built from a dict of Hugging Face-named tensors; missing tensors, or tensors it would not use,
    raise ValueError. The model never picks a device: weights go to ``device`` in ``dtype``.
    """

    def __init__(self, config: ModelConfig, tensors: Mapping[str, Any], dtype: torch.dtype,
                 device: torch.device, backend: AttentionBackend | None = None) -> None:
        super().__init__()
        self.config = config
        backend = backend or TorchSDPABackend()
        weights = _Weights(tensors, dtype, torch.device(device))
        self.embed_tokens = nn.Parameter(weights.float("model.embed_tokens.weight"), requires_grad=False)
        self.rotary = RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope_theta,
                                      config.rope_scaling, dtype, weights.device)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, weights, i, backend) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(weights.float("model.norm.weight"), config.rms_norm_eps)
        if config.tie_word_embeddings:
            if "lm_head.weight" in tensors:
                weights.used.add("lm_head.weight")  # some tied checkpoints store a copy; the tie wins, as in HF
            embed = tensors["model.embed_tokens.weight"]
            # A quantized tied embedding (GGUF Q8_0): the head, read whole every decode step, keeps the
            # packed weight; the lookup above uses a float copy (only T rows of it are read per step).
            self.lm_head = make_linear([embed], None, dtype, weights.device) if is_quantized(embed) else None
        else:
            self.lm_head = weights.linear(["lm_head.weight"])
        weights.check_all_used()

    @property
    def max_positions(self) -> int:
        """Positions this model can embed: a position >= this is out of range."""
        return self.rotary.max_positions

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache],
                meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: [T] long (the flattened batch of this step) -> hidden states [T, hidden].

        Writes each token's K/V into ``kv_caches`` (one (k, v) pair per layer, [num_slots, Hkv, D])
        at ``meta.slot_mapping``. The final norm is applied; pass the rows to sample to ``compute_logits``.
        """
        if len(kv_caches) != len(self.layers):
            raise ValueError(f"kv_caches: expected {len(self.layers)} layers, got {len(kv_caches)}")
        x = F.embedding(input_ids, self.embed_tokens)  # [T, hidden]
        cos, sin = self.rotary.lookup(positions)  # [T, 1, D] each, shared by all layers
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x = layer(x, cos, sin, kv_cache, meta)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> logits [N, vocab] in float32."""
        if self.lm_head is None:
            return F.linear(hidden, self.embed_tokens).float()
        return self.lm_head(hidden).float()
