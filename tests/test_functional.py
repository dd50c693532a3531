"""EM as a differentiable layer (torch_em.functional.em, torch_em.EMLayer): agreement with the
EM engine, gradients in every mode (gradcheck, single-step equivalence, implicit vs unrolled),
memory that does not grow with n_iter in "last" mode, masks, float32/float64 and devices."""
from __future__ import annotations

import math

import pytest
import torch

import torch_em
from torch_em import em as engine
from torch_em.functional import em

from conftest import COVARIANCE_TYPES, DEVICES, mixture_em


def _sets(B=3, N=40, seed=0, dtype=torch.float64, device="cpu"):
    """B sets of 2-D points from two well-separated clusters (different per set)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(2, (B, N), generator=g)
    centres = torch.tensor([[0.0, 0.0], [4.0, 3.0]], dtype=dtype)[labels]
    X = centres + torch.randn(B, N, 2, generator=g, dtype=dtype) @ torch.tensor([[1.0, 0.3], [0.0, 0.7]], dtype=dtype)
    return X.to(device)


def _gaussian_init(covariance_type, dtype=torch.float64, device="cpu", requires_grad=False):
    family = torch_em.Gaussian(covariance_type)
    shape = family.precision_shape(2, 2)
    init = {
        "logits": torch.tensor([0.1, -0.1], dtype=dtype, device=device),
        "loc": torch.tensor([[0.5, -0.5], [3.0, 2.0]], dtype=dtype, device=device),
        "raw_precision_cholesky": 0.1 * torch.ones(shape, dtype=dtype, device=device),
    }
    return family, {name: value.requires_grad_(requires_grad) for name, value in init.items()}


def _engine_fit(family, X, init, n_iter):
    """The same iterations by the engine behind Mixture.fit (checked against scikit-learn)."""
    M = X.shape[0]
    log_weights = init["logits"].log_softmax(-1).expand(1, M, -1)
    theta = {name: value.expand(1, M, *value.shape) for name, value in init.items() if name != "logits"}
    data = engine.Data(family, X, family.reference(X), chunk_size=1000)
    return mixture_em(family, data, log_weights, theta, max_iter=n_iter, tol=0.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_layer_equals_the_em_engine(covariance_type, device):
    X = _sets(device=device)
    family, init = _gaussian_init(covariance_type, device=device)
    with torch.no_grad():
        state = em(X, init, 7, family=family)
        reference = _engine_fit(family, X, init, 7)
    torch.testing.assert_close(state.logits, reference.log_weights[0], rtol=1e-10, atol=1e-12)
    for name, value in reference.theta.items():
        torch.testing.assert_close(state.theta[name], value[0], rtol=1e-10, atol=1e-12)
    # Responsibilities and log-likelihood under the returned parameters, from torch.distributions.
    covariances = state.covariances
    if covariance_type == "tied":
        covariances = covariances.unsqueeze(-3).expand(-1, 2, -1, -1)
    elif covariance_type == "diag":
        covariances = torch.diag_embed(covariances)
    elif covariance_type == "spherical":
        covariances = covariances[..., None, None] * torch.eye(2, dtype=X.dtype, device=device)
    normal = torch.distributions.MultivariateNormal(state.means.unsqueeze(1), covariance_matrix=covariances.unsqueeze(1))
    log_joint = normal.log_prob(X.unsqueeze(-2)) + state.logits.unsqueeze(1)  # (B, N, K)
    torch.testing.assert_close(state.responsibilities, log_joint.softmax(-1), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(state.log_likelihood, log_joint.logsumexp(-1).mean(-1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("family_name", ["poisson", "bernoulli", "von-mises-fisher"])
def test_layer_equals_the_em_engine_for_other_families(family_name):
    g = torch.Generator().manual_seed(1)
    if family_name == "poisson":
        family = torch_em.Poisson()
        X = torch.poisson(torch.tensor([[1.0, 6.0], [7.0, 2.0]], dtype=torch.float64)[torch.randint(2, (2, 60), generator=g)], generator=g)
        init = {"log_rates": torch.tensor([[0.0, 1.0], [1.5, 0.5]], dtype=torch.float64)}
    elif family_name == "bernoulli":
        family = torch_em.Bernoulli()
        probs = torch.tensor([[0.9, 0.8, 0.1], [0.1, 0.3, 0.9]], dtype=torch.float64)
        X = torch.bernoulli(probs[torch.randint(2, (2, 60), generator=g)], generator=g)
        init = {"logit_probs": torch.tensor([[1.0, 0.5, -0.5], [-1.0, 0.0, 1.0]], dtype=torch.float64)}
    else:
        family = torch_em.VonMisesFisher()
        mu = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
        X = torch.nn.functional.normalize(5 * mu[torch.randint(2, (2, 60), generator=g)] + torch.randn(2, 60, 3, generator=g, dtype=torch.float64), dim=-1)
        init = {"direction": torch.tensor([[1.0, 0.2, 0.0], [0.2, 1.0, 0.1]], dtype=torch.float64),
                "log_concentration": torch.tensor([1.0, 1.0], dtype=torch.float64)}
    init = {"logits": torch.zeros(2, dtype=torch.float64), **init}
    state = em(X, init, 5, family=family)
    reference = _engine_fit(family, X, init, 5)
    torch.testing.assert_close(state.logits, reference.log_weights[0], rtol=1e-10, atol=1e-12)
    for name, value in reference.theta.items():
        torch.testing.assert_close(state.theta[name], value[0], rtol=1e-10, atol=1e-12)


def _outputs(state):
    return torch.cat([state.logits.flatten(), *(v.flatten() for v in state.theta.values()), state.responsibilities.flatten()])


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_unrolled_mode_passes_gradcheck(covariance_type):
    X = _sets(B=2, N=12, seed=2).requires_grad_()
    _, init = _gaussian_init(covariance_type, requires_grad=True)
    # reg_covar keeps the covariances of so few points well conditioned for finite differences.
    family = torch_em.Gaussian(covariance_type, reg_covar=0.05)
    names = list(init)

    def run(X, *values):
        return _outputs(em(X, dict(zip(names, values)), 2, family=family, gradient="unrolled"))

    assert torch.autograd.gradcheck(run, (X, *init.values()))


def test_unrolled_mode_passes_gradcheck_for_poisson():
    X = torch.tensor([[[0.0, 3.0], [1.0, 4.0], [6.0, 0.0], [5.0, 1.0], [2.0, 2.0]]], dtype=torch.float64)
    init = {"logits": torch.tensor([0.2, -0.2], dtype=torch.float64, requires_grad=True),
            "log_rates": torch.tensor([[0.0, 1.0], [1.5, 0.0]], dtype=torch.float64, requires_grad=True)}

    def run(logits, log_rates):
        return _outputs(em(X, {"logits": logits, "log_rates": log_rates}, 3, family=torch_em.Poisson()))

    assert torch.autograd.gradcheck(run, tuple(init.values()))


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_last_mode_is_the_gradient_of_one_step_from_the_detached_state(covariance_type):
    X = _sets(seed=3).requires_grad_()
    family, init = _gaussian_init(covariance_type, requires_grad=True)
    last = em(X, init, 6, family=family, gradient="last")
    loss = last.means.square().sum() + last.responsibilities[..., 0].sum()
    grad_last = torch.autograd.grad(loss, X)[0]
    assert not last.logits.grad_fn is None and all(p.grad is None for p in init.values())
    with torch.no_grad():
        previous = em(X, init, 5, family=family)
    one_step = em(X, {k: v.detach() for k, v in previous.parameters().items()}, 1, family=family)
    loss = one_step.means.square().sum() + one_step.responsibilities[..., 0].sum()
    grad_step = torch.autograd.grad(loss, X)[0]
    torch.testing.assert_close(grad_last, grad_step, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(last.means, one_step.means, rtol=1e-12, atol=1e-12)


@pytest.mark.filterwarnings("ignore::torch_em.ImplicitGradientWarning")  # memory only: EM need not converge
def test_last_mode_memory_does_not_grow_with_n_iter():
    X = _sets(B=4, N=200, seed=4).requires_grad_()
    family, init = _gaussian_init("full", requires_grad=True)
    saved = {
        mode: [torch_em.saved_tensor_bytes(lambda: em(X, init, n, family=family, gradient=mode)) for n in (2, 8, 32)]
        for mode in ("last", "unrolled", "implicit")
    }
    assert saved["last"][0] == saved["last"][1] == saved["last"][2] > 0
    assert saved["implicit"][0] == saved["implicit"][1] == saved["implicit"][2] > 0
    # Contrast: unrolling stores every iteration (linear growth).
    assert saved["unrolled"][2] > 3.5 * saved["unrolled"][1] > 3.5 ** 2 * saved["unrolled"][0] / 2


@pytest.mark.parametrize("device", [d for d in DEVICES if d.id == "cuda"])
def test_last_mode_peak_cuda_memory_does_not_grow_with_n_iter(device):
    X = _sets(B=64, N=2000, seed=4, device=device).requires_grad_()
    family, init = _gaussian_init("full", device=device, requires_grad=True)
    peaks = []
    for n_iter in (2, 16):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        state = em(X, init, n_iter, family=family, gradient="last")
        state.means.sum().backward()
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
        del state
    assert peaks[1] <= 1.05 * peaks[0], peaks


@pytest.mark.parametrize("covariance_type", ["full", "spherical"])
def test_implicit_gradient_equals_unrolled_gradient_at_convergence(covariance_type):
    X = _sets(seed=5).requires_grad_()
    family, init = _gaussian_init(covariance_type)

    def gradient(mode):
        state = em(X, init, 150, family=family, gradient=mode)
        loss = state.means[..., 0].sum() + state.covariances.sum() + state.weights[..., 0].sum()
        return torch.autograd.grad(loss, X)[0]

    unrolled, implicit = gradient("unrolled"), gradient("implicit")
    # Both are exact up to the residual of 150 iterations and of the adjoint iteration.
    torch.testing.assert_close(implicit, unrolled, rtol=1e-5, atol=1e-8)
    assert float((gradient("last") - unrolled).abs().max()) > 1e-4  # first order differs: the check can fail


def test_none_mode_returns_no_graph():
    X = _sets().requires_grad_()
    family, init = _gaussian_init("diag", requires_grad=True)
    state = em(X, init, 3, family=family, gradient="none")
    assert not state.responsibilities.requires_grad and not state.means.requires_grad
    torch.testing.assert_close(state.means, em(X, init, 3, family=family).means.detach(), rtol=0, atol=0)


def test_padded_sets_equal_the_unpadded_sets_and_padding_gets_no_gradient():
    full = _sets(B=2, N=50, seed=6)
    sizes = [30, 50]
    X = full.clone()
    X[0, 30:] = math.nan  # padding may hold anything
    X.requires_grad_()
    mask = torch.arange(50).unsqueeze(0) < torch.tensor(sizes).unsqueeze(1)
    family, init = _gaussian_init("full")
    state = em(X, init, 5, family=family, mask=mask)
    for b, n in enumerate(sizes):
        alone = em(full[b:b + 1, :n], init, 5, family=family)
        torch.testing.assert_close(state.means[b], alone.means[0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(state.covariances[b], alone.covariances[0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(state.log_likelihood[b], alone.log_likelihood[0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(state.responsibilities[b, :n], alone.responsibilities[0], rtol=1e-10, atol=1e-12)
    assert bool((state.responsibilities[0, 30:] == 0).all())
    (grad,) = torch.autograd.grad(state.means.sum() + state.responsibilities.sum(), X)
    assert bool((grad[0, 30:] == 0).all()) and bool(torch.isfinite(grad).all()) and float(grad[0, :30].abs().sum()) > 0


def test_float32_agrees_with_float64():
    X64 = _sets(seed=7)
    family, init64 = _gaussian_init("full")
    _, init32 = _gaussian_init("full", dtype=torch.float32)
    s64 = em(X64, init64, 10, family=family)
    s32 = em(X64.float(), init32, 10, family=family)
    # Well-conditioned unit-scale data: float32 rounding (~1e-7) grows mildly over 10 iterations.
    torch.testing.assert_close(s32.means.double(), s64.means, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s32.covariances.double(), s64.covariances, rtol=1e-4, atol=1e-5)


def test_prior_count_keeps_an_abandoned_component_finite_at_the_set_statistics():
    X = _sets(B=1, N=80, seed=8)
    family, init = _gaussian_init("full")
    init["logits"] = torch.tensor([0.0, -200.0], dtype=torch.float64)  # component 1 explains nothing
    state = em(X, init, 4, family=family, prior_count=1e-3)
    assert all(bool(torch.isfinite(v).all()) for v in (state.logits, state.means, state.covariances))
    torch.testing.assert_close(state.means[0, 1], X[0].mean(0), rtol=1e-6, atol=1e-6)
    spread = torch.cov(X[0].T, correction=0)
    torch.testing.assert_close(state.covariances[0, 1], spread, rtol=1e-5, atol=1e-5)


def test_em_layer_learns_its_initial_parameters_and_round_trips_its_state():
    layer = torch_em.EMLayer(2, 2, family=torch_em.Gaussian("full"), n_iter=2, seed=0, dtype=torch.float64)
    X = _sets(seed=9)
    state = layer(X)
    (state.means.sum() + state.log_likelihood.sum()).backward()
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in layer.parameters())
    assert float(layer.initial["loc"].grad.abs().sum()) > 0
    copy = torch_em.EMLayer(2, 2, family=torch_em.Gaussian("full"), n_iter=2, seed=1, dtype=torch.float64)
    copy.load_state_dict(layer.state_dict())
    torch.testing.assert_close(copy(X).means, state.means, rtol=0, atol=0)
    frozen = torch_em.EMLayer(2, 2, n_iter=2, learn_init=False, dtype=torch.float64)
    assert not any(p.requires_grad for p in frozen.parameters())
    last = torch_em.EMLayer(2, 2, n_iter=3, gradient="last", dtype=torch.float64)
    last(X.requires_grad_()).means.sum().backward()
    assert all(p.grad is None for p in last.parameters()) and X.grad is not None


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(n_iter=0), "n_iter"),
        (dict(gradient="backprop"), "gradient"),
        (dict(mask=torch.ones(3, 39, dtype=torch.bool)), "mask must have shape"),
        (dict(mask=torch.zeros(3, 40, dtype=torch.bool)), "at least one point"),
        (dict(mask=torch.full((3, 40), 2.0, dtype=torch.float64)), "weights in"),
        (dict(prior_count=-1.0), "prior_count"),
        (dict(init="drop loc"), "init must hold exactly"),
        (dict(init="bad shape"), "init\\['loc'\\] must have shape"),
        (dict(init="float32"), "dtype and device"),
        (dict(X="nan"), "X must be finite"),
        (dict(X="1d"), "X must have shape"),
        (dict(X="ints"), "floating-point"),
        (dict(family="gaussian"), "ComponentFamily"),
    ],
)
def test_bad_arguments_raise_value_errors(change, message):
    X = _sets()
    family, init = _gaussian_init("full")
    kwargs = dict(n_iter=3, family=family)
    if change.get("init") == "drop loc":
        init.pop("loc")
    elif change.get("init") == "bad shape":
        init["loc"] = torch.zeros(3, 2, dtype=torch.float64)
    elif change.get("init") == "float32":
        init["loc"] = init["loc"].float()
    if change.get("X") == "nan":
        X[1, 3, 0] = math.nan
    elif change.get("X") == "1d":
        X = X[0, :, 0]
    elif change.get("X") == "ints":
        X = X.long()
    kwargs.update({k: v for k, v in change.items() if k not in ("init", "X")})
    with pytest.raises(ValueError, match=message):
        em(X, init, **kwargs)


def _far_from_converged():
    """8 sets of 8 clusters in 8-D, every initial mean at the origin: one iteration is far from a
    fixed point."""
    g = torch.Generator().manual_seed(12)
    centres = 3 * torch.randn(8, 8, 8, generator=g, dtype=torch.float64)
    labels = torch.randint(8, (8, 256), generator=g)
    X = centres.gather(1, labels.unsqueeze(-1).expand(8, 256, 8)) + torch.randn(8, 256, 8, generator=g, dtype=torch.float64)
    init = {"logits": torch.zeros(8, dtype=torch.float64),
            "loc": 0.01 * torch.randn(8, 8, generator=g, dtype=torch.float64),
            "raw_precision_cholesky": torch.zeros(8, 8, dtype=torch.float64)}
    return X.requires_grad_(), init


def test_implicit_gradient_away_from_a_fixed_point_warns_and_the_iterative_solve_raises(monkeypatch):
    X, init = _far_from_converged()
    with pytest.warns(torch_em.ImplicitGradientWarning, match="has not converged"):
        state = em(X, init, 1, family=torch_em.Gaussian("diag"), gradient="implicit", prior_count=1e-2)
    monkeypatch.setattr(torch_em.functional, "DIRECT_SOLVE_PARAMETERS", 0)  # force the adjoint iteration
    with pytest.raises(torch_em.IllConditionedError, match="implicit gradient is not finite"):
        state.means.sum().backward()


def test_direct_and_iterative_implicit_solves_agree_at_convergence(monkeypatch):
    X = _sets(seed=5).requires_grad_()
    family, init = _gaussian_init("full")

    def gradient():
        state = em(X, init, 150, family=family, gradient="implicit", implicit_max_iter=2000)
        return torch.autograd.grad(state.covariances.sum() + state.logits[..., 0].sum(), X)[0]

    direct = gradient()
    monkeypatch.setattr(torch_em.functional, "DIRECT_SOLVE_PARAMETERS", 0)
    torch.testing.assert_close(gradient(), direct, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: torch_em.EMLayer(2, 2, family="gaussian"), "ComponentFamily"),
        (lambda: torch_em.EMLayer(2, 2, learn_init="no"), "learn_init"),
        (lambda: torch_em.EMLayer(2, 2, gradient="exact"), "gradient"),
        (lambda: torch_em.EMLayer(0, 2), "n_components"),
        (lambda: torch_em.EMLayer(2, 2)(torch.randn(3, 10, 3)), "D=2"),
        (lambda: torch_em.reset_optimizer_state("adam", []), "Optimizer"),
        (lambda: torch_em.saved_tensor_bytes(3), "callable"),
    ],
)
def test_layer_and_training_helpers_reject_bad_arguments(make, message):
    with pytest.raises(ValueError, match=message):
        make()
