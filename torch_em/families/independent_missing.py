"""Families with independent features on rows with missing coordinates.

When a component's density factorises over the coordinates, ``log p(x | k) = sum_d log p_d(x_d | k)``
with ``log p_d = t_d(x_d) . eta_kd + c_kd + h_d(x_d)``, a missing coordinate simply drops out of
the density, and its sufficient statistics are replaced by the component's expectation
``E_k[t_d(x_d)]``. With the observed-coordinate mask ``O`` of a row and the family's ordinary
features ``T`` of the row (missing entries read as the family's ``missing_fill``, where
``h_d = 0``, then masked out)::

    log p(x_o | k) = (O T(x)) . eta_k + sum_d o_d c_kd + h(x_o)
    sum_n r_nk E_k[T(x_n) | x_o] = sum_n r_nk O_n T(x_n) + (sum_n r_nk (1 - o_n))[coordinate of f] E_k[T_f]

so both are GEMMs as for complete rows: no pattern grouping is needed. A family opts in by
giving :meth:`ComponentFamily.coordinate_of_statistics`, :meth:`~ComponentFamily.coordinate_log_normalisers`
and :meth:`~ComponentFamily.expected_features`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, cast

import torch

from ..missing import MissingRows
from .base import Marginal

if TYPE_CHECKING:
    from .base import ComponentFamily


class IndependentMarginal(Marginal):
    """Marginal densities of components with independent features on rows with missing entries.

    Shape:
        log_prob: (R, M, K, n); masked features: (n, F) or (M, n, F)
    """

    def __init__(self, family: "ComponentFamily", rows: MissingRows, theta: Mapping[str, torch.Tensor]):
        self.family, self.rows, self.theta = family, rows, theta
        dtype = next(iter(theta.values())).dtype
        observed = rows.observed.to(dtype)
        filled = torch.where(rows.observed, rows.X, family.missing_fill).to(dtype)
        features, base = family.features(filled, None)  # (..., n, F), (..., n) or None
        # a family with independent features has a coordinate per statistic (not None)
        self.columns = cast(torch.Tensor, family.coordinate_of_statistics(rows.X.shape[-1])).to(rows.X.device)  # (F,)
        self.missing = 1 - observed  # (..., n, D)
        self.masked = features * observed[..., self.columns]
        eta, _ = family.natural_parameters(theta, None)  # (R, M, K, F)
        constants = family.coordinate_log_normalisers(theta)  # (R, M, K, D)
        log_prob = eta @ self.masked.mT + constants @ observed.mT  # (R, M, K, n)
        # h of a missing entry read as missing_fill is 0: the base measure is that of the observed ones.
        self.log_prob = log_prob if base is None else log_prob + base.unsqueeze(-2)

    def statistics(self, resp: torch.Tensor, about: torch.Tensor | None) -> torch.Tensor:
        expected = self.family.expected_features(self.theta)  # (R, M, K, F)
        unobserved = (resp @ self.missing)[..., self.columns]  # (R, M, K, F) missing weight per feature's coordinate
        return resp @ self.masked + unobserved * expected

    def conditional_means(self) -> torch.Tensor:
        mean = self.family.mean(self.theta).unsqueeze(-2)  # (R, M, K, 1, D)
        rows = self.rows
        return torch.where(rows.observed.unsqueeze(-3), rows.X.unsqueeze(-3), mean)

    def imputed(self, resp: torch.Tensor) -> torch.Tensor:
        return self.family.impute_missing(self.theta, resp, self.rows.X, self.rows.observed)

    def draw(self, components: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        # The coordinates are independent given the component: draw it whole, keep the observed.
        theta = {name: value[0] for name, value in self.theta.items()}  # (M, K, ...)
        drawn = self.family.sample(theta, components[0], generator)  # (M, n, D)
        return torch.where(self.rows.observed, self.rows.X, drawn)
