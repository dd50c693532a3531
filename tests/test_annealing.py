"""Deterministic annealing EM (annealing=beta_0): the tempered E-step against a direct computation,
the fit's end at a stationary point of the likelihood, better optima than plain EM on a hard case,
batches, weights, SQUAREM, and the option's validation."""
import math
import warnings

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

import torch_em
from torch_em import annealing, em
from torch_em.latent import MIXTURE

F64 = torch.float64


def gaussian_model(kind="full", K=3, D=2, seed=0, **options):
    """A Gaussian mixture with known, distinct parameters (float64, reg_covar 0)."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(K, D, generator=g, dtype=F64) * 2
    if kind == "full":
        A = torch.randn(K, D, D, generator=g, dtype=F64) * 0.3
        precisions = torch.linalg.inv(A @ A.mT + torch.eye(D, dtype=F64))
    else:
        precisions = torch.rand(K, D, generator=g, dtype=F64) + 0.5
    weights = torch.softmax(torch.randn(K, generator=g, dtype=F64), -1)
    return torch_em.GaussianMixture(K, D, covariance_type=kind, means_init=means, precisions_init=precisions,
                                    weights_init=weights, reg_covar=0.0, dtype=F64, **options)


def tempered_reference(model, X, beta, weights):
    """softmax_k(beta (log w_k + log N(x_n | k))) from scipy's densities, the weighted tempered
    objective per point and the M-step from those posteriors (weights, means, covariances)."""
    w, mu, cov = (t.detach().numpy() for t in (model.weights, model.means, model.covariances))
    x = X.numpy()
    if cov.ndim == 2:  # diag
        cov = np.stack([np.diag(c) for c in cov])
    log_joint = np.stack([np.log(w[k]) + multivariate_normal(mu[k], cov[k]).logpdf(x) for k in range(len(w))], -1)
    tempered = torch.tensor(beta * log_joint)  # (N, K)
    resp = tempered.softmax(-1)
    point_weights = torch.ones(len(x), dtype=F64) if weights is None else weights
    objective = (point_weights * tempered.logsumexp(-1) / beta).sum() / point_weights.sum()
    r = resp * point_weights[:, None]  # (N, K)
    counts = r.sum(0)
    means = (r.T @ X) / counts[:, None]
    centred = X[None] - means[:, None]  # (K, N, D)
    covariances = torch.einsum("kn,knd,kne->kde", r.T, centred, centred) / counts[:, None, None]
    return resp, objective, counts / counts.sum(), means, covariances


def engine_step(model, X, beta, weights=None):
    """One tempered EM step of the engine from the model's parameters."""
    family = model.family
    data = em.Data(family, X, X.nanmean(-2, keepdim=True), 64, weights=weights)  # several chunks
    em_map = em.EMMap(MIXTURE, family, data, beta=beta, reseed=False)
    with torch.no_grad():
        return em_map(model._working_parameters(), torch.ones(1, 1, dtype=torch.bool))


def test_beta_one_is_the_plain_posterior_exactly():
    g = torch.Generator().manual_seed(0)
    log_joint = torch.randn(2, 3, 4, 50, generator=g, dtype=F64) * 30  # (R, M, K, n), in bits
    weights = torch.rand(50, generator=g, dtype=F64)
    plain = MIXTURE.posterior(log_joint.clone(), {}, weights)
    tempered = MIXTURE.posterior(log_joint.clone(), {}, weights, beta=1.0)
    assert torch.equal(plain[0], tempered[0]) and torch.equal(plain[1], tempered[1])
    model = gaussian_model()
    X = torch.randn(300, 2, generator=g, dtype=F64)
    one, default = engine_step(model, X, 1.0), engine_step(model, X, 1.0)
    data = em.Data(model.family, X, model.family.reference(X), 64)
    with torch.no_grad():
        untouched = em.EMMap(MIXTURE, model.family, data, reseed=False)(model._working_parameters(),
                                                                        torch.ones(1, 1, dtype=torch.bool))
    assert torch.equal(one.objective, untouched.objective)
    for name, value in untouched.params.emission.items():
        assert torch.equal(one.params.emission[name], value) and torch.equal(default.params.emission[name], value)


@pytest.mark.parametrize("kind", ["full", "diag"])
@pytest.mark.parametrize("beta", [0.2, 0.6])
@pytest.mark.parametrize("weighted", [False, True])
def test_tempered_e_step_is_the_softmax_of_beta_times_the_log_joint(kind, beta, weighted):
    g = torch.Generator().manual_seed(1)
    model = gaussian_model(kind)
    X = torch.randn(300, 2, generator=g, dtype=F64) * 2
    weights = torch.rand(300, generator=g, dtype=F64) * 2 if weighted else None
    resp, objective, new_weights, means, covariances = tempered_reference(model, X, beta, weights)
    step = engine_step(model, X, beta, weights)
    torch.testing.assert_close(step.objective[0, 0], objective, rtol=1e-12, atol=0)
    torch.testing.assert_close(step.params.latent["log_weights"][0, 0].exp(), new_weights, rtol=1e-10, atol=0)
    torch.testing.assert_close(step.params.emission["loc"][0, 0], means, rtol=1e-10, atol=1e-12)
    new_cov = model.family.covariance(step.params.emission)[0, 0]
    expected = covariances if kind == "full" else torch.diagonal(covariances, dim1=-2, dim2=-1)
    torch.testing.assert_close(new_cov, expected, rtol=1e-9, atol=1e-12)
    # The tempered posterior itself, from the latent structure (log joint in its units: bits, times beta).
    w, mu, cov = model.weights.detach(), model.means.detach(), model.covariances.detach()
    cov = cov if kind == "full" else torch.diag_embed(cov)
    log_p = torch.distributions.MultivariateNormal(mu, cov).log_prob(X[:, None])  # (N, K)
    log_joint = (beta * (w.log() + log_p) / math.log(2)).T.reshape(1, 1, 3, -1)
    posterior, _, _ = MIXTURE.posterior(log_joint, {}, None, beta=beta)
    torch.testing.assert_close(posterior[0, 0].T, resp, rtol=1e-10, atol=1e-13)


def test_the_tempered_objective_never_decreases_at_a_fixed_beta():
    g = torch.Generator().manual_seed(2)
    model = gaussian_model(K=4)
    X = torch.cat([torch.randn(200, 2, generator=g, dtype=F64) + shift for shift in (0.0, 2.5, 5.0)])
    family = model.family
    em_map = em.EMMap(MIXTURE, family, em.Data(family, X, family.reference(X), 1000), beta=0.4)
    params, objectives = model._working_parameters().map(torch.detach), []
    for _ in range(30):
        step = em_map(params, torch.ones(1, 1, dtype=torch.bool))
        objectives.append(float(step.objective))
        params = step.params
    assert all(b >= a - 1e-12 for a, b in zip(objectives, objectives[1:]))


def hard_case():
    """Digits (8x8 images) projected onto their first 10 principal axes: ten overlapping
    components, many local optima."""
    from sklearn.datasets import load_digits

    X = torch.tensor(load_digits().data, dtype=F64)
    X = X - X.mean(0)
    _, _, V = torch.linalg.svd(X, full_matrices=False)
    return X @ V[:10].T


def fit(X, **options):
    options = {"tol": 1e-5, "max_iter": 1000, "dtype": F64, **options}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch_em.ConvergenceWarning)
        return torch_em.GaussianMixture(10, **options).fit(X)


def test_annealing_ends_at_a_stationary_point_of_the_likelihood():
    X = hard_case()
    model = fit(X, annealing=0.3, seed=0, tol=1e-10, max_iter=3000)
    assert bool(model.converged_)
    # The lower bound is the log-likelihood (not a tempered objective) of the final parameters.
    torch.testing.assert_close(model.score(X), model.lower_bound_, rtol=1e-9, atol=0)
    means, covariances, bound = model.means.clone(), model.covariances.clone(), float(model.lower_bound_)
    scale = float(X.std())
    model.warm_start, model.max_iter = True, 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch_em.ConvergenceWarning)
        model.fit(X)  # a warm start goes on at beta = 1: one more plain EM step
    torch.testing.assert_close(model.means, means, rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(model.covariances, covariances, rtol=0, atol=1e-5 * scale ** 2)
    model.max_iter, model.tol = 5000, 1e-13  # plain EM continued to convergence gains nothing
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch_em.ConvergenceWarning)
        model.fit(X)
    assert bound - 1e-12 <= float(model.lower_bound_) <= bound + 1e-8


def test_annealing_reaches_better_optima_than_plain_em_on_a_hard_case():
    X = hard_case()
    # twenty starts as a batch (from the default seedings, ten are too few to tell the medians apart)
    plain = fit(X, batch_shape=(20,), seed=0).lower_bound_
    annealed = fit(X, batch_shape=(20,), seed=0, annealing=0.3).lower_bound_  # the same twenty starts
    assert float(annealed.median()) >= float(plain.median()) - 1e-3
    assert int((annealed >= plain - 1e-3).sum()) > 10  # from most (a majority of the) starts at least as good


def test_n_iter_counts_every_stage():
    X = hard_case()
    plain = fit(X, seed=0)
    model = fit(X, seed=0, annealing=0.3)
    stages = annealing.schedule(0.3)
    assert len(stages) == 3  # 0.3, 0.45, 0.675 (then 1)
    assert int(model.n_iter_) == model.lower_bound_history_.shape[-1]
    assert len(stages) + 1 <= int(model.n_iter_) <= len(stages) * annealing.STAGE_ITER + 1000
    # The first entries are tempered objectives: above the log-likelihood of the same parameters
    # (the power mean inequality), so the history is not the plain fit's.
    assert float(model.lower_bound_history_[0]) > float(plain.lower_bound_history_[0])


def test_a_batch_with_annealing_equals_each_model_fitted_alone():
    g = torch.Generator().manual_seed(3)
    datasets = torch.stack([torch.cat([torch.randn(150, 2, generator=g, dtype=F64) + shift * torch.tensor([1.0, 0.5],
                                                                                                       dtype=F64)
                                       for shift in (0.0, 1.5, 3.0, 4.5)]) for _ in range(3)])  # (3, N, D)
    weights = torch.rand(3, 600, generator=g, dtype=F64) + 0.5
    means = torch.randn(3, 4, 2, generator=g, dtype=F64) + 2
    options = dict(tol=1e-8, max_iter=500, dtype=F64, annealing=0.2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch_em.ConvergenceWarning)
        batch = torch_em.GaussianMixture(4, batch_shape=(3,), means_init=means, **options).fit(datasets, sample_weight=weights)
        for m in range(3):
            alone = torch_em.GaussianMixture(4, means_init=means[m], **options).fit(datasets[m], sample_weight=weights[m])
            torch.testing.assert_close(batch.means[m], alone.means, rtol=0, atol=1e-9)
            torch.testing.assert_close(batch.lower_bound_[m], alone.lower_bound_, rtol=0, atol=1e-12)
            assert int(batch.n_iter_[m]) == int(alone.n_iter_)


def test_integer_weights_equal_repeated_rows_under_annealing():
    g = torch.Generator().manual_seed(4)
    X = torch.randn(200, 2, generator=g, dtype=F64) * torch.tensor([2.0, 1.0], dtype=F64)
    counts = torch.randint(0, 4, (200,), generator=g)
    options = dict(tol=1e-10, max_iter=500, dtype=F64, annealing=0.25, means_init=[[-2.0, 0.0], [0.0, 1.0], [2.0, 0.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch_em.ConvergenceWarning)
        weighted = torch_em.GaussianMixture(3, **options).fit(X, sample_weight=counts.to(F64))
        repeated = torch_em.GaussianMixture(3, **options).fit(X.repeat_interleave(counts, 0))
    torch.testing.assert_close(weighted.means, repeated.means, rtol=0, atol=1e-8)
    torch.testing.assert_close(weighted.lower_bound_, repeated.lower_bound_, rtol=0, atol=1e-10)


def test_annealing_composes_with_restarts_and_squarem():
    X = hard_case()
    model = fit(X, annealing=0.3, accelerate="squarem", n_init=3, seed=0, tol=1e-9, max_iter=3000)
    assert int(model.n_iter_) % 3 == 0  # three evaluations of the EM map per SQUAREM cycle, in every stage
    assert bool(model.converged_)
    torch.testing.assert_close(model.score(X), model.lower_bound_, rtol=1e-8, atol=0)
    alone = fit(X, annealing=0.3, accelerate="squarem", seed=0, tol=1e-9, max_iter=3000)  # restart 0 alone
    assert float(model.lower_bound_) >= float(alone.lower_bound_) - 1e-12


@pytest.mark.parametrize("value", [0, 0.0, 1, 1.0, 1.5, -0.2, math.nan, "0.5", True, [0.5]])
def test_bad_annealing_is_rejected_and_changes_nothing(value):
    with pytest.raises(ValueError, match=r"annealing must be None or an initial inverse temperature in \(0, 1\), got"):
        torch_em.GaussianMixture(2, annealing=value)
    model = torch_em.GaussianMixture(2, annealing=0.5, seed=0, dtype=F64).fit(torch.randn(100, 2, dtype=F64))
    before = {name: value.clone() for name, value in model.state_dict().items()}
    with pytest.raises(ValueError, match="annealing"):
        model.annealing = value
    assert model.annealing == 0.5
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())


def test_hidden_markov_models_reject_annealing():
    with pytest.raises(ValueError, match="annealing must be None for GaussianHMM"):
        torch_em.GaussianHMM(2, annealing=0.5)
    hmm = torch_em.GaussianHMM(2)
    with pytest.raises(ValueError, match="annealing must be None for GaussianHMM"):
        hmm.annealing = 0.5
    assert hmm.annealing is None


def test_annealing_is_saved_with_the_model(tmp_path):
    model = torch_em.GaussianMixture(2, annealing=0.4, seed=0, dtype=F64).fit(torch.randn(100, 2, dtype=F64))
    model.save(tmp_path / "model.pt")
    assert torch_em.load(tmp_path / "model.pt").annealing == 0.4


def test_tempered_objective_on_rows_with_missing_entries_is_that_of_the_observed_marginals():
    g = torch.Generator().manual_seed(5)
    model = gaussian_model("full", D=3, missing="marginalize")
    X = torch.randn(200, 3, generator=g, dtype=F64) * 2
    X[torch.rand(200, 3, generator=g) < 0.3] = math.nan
    X[X.isnan().all(-1), 0] = 0.5  # every row keeps an observed entry
    beta = 0.4
    w, mu, cov = (t.detach() for t in (model.weights, model.means, model.covariances))
    log_joint = torch.empty(200, 3, dtype=F64)
    for n, row in enumerate(X):
        seen = ~row.isnan()
        for k in range(3):
            marginal = torch.distributions.MultivariateNormal(mu[k][seen], cov[k][seen][:, seen])
            log_joint[n, k] = w[k].log() + marginal.log_prob(row[seen])
    expected = (beta * log_joint).logsumexp(-1).mean() / beta
    step = engine_step(model, X, beta)
    torch.testing.assert_close(step.objective[0, 0], expected, rtol=1e-12, atol=0)


def test_tempered_e_step_of_another_family_is_the_softmax_of_beta_times_the_log_joint():
    g = torch.Generator().manual_seed(6)
    rates = torch.tensor([[1.0, 4.0], [3.0, 1.5], [6.0, 6.0]], dtype=F64)
    model = torch_em.Mixture(torch_em.Poisson(rates_init=rates), 3, 2, weights_init=[0.2, 0.3, 0.5], dtype=F64)
    X = torch.poisson(torch.full((300, 2), 3.0, dtype=F64), generator=g)
    beta = 0.35
    log_p = torch.distributions.Poisson(rates).log_prob(X[:, None]).sum(-1)  # (N, K)
    tempered = beta * (torch.tensor([0.2, 0.3, 0.5], dtype=F64).log() + log_p)
    resp = tempered.softmax(-1)
    family = model.family
    data = em.Data(family, X, family.reference(X), 64)
    with torch.no_grad():
        step = em.EMMap(MIXTURE, family, data, beta=beta, reseed=False)(model._working_parameters(),
                                                                      torch.ones(1, 1, dtype=torch.bool))
    torch.testing.assert_close(step.objective[0, 0], tempered.logsumexp(-1).mean() / beta, rtol=1e-12, atol=0)
    expected_rates = (resp.T @ X) / resp.sum(0)[:, None]
    torch.testing.assert_close(family.rates(step.params.emission)[0, 0], expected_rates, rtol=1e-10, atol=0)


def test_a_model_that_fails_is_isolated_through_the_stages_and_the_others_finish_as_alone():
    g = torch.Generator().manual_seed(7)
    datasets = torch.randn(3, 300, 2, generator=g, dtype=F64) + torch.tensor([0.0, 2.0], dtype=F64)
    datasets[:, :150] -= 2.0
    datasets[1, :, 0] = 4.0  # model 1: every covariance singular (reg_covar 0)
    means = torch.tensor([[-2.0, 0.0], [0.0, 2.0]], dtype=F64)
    options = dict(reg_covar=0.0, tol=1e-8, max_iter=300, dtype=F64, annealing=0.3, means_init=means)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch = torch_em.GaussianMixture(2, batch_shape=(3,), **options).fit(datasets)
        alone = [torch_em.GaussianMixture(2, **options).fit(datasets[m]) for m in (0, 2)]
    assert batch.failed_.tolist() == [False, True, False]  # (at initialisation: no stage brings it back)
    assert int(batch.n_iter_[1]) == 0 and math.isnan(float(batch.lower_bound_[1]))
    for m, model in zip((0, 2), alone):
        torch.testing.assert_close(batch.means[m], model.means, rtol=0, atol=1e-10)
        assert int(batch.n_iter_[m]) == int(model.n_iter_)


def test_the_driver_runs_every_stage_then_plain_em_and_joins_the_results():
    calls = []

    def run(beta, params, max_iter, stage):
        calls.append((beta, max_iter, stage))
        n = len(calls)
        history = torch.full((1, 2, n), -float(n), dtype=F64)  # stage n: n iterations
        return em.EMResult(params, torch.full((1, 2), -float(n), dtype=F64), torch.full((1, 2), n),
                           torch.tensor([[n == 4, False]]), history)

    params = em.Params({"log_weights": torch.zeros(1, 2, 3, dtype=F64)}, {})
    result = annealing.anneal(run, params, 0.3, 77, stage_iter=5, factor=1.5)
    assert [beta for beta, _, _ in calls] == pytest.approx([0.3, 0.45, 0.675, 1.0])
    assert [max_iter for _, max_iter, _ in calls] == [5, 5, 5, 77]
    assert calls[0][2] == "annealing stage beta=0.3, EM iteration" and calls[-1][2] == "EM iteration"
    assert result.n_iter.tolist() == [[10, 10]]  # 1 + 2 + 3 + 4
    assert result.history.shape == (1, 2, 10) and result.lower_bound.tolist() == [[-4.0, -4.0]]
    assert result.converged.tolist() == [[True, False]]  # the plain stage's
