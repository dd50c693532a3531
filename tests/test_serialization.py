"""``model.save`` / ``torch_em.load``: one file of plain values and tensors that
``torch.load(weights_only=True)`` reads without allow-listing, rebuilt bit for bit (every model
kind and family, batched, fitted and mid-stream, another dtype and device); whole modules through
``torch.save(model)``; bad files raise ValueError naming what was expected."""
from __future__ import annotations

import copy
import io
import pickle
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import torch_em
from torch_em import serialization
from torch_em.families import Bernoulli, Categorical, Exponential, Gamma, Gaussian, Poisson, Product, VonMisesFisher

from conftest import blobs

F64 = torch.float64
#: Everything a model file may hold: what torch's safe loader builds without allow-listing.
PLAIN = (type(None), bool, int, float, str, torch.Tensor)


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def gaussian_data(n: int = 240, seed: int = 0) -> np.ndarray:
    return blobs(n // 3, seed=seed)[:n]


def family_data(family_name: str, n: int = 240, seed: int = 0) -> np.ndarray:
    """Data in the domain of each family, float64 (n, D)."""
    g = rng(seed)
    if family_name == "bernoulli":
        return (g.random((n, 4)) < np.where(np.arange(n)[:, None] % 2, 0.2, 0.8)).astype(float)
    if family_name == "categorical":
        return g.integers(0, 4, size=(n, 2)).astype(float)
    if family_name in ("exponential", "gamma"):
        return g.gamma(2.0, np.where(np.arange(n)[:, None] % 2, 1.0, 5.0), size=(n, 2))
    if family_name == "poisson":
        return g.poisson(np.where(np.arange(n)[:, None] % 2, 2.0, 9.0), size=(n, 3)).astype(float)
    if family_name == "product":
        return np.concatenate([gaussian_data(n, seed)[:, :2], g.integers(0, 3, size=(n, 1))], axis=1)
    if family_name == "vmf":
        X = g.normal(size=(n, 3)) + np.where(np.arange(n)[:, None] % 2, 3.0, -3.0)
        return X / np.linalg.norm(X, axis=1, keepdims=True)
    return gaussian_data(n, seed)


FAMILIES = {
    "gaussian-full": lambda: Gaussian("full"),
    "gaussian-tied": lambda: Gaussian("tied"),
    "gaussian-diag": lambda: Gaussian("diag", reg_covar=1e-4),
    "gaussian-spherical": lambda: Gaussian("spherical"),
    "bernoulli": lambda: Bernoulli(),
    "categorical": lambda: Categorical(4),
    "exponential": lambda: Exponential(),
    "gamma": lambda: Gamma(max_shape=50.0),
    "poisson": lambda: Poisson(),
    "product": lambda: Product([(Gaussian("diag"), [0, 1]), (Categorical(3), slice(2, 3))]),
    "vmf": lambda: VonMisesFisher(max_concentration=500.0),
}


def quietly(fit, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch_em.ConvergenceWarning)
        warnings.simplefilter("ignore", torch_em.FitFailedWarning)
        return fit(*args, **kwargs)


def round_trip(model, **load_options):
    buffer = io.BytesIO()
    model.save(buffer)
    buffer.seek(0)
    return torch_em.load(buffer, **load_options)


def assert_plain(value, where="file"):
    """Only plain containers, Python scalars and tensors."""
    if isinstance(value, dict):
        for key, item in value.items():
            assert_plain(key, where)
            assert_plain(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for item in value:
            assert_plain(item, where)
    else:
        assert isinstance(value, PLAIN), f"{where} holds {type(value).__name__}"


def assert_same_tensor(a, b, what):
    if a is None or b is None:
        assert a is None and b is None, what
        return
    assert a.dtype == b.dtype and a.shape == b.shape, what
    assert torch.equal(a.cpu(), b.cpu()) or (a.is_floating_point() and torch.equal(a.isnan().cpu(), b.isnan().cpu())
                                               and torch.equal(a.nan_to_num().cpu(), b.nan_to_num().cpu())), what


def assert_same_config(mine, theirs, where="config"):
    """Equal configurations: the same values, tensors equal, families of the same class and config."""
    if isinstance(theirs, torch_em.ComponentFamily):
        assert type(mine) is type(theirs), where
        assert_same_config(mine.config(), theirs.config(), f"{where} ({type(theirs).__name__})")
    elif isinstance(theirs, dict):
        assert mine.keys() == theirs.keys(), where
        for key in theirs:
            assert_same_config(mine[key], theirs[key], f"{where}[{key!r}]")
    elif isinstance(theirs, (list, tuple)):
        assert len(mine) == len(theirs), where
        for a, b in zip(mine, theirs):
            assert_same_config(a, b, where)
    elif isinstance(theirs, (torch.Tensor, np.ndarray)):
        assert torch.equal(torch.as_tensor(mine), torch.as_tensor(theirs)), where
    else:
        assert mine == theirs, where


def assert_same_model(loaded, model, X, *evaluation_args):
    """Same class, configuration, state, fit attributes and evaluations, bit for bit."""
    assert type(loaded) is type(model)
    assert_same_config(loaded._config(), model._config())
    state, expected = loaded.state_dict(), model.state_dict()
    assert state.keys() == expected.keys()
    for key in expected:
        assert_same_tensor(state[key], expected[key], key)
    for name in serialization._attributes(type(model)):
        mine, theirs = getattr(loaded, name), getattr(model, name)
        if isinstance(theirs, torch.Tensor) or theirs is None:
            assert_same_tensor(mine, theirs, name)
        else:
            assert mine == theirs, name
    dtype = model.cluster_centers_.dtype if isinstance(model, torch_em.KMeans) else model.dtype
    assert getattr(loaded, loaded._dtype_buffer).dtype == dtype
    X = torch.as_tensor(X, dtype=dtype)
    methods = ("predict", "transform", "score") if isinstance(model, torch_em.KMeans) else (
        "log_prob", "predict", "predict_proba", "score_samples")
    for method in methods:
        mine, theirs = getattr(loaded, method)(X, *evaluation_args), getattr(model, method)(X, *evaluation_args)
        assert_same_tensor(mine.detach(), theirs.detach(), method)


# --- every model kind ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(FAMILIES))
def test_mixture_of_every_family_round_trips_bit_for_bit(name):
    X = family_data(name.split("-")[0])
    model = quietly(torch_em.Mixture(FAMILIES[name](), 2, batch_shape=(2,), seed=0, max_iter=20).fit, X)
    loaded = round_trip(model)
    assert_same_model(loaded, model, X)
    assert_same_config(loaded.family.config(), model.family.config())


@pytest.mark.parametrize("covariance_type", ["full", "tied", "diag", "spherical"])
def test_gaussian_mixture_with_initial_values_round_trips(covariance_type):
    X = gaussian_data()
    means = X[[0, 100, 200]]
    model = quietly(torch_em.GaussianMixture(3, covariance_type=covariance_type, batch_shape=(2, 1), seed=3,
                                             means_init=means, weights_init=[0.2, 0.3, 0.5], n_init=2,
                                             tol=1e-5).fit, X)
    loaded = round_trip(model)
    assert_same_model(loaded, model, X)
    assert torch.equal(loaded.means_init, torch.from_numpy(means)) and loaded.weights_init == [0.2, 0.3, 0.5]
    assert (loaded.covariance_type, loaded.reg_covar, loaded.n_init, loaded.seed) == (covariance_type, 1e-6, 2, 3)
    assert loaded.batch_shape == (2, 1) and loaded.lower_bound_history_.shape == model.lower_bound_history_.shape


def test_kmeans_round_trips_with_array_init_and_labels():
    X = gaussian_data()
    model = torch_em.KMeans(3, init=torch.as_tensor(X[[0, 100, 200]]), batch_shape=(2,), seed=0).fit(X)
    loaded = round_trip(model)
    assert_same_model(loaded, model, X)
    assert torch.equal(loaded.init, model.init) and torch.equal(loaded.labels_, model.labels_)


def sequences(n_sequences: int = 6, length: int = 40, seed: int = 0) -> np.ndarray:
    g = rng(seed)
    states = (np.arange(length) // 10) % 2
    return g.normal(size=(n_sequences, length, 2)) + 4.0 * states[None, :, None]


HMMS = {
    "hmm-gamma": (lambda: torch_em.HMM(2, Gamma(), batch_shape=(2,), seed=0, max_iter=10),
                  lambda: np.abs(sequences()) + 0.1),
    "gaussian-hmm": (lambda: torch_em.GaussianHMM(2, "full", batch_shape=(2,), seed=0, max_iter=10,
                                                  transmat_init=[[0.9, 0.1], [0.2, 0.8]]), sequences),
    "gmm-hmm": (lambda: torch_em.GMMHMM(2, n_mix=2, covariance_type="diag", seed=0, max_iter=10,
                                        means_init=np.zeros((2, 2, 2)) + np.arange(4).reshape(2, 2, 1)), sequences),
    "categorical-hmm": (lambda: torch_em.CategoricalHMM(2, n_features=3, seed=0, max_iter=10,
                                                        emissionprob_init=[[0.5, 0.3, 0.2], [0.1, 0.2, 0.7]]),
                        lambda: rng().integers(0, 3, size=(5, 30))),
    "poisson-hmm": (lambda: torch_em.PoissonHMM(2, batch_shape=(3,), seed=0, max_iter=10),
                    lambda: rng().poisson(3.0, size=(4, 30, 2)).astype(float)),
}


@pytest.mark.parametrize("name", list(HMMS))
def test_hidden_markov_models_round_trip_bit_for_bit(name):
    build, data = HMMS[name]
    X = data()
    model = quietly(build().fit, X)
    assert_same_model(round_trip(model), model, X)


def test_gmm_hmm_initial_values_come_back_in_the_users_shape():
    build, data = HMMS["gmm-hmm"]
    model = quietly(build().fit, data())
    loaded = round_trip(model)
    assert loaded._config()["means_init"].shape == (2, 2, 2)
    assert torch.equal(loaded.family.means_init, model.family.means_init)


# --- online state, failures, module flags ---------------------------------------------------------
def test_mid_stream_model_resumes_exactly_as_the_original():
    X = torch.as_tensor(gaussian_data(600))
    batches = X[torch.randperm(600, generator=torch.Generator().manual_seed(0))].split(100)
    model = torch_em.GaussianMixture(3, covariance_type="diag", batch_shape=(2,), seed=0, averaging_start=1)
    for batch in batches[:3]:
        model.partial_fit(batch)
    loaded = round_trip(model)
    assert int(loaded.stream_steps) == 3
    for batch in batches[3:]:
        model.partial_fit(batch)
        loaded.partial_fit(batch)
    assert_same_model(loaded, model, X)


def test_mid_stream_hmm_and_kmeans_resume_exactly():
    hmm = torch_em.GaussianHMM(2, batch_shape=(2,), seed=0)
    kmeans = torch_em.KMeans(3, seed=0, step_size=0.3)
    X = sequences(12)
    data = gaussian_data()
    hmm.partial_fit(X[:4])
    kmeans.partial_fit(data[:80])
    hmm_loaded, kmeans_loaded = round_trip(hmm), round_trip(kmeans)
    assert int(hmm_loaded.stream_steps) == 1 and int(kmeans_loaded.stream_steps) == 1
    for model in (hmm, hmm_loaded):
        model.partial_fit(X[4:8])
    for model in (kmeans, kmeans_loaded):
        model.partial_fit(data[80:160])
    assert_same_model(hmm_loaded, hmm, X)
    assert_same_model(kmeans_loaded, kmeans, data)


def test_failed_models_and_their_reasons_round_trip():
    healthy = np.stack([gaussian_data(seed=seed) for seed in range(4)])
    bad = healthy.copy()
    bad[2, :, 0] = 4.0  # a constant feature: with reg_covar=0 every covariance of model 2 is singular
    model = quietly(torch_em.GaussianMixture(3, batch_shape=(4,), reg_covar=0.0, seed=0, dtype=F64).fit, bad)
    assert model.failed_.tolist() == [False, False, True, False]
    loaded = round_trip(model)
    assert loaded.failure_reasons_ == model.failure_reasons_ and list(loaded.failure_reasons_) == [(2,)]
    assert_same_model(loaded, model, bad)
    assert bool(torch.isnan(loaded.score_samples(torch.as_tensor(bad))[2]).all())


def test_unfitted_model_dtype_that_follows_data_training_flag_and_frozen_parameters():
    unfitted = round_trip(torch_em.Mixture(Poisson(rates_init=[[1.0], [5.0]]), 2))
    assert not unfitted.is_initialized and unfitted._dtype_follows_data
    unfitted.fit(np.abs(gaussian_data())[:, :1].round())  # float64 data: the loaded model adopts float64
    assert unfitted.dtype == F64
    model = quietly(torch_em.GaussianMixture(3, seed=0, em_parameters=("loc", "raw_precision_cholesky")).fit,
                    gaussian_data()).eval()
    model.logits.requires_grad_(False)
    loaded = round_trip(model)
    assert not loaded.training and not loaded.logits.requires_grad and loaded.loc.requires_grad
    assert loaded.em_parameters == ("loc", "raw_precision_cholesky") and loaded._dtype_follows_data


# --- the file -----------------------------------------------------------------------------------
def test_the_file_is_plain_and_torch_reads_it_without_torch_em(tmp_path):
    model = quietly(torch_em.Mixture(FAMILIES["product"](), 2, seed=0).fit, family_data("product"))
    path = tmp_path / "product.pt"
    model.save(path)
    content = torch.load(path, weights_only=True)
    assert_plain(content)
    assert content["format"] == serialization.FORMAT == 1 and content["class"] == "Mixture"
    assert content["config"]["family"]["__family__"] == "Product"
    script = ("import sys, torch; content = torch.load(sys.argv[1], weights_only=True); "
              "assert 'torch_em' not in sys.modules; print(content['class'], sorted(content['state_dict']))")
    shown = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, check=True)
    assert shown.stdout.startswith("Mixture ['block0_loc'")


def test_another_dtype_is_kept_and_map_location_moves_the_model():
    X = gaussian_data()
    model = quietly(torch_em.GaussianMixture(3, seed=0, dtype=F64).fit, X)
    loaded = round_trip(model, map_location="cpu")
    assert loaded.dtype == F64 and loaded.means.dtype == F64 and loaded.device == torch.device("cpu")
    assert_same_model(loaded, model, X)
    as_float32 = round_trip(model.float())
    assert as_float32.dtype == torch.float32 and not as_float32._dtype_follows_data


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_a_cuda_model_loads_on_the_cpu_and_back():
    X = gaussian_data()
    model = quietly(torch_em.GaussianMixture(3, seed=0, device="cuda", dtype=F64).fit, X)
    on_cpu = round_trip(model, map_location="cpu")
    assert on_cpu.device.type == "cpu" and on_cpu.converged_.device.type == "cpu"
    torch.testing.assert_close(on_cpu.log_prob(X).detach(), model.log_prob(X).detach().cpu(), rtol=1e-12, atol=1e-12)
    back = round_trip(on_cpu, map_location="cuda")
    assert back.device.type == "cuda" and torch.equal(back.predict(X).cpu(), on_cpu.predict(X))


def test_whole_module_torch_save_loads_with_weights_only(tmp_path):
    X = gaussian_data()
    for model in (quietly(torch_em.GaussianMixture(3, batch_shape=(2,), seed=0).fit, X),
                  torch_em.KMeans(3, seed=0).fit(X),
                  quietly(torch_em.GaussianHMM(2, seed=0, max_iter=5).fit, sequences())):
        path = tmp_path / "whole.pt"
        torch.save(model, path)
        loaded = torch.load(path, weights_only=True)
        evaluation = sequences() if isinstance(model, torch_em.HMM) else X
        assert_same_model(loaded, model, evaluation)
        assert_same_model(torch_em.load(path), model, evaluation)
        assert_same_model(pickle.loads(pickle.dumps(model)), model, evaluation)


def test_copies_keep_their_attribute_by_attribute_meaning():
    model = quietly(torch_em.GaussianMixture(3, seed=0).fit, gaussian_data())
    model.note = "kept"  # an attribute the file format does not hold
    deep, shallow = copy.deepcopy(model), copy.copy(model)
    assert deep.note == "kept" and deep.loc is not model.loc and torch.equal(deep.loc, model.loc)
    assert shallow.note == "kept" and shallow.loc is model.loc


def first_rows(X, n_clusters, random_state):
    """A KMeans ``init`` callable (scikit-learn's signature)."""
    return X[:n_clusters]


def test_a_model_the_format_cannot_hold_is_rejected_by_save_and_pickles_as_before():
    model = torch_em.KMeans(3, init=first_rows).fit(gaussian_data())
    with pytest.raises(ValueError, match=r"KMeans configuration: a model file holds plain values.*got function"):
        model.save(io.BytesIO())
    copied = pickle.loads(pickle.dumps(model))  # attribute by attribute, the callable by reference
    assert copied.init is first_rows and torch.equal(copied.cluster_centers_, model.cluster_centers_)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(write(model), weights_only=True)

    class Custom(torch_em.GaussianMixture):
        pass

    with pytest.raises(ValueError, match=r"Custom is not a registered model class; register it with"):
        Custom(2).save(io.BytesIO())


def write(content) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(content, buffer)
    buffer.seek(0)
    return buffer


def saved_payload():
    return serialization.payload(quietly(torch_em.GaussianMixture(2, seed=0, max_iter=5).fit, gaussian_data()))


def test_newer_format_unknown_class_and_foreign_files_raise_value_errors():
    newer = {**saved_payload(), "format": 2}
    with pytest.raises(ValueError, match=r"format 2, newer than the formats up to 1 this torch_em reads"):
        torch_em.load(write(newer))
    with pytest.raises(ValueError, match=r"names the class 'Spline', expected one of \['Mixture', 'GaussianMixture'"):
        torch_em.load(write({**saved_payload(), "class": "Spline"}))
    with pytest.raises(ValueError, match=r"names the class 'Gaussian', expected one of"):
        torch_em.load(write({**saved_payload(), "class": "Gaussian"}))  # a family is not a model
    with pytest.raises(ValueError, match=r"holds a dict with the keys \['format', 'class', 'config'"):
        torch_em.load(write({"weights": torch.zeros(3)}))
    with pytest.raises(ValueError, match=r"holds a dict with the keys .*got Tensor"):
        torch_em.load(write(torch.zeros(3)))
    payload = saved_payload()
    del payload["attributes"]
    with pytest.raises(ValueError, match=r"it lacks \['attributes'\]"):
        torch_em.load(write(payload))
    with pytest.raises(ValueError, match=r"configuration \[.*'splines'.*\] does not fit GaussianMixture"):
        payload = saved_payload()
        torch_em.load(write({**payload, "config": {**payload["config"], "splines": 3}}))
    payload = saved_payload()
    payload["config"]["family"] = {"__family__": "Spline", "config": {}}
    with pytest.raises(ValueError, match=r"names the family 'Spline', expected one of \['Bernoulli'"):
        torch_em.load(write({**payload, "class": "Mixture"}))


def test_corrupted_files_raise_value_errors(tmp_path):
    path = tmp_path / "model.pt"
    quietly(torch_em.GaussianMixture(2, seed=0, max_iter=5).fit, gaussian_data()).save(path)
    data = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"is not a torch_em model file that torch.load\(weights_only=True\) reads"):
        torch_em.load(tmp_path / "cut.pt")
    (tmp_path / "text.pt").write_text("not a model")
    with pytest.raises(ValueError, match=r"is not a torch_em model file"):
        torch_em.load(tmp_path / "text.pt")
    payload = saved_payload()
    payload["state_dict"]["loc"] = payload["state_dict"]["loc"][:1]  # a state that does not fit the configuration
    with pytest.raises(ValueError, match=r"size mismatch for loc"):
        torch_em.load(write(payload))
