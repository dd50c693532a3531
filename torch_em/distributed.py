"""``torch.distributed`` support: every rank holds part of the data and the same model.

When a process group is initialised, the E-step statistics (counts, sums, log-likelihood) are
summed over ranks with one ``all_reduce`` per iteration, the data's point count and reference
point are combined once per fit, and everything random or data-dependent that decides
parameters (initialisation, the points that re-seed empty components) comes from rank 0 by
``broadcast``. Every rank then runs the same M-step and holds the same parameters. Works with
any backend (gloo on CPU, NCCL on GPUs); without a process group every function is a no-op.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Sums of the tensors over ranks, packed into one ``all_reduce``."""
    if not active():
        return list(tensors)
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    return [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def broadcast(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Rank 0's values of the tensors (same shapes on every rank)."""
    if not active():
        return list(tensors)
    copies = [t.contiguous().clone() for t in tensors]
    for t in copies:
        dist.broadcast(t, src=0)
    return copies


def total_points(n_points: int, device: torch.device) -> int:
    """The number of points over all ranks."""
    return int(all_reduce_sum(torch.tensor(float(n_points), dtype=torch.float64, device=device))[0])


def total_weight(total: float | torch.Tensor, device: torch.device) -> float | torch.Tensor:
    """A (weighted) number of points, a number or (M,) per model, summed over all ranks."""
    if not isinstance(total, torch.Tensor):
        return total if not active() else float(all_reduce_sum(torch.tensor(float(total), dtype=torch.float64, device=device))[0])
    return all_reduce_sum(total)[0]


def combined_reference(reference: torch.Tensor | None, n_points: int) -> torch.Tensor | None:
    """A per-rank data mean (reference point) turned into the mean over all ranks' points."""
    if reference is None or not active():
        return reference
    weighted, count = all_reduce_sum(reference * n_points, torch.tensor(float(n_points), dtype=reference.dtype, device=reference.device))
    return weighted / count
