"""Fitting in the model's dtype, whatever ``torch.autocast`` region the caller is in."""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, TypeVar

import torch

Method = TypeVar("Method", bound=Callable[..., Any])

#: Device types whose autocast state a fit switches off (plus the model's own device type).
AUTOCAST_DEVICE_TYPES = ("cpu", "cuda")


def without_autocast(method: Method) -> Method:
    """Run a model's method (or a function of data, its first argument) with autocast
    disabled, so that it computes in the model's (data's) dtype.

    Under ``torch.autocast(dtype=torch.bfloat16)`` matrix products would run in bfloat16: the
    E-step statistics lose all but 3 digits (covariances stop being positive definite, k-means
    distances change). A fit is not part of the network's mixed-precision graph, so it opts out.
    """
    @functools.wraps(method)
    def wrapper(self, *args: Any, **kwargs: Any) -> Any:
        device_types = {*AUTOCAST_DEVICE_TYPES, _device_type(self)}
        with contextlib.ExitStack() as stack:
            for device_type in device_types:
                if _autocast_enabled(device_type):
                    stack.enter_context(torch.autocast(device_type, enabled=False))
            return method(self, *args, **kwargs)
    return wrapper  # type: ignore[return-value]


def keeps_dtype_when_rejected(method: Method) -> Method:
    """A fitting method of a :class:`FollowsDataDtype` module: where it raises and the module
    still has no parameters, the module keeps the dtype it had. (Checking X adopts X's dtype,
    which the checks after it, of sample weights and initial values, work in; a call they
    reject must change nothing.)"""
    @functools.wraps(method)
    def wrapper(self, *args: Any, **kwargs: Any) -> Any:
        anchor = getattr(self, self._dtype_buffer)
        follows = self._dtype_follows_data
        try:
            return method(self, *args, **kwargs)
        except BaseException:
            if not self.is_initialized:
                setattr(self, self._dtype_buffer, anchor)
                self._dtype_follows_data = follows
            raise
    return wrapper  # type: ignore[return-value]


def _device_type(owner: Any) -> str:
    """The device type of a module's first buffer, or of a function's first argument when it is
    a tensor (the data); "cpu" otherwise."""
    if isinstance(owner, torch.nn.Module):
        owner = next(iter(owner.buffers()), None)
    return owner.device.type if isinstance(owner, torch.Tensor) else "cpu"


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except (RuntimeError, TypeError):  # a device type this build of torch does not know
        return False


class FollowsDataDtype(torch.nn.Module):
    """A module whose dtype, unless fixed, is adopted from the data of its first fit.

    ``_dtype_follows_data`` is set by the constructor (True when no ``dtype=`` came) and cleared by
    any cast that changes the dtype of the buffer named ``_dtype_buffer`` (``.to(dtype)``,
    ``.double()``, ``.half()``): an explicit choice always wins over the data's dtype.
    """

    _dtype_buffer: str
    _dtype_follows_data: bool = False

    def _apply(self, fn, recurse: bool = True):
        before = getattr(self, self._dtype_buffer).dtype
        result = super()._apply(fn, recurse)
        if getattr(self, self._dtype_buffer).dtype != before:
            self._dtype_follows_data = False
        return result
