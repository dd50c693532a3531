"""Gaussian components of rows with missing coordinates: exact marginals and expected statistics.

For a row with observed coordinates o and missing coordinates m, component k (mean mu, covariance
Sigma) gives (Ghahramani & Jordan 1994)

    log p(x_o | k) = log N(x_o | mu_o, Sigma_oo)
    E[x_m | x_o, k] = mu_m + Sigma_mo Sigma_oo^-1 (x_o - mu_o)
    Cov[x_m | x_o, k] = Sigma_mm - Sigma_mo Sigma_oo^-1 Sigma_om        (the conditional covariance C)

Full and tied covariances: per (pattern, component, model), the padded matrix ``O Sigma O + (I - O)``
(``O`` the diagonal 0/1 matrix of the observed coordinates: the identity in the missing block) is
factorised once (in the model's precision; all in float64 where one fails to below it); its
inverse restricted to the observed block is ``Lambda_o`` (zero elsewhere), and
``Sigma Lambda_o`` is the identity on the observed coordinates and the regression
``Sigma_mo Sigma_oo^-1`` below them. With the masked offset ``d = O (x - mu)`` of a row, one
batched product per block of rows with the pattern gives ``w = Lambda_o d`` (the Mahalanobis
form is ``d . w``), and one product per component ``Sigma w`` the completed offset
``e = E[x | x_o, k] - mu`` on the missing coordinates (the observed ones keep ``d``). Diagonal and spherical covariances need no factorisation: a missing
coordinate drops out of the density and its expected offset is 0, its conditional variance the
component's.

Statistics about a point ``a`` (the shared reference, or a component's own) follow from sums of
the offsets about the component's mean, ``x_hat - a = e + (mu - a)``:

    S1 = sum_n r e + n_k (mu - a)
    S2 = sum_n r e e^T + sum_patterns r_p C_p + (mu - a) S_e^T + S_e (mu - a)^T + n_k (mu - a)(mu - a)^T

with the offsets evaluated directly about the means (no expansion that could cancel).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Mapping, cast

import torch

from ..missing import MissingRows
from .base import Marginal

if TYPE_CHECKING:
    from .gaussian import Gaussian


def pattern_conditionals(covariance: torch.Tensor, patterns: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """What every row with a pattern needs of a component, one factorisation per (pattern,
    component, model): ``1/2 log |Sigma_oo^-1|``, ``Lambda_o`` (``Sigma_oo^-1`` on the observed
    block, zero elsewhere), the completion ``A = O + (I - O) Sigma Lambda_o`` (the identity on the
    observed coordinates, the regression on the missing ones: ``e = A d``) and the conditional
    covariance C (zero outside the missing block).

    Shape:
        covariance: (R, M, K', D, D) (K' = 1 when tied); patterns: (P, D) bool
        -> (R, M, K', P), then (R, M, K', P, D, D) each
    """
    sigma = covariance  # (R, M, K', D, D)
    cov = sigma.unsqueeze(-3)  # (R, M, K', 1, D, D)
    observed = patterns.to(sigma.dtype)  # (P, D)
    missing = 1 - observed
    both_observed = observed.unsqueeze(-1) * observed.unsqueeze(-2)  # (P, D, D)
    padded = cov * both_observed
    padded.diagonal(dim1=-2, dim2=-1).add_(missing)  # the identity in the missing block
    lower, info = torch.linalg.cholesky_ex(padded)
    if sigma.dtype != torch.float64 and bool((info > 0).any()):
        # A block that fails to factorise in a lower precision (a sub-block of a valid covariance can
        # round to indefinite): all of them in float64, rounded back, as a component's own
        # covariance is factorised then.
        half_logdet, precision, completion, conditional = (
            value.to(sigma.dtype) for value in pattern_conditionals(sigma.double(), patterns))
        return half_logdet, precision, completion, conditional
    eye = torch.eye(lower.shape[-1], dtype=sigma.dtype, device=lower.device)
    inverse = torch.linalg.solve_triangular(lower, eye.expand_as(lower), upper=False)  # L^-1
    # L^-1 is exactly the identity on the missing block and 0 between the blocks, so is
    # L^-T L^-1 but for the identity in the missing block, which is taken off.
    precision = inverse.mT @ inverse
    precision.diagonal(dim1=-2, dim2=-1).sub_(missing)  # Lambda_o, (R, M, K', P, D, D)
    half_logdet = -lower.diagonal(dim1=-2, dim2=-1).contiguous().log_().sum(-1)
    # Sigma Lambda_o is the identity on the observed block and the regression Sigma_mo Sigma_oo^-1
    # below it; as Lambda_o Sigma (its transpose) every product has Sigma on the right.
    completion = _times_component(precision, sigma).mT.contiguous().mul_(missing.unsqueeze(-1))
    completion.diagonal(dim1=-2, dim2=-1).add_(observed)  # e = A d
    # On the missing block Sigma - A Sigma = Sigma_mm - Sigma_mo Sigma_oo^-1 Sigma_om (symmetric up to
    # rounding: its users read one triangle, the Cholesky factor of a draw and the packed statistics).
    conditional = _times_component(completion, sigma).neg_().add_(cov)
    conditional.mul_(missing.unsqueeze(-1) * missing.unsqueeze(-2))
    return half_logdet, precision, completion, conditional


def _times_component(per_pattern: torch.Tensor, component: torch.Tensor) -> torch.Tensor:
    """``X_p S`` for every pattern's matrix ``X_p`` (R, M, K', P, D, D) and the component's ``S``
    (R, M, K', D, D): one (P D) x D by D x D product per component, not P small ones."""
    stacked = per_pattern.flatten(-3, -2)  # (R, M, K', P * D, D)
    return (stacked @ component).view_as(per_pattern)


def statistics_about(family: "Gaussian", first: torch.Tensor, second: torch.Tensor, counts: torch.Tensor,
                     shift: torch.Tensor) -> torch.Tensor:
    """The family's statistics (R, M, K, F) about a point a, from the sums of the offsets about
    the means ``first`` (R, M, K, D) and their second moments ``second`` (full and tied: (R, M, K,
    D, D); else the diagonal (R, M, K, D)), counts (R, M, K) and ``shift = mu - a``."""
    n = counts.unsqueeze(-1)
    linear = first + n * shift
    if family.covariance_type in ("full", "tied"):
        cross = shift.unsqueeze(-1) * first.unsqueeze(-2)
        moment = second + cross + cross.mT + n.unsqueeze(-1) * shift.unsqueeze(-1) * shift.unsqueeze(-2)
        rows, cols = torch.triu_indices(shift.shape[-1], shift.shape[-1], device=shift.device)
        return torch.cat([linear, moment[..., rows, cols]], -1)
    moment = second + 2 * shift * first + n * shift.square()
    if family.covariance_type == "spherical":
        moment = moment.sum(-1, keepdim=True)
    return torch.cat([linear, moment], -1)


def gathered_per_pattern(values: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """Per-pattern values (R, M, K', P, ...) -> those of the patterns ``pattern`` (L,) (shared
    rows) or (M, L) (each model's own): (R, M, K', L, ...)."""
    if pattern.dim() == 1:
        return values.index_select(3, pattern)
    models = torch.arange(values.shape[1], device=values.device).unsqueeze(-1)
    return values.transpose(2, 3)[:, models, pattern].transpose(2, 3)


def _per_block(values: torch.Tensor, rows: MissingRows) -> torch.Tensor:
    """Per-pattern values (R, M, K', P, ...) -> per block (R, M, K', nb, ...) (each block's pattern)."""
    return gathered_per_pattern(values, rows.block_pattern[0] if rows.X.dim() == 2 else rows.block_pattern)


class GaussianMarginal(Marginal):
    """Marginal densities and conditional moments of Gaussian components for rows with missing
    entries; see the module's docstring for the formulas.

    Shape:
        log_prob: (R, M, K, n); full and tied covariances: masked offsets in the block layout
        (R, M, K, nb, b, D); diagonal and spherical: offsets per row (R, M, K, n, D)
    """

    def __init__(self, family: "Gaussian", rows: MissingRows, theta: Mapping[str, torch.Tensor],
                 reference: torch.Tensor | None = None):
        # With a reference point, full and tied covariances are expanded about it (the fast path
        # of a fit); without one every path evaluates the offsets directly about the means.
        self.family, self.rows, self.loc = family, rows, theta["loc"]  # loc (R, M, K, D)
        self.full = family.covariance_type in ("full", "tied")
        self.reference = reference if self.full else None
        covariance = family.covariance(theta)
        if self.full:
            if family.covariance_type == "tied":
                covariance = covariance.unsqueeze(-3)  # (R, M, 1, D, D)
            self.half_logdet, self.precision, self.completion, self.conditional = pattern_conditionals(
                covariance, rows.patterns)
            if self.reference is not None:
                self.log_prob = self._expanded_log_prob()
            else:
                self.log_prob, self.masked = self._blocked_offsets()
        else:
            if family.covariance_type == "spherical":
                covariance = covariance.unsqueeze(-1).expand_as(self.loc)
            self.variance = covariance  # (R, M, K, D)
            self.log_prob, self.offsets = self._row_offsets()

    def _blocked_offsets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Full and tied covariances: log-densities (R, M, K, n) and the masked offsets
        d = O (x - mu) (R, M, K, nb, b, D), with one batched product ``w = Lambda_o d`` per block."""
        rows, loc = self.rows, self.loc
        observed = rows.block_observed.to(loc.dtype)  # (M', nb, 1, D)
        # The block points are 0 at their missing coordinates.
        masked = rows.block_points.unsqueeze(-4) - loc[..., None, None, :] * observed.unsqueeze(-4)  # (R, M, K, nb, b, D)
        whitened = masked @ _per_block(self.precision, rows)  # (R, M, K, nb, b, D)
        half_logdet = _per_block(self.half_logdet, rows)  # (R, M, K', nb)
        log_2pi = (0.5 * math.log(2 * math.pi)) * observed.sum((-2, -1))  # (M', nb)
        log_prob = half_logdet.unsqueeze(-1) - 0.5 * (masked * whitened).sum(-1) - log_2pi[:, None, :, None]
        return rows.unblocked(log_prob.flatten(-2)), masked

    def _centred_means(self) -> torch.Tensor:
        """The means about the reference point, mu~ = mu - s: (R, M, K, D)."""
        return self.loc - cast(torch.Tensor, self.reference)  # called on the expanded paths only, which have one

    def _expanded_log_prob(self) -> torch.Tensor:
        """Full and tied covariances expanded about the reference point s as the complete rows'
        GEMM is: ``log N(x_o | mu_o, Sigma_oo) = T(x~) . eta_p + c_p`` with the ordinary features
        T of ``x~ = O (x - s)`` and the natural parameters of the pattern's marginal (built from
        ``Lambda_o``), one small product per block (the features' trailing 1 takes ``c_p``):
        (R, M, K, n)."""
        from .gaussian import _packed_positions, _packed_weights  # (that module imports this one)

        rows, dtype = self.rows, self.loc.dtype
        D = self.loc.shape[-1]
        centred = self._centred_means().unsqueeze(-2)  # (R, M, K, 1, D)
        precision = self.precision  # (R, M, K', P, D, D)
        linear = (precision @ centred.unsqueeze(-1)).squeeze(-1)  # (R, M, K, P, D)
        packed = precision.flatten(-2).index_select(-1, _packed_positions(D, precision.device))
        quadratic = (packed * _packed_weights(D, precision.device, dtype)).expand(*linear.shape[:-1], -1)
        observed = rows.patterns.to(dtype).sum(-1)  # (P,)
        const = self.half_logdet - 0.5 * (linear * centred).sum(-1) - (0.5 * math.log(2 * math.pi)) * observed
        eta = torch.cat([linear, quadratic, const.unsqueeze(-1)], -1)  # (R, M, K, P, F + 1)
        features = rows.centred_features(self.family, self.reference)  # (M', nb, b, F + 1)
        log_prob = features @ _per_block(eta, rows).permute(0, 1, 3, 4, 2)  # (R, M, nb, b, K)
        return rows.unblocked(log_prob.permute(0, 1, 4, 2, 3).flatten(-2))

    def _expanded_moments(self, resp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``sum_n r x^_~`` (R, M, K, D) and ``sum_n r (x^_~ x^_~^T + C)`` (R, M, K, D, D) about the
        reference, from the responsibilities' sums of the features per pattern: for a pattern
        ``x^_~ = A x~ + h`` with ``h = (I - A) mu~``, so its sums are ``A S1 + n h`` and
        ``A S2 A^T + A S1 h^T + h S1^T A^T + n (h h^T + C)``; the terms linear in the pattern's
        values are summed over the patterns as one product each."""
        from .gaussian import _symmetric_positions  # (that module imports this one)

        rows = self.rows
        D = self.loc.shape[-1]
        weights = rows.blocked(resp).unflatten(-1, (rows.n_blocks, rows.block_size))  # (R, M, K, nb, b)
        features = rows.centred_features(self.family, self.reference)  # (M', nb, b, F + 1)
        sums = self._per_pattern((weights.transpose(2, 3) @ features).transpose(2, 3))  # (R, M, K, P, F + 1)
        first, counts = sums[..., :D], sums[..., -1]  # (R, M, K, P, D), (R, M, K, P)
        second = sums[..., D:-1].index_select(-1, _symmetric_positions(D, sums.device)).unflatten(-1, (D, D))
        completion = self.completion  # (R, M, K', P, D, D)
        eye = torch.eye(D, dtype=completion.dtype, device=completion.device)
        h = ((eye - completion) @ self._centred_means().unsqueeze(-2).unsqueeze(-1)).squeeze(-1)  # (R, M, K, P, D)
        mapped = (completion @ first.unsqueeze(-1)).squeeze(-1)  # A S1
        cross = mapped.mT @ h  # sum_p A S1 h^T, (R, M, K, D, D)
        spread = (h * counts.unsqueeze(-1)).mT @ h + (counts.unsqueeze(-2) @ self.conditional.flatten(-2)).view_as(cross)
        moment = (completion @ second @ completion.mT).sum(3) + cross + cross.mT + spread
        return mapped.sum(3) + (counts.unsqueeze(-2) @ h).squeeze(-2), moment

    def _completed_offsets(self) -> torch.Tensor:
        """Full and tied covariances: e = A d (R, M, K, n, D) per row."""
        completion = _per_block(self.completion, self.rows)  # (R, M, K', nb, D, D)
        offsets = (self.masked @ completion.mT).flatten(3, 4)  # (R, M, K, nb * b, D)
        rows = self.rows
        return offsets.gather(-2, rows.position[None, :, None, :, None].expand(
            *offsets.shape[:3], rows.position.shape[-1], offsets.shape[-1]))

    def _row_offsets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Diagonal and spherical covariances: log-densities (R, M, K, n) and offsets
        e = O (x - mu) (R, M, K, n, D) (a missing coordinate's expected offset is 0)."""
        rows = self.rows
        observed = rows.observed.to(self.loc.dtype)
        offsets = (rows.X.unsqueeze(-3) - self.loc.unsqueeze(-2)) * observed.unsqueeze(-3)
        per_coordinate = -0.5 * (self.variance.log() + math.log(2 * math.pi))  # (R, M, K, D)
        quadratic = (offsets.square() / self.variance.unsqueeze(-2)).sum(-1)
        return per_coordinate @ observed.mT - 0.5 * quadratic, offsets

    # --- what EM and imputation need --------------------------------------------------------
    def statistics(self, resp: torch.Tensor, about: torch.Tensor | None) -> torch.Tensor:
        rows = self.rows
        if self.reference is not None:  # expanded about the reference: the statistics are about it
            first, second = self._expanded_moments(resp)
            return statistics_about(self.family, first, second, resp.sum(-1), torch.zeros_like(self.loc))
        if self.full:
            first, second = self._pattern_moments(rows.blocked(resp))
        else:
            first = (resp.unsqueeze(-2) @ self.offsets).squeeze(-2)  # sum_n r e, (R, M, K, D)
            second = (resp.unsqueeze(-2) @ self.offsets.square()).squeeze(-2)
            second = second + self.variance * (resp @ (1 - rows.observed.to(resp.dtype)))
        counts = resp.sum(-1)
        shift = self.loc if about is None else self.loc - about  # (R, M, K, D)
        return statistics_about(self.family, first, second, counts, shift)

    def _pattern_moments(self, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``sum_n r e`` (R, M, K, D) and ``sum_n r (e e^T + C)`` (R, M, K, D, D) from the
        responsibilities (R, M, K, nb * b) in the block layout: the sums of d and d d^T per
        pattern, then per pattern ``A s``, ``A S A^T`` (rows of a pattern share A), so no
        completed offset is formed."""
        rows, masked = self.rows, self.masked
        weights = weights.unflatten(-1, (rows.n_blocks, rows.block_size))  # (R, M, K, nb, b)
        weighted = masked * weights.unsqueeze(-1)
        first = self._per_pattern(weighted.sum(-2))  # (R, M, K, P, D)
        second = self._per_pattern(weighted.mT @ masked)  # (R, M, K, P, D, D)
        counts = self._per_pattern(weights.sum(-1))  # (R, M, K, P)
        completion = self.completion  # (R, M, K', P, D, D)
        first = (completion @ first.unsqueeze(-1)).squeeze(-1).sum(3)
        second = (completion @ second @ completion.mT).sum(3)
        conditional = self.conditional  # (R, M, K', P, D, D)
        return first, second + (counts[..., None, None] * conditional).sum(3)

    def _per_pattern(self, values: torch.Tensor) -> torch.Tensor:
        """Per-block values (R, M, K, nb, ...) summed per pattern: (R, M, K, P, ...)."""
        rows = self.rows
        n_patterns = rows.patterns.shape[0]
        if rows.X.dim() == 2:  # one layout for every model (index_add_ is much faster than scatter_add_)
            return values.new_zeros(*values.shape[:3], n_patterns, *values.shape[4:]).index_add_(
                3, rows.block_pattern[0], values)
        flat = values.flatten(4) if values.dim() > 4 else values.unsqueeze(-1)  # (R, M, K, nb, E)
        total = flat.new_zeros(*flat.shape[:3], n_patterns, flat.shape[-1])
        total.scatter_add_(3, rows.block_pattern[None, :, None, :, None].expand_as(flat), flat)
        return total.view(*total.shape[:4], *values.shape[4:])

    def conditional_means(self) -> torch.Tensor:
        """``E[x_n | x_o, component k]`` (R, M, K, n, D), the observed coordinates as they are."""
        rows = self.rows
        offsets = self._completed_offsets() if self.full else self.offsets
        return torch.where(rows.observed.unsqueeze(-3), rows.X.unsqueeze(-3), self.loc.unsqueeze(-2) + offsets)

    def draw(self, components: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        rows = self.rows
        means = self.conditional_means()[0]  # (M, K, n, D)
        M, _, n, D = means.shape
        index = components[0][:, None, :, None].expand(M, 1, n, D)
        mean = means.gather(1, index).squeeze(1)  # (M, n, D)
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        missing = ~rows.observed.expand(M, n, D)
        if self.full:
            identity = torch.diag_embed(rows.patterns.to(mean.dtype))  # (P, D, D)
            factor = torch.linalg.cholesky_ex(self.conditional[0] + identity)[0]  # (M, K', P, D, D)
            pattern = rows.row_pattern.expand(M, n)
            component = components[0] if factor.shape[1] > 1 else torch.zeros_like(components[0])
            models = torch.arange(M, device=mean.device).unsqueeze(-1)
            offset = (factor[models, component, pattern] @ noise.unsqueeze(-1)).squeeze(-1)
        else:
            scale = self.variance[0].sqrt().gather(1, components[0].unsqueeze(-1).expand(M, n, D))
            offset = scale * noise
        return torch.where(missing, mean + offset, mean)
