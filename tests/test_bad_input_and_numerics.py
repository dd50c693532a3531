"""Bad input is rejected with a ValueError before any state changes; numerics never leak NaN;
log_prob is differentiable (gradcheck)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import torch_em
from conftest import COVARIANCE_TYPES, blobs


def snapshot(model: torch_em.GaussianMixture) -> dict:
    state = {name: value.detach().clone() if torch.is_tensor(value) else value
             for name, value in model.state_dict().items()}
    for name in ("converged_", "n_iter_", "lower_bound_", "lower_bound_history_"):
        state[name] = getattr(model, name).clone()
    state["n_features"] = model.n_features
    return state


def assert_unchanged(model, before) -> None:
    after = snapshot(model)
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert (value == after[name]) if not torch.is_tensor(value) else torch.equal(value, after[name]), name


@pytest.fixture
def fitted() -> torch_em.GaussianMixture:
    return torch_em.GaussianMixture(3, batch_shape=(2,), seed=0, dtype=torch.float64).fit(blobs())


def with_nan() -> np.ndarray:
    X = blobs()
    X[5, 1] = np.nan
    return X


def with_inf() -> np.ndarray:
    X = blobs()
    X[7, 0] = np.inf
    return X


BAD_DATA = [
    (with_nan(), "X must be finite"),
    (with_inf(), "X must be finite"),
    (np.zeros(30), r"X must have shape \(N, D=3\)"),
    (np.zeros((2, 2, 30, 3)), r"got \(2, 2, 30, 3\)"),
    (np.zeros((30, 4)), r"D=3.*got \(30, 4\)"),
    (np.zeros((3, 30, 3)), r"\(2, N, D=3\).*got \(3, 30, 3\)"),
    (np.zeros((2, 3)), "at least 3 sample"),
    ("text", "X must"),
]


@pytest.mark.parametrize("X, message", BAD_DATA)
def test_bad_data_to_fit_raises_and_changes_nothing(fitted, X, message):
    before = snapshot(fitted)
    with pytest.raises(ValueError, match=message):
        fitted.fit(X)
    assert_unchanged(fitted, before)


@pytest.mark.parametrize("method", ["log_prob", "score_samples", "score", "predict", "predict_proba", "bic", "aic"])
@pytest.mark.parametrize("X, message", BAD_DATA[:6])
def test_bad_data_to_evaluation_raises(fitted, method, X, message):
    before = snapshot(fitted)
    with pytest.raises(ValueError, match=message):
        getattr(fitted, method)(X)
    assert_unchanged(fitted, before)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_components": 0}, "n_components must be an integer >= 1, got 0"),
        ({"n_components": 2.5}, "n_components"),
        ({"n_features": 0}, "n_features"),
        ({"covariance_type": "banana"}, "covariance_type must be one of"),
        ({"init_params": "banana"}, "init_params must be one of"),
        ({"tol": -1.0}, "tol must be a non-negative number, got -1.0"),
        ({"reg_covar": -1e-3}, "reg_covar must be a non-negative number"),
        ({"max_iter": 0}, "max_iter"),
        ({"n_init": 0}, "n_init"),
        ({"batch_shape": (2, 0)}, "batch_shape"),
        ({"dtype": torch.int64}, "dtype"),
    ],
)
def test_bad_constructor_arguments(kwargs, message):
    arguments = {"n_components": 3, **kwargs}
    with pytest.raises(ValueError, match=message):
        torch_em.GaussianMixture(**arguments)


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("weights_init", np.full(4, 0.25), r"weights_init must have shape \(3,\) or \(2, 3\), got \(4,\)"),
        ("weights_init", np.array([0.5, 0.4, 0.3]), "sum to 1"),
        ("weights_init", np.array([1.2, -0.1, -0.1]), "non-negative"),
        ("means_init", np.zeros((3, 2)), r"means_init must have shape \(3, 3\)"),
        ("means_init", np.full((3, 3), np.nan), "means_init must be finite"),
        ("precisions_init", np.zeros((3, 3)), "precisions_init must have shape"),
        ("precisions_init", -np.broadcast_to(np.eye(3), (3, 3, 3)), "positive-definite"),
        ("precisions_init", np.broadcast_to(np.eye(3) + np.triu(np.ones((3, 3)), 1), (3, 3, 3)), "symmetric"),
    ],
)
def test_bad_initial_parameters_raise_and_change_nothing(fitted, name, value, message):
    before = snapshot(fitted)
    setattr(fitted.family if name != "weights_init" else fitted, name, value)
    with pytest.raises(ValueError, match=message):
        fitted.fit(blobs())
    assert_unchanged(fitted, before)
    # Validated at construction when the parameters are created there.
    with pytest.raises(ValueError, match=name):
        torch_em.GaussianMixture(3, 3, batch_shape=(2,), **{name: value})


@pytest.mark.parametrize("covariance_type, precisions", [("diag", np.zeros((3, 3))), ("spherical", -np.ones(3))])
def test_non_positive_diagonal_precisions_rejected(covariance_type, precisions):
    with pytest.raises(ValueError, match="precisions_init must be positive"):
        torch_em.GaussianMixture(3, covariance_type=covariance_type, precisions_init=precisions).fit(blobs())


def test_refit_with_other_feature_count_rejected(fitted):
    before = snapshot(fitted)
    with pytest.raises(ValueError, match="D=3"):
        fitted.fit(np.random.default_rng(0).normal(size=(50, 5)))
    assert_unchanged(fitted, before)


def test_unfitted_model_says_what_to_do():
    with pytest.raises(RuntimeError, match="fit"):
        torch_em.GaussianMixture(3).predict(blobs())


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_empty_component_is_reseeded_not_nan(covariance_type):
    X = blobs()
    far = np.array([[0.0, 0.0, 0.0], [5.0, 5.0, 0.0], [1e4, 1e4, 1e4]])  # the third mean explains nothing
    model = torch_em.GaussianMixture(3, covariance_type=covariance_type, means_init=far, dtype=torch.float64,
                                     seed=0).fit(X)
    for value in (model.weights, model.means, model.covariances, model.lower_bound_):
        assert bool(torch.isfinite(value).all())
    assert float(model.means.detach().max()) < 100  # moved from the far location into the data
    assert float(model.weights.min()) > 0.05  # and explains a real share of it


def test_singular_covariance_raises_named_error_and_changes_nothing():
    X = blobs()
    X[:, 2] = 1.0  # a constant feature: every covariance is singular without regularisation
    model = torch_em.GaussianMixture(3, seed=0, dtype=torch.float64).fit(blobs())
    before = snapshot(model)
    model.family.reg_covar = 0.0
    with pytest.raises(torch_em.IllConditionedError, match=r"component \d+ of the model.*reg_covar"):
        model.fit(X)
    assert_unchanged(model, before)
    assert issubclass(torch_em.IllConditionedError, ValueError)
    model.family.reg_covar = 1e-6  # the remedy works
    model.fit(X)
    assert bool(torch.isfinite(model.covariances).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_data_far_from_origin(dtype):
    X = blobs()
    offset = 1e4
    near = torch_em.GaussianMixture(3, seed=0, dtype=dtype).fit(X)
    far = torch_em.GaussianMixture(3, seed=0, dtype=dtype).fit(X + offset)
    torch.testing.assert_close(far.means.detach() - offset, near.means.detach(), rtol=0, atol=1e-2 if dtype == torch.float32 else 1e-8)
    torch.testing.assert_close(far.covariances.detach(), near.covariances.detach(), rtol=1e-2 if dtype == torch.float32 else 1e-6, atol=1e-3)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_log_prob_gradcheck(covariance_type):
    torch.manual_seed(0)
    model = torch_em.GaussianMixture(2, 2, covariance_type=covariance_type, dtype=torch.float64, seed=0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    X = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    names = [name for name, _ in model.named_parameters()]

    def log_prob(x, *values):
        return torch.func.functional_call(model, dict(zip(names, values)), (x,))

    assert torch.autograd.gradcheck(log_prob, (X, *[p.detach().clone().requires_grad_() for p in model.parameters()]))


def test_log_prob_matches_torch_distributions():
    model = torch_em.GaussianMixture(3, seed=0, dtype=torch.float64).fit(blobs())
    X = torch.as_tensor(blobs(seed=2))
    reference = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(probs=model.weights.detach()),
        torch.distributions.MultivariateNormal(model.means.detach(), covariance_matrix=model.covariances.detach()),
    ).log_prob(X)
    torch.testing.assert_close(model.log_prob(X).detach(), reference, rtol=1e-10, atol=1e-10)
