"""BayesianGaussianMixture (variational Bayes) against scikit-learn's, and its contracts."""
from __future__ import annotations

import io
import re
import warnings

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans as SklearnKMeans
from sklearn.datasets import load_iris, load_wine
from sklearn.mixture import BayesianGaussianMixture as SklearnBayesianGaussianMixture

import torch_em
from torch_em import BayesianGaussianMixture

F32, F64 = torch.float32, torch.float64
COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")
PRIOR_TYPES = ("dirichlet_process", "dirichlet_distribution")
#: Measured: float32 fits of 30 iterations match scikit-learn's float64 to at most 1.3e-5
#: relative (lower bound, weights, means, covariances, score_samples) on iris and wine.
FLOAT32_RTOL = 1e-4
#: ... and posteriors to at most 3.4e-4 (wine's log-densities are large: an absolute error of
#: about 1e-3 nats in their differences).
FLOAT32_PROBA_FACTOR = 10.0


def synthetic(n: int = 300, seed: int = 0) -> np.ndarray:
    """Three anisotropic Gaussian blobs in 3-D."""
    rng = np.random.default_rng(seed)
    centres = np.array([[0.0, 0.0, 0.0], [6.0, 1.0, -2.0], [-3.0, 7.0, 2.0]])
    scales = [np.diag([1.0, 0.5, 2.0]), np.array([[1.0, 0.8, 0.0], [0.0, 1.0, 0.3], [0.0, 0.0, 0.6]]), np.eye(3) * 1.5]
    parts = [rng.standard_normal((n // 3, 3)) @ scale + centre for centre, scale in zip(centres, scales)]
    return np.concatenate(parts)


DATASETS = {"iris": lambda: load_iris().data, "wine": lambda: load_wine().data, "synthetic": synthetic}


def kmeans_labels(X: np.ndarray, K: int) -> np.ndarray:
    return SklearnKMeans(K, n_init=1, random_state=0).fit(X).labels_


def sklearn_from(resp: np.ndarray, **options) -> SklearnBayesianGaussianMixture:
    """scikit-learn's model started from the responsibilities ``resp`` (N, K) (its own
    ``_initialize(X, resp)``), as ``fit(X, resp_init=...)`` starts torch_em's."""
    class FromResponsibilities(SklearnBayesianGaussianMixture):
        def _initialize_parameters(self, X, random_state, xp=None):
            self._initialize(X, resp.astype(X.dtype))

    return FromResponsibilities(random_state=0, **options)


def numpy(value) -> np.ndarray:
    return np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value, dtype=np.float64)


def assert_close(actual, expected, rtol: float, what: str) -> None:
    actual, expected = numpy(actual), numpy(expected)
    scale = max(np.abs(expected).max(), 1e-300)
    error = np.abs(actual - expected).max() / scale
    assert error <= rtol, f"{what}: relative error {error:.3g} > {rtol:g}"


def assert_same_as_sklearn(model: BayesianGaussianMixture, reference: SklearnBayesianGaussianMixture, X: np.ndarray,
                           rtol: float, proba_factor: float = 1.0) -> None:
    assert_close(model.lower_bound_, reference.lower_bound_, rtol, "lower_bound_")
    for name in ("weights_", "means_", "covariances_", "precisions_", "precisions_cholesky_", "mean_precision_",
                 "degrees_of_freedom_"):
        assert_close(getattr(model, name), getattr(reference, name), rtol, name)
    concentration = model.weight_concentration_
    if isinstance(concentration, tuple):
        for ours, theirs in zip(concentration, reference.weight_concentration_):
            assert_close(ours, theirs, rtol, "weight_concentration_")
    else:
        assert_close(concentration, reference.weight_concentration_, rtol, "weight_concentration_")
    data = torch.as_tensor(X, dtype=model.dtype)
    assert_close(model.score_samples(data), reference.score_samples(X), rtol, "score_samples")
    # A posterior moves by r (1 - r) times the error of the log-density differences.
    assert_close(model.predict_proba(data), reference.predict_proba(X), max(rtol, 1e-9) * proba_factor, "predict_proba")


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
@pytest.mark.parametrize("prior_type", PRIOR_TYPES)
@pytest.mark.parametrize("dataset", list(DATASETS))
def test_equals_sklearn_in_float64_from_the_same_start(dataset, prior_type, covariance_type):
    X = DATASETS[dataset]()
    K = 5
    labels = kmeans_labels(X, K)
    options = dict(n_components=K, covariance_type=covariance_type, weight_concentration_prior_type=prior_type,
                   max_iter=500)
    reference = sklearn_from(np.eye(K)[labels], **options).fit(X)
    model = BayesianGaussianMixture(**options).fit(torch.tensor(X), resp_init=torch.tensor(labels))
    assert reference.converged_ and bool(model.converged_)
    assert int(model.n_iter_) == reference.n_iter_
    assert_same_as_sklearn(model, reference, X, 1e-6)
    np.testing.assert_array_equal(model.predict(torch.tensor(X)).numpy(), reference.predict(X))
    assert float(model.score(torch.tensor(X))) == pytest.approx(reference.score(X), rel=1e-9)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
@pytest.mark.parametrize("prior_type", PRIOR_TYPES)
@pytest.mark.parametrize("dataset", ["iris", "wine"])
def test_float32_is_close_to_sklearn(dataset, prior_type, covariance_type):
    X = DATASETS[dataset]()
    K = 4
    labels = kmeans_labels(X, K)
    options = dict(n_components=K, covariance_type=covariance_type, weight_concentration_prior_type=prior_type,
                   max_iter=30, tol=0.0)  # a fixed number of iterations: no convergence decided by rounding
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = sklearn_from(np.eye(K)[labels], **options).fit(X)
        model = BayesianGaussianMixture(**options).fit(torch.tensor(X, dtype=F32), resp_init=torch.tensor(labels))
    assert model.means_.dtype == F32 and int(model.n_iter_) == 30
    assert_same_as_sklearn(model, reference, X, FLOAT32_RTOL, proba_factor=FLOAT32_PROBA_FACTOR)


HYPERPARAMETERS = [
    ("weight_concentration_prior", lambda D, kind: 5.0),
    ("weight_concentration_prior", lambda D, kind: 1e-3),
    ("mean_precision_prior", lambda D, kind: 0.05),
    ("mean_prior", lambda D, kind: np.linspace(-1.0, 2.0, D)),
    ("degrees_of_freedom_prior", lambda D, kind: D + 3.5),
    ("degrees_of_freedom_prior", lambda D, kind: D - 0.5),
    ("covariance_prior", lambda D, kind: {"full": np.eye(D) * 0.5 + 0.1, "tied": np.diag(np.arange(1.0, D + 1)),
                                          "diag": np.arange(1.0, D + 1) / 4, "spherical": 0.3}[kind]),
]


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
@pytest.mark.parametrize("prior_type", PRIOR_TYPES)
@pytest.mark.parametrize("name, make", HYPERPARAMETERS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(HYPERPARAMETERS)])
def test_non_default_hyperparameters_equal_sklearn(name, make, prior_type, covariance_type):
    X = synthetic(240, seed=3)
    K = 4
    labels = kmeans_labels(X, K)
    value = make(X.shape[1], covariance_type)
    options = dict(n_components=K, covariance_type=covariance_type, weight_concentration_prior_type=prior_type,
                   max_iter=500, **{name: value})
    reference = sklearn_from(np.eye(K)[labels], **options).fit(X)
    model = BayesianGaussianMixture(**options).fit(torch.tensor(X), resp_init=torch.tensor(labels))
    assert int(model.n_iter_) == reference.n_iter_
    assert_same_as_sklearn(model, reference, X, 1e-6)
    assert_close(getattr(model, name + "_"), getattr(reference, name + "_"), 1e-12, name + "_")


def test_resolved_default_hyperparameters_are_sklearns():
    X = load_wine().data
    for covariance_type in COVARIANCE_TYPES:
        reference = SklearnBayesianGaussianMixture(n_components=3, covariance_type=covariance_type, max_iter=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reference.fit(X)
            model = BayesianGaussianMixture(3, covariance_type=covariance_type, max_iter=1, seed=0).fit(torch.tensor(X))
        for name in ("weight_concentration_prior_", "mean_precision_prior_", "mean_prior_", "degrees_of_freedom_prior_",
                     "covariance_prior_"):
            assert_close(getattr(model, name), getattr(reference, name), 1e-12, name)


def test_responsibilities_and_labels_give_the_same_start():
    X = torch.tensor(synthetic())
    labels = torch.tensor(kmeans_labels(X.numpy(), 4))
    by_labels = BayesianGaussianMixture(4, max_iter=5, tol=0.0).initialize(X, resp_init=labels)
    by_resp = BayesianGaussianMixture(4, max_iter=5, tol=0.0).initialize(
        X, resp_init=torch.nn.functional.one_hot(labels.long(), 4).double())
    assert int(by_labels.n_iter_) == 0 and float(by_labels.lower_bound_) == -np.inf
    for name, value in by_labels.state_dict().items():
        torch.testing.assert_close(by_resp.state_dict()[name], value, rtol=0, atol=0)


# --- batches, restarts, chunks, weights ---------------------------------------------------------------
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
@pytest.mark.parametrize("prior_type", PRIOR_TYPES)
def test_batched_fit_equals_stacked_single_fits(prior_type, covariance_type):
    # Per-model data and per-model hyperparameters; the models converge after different numbers
    # of iterations, so the running ones are compacted (their hyperparameters with them).
    generator = torch.Generator().manual_seed(1)
    M, N, D, K = 4, 150, 3, 5
    X = torch.randn(M, N, D, generator=generator, dtype=F64) + torch.randint(0, 3, (M, N, 1), generator=generator) * 4.0
    labels = torch.randint(0, K, (M, N), generator=generator)
    mean_precision = torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=F64)
    concentration = torch.tensor([0.01, 0.1, 1.0, 10.0], dtype=F64)
    options = dict(covariance_type=covariance_type, weight_concentration_prior_type=prior_type, max_iter=400)
    batched = BayesianGaussianMixture(K, batch_shape=(M,), mean_precision_prior=mean_precision,
                                      weight_concentration_prior=concentration, **options).fit(X, resp_init=labels)
    iterations = []
    for m in range(M):
        single = BayesianGaussianMixture(K, mean_precision_prior=float(mean_precision[m]),
                                         weight_concentration_prior=float(concentration[m]), **options)
        single.fit(X[m], resp_init=labels[m])
        iterations.append(int(single.n_iter_))
        assert int(batched.n_iter_[m]) == iterations[-1]
        torch.testing.assert_close(batched.lower_bound_[m], single.lower_bound_, rtol=1e-12, atol=1e-9)
        for name, value in single.state_dict().items():
            torch.testing.assert_close(batched.state_dict()[name][m], value, rtol=1e-9, atol=1e-11)
    assert len(set(iterations)) > 1  # compaction happened


def test_restarts_run_as_a_batch_and_the_best_bound_wins():
    X = torch.tensor(synthetic())
    one = BayesianGaussianMixture(6, seed=3, max_iter=300).fit(X)
    many = BayesianGaussianMixture(6, seed=3, n_init=4, max_iter=300).fit(X)
    assert float(many.lower_bound_) >= float(one.lower_bound_)
    bounds = []
    for seed in range(4):  # the best of 4 restarts is at least as good as most single fits
        bounds.append(float(BayesianGaussianMixture(6, seed=seed, max_iter=300).fit(X).lower_bound_))
    assert float(many.lower_bound_) >= np.median(bounds) - 1e-9


def test_chunked_fit_equals_full_batch():
    X = torch.tensor(load_iris().data)
    labels = torch.tensor(kmeans_labels(X.numpy(), 4))
    whole = BayesianGaussianMixture(4, covariance_type="full").fit(X, resp_init=labels)
    chunked = BayesianGaussianMixture(4, covariance_type="full", chunk_size=16).fit(X, resp_init=labels)
    assert int(chunked.n_iter_) == int(whole.n_iter_)
    for name, value in whole.state_dict().items():
        torch.testing.assert_close(chunked.state_dict()[name], value, rtol=1e-10, atol=1e-12)


def test_warm_started_steps_equal_one_long_fit():
    X = torch.tensor(load_iris().data)
    labels = torch.tensor(np.random.default_rng(0).integers(0, 4, len(X)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch_em.ConvergenceWarning)
        long = BayesianGaussianMixture(4, max_iter=20, tol=0.0).fit(X, resp_init=labels)
        stepped = BayesianGaussianMixture(4, max_iter=1, tol=0.0, warm_start=True).fit(X, resp_init=labels)
        for _ in range(19):
            stepped.fit(X)
    for name, value in long.state_dict().items():
        torch.testing.assert_close(stepped.state_dict()[name], value, rtol=0, atol=0)
    torch.testing.assert_close(stepped.lower_bound_, long.lower_bound_, rtol=0, atol=0)


def test_integer_weights_equal_repeated_rows():
    X = torch.tensor(synthetic(90))
    weights = torch.arange(90) % 3 + 1
    labels = torch.tensor(kmeans_labels(X.numpy(), 3))
    weighted = BayesianGaussianMixture(3, covariance_type="diag").fit(X, sample_weight=weights.double(), resp_init=labels)
    repeated = BayesianGaussianMixture(3, covariance_type="diag").fit(
        X.repeat_interleave(weights, 0), resp_init=labels.repeat_interleave(weights))
    assert int(weighted.n_iter_) == int(repeated.n_iter_)
    torch.testing.assert_close(weighted.lower_bound_, repeated.lower_bound_, rtol=1e-10, atol=0)
    torch.testing.assert_close(weighted.covariances_, repeated.covariances_, rtol=1e-9, atol=0)
    torch.testing.assert_close(weighted.weights_, repeated.weights_, rtol=1e-9, atol=0)


@pytest.mark.parametrize("prior_type", PRIOR_TYPES)
def test_unused_components_get_vanishing_weights(prior_type):
    X = torch.tensor(synthetic(600, seed=5))
    model = BayesianGaussianMixture(10, weight_concentration_prior_type=prior_type, weight_concentration_prior=1e-3,
                                    seed=0, max_iter=1000).fit(X)
    weights = model.weights_.detach().sort(descending=True).values
    torch.testing.assert_close(weights[:3], torch.full((3,), 1 / 3, dtype=F64), rtol=0, atol=0.01)
    # An empty stick ahead of used ones keeps E[v_k] = 1 / (2 + N_later) of what is left (as in
    # scikit-learn); an empty Dirichlet component keeps alpha_0 / (N + K alpha_0).
    bound = 2 / len(X) if prior_type == "dirichlet_process" else 1e-5
    assert float(weights[3:].max()) < bound
    assert len(set(model.predict(X).tolist())) == 3


def test_lower_bound_never_decreases():
    X = torch.tensor(load_wine().data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch_em.ConvergenceWarning)
        model = BayesianGaussianMixture(6, covariance_type="full", max_iter=60, tol=0.0, seed=0).fit(X)
    history = model.lower_bound_history_.double()
    assert history.shape[-1] == 60
    assert bool((history.diff() >= -1e-9 * history.abs()[1:]).all())


# --- evaluation, sampling, state --------------------------------------------------------------
def test_fit_predict_sample_and_unsupported_methods():
    X = torch.tensor(synthetic())
    model = BayesianGaussianMixture(4, seed=0)
    labels = model.fit_predict(X)
    torch.testing.assert_close(labels, model.predict(X))
    torch.testing.assert_close(model.predict_proba(X).sum(-1), torch.ones(len(X), dtype=F64))
    samples, components = model.sample(500, seed=1)
    assert samples.shape == (500, 3) and components.shape == (500,)
    assert set(components.tolist()) <= set(range(4))
    for call in (lambda: model.partial_fit(X), lambda: model.bic(X), lambda: model.aic(X)):
        with pytest.raises(NotImplementedError, match="BayesianGaussianMixture has no"):
            call()


@pytest.mark.parametrize("prior_type", PRIOR_TYPES)
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_state_dict_and_file_round_trip(prior_type, covariance_type):
    X = torch.tensor(synthetic())
    model = BayesianGaussianMixture(4, covariance_type=covariance_type, weight_concentration_prior_type=prior_type,
                                    seed=0, batch_shape=(2,), mean_precision_prior=torch.tensor([0.5, 2.0])).fit(X)
    fresh = BayesianGaussianMixture(4, covariance_type=covariance_type, weight_concentration_prior_type=prior_type,
                                    batch_shape=(2,))
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh.score_samples(X), model.score_samples(X), rtol=0, atol=0)
    torch.testing.assert_close(fresh.weights_, model.weights_, rtol=0, atol=0)
    buffer = io.BytesIO()
    model.save(buffer)
    buffer.seek(0)
    loaded = torch_em.load(buffer)
    assert type(loaded) is BayesianGaussianMixture and loaded.weight_concentration_prior_type == prior_type
    torch.testing.assert_close(loaded.predict_proba(X), model.predict_proba(X), rtol=0, atol=0)
    torch.testing.assert_close(loaded.lower_bound_, model.lower_bound_, rtol=0, atol=0)


def test_parameters_are_the_module_parameters():
    model = BayesianGaussianMixture(3, seed=0).fit(torch.tensor(synthetic()))
    names = [name for name, _ in model.named_parameters()]
    assert names == ["log_weight_concentration", "loc", "raw_precision_cholesky", "log_mean_precision",
                     "log_degrees_of_freedom"]
    model.means_.sum().backward()
    assert model.loc.grad is not None


# --- bad input ----------------------------------------------------------------------------------------
def test_bad_constructor_arguments_name_them():
    cases = [
        (dict(weight_concentration_prior_type="dirichlet"), "weight_concentration_prior_type must be one of"),
        (dict(weight_concentration_prior=-1.0), "weight_concentration_prior must be positive, got minimum -1"),
        (dict(mean_precision_prior=0.0), "mean_precision_prior must be positive, got minimum 0"),
        (dict(mean_precision_prior=[1.0, 2.0]), re.escape("mean_precision_prior must have shape ()")),
        (dict(covariance_type="full-ish"), "covariance_type must be one of"),
        (dict(init_params="best"), "init_params must be one of"),
        (dict(degrees_of_freedom_prior=1.5, n_features=3), "degrees_of_freedom_prior must be greater than n_features - 1 = 2, got 1.5"),
    ]
    for options, message in cases:
        with pytest.raises(ValueError, match=message):
            BayesianGaussianMixture(3, **options)


def test_rejected_fit_changes_nothing():
    X = torch.tensor(synthetic())
    model = BayesianGaussianMixture(4, seed=0).fit(X)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    attributes = (model.lower_bound_.clone(), model.n_iter_.clone(), model.mean_prior_.clone())
    N, D = X.shape
    bad_calls = [
        (dict(resp_init=torch.ones(N, 4)), "resp_init must be non-negative with rows summing to 1"),
        (dict(resp_init=torch.full((N - 1, 4), 0.25)), re.escape(f"resp_init must have shape ({N}, 4)")),
        (dict(resp_init=torch.full((N,), 4)), re.escape("resp_init labels must lie in [0, 4)")),
        (dict(resp_init=torch.ones(N, dtype=torch.bool)), "resp_init must hold responsibilities .* got dtype torch.bool"),
        (dict(resp_init=[[0.5, "a"]]), "resp_init must be an array of responsibilities or labels"),
    ]
    for kwargs, message in bad_calls:
        with pytest.raises(ValueError, match=message):
            model.fit(X + 1.0, **kwargs)
    bad_models = [
        (BayesianGaussianMixture(4, degrees_of_freedom_prior=2.0), "degrees_of_freedom_prior must be greater than n_features - 1 = 2, got 2"),
        (BayesianGaussianMixture(4, mean_prior=[0.0, 1.0]), re.escape("mean_prior must have shape (3,)")),
        (BayesianGaussianMixture(4, covariance_prior=-np.eye(3)), "full covariance_prior must be positive definite"),
        (BayesianGaussianMixture(4, covariance_prior=np.triu(np.ones((3, 3)))), "full covariance_prior must be symmetric"),
        (BayesianGaussianMixture(4, covariance_type="diag", covariance_prior=[1.0, -1.0, 1.0]),
         "diag covariance_prior must be positive, got minimum -1"),
        (BayesianGaussianMixture(4, covariance_type="spherical", covariance_prior=[1.0]), re.escape("covariance_prior must have shape ()")),
        (BayesianGaussianMixture(4, n_init=2), "resp_init gives every restart the same start: use n_init=1, got n_init=2"),
    ]
    for bad, message in bad_models:
        if bad.covariance_type == model.covariance_type:
            bad.load_state_dict(model.state_dict())
        saved = {name: value.clone() for name, value in bad.state_dict().items()}
        with pytest.raises(ValueError, match=message):
            bad.fit(X, resp_init=torch.zeros(N, dtype=torch.long))
        assert bad.state_dict().keys() == saved.keys() and bad.family.prior is None
        for name, value in saved.items():
            assert torch.equal(bad.state_dict()[name], value)
    with pytest.raises(ValueError, match="X must be an array or tensor in memory"):
        model.fit(lambda: iter([X]))
    with pytest.raises(ValueError, match="X must have at least 4 sample"):
        model.fit(X[:3])
    for name, value in before.items():
        assert torch.equal(model.state_dict()[name], value), name
    assert torch.equal(model.lower_bound_, attributes[0]) and torch.equal(model.n_iter_, attributes[1])
    assert torch.equal(model.mean_prior_, attributes[2])


def test_hyperparameters_before_a_fit_are_not_fitted():
    model = BayesianGaussianMixture(3, n_features=2)
    with pytest.raises(torch_em.NotFittedError):
        model.mean_prior_
    assert model.weights_.shape == (3,)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_cuda_fit_equals_cpu(covariance_type):
    X = torch.tensor(load_iris().data)
    labels = torch.tensor(kmeans_labels(X.numpy(), 4))
    cpu = BayesianGaussianMixture(4, covariance_type=covariance_type).fit(X, resp_init=labels)
    cuda = BayesianGaussianMixture(4, covariance_type=covariance_type, device="cuda").fit(X.cuda(), resp_init=labels)
    assert int(cuda.n_iter_) == int(cpu.n_iter_)
    torch.testing.assert_close(cuda.lower_bound_.cpu(), cpu.lower_bound_, rtol=1e-9, atol=0)
    torch.testing.assert_close(cuda.covariances_.cpu(), cpu.covariances_, rtol=1e-8, atol=1e-12)
    batched = BayesianGaussianMixture(4, covariance_type=covariance_type, device="cuda", dtype=F32, batch_shape=(8,),
                                      n_init=2, seed=0).fit(X.float().cuda())
    assert bool(torch.isfinite(batched.lower_bound_).all())


# --- the engine's contract for the variational pair ------------------------------------------------
def variational_problem():
    """Data (N, 3), the variational latent structure and family with resolved priors, and a start."""
    X = torch.tensor(synthetic(120))
    model = BayesianGaussianMixture(3, covariance_type="full", max_iter=1, tol=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(X, resp_init=torch.tensor(kmeans_labels(X.numpy(), 3)))
    return X, model.latent, model.family, model._working_parameters().map(lambda value: value.detach().clone())


def test_variational_statistics_add_over_chunks_batches_and_streams():
    X, latent, family, params = variational_problem()
    reference = family.reference(X)
    whole = torch_em.em.e_step(latent, family, params, torch_em.em.Data(family, X, reference, 1000))
    chunked = torch_em.em.e_step(latent, family, params, torch_em.em.Data(family, X, reference, 13))
    stream = torch_em.em.StreamData(family, lambda: iter([(part, None) for part in X.split(31)]), reference, len(X),
                                    1000, torch_em.em.Data(family, X, reference, 1000))
    streamed = torch_em.em.e_step(latent, family, params, stream)
    for other in (chunked, streamed):
        torch.testing.assert_close(other.sums, whole.sums, rtol=1e-12, atol=1e-10)
        torch.testing.assert_close(other.latent["entropy"], whole.latent["entropy"], rtol=1e-12, atol=1e-10)
    assert float(whole.latent["entropy"]) > 0


def test_variational_em_map_never_decreases_the_bound():
    X, latent, family, params = variational_problem()
    em_map = torch_em.em.EMMap(latent, family, torch_em.em.Data(family, X, family.reference(X), 1000))
    active = torch.ones(1, 1, dtype=torch.bool)
    bounds = []
    for _ in range(20):
        step = em_map(params, active)
        bounds.append(float(step.objective))
        params = step.params
    assert all(b >= a - 1e-9 * abs(a) for a, b in zip(bounds, bounds[1:])) and bounds[-1] > bounds[0]
