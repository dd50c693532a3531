"""Exponential components: D independent non-negative features per component.

Unconstrained parameter (``K`` components, ``D`` features, batch dims in front):

    log_rates   (*b, K, D)   log of the rates (inverse means)

Exponential-family form::

    log p(x | lambda) = sum_d log lambda_d - lambda_d x_d
    T = x,   eta = -lambda,   c = sum_d log lambda_d,   h = 0

The M-step rate is ``1 / mean``; the mean is floored at ``eps`` times the data's overall mean of
that feature (and at the smallest normal number), so a component that collapses onto zeros gets
a large but finite rate. The initial clustering runs k-means on ``log(1 + x / (0.01 m))`` with
``m`` the feature's data mean: on a log scale every exponential component has the same spread
(the family is a scale family), and the offset keeps zeros finite.
"""
from __future__ import annotations

from typing import Mapping

import torch

from .._validation import check_magnitude, describe_bad_values
from ._rates import RateFamily
from .base import Theta, per_statistic, probability_bound


class Exponential(RateFamily):
    """Components that are products of D independent exponential distributions.

    Args:
        rates_init: initial rates ``(K, D)`` or ``(*batch_shape, K, D)``, positive.

    Shape:
        X: ``(N, D)`` or ``(*batch_shape, N, D)`` of non-negative reals.
        parameters: ``log_rates (*batch_shape, K, D)``; :meth:`rates` gives the rates.
    """

    # --- data --------------------------------------------------------------------------------
    def check_domain(self, X: torch.Tensor, name: str) -> None:
        bad = X < 0
        if bool(bad.any()):
            raise ValueError(
                f"{name} must be non-negative for Exponential components, got {describe_bad_values(X, bad)}"
            )
        check_magnitude(X, name, power=1, what="the sums")

    def embedding(self, X: torch.Tensor, reference: torch.Tensor | None) -> torch.Tensor:
        # Not pointwise (it uses the data mean), which is fine: this family has no initial_centres.
        scale = 0.01 * X.mean(-2, keepdim=True).clamp_min(torch.finfo(X.dtype).tiny)
        return (X / scale).log1p()

    def features(self, X: torch.Tensor, reference: torch.Tensor | None) -> tuple[torch.Tensor, None]:
        return X, None

    # --- constrained views -------------------------------------------------------------------
    def mean(self, theta: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Component means ``1 / rate``, ``(*batch, K, D)``."""
        return (-theta["log_rates"]).exp()

    # --- EM ----------------------------------------------------------------------------------
    def natural_parameters(self, theta, reference) -> tuple[torch.Tensor, torch.Tensor]:
        log_rates = theta["log_rates"]  # (*b, K, D)
        return -log_rates.exp(), log_rates.sum(-1)

    def m_step(self, counts, stats, reference) -> tuple[Theta, torch.Tensor]:
        counts = per_statistic(counts, stats)
        means = stats / counts  # (*b, K, D)
        overall = stats.sum(-2, keepdim=True) / counts.sum(-2, keepdim=True)  # (*b, 1, D)
        floor = (probability_bound(stats.dtype) * overall).clamp_min(torch.finfo(stats.dtype).tiny)
        log_rates = -torch.maximum(means, floor).log()
        return {"log_rates": log_rates}, torch.isfinite(log_rates).all(-1)

    def coordinate_of_statistics(self, n_features: int) -> torch.Tensor:
        return torch.arange(n_features)

    def coordinate_log_normalisers(self, theta) -> torch.Tensor:
        return theta["log_rates"]

    def expected_features(self, theta) -> torch.Tensor:
        return self.mean(theta)

    def invalid_component_advice(self) -> str:
        return "its rates are not finite; check the data or use float64"

    def sample(self, theta, labels, generator) -> torch.Tensor:
        means = self.mean(theta)  # (*b, K, D)
        index = labels.unsqueeze(-1).expand(*labels.shape, means.shape[-1])
        chosen = means.gather(-2, index)  # (*b, n, D)
        return torch.empty_like(chosen).exponential_(generator=generator) * chosen
