"""Deterministic annealing EM (Ueda & Nakano 1998) for mixtures: a way out of poor local optima.

EM climbs to the stationary point of the likelihood nearest its start; restarts (``n_init``)
draw several starts. Deterministic annealing instead deforms the objective. At inverse
temperature ``beta`` in (0, 1] the E-step takes tempered posteriors

    r_nk = (w_k p(x_n | theta_k)) ** beta / sum_j (w_j p(x_n | theta_j)) ** beta

(:func:`torch_em.em.e_step` with ``beta``; the mixture's latent structure,
:mod:`torch_em.latent.independent`), and the M-step is the usual one given them. That is EM for
the tempered objective (a negative free energy, per point: the engine's objective at ``beta``)

    F_beta(theta) = (1 / beta) sum_n w_n log sum_k (w_k p(x_n | theta_k)) ** beta
                  = max_q  sum_n w_n sum_k q_nk log(w_k p(x_n | theta_k)) + (1 / beta) H(q_n)

whose E-step is the maximising q (the tempered posterior) and whose M-step maximises the first
term, so F_beta never decreases under the tempered EM map at a fixed beta. At small beta the
entropy dominates: F_beta is smooth, with the components drawn together, and it has few maxima;
as beta grows the maximum splits into more distinct components, and at beta = 1, F_1 is the
log-likelihood. Following the maximum from a high temperature down tends to end in a better
optimum than EM from the same start.

The schedule is geometric: ``beta_0`` is the model's ``annealing`` option and ``beta <- min(1,
beta * BETA_FACTOR)``. At every beta < 1, EM runs until its objective F_beta (per point)
changes by less than the model's ``tol`` or ``STAGE_ITER`` iterations have passed, whichever
comes first, for each model on its own (:func:`torch_em.em.run_em`: per-model convergence,
isolation of failures, compaction). A stage only has to follow the maximum as beta moves (the
next stage starts from where it ends), so it need not converge; and near a critical
temperature, where a maximum splits, EM's rate tends to 1, so an uncapped stage would spend its
longest runs exactly where the schedule moves on anyway. The convergence test lets easy stages
end early; the cap bounds the cost of annealing at ``STAGE_ITER`` iterations per stage. Then
ordinary EM runs at beta = 1, with ``tol`` and ``max_iter`` as without annealing, so a fit ends
at a stationary point of the likelihood and ``converged_`` means what it means for plain EM.

:func:`anneal` is the driver: one :func:`~torch_em.em.run_em` per stage, each warm-started from
the last, with any EM map (SQUAREM's :class:`~torch_em.acceleration.SquaremMap` too: its
safeguard compares objectives at one beta). Every model of a batch and every restart follows
the same schedule. ``n_iter_`` counts every iteration (every EM-map evaluation), the annealing
stages' included, so it may exceed ``max_iter`` by at most ``STAGE_ITER`` per stage (with SQUAREM
rounded up to whole cycles of three evaluations);
``lower_bound_history_`` holds the stages' objectives F_beta, then the log-likelihood.

Where it helps, and where not. With components whose spread is fitted too (Gaussians with
free covariances), the state in which every component is the same (the data's mean and
covariance, equal weights) is a fixed point of the tempered map at every beta, and for beta < 1
it attracts: to first order, the offsets of the component means from their average shrink by the
factor beta per iteration (``mu_k' - m = beta (mu_k - mean_j mu_j)`` near it). Components are
kept apart only by the data's own cluster structure, so a small ``beta_0`` can merge all of them
into one; they are then (nearly) identical, EM at beta = 1 cannot separate them again, and the
fit ends at the one-component solution. Choose ``beta_0`` for the data (compare ``lower_bound_``
with a plain fit's). In a small-scale run of ``benchmarks/annealing.py``: on the 10 principal
components of scikit-learn's digits, K = 10, ``beta_0 = 0.3`` reached better optima than plain
EM from the same starts and than restarts at equal time; on ten overlapping unit-covariance
Gaussians in the plane it merged everything, ``beta_0 = 0.5`` ended slightly below plain EM,
and restarts won at equal time; annealing with SQUAREM lost the gain on digits (not
investigated further). No safeguard undoes a merge: the algorithm is Ueda and Nakano's, as
published.
"""
from __future__ import annotations

from typing import Callable, cast

import torch

from .em import EMResult, Params

#: The inverse temperature grows by this factor from stage to stage.
BETA_FACTOR = 1.5
#: EM iterations (EM-map evaluations) at most per annealing stage (beta < 1).
STAGE_ITER = 10


def schedule(beta0: float, factor: float | None = None) -> list[float]:
    """The inverse temperatures of the annealing stages, all below 1: ``beta0, beta0 * factor,
    ...`` (the final stage, at 1, is not listed). ``beta0`` in (0, 1), ``factor`` > 1 (default
    :data:`BETA_FACTOR`)."""
    factor = BETA_FACTOR if factor is None else factor
    betas = []
    beta = float(beta0)
    while beta < 1.0:
        betas.append(beta)
        beta *= factor
    return betas


def anneal(
    run: Callable[[float, Params, int, str], EMResult], params: Params, beta0: float, max_iter: int, *,
    stage_iter: int | None = None, factor: float | None = None,
) -> EMResult:
    """Deterministic annealing EM from ``params`` (R, M, ...): ``run(beta, params, max_iter,
    stage)`` (EM with the map at inverse temperature ``beta`` from ``params`` for at most
    ``max_iter`` iterations, failures named ``f"{stage} {i}"``: :func:`torch_em.em.run_em`) once
    per stage of :func:`schedule` with at most ``stage_iter`` iterations (default
    :data:`STAGE_ITER`), then at beta = 1 with at most ``max_iter``.

    Returns the last stage's result with ``n_iter`` (R, M) summed over the stages and ``history``
    (R, M, n) their histories joined (each stage's objective). ``run`` shares one failure record
    over the stages, so a model that failed in one stage stays failed and runs no more.
    """
    stage_iter = STAGE_ITER if stage_iter is None else stage_iter
    results = []
    for beta in schedule(beta0, factor):
        result = run(beta, params, stage_iter, f"annealing stage beta={beta:.4g}, EM iteration")
        results.append(result)
        params = result.params
    results.append(run(1.0, params, max_iter, "EM iteration"))
    return joined(results)


def joined(results: list[EMResult]) -> EMResult:
    """The results of successive stages of one fit as one: the last one's parameters, lower bound,
    convergence and failures; iterations (R, M) summed; histories (R, M, n_i) joined along the
    last axis (each stage's run masks a failed model's entries from its failure on)."""
    final = results[-1]
    n_iter = cast(torch.Tensor, sum(result.n_iter for result in results))  # (results is non-empty)
    history = torch.cat([result.history for result in results], -1)
    return EMResult(final.params, final.lower_bound, n_iter, final.converged, history, final.failures)
