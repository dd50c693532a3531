"""From what a user passes to ``fit`` to the engine's data: validated rows, weights, streams.

A module's ``fit`` takes one tensor/array (with optional per-point weights) or a batch source
(a DataLoader, or a callable returning a fresh iterator of batches per pass, whose batches may
carry weights). :class:`Observations` turns either into :class:`torch_em.data.Data` or
:class:`torch_em.data.StreamData`: every batch validated in the module's dtype and layout, the
reference point and the (weighted) number of points combined over torch.distributed ranks, and
a uniform sample of bounded size for initialisation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, cast

import torch

from . import distributed
from ._random import resolve_seed
from ._validation import check_sample_weight
from .data import Data, StreamData
from .families.base import ComponentFamily
from .layout import Layout
from .missing import mean_imputed, observed_means, pattern_share
from .streaming import BatchSource, StreamSample, unwrap_batch

#: ``sample_weight`` of ``fit`` for a batch source whose batches are ``(x, w, ...)``.
WEIGHTS_IN_BATCHES = "batches"


@dataclass
class Observations:
    """How one module's data become the engine's.

    validate(X, name, min_samples=1, n_features=None): X as a checked tensor in the module's
    dtype (NaN at missing entries where the module marginalises them); chunk_size(n_features,
    pattern_share=0): rows per chunk of the E-step (of data with missing entries in that many
    distinct patterns per row); sample_size: points that
    initialisation works on at most; generator(): a fresh generator seeded from the module's seed.
    """

    family: ComponentFamily
    layout: Layout
    n_components: int
    n_features: int | None
    validate: Callable[..., torch.Tensor]
    chunk_size: Callable[..., int]  # (n_features, pattern_share=0.0) -> rows per chunk
    sample_size: int
    seed: int | None
    generator: Callable[[], torch.Generator]
    device: torch.device

    def weights(self, sample_weight: Any, X: torch.Tensor, name: str = "sample_weight") -> torch.Tensor | None:
        """Weights of the working data X as a tensor (N,) or (M, N), or None."""
        return self.layout.weights(check_sample_weight(
            sample_weight, name, n_points=X.shape[-2], batch_shape=self.layout.batch_shape, device=X.device,
            dtype=X.dtype))

    def tensor(self, X: Any, sample_weight: Any = None) -> Data:
        """Validated data (and weights) for a fit, its reference point, and a sample to
        initialise on (a uniform subset when the data are large: bounded memory)."""
        X = self.layout.data(self.validate(X, "X", min_samples=self.n_components))
        weights = self.weights(sample_weight, X)
        share = pattern_share(X)
        missing = share > 0
        chunk = self.chunk_size(X.shape[-1], pattern_share=share)
        # With missing entries the reference is the mean of the observed ones, and initialisation
        # works on the data with every missing entry at its coordinate's mean.
        complete = mean_imputed(X) if missing else X
        reference = distributed.combined_reference(self.family.reference(complete), X.shape[-2])
        data = Data(self.family, X, reference, chunk, weights=weights)
        data.total_weight = distributed.total_weight(data.total_weight, X.device)
        if X.shape[-2] > self.sample_size:
            generator = torch.Generator().manual_seed(resolve_seed(self.seed))
            keep = torch.randperm(X.shape[-2], generator=generator)[: self.sample_size].sort().values.to(X.device)
            data.sample = Data(self.family, complete[..., keep, :], reference, self.chunk_size(X.shape[-1]),
                               weights=None if weights is None else weights[..., keep])
        elif missing:
            data.sample = Data(self.family, complete, reference, self.chunk_size(X.shape[-1]), weights=weights)
        return data

    def stream(self, source: BatchSource, sample_weight: Any = None) -> StreamData:
        """First pass over a batch source: validate every batch, count the points (and weigh
        them), take the data mean (for families with a reference point) and a uniform sample
        for initialisation. ``sample_weight``: None, or ``"batches"`` (every batch is
        ``(x, w, ...)``)."""
        weighted = _weights_in_batches(sample_weight)
        sample = StreamSample(self.sample_size, self.generator())
        total_weight: float | torch.Tensor
        n_points, total, n_features, shared, total_weight = 0, None, self.n_features, None, 0.0
        n_observed, missing = None, False
        for raw in source():
            batch, weights = self._batch(raw, n_features, weighted)
            if shared is not None and shared != (batch.dim() == 2):
                raise ValueError("X batches must all be (n, D) or all (*batch_shape, n, D), got a mix")
            shared, n_features = batch.dim() == 2, batch.shape[-1]
            n_points += batch.shape[-2]
            total_weight = total_weight + (batch.shape[-2] if weights is None else weights.sum(-1))
            missing = missing or bool(torch.isnan(batch).any())
            if self.family.uses_reference:  # sums and counts of the observed entries
                observed = ~torch.isnan(batch)
                batch_sum = torch.where(observed, batch, 0.0).sum(-2, keepdim=True)
                batch_count = observed.sum(-2, keepdim=True)
                total = batch_sum if total is None else total + batch_sum
                n_observed = batch_count if n_observed is None else n_observed + batch_count
            sample.add(batch, weights)
        # (total and n_observed are set together)
        mean = None if total is None or n_observed is None else torch.where(
            n_observed > 0, total / n_observed.clamp_min(1), 0.0)
        reference = distributed.combined_reference(mean, n_points)
        n_local, n_points = n_points, distributed.total_points(n_points, self.device)
        if n_points < self.n_components:
            raise ValueError(f"X must have at least {self.n_components} sample(s) (one per component), "
                             f"got N={n_points} in all batches")
        # (at least one batch was seen: its number of features, its points in the sample)
        seen_features = cast(int, n_features)
        chunk = self.chunk_size(seen_features, pattern_share=1.0 if missing else 0.0)  # at worst, every row its own pattern

        def batches():
            for raw in source():
                yield self._batch(raw, n_features, weighted)

        points = cast(torch.Tensor, sample.points)
        if missing:  # initialisation works on the sample with missing entries at the coordinates' means
            points = mean_imputed(points, observed_means(points) if reference is None else reference)
        sample_data = Data(self.family, points, reference, self.chunk_size(seen_features), weights=sample.weights)
        return StreamData(self.family, batches, reference, distributed.total_weight(total_weight, self.device), chunk,
                          sample_data, n_local=n_local, name="X (the batch source)")

    def _batch(self, raw: Any, n_features: int | None, weighted: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One validated batch of a source in the working layout, with its weights (or None)."""
        if not weighted:
            return self.layout.data(self.validate(unwrap_batch(raw), "X batch", n_features=n_features)), None
        if not isinstance(raw, (tuple, list)) or len(raw) < 2:
            raise ValueError(
                f"with sample_weight={WEIGHTS_IN_BATCHES!r} every batch must be (x, w, ...), got {type(raw).__name__}"
            )
        batch = self.layout.data(self.validate(raw[0], "X batch", n_features=n_features))
        return batch, self.weights(raw[1], batch, "sample_weight (of a batch)")


def _weights_in_batches(sample_weight: Any) -> bool:
    """Whether the batches of a batch source carry weights (``sample_weight="batches"``)."""
    if sample_weight is None or (isinstance(sample_weight, str) and sample_weight == WEIGHTS_IN_BATCHES):
        return sample_weight is not None
    raise ValueError(
        f"sample_weight must be None or {WEIGHTS_IN_BATCHES!r} (every batch is (x, w, ...)) when X is a batch "
        f"source, got {type(sample_weight).__name__}"
    )
