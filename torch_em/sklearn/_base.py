"""What the scikit-learn estimators share: data in and out, seeds from ``random_state``, the
torch module's ``device``/``dtype``, sample weights, and calls that change nothing when rejected."""
from __future__ import annotations

import functools
from numbers import Integral
from typing import Any, Callable, TypeVar

import numpy as np
import torch
from sklearn.utils import check_array
from sklearn.utils.validation import check_is_fitted, validate_data

Method = TypeVar("Method", bound=Callable[..., Any])

#: Float dtypes the estimators keep; any other input (integers, objects, float16) becomes float64.
FLOAT_DTYPES = [np.float64, np.float32]
#: ``device`` and ``dtype`` as ``_parameter_constraints`` entries (torch_em checks their values).
TORCH_CONSTRAINTS = {
    "device": [None, str, Integral, torch.device],
    "dtype": [None, str, torch.dtype, np.dtype, type],
}
#: A ``RandomState`` given as ``random_state`` draws the torch_em seed below this bound.
SEED_BOUND = np.iinfo(np.int32).max


def seed_from_random_state(random_state: None | int | np.random.RandomState) -> int | None:
    """The torch_em ``seed`` for scikit-learn's ``random_state``: an int is the seed; a
    ``RandomState`` draws one (so successive fits with the same instance differ, as in
    scikit-learn); None gives None (a fresh seed for every fit)."""
    if random_state is None:
        return None
    if isinstance(random_state, np.random.RandomState):
        return int(random_state.randint(SEED_BOUND))
    return int(random_state)


def unchanged_on_error(method: Method) -> Method:
    """Run a fitting method so that, if it raises, the estimator's attributes are as before
    (``validate_data`` sets ``n_features_in_`` before the rest of the input is checked)."""
    @functools.wraps(method)
    def wrapper(self, *args: Any, **kwargs: Any) -> Any:
        saved = dict(vars(self))
        try:
            return method(self, *args, **kwargs)
        except BaseException:
            vars(self).clear()
            vars(self).update(saved)
            raise
    return wrapper  # type: ignore[return-value]


def check_sample_weight(sample_weight: Any, n_samples: int, dtype: np.dtype) -> np.ndarray | None:
    """``sample_weight`` as a finite, non-negative array ``(n_samples,)`` of ``dtype`` with a
    positive entry (a number: the same weight for every sample), or None."""
    if sample_weight is None:
        return None
    if np.isscalar(sample_weight):
        sample_weight = np.full(n_samples, sample_weight)
    weights = check_array(sample_weight, ensure_2d=False, dtype=dtype, input_name="sample_weight")
    if weights.shape != (n_samples,):
        raise ValueError(f"sample_weight.shape == {weights.shape}, expected {(n_samples,)}!")
    if bool((weights < 0).any()):
        raise ValueError(f"sample_weight must be non-negative, got minimum {weights.min():.3g}")
    if not bool((weights > 0).any()):
        raise ValueError("sample_weight must have a positive entry, got all weights zero")
    return weights


def as_tensor(X: np.ndarray) -> torch.Tensor:
    """A validated array as a tensor sharing its memory, or a copy where torch cannot share it
    (a read-only array, e.g. a memory map, or negative strides)."""
    if not X.flags.writeable or any(stride < 0 for stride in X.strides):
        X = X.copy()
    return torch.from_numpy(X)


def weight_options(sample_weight: np.ndarray | None) -> dict[str, Any]:
    """Keyword arguments that hand ``sample_weight`` to a torch_em method (none when unweighted)."""
    return {} if sample_weight is None else {"sample_weight": as_tensor(sample_weight)}


class TorchModuleMixin:
    """Data in and out of the torch module held as ``module_``.

    Fitting validates X as scikit-learn does (float32 stays float32, everything else becomes
    float64; DataFrames set ``feature_names_in_``); fitted attributes and evaluation results come
    back as numpy arrays in that dtype, wherever ``device``/``dtype`` made the module compute.
    """

    device: Any
    dtype: Any
    _fit_dtype: np.dtype

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "module_")

    def _module_options(self) -> dict[str, Any]:
        """The torch module's ``device`` and ``dtype`` (a torch dtype, its name, or a numpy
        dtype such as ``np.float32``); ``dtype=None`` computes in the data's float dtype."""
        dtype = self.dtype
        if dtype is not None and not isinstance(dtype, (str, torch.dtype)):
            dtype = torch.from_numpy(np.empty(0, dtype=dtype)).dtype
        return {"device": self.device, "dtype": dtype}

    def _fit_data(self, X: Any, *, reset: bool = True, ensure_min_samples: int = 1) -> np.ndarray:
        """X ``(n_samples, n_features)`` checked for a fit (``reset``: a new one, whose dtype the
        outputs take; else a later batch of the same stream)."""
        X = validate_data(self, X, dtype=FLOAT_DTYPES, reset=reset, ensure_min_samples=ensure_min_samples)
        if reset:
            self._fit_dtype = X.dtype
        return X

    def _evaluation_data(self, X: Any) -> torch.Tensor:
        """X ``(n_samples, n_features_in_)`` of a fitted estimator, as a tensor for the module."""
        check_is_fitted(self)
        return as_tensor(validate_data(self, X, dtype=FLOAT_DTYPES, reset=False))

    def _numpy(self, tensor: torch.Tensor) -> np.ndarray:
        """A float result of the module as a numpy array (a copy: later fits of the module do
        not change it) in the dtype of the data of the fit."""
        return tensor.detach().cpu().numpy().astype(self._fit_dtype)
