"""``torch.distributed`` support: every rank holds part of the data and the same model.

When a process group is initialised, the E-step statistics (counts, sums, log-likelihood) are
summed over ranks with one ``all_reduce`` per iteration, the data's point count and reference
point are combined once per fit, and everything random or data-dependent that decides
parameters (initialisation, the points that re-seed empty components) comes from rank 0 by
``broadcast``. Every rank then runs the same M-step and holds the same parameters. Works with
any backend (gloo on CPU, NCCL on GPUs); without a process group every function is a no-op.

Which group a fit uses is the ``process_group`` argument of ``fit``, ``initialize`` and
``partial_fit`` (:func:`using`): None, the default group when one is initialised; a group;
or False, no group: every rank fits its own model on its own data. A fit that uses a group
first checks that every rank of it called too (:func:`using`), so a fit called on some ranks
only raises within PEER_TIMEOUT seconds instead of waiting for the group's own timeout (30
minutes for gloo by default).
"""
from __future__ import annotations

import contextlib
import contextvars
import datetime
from typing import Any, Iterator

import torch
import torch.distributed as dist

#: Seconds a fit waits for every rank of its process group to call it too.
PEER_TIMEOUT = 120.0

#: The process group of the fit in progress: None (the default group), a group, or False (none).
_GROUP: contextvars.ContextVar[Any] = contextvars.ContextVar("torch_em_process_group", default=None)


class RanksDisagreeError(RuntimeError):
    """Not every rank of a process group called the same torch_em fit."""


def active() -> bool:
    """Whether the fit in progress sums its statistics over the ranks of a process group."""
    group = _GROUP.get()
    if group is False or not (dist.is_available() and dist.is_initialized()):
        return False
    return dist.get_world_size(group=group) > 1


@contextlib.contextmanager
def using(process_group: Any, call: str) -> Iterator[None]:
    """Run ``call`` (e.g. ``"GaussianMixture.fit"``, for the messages) with ``process_group``
    (None: the default group when one is initialised; False: none; or a ProcessGroup): every
    collective inside uses it. When it has several ranks, first check within PEER_TIMEOUT
    seconds that all of them called too."""
    if process_group is not None and process_group is not False and not isinstance(process_group, dist.ProcessGroup):
        raise ValueError(f"process_group must be None (the default group), False (fit locally) or a "
                         f"torch.distributed ProcessGroup, got {process_group!r}")
    token = _GROUP.set(process_group)
    try:
        if active():
            _check_peers(call)
        yield
    finally:
        _GROUP.reset(token)


def _check_peers(call: str) -> None:
    """One small all-reduce that every rank of the group must join within PEER_TIMEOUT."""
    flag = torch.ones(1, device=_collective_device())
    work = dist.all_reduce(flag, group=_GROUP.get(), async_op=True)
    try:
        work.wait(timeout=datetime.timedelta(seconds=PEER_TIMEOUT))
    except RuntimeError as error:
        raise RanksDisagreeError(
            f"{call}: not every rank of the process group ({dist.get_world_size(group=_GROUP.get())} ranks) called it "
            f"within {PEER_TIMEOUT:g} s; call it on every rank with its part of the data, or pass "
            f"process_group=False to fit on each rank alone ({error})"
        ) from None


def _collective_device() -> torch.device:
    """Where a collective's tensors live: the current CUDA device for NCCL, else the CPU."""
    backend = dist.get_backend(_GROUP.get())
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def all_reduce_sum(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Sums of the tensors over ranks, packed into one ``all_reduce``."""
    if not active():
        return list(tensors)
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=_GROUP.get())
    return [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def broadcast(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Rank 0's values of the tensors (same shapes on every rank)."""
    if not active():
        return list(tensors)
    copies = [t.contiguous().clone() for t in tensors]
    group = _GROUP.get()
    source = 0 if group is None else dist.get_global_rank(group, 0)  # the group's first rank
    for t in copies:
        dist.broadcast(t, src=source, group=group)
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
