"""Von Mises-Fisher components and Product components over feature blocks: log-densities against
scipy / mpmath and against the blocks, M-step stationarity by autograd, EM properties, recovery of
planted parameters and clusters, sampling, validation."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from sklearn.metrics import adjusted_rand_score

import torch_em
from torch_em import em

from conftest import mixture_em, mixture_statistics
from torch_em.families import Categorical, Gaussian
from torch_em.families.product import Product
from torch_em.families.von_mises_fisher import VonMisesFisher, concentration_mle, unit_norm_tolerance
from torch_em.special import bessel_ratio

F64 = torch.float64


def fit_quietly(model: torch_em.Mixture, X) -> torch_em.Mixture:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch_em.ConvergenceWarning)
        return model.fit(X)


def planted_vmf(D: int, kappas, N: int, seed: int = 0, batch: tuple = ()):
    """Directions (*batch, K, D), concentrations (*batch, K), labels (*batch, N) and unit-vector
    data (*batch, N, D) from a vMF mixture with uniform weights."""
    g = torch.Generator().manual_seed(seed)
    kappas = torch.as_tensor(kappas, dtype=F64).expand(*batch, len(kappas))
    directions = F.normalize(torch.randn(*batch, kappas.shape[-1], D, generator=g, dtype=F64), dim=-1)
    labels = torch.randint(kappas.shape[-1], (*batch, N), generator=g)
    theta = {"direction": directions, "log_concentration": kappas.log()}
    return directions, kappas, labels, VonMisesFisher().sample(theta, labels, g)


def tensors_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of a state_dict (it may also hold extra, non-tensor state)."""
    return {name: value for name, value in model.state_dict().items() if isinstance(value, torch.Tensor)}


def state_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in tensors_of(model).items()}


def assert_state_unchanged(model, before) -> None:
    after = tensors_of(model)
    assert set(after) == set(before)
    for name, value in before.items():
        assert torch.equal(after[name], value), name


# ================================== von Mises-Fisher ============================================
@pytest.mark.parametrize("D", [2, 3, 10, 256, 1024])
def test_vmf_log_density_matches_scipy(D):
    rng = np.random.default_rng(D)
    family = VonMisesFisher()
    for kappa in (1e-3, 1.0, 50.0, 5000.0, 1e5):
        mu = rng.normal(size=D)
        mu /= np.linalg.norm(mu)
        X = rng.normal(size=(30, D))
        X /= np.linalg.norm(X, axis=1, keepdims=True)
        X[0], X[1] = mu, -mu
        theta = {"direction": torch.tensor(3.0 * mu)[None], "log_concentration": torch.tensor([math.log(kappa)], dtype=F64)}
        eta, c = family.natural_parameters(theta, None)
        got = (torch.tensor(X) @ eta.T + c)[:, 0].numpy()
        with np.errstate(all="ignore"):
            ref = stats.vonmises_fisher(mu, kappa).logpdf(X)
        if np.isfinite(ref).all():
            # log p = kappa mu.x + c: the two O(kappa) terms cancel, so the error scales with kappa.
            np.testing.assert_allclose(got, ref, rtol=1e-13, atol=1e-15 * kappa + 1e-13)
        else:  # scipy's ive underflows (large D, small kappa): the normaliser from mpmath instead
            mpmath = pytest.importorskip("mpmath")
            mpmath.mp.dps = 30
            nu = D / 2 - 1
            log_c = nu * math.log(kappa) - D / 2 * math.log(2 * math.pi) - float(mpmath.log(mpmath.besseli(nu, kappa)))
            np.testing.assert_allclose(got, kappa * X @ mu + log_c, rtol=1e-13, atol=1e-13)
    # kappa -> 0 is the uniform density 1 / |S^(D-1)| = Gamma(D/2) / (2 pi^(D/2)).
    theta = {"direction": torch.ones(1, D, dtype=F64), "log_concentration": torch.tensor([-800.0], dtype=F64)}
    _, c = family.natural_parameters(theta, None)
    uniform = math.lgamma(D / 2) - math.log(2) - D / 2 * math.log(math.pi)
    assert abs(c.item() - uniform) < 1e-12 * max(1, abs(uniform))


def test_vmf_mixture_log_prob_float32_and_float64():
    directions, kappas, _, X = planted_vmf(16, [5.0, 50.0, 500.0], 200, seed=1)
    weights = torch.tensor([0.2, 0.3, 0.5], dtype=F64)
    model = torch_em.Mixture(VonMisesFisher(directions_init=directions, concentrations_init=kappas), 3,
                             n_features=16, weights_init=weights, dtype=F64)
    joint = np.stack([stats.vonmises_fisher(directions[k].numpy(), kappas[k].item()).logpdf(X.numpy()) for k in range(3)], -1)
    expected = torch.logsumexp(torch.tensor(joint) + weights.log(), -1)
    torch.testing.assert_close(model.log_prob(X), expected, rtol=1e-12, atol=1e-10)
    model32 = torch_em.Mixture(VonMisesFisher(directions_init=directions, concentrations_init=kappas), 3,
                               n_features=16, weights_init=weights, dtype=torch.float32)
    got32 = model32.log_prob(X.float())
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), expected, rtol=1e-5, atol=2e-3)  # kappa = 500: eps32 * 500 * few


@pytest.mark.parametrize("D", [3, 64])
def test_vmf_m_step_is_a_stationary_point(D):
    _, _, _, X = planted_vmf(D, [4.0, 30.0, 200.0], 500, seed=2)
    family = VonMisesFisher()
    K = 3
    resp = torch.softmax(2 * torch.randn(len(X), K, generator=torch.Generator().manual_seed(3), dtype=F64), -1)
    T, _ = family.features(X, None)
    counts, sums = resp.sum(0), resp.T @ T
    theta, valid = family.m_step(counts, sums, None)
    assert bool(valid.all())
    # The concentration solves A_D(kappa) = |S| / n (checked against scipy's Bessel ratio).
    from scipy.special import ive
    kappa = theta["log_concentration"].exp().numpy()
    np.testing.assert_allclose(ive(D / 2, kappa) / ive(D / 2 - 1, kappa), (sums.norm(dim=-1) / counts).numpy(), rtol=1e-12)
    theta = {name: value.detach().clone().requires_grad_() for name, value in theta.items()}
    eta, const = family.natural_parameters(theta, None)
    objective = ((T @ eta.T + const) * resp).sum()
    for name, grad in zip(theta, torch.autograd.grad(objective, list(theta.values()))):
        assert grad.abs().max().item() / len(X) < 1e-10, (name, grad)
    # ... and a maximum: moving any parameter lowers it.
    g = torch.Generator().manual_seed(0)
    for name in theta:
        moved = {other: value.detach() for other, value in theta.items()}
        moved[name] = moved[name] + 0.01 * torch.randn(moved[name].shape, generator=g, dtype=F64)
        eta, const = family.natural_parameters(moved, None)
        assert ((T @ eta.T + const) * resp).sum().item() < objective.item()


@pytest.mark.parametrize("D", [2, 3, 10, 100, 1024])
def test_concentration_mle_inverts_the_mean_resultant_length(D):
    kappa = torch.logspace(-4, 7, 300, dtype=F64)
    r = bessel_ratio(D / 2 - 1, kappa)
    estimate = concentration_mle(r, D, max_concentration=1e300)
    # Relative error limited by the conditioning of A_D near 1: d kappa / kappa ~ eps / (1 - r).
    allowed = 1e-12 + 20 * torch.finfo(F64).eps / (1 - r)
    assert bool(((estimate - kappa).abs() / kappa <= allowed).all())
    # r = 1 (identical points) is capped, r = 0 gives a tiny positive concentration.
    edge = concentration_mle(torch.tensor([1.0, 0.0], dtype=F64), D, max_concentration=1e6)
    assert edge[0].item() == 1e6 and 0 < edge[1].item() < 1e-300


def test_vmf_lower_bound_never_decreases():
    _, _, _, X = planted_vmf(5, [3.0, 10.0, 30.0], 400, seed=4)
    model = fit_quietly(torch_em.Mixture(VonMisesFisher(), 3, seed=0, tol=1e-10, max_iter=40, dtype=F64, batch_shape=(2,)), X)
    history = model.lower_bound_history_
    assert bool(torch.isfinite(history).all())
    steps = history[:, 1:] - history[:, :-1]
    assert bool((steps >= -1e-10 * history[:, 1:].abs()).all()), float(steps.min())


def test_vmf_batched_equals_looped_from_identical_initial_parameters():
    B, K, D = 3, 3, 6
    directions, kappas, _, X = planted_vmf(D, [5.0, 20.0, 60.0], 300, seed=5, batch=(B,))
    g = torch.Generator().manual_seed(6)
    start = F.normalize(directions + 0.3 * torch.randn(directions.shape, generator=g, dtype=F64), dim=-1)
    weights = torch.full((B, K), 1 / K, dtype=F64)
    kw = dict(max_iter=50, tol=1e-8, dtype=F64)
    batched = fit_quietly(torch_em.Mixture(VonMisesFisher(directions_init=start, concentrations_init=kappas / 2), K,
                                           batch_shape=(B,), weights_init=weights, **kw), X)
    for b in range(B):
        single = fit_quietly(torch_em.Mixture(VonMisesFisher(directions_init=start[b], concentrations_init=kappas[b] / 2),
                                              K, weights_init=weights[b], **kw), X[b])
        assert int(single.n_iter_) == int(batched.n_iter_[b])
        for name, value in tensors_of(single).items():
            torch.testing.assert_close(value, tensors_of(batched)[name][b], rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("D, kappas, N", [(10, [15.0, 40.0, 120.0], 3000), (256, [300.0, 600.0, 1200.0], 1500)])
def test_vmf_recovers_planted_directions_and_concentrations(D, kappas, N):
    directions, kappas, labels, X = planted_vmf(D, kappas, N, seed=7)
    model = fit_quietly(torch_em.Mixture(VonMisesFisher(), 3, seed=0, n_init=2, tol=1e-8, dtype=F64), X)
    mu = model.family.mean_direction(model.theta()).detach()  # (K, D)
    match = (mu @ directions.T).argmax(0)  # fitted component of each planted one
    assert sorted(match.tolist()) == [0, 1, 2]
    cosines = (mu[match] * directions).sum(-1)
    relative_kappa = (model.family.concentration(model.theta()).detach()[match] / kappas - 1).abs()
    assert float(cosines.min()) > 0.99, cosines
    assert float(relative_kappa.max()) < 0.1, relative_kappa
    assert adjusted_rand_score(labels.numpy(), model.predict(X).numpy()) > 0.95


def test_vmf_float32_fit_matches_float64():
    directions, kappas, _, X = planted_vmf(8, [10.0, 40.0, 150.0], 600, seed=8)
    fits = {}
    for dtype in (torch.float32, F64):
        family = VonMisesFisher(directions_init=directions.to(dtype), concentrations_init=kappas.to(dtype))
        fits[dtype] = fit_quietly(torch_em.Mixture(family, 3, max_iter=30, tol=1e-6, dtype=dtype), X.to(dtype))
    torch.testing.assert_close(fits[torch.float32].weights.double(), fits[F64].weights, rtol=1e-4, atol=1e-4)
    for name in ("direction", "log_concentration"):
        torch.testing.assert_close(getattr(fits[torch.float32], name).double(), getattr(fits[F64], name), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("D, kappa", [(2, 0.5), (3, 10.0), (3, 1e5), (50, 5.0), (1024, 300.0), (1024, 1e5)])
def test_vmf_sampler_matches_the_distribution(D, kappa):
    n = 20000 if D < 1000 else 4000
    g = torch.Generator().manual_seed(int(D + kappa))
    mu = F.normalize(torch.randn(1, D, generator=g, dtype=F64), dim=-1)
    theta = {"direction": 2 * mu, "log_concentration": torch.tensor([math.log(kappa)], dtype=F64)}
    X = VonMisesFisher().sample(theta, torch.zeros(n, dtype=torch.long), g)
    assert X.shape == (n, D) and X.dtype == F64
    assert float((X.norm(dim=-1) - 1).abs().max()) < 1e-12
    w = X @ mu[0]  # (n,)
    mean_length = bessel_ratio(D / 2 - 1, torch.tensor(kappa, dtype=F64)).item()
    # Var(w) = 1 - A^2 - (D - 1) A / kappa (the derivative of A): the mean within 5 standard errors.
    variance = 1 - mean_length**2 - (D - 1) * mean_length / kappa
    assert abs(w.mean().item() - mean_length) < 5 * math.sqrt(max(variance, 1e-30) / n) + 1e-12
    # The tangent part has no preferred direction: its mean is ~0.
    tangent = X - w[:, None] * mu
    assert tangent.mean(0).norm().item() < 5 * math.sqrt((1 - mean_length**2) / n) + 1e-12
    if D <= 50:  # the whole distribution of w against scipy's sampler (Kolmogorov-Smirnov)
        reference = stats.vonmises_fisher(mu[0].numpy(), kappa).rvs(n, random_state=np.random.default_rng(0)) @ mu[0].numpy()
        assert stats.ks_2samp(w.numpy(), reference).pvalue > 1e-3


def test_vmf_data_off_the_sphere_is_rejected_and_changes_nothing():
    _, _, _, X = planted_vmf(4, [5.0, 20.0], 200, seed=9)
    model = fit_quietly(torch_em.Mixture(VonMisesFisher(), 2, seed=0, dtype=F64), X)
    before = state_of(model)
    bad = X.clone()
    bad[3] *= 1 + 10 * unit_norm_tolerance(F64)
    for call in (model.fit, model.log_prob, model.predict):
        with pytest.raises(ValueError, match="unit vectors"):
            call(bad)
    with pytest.raises(ValueError, match="D >= 2"):
        torch_em.Mixture(VonMisesFisher(), 2).fit(torch.ones(10, 1))
    assert_state_unchanged(model, before)
    # Rows normalised in float32 and used in float64 are accepted; float32 data likewise.
    model.log_prob(F.normalize(X.float(), dim=-1).double())
    fit_quietly(torch_em.Mixture(VonMisesFisher(), 2, seed=0, max_iter=5), F.normalize(X.float(), dim=-1))


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(directions_init=np.ones((3, 4))), "directions_init must have shape"),
    (dict(directions_init=np.array([[1.0, 0, 0, 0], [0, 0, 0, 0]])), "non-zero"),
    (dict(concentrations_init=[1.0, -2.0]), "concentrations_init must be positive"),
    (dict(concentrations_init=[1.0, math.nan]), "concentrations_init must be finite"),
])
def test_vmf_invalid_initial_parameters_are_rejected(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        torch_em.Mixture(VonMisesFisher(**kwargs), 2, n_features=4)


def test_vmf_invalid_constructor_arguments_are_rejected():
    with pytest.raises(ValueError, match="max_concentration"):
        VonMisesFisher(max_concentration=-1.0)


def test_vmf_identical_points_give_a_capped_finite_concentration():
    X = F.normalize(torch.tensor([[1.0, 2.0, 2.0]], dtype=F64), dim=-1).expand(50, 3)
    model = fit_quietly(torch_em.Mixture(VonMisesFisher(max_concentration=1e8), 1, dtype=F64), X)
    assert model.family.concentration(model.theta()).item() == pytest.approx(1e8)
    assert bool(torch.isfinite(model.log_prob(X)).all())


def test_vmf_log_prob_gradcheck():
    _, _, _, X = planted_vmf(4, [2.0, 8.0, 30.0], 40, seed=10)
    model = torch_em.Mixture(VonMisesFisher(), 3, n_features=4, seed=0, dtype=F64)
    names = [name for name, _ in model.named_parameters()]
    inputs = tuple(p.detach().clone().requires_grad_() for p in model.parameters())

    def log_prob(*values):
        return torch.func.functional_call(model, dict(zip(names, values)), (X,))

    assert torch.autograd.gradcheck(log_prob, inputs)
    # With respect to the data as well (tangent directions only: |x| = 1 is not enforced by log_prob).
    assert torch.autograd.gradcheck(lambda x: model.log_prob(x), (X[:5].clone().requires_grad_(),))


# ======================================== Product ===============================================
#: Columns are interleaved on purpose: Gaussian [4, 0], categorical [1, 5], vMF [2, 3, 6].
GAUSSIAN_COLUMNS, CATEGORICAL_COLUMNS, VMF_COLUMNS = [4, 0], [1, 5], [2, 3, 6]


def mixed_family(**gaussian_kw) -> Product:
    return Product([
        (Gaussian("full", **gaussian_kw), GAUSSIAN_COLUMNS),
        (Categorical(3), CATEGORICAL_COLUMNS),
        (VonMisesFisher(), VMF_COLUMNS),
    ])


def mixed_data(N: int, seed: int = 0, batch: tuple = ()):
    """Three clusters that no single block separates: Gaussian block tells cluster 0 from 1 and 2,
    the categorical block 1 from 0 and 2, the vMF block 2 from 0 and 1 (all noisily)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(3, (*batch, N), generator=g)
    means = torch.tensor([[0.0, 0.0], [2.5, 2.0], [2.5, 2.0]], dtype=F64)
    gaussian = means[labels] + torch.randn(*batch, N, 2, generator=g, dtype=F64) * torch.tensor([1.0, 0.7], dtype=F64)
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.2, 0.7], [0.7, 0.2, 0.1]], dtype=F64)  # same for both variables
    codes = torch.multinomial(probs[labels].reshape(-1, 3), 2, replacement=True, generator=g).reshape(*batch, N, 2).to(F64)
    directions = F.normalize(torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.2]], dtype=F64), dim=-1)
    theta = {"direction": directions.expand(*batch, 3, 3),
             "log_concentration": torch.full((*batch, 3), math.log(6.0), dtype=F64)}
    unit = VonMisesFisher().sample(theta, labels, g)
    X = torch.empty(*batch, N, 7, dtype=F64)
    X[..., GAUSSIAN_COLUMNS], X[..., CATEGORICAL_COLUMNS], X[..., VMF_COLUMNS] = gaussian, codes, unit
    return labels, X


def block_log_density(family, X_block, theta):
    shift = family.reference(X_block)
    T, h = family.features(X_block, shift)
    eta, c = family.natural_parameters(theta, shift)
    lp = T.unsqueeze(-3) @ eta.mT if T.dim() > 2 else T @ eta.mT  # (..., N, K)
    return lp + c.unsqueeze(-2) + (0 if h is None else h.unsqueeze(-1))


def test_product_layout_names_and_counts():
    family = mixed_family()
    assert list(family.event_shapes(3, 7)) == [
        "block0_loc", "block0_raw_precision_cholesky", "block1_logit_categories", "block2_direction", "block2_log_concentration"
    ]
    assert family.event_shapes(3, 1) == family.event_shapes(3, 7)  # the blocks fix the columns
    blocks = [(Gaussian("full"), 2), (Categorical(3), 2), (VonMisesFisher(), 3)]
    assert family.n_statistics(7) == sum(f.n_statistics(d) for f, d in blocks)
    assert family.n_free_parameters(3, 7) == sum(f.n_free_parameters(3, d) for f, d in blocks)
    model = torch_em.Mixture(family, 3, n_features=7, dtype=F64)
    assert model.n_parameters() == family.n_free_parameters(3, 7) + 2
    assert model.block0_loc.shape == (3, 2) and model.block1_logit_categories.shape == (3, 2, 3)
    assert model.block2_direction.shape == (3, 3)


def test_product_log_density_is_the_sum_of_the_blocks():
    family = mixed_family()
    _, X = mixed_data(60, seed=1)
    g = torch.Generator().manual_seed(2)
    theta = family.default_parameters((2,), 3, 7, g, torch.device("cpu"), F64)  # two models
    shift = family.reference(X)
    T, h = family.features(X, shift)
    eta, c = family.natural_parameters(theta, shift)  # (2, K, F), (2, K)
    got = T @ eta.mT + c.unsqueeze(-2) + (0 if h is None else h.unsqueeze(-1))  # (2, N, K)
    expected = sum(
        block_log_density(block.family, X[:, list(block.columns)], family.block_theta(theta, i))
        for i, block in enumerate(family.blocks)
    )
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # The shift does not change the density (only the conditioning of the statistics).
    eta0, c0 = family.natural_parameters(theta, None)
    T0, _ = family.features(X, None)
    torch.testing.assert_close(T0 @ eta0.mT + c0.unsqueeze(-2), got, rtol=1e-10, atol=1e-10)
    # Through the mixture: log_joint = log w + sum of block log-densities.
    model = torch_em.Mixture(family, 3, n_features=7, batch_shape=(2,), dtype=F64)
    with torch.no_grad():
        for name, value in theta.items():
            getattr(model, name).copy_(value)
    torch.testing.assert_close(model.log_joint(X), expected + model.weights.log().unsqueeze(-2), rtol=1e-12, atol=1e-12)


def test_product_m_step_is_a_stationary_point():
    family = mixed_family(reg_covar=0.0)  # with reg_covar > 0 the Gaussian M-step is a regularised one
    _, X = mixed_data(400, seed=3)
    resp = torch.softmax(torch.randn(len(X), 3, generator=torch.Generator().manual_seed(4), dtype=F64), -1)
    shift = family.reference(X)
    T, h = family.features(X, shift)
    theta, valid = family.m_step(resp.sum(0), resp.T @ T, shift)
    assert bool(valid.all()) and set(theta) == set(family.event_shapes(3, 7))
    theta = {name: value.detach().clone().requires_grad_() for name, value in theta.items()}
    eta, const = family.natural_parameters(theta, shift)
    objective = ((T @ eta.T + const) * resp).sum()
    for name, grad in zip(theta, torch.autograd.grad(objective, list(theta.values()))):
        assert grad.abs().max().item() / len(X) < 1e-9, (name, grad.abs().max())


def test_product_mixture_recovers_planted_clusters():
    labels, X = mixed_data(1500, seed=5)
    model = fit_quietly(torch_em.Mixture(mixed_family(), 3, seed=0, n_init=3, tol=1e-6, dtype=F64), X)
    ari = adjusted_rand_score(labels.numpy(), model.predict(X).numpy())
    assert ari > 0.9, ari
    # No single block can do it: a Gaussian mixture of the Gaussian columns alone is far worse.
    gaussian_only = fit_quietly(torch_em.Mixture(Gaussian("full"), 3, seed=0, n_init=3, dtype=F64), X[:, GAUSSIAN_COLUMNS])
    assert adjusted_rand_score(labels.numpy(), gaussian_only.predict(X[:, GAUSSIAN_COLUMNS]).numpy()) < ari - 0.2
    # Lower bound never decreases.
    history = model.lower_bound_history_
    assert bool((history[1:] - history[:-1] >= -1e-10 * history[1:].abs()).all())
    # Samples put every block's values in its own columns.
    samples, sample_labels = model.sample(500, seed=1)
    assert samples.shape == (500, 7)
    codes = samples[:, CATEGORICAL_COLUMNS]
    assert bool((codes == codes.round()).all() & (codes >= 0).all() & (codes <= 2).all())
    torch.testing.assert_close(samples[:, VMF_COLUMNS].norm(dim=-1), torch.ones(500, dtype=F64), rtol=0, atol=1e-12)
    loc = model.block0_loc.detach()
    for k in range(3):
        chosen = samples[sample_labels == k][:, GAUSSIAN_COLUMNS]
        assert (chosen.mean(0) - loc[k]).abs().max() < 0.5


def test_product_of_diagonal_gaussian_blocks_equals_one_diagonal_gaussian():
    # A diagonal Gaussian factorises over any split of its columns: the product of two blocks
    # (columns permuted) must give exactly the same EM path, which checks shift and column handling.
    rng = np.random.default_rng(6)
    X = torch.tensor(rng.normal(size=(300, 3)) + np.repeat(np.eye(3) * 4, 100, 0), dtype=F64) + 100.0  # far from 0
    means = X[[0, 100, 200]] + 0.5
    precisions = torch.full((3, 3), 0.5, dtype=F64)
    weights = torch.full((3,), 1 / 3, dtype=F64)
    kw = dict(weights_init=weights, max_iter=25, tol=0.0, dtype=F64)
    whole = fit_quietly(torch_em.Mixture(Gaussian("diag", means_init=means, precisions_init=precisions), 3, **kw), X)
    split = [2, 0], [1]
    family = Product([
        (Gaussian("diag", means_init=means[:, split[0]], precisions_init=precisions[:, split[0]]), split[0]),
        (Gaussian("diag", means_init=means[:, split[1]], precisions_init=precisions[:, split[1]]), split[1]),
    ])
    product = fit_quietly(torch_em.Mixture(family, 3, **kw), X)
    torch.testing.assert_close(product.lower_bound_history_, whole.lower_bound_history_, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(product.logits, whole.logits, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(product.block0_loc, whole.loc[:, split[0]], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(product.block1_loc, whole.loc[:, split[1]], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(product.block0_raw_precision_cholesky, whole.raw_precision_cholesky[:, split[0]], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(product.log_prob(X), whole.log_prob(X), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(family.reference(X), X.mean(0, keepdim=True), rtol=0, atol=0)


def test_product_batched_equals_looped():
    family = mixed_family()
    B, K = 3, 3
    _, X = mixed_data(150, seed=7, batch=(B,))
    g = torch.Generator().manual_seed(8)
    theta = family.default_parameters((1, B), K, 7, g, torch.device("cpu"), F64)
    log_weights = torch.log_softmax(torch.randn(1, B, K, generator=g, dtype=F64), -1)
    data = lambda x: em.Data(family, x, family.reference(x), chunk_size=41)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch_em.ConvergenceWarning)
        batched = mixture_em(family, data(X), log_weights, theta, max_iter=12, tol=1e-8)
        for b in range(B):
            single = mixture_em(family, data(X[b]), log_weights[:, b:b + 1], {k: v[:, b:b + 1] for k, v in theta.items()},
                                max_iter=12, tol=1e-8)
            assert int(single.n_iter[0, 0]) == int(batched.n_iter[0, b])
            for key in theta:
                torch.testing.assert_close(single.theta[key][0, 0], batched.theta[key][0, b], rtol=1e-9, atol=1e-9)
    steps = batched.history[..., 1:] - batched.history[..., :-1]
    assert bool((steps >= -1e-10 * batched.history[..., 1:].abs()).all())


def test_product_statistics_are_additive_and_reseeding_works():
    family = mixed_family()
    _, X = mixed_data(200, seed=9)
    g = torch.Generator().manual_seed(10)
    theta = family.default_parameters((1, 1), 3, 7, g, torch.device("cpu"), F64)
    log_weights = torch.log_softmax(torch.randn(1, 1, 3, generator=g, dtype=F64), -1)
    shift = family.reference(X)
    whole = mixture_statistics(family, em.Data(family, X, shift, chunk_size=200), log_weights, theta)
    chunked = mixture_statistics(family, em.Data(family, X, shift, chunk_size=13), log_weights, theta)
    torch.testing.assert_close(chunked.sums, whole.sums, rtol=1e-12, atol=1e-10)
    log_weights = log_weights.clone()
    log_weights[..., 2] = -1e4  # component 2 explains nothing: it is re-seeded
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch_em.ConvergenceWarning)
        result = mixture_em(family, em.Data(family, X, shift, 50), log_weights, theta, max_iter=5, tol=0.0)
    assert all(bool(torch.isfinite(v).all()) for v in (result.history, result.log_weights, *result.theta.values()))
    assert float(result.log_weights[0, 0, 2].exp()) > 1e-3


@pytest.mark.parametrize("blocks, pattern", [
    ([], "non-empty"),
    ([(Gaussian(), [0, 1]), (Categorical(3), [1, 2])], "share columns"),
    ([(Gaussian(), [0, 2])], "cover the columns"),
    ([(Gaussian(), slice(0, None))], "slice"),
    ([(Gaussian(), slice(-2, 2))], "slice"),
    ([("gaussian", [0])], "ComponentFamily"),
    ([(Gaussian(), [])], "at least one column"),
    ([(Gaussian(), [0, 0])], "repeat"),
    ([(Gaussian(), [-1, 0])], "non-negative"),
    ([(Gaussian(), [0.0, 1.0])], "non-negative integers"),
    ([(Gaussian(),)], "pair"),
])
def test_product_invalid_blocks_are_rejected(blocks, pattern):
    with pytest.raises(ValueError, match=pattern):
        Product(blocks)


def test_product_column_specifications():
    a = Product([(Gaussian("diag"), slice(0, 2)), (Categorical(3), range(2, 4)), (VonMisesFisher(), np.array([5, 4, 6]))])
    assert [block.columns for block in a.blocks] == [(0, 1), (2, 3), (5, 4, 6)]
    assert Product([(Gaussian("diag"), 0)]).n_columns == 1


def test_product_wrong_number_of_features_is_rejected():
    family = mixed_family()
    with pytest.raises(ValueError, match="n_features must be 7"):
        torch_em.Mixture(family, 3, n_features=6)
    with pytest.raises(ValueError, match="D=7"):
        torch_em.Mixture(family, 3).fit(torch.zeros(20, 6))


def test_product_domain_errors_name_the_block_and_change_nothing():
    _, X = mixed_data(200, seed=11)
    model = fit_quietly(torch_em.Mixture(mixed_family(), 3, seed=0, max_iter=10, dtype=F64), X)
    before = state_of(model)
    bad_codes = X.clone()
    bad_codes[0, 5] = 3.0
    with pytest.raises(ValueError, match=r"block 1 \(Categorical, columns \[1, 5\]\).*integer category codes"):
        model.fit(bad_codes)
    off_sphere = X.clone()
    off_sphere[1, 2] += 0.1
    with pytest.raises(ValueError, match=r"block 2 \(VonMisesFisher, columns \[2, 3, 6\]\).*unit vectors"):
        model.log_prob(off_sphere)
    with pytest.raises(ValueError, match="D=7"):
        model.fit(X[:, :6])
    assert_state_unchanged(model, before)


def test_product_state_dict_round_trip():
    _, X = mixed_data(200, seed=12)
    model = fit_quietly(torch_em.Mixture(mixed_family(), 3, seed=0, max_iter=10, dtype=F64), X)
    fresh = torch_em.Mixture(mixed_family(), 3, dtype=F64)  # no n_features: parameters come from the state
    fresh.load_state_dict(model.state_dict())
    assert fresh.n_features == 7
    torch.testing.assert_close(fresh.log_prob(X), model.log_prob(X), rtol=0, atol=0)


def test_product_log_prob_gradcheck():
    _, X = mixed_data(30, seed=13)
    model = torch_em.Mixture(mixed_family(), 2, n_features=7, seed=0, dtype=F64)
    names = [name for name, _ in model.named_parameters()]
    inputs = tuple(p.detach().clone().requires_grad_() for p in model.parameters())

    def log_prob(*values):
        return torch.func.functional_call(model, dict(zip(names, values)), (X,))

    assert torch.autograd.gradcheck(log_prob, inputs)
