"""GaussianMixture against scikit-learn in float64 from identical initial parameters."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.mixture import GaussianMixture as SklearnGaussianMixture

import torch_em
from conftest import COVARIANCE_TYPES, blobs

RTOL = 1e-6


def initial_parameters(X: np.ndarray, covariance_type: str) -> dict:
    """Deliberately rough initial parameters (one sklearn iteration from a random init)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rough = SklearnGaussianMixture(3, covariance_type=covariance_type, init_params="random",
                                       max_iter=1, random_state=3).fit(X)
    return {"weights_init": rough.weights_, "means_init": rough.means_, "precisions_init": rough.precisions_}


def fit_both(X, covariance_type, n_iter, device="cpu"):
    init = initial_parameters(X, covariance_type)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = SklearnGaussianMixture(3, covariance_type=covariance_type, max_iter=n_iter, tol=0.0, **init).fit(X)
        ours = torch_em.GaussianMixture(3, covariance_type=covariance_type, max_iter=n_iter, tol=0.0,
                                        dtype=torch.float64, device=device, **init).fit(X)
    return ours, reference


def close(actual: torch.Tensor, expected: np.ndarray, rtol: float = RTOL) -> None:
    actual = actual.detach().cpu().numpy()
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * np.abs(expected).max())


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
@pytest.mark.parametrize("n_iter", [1, 7])
def test_parameters_and_lower_bound_match_sklearn(covariance_type, n_iter, device):
    X = blobs()
    ours, reference = fit_both(X, covariance_type, n_iter, device)
    close(ours.weights, reference.weights_)
    close(ours.means, reference.means_)
    close(ours.covariances, reference.covariances_)
    close(ours.precisions, reference.precisions_)
    close(ours.precisions_cholesky, reference.precisions_cholesky_)
    assert int(ours.n_iter_) == reference.n_iter_ == n_iter
    assert float(ours.lower_bound_) == pytest.approx(reference.lower_bound_, rel=RTOL)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_scores_and_criteria_match_sklearn(covariance_type, device):
    X = blobs()
    X_test = blobs(seed=1)
    ours, reference = fit_both(X, covariance_type, 5, device)
    close(ours.score_samples(X_test), reference.score_samples(X_test))
    close(ours.predict_proba(X_test), reference.predict_proba(X_test), rtol=1e-6)
    assert (ours.predict(X_test).cpu().numpy() == reference.predict(X_test)).all()
    assert float(ours.score(X_test)) == pytest.approx(reference.score(X_test), rel=RTOL)
    assert float(ours.bic(X_test)) == pytest.approx(reference.bic(X_test), rel=RTOL)
    assert float(ours.aic(X_test)) == pytest.approx(reference.aic(X_test), rel=RTOL)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_convergence_iteration_matches_sklearn(covariance_type):
    X = blobs()
    init = initial_parameters(X, covariance_type)
    reference = SklearnGaussianMixture(3, covariance_type=covariance_type, tol=1e-3, **init).fit(X)
    ours = torch_em.GaussianMixture(3, covariance_type=covariance_type, tol=1e-3, dtype=torch.float64, **init).fit(X)
    assert bool(ours.converged_) and reference.converged_
    assert int(ours.n_iter_) == reference.n_iter_
    close(ours.means, reference.means_)
