"""Failures of models in a batched fit: which models failed, where and why.

The engine records a failure as indices and a :class:`Failure` (the stage, the first invalid
component or a log-likelihood that is not finite, the advice); the module that runs the fit
names the model in its own words (:meth:`Failure.message`). Without isolation the first failure
raises :class:`ModelFailed`, which the module turns into an ``IllConditionedError`` naming it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, cast

import torch

from .families.base import ComponentFamily, IllConditionedError


@dataclass(frozen=True)
class Failure:
    """Why a model's fit failed, in engine terms; the module names the model (:meth:`message`).

    stage: where (e.g. ``"EM iteration 3"``, ``"initialisation"``, ``"partial_fit"``);
    component: the first invalid component, or None when the log-likelihood was not finite;
    advice: what the message suggests.
    """

    stage: str
    component: int | None
    advice: str
    likelihood: str = "log-likelihood"

    def message(self, model: str) -> str:
        if self.component is None:
            return f"{self.stage}: the {self.likelihood} of {model} is not finite; {self.advice}"
        return f"{self.stage}: component {self.component} of {model} is invalid: {self.advice}"


#: The advice of a log-likelihood that is not finite during a fit.
NOT_FINITE_ADVICE = "use float64, scale the data or increase the regularisation"


class ModelFailed(IllConditionedError):
    """A model failed where failures are not isolated: carries which and why, so that the
    module raises an :class:`IllConditionedError` naming it in its own words."""

    def __init__(self, restart: int, model: int, failure: Failure):
        super().__init__(failure.message(f"model {model}" + (f" (restart {restart})" if restart else "")))
        self.restart, self.model, self.failure = restart, model, failure


@dataclass
class Failures:
    """Models of a working batch (R, M) whose fit failed, and why: a failed model stops and keeps
    its last valid parameters while the others go on (``on_error="isolate"``)."""

    failed: torch.Tensor  # (R, M) bool
    reasons: dict[tuple[int, int], Failure]  # (restart, model) -> why

    @classmethod
    def none(cls, n_restarts: int, n_models: int, device: torch.device) -> "Failures":
        return cls(torch.zeros(n_restarts, n_models, dtype=torch.bool, device=device), {})

    @staticmethod
    def joined(parts: list["Failures | None"]) -> "Failures | None":
        """The records of consecutive batches of restarts (R_i, M) as one (sum R_i, M)."""
        if all(part is None for part in parts):
            return None
        failed, reasons, offset = [], {}, 0
        for maybe_part in parts:
            # a fit records the failures of all its batches of restarts or of none
            part = cast(Failures, maybe_part)
            failed.append(part.failed)
            reasons.update({(r + offset, m): reason for (r, m), reason in part.reasons.items()})
            offset += part.failed.shape[0]
        return Failures(torch.cat(failed, 0), reasons)

    def add(self, mask: torch.Tensor, reason: Callable[[int, int], Failure]) -> None:
        """Mark the models of ``mask`` (R, M) that had not failed yet, with ``reason(r, m)``."""
        new = mask & ~self.failed
        for r, m in new.nonzero().tolist():
            self.reasons[r, m] = reason(r, m)
        self.failed |= new

    def messages(self, describe: Callable[[int, int], str]) -> dict[tuple[int, int], str]:
        """The reasons as messages, each model named by ``describe(restart, model)``."""
        return {(r, m): failure.message(describe(r, m)) for (r, m), failure in self.reasons.items()}


def record_failures(
    failures: Failures | None, mask: torch.Tensor, reason: Callable[[int, int], Failure],
    to_full: Callable[[torch.Tensor], torch.Tensor] = lambda mask: mask,
) -> None:
    """Record the models of ``mask`` (working batch) as failed with ``reason(r, m)`` (full
    indices), or raise :class:`ModelFailed` for the first of them when not isolating."""
    if not bool(mask.any()):
        return
    full = to_full(mask)
    if failures is None:
        r, m = (int(i) for i in full.nonzero()[0])
        raise ModelFailed(r, m, reason(r, m))
    failures.add(full, reason)


def invalid_component_reason(family: ComponentFamily, stage: str, invalid: torch.Tensor,
                             to_full: Callable[[torch.Tensor], torch.Tensor] = lambda mask: mask,
                             ) -> Callable[[int, int], Failure]:
    """``reason(r, m)`` naming the first invalid component of ``invalid`` (R, M, K) (working
    batch; ``to_full`` maps it, trailing axes included, to full indices)."""
    first = to_full(invalid).to(torch.int8).argmax(-1).tolist()  # (R, M)

    def reason(r: int, m: int) -> Failure:
        return Failure(stage, first[r][m], family.invalid_component_advice())

    return reason
