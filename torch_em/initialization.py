"""Initial parameters for EM: batched k-means++, Lloyd's k-means, random responsibilities or points.

Shapes as in :mod:`torch_em.lloyd`: a working batch ``(R, M)`` (restarts x models), data
``X (N, D)`` shared by every model or ``X (M, N, D)``, already centred; centres
``(R, M, K, D)``, labels ``(R, M, N)``. Randomness comes from one generator per restart
(``RestartStreams``), so a seed reproduces everything and restart r does not depend on how
many restarts run. Sample weights, where a function takes them, are ``(N,)`` or ``(M, N)``.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, cast

import torch

from ._random import RestartStreams
from .data import Data
from .em import (
    Failures, Params, invalid_component_reason, log_likelihood, m_step, record_failures, refiner, reseed_empty,
    statistics_from_responsibilities,
)
from .families.base import ComponentFamily, Theta
from .latent import LatentStructure
from .layout import Layout
from .own_reference import OwnReference
from .priors import ModelPrior
from .statistics import Statistics
from .lloyd import (
    accumulator_dtype, broadcast_weights, gather_points, lloyd, nearest, nested_nearest, relative_tolerance, row_chunks,
    squared_distances, weighted_total,
)

if TYPE_CHECKING:
    from .kmeans import DrawsSharedByModels

METHODS = ("k-means++", "kmeans", "random", "random_from_data")
#: Lloyd iterations run after k-means++ seeding by the default initialisation.
SEEDING_LLOYD_ITERATIONS = 5
#: k-means++ seedings the default initialisation draws per restart (batched), keeping the one
#: whose Lloyd iterations leave the least inertia, for data shared by the models (one dataset:
#: the seedings' cost is the per-step dispatch, so several cost about one). With a dataset per
#: model (many small problems at once) the seedings' arithmetic is the cost of the whole fit, and
#: every model takes one seeding.
N_SEEDINGS = 4
#: Inertias within this relative gap of the least are a tie, won by the first seeding (so float32
#: and float64, or two chunkings, keep the same seeding).
NEAR_TIE = 1e-4


def informative(weights: torch.Tensor | None) -> torch.Tensor | None:
    """``weights`` (N,) / (M, N), or None where they are the same for every point (of every
    model): equal weights seed exactly as no weights do (the same draws)."""
    if weights is None or bool((weights == weights[..., :1]).all()):
        return None
    return weights


def random_points(
    X: torch.Tensor, M: int, K: int, streams: RestartStreams, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """K distinct random data points per model: (R, M, K, D). With ``weights`` a weighted draw
    without replacement (as numpy's ``choice(replace=False, p=w / w.sum())``): the K largest
    keys ``log(u) / w`` (Efraimidis-Spirakis); a zero-weight point comes last."""
    keys = streams.rand(M, X.shape[-2])  # (R, M, N)
    weights = informative(weights)
    if weights is not None:
        keys = keys.log() / broadcast_weights(weights)
    return gather_points(X, keys.topk(K, dim=-1).indices)


def draw_proportional(mass: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Indices (R, M, n) drawn with probability proportional to ``mass`` (R, M, N)
    (non-negative, in the draws' dtype), by ``uniforms`` (R, M, n) in [0, 1). An index of zero
    mass is never drawn, unless a model has no mass at all (then 0)."""
    cumulative = mass.cumsum(-1)  # non-decreasing: a step up means mass of its own
    total = cumulative[..., -1:].contiguous()
    index = torch.searchsorted(cumulative, uniforms * total, right=True)  # first cumulative above the target
    return torch.minimum(index, torch.searchsorted(cumulative, total))  # a target rounded up to total


def kmeans_plusplus(
    X: torch.Tensor, M: int, K: int, streams: RestartStreams, chunk_size: int, weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Greedy k-means++ seeding (see :func:`kmeans_plusplus_indices`): centres (R, M, K, D)."""
    return gather_points(X, kmeans_plusplus_indices(X, M, K, streams, chunk_size, weights))


def kmeans_plusplus_indices(
    X: torch.Tensor, M: int, K: int, streams: RestartStreams | DrawsSharedByModels, chunk_size: int,
    weights: torch.Tensor | None = None, n_local_trials: int | None = None,
) -> torch.Tensor:
    """Greedy k-means++ seeding (as scikit-learn): each new centre is the best of
    ``n_local_trials`` (default 2 + log K) candidates drawn with probability proportional to
    ``w * D^2``, D the distance to the nearest centre chosen so far; the best leaves the least
    weighted potential ``sum_n w_n min(D_n^2, |x_n - candidate|^2)``. The first centre is drawn
    uniformly, or proportionally to ``w`` with ``weights`` (N,) / (M, N).

    Returns the centres' row indices (R, M, K) into X.

    Every uniform is drawn at once, ``(R, M, 1 + (K - 1) * n_trials)``: model m's numbers are
    row m of one draw, so the first model of a batch draws what it draws alone. They are drawn,
    and the distances summed, in float64 whatever X's dtype (float32 on devices without
    float64), so float32 and float64 data pick the same points for a seed."""
    R, n_points = len(streams), X.shape[-2]
    n_trials = n_local_trials or 2 + int(math.log(K))
    draw_dtype = accumulator_dtype(X.device)
    uniforms = streams.rand(M, 1 + (K - 1) * n_trials, dtype=draw_dtype)  # (R, M, 1 + (K - 1) t)
    weights = informative(weights)
    if weights is None:
        first = (uniforms[..., :1] * n_points).long().clamp_max(n_points - 1)
    else:
        first = draw_proportional(broadcast_weights(weights.to(draw_dtype)).expand(R, M, n_points).contiguous(),
                                  uniforms[..., :1])
    indices = [first]
    closest = nearest(X, gather_points(X, first), chunk_size)[1]  # (R, M, N)
    for k in range(1, K):
        mass = closest.to(draw_dtype) if weights is None else closest.to(draw_dtype) * broadcast_weights(weights)
        candidates = draw_proportional(mass, uniforms[..., 1 + (k - 1) * n_trials: 1 + k * n_trials])  # (R, M, t)
        candidate_points = gather_points(X, candidates)  # (R, M, t, D)
        potentials = torch.zeros(R, M, n_trials, dtype=X.dtype, device=X.device)
        for start, stop in row_chunks(n_points, chunk_size):
            reached = squared_distances(X[..., start:stop, :], candidate_points)  # (R, M, t, n)
            torch.minimum(reached, closest[..., None, start:stop], out=reached)
            if weights is None:
                potentials += reached.sum(-1)
            else:
                potentials += (reached * broadcast_weights(weights[..., start:stop]).unsqueeze(-2)).sum(-1)
        best = potentials.argmin(-1, keepdim=True)  # (R, M, 1)
        indices.append(candidates.gather(2, best))
        if n_points <= chunk_size:  # one chunk: the chosen candidate's distances are at hand
            closest = reached.gather(2, best.unsqueeze(-1).expand(R, M, 1, n_points)).squeeze(2)
        else:
            chosen = candidate_points.gather(2, best.unsqueeze(-1).expand(R, M, 1, X.shape[-1]))
            closest = torch.minimum(closest, nearest(X, chosen, chunk_size)[1])
    return torch.cat(indices, 2)


def best_of_seedings(
    X: torch.Tensor, M: int, K: int, streams: RestartStreams, chunk_size: int, weights: torch.Tensor | None,
    components: torch.Tensor | None, tol: torch.Tensor, n_seedings: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Centres (R, M, K, D) and the labels (R, M, N) of the points' nearest centres: per restart
    and model the one of the :func:`seedings` with the least weighted inertia ``sum_n w_n
    min_k |x_n - c_k|^2`` (the first within NEAR_TIE of the least)."""
    centres, labels, inertia = seedings(X, M, K, streams, chunk_size, weights, components, tol, n_seedings)
    best = first_near_best(-inertia, NEAR_TIE)  # (R, M)
    return chosen_candidate(centres, best), chosen_candidate(labels, best)


def chosen_candidate(values: torch.Tensor, best: torch.Tensor) -> torch.Tensor:
    """The values (R, M, S, ...) of S candidates per model -> those of candidate ``best`` (R, M)
    of each model: (R, M, ...)."""
    index = best.view(*best.shape, 1, *[1] * (values.dim() - 3)).expand(*best.shape, 1, *values.shape[3:])
    return values.gather(2, index).squeeze(2)


def first_near_best(scores: torch.Tensor, near_tie: float) -> torch.Tensor:
    """The index of the first of S candidates (R, M, S) whose score is within ``near_tie``
    (relative) of the best (the highest; -inf or NaN: never chosen unless all are): (R, M).
    Candidates that reach one result (e.g. one partition with the clusters in another order)
    tie up to rounding, which depends on the chunking and the dtype: the first of them wins."""
    scores = scores.nan_to_num(nan=-math.inf)
    best = scores.amax(-1, keepdim=True)
    near = scores >= best - near_tie * best.abs()
    return near.to(torch.uint8).argmax(-1)


def seedings(
    X: torch.Tensor, M: int, K: int, streams: RestartStreams, chunk_size: int, weights: torch.Tensor | None,
    components: torch.Tensor | None, tol: torch.Tensor, n_seedings: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per restart and model ``n_seedings`` (default N_SEEDINGS for data shared by the models, X
    (N, D); 1 for a dataset per model) greedy k-means++ seedings, each followed by
    SEEDING_LLOYD_ITERATIONS Lloyd iterations: centres (R, M, S, K, D), the labels of the points'
    nearest centres (R, M, S, N) and the weighted inertias (R, M, S) in the accumulator dtype.
    (One seeding with 5 Lloyd iterations leaves a heavy tail of poor optima; a full Lloyd run
    from one seeding does not remove it: a choice among several seedings does.)

    The seedings are one batch: models ``(M, S)`` flattened to ``M * S`` on the model axis (data
    of one model per row ``(M, N, D)`` are repeated S times), so S seedings cost about one where
    the cost is the per-step dispatch (small data) and S times one where it is the arithmetic.
    Seeding s of restart r is drawn from restart r's own stream (a restart does not depend on
    how many restarts run), model-major, so the first model of a batch draws what it draws
    alone."""
    S = n_seedings or (N_SEEDINGS if X.dim() == 2 else 1)
    R = len(streams)

    def per_seeding(value: torch.Tensor, dim: int = 0) -> torch.Tensor:
        return value if S == 1 else value.repeat_interleave(S, dim)  # (one seeding: no copy)

    many_X = X if X.dim() == 2 else per_seeding(X)  # (N, D) shared, or (M * S, N, D)
    many_weights = weights if weights is None or weights.dim() == 1 else per_seeding(weights)
    many_tol = tol if tol.dim() == 0 else per_seeding(tol)
    many_components = None if components is None else per_seeding(components, 1)
    if components is not None and X.dim() == 2 and (weights is None or weights.dim() == 1):
        # A grid over the number of components of one dataset (select): greedy k-means++ is
        # nested (the first k centres of a seeding of K are a seeding of k), so every model of
        # the grid takes the first model's S seedings of the largest K.
        shared = kmeans_plusplus(X, S, K, streams, chunk_size, weights)  # (R, S, K, D)
        seeded = shared.unsqueeze(1).expand(R, M, S, K, X.shape[-1]).reshape(R, M * S, K, X.shape[-1])
        sizes = components[0].sum(-1)  # (M,)
        start = None
        if torch.equal(components[0], torch.arange(K, device=X.device) < sizes.unsqueeze(-1)):  # the first k each
            labels, dists = nested_nearest(X, shared, sizes.tolist(), chunk_size)  # (R, M, S, N) each
            start = labels.flatten(1, 2), dists.flatten(1, 2)
    else:
        seeded = kmeans_plusplus(many_X, M * S, K, streams, chunk_size, many_weights)  # (R, M * S, K, D)
        start = None
    result = lloyd(many_X, seeded, max_iter=SEEDING_LLOYD_ITERATIONS, tol=many_tol, chunk_size=chunk_size,
                   weights=many_weights, components=many_components, nearest_start=start)
    distances = result.distances.to(accumulator_dtype(X.device))
    inertia = weighted_total(distances, many_weights).view(R, M, S)
    return result.centres.view(R, M, S, K, -1), result.labels.view(R, M, S, -1), inertia


def initial_responsibilities(
    method: str, X: torch.Tensor, M: int, K: int, streams: RestartStreams, chunk_size: int,
    centres: torch.Tensor | None = None, weights: torch.Tensor | None = None, components: torch.Tensor | None = None,
    n_candidates: int = 1,
) -> Callable[[int, int], torch.Tensor]:
    """Initial responsibilities as a function ``resp(start, stop) -> (R, M, K, stop - start)``
    (generated chunk by chunk, so N x K is never materialised for random responsibilities).
    ``n_candidates`` > 1 ("k-means++" without ``centres`` only): every one of that many
    :func:`seedings` of each model, as (R, M * S, K, n) (model-major), for the caller to choose.

    ``centres`` (R, M, K, D), when given (e.g. ``means_init``), replace the seeding: points are
    assigned to the nearest given centre. ``weights`` (N,) or (M, N) of the points weight the
    seeding (k-means++, Lloyd, random data points) as scikit-learn's k-means does; random
    responsibilities do not depend on them. ``components`` (1, M, K): the components each model
    has (a grid over K padded to the largest: the first k centres of a k-means++ seeding of K
    are one of k), or None: all.
    """
    if method == "random" and centres is None:
        # The rows' draws are a function of the rows: a pass over the chunks again (the
        # statistics taken again) redraws what the first drew, and the streams go on from
        # where the first pass left them.
        began: dict[int, list[torch.Tensor]] = {}  # the streams' states where each chunk's draw began
        furthest: list[torch.Tensor] = []  # their states after the last new draw

        def random_resp(start: int, stop: int) -> torch.Tensor:
            fresh = start not in began
            if fresh:
                began[start] = streams.states()
            else:
                streams.restore(began[start])
            resp = streams.rand(M, K, stop - start, dtype=X.dtype)
            if fresh:
                furthest[:] = streams.states()
            else:
                streams.restore(furthest)
            if components is not None:
                resp = resp * components.unsqueeze(-1)
            return resp / resp.sum(-2, keepdim=True)

        return random_resp
    labels: torch.Tensor | None = None  # (R, M, N), where the clustering gives them
    if centres is None:
        if method == "random_from_data":
            centres = random_points(X, M, K, streams, weights)
        else:
            tol = relative_tolerance(X, 1e-4)
            if method == "k-means++" and n_candidates > 1:
                labels = seedings(X, M, K, streams, chunk_size, weights, components, tol, n_candidates)[1].flatten(1, 2)
            elif method == "k-means++":
                centres, labels = best_of_seedings(X, M, K, streams, chunk_size, weights, components, tol)
            else:
                centres = kmeans_plusplus(X, M, K, streams, chunk_size, weights)
                result = lloyd(X, centres, max_iter=300, tol=tol, chunk_size=chunk_size, weights=weights,
                               components=components)
                centres, labels = result.centres, result.labels
    if labels is None:  # the user's centres, or random data points
        labels = nearest(X, cast(torch.Tensor, centres), chunk_size, components=components)[0]
    chosen = labels

    def hard_resp(start: int, stop: int) -> torch.Tensor:  # one-hot (R, M, K, n), points last in memory
        index = chosen[..., start:stop].unsqueeze(2)  # (R, M, 1, n)
        return X.new_zeros(*index.shape[:2], K, index.shape[-1]).scatter_(2, index, 1.0)

    return hard_resp




class SharedClustering:
    """The initial clustering of one fit kept for other fits whose clustering inputs are the
    same (the data, its weights, the number of components and the components each model has,
    ``init_params``, the seed and the restarts; e.g. :func:`torch_em.select`'s covariance
    types): each restart group's responsibilities and its generators' states after the
    clustering, so a later fit draws on (re-seeding) as if it had clustered itself. Random
    responsibilities (``init_params="random"``) are no clustering and are not kept."""

    def __init__(self) -> None:
        self.clusterings: dict[range, tuple[Callable[[int, int], torch.Tensor], list[torch.Tensor]]] = {}

    def keep(self, restarts: range, resp: Callable[[int, int], torch.Tensor], streams: RestartStreams) -> None:
        self.clusterings[restarts] = (resp, [g.get_state() for g in streams.generators])

    def reuse(self, restarts: range, streams: RestartStreams) -> Callable[[int, int], torch.Tensor]:
        resp, states = self.clusterings[restarts]
        for generator, state in zip(streams.generators, states):
            generator.set_state(state)
        return resp


def initial_parameters(
    latent: LatentStructure, family: ComponentFamily, data: Data, *, method: str, n_components: int, layout: Layout,
    restarts: range, seed: int | None, chunk_size: int, user_parameters: Theta, user_centres: torch.Tensor | None,
    failures: Failures | None, generator: Callable[[], torch.Generator], softening: float = 0.0,
    prior: ModelPrior | None = None, components: torch.Tensor | None = None,
    responsibilities: Callable[[int, int], torch.Tensor] | None = None, shared: SharedClustering | None = None,
) -> Params:
    """Working initial parameters (R, M, ...) of the given R ``restarts``: an M-step from the
    initial responsibilities of ``method`` (weighted by the data's weights; the default
    "k-means++" takes it from each of N_SEEDINGS seedings and keeps the most likely, see
    LIKELIHOOD_TIE), then overridden by
    what the user supplied (``user_parameters`` in module layout (*batch_shape, ...) under
    their working names: the family's and the latent structure's, e.g. ``"log_weights"``;
    ``user_centres`` (*batch_shape, K, D) replace the seeding). Given ``failures``,
    a model whose initial M-step is invalid is recorded there and starts from the default
    parameters (finite; it does not run) instead of raising. ``softening``: the initial
    responsibilities become ``(1 - softening) * resp + softening / K``, so that no component
    starts with a probability of 0 for what the others' points hold (which EM could not undo).
    ``prior``: the first M-step is MAP-EM's (:mod:`torch_em.priors`). ``components`` (1, M, K):
    the components each model has (:class:`torch_em.em.EMMap`'s), or None: all.
    ``responsibilities``: given initial responsibilities ``resp(start, stop) -> (1 or R, M, K,
    stop - start)`` of the data's points, which replace those of ``method``. ``shared``: the
    clustering of fits whose clustering inputs are the same (:class:`SharedClustering`)."""
    R, K = len(restarts), n_components
    X, reference = data.X, data.reference
    latent_names = set(latent.parameter_names)
    if set(user_parameters) == {*latent_names, *family.event_shapes(1, 1)}:  # everything given: no clustering needed
        return _with_user_values(Params({}, {}), user_parameters, latent_names, layout, R)
    # The default seeds several candidates per model and keeps the most likely (see LIKELIHOOD_TIE)
    # where the models share the data and their weights (the candidates are more models of them).
    shared_data = X.dim() == 2 and (data.weights is None or data.weights.dim() == 1)
    S = N_SEEDINGS if (method == "k-means++" and shared_data and user_centres is None and responsibilities is None
                       and not user_parameters and not softening) else 1
    M = layout.n_models
    MS = M * S  # the candidates of a model are consecutive on the model axis: models of their own
    candidate_latent, candidate_family, candidate_prior, candidate_components = latent, family, prior, components
    if S > 1:
        of_model = torch.arange(M, device=X.device).repeat_interleave(S)  # (M * S,) the model of each candidate
        candidate_latent, candidate_family = latent.select_models(of_model), family.select_models(of_model)
        candidate_prior = None if prior is None else prior.models(of_model)
        candidate_components = None if components is None else components.repeat_interleave(S, 1)
    streams = RestartStreams(seed, restarts, X.device)
    if user_centres is not None:
        user_centres = family.embedding(layout.restarts(user_centres, R), reference)
    resp: Callable[[int, int], torch.Tensor]
    clustered = method != "random" or user_centres is not None  # (random responsibilities are drawn as used)
    if responsibilities is not None:
        def resp(start: int, stop: int) -> torch.Tensor:
            return responsibilities(start, stop).expand(R, MS, K, stop - start)
    elif shared is not None and clustered and restarts in shared.clusterings:
        resp = shared.reuse(restarts, streams)
    else:
        resp = initial_responsibilities(method, family.embedding(X, reference), M, K, streams, chunk_size,
                                        user_centres, data.weights, components, S)
        if shared is not None and clustered:
            shared.keep(restarts, resp, streams)
    if softening:
        hard = resp

        def resp(start: int, stop: int) -> torch.Tensor:
            return hard(start, stop) * (1 - softening) + softening / K
    every_model = torch.ones(R, MS, dtype=torch.bool, device=X.device)

    def random_candidates(k: int) -> torch.Tensor:
        return family.features(random_points(X, MS, k, streams, data.weights), reference)[0]

    def reseeded_statistics(own: OwnReference | None = None) -> Statistics:
        return reseed_empty(candidate_family, statistics_from_responsibilities(data, resp, own), random_candidates,
                            every_model, reference, candidate_components)

    params, invalid = m_step(candidate_latent, candidate_family, reseeded_statistics(), reference, every_model,
                             refine=refiner(candidate_family, None, reseeded_statistics), prior=candidate_prior,
                             components=candidate_components)
    if S > 1:
        params, invalid = _most_likely_candidates(candidate_latent, candidate_family, data, params, invalid, S,
                                                  candidate_prior)
    record_failures(failures, invalid.any(-1), invalid_component_reason(family, "initialisation", invalid))
    if failures is not None and bool(failures.failed.any()):
        default = Params(latent.default_parameters((R, M), K, X), family.default_parameters(
            (R, M), K, X.shape[-1], generator(), X.device, X.dtype))
        params = default.where(failures.failed, params)
    return _with_user_values(params, user_parameters, latent_names, layout, R)


#: The default initialisation keeps, of a model's N_SEEDINGS candidate seedings (each an M-step
#: from its k-means partition), the one whose parameters give the data the highest
#: log-likelihood (with a prior: plus the log prior, MAP-EM's objective), the first within this
#: relative gap of the highest (candidates that reach one partition tie up to rounding). That is
#: where the models share the data and their weights, without user values or softening;
#: otherwise the seeding of least inertia (:func:`best_of_seedings`). The mixture's own objective
#: chooses better than the k-means inertia, which can prefer a partition that leads EM to a worse
#: optimum (benchmarks/initialization.py). It is also more sensitive to a point moving between
#: partitions: where five Lloyd iterations in float32 and in float64 end in slightly different
#: partitions (integer-valued data with exact distance ties, e.g. digits: 4 of 140 fits), the two
#: dtypes can keep different seedings.
LIKELIHOOD_TIE = 1e-6


def _most_likely_candidates(
    latent: LatentStructure, family: ComponentFamily, data: Data, params: Params, invalid: torch.Tensor, S: int,
    prior: ModelPrior | None = None,
) -> tuple[Params, torch.Tensor]:
    """Of the initial parameters of S candidates per model, (R, M * S, ...) model-major, and their
    invalid components (R, M * S, K), those of the candidate with the highest log-likelihood
    of ``data`` (:func:`~torch_em.em.log_likelihood`: one pass, no statistics), plus the log
    ``prior`` of its parameters under MAP-EM (a candidate with an invalid component is chosen
    only if all are): (R, M, ...), (R, M, K)."""
    R, MS = invalid.shape[:2]
    objective = log_likelihood(latent, family, params, data)
    if prior is not None:
        objective = objective + prior.log_prob(params)
    objective = objective.to(accumulator_dtype(invalid.device)).masked_fill(invalid.any(-1), -math.inf)
    best = first_near_best(objective.view(R, MS // S, S), LIKELIHOOD_TIE)  # (R, M)

    def chosen(value: torch.Tensor) -> torch.Tensor:  # (R, M * S, ...) -> (R, M, ...)
        return chosen_candidate(value.view(R, MS // S, S, *value.shape[2:]), best)

    return params.map(chosen), chosen(invalid)


def _with_user_values(
    params: Params, user_parameters: Theta, latent_names: set[str], layout: Layout, n_restarts: int,
) -> Params:
    """``params`` with the user's initial values (module layout, working names) put in for
    every restart."""
    latent, emission = dict(params.latent), dict(params.emission)
    for name, value in user_parameters.items():
        (latent if name in latent_names else emission)[name] = layout.restarts(value, n_restarts)
    return Params(latent, emission)
