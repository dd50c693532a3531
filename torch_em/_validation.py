"""Input checks shared by every public entry point.

Each check raises a ``ValueError`` that names the argument, what was expected and what came.
Checks never modify a model: callers validate everything before they change any state.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch


def as_float_tensor(
    value: Any, name: str, *, device: torch.device | None, dtype: torch.dtype | None
) -> torch.Tensor:
    """Convert a tensor, numpy array or nested sequence to a floating tensor.

    ``dtype=None`` keeps a floating input's dtype (numpy float64 stays float64) and turns
    anything else into torch's default dtype.
    """
    if isinstance(value, torch.Tensor):
        tensor = value
    else:
        try:
            array = np.asarray(value)
            tensor = torch.as_tensor(array if array.flags.writeable else array.copy())
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"{name} must be a tensor or array of numbers, got {type(value).__name__}") from err
    if tensor.is_complex() or tensor.dtype == torch.bool:
        raise ValueError(f"{name} must hold real numbers, got dtype {tensor.dtype}")
    if dtype is None:
        dtype = tensor.dtype if tensor.is_floating_point() else torch.get_default_dtype()
    return tensor.to(device=device, dtype=dtype)


#: Elements checked at a time, so validating a large X needs no X-sized mask.
_CHECK_CHUNK = 1 << 22


def check_finite(tensor: torch.Tensor, name: str) -> None:
    """Reject NaN and infinity, saying how many entries are bad."""
    flat = tensor.reshape(-1)
    for start in range(0, flat.numel(), _CHECK_CHUNK):
        if not bool(torch.isfinite(flat[start:start + _CHECK_CHUNK]).all()):
            n_bad = sum(int((~torch.isfinite(flat[i:i + _CHECK_CHUNK])).sum()) for i in range(0, flat.numel(), _CHECK_CHUNK))
            raise ValueError(f"{name} must be finite, got {n_bad} NaN or infinite value(s)")


def check_data(
    X: torch.Tensor,
    name: str,
    *,
    n_features: int | None,
    batch_shape: torch.Size,
    min_samples: int = 1,
) -> None:
    """Check that data has shape ``(N, D)`` or ``(*batch_shape, N, D)`` and is finite."""
    batch = tuple(batch_shape)
    d = "D" if n_features is None else f"D={n_features}"
    expected = f"(N, {d})" + (f" or ({', '.join(map(str, batch))}, N, {d})" if batch else "")
    shape_ok = X.dim() == 2 or (X.dim() == 2 + len(batch) and tuple(X.shape[:-2]) == batch)
    if not shape_ok or X.shape[-1] < 1 or (n_features is not None and X.shape[-1] != n_features):
        raise ValueError(f"{name} must have shape {expected}, got {tuple(X.shape)}")
    if X.shape[-2] < min_samples:
        raise ValueError(
            f"{name} must have at least {min_samples} sample(s) (one per component), got N={X.shape[-2]}"
        )
    check_finite(X, name)


def check_positive(value: float, name: str, *, allow_zero: bool = False) -> None:
    is_number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    ok = is_number and value == value and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ValueError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} number, got {value!r}")


def check_int(value: int, name: str, *, minimum: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_common_options(batch_shape: Any, chunk_size: int | None, seed: int | None) -> torch.Size:
    """Options every model takes: the batch shape (returned as a torch.Size), chunk size, seed."""
    if isinstance(batch_shape, int) or not all(isinstance(b, (int, np.integer)) and b >= 1 for b in batch_shape):
        raise ValueError(f"batch_shape must be a sequence of positive integers, got {batch_shape!r}")
    if chunk_size is not None:
        check_int(chunk_size, "chunk_size", minimum=1)
    if seed is not None:
        check_int(seed, "seed", minimum=0)
    return torch.Size(int(b) for b in batch_shape)


def check_choice(value: str, name: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def check_shape(tensor: torch.Tensor, name: str, per_model: tuple[int, ...], batch_shape: torch.Size) -> None:
    """An initial parameter has its per-model shape, optionally preceded by the batch shape."""
    full = tuple(batch_shape) + per_model
    if tuple(tensor.shape) not in (per_model, full):
        options = f"{per_model}" + (f" or {full}" if full != per_model else "")
        raise ValueError(f"{name} must have shape {options}, got {tuple(tensor.shape)}")


def describe_bad_values(X: torch.Tensor, bad: torch.Tensor) -> str:
    """``"3 value(s) that are not, e.g. 0.5 (values span [0, 2])"`` for a bool mask of bad entries."""
    example = X[bad].flatten()[0].item()
    return (f"{int(bad.sum())} value(s) that are not, e.g. {example:g} "
            f"(values span [{X.min().item():g}, {X.max().item():g}])")


def initial_tensor(
    value: Any, name: str, per_model: tuple[int, ...], batch_shape: tuple[int, ...],
    device: torch.device, dtype: torch.dtype,
) -> torch.Tensor:
    """A user-supplied initial parameter as a finite tensor ``(*batch_shape, *per_model)``; the
    batch dimensions are optional in ``value``. Raises ValueError naming ``name``."""
    tensor = as_float_tensor(value, name, device=device, dtype=dtype)
    check_shape(tensor, name, per_model, torch.Size(batch_shape))
    check_finite(tensor, name)
    return tensor.expand(*batch_shape, *per_model).clone()


def check_positive_tensor(tensor: torch.Tensor, name: str, *, allow_zero: bool = False) -> None:
    bad = tensor < 0 if allow_zero else tensor <= 0
    if bool(bad.any()):
        kind = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name} must be {kind}, got minimum {tensor.min().item():.3g}")
