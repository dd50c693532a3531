"""Helpers for models that EM and an optimizer train together."""
from __future__ import annotations

from typing import Callable, Iterable

import torch


def reset_optimizer_state(optimizer: torch.optim.Optimizer, parameters: Iterable[torch.Tensor]) -> None:
    """Forget the optimizer's running state (e.g. Adam's moments and step count) of ``parameters``.

    After an EM update overwrites a parameter that an optimizer also trains, the moments it
    accumulated describe gradients at the old value; clearing them makes the next step start
    afresh (for Adam: a bias-corrected first step of size ~lr) instead of pushing along stale
    directions. Parameters the optimizer does not hold are ignored.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    for parameter in parameters:
        optimizer.state.pop(parameter, None)


def saved_tensor_bytes(run: Callable[[], object]) -> int:
    """Bytes of the tensors autograd saves for the backward pass while ``run()`` executes: the
    memory a graph holds, measured the same way on every device (e.g. to compare the gradient
    modes of :func:`torch_em.functional.em`). Tensors saved twice are counted twice."""
    if not callable(run):
        raise ValueError(f"run must be a callable taking no arguments, got {type(run).__name__}")
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return total
