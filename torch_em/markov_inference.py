"""Inference in hidden Markov models: forward-backward, likelihood, Viterbi and state sampling.

Pure tensor functions for ``G`` independent models ("groups") at once, each with ``S`` padded
sequences of ``T`` steps over ``K`` states. Inputs are natural-log emission densities
``log_emission (G, S, T, K)``, a start distribution ``log_startprob (G, K)`` and a row-stochastic
transition matrix ``log_transmat (G, K, K)`` (``-inf`` entries, structural zeros, are allowed), and
the sequence lengths ``(S,)`` / ``(G, S)``. Callers validate; nothing here checks its input.

Forward-backward in rescaled probability space
----------------------------------------------
With ``m_t = max_k log p(x_t | k)`` and ``e_t = exp(log p(x_t | .) - m_t)`` (entries in [0, 1],
one of them 1), the filter ``alpha_hat_t`` is kept normalised every step,

    alpha_hat_0 = normalise(pi * e_0),   alpha_hat_t = normalise((alpha_hat_{t-1} A) * e_t),

the normalisers ``c_t`` (and ``m_t``) giving ``log p(x_{0:t}) = sum_{u<=t} m_u + log c_u``,
summed in float64 whatever the input dtype; the smoother ``beta_hat_t`` (``beta_{t-1} =
A (e_t * beta_t)``, ``beta_{len-1} = 1``) is divided by the same ``c_t`` every step (Rabiner's
scaling: ``alpha_hat_t . beta_hat_t = 1``, so the states that carry posterior mass stay near 1
however far below the others their backward values fall), every entry capped at
``finfo.max ** 0.8``. Only relative values of ``alpha_hat_t`` and ``beta_hat_t`` are needed:

    gamma_t = normalise(alpha_hat_t * beta_hat_t)
    sum_t xi_t = A * (sum_t alpha_hat_{t-1}^T (e_t * beta_hat_t / n_t)),
    n_t = (alpha_hat_{t-1} A) . (e_t * beta_hat_t),

so the expected transitions of all steps and sequences are one GEMM, with the sequence weights and
the padding mask folded into ``1 / n_t``.

Two schedules compute the recursions, with the same results (to rounding):

* ``"sequential"``: one step per time step, batched over (G, S).
* ``"blocked"`` (a two-level scan for long sequences): the ``T - 1`` transitions are cut into
  ``B`` blocks of ``L`` steps (``L`` chosen by a cost model, from a few to a few hundred). (1)
  Within all blocks at once, the running product of the step matrices ``A diag(e_t)``, ``L``
  steps, every row normalised by its sum each step with its log-scale kept (per row, so that a
  starting state whose row is ~1e-300 of another's is not lost: a left-to-right chain stuck in its
  last state needs exactly that row). The product of a block serves the filter (row vector times
  it) and the smoother (it times a column vector). (2) The products of all runs of consecutive
  blocks from the first (for the filter) and to the last (for the smoother) by a work-efficient
  parallel scan in float64 (about ``2 B`` products of K x K matrices in ``2 log2 B`` levels), which
  give the exact filter and smoother at every block boundary. (3) The filter and the smoother
  inside all blocks at once, restarted from those boundary vectors: ``L`` vector steps each. That
  is ``3 L`` loop steps and ``4 log2 B`` scan levels instead of ``2 T`` steps, for ``K`` times
  more arithmetic in (1). Viterbi is the same in the max-plus semiring with ``L ~ sqrt(T)``, a
  backpointer matrix per step inside the blocks, a ``B``-step pass over the boundaries, and
  backtracking inside all blocks at once.

Padded steps (``t >= len``) are masked on entry (their emissions may be anything, NaN included)
and act as the identity wherever a recursion runs through them towards the start (the smoother,
Viterbi); the filter simply ignores what comes after a sequence's end.

Working layout: ``(G, T, S, K)`` (time before sequences inside a group), so that one time step of
all sequences is a slice and the expected-transition GEMM reads the filter as ``(G, T S, K)``.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Literal, NamedTuple

import torch
from torch import Tensor

from . import _workspace
from ._products import blocked_product, uses_blocks
from ._tracing import is_traced

Method = Literal["auto", "sequential", "blocked"]


class ForwardBackward(NamedTuple):
    """What one forward-backward pass gives.

    Shape:
        posteriors: (G, S, T, K) state posteriors, rows sum to 1 at valid steps, 0 at padded steps.
        start: (G, K) ``sum_s w_s gamma_{s,0}`` (weighted expected start counts).
        transitions: (G, K, K) ``sum_s w_s sum_{t=1}^{len_s-1} xi_{s,t}`` (weighted expected counts).
        log_evidence: (G, S) ``log p(x_s)`` (not weighted), input dtype, accumulated in float64.
    """

    posteriors: Tensor
    start: Tensor
    transitions: Tensor
    log_evidence: Tensor


# ---------------------------------------------------------------------------------------------
# public functions


def forward_backward(
    log_emission: Tensor,
    log_startprob: Tensor,
    log_transmat: Tensor,
    lengths: Tensor | None = None,
    weights: Tensor | None = None,
    *,
    method: Method = "auto",
) -> ForwardBackward:
    """State posteriors, expected start and transition counts and the log-evidence of every sequence.

    Not differentiable (use :func:`log_likelihood`, whose gradients are these statistics).

    Shape:
        log_emission: (G, S, T, K); log_startprob: (G, K); log_transmat: (G, K, K);
        lengths: (S,) / (G, S) int64 in [1, T] or None (all T); weights: (S,) / (G, S) or None (1).
        Returns :class:`ForwardBackward`.
    """
    with torch.no_grad():
        forward = _forward_pass(log_emission, log_startprob, log_transmat, lengths, method)
        beta = _smooth(forward)
        G, S = log_emission.shape[:2]
        seq_weights = _per_sequence(weights, G, S, log_emission)
        posteriors, start, transitions = _statistics(forward, beta, seq_weights, in_place=True)
        return ForwardBackward(posteriors, start, transitions, forward.filtered.log_evidence.to(log_emission.dtype))


def log_likelihood(
    log_emission: Tensor,
    log_startprob: Tensor,
    log_transmat: Tensor,
    lengths: Tensor | None = None,
    *,
    method: Method = "auto",
) -> Tensor:
    """``log p(x_s)`` of every sequence by the forward pass alone; differentiable.

    Gradients (exact, for any inputs, normalised or not): d/d log_emission = posteriors,
    d/d log_startprob = start counts, d/d log_transmat = expected transition counts, each weighted
    by the incoming gradient of every sequence (one forward-backward pass; first order only).

    Shape:
        log_emission: (G, S, T, K); log_startprob: (G, K); log_transmat: (G, K, K);
        lengths: (S,) / (G, S) or None. Returns (G, S) in the input dtype.
    """
    if torch.is_grad_enabled() and any(x.requires_grad for x in (log_emission, log_startprob, log_transmat)):
        return _LogLikelihood.apply(log_emission, log_startprob, log_transmat, lengths, method)
    forward = _forward_pass(log_emission, log_startprob, log_transmat, lengths, method)
    return forward.filtered.log_evidence.to(log_emission.dtype)


def viterbi(
    log_emission: Tensor,
    log_startprob: Tensor,
    log_transmat: Tensor,
    lengths: Tensor | None = None,
    *,
    method: Method = "auto",
) -> tuple[Tensor, Tensor]:
    """The most probable state path of every sequence and its log-probability.

    Shape:
        log_emission: (G, S, T, K); log_startprob: (G, K); log_transmat: (G, K, K);
        lengths: (S,) / (G, S) or None. Returns states (G, S, T) int64 (-1 at padded steps) and
        log_prob (G, S) in the input dtype (accumulated in float64).
    """
    with torch.no_grad():
        G, S, T, K = log_emission.shape
        schedule = _resolve_method(method, G, S, T, K, VITERBI_PRODUCT_FACTOR)
        if method == "auto" and G * S * T * K * K > VITERBI_BLOCKED_MAX_POINTERS:
            schedule = "sequential"  # blocked keeps a K x K backpointer matrix per step
        L = _block_length(T) if schedule == "blocked" else None
        steps = _prepare(log_emission, lengths, _padded_length(T, L), log_space=True)
        if L is not None:
            path, log_prob = _viterbi_blocked(steps, log_startprob, log_transmat, L)
        else:
            path, log_prob = _viterbi_sequential(steps, log_startprob, log_transmat)
        states = torch.where(steps.valid[:, :T], path[:, :T], -1).transpose(1, 2)  # (G, S, T)
        return states.contiguous(), log_prob.to(log_emission.dtype)


def sample_states(
    log_startprob: Tensor,
    log_transmat: Tensor,
    n_sequences: int,
    length: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw state sequences from the Markov chain of every model (inverse-CDF sampling).

    The CDFs are taken in float64 and divided by their last entry, so that the last one is exactly
    1 and a state of zero probability (a flat step of the CDF) can never be drawn.

    Shape:
        log_startprob: (G, K); log_transmat: (G, K, K). Returns (G, n_sequences, length) int64.
    """
    G, K = log_startprob.shape
    device = log_startprob.device
    start_cdf = _cdf(log_startprob)  # (G, K)
    transition_cdf = _cdf(log_transmat)  # (G, K, K)
    uniform = torch.rand(length, G, n_sequences, 1, generator=generator, device=device, dtype=torch.float64)
    states = torch.empty(length, G, n_sequences, dtype=torch.int64, device=device)
    if length == 0:
        return states.permute(1, 2, 0)
    states[0] = torch.searchsorted(start_cdf, uniform[0].squeeze(-1), right=True)
    rows = torch.empty(G, n_sequences, K, dtype=torch.float64, device=device)
    for t in range(1, length):
        torch.gather(transition_cdf, 1, states[t - 1].unsqueeze(-1).expand(G, n_sequences, K), out=rows)
        states[t] = torch.searchsorted(rows, uniform[t], right=True).squeeze(-1)
    return states.permute(1, 2, 0).contiguous()


# ---------------------------------------------------------------------------------------------
# choice of schedule

#: The cost model of ``method="auto"``, calibrated on a 2-core CPU (torch 2.x, float32, see
#: ``benchmarks/markov_inference.py``): seconds per loop step (four to six small kernels of
#: ~4 us dispatch each) and per element touched by one kernel (GEMM multiply-adds included).
STEP_OVERHEAD_S = 20e-6
ELEMENT_COST_S = 0.5e-9
#: Seconds per level of the log-depth scan over the block boundaries (about a dozen kernels).
SCAN_LEVEL_OVERHEAD_S = 60e-6
#: Viterbi's block products (a K^3 broadcast sum, a max with indices, three selections per step)
#: against those of the forward-backward pass, as measured.
VITERBI_PRODUCT_FACTOR = 4.0
#: ``"auto"`` Viterbi stays sequential above this many backpointers of the blocked schedule
#: (G S T K^2 int64: 1 GiB).
VITERBI_BLOCKED_MAX_POINTERS = 2**27


def _block_length(T: int) -> int:
    """Viterbi's block length L ~ sqrt(T - 1), balancing the L within-block and B = ceil((T-1)/L)
    boundary steps."""
    return max(1, math.isqrt(max(T - 1, 1)))


def _padded_length(T: int, L: int | None) -> int:
    """Time steps of the working buffers: T (sequential schedule, ``L`` None), or 1 + B L (blocked)."""
    if L is None or T <= 1:
        return T
    return 1 + L * math.ceil((T - 1) / L)


def _vector_passes(G: int, S: int, T: int, K: int) -> float:
    """Elements touched by the filter and the smoother (a vector-matrix product and a
    normalisation per step, either schedule)."""
    return 2.0 * G * S * T * K * (K + 4)


def _blocked_time(G: int, S: int, T: int, K: int, L: int) -> float:
    """Predicted seconds of the blocked forward-backward with blocks of L steps: 3 L loop steps
    (block products, filter and smoother inside the blocks), the block products over
    N K^2 (K + 5) elements (N = G S T), and two scans of ceil(log2 B) levels, each composing up to
    G S B pairs of K x K products over K^2 (K + 12) elements apiece."""
    B = math.ceil((T - 1) / L)
    levels = math.ceil(math.log2(B)) if B > 1 else 0
    products = G * S * T * K * K * (K + 5)
    scans = 2.0 * G * S * B * levels * K * K * (K + 12)
    loop = 3 * L * STEP_OVERHEAD_S + 2 * levels * SCAN_LEVEL_OVERHEAD_S
    return loop + (products + scans + _vector_passes(G, S, T, K)) * ELEMENT_COST_S


@functools.lru_cache(maxsize=256)
def _forward_backward_block_length(G: int, S: int, T: int, K: int) -> int:
    """The block length of the smallest :func:`_blocked_time`, over a geometric grid of lengths
    (ratio 2^(1/4)) from 1 to T - 1."""
    candidates = sorted({max(1, round(2 ** (i / 4))) for i in range(4 * max(1, (T - 1).bit_length()) + 1)})
    candidates = [L for L in candidates if L <= max(T - 1, 1)]
    return min(candidates, key=lambda L: _blocked_time(G, S, T, K, L))


def _resolve_method(method: str, G: int, S: int, T: int, K: int, product_factor: float = 1.0) -> str:
    """``"auto"`` -> the schedule with the smaller predicted time for these shapes.

    time ~ loop_steps * STEP_OVERHEAD_S + elements * ELEMENT_COST_S, with (N = G S T)

    * sequential: 2 T steps; two vector passes over N K (K + 4) elements;
    * blocked forward-backward (``product_factor`` 1): :func:`_blocked_time` at the best block
      length, a few times sqrt(T) or fewer loop steps;
    * blocked Viterbi (``product_factor`` ``VITERBI_PRODUCT_FACTOR``: its max-plus block products
      cost that much more): 3 L + 2 B steps with L ~ sqrt(T) (its pass over the boundaries is
      sequential), the block products weighted by the factor, the same two vector passes.

    One sequence of T = 100,000 (K = 8) -> blocked; 10,000 sequences of T = 50 -> sequential.
    """
    if method != "auto":
        return method
    if T <= 2:
        return "sequential"
    sequential = 2 * T * STEP_OVERHEAD_S + _vector_passes(G, S, T, K) * ELEMENT_COST_S
    if product_factor == 1.0:
        blocked = _blocked_time(G, S, T, K, _forward_backward_block_length(G, S, T, K))
    else:
        L = _block_length(T)
        B = math.ceil((T - 1) / L)
        products = product_factor * G * S * T * K * K * (K + 5)
        blocked = (3 * L + 2 * B) * STEP_OVERHEAD_S + (products + _vector_passes(G, S, T, K)) * ELEMENT_COST_S
    return "blocked" if blocked < sequential else "sequential"


# ---------------------------------------------------------------------------------------------
# shared preparation


class _Steps(NamedTuple):
    """Masked per-step emissions in the working layout, padded to ``T_pad`` steps.

    Shape:
        emission: (G, T_pad, S, K): ``e_t`` (probability space) or masked log-densities (log space),
            padded steps 1 (resp. 0).
        log_scale: (G, T_pad, S) float64: ``m_t`` (0 at padded steps; log space: 0 everywhere).
        valid: (G, T_pad, S) bool: ``t < len``.
        last: (G, S) int64: ``len - 1``.
        length: T, the unpadded number of steps.
        masked: whether a sequence is shorter than T (the padding of the blocked schedule beyond T
            alone does not count: the blocked forward-backward handles it by itself).
        reusable: whether the working buffers of the pass die with it, so that the next pass may
            rewrite them (:mod:`torch_em._workspace`); not when autograd keeps them for backward.
    """

    emission: Tensor
    log_scale: Tensor
    valid: Tensor
    last: Tensor
    length: int
    masked: bool
    reusable: bool

    def buffer(self, name: str, shape: tuple[int, ...]) -> Tensor:
        """An uninitialised working buffer of the pass, in the emissions' dtype and device."""
        return _workspace.empty(name, shape, self.emission) if self.reusable else self.emission.new_empty(shape)


def _prepare(
    log_emission: Tensor, lengths: Tensor | None, padded_length: int, log_space: bool = False, reusable: bool = False
) -> _Steps:
    """Mask padded steps (their values never reach a result) and bring the emissions to the working layout."""
    G, S, T, K = log_emission.shape
    device = log_emission.device
    if lengths is None:
        last = torch.full((G, S), T - 1, dtype=torch.int64, device=device)
    else:
        last = (lengths.to(device=device, dtype=torch.int64) - 1).expand(G, S)
    time = torch.arange(padded_length, device=device)
    valid = time[None, :, None] <= last[:, None, :]  # (G, T_pad, S)
    # Sequences all of length T need no mask (traced, where that is data-dependent, they keep it).
    short = lengths is not None and (is_traced(lengths) or bool((last < T - 1).any()))
    shape = (G, padded_length, S, K)
    emission = _workspace.empty("emission", shape, log_emission) if reusable else log_emission.new_empty(shape)
    emission[:, T:] = 0.0
    if not short:
        emission[:, :T].copy_(log_emission.transpose(1, 2))
    else:
        torch.where(valid[:, :T, :, None], log_emission.transpose(1, 2), emission.new_zeros(()), out=emission[:, :T])
    if log_space:
        no_scale = torch.zeros(G, padded_length, S, dtype=torch.float64, device=device)
        return _Steps(emission, no_scale, valid, last, T, short, reusable)
    log_scale = emission.amax(-1, keepdim=True)  # (G, T_pad, S, 1); 0 at padded steps
    log_scale.clamp_min_(torch.finfo(log_scale.dtype).min)  # a step impossible in every state: e = 0, c_t = 0
    emission.sub_(log_scale).exp_()
    return _Steps(emission, log_scale.squeeze(-1).double(), valid, last, T, short, reusable)


def _per_sequence(weights: Tensor | None, G: int, S: int, like: Tensor) -> Tensor:
    """Sequence weights as (G, S) in ``like``'s dtype (ones when None)."""
    if weights is None:
        return torch.ones(G, S, dtype=like.dtype, device=like.device)
    return weights.to(dtype=like.dtype, device=like.device).expand(G, S)


def _identity_where_invalid(new: Tensor, old: Tensor, keep: Tensor, out: Tensor | None = None) -> Tensor:
    """``new`` where ``keep`` is 1, ``old`` where it is 0 (an invalid step acts as the identity).

    ``torch.lerp`` with a 0/1 weight is exact (it computes ``old + w (new - old)`` for w < 0.5 and
    ``new - (new - old) (1 - w)`` otherwise) for the finite values used here, and several times
    faster on CPU than a ``where`` with a broadcast boolean mask.
    """
    return torch.lerp(old, new, keep, out=out)


def _row_sums(x: Tensor, ones: Tensor | None = None) -> Tensor:
    """``x.sum(-1, keepdim=True)`` as a product with a ones column (much faster for small K on CPU);
    ``ones``: that column (K, 1), made once by a loop that sums rows at every step."""
    return torch.matmul(x, x.new_ones(x.shape[-1], 1) if ones is None else ones)


def _normalise_rows(x: Tensor, ones: Tensor | None = None) -> Tensor:
    """``x / x.sum(-1)`` in place; returns the sums (..., 1)."""
    total = _row_sums(x, ones)
    x.div_(total)
    return total


# ---------------------------------------------------------------------------------------------
# filter and smoother


class _Blocks(NamedTuple):
    """The steps of the blocked schedule in block-major, state-first order and the product of the
    step matrices of every block, shared by the filter and the smoother.

    Shape:
        emission: (G, L, K, B, S) ``e`` at time ``1 + b L + j`` as entry ``[:, j, :, b]``: one
            contiguous slice per position in the blocks, states first, so that the recursions
            inside all blocks are products of ``A`` (or its transpose) with a wide (K, B S) matrix.
        keep: (G, L, B, S) 1.0 at valid steps, 0.0 after a sequence's end; None when no sequence
            is shorter than T.
        tail: the valid steps of the last block when no sequence is shorter than T (1 .. L: the
            padding beyond T sits at the end of the last block); L otherwise.
        totals: (G, B, S, K, K) ``A diag(e_{1+bL}) ... A diag(e_{bL+L})`` (invalid steps: the
            identity), every row normalised to sum 1 (or 0); log_scales: (G, B, S, K) float64
            their log row scales.
    """

    emission: Tensor
    keep: Tensor | None
    tail: int
    totals: Tensor
    log_scales: Tensor


def _blocks(steps: _Steps, transmat: Tensor, L: int | None) -> _Blocks | None:
    """The block-major steps and block products for blocks of L steps (None: sequential schedule)."""
    e = steps.emission
    if L is None or e.shape[1] == 1:
        return None
    G, T_pad, S, K = e.shape
    B = (T_pad - 1) // L
    emission = steps.buffer("block emission", (G, L, K, B, S))
    emission.copy_(_in_blocks(e, L).permute(0, 2, 4, 1, 3))
    keep = _in_blocks(steps.valid, L).transpose(1, 2).to(e.dtype).contiguous() if steps.masked else None
    tail = L if steps.masked else steps.length - 1 - (B - 1) * L
    totals, log_scales = _block_totals(steps, emission, transmat, keep, tail)
    return _Blocks(emission, keep, tail, totals, log_scales)


class _Filtered(NamedTuple):
    """The filter and what it gives.

    Shape:
        alpha: (G, T_pad, S, K) ``alpha_hat_t``, normalised; norms: (G, T_pad, S, 1) ``c_t =
        sum((alpha_hat_{t-1} A) * e_t)`` for t >= 1 (entry 0 not used); log_evidence: (G, S) float64.
        inside, inside_norms: blocked schedule only (else None), the filter and its normalisers in
        the layout of the recursions inside the blocks: (L + 1, G, K, B S), entry j ``alpha_hat``
        at time ``b L + j``; (L, G, 1, B S), entry j ``c_t`` at time ``1 + b L + j``.
    """

    alpha: Tensor
    norms: Tensor
    log_evidence: Tensor
    inside: Tensor | None = None
    inside_norms: Tensor | None = None


def _filter(steps: _Steps, startprob: Tensor, transmat: Tensor, blocks: _Blocks | None) -> _Filtered:
    """The normalised filter, its step normalisers and the log-evidence of every sequence."""
    e = steps.emission
    alpha = steps.buffer("alpha", tuple(e.shape))
    alpha[:, 0] = startprob[:, None, :] * e[:, 0]
    log_norm0 = _normalise_rows(alpha[:, 0]).squeeze(-1).log().double()  # (G, S)
    if blocks is None:
        norms, log_evidence = _filter_sequential(steps, alpha, log_norm0, transmat)
        return _Filtered(alpha, norms, log_evidence + steps.log_scale.sum(1))
    norms, log_evidence, inside, inside_norms = _filter_blocked(steps, alpha, log_norm0, transmat, blocks)
    return _Filtered(alpha, norms, log_evidence + steps.log_scale.sum(1), inside, inside_norms)


def _filter_sequential(steps: _Steps, alpha: Tensor, log_norm0: Tensor, transmat: Tensor) -> tuple[Tensor, Tensor]:
    """The plain recursion, writing ``alpha`` in place; returns the normalisers ``c_t`` (G, T, S, 1)
    and ``sum_{t<len} log c_t`` (G, S) float64.

    The loop costs dispatch, not arithmetic, for most shapes: the time slices are taken once
    (``unbind``) and every product goes into a contiguous buffer (a strided ``out=`` costs bmm a
    copy), about half the time of indexing and allocating at every step."""
    e = steps.emission
    G, T, S, K = e.shape
    norms = e.new_empty(T, G, S, 1)
    ones = e.new_ones(K, 1)
    step = e.new_empty(G, S, K)
    alphas, emissions, step_norms = alpha.unbind(1), e.unbind(1), norms.unbind(0)
    for t in range(1, T):
        torch.bmm(alphas[t - 1], transmat, out=step).mul_(emissions[t])
        torch.matmul(step, ones, out=step_norms[t])
        torch.div(step, step_norms[t], out=alphas[t])
    log_norms = norms.squeeze(-1).transpose(0, 1).log().double()  # (G, T, S)
    log_norms[:, 0] = log_norm0
    if steps.masked:
        log_norms.masked_fill_(~steps.valid, 0.0)
    return norms.transpose(0, 1), log_norms.sum(1)


class _ForwardPass(NamedTuple):
    """Everything the filter computed that the smoother and the statistics reuse."""

    steps: _Steps
    transmat: Tensor
    blocks: _Blocks | None
    filtered: _Filtered


def _forward_pass(
    log_emission: Tensor, log_startprob: Tensor, log_transmat: Tensor, lengths: Tensor | None, method: str,
    reusable: bool = True,
) -> _ForwardPass:
    """Choose the schedule, prepare the steps, and run the filter (and the block products).
    ``reusable``: the working buffers may be those of the previous pass (see :class:`_Steps`)."""
    G, S, T, K = log_emission.shape
    schedule = _resolve_method(method, G, S, T, K)
    L = _forward_backward_block_length(G, S, T, K) if schedule == "blocked" and T > 1 else None
    steps = _prepare(log_emission, lengths, _padded_length(T, L), reusable=reusable)
    transmat = log_transmat.exp()
    blocks = _blocks(steps, transmat, L)
    return _ForwardPass(steps, transmat, blocks, _filter(steps, log_startprob.exp(), transmat, blocks))


def _smooth(forward: _ForwardPass) -> Tensor:
    """Scaled smoother ``beta_hat`` (G, T_pad, S, K): constant at ``t >= len - 1``."""
    if forward.blocks is None:
        return _smooth_sequential(forward.steps, forward.transmat, forward.filtered.norms)
    return _smooth_blocked(forward.steps, forward.transmat, forward.blocks, forward.filtered)


def _smoother_cap(dtype: torch.dtype) -> float:
    """The largest smoother entry kept, ``finfo.max ** 0.8`` (about 1e246 in float64, 1e31 in float32)."""
    return torch.finfo(dtype).max ** 0.8


def _scale_smoother(step: Tensor, norm: Tensor, cap: float) -> Tensor:
    """Rabiner's scaling: ``beta_hat_{t-1} = A (e_t * beta_hat_t) / c_t`` with the filter's
    normaliser, which keeps ``alpha_hat_t . beta_hat_t = 1`` (up to rounding) at every step; every
    entry capped at ``cap``. In place on ``step``.

    Normalising by the smoother's own sum would lose a state whose backward value falls below
    1e-308 (float32: 1e-38) of the others' however much filter mass it holds (a chain stuck in an
    absorbing state the data disfavour): the posteriors become 0 / 0. With the filter's scale, the
    entries that carry posterior mass stay near 1. An entry the filter rules out can grow without
    bound instead; the cap keeps it finite (it changes a result only where the filter gives a
    state less than 1 / cap and the smoother makes it likely: a surprise of more than 560 nats in
    float64, 70 in float32).
    """
    return step.div_(norm).clamp_max_(cap)


def _smooth_sequential(steps: _Steps, transmat: Tensor, norms: Tensor) -> Tensor:
    """``beta_{t-1} = A (e_t * beta_t)``, scaled by :func:`_scale_smoother`, at valid ``t``;
    ``beta_{t-1} = beta_t`` (= 1) after the end. Slices and buffers as in :func:`_filter_sequential`."""
    e = steps.emission
    G, T, S, K = e.shape
    beta = steps.buffer("beta", tuple(e.shape))
    beta[:, T - 1] = 1.0
    backward = transmat.transpose(1, 2)
    cap = _smoother_cap(e.dtype)
    arriving, step = e.new_empty(G, S, K), e.new_empty(G, S, K)
    betas, emissions, step_norms = beta.unbind(1), e.unbind(1), norms.unbind(1)
    keeps = steps.valid.to(e.dtype).unsqueeze(-1).unbind(1) if steps.masked else None
    for t in range(T - 1, 0, -1):
        torch.bmm(torch.mul(emissions[t], betas[t], out=arriving), backward, out=step)  # (G, S, K)
        _scale_smoother(step, step_norms[t], cap)
        if keeps is not None:
            _identity_where_invalid(step, betas[t], keeps[t], out=betas[t - 1])
        else:
            betas[t - 1].copy_(step)
    return beta


def _statistics(
    forward: _ForwardPass, beta: Tensor, seq_weights: Tensor, in_place: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """Posteriors (G, S, T, K), weighted start counts (G, K) and transition counts (G, K, K).
    ``in_place``: the products go into ``beta`` and ``forward.steps.emission`` (their last use:
    a fresh buffer of that size costs more in page faults than the product itself).

    ``beta`` is only known up to a factor per step; ``alpha`` is normalised, so that
    ``n_t = (alpha_hat_{t-1} A) . (e_t beta_t) = c_t (alpha_hat_t . beta_t)``.
    """
    steps, filtered, transmat = forward.steps, forward.filtered, forward.transmat
    alpha = filtered.alpha
    G, _, S, K = alpha.shape
    T = steps.length
    valid = steps.valid[:, :T, :, None]  # (G, T, S, 1)
    if in_place:  # (arriving first: it reads beta)
        arriving = steps.emission[:, 1:T].mul_(beta[:, 1:T])  # e_t * beta_t, (G, T-1, S, K)
        joint = beta[:, :T].mul_(alpha[:, :T])  # (G, T, S, K)
    else:
        arriving, joint = steps.emission[:, 1:T] * beta[:, 1:T], alpha[:, :T] * beta[:, :T]
    overlap = _row_sums(joint)  # alpha_hat_t . beta_t, (G, T, S, 1)
    joint.div_(overlap)
    posteriors = alpha.new_empty(G, S, T, K)
    if steps.masked:
        torch.where(valid, joint, joint.new_zeros(()), out=posteriors.transpose(1, 2))
    else:
        posteriors.transpose(1, 2).copy_(joint)
    start = torch.bmm(seq_weights.unsqueeze(1), posteriors[:, :, 0]).squeeze(1)  # (G, K)
    if T == 1:
        return posteriors, start, torch.zeros_like(transmat)
    previous = alpha[:, : T - 1].reshape(G, (T - 1) * S, K)  # a view
    # the weight and the mask of every step go into 1 / n_t
    factor = seq_weights[:, None, :, None] / (filtered.norms[:, 1:T] * overlap[:, 1:])
    if steps.masked:
        factor = torch.where(valid[:, 1:], factor, 0.0)
    # capped: an entry the filter rules out stays finite (0 x inf would be NaN in the product below)
    arriving.mul_(factor).clamp_max_(_smoother_cap(alpha.dtype))
    arriving = arriving.view(G, (T - 1) * S, K)
    if G == 1 and uses_blocks(arriving):
        transitions = blocked_product(previous[0].T, arriving[0]).unsqueeze(0).mul_(transmat)
    else:
        transitions = torch.bmm(previous.transpose(1, 2), arriving).mul_(transmat)
    return posteriors, start, transitions


# ---------------------------------------------------------------------------------------------
# blocked (two-level) scans


def _in_blocks(x: Tensor, L: int) -> Tensor:
    """Steps 1 .. B L of a working buffer (G, 1 + B L, ...) as (G, B, L, ...) (a view)."""
    G, T_pad = x.shape[:2]
    return x[:, 1:].view(G, (T_pad - 1) // L, L, *x.shape[2:])


def _block_totals(
    steps: _Steps, emission: Tensor, transmat: Tensor, keep: Tensor | None, tail: int
) -> tuple[Tensor, Tensor]:
    """Running product ``P_j = P_{j-1} A diag(e_j)`` over the L steps of all blocks at once, every
    row normalised by its sum each step (its log-scale kept per row); an invalid step is the
    identity (``keep`` 0, or past the ``tail`` valid steps of the last block).

    The products are held transposed, ``Q[k, b, s, i] = P_{b,s}[i, k]``, so that a step is one
    product ``A^T Q`` with Q as a (K, B S K) matrix, the emission scales rows of Q and the row
    sums of P are sums over Q's first axis (on CPU about twice as fast as the row-major layout).

    Shape:
        emission: (G, L, K, B, S); transmat: (G, K, K); keep: (G, L, B, S) or None; ``steps`` gives
        the buffers. Returns the row-normalised totals (G, B, S, K, K) and their log row scales (G, B, S, K) float64.
    """
    G, L, K, B, S = emission.shape
    sums = steps.buffer("block sums", (L, G, 1, B, S, K))
    tiny = torch.finfo(emission.dtype).tiny  # a row that is all zero stays zero (scale log tiny)
    ones = emission.new_ones(G, 1, K)
    forward = transmat.transpose(1, 2)  # (G, K, K): A^T
    transposed = torch.eye(K, dtype=emission.dtype, device=emission.device)[:, None, None, :].expand(G, K, B, S, K)
    buffers = steps.buffer("block products", (2, G, K, B, S, K)).unbind(0)  # the products alternate between the two
    emissions, step_sums = emission[..., None].unbind(1), sums.unbind(0)  # (G, K, B, S, 1), (G, 1, B, S, K)
    keeps = keep[:, :, None, :, :, None].unbind(1) if keep is not None else None
    last_total = None
    for j in range(L):
        step = buffers[j % 2]
        if j == 0:  # A diag(e) itself
            torch.mul(forward[:, :, None, None, :], emissions[0], out=step)  # (G, K, B, S, K)
        else:
            torch.bmm(forward, transposed.view(G, K, B * S * K), out=step.view(G, K, B * S * K))
            step.mul_(emissions[j])
        torch.bmm(ones, step.view(G, K, B * S * K), out=step_sums[j].view(G, 1, B * S * K)).clamp_min_(tiny)
        step.mul_(step_sums[j].reciprocal())
        transposed = step if keeps is None else _identity_where_invalid(step, transposed, keeps[j], out=step)
        if j == tail - 1 and tail < L:  # the last block ends here: later steps are padding
            last_total = transposed[:, :, B - 1].clone()
    if last_total is not None:
        transposed[:, :, B - 1] = last_total
        sums[tail:, :, :, B - 1] = 1.0
    if keep is not None:  # an invalid step has scale 1
        sums = _identity_where_invalid(sums, torch.ones_like(sums), keep.transpose(0, 1)[:, :, None, :, :, None])
    return transposed.permute(0, 2, 3, 4, 1), sums.squeeze(2).log().double().sum(0)


Scaled = tuple[Tensor, Tensor]  # row-scaled matrices (..., K, K) and their log row scales (..., K), float64


def _compose(first: Tensor, first_scales: Tensor, second: Tensor, second_scales: Tensor) -> Scaled:
    """The product of two row-scaled matrices, ``P = diag(exp r) Pn`` (rows of ``Pn`` sum to 1 or
    are 0), again row-scaled, in float64:

        (P1 P2)[i, :] = exp(r1_i + m_i) sum_k exp(log Pn1[i, k] + r2_k - m_i) Pn2[k, :],

    with ``m_i`` the largest exponent of row i, so that each row's weights peak at 1 (no row is
    lost however small its scale; only terms below 1e-308 of their row's largest vanish).

    Shape: first, second (..., K, K) float64; their scales (..., K) float64. Returns the same.
    """
    exponents = first.log().add_(second_scales.unsqueeze(-2))  # (..., K, K)
    top = exponents.amax(-1, keepdim=True)
    top.masked_fill_(top == -math.inf, 0.0)  # a zero row stays zero
    product = torch.matmul(exponents.sub_(top).exp_(), second)
    sums = _row_sums(product).clamp_min_(torch.finfo(torch.float64).tiny)
    return product.div_(sums), first_scales + top.squeeze(-1) + sums.log().squeeze(-1)


def _scan(products: Tensor, scales: Tensor, reverse: bool) -> Scaled:
    """Products of consecutive row-scaled matrices along axis 1 (G, B, ...), every one ending at
    its entry (forward: ``X_0 ... X_b``) or starting there (reverse: ``X_b ... X_{B-1}``)."""
    if not reverse:
        return _prefix(products, scales, lambda earlier, later: _compose(*earlier, *later))
    flipped = _prefix(products.flip(1), scales.flip(1), lambda earlier, later: _compose(*later, *earlier))
    return flipped[0].flip(1), flipped[1].flip(1)


def _prefix(products: Tensor, scales: Tensor, combine: Callable[[Scaled, Scaled], Scaled]) -> Scaled:
    """Inclusive prefix ``Y_b = combine(Y_{b-1}, X_b)`` along axis 1 by the work-efficient
    recursion: combine neighbouring pairs, scan the B // 2 pair products, then fill in the even
    entries; about 2 B combinations in 2 log2(B) levels."""
    B = products.shape[1]
    if B == 1:
        return products, scales
    pairs = combine((products[:, 0 : B - 1 : 2], scales[:, 0 : B - 1 : 2]), (products[:, 1::2], scales[:, 1::2]))
    odd_products, odd_scales = _prefix(pairs[0], pairs[1], combine)  # entry i: X_0 .. X_{2i+1}
    out_products, out_scales = torch.empty_like(products), torch.empty_like(scales)
    out_products[:, 1::2], out_scales[:, 1::2] = odd_products, odd_scales
    out_products[:, 0], out_scales[:, 0] = products[:, 0], scales[:, 0]
    if B > 2:  # entry 2i: (X_0 .. X_{2i-1}) X_{2i}
        head = (B - 1) // 2
        out_products[:, 2::2], out_scales[:, 2::2] = combine(
            (odd_products[:, :head], odd_scales[:, :head]), (products[:, 2::2], scales[:, 2::2])
        )
    return out_products, out_scales


def _start_vectors(log_vectors: Tensor, dtype: torch.dtype) -> Tensor:
    """Normalised probability vectors from log-vectors: (G, B, S, K) float64 -> (G, B, S, K)."""
    vectors = (log_vectors - log_vectors.amax(-1, keepdim=True)).exp_().to(dtype)
    vectors.div_(_row_sums(vectors))
    return vectors


def _scanned_blocks(blocks: _Blocks, reverse: bool) -> Scaled:
    """The products of the blocks up to every block (forward) or from it on (reverse), float64:
    (G, B, S, K, K) and their log row scales (G, B, S, K)."""
    return _scan(blocks.totals.double().contiguous(), blocks.log_scales, reverse)


def _state_first(vectors: Tensor) -> Tensor:
    """(G, B, S, K) -> (G, K, B S), the layout of the recursions inside the blocks."""
    G, B, S, K = vectors.shape
    return vectors.permute(0, 3, 1, 2).reshape(G, K, B * S)


def _filter_blocked(
    steps: _Steps, alpha: Tensor, log_norm0: Tensor, transmat: Tensor, blocks: _Blocks
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The filter by the two-level scan, writing ``alpha`` in place; returns the normalisers ``c_t``
    (G, T_pad, S, 1), the log-evidence without the emission scales (G, S) float64 (from the
    filter after the last block: invalid steps are the identity in the block products), and the
    filter and its normalisers in the layout of the blocks (see :class:`_Filtered`)."""
    e = blocks.emission
    G, L, K, B, S = e.shape
    initial = alpha[:, 0].log().double().add_(log_norm0.unsqueeze(-1))  # log(pi e_0), (G, S, K)
    products, scales = _scanned_blocks(blocks, reverse=False)
    # log of the filter after block b: logsumexp_k initial_k + r_bk + log Pn_b[k, :]
    ends = torch.logsumexp((initial.unsqueeze(1) + scales).unsqueeze(-1) + products.log(), -2)  # (G, B, S, K)
    starts = torch.cat([initial.unsqueeze(1), ends[:, : B - 1]], 1)  # at time b L
    inside = steps.buffer("block alpha", (L + 1, G, K, B * S))  # alpha at time b L + j, transposed
    inside[0] = _state_first(_start_vectors(starts, e.dtype))
    forward = transmat.transpose(1, 2)
    norms = e.new_empty(L, G, 1, B * S)
    ones = e.new_ones(G, 1, K)
    vectors, emissions, step_norms = inside.unbind(0), e.view(G, L, K, B * S).unbind(1), norms.unbind(0)
    for j in range(L):  # alpha_t^T = normalise(e_t * (A^T alpha_{t-1}^T)), t = 1 + b L + j
        torch.bmm(forward, vectors[j], out=vectors[j + 1]).mul_(emissions[j])
        torch.bmm(ones, vectors[j + 1], out=step_norms[j])
        vectors[j + 1].div_(step_norms[j])
    _in_blocks(alpha, L).copy_(inside[1:].view(L, G, K, B, S).permute(1, 3, 0, 4, 2))
    all_norms = e.new_ones(G, 1 + B * L, S, 1)
    _in_blocks(all_norms, L).copy_(norms.view(L, G, 1, B, S).permute(1, 3, 0, 4, 2))
    return all_norms, torch.logsumexp(ends[:, B - 1], -1), inside, norms


def _smooth_blocked(steps: _Steps, transmat: Tensor, blocks: _Blocks, filtered: _Filtered) -> Tensor:
    """The smoother by the two-level scan (invalid steps are the identity), scaled as in
    :func:`_scale_smoother`."""
    e = blocks.emission
    G, L, K, B, S = e.shape
    assert filtered.inside is not None and filtered.inside_norms is not None
    alpha, norms = filtered.inside, filtered.inside_norms  # (L + 1, G, K, B S), (L, G, 1, B S)
    cap = _smoother_cap(e.dtype)
    products, scales = _scanned_blocks(blocks, reverse=True)
    # log of the smoother at time (b + 1) L: P_{b+1} ... P_{B-1} times ones, and log 1 after the last block
    ends = scales[:, 1:] + _row_sums(products[:, 1:]).squeeze(-1).log()  # (G, B - 1, S, K)
    log_starts = _state_first(torch.cat([ends, ends.new_zeros(G, 1, S, K)], 1))  # (G, K, B S)
    # scaled as inside the blocks: exp(log beta - log(alpha . beta)), capped
    shift = torch.logsumexp(log_starts + alpha[L].double().log(), 1, keepdim=True)
    starts = (log_starts - shift).exp_().to(e.dtype).clamp_max_(cap)
    previous = starts
    inside = steps.buffer("block beta", (L, G, K, B * S))  # beta at time b L + j, transposed
    arriving = e.new_empty(G, K, B * S)
    vectors, emissions, step_norms = inside.unbind(0), e.view(G, L, K, B * S).unbind(1), norms.unbind(0)
    keeps = blocks.keep.view(G, L, 1, B * S).unbind(1) if blocks.keep is not None else None
    for j in range(L - 1, -1, -1):  # the transition at time 1 + b L + j of every block
        torch.bmm(transmat, torch.mul(emissions[j], previous, out=arriving), out=vectors[j])  # A (e_t * beta_t)
        _scale_smoother(vectors[j], step_norms[j], cap)
        if keeps is not None:
            _identity_where_invalid(vectors[j], previous, keeps[j], out=vectors[j])
        elif j == blocks.tail:  # time T - 1 = (B - 1) L + tail: the smoother restarts at 1
            vectors[j].view(G, K, B, S)[:, :, B - 1] = starts.view(G, K, B, S)[:, :, B - 1]
        previous = vectors[j]
    beta = steps.buffer("beta", (G, 1 + B * L, S, K))
    beta[:, :-1].view(G, B, L, S, K).copy_(inside.view(L, G, K, B, S).permute(1, 3, 0, 4, 2))
    beta[:, -1] = 1.0
    return beta


# ---------------------------------------------------------------------------------------------
# Viterbi (max-plus semiring, log space; every score renormalised to max 0, offsets summed in float64)


def _viterbi_sequential(steps: _Steps, log_startprob: Tensor, log_transmat: Tensor) -> tuple[Tensor, Tensor]:
    """Best path (G, T, S) (constant after a sequence's end) and its log-probability (G, S) float64."""
    le = steps.emission
    G, T, S, K = le.shape
    stay = torch.arange(K, device=le.device).expand(G, S, K)
    pointers = torch.empty(G, T, S, K, dtype=torch.int64, device=le.device)
    offsets = le.new_zeros(G, T, S, 1)
    score = log_startprob[:, None, :] + le[:, 0]  # (G, S, K)
    offsets[:, 0] = score.amax(-1, keepdim=True)
    score = score - offsets[:, 0]
    for t in range(1, T):
        best, arg = (score.unsqueeze(-1) + log_transmat.unsqueeze(1)).max(-2)  # over the previous state
        best.add_(le[:, t])
        top = best.amax(-1, keepdim=True).clamp_min_(torch.finfo(le.dtype).min)
        best.sub_(top)
        valid = steps.valid[:, t, :, None]  # an invalid step is the identity
        score = torch.where(valid, best, score)
        torch.where(valid, arg, stay, out=pointers[:, t])
        torch.where(valid, top, top.new_zeros(()), out=offsets[:, t])
    path = torch.empty(G, T, S, dtype=torch.int64, device=le.device)
    path[:, T - 1] = score.argmax(-1)
    for t in range(T - 1, 0, -1):
        torch.gather(pointers[:, t], -1, path[:, t].unsqueeze(-1), out=path[:, t - 1].unsqueeze(-1))
    return path, offsets.squeeze(-1).double().sum(1)


def _max_plus_block_products(
    le_blocks: Tensor, log_transmat: Tensor, valid_blocks: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Max-plus running products ``X_j(i, k) = max_l X_{j-1}(i, l) + log A(l, k) + le_j(k)`` inside
    every block, with their backpointers (the best ``l``), every row shifted to max 0.

    Shape:
        le_blocks: (G, B, L, S, K); log_transmat: (G, K, K); valid_blocks: (G, B, L, S).
        Returns the products (L, G, B, S, K, K), backpointers (L, G, B, S, K, K) int64 and the
        cumulative row offsets at the end of every block (G, B, S, K) float64.
    """
    G, B, L, S, K = le_blocks.shape
    dtype, device = le_blocks.dtype, le_blocks.device
    products = le_blocks.new_empty(L, G, B, S, K, K)
    pointers = torch.empty(L, G, B, S, K, K, dtype=torch.int64, device=device)
    offsets = le_blocks.new_empty(L, G, B, S, K, 1)
    stay = torch.arange(K, device=device).expand(G, B, S, K, K)
    eye = torch.eye(K, dtype=torch.bool, device=device)
    previous = torch.zeros(K, K, dtype=dtype, device=device).masked_fill_(~eye, -math.inf).expand(G, B, S, K, K)
    transition = log_transmat[:, None, None, None]  # (G, 1, 1, 1, K, K)
    for j in range(L):
        best, arg = (previous.unsqueeze(-1) + transition).max(-2)  # (G, B, S, K, K)
        best.add_(le_blocks[:, :, j, :, None, :])
        top = best.amax(-1, keepdim=True).clamp_min_(torch.finfo(dtype).min)
        best.sub_(top)
        valid = valid_blocks[:, :, j, :, None, None]
        torch.where(valid, best, previous, out=products[j])
        torch.where(valid, arg, stay, out=pointers[j])
        torch.where(valid, top, top.new_zeros(()), out=offsets[j])
        previous = products[j]
    return products, pointers, offsets.squeeze(-1).double().sum(0)


def _viterbi_blocked(steps: _Steps, log_startprob: Tensor, log_transmat: Tensor, L: int) -> tuple[Tensor, Tensor]:
    """Viterbi by the two-level scan: block products, a pass over the boundaries, then the
    backtracking of the boundaries and inside all blocks at once. Same outputs as
    :func:`_viterbi_sequential` (on the padded length)."""
    le = steps.emission
    G, T_pad, S, K = le.shape
    B = (T_pad - 1) // L
    device = le.device
    products, pointers, row_offsets = _max_plus_block_products(
        _in_blocks(le, L), log_transmat, _in_blocks(steps.valid, L)
    )
    score = (log_startprob[:, None, :] + le[:, 0]).double()  # (G, S, K)
    log_prob = score.amax(-1)
    score = score - log_prob.unsqueeze(-1)
    boundary_pointers = torch.empty(G, B, S, K, dtype=torch.int64, device=device)
    for b in range(B):
        candidates = (score + row_offsets[:, b]).unsqueeze(-1) + products[L - 1, :, b]  # (G, S, K, K) float64
        best, boundary_pointers[:, b] = candidates.max(-2)
        top = best.amax(-1, keepdim=True).clamp_min_(torch.finfo(torch.float64).min)
        log_prob = log_prob + top.squeeze(-1)
        score = best - top
    starts = torch.empty(G, B + 1, S, dtype=torch.int64, device=device)  # the state at time b L
    starts[:, B] = score.argmax(-1)
    for b in range(B - 1, -1, -1):
        starts[:, b] = boundary_pointers[:, b].gather(-1, starts[:, b + 1].unsqueeze(-1)).squeeze(-1)
    # backpointers of every block restricted to the row of its start state: (L, G, B, S, K)
    rows = pointers.gather(-2, starts[:, :B, :, None, None].expand(L, G, B, S, 1, K)).squeeze(-2)
    path = torch.empty(G, T_pad, S, dtype=torch.int64, device=device)
    path[:, 0] = starts[:, 0]
    inside = _in_blocks(path, L)  # (G, B, L, S), time 1 + b L + j
    current = starts[:, 1:]
    for j in range(L - 1, -1, -1):
        inside[:, :, j] = current
        current = rows[j].gather(-1, current.unsqueeze(-1)).squeeze(-1)
    return path, log_prob


def _cdf(log_prob: Tensor) -> Tensor:
    """Cumulative distribution over the last axis in float64, last entry exactly 1."""
    cumulative = log_prob.double().exp().cumsum(-1)
    return cumulative / cumulative[..., -1:]


class _LogLikelihood(torch.autograd.Function):
    """log p(x_s) with the exact gradients of one forward-backward pass (the expected statistics)."""

    @staticmethod
    def forward(ctx, log_emission, log_startprob, log_transmat, lengths, method):  # type: ignore[override]
        ctx.forward_pass = _forward_pass(log_emission, log_startprob, log_transmat, lengths, method, reusable=False)
        return ctx.forward_pass.filtered.log_evidence.to(log_emission.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_evidence):  # type: ignore[override]
        forward = ctx.forward_pass
        beta = _smooth(forward)
        posteriors, start, transitions = _statistics(forward, beta, grad_evidence)
        grad_emission = posteriors * grad_evidence[:, :, None, None]
        return grad_emission, start, transitions, None, None
