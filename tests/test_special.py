"""torch_em.special: log I_nu(x), log(I_nu(x)/x^nu), I_{nu+1}/I_nu and its derivative against scipy
(log ive + x) over a grid of orders and arguments including extremes, against mpmath where scipy
under/overflows or is itself inaccurate, and gradients by gradcheck."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import special as scipy_special
from torch.autograd import gradcheck, gradgradcheck

from torch_em.special import (
    bessel_ratio,
    bessel_ratio_and_derivative,
    log_bessel_iv,
    log_bessel_iv_over_power,
)

ORDERS = np.array([0, 0.5, 1, 1.5, 2, 3.7, 9.5, 15.5, 16, 19.5, 24, 49.5, 100, 255, 511, 1023])
ARGUMENTS = np.concatenate([
    np.logspace(-10, 6, 161),
    2 * np.sqrt(ORDERS + 1),  # around the series / asymptotic switch (x^2/4 = 4 (nu + 1)) and nearby
    4 * np.sqrt(ORDERS + 1) * (1 - 1e-12), 4 * np.sqrt(ORDERS + 1) * (1 + 1e-12),
    [0.7, 3.0, 4.0, 7.5, 33.0, 700.5],
])


def _grid(dtype=np.float64):
    nu, x = np.meshgrid(ORDERS, ARGUMENTS.astype(dtype).astype(np.float64), indexing="ij")
    return nu, x


def _scipy_log_iv(nu, x):
    """log I_nu(x) = log(ive) + x where ive is a normal float, else NaN (not comparable)."""
    ive = scipy_special.ive(nu, x)
    ok = np.isfinite(ive) & (ive > 1e-290)
    return np.where(ok, np.log(np.where(ok, ive, 1.0)) + x, np.nan)


def _relative_error(got, ref):
    """|got - ref| / max(1, |ref|): relative error of log I, or of I itself where |log I| < 1."""
    err = np.abs(got - ref) / np.maximum(1.0, np.abs(ref))
    return np.nanmax(err)


def test_log_bessel_iv_matches_scipy_float64():
    nu, x = _grid()
    ref = _scipy_log_iv(nu, x)
    assert np.isfinite(ref).mean() > 0.8  # the comparison covers most of the grid
    got = log_bessel_iv(torch.tensor(nu), torch.tensor(x)).numpy()
    # scipy itself is off by up to ~3e-14 here (checked against mpmath in the next test).
    assert _relative_error(got, ref) < 5e-14


def test_log_bessel_iv_float32_is_the_rounded_value():
    nu, x = _grid(np.float32)
    ref = _scipy_log_iv(nu, x)
    got = log_bessel_iv(torch.tensor(nu, dtype=torch.float32), torch.tensor(x, dtype=torch.float32))
    assert got.dtype == torch.float32
    assert _relative_error(got.double().numpy(), ref) < 1.2e-7  # one float32 rounding: 6e-8


def test_bessel_ratio_matches_scipy():
    nu, x = _grid()
    i0, i1 = scipy_special.ive(nu, x), scipy_special.ive(nu + 1, x)
    ok = (i0 > 1e-290) & (i1 > 1e-290)
    ref = np.where(ok, i1 / np.where(ok, i0, 1), np.nan)
    got = bessel_ratio(torch.tensor(nu), torch.tensor(x)).numpy()
    assert np.nanmax(np.abs(got - ref) / ref) < 1e-12  # scipy's own error reaches ~3e-13 at large orders
    got32 = bessel_ratio(torch.tensor(nu, dtype=torch.float32), torch.tensor(x, dtype=torch.float32)).double().numpy()
    x32 = x.astype(np.float32).astype(np.float64)
    i0, i1 = scipy_special.ive(nu, x32), scipy_special.ive(nu + 1, x32)
    ok = (i0 > 1e-290) & (i1 > 1e-290) & (i1 / np.where(ok, i0, 1) > 1e-30)
    ref32 = np.where(ok, i1 / np.where(ok, i0, 1), np.nan)
    assert np.nanmax(np.abs(got32 - ref32) / ref32) < 1.2e-7
    assert bool(((got >= 0) & (got < 1)).all())


EXTREMES = [  # (order, x): tiny and huge arguments, large orders, where scipy's ive under/overflows
    (0, 1e-300), (0.5, 1e-200), (511, 1e-3), (511, 1e-100), (5000, 1e-5), (1e4, 3e4), (5000, 21826.4),
    (0, 1e6), (3.5, 1e8), (1023, 1e5), (1023, 679.25), (15.999, 9.0), (0, 4.0000001), (2.5, 12.0), (0, 2.36),
]


def test_extremes_against_mpmath():
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 40
    for order, x in EXTREMES:
        i0 = mpmath.besseli(order, x, maxterms=10**6)
        i1 = mpmath.besseli(order + 1, x, maxterms=10**6)
        log_ref, ratio_ref = float(mpmath.log(i0)), float(i1 / i0)
        xt = torch.tensor(x, dtype=torch.float64)
        got = float(log_bessel_iv(order, xt))
        assert abs(got - log_ref) / max(1.0, abs(log_ref)) < 2e-14, (order, x, got, log_ref)
        ratio = float(bessel_ratio(order, xt))
        assert abs(ratio - ratio_ref) / ratio_ref < 1e-14, (order, x, ratio, ratio_ref)
        over_power = float(log_bessel_iv_over_power(order, xt))
        over_power_ref = float(mpmath.log(i0) - order * mpmath.log(x))
        assert abs(over_power - over_power_ref) / max(1.0, abs(over_power_ref)) < 2e-14, (order, x)
        # R' = 1 - R^2 - (2 nu + 1) R / x evaluated with 40 digits (no cancellation issue there).
        ratio_mp = i1 / i0
        slope_ref = float(1 - ratio_mp**2 - (2 * order + 1) * ratio_mp / x)
        slope = float(bessel_ratio_and_derivative(order, xt)[1])
        assert abs(slope - slope_ref) <= 1e-12 * abs(slope_ref), (order, x, slope, slope_ref)


def test_limits_at_zero_and_large_arguments():
    x = torch.tensor([0.0, 1e-320, 1e-30], dtype=torch.float64)
    torch.testing.assert_close(log_bessel_iv(0, x), x.square() / 4, rtol=1e-15, atol=0)  # log I_0 ~ x^2/4
    assert log_bessel_iv(2.5, torch.tensor([0.0], dtype=torch.float64)).item() == -math.inf
    assert bessel_ratio(3, torch.tensor([0.0])).item() == 0.0
    limit = -511 * math.log(2) - math.lgamma(512)
    torch.testing.assert_close(
        log_bessel_iv_over_power(511, x), torch.full((3,), limit, dtype=torch.float64), rtol=1e-15, atol=0
    )
    # log I_nu(x) ~ x - log(2 pi x)/2 for x >> nu^2; ratio ~ 1 - (2 nu + 1)/(2x).
    big = torch.tensor([1e12], dtype=torch.float64)
    torch.testing.assert_close(log_bessel_iv(1.5, big), big - 0.5 * torch.log(2 * math.pi * big), rtol=1e-15, atol=0)
    torch.testing.assert_close(bessel_ratio(1.5, big), 1 - 4 / (2 * big), rtol=1e-15, atol=0)


def test_derivative_of_ratio_matches_the_identity_where_it_is_well_conditioned():
    x = torch.logspace(-3, 2, 60, dtype=torch.float64)
    for order in (0.0, 0.5, 7.0, 63.0, 511.0):
        ratio, slope = bessel_ratio_and_derivative(order, x)
        identity = 1 - ratio.square() - (2 * order + 1) * ratio / x
        torch.testing.assert_close(slope, identity, rtol=1e-9, atol=1e-12)
        assert bool((slope > 0).all())  # increasing
    # Large x: the identity cancels, the returned derivative keeps ~ (2 nu + 1) / (2 x^2).
    big = torch.tensor([1e7], dtype=torch.float64)
    torch.testing.assert_close(bessel_ratio_and_derivative(0.5, big)[1], 2 / (2 * big**2), rtol=1e-6, atol=0)


def test_tensor_orders_broadcast():
    orders = torch.tensor([[0.0], [2.5], [40.0]], dtype=torch.float64)
    x = torch.tensor([0.3, 5.0, 80.0], dtype=torch.float64)
    got = log_bessel_iv(orders, x)
    assert got.shape == (3, 3)
    for i, order in enumerate(orders[:, 0].tolist()):
        torch.testing.assert_close(got[i], log_bessel_iv(order, x), rtol=1e-15, atol=0)


def test_gradients_are_exact_and_pass_gradcheck():
    x = torch.tensor([1e-3, 0.5, 1.9, 2.1, 5.0, 30.0, 300.0, 3000.0], dtype=torch.float64, requires_grad=True)
    for order in (0.0, 0.5, 3.0, 15.5, 25.0, 511.0):
        assert gradcheck(lambda z: log_bessel_iv(order, z), (x,), rtol=1e-6, atol=1e-8)
        assert gradgradcheck(lambda z: log_bessel_iv(order, z), (x,), rtol=1e-5, atol=1e-7)
        assert gradcheck(lambda z: bessel_ratio(order, z), (x,), rtol=1e-6, atol=1e-8)
        if order < 100:  # larger orders: finite differences of a value ~ -3000 are too noisy
            assert gradcheck(lambda z: log_bessel_iv_over_power(order, z), (x,), rtol=1e-6, atol=1e-8)
        (grad,) = torch.autograd.grad(log_bessel_iv(order, x).sum(), x)
        torch.testing.assert_close(grad, bessel_ratio(order, x) + order / x, rtol=1e-15, atol=0)
    orders = torch.tensor([[0.0], [1.5], [40.0]], dtype=torch.float64)
    assert gradcheck(lambda z: log_bessel_iv(orders, z), (x,))
    # float32 gradients, and d/dx log I_0 at 0 is I_1(0)/I_0(0) = 0.
    x32 = torch.tensor([0.0, 1.0, 50.0], requires_grad=True)
    log_bessel_iv(0.0, x32).sum().backward()
    assert x32.grad.dtype == torch.float32 and x32.grad[0].item() == 0.0


@pytest.mark.parametrize("order", [-0.5, math.nan, math.inf, "1", True])
def test_bad_orders_are_rejected(order):
    with pytest.raises(ValueError, match="order"):
        log_bessel_iv(order, torch.tensor([1.0]))


def test_orders_with_gradients_are_rejected():
    with pytest.raises(ValueError, match="order"):
        log_bessel_iv(torch.tensor([1.0, 2.0], requires_grad=True), torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="order"):
        bessel_ratio(torch.tensor([-1.0, 2.0]), torch.tensor([1.0, 2.0]))
