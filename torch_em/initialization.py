"""Batched initial responsibilities for EM: k-means++, Lloyd's k-means, random, random points.

Shapes as in :mod:`torch_em.lloyd`: a working batch ``(R, M)`` (restarts x models), data
``X (N, D)`` shared by every model or ``X (M, N, D)``, already centred; centres
``(R, M, K, D)``, labels ``(R, M, N)``. Randomness comes from one generator per restart
(``RestartStreams``), so a seed reproduces everything and restart r does not depend on how
many restarts run.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from ._random import RestartStreams
from .lloyd import accumulator_dtype, gather_points, lloyd, nearest, relative_tolerance, row_chunks, squared_distances

METHODS = ("k-means++", "kmeans", "random", "random_from_data")
#: Lloyd iterations run after k-means++ seeding by the default initialisation.
SEEDING_LLOYD_ITERATIONS = 5


def random_points(X: torch.Tensor, M: int, K: int, streams: RestartStreams) -> torch.Tensor:
    """K distinct random data points per model: (R, M, K, D)."""
    keys = streams.rand(M, X.shape[-2])
    return gather_points(X, keys.topk(K, dim=-1).indices)


def kmeans_plusplus(X: torch.Tensor, M: int, K: int, streams: RestartStreams, chunk_size: int) -> torch.Tensor:
    """Greedy k-means++ seeding (as scikit-learn): each new centre is the best of 2 + log K
    candidates drawn with probability proportional to the squared distance to the nearest
    centre chosen so far. Returns centres (R, M, K, D).

    The uniforms are drawn, and the distances summed, in float64 whatever X's dtype (float32 on
    devices without float64), so float32 and float64 data pick the same points for a seed."""
    R, n_points = len(streams), X.shape[-2]
    n_trials = 2 + int(math.log(K))
    draw_dtype = accumulator_dtype(X.device)
    first = streams.randint(n_points, M, 1)
    centres = [gather_points(X, first)]
    closest = nearest(X, centres[0], chunk_size)[1]  # (R, M, N)
    for _ in range(1, K):
        cumulative = closest.to(draw_dtype).cumsum(-1)
        targets = streams.rand(M, n_trials, dtype=draw_dtype)
        targets = targets * cumulative[..., -1:]
        candidates = torch.searchsorted(cumulative, targets).clamp_max_(n_points - 1)  # (R, M, t)
        candidate_points = gather_points(X, candidates)  # (R, M, t, D)
        potentials = torch.zeros(R, M, n_trials, dtype=X.dtype, device=X.device)
        for start, stop in row_chunks(n_points, chunk_size):
            d = squared_distances(X[..., start:stop, :], candidate_points)  # (R, M, t, n)
            potentials += torch.minimum(d, closest[..., None, start:stop]).sum(-1)
        best = potentials.argmin(-1, keepdim=True)  # (R, M, 1)
        chosen = candidate_points.gather(2, best.unsqueeze(-1).expand(R, M, 1, X.shape[-1]))
        centres.append(chosen)
        closest = torch.minimum(closest, nearest(X, chosen, chunk_size)[1])
    return torch.cat(centres, 2)


def initial_responsibilities(
    method: str, X: torch.Tensor, M: int, K: int, streams: RestartStreams, chunk_size: int,
    centres: torch.Tensor | None = None,
) -> Callable[[int, int], torch.Tensor]:
    """Initial responsibilities as a function ``resp(start, stop) -> (R, M, K, stop - start)``
    (generated chunk by chunk, so N x K is never materialised for random responsibilities).

    ``centres`` (R, M, K, D), when given (e.g. ``means_init``), replace the seeding: points are
    assigned to the nearest given centre.
    """
    if method == "random" and centres is None:
        def random_resp(start: int, stop: int) -> torch.Tensor:
            resp = streams.rand(M, K, stop - start, dtype=X.dtype)
            return resp / resp.sum(-2, keepdim=True)

        return random_resp
    if centres is None:
        if method == "random_from_data":
            centres = random_points(X, M, K, streams)
        else:
            centres = kmeans_plusplus(X, M, K, streams, chunk_size)
            n_lloyd = SEEDING_LLOYD_ITERATIONS if method == "k-means++" else 300
            tol = relative_tolerance(X, 1e-4)
            centres = lloyd(X, centres, max_iter=n_lloyd, tol=tol, chunk_size=chunk_size).centres
    labels = nearest(X, centres, chunk_size)[0]  # (R, M, N)

    def hard_resp(start: int, stop: int) -> torch.Tensor:
        return torch.nn.functional.one_hot(labels[..., start:stop], K).to(X.dtype).mT

    return hard_resp


