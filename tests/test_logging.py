"""The "torch_em" logger: a summary of every fit at INFO, re-seeding, compaction and online steps at DEBUG."""
import logging
import warnings

import numpy as np
import torch

import torch_em
from conftest import blobs


def test_a_fit_logs_its_summary_at_info(caplog):
    X = blobs(100)
    with caplog.at_level(logging.INFO, logger="torch_em"):
        torch_em.GaussianMixture(3, seed=0, batch_shape=(4,)).fit(X)
        torch_em.KMeans(3, seed=0).fit(X)
    messages = [record.getMessage() for record in caplog.records]
    assert any(m.startswith("GaussianMixture.fit: 4 model(s)") and "4 converged" in m for m in messages), messages
    assert any(m.startswith("KMeans.fit: 1 model(s)") for m in messages), messages


def test_reseeding_compaction_and_online_steps_log_at_debug(caplog):
    X = torch.as_tensor(blobs(100))
    means = np.concatenate([X[[0, 150, 250]].numpy(), np.full((1, X.shape[1]), 1e3)])  # a fourth component far away
    with caplog.at_level(logging.DEBUG, logger="torch_em"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch_em.GaussianMixture(4, means_init=means, dtype=torch.float64).fit(X)
        torch_em.GaussianMixture(3, seed=0, batch_shape=(8,), tol=1e-6).fit(X + torch.randn(8, *X.shape))
        torch_em.GaussianMixture(3, seed=0).partial_fit(X)
    messages = [record.getMessage() for record in caplog.records]
    assert any(m.startswith("re-seeding 1 empty component(s) in 1 model(s)") for m in messages), messages
    assert any("computing only the" in m for m in messages), messages
    assert any(m.startswith("GaussianMixture.partial_fit: step 1") for m in messages), messages


def test_nothing_is_logged_at_the_default_level(caplog):
    with caplog.at_level(logging.WARNING, logger="torch_em"):
        torch_em.GaussianMixture(2, seed=0).fit(blobs(50))
    assert not [r for r in caplog.records if r.name.startswith("torch_em")]
