"""Evaluation that traces: what changes when code runs under ``torch.export``, ``torch.compile``,
``torch.jit.trace`` or a ``torch.func`` transform rather than eagerly.

Traced tensors have no concrete values, so checks of values (finiteness, a family's domain) and
Python branches on them are left out (the models' evaluation methods then are pure tensor
programs), and small tensors cached across calls are made afresh, since a cache filled while
tracing would hand fake tensors to later eager calls.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

import torch

Function = TypeVar("Function", bound=Callable[..., Any])


def is_traced(tensor: Any = None) -> bool:
    """Whether the code runs traced rather than eagerly: under ``torch.compile`` or
    ``torch.export`` (:func:`torch.compiler.is_compiling`), ``torch.jit.trace``, or inside a
    ``torch.func`` transform (``vmap``, ``grad``, ...: ``tensor`` is a functorch wrapper)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return True
    return isinstance(tensor, torch.Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(tensor)


def cached_unless_traced(function: Function, maxsize: int | None = 64) -> Function:
    """``functools.lru_cache`` of ``function`` (of hashable arguments: sizes, devices, dtypes),
    bypassed while tracing: a traced call computes afresh and leaves the cache as it was."""
    cached = functools.lru_cache(maxsize=maxsize)(function)

    @functools.wraps(function)
    def wrapper(*args: Any) -> Any:
        return function(*args) if is_traced() else cached(*args)
    wrapper.cache_clear = cached.cache_clear  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]
