"""Data that arrive in batches: recognising batch sources, and a uniform sample of a stream.

A *batch source* is anything ``fit`` can pass over several times: a ``DataLoader`` (or any
re-iterable object that is not a tensor, array or list) or a callable returning a fresh iterator
per pass. Each batch is a tensor/array ``(n, D)`` or ``(*batch_shape, n, D)``, or a tuple/list
whose first element is one (``(x, y)`` from a labelled DataLoader).
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np
import torch

BatchSource = Callable[[], Iterator[Any]]


def batch_source(X: Any) -> BatchSource | None:
    """A function giving a fresh iterator of raw batches per call, or None when X is one array."""
    if isinstance(X, (torch.Tensor, np.ndarray, list, tuple)) or np.isscalar(X):
        return None
    if callable(X):
        return X
    if hasattr(X, "__iter__"):
        if iter(X) is X:
            raise ValueError(
                "X is a one-shot iterator (e.g. a generator), but EM passes over the data once per "
                "iteration: pass a DataLoader, or a callable returning a fresh iterator per pass"
            )
        return lambda: iter(X)
    return None


def unwrap_batch(batch: Any) -> Any:
    """The data of one batch: the first element of an ``(x, y, ...)`` tuple or list of tensors."""
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], (torch.Tensor, np.ndarray)):
        return batch[0]
    return batch


class StreamSample:
    """A uniform random sample without replacement of at most ``size`` points of a stream.

    Every point gets a random key and the ``size`` smallest keys are kept, batch by batch, so the
    sample is uniform whatever the batch sizes. Points are taken along axis -2 of the working
    layout ((n, D) or (M, n, D)); per-model data keep the same point indices for every model.
    """

    def __init__(self, size: int, generator: torch.Generator) -> None:
        self.size = size
        self.generator = generator
        self.keys: torch.Tensor | None = None
        self.points: torch.Tensor | None = None

    def add(self, batch: torch.Tensor) -> None:
        keys = torch.rand(batch.shape[-2], generator=self.generator, device=batch.device)
        if self.points is not None:
            keys = torch.cat([self.keys, keys])
            batch = torch.cat([self.points, batch], dim=-2)
        if keys.numel() > self.size:
            keep = keys.topk(self.size, largest=False).indices.sort().values
            keys, batch = keys[keep], batch[..., keep, :]
        self.keys, self.points = keys, batch
