"""The default initialisation (the most likely of several batched k-means++ seedings) against a
single seeding: separated clusters are found from every seed; the seeding kept is the one whose
first M-step gives the data the highest log-likelihood (best_of_seedings keeps the one of least
inertia). (That near-ties do not depend on the chunking is tested by the streamed fit of
test_batch_forms, which starts where the in-memory fit starts.)"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

import torch_em
from torch_em import initialization
from torch_em.lloyd import first_argmax_

F64 = torch.float64


def grid_of_blobs(n_per: int = 60, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Ten unit-variance blobs on a 5 x 2 grid of spacing 6: (600, 2) points and their blob."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[i, j] for i in range(5) for j in range(2)], dtype=F64) * 6
    labels = torch.arange(10).repeat_interleave(n_per)
    return centres[labels] + torch.randn(len(labels), 2, generator=g, dtype=F64), labels


def agreement_over_seeds(X: torch.Tensor, labels: torch.Tensor, seeds: range) -> list[float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [adjusted_rand_score(labels, torch_em.GaussianMixture(10, seed=s, dtype=F64).fit(X).predict(X))
                for s in seeds]


def test_separated_clusters_are_found_from_every_seed(monkeypatch):
    X, labels = grid_of_blobs()
    assert min(agreement_over_seeds(X, labels, range(20))) > 0.99
    # The data are hard enough that one seeding with its 5 Lloyd iterations fails on some seeds.
    monkeypatch.setattr(initialization, "N_SEEDINGS", 1)
    assert min(agreement_over_seeds(X, labels, range(20))) < 0.95


@pytest.mark.parametrize("per_model", [False, True])
def test_the_kept_seeding_has_the_least_inertia_of_the_seedings(per_model):
    X, _ = grid_of_blobs(n_per=20, seed=1)
    X = X - X.mean(0)
    M = 3 if per_model else 1
    data = torch.stack([X, X.flip(0), 2 * X]) if per_model else X
    tol = initialization.relative_tolerance(data, 1e-4)
    streams = initialization.RestartStreams(5, 2, "cpu")
    kept = initialization.best_of_seedings(data, M, 10, streams, 64, None, None, tol, n_seedings=6)[0]  # (2, M, 10, 2)
    # The same draws, the candidates kept apart: models (M, 6) flattened, as best_of_seedings lays them out.
    many = data if not per_model else data.repeat_interleave(6, 0)
    seeded = initialization.kmeans_plusplus(many, M * 6, 10, initialization.RestartStreams(5, 2, "cpu"), 64)
    candidates = initialization.lloyd(many, seeded, max_iter=initialization.SEEDING_LLOYD_ITERATIONS,
                                      tol=tol if tol.dim() == 0 else tol.repeat_interleave(6), chunk_size=64)
    inertia = candidates.distances.sum(-1).view(2, M, 6)
    kept_inertia = initialization.nearest(data, kept, 64)[1].sum(-1)  # (2, M)
    torch.testing.assert_close(kept_inertia, inertia.amin(-1), rtol=1e-12, atol=0)
    assert bool((inertia.amax(-1) > inertia.amin(-1) * 1.01).any())  # the choice mattered somewhere



@pytest.mark.parametrize("per_model", [False, True])
def test_the_kept_seeding_comes_with_the_labels_of_its_nearest_centres(per_model):
    X, _ = grid_of_blobs(n_per=20, seed=3)
    X = X - X.mean(0)
    data = torch.stack([X, X.flip(0)]) if per_model else X
    M = 2 if per_model else 1
    tol = initialization.relative_tolerance(data, 1e-4)
    centres, labels = initialization.best_of_seedings(data, M, 6, initialization.RestartStreams(2, 2, "cpu"), 64,
                                                      None, None, tol, n_seedings=3)
    assert labels.shape == (2, M, X.shape[0])
    torch.testing.assert_close(labels, initialization.nearest(data, centres, 64)[0], rtol=0, atol=0)


def test_a_grid_over_the_number_of_components_shares_nested_seedings():
    """With ``components`` (a grid over K padded to the largest, as select builds it) every model
    starts from the first k centres of the first model's seedings of the largest K, each followed
    by its own Lloyd iterations with k centres, and keeps the one of least inertia."""
    X, _ = grid_of_blobs(n_per=20, seed=2)
    X = X - X.mean(0)
    grid, K, S = [2, 5, 10], 10, 3
    components = (torch.arange(K) < torch.tensor(grid)[:, None]).unsqueeze(0)  # (1, M, K)
    tol = initialization.relative_tolerance(X, 1e-4)
    kept = initialization.best_of_seedings(X, len(grid), K, initialization.RestartStreams(4, 1, "cpu"), 64, None,
                                           components, tol, n_seedings=S)[0]  # (1, M, K, 2)
    seeded = initialization.kmeans_plusplus(X, S, K, initialization.RestartStreams(4, 1, "cpu"), 64)  # (1, S, K, 2)
    for m, k in enumerate(grid):
        alone = initialization.lloyd(X, seeded[:, :, :k], max_iter=initialization.SEEDING_LLOYD_ITERATIONS, tol=tol,
                                     chunk_size=64)
        best = int(alone.distances.sum(-1)[0].argmin())
        torch.testing.assert_close(kept[0, m, :k], alone.centres[0, best], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("n_centres", [4, 40])  # points last in memory, and centres last
def test_nearest_centre_is_the_first_of_equal_scores(dtype, n_centres):
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 3, (2, 3, 5, 40), generator=g).to(dtype)  # (R, M, K, n): many ties
    expected = torch.from_numpy(scores.numpy().argmax(-2))  # numpy's argmax: the first of the maxima
    for layout in (scores.clone(), scores.permute(3, 0, 1, 2).contiguous().permute(1, 2, 3, 0)):
        best, index = first_argmax_(layout)
        assert torch.equal(index, expected) and torch.equal(best, scores.amax(-2))
    # against brute force on points and centres: labels and squared distances
    X = torch.randn(50, 3, generator=g, dtype=dtype)
    centres = torch.randn(2, 3, n_centres, 3, generator=g, dtype=dtype)
    for data in (X, X.expand(3, 50, 3) * torch.tensor([1.0, 2.0, -1.0], dtype=dtype)[:, None, None]):
        labels, dist = initialization.nearest(data, centres, 16)
        brute = ((data.unsqueeze(-3).unsqueeze(0) - centres.unsqueeze(-2)) ** 2).sum(-1)  # (R, M, K, n)
        assert torch.equal(labels, brute.argmin(-2))
        torch.testing.assert_close(dist, brute.amin(-2), rtol=1e-4 if dtype == torch.float32 else 1e-10, atol=1e-5)


def test_random_responsibilities_are_a_function_of_the_rows():
    """A second pass over the chunks (statistics taken again) draws what the first drew, and the
    streams then go on as after one pass."""
    X = torch.randn(10, 2, dtype=F64)

    def passes(n_passes):
        streams = initialization.RestartStreams(3, 2, "cpu")
        resp = initialization.initial_responsibilities("random", X, 2, 3, streams, 4)
        drawn = [[resp(start, min(start + 4, 10)) for start in range(0, 10, 4)] for _ in range(n_passes)]
        return drawn, streams.rand(5)

    (once,), next_once = passes(1)
    twice, next_twice = passes(2)
    for first, second, alone in zip(*twice, once):
        assert torch.equal(first, second) and torch.equal(first, alone)
    assert torch.equal(next_once, next_twice)


def hard_partition_log_likelihood(X: np.ndarray, labels: np.ndarray, K: int, reg_covar: float = 1e-6) -> float:
    """Total log-likelihood of X under the full-covariance mixture fitted (one M-step) to a hard
    partition, computed independently with scipy."""
    from scipy.special import logsumexp
    from scipy.stats import multivariate_normal

    log_joint = []
    for k in range(K):
        members = X[labels == k]
        cov = np.cov(members.T, bias=True) + reg_covar * np.eye(X.shape[1])
        log_joint.append(np.log(len(members) / len(X)) + multivariate_normal(members.mean(0), cov).logpdf(X))
    return float(logsumexp(np.stack(log_joint), axis=0).sum())


def test_the_default_keeps_the_most_likely_of_its_seedings():
    """Of its N_SEEDINGS k-means++ seedings (the same draws as :func:`seedings`), the default
    initialisation keeps the one whose first M-step gives the data the highest log-likelihood
    (not the least inertia), checked against scipy for several seeds."""
    g = torch.Generator().manual_seed(4)
    X = torch.cat([torch.randn(60, 2, generator=g, dtype=F64) * torch.tensor([3.0, 0.3], dtype=F64),
                   torch.randn(60, 2, generator=g, dtype=F64) * torch.tensor([0.3, 3.0], dtype=F64) + 2,
                   torch.randn(60, 2, generator=g, dtype=F64) + 5])
    K, S = 4, initialization.N_SEEDINGS
    centred = X - X.mean(0)
    not_by_inertia = 0
    for seed in range(6):
        model = torch_em.GaussianMixture(K, seed=seed, dtype=F64).initialize(X)
        streams = initialization.RestartStreams(seed, range(1), "cpu")
        tol = initialization.relative_tolerance(centred, 1e-4)
        _, labels, inertia = initialization.seedings(centred, 1, K, streams, 64, None, None, tol, S)
        scores = [hard_partition_log_likelihood(X.numpy(), labels[0, 0, s].numpy(), K) for s in range(S)]
        best = next(s for s, score in enumerate(scores) if score >= max(scores) - 1e-6 * abs(max(scores)))  # first near-best
        members = labels[0, 0, best]
        expected_means = torch.stack([X[members == k].mean(0) for k in range(K)])
        torch.testing.assert_close(model.means, expected_means, rtol=1e-10, atol=1e-12)
        not_by_inertia += best != int(inertia[0, 0].argmin())
    assert not_by_inertia > 0  # the likelihood chose otherwise than the inertia would have, somewhere
