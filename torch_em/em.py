"""The EM engine: one E-step, one M-step, one EM map, and the drivers that compose it.

A model is a latent structure (:mod:`torch_em.latent`: how the hidden states are distributed)
times an emission family (:mod:`torch_em.families`: ``T(x)``, natural parameters, closed-form
M-step) fitted to observations (:mod:`torch_em.data`: rows, optionally weighted, in chunks or
streamed). Parameters travel as one tree, :class:`Params` (the latent structure's and the
family's), in the working layout ``(R, M, ...)``: ``R`` restarts times ``M`` independent models.

    e_step(latent, family, params, data) -> Statistics     one pass: sums over the points
    log_likelihood(latent, family, params, data) -> (R, M) the E-step's log-likelihood alone
    m_step(latent, family, stats, ...)   -> Params, invalid components
    EMMap(latent, family, data)(params)  -> EMStep: new params and the objective of the old

Drivers only compose the EM map: :func:`run_em` (full-batch, chunked, streamed and distributed
fits with per-model convergence; converged models drop out of the working batch), the online
update of ``Mixture.partial_fit`` (running statistics interpolated with :meth:`Statistics.lerp`)
and the differentiable layer (:mod:`torch_em.functional`).

Component log-densities are laid out as ``(R, M, K, n)`` with the points last, which makes both
GEMMs copy-free and keeps the reductions over a short K axis vectorised along the points:

    shared data:    log_prob (R*M*K, n) = eta (R*M*K, F) @ T^T (F, n)
    per-model data: log_prob (R, M, K, n) = eta (R, M, K, F) @ T^T (M, F, n)
    statistics:     S (R, M, K, F) = resp (R, M, K, n) @ T (n, F) or (M, n, F)
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, TypeVar, cast

import torch

from . import distributed
from ._products import BLOCKED_MIN_FEATURES, BLOCKED_MIN_POINTS, STATISTICS_BLOCK, uses_blocks  # noqa: F401  (the engine's names for its blocked statistics)
from ._products import blocked_product as _blocked_product
from .data import Chunk, Data, StreamData, default_chunk_size  # noqa: F401  (the engine's data types)
from .failures import (  # noqa: F401  (the engine's failure records)
    NOT_FINITE_ADVICE, Failure, Failures, ModelFailed, invalid_component_reason, record_failures,
)
from .families.base import ComponentFamily, Marginal, Theta
from .latent import LatentStructure
from .missing import MissingRows  # noqa: F401  (rows with missing entries, as chunks carry them)
from .normalize import log_normalize
from .own_reference import OwnReference
from .params import Params, where_models  # noqa: F401  (the engine's parameter tree)
from .priors import ModelPrior
from .statistics import Statistics, floored_counts

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

    from .acceleration import SquaremMap

ResultT = TypeVar("ResultT", bound="DataclassInstance")  # a result dataclass (EMResult, LloydResult, ...)

logger = logging.getLogger(__name__)

#: A fit computes only the models still running: once they are at most this fraction of the
#: models it computes, the working batch is compacted to them (their data and parameters copied
#: out), so an iteration's cost follows the running models. 0 disables compaction.
COMPACTION_FRACTION = 0.5


# --- E-step -------------------------------------------------------------------------------------
def emission_log_prob(
    T: torch.Tensor, h: torch.Tensor | None, eta: torch.Tensor, const: torch.Tensor
) -> torch.Tensor:
    """``log p(x_n | component k of model (r, m)) + const[r, m, k]`` for one chunk: (R, M, K, n),
    with the family's natural parameters (one GEMM).

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


def weighted_statistics(T: torch.Tensor, resp: torch.Tensor) -> torch.Tensor:
    """``S[r, m, k] = sum_n resp[r, m, k, n] T(x_n)``: (R, M, K, F) from resp (R, M, K, n) and
    T (n, F) or (M, n, F)."""
    if T.dim() == 3 and T.shape[0] == 1:  # one model's data: the product of shared data
        T = T[0]
    if T.dim() == 2:
        flat = resp.reshape(-1, resp.shape[-1])  # (R*M*K, n)
        if uses_blocks(T):
            sums = _blocked_product(flat, T)
        else:
            sums = flat @ T
        return sums.view(*resp.shape[:-1], T.shape[-1])
    return resp @ T


def joint_parameters(
    latent: LatentStructure, family: ComponentFamily, params: Params, reference: torch.Tensor | None,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``eta`` (R, M, K, F) and ``const`` (R, M, K) of the log joint ``T(x).eta + const (+ h)``:
    the family's natural parameters with the latent structure's per-state log prior folded into
    the constant, in units of ``scale`` per nat (scaling the GEMM's parameters costs nothing)."""
    eta, const = family.natural_parameters(params.emission, reference)
    log_prior = latent.log_prior(params.latent)
    if log_prior is not None:
        const = const + log_prior
    return (eta, const) if scale == 1.0 else (eta * scale, const * scale)


def e_step(
    latent: LatentStructure, family: ComponentFamily, params: Params, data: Data | StreamData,
    own: OwnReference | None = None, pseudo_count: float = 0.0, beta: float = 1.0,
) -> Statistics:
    """One pass over the data: the statistics and the total (weighted) log-likelihood of ``params``
    (this rank's; :meth:`Statistics.reduced` sums the ranks).

    ``own``: components evaluated directly and summarised about their own reference point.
    ``pseudo_count``: that many pseudo-points per component, distributed like the data, added to
    the statistics (not to the log-likelihood): a MAP-style smoothing prior.
    ``beta``: the inverse temperature of a tempered E-step (deterministic annealing,
    :mod:`torch_em.annealing`; only for a latent structure that :attr:`~LatentStructure.tempers`):
    posteriors ``softmax_k(beta * log p(x_n, z_n = k))`` and, in place of the log-likelihood, the
    tempered objective ``(1 / beta) sum_n w_n log sum_k p(x_n, z_n = k) ** beta``. 1: plain EM,
    the same operations bit for bit. The log joint is formed in units of ``beta *
    log_joint_scale`` per nat (the emission GEMM's parameters scaled, which costs nothing).
    """
    scale = latent.log_joint_scale * beta
    tempered = {} if beta == 1.0 else {"beta": beta}  # (a structure that does not temper is never asked to)
    eta, const = joint_parameters(latent, family, params, data.reference, scale)
    total = None
    about = None  # the points the statistics of rows with missing entries are taken about
    for part in data.parts():
        for chunk in part.chunks():
            log_joint, marginal, groups = _chunk_log_joint(latent, family, params, data, chunk, eta, const, scale, own)
            resp, evidence, latent_stats = latent.posterior(log_joint, params.latent, chunk.weights, chunk.lengths,
                                                            **tempered)
            if pseudo_count:
                resp = resp + _pseudo_responsibility(pseudo_count, chunk, data.total_weight, resp)
            if marginal is not None:  # rows with missing entries
                if about is None and family.uses_reference:
                    about = statistics_reference(family, own, data.reference, params.emission)
                sums = marginal.statistics(resp, about)
            else:
                sums = weighted_statistics(cast(torch.Tensor, chunk.T), resp)
                if groups is not None:
                    cast(OwnReference, own).write_statistics(groups, resp, sums)
            stats = Statistics(resp.sum(-1), sums, evidence, latent_stats)
            total = stats if total is None else total + stats
    result = cast(Statistics, total)  # the data have at least one chunk
    if own is not None:
        own.attach_reference(result, data.reference)
    return result


def log_likelihood(
    latent: LatentStructure, family: ComponentFamily, params: Params, data: Data | StreamData,
) -> torch.Tensor:
    """The total (weighted) log-likelihood (R, M) of ``params`` on the data that :func:`e_step`
    returns (the same number, this rank's), alone: no posteriors or statistics are formed."""
    scale = latent.log_joint_scale
    eta, const = joint_parameters(latent, family, params, data.reference, scale)
    total = None
    for part in data.parts():
        for chunk in part.chunks():
            log_joint = _chunk_log_joint(latent, family, params, data, chunk, eta, const, scale, None)[0]
            evidence = latent.log_evidence(log_joint, params.latent, chunk.weights, chunk.lengths)
            total = evidence if total is None else total + evidence
    return cast(torch.Tensor, total)  # the data have at least one chunk


def _chunk_log_joint(
    latent: LatentStructure, family: ComponentFamily, params: Params, data: Data | StreamData, chunk: Chunk,
    eta: torch.Tensor, const: torch.Tensor, scale: float, own: OwnReference | None,
) -> tuple[torch.Tensor, Marginal | None, list[tuple[slice, torch.Tensor]] | None]:
    """The log joint (R, M, K, n) of a chunk in units of ``scale`` per nat (from the joint
    parameters ``eta``, ``const``), with what its statistics need: the rows' marginal where
    entries are missing, the ``own`` groups where components are evaluated about their own point."""
    if chunk.missing is not None:  # rows with missing entries: marginal densities
        # Expanded about the shared reference as complete rows are, unless some components need their own.
        marginal = family.marginal(chunk.missing, params.emission, data.reference if own is None else None)
        return marginal_log_joint(latent, params, marginal.log_prob, scale), marginal, None
    T = cast(torch.Tensor, chunk.T)  # rows without missing entries have their features
    h = chunk.h if chunk.h is None or scale == 1.0 else chunk.h * scale
    log_joint = emission_log_prob(T, h, eta, const)  # (R, M, K, n)
    groups = None
    if own is not None:
        groups = own.groups(chunk.X, log_joint.shape[-2], log_joint.shape[1])
        own.write_log_prob(groups, log_joint, scale)
    return log_joint, None, groups


def marginal_log_joint(latent: LatentStructure, params: Params, log_prob: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """The log joint (R, M, K, n) in units of ``scale`` per nat from the emission log-densities
    ``log_prob`` (R, M, K, n) of rows with missing entries (marginal over them)."""
    log_prior = latent.log_prior(params.latent)
    log_joint = log_prob if log_prior is None else log_prob + log_prior.unsqueeze(-1)
    return log_joint if scale == 1.0 else log_joint * scale


def statistics_reference(family: ComponentFamily, own: OwnReference | None, reference: torch.Tensor | None,
                         theta: Theta) -> torch.Tensor:
    """The point (R, M, K, D) every component's statistics are taken about: the shared
    ``reference``, or a component's own where ``own`` summarises it about its own point."""
    points = family.own_reference(theta)  # (R, M, K, D)
    shared = points.new_zeros(()) if reference is None else reference
    every = shared.expand(*points.shape[:3], points.shape[-1])
    if own is None or not own.summarise or own.index.numel() == 0:
        return every
    every = every.clone()
    every.view(-1, every.shape[-1])[own.index] = own.points
    return every


def _pseudo_responsibility(
    count: float, chunk: Chunk, total_weight: float | torch.Tensor, resp: torch.Tensor
) -> torch.Tensor:
    """Every point's share ``count * w_n / W`` of ``count`` pseudo-points per component
    distributed like the data, broadcastable to resp (R, M, K, n)."""
    n = resp.shape[-1]
    weights = resp.new_ones(n) if chunk.weights is None else chunk.weights  # (n,) or (M, n)
    total = torch.as_tensor(total_weight, dtype=resp.dtype, device=resp.device)
    return (count * weights / total.unsqueeze(-1) if total.dim() else count * weights / total).unsqueeze(-2)


def posterior(latent: LatentStructure, family: ComponentFamily, params: Params, data: Data) -> tuple[torch.Tensor, torch.Tensor]:
    """Posteriors (R, M, K, N) (weighted) and the total log-likelihood (R, M) of data in memory,
    without statistics (e.g. a differentiable layer's output)."""
    scale = latent.log_joint_scale
    eta, const = joint_parameters(latent, family, params, data.reference, scale)
    # (complete rows: every chunk has its features; the data have at least one chunk)
    parts = [latent.posterior(emission_log_prob(cast(torch.Tensor, c.T), None if c.h is None else c.h * scale, eta, const),
                              params.latent, c.weights, c.lengths) for c in data.chunks()]
    return torch.cat([p[0] for p in parts], -1), cast(torch.Tensor, sum(p[1] for p in parts))


def statistics_from_responsibilities(
    data: Data, resp_fn: Callable[[int, int], torch.Tensor], own: OwnReference | None = None
) -> Statistics:
    """Statistics for given responsibilities; ``resp_fn(start, stop)`` -> (R, M, K, n) (the
    data's weights applied here). ``own``: components summarised about their own reference point."""
    total = None
    for (start, stop), chunk in zip(data.bounds, data.chunks()):
        resp = resp_fn(start, stop)
        if chunk.weights is not None:
            resp = resp * chunk.weights.unsqueeze(-2)
        unknown = torch.full(resp.shape[:2], math.nan, dtype=resp.dtype, device=resp.device)  # no likelihood
        sums = weighted_statistics(cast(torch.Tensor, chunk.T), resp)  # (complete rows: features computed)
        if own is not None:
            own.write_statistics(own.groups(chunk.X, resp.shape[-2], resp.shape[1]), resp, sums)
        stats = Statistics(resp.sum(-1), sums, unknown)
        total = stats if total is None else total + stats
    result = cast(Statistics, total)  # the data have at least one chunk
    if own is not None:
        own.attach_reference(result, data.reference)
    return result


def worst_point_features(
    latent: LatentStructure, family: ComponentFamily, params: Params, data: Data, k: int
) -> torch.Tensor:
    """Features (R, M, k, F) of the k points with the lowest log-likelihood per model, worst
    first (points of weight 0 are not candidates)."""
    eta, const = joint_parameters(latent, family, params, data.reference)
    best_values: torch.Tensor | None = None
    best_features: torch.Tensor | None = None
    # (complete rows: every chunk has its features)
    for T, h, weights in ((cast(torch.Tensor, c.T), c.h, c.weights) for c in data.chunks()):
        _, ll = log_normalize(emission_log_prob(T, h, eta, const), dim=-2, inplace=True)  # ll (R, M, n)
        if weights is not None:
            ll = ll.masked_fill(weights == 0, math.inf)
        values, index = ll.topk(min(k, ll.shape[-1]), dim=-1, largest=False)  # (R, M, k')
        if T.dim() == 2:
            feats = T[index]  # (R, M, k', F)
        else:
            expanded = T.expand(ll.shape[0], *T.shape)
            feats = expanded.gather(2, index.unsqueeze(-1).expand(*index.shape, T.shape[-1]))
        if best_values is not None and best_features is not None:  # (set together)
            values = torch.cat([best_values, values], -1)
            feats = torch.cat([best_features, feats], -2)
            values, keep = values.topk(min(k, values.shape[-1]), dim=-1, largest=False)
            feats = feats.gather(2, keep.unsqueeze(-1).expand(*keep.shape, feats.shape[-1]))
        best_values, best_features = values, feats
    worst = cast(torch.Tensor, best_features)  # the data have at least one chunk
    if worst.shape[2] < k:  # fewer points than components: repeat the worst ones
        repeats = math.ceil(k / worst.shape[2])
        worst = worst.repeat(1, 1, repeats, 1)[:, :, :k]
    return worst


def worst_points(latent: LatentStructure, family: ComponentFamily, params: Params, data: Data | StreamData,
                 k: int) -> torch.Tensor:
    """:func:`worst_point_features` of the data in memory, or of a stream's sample; rank 0's
    under torch.distributed."""
    return distributed.broadcast(worst_point_features(latent, family, params, data.sample, k))[0]


# --- M-step -------------------------------------------------------------------------------------
def reseed_empty(
    family: ComponentFamily, stats: Statistics, candidates: Callable[[int], torch.Tensor], active: torch.Tensor,
    reference: torch.Tensor | None = None, components: torch.Tensor | None = None,
) -> Statistics:
    """Replace the statistics of components with fewer than ``family.min_count`` points (in
    active models) by a pseudo-point each at the worst-explained data points, weighted like an
    average component.

    ``candidates(k)`` returns the features (R, M, k, F) of the k worst points, worst first; it is
    only called when a component is empty, so the extra pass over the data is rare.
    ``components``: (R|1, M, K) the components each model has (masked ones stay empty), or None.
    """
    empty = (stats.counts < family.min_count) & active.unsqueeze(-1)  # (R, M, K)
    if components is not None:
        empty &= components
    if not bool(empty.any()):
        return stats
    logger.debug("re-seeding %d empty component(s) in %d model(s)", int(empty.sum()), int(empty.any(-1).sum()))
    n_components = stats.counts.shape[-1]
    points = candidates(n_components)  # (R, M, K, F)
    rank = (empty.cumsum(-1) - 1).clamp_min(0)  # j-th empty component takes the j-th worst point
    chosen = points.gather(2, rank.unsqueeze(-1).expand(*rank.shape, points.shape[-1]))
    pseudo = family.reseed_statistics(chosen, stats.counts, stats.sums, empty)
    # The pseudo-point gets the weight of an average component so that it can compete for the
    # points near it (with the weight of one point it would be starved again).
    present = n_components if components is None else components.sum(-1, keepdim=True)
    share = stats.counts.sum(-1, keepdim=True) / present  # (R, M, 1)
    counts = torch.where(empty, share.expand_as(stats.counts), stats.counts)
    sums = torch.where(empty.unsqueeze(-1), share.unsqueeze(-1) * pseudo, stats.sums)
    every = stats.reference
    if every is not None:  # the pseudo-point's features are about the shared ``reference``
        shared = every.new_zeros(()) if reference is None else reference
        every = torch.where(empty.unsqueeze(-1), shared.expand_as(every), every)
    return Statistics(counts, sums, stats.log_likelihood, stats.latent, every)


def m_step(
    latent: LatentStructure, family: ComponentFamily, stats: Statistics, reference: torch.Tensor | None,
    active: torch.Tensor, fixed: Params | None = None,
    refine: Callable[[torch.Tensor, Theta], Statistics | None] | None = None, prior: ModelPrior | None = None,
    components: torch.Tensor | None = None,
) -> tuple[Params, torch.Tensor]:
    """Closed-form M-step for the working batch: the parameters and the invalid components
    (R, M, K) of the ``active`` (R, M) models (an inactive model's are not reported).

    ``fixed``: parameters held at their values (working layout), the others maximised given them
    (the family's conditional M-step).
    ``refine(invalid, theta)``: when components (R, M, K) come out invalid, statistics taken
    again with those components about their own new reference point (exact where the one-pass
    statistics about the shared point lost the variance to rounding), or None; the M-step is then
    redone from them.
    ``prior``: MAP-EM, the prior's pseudo-statistics added to the statistics first
    (:mod:`torch_em.priors`).
    ``components``: (R|1, M, K) bool, the components each model has (a mixture's; None: all):
    the others keep log-weight -inf and a copy of component 0's parameters, and are never invalid.
    """
    every = stats.reference if stats.reference is not None else reference  # per-component where some have their own
    fixed_emission = {} if fixed is None else fixed.emission
    counts, sums, latent_stats = floored_counts(stats.counts), stats.sums, stats
    if prior is not None:
        counts, sums = prior.emission_statistics(counts, sums, every)
        latent_stats = prior.latent_statistics(latent, stats)
    if fixed_emission:
        theta, valid = family.conditional_m_step(counts, sums, every, fixed_emission)
    else:
        theta, valid = family.m_step(counts, sums, every)
    new = Params(latent.m_step(latent_stats, {} if fixed is None else fixed.latent), theta)
    if components is not None:
        new, valid = masked_components(family, new, components), valid | ~components
    invalid = ~valid & active.unsqueeze(-1)  # (R, M, K)
    if refine is not None and bool(invalid.any()):
        refined = refine(invalid, theta)
        if refined is not None:
            return m_step(latent, family, refined, reference, active, fixed, prior=prior, components=components)
    if family.lifts_rounding and sums.dtype != torch.float64 and not fixed_emission and bool(invalid.any()):
        # The last resort, after statistics about the components' own means: a lower-precision
        # covariance indefinite by its rounding alone is raised by it (the valid ones are unchanged).
        theta, valid = family.lifted_m_step(counts, sums, every)
        new = Params(new.latent, theta)
        if components is not None:
            new, valid = masked_components(family, new, components), valid | ~components
        invalid = ~valid & active.unsqueeze(-1)
    return new, invalid


def masked_components(family: ComponentFamily, params: Params, components: torch.Tensor) -> Params:
    """A mixture's ``params`` (R, M, ...) whose components outside ``components`` (R|1, M, K) are
    masked: log-weight -inf (the others renormalised) and component 0's parameters (finite and
    valid: a masked component takes part in nothing, but nothing it holds may be NaN)."""
    log_weights = params.latent["log_weights"].masked_fill(~components, -math.inf)
    log_weights = log_weights - log_weights.logsumexp(-1, keepdim=True)
    per_component = component_axis_names(family)
    theta = {}
    for name, value in params.emission.items():
        if name in per_component:
            keep = components.reshape(*components.shape, *([1] * (value.dim() - 3)))
            value = torch.where(keep, value, value[:, :, :1])
        theta[name] = value
    return Params({**params.latent, "log_weights": log_weights}, theta)


def component_axis_names(family: ComponentFamily) -> set[str]:
    """The family's parameters with a component axis (e.g. not a tied covariance)."""
    one, two = family.event_shapes(2, 3), family.event_shapes(3, 3)
    return {name for name, shape in one.items() if shape != two[name]}


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


# --- the EM map -----------------------------------------------------------------------------------
@dataclass
class EMStep:
    """One application of the EM map to a working batch (R, M)."""

    params: Params  # the M-step's parameters (not to be used for models in ``invalid`` or not finite)
    objective: torch.Tensor  # (R, M) mean (weighted) log-likelihood of the parameters the step started from (EMMap.objective)
    invalid: torch.Tensor  # (R, M, K) invalid components of the models that were running and finite
    # (R, M) models some of whose components were re-seeded in the step (not an EM step: such a
    # step's change of the objective says nothing about convergence), or None: none
    reseeded: torch.Tensor | None = None

    @property
    def any_invalid(self) -> bool:
        return bool(self.invalid.any())


class EMMap:
    """The EM map ``params -> (new params, objective)`` of one model structure and dataset.

    latent, family: the model; data: :class:`Data` or :class:`StreamData`;
    fixed: parameters held at their values (working layout) or None;
    pseudo_count: pseudo-points per component distributed like the data (a smoothing prior);
    beta: the inverse temperature of the E-step (:func:`e_step`; 1: plain EM, below 1: a stage of
        deterministic annealing, whose objective is then the tempered one);
    prior: a conjugate prior (MAP-EM: pseudo-statistics in the M-step, log prior in the objective);
    components: (R|1, M, K) bool, the components each model of a mixture has (models with fewer
        components padded to K, e.g. a grid over K fitted as one batch), or None: all;
    reseed: whether components with (almost) no points are re-seeded at the worst-explained
        points before the M-step; own_reference: whether components the shared expansion would
        not resolve are evaluated directly (:class:`OwnReference`); reduce: whether statistics
        are summed over the ranks of torch.distributed.
    """

    def __init__(
        self, latent: LatentStructure, family: ComponentFamily, data: Data | StreamData, *,
        fixed: Params | None = None, pseudo_count: float = 0.0, reseed: bool = True, own_reference: bool = True,
        reduce: bool = True, prior: ModelPrior | None = None, components: torch.Tensor | None = None,
        beta: float = 1.0,
    ):
        self.latent, self.family, self.data, self.fixed, self.prior = latent, family, data, fixed, prior
        self.components, self.beta = components, beta
        self.pseudo_count, self.reseed, self.own_reference, self.reduce = pseudo_count, reseed, own_reference, reduce

    def own(self, params: Params, summarise: bool = True) -> OwnReference | None:
        """The components of ``params`` that are evaluated about their own reference point."""
        if not self.own_reference:
            return None
        log_prior = self.latent.log_prior(params.latent)
        own = OwnReference.of(self.family, params.emission, log_prior, self.data.reference)
        return own if own is None or summarise else dataclasses.replace(own, summarise=False)

    def statistics(self, params: Params, own: OwnReference | None) -> Statistics:
        stats = e_step(self.latent, self.family, params, self.data, own, self.pseudo_count, self.beta)
        return stats.reduced() if self.reduce else stats

    def objective(self, stats: Statistics, params: Params, new: Params | None = None) -> torch.Tensor:
        """(R, M): the mean log-likelihood per (weighted) point of the parameters ``params`` that
        ``stats`` were taken with (at ``beta`` < 1 the tempered objective of :func:`e_step`),
        plus their log prior over the points under MAP-EM; or, for a variational model (a latent
        structure with a :meth:`LatentStructure.variational_bound`), its lower bound, which also
        depends on the parameters ``new`` of the M-step from ``stats`` (the latent structure's and
        the family's terms, :meth:`ComponentFamily.variational_bound`, summed)."""
        bound = None if new is None else self.latent.variational_bound(stats, new.latent)
        if bound is None:
            if self.prior is None:
                return stats.log_likelihood / self.data.total_weight
            return (stats.log_likelihood + self.prior.log_prob(params)) / self.data.total_weight
        emission_bound = self.family.variational_bound(cast(Params, new).emission)  # (a bound needs new)
        return bound if emission_bound is None else bound + emission_bound

    def maximise(self, params: Params, stats: Statistics, active: torch.Tensor, own: OwnReference | None,
                 refine: bool = True) -> tuple[Params, torch.Tensor, Statistics]:
        """Re-seeding and the M-step from ``stats`` of ``params`` for the ``active`` models:
        new parameters, invalid components (R, M, K) and the statistics used. ``refine``: invalid
        components get their statistics again about their new means (:func:`refiner`), which
        needs ``stats`` to be those of one pass over the data."""
        def candidates(k: int) -> torch.Tensor:
            return worst_points(self.latent, self.family, params, self.data, k)

        def reseeded(stats: Statistics) -> Statistics:
            if not self.reseed:
                return stats
            return reseed_empty(self.family, stats, candidates, active, self.data.reference, self.components)

        stats = reseeded(stats)
        again = refiner(self.family, own, lambda own: reseeded(self.statistics(params, own))) if refine else None
        new, invalid = m_step(self.latent, self.family, stats, self.data.reference, active, self.fixed, again, self.prior,
                              self.components)
        return new, invalid, stats

    def __call__(self, params: Params, active: torch.Tensor) -> EMStep:
        """E-step of ``params``, then the M-step for the ``active`` (R, M) models whose
        log-likelihood is finite."""
        own = self.own(params)
        stats = self.statistics(params, own)
        finite = torch.isfinite(stats.log_likelihood)
        new, invalid, used = self.maximise(params, stats, active & finite, own, self.own_reference)
        reseeded = None if used is stats else (used.counts != stats.counts).any(-1)
        return EMStep(new, self.objective(stats, params, new), invalid, reseeded)

    def models(self, index: torch.Tensor, n_models: int) -> "EMMap":
        """The map of the models at flat positions ``index`` (A,) of (R, M) only, as (1, A)."""
        selected = type(self).__new__(type(self))
        selected.__dict__.update(self.__dict__)
        selected.data = self.data.select_models(index % n_models)
        selected.latent = self.latent.select_models(index % n_models)
        selected.family = self.family.select_models(index % n_models)
        selected.fixed = None if self.fixed is None else self.fixed.models(index)
        selected.prior = None if self.prior is None else self.prior.models(index % n_models)
        if self.components is not None:  # (1, M, K) shared by the restarts, or (R, M, K)
            shared = self.components.shape[0] == 1
            flat = self.components[0][index % n_models] if shared else self.components.flatten(0, 1)[index]
            selected.components = flat.unsqueeze(0)
        return selected


# --- drivers ------------------------------------------------------------------------------------
@dataclass
class EMResult:
    params: Params  # (R, M, ...)
    lower_bound: torch.Tensor  # (R, M) mean log-likelihood at the last E-step of each model (nan if failed)
    n_iter: torch.Tensor  # (R, M) iterations run by each model (a failed one: those before the one that failed)
    converged: torch.Tensor  # (R, M) bool
    history: torch.Tensor  # (R, M, n_iterations) lower bound per iteration, padded with the last (nan once failed)
    failures: Failures | None = None  # the failed models when isolating, else None

    @property
    def log_weights(self) -> torch.Tensor:
        """A mixture's log mixing weights (R, M, K)."""
        return self.params.latent["log_weights"]

    @property
    def theta(self) -> Theta:
        """The emission family's parameters (R, M, ...)."""
        return self.params.emission


def cat_restarts(results: list[ResultT]) -> ResultT:
    """Results of batches of restarts (R_i, M, ...) joined along the restart axis, in order.
    Works for any result dataclass whose fields are tensors, dicts of tensors or :class:`Params`;
    a per-iteration history (last axis) is padded with its last value to the longest one."""
    if len(results) == 1:
        return results[0]

    def cat(values: list[torch.Tensor], name: str) -> torch.Tensor:
        if name == "history":
            length = max(value.shape[-1] for value in values)
            values = [_pad_with_last(value, length) for value in values]
        return torch.cat(values, 0)

    joined: dict[str, Any] = {}
    for field in dataclasses.fields(results[0]):
        values = [getattr(result, field.name) for result in results]
        if field.name == "failures":
            joined[field.name] = Failures.joined(values)
        elif isinstance(values[0], Params):
            joined[field.name] = Params.cat(values)
        elif isinstance(values[0], dict):
            joined[field.name] = {key: cat([value[key] for value in values], key) for key in values[0]}
        else:
            joined[field.name] = cat(values, field.name)
    return type(results[0])(**joined)


def _pad_with_last(history: torch.Tensor, length: int) -> torch.Tensor:
    """(..., n) -> (..., length), repeating the last entry (a model that stopped keeps its bound)."""
    missing = length - history.shape[-1]
    return history if missing == 0 else torch.cat([history, history[..., -1:].expand(*history.shape[:-1], missing)], -1)


class _WorkingBatch:
    """The models of a fit's batch (R, M) that its loop still computes: all of them, or after a
    compaction the running ones as a batch (1, A) (``index``: their flat positions in R * M).
    Per-model results live in full-size tensors; the loop's own in the working layout."""

    def __init__(self, shape: tuple[int, int]):
        self.shape = shape
        self.index: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1] if self.index is None else int(self.index.numel())

    def to_full(self, values: torch.Tensor, fill: torch.Tensor | float | bool = False) -> torch.Tensor:
        """(working R', M', ...) -> (R, M, ...): the working models' values, ``fill`` (a full
        tensor, or a value) elsewhere."""
        if self.index is None:
            return values
        full = (fill.clone() if isinstance(fill, torch.Tensor)
                else values.new_full((*self.shape, *values.shape[2:]), fill))
        full.view(-1, *values.shape[2:])[self.index] = values[0]
        return full

    def flushed(self, full: dict[str, Any], params: Params, n_iter: torch.Tensor, converged: torch.Tensor,
                lower_bound: torch.Tensor) -> dict[str, Any]:
        """The full-batch results ``full`` with the working batch's current values written in."""
        if self.index is None:
            return {"params": params, "n_iter": n_iter, "converged": converged, "lower_bound": lower_bound}
        return {"params": full["params"].put_models(self.index, params), "n_iter": self.to_full(n_iter, full["n_iter"]),
                "converged": self.to_full(converged, full["converged"]),
                "lower_bound": self.to_full(lower_bound, full["lower_bound"])}


def run_em(
    em_map: EMMap | SquaremMap, params: Params, *, max_iter: int, tol: float, progress=None,
    previous_lower_bound: torch.Tensor | None = None, failures: Failures | None = None,
    stage: str = "EM iteration",
) -> EMResult:
    """EM until every model has converged (|change of the mean log-likelihood| < tol) or
    ``max_iter`` iterations. A converged model keeps its parameters while the others go on; once
    at most COMPACTION_FRACTION of the computed models still run, only those are computed.
    ``previous_lower_bound`` (broadcastable to (R, M)): the lower bound that the first
    iteration's is compared with (default -inf), e.g. that of an earlier fit a warm start
    continues, so that a loop of one-iteration fits converges as one long fit does.

    Semantics follow scikit-learn: in iteration i the E-step gives the lower bound of the current
    parameters, then the M-step updates them; a model converges in the iteration whose lower
    bound changed by less than tol, and keeps that iteration's M-step.

    Without ``failures`` a model whose log-likelihood is not finite or whose M-step gives an
    invalid component raises :class:`ModelFailed`. With a :class:`Failures` record (which may
    hold models that failed at initialisation: they never run) such a model is recorded there
    instead, stops and keeps its last valid parameters, those whose lower bound was last
    computed: the parameters before the failed M-step, or before the update whose log-likelihood
    was not finite. ``stage``: how a failure names the iteration (``f"{stage} {i}"``).
    """
    R, M = params.batch
    like = next(iter(params.emission.values()))
    batch = _WorkingBatch((R, M))
    full_map = em_map
    active = torch.ones(R, M, dtype=torch.bool, device=like.device)
    if failures is not None:
        active &= ~failures.failed
    converged = torch.zeros_like(active)
    n_iter = torch.zeros(R, M, dtype=torch.long, device=like.device)
    previous = torch.full((R, M), -math.inf, dtype=like.dtype, device=like.device)
    if previous_lower_bound is not None:
        previous = previous_lower_bound.to(previous).expand(R, M)
    lower_bound = torch.full_like(previous, math.nan)
    # Per-model results in the full batch: exact for the models the working batch no longer holds.
    full: dict[str, Any] = {"params": params, "n_iter": n_iter, "converged": converged, "lower_bound": lower_bound}
    history = []
    n_active = int(active.sum())
    last_valid = params  # the parameters whose lower bound was last computed
    for iteration in range(1, max_iter + 1):
        if n_active == 0:  # every model failed at initialisation
            break
        step = em_map(params, active)
        current, where = step.objective, f"{stage} {iteration}"
        bad = ~torch.isfinite(current) & active
        if bool(bad.any()):
            record_failures(failures, bad, lambda r, m: Failure(where, None, NOT_FINITE_ADVICE), batch.to_full)
            params = last_valid.where(bad, params)
            active = active & ~bad
            n_active = int(active.sum())
        last_valid = params
        bounded = active  # models whose current parameters got a (finite) lower bound
        if step.any_invalid:  # (only models that ran and were finite are reported)
            invalid = step.invalid & active.unsqueeze(-1)  # (R, M, K)
            failed = invalid.any(-1)
            record_failures(failures, failed, invalid_component_reason(em_map.family, where, invalid, batch.to_full),
                            batch.to_full)
            active = active & ~failed  # those that failed in the M-step keep their current parameters
            n_active = int(active.sum())
        if n_active == batch.size:  # every model still running: take the update as it is
            params, lower_bound = step.params, current
            n_iter = torch.full_like(n_iter, iteration)
        else:
            params = step.params.where(active, params)
            lower_bound = torch.where(bounded, current, lower_bound)
            n_iter = torch.where(active, iteration, n_iter)
        whole = batch.to_full(lower_bound, full["lower_bound"])
        history.append(whole if failures is None else whole.masked_fill(failures.failed, math.nan))
        newly_converged = active & ((current - previous).abs() < tol)
        if step.reseeded is not None:  # a re-seeding step is not an EM step: no convergence in it
            newly_converged &= ~step.reseeded
        converged |= newly_converged
        active &= ~newly_converged
        previous = current
        n_active = int(active.sum())
        if progress is not None:
            progress.update(1)
            progress.set_postfix(lower_bound=f"{whole.mean().item():.6g}", active=n_active)
        if n_active == 0:
            break
        if n_active <= COMPACTION_FRACTION * batch.size:  # from now on compute only the running models
            full = batch.flushed(full, params, n_iter, converged, lower_bound)
            keep = active.flatten().nonzero().squeeze(-1)  # their positions in the working batch
            logger.debug("iteration %d: computing only the %d running model(s) of %d", iteration, n_active, batch.size)
            batch.index = keep if batch.index is None else batch.index[keep]
            em_map = full_map.models(batch.index, M)
            params, last_valid = params.models(keep), last_valid.models(keep)
            active, converged, n_iter, previous, lower_bound = (
                value.flatten()[keep].unsqueeze(0) for value in (active, converged, n_iter, previous, lower_bound))
    full = batch.flushed(full, params, n_iter, converged, lower_bound)
    lower_bound = full["lower_bound"]
    if failures is not None:
        lower_bound = lower_bound.masked_fill(failures.failed, math.nan)
    history_tensor = torch.stack(history, -1) if history else lower_bound.unsqueeze(-1)[..., :0]
    return EMResult(full["params"], lower_bound, full["n_iter"], full["converged"], history_tensor, failures)


@dataclass
class OnlineStep:
    """One stepwise (online) EM update of a working batch (R, M) from one batch of data."""

    params: Params  # the M-step of the running statistics (not to be used for failed models)
    batch_log_likelihood: torch.Tensor  # (R, M) total (weighted) log-likelihood of the batch, before the update
    invalid: torch.Tensor  # (R, M, K) invalid components of the models that were updated
    running: Statistics  # the running statistics per (weighted) point after the update


def online_step(em_map: EMMap, params: Params, running: Statistics | None, rho: float, active: torch.Tensor) -> OnlineStep:
    """Stepwise EM: with the batch's statistics per point ``s_hat``, the running statistics
    become ``s <- (1 - rho) s + rho s_hat`` (:meth:`Statistics.lerp`; ``s_hat`` alone when there
    are none yet) and the parameters their M-step, taken at the scale of one batch (re-seeding
    counts points). Running statistics stay about the data's shared reference point (they are
    averaged across batches): components far from it are evaluated directly but summarised
    about it. Models not ``active`` (R, M), or whose batch log-likelihood is not finite, are
    not updated (their M-step is not checked)."""
    own = em_map.own(params, summarise=False)
    batch = em_map.statistics(params, own)
    total = torch.as_tensor(em_map.data.total_weight, dtype=batch.counts.dtype, device=batch.counts.device)
    per_point = batch.scaled(1 / total)
    mixed = per_point if running is None else running.lerp(per_point, rho)
    updating = active & torch.isfinite(batch.log_likelihood)
    new, invalid, used = em_map.maximise(params, mixed.scaled(total), updating, own=None, refine=False)
    used = used.scaled(1 / total)
    return OnlineStep(new, batch.log_likelihood, invalid, used)


class ConvergenceWarning(UserWarning):
    """EM stopped at max_iter before the lower bound settled."""


class FitFailedWarning(UserWarning):
    """Some models of a batch failed (an invalid component or a log-likelihood that is not
    finite) and kept their last valid parameters, while the others finished (``on_error="isolate"``)."""
