"""scikit-learn's own test files for Gaussian mixtures and k-means, run against torch_em.sklearn.

Each file is copied from the installed scikit-learn with only its import lines changed (the
estimators come from torch_em.sklearn; everything else, assertions included, stays), and run
by pytest in a subprocess. Tests of scikit-learn's private functions, of its functions k_means
and kmeans_plusplus, of array-API dispatch and of sparse input are skipped with the reasons
below; the others must pass at least as often as they do now, so a regression fails here.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

sklearn = pytest.importorskip("sklearn", minversion="1.6")

REPOSITORY = Path(__file__).resolve().parents[1]

PRIVATE = "calls scikit-learn's private functions or methods, not the estimator's public API"
FUNCTION = "tests a scikit-learn function (k_means, kmeans_plusplus), not an estimator"
ARRAY_API = "array-API dispatch: torch_em.sklearn takes numpy (and tensors through the module)"
SPARSE = "sparse input: torch_em's mixtures and k-means need dense data"

#: file -> (its path in scikit-learn, import lines replaced, tests skipped with their reasons).
UPSTREAM = {
    "test_gaussian_mixture.py": (
        "mixture/tests/test_gaussian_mixture.py",
        {"from sklearn.mixture import GaussianMixture": "from torch_em.sklearn import GaussianMixture"},
        {
            "test_suffstat_sk_full": PRIVATE,
            "test_suffstat_sk_tied": PRIVATE,
            "test_suffstat_sk_diag": PRIVATE,
            "test_gaussian_suffstat_sk_spherical": PRIVATE,
            "test_compute_log_det_cholesky": PRIVATE,
            "test_gaussian_mixture_log_probabilities": PRIVATE,
            "test_gaussian_mixture_precisions_init": PRIVATE + " (_set_parameters, _initialize)",
            "test_gaussian_mixture_all_init_does_not_estimate_gaussian_parameters":
                PRIVATE + " (counts calls of _estimate_gaussian_parameters)",
            "test_gaussian_mixture_array_api_compliance": ARRAY_API,
            "test_gaussian_mixture_raises_where_array_api_not_implemented": ARRAY_API,
        },
    ),
    "test_k_means.py": (
        "cluster/tests/test_k_means.py",
        {"from sklearn.cluster import KMeans, MiniBatchKMeans, k_means, kmeans_plusplus":
         "from sklearn.cluster import k_means, kmeans_plusplus\nfrom torch_em.sklearn import KMeans, MiniBatchKMeans"},
        {
            "test_relocate_empty_clusters": PRIVATE,
            "test_minibatch_update_consistency": PRIVATE,
            "test_minibatch_reassign": PRIVATE,
            "test_euclidean_distance": PRIVATE,
            "test_inertia": PRIVATE,
            "test_is_same_clustering": PRIVATE,
            "test_sample_weight_init": PRIVATE + " (_init_centroids)",
            "test_sample_weight_zero": PRIVATE + " (_init_centroids)",
            "test_k_means_function": FUNCTION,
            "test_kmeans_plusplus_wrong_params": FUNCTION,
            "test_kmeans_plusplus_output": FUNCTION,
            "test_kmeans_plusplus_norms": FUNCTION,
            "test_kmeans_plusplus_dataorder": FUNCTION,
            "test_dense_sparse": SPARSE,
            "test_predict_dense_sparse": SPARSE,
        },
    ),
}

#: Passed tests reached per file (the assertion below keeps them from regressing).
MIN_PASSED = {"test_gaussian_mixture.py": 56, "test_k_means.py": 121}

#: Fixtures of scikit-learn's own conftest, and the skips: by test name, and any parametrisation
#: with a sparse container.
CONFTEST = '''
import json
import numpy as np
import pytest
import scipy.sparse
import torch

torch.set_num_threads(1)  # as the project's conftest: tiny tensors, shared cores

SKIPPED = json.loads({skipped!r})
SPARSE = {sparse!r}


@pytest.fixture(params=[42])
def global_random_seed(request):
    return request.param


@pytest.fixture(params=[np.float32, np.float64], ids=["float32", "float64"])
def global_dtype(request):
    return request.param


def is_sparse(value):
    return scipy.sparse.issparse(value) or (isinstance(value, type) and issubclass(value, scipy.sparse.spmatrix | scipy.sparse.sparray))


def pytest_collection_modifyitems(config, items):
    for item in items:
        reason = SKIPPED.get(item.originalname)
        params = getattr(getattr(item, "callspec", None), "params", {{}})
        if reason is None and any(is_sparse(value) for value in params.values()):
            reason = SPARSE
        if reason is not None:
            item.add_marker(pytest.mark.skip(reason=reason))
'''


def copy_upstream(name: str, directory: Path) -> Path:
    """scikit-learn's test file ``name`` in ``directory`` with its imports swapped, and the conftest."""
    source, replacements, skipped = UPSTREAM[name]
    text = (Path(sklearn.__file__).parent / source).read_text()
    for old, new in replacements.items():
        assert old in text, f"{source} no longer has the line {old!r}"
        text = text.replace(old, new)
    (directory / name).write_text(text)
    (directory / "conftest.py").write_text(CONFTEST.format(skipped=json.dumps(skipped), sparse=SPARSE))
    return directory / name


def run_upstream(path: Path) -> tuple[dict[str, int], str]:
    """Run one copied test file: counts per outcome and pytest's output."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPOSITORY), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", "-W", "ignore", path.name],
        cwd=path.parent, env=env, capture_output=True, text=True, timeout=600,
    )
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    counts = {outcome: int(n) for n, outcome in re.findall(r"(\d+) (passed|failed|skipped|error|errors)", summary)}
    return counts, result.stdout + result.stderr


@pytest.mark.parametrize("name", sorted(UPSTREAM))
def test_scikit_learn_test_file(name, tmp_path):
    counts, output = run_upstream(copy_upstream(name, tmp_path))
    assert "error" not in counts and "errors" not in counts, output[-3000:]
    assert counts.get("passed", 0) >= MIN_PASSED[name], output[-3000:]
