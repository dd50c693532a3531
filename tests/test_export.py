"""Evaluation traces: ``torch.export`` (dynamic rows), ONNX (dynamo), ``torch.func.vmap`` and
``torch.compile(fullgraph=True)`` of ``log_prob``, ``predict_proba`` and ``predict`` give eager's
values, with the validation of eager calls unchanged."""
from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest
import torch

import torch_em
from torch_em import em
from torch_em.own_reference import OwnReference

from conftest import COVARIANCE_TYPES, blobs

ROWS = torch.export.Dim("rows", min=1, max=100_000)


class Evaluation(torch.nn.Module):
    """What a deployed mixture computes: log-density, responsibilities and labels of X."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.model.log_prob(X), self.model.predict_proba(X), self.model.predict(X)


def fitted(covariance_type: str = "full", batch_shape=(), dtype=torch.float32) -> torch_em.GaussianMixture:
    X = torch.as_tensor(blobs(), dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch_em.ConvergenceWarning)
        return torch_em.GaussianMixture(3, covariance_type=covariance_type, batch_shape=batch_shape, seed=0,
                                        dtype=dtype).fit(X)


def new_rows(n: int, dtype=torch.float32, seed: int = 1) -> torch.Tensor:
    return torch.as_tensor(blobs(seed=seed)[:n], dtype=dtype)


def assert_matches_eager(outputs, model, X):
    log_prob, proba, labels = (output.detach() for output in outputs)
    expected = model.log_prob(X).detach()  # float32: 1e-6 relative to the log-densities' size
    torch.testing.assert_close(log_prob, expected, rtol=0, atol=1e-6 * (1 + float(expected.abs().max())))
    torch.testing.assert_close(proba, model.predict_proba(X), rtol=0, atol=1e-6)
    assert torch.equal(labels, model.predict(X))


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
@pytest.mark.parametrize("batch_shape", [(), (2,)], ids=["single", "batch"])
def test_export_with_dynamic_rows_matches_eager_on_another_row_count(covariance_type, batch_shape):
    model = fitted(covariance_type, batch_shape)
    program = torch.export.export(Evaluation(model), (new_rows(10),), dynamic_shapes=({0: ROWS},))
    X = new_rows(173)  # not the example's 10 rows
    outputs = program.module()(X)
    assert outputs[0].shape == (*batch_shape, 173) and outputs[1].shape == (*batch_shape, 173, 3)
    assert_matches_eager(outputs, model, X)


def far_narrow_model() -> tuple[torch_em.GaussianMixture, torch.Tensor]:
    """A float32 mixture with a narrow component far from the others: evaluated directly
    (about its own mean), which eager mode decides by a test on the parameters."""
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(size=(300, 2)), 1e4 + 1e-3 * rng.normal(size=(200, 2))]).astype(np.float32)
    model = torch_em.GaussianMixture(2, covariance_type="full", seed=0, dtype=torch.float32).fit(X)
    return model, torch.as_tensor(X)


def test_components_with_their_own_reference_trace_to_the_eager_values():
    model, X = far_narrow_model()
    params = model._working_parameters()
    weights = params.latent["log_weights"]
    reference = model._evaluation_reference(weights, params.emission, shared=True)
    own = OwnReference.of(model.family, params.emission, weights, reference, evaluation=True)
    assert own is not None and own.index.numel() >= 1  # the direct path is taken in eager mode
    rows = X[::3]
    with torch.no_grad():  # the expansion alone, about the shared reference, misses the narrow component
        eta, const = em.joint_parameters(model.latent, model.family, params, reference)
        expanded = em.emission_log_prob(*model.family.features(rows, reference), eta, const)[0, 0].mT  # (n, K)
    assert float((expanded - model.log_joint(rows)).abs().max()) > 1e-2
    program = torch.export.export(Evaluation(model), (X[:7],), dynamic_shapes=({0: ROWS},))
    assert_matches_eager(program.module()(rows), model, rows)
    mapped = torch.func.vmap(model.log_prob)(rows[None])[0]
    torch.testing.assert_close(mapped, model.log_prob(rows).detach(), rtol=0, atol=1e-5)


def test_vmap_over_a_batch_of_datasets_equals_a_loop():
    model = fitted("full", batch_shape=(2,))
    datasets = torch.stack([new_rows(40, seed=seed) for seed in range(5)])  # (5, 40, 3)
    mapped = torch.func.vmap(model.log_prob)(datasets)  # (5, 2, 40)
    looped = torch.stack([model.log_prob(X) for X in datasets])
    torch.testing.assert_close(mapped, looped, rtol=0, atol=1e-5)
    proba = torch.func.vmap(model.predict_proba)(datasets)
    torch.testing.assert_close(proba, torch.stack([model.predict_proba(X) for X in datasets]), rtol=0, atol=1e-6)
    assert torch.equal(torch.func.vmap(model.predict)(datasets), torch.stack([model.predict(X) for X in datasets]))


def test_vmap_over_per_model_data_of_a_batch():
    model = fitted("diag", batch_shape=(2,))
    datasets = torch.stack([new_rows(30, seed=seed).expand(2, 30, 3) + seed for seed in range(3)])  # (3, 2, 30, 3)
    mapped = torch.func.vmap(model.log_prob)(datasets)
    torch.testing.assert_close(mapped, torch.stack([model.log_prob(X) for X in datasets]), rtol=0, atol=1e-5)


def _has_compiler() -> bool:
    return shutil.which("cc") is not None or shutil.which("gcc") is not None


@pytest.mark.skipif(not _has_compiler(), reason="torch.compile needs a C compiler (the inductor toolchain)")
def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    model = fitted("full")
    compiled = torch.compile(model.log_prob, fullgraph=True, dynamic=False)
    X = new_rows(50)
    torch.testing.assert_close(compiled(X), model.log_prob(X), rtol=0, atol=1e-5)


def test_onnx_dynamo_export_runs_in_onnxruntime_as_eager(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    onnxruntime = pytest.importorskip("onnxruntime")
    model = fitted("full", batch_shape=(2,))
    path = tmp_path / "gmm.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Evaluation(model), (new_rows(10),), str(path), dynamo=True,
                          input_names=["X"], output_names=["log_prob", "proba", "labels"],
                          dynamic_shapes=({0: ROWS},))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    X = new_rows(61)
    outputs = [torch.from_numpy(value) for value in session.run(None, {"X": X.numpy()})]
    assert_matches_eager(outputs, model, X)


def test_eager_validation_is_unchanged_and_traced_calls_check_shapes():
    model = fitted("full")
    bad = new_rows(10)
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="X must be finite, got 1 NaN"):
        model.log_prob(bad)
    with pytest.raises(ValueError, match=r"X must have shape \(N, D=3\), got \(10, 2\)"):
        torch.func.vmap(model.log_prob)(new_rows(10)[None, :, :2])


def test_tracing_leaves_the_eager_caches_real():
    """A traced call computes the Gaussian's index tables afresh: the eager calls after it use
    real tensors (a cache filled while tracing would hold fake ones)."""
    model = fitted("tied")
    from torch_em.families import gaussian

    gaussian._triu_indices.cache_clear()
    torch.export.export(Evaluation(model), (new_rows(10),), dynamic_shapes=({0: ROWS},))
    X = new_rows(20)
    rows, cols = gaussian._triu_indices(3, X.device)
    assert type(rows) is torch.Tensor and rows.tolist() == [0, 0, 0, 1, 1, 2] and cols.tolist() == [0, 1, 2, 1, 2, 2]
    assert torch.isfinite(model.log_prob(X)).all()


class SequenceEvaluation(torch.nn.Module):
    """The log-likelihood of every sequence under an HMM, without a graph."""

    def __init__(self, model: torch_em.HMM) -> None:
        super().__init__()
        self.model = model

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model.log_prob(X)


def test_hmm_log_prob_exports_for_sequences_of_the_shape_it_was_exported_with():
    """The forward recursion picks its schedule from the sizes, so (S, T) are fixed at export."""
    g = np.random.default_rng(0)
    states = (np.arange(40) // 10) % 2
    X = torch.as_tensor(g.normal(size=(8, 40, 2)) + 4.0 * states[None, :, None], dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch_em.ConvergenceWarning)
        model = torch_em.GaussianHMM(2, "full", batch_shape=(2,), seed=0, dtype=torch.float32).fit(X)
    program = torch.export.export(SequenceEvaluation(model), (X[:3],))
    other = X[5:] + 0.5
    torch.testing.assert_close(program.module()(other), model.log_prob(other).detach(), rtol=1e-6, atol=1e-6)
