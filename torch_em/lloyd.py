"""Batched Lloyd's algorithm and its building blocks: squared distances as GEMMs, nearest
centres, per-cluster sums.

Everything works on a working batch ``(R, M)`` (restarts x models) and on data shared by every
model, ``X (N, D)``, or one dataset per model, ``X (M, N, D)``; data are expected to be centred
already (the caller subtracts its shift). Centres are ``(R, M, K, D)``, labels ``(R, M, N)``.
Optional sample weights are ``(N,)`` (one weight per row, shared by every model) or ``(M, N)``;
``None`` (every weight 1) keeps the unweighted arithmetic (no product by ones anywhere).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import torch

from .em import _WorkingBatch, emission_log_prob


#: Rows per chunk keep one chunk's (R*M*K, n) score block near this many elements: the passes
#: over it (max, index) then run in cache, 1.2-3x faster than over a block of all the points.
SCORES_PER_CHUNK = 1 << 19


def default_chunk(n_centres: int) -> int:
    """Rows per chunk for ``n_centres`` centres over all models of a working batch."""
    return max(256, SCORES_PER_CHUNK // n_centres)


def row_chunks(n_points: int, chunk_size: int) -> list[tuple[int, int]]:
    return [(start, min(start + chunk_size, n_points)) for start in range(0, n_points, chunk_size)]


def broadcast_points(X: torch.Tensor) -> torch.Tensor:
    """(N, D) -> (1, 1, N, D); (M, N, D) -> (1, M, N, D): broadcasts against (R, M, ...)."""
    return X.unsqueeze(0).unsqueeze(0) if X.dim() == 2 else X.unsqueeze(0)


def broadcast_weights(weights: torch.Tensor) -> torch.Tensor:
    """(N,) -> (1, 1, N); (M, N) -> (1, M, N): broadcasts against labels (R, M, N)."""
    return weights.view(1, 1, -1) if weights.dim() == 1 else weights.unsqueeze(0)


def weighted_total(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """``sum_n w_n values[..., n]`` over the last axis of values (R, M, N): (R, M); the plain sum
    without weights."""
    return values.sum(-1) if weights is None else (values * broadcast_weights(weights)).sum(-1)


def squared_distances(X: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (R, M, C, n) between centres (R, M, C, D) and points X (n, D)
    or (M, n, D), as one GEMM (clamped at 0). Points last, as in EM."""
    return torch.add(X.square().sum(-1).unsqueeze(-2), point_scores(X, centres), alpha=-2).clamp_min_(0)


def gather_points(X: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Points X[..., index, :] for index (R, M, C) -> (R, M, C, D)."""
    points = broadcast_points(X).expand(*index.shape[:2], *X.shape[-2:])
    return points.gather(2, index.unsqueeze(-1).expand(*index.shape, X.shape[-1]))


#: Centres per model below which :func:`point_scores` lays the scores out centres-major (points
#: last): the max over a few centres then runs along the contiguous points, 1.2-3.5x faster on
#: CPU than along short rows of centres; from this many on, rows of centres per point reduce as
#: fast or faster (and the GEMM is quicker that way round).
POINTS_LAST_BELOW = 32


def point_scores(X: torch.Tensor, centres: torch.Tensor, components: torch.Tensor | None = None) -> torch.Tensor:
    """``x.c - |c|^2 / 2`` (R, M, K, n) for points X (n, D) or (M, n, D) and centres
    (R, M, K, D): the nearest centre is the argmax over K and ``|x - c|^2 = |x|^2 - 2 score``.
    Fewer than POINTS_LAST_BELOW centres: points last in memory, as in EM; more: a permuted view
    of centres last in memory. ``components`` (R|1, M, K): the centres each model has (the
    others score -inf), or None."""
    R, M, K, D = centres.shape
    const = -0.5 * centres.square().sum(-1)  # (R, M, K)
    if components is not None:
        const = const.masked_fill(~components, -math.inf)
    if K < POINTS_LAST_BELOW:
        return emission_log_prob(X, None, centres, const)
    if X.dim() == 2:
        scores = torch.addmm(const.reshape(-1), X, centres.reshape(-1, D).T)  # (n, R*M*K)
        return scores.view(-1, R, M, K).permute(1, 2, 3, 0)
    return torch.matmul(X, centres.mT).add_(const.unsqueeze(-2)).mT


def first_argmax_(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Max over the centres of scores (..., K, n) and the first index attaining it, like
    ``max(-2)``: (..., n) each; overwrites ``scores``.

    ``max``/``argmax`` with indices are several times slower than ``amax`` on CPU. The index is
    recovered in place: the maxima marked with descending weights K..1 (exact integers in
    float32 up to 2**24 centres), then ``amax`` again. It all runs on the axes in memory order
    (reducing a permuted view is several times slower); the results come back in axis order.
    """
    centre_axis = scores.dim() - 2
    strides = scores.stride()
    order = sorted(range(scores.dim()), key=lambda axis: -strides[axis])
    in_memory, axis = scores.permute(order), order.index(centre_axis)
    kept = [a for a in order if a != centre_axis]  # the results' axes, in memory order
    back = [kept.index(a) for a in sorted(kept)]
    n_components = scores.shape[-2]
    shape = [1] * scores.dim()
    shape[axis] = n_components
    best = in_memory.amax(axis, keepdim=True)
    weights = torch.arange(n_components, 0, -1, dtype=scores.dtype, device=scores.device).view(shape)
    index = n_components - in_memory.eq_(best).mul_(weights).amax(axis).long()
    return best.squeeze(axis).permute(back), index.permute(back)


def nearest(
    X: torch.Tensor, centres: torch.Tensor, chunk_size: int, point_norms: torch.Tensor | None = None,
    components: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of and squared distance to the nearest centre: labels (R, M, N), dist (R, M, N),
    in chunks of at most ``chunk_size`` rows (and of :func:`default_chunk` rows for the
    centres). ``point_norms`` (N,) or (M, N): precomputed ``|x|^2``; ``components`` (R|1, M,
    K): the centres each model has (None: all)."""
    R, M, K = centres.shape[:3]
    labels = torch.empty(R, M, X.shape[-2], dtype=torch.long, device=X.device)
    dists = torch.empty(R, M, X.shape[-2], dtype=X.dtype, device=X.device)
    for start, stop in row_chunks(X.shape[-2], min(chunk_size, default_chunk(R * M * K))):
        chunk = X[..., start:stop, :]
        best, labels[..., start:stop] = first_argmax_(point_scores(chunk, centres, components))  # (R, M, n)
        norms = chunk.square().sum(-1) if point_norms is None else point_norms[..., start:stop]
        dists[..., start:stop] = (norms - 2 * best).clamp_min_(0)
    return labels, dists


def nested_nearest(
    X: torch.Tensor, centres: torch.Tensor, sizes: list[int], chunk_size: int, point_norms: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`nearest` among the first k of ``centres`` (R, S, K, D), for every k of ``sizes``
    (M numbers) at once: labels and squared distances (R, M, S, N), the first of equal scores
    winning as there. One score block of the K centres; the maxima over each prefix follow
    one centre at a time (a grid over the number of components whose centres are nested)."""
    R, S, K = centres.shape[:3]
    N = X.shape[-2]
    labels = torch.empty(R, len(sizes), S, N, dtype=torch.long, device=X.device)
    dists = torch.empty(R, len(sizes), S, N, dtype=X.dtype, device=X.device)
    wanted = {k: [m for m, size in enumerate(sizes) if size == k] for k in set(sizes)}
    for start, stop in row_chunks(N, min(chunk_size, default_chunk(R * S * K))):
        chunk = X[start:stop]
        scores = point_scores(chunk, centres)  # (R, S, K, n)
        norms = chunk.square().sum(-1) if point_norms is None else point_norms[start:stop]
        best, index = scores[:, :, 0], torch.zeros(R, S, stop - start, dtype=torch.long, device=X.device)
        for k in range(1, K + 1):
            if k > 1:
                better = scores[:, :, k - 1] > best
                best = torch.maximum(best, scores[:, :, k - 1])
                index = index.masked_fill(better, k - 1)
            for m in wanted.get(k, ()):
                labels[:, m, :, start:stop] = index
                dists[:, m, :, start:stop] = (norms - 2 * best).clamp_min_(0)
    return labels, dists


def accumulator_dtype(device: torch.device) -> torch.dtype:
    """float64 for running sums, float32 on devices without float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def flat_cluster_index(labels: torch.Tensor, n_clusters: int) -> torch.Tensor:
    """Labels (R, M, n) as indices (R*M*n,) into the flattened clusters (R*M*K) of every model."""
    R, M = labels.shape[:2]
    offsets = (torch.arange(R * M, device=labels.device) * n_clusters).view(R, M, 1)
    return (labels + offsets).reshape(-1)


def cluster_sums(
    X: torch.Tensor, labels: torch.Tensor, n_clusters: int, chunk_size: int, dtype: torch.dtype | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cluster sums of points (R, M, K, D) and counts (R, M, K) for labels (R, M, N), by
    scatter-add (linear in N, no N x K one-hot; the points broadcast over the models, never
    copied per model), accumulated in ``dtype`` (default X's). With ``weights`` (N,) or (M, N)
    they are the sums of ``w x`` and of ``w``."""
    R, M = labels.shape[:2]
    D, dtype = X.shape[-1], dtype or X.dtype
    sums = X.new_zeros(R, M, n_clusters, D, dtype=dtype)
    counts = X.new_zeros(R * M * n_clusters, dtype=dtype)
    for start, stop in row_chunks(X.shape[-2], chunk_size):
        chunk = labels[..., start:stop]  # (R, M, n)
        flat = flat_cluster_index(chunk, n_clusters)  # (R*M*n,)
        points = broadcast_points(X[..., start:stop, :].to(dtype))  # (1, 1|M, n, D)
        if weights is None:
            counts += torch.bincount(flat, minlength=R * M * n_clusters).to(dtype)
        else:
            w = broadcast_weights(weights[..., start:stop].to(dtype))  # (1, 1|M, n)
            points = points * w.unsqueeze(-1)
            counts.index_add_(0, flat, w.expand(R, M, stop - start).reshape(-1))
        shape = (R, M, stop - start, D)
        sums.scatter_add_(2, chunk.unsqueeze(-1).expand(shape), points.expand(shape))
    return sums, counts.view(R, M, n_clusters)


def positive_members(labels: torch.Tensor, weights: torch.Tensor, n_clusters: int) -> torch.Tensor:
    """Members of positive weight per cluster (R, M, K), exact integers, for labels (R, M, N) and
    weights (N,) or (M, N). A cluster is empty when it has none (scikit-learn: zero weight),
    whatever rounding the running weight sums carry after points come and go."""
    R, M, N = labels.shape
    positive = (broadcast_weights(weights) > 0).expand(R, M, N).reshape(-1).long()
    members = torch.zeros(R * M * n_clusters, dtype=torch.long, device=labels.device)
    return members.index_add_(0, flat_cluster_index(labels, n_clusters), positive).view(R, M, n_clusters)


def relative_tolerance(X: torch.Tensor, tol: float) -> torch.Tensor:
    """scikit-learn's k-means tolerance: ``tol`` times the mean per-feature variance of each
    model's data, () for shared X or (M,) for per-model X. Sample weights play no part (as in
    scikit-learn's ``_tolerance``)."""
    if X.shape[-2] < 2:
        return X.new_zeros(X.shape[:-2])
    return tol * X.var(-2).mean(-1)


@dataclass
class LloydResult:
    centres: torch.Tensor  # (R, M, K, D)
    labels: torch.Tensor  # (R, M, N) nearest centre of each point
    distances: torch.Tensor  # (R, M, N) squared distance to it
    n_iter: torch.Tensor  # (R, M) iterations run per model
    converged: torch.Tensor  # (R, M) bool


def _move_points(
    X: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor, old: torch.Tensor, new: torch.Tensor,
    weights: torch.Tensor | None = None, members: torch.Tensor | None = None,
) -> None:
    """Update per-cluster sums (R, M, K, D) and counts (R, M, K) in place for the points whose
    label changes from ``old`` to ``new`` (R, M, N): after the first steps few points move, so
    this is far cheaper than summing all points again. With ``weights`` (N,) or (M, N) a point
    carries ``w x`` and ``w``, and ``members`` (R, M, K), the members of positive weight, follow."""
    R, M, K, D = sums.shape
    N = old.shape[-1]
    flat = (new != old).view(-1).nonzero().squeeze(1)  # flat (R*M*N) indices of the moved points
    if len(flat) == 0:
        return
    model, point = flat.div(N, rounding_mode="floor"), flat.remainder(N)
    rows = point if X.dim() == 2 else model.remainder(M) * N + point  # rows of X.reshape(-1, D)
    points = X.reshape(-1, D).index_select(0, rows).to(sums.dtype)
    into, out_of = model * K + new.view(-1).index_select(0, flat), model * K + old.view(-1).index_select(0, flat)
    if weights is None:
        mass = points.new_ones(len(flat))
    else:
        weight_rows = point if weights.dim() == 1 else model.remainder(M) * N + point
        mass = weights.reshape(-1).index_select(0, weight_rows).to(sums.dtype)
        points = points * mass.unsqueeze(-1)
        positive = (mass > 0).long()
        # (members is given with weights)
        cast(torch.Tensor, members).view(-1).index_add_(0, into, positive).index_add_(0, out_of, positive, alpha=-1)
    sums.view(-1, D).index_add_(0, into, points).index_add_(0, out_of, points, alpha=-1)
    counts.view(-1).index_add_(0, into, mass).index_add_(0, out_of, mass, alpha=-1)


def _relocate_empty(
    X: torch.Tensor, labels: torch.Tensor, dist: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor,
    empty: torch.Tensor, weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """As scikit-learn: the j-th empty cluster takes the j-th farthest point from its centre
    (farthest unweighted), which leaves its former cluster with its weight. A model whose
    points all sit on their centres relocates nothing (more clusters than distinct points).
    sums (R, M, K, D), counts and empty (R, M, K), labels and dist (R, M, N), weights (N,) or
    (M, N). Returns sums and counts; a cluster left without weight has count 0."""
    R, M, K, D = sums.shape
    relocated = empty & (dist.amax(-1, keepdim=True) > 0)
    rank = (relocated.cumsum(-1) - 1).clamp_min(0)
    chosen = dist.topk(K, dim=-1).indices.gather(-1, rank)  # (R, M, K) point per component
    points = gather_points(X, chosen)  # (R, M, K, D)
    donor = labels.gather(-1, chosen)  # the cluster each chosen point leaves
    moved = relocated.to(X.dtype)  # the weight each chosen point carries
    if weights is not None:
        moved = moved * broadcast_weights(weights).expand(R, M, -1).gather(-1, chosen)
    points = points * moved.unsqueeze(-1)
    sums = sums.scatter_add(2, donor.unsqueeze(-1).expand(R, M, K, D), -points)
    counts = counts.scatter_add(2, donor, -moved)
    return torch.where(empty.unsqueeze(-1), points, sums), torch.where(empty, moved, counts)


def _cluster_means(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``sums / counts`` (R, M, K, D); as in scikit-learn, a cluster without weight sits at the
    mean of the heaviest cluster of its model."""
    R, M, K, D = sums.shape
    weightless = counts <= 0
    means = sums / torch.where(weightless, torch.ones_like(counts), counts).unsqueeze(-1)
    heaviest = counts.argmax(-1, keepdim=True).unsqueeze(-1).expand(R, M, 1, D)
    return torch.where(weightless.unsqueeze(-1), means.gather(2, heaviest), means)


def lloyd(
    X: torch.Tensor, centres: torch.Tensor, *, max_iter: int, tol: float | torch.Tensor, chunk_size: int,
    weights: torch.Tensor | None = None, components: torch.Tensor | None = None,
    nearest_start: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> LloydResult:
    """Lloyd iterations from ``centres`` (R, M, K, D); each model stops on its own once its
    squared centre shift is at most ``tol`` (absolute; broadcastable to (R, M)). ``weights``
    (N,) or (M, N): sample weights (centres are weighted means), or None. ``nearest_start``:
    the labels and squared distances (R, M, N) of the points' nearest starting centres, when
    known (else computed).

    As in scikit-learn, an empty cluster (one without weight) takes the point farthest from its
    centre (the j-th empty cluster the j-th farthest point), which leaves its former cluster. The
    per-cluster sums are summed once and then kept up to date from the points that change
    cluster, in float64 (float32 on devices without it); with weights, emptiness is decided on
    exact counts of the members of positive weight. ``components`` (R|1, M, K): the clusters each
    model has (the others hold no point, are never relocated and keep their centres), or None.
    """
    R, M, K, D = centres.shape
    if components is not None:
        components = components.expand(R, M, K)
    active = torch.ones(R, M, dtype=torch.bool, device=X.device)
    n_iter = torch.zeros(R, M, dtype=torch.long, device=X.device)
    tol = torch.as_tensor(tol, dtype=X.dtype, device=X.device).expand(R, M)
    norms = X.square().sum(-1)  # (N,) or (M, N)
    labels, dist = nearest_start if nearest_start is not None else nearest(X, centres, chunk_size, norms, components)
    running_sums, running_counts = cluster_sums(X, labels, K, chunk_size, accumulator_dtype(X.device), weights)
    members = None if weights is None else positive_members(labels, weights, K)
    batch = _WorkingBatch((R, M))  # the models computed, as in run_em
    full: dict[str, torch.Tensor] = {}  # every model's results once the batch is compacted
    every_X, every_norms, every_weights = X, norms, weights
    for iteration in range(1, max_iter + 1):
        sums, counts = running_sums.to(X.dtype), running_counts.to(X.dtype)
        empty = counts == 0 if members is None else members == 0
        if components is not None:
            empty &= components
        if bool(empty.any()):
            new = _cluster_means(*_relocate_empty(X, labels, dist, sums, counts, empty, weights))
        else:
            new = sums / counts.unsqueeze(-1)
        if components is not None:
            new = torch.where(components.unsqueeze(-1), new, centres)
        shift = (new - centres).square().sum((-1, -2))  # (R, M)
        centres = torch.where(active[..., None, None], new, centres)
        n_iter = torch.where(active, iteration, n_iter)
        previous = labels
        labels, dist = nearest(X, centres, chunk_size, norms, components)
        _move_points(X, running_sums, running_counts, previous, labels, weights, members)
        active &= shift > tol
        n_active = int(active.sum())
        if n_active == 0:
            break
        if n_active <= COMPACTION_FRACTION * active.numel():  # from now on only the running models
            results = dict(centres=centres, labels=labels, dist=dist, n_iter=n_iter, active=active)
            full = {name: batch.to_full(value, full.get(name, False)) for name, value in results.items()}
            keep = active.flatten().nonzero().squeeze(-1)  # their positions in the working batch
            batch.index = keep if batch.index is None else batch.index[keep]

            def running(value: torch.Tensor) -> torch.Tensor:  # (R', M', ...) -> (1, A, ...)
                return value.flatten(0, 1)[keep].unsqueeze(0)

            centres, labels, dist, n_iter, active, tol, running_sums, running_counts = (
                running(value) for value in
                (centres, labels, dist, n_iter, active, tol, running_sums, running_counts))
            members = None if members is None else running(members)
            components = None if components is None else running(components)
            models = batch.index % M  # the data of the running models, from the whole batch's
            X, norms = (X, norms) if X.dim() == 2 else (every_X[models], every_norms[models])
            # (weights per model: every_weights is the whole batch's, not None)
            weights = weights if weights is None or weights.dim() == 1 else cast(torch.Tensor, every_weights)[models]
    results = dict(centres=centres, labels=labels, dist=dist, n_iter=n_iter, active=active)
    done = {name: batch.to_full(value, full.get(name, False)) for name, value in results.items()}
    return LloydResult(done["centres"], done["labels"], done["dist"], done["n_iter"], ~done["active"])


#: Once at most this fraction of the models a Lloyd loop computes still run, it computes only
#: those (their data and state copied out), so its cost follows the running models.
COMPACTION_FRACTION = 0.5
