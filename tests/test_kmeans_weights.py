"""KMeans with sample weights: integer weights against repeated rows, zero weights against removed
rows, scikit-learn with the same initial centres and weights, weighted seeding, bad weights."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans as SklearnKMeans

import torch_em
from torch_em._random import RestartStreams
from torch_em.initialization import random_points


def clusters(n_clusters: int = 5, n_per: int = 120, n_features: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=4.0, size=(n_clusters, n_features))
    return np.concatenate([rng.normal(size=(n_per + 7 * i, n_features)) + c for i, c in enumerate(centres)])


def integer_weights(n: int, seed: int) -> np.ndarray:
    """Weights 0..3, first row 1 (so no model loses every row)."""
    weights = np.random.default_rng(seed).integers(0, 4, size=n)
    weights[0] = 1
    return weights


def initial_centres(X: np.ndarray, k: int, weights: np.ndarray, seed: int = 1) -> np.ndarray:
    """k distinct rows of positive weight."""
    return X[np.random.default_rng(seed).choice(np.flatnonzero(weights > 0), k, replace=False)]


def assert_same_fit(weighted: torch_em.KMeans, repeated: torch_em.KMeans, weights: np.ndarray, b=()) -> None:
    """Centres, inertia and n_iter of a weighted fit equal those of the fit on repeated rows; a row's
    label equals the label of each of its copies."""
    np.testing.assert_allclose(weighted.cluster_centers_[b].numpy(), repeated.cluster_centers_.numpy(), rtol=1e-10, atol=1e-10)
    assert float(weighted.inertia_[b]) == pytest.approx(float(repeated.inertia_), rel=1e-10)
    assert int(weighted.n_iter_[b]) == int(repeated.n_iter_)
    np.testing.assert_array_equal(np.repeat(weighted.labels_[b].numpy(), weights), repeated.labels_.numpy())


@pytest.mark.parametrize("n_init", [1, 3])
def test_integer_weights_equal_repeated_rows(n_init):
    X = clusters()
    weights = integer_weights(len(X), seed=2)
    init = initial_centres(X, 5, weights)
    options = dict(init=init, n_init=n_init, tol=0.0, dtype=torch.float64)
    weighted = torch_em.KMeans(5, **options).fit(X, sample_weight=weights)
    repeated = torch_em.KMeans(5, **options).fit(np.repeat(X, weights, axis=0))
    assert_same_fit(weighted, repeated, weights)


def test_integer_weights_equal_repeated_rows_per_model_data():
    data = np.stack([clusters(4, 80, 2, seed=s) for s in range(3)])  # (3, N, 2)
    weights = np.stack([integer_weights(data.shape[1], seed=10 + s) for s in range(3)])  # (3, N)
    init = np.stack([initial_centres(data[s], 4, weights[s]) for s in range(3)])  # (3, 4, 2)
    weighted = torch_em.KMeans(4, init=init, batch_shape=(3,), tol=0.0, dtype=torch.float64).fit(data, sample_weight=weights)
    for b in range(3):
        repeated = torch_em.KMeans(4, init=init[b], tol=0.0, dtype=torch.float64).fit(np.repeat(data[b], weights[b], axis=0))
        assert_same_fit(weighted, repeated, weights[b], b)


def test_per_model_weights_on_shared_data_equal_repeated_rows():
    """One X, one weighting per model (e.g. bootstrap resamples as counts)."""
    X = clusters(4, 80, 2)
    weights = np.stack([integer_weights(len(X), seed=20 + s) for s in range(4)])  # (4, N)
    init = X[[0, 100, 200, 300]]
    weighted = torch_em.KMeans(4, init=init, batch_shape=(2, 2), tol=0.0, dtype=torch.float64)
    weighted.fit(X, sample_weight=weights.reshape(2, 2, -1))
    for b in range(4):
        repeated = torch_em.KMeans(4, init=init, tol=0.0, dtype=torch.float64).fit(np.repeat(X, weights[b], axis=0))
        assert_same_fit(weighted, repeated, weights[b], divmod(b, 2))


def test_partial_fit_integer_weights_equal_repeated_rows():
    X = clusters(4, 150, 3, seed=4)
    order = np.random.default_rng(5).permutation(len(X))
    weights = integer_weights(len(X), seed=6)
    init = initial_centres(X, 4, weights)
    weighted = torch_em.KMeans(4, init=init, dtype=torch.float64)
    repeated = torch_em.KMeans(4, init=init, dtype=torch.float64)
    for rows in np.array_split(order, 4):
        weighted.partial_fit(X[rows], sample_weight=weights[rows])
        repeated.partial_fit(np.repeat(X[rows], weights[rows], axis=0))
        np.testing.assert_allclose(weighted.cluster_centers_.numpy(), repeated.cluster_centers_.numpy(), rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(weighted.stream_counts.numpy(), repeated.stream_counts.numpy(), rtol=1e-10, atol=1e-12)
        assert float(weighted.inertia_) == pytest.approx(float(repeated.inertia_), rel=1e-10)
    assert int(weighted.stream_steps) == 4


def test_partial_fit_statistics_are_weighted_means_of_the_batch():
    """The first step's statistics: per-cluster weight and weighted sums over the batch's total weight."""
    X = clusters(3, 60, 2, seed=8)
    weights = np.random.default_rng(9).uniform(0.0, 2.0, size=len(X))
    init = X[:3]
    model = torch_em.KMeans(3, init=init, dtype=torch.float64).partial_fit(X, sample_weight=weights)
    labels = ((X[:, None] - init[None]) ** 2).sum(-1).argmin(1)
    share = np.array([weights[labels == k].sum() for k in range(3)]) / weights.sum()
    means = np.stack([np.average(X[labels == k], axis=0, weights=weights[labels == k]) for k in range(3)])
    np.testing.assert_allclose(model.stream_counts.numpy(), share, rtol=1e-12)
    np.testing.assert_allclose(model.cluster_centers_.numpy(), means, rtol=1e-12, atol=1e-12)


def test_unit_weights_equal_no_weights_exactly():
    X = clusters()
    init = X[[0, 150, 300, 450, 600]]
    plain = torch_em.KMeans(5, init=init, dtype=torch.float64).fit(X)
    ones = torch_em.KMeans(5, init=init, dtype=torch.float64).fit(X, sample_weight=np.ones(len(X)))
    assert torch.equal(plain.cluster_centers_, ones.cluster_centers_)
    assert torch.equal(plain.labels_, ones.labels_) and torch.equal(plain.inertia_, ones.inertia_)


@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-10), (np.float32, 1e-4)])
def test_matches_sklearn_with_weights(dtype, rtol, device):
    X = clusters(6, 150, 4, seed=11).astype(dtype)
    weights = np.random.default_rng(12).uniform(0.0, 3.0, size=len(X)).astype(dtype)
    weights[::9] = 0
    init = initial_centres(X, 6, weights, seed=13)
    reference = SklearnKMeans(6, init=init, n_init=1, algorithm="lloyd").fit(X, sample_weight=weights)
    ours = torch_em.KMeans(6, init=init, device=device).fit(X, sample_weight=weights)
    assert ours.cluster_centers_.dtype == torch.from_numpy(X).dtype
    assert int(ours.n_iter_) == reference.n_iter_
    np.testing.assert_allclose(ours.cluster_centers_.cpu().numpy(), reference.cluster_centers_, rtol=rtol, atol=rtol)
    assert float(ours.inertia_) == pytest.approx(reference.inertia_, rel=rtol)
    np.testing.assert_array_equal(ours.labels_.cpu().numpy(), reference.labels_)
    X_test = clusters(6, 50, 4, seed=14).astype(dtype)
    w_test = np.random.default_rng(15).uniform(size=len(X_test)).astype(dtype)
    assert float(ours.score(X_test, sample_weight=w_test)) == pytest.approx(reference.score(X_test, sample_weight=w_test), rel=rtol)


@pytest.mark.parametrize("max_iter", [1, 300])
def test_empty_cluster_relocation_with_weights_matches_sklearn(max_iter):
    X = clusters(3, 100, 2, seed=16)
    weights = np.random.default_rng(17).uniform(0.5, 2.0, size=len(X))
    init = np.concatenate([X[[0, 150]], np.full((2, 2), 1e3)])  # the last two centres attract nothing
    reference = SklearnKMeans(4, init=init, n_init=1, max_iter=max_iter, algorithm="lloyd").fit(X, sample_weight=weights)
    ours = torch_em.KMeans(4, init=init, max_iter=max_iter, dtype=torch.float64).fit(X, sample_weight=weights)
    np.testing.assert_allclose(ours.cluster_centers_.numpy(), reference.cluster_centers_, rtol=1e-9, atol=1e-9)
    assert float(ours.inertia_) == pytest.approx(reference.inertia_, rel=1e-9)
    np.testing.assert_array_equal(ours.labels_.numpy(), reference.labels_)


def test_cluster_of_zero_weight_rows_is_empty_like_sklearn():
    """A cluster whose rows all have weight 0 counts as empty and takes the farthest point."""
    X = clusters(3, 60, 2, seed=18)
    outliers = np.full((3, 2), 50.0) + np.arange(6.0).reshape(3, 2) / 10
    X = np.concatenate([X, outliers])
    weights = np.r_[np.random.default_rng(19).uniform(0.5, 2.0, size=len(X) - 3), np.zeros(3)]
    init = np.concatenate([X[[0, 70, 140]], outliers[:1]])
    reference = SklearnKMeans(4, init=init, n_init=1, algorithm="lloyd").fit(X, sample_weight=weights)
    ours = torch_em.KMeans(4, init=init, dtype=torch.float64).fit(X, sample_weight=weights)
    np.testing.assert_allclose(ours.cluster_centers_.numpy(), reference.cluster_centers_, rtol=1e-9, atol=1e-9)
    assert float(ours.inertia_) == pytest.approx(reference.inertia_, rel=1e-9)


def test_cluster_that_loses_every_point_is_empty_despite_rounding():
    """Weights 0.3 and 0.3 / 1.4 leave a running weight of -5.6e-17 behind when both points
    leave: the cluster must still count as empty (and be relocated as in scikit-learn)."""
    X = np.r_[np.full(5, -1.9), -1.0, 1.4, np.full(5, 1.9), 6.0].reshape(-1, 1)
    weights = np.r_[np.ones(5), 0.3, 0.3 / 1.4, np.ones(5), 1.0]
    init = np.array([[-3.0], [0.0], [3.0], [6.0]])  # the second centre loses -1 and 1.4 in step 2
    reference = SklearnKMeans(4, init=init, n_init=1, algorithm="lloyd").fit(X, sample_weight=weights)
    ours = torch_em.KMeans(4, init=init, dtype=torch.float64).fit(X, sample_weight=weights)
    np.testing.assert_allclose(ours.cluster_centers_.numpy(), reference.cluster_centers_, rtol=1e-12, atol=1e-12)
    assert float(ours.inertia_) == pytest.approx(reference.inertia_, rel=1e-12)


@pytest.mark.parametrize("init", ["given", "k-means++"])
def test_zero_weights_equal_removed_rows(init):
    X = clusters(4, 100, 3, seed=19)
    weights = np.random.default_rng(20).uniform(0.5, 1.5, size=len(X))
    weights[np.random.default_rng(21).random(len(X)) < 0.3] = 0
    kept = weights > 0
    options = dict(init=X[kept][[0, 80, 160, 240]] if init == "given" else init, seed=3, dtype=torch.float64)
    with_zeros = torch_em.KMeans(4, **options).fit(X, sample_weight=weights)
    removed = torch_em.KMeans(4, **options).fit(X[kept], sample_weight=weights[kept])
    np.testing.assert_allclose(with_zeros.cluster_centers_.numpy(), removed.cluster_centers_.numpy(), rtol=1e-10, atol=1e-10)
    assert float(with_zeros.inertia_) == pytest.approx(float(removed.inertia_), rel=1e-10)
    np.testing.assert_array_equal(with_zeros.labels_[kept].numpy(), removed.labels_.numpy())
    kept_score = float(removed.score(X[kept], sample_weight=weights[kept]))
    assert float(with_zeros.score(X, sample_weight=weights)) == pytest.approx(kept_score, rel=1e-10)


def test_score_is_minus_weighted_inertia():
    X = clusters(4, 60, 2, seed=22)
    model = torch_em.KMeans(4, seed=0, dtype=torch.float64).fit(X)
    X_test = clusters(4, 30, 2, seed=23)
    w_test = np.random.default_rng(24).uniform(size=len(X_test))
    centres = model.cluster_centers_.numpy()
    nearest = ((X_test[:, None] - centres[None]) ** 2).sum(-1).min(1)
    assert float(model.score(X_test, sample_weight=w_test)) == pytest.approx(-(w_test * nearest).sum(), rel=1e-10)
    assert float(model.score(X_test)) == pytest.approx(-nearest.sum(), rel=1e-10)


def test_batched_score_with_per_model_weights():
    data = np.stack([clusters(3, 40, 2, seed=s) for s in range(2)])  # (2, N, 2)
    model = torch_em.KMeans(3, batch_shape=(2,), seed=0, dtype=torch.float64).fit(data)
    weights = np.random.default_rng(25).uniform(size=data.shape[:2])
    scores = model.score(data, sample_weight=weights)
    for b in range(2):
        nearest = ((data[b][:, None] - model.cluster_centers_[b].numpy()[None]) ** 2).sum(-1).min(1)
        assert float(scores[b]) == pytest.approx(-(weights[b] * nearest).sum(), rel=1e-10)


def test_weighted_kmeans_plusplus_never_picks_a_zero_weight_point():
    X = clusters(8, 40, 2, seed=26)
    weights = np.zeros(len(X))
    positive = np.random.default_rng(27).choice(len(X), 12, replace=False)
    weights[positive] = np.random.default_rng(28).uniform(0.1, 5.0, size=12)
    for seed in range(40):
        centres, indices = torch_em.kmeans_plusplus(X, 10, sample_weight=weights, seed=seed)
        assert set(indices.tolist()) <= set(positive.tolist()) and len(set(indices.tolist())) == 10
        np.testing.assert_array_equal(centres, X[indices])
    model = torch_em.KMeans(10, n_init=5, seed=0, max_iter=1).fit(X, sample_weight=weights)
    assert np.isfinite(model.cluster_centers_.numpy()).all()


def weighted_kmeans_plusplus_reference(X: np.ndarray, weights: np.ndarray, K: int, n_trials: int, seed: int) -> np.ndarray:
    """scikit-learn's weighted greedy k-means++ in numpy, fed the uniforms torch_em draws."""
    # every uniform drawn at once: the first centre's, then n_trials per further centre
    uniforms = RestartStreams(seed, 1, "cpu").rand(1, 1 + (K - 1) * n_trials, dtype=torch.float64)[0, 0].numpy()

    def draw(mass: np.ndarray, targets: np.ndarray) -> np.ndarray:
        cumulative = np.cumsum(mass)
        return np.searchsorted(cumulative, targets * cumulative[-1], side="right")

    indices = [int(draw(weights, uniforms[:1])[0])]
    closest = ((X - X[indices[0]]) ** 2).sum(1)
    for k in range(1, K):
        candidates = draw(weights * closest, uniforms[1 + (k - 1) * n_trials: 1 + k * n_trials])
        reached = np.minimum(closest, ((X[None] - X[candidates][:, None]) ** 2).sum(-1))  # (t, N)
        best = int(np.argmin(reached @ weights))
        indices.append(int(candidates[best]))
        closest = reached[best]
    return np.array(indices)


@pytest.mark.parametrize("seed", range(5))
def test_weighted_kmeans_plusplus_follows_the_reference_algorithm(seed):
    X = clusters(6, 30, 2, seed=40 + seed)
    weights = np.random.default_rng(seed).exponential(size=len(X))
    weights[::4] = 0
    expected = weighted_kmeans_plusplus_reference(X, weights, 6, 2 + int(np.log(6)), seed)
    np.testing.assert_array_equal(torch_em.kmeans_plusplus(X, 6, sample_weight=weights, seed=seed)[1], expected)


def test_weighted_random_init_picks_distinct_points_of_positive_weight():
    X = torch.as_tensor(clusters(4, 50, 2, seed=29))
    weights = torch.zeros(len(X), dtype=X.dtype)
    weights[::10] = 1.0
    points = random_points(X, 1, 6, RestartStreams(0, 20, "cpu"), weights)  # (20, 1, 6, 2)
    picked = (points.reshape(-1, 1, 2) == X[::10].reshape(1, -1, 2)).all(-1)  # (120, positive rows)
    assert bool(picked.any(-1).all())
    assert all(len(torch.unique(p, dim=0)) == 6 for p in points[:, 0])


def test_first_centre_is_drawn_proportionally_to_the_weights():
    X = np.arange(10.0).reshape(5, 2)
    weights = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    firsts = np.array([int(torch_em.kmeans_plusplus(X, 1, sample_weight=weights, seed=s)[1][0]) for s in range(2000)])
    frequencies = np.bincount(firsts, minlength=5) / len(firsts)
    expected = weights / weights.sum()
    assert frequencies[0] == 0
    np.testing.assert_allclose(frequencies, expected, atol=4 * np.sqrt(0.25 / len(firsts)))


def test_y_is_accepted_and_ignored():
    X = clusters(3, 50, 2, seed=30)
    weights = np.random.default_rng(31).uniform(size=len(X))
    y = np.arange(len(X))
    plain = torch_em.KMeans(3, seed=0, dtype=torch.float64).fit(X, sample_weight=weights)
    with_y = torch_em.KMeans(3, seed=0, dtype=torch.float64).fit(X, y, sample_weight=weights)
    assert torch.equal(plain.cluster_centers_, with_y.cluster_centers_)
    labels = torch_em.KMeans(3, seed=0, dtype=torch.float64).fit_predict(X, y, weights)
    assert torch.equal(labels, plain.labels_)
    assert torch.equal(plain.score(X, y, weights), plain.score(X, sample_weight=weights))
    stream = torch_em.KMeans(3, seed=0, dtype=torch.float64).partial_fit(X, y, sample_weight=weights)
    again = torch_em.KMeans(3, seed=0, dtype=torch.float64).partial_fit(X, sample_weight=weights)
    assert torch.equal(stream.cluster_centers_, again.cluster_centers_)


BAD_WEIGHTS = [
    (np.ones(5), r"sample_weight must have shape \(90,\) or \(2, 90\).*got \(5,\)"),
    (np.ones((3, 90)), r"sample_weight must have shape \(90,\) or \(2, 90\).*got \(3, 90\)"),
    (np.full(90, -1.0), "sample_weight must be non-negative, got minimum -1"),
    (np.r_[np.nan, np.ones(89)], "sample_weight must be finite, got 1 NaN"),
    (np.zeros(90), "sample_weight must have a positive sum for every model, got 0"),
    (np.stack([np.ones(90), np.zeros(90)]), r"positive sum for every model, got 0 for model\(s\) \[\(1,\)\]"),
    ("heavy", "sample_weight must be a tensor or array of numbers"),
    (np.full(90, 1e306), "sample_weight sums to .* overflow torch.float64"),
]


@pytest.mark.parametrize("weights, message", BAD_WEIGHTS)
def test_bad_weights_raise_and_change_nothing(weights, message):
    X = clusters(3, 30, 2, seed=32)[:90]
    model = torch_em.KMeans(3, batch_shape=(2,), seed=0).fit(X)
    model.partial_fit(X)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    fitted = (model.labels_.clone(), model.inertia_.clone(), model.n_iter_.clone())
    for call in (model.fit, model.partial_fit, model.score, model.fit_predict):
        with pytest.raises(ValueError, match=message):
            call(X, sample_weight=weights)
    after = model.state_dict()
    assert all(torch.equal(after[name], value) for name, value in before.items())
    assert torch.equal(model.labels_, fitted[0]) and torch.equal(model.inertia_, fitted[1]) and torch.equal(model.n_iter_, fitted[2])


def test_bad_weights_leave_an_unfitted_model_unfitted():
    model = torch_em.KMeans(3)
    with pytest.raises(ValueError, match="sample_weight"):
        model.fit(clusters(3, 30, 2).astype(np.float64), sample_weight=-np.ones(111))
    assert model.n_features is None and model.cluster_centers_.dtype == torch.get_default_dtype()
    assert model.labels_ is None and model.stream_steps is None


def test_float32_weights_overflow_rejected():
    X = clusters(3, 30, 2).astype(np.float32)
    with pytest.raises(ValueError, match="sample_weight sums to .* overflow torch.float32"):
        torch_em.KMeans(3).fit(X, sample_weight=np.full(len(X), 1e36, dtype=np.float32))


@pytest.mark.parametrize("weighted", [False, True])
def test_more_clusters_than_distinct_points_like_sklearn(weighted):
    """Every point on its centre: nothing is relocated, and the cluster without weight sits at
    the mean of the heaviest cluster (scikit-learn's convention)."""
    X = np.repeat(np.array([[0.0, 0.0], [3.0, 1.0], [-2.0, 4.0]]), [4, 6, 5], axis=0)
    weights = np.random.default_rng(33).uniform(0.5, 2.0, size=len(X)) if weighted else None
    init = np.concatenate([X[[0, 4, 10]], X[[0]]])  # the last centre duplicates the first: it attracts nothing
    with pytest.warns(Warning, match="distinct clusters"):
        reference = SklearnKMeans(4, init=init, n_init=1, algorithm="lloyd").fit(X, sample_weight=weights)
    ours = torch_em.KMeans(4, init=init, dtype=torch.float64).fit(X, sample_weight=weights)
    np.testing.assert_allclose(ours.cluster_centers_.numpy(), reference.cluster_centers_, rtol=1e-12, atol=1e-12)
    assert float(ours.inertia_) == pytest.approx(reference.inertia_, abs=1e-12)
    np.testing.assert_array_equal(ours.labels_.numpy(), reference.labels_)
