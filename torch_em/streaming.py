"""Data that arrive in batches: recognising batch sources, and a uniform sample of a stream.

A *batch source* is anything ``fit`` can pass over several times: a ``DataLoader`` (or any
re-iterable object that is not a tensor, array or list) or a callable returning a fresh iterator
per pass. Each batch is a tensor/array ``(n, D)`` or ``(*batch_shape, n, D)``, a tuple/list
whose first element is one (``(x, y)`` from a labelled DataLoader), or a dict holding it under
``"x"``.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, cast

import numpy as np
import torch

from ._validation import check_positive, is_sparse_matrix

BatchSource = Callable[[], Iterator[Any]]


def batch_source(X: Any) -> BatchSource | None:
    """A function giving a fresh iterator of raw batches per call, or None when X is one array:
    a tensor, list or tuple, or anything with ``__array__`` or ``__dataframe__`` (a pandas
    DataFrame, which iterates over its column labels) or a scipy sparse matrix (rejected when
    converted)."""
    if is_array_like(X):
        return None
    if callable(X):
        return _checked_callable(X)
    if hasattr(X, "__iter__"):
        if iter(X) is X:
            raise ValueError(
                "X is a one-shot iterator (e.g. a generator), but EM passes over the data once per "
                "iteration: pass a DataLoader, or a callable returning a fresh iterator per pass"
            )
        return lambda: iter(X)
    return None


def is_array_like(X: Any) -> bool:
    """Whether X is one array of data rather than a source of batches."""
    return (isinstance(X, (torch.Tensor, np.ndarray, list, tuple)) or np.isscalar(X) or hasattr(X, "__array__")
            or hasattr(X, "__dataframe__") or is_sparse_matrix(X))


def _checked_callable(make_batches: Callable[[], Any]) -> BatchSource:
    """``make_batches`` as a batch source that says so when a call returns no iterable."""
    def fresh_batches() -> Iterator[Any]:
        batches = make_batches()
        if not hasattr(batches, "__iter__"):
            raise ValueError(
                "X is a callable, so it must return a fresh iterator of batches per pass, "
                f"got {type(batches).__name__} from it"
            )
        return iter(batches)
    return fresh_batches


#: The key of the data in a batch that is a dict (e.g. ``{"x": ..., "label": ...}``).
BATCH_KEY = "x"


def unwrap_batch(batch: Any) -> Any:
    """The data of one batch: the first element of an ``(x, y, ...)`` tuple or list of tensors,
    or the ``"x"`` entry of a dict."""
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], (torch.Tensor, np.ndarray)):
        return batch[0]
    if isinstance(batch, dict):
        if BATCH_KEY not in batch:
            raise ValueError(f"a batch that is a dict must hold its data under {BATCH_KEY!r}, got keys {sorted(batch)}")
        return batch[BATCH_KEY]
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
        self.weights: torch.Tensor | None = None  # (n,) or (M, n) of the sampled points, if weighted

    def add(self, batch: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """Offer the points of ``batch`` (n, D) or (M, n, D) with their weights ((n,) or (M, n);
        every batch of a stream weighted, or none)."""
        keys = torch.rand(batch.shape[-2], generator=self.generator, device=batch.device)
        if self.points is not None:
            keys = torch.cat([cast(torch.Tensor, self.keys), keys])  # kept with the points
            batch = torch.cat([self.points, batch], dim=-2)
            if weights is not None:  # every batch of the stream is weighted: so were the kept points
                weights = _cat_weights(cast(torch.Tensor, self.weights), weights)
        if keys.numel() > self.size:
            keep = keys.topk(self.size, largest=False).indices.sort().values
            keys, batch = keys[keep], batch[..., keep, :]
            weights = None if weights is None else weights[..., keep]
        self.keys, self.points, self.weights = keys, batch, weights


def _cat_weights(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Weights of consecutive points, (n1,) or (M, n1) and (n2,) or (M, n2), as one tensor."""
    if first.dim() != second.dim():
        models = max(first, second, key=lambda w: w.dim()).shape[0]
        first, second = (w.expand(models, -1) if w.dim() == 1 else w for w in (first, second))
    return torch.cat([first, second], -1)


class StepSchedule:
    """Step sizes of stepwise (online) updates ``s <- (1 - rho_t) s + rho_t s_hat``.

    ``rho_t = step_size`` when given (constant: exponential forgetting for drifting streams),
    else ``(t + learning_offset) ** -learning_decay`` with learning_decay in (0.5, 1] (the
    Robbins-Monro conditions), or 0 (every batch replaces the statistics). The first batch
    always has rho = 1.
    """

    def __init__(self, learning_decay: float, learning_offset: float, step_size: float | None) -> None:
        check_positive(learning_decay, "learning_decay", allow_zero=True)
        if not (learning_decay == 0 or 0.5 < learning_decay <= 1):
            raise ValueError(f"learning_decay must be 0 or in (0.5, 1], got {learning_decay!r}")
        check_positive(learning_offset, "learning_offset", allow_zero=True)
        if step_size is not None:
            check_positive(step_size, "step_size")
            if step_size > 1:
                raise ValueError(f"step_size must be in (0, 1], got {step_size!r}")
        self.learning_decay = float(learning_decay)
        self.learning_offset = float(learning_offset)
        self.step_size = None if step_size is None else float(step_size)

    def rho(self, previous_steps: int) -> float:
        """Step size of the update after ``previous_steps`` earlier ones."""
        if previous_steps == 0:
            return 1.0
        if self.step_size is not None:
            return self.step_size
        return (previous_steps + self.learning_offset) ** -self.learning_decay


