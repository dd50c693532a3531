"""Hidden Markov models with missing entries (NaN) marginalised by exact Baum-Welch
(``missing="marginalize"``), steps with nothing observed included.

References: brute-force enumeration over every state path with scipy.stats densities of the
observed coordinates, the autograd gradient of the observed-data log-likelihood at convergence,
the ordinary complete-data fit, models of a batch fitted alone.
"""
from __future__ import annotations

import copy
import itertools
import warnings

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.special import logsumexp

import torch_em

F64 = torch.float64
K, D = 3, 3


def quiet(function, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch_em.ConvergenceWarning)
        return function(*args, **kwargs)


def parameters(model) -> dict:
    return {name: value.detach().clone() for name, value in model.named_parameters()}


def assert_same_parameters(a: dict, b: dict, atol: float = 1e-10):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)


def holes(shape, fraction: float, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random(shape) < fraction


REGIME_MEANS = np.array([[0.0, 0.0, 0.0], [3.0, -2.0, 1.0], [-2.0, 3.0, 2.0]])


def regime_data(n_sequences: int, length: int, seed: int, fraction: float = 0.25) -> np.ndarray:
    """Padded (S, T, D) observations of a sticky 3-state Gaussian chain, ``fraction`` of the
    entries missing and every 7th step missing whole."""
    rng = np.random.default_rng(seed)
    means = REGIME_MEANS
    states = np.zeros((n_sequences, length), dtype=int)
    states[:, 0] = rng.integers(0, K, n_sequences)
    for t in range(1, length):
        switch = rng.random(n_sequences) < 0.15
        states[:, t] = np.where(switch, rng.integers(0, K, n_sequences), states[:, t - 1])
    mixing = np.array([[1.0, 0.5, 0.0], [0.0, 1.0, 0.4], [0.0, 0.0, 0.8]])
    X = means[states] + rng.normal(size=(n_sequences, length, D)) @ mixing
    X[holes(X.shape, fraction, seed + 1)] = np.nan
    X[:, 3::7] = np.nan
    return X


def gaussian_start(covariance_type: str, seed: int = 0) -> dict:
    """Initial values of a GaussianHMM (random, well conditioned)."""
    rng = np.random.default_rng(seed)
    transmat = rng.dirichlet(np.full(K, 2.0), K) + np.eye(K)
    values = dict(startprob_init=rng.dirichlet(np.ones(K)), transmat_init=transmat / transmat.sum(1, keepdims=True),
                  means_init=rng.normal(0, 2, (K, D)))
    if covariance_type == "full":
        factors = rng.normal(0, 0.4, (K, D, D)) + np.eye(D)
        values["precisions_init"] = factors @ factors.transpose(0, 2, 1)
    else:
        values["precisions_init"] = rng.uniform(0.3, 2.0, (K, D))
    return values


# --- brute force over all state paths ------------------------------------------------------------
def observed_log_densities(X: np.ndarray, means: np.ndarray, covariances: np.ndarray, covariance_type: str) -> np.ndarray:
    """log p(x_o | state k) (S, T, K) with scipy.stats on each step's observed coordinates (0 for
    a step with nothing observed)."""
    S, T, _ = X.shape
    out = np.zeros((S, T, K))
    for s, t, k in itertools.product(range(S), range(T), range(K)):
        o = ~np.isnan(X[s, t])
        if not o.any():
            continue
        if covariance_type == "full":
            out[s, t, k] = stats.multivariate_normal(means[k, o], covariances[k][np.ix_(o, o)]).logpdf(X[s, t, o])
        else:
            out[s, t, k] = stats.norm(means[k, o], np.sqrt(covariances[k, o])).logpdf(X[s, t, o]).sum()
    return out


def enumerated(log_emission: np.ndarray, startprob: np.ndarray, transmat: np.ndarray, length: int):
    """Log-likelihood, posteriors (length, K) and the best path of one sequence, by enumerating
    the K**length state paths."""
    paths = np.array(list(itertools.product(range(K), repeat=length)))  # (P, length)
    log_paths = np.log(startprob[paths[:, 0]]) + log_emission[np.arange(length), paths].sum(1)
    if length > 1:
        log_paths = log_paths + np.log(transmat[paths[:, :-1], paths[:, 1:]]).sum(1)
    total = logsumexp(log_paths)
    weights = np.exp(log_paths - total)
    posteriors = np.zeros((length, K))
    for t in range(length):
        np.add.at(posteriors[t], paths[:, t], weights)
    return total, posteriors, paths[np.argmax(log_paths)]


def small_problem() -> tuple[np.ndarray, np.ndarray]:
    """Four ragged sequences (T <= 5) with missing entries, steps with nothing observed (one of
    them a sequence's last, so its padding holds NaN too) and NaN in the padding."""
    rng = np.random.default_rng(3)
    X = rng.normal(0, 2, (4, 5, D))
    X[holes(X.shape, 0.3, 4)] = np.nan
    X[0, 2] = np.nan
    X[1, 2] = np.nan  # the last step of a sequence of length 3
    X[2, 4] = np.nan
    X[3, 1:] = np.nan  # padding
    X[2, 0] = [0.5, np.nan, -1.0]
    return X, np.array([5, 3, 5, 1])


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_likelihood_posteriors_and_viterbi_equal_the_enumeration_of_all_paths(covariance_type):
    X, lengths = small_problem()
    model = torch_em.GaussianHMM(K, covariance_type, D, missing="marginalize", dtype=F64,
                                 **gaussian_start(covariance_type))
    means, covariances = model.means.detach().numpy(), model.covariances.detach().numpy()
    log_emission = observed_log_densities(X, means, covariances, covariance_type)
    startprob, transmat = model.startprob.detach().numpy(), model.transmat.detach().numpy()
    scores = model.score_samples(X, lengths).numpy()
    posteriors, path = model.predict_proba(X, lengths).numpy(), model.predict(X, lengths).numpy()
    best, decoded = model.decode(X, lengths)
    for s, length in enumerate(lengths):
        total, expected, best_path = enumerated(log_emission[s], startprob, transmat, int(length))
        np.testing.assert_allclose(scores[s], total, rtol=0, atol=1e-10)
        np.testing.assert_allclose(posteriors[s, :length], expected, rtol=0, atol=1e-10)
        np.testing.assert_array_equal(path[s, :length], best_path)
        np.testing.assert_array_equal(decoded[s, :length].numpy(), best_path)
        assert (path[s, length:] == -1).all()
    assert float(model.score(X, lengths)) == pytest.approx(scores.sum(), abs=1e-10)
    # The fit's E-step (the rows expanded about the data's reference point) has the same likelihood.
    one_step = copy.deepcopy(model)
    one_step.warm_start, one_step.max_iter = True, 1
    quiet(one_step.fit, X, lengths)
    assert float(one_step.lower_bound_) == pytest.approx(scores.sum() / lengths.sum(), abs=1e-12)
    # Concatenated (N, D) sequences are the same sequences.
    concatenated = np.concatenate([X[s, :length] for s, length in enumerate(lengths)])
    np.testing.assert_allclose(model.score_samples(concatenated, lengths).numpy(), scores, rtol=0, atol=1e-12)


def test_a_gmm_hmm_state_emits_the_mixture_of_its_components_marginals():
    X, lengths = small_problem()
    rng = np.random.default_rng(8)
    model = torch_em.GMMHMM(2, 2, "diag", D, missing="marginalize", dtype=F64, means_init=rng.normal(0, 2, (2, 2, D)),
                            precisions_init=rng.uniform(0.3, 2, (2, 2, D)), weights_init=[[0.3, 0.7], [0.6, 0.4]])
    means, variances = model.means.detach().numpy(), model.covariances.detach().numpy()  # (K, C, D)
    weights = model.weights.detach().numpy()
    log_emission = np.zeros((*X.shape[:2], 2))
    for s, t, k in itertools.product(range(X.shape[0]), range(X.shape[1]), range(2)):
        o = ~np.isnan(X[s, t])
        per_component = [np.log(weights[k, c]) + stats.norm(means[k, c, o], np.sqrt(variances[k, c, o])).logpdf(
            X[s, t, o]).sum() for c in range(2)]
        log_emission[s, t, k] = logsumexp(per_component)
    expected = [logsumexp([np.log(model.startprob.detach().numpy()[z[0]]) + sum(log_emission[s, t, z[t]] for t in range(n))
                           + sum(np.log(model.transmat.detach().numpy()[z[t - 1], z[t]]) for t in range(1, n))
                           for z in itertools.product(range(2), repeat=n)]) for s, n in enumerate(lengths)]
    np.testing.assert_allclose(model.score_samples(X, lengths).numpy(), expected, rtol=0, atol=1e-10)


# --- Baum-Welch on incomplete sequences ------------------------------------------------------------
def count_data(symbols: int | None, seed: int) -> np.ndarray:
    """Sequences (S, T) of codes or (S, T, 2) of counts from a 2-state chain, with missing entries."""
    rng = np.random.default_rng(seed)
    states = (np.cumsum(rng.random((6, 40)) < 0.1, axis=1) % 2)
    if symbols is not None:
        probs = np.array([[0.6, 0.3, 0.05, 0.05], [0.05, 0.1, 0.35, 0.5]])
        X = (rng.random((6, 40, 1)) > probs[states].cumsum(-1)).sum(-1).astype(float)
    else:
        X = rng.poisson(np.array([[1.0, 6.0], [5.0, 0.5]])[states]).astype(float)
    X[holes(X.shape, 0.2, seed + 1)] = np.nan
    return X


MODELS = {
    "gaussian-full": lambda **o: torch_em.GaussianHMM(K, "full", reg_covar=0.0, **o),
    "gaussian-diag": lambda **o: torch_em.GaussianHMM(K, "diag", reg_covar=0.0, **o),
    "categorical": lambda **o: torch_em.CategoricalHMM(2, 4, **o),
    "poisson": lambda **o: torch_em.PoissonHMM(2, **o),
    "gmm-hmm": lambda **o: torch_em.GMMHMM(2, 2, "full", **o),
    "product": lambda **o: torch_em.HMM(K, torch_em.families.Product(
        [(torch_em.families.Gaussian("full"), [0, 1]), (torch_em.families.Poisson(), [2])]), **o),
}


def model_data(name: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    if name in ("categorical", "poisson"):
        X = count_data(4 if name == "categorical" else None, seed)
    else:
        X = regime_data(6, 40, seed)
        if name == "product":  # the third coordinate as counts
            X[..., 2] = np.abs(np.round(2 * X[..., 2]))
    return X, np.array([40, 23, 40, 9, 40, 31])


@pytest.mark.parametrize("name", list(MODELS))
def test_baum_welch_never_decreases_the_observed_data_log_likelihood(name):
    X, lengths = model_data(name)
    model = quiet(MODELS[name](missing="marginalize", seed=0, dtype=F64, tol=0.0, max_iter=25).fit, X, lengths)
    history = model.lower_bound_history_
    assert history.shape == (25,) and bool(torch.isfinite(history).all())
    assert bool((history.diff() >= -1e-12).all()), history.diff().min()
    assert float(history[-1]) > float(history[0]) + 1e-3


@pytest.mark.parametrize("name", ["gaussian-full", "gaussian-diag", "poisson"])
def test_the_fit_is_a_stationary_point_of_the_observed_data_log_likelihood(name):
    X, lengths = model_data(name, seed=5)
    X, lengths = X[:4, :25], np.minimum(lengths[:4], 25)
    model = MODELS[name](missing="marginalize", seed=0, dtype=F64, tol=1e-13, max_iter=5000)

    def gradient() -> torch.Tensor:
        model.zero_grad()
        model.log_prob(X, lengths).sum().backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    model.initialize(X, lengths)
    start = gradient()
    model.fit(X, lengths)
    assert bool(model.converged_)
    at_fit = gradient()
    assert float(at_fit.norm()) < 1e-4 * float(start.norm()), (float(at_fit.norm()), float(start.norm()))
    # the lower bound is the observed-data log-likelihood per step
    assert float(model.lower_bound_) == pytest.approx(float(model.score(X, lengths)) / lengths.sum(), abs=1e-9)


@pytest.mark.parametrize("name", list(MODELS))
def test_marginalize_without_nan_fits_exactly_as_the_default(name):
    X, lengths = model_data(name, seed=2)
    X = np.where(np.isnan(X), 1.0, X)
    default = quiet(MODELS[name](seed=0, dtype=F64, max_iter=10).fit, X, lengths)
    marginal = quiet(MODELS[name](seed=0, dtype=F64, max_iter=10, missing="marginalize").fit, X, lengths)
    assert_same_parameters(parameters(marginal), parameters(default), atol=0)
    assert torch.equal(marginal.lower_bound_history_, default.lower_bound_history_)


def test_a_batch_of_hmms_on_ragged_sequences_equals_each_fitted_alone():
    data = np.stack([regime_data(8, 40, seed) for seed in (10, 11, 12)])  # (3, S, T, D)
    data[:, 6:] = np.where(np.isnan(data[:, 6:]), 0.5, data[:, 6:])  # complete: their chunk takes the ordinary path
    lengths = np.array([40, 12, 40, 4, 21, 40, 33, 40])
    start = dict(gaussian_start("full", seed=1), dtype=F64, tol=1e-8, max_iter=300, missing="marginalize")
    start["means_init"] = REGIME_MEANS + 0.5
    batched = quiet(torch_em.GaussianHMM(K, "full", batch_shape=(3,), **start).fit, data, lengths)
    assert len(set(batched.n_iter_.tolist())) > 1  # the models converge on their own
    chunked = quiet(torch_em.GaussianHMM(K, "full", batch_shape=(3,), chunk_size=80, **start).fit, data, lengths)
    assert_same_parameters(parameters(chunked), parameters(batched), atol=1e-9)
    for m in range(3):
        alone = quiet(torch_em.GaussianHMM(K, "full", **start).fit, data[m], lengths)
        assert int(alone.n_iter_) == int(batched.n_iter_[m])
        assert_same_parameters({k: v[m] for k, v in parameters(batched).items()}, parameters(alone), atol=1e-9)
        torch.testing.assert_close(batched.score_samples(data, lengths)[m], alone.score_samples(data[m], lengths),
                                   atol=1e-9, rtol=0)


def test_sequence_weights_equal_repeated_sequences():
    X = regime_data(5, 30, seed=18)
    lengths = np.array([30, 11, 30, 6, 25])
    start = dict(gaussian_start("full", seed=3), dtype=F64, tol=0.0, max_iter=10, missing="marginalize")
    weighted = quiet(torch_em.GaussianHMM(K, "full", **start).fit, X, lengths, sample_weight=[2, 1, 1, 3, 1])
    repeat = [0, 0, 1, 2, 3, 3, 3, 4]
    repeated = quiet(torch_em.GaussianHMM(K, "full", **start).fit, X[repeat], lengths[repeat])
    assert_same_parameters(parameters(weighted), parameters(repeated), atol=1e-10)


def test_float32_fit_follows_the_float64_fit():
    X = regime_data(8, 60, seed=19)
    start = dict(gaussian_start("full", seed=4), tol=0.0, max_iter=10, missing="marginalize")
    f64 = quiet(torch_em.GaussianHMM(K, "full", dtype=F64, **start).fit, X)
    f32 = quiet(torch_em.GaussianHMM(K, "full", dtype=torch.float32, **start).fit, X.astype(np.float32))
    assert abs(float(f32.lower_bound_) - float(f64.lower_bound_)) < 1e-5 * abs(float(f64.lower_bound_))
    torch.testing.assert_close(f32.means.double(), f64.means.detach(), atol=1e-3, rtol=0)
    torch.testing.assert_close(f32.predict_proba(X.astype(np.float32)).double(), f64.predict_proba(X), atol=1e-3, rtol=0)


def test_a_batch_source_fit_equals_the_fit_in_memory():
    X = regime_data(12, 30, seed=13)
    lengths = np.array([30, 7, 30, 19, 1, 30, 30, 22, 30, 3, 30, 30])
    start = dict(gaussian_start("diag", seed=2), dtype=F64, tol=0.0, max_iter=8, missing="marginalize")
    in_memory = quiet(torch_em.GaussianHMM(K, "diag", **start).fit, X, lengths)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.as_tensor(X), torch.as_tensor(lengths)),
                                         batch_size=5)
    streamed = quiet(torch_em.GaussianHMM(K, "diag", **start).fit, loader)
    assert_same_parameters(parameters(streamed), parameters(in_memory), atol=1e-10)
    torch.testing.assert_close(streamed.lower_bound_, in_memory.lower_bound_, atol=1e-12, rtol=0)
    initialised = torch_em.GaussianHMM(K, "diag", seed=0, missing="marginalize", dtype=F64, max_iter=5)
    assert bool(torch.isfinite(quiet(initialised.fit, loader).lower_bound_))  # initialised on imputed steps


def test_partial_fit_on_incomplete_sequences_is_an_em_step():
    X = regime_data(10, 30, seed=14)
    model = torch_em.GaussianHMM(K, "full", dtype=F64, seed=0, learning_decay=0.0, missing="marginalize").initialize(X)
    assert bool(torch.isfinite(model.means).all())
    continued = copy.deepcopy(model)
    continued.warm_start, continued.max_iter = True, 1
    quiet(continued.fit, X)
    model.partial_fit(X)  # rho = 1: the statistics of this batch alone
    assert_same_parameters(parameters(model), parameters(continued), atol=1e-9)
    fresh = torch_em.GaussianHMM(K, "diag", dtype=F64, seed=0, missing="marginalize")
    for batch in np.split(X, 5):
        fresh.partial_fit(batch)
    assert bool(torch.isfinite(fresh.score(X)))


def test_steps_with_nothing_observed_only_carry_the_chain():
    """A sequence whose middle steps are all missing scores as the sequence without them with the
    transition matrix raised to the gap's power; its missing steps' posteriors follow the chain."""
    model = torch_em.GaussianHMM(K, "diag", D, missing="marginalize", dtype=F64, **gaussian_start("diag", seed=4))
    rng = np.random.default_rng(5)
    observed = rng.normal(0, 2, (2, D))
    gapped = np.stack([observed[0], np.full(D, np.nan), np.full(D, np.nan), observed[1]])[None]
    startprob, transmat = model.startprob.detach().numpy(), model.transmat.detach().numpy()
    log_emission = observed_log_densities(observed[None], model.means.detach().numpy(),
                                          model.covariances.detach().numpy(), "diag")[0]
    three_steps = np.linalg.matrix_power(transmat, 3)
    joint = startprob[:, None] * np.exp(log_emission[0])[:, None] * three_steps * np.exp(log_emission[1])[None]
    assert float(model.score(gapped)) == pytest.approx(np.log(joint.sum()), abs=1e-12)
    everything_missing = np.full((1, 4, D), np.nan)
    assert float(model.score(everything_missing)) == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(model.predict_proba(everything_missing)[0, 2].numpy(), startprob @ transmat @ transmat,
                               atol=1e-12)


# --- bad input ---------------------------------------------------------------------------------------
def test_nan_without_the_option_is_rejected_naming_it_and_changes_nothing():
    X = regime_data(4, 20, seed=15)
    complete = np.where(np.isnan(X), 0.0, X)
    model = quiet(torch_em.GaussianHMM(K, "diag", seed=0, dtype=F64, max_iter=5).fit, complete)
    before = copy.deepcopy(model.state_dict())
    for call in (model.fit, model.partial_fit, model.score, model.predict, model.predict_proba):
        with pytest.raises(ValueError, match=r"X must be finite, got \d+ NaN value\(s\); .*missing='marginalize'"):
            call(X)
    after = model.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)
    marginal = torch_em.GaussianHMM(K, "diag", seed=0, dtype=F64, max_iter=5, missing="marginalize")
    quiet(marginal.fit, X)
    marginal.partial_fit(X)
    before = copy.deepcopy(marginal.state_dict())
    infinite = X.copy()
    infinite[1, 3, 0] = np.inf
    for call in (marginal.fit, marginal.partial_fit, marginal.score):
        with pytest.raises(ValueError, match=r"finite \(or NaN for a missing entry\)"):
            call(infinite)
    after = marginal.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[key], after[key]) for key in before)
    with pytest.raises(ValueError, match="missing must be one of"):
        torch_em.GaussianHMM(2, missing="impute")
    with pytest.raises(ValueError, match="X"):  # the support is checked on the observed entries
        torch_em.PoissonHMM(2, missing="marginalize").fit(np.array([[[1.0, np.nan], [-1.0, 2.0]]]))


def test_von_mises_fisher_emissions_cannot_have_missing_coordinates():
    X = np.random.default_rng(16).normal(size=(3, 10, 3))
    X /= np.linalg.norm(X, axis=-1, keepdims=True)
    X[0, 2, 1] = np.nan
    model = torch_em.HMM(2, torch_em.families.VonMisesFisher(), missing="marginalize", dtype=F64)
    with pytest.raises(ValueError, match="cannot be missing alone"):
        model.fit(X)
    assert not model.is_initialized


def test_the_option_is_saved_with_the_model(tmp_path):
    X = regime_data(4, 20, seed=17)
    model = quiet(torch_em.GaussianHMM(K, "full", seed=0, dtype=F64, max_iter=5, missing="marginalize").fit, X)
    model.save(tmp_path / "hmm.pt")
    loaded = torch_em.load(tmp_path / "hmm.pt")
    assert loaded.missing == "marginalize"
    torch.testing.assert_close(loaded.score_samples(X), model.score_samples(X), atol=0, rtol=0)
