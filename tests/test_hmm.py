"""torch_em.HMM as a model: input forms, batches of models, restarts, T=1, online EM, streams,
gradients, state, bad input. (Baum-Welch against hmmlearn: test_hmm_hmmlearn.py; the
forward-backward numerics against brute force: test_markov_inference.py.)"""
import copy
import warnings

import numpy as np
import pytest
import torch

import torch_em

F64 = torch.float64
TRUE_TRANSMAT = np.array([[0.85, 0.10, 0.05], [0.10, 0.80, 0.10], [0.05, 0.15, 0.80]])
TRUE_MEANS = np.array([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]])


def regime_sequences(n_sequences: int, length: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Observations (S, T, 2) and states (S, T) of a 3-state Gaussian HMM."""
    rng = np.random.default_rng(seed)
    states = np.zeros((n_sequences, length), dtype=int)
    states[:, 0] = rng.integers(0, 3, n_sequences)
    for t in range(1, length):
        u = rng.random(n_sequences)[:, None]
        states[:, t] = (u > TRUE_TRANSMAT[states[:, t - 1]].cumsum(1)).sum(1)
    return TRUE_MEANS[states] + rng.normal(0, 1, (n_sequences, length, 2)), states


def quiet(function, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch_em.ConvergenceWarning)
        return function(*args, **kwargs)


def start_values() -> dict:
    return dict(startprob_init=np.full(3, 1 / 3), transmat_init=np.full((3, 3), 1 / 3),
                means_init=TRUE_MEANS + 0.5, precisions_init=np.ones((3, 2)))


def parameters(model) -> dict:
    return {name: value.detach().clone() for name, value in model.named_parameters()}


def assert_same_parameters(a: dict, b: dict, atol=1e-10):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)


def test_recovers_a_known_chain_and_decodes_it():
    X, states = regime_sequences(30, 100)
    model = torch_em.GaussianHMM(3, "diag", seed=0, dtype=F64).fit(X)
    # learned state of each true state: the one whose mean is nearest
    learned_of = torch.cdist(torch.as_tensor(TRUE_MEANS), model.means.detach()).argmin(1).numpy()  # (3,)
    assert sorted(learned_of.tolist()) == [0, 1, 2]
    true_of = np.argsort(learned_of)
    assert (true_of[model.predict(X).numpy()] == states).mean() > 0.95
    learned = model.transmat.detach().numpy()[np.ix_(learned_of, learned_of)]
    np.testing.assert_allclose(learned, TRUE_TRANSMAT, atol=0.04)
    history = model.lower_bound_history_
    assert bool((history[1:] - history[:-1] >= -1e-12).all()), "the log-likelihood decreased"


def test_padded_ragged_concatenated_and_padding_values_agree():
    X, _ = regime_sequences(6, 40, seed=1)
    lengths = np.array([40, 1, 17, 33, 2, 25])
    concatenated = np.concatenate([X[i, :n] for i, n in enumerate(lengths)])
    padded_nan = X.copy()
    for i, n in enumerate(lengths):
        padded_nan[i, n:] = np.nan
    fits = []
    for data, kwargs in [(X, dict(lengths=lengths)), (padded_nan, dict(lengths=lengths)),
                         (concatenated, dict(lengths=lengths)),
                         (X, dict(mask=np.arange(40) < lengths[:, None]))]:
        model = torch_em.GaussianHMM(3, "full", max_iter=5, tol=0.0, dtype=F64, startprob_init=np.full(3, 1 / 3),
                                     transmat_init=np.full((3, 3), 1 / 3), means_init=TRUE_MEANS + 0.5,
                                     precisions_init=np.broadcast_to(np.eye(2), (3, 2, 2)).copy())
        quiet(model.fit, data, **kwargs)
        fits.append(model)
    for model in fits[1:]:
        assert_same_parameters(parameters(model), parameters(fits[0]))
    # every sequence's log-likelihood equals the sequence scored alone
    per_sequence = fits[0].score_samples(X, lengths)
    for i, n in enumerate(lengths):
        alone = fits[0].score_samples(X[i:i + 1, :n])
        torch.testing.assert_close(alone[0], per_sequence[i], atol=1e-10, rtol=0)
    states = fits[0].predict(X, lengths)
    assert bool((states[torch.arange(40) >= torch.as_tensor(lengths)[:, None]] == -1).all())
    flat = fits[0].predict(concatenated, lengths)
    assert flat.shape == (lengths.sum(),)
    assert torch.equal(flat, states[torch.arange(40) < torch.as_tensor(lengths)[:, None]])


def test_batched_models_converge_on_their_own_and_equal_the_model_fitted_alone():
    data = np.stack([regime_sequences(8, 30, seed=s)[0] for s in range(3)])
    init = dict(startprob_init=np.full(3, 1 / 3), transmat_init=np.full((3, 3), 1 / 3), means_init=TRUE_MEANS + 0.5,
                precisions_init=np.ones((3, 2)))
    batched = quiet(torch_em.GaussianHMM(3, "diag", batch_shape=(3,), dtype=F64, tol=1e-6, max_iter=200, **init).fit,
                    data)
    for m in range(3):
        alone = quiet(torch_em.GaussianHMM(3, "diag", dtype=F64, tol=1e-6, max_iter=200, **init).fit, data[m])
        assert int(alone.n_iter_) == int(batched.n_iter_[m])
        assert_same_parameters({k: v[m] for k, v in parameters(batched).items()}, parameters(alone), atol=1e-9)


def test_a_batch_of_models_with_its_own_data_takes_ragged_sequences():
    """Per-model data (M, S, T, D) with ragged lengths shared by the models: the padded steps'
    zero weights are shared, (S,), and a model's lower bound is that of its data alone."""
    data = np.stack([regime_sequences(5, 30, seed=s)[0] for s in range(2)])
    lengths = np.array([30, 12, 30, 4, 21])
    init = dict(start_values(), dtype=F64, tol=0.0, max_iter=5)
    batched = quiet(torch_em.GaussianHMM(3, "diag", batch_shape=(2,), **init).fit, data, lengths)
    for m in range(2):
        alone = quiet(torch_em.GaussianHMM(3, "diag", **init).fit, data[m], lengths)
        assert_same_parameters({k: v[m] for k, v in parameters(batched).items()}, parameters(alone), atol=1e-10)
        torch.testing.assert_close(batched.lower_bound_[m], alone.lower_bound_, atol=1e-12, rtol=0)


def test_restarts_pick_the_best_lower_bound():
    X, _ = regime_sequences(10, 40, seed=2)
    model = quiet(torch_em.GaussianHMM(3, "diag", n_init=4, seed=1, dtype=F64, init_params="random").fit, X)
    bounds = [float(quiet(torch_em.GaussianHMM(3, "diag", seed=1, dtype=F64, init_params="random").fit, X).lower_bound_)]
    assert float(model.lower_bound_) >= bounds[0] - 1e-9


def test_single_step_sequences_fit_as_a_mixture():
    """With every sequence of length 1 the chain is only its start: an HMM is a mixture whose
    weights are the start probabilities."""
    X, _ = regime_sequences(400, 1, seed=3)
    means, precisions = TRUE_MEANS + 0.5, np.ones((3, 2))
    hmm_model = torch_em.GaussianHMM(3, "diag", dtype=F64, max_iter=30, tol=0.0, startprob_init=np.full(3, 1 / 3),
                                     transmat_init=np.full((3, 3), 1 / 3), means_init=means, precisions_init=precisions)
    quiet(hmm_model.fit, X)
    mixture = torch_em.GaussianMixture(3, covariance_type="diag", dtype=F64, max_iter=30, tol=0.0,
                                       weights_init=np.full(3, 1 / 3), means_init=means, precisions_init=precisions)
    quiet(mixture.fit, X[:, 0])
    torch.testing.assert_close(hmm_model.startprob, mixture.weights, atol=1e-10, rtol=0)
    torch.testing.assert_close(hmm_model.means, mixture.means, atol=1e-10, rtol=0)
    torch.testing.assert_close(hmm_model.covariances, mixture.covariances, atol=1e-10, rtol=0)
    torch.testing.assert_close(hmm_model.score_samples(X), mixture.score_samples(X[:, 0]), atol=1e-10, rtol=0)


def test_float32_fit_matches_float64():
    X, _ = regime_sequences(4, 2_000, seed=4)
    init = dict(startprob_init=np.full(3, 1 / 3), transmat_init=np.full((3, 3), 1 / 3), means_init=TRUE_MEANS + 0.5,
                precisions_init=np.ones((3, 2)), max_iter=10, tol=0.0)
    f64 = quiet(torch_em.GaussianHMM(3, "diag", dtype=torch.float64, **init).fit, X)
    f32 = quiet(torch_em.GaussianHMM(3, "diag", dtype=torch.float32, **init).fit, X.astype(np.float32))
    assert abs(float(f32.lower_bound_) - float(f64.lower_bound_)) < 1e-5 * abs(float(f64.lower_bound_))
    np.testing.assert_allclose(f32.transmat.detach().double().numpy(), f64.transmat.detach().numpy(), atol=1e-3)
    np.testing.assert_allclose(f32.means.detach().double().numpy(), f64.means.detach().numpy(), atol=1e-3)
    total64 = f64.score(X)
    total32 = f32.score(X.astype(np.float32))
    assert abs(float(total32) - float(total64)) <= 1e-4 * abs(float(total64))


def test_log_prob_is_differentiable_and_gradient_steps_raise_it():
    X, _ = regime_sequences(5, 50, seed=5)
    X = torch.as_tensor(X)
    model = torch_em.GaussianHMM(3, "diag", n_features=2, dtype=F64, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    before = float(model.score(X))
    for _ in range(60):
        optimizer.zero_grad()
        loss = -model.log_prob(X).sum()
        loss.backward()
        optimizer.step()
    after = float(model.score(X))
    assert after > before + 10
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in model.parameters())


def test_partial_fit_replacing_statistics_is_one_em_step():
    X, _ = regime_sequences(10, 40, seed=6)
    model = torch_em.GaussianHMM(3, "full", dtype=F64, seed=0, learning_decay=0.0).initialize(X)
    continued = copy.deepcopy(model)
    continued.warm_start, continued.max_iter = True, 1
    quiet(continued.fit, X)
    model.partial_fit(X)  # rho = 1: the statistics of this batch alone
    assert_same_parameters(parameters(model), parameters(continued), atol=1e-9)
    # the running statistics live in buffers: a state_dict resumes the stream exactly
    clone = torch_em.GaussianHMM(3, "full", dtype=F64, learning_decay=0.0)
    clone.load_state_dict(model.state_dict())
    model.partial_fit(X[:5])
    clone.partial_fit(X[:5])
    assert_same_parameters(parameters(model), parameters(clone), atol=0)


def test_online_em_over_batches_of_sequences_improves_the_fit():
    X, _ = regime_sequences(60, 50, seed=7)
    model = torch_em.GaussianHMM(3, "diag", dtype=F64, seed=0)
    scores = []
    for batch in np.split(X, 12):
        model.partial_fit(batch)
        scores.append(float(model.score(X)))
    assert scores[-1] > scores[0]
    assert model.stream_transitions.shape == (3, 3) and model.stream_start.shape == (3,)


def test_batch_source_fit_equals_fit_in_memory():
    X, _ = regime_sequences(12, 30, seed=8)
    lengths = np.array([30, 7, 30, 19, 1, 30, 30, 22, 30, 3, 30, 30])
    init = dict(startprob_init=np.full(3, 1 / 3), transmat_init=np.full((3, 3), 1 / 3), means_init=TRUE_MEANS + 0.5,
                precisions_init=np.ones((3, 2)), max_iter=8, tol=0.0, dtype=F64)
    in_memory = quiet(torch_em.GaussianHMM(3, "diag", **init).fit, X, lengths)
    Xt, lt = torch.as_tensor(X), torch.as_tensor(lengths)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(Xt, lt), batch_size=5)
    streamed = quiet(torch_em.GaussianHMM(3, "diag", **init).fit, loader)
    assert_same_parameters(parameters(streamed), parameters(in_memory), atol=1e-10)
    torch.testing.assert_close(streamed.lower_bound_, in_memory.lower_bound_, atol=1e-12, rtol=0)


def test_sequence_weights_equal_repeated_sequences():
    X, _ = regime_sequences(6, 25, seed=9)
    init = dict(startprob_init=np.full(3, 1 / 3), transmat_init=np.full((3, 3), 1 / 3), means_init=TRUE_MEANS + 0.5,
                precisions_init=np.ones((3, 2)), max_iter=6, tol=0.0, dtype=F64)
    counts = np.array([1, 3, 0, 2, 1, 1])
    weighted = quiet(torch_em.GaussianHMM(3, "diag", **init).fit, X, sample_weight=counts)
    repeated = quiet(torch_em.GaussianHMM(3, "diag", **init).fit, np.repeat(X, counts, axis=0))
    assert_same_parameters(parameters(weighted), parameters(repeated), atol=1e-10)


def test_em_parameters_hold_the_transition_matrix():
    X, _ = regime_sequences(10, 40, seed=10)
    transmat = np.array([[0.5, 0.25, 0.25], [0.25, 0.5, 0.25], [0.25, 0.25, 0.5]])
    model = torch_em.GaussianHMM(3, "diag", dtype=F64, seed=0, transmat_init=transmat,
                                 em_parameters=["start_logits", "loc", "raw_precision_cholesky"])
    quiet(model.fit, X)
    np.testing.assert_allclose(model.transmat.detach().numpy(), transmat, atol=1e-12)
    assert float(model.lower_bound_) > -5


def test_categorical_hmm_sampling_and_refit():
    emission = np.array([[0.7, 0.2, 0.1], [0.1, 0.2, 0.7]])
    source = torch_em.CategoricalHMM(2, 3, startprob_init=[0.5, 0.5], transmat_init=[[0.9, 0.1], [0.2, 0.8]],
                                     emissionprob_init=emission, dtype=F64)
    codes, states = source.sample(40, 60, seed=3)
    assert codes.shape == (40, 60, 1) and states.shape == (40, 60)
    empirical = np.zeros((2, 2))
    np.add.at(empirical, (states[:, :-1].flatten().numpy(), states[:, 1:].flatten().numpy()), 1)
    np.testing.assert_allclose(empirical / empirical.sum(1, keepdims=True), [[0.9, 0.1], [0.2, 0.8]], atol=0.03)
    fitted = quiet(torch_em.CategoricalHMM(2, 3, seed=0, dtype=F64, tol=1e-7).fit, codes[..., 0])  # codes (S, T)
    learned = fitted.emissionprob.detach().numpy()
    learned = learned[np.argsort(learned[:, 0])[::-1]]
    np.testing.assert_allclose(learned, emission, atol=0.06)


def test_poisson_hmm_recovers_rates_and_information_criteria():
    source = torch_em.PoissonHMM(2, 2, startprob_init=[0.5, 0.5], transmat_init=[[0.95, 0.05], [0.05, 0.95]],
                                 lambdas_init=[[2.0, 9.0], [12.0, 1.0]], dtype=F64)
    counts, _ = source.sample(20, 100, seed=4)
    model = quiet(torch_em.PoissonHMM(2, seed=0, dtype=F64).fit, counts)
    rates = model.lambdas.detach().numpy()
    np.testing.assert_allclose(rates[np.argsort(rates[:, 0])], [[2.0, 9.0], [12.0, 1.0]], rtol=0.08)
    total = float(model.score(counts))
    n_parameters = 1 + 2 + 2 * 2  # start, transitions, rates
    assert model.n_parameters() == n_parameters
    assert float(model.bic(counts)) == pytest.approx(-2 * total + n_parameters * np.log(20 * 100))
    assert float(model.aic(counts)) == pytest.approx(-2 * total + 2 * n_parameters)


def test_gmm_hmm_fits_and_shapes():
    X, _ = regime_sequences(10, 40, seed=12)
    model = quiet(torch_em.GMMHMM(2, 3, "full", seed=0, dtype=F64).fit, X)
    assert model.weights.shape == (2, 3) and model.means.shape == (2, 3, 2) and model.covariances.shape == (2, 3, 2, 2)
    torch.testing.assert_close(model.weights.sum(-1), torch.ones(2, dtype=F64))
    sample, states = model.sample(2, 10, seed=0)
    assert sample.shape == (2, 10, 2) and states.max() < 2
    history = model.lower_bound_history_
    assert bool((history[1:] - history[:-1] >= -1e-10).all())


@pytest.mark.parametrize("call, message", [
    (lambda m, X: m.fit(X, lengths=[30, 30]), "lengths must have one entry per sequence"),
    (lambda m, X: m.fit(X[0], lengths=[10, 10]), "lengths must sum to the number of rows"),
    (lambda m, X: m.fit(X, lengths=[30, 0, 30, 30]), "lengths must be >= 1"),
    (lambda m, X: m.fit(X, lengths=[30, 31, 30, 30]), "at most the padded length"),
    (lambda m, X: m.fit(X, lengths=[1.5, 2, 3, 4]), "lengths must hold integers"),
    (lambda m, X: m.fit(np.where(np.arange(30)[None, :, None] == 3, np.nan, X)), "X"),
    (lambda m, X: m.fit(X[..., :1]), "feature"),
    (lambda m, X: m.fit(X[None, None]), "X must have shape"),
    (lambda m, X: m.fit(X, mask=np.arange(30)[None].repeat(4, 0) % 2 == 0), "prefix"),
    (lambda m, X: m.fit(X, lengths=[30] * 4, mask=np.ones((4, 30), bool)), "not both"),
    (lambda m, X: m.fit(X, sample_weight=[1, 1]), "sample_weight"),
])
def test_bad_input_raises_and_changes_nothing(call, message):
    X, _ = regime_sequences(4, 30, seed=13)
    model = quiet(torch_em.GaussianHMM(3, "diag", seed=0, dtype=F64).fit, X)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=message):
        call(model, X)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_category_codes_out_of_range_are_rejected():
    model = torch_em.CategoricalHMM(2, 3)
    with pytest.raises(ValueError, match="X"):
        model.fit(np.array([[0, 1, 2, 3]]))


def test_bad_initial_values_are_rejected():
    with pytest.raises(ValueError, match="transmat_init"):
        torch_em.GaussianHMM(2, n_features=1, transmat_init=[[0.5, 0.6], [0.5, 0.5]])
    with pytest.raises(ValueError, match="startprob_init"):
        torch_em.GaussianHMM(2, n_features=1, startprob_init=[1.0])
    with pytest.raises(ValueError, match="tied"):
        torch_em.GMMHMM(2, 2, "tied")
    with pytest.raises(ValueError, match="n_features"):
        torch_em.CategoricalHMM(2)


def test_not_fitted_raises():
    with pytest.raises(torch_em.NotFittedError):
        torch_em.GaussianHMM(2).predict(np.zeros((1, 3, 2)))


def test_an_empty_state_is_reseeded_and_the_fit_goes_on():
    """Five states for data with three regimes, started with two states on the same point:
    a state that loses every step is re-seeded instead of failing."""
    X, _ = regime_sequences(10, 40, seed=14)
    means = np.concatenate([TRUE_MEANS, [[50.0, 50.0], [60.0, -60.0]]])  # two states far from every step
    model = torch_em.GaussianHMM(5, "diag", dtype=F64, startprob_init=np.full(5, 0.2),
                                 transmat_init=np.full((5, 5), 0.2), means_init=means, precisions_init=np.ones((5, 2)))
    quiet(model.fit, X)
    assert not bool(model.failed_) and bool(torch.isfinite(model.means).all())
    assert float(model.means.detach().abs().max()) < 20  # the far states moved to the data


def test_float32_score_matches_float64_on_a_long_sequence():
    X, _ = regime_sequences(1, 100_000, seed=15)
    init = dict(startprob_init=np.full(3, 1 / 3), transmat_init=TRUE_TRANSMAT, means_init=TRUE_MEANS,
                precisions_init=np.ones((3, 2)))
    f64 = torch_em.GaussianHMM(3, "diag", n_features=2, dtype=torch.float64, **init)
    f32 = torch_em.GaussianHMM(3, "diag", n_features=2, dtype=torch.float32, **init)
    exact, approximate = float(f64.score(X)), float(f32.score(X.astype(np.float32)))
    assert abs(approximate - exact) <= 1e-6 * abs(exact), (approximate, exact)
    np.testing.assert_allclose(f32.predict_proba(X.astype(np.float32)).double().numpy(),
                               f64.predict_proba(X).numpy(), atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_fit_equals_cpu_fit():
    X, _ = regime_sequences(20, 300, seed=16)
    lengths = np.random.default_rng(0).integers(1, 301, 20)
    options = dict(startprob_init=np.full(3, 1 / 3), transmat_init=np.full((3, 3), 1 / 3), means_init=TRUE_MEANS + 0.5,
                   precisions_init=np.ones((3, 2)), max_iter=20, tol=0.0, dtype=F64)
    cpu = quiet(torch_em.GaussianHMM(3, "diag", **options).fit, X, lengths)
    gpu = quiet(torch_em.GaussianHMM(3, "diag", device="cuda", **options).fit, X, lengths)
    for name, value in parameters(cpu).items():
        torch.testing.assert_close(parameters(gpu)[name].cpu(), value, atol=1e-9, rtol=0, msg=name)
    assert torch.equal(gpu.predict(X, lengths).cpu(), cpu.predict(X, lengths))
    batched = quiet(torch_em.GaussianHMM(3, "diag", batch_shape=(50,), device="cuda", seed=0).fit,
                    np.broadcast_to(X, (50, *X.shape)).astype(np.float32), lengths)
    assert batched.transmat.shape == (50, 3, 3) and bool(torch.isfinite(batched.lower_bound_).all())


def test_gmm_hmm_initial_values_are_per_state_and_component():
    means = np.arange(2 * 3 * 2, dtype=float).reshape(2, 3, 2)
    model = torch_em.GMMHMM(2, 3, "diag", means_init=means)
    assert tuple(model.means_init.shape) == (2, 3, 2)
    np.testing.assert_array_equal(np.asarray(model.means_init), means)
    model.means_init = means + 1  # set per state and component as well
    model.precisions_init = np.ones((2, 3, 2))
    X, _ = regime_sequences(4, 20, seed=17)
    quiet(model.fit, X)
    assert tuple(model.means.shape) == (2, 3, 2) and tuple(model.precisions_init.shape) == (2, 3, 2)
