"""Rows with missing coordinates (NaN): their validation and their layout by missingness pattern.

With ``missing="marginalize"`` a model fits and evaluates rows whose missing entries are NaN by
exact EM (Ghahramani & Jordan 1994): the E-step marginalises each row's missing coordinates out
of every component's density and takes the expected statistics of the missing coordinates
given the observed ones (the family's :meth:`ComponentFamily.marginal`). Rows sharing a
missingness pattern share every factorisation a component needs for it (for a full Gaussian:
``Sigma_oo``'s Cholesky factor, the regression ``Sigma_mo Sigma_oo^-1`` and the conditional
covariance), so :class:`MissingRows` groups a chunk's rows by pattern: sorted by pattern and cut
into blocks of ``block_size`` rows that all have one pattern (the last block of a pattern padded
with a row of index ``n``), so the per-row work is one batched matrix product per block, with
no loop over rows or patterns.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

#: Choices of a model's ``missing`` option.
MISSING = ("reject", "marginalize")
#: Rows per block at most (a pattern with more rows takes several blocks).
MAX_BLOCK_SIZE = 64
#: A chunk of rows with missing entries may hold this many times the elements of a chunk of
#: complete rows (its offsets are D numbers per row and component, not one).
MISSING_BUDGET = 4


def marginalize_hint(supported: bool) -> str:
    """What the error for NaN in X tells a user."""
    if supported:
        return "to fit and evaluate with the missing entries (NaN) marginalised, pass missing='marginalize'"
    return "this model does not marginalise missing entries (NaN); remove or impute them"


def check_missing_values(X: torch.Tensor, name: str, missing: str, supported: bool = True,
                         allow_empty: bool = False) -> bool:
    """Validate the non-finite entries of X (..., n, D): NaN marks a missing entry when
    ``missing`` is ``"marginalize"`` (else it is an error that names the option); infinity is
    always an error, and so is a row with nothing observed unless ``allow_empty`` (a time step
    of an HMM with nothing observed: the chain carries it; a mixture's row without an observed
    entry carries no information). Returns whether X has NaN."""
    nan = torch.isnan(X)
    n_nan = int(nan.sum())
    n_infinite = int(torch.isinf(X).sum())
    if n_infinite:
        allowed = " (or NaN for a missing entry)" if missing == "marginalize" else ""
        raise ValueError(f"{name} must be finite{allowed}, got {n_nan} NaN and {n_infinite} infinite value(s)")
    if n_nan and missing != "marginalize":
        raise ValueError(f"{name} must be finite, got {n_nan} NaN value(s); {marginalize_hint(supported)}")
    if not n_nan:
        return False
    empty = nan.all(-1)  # (..., n)
    if not allow_empty and bool(empty.any()):
        first = [int(i) for i in empty.nonzero()[0]]
        raise ValueError(
            f"{name} has {int(empty.sum())} row(s) with nothing observed (every entry NaN), e.g. at index "
            f"{tuple(first) if len(first) > 1 else first[0]}; remove them (a row without an observed entry "
            "carries no information about the model)")
    return True


def pattern_share(X: torch.Tensor) -> float:
    """The number of distinct missingness patterns per row of X (..., n, D) (0 without NaN): the
    factorisations per row an E-step of rows with missing entries needs, at most 1."""
    missing = torch.isnan(X).reshape(-1, X.shape[-1])
    if not bool(missing.any()):
        return 0.0
    return torch.unique(missing, dim=0).shape[0] / max(1, X.shape[-2])


def observed_means(X: torch.Tensor) -> torch.Tensor:
    """The mean of every coordinate over its observed entries (..., 1, D) (0 for a coordinate
    with none)."""
    observed = ~torch.isnan(X)
    total = torch.where(observed, X, 0.0).sum(-2, keepdim=True)
    count = observed.sum(-2, keepdim=True)
    return torch.where(count > 0, total / count.clamp_min(1), 0.0)


def mean_imputed(X: torch.Tensor, means: torch.Tensor | None = None) -> torch.Tensor:
    """X (..., n, D) with every NaN replaced by its coordinate's mean (``means`` (..., 1, D),
    by default :func:`observed_means` of X)."""
    means = observed_means(X) if means is None else means
    return torch.where(torch.isnan(X), means.to(X.dtype), X)


def with_observed_values(X: torch.Tensor) -> torch.Tensor:
    """X (..., n, D) with every NaN replaced by an observed value of its coordinate (the first
    one; 0 for a coordinate with none), so that a check of the family's support sees only
    observed values."""
    flat = X.reshape(-1, X.shape[-1])
    observed = ~torch.isnan(flat)
    first = observed.to(torch.uint8).argmax(0)  # (D,) the first observed row of each coordinate
    values = flat.gather(0, first.unsqueeze(0)).nan_to_num(0.0)  # (1, D)
    return torch.where(torch.isnan(X), values, X)


@dataclass
class MissingRows:
    """Rows of a chunk with missing entries, laid out by missingness pattern.

    X: (n, D) shared by every model or (M, n, D), missing entries filled with 0;
    observed: bool, the shape of X; patterns: (P, D) bool, the distinct patterns (of all models);
    row_pattern: (n,) or (M, n) each row's pattern; block_size: b rows per block;
    block_rows: (M', nb * b) the rows of each block (``n`` pads a block), M' = 1 for shared data;
    block_pattern: (M', nb) each block's pattern; position: (M', n) each row's place in
    ``block_rows``; block_points: (M', nb, b, D) the rows of X in blocks (0 at padding);
    block_observed: (M', nb, 1, D) bool, each block's pattern.
    """

    X: torch.Tensor
    observed: torch.Tensor
    patterns: torch.Tensor
    row_pattern: torch.Tensor
    block_size: int
    block_rows: torch.Tensor
    block_pattern: torch.Tensor
    position: torch.Tensor
    block_points: torch.Tensor
    block_observed: torch.Tensor
    _features: tuple[torch.Tensor, torch.Tensor] | None = None  # (reference, features) of the last call

    @staticmethod
    def of(X: torch.Tensor) -> "MissingRows":
        """The layout of rows X (n, D) or (M, n, D) whose missing entries are NaN."""
        observed = ~torch.isnan(X)
        n, D = X.shape[-2:]
        patterns, inverse = _unique_patterns(observed.reshape(-1, D))
        row_pattern = inverse.view(observed.shape[:-1])
        by_model = row_pattern.reshape(-1, n)  # (M', n)
        block_size = _block_size(by_model, patterns.shape[0])
        block_rows, block_pattern, position = _blocks(by_model, patterns.shape[0], block_size)
        filled = torch.where(observed, X, 0.0)
        padded = torch.cat([filled, filled.new_zeros(*filled.shape[:-2], 1, D)], -2).reshape(-1, n + 1, D)
        points = padded.gather(1, block_rows.unsqueeze(-1).expand(-1, -1, D)).view(block_rows.shape[0], -1, block_size, D)
        return MissingRows(filled, observed, patterns, row_pattern, block_size, block_rows, block_pattern, position,
                           points, patterns[block_pattern].unsqueeze(-2))

    @property
    def n_blocks(self) -> int:
        return self.block_pattern.shape[-1]

    def select_models(self, models: torch.Tensor) -> "MissingRows":
        """The rows of the models ``models`` (A,) only (shared rows stay shared)."""
        if self.X.dim() == 2:
            return self
        return MissingRows(self.X[models], self.observed[models], self.patterns, self.row_pattern[models],
                           self.block_size, self.block_rows[models], self.block_pattern[models], self.position[models],
                           self.block_points[models], self.block_observed[models])

    def centred_features(self, family: Any, reference: torch.Tensor) -> torch.Tensor:
        """The family's features of ``O (x - s)`` (the rows about the reference s, 0 at their
        missing coordinates) in the block layout followed by a 1 (so that one product gives a
        linear form plus a constant, or sums and counts), (M', nb, b, F + 1); kept for the next
        call with the same reference (the rest of a fit)."""
        if self._features is None or self._features[0] is not reference:
            shift = reference if reference.dim() < 3 else reference.unsqueeze(-2)  # (1, D) or (M, 1, 1, D)
            centred = (self.block_points - shift) * self.block_observed.to(self.block_points.dtype)
            features = family.features(centred, None)[0]
            self._features = (reference, torch.cat([features, features.new_ones(*features.shape[:-1], 1)], -1))
        return self._features[1]

    def blocked(self, values: torch.Tensor) -> torch.Tensor:
        """Per-row values (R, M, K, n) -> the block layout (R, M, K, nb * b), 0 at padding."""
        padded = torch.cat([values, values.new_zeros(*values.shape[:-1], 1)], -1)
        return padded.gather(-1, self._index(self.block_rows, padded.shape[:-1]))

    def unblocked(self, values: torch.Tensor) -> torch.Tensor:
        """Values in the block layout (R, M, K, nb * b) -> per row (R, M, K, n)."""
        return values.gather(-1, self._index(self.position, values.shape[:-1]))

    def _index(self, index: torch.Tensor, leading: torch.Size) -> torch.Tensor:
        """A per-model index (M', L) expanded to (R, M, K, L) for ``gather`` along the last axis
        (much faster on CPU than ``index_select`` there)."""
        return index[None, :, None].expand(*leading, index.shape[-1])


def _unique_patterns(observed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct rows (P, D) of a bool mask (n, D), sorted, and each row's index among them
    (n,). Up to 62 coordinates a row is one int64 key (a 1-d unique, much faster than
    ``torch.unique(dim=0)``)."""
    D = observed.shape[-1]
    if D > 62:
        return torch.unique(observed, dim=0, return_inverse=True)
    bits = 2 ** torch.arange(D - 1, -1, -1, device=observed.device)  # the first coordinate most significant
    keys, inverse = torch.unique(observed.long() @ bits, return_inverse=True)
    return (keys.unsqueeze(-1) & bits) > 0, inverse


#: What a block costs beyond its rows, in rows (one more small matrix product).
BLOCK_OVERHEAD_ROWS = 8


def _block_size(row_pattern: torch.Tensor, n_patterns: int) -> int:
    """The rows per block (a power of 2 up to MAX_BLOCK_SIZE) that make the fewest padded rows
    plus BLOCK_OVERHEAD_ROWS per block, from each pattern's number of rows (M', n)."""
    counts = torch.zeros(row_pattern.shape[0], n_patterns, dtype=torch.long, device=row_pattern.device)
    counts.scatter_add_(1, row_pattern, torch.ones_like(row_pattern))
    sizes = [2 ** i for i in range(MAX_BLOCK_SIZE.bit_length()) if 2 ** i <= MAX_BLOCK_SIZE]
    costs = [int(((counts + size - 1) // size).sum()) * (size + BLOCK_OVERHEAD_ROWS) for size in sizes]
    return sizes[costs.index(min(costs))]


def _blocks(row_pattern: torch.Tensor, n_patterns: int, block_size: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The block layout of rows by pattern, one per model: rows sorted by pattern (stably), each
    pattern's rows cut into blocks of ``block_size``, the last one padded with ``n``.

    Shape:
        row_pattern: (M', n) -> block_rows (M', nb * b), block_pattern (M', nb), position (M', n)
    """
    n_models, n = row_pattern.shape
    device = row_pattern.device
    counts = torch.zeros(n_models, n_patterns, dtype=torch.long, device=device)
    counts.scatter_add_(1, row_pattern, torch.ones_like(row_pattern))
    n_group_blocks = (counts + block_size - 1) // block_size  # (M', P)
    first_block = n_group_blocks.cumsum(1) - n_group_blocks
    first_row = counts.cumsum(1) - counts  # of each pattern among the sorted rows
    n_blocks = max(1, int(n_group_blocks.sum(1).max()))
    order = torch.sort(row_pattern, dim=1, stable=True).indices  # (M', n) rows by pattern
    sorted_pattern = row_pattern.gather(1, order)
    rank = torch.arange(n, device=device).expand(n_models, n) - first_row.gather(1, sorted_pattern)
    block = first_block.gather(1, sorted_pattern) + rank // block_size
    slot = block * block_size + rank % block_size  # (M', n)
    block_rows = torch.full((n_models, n_blocks * block_size), n, dtype=torch.long, device=device)
    block_rows.scatter_(1, slot, order)
    position = torch.empty_like(row_pattern).scatter_(1, order, slot)
    block_pattern = torch.zeros(n_models, n_blocks, dtype=torch.long, device=device)
    block_pattern.scatter_(1, block, sorted_pattern)
    return block_rows, block_pattern, position
