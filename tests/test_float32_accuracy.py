"""float32 as accurate as scikit-learn's: log-densities from the same parameters on the datasets
bundled with scikit-learn, fits that scikit-learn float32 completes, and the mechanism behind it
(components evaluated directly and summarised about their own mean) against the plain path."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import torch_em
from torch_em import em, own_reference

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import float32_accuracy as accuracy  # noqa: E402

pytest.importorskip("sklearn")
COVARIANCE_TYPES = accuracy.COVARIANCE_TYPES
DATA = [(name, standardise) for name in accuracy.DATASETS for standardise in (False, True)]


@pytest.mark.parametrize("name, standardise", DATA, ids=[f"{n}-{'std' if s else 'raw'}" for n, s in DATA])
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_float32_log_density_within_10x_of_sklearn_float32(name, standardise, covariance_type):
    X = accuracy.load(name, standardise)
    for n_components in (2, 10):
        case = accuracy.torch_em_reference_fit(X, covariance_type, n_components)
        ours, theirs = accuracy.torch_em_float32_error(X, case), accuracy.sklearn_float32_error(X, case)
        assert ours <= 10 * theirs + 1e-7, (n_components, ours, theirs)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_constant_feature_clusters_float32_accuracy(covariance_type):
    X = accuracy.two_constant_clusters()
    case = accuracy.reference_fit(X, covariance_type, 2)
    ours, theirs = accuracy.torch_em_float32_error(X, case), accuracy.sklearn_float32_error(X, case)
    assert ours <= 10 * theirs + 1e-7


def constant_far_from_mean(offset: float) -> np.ndarray:
    """Two clusters; in the first, feature 2 is constant at ``offset`` (far from the data mean)."""
    rng = np.random.default_rng(0)
    a = np.c_[rng.normal(size=(200, 2)), np.full(200, offset)]
    b = np.c_[rng.normal(size=(200, 2)) + 4, rng.normal(size=200)]
    return np.concatenate([a, b])


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
@pytest.mark.parametrize("offset, dtype", [(1e3, torch.float32), (1e5, torch.float32), (1e5, torch.float64)])
def test_constant_feature_far_from_the_mean_fits(covariance_type, offset, dtype):
    X = constant_far_from_mean(offset)
    model = torch_em.GaussianMixture(2, covariance_type=covariance_type, seed=0, dtype=dtype).fit(X)
    labels = model.predict(torch.as_tensor(X, dtype=dtype))
    assert torch.isfinite(model.lower_bound_).all()
    # the two clusters are recovered
    assert len(set(labels[:200].tolist())) == 1 and len(set(labels[200:].tolist())) == 1
    assert labels[0] != labels[-1]
    means = model.means[labels[0]].double()
    np.testing.assert_allclose(means[2].item(), offset, rtol=1e-6)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_five_iris_rows_with_five_components_fit_in_float32(covariance_type):
    from sklearn.datasets import load_iris

    X = load_iris().data[:5]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch_em.ConvergenceWarning)
        model = torch_em.GaussianMixture(5, covariance_type=covariance_type, seed=0, dtype=torch.float32).fit(X)
    assert torch.isfinite(model.lower_bound_).all()
    assert torch.isfinite(model.score_samples(torch.as_tensor(X, dtype=torch.float32))).all()


@pytest.mark.parametrize("standardise", [False, True])
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_digits_with_ten_components_fit_in_float32(covariance_type, standardise):
    X = accuracy.load("digits", standardise)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch_em.ConvergenceWarning)
        model = torch_em.GaussianMixture(10, covariance_type=covariance_type, seed=1, dtype=torch.float32,
                                         max_iter=30).fit(X)
    assert torch.isfinite(model.lower_bound_).all()
    # what the float32 model reports is what its parameters give in float64
    import copy

    score = float(model.score(torch.as_tensor(X, dtype=torch.float32)))
    exact = float(copy.deepcopy(model).double().score(torch.as_tensor(X)))
    assert abs(score - exact) <= 1e-5 * abs(exact)


@pytest.mark.parametrize("seed", [0, 2])
def test_a_float32_covariance_indefinite_by_its_rounding_is_lifted_not_an_error(seed):
    # Standardised digits, full covariances: from these seeds a component's float32 covariance was
    # indefinite even in float64 after statistics about its own mean (IllConditionedError).
    X = accuracy.load("digits", True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch_em.ConvergenceWarning)
        model = torch_em.GaussianMixture(10, covariance_type="full", seed=seed, dtype=torch.float32, max_iter=30).fit(X)
    import copy

    score = float(model.score(torch.as_tensor(X, dtype=torch.float32)))
    exact = float(copy.deepcopy(model).double().score(torch.as_tensor(X)))
    assert abs(score - exact) <= 1e-5 * abs(exact)


def test_the_lift_raises_only_what_float64_cannot_factorise_and_by_its_rounding_level():
    from torch_em.families.gaussian import precision_cholesky_from_covariance

    g = torch.Generator().manual_seed(0)
    D = 40
    basis = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))[0]
    spectrum = torch.logspace(1, -7, D, dtype=torch.float64)  # down to below float32's rounding of 10
    good = (basis * torch.logspace(1, -1, D, dtype=torch.float64)) @ basis.T
    bad = (basis * spectrum) @ basis.T - 2e-6 * torch.eye(D, dtype=torch.float64)  # slightly indefinite
    covariance = torch.stack([good, bad]).float()
    plain, plain_info = precision_cholesky_from_covariance(covariance)
    lifted, lifted_info = precision_cholesky_from_covariance(covariance, lift=True)
    assert plain_info.tolist()[0] == 0 and plain_info.tolist()[1] > 0
    assert lifted_info.tolist() == [0, 0]
    assert torch.equal(lifted[0], plain[0])  # a matrix that factorises is left as it is
    # the lifted matrix: the covariance plus at most 16 rounding levels D * eps * mean variance
    precision = (lifted[1].double() @ lifted[1].double().T)
    implied = torch.linalg.inv(precision)
    level = D * torch.finfo(torch.float32).eps * float(covariance[1].double().diagonal().mean())
    lift = (implied - covariance[1].double()).diagonal()
    assert float(lift.min()) > 0 and float(lift.max()) <= 16 * level * 1.01


# --- the mechanism: own-reference components against the plain expansion (float64) ------------
@pytest.fixture
def every_component_own(monkeypatch):
    """Every Gaussian component evaluated directly and summarised about its own mean."""
    monkeypatch.setattr(own_reference, "FIT_ERROR_PER_FEATURE", -1.0)
    monkeypatch.setattr(own_reference, "NEGLIGIBLE_ERROR_PER_FEATURE", -1.0)
    monkeypatch.setattr(own_reference, "EVALUATION_ERROR_RATIO", 0.0)


def fit_blobs(**options) -> torch_em.GaussianMixture:
    from conftest import blobs

    return torch_em.GaussianMixture(3, seed=0, dtype=torch.float64, tol=0.0, max_iter=15, **options).fit(blobs())


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
@pytest.mark.parametrize("options", [{}, {"n_init": 3}, {"batch_shape": (2,)}, {"chunk_size": 97}],
                         ids=["plain", "restarts", "batched", "chunked"])
def test_own_reference_path_equals_the_expansion_in_float64(covariance_type, options, monkeypatch):
    from conftest import blobs

    plain = fit_blobs(covariance_type=covariance_type, **options)
    monkeypatch.setattr(own_reference, "FIT_ERROR_PER_FEATURE", -1.0)
    monkeypatch.setattr(own_reference, "NEGLIGIBLE_ERROR_PER_FEATURE", -1.0)
    monkeypatch.setattr(own_reference, "EVALUATION_ERROR_RATIO", 0.0)
    calls = []
    original = em.OwnReference.write_log_prob
    monkeypatch.setattr(em.OwnReference, "write_log_prob", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    own = fit_blobs(covariance_type=covariance_type, **options)
    assert calls, "the own-reference path did not run"
    for name in ("weights", "means", "covariances"):
        torch.testing.assert_close(getattr(own, name), getattr(plain, name), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(own.lower_bound_history_, plain.lower_bound_history_, rtol=1e-12, atol=1e-12)
    X = torch.as_tensor(blobs())
    torch.testing.assert_close(own.score_samples(X), plain.score_samples(X), rtol=1e-10, atol=1e-10)


def own_everywhere(monkeypatch) -> None:
    monkeypatch.setattr(own_reference, "FIT_ERROR_PER_FEATURE", -1.0)
    monkeypatch.setattr(own_reference, "NEGLIGIBLE_ERROR_PER_FEATURE", -1.0)
    monkeypatch.setattr(own_reference, "EVALUATION_ERROR_RATIO", 0.0)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_own_reference_path_with_per_model_data(covariance_type, monkeypatch):
    from conftest import blobs

    X = torch.as_tensor(np.stack([blobs(seed=0), blobs(seed=1)]))  # (2, N, 3): one dataset per model

    def fit():
        return torch_em.GaussianMixture(3, covariance_type=covariance_type, batch_shape=(2,), seed=0,
                                        dtype=torch.float64, tol=0.0, max_iter=10).fit(X)

    plain = fit()
    own_everywhere(monkeypatch)
    own = fit()
    torch.testing.assert_close(own.covariances, plain.covariances, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(own.means, plain.means, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(own.score_samples(X), plain.score_samples(X), rtol=1e-10, atol=1e-10)


def test_own_reference_path_streamed_equals_full_batch(every_component_own):
    from conftest import blobs

    X = torch.as_tensor(blobs())
    full = torch_em.GaussianMixture(3, seed=0, dtype=torch.float64, tol=0.0, max_iter=10).fit(X)
    streamed = torch_em.GaussianMixture(3, seed=0, dtype=torch.float64, tol=0.0, max_iter=10)
    streamed.fit(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X), batch_size=100))
    torch.testing.assert_close(streamed.means, full.means, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(streamed.covariances, full.covariances, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(streamed.lower_bound_, full.lower_bound_, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_direct_log_density_equals_torch_distributions(covariance_type, every_component_own):
    from conftest import blobs

    X = torch.as_tensor(blobs())
    model = fit_blobs(covariance_type=covariance_type)
    covariances = model.covariances.detach()
    if covariance_type == "tied":
        covariances = covariances.expand(3, 3, 3)
    elif covariance_type == "diag":
        covariances = torch.diag_embed(covariances)
    elif covariance_type == "spherical":
        covariances = covariances[:, None, None] * torch.eye(3, dtype=torch.float64)
    components = torch.distributions.MultivariateNormal(model.means.detach(), covariances)
    expected = torch.logsumexp(components.log_prob(X.unsqueeze(-2)) + model.weights.detach().log(), -1)
    torch.testing.assert_close(model.score_samples(X), expected, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_direct_log_density_gradients_equal_the_expansion(covariance_type, monkeypatch):
    from conftest import blobs

    model = fit_blobs(covariance_type=covariance_type)
    X = torch.as_tensor(blobs()[:40])

    def gradients() -> list[torch.Tensor]:
        model.zero_grad()
        x = X.clone().requires_grad_(True)
        model.log_prob(x).sum().backward()
        return [x.grad] + [parameter.grad.clone() for parameter in model.parameters()]

    plain = gradients()
    own_everywhere(monkeypatch)
    for own, expected in zip(gradients(), plain):
        torch.testing.assert_close(own, expected, rtol=1e-9, atol=1e-9)
    x = X[:8].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(model.log_prob, (x,))


@pytest.mark.parametrize("covariance_type", ["full", "tied"])
@pytest.mark.parametrize("n_features", [1, 2, 3])
def test_small_expansion_error_equals_the_general_path(covariance_type, n_features, monkeypatch):
    from torch_em.families import gaussian

    family = torch_em.Gaussian(covariance_type, 1e-6)
    generator = torch.Generator().manual_seed(0)
    theta = family.default_parameters((4,), 3, n_features, generator, "cpu", torch.float64)
    theta["raw_precision_cholesky"] = torch.randn(theta["raw_precision_cholesky"].shape, generator=generator,
                                                  dtype=torch.float64)
    shift = torch.randn(1, n_features, generator=generator, dtype=torch.float64)
    small = family.expansion_error(theta, shift)
    monkeypatch.setattr(gaussian, "SMALL_FEATURES", 0)  # the general path
    general = family.expansion_error(theta, shift)
    for a, b in zip(small, general):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0.0)
