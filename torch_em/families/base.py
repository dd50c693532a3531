"""The protocol every component family implements.

Every family here is an exponential family, so a component's log-density is linear in a
sufficient-statistic vector ``T(x)`` of length F::

    log p(x | theta_k) = T(x) . eta_k + c_k + h(x)

with natural parameters ``eta_k``, log-normaliser term ``c_k`` and base measure ``h(x)``. The
mixture (``torch_em.em``) then evaluates all components of all models with one GEMM, and the
E-step statistics are one more GEMM: ``S = resp^T @ T(X)``. A family only describes:

    T, h    = features(X, reference)            # (..., n, F), (..., n) or None: data transform
    eta, c  = natural_parameters(theta, reference)   # (*batch, K, F), (*batch, K): differentiable
    theta   = m_step(counts, S, reference)      # closed-form maximiser from (*batch, K) and (*batch, K, F)

Statistics are sums, so full-batch, chunked, streaming and distributed EM all reuse them.
``reference`` is an optional point (the data mean for Gaussians) about which features and
statistics are taken, which keeps second moments well conditioned; it has shape ``(D,)`` or
``(M, 1, D)`` so that it broadcasts against both data ``(..., n, D)`` and parameters
``(R, M, K, D)``; the M-step may also get one reference point per component, ``(R, M, K, D)``,
for components whose statistics were taken about their own (see :meth:`expansion_error`).
Families that need none return ``None`` from :meth:`reference`.

``theta`` is a dictionary of unconstrained tensors shaped ``(*batch, *event_shape)``: the same
tensors are the module's ``nn.Parameter`` s, so autograd and EM share one storage.
"""
from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Mapping

import torch

Theta = dict[str, torch.Tensor]


def probability_bound(dtype: torch.dtype) -> float:
    """Probabilities are kept in ``[bound, 1 - bound]`` (and rates above a bound-based floor)."""
    return torch.finfo(dtype).eps


def per_statistic(counts: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    """Counts for dividing ``stats`` (*b, K, F): counts (*b, K) as (*b, K, 1), or counts per
    statistic (*b, K, F) as they are (a prior's pseudo-counts differ between statistics, e.g. a
    Gaussian's mean and second moments: :mod:`torch_em.priors`)."""
    return counts if counts.dim() == stats.dim() else counts.unsqueeze(-1)


def average_features(counts: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
    """The data's average feature vector (*b, 1, F) from statistics counts (*b, K), sums (*b, K, F)."""
    return sums.sum(-2, keepdim=True) / counts.sum(-1, keepdim=True).unsqueeze(-1)


class IllConditionedError(ValueError):
    """An M-step produced a component whose parameters are not valid (e.g. a covariance that is
    not positive definite). The message names the model and component and the remedies."""


class NotFittedError(ValueError, AttributeError, RuntimeError):
    """A model was used before it has parameters (call ``fit`` first, or build it with
    ``n_features``). A ValueError and an AttributeError as scikit-learn's ``NotFittedError``
    (so ``hasattr(model, "means")`` is False before a fit), and a RuntimeError as earlier releases
    raised for this."""


class Marginal:
    """The components of a working batch (R, M, K) on rows with missing entries
    (:class:`torch_em.missing.MissingRows`): each component's density of a row's observed
    coordinates (the missing ones integrated out) and the expectations given them that EM and
    imputation need. Made by :meth:`ComponentFamily.marginal`.

    log_prob: (R, M, K, n) ``log p(x_o | component)``; rows: the rows it was made for.
    """

    log_prob: torch.Tensor
    rows: Any

    def statistics(self, resp: torch.Tensor, about: torch.Tensor | None) -> torch.Tensor:
        """``sum_n resp[r, m, k, n] E[T(x_n) | x_o, component k]``: (R, M, K, F) from resp
        (R, M, K, n), taken about the points ``about`` (R, M, K, D) (a family with a reference
        point; None: the origin), or without one."""
        raise NotImplementedError

    def conditional_means(self) -> torch.Tensor:
        """``E[x_n | x_o, component k]`` (R, M, K, n, D), the observed coordinates as they are."""
        raise NotImplementedError

    def imputed(self, resp: torch.Tensor) -> torch.Tensor:
        """The rows (M, n, D) of a working batch (1, M) with every missing entry filled in from
        the components' posteriors ``resp`` (1, M, K, n) given the observed ones: by default the
        conditional expectation ``sum_k resp_k E[x_m | x_o, k]``."""
        means = (resp.unsqueeze(-1) * self.conditional_means()).sum(2)[0]  # (M, n, D)
        return torch.where(self.rows.observed, self.rows.X, means)

    def draw(self, components: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One draw of every row (M, n, D) of a working batch (1, M), the missing coordinates
        from their conditional distribution given the observed ones under the row's component
        ``components`` (1, M, n); the observed coordinates as they are."""
        raise NotImplementedError


class ComponentFamily:
    """K components of one exponential family for a batch of independent models."""

    #: Whether boolean data are in the family's support (read as 0/1).
    accepts_bool: bool = False
    #: A component with fewer expected points than this is re-seeded by the mixture.
    min_count: float = 1e-3
    #: Whether :meth:`reference` returns a point (statistics taken about a reference point).
    uses_reference: bool = False
    #: Whether components can be evaluated and summarised about their own reference point
    #: (:meth:`expansion_error` and the methods after it).
    has_own_reference: bool = False
    #: Whether it has a :meth:`lifted_m_step`: the last resort for components that come out
    #: invalid by their own rounding in a precision below float64 (a Gaussian's float32
    #: covariance that float64 finds indefinite), after statistics about their own means.
    lifts_rounding: bool = False

    def config(self) -> dict[str, Any]:
        """The constructor's arguments that rebuild this family, ``type(self)(**config())``
        (what a saved model holds, :mod:`torch_em.serialization`). Default: the attributes named
        like the constructor's parameters; a family that stores them otherwise overrides this."""
        parameters = inspect.signature(type(self).__init__).parameters.values()
        named = [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        return {name: getattr(self, name) for name in named[1:]}  # past self

    # --- parameter layout -------------------------------------------------------------------
    def event_shapes(self, n_components: int, n_features: int) -> dict[str, tuple[int, ...]]:
        """Per-model shape of every unconstrained parameter. The names must not depend on the
        sizes: the mixture reads them from ``event_shapes(1, 1)`` at construction."""
        raise NotImplementedError

    def n_free_parameters(self, n_components: int, n_features: int) -> int:
        """Number of free parameters of the K components (for BIC/AIC)."""
        raise NotImplementedError

    def default_parameters(
        self, batch_shape: tuple[int, ...], n_components: int, n_features: int,
        generator: torch.Generator, device: torch.device, dtype: torch.dtype,
    ) -> Theta:
        """Parameters for a module built before any fit (random, but not degenerate)."""
        raise NotImplementedError

    def user_initial_parameters(
        self, batch_shape: tuple[int, ...], n_components: int, n_features: int,
        device: torch.device, dtype: torch.dtype,
    ) -> Theta:
        """Validated user-supplied initial parameters (any subset of theta); raises ValueError.
        Each tensor has the batch dimensions in front, broadcast to ``batch_shape``."""
        return {}

    def initial_centres(self, batch_shape: tuple[int, ...], n_components: int, n_features: int,
                        device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        """User-supplied component locations ``(*batch, K, D)`` that seed the initial assignment
        of points (e.g. ``means_init``), or None."""
        return None

    def n_statistics(self, n_features: int) -> int:
        """F, the length of the sufficient-statistic vector T(x) for D features."""
        raise NotImplementedError

    def n_features_of(self, theta: Mapping[str, torch.Tensor]) -> int:
        """D, read off parameters (by default the last dimension of the first one)."""
        return next(iter(theta.values())).shape[-1]

    # --- data ------------------------------------------------------------------------------
    def check_domain(self, X: torch.Tensor, name: str) -> None:
        """Raise ValueError if X is outside the family's support (finiteness is already checked)."""

    # --- missing coordinates (torch_em.missing) ----------------------------------------------
    #: Families with independent features: a value in the support where every coordinate's base
    #: measure is 0, which a missing entry is read as before its features are masked out.
    missing_fill: float = 0.0

    if TYPE_CHECKING:  # defined by the families with independent features that have a mean
        def mean(self, theta: Mapping[str, torch.Tensor]) -> torch.Tensor: ...

    def check_missing(self, name: str) -> None:
        """Raise ValueError unless rows of this family may have missing coordinates (NaN)
        marginalised (:meth:`marginal`). Default: families with independent features
        (:meth:`coordinate_of_statistics`) may."""
        if self.coordinate_of_statistics(1) is None:
            raise ValueError(f"{name} has missing values (NaN), which {type(self).__name__} components cannot "
                             "marginalise; remove or impute them")

    def marginal(self, rows: Any, theta: Mapping[str, torch.Tensor], reference: torch.Tensor | None = None) -> Marginal:
        """The components ``theta`` (R, M, K, ...) on rows with missing entries (a
        :class:`torch_em.missing.MissingRows`): their marginal densities and conditional
        expectations (:class:`Marginal`). ``reference``: the shared reference point of a fit,
        about which the family may expand the densities as it does for complete rows (then
        :meth:`Marginal.statistics` are about it); None: evaluated directly. Default: the
        independent-features marginal (:mod:`torch_em.families.independent_missing`)."""
        from .independent_missing import IndependentMarginal  # (it builds on this module)

        return IndependentMarginal(self, rows, theta)

    def coordinate_of_statistics(self, n_features: int) -> torch.Tensor | None:
        """For a family whose components have independent features: the coordinate (F,) each
        sufficient statistic depends on; None (the default) for other families."""
        return None

    def coordinate_log_normalisers(self, theta: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Independent features: the per-coordinate terms ``c_kd`` (*batch, K, D) of the
        log-normaliser, ``c_k = sum_d c_kd`` (:meth:`natural_parameters`' constant)."""
        raise NotImplementedError

    def expected_features(self, theta: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Independent features: ``E_k[T(x)]`` (*batch, K, F) under every component."""
        raise NotImplementedError

    def impute_missing(self, theta: Mapping[str, torch.Tensor], resp: torch.Tensor, X: torch.Tensor,
                       observed: torch.Tensor) -> torch.Tensor:
        """Independent features: rows X (n, D) or (M, n, D) with their missing entries (where not
        ``observed``) at the posterior-weighted component means (``resp`` (1, M, K, n),
        ``theta`` (1, M, K, ...)): (M, n, D). A family whose mean is not a value of its support
        (categories) overrides this."""
        means = (resp.unsqueeze(-1) * self.mean(theta).unsqueeze(-2)).sum(2)[0]  # (M, n, D)
        return torch.where(observed, X, means)

    def reference(self, X: torch.Tensor) -> torch.Tensor | None:
        """Point about which statistics are taken, ``X.mean(-2, keepdim=True)``, or None."""
        return None

    def parameter_reference(self, theta: Mapping[str, torch.Tensor], weights: torch.Tensor) -> torch.Tensor | None:
        """The reference point implied by the parameters (*batch, K, ...) and mixing weights
        (*batch, K), shaped (*batch, 1, D) like :meth:`reference` of data (e.g. the mixture
        mean, which equals the data mean at an EM fixed point), or None. Evaluation uses it, so a
        result depends on the model alone, not on the other rows evaluated with it."""
        return None

    def embedding(self, X: torch.Tensor, reference: torch.Tensor | None) -> torch.Tensor:
        """Map of data (..., n, D) -> (..., n, E) in which the initialisation clusters with
        Euclidean k-means (e.g. one-hot codes for categorical data). Default: X - reference. It must
        be pointwise when the family supplies ``initial_centres`` (they are mapped with it too)."""
        return X if reference is None else X - reference

    # --- the EM functions ------------------------------------------------------------------
    def features(self, X: torch.Tensor, reference: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Sufficient statistics ``T(x)`` (..., n, F) and base measure ``h(x)`` (..., n) or None."""
        raise NotImplementedError

    def natural_parameters(
        self, theta: Mapping[str, torch.Tensor], reference: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``eta`` (*batch, K, F) and ``c`` (*batch, K) such that log p = T(x).eta + c + h(x)."""
        raise NotImplementedError

    def m_step(
        self, counts: torch.Tensor, stats: torch.Tensor, reference: torch.Tensor | None
    ) -> tuple[Theta, torch.Tensor]:
        """Closed-form maximiser. ``counts`` (*batch, K), or (*batch, K, F) per statistic (with a
        prior's pseudo-counts, :func:`per_statistic`). Returns theta and a (*batch, K) bool mask of
        components whose parameters are valid (False: e.g. a failed Cholesky factorisation)."""
        raise NotImplementedError

    def lifted_m_step(
        self, counts: torch.Tensor, stats: torch.Tensor, reference: torch.Tensor | None
    ) -> tuple[Theta, torch.Tensor]:
        """:meth:`m_step` with components that are invalid by their own rounding raised by it (only
        for a family that :attr:`lifts_rounding`)."""
        raise NotImplementedError

    def conditional_m_step(
        self, counts: torch.Tensor, stats: torch.Tensor, reference: torch.Tensor | None, fixed: Mapping[str, torch.Tensor]
    ) -> tuple[Theta, torch.Tensor]:
        """The M-step of the parameters not in ``fixed`` with those in ``fixed`` held at their
        values (broadcastable to theta): an ECM step, which never decreases the likelihood either.

        Default: the full M-step with the fixed parameters put back, which is exact when the
        family has one parameter (fixing it or not is all or nothing). Families with coupled
        parameters override this and :meth:`supports_fixing`.
        """
        theta, valid = self.m_step(counts, stats, reference)
        theta.update({name: value.expand_as(theta[name]) for name, value in fixed.items()})
        return theta, valid

    def supports_fixing(self, names: set[str]) -> bool:
        """Whether :meth:`conditional_m_step` can hold exactly ``names`` (a subset of the family's
        parameter names) fixed while it updates the others."""
        return len(names) == 0 or names == set(self.event_shapes(1, 1))

    def variational_bound(self, theta: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """For a family whose parameters have a variational distribution (variational Bayes):
        its part (*batch) of the lower bound EM monitors, from the parameters of an M-step
        (see :meth:`torch_em.latent.LatentStructure.variational_bound`). None (the default):
        maximum likelihood."""
        return None

    def select_models(self, models: torch.Tensor) -> "ComponentFamily":
        """The family for the models ``models`` (A,) of its batch only, in that order: itself,
        unless it holds hyperparameters per model (see :meth:`torch_em.em.EMMap.models`)."""
        return self

    # --- components summarised about their own reference point ----------------------------
    def expansion_error(
        self, theta: Mapping[str, torch.Tensor], reference: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Estimated rounding errors (nats, (*batch, K) each) of a component's log-density near
        its mode when expanded about the shared ``reference`` (``T(x).eta + c``) and when evaluated
        directly (:meth:`direct_log_prob`). Where the first is large (e.g. a Gaussian narrow or far
        from ``reference``: the expanded quadratic form cancels), the engine evaluates the component
        directly and takes its statistics about :meth:`own_reference` (``torch_em.em.OwnReference``).
        None (the default): no such components (families without a reference point)."""
        return None

    def own_reference(self, theta: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Each component's own reference point (*batch, K, D) (e.g. a Gaussian's mean)."""
        raise NotImplementedError

    def direct_log_prob(self, offsets: torch.Tensor, theta: Mapping[str, torch.Tensor], index: torch.Tensor) -> torch.Tensor:
        """``log p(x | component)`` (G, n) of selected components, computed from the offsets of the
        points from each one's own reference point, ``offsets = x - own_reference`` (G, n, D), with
        no expansion about a shared point. ``theta`` is in the working layout (R, M, K, ...) and
        ``index`` (G,) holds the selected components' flat positions in R * M * K."""
        raise NotImplementedError

    def own_reference_statistics(self, offsets: torch.Tensor, resp: torch.Tensor) -> torch.Tensor:
        """``sum_n resp[g, n] T(offsets[g, n])`` (G, F): statistics about each component's own
        reference point from offsets (G, n, D) and responsibilities (G, n)."""
        return (resp.unsqueeze(-2) @ self.features(offsets, None)[0]).squeeze(-2)

    def invalid_component_advice(self) -> str:
        """What a user can do when :meth:`m_step` reports an invalid component."""
        return "use float64 or rescale the data"

    def reseed_statistics(
        self, point_features: torch.Tensor, counts: torch.Tensor, sums: torch.Tensor, empty: torch.Tensor
    ) -> torch.Tensor:
        """Statistics of one pseudo-point that replace those of an empty component.

        point_features (*b, K, F): features of the data point chosen for each component (the
        worst explained ones); counts (*b, K), sums (*b, K, F): the current statistics;
        empty (*b, K): which components are being replaced.

        Default: halfway between the point and the average features of the data, so the new
        component sits near that point without pinning probabilities or rates at their clamps.
        """
        return 0.5 * (point_features + average_features(counts, sums))

    def sample(self, theta: Mapping[str, torch.Tensor], labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Draw one point per label; labels (*batch, n) -> samples (*batch, n, D)."""
        raise NotImplementedError
