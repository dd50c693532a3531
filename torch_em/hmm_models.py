"""hmmlearn's model classes as :class:`torch_em.HMM` s: ``GaussianHMM``, ``GMMHMM``,
``CategoricalHMM`` and ``PoissonHMM``, with hmmlearn's argument names and meanings
(``n_components`` is the number of states) and its parameters as properties without the
trailing underscore (``startprob``, ``transmat``, ``means``, ``covariances``, ``emissionprob``,
``lambdas``, ``weights``). Every other option is :class:`torch_em.HMM`'s, forwarded.
"""
from __future__ import annotations

from typing import Any

import torch

from ._validation import as_float_tensor
from .families.categorical import Categorical
from .families.gaussian import Gaussian
from .families.poisson import Poisson
from .gaussian_mixture import GaussianViews
from .hmm import HMM


class GaussianHMM(GaussianViews, HMM):
    """An HMM with one Gaussian per state (hmmlearn's ``GaussianHMM``).

    ``covariance_type`` ``"diag"`` (default, as hmmlearn), ``"full"``, ``"tied"`` or
    ``"spherical"``; ``reg_covar`` is added to the covariance diagonals in every M-step (hmmlearn
    instead adds ``covars_prior`` = 1e-2 to the scatter by default, and its ``min_covar`` only
    enters its own initialisation: ``reg_covar=0`` with hmmlearn's ``covars_prior=0`` give the same
    M-step); ``means_init (K, D)`` and ``precisions_init`` as for :class:`torch_em.GaussianMixture`,
    batch dims allowed.
    """

    family: Gaussian

    def __init__(self, n_components: int = 1, covariance_type: str = "diag", n_features: int | None = None, *,
                 reg_covar: float = 1e-6, means_init: Any = None, precisions_init: Any = None, **options: Any) -> None:
        family = Gaussian(covariance_type, reg_covar, means_init=means_init, precisions_init=precisions_init)
        super().__init__(n_components, family, n_features, **options)

    def _config(self) -> dict[str, Any]:
        return {**_hmm_options(super()._config(), self.n_states), **self._gaussian_config()}

    def extra_repr(self) -> str:
        return super().extra_repr() + f", covariance_type={self.covariance_type!r}"


def _hmm_options(config: dict[str, Any], n_states: int) -> dict[str, Any]:
    """:meth:`HMM._config` as the keyword arguments of a class below that names the number of
    states ``n_components`` and builds its own family."""
    options = {key: value for key, value in config.items() if key not in ("n_states", "family")}
    return {"n_components": n_states, **options}


class GMMHMM(GaussianViews, HMM):
    """An HMM whose states emit from a mixture of ``n_mix`` Gaussians (hmmlearn's ``GMMHMM``).

    ``covariance_type`` ``"diag"`` (default), ``"full"`` or ``"spherical"`` (a covariance per
    mixture component). Initial values per state and component: ``weights_init (K, n_mix)``,
    ``means_init (K, n_mix, D)``, ``precisions_init`` full ``(K, n_mix, D, D)``, diag
    ``(K, n_mix, D)``, spherical ``(K, n_mix)``; batch dims allowed in front.

    Shape:
        weights ``(*b, K, n_mix)``; means ``(*b, K, n_mix, D)``; covariances full
        ``(*b, K, n_mix, D, D)``, diag ``(*b, K, n_mix, D)``, spherical ``(*b, K, n_mix)``.
    """

    family: Gaussian

    def __init__(self, n_components: int = 1, n_mix: int = 1, covariance_type: str = "diag",
                 n_features: int | None = None, *, reg_covar: float = 1e-6, weights_init: Any = None,
                 means_init: Any = None, precisions_init: Any = None, **options: Any) -> None:
        if covariance_type == "tied":
            raise ValueError("GMMHMM supports covariance_type 'full', 'diag' or 'spherical', got 'tied' (a covariance "
                             "shared by every component of every state is GaussianHMM's or HMM(family=Gaussian('tied'))'s)")
        per_component = {"full": 2, "diag": 1, "spherical": 0}.get(covariance_type, 0)
        family = Gaussian(covariance_type, reg_covar,
                          means_init=_components_flattened(means_init, "means_init", 1),
                          precisions_init=_components_flattened(precisions_init, "precisions_init", per_component))
        super().__init__(n_components, family, n_features, n_mix=n_mix, mix_weights_init=weights_init, **options)

    def _config(self) -> dict[str, Any]:
        config = _hmm_options(super()._config(), self.n_states)
        config["weights_init"] = config.pop("mix_weights_init")
        return {**config, **self._gaussian_config(),
                "means_init": self.means_init, "precisions_init": self.precisions_init}

    # The family holds initial values per component (..., K * n_mix, *event); users see and set
    # them per state and component (..., K, n_mix, *event).
    @property
    def means_init(self) -> Any:
        return self._per_state_initial(self.family.means_init, 1)

    @means_init.setter
    def means_init(self, value: Any) -> None:
        self.family.means_init = _components_flattened(value, "means_init", 1)

    @property
    def precisions_init(self) -> Any:
        return self._per_state_initial(self.family.precisions_init, self._n_covariance_axes)

    @precisions_init.setter
    def precisions_init(self, value: Any) -> None:
        self.family.precisions_init = _components_flattened(value, "precisions_init", self._n_covariance_axes)

    @property
    def _n_covariance_axes(self) -> int:
        """Event axes of one component's covariance (full 2, diag 1, spherical 0)."""
        return {"full": 2, "diag": 1, "spherical": 0}[self.covariance_type]

    def _per_state_initial(self, value: Any, n_event: int) -> Any:
        """A family's initial array (..., K * n_mix, *event) as the user's (..., K, n_mix, *event)."""
        return None if value is None else self._per_state(torch.as_tensor(value), n_event)

    @property
    def weights(self) -> torch.Tensor:
        """Within-state mixture weights ``(*batch_shape, K, n_mix)``."""
        return self.mix_weights

    @property
    def means(self) -> torch.Tensor:
        return self._per_state(super().means, 1)

    @property
    def covariances(self) -> torch.Tensor:
        return self._per_state(super().covariances, self._n_covariance_axes)

    @property
    def precisions(self) -> torch.Tensor:
        return self._per_state(super().precisions, self._n_covariance_axes)

    def _per_state(self, values: torch.Tensor, n_event: int) -> torch.Tensor:
        """(*b, K * n_mix, *event) -> (*b, K, n_mix, *event) with ``n_event`` event axes."""
        axis = values.dim() - n_event - 1
        return values.unflatten(axis, (self.n_states, self.n_mix))


def _components_flattened(value: Any, name: str, n_event: int) -> Any:
    """A per-(state, component) initial array (..., K, n_mix, *event) as the family's
    (..., K * n_mix, *event); None stays None."""
    if value is None:
        return None
    tensor = as_float_tensor(value, name, device=None, dtype=None)
    if tensor.dim() < n_event + 2:
        raise ValueError(f"{name} must have the axes (K, n_mix) before its {n_event} event axes, got shape "
                         f"{tuple(tensor.shape)}")
    axis = tensor.dim() - n_event - 2
    return tensor.flatten(axis, axis + 1)


class CategoricalHMM(HMM):
    """An HMM emitting one symbol ``0 .. n_features - 1`` per step (hmmlearn's
    ``CategoricalHMM``). X holds the codes: ``(S, T)`` / ``(S, T, 1)`` padded or ``(N,)`` /
    ``(N, 1)`` concatenated. ``emissionprob_init (K, n_features)`` (hmmlearn's ``emissionprob_``)."""

    def __init__(self, n_components: int = 1, n_features: int | None = None, *, emissionprob_init: Any = None,
                 **options: Any) -> None:
        if n_features is None:
            raise ValueError("CategoricalHMM needs n_features, the number of symbols (codes 0 .. n_features - 1)")
        probs = None if emissionprob_init is None else as_float_tensor(
            emissionprob_init, "emissionprob_init", device=None, dtype=None).unsqueeze(-2)  # (..., K, 1, C)
        super().__init__(n_components, Categorical(n_features, probs_init=probs), 1, **options)
        self.n_symbols = int(n_features)

    family: Categorical

    def _config(self) -> dict[str, Any]:
        probs = self.family.probs_init
        return {**_hmm_options(super()._config(), self.n_states), "n_features": self.n_symbols,
                "emissionprob_init": None if probs is None else probs[..., 0, :]}

    @property
    def emissionprob(self) -> torch.Tensor:
        """Symbol probabilities per state ``(*batch_shape, K, n_features)``."""
        return self.family.probs(self.theta())[..., 0, :]


class PoissonHMM(HMM):
    """An HMM with D independent Poisson counts per step (hmmlearn's ``PoissonHMM``);
    ``lambdas_init (K, D)`` (hmmlearn's ``lambdas_``)."""

    def __init__(self, n_components: int = 1, n_features: int | None = None, *, lambdas_init: Any = None,
                 **options: Any) -> None:
        super().__init__(n_components, Poisson(rates_init=lambdas_init), n_features, **options)

    family: Poisson

    def _config(self) -> dict[str, Any]:
        return {**_hmm_options(super()._config(), self.n_states), "lambdas_init": self.family.rates_init}

    @property
    def lambdas(self) -> torch.Tensor:
        """Rates per state ``(*batch_shape, K, D)``."""
        return self.family.rates(self.theta())
