"""The EM engine shared by every family: chunked E-step, M-step with re-seeding, the EM loop.

Inside a fit every tensor carries a working batch ``(R, M)``: ``R`` restarts (``n_init``) times
``M`` independent models (the flattened ``batch_shape``). Data are either shared by all models,
``X (N, D)``, or one dataset per model, ``X (M, N, D)``. Component log-densities are laid out as
``(R, M, K, n)`` with the points last, which makes both GEMMs copy-free and keeps the reductions
over a short K axis vectorised along the points:

    shared data:    log_prob (R*M*K, n) = eta (R*M*K, F) @ T^T (F, n)
    per-model data: log_prob (R, M, K, n) = eta (R, M, K, F) @ T^T (M, F, n)
    statistics:     S (R, M, K, F) = resp (R, M, K, n) @ T (n, F) or (M, n, F)
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from . import distributed
from .families.base import ComponentFamily, IllConditionedError, Theta

#: Log-density rows per chunk are chosen so one chunk's (n, R*M*K) block stays near this size.
CHUNK_ELEMENTS = 1 << 21
#: Features of the whole dataset are computed once per fit when they take at most this many bytes.
FEATURE_CACHE_BYTES = 256 << 20
#: A fit evaluates a component directly, and takes its statistics about its own reference point,
#: when the expansion about the shared one would round by more than this (nats per feature).
FIT_ERROR_PER_FEATURE = 1e-4
#: Reported densities (log_prob, predict_proba, ...) evaluate a component directly when the
#: expansion would be this many times less accurate than a direct evaluation ...
EVALUATION_ERROR_RATIO = 4.0
#: ... and not below this many nats per feature anyway (float64, mostly).
NEGLIGIBLE_ERROR_PER_FEATURE = 1e-9
#: log2(e). The E-step works on log-densities in bits: exp2 is several times faster than exp on
#: CPUs (vectorised), and the scale is folded into the natural parameters, which are small.
LOG2_E = 1.0 / math.log(2.0)
LN_2 = math.log(2.0)


def default_chunk_size(n_models: int, n_components: int, n_stats: int) -> int:
    return max(256, CHUNK_ELEMENTS // max(1, n_models * n_components + n_stats))


class Data:
    """Data prepared for EM: features ``T(x)`` of fixed-size row chunks, cached when small.

    X: (N, D) shared by every model or (M, N, D) one dataset per model.
    shift: the family's reference point, broadcastable to data and parameters, or None.
    """

    def __init__(
        self, family: ComponentFamily, X: torch.Tensor, shift: torch.Tensor | None, chunk_size: int, cache: bool = True
    ):
        self.family = family
        self.X = X
        self.shift = shift
        self.n_points = X.shape[-2]
        #: Points over all ranks under torch.distributed (set by the caller), else n_points.
        self.n_total = self.n_points
        self._sample: Data | None = None
        self.chunk_size = chunk_size
        self.bounds = [(start, min(start + chunk_size, self.n_points)) for start in range(0, self.n_points, chunk_size)]
        self._cache: list[tuple[torch.Tensor, torch.Tensor | None]] | None = None
        n_stats = family.n_statistics(X.shape[-1])
        if cache and X.numel() // X.shape[-1] * n_stats * X.element_size() <= FEATURE_CACHE_BYTES:
            # Per-model data: many small GEMMs, much faster on feature-major features. Shared data
            # (one large GEMM) keeps the point-major layout, which suits its statistics GEMM.
            layout = _feature_major if X.dim() == 3 else (lambda T, h: (T, h))
            self._cache = [layout(*self._features(start, stop)) for start, stop in self.bounds]

    @property
    def sample(self) -> "Data":
        """The data that initialisation works on: these data, or a subset of large data set by
        the caller. (Not stored as ``self``: a reference cycle would keep every per-batch Data of
        a stream, and its tensors, alive until the cyclic garbage collector ran.)"""
        return self if self._sample is None else self._sample

    @sample.setter
    def sample(self, value: "Data") -> None:
        self._sample = value

    def _features(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.family.features(self.X[..., start:stop, :], self.shift)

    def chunks(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """Yields ``(T, h)``: T (n, F) or (M, n, F); h (n,) or (M, n) or None."""
        if self._cache is not None:
            yield from self._cache
        else:
            for start, stop in self.bounds:
                yield self._features(start, stop)

    def statistics(self, eta: torch.Tensor, const: torch.Tensor, own: "OwnReference | None" = None) -> "Statistics":
        """Statistics of the data (summed over ranks under torch.distributed)."""
        return e_step(self, eta, const, own).reduced()

    def worst_points(self, eta: torch.Tensor, const: torch.Tensor, k: int) -> torch.Tensor:
        """Features of the k worst-explained points (rank 0's under torch.distributed)."""
        return distributed.broadcast(worst_point_features(self, eta, const, k))[0]


def _feature_major(T: torch.Tensor, h: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The same features T (..., n, F), stored feature-major ((..., F, n) contiguous, transposed
    view): both E-step GEMMs then read rows of points, which small batched GEMMs do much faster."""
    return T.mT.contiguous().mT, h


class StreamData:
    """Data that arrive in batches (larger than memory, or from a DataLoader): every E-step is
    one pass over ``batches()``, summing the statistics batch by batch. Empty components are
    re-seeded from a sample of the data (``sample``, a :class:`Data`).

    batches(): a fresh iterator of working-layout batches (n, D) or (M, n, D) per call;
    n_points: their total (over all ranks under torch.distributed);
    n_local: the points of one pass on this rank, when known (every pass is checked against it);
    name: how error messages call the source.
    """

    def __init__(
        self, family: ComponentFamily, batches: Callable[[], Iterator[torch.Tensor]], shift: torch.Tensor | None,
        n_points: int, chunk_size: int, sample: Data, *, n_local: int | None = None, name: str = "the batch source",
    ):
        self.family = family
        self.batches = batches
        self.shift = shift
        self.n_total = n_points
        self.chunk_size = chunk_size
        self.sample = sample
        self.n_local = n_local
        self.name = name

    def statistics(self, eta: torch.Tensor, const: torch.Tensor, own: "OwnReference | None" = None) -> "Statistics":
        total, seen = None, 0
        for batch in self.batches():
            seen += batch.shape[-2]
            if self.n_local is not None and seen > self.n_local:  # stop before summing points of another dataset
                self._raise_changed(f"more than {self.n_local}")
            stats = e_step(Data(self.family, batch, self.shift, self.chunk_size, cache=False), eta, const, own)
            total = stats if total is None else total + stats
        if self.n_local is not None and seen != self.n_local:
            self._raise_changed(str(seen))
        return total.reduced()

    def _raise_changed(self, seen: str) -> None:
        """A pass that yields another number of points than the first would make the lower
        bound (a mean over ``n_points``) and the M-step silently wrong."""
        raise ValueError(
            f"{self.name} yielded {seen} points in a pass of EM but {self.n_local} in the first pass; it must yield "
            "the same points on every pass (a DataLoader with a fixed dataset and without a sampler that draws "
            "a varying number of points)"
        )

    def worst_points(self, eta: torch.Tensor, const: torch.Tensor, k: int) -> torch.Tensor:
        return self.sample.worst_points(eta, const, k)


def component_log_prob(
    T: torch.Tensor, h: torch.Tensor | None, eta: torch.Tensor, const: torch.Tensor
) -> torch.Tensor:
    """``log p(x_n | component k of model (r, m)) + const[r, m, k]`` for one chunk: (R, M, K, n).

    T (n, F) shared by all models or (M, n, F); h (n,) or (M, n) or None; eta (R, M, K, F);
    const (R, M, K).
    """
    if T.dim() == 2:
        # mm then an in-place add: addmm with a broadcast column bias copies it first (slow on CPU).
        lp = (eta.reshape(-1, eta.shape[-1]) @ T.T).add_(const.reshape(-1, 1))  # (R*M*K, n)
        lp = lp.view(*eta.shape[:-1], T.shape[0])
    elif eta.dim() == 4 and eta.shape[1] == T.shape[0]:
        lp = _per_model_log_prob(T, eta, const)
    else:
        lp = (eta @ T.mT).add_(const.unsqueeze(-1))
    return lp if h is None else lp + h.unsqueeze(-2)


def _per_model_log_prob(T: torch.Tensor, eta: torch.Tensor, const: torch.Tensor) -> torch.Tensor:
    """``eta @ T^T + const`` as one baddbmm, which adds const as it writes (no extra pass).

    Shape:
        T: (M, n, F); eta: (R, M, K, F); const: (R, M, K) -> (R, M, K, n)
    """
    R, M, K, F = eta.shape
    points = T.mT.expand(R, M, F, T.shape[1]).reshape(R * M, F, T.shape[1])  # a view when R == 1
    lp = torch.baddbmm(const.reshape(R * M, K, 1), eta.reshape(R * M, K, F), points)  # (R*M, K, n)
    return lp.view(R, M, K, T.shape[1])


def normalise(log_joint: torch.Tensor, inplace: bool = False, dim: int = -2) -> tuple[torch.Tensor, torch.Tensor]:
    """Responsibilities and per-point log-likelihood from ``log_joint`` with components on ``dim``.

    Returns resp (same shape) and the log-likelihood (``dim`` removed). See :func:`normalise_bits`.
    """
    scaled = log_joint.mul_(LOG2_E) if inplace else log_joint * LOG2_E
    resp, peak, total = normalise_bits(scaled, inplace=inplace, dim=dim)
    return resp, (peak + total.log2()).squeeze(dim) * LN_2


def normalise_bits(
    log2_joint: torch.Tensor, inplace: bool = False, dim: int = -2
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Responsibilities from log-densities in bits (``log2``) with components on ``dim``.

    Written out (max-subtract, exp2, normalise) rather than ``softmax``/``logsumexp``: it is one
    exp2 per entry and several times faster over a short component axis. Responsibilities are
    kept above the smallest normal number (no subnormal arithmetic).
    Returns resp (same shape), the peak and the total, both with ``dim`` kept as size 1: the
    per-point log2-likelihood is ``peak + log2(total)``, where ``1 <= total <= K``.
    """
    peak = log2_joint.amax(dim, keepdim=True)
    # Clamp so that exp2, and the division by a total of at most K, stay above the smallest normal
    # number: subnormal operands make exp2, sums and GEMMs many times slower on CPUs. A
    # responsibility changes by less than 3 * K * tiny.
    floor = math.log2(torch.finfo(log2_joint.dtype).tiny) + math.log2(log2_joint.shape[dim]) + 1.0
    shifted = log2_joint.sub_(peak) if inplace else log2_joint - peak
    resp = shifted.clamp_min_(floor).exp2_() if inplace else shifted.clamp_min(floor).exp2()
    total = resp.sum(dim, keepdim=True)
    resp = resp.div_(total) if inplace else resp / total
    return resp, peak, total


def sum_log2(values: torch.Tensor, bound: float) -> torch.Tensor:
    """``values.log2().sum(-1)`` for values in ``[1, bound]``, with one log2 per group of values:
    the log2 of their product, which stays finite (log2 is several times slower than a product).

    Shape:
        values: (..., n) -> (...)
    """
    n = values.shape[-1]
    # bound ** group stays below the square root of the largest finite number.
    max_log2 = math.log2(torch.finfo(values.dtype).max)
    group = n if bound <= 1 else max(1, min(n, int(max_log2 / 2 / math.log2(bound))))
    full = n - n % group
    total = values[..., :full].unflatten(-1, (full // group, group)).prod(-1).log2().sum(-1)
    if full < n:
        total = total + values[..., full:].prod(-1).log2()
    return total


def weighted_statistics(T: torch.Tensor, resp: torch.Tensor) -> torch.Tensor:
    """``S[r, m, k] = sum_n resp[r, m, k, n] T(x_n)``: (R, M, K, F) from resp (R, M, K, n) and
    T (n, F) or (M, n, F)."""
    if T.dim() == 2:
        return (resp.reshape(-1, resp.shape[-1]) @ T).view(*resp.shape[:-1], T.shape[-1])
    return resp @ T


@dataclass
class Statistics:
    """Sums over points for a working batch (R, M)."""

    counts: torch.Tensor  # (R, M, K) expected number of points per component
    sums: torch.Tensor  # (R, M, K, F) expected sufficient statistics
    log_likelihood: torch.Tensor  # (R, M) total log-likelihood of the data (nan if not computed)
    #: (R, M, K, D) the point each component's sums are taken about, where some components have
    #: their own (:class:`OwnReference`); None: the data's shared reference point for all.
    reference: torch.Tensor | None = None

    def __add__(self, other: "Statistics") -> "Statistics":
        # Both summands come from one pass, with the same reference points.
        return Statistics(self.counts + other.counts, self.sums + other.sums,
                          self.log_likelihood + other.log_likelihood, self.reference)

    def reduced(self) -> "Statistics":
        """Summed over the ranks of torch.distributed (one all_reduce); unchanged without it."""
        return Statistics(*distributed.all_reduce_sum(self.counts, self.sums, self.log_likelihood), self.reference)


@dataclass
class OwnReference:
    """Components of a working batch (R, M, K) that are evaluated and summarised about their own
    reference point instead of the data's shared one, because the expanded form about the shared
    point would cancel (:meth:`ComponentFamily.expansion_error`).

    index: (G,) their flat positions in R * M * K; points: (G, D) the points their statistics are
    taken about; direct: (G,) bool, whether their log-density is evaluated directly from
    ``theta`` (then ``points`` are the family's own reference points of ``theta``); theta: the
    working parameters (R, M, K, ...); log_weights: (G,) their log mixing weights;
    summarise: whether their statistics are taken about ``points`` (False: only the
    log-densities are direct, the statistics stay about the shared point, as online EM's running
    statistics need).
    """

    family: ComponentFamily
    index: torch.Tensor
    points: torch.Tensor
    direct: torch.Tensor
    theta: Theta
    log_weights: torch.Tensor
    summarise: bool = True

    def __post_init__(self) -> None:
        self.all_direct = bool(self.direct.all())

    @staticmethod
    def of(family: ComponentFamily, theta: Theta, log_weights: torch.Tensor, shift: torch.Tensor | None,
           evaluation: bool = False) -> "OwnReference | None":
        """The components of ``theta`` (R, M, K, ...) that need their own reference, or None.

        For a fit (``evaluation=False``), those whose expansion would round by more than
        FIT_ERROR_PER_FEATURE nats per feature (which would also be the relative rounding of
        their covariances): the expansion stays where its error is far below what moves a fit.
        For reported densities (``evaluation=True``, statistics untouched), also those it would
        evaluate EVALUATION_ERROR_RATIO times less accurately than a direct evaluation."""
        errors = family.expansion_error(theta, shift) if family.has_own_reference else None
        if errors is None:
            return None
        expanded, direct = errors  # (R, M, K)
        points = family.own_reference(theta)  # (R, M, K, D)
        n_features = points.shape[-1]
        mask = expanded > FIT_ERROR_PER_FEATURE * n_features
        if evaluation:
            mask |= (expanded > EVALUATION_ERROR_RATIO * direct) & (expanded > NEGLIGIBLE_ERROR_PER_FEATURE * n_features)
        if not bool(mask.any()):
            return None
        index = mask.expand(log_weights.shape).flatten().nonzero().squeeze(-1)  # (G,)
        points = points.flatten(0, -2)[index]  # (G, D)
        direct_mask = torch.ones_like(index, dtype=torch.bool)
        return OwnReference(family, index, points, direct_mask, theta, log_weights.flatten()[index], not evaluation)

    @staticmethod
    def none(family: ComponentFamily, theta: Theta) -> "OwnReference":
        """No component with its own reference yet (to be :meth:`extended`)."""
        points = family.own_reference(theta)
        index = torch.zeros(0, dtype=torch.long, device=points.device)
        return OwnReference(family, index, points.new_zeros(0, points.shape[-1]), index.bool(), theta,
                            points.new_zeros(0))

    def extended(self, extra: torch.Tensor, points: torch.Tensor) -> "OwnReference":
        """The same with the statistics of more components ``extra`` (R, M, K) bool, not yet
        included, taken about ``points`` (R, M, K, D) (their log-densities stay as they were)."""
        index = extra.flatten().nonzero().squeeze(-1)
        return OwnReference(
            self.family, torch.cat([self.index, index]), torch.cat([self.points, points.flatten(0, -2)[index]]),
            torch.cat([self.direct, torch.zeros_like(index, dtype=torch.bool)]), self.theta,
            torch.cat([self.log_weights, self.log_weights.new_zeros(index.shape)]), self.summarise,
        )

    def mask(self, shape: torch.Size) -> torch.Tensor:
        """Which components (R, M, K) have their own reference."""
        mask = torch.zeros(shape.numel(), dtype=torch.bool, device=self.index.device)
        mask[self.index] = True
        return mask.view(shape)

    def attach_reference(self, stats: "Statistics", shift: torch.Tensor | None) -> None:
        """Record in ``stats`` (summed over a pass) every component's reference point
        (R, M, K, D): its own, or the shared ``shift`` (nothing when not summarising)."""
        if not self.summarise:
            return
        shared = self.points.new_zeros(()) if shift is None else shift
        reference = shared.expand(*stats.counts.shape, self.points.shape[-1]).clone()
        reference.view(-1, self.points.shape[-1])[self.index] = self.points
        stats.reference = reference

    def offsets(self, X: torch.Tensor, n_components: int, n_models: int) -> torch.Tensor:
        """``x - point`` (G, n, D) for a chunk X (n, D) shared or (M, n, D) one per model."""
        if X.dim() == 3:
            X = X[(self.index // n_components) % n_models]  # each component's own model's points
        return X - self.points.unsqueeze(-2)

    def groups(self, X: torch.Tensor, n_components: int, n_models: int) -> list[tuple[slice, torch.Tensor]]:
        """The components in groups, each with its offsets (g, n, D) for the chunk X, sized so
        that a group's offsets stay near CHUNK_ELEMENTS."""
        size = max(1, CHUNK_ELEMENTS // max(1, X.shape[-2] * X.shape[-1]))
        parts = [slice(start, start + size) for start in range(0, self.index.numel(), size)]
        whole = len(parts) == 1
        return [(part, (self if whole else self._slice(part)).offsets(X, n_components, n_models)) for part in parts]

    def write_log_prob(self, groups: list[tuple[slice, torch.Tensor]], log2_joint: torch.Tensor,
                       scale: float = LOG2_E) -> None:
        """Overwrite the direct components' log joint densities in ``log2_joint`` (R, M, K, n),
        before normalising, in units of ``1 / scale`` nats (bits by default)."""
        n = log2_joint.shape[-1]
        for part, offsets in groups:
            index, log_weights = self.index[part], self.log_weights[part]
            if not self.all_direct:
                direct = self.direct[part]
                index, log_weights, offsets = index[direct], log_weights[direct], offsets[direct]
            if index.numel():
                log_prob = self.family.direct_log_prob(offsets, self.theta, index)
                log2_joint.view(-1, n)[index] = (log_prob + log_weights.unsqueeze(-1)) * scale

    def write_statistics(self, groups: list[tuple[slice, torch.Tensor]], resp: torch.Tensor, sums: torch.Tensor) -> None:
        """Overwrite the components' statistics ``sums`` (R, M, K, F) by those about their own
        points, from the responsibilities ``resp`` (R, M, K, n)."""
        if not self.summarise:
            return
        n = resp.shape[-1]
        for part, offsets in groups:
            index = self.index[part]
            sums.view(-1, sums.shape[-1])[index] = self.family.own_reference_statistics(offsets, resp.reshape(-1, n)[index])

    def _slice(self, part: slice) -> "OwnReference":
        return OwnReference(self.family, self.index[part], self.points[part], self.direct[part], self.theta,
                            self.log_weights[part], self.summarise)


def e_step(data: Data, eta: torch.Tensor, const: torch.Tensor, own: OwnReference | None = None) -> Statistics:
    """One pass over the data: statistics and total log-likelihood under (eta, const + log w).

    ``own``: components evaluated directly and summarised about their own reference point."""
    eta, const = eta * LOG2_E, const * LOG2_E  # log-densities in bits (normalise_bits)
    total = None
    for (start, stop), (T, h) in zip(data.bounds, data.chunks()):
        log2_joint = component_log_prob(T, None if h is None else h * LOG2_E, eta, const)  # (R, M, K, n)
        if own is not None:
            groups = own.groups(data.X[..., start:stop, :], log2_joint.shape[-2], log2_joint.shape[1])
            own.write_log_prob(groups, log2_joint)
        resp, peak, norm = normalise_bits(log2_joint, inplace=True)  # peak, norm: (R, M, 1, n)
        log2_likelihood = peak.sum((-2, -1)) + sum_log2(norm.squeeze(-2), bound=log2_joint.shape[-2])  # (R, M)
        sums = weighted_statistics(T, resp)
        if own is not None:
            own.write_statistics(groups, resp, sums)
        chunk = Statistics(resp.sum(-1), sums, log2_likelihood * LN_2)
        total = chunk if total is None else total + chunk
    if own is not None:
        own.attach_reference(total, data.shift)
    return total


def statistics_from_responsibilities(
    data: Data, resp_fn: Callable[[int, int], torch.Tensor], own: OwnReference | None = None
) -> Statistics:
    """Statistics for given responsibilities; ``resp_fn(start, stop)`` -> (R, M, K, n).
    ``own``: components summarised about their own reference point."""
    total = None
    for (start, stop), (T, _) in zip(data.bounds, data.chunks()):
        resp = resp_fn(start, stop)
        unknown = torch.full(resp.shape[:2], math.nan, dtype=resp.dtype, device=resp.device)  # no likelihood
        sums = weighted_statistics(T, resp)
        if own is not None:
            own.write_statistics(own.groups(data.X[..., start:stop, :], resp.shape[-2], resp.shape[1]), resp, sums)
        chunk = Statistics(resp.sum(-1), sums, unknown)
        total = chunk if total is None else total + chunk
    if own is not None:
        own.attach_reference(total, data.shift)
    return total


def worst_point_features(data: Data, eta: torch.Tensor, const: torch.Tensor, k: int) -> torch.Tensor:
    """Features (R, M, k, F) of the k points with the lowest log-likelihood per model, worst first."""
    best_values = best_features = None
    for T, h in data.chunks():
        _, ll = normalise(component_log_prob(T, h, eta, const), inplace=True)  # ll (R, M, n)
        values, index = ll.topk(min(k, ll.shape[-1]), dim=-1, largest=False)  # (R, M, k')
        if T.dim() == 2:
            feats = T[index]  # (R, M, k', F)
        else:
            expanded = T.expand(ll.shape[0], *T.shape)
            feats = expanded.gather(2, index.unsqueeze(-1).expand(*index.shape, T.shape[-1]))
        if best_values is not None:
            values = torch.cat([best_values, values], -1)
            feats = torch.cat([best_features, feats], -2)
            values, keep = values.topk(min(k, values.shape[-1]), dim=-1, largest=False)
            feats = feats.gather(2, keep.unsqueeze(-1).expand(*keep.shape, feats.shape[-1]))
        best_values, best_features = values, feats
    if best_features.shape[2] < k:  # fewer points than components: repeat the worst ones
        repeats = math.ceil(k / best_features.shape[2])
        best_features = best_features.repeat(1, 1, repeats, 1)[:, :, :k]
    return best_features


def reseed_empty(
    family: ComponentFamily, stats: Statistics, candidates: Callable[[int], torch.Tensor], active: torch.Tensor,
    shift: torch.Tensor | None = None,
) -> Statistics:
    """Replace the statistics of components with fewer than ``family.min_count`` points (in
    active models) by a pseudo-point each at the worst-explained data points, weighted like an
    average component.

    ``candidates(k)`` returns the features (R, M, k, F) of the k worst points, worst first; it is
    only called when a component is empty, so the extra pass over the data is rare.
    """
    empty = (stats.counts < family.min_count) & active.unsqueeze(-1)  # (R, M, K)
    if not bool(empty.any()):
        return stats
    n_components = stats.counts.shape[-1]
    points = candidates(n_components)  # (R, M, K, F)
    rank = (empty.cumsum(-1) - 1).clamp_min(0)  # j-th empty component takes the j-th worst point
    chosen = points.gather(2, rank.unsqueeze(-1).expand(*rank.shape, points.shape[-1]))
    pseudo = family.reseed_statistics(chosen, stats.counts, stats.sums, empty)
    # The pseudo-point gets the weight of an average component so that it can compete for the
    # points near it (with the weight of one point it would be starved again).
    share = stats.counts.sum(-1, keepdim=True) / n_components  # (R, M, 1)
    counts = torch.where(empty, share.expand_as(stats.counts), stats.counts)
    sums = torch.where(empty.unsqueeze(-1), share.unsqueeze(-1) * pseudo, stats.sums)
    reference = stats.reference
    if reference is not None:  # the pseudo-point's features are about the shared point ``shift``
        shared = reference.new_zeros(()) if shift is None else shift
        reference = torch.where(empty.unsqueeze(-1), shared.expand_as(reference), reference)
    return Statistics(counts, sums, stats.log_likelihood, reference)


@dataclass
class Failures:
    """Models of a working batch (R, M) whose fit failed, and why: a failed model stops and keeps
    its last valid parameters while the others go on (``on_error="isolate"``)."""

    failed: torch.Tensor  # (R, M) bool
    reasons: dict[tuple[int, int], str]  # (restart, model) -> the message IllConditionedError would carry

    @classmethod
    def none(cls, n_restarts: int, n_models: int, device: torch.device) -> "Failures":
        return cls(torch.zeros(n_restarts, n_models, dtype=torch.bool, device=device), {})

    @staticmethod
    def joined(parts: list["Failures | None"]) -> "Failures | None":
        """The records of consecutive batches of restarts (R_i, M) as one (sum R_i, M)."""
        if all(part is None for part in parts):
            return None
        failed, reasons, offset = [], {}, 0
        for part in parts:
            failed.append(part.failed)
            reasons.update({(r + offset, m): reason for (r, m), reason in part.reasons.items()})
            offset += part.failed.shape[0]
        return Failures(torch.cat(failed, 0), reasons)

    def add(self, mask: torch.Tensor, reason: Callable[[int, int], str]) -> None:
        """Mark the models of ``mask`` (R, M) that had not failed yet, with ``reason(r, m)``."""
        new = mask & ~self.failed
        for r, m in new.nonzero().tolist():
            self.reasons[r, m] = reason(r, m)
        self.failed |= new


def m_step(
    family: ComponentFamily, stats: Statistics, shift: torch.Tensor | None, active: torch.Tensor,
    describe_model: Callable[[int, int], str], when: str, fixed: Theta | None = None,
    failures: Failures | None = None, refine: Callable[[torch.Tensor, Theta], Statistics | None] | None = None,
) -> tuple[torch.Tensor, Theta]:
    """Closed-form M-step for the working batch: (log_weights (R, M, K), theta).

    ``fixed``: parameters held at their values (working layout; ``"logits"`` holds log-weights),
    the others maximised given them (the family's conditional M-step).
    ``refine(invalid, theta)``: when components (R, M, K) come out invalid, statistics taken
    again with those components about their own new reference point (exact where the one-pass
    statistics about the shared point lost the variance to rounding), or None; the M-step is then
    redone from them.
    Raises IllConditionedError naming the first invalid component of an active model; given
    ``failures``, records every active model with an invalid component there instead (their
    returned parameters are then not to be used).
    """
    shared_shift, original_fixed = shift, fixed
    if stats.reference is not None:  # some components' sums are about their own reference point
        shift = stats.reference
    fixed = dict(fixed or {})
    counts = stats.counts + 10 * torch.finfo(stats.counts.dtype).eps
    fixed_log_weights = fixed.pop("logits", None)
    if fixed_log_weights is None:
        log_weights = counts.log() - counts.sum(-1, keepdim=True).log()
    else:
        log_weights = fixed_log_weights.expand_as(counts)
    if fixed:
        theta, valid = family.conditional_m_step(counts, stats.sums, shift, fixed)
    else:
        theta, valid = family.m_step(counts, stats.sums, shift)
    invalid = ~valid & active.unsqueeze(-1)  # (R, M, K)
    if refine is not None and bool(invalid.any()):
        refined = refine(invalid, theta)
        if refined is not None:
            return m_step(family, refined, shared_shift, active, describe_model, when, original_fixed, failures=failures)
    if bool(invalid.any()):
        first_invalid = invalid.to(torch.int8).argmax(-1).tolist()  # (R, M) first invalid component

        def reason(r: int, m: int) -> str:
            k = first_invalid[r][m]
            return f"{when}: component {k} of {describe_model(r, m)} is invalid: {family.invalid_component_advice()}"

        if failures is None:
            r, m, _ = (int(i) for i in invalid.nonzero()[0])
            raise IllConditionedError(reason(r, m))
        failures.add(invalid.any(-1), reason)
    return log_weights, theta


def refiner(
    family: ComponentFamily, own: OwnReference | None, statistics: Callable[[OwnReference], Statistics],
) -> Callable[[torch.Tensor, Theta], Statistics | None] | None:
    """The ``refine`` step of :func:`m_step`: statistics taken again by ``statistics(own)`` with
    the invalid components whose sums were about the shared point now about their new means (a
    variance below the rounding of one-pass statistics about a distant point is then exact)."""
    if not family.has_own_reference:
        return None

    def refine(invalid: torch.Tensor, new_theta: Theta) -> Statistics | None:
        has_own = own.mask(invalid.shape) if own is not None else torch.zeros_like(invalid)
        extra = invalid & ~has_own
        if not bool(extra.any()):
            return None
        base = own if own is not None else OwnReference.none(family, new_theta)
        return statistics(base.extended(extra, family.own_reference(new_theta).expand(*invalid.shape, -1)))

    return refine


def natural_with_weights(
    family: ComponentFamily, theta: Theta, log_weights: torch.Tensor, shift: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    eta, const = family.natural_parameters(theta, shift)
    return eta, const + log_weights


@dataclass
class EMResult:
    log_weights: torch.Tensor  # (R, M, K)
    theta: Theta  # (R, M, ...)
    lower_bound: torch.Tensor  # (R, M) mean log-likelihood at the last E-step of each model (nan if failed)
    n_iter: torch.Tensor  # (R, M) iterations run by each model (a failed one: those before the one that failed)
    converged: torch.Tensor  # (R, M) bool
    history: torch.Tensor  # (R, M, n_iterations) lower bound per iteration, padded with the last (nan once failed)
    failures: Failures | None = None  # the failed models when isolating, else None


def cat_restarts(results: list) -> "EMResult":
    """Results of batches of restarts (R_i, M, ...) joined along the restart axis, in order.
    Works for any result dataclass whose fields are tensors or dicts of tensors; a per-iteration
    history (last axis) is padded with its last value to the longest one."""
    if len(results) == 1:
        return results[0]

    def cat(values: list[torch.Tensor], name: str) -> torch.Tensor:
        if name == "history":
            length = max(value.shape[-1] for value in values)
            values = [_pad_with_last(value, length) for value in values]
        return torch.cat(values, 0)

    joined = {}
    for field in dataclasses.fields(results[0]):
        values = [getattr(result, field.name) for result in results]
        if field.name == "failures":
            joined[field.name] = Failures.joined(values)
        elif isinstance(values[0], dict):
            joined[field.name] = {key: cat([value[key] for value in values], key) for key in values[0]}
        else:
            joined[field.name] = cat(values, field.name)
    return type(results[0])(**joined)


def _pad_with_last(history: torch.Tensor, length: int) -> torch.Tensor:
    """(..., n) -> (..., length), repeating the last entry (a model that stopped keeps its bound)."""
    missing = length - history.shape[-1]
    return history if missing == 0 else torch.cat([history, history[..., -1:].expand(*history.shape[:-1], missing)], -1)


def run_em(
    family: ComponentFamily, data: Data | StreamData, log_weights: torch.Tensor, theta: Theta, *,
    max_iter: int, tol: float, describe_model: Callable[[int, int], str], progress=None, fixed: Theta | None = None,
    previous_lower_bound: torch.Tensor | None = None,
    failures: Failures | None = None,
) -> EMResult:
    """EM until every model has converged (|change of the mean log-likelihood| < tol) or
    ``max_iter`` iterations. A converged model keeps its parameters while the others go on.
    ``fixed`` parameters (working layout, as for :func:`m_step`) are held at their values.
    ``previous_lower_bound`` (broadcastable to (R, M)): the lower bound that the first
    iteration's is compared with (default -inf), e.g. that of an earlier fit a warm start
    continues, so that a loop of one-iteration fits converges as one long fit does.

    Semantics follow scikit-learn: in iteration i the E-step gives the lower bound of the current
    parameters, then the M-step updates them; a model converges in the iteration whose lower
    bound changed by less than tol, and keeps that iteration's M-step.

    Without ``failures`` a model whose log-likelihood is not finite or whose M-step gives an
    invalid component raises IllConditionedError. With a :class:`Failures` record (which may hold
    models that failed at initialisation: they never run) such a model is recorded there instead,
    stops and keeps its last valid parameters, those whose lower bound was last computed: the
    parameters before the failed M-step, or before the update whose log-likelihood was not finite.
    """
    R, M = log_weights.shape[:2]
    device = log_weights.device
    active = torch.ones(R, M, dtype=torch.bool, device=device)
    if failures is not None:
        active &= ~failures.failed
    converged = torch.zeros_like(active)
    n_iter = torch.zeros(R, M, dtype=torch.long, device=device)
    previous = torch.full((R, M), -math.inf, dtype=log_weights.dtype, device=device)
    if previous_lower_bound is not None:
        previous = previous_lower_bound.to(previous).expand(R, M)
    lower_bound = torch.full_like(previous, math.nan)
    history = []
    n_active = int(active.sum())
    last_valid = log_weights, theta  # the parameters whose lower bound was last computed
    for iteration in range(1, max_iter + 1):
        if n_active == 0:  # every model failed at initialisation
            break
        eta, const = natural_with_weights(family, theta, log_weights, data.shift)
        own = OwnReference.of(family, theta, log_weights, data.shift)
        stats = data.statistics(eta, const, own)
        current = stats.log_likelihood / data.n_total
        bad = ~torch.isfinite(current) & active
        if bool(bad.any()):
            def reason(r: int, m: int) -> str:
                return (f"EM iteration {iteration}: the log-likelihood of {describe_model(r, m)} is not finite; "
                        "use float64, scale the data or increase the regularisation")

            if failures is None:
                raise IllConditionedError(reason(*(int(i) for i in bad.nonzero()[0])))
            failures.add(bad, reason)
            log_weights, theta = where_parameters(bad, last_valid, (log_weights, theta))
            active = active & ~bad
        last_valid = log_weights, theta

        def candidates(k: int, eta=eta, const=const) -> torch.Tensor:
            return data.worst_points(eta, const, k)

        def reseeded_statistics(own: OwnReference, eta=eta, const=const, active=active) -> Statistics:
            return reseed_empty(family, data.statistics(eta, const, own), candidates, active, data.shift)

        stats = reseed_empty(family, stats, candidates, active, data.shift)
        new_log_weights, new_theta = m_step(
            family, stats, data.shift, active, describe_model, f"EM iteration {iteration}", fixed,
            failures, refine=refiner(family, own, reseeded_statistics),
        )
        bounded = active  # models whose current parameters got a (finite) lower bound
        if failures is not None:  # those that failed in the M-step keep their current parameters
            active = active & ~failures.failed
            n_active = int(active.sum())
        if n_active == R * M:  # every model still running: take the update as it is
            log_weights, theta, lower_bound = new_log_weights, {name: new_theta[name] for name in theta}, current
            n_iter = torch.full_like(n_iter, iteration)
        else:
            log_weights, theta = where_parameters(active, (new_log_weights, new_theta), (log_weights, theta))
            lower_bound = torch.where(bounded, current, lower_bound)
            n_iter = torch.where(active, iteration, n_iter)
        history.append(lower_bound if failures is None else lower_bound.masked_fill(failures.failed, math.nan))
        newly_converged = active & ((current - previous).abs() < tol)
        converged |= newly_converged
        active &= ~newly_converged
        previous = current
        n_active = int(active.sum())
        if progress is not None:
            progress.update(1)
            progress.set_postfix(lower_bound=f"{lower_bound.mean().item():.6g}", active=n_active)
        if n_active == 0:
            break
    if failures is not None:
        lower_bound = lower_bound.masked_fill(failures.failed, math.nan)
    history_tensor = torch.stack(history, -1) if history else lower_bound.unsqueeze(-1)[..., :0]
    return EMResult(log_weights, theta, lower_bound, n_iter, converged, history_tensor, failures)


def where_parameters(
    mask: torch.Tensor, new: tuple[torch.Tensor, Theta], old: tuple[torch.Tensor, Theta]
) -> tuple[torch.Tensor, Theta]:
    """(log_weights, theta) from ``new`` where ``mask`` (R, M) holds, else from ``old``."""
    log_weights = where_models(mask, new[0], old[0])
    return log_weights, {name: where_models(mask, new[1][name], value) for name, value in old[1].items()}


def where_models(mask: torch.Tensor, chosen: torch.Tensor | float, other: torch.Tensor) -> torch.Tensor:
    """``chosen`` for the models of ``mask`` (the leading dimensions of ``other``), else ``other``."""
    return torch.where(mask.reshape(tuple(mask.shape) + (1,) * (other.dim() - mask.dim())), chosen, other)


class ConvergenceWarning(UserWarning):
    """EM stopped at max_iter before the lower bound settled."""


class FitFailedWarning(UserWarning):
    """Some models of a batch failed (an invalid component or a log-likelihood that is not
    finite) and kept their last valid parameters, while the others finished (``on_error="isolate"``)."""
