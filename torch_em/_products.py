"""Long matrix products ``A @ B`` over many points, as the CPU runs them fastest.

MKL's float64 GEMM over a long inner dimension (10^5 points) with 16 to 150 columns runs up to 7x
slower than one batched GEMM over blocks of the points followed by a sum over the blocks (2
threads; 8 rows x 33 columns 25 ms against 4.6 ms), and at best as fast; on 10^4 points, or with
fewer columns, the plain product is the faster. Used by the engine's sufficient statistics and
by the expected transition counts of the hidden-Markov inference.
"""
from __future__ import annotations

import torch

#: Points per block of the blocked product in float64 on the CPU, for sums over at least
#: BLOCKED_MIN_POINTS points of at least BLOCKED_MIN_FEATURES columns.
STATISTICS_BLOCK = 4096
BLOCKED_MIN_POINTS = 1 << 16
BLOCKED_MIN_FEATURES = 16


def uses_blocks(B: torch.Tensor) -> bool:
    """Whether ``A @ B`` (B: (n, F)) is faster as :func:`blocked_product`: float64 on the CPU,
    n >= BLOCKED_MIN_POINTS, F >= BLOCKED_MIN_FEATURES."""
    return (B.dtype == torch.float64 and B.device.type == "cpu" and B.shape[-1] >= BLOCKED_MIN_FEATURES
            and B.shape[-2] >= BLOCKED_MIN_POINTS)


def blocked_product(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``A @ B`` for A (C, n) and B (n, F) over a long n, as one batched GEMM over blocks of
    STATISTICS_BLOCK points and a sum over the blocks."""
    L = STATISTICS_BLOCK
    P = B.shape[0] // L
    head = P * L
    blocks = torch.bmm(A[:, :head].unflatten(1, (P, L)).transpose(0, 1), B[:head].unflatten(0, (P, L)))  # (P, C, F)
    total = blocks.sum(0)
    return total if head == B.shape[0] else total.addmm_(A[:, head:], B[head:])
