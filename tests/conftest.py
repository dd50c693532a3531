"""Shared fixtures: devices to parametrise over (CUDA skips cleanly without a GPU) and data."""
from __future__ import annotations

import numpy as np
import pytest
import torch

# Tests run on tiny tensors, where intra-op threads only add overhead (and contention on shared
# machines); one thread keeps the suite fast and its timings stable.
torch.set_num_threads(1)

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda", id="cuda",
        marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")],
    ),
]

COVARIANCE_TYPES = ["full", "tied", "diag", "spherical"]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


def blobs(n_per_cluster: int = 200, centres=((0.0, 0.0, 0.0), (5.0, 5.0, 0.0), (0.0, 6.0, 3.0)), seed: int = 0) -> np.ndarray:
    """Well-separated anisotropic Gaussian clusters, float64 (N, D)."""
    rng = np.random.default_rng(seed)
    centres = np.asarray(centres, dtype=float)
    parts = []
    for i, centre in enumerate(centres):
        mixing = np.eye(len(centre)) + 0.3 * rng.normal(size=(len(centre), len(centre)))
        parts.append(rng.normal(size=(n_per_cluster + 37 * i, len(centre))) @ mixing + centre)
    return np.concatenate(parts)


def mixture_em(family, data, log_weights, theta, **options):
    """``torch_em.em.run_em`` of a mixture of ``family`` from log-weights (R, M, K) and theta."""
    from torch_em import em
    from torch_em.latent import MIXTURE

    return em.run_em(em.EMMap(MIXTURE, family, data), em.Params({"log_weights": log_weights}, theta), **options)


def mixture_statistics(family, data, log_weights, theta):
    """One E-step of a mixture of ``family``: ``torch_em.em.e_step`` for data ``data``."""
    from torch_em import em
    from torch_em.latent import MIXTURE

    return em.e_step(MIXTURE, family, em.Params({"log_weights": log_weights}, theta), data)
