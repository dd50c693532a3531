"""Invalid input raises a ValueError that names the argument, before any state changes.

Complements test_bad_input_and_numerics.py: an unbatched fitted model, a model that was never
fitted, every covariance type's initial precisions, each initial parameter checked at
construction, at the first fit and on refit, and loading state dicts.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import torch_em
from conftest import COVARIANCE_TYPES, blobs

F64 = torch.float64
FITTED_ATTRIBUTES = ("converged_", "n_iter_", "lower_bound_", "lower_bound_history_")


def snapshot(model: torch_em.GaussianMixture) -> dict:
    state = {name: value.detach().clone() for name, value in model.named_parameters()}
    for name in FITTED_ATTRIBUTES:
        value = getattr(model, name)
        state[name] = None if value is None else value.clone()
    state["n_features"] = model.n_features
    return state


def assert_unchanged(model: torch_em.GaussianMixture, before: dict) -> None:
    after = snapshot(model)
    assert after.keys() == before.keys()
    for name, value in before.items():
        if torch.is_tensor(value):
            assert torch.equal(value, after[name]), name
        else:
            assert value == after[name], name


@pytest.fixture
def fitted() -> torch_em.GaussianMixture:
    return torch_em.GaussianMixture(3, seed=0, dtype=F64).fit(blobs(30))


def data_with(value: float, where=(5, 1)) -> np.ndarray:
    X = blobs(30)
    X[where] = value
    return X


# (X, pattern): every message names X.
BAD_X = {
    "nan": (data_with(np.nan), r"X must be finite, got 1 NaN"),
    "inf": (data_with(np.inf), r"X must be finite"),
    "-inf": (data_with(-np.inf, (0, 0)), r"X must be finite"),
    "1-d": (np.zeros(30), r"X must have shape \(N, D=3\), got \(30,\)"),
    "3-d": (np.zeros((2, 30, 3)), r"X must have shape \(N, D=3\), got \(2, 30, 3\)"),
    "4-d": (np.zeros((2, 2, 30, 3)), r"X must have shape .*got \(2, 2, 30, 3\)"),
    "features": (np.zeros((30, 2)), r"X must have shape \(N, D=3\), got \(30, 2\)"),
    "complex": (blobs(30).astype(np.complex128), r"X must hold real numbers"),
    "bool": (blobs(30) > 0, r"X must hold real numbers"),
    "text": ("abc", r"X must"),
    "ragged": ([[1.0, 2.0, 3.0], [1.0, 2.0]], r"X must"),
}


@pytest.mark.parametrize("case", list(BAD_X))
def test_bad_x_to_fit_raises_and_changes_nothing(fitted, case):
    X, pattern = BAD_X[case]
    before = snapshot(fitted)
    with pytest.raises(ValueError, match=pattern):
        fitted.fit(X)
    assert_unchanged(fitted, before)


def test_too_few_points_for_the_components(fitted):
    before = snapshot(fitted)
    with pytest.raises(ValueError, match=r"X must have at least 3 sample.*N=2"):
        fitted.fit(blobs(30)[:2])
    assert_unchanged(fitted, before)
    fitted.fit(blobs(30)[:3])  # N = K is allowed


@pytest.mark.parametrize("method", ["predict", "predict_proba", "log_prob", "score_samples", "score", "bic", "aic"])
@pytest.mark.parametrize("case", ["nan", "inf", "1-d", "3-d", "features", "complex"])
def test_bad_x_to_evaluation_raises(fitted, method, case):
    X, pattern = BAD_X[case]
    before = snapshot(fitted)
    with pytest.raises(ValueError, match=pattern):
        getattr(fitted, method)(X)
    assert_unchanged(fitted, before)


@pytest.mark.parametrize("case", ["nan", "1-d", "4-d", "text"])
def test_failed_first_fit_leaves_the_model_unfitted(case):
    X, _ = BAD_X[case]
    model = torch_em.GaussianMixture(3, seed=0)
    with pytest.raises(ValueError, match="X"):
        model.fit(X)
    assert model.n_features is None and not model.is_initialized
    assert model.lower_bound_ is None and model.n_iter_ is None and model.converged_ is None
    with pytest.raises(RuntimeError, match="fit"):
        model.predict(blobs(30))
    model.fit(blobs(30))  # and it can still be fitted
    assert model.n_features == 3


def test_batch_dims_of_x_must_match_batch_shape():
    data = np.stack([blobs(30, seed=s) for s in range(6)]).reshape(2, 3, -1, 3)
    model = torch_em.GaussianMixture(3, batch_shape=(2, 3), seed=0, dtype=F64).fit(data)
    before = snapshot(model)
    for bad in (data.reshape(3, 2, -1, 3), data[:, :2], data.reshape(6, -1, 3), data[None]):
        with pytest.raises(ValueError, match=r"X must have shape \(N, D=3\) or \(2, 3, N, D=3\)"):
            model.fit(bad)
        with pytest.raises(ValueError, match="X must have shape"):
            model.predict(bad)
    assert_unchanged(model, before)


def test_zero_features_rejected():
    with pytest.raises(ValueError, match="X"):
        torch_em.GaussianMixture(2).fit(np.zeros((10, 0)))


# --- constructor arguments ------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"n_components": 0}, "n_components"),
        ({"n_components": -2}, "n_components"),
        ({"n_components": True}, "n_components"),
        ({"n_components": 2.0}, "n_components"),
        ({"n_features": 0}, "n_features"),
        ({"covariance_type": "Full"}, "covariance_type"),
        ({"covariance_type": None}, "covariance_type"),
        ({"init_params": "kmeans++"}, "init_params"),
        ({"tol": -1e-9}, "tol"),
        ({"tol": float("nan")}, "tol"),
        ({"reg_covar": -1e-12}, "reg_covar"),
        ({"reg_covar": float("nan")}, "reg_covar"),
        ({"max_iter": 0}, "max_iter"),
        ({"n_init": 0}, "n_init"),
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"batch_shape": 4}, "batch_shape"),
        ({"batch_shape": (2, 0)}, "batch_shape"),
        ({"batch_shape": (-1,)}, "batch_shape"),
        ({"dtype": torch.int32}, "dtype"),
    ],
    ids=lambda value: repr(value) if isinstance(value, dict) else None,
)
def test_bad_constructor_argument_is_named(kwargs, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        torch_em.GaussianMixture(**{"n_components": 3, **kwargs})


@pytest.mark.parametrize("kwargs", [{"tol": "1e-3"}, {"tol": None}, {"reg_covar": "0"}], ids=["tol-str", "tol-None", "reg-str"])
def test_non_numeric_tolerances_are_named(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name):
        torch_em.GaussianMixture(3, **kwargs)


@pytest.mark.parametrize("n_samples", [0, -1, 2.5, None])
def test_bad_sample_count(fitted, n_samples):
    with pytest.raises(ValueError, match="n_samples"):
        fitted.sample(n_samples)


# --- initial parameters -----------------------------------------------------------------------
def bad_precisions(covariance_type: str) -> dict[str, tuple[np.ndarray, str]]:
    """Invalid precisions_init per covariance type (K=3, D=3) and the message they give."""
    eye = np.eye(3)
    if covariance_type in ("full", "tied"):
        one = lambda m: np.broadcast_to(m, (3, 3, 3)).copy() if covariance_type == "full" else m  # noqa: E731
        indefinite = np.diag([1.0, -1.0, 1.0])
        nonsymmetric = eye + np.triu(np.full((3, 3), 0.1), 1)
        nan = eye.copy()
        nan[0, 0] = np.nan
        return {
            "shape": (np.ones((3, 3, 3)) if covariance_type == "tied" else eye, "precisions_init must have shape"),
            "not-pd": (one(indefinite), "positive-definite"),
            "zero": (one(np.zeros((3, 3))), "positive-definite"),
            "non-symmetric": (one(nonsymmetric), "symmetric"),
            "nan": (one(nan), "precisions_init must be finite"),
        }
    shape = (3, 3) if covariance_type == "diag" else (3,)
    negative = np.ones(shape)
    negative[0] = -1.0
    return {
        "shape": (np.ones((3, 4)) if covariance_type == "diag" else np.ones((3, 3)), "precisions_init must have shape"),
        "zero": (np.zeros(shape), "precisions_init must be positive"),
        "negative": (negative, "precisions_init must be positive"),
        "inf": (np.full(shape, np.inf), "precisions_init must be finite"),
    }


PRECISION_CASES = [(c, case) for c in COVARIANCE_TYPES for case in bad_precisions(c)]


@pytest.mark.parametrize("covariance_type, case", PRECISION_CASES, ids=[f"{c}-{k}" for c, k in PRECISION_CASES])
def test_bad_precisions_init(covariance_type, case):
    value, pattern = bad_precisions(covariance_type)[case]
    X = blobs(30)
    # 1. Built with n_features: the parameters are created, so checked, at construction.
    with pytest.raises(ValueError, match=pattern):
        torch_em.GaussianMixture(3, 3, covariance_type=covariance_type, precisions_init=value)
    # 2. Built without: checked by the first fit, which leaves the model unfitted.
    fresh = torch_em.GaussianMixture(3, covariance_type=covariance_type, precisions_init=value)
    with pytest.raises(ValueError, match=pattern):
        fresh.fit(X)
    assert not fresh.is_initialized and fresh.n_features is None
    # 3. A fitted model given bad initial parameters for a refit stays as it was.
    model = torch_em.GaussianMixture(3, covariance_type=covariance_type, seed=0, dtype=F64).fit(X)
    before = snapshot(model)
    model.family.precisions_init = value
    with pytest.raises(ValueError, match=pattern):
        model.fit(X)
    assert_unchanged(model, before)


BAD_WEIGHTS = {
    "shape": (np.full(4, 0.25), r"weights_init must have shape \(3,\) or \(2, 3\), got \(4,\)"),
    "batch": (np.full((3, 3), 1 / 3), r"weights_init must have shape \(3,\) or \(2, 3\), got \(3, 3\)"),
    "sum": (np.array([0.2, 0.2, 0.2]), "weights_init must be non-negative and sum to 1"),
    "sum-per-model": (np.array([[0.2, 0.3, 0.5], [0.5, 0.5, 0.5]]), "weights_init must be non-negative and sum to 1"),
    "negative": (np.array([1.5, -0.25, -0.25]), "weights_init must be non-negative"),
    "nan": (np.array([np.nan, 0.5, 0.5]), "weights_init must be finite"),
    "text": ("abc", "weights_init must"),
}
BAD_MEANS = {
    "shape": (np.zeros((3, 2)), r"means_init must have shape \(3, 3\) or \(2, 3, 3\), got \(3, 2\)"),
    "components": (np.zeros((4, 3)), r"means_init must have shape"),
    "batch": (np.zeros((4, 3, 3)), r"means_init must have shape .*got \(4, 3, 3\)"),
    "inf": (np.full((3, 3), np.inf), "means_init must be finite"),
}
INIT_CASES = [("weights_init", case) for case in BAD_WEIGHTS] + [("means_init", case) for case in BAD_MEANS]


@pytest.mark.parametrize("name, case", INIT_CASES, ids=[f"{n}-{c}" for n, c in INIT_CASES])
def test_bad_weights_and_means_init(name, case):
    value, pattern = (BAD_WEIGHTS if name == "weights_init" else BAD_MEANS)[case]
    X = blobs(30)
    with pytest.raises(ValueError, match=pattern):
        torch_em.GaussianMixture(3, 3, batch_shape=(2,), **{name: value})
    fresh = torch_em.GaussianMixture(3, batch_shape=(2,), **{name: value})
    with pytest.raises(ValueError, match=pattern):
        fresh.fit(X)
    assert not fresh.is_initialized
    model = torch_em.GaussianMixture(3, batch_shape=(2,), seed=0, dtype=F64).fit(X)
    before = snapshot(model)
    # weights_init is the mixture's attribute; means_init belongs to the Gaussian family.
    setattr(model if name == "weights_init" else model.family, name, value)
    with pytest.raises(ValueError, match=pattern):
        model.fit(X)
    assert_unchanged(model, before)


def test_valid_initial_parameters_with_and_without_batch_dims():
    """The per-model and batched layouts are both accepted and mean the same."""
    X = blobs(30)
    per_model = dict(weights_init=[0.2, 0.3, 0.5], means_init=X[[0, 40, 100]], precisions_init=np.full((3, 3), 0.5))
    batched = {name: np.broadcast_to(value, (2, *np.shape(value))).copy() for name, value in per_model.items()}
    options = dict(covariance_type="diag", batch_shape=(2,), dtype=F64, max_iter=3, tol=0.0)
    with pytest.warns(torch_em.ConvergenceWarning):
        a = torch_em.GaussianMixture(3, **per_model, **options).fit(X)
    with pytest.warns(torch_em.ConvergenceWarning):
        b = torch_em.GaussianMixture(3, **batched, **options).fit(X)
    for name in ("weights", "means", "covariances"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


@pytest.mark.parametrize("covariance_type", ["full", "tied"])
def test_precisions_symmetric_up_to_rounding_are_accepted(covariance_type):
    rng = np.random.default_rng(0)
    A = rng.normal(size=(3, 3, 3))
    covariances = A @ A.transpose(0, 2, 1) + np.eye(3)
    precisions = np.linalg.inv(covariances if covariance_type == "full" else covariances[0])
    assert not np.array_equal(precisions, np.swapaxes(precisions, -1, -2))  # asymmetric by rounding only
    assert np.allclose(precisions, np.swapaxes(precisions, -1, -2), rtol=1e-12, atol=0)
    model = torch_em.GaussianMixture(3, covariance_type=covariance_type, precisions_init=precisions, dtype=F64)
    model.fit(blobs(30))


# --- loading state dicts ------------------------------------------------------------------------
def test_load_state_dict_size_mismatch_with_n_features():
    source = torch_em.GaussianMixture(3, seed=0, dtype=F64).fit(blobs(30))
    target = torch_em.GaussianMixture(2, 3, dtype=F64)
    before = snapshot(target)
    with pytest.raises((RuntimeError, ValueError)):
        target.load_state_dict(source.state_dict())
    assert_unchanged(target, before)


MISMATCHES = {
    # name: (source kwargs, target kwargs); the target is built without n_features.
    "tied-into-full": (dict(covariance_type="tied"), dict(covariance_type="full")),
    "diag-into-full": (dict(covariance_type="diag"), dict(covariance_type="full")),
    "full-into-spherical": (dict(covariance_type="full"), dict(covariance_type="spherical")),
    "batch-into-unbatched": (dict(batch_shape=(2,)), dict()),
    "unbatched-into-batch": (dict(), dict(batch_shape=(3,))),
    "3-into-2-components": (dict(), dict(n_components=2)),
}


@pytest.mark.parametrize("case", list(MISMATCHES))
def test_load_state_dict_of_another_configuration_is_rejected(case):
    source_kwargs, target_kwargs = MISMATCHES[case]
    source = torch_em.GaussianMixture(3, seed=0, dtype=F64, **source_kwargs).fit(blobs(30))
    target = torch_em.GaussianMixture(**{"n_components": 3, "dtype": F64, **target_kwargs})
    with pytest.raises((RuntimeError, ValueError)):
        target.load_state_dict(source.state_dict())
    assert not target.is_initialized and target.n_features is None  # nothing half-loaded




REJECTED_FIRST_CALLS = {
    "GaussianMixture.fit": (lambda: torch_em.GaussianMixture(2), "fit", {"sample_weight": np.ones(7)}),
    "GaussianMixture.partial_fit": (lambda: torch_em.GaussianMixture(2), "partial_fit", {"sample_weight": np.ones(7)}),
    "GaussianMixture.initialize": (lambda: torch_em.GaussianMixture(2), "initialize", {"sample_weight": -np.ones(60)}),
    "GaussianMixture.fit, bad means_init": (lambda: torch_em.GaussianMixture(2, means_init=np.zeros((2, 3))), "fit", {}),
    "BayesianGaussianMixture.fit": (lambda: torch_em.BayesianGaussianMixture(2), "fit", {"sample_weight": np.ones(7)}),
    "GaussianHMM.fit": (lambda: torch_em.GaussianHMM(2), "fit", {"lengths": [30, 31]}),
    "GaussianHMM.partial_fit": (lambda: torch_em.GaussianHMM(2), "partial_fit", {"lengths": [30, 31]}),
    "KMeans.fit, bad init": (lambda: torch_em.KMeans(2, init=np.zeros((3, 2))), "fit", {}),
    "KMeans.partial_fit": (lambda: torch_em.KMeans(2), "partial_fit", {"sample_weight": np.ones(7)}),
}


@pytest.mark.parametrize("case", sorted(REJECTED_FIRST_CALLS))
def test_a_rejected_first_call_keeps_the_dtype_the_model_follows(case):
    # X is float64; the model follows its data's dtype (no dtype= given) and is float32 until a
    # fit succeeds. Checking X adopts float64 before the weights, lengths or initial values are
    # checked: the rejected call must leave the model as it was.
    make, method, kwargs = REJECTED_FIRST_CALLS[case]
    model = make()
    dtype = (lambda: model.cluster_centers_.dtype) if isinstance(model, torch_em.KMeans) else (lambda: model.dtype)
    before = dtype()
    with pytest.raises(ValueError):
        getattr(model, method)(np.random.default_rng(0).normal(size=(60, 2)), **kwargs)
    assert dtype() == before == torch.float32 and not model.is_initialized
    if "bad" not in case:  # still follows: the next (valid) fit adopts float64
        model.fit(np.random.default_rng(1).normal(size=(60, 2)))
        assert dtype() == F64
