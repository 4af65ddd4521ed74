"""Building blocks of a Llama-family decoder: RMSNorm, rotary embedding, SwiGLU MLP, linear layers.

Every projection goes through ``make_linear``, the one place that turns checkpoint weights into a
layer; it fuses several weights that read the same input (q/k/v, gate/up) into one matmul, and it
is where quantized weights get their own layer (``tokenmill.model.quant``).

Shapes: T = tokens in the flattened batch of a step, D = head_dim.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.model.quant import is_quantized, make_quant_linear

ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


class Linear(nn.Module):
    """y = x @ W.T + b with a float weight [out, in] stored contiguous in the model dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.contiguous(), requires_grad=False)

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)  # [N, in] -> [N, out]


def make_linear(weights: Sequence[Any], biases: Sequence[torch.Tensor] | None, dtype: torch.dtype,
                device: torch.device) -> nn.Module:
    """One linear layer computing the given weights side by side: output = concat of each one's output.

    ``weights`` are [out_i, in] blocks that share the input (q/k/v, or gate/up), fused along the
    output dim so that one matmul reads them all. ``biases`` is None or one bias per weight.
    Float weights become a ``Linear`` in ``dtype`` on ``device``; this is the hook where a quantized
    weight (anything that is not a float tensor, e.g. a GGUF ``RawQuantTensor``) gets a quantized layer.
    """
    if biases is not None and len(biases) != len(weights):
        raise ValueError(f"make_linear: got {len(biases)} biases for {len(weights)} weights")
    if any(is_quantized(w) for w in weights):  # GGUF blocks or int4/int8 weights: one quantized matmul
        return make_quant_linear(list(weights), None if biases is None else list(biases), dtype, device)
    if not all(isinstance(w, torch.Tensor) and w.is_floating_point() for w in weights):
        kinds = sorted({type(w).__name__ if not isinstance(w, torch.Tensor) else str(w.dtype) for w in weights})
        raise ValueError(f"make_linear: unsupported weight type {kinds}; float tensors only "
                         "(quantized weights need tokenmill.model.quant)")
    weight = _fuse([w.to(device=device, dtype=dtype) for w in weights])
    bias = None if biases is None else _fuse([b.to(device=device, dtype=dtype) for b in biases])
    return Linear(weight, bias)


def _fuse(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0].contiguous() if len(parts) == 1 else torch.cat(parts, dim=0)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight over the last dim, with Hugging Face's rounding."""

    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (x.shape[-1],)
        if x.dtype == torch.float32:
            return torch.rms_norm(x, shape, self.weight, self.eps)
        # Half precision: normalize in float32, round to x's dtype, then scale in that dtype, as
        # transformers does; one fused rms_norm would round once and drift from the reference.
        return self.weight * torch.rms_norm(x.float(), shape, None, self.eps).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding, Hugging Face "rotate_half" layout (the two halves of a head pair up).

    cos/sin are computed once for every position up to ``max_positions`` ([P, D] each, in the
    model dtype) and gathered by position at each step; ``lookup`` runs once per forward and
    ``apply`` once per layer.

    rope_scaling types: default, linear (positions divided by factor), llama3 (wavelength-dependent
    frequency scaling), dynamic (NTK-aware). Dynamic differs from transformers in one case: here a
    token at position p >= max_position_embeddings is always rotated with the base for a sequence of
    length p + 1. That equals transformers during token-by-token decoding (each new token is
    rotated with the base for the length so far, and cached keys keep theirs), and for any sequence
    shorter than max_position_embeddings (no scaling at all). transformers' one-shot forward of a
    longer prompt instead rotates every token with the base for the whole prompt length.
    """

    def __init__(self, head_dim: int, max_position_embeddings: int, base: float,
                 rope_scaling: dict[str, Any] | None, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embedding: head_dim must be even, got {head_dim}")
        rope_type, factor = _rope_type(rope_scaling)
        self.max_positions = max_position_embeddings
        if rope_type == "dynamic":
            self.max_positions = int(max_position_embeddings * factor)
        # float32 throughout, like the reference, so that the angles round exactly as transformers' do
        inv_freq = _inv_freq(head_dim, base)  # [D/2]
        if rope_type == "linear":
            inv_freq = inv_freq / factor
        elif rope_type == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, rope_scaling or {}, max_position_embeddings)
        positions = torch.arange(self.max_positions, dtype=torch.float32)
        angles = torch.outer(positions, inv_freq)  # [P, D/2]
        if rope_type == "dynamic":
            _dynamic_angles_(angles, head_dim, base, factor, max_position_embeddings)
        # Full-width tables [P, D]: cos = (c, c), sin = (-s, s), so that with x's halves swapped,
        # x * cos + swap(x) * sin = (x1 c - x2 s, x2 c + x1 s) in 3 ops, the reference's exact arithmetic.
        cos, sin = angles.cos(), angles.sin()
        self.register_buffer("cos", torch.cat((cos, cos), -1).to(device=device, dtype=dtype), persistent=False)
        self.register_buffer("sin", torch.cat((-sin, sin), -1).to(device=device, dtype=dtype), persistent=False)

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> (cos, sin), each [T, 1, D], ready to broadcast over heads."""
        return self.cos.index_select(0, positions)[:, None, :], self.sin.index_select(0, positions)[:, None, :]

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate x [T, heads, D] by the angles of its tokens' positions; returns a new tensor."""
        swapped = x.unflatten(-1, (2, -1)).flip(-2).flatten(-2)  # (x2, x1): [T, heads, D]
        return x * cos + swapped * sin


def _rope_type(rope_scaling: dict[str, Any] | None) -> tuple[str, float]:
    if not rope_scaling:
        return "default", 1.0
    rope_type = rope_scaling.get("rope_type") or rope_scaling.get("type") or "default"
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_scaling.rope_type must be one of {ROPE_TYPES}, got {rope_type!r}")
    factor = float(rope_scaling.get("factor", 1.0))
    if rope_type != "default" and factor < 1.0:
        raise ValueError(f"rope_scaling.factor must be >= 1, got {factor}")
    return rope_type, factor


def _inv_freq(head_dim: int, base: float | torch.Tensor) -> torch.Tensor:
    """[D/2] float32 inverse frequencies base^(-2i/D); base may be a [P, 1] tensor -> [P, D/2]."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    return 1.0 / (base ** exponents)


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any], max_pos: int) -> torch.Tensor:
    """Llama 3.1: long wavelengths divided by factor, short ones kept, a smooth ramp in between."""
    factor = float(scaling["factor"])
    low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
    old_len = scaling.get("original_max_position_embeddings", max_pos)
    if high <= low:
        raise ValueError(f"rope_scaling: high_freq_factor ({high}) must be > low_freq_factor ({low})")
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


def _dynamic_angles_(angles: torch.Tensor, head_dim: int, base: float, factor: float, max_pos: int) -> None:
    """Dynamic NTK, in place on angles [P, D/2]: position p >= max_pos gets the frequencies of
    base * (factor * (p+1) / max_pos - (factor-1))^(D/(D-2)), the base for a sequence of length p+1."""
    long = torch.arange(max_pos, angles.shape[0], dtype=torch.float32)  # [P_long]
    if not len(long):
        return
    grown = base * ((factor * (long + 1) / max_pos) - (factor - 1)) ** (head_dim / (head_dim - 2))
    angles[max_pos:] = long[:, None] * _inv_freq(head_dim, grown[:, None])  # [P_long, D/2]


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": _gelu_tanh}


class GatedMLP(nn.Module):
    """Gated feed-forward: down(act(gate(x)) * up(x)), gate and up computed by one fused matmul.

    act is SiLU (SwiGLU: Llama, Qwen, Phi-3) or tanh-approximated GELU (GeGLU: Gemma).
    """

    def __init__(self, gate_up: nn.Module, down: nn.Module, intermediate_size: int, act: str = "silu") -> None:
        super().__init__()
        self.gate_up = gate_up  # [N, hidden] -> [N, 2 * intermediate]
        self.down = down
        self.intermediate_size = intermediate_size
        self.act = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up(x)  # [N, 2I]
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        return self.down(self.act(gate) * up)
