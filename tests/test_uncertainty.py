"""Standard errors (torch_em.standard_errors): observed information against finite differences in
another parametrisation, the bootstrap as a batch dimension, coverage."""
import math
import warnings

import pytest
import torch
from torch import distributions as dist

import torch_em
from torch_em import uncertainty

F64 = torch.float64


def two_normals(n=400, seed=0, shift=3.0):
    g = torch.Generator().manual_seed(seed)
    labels = (torch.rand(n, generator=g) < 0.4).long()
    return (torch.randn(n, 1, generator=g, dtype=F64) * torch.tensor([1.0, 0.7], dtype=F64)[labels, None]
            + torch.tensor([0.0, shift], dtype=F64)[labels, None])


def fit(X, **options):
    start = dict(means_init=[[0.0], [3.0]], weights_init=[0.5, 0.5], precisions_init=[[[1.0]], [[1.0]]])
    return torch_em.GaussianMixture(2, tol=1e-12, max_iter=2000, dtype=F64, **start, **options).fit(X)


def test_observed_standard_errors_equal_a_finite_difference_hessian_in_other_coordinates():
    X = two_normals()
    model = fit(X)
    # the same likelihood in the coordinates (w0, mu0, mu1, var0, var1), by torch.distributions
    theta = torch.cat([model.weights[:1], model.means[:, 0], model.covariances[:, 0, 0]]).detach()

    def log_likelihood(t):
        w = torch.stack([t[0], 1 - t[0]])
        components = dist.Normal(t[1:3], t[3:5].sqrt())
        return torch.logsumexp(w.log() + components.log_prob(X), -1).sum()

    h = 1e-4
    P = len(theta)
    hessian = torch.zeros(P, P, dtype=F64)
    for i in range(P):
        for j in range(P):
            e_i, e_j = torch.eye(P, dtype=F64)[i] * h, torch.eye(P, dtype=F64)[j] * h
            hessian[i, j] = (log_likelihood(theta + e_i + e_j) - log_likelihood(theta + e_i - e_j)
                             - log_likelihood(theta - e_i + e_j) + log_likelihood(theta - e_i - e_j)) / (4 * h * h)
    reference = torch.linalg.inv(-hessian).diagonal().sqrt()
    se = torch_em.standard_errors(model, X)
    ours = torch.cat([se.weights[:1], se.means[:, 0], se.covariances[:, 0, 0]])
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=0)
    assert float(se.weights[0]) == pytest.approx(float(se.weights[1]), rel=1e-8)  # w1 = 1 - w0


def test_observed_errors_agree_with_the_batched_bootstrap_and_the_robust_forms():
    X = two_normals(n=1500, seed=1)
    model = fit(X)
    observed = torch_em.standard_errors(model, X)
    boot = torch_em.standard_errors(model, X, method="bootstrap", n_boot=400, seed=0)
    for name in ("weights", "means", "covariances"):
        ratio = getattr(observed, name) / getattr(boot, name)
        assert bool(((ratio > 0.8) & (ratio < 1.25)).all()), (name, ratio)
        for method in ("opg", "sandwich"):  # a well-specified model: all three estimate the same matrix
            other = torch_em.standard_errors(model, X, method=method)
            ratio = getattr(other, name) / getattr(observed, name)
            assert bool(((ratio > 0.8) & (ratio < 1.25)).all()), (method, name, ratio)
    lower, upper = boot.confidence_intervals(0.9)["means"]
    assert bool(((lower < observed.estimates["means"]) & (observed.estimates["means"] < upper)).all())


def test_the_batched_bootstrap_equals_its_resamples_fitted_one_by_one():
    X = two_normals(n=200, seed=2)
    model = fit(X)
    boot = torch_em.standard_errors(model, X, method="bootstrap", n_boot=5, seed=3)
    assert boot.resample_weights.shape == (5, 200) and bool((boot.resample_weights.sum(-1) == 200).all())
    for b in range(5):
        single = torch_em.GaussianMixture(2, tol=model.tol, max_iter=model.max_iter, dtype=F64,
                                          weights_init=model.weights.detach(), means_init=model.means.detach(),
                                          precisions_init=model.precisions.detach())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch_em.ConvergenceWarning)
            single.fit(X, sample_weight=boot.resample_weights[b])
        torch.testing.assert_close(boot.samples["means"][b], single.means.detach(), rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(boot.samples["weights"][b], single.weights.detach(), rtol=1e-8, atol=1e-10)


def test_nominal_95_percent_intervals_cover_the_truth():
    # 60 simulated datasets fitted as one batch; the intervals of the two means and weights.
    datasets = torch.stack([two_normals(n=500, seed=100 + i) for i in range(60)])
    model = fit(datasets, batch_shape=(60,))
    se = torch_em.standard_errors(model, datasets)
    lower, upper = se.confidence_intervals(0.95)["means"]
    truth = torch.tensor([[0.0], [3.0]], dtype=F64)
    covered = ((lower <= truth) & (truth <= upper)).double().mean()
    assert 0.88 <= float(covered) <= 1.0, float(covered)  # 120 intervals: Monte-Carlo sd about 0.02
    lower, upper = se.confidence_intervals(0.95)["weights"]
    covered = ((lower[:, 0] <= 0.6) & (0.6 <= upper[:, 0])).double().mean()
    assert 0.85 <= float(covered) <= 1.0, float(covered)


def test_hmm_and_other_families_report_their_own_parameters():
    g = torch.Generator().manual_seed(4)
    states = (torch.arange(300) // 30) % 2
    X = torch.tensor([[0.0], [3.0]], dtype=F64)[states] + torch.randn(300, 1, generator=g, dtype=F64)
    hmm = torch_em.GaussianHMM(2, "diag", tol=1e-10, max_iter=500, seed=0, dtype=F64).fit(X)
    se = torch_em.standard_errors(hmm, X)
    assert se.startprob.shape == (2,) and se.transmat.shape == (2, 2) and se.means.shape == (2, 1)
    assert bool(torch.isfinite(se.transmat).all()) and bool((se.transmat > 0).all())
    counts = torch.poisson(torch.where(torch.rand(400, 1, generator=g) < 0.5, 2.0, 8.0).double().expand(400, 2),
                           generator=g)
    poisson = torch_em.Mixture(torch_em.Poisson(), 2, tol=1e-10, max_iter=500, seed=0, dtype=F64).fit(counts)
    rates = torch_em.standard_errors(poisson, counts).rates
    estimate = poisson.family.rates(poisson.theta()).detach()
    # a Poisson rate's error is about sqrt(rate / n_k)
    n_k = poisson.weights.detach() * 400
    torch.testing.assert_close(rates, (estimate / n_k[:, None]).sqrt(), rtol=0.15, atol=0)


def test_bad_requests_are_rejected():
    X = two_normals(n=100)
    with pytest.raises(torch_em.NotFittedError):
        torch_em.standard_errors(torch_em.GaussianMixture(2), X)
    model = fit(X)
    with pytest.raises(ValueError, match="method"):
        torch_em.standard_errors(model, X, method="jackknife")
    batched = fit(torch.stack([X, X]), batch_shape=(2,))
    with pytest.raises(ValueError, match="one model"):
        torch_em.standard_errors(batched, torch.stack([X, X]), method="bootstrap")
    se = torch_em.standard_errors(model, X)
    with pytest.raises(AttributeError, match="no standard errors named"):
        se.probs
    with pytest.raises(ValueError, match="level"):
        se.confidence_intervals(1.5)
    lower, upper = se.confidence_intervals(0.95)["means"]
    torch.testing.assert_close((upper - lower) / 2, 1.959963984540054 * se.means)
    assert math.isfinite(float(se.means.sum()))


def test_a_batch_of_models_gets_each_model_s_own_standard_errors():
    # Every model's information block is taken from products with tangents shared by the whole
    # batch; it must equal the model fitted and evaluated alone, for every analytic method.
    datasets = torch.stack([two_normals(n=300, seed=20 + i, shift=2.5 + i) for i in range(3)])
    batched = fit(datasets, batch_shape=(3,))
    for method in ("observed", "opg", "sandwich"):
        together = torch_em.standard_errors(batched, datasets, method=method)
        for m in range(3):
            alone = torch_em.standard_errors(fit(datasets[m]), datasets[m], method=method)
            for name in ("weights", "means", "covariances"):
                torch.testing.assert_close(getattr(together, name)[m], getattr(alone, name), rtol=1e-6, atol=1e-12)


def test_observed_information_is_symmetric_positive_definite_at_an_interior_optimum():
    # In (w0, mu0, mu1, log var0, log var1): identified coordinates, so the whole matrix is PD.
    X = two_normals(n=500, seed=5)
    model = fit(X)
    theta = torch.cat([model.weights[:1], model.means[:, 0], model.covariances[:, 0, 0].log()]).detach()

    def log_likelihood(t):
        components = dist.Normal(t[1:3], t[3:5].exp().sqrt())
        return torch.logsumexp(torch.stack([t[0], 1 - t[0]]).log() + components.log_prob(X), -1).sum()

    information = -torch.autograd.functional.hessian(log_likelihood, theta)
    torch.testing.assert_close(information, information.T)
    assert float(torch.linalg.eigvalsh(information).min()) > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch_em.UncertaintyWarning)  # no warning at the optimum
        torch_em.standard_errors(model, X)
    # Both components at the one-component fit, equal weights: a fixed point of EM that is a
    # saddle of this bimodal likelihood (separating the means raises it). The information is
    # indefinite there, and that is warned.
    one = torch_em.GaussianMixture(1, tol=1e-12, dtype=F64).fit(X).state_dict()
    saddle = fit(X)
    saddle.load_state_dict({"logits": torch.zeros(2, dtype=F64), "loc": one["loc"].expand(2, 1).clone(),
                            "raw_precision_cholesky": one["raw_precision_cholesky"].expand(2, 1, 1).clone()})
    with pytest.warns(torch_em.UncertaintyWarning, match="not positive definite"):
        torch_em.standard_errors(saddle, X)


def test_the_parametric_bootstrap_agrees_with_the_observed_information():
    X = two_normals(n=1500, seed=6)
    model = fit(X)
    observed = torch_em.standard_errors(model, X)
    boot = torch_em.standard_errors(model, X, method="parametric_bootstrap", n_boot=400, seed=1)
    assert boot.method == "parametric_bootstrap" and boot.resample_weights is None
    assert boot.samples["means"].shape == (400, 2, 1)
    for name in ("weights", "means", "covariances"):
        ratio = getattr(boot, name) / getattr(observed, name)
        assert bool(((ratio > 0.8) & (ratio < 1.25)).all()), (name, ratio)
    with pytest.raises(ValueError, match="sample_weight"):
        torch_em.standard_errors(model, X, method="parametric_bootstrap", sample_weight=torch.ones(1500))


@pytest.mark.parametrize("method", ["bootstrap", "parametric_bootstrap"])
def test_an_unseeded_bootstrap_leaves_the_global_generator_alone(method):
    X = two_normals(n=100)
    model = fit(X)
    torch.manual_seed(123)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch_em.standard_errors(model, X, method=method, n_boot=3)
    assert torch.initial_seed() == 123  # not reseeded: a script's own torch.manual_seed still holds


def test_the_bootstrap_on_the_drawn_rows_equals_the_bootstrap_on_all_rows(monkeypatch):
    # Refits evaluate only the rows their resample drew while those rows' features fit in the
    # feature cache, else the shared rows with the counts: the same refits either way.
    X = two_normals(n=300, seed=4)
    model = fit(X)
    counts = torch.zeros(2, 300, dtype=F64).scatter_add_(1, torch.randint(0, 300, (2, 300)), torch.ones(2, 300, dtype=F64))
    rows, row_counts = uncertainty._drawn_rows(model, torch.as_tensor(X), counts)
    assert rows.shape == (2, int((counts > 0).sum(-1).max()), 1) and bool((row_counts.sum(-1) == 300).all())
    drawn = torch_em.standard_errors(model, X, method="bootstrap", n_boot=6, seed=5)
    monkeypatch.setattr(torch_em.data, "FEATURE_CACHE_BYTES", 0)
    assert uncertainty._drawn_rows(model, torch.as_tensor(X), counts)[0].shape == (300, 1)
    shared = torch_em.standard_errors(model, X, method="bootstrap", n_boot=6, seed=5)
    assert torch.equal(drawn.resample_weights, shared.resample_weights)
    for name in ("weights", "means", "covariances"):
        torch.testing.assert_close(drawn.samples[name], shared.samples[name], rtol=1e-9, atol=1e-11)


def test_standard_errors_of_a_model_without_a_likelihood_are_refused_by_name():
    X = two_normals(n=50, seed=6)
    with pytest.raises(ValueError, match="mixture or HMM, got a KMeans"):
        torch_em.standard_errors(torch_em.KMeans(2).fit(X), X)
