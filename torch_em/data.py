"""Observations prepared for EM: chunks of features, optional per-point weights, streams.

Inside a fit every tensor carries a working batch ``(R, M)``: ``R`` restarts (``n_init``) times
``M`` independent models (the flattened ``batch_shape``). Data are either shared by all models,
``X (N, D)``, or one dataset per model, ``X (M, N, D)``; per-point weights are ``(N,)`` (the same
for every model) or ``(M, N)`` (e.g. one bootstrap resample per model), whatever the data's
layout. An E-step passes over :meth:`Data.parts` (one part for data in memory, one per batch of
a stream) and the chunks of each part (:meth:`Data.chunks`), which carry what it needs.
"""
from __future__ import annotations

from typing import Callable, Iterator, NamedTuple

import torch

from .families.base import ComponentFamily
from .missing import MissingRows

#: Log-density rows per chunk are chosen so one chunk's (n, R*M*K) block stays near this size.
CHUNK_ELEMENTS = 1 << 21
#: Features of the whole dataset are computed once per fit when they take at most this many bytes.
FEATURE_CACHE_BYTES = 256 << 20

Weights = torch.Tensor  # (n,) shared by every model or (M, n) one set per model


def features_fit_in_cache(n_rows: int, n_stats: int, element_size: int) -> bool:
    """Whether the features of ``n_rows`` rows (over every model), ``n_stats`` numbers each, are
    small enough to be kept for a whole fit (``FEATURE_CACHE_BYTES``)."""
    return n_rows * n_stats * element_size <= FEATURE_CACHE_BYTES


def default_chunk_size(n_models: int, n_components: int, n_stats: int) -> int:
    return max(256, CHUNK_ELEMENTS // max(1, n_models * n_components + n_stats))


class Chunk(NamedTuple):
    """Rows of the data as the E-step sees them.

    X: (n, D) or (M, n, D); T: the family's features (n, F) or (M, n, F); h: (n,) or (M, n) or
    None; weights: (n,) or (M, n) or None (every point counts once); lengths: (s,) when the n
    rows are s sequences padded to n // s steps (:class:`SequenceData`), else None; missing:
    the rows by missingness pattern when some entries are missing (NaN; then T and h are None:
    the family's :meth:`~ComponentFamily.marginal` replaces them), else None.
    """

    X: torch.Tensor
    T: torch.Tensor | None
    h: torch.Tensor | None
    weights: Weights | None
    lengths: torch.Tensor | None = None
    missing: MissingRows | None = None


class Data:
    """Data in memory prepared for EM: features ``T(x)`` of fixed-size row chunks, cached when small.

    X: (N, D) shared by every model or (M, N, D) one dataset per model.
    reference: the family's reference point, broadcastable to data and parameters, or None.
    weights: per-point weights (N,) or (M, N), or None.
    cache: whether features may be kept for the whole fit (``"always"``: whatever their size,
        e.g. to keep their autograd graph).

    Chunks with missing entries (NaN, validated by the caller) carry their rows by missingness
    pattern (:class:`torch_em.missing.MissingRows`) instead of features.
    """

    def __init__(
        self, family: ComponentFamily, X: torch.Tensor, reference: torch.Tensor | None, chunk_size: int,
        cache: bool | str = True, weights: Weights | None = None,
    ):
        self.family = family
        self.X = X
        self.reference = reference
        self.weights = weights
        self.n_points = X.shape[-2]
        #: The (weighted) number of points, over all ranks under torch.distributed (set by the
        #: caller): a number, or (M,) per model when the weights are per model.
        self.total_weight: float | torch.Tensor = self.n_points if weights is None else weights.sum(-1)
        self._sample: Data | None = None
        self.chunk_size = chunk_size
        self.bounds = [(start, min(start + chunk_size, self.n_points)) for start in range(0, self.n_points, chunk_size)]
        self._cache: list[tuple[torch.Tensor | None, torch.Tensor | None, MissingRows | None]] | None = None
        self.has_missing = bool(torch.isnan(X).any()) if X.is_floating_point() else False
        n_stats = family.n_statistics(X.shape[-1])
        small = features_fit_in_cache(X.numel() // X.shape[-1], n_stats, X.element_size())
        if cache == "always" or (cache and small):
            self._cache = [self._layout(*self._features(start, stop)) for start, stop in self.bounds]

    @property
    def sample(self) -> "Data":
        """The data that initialisation works on: these data, or a subset of large data set by
        the caller. (Not stored as ``self``: a reference cycle would keep every per-batch Data of
        a stream, and its tensors, alive until the cyclic garbage collector ran.)"""
        return self if self._sample is None else self._sample

    @sample.setter
    def sample(self, value: "Data") -> None:
        self._sample = value

    def _layout(self, T: torch.Tensor | None, h: torch.Tensor | None, missing: MissingRows | None = None
                ) -> tuple[torch.Tensor | None, torch.Tensor | None, MissingRows | None]:
        """Per-model data: many small GEMMs, much faster on feature-major features (both E-step
        GEMMs then read rows of points). Shared data (one large GEMM) keep the point-major
        layout, which suits its statistics GEMM."""
        return (T.mT.contiguous().mT, h, missing) if T is not None and T.dim() == 3 else (T, h, missing)

    def _features(self, start: int, stop: int) -> tuple[torch.Tensor | None, torch.Tensor | None, MissingRows | None]:
        """Features (T, h) of the rows, or (None, None, their missingness layout) when some
        entries are missing."""
        X = self.X[..., start:stop, :]
        if self.has_missing and bool(torch.isnan(X).any()):
            return None, None, MissingRows.of(X)
        return (*self.family.features(X, self.reference), None)

    def parts(self) -> Iterator["Data"]:
        """The parts an E-step passes over: these data whole."""
        yield self

    def chunks(self) -> Iterator[Chunk]:
        for index, (start, stop) in enumerate(self.bounds):
            T, h, missing = self._cache[index] if self._cache is not None else self._features(start, stop)
            weights = None if self.weights is None else self.weights[..., start:stop]
            yield Chunk(self.X[..., start:stop, :], T, h, weights, missing=missing)

    def select_models(self, models: torch.Tensor) -> "Data":
        """The data of the models ``models`` (A,) only, in that order (shared data stay shared)."""
        selected = type(self).__new__(type(self))
        selected.__dict__.update(self.__dict__)
        per_model = self.X.dim() == 3
        selected.X = self.X[models] if per_model else self.X
        if per_model and self.reference is not None and self.reference.dim() == 3:
            selected.reference = self.reference[models]
        if self.weights is not None and self.weights.dim() == 2:
            selected.weights = self.weights[models]
        if isinstance(self.total_weight, torch.Tensor) and self.total_weight.dim() == 1:
            selected.total_weight = self.total_weight[models]
        if self._cache is not None and per_model:
            selected._cache = [self._layout(None if T is None else T[models], None if h is None else h[models],
                                            None if missing is None else missing.select_models(models))
                               for T, h, missing in self._cache]
        selected._sample = None if self._sample is None else self._sample.select_models(models)
        return selected


class SequenceData(Data):
    """Sequences in memory prepared for EM: S sequences padded to ``n_steps`` steps each, stored
    as rows ``(S * n_steps, D)`` (or ``(M, S * n_steps, D)``), sequence after sequence, so the
    emission family sees rows as a mixture's do. Chunks hold whole sequences and carry their
    ``lengths``; padded steps have weight 0 (they take part in no statistic).

    lengths: (S,) int64, 1 <= lengths <= n_steps; weights: per-row weights (S * n_steps,) or
    (M, S * n_steps), 0 at padded steps (:func:`sequence_row_weights`).
    """

    def __init__(
        self, family: ComponentFamily, X: torch.Tensor, lengths: torch.Tensor, n_steps: int,
        reference: torch.Tensor | None, chunk_size: int, cache: bool | str = True, weights: Weights | None = None,
    ):
        self.lengths = lengths
        self.n_steps = n_steps
        # Whole sequences per chunk: at least one, however long.
        super().__init__(family, X, reference, max(1, chunk_size // n_steps) * n_steps, cache, weights)

    def chunks(self) -> Iterator[Chunk]:
        for (start, stop), chunk in zip(self.bounds, super().chunks()):
            yield chunk._replace(lengths=self.lengths[start // self.n_steps: stop // self.n_steps])


def sequence_row_weights(lengths: torch.Tensor, n_steps: int, sequence_weights: torch.Tensor | None,
                         dtype: torch.dtype) -> torch.Tensor:
    """Per-row weights (S * n_steps,) or (M, S * n_steps) of padded sequences: the weight of
    the row's sequence (``sequence_weights`` (S,) / (M, S), or 1) at its steps, 0 at padding."""
    valid = torch.arange(n_steps, device=lengths.device) < lengths.unsqueeze(-1)  # (S, n_steps)
    weights = valid.to(dtype)
    if sequence_weights is not None:
        weights = weights * sequence_weights.unsqueeze(-1)  # (S, n_steps) or (M, S, n_steps)
    return weights.flatten(-2)


class StreamData:
    """Data that arrive in batches (larger than memory, or from a DataLoader): every E-step is
    one pass over ``batches()``, summing the statistics batch by batch. Empty components are
    re-seeded from a sample of the data (``sample``, a :class:`Data`).

    batches(): a fresh iterator of working-layout batches ``(X, weights)`` per call, X (n, D) or
    (M, n, D) and weights (n,) / (M, n) or None; or ``(X, weights, lengths)`` for batches of
    padded sequences (rows as :class:`SequenceData`'s, lengths (s,));
    total_weight: their (weighted) number of points (over all ranks under torch.distributed);
    n_local: the points of one pass on this rank, when known (every pass is checked against it);
    name: how error messages call the source.
    """

    def __init__(
        self, family: ComponentFamily, batches: Callable[[], Iterator[tuple[torch.Tensor, Weights | None]]],
        reference: torch.Tensor | None, total_weight: float | torch.Tensor, chunk_size: int, sample: Data, *,
        n_local: int | None = None, name: str = "the batch source", models: torch.Tensor | None = None,
    ):
        self.family = family
        self.batches = batches
        self.reference = reference
        self.total_weight = total_weight
        self.chunk_size = chunk_size
        self.sample = sample
        self.n_local = n_local
        self.name = name
        self.models = models  # the models (A,) a compacted fit still runs, or None: all

    def parts(self) -> Iterator[Data]:
        """One :class:`Data` per batch of a pass (features not cached), checking the pass's size."""
        seen = 0
        lengths: list[torch.Tensor]  # (B,) of a batch of padded sequences, if the source yields them
        for X, weights, *lengths in self.batches():
            seen += X.shape[-2]
            if self.n_local is not None and seen > self.n_local:  # stop before summing points of another dataset
                self._raise_changed(f"more than {self.n_local}")
            if self.models is not None:  # the models a compacted fit still runs
                X = X[self.models] if X.dim() == 3 else X
                weights = weights[self.models] if weights is not None and weights.dim() == 2 else weights
            if lengths:  # a batch of padded sequences
                yield SequenceData(self.family, X, lengths[0], X.shape[-2] // lengths[0].shape[0], self.reference,
                                   self.chunk_size, cache=False, weights=weights)
            else:
                yield Data(self.family, X, self.reference, self.chunk_size, cache=False, weights=weights)
        if self.n_local is not None and seen != self.n_local:
            self._raise_changed(str(seen))

    def select_models(self, models: torch.Tensor) -> "StreamData":
        """The stream restricted to the models ``models`` (A,) (indices among all models)."""
        chosen = models if self.models is None else self.models[models]
        reference = self.reference
        if reference is not None and reference.dim() == 3:
            reference = reference[models]
        total = self.total_weight
        if isinstance(total, torch.Tensor) and total.dim() == 1:
            total = total[models]
        return StreamData(self.family, self.batches, reference, total, self.chunk_size, self.sample.select_models(models),
                          n_local=self.n_local, name=self.name, models=chosen)

    def _raise_changed(self, seen: str) -> None:
        """A pass that yields another number of points than the first would make the lower
        bound (a mean over the points) and the M-step silently wrong."""
        raise ValueError(
            f"{self.name} yielded {seen} points in a pass of EM but {self.n_local} in the first pass; it must yield "
            "the same points on every pass (a DataLoader with a fixed dataset and without a sampler that draws "
            "a varying number of points)"
        )
