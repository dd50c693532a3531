"""KMeans against scikit-learn from identical initial centres, batching, restarts, bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans as SklearnKMeans

import torch_em


def clusters(n_clusters: int = 6, n_per: int = 300, n_features: int = 5, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=4.0, size=(n_clusters, n_features))
    return np.concatenate([rng.normal(size=(n_per + 11 * i, n_features)) + c for i, c in enumerate(centres)])


@pytest.mark.parametrize("tol", [1e-4, 0.0])
@pytest.mark.parametrize("n_clusters", [3, 8])
def test_matches_sklearn_from_same_initial_centres(tol, n_clusters, device):
    X = clusters()
    init = X[np.random.default_rng(1).choice(len(X), n_clusters, replace=False)]
    reference = SklearnKMeans(n_clusters, init=init, n_init=1, tol=tol, algorithm="lloyd").fit(X)
    ours = torch_em.KMeans(n_clusters, init=init, tol=tol, dtype=torch.float64, device=device).fit(X)
    assert int(ours.n_iter_) == reference.n_iter_
    np.testing.assert_allclose(ours.cluster_centers_.cpu().numpy(), reference.cluster_centers_, rtol=1e-10, atol=1e-10)
    assert float(ours.inertia_) == pytest.approx(reference.inertia_, rel=1e-10)
    assert (ours.labels_.cpu().numpy() == reference.labels_).all()
    X_test = clusters(seed=5)
    assert (ours.predict(X_test).cpu().numpy() == reference.predict(X_test)).all()
    np.testing.assert_allclose(ours.transform(X_test).cpu().numpy(), reference.transform(X_test), rtol=1e-9, atol=1e-9)
    assert float(ours.score(X_test)) == pytest.approx(reference.score(X_test), rel=1e-10)


def test_empty_cluster_is_relocated_like_sklearn():
    X = clusters(n_clusters=3)
    init = np.concatenate([X[:3], np.full((1, X.shape[1]), 1e3)])  # the last centre attracts nothing
    reference = SklearnKMeans(4, init=init, n_init=1, algorithm="lloyd").fit(X)
    ours = torch_em.KMeans(4, init=init, dtype=torch.float64).fit(X)
    assert np.isfinite(ours.cluster_centers_.numpy()).all()
    assert float(ours.inertia_) == pytest.approx(reference.inertia_, rel=1e-8)
    np.testing.assert_allclose(ours.cluster_centers_.numpy(), reference.cluster_centers_, rtol=1e-8, atol=1e-8)


def test_batched_equals_looped_and_models_stop_on_their_own():
    data = torch.stack([torch.as_tensor(clusters(4, 100, 3, seed=s)) for s in range(5)])  # (5, N, 3)
    init = data[:, :4]  # (5, 4, 3): first points as initial centres
    batched = torch_em.KMeans(4, init=init, batch_shape=(5,), dtype=torch.float64).fit(data)
    for b in range(5):
        single = torch_em.KMeans(4, init=init[b], dtype=torch.float64).fit(data[b])
        torch.testing.assert_close(batched.cluster_centers_[b], single.cluster_centers_, rtol=1e-12, atol=1e-12)
        assert int(batched.n_iter_[b]) == int(single.n_iter_)
        assert float(batched.inertia_[b]) == pytest.approx(float(single.inertia_), rel=1e-12)
    assert len(set(batched.n_iter_.tolist())) > 1


def test_restarts_never_worse_and_seed_reproducible():
    X = torch.as_tensor(clusters(8, 60, 2, seed=3))
    many = torch_em.KMeans(8, n_init=10, seed=0, dtype=torch.float64).fit(X)
    again = torch_em.KMeans(8, n_init=10, seed=0, dtype=torch.float64).fit(X)
    assert torch.equal(many.cluster_centers_, again.cluster_centers_)
    # Restart r draws from its own stream, so the first of ten restarts is the n_init=1 fit.
    first = torch_em.KMeans(8, n_init=1, seed=0, dtype=torch.float64).fit(X)
    assert float(many.inertia_) <= float(first.inertia_) + 1e-9
    other_seeds = [float(torch_em.KMeans(8, seed=s, dtype=torch.float64).fit(X).inertia_) for s in range(1, 4)]
    assert len(set(other_seeds + [float(first.inertia_)])) > 1  # seeds do change the result


def test_kmeans_plus_plus_quality_close_to_sklearn():
    X = clusters(10, 200, 4, seed=7)
    ours = np.median([float(torch_em.KMeans(10, seed=s, dtype=torch.float64).fit(X).inertia_) for s in range(5)])
    reference = np.median([SklearnKMeans(10, n_init=1, random_state=s).fit(X).inertia_ for s in range(5)])
    assert ours <= 1.05 * reference


def test_state_dict_round_trip():
    X = clusters()
    model = torch_em.KMeans(6, seed=0).fit(X)
    fresh = torch_em.KMeans(6)
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh.predict(X), model.predict(X))


@pytest.mark.parametrize(
    "X, message",
    [
        (np.full((50, 5), np.nan), "finite"),
        (np.zeros((50,)), "shape"),
        (np.zeros((50, 4)), "D=5"),
    ],
)
def test_bad_input_raises_and_leaves_model_unchanged(X, message):
    model = torch_em.KMeans(3, seed=0).fit(clusters())
    before = (model.cluster_centers_.clone(), model.labels_.clone(), model.inertia_.clone())
    with pytest.raises(ValueError, match=message):
        model.predict(X)
    with pytest.raises(ValueError, match="X"):
        model.fit(X if X.ndim == 2 and X.shape[1] == 5 else np.full((2, 5), 0.0))
    assert torch.equal(model.cluster_centers_, before[0]) and torch.equal(model.labels_, before[1])
    assert torch.equal(model.inertia_, before[2])


@pytest.mark.parametrize("kwargs, name", [
    ({"n_clusters": 0}, "n_clusters"), ({"n_clusters": 2, "init": "nope"}, "init"),
    ({"n_clusters": 2, "tol": -1.0}, "tol"), ({"n_clusters": 2, "max_iter": 0}, "max_iter"),
])
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        torch_em.KMeans(**kwargs)


def test_init_centres_of_wrong_shape_rejected():
    with pytest.raises(ValueError, match="init"):
        torch_em.KMeans(3, init=np.zeros((2, 5))).fit(clusters())


def test_max_iter_zero_rejected_with_a_message_naming_it():
    with pytest.raises(ValueError, match=r"^max_iter must be an integer >= 1, got 0$"):
        torch_em.KMeans(2, max_iter=0)


def first_rows(X, n_clusters, random_state):
    return X[:n_clusters].copy()  # scikit-learn's Lloyd loop would write into a view of its X


def test_callable_init_matches_sklearn():
    X = clusters()
    reference = SklearnKMeans(6, init=first_rows, n_init=1, algorithm="lloyd").fit(X)
    ours = torch_em.KMeans(6, init=first_rows, dtype=torch.float64).fit(X)
    np.testing.assert_allclose(ours.cluster_centers_.numpy(), reference.cluster_centers_, rtol=1e-10, atol=1e-10)
    assert float(ours.inertia_) == pytest.approx(reference.inertia_, rel=1e-10)
    assert int(ours.n_iter_) == reference.n_iter_


def test_callable_init_gets_each_models_data_and_a_seeded_random_state():
    data = np.stack([clusters(3, 40, 2, seed=s) for s in range(2)])  # (2, N, 2)
    calls = []

    def init(X, n_clusters, random_state):
        assert isinstance(X, np.ndarray) and isinstance(random_state, np.random.RandomState)
        calls.append((X.copy(), random_state.randint(1 << 30)))
        return X[random_state.choice(len(X), n_clusters, replace=False)]

    model = torch_em.KMeans(3, init=init, n_init=2, batch_shape=(2,), seed=4, dtype=torch.float64).fit(data)
    assert len(calls) == 4  # restart by restart, model by model
    for (X, _), b in zip(calls, [0, 1, 0, 1]):
        np.testing.assert_array_equal(X, data[b])
    first_draws = [draw for _, draw in calls]
    calls.clear()
    torch_em.KMeans(3, init=init, n_init=1, batch_shape=(2,), seed=4, dtype=torch.float64).fit(data)
    assert [draw for _, draw in calls] == first_draws[:2]  # restart 0 gets what n_init=1 gets
    given = np.stack([clusters(3, 40, 2, seed=s)[:3] for s in range(2)])
    options = dict(batch_shape=(2,), dtype=torch.float64)
    fixed = torch_em.KMeans(3, init=lambda X, n_clusters, random_state: X[:n_clusters], **options).fit(data)
    assert torch.equal(fixed.cluster_centers_, torch_em.KMeans(3, init=given, **options).fit(data).cluster_centers_)
    assert model.cluster_centers_.shape == (2, 3, 2)


@pytest.mark.parametrize("returned, message", [
    (np.zeros((2, 5)), r"init\(X, n_clusters, random_state\) must return centres of shape \(3, 5\), got \(2, 5\)"),
    (np.full((3, 5), np.nan), r"init\(X, n_clusters, random_state\) must be finite"),
])
def test_callable_init_result_checked_and_model_unchanged(returned, message):
    X = clusters()
    model = torch_em.KMeans(3, seed=0).fit(X)
    before = model.cluster_centers_.clone()
    model.init = lambda X, n_clusters, random_state: returned
    with pytest.raises(ValueError, match=message):
        model.fit(X)
    assert torch.equal(model.cluster_centers_, before)


def test_kmeans_plusplus_returns_rows_of_X_as_numpy_or_tensors(device):
    X = clusters(5, 40, 3, seed=2)
    centers, indices = torch_em.kmeans_plusplus(X, 5, seed=0)
    assert isinstance(centers, np.ndarray) and isinstance(indices, np.ndarray)
    assert centers.shape == (5, 3) and indices.shape == (5,) and centers.dtype == X.dtype
    np.testing.assert_array_equal(centers, X[indices])
    assert len(set(indices.tolist())) == 5
    tensor = torch.as_tensor(X, device=device)
    centers_t, indices_t = torch_em.kmeans_plusplus(tensor, 5, seed=0)
    assert centers_t.device == tensor.device and torch.equal(centers_t, tensor[indices_t])
    assert indices_t.dtype == torch.long


def test_kmeans_plusplus_default_trials_are_two_plus_log_k():
    X = clusters(8, 30, 2, seed=3)
    for seed in range(5):
        default = torch_em.kmeans_plusplus(X, 8, seed=seed)[1]
        np.testing.assert_array_equal(default, torch_em.kmeans_plusplus(X, 8, seed=seed, n_local_trials=2 + int(np.log(8)))[1])
    differs = [not np.array_equal(torch_em.kmeans_plusplus(X, 8, seed=s)[1],
                                  torch_em.kmeans_plusplus(X, 8, seed=s, n_local_trials=1)[1]) for s in range(5)]
    assert any(differs)


def test_kmeans_plusplus_batched_equals_one_by_one():
    data = np.stack([clusters(4, 30, 2, seed=s) for s in range(3)])  # (3, N, 2)
    weights = np.random.default_rng(0).uniform(size=data.shape[:2])
    centers, indices = torch_em.kmeans_plusplus(data, 4, sample_weight=weights, seed=7)
    assert centers.shape == (3, 4, 2) and indices.shape == (3, 4)
    for b in range(3):
        single = torch_em.kmeans_plusplus(data[b], 4, sample_weight=weights[b], seed=7)
        np.testing.assert_array_equal(indices[b], single[1])
        np.testing.assert_array_equal(centers[b], single[0])


def test_kmeans_plusplus_seeds_kmeans():
    """KMeans(seed=s) starts from kmeans_plusplus(X, K, seed=s) (one dataset)."""
    X = clusters(6, 50, 3, seed=4)
    seeded = torch_em.KMeans(6, seed=3, dtype=torch.float64).fit(X)
    given = torch_em.KMeans(6, init=torch_em.kmeans_plusplus(X, 6, seed=3)[0], dtype=torch.float64).fit(X)
    assert torch.equal(seeded.cluster_centers_, given.cluster_centers_)


def test_kmeans_plusplus_potential_close_to_sklearn():
    from sklearn.cluster import kmeans_plusplus as sklearn_kmeans_plusplus

    X = clusters(10, 40, 2, seed=5)

    def potential(centers):
        return ((X[:, None] - centers[None]) ** 2).sum(-1).min(1).sum()

    ours = np.mean([potential(torch_em.kmeans_plusplus(X, 10, seed=s)[0]) for s in range(30)])
    reference = np.mean([potential(sklearn_kmeans_plusplus(X, 10, random_state=s)[0]) for s in range(30)])
    assert ours <= 1.15 * reference


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_clusters=0), "n_clusters must be an integer >= 1"),
    (dict(n_clusters=500), "X must have at least 500 sample"),
    (dict(n_clusters=3, n_local_trials=0), "n_local_trials must be an integer >= 1"),
    (dict(n_clusters=3, seed=-1), "seed must be an integer >= 0"),
    (dict(n_clusters=3, sample_weight=np.ones(3)), r"sample_weight must have shape \(100,\)"),
])
def test_kmeans_plusplus_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        torch_em.kmeans_plusplus(clusters(2, 50, 2)[:100], **kwargs)


@pytest.mark.parametrize("shared", [True, False])
def test_lloyd_compaction_to_the_running_models_changes_no_result(monkeypatch, shared):
    """Models that converge drop out of the computed batch; the results equal those of a loop
    that computes every model to the end."""
    from torch_em import lloyd as lloyd_module

    generator = torch.Generator().manual_seed(0)
    X = torch.randn(6, 300, 2, generator=generator, dtype=torch.float64) * torch.linspace(0.5, 3, 6).view(6, 1, 1)
    X = X[0] if shared else X
    weights = torch.rand(*X.shape[:-1], generator=generator, dtype=torch.float64)
    centres = torch.randn(3, 6, 4, 2, generator=generator, dtype=torch.float64)
    results = {}
    for fraction in (0.0, 0.5):
        monkeypatch.setattr(lloyd_module, "COMPACTION_FRACTION", fraction)
        results[fraction] = lloyd_module.lloyd(X, centres, max_iter=300, tol=1e-10, chunk_size=128, weights=weights)
    plain, compacted = results[0.0], results[0.5]
    assert len(set(plain.n_iter.flatten().tolist())) > 3  # the models stop at different iterations
    assert torch.equal(plain.n_iter, compacted.n_iter) and torch.equal(plain.converged, compacted.converged)
    assert torch.equal(plain.labels, compacted.labels)
    torch.testing.assert_close(compacted.centres, plain.centres, rtol=0, atol=1e-12)
    torch.testing.assert_close(compacted.distances, plain.distances, rtol=0, atol=1e-12)
