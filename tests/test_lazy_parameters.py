"""A model built without ``n_features`` follows torch's lazy-module convention (as ``nn.LazyLinear``):
its parameters are ``UninitializedParameter`` s from construction, materialised in place by the
first fit, partial_fit or load_state_dict, so an optimizer built before any data trains them."""
import copy
import io

import pytest
import torch
from torch.nn.parameter import UninitializedParameter

import torch_em

LAZY_MODELS = [
    pytest.param(lambda: torch_em.GaussianMixture(3, seed=0), id="GaussianMixture"),
    pytest.param(lambda: torch_em.GaussianMixture(3, covariance_type="diag", batch_shape=(2,), seed=0),
                 id="GaussianMixture-batched"),
    pytest.param(lambda: torch_em.BayesianGaussianMixture(3, seed=0), id="BayesianGaussianMixture"),
    pytest.param(lambda: torch_em.GaussianHMM(3, seed=0), id="GaussianHMM"),
    pytest.param(lambda: torch_em.GMMHMM(2, n_mix=2, seed=0), id="GMMHMM"),
]


def data(dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[-4.0, 0.0], [0.0, 3.0], [4.0, 0.0]])
    return (centres[torch.arange(300) % 3] + torch.randn(300, 2, generator=generator)).to(dtype)


@pytest.mark.parametrize("make", LAZY_MODELS)
def test_parameters_exist_uninitialized_before_fit(make):
    model = make()
    parameters = list(model.parameters())
    assert [name for name, _ in model.named_parameters()] == list(model._parameter_names)
    assert parameters and all(isinstance(p, UninitializedParameter) for p in parameters)
    assert all(p.requires_grad for p in parameters)
    assert not model.is_initialized
    assert dict(model.state_dict()) == {}  # nothing to save yet (as before the lazy convention)
    with pytest.raises(torch_em.NotFittedError):
        model(data())


@pytest.mark.parametrize("make", LAZY_MODELS)
@pytest.mark.parametrize("method", ["fit", "partial_fit"])
def test_optimizer_built_before_the_first_fit_trains_the_model(make, method):
    model = make()
    if method == "partial_fit" and isinstance(model, torch_em.BayesianGaussianMixture):
        pytest.skip("BayesianGaussianMixture has no partial_fit")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    X = data()
    getattr(model, method)(X)
    assert model.is_initialized
    live = list(model.parameters())
    held = optimizer.param_groups[0]["params"]
    assert len(held) == len(live) and all(a is b for a, b in zip(held, live))
    assert not any(isinstance(p, UninitializedParameter) for p in live)
    before = [p.detach().clone() for p in live]
    loss = -model(X).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    assert any(not torch.equal(old, new) for old, new in zip(before, model.parameters()))
    assert all(a is b for a, b in zip(held, model.parameters()))


@pytest.mark.parametrize("make", LAZY_MODELS)
def test_state_dict_roundtrip_into_a_lazy_model(make):
    X = data()
    fitted = make().fit(X)
    target = make()
    parameters = list(target.parameters())
    optimizer = torch.optim.SGD(target.parameters(), lr=0.1)
    target.load_state_dict(fitted.state_dict())
    assert target.is_initialized and target.n_features == 2
    assert all(a is b for a, b in zip(parameters, target.parameters()))
    assert all(a is b for a, b in zip(optimizer.param_groups[0]["params"], target.parameters()))
    for (name, value), (_, loaded) in zip(fitted.state_dict().items(), target.state_dict().items()):
        assert torch.equal(value, loaded), name
    torch.testing.assert_close(target(X), fitted(X), rtol=0, atol=0)
    # The (empty) state of a lazy model loads strictly into another one, which stays lazy.
    empty = make()
    assert empty.load_state_dict(make().state_dict()).missing_keys == []
    assert not empty.is_initialized
    assert list(empty.parameters()) and all(isinstance(p, UninitializedParameter) for p in empty.parameters())


@pytest.mark.parametrize("make", LAZY_MODELS)
def test_save_load_copy_and_pickle_of_a_lazy_model(make):
    model = make()
    buffer = io.BytesIO()
    model.save(buffer)
    buffer.seek(0)
    copies = [torch_em.load(buffer), copy.deepcopy(model)]
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    copies.append(torch.load(buffer, weights_only=True))
    X = data()
    for other in copies:
        assert not other.is_initialized
        assert list(other.parameters()) and all(isinstance(p, UninitializedParameter) for p in other.parameters())
        parameters = list(other.parameters())
        other.fit(X)
        assert all(a is b for a, b in zip(parameters, other.parameters()))
    assert not model.is_initialized  # the copies have their own parameters


def test_frozen_before_the_first_fit_stays_frozen_and_saves():
    model = torch_em.GaussianMixture(3, seed=0)
    model.loc.requires_grad = False
    buffer = io.BytesIO()
    model.save(buffer)
    buffer.seek(0)
    loaded = torch_em.load(buffer)
    for each in (model, loaded):
        each.fit(data())
        assert not each.loc.requires_grad and each.logits.requires_grad


@pytest.mark.parametrize("make", LAZY_MODELS)
@pytest.mark.parametrize("bad", ["nan", "too_few", "wrong_ndim"])
def test_rejected_fit_leaves_the_model_uninitialized(make, bad):
    model = make()
    parameters = list(model.parameters())
    assert parameters
    X = {"nan": torch.full((50, 2), float("nan")), "too_few": data()[:1], "wrong_ndim": torch.zeros(5)}[bad]
    with pytest.raises(ValueError):
        model.fit(X)
    assert not model.is_initialized and model.n_features is None and model.dtype == torch.float32
    assert all(a is b for a, b in zip(parameters, model.parameters()))
    assert all(isinstance(p, UninitializedParameter) for p in model.parameters())
    assert dict(model.state_dict()) == {}


def test_partial_state_not_strict_leaves_the_model_uninitialized():
    model = torch_em.GaussianMixture(3)
    result = model.load_state_dict({"loc": torch.zeros(3, 2)}, strict=False)
    assert result.unexpected_keys == ["loc"] and not model.is_initialized
    with pytest.raises(ValueError, match="lacks"):
        model.load_state_dict({"loc": torch.zeros(3, 2)})
    assert not model.is_initialized


@pytest.mark.parametrize("make", LAZY_MODELS)
@pytest.mark.parametrize("cast", ["to", "double"])
def test_cast_before_the_first_fit_gives_its_dtype(make, cast):
    model = make()
    model = model.to(torch.float64) if cast == "to" else model.double()
    parameters = list(model.parameters())
    assert parameters and all(isinstance(p, UninitializedParameter) and p.dtype == torch.float64 for p in parameters)
    model.fit(data(torch.float32))  # the explicit cast wins over the data's dtype
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert all(a is b for a, b in zip(parameters, model.parameters()))


def test_dtype_follows_the_data_of_the_first_fit():
    model = torch_em.GaussianHMM(3, seed=0)
    parameters = list(model.parameters())
    assert len(parameters) == 4
    model.fit(data(torch.float64))
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert all(a is b for a, b in zip(parameters, model.parameters()))


def test_n_features_given_still_builds_parameters_at_construction():
    model = torch_em.GaussianMixture(3, n_features=2)
    assert model.is_initialized
    assert not any(isinstance(p, UninitializedParameter) for p in model.parameters())
    assert set(model.state_dict()) >= set(model._parameter_names)


def test_kmeans_has_no_parameters_to_make_lazy():
    # KMeans keeps its centres in a buffer (no gradients): nothing for an optimizer before or after a fit.
    model = torch_em.KMeans(3, seed=0)
    assert list(model.parameters()) == []
    model.fit(data())
    assert list(model.parameters()) == []
