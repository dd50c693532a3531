"""The contract of latent structures and of the engine's drivers.

Every latent structure (:mod:`torch_em.latent`) must give statistics that add over chunks and
batches, treat weights as repeats, make the EM map never decrease the objective, and let every
driver (full-batch, chunked, streamed, online, compacted) give the same fit where they should.
``LATENT`` lists the structures; a new one is added here.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import torch_em
from torch_em import em
from torch_em.data import SequenceData
from torch_em.latent import MIXTURE, MarkovChain
from torch_em.statistics import Statistics

from conftest import blobs

F64 = torch.float64
LATENT = [pytest.param(MIXTURE, id="independent-categorical"), pytest.param(MarkovChain(), id="markov-chain")]
#: A Markov chain's data are sequences of this many consecutive rows.
STEPS = 10
FAMILIES = [pytest.param(torch_em.Gaussian("full", 1e-6), id="gaussian-full"),
            pytest.param(torch_em.Gaussian("diag", 1e-6), id="gaussian-diag")]


def problem(family, n_models: int = 1, seed: int = 0, latent=MIXTURE):
    """Per-model data X (M, N, 3) (or (N, 3) for one model) and starting parameters (1, M, ...)."""
    X = torch.stack([torch.as_tensor(blobs(30, seed=seed + m)) for m in range(n_models)])
    generator = torch.Generator().manual_seed(seed)
    theta = family.default_parameters((1, n_models), 3, 3, generator, X.device, F64)
    theta["loc"] = X[:, [0, 40, 80]].unsqueeze(0).clone()  # one start per cluster
    if latent is MIXTURE:
        latent_params = {"log_weights": torch.full((1, n_models, 3), -math.log(3), dtype=F64)}
    else:  # whole sequences; a chain that prefers to stay: its posteriors are not those of a mixture
        X = X[..., : X.shape[-2] // STEPS * STEPS, :]
        latent_params = latent.default_parameters((1, n_models), 3, X)
        latent_params["log_transmat"] = torch.tensor([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.3, 0.6]],
                                                     dtype=F64).log().expand(1, n_models, 3, 3)
    return (X[0] if n_models == 1 else X), em.Params(latent_params, theta)


def data_of(family, X, chunk_size=1000, weights=None, latent=MIXTURE, reference=None):
    """X's rows as the structure's data: rows, or sequences of STEPS rows for a Markov chain."""
    reference = family.reference(X) if reference is None else reference
    if latent is MIXTURE:
        return em.Data(family, X, reference, chunk_size, weights=weights)
    lengths = torch.full((X.shape[-2] // STEPS,), STEPS)
    return SequenceData(family, X, lengths, STEPS, reference, chunk_size, weights=weights)


def batch_of(latent, part):
    """A stream's batch of ``part``: (rows, weights) or (rows, weights, lengths)."""
    return (part, None) if latent is MIXTURE else (part, None, torch.full((part.shape[-2] // STEPS,), STEPS))


def assert_same_statistics(a: Statistics, b: Statistics, **tolerance) -> None:
    tolerance = tolerance or dict(rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(a.counts, b.counts, **tolerance)
    torch.testing.assert_close(a.sums, b.sums, **tolerance)
    torch.testing.assert_close(a.log_likelihood, b.log_likelihood, **tolerance)
    assert a.latent.keys() == b.latent.keys()
    for name in a.latent:
        torch.testing.assert_close(a.latent[name], b.latent[name], **tolerance)


@pytest.mark.parametrize("latent", LATENT)
@pytest.mark.parametrize("family", FAMILIES)
def test_statistics_add_over_chunks_and_batches(latent, family):
    X, params = problem(family, latent=latent)
    reference = family.reference(X)
    whole = em.e_step(latent, family, params, data_of(family, X, 1000, latent=latent))
    chunked = em.e_step(latent, family, params, data_of(family, X, 13, latent=latent))
    halves = [em.e_step(latent, family, params, data_of(family, part, 1000, latent=latent, reference=reference))
              for part in X.split(50)]
    piece = 31 if latent is MIXTURE else 3 * STEPS
    stream = em.StreamData(family, lambda: iter([batch_of(latent, part) for part in X.split(piece)]), reference, len(X),
                           1000, em.Data(family, X, reference, 1000))
    streamed = em.e_step(latent, family, params, stream)
    assert_same_statistics(chunked, whole)
    assert_same_statistics(sum(halves[1:], halves[0]), whole)
    assert_same_statistics(streamed, whole)
    assert set(whole.latent) == set(latent.statistic_names)


@pytest.mark.parametrize("latent", LATENT)
@pytest.mark.parametrize("family", FAMILIES)
def test_the_log_likelihood_alone_is_the_e_steps(latent, family):
    # em.log_likelihood forms no posteriors or statistics (the mixture skips the normalising
    # pass): the same number as the E-step's, bit for bit, chunked, weighted and streamed.
    X, params = problem(family, n_models=2, latent=latent)
    unit = 1 if latent is MIXTURE else STEPS
    weights = torch.as_tensor(np.random.default_rng(1).random(X.shape[-2] // unit), dtype=F64).repeat_interleave(unit)
    reference = family.reference(X)
    for data in (data_of(family, X, 1000, latent=latent), data_of(family, X, 13 * unit, weights, latent, reference)):
        alone = em.log_likelihood(latent, family, params, data)
        assert alone.shape == (1, 2) and torch.equal(alone, em.e_step(latent, family, params, data).log_likelihood)


@pytest.mark.parametrize("latent", LATENT)
@pytest.mark.parametrize("family", FAMILIES)
def test_weights_equal_repeated_points(latent, family):
    X, params = problem(family, latent=latent)
    unit = 1 if latent is MIXTURE else STEPS  # a sequence's steps share its weight
    weights = torch.as_tensor(np.random.default_rng(0).integers(0, 4, len(X) // unit), dtype=F64)
    reference = family.reference(X)
    weighted = em.e_step(latent, family, params, data_of(family, X, 37, weights.repeat_interleave(unit), latent,
                                                         reference))
    units = X.view(-1, unit, X.shape[-1]).repeat_interleave(weights.long(), 0).flatten(0, 1)
    repeated = em.e_step(latent, family, params, data_of(family, units, 37, latent=latent, reference=reference))
    assert_same_statistics(weighted, repeated)


@pytest.mark.parametrize("latent", LATENT)
@pytest.mark.parametrize("family", FAMILIES)
def test_the_em_map_never_decreases_the_objective(latent, family):
    X, params = problem(family, n_models=3, latent=latent)
    em_map = em.EMMap(latent, family, data_of(family, X, latent=latent))
    active = torch.ones(1, 3, dtype=torch.bool)
    objectives = []
    for _ in range(25):
        step = em_map(params, active)
        assert not bool(step.invalid.any())
        objectives.append(step.objective)
        params = step.params
    history = torch.stack(objectives, -1)  # (1, 3, 25)
    steps = history[..., 1:] - history[..., :-1]
    assert bool((steps >= -1e-12 * history[..., 1:].abs()).all()), float(steps.min())
    assert float(steps.sum()) > 0.01  # it did move


def test_lerp_is_the_stepwise_update_and_scaling_is_per_model():
    g = torch.Generator().manual_seed(0)

    def random_statistics():
        return Statistics(torch.rand(1, 2, 3, generator=g, dtype=F64), torch.rand(1, 2, 3, 4, generator=g, dtype=F64),
                          torch.rand(1, 2, generator=g, dtype=F64), {"transitions": torch.rand(1, 2, 3, 3, generator=g,
                                                                                               dtype=F64)})

    running, new, rho = random_statistics(), random_statistics(), 0.3
    mixed = running.lerp(new, rho)
    torch.testing.assert_close(mixed.counts, 0.7 * running.counts + 0.3 * new.counts, rtol=1e-15, atol=0)
    torch.testing.assert_close(mixed.sums, 0.7 * running.sums + 0.3 * new.sums, rtol=1e-15, atol=0)
    torch.testing.assert_close(mixed.latent["transitions"], 0.7 * running.latent["transitions"]
                               + 0.3 * new.latent["transitions"], rtol=1e-15, atol=0)
    assert torch.equal(mixed.log_likelihood, new.log_likelihood)
    per_model = torch.tensor([2.0, 5.0], dtype=F64)
    scaled = running.scaled(per_model)
    torch.testing.assert_close(scaled.sums[0, 1], 5.0 * running.sums[0, 1], rtol=1e-15, atol=0)
    torch.testing.assert_close(scaled.latent["transitions"][0, 0], 2.0 * running.latent["transitions"][0, 0],
                               rtol=1e-15, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_online_step_is_the_m_step_of_the_interpolated_statistics(family):
    X, params = problem(family)
    em_map = em.EMMap(MIXTURE, family, data_of(family, X[:60]))
    first = em.online_step(em_map, params, None, 1.0, torch.ones(1, 1, dtype=torch.bool))
    second_map = em.EMMap(MIXTURE, family, em.Data(family, X[60:], family.reference(X[:60]), 1000))  # the stream's reference
    second = em.online_step(second_map, first.params, first.running, 0.25, torch.ones(1, 1, dtype=torch.bool))
    batch = em.e_step(MIXTURE, family, first.params, second_map.data).scaled(1 / (len(X) - 60))
    expected = first.running.lerp(batch, 0.25)
    torch.testing.assert_close(second.running.counts, expected.counts, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(second.running.sums, expected.sums, rtol=1e-12, atol=1e-14)
    m_step, _ = em.m_step(MIXTURE, family, expected.scaled(len(X) - 60), family.reference(X[:60]),
                          torch.ones(1, 1, dtype=torch.bool))
    for name, value in m_step.emission.items():
        torch.testing.assert_close(second.params.emission[name], value, rtol=1e-12, atol=1e-12)


def fitted(X, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch_em.ConvergenceWarning)
        return torch_em.GaussianMixture(3, dtype=F64, **options).fit(X)


def start_values(X: torch.Tensor) -> dict:
    return dict(weights_init=np.full(3, 1 / 3), means_init=X[[0, 40, 80]].numpy(),
                precisions_init=np.broadcast_to(np.eye(3), (3, 3, 3)).copy())


def test_full_chunked_and_streamed_fits_are_the_same():
    X = torch.as_tensor(blobs(40))
    options = dict(**start_values(X), tol=1e-10, max_iter=200)
    full = fitted(X, **options)
    chunked = fitted(X, chunk_size=19, **options)
    streamed = fitted(lambda: iter(X.split(33)), **options)
    for other in (chunked, streamed):
        for name in ("weights", "means", "covariances", "lower_bound_"):
            torch.testing.assert_close(getattr(other, name), getattr(full, name), rtol=1e-10, atol=1e-10)
        assert int(other.n_iter_) == int(full.n_iter_)


def test_one_partial_fit_with_step_one_is_one_em_step():
    X = torch.as_tensor(blobs(40))
    options = dict(**start_values(X), n_features=3)
    online = torch_em.GaussianMixture(3, dtype=F64, **options).partial_fit(X)  # the first step has rho = 1
    one_step = fitted(X, **options, max_iter=1, warm_start=True)
    for name in ("weights", "means", "covariances"):
        torch.testing.assert_close(getattr(online, name), getattr(one_step, name), rtol=1e-10, atol=1e-12)


# --- compaction -----------------------------------------------------------------------------------
def mostly_easy_batch(n_models: int = 24, hard: tuple[int, ...] = (3, 17)) -> torch.Tensor:
    """Per-model data: well-separated clusters (EM converges in a few iterations), except the
    ``hard`` models, whose clusters overlap (EM takes many more)."""
    sets = []
    for m in range(n_models):
        spread = 1.0 if m in hard else 0.15
        sets.append(torch.as_tensor(blobs(30, seed=m)) * spread)
    return torch.stack(sets)


def compaction_sizes(monkeypatch) -> list[int]:
    """Record the number of models of every working batch the EM map computes."""
    sizes = []
    original = em.EMMap.__call__

    def recording(self, params, active):
        sizes.append(params.batch[0] * params.batch[1])
        return original(self, params, active)

    monkeypatch.setattr(em.EMMap, "__call__", recording)
    return sizes


#: Compacted working batches compute every model's arithmetic in the same order, but a vectorised
#: CPU kernel rounds an element in a SIMD lane and in the scalar loop of a tensor's tail
#: differently (1 ulp), and a model's position changes with the batch's size: parameters agree
#: to rounding (the iterations carry a last-bit difference on, 1e-13 seen), iteration counts and
#: convergence exactly.
ULPS = dict(rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("options", [{}, {"n_init": 3}, {"chunk_size": 23}, {"shared": True}],
                         ids=["plain", "restarts", "chunked", "shared-data"])
def test_compaction_gives_the_fit_without_it(options, monkeypatch):
    options = dict(options)
    shared = options.pop("shared", False)
    X = mostly_easy_batch()
    if shared:  # one dataset for every model, from starts that converge at different times
        X = X[3]
        rng = np.random.default_rng(0)
        options["means_init"] = X[torch.as_tensor(rng.integers(0, len(X), (24, 3)))].numpy()
    kwargs = dict(batch_shape=(24,), seed=1, tol=1e-6, max_iter=300, covariance_type="full", **options)
    batches = {24 * restarts for restarts in (1, kwargs.get("n_init", 1) - 1) if restarts}  # restart 0, then the others
    sizes = compaction_sizes(monkeypatch)
    compacted = fitted(X, **kwargs)
    assert min(sizes) < 24, "no compaction happened"
    monkeypatch.setattr(em, "COMPACTION_FRACTION", 0.0)
    sizes.clear()
    plain = fitted(X, **kwargs)
    assert set(sizes) == batches
    assert int(plain.n_iter_.max()) > 2 * int(plain.n_iter_.min())  # models converge at different times
    assert torch.equal(compacted.n_iter_, plain.n_iter_)
    assert torch.equal(compacted.converged_, plain.converged_)
    for name in ("logits", "loc", "raw_precision_cholesky", "lower_bound_", "lower_bound_history_"):
        torch.testing.assert_close(getattr(compacted, name), getattr(plain, name), **ULPS, msg=name)


def test_compaction_keeps_isolated_failures_and_streams(monkeypatch):
    """A model that fails, and streamed per-model data, through compacted working batches."""
    X = mostly_easy_batch()
    X[5, :] = X[5, :1]  # every point of model 5 equal: its covariance is singular (reg_covar=0)
    kwargs = dict(batch_shape=(24,), seed=1, tol=1e-6, max_iter=300, reg_covar=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch_em.FitFailedWarning)
        sizes = compaction_sizes(monkeypatch)
        compacted = fitted(lambda: iter(X.split(20, dim=1)), **kwargs)
        assert min(sizes) < max(sizes)
        monkeypatch.setattr(em, "COMPACTION_FRACTION", 0.0)
        plain = fitted(lambda: iter(X.split(20, dim=1)), **kwargs)
    assert compacted.failed_.tolist() == plain.failed_.tolist() and bool(plain.failed_[5])
    assert compacted.failure_reasons_ == plain.failure_reasons_
    assert torch.equal(compacted.n_iter_, plain.n_iter_)
    for name in ("logits", "loc", "raw_precision_cholesky"):
        torch.testing.assert_close(getattr(compacted, name), getattr(plain, name), **ULPS, msg=name)
    torch.testing.assert_close(compacted.lower_bound_, plain.lower_bound_, **ULPS, equal_nan=True)


# --- what the modules and the layer share -------------------------------------------------------
def layer_init(X: torch.Tensor) -> dict:
    return {"logits": torch.zeros(3, dtype=F64), "loc": X[[0, 40, 80]].clone(),
            "raw_precision_cholesky": torch.zeros(3, 3, dtype=F64)}


def test_prior_count_of_the_modules_is_the_layers():
    X = torch.as_tensor(blobs(40))
    init = layer_init(X)
    layer = torch_em.functional.em(X, init, 6, family=torch_em.Gaussian("diag"), prior_count=2.5)
    model = torch_em.GaussianMixture(3, n_features=3, covariance_type="diag", dtype=F64, prior_count=2.5,
                                     warm_start=True, max_iter=6, tol=0.0)
    model.load_state_dict(init)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch_em.ConvergenceWarning)
        model.fit(X)
    torch.testing.assert_close(model.logits.log_softmax(-1), layer.logits, rtol=1e-10, atol=1e-12)
    for name, value in layer.theta.items():
        torch.testing.assert_close(getattr(model, name), value, rtol=1e-10, atol=1e-12)
    plain = torch_em.functional.em(X, init, 6, family=torch_em.Gaussian("diag"))
    assert not torch.allclose(plain.theta["loc"], layer.theta["loc"], rtol=1e-6)  # the prior moved it


def test_prior_count_keeps_a_starved_component_alive_without_reseeding():
    X = torch.as_tensor(blobs(40))
    init = dict(weights_init=[0.5, 0.5 - 1e-12, 1e-12], means_init=X[[0, 40, 80]].numpy(),
                precisions_init=np.ones((3, 3)))
    model = fitted(X, covariance_type="diag", prior_count=5.0, tol=1e-8, max_iter=200, **init)
    assert bool(torch.isfinite(model.covariances).all())
    assert float(model.weights.min()) > 5.0 / (len(X) + 15.0) * 0.5  # at least about its pseudo-points' share


def test_em_parameters_of_the_layer_are_the_modules():
    """Means held fixed (e.g. trained by an optimizer): the layer's conditional M-step is the module's."""
    X = torch.as_tensor(blobs(40))
    init = layer_init(X)
    loc = init["loc"].clone().requires_grad_()
    layer = torch_em.functional.em(X, {**init, "loc": loc}, 5, family=torch_em.Gaussian("diag"),
                                   em_parameters=("logits", "raw_precision_cholesky"))
    assert torch.equal(layer.theta["loc"].detach(), init["loc"])  # held
    model = torch_em.GaussianMixture(3, n_features=3, covariance_type="diag", dtype=F64,
                                     em_parameters=("logits", "raw_precision_cholesky"), warm_start=True, max_iter=5,
                                     tol=0.0)
    model.load_state_dict(init)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch_em.ConvergenceWarning)
        model.fit(X)
    torch.testing.assert_close(model.raw_precision_cholesky, layer.theta["raw_precision_cholesky"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(model.logits.log_softmax(-1), layer.logits, rtol=1e-10, atol=1e-12)
    gradient, = torch.autograd.grad(layer.log_likelihood, loc)  # the held means still get a gradient
    assert bool(torch.isfinite(gradient).all()) and float(gradient.abs().max()) > 0
    with pytest.raises(ValueError, match=r"em_parameters must name parameters among \['logits', 'loc', "):
        torch_em.functional.em(X, init, 2, family=torch_em.Gaussian("diag"), em_parameters=("scale",))


def test_initialize_gives_the_initial_parameters_of_fit():
    X = torch.as_tensor(blobs(40))
    init = start_values(X)
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch_em.ConvergenceWarning)  # no warning for it
        model = torch_em.GaussianMixture(3, dtype=F64, **init).initialize(X)
    np.testing.assert_allclose(model.means.detach().numpy(), init["means_init"], rtol=0, atol=0)
    assert int(model.n_iter_) == 0 and not bool(model.converged_) and float(model.lower_bound_) == -math.inf
    assert model.lower_bound_history_.shape == (0,)
    seeded = torch_em.GaussianMixture(3, dtype=F64, seed=3).initialize(X)  # k-means++ seeding, the first M-step
    one_step = torch_em.GaussianMixture(3, dtype=F64, seed=3, max_iter=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch_em.ConvergenceWarning)
        one_step.fit(X)
    continued = torch_em.GaussianMixture(3, dtype=F64, max_iter=1, warm_start=True)
    continued.load_state_dict(seeded.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch_em.ConvergenceWarning)
        continued.fit(X)
    torch.testing.assert_close(continued.means, one_step.means, rtol=1e-12, atol=1e-12)  # fit = initialize + EM


@pytest.mark.parametrize("n_points", [em.BLOCKED_MIN_POINTS + 1234, 2 * em.STATISTICS_BLOCK * 16])
def test_statistics_of_many_points_in_blocks_are_the_plain_sums(n_points, monkeypatch):
    """The float64 statistics GEMM over a long sum runs in blocks of points (with a remainder):
    the sums are those of one product, for shared data, data of one model and either layout."""
    calls = []
    blocked = em._blocked_product
    monkeypatch.setattr(em, "_blocked_product", lambda A, B: calls.append(1) or blocked(A, B))
    g = torch.Generator().manual_seed(0)
    T = torch.randn(n_points, em.BLOCKED_MIN_FEATURES + 4, generator=g, dtype=torch.float64)
    resp = torch.rand(2, 1, 3, n_points, generator=g, dtype=torch.float64)
    expected = torch.einsum("rmkn,nf->rmkf", resp, T)
    for data in (T, T.unsqueeze(0), T.T.contiguous().T):
        for r in (resp, resp.transpose(-1, -2).contiguous().transpose(-1, -2)):
            torch.testing.assert_close(em.weighted_statistics(data, r), expected, rtol=1e-12, atol=1e-9)
    assert len(calls) == 6
