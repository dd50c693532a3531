"""Helpers for models that EM and an optimizer train together."""
from __future__ import annotations

from typing import Iterable

import torch


def reset_optimizer_state(optimizer: torch.optim.Optimizer, parameters: Iterable[torch.Tensor]) -> None:
    """Forget the optimizer's running state (e.g. Adam's moments and step count) of ``parameters``.

    After an EM update overwrites a parameter that an optimizer also trains, the moments it
    accumulated describe gradients at the old value; clearing them makes the next step start
    afresh (for Adam: a bias-corrected first step of size ~lr) instead of pushing along stale
    directions. Parameters the optimizer does not hold are ignored.
    """
    for parameter in parameters:
        optimizer.state.pop(parameter, None)
