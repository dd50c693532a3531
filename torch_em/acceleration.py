"""SQUAREM: squared iterative extrapolation of the EM map (Varadhan & Roland 2008, scheme S3).

EM converges linearly, slowly where the fraction of missing information is large (overlapping
components). SQUAREM treats the EM map ``F`` as a fixed-point iteration and extrapolates it:
from ``theta_0``, two EM steps ``theta_1 = F(theta_0)``, ``theta_2 = F(theta_1)`` give

    r = theta_1 - theta_0,   v = theta_2 - 2 theta_1 + theta_0,   alpha = -|r| / |v|   (S3)
    theta' = theta_0 - 2 alpha r + alpha^2 v,        then one stabilising EM step F(theta')

with ``-step_max <= alpha <= -1`` (``alpha = -1`` gives ``theta_2`` exactly). Each model's
``step_max`` starts unbounded; when the safeguard rejects an extrapolation it drops just below
the rejected step (by SHRINK_FACTOR, to at least 1), and it grows 4-fold whenever an accepted
step reaches it (the SQUAREM package's ``mstep``), so a model whose long steps fail takes
shorter ones. Extrapolation happens in the
parameters' working form: unconstrained for the families (log rates, logits, Cholesky factors
with a log diagonal), log-probabilities for the latent structure (renormalised after the step),
so every extrapolated point is a valid model. Each model of a batch has its own step length.

Monotone safeguard: where the extrapolated point's log-likelihood is below that of
``theta_0`` (or not finite, or its EM step invalid), the cycle ends at ``theta_2``, the plain
EM result, so the objective never decreases from cycle to cycle. One cycle costs three evaluations of the EM map;
:class:`SquaremMap` is itself an EM map (``params -> EMStep``), so :func:`torch_em.em.run_em`
composes it unchanged (per-model convergence, failure isolation, compaction).
"""
from __future__ import annotations

from typing import cast

import torch

from .em import EMMap, EMStep, Params

#: EM-map evaluations per SQUAREM cycle (n_iter_ counts evaluations).
EVALUATIONS_PER_CYCLE = 3
#: The factor by which a model's largest step length grows (the SQUAREM package's ``mstep``)
#: after an accepted step that reached it, and the one by which it ends below a rejected step
#: (chosen on the benchmark problems: a gentle shrink keeps long steps where they pay off).
STEP_FACTOR = 4.0
SHRINK_FACTOR = 1.2
#: Every model's largest step length at the start (unbounded until an extrapolation is rejected).
INITIAL_STEP_MAX = float("inf")


class SquaremMap:
    """One SQUAREM cycle as an EM map over ``em_map``: ``(params, active) -> EMStep`` whose
    objective is that of ``params`` and whose parameters are the cycle's end point.

    ``step_max``: every model's largest step length, flat over the whole batch (R * M,), shared
    with the maps of compacted batches (``index``: their flat positions), created at the first call."""

    def __init__(self, em_map: EMMap, step_max: torch.Tensor | None = None, index: torch.Tensor | None = None):
        self.em_map, self.step_max, self.index = em_map, step_max, index

    def __getattr__(self, name: str):  # the wrapped map's data, family, latent, ...
        return getattr(self.__dict__["em_map"], name)

    def models(self, index: torch.Tensor, n_models: int) -> "SquaremMap":
        return SquaremMap(self.em_map.models(index, n_models), self.step_max, index)

    def _limits(self, shape: torch.Size, like: torch.Tensor) -> torch.Tensor:
        """The working batch's step_max (R', M')."""
        if self.step_max is None:
            self.step_max = torch.full((shape.numel(),), INITIAL_STEP_MAX, dtype=like.dtype, device=like.device)
        values = self.step_max if self.index is None else self.step_max[self.index]
        return values.view(shape)

    def _store(self, values: torch.Tensor) -> None:
        step_max = cast(torch.Tensor, self.step_max)  # created by _limits, earlier in the cycle
        if self.index is None:
            step_max.copy_(values.flatten())
        else:
            step_max[self.index] = values.flatten()

    def __call__(self, params: Params, active: torch.Tensor) -> EMStep:
        first = self.em_map(params, active)  # theta_1 and the objective of theta_0
        running = active & ~first.invalid.any(-1) & torch.isfinite(first.objective)
        second = self.em_map(first.params, running)  # theta_2 and the objective of theta_1
        running &= ~second.invalid.any(-1) & torch.isfinite(second.objective)
        step_max = self._limits(first.objective.shape, first.objective)
        extrapolated, length = extrapolate(params, first.params, second.params, step_max)
        third = self.em_map(extrapolated, running)  # F(theta') and the objective of theta'
        better = running & ~third.invalid.any(-1) & torch.isfinite(third.objective) & (third.objective >= first.objective - _rounding(first.objective))
        end = third.params.where(better, second.params)
        grown = torch.where(better & (length >= step_max), step_max * STEP_FACTOR, step_max)
        shrunk = (torch.minimum(length, step_max) / SHRINK_FACTOR).clamp_min(1.0)  # below the rejected step
        self._store(torch.where(running & ~better, shrunk, grown))
        # Models whose first step failed keep its record; a failed second step ends the cycle at theta_1.
        failed_second = active & ~first.invalid.any(-1) & torch.isfinite(first.objective) & ~running
        end = first.params.where(failed_second, end)
        reseeded = [step.reseeded for step in (first, second, third) if step.reseeded is not None]
        return EMStep(end, first.objective, first.invalid, torch.stack(reseeded).any(0) if reseeded else None)


def extrapolate(start: Params, one: Params, two: Params, step_max: torch.Tensor | float = float("inf"),
                ) -> tuple[Params, torch.Tensor]:
    """``theta' = theta_0 - 2 alpha r + alpha^2 v`` with the S3 step ``alpha = -|r| / |v|``
    within ``[-step_max, -1]`` per model (R, M); latent log-probabilities renormalised. Returns
    theta' and the unbounded step length ``|r| / |v|`` (R, M)."""
    r = one.combine(start, torch.sub)
    v = two.combine(one, torch.sub).combine(r, torch.sub)
    r_norm, v_norm = _norm(r), _norm(v)
    length = torch.where(v_norm > 0, r_norm / v_norm.clamp_min(torch.finfo(v_norm.dtype).tiny), 1.0)
    alpha = -torch.minimum(length, torch.as_tensor(step_max, dtype=length.dtype)).clamp_min(1.0)

    def step(theta0: torch.Tensor, r_value: torch.Tensor, v_value: torch.Tensor) -> torch.Tensor:
        a = alpha.reshape(*alpha.shape, *([1] * (theta0.dim() - 2)))
        return theta0 - 2 * a * r_value + a.square() * v_value

    latent = {}
    for name, value in start.latent.items():
        moved = step(value, r.latent[name], v.latent[name])
        # A structural zero (log-probability -inf) stays one; the rest is renormalised.
        moved = torch.where(torch.isneginf(value), value, moved.nan_to_num(nan=0.0))
        latent[name] = moved.log_softmax(-1)
    emission = {name: step(value, r.emission[name], v.emission[name]) for name, value in start.emission.items()}
    return Params(latent, emission), length


def _norm(params: Params) -> torch.Tensor:
    """Euclidean norm per model (R, M) over every finite entry of every parameter."""
    total = None
    for value in (*params.latent.values(), *params.emission.values()):
        part = value.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).square().flatten(2).sum(-1)
        total = part if total is None else total + part
    return cast(torch.Tensor, total).sqrt()  # params hold at least one tensor


def _rounding(objective: torch.Tensor) -> torch.Tensor:
    """The rounding noise of a mean log-likelihood (R, M): a few eps relative. Near the optimum an
    extrapolated point that is as good as theta_0 up to rounding is not a rejected step."""
    return 8 * torch.finfo(objective.dtype).eps * objective.abs()
