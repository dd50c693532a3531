"""``Statistics``: the sums over points that every training mode of EM is built from.

An E-step returns expected sufficient statistics summed over the points it saw. Because they
are sums, one container serves every mode: chunks and batches of a stream are added (``+``),
ranks are summed by one all-reduce (:meth:`Statistics.reduced`), online EM interpolates running
per-point statistics with a step size (:meth:`Statistics.lerp`), and weights (per point, or a
bootstrap's) are already inside the sums.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import distributed


@dataclass
class Statistics:
    """Sums over points for a working batch (R, M) of models with K components (or states).

    counts: (R, M, K) expected (weighted) number of points per component;
    sums: (R, M, K, F) expected (weighted) sufficient statistics of the emission family;
    log_likelihood: (R, M) total (weighted) log-likelihood of the points (nan: not computed);
    latent: the latent structure's own statistics by name, e.g. none for a mixture, start and
        transition counts for a Markov chain; each (R, M, ...);
    reference: (R, M, K, D) the point each component's sums are taken about, where some
        components have their own (:class:`torch_em.own_reference.OwnReference`); None: the
        data's shared reference point for every component.
    """

    counts: torch.Tensor
    sums: torch.Tensor
    log_likelihood: torch.Tensor
    latent: dict[str, torch.Tensor] = field(default_factory=dict)
    reference: torch.Tensor | None = None

    def __add__(self, other: "Statistics") -> "Statistics":
        # Both summands come from one pass, with the same reference points.
        return Statistics(self.counts + other.counts, self.sums + other.sums,
                          self.log_likelihood + other.log_likelihood,
                          {name: value + other.latent[name] for name, value in self.latent.items()}, self.reference)

    def scaled(self, factor: float | torch.Tensor) -> "Statistics":
        """Every sum times ``factor`` (a number, or (R, M) / (M,) per model), e.g. per point."""
        factor = _per_model(factor, self.counts)
        return Statistics(self.counts * factor[..., None], self.sums * factor[..., None, None],
                          self.log_likelihood * factor,
                          {name: value * _trailing(factor, value) for name, value in self.latent.items()},
                          self.reference)

    def lerp(self, new: "Statistics", rho: float) -> "Statistics":
        """The stepwise (online) EM update ``(1 - rho) self + rho new`` of running statistics; the
        log-likelihood is ``new``'s (the latest batch's). Both must be about the same reference."""
        return Statistics((1 - rho) * self.counts + rho * new.counts, (1 - rho) * self.sums + rho * new.sums,
                          new.log_likelihood,
                          {name: (1 - rho) * value + rho * new.latent[name] for name, value in self.latent.items()},
                          new.reference)

    def reduced(self) -> "Statistics":
        """Summed over the ranks of torch.distributed (one all_reduce); unchanged without it."""
        names = list(self.latent)
        counts, sums, log_likelihood, *latent = distributed.all_reduce_sum(
            self.counts, self.sums, self.log_likelihood, *(self.latent[name] for name in names))
        return Statistics(counts, sums, log_likelihood, dict(zip(names, latent)), self.reference)


def _per_model(factor: float | torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``factor`` as a tensor broadcastable to (R, M)."""
    return torch.as_tensor(factor, dtype=counts.dtype, device=counts.device)


def _trailing(factor: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``factor`` (broadcastable to (R, M)) with singleton axes for the trailing axes of ``value``."""
    return factor.reshape(tuple(factor.shape) + (1,) * (value.dim() - max(factor.dim(), 2)))


def floored_counts(counts: torch.Tensor) -> torch.Tensor:
    """Counts (R, M, K) lifted by a few eps: an empty component gives no log(0) or 0/0 in an M-step."""
    return counts + 10 * torch.finfo(counts.dtype).eps
