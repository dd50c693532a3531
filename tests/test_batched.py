"""Batched fitting: a batch of models fitted together behaves exactly like the same models fitted
one at a time (per-model data, shared data, multi-dimensional batch shapes, per-model
convergence, re-seeding, ill-conditioning, centring and chunking stay per model)."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import torch_em
from conftest import COVARIANCE_TYPES, blobs

F64 = torch.float64
#: Batched and separate fits run the same arithmetic in differently shaped GEMMs, so they agree to
#: rounding (~1e-16) amplified by a few dozen EM iterations; 1e-10 is tight yet safe.
TIGHT = dict(rtol=1e-10, atol=1e-10)
FITTED = ("weights", "means", "covariances", "precisions_cholesky")


def quiet_fit(model: torch_em.GaussianMixture, X, **kwargs) -> torch_em.GaussianMixture:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch_em.ConvergenceWarning)
        return model.fit(X, **kwargs)


def per_model_data(n_models: int, n_per_cluster: int = 30) -> np.ndarray:
    """(B, N, 3): the same cluster layout drawn with a different seed per model."""
    return np.stack([blobs(n_per_cluster, seed=10 + b) for b in range(n_models)])


def initial_parameters(data: np.ndarray, covariance_type: str, n_components: int = 3, seed: int = 0) -> dict:
    """Per-model initial parameters with the batch dimensions in front: random data points as
    means, uneven weights and (broad) precisions of the right layout."""
    rng = np.random.default_rng(seed)
    batch, (n_points, n_features) = data.shape[:-2], data.shape[-2:]
    flat = data.reshape(-1, n_points, n_features)
    means = np.stack([x[rng.choice(n_points, n_components, replace=False)] for x in flat])
    weights = rng.uniform(0.5, 1.5, size=(len(flat), n_components))
    weights /= weights.sum(-1, keepdims=True)
    scale = rng.uniform(0.2, 0.6, size=len(flat))
    per_model = {
        "full": lambda s: np.broadcast_to(s * np.eye(n_features), (n_components, n_features, n_features)),
        "tied": lambda s: s * np.eye(n_features),
        "diag": lambda s: np.full((n_components, n_features), s),
        "spherical": lambda s: np.full(n_components, s),
    }[covariance_type]
    precisions = np.stack([per_model(s) for s in scale])
    return {
        "weights_init": weights.reshape(*batch, n_components),
        "means_init": means.reshape(*batch, n_components, n_features),
        "precisions_init": precisions.reshape(*batch, *precisions.shape[1:]),
    }


def model_at(init: dict, index: tuple[int, ...]) -> dict:
    return {name: value[index] for name, value in init.items()}


def assert_same_model(batched: torch_em.GaussianMixture, index: tuple[int, ...], single: torch_em.GaussianMixture,
                      tolerance: dict = TIGHT) -> None:
    for name in FITTED:
        torch.testing.assert_close(getattr(batched, name)[index].detach(), getattr(single, name).detach(), **tolerance,
                                   msg=lambda m, name=name: f"{name} of model {index}: {m}")
    torch.testing.assert_close(batched.lower_bound_[index], single.lower_bound_, **tolerance)
    assert int(batched.n_iter_[index]) == int(single.n_iter_)
    assert bool(batched.converged_[index]) == bool(single.converged_)


@pytest.mark.parametrize("batch_shape", [(3,), (2, 3)], ids=["batch3", "batch2x3"])
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_batched_fit_equals_separate_fits(covariance_type, batch_shape):
    n_models = int(np.prod(batch_shape))
    data = per_model_data(n_models).reshape(*batch_shape, -1, 3)
    init = initial_parameters(data, covariance_type)
    options = dict(covariance_type=covariance_type, tol=1e-6, max_iter=100, dtype=F64)
    batched = torch_em.GaussianMixture(3, batch_shape=batch_shape, **init, **options).fit(data)
    assert batched.means.shape == (*batch_shape, 3, 3)
    assert batched.lower_bound_.shape == batched.n_iter_.shape == batched.converged_.shape == batch_shape
    for index in np.ndindex(*batch_shape):
        single = torch_em.GaussianMixture(3, **model_at(init, index), **options).fit(data[index])
        assert_same_model(batched, index, single)
        # The batched history is the single history, padded with the final value.
        n_iter = int(single.n_iter_)
        history = batched.lower_bound_history_[index]
        torch.testing.assert_close(history[:n_iter], single.lower_bound_history_, **TIGHT)
        assert bool((history[n_iter:] == history[n_iter - 1]).all())
    # Otherwise per-model convergence is not exercised.
    assert len(set(batched.n_iter_.flatten().tolist())) > 1, batched.n_iter_


def test_converged_model_equals_a_separate_fit_stopped_at_its_iteration():
    """A model that converged early keeps its parameters while the others go on: they equal a
    separate fit with max_iter = its n_iter_, and differ from one stopped an iteration earlier."""
    data = per_model_data(4)
    init = initial_parameters(data, "full", seed=1)
    options = dict(tol=1e-5, dtype=F64)
    batched = torch_em.GaussianMixture(3, batch_shape=(4,), max_iter=200, **init, **options).fit(data)
    n_iter = batched.n_iter_
    assert bool(batched.converged_.all())
    assert int(n_iter.min()) < int(n_iter.max()), n_iter
    early = int(n_iter.argmin())
    stop = int(n_iter[early])
    assert stop >= 2
    exact = torch_em.GaussianMixture(3, max_iter=stop, **model_at(init, (early,)), **options).fit(data[early])
    assert bool(exact.converged_) and int(exact.n_iter_) == stop
    assert_same_model(batched, (early,), exact)
    earlier = quiet_fit(torch_em.GaussianMixture(3, max_iter=stop - 1, **model_at(init, (early,)), **options), data[early])
    assert not bool(earlier.converged_)
    assert not torch.allclose(earlier.means, batched.means[early], rtol=1e-9, atol=0)
    # Its lower bound stayed frozen while the slowest model went on.
    history = batched.lower_bound_history_[early]
    assert history.shape[-1] == int(n_iter.max())
    assert torch.equal(history[stop - 1:], batched.lower_bound_[early].expand(history.shape[-1] - stop + 1))


def test_each_model_stops_by_the_convergence_rule():
    """Model b converged in iteration n: its lower bound moved by < tol from iteration n-1 to n and
    by >= tol in every earlier iteration."""
    data = per_model_data(4)
    tol = 1e-4
    model = torch_em.GaussianMixture(3, batch_shape=(4,), tol=tol, seed=3, dtype=F64).fit(data)
    assert bool(model.converged_.all())
    for b in range(4):
        n_iter = int(model.n_iter_[b])
        changes = model.lower_bound_history_[b, 1:n_iter] - model.lower_bound_history_[b, :n_iter - 1]
        assert float(changes[-1].abs()) < tol
        assert bool((changes[:-1].abs() >= tol).all()), changes


def test_mixed_convergence_reports_per_model_state():
    data = per_model_data(4)
    init = initial_parameters(data, "diag", seed=1)
    reference = torch_em.GaussianMixture(3, batch_shape=(4,), covariance_type="diag", tol=1e-5, dtype=F64, **init).fit(data)
    max_iter = int(reference.n_iter_.min())  # enough for the fastest model only
    expected = reference.n_iter_ <= max_iter
    assert 0 < int(expected.sum()) < 4
    model = torch_em.GaussianMixture(3, batch_shape=(4,), covariance_type="diag", tol=1e-5, dtype=F64,
                                     max_iter=max_iter, **init)
    with pytest.warns(torch_em.ConvergenceWarning, match=f"{int((~expected).sum())} of 4 model"):
        model.fit(data)
    assert torch.equal(model.converged_, expected)
    assert bool((model.n_iter_ == max_iter).all())
    assert model.lower_bound_history_.shape == (4, max_iter)


def test_shared_data_fits_every_model_to_the_same_data():
    X = blobs(30)
    init = initial_parameters(np.stack([X] * 4), "full", seed=2)  # different starts per model
    options = dict(tol=1e-6, dtype=F64)
    shared = torch_em.GaussianMixture(3, batch_shape=(4,), **init, **options).fit(X)
    expanded = torch_em.GaussianMixture(3, batch_shape=(4,), **init, **options).fit(np.broadcast_to(X, (4, *X.shape)))
    for b in range(4):
        single = torch_em.GaussianMixture(3, **model_at(init, (b,)), **options).fit(X)
        assert_same_model(shared, (b,), single)
        assert_same_model(expanded, (b,), single)
    # Evaluation of shared data broadcasts over the batch.
    assert shared.score_samples(X).shape == (4, len(X))
    assert shared.predict_proba(X).shape == (4, len(X), 3)
    torch.testing.assert_close(shared.score(X), expanded.score(np.broadcast_to(X, (4, *X.shape))), **TIGHT)


def test_shared_data_with_identical_initial_parameters_gives_identical_models():
    X = blobs(30)
    init = model_at(initial_parameters(X[None], "tied", seed=3), (0,))  # per-model shapes: broadcast to the batch
    batched = torch_em.GaussianMixture(3, batch_shape=(2, 2), covariance_type="tied", dtype=F64, **init).fit(X)
    single = torch_em.GaussianMixture(3, covariance_type="tied", dtype=F64, **init).fit(X)
    for index in np.ndindex(2, 2):
        assert_same_model(batched, index, single)


def test_shared_data_models_get_their_own_random_initialisation():
    """Models of a batch are independent fits, not copies: each draws its own initialisation."""
    X = blobs(30)
    model = quiet_fit(torch_em.GaussianMixture(3, batch_shape=(4,), init_params="random", max_iter=1, tol=0.0,
                                               seed=0, dtype=F64), X)
    means = model.means.detach()
    for a in range(4):
        for b in range(a + 1, 4):
            assert not torch.allclose(means[a], means[b]), (a, b)


def test_reseeding_one_model_leaves_the_others_untouched():
    data = per_model_data(3)
    init = initial_parameters(data, "full", seed=4)
    init["means_init"] = init["means_init"].copy()
    init["means_init"][1, 2] = 1e3  # model 1's third component starts far from its data: emptied, re-seeded
    options = dict(tol=1e-6, dtype=F64)
    batched = torch_em.GaussianMixture(3, batch_shape=(3,), **init, **options).fit(data)
    for name in FITTED:
        assert bool(torch.isfinite(getattr(batched, name)).all()), name
    assert float(batched.weights.detach()[1].min()) > 0.05  # the re-seeded component took a real share
    assert float(batched.means.detach()[1].abs().max()) < 100
    for b in range(3):
        single = torch_em.GaussianMixture(3, **model_at(init, (b,)), **options).fit(data[b])
        assert_same_model(batched, (b,), single)


def test_ill_conditioned_model_is_named_and_nothing_changes():
    data = per_model_data(6).reshape(2, 3, -1, 3)
    model = torch_em.GaussianMixture(3, batch_shape=(2, 3), seed=0, dtype=F64, on_error="raise").fit(data)
    before = {name: value.detach().clone() for name, value in model.named_parameters()}
    fitted = [getattr(model, name).clone() for name in ("converged_", "n_iter_", "lower_bound_", "lower_bound_history_")]
    bad = data.copy()
    bad[1, 2, :, 0] = 4.0  # a constant feature in model (1, 2) only
    model.family.reg_covar = 0.0
    with pytest.raises(torch_em.IllConditionedError, match=r"component \d of model \(1, 2\).*reg_covar"):
        model.fit(bad)
    for name, value in model.named_parameters():
        assert torch.equal(value, before[name]), name
    for old, name in zip(fitted, ("converged_", "n_iter_", "lower_bound_", "lower_bound_history_")):
        assert torch.equal(old, getattr(model, name)), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_each_model_is_centred_on_its_own_data(dtype):
    """Per-model data far from the origin at different offsets: each model is centred on its own
    data, so float32 stays accurate (a shared centre would leave 1e4-sized coordinates)."""
    data = per_model_data(3)
    offsets = np.array([0.0, 1e4, -3e4])[:, None, None] * np.array([1.0, -1.0, 0.5])
    init = initial_parameters(data, "full", seed=5)
    init_far = dict(init, means_init=init["means_init"] + offsets)
    options = dict(tol=0.0, max_iter=10, dtype=dtype)
    numpy_dtype = np.float32 if dtype == torch.float32 else np.float64
    near = quiet_fit(torch_em.GaussianMixture(3, batch_shape=(3,), **init, **options), data.astype(numpy_dtype))
    far = quiet_fit(torch_em.GaussianMixture(3, batch_shape=(3,), **init_far, **options), (data + offsets).astype(numpy_dtype))
    # float32 (eps 1.2e-7) at coordinates of 3e4 resolves ~4e-3: means to 1e-2, covariances (of
    # order 1, from centred statistics) to 1e-2 relative. float64 is ~1e9 times finer.
    means_tol, cov_tol = (1e-2, 1e-2) if dtype == torch.float32 else (1e-7, 1e-7)
    shift = torch.as_tensor(offsets, dtype=dtype)
    torch.testing.assert_close(far.means.detach() - shift, near.means.detach(), rtol=0, atol=means_tol)
    torch.testing.assert_close(far.covariances.detach(), near.covariances.detach(), rtol=cov_tol, atol=cov_tol)
    torch.testing.assert_close(far.weights.detach(), near.weights.detach(), rtol=0, atol=cov_tol)


@pytest.mark.parametrize("shared", [False, True], ids=["per-model", "shared"])
def test_chunked_e_step_equals_unchunked(shared):
    data = per_model_data(2)
    X = data[0] if shared else data
    init = initial_parameters(data, "full", seed=6)
    init["means_init"] = init["means_init"].copy()
    init["means_init"][0, 1] = 50.0  # an empty component: re-seeding searches the worst points across chunks
    options = dict(tol=0.0, max_iter=15, dtype=F64, batch_shape=(2,))
    whole = quiet_fit(torch_em.GaussianMixture(3, **init, **options), X)
    chunked = quiet_fit(torch_em.GaussianMixture(3, chunk_size=7, **init, **options), X)
    for name in FITTED:
        torch.testing.assert_close(getattr(chunked, name).detach(), getattr(whole, name).detach(), **TIGHT)
    torch.testing.assert_close(chunked.lower_bound_history_, whole.lower_bound_history_, **TIGHT)
    assert float(chunked.weights.detach().min()) > 0.05


def test_restarts_in_a_batch_pick_the_best_per_model():
    """With restarts, each model's reported lower bound, parameters, n_iter_ and history come from
    the same (best) restart: the final parameters score what the lower bound says."""
    X = blobs(25, centres=[(0, 0, 0), (2, 2, 0), (0, 3, 1), (3, 0, 2), (1, 1, 3)])
    model = quiet_fit(torch_em.GaussianMixture(5, batch_shape=(3,), n_init=4, init_params="random", tol=1e-9,
                                               max_iter=500, seed=0, dtype=F64), X)
    assert bool(model.converged_.all())
    # The last M-step followed an E-step whose lower bound moved by < tol, so the final parameters
    # score within ~tol of the reported lower bound; parameters from another restart (a different
    # local optimum) would be off by far more.
    gap = model.score(X) - model.lower_bound_
    assert bool((gap.abs() < 1e-6).all()), gap
    index = (model.n_iter_ - 1).unsqueeze(-1)
    assert torch.equal(model.lower_bound_history_.gather(-1, index).squeeze(-1), model.lower_bound_)
