"""Bernoulli components: D independent binary features per component (e.g. binarised images).

Unconstrained parameter (``K`` components, ``D`` features, batch dims in front):

    logit_probs   (*b, K, D)   log-odds ``log(p / (1 - p))`` of a one in each feature

Exponential-family form::

    log p(x | p) = sum_d x_d log p_d + (1 - x_d) log(1 - p_d)
    T = x,   eta = logit p,   c = sum_d log(1 - p_d) = -sum_d softplus(logit p_d),   h = 0

The M-step probability (the expected fraction of ones) is clamped to ``[eps, 1 - eps]`` with
``eps`` the dtype's machine epsilon, so that no log-density is ``-inf``: a feature that is always
0 within a component costs ``log(eps)`` (about -36 in float64, -16 in float32) for a point where
it is 1.

This module also holds the small helpers the other discrete families share.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F

from .._validation import describe_bad_values, initial_tensor
from .base import ComponentFamily, Theta, per_statistic, probability_bound


class Bernoulli(ComponentFamily):
    """Components that are products of D independent Bernoulli distributions.

    Args:
        probs_init: initial probabilities of a one, ``(K, D)`` or ``(*batch_shape, K, D)``, in
            ``[0, 1]`` (clamped to ``[eps, 1 - eps]``).

    Shape:
        X: ``(N, D)`` or ``(*batch_shape, N, D)`` with entries 0 or 1 (any floating dtype).
        parameters: ``logit_probs (*batch_shape, K, D)``; :meth:`probs` gives ``p`` the same shape.
    """

    accepts_bool = True  # True / False are the values 1 / 0

    def __init__(self, *, probs_init: Any = None) -> None:
        self.probs_init = probs_init

    # --- parameter layout -------------------------------------------------------------------
    def event_shapes(self, n_components: int, n_features: int) -> dict[str, tuple[int, ...]]:
        return {"logit_probs": (n_components, n_features)}

    def n_free_parameters(self, n_components: int, n_features: int) -> int:
        return n_components * n_features

    def n_statistics(self, n_features: int) -> int:
        return n_features

    def default_parameters(self, batch_shape, n_components, n_features, generator, device, dtype) -> Theta:
        # Probabilities spread around 1/2 (logits ~ N(0, 0.5^2)): distinct, none near 0 or 1.
        logits = 0.5 * torch.randn(*batch_shape, n_components, n_features, generator=generator, device=device, dtype=dtype)
        return {"logit_probs": logits}

    def user_initial_parameters(self, batch_shape, n_components, n_features, device, dtype) -> Theta:
        if self.probs_init is None:
            return {}
        probs = initial_tensor(self.probs_init, "probs_init", (n_components, n_features), batch_shape, device, dtype)
        if bool(((probs < 0) | (probs > 1)).any()):
            raise ValueError(
                f"probs_init must lie in [0, 1], got values in [{probs.min().item():.3g}, {probs.max().item():.3g}]"
            )
        return {"logit_probs": _logit(probs)}

    # --- data --------------------------------------------------------------------------------
    def check_domain(self, X: torch.Tensor, name: str) -> None:
        bad = (X != 0) & (X != 1)
        if bool(bad.any()):
            raise ValueError(f"{name} must be binary (0 or 1) for Bernoulli components, got {describe_bad_values(X, bad)}")

    def features(self, X: torch.Tensor, reference: torch.Tensor | None) -> tuple[torch.Tensor, None]:
        return X, None

    # --- constrained views -------------------------------------------------------------------
    def probs(self, theta: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Probabilities of a one, ``(*batch, K, D)``."""
        return theta["logit_probs"].sigmoid()

    def mean(self, theta: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Component means ``(*batch, K, D)`` (the probabilities)."""
        return self.probs(theta)

    # --- EM ----------------------------------------------------------------------------------
    def natural_parameters(self, theta, reference) -> tuple[torch.Tensor, torch.Tensor]:
        logits = theta["logit_probs"]  # (*b, K, D)
        return logits, -F.softplus(logits).sum(-1)

    def m_step(self, counts, stats, reference) -> tuple[Theta, torch.Tensor]:
        logits = _logit(stats / per_statistic(counts, stats))  # (*b, K, D)
        return {"logit_probs": logits}, torch.isfinite(logits).all(-1)

    def coordinate_of_statistics(self, n_features: int) -> torch.Tensor:
        return torch.arange(n_features)

    def coordinate_log_normalisers(self, theta) -> torch.Tensor:
        return -F.softplus(theta["logit_probs"])

    def expected_features(self, theta) -> torch.Tensor:
        return self.probs(theta)

    def invalid_component_advice(self) -> str:
        return "its probabilities are not finite; check the data and the responsibilities"

    def sample(self, theta, labels, generator) -> torch.Tensor:
        probs = self.probs(theta)  # (*b, K, D)
        index = labels.unsqueeze(-1).expand(*labels.shape, probs.shape[-1])
        return torch.bernoulli(probs.gather(-2, index), generator=generator)  # (*b, n, D)


def _logit(probs: torch.Tensor) -> torch.Tensor:
    """Log-odds of probabilities clamped to ``[eps, 1 - eps]``."""
    bound = probability_bound(probs.dtype)
    probs = probs.clamp(bound, 1 - bound)
    return probs.log() - (-probs).log1p()
