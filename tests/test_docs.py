"""The code blocks of docs/architecture.md run as written (the family and latent-structure examples)."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

ARCHITECTURE = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"
BLOCKS = re.findall(r"```python\n(.*?)```", ARCHITECTURE.read_text(), flags=re.S)



def run_readme_block(heading: str) -> dict:
    """Execute the first python block under README's ``heading`` line; its namespace."""
    readme = Path(__file__).resolve().parents[1] / "README.md"
    block = re.search(re.escape(heading) + r"\n.*?```python\n(.*?)```", readme.read_text(), flags=re.S).group(1)
    namespace: dict = {}
    exec(compile(block, f"README.md ({heading.lstrip('# ')})", "exec"), namespace)
    return namespace

def test_the_architecture_document_has_its_two_examples():
    assert len(BLOCKS) == 2


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=["family", "latent-structure"][: len(BLOCKS)])
def test_architecture_code_block_runs(index):
    namespace: dict = {}
    exec(compile(BLOCKS[index], f"{ARCHITECTURE.name}[{index}]", "exec"), namespace)


def test_the_equal_weights_structure_fits_as_a_mixture_with_weights_held_equal():
    import warnings

    import torch

    import torch_em

    namespace: dict = {}
    exec(compile(BLOCKS[1], ARCHITECTURE.name, "exec"), namespace)
    result, X, theta = namespace["result"], namespace["X"], namespace["theta"]
    model = torch_em.GaussianMixture(2, n_features=2, covariance_type="diag", dtype=torch.float64, warm_start=True,
                                     em_parameters=("loc", "raw_precision_cholesky"), max_iter=100, tol=1e-8)
    model.load_state_dict({"logits": torch.zeros(2, dtype=torch.float64), "loc": theta["loc"][0, 0],
                           "raw_precision_cholesky": theta["raw_precision_cholesky"][0, 0]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch_em.ConvergenceWarning)
        model.fit(X)
    torch.testing.assert_close(model.means, result.theta["loc"][0, 0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(model.lower_bound_, result.lower_bound[0, 0], rtol=1e-12, atol=1e-12)
    assert int(model.n_iter_) == int(result.n_iter[0, 0])


def test_the_readme_tour_runs():
    readme = Path(__file__).resolve().parents[1] / "README.md"
    tour = re.search(r"## A short tour\n\n```python\n(.*?)```", readme.read_text(), flags=re.S).group(1)
    namespace: dict = {}
    exec(compile(tour, "README.md (tour)", "exec"), namespace)
    assert namespace["bootstrap"].means.shape == (16, 3, 2)


def test_the_readme_em_and_gradients_block_runs():
    readme = Path(__file__).resolve().parents[1] / "README.md"
    block = re.search(r"### EM and gradients in one model\n.*?```python\n(.*?)```", readme.read_text(), flags=re.S).group(1)
    namespace: dict = {}
    import warnings

    with warnings.catch_warnings():  # the block sets a warnings filter of its own
        exec(compile(block, "README.md (EM and gradients)", "exec"), namespace)
    head = namespace["head"]
    assert head.loc.grad is not None and torch_finite(head.loc)  # the optimizer trained the means


def torch_finite(tensor) -> bool:
    import torch

    return bool(torch.isfinite(tensor).all())


def test_the_readme_hmm_block_runs():
    namespace = run_readme_block("## Hidden Markov models")
    hmm, states = namespace["hmm"], namespace["states"]
    path, lengths = namespace["path"].numpy(), namespace["lengths"]
    valid = np.arange(200) < lengths[:, None]
    agreement = (path[valid] == states[valid]).mean()
    assert max(agreement, 1 - agreement) > 0.95  # the regimes are decoded (up to the states' order)
    assert hmm.means.grad is not None and bool(namespace["many"].converged_.all())


def test_the_readme_saving_and_exporting_block_runs():
    import torch

    namespace = run_readme_block("## Saving, loading and exporting a model")
    model, X = namespace["model"], namespace["X"]
    assert torch.equal(namespace["labels"], model.predict(X)) and namespace["log_prob"].shape == (3, 600)
    torch.testing.assert_close(namespace["log_prob"], model.log_prob(X).detach(), rtol=0, atol=1e-5)
    assert torch.equal(namespace["whole"].predict(X), model.predict(X)) and namespace["per_dataset"].shape == (4, 3, 150)


def test_the_readme_priors_block_runs():
    namespace = run_readme_block("## Prior knowledge: MAP-EM")
    assert bool(torch_finite(namespace["small"].covariances)) and namespace["sweep"].means.shape == (4, 3, 5)
    transmat = namespace["sticky"].transmat.detach()
    assert bool((transmat.diagonal() > 0.5).all())


def test_the_readme_annealing_block_runs():
    namespace = run_readme_block("## Escaping poor local optima: deterministic annealing")
    plain, annealed = namespace["plain"].lower_bound_, namespace["annealed"].lower_bound_
    assert float(annealed.median()) > float(plain.median())
    assert bool(namespace["both"].converged_) and int(namespace["both"].n_iter_) % 3 == 0


def test_the_readme_variational_bayes_block_runs():
    namespace = run_readme_block("## Variational Bayesian mixtures")
    weights = namespace["bgm"].weights_.detach().sort(descending=True).values
    assert bool((weights[:3] > 0.3).all()) and float(weights[3:].max()) < 0.01
    in_use = namespace["sweep"].weights_.detach() > 0.01
    assert bool((in_use.sum(-1) >= 3).all()) and bool(namespace["same_start"].converged_)


def test_the_readme_missing_data_block_runs():
    namespace = run_readme_block("## Incomplete data (missing values)")
    X, completed, draws = namespace["X"], namespace["completed"], namespace["draws"]
    holes = np.isnan(X)
    assert completed.shape == X.shape and draws.shape == (5, *X.shape)
    np.testing.assert_array_equal(completed.numpy()[~holes], X[~holes])
    assert namespace["error"] < 0.8 * namespace["mean_error"]  # conditional imputation beats the column means


def test_the_readme_incomplete_sequences_block_runs():
    namespace = run_readme_block("### Incomplete sequences (HMMs)")
    X, lengths, states, hmm = namespace["X"], namespace["lengths"], namespace["states"], namespace["hmm"]
    path, posteriors = namespace["path"].numpy(), namespace["posteriors"].numpy()
    assert np.isnan(X).all(-1).any() and posteriors.shape == (*X.shape[:2], 2)
    valid = np.arange(X.shape[1]) < lengths[:, None]
    assert (path[~valid] == -1).all()
    agreement = (path[valid] == states[valid]).mean()
    assert max(agreement, 1 - agreement) > 0.95  # the regimes decoded, dropped steps included (up to the labels)
    means = hmm.means.detach().numpy()
    np.testing.assert_allclose(means[np.argsort(means[:, 0])], [[0.0, 0.0], [3.0, -2.0]], atol=0.2)


def test_the_readme_standard_errors_block_runs():
    namespace = run_readme_block("## Standard errors and confidence intervals")
    lower, upper, means = namespace["lower"], namespace["upper"], namespace["gmm"].means.detach()
    assert lower.shape == (3, 2) and bool(((lower < means) & (means < upper)).all())
    assert namespace["boot"].samples["means"].shape == (200, 3, 2)
    assert bool(((namespace["ratio"] > 0.75) & (namespace["ratio"] < 1.33)).all())
