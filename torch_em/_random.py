"""Reproducible randomness for a working batch of restarts.

Each restart draws from its own generator, seeded from ``(seed, restart)``, so restart ``r`` of
a fit with ``n_init=k`` draws the same numbers as restart ``r`` of any other ``n_init``.

The same draws are not yet the same arithmetic: a GEMM or a batched GEMM may round a row
differently when the batch has another number of rows (BLAS picks kernels and blockings by
size). Fits therefore run restart 0 as a batch of its own (:func:`restart_groups`), the exact
computation of ``n_init=1``, so the best of k restarts is never worse than the single fit with
the same seed.
"""
from __future__ import annotations

import numpy as np
import torch


def resolve_seed(seed: int | None) -> int:
    """The given seed, or a fresh one from torch's global generator."""
    return int(seed) if seed is not None else int(torch.randint(0, 2**62, (), device="cpu"))


class RestartStreams:
    """One ``torch.Generator`` per restart; draws come back stacked as ``(R, *shape)``."""

    def __init__(self, seed: int | None, restarts: int | range, device: torch.device) -> None:
        """``restarts``: how many (restarts 0..R-1), or which (a range)."""
        restarts = range(restarts) if isinstance(restarts, int) else restarts
        children = np.random.SeedSequence(resolve_seed(seed)).spawn(restarts.stop)[restarts.start:]
        self.generators = [
            torch.Generator(device=device).manual_seed(int(child.generate_state(1, np.uint64)[0] >> 1))
            for child in children
        ]
        self.device = torch.device(device)

    def __len__(self) -> int:
        return len(self.generators)

    def rand(self, *shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Uniform [0, 1) numbers ``(R, *shape)``."""
        return torch.stack([torch.rand(shape, generator=g, device=self.device, dtype=dtype) for g in self.generators])

    def states(self) -> list[torch.Tensor]:
        """The generators' states (for :meth:`restore`)."""
        return [g.get_state() for g in self.generators]

    def restore(self, states: list[torch.Tensor]) -> None:
        for generator, state in zip(self.generators, states):
            generator.set_state(state)

    def randint(self, high: int, *shape: int) -> torch.Tensor:
        """Integers in [0, high) ``(R, *shape)``."""
        return torch.stack([torch.randint(high, shape, generator=g, device=self.device) for g in self.generators])


def restart_groups(n_restarts: int) -> list[range]:
    """The batches a fit runs its restarts in: restart 0 alone (bit for bit the fit with
    ``n_init=1``), then the others together."""
    return [range(1)] if n_restarts == 1 else [range(1), range(1, n_restarts)]
