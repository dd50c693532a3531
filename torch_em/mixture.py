"""``Mixture``: a finite mixture of any component family as an ``nn.Module``.

One module holds a batch of independent mixtures (``batch_shape``). Its parameters are
unconstrained ``nn.Parameter`` s shaped ``(*batch_shape, *event_shape)``: ``logits (*b, K)`` for the
mixing weights plus the family's own (e.g. ``loc`` and ``raw_precision_cholesky`` for Gaussians).
EM writes them in place under ``no_grad``, so optimizers, ``.to()``, ``state_dict()`` and hooks
keep working on the same objects; ``forward``/``log_prob`` is pure and differentiable.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any, Sequence

import torch
from torch import nn
from tqdm import tqdm

from . import distributed, em
from ._precision import FollowsDataDtype, without_autocast
from ._validation import (
    as_float_tensor, check_choice, check_common_options, check_data, check_device, check_dtype, check_em_parameters, check_family,
    check_finite, check_int, check_positive, check_sample_weight, check_shape, data_dtype,
)
from ._state import CheckedLoad, check_state, own_entries
from .families.base import ComponentFamily, IllConditionedError, NotFittedError, Theta
from ._random import resolve_seed, restart_groups
from .observations import Observations
from .streaming import StepSchedule, batch_source
from .initialization import METHODS, initial_parameters
from .latent import MIXTURE
from .layout import Layout
from .normalize import log_normalize


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
        prior_count: pseudo-points per component distributed like the data (weighted), added to
            the statistics before every M-step of ``fit`` and ``partial_fit``: MAP-style smoothing
            (a component that loses its points drifts to the data's mean and spread instead of
            collapsing), as :func:`torch_em.functional.em`'s. 0: maximum likelihood. The lower
            bound stays the log-likelihood.
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

    Tensors and numpy: ``log_prob``/``forward`` and the parameter views (``weights``, ``means``,
    ``covariances``, ...) are differentiable (they carry the parameters' graph: take
    ``.detach().cpu().numpy()`` for numpy); ``score_samples``, ``score``, ``predict_proba``,
    ``predict``, ``bic``, ``aic`` and ``sample`` return tensors without a graph
    (``np.asarray`` works on CPU). :mod:`torch_em.sklearn` wraps the modules as scikit-learn
    estimators with numpy in and out.
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
        prior_count: float = 0.0,
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
        check_positive(prior_count, "prior_count", allow_zero=True)
        self.prior_count = float(prior_count)
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
        # Running state of online EM (partial_fit): statistics per point, step count, and the stream's
        # reference point (its state_dict key keeps the name stream_shift).
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
        self._em_parameters = check_em_parameters(names, self._parameter_names, self.family)

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
    def fit(self, X: Any, y: Any = None, sample_weight: Any = None, verbose: bool = False) -> "Mixture":
        """Fit every model of the batch by EM (restarts as an extra batch dimension), or, with
        ``warm_start`` and existing parameters, continue EM from them (no initialisation, one
        start per model, convergence judged against the previous fit's lower bound).

        ``y`` is ignored (scikit-learn's convention). ``sample_weight``: per-point weights, ``(N,)``
        for every model or ``(*batch_shape, N)`` one set per model (e.g. bootstrap resamples):
        a point of weight w counts as w copies of it (integer weights fit as repeated rows do);
        for a batch source, ``"batches"``: every batch is ``(x, w, ...)`` with ``w`` the weights
        of its points. Initialisation weighs them too (weighted k-means++ and Lloyd steps, as
        scikit-learn's k-means does; a point of weight 0 is never a seed).

        Restart 0 runs as a batch of its own, bit for bit the fit with ``n_init=1``; restarts
        1..k-1 run together. The fit ends an online stream (``partial_fit`` starts a new one).

        Raises ValueError before changing anything when X or the initial parameters are invalid,
        and IllConditionedError (also before any change) for a failing model when ``on_error`` is
        ``"raise"``; see ``on_error`` for the isolation of failing models.
        """
        return self._fit(X, sample_weight, verbose, self.max_iter)

    @without_autocast
    @torch.no_grad()
    def initialize(self, X: Any, y: Any = None, sample_weight: Any = None) -> "Mixture":
        """The initial parameters of :meth:`fit` (``init_params``, the user's initial values and
        the first M-step), without EM: ``n_iter_`` 0, ``lower_bound_`` -inf, not converged
        (what scikit-learn's ``max_iter=0`` returns). Every restart is drawn; restart 0 is kept."""
        self._fit(X, sample_weight, False, 0)
        self.lower_bound_ = torch.full_like(self.lower_bound_, -math.inf).masked_fill(self.failed_, math.nan)
        return self

    def _fit(self, X: Any, sample_weight: Any, verbose: bool, max_iter: int) -> "Mixture":
        """:meth:`fit` with at most ``max_iter`` EM iterations (0: the initialisation alone)."""
        M, layout = self.n_models, self._layout
        source = batch_source(X)
        observations = self._observations()
        data = observations.tensor(X, sample_weight) if source is None else observations.stream(source, sample_weight)
        n_features = data.sample.X.shape[-1]
        continued = self.warm_start and self.is_initialized
        groups = [range(1)] if continued else restart_groups(self.n_init)
        with tqdm(total=max_iter * len(groups), desc="EM", disable=not verbose, leave=False) as progress, \
                self._naming_failures():
            result = em.cat_restarts([
                self._run_restarts(data, n_features, restarts, continued, progress if verbose else None, max_iter)
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
        not_converged = ~self.converged_ & ~self.failed_
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
        max_iter: int,
    ) -> em.EMResult:
        """EM for the working batch (len(restarts), M) of the given restarts, or (1, M) from the
        current parameters when ``continued`` (a warm start: its convergence check goes on from
        the last lower bound, as scikit-learn's does)."""
        previous = None
        failures = em.Failures.none(len(restarts), self.n_models, self.device) if self._isolates_failures() else None
        if continued:
            params = self._working_parameters()
            if self.lower_bound_ is not None and self.stream_steps is None:  # mid-stream it is a batch's
                previous = self._layout.working(self.lower_bound_)
        else:
            params = self._initial_parameters(data.sample, data.chunk_size, n_features, restarts, failures)
            params = self._same_on_every_rank(params)
        fixed = self._fixed_parameters(params)
        return em.run_em(self._em_map(data, fixed), params.with_fixed(fixed), max_iter=max_iter, tol=self.tol,
                         progress=progress, previous_lower_bound=previous, failures=failures)

    def _em_map(self, data: em.Data | em.StreamData, fixed: em.Params | None) -> em.EMMap:
        return em.EMMap(MIXTURE, self.family, data, fixed=fixed, pseudo_count=self.prior_count)

    @contextlib.contextmanager
    def _naming_failures(self):
        """Turn the engine's failure of model (r, m) into an IllConditionedError naming it."""
        try:
            yield
        except em.ModelFailed as error:
            raise IllConditionedError(error.failure.message(self._describe_model(error.restart, error.model))) from None

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
                stacklevel=4,  # past fit (or partial_fit) and its no_grad wrapper
            )

    def _observations(self) -> Observations:
        """How this module's data become the engine's: validation in its dtype and layout."""
        return Observations(
            family=self.family, layout=self._layout, n_components=self.n_components, n_features=self.n_features,
            validate=self._validated_input, chunk_size=self._default_chunk_size, sample_size=self._sample_size(),
            seed=self.seed, generator=self._generator, device=self.device,
        )

    @staticmethod
    def _same_on_every_rank(params: em.Params) -> em.Params:
        """Rank 0's initial parameters on every rank (no-op without torch.distributed)."""
        names = [*params.latent, *params.emission]
        values = dict(zip(names, distributed.broadcast(*params.latent.values(), *params.emission.values())))
        return em.Params({n: values[n] for n in params.latent}, {n: values[n] for n in params.emission})

    def _default_chunk_size(self, n_features: int) -> int:
        """Rows per chunk: ``chunk_size`` or a memory budget for one restart. It does not depend
        on ``n_init``, so that restart 0 sums its chunks exactly as a fit with ``n_init=1``
        does (a batch of R restarts holds R such blocks)."""
        return self.chunk_size or em.default_chunk_size(self.n_models, self.n_components, self.family.n_statistics(n_features))

    def _sample_size(self) -> int:
        """Points the initialisation of a large or streamed dataset works on."""
        return max(self.stream_sample_size, 50 * self.n_components)

    def _initial_parameters(
        self, data: em.Data, chunk: int, n_features: int, restarts: range, failures: em.Failures | None = None,
    ) -> em.Params:
        """Working initial parameters (R, M, ...) of the given restarts, with the user's initial
        values (:func:`torch_em.initialization.initial_parameters`)."""
        K = self.n_components
        return initial_parameters(
            MIXTURE, self.family, data, method=self.init_params, n_components=K, layout=self._layout,
            restarts=restarts, seed=self.seed, chunk_size=chunk,
            user_parameters=self._user_initial_parameters(n_features),
            user_centres=self.family.initial_centres(tuple(self.batch_shape), K, n_features, self.device, self.dtype),
            failures=failures, generator=self._generator,
        )

    @without_autocast
    @torch.no_grad()
    def partial_fit(self, X: Any, y: Any = None, sample_weight: Any = None) -> "Mixture":
        """One stepwise (online) EM update from a batch ``(n, D)`` or ``(*batch_shape, n, D)``
        (``y`` is ignored; ``sample_weight`` as for :meth:`fit`, ``(n,)`` or ``(*batch_shape, n)``).

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
        K, M, layout = self.n_components, self.n_models, self._layout
        started = self.stream_steps is not None
        X = layout.data(self._validated_input(X, "X", min_samples=1 if started else K))
        weights = self._observations().weights(sample_weight, X)
        n_features = X.shape[-1]
        chunk = self.chunk_size or em.default_chunk_size(M, K, self.family.n_statistics(n_features))
        every_model = torch.ones(1, M, dtype=torch.bool, device=X.device)
        failures = em.Failures.none(1, M, X.device) if self._isolates_failures() else None
        running = self._running_statistics() if started else None
        # The stream's reference point is fixed by its first batch.
        reference = self.stream_shift if started else distributed.combined_reference(self.family.reference(X), X.shape[-2])
        data = em.Data(self.family, X, reference, chunk, weights=weights)
        with self._naming_failures():
            if started:
                params = self._working_parameters()
                if self.averaging_start is not None:  # the parameters hold the average: the iterate is the running M-step
                    params, invalid = em.m_step(MIXTURE, self.family, running, reference, every_model,
                                                self._fixed_parameters(None))
                    em.record_failures(failures, invalid.any(-1),
                                       em.invalid_component_reason(self.family, "partial_fit", invalid))
            else:
                params = self._working_parameters() if self.is_initialized else self._same_on_every_rank(
                    self._initial_parameters(data, chunk, n_features, range(1), failures))
            fixed = self._fixed_parameters(params)
            params = params.with_fixed(fixed)
            data.total_weight = distributed.total_weight(data.total_weight, X.device)  # the batch over all ranks
            updating = every_model if failures is None else ~failures.failed
            step = em.online_step(self._em_map(data, fixed), params, running,
                                  self.schedule.rho(int(self.stream_steps) if started else 0), updating)
            infinite = ~torch.isfinite(step.batch_log_likelihood) & updating  # (1, M)
            em.record_failures(failures, infinite, lambda r, m: em.Failure(
                "partial_fit", None, "use float64 or scale the data", likelihood="batch log-likelihood"))
            invalid = step.invalid & ~infinite.unsqueeze(-1)
            em.record_failures(failures, invalid.any(-1), em.invalid_component_reason(self.family, "partial_fit", invalid))
        new_theta = self._module_parameters(step.params)
        new_counts, new_sums = layout.module(step.running.counts[0]), layout.module(step.running.sums[0])
        if failures is not None and bool(failures.failed.any()):  # failed models skip the update
            skipped = failures.failed[0].reshape(self.batch_shape)
            held = {"logits": self.logits, **self.theta()} if self.is_initialized else self._module_parameters(params)
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
        self.stream_shift = reference
        self._record_failures(failures, torch.zeros(M, dtype=torch.long, device=X.device))
        mean = step.batch_log_likelihood[0] / data.total_weight
        self.lower_bound_ = layout.module(mean).masked_fill(self.failed_, math.nan)
        return self

    def _running_statistics(self) -> em.Statistics:
        """The running statistics of online EM (per point; working layout (1, M, ...))."""
        counts = self._layout.working(self.stream_counts)
        return em.Statistics(counts, self._layout.working(self.stream_sums), counts.new_zeros(counts.shape[:2]))

    # --- evaluation ---------------------------------------------------------------------------
    def log_joint(self, X: Any) -> torch.Tensor:
        """``log w_k + log p(x_n | component k)`` for every model: ``(*batch_shape, N, K)``.
        Differentiable with respect to the parameters and to X."""
        self._require_parameters()
        X = self._validated_input(X, "X")
        N = X.shape[-2]
        X = self._layout.data(X)
        params = self._working_parameters()
        log_weights, theta = params.latent["log_weights"], params.emission
        reference = self._evaluation_reference(log_weights, theta, shared=X.dim() == 2)
        eta, const = em.joint_parameters(MIXTURE, self.family, params, reference)
        T, h = self.family.features(X, reference)
        lp = em.emission_log_prob(T, h, eta, const)  # (1, M, K, N)
        own = em.OwnReference.of(self.family, theta, log_weights, reference, evaluation=True)
        if own is not None:  # components the expansion about the reference would not resolve
            own.write_log_prob(own.groups(X, self.n_components, self.n_models), lp)
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
        return log_normalize(self.log_joint(X), dim=-1)[1]

    def forward(self, X: Any) -> torch.Tensor:
        """Same as :meth:`log_prob`."""
        return self.log_prob(X)

    @torch.no_grad()
    def score_samples(self, X: Any) -> torch.Tensor:
        """Per-point log-likelihood ``(*batch_shape, N)`` (no graph); NaN for models in ``failed_``."""
        return self._reported(self.log_prob(X), "score_samples")

    @torch.no_grad()
    def score(self, X: Any, y: Any = None, sample_weight: Any = None) -> torch.Tensor:
        """Mean log-likelihood per point ``(*batch_shape)`` (weighted by ``sample_weight``, ``(N,)``
        or ``(*batch_shape, N)``, when given); NaN for models in ``failed_``. ``y`` is ignored."""
        log_prob = self.log_prob(X)
        if sample_weight is None:
            return self._reported(log_prob.mean(-1), "score")
        weights = check_sample_weight(sample_weight, "sample_weight", n_points=log_prob.shape[-1],
                                      batch_shape=self.batch_shape, device=log_prob.device, dtype=log_prob.dtype)
        return self._reported((log_prob * weights).sum(-1) / weights.sum(-1), "score")

    @torch.no_grad()
    def predict_proba(self, X: Any) -> torch.Tensor:
        """Posterior responsibilities ``(*batch_shape, N, K)``; NaN for models in ``failed_``."""
        return self._reported(log_normalize(self.log_joint(X), dim=-1)[0], "predict_proba")

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
        theta = {name: self._layout.working(value)[0] for name, value in self.theta().items()}
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

    @property
    def _layout(self) -> Layout:
        return Layout(tuple(self.batch_shape))

    def _working_parameters(self) -> em.Params:
        """The current parameters in the working layout (1, M, ...): live views (log-weights
        normalised from the logits)."""
        layout = self._layout
        theta = {name: layout.working(value) for name, value in self.theta().items()}
        return em.Params({"log_weights": layout.working(self.logits.log_softmax(-1))}, theta)

    def _module_parameters(self, params: em.Params, best: torch.Tensor | None = None) -> Theta:
        """Working parameters (R, M, ...) -> module layout (*batch_shape, ...) at restart ``best``
        (M,) of each model (default: restart 0), the log-weights as ``"logits"``."""
        best = torch.zeros(self.n_models, dtype=torch.long, device=self.device) if best is None else best
        module = {name: self._layout.pick(value, best) for name, value in params.emission.items()}
        module["logits"] = self._layout.pick(params.latent["log_weights"], best)
        return module

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

    def _fixed_parameters(self, params: em.Params | None) -> em.Params | None:
        """Working values (R, M, ...) of the parameters EM holds fixed (``"logits"`` as
        log-weights), or None: the module's current values, or the initial ``params`` of a module
        that has no parameters yet (``params`` None: one restart of the current values)."""
        names = [name for name in self._parameter_names if name not in self._em_parameters]
        if not names:
            return None
        if not self.is_initialized:
            latent = {"log_weights": params.latent["log_weights"]} if "logits" in names else {}
            return em.Params(latent, {name: params.emission[name] for name in names if name != "logits"})
        n_restarts = 1 if params is None else params.batch[0]
        current = self._working_parameters()
        latent = {"log_weights": current.latent["log_weights"]} if "logits" in names else {}
        emission = {name: current.emission[name] for name in names if name != "logits"}
        return em.Params(latent, emission).map(lambda value: value.detach().expand(n_restarts, *value.shape[1:]))

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
        return self._layout.describe(restart, model, self.n_init)
