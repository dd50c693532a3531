"""torch_em.sklearn: scikit-learn's estimator checks, its model-selection tools, persistence,
dtypes and DataFrames, and agreement with scikit-learn's own estimators."""
from __future__ import annotations

import inspect
import io
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn", minversion="1.6")

import joblib  # noqa: E402  (a dependency of scikit-learn)
import sklearn.cluster  # noqa: E402
import sklearn.mixture  # noqa: E402
from sklearn.base import clone  # noqa: E402
from sklearn.exceptions import ConvergenceWarning, NotFittedError  # noqa: E402
from sklearn.model_selection import GridSearchCV, KFold, cross_val_score  # noqa: E402
from sklearn.pipeline import Pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

import torch_em  # noqa: E402
from torch_em.sklearn import GaussianMixture, KMeans, MiniBatchKMeans  # noqa: E402

COVARIANCE_TYPES = ["full", "tied", "diag", "spherical"]

#: Checks that pass sample weights on to the torch module.
SAMPLE_WEIGHT_CHECKS = [
    "check_sample_weights_pandas_series", "check_sample_weights_not_an_array", "check_sample_weights_list",
    "check_sample_weights_shape", "check_sample_weights_not_overwritten", "check_sample_weights_invariance",
    "check_sample_weight_equivalence_on_dense_data",
]
#: The torch module's methods that each estimator hands sample weights to.
WEIGHTED_METHODS = {
    GaussianMixture: (torch_em.GaussianMixture, ["fit"]),
    KMeans: (torch_em.KMeans, ["fit", "score"]),
    MiniBatchKMeans: (torch_em.KMeans, ["fit", "partial_fit", "score"]),
}


def module_takes_sample_weight(estimator) -> bool:
    """Whether the torch module's methods that the estimator uses take ``sample_weight``."""
    module_class, methods = WEIGHTED_METHODS[type(estimator)]
    return all("sample_weight" in inspect.signature(getattr(module_class, method)).parameters for method in methods)


def expected_failed_checks(estimator) -> dict[str, str]:
    """The estimator checks expected to fail, with the reason."""
    expected = {
        # scikit-learn marks this one so for its KMeans and MiniBatchKMeans: the random
        # initialisation draws rows, so repeating a row is not the same draw as weighing it.
        "check_sample_weight_equivalence_on_dense_data":
            "the random initialisation draws from the rows, so weighing a row is not repeating it",
    }
    if not module_takes_sample_weight(estimator):
        module_class, methods = WEIGHTED_METHODS[type(estimator)]
        reason = f"torch_em.{module_class.__name__}.{'/'.join(methods)} take no sample_weight yet"
        expected.update(dict.fromkeys(SAMPLE_WEIGHT_CHECKS, reason))
    return expected


@parametrize_with_checks(
    [GaussianMixture(), GaussianMixture(2, covariance_type="tied", init_params="random"), KMeans(),
     KMeans(init="random", algorithm="elkan"), MiniBatchKMeans(), MiniBatchKMeans(init="random", batch_size=10)],
    expected_failed_checks=expected_failed_checks,
)
def test_scikit_learn_estimator_checks(estimator, check):
    check(estimator)


def blobs(n_per_cluster: int = 60, dtype=np.float64, seed: int = 0) -> np.ndarray:
    """Three separated Gaussian clusters in 2-D ``(3 * n_per_cluster, 2)``."""
    rng = np.random.RandomState(seed)
    centres = np.array([[0.0, 0.0], [6.0, 0.0], [0.0, 6.0]])
    return np.concatenate([rng.randn(n_per_cluster, 2) * [1.0, 0.5] + c for c in centres]).astype(dtype)


def test_import_torch_em_does_not_import_sklearn():
    code = "import sys, torch_em; print('sklearn' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


# --- model selection ---------------------------------------------------------------------------
def test_grid_search_over_a_pipeline_selects_by_score():
    X = blobs()
    grid = {"gmm__n_components": [1, 2, 3], "gmm__covariance_type": ["full", "spherical"]}
    pipeline = Pipeline([("scale", StandardScaler()), ("gmm", GaussianMixture(random_state=0))])
    search = GridSearchCV(pipeline, grid, cv=KFold(3, shuffle=True, random_state=0)).fit(X)

    # Independent reference: the mean held-out log-likelihood of each setting, fold by fold.
    def mean_score(n_components, covariance_type):
        scores = []
        for train, test in KFold(3, shuffle=True, random_state=0).split(X):
            scaler = StandardScaler().fit(X[train])
            gmm = GaussianMixture(n_components, covariance_type=covariance_type, random_state=0)
            scores.append(gmm.fit(scaler.transform(X[train])).score(scaler.transform(X[test])))
        return np.mean(scores)

    reference = {(k, c): mean_score(k, c) for k in grid["gmm__n_components"] for c in grid["gmm__covariance_type"]}
    best = max(reference, key=reference.get)
    assert (search.best_params_["gmm__n_components"], search.best_params_["gmm__covariance_type"]) == best
    assert best[0] == 3
    np.testing.assert_allclose(search.best_score_, reference[best], rtol=1e-12)


@pytest.mark.parametrize("estimator", [GaussianMixture(3, random_state=0), KMeans(3, random_state=0)])
def test_cross_val_score_is_the_held_out_score_of_each_fold(estimator):
    X = blobs()
    folds = KFold(4, shuffle=True, random_state=1)
    scores = cross_val_score(estimator, X, cv=folds)
    expected = [clone(estimator).fit(X[train]).score(X[test]) for train, test in folds.split(X)]
    np.testing.assert_allclose(scores, expected, rtol=1e-12)


# --- persistence and cloning ---------------------------------------------------------------------
def pickled(estimator):
    return pickle.loads(pickle.dumps(estimator))


def joblibbed(estimator):
    buffer = io.BytesIO()
    joblib.dump(estimator, buffer)
    buffer.seek(0)
    return joblib.load(buffer)


@pytest.mark.parametrize("round_trip", [pickled, joblibbed])
@pytest.mark.parametrize("estimator", [GaussianMixture(3, random_state=0), KMeans(3, random_state=0),
                                       MiniBatchKMeans(3, random_state=0, batch_size=30)])
def test_pickle_and_joblib_round_trips(estimator, round_trip):
    X = blobs()
    fitted = estimator.fit(X)
    loaded = round_trip(fitted)
    np.testing.assert_array_equal(loaded.predict(X), fitted.predict(X))
    assert loaded.score(X) == fitted.score(X)
    assert loaded.get_params() == fitted.get_params()
    if isinstance(fitted, GaussianMixture):
        np.testing.assert_array_equal(loaded.score_samples(X), fitted.score_samples(X))
        np.testing.assert_array_equal(loaded.means_, fitted.means_)
    else:
        np.testing.assert_array_equal(loaded.transform(X), fitted.transform(X))


def test_clone_copies_the_parameters_not_the_fit():
    fitted = GaussianMixture(3, covariance_type="diag", random_state=4, dtype="float64").fit(blobs())
    copy = clone(fitted)
    assert copy.get_params() == fitted.get_params()
    assert not hasattr(copy, "module_") and not hasattr(copy, "means_")
    with pytest.raises(NotFittedError, match="This GaussianMixture instance is not fitted yet"):
        copy.predict(blobs())


# --- data in and out -----------------------------------------------------------------------------
@pytest.mark.parametrize("estimator", [GaussianMixture(3, random_state=0), KMeans(3, random_state=0),
                                       MiniBatchKMeans(3, random_state=0, batch_size=30)])
def test_dataframe_in_numpy_out(estimator):
    pd = pytest.importorskip("pandas")
    X = blobs()
    frame = pd.DataFrame(X, columns=["width", "height"])
    from_frame = clone(estimator).fit(frame)
    from_array = clone(estimator).fit(X)
    np.testing.assert_array_equal(from_frame.feature_names_in_, ["width", "height"])
    assert from_frame.n_features_in_ == 2
    predicted = from_frame.predict(frame)
    assert isinstance(predicted, np.ndarray)
    np.testing.assert_array_equal(predicted, from_array.predict(X))
    with pytest.raises(ValueError, match="feature names"):
        from_frame.predict(frame.rename(columns={"width": "depth"}))


def test_object_array_is_accepted_as_numbers():
    X = blobs()
    objects = X.astype(object)
    np.testing.assert_array_equal(KMeans(3, random_state=0).fit(objects).cluster_centers_,
                                  KMeans(3, random_state=0).fit(X).cluster_centers_)


def float_outputs(estimator, X) -> dict[str, np.ndarray]:
    """Every float attribute and float result of a fitted estimator."""
    if isinstance(estimator, GaussianMixture):
        names = ["weights_", "means_", "covariances_", "precisions_", "precisions_cholesky_"]
        results = {"score_samples": estimator.score_samples(X), "predict_proba": estimator.predict_proba(X),
                   "sample": estimator.sample(5)[0]}
    else:
        names = ["cluster_centers_"]
        results = {"transform": estimator.transform(X), "fit_transform": clone(estimator).fit_transform(X)}
    return {**{name: getattr(estimator, name) for name in names}, **results}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("estimator", [GaussianMixture(3, random_state=0), KMeans(3, random_state=0),
                                       MiniBatchKMeans(3, random_state=0, batch_size=30)])
def test_float_dtype_in_is_float_dtype_out(estimator, dtype):
    X = blobs(dtype=dtype)
    fitted = clone(estimator).fit(X)
    for name, value in float_outputs(fitted, X).items():
        assert value.dtype == dtype, name
    assert fitted.predict(X).dtype == (np.int64 if isinstance(fitted, GaussianMixture) else np.int32)


def test_integer_data_is_fitted_in_float64():
    X = np.round(blobs() * 10).astype(np.int64)
    gmm = GaussianMixture(3, random_state=0).fit(X)
    assert gmm.means_.dtype == np.float64 and gmm.module_.dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.float64, "float64", np.float64])
def test_dtype_parameter_sets_the_computation_not_the_outputs(dtype):
    X = blobs(dtype=np.float32)
    gmm = GaussianMixture(3, random_state=0, dtype=dtype).fit(X)
    assert gmm.module_.dtype == torch.float64
    assert gmm.means_.dtype == np.float32 and gmm.score_samples(X).dtype == np.float32
    km = MiniBatchKMeans(3, random_state=0, dtype=dtype).fit(X)
    assert km.module_.cluster_centers_.dtype == torch.float64 and km.cluster_centers_.dtype == np.float32


# --- agreement with scikit-learn -----------------------------------------------------------------
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_gaussian_mixture_equals_scikit_learn_from_the_same_initial_parameters(covariance_type):
    X = blobs()
    rng = np.random.RandomState(3)
    means = X[rng.choice(len(X), 3, replace=False)]
    precisions = {"full": np.stack([np.eye(2)] * 3), "tied": np.eye(2), "diag": np.ones((3, 2)), "spherical": np.ones(3)}
    options = dict(n_components=3, covariance_type=covariance_type, weights_init=[0.2, 0.3, 0.5], means_init=means,
                   precisions_init=precisions[covariance_type], tol=1e-8, max_iter=200)
    ours = GaussianMixture(**options).fit(X)
    theirs = sklearn.mixture.GaussianMixture(**options).fit(X)
    for name in ["weights_", "means_", "covariances_", "precisions_", "precisions_cholesky_"]:
        np.testing.assert_allclose(getattr(ours, name), getattr(theirs, name), rtol=1e-10, atol=1e-10, err_msg=name)
    assert ours.n_iter_ == theirs.n_iter_ and ours.converged_ == theirs.converged_
    np.testing.assert_allclose(ours.lower_bounds_, theirs.lower_bounds_, rtol=1e-10)
    np.testing.assert_allclose(ours.score_samples(X), theirs.score_samples(X), rtol=1e-10)
    np.testing.assert_allclose(ours.predict_proba(X), theirs.predict_proba(X), atol=1e-10)
    np.testing.assert_allclose([ours.bic(X), ours.aic(X)], [theirs.bic(X), theirs.aic(X)], rtol=1e-10)


@pytest.mark.parametrize("algorithm", ["lloyd", "elkan"])
def test_kmeans_equals_scikit_learn_from_the_same_centres(algorithm):
    X = blobs()
    init = X[[0, 1, 2]]  # all in the first cluster: Lloyd's iterations have to move them
    ours = KMeans(3, init=init, algorithm=algorithm, tol=0).fit(X)
    theirs = sklearn.cluster.KMeans(3, init=init, n_init=1, algorithm="lloyd", tol=0).fit(X)
    np.testing.assert_allclose(ours.cluster_centers_, theirs.cluster_centers_, rtol=1e-10)
    np.testing.assert_array_equal(ours.labels_, theirs.labels_)
    np.testing.assert_allclose(ours.inertia_, theirs.inertia_, rtol=1e-10)
    np.testing.assert_allclose(ours.transform(X), theirs.transform(X), rtol=1e-8, atol=1e-8)


def test_mini_batch_steps_equal_scikit_learn_partial_fit_without_reassignment():
    """Each centre is the running mean of the points assigned to it, as scikit-learn's counts give."""
    X = blobs()
    rng = np.random.RandomState(0)
    init = X[[0, 70, 130]]
    ours = MiniBatchKMeans(3, init=init, reassignment_ratio=0)
    theirs = sklearn.cluster.MiniBatchKMeans(3, init=init, n_init=1, reassignment_ratio=0)
    for _ in range(12):
        batch = X[rng.randint(0, len(X), 40)]
        ours.partial_fit(batch)
        theirs.partial_fit(batch)
        np.testing.assert_allclose(ours.cluster_centers_, theirs.cluster_centers_, rtol=1e-10)
        np.testing.assert_array_equal(ours.labels_, theirs.labels_)
        np.testing.assert_allclose(ours.inertia_, theirs.inertia_, rtol=1e-10)
    assert ours.n_steps_ == theirs.n_steps_ == 12


def test_random_state_int_is_the_module_seed_and_a_random_state_draws_one():
    X = blobs()
    ours = GaussianMixture(3, init_params="random", random_state=7).fit(X)
    module = torch_em.GaussianMixture(3, init_params="random", seed=7, max_iter=100, tol=1e-3).fit(torch.as_tensor(X))
    np.testing.assert_array_equal(ours.means_, module.means.detach().numpy())
    state = np.random.RandomState(5)
    seed = np.random.RandomState(5).randint(np.iinfo(np.int32).max)
    drawn = GaussianMixture(3, init_params="random", random_state=state).fit(X)
    np.testing.assert_array_equal(drawn.means_, GaussianMixture(3, init_params="random", random_state=seed).fit(X).means_)


# --- scikit-learn's semantics ---------------------------------------------------------------------
def test_not_fitted_error_is_scikit_learns():
    for estimator in (GaussianMixture(), KMeans(), MiniBatchKMeans()):
        with pytest.raises(NotFittedError, match="is not fitted yet"):
            estimator.predict(blobs())


def test_convergence_warning_is_scikit_learns():
    with pytest.warns(ConvergenceWarning, match="Best performing initialization did not converge"):
        gmm = GaussianMixture(3, max_iter=1, tol=0, random_state=0).fit(blobs())
    assert gmm.converged_ is False and gmm.n_iter_ == 1 and len(gmm.lower_bounds_) == 1


def test_module_is_the_fitted_torch_module():
    X = blobs()
    gmm = GaussianMixture(3, random_state=0).fit(X)
    assert isinstance(gmm.module_, torch_em.GaussianMixture)
    np.testing.assert_allclose(gmm.score_samples(X), gmm.module_.score_samples(torch.as_tensor(X)).numpy())
    km = KMeans(3, random_state=0).fit(X)
    assert isinstance(km.module_, torch_em.KMeans)


def test_rejected_fit_leaves_the_estimator_as_it_was():
    X = blobs()
    gmm = GaussianMixture(3, random_state=0).fit(X)
    before = {name: value.copy() if isinstance(value, np.ndarray) else value for name, value in vars(gmm).items()}
    gmm.set_params(weights_init=[0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="The parameter 'weights' should be normalized"):
        gmm.fit(np.hstack([X, X]))  # new features would reset n_features_in_
    assert gmm.n_features_in_ == 2 and gmm.module_ is before["module_"]
    np.testing.assert_array_equal(gmm.means_, before["means_"])


def test_warm_start_with_another_number_of_components_starts_afresh():
    X = blobs()
    gmm = GaussianMixture(2, warm_start=True, random_state=0).fit(X)
    refitted = gmm.set_params(n_components=3).fit(X)
    np.testing.assert_array_equal(refitted.means_, GaussianMixture(3, random_state=0).fit(X).means_)


def test_warm_start_set_after_a_fit_continues_from_it():
    X = blobs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gmm = GaussianMixture(3, max_iter=1, random_state=0).fit(X)
        gmm.set_params(warm_start=True).fit(X)
    np.testing.assert_allclose(gmm.means_, GaussianMixture(3, max_iter=2, random_state=0).fit(X).means_, rtol=1e-12)


def test_warm_start_continues_from_the_module():
    X = blobs()
    warm = GaussianMixture(3, max_iter=1, warm_start=True, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warm.fit(X)
        module = warm.module_
        warm.fit(X)
        cold = GaussianMixture(3, max_iter=2, random_state=0).fit(X)
    assert warm.module_ is module
    np.testing.assert_allclose(warm.means_, cold.means_, rtol=1e-12)


def test_mini_batch_partial_fit_sets_labels_of_its_batch():
    X = blobs()
    km = MiniBatchKMeans(3, random_state=0)
    km.partial_fit(X[:90])
    np.testing.assert_array_equal(km.labels_, km.predict(X[:90]))
    assert km.labels_.shape == (90,) and km.n_steps_ == 1
    np.testing.assert_allclose(km.inertia_, -km.score(X[:90]))
    with pytest.raises(ValueError, match="X has 3 features, but MiniBatchKMeans is expecting 2 features"):
        km.partial_fit(np.hstack([X, X[:, :1]]))
    assert km.n_steps_ == 1


def test_invalid_parameters_get_scikit_learns_messages():
    with pytest.raises(ValueError, match="The 'n_components' parameter of GaussianMixture must be an int in the range"):
        GaussianMixture(n_components=0).fit(blobs())
    with pytest.raises(ValueError, match="The 'algorithm' parameter of KMeans must be a str among"):
        KMeans(algorithm="full").fit(blobs())
    with pytest.raises(ValueError, match=r"n_samples=5 should be >= n_clusters=8"):
        KMeans().fit(blobs()[:5])
    with pytest.raises(ValueError, match="Input X contains NaN"):
        GaussianMixture().fit(np.full((4, 2), np.nan))
    with pytest.raises(ValueError, match="dtype"):
        GaussianMixture(dtype="int8").fit(blobs())


def test_readme_section_runs():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## scikit-learn estimators", 1)[1].split("\n## ", 1)[0]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["gmm"].means_.dtype == np.float32
    assert namespace["stream"].labels_.shape == (100,)
    assert set(namespace["search"].best_params_) == {"gmm__n_components", "gmm__covariance_type"}


@pytest.mark.parametrize("estimator", [GaussianMixture(3, random_state=0), KMeans(3, random_state=0),
                                       MiniBatchKMeans(3, random_state=0, batch_size=30)])
def test_device_computes_there_and_returns_numpy(estimator, device):
    X = blobs(dtype=np.float32)
    fitted = clone(estimator).set_params(device=device).fit(X)
    parameter = next(iter(fitted.module_.parameters()), None) if isinstance(fitted, GaussianMixture) else None
    where = parameter.device if parameter is not None else fitted.module_.cluster_centers_.device
    assert where.type == device
    on_cpu = clone(estimator).set_params(device="cpu").fit(X)
    predicted = fitted.predict(X)
    assert isinstance(predicted, np.ndarray)
    assert (predicted == on_cpu.predict(X)).mean() > 0.99  # the same clustering (rounding may differ)
