"""Sample weights in every training mode: integer weights give the fit of repeated rows.

Each comparison runs EM from identical parameters (given initial values, or a warm start from a
shared state), once on rows repeated as often as their weight and once on the distinct rows
with the weights, in float64: full-batch, chunked, streamed (batches ``(x, w)``), online,
per-model weights (bootstrap-style), torch.distributed and the differentiable layer.
"""
from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import torch_em
from torch_em.functional import em as functional_em

from conftest import COVARIANCE_TYPES, blobs

F64 = torch.float64
TIGHT = dict(rtol=1e-10, atol=1e-10)


def weighted_data(seed: int = 0, n_per_cluster: int = 40):
    """Distinct rows X (N, 3), integer weights w (N,) in 0..3 and X with each row repeated w times."""
    X = torch.as_tensor(blobs(n_per_cluster, seed=seed))
    weights = torch.as_tensor(np.random.default_rng(seed + 1).integers(0, 4, len(X)), dtype=F64)
    weights[:3] = 1.0  # keep a point of every cluster
    return X, weights, X.repeat_interleave(weights.long(), 0)


def start(X: torch.Tensor, covariance_type: str = "full") -> dict:
    """Initial parameters that do not depend on the rows' multiplicities."""
    precisions = {"full": np.broadcast_to(np.eye(3), (3, 3, 3)).copy(), "tied": np.eye(3),
                  "diag": np.ones((3, 3)), "spherical": np.ones(3)}[covariance_type]
    return dict(weights_init=np.full(3, 1 / 3), means_init=X[[0, 1, 2]].numpy() + 0.5, precisions_init=precisions,
                covariance_type=covariance_type)


def quiet(call, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch_em.ConvergenceWarning)
        return call(*args, **kwargs)


def assert_same_fit(a: torch_em.GaussianMixture, b: torch_em.GaussianMixture, **tolerance) -> None:
    tolerance = tolerance or TIGHT
    for name in ("weights", "means", "covariances", "lower_bound_"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), **tolerance)
    assert torch.equal(a.n_iter_, b.n_iter_)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
@pytest.mark.parametrize("chunk_size", [None, 17])
def test_integer_weights_fit_as_repeated_rows(covariance_type, chunk_size):
    X, weights, repeated = weighted_data()
    options = dict(**start(X, covariance_type), tol=1e-8, max_iter=50, dtype=F64, chunk_size=chunk_size)
    by_rows = quiet(torch_em.GaussianMixture(3, **options).fit, repeated)
    by_weights = quiet(torch_em.GaussianMixture(3, **options).fit, X, sample_weight=weights)
    assert int(by_rows.n_iter_) > 3
    assert_same_fit(by_weights, by_rows)
    torch.testing.assert_close(by_weights.score(X, sample_weight=weights), by_rows.score(repeated), **TIGHT)


def test_zero_weights_remove_rows_and_weights_scale_freely():
    X, weights, _ = weighted_data()
    options = dict(**start(X), tol=1e-8, max_iter=50, dtype=F64)
    kept = weights > 0
    removed = quiet(torch_em.GaussianMixture(3, **options).fit, X[kept], sample_weight=weights[kept])
    zero = quiet(torch_em.GaussianMixture(3, **options).fit, X, sample_weight=weights)
    scaled = quiet(torch_em.GaussianMixture(3, **options).fit, X, sample_weight=weights * 0.37)
    assert_same_fit(zero, removed)
    assert_same_fit(scaled, removed)


@pytest.mark.parametrize("family", [torch_em.Poisson(), torch_em.Exponential()], ids=["poisson", "exponential"])
def test_weights_equal_repeats_for_other_families_from_a_shared_start(family):
    """A warm start from one state: any family, the same EM iterations on weights and repeats."""
    rng = np.random.default_rng(3)
    X = torch.as_tensor(np.concatenate([rng.poisson(2.0, (60, 2)), rng.poisson(9.0, (60, 2))]) + 1.0, dtype=F64)
    weights = torch.as_tensor(rng.integers(1, 4, len(X)), dtype=F64)
    repeated = X.repeat_interleave(weights.long(), 0)
    seeded = quiet(torch_em.Mixture(family, 2, seed=0, max_iter=2, dtype=F64).fit, X)
    by_rows, by_weights = (copy.deepcopy(seeded) for _ in range(2))
    for model in (by_rows, by_weights):
        model.warm_start, model.max_iter, model.tol = True, 40, 1e-9
    quiet(by_rows.fit, repeated)
    quiet(by_weights.fit, X, sample_weight=weights)
    for name in ("logits", *by_rows.theta()):
        torch.testing.assert_close(getattr(by_weights, name), getattr(by_rows, name), **TIGHT)
    assert torch.equal(by_weights.n_iter_, by_rows.n_iter_)


def test_streamed_weighted_batches_equal_repeated_rows():
    X, weights, repeated = weighted_data()
    options = dict(**start(X), tol=1e-8, max_iter=50, dtype=F64)
    by_rows = quiet(torch_em.GaussianMixture(3, **options).fit, lambda: iter(repeated.split(29)))
    batches = list(zip(X.split(23), weights.split(23)))
    by_weights = quiet(torch_em.GaussianMixture(3, **options).fit, lambda: iter(batches), sample_weight="batches")
    assert_same_fit(by_weights, by_rows)
    full = quiet(torch_em.GaussianMixture(3, **options).fit, X, sample_weight=weights)
    assert_same_fit(by_weights, full)


def test_per_model_weights_fit_each_model_on_its_own_weighted_data():
    """(*batch_shape, N) weights with shared X: one bootstrap-like resample per model."""
    X, _, _ = weighted_data()
    rng = np.random.default_rng(5)
    weights = torch.as_tensor(rng.multinomial(len(X), np.full(len(X), 1 / len(X)), size=(2, 2)), dtype=F64)
    options = dict(**start(X), tol=1e-8, max_iter=60, dtype=F64)
    batched = quiet(torch_em.GaussianMixture(3, batch_shape=(2, 2), **options).fit, X, sample_weight=weights)
    for index in np.ndindex(2, 2):
        single = quiet(torch_em.GaussianMixture(3, **options).fit, X.repeat_interleave(weights[index].long(), 0))
        for name in ("weights", "means", "covariances", "lower_bound_"):
            torch.testing.assert_close(getattr(batched, name)[index], getattr(single, name), **TIGHT)
        assert int(batched.n_iter_[index]) == int(single.n_iter_)


def test_partial_fit_with_weights_equals_repeated_rows():
    X, weights, _ = weighted_data()
    options = dict(**start(X), dtype=F64, learning_decay=0.7, n_features=3)
    by_rows, by_weights = torch_em.GaussianMixture(3, **options), torch_em.GaussianMixture(3, **options)
    for rows, w in zip(X.split(40), weights.split(40)):
        by_rows.partial_fit(rows.repeat_interleave(w.long(), 0))
        by_weights.partial_fit(rows, sample_weight=w)
    # (stream_sums are taken about each stream's reference point, the mean of its first batch's
    # rows, which repeats move: compared through the parameters they give.)
    for name in ("weights", "means", "covariances", "stream_counts", "lower_bound_"):
        torch.testing.assert_close(getattr(by_weights, name), getattr(by_rows, name), **TIGHT)


def test_functional_em_weights_equal_repeated_points():
    X, weights, repeated = weighted_data(n_per_cluster=15)
    family = torch_em.Gaussian("diag")
    init = {"logits": torch.zeros(3, dtype=F64), "loc": X[[0, 1, 2]] + 0.5,
            "raw_precision_cholesky": torch.zeros(3, 3, dtype=F64)}
    by_rows = functional_em(repeated, init, 8, family=family)
    by_weights = functional_em(X, init, 8, family=family, sample_weight=weights)
    torch.testing.assert_close(by_weights.logits, by_rows.logits, **TIGHT)
    for name, value in by_rows.theta.items():
        torch.testing.assert_close(by_weights.theta[name], value, **TIGHT)
    torch.testing.assert_close(by_weights.log_likelihood, by_rows.log_likelihood, **TIGHT)


@pytest.mark.parametrize("bad, message", [
    (lambda n: np.ones(5), r"sample_weight must have shape \(231,\) \(one weight per point of X\), got \(5,\)"),
    (lambda n: -np.ones(n), r"sample_weight must be non-negative, got minimum -1"),
    (lambda n: np.full(n, np.nan), r"sample_weight must be finite"),
    (lambda n: np.zeros(n), r"sample_weight must have a positive sum for every model, got 0"),
], ids=["shape", "negative", "nan", "zero"])
def test_bad_weights_are_rejected_and_change_nothing(bad, message):
    X, _, _ = weighted_data()
    assert len(X) == 231
    bad = bad(len(X))
    model = quiet(torch_em.GaussianMixture(3, seed=0, dtype=F64).fit, X)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    for call in (model.fit, model.partial_fit):
        with pytest.raises(ValueError, match=message):
            call(X, sample_weight=bad)
    with pytest.raises(ValueError, match=message):
        model.score(X, sample_weight=bad)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_a_batch_source_takes_weights_only_from_its_batches():
    X, weights, _ = weighted_data()
    model = torch_em.GaussianMixture(3, seed=0, dtype=F64)
    with pytest.raises(ValueError, match=r"sample_weight must be None or 'batches'"):
        model.fit(lambda: iter(X.split(50)), sample_weight=weights)
    with pytest.raises(ValueError, match=r"every batch must be \(x, w, \.\.\.\)"):
        model.fit(lambda: iter(X.split(50)), sample_weight="batches")
    assert not model.is_initialized


# --- torch.distributed ---------------------------------------------------------------------------
WORLD = 2


def _weighted_worker(rank: int, init_file: str, X: torch.Tensor, weights: torch.Tensor, kwargs: dict,
                     out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model = torch_em.GaussianMixture(3, **kwargs)
        quiet(model.fit, X.chunk(WORLD)[rank], sample_weight=weights.chunk(WORLD)[rank])
        torch.save(model.state_dict(), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend")
def test_distributed_weighted_fit_equals_repeated_rows_in_one_process(tmp_path):
    X, weights, repeated = weighted_data()
    kwargs = dict(**start(X), tol=1e-8, max_iter=50, dtype=F64)
    mp.spawn(_weighted_worker, args=(str(tmp_path / "init"), X, weights, kwargs, str(tmp_path)), nprocs=WORLD, join=True)
    single = quiet(torch_em.GaussianMixture(3, **kwargs).fit, repeated)
    for rank in range(WORLD):
        state = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        reference = single.state_dict()
        for name in ("logits", "loc", "raw_precision_cholesky"):
            torch.testing.assert_close(state[name], reference[name], **TIGHT)


def test_weighted_score_is_the_weighted_mean_of_score_samples():
    X, weights, _ = weighted_data()
    model = quiet(torch_em.GaussianMixture(3, seed=0, dtype=F64).fit, X)
    expected = (model.score_samples(X) * weights).sum() / weights.sum()
    torch.testing.assert_close(model.score(X, sample_weight=weights), expected, rtol=1e-12, atol=0)
    assert not math.isclose(float(model.score(X, sample_weight=weights)), float(model.score(X)), rel_tol=1e-6)


def test_default_initialisation_never_seeds_at_a_zero_weight_point():
    """k-means++ (and random_from_data) draw in proportion to the weights: far outliers of weight
    0 never become a component, as they would without weights."""
    X, _, _ = weighted_data()
    outliers = torch.full((5, 3), 1e3, dtype=F64)
    data = torch.cat([X, outliers])
    weights = torch.cat([torch.ones(len(X), dtype=F64), torch.zeros(5, dtype=F64)])
    for init_params in ("k-means++", "random_from_data"):
        for seed in range(5):
            model = quiet(torch_em.GaussianMixture(3, init_params=init_params, seed=seed, max_iter=1, dtype=F64).fit,
                          data, sample_weight=weights)
            assert float(model.means.abs().max()) < 100, (init_params, seed)
