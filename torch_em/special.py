"""Special functions that torch lacks: modified Bessel functions of the first kind of real order.

    log_bessel_iv(order, x)            = log I_nu(x)
    log_bessel_iv_over_power(order, x) = log(I_nu(x) / x^nu)     (finite as x -> 0)
    bessel_ratio(order, x)             = I_{nu+1}(x) / I_nu(x)
    bessel_ratio_and_derivative(order, x) -> (ratio, d ratio / dx)

for real orders ``nu >= 0`` and ``x >= 0``, in float32 and float64, for small and large arguments
and large orders (``nu = D/2 - 1`` of a von Mises-Fisher distribution on ``S^(D-1)``, e.g. D up
to several thousand). All are differentiable with respect to ``x`` (not the order), with the exact
derivatives

    d/dx log I_nu(x)          = I_{nu+1}(x)/I_nu(x) + nu/x
    d/dx log(I_nu(x) / x^nu)  = I_{nu+1}(x)/I_nu(x)
    d/dx R_nu(x)              = 1 - R_nu^2 - (2 nu + 1) R_nu / x      (R_nu = I_{nu+1}/I_nu)

the last one evaluated in a form that does not cancel for large ``x`` (see below). The
functions compute in float64 (float32 on devices without it) and return the input's dtype; a
float32 result is the float64 value rounded, so it is as accurate as float32 allows.

Method (one vectorised pass that yields ``log I_nu`` and ``R_nu`` together; no Python loop over
elements):

* ``x^2 / 4 <= 4 (nu + 1)``: the power series
  ``I_nu(x) = (x/2)^nu / Gamma(nu+1) * sum_k (x^2/4)^k / (k! (nu+1)_k)``. Every term is positive
  (no cancellation) and the k-th term is at most ``4^k / k!``, so ``SERIES_TERMS = 36`` terms
  leave a relative remainder below ``4^36 / 36! ~ 1e-20``. The sum minus its leading 1 is kept
  separately (``log1p``) so that ``log I_0(x) ~ x^2/4`` keeps its relative accuracy as x -> 0.
  ``R_nu`` is the quotient of the series of orders ``nu + 1`` and ``nu``.
* otherwise: Debye's uniform asymptotic expansion (DLMF 10.41.3) at an order ``mu >= DEBYE_ORDER``,
  with ``h = sqrt(mu^2 + x^2)``, ``t = mu / h``::

      log I_mu(x) = h - mu asinh(mu / x) - log(2 pi h) / 2 + log sum_k u_k(t) / mu^k

  (``u_k`` are Debye's polynomials, generated exactly from their recurrence DLMF 10.41.10 at
  import time, ``DEBYE_TERMS`` of them) and its exact x-derivative for the ratio::

      R_mu(x) = x / (h + mu) - (x / h^2) (1/2 + t S'(t) / S(t)),   S = sum_k u_k(t) / mu^k.

  The expansion is uniform in ``x``; its error is governed by ``1/mu`` and is below 1e-15 for
  ``mu >= 16`` with 16 terms (measured against mpmath; the largest coefficient of ``u_16`` is
  ~3e16, so rounding in the polynomials adds less than 1e-18 after division by ``mu^16``).
  An order ``nu < DEBYE_ORDER`` is first raised by an integer ``m`` to ``mu = nu + m >= DEBYE_ORDER``
  and brought back down with the three-term recurrence run backwards,

      R_v = 1 / (2 (v + 1) / x + R_{v+1}),      log I_v = log I_{v+1} - log R_v,

  which is the numerically stable direction for ``I`` (the minimal solution): an error in the
  starting ratio is damped by a factor ``R_v^2 < 1`` per step, and every step combines positive
  numbers only (when only values are needed, the equivalent linear form
  ``y_v = 2 (v + 1) / x y_{v+1} + y_{v+2}`` for ``y_v = I_v / I_mu`` is run, one fused operation
  per order). Derivatives of ``R`` travel through the same recurrence,
  ``R_v' = R_v^2 (2 (v + 1) / x^2 - R_{v+1}')``, which (unlike the identity above, whose three
  terms cancel to ``O(1/x^2)``) stays accurate for large ``x``.

Measured maximum relative errors against scipy/mpmath are reported in the project's tests
(``tests/test_special.py``): about 1e-14 in float64 and float32 rounding (6e-8) in float32.
"""
from __future__ import annotations

import functools
import math
from fractions import Fraction
from numbers import Real
from typing import Union

import torch
from torch.autograd.function import once_differentiable

from ._tracing import cached_unless_traced

Order = Union[float, int, torch.Tensor]

#: Debye's expansion is used at orders at least this large (smaller ones are shifted up).
DEBYE_ORDER = 16
#: Number of Debye polynomials u_1 .. u_K used (u_0 = 1 is always included).
DEBYE_TERMS = 16
#: Terms of the power series after the leading 1.
SERIES_TERMS = 36
#: The power series is used where x^2/4 <= SERIES_LIMIT (nu + 1).
SERIES_LIMIT = 4.0

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


@functools.lru_cache(maxsize=None)
def _debye_polynomials(n_terms: int) -> tuple[dict[int, Fraction], ...]:
    """Debye's polynomials ``u_0 .. u_n`` as exact ``{power of t: coefficient}`` dictionaries:
    ``u_{k+1}(t) = t^2 (1 - t^2) u_k'(t) / 2 + (1/8) int_0^t (1 - 5 s^2) u_k(s) ds``."""
    polynomials = [{0: Fraction(1)}]
    for _ in range(n_terms):
        previous = polynomials[-1]
        new: dict[int, Fraction] = {}
        for power, coefficient in previous.items():
            if power > 0:
                slope = power * coefficient / 2
                new[power + 1] = new.get(power + 1, Fraction(0)) + slope
                new[power + 3] = new.get(power + 3, Fraction(0)) - slope
            new[power + 1] = new.get(power + 1, Fraction(0)) + coefficient / (8 * (power + 1))
            new[power + 3] = new.get(power + 3, Fraction(0)) - 5 * coefficient / (8 * (power + 3))
        polynomials.append({p: c for p, c in new.items() if c != 0})
    return tuple(polynomials)


@cached_unless_traced
def _debye_matrices(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Coefficients (J, K+1) of u_k, u_k' and u_k'' in powers t^0 .. t^(J-1), J = 3K + 1."""
    polynomials = _debye_polynomials(DEBYE_TERMS)
    n_powers = 3 * DEBYE_TERMS + 1
    values = torch.zeros(3, n_powers, DEBYE_TERMS + 1, dtype=torch.float64)
    for k, polynomial in enumerate(polynomials):
        for power, coefficient in polynomial.items():
            values[0, power, k] = float(coefficient)
            if power >= 1:
                values[1, power - 1, k] = float(power * coefficient)
            if power >= 2:
                values[2, power - 2, k] = float(power * (power - 1) * coefficient)
    values = values.to(device=device, dtype=dtype)
    return values[0], values[1], values[2]


def _work_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _check_order(order: Order, device: torch.device, dtype: torch.dtype) -> tuple[float | torch.Tensor, float]:
    """The order as a float or a work-dtype tensor, and its minimum. Raises ValueError."""
    if isinstance(order, torch.Tensor):
        if order.requires_grad:
            raise ValueError("order must not require grad: derivatives with respect to the order are not supported")
        if order.is_complex() or order.dtype == torch.bool:
            raise ValueError(f"order must be real, got dtype {order.dtype}")
        if order.dim() == 0:
            return _check_order(float(order), device, dtype)
        nu = order.to(device=device, dtype=dtype)
        smallest = float(nu.min()) if nu.numel() else 0.0
        if not bool(torch.isfinite(nu).all()) or smallest < 0:
            raise ValueError(f"order must be finite and >= 0, got minimum {smallest!r}")
        return nu, smallest
    if not isinstance(order, Real) or isinstance(order, bool) or not math.isfinite(order) or order < 0:
        raise ValueError(f"order must be a finite real number >= 0, got {order!r}")
    return float(order), float(order)


def _series(nu: float | torch.Tensor, x: torch.Tensor, need_derivative: bool):
    """Power series, for ``x^2/4 <= SERIES_LIMIT (nu + 1)``: (log(I_nu/x^nu), R_nu, R_nu' or None)."""
    q = (0.25 * x * x).unsqueeze(-1)  # (..., 1)
    k = torch.arange(1, SERIES_TERMS + 1, device=x.device, dtype=x.dtype)
    nu_ = nu.unsqueeze(-1) if isinstance(nu, torch.Tensor) else nu
    terms0 = torch.cumprod(q / (k * (nu_ + k)), -1)  # term k / term 0, k = 1..N, (..., N)
    terms1 = torch.cumprod(q / (k * (nu_ + 1 + k)), -1)  # the same for order nu + 1
    tail0, tail1 = terms0.sum(-1), terms1.sum(-1)  # series minus its leading 1
    nu_t = torch.as_tensor(nu, device=x.device, dtype=x.dtype)
    log_over_power = torch.log1p(tail0) - nu_t * math.log(2.0) - torch.lgamma(nu_t + 1)
    base = (1 + tail1) / ((1 + tail0) * (2 * (nu_t + 1)))  # R_nu / x
    ratio = x * base
    if not need_derivative:
        return log_over_power, ratio, None
    # d/dx log(series) = (2/x) E with E = sum_k k term_k / sum_k term_k.
    mean0 = (k * terms0).sum(-1) / (1 + tail0)
    mean1 = (k * terms1).sum(-1) / (1 + tail1)
    return log_over_power, ratio, base * (1 + 2 * (mean1 - mean0))


def _debye(mu: float | torch.Tensor, x: torch.Tensor, need_derivative: bool):
    """Debye's uniform expansion at order ``mu >= DEBYE_ORDER``, x > 0: (log I_mu, R_mu, R_mu')."""
    mu_t = torch.as_tensor(mu, device=x.device, dtype=x.dtype)
    h = torch.hypot(mu_t, x)
    t, u = mu_t / h, x / h  # t^2 + u^2 = 1
    coefficients, slopes, curvatures = _debye_matrices(x.device, x.dtype)
    powers = t.unsqueeze(-1) ** torch.arange(coefficients.shape[0], device=x.device, dtype=x.dtype)  # (..., J)
    inverse_orders = (1 / mu_t).unsqueeze(-1) ** torch.arange(DEBYE_TERMS + 1, device=x.device, dtype=x.dtype)
    inverse_orders = inverse_orders.expand(*powers.shape[:-1], DEBYE_TERMS + 1)
    S = ((powers @ coefficients) * inverse_orders).sum(-1)
    S1 = ((powers @ slopes) * inverse_orders).sum(-1) / S  # S'/S
    log_iv = h - mu_t * torch.asinh(mu_t / x) - _HALF_LOG_2PI - 0.5 * h.log() + S.log()
    G = 0.5 + t * S1
    ratio = u / (1 + t) - (u / h) * G
    if not need_derivative:
        return log_iv, ratio, None
    S2 = ((powers @ curvatures) * inverse_orders).sum(-1) / S  # S''/S
    dG = S1 + t * (S2 - S1 * S1)  # dG/dt; dt/dx = -t u / h
    derivative = t / (h + mu_t) - ((t - u) * (t + u) / (h * h)) * G + (t * u * u / (h * h)) * dG
    return log_iv, ratio, derivative


def _evaluate(order: Order, x: torch.Tensor, *, over_power: bool, need_derivative: bool):
    """(log I_nu(x) or log(I_nu(x)/x^nu), R_nu(x), R_nu'(x) or None) in the work dtype."""
    work = _work_dtype(x.device)
    nu, smallest = _check_order(order, x.device, work)
    x = x.detach().to(work)
    if isinstance(nu, torch.Tensor):
        x, nu = torch.broadcast_tensors(x, nu)
    in_series = x * x <= 4 * SERIES_LIMIT * (nu + 1)
    # Each branch sees only arguments inside its own domain (no inf/NaN in the unused one).
    x_series = torch.where(in_series, x, torch.zeros_like(x))
    x_debye = torch.where(in_series, torch.full_like(x, 4.0 * DEBYE_ORDER), x)

    s_log, s_ratio, s_derivative = _series(nu, x_series, need_derivative)

    shift = max(0, math.ceil(DEBYE_ORDER - smallest))  # raise every order by the same integer
    d_log, ratio, derivative = _debye(nu + shift, x_debye, need_derivative)
    if shift and need_derivative:
        # Ratios and their derivatives, order by order (orders v = nu + step - 1 down to nu).
        two_over_x = 2 / x_debye
        product = torch.ones_like(x_debye)
        for step in range(shift, 0, -1):
            a = two_over_x * (nu + step)  # 2 (v + 1) / x
            ratio = 1 / (a + ratio)
            product = product * ratio  # stays above ~(1/(2 DEBYE_ORDER))^shift: no underflow
            derivative = ratio * ratio * (a / x_debye - derivative)
        d_log = d_log - product.log()
    elif shift:
        # Values only: the same recurrence for y_v = I_v / I_mu, y_v = 2 (v + 1) / x y_{v+1} + y_{v+2}
        # (positive terms, one fused operation per order); y_nu <= (2 DEBYE_ORDER / 4 + 1)^shift.
        two_over_x = 2 / x_debye
        current, following = torch.ones_like(x_debye), ratio  # y_mu, y_{mu+1}
        for step in range(shift, 0, -1):
            if isinstance(nu, torch.Tensor):
                current, following = following + two_over_x * (nu + step) * current, current
            else:
                current, following = torch.addcmul(following, two_over_x, current, value=nu + step), current
        ratio = following / current
        d_log = d_log + current.log()
    nu_t = torch.as_tensor(nu, device=x.device, dtype=work)
    if over_power:
        d_log = d_log - nu_t * x_debye.log()
        log_value = torch.where(in_series, s_log, d_log)
    else:
        log_value = torch.where(in_series, s_log + torch.xlogy(nu_t, x_series), d_log)
    ratio = torch.where(in_series, s_ratio, ratio)
    if need_derivative:
        derivative = torch.where(in_series, s_derivative, derivative)
    return log_value, ratio, derivative


def _as_tensor(x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x, dtype=torch.get_default_dtype())
    if not x.is_floating_point():
        x = x.to(torch.get_default_dtype())
    return x


def _reduce(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return grad.sum_to_size(like.shape) if grad.shape != like.shape else grad


class _LogBesselIv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, order, over_power):
        value, ratio, _ = _evaluate(order, x, over_power=over_power, need_derivative=False)
        ctx.save_for_backward(x)
        ctx.order, ctx.over_power, ctx.ratio = order, over_power, ratio
        return value.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        order = ctx.order
        # With create_graph the ratio is recomputed differentiably (second derivatives work).
        ratio = bessel_ratio(order, x) if torch.is_grad_enabled() else ctx.ratio.to(x.dtype)
        slope = ratio
        if not ctx.over_power:
            if isinstance(order, torch.Tensor) and order.dim() > 0:
                nu = order.to(device=x.device, dtype=x.dtype)
                slope = slope + torch.where(nu == 0, torch.zeros_like(slope), nu / x)
            elif float(order) != 0:
                slope = slope + float(order) / x
        return _reduce(grad * slope, x), None, None


class _BesselRatio(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, order):
        _, ratio, derivative = _evaluate(order, x, over_power=True, need_derivative=True)
        ctx.derivative = derivative
        ctx.x_shape = x.shape
        return ratio.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        slope = ctx.derivative.to(grad.dtype)
        result = grad * slope
        return (result.sum_to_size(ctx.x_shape) if result.shape != ctx.x_shape else result), None


def log_bessel_iv(order: Order, x) -> torch.Tensor:
    """``log I_nu(x)``, the log of the modified Bessel function of the first kind.

    Args:
        order: ``nu >= 0``, a number or a tensor broadcastable against x (no gradient).
        x: ``x >= 0`` (``log I_nu(0)`` is 0 for nu = 0 and -inf otherwise; negative x gives NaN).

    Returns:
        A tensor of the broadcast shape in x's dtype, differentiable with respect to x with
        ``d/dx log I_nu(x) = I_{nu+1}(x)/I_nu(x) + nu/x`` (twice differentiable).
    """
    return _LogBesselIv.apply(_as_tensor(x), order, False)


def log_bessel_iv_over_power(order: Order, x) -> torch.Tensor:
    """``log(I_nu(x) / x^nu)``, finite down to x = 0 (limit ``-nu log 2 - lgamma(nu + 1)``).

    This is ``log I_nu(x) - nu log x`` without the cancellation of the two terms for small x
    (the von Mises-Fisher log-normaliser is ``-this - (D/2) log(2 pi)`` at ``nu = D/2 - 1``).
    Its derivative is ``I_{nu+1}(x)/I_nu(x)``.
    """
    return _LogBesselIv.apply(_as_tensor(x), order, True)


def bessel_ratio(order: Order, x) -> torch.Tensor:
    """``I_{nu+1}(x) / I_nu(x)`` for ``nu >= 0``, ``x >= 0`` (in [0, 1); the mean resultant length
    ``A_D(kappa)`` of a von Mises-Fisher distribution is ``bessel_ratio(D/2 - 1, kappa)``).
    Differentiable once with respect to x."""
    return _BesselRatio.apply(_as_tensor(x), order)


def bessel_ratio_and_derivative(order: Order, x) -> tuple[torch.Tensor, torch.Tensor]:
    """``(R_nu(x), d R_nu / dx)`` without autograd (e.g. for Newton's method), in x's dtype."""
    x = _as_tensor(x)
    _, ratio, derivative = _evaluate(order, x, over_power=True, need_derivative=True)
    return ratio.to(x.dtype), derivative.to(x.dtype)
