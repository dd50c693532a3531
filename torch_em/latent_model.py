"""``LatentModel``: a batch of latent-variable models (latent structure x emission family) as an ``nn.Module``.

What every model of the package shares, whatever its latent structure (:mod:`torch_em.latent`):
parameters stored unconstrained as ``nn.Parameter`` s shaped ``(*batch_shape, *event_shape)``
(the latent structure's as logits over their last axis, e.g. a mixture's ``logits (*b, K)``, an
HMM's ``start_logits (*b, K)`` and ``transition_logits (*b, K, K)``; then the family's), restarts
as a batch dimension, EM through :func:`torch_em.em.run_em` with per-model convergence and
isolation of failing models, stepwise online EM, ``state_dict`` checks and dtype handling.
Subclasses (:class:`torch_em.Mixture`, :class:`torch_em.HMM`) turn their users' data into the
engine's (:class:`torch_em.data.Data` and its kinds) and give their evaluation methods.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import numbers
import warnings
from typing import Any, Callable, Sequence, TypeVar, cast

import torch
from torch.nn.parameter import UninitializedParameter, is_lazy
from tqdm import tqdm

from . import acceleration, annealing, distributed, em, priors
from ._precision import FollowsDataDtype
from ._random import resolve_seed, restart_groups
from ._state import CheckedLoad, check_state, own_entries
from ._tracing import is_traced
from ._validation import (
    as_float_tensor, check_choice, check_common_options, check_data, check_device, check_dtype, check_em_parameters,
    check_finite, check_int, check_positive, check_shape, data_dtype,
)
from .data import CHUNK_ELEMENTS
from .families.base import ComponentFamily, IllConditionedError, NotFittedError, Theta
from .initialization import METHODS, SharedClustering, initial_parameters
from .latent import LatentStructure
from .layout import Layout
from .missing import (
    MISSING, MISSING_BUDGET, MissingRows, check_missing_values, mean_imputed, pattern_share, with_observed_values,
)
from .own_reference import traced_direct_log_prob
from .priors import PriorSpec
from .serialization import Saveable
from .streaming import StepSchedule

logger = logging.getLogger(__name__)

#: Buffers of online EM's running state every model has (the latent structure adds
#: ``stream_<statistic>`` for each of its own statistics).
STREAM_BUFFERS = ("stream_counts", "stream_sums", "stream_steps", "stream_shift", "stream_weight")
#: Choices of ``on_error``: raise IllConditionedError, or isolate the failing models of a batch.
ON_ERROR = ("raise", "isolate")
#: Choices of ``accelerate`` (None: plain EM): SQUAREM extrapolation (:mod:`torch_em.acceleration`).
ACCELERATIONS = ("squarem",)
#: A FitFailedWarning quotes the reasons of at most this many failed models.
QUOTED_FAILURES = 3

ModelT = TypeVar("ModelT", bound="LatentModel")  # the model class, which _fit etc. return


class LatentModel(Saveable, CheckedLoad, FollowsDataDtype):
    """A batch of models with hidden states of ``latent`` and emissions of ``n_components``
    components of ``family``; the options are :class:`torch_em.Mixture`'s.

    ``latent_names`` maps the module's names of the latent structure's parameters (logits) to
    the structure's working names (their normalised log-probabilities), e.g. ``{"logits":
    "log_weights"}``. Subclasses call :meth:`_create_initial_parameters` at the end of their
    constructor and give :meth:`_user_latent_initial`.
    """

    #: Larger datasets (and batch sources) are initialised (k-means++ etc.) on a uniform sample of
    #: this many points (at least 50 per component), which bounds the memory of initialisation.
    stream_sample_size: int = 20_000
    _dtype_buffer = "_anchor"
    #: ``softening`` of the initial responsibilities (:func:`torch_em.initialization.initial_parameters`).
    _initial_softening: float = 0.0
    #: The initial clustering shared with other fits of the same data (:func:`torch_em.select`), or None.
    _shared_clustering: SharedClustering | None = None
    #: Whether the model marginalises missing entries (NaN) with ``missing="marginalize"``.
    _marginalises_missing: bool = False
    # buffers registered in __init__ (None until set)
    _anchor: torch.Tensor
    stream_counts: torch.Tensor | None
    stream_sums: torch.Tensor | None
    stream_steps: torch.Tensor | None
    stream_shift: torch.Tensor | None
    stream_weight: torch.Tensor | None

    def __init__(
        self,
        latent: LatentStructure,
        latent_names: dict[str, str],
        family: ComponentFamily,
        n_components: int,
        n_features: int | None = None,
        *,
        batch_shape: Sequence[int] = (),
        tol: float = 1e-3,
        max_iter: int = 100,
        n_init: int = 1,
        init_params: str = "k-means++",
        seed: int | None = None,
        chunk_size: int | None = None,
        learning_decay: float = 0.7,
        learning_offset: float = 10.0,
        step_size: float | None = None,
        averaging_start: int | None = None,
        prior_count: float = 0.0,
        prior: PriorSpec = None,
        accelerate: str | None = None,
        annealing: float | None = None,
        em_parameters: Sequence[str] | None = None,
        warm_start: bool = False,
        on_error: str | None = None,
        missing: str = "reject",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_int(n_components, "n_components", minimum=1)
        check_choice(missing, "missing", MISSING if self._marginalises_missing else MISSING[:1])
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
        check_positive(prior_count, "prior_count", allow_zero=True)
        self.prior_count = float(prior_count)
        # The user's names of the latent parameters' prior groups: "weights" for "log_weights".
        self._prior_groups = {working.removeprefix("log_"): working for working in latent_names.values()}
        priors.check_prior_spec(priors.as_groups(prior), [*self._prior_groups, priors.COMPONENTS])
        self.prior = prior
        self._stream_prior: priors.ModelPrior | None = None
        if accelerate is not None:
            check_choice(accelerate, "accelerate", ACCELERATIONS)
        self.accelerate = accelerate
        dtype, device = check_dtype(dtype), check_device(device)
        self._dtype_follows_data = dtype is None
        dtype = dtype if dtype is not None else data_dtype(None)

        self.latent = latent
        self.annealing = annealing
        self._latent_names = dict(latent_names)
        self.family = family
        self.n_components = int(n_components)
        self.n_features = None if n_features is None else int(n_features)
        self.batch_shape = batch_shape
        self.tol = float(tol)
        self.max_iter = int(max_iter)
        self.n_init = int(n_init)
        self.init_params = init_params
        self.seed = seed
        self.chunk_size = chunk_size
        # Follows .to()/.double() so that parameters created later land on the right device/dtype.
        self.register_buffer("_anchor", torch.empty(0, device=device, dtype=dtype), persistent=False)
        self._family_names = tuple(family.event_shapes(1, 1))
        self._parameter_names = (*self._latent_names, *self._family_names)
        self.em_parameters = self._parameter_names if em_parameters is None else em_parameters
        if not isinstance(warm_start, bool):
            raise ValueError(f"warm_start must be True or False, got {warm_start!r}")
        self.warm_start = warm_start
        self.on_error = on_error
        self.missing = missing
        # torch's lazy-module convention (as nn.LazyLinear): until n_features is known every parameter
        # is an UninitializedParameter, already in parameters() (an optimizer built now trains it);
        # the first fit, partial_fit or load_state_dict materialises it in place (_assign).
        for name in self._parameter_names:
            self.register_parameter(name, _uninitialized_parameter(device, dtype))
        # Running state of online EM (partial_fit): statistics per point, step count, and the stream's
        # reference point (its state_dict key keeps the name stream_shift).
        self._stream_buffers = (*STREAM_BUFFERS, *(f"stream_{name}" for name in latent.statistic_names))
        for name in self._stream_buffers:
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

    def _create_initial_parameters(self) -> None:
        """Parameters at construction when ``n_features`` is known: the family's and the latent
        structure's defaults, overridden by the user's initial values."""
        if self.n_features is None:
            return
        batch = tuple(self.batch_shape)
        theta = self.family.default_parameters(batch, self.n_components, self.n_features, self._generator(),
                                               self.device, self.dtype)
        latent = self.latent.default_parameters(batch, self.n_components, self._anchor)
        theta.update({name: latent[working] for name, working in self._latent_names.items()})
        theta.update(self._user_initial_parameters(self.n_features))
        self._assign(theta, create=True)

    def _config(self) -> dict[str, Any]:
        """The constructor's keyword arguments every model shares (without ``device`` and
        ``dtype``), as :mod:`torch_em.serialization` saves them; subclasses add their own."""
        return {
            "n_features": self.n_features, "batch_shape": tuple(self.batch_shape), "tol": self.tol,
            "max_iter": self.max_iter, "n_init": self.n_init, "init_params": self.init_params, "seed": self.seed,
            "chunk_size": self.chunk_size, "learning_decay": self.schedule.learning_decay,
            "learning_offset": self.schedule.learning_offset, "step_size": self.schedule.step_size,
            "averaging_start": self.averaging_start, "prior_count": self.prior_count, "prior": self.prior,
            "accelerate": self.accelerate, "annealing": self.annealing,
            "em_parameters": self.em_parameters, "warm_start": self.warm_start, "on_error": self.on_error,
        }

    # --- basic properties -----------------------------------------------------------------
    @property
    def em_parameters(self) -> tuple[str, ...]:
        """Names of the parameters EM updates; the others keep their values in ``fit`` and
        ``partial_fit`` (e.g. owned by an optimizer). Assignable at any time."""
        return self._em_parameters

    @em_parameters.setter
    def em_parameters(self, names: Sequence[str]) -> None:
        self._em_parameters = check_em_parameters(names, self._parameter_names, self.family, tuple(self._latent_names))

    @property
    def annealing(self) -> float | None:
        """Deterministic annealing EM (:mod:`torch_em.annealing`): the initial inverse temperature
        ``beta_0`` in (0, 1) of ``fit``'s tempered E-steps, or None (plain EM). Assignable at any
        time; a rejected value (ValueError) leaves the current one."""
        return self._annealing

    @annealing.setter
    def annealing(self, value: float | None) -> None:
        if value is not None:
            is_number = isinstance(value, numbers.Real) and not isinstance(value, bool)
            if not is_number or not 0.0 < value < 1.0:
                raise ValueError(f"annealing must be None or an initial inverse temperature in (0, 1), got {value!r}")
            if not self.latent.tempers:
                raise ValueError(f"annealing must be None for {type(self).__name__}: deterministic annealing is for "
                                 f"mixtures (its tempered E-step has no form for {type(self.latent).__name__}), got "
                                 f"{value!r}")
            value = float(value)
        self._annealing = value

    @property
    def device(self) -> torch.device:
        return self._anchor.device

    @property
    def dtype(self) -> torch.dtype:
        return self._anchor.dtype

    @property
    def is_initialized(self) -> bool:
        """Whether the parameters exist (False while they are ``UninitializedParameter`` s)."""
        # (isinstance, not torch's is_lazy: torch.compile traces the former, not the latter)
        return not isinstance(getattr(self, self._parameter_names[0]), UninitializedParameter)

    @property
    def n_models(self) -> int:
        return math.prod(self.batch_shape)

    def theta(self) -> Theta:
        """The family's parameters (the live ``nn.Parameter`` s) by name."""
        self._require_parameters()
        return {name: getattr(self, name) for name in self._family_names}

    def n_parameters(self) -> int:
        """Free parameters of one model (for BIC/AIC)."""
        self._require_parameters()
        n_features = cast(int, self.n_features)  # set: the module has parameters
        return self.family.n_free_parameters(self.n_components, n_features) + self.latent.n_free_parameters(self.n_components)

    def __getattr__(self, name: str) -> Any:
        # A property that raised AttributeError (NotFittedError before a fit) lands here: raise
        # its own error rather than nn.Module's "has no attribute".
        attribute = getattr(type(self), name, None)
        if isinstance(attribute, property):
            return attribute.__get__(self, type(self))
        return super().__getattr__(name)

    # --- fitting ----------------------------------------------------------------------------
    def _initialize(self: ModelT, data: em.Data | em.StreamData) -> ModelT:
        """The initial parameters of :meth:`fit` (``init_params``, the user's initial values and
        the first M-step), without EM: ``n_iter_`` 0, ``lower_bound_`` -inf, not converged
        (what scikit-learn's ``max_iter=0`` returns). Every restart is drawn; restart 0 is kept."""
        self._fit(data, False, 0)
        # (both set by _fit)
        self.lower_bound_ = torch.full_like(cast(torch.Tensor, self.lower_bound_), -math.inf).masked_fill(
            cast(torch.Tensor, self.failed_), math.nan)
        return self

    def _fit(self: ModelT, data: em.Data | em.StreamData, verbose: bool, max_iter: int) -> ModelT:
        """``fit`` of prepared ``data`` with at most ``max_iter`` EM iterations (0: the
        initialisation alone)."""
        M, layout = self.n_models, self._layout
        n_features = data.sample.X.shape[-1]
        continued = self.warm_start and self.is_initialized
        groups = [range(1)] if continued else restart_groups(self.n_init)
        prior = self._resolved_prior(data.sample, n_features)
        with tqdm(total=max_iter * len(groups), desc="EM", disable=not verbose, leave=False) as progress, \
                self._naming_failures():
            result = em.cat_restarts([
                self._run_restarts(data, n_features, restarts, continued, progress if verbose else None, max_iter, prior)
                for restarts in groups
            ])
        best = layout.best_restart(result.lower_bound)  # (M,) a failed restart (nan) loses
        fitted = self._module_parameters(result.params, best)
        self._assign_em_update(fitted)
        self.n_features = n_features
        self.lower_bound_ = layout.pick(result.lower_bound, best)
        self.n_iter_ = layout.pick(result.n_iter, best)
        self.converged_ = layout.pick(result.converged, best)
        self.lower_bound_history_ = layout.pick(result.history, best)
        self._clear_stream()  # a later partial_fit starts a new stream from these parameters
        self._record_failures(result.failures, best)
        failed = cast(torch.Tensor, self.failed_)  # set by _record_failures
        not_converged = ~self.converged_ & ~failed
        if logger.isEnabledFor(logging.INFO) and max_iter > 0:
            logger.info("%s.fit: %d model(s) x %d restart group(s): %d converged, %d failed, %d-%d iterations, "
                        "mean lower bound %.6g", type(self).__name__, M, len(groups), int(self.converged_.sum()),
                        int(failed.sum()), int(self.n_iter_.min()), int(self.n_iter_.max()),
                        float(self.lower_bound_[~failed].double().mean()) if bool((~failed).any())
                        else math.nan)
        if bool(not_converged.any()) and max_iter > 0:
            warnings.warn(
                f"{int(not_converged.sum())} of {M} model(s) did not converge in max_iter={max_iter} "
                "iterations; increase max_iter or tol, or check the data",
                em.ConvergenceWarning,
                stacklevel=3,  # past fit
            )
        return self

    def _run_restarts(
        self, data: em.Data | em.StreamData, n_features: int, restarts: range, continued: bool, progress,
        max_iter: int, prior: priors.ModelPrior | None = None,
    ) -> em.EMResult:
        """EM for the working batch (len(restarts), M) of the given restarts, or (1, M) from the
        current parameters when ``continued`` (a warm start: its convergence check goes on from
        the last lower bound, as scikit-learn's does). With ``annealing`` (and not ``continued``)
        the annealing stages come first (:func:`torch_em.annealing.anneal`)."""
        previous = None
        failures = em.Failures.none(len(restarts), self.n_models, self.device) if self._isolates_failures() else None
        if continued:
            params = self._working_parameters()
            if self.lower_bound_ is not None and self.stream_steps is None:  # mid-stream it is a batch's
                previous = self._layout.working(self.lower_bound_)
        else:
            # The initialisation's M-step sees the sample: the prior set against its share of the points.
            sample_prior = None if prior is None else prior.scaled(_share(data.sample.total_weight, data.total_weight))
            params = self._initial_parameters(data.sample, data.chunk_size, n_features, restarts, failures, sample_prior)
            params = self._same_on_every_rank(params)
        fixed = self._fixed_parameters(params)

        def run(beta: float, params: em.Params, max_iter: int, stage: str = "EM iteration",
                start: torch.Tensor | None = None) -> em.EMResult:
            em_map = self._em_map(data, fixed, prior, beta)
            if self.accelerate == "squarem":  # max_iter and n_iter_ count evaluations of the EM map
                cycles = -(-max_iter // acceleration.EVALUATIONS_PER_CYCLE)
                result = em.run_em(acceleration.SquaremMap(em_map), params, max_iter=cycles, tol=self.tol,
                                   progress=progress, previous_lower_bound=start, failures=failures, stage=stage)
                return dataclasses.replace(result, n_iter=result.n_iter * acceleration.EVALUATIONS_PER_CYCLE)
            return em.run_em(em_map, params, max_iter=max_iter, tol=self.tol, progress=progress,
                             previous_lower_bound=start, failures=failures, stage=stage)

        params = params.with_fixed(fixed)
        if self.annealing is None or continued or max_iter == 0:  # a warm start goes on at beta = 1
            return run(1.0, params, max_iter, start=previous)
        return annealing.anneal(run, params, self.annealing, max_iter)

    def _em_map(self, data: em.Data | em.StreamData, fixed: em.Params | None,
                prior: priors.ModelPrior | None = None, beta: float = 1.0) -> em.EMMap:
        """The EM map of ``data``; ``beta``: the inverse temperature of its E-step (annealing)."""
        return em.EMMap(self.latent, self.family, data, fixed=fixed, pseudo_count=self.prior_count, prior=prior,
                        components=self._working_components(), beta=beta)

    def _working_components(self) -> torch.Tensor | None:
        """(1, M, K) bool: the components each model has (a mixture whose models are padded to
        K components, :func:`torch_em.select`), or None: all."""
        return None

    def _resolved_prior(self, sample: em.Data, n_features: int) -> priors.ModelPrior | None:
        """``prior`` as tensors in the working layout, its data-dependent defaults taken from
        ``sample`` (the data initialisation works on; summed over the ranks of torch.distributed).
        Raises ValueError for a prior that does not fit the model (before anything changes)."""
        if self.prior is None:
            return None
        latent = self.latent.default_parameters((1,), self.n_components, self._anchor)
        context = priors.Context(self.family, self.n_components, n_features, self._layout, self._anchor,
                                 priors.DataSummary(sample.X, sample.weights))
        return priors.resolve(self.prior, self._prior_groups, ("transmat",), context,
                              {name: tuple(value.shape[1:]) for name, value in latent.items()})

    @contextlib.contextmanager
    def _naming_failures(self):
        """Turn the engine's failure of model (r, m) into an IllConditionedError naming it."""
        try:
            yield
        except em.ModelFailed as error:
            raise IllConditionedError(error.failure.message(self._describe_model(error.restart, error.model))) from None

    def _clear_stream(self) -> None:
        """Forget the running statistics of online EM (``partial_fit``)."""
        for name in self._stream_buffers:
            setattr(self, name, None)
        self._stream_prior = None

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
                failure = failures.reasons[int(best[m]), m]
                reasons[self._layout.model_index(m)] = failure.message(self._describe_model(int(best[m]), m))
        self.failed_ = failed.reshape(self.batch_shape)
        self.failure_reasons_ = reasons
        if reasons:
            quoted = "; ".join(list(reasons.values())[:QUOTED_FAILURES]) + ("; ..." if len(reasons) > QUOTED_FAILURES else "")
            warnings.warn(
                f"{len(reasons)} of {M} model(s) failed and keep their last valid parameters (failed_, failure_reasons_; "
                f"their lower_bound_, score, score_samples, bic, aic and predict_proba are NaN, predict gives -1): {quoted}",
                em.FitFailedWarning,
                stacklevel=3,  # past fit (or partial_fit) and its no_grad wrapper
            )

    @staticmethod
    def _same_on_every_rank(params: em.Params) -> em.Params:
        """Rank 0's initial parameters on every rank (no-op without torch.distributed)."""
        names = [*params.latent, *params.emission]
        values = dict(zip(names, distributed.broadcast(*params.latent.values(), *params.emission.values())))
        return em.Params({n: values[n] for n in params.latent}, {n: values[n] for n in params.emission})

    def _default_chunk_size(self, n_features: int, pattern_share: float = 0.0) -> int:
        """Rows per chunk: ``chunk_size`` or a memory budget for one restart. It does not depend
        on ``n_init``, so that restart 0 sums its chunks exactly as a fit with ``n_init=1``
        does (a batch of R restarts holds R such blocks). Rows with missing entries in
        ``pattern_share`` distinct patterns per row hold a few offsets per row and component
        and three matrices per pattern and component (:mod:`torch_em.missing`), in a budget
        MISSING_BUDGET times as large."""
        if self.chunk_size:
            return self.chunk_size
        n_stats = self.family.n_statistics(n_features)
        if not pattern_share:
            return em.default_chunk_size(self.n_models, self.n_components, n_stats)
        per_row = self.n_models * self.n_components * (4 * n_features + 3 * n_features ** 2 * pattern_share)
        return max(64, MISSING_BUDGET * CHUNK_ELEMENTS // int(per_row + n_stats))

    def _sample_size(self) -> int:
        """Points the initialisation of a large or streamed dataset works on."""
        return max(self.stream_sample_size, 50 * self.n_components)

    def _initial_parameters(
        self, data: em.Data, chunk: int, n_features: int, restarts: range, failures: em.Failures | None = None,
        prior: priors.ModelPrior | None = None,
    ) -> em.Params:
        """Working initial parameters (R, M, ...) of the given restarts, with the user's initial
        values (:func:`torch_em.initialization.initial_parameters`)."""
        K = self.n_components
        return initial_parameters(
            self.latent, self.family, data, method=self.init_params, n_components=K, layout=self._layout,
            restarts=restarts, seed=self.seed, chunk_size=chunk,
            user_parameters=self._working_latent(self._user_initial_parameters(n_features)),
            user_centres=self.family.initial_centres(tuple(self.batch_shape), K, n_features, self.device, self.dtype),
            failures=failures, generator=self._generator, softening=self._initial_softening, prior=prior,
            components=self._working_components(), responsibilities=self._given_responsibilities(),
            shared=self._shared_clustering,
        )

    def _given_responsibilities(self) -> Callable[[int, int], torch.Tensor] | None:
        """Initial responsibilities that replace ``init_params``' clustering, ``resp(start, stop)
        -> (1, M, K, stop - start)``, or None (the default)."""
        return None

    def _partial_fit(self: ModelT, X: torch.Tensor, make_data: Callable[[torch.Tensor | None, int], em.Data]) -> ModelT:
        """The stepwise EM update of ``partial_fit`` from a validated batch ``X`` (working layout)
        whose engine data ``make_data(reference, chunk_size)`` builds (with its weights)."""
        M, layout = self.n_models, self._layout
        started = self.stream_steps is not None
        steps_so_far = 0 if self.stream_steps is None else int(self.stream_steps)
        n_features = X.shape[-1]
        chunk = self._default_chunk_size(n_features, pattern_share(X))
        every_model = torch.ones(1, M, dtype=torch.bool, device=X.device)
        failures = em.Failures.none(1, M, X.device) if self._isolates_failures() else None
        running = self._running_statistics() if started else None
        # The stream's reference point is fixed by its first batch (the mean of its observed entries).
        complete = mean_imputed(X) if torch.isnan(X).any() else X
        reference = self.stream_shift if started else distributed.combined_reference(self.family.reference(complete), X.shape[-2])
        data = make_data(reference, chunk)
        if complete is not X:  # initialisation and re-seeding work on the batch with missing entries imputed
            data.sample = em.Data(self.family, complete, reference, self._default_chunk_size(n_features),
                                  weights=data.weights)
        data.total_weight = distributed.total_weight(data.total_weight, X.device)  # the batch over all ranks
        # The prior is set against the stream's points so far (its first batch resolves it).
        prior = self._stream_prior if started and self._stream_prior is not None else self._resolved_prior(data.sample, n_features)
        seen = layout.working(self.stream_weight)[0] if started and self.stream_weight is not None else None
        batch_weight = torch.as_tensor(data.total_weight, dtype=X.dtype, device=X.device).expand(M)
        if seen is None:  # (a stream begun before its weight was recorded: as many points per batch as this one)
            seen = batch_weight * steps_so_far
        with self._naming_failures():
            if started:
                params = self._working_parameters()
                if self.averaging_start is not None:  # the parameters hold the average: the iterate is the running M-step
                    params, invalid = em.m_step(self.latent, self.family, cast(em.Statistics, running), reference, every_model,
                                                self._fixed_parameters(None),
                                                prior=None if prior is None else prior.scaled(1 / seen))
                    em.record_failures(failures, invalid.any(-1),
                                       em.invalid_component_reason(self.family, "partial_fit", invalid))
            else:
                params = self._working_parameters() if self.is_initialized else self._same_on_every_rank(
                    self._initial_parameters(data.sample, chunk, n_features, range(1), failures, prior))
            fixed = self._fixed_parameters(params)
            params = params.with_fixed(fixed)
            updating = every_model if failures is None else ~failures.failed
            step_prior = None if prior is None else prior.scaled(batch_weight / (seen + batch_weight))
            step = em.online_step(self._em_map(data, fixed, step_prior), params, running,
                                  self.schedule.rho(steps_so_far), updating)
            infinite = ~torch.isfinite(step.batch_log_likelihood) & updating  # (1, M)
            em.record_failures(failures, infinite, lambda r, m: em.Failure(
                "partial_fit", None, "use float64 or scale the data", likelihood="batch log-likelihood"))
            invalid = step.invalid & ~infinite.unsqueeze(-1)
            em.record_failures(failures, invalid.any(-1), em.invalid_component_reason(self.family, "partial_fit", invalid))
        new_theta = self._module_parameters(step.params)
        new_running = {"stream_counts": step.running.counts, "stream_sums": step.running.sums,
                       **{f"stream_{name}": value for name, value in step.running.latent.items()}}
        new_running = {name: layout.module(value[0]) for name, value in new_running.items()}
        if failures is not None and bool(failures.failed.any()):  # failed models skip the update
            skipped = failures.failed[0].reshape(self.batch_shape)
            held = self._module_values() if self.is_initialized else self._module_parameters(params)
            new_theta = {name: em.where_models(skipped, held[name], value) for name, value in new_theta.items()}
            new_running = {name: em.where_models(skipped, getattr(self, name) if started else 0.0, value)
                           for name, value in new_running.items()}
        steps = steps_so_far + 1
        averaged = 0 if self.averaging_start is None else steps - self.averaging_start  # iterates in the average
        if averaged > 1:  # Polyak-Ruppert: running mean of the unconstrained parameters
            new_theta = {name: old + (new_theta[name] - old) / averaged
                         for name, old in self._module_values().items()}
        self._assign_em_update(new_theta)
        self.n_features = n_features
        for name, value in new_running.items():
            setattr(self, name, value)
        self.stream_steps = torch.tensor(steps, device=X.device)
        self.stream_shift = reference
        self.stream_weight = layout.module(seen + batch_weight)
        self._stream_prior = prior
        self._record_failures(failures, torch.zeros(M, dtype=torch.long, device=X.device))
        logger.debug("%s.partial_fit: step %d, step size %.4g", type(self).__name__, steps,
                     self.schedule.rho(steps - 1))
        mean = step.batch_log_likelihood[0] / data.total_weight
        self.lower_bound_ = layout.module(mean).masked_fill(cast(torch.Tensor, self.failed_), math.nan)  # (set by _record_failures)
        return self

    def _running_statistics(self) -> em.Statistics:
        """The running statistics of online EM (per point; working layout (1, M, ...))."""
        layout = self._layout
        # (called mid-stream, when the running statistics are set)
        counts = layout.working(cast(torch.Tensor, self.stream_counts))
        latent = {name: layout.working(getattr(self, f"stream_{name}")) for name in self.latent.statistic_names}
        return em.Statistics(counts, layout.working(cast(torch.Tensor, self.stream_sums)), counts.new_zeros(counts.shape[:2]), latent)

    def _module_values(self) -> Theta:
        """Every parameter (the live ``nn.Parameter`` s), latent logits first, by module name."""
        return {name: getattr(self, name) for name in self._parameter_names}

    def _emission_log_joint(self, X: torch.Tensor) -> torch.Tensor:
        """``log p(x_n | component k)`` plus the latent structure's per-component log prior (if
        any) for working-layout rows ``X`` (N, D) or (M, N, D): (1, M, K, N), differentiable,
        about an evaluation reference that depends on the parameters alone."""
        if not is_traced(X) and self.missing == "marginalize" and bool(torch.isnan(X).any()):
            return self._marginal_log_joint(X)
        params = self._working_parameters()
        theta = params.emission
        log_prior = self.latent.log_prior(params.latent)
        weights = log_prior if log_prior is not None else torch.full(
            (1, self.n_models, self.n_components), -math.log(self.n_components), device=X.device, dtype=X.dtype)
        reference = self._evaluation_reference(weights, theta, shared=X.dim() == 2)
        eta, const = em.joint_parameters(self.latent, self.family, params, reference)
        T, h = self.family.features(X, reference)
        lp = em.emission_log_prob(T, h, eta, const)  # (1, M, K, N)
        if is_traced(X):  # the same values as a program without data-dependent branches
            return traced_direct_log_prob(self.family, theta, log_prior, reference, X, lp)
        own = em.OwnReference.of(self.family, theta, log_prior, reference, evaluation=True)
        if own is not None:  # components the expansion about the reference would not resolve
            own.write_log_prob(own.groups(X, self.n_components, self.n_models), lp)
        return lp

    def _marginal_log_joint(self, X: torch.Tensor) -> torch.Tensor:
        """:meth:`_emission_log_joint` of rows X (N, D) or (M, N, D) some of which have missing
        entries (NaN): their densities marginal over them, (1, M, K, N); a complete row's as
        without missing entries (so a row's value depends on that row alone). The complete rows'
        densities are taken of X with its missing entries at observed values of their
        coordinates, values in the support whose (discarded) densities keep the gradient finite."""
        incomplete = torch.isnan(X).any(-1, keepdim=True)  # (..., N, 1)
        complete = self._emission_log_joint(with_observed_values(X))
        params = self._working_parameters()
        marginal = self.family.marginal(MissingRows.of(X), params.emission)
        log_joint = em.marginal_log_joint(self.latent, params, marginal.log_prob)
        return torch.where(incomplete.mT, log_joint, complete)  # (1 or M, 1, N) against (1, M, K, N)

    def _draw_generator(self, seed: int | None) -> torch.Generator:
        """The generator of a ``sample`` call: from ``seed``, or the module's own stream (successive
        draws differ, the sequence follows ``self.seed``)."""
        if seed is not None:
            check_int(seed, "seed", minimum=0)
            return self._generator(seed)
        if self._sample_generator is None or self._sample_generator.device != self.device:
            self._sample_generator = self._generator()
        return self._sample_generator

    # --- evaluation ---------------------------------------------------------------------------
    def _evaluation_reference(self, log_weights: torch.Tensor, theta: Theta, shared: bool) -> torch.Tensor | None:
        """The reference point of evaluation, a function of the parameters alone (so a row's
        result never depends on the other rows): the family's, from (1, M, ...) parameters; for
        data shared by every model, their average over the models, (1, D); else (M, 1, D)."""
        with torch.no_grad():  # the density does not depend on it
            reference = self.family.parameter_reference(theta, log_weights.exp())
        if reference is None:
            return None
        return reference.mean(1).reshape(1, -1) if shared else reference[0]

    def _reported(self, result: torch.Tensor, method: str) -> torch.Tensor:
        """A reported value (*batch_shape, ...): checked finite, NaN for the models in ``failed_``."""
        return self._without_failed(self._finite(result, method), math.nan)

    def _finite(self, result: torch.Tensor, method: str) -> torch.Tensor:
        """``result`` (*batch_shape, ...), or a ValueError when it overflowed for a model that did
        not fail (e.g. points so far from every component that their log-density is below the
        dtype's range); models in ``failed_`` are NaN by design."""
        if is_traced(result):  # no values to check (see is_traced)
            return result
        finite = torch.isfinite(result)
        if self.failed_ is not None and bool(self.failed_.any()):
            finite = em.where_models(self.failed_.to(result.device), True, finite)
        if not bool(finite.all()):
            raise ValueError(
                f"{method}: the log-likelihood of X is not finite in {self.dtype} (X is too far from the "
                "components, or too large); use dtype=torch.float64 or scale the data"
            )
        return result

    def _without_failed(self, values: torch.Tensor, fill: float) -> torch.Tensor:
        """``values`` (*batch_shape, ...) with ``fill`` for the models whose last fit failed."""
        if self.failed_ is None or (not is_traced(values) and not bool(self.failed_.any())):
            return values
        return em.where_models(self.failed_.to(values.device), fill, values)

    def _require_parameters(self) -> torch.Tensor:
        if not self.is_initialized:
            raise NotFittedError(
                f"{type(self).__name__} has no parameters yet: call fit(X) first or pass n_features"
            )
        return getattr(self, self._parameter_names[0])

    @property
    def _layout(self) -> Layout:
        return Layout(tuple(self.batch_shape))

    def _working_parameters(self) -> em.Params:
        """The current parameters in the working layout (1, M, ...): live views (the latent
        structure's log-probabilities normalised from their logits)."""
        layout = self._layout
        theta = {name: layout.working(value) for name, value in self.theta().items()}
        latent = {working: layout.working(self._latent_working_value(getattr(self, name)))
                  for name, working in self._latent_names.items()}
        return em.Params(latent, theta)

    def _latent_working_value(self, value: torch.Tensor) -> torch.Tensor:
        """A latent parameter's working value from the module's: log-probabilities from logits
        (a model whose latent parameters are not probabilities keeps them as they are)."""
        return value.log_softmax(-1)

    def _working_latent(self, module: Theta) -> Theta:
        """Module-named values (``logits`` etc. among the family's) with the latent structure's
        under their working names (the user's initial log-probabilities), the family's unchanged."""
        return {self._latent_names.get(name, name): value for name, value in module.items()}

    def _module_parameters(self, params: em.Params, best: torch.Tensor | None = None) -> Theta:
        """Working parameters (R, M, ...) -> module layout (*batch_shape, ...) at restart ``best``
        (M,) of each model (default: restart 0), the latent log-probabilities as their logits."""
        best = torch.zeros(self.n_models, dtype=torch.long, device=self.device) if best is None else best
        module = {name: self._layout.pick(value, best) for name, value in params.emission.items()}
        for name, working in self._latent_names.items():
            module[name] = self._layout.pick(params.latent[working], best)
        return module

    def _validated_input(self, X: Any, name: str, min_samples: int = 1, n_features: int | None = None,
                         missing: str | None = None) -> torch.Tensor:
        """X as a checked tensor in the model's dtype. A module that follows its data's dtype and
        has no parameters adopts X's instead (in a stream: the first batch's, the one given
        without ``n_features``). NaN marks missing entries when ``missing`` (default: the
        model's option) is ``"marginalize"``."""
        adopts = self._dtype_follows_data and not self.is_initialized and n_features is None
        dtype = data_dtype(X) if adopts else self.dtype
        X = as_float_tensor(X, name, device=self.device, dtype=dtype, allow_bool=self.family.accepts_bool)
        n_features = n_features if n_features is not None else self.n_features
        traced = is_traced(X)  # values are checked when they exist (not under export, compile, vmap)
        check_data(X, name, n_features=n_features, batch_shape=self.batch_shape, min_samples=min_samples,
                   finite=False)
        if not traced:
            if check_missing_values(X, name, missing or self.missing, self._marginalises_missing):
                self.family.check_missing(name)
                self.family.check_domain(with_observed_values(X), name)
            else:
                self.family.check_domain(X, name)
        if adopts and dtype != self.dtype:
            self._anchor = self._anchor.to(dtype)
        return X

    def _generator(self, seed: int | None = None) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(resolve_seed(seed if seed is not None else self.seed))

    def _user_initial_parameters(self, n_features: int) -> Theta:
        """The validated initial values the user gave, with batch dims: the family's and the
        latent structure's (:meth:`_user_latent_initial`, module names)."""
        batch = tuple(self.batch_shape)
        theta = self.family.user_initial_parameters(batch, self.n_components, n_features, self.device, self.dtype)
        theta.update(self._user_latent_initial())
        return theta

    def _user_latent_initial(self) -> Theta:
        """The latent structure's initial values given by the user, as logits (*batch_shape, ...)."""
        raise NotImplementedError

    def _probabilities_logits(self, value: Any, name: str, event: tuple[int, ...]) -> torch.Tensor:
        """Probabilities ``event`` (rows over the last axis, batch dims allowed) validated, as
        logits ``(*batch_shape, *event)`` (a zero as the dtype's smallest positive number)."""
        probabilities = as_float_tensor(value, name, device=self.device, dtype=self.dtype)
        check_shape(probabilities, name, event, self.batch_shape)
        check_finite(probabilities, name)
        tolerance = max(1e-6, 1000 * torch.finfo(self.dtype).eps)
        sums = probabilities.sum(-1)
        if bool((probabilities < 0).any()) or bool(((sums - 1).abs() > tolerance).any()):
            raise ValueError(f"{name} must be non-negative and sum to 1 over its last axis, got sums "
                             f"{sums.flatten()[:5].tolist()}")
        tiny = torch.finfo(self.dtype).tiny
        return probabilities.clamp_min(tiny).log().expand(*self.batch_shape, *event)

    def _fixed_parameters(self, params: em.Params | None) -> em.Params | None:
        """Working values (R, M, ...) of the parameters EM holds fixed (the latent structure's
        as log-probabilities), or None: the module's current values, or the initial ``params``
        of a module that has no parameters yet (``params`` None: one restart of the current values)."""
        names = [name for name in self._parameter_names if name not in self._em_parameters]
        if not names:
            return None
        held_latent = [self._latent_names[name] for name in names if name in self._latent_names]
        held_emission = [name for name in names if name not in self._latent_names]
        if not self.is_initialized:
            initial = cast(em.Params, params)  # a module without parameters is given its initial ones
            return em.Params({name: initial.latent[name] for name in held_latent},
                             {name: initial.emission[name] for name in held_emission})
        n_restarts = 1 if params is None else params.batch[0]
        current = self._working_parameters()
        held = em.Params({name: current.latent[name] for name in held_latent},
                         {name: current.emission[name] for name in held_emission})
        return held.map(lambda value: value.detach().expand(n_restarts, *value.shape[1:]))

    def _assign_em_update(self, theta: Theta) -> None:
        """Write what EM computed: every parameter of a new module, else those EM owns (a held
        latent parameter keeps its raw logits, not just their softmax)."""
        if self.is_initialized:
            theta = {name: value for name, value in theta.items() if name in self._em_parameters}
        self._assign(theta, create=not self.is_initialized)

    def _assign(self, theta: Theta, *, create: bool) -> None:
        """Write parameters in place (EM update) or create them (first fit / construction): an
        ``UninitializedParameter`` is materialised in place, so the ``Parameter`` objects (those
        an optimizer built before the first fit holds) stay the same."""
        with torch.no_grad():
            for name, value in theta.items():
                parameter = getattr(self, name)
                if create:
                    parameter.materialize(value.shape, device=value.device, dtype=value.dtype)
                parameter.copy_(value)

    def _create_parameters_before_load(self, state_dict, prefix, local_metadata, strict, *args) -> None:
        """Check the whole incoming state against this module's configuration, then make room
        for it: a module built without n_features creates its parameters, the online-EM buffers
        take the saved shapes (a strict load of a state without a stream ends the stream).
        Raises before anything is written (torch would copy entry by entry, then raise)."""
        state = own_entries(state_dict, prefix)
        n_features = self._check_state(state, prefix, self._strict_load)
        for name in self._stream_buffers:
            saved, current = state.get(name), getattr(self, name)
            if saved is None:
                if self._strict_load:
                    setattr(self, name, None)
            elif current is None or current.shape != saved.shape:
                dtype = saved.dtype if not saved.is_floating_point() else self.dtype
                setattr(self, name, torch.empty(saved.shape, dtype=dtype, device=self.device))
        if not self.is_initialized and all(name in state for name in self._parameter_names):
            for name in self._parameter_names:  # in place: the Parameter objects stay the same
                getattr(self, name).materialize(state[name].shape, device=self.device, dtype=self.dtype)
            self.n_features = n_features
        elif not self.is_initialized:  # (a partial state, not strict) torch would copy into the uninitialized parameters
            unexpected_keys = args[1]
            for name in self._parameter_names:
                if prefix + name in state_dict:
                    del state_dict[prefix + name]  # (the copy of the state this load_state_dict call made)
                    unexpected_keys.append(prefix + name)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        """nn.Module's, without the uninitialized parameters: the state of a module before its first
        fit has no parameters (nn.LazyLinear would save ``UninitializedParameter`` s, which a
        ``weights_only`` load and torch_em's model files do not hold)."""
        lazy = {prefix + name for name, value in self._parameters.items() if value is not None and is_lazy(value)}
        if not lazy:
            super()._save_to_state_dict(destination, prefix, keep_vars)
            return
        saved: dict[str, Any] = {}
        super()._save_to_state_dict(saved, prefix, True)  # (keep_vars: an uninitialized parameter has no detach)
        for key, value in saved.items():
            if key not in lazy:
                destination[key] = value.detach() if isinstance(value, torch.Tensor) and not keep_vars else value

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        """nn.Module's; parameters still uninitialized after the load (a state without parameters)
        are not missing: such a state (see :meth:`_save_to_state_dict`) has none to give."""
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        lazy = {prefix + name for name, value in self._parameters.items() if value is not None and is_lazy(value)}
        missing_keys[:] = [key for key in missing_keys if key not in lazy]

    def _check_state(self, state: dict[str, Any], prefix: str, strict: bool) -> int | None:
        """Raise ValueError/TypeError unless ``state`` (this module's entries) loads whole;
        returns the number of features of the state (None if it has no parameters)."""
        owner = f"{type(self).__name__}({self.extra_repr()})"
        n_features = self.n_features
        saved = {name: state[name] for name in self._family_names if isinstance(state.get(name), torch.Tensor)}
        if n_features is None and saved:
            try:
                n_features = int(self.family.n_features_of(saved))
            except (KeyError, IndexError, StopIteration, AttributeError) as error:
                shapes = {prefix + name: tuple(value.shape) for name, value in saved.items()}
                raise ValueError(f"state_dict: the parameters {shapes} give no number of features for {owner} ({error!r})") from None
        stream = tuple(name for name in self._stream_buffers if name != "stream_shift")
        if n_features is None and any(name in state for name in self._stream_buffers):
            raise ValueError(f"state_dict has online-EM state {[prefix + n for n in stream]} but no parameters for {owner}")
        check_state(state, prefix, owner, self._state_shapes(n_features), strict=strict,
                    groups=[(self._parameter_names, self.is_initialized), (stream, False)], counters=["stream_steps"])
        return n_features

    def _state_shapes(self, n_features: int | None) -> dict[str, list[tuple[int, ...]] | None]:
        """The allowed shape(s) of every entry of a state with ``n_features`` (None: unknown)."""
        names = (*self._parameter_names, *self._stream_buffers)
        if n_features is None:
            return dict.fromkeys(names)
        batch, K, D = tuple(self.batch_shape), self.n_components, n_features
        latent = self.latent.default_parameters((), K, self._anchor)
        events = {**{name: tuple(latent[working].shape) for name, working in self._latent_names.items()},
                  **self.family.event_shapes(K, D),
                  "stream_counts": (K,), "stream_sums": (K, self.family.n_statistics(D)),
                  **{f"stream_{name}": shape for name, shape in self.latent.statistic_shapes(K).items()}}
        shapes: dict[str, list[tuple[int, ...]] | None] = {name: [(*batch, *event)] for name, event in events.items()}
        shapes["stream_steps"] = [()]
        shapes["stream_weight"] = [batch]
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
        fits = all(not is_lazy(value) and value.shape == saved[name].shape for name, value in current.items())
        first = saved[self._parameter_names[0]]
        if fits and first.is_floating_point() and first.dtype != self.dtype:
            self.to(first.dtype)  # in place: the Parameter objects stay the same

    def _describe_model(self, restart: int, model: int) -> str:
        return self._layout.describe(restart, model, self.n_init)


def _uninitialized_parameter(device: torch.device | None, dtype: torch.dtype) -> torch.nn.Parameter:
    """An ``UninitializedParameter`` that materialises on ``device`` in ``dtype``, requiring grad as
    the ``Parameter`` it becomes. (torch's stub types the class as a Tensor built from data; it is
    a Parameter built from ``requires_grad``, ``device`` and ``dtype``.)"""
    return cast(torch.nn.Parameter, UninitializedParameter(  # type: ignore[call-arg]  # (see above)
        requires_grad=True, device=device, dtype=dtype))


def _share(part: float | torch.Tensor, whole: float | torch.Tensor) -> float | torch.Tensor:
    """``part / whole`` of two (weighted) numbers of points (numbers, or (M,) per model)."""
    if isinstance(part, torch.Tensor) or isinstance(whole, torch.Tensor):
        return torch.as_tensor(part) / torch.as_tensor(whole)
    return part / whole
