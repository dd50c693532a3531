"""``KMeans`` and ``MiniBatchKMeans`` with scikit-learn's interface, fitted by :class:`torch_em.KMeans`."""
from __future__ import annotations

import math
import warnings
from numbers import Integral, Real
from typing import Any, cast

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, ClusterMixin, TransformerMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import pairwise_distances_argmin_min
from sklearn.utils import check_array, check_random_state
from sklearn.utils._param_validation import Interval, StrOptions

import torch_em

from ._base import (
    TORCH_CONSTRAINTS, TorchModuleMixin, as_tensor, check_sample_weight, seed_from_random_state, unchanged_on_error,
    weight_options,
)

#: Step sizes of the mini-batch stream, ``rho_t = 1 / (t + 1)``: every centre is the mean of all
#: the points assigned to it so far (scikit-learn's per-centre learning rate), for equal batches.
RUNNING_MEAN: dict[str, Any] = {"learning_decay": 1.0, "learning_offset": 1.0}


class _KMeansEstimator(TorchModuleMixin, ClassNamePrefixFeaturesOutMixin, TransformerMixin, ClusterMixin, BaseEstimator):
    """What KMeans and MiniBatchKMeans share: the initialisation, evaluation and centres."""

    #: restarts of ``n_init="auto"`` for ``init="random"`` or a callable
    _auto_n_init: int

    _parameter_constraints: dict = {
        "n_clusters": [Interval(Integral, 1, None, closed="left")],
        "init": [StrOptions({"k-means++", "random"}), callable, "array-like"],
        "n_init": [StrOptions({"auto"}), Interval(Integral, 1, None, closed="left")],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "tol": [Interval(Real, 0, None, closed="left")],
        "verbose": ["verbose"],
        "random_state": ["random_state"],
        **TORCH_CONSTRAINTS,
    }

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags

    # --- initialisation -----------------------------------------------------------------------
    def _resolved_n_init(self) -> int:
        """Restarts: ``n_init``, or for ``"auto"`` 1 with k-means++ or given centres and
        ``_auto_n_init`` otherwise; given centres run once (with scikit-learn's warning)."""
        given_centres = not isinstance(self.init, str) and not callable(self.init)
        if self.n_init == "auto":
            return 1 if given_centres or self.init == "k-means++" else self._auto_n_init
        if given_centres and self.n_init != 1:
            warnings.warn(
                f"Explicit initial center position passed: performing only one init in {type(self).__name__} "
                f"instead of n_init={self.n_init}.",
                RuntimeWarning,
                stacklevel=4,
            )
            return 1
        return self.n_init

    def _check_n_samples(self, X: np.ndarray) -> None:
        if X.shape[0] < self.n_clusters:
            raise ValueError(f"n_samples={X.shape[0]} should be >= n_clusters={self.n_clusters}.")

    def _initial_centres(self, X: np.ndarray, random_state: np.random.RandomState) -> str | np.ndarray:
        """``init`` for the torch module: the method's name, or centres ``(K, D)`` (given, or
        drawn by the callable ``init(X, n_clusters, random_state=random_state)``), checked."""
        if isinstance(self.init, str):
            return str(self.init)
        init = self.init(X, self.n_clusters, random_state=random_state) if callable(self.init) else self.init
        centres = check_array(init, dtype=X.dtype, copy=True, input_name="init")
        if centres.shape[0] != self.n_clusters:
            mismatch = f"number of clusters {self.n_clusters}"
        elif centres.shape[1] != X.shape[1]:
            mismatch = f"number of features of the data {X.shape[1]}"
        else:
            return centres
        raise ValueError(f"The shape of the initial centers {centres.shape} does not match the {mismatch}.")

    # --- fitted attributes --------------------------------------------------------------------
    def _set_centres(self, module: torch_em.KMeans) -> None:
        self.module_ = module
        self.cluster_centers_ = self._numpy(module.cluster_centers_)
        self._n_features_out = self.cluster_centers_.shape[0]

    def _labels_inertia(self, X: torch.Tensor, sample_weight: np.ndarray | None) -> tuple[np.ndarray, float]:
        """Nearest centre of each row of X ``(n_samples,)`` (int32, as scikit-learn) and the
        (weighted) inertia."""
        labels = self.module_.predict(X).cpu().numpy().astype(np.int32)
        return labels, -float(self.module_.score(X, **weight_options(sample_weight)))

    # --- evaluation ---------------------------------------------------------------------------
    def fit_predict(self, X: Any, y: Any = None, sample_weight: Any = None) -> np.ndarray:
        """:meth:`fit`, then ``labels_`` ``(n_samples,)``."""
        return self.fit(X, sample_weight=sample_weight).labels_

    def fit_transform(self, X: Any, y: Any = None, sample_weight: Any = None) -> np.ndarray:
        """:meth:`fit`, then :meth:`transform` of X."""
        return self.fit(X, sample_weight=sample_weight).transform(X)

    def predict(self, X: Any) -> np.ndarray:
        """Index of the nearest centre of each sample ``(n_samples,)``, int32."""
        data = self._evaluation_data(X)
        return self.module_.predict(data).cpu().numpy().astype(np.int32)

    def transform(self, X: Any) -> np.ndarray:
        """Euclidean distance of each sample to each centre ``(n_samples, n_clusters)``."""
        data = self._evaluation_data(X)
        return self._numpy(self.module_.transform(data))

    def score(self, X: Any, y: Any = None, sample_weight: Any = None) -> float:
        """Opposite of the (weighted) inertia of X: larger is better."""
        data = self._evaluation_data(X)
        sample_weight = check_sample_weight(sample_weight, data.shape[0], data.numpy().dtype)
        return float(self.module_.score(data, **weight_options(sample_weight)))


def warn_if_fewer_distinct_clusters(labels: np.ndarray, n_clusters: int) -> None:
    """scikit-learn's ConvergenceWarning when some centres got no point."""
    n_distinct = len(np.unique(labels))
    if n_distinct < n_clusters:
        warnings.warn(
            f"Number of distinct clusters ({n_distinct}) found smaller than n_clusters ({n_clusters}). "
            "Possibly due to duplicate points in X.",
            ConvergenceWarning,
            stacklevel=4,
        )


class KMeans(_KMeansEstimator):
    """K-means clustering by Lloyd's algorithm in PyTorch, with the parameters, attributes and
    methods of :class:`sklearn.cluster.KMeans`.

    Parameters as scikit-learn's (same names, defaults and meanings), plus ``device`` and
    ``dtype`` (where and in which torch dtype :class:`torch_em.KMeans` computes; default CPU and
    the data's float dtype). The fitted module is ``module_``. Differences:

    - ``algorithm="elkan"`` is accepted and runs Lloyd's algorithm: Elkan's triangle-inequality
      bounds save distance computations on a CPU, while Lloyd's batched distance GEMMs are what a
      GPU runs fastest; the results are those of Lloyd's algorithm, as scikit-learn's are.
    - ``copy_x`` is accepted; X is never modified either way.
    - ``random_state``: an int is torch_em's ``seed``; a ``RandomState`` draws an int seed from
      itself at every fit; None: a fresh seed. A callable ``init`` receives a ``RandomState``.
    - ``verbose`` is accepted and prints nothing.
    - The ``n_init`` restarts of a string ``init`` run as one batch of tensor ops; those of a
      callable ``init`` run one after the other.

    Attributes:
        cluster_centers_ ``(n_clusters, n_features)``, labels_ ``(n_samples,)`` int32, inertia_,
        n_iter_, n_features_in_, feature_names_in_ (DataFrame input), module_.
    """

    _auto_n_init = 10

    _parameter_constraints: dict = {
        **_KMeansEstimator._parameter_constraints,
        "copy_x": ["boolean"],
        "algorithm": [StrOptions({"lloyd", "elkan"})],
    }

    def __init__(
        self,
        n_clusters: int = 8,
        *,
        init: Any = "k-means++",
        n_init: str | int = "auto",
        max_iter: int = 300,
        tol: float = 1e-4,
        verbose: int = 0,
        random_state: None | int | np.random.RandomState = None,
        copy_x: bool = True,
        algorithm: str = "lloyd",
        device: None | str | torch.device = None,
        dtype: None | str | torch.dtype = None,
    ) -> None:
        self.n_clusters = n_clusters
        self.init = init
        self.n_init = n_init
        self.max_iter = max_iter
        self.tol = tol
        self.verbose = verbose
        self.random_state = random_state
        self.copy_x = copy_x
        self.algorithm = algorithm
        self.device = device
        self.dtype = dtype

    @unchanged_on_error
    def fit(self, X: Any, y: Any = None, sample_weight: Any = None) -> "KMeans":
        """Cluster X ``(n_samples, n_features)``; ``sample_weight`` ``(n_samples,)`` weighs the
        samples (not used by a given or callable ``init``)."""
        self._validate_params()
        X = self._fit_data(X)
        self._check_n_samples(X)
        sample_weight = check_sample_weight(sample_weight, X.shape[0], X.dtype)
        self._n_init = self._resolved_n_init()
        if self.algorithm == "elkan" and self.n_clusters == 1:
            warnings.warn("algorithm='elkan' doesn't make sense for a single cluster. Using 'lloyd' instead.",
                          RuntimeWarning, stacklevel=3)
        random_state = check_random_state(self.random_state)
        data = as_tensor(X)
        if callable(self.init):  # one run per drawn set of centres; the lowest inertia wins
            runs = [self._lloyd(data, self._initial_centres(X, random_state), 1, sample_weight) for _ in range(self._n_init)]
            module = min(runs, key=lambda run: float(cast(torch.Tensor, run.inertia_)))  # (fitted)
        else:
            module = self._lloyd(data, self._initial_centres(X, random_state), self._n_init, sample_weight)
        self._set_centres(module)
        # (the module is fitted: its results are set)
        self.labels_ = cast(torch.Tensor, module.labels_).cpu().numpy().astype(np.int32)
        self.inertia_ = float(cast(torch.Tensor, module.inertia_))
        self.n_iter_ = int(cast(torch.Tensor, module.n_iter_))
        warn_if_fewer_distinct_clusters(self.labels_, self.n_clusters)
        return self

    def _lloyd(self, data: torch.Tensor, init: str | np.ndarray, n_init: int, sample_weight: np.ndarray | None) -> torch_em.KMeans:
        """A torch_em.KMeans fitted to ``data`` ``(n_samples, n_features)``."""
        module = torch_em.KMeans(self.n_clusters, init=init, n_init=n_init, max_iter=self.max_iter, tol=self.tol,
                                 seed=seed_from_random_state(self.random_state), **self._module_options())
        return module.fit(data, **weight_options(sample_weight))


class MiniBatchKMeans(_KMeansEstimator):
    """Mini-batch k-means in PyTorch (:meth:`torch_em.KMeans.partial_fit`), with the parameters,
    attributes and methods of :class:`sklearn.cluster.MiniBatchKMeans`.

    As scikit-learn's: ``fit`` picks the best of ``n_init`` initialisations on ``init_size``
    random samples (by the inertia of another ``init_size`` samples), then runs
    ``(max_iter * n_samples) // batch_size`` steps on batches drawn with replacement (in
    proportion to ``sample_weight``), stopping early on a small squared change of the centres
    (``tol > 0``, relative to the data's mean variance) or after ``max_no_improvement`` steps
    without improvement of the smoothed batch inertia; centres with less than
    ``reassignment_ratio`` times the largest count are moved to random batch points (every
    ``10 * n_clusters`` samples, and whenever a centre has no point yet). Each centre is the mean
    of all points assigned to it so far (running statistics with step ``1 / (t + 1)``: equal to
    scikit-learn's per-centre counts when the batches have equal sizes). ``partial_fit`` runs one
    step on the batch it gets (the first seeds the centres from it) and sets ``labels_`` and
    ``inertia_`` of that batch when ``compute_labels``.

    Differences: the string initialisations (``"k-means++"``, ``"random"``) are followed by one
    Lloyd iteration on the ``init_size`` samples; ``verbose`` prints only why the steps stopped
    early; ``device``, ``dtype`` and ``random_state`` as for :class:`KMeans`.

    Attributes:
        cluster_centers_, labels_, inertia_, n_iter_ (passes over the data started), n_steps_
        (mini-batch steps), n_features_in_, feature_names_in_, module_.
    """

    _auto_n_init = 3

    _parameter_constraints: dict = {
        **_KMeansEstimator._parameter_constraints,
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "compute_labels": ["boolean"],
        "max_no_improvement": [Interval(Integral, 0, None, closed="left"), None],
        "init_size": [Interval(Integral, 1, None, closed="left"), None],
        "reassignment_ratio": [Interval(Real, 0, None, closed="left")],
    }

    def __init__(
        self,
        n_clusters: int = 8,
        *,
        init: Any = "k-means++",
        max_iter: int = 100,
        batch_size: int = 1024,
        verbose: int = 0,
        compute_labels: bool = True,
        random_state: None | int | np.random.RandomState = None,
        tol: float = 0.0,
        max_no_improvement: int | None = 10,
        init_size: int | None = None,
        n_init: str | int = "auto",
        reassignment_ratio: float = 0.01,
        device: None | str | torch.device = None,
        dtype: None | str | torch.dtype = None,
    ) -> None:
        self.n_clusters = n_clusters
        self.init = init
        self.max_iter = max_iter
        self.batch_size = batch_size
        self.verbose = verbose
        self.compute_labels = compute_labels
        self.random_state = random_state
        self.tol = tol
        self.max_no_improvement = max_no_improvement
        self.init_size = init_size
        self.n_init = n_init
        self.reassignment_ratio = reassignment_ratio
        self.device = device
        self.dtype = dtype

    @unchanged_on_error
    def fit(self, X: Any, y: Any = None, sample_weight: Any = None) -> "MiniBatchKMeans":
        """Cluster X ``(n_samples, n_features)`` by mini-batch steps (see the class docstring)."""
        self._validate_params()
        X = self._fit_data(X)
        self._start(X)
        n_samples = X.shape[0]
        sample_weight = check_sample_weight(sample_weight, n_samples, X.dtype)
        random_state = check_random_state(self.random_state)
        module = self._stream_module(self._best_initial_centres(X, random_state, sample_weight), random_state)
        data = as_tensor(X).to(module.cluster_centers_.device)
        stopping = EarlyStopping(_tolerance(X, self.tol), self.max_no_improvement, self._batch_size, n_samples,
                                 verbose=bool(self.verbose))
        # Batches drawn in proportion to the weights, by the same draws for none and equal weights.
        weights = np.ones(n_samples) if sample_weight is None else sample_weight
        probabilities = weights / weights.sum()
        centres = None
        n_steps = (self.max_iter * n_samples) // self._batch_size
        for step in range(n_steps):
            indices = random_state.choice(n_samples, self._batch_size, p=probabilities, replace=True)
            self._step(module, data[torch.as_tensor(indices, device=data.device)], None, random_state)
            previous, centres = centres, module.cluster_centers_.clone()
            change = 0.0 if previous is None or stopping.tol == 0 else float(((centres - previous) ** 2).sum())
            if stopping.converged(step, change, float(cast(torch.Tensor, module.inertia_))):  # (set by the step)
                break
        self._set_centres(module)
        self.n_steps_ = step + 1
        self.n_iter_ = int(math.ceil(self.n_steps_ * self._batch_size / n_samples))
        if self.compute_labels:
            self.labels_, self.inertia_ = self._labels_inertia(data, sample_weight)
        else:
            smoothed = stopping.first_inertia if stopping.smoothed_inertia is None else stopping.smoothed_inertia
            self.inertia_ = smoothed * (n_samples if sample_weight is None else float(sample_weight.sum()))
        return self

    @unchanged_on_error
    def partial_fit(self, X: Any, y: Any = None, sample_weight: Any = None) -> "MiniBatchKMeans":
        """One mini-batch step on X ``(n_samples, n_features)``; the first call seeds the
        centres from X."""
        self._validate_params()
        started = hasattr(self, "module_")
        X = self._fit_data(X, reset=not started)
        sample_weight = check_sample_weight(sample_weight, X.shape[0], X.dtype)
        self._random_state = getattr(self, "_random_state", None) or check_random_state(self.random_state)
        if started:
            module = self.module_
        else:
            self._start(X)
            module = self._stream_module(self._initial_centres(X, self._random_state), self._random_state)
            self.n_steps_ = 0
        batch = as_tensor(X)
        self._step(module, batch, sample_weight, self._random_state)
        self._set_centres(module)
        self.n_steps_ += 1
        if self.compute_labels:
            self.labels_, self.inertia_ = self._labels_inertia(batch, sample_weight)
        return self

    def _start(self, X: np.ndarray) -> None:
        """Settings of a new stream on the first data: restarts, batch and initialisation sizes."""
        self._check_n_samples(X)
        self._n_init = self._resolved_n_init()
        self._batch_size = min(self.batch_size, X.shape[0])
        init_size = self.init_size
        if init_size is None:
            init_size = 3 * self._batch_size if 3 * self._batch_size >= self.n_clusters else 3 * self.n_clusters
        elif init_size < self.n_clusters:
            warnings.warn(
                f"init_size={init_size} should be larger than n_clusters={self.n_clusters}. Setting it to "
                "min(3*n_clusters, n_samples)",
                RuntimeWarning,
                stacklevel=4,
            )
            init_size = 3 * self.n_clusters
        self._init_size = min(init_size, X.shape[0])
        self._n_since_last_reassign = 0

    def _stream_module(self, init: str | np.ndarray, random_state: np.random.RandomState) -> torch_em.KMeans:
        """A torch_em.KMeans for the mini-batch steps. Given centres are loaded as its state, so
        that its first step, like the others, takes batches smaller than ``n_clusters``; it
        computes in ``dtype``, else in the dtype of the data."""
        options = self._module_options()
        if options["dtype"] is None:
            options["dtype"] = torch.from_numpy(np.empty(0, dtype=self._fit_dtype)).dtype
        module = torch_em.KMeans(self.n_clusters, init=init, seed=seed_from_random_state(random_state), **RUNNING_MEAN,
                                 **options)
        if not isinstance(init, str):
            module.load_state_dict({"cluster_centers_": torch.as_tensor(init)})
        return module

    def _best_initial_centres(
        self, X: np.ndarray, random_state: np.random.RandomState, sample_weight: np.ndarray | None,
    ) -> np.ndarray:
        """The initial centres ``(K, D)`` of the lowest inertia on ``init_size`` validation
        samples among ``n_init`` initialisations, each on its own ``init_size`` random samples."""
        validation = X[random_state.randint(0, X.shape[0], self._init_size)]
        best, best_inertia = None, math.inf
        for _ in range(self._n_init):
            chosen = random_state.randint(0, X.shape[0], self._init_size)
            weights = None if sample_weight is None else sample_weight[chosen]
            centres = self._seeded_centres(X[chosen], weights, random_state)
            inertia = float((pairwise_distances_argmin_min(validation, centres)[1] ** 2).sum())
            if best is None or inertia < best_inertia:
                best, best_inertia = centres, inertia
        return cast(np.ndarray, best)  # (n_init >= 1)

    def _seeded_centres(self, X: np.ndarray, sample_weight: np.ndarray | None, random_state: np.random.RandomState) -> np.ndarray:
        """Initial centres ``(K, D)`` on the samples X: given, drawn by the callable ``init``, or
        the seeding named by ``init`` followed by one Lloyd iteration."""
        init = self._initial_centres(X, random_state)
        if not isinstance(init, str):
            return init
        module = torch_em.KMeans(self.n_clusters, init=init, max_iter=1, seed=seed_from_random_state(random_state),
                                 **self._module_options())
        return self._numpy(module.fit(as_tensor(X), **weight_options(sample_weight)).cluster_centers_)

    def _step(self, module: torch_em.KMeans, batch: torch.Tensor, sample_weight: np.ndarray | None,
              random_state: np.random.RandomState) -> None:
        """One mini-batch step of ``module`` on ``batch`` ``(n, D)``, then the reassignment of
        small clusters when it is due."""
        due = self._reassignment_due(module, batch.shape[0])
        module.partial_fit(batch, **weight_options(sample_weight))
        if due and self.reassignment_ratio > 0:
            reassign_small_clusters(module, batch, self.reassignment_ratio, random_state)

    def _reassignment_due(self, module: torch_em.KMeans, batch_size: int) -> bool:
        """scikit-learn's schedule: every ``10 * n_clusters`` samples, and while a centre has no
        point yet."""
        self._n_since_last_reassign += batch_size
        empty = module.stream_counts is None or bool((module.stream_counts == 0).any())
        if empty or self._n_since_last_reassign >= 10 * self.n_clusters:
            self._n_since_last_reassign = 0
            return True
        return False


def reassign_small_clusters(module: torch_em.KMeans, batch: torch.Tensor, ratio: float,
                            random_state: np.random.RandomState) -> None:
    """Move the centres whose running count is below ``ratio`` times the largest (at most half
    the batch size of them, the smallest) to distinct random points of ``batch`` ``(n, D)``, with
    the smallest count of the others (so they are not moved again at once), as scikit-learn does.
    Writes the module's centres and running statistics (``stream_counts``, ``stream_sums``)."""
    # (K,) running fraction of the points per centre, and the running sums: set by the steps so far
    counts, sums = cast(torch.Tensor, module.stream_counts), cast(torch.Tensor, module.stream_sums)
    small = counts < ratio * counts.max()
    most = int(0.5 * batch.shape[0])
    if int(small.sum()) > most:
        small[counts.argsort()[most:]] = False
    n_moved = int(small.sum())
    if n_moved == 0:
        return
    chosen = torch.as_tensor(random_state.choice(batch.shape[0], n_moved, replace=False), device=batch.device)
    points = batch[chosen].to(module.cluster_centers_)  # (n_moved, D)
    with torch.no_grad():
        floor = counts[~small].min()
        module.cluster_centers_[small] = points
        counts[small] = floor
        sums[small] = points * floor


def _tolerance(X: np.ndarray, tol: float) -> float:
    """``tol`` relative to the mean per-feature variance of X (scikit-learn's convention)."""
    return 0.0 if tol == 0 else float(np.mean(np.var(X, axis=0)) * tol)


class EarlyStopping:
    """scikit-learn's stopping rules of mini-batch k-means: the squared change of the centres at
    most ``tol`` (when ``tol > 0``), or ``max_no_improvement`` steps without a new minimum of the
    exponentially weighted average of the mean batch inertia (the first step is ignored: its
    inertia is that of the initialisation)."""

    def __init__(self, tol: float, max_no_improvement: int | None, batch_size: int, n_samples: int,
                 verbose: bool = False) -> None:
        self.tol = tol
        self.verbose = verbose
        self.max_no_improvement = max_no_improvement
        self.batch_size = batch_size
        self.alpha = min(batch_size * 2.0 / (n_samples + 1), 1.0)
        self.first_inertia = math.nan
        self.smoothed_inertia: float | None = None
        self.smallest: float | None = None
        self.no_improvement = 0

    def converged(self, step: int, centres_squared_change: float, batch_inertia: float) -> bool:
        """Whether to stop after step ``step`` (0-based) with that batch inertia (a sum)."""
        mean_inertia = batch_inertia / self.batch_size
        if step == 0:
            self.first_inertia = mean_inertia
            return False
        if self.smoothed_inertia is None:
            self.smoothed_inertia = mean_inertia
        else:
            self.smoothed_inertia = self.smoothed_inertia * (1 - self.alpha) + mean_inertia * self.alpha
        if self.tol > 0 and centres_squared_change <= self.tol:
            self._report(f"Converged (small centers change) at step {step + 1}")
            return True
        if self.smallest is None or self.smoothed_inertia < self.smallest:
            self.no_improvement, self.smallest = 0, self.smoothed_inertia
        else:
            self.no_improvement += 1
        if self.max_no_improvement is not None and self.no_improvement >= self.max_no_improvement:
            self._report(f"Converged (lack of improvement in inertia) at step {step + 1}")
            return True
        return False

    def _report(self, message: str) -> None:
        if self.verbose:
            print(message)
