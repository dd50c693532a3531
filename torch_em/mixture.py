"""``Mixture``: a finite mixture of any component family as an ``nn.Module``.

One module holds a batch of independent mixtures (``batch_shape``). Its parameters are
unconstrained ``nn.Parameter`` s shaped ``(*batch_shape, *event_shape)``: ``logits (*b, K)`` for the
mixing weights plus the family's own (e.g. ``loc`` and ``raw_precision_cholesky`` for Gaussians).
EM writes them in place under ``no_grad``, so optimizers, ``.to()``, ``state_dict()`` and hooks
keep working on the same objects; ``forward``/``log_prob`` is pure and differentiable.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from . import distributed, em
from ._precision import FollowsDataDtype, without_autocast
from ._validation import (
    as_float_tensor, check_choice, check_common_options, check_data, check_device, check_dtype, check_family,
    check_finite, check_int, check_positive, check_shape, data_dtype,
)
from ._state import CheckedLoad, check_state, own_entries
from .families.base import ComponentFamily, NotFittedError, Theta
from ._random import RestartStreams, resolve_seed, restart_groups
from .streaming import StepSchedule, StreamSample, batch_source, stepwise, unwrap_batch
from .initialization import METHODS, initial_responsibilities, random_points


STREAM_BUFFERS = ("stream_counts", "stream_sums", "stream_steps", "stream_shift")
#: Choices of ``on_error``: raise IllConditionedError, or isolate the failing models of a batch.
ON_ERROR = ("raise", "isolate")
#: A FitFailedWarning quotes the reasons of at most this many failed models.
QUOTED_FAILURES = 3


class Mixture(CheckedLoad, FollowsDataDtype):
    """A batch of finite mixtures of ``n_components`` components of ``family``.

    ``fit`` takes one tensor/array, or a batch source for data larger than memory (a
    ``DataLoader``, or a callable returning a fresh iterator of batches per pass): exact EM with
    one pass per iteration, initialised on a uniform sample of ``stream_sample_size`` points.

    Args:
        family: the component family (e.g. ``torch_em.families.Gaussian("diag")``).
        n_components: K, components per mixture.
        n_features: D. When given, parameters exist at construction; otherwise the first
            ``fit`` creates them.
        batch_shape: shape of the batch of independent models fitted together.
        tol: a model has converged when its mean log-likelihood changes by less than ``tol``.
        max_iter: EM iterations at most.
        n_init: restarts per model, run as an extra batch dimension; the best lower bound wins.
        init_params: ``"k-means++"`` (seeding plus a few Lloyd iterations), ``"kmeans"``,
            ``"random"`` (random responsibilities) or ``"random_from_data"``.
        weights_init: initial mixing weights ``(K,)`` or ``(*batch_shape, K)``.
        seed: seed of all randomness; the same seed gives the same fit (and the same sequence of
            ``sample`` draws).
        chunk_size: rows of data per chunk of the E-step (default: from a memory budget).
        learning_decay, learning_offset, step_size: the step sizes of online EM (:meth:`partial_fit`):
            ``rho_t = (t + learning_offset) ** -learning_decay`` with learning_decay in (0.5, 1]
            (or 0: every batch replaces the statistics), or a constant ``step_size`` in (0, 1].
        averaging_start: after this many ``partial_fit`` steps, average the iterates (Polyak).
        em_parameters: names of the parameters that ``fit`` and ``partial_fit`` update (default:
            all, ``("logits", *family parameter names)``). The others are held at their current
            values and EM maximises the rest given them (a conditional M-step), so an optimizer can
            own them; see :attr:`em_parameters`.
        warm_start: when True, ``fit`` on a module that has parameters starts EM from them
            (scikit-learn's meaning): ``max_iter=1`` then makes ``fit`` one EM step.
        on_error: what a model whose M-step gives an invalid component, or whose log-likelihood
            is not finite, does to the fit. ``"raise"``: IllConditionedError naming it, and the
            module is left as it was. ``"isolate"``: that model stops and keeps its last valid
            parameters (those whose lower bound was last computed; the family's default
            parameters when initialisation failed), it is marked in :attr:`failed_` with its
            reason in :attr:`failure_reasons_`, a :class:`FitFailedWarning` names it, and the
            other models finish as if fitted alone. A restart that fails loses to the others; a
            model fails only when all its restarts fail. For failed models ``lower_bound_`` is
            NaN, ``converged_`` False, ``score_samples``, ``score``, ``bic``, ``aic`` and
            ``predict_proba`` return NaN and ``predict`` returns -1 (``log_prob``/``forward``
            stay the density of the parameters held). Default (None): ``"raise"`` for
            ``batch_shape=()``, ``"isolate"`` for a batch.
        device, dtype: where the parameters live (default: CPU). ``dtype`` (a torch dtype or its
            name, e.g. ``"float64"``) fixes the dtype; without it the first ``fit`` or
            ``partial_fit`` of a module without parameters adopts the data's (see
            :func:`torch_em._validation.data_dtype`: float64 data give float64 parameters as in
            scikit-learn; integer, boolean and half-precision data give torch's default dtype).
            Parameters that exist (``n_features`` given, or fitted) keep theirs, and ``.to()`` /
            ``.double()`` fix it too.

    Shape:
        X: ``(N, D)`` shared by every model of the batch, or ``(*batch_shape, N, D)``.
        log_prob(X): ``(*batch_shape, N)``; predict_proba(X): ``(*batch_shape, N, K)``.
    """

    #: Larger datasets (and batch sources) are initialised (k-means++ etc.) on a uniform sample of
    #: this many points (at least 50 per component), which bounds the memory of initialisation.
    stream_sample_size: int = 20_000
    _dtype_buffer = "_anchor"

    def __init__(
        self,
        family: ComponentFamily,
        n_components: int,
        n_features: int | None = None,
        *,
        batch_shape: Sequence[int] = (),
        tol: float = 1e-3,
        max_iter: int = 100,
        n_init: int = 1,
        init_params: str = "k-means++",
        weights_init: Any = None,
        seed: int | None = None,
        chunk_size: int | None = None,
        learning_decay: float = 0.7,
        learning_offset: float = 10.0,
        step_size: float | None = None,
        averaging_start: int | None = None,
        em_parameters: Sequence[str] | None = None,
        warm_start: bool = False,
        on_error: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_family(family)
        check_int(n_components, "n_components", minimum=1)
        if n_features is not None:
            check_int(n_features, "n_features", minimum=1)
        check_positive(tol, "tol", allow_zero=True)
        check_int(max_iter, "max_iter", minimum=1)
        check_int(n_init, "n_init", minimum=1)
        check_choice(init_params, "init_params", METHODS)
        if on_error is not None:
            check_choice(on_error, "on_error", ON_ERROR)
        batch_shape = check_common_options(batch_shape, chunk_size, seed)
        self.schedule = StepSchedule(learning_decay, learning_offset, step_size)
        if averaging_start is not None:
            check_int(averaging_start, "averaging_start", minimum=0)
        self.averaging_start = averaging_start
        dtype, device = check_dtype(dtype), check_device(device)
        self._dtype_follows_data = dtype is None
        dtype = dtype if dtype is not None else data_dtype(None)

        self.family = family
        self.n_components = int(n_components)
        self.n_features = None if n_features is None else int(n_features)
        self.batch_shape = batch_shape
        self.tol = float(tol)
        self.max_iter = int(max_iter)
        self.n_init = int(n_init)
        self.init_params = init_params
        self.weights_init = weights_init
        self.seed = seed
        self.chunk_size = chunk_size
        # Follows .to()/.double() so that parameters created later land on the right device/dtype.
        self.register_buffer("_anchor", torch.empty(0, device=device, dtype=dtype), persistent=False)
        self._parameter_names = ("logits", *family.event_shapes(1, 1))
        self.em_parameters = self._parameter_names if em_parameters is None else em_parameters
        if not isinstance(warm_start, bool):
            raise ValueError(f"warm_start must be True or False, got {warm_start!r}")
        self.warm_start = warm_start
        self.on_error = on_error
        for name in self._parameter_names:
            self.register_parameter(name, None)
        # Running state of online EM (partial_fit): normalised statistics, step count, shift.
        for name in STREAM_BUFFERS:
            self.register_buffer(name, None)
        self._register_load_state_dict_pre_hook(self._create_parameters_before_load, with_module=False)
        self._register_load_state_dict_pre_hook(self._adopt_saved_dtype, with_module=False)
        self.converged_: torch.Tensor | None = None
        self.n_iter_: torch.Tensor | None = None
        self.lower_bound_: torch.Tensor | None = None
        self.lower_bound_history_: torch.Tensor | None = None
        #: (*batch_shape) bool: the models whose last fit or partial_fit failed (on_error="isolate").
        self.failed_: torch.Tensor | None = None
        #: {model index: reason} for the failed models (the message IllConditionedError would carry).
        self.failure_reasons_: dict[tuple[int, ...], str] = {}
        self._sample_generator: torch.Generator | None = None

        if self.n_features is not None:
            generator = self._generator()
            theta = family.default_parameters(
                tuple(self.batch_shape), self.n_components, self.n_features, generator, self.device, self.dtype
            )
            theta["logits"] = torch.zeros(*self.batch_shape, self.n_components, device=self.device, dtype=self.dtype)
            theta.update(self._user_initial_parameters(self.n_features))
            self._assign(theta, create=True)

    # --- basic properties -----------------------------------------------------------------
    @property
    def em_parameters(self) -> tuple[str, ...]:
        """Names of the parameters EM updates; the others keep their values in ``fit`` and
        ``partial_fit`` (e.g. owned by an optimizer). Assignable at any time."""
        return self._em_parameters

    @em_parameters.setter
    def em_parameters(self, names: Sequence[str]) -> None:
        if isinstance(names, str) or not all(isinstance(name, str) for name in names):
            raise ValueError(f"em_parameters must be a sequence of parameter names, got {names!r}")
        unknown = sorted(set(names) - set(self._parameter_names))
        if unknown:
            raise ValueError(f"em_parameters must name parameters among {list(self._parameter_names)}, got unknown {unknown}")
        held = set(self._parameter_names[1:]) - set(names)
        if not self.family.supports_fixing(held):
            raise ValueError(
                f"em_parameters: {type(self.family).__name__} has no conditional M-step that holds {sorted(held)} "
                f"fixed while EM updates {sorted(set(self._parameter_names[1:]) - held)}; let EM own all or none of them"
            )
        self._em_parameters = tuple(name for name in self._parameter_names if name in set(names))

    @property
    def device(self) -> torch.device:
        return self._anchor.device

    @property
    def dtype(self) -> torch.dtype:
        return self._anchor.dtype

    @property
    def is_initialized(self) -> bool:
        return self.logits is not None

    @property
    def n_models(self) -> int:
        return math.prod(self.batch_shape)

    @property
    def weights(self) -> torch.Tensor:
        """Mixing weights ``(*batch_shape, K)``."""
        return self._require_parameters().softmax(-1)

    def theta(self) -> Theta:
        """The family's parameters (the live ``nn.Parameter`` s) by name."""
        self._require_parameters()
        return {name: getattr(self, name) for name in self._parameter_names[1:]}

    def n_parameters(self) -> int:
        """Free parameters of one model (for BIC/AIC)."""
        self._require_parameters()
        return self.family.n_free_parameters(self.n_components, self.n_features) + self.n_components - 1

    def extra_repr(self) -> str:
        batch = f", batch_shape={tuple(self.batch_shape)}" if self.batch_shape else ""
        return f"n_components={self.n_components}, n_features={self.n_features}{batch}"

    def __getattr__(self, name: str) -> Any:
        # A property that raised AttributeError (NotFittedError before a fit) lands here: raise
        # its own error rather than nn.Module's "has no attribute".
        attribute = getattr(type(self), name, None)
        if isinstance(attribute, property):
            return attribute.__get__(self, type(self))
        return super().__getattr__(name)

    # --- fitting ----------------------------------------------------------------------------
    @without_autocast
    @torch.no_grad()
    def fit(self, X: Any, verbose: bool = False) -> "Mixture":
        """Fit every model of the batch by EM (restarts as an extra batch dimension), or, with
        ``warm_start`` and existing parameters, continue EM from them (no initialisation, one
        start per model, convergence judged against the previous fit's lower bound).

        Restart 0 runs as a batch of its own, bit for bit the fit with ``n_init=1``; restarts
        1..k-1 run together. The fit ends an online stream (``partial_fit`` starts a new one).

        Raises ValueError before changing anything when X or the initial parameters are invalid,
        and IllConditionedError (also before any change) for a failing model when ``on_error`` is
        ``"raise"``; see ``on_error`` for the isolation of failing models.
        """
        M = self.n_models
        source = batch_source(X)
        data = self._prepare_tensor(X) if source is None else self._scan_stream(source)
        n_features = data.sample.X.shape[-1]
        continued = self.warm_start and self.is_initialized
        groups = [range(1)] if continued else restart_groups(self.n_init)
        with tqdm(total=self.max_iter * len(groups), desc="EM", disable=not verbose, leave=False) as progress:
            result = em.cat_restarts([
                self._run_restarts(data, n_features, restarts, continued, progress if verbose else None)
                for restarts in groups
            ])

        # (M,) best restart per model; a failed restart (nan) loses, restart 0 when all failed.
        best = result.lower_bound.nan_to_num(nan=-math.inf).argmax(0)

        def pick(value: torch.Tensor) -> torch.Tensor:
            """(R, M, ...) -> (*batch_shape, ...) at the best restart of each model."""
            index = best.view(1, M, *([1] * (value.dim() - 2))).expand(1, *value.shape[1:])
            chosen = value.gather(0, index)[0]  # (M, ...)
            return chosen.reshape((*self.batch_shape, *chosen.shape[1:]))

        fitted = {name: pick(value) for name, value in result.theta.items()}
        fitted["logits"] = pick(result.log_weights)
        self._assign_em_update(fitted)
        self.n_features = n_features
        self.lower_bound_ = pick(result.lower_bound)
        self.n_iter_ = pick(result.n_iter)
        self.converged_ = pick(result.converged)
        self.lower_bound_history_ = pick(result.history)
        self._clear_stream()  # a later partial_fit starts a new stream from these parameters
        self._record_failures(result.failures, best)
        not_converged = ~self.converged_ & ~self.failed_
        if bool(not_converged.any()):
            warnings.warn(
                f"{int(not_converged.sum())} of {M} model(s) did not converge in max_iter={self.max_iter} "
                "iterations; increase max_iter or tol, or check the data",
                em.ConvergenceWarning,
                stacklevel=2,
            )
        return self

    def _run_restarts(
        self, data: em.Data | em.StreamData, n_features: int, restarts: range, continued: bool, progress,
    ) -> em.EMResult:
        """EM for the working batch (len(restarts), M) of the given restarts, or (1, M) from the
        current parameters when ``continued`` (a warm start: its convergence check goes on from
        the last lower bound, as scikit-learn's does)."""
        previous = None
        failures = em.Failures.none(len(restarts), self.n_models, self.device) if self._isolates_failures() else None
        if continued:
            log_weights, theta = self._working_parameters()
            if self.lower_bound_ is not None and self.stream_steps is None:  # mid-stream it is a batch's
                previous = self._to_working(self.lower_bound_)
        else:
            user_theta = self._user_initial_parameters(n_features)
            user_centres = self.family.initial_centres(
                tuple(self.batch_shape), self.n_components, n_features, self.device, self.dtype
            )
            log_weights, theta = self._initial_parameters(data.sample, data.chunk_size, user_theta, user_centres, restarts,
                                                          failures)
            log_weights, theta = self._same_on_every_rank(log_weights, theta)
        fixed = self._fixed_parameters(log_weights, theta)
        log_weights, theta = self._with_fixed(log_weights, theta, fixed)
        return em.run_em(
            self.family, data, log_weights, theta, max_iter=self.max_iter, tol=self.tol,
            describe_model=self._describe_model, progress=progress, fixed=fixed, previous_lower_bound=previous,
            failures=failures,
        )

    def _clear_stream(self) -> None:
        """Forget the running statistics of online EM (``partial_fit``)."""
        for name in STREAM_BUFFERS:
            setattr(self, name, None)

    def _isolates_failures(self) -> bool:
        """Whether a failing model is isolated (``on_error``, by default so in a batch)."""
        on_error = self.on_error if self.on_error is not None else ("isolate" if self.batch_shape else "raise")
        return on_error == "isolate"

    def _record_failures(self, failures: em.Failures | None, best: torch.Tensor) -> None:
        """Set ``failed_`` and ``failure_reasons_`` from the failures of the chosen restarts
        ``best`` (M,), and warn naming the failed models."""
        M = self.n_models
        failed = torch.zeros(M, dtype=torch.bool, device=self.device)
        reasons: dict[tuple[int, ...], str] = {}
        if failures is not None and bool(failures.failed.any()):
            failed = failures.failed.gather(0, best.view(1, M))[0]
            for m in failed.nonzero().flatten().tolist():
                index = tuple(int(i) for i in np.unravel_index(m, tuple(self.batch_shape)))
                reasons[index] = failures.reasons[int(best[m]), m]
        self.failed_ = failed.reshape(self.batch_shape)
        self.failure_reasons_ = reasons
        if reasons:
            quoted = "; ".join(list(reasons.values())[:QUOTED_FAILURES]) + ("; ..." if len(reasons) > QUOTED_FAILURES else "")
            warnings.warn(
                f"{len(reasons)} of {M} model(s) failed and keep their last valid parameters (failed_, failure_reasons_; "
                f"their lower_bound_, score, score_samples, bic, aic and predict_proba are NaN, predict gives -1): {quoted}",
                em.FitFailedWarning,
                stacklevel=4,  # past fit (or partial_fit) and its no_grad wrapper
            )

    def _prepare_tensor(self, X: Any) -> em.Data:
        """Validated data for a fit, its reference point, and a sample to initialise on (a
        uniform subset when the data are large: bounded memory)."""
        M, K = self.n_models, self.n_components
        X = self._working_data(self._validated_input(X, "X", min_samples=K))
        chunk = self._default_chunk_size(X.shape[-1])
        shift = distributed.combined_reference(self.family.reference(X), X.shape[-2])
        data = em.Data(self.family, X, shift, chunk)
        data.n_total = distributed.total_points(X.shape[-2], X.device)
        if X.shape[-2] > self._sample_size():
            generator = torch.Generator().manual_seed(resolve_seed(self.seed))
            keep = torch.randperm(X.shape[-2], generator=generator)[: self._sample_size()].sort().values
            data.sample = em.Data(self.family, X[..., keep.to(X.device), :], shift, chunk)
        return data

    def _scan_stream(self, source) -> em.StreamData:
        """First pass over a batch source: validate every batch, count the points, take the data
        mean (for families with a reference point) and a uniform sample for initialisation."""
        K = self.n_components
        sample = StreamSample(self._sample_size(), self._generator())
        n_points, total, n_features, shared = 0, None, self.n_features, None
        for raw in source():
            batch = self._validated_input(unwrap_batch(raw), "X batch", n_features=n_features)
            if shared is not None and shared != (batch.dim() == 2):
                raise ValueError("X batches must all be (n, D) or all (*batch_shape, n, D), got a mix")
            shared, n_features = batch.dim() == 2, batch.shape[-1]
            batch = self._working_data(batch)
            n_points += batch.shape[-2]
            if self.family.uses_reference:
                batch_sum = batch.sum(-2, keepdim=True)
                total = batch_sum if total is None else total + batch_sum
            sample.add(batch)
        shift = distributed.combined_reference(None if total is None else total / n_points, n_points)
        n_local, n_points = n_points, distributed.total_points(n_points, self.device)
        if n_points < K:
            raise ValueError(f"X must have at least {K} sample(s) (one per component), got N={n_points} in all batches")
        chunk = self._default_chunk_size(n_features)

        def batches():
            for raw in source():
                yield self._working_data(self._validated_input(unwrap_batch(raw), "X batch", n_features=n_features))

        sample_data = em.Data(self.family, sample.points, shift, chunk)
        return em.StreamData(self.family, batches, shift, n_points, chunk, sample_data, n_local=n_local,
                             name="X (the batch source)")

    @staticmethod
    def _same_on_every_rank(log_weights: torch.Tensor, theta: Theta) -> tuple[torch.Tensor, Theta]:
        """Rank 0's initial parameters on every rank (no-op without torch.distributed)."""
        log_weights, *values = distributed.broadcast(log_weights, *theta.values())
        return log_weights, dict(zip(theta, values))

    def _default_chunk_size(self, n_features: int) -> int:
        """Rows per chunk: ``chunk_size`` or a memory budget for one restart. It does not depend
        on ``n_init``, so that restart 0 sums its chunks exactly as a fit with ``n_init=1``
        does (a batch of R restarts holds R such blocks)."""
        return self.chunk_size or em.default_chunk_size(self.n_models, self.n_components, self.family.n_statistics(n_features))

    def _sample_size(self) -> int:
        """Points the initialisation of a large or streamed dataset works on."""
        return max(self.stream_sample_size, 50 * self.n_components)

    def _initial_parameters(
        self, data: em.Data, chunk: int, user_theta: Theta, user_centres: torch.Tensor | None, restarts: range,
        failures: em.Failures | None = None,
    ) -> tuple[torch.Tensor, Theta]:
        """Working initial parameters (R, M, ...) of the given R restarts: an M-step from the
        initial responsibilities, then overridden by whatever the user supplied. Given
        ``failures``, a model whose initial M-step is invalid is recorded there and starts from
        the family's default parameters (finite; it does not run) instead of raising
        IllConditionedError."""
        R, M, K = len(restarts), self.n_models, self.n_components
        X, shift = data.X, data.shift
        if set(user_theta) == set(self._parameter_names):  # everything given: no clustering needed
            working = {name: self._to_restarts(value, R) for name, value in user_theta.items()}
            return working.pop("logits"), working
        streams = RestartStreams(self.seed, restarts, X.device)
        if user_centres is not None:
            user_centres = self._to_working(user_centres).expand(R, M, *user_centres.shape[-2:])
            user_centres = self.family.embedding(user_centres, shift)
        embedded = self.family.embedding(X, shift)
        resp = initial_responsibilities(self.init_params, embedded, M, K, streams, chunk, user_centres)
        every_model = torch.ones(R, M, dtype=torch.bool, device=X.device)

        def random_candidates(k: int) -> torch.Tensor:
            return self.family.features(random_points(X, M, k, streams), shift)[0]

        def reseeded_statistics(own: em.OwnReference | None = None) -> em.Statistics:
            stats = em.statistics_from_responsibilities(data, resp, own)
            return em.reseed_empty(self.family, stats, random_candidates, every_model, shift)

        log_weights, theta = em.m_step(self.family, reseeded_statistics(), shift, every_model, self._describe_model,
                                       "initialisation", refine=em.refiner(self.family, None, reseeded_statistics),
                                       failures=failures)
        if failures is not None and bool(failures.failed.any()):
            log_weights, theta = self._defaults_where(failures.failed, log_weights, theta, X.shape[-1])
        for name, value in user_theta.items():
            working = self._to_restarts(value, R)
            if name == "logits":
                log_weights = working
            else:
                theta[name] = working
        return log_weights, theta

    def _defaults_where(
        self, mask: torch.Tensor, log_weights: torch.Tensor, theta: Theta, n_features: int
    ) -> tuple[torch.Tensor, Theta]:
        """The working parameters with the family's default parameters (and uniform weights) for
        the models of ``mask`` (R, M)."""
        R, M, K = *mask.shape, self.n_components
        default = self.family.default_parameters((R, M), K, n_features, self._generator(), self.device, self.dtype)
        default_log_weights = torch.full_like(log_weights, -math.log(K))
        return em.where_parameters(mask, (default_log_weights, default), (log_weights, theta))

    @without_autocast
    @torch.no_grad()
    def partial_fit(self, X: Any) -> "Mixture":
        """One stepwise (online) EM update from a batch ``(n, D)`` or ``(*batch_shape, n, D)``.

        With per-point statistics ``s_hat`` of the batch, the running statistics become
        ``s <- (1 - rho_t) s + rho_t s_hat`` and the parameters their M-step, where
        ``rho_t = step_size`` when given (constant: tracks drifting streams) or else
        ``(t + learning_offset) ** -learning_decay``. The first call initialises the model from its
        batch when it has no parameters (and starts from the current parameters otherwise). The
        running state lives in buffers, so a ``state_dict`` taken mid-stream resumes it exactly.
        With ``averaging_start`` set, from that step on the parameters are the Polyak-Ruppert
        average of the stepwise-EM iterates (in unconstrained form); the iterate itself is the
        M-step of the running statistics. A rejected batch raises before anything changes.
        With ``on_error="isolate"`` a model whose update fails skips it (its parameters and
        running statistics stay as they were, zero statistics on a first call) and is marked in
        ``failed_``, as for :meth:`fit`.
        """
        K, M = self.n_components, self.n_models
        started = self.stream_steps is not None
        X = self._working_data(self._validated_input(X, "X", min_samples=1 if started else K))
        n_points, n_features = X.shape[-2], X.shape[-1]
        chunk = self.chunk_size or em.default_chunk_size(M, K, self.family.n_statistics(n_features))
        every_model = torch.ones(1, M, dtype=torch.bool, device=X.device)
        failures = em.Failures.none(1, M, X.device) if self._isolates_failures() else None
        if started:
            shift = self.stream_shift
            if self.averaging_start is None:
                log_weights, theta = self._working_parameters()
            else:  # the parameters hold the average: the iterate is the M-step of the running statistics
                running = em.Statistics(self._to_working(self.stream_counts), self._to_working(self.stream_sums),
                                        torch.zeros(1, M, dtype=X.dtype, device=X.device))
                log_weights, theta = em.m_step(self.family, running, shift, every_model, self._describe_model, "partial_fit",
                                               self._fixed_parameters(log_weights=None, theta=None), failures)
        else:
            shift = distributed.combined_reference(self.family.reference(X), n_points)  # fixed for the stream
            if self.is_initialized:
                log_weights, theta = self._working_parameters()
            else:
                user_theta = self._user_initial_parameters(n_features)
                user_centres = self.family.initial_centres(tuple(self.batch_shape), K, n_features, self.device, self.dtype)
                log_weights, theta = self._same_on_every_rank(*self._initial_parameters(
                    em.Data(self.family, X, shift, chunk), chunk, user_theta, user_centres, restarts=range(1), failures=failures
                ))
        fixed = self._fixed_parameters(log_weights, theta)
        log_weights, theta = self._with_fixed(log_weights, theta, fixed)
        data = em.Data(self.family, X, shift, chunk)
        n_points = distributed.total_points(n_points, X.device)  # the batch over all ranks
        eta, const = em.natural_with_weights(self.family, theta, log_weights, shift)
        # Components far from the stream's reference are evaluated directly; the running
        # statistics stay about the shared reference (they are averaged across batches).
        own = em.OwnReference.of(self.family, theta, log_weights, shift)
        own = None if own is None else dataclasses.replace(own, summarise=False)
        batch = data.statistics(eta, const, own)  # (1, M, ...)
        infinite = ~torch.isfinite(batch.log_likelihood)  # (1, M)
        if bool(infinite.any()):
            def reason(r: int, m: int) -> str:
                return (f"partial_fit: the batch log-likelihood of {self._describe_model(r, m)} is not finite; "
                        "use float64 or scale the data")

            if failures is None:
                raise em.IllConditionedError(reason(*(int(i) for i in infinite.nonzero()[0])))
            failures.add(infinite, reason)
        updating = every_model if failures is None else ~failures.failed  # (1, M)
        rho = self.schedule.rho(int(self.stream_steps) if started else 0)
        counts = stepwise(self._to_working(self.stream_counts) if started else None, batch.counts / n_points, rho)
        sums = stepwise(self._to_working(self.stream_sums) if started else None, batch.sums / n_points, rho)
        # The M-step sees the running statistics at the scale of one batch (re-seeding counts points).
        scaled = em.Statistics(counts * n_points, sums * n_points, batch.log_likelihood)
        scaled = em.reseed_empty(self.family, scaled, lambda k: data.worst_points(eta, const, k), updating)
        new_log_weights, new_theta = em.m_step(self.family, scaled, shift, updating, self._describe_model, "partial_fit",
                                               fixed, failures)
        new_theta = self._from_working(new_log_weights, new_theta)
        new_counts = (scaled.counts / n_points)[0].reshape(*self.batch_shape, K)
        new_sums = (scaled.sums / n_points)[0].reshape(*self.batch_shape, K, scaled.sums.shape[-1])
        if failures is not None and bool(failures.failed.any()):  # failed models skip the update
            skipped = failures.failed[0].reshape(self.batch_shape)
            held = {"logits": self.logits, **self.theta()} if self.is_initialized else self._from_working(log_weights, theta)
            new_theta = {name: em.where_models(skipped, held[name], value) for name, value in new_theta.items()}
            new_counts = em.where_models(skipped, self.stream_counts if started else 0.0, new_counts)
            new_sums = em.where_models(skipped, self.stream_sums if started else 0.0, new_sums)
        steps = 1 if not started else int(self.stream_steps) + 1
        averaged = 0 if self.averaging_start is None else steps - self.averaging_start  # iterates in the average
        if averaged > 1:  # Polyak-Ruppert: running mean of the unconstrained parameters
            new_theta = {name: old + (new_theta[name] - old) / averaged
                         for name, old in {"logits": self.logits, **self.theta()}.items()}
        self._assign_em_update(new_theta)
        self.n_features = n_features
        self.stream_counts = new_counts
        self.stream_sums = new_sums
        self.stream_steps = torch.tensor(steps, device=X.device)
        self.stream_shift = shift
        self._record_failures(failures, torch.zeros(M, dtype=torch.long, device=X.device))
        self.lower_bound_ = (batch.log_likelihood[0] / n_points).reshape(self.batch_shape).masked_fill(self.failed_, math.nan)
        return self

    # --- evaluation ---------------------------------------------------------------------------
    def log_joint(self, X: Any) -> torch.Tensor:
        """``log w_k + log p(x_n | component k)`` for every model: ``(*batch_shape, N, K)``.
        Differentiable with respect to the parameters and to X."""
        self._require_parameters()
        X = self._validated_input(X, "X")
        N = X.shape[-2]
        X = self._working_data(X)
        log_weights, theta = self._working_parameters()
        shift = self._evaluation_reference(log_weights, theta, shared=X.dim() == 2)
        eta, const = em.natural_with_weights(self.family, theta, log_weights, shift)
        T, h = self.family.features(X, shift)
        lp = em.component_log_prob(T, h, eta, const)  # (1, M, K, N)
        own = em.OwnReference.of(self.family, theta, log_weights, shift, evaluation=True)
        if own is not None:  # components the expansion about the reference would not resolve
            own.write_log_prob(own.groups(X, self.n_components, self.n_models), lp, scale=1.0)
        return lp.mT.reshape(*self.batch_shape, N, self.n_components)

    def _evaluation_reference(self, log_weights: torch.Tensor, theta: Theta, shared: bool) -> torch.Tensor | None:
        """The reference point of evaluation, a function of the parameters alone (so a row's
        result never depends on the other rows): the family's, from (1, M, ...) parameters; for
        data shared by every model, their average over the models, (1, D); else (M, 1, D)."""
        with torch.no_grad():  # the density does not depend on it
            reference = self.family.parameter_reference(theta, log_weights.exp())
        if reference is None:
            return None
        return reference.mean(1).reshape(1, -1) if shared else reference[0]

    def log_prob(self, X: Any) -> torch.Tensor:
        """Per-point log-likelihood ``(*batch_shape, N)``; differentiable and pure. The density of
        the parameters held, also for models in ``failed_`` (unlike :meth:`score_samples`)."""
        return em.normalise(self.log_joint(X), dim=-1)[1]

    def forward(self, X: Any) -> torch.Tensor:
        """Same as :meth:`log_prob`."""
        return self.log_prob(X)

    @torch.no_grad()
    def score_samples(self, X: Any) -> torch.Tensor:
        """Per-point log-likelihood ``(*batch_shape, N)`` (no graph); NaN for models in ``failed_``."""
        return self._reported(self.log_prob(X), "score_samples")

    @torch.no_grad()
    def score(self, X: Any) -> torch.Tensor:
        """Mean log-likelihood per point ``(*batch_shape)``; NaN for models in ``failed_``."""
        return self._reported(self.log_prob(X).mean(-1), "score")

    @torch.no_grad()
    def predict_proba(self, X: Any) -> torch.Tensor:
        """Posterior responsibilities ``(*batch_shape, N, K)``; NaN for models in ``failed_``."""
        return self._reported(em.normalise(self.log_joint(X), dim=-1)[0], "predict_proba")

    @torch.no_grad()
    def predict(self, X: Any) -> torch.Tensor:
        """Most probable component ``(*batch_shape, N)``; -1 for models in ``failed_``."""
        log_joint = self.log_joint(X)
        self._finite(log_joint.amax(-1), "predict")  # an all -inf or NaN row has no argmax
        return self._without_failed(log_joint.argmax(-1), -1)

    @torch.no_grad()
    def bic(self, X: Any) -> torch.Tensor:
        """Bayesian information criterion per model ``(*batch_shape)``; lower is better; NaN for
        models in ``failed_``."""
        log_prob = self.log_prob(X)
        n_points = log_prob.shape[-1]
        return self._reported(-2 * log_prob.sum(-1) + self.n_parameters() * math.log(n_points), "bic")

    @torch.no_grad()
    def aic(self, X: Any) -> torch.Tensor:
        """Akaike information criterion per model ``(*batch_shape)``; lower is better; NaN for
        models in ``failed_``."""
        return self._reported(-2 * self.log_prob(X).sum(-1) + 2 * self.n_parameters(), "aic")

    def _reported(self, result: torch.Tensor, method: str) -> torch.Tensor:
        """A reported value (*batch_shape, ...): checked finite, NaN for the models in ``failed_``."""
        return self._without_failed(self._finite(result, method), math.nan)

    def _finite(self, result: torch.Tensor, method: str) -> torch.Tensor:
        """``result`` (*batch_shape, ...), or a ValueError when it overflowed for a model that did
        not fail (e.g. points so far from every component that their log-density is below the
        dtype's range); models in ``failed_`` are NaN by design."""
        finite = torch.isfinite(result)
        if self.failed_ is not None and bool(self.failed_.any()):
            finite = em.where_models(self.failed_.to(result.device), True, finite)
        if not bool(finite.all()):
            raise ValueError(
                f"{method}: the log-likelihood of X is not finite in {self.dtype} (X is too far from the "
                "components, or too large); use dtype=torch.float64 or scale the data"
            )
        return result

    @torch.no_grad()
    def sample(self, n_samples: int = 1, seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``n_samples`` points per model: samples ``(*batch_shape, n, D)`` and their
        components ``(*batch_shape, n)``."""
        self._require_parameters()
        check_int(n_samples, "n_samples", minimum=1)
        if seed is not None:
            check_int(seed, "seed", minimum=0)
            generator = self._generator(seed)
        else:  # one stream per module: successive draws differ, the sequence follows self.seed
            if self._sample_generator is None or self._sample_generator.device != self.device:
                self._sample_generator = self._generator()
            generator = self._sample_generator
        M = self.n_models
        labels = torch.multinomial(self.weights.reshape(M, self.n_components), n_samples, replacement=True, generator=generator)
        theta = {name: self._to_working(value)[0] for name, value in self.theta().items()}
        samples = self.family.sample(theta, labels, generator)
        return samples.reshape(*self.batch_shape, n_samples, -1), labels.reshape(*self.batch_shape, n_samples)

    # --- internals ---------------------------------------------------------------------------
    def _without_failed(self, values: torch.Tensor, fill: float) -> torch.Tensor:
        """``values`` (*batch_shape, ...) with ``fill`` for the models whose last fit failed."""
        if self.failed_ is None or not bool(self.failed_.any()):
            return values
        return em.where_models(self.failed_.to(values.device), fill, values)

    def _require_parameters(self) -> torch.Tensor:
        if self.logits is None:
            raise NotFittedError(
                f"{type(self).__name__} has no parameters yet: call fit(X) first or pass n_features"
            )
        return self.logits

    def _working_data(self, X: torch.Tensor) -> torch.Tensor:
        """(N, D) stays shared; (*batch_shape, N, D) -> (M, N, D)."""
        return X if X.dim() == 2 else X.reshape(self.n_models, *X.shape[-2:])

    def _working_parameters(self) -> tuple[torch.Tensor, Theta]:
        """The current log-weights (1, M, K) and family parameters (1, M, ...): live views."""
        theta = {name: self._to_working(value) for name, value in self.theta().items()}
        return self._to_working(self.logits.log_softmax(-1)), theta

    def _from_working(self, log_weights: torch.Tensor, theta: Theta) -> Theta:
        """Working parameters with one restart (1, M, ...) -> module layout (*batch_shape, ...),
        the log-weights as ``"logits"``."""
        module = {name: value[0].reshape(*self.batch_shape, *value.shape[2:]) for name, value in theta.items()}
        module["logits"] = log_weights[0].reshape(*self.batch_shape, self.n_components)
        return module

    def _to_working(self, value: torch.Tensor) -> torch.Tensor:
        """(*batch_shape, *event) -> (1, M, *event): the working layout with one restart."""
        return value.reshape(1, self.n_models, *value.shape[len(self.batch_shape):])

    def _to_restarts(self, value: torch.Tensor, n_restarts: int) -> torch.Tensor:
        """(*batch_shape, *event) -> (R, M, *event), the same for every restart."""
        working = self._to_working(value)
        return working.expand(n_restarts, *working.shape[1:])

    def _validated_input(self, X: Any, name: str, min_samples: int = 1, n_features: int | None = None) -> torch.Tensor:
        """X as a checked tensor in the model's dtype. A module that follows its data's dtype and
        has no parameters adopts X's instead (in a stream: the first batch's, the one given
        without ``n_features``)."""
        adopts = self._dtype_follows_data and not self.is_initialized and n_features is None
        dtype = data_dtype(X) if adopts else self.dtype
        X = as_float_tensor(X, name, device=self.device, dtype=dtype, allow_bool=self.family.accepts_bool)
        n_features = n_features if n_features is not None else self.n_features
        check_data(X, name, n_features=n_features, batch_shape=self.batch_shape, min_samples=min_samples)
        self.family.check_domain(X, name)
        if adopts and dtype != self.dtype:
            self._anchor = self._anchor.to(dtype)
        return X

    def _generator(self, seed: int | None = None) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(resolve_seed(seed if seed is not None else self.seed))

    def _user_initial_parameters(self, n_features: int) -> Theta:
        """Validated ``weights_init`` and the family's initial parameters, with batch dims."""
        batch = tuple(self.batch_shape)
        theta = self.family.user_initial_parameters(batch, self.n_components, n_features, self.device, self.dtype)
        if self.weights_init is not None:
            weights = as_float_tensor(self.weights_init, "weights_init", device=self.device, dtype=self.dtype)
            check_shape(weights, "weights_init", (self.n_components,), self.batch_shape)
            check_finite(weights, "weights_init")
            tolerance = max(1e-6, 1000 * torch.finfo(self.dtype).eps)
            if bool((weights < 0).any()) or bool(((weights.sum(-1) - 1).abs() > tolerance).any()):
                raise ValueError(
                    f"weights_init must be non-negative and sum to 1, got sums {weights.sum(-1).flatten()[:5].tolist()}"
                )
            tiny = torch.finfo(self.dtype).tiny
            theta["logits"] = weights.clamp_min(tiny).log().expand(*batch, self.n_components)
        return theta

    def _fixed_parameters(self, log_weights: torch.Tensor | None, theta: Theta | None) -> Theta:
        """Working values (R, M, ...) of the parameters EM holds fixed (``"logits"`` as
        log-weights): the module's current values, or the initial ``log_weights``/``theta`` of a
        module that has no parameters yet."""
        names = [name for name in self._parameter_names if name not in self._em_parameters]
        if not names:
            return {}
        if not self.is_initialized:
            initial = {"logits": log_weights, **theta}
            return {name: initial[name] for name in names}
        n_restarts = 1 if log_weights is None else log_weights.shape[0]
        current = {"logits": self.logits.log_softmax(-1), **self.theta()}
        return {name: self._to_restarts(current[name].detach(), n_restarts) for name in names}

    @staticmethod
    def _with_fixed(log_weights: torch.Tensor, theta: Theta, fixed: Theta) -> tuple[torch.Tensor, Theta]:
        """The working parameters with the fixed ones put in."""
        theta = {name: fixed.get(name, value) for name, value in theta.items()}
        return fixed.get("logits", log_weights), theta

    def _assign_em_update(self, theta: Theta) -> None:
        """Write what EM computed: every parameter of a new module, else those EM owns (a held
        ``logits`` keeps its raw values, not just its softmax)."""
        if self.is_initialized:
            theta = {name: value for name, value in theta.items() if name in self._em_parameters}
        self._assign(theta, create=not self.is_initialized)

    def _assign(self, theta: Theta, *, create: bool) -> None:
        """Write parameters in place (EM update) or create them (first fit / construction)."""
        with torch.no_grad():
            for name, value in theta.items():
                if create:
                    setattr(self, name, nn.Parameter(value.detach().clone()))
                else:
                    getattr(self, name).copy_(value)

    def _create_parameters_before_load(self, state_dict, prefix, local_metadata, strict, *args) -> None:
        """Check the whole incoming state against this module's configuration, then make room
        for it: a module built without n_features creates its parameters, the online-EM buffers
        take the saved shapes (a strict load of a state without a stream ends the stream).
        Raises before anything is written (torch would copy entry by entry, then raise)."""
        state = own_entries(state_dict, prefix)
        n_features = self._check_state(state, prefix, self._strict_load)
        for name in STREAM_BUFFERS:
            saved, current = state.get(name), getattr(self, name)
            if saved is None:
                if self._strict_load:
                    setattr(self, name, None)
            elif current is None or current.shape != saved.shape:
                dtype = saved.dtype if not saved.is_floating_point() else self.dtype
                setattr(self, name, torch.empty(saved.shape, dtype=dtype, device=self.device))
        if self.logits is None and all(name in state for name in self._parameter_names):
            for name in self._parameter_names:
                setattr(self, name, nn.Parameter(torch.empty(state[name].shape, device=self.device, dtype=self.dtype)))
            self.n_features = n_features

    def _check_state(self, state: dict[str, Any], prefix: str, strict: bool) -> int | None:
        """Raise ValueError/TypeError unless ``state`` (this module's entries) loads whole;
        returns the number of features of the state (None if it has no parameters)."""
        owner = f"{type(self).__name__}({self.extra_repr()})"
        n_features = self.n_features
        saved = {name: state[name] for name in self._parameter_names[1:] if isinstance(state.get(name), torch.Tensor)}
        if n_features is None and saved:
            try:
                n_features = int(self.family.n_features_of(saved))
            except (KeyError, IndexError, StopIteration, AttributeError) as error:
                shapes = {prefix + name: tuple(value.shape) for name, value in saved.items()}
                raise ValueError(f"state_dict: the parameters {shapes} give no number of features for {owner} ({error!r})") from None
        stream = ("stream_counts", "stream_sums", "stream_steps")
        if n_features is None and any(name in state for name in STREAM_BUFFERS):
            raise ValueError(f"state_dict has online-EM state {[prefix + n for n in stream]} but no parameters for {owner}")
        check_state(state, prefix, owner, self._state_shapes(n_features), strict=strict,
                    groups=[(self._parameter_names, self.is_initialized), (stream, False)], counters=["stream_steps"])
        return n_features

    def _state_shapes(self, n_features: int | None) -> dict[str, list[tuple[int, ...]] | None]:
        """The allowed shape(s) of every entry of a state with ``n_features`` (None: unknown)."""
        names = (*self._parameter_names, *STREAM_BUFFERS)
        if n_features is None:
            return dict.fromkeys(names)
        batch, K, D = tuple(self.batch_shape), self.n_components, n_features
        events = {"logits": (K,), **self.family.event_shapes(K, D),
                  "stream_counts": (K,), "stream_sums": (K, self.family.n_statistics(D))}
        shapes = {name: [(*batch, *event)] for name, event in events.items()}
        shapes["stream_steps"] = [()]
        shapes["stream_shift"] = [(1, D), (self.n_models, 1, D)]  # reference of shared or per-model data
        return shapes

    def _adopt_saved_dtype(self, state_dict, prefix, *args) -> None:
        """A module whose dtype follows its data takes that of a state_dict it loads (runs after
        :meth:`_create_parameters_before_load`; only when every saved parameter fits, so that a
        rejected load changes nothing)."""
        saved = {name: state_dict.get(prefix + name) for name in self._parameter_names}
        if not self._dtype_follows_data or any(value is None for value in saved.values()):
            return
        current = {name: getattr(self, name) for name in self._parameter_names}
        fits = all(value is not None and value.shape == saved[name].shape for name, value in current.items())
        if fits and saved["logits"].is_floating_point() and saved["logits"].dtype != self.dtype:
            self.to(saved["logits"].dtype)  # in place: the Parameter objects stay the same

    def _describe_model(self, restart: int, model: int) -> str:
        where = f"model {tuple(int(i) for i in np.unravel_index(model, tuple(self.batch_shape)))}" if self.batch_shape else "the model"
        return where + (f" (restart {restart})" if self.n_init > 1 else "")
