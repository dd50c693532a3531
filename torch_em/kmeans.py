"""``KMeans``: batched Lloyd's algorithm, the hard-assignment limit of Gaussian-mixture EM."""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from ._precision import FollowsDataDtype, without_autocast
from ._validation import (
    as_float_tensor, check_common_options, check_data, check_device, check_dtype, check_finite, check_int, check_magnitude,
    check_positive, check_shape, data_dtype,
)
from .families.base import NotFittedError
from ._random import RestartStreams, restart_groups
from ._state import CheckedLoad, check_state, own_entries
from .em import cat_restarts
from .streaming import StepSchedule, stepwise
from .initialization import kmeans_plusplus, random_points
from .lloyd import cluster_sums, lloyd, nearest, relative_tolerance, squared_distances

STREAM_BUFFERS = ("stream_counts", "stream_sums", "stream_steps")

#: Rows per chunk keep one chunk's (R*M*K, n) distance block near this many elements.
CHUNK_ELEMENTS = 1 << 19


class KMeans(CheckedLoad, FollowsDataDtype):
    """A batch of k-means clusterings fitted by Lloyd's algorithm with batched tensor ops.

    Args:
        n_clusters: K.
        init: ``"k-means++"`` (greedy, as scikit-learn), ``"random"`` (K distinct data points) or
            initial centres ``(K, D)`` / ``(*batch_shape, K, D)``.
        n_init: restarts per model (an extra batch dimension); the lowest inertia wins.
        max_iter: Lloyd iterations at most.
        tol: a model stops when its squared centre shift is at most ``tol`` times the mean
            per-feature variance of its data (scikit-learn's convention).
        batch_shape: independent clusterings fitted together.
        seed, chunk_size, device, dtype: as for :class:`torch_em.Mixture` (without ``dtype`` the
            first fit adopts the data's dtype: float64 data give float64 centres).
        learning_decay, learning_offset, step_size: step sizes of :meth:`partial_fit` (mini-batch
            k-means), as for :class:`torch_em.Mixture`.

    Shape:
        X: ``(N, D)`` shared by every model, or ``(*batch_shape, N, D)``.
        cluster_centers_: ``(*batch_shape, K, D)``; labels_: ``(*batch_shape, N)``;
        inertia_, n_iter_: ``(*batch_shape)``; transform(X): ``(*batch_shape, N, K)``.
    """

    _dtype_buffer = "cluster_centers_"

    def __init__(
        self,
        n_clusters: int,
        *,
        init: str | Any = "k-means++",
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
            raise ValueError(f"init must be 'k-means++', 'random' or an array of centres, got {init!r}")
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

    @property
    def n_features(self) -> int | None:
        return self.cluster_centers_.shape[-1] if self.cluster_centers_.numel() else None

    @without_autocast
    @torch.no_grad()
    def fit(self, X: Any) -> "KMeans":
        """Cluster every model's data; raises ValueError before changing anything. Restart 0
        runs as a batch of its own (bit for bit ``n_init=1``); the fit ends a mini-batch
        stream (``partial_fit`` starts a new one from the fitted centres)."""
        X = self._validated_input(X, fitting=True)
        R, M, K = self.n_init, self.n_models, self.n_clusters
        X = X if X.dim() == 2 else X.reshape(M, *X.shape[-2:])
        shift = X.mean(-2, keepdim=True)  # centre the data: distances as GEMMs cancel less
        X = X - shift
        chunk = self._chunk(M * K)  # rows per chunk for one restart: restart 0 computes as with n_init=1
        tol = relative_tolerance(X, self.tol)
        result = cat_restarts([
            lloyd(X, self._seed_centres(X, shift, restarts, chunk), max_iter=self.max_iter, tol=tol, chunk_size=chunk)
            for restarts in restart_groups(R)
        ])
        inertia = result.distances.sum(-1)  # (R, M)
        best = inertia.argmin(0)  # (M,)

        def pick(value: torch.Tensor) -> torch.Tensor:
            index = best.view(1, M, *([1] * (value.dim() - 2))).expand(1, *value.shape[1:])
            chosen = value.gather(0, index)[0]
            return chosen.reshape((*self.batch_shape, *chosen.shape[1:]))

        self.cluster_centers_ = pick(result.centres + shift)  # shift (1, D) or (M, 1, D) broadcasts
        self.labels_ = pick(result.labels)
        self.inertia_ = pick(inertia)
        self.n_iter_ = pick(result.n_iter)
        self.converged_ = pick(result.converged)
        for name in STREAM_BUFFERS:  # a later partial_fit starts a new stream from these centres
            setattr(self, name, None)
        return self

    def _seed_centres(self, X: torch.Tensor, shift: torch.Tensor, restarts: range, chunk: int) -> torch.Tensor:
        """Initial centres (R, M, K, D) of the R given restarts for centred data X (N, D) / (M, N, D)."""
        M, K, D = self.n_models, self.n_clusters, X.shape[-1]
        centres = self._user_centres(D)
        if centres is not None:
            return centres.reshape(1, M, K, D).expand(len(restarts), M, K, D) - shift
        streams = RestartStreams(self.seed, restarts, X.device)
        if self.init == "random":
            return random_points(X, M, K, streams)
        return kmeans_plusplus(X, M, K, streams, chunk)

    @without_autocast
    @torch.no_grad()
    def partial_fit(self, X: Any) -> "KMeans":
        """One mini-batch k-means step, the hard-assignment case of stepwise EM: each centre is
        ``sums / counts`` of running per-point statistics ``s <- (1 - rho_t) s + rho_t s_hat``
        of the points nearest to it (``rho_t`` as in :class:`torch_em.Mixture`). The first call
        seeds the centres from its batch when there are none. A centre no point has reached yet
        keeps its place. The running state is in buffers (``state_dict`` resumes a stream)."""
        started = self.stream_steps is not None
        X = self._validated_input(X, fitting=self.n_features is None)
        M, K, D = self.n_models, self.n_clusters, X.shape[-1]
        X = X if X.dim() == 2 else X.reshape(M, *X.shape[-2:])
        n_points, chunk = X.shape[-2], self._chunk(M * K)
        if self.n_features is None:
            shift = X.mean(-2, keepdim=True)
            centres = self._seed_centres(X - shift, shift, range(1), chunk) + shift  # (1, M, K, D)
        else:
            centres = self.cluster_centers_.reshape(1, M, K, D)
        labels, dist = nearest(X, centres, chunk)
        sums, counts = cluster_sums(X, labels, K, chunk)  # (1, M, K, D), (1, M, K)
        rho = self.schedule.rho(int(self.stream_steps) if started else 0)
        counts = stepwise(self.stream_counts.reshape(1, M, K) if started else None, counts / n_points, rho)
        sums = stepwise(self.stream_sums.reshape(1, M, K, D) if started else None, sums / n_points, rho)
        reached = counts > 0
        centres = torch.where(reached.unsqueeze(-1), sums / counts.clamp_min(torch.finfo(X.dtype).tiny).unsqueeze(-1), centres)
        self.cluster_centers_ = centres[0].reshape(*self.batch_shape, K, D)
        self.stream_counts = counts[0].reshape(*self.batch_shape, K)
        self.stream_sums = sums[0].reshape(*self.batch_shape, K, D)
        self.stream_steps = torch.tensor(int(self.stream_steps) + 1 if started else 1, device=X.device)
        self.inertia_ = dist[0].sum(-1).reshape(self.batch_shape)  # of this batch, before the step
        return self

    @torch.no_grad()
    def fit_predict(self, X: Any) -> torch.Tensor:
        return self.fit(X).labels_

    @without_autocast
    @torch.no_grad()
    def predict(self, X: Any) -> torch.Tensor:
        """Index of the nearest centre ``(*batch_shape, N)``."""
        return self._nearest(X)[0]

    @without_autocast
    @torch.no_grad()
    def transform(self, X: Any) -> torch.Tensor:
        """Euclidean distances to every centre ``(*batch_shape, N, K)``."""
        X, centres = self._working(X)
        chunk = self._chunk(self.n_models * self.n_clusters)
        blocks = [squared_distances(X[..., a:a + chunk, :], centres) for a in range(0, X.shape[-2], chunk)]
        distances = self._finite(torch.cat(blocks, -1).sqrt()[0], "transform")  # (M, K, N)
        return distances.mT.reshape(*self.batch_shape, X.shape[-2], self.n_clusters)

    @without_autocast
    @torch.no_grad()
    def score(self, X: Any) -> torch.Tensor:
        """Negative inertia of X under the fitted centres ``(*batch_shape)``."""
        return self._finite(-self._nearest(X)[1].sum(-1), "score")

    def _nearest(self, X: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest centre and squared distance to it, both ``(*batch_shape, N)``."""
        X, centres = self._working(X)
        labels, dist = nearest(X, centres, self._chunk(self.n_models * self.n_clusters))
        self._finite(dist, "predict")
        return labels.reshape(*self.batch_shape, X.shape[-2]), dist.reshape(*self.batch_shape, X.shape[-2])

    def _working(self, X: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Validated, centred data (N, D) or (M, N, D) and centres (1, M, K, D) in the same frame.

        The frame's origin is the mean of the centres (over the models too when X is shared): a
        function of the model alone, so a row's result never depends on the other rows."""
        X = self._validated_input(X)
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
        return self.chunk_size or max(256, CHUNK_ELEMENTS // n_centres)

    def _validated_input(self, X: Any, fitting: bool = False) -> torch.Tensor:
        """X as a checked tensor in the centres' dtype; a first fit of a KMeans without ``dtype=``
        adopts X's (see :func:`torch_em._validation.data_dtype`)."""
        if not fitting and self.n_features is None:
            raise NotFittedError("KMeans has no centres yet: call fit(X) first")
        adopts = self._dtype_follows_data and self.n_features is None
        dtype = data_dtype(X) if adopts else self.cluster_centers_.dtype
        X = as_float_tensor(X, "X", device=self.cluster_centers_.device, dtype=dtype)
        check_data(X, "X", n_features=None if fitting else self.n_features, batch_shape=self.batch_shape,
                   min_samples=self.n_clusters if fitting else 1)
        check_magnitude(X, "X", power=2, what="squared distances")
        if adopts:  # the empty placeholder takes the dtype the centres will have
            self.cluster_centers_ = self.cluster_centers_.to(dtype)
        return X

    def _user_centres(self, n_features: int) -> torch.Tensor | None:
        if isinstance(self.init, str):
            return None
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
        shapes = {
            "cluster_centers_": fitted if stream or self.n_features is not None else [*fitted, (0,)],
            "stream_counts": [(*batch, K)], "stream_sums": [(*batch, K, D)], "stream_steps": [()],
        }
        check_state(state, prefix, owner, shapes, strict=strict,
                    groups=[(["cluster_centers_"], True), (STREAM_BUFFERS, False)], counters=["stream_steps"])

    def extra_repr(self) -> str:
        batch = f", batch_shape={tuple(self.batch_shape)}" if self.batch_shape else ""
        return f"n_clusters={self.n_clusters}{batch}"
