"""The entry-by-entry path for full and tied covariances with few features (D <= SMALL_FEATURES)
agrees with the general batched-LAPACK path and stays differentiable."""
import pytest
import torch

from torch_em.families import gaussian
from torch_em.families.gaussian import Gaussian

F64 = torch.float64


def _general(monkeypatch):
    monkeypatch.setattr(gaussian, "SMALL_FEATURES", 0)


def _statistics(n_features: int, generator: torch.Generator):
    """Counts (4, 3) and packed sums (4, 3, F) of random weighted points."""
    X = torch.randn(4, 50, n_features, dtype=F64, generator=generator)
    resp = torch.rand(4, 3, 50, dtype=F64, generator=generator)
    T, _ = Gaussian("full").features(X, None)
    return resp.sum(-1), resp @ T


@pytest.mark.parametrize("n_features", [1, 2, 3])
def test_small_m_step_matches_the_general_path(n_features, monkeypatch):
    family = Gaussian("full", reg_covar=1e-6)
    counts, sums = _statistics(n_features, torch.Generator().manual_seed(n_features))
    small, small_valid = family.m_step(counts, sums, None)
    _general(monkeypatch)
    general, general_valid = family.m_step(counts, sums, None)
    assert torch.equal(small_valid, general_valid)
    for name in general:
        torch.testing.assert_close(small[name], general[name], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("covariance_type", ["full", "tied"])
@pytest.mark.parametrize("n_features", [1, 2, 3])
def test_small_natural_parameters_match_and_are_differentiable(covariance_type, n_features, monkeypatch):
    family = Gaussian(covariance_type)
    generator = torch.Generator().manual_seed(10 + n_features)
    shape = family.precision_shape(3, n_features)
    theta = {"loc": torch.randn(4, 3, n_features, dtype=F64, generator=generator).requires_grad_(),
             "raw_precision_cholesky": torch.randn(4, *shape, dtype=F64, generator=generator).requires_grad_()}
    shift = torch.randn(4, 1, n_features, dtype=F64, generator=generator)
    eta, const = family.natural_parameters(theta, shift)
    small_grads = torch.autograd.grad((eta.square().sum() + const.sum()), list(theta.values()))
    _general(monkeypatch)
    eta_general, const_general = family.natural_parameters(theta, shift)
    general_grads = torch.autograd.grad((eta_general.square().sum() + const_general.sum()), list(theta.values()))
    torch.testing.assert_close(eta, eta_general, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(const, const_general, rtol=1e-12, atol=1e-12)
    for small, general in zip(small_grads, general_grads):
        torch.testing.assert_close(small, general, rtol=1e-10, atol=1e-10)


def test_failed_small_factorisation_falls_back_to_the_general_path():
    """A singular covariance (all weight on one point, reg_covar=0) is reported invalid, not NaN."""
    family = Gaussian("full", reg_covar=0.0)
    T, _ = family.features(torch.tensor([[[1.0, 2.0]]], dtype=F64), None)  # (1, 1, F)
    counts = torch.ones(1, 1, dtype=F64)
    theta, valid = family.m_step(counts, T, None)
    assert not bool(valid.any())
    assert bool(torch.isfinite(theta["raw_precision_cholesky"]).all())


@pytest.mark.parametrize("n_features", [1, 3, 8, 17])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_full_features_are_the_rows_and_their_packed_outer_products(n_features, dtype):
    # The features of full and tied covariances, written into one buffer, against the upper
    # triangle of x x^T gathered by index (the order of the packed parameters), bit for bit;
    # with a gradient flowing they are the same values and differentiable.
    X = torch.randn(2, 40, n_features, dtype=dtype, generator=torch.Generator().manual_seed(n_features))
    rows, cols = torch.triu_indices(n_features, n_features)
    expected = torch.cat([X, X[..., rows] * X[..., cols]], -1)
    for covariance_type in ("full", "tied"):
        T, _ = Gaussian(covariance_type).features(X, None)
        assert torch.equal(T, expected)
    leaf = X.clone().requires_grad_(True)
    T, _ = Gaussian("full").features(leaf, None)
    assert torch.equal(T.detach(), expected)
    T.sum().backward()  # d/dx_i of sum_i x_i + sum_{i <= j} x_i x_j = 1 + sum_j x_j + x_i
    torch.testing.assert_close(leaf.grad, 1 + X.sum(-1, keepdim=True) + X)
