"""The default initialisation (the best of several batched k-means++ seedings) against a single
seeding: separated clusters are found from every seed; the seeding kept is the one of least
inertia. (That near-ties do not depend on the chunking is tested by the streamed fit of
test_batch_forms, which starts where the in-memory fit starts.)"""
from __future__ import annotations

import warnings

import pytest
import torch
from sklearn.metrics import adjusted_rand_score

import torch_em
from torch_em import initialization

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
    kept = initialization.best_of_seedings(data, M, 10, streams, 64, None, None, tol, n_seedings=6)  # (2, M, 10, 2)
    # The same draws, the candidates kept apart: models (M, 6) flattened, as best_of_seedings lays them out.
    many = data if not per_model else data.repeat_interleave(6, 0)
    seeded = initialization.kmeans_plusplus(many, M * 6, 10, initialization.RestartStreams(5, 2, "cpu"), 64)
    candidates = initialization.lloyd(many, seeded, max_iter=initialization.SEEDING_LLOYD_ITERATIONS,
                                      tol=tol if tol.dim() == 0 else tol.repeat_interleave(6), chunk_size=64)
    inertia = candidates.distances.sum(-1).view(2, M, 6)
    kept_inertia = initialization.nearest(data, kept, 64)[1].sum(-1)  # (2, M)
    torch.testing.assert_close(kept_inertia, inertia.amin(-1), rtol=1e-12, atol=0)
    assert bool((inertia.amax(-1) > inertia.amin(-1) * 1.01).any())  # the choice mattered somewhere

