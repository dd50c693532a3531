"""A failing model never sinks a batch: with ``on_error="isolate"`` (the default for a batch) a
model whose M-step gives an invalid component, or whose log-likelihood is not finite, stops with
its last valid parameters and is marked, and every other model finishes exactly as if fitted
alone; ``on_error="raise"`` (the default for ``batch_shape=()``) raises as before."""
from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest
import torch
from sklearn.datasets import load_wine

import torch_em
from torch_em import em
from torch_em.latent import MIXTURE
from conftest import blobs
from test_batched import FITTED, TIGHT, assert_same_model, initial_parameters, model_at, per_model_data

F64 = torch.float64
DEGENERATE = 2  # the model of a batch of 4 whose data make a component degenerate
REASON = r"component \d of model \(2,\) is invalid: its covariance is not positive definite.*reg_covar"


def with_degenerate_model(n_models: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Per-model data (B, N, 3) and the same with a constant first feature in model 2: with
    reg_covar=0 every covariance of that model is singular."""
    healthy = per_model_data(n_models)
    bad = healthy.copy()
    bad[DEGENERATE, :, 0] = 4.0
    return healthy, bad


def fit_recording(model: torch_em.Mixture, X) -> tuple[torch_em.Mixture, list[warnings.WarningMessage]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(X)
    return model, caught


def messages(caught: list[warnings.WarningMessage], category: type[Warning]) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, category)]


def others(n_models: int = 4) -> list[int]:
    return [b for b in range(n_models) if b != DEGENERATE]


@pytest.mark.parametrize("covariance_type", ["full", "tied", "diag"])
def test_degenerate_model_fails_alone_and_the_others_equal_their_separate_fits(covariance_type):
    _, bad = with_degenerate_model()
    init = initial_parameters(bad, covariance_type)
    options = dict(covariance_type=covariance_type, reg_covar=0.0, tol=1e-6, max_iter=100, dtype=F64)
    batched, caught = fit_recording(torch_em.GaussianMixture(3, batch_shape=(4,), **init, **options), bad)

    assert batched.failed_.tolist() == [False, False, True, False]
    assert list(batched.failure_reasons_) == [(DEGENERATE,)]
    assert re.search(r"EM iteration 1: " + REASON, batched.failure_reasons_[(DEGENERATE,)])
    (warning,) = messages(caught, torch_em.FitFailedWarning)
    assert warning.startswith("1 of 4 model(s) failed") and "model (2,)" in warning
    assert not messages(caught, torch_em.ConvergenceWarning)  # the failed model does not count as unconverged
    for b in others():
        single = torch_em.GaussianMixture(3, **model_at(init, (b,)), **options).fit(bad[b])
        assert_same_model(batched, (b,), single)
    # The failed model keeps its last valid parameters: the given initial ones (its first M-step failed).
    np.testing.assert_allclose(batched.weights[DEGENERATE].detach().numpy(), init["weights_init"][DEGENERATE], rtol=1e-12)
    np.testing.assert_allclose(batched.means[DEGENERATE].detach().numpy(), init["means_init"][DEGENERATE], rtol=1e-12)
    np.testing.assert_allclose(batched.precisions[DEGENERATE].detach().numpy(), init["precisions_init"][DEGENERATE],
                               rtol=1e-12, atol=1e-14)
    assert math.isnan(float(batched.lower_bound_[DEGENERATE]))
    assert not bool(batched.converged_[DEGENERATE]) and int(batched.n_iter_[DEGENERATE]) == 0
    assert bool(torch.isnan(batched.lower_bound_history_[DEGENERATE]).all())


def test_evaluations_of_a_failed_model_are_nan_not_mixed_in():
    _, bad = with_degenerate_model()
    init = initial_parameters(bad, "full")
    options = dict(reg_covar=0.0, tol=1e-6, dtype=F64)
    batched, _ = fit_recording(torch_em.GaussianMixture(3, batch_shape=(4,), **init, **options), bad)
    X = torch.as_tensor(bad)
    keep = torch.tensor(others())
    score, bic, aic = batched.score(X), batched.bic(X), batched.aic(X)
    for value in (score, bic, aic):
        assert math.isnan(float(value[DEGENERATE])) and bool(torch.isfinite(value[keep]).all())
    assert bool(torch.isnan(batched.score_samples(X)[DEGENERATE]).all())
    assert bool(torch.isnan(batched.predict_proba(X)[DEGENERATE]).all())
    labels = batched.predict(X)
    assert bool((labels[DEGENERATE] == -1).all()) and bool((labels[keep] >= 0).all())
    # The valid models' values are those of the models fitted alone.
    single = torch_em.GaussianMixture(3, **model_at(init, (0,)), **options).fit(bad[0])
    torch.testing.assert_close(score[0], single.score(X[0]), **TIGHT)
    torch.testing.assert_close(bic[0], single.bic(X[0]), **TIGHT)
    assert torch.equal(labels[0], single.predict(X[0]))
    # log_prob stays the density of the parameters held (a pure, differentiable function of them).
    assert bool(torch.isfinite(batched.log_prob(X)[DEGENERATE]).all())


def test_failure_at_initialisation_is_isolated_and_the_others_match_a_healthy_batch():
    """Default (k-means++) initialisation: the random streams are per restart and shared by the
    models, so the reference is the same batch with a healthy model in place of the degenerate one."""
    healthy, bad = with_degenerate_model()
    options = dict(batch_shape=(4,), reg_covar=0.0, tol=1e-6, seed=3, dtype=F64)
    reference = torch_em.GaussianMixture(3, **options).fit(healthy)
    batched, caught = fit_recording(torch_em.GaussianMixture(3, **options), bad)
    assert batched.failed_.tolist() == [False, False, True, False]
    assert re.search(r"^initialisation: " + REASON, batched.failure_reasons_[(DEGENERATE,)])
    assert "model (2,)" in messages(caught, torch_em.FitFailedWarning)[0]
    assert_identical_except(batched, reference, DEGENERATE)
    # No valid initial parameters exist: the model holds the family's (finite) defaults, uniform weights.
    for name in FITTED:
        assert bool(torch.isfinite(getattr(batched, name)[DEGENERATE]).all()), name
    torch.testing.assert_close(batched.weights[DEGENERATE], torch.full((3,), 1 / 3, dtype=F64))
    assert int(batched.n_iter_[DEGENERATE]) == 0 and math.isnan(float(batched.lower_bound_[DEGENERATE]))


def test_unconverged_warning_does_not_count_failed_models():
    _, bad = with_degenerate_model()
    model = torch_em.GaussianMixture(3, batch_shape=(4,), reg_covar=0.0, tol=0.0, max_iter=3, seed=0, dtype=F64)
    model, caught = fit_recording(model, bad)
    (warning,) = messages(caught, torch_em.ConvergenceWarning)
    assert warning.startswith("3 of 4 model(s) did not converge")
    assert len(messages(caught, torch_em.FitFailedWarning)) == 1


def test_non_finite_log_likelihood_is_isolated():
    data = per_model_data(3)
    init = initial_parameters(data, "spherical")
    init["precisions_init"] = init["precisions_init"].copy()
    init["precisions_init"][1] = 1e308  # every squared distance of model 1 overflows
    options = dict(covariance_type="spherical", tol=1e-6, dtype=F64)
    batched, caught = fit_recording(torch_em.GaussianMixture(3, batch_shape=(3,), **init, **options), data)
    assert batched.failed_.tolist() == [False, True, False]
    assert re.search(r"^EM iteration 1: the log-likelihood of model \(1,\) is not finite",
                    batched.failure_reasons_[(1,)])
    assert "model (1,)" in messages(caught, torch_em.FitFailedWarning)[0]
    for b in (0, 2):
        single = torch_em.GaussianMixture(3, **model_at(init, (b,)), **options).fit(data[b])
        assert_same_model(batched, (b,), single)
    np.testing.assert_allclose(batched.means[1].detach().numpy(), init["means_init"][1], rtol=1e-12)


class LikelihoodFailsAt(em.EMMap):
    """The EM map of a mixture whose model ``model`` gets a log-likelihood of inf from E-step ``at`` on."""

    def __init__(self, data: em.Data, model: int, at: int):
        super().__init__(MIXTURE, data.family, data)
        self.model, self.at, self.calls = model, at, 0

    def statistics(self, params, own):
        self.calls += 1
        stats = super().statistics(params, own)
        if self.calls >= self.at and self.model is not None:
            stats.log_likelihood = stats.log_likelihood.clone()
            stats.log_likelihood[:, self.model] = math.inf
        return stats

    def models(self, index, n_models):
        """The map of fewer models (a compacted fit): model ``model`` keeps failing where it still runs."""
        selected = super().models(index, n_models)
        position = (index == self.model).nonzero().flatten().tolist()
        selected.model = position[0] if position else None
        return selected


def test_engine_restores_the_parameters_whose_lower_bound_was_last_computed():
    """The log-likelihood of model 1 turns non-finite at iteration 3, i.e. for the parameters of
    the second M-step: model 1 keeps those of the first M-step (what max_iter=1 returns)."""
    family = torch_em.Gaussian("full", 1e-6)
    X = torch.as_tensor(per_model_data(2))  # (2, N, 3)
    generator = torch.Generator().manual_seed(0)
    theta = family.default_parameters((1, 2), 3, 3, generator, X.device, F64)
    theta["loc"] = theta["loc"] + 2.0
    log_weights = torch.full((1, 2, 3), -math.log(3), dtype=F64)

    def data(x):
        return em.Data(family, x, family.reference(x), 256)

    def run(em_map, lw, th, max_iter, failures=None):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch_em.ConvergenceWarning)
            return em.run_em(em_map, em.Params({"log_weights": lw}, th), max_iter=max_iter, tol=1e-8, failures=failures)

    def plain(x):
        return em.EMMap(MIXTURE, family, data(x))

    failures = em.Failures.none(1, 2, X.device)
    result = run(LikelihoodFailsAt(data(X), model=1, at=3), log_weights, theta, 50, failures)
    assert failures.failed.tolist() == [[False, True]]
    assert failures.messages(lambda r, m: f"model {m}") == {
        (0, 1): "EM iteration 3: the log-likelihood of model 1 is not finite; "
                "use float64, scale the data or increase the regularisation"}
    one_step = run(plain(X[1:]), log_weights[:, 1:], {k: v[:, 1:] for k, v in theta.items()}, 1)
    torch.testing.assert_close(result.log_weights[0, 1], one_step.log_weights[0, 0], **TIGHT)
    for name in theta:
        torch.testing.assert_close(result.theta[name][0, 1], one_step.theta[name][0, 0], **TIGHT)
    assert math.isnan(float(result.lower_bound[0, 1])) and not bool(result.converged[0, 1])
    assert int(result.n_iter[0, 1]) == 2  # iterations before the one that failed
    assert not math.isnan(float(result.history[0, 1, 1])) and math.isnan(float(result.history[0, 1, 2]))
    alone = run(plain(X[:1]), log_weights[:, :1], {k: v[:, :1] for k, v in theta.items()}, 50)
    assert int(result.n_iter[0, 0]) == int(alone.n_iter[0, 0]) > 3
    for name in theta:
        torch.testing.assert_close(result.theta[name][0, 0], alone.theta[name][0, 0], **TIGHT)


def test_on_error_raise_raises_as_before_and_changes_nothing():
    healthy, bad = with_degenerate_model()
    model = torch_em.GaussianMixture(3, batch_shape=(4,), seed=0, dtype=F64, on_error="raise").fit(healthy)
    before = {name: value.detach().clone() for name, value in model.named_parameters()}
    model.family.reg_covar = 0.0
    with pytest.raises(torch_em.IllConditionedError, match=r"^initialisation: " + REASON):
        model.fit(bad)
    for name, value in model.named_parameters():
        assert torch.equal(value, before[name]), name
    assert model.failed_.tolist() == [False] * 4


def test_a_single_model_raises_by_default_and_can_isolate():
    X = blobs(30)
    X[:, 1] = 2.0  # a constant feature
    with pytest.raises(torch_em.IllConditionedError, match=r"component \d of the model is invalid"):
        torch_em.GaussianMixture(3, reg_covar=0.0, seed=0, dtype=F64).fit(X)
    model, caught = fit_recording(torch_em.GaussianMixture(3, reg_covar=0.0, seed=0, dtype=F64, on_error="isolate"), X)
    assert model.failed_.shape == () and bool(model.failed_)
    assert list(model.failure_reasons_) == [()]
    assert "component" in messages(caught, torch_em.FitFailedWarning)[0]
    assert math.isnan(float(model.score(X))) and bool((model.predict(X) == -1).all())


@pytest.mark.parametrize("value", ["ignore", "Raise", 1])
def test_on_error_is_validated(value):
    with pytest.raises(ValueError, match=r"on_error must be one of \['raise', 'isolate'\], got"):
        torch_em.GaussianMixture(2, on_error=value)
    with pytest.raises(ValueError, match=r"on_error must be one of"):
        torch_em.Mixture(torch_em.Poisson(), 2, batch_shape=(3,), on_error=value)


def duplicates_data() -> np.ndarray:
    """Three clusters and three identical far points: with reg_covar=0 a restart whose random
    initial centres put a component on those points (or let one collapse there) fails."""
    return np.concatenate([blobs(20, seed=1), np.tile([[30.0, 30.0, 30.0]], (3, 1))])


def test_a_failed_restart_loses_to_a_valid_one():
    X = duplicates_data()
    options = dict(covariance_type="full", reg_covar=0.0, seed=1, init_params="random_from_data", dtype=F64,
                   on_error="isolate")
    # Restart 0 alone fails (restart r draws the same whatever n_init is) ...
    alone, _ = fit_recording(torch_em.GaussianMixture(4, **options), X)
    assert bool(alone.failed_)
    # ... restart 1 does not, so the model with two restarts has not failed.
    model, caught = fit_recording(torch_em.GaussianMixture(4, n_init=2, **options), X)
    assert not bool(model.failed_) and model.failure_reasons_ == {}
    assert bool(model.converged_) and math.isfinite(float(model.lower_bound_))
    assert not messages(caught, torch_em.FitFailedWarning)
    assert math.isfinite(float(model.score(X)))
    with pytest.raises(torch_em.IllConditionedError, match=r"restart 0"):  # "raise" keeps today's behaviour
        torch_em.GaussianMixture(4, n_init=2, **dict(options, on_error="raise")).fit(X)


def test_a_model_fails_when_all_its_restarts_fail_with_the_reason_of_restart_0():
    _, bad = with_degenerate_model()
    model, _ = fit_recording(torch_em.GaussianMixture(3, batch_shape=(4,), n_init=3, reg_covar=0.0, seed=0, dtype=F64),
                             bad)
    assert model.failed_.tolist() == [False, False, True, False]
    assert re.search(r"^initialisation: component \d of model \(2,\) \(restart 0\) is invalid",
                    model.failure_reasons_[(DEGENERATE,)])


def test_partial_fit_skips_the_update_of_a_failing_model():
    healthy, bad = with_degenerate_model(3)
    init = initial_parameters(bad, "diag")
    options = dict(covariance_type="diag", reg_covar=0.0, dtype=F64)
    model = torch_em.GaussianMixture(3, batch_shape=(3,), **init, **options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.partial_fit(bad)
    assert model.failed_.tolist() == [False, False, True]
    assert re.search(r"^partial_fit: " + REASON, model.failure_reasons_[(DEGENERATE,)])
    assert len(messages(caught, torch_em.FitFailedWarning)) == 1
    assert math.isnan(float(model.lower_bound_[DEGENERATE])) and math.isfinite(float(model.lower_bound_[0]))
    np.testing.assert_allclose(model.means[DEGENERATE].detach().numpy(), init["means_init"][DEGENERATE], rtol=1e-12)
    assert float(model.stream_counts[DEGENERATE].abs().sum()) == 0.0  # no information taken from the batch
    for b in (0, 1):
        single = torch_em.GaussianMixture(3, **model_at(init, (b,)), **options).partial_fit(bad[b])
        for name in FITTED:
            torch.testing.assert_close(getattr(model, name)[b], getattr(single, name), **TIGHT)
    # A healthy batch next: the model recovers and its update is the M-step of that batch alone
    # (from its held parameters), as for a fresh model's first step.
    model.partial_fit(healthy)
    assert model.failed_.tolist() == [False, False, False]
    fresh = torch_em.GaussianMixture(3, **model_at(init, (DEGENERATE,)), **options).partial_fit(healthy[DEGENERATE])
    for name in FITTED:
        torch.testing.assert_close(getattr(model, name)[DEGENERATE], getattr(fresh, name), rtol=1e-8, atol=1e-10)


def bootstrap(X: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return X[rng.integers(0, len(X), size=(n_resamples, len(X)))]


def test_wine_bootstrap_float32_full():
    """The issue's case: 20 bootstrap resamples of wine, full covariances, float32. Resample 16
    draws from three distinct rows only and there is no regularisation (reg_covar=0: each of
    its components collapses onto a point, a singular covariance), and any other resample that
    fails on its own must fail alone: the rest are those of the batch in which resample 16 is an
    ordinary one, bit for bit but for the working batch's compaction (with resample 16 failed
    from the start, the running models are computed apart at another iteration, and a float32
    GEMM over another number of models may round its last bit otherwise)."""
    X = load_wine().data
    healthy = bootstrap(X, 20, seed=0)
    degenerate = healthy.copy()
    degenerate[16] = X[np.resize([0, 60, 130], len(X))]
    options = dict(covariance_type="full", batch_shape=(20,), seed=0, dtype=torch.float32, reg_covar=0.0)
    reference, _ = fit_recording(torch_em.GaussianMixture(3, **options), healthy)
    model, caught = fit_recording(torch_em.GaussianMixture(3, **options), degenerate)
    assert bool(model.failed_[16]) and "model (16,)" in messages(caught, torch_em.FitFailedWarning)[0]
    assert re.search(r"component \d of model \(16,\) is invalid", model.failure_reasons_[(16,)])
    assert torch.equal(model.failed_ & ~reference.failed_, torch.arange(20) == 16)
    assert_identical_except(model, reference, 16, rounding=16 * torch.finfo(torch.float32).eps)
    with pytest.raises(torch_em.IllConditionedError, match=r"model \(16,\)"):
        torch_em.GaussianMixture(3, **options, on_error="raise").fit(degenerate)


def assert_identical_except(model: torch_em.GaussianMixture, reference: torch_em.GaussianMixture, b: int,
                            rounding: float = 0.0) -> None:
    """Every model but ``b`` of two batched fits has the same parameters and fit attributes,
    bit for bit (floating-point values to ``rounding`` of their largest entry, norm-wise, where given)."""
    keep = torch.arange(model.n_models) != b
    for name in (*FITTED, "lower_bound_", "n_iter_", "converged_", "failed_"):
        mine, theirs = getattr(model, name).detach()[keep], getattr(reference, name).detach()[keep]
        assert torch.equal(mine.isnan(), theirs.isnan()) if mine.is_floating_point() else True, name
        if mine.is_floating_point() and rounding:  # norm-wise: the largest difference against the largest entry
            gap = float((mine.nan_to_num() - theirs.nan_to_num()).abs().max())
            assert gap <= rounding * float(theirs.nan_to_num().abs().max()), (name, gap)
        else:
            assert torch.equal(mine.nan_to_num(), theirs.nan_to_num()) if mine.is_floating_point() else torch.equal(mine, theirs), name


@pytest.mark.parametrize("n_features", [2, 13], ids=["entrywise", "lapack"])
def test_gaussian_m_step_of_the_other_models_is_bit_for_bit_unchanged(n_features):
    """An invalid covariance in one model changes nothing in the others' M-step, on the entrywise
    path for D <= 3 and on the LAPACK path."""
    family = torch_em.Gaussian("full", reg_covar=0.0)
    generator = torch.Generator().manual_seed(0)
    X = torch.randn(3, 60, n_features, generator=generator, dtype=F64)  # (M, N, D)
    degenerate = X.clone()
    degenerate[1, :, 0] = 0.0  # a constant feature: singular covariances in model 1
    resp = torch.rand(3, 2, 60, generator=generator, dtype=F64).softmax(1)  # (M, K, N)

    def m_step(data):
        T, _ = family.features(data, None)
        return family.m_step(resp.sum(-1), resp @ T, None)

    (theta, valid), (healthy_theta, healthy_valid) = m_step(degenerate), m_step(X)
    assert valid.tolist() == [[True, True], [False, False], [True, True]] and bool(healthy_valid.all())
    for name in theta:
        assert bool(torch.isfinite(theta[name]).all()), name
        assert torch.equal(theta[name][[0, 2]], healthy_theta[name][[0, 2]]), name
