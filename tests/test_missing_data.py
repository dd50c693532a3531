"""Missing data (NaN) marginalised by exact EM (``missing="marginalize"``), and imputation.

References: torch.distributions on the observed coordinates, brute-force conditional moments,
direct numerical maximisation of the observed-data likelihood, the ordinary complete-data path.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import torch_em
from torch_em import em
from torch_em.data import Chunk, Data
from torch_em.families import gaussian_missing, gaussian_missing_precision
from torch_em.missing import MissingRows

from conftest import COVARIANCE_TYPES, blobs

F64 = torch.float64


def with_missing(X: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """X with entries removed completely at random (every row keeps one)."""
    rng = np.random.default_rng(seed)
    holes = rng.random(X.shape) < fraction
    holes[holes.all(1), rng.integers(X.shape[1])] = False
    holes[holes.all(1), 0] = False
    out = X.copy()
    out[holes] = np.nan
    return out


def quiet_fit(model, X, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch_em.ConvergenceWarning)
        return model.fit(X, **kwargs)


def dense_covariance(family, theta) -> torch.Tensor:
    """(…, K, D, D) covariances of any covariance type."""
    cov = family.covariance(theta)
    K, D = theta["loc"].shape[-2:]
    if family.covariance_type == "tied":
        return cov.unsqueeze(-3).expand(*cov.shape[:-2], K, D, D)
    if family.covariance_type == "diag":
        return torch.diag_embed(cov)
    if family.covariance_type == "spherical":
        return cov[..., None, None] * torch.eye(D, dtype=cov.dtype)
    return cov


def random_theta(covariance_type: str, batch: tuple[int, ...], K: int, D: int, seed: int = 1) -> dict:
    family = torch_em.families.Gaussian(covariance_type)
    generator = torch.Generator().manual_seed(seed)
    theta = family.default_parameters(batch, K, D, generator, "cpu", F64)
    raw = theta["raw_precision_cholesky"]
    theta["raw_precision_cholesky"] = raw + 0.4 * torch.randn(raw.shape, generator=generator, dtype=F64)
    return family, theta


@pytest.fixture(params=["by pattern", "by precision"])
def gaussian_path(request, monkeypatch):
    """Full and tied Gaussian components on rows with missing entries through either path: one
    D x D factorisation per pattern, or the q x q missing block of the precision matrix."""
    rows_per_pattern = 0.0 if request.param == "by pattern" else math.inf
    monkeypatch.setattr(gaussian_missing_precision, "ROWS_PER_PATTERN_PER_FEATURE", rows_per_pattern)
    return request.param


# --- the marginal densities and statistics against references ----------------------------------
@pytest.mark.parametrize("expanded", [False, True], ids=["direct", "expanded"])
@pytest.mark.parametrize("per_model", [False, True], ids=["shared", "per-model"])
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_marginal_density_and_statistics_equal_the_conditional_gaussian(covariance_type, per_model, expanded, gaussian_path):
    K, D, n = 3, 4, 40
    family, theta = random_theta(covariance_type, (1, 2), K, D)
    rng = np.random.default_rng(3)
    X = torch.as_tensor(with_missing(rng.normal(size=(2 if per_model else 1, n, D)).reshape(-1, D), 0.35))
    X = X.view(2, n, D) if per_model else X
    resp = torch.rand(1, 2, K, n, dtype=F64, generator=torch.Generator().manual_seed(0))
    about = torch.randn(1, 2, K, D, dtype=F64, generator=torch.Generator().manual_seed(1))
    reference = None
    if expanded:  # about the shared reference point of a fit, as the E-step passes it
        reference = torch.tensor([[0.3, -0.2, 0.1, 0.5]], dtype=F64)
        reference = torch.stack([reference, -reference]) if per_model else reference  # (2, 1, D) or (1, D)
        about = reference.expand(1, 2, K, D) if not per_model else reference.unsqueeze(0).expand(1, 2, K, D)
    marginal = family.marginal(MissingRows.of(X), theta, reference)
    sums = marginal.statistics(resp, about)
    covariance = dense_covariance(family, theta)
    rows, cols = torch.triu_indices(D, D)
    expected = torch.zeros_like(sums)
    for m in range(2):
        data = X[m] if per_model else X
        for k in range(K):
            mu, sigma = theta["loc"][0, m, k], covariance[0, m, k]
            for i in range(n):
                o = ~torch.isnan(data[i])
                reference = torch.distributions.MultivariateNormal(mu[o], sigma[o][:, o]).log_prob(data[i][o])
                torch.testing.assert_close(marginal.log_prob[0, m, k, i], reference, rtol=0, atol=1e-12)
                gain = sigma[~o][:, o] @ torch.linalg.inv(sigma[o][:, o])
                completed = data[i].clone()
                completed[~o] = mu[~o] + gain @ (data[i][o] - mu[o])
                second = torch.zeros(D, D, dtype=F64)
                second[torch.where(~o)[0][:, None], torch.where(~o)[0]] = sigma[~o][:, ~o] - gain @ sigma[o][:, ~o]
                y = completed - about[0, m, k]
                second = second + torch.outer(y, y)
                packed = {"full": second[rows, cols], "tied": second[rows, cols], "diag": second.diagonal(),
                          "spherical": second.diagonal().sum(-1, keepdim=True)}[covariance_type]
                expected[0, m, k] += resp[0, m, k, i] * torch.cat([y, packed])
    torch.testing.assert_close(sums, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_score_samples_are_the_mixture_of_the_observed_coordinates(covariance_type, gaussian_path):
    X = with_missing(blobs(60), 0.3, seed=1)
    model = quiet_fit(torch_em.GaussianMixture(3, covariance_type=covariance_type, missing="marginalize", seed=0,
                                               dtype=F64, max_iter=20), X)
    covariance = dense_covariance(model.family, model.theta())
    data = torch.as_tensor(X)
    expected = []
    for x in data:
        o = ~torch.isnan(x)
        component = torch.distributions.MultivariateNormal(model.means[:, o], covariance[:, o][:, :, o])
        expected.append(torch.logsumexp(component.log_prob(x[o]) + model.weights.log(), 0))
    expected = torch.stack(expected).detach()
    torch.testing.assert_close(model.score_samples(X), expected, rtol=0, atol=1e-10)
    assert model.score(X).item() == pytest.approx(expected.mean().item(), abs=1e-10)
    log_joint = model.log_joint(X).detach()
    torch.testing.assert_close(model.predict_proba(X), (log_joint - expected[:, None]).exp(), rtol=0, atol=1e-10)
    torch.testing.assert_close(model.predict(X), log_joint.argmax(-1))


def test_a_complete_row_scores_as_without_missing_rows_beside_it():
    X = with_missing(blobs(40), 0.3, seed=2)
    model = quiet_fit(torch_em.GaussianMixture(3, missing="marginalize", seed=0, dtype=F64, max_iter=10), X)
    complete = ~np.isnan(X).any(1)
    # to rounding (as tests/test_row_independence.py): a GEMM over another number of rows may round
    # its last bit differently
    torch.testing.assert_close(model.score_samples(X)[complete], model.score_samples(X[complete]), rtol=1e-12, atol=1e-12)


# --- the missing-data path without missing values equals the ordinary one ----------------------
class AllRowsMarginal(Data):
    """Data whose every chunk takes the missing-data path (no entry is missing)."""

    def chunks(self):
        for chunk in super().chunks():
            yield Chunk(chunk.X, None, None, chunk.weights, missing=MissingRows.of(chunk.X))


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_the_missing_data_path_without_missing_values_equals_the_ordinary_fit(covariance_type):
    X = torch.as_tensor(blobs(50))
    model = torch_em.GaussianMixture(3, covariance_type=covariance_type, seed=0, dtype=F64)
    model.initialize(X)
    params = model._working_parameters().map(lambda value: value.detach().clone())
    family, latent = model.family, model.latent
    reference = X.mean(0, keepdim=True)
    results = []
    for kind in (Data, AllRowsMarginal):
        data = kind(family, X, reference, chunk_size=64)
        results.append(em.run_em(em.EMMap(latent, family, data), params, max_iter=30, tol=0.0))
    ordinary, marginal = results
    torch.testing.assert_close(marginal.history, ordinary.history, rtol=0, atol=1e-10)
    for name, value in ordinary.params.emission.items():
        torch.testing.assert_close(marginal.params.emission[name], value, rtol=0, atol=1e-10)


def test_missing_marginalize_on_complete_data_fits_as_the_default():
    X = blobs(50)
    default = torch_em.GaussianMixture(3, seed=0, dtype=F64).fit(X)
    marginal = torch_em.GaussianMixture(3, seed=0, dtype=F64, missing="marginalize").fit(X)
    for key, value in default.state_dict().items():
        torch.testing.assert_close(marginal.state_dict()[key], value, rtol=0, atol=0)


# --- EM on incomplete data ---------------------------------------------------------------------
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_the_observed_data_log_likelihood_never_decreases(covariance_type, gaussian_path):
    X = with_missing(blobs(80), 0.4, seed=3)
    model = quiet_fit(torch_em.GaussianMixture(3, covariance_type=covariance_type, missing="marginalize",
                                               init_params="random", seed=1, dtype=F64, tol=0.0, max_iter=40), X)
    history = model.lower_bound_history_
    assert history.shape[-1] == 40
    assert bool((history.diff() >= -1e-12).all()), history.diff().min()
    assert model.score(X).item() >= history[-1].item() - 1e-12  # the update after the last bound


def observed_log_likelihood(X: torch.Tensor, logits, loc, raw) -> torch.Tensor:
    """Total observed-data log-likelihood of a full-covariance mixture, from unconstrained
    parameters (rows grouped by pattern, torch.distributions on the observed coordinates)."""
    upper = torch.triu(raw, 1) + torch.diag_embed(raw.diagonal(dim1=-2, dim2=-1).exp())
    precision = upper @ upper.mT
    covariance = torch.linalg.inv(precision)
    log_weights = logits.log_softmax(-1)
    total = 0.0
    for x in X:
        o = ~torch.isnan(x)
        component = torch.distributions.MultivariateNormal(loc[:, o], covariance[:, o][:, :, o])
        total = total + torch.logsumexp(component.log_prob(x[o]) + log_weights, 0)
    return total


def test_em_reaches_a_maximum_of_the_observed_data_likelihood(gaussian_path):
    X = with_missing(blobs(12, centres=((0.0, 0.0, 0.0), (4.0, 4.0, 0.0))), 0.3, seed=4)
    model = quiet_fit(torch_em.GaussianMixture(2, missing="marginalize", seed=0, dtype=F64, tol=1e-14,
                                               max_iter=5000, reg_covar=0.0), X)
    data = torch.as_tensor(X)
    start = [model.logits.detach(), model.loc.detach(), model.raw_precision_cholesky.detach().triu()]
    variables = [value.clone().requires_grad_(True) for value in start]
    best = observed_log_likelihood(data, *variables)
    assert best.item() / len(X) == pytest.approx(model.score(X).item(), abs=1e-10)
    gradients = torch.autograd.grad(best, variables)
    assert max(float(g.abs().max()) for g in gradients) < 1e-5  # a stationary point
    optimizer = torch.optim.LBFGS(variables, max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = -observed_log_likelihood(data, *variables)
        loss.backward()
        return loss

    optimizer.step(closure)
    improved = observed_log_likelihood(data, *variables).item()
    assert improved <= best.item() + 1e-8  # the optimiser does not beat EM's maximum


def matched_means(model, reference) -> torch.Tensor:
    """The model's means in the order of the reference model's nearest ones."""
    distance = torch.cdist(reference.means.detach(), model.means.detach())
    return model.means.detach()[distance.argmin(-1)]


def test_parameters_approach_the_complete_data_fit_as_the_missing_fraction_shrinks():
    X = blobs(300)
    complete = torch_em.GaussianMixture(3, seed=0, dtype=F64, tol=1e-8).fit(X)
    errors = []
    for fraction in (0.3, 0.1, 0.02, 0.005):
        model = quiet_fit(torch_em.GaussianMixture(3, missing="marginalize", dtype=F64, tol=1e-8,
                                                   means_init=complete.means.detach().numpy()),
                          with_missing(X, fraction, seed=5))
        errors.append(float((matched_means(model, complete) - complete.means.detach()).abs().max()))
    assert errors == sorted(errors, reverse=True), errors
    assert errors[-1] < 0.02 and errors[0] > 2 * errors[-1]


def correlated_data(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = np.array([[1.0, 0.9, 0.8, 0.0], [0.0, 0.4, 0.3, 0.5], [0.0, 0.0, 0.3, 0.6], [0.0, 0.0, 0.0, 0.4]])
    centres = np.array([[0.0, 0.0, 0.0, 0.0], [3.0, -2.0, 1.0, 2.0]])
    return np.concatenate([rng.normal(size=(n, 4)) @ mixing + c for c in centres])


def test_conditional_imputation_beats_mean_imputation(gaussian_path):
    truth = correlated_data(400, seed=6)
    X = with_missing(truth, 0.25, seed=7)
    holes = np.isnan(X)
    model = quiet_fit(torch_em.GaussianMixture(2, missing="marginalize", seed=0, dtype=F64), X)
    imputed = model.impute(X).numpy()
    np.testing.assert_array_equal(imputed[~holes], X[~holes])
    mean_filled = np.where(holes, np.nanmean(X, 0), X)
    error = np.sqrt(np.mean((imputed - truth)[holes] ** 2))
    mean_error = np.sqrt(np.mean((mean_filled - truth)[holes] ** 2))
    assert error < 0.6 * mean_error, (error, mean_error)


def test_impute_mixes_the_components_conditional_means(gaussian_path):
    X = with_missing(correlated_data(100, seed=8), 0.3, seed=9)
    model = quiet_fit(torch_em.GaussianMixture(2, missing="marginalize", seed=0, dtype=F64), X)
    covariance, data = model.covariances.detach(), torch.as_tensor(X)
    posterior = model.predict_proba(X)
    for i in range(0, 200, 17):
        x = data[i]
        o = ~torch.isnan(x)
        expected = x.clone()
        if bool(o.all()):
            continue
        conditional = [model.means[k, ~o] + covariance[k][~o][:, o] @ torch.linalg.solve(
            covariance[k][o][:, o], x[o] - model.means[k, o]) for k in range(2)]
        expected[~o] = sum(posterior[i, k] * conditional[k] for k in range(2)).detach()
        torch.testing.assert_close(model.impute(X)[i], expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_multiple_imputation_draws_from_the_conditional_distribution(covariance_type, gaussian_path):
    model = torch_em.GaussianMixture(1, 3, covariance_type=covariance_type, dtype=F64, seed=0)
    covariance = torch.tensor([[2.0, 0.8, 0.3], [0.8, 1.0, 0.2], [0.3, 0.2, 0.5]], dtype=F64)
    if covariance_type == "diag":
        covariance = torch.diag_embed(covariance.diagonal())
    with torch.no_grad():
        model.loc.copy_(torch.tensor([[1.0, -1.0, 2.0]]))
        precision = torch.linalg.inv(covariance)
        model.raw_precision_cholesky.copy_(
            torch_em.families.gaussian.pack_raw_triangular(torch_em.families.gaussian.upper_cholesky_from_precision(
                precision)[0]) if covariance_type == "full" else 0.5 * precision.diagonal().log().unsqueeze(0))
    X = np.array([[0.5, np.nan, np.nan], [np.nan, 0.0, 2.5]])
    draws = model.impute(X, n_draws=20000, seed=3)
    assert draws.shape == (20000, 2, 3)
    assert torch.equal(draws, model.impute(X, n_draws=20000, seed=3))
    torch.testing.assert_close(draws[:, 0, 0], torch.full((20000,), 0.5, dtype=F64), rtol=0, atol=0)
    o = torch.tensor([True, False, False])
    gain = covariance[~o][:, o] @ torch.linalg.inv(covariance[o][:, o])
    mean = model.means[0, ~o].detach() + gain @ (torch.tensor([0.5], dtype=F64) - model.means[0, o].detach())
    conditional = covariance[~o][:, ~o] - gain @ covariance[o][:, ~o]
    sample = draws[:, 0, 1:]
    torch.testing.assert_close(sample.mean(0), mean, rtol=0, atol=0.04)
    torch.testing.assert_close(sample.T.cov(), conditional, rtol=0, atol=0.05)
    torch.testing.assert_close(sample.mean(0), model.impute(X)[0, 1:], rtol=0, atol=0.04)


# --- training modes ------------------------------------------------------------------------------
@pytest.mark.parametrize("covariance_type", ["full", "tied"])
def test_rows_with_their_own_patterns_take_the_precision_path_and_fit_as_the_pattern_path(covariance_type, monkeypatch):
    X = with_missing(np.random.default_rng(4).normal(size=(150, 12)) + np.repeat(3.0 * np.eye(3, 12), 50, 0), 0.3, seed=5)
    rows = MissingRows.of(torch.as_tensor(X))
    assert rows.patterns.shape[0] > 100  # almost every row its own pattern
    family, theta = random_theta(covariance_type, (1, 1), 3, 12)
    assert isinstance(family.marginal(rows, theta), gaussian_missing_precision.PrecisionGaussianMarginal)
    kwargs = dict(covariance_type=covariance_type, missing="marginalize", seed=0, dtype=F64, tol=0.0, max_iter=10)
    automatic = quiet_fit(torch_em.GaussianMixture(3, **kwargs), X)
    monkeypatch.setattr(gaussian_missing_precision, "ROWS_PER_PATTERN_PER_FEATURE", 0.0)
    assert not isinstance(family.marginal(rows, theta), gaussian_missing_precision.PrecisionGaussianMarginal)
    by_pattern = quiet_fit(torch_em.GaussianMixture(3, **kwargs), X)
    torch.testing.assert_close(automatic.lower_bound_history_, by_pattern.lower_bound_history_, rtol=0, atol=1e-10)
    for key, value in by_pattern.state_dict().items():
        torch.testing.assert_close(automatic.state_dict()[key], value, rtol=0, atol=1e-8)


def test_chunked_and_streamed_fits_equal_the_full_batch_fit(gaussian_path):
    X = with_missing(blobs(100), 0.3, seed=10)
    kwargs = dict(missing="marginalize", seed=0, dtype=F64, tol=0.0, max_iter=15)
    whole = quiet_fit(torch_em.GaussianMixture(3, **kwargs), X)
    chunked = quiet_fit(torch_em.GaussianMixture(3, chunk_size=37, **kwargs), X)
    data = torch.as_tensor(X)
    streamed = quiet_fit(torch_em.GaussianMixture(3, chunk_size=37, **kwargs), lambda: iter(data.split(50)))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=64)
    loaded = quiet_fit(torch_em.GaussianMixture(3, **kwargs), loader)
    for other in (chunked, streamed, loaded):
        torch.testing.assert_close(other.lower_bound_history_, whole.lower_bound_history_, rtol=0, atol=1e-10)
        for key, value in whole.state_dict().items():
            torch.testing.assert_close(other.state_dict()[key], value, rtol=0, atol=1e-9)


def test_a_batch_of_models_equals_the_models_fitted_alone(gaussian_path):
    datasets = [with_missing(blobs(60, seed=s), 0.3, seed=s) for s in range(3)]
    kwargs = dict(missing="marginalize", seed=0, dtype=F64, tol=0.0, max_iter=12)
    starts = np.stack([np.nan_to_num(X[[0, 70, 140]]) for X in datasets])  # (3, K, D)
    batched = quiet_fit(torch_em.GaussianMixture(3, batch_shape=(3,), means_init=starts, **kwargs), np.stack(datasets))
    for m, X in enumerate(datasets):
        alone = quiet_fit(torch_em.GaussianMixture(3, means_init=starts[m], **kwargs), X)
        torch.testing.assert_close(batched.lower_bound_history_[m], alone.lower_bound_history_, rtol=0, atol=1e-9)
        torch.testing.assert_close(batched.means[m], alone.means, rtol=0, atol=1e-8)
    shared = quiet_fit(torch_em.GaussianMixture(3, batch_shape=(2,), n_init=2, **kwargs), datasets[0])
    alone = quiet_fit(torch_em.GaussianMixture(3, n_init=2, **kwargs), datasets[0])
    torch.testing.assert_close(shared.means[0], alone.means, rtol=0, atol=1e-8)
    torch.testing.assert_close(shared.score_samples(datasets[0])[0], alone.score_samples(datasets[0]), rtol=0, atol=1e-9)


def test_partial_fit_on_batches_with_missing_entries():
    X = with_missing(np.random.default_rng(0).permutation(blobs(200)), 0.3, seed=11)
    model = torch_em.GaussianMixture(3, missing="marginalize", seed=0, dtype=F64)
    scores = []
    for _ in range(3):
        for batch in np.array_split(X, 6):
            model.partial_fit(batch)
            scores.append(model.score(X).item())
    assert all(math.isfinite(s) for s in scores) and scores[-1] > scores[0]
    assert torch.isfinite(model.stream_shift).all() and torch.isfinite(model.stream_sums).all()
    # With learning_decay=0 every batch replaces the running statistics: whole-data steps are EM's.
    online = torch_em.GaussianMixture(3, missing="marginalize", seed=0, dtype=F64, learning_decay=0.0)
    for _ in range(8):
        online.partial_fit(X)
    fitted = quiet_fit(torch_em.GaussianMixture(3, missing="marginalize", seed=0, dtype=F64, tol=0.0, max_iter=8), X)
    for name in ("logits", "loc", "raw_precision_cholesky"):
        torch.testing.assert_close(getattr(online, name), getattr(fitted, name), rtol=0, atol=1e-9)


def test_float32_fit_follows_the_float64_fit(gaussian_path):
    X = with_missing(blobs(200), 0.3, seed=12)
    kwargs = dict(missing="marginalize", seed=0, tol=0.0, max_iter=20)
    double = quiet_fit(torch_em.GaussianMixture(3, dtype=F64, **kwargs), X)
    single = quiet_fit(torch_em.GaussianMixture(3, dtype=torch.float32, **kwargs), X.astype(np.float32))
    torch.testing.assert_close(single.means.double(), double.means, rtol=0, atol=1e-3)
    torch.testing.assert_close(single.lower_bound_.double(), double.lower_bound_, rtol=0, atol=1e-5)


# --- bad input -------------------------------------------------------------------------------------
def state(model) -> dict:
    return {key: value.clone() for key, value in model.state_dict().items()}


def test_nan_without_the_option_is_rejected_naming_it():
    X = with_missing(blobs(30), 0.2)
    model = torch_em.GaussianMixture(3)
    with pytest.raises(ValueError, match=r"X must be finite, got \d+ NaN value\(s\); .*missing='marginalize'"):
        model.fit(X)
    with pytest.raises(ValueError, match="missing must be one of"):
        torch_em.GaussianMixture(3, missing="impute")


@pytest.mark.parametrize("bad, message", [
    (lambda X: np.vstack([X, np.full((1, 3), np.nan)]), r"1 row\(s\) with nothing observed .*index 201"),
    (lambda X: np.vstack([X, [[np.inf, 0.0, np.nan]]]), r"X must be finite \(or NaN for a missing entry\), got \d+ NaN and 1 infinite"),
])
def test_rejected_calls_change_nothing(bad, message):
    X = with_missing(blobs(30), 0.2)
    model = quiet_fit(torch_em.GaussianMixture(3, missing="marginalize", seed=0, dtype=F64, max_iter=5), X)
    before = state(model)
    for call in (model.fit, model.partial_fit, model.score_samples, model.impute):
        with pytest.raises(ValueError, match=message):
            call(bad(X))
    for key, value in before.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_families_that_cannot_marginalise_say_so():
    X = np.abs(with_missing(blobs(30), 0.2))
    vmf = torch_em.Mixture(torch_em.families.VonMisesFisher(), 2, missing="marginalize")
    with pytest.raises(ValueError, match="cannot be missing alone"):
        vmf.fit(X / np.linalg.norm(np.nan_to_num(X), axis=1, keepdims=True))


def test_the_gradient_of_log_prob_with_missing_entries_is_finite_for_every_family():
    """Gamma components' log-density is -inf at 0: the rows with missing entries must not be
    evaluated there by the complete rows' path (its values are discarded, its gradient is not)."""
    rng = np.random.default_rng(17)
    X = with_missing(rng.gamma(2.0, 1.0, (60, 3)), 0.25, seed=17)
    for model in (torch_em.Mixture(torch_em.families.Gamma(), 2, missing="marginalize", seed=0, dtype=F64, max_iter=5),
                  torch_em.HMM(2, torch_em.families.Gamma(), missing="marginalize", seed=0, dtype=F64, max_iter=5)):
        data = X if isinstance(model, torch_em.Mixture) else X[None]
        quiet_fit(model, data)
        model.log_prob(data).sum().backward()
        assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters()), type(model).__name__


# --- families with independent features -------------------------------------------------------------
def independent_case(name: str, K: int, D: int, n: int):
    """A family, working parameters (1, 2, K, ...), data (n, D) in its support, and the
    per-coordinate torch.distributions of component (m, k)."""
    g = torch.Generator().manual_seed(5)
    families = torch_em.families
    if name == "bernoulli":
        family, theta = families.Bernoulli(), {"logit_probs": torch.randn(1, 2, K, D, generator=g, dtype=F64)}
        X = (torch.rand(n, D, generator=g) < 0.4).to(F64)
        dist = lambda m, k: torch.distributions.Bernoulli(logits=theta["logit_probs"][0, m, k])  # noqa: E731
    elif name == "categorical":
        family = families.Categorical(3)
        theta = {"logit_categories": torch.randn(1, 2, K, D, 3, generator=g, dtype=F64)}
        X = torch.randint(3, (n, D), generator=g).to(F64)
        dist = lambda m, k: torch.distributions.Categorical(logits=theta["logit_categories"][0, m, k])  # noqa: E731
    elif name == "poisson":
        family, theta = families.Poisson(), {"log_rates": torch.randn(1, 2, K, D, generator=g, dtype=F64)}
        X = torch.poisson(torch.full((n, D), 2.0), generator=g).to(F64)
        dist = lambda m, k: torch.distributions.Poisson(theta["log_rates"][0, m, k].exp())  # noqa: E731
    elif name == "exponential":
        family, theta = families.Exponential(), {"log_rates": torch.randn(1, 2, K, D, generator=g, dtype=F64)}
        X = torch.rand(n, D, generator=g, dtype=F64) * 3 + 0.01
        dist = lambda m, k: torch.distributions.Exponential(theta["log_rates"][0, m, k].exp())  # noqa: E731
    else:
        family = families.Gamma()
        theta = {"log_shapes": torch.randn(1, 2, K, D, generator=g, dtype=F64),
                 "log_rates": torch.randn(1, 2, K, D, generator=g, dtype=F64)}
        X = torch.rand(n, D, generator=g, dtype=F64) * 3 + 0.01
        dist = lambda m, k: torch.distributions.Gamma(theta["log_shapes"][0, m, k].exp(),  # noqa: E731
                                                      theta["log_rates"][0, m, k].exp())
    return family, theta, X, dist


@pytest.mark.parametrize("name", ["bernoulli", "categorical", "poisson", "exponential", "gamma"])
def test_independent_families_marginalise_missing_coordinates(name):
    K, D, n = 3, 4, 30
    family, theta, complete, dist = independent_case(name, K, D, n)
    X = torch.as_tensor(with_missing(complete.numpy(), 0.35, seed=13))
    marginal = family.marginal(MissingRows.of(X), theta)
    resp = torch.rand(1, 2, K, n, dtype=F64, generator=torch.Generator().manual_seed(0))
    expected_sums = torch.zeros(1, 2, K, family.n_statistics(D), dtype=F64)
    expected_features = family.expected_features(theta)
    for m in range(2):
        for k in range(K):
            component = dist(m, k)
            for i in range(n):
                o = ~torch.isnan(X[i])
                reference = component.log_prob(X[i].nan_to_num(0.0 if name != "gamma" else 1.0))[o].sum()
                torch.testing.assert_close(marginal.log_prob[0, m, k, i], reference, rtol=0, atol=1e-10)
                features = family.features(X[i].nan_to_num(0.0 if name != "gamma" else 1.0)[None], None)[0][0]
                columns = family.coordinate_of_statistics(D)
                row = torch.where(o[columns], features, expected_features[0, m, k])
                expected_sums[0, m, k] += resp[0, m, k, i] * row
    torch.testing.assert_close(marginal.statistics(resp, None), expected_sums, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["bernoulli", "categorical", "poisson", "exponential", "gamma"])
def test_independent_families_fit_and_impute_with_missing_entries(name):
    family, _, complete, _ = independent_case(name, 2, 5, 300)
    X = with_missing(complete.numpy(), 0.3, seed=14)
    model = quiet_fit(torch_em.Mixture(family, 2, missing="marginalize", seed=0, dtype=F64, tol=0.0, max_iter=15), X)
    assert bool((model.lower_bound_history_.diff() >= -1e-12).all())
    imputed = model.impute(X).numpy()
    holes = np.isnan(X)
    np.testing.assert_array_equal(imputed[~holes], X[~holes])
    assert np.isfinite(imputed).all()
    if name == "categorical":  # the most probable category; elsewhere the conditional expectation
        family.check_domain(torch.as_tensor(imputed), "imputed")
    draws = model.impute(X, n_draws=2, seed=0)
    assert draws.shape == (2, *X.shape)
    family.check_domain(draws.flatten(0, 1), "draws")  # draws lie in the support
    torch.testing.assert_close(draws[:, ~torch.as_tensor(holes)], torch.as_tensor(X[~holes]).expand(2, -1),
                               rtol=0, atol=0)


def test_a_product_marginalises_each_block():
    rng = np.random.default_rng(15)
    labels = rng.integers(2, size=300)
    gaussian = rng.normal(size=(300, 2)) + 3 * labels[:, None]
    counts = rng.poisson(1 + 4 * labels[:, None], size=(300, 2)).astype(float)
    X = with_missing(np.concatenate([gaussian[:, :1], counts, gaussian[:, 1:]], 1), 0.3, seed=16)
    family = torch_em.families.Product([(torch_em.families.Gaussian("full"), [0, 3]),
                                        (torch_em.families.Poisson(), [1, 2])])
    model = quiet_fit(torch_em.Mixture(family, 2, missing="marginalize", seed=0, dtype=F64, tol=0.0, max_iter=15), X)
    assert bool((model.lower_bound_history_.diff() >= -1e-12).all())
    theta = {name: value.detach() for name, value in model.theta().items()}
    covariance = family.blocks[0].family.covariance({"raw_precision_cholesky": theta["block0_raw_precision_cholesky"]})
    data = torch.as_tensor(X)
    expected = []
    for x in data:
        o = ~torch.isnan(x)
        total = model.weights.detach().log()
        og, op = o[[0, 3]], o[[1, 2]]
        if bool(og.any()):
            total = total + torch.distributions.MultivariateNormal(
                theta["block0_loc"][:, og], covariance[:, og][:, :, og]).log_prob(x[[0, 3]][og])
        rates = theta["block1_log_rates"].exp()
        total = total + torch.distributions.Poisson(rates).log_prob(x[[1, 2]].nan_to_num(0.0)).mul(op).sum(-1)
        expected.append(torch.logsumexp(total, 0))
    torch.testing.assert_close(model.score_samples(X), torch.stack(expected), rtol=0, atol=1e-10)
    imputed = model.impute(X)
    assert torch.isfinite(imputed).all() and model.impute(X, n_draws=3, seed=0).shape == (3, *X.shape)


@pytest.mark.parametrize("mode", ["fit", "stream"])
def test_two_ranks_with_half_the_incomplete_data_equal_one_process(tmp_path, mode):
    distributed = pytest.importorskip("test_distributed")
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("no gloo backend")
    X = distributed.shuffled_blobs(seed=0)
    X = torch.as_tensor(with_missing(X.numpy(), 0.3, seed=17))
    kwargs = dict(dtype=F64, tol=1e-9, max_iter=50, missing="marginalize",
                  **distributed.start_values(X.nan_to_num(0.0)))
    states = distributed.distributed_state(tmp_path, X, kwargs, mode)
    single = torch_em.GaussianMixture(3, **kwargs)
    distributed.run(single, X, "fit")
    distributed.assert_every_rank_equals(states, single)


def test_float32_components_far_from_the_reference_take_their_own_in_a_fit_with_missing_entries():
    # Two tight clusters 2,000 apart: the expansion about the data mean would cancel in float32, so
    # the E-step takes those components about their own means (the direct path for missing rows).
    rng = np.random.default_rng(18)
    X = np.concatenate([rng.normal(size=(300, 3)) * [1.0, 0.5, 0.2], 2000 + rng.normal(size=(300, 3))])
    X = with_missing(X, 0.3, seed=19)
    start = dict(means_init=np.array([[0.0, 0.0, 0.0], [2000.0, 2000.0, 2000.0]]), missing="marginalize",
                 tol=0.0, max_iter=80)
    double = quiet_fit(torch_em.GaussianMixture(2, dtype=F64, **start), X)
    single = quiet_fit(torch_em.GaussianMixture(2, dtype=torch.float32, **start), X.astype(np.float32))
    theta = {name: value.detach() for name, value in single.theta().items()}
    assert em.OwnReference.of(single.family, {k: v[None, None] for k, v in theta.items()}, None,
                              torch.tensor([[1000.0, 1000.0, 1000.0]])) is not None  # the own path is taken
    torch.testing.assert_close(single.means.double(), double.means, rtol=0, atol=1e-3)
    torch.testing.assert_close(single.covariances.double(), double.covariances, rtol=2e-3, atol=1e-4)
    torch.testing.assert_close(single.lower_bound_.double(), double.lower_bound_, rtol=0, atol=1e-5)


def test_float32_pattern_blocks_that_fail_to_factorise_are_factorised_in_float64():
    # The 9 x 9 Hilbert matrix rounded to float32 is positive definite, but float32's Cholesky
    # fails on it (condition number ~5e11) while float64's succeeds on the same values: the
    # conditionals of a float32 model are then float64's, rounded (not NaN).
    n = 9
    hilbert = torch.tensor([[1.0 / (i + j + 1) for j in range(n)] for i in range(n)], dtype=torch.float32)
    assert int(torch.linalg.cholesky_ex(hilbert)[1]) > 0 and int(torch.linalg.cholesky_ex(hilbert.double())[1]) == 0
    patterns = torch.ones(2, n, dtype=torch.bool)
    patterns[1, 0] = False  # the second pattern misses the first coordinate
    single = gaussian_missing.pattern_conditionals(hilbert[None, None, None], patterns)
    double = gaussian_missing.pattern_conditionals(hilbert.double()[None, None, None], patterns)
    for low, high in zip(single, double):
        torch.testing.assert_close(low, high.float())


def test_blocks_factorised_by_width_equal_their_inverses_and_log_determinants():
    # Matrices (P, q, q) that are the identity past their leading n_missing rows and columns,
    # with every count 0..q present, against torch.linalg.inv and slogdet of each.
    q, generator = 9, torch.Generator().manual_seed(3)
    n_missing = torch.cat([torch.arange(q + 1), torch.randint(0, q + 1, (30,), generator=generator)])
    x = torch.randn(2, n_missing.numel(), q, q, generator=generator, dtype=F64)
    leading = torch.arange(q) < n_missing[:, None]  # (P, q)
    inside = leading[:, :, None] & leading[:, None, :]
    block = torch.where(inside, x @ x.mT + q * torch.eye(q, dtype=F64), torch.eye(q, dtype=F64))
    inverse, log_det = gaussian_missing_precision._inverse_by_width(block, n_missing)
    torch.testing.assert_close(inverse, torch.linalg.inv(block), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(log_det, torch.linalg.slogdet(block)[1], rtol=1e-12, atol=1e-12)
