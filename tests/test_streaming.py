"""Exact EM over batch sources and stepwise online EM (partial_fit)."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import torch_em
from conftest import COVARIANCE_TYPES, blobs

F64 = torch.float64


def identical_start(X: torch.Tensor, covariance_type: str = "full") -> dict:
    precisions = {"full": np.broadcast_to(np.eye(3), (3, 3, 3)).copy(), "tied": np.eye(3),
                  "diag": np.ones((3, 3)), "spherical": np.ones(3)}[covariance_type]
    return dict(weights_init=np.full(3, 1 / 3), means_init=X[[0, 300, 600]].numpy(), precisions_init=precisions)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_fit_over_a_dataloader_equals_the_full_tensor_fit(covariance_type):
    X = torch.as_tensor(blobs(300))
    options = dict(covariance_type=covariance_type, dtype=F64, tol=1e-9, max_iter=200, **identical_start(X, covariance_type))
    full = torch_em.GaussianMixture(3, **options).fit(X)
    loader = DataLoader(TensorDataset(X), batch_size=97)  # yields (x,) tuples
    streamed = torch_em.GaussianMixture(3, **options).fit(loader)
    called = torch_em.GaussianMixture(3, **options).fit(lambda: iter(X.split(250)))
    for model in (streamed, called):
        assert int(model.n_iter_) == int(full.n_iter_)
        for name in ("weights", "means", "covariances"):
            torch.testing.assert_close(getattr(model, name), getattr(full, name), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(model.lower_bound_history_, full.lower_bound_history_, rtol=1e-10, atol=1e-12)


def test_per_model_batches_and_default_initialisation_from_the_sample():
    data = torch.stack([torch.as_tensor(blobs(100, seed=s)) for s in range(3)])  # (3, N, 3)
    streamed = torch_em.GaussianMixture(3, batch_shape=(3,), seed=0, dtype=F64).fit(lambda: iter(data.split(64, dim=1)))
    full = torch_em.GaussianMixture(3, batch_shape=(3,), seed=0, dtype=F64).fit(data)
    # Initialised from a sample instead of all points, both reach the same optimum here.
    torch.testing.assert_close(streamed.lower_bound_, full.lower_bound_, rtol=1e-6, atol=1e-6)


def test_chunked_equals_unchunked():
    X = torch.as_tensor(blobs(300))
    options = dict(dtype=F64, tol=1e-9, **identical_start(X))
    whole = torch_em.GaussianMixture(3, **options).fit(X)
    chunked = torch_em.GaussianMixture(3, chunk_size=37, **options).fit(X)
    for name in ("weights", "means", "covariances"):
        torch.testing.assert_close(getattr(chunked, name), getattr(whole, name), rtol=1e-10, atol=1e-12)


def test_bad_streams_are_rejected_before_anything_changes():
    X = torch.as_tensor(blobs(100))
    model = torch_em.GaussianMixture(3, seed=0, dtype=F64).fit(X)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="one-shot iterator"):
        model.fit(b for b in X.split(50))
    bad = X.clone()
    bad[120, 1] = float("nan")
    with pytest.raises(ValueError, match="X batch must be finite"):
        model.fit(lambda: iter(bad.split(50)))
    with pytest.raises(ValueError, match="D=3"):
        model.fit(lambda: iter([X[:50], X[50:100, :2]]))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def stationary_stream(n_batches: int, batch_size: int, seed: int) -> torch.Tensor:
    X = torch.as_tensor(blobs(n_batches * batch_size // 3 + 50, seed=seed))
    X = X[torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))]
    return X[: n_batches * batch_size]


def test_partial_fit_reaches_full_batch_quality_on_held_out_data():
    X = stationary_stream(80, 250, seed=0)
    held_out = torch.as_tensor(blobs(500, seed=9))
    full = torch_em.GaussianMixture(3, seed=0, dtype=F64).fit(X)
    online = torch_em.GaussianMixture(3, seed=0, dtype=F64)
    for batch in X.split(250):
        online.partial_fit(batch)
    assert int(online.stream_steps) == 80
    gap = abs(float(online.score(held_out)) - float(full.score(held_out))) / abs(float(full.score(held_out)))
    assert gap < 0.005, gap


def test_first_partial_fit_takes_the_batch_statistics_and_steps_follow_the_schedule():
    X = stationary_stream(3, 200, seed=1)
    model = torch_em.GaussianMixture(3, seed=0, dtype=F64, learning_decay=0.6, learning_offset=2.0)
    model.partial_fit(X[:200])
    first_counts = model.stream_counts.clone()
    torch.testing.assert_close(first_counts.sum(), torch.tensor(1.0, dtype=F64))  # per-point averages
    model.partial_fit(X[200:400])
    rho = (1 + 2.0) ** -0.6
    # Counts move from the first batch's by rho towards the second batch's (both sum to one).
    moved = model.stream_counts - (1 - rho) * first_counts
    assert float(moved.min()) >= 0 and float(moved.sum()) == pytest.approx(rho, rel=1e-12)


def test_resume_from_state_dict_continues_identically(tmp_path):
    X = stationary_stream(20, 100, seed=2)
    batches = X.split(100)
    reference = torch_em.GaussianMixture(3, covariance_type="diag", seed=0, dtype=F64)
    for batch in batches[:8]:
        reference.partial_fit(batch)
    torch.save(reference.state_dict(), tmp_path / "mid.pt")
    resumed = torch_em.GaussianMixture(3, covariance_type="diag", dtype=F64)  # fresh, no n_features
    resumed.load_state_dict(torch.load(tmp_path / "mid.pt", weights_only=True))
    for batch in batches[8:]:
        reference.partial_fit(batch)
        resumed.partial_fit(batch)
    for key, value in reference.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


def test_rejected_batch_leaves_the_stream_untouched():
    X = stationary_stream(4, 100, seed=3)
    model = torch_em.GaussianMixture(3, seed=0, dtype=F64)
    model.partial_fit(X[:100])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = X[100:200].clone()
    bad[3, 0] = float("inf")
    for batch, message in ((bad, "finite"), (X[100:200, :2], "D=3"), (X[100:200, 0], "shape")):
        with pytest.raises(ValueError, match=message):
            model.partial_fit(batch)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    with pytest.raises(ValueError, match="at least 3 sample"):
        torch_em.GaussianMixture(3).partial_fit(X[:2])  # the first batch initialises: needs K points


def test_constant_step_size_tracks_a_drifting_stream():
    generator = torch.Generator().manual_seed(4)
    def batch(t: int) -> torch.Tensor:  # two clusters whose centres drift steadily
        drift = 0.05 * t
        labels = torch.randint(2, (200,), generator=generator)
        centres = torch.tensor([[drift, 0.0], [drift, 6.0]], dtype=F64)
        return centres[labels] + 0.5 * torch.randn(200, 2, generator=generator, dtype=F64)
    constant = torch_em.GaussianMixture(2, seed=0, dtype=F64, step_size=0.3)
    decaying = torch_em.GaussianMixture(2, seed=0, dtype=F64)
    for t in range(150):
        b = batch(t)
        constant.partial_fit(b)
        decaying.partial_fit(b)
    truth = 0.05 * 149
    error = lambda m: float((m.means[:, 0].detach() - truth).abs().max())  # noqa: E731
    assert error(constant) < 0.3 < error(decaying)


@pytest.mark.parametrize("kwargs, name", [({"learning_decay": 0.3}, "learning_decay"), ({"learning_offset": -1.0}, "learning_offset"),
                                          ({"step_size": 1.5}, "step_size"), ({"step_size": 0.0}, "step_size")])
def test_bad_step_size_settings(kwargs, name):
    with pytest.raises(ValueError, match=name):
        torch_em.GaussianMixture(3, **kwargs)


@pytest.mark.parametrize("family", [torch_em.Poisson(), torch_em.Bernoulli()], ids=["poisson", "bernoulli"])
def test_partial_fit_serves_other_families(family):
    g = torch.Generator().manual_seed(5)
    rates = torch.tensor([[1.0, 9.0], [9.0, 1.0]], dtype=F64)
    make = (lambda n: torch.poisson(rates[torch.randint(2, (n,), generator=g)], generator=g)) if isinstance(family, torch_em.Poisson) \
        else (lambda n: torch.bernoulli(torch.sigmoid(3 * (rates[torch.randint(2, (n,), generator=g)] - 5)), generator=g))
    model = torch_em.Mixture(family, 2, seed=0, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warnings expected
        for _ in range(30):
            model.partial_fit(make(200))
    assert bool(torch.isfinite(model.score(make(200))).all())


def kmeans_stream(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    centres = 5 * torch.randn(8, 5, generator=generator, dtype=F64)
    return lambda n: centres[torch.randint(8, (n,), generator=generator)] + torch.randn(n, 5, generator=generator, dtype=F64)


def test_minibatch_kmeans_reaches_the_full_batch_inertia():
    batch = kmeans_stream()
    online = torch_em.KMeans(8, seed=0, dtype=F64)
    for _ in range(100):
        online.partial_fit(batch(1000))
    held_out = batch(20_000)
    full = torch_em.KMeans(8, seed=0, n_init=3, dtype=F64).fit(held_out)
    assert int(online.stream_steps) == 100
    assert float(-online.score(held_out)) <= 1.01 * float(full.inertia_)


def test_minibatch_kmeans_resumes_and_rejects_bad_batches(tmp_path):
    batch = kmeans_stream(1)
    batches = [batch(300) for _ in range(12)]
    reference = torch_em.KMeans(8, seed=0, dtype=F64, step_size=0.2)
    for b in batches[:5]:
        reference.partial_fit(b)
    torch.save(reference.state_dict(), tmp_path / "km.pt")
    resumed = torch_em.KMeans(8, dtype=F64, step_size=0.2)
    resumed.load_state_dict(torch.load(tmp_path / "km.pt", weights_only=True))
    before = {k: v.clone() for k, v in resumed.state_dict().items()}
    bad = batches[5].clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        resumed.partial_fit(bad)
    with pytest.raises(ValueError, match="D=5"):
        resumed.partial_fit(batches[5][:, :3])
    for key, value in resumed.state_dict().items():
        assert torch.equal(value, before[key]), key
    for b in batches[5:]:
        reference.partial_fit(b)
        resumed.partial_fit(b)
    for key, value in reference.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


def test_polyak_averaging_smooths_noisy_iterates_and_resumes_exactly(tmp_path):
    X = stationary_stream(120, 100, seed=6)
    held_out = torch.as_tensor(blobs(1000, seed=7))
    last, averaged = (torch_em.GaussianMixture(3, seed=0, dtype=F64, step_size=0.3, averaging_start=start)
                      for start in (None, 20))
    for batch in X.split(100):
        last.partial_fit(batch)
        averaged.partial_fit(batch)
    full = torch_em.GaussianMixture(3, seed=0, dtype=F64).fit(X)
    gap = lambda m: abs(float(m.score(held_out)) - float(full.score(held_out)))  # noqa: E731
    assert gap(averaged) < 0.5 * gap(last)
    # The average lives in the parameters, the iterate in the running statistics: both resume.
    first = torch_em.GaussianMixture(3, seed=0, dtype=F64, step_size=0.3, averaging_start=5)
    for batch in X.split(100)[:10]:
        first.partial_fit(batch)
    resumed = torch_em.GaussianMixture(3, dtype=F64, step_size=0.3, averaging_start=5)
    resumed.load_state_dict(first.state_dict())
    for batch in X.split(100)[10:20]:
        first.partial_fit(batch)
        resumed.partial_fit(batch)
    for key, value in first.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    with pytest.raises(ValueError, match="averaging_start"):
        torch_em.GaussianMixture(3, averaging_start=-1)


def test_per_batch_data_is_freed_by_reference_counting():
    """A pass over a stream builds one em.Data per batch; a reference cycle would keep each
    batch's tensors alive until the cyclic collector ran (memory growing with the stream)."""
    import gc
    import weakref

    from torch_em import em

    family = torch_em.Gaussian("diag")
    X = torch.randn(100, 2)
    data = em.Data(family, X, family.reference(X), chunk_size=50, cache=False)
    assert data.sample is data
    ref = weakref.ref(data)
    gc.disable()
    try:
        del data
        assert ref() is None
    finally:
        gc.enable()
