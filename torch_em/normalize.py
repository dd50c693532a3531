"""``log_normalize``: posteriors and log-evidence from log joint densities, the one normaliser.

Every posterior of the library (a mixture's responsibilities, the predictions of the modules,
the differentiable layer) goes through :func:`log_normalize` or :func:`log_normalize_total`.
Their speed tricks stay here, invisible to callers, who pass and get natural logarithms:

* the exponentials are base 2 (exp2 is about twice as fast as exp on CPUs, vectorised); a
  caller that forms its log-densities as a GEMM can hand them over in bits (``scale=BITS``,
  the GEMM's parameters scaled, for free) and save the pass that changes the base;
* the shifted log-densities are clamped so that no subnormal number is ever formed (subnormal
  operands make exp2, sums and GEMMs many times slower on CPUs);
* the total log-evidence over many points takes one log2 per group of points (the log of a
  product of normalisers, each in [1, K]), not one per point.
"""
from __future__ import annotations

import math

import torch

#: log2(e) and ln(2): the change of base between nats and bits.
LOG2_E = 1.0 / math.log(2.0)
LN_2 = math.log(2.0)
#: The units (per nat) the normaliser computes in: bits.
BITS = LOG2_E


def log_normalize(log_joint: torch.Tensor, dim: int = -1, inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Posteriors and log-evidence from ``log_joint`` with the latent states on ``dim``.

    Returns ``resp = softmax(log_joint, dim)`` (the same shape; entries kept above the smallest
    normal number) and ``logsumexp(log_joint, dim)`` (``dim`` removed). ``inplace`` reuses
    ``log_joint``'s storage for ``resp`` (only where no gradient flows through it).

    Shape:
        log_joint: (..., K, ...) -> resp (..., K, ...), log_evidence (..., ...)
    """
    resp, peak, total = _normalize_bits(log_joint, dim, inplace)
    return resp, ((peak + total.log2()) * LN_2).squeeze(dim)


def log_normalize_total(
    log_joint: torch.Tensor, weights: torch.Tensor | None = None, inplace: bool = False, scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Posteriors over the states (axis -2) and the log-evidence (nats) summed over the points
    (axis -1), each point weighted by ``weights`` (None: 1).

    ``scale``: the units of ``log_joint``, ``scale`` per nat. :data:`BITS` (log2) saves a pass
    over the block: a caller that forms ``log_joint`` as a GEMM scales its parameters instead,
    which costs nothing.

    Shape:
        log_joint: (..., K, n); weights: (n,) or broadcastable to (..., n) -> resp (..., K, n),
        total log-evidence (...)
    """
    resp, peak, total = _normalize_bits(log_joint, -2, inplace, scale)
    return resp, _total_log_evidence(peak, total, weights, log_joint.shape[-2])


def log_evidence_total(
    log_joint: torch.Tensor, weights: torch.Tensor | None = None, inplace: bool = False, scale: float = 1.0,
) -> torch.Tensor:
    """The total log-evidence of :func:`log_normalize_total` alone (the same number, bit for bit),
    without forming the posteriors (a pass fewer): (...) from log_joint (..., K, n)."""
    _, peak, total = _normalize_bits(log_joint, -2, inplace, scale, posteriors=False)
    return _total_log_evidence(peak, total, weights, log_joint.shape[-2])


def _total_log_evidence(
    peak: torch.Tensor, total: torch.Tensor, weights: torch.Tensor | None, n_states: int,
) -> torch.Tensor:
    """``sum_n w_n logsumexp_k`` (nats) from the peaks (bits) and totals (..., 1, n) of :func:`_normalize_bits`."""
    peak, total = peak.squeeze(-2), total.squeeze(-2)  # (..., n), in bits
    if weights is not None:
        return ((peak + total.log2()) * weights).sum(-1) * LN_2
    return (peak.sum(-1) + _sum_log2(total, bound=n_states)) * LN_2


def _normalize_bits(
    log_joint: torch.Tensor, dim: int, inplace: bool, scale: float = 1.0, posteriors: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """resp, the peak (bits) and the total (in [1, K]) with ``dim`` kept as size 1:
    ``logsumexp = (peak + log2(total)) ln 2``. Written out (to bits, max, shifted exp2, normalise) rather
    than ``softmax``/``logsumexp``: one exp2 per entry, several times faster over a short axis.
    The maximum is subtracted after the change of base, so the largest entry is exactly 0.
    Without ``posteriors`` the shifted exponentials are returned in place of resp, not normalised."""
    if scale == BITS:
        bits = log_joint
    else:
        bits = log_joint.mul_(BITS / scale) if inplace else log_joint * (BITS / scale)
    peak = bits.amax(dim, keepdim=True)
    # Clamp so that exp2, and the division by a total of at most K, stay above the smallest normal
    # number; a posterior changes by less than 3 * K * tiny.
    floor = math.log2(torch.finfo(log_joint.dtype).tiny) + math.log2(log_joint.shape[dim]) + 1.0
    if inplace:
        resp = bits.sub_(peak).clamp_min_(floor).exp2_()
        total = resp.sum(dim, keepdim=True)
        if posteriors:
            resp = resp.div_(total)
    else:
        resp = (bits - peak).clamp_min(floor).exp2()
        total = resp.sum(dim, keepdim=True)
        if posteriors:
            resp = resp / total
    return resp, peak, total


def _sum_log2(values: torch.Tensor, bound: float) -> torch.Tensor:
    """``values.log2().sum(-1)`` for values in ``[1, bound]``, with one log2 per group of values:
    the log2 of their product, which stays finite (log2 is several times slower than a product).

    Shape:
        values: (..., n) -> (...)
    """
    n = values.shape[-1]
    # bound ** group stays below the square root of the largest finite number.
    max_log2 = math.log2(torch.finfo(values.dtype).max)
    group = n if bound <= 1 else max(1, min(n, int(max_log2 / 2 / math.log2(bound))))
    full = n - n % group
    total = values[..., :full].unflatten(-1, (full // group, group)).prod(-1).log2().sum(-1)
    if full < n:
        total = total + values[..., full:].prod(-1).log2()
    return total
