"""Parameter layout shared by families with one positive rate per component and feature."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from .._validation import check_positive_tensor, initial_tensor
from .base import ComponentFamily, Theta, probability_bound


class RateFamily(ComponentFamily):
    """Components parametrised by ``log_rates (*b, K, D)``; ``rates_init`` (K, D) or with batch
    dims. Subclasses supply the data model (features, natural parameters, M-step, sampling)."""

    #: Whether ``rates_init`` may contain zeros (they are clamped up to the dtype's eps).
    zero_rates_allowed = False

    def __init__(self, *, rates_init: Any = None) -> None:
        self.rates_init = rates_init

    def event_shapes(self, n_components: int, n_features: int) -> dict[str, tuple[int, ...]]:
        return {"log_rates": (n_components, n_features)}

    def n_free_parameters(self, n_components: int, n_features: int) -> int:
        return n_components * n_features

    def n_statistics(self, n_features: int) -> int:
        return n_features

    def default_parameters(self, batch_shape, n_components, n_features, generator, device, dtype) -> Theta:
        # Rates spread around 1 (log-rates ~ N(0, 0.5^2)).
        shape = (*batch_shape, n_components, n_features)
        return {"log_rates": 0.5 * torch.randn(shape, generator=generator, device=device, dtype=dtype)}

    def user_initial_parameters(self, batch_shape, n_components, n_features, device, dtype) -> Theta:
        if self.rates_init is None:
            return {}
        rates = initial_tensor(self.rates_init, "rates_init", (n_components, n_features), batch_shape, device, dtype)
        check_positive_tensor(rates, "rates_init", allow_zero=self.zero_rates_allowed)
        return {"log_rates": clamped_log(rates)}

    def rates(self, theta: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Rates ``(*batch, K, D)``."""
        return theta["log_rates"].exp()


def clamped_log(rates: torch.Tensor) -> torch.Tensor:
    """log of rates clamped below at the dtype's eps (never -inf)."""
    return rates.clamp_min(probability_bound(rates.dtype)).log()
