"""Full and tied Gaussian components on rows with many distinct missingness patterns, through
the precision matrix: one small factorisation per (pattern, component) of the missing block only.

Where almost every row has its own pattern (many coordinates, entries missing at random), the
pattern path (:class:`torch_em.families.gaussian_missing.GaussianMarginal`) factorises a D x D
matrix and forms several D x D products per (pattern, component): O(D^3) per row, hundreds of
times a complete-data E-step. With the precision ``Lambda = Sigma^-1`` of a component and a row
whose missing coordinates are m (q of them), the Schur complement gives everything from the
q x q block ``Lambda_mm`` alone:

    Cov[x_m | x_o] = Lambda_mm^-1 =: C,                 log |Sigma_oo| = log |Sigma| + log |Lambda_mm|
    E[x_m | x_o] - mu_m = -C u,                          u = (Lambda d)_m
    (x_o - mu_o)^T Sigma_oo^-1 (x_o - mu_o) = d^T Lambda d - u^T C u

with the masked offset ``d = O (x - mu)`` (0 at the missing coordinates). Per row that is one
product ``d Lambda`` (a GEMM over all rows of a component, as for complete rows) and a q x q
product; per (pattern, component) a q x q Cholesky factor and its inverse. The statistics are
sums of the completed offsets ``e`` (``d`` with ``-C u`` at the missing coordinates): ``sum r e``,
``sum r e e^T`` (one GEMM per component) and ``sum_p r_p C_p`` placed on each pattern's missing
block. Rows are evaluated directly about the means in float64 (the subtraction above is exact
mathematics but may cancel where the missing coordinates are strongly correlated with the
observed ones).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Mapping

import torch

from ..missing import MissingRows
from .base import Marginal
from .gaussian_missing import gathered_per_pattern, statistics_about

if TYPE_CHECKING:
    from .gaussian import Gaussian


#: Rows with missing entries take the precision path when their patterns have on average fewer
#: rows each than this many times D (the pattern path's O(D^3) per pattern then dominates).
ROWS_PER_PATTERN_PER_FEATURE = 1.0


def takes_precision_path(family: "Gaussian", rows: MissingRows) -> bool:
    """Whether the components of ``family`` evaluate ``rows`` through their precision matrices
    (full and tied covariances on rows with many distinct patterns)."""
    if family.covariance_type not in ("full", "tied"):
        return False
    n_rows = rows.row_pattern.numel()
    return n_rows < ROWS_PER_PATTERN_PER_FEATURE * rows.X.shape[-1] * rows.patterns.shape[0]


def missing_indices(patterns: torch.Tensor) -> torch.Tensor:
    """Each pattern's missing coordinates (P, q), q the most any pattern has (at least 1), in
    increasing order and padded with D (a coordinate past the last one)."""
    P, D = patterns.shape
    missing = ~patterns
    q = max(1, int(missing.sum(-1).max()))
    # Missing coordinates first (stable: in increasing order), then the observed ones.
    order = torch.sort((~missing).to(torch.uint8), dim=-1, stable=True).indices[:, :q]
    taken = torch.arange(q, device=patterns.device) < missing.sum(-1, keepdim=True)
    return torch.where(taken, order, D)


#: Patterns are factorised in groups of similar numbers of missing coordinates, each group at
#: its own width: widths grow by about this factor (a group's matrices are at most this much
#: wider than they need, instead of as wide as the chunk's widest pattern).
WIDTH_GROWTH = 1.5


def _inverse_by_width(block: torch.Tensor, n_missing: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse and log-determinant of SPD matrices (..., P, q, q) that are the identity past
    their leading ``n_missing`` (P,) rows and columns: each group of patterns whose counts share
    a width is factorised at that width only (Cholesky cost grows as the width cubed).

    Shape: -> (..., P, q, q) (the identity past each leading block), (..., P)
    """
    q = block.shape[-1]
    inverse = block.clone()  # the identity past the leading blocks, which are overwritten
    log_det = block.new_zeros(block.shape[:-2])
    low = 0
    while low < q:
        width = min(q, max(low + 1, math.ceil(WIDTH_GROWTH * low)))
        # (the first group also holds patterns with nothing missing: their block is the identity)
        chosen = (((n_missing > low) | (low == 0)) & (n_missing <= width)).nonzero().squeeze(-1)
        if chosen.numel():
            part = block[..., :width, :width].index_select(-3, chosen)
            lower, _ = torch.linalg.cholesky_ex(part)
            inverse[..., chosen, :width, :width] = torch.cholesky_inverse(lower)
            log_det[..., chosen] = 2 * lower.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        low = width
    return inverse, log_det


class PrecisionGaussianMarginal(Marginal):
    """Marginal densities and conditional moments of full or tied Gaussian components through
    their precision matrices; see the module's docstring for the formulas.

    Shape:
        log_prob: (R, M, K, n); offsets (completed, about the means): (R, M, K, n, D)
    """

    def __init__(self, family: "Gaussian", rows: MissingRows, theta: Mapping[str, torch.Tensor],
                 reference: torch.Tensor | None = None):
        self.family, self.rows, self.loc, self.reference = family, rows, theta["loc"], reference
        dtype = self.loc.dtype
        work = torch.promote_types(dtype, torch.float64)
        chol = family.precision_cholesky(theta).to(work)  # (R, M, K', D, D), K' = 1 when tied
        if family.covariance_type == "tied":
            chol = chol.unsqueeze(-3)
        D = chol.shape[-1]
        precision = chol @ chol.mT  # Lambda
        self.index = missing_indices(rows.patterns)  # (P, q)
        padded = torch.zeros(*precision.shape[:-2], D + 1, D + 1, dtype=work, device=precision.device)
        padded[..., :D, :D] = precision
        self.flat_index = (self.index.unsqueeze(-1) * (D + 1) + self.index.unsqueeze(-2)).flatten()  # (P * q * q,)
        P, q = self.index.shape
        flat = padded.flatten(-2)
        block = flat.gather(-1, self.flat_index.expand(*flat.shape[:-1], -1)).unflatten(-1, (P, q, q))  # Lambda_mm, (R, M, K', P, q, q)
        block.diagonal(dim1=-2, dim2=-1).add_((self.index == D).to(work))  # the identity at padding
        self.conditional, log_det_block = _inverse_by_width(block, (self.index < D).sum(-1))  # C = Lambda_mm^-1
        # 1/2 log |Sigma_oo^-1| = 1/2 log |Lambda| - 1/2 log |Lambda_mm|
        half_logdet = chol.diagonal(dim1=-2, dim2=-1).log().sum(-1).unsqueeze(-1) - 0.5 * log_det_block  # (R, M, K', P)

        observed = rows.observed
        d = (rows.X.unsqueeze(-3).to(work) - self.loc.unsqueeze(-2).to(work)) * observed.unsqueeze(-3)  # (R, M, K, n, D)
        g = d @ precision  # Lambda d per row (Lambda symmetric)
        row_index = self.index[rows.row_pattern]  # each row's missing coordinates, (n, q) or (M, n, q)
        row_index = row_index if row_index.dim() == 2 else row_index.unsqueeze(1)  # (M, 1, n, q) about (R, M, K)
        u = torch.cat([g, g.new_zeros(*g.shape[:-1], 1)], -1).gather(-1, row_index.expand(*g.shape[:-1], -1))
        w = (self._per_row(self.conditional) @ u.unsqueeze(-1)).squeeze(-1)  # C u, (R, M, K, n, q)
        mahalanobis = (d * g).sum(-1) - (u * w).sum(-1)
        log_2pi = (0.5 * math.log(2 * math.pi)) * observed.sum(-1).to(work)  # (n,) or (M, n)
        self.log_prob = (self._per_row(half_logdet) - 0.5 * mahalanobis - log_2pi.unsqueeze(-2)).to(dtype)
        completed = torch.zeros(*d.shape[:-1], D + 1, dtype=work, device=d.device)
        completed.scatter_(-1, row_index.expand(*w.shape), -w)  # -C u at the missing coordinates
        self.offsets = d + completed[..., :D]  # e = E[x | x_o, k] - mu

    def _per_row(self, values: torch.Tensor) -> torch.Tensor:
        """Per-pattern values (R, M, K', P, ...) -> each row's pattern's (R, M, K', n, ...)."""
        return gathered_per_pattern(values, self.rows.row_pattern)

    # --- what EM and imputation need --------------------------------------------------------
    def statistics(self, resp: torch.Tensor, about: torch.Tensor | None) -> torch.Tensor:
        rows, e = self.rows, self.offsets
        weights = resp.to(e.dtype)
        first = (weights.unsqueeze(-2) @ e).squeeze(-2)  # sum_n r e, (R, M, K, D)
        second = (e * weights.unsqueeze(-1)).mT @ e  # sum_n r e e^T, (R, M, K, D, D)
        counts = torch.zeros(*weights.shape[:3], rows.patterns.shape[0], dtype=e.dtype, device=e.device)
        pattern = rows.row_pattern.expand(*weights.shape[:2], -1)[:, :, None].expand_as(weights)
        counts.scatter_add_(-1, pattern, weights)  # (R, M, K, P)
        weighted = counts[..., None, None] * self.conditional  # r_p C_p, (R, M, K, P, q, q)
        D = e.shape[-1]
        placed = e.new_zeros(*weighted.shape[:3], (D + 1) ** 2)
        placed.scatter_add_(-1, self.flat_index.expand(*weighted.shape[:3], -1), weighted.flatten(3))
        second = second + placed.view(*placed.shape[:-1], D + 1, D + 1)[..., :D, :D]
        point = about if about is not None else self.reference
        shift = self.loc if point is None else self.loc - point
        return statistics_about(self.family, first, second, resp.sum(-1), shift).to(resp.dtype)

    def conditional_means(self) -> torch.Tensor:
        rows = self.rows
        means = self.loc.unsqueeze(-2) + self.offsets.to(self.loc.dtype)
        return torch.where(rows.observed.unsqueeze(-3), rows.X.unsqueeze(-3), means)

    def draw(self, components: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        rows = self.rows
        means = self.conditional_means()[0]  # (M, K, n, D)
        M, _, n, D = means.shape
        mean = means.gather(1, components[0][:, None, :, None].expand(M, 1, n, D)).squeeze(1)  # (M, n, D)
        factor = torch.linalg.cholesky_ex(self._per_row(self.conditional)[0])[0]  # (M, K', n, q, q)
        component = components[0] if factor.shape[1] > 1 else torch.zeros_like(components[0])
        chosen = factor.gather(1, component[:, None, :, None, None].expand(M, 1, n, *factor.shape[-2:])).squeeze(1)
        noise = torch.randn(*chosen.shape[:-1], 1, generator=generator, device=chosen.device, dtype=chosen.dtype)
        offset = (chosen @ noise).squeeze(-1)  # (M, n, q)
        index = self.index[rows.row_pattern].expand(M, n, -1)
        placed = offset.new_zeros(M, n, D + 1).scatter_(-1, index, offset)[..., :D].to(mean.dtype)
        return torch.where(rows.observed.expand(M, n, D), mean, mean + placed)
