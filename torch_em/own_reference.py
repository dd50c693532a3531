"""``OwnReference``: components evaluated directly and summarised about their own reference point.

The E-step evaluates every component as one GEMM of features taken about the data's shared
reference point. Where that expansion would cancel (a component narrow, or far from the shared
point, in its own units: :meth:`ComponentFamily.expansion_error`), the component is instead
evaluated directly, ``(x - mu)^T P``, and its statistics are taken about its own mean (a
two-pass covariance). The shared GEMM still serves every other component, so the cost follows
only the components that need the direct path.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .families.base import ComponentFamily, Theta

if TYPE_CHECKING:
    from .statistics import Statistics

#: Offsets of one group of components stay near this many elements.
GROUP_ELEMENTS = 1 << 21
#: A fit evaluates a component directly, and takes its statistics about its own reference point,
#: when the expansion about the shared one would round by more than this (nats per feature).
FIT_ERROR_PER_FEATURE = 1e-4
#: Reported densities (log_prob, predict_proba, ...) evaluate a component directly when the
#: expansion would be this many times less accurate than a direct evaluation ...
EVALUATION_ERROR_RATIO = 4.0
#: ... and not below this many nats per feature anyway (float64, mostly).
NEGLIGIBLE_ERROR_PER_FEATURE = 1e-9


def own_reference_mask(family: ComponentFamily, theta: Theta, reference: torch.Tensor | None,
                       evaluation: bool) -> torch.Tensor | None:
    """Which components of ``theta`` (R, M, K, ...) need their own reference point, (R, M, K)
    bool, or None for a family without them; see :meth:`OwnReference.of` for the criteria."""
    errors = family.expansion_error(theta, reference) if family.has_own_reference else None
    if errors is None:
        return None
    expanded, direct = errors  # (R, M, K)
    n_features = family.own_reference(theta).shape[-1]
    mask = expanded > FIT_ERROR_PER_FEATURE * n_features
    if evaluation:
        mask |= (expanded > EVALUATION_ERROR_RATIO * direct) & (expanded > NEGLIGIBLE_ERROR_PER_FEATURE * n_features)
    return mask


def traced_direct_log_prob(family: ComponentFamily, theta: Theta, log_prior: torch.Tensor | None,
                           reference: torch.Tensor | None, X: torch.Tensor, log_joint: torch.Tensor) -> torch.Tensor:
    """``log_joint`` (R, M, K, n) of the expansion about ``reference`` with the components that
    need their own reference (:func:`own_reference_mask`, ``evaluation=True``) evaluated directly,
    as a program without data-dependent branches or indexing, for ``torch.export``,
    ``torch.compile`` and ``torch.func`` transforms: every component is evaluated directly too and
    ``torch.where`` picks, per component, the value an eager :meth:`OwnReference.write_log_prob`
    writes. The choice depends on the parameters alone, so the traced program stays right when
    they change; the cost is one direct evaluation of every component.

    Shape:
        X: (n, D) shared by every model or (M, n, D); log_prior: (R, M, K) or None.
    """
    mask = own_reference_mask(family, theta, reference, evaluation=True)
    if mask is None:
        return log_joint
    R, M, K, n = log_joint.shape
    points = family.own_reference(theta).reshape(R * M * K, -1)  # (G, D), G = R * M * K
    index = torch.arange(R * M * K, device=points.device)
    rows = X.unsqueeze(0) if X.dim() == 2 else X[(index // K) % M]  # (1 or G, n, D)
    direct = family.direct_log_prob(rows - points.unsqueeze(-2), theta, index).view(R, M, K, n)
    if log_prior is not None:
        direct = direct + log_prior.unsqueeze(-1)
    return torch.where(mask.unsqueeze(-1), direct, log_joint)


@dataclass
class OwnReference:
    """Components of a working batch (R, M, K) that are evaluated and summarised about their own
    reference point instead of the data's shared one, because the expanded form about the shared
    point would cancel (:meth:`ComponentFamily.expansion_error`).

    index: (G,) their flat positions in R * M * K; points: (G, D) the points their statistics are
    taken about; direct: (G,) bool, whether their log-density is evaluated directly from
    ``theta`` (then ``points`` are the family's own reference points of ``theta``); theta: the
    working parameters (R, M, K, ...); log_prior: (G,) their log prior probabilities (a
    mixture's log mixing weights), added to their direct log-densities;
    summarise: whether their statistics are taken about ``points`` (False: only the
    log-densities are direct, the statistics stay about the shared point, as online EM's running
    statistics need).
    """

    family: ComponentFamily
    index: torch.Tensor
    points: torch.Tensor
    direct: torch.Tensor
    theta: Theta
    log_prior: torch.Tensor
    summarise: bool = True

    def __post_init__(self) -> None:
        self.all_direct = bool(self.direct.all())

    @staticmethod
    def of(family: ComponentFamily, theta: Theta, log_prior: torch.Tensor | None, reference: torch.Tensor | None,
           evaluation: bool = False) -> "OwnReference | None":
        """The components of ``theta`` (R, M, K, ...) that need their own reference, or None.

        For a fit (``evaluation=False``), those whose expansion would round by more than
        FIT_ERROR_PER_FEATURE nats per feature (which would also be the relative rounding of
        their covariances): the expansion stays where its error is far below what moves a fit.
        For reported densities (``evaluation=True``, statistics untouched), also those it would
        evaluate EVALUATION_ERROR_RATIO times less accurately than a direct evaluation."""
        mask = own_reference_mask(family, theta, reference, evaluation)
        if mask is None or not bool(mask.any()):
            return None
        points = family.own_reference(theta)  # (R, M, K, D)
        if log_prior is None:  # a latent structure without a per-state prior (a Markov chain)
            log_prior = torch.zeros_like(mask, dtype=points.dtype)
        index = mask.expand(log_prior.shape).flatten().nonzero().squeeze(-1)  # (G,)
        points = points.flatten(0, -2)[index]  # (G, D)
        direct_mask = torch.ones_like(index, dtype=torch.bool)
        return OwnReference(family, index, points, direct_mask, theta, log_prior.flatten()[index], not evaluation)

    @staticmethod
    def none(family: ComponentFamily, theta: Theta) -> "OwnReference":
        """No component with its own reference yet (to be :meth:`extended`)."""
        points = family.own_reference(theta)
        index = torch.zeros(0, dtype=torch.long, device=points.device)
        return OwnReference(family, index, points.new_zeros(0, points.shape[-1]), index.bool(), theta,
                            points.new_zeros(0))

    def extended(self, extra: torch.Tensor, points: torch.Tensor) -> "OwnReference":
        """The same with the statistics of more components ``extra`` (R, M, K) bool, not yet
        included, taken about ``points`` (R, M, K, D) (their log-densities stay as they were)."""
        index = extra.flatten().nonzero().squeeze(-1)
        return OwnReference(
            self.family, torch.cat([self.index, index]), torch.cat([self.points, points.flatten(0, -2)[index]]),
            torch.cat([self.direct, torch.zeros_like(index, dtype=torch.bool)]), self.theta,
            torch.cat([self.log_prior, self.log_prior.new_zeros(index.shape)]), self.summarise,
        )

    def mask(self, shape: torch.Size) -> torch.Tensor:
        """Which components (R, M, K) have their own reference."""
        mask = torch.zeros(shape.numel(), dtype=torch.bool, device=self.index.device)
        mask[self.index] = True
        return mask.view(shape)

    def attach_reference(self, stats: "Statistics", reference: torch.Tensor | None) -> None:
        """Record in ``stats`` (summed over a pass) every component's reference point
        (R, M, K, D): its own, or the shared ``reference`` (nothing when not summarising)."""
        if not self.summarise:
            return
        shared = self.points.new_zeros(()) if reference is None else reference
        every = shared.expand(*stats.counts.shape, self.points.shape[-1]).clone()
        every.view(-1, self.points.shape[-1])[self.index] = self.points
        stats.reference = every

    def offsets(self, X: torch.Tensor, n_components: int, n_models: int) -> torch.Tensor:
        """``x - point`` (G, n, D) for a chunk X (n, D) shared or (M, n, D) one per model."""
        if X.dim() == 3:
            X = X[(self.index // n_components) % n_models]  # each component's own model's points
        return X - self.points.unsqueeze(-2)

    def groups(self, X: torch.Tensor, n_components: int, n_models: int) -> list[tuple[slice, torch.Tensor]]:
        """The components in groups, each with its offsets (g, n, D) for the chunk X, sized so
        that a group's offsets stay near GROUP_ELEMENTS."""
        size = max(1, GROUP_ELEMENTS // max(1, X.shape[-2] * X.shape[-1]))
        parts = [slice(start, start + size) for start in range(0, self.index.numel(), size)]
        whole = len(parts) == 1
        return [(part, (self if whole else self._slice(part)).offsets(X, n_components, n_models)) for part in parts]

    def write_log_prob(self, groups: list[tuple[slice, torch.Tensor]], log_joint: torch.Tensor,
                       scale: float = 1.0) -> None:
        """Overwrite the direct components' log joint densities in ``log_joint`` (R, M, K, n),
        in units of ``scale`` per nat."""
        n = log_joint.shape[-1]
        for part, offsets in groups:
            index, log_prior = self.index[part], self.log_prior[part]
            if not self.all_direct:
                direct = self.direct[part]
                index, log_prior, offsets = index[direct], log_prior[direct], offsets[direct]
            if index.numel():
                log_prob = self.family.direct_log_prob(offsets, self.theta, index)
                log_joint.view(-1, n)[index] = (log_prob + log_prior.unsqueeze(-1)) * scale

    def write_statistics(self, groups: list[tuple[slice, torch.Tensor]], resp: torch.Tensor, sums: torch.Tensor) -> None:
        """Overwrite the components' statistics ``sums`` (R, M, K, F) by those about their own
        points, from the responsibilities ``resp`` (R, M, K, n)."""
        if not self.summarise:
            return
        n = resp.shape[-1]
        for part, offsets in groups:
            index = self.index[part]
            sums.view(-1, sums.shape[-1])[index] = self.family.own_reference_statistics(offsets, resp.reshape(-1, n)[index])

    def _slice(self, part: slice) -> "OwnReference":
        return OwnReference(self.family, self.index[part], self.points[part], self.direct[part], self.theta,
                            self.log_prior[part], self.summarise)
