"""Time one projection of the default model in its three forms, by rows: packed int4 (QuantLinear),
dense bfloat16 and float32, to place adaptive_linear.MIN_DENSE_ROWS. Ratios within one run only.

    python scripts/measure_linear_formats.py [--repeats 30]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from tokenmill.model.adaptive_linear import dense_weight
from tokenmill.model.quant import QuantLinear, quantize_int4


def timed(fn, x: torch.Tensor, repeats: int) -> float:
    for _ in range(3):
        fn(x)
    best = float("inf")
    for _ in range(repeats):  # the best of many: the least disturbed by other work on the machine
        start = time.perf_counter()
        fn(x)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--in-features", type=int, default=576)  # SmolLM2-135M hidden size
    parser.add_argument("--out-features", type=int, default=3072)  # its fused gate/up
    args = parser.parse_args()
    torch.manual_seed(0)
    w = torch.randn(args.out_features, args.in_features) * 0.02
    quant = QuantLinear([quantize_int4(w)])
    dense = dense_weight(quant)
    print(f"cpu capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads")
    print(f"{'rows':>5} {'int4 us':>9} {'bf16 us':>9} {'f32 us':>9} {'bf16/int4':>9}")
    for rows in (1, 4, 8, 16, 24, 32, 48, 64, 128, 512):
        x = torch.randn(rows, args.in_features)
        t4 = timed(quant, x, args.repeats)
        tb = timed(lambda x: F.linear(x.to(torch.bfloat16), dense).float(), x, args.repeats)
        tf = timed(lambda x: F.linear(x, w), x, args.repeats)
        print(f"{rows:>5} {t4 * 1e6:>9.1f} {tb * 1e6:>9.1f} {tf * 1e6:>9.1f} {tb / t4:>9.2f}")


if __name__ == "__main__":
    main()
