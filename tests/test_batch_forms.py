"""Batches as DataLoaders yield them, everywhere: partial_fit takes (x, y) tuples and {"x": ...}
dicts as fit's batch sources do, and the evaluation methods take batch sources (streamed)."""
import copy

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import torch_em
from conftest import blobs

F64 = torch.float64


def fitted() -> tuple[torch_em.GaussianMixture, torch.Tensor]:
    X = torch.as_tensor(blobs(200))
    return torch_em.GaussianMixture(3, seed=0, dtype=F64).fit(X), X


def test_partial_fit_takes_tuples_and_dicts_like_a_batch_source():
    X = torch.as_tensor(blobs(200))
    labels = torch.zeros(len(X))
    plain, as_tuple, as_dict = (torch_em.GaussianMixture(3, seed=0, dtype=F64) for _ in range(3))
    for batch, label in zip(X.split(150), labels.split(150)):
        plain.partial_fit(batch)
        as_tuple.partial_fit((batch, label))
        as_dict.partial_fit({"x": batch, "label": label})
    for model in (as_tuple, as_dict):
        for name, value in plain.state_dict().items():
            assert torch.equal(model.state_dict()[name], value), name


def test_fit_takes_a_loader_of_dicts():
    X = torch.as_tensor(blobs(200))
    in_memory = torch_em.GaussianMixture(3, seed=0, dtype=F64, max_iter=5, tol=0.0)
    streamed = copy.deepcopy(in_memory)
    with pytest.warns(torch_em.ConvergenceWarning):
        in_memory.fit(X)
    with pytest.warns(torch_em.ConvergenceWarning):
        streamed.fit(lambda: ({"x": batch} for batch in X.split(128)))
    torch.testing.assert_close(streamed.means, in_memory.means, rtol=1e-10, atol=1e-10)


def test_a_dict_batch_without_the_data_key_is_rejected():
    model = torch_em.GaussianMixture(2, seed=0)
    with pytest.raises(ValueError, match="'x'"):
        model.partial_fit({"features": torch.randn(10, 2)})


@pytest.mark.parametrize("method", ["score_samples", "predict", "predict_proba", "score", "bic", "aic"])
def test_evaluation_over_a_loader_equals_evaluation_in_memory(method):
    model, X = fitted()
    loader = DataLoader(TensorDataset(X, torch.zeros(len(X))), batch_size=97)
    expected = getattr(model, method)(X)
    streamed = getattr(model, method)(loader)
    if method == "predict":
        assert torch.equal(streamed, expected)
    else:
        torch.testing.assert_close(streamed, expected, rtol=1e-12, atol=1e-10)


def test_weighted_score_over_a_callable_source():
    model, X = fitted()
    weights = np.random.default_rng(0).integers(0, 3, len(X)).astype(float)
    expected = model.score(X, sample_weight=weights)
    streamed = model.score(lambda: iter(X.split(50)), sample_weight=weights)
    torch.testing.assert_close(streamed, expected, rtol=1e-12, atol=0)
