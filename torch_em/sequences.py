"""Sequences as users pass them to a hidden Markov model, and as the engine takes them.

Two input forms, either as torch tensors or numpy arrays:

- padded: ``(S, T, D)`` shared by every model of a batch, or ``(*batch_shape, S, T, D)`` one set
  per model, with ``lengths (S,)`` (``1 <= lengths <= T``; None: every sequence has T steps) or
  a prefix ``mask (S, T)`` of valid steps; whatever the padded steps hold (0, NaN) is ignored;
- concatenated (hmmlearn's): ``(N, D)`` with ``lengths`` summing to N (None: one sequence).

Categorical codes may drop their last axis of size 1 (``(S, T)`` padded, ``(N,)`` concatenated).
Either form becomes :class:`Sequences`: rows ``(S * T, D)`` (or ``(M, S * T, D)``), sequence
after sequence, with the padded steps filled with their sequence's last step (a value the
family accepts, or NaN where that step has missing entries; their weight is 0, so they count
nowhere).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ._tracing import is_traced
from ._validation import check_finite


@dataclass
class Sequences:
    """Validated sequences in the working layout.

    rows: (S * T, D) shared or (M, S * T, D) per model; lengths: (S,) int64; n_steps: T;
    concatenated: whether they were given as hmmlearn's ``(N, D)`` (results per step then come
    back as ``(..., N, ...)``).
    """

    rows: torch.Tensor
    lengths: torch.Tensor
    n_steps: int
    concatenated: bool

    @property
    def n_sequences(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def valid(self) -> torch.Tensor:
        """(S, T) bool: the steps that are not padding."""
        return torch.arange(self.n_steps, device=self.lengths.device) < self.lengths.unsqueeze(-1)

    @property
    def n_points(self) -> int:
        """Valid steps over all sequences."""
        return int(self.lengths.sum())

    def valid_rows(self) -> torch.Tensor:
        """The rows of the valid steps: (N, D) or (M, N, D)."""
        return self.rows[..., self.valid.flatten(), :]

    def per_step(self, values: torch.Tensor, n_trailing: int = 0) -> torch.Tensor:
        """Per-step results ``(..., S, T, *trailing)`` as the user's form: padded unchanged,
        concatenated as ``(..., N, *trailing)``."""
        if not self.concatenated:
            return values
        lead = values.dim() - 2 - n_trailing
        flat = values.flatten(lead, lead + 1)  # (..., S * T, *trailing)
        return flat.index_select(lead, self.valid.flatten().nonzero().squeeze(-1))


def as_sequences(
    X: torch.Tensor, lengths: Any, mask: Any, *, name: str, n_features: int | None, batch_shape: tuple[int, ...],
    codes: bool, finite: bool = True,
) -> Sequences:
    """``X`` (a floating tensor in the model's dtype and device, any shape) with ``lengths`` or
    ``mask`` as :class:`Sequences`; ValueError naming the argument for anything malformed.

    n_features: D when known; batch_shape: the model's; codes: whether X holds one categorical
    variable whose axis of size 1 may be dropped (then a last axis of another size is T);
    finite: whether the valid steps are checked finite here (False: the caller validates their
    values, e.g. NaN at missing entries, :func:`torch_em.missing.check_missing_values`)."""
    if lengths is not None and mask is not None:
        raise ValueError("pass lengths or mask, not both")
    if codes and (X.dim() == 1 or X.shape[-1] != 1):
        X = X.unsqueeze(-1)  # codes (N,), (S, T) or (*batch_shape, S, T)
    batch = tuple(batch_shape)
    if X.dim() == 2:
        if mask is not None:
            raise ValueError(f"mask is for padded {name} (S, T, D); concatenated {name} (N, D) takes lengths")
        sequences = _padded_from_concatenated(X, lengths, name)
    elif X.dim() == 3 or (batch and X.dim() == 3 + len(batch) and tuple(X.shape[:len(batch)]) == batch):
        sequences = _padded(X, lengths, mask, name)
    else:
        shapes = "(N, D), (S, T, D)" + (f" or ({', '.join(map(str, batch))}, S, T, D)" if batch else "")
        raise ValueError(f"{name} must have shape {shapes}, got {tuple(X.shape)}")
    D = sequences.rows.shape[-1]
    if D < 1 or (n_features is not None and D != n_features):
        raise ValueError(f"{name} must have {n_features if n_features is not None else 'at least 1'} feature(s) "
                         f"in its last axis, got shape {tuple(X.shape)}")
    if finite and not is_traced(X):  # values are checked when they exist (not under export, compile, vmap)
        check_finite(sequences.valid_rows(), name)
    return sequences


def _lengths_tensor(lengths: Any, device: torch.device) -> torch.Tensor:
    """``lengths`` as a 1-D int64 tensor of positive integers, or ValueError."""
    array = np.asarray(lengths.detach().cpu() if isinstance(lengths, torch.Tensor) else lengths)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"lengths must be a 1-D sequence of sequence lengths, got shape {array.shape}")
    if not (np.issubdtype(array.dtype, np.integer) or (np.issubdtype(array.dtype, np.floating)
                                                       and np.all(np.isfinite(array)) and np.all(array == np.round(array)))):
        raise ValueError(f"lengths must hold integers, got dtype {array.dtype}")
    if bool((array < 1).any()):
        raise ValueError(f"lengths must be >= 1 (an empty sequence has no states), got {array[array < 1][:5].tolist()}")
    return torch.as_tensor(array.astype(np.int64), device=device)


def _padded_from_concatenated(X: torch.Tensor, lengths: Any, name: str) -> Sequences:
    """hmmlearn's (N, D) with lengths summing to N, padded to (S, max length, D)."""
    N = X.shape[0]
    lengths = torch.tensor([N], device=X.device) if lengths is None else _lengths_tensor(lengths, X.device)
    if int(lengths.sum()) != N:
        raise ValueError(f"lengths must sum to the number of rows of {name} ({N}), got {int(lengths.sum())}")
    T = int(lengths.max())
    valid = torch.arange(T, device=X.device) < lengths.unsqueeze(-1)  # (S, T)
    padded = X.new_zeros(lengths.shape[0], T, X.shape[-1])
    padded[valid] = X
    return _filled(padded, lengths, concatenated=True)


def _padded(X: torch.Tensor, lengths: Any, mask: Any, name: str) -> Sequences:
    """Padded (..., S, T, D) with lengths (S,) or a prefix mask (S, T)."""
    S, T = X.shape[-3], X.shape[-2]
    if S < 1 or T < 1:
        raise ValueError(f"{name} must hold at least one sequence of at least one step, got shape {tuple(X.shape)}")
    if mask is not None:
        lengths = _lengths_of_mask(mask, S, T, X.device)
    elif lengths is None:
        lengths = torch.full((S,), T, dtype=torch.long, device=X.device)
    else:
        lengths = _lengths_tensor(lengths, X.device)
        if lengths.shape[0] != S:
            raise ValueError(f"lengths must have one entry per sequence of {name} ({S}), got {lengths.shape[0]}")
        if int(lengths.max()) > T:
            raise ValueError(f"lengths must be at most the padded length of {name} ({T}), got {int(lengths.max())}")
    return _filled(X, lengths, concatenated=False)


def _lengths_of_mask(mask: Any, S: int, T: int, device: torch.device) -> torch.Tensor:
    mask = torch.as_tensor(np.asarray(mask.cpu() if isinstance(mask, torch.Tensor) else mask), device=device)
    if mask.shape != (S, T) or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a boolean (S, T) = ({S}, {T}) array of valid steps, got {mask.dtype} "
                         f"{tuple(mask.shape)}")
    lengths = mask.sum(-1)
    if not bool((mask == (torch.arange(T, device=device) < lengths.unsqueeze(-1))).all()):
        raise ValueError("mask must mark a prefix of every sequence (valid steps first, then padding)")
    if bool((lengths < 1).any()):
        raise ValueError("mask must mark at least one valid step in every sequence")
    return lengths


def _filled(X: torch.Tensor, lengths: torch.Tensor, concatenated: bool) -> Sequences:
    """Padded steps set to their sequence's last valid step; rows (..., S * T, D)."""
    S, T, D = X.shape[-3:]
    valid = torch.arange(T, device=X.device) < lengths.unsqueeze(-1)  # (S, T)
    if is_traced(X) or not bool(valid.all()):  # traced: the same values without a branch on them
        last = (lengths - 1).view(S, 1, 1).expand(*X.shape[:-3], S, 1, D)
        X = torch.where(valid.unsqueeze(-1), X, X.gather(-2, last))
    rows = X.reshape(*X.shape[:-3], S * T, D)
    if rows.dim() > 3:
        rows = rows.flatten(0, -3)  # (M, S * T, D)
    return Sequences(rows, lengths, T, concatenated)
