"""One contract every component family must satisfy, checked table-driven through the engine:
additive statistics, an M-step that maximises the weighted complete-data log-likelihood, a
lower bound that never decreases, and a batched fit that equals the looped fits."""
from __future__ import annotations

import importlib
import itertools
import warnings
from typing import Callable

import pytest
import torch

import torch_em
from torch_em import em

from conftest import mixture_em, mixture_statistics
from torch_em.families import ComponentFamily, Gaussian

Sampler = Callable[[torch.Generator, int, int], torch.Tensor]  # (generator, n_models, n) -> (B, n, D)


def _gaussian(g, b, n):
    centres = torch.tensor([[0.0, 0.0, 0.0], [4.0, 4.0, 0.0], [0.0, 5.0, 3.0]], dtype=torch.float64)
    labels = torch.randint(3, (b, n), generator=g)
    return centres[labels] + torch.randn(b, n, 3, generator=g, dtype=torch.float64)


def _binary(g, b, n):
    probs = torch.tensor([[0.9, 0.8, 0.1, 0.2, 0.5], [0.1, 0.2, 0.9, 0.7, 0.5], [0.5, 0.9, 0.9, 0.1, 0.1]], dtype=torch.float64)
    labels = torch.randint(3, (b, n), generator=g)
    return torch.bernoulli(probs[labels], generator=g)


def _codes(g, b, n):
    probs = torch.softmax(3 * torch.randn(3, 4, 3, generator=g, dtype=torch.float64), -1)  # (K, D, C)
    labels = torch.randint(3, (b, n), generator=g)
    return torch.multinomial(probs[labels].reshape(-1, 3), 1, generator=g).reshape(b, n, 4).double()


def _counts(g, b, n):
    rates = torch.tensor([[1.0, 8.0, 3.0], [9.0, 1.0, 4.0], [4.0, 4.0, 15.0]], dtype=torch.float64)
    labels = torch.randint(3, (b, n), generator=g)
    return torch.poisson(rates[labels], generator=g)


def _positive(g, b, n):
    scales = torch.tensor([[0.5, 4.0], [3.0, 0.3], [8.0, 8.0]], dtype=torch.float64)
    labels = torch.randint(3, (b, n), generator=g)
    shape = torch.tensor(2.0, dtype=torch.float64)
    gamma = torch.distributions.Gamma(shape, shape / scales[labels]).sample()  # mean = scale
    return gamma.clamp_min(1e-6)


def _unit(g, b, n):
    centres = torch.nn.functional.normalize(torch.randn(3, 4, generator=g, dtype=torch.float64), dim=-1)
    labels = torch.randint(3, (b, n), generator=g)
    return torch.nn.functional.normalize(centres[labels] * 6 + torch.randn(b, n, 4, generator=g, dtype=torch.float64), dim=-1)


def _mixed(g, b, n):
    """Two Gaussian columns and one count column, from the same three clusters."""
    labels = torch.randint(3, (b, n), generator=g)
    centres = torch.tensor([[0.0, 0.0], [4.0, 4.0], [0.0, 5.0]], dtype=torch.float64)
    rates = torch.tensor([1.0, 9.0, 4.0], dtype=torch.float64)
    gaussian = centres[labels] + torch.randn(b, n, 2, generator=g, dtype=torch.float64)
    return torch.cat([gaussian, torch.poisson(rates[labels], generator=g).unsqueeze(-1)], -1)


def _optional(module: str, name: str, *args):
    try:
        return getattr(importlib.import_module(f"torch_em.families.{module}"), name)(*args)
    except (ImportError, AttributeError):
        return None


CASES: list[tuple[str, Callable[[], ComponentFamily | None], Sampler]] = [
    *[(f"gaussian-{c}", (lambda c=c: Gaussian(c, reg_covar=0.0)), _gaussian) for c in ("full", "tied", "diag", "spherical")],
    ("bernoulli", lambda: _optional("bernoulli", "Bernoulli"), _binary),
    ("categorical", lambda: _optional("categorical", "Categorical", 3), _codes),
    ("poisson", lambda: _optional("poisson", "Poisson"), _counts),
    ("exponential", lambda: _optional("exponential", "Exponential"), _positive),
    ("gamma", lambda: _optional("gamma", "Gamma"), _positive),
    ("von-mises-fisher", lambda: _optional("von_mises_fisher", "VonMisesFisher"), _unit),
    ("product", lambda: torch_em.Product([(Gaussian("full", reg_covar=0.0), [0, 1]), (torch_em.Poisson(), [2])]), _mixed),
]


@pytest.fixture(params=CASES, ids=[case[0] for case in CASES])
def case(request):
    name, make, sampler = request.param
    family = make()
    if family is None:
        pytest.skip(f"{name} family not available")
    return name, family, sampler


def _working_theta(family: ComponentFamily, n_models: int, K: int, D: int, seed: int = 0):
    """Valid random parameters (1, n_models, ...) for the working batch."""
    g = torch.Generator().manual_seed(seed)
    theta = family.default_parameters((1, n_models), K, D, g, torch.device("cpu"), torch.float64)
    log_weights = torch.log_softmax(torch.randn(1, n_models, K, generator=g, dtype=torch.float64), -1)
    return log_weights, theta


def _data(family, X):
    shift = family.reference(X)
    return em.Data(family, X, shift, chunk_size=37)


def test_statistics_are_additive(case):
    _, family, sampler = case
    X = sampler(torch.Generator().manual_seed(1), 1, 200)[0]
    log_weights, theta = _working_theta(family, 1, 3, X.shape[-1])
    shift = family.reference(X)
    def statistics(points, chunk_size):
        return mixture_statistics(family, em.Data(family, points, shift, chunk_size=chunk_size), log_weights, theta)

    whole = statistics(X, 200)
    a = statistics(X[:77], 200)
    b = statistics(X[77:], 200)
    chunked = statistics(X, 13)
    for combined in (em.Statistics(a.counts + b.counts, a.sums + b.sums, a.log_likelihood + b.log_likelihood), chunked):
        torch.testing.assert_close(combined.counts, whole.counts, rtol=1e-12, atol=1e-10)
        torch.testing.assert_close(combined.sums, whole.sums, rtol=1e-12, atol=1e-9)
        torch.testing.assert_close(combined.log_likelihood, whole.log_likelihood, rtol=1e-12, atol=1e-9)


def _weighted_problem(family: ComponentFamily, sampler: Sampler, seed: int, K: int = 3):
    """Data (N, D), random responsibilities (N, K), the family's shift and features T (N, F)."""
    X = sampler(torch.Generator().manual_seed(seed), 1, 300)[0]
    resp = torch.softmax(torch.randn(len(X), K, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64), -1)
    shift = family.reference(X)
    return X, resp, shift, family.features(X, shift)[0]


def _assert_stationary(name: str, family: ComponentFamily, free: dict, fixed: dict, resp, shift, T) -> None:
    """The gradient of the weighted complete-data log-likelihood w.r.t. ``free`` is ~0."""
    free = {k: v.detach().clone().requires_grad_() for k, v in free.items()}
    eta, const = family.natural_parameters({**fixed, **free}, shift)
    objective = ((T @ eta.T + const) * resp).sum()
    for key, grad in zip(free, torch.autograd.grad(objective, list(free.values()))):
        # Scale: the objective is a sum over N points; a zero gradient relative to N.
        tolerance = 1e-6 if "gamma" not in name else 1e-4
        assert float(grad.abs().max()) <= tolerance * len(T), (sorted(fixed), key, float(grad.abs().max()))


def test_m_step_maximises_weighted_complete_data_log_likelihood(case):
    name, family, sampler = case
    _, resp, shift, T = _weighted_problem(family, sampler, seed=2)
    theta, valid = family.m_step(resp.sum(0), resp.T @ T, shift)
    assert bool(valid.all())
    _assert_stationary(name, family, theta, {}, resp, shift, T)


def test_lower_bound_never_decreases(case):
    _, family, sampler = case
    X = sampler(torch.Generator().manual_seed(4), 1, 400)[0]
    model = torch_em.Mixture(family, 3, seed=0, tol=1e-9, max_iter=40, dtype=torch.float64, batch_shape=(2,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch_em.ConvergenceWarning)
        model.fit(X)
    history = model.lower_bound_history_
    assert bool(torch.isfinite(history).all())
    steps = history[:, 1:] - history[:, :-1]
    assert bool((steps >= -1e-9 * history[:, 1:].abs()).all()), float(steps.min())


def test_batched_em_equals_looped_em(case):
    _, family, sampler = case
    B, K = 3, 3
    X = sampler(torch.Generator().manual_seed(5), B, 150)  # (B, N, D)
    log_weights, theta = _working_theta(family, B, K, X.shape[-1], seed=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch_em.ConvergenceWarning)
        batched = mixture_em(family, _data(family, X), log_weights, theta, max_iter=30, tol=1e-6)
        for b in range(B):
            single = mixture_em(family, _data(family, X[b]), log_weights[:, b:b + 1],
                                {k: v[:, b:b + 1] for k, v in theta.items()}, max_iter=30, tol=1e-6)
            assert int(single.n_iter[0, 0]) == int(batched.n_iter[0, b])
            torch.testing.assert_close(single.log_weights[0, 0], batched.log_weights[0, b], rtol=1e-9, atol=1e-10)
            for key in theta:
                torch.testing.assert_close(single.theta[key][0, 0], batched.theta[key][0, b], rtol=1e-9, atol=1e-9)


def test_empty_component_is_reseeded_and_nothing_becomes_nan(case):
    _, family, sampler = case
    X = sampler(torch.Generator().manual_seed(7), 1, 300)[0]
    log_weights, theta = _working_theta(family, 1, 3, X.shape[-1], seed=8)
    log_weights = log_weights.clone()
    log_weights[..., 2] = -1e4  # component 2 explains nothing: its statistics come out empty
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch_em.ConvergenceWarning)
        result = mixture_em(family, _data(family, X), log_weights, theta, max_iter=5, tol=0.0)
    assert bool(torch.isfinite(result.history).all())
    for value in (result.log_weights, *result.theta.values()):
        assert bool(torch.isfinite(value).all())
    assert float(result.log_weights[0, 0, 2].exp()) > 1e-3  # re-seeded, then kept points


def _proper_subsets(names: list[str]) -> list[set[str]]:
    return [set(c) for r in range(1, len(names)) for c in itertools.combinations(names, r)]


def test_conditional_m_step_maximises_given_the_fixed_parameters(case):
    """With some parameters held at arbitrary values, the others are at the conditional maximum."""
    name, family, sampler = case
    X, resp, shift, T = _weighted_problem(family, sampler, seed=9)
    _, held_values = _working_theta(family, 1, resp.shape[-1], X.shape[-1], seed=11)
    held_values = {k: v[0, 0] for k, v in held_values.items()}  # (K, ...)
    subsets = _proper_subsets(list(held_values))
    if not subsets:
        pytest.skip(f"{name} has a single parameter: fixing it is all or nothing")
    for held in subsets:
        assert family.supports_fixing(held)
        fixed = {k: held_values[k] for k in held}
        theta, valid = family.conditional_m_step(resp.sum(0), resp.T @ T, shift, fixed)
        assert bool(valid.all())
        assert all(torch.equal(theta[k], fixed[k]) for k in held)
        _assert_stationary(name, family, {k: v for k, v in theta.items() if k not in held}, fixed, resp, shift, T)
