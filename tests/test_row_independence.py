"""A result depends only on its own inputs: a row's log-density, responsibilities, label and
distances are the same whatever other rows are evaluated with it and however a call is chunked."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import torch_em
from conftest import COVARIANCE_TYPES, blobs

DTYPES = [torch.float32, torch.float64]
X_FIT = blobs()  # (N, 3), three well-separated clusters


def fitted_mixture(covariance_type: str, dtype: torch.dtype) -> torch_em.GaussianMixture:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch_em.ConvergenceWarning)
        return torch_em.GaussianMixture(3, covariance_type=covariance_type, seed=0, dtype=dtype).fit(X_FIT)


MIXTURES = {(c, d): fitted_mixture(c, d) for c in COVARIANCE_TYPES for d in DTYPES}
KMEANS = {d: torch_em.KMeans(3, seed=0, dtype=d).fit(torch.as_tensor(X_FIT, dtype=d)) for d in DTYPES}


def tolerance(dtype: torch.dtype) -> dict:
    # Equal up to the rounding of one evaluation (BLAS blocking may differ with the row count).
    return dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-10)


companions = st.fixed_dictionaries({
    "rows": st.lists(st.integers(0, len(X_FIT) - 1), min_size=1, max_size=40),
    "outlier_scale": st.sampled_from([0.0, 1e2, 1e4, 1e5, 1e6]),
    "split": st.integers(1, 39),
})


def calls(base: np.ndarray, case: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The rows alone, and the same rows inside calls with other rows (an outlier among them)."""
    others = X_FIT[case["rows"]]
    if case["outlier_scale"]:
        others = np.concatenate([others, np.full((1, 3), case["outlier_scale"])])
    return base, [np.concatenate([others, base]), np.concatenate([base, others])]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=companions)
def test_mixture_results_of_a_row_do_not_depend_on_the_other_rows(covariance_type, dtype, case):
    model = MIXTURES[covariance_type, dtype]
    base = X_FIT[:40:3]
    alone, together = calls(base, case)
    alone = torch.as_tensor(alone, dtype=dtype)
    expected = {"score_samples": model.score_samples(alone), "predict_proba": model.predict_proba(alone),
                "predict": model.predict(alone)}
    n = len(base)
    for X, where in zip(together, (slice(-n, None), slice(0, n))):
        X = torch.as_tensor(X, dtype=dtype)
        torch.testing.assert_close(model.score_samples(X)[where], expected["score_samples"], **tolerance(dtype))
        torch.testing.assert_close(model.predict_proba(X)[where], expected["predict_proba"], **tolerance(dtype))
        assert torch.equal(model.predict(X)[where], expected["predict"])
    split = min(case["split"], n - 1)  # the same rows in two calls
    chunked = torch.cat([model.score_samples(alone[:split]), model.score_samples(alone[split:])])
    torch.testing.assert_close(chunked, expected["score_samples"], **tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@settings(max_examples=15, deadline=None)
@given(case=companions)
def test_kmeans_results_of_a_row_do_not_depend_on_the_other_rows(dtype, case):
    model = KMEANS[dtype]
    base = X_FIT[:40:3]
    alone, together = calls(base, case)
    alone = torch.as_tensor(alone, dtype=dtype)
    labels, distances = model.predict(alone), model.transform(alone)
    n = len(base)
    for X, where in zip(together, (slice(-n, None), slice(0, n))):
        X = torch.as_tensor(X, dtype=dtype)
        assert torch.equal(model.predict(X)[where], labels)
        torch.testing.assert_close(model.transform(X)[where], distances, **tolerance(dtype))


def test_an_extreme_row_moved_the_others_before():
    """The float32 case that the data-dependent reference got wrong (37 nats): one row at 1e5."""
    model = MIXTURES["full", torch.float32]
    base = torch.as_tensor(X_FIT[:50], dtype=torch.float32)
    with_outlier = torch.cat([base, torch.full((1, 3), 1e5)])
    np.testing.assert_allclose(model.score_samples(with_outlier)[:50].numpy(), model.score_samples(base).numpy(),
                               rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(model.predict_proba(with_outlier)[:50].numpy(), model.predict_proba(base).numpy(),
                               atol=1e-5)
