"""What every model class declares about its architecture, and the checkpoint reader they share.

A model family is one ``CausalLMBase`` subclass in its own file (``llama.py``, ``qwen3.py``, ``phi3.py``,
``gemma3.py``) and one line in ``registry.py``. The class owns everything about its architecture:

- which checkpoints it runs: ``hf_architectures`` / ``hf_model_types`` (config.json) and
  ``gguf_architectures`` (``general.architecture`` of a GGUF file);
- how their config reads: ``config_from_hf`` and ``config_from_gguf``;
- its tensor names: ``expected_tensor_names`` (Hugging Face names) and ``gguf_tensor_map`` (GGUF name
  suffix -> Hugging Face name suffix), with ``convert_gguf_tensor`` for values stored differently
  (llama.cpp's Q/K row order, Gemma's norm offset);
- its forward.

The loaders (``gguf.py``, ``safetensors.py``) only read files; the class says what the tensors mean.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.config import ModelConfig
from tokenmill.model.layers import make_linear
from tokenmill.model.quant import QuantEmbedding, dequantize, is_quantized

# Tensors some checkpoints carry that the model recomputes or does not use.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

# GGUF -> Hugging Face names shared by the Llama-like families; a family extends or overrides it.
LLAMA_GGUF_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                           "output.weight": "lm_head.weight"}
LLAMA_GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


class Weights:
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

    def embedding(self, name: str) -> nn.Module:
        """The token embedding: a float table, or a quantized one looked up row by row (GGUF Q8_0 / Q4)."""
        t = self.raw(name)
        if is_quantized(t):
            return QuantEmbedding(t, self.dtype, self.device)
        return FloatEmbedding(t.to(device=self.device, dtype=self.dtype).contiguous())

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


class FloatEmbedding(nn.Module):
    """ids [T] -> weight[ids] [T, hidden]; ``weight`` [vocab, hidden] also serves as a tied lm_head."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.embedding(ids, self.weight)


def hf_eos_ids(cfg: dict[str, Any]) -> list[int]:
    eos = cfg.get("eos_token_id")
    return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))


class CausalLMBase(nn.Module):
    """A decoder-only LM: the declarations above (Llama's by default) plus the runner's interface,
    ``forward(input_ids, positions, kv_caches, meta) -> hidden`` and ``compute_logits(hidden)``."""

    # ModelConfig.architecture values this class runs; each is also the config.json "model_type" and
    # the GGUF "general.architecture" of that architecture
    architectures: ClassVar[tuple[str, ...]] = ()
    hf_architectures: ClassVar[dict[str, str]] = {}  # config.json "architectures" entry -> architecture
    gguf_global_names: ClassVar[dict[str, str]] = LLAMA_GGUF_GLOBAL_NAMES
    gguf_layer_names: ClassVar[dict[str, str]] = LLAMA_GGUF_LAYER_NAMES

    config: ModelConfig
    # set by each family's __init__: the token embedding, the rotary tables, the output projection
    # (None when tied to a float embedding table)
    embed: nn.Module
    rotary: Any
    lm_head: nn.Module | None

    # ---- the runner's interface, shared by every family --------------------------------------------

    @property
    def max_positions(self) -> int:
        """Positions this model can embed: a position >= this is out of range."""
        return self.rotary.max_positions

    @property
    def embed_tokens(self) -> torch.Tensor:
        """The float embedding table [vocab, hidden] (a quantized table has none)."""
        return self.embed.weight

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> logits [N, vocab] in float32."""
        if self.lm_head is None:
            return F.linear(hidden, self.embed.weight).float()
        logits = self.lm_head(hidden).float()
        if hidden.dtype == torch.float32 and isinstance(self.embed, QuantEmbedding) and self.config.tie_word_embeddings:
            refine_top_logits(logits, hidden, self.embed)
        return logits

    # ---- config -------------------------------------------------------------------------------

    @classmethod
    def config_from_hf(cls, cfg: dict[str, Any], arch: str) -> ModelConfig:
        """ModelConfig of architecture ``arch`` from a config.json dict (the fields Llama-like configs share)."""
        heads = cfg["num_attention_heads"]
        return ModelConfig(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=cfg.get("rope_theta", 10000.0),
            rope_scaling=cfg.get("rope_scaling"),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=cfg.get("attention_bias", False),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=hf_eos_ids(cfg),
            hidden_act=cfg.get("hidden_act") or "silu",
            sliding_window=cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None,
            layer_types=cfg.get("layer_types"),
        )

    @classmethod
    def config_from_gguf(cls, gf: Any, arch: str) -> ModelConfig:
        """ModelConfig from a GGUF file's metadata (``tokenmill.model.gguf.GGUFFile``) of architecture ``arch``."""
        from tokenmill.model.gguf import gguf_config_fields  # lazy: gguf.py reads files, this declares

        return ModelConfig(architecture=arch, **gguf_config_fields(gf, arch))

    # ---- tensor names -------------------------------------------------------------------------

    @classmethod
    def hf_tensor_name(cls, gguf_name: str) -> str:
        """Hugging Face parameter name of a GGUF tensor name; ValueError for names this class does not use."""
        if gguf_name in cls.gguf_global_names:
            return cls.gguf_global_names[gguf_name]
        parts = gguf_name.split(".", 2)
        if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in cls.gguf_layer_names:
            return f"model.layers.{parts[1]}.{cls.gguf_layer_names[parts[2]]}"
        raise ValueError(f"unsupported GGUF tensor {gguf_name!r} for {cls.__name__}")

    @classmethod
    def gguf_row_permutation(cls, config: ModelConfig, hf_name: str) -> int | None:
        """Head count to undo llama.cpp's Q/K rotary row order with, or None when the rows are in HF order."""
        return None

    @classmethod
    def convert_gguf_tensor(cls, config: ModelConfig, hf_name: str, tensor: torch.Tensor) -> torch.Tensor:
        """A dequantized GGUF tensor as the Hugging Face checkpoint stores it (after the row permutation)."""
        return tensor

    @classmethod
    def layer_tensor_names(cls, config: ModelConfig) -> tuple[list[str], list[str]]:
        """(required, optional) per-layer Hugging Face name suffixes."""
        linears = [*(f"self_attn.{p}_proj" for p in "qkvo"), *(f"mlp.{p}_proj" for p in ("gate", "up", "down"))]
        required = ["input_layernorm.weight", "post_attention_layernorm.weight", *(f"{n}.weight" for n in linears)]
        if config.attention_bias:
            required += [f"self_attn.{p}_proj.bias" for p in "qkv"]
        if config.qk_norm:
            required += ["self_attn.q_norm.weight", "self_attn.k_norm.weight"]
        return required, [f"{n}.bias" for n in linears if f"{n}.bias" not in required]

    @classmethod
    def expected_tensor_names(cls, config: ModelConfig) -> tuple[set[str], set[str]]:
        """(required, optional) Hugging Face parameter names of a model of ``config``."""
        required = {"model.embed_tokens.weight", "model.norm.weight"}
        if not config.tie_word_embeddings:
            required.add("lm_head.weight")
        per_layer, optional_per_layer = cls.layer_tensor_names(config)
        layers = range(config.num_hidden_layers)
        required.update(f"model.layers.{i}.{p}" for i in layers for p in per_layer)
        return required, {f"model.layers.{i}.{p}" for i in layers for p in optional_per_layer}


def unpermute_rows(a: np.ndarray | torch.Tensor, n_head: int) -> np.ndarray | torch.Tensor:
    """Undo llama.cpp's Q/K row order (rotary halves interleaved per head) along dim 0.

    llama.cpp stores, per head, rows [0, d/2, 1, d/2+1, ...] of the HF layout; rows here are
    [n_head * head_dim, ...] and each is moved whole, so raw quant blocks permute the same way.
    """
    rows = a.shape[0]
    half = rows // n_head // 2
    # [n_head, half, 2, ...] -> [n_head, 2, half, ...]: GGUF row h*d + 2i + j is HF row h*d + j*half + i
    w = a.reshape(n_head, half, 2, *a.shape[1:])
    w = w.swapaxes(1, 2) if isinstance(w, np.ndarray) else w.transpose(1, 2)
    return w.reshape(a.shape)


# How many of each row's best logits ``refine_top_logits`` recomputes.
REFINED_LOGITS = 32


def refine_top_logits(logits: torch.Tensor, hidden: torch.Tensor, table: QuantEmbedding) -> None:
    """Recompute, in place, each row's ``REFINED_LOGITS`` best logits in float32 from the packed table's rows.

    Why: a quantized lm_head runs on the int4 or bf16 kernels, whose outputs are bfloat16: at the default
    model's logits of 16 to 32 that is a grid 0.125 wide, and the two best tokens came out exactly equal on
    6 of the first 60 greedy steps of the golden prompts (the tie then goes to the lower token id). The
    likely tokens are the ones greedy choices, top-k / top-p and logprobs depend on; their exact values cost
    one gather of 32 table rows and 32 dot products per row (within the noise of a decode step's time).
    Row by row, so a row's result never depends on the rest of the batch."""
    top = logits.topk(REFINED_LOGITS, dim=-1).indices  # [N, k]
    rows = table(top.reshape(-1)).view(*top.shape, -1)  # [N, k, hidden] float32, exactly the table's values
    logits.scatter_(1, top, (rows * hidden[:, None, :]).sum(-1))

