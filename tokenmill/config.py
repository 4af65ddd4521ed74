"""Configuration dataclasses: the model's architecture and the engine's settings.

Each class validates itself in ``__post_init__`` and raises ``ValueError`` naming the
field and its allowed range, so bad input never reaches the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

DEFAULT_MODEL = "smollm2-135m-instruct"
QUANTIZATION_MODES = ("auto", "none", "int4", "int8")
DTYPES = ("auto", "float32", "bfloat16", "float16")
KV_CACHE_DTYPES = ("auto", "float32", "bfloat16", "float16", "int8")  # vLLM's --kv-cache-dtype
HIDDEN_ACTS = ("silu", "gelu_pytorch_tanh")
LAYER_TYPES = ("sliding_attention", "full_attention")
SPECULATIVE_METHODS = ("ngram", "draft_model")


@dataclass
class ModelConfig:
    """Architecture of a decoder-only model, read from config.json or GGUF metadata by its model class
    (``tokenmill.model.registry``): the fields every family shares, plus the optional features some use."""

    architecture: str  # the model class's name in the registry: "llama" | "qwen3" | "phi3" | "gemma3" ...
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # HF config.json shape: {"rope_type": "llama3", ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v bias (Qwen2)
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    hidden_act: str = "silu"  # the gated MLP's activation: "silu" | "gelu_pytorch_tanh"
    qk_norm: bool = False  # RMSNorm over each head of q and k before rotary (Qwen3, Gemma 3)
    sliding_window: int | None = None  # a sliding layer attends to this many tokens (itself included)
    # per layer "sliding_attention" | "full_attention"; None: every layer slides when sliding_window is set
    layer_types: list[str] | None = None
    rope_local_theta: float | None = None  # rope base of the sliding layers (Gemma 3); None: rope_theta
    query_pre_attn_scalar: float | None = None  # attention scale is this ** -0.5; None: head_dim

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"model config: {name} must be >= 1, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"model config: num_attention_heads ({self.num_attention_heads}) must be a multiple "
                f"of num_key_value_heads ({self.num_key_value_heads})")
        if self.hidden_act not in HIDDEN_ACTS:
            raise ValueError(f"model config: hidden_act must be one of {HIDDEN_ACTS}, got {self.hidden_act!r}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"model config: sliding_window must be >= 1 or None, got {self.sliding_window}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_hidden_layers or not set(self.layer_types) <= set(LAYER_TYPES):
                raise ValueError(f"model config: layer_types must list one of {LAYER_TYPES} per layer "
                                 f"({self.num_hidden_layers}), got {self.layer_types}")
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                raise ValueError("model config: layer_types has sliding layers but sliding_window is None")

    def layer_window(self, index: int) -> int | None:
        """The attention window of layer ``index``: sliding_window on a sliding layer, else None (full)."""
        if self.sliding_window is None:
            return None
        if self.layer_types is None or self.layer_types[index] == "sliding_attention":
            return self.sliding_window
        return None


@dataclass
class SpeculativeConfig:
    """Speculative decoding, with vLLM's ``speculative_config`` keys.

    method "ngram": drafts are the tokens that followed the last n tokens (n from
    prompt_lookup_max down to prompt_lookup_min) where they occurred before in the prompt or
    output. method "draft_model": drafts come from ``model``, a smaller model with the same
    tokenizer. ``disable_by_batch_size``: no drafts in a step with more running sequences than
    this (verifying costs compute that a large batch has no spare of).
    """

    method: str | None = None  # default: "draft_model" when model is set, else "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_min: int = 2
    prompt_lookup_max: int = 4
    model: str | None = None
    disable_by_batch_size: int = 2  # measured: see docs/benchmarks.md, "Speculative decoding"

    def __post_init__(self) -> None:
        if self.method is None:
            self.method = "draft_model" if self.model else "ngram"
        if self.method not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative_config: method must be one of {SPECULATIVE_METHODS}, got {self.method!r}")
        for name in ("num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 32:
                raise ValueError(f"speculative_config: {name} must be an integer in [1, 32], got {value!r}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"speculative_config: prompt_lookup_min ({self.prompt_lookup_min}) must be <= "
                             f"prompt_lookup_max ({self.prompt_lookup_max})")
        if isinstance(self.disable_by_batch_size, bool) or not isinstance(self.disable_by_batch_size, int) \
                or self.disable_by_batch_size < 1:
            raise ValueError(f"speculative_config: disable_by_batch_size must be an integer >= 1, "
                             f"got {self.disable_by_batch_size!r}")
        if self.method == "draft_model" and not self.model:
            raise ValueError('speculative_config: method "draft_model" needs "model" (the draft model)')
        if self.method == "ngram" and self.model:
            raise ValueError('speculative_config: "model" is only used with method "draft_model"')

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SpeculativeConfig:
        """From the ``speculative_config`` dict / JSON; unknown keys raise ValueError."""
        if not isinstance(data, dict):
            raise ValueError(f"speculative_config must be a dict (JSON object), got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"speculative_config: unknown key(s) {unknown}; known: {sorted(known)}")
        return cls(**data)


@dataclass
class EngineConfig:
    """Everything the engine needs to start: which model, where, and how much to batch."""

    model: str = DEFAULT_MODEL
    dtype: str = "auto"  # activations and weights that stay in floating point
    quantization: str = "auto"  # auto: keep GGUF Q4/Q8 packed; none: dequantize everything
    device: str = "auto"  # auto: cuda when available, else cpu
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    max_num_seqs: int = 64  # sequences decoded together in one step
    max_num_batched_tokens: int = 512  # token budget of one step (prefill chunks + decodes)
    block_size: int = 16  # tokens per KV cache block
    kv_cache_memory_gb: float | None = None  # default: a fraction of free memory, capped
    # K/V element type: auto picks a 16-bit type (engine/kv_cache.py says which); int8 adds a scale per token and head
    kv_cache_dtype: str = "auto"
    seed: int = 0
    threads: int | None = None
    # torch.compile the decode steps (a slower start, a faster decode); None: where it pays (EngineCore says where)
    compile: bool | None = False
    enable_prefix_caching: bool = True  # reuse the KV of full blocks of a prompt prefix seen before
    # a request's tokens do not depend on what else is in the batch (docs/determinism.md); costs speed
    batch_invariant: bool = False
    # speculative decoding: a SpeculativeConfig or its dict ({"method": "ngram", ...}); None = off
    speculative_config: SpeculativeConfig | dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        if self.quantization not in QUANTIZATION_MODES:
            raise ValueError(f"quantization must be one of {QUANTIZATION_MODES}, got {self.quantization!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 1, got {self.block_size}")
        if self.kv_cache_memory_gb is not None and self.kv_cache_memory_gb <= 0:
            raise ValueError(f"kv_cache_memory_gb must be > 0, got {self.kv_cache_memory_gb}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.compile and self.batch_invariant:
            raise ValueError("compile cannot be combined with batch_invariant: a compiled graph per batch shape "
                             "rounds differently, which batch-invariant mode exists to prevent")
        if isinstance(self.speculative_config, dict):
            self.speculative_config = SpeculativeConfig.from_dict(self.speculative_config)


ROUTING_POLICIES = ("prefix", "round-robin")


@dataclass
class ReplicaConfig:
    """``tokenmill serve --replicas N``: N engines, each with its own KV cache and threads, as Ray Serve
    replicas behind one endpoint (docs/scale_out.md).

    routing "prefix": a prompt goes to the replica that ran its longest cached prefix unless that replica's
    queue is longer than the shortest by more than ``imbalance`` x the share of the prompt it holds, then
    to the least-loaded one;
    "round-robin": replicas in turn (the baseline). ray_address: None starts a Ray instance on this
    machine's loopback; "auto" or "host:port" joins a running cluster (``ray start --head``).
    """

    num_replicas: int = 1
    threads_per_replica: int | None = None  # default: this machine's cores / num_replicas, at least 1
    routing: str = "prefix"
    imbalance: int = 8
    ray_address: str | None = None

    def __post_init__(self) -> None:
        if self.num_replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.num_replicas}")
        if self.threads_per_replica is not None and self.threads_per_replica < 1:
            raise ValueError(f"threads_per_replica must be >= 1, got {self.threads_per_replica}")
        if self.routing not in ROUTING_POLICIES:
            raise ValueError(f"routing must be one of {ROUTING_POLICIES}, got {self.routing!r}")
        if self.imbalance < 0:
            raise ValueError(f"imbalance must be >= 0, got {self.imbalance}")


def model_config_from_hf(cfg: dict[str, Any]) -> ModelConfig:
    """ModelConfig from a Hugging Face config.json dict, parsed by the model class that registered its
    architecture; unsupported architectures raise ValueError."""
    from tokenmill.model.registry import model_config_from_hf_dict  # lazy: the models import config

    return model_config_from_hf_dict(cfg)
