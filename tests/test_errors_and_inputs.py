"""Clear errors for bad options and inputs, the input forms fit accepts, the dtype a fit uses,
and data large enough to overflow.

Every rejected call raises a ValueError that names the argument (a wrong type included, as the
constructors' other checks do) and leaves a fitted model's state_dict as it was; finite input
gives finite output or a ValueError.
"""
from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import torch_em
from torch_em import EMLayer, GaussianMixture, KMeans, Mixture, NotFittedError
from torch_em._validation import MAGNITUDE_HEADROOM, check_magnitude
from conftest import COVARIANCE_TYPES, blobs

F32, F64 = torch.float32, torch.float64


def state_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in model.state_dict().items()}


def assert_same_state(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert after[name].dtype == value.dtype and torch.equal(after[name], value), name


@pytest.fixture
def fitted() -> GaussianMixture:
    return GaussianMixture(3, seed=0, dtype=F64).fit(blobs(30))


@pytest.fixture
def fitted_kmeans() -> KMeans:
    return KMeans(3, seed=0, dtype=F64).fit(blobs(30))


# --- constructor options -------------------------------------------------------------------------
#: Constructors of every module that takes dtype= and device=.
MODULES = {
    "GaussianMixture": lambda **kw: GaussianMixture(3, **kw),
    "BayesianGaussianMixture": lambda **kw: torch_em.BayesianGaussianMixture(3, **kw),
    "KMeans": lambda **kw: KMeans(3, **kw),
    "EMLayer": lambda **kw: EMLayer(3, 2, **kw),
}


@pytest.mark.parametrize("build", [
    lambda **kw: GaussianMixture(3, **kw), lambda **kw: KMeans(3, **kw),
    lambda **kw: Mixture(torch_em.Poisson(), 3, **kw), lambda **kw: torch_em.BayesianGaussianMixture(3, **kw),
], ids=["GaussianMixture", "KMeans", "Mixture", "BayesianGaussianMixture"])
@pytest.mark.parametrize("value", [None, "ab", 3, (2, None), (0,), (True,)])
def test_bad_batch_shape_names_it(build, value):
    with pytest.raises(ValueError, match=re.escape(f"batch_shape must be a sequence of positive integers, got {value!r}")):
        build(batch_shape=value)


@pytest.mark.parametrize("name, expected", [("float32", F32), ("float64", F64), ("torch.float64", F64), ("double", F64)])
def test_dtype_accepts_torch_dtype_names(name, expected):
    assert GaussianMixture(3, dtype=name).fit(blobs(30)).means.dtype == expected
    assert KMeans(3, dtype=name).fit(blobs(30)).cluster_centers_.dtype == expected
    assert EMLayer(3, 2, dtype=name).initial["logits"].dtype == expected


@pytest.mark.parametrize("build", list(MODULES.values()), ids=list(MODULES))
def test_bad_dtype_names_it(build):
    with pytest.raises(ValueError, match=r"dtype must be a floating torch dtype or its name .*got 'floaty'"):
        build(dtype="floaty")
    with pytest.raises(ValueError, match=r"dtype must be a floating torch dtype or its name .*got 'Size'"):
        build(dtype="Size")  # a torch attribute that is not a dtype
    with pytest.raises(ValueError, match=r"dtype must be a floating-point dtype, got torch.int64"):
        build(dtype=torch.int64)
    with pytest.raises(ValueError, match=r"dtype must be a floating torch dtype \(e.g. torch.float32\), got int 3"):
        build(dtype=3)


@pytest.mark.parametrize("build", list(MODULES.values()), ids=list(MODULES))
def test_bad_device_names_it(build):
    with pytest.raises(ValueError, match=r"device must be a device name such as 'cpu' or 'cuda:0', got 'bogus'"):
        build(device="bogus")
    with pytest.raises(ValueError, match=r"device must be one that holds data, got 'meta'"):
        build(device="meta")
    with pytest.raises(ValueError, match=r"device must be a torch.device.*got float"):
        build(device=1.5)
    assert build(device=torch.device("cpu")) is not None and build(device="cpu") is not None


@pytest.mark.parametrize("family, pattern", [
    ("gaussian", r"family must be a torch_em ComponentFamily .*got str 'gaussian'"),
    (None, r"family must be a torch_em ComponentFamily .*got NoneType None"),
    (3, r"family must be a torch_em ComponentFamily .*got int 3"),
])
def test_mixture_family_must_be_a_family(family, pattern):
    with pytest.raises(ValueError, match=pattern):
        Mixture(family, 3)


def test_mixture_family_class_instead_of_instance_says_so():
    with pytest.raises(ValueError, match=r"family must be a ComponentFamily instance, got the class Poisson; use Poisson\(\.\.\.\)"):
        Mixture(torch_em.Poisson, 3)
    with pytest.raises(ValueError, match=r"got the class Gaussian"):
        EMLayer(3, 2, family=torch_em.Gaussian)


# --- unfitted models -----------------------------------------------------------------------------
def test_not_fitted_error_follows_scikit_learn():
    assert issubclass(NotFittedError, ValueError) and issubclass(NotFittedError, AttributeError)
    assert "NotFittedError" in torch_em.__all__


UNFITTED_CALLS = {
    "predict": lambda m: m.predict("junk"),
    "predict_proba": lambda m: m.predict_proba("junk"),
    "score_samples": lambda m: m.score_samples("junk"),
    "score": lambda m: m.score("junk"),
    "bic": lambda m: m.bic("junk"),
    "aic": lambda m: m.aic("junk"),
    "log_prob": lambda m: m.log_prob("junk"),
    "forward": lambda m: m("junk"),
    "log_joint": lambda m: m.log_joint(None),
    "sample": lambda m: m.sample("many", seed="a"),
    "weights": lambda m: m.weights,
    "means": lambda m: m.means,
    "covariances": lambda m: m.covariances,
    "precisions": lambda m: m.precisions,
    "precisions_cholesky": lambda m: m.precisions_cholesky,
    "theta": lambda m: m.theta(),
    "n_parameters": lambda m: m.n_parameters(),
}


@pytest.mark.parametrize("call", list(UNFITTED_CALLS))
def test_unfitted_mixture_raises_not_fitted_before_checking_arguments(call):
    with pytest.raises(NotFittedError, match=r"GaussianMixture has no parameters yet: call fit\(X\) first"):
        UNFITTED_CALLS[call](GaussianMixture(3))


def test_unfitted_properties_are_missing_attributes():
    model = GaussianMixture(3)
    assert not hasattr(model, "means") and not hasattr(model, "covariances")
    assert hasattr(model.fit(blobs(30)), "means")
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        model.nonexistent  # other attributes: nn.Module's own message


@pytest.mark.parametrize("call", ["predict", "transform", "score"])
def test_unfitted_kmeans_raises_not_fitted_before_checking_x(call):
    with pytest.raises(NotFittedError, match=r"KMeans has no centres yet: call fit\(X\) first"):
        getattr(KMeans(3), call)("junk")


# --- input forms -----------------------------------------------------------------------------------
def test_fit_callable_that_returns_no_iterator(fitted):
    before = state_of(fitted)
    with pytest.raises(ValueError, match=r"X is a callable, so it must return a fresh iterator of batches per pass, got NoneType"):
        fitted.fit(lambda: None)
    assert_same_state(fitted, before)
    with pytest.raises(ValueError, match=r"got int from it"):
        GaussianMixture(3).fit(lambda: 3)


def test_meta_tensor_is_rejected(fitted, fitted_kmeans):
    meta = torch.empty(30, 3, device="meta", dtype=F64)
    before = state_of(fitted)
    for call in (fitted.fit, fitted.partial_fit, fitted.predict, fitted.score_samples, fitted_kmeans.predict):
        with pytest.raises(ValueError, match=r"X must hold data, got a tensor on the meta device \(shape \(30, 3\) only\)"):
            call(meta)
    assert_same_state(fitted, before)
    layer = EMLayer(2, 3)
    with pytest.raises(ValueError, match=r"X must hold data, got a tensor on the meta device"):
        torch_em.functional.em(torch.empty(4, 30, 3, device="meta"), dict(layer.initial), 2, family=layer.family)


def test_dataframe_is_an_array_not_a_stream():
    pd = pytest.importorskip("pandas")
    X = blobs(30)
    frame = pd.DataFrame(X, columns=["a", "b", "c"])
    from_frame = GaussianMixture(3, seed=0).fit(frame)
    from_array = GaussianMixture(3, seed=0).fit(X)
    assert from_frame.means.dtype == F64  # a float64 DataFrame is fitted in float64
    for name in ("weights", "means", "covariances"):
        assert torch.equal(getattr(from_frame, name), getattr(from_array, name)), name
    assert torch.equal(from_frame.predict(frame), from_array.predict(X))
    assert torch.equal(KMeans(3, seed=0).fit(frame).cluster_centers_, KMeans(3, seed=0).fit(X).cluster_centers_)


def test_dataframe_with_text_column_names_x(fitted):
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame({"a": blobs(30)[:, 0], "b": blobs(30)[:, 1], "c": ["x"] * len(blobs(30))})
    before = state_of(fitted)
    with pytest.raises(ValueError, match=r"X must be a tensor or array of numbers, got DataFrame \(could not convert string to float: 'x'\)"):
        fitted.fit(frame)
    assert_same_state(fitted, before)


def test_dataframe_of_integers_and_mixed_columns():
    pd = pytest.importorskip("pandas")
    counts = np.random.default_rng(0).poisson(3.0, size=(100, 2))
    model = Mixture(torch_em.Poisson(), 2, seed=0).fit(pd.DataFrame(counts))
    reference = Mixture(torch_em.Poisson(), 2, seed=0).fit(torch.as_tensor(counts, dtype=torch.get_default_dtype()))
    assert model.logits.dtype == torch.get_default_dtype()  # integers: torch's default dtype
    assert torch.equal(model.theta()["log_rates"], reference.theta()["log_rates"])


def test_scipy_sparse_matrix_gets_a_clear_error(fitted):
    sparse = pytest.importorskip("scipy.sparse")
    before = state_of(fitted)
    for matrix in (sparse.csr_matrix(blobs(30)), sparse.coo_array(blobs(30))):
        with pytest.raises(ValueError, match=r"X must be a dense array, got a scipy sparse \w+; pass X.toarray\(\)"):
            fitted.fit(matrix)
        with pytest.raises(ValueError, match=r"X must be a dense array"):
            fitted.predict(matrix)
        with pytest.raises(ValueError, match=r"X must be a dense array"):
            KMeans(3).fit(matrix)
    assert_same_state(fitted, before)


def test_numeric_object_array_is_cast():
    X = blobs(30)
    model = GaussianMixture(3, seed=0).fit(X.astype(object))
    reference = GaussianMixture(3, seed=0, dtype=torch.get_default_dtype()).fit(X)
    assert model.means.dtype == torch.get_default_dtype()  # object arrays: torch's default dtype
    assert torch.equal(model.means, reference.means) and torch.equal(model.covariances, reference.covariances)


def test_bool_tensor_is_bernoulli_data():
    data = torch.rand(200, 5, generator=torch.Generator().manual_seed(0)) > 0.4
    from_bool = Mixture(torch_em.Bernoulli(), 2, seed=0).fit(data)
    from_float = Mixture(torch_em.Bernoulli(), 2, seed=0).fit(data.to(torch.get_default_dtype()))
    assert torch.equal(from_bool.theta()["logit_probs"], from_float.theta()["logit_probs"])
    assert torch.equal(from_bool.score_samples(data), from_float.score_samples(data.float()))
    assert torch.equal(from_bool.predict(data.numpy()), from_float.predict(data.float()))


def test_bool_data_stay_invalid_for_gaussians(fitted):
    before = state_of(fitted)
    with pytest.raises(ValueError, match=r"X must hold real numbers, got dtype torch.bool"):
        fitted.fit(torch.as_tensor(blobs(30) > 0))
    assert_same_state(fitted, before)


def test_mask_errors_say_what_came():
    layer = EMLayer(2, 3, dtype=F64)
    X = torch.randn(4, 10, 3, dtype=F64)
    with pytest.raises(ValueError, match=r"mask must be boolean or hold float weights in \[0, 1\], got dtype torch.int64"):
        layer(X, mask=torch.ones(4, 10, dtype=torch.int64))
    weights = torch.full((4, 10), 0.5, dtype=F64)
    weights[1, 2], weights[2, 3] = -0.5, 2.0
    with pytest.raises(ValueError, match=r"got values in \[-0.5, 2\]"):
        layer(X, mask=weights)
    with pytest.raises(ValueError, match=r"mask must be a tensor \(\*batch, N\) = \(4, 10\), got list"):
        layer(X, mask=[[1] * 10] * 4)


@pytest.mark.parametrize("seed", ["a", -1, 1.5, True])
def test_sample_seed_is_checked_as_in_the_constructor(fitted, seed):
    before = state_of(fitted)
    with pytest.raises(ValueError, match=rf"seed must be an integer >= 0, got {seed!r}"):
        fitted.sample(5, seed=seed)
    with pytest.raises(ValueError, match=rf"seed must be an integer >= 0, got {seed!r}"):
        GaussianMixture(3, seed=seed)
    assert_same_state(fitted, before)


# --- autocast ------------------------------------------------------------------------------------
def test_fit_under_autocast_runs_in_the_model_dtype():
    X = blobs(60).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch_em.ConvergenceWarning)
        plain = GaussianMixture(3, seed=0, max_iter=20).fit(X)
        plain_kmeans = KMeans(3, seed=0).fit(X)
        plain_online = GaussianMixture(3, seed=0).partial_fit(X)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = GaussianMixture(3, seed=0, max_iter=20).fit(X)
            mixed_kmeans = KMeans(3, seed=0).fit(X)
            mixed_online = GaussianMixture(3, seed=0).partial_fit(X)
            assert torch.equal(mixed_kmeans.predict(X), plain_kmeans.predict(X))
            assert torch.equal(mixed_kmeans.transform(X), plain_kmeans.transform(X))
    for name in ("weights", "means", "covariances"):
        assert getattr(mixed, name).dtype == F32
        assert torch.equal(getattr(mixed, name), getattr(plain, name)), name
        assert torch.equal(getattr(mixed_online, name), getattr(plain_online, name)), name
    assert torch.equal(mixed_kmeans.cluster_centers_, plain_kmeans.cluster_centers_)
    assert torch.equal(mixed_kmeans.inertia_, plain_kmeans.inertia_)


# --- the dtype of a fit follows the data -----------------------------------------------------------
@pytest.mark.parametrize("np_dtype, expected", [(np.float64, F64), (np.float32, F32)])
def test_fit_dtype_follows_numpy_data(np_dtype, expected):
    X = blobs(30).astype(np_dtype)
    model = GaussianMixture(3, seed=0).fit(X)
    assert model.dtype == expected and all(p.dtype == expected for p in model.parameters())
    assert model.score_samples(X).dtype == expected
    assert KMeans(3, seed=0).fit(X).cluster_centers_.dtype == expected
    assert GaussianMixture(3, seed=0).partial_fit(X).means.dtype == expected
    assert KMeans(3, seed=0).partial_fit(X).cluster_centers_.dtype == expected


def test_explicit_dtype_wins_over_the_data():
    X = blobs(30)  # float64
    assert GaussianMixture(3, seed=0, dtype=F32).fit(X).means.dtype == F32
    assert KMeans(3, seed=0, dtype=F32).fit(X).cluster_centers_.dtype == F32
    assert GaussianMixture(3, seed=0, dtype=F64).fit(X.astype(np.float32)).means.dtype == F64


def test_float64_fit_equals_explicit_float64():
    X = blobs(30)
    followed, explicit = GaussianMixture(3, seed=0).fit(X), GaussianMixture(3, seed=0, dtype=F64).fit(X)
    for name in ("weights", "means", "covariances", "lower_bound_"):
        assert torch.equal(getattr(followed, name), getattr(explicit, name)), name
    assert torch.equal(followed.score_samples(X), explicit.score_samples(X))
    kmeans, kmeans_explicit = KMeans(3, seed=0).fit(X), KMeans(3, seed=0, dtype=F64).fit(X)
    assert torch.equal(kmeans.cluster_centers_, kmeans_explicit.cluster_centers_)
    assert torch.equal(kmeans.inertia_, kmeans_explicit.inertia_)


@pytest.mark.parametrize("data", ["int64", "bool", "float16", "bfloat16", "list"])
def test_non_float_and_half_data_use_the_default_dtype(data):
    X = np.rint(blobs(30) * 10)
    values = {
        "int64": X.astype(np.int64), "bool": torch.as_tensor(X > 0), "float16": torch.as_tensor(X, dtype=torch.float16),
        "bfloat16": torch.as_tensor(X, dtype=torch.bfloat16), "list": X.tolist(),
    }[data]
    family = torch_em.Bernoulli() if data == "bool" else torch_em.Gaussian("diag")
    assert Mixture(family, 3, seed=0).fit(values).logits.dtype == torch.get_default_dtype()
    if data != "bool":
        assert KMeans(3, seed=0).fit(values).cluster_centers_.dtype == torch.get_default_dtype()


def test_existing_parameters_keep_their_dtype():
    X = blobs(30)
    built = GaussianMixture(3, 3, seed=0)  # n_features: parameters exist in the default dtype
    assert built.fit(X).means.dtype == torch.get_default_dtype()
    refit = GaussianMixture(3, seed=0).fit(X)  # float64 from now on
    assert refit.fit(X.astype(np.float32)).means.dtype == F64
    assert refit.partial_fit(X.astype(np.float32)).means.dtype == F64
    kmeans = KMeans(3, seed=0).fit(X)
    assert kmeans.fit(X.astype(np.float32)).cluster_centers_.dtype == F64


def test_a_cast_before_the_fit_fixes_the_dtype():
    X32 = blobs(30).astype(np.float32)
    assert GaussianMixture(3, seed=0).double().fit(X32).means.dtype == F64
    assert GaussianMixture(3, seed=0).to(F64).fit(X32).means.dtype == F64
    assert KMeans(3, seed=0).double().fit(X32).cluster_centers_.dtype == F64
    assert GaussianMixture(3, seed=0).to("cpu").fit(blobs(30)).means.dtype == F64  # a move keeps following


def test_fitted_model_still_converts_with_to():
    model = GaussianMixture(3, seed=0).fit(blobs(30).astype(np.float32)).double()
    assert model.means.dtype == F64 and model.score_samples(blobs(30)).dtype == F64
    kmeans = KMeans(3, seed=0).fit(blobs(30).astype(np.float32)).double()
    assert kmeans.cluster_centers_.dtype == F64 and kmeans.transform(blobs(30)).dtype == F64


def test_stream_takes_the_first_batch_dtype():
    X = blobs(30)
    batches = [X[:50], X[50:].astype(np.float32)]
    model = GaussianMixture(3, seed=0).fit(lambda: iter(batches))
    assert model.means.dtype == F64


def test_rejected_first_fit_leaves_the_model_following_its_data():
    model = GaussianMixture(3, seed=0)
    with pytest.raises(ValueError, match="X must be finite"):
        model.fit(np.full((30, 3), np.nan))
    assert not model.is_initialized
    assert model.fit(blobs(30).astype(np.float32)).means.dtype == F32


def test_state_dict_of_a_float64_fit_loads_into_a_model_without_dtype():
    X = blobs(30)
    source = GaussianMixture(3, seed=0).fit(X)
    for target in (GaussianMixture(3), GaussianMixture(3, 3)):
        target.load_state_dict(source.state_dict())
        assert target.means.dtype == F64
        assert torch.equal(target.score_samples(X), source.score_samples(X))
    fixed = GaussianMixture(3, dtype=F32)
    fixed.load_state_dict(source.state_dict())
    assert fixed.means.dtype == F32  # an explicit dtype wins here too


# --- overflow --------------------------------------------------------------------------------------
def test_magnitude_rule():
    n, d = 40, 3
    finfo = torch.finfo(F32)
    limit = math.sqrt(finfo.max / (MAGNITUDE_HEADROOM * math.log(finfo.max) * n * d))
    below = torch.zeros(n, d, dtype=F32)
    below[3, 1] = -0.99 * limit
    check_magnitude(below, "X", power=2, what="squares")
    above = below.clone()
    above[3, 1] = -1.01 * limit
    with pytest.raises(ValueError, match=r"X has entries up to .* in magnitude, but squares of N=40 points and D=3 "
                                         r"features overflow torch.float32 above .*; use dtype=torch.float64 or scale the data"):
        check_magnitude(above, "X", power=2, what="squares")


def test_issue_examples_raise_value_errors_not_index_errors():
    X = blobs(30).astype(np.float32) * 1e20
    for model in (GaussianMixture(3, seed=0), KMeans(3, seed=0)):
        with pytest.raises(ValueError, match=r"overflow torch.float32 .* use dtype=torch.float64 or scale the data"):
            model.fit(X)
    unit = GaussianMixture(3, seed=0).fit(blobs(30).astype(np.float32))
    before = state_of(unit)
    for call in ("score_samples", "score", "bic", "aic", "predict", "predict_proba"):
        with pytest.raises(ValueError, match="overflow torch.float32"):
            getattr(unit, call)(X)
    assert_same_state(unit, before)
    in_float64 = GaussianMixture(3, seed=0).fit(X.astype(np.float64))  # the remedy works
    assert bool(torch.isfinite(in_float64.score_samples(X.astype(np.float64))).all())


def test_points_far_from_a_narrow_model_raise_instead_of_nan():
    narrow = GaussianMixture(3, seed=0).fit(blobs(30).astype(np.float32) * 1e-3)  # variances ~1e-6
    far = np.full((2, 3), 5e16, dtype=np.float32)  # within the magnitude rule, but |x - mu|^2 / var overflows
    assert not bool(torch.isfinite(narrow.log_joint(far)).any())
    before = state_of(narrow)
    for call in ("score_samples", "score", "bic", "aic", "predict", "predict_proba"):
        with pytest.raises(ValueError, match=rf"{call}: the log-likelihood of X is not finite in torch.float32 .*"
                                             r"use dtype=torch.float64 or scale the data"):
            getattr(narrow, call)(far)
    assert_same_state(narrow, before)


MIXTURE_CALLS = ("score_samples", "score", "bic", "aic", "predict", "predict_proba")
KMEANS_CALLS = ("predict", "transform", "score")


def finite_or_value_error(call, *args) -> bool:
    """The call returns all-finite tensors (True) or raises ValueError (False); anything else
    fails the test."""
    try:
        result = call(*args)
    except ValueError:
        return False
    if isinstance(result, torch.nn.Module):
        result = [value for value in result.state_dict().values() if value.is_floating_point()]
    for value in result if isinstance(result, list) else [result]:
        assert bool(torch.isfinite(value.double()).all()), call
    return True


def sweep(dtype: np.dtype, exponents, covariance_type: str, in_range: int) -> None:
    """Data of largest magnitude 10**exponent; up to 10**in_range every call must succeed."""
    unit_mixture = GaussianMixture(3, covariance_type=covariance_type, seed=0).fit(blobs(20).astype(dtype))
    unit_kmeans = KMeans(3, seed=0).fit(blobs(20).astype(dtype))
    unit = blobs(20) / np.abs(blobs(20)).max()  # largest magnitude 1
    for exponent in exponents:
        X = (unit * 10.0 ** exponent).astype(dtype)
        assert np.isfinite(X).all()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch_em.ConvergenceWarning)
            mixture = GaussianMixture(3, covariance_type=covariance_type, seed=0, max_iter=20)
            assert finite_or_value_error(mixture.fit, X) or exponent > in_range
        for model in ([mixture] if mixture.is_initialized else []) + [unit_mixture]:
            for call in MIXTURE_CALLS:
                assert finite_or_value_error(getattr(model, call), X) or exponent > in_range
        if covariance_type == "full":
            kmeans = KMeans(3, seed=0, max_iter=20)
            assert finite_or_value_error(kmeans.fit, X) or exponent > in_range
            for model in ([kmeans] if kmeans.n_features is not None else []) + [unit_kmeans]:
                for call in KMEANS_CALLS:
                    assert finite_or_value_error(getattr(model, call), X) or exponent > in_range


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_float32_magnitudes_up_to_1e38_give_finite_results_or_value_errors(covariance_type):
    sweep(np.float32, range(0, 39, 2), covariance_type, in_range=12)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_float64_magnitudes_up_to_1e300_give_finite_results_or_value_errors(covariance_type):
    sweep(np.float64, (0, 100, 150, 160, 200, 300), covariance_type, in_range=100)


@pytest.mark.parametrize("family", [torch_em.Poisson(), torch_em.Exponential(), torch_em.Gamma()], ids=type)
def test_rate_families_give_finite_results_or_value_errors(family):
    for exponent in range(0, 39, 4):
        X = np.rint(np.random.default_rng(0).exponential(size=(60, 2)) * 10.0 ** exponent + 1).astype(np.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch_em.ConvergenceWarning)
            model = Mixture(family, 2, seed=0, max_iter=20)
            finite_or_value_error(model.fit, X)
        if model.is_initialized:
            for call in MIXTURE_CALLS:
                finite_or_value_error(getattr(model, call), X)


@settings(max_examples=25, deadline=None)
@given(exponent=st.floats(0, 38), n_points=st.integers(3, 40), covariance_type=st.sampled_from(COVARIANCE_TYPES))
def test_any_float32_magnitude_gives_finite_results_or_value_errors(exponent, n_points, covariance_type):
    X = np.random.default_rng(n_points).standard_normal((n_points, 2))
    X = (X / np.abs(X).max() * 10.0 ** exponent).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch_em.ConvergenceWarning)
        model = GaussianMixture(2, covariance_type=covariance_type, seed=0, max_iter=10)
        finite_or_value_error(model.fit, X)
    if model.is_initialized:
        for call in MIXTURE_CALLS:
            finite_or_value_error(getattr(model, call), X)
