"""Checks of a ``state_dict`` before it is loaded.

``nn.Module.load_state_dict`` copies entry by entry and raises only at the end, so a rejected
state would be half loaded. The modules check the whole incoming state with
:func:`check_state` first (keys, shapes against their configuration, dtypes, finite values)
and only then let torch copy it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch

Shape = tuple[int, ...]


def own_entries(state_dict: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """The entries of the module at ``prefix``, by local name."""
    return {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}


def check_state(
    state: Mapping[str, Any], prefix: str, owner: str, shapes: Mapping[str, Sequence[Shape] | None], *,
    strict: bool, groups: Sequence[tuple[Sequence[str], bool]], counters: Sequence[str] = (),
) -> None:
    """Raise ValueError (TypeError for a wrong type) when ``state`` cannot be loaded whole.

    Args:
        state: the module's entries (see :func:`own_entries`).
        prefix: the module's prefix, for the messages.
        owner: the module, as the messages name it (e.g. ``"GaussianMixture(n_components=3, ...)"``).
        shapes: the allowed shapes of every entry the module knows (None: not checked).
        strict: torch's meaning: unexpected or missing entries are errors.
        groups: ``(names, required)``: entries that come together; under ``strict`` a group is
            all present or all absent, and all present when ``required``.
        counters: integer entries (step counts, at least 1); every other entry is floating
            point and finite.
    """
    if strict:
        unexpected = sorted(set(state) - set(shapes))
        if unexpected:
            raise ValueError(
                f"state_dict has unexpected key(s) {[prefix + name for name in unexpected]} for {owner}; "
                f"it knows {[prefix + name for name in shapes]}"
            )
        for names, required in groups:
            present = [name for name in names if name in state]
            if (present or required) and len(present) < len(names):
                missing = [prefix + name for name in names if name not in state]
                raise ValueError(f"state_dict lacks {missing} for {owner} (it has {[prefix + name for name in present]})")
    for name, value in state.items():
        if name in shapes:
            _check_entry(value, prefix + name, owner, shapes[name], name in counters)


def _check_entry(value: Any, key: str, owner: str, shapes: Sequence[Shape] | None, counter: bool) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"state_dict[{key!r}] must be a tensor, got {type(value).__name__}")
    if shapes is not None and tuple(value.shape) not in [tuple(shape) for shape in shapes]:
        expected = " or ".join(str(tuple(shape)) for shape in shapes)
        raise ValueError(f"size mismatch for {key}: {owner} expects {expected}, the state_dict has {tuple(value.shape)}")
    if counter:
        if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool or bool((value < 1).any()):
            raise ValueError(f"state_dict[{key!r}] must be a positive integer count, got {value!r}")
        return
    if not value.is_floating_point():
        raise TypeError(f"state_dict[{key!r}] must be a floating-point tensor, got dtype {value.dtype}")
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"state_dict[{key!r}] has {int((~torch.isfinite(value)).sum())} non-finite value(s) (NaN or inf)")


class CheckedLoad:
    """``load_state_dict`` that checks the whole state first, for an ``nn.Module`` subclass
    (listed before ``nn.Module``) with ``_check_state(state, prefix, strict)``.

    torch passes ``strict=True`` to every module's ``_load_from_state_dict`` and applies the
    caller's ``strict`` at the end; ``_strict_load`` tells the module's own load code the
    caller's (False when the module is loaded as part of another module).
    """

    _strict_load: bool = False

    if TYPE_CHECKING:
        def _check_state(self, state: dict[str, Any], prefix: str, strict: bool) -> object: ...

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        self._check_state(own_entries(state_dict, ""), "", strict)
        self._strict_load = strict
        try:
            return super().load_state_dict(  # type: ignore[misc]  # mixin: nn.Module, later in the MRO, defines it
                state_dict, strict=strict, assign=assign)
        finally:
            del self._strict_load
