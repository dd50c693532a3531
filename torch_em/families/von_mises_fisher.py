"""Von Mises-Fisher components: directions on the unit sphere ``S^(D-1)`` (normalised embeddings).

Unconstrained parameters (``K`` components, ``D`` features, batch dims in front):

    direction          (*b, K, D)   any non-zero vector; the mean direction is ``mu = direction / |direction|``
    log_concentration  (*b, K)      log of the concentration ``kappa > 0``

Exponential-family form, with ``nu = D/2 - 1``::

    log p(x | mu, kappa) = kappa mu . x + log C_D(kappa)
    log C_D(kappa) = nu log kappa - (D/2) log(2 pi) - log I_nu(kappa)
    T = x,   eta = kappa mu,   c = log C_D(kappa),   h = 0

``log C_D`` is evaluated as ``-log(I_nu(kappa) / kappa^nu) - (D/2) log(2 pi)``
(:func:`torch_em.special.log_bessel_iv_over_power`), which has no cancellation for small
``kappa`` and tends to ``-log |S^(D-1)|`` (the uniform density) as ``kappa -> 0``; its gradient
``d c / d kappa = -A_D(kappa)`` is exact.

M-step. With the weighted resultant ``S = sum_n r_nk x_n`` and ``n_k = sum_n r_nk``, the maximiser
is ``mu = S / |S|`` and the ``kappa`` that solves ``A_D(kappa) = rbar`` with ``rbar = |S| / n_k`` and
``A_D(kappa) = I_{D/2}(kappa) / I_{D/2-1}(kappa)`` (the mean resultant length of the
distribution). It has no closed form: ``kappa`` starts from the approximation of Banerjee et al.
(2005), ``rbar (D - rbar^2) / (1 - rbar^2)`` (it over-estimates, by at most ~7 % at D = 2 and
less for larger D), and takes ``NEWTON_ITERATIONS`` vectorised Newton steps on
``A_D(kappa) - rbar`` with the exact derivative ``A_D'`` from
:func:`torch_em.special.bessel_ratio_and_derivative` (computed without the cancellation of the
identity ``A' = 1 - A^2 - (D - 1) A / kappa`` at large kappa). ``A_D`` is increasing and concave,
so after the first step the iterates approach the root monotonically from below; convergence is
quadratic (four steps reach the precision that ``rbar`` itself allows in float64, about
``eps / (1 - rbar)`` relative). The update runs in float64 (except on devices without it).
``kappa`` is capped at ``max_concentration`` (default ``0.01 / eps`` of the dtype times
``max(1, (D - 1)/2)``: about ``8e4 (D - 1)/2`` in float32), which bounds the density of a
component collapsing onto identical points; beyond it the ``O(kappa)`` terms of the log-density
cancel to less than ~1e-2 per dimension of accuracy anyway.

Sampling uses Wood's (1994) rejection algorithm for the component ``w = mu . x`` (batched over all
draws; rejected draws are redrawn until all are accepted; the acceptance rate is high for every
``kappa`` and D) and a tangent direction uniform on the sphere orthogonal to ``mu``, taken as the
normalised projection of a standard normal vector: the same distribution as rotating a uniform
tangent vector with a Householder reflection that maps ``e_1`` to ``mu``, without that
reflection's special case at ``mu = e_1``.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, cast

import torch
import torch.nn.functional as F

from .._validation import check_positive, check_positive_tensor, initial_tensor
from ..special import bessel_ratio_and_derivative, log_bessel_iv_over_power
from .base import ComponentFamily, Theta
from .gamma import standard_gamma

#: Newton steps of the concentration update (quadratic convergence from Banerjee's start).
NEWTON_ITERATIONS = 4


def unit_norm_tolerance(dtype: torch.dtype) -> float:
    """How far ``|x|`` may be from 1: ``max(1e-5, 1000 eps)`` (1.2e-4 in float32, 1e-5 in float64,
    which accepts data normalised in float32 and then converted)."""
    return max(1e-5, 1000 * torch.finfo(dtype).eps)


def _order(n_features: int) -> float:
    return n_features / 2 - 1


def _check_dimension(n_features: int) -> None:
    if n_features < 2:
        raise ValueError(
            f"VonMisesFisher components need unit vectors with D >= 2 features, got D={n_features}"
        )


def concentration_mle(mean_length: torch.Tensor, n_features: int, max_concentration: float) -> torch.Tensor:
    """Maximum-likelihood ``kappa`` with ``A_D(kappa) = mean_length`` (elementwise), in
    ``[tiny, max_concentration]``: Banerjee et al.'s start and Newton steps (see the module)."""
    nu = _order(n_features)
    tiny = torch.finfo(mean_length.dtype).tiny
    r = mean_length.clamp(0, 1)
    one_minus_r2 = ((1 - r) * (1 + r)).clamp_min(tiny)
    kappa = (r * (n_features - r * r) / one_minus_r2).clamp(tiny, max_concentration)
    for _ in range(NEWTON_ITERATIONS):
        value, slope = bessel_ratio_and_derivative(nu, kappa)
        step = (value - r) / slope.clamp_min(tiny)
        # A_D is concave: a step from the right of the root lands left of it, never past zero
        # for a sensible start; the floor at kappa/2 only guards against a wild first step.
        kappa = torch.maximum(kappa - step, 0.5 * kappa).clamp(tiny, max_concentration)
    return kappa


def wood_sample(kappa: torch.Tensor, n_features: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``w = mu . x`` for ``x ~ vMF(mu, kappa)`` on ``S^(D-1)``, one draw per element of kappa.

    Wood (1994): with ``m = D - 1``, ``b = (-2 kappa + sqrt(4 kappa^2 + m^2)) / m`` and
    ``x0 = (1 - b) / (1 + b)``, propose ``w = (1 - (1 + b) z) / (1 - (1 - b) z)`` with
    ``z ~ Beta(m/2, m/2)`` and accept if ``kappa (w - x0) + m log((1 - x0 w) / (1 - x0^2)) >= log u``.
    All differences are formed without cancellation (``1 - x0 = 2b/(1+b)``, ``1 - w = 2bz/(1-(1-b)z)``),
    so very large kappa keep their accuracy. Returns ``w`` and ``1 - w``, both shaped like kappa.
    """
    flat = kappa.reshape(-1)
    options: dict[str, Any] = {"generator": generator, "device": flat.device, "dtype": flat.dtype}
    m = n_features - 1
    b = m / (2 * flat + torch.sqrt(4 * flat * flat + m * m))  # (-2k + sqrt(4k^2 + m^2)) / m, stable
    x0 = (1 - b) / (1 + b)
    gap = 2 * b / (1 + b)  # 1 - x0
    log_one_minus_x0_squared = gap.log() + torch.log1p(x0)
    w = torch.empty_like(flat)
    one_minus_w = torch.empty_like(flat)
    pending = torch.arange(flat.numel(), device=flat.device)
    half = torch.full((1,), m / 2, device=flat.device, dtype=flat.dtype)
    while pending.numel() > 0:
        bb, kk, xx, gg = b[pending], flat[pending], x0[pending], gap[pending]
        g1 = standard_gamma(half.expand(pending.numel()), generator)
        g2 = standard_gamma(half.expand(pending.numel()), generator)
        z = g1 / (g1 + g2)  # Beta(m/2, m/2)
        denominator = 1 - (1 - bb) * z
        tail = 2 * bb * z / denominator  # 1 - w
        u = torch.rand(pending.shape, **options)
        # w - x0 = gap - tail;  1 - x0 w = gap + x0 tail.
        log_accept = kk * (gg - tail) + m * ((gg + xx * tail).log() - log_one_minus_x0_squared[pending])
        accept = log_accept >= u.log()
        w[pending[accept]] = 1 - tail[accept]
        one_minus_w[pending[accept]] = tail[accept]
        pending = pending[~accept]
    return w.view(kappa.shape), one_minus_w.view(kappa.shape)


class VonMisesFisher(ComponentFamily):
    """Von Mises-Fisher components on the unit sphere ``S^(D-1)`` (data: unit vectors, D >= 2).

    Args:
        directions_init: initial mean directions ``(K, D)`` or ``(*batch_shape, K, D)``, non-zero
            (normalised here). They also seed the initial assignment of points.
        concentrations_init: initial concentrations ``(K,)`` or ``(*batch_shape, K)``, positive.
        max_concentration: cap on fitted concentrations (default ``0.01 / eps`` of the dtype times
            ``max(1, (D - 1)/2)``).

    Shape:
        X: ``(N, D)`` or ``(*batch_shape, N, D)``, rows of unit norm (within
        :func:`unit_norm_tolerance`).
        parameters: ``direction (*batch_shape, K, D)``, ``log_concentration (*batch_shape, K)``;
        :meth:`mean_direction` and :meth:`concentration` give ``mu`` and ``kappa``.
    """

    def __init__(
        self, *, directions_init: Any = None, concentrations_init: Any = None, max_concentration: float | None = None,
    ) -> None:
        if max_concentration is not None:
            check_positive(max_concentration, "max_concentration")
        self.directions_init = directions_init
        self.concentrations_init = concentrations_init
        self.max_concentration = max_concentration

    # --- parameter layout -------------------------------------------------------------------
    def event_shapes(self, n_components: int, n_features: int) -> dict[str, tuple[int, ...]]:
        return {"direction": (n_components, n_features), "log_concentration": (n_components,)}

    def n_free_parameters(self, n_components: int, n_features: int) -> int:
        return n_components * n_features  # (D - 1) for the direction plus 1 for kappa, per component

    def n_statistics(self, n_features: int) -> int:
        return n_features

    def default_parameters(self, batch_shape, n_components, n_features, generator, device, dtype) -> Theta:
        _check_dimension(n_features)
        direction = torch.randn(*batch_shape, n_components, n_features, generator=generator, device=device, dtype=dtype)
        direction = F.normalize(direction, dim=-1)
        # kappa = D: moderately concentrated (mean resultant length ~ 0.6-0.9), not degenerate.
        log_concentration = torch.full((*batch_shape, n_components), math.log(n_features), device=device, dtype=dtype)
        return {"direction": direction, "log_concentration": log_concentration}

    def user_initial_parameters(self, batch_shape, n_components, n_features, device, dtype) -> Theta:
        theta: Theta = {}
        if self.directions_init is not None:
            theta["direction"] = cast(torch.Tensor, self.initial_centres(  # set: directions_init is
                batch_shape, n_components, n_features, device, dtype))
        if self.concentrations_init is not None:
            kappa = initial_tensor(self.concentrations_init, "concentrations_init", (n_components,), batch_shape, device, dtype)
            check_positive_tensor(kappa, "concentrations_init")
            theta["log_concentration"] = kappa.log()
        return theta

    def initial_centres(self, batch_shape, n_components, n_features, device, dtype) -> torch.Tensor | None:
        if self.directions_init is None:
            return None
        _check_dimension(n_features)
        direction = initial_tensor(self.directions_init, "directions_init", (n_components, n_features), batch_shape, device, dtype)
        norms = direction.norm(dim=-1)
        if bool((norms == 0).any()):
            raise ValueError(f"directions_init must hold non-zero vectors, got {int((norms == 0).sum())} zero row(s)")
        return direction / norms.unsqueeze(-1)

    def concentration_cap(self, n_features: int, dtype: torch.dtype) -> float:
        """The largest concentration an M-step returns."""
        if self.max_concentration is not None:
            return float(self.max_concentration)
        return 1e-2 / torch.finfo(dtype).eps * max(1.0, (n_features - 1) / 2)

    # --- data --------------------------------------------------------------------------------
    def check_missing(self, name: str) -> None:
        raise ValueError(f"{name} has missing values (NaN), but a coordinate of a von Mises-Fisher observation cannot be "
                         "missing alone: the unit norm ties it to the observed ones (its conditional distribution is "
                         "not a von Mises-Fisher one); remove or complete the rows with missing entries")

    def check_domain(self, X: torch.Tensor, name: str) -> None:
        _check_dimension(X.shape[-1])
        norms = X.norm(dim=-1)
        tolerance = unit_norm_tolerance(X.dtype)
        bad = (norms - 1).abs() > tolerance
        if bool(bad.any()):
            raise ValueError(
                f"{name} must hold unit vectors (rows of norm 1 within {tolerance:.1e} for {X.dtype}) for "
                f"VonMisesFisher components, got {int(bad.sum())} row(s) with norms in "
                f"[{norms.min().item():.6g}, {norms.max().item():.6g}]; normalise the rows, e.g. "
                "X / X.norm(dim=-1, keepdim=True)"
            )

    def features(self, X: torch.Tensor, reference: torch.Tensor | None) -> tuple[torch.Tensor, None]:
        return X, None

    # --- constrained views -------------------------------------------------------------------
    def mean_direction(self, theta: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Unit mean directions ``mu`` ``(*batch, K, D)``."""
        return F.normalize(theta["direction"], dim=-1)

    def concentration(self, theta: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Concentrations ``kappa`` ``(*batch, K)``."""
        return theta["log_concentration"].exp()

    def log_normaliser(self, theta: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``log C_D(kappa)`` ``(*batch, K)``."""
        n_features = theta["direction"].shape[-1]
        kappa = self.concentration(theta)
        return -log_bessel_iv_over_power(_order(n_features), kappa) - n_features / 2 * math.log(2 * math.pi)

    def mean_resultant_length(self, theta: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``A_D(kappa) = E|mu . x|`` ``(*batch, K)``."""
        n_features = theta["direction"].shape[-1]
        return bessel_ratio_and_derivative(_order(n_features), self.concentration(theta))[0]

    # --- EM ----------------------------------------------------------------------------------
    def natural_parameters(self, theta, reference) -> tuple[torch.Tensor, torch.Tensor]:
        eta = self.concentration(theta).unsqueeze(-1) * self.mean_direction(theta)  # (*b, K, D)
        return eta, self.log_normaliser(theta)

    def m_step(self, counts, stats, reference) -> tuple[Theta, torch.Tensor]:
        dtype = stats.dtype
        work = stats.dtype if stats.device.type == "mps" else torch.float64  # a (K, D) problem: cheap
        n_features = stats.shape[-1]
        sums = stats.to(work)  # (*b, K, D)
        length = sums.norm(dim=-1)  # (*b, K)
        fallback = torch.zeros_like(sums)
        fallback[..., 0] = 1  # a zero resultant has no direction: any unit vector is a maximiser
        direction = torch.where((length > 0).unsqueeze(-1), sums / length.clamp_min(torch.finfo(work).tiny).unsqueeze(-1), fallback)
        mean_length = length / counts.to(work)
        kappa = concentration_mle(mean_length, n_features, self.concentration_cap(n_features, dtype))
        direction, log_concentration = direction.to(dtype), kappa.log().to(dtype)
        valid = torch.isfinite(log_concentration) & torch.isfinite(direction).all(-1)
        return {"direction": direction, "log_concentration": log_concentration}, valid

    def supports_fixing(self, names: set[str]) -> bool:
        return True

    def conditional_m_step(self, counts, stats, reference, fixed) -> tuple[Theta, torch.Tensor]:
        # The direction's maximiser, the normalised resultant, does not depend on kappa. Given a
        # fixed direction mu, kappa solves A_D(kappa) = max(S . mu, 0) / n.
        theta, valid = super().conditional_m_step(counts, stats, reference, fixed)
        if "direction" in fixed and "log_concentration" not in fixed:
            dtype, work = stats.dtype, (stats.dtype if stats.device.type == "mps" else torch.float64)
            n_features = stats.shape[-1]
            mu = F.normalize(fixed["direction"].to(work), dim=-1)
            projected = (stats.to(work) * mu).sum(-1).clamp_min(0) / counts.to(work)  # (*b, K)
            kappa = concentration_mle(projected, n_features, self.concentration_cap(n_features, dtype))
            theta["log_concentration"] = kappa.log().to(dtype)
            valid = valid & torch.isfinite(theta["log_concentration"])
        return theta, valid

    def invalid_component_advice(self) -> str:
        return "its direction or concentration is not finite; check that the rows of X are unit vectors, or use float64"

    def reseed_statistics(self, point_features, counts, sums, empty) -> torch.Tensor:
        # One pseudo-point along the chosen data point x* with the pooled mean resultant length
        # of the kept components, sum_k |S_k| / sum_k n_k: the new component points at x* and is
        # as concentrated as a typical component (halfway to the data mean could cancel to ~0).
        kept = (~empty).to(counts.dtype)
        pooled = (sums.norm(dim=-1) * kept).sum(-1, keepdim=True) / (counts * kept).sum(-1, keepdim=True)  # (*b, 1)
        pooled = torch.nan_to_num(pooled, nan=0.5).clamp(0, 1)  # every component empty: moderate
        return point_features * pooled.unsqueeze(-1)

    def sample(self, theta, labels, generator) -> torch.Tensor:
        mu = self.mean_direction(theta)  # (*b, K, D)
        kappa = self.concentration(theta)  # (*b, K)
        dtype = mu.dtype
        work = dtype if mu.device.type == "mps" else torch.float64
        n_features = mu.shape[-1]
        index = labels.unsqueeze(-1).expand(*labels.shape, n_features)
        means = mu.gather(-2, index).to(work)  # (*b, n, D)
        w, one_minus_w = wood_sample(kappa.gather(-1, labels).to(work), n_features, generator)  # (*b, n)
        noise = torch.randn(means.shape, generator=generator, device=mu.device, dtype=work)
        tangent = F.normalize(noise - (noise * means).sum(-1, keepdim=True) * means, dim=-1)
        radial = torch.sqrt((one_minus_w * (1 + w)).clamp_min(0))  # sqrt(1 - w^2)
        return (w.unsqueeze(-1) * means + radial.unsqueeze(-1) * tangent).to(dtype)
