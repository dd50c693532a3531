"""Properties of GaussianMixture fits: monotone EM, batching, restarts, dtypes, persistence."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import torch_em
from conftest import COVARIANCE_TYPES, blobs

INITS = ["k-means++", "kmeans", "random", "random_from_data"]


def batched_blobs(n_models: int, seed: int = 0) -> torch.Tensor:
    return torch.stack([torch.as_tensor(blobs(60, seed=seed + b)) for b in range(n_models)])  # (B, N, 3)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
@pytest.mark.parametrize("init_params", INITS)
def test_lower_bound_never_decreases(covariance_type, init_params):
    # EM never decreases the likelihood. (With reg_covar > 0 a component that collapses onto a
    # few points can lose ~reg_covar per step, in scikit-learn too; these clusters do not collapse.)
    X = blobs(80)
    model = torch_em.GaussianMixture(3, covariance_type=covariance_type, init_params=init_params, tol=1e-10,
                                     max_iter=60, seed=1, dtype=torch.float64, batch_shape=(3,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch_em.ConvergenceWarning)
        model.fit(X)
    history = model.lower_bound_history_  # (3, n_iterations)
    steps = history[:, 1:] - history[:, :-1]
    assert bool((steps >= -1e-12 * history[:, 1:].abs()).all()), steps.min()
    assert torch.equal(history[:, -1], model.lower_bound_)


def test_batched_equals_looped_from_identical_initial_parameters():
    data = batched_blobs(6)  # (6, N, 3)
    rng = np.random.default_rng(0)
    means = np.stack([d[rng.choice(len(d), 3, replace=False)] for d in data.numpy()])  # (6, 3, 3)
    weights = np.full((6, 3), 1 / 3)
    precisions = np.broadcast_to(np.eye(3), (6, 3, 3, 3)).copy()
    batched = torch_em.GaussianMixture(3, batch_shape=(2, 3), dtype=torch.float64, tol=1e-8, max_iter=200,
                                       weights_init=weights.reshape(2, 3, 3), means_init=means.reshape(2, 3, 3, 3),
                                       precisions_init=precisions.reshape(2, 3, 3, 3, 3)).fit(data.view(2, 3, *data.shape[1:]))
    flat = {name: getattr(batched, name).reshape(6, *getattr(batched, name).shape[2:]) for name in ("weights", "means", "covariances")}
    n_iter = batched.n_iter_.reshape(6)
    for b in range(6):
        single = torch_em.GaussianMixture(3, dtype=torch.float64, tol=1e-8, max_iter=200, weights_init=weights[b],
                                          means_init=means[b], precisions_init=precisions[b]).fit(data[b])
        assert int(single.n_iter_) == int(n_iter[b])
        for name, value in flat.items():
            torch.testing.assert_close(value[b], getattr(single, name).detach(), rtol=1e-10, atol=1e-12)
    assert len(set(n_iter.tolist())) > 1, "models should converge after different numbers of iterations"


def test_converged_model_stops_changing_while_others_go_on():
    data = batched_blobs(5)
    model = torch_em.GaussianMixture(3, batch_shape=(5,), dtype=torch.float64, seed=0, tol=1e-4).fit(data)
    early = int(model.n_iter_.argmin())
    history = model.lower_bound_history_[early]
    stop = int(model.n_iter_[early])
    # After its own convergence the model's lower bound is frozen (padded), the others moved on.
    assert torch.equal(history[stop - 1:], history[stop - 1].expand(history.shape[0] - stop + 1))
    assert int(model.n_iter_.max()) > stop


def test_shared_data_with_batch_fits_every_model_to_the_same_data():
    X = blobs()
    model = torch_em.GaussianMixture(3, batch_shape=(4,), seed=0, dtype=torch.float64).fit(X)
    assert model.means.shape == (4, 3, 3)
    single = torch_em.GaussianMixture(3, seed=0, dtype=torch.float64).fit(X)
    # Every model finds the same optimum of these well-separated clusters.
    torch.testing.assert_close(model.lower_bound_, single.lower_bound_.expand(4), rtol=1e-6, atol=1e-6)
    assert model.score(X).shape == (4,)


def test_restarts_are_never_worse_than_the_first():
    X = blobs(40, centres=[(0, 0, 0), (2, 2, 0), (0, 3, 1), (4, 0, 2), (1, 1, 4)])
    for seed in range(4):
        first = torch_em.GaussianMixture(5, init_params="random", seed=seed, dtype=torch.float64).fit(X)
        best = torch_em.GaussianMixture(5, init_params="random", n_init=6, seed=seed, dtype=torch.float64).fit(X)
        # Restart 0 of n_init=6 is the n_init=1 fit (one random stream per restart).
        assert float(best.lower_bound_) >= float(first.lower_bound_) - 1e-9


def test_same_seed_same_fit_and_different_seed_different_init():
    X = blobs()
    a = torch_em.GaussianMixture(3, seed=7, init_params="random", max_iter=2, tol=0.0)
    b = torch_em.GaussianMixture(3, seed=7, init_params="random", max_iter=2, tol=0.0)
    c = torch_em.GaussianMixture(3, seed=8, init_params="random", max_iter=2, tol=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch_em.ConvergenceWarning)
        a.fit(X), b.fit(X), c.fit(X)
    assert torch.equal(a.means, b.means) and torch.equal(a.covariances, b.covariances)
    assert not torch.equal(a.means, c.means)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_float32_agrees_with_float64(covariance_type):
    # Well-conditioned clusters; both fits start from the same parameters and run 10 iterations.
    # float32 carries ~1e-7 relative error per operation; the statistics sum N=700 points (error
    # growing like sqrt(N) eps) and EM contracts rather than amplifies errors on separated data,
    # so 1e-4 relative (with an absolute floor for near-zero entries) leaves a wide margin.
    X = blobs()
    X_shifted = X + 100.0  # data far from the origin: centring keeps float32 accurate
    for data in (X, X_shifted):
        kwargs = dict(covariance_type=covariance_type, max_iter=10, tol=0.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch_em.ConvergenceWarning)
            init = dict(weights_init=np.full(3, 1 / 3), means_init=data[[0, 250, 600]])
            double = torch_em.GaussianMixture(3, dtype=torch.float64, **init, **kwargs).fit(data)
            single = torch_em.GaussianMixture(3, dtype=torch.float32, **init, **kwargs).fit(data.astype(np.float32))
        for name in ("weights", "means", "covariances"):
            expected = getattr(double, name).detach()
            torch.testing.assert_close(getattr(single, name).detach().double(), expected, rtol=1e-4,
                                       atol=1e-4 * float(expected.abs().max()))
        assert float(single.lower_bound_) == pytest.approx(float(double.lower_bound_), rel=1e-5)


def test_state_dict_round_trip_and_torch_save(tmp_path):
    X = blobs()
    model = torch_em.GaussianMixture(3, covariance_type="full", batch_shape=(2,), seed=0).fit(X)
    for fresh in (torch_em.GaussianMixture(3, batch_shape=(2,)), torch_em.GaussianMixture(3, 3, batch_shape=(2,))):
        fresh.load_state_dict(model.state_dict())
        assert torch.equal(fresh.log_prob(X), model.log_prob(X))
    path = tmp_path / "gmm.pt"
    torch.save(model.state_dict(), path)
    loaded = torch_em.GaussianMixture(3, batch_shape=(2,))
    loaded.load_state_dict(torch.load(path, weights_only=True))
    assert torch.equal(loaded.log_prob(X), model.log_prob(X))
    torch.save(model, tmp_path / "whole.pt")
    whole = torch.load(tmp_path / "whole.pt", weights_only=False)
    assert torch.equal(whole.predict(X), model.predict(X))


def test_inputs_numpy_or_tensor_and_dtype_follows_model(device):
    X = blobs()
    model = torch_em.GaussianMixture(3, seed=0, device=device).to(torch.float64)
    model.fit(X.astype(np.float32))  # converted to the model's dtype
    assert model.means.dtype == torch.float64 and model.means.device.type == device
    from_tensor = model.predict_proba(torch.as_tensor(X, device=device))
    from_numpy = model.predict_proba(X)
    assert from_tensor.device.type == device and torch.equal(from_tensor, from_numpy)
    samples, labels = model.sample(10)
    assert samples.shape == (10, 3) and labels.shape == (10,) and samples.device.type == device


def test_sample_statistics_match_the_model():
    X = blobs()
    model = torch_em.GaussianMixture(3, seed=0, dtype=torch.float64).fit(X)
    samples, labels = model.sample(60_000, seed=1)
    assert int(labels.min()) >= 0 and int(labels.max()) < 3
    counts = torch.bincount(labels, minlength=3).double() / len(labels)
    torch.testing.assert_close(counts, model.weights.detach(), atol=0.01, rtol=0)
    for k in range(3):
        points = samples[labels == k]
        torch.testing.assert_close(points.mean(0), model.means[k].detach(), atol=0.05, rtol=0)
        torch.testing.assert_close(torch.cov(points.T), model.covariances[k].detach(), atol=0.08, rtol=0)


def test_verbose_progress_and_convergence_warning(capsys):
    X = blobs()
    with pytest.warns(torch_em.ConvergenceWarning, match="max_iter"):
        torch_em.GaussianMixture(3, max_iter=1, seed=0).fit(X, verbose=True)
    assert "EM" in capsys.readouterr().err
