"""``Mixture``: a finite mixture of any component family as an ``nn.Module``.

One module holds a batch of independent mixtures (``batch_shape``). Its parameters are
unconstrained ``nn.Parameter`` s shaped ``(*batch_shape, *event_shape)``: ``logits (*b, K)`` for the
mixing weights plus the family's own (e.g. ``loc`` and ``raw_precision_cholesky`` for Gaussians).
EM writes them in place under ``no_grad``, so optimizers, ``.to()``, ``state_dict()`` and hooks
keep working on the same objects; ``forward``/``log_prob`` is pure and differentiable. What does
not depend on the latent structure (restarts, failures, online EM, state) is
:class:`torch_em.latent_model.LatentModel`'s.
"""
from __future__ import annotations

import math
from typing import Any, Sequence, cast

import torch

from . import distributed, em
from ._precision import keeps_dtype_when_rejected, without_autocast
from ._validation import check_family, check_int, check_sample_weight
from .families.base import ComponentFamily, Theta
from .latent import MIXTURE
from .latent_model import ON_ERROR, QUOTED_FAILURES, STREAM_BUFFERS, LatentModel  # noqa: F401  (their home before)
from .normalize import log_normalize
from .observations import Observations
from .priors import PriorSpec
from .streaming import batch_source, unwrap_batch


class Mixture(LatentModel):
    """A batch of finite mixtures of ``n_components`` components of ``family``.

    ``fit`` takes one tensor/array, or a batch source for data larger than memory (a
    ``DataLoader``, or a callable returning a fresh iterator of batches per pass): exact EM with
    one pass per iteration, initialised on a uniform sample of ``stream_sample_size`` points.

    Args:
        family: the component family (e.g. ``torch_em.families.Gaussian("diag")``).
        n_components: K, components per mixture.
        n_features: D. When given, parameters exist at construction; otherwise they are
            ``UninitializedParameter`` s (torch's lazy modules' convention, as ``nn.LazyLinear``),
            already in ``parameters()``, that the first ``fit``, ``partial_fit`` or
            ``load_state_dict`` materialises in place.
        batch_shape: shape of the batch of independent models fitted together.
        tol: a model has converged when its mean log-likelihood changes by less than ``tol``.
        max_iter: EM iterations at most.
        n_init: restarts per model, run as an extra batch dimension; the best lower bound wins.
        init_params: ``"k-means++"`` (of 4 batched greedy seedings, each with 5 Lloyd
            iterations and an M-step, the one that gives the data the highest likelihood),
            ``"kmeans"`` (one seeding, Lloyd to convergence), ``"random"`` (random
            responsibilities) or ``"random_from_data"``.
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
        prior: MAP-EM with conjugate priors (:mod:`torch_em.priors`): None (maximum likelihood),
            ``"default"`` (the components' default prior, e.g. mclust's for Gaussians; flat
            weights), a prior for the components (e.g. ``priors.NormalInverseWishart(...)``), or
            a dict ``{"weights": priors.Dirichlet(...), "components": ...}``. The lower bound
            becomes (log-likelihood + log prior) per point; BIC and AIC stay on the likelihood.
        accelerate: None (plain EM) or ``"squarem"``: SQUAREM extrapolation of the EM map
            (:mod:`torch_em.acceleration`; monotone, a step length per model); ``max_iter`` and
            ``n_iter_`` then count evaluations of the EM map (three per cycle).
        annealing: None (plain EM) or the initial inverse temperature ``beta_0`` in (0, 1) of
            deterministic annealing EM (:mod:`torch_em.annealing`, Ueda & Nakano 1998), a way out
            of poor local optima beyond restarts: ``fit`` first runs EM with tempered posteriors
            ``r_nk ∝ (w_k p(x_n | k)) ** beta`` for ``beta = beta_0, 1.5 beta_0, ...`` below 1 (at
            most 10 iterations each, fewer once the tempered objective changes by less than
            ``tol``), then ordinary EM at beta = 1 (``tol``, ``max_iter``), so it ends at a
            stationary point of the likelihood. ``n_iter_`` counts every iteration, the annealing
            stages' included; ``lower_bound_history_`` holds the stages' tempered objectives
            first. Composes with ``n_init``, ``batch_shape``, ``sample_weight``, priors and
            ``accelerate``; a ``warm_start`` continuation and ``partial_fit`` run plain EM.
            Whether it helps depends on the data: too small a ``beta_0`` can merge all
            components into one, for good (see :mod:`torch_em.annealing`); compare
            ``lower_bound_`` with a plain fit's. HMMs reject it (ValueError).
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
        missing: what NaN in X means. ``"reject"`` (default): an error. ``"marginalize"``: a
            missing entry, integrated out exactly (Ghahramani & Jordan's EM for incomplete data:
            the E-step takes each component's density of a row's observed entries and the
            expected statistics of its missing entries given them); ``fit``, ``partial_fit``,
            ``log_prob``, ``score_samples``, ``score``, ``predict_proba`` and ``predict`` then
            take rows with missing entries (a row needs one observed entry), and :meth:`impute`
            fills them in. Rows are grouped by missingness pattern, so the cost follows the
            number of distinct patterns, not of rows. Supported by Gaussian components (every
            covariance type); other families say so.
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

    #: (*batch_shape, K) bool: the components each model has (models of a grid over K padded to
    #: the largest, :func:`torch_em.select`), or None: all of them.
    _components: torch.Tensor | None = None

    _marginalises_missing = True

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
        check_family(family)
        super().__init__(
            MIXTURE, {"logits": "log_weights"}, family, n_components, n_features, batch_shape=batch_shape, tol=tol,
            max_iter=max_iter, n_init=n_init, init_params=init_params, seed=seed, chunk_size=chunk_size,
            learning_decay=learning_decay, learning_offset=learning_offset, step_size=step_size,
            averaging_start=averaging_start, prior_count=prior_count, prior=prior, accelerate=accelerate,
            annealing=annealing, em_parameters=em_parameters,
            warm_start=warm_start, on_error=on_error, missing=missing, device=device, dtype=dtype,
        )
        self.weights_init = weights_init
        self._create_initial_parameters()

    def _config(self) -> dict[str, Any]:
        return {"family": self.family, "n_components": self.n_components, "weights_init": self.weights_init,
                **super()._config(), "missing": self.missing}

    # --- basic properties -----------------------------------------------------------------
    @property
    def weights(self) -> torch.Tensor:
        """Mixing weights ``(*batch_shape, K)``."""
        return self._require_parameters().softmax(-1)

    def extra_repr(self) -> str:
        batch = f", batch_shape={tuple(self.batch_shape)}" if self.batch_shape else ""
        return f"n_components={self.n_components}, n_features={self.n_features}{batch}"

    # --- fitting ----------------------------------------------------------------------------
    @keeps_dtype_when_rejected
    @without_autocast
    @torch.no_grad()
    def fit(self, X: Any, y: Any = None, sample_weight: Any = None, verbose: bool = False, *,
            process_group: Any = None) -> "Mixture":
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
        ``process_group``: the torch.distributed group whose ranks hold the rest of the data
        (None: the default group when one is initialised; False: this rank's data alone).
        """
        with distributed.using(process_group, f"{type(self).__name__}.fit"):
            return self._fit(self._data(X, sample_weight), verbose, self.max_iter)

    @keeps_dtype_when_rejected
    @without_autocast
    @torch.no_grad()
    def initialize(self, X: Any, y: Any = None, sample_weight: Any = None, *, process_group: Any = None) -> "Mixture":
        """The initial parameters of :meth:`fit` (``init_params``, the user's initial values and
        the first M-step), without EM: ``n_iter_`` 0, ``lower_bound_`` -inf, not converged
        (what scikit-learn's ``max_iter=0`` returns). Every restart is drawn; restart 0 is kept.
        ``process_group`` as for :meth:`fit`."""
        with distributed.using(process_group, f"{type(self).__name__}.initialize"):
            return self._initialize(self._data(X, sample_weight))

    def _data(self, X: Any, sample_weight: Any) -> em.Data | em.StreamData:
        """The engine's data of ``fit``'s arguments: a tensor or a batch source."""
        source = batch_source(X)
        observations = self._observations()
        return observations.tensor(X, sample_weight) if source is None else observations.stream(source, sample_weight)

    @keeps_dtype_when_rejected
    @without_autocast
    @torch.no_grad()
    def partial_fit(self, X: Any, y: Any = None, sample_weight: Any = None, *, process_group: Any = None) -> "Mixture":
        """One stepwise (online) EM update from a batch ``(n, D)`` or ``(*batch_shape, n, D)``, or
        a batch as a DataLoader yields it (``(x, y, ...)``, ``{"x": x, ...}``) (``y`` is ignored; ``sample_weight`` as for :meth:`fit`, ``(n,)`` or ``(*batch_shape, n)``).

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
        ``failed_``, as for :meth:`fit`. ``process_group`` as for :meth:`fit` (every rank passes
        its part of the batch).
        """
        started = self.stream_steps is not None
        X = unwrap_batch(X)  # the forms of a batch of fit's batch sources: (x, y, ...), {"x": ...}
        X = self._layout.data(self._validated_input(X, "X", min_samples=1 if started else self.n_components))
        weights = self._observations().weights(sample_weight, X)
        with distributed.using(process_group, f"{type(self).__name__}.partial_fit"):
            return self._partial_fit(X, lambda reference, chunk: em.Data(self.family, X, reference, chunk,
                                                                       weights=weights))

    def _working_components(self) -> torch.Tensor | None:
        return None if self._components is None else self._layout.working(self._components)

    def _observations(self) -> Observations:
        """How this module's data become the engine's: validation in its dtype and layout."""
        return Observations(
            family=self.family, layout=self._layout, n_components=self.n_components, n_features=self.n_features,
            validate=self._validated_input, chunk_size=self._default_chunk_size, sample_size=self._sample_size(),
            seed=self.seed, generator=self._generator, device=self.device,
        )

    # --- evaluation ---------------------------------------------------------------------------
    def log_joint(self, X: Any) -> torch.Tensor:
        """``log w_k + log p(x_n | component k)`` for every model: ``(*batch_shape, N, K)``.
        Differentiable with respect to the parameters and to X."""
        self._require_parameters()
        X = self._validated_input(X, "X")
        N = X.shape[-2]
        X = self._layout.data(X)
        lp = self._emission_log_joint(X)  # (1, M, K, N)
        return lp.mT.reshape(*self.batch_shape, N, self.n_components)

    def log_prob(self, X: Any) -> torch.Tensor:
        """Per-point log-likelihood ``(*batch_shape, N)``; differentiable and pure. The density of
        the parameters held, also for models in ``failed_`` (unlike :meth:`score_samples`)."""
        return log_normalize(self.log_joint(X), dim=-1)[1]

    def forward(self, X: Any) -> torch.Tensor:
        """Same as :meth:`log_prob`."""
        return self.log_prob(X)

    def _evaluated(self, X: Any, evaluate, axis: int) -> torch.Tensor:
        """``evaluate(X)`` of an array, or of every batch of a batch source (a DataLoader or a
        callable, batches as ``fit`` takes them) joined along the points' ``axis``: memory per
        batch, not per dataset, for everything but the per-point results."""
        source = batch_source(X)
        if source is None:
            return evaluate(X)
        parts = [evaluate(unwrap_batch(raw)) for raw in source()]
        if not parts:
            raise ValueError("X (the batch source) yielded no batch")
        return torch.cat(parts, axis)

    @torch.no_grad()
    def score_samples(self, X: Any) -> torch.Tensor:
        """Per-point log-likelihood ``(*batch_shape, N)`` (no graph); NaN for models in ``failed_``.
        X may be a batch source (DataLoader) as for :meth:`fit`, as for every method below."""
        return self._reported(self._evaluated(X, self.log_prob, -1), "score_samples")

    @torch.no_grad()
    def score(self, X: Any, y: Any = None, sample_weight: Any = None) -> torch.Tensor:
        """Mean log-likelihood per point ``(*batch_shape)`` (weighted by ``sample_weight``, ``(N,)``
        or ``(*batch_shape, N)``, when given); NaN for models in ``failed_``. ``y`` is ignored."""
        log_prob = self._evaluated(X, self.log_prob, -1)
        if sample_weight is None:
            return self._reported(log_prob.mean(-1), "score")
        weights = cast(torch.Tensor, check_sample_weight(  # (given: a tensor)
            sample_weight, "sample_weight", n_points=log_prob.shape[-1], batch_shape=self.batch_shape,
            device=log_prob.device, dtype=log_prob.dtype))
        return self._reported((log_prob * weights).sum(-1) / weights.sum(-1), "score")

    @torch.no_grad()
    def predict_proba(self, X: Any) -> torch.Tensor:
        """Posterior responsibilities ``(*batch_shape, N, K)``; NaN for models in ``failed_``."""
        posteriors = self._evaluated(X, lambda batch: log_normalize(self.log_joint(batch), dim=-1)[0], -2)
        return self._reported(posteriors, "predict_proba")

    @torch.no_grad()
    def predict(self, X: Any) -> torch.Tensor:
        """Most probable component ``(*batch_shape, N)``; -1 for models in ``failed_``."""
        def labels(batch: Any) -> torch.Tensor:
            log_joint = self.log_joint(batch)
            self._finite(log_joint.amax(-1), "predict")  # an all -inf or NaN row has no argmax
            return log_joint.argmax(-1)

        return self._without_failed(self._evaluated(X, labels, -1), -1)

    @torch.no_grad()
    def bic(self, X: Any) -> torch.Tensor:
        """Bayesian information criterion per model ``(*batch_shape)``; lower is better; NaN for
        models in ``failed_``."""
        log_prob = self._evaluated(X, self.log_prob, -1)
        n_points = log_prob.shape[-1]
        return self._reported(-2 * log_prob.sum(-1) + self.n_parameters() * math.log(n_points), "bic")

    @torch.no_grad()
    def aic(self, X: Any) -> torch.Tensor:
        """Akaike information criterion per model ``(*batch_shape)``; lower is better; NaN for
        models in ``failed_``."""
        return self._reported(-2 * self._evaluated(X, self.log_prob, -1).sum(-1) + 2 * self.n_parameters(), "aic")

    @torch.no_grad()
    def impute(self, X: Any, n_draws: int | None = None, seed: int | None = None) -> torch.Tensor:
        """X with its missing entries (NaN) filled in from the model, whatever ``missing`` is.

        Without ``n_draws``: every missing entry at its conditional expectation given the row's
        observed entries, ``sum_k p(k | x_o) E[x_m | x_o, k]`` (``(*batch_shape, N, D)``). With
        ``n_draws=m``: m draws of every row from the conditional distribution (multiple
        imputation), each drawing the component from ``p(k | x_o)`` and then the missing entries
        from it given ``x_o``: ``(m, *batch_shape, N, D)``; ``seed`` as for :meth:`sample`.
        Observed entries are returned as they are.
        """
        self._require_parameters()
        if n_draws is not None:
            check_int(n_draws, "n_draws", minimum=1)
        X = self._validated_input(X, "X", missing="marginalize")
        N, D = X.shape[-2:]
        if not bool(torch.isnan(X).any()):
            X = X.expand(*self.batch_shape, N, D).clone()
            return X if n_draws is None else X.expand(n_draws, *X.shape).clone()
        rows = em.MissingRows.of(self._layout.data(X))
        params = self._working_parameters()
        marginal = self.family.marginal(rows, params.emission)
        resp = log_normalize(em.marginal_log_joint(self.latent, params, marginal.log_prob), dim=-2)[0]  # (1, M, K, N)
        if n_draws is None:
            return marginal.imputed(resp).reshape(*self.batch_shape, N, D)
        generator = self._draw_generator(seed)
        M, K = self.n_models, self.n_components
        components = torch.multinomial(resp[0].mT.reshape(M * N, K), n_draws, replacement=True, generator=generator)
        components = components.view(M, N, n_draws).permute(2, 0, 1)  # (m, M, N)
        draws = [marginal.draw(drawn.unsqueeze(0), generator) for drawn in components]  # m x (M, N, D)
        return torch.stack(draws).reshape(n_draws, *self.batch_shape, N, D)

    @torch.no_grad()
    def sample(self, n_samples: int = 1, seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``n_samples`` points per model: samples ``(*batch_shape, n, D)`` and their
        components ``(*batch_shape, n)``."""
        self._require_parameters()
        check_int(n_samples, "n_samples", minimum=1)
        generator = self._draw_generator(seed)
        M = self.n_models
        labels = torch.multinomial(self.weights.reshape(M, self.n_components), n_samples, replacement=True, generator=generator)
        theta = {name: self._layout.working(value)[0] for name, value in self.theta().items()}
        samples = self.family.sample(theta, labels, generator)
        return samples.reshape(*self.batch_shape, n_samples, -1), labels.reshape(*self.batch_shape, n_samples)

    # --- internals ---------------------------------------------------------------------------
    def _user_latent_initial(self) -> Theta:
        """``weights_init`` validated, as logits ``(*batch_shape, K)`` (empty when not given)."""
        if self.weights_init is None:
            return {}
        return {"logits": self._probabilities_logits(self.weights_init, "weights_init", (self.n_components,))}

