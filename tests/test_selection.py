"""Model selection as one batched fit (torch_em.select) and masked components in the engine."""
import math
import warnings

import numpy as np
import pytest
import torch

import torch_em
from torch_em.lloyd import lloyd, nearest, nested_nearest


def blobs(n=600, seed=0, d=2):
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]], dtype=torch.float64)[:, :d]
    return centres[torch.arange(n) % 3] + 0.7 * torch.randn(n, d, generator=g, dtype=torch.float64)


def start(k, X, seed=0):
    """Initial parameters of a k-component fit (two EM steps from k-means++)."""
    model = torch_em.GaussianMixture(k, seed=seed, max_iter=2, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch_em.ConvergenceWarning)
        model.fit(X)
    return model.weights.detach(), model.means.detach(), model.precisions.detach()


@pytest.mark.parametrize("kind", ["full", "tied", "diag", "spherical"])
def test_masked_batch_equals_separate_fits_from_the_same_start(kind):
    X = blobs()
    grid, K = [1, 2, 3, 5], 5
    weights, means, precisions = [], [], []
    singles = []
    for k in grid:
        w, mu, full_precision = start(k, X)
        precision = {"full": full_precision, "tied": full_precision.mean(0), "diag": full_precision.diagonal(dim1=-2, dim2=-1),
                     "spherical": full_precision.diagonal(dim1=-2, dim2=-1).mean(-1)}[kind]
        singles.append(torch_em.GaussianMixture(k, covariance_type=kind, weights_init=w, means_init=mu,
                                                precisions_init=precision, dtype=torch.float64).fit(X))
        pad = K - k
        weights.append(torch.cat([w, torch.zeros(pad, dtype=w.dtype)]))
        means.append(torch.cat([mu, mu[:1].expand(pad, -1)]))
        precisions.append(precision if kind == "tied" else torch.cat([precision, precision[:1].expand(pad, *precision.shape[1:])]))
    batched = torch_em.GaussianMixture(K, covariance_type=kind, batch_shape=(len(grid),), weights_init=torch.stack(weights),
                                       means_init=torch.stack(means), precisions_init=torch.stack(precisions),
                                       dtype=torch.float64)
    batched._components = torch.arange(K) < torch.tensor(grid)[:, None]
    batched.fit(X)
    for i, (k, single) in enumerate(zip(grid, singles)):
        assert int(batched.n_iter_[i]) == int(single.n_iter_)
        torch.testing.assert_close(batched.weights[i, :k], single.weights, rtol=1e-9, atol=1e-12)
        assert bool((batched.weights[i, k:] == 0).all())  # masked components stay empty
        torch.testing.assert_close(batched.means[i, :k], single.means, rtol=1e-9, atol=1e-10)
        covariances = batched.covariances[i] if kind == "tied" else batched.covariances[i, :k]
        torch.testing.assert_close(covariances, single.covariances, rtol=1e-9, atol=1e-10)
        assert float(batched.lower_bound_[i]) == pytest.approx(float(single.lower_bound_), rel=1e-10)


def test_lloyd_leaves_masked_centres_alone():
    X = blobs().float()
    g = torch.Generator().manual_seed(1)
    centres = X[torch.randint(0, len(X), (1, 2, 4), generator=g)]  # (R, M, K, D)
    components = torch.tensor([[[True, True, False, False], [True, True, True, True]]])
    result = lloyd(X, centres, max_iter=20, tol=0.0, chunk_size=256, components=components)
    assert bool((result.labels[0, 0] < 2).all())
    torch.testing.assert_close(result.centres[0, 0, 2:], centres[0, 0, 2:])
    alone = lloyd(X, centres[:, :1, :2], max_iter=20, tol=0.0, chunk_size=256)
    torch.testing.assert_close(result.centres[0, 0, :2], alone.centres[0, 0])


@pytest.mark.parametrize("n_centres", [6, 40])  # points last in memory, and centres last
def test_nearest_among_nested_centres_is_nearest_among_the_first_k(n_centres):
    X = blobs(n=700, seed=5)
    g = torch.Generator().manual_seed(2)
    centres = X[torch.randint(0, len(X), (2, 3, n_centres), generator=g)]  # (R, S, K, D)
    centres[:, :, -1] = centres[:, :, 0]  # a tie: the first of equal centres wins
    sizes = [1, n_centres, 3, n_centres - 1, 3]
    labels, dists = nested_nearest(X, centres, sizes, chunk_size=256)  # (R, M, S, N)
    for m, k in enumerate(sizes):
        expected_labels, expected_dists = nearest(X, centres[:, :, :k], 10**6)
        assert torch.equal(labels[:, m], expected_labels)
        torch.testing.assert_close(dists[:, m], expected_dists, rtol=1e-12, atol=1e-12)


def test_select_fits_the_grid_and_chooses_the_lowest_bic():
    X = blobs(seed=2)
    result = torch_em.select(X, n_components=range(1, 6), covariance_type=("full", "diag"), seed=0)
    table = result.table.as_dict()
    assert table["n_components"] == [1, 2, 3, 4, 5] * 2 and table["covariance_type"] == ["full"] * 5 + ["diag"] * 5
    best = int(np.nanargmin(table["bic"]))
    assert (result.best_.covariance_type, result.best_.n_components) == (table["covariance_type"][best],
                                                                            table["n_components"][best])
    assert result.best_.n_components == 3  # three clusters
    # each row's numbers are those of an ordinary k-component mixture
    model = result.best_
    assert isinstance(model, torch_em.GaussianMixture) and model.weights.shape == (3,)
    assert float(model.bic(X)) == pytest.approx(table["bic"][best], rel=1e-9)
    assert float(model.aic(X)) == pytest.approx(table["aic"][best], rel=1e-9)
    resp = model.predict_proba(X).double()
    entropy = -torch.special.xlogy(resp, resp).sum()
    assert table["icl"][best] == pytest.approx(table["bic"][best] + 2 * float(entropy), rel=1e-9)
    assert "BIC" in str(result.table) and len(str(result.table).splitlines()) == 11
    # every model of the grid is at an EM fixed point: one more step from it moves nothing
    again = torch_em.GaussianMixture(3, covariance_type=model.covariance_type, weights_init=model.weights.detach(),
                                     means_init=model.means.detach(), precisions_init=model.precisions.detach(),
                                     dtype=torch.float64, max_iter=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch_em.ConvergenceWarning)
        again.fit(X)
    torch.testing.assert_close(again.means, model.means, rtol=1e-3, atol=1e-3)


def test_select_isolates_models_that_fail_and_restarts_per_entry():
    X = blobs(n=12, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = torch_em.select(X, n_components=[1, 2, 12], covariance_type="full", reg_covar=0.0, n_init=2, seed=0)
    table = result.table.as_dict()
    assert math.isnan(table["bic"][2]) and not math.isnan(table["bic"][0])
    assert result.best_.n_components in (1, 2)


def test_select_rejects_bad_arguments():
    X = blobs(n=60)
    for kwargs, message in [(dict(criterion="aicc"), "criterion"), (dict(covariance_type="triangular"), "covariance_type"),
                            (dict(n_components=[]), "at least one"), (dict(n_components=[0, 2]), "n_components"),
                            (dict(batch_shape=(2,)), "select chooses batch_shape")]:
        with pytest.raises(ValueError, match=message):
            torch_em.select(X, **kwargs)


def test_select_plot_draws_one_line_per_covariance_type():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    result = torch_em.select(blobs(n=120), n_components=range(1, 4), covariance_type=("full", "spherical"), seed=0)
    ax = result.plot()
    assert len(ax.get_lines()) == 3  # two curves and the chosen K


def test_covariance_types_share_one_clustering_without_changing_a_fit():
    """select clusters once for all covariance types (each restart group's clustering kept by
    the first type): every type's rows are those of its grid fitted with a clustering of its own."""
    from torch_em.initialization import SharedClustering
    from torch_em.selection import _fit_grid

    X = blobs(seed=4)
    kinds, grid = ("full", "diag", "spherical"), [1, 2, 3, 4]
    clustering = SharedClustering()
    shared = [_fit_grid(X, grid, kind, 2, 3, {}, clustering) for kind in kinds]
    assert set(clustering.clusterings) == {range(1), range(1, 2)}  # restart 0, then the others
    table = torch_em.select(X, n_components=grid, covariance_type=kinds, n_init=2, seed=3).table.as_dict()
    assert table["log_likelihood"] == [row["log_likelihood"] for rows in shared for row in rows]
    for kind, rows in zip(kinds, shared):
        alone = _fit_grid(X, grid, kind, 2, 3, {}, SharedClustering())
        assert [row["n_iter"] for row in rows] == [row["n_iter"] for row in alone]
        for row, single in zip(rows, alone):
            assert row["log_likelihood"] == pytest.approx(single["log_likelihood"], rel=1e-12)
    # random responsibilities are drawn per fit, not shared
    random = {"init_params": "random"}
    clustering = SharedClustering()
    first, second = (_fit_grid(X, grid, kind, 1, 3, random, clustering) for kind in ("full", "diag"))
    assert not clustering.clusterings
    alone = _fit_grid(X, grid, "diag", 1, 3, random, SharedClustering())
    assert [row["log_likelihood"] for row in second] == [row["log_likelihood"] for row in alone]
