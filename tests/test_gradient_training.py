"""Mixtures trained by gradients, by EM, or by both: gradcheck of log_prob for every family and
covariance type, optimizer training that reaches the EM solution, parameters owned by EM or by
an optimizer (conditional M-steps, checked against brute force), and a hybrid training loop."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch.func import functional_call

import torch_em

from conftest import COVARIANCE_TYPES, blobs
from test_family_contract import CASES

CONTINUOUS = ("gaussian", "exponential", "gamma")  # X can be perturbed within the domain


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_log_prob_passes_gradcheck_for_parameters_and_inputs(case):
    name, make, sampler = case
    family = make()
    X = sampler(torch.Generator().manual_seed(0), 1, 12)[0]
    model = torch_em.Mixture(family, 3, n_features=X.shape[-1], seed=1, dtype=torch.float64)
    names = [n for n, _ in model.named_parameters()]
    values = tuple(p.detach().clone().requires_grad_() for p in model.parameters())

    def log_prob(*params):
        return functional_call(model, dict(zip(names, params)), (X,))

    assert torch.autograd.gradcheck(log_prob, values)
    if name.startswith(CONTINUOUS):
        assert torch.autograd.gradcheck(lambda x: model.log_prob(x), (X.clone().requires_grad_(),))


def _rough_start(model: torch_em.Mixture, X: torch.Tensor) -> torch_em.Mixture:
    """One point of each cluster (slightly off) as the initial means: a reasonable start that
    gradient descent and EM share."""
    with torch.no_grad():
        model.loc.copy_(X[[0, 250, 500]] + 0.5)
    return model


def _train_by_gradients(model: torch_em.Mixture, X: torch.Tensor, steps: int, lr: float) -> torch_em.Mixture:
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        (-model(X).mean()).backward()
        optimizer.step()
    return model


def _train_by_em(model: torch_em.Mixture, X: torch.Tensor) -> torch_em.Mixture:
    model = copy.deepcopy(model)
    model.warm_start, model.max_iter, model.tol = True, 1000, 1e-12
    return model.fit(X)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_gradient_training_reaches_the_em_solution(covariance_type):
    X = torch.as_tensor(blobs())
    start = _rough_start(torch_em.GaussianMixture(3, n_features=3, covariance_type=covariance_type, seed=3, dtype=torch.float64), X)
    by_em = _train_by_em(start, X)
    by_gradients = _train_by_gradients(copy.deepcopy(start), X, steps=600, lr=0.05)
    # The mean log-likelihood at the EM fixed point is a maximum: Adam gets within 1e-8 of it.
    assert abs(float(by_gradients.score(X)) - float(by_em.score(X))) < 1e-8
    torch.testing.assert_close(by_gradients.means.detach(), by_em.means, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(by_gradients.covariances.detach(), by_em.covariances, rtol=1e-4, atol=1e-5)


def test_gradient_training_reaches_the_em_solution_for_poisson():
    rates = torch.tensor([[1.0, 8.0, 3.0], [9.0, 1.0, 4.0], [4.0, 4.0, 15.0]], dtype=torch.float64)
    g = torch.Generator().manual_seed(4)
    X = torch.poisson(rates[torch.randint(3, (600,), generator=g)], generator=g)
    start = torch_em.Mixture(torch_em.Poisson(), 3, n_features=3, seed=5, dtype=torch.float64)
    with torch.no_grad():
        start.log_rates.copy_((rates + 1).log())
    by_em = _train_by_em(start, X)
    by_gradients = _train_by_gradients(copy.deepcopy(start), X, steps=800, lr=0.05)
    assert abs(float(by_gradients.score(X)) - float(by_em.score(X))) < 1e-7


def _mvn_log_joint(model: torch_em.GaussianMixture, X: torch.Tensor) -> torch.Tensor:
    """log w_k + log N(x | mu_k, Sigma_k) (N, K) by torch.distributions (independent of torch_em's E-step)."""
    covariances = model.covariances.detach()
    if model.covariance_type == "diag":
        covariances = torch.diag_embed(covariances)
    normal = torch.distributions.MultivariateNormal(model.means.detach(), covariance_matrix=covariances)
    return normal.log_prob(X.unsqueeze(-2)) + model.weights.detach().log()


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_em_holds_optimizer_owned_means_and_updates_the_rest_conditionally(covariance_type):
    X = torch.as_tensor(blobs())
    model = _rough_start(torch_em.GaussianMixture(
        3, n_features=3, covariance_type=covariance_type, seed=6, dtype=torch.float64, reg_covar=1e-6,
        em_parameters=("logits", "raw_precision_cholesky"), warm_start=True, max_iter=1,
    ), X)
    means_before = model.means.detach().clone()
    resp = _mvn_log_joint(model, X).softmax(-1)  # (N, K) under the current parameters
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch_em.ConvergenceWarning)
        model.fit(X)
    assert torch.equal(model.means.detach(), means_before)  # held exactly
    counts = resp.sum(0)
    torch.testing.assert_close(model.weights.detach(), counts / len(X), rtol=1e-10, atol=1e-12)
    offsets = X.unsqueeze(1) - means_before  # (N, K, D): spread about the fixed means
    scatter = torch.einsum("nk,nki,nkj->kij", resp, offsets, offsets) / counts[:, None, None]
    expected = scatter if covariance_type == "full" else scatter.diagonal(dim1=-2, dim2=-1)
    expected = expected + 1e-6 * (torch.eye(3, dtype=X.dtype) if covariance_type == "full" else 1)
    torch.testing.assert_close(model.covariances.detach(), expected, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_conditional_em_never_decreases_the_lower_bound(covariance_type):
    X = torch.as_tensor(blobs())
    model = _rough_start(torch_em.GaussianMixture(
        3, n_features=3, covariance_type=covariance_type, seed=7, dtype=torch.float64,
        em_parameters=("logits", "raw_precision_cholesky"), warm_start=True, max_iter=30, tol=1e-12,
    ), X)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch_em.ConvergenceWarning)
        model.fit(X)
    history = model.lower_bound_history_
    assert bool((history[1:] - history[:-1] >= -1e-12).all()) and float(history[-1] - history[0]) > 0


def test_em_parameters_are_validated_before_anything_changes():
    with pytest.raises(ValueError, match="unknown \\['means'\\]"):
        torch_em.GaussianMixture(2, em_parameters=("logits", "means"))
    with pytest.raises(ValueError, match="sequence of parameter names"):
        torch_em.GaussianMixture(2, em_parameters="loc")
    model = torch_em.GaussianMixture(2, n_features=2)
    with pytest.raises(ValueError, match="em_parameters"):
        model.em_parameters = ["log_rates"]
    assert model.em_parameters == ("logits", "loc", "raw_precision_cholesky")
    model.em_parameters = ["loc", "logits"]
    assert model.em_parameters == ("logits", "loc")  # kept in the module's order


def test_partial_fit_holds_the_parameters_em_does_not_own():
    X = torch.as_tensor(blobs())
    model = torch_em.GaussianMixture(3, n_features=3, seed=8, dtype=torch.float64, em_parameters=("loc",))
    held = {name: value.detach().clone() for name, value in model.named_parameters() if name != "loc"}
    for batch in X.split(100):
        model.partial_fit(batch)
    for name, value in held.items():
        assert torch.equal(getattr(model, name).detach(), value), name


def test_optimizer_keeps_working_on_the_same_parameters_after_em_overwrites_them():
    X = torch.as_tensor(blobs())
    model = torch_em.GaussianMixture(3, n_features=3, seed=9, dtype=torch.float64)
    before = {name: id(p) for name, p in model.named_parameters()}
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    (-model(X).mean()).backward()
    optimizer.step()
    assert len(optimizer.state) == 3
    model.fit(X)  # EM writes in place
    assert {name: id(p) for name, p in model.named_parameters()} == before
    fitted = model.means.detach().clone()
    torch_em.reset_optimizer_state(optimizer, model.parameters())
    assert len(optimizer.state) == 0
    optimizer.zero_grad()
    (-model(X).mean()).backward()
    optimizer.step()
    # A fresh Adam step moves every coordinate by about lr (no stale moments).
    step = (model.means.detach() - fitted).abs()
    assert float(step.max()) <= 0.0101 and float(step.max()) > 0


class LinearFlow(torch.nn.Module):
    """z = W x + b with log|det W|: with a mixture on z this is a density on x (no collapse)."""

    def __init__(self, n_features: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.eye(n_features, dtype=torch.float64) + 0.3)
        self.bias = torch.nn.Parameter(torch.zeros(n_features, dtype=torch.float64))

    def forward(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return X @ self.weight.T + self.bias, torch.linalg.slogdet(self.weight)[1]


def test_hybrid_loop_encoder_and_means_by_gradients_the_rest_by_em():
    X = torch.as_tensor(blobs())
    flow = LinearFlow(3)
    head = torch_em.GaussianMixture(
        3, n_features=3, covariance_type="full", seed=10, dtype=torch.float64,
        em_parameters=("logits", "raw_precision_cholesky"), warm_start=True, max_iter=1,
    )
    with torch.no_grad():
        head.loc.copy_(flow(X[[0, 250, 500]])[0])
    for name in head.em_parameters:
        getattr(head, name).requires_grad_(False)  # EM owns them: the optimizer must leave them alone
    optimizer = torch.optim.Adam([*flow.parameters(), head.loc], lr=0.02)
    start = {name: p.detach().clone() for name, p in [*flow.named_parameters(), ("loc", head.loc)]}
    losses = []
    for step in range(40):
        optimizer.zero_grad()
        z, log_det = flow(X)
        loss = -(head(z) + log_det).mean()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        z = flow(X)[0].detach()
        resp = _mvn_log_joint(head, z).softmax(-1)  # reference E-step for this EM update
        means = head.means.detach().clone()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch_em.ConvergenceWarning)
            head.fit(z)
        if step in (0, 39):  # EM's parameters are exactly the conditional M-step of these statistics
            counts = resp.sum(0)
            offsets = z.unsqueeze(1) - means
            scatter = torch.einsum("nk,nki,nkj->kij", resp, offsets, offsets) / counts[:, None, None]
            torch.testing.assert_close(head.weights.detach(), counts / len(z), rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(head.covariances.detach(), scatter + 1e-6 * torch.eye(3, dtype=z.dtype), rtol=1e-8, atol=1e-10)
            assert torch.equal(head.means.detach(), means)
    assert losses[-1] < losses[0] - 0.1, (losses[0], losses[-1])
    for name, p in [*flow.named_parameters(), ("loc", head.loc)]:
        assert float((p.detach() - start[name]).abs().max()) > 1e-3, name  # the optimizer moved it
