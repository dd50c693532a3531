"""Gamma components: D independent positive features per component.

Unconstrained parameters (``K`` components, ``D`` features, batch dims in front):

    log_shapes   (*b, K, D)   log of the shapes ``a``
    log_rates    (*b, K, D)   log of the rates ``b`` (inverse scales)

Exponential-family form::

    log p(x | a, b) = sum_d (a_d - 1) log x_d - b_d x_d + a_d log b_d - lgamma(a_d)
    T = [x, log x],   eta = [-b, a - 1],   c = sum_d a_d log b_d - lgamma(a_d),   h = 0

M-step. With ``m`` the weighted mean of x and ``s = log m - mean(log x) >= 0`` (Jensen), the
maximum-likelihood shape solves ``log a - digamma(a) = s``, which has no closed form, and then
``b = a / m``. The shape starts from the closed-form approximation
``a0 = (3 - s + sqrt((s - 3)^2 + 24 s)) / (12 s)`` (within 1.5 %) and takes
``NEWTON_ITERATIONS`` generalised Newton steps (Minka, "Estimating a Gamma distribution", 2002)::

    1/a <- 1/a + (log a - digamma(a) - s) / (a^2 (1/a - trigamma(a)))

which converge quadratically (three steps reach float64 precision from ``a0``; five are run). The update runs in
float64 (except on devices without it), and for large ``a`` the cancelling differences
``log a - digamma(a)`` and ``a - a^2 trigamma(a)`` use their asymptotic series. The shape is capped
at ``max_shape`` (default ``0.01 / eps`` of the dtype: about 8e4 in float32, 4.5e13 in float64),
which bounds the density of a component that collapses onto identical points; beyond it the
log-density's ``O(a)`` terms would cancel to less than ~1e-2 absolute accuracy anyway.

The initial clustering runs k-means on ``log x``: a scale family has the same spread there for
every scale.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from .._validation import check_magnitude, check_positive, check_positive_tensor, describe_bad_values, initial_tensor
from .base import ComponentFamily, Theta, average_features

#: Generalised Newton steps of the shape update (quadratic convergence from a 1.5 % start).
NEWTON_ITERATIONS = 5
#: Above this shape, log a - digamma(a) and a - a^2 trigamma(a) come from asymptotic series.
SERIES_THRESHOLD = 100.0


def _log_minus_digamma(a: torch.Tensor) -> torch.Tensor:
    """``log a - digamma(a)`` (positive, ~1/(2a)), accurate also where the difference cancels."""
    inv = a.clamp_min(SERIES_THRESHOLD).reciprocal()
    inv2 = inv * inv
    series = inv * (0.5 + inv * (1 / 12 - inv2 * (1 / 120 - inv2 / 252)))
    return torch.where(a > SERIES_THRESHOLD, series, a.log() - torch.digamma(a))


def _newton_slope(a: torch.Tensor) -> torch.Tensor:
    """``a - a^2 trigamma(a)`` = a^2 d/da (log a - digamma(a)) (negative, ~ -1/2)."""
    inv = a.clamp_min(SERIES_THRESHOLD).reciprocal()
    inv2 = inv * inv
    series = -0.5 - inv * (1 / 6 - inv2 * (1 / 30 - inv2 / 42))
    return torch.where(a > SERIES_THRESHOLD, series, a - a * a * torch.polygamma(1, a))


def gamma_shape_mle(log_ratio: torch.Tensor, max_shape: float) -> torch.Tensor:
    """Maximum-likelihood Gamma shape from ``s = log(mean x) - mean(log x)``, elementwise.

    Solves ``log a - digamma(a) = s`` by Minka's generalised Newton iteration from the
    closed-form start; ``s`` is clamped to at least ``1 / (2 max_shape)`` and the shape to
    ``[tiny, max_shape]``.
    """
    s = log_ratio.clamp_min(0.5 / max_shape)
    root = ((s - 3).square() + 24 * s).sqrt()
    # Two algebraically equal forms of a0, each free of cancellation on its side of s = 3.
    shape = torch.where(s < 3, (3 - s + root) / (12 * s), 2 / (s - 3 + root))
    tiny = torch.finfo(shape.dtype).tiny
    for _ in range(NEWTON_ITERATIONS):
        inverse = shape.reciprocal() + (_log_minus_digamma(shape) - s) / _newton_slope(shape)
        shape = inverse.reciprocal().clamp(tiny, max_shape)
    return shape


#: Newton steps of the inverse digamma (quadratic convergence from Minka's start).
INVERSE_DIGAMMA_ITERATIONS = 8


def inverse_digamma(y: torch.Tensor) -> torch.Tensor:
    """``a > 0`` with ``digamma(a) = y``, elementwise (Minka's start, then Newton steps)."""
    euler = 0.5772156649015329  # -digamma(1)
    shape = torch.where(y >= -2.22, y.clamp_max(700).exp() + 0.5, -1 / (y - euler))
    for _ in range(INVERSE_DIGAMMA_ITERATIONS):
        shape = (shape - (torch.digamma(shape) - y) / torch.polygamma(1, shape)).clamp_min(torch.finfo(y.dtype).tiny)
    return shape


def standard_gamma(shape: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Draws from Gamma(shape, 1), elementwise, using ``generator``.

    Marsaglia & Tsang's rejection sampler (acceptance >= 95 %, so few rounds); shapes below 1 use
    ``Gamma(a) = Gamma(a + 1) U^(1/a)``. Draws are clamped to the smallest normal number so they
    stay in the support (tiny shapes can underflow).
    """
    flat = shape.reshape(-1)
    options: dict[str, Any] = {"generator": generator, "device": flat.device, "dtype": flat.dtype}
    boost = flat < 1
    d = torch.where(boost, flat + 1, flat) - 1 / 3
    c = (9 * d).rsqrt()
    out = torch.empty_like(flat)
    pending = torch.arange(flat.numel(), device=flat.device)
    while pending.numel() > 0:
        dd, cc = d[pending], c[pending]
        z = torch.randn(dd.shape, **options)
        u = torch.rand(dd.shape, **options)
        v = (1 + cc * z).pow(3)
        log_v = v.clamp_min(torch.finfo(v.dtype).tiny).log()
        accept = (v > 0) & (u.log() < 0.5 * z * z + dd - dd * v + dd * log_v)
        out[pending[accept]] = (dd * v)[accept]
        pending = pending[~accept]
    if bool(boost.any()):
        u = torch.rand(flat.shape, **options)
        out = torch.where(boost, out * u.pow(flat.reciprocal()), out)
    return out.clamp_min(torch.finfo(out.dtype).tiny).view(shape.shape)


class Gamma(ComponentFamily):
    """Components that are products of D independent Gamma distributions (shape, rate).

    Args:
        shapes_init, rates_init: initial shapes and rates, each ``(K, D)`` or
            ``(*batch_shape, K, D)``, positive. Either may be given alone (the other then comes
            from the initial clustering).
        max_shape: cap on the fitted shapes (default ``0.01 / eps`` of the model's dtype).

    Shape:
        X: ``(N, D)`` or ``(*batch_shape, N, D)`` of positive reals.
        parameters: ``log_shapes``, ``log_rates`` ``(*batch_shape, K, D)``; :meth:`shapes` and
        :meth:`rates` give the constrained values.
    """

    def __init__(self, *, shapes_init: Any = None, rates_init: Any = None, max_shape: float | None = None) -> None:
        if max_shape is not None:
            check_positive(max_shape, "max_shape")
        self.shapes_init = shapes_init
        self.rates_init = rates_init
        self.max_shape = max_shape

    # --- parameter layout -------------------------------------------------------------------
    def event_shapes(self, n_components: int, n_features: int) -> dict[str, tuple[int, ...]]:
        return {"log_shapes": (n_components, n_features), "log_rates": (n_components, n_features)}

    def n_free_parameters(self, n_components: int, n_features: int) -> int:
        return 2 * n_components * n_features

    def n_statistics(self, n_features: int) -> int:
        return 2 * n_features

    def default_parameters(self, batch_shape, n_components, n_features, generator, device, dtype) -> Theta:
        # Shapes spread around 2 (unimodal, not degenerate), rates around 1.
        shape = (*batch_shape, n_components, n_features)
        log_shapes = 0.5 * torch.randn(shape, generator=generator, device=device, dtype=dtype) + 0.7
        log_rates = 0.5 * torch.randn(shape, generator=generator, device=device, dtype=dtype)
        return {"log_shapes": log_shapes, "log_rates": log_rates}

    def user_initial_parameters(self, batch_shape, n_components, n_features, device, dtype) -> Theta:
        theta: Theta = {}
        for name, value, key in (("shapes_init", self.shapes_init, "log_shapes"), ("rates_init", self.rates_init, "log_rates")):
            if value is not None:
                tensor = initial_tensor(value, name, (n_components, n_features), batch_shape, device, dtype)
                check_positive_tensor(tensor, name)
                theta[key] = tensor.log()
        return theta

    def shape_cap(self, dtype: torch.dtype) -> float:
        """The largest shape an M-step returns."""
        return self.max_shape if self.max_shape is not None else 1e-2 / torch.finfo(dtype).eps

    # --- data --------------------------------------------------------------------------------
    def check_domain(self, X: torch.Tensor, name: str) -> None:
        bad = X <= 0
        if bool(bad.any()):
            raise ValueError(f"{name} must be positive for Gamma components, got {describe_bad_values(X, bad)}")
        check_magnitude(X, name, power=1, what="the sums")

    def embedding(self, X: torch.Tensor, reference: torch.Tensor | None) -> torch.Tensor:
        return X.log()

    def features(self, X: torch.Tensor, reference: torch.Tensor | None) -> tuple[torch.Tensor, None]:
        return torch.cat([X, X.log()], dim=-1), None  # (..., n, 2D)

    # --- constrained views -------------------------------------------------------------------
    def shapes(self, theta: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Shapes ``(*batch, K, D)``."""
        return theta["log_shapes"].exp()

    def rates(self, theta: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Rates ``(*batch, K, D)``."""
        return theta["log_rates"].exp()

    def mean(self, theta: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Component means ``shape / rate``, ``(*batch, K, D)``."""
        return (theta["log_shapes"] - theta["log_rates"]).exp()

    # --- EM ----------------------------------------------------------------------------------
    def natural_parameters(self, theta, reference) -> tuple[torch.Tensor, torch.Tensor]:
        log_shapes, log_rates = theta["log_shapes"], theta["log_rates"]  # (*b, K, D)
        shapes = log_shapes.exp()
        eta = torch.cat([-log_rates.exp(), shapes - 1], dim=-1)  # (*b, K, 2D)
        return eta, (shapes * log_rates - torch.lgamma(shapes)).sum(-1)

    #: log 1 = 0: a missing entry read as 1 has finite features (then masked out).
    missing_fill = 1.0

    def coordinate_of_statistics(self, n_features: int) -> torch.Tensor:
        return torch.arange(n_features).repeat(2)  # [x, log x]

    def coordinate_log_normalisers(self, theta) -> torch.Tensor:
        shapes = theta["log_shapes"].exp()
        return shapes * theta["log_rates"] - torch.lgamma(shapes)

    def expected_features(self, theta) -> torch.Tensor:
        # E[x] = a / b, E[log x] = digamma(a) - log b.
        shapes = theta["log_shapes"].exp()
        return torch.cat([self.mean(theta), torch.digamma(shapes) - theta["log_rates"]], -1)

    def m_step(self, counts, stats, reference) -> tuple[Theta, torch.Tensor]:
        dtype = stats.dtype
        work = stats.dtype if stats.device.type == "mps" else torch.float64  # a (K, D) problem: cheap
        n_features = stats.shape[-1] // 2
        n = counts.to(work).unsqueeze(-1)  # (*b, K, 1)
        mean = (stats[..., :n_features].to(work) / n).clamp_min(torch.finfo(work).tiny)  # (*b, K, D)
        mean_log = stats[..., n_features:].to(work) / n
        log_mean = mean.log()
        shapes = gamma_shape_mle(log_mean - mean_log, self.shape_cap(dtype))
        log_shapes = shapes.log()
        log_shapes, log_rates = log_shapes.to(dtype), (log_shapes - log_mean).to(dtype)
        valid = (torch.isfinite(log_shapes) & torch.isfinite(log_rates)).all(-1)
        return {"log_shapes": log_shapes, "log_rates": log_rates}, valid

    def supports_fixing(self, names: set[str]) -> bool:
        return True

    def conditional_m_step(self, counts, stats, reference, fixed) -> tuple[Theta, torch.Tensor]:
        # Given shapes a: rate b = a n / sum x (closed form). Given rates b: the shape solves
        # digamma(a) = log b + mean(log x), by Newton steps on the inverse digamma.
        if len(fixed) != 1:
            return super().conditional_m_step(counts, stats, reference, fixed)
        dtype, work = stats.dtype, (stats.dtype if stats.device.type == "mps" else torch.float64)
        n_features = stats.shape[-1] // 2
        n = counts.to(work).unsqueeze(-1)  # (*b, K, 1)
        log_mean = (stats[..., :n_features].to(work) / n).clamp_min(torch.finfo(work).tiny).log()  # (*b, K, D)
        if "log_shapes" in fixed:
            log_shapes = fixed["log_shapes"].to(work).expand_as(log_mean)
            log_rates = log_shapes - log_mean
        else:
            log_rates = fixed["log_rates"].to(work).expand_as(log_mean)
            mean_log = stats[..., n_features:].to(work) / n
            log_shapes = inverse_digamma(log_rates + mean_log).clamp_max(self.shape_cap(dtype)).log()
        theta = {"log_shapes": log_shapes.to(dtype), "log_rates": log_rates.to(dtype)}
        valid = (torch.isfinite(theta["log_shapes"]) & torch.isfinite(theta["log_rates"])).all(-1)
        return theta, valid

    def invalid_component_advice(self) -> str:
        return "its shape or rate is not finite; check the data, rescale it or use float64"

    def reseed_statistics(self, point_features, counts, sums, empty) -> torch.Tensor:
        # One pseudo-point at the worst-explained point x* that carries the data's overall
        # log-ratio: T(x*) + mean T - T(mean x) = [x*, log x* + mean(log x) - log(mean x)], so the
        # new component has mean x* and the overall shape (one exact point would give s = 0).
        mean_features = average_features(counts, sums)
        n_features = point_features.shape[-1] // 2
        overall_mean = mean_features[..., :n_features]
        return point_features + mean_features - self.features(overall_mean, None)[0]

    def sample(self, theta, labels, generator) -> torch.Tensor:
        shapes, rates = self.shapes(theta), self.rates(theta)  # (*b, K, D)
        index = labels.unsqueeze(-1).expand(*labels.shape, shapes.shape[-1])
        return standard_gamma(shapes.gather(-2, index), generator) / rates.gather(-2, index)  # (*b, n, D)
