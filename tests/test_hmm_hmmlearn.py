"""Baum-Welch against hmmlearn 0.3 in float64 from identical initial parameters: the same
parameters and log-likelihood after the same number of iterations (1e-6 relative)."""
import numpy as np
import pytest
import torch

import torch_em

hmm = pytest.importorskip("hmmlearn.hmm")

N_ITER = 6
LENGTHS = [40, 1, 25, 60, 7]


def _chain(K, rng):
    startprob = rng.dirichlet(np.ones(K) * 2)
    transmat = rng.dirichlet(np.ones(K) * 2, size=K) + np.eye(K) * 2
    return startprob, transmat / transmat.sum(1, keepdims=True)


def _gaussian_data(rng, K=3, D=2):
    means = rng.normal(0, 3, (K, D))
    startprob, transmat = _chain(K, rng)
    X, states = [], []
    for length in LENGTHS:
        z = [rng.choice(K, p=startprob)]
        for _ in range(length - 1):
            z.append(rng.choice(K, p=transmat[z[-1]]))
        states.append(np.array(z))
        X.append(means[z] + rng.normal(0, 1, (length, D)) * (1 + np.arange(D) / 2))
    return np.concatenate(X), np.array(LENGTHS)


def _initial_covariances(covariance_type, K, D, rng):
    scales = rng.uniform(0.5, 2.0, (K, D))
    if covariance_type == "diag":
        return scales
    if covariance_type == "spherical":
        return scales[:, 0]
    A = rng.normal(0, 0.3, (K, D, D))
    full = np.einsum("kij,klj->kil", A, A) + np.einsum("kd,de->kde", scales, np.eye(D))
    return full if covariance_type == "full" else full[0]


def _precisions(covariances, covariance_type):
    if covariance_type in ("diag", "spherical"):
        return 1 / covariances
    return np.linalg.inv(covariances)


def _assert_close(actual, expected, name):
    actual = actual.detach().numpy() if isinstance(actual, torch.Tensor) else np.asarray(actual)
    np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-9, err_msg=name)


@pytest.mark.parametrize("covariance_type", ["diag", "full", "tied", "spherical"])
def test_gaussian_hmm_equals_hmmlearn(covariance_type):
    rng = np.random.default_rng(0)
    X, lengths = _gaussian_data(rng)
    K, D = 3, X.shape[1]
    startprob, transmat = _chain(K, rng)
    means = X[rng.choice(len(X), K, replace=False)]
    covariances = _initial_covariances(covariance_type, K, D, rng)

    reference = hmm.GaussianHMM(K, covariance_type, n_iter=N_ITER, tol=-np.inf, init_params="", params="stmc",
                                implementation="scaling", covars_prior=0.0)
    reference.startprob_, reference.transmat_, reference.means_ = startprob, transmat, means
    reference.covars_ = covariances
    reference.fit(X, lengths)

    model = torch_em.GaussianHMM(
        K, covariance_type, reg_covar=0.0, max_iter=N_ITER, tol=0.0, startprob_init=startprob, transmat_init=transmat,
        means_init=means, precisions_init=_precisions(covariances, covariance_type), dtype=torch.float64)
    with pytest.warns(torch_em.ConvergenceWarning):
        model.fit(X, lengths)

    assert int(model.n_iter_) == N_ITER
    _assert_close(model.startprob, reference.startprob_, "startprob")
    _assert_close(model.transmat, reference.transmat_, "transmat")
    _assert_close(model.means, reference.means_, "means")
    expected_covariances = reference.covars_ if covariance_type != "tied" else reference.covars_[0]
    if covariance_type == "spherical":
        expected_covariances = np.asarray(reference._covars_).reshape(K, -1)[:, 0]  # its M-step tiles them over D
    elif covariance_type == "diag":
        expected_covariances = np.diagonal(reference.covars_, axis1=1, axis2=2)
    _assert_close(model.covariances, expected_covariances, "covariances")
    # The last reported log-likelihood is that of the parameters before the last M-step.
    _assert_close(float(model.lower_bound_) * len(X), reference.monitor_.history[-1], "log-likelihood")
    _assert_close(model.score(X, lengths), reference.score(X, lengths), "score of the fitted parameters")


def test_categorical_hmm_equals_hmmlearn():
    rng = np.random.default_rng(1)
    K, n_symbols = 3, 5
    emission = rng.dirichlet(np.ones(n_symbols), size=K)
    startprob, transmat = _chain(K, rng)
    codes, z = [], rng.choice(K, p=startprob)
    for _ in range(sum(LENGTHS)):
        codes.append(rng.choice(n_symbols, p=emission[z]))
        z = rng.choice(K, p=transmat[z])
    X = np.array(codes)[:, None]
    lengths = np.array(LENGTHS)
    init_emission = rng.dirichlet(np.ones(n_symbols) * 3, size=K)
    init_start, init_trans = _chain(K, rng)

    reference = hmm.CategoricalHMM(K, n_iter=N_ITER, tol=-np.inf, init_params="", params="ste",
                                   implementation="scaling", n_features=n_symbols)
    reference.startprob_, reference.transmat_, reference.emissionprob_ = init_start, init_trans, init_emission
    reference.fit(X, lengths)

    model = torch_em.CategoricalHMM(K, n_symbols, max_iter=N_ITER, tol=0.0, startprob_init=init_start,
                                    transmat_init=init_trans, emissionprob_init=init_emission, dtype=torch.float64)
    with pytest.warns(torch_em.ConvergenceWarning):
        model.fit(X, lengths)
    _assert_close(model.startprob, reference.startprob_, "startprob")
    _assert_close(model.transmat, reference.transmat_, "transmat")
    _assert_close(model.emissionprob, reference.emissionprob_, "emissionprob")
    _assert_close(float(model.lower_bound_) * len(X), reference.monitor_.history[-1], "log-likelihood")
    # codes without their axis of size 1 are the same data
    _assert_close(model.score(X[:, 0], lengths), reference.score(X, lengths), "score of codes (N,)")


def test_poisson_hmm_equals_hmmlearn():
    rng = np.random.default_rng(2)
    K, D = 3, 2
    rates = rng.uniform(1, 12, (K, D))
    startprob, transmat = _chain(K, rng)
    X, z = [], rng.choice(K, p=startprob)
    for _ in range(sum(LENGTHS)):
        X.append(rng.poisson(rates[z]))
        z = rng.choice(K, p=transmat[z])
    X = np.array(X, dtype=float)
    lengths = np.array(LENGTHS)
    init_rates = rng.uniform(1, 12, (K, D))
    init_start, init_trans = _chain(K, rng)

    reference = hmm.PoissonHMM(K, n_iter=N_ITER, tol=-np.inf, init_params="", params="stl", implementation="scaling")
    reference.startprob_, reference.transmat_, reference.lambdas_ = init_start, init_trans, init_rates
    reference.fit(X, lengths)

    model = torch_em.PoissonHMM(K, max_iter=N_ITER, tol=0.0, startprob_init=init_start, transmat_init=init_trans,
                                lambdas_init=init_rates, dtype=torch.float64)
    with pytest.warns(torch_em.ConvergenceWarning):
        model.fit(X, lengths)
    _assert_close(model.startprob, reference.startprob_, "startprob")
    _assert_close(model.transmat, reference.transmat_, "transmat")
    _assert_close(model.lambdas, reference.lambdas_, "lambdas")
    _assert_close(float(model.lower_bound_) * len(X), reference.monitor_.history[-1], "log-likelihood")


@pytest.mark.parametrize("covariance_type", ["diag", "full", "spherical"])
def test_gmm_hmm_equals_hmmlearn(covariance_type):
    """hmmlearn's GMMHMM takes its covariance statistics about the means of the E-step rather
    than the M-step's new means, so its covariances are the exact M-step's plus the outer
    product of the mean update ``(m_new - m_old)``: one iteration is compared with that
    accounted for; everything else (and the log-likelihood) is compared as it is."""
    rng = np.random.default_rng(3)
    X, lengths = _gaussian_data(rng)
    K, C, D = 2, 2, X.shape[1]
    startprob, transmat = _chain(K, rng)
    weights = rng.dirichlet(np.ones(C) * 3, size=K)
    means = X[rng.choice(len(X), K * C, replace=False)].reshape(K, C, D)
    covariances = _initial_covariances(covariance_type, K * C, D, rng)
    covariances = covariances.reshape(K, C, *covariances.shape[1:])
    # hmmlearn's default priors of the spherical M-step are the maximum-likelihood one only when
    # D == n_mix; these make it the maximum-likelihood one for every D.
    priors = {"covars_prior": -(D + 2) / 2, "covars_weight": 0.0} if covariance_type == "spherical" else {}

    reference = hmm.GMMHMM(K, C, covariance_type=covariance_type, n_iter=1, tol=-np.inf, init_params="",
                           params="stmcw", implementation="scaling", **priors)
    reference.startprob_, reference.transmat_, reference.weights_ = startprob, transmat, weights
    reference.means_, reference.covars_ = means, covariances
    reference.fit(X, lengths)

    model = torch_em.GMMHMM(
        K, C, covariance_type, reg_covar=0.0, max_iter=1, tol=0.0, startprob_init=startprob,
        transmat_init=transmat, weights_init=weights, means_init=means,
        precisions_init=_precisions(covariances.reshape(K * C, *covariances.shape[2:]), covariance_type).reshape(
            covariances.shape), dtype=torch.float64)
    with pytest.warns(torch_em.ConvergenceWarning):
        model.fit(X, lengths)
    _assert_close(model.startprob, reference.startprob_, "startprob")
    _assert_close(model.transmat, reference.transmat_, "transmat")
    _assert_close(model.weights, reference.weights_, "weights")
    _assert_close(model.means, reference.means_, "means")
    shift = model.means.detach().numpy() - means  # (K, C, D)
    expected = reference.covars_ - {
        "full": np.einsum("kci,kcj->kcij", shift, shift), "diag": shift ** 2,
        "spherical": (shift ** 2).mean(-1)}[covariance_type]
    _assert_close(model.covariances, expected, "covariances")
    _assert_close(float(model.lower_bound_) * len(X), reference.monitor_.history[-1], "log-likelihood")
    # The density of torch_em's parameters, evaluated by hmmlearn.
    evaluator = hmm.GMMHMM(K, C, covariance_type=covariance_type, init_params="", implementation="scaling")
    evaluator.startprob_ = model.startprob.detach().numpy()
    evaluator.transmat_ = model.transmat.detach().numpy()
    evaluator.weights_, evaluator.means_ = model.weights.detach().numpy(), model.means.detach().numpy()
    evaluator.covars_ = model.covariances.detach().numpy()
    _assert_close(model.score(X, lengths), evaluator.score(X, lengths), "score")


def test_viterbi_and_posteriors_equal_hmmlearn():
    rng = np.random.default_rng(4)
    X, lengths = _gaussian_data(rng)
    model = torch_em.GaussianHMM(3, "full", seed=0, dtype=torch.float64).fit(X, lengths)
    reference = hmm.GaussianHMM(3, "full", init_params="", implementation="scaling")
    reference.startprob_ = model.startprob.detach().numpy()
    reference.transmat_ = model.transmat.detach().numpy()
    reference.means_ = model.means.detach().numpy()
    reference.covars_ = model.covariances.detach().numpy()
    logprob, states = reference.decode(X, lengths)
    best, predicted = model.decode(X, lengths)
    np.testing.assert_array_equal(predicted.numpy(), states)
    np.testing.assert_array_equal(model.predict(X, lengths).numpy(), states)
    _assert_close(best.sum(), logprob, "Viterbi log-probability")
    _assert_close(model.predict_proba(X, lengths), reference.predict_proba(X, lengths), "posteriors")
    _assert_close(model.score_samples(X, lengths).sum(), reference.score(X, lengths), "log-likelihood")
