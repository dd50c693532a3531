"""Categorical components: D independent categorical variables with C categories each.

A mixture of these is latent class analysis. Data are integer codes ``0 .. C-1`` (passed as a
floating tensor like every input of a mixture).

Unconstrained parameter (``K`` components, ``D`` variables, ``C`` categories, batch dims in front):

    logit_categories   (*b, K, D, C)   category log-probabilities up to a constant per (k, d):
                                        ``log p = log_softmax(logit_categories, -1)``

Exponential-family form, with ``onehot(x)`` the flattened one-hot code ``(D * C,)``::

    log p(x | p) = sum_d log p_{d, x_d} = onehot(x) . log p
    T = onehot(x),   eta = log_softmax(logit_categories).flatten(),   c = 0,   h = 0

(``c = 0`` because every variable takes exactly one category.) The M-step probabilities (the
expected category frequencies) are clamped below at the dtype's machine epsilon and
renormalised, so no log-density becomes ``-inf``. The initial clustering runs k-means on the
one-hot codes (squared distance = 2 x the number of variables that differ).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F

from .._validation import check_int, describe_bad_values, initial_tensor
from .base import ComponentFamily, Theta, per_statistic, probability_bound


class Categorical(ComponentFamily):
    """Components that are products of D independent categorical distributions over
    ``n_categories`` categories.

    Args:
        n_categories: C, the number of categories of every variable (codes ``0 .. C-1``).
        probs_init: initial category probabilities ``(K, D, C)`` or ``(*batch_shape, K, D, C)``,
            non-negative and summing to 1 over the last axis.

    Shape:
        X: ``(N, D)`` or ``(*batch_shape, N, D)`` of integer codes in ``[0, C)``.
        parameters: ``logit_categories (*batch_shape, K, D, C)``; :meth:`probs` the same shape.
    """

    def __init__(self, n_categories: int, *, probs_init: Any = None) -> None:
        check_int(n_categories, "n_categories", minimum=2)
        self.n_categories = int(n_categories)
        self.probs_init = probs_init

    # --- parameter layout -------------------------------------------------------------------
    def event_shapes(self, n_components: int, n_features: int) -> dict[str, tuple[int, ...]]:
        return {"logit_categories": (n_components, n_features, self.n_categories)}

    def n_free_parameters(self, n_components: int, n_features: int) -> int:
        return n_components * n_features * (self.n_categories - 1)

    def n_statistics(self, n_features: int) -> int:
        return n_features * self.n_categories

    def n_features_of(self, theta: Mapping[str, torch.Tensor]) -> int:
        return theta["logit_categories"].shape[-2]

    def default_parameters(self, batch_shape, n_components, n_features, generator, device, dtype) -> Theta:
        # Category probabilities near uniform but distinct (logits ~ N(0, 0.5^2)).
        shape = (*batch_shape, n_components, n_features, self.n_categories)
        return {"logit_categories": 0.5 * torch.randn(shape, generator=generator, device=device, dtype=dtype)}

    def user_initial_parameters(self, batch_shape, n_components, n_features, device, dtype) -> Theta:
        if self.probs_init is None:
            return {}
        shape = (n_components, n_features, self.n_categories)
        probs = initial_tensor(self.probs_init, "probs_init", shape, batch_shape, device, dtype)
        sums = probs.sum(-1)
        tolerance = max(1e-6, 1000 * torch.finfo(dtype).eps)
        if bool((probs < 0).any()) or bool(((sums - 1).abs() > tolerance).any()):
            raise ValueError(
                "probs_init must be non-negative and sum to 1 over the categories (last axis), got minimum "
                f"{probs.min().item():.3g} and sums in [{sums.min().item():.6g}, {sums.max().item():.6g}]"
            )
        return {"logit_categories": _log_probs(probs)}

    # --- data --------------------------------------------------------------------------------
    def check_domain(self, X: torch.Tensor, name: str) -> None:
        bad = (X != X.round()) | (X < 0) | (X >= self.n_categories)
        if bool(bad.any()):
            raise ValueError(
                f"{name} must hold integer category codes 0..{self.n_categories - 1} for "
                f"Categorical(n_categories={self.n_categories}) components, got {describe_bad_values(X, bad)}"
            )

    def features(self, X: torch.Tensor, reference: torch.Tensor | None) -> tuple[torch.Tensor, None]:
        return self.one_hot(X), None

    def one_hot(self, X: torch.Tensor) -> torch.Tensor:
        """Flattened one-hot codes: ``(..., n, D)`` -> ``(..., n, D * C)`` in X's dtype."""
        codes = F.one_hot(X.detach().long(), self.n_categories)  # (..., n, D, C)
        return codes.to(X.dtype).flatten(-2)

    def embedding(self, X: torch.Tensor, reference: torch.Tensor | None) -> torch.Tensor:
        return self.one_hot(X)

    # --- constrained views -------------------------------------------------------------------
    def probs(self, theta: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Category probabilities ``(*batch, K, D, C)``."""
        return theta["logit_categories"].softmax(-1)

    def log_probs(self, theta: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Category log-probabilities ``(*batch, K, D, C)``."""
        return theta["logit_categories"].log_softmax(-1)

    # --- EM ----------------------------------------------------------------------------------
    def natural_parameters(self, theta, reference) -> tuple[torch.Tensor, torch.Tensor]:
        log_probs = self.log_probs(theta)  # (*b, K, D, C)
        return log_probs.flatten(-2), log_probs.new_zeros(log_probs.shape[:-2])

    def m_step(self, counts, stats, reference) -> tuple[Theta, torch.Tensor]:
        n_features = stats.shape[-1] // self.n_categories
        frequencies = (stats / per_statistic(counts, stats)).view(*stats.shape[:-1], n_features, self.n_categories)
        logits = _log_probs(frequencies)  # (*b, K, D, C)
        return {"logit_categories": logits}, torch.isfinite(logits).flatten(-2).all(-1)

    def coordinate_of_statistics(self, n_features: int) -> torch.Tensor:
        return torch.arange(n_features).repeat_interleave(self.n_categories)  # one-hot codes, coordinate-major

    def coordinate_log_normalisers(self, theta) -> torch.Tensor:
        return theta["logit_categories"].new_zeros(theta["logit_categories"].shape[:-1])

    def expected_features(self, theta) -> torch.Tensor:
        return self.probs(theta).flatten(-2)

    def impute_missing(self, theta, resp, X, observed) -> torch.Tensor:
        # The most probable category under the posterior-weighted mixture of the components.
        mixed = (resp[..., None, None] * self.probs(theta).unsqueeze(-3)).sum(2)[0]  # (M, n, D, C)
        return torch.where(observed, X, mixed.argmax(-1).to(X.dtype))

    def invalid_component_advice(self) -> str:
        return "its category probabilities are not finite; check the data and the responsibilities"

    def sample(self, theta, labels, generator) -> torch.Tensor:
        probs = self.probs(theta)  # (*b, K, D, C)
        D, C = probs.shape[-2:]
        index = labels[..., None, None].expand(*labels.shape, D, C)
        chosen = probs.gather(-3, index)  # (*b, n, D, C)
        codes = torch.multinomial(chosen.reshape(-1, C), 1, generator=generator)  # (*b * n * D, 1)
        return codes.view(*labels.shape, D).to(probs.dtype)


def _log_probs(probs: torch.Tensor) -> torch.Tensor:
    """Log of probabilities (..., C) clamped below at eps and renormalised over the last axis."""
    probs = probs.clamp_min(probability_bound(probs.dtype))
    return (probs / probs.sum(-1, keepdim=True)).log()
