"""``KMeans``: batched Lloyd's algorithm, the hard-assignment limit of Gaussian-mixture EM."""
from __future__ import annotations

import logging
import math
from typing import Any, Callable, Sequence, cast, overload

import numpy as np
import torch

from ._precision import FollowsDataDtype, keeps_dtype_when_rejected, without_autocast
from ._validation import (
    MAGNITUDE_HEADROOM, as_float_tensor, check_common_options, check_data, check_device, check_dtype, check_finite,
    check_int, check_magnitude, check_positive, check_sample_weight, check_shape, data_dtype,
)
from .families.base import NotFittedError
from ._random import RestartStreams, resolve_seed, restart_groups
from ._state import CheckedLoad, check_state, own_entries
from .em import cat_restarts
from .layout import Layout
from .serialization import Saveable
from .statistics import Statistics
from .streaming import StepSchedule
from . import initialization
from .initialization import random_points
from .lloyd import (
    cluster_sums, default_chunk, gather_points, lloyd, nearest, relative_tolerance, squared_distances, weighted_total,
)

logger = logging.getLogger(__name__)

STREAM_BUFFERS = ("stream_counts", "stream_sums", "stream_steps")

@overload
def per_model(value: torch.Tensor, n_models: int, event_dims: int) -> torch.Tensor: ...
@overload
def per_model(value: None, n_models: int, event_dims: int) -> None: ...
@overload
def per_model(value: torch.Tensor | None, n_models: int, event_dims: int) -> torch.Tensor | None: ...
def per_model(value: torch.Tensor | None, n_models: int, event_dims: int) -> torch.Tensor | None:
    """Data (N, D) (``event_dims=2``) or weights (N,) (``event_dims=1``) as they are, shared by
    every model; with batch dimensions in front flattened to (M, N, D) or (M, N)."""
    if value is None or value.dim() == event_dims:
        return value
    return value.reshape(n_models, *value.shape[-event_dims:])


def checked_weights(sample_weight: Any, X: torch.Tensor, batch_shape: Sequence[int]) -> torch.Tensor | None:
    """``sample_weight`` as a tensor in X's dtype and device, or None
    (:func:`torch_em._validation.check_sample_weight`), whose weighted sums of squared distances
    also stay finite in X's dtype.

    Shape:
        X: ``(N, D)`` or ``(*batch_shape, N, D)``; sample_weight: ``(N,)`` or ``(*batch_shape, N)``.
    """
    weights = check_sample_weight(sample_weight, "sample_weight", n_points=X.shape[-2], batch_shape=batch_shape,
                                  device=X.device, dtype=X.dtype)
    if weights is not None:
        _check_weighted_magnitude(X, float(weights.sum(-1).max()))
    return weights


def _check_weighted_magnitude(X: torch.Tensor, total_weight: float) -> None:
    """Reject weights whose total times the largest squared distance, ``4 D max|x|^2``,
    would overflow X's dtype (with :data:`MAGNITUDE_HEADROOM` to spare)."""
    largest = float(X.abs().amax())
    bound = total_weight * 4 * X.shape[-1] * largest ** 2
    if not bound <= torch.finfo(X.dtype).max / MAGNITUDE_HEADROOM:
        raise ValueError(
            f"sample_weight sums to {total_weight:.3g}, and weighted squared distances of X (entries up to {largest:.3g}) "
            f"overflow {X.dtype}; scale sample_weight down (the centres stay the same) or use dtype=torch.float64"
        )


class KMeans(Saveable, CheckedLoad, FollowsDataDtype):
    """A batch of k-means clusterings fitted by Lloyd's algorithm with batched tensor ops.

    Args:
        n_clusters: K.
        init: ``"k-means++"`` (greedy, as scikit-learn), ``"random"`` (K distinct data points),
            initial centres ``(K, D)`` / ``(*batch_shape, K, D)``, or a callable
            ``init(X, n_clusters, random_state=...) -> (K, D)`` (scikit-learn's signature), called for
            every restart and model in turn (restart by restart) with a copy of that model's data
            as given (not centred) as a numpy array ``(N, D)`` on the CPU, and one
            ``numpy.random.RandomState`` seeded from ``seed``.
        n_init: restarts per model (an extra batch dimension); the lowest inertia wins.
        max_iter: Lloyd iterations at most (>= 1).
        tol: a model stops when its squared centre shift is at most ``tol`` times the mean
            per-feature variance of its data (scikit-learn's convention).
        batch_shape: independent clusterings fitted together.
        seed, chunk_size, device, dtype: as for :class:`torch_em.Mixture` (without ``dtype`` the
            first fit adopts the data's dtype: float64 data give float64 centres).
        learning_decay, learning_offset, step_size: step sizes of :meth:`partial_fit` (mini-batch
            k-means), as for :class:`torch_em.Mixture`.

    Sample weights:
        ``fit``, ``partial_fit``, ``score`` and ``fit_predict`` take ``sample_weight`` with
        scikit-learn's meaning: non-negative finite weights, a positive total for every model. A
        centre is the weighted mean of its points, the inertia is ``sum_n w_n |x_n - c|^2``,
        k-means++ draws its first centre proportionally to ``w`` and later ones to ``w D^2``,
        ``"random"`` draws K distinct points proportionally to ``w``, and a cluster is empty when
        its weight is 0 (it takes the farthest point, with that point's weight). An integer
        weight equals repeating the row (up to rounding), a zero weight removes it from the
        centres and the inertia (it is still labelled). Both hold as long as no cluster empties:
        as in scikit-learn, the farthest point moves whole (with all its weight) and may be a
        point of zero weight. ``tol`` ignores the weights, as in scikit-learn.

    Scope and numerics:
        Elkan's algorithm is not offered: Lloyd's dense GEMM + argmin keeps every model (and
        restart) in one batched kernel, while Elkan's per-point bounds are branchy and need
        ``N x K`` memory per model. Distances are computed as GEMMs (``|x|^2 - 2 x.c + |c|^2``),
        which round: a point's squared distance to itself is about ``eps * |x|^2``, not exactly 0.

    Shape:
        X: ``(N, D)`` shared by every model, or ``(*batch_shape, N, D)``.
        sample_weight: ``(N,)``, or ``(*batch_shape, N)`` (one weighting per model).
        cluster_centers_: ``(*batch_shape, K, D)``; labels_: ``(*batch_shape, N)``;
        inertia_, n_iter_: ``(*batch_shape)``; transform(X): ``(*batch_shape, N, K)``.
    """

    _dtype_buffer = "cluster_centers_"
    # buffers registered in __init__ (the stream's None until partial_fit sets them)
    cluster_centers_: torch.Tensor
    stream_counts: torch.Tensor | None
    stream_sums: torch.Tensor | None
    stream_steps: torch.Tensor | None

    def __init__(
        self,
        n_clusters: int,
        *,
        init: str | Callable[..., Any] | Any = "k-means++",
        n_init: int = 1,
        max_iter: int = 300,
        tol: float = 1e-4,
        batch_shape: Sequence[int] = (),
        seed: int | None = None,
        chunk_size: int | None = None,
        learning_decay: float = 0.7,
        learning_offset: float = 10.0,
        step_size: float | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_int(n_clusters, "n_clusters", minimum=1)
        if isinstance(init, str) and init not in ("k-means++", "random"):
            raise ValueError(f"init must be 'k-means++', 'random', an array of centres or a callable, got {init!r}")
        check_int(n_init, "n_init", minimum=1)
        check_int(max_iter, "max_iter", minimum=1)
        check_positive(tol, "tol", allow_zero=True)
        batch_shape = check_common_options(batch_shape, chunk_size, seed)
        self.n_clusters = int(n_clusters)
        self.init = init
        self.n_init = int(n_init)
        self.max_iter = int(max_iter)
        self.tol = float(tol)
        self.batch_shape = batch_shape
        self.seed = seed
        self.chunk_size = chunk_size
        dtype, device = check_dtype(dtype), check_device(device)
        self._dtype_follows_data = dtype is None
        dtype = dtype if dtype is not None else data_dtype(None)
        self.schedule = StepSchedule(learning_decay, learning_offset, step_size)
        self.register_buffer("cluster_centers_", torch.empty(0, device=device, dtype=dtype))
        for name in STREAM_BUFFERS:  # running state of partial_fit
            self.register_buffer(name, None)
        self.labels_: torch.Tensor | None = None
        self.inertia_: torch.Tensor | None = None
        self.n_iter_: torch.Tensor | None = None
        self.converged_: torch.Tensor | None = None

    @property
    def n_models(self) -> int:
        return math.prod(self.batch_shape)

    def _config(self) -> dict[str, Any]:
        """The constructor's keyword arguments (without ``device`` and ``dtype``), as
        :mod:`torch_em.serialization` saves them."""
        return {"n_clusters": self.n_clusters, "init": self.init, "n_init": self.n_init, "max_iter": self.max_iter,
                "tol": self.tol, "batch_shape": tuple(self.batch_shape), "seed": self.seed,
                "chunk_size": self.chunk_size, "learning_decay": self.schedule.learning_decay,
                "learning_offset": self.schedule.learning_offset, "step_size": self.schedule.step_size}

    @property
    def n_features(self) -> int | None:
        return self.cluster_centers_.shape[-1] if self.cluster_centers_.numel() else None

    @property
    def is_initialized(self) -> bool:
        """Whether the centres exist (after a first fit, partial_fit or load)."""
        return self.n_features is not None

    @keeps_dtype_when_rejected
    @without_autocast
    @torch.no_grad()
    def fit(self, X: Any, y: Any = None, sample_weight: Any = None) -> "KMeans":
        """Cluster every model's data; raises ValueError before changing anything. Restart 0
        runs as a batch of its own (bit for bit ``n_init=1``); the fit ends a mini-batch
        stream (``partial_fit`` starts a new one from the fitted centres). ``y`` is ignored.

        Shape:
            X: ``(N, D)`` or ``(*batch_shape, N, D)``; sample_weight: ``(N,)`` or ``(*batch_shape, N)``.
        """
        X, weights = self._validated_input(X, fitting=True, sample_weight=sample_weight)
        R, M, K = self.n_init, self.n_models, self.n_clusters
        X, weights = per_model(X, M, 2), per_model(weights, M, 1)
        given = self._given_centres(X, R)  # (R, M, K, D) or None
        shift = X.mean(-2, keepdim=True)  # centre the data: distances as GEMMs cancel less
        X = X - shift
        chunk = self._chunk(M * K)  # rows per chunk for one restart: restart 0 computes as with n_init=1
        tol = relative_tolerance(X, self.tol)
        result = cat_restarts([
            lloyd(X, self._seed_centres(X, shift, restarts, chunk, weights, given), max_iter=self.max_iter, tol=tol,
                  chunk_size=chunk, weights=weights)
            for restarts in restart_groups(R)
        ])
        inertia = weighted_total(result.distances, weights)  # (R, M)
        layout = Layout(tuple(self.batch_shape))
        best = layout.best_restart(-inertia)  # (M,) the lowest inertia
        self.cluster_centers_ = layout.pick(result.centres + shift, best)  # shift (1, D) or (M, 1, D) broadcasts
        self.labels_ = layout.pick(result.labels, best)
        self.inertia_ = layout.pick(inertia, best)
        self.n_iter_ = layout.pick(result.n_iter, best)
        self.converged_ = layout.pick(result.converged, best)
        logger.info("KMeans.fit: %d model(s) x %d restart(s): %d converged, %d-%d iterations", self.n_models, R,
                    int(self.converged_.sum()), int(self.n_iter_.min()), int(self.n_iter_.max()))
        for name in STREAM_BUFFERS:  # a later partial_fit starts a new stream from these centres
            setattr(self, name, None)
        return self

    def _seed_centres(
        self, X: torch.Tensor, shift: torch.Tensor, restarts: range, chunk: int, weights: torch.Tensor | None,
        given: torch.Tensor | None,
    ) -> torch.Tensor:
        """Initial centres (R, M, K, D) of the R given restarts for centred data X (N, D) / (M, N, D)
        and weights (N,) / (M, N) / None; ``given`` (all restarts, uncentred) replaces the seeding."""
        M, K = self.n_models, self.n_clusters
        if given is not None:
            return given[restarts.start:restarts.stop] - shift
        streams = RestartStreams(self.seed, restarts, X.device)
        if self.init == "random":
            return random_points(X, M, K, streams, weights)
        return initialization.kmeans_plusplus(X, M, K, streams, chunk, weights)

    @keeps_dtype_when_rejected
    @without_autocast
    @torch.no_grad()
    def partial_fit(self, X: Any, y: Any = None, sample_weight: Any = None) -> "KMeans":
        """One mini-batch k-means step, the hard-assignment case of stepwise EM: each centre is
        ``sums / counts`` of running per-point statistics ``s <- (1 - rho_t) s + rho_t s_hat``
        of the points nearest to it (``rho_t`` as in :class:`torch_em.Mixture`); ``s_hat`` are
        the batch's per-cluster (weighted) sums and counts divided by its total weight. The
        first call seeds the centres from its batch when there are none. A centre no point has
        reached yet keeps its place. The running state is in buffers (``state_dict`` resumes a
        stream). ``y`` is ignored.

        Shape:
            X: ``(N, D)`` or ``(*batch_shape, N, D)``; sample_weight: ``(N,)`` or ``(*batch_shape, N)``.
        """
        started = self.stream_steps is not None
        steps_so_far = 0 if self.stream_steps is None else int(self.stream_steps)
        X, weights = self._validated_input(X, fitting=self.n_features is None, sample_weight=sample_weight)
        M, K, D = self.n_models, self.n_clusters, X.shape[-1]
        X, weights = per_model(X, M, 2), per_model(weights, M, 1)
        chunk = self._chunk(M * K)
        if self.n_features is None:
            given = self._given_centres(X, 1)
            shift = X.mean(-2, keepdim=True)
            centres = self._seed_centres(X - shift, shift, range(1), chunk, weights, given) + shift  # (1, M, K, D)
        else:
            centres = self.cluster_centers_.reshape(1, M, K, D)
        labels, dist = nearest(X, centres, chunk)
        sums, counts = cluster_sums(X, labels, K, chunk, weights=weights)  # (1, M, K, D), (1, M, K)
        inertia = weighted_total(dist, weights)  # (1, M), of this batch before the step
        total = (X.new_tensor(X.shape[-2]) if weights is None else weights.sum(-1)).expand(1, M)  # the batch's weight
        batch = Statistics(counts, sums, -inertia).scaled(1 / total)  # per (weighted) point
        if started:  # the stepwise rule of online EM, with the same schedule
            # (mid-stream: the running statistics are set)
            counts_so_far, sums_so_far = cast(torch.Tensor, self.stream_counts), cast(torch.Tensor, self.stream_sums)
            running = Statistics(counts_so_far.reshape(1, M, K), sums_so_far.reshape(1, M, K, D), -inertia)
            batch = running.lerp(batch, self.schedule.rho(steps_so_far))
        counts, sums = batch.counts, batch.sums
        reached = counts > 0
        centres = torch.where(reached.unsqueeze(-1), sums / counts.clamp_min(torch.finfo(X.dtype).tiny).unsqueeze(-1), centres)
        self.cluster_centers_ = centres[0].reshape(*self.batch_shape, K, D)
        self.stream_counts = counts[0].reshape(*self.batch_shape, K)
        self.stream_sums = sums[0].reshape(*self.batch_shape, K, D)
        self.stream_steps = torch.tensor(steps_so_far + 1, device=X.device)
        self.inertia_ = inertia[0].reshape(self.batch_shape)
        return self

    @torch.no_grad()
    def fit_predict(self, X: Any, y: Any = None, sample_weight: Any = None) -> torch.Tensor:
        """:meth:`fit`, then the labels ``(*batch_shape, N)``; ``y`` is ignored."""
        return cast(torch.Tensor, self.fit(X, sample_weight=sample_weight).labels_)  # set by fit

    @without_autocast
    @torch.no_grad()
    def predict(self, X: Any) -> torch.Tensor:
        """Index of the nearest centre ``(*batch_shape, N)``."""
        return self._nearest(self._validated_input(X)[0])[0]

    @without_autocast
    @torch.no_grad()
    def transform(self, X: Any) -> torch.Tensor:
        """Euclidean distances to every centre ``(*batch_shape, N, K)``."""
        X, centres = self._working(self._validated_input(X)[0])
        chunk = self._chunk(self.n_models * self.n_clusters)
        blocks = [squared_distances(X[..., a:a + chunk, :], centres) for a in range(0, X.shape[-2], chunk)]
        distances = self._finite(torch.cat(blocks, -1).sqrt()[0], "transform")  # (M, K, N)
        return distances.mT.reshape(*self.batch_shape, X.shape[-2], self.n_clusters)

    @without_autocast
    @torch.no_grad()
    def score(self, X: Any, y: Any = None, sample_weight: Any = None) -> torch.Tensor:
        """Negative (weighted) inertia of X under the fitted centres ``(*batch_shape)``; ``y`` is
        ignored.

        Shape:
            X: ``(N, D)`` or ``(*batch_shape, N, D)``; sample_weight: ``(N,)`` or ``(*batch_shape, N)``.
        """
        X, weights = self._validated_input(X, sample_weight=sample_weight)
        distances = self._nearest(X)[1]  # (*batch_shape, N)
        return self._finite(-(distances if weights is None else distances * weights).sum(-1), "score")

    def _nearest(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest centre and squared distance to it, both ``(*batch_shape, N)``, for validated X."""
        X, centres = self._working(X)
        labels, dist = nearest(X, centres, self._chunk(self.n_models * self.n_clusters))
        self._finite(dist, "predict")
        return labels.reshape(*self.batch_shape, X.shape[-2]), dist.reshape(*self.batch_shape, X.shape[-2])

    def _working(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Validated X as centred data (N, D) or (M, N, D) and centres (1, M, K, D) in the same frame.

        The frame's origin is the mean of the centres (over the models too when X is shared): a
        function of the model alone, so a row's result never depends on the other rows."""
        M, K, D = self.n_models, self.n_clusters, X.shape[-1]
        X = X if X.dim() == 2 else X.reshape(M, X.shape[-2], D)
        centres = self.cluster_centers_.reshape(1, M, K, D)
        shift = centres.mean((1, 2)) if X.dim() == 2 else centres[0].mean(-2, keepdim=True)  # (1, D) or (M, 1, D)
        return X - shift, centres - shift

    def _finite(self, result: torch.Tensor, method: str) -> torch.Tensor:
        """``result``, or a ValueError when its squared distances overflowed."""
        if not bool(torch.isfinite(result).all()):
            raise ValueError(
                f"{method}: squared distances between X and the centres overflow {result.dtype}; "
                "use dtype=torch.float64 or scale the data"
            )
        return result

    def _chunk(self, n_centres: int) -> int:
        return self.chunk_size or default_chunk(n_centres)

    def _validated_input(
        self, X: Any, fitting: bool = False, sample_weight: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """X as a checked tensor in the centres' dtype and the checked weights (or None); a first
        fit of a KMeans without ``dtype=`` adopts X's (see :func:`torch_em._validation.data_dtype`)."""
        if not fitting and self.n_features is None:
            raise NotFittedError("KMeans has no centres yet: call fit(X) first")
        adopts = self._dtype_follows_data and self.n_features is None
        dtype = data_dtype(X) if adopts else self.cluster_centers_.dtype
        X = as_float_tensor(X, "X", device=self.cluster_centers_.device, dtype=dtype)
        check_data(X, "X", n_features=None if fitting else self.n_features, batch_shape=self.batch_shape,
                   min_samples=self.n_clusters if fitting else 1)
        check_magnitude(X, "X", power=2, what="squared distances")
        weights = checked_weights(sample_weight, X, self.batch_shape)
        if adopts:  # the empty placeholder takes the dtype the centres will have
            self.cluster_centers_ = self.cluster_centers_.to(dtype)
        return X, weights

    def _given_centres(self, X: torch.Tensor, n_restarts: int) -> torch.Tensor | None:
        """Initial centres (R, M, K, D) from an array or a callable ``init``, for uncentred data
        X (N, D) / (M, N, D); None for a seeding method."""
        M, K, D = self.n_models, self.n_clusters, X.shape[-1]
        if isinstance(self.init, str):
            return None
        if callable(self.init):
            return self._called_centres(X, n_restarts)
        return self._user_centres(D).reshape(1, M, K, D).expand(n_restarts, M, K, D)

    def _called_centres(self, X: torch.Tensor, n_restarts: int) -> torch.Tensor:
        """Centres (R, M, K, D) from ``init(X_m, n_clusters, random_state)``, called restart by
        restart and model by model with one RandomState seeded from ``seed`` (so restart 0 gets
        what ``n_init=1`` gets) and a copy of the model's data (N, D) on the CPU."""
        M, K, D = self.n_models, self.n_clusters, X.shape[-1]
        name = "init(X, n_clusters, random_state)"
        data = X.detach().cpu().numpy()
        random_state = np.random.RandomState(np.random.MT19937(resolve_seed(self.seed)))
        init = cast(Callable[..., Any], self.init)  # (called for a callable init)
        centres = []
        for _ in range(n_restarts):
            for m in range(M):
                returned = init(np.array(data if X.dim() == 2 else data[m]), K, random_state=random_state)
                tensor = as_float_tensor(returned, name, device=X.device, dtype=X.dtype)
                if tuple(tensor.shape) != (K, D):
                    raise ValueError(f"{name} must return centres of shape ({K}, {D}), got {tuple(tensor.shape)}")
                check_finite(tensor, name)
                centres.append(tensor)
        return torch.stack(centres).view(n_restarts, M, K, D)

    def _user_centres(self, n_features: int) -> torch.Tensor:
        """The centres given as ``init``, checked: (*batch_shape, K, D)."""
        centres = as_float_tensor(self.init, "init", device=self.cluster_centers_.device, dtype=self.cluster_centers_.dtype)
        check_shape(centres, "init", (self.n_clusters, n_features), self.batch_shape)
        check_finite(centres, "init")
        return centres.expand(*self.batch_shape, self.n_clusters, n_features)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, *args, **kwargs):
        """Check the whole incoming state first (torch would copy entry by entry, then raise),
        then adopt the saved shapes: a fresh module holds an empty placeholder and no stream
        state; a strict load of a state without a stream ends the stream."""
        state = own_entries(state_dict, prefix)
        self._check_state(state, prefix, self._strict_load)
        device, dtype = self.cluster_centers_.device, self.cluster_centers_.dtype
        for name in ("cluster_centers_", *STREAM_BUFFERS):
            saved = state.get(name)
            if saved is not None:
                setattr(self, name, torch.empty(saved.shape, device=device,
                                                dtype=dtype if saved.is_floating_point() else saved.dtype))
            elif self._strict_load:
                setattr(self, name, None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, *args, **kwargs)

    def _check_state(self, state: dict[str, Any], prefix: str, strict: bool) -> None:
        """Raise ValueError/TypeError unless ``state`` (this module's entries) loads whole:
        centres ``(*batch_shape, n_clusters, D)`` (D of the fitted centres, if any) or an unfitted
        placeholder ``(0,)``, and a stream's statistics of matching shapes."""
        owner = f"KMeans({self.extra_repr()})"
        batch, K = tuple(self.batch_shape), self.n_clusters
        centres = state.get("cluster_centers_")
        D = self.n_features
        if D is None and isinstance(centres, torch.Tensor) and centres.numel():
            D = centres.shape[-1]
        fitted = [(*batch, K, D)] if D else []
        stream = any(name in state for name in STREAM_BUFFERS)
        if stream and not fitted:
            raise ValueError(f"state_dict has mini-batch state {[prefix + n for n in STREAM_BUFFERS]} but no centres for {owner}")
        # (D is None only when nothing is fitted: then no stream entry is accepted)
        shapes: dict[str, Any] = {
            "cluster_centers_": fitted if stream or self.n_features is not None else [*fitted, (0,)],
            "stream_counts": [(*batch, K)], "stream_sums": [(*batch, K, D)], "stream_steps": [()],
        }
        check_state(state, prefix, owner, shapes, strict=strict,
                    groups=[(["cluster_centers_"], True), (STREAM_BUFFERS, False)], counters=["stream_steps"])

    def extra_repr(self) -> str:
        batch = f", batch_shape={tuple(self.batch_shape)}" if self.batch_shape else ""
        return f"n_clusters={self.n_clusters}{batch}"


class DrawsSharedByModels:
    """Restart streams (:class:`torch_em._random.RestartStreams`) whose draws are the same for
    every model: model m of a batch draws what a working batch of model m alone draws."""

    def __init__(self, streams: RestartStreams) -> None:
        self.streams = streams

    def __len__(self) -> int:
        return len(self.streams)

    def rand(self, n_models: int, *shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Uniform [0, 1) numbers ``(R, n_models, *shape)``, equal along the models."""
        return self.streams.rand(1, *shape, dtype=dtype).expand(-1, n_models, *shape)

    def randint(self, high: int, n_models: int, *shape: int) -> torch.Tensor:
        """Integers in [0, high) ``(R, n_models, *shape)``, equal along the models."""
        return self.streams.randint(high, 1, *shape).expand(-1, n_models, *shape)


@without_autocast
@torch.no_grad()
def kmeans_plusplus(
    X: Any,
    n_clusters: int,
    *,
    sample_weight: Any = None,
    seed: int | None = None,
    n_local_trials: int | None = None,
) -> tuple[Any, Any]:
    """Greedy k-means++ seeding as :func:`sklearn.cluster.kmeans_plusplus`, for one dataset or a
    batch of them at once (the seeding :class:`KMeans` uses).

    The first centre is a row drawn uniformly (proportionally to ``sample_weight`` when given);
    each later one is the best of ``n_local_trials`` (default ``2 + int(log(n_clusters))``)
    candidates drawn proportionally to ``w * D^2``, D the distance to the nearest centre so far:
    the one leaving the least weighted potential. A point of zero weight is never chosen while
    a point of positive weight is left unchosen.

    Args:
        X: data; numpy (or anything array-like) in gives numpy out, a tensor gives tensors on
            its device.
        n_clusters: K, at most N.
        sample_weight: non-negative weights with a positive sum per dataset, or None.
        seed: seeds the draws. Every dataset of a batch gets the same uniforms, so a batched
            call gives what a call per dataset with the same seed gives (for one dataset, the
            draws of ``KMeans(seed=seed)``'s first restart).
        n_local_trials: candidates per centre after the first.

    Returns:
        ``(centers, indices)``: the chosen rows, ``centers == X[..., indices, :]``.

    Shape:
        X: ``(N, D)`` or ``(*batch, N, D)``; sample_weight: ``(N,)`` or ``(*batch, N)``.
        centers: ``(K, D)`` or ``(*batch, K, D)``; indices: ``(K,)`` or ``(*batch, K)`` (int64).
    """
    check_int(n_clusters, "n_clusters", minimum=1)
    if n_local_trials is not None:
        check_int(n_local_trials, "n_local_trials", minimum=1)
    if seed is not None:
        check_int(seed, "seed", minimum=0)
    returns_numpy = not isinstance(X, torch.Tensor)
    data = as_float_tensor(X, "X", device=None, dtype=data_dtype(X))
    batch = data.shape[:-2]
    check_data(data, "X", n_features=None, batch_shape=batch, min_samples=n_clusters)
    check_magnitude(data, "X", power=2, what="squared distances")
    weights = checked_weights(sample_weight, data, batch)
    M = math.prod(batch)
    flat, weights = per_model(data, M, 2), per_model(weights, M, 1)
    streams = DrawsSharedByModels(RestartStreams(seed, 1, data.device))
    indices = initialization.kmeans_plusplus_indices(
        flat - flat.mean(-2, keepdim=True), M, n_clusters, streams, default_chunk(M * n_clusters), weights, n_local_trials,
    )  # (1, M, K)
    centers = gather_points(flat, indices)[0].reshape(*batch, n_clusters, data.shape[-1])  # rows of X as given
    indices = indices[0].reshape(*batch, n_clusters)
    return (centers.cpu().numpy(), indices.cpu().numpy()) if returns_numpy else (centers, indices)
