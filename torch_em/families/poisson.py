"""Poisson components: D independent count features per component.

Unconstrained parameter (``K`` components, ``D`` features, batch dims in front):

    log_rates   (*b, K, D)   log of the Poisson rates (means)

Exponential-family form::

    log p(x | lambda) = sum_d x_d log lambda_d - lambda_d - log(x_d!)
    T = x,   eta = log lambda,   c = -sum_d lambda_d,   h(x) = -sum_d lgamma(x_d + 1)

The M-step rate (the expected mean count) is clamped below at the dtype's machine epsilon, so
a feature that is always 0 within a component costs ``x log(eps)`` rather than ``-inf`` for a
point with count ``x``. The initial clustering runs k-means on the Anscombe transform
``2 sqrt(x + 3/8)``, under which Poisson counts have variance close to 1 whatever their rate.
"""
from __future__ import annotations

from typing import Mapping

import torch

from .._validation import check_magnitude, describe_bad_values
from ._rates import RateFamily, clamped_log
from .base import Theta, per_statistic


class Poisson(RateFamily):
    """Components that are products of D independent Poisson distributions.

    Args:
        rates_init: initial rates ``(K, D)`` or ``(*batch_shape, K, D)``, non-negative (clamped
            below at eps).

    Shape:
        X: ``(N, D)`` or ``(*batch_shape, N, D)`` of non-negative integer counts.
        parameters: ``log_rates (*batch_shape, K, D)``; :meth:`rates` gives the rates.
    """

    zero_rates_allowed = True

    # --- data --------------------------------------------------------------------------------
    def check_domain(self, X: torch.Tensor, name: str) -> None:
        bad = (X < 0) | (X != X.round())
        if bool(bad.any()):
            raise ValueError(
                f"{name} must hold non-negative integer counts for Poisson components, got {describe_bad_values(X, bad)}"
            )
        check_magnitude(X, name, power=1, what="the sums of counts and their log-factorials")

    def embedding(self, X: torch.Tensor, reference: torch.Tensor | None) -> torch.Tensor:
        return 2 * (X + 0.375).sqrt()  # Anscombe: variance ~1 for any rate

    def features(self, X: torch.Tensor, reference: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        return X, -torch.lgamma(X + 1).sum(-1)

    # --- constrained views -------------------------------------------------------------------
    def mean(self, theta: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Component means ``(*batch, K, D)`` (the rates)."""
        return self.rates(theta)

    # --- EM ----------------------------------------------------------------------------------
    def natural_parameters(self, theta, reference) -> tuple[torch.Tensor, torch.Tensor]:
        log_rates = theta["log_rates"]  # (*b, K, D)
        return log_rates, -log_rates.exp().sum(-1)

    def m_step(self, counts, stats, reference) -> tuple[Theta, torch.Tensor]:
        log_rates = clamped_log(stats / per_statistic(counts, stats))  # (*b, K, D)
        return {"log_rates": log_rates}, torch.isfinite(log_rates).all(-1)

    def coordinate_of_statistics(self, n_features: int) -> torch.Tensor:
        return torch.arange(n_features)

    def coordinate_log_normalisers(self, theta) -> torch.Tensor:
        return -theta["log_rates"].exp()

    def expected_features(self, theta) -> torch.Tensor:
        return theta["log_rates"].exp()

    def invalid_component_advice(self) -> str:
        return "its rates are not finite; check the data (counts too large for the dtype?) or use float64"

    def sample(self, theta, labels, generator) -> torch.Tensor:
        rates = self.rates(theta)  # (*b, K, D)
        index = labels.unsqueeze(-1).expand(*labels.shape, rates.shape[-1])
        return torch.poisson(rates.gather(-2, index), generator=generator)  # (*b, n, D)

