"""SQUAREM (accelerate="squarem"): the same optimum as EM in far fewer EM-map evaluations, monotone."""
import warnings

import pytest
import torch

import torch_em
from torch_em.acceleration import extrapolate
from torch_em.em import Params

F64 = torch.float64


def hasselblad(accelerate):
    """Hasselblad's deaths-per-day data (frequencies of 0..9), a two-component Poisson mixture."""
    counts = torch.arange(10, dtype=F64)[:, None]
    frequencies = torch.tensor([162, 267, 271, 185, 111, 61, 27, 8, 3, 1], dtype=F64)
    family = torch_em.Poisson(rates_init=torch.tensor([[1.0], [2.5]]))
    model = torch_em.Mixture(family, 2, weights_init=torch.tensor([0.3, 0.7]), tol=1e-12, max_iter=5000, dtype=F64,
                             accelerate=accelerate)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch_em.ConvergenceWarning)
        model.fit(counts, sample_weight=frequencies)
    return model


def test_squarem_reaches_the_em_optimum_in_far_fewer_evaluations():
    plain, fast = hasselblad(None), hasselblad("squarem")
    assert int(fast.n_iter_) * 10 < int(plain.n_iter_)
    assert float(fast.lower_bound_) >= float(plain.lower_bound_) - 1e-12  # never a worse optimum
    torch.testing.assert_close(fast.weights, plain.weights, rtol=0, atol=2e-4)
    rates = [m.family.rates(m.theta()) for m in (plain, fast)]
    torch.testing.assert_close(rates[1], rates[0], rtol=0, atol=2e-4)
    assert int(fast.n_iter_) % 3 == 0  # three evaluations of the EM map per cycle


@pytest.mark.parametrize("kind", ["full", "diag"])
def test_squarem_is_monotone_and_matches_plain_em_on_a_gaussian_mixture(kind):
    g = torch.Generator().manual_seed(0)
    X = torch.cat([torch.randn(300, 2, generator=g, dtype=F64), torch.randn(300, 2, generator=g, dtype=F64) + 1.2])
    options = dict(covariance_type=kind, tol=1e-10, max_iter=3000, seed=0, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch_em.ConvergenceWarning)
        plain = torch_em.GaussianMixture(2, **options).fit(X)
        fast = torch_em.GaussianMixture(2, accelerate="squarem", **options).fit(X)
    history = fast.lower_bound_history_
    assert bool((history[1:] - history[:-1] >= -1e-13).all())
    assert int(fast.n_iter_) < int(plain.n_iter_)
    assert float(fast.lower_bound_) >= float(plain.lower_bound_) - 1e-9
    order = fast.means[:, 0].argsort(), plain.means[:, 0].argsort()
    torch.testing.assert_close(fast.means[order[0]], plain.means[order[1]], rtol=0, atol=1e-3)


def test_batched_squarem_takes_a_step_length_per_model():
    g = torch.Generator().manual_seed(1)
    datasets = torch.stack([torch.cat([torch.randn(200, 1, generator=g, dtype=F64),
                                       torch.randn(200, 1, generator=g, dtype=F64) + shift]) for shift in (0.8, 2.0, 4.0)])
    options = dict(tol=1e-9, max_iter=900, dtype=F64, accelerate="squarem", means_init=[[-0.5], [1.5]],
                   weights_init=[0.5, 0.5], precisions_init=[[[1.0]], [[1.0]]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch_em.ConvergenceWarning)
        batched = torch_em.GaussianMixture(2, batch_shape=(3,), **options).fit(datasets)
        for i in range(3):
            single = torch_em.GaussianMixture(2, **options).fit(datasets[i])
            assert int(batched.n_iter_[i]) == int(single.n_iter_)
            torch.testing.assert_close(batched.means[i], single.means, rtol=1e-6, atol=1e-8)  # rounding, amplified


def test_extrapolation_keeps_probabilities_normalised_and_structural_zeros():
    log_weights = torch.tensor([[[-0.1, -2.4, -float("inf")]]], dtype=F64).log_softmax(-1)
    start = Params({"log_weights": log_weights}, {"loc": torch.zeros(1, 1, 3, 1, dtype=F64)})
    one = Params({"log_weights": (log_weights + torch.tensor([0.1, -0.1, 0.0], dtype=F64)).log_softmax(-1)},
                 {"loc": torch.full((1, 1, 3, 1), 0.5, dtype=F64)})
    two = Params({"log_weights": (log_weights + torch.tensor([0.15, -0.15, 0.0], dtype=F64)).log_softmax(-1)},
                 {"loc": torch.full((1, 1, 3, 1), 0.75, dtype=F64)})
    moved, _ = extrapolate(start, one, two)
    assert float(moved.latent["log_weights"].exp().sum()) == pytest.approx(1.0, abs=1e-12)
    assert bool(torch.isneginf(moved.latent["log_weights"][..., 2]).all())
    # r = 0.5, v = -0.25 per entry: alpha = -2, theta' = 0 + 4 * 0.5 + 4 * (-0.25) = 1 (the limit of 0.5, 0.75, ...)
    same = {"log_weights": log_weights}
    moved, _ = extrapolate(Params(same, start.emission), Params(same, one.emission), Params(same, two.emission))
    torch.testing.assert_close(moved.emission["loc"], torch.ones(1, 1, 3, 1, dtype=F64))
    torch.testing.assert_close(moved.latent["log_weights"], log_weights)


def test_squarem_on_an_hmm_reaches_the_same_fit():
    g = torch.Generator().manual_seed(2)
    states = (torch.arange(400) // 40) % 2
    X = torch.tensor([[0.0], [1.0]], dtype=F64)[states] + torch.randn(400, 1, generator=g, dtype=F64)
    options = dict(covariance_type="diag", tol=1e-9, max_iter=3000, seed=0, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch_em.ConvergenceWarning)
        plain = torch_em.GaussianHMM(2, **options).fit(X)
        fast = torch_em.GaussianHMM(2, accelerate="squarem", **options).fit(X)
    assert float(fast.lower_bound_) >= float(plain.lower_bound_) - 1e-8
    assert int(fast.n_iter_) < int(plain.n_iter_)


def test_bad_accelerate_is_rejected():
    with pytest.raises(ValueError, match="accelerate"):
        torch_em.GaussianMixture(2, accelerate="aitken")
