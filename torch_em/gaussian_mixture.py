"""``GaussianMixture``: the mixture with the Gaussian family and scikit-learn's API."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch

from ._validation import check_positive
from .families.base import Theta
from .families.gaussian import Gaussian
from .mixture import Mixture
from .priors import PriorSpec


class GaussianViews:
    """scikit-learn's views of a model with Gaussian emissions (``self.family`` a
    :class:`Gaussian`, ``self.theta()`` its parameters): covariance type, ``reg_covar``, the
    initial values (on the family) and the constrained parameters."""

    family: Gaussian

    if TYPE_CHECKING:  # the model's (LatentModel.theta)
        def theta(self) -> Theta: ...

    @property
    def covariance_type(self) -> str:
        return self.family.covariance_type

    @property
    def reg_covar(self) -> float:
        return self.family.reg_covar

    @reg_covar.setter
    def reg_covar(self, value: float) -> None:
        check_positive(value, "reg_covar", allow_zero=True)
        self.family.reg_covar = float(value)

    # Initial values live on the family; these forward to it (validated at the next fit).
    @property
    def means_init(self) -> Any:
        return self.family.means_init

    @means_init.setter
    def means_init(self, value: Any) -> None:
        self.family.means_init = value

    @property
    def precisions_init(self) -> Any:
        return self.family.precisions_init

    @precisions_init.setter
    def precisions_init(self, value: Any) -> None:
        self.family.precisions_init = value

    def _gaussian_config(self) -> dict[str, Any]:
        """The Gaussian family's constructor arguments under the model's names."""
        return {"covariance_type": self.covariance_type, "reg_covar": self.reg_covar, "means_init": self.means_init,
                "precisions_init": self.precisions_init}

    @property
    def means(self) -> torch.Tensor:
        return self.theta()["loc"]

    @property
    def precisions_cholesky(self) -> torch.Tensor:
        return self.family.precision_cholesky(self.theta())

    @property
    def precisions(self) -> torch.Tensor:
        return self.family.precision(self.theta())

    @property
    def covariances(self) -> torch.Tensor:
        return self.family.covariance(self.theta())


class GaussianMixture(GaussianViews, Mixture):
    """A batch of Gaussian mixtures fitted by EM, as an ``nn.Module``.

    Arguments as :class:`torch_em.Mixture`, plus scikit-learn's ``covariance_type`` (``"full"``,
    ``"tied"``, ``"diag"``, ``"spherical"``), ``reg_covar`` (added to the covariance diagonals),
    ``means_init`` ``(K, D)`` and ``precisions_init`` (full ``(K, D, D)``, tied ``(D, D)``, diag
    ``(K, D)``, spherical ``(K,)``); initial arrays may carry ``batch_shape`` in front.

    Shape:
        means ``(*b, K, D)``; covariances, precisions and precisions_cholesky have scikit-learn's
        per-model shapes (full ``(*b, K, D, D)``, tied ``(*b, D, D)``, diag ``(*b, K, D)``,
        spherical ``(*b, K)``) with ``precisions = P P^T`` for the upper-triangular ``P``.
    """

    family: Gaussian

    def __init__(
        self,
        n_components: int,
        n_features: int | None = None,
        *,
        covariance_type: str = "full",
        batch_shape: Sequence[int] = (),
        tol: float = 1e-3,
        reg_covar: float = 1e-6,
        max_iter: int = 100,
        n_init: int = 1,
        init_params: str = "k-means++",
        weights_init: Any = None,
        means_init: Any = None,
        precisions_init: Any = None,
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
        family = Gaussian(covariance_type, reg_covar, means_init=means_init, precisions_init=precisions_init)
        super().__init__(
            family, n_components, n_features, batch_shape=batch_shape, tol=tol, max_iter=max_iter,
            n_init=n_init, init_params=init_params, weights_init=weights_init, seed=seed,
            chunk_size=chunk_size, learning_decay=learning_decay, learning_offset=learning_offset,
            step_size=step_size, averaging_start=averaging_start, prior_count=prior_count, prior=prior, accelerate=accelerate,
            annealing=annealing, em_parameters=em_parameters,
            warm_start=warm_start, on_error=on_error, missing=missing, device=device, dtype=dtype,
        )

    def _config(self) -> dict[str, Any]:
        config = super()._config()
        del config["family"]
        return {**config, **self._gaussian_config()}

    def extra_repr(self) -> str:
        return super().extra_repr() + f", covariance_type={self.covariance_type!r}"
