"""Multivariate Gaussian components with full, tied, diagonal or spherical covariance.

Unconstrained parameters (``K`` components, ``D`` features, batch dims in front):

    loc                      (*b, K, D)     component means
    raw_precision_cholesky   full (*b, K, D, D) | tied (*b, D, D) | diag (*b, K, D) | spherical (*b, K)

``raw_precision_cholesky`` is the upper-triangular Cholesky factor ``P`` of the precision
(``Lambda = P P^T``, scikit-learn's ``precisions_cholesky_``) with its diagonal stored as a
logarithm, so any real tensor is a valid parameter (entries below the diagonal are ignored).

Exponential-family form. With ``x~ = x - s`` and ``mu~ = mu - s`` for a fixed reference ``s`` (the data
mean), ``log N(x | mu, Sigma) = T(x~).eta + c`` where

    full / tied: T = [x~, triu(x~ x~^T)]  eta = [Lambda mu~, -1/2 triu(Lambda) * (2 off the diagonal)]
    diag:        T = [x~, x~^2]           eta = [lambda * mu~, -lambda / 2]
    spherical:   T = [x~, |x~|^2]         eta = [lambda * mu~, -lambda / 2]
    c = 1/2 log|Lambda| - 1/2 mu~^T Lambda mu~ - D/2 log(2 pi)

Centring keeps the expanded quadratic form from cancelling catastrophically: its relative
error grows like eps * (|mu~| / sigma)^2, small when the data are centred. A component narrow or
far from the reference, for which it is not (``expansion_error``), is evaluated directly instead,
``-1/2 |(x - mu)^T P|^2 + log|P| - D/2 log(2 pi)`` (``direct_log_prob``), and in a fit its
statistics are taken about its own mean (``own_reference_statistics``): the cost of that is one
(n, D) x (D, D) product per such component and chunk, paid only where the shared GEMM would be
inaccurate.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, cast

import torch

from .._tracing import cached_unless_traced, is_traced
from .._validation import check_magnitude, check_positive, initial_tensor
from .base import ComponentFamily, Marginal, Theta
from .gaussian_missing import GaussianMarginal
from .gaussian_missing_precision import PrecisionGaussianMarginal, takes_precision_path

COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")


@cached_unless_traced
def _triu_indices(n_features: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column indices of the upper triangle (diagonal included), in packed order."""
    rows, cols = torch.triu_indices(n_features, n_features, device=device)
    return rows, cols


def _triu_pairs(n_features: int) -> list[tuple[int, int]]:
    """The (row, column) pairs of :func:`_triu_indices` as Python ints (no tensor to read back)."""
    return [(i, j) for i in range(n_features) for j in range(i, n_features)]


def with_packed_outer(centred: torch.Tensor) -> torch.Tensor:
    """Every row followed by the packed upper triangle of its ``x x^T``: (..., D) -> (..., D + D (D
    + 1) / 2), the triangle in the order of :func:`_triu_indices`. Row by row of the triangle (D
    contiguous products, several times faster than gathering both factors by index), written
    straight into the result: 1.5-3.5x faster than concatenating the products (a copy of every
    feature, twice), the same values. Where a gradient flows or the code is traced (``out=``
    takes no part in either) the products are concatenated."""
    D = centred.shape[-1]
    if (centred.requires_grad and torch.is_grad_enabled()) or is_traced(centred):
        return torch.cat([centred, *(centred[..., i:i + 1] * centred[..., i:] for i in range(D))], -1)
    result = centred.new_empty(*centred.shape[:-1], D + D * (D + 1) // 2)
    result[..., :D] = centred
    start = D
    for i in range(D):
        torch.mul(centred[..., i:i + 1], centred[..., i:], out=result[..., start:start + D - i])
        start += D - i
    return result


@cached_unless_traced
def _packed_positions(n_features: int, device: torch.device) -> torch.Tensor:
    """Positions of the packed upper triangle in a flattened (D, D) matrix."""
    rows, cols = _triu_indices(n_features, device)
    return rows * n_features + cols


@cached_unless_traced
def _symmetric_positions(n_features: int, device: torch.device) -> torch.Tensor:
    """For every entry (i, j) of a flattened (D, D) matrix, the position of (min, max) in the
    packed upper triangle: a gather with it unpacks a symmetric matrix."""
    rows, cols = _triu_indices(n_features, device)
    packed = torch.arange(rows.numel(), device=device)
    positions = torch.empty(n_features, n_features, dtype=torch.long, device=device)
    positions[rows, cols] = packed
    positions[cols, rows] = packed
    return positions.flatten()


@cached_unless_traced
def _packed_weights(n_features: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """-1/2 on the diagonal, -1 off it: the weights of the packed upper triangle of Lambda."""
    rows, cols = _triu_indices(n_features, device)
    return torch.where(rows == cols, -0.5, -1.0).to(dtype)


def upper_cholesky_from_precision(precision: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper-triangular ``P`` with ``precision = P P^T`` (..., D, D), and the cholesky_ex info.

    Reversing the order of the features (J) turns the lower factor of ``J Lambda J`` into the
    upper factor of ``Lambda``: ``Lambda = (J L J)(J L J)^T``.
    """
    flipped = precision.flip(-1, -2)
    lower, info = torch.linalg.cholesky_ex(flipped)
    return lower.flip(-1, -2), info


#: Below this size, many small triangular inverses are faster as vectorised substitution than as
#: one LAPACK call per matrix (the batched-fitting case: thousands of 2x2 or 3x3 factors).
SMALL_TRIANGULAR = 4


def lower_triangular_inverse(lower: torch.Tensor) -> torch.Tensor:
    """Inverse of lower-triangular matrices (..., D, D) with non-zero diagonals."""
    n = lower.shape[-1]
    eye = torch.eye(n, dtype=lower.dtype, device=lower.device)
    if n > SMALL_TRIANGULAR or lower[..., 0, 0].numel() < 64:
        return torch.linalg.solve_triangular(lower, eye.expand_as(lower), upper=False)
    # Forward substitution, one row at a time, vectorised over the batch:
    # X[i] = (e_i - sum_{k<i} L[i, k] X[k]) / L[i, i].
    rows: list[torch.Tensor] = []
    for i in range(n):
        row = eye[i].expand(lower.shape[:-1])
        for k in range(i):
            row = row - lower[..., i, k, None] * rows[k]
        rows.append(row / lower[..., i, i, None])
    return torch.stack(rows, -2)


#: Up to this many features, full covariances are factorised and turned into natural parameters
#: entry by entry: a few dozen elementwise ops on (batch,) tensors, several times faster than
#: batched LAPACK calls and ops over tiny (D, D) axes (thousands of 2x2 or 3x3 matrices).
SMALL_FEATURES = 3


def small_raw_precision_cholesky(covariance: list[list[torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Unconstrained precision Cholesky factor (log diagonal) of a covariance given entry by
    entry (``covariance[i][j]``, each (...,), i >= j used): ``Sigma = L L^T``, ``P = L^{-T}``.

    Returns raw (..., D, D) with zeros below the diagonal, and whether every pivot was positive
    (...,). Where one was not, raw is meaningless (computed with that pivot set to 1, so that no
    NaN enters a gradient): the caller factorises those with LAPACK, which reports the failures.
    """
    n = len(covariance)
    lower: list[list[torch.Tensor]] = [[None] * n for _ in range(n)]  # type: ignore[list-item]
    pivots, positive = [], []
    for j in range(n):  # Cholesky-Banachiewicz, column by column
        pivot = covariance[j][j]
        for k in range(j):
            pivot = pivot - lower[j][k].square()
        positive.append(pivot > 0)
        pivot = torch.where(positive[-1], pivot, 1.0)
        pivots.append(pivot)
        lower[j][j] = pivot.sqrt()
        for i in range(j + 1, n):
            entry = covariance[i][j]
            for k in range(j):
                entry = entry - lower[i][k] * lower[j][k]
            lower[i][j] = entry / lower[j][j]
    pivot_values = torch.stack(pivots, -1)  # (..., D)
    # X = L^{-1} by forward substitution: X[i][i] = 1 / L[i][i], X[i][j] = -sum_k L[i][k] X[k][j] / L[i][i].
    inverse: list[list[torch.Tensor]] = [[None] * n for _ in range(n)]  # type: ignore[list-item]
    for i in range(n):
        inverse[i][i] = lower[i][i].reciprocal()
        for j in range(i):
            entry = lower[i][j] * inverse[j][j]
            for k in range(j + 1, i):
                entry = entry + lower[i][k] * inverse[k][j]
            inverse[i][j] = -entry * inverse[i][i]
    # P = X^T (upper); log P[i][i] = -log L[i][i] = -log(pivot_i) / 2.
    log_diagonal = pivot_values.log().mul_(-0.5).unbind(-1)
    zero = torch.zeros_like(log_diagonal[0])
    entries = [log_diagonal[i] if i == j else (inverse[j][i] if j > i else zero) for i in range(n) for j in range(n)]
    return torch.stack(entries, -1).unflatten(-1, (n, n)), torch.stack(positive, -1).all(-1)


def small_natural_parameters(
    raw: torch.Tensor, centred: torch.Tensor, tied: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Natural parameters entry by entry for D <= SMALL_FEATURES: eta (*b, K, F) and
    ``1/2 log|Lambda| - 1/2 mu~^T Lambda mu~`` (*b, K), with ``Lambda = P P^T``.

    Shape:
        raw: (*b, K, D, D), or (*b, D, D) when tied; centred: (*b, K, D)
    """
    n = raw.shape[-1]
    if tied:
        raw = raw.unsqueeze(-3)  # (*b, 1, D, D): every component shares it
    upper = [[raw[..., i, i].exp() if i == j else raw[..., i, j] for j in range(n)] for i in range(n)]
    mean = [centred[..., i] for i in range(n)]
    # z = P^T mu~, so that Lambda mu~ = P z and mu~^T Lambda mu~ = |z|^2.
    z = [_dot([upper[i][k] for i in range(k + 1)], mean[: k + 1]) for k in range(n)]
    linear = [_dot(upper[i][i:], z[i:]) for i in range(n)]
    quadratic = [  # -1/2 Lambda_ii, -Lambda_ij (i < j): x_i x_j appears once in T
        _dot(upper[i][j:], upper[j][j:]) * (-0.5 if i == j else -1.0)
        for i, j in _triu_pairs(n)
    ]
    eta = torch.stack([*linear, *(q.expand_as(linear[0]) for q in quadratic)], -1)
    half_logdet = sum(raw[..., i, i] for i in range(n))
    return eta, half_logdet - 0.5 * _dot(z, z)


def small_expansion_error(
    raw: torch.Tensor, centred: torch.Tensor, loc: torch.Tensor, tied: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """:meth:`Gaussian.expansion_error` before the factor eps, entry by entry for full and tied
    covariances with D <= SMALL_FEATURES (a few dozen ops on (*b, K) tensors instead of batched
    triangular inverses and products of thousands of tiny matrices): ``|a^T |P||^2`` and
    ``|b^T |P||_2`` with ``a = |mu~| + sigma``, ``b = |mu| + sigma``.

    Shape:
        raw: (*b, K, D, D), or (*b, D, D) when tied; centred, loc: (*b, K, D) -> (*b, K) each
    """
    n = raw.shape[-1]
    if tied:
        raw = raw.unsqueeze(-3)  # (*b, 1, D, D): every component shares it
    upper = [[raw[..., i, i].exp() if i == j else raw[..., i, j] for j in range(n)] for i in range(n)]
    # Sigma = L^{-1} L^{-T} with L = P^T lower: sigma_i is the norm of row i of L^{-1}, by forward
    # substitution: Y[i][i] = 1 / L[i][i], Y[i][j] = -sum_{j <= k < i} L[i][k] Y[k][j] / L[i][i].
    inverse: list[list[torch.Tensor]] = [[None] * n for _ in range(n)]  # type: ignore[list-item]
    for i in range(n):
        inverse[i][i] = upper[i][i].reciprocal()
        for j in range(i):
            inverse[i][j] = -_dot([upper[k][i] for k in range(j, i)], [inverse[k][j] for k in range(j, i)]) * inverse[i][i]
    sigma = [_dot(inverse[i][: i + 1], inverse[i][: i + 1]).sqrt() for i in range(n)]
    spread = [centred[..., i].abs() + sigma[i] for i in range(n)]
    offset = [loc[..., i].abs() + sigma[i] for i in range(n)]
    scale = [[upper[i][k].abs() for k in range(n)] for i in range(n)]  # |P|, upper triangular
    # sums of n >= 1 tensors
    expanded = cast(torch.Tensor, sum(_dot(spread[: k + 1], [scale[i][k] for i in range(k + 1)]).square() for k in range(n)))
    direct = cast(torch.Tensor, sum(_dot(offset[: k + 1], [scale[i][k] for i in range(k + 1)]).square() for k in range(n))).sqrt()
    return expanded, direct


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """``sum_i a[i] * b[i]`` over lists of broadcastable tensors."""
    total = a[0] * b[0]
    for x, y in zip(a[1:], b[1:]):
        total = total + x * y
    return total


def precision_cholesky_from_covariance(covariance: torch.Tensor, lift: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper ``P = L^{-T}`` for ``covariance = L L^T`` (..., D, D), and the cholesky_ex info.

    Below float64, a matrix that fails to factorise (positive definite, but with a condition
    number beyond 1 / eps: reg_covar-sized variances beside large ones) is factorised again in
    float64 and its factor rounded back. With ``lift``, one that float64 finds indefinite too is
    taken to be so by its own rounding: a covariance summed in float32 is known to about D * eps
    of its scale (the mean of its diagonal), so its smallest eigenvalues may lie that far below 0.
    Its diagonal is raised by that rounding level, then by 4 and 16 times it
    (:func:`_lifted_factors`). Where it still fails, the identity is inverted (no NaN) and the
    component is reported invalid."""
    lower, info = torch.linalg.cholesky_ex(covariance)
    failed = info > 0
    if not bool(failed.any()):
        return lower_triangular_inverse(lower).mT, info
    upper = _inverse_factor_or_identity(lower, failed)
    if covariance.dtype != torch.float64:
        retry = covariance[failed].double()
        eps = torch.finfo(covariance.dtype).eps
        retry, retry_info = _lifted_factors(retry, eps) if lift else torch.linalg.cholesky_ex(retry)
        upper, info = upper.clone(), info.clone()
        upper[failed] = _inverse_factor_or_identity(retry, retry_info > 0).to(covariance.dtype)
        info[failed] = retry_info
    return upper, info


#: The rounding levels (multiples of D * eps * mean variance) by which the diagonal of a
#: lower-precision covariance that float64 finds indefinite is raised in turn.
ROUNDING_LIFTS = (1.0, 4.0, 16.0)


def _lifted_factors(covariance: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 Cholesky factors of ``covariance`` (F, D, D) (computed in a precision of machine
    epsilon ``eps``), each raised on its diagonal by the least of ROUNDING_LIFTS times its
    rounding level ``D * eps * mean(diag)`` that makes it factorise (none where it does as it
    is): factors and cholesky_ex info (> 0 where every lift failed)."""
    lower, info = torch.linalg.cholesky_ex(covariance)
    D = covariance.shape[-1]
    level = D * eps * covariance.diagonal(dim1=-2, dim2=-1).mean(-1).abs()  # (F,)
    eye = torch.eye(D, dtype=covariance.dtype, device=covariance.device)
    for lift in ROUNDING_LIFTS:
        still = info > 0
        if not bool(still.any()):
            break
        lifted = covariance[still] + (lift * level[still])[:, None, None] * eye
        lower[still], info[still] = torch.linalg.cholesky_ex(lifted)
    return lower, info


def _inverse_factor_or_identity(lower: torch.Tensor, failed: torch.Tensor) -> torch.Tensor:
    """``L^{-T}`` (..., D, D), with the identity where ``failed`` (...) marks a failed factor.
    The identity is written into a copy with the same (column-major) strides, so that the
    inverse of every other matrix rounds exactly as in a batch without failures (a model fails
    alone)."""
    lower = lower.clone()
    lower[failed] = torch.eye(lower.shape[-1], dtype=lower.dtype, device=lower.device)
    return lower_triangular_inverse(lower).mT


def pack_raw_triangular(upper: torch.Tensor) -> torch.Tensor:
    """Exactly upper-triangular factor with positive diagonal -> unconstrained form (log diagonal)."""
    raw = upper.clone()
    raw.diagonal(dim1=-2, dim2=-1).log_()
    return raw


def unpack_raw_triangular(raw: torch.Tensor) -> torch.Tensor:
    """Unconstrained form -> upper-triangular factor with positive diagonal (entries below the
    diagonal are ignored). Elementwise masks: faster than triu/diag_embed on many small matrices."""
    eye, strictly_upper = _triangle_masks(raw.shape[-1], raw.device, raw.dtype)
    return raw * strictly_upper + eye * raw.diagonal(dim1=-2, dim2=-1).exp().unsqueeze(-2)


@cached_unless_traced
def _triangle_masks(n_features: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The identity and the strictly upper triangle of ones, (D, D) each (made once per size)."""
    eye = torch.eye(n_features, dtype=dtype, device=device)
    return eye, torch.ones(n_features, n_features, dtype=dtype, device=device).triu_(1)


class Gaussian(ComponentFamily):
    """Gaussian components. ``covariance_type`` has scikit-learn's meaning.

    ``means_init`` (K, D) and ``precisions_init`` (full (K, D, D), tied (D, D), diag (K, D),
    spherical (K,)) may carry the mixture's batch dimensions in front.
    """

    has_own_reference = True
    #: Components with fewer expected points than this are re-seeded.
    min_count = 1e-3
    uses_reference = True

    def __init__(
        self, covariance_type: str = "full", reg_covar: float = 1e-6, *,
        means_init: Any = None, precisions_init: Any = None,
    ) -> None:
        if covariance_type not in COVARIANCE_TYPES:
            raise ValueError(f"covariance_type must be one of {list(COVARIANCE_TYPES)}, got {covariance_type!r}")
        check_positive(reg_covar, "reg_covar", allow_zero=True)
        self.covariance_type = covariance_type
        self.reg_covar = float(reg_covar)
        self.means_init = means_init
        self.precisions_init = precisions_init

    # --- parameter layout -------------------------------------------------------------------
    def precision_shape(self, n_components: int, n_features: int) -> tuple[int, ...]:
        return {
            "full": (n_components, n_features, n_features),
            "tied": (n_features, n_features),
            "diag": (n_components, n_features),
            "spherical": (n_components,),
        }[self.covariance_type]

    def event_shapes(self, n_components: int, n_features: int) -> dict[str, tuple[int, ...]]:
        return {
            "loc": (n_components, n_features),
            "raw_precision_cholesky": self.precision_shape(n_components, n_features),
        }

    def n_free_parameters(self, n_components: int, n_features: int) -> int:
        per_covariance = {
            "full": n_components * n_features * (n_features + 1) // 2,
            "tied": n_features * (n_features + 1) // 2,
            "diag": n_components * n_features,
            "spherical": n_components,
        }[self.covariance_type]
        return n_components * n_features + per_covariance

    def default_parameters(self, batch_shape, n_components, n_features, generator, device, dtype) -> Theta:
        loc = torch.randn(*batch_shape, n_components, n_features, generator=generator, device=device, dtype=dtype)
        raw = torch.zeros(*batch_shape, *self.precision_shape(n_components, n_features), device=device, dtype=dtype)
        return {"loc": loc, "raw_precision_cholesky": raw}

    def user_initial_parameters(self, batch_shape, n_components, n_features, device, dtype) -> Theta:
        theta: Theta = {}
        if self.means_init is not None:
            theta["loc"] = cast(torch.Tensor, self.initial_centres(batch_shape, n_components, n_features, device, dtype))  # set: means_init is
        if self.precisions_init is not None:
            shape = self.precision_shape(n_components, n_features)
            precision = initial_tensor(self.precisions_init, "precisions_init", shape, batch_shape, device, dtype)
            if self.covariance_type in ("full", "tied"):
                asymmetry = float((precision - precision.mT).abs().max())
                if asymmetry > 1e-8 * float(precision.abs().max()):
                    raise ValueError(f"precisions_init must hold symmetric matrices, got asymmetry {asymmetry:.3g}")
                upper, info = upper_cholesky_from_precision(0.5 * (precision + precision.mT))
                if bool((info > 0).any()):
                    raise ValueError("precisions_init must hold positive-definite matrices, got one that is not")
                theta["raw_precision_cholesky"] = pack_raw_triangular(upper)
            else:
                if bool((precision <= 0).any()):
                    raise ValueError(
                        f"precisions_init must be positive for covariance_type={self.covariance_type!r}, "
                        f"got minimum {precision.min().item():.3g}"
                    )
                theta["raw_precision_cholesky"] = 0.5 * precision.log()
        return theta

    def initial_centres(self, batch_shape, n_components, n_features, device, dtype) -> torch.Tensor | None:
        if self.means_init is None:
            return None
        return initial_tensor(self.means_init, "means_init", (n_components, n_features), batch_shape, device, dtype)

    # --- data --------------------------------------------------------------------------------
    def check_domain(self, X: torch.Tensor, name: str) -> None:
        check_magnitude(X, name, power=2, what="the sums of squares")

    def reference(self, X: torch.Tensor) -> torch.Tensor:
        return X.mean(-2, keepdim=True)

    def check_missing(self, name: str) -> None:
        pass  # every covariance type marginalises missing coordinates

    def marginal(self, rows, theta, reference=None) -> Marginal:
        if takes_precision_path(self, rows):
            return PrecisionGaussianMarginal(self, rows, theta, reference)
        return GaussianMarginal(self, rows, theta, reference)

    def parameter_reference(self, theta, weights) -> torch.Tensor:
        return (weights.unsqueeze(-1) * theta["loc"]).sum(-2, keepdim=True)

    def n_statistics(self, n_features: int) -> int:
        return {
            "full": n_features + n_features * (n_features + 1) // 2,
            "tied": n_features + n_features * (n_features + 1) // 2,
            "diag": 2 * n_features,
            "spherical": n_features + 1,
        }[self.covariance_type]

    def features(self, X: torch.Tensor, reference: torch.Tensor | None) -> tuple[torch.Tensor, None]:
        centred = X if reference is None else X - reference
        if self.covariance_type in ("full", "tied"):
            return with_packed_outer(centred), None
        if self.covariance_type == "diag":
            second = centred.square()
        else:
            second = centred.square().sum(-1, keepdim=True)
        return torch.cat([centred, second], dim=-1), None

    # --- constrained views -------------------------------------------------------------------
    def precision_cholesky(self, theta: Mapping[str, torch.Tensor]) -> torch.Tensor:
        raw = theta["raw_precision_cholesky"]
        return unpack_raw_triangular(raw) if self.covariance_type in ("full", "tied") else raw.exp()

    def covariance(self, theta: Mapping[str, torch.Tensor]) -> torch.Tensor:
        chol = self.precision_cholesky(theta)
        if self.covariance_type in ("full", "tied"):
            eye = torch.eye(chol.shape[-1], dtype=chol.dtype, device=chol.device)
            inverse = torch.linalg.solve_triangular(chol, eye.expand_as(chol), upper=True)
            return inverse.mT @ inverse
        return chol.square().reciprocal()

    def precision(self, theta: Mapping[str, torch.Tensor]) -> torch.Tensor:
        chol = self.precision_cholesky(theta)
        if self.covariance_type in ("full", "tied"):
            return chol @ chol.mT
        return chol.square()

    # --- EM ----------------------------------------------------------------------------------
    def natural_parameters(self, theta, reference) -> tuple[torch.Tensor, torch.Tensor]:
        loc = theta["loc"]  # (*b, K, D)
        n_features = loc.shape[-1]
        centred = loc if reference is None else loc - reference
        raw = theta["raw_precision_cholesky"]
        log_2pi_term = 0.5 * n_features * math.log(2 * math.pi)
        if self.covariance_type in ("full", "tied") and n_features <= SMALL_FEATURES:
            eta, const = small_natural_parameters(raw, centred, tied=self.covariance_type == "tied")
            return eta, const - log_2pi_term
        precision = self.precision(theta)
        if self.covariance_type in ("full", "tied"):
            half_logdet = raw.diagonal(dim1=-2, dim2=-1).sum(-1)  # (*b, K) or (*b,)
            if self.covariance_type == "tied":
                precision = precision.unsqueeze(-3)  # (*b, 1, D, D)
                half_logdet = half_logdet.unsqueeze(-1)
            linear = (precision @ centred.unsqueeze(-1)).squeeze(-1)  # (*b, K, D)
            # x_i x_j appears once in T for i < j but twice in x^T Lambda x.
            packed = precision.flatten(-2).index_select(-1, _packed_positions(n_features, loc.device))
            quadratic = packed * _packed_weights(n_features, loc.device, loc.dtype)  # (*b, K|1, P)
            quadratic = quadratic.expand(*linear.shape[:-1], quadratic.shape[-1])
        else:
            if self.covariance_type == "diag":
                half_logdet = raw.sum(-1)
            else:
                half_logdet = n_features * raw
                precision = precision.unsqueeze(-1)  # (*b, K, 1)
            linear = precision * centred
            quadratic = -0.5 * precision
        mahalanobis_mean = (linear * centred).sum(-1)
        const = half_logdet - 0.5 * mahalanobis_mean - log_2pi_term
        return torch.cat([linear, quadratic], dim=-1), const

    @property
    def lifts_rounding(self) -> bool:  # type: ignore[override]  # a property over the protocol's flag
        """With ``reg_covar > 0`` every true covariance is positive definite, so one that its
        rounding makes indefinite may be lifted; with 0 a collapse onto a point is real."""
        return self.reg_covar > 0

    def m_step(self, counts, stats, reference) -> tuple[Theta, torch.Tensor]:
        return self._m_step(counts, stats, reference, lift=False)

    def lifted_m_step(self, counts, stats, reference) -> tuple[Theta, torch.Tensor]:
        return self._m_step(counts, stats, reference, lift=True)

    def _m_step(self, counts, stats, reference, lift: bool) -> tuple[Theta, torch.Tensor]:
        # ``lift``: full and tied covariances that float64 finds indefinite below float64 are
        # raised by their rounding level (precision_cholesky_from_covariance).
        # With a prior (counts per statistic), the means divide by n + kappa and the second
        # moments by the covariance's own count c: Sigma = S2 / c - (n + kappa) / c * m m^T
        # (torch_em.priors); without one both are n and ``shrink`` is None.
        n_features = self._n_features_from_stats(stats.shape[-1])
        counts, scatter_counts, shrink = _mean_and_scatter_counts(counts, stats)
        centred_mean = stats[..., :n_features] / counts.unsqueeze(-1)  # (*b, K, D)
        second = stats[..., n_features:]
        loc = centred_mean if reference is None else centred_mean + reference
        small = None
        if self.covariance_type == "full" and n_features <= SMALL_FEATURES:
            small = self._small_full_m_step(scatter_counts, centred_mean, second, shrink)
        if small is not None and bool(small[2].all()):
            raw, valid, _ = small
        elif self.covariance_type in ("full", "tied"):
            rows, cols = _triu_indices(n_features, stats.device)
            scatter = stats.new_empty(*second.shape[:-1], n_features, n_features)
            scatter[..., rows, cols] = second
            scatter[..., cols, rows] = second  # symmetric Σ_n r x~ x~^T, (*b, K, D, D)
            outer_means = centred_mean.unsqueeze(-1) * centred_mean.unsqueeze(-2)
            if self.covariance_type == "full":
                second_moment = scatter / scatter_counts[..., None, None]
                covariance = second_moment - (outer_means if shrink is None else outer_means * shrink[..., None, None])
            else:
                weighted = (counts[..., None, None] * outer_means).sum(-3)
                second_moment = scatter.sum(-3) / scatter_counts.sum(-1)[..., None, None]
                covariance = second_moment - weighted / scatter_counts.sum(-1)[..., None, None]
            resolved = self._variance_resolved(covariance.diagonal(dim1=-2, dim2=-1),
                                               second_moment.diagonal(dim1=-2, dim2=-1))
            covariance = covariance + self.reg_covar * torch.eye(n_features, dtype=stats.dtype, device=stats.device)
            upper, info = precision_cholesky_from_covariance(covariance, lift)
            valid = (info == 0) & resolved
            if self.covariance_type == "tied":
                valid = valid.unsqueeze(-1).expand_as(counts)
            raw = pack_raw_triangular(upper)
            if small is not None:  # a model all of whose factors the entrywise path found keeps them, as alone
                entrywise = small[2].all(-1, keepdim=True)  # (*b, 1)
                raw = torch.where(entrywise[..., None, None], small[0], raw)
                valid = torch.where(entrywise, small[1], valid)
        else:
            if self.covariance_type == "diag":
                second_moment = second / scatter_counts.unsqueeze(-1)
                mean_square = centred_mean.square()
                variance = second_moment - (mean_square if shrink is None else mean_square * shrink.unsqueeze(-1))
            else:
                second_moment = second[..., 0] / scatter_counts / n_features
                mean_square = centred_mean.square().sum(-1) / n_features
                variance = second_moment - (mean_square if shrink is None else mean_square * shrink)
            valid = self._variance_resolved(variance, second_moment)
            variance = variance + self.reg_covar
            raw = -0.5 * variance.clamp_min(torch.finfo(stats.dtype).tiny).log()
        return {"loc": loc, "raw_precision_cholesky": raw}, valid

    def supports_fixing(self, names: set[str]) -> bool:
        return True

    def conditional_m_step(self, counts, stats, reference, fixed) -> tuple[Theta, torch.Tensor]:
        if "loc" in fixed and "raw_precision_cholesky" not in fixed:
            # The spread about fixed means mu rather than the weighted means m:
            # sum_n r (x - mu)(x - mu)^T = [S_xx - n m m^T] + n (m - mu)(m - mu)^T, so adding
            # n T2(m - mu) to the second-moment statistics makes the M-step's covariance the
            # conditional maximiser (for every covariance type, tied included).
            n_features = fixed["loc"].shape[-1]
            mean_counts = _mean_and_scatter_counts(counts, stats)[0]
            centred_mean = stats[..., :n_features] / mean_counts.unsqueeze(-1)  # (*b, K, D), about the reference
            fixed_mean = fixed["loc"] if reference is None else fixed["loc"] - reference
            offset = (centred_mean - fixed_mean).expand_as(centred_mean)
            second = self.features(offset, None)[0][..., n_features:]  # (*b, K, F - D)
            stats = torch.cat([stats[..., :n_features], stats[..., n_features:] + mean_counts.unsqueeze(-1) * second], -1)
        return super().conditional_m_step(counts, stats, reference, fixed)

    def _small_full_m_step(
        self, counts: torch.Tensor, centred_mean: torch.Tensor, second: torch.Tensor, shrink: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Full covariances entry by entry (D <= SMALL_FEATURES): (raw, valid, factorised), where
        ``factorised`` (*b, K) says where the entrywise Cholesky succeeded (the general path
        handles the models with a component where it did not).

        Shape:
            counts: (*b, K) the second moments' counts; centred_mean: (*b, K, D); second: (*b, K, P)
            packed sums of x~ x~^T; shrink: (*b, K) the means' counts over ``counts``, or None (1)
        """
        n_features = centred_mean.shape[-1]
        rows, cols = _triu_indices(n_features, second.device)
        mean = centred_mean.unbind(-1)
        second_moment = (second / counts.unsqueeze(-1)).unbind(-1)  # packed E[x~ x~^T], P x (*b, K)
        moments, covariance = {}, {}
        for p, (i, j) in enumerate(zip(rows.tolist(), cols.tolist())):
            moments[i, j] = second_moment[p]
            covariance[i, j] = torch.addcmul(second_moment[p], mean[i] if shrink is None else mean[i] * shrink, mean[j],
                                             value=-1.0)
        diagonal = range(n_features)
        resolved = self._variance_resolved(torch.stack([covariance[i, i] for i in diagonal], -1),
                                           torch.stack([moments[i, i] for i in diagonal], -1))
        matrix = [[covariance[min(i, j), max(i, j)] for j in diagonal] for i in diagonal]
        for i in diagonal:
            matrix[i][i] = matrix[i][i] + self.reg_covar
        raw, factorised = small_raw_precision_cholesky(matrix)
        return raw, resolved, factorised

    def _variance_resolved(self, variance: torch.Tensor, second_moment: torch.Tensor) -> torch.Tensor:
        """Whether variances (*b, K[, D]) from one-pass statistics are more than rounding noise.

        ``E[x^2] - mean^2`` carries an error of a few eps * E[x^2]; a component collapsed onto
        identical points has a true variance of 0, which only ``reg_covar`` can make valid.
        Returns (*b, K) (all features resolved)."""
        noise = 16 * torch.finfo(variance.dtype).eps * second_moment
        resolved = variance + self.reg_covar > noise
        return resolved.all(-1) if self.covariance_type != "spherical" else resolved

    # --- components about their own mean (narrow or far from the shared reference) ----------
    def expansion_error(self, theta, reference) -> tuple[torch.Tensor, torch.Tensor]:
        # Expanded about the reference s, log N(x) = T(x~).eta + c adds terms of size
        # q = a^T |Lambda| a for a = |mu - s| + sigma (a point one standard deviation from the
        # mean), which cancel to O(D): its rounding error is about eps * q (estimated from above
        # by eps * |a^T |P||^2 for full and tied covariances), and so is the relative
        # rounding of the one-pass covariance. Evaluated directly, y = (x - mu)^T P (scikit-learn
        # forms x^T P - mu^T P), the error is about eps * |b^T |P||_2 with b = |mu| + sigma (the
        # roundings of the D entries of y, of unit size near the mode, add up like random signs).
        with torch.no_grad():
            loc = theta["loc"]  # (*b, K, D)
            centred = loc if reference is None else loc - reference
            if self.covariance_type in ("full", "tied") and loc.shape[-1] <= SMALL_FEATURES:
                expanded, direct = small_expansion_error(
                    theta["raw_precision_cholesky"], centred, loc, tied=self.covariance_type == "tied"
                )
            elif self.covariance_type in ("full", "tied"):
                chol = self.precision_cholesky(theta)
                # Sigma = L^{-1} L^{-T} with L = P^T: its diagonal holds the row norms of L^{-1}.
                sigma = lower_triangular_inverse(chol.mT).square().sum(-1).sqrt()  # (*b, K|., D)
                scale = chol.abs()
                if self.covariance_type == "tied":
                    sigma, scale = sigma.unsqueeze(-2), scale.unsqueeze(-3)
                # a^T |Lambda| a <= |a^T |P||^2, as |Lambda_ij| <= sum_k |P_ik| |P_jk|: one product
                # with |P| gives both estimates.
                points = torch.stack([centred.abs() + sigma, loc.abs() + sigma], -2)  # (*b, K, 2, D)
                expanded, direct = (points @ scale).norm(dim=-1).unbind(-1)
                expanded = expanded.square()
            else:
                chol = self.precision_cholesky(theta)
                scale = chol if self.covariance_type == "diag" else chol.unsqueeze(-1)
                sigma = scale.reciprocal()
                expanded = (scale * (centred.abs() + sigma)).square().sum(-1)
                direct = (scale * (loc.abs() + sigma)).norm(dim=-1)
            eps = torch.finfo(loc.dtype).eps
            return eps * expanded, eps * direct

    def own_reference(self, theta) -> torch.Tensor:
        return theta["loc"]

    def direct_log_prob(self, offsets, theta, index) -> torch.Tensor:
        raw = theta["raw_precision_cholesky"]
        n_components, n_features = theta["loc"].shape[-2:]
        if self.covariance_type in ("full", "tied"):
            if self.covariance_type == "full":
                selected = raw.flatten(0, -3)[index]  # (G, D, D)
            else:  # one matrix per model: (R, M, D, D)
                selected = raw.flatten(0, -3)[index // n_components]
            whitened = offsets @ unpack_raw_triangular(selected)  # (G, n, D): (x - mu)^T P
            half_logdet = selected.diagonal(dim1=-2, dim2=-1).sum(-1)
        elif self.covariance_type == "diag":
            selected = raw.flatten(0, -2)[index]  # (G, D)
            whitened = offsets * selected.exp().unsqueeze(-2)
            half_logdet = selected.sum(-1)
        else:
            selected = raw.flatten()[index]  # (G,)
            whitened = offsets * selected.exp()[:, None, None]
            half_logdet = n_features * selected
        log_2pi_term = 0.5 * n_features * math.log(2 * math.pi)
        return (half_logdet - log_2pi_term).unsqueeze(-1) - 0.5 * whitened.square().sum(-1)

    def own_reference_statistics(self, offsets, resp) -> torch.Tensor:
        if self.covariance_type not in ("full", "tied"):
            return super().own_reference_statistics(offsets, resp)
        # The packed second moments from one Gram matrix per component (no (G, n, F) features).
        weighted = offsets * resp.unsqueeze(-1)  # (G, n, D)
        gram = weighted.mT @ offsets  # (G, D, D)
        rows, cols = _triu_indices(offsets.shape[-1], offsets.device)
        return torch.cat([weighted.sum(-2), gram[..., rows, cols]], -1)

    def invalid_component_advice(self) -> str:
        return ("its covariance is not positive definite. Increase reg_covar (now "
                f"{self.reg_covar:g}), use float64, scale the data, or use fewer components")

    def reseed_statistics(self, point_features, counts, sums, empty) -> torch.Tensor:
        # One pseudo-point at the chosen data point, spread like a typical component: add the
        # pooled within-component scatter, sum_k (S_k - n_k T(mu_k)) / sum_k n_k, to T(x*).
        n_features = self._n_features_from_stats(point_features.shape[-1])
        kept = (~empty).to(counts.dtype)
        safe_counts = counts.clamp_min(torch.finfo(counts.dtype).tiny).unsqueeze(-1)
        means = sums[..., :n_features] / safe_counts
        scatter = (sums - safe_counts * self.features(means, None)[0]) * kept.unsqueeze(-1)
        pooled = scatter.sum(-2, keepdim=True) / (counts * kept).sum(-1, keepdim=True).unsqueeze(-1)
        return point_features + pooled

    def _n_features_from_stats(self, n_stats: int) -> int:
        if self.covariance_type == "diag":
            return n_stats // 2
        if self.covariance_type == "spherical":
            return n_stats - 1
        return _n_features_from_packed(n_stats)

    def sample(self, theta, labels, generator) -> torch.Tensor:
        loc = theta["loc"]  # (*b, K, D)
        chol = self.precision_cholesky(theta)
        index = labels.unsqueeze(-1).expand(*labels.shape, loc.shape[-1])
        means = loc.gather(-2, index)  # (*b, n, D)
        noise = torch.randn(means.shape, generator=generator, device=loc.device, dtype=loc.dtype)
        if self.covariance_type in ("full", "tied"):
            if self.covariance_type == "full":
                d = loc.shape[-1]
                gathered = chol.gather(-3, labels[..., None, None].expand(*labels.shape, d, d))  # (*b, n, D, D)
            else:
                gathered = chol.unsqueeze(-3).expand(*labels.shape, *chol.shape[-2:])
            # x = mu + P^{-T} z has covariance P^{-T} P^{-1} = Lambda^{-1}.
            offset = torch.linalg.solve_triangular(gathered.mT, noise.unsqueeze(-1), upper=False).squeeze(-1)
        else:
            scale = chol.reciprocal()  # (*b, K, D) or (*b, K)
            if self.covariance_type == "spherical":
                scale = scale.unsqueeze(-1).expand_as(loc)
            offset = noise * scale.gather(-2, index)
        return means + offset


def _mean_and_scatter_counts(
    counts: torch.Tensor, stats: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The means' counts, the second moments' counts (*b, K) each and their ratio (None when
    they are the same: counts (*b, K) without a prior); ``counts`` (*b, K) or per statistic (*b, K, F)."""
    if counts.dim() < stats.dim():
        return counts, counts, None
    mean_counts, scatter_counts = counts[..., 0], counts[..., -1]
    return mean_counts, scatter_counts, mean_counts / scatter_counts


def _n_features_from_packed(n_stats: int) -> int:
    # n_stats = D + D (D + 1) / 2  =>  D^2 + 3 D - 2 n_stats = 0
    return int(round((-3 + math.sqrt(9 + 8 * n_stats)) / 2))
