"""Weight formats chosen by batch shape: packed int4 for small batches, dense bfloat16 for large ones.

A decode step of a few sequences reads every weight once and does little arithmetic, so the
smallest weights win: the packed int4 kernel (``QuantLinear``). A prefill chunk or a decode of
dozens of sequences is a real matrix product, and there the int4 kernel's cost grows with the rows
while a bfloat16 GEMM on a CPU with native bf16 (AVX-512 BF16 / AMX) stays far cheaper per row.
``BatchAdaptiveLinear`` keeps both forms of one weight and picks per call by the number of rows.

Memory: the dense copy costs 2 bytes per weight of every quantized projection (about 210 MB for
SmolLM2-135M next to its ~70 MB of int4), and of a quantized lm_head only when that copy stays
within ``MAX_DENSE_LM_HEAD_BYTES`` (SmolLM2's 57 MB yes, Gemma 3's 262k-row 335 MB no).
Both forms hold the same values (the dense copy is the int4 weight dequantized by the kernel
itself, rounded to bf16), but the arithmetic differs, so outputs may differ in the last bits
between a batch and the same sequence alone. ``quantization="int4"`` keeps the int4 form only.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.model.quant import QuantLinear

# Rows (tokens in the step) from which the dense bf16 product is used. Measured with
# scripts/measure_linear_formats.py: see docs/quantization.md.
MIN_DENSE_ROWS = 8
# A large-vocabulary output layer would double its bytes for a share of one step's work: keep it packed.
MAX_DENSE_LM_HEAD_BYTES = 64 << 20


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when the CPU does bfloat16 arithmetic in hardware (AVX-512 BF16 or AMX), as torch sees it."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AVX512_BF16", "AMX"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


class BatchAdaptiveLinear(nn.Module):
    """A QuantLinear plus its dense bfloat16 weight; rows >= min_dense_rows take the dense product."""

    def __init__(self, quant: QuantLinear, min_dense_rows: int = MIN_DENSE_ROWS) -> None:
        super().__init__()
        self.quant = quant
        self.quant_forward = quant.forward  # QuantLinear has no hooks: its forward is its call
        self.min_dense_rows = min_dense_rows
        self.register_buffer("dense", dense_weight(quant))  # [N, K] bf16
        self.in_features, self.out_features = quant.in_features, quant.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in_features] -> [..., out_features] in x's dtype."""
        rows = x.shape[0] if x.dim() == 2 else x.numel() // self.in_features  # the model passes [T, in]
        if rows < self.min_dense_rows:
            return self.quant_forward(x)  # straight to forward: the one-token decode path, ~1.5 us less a call
        bias = None if self.quant.bias is None else self.quant.bias.to(torch.bfloat16)
        padded = bucket_rows(rows)
        if padded == rows:
            return F.linear(x.to(torch.bfloat16), self.dense, bias).to(x.dtype)
        # zero rows up to the bucket's size; their outputs are dropped
        x16 = F.pad(x.reshape(rows, self.in_features).to(torch.bfloat16), (0, 0, 0, padded - rows))
        return F.linear(x16, self.dense, bias)[:rows].to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"min_dense_rows={self.min_dense_rows}"


def bucket_rows(rows: int) -> int:
    """The row count the dense product runs with: ``rows`` rounded up to a multiple of 8, or from 64 rows on
    of an eighth of the largest power of two <= rows: at most 7 more rows below 64, under 12.5% more above.

    Why: the bf16 product goes through oneDNN, which builds and caches one kernel per input shape (up to
    1,024 of them, ~370 KB each here). Prefill chunks and batches come in every size, so without buckets
    the engine process grew by ~400 MB over minutes of mixed serving (scripts/soak.py); with them, 32
    shapes per weight cover 8 to 512 rows."""
    step = max(8, 1 << max(0, rows.bit_length() - 4))
    return -(-rows // step) * step


@torch.inference_mode()
def dense_weight(quant: QuantLinear) -> torch.Tensor:
    """The [out, in] weight a QuantLinear multiplies by, in bfloat16: its product with the identity."""
    eye = torch.eye(quant.in_features, dtype=torch.bfloat16, device=quant.packed.device)
    bias, quant.bias = quant.bias, None  # the product alone: adding and removing a bias would round
    try:
        transposed = quant(eye)  # [in, out] = I @ W.T
    finally:
        quant.bias = bias
    return transposed.t().contiguous().to(torch.bfloat16)


def make_batch_adaptive(model: nn.Module, min_dense_rows: int = MIN_DENSE_ROWS) -> int:
    """Wrap every QuantLinear of model in a BatchAdaptiveLinear; returns how many were wrapped."""
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if isinstance(child, QuantLinear)
               and (name != "lm_head" or 2 * child.in_features * child.out_features <= MAX_DENSE_LM_HEAD_BYTES)]
    for parent, name, child in targets:
        setattr(parent, name, BatchAdaptiveLinear(child, min_dense_rows))
    return len(targets)
