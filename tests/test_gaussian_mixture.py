"""Properties of GaussianMixture fits: monotone EM, restarts, seeds, float32 vs float64,
persistence, numerics, gradients, sampling, devices and dtypes, progress and warnings.

Agreement with scikit-learn lives in test_against_sklearn.py; batching in test_batched.py; bad
input in test_validation.py.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import torch_em
from conftest import COVARIANCE_TYPES, blobs

F64 = torch.float64
INITS = ["k-means++", "kmeans", "random", "random_from_data"]
FITTED = ("weights", "means", "covariances", "precisions", "precisions_cholesky")
FIVE_CLUSTERS = [(0, 0, 0), (2, 2, 0), (0, 3, 1), (3, 0, 2), (1, 1, 3)]  # overlapping: several local optima


def quiet_fit(model: torch_em.GaussianMixture, X, **kwargs) -> torch_em.GaussianMixture:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch_em.ConvergenceWarning)
        return model.fit(X, **kwargs)


def detached(model: torch_em.GaussianMixture) -> dict[str, torch.Tensor]:
    values = {name: getattr(model, name).detach().clone() for name in FITTED}
    for name in ("converged_", "n_iter_", "lower_bound_", "lower_bound_history_"):
        values[name] = getattr(model, name).clone()
    return values


def simple_precisions(covariance_type: str, n_components: int, n_features: int, scale: float = 0.5) -> np.ndarray:
    return {
        "full": np.broadcast_to(scale * np.eye(n_features), (n_components, n_features, n_features)).copy(),
        "tied": scale * np.eye(n_features),
        "diag": np.full((n_components, n_features), scale),
        "spherical": np.full(n_components, scale),
    }[covariance_type]


def dense_covariances(model: torch_em.GaussianMixture) -> torch.Tensor:
    """Covariances as (*batch, K, D, D) matrices whatever the covariance type."""
    covariances = model.covariances.detach()
    K, D = model.n_components, model.n_features
    if model.covariance_type == "tied":
        return covariances.unsqueeze(-3).expand(*covariances.shape[:-2], K, D, D)
    if model.covariance_type == "diag":
        return torch.diag_embed(covariances)
    if model.covariance_type == "spherical":
        return covariances[..., None, None] * torch.eye(D, dtype=covariances.dtype)
    return covariances


# --- 1. monotone EM --------------------------------------------------------------------------
@pytest.mark.parametrize("init_params", INITS)
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_lower_bound_never_decreases(covariance_type, init_params):
    # EM cannot decrease the likelihood; float64 rounding is ~1e-16 relative, so 1e-9 relative is
    # generous yet far below what a wrong M-step costs. (reg_covar > 0 makes the M-step a slightly
    # regularised maximiser: on these well-populated clusters that costs < 1e-11 relative.
    # Re-seeding an emptied component is not an EM step; the weight check below rules it out.)
    X = blobs(40)
    for seed in (0, 1, 2):
        model = quiet_fit(torch_em.GaussianMixture(3, covariance_type=covariance_type, init_params=init_params,
                                                   tol=1e-12, max_iter=40, seed=seed, batch_shape=(2,), dtype=F64), X)
        assert float(model.weights.detach().min()) > 1e-3  # no component ended empty
        history = model.lower_bound_history_
        assert history.shape[-1] == int(model.n_iter_.max())
        assert bool(torch.isfinite(history).all())
        steps = history[..., 1:] - history[..., :-1]
        assert bool((steps >= -1e-9 * history[..., 1:].abs()).all()), (seed, steps.min())
        assert torch.equal(history[..., -1], model.lower_bound_)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_first_lower_bound_is_the_likelihood_of_the_initial_parameters(covariance_type):
    X = blobs(30)
    init = dict(weights_init=[0.2, 0.3, 0.5], means_init=X[[0, 40, 100]],
                precisions_init=simple_precisions(covariance_type, 3, 3))
    start = torch_em.GaussianMixture(3, 3, covariance_type=covariance_type, dtype=F64, **init)  # parameters = init
    model = torch_em.GaussianMixture(3, covariance_type=covariance_type, dtype=F64, **init).fit(X)
    torch.testing.assert_close(model.lower_bound_history_[0], start.score(X), rtol=1e-12, atol=0)
    assert float(model.lower_bound_) > float(start.score(X)) + 0.1  # EM improved a lot on this rough start


# --- 4. restarts -----------------------------------------------------------------------------
def test_more_restarts_are_never_worse():
    """Restart r draws from its own stream seeded by (seed, r), so n_init=k runs the restarts of
    n_init=j < k plus more: its best lower bound cannot be lower (up to rounding: BLAS kernels
    chosen by the number of rows, R * M * K, may round a restart's GEMM differently)."""
    X = blobs(25, centres=FIVE_CLUSTERS)
    improved = False
    for seed in range(3):
        bounds = [float(torch_em.GaussianMixture(5, init_params="random", n_init=k, seed=seed, dtype=F64)
                        .fit(X).lower_bound_) for k in (1, 2, 3, 5)]
        assert all(later >= earlier - 1e-12 * abs(earlier) for earlier, later in zip(bounds, bounds[1:])), (seed, bounds)
        improved |= bounds[-1] > bounds[0] + 1e-6
    assert improved, "the restarts should find different optima on these overlapping clusters"


def test_best_restart_is_reported_consistently():
    """lower_bound_, n_iter_, history and the parameters all come from the chosen restart."""
    X = blobs(25, centres=FIVE_CLUSTERS)
    model = torch_em.GaussianMixture(5, init_params="random", n_init=5, tol=1e-9, max_iter=500, seed=1, dtype=F64).fit(X)
    assert bool(model.converged_)
    n_iter = int(model.n_iter_)
    history = model.lower_bound_history_  # as long as the longest restart, padded after convergence
    assert history.dim() == 1 and history.shape[0] >= n_iter
    assert bool((history[n_iter - 1:] == model.lower_bound_).all())
    assert float(history[n_iter - 2]) != float(model.lower_bound_)
    # Converged within tol=1e-9: the final parameters score what the lower bound says (another
    # restart's optimum differs by ~1e-3 here).
    assert abs(float(model.score(X)) - float(model.lower_bound_)) < 1e-6


# --- 5. seeds --------------------------------------------------------------------------------
@pytest.mark.parametrize("init_params", INITS)
def test_same_seed_same_fit(init_params):
    X = blobs(30)

    def fit() -> dict:
        model = torch_em.GaussianMixture(3, init_params=init_params, n_init=2, batch_shape=(2,), max_iter=5, tol=0.0,
                                         seed=11, dtype=F64)
        return detached(quiet_fit(model, X))

    torch.manual_seed(0)
    first = fit()
    torch.manual_seed(1)  # the global generator plays no part when a seed is given
    second = fit()
    for name, value in first.items():
        assert torch.equal(value, second[name]), name


@pytest.mark.parametrize("init_params", INITS)
def test_different_seeds_different_initialisation(init_params):
    # A structureless cloud: every initialisation method lands somewhere different per seed.
    X = np.random.default_rng(0).normal(size=(120, 2))
    means = [quiet_fit(torch_em.GaussianMixture(4, init_params=init_params, max_iter=1, tol=0.0, seed=seed, dtype=F64),
                       X).means.detach() for seed in range(3)]
    for a in range(3):
        for b in range(a + 1, 3):
            assert not torch.allclose(means[a], means[b]), (a, b)


def test_no_seed_follows_the_global_generator():
    X = blobs(30)

    def fit() -> torch.Tensor:
        return quiet_fit(torch_em.GaussianMixture(3, init_params="random", max_iter=2, dtype=F64), X).means.detach()

    torch.manual_seed(5)
    a = fit()
    torch.manual_seed(5)
    b = fit()
    c = fit()
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# --- 6. float32 vs float64 -------------------------------------------------------------------
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_float32_agrees_with_float64_in_a_batch(covariance_type):
    # Two models, per-model data, identical user-supplied initial parameters, 10 EM iterations.
    # float32 has eps = 1.2e-7; sums over N ~ 200 points lose ~sqrt(N) eps ~ 2e-6 relative, and on
    # these well-separated, well-conditioned clusters (condition numbers ~10) EM contracts rather
    # than amplifies the error, so 1e-4 relative leaves a margin of over 10x (the observed
    # error is up to ~7e-6, in the covariances). Lower bounds are averages of O(1) terms: 1e-5 relative.
    data = np.stack([blobs(40, seed=3), blobs(40, seed=4)])
    init = {
        "weights_init": np.array([[0.2, 0.3, 0.5], [0.4, 0.4, 0.2]]),
        "means_init": data[:, [0, 50, 150]],
        "precisions_init": np.stack([simple_precisions(covariance_type, 3, 3, 0.3),
                                     simple_precisions(covariance_type, 3, 3, 0.6)]),
    }
    options = dict(covariance_type=covariance_type, batch_shape=(2,), max_iter=10, tol=0.0, **init)
    double = quiet_fit(torch_em.GaussianMixture(3, dtype=F64, **options), data)
    single = quiet_fit(torch_em.GaussianMixture(3, dtype=torch.float32, **options), data.astype(np.float32))
    assert single.means.dtype == torch.float32 and single.lower_bound_.dtype == torch.float32
    for name in ("weights", "means", "covariances"):
        expected = getattr(double, name).detach()
        torch.testing.assert_close(getattr(single, name).detach().double(), expected, rtol=1e-4,
                                   atol=1e-4 * float(expected.abs().max()))
    torch.testing.assert_close(single.lower_bound_.double(), double.lower_bound_, rtol=1e-5, atol=0)


# --- 7. persistence --------------------------------------------------------------------------
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_state_dict_round_trip(covariance_type, tmp_path):
    X = blobs(30)
    model = torch_em.GaussianMixture(3, covariance_type=covariance_type, batch_shape=(2,), seed=0, dtype=F64).fit(X)
    state = model.state_dict()
    assert {name for name, value in state.items() if torch.is_tensor(value)} == {"logits", "loc", "raw_precision_cholesky"}
    expected = model.log_prob(X)
    options = dict(covariance_type=covariance_type, batch_shape=(2,), dtype=F64)
    without = torch_em.GaussianMixture(3, **options)
    with_features = torch_em.GaussianMixture(3, 3, **options)
    for fresh in (without, with_features):
        fresh.load_state_dict(state)
        assert fresh.n_features == 3
        assert torch.equal(fresh.log_prob(X), expected)
        for name in FITTED:
            assert torch.equal(getattr(fresh, name), getattr(model, name)), name
        assert torch.equal(fresh.sample(20, seed=3)[0], model.sample(20, seed=3)[0])
    path = tmp_path / "gmm.pt"
    torch.save(state, path)
    loaded = torch_em.GaussianMixture(3, **options)
    loaded.load_state_dict(torch.load(path, weights_only=True))
    assert torch.equal(loaded.log_prob(X), expected)
    # A loaded model can be fitted further (EM continues from where it is).
    quiet_fit(loaded, X)
    assert bool(torch.isfinite(loaded.means).all())


def test_refit_updates_the_same_parameter_objects():
    """EM writes parameters in place, so an optimizer built before a (re)fit keeps working."""
    X = blobs(30)
    model = torch_em.GaussianMixture(3, 3, covariance_type="diag", seed=0, dtype=F64)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    before = {name: id(parameter) for name, parameter in model.named_parameters()}
    model.fit(X)
    assert {name: id(parameter) for name, parameter in model.named_parameters()} == before
    assert all(isinstance(p, torch.nn.Parameter) and p.requires_grad for p in model.parameters())
    fitted = model.log_prob(X).mean()
    optimizer.zero_grad()
    (-model.log_prob(X).mean()).backward()
    optimizer.step()
    assert not torch.equal(model.log_prob(X).mean(), fitted)  # the optimizer moved the fitted parameters


def test_model_built_with_n_features_is_usable_before_fit():
    model = torch_em.GaussianMixture(3, 2, covariance_type="full", seed=0, dtype=F64)
    X = np.random.default_rng(0).normal(size=(10, 2))
    assert model.log_prob(X).shape == (10,)
    assert torch.allclose(model.weights, torch.full((3,), 1 / 3, dtype=F64))
    torch.testing.assert_close(model.covariances.detach(), torch.eye(2, dtype=F64).expand(3, 2, 2))
    again = torch_em.GaussianMixture(3, 2, covariance_type="full", seed=0, dtype=F64)
    assert torch.equal(again.means, model.means)  # the seed fixes the random starting means


# --- 9. numerics -----------------------------------------------------------------------------
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_component_with_zero_initial_weight_is_reseeded(covariance_type):
    X = blobs(30)
    model = torch_em.GaussianMixture(3, covariance_type=covariance_type, weights_init=[0.5, 0.5, 0.0],
                                     means_init=X[[0, 40, 100]], dtype=F64).fit(X)
    for name in FITTED:
        assert bool(torch.isfinite(getattr(model, name)).all()), name
    assert bool(torch.isfinite(model.lower_bound_history_).all())
    assert float(model.weights.detach().min()) > 0.05, model.weights


@pytest.mark.parametrize("covariance_type", ["full", "diag", "spherical"])
def test_duplicate_initial_means_are_separated(covariance_type):
    # Two identical means_init: nearest-centre assignment gives the second no points, so the
    # initial M-step re-seeds it; its mean is then overridden by means_init, but its own initial
    # covariance and weight differ, so EM pulls the twins apart onto clusters of their own.
    # (Not "tied": two components with equal means and a shared covariance are a fixed point of EM.)
    X = blobs(30)
    means = X[[0, 0, 100]]
    model = torch_em.GaussianMixture(3, covariance_type=covariance_type, means_init=means, dtype=F64).fit(X)
    for name in FITTED:
        assert bool(torch.isfinite(getattr(model, name)).all()), name
    assert float(model.weights.detach().min()) > 0.02, model.weights
    distances = torch.cdist(model.means.detach(), model.means.detach())
    assert float(distances[~torch.eye(3, dtype=torch.bool)].min()) > 1.0


@pytest.mark.parametrize("covariance_type", ["full", "tied", "diag", "spherical"])
def test_singular_covariance_raises_and_changes_nothing(covariance_type):
    X = blobs(30)
    bad = X.copy()
    if covariance_type == "spherical":
        bad[:] = bad[0]  # spherical variance averages the features: only identical points make it zero
    else:
        bad[:, 1] = 2.0  # a constant feature
    model = torch_em.GaussianMixture(3, covariance_type=covariance_type, seed=0, dtype=F64).fit(X)
    before = detached(model)
    model.family.reg_covar = 0.0
    with pytest.raises(torch_em.IllConditionedError, match=r"component \d.*reg_covar") as info:
        model.fit(bad)
    assert isinstance(info.value, ValueError)
    for name, value in before.items():
        assert torch.equal(value, getattr(model, name).detach()), name


def test_error_inside_the_em_loop_changes_nothing():
    # Initial precisions so large that every squared distance overflows: the first E-step's
    # log-likelihood is not finite. The error comes from inside the EM loop, after initialisation.
    X = blobs(30)
    model = torch_em.GaussianMixture(3, covariance_type="spherical", seed=0, dtype=F64).fit(X)
    before = detached(model)
    model.family.precisions_init = np.full(3, 1e308)
    with pytest.raises(torch_em.IllConditionedError, match=r"EM iteration 1: the log-likelihood .* not finite"):
        model.fit(X)
    for name, value in before.items():
        assert torch.equal(value, getattr(model, name).detach()), name


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_collapse_onto_duplicate_points_raises(covariance_type):
    # Four identical points away from the data mean: with reg_covar=0 the second component
    # shrinks onto them and its covariance is exactly zero (scikit-learn raises here). One-pass
    # statistics, E[x x^T] - mu mu^T about the data mean, leave ~eps |x - mean|^2 of rounding noise
    # there, which must not pass for a positive-definite covariance.
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(size=(60, 2)), np.tile([[4.0, 4.0]], (4, 1))])
    model = torch_em.GaussianMixture(2, covariance_type=covariance_type, reg_covar=0.0, means_init=[[0.0, 0.0], [3.5, 3.5]],
                                     max_iter=300, dtype=F64)
    with pytest.raises(torch_em.IllConditionedError, match=r"component 1 .*reg_covar"):
        quiet_fit(model, X)


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_fully_specified_initialisation_is_used_as_given(covariance_type):
    # The second feature of cluster B is exactly the data mean (0), so the hard assignment to the
    # nearest initial mean gives component 1 a zero variance there. With reg_covar=0 that initial
    # M-step is singular, but it is never used: every parameter is given, and the first E-step's
    # soft responsibilities (unit precisions) give component 1 a small positive variance.
    rng = np.random.default_rng(0)
    A = np.stack([rng.normal(size=60), np.tile([-2.0, -1.0, -0.5, 0.5, 1.0, 2.0], 10)], 1)
    B = np.stack([8 + rng.normal(size=20), np.zeros(20)], 1)
    X = np.concatenate([A, B])
    precisions = np.stack([np.eye(2)] * 2) if covariance_type == "full" else np.ones((2, 2))
    model = torch_em.GaussianMixture(2, covariance_type=covariance_type, reg_covar=0.0, weights_init=[0.5, 0.5],
                                     means_init=[[0.0, 0.0], [8.0, 0.0]], precisions_init=precisions, max_iter=1,
                                     dtype=F64)
    quiet_fit(model, X)
    assert bool(torch.isfinite(model.covariances).all())


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["float32", "float64"])
def test_far_from_origin(covariance_type, dtype):
    X = blobs(30)
    offset = 1e4
    numpy_dtype = np.float32 if dtype == torch.float32 else np.float64
    init = dict(weights_init=np.full(3, 1 / 3), means_init=X[[0, 40, 100]],
                precisions_init=simple_precisions(covariance_type, 3, 3))
    options = dict(covariance_type=covariance_type, max_iter=10, tol=0.0, dtype=dtype)
    near = quiet_fit(torch_em.GaussianMixture(3, **init, **options), X.astype(numpy_dtype))
    far = quiet_fit(torch_em.GaussianMixture(3, **dict(init, means_init=init["means_init"] + offset), **options),
                    (X + offset).astype(numpy_dtype))
    # float32 resolves coordinates near 1e4 to ~1e-3; statistics are taken about the data mean, so
    # covariances (of order 1) keep ~1e-3 relative accuracy. float64 is ~1e9 times finer.
    tolerance = 1e-2 if dtype == torch.float32 else 1e-8
    torch.testing.assert_close(far.means.detach() - offset, near.means.detach(), rtol=0, atol=tolerance)
    torch.testing.assert_close(far.covariances.detach(), near.covariances.detach(), rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(far.weights.detach(), near.weights.detach(), rtol=0, atol=tolerance)
    torch.testing.assert_close(far.score(X + offset), near.score(X), rtol=tolerance, atol=0)


# --- 10. gradients ---------------------------------------------------------------------------
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_gradcheck_batched_per_model_data(covariance_type):
    generator = torch.Generator().manual_seed(0)
    model = torch_em.GaussianMixture(2, 2, covariance_type=covariance_type, batch_shape=(2,), seed=0, dtype=F64)
    names = [name for name, _ in model.named_parameters()]
    assert names == ["logits", "loc", "raw_precision_cholesky"]
    values = [(p.detach() + 0.3 * torch.randn(p.shape, generator=generator, dtype=F64)).requires_grad_()
              for p in model.parameters()]
    X = torch.randn(2, 5, 2, generator=generator, dtype=F64, requires_grad=True)

    def log_prob(x, *params):
        return torch.func.functional_call(model, dict(zip(names, params)), (x,))

    assert torch.autograd.gradcheck(log_prob, (X, *values))


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_log_prob_and_its_gradient_match_torch_distributions(covariance_type):
    X = blobs(30)
    model = torch_em.GaussianMixture(3, covariance_type=covariance_type, batch_shape=(2,), seed=0, dtype=F64).fit(X)
    covariances = dense_covariances(model)
    reference = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(probs=model.weights.detach()),
        torch.distributions.MultivariateNormal(model.means.detach(), covariance_matrix=covariances),
    )
    points = torch.as_tensor(blobs(10, seed=5), dtype=F64)  # held-out points
    ours_x = points.clone().requires_grad_()
    theirs_x = points.clone().requires_grad_()
    ours = model.log_prob(ours_x)  # (2, N)
    theirs = reference.log_prob(theirs_x.unsqueeze(-2).expand(-1, 2, -1)).T
    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-10, atol=1e-10)
    ours.sum().backward()
    theirs.sum().backward()
    torch.testing.assert_close(ours_x.grad, theirs_x.grad, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("covariance_type", ["full", "tied"])
def test_strictly_lower_entries_get_no_gradient(covariance_type):
    model = torch_em.GaussianMixture(2, 3, covariance_type=covariance_type, seed=0, dtype=F64)
    X = torch.randn(7, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    model.log_prob(X).sum().backward()
    grad = model.raw_precision_cholesky.grad
    lower = torch.ones(3, 3, dtype=torch.bool).tril(-1)
    assert bool((grad[..., lower] == 0).all())
    assert bool((grad[..., ~lower] != 0).any())
    assert model.logits.grad is not None and model.loc.grad is not None


# --- 11. sampling ----------------------------------------------------------------------------
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_samples_follow_the_model(covariance_type):
    data = np.stack([blobs(40, seed=6), blobs(40, seed=7)])
    model = torch_em.GaussianMixture(3, covariance_type=covariance_type, batch_shape=(2,), seed=0, dtype=F64).fit(data)
    n = 30_000
    samples, labels = model.sample(n, seed=1)
    assert samples.shape == (2, n, 3) and labels.shape == (2, n)
    assert samples.dtype == F64 and labels.dtype == torch.long
    assert int(labels.min()) >= 0 and int(labels.max()) < 3
    full_covariances = dense_covariances(model)
    for b in range(2):
        share = torch.bincount(labels[b], minlength=3).double() / n
        # Standard errors: share ~sqrt(0.25/n) = 3e-3; mean ~sigma/sqrt(n_k) ~ 2e-2; covariance
        # ~sigma^2 sqrt(2/n_k) ~ 3e-2 for sigma ~ 1.5 and n_k ~ 5000. Tolerances are ~5 SE.
        torch.testing.assert_close(share, model.weights.detach()[b], rtol=0, atol=0.015)
        for k in range(3):
            points = samples[b][labels[b] == k]
            scale = float(full_covariances[b, k].diagonal().max())
            torch.testing.assert_close(points.mean(0), model.means.detach()[b, k], rtol=0, atol=0.1 * scale ** 0.5)
            torch.testing.assert_close(torch.cov(points.T), full_covariances[b, k], rtol=0, atol=0.15 * scale)
    # The same seed gives the same draw, another seed another one.
    assert torch.equal(model.sample(50, seed=1)[0], model.sample(50, seed=1)[0])
    assert not torch.equal(model.sample(50, seed=1)[0], model.sample(50, seed=2)[0])


def test_refit_on_own_samples_recovers_the_model():
    model = torch_em.GaussianMixture(3, seed=0, dtype=F64).fit(blobs(60))
    samples, _ = model.sample(20_000, seed=2)
    refit = torch_em.GaussianMixture(3, seed=0, dtype=F64).fit(samples)
    order = torch.cdist(model.means.detach(), refit.means.detach()).argmin(-1)  # match components
    assert sorted(order.tolist()) == [0, 1, 2]
    torch.testing.assert_close(refit.weights.detach()[order], model.weights.detach(), rtol=0, atol=0.02)
    torch.testing.assert_close(refit.means.detach()[order], model.means.detach(), rtol=0, atol=0.1)
    torch.testing.assert_close(refit.covariances.detach()[order], model.covariances.detach(), rtol=0, atol=0.15)


# --- 12. devices and dtypes ------------------------------------------------------------------
def test_outputs_live_on_the_model_device_and_dtype(device):
    X = blobs(30)
    model = torch_em.GaussianMixture(3, seed=0, device=device, dtype=torch.float32).fit(X)  # float64 numpy in
    assert model.means.dtype == torch.float32 and model.means.device.type == device
    tensor_X = torch.as_tensor(X, device=device)
    for method in ("log_prob", "score_samples", "score", "predict_proba", "bic", "aic"):
        for data in (X, tensor_X, torch.as_tensor(X)):  # numpy, tensor on device, tensor on the CPU
            out = getattr(model, method)(data)
            assert out.device.type == device and out.dtype == torch.float32, method
    labels = model.predict(X)
    assert labels.device.type == device and labels.dtype == torch.long
    assert torch.equal(model.predict(tensor_X), labels)
    samples, sample_labels = model.sample(5, seed=0)
    assert samples.device.type == device and samples.dtype == torch.float32 and sample_labels.device.type == device
    for name in ("converged_", "n_iter_", "lower_bound_", "lower_bound_history_"):
        assert getattr(model, name).device.type == device, name


def test_to_float64_before_and_after_fit(device):
    X = blobs(30).astype(np.float32)
    model = torch_em.GaussianMixture(3, 3, seed=0, device=device, dtype=torch.float32).to(torch.float64)
    assert model.dtype == F64 and all(p.dtype == F64 for p in model.parameters())
    model.fit(X)
    assert model.means.dtype == F64 and model.lower_bound_.dtype == F64 and model.score(X).dtype == F64
    unfitted = torch_em.GaussianMixture(3, seed=0, device=device).double()  # no parameters yet
    unfitted.fit(torch.as_tensor(X))
    assert unfitted.means.dtype == F64 and unfitted.means.device.type == device
    back = unfitted.float()
    assert back.means.dtype == torch.float32 and back.log_prob(X).dtype == torch.float32


def test_numpy_and_tensor_inputs_fit_identically():
    X = blobs(30)
    from_numpy = torch_em.GaussianMixture(3, seed=4, dtype=F64).fit(X)
    from_tensor = torch_em.GaussianMixture(3, seed=4, dtype=F64).fit(torch.as_tensor(X))
    from_list = torch_em.GaussianMixture(3, seed=4, dtype=F64).fit(X.tolist())
    for name in FITTED:
        assert torch.equal(getattr(from_numpy, name), getattr(from_tensor, name)), name
        assert torch.equal(getattr(from_numpy, name), getattr(from_list, name)), name
    read_only = X.copy()
    read_only.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "non-writable array" warning
        assert torch.equal(from_numpy.predict(read_only), from_numpy.predict(X))


# --- 13. progress and warnings ---------------------------------------------------------------
def test_verbose_fit_shows_progress(capsys):
    torch_em.GaussianMixture(3, seed=0, dtype=F64).fit(blobs(30), verbose=True)
    assert "EM" in capsys.readouterr().err


def test_convergence_warning_only_when_max_iter_is_hit():
    X = blobs(30)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a converged fit warns about nothing
        model = torch_em.GaussianMixture(3, seed=0, dtype=F64).fit(X)
    assert bool(model.converged_) and int(model.n_iter_) < 100
    short = torch_em.GaussianMixture(3, max_iter=2, tol=0.0, seed=0, dtype=F64)
    with pytest.warns(torch_em.ConvergenceWarning, match="max_iter=2"):
        short.fit(X)
    assert not bool(short.converged_) and int(short.n_iter_) == 2
    assert short.lower_bound_history_.shape == (2,)
