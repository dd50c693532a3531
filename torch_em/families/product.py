"""Product components over blocks of features: one mixture for mixed data.

``Product([(Gaussian("diag"), [0, 1, 2]), (Categorical(4), slice(3, 5))])`` models columns 0-2 of X
with diagonal Gaussians and columns 3-4 with categorical distributions; within a component the
blocks are independent, so

    log p(x | k) = sum_b log p_b(x[cols_b] | k)
    T = [T_1(x[cols_1]), T_2(x[cols_2]), ...],   eta = [eta_1, eta_2, ...],   c = sum_b c_b,   h = sum_b h_b

and the M-step is each block's own M-step on its slice of the statistics. The blocks must
partition the columns ``0 .. D-1`` (each column in exactly one block, in any order).

Parameters are the blocks' parameters with the block's position as prefix: ``block0_loc``,
``block0_raw_precision_cholesky``, ``block1_logit_categories``; :meth:`Product.block_theta`
gives one block's parameters under their own names, so the block family's constrained views
apply (``product.blocks[0].family.covariance(product.block_theta(model.theta(), 0))``).

Reference point: a block whose family takes statistics about a reference point (Gaussians) gets
its own ``reference`` of its columns; :meth:`Product.reference` assembles them into one ``(..., 1, D)``
tensor (zeros in the columns of the other blocks, which receive ``None`` as before).

Initialisation clusters the concatenation of the blocks' embeddings, each block centred and
scaled to a total variance equal to its number of columns, so that no block dominates the
initial k-means because of its units. Because that scaling depends on the data, the product
does not seed the initial assignment with user centres (a block's ``*_init`` arguments still set
that block's initial parameters).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral
from typing import Any, Mapping, Sequence, cast

import numpy as np
import torch

from ..missing import MissingRows
from .base import ComponentFamily, Marginal, Theta


@dataclass(frozen=True)
class Block:
    """One block of a :class:`Product`: a family and the columns of X it models."""

    family: ComponentFamily
    columns: tuple[int, ...]
    prefix: str  # parameter-name prefix, e.g. "block0_"
    names: tuple[str, ...]  # the family's own parameter names
    index: Any  # slice (contiguous columns: a view) or list of ints
    has_reference: bool

    @property
    def n_columns(self) -> int:
        return len(self.columns)

    def describe(self, position: int) -> str:
        if len(self.columns) == 1:
            cols = f"column {self.columns[0]}"
        elif isinstance(self.index, slice):
            cols = f"columns {self.index.start}:{self.index.stop}"
        else:
            cols = f"columns {list(self.columns)}"
        return f"block {position} ({type(self.family).__name__}, {cols})"


def _resolve_columns(columns: Any, position: int) -> tuple[int, ...]:
    """A block's column specification -> a tuple of distinct non-negative ints."""
    where = f"blocks[{position}] columns"
    if isinstance(columns, slice):
        start = 0 if columns.start is None else columns.start
        step = 1 if columns.step is None else columns.step
        if columns.stop is None or not all(isinstance(v, Integral) for v in (start, columns.stop, step)) \
                or start < 0 or columns.stop < 0 or step <= 0:
            raise ValueError(
                f"{where} as a slice needs non-negative integer start and stop and a positive step "
                f"(e.g. slice(3, 5)), got {columns!r}"
            )
        resolved = tuple(range(start, columns.stop, step))
    else:
        if isinstance(columns, Integral) and not isinstance(columns, bool):
            columns = [columns]
        if isinstance(columns, torch.Tensor):
            columns = columns.tolist()
        try:
            values = list(np.asarray(columns).reshape(-1).tolist()) if not isinstance(columns, range) else list(columns)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where} must be a slice or a sequence of integers, got {columns!r}") from err
        if not all(isinstance(v, Integral) and not isinstance(v, bool) and int(v) >= 0 for v in values):
            raise ValueError(f"{where} must be non-negative integers, got {columns!r}")
        resolved = tuple(int(v) for v in values)
    if not resolved:
        raise ValueError(f"{where} must name at least one column, got {columns!r}")
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"{where} must not repeat a column, got {list(resolved)}")
    return resolved


def _index_of(columns: tuple[int, ...]) -> Any:
    contiguous = columns == tuple(range(columns[0], columns[0] + len(columns)))
    return slice(columns[0], columns[0] + len(columns)) if contiguous else list(columns)


class Product(ComponentFamily):
    """Components that are products of independent families over blocks of columns.

    Args:
        blocks: a non-empty sequence of ``(family, columns)`` pairs; ``columns`` is a slice with
            explicit bounds, a range, a sequence or 1-d array of column indices, or one index. The
            blocks must partition the columns ``0 .. D-1``.

    Shape:
        X: ``(N, D)`` or ``(*batch_shape, N, D)`` with D the total number of columns; each block's
        columns must be in its family's domain.
        parameters: every block's parameters, named ``block{i}_{name}``.
    """

    def __init__(self, blocks: Sequence[tuple[ComponentFamily, Any]]) -> None:
        if isinstance(blocks, (str, bytes)) or not isinstance(blocks, Sequence) or len(blocks) == 0:
            raise ValueError(f"blocks must be a non-empty sequence of (family, columns) pairs, got {blocks!r}")
        resolved: list[Block] = []
        for position, block in enumerate(blocks):
            if not isinstance(block, (tuple, list)) or len(block) != 2:
                raise ValueError(f"blocks[{position}] must be a (family, columns) pair, got {block!r}")
            family, columns = block
            if not isinstance(family, ComponentFamily):
                raise ValueError(
                    f"blocks[{position}] must start with a ComponentFamily (e.g. Gaussian('diag')), got {family!r}"
                )
            columns = _resolve_columns(columns, position)
            prefix = f"block{position}_"
            names = tuple(family.event_shapes(1, len(columns)))
            resolved.append(Block(family, columns, prefix, names, _index_of(columns), family.uses_reference))
        order = [c for block in resolved for c in block.columns]
        if len(set(order)) != len(order):
            seen: set[int] = set()
            repeated = sorted({c for c in order if c in seen or seen.add(c)})  # type: ignore[func-returns-value]  # add() is None: it records c
            raise ValueError(f"blocks must not share columns, got column(s) {repeated} in more than one block")
        if set(order) != set(range(len(order))):
            missing = sorted(set(range(max(order) + 1)) - set(order))
            raise ValueError(
                f"blocks must cover the columns 0..D-1 exactly once, got {len(order)} column(s) with "
                f"column(s) {missing} in no block"
            )
        self.blocks: tuple[Block, ...] = tuple(resolved)
        self.n_columns = len(order)
        #: X[..., order] lists the columns block by block; Y[..., inverse] undoes that.
        self._order = order
        self._inverse = None if order == sorted(order) else [int(i) for i in np.argsort(order)]
        self.min_count = max(block.family.min_count for block in self.blocks)

    def __repr__(self) -> str:
        inner = ", ".join(f"({type(b.family).__name__}, {list(b.columns)})" for b in self.blocks)
        return f"Product([{inner}])"

    def config(self) -> dict[str, Any]:
        return {"blocks": [(block.family, list(block.columns)) for block in self.blocks]}

    # --- helpers -----------------------------------------------------------------------------
    def _check_n_features(self, n_features: int) -> None:
        if n_features != self.n_columns:
            raise ValueError(
                f"n_features must be {self.n_columns} (the columns of the Product's blocks), got {n_features}"
            )

    def block_theta(self, theta: Mapping[str, torch.Tensor], position: int) -> Theta:
        """The parameters of block ``position`` under the block family's own names."""
        block = self.blocks[position]
        return {name: theta[block.prefix + name] for name in block.names}

    def _block_shift(self, reference: torch.Tensor | None, block: Block) -> torch.Tensor | None:
        return None if reference is None or not block.has_reference else reference[..., block.index]

    def _merge(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """Block-ordered pieces (..., D_b) -> (..., D) in the columns' own order."""
        merged = torch.cat(list(parts), dim=-1)
        return merged if self._inverse is None else merged[..., self._inverse]

    def _split_statistics(self, stats: torch.Tensor) -> list[torch.Tensor]:
        sizes = [block.family.n_statistics(block.n_columns) for block in self.blocks]
        return list(stats.split(sizes, dim=-1))

    # --- parameter layout -------------------------------------------------------------------
    def event_shapes(self, n_components: int, n_features: int) -> dict[str, tuple[int, ...]]:
        # The blocks fix the number of columns; n_features is not needed (Mixture asks with 1 for names).
        return {
            block.prefix + name: shape
            for block in self.blocks
            for name, shape in block.family.event_shapes(n_components, block.n_columns).items()
        }

    def n_free_parameters(self, n_components: int, n_features: int) -> int:
        self._check_n_features(n_features)
        return sum(block.family.n_free_parameters(n_components, block.n_columns) for block in self.blocks)

    def n_statistics(self, n_features: int) -> int:
        self._check_n_features(n_features)
        return sum(block.family.n_statistics(block.n_columns) for block in self.blocks)

    def n_features_of(self, theta: Mapping[str, torch.Tensor]) -> int:
        return self.n_columns

    def default_parameters(self, batch_shape, n_components, n_features, generator, device, dtype) -> Theta:
        self._check_n_features(n_features)
        theta: Theta = {}
        for block in self.blocks:
            part = block.family.default_parameters(batch_shape, n_components, block.n_columns, generator, device, dtype)
            theta.update({block.prefix + name: value for name, value in part.items()})
        return theta

    def user_initial_parameters(self, batch_shape, n_components, n_features, device, dtype) -> Theta:
        self._check_n_features(n_features)
        theta: Theta = {}
        for block in self.blocks:
            part = block.family.user_initial_parameters(batch_shape, n_components, block.n_columns, device, dtype)
            theta.update({block.prefix + name: value for name, value in part.items()})
        return theta

    # --- data --------------------------------------------------------------------------------
    def check_domain(self, X: torch.Tensor, name: str) -> None:
        if X.shape[-1] != self.n_columns:
            raise ValueError(
                f"{name} must have D={self.n_columns} columns (the columns of the Product's blocks), "
                f"got shape {tuple(X.shape)}"
            )
        for position, block in enumerate(self.blocks):
            block.family.check_domain(X[..., block.index], f"{name} {block.describe(position)}")

    def reference(self, X: torch.Tensor) -> torch.Tensor | None:
        return self._merged_reference(lambda position, block: block.family.reference(X[..., block.index]),
                                      lambda block: X.new_zeros(*X.shape[:-2], 1, block.n_columns))

    def parameter_reference(self, theta, weights) -> torch.Tensor | None:
        return self._merged_reference(
            lambda position, block: block.family.parameter_reference(self.block_theta(theta, position), weights),
            lambda block: weights.new_zeros(*weights.shape[:-1], 1, block.n_columns),
        )

    def _merged_reference(self, block_reference, zeros) -> torch.Tensor | None:
        """The blocks' reference points (..., 1, D_block) side by side (zeros for blocks without
        one), or None when no block has one."""
        if not any(block.has_reference for block in self.blocks):
            return None
        parts = []
        for position, block in enumerate(self.blocks):
            part = block_reference(position, block) if block.has_reference else None
            parts.append(zeros(block) if part is None else part)
        lead = torch.broadcast_shapes(*(part.shape[:-1] for part in parts))
        return self._merge([part.expand(*lead, part.shape[-1]) for part in parts])

    def embedding(self, X: torch.Tensor, reference: torch.Tensor | None) -> torch.Tensor:
        parts = []
        for block in self.blocks:
            part = block.family.embedding(X[..., block.index], self._block_shift(reference, block))
            part = part - part.mean(-2, keepdim=True)
            spread = part.square().sum(-1, keepdim=True).mean(-2, keepdim=True)  # total variance (..., 1, 1)
            scale = (block.n_columns / spread.clamp_min(torch.finfo(part.dtype).tiny)).sqrt()
            parts.append(part * scale)
        return torch.cat(parts, dim=-1)

    def features(self, X: torch.Tensor, reference: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        statistics, base = [], None
        for block in self.blocks:
            T, h = block.family.features(X[..., block.index], self._block_shift(reference, block))
            statistics.append(T)
            if h is not None:
                base = h if base is None else base + h
        return torch.cat(statistics, dim=-1), base

    # --- EM ----------------------------------------------------------------------------------
    def natural_parameters(self, theta, reference) -> tuple[torch.Tensor, torch.Tensor]:
        etas, const = [], None
        for position, block in enumerate(self.blocks):
            eta, c = block.family.natural_parameters(self.block_theta(theta, position), self._block_shift(reference, block))
            etas.append(eta)
            const = c if const is None else const + c
        lead = torch.broadcast_shapes(*(eta.shape[:-1] for eta in etas))
        # blocks is non-empty (checked in __init__), so const is a tensor
        return torch.cat([eta.expand(*lead, eta.shape[-1]) for eta in etas], dim=-1), cast(torch.Tensor, const)

    def m_step(self, counts, stats, reference) -> tuple[Theta, torch.Tensor]:
        return self.conditional_m_step(counts, stats, reference, {})

    def _block_fixed(self, fixed: Mapping[str, torch.Tensor], block: Block) -> Theta:
        return {name: fixed[block.prefix + name] for name in block.names if block.prefix + name in fixed}

    def supports_fixing(self, names: set[str]) -> bool:
        return all(
            block.family.supports_fixing({name for name in block.names if block.prefix + name in names})
            for block in self.blocks
        )

    def conditional_m_step(self, counts, stats, reference, fixed) -> tuple[Theta, torch.Tensor]:
        theta: Theta = {}
        valid = None
        # Counts per statistic (a prior's) split like the statistics.
        block_counts = self._split_statistics(counts) if counts.dim() == stats.dim() else [counts] * len(self.blocks)
        for block, part, part_counts in zip(self.blocks, self._split_statistics(stats), block_counts):
            block_theta, block_valid = block.family.conditional_m_step(
                part_counts, part, self._block_shift(reference, block), self._block_fixed(fixed, block)
            )
            theta.update({block.prefix + name: value for name, value in block_theta.items()})
            valid = block_valid if valid is None else valid & block_valid
        return theta, cast(torch.Tensor, valid)  # blocks is non-empty (checked in __init__)

    def invalid_component_advice(self) -> str:
        return "; or ".join(
            f"in {block.describe(i)}: {block.family.invalid_component_advice()}" for i, block in enumerate(self.blocks)
        )

    def reseed_statistics(self, point_features, counts, sums, empty) -> torch.Tensor:
        parts = [
            block.family.reseed_statistics(point, counts, block_sums, empty)
            for block, point, block_sums in zip(self.blocks, self._split_statistics(point_features), self._split_statistics(sums))
        ]
        lead = torch.broadcast_shapes(*(part.shape[:-1] for part in parts))
        return torch.cat([part.expand(*lead, part.shape[-1]) for part in parts], dim=-1)

    # --- missing coordinates -------------------------------------------------------------------
    def check_missing(self, name: str) -> None:
        for position, block in enumerate(self.blocks):
            block.family.check_missing(f"{name} {block.describe(position)}")

    def marginal(self, rows, theta, reference=None) -> Marginal:
        return ProductMarginal(self, rows, theta, reference)

    def sample(self, theta, labels, generator) -> torch.Tensor:
        parts = [
            block.family.sample(self.block_theta(theta, position), labels, generator)
            for position, block in enumerate(self.blocks)
        ]
        return self._merge(parts)


class ProductMarginal(Marginal):
    """A product's blocks on rows with missing entries: each block's marginal (of the block's
    columns of the rows; a row may miss all of them), the densities added, the statistics side
    by side in the blocks' order."""

    def __init__(self, family: Product, rows: MissingRows, theta: Mapping[str, torch.Tensor],
                 reference: torch.Tensor | None):
        self.family, self.rows = family, rows
        with_nan = rows.X.masked_fill(~rows.observed, math.nan)
        self.parts = [block.family.marginal(MissingRows.of(with_nan[..., block.index]), family.block_theta(theta, i),
                                            family._block_shift(reference, block))
                      for i, block in enumerate(family.blocks)]
        self.log_prob = cast(torch.Tensor, sum(part.log_prob for part in self.parts))  # one part per block, >= 1

    def statistics(self, resp: torch.Tensor, about: torch.Tensor | None) -> torch.Tensor:
        parts = [part.statistics(resp, None if about is None or not block.has_reference else about[..., block.index])
                 for block, part in zip(self.family.blocks, self.parts)]
        lead = torch.broadcast_shapes(*(part.shape[:-1] for part in parts))
        return torch.cat([part.expand(*lead, part.shape[-1]) for part in parts], dim=-1)

    def conditional_means(self) -> torch.Tensor:
        return self.family._merge([part.conditional_means() for part in self.parts])

    def imputed(self, resp: torch.Tensor) -> torch.Tensor:
        return self.family._merge([part.imputed(resp) for part in self.parts])

    def draw(self, components: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.family._merge([part.draw(components, generator) for part in self.parts])
