"""Input checks shared by every public entry point.

Each check raises a ``ValueError`` that names the argument, what was expected and what came.
Checks never modify a model: callers validate everything before they change any state.
"""
from __future__ import annotations

import math
import sys
from typing import Any, Sequence

import numpy as np
import torch


def as_float_tensor(
    value: Any, name: str, *, device: torch.device | None, dtype: torch.dtype | None, allow_bool: bool = False,
) -> torch.Tensor:
    """Convert a tensor, numpy array, DataFrame (anything with ``__array__``) or nested sequence
    to a floating tensor. A numpy array of dtype object is cast to numbers; booleans become 0/1
    where ``allow_bool`` (binary data), and are rejected otherwise.

    ``dtype=None`` keeps a floating input's dtype (numpy float64 stays float64) and turns
    anything else into torch's default dtype.
    """
    tensor = _as_tensor(value, name)
    if tensor.is_complex() or (tensor.dtype == torch.bool and not allow_bool):
        raise ValueError(f"{name} must hold real numbers, got dtype {tensor.dtype}")
    if dtype is None:
        dtype = tensor.dtype if tensor.is_floating_point() else torch.get_default_dtype()
    return tensor.to(device=device, dtype=dtype)


def _as_tensor(value: Any, name: str) -> torch.Tensor:
    """A tensor holding ``value``'s numbers (no copy where torch can share the memory)."""
    if is_sparse_matrix(value):
        raise ValueError(
            f"{name} must be a dense array, got a scipy sparse {type(value).__name__}; "
            f"pass {name}.toarray() (mixtures here need every entry)"
        )
    if isinstance(value, torch.Tensor):
        if value.is_meta:
            raise ValueError(f"{name} must hold data, got a tensor on the meta device (shape {tuple(value.shape)} only)")
        return value
    try:
        array = np.asarray(value)
        if array.dtype == object:  # e.g. a DataFrame with mixed columns, or a list of Decimals
            array = array.astype(np.float64)
        return torch.as_tensor(array if array.flags.writeable else array.copy())
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{name} must be a tensor or array of numbers, got {type(value).__name__} ({err})") from err


def is_sparse_matrix(value: Any) -> bool:
    """Whether ``value`` is a scipy sparse matrix or array (without importing scipy)."""
    sparse = sys.modules.get("scipy.sparse")
    return sparse is not None and bool(sparse.issparse(value))


#: Half-precision data are fitted in torch's default dtype (or float32): EM sums statistics over
#: all points, and a 3-digit mantissa (and, for float16, a maximum of 65504) leaves no accuracy.
HALF_DTYPES = (torch.float16, torch.bfloat16)


def data_dtype(value: Any) -> torch.dtype:
    """The dtype a model that follows its data fits ``value`` in: a float32/float64 tensor,
    array or DataFrame keeps its dtype; float16/bfloat16 data and non-floating data (integers, booleans,
    numbers in an object array, nested lists) use torch's default dtype, or float32 when that
    is itself a half type."""
    dtype = getattr(value, "dtype", None)
    if dtype is None and hasattr(value, "dtypes"):  # a DataFrame: one dtype per column
        try:
            dtype = np.result_type(*value.dtypes)
        except TypeError:  # pandas extension dtypes: not numpy's
            dtype = None
    if isinstance(dtype, np.dtype):
        dtype = torch.from_numpy(np.empty(0, dtype=dtype)).dtype if dtype.kind == "f" else None
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point and dtype not in HALF_DTYPES:
        return dtype
    default = torch.get_default_dtype()
    return torch.float32 if default in HALF_DTYPES else default


def check_dtype(dtype: Any, name: str = "dtype") -> torch.dtype | None:
    """A floating torch dtype from ``torch.float64`` or its name (``"float64"``, ``"torch.float64"``),
    or None."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"{name} must be a floating torch dtype or its name (e.g. 'float32'), got {dtype!r}")
        dtype = resolved
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{name} must be a floating torch dtype (e.g. torch.float32), got {type(dtype).__name__} {dtype!r}")
    if not dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating-point dtype, got {dtype}")
    return dtype


def check_device(device: Any) -> torch.device | None:
    """A ``torch.device`` from a device, its name (``"cuda:0"``) or an index, or None."""
    if device is None:
        return None
    if not isinstance(device, (torch.device, str, int)) or isinstance(device, bool):
        raise ValueError(f"device must be a torch.device, a device name such as 'cpu' or 'cuda:0', or an index, got {type(device).__name__}")
    try:
        device = torch.device(device)
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"device must be a device name such as 'cpu' or 'cuda:0', got {device!r}") from err
    if device.type == "meta":
        raise ValueError("device must be one that holds data, got 'meta'")
    return device


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
    finite: bool = True,
) -> None:
    """Check that data has shape ``(N, D)`` or ``(*batch_shape, N, D)`` and (unless ``finite`` is
    False) is finite."""
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
    if finite:
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
    is_sequence = isinstance(batch_shape, (Sequence, torch.Size)) and not isinstance(batch_shape, str)
    if not is_sequence or not all(isinstance(b, (int, np.integer)) and not isinstance(b, bool) and b >= 1 for b in batch_shape):
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


#: Data may use this fraction of a dtype's range, over the sums the E-step forms: room for the
#: cross terms of squared distances and a log factor (Poisson's lgamma, Gamma's x log x).
MAGNITUDE_HEADROOM = 16.0


def check_magnitude(X: torch.Tensor, name: str, *, power: int, what: str) -> None:
    """Reject data whose ``power``-th powers, summed over the N points and D features of one model,
    would overflow X's dtype: ``N * D * max|x| ** power`` must stay below ``finfo.max`` (with
    :data:`MAGNITUDE_HEADROOM` and a log factor to spare). ``what`` names those terms in the message.

    Shape:
        X: ``(..., N, D)``.
    """
    if X.numel() == 0:
        return
    finfo = torch.finfo(X.dtype)
    n_terms = X.shape[-2] * X.shape[-1]
    limit = (finfo.max / (MAGNITUDE_HEADROOM * math.log(finfo.max) * n_terms)) ** (1.0 / power)
    smallest, largest = (float(value) for value in torch.aminmax(X.detach()))
    largest = max(largest, -smallest)
    if largest > limit:
        raise ValueError(
            f"{name} has entries up to {largest:.3g} in magnitude, but {what} of N={X.shape[-2]} points and "
            f"D={X.shape[-1]} features overflow {X.dtype} above {limit:.3g}; use dtype=torch.float64 or scale the data"
        )


def check_family(family: Any) -> None:
    """ValueError unless ``family`` is a component family instance
    (e.g. ``torch_em.Gaussian("diag")``)."""
    from .families.base import ComponentFamily  # the families import this module

    if isinstance(family, type) and issubclass(family, ComponentFamily):
        raise ValueError(f"family must be a ComponentFamily instance, got the class {family.__name__}; use {family.__name__}(...)")
    if not isinstance(family, ComponentFamily):
        raise ValueError(f"family must be a torch_em ComponentFamily (e.g. torch_em.Gaussian('full')), got {type(family).__name__} {family!r}")


def check_em_parameters(
    names: Any, parameter_names: Sequence[str], family: Any, latent_names: Sequence[str] = ("logits",),
) -> tuple[str, ...]:
    """The names of the parameters EM updates, ``names`` among ``parameter_names`` (the latent
    structure's ``latent_names``, e.g. ``"logits"``, and the family's) in their order; the family
    must have a conditional M-step for the others."""
    if isinstance(names, str) or not all(isinstance(name, str) for name in names):
        raise ValueError(f"em_parameters must be a sequence of parameter names, got {names!r}")
    unknown = sorted(set(names) - set(parameter_names))
    if unknown:
        raise ValueError(f"em_parameters must name parameters among {list(parameter_names)}, got unknown {unknown}")
    family_names = [name for name in parameter_names if name not in latent_names]
    held = set(family_names) - set(names)
    if not family.supports_fixing(held):
        raise ValueError(
            f"em_parameters: {type(family).__name__} has no conditional M-step that holds {sorted(held)} "
            f"fixed while EM updates {sorted(set(family_names) - held)}; let EM own all or none of them"
        )
    return tuple(name for name in parameter_names if name in set(names))


def check_sample_weight(
    sample_weight: Any, name: str, *, n_points: int, batch_shape: Sequence[int], device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor | None:
    """Per-point weights as a tensor ``(N,)`` (the same for every model) or ``(*batch_shape, N)``
    (one set per model), finite and non-negative, with a positive sum for every model; None
    stays None."""
    if sample_weight is None:
        return None
    weights = as_float_tensor(sample_weight, name, device=device, dtype=dtype)
    batch = tuple(batch_shape)
    shapes = [(n_points,)] + ([(*batch, n_points)] if batch else [])
    if tuple(weights.shape) not in shapes:
        expected = " or ".join(str(shape) for shape in shapes)
        raise ValueError(f"{name} must have shape {expected} (one weight per point of X), got {tuple(weights.shape)}")
    check_finite(weights, name)
    check_positive_tensor(weights, name, allow_zero=True)
    totals = weights.sum(-1)  # () or (*batch_shape)
    if not bool((totals > 0).all()):
        where = "" if totals.dim() == 0 else f" for model(s) {[tuple(i) for i in (totals <= 0).nonzero().tolist()]}"
        raise ValueError(f"{name} must have a positive sum for every model, got 0{where}")
    return weights
