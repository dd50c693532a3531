"""``Params``: the parameters of a working batch as one tree, the latent structure's and the family's."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, cast

import torch

from .families.base import Theta
from .latent import LatentParams


@dataclass
class Params:
    """The parameters of a working batch (R, M): the latent structure's (e.g. ``log_weights``
    (R, M, K) of a mixture) and the emission family's (``theta``, (R, M, K, ...) each)."""

    latent: LatentParams
    emission: Theta

    @property
    def batch(self) -> tuple[int, int]:
        """(R, M)."""
        return cast(tuple[int, int], tuple(next(iter({**self.latent, **self.emission}.values())).shape[:2]))

    def map(self, function: Callable[[torch.Tensor], torch.Tensor]) -> "Params":
        return Params({n: function(v) for n, v in self.latent.items()}, {n: function(v) for n, v in self.emission.items()})

    def combine(self, other: "Params", function: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> "Params":
        """``function(mine, other's)`` for every parameter (``other`` has the same names)."""
        return Params({n: function(v, other.latent[n]) for n, v in self.latent.items()},
                      {n: function(v, other.emission[n]) for n, v in self.emission.items()})

    def where(self, mask: torch.Tensor, other: "Params") -> "Params":
        """These parameters for the models of ``mask`` (R, M), ``other``'s elsewhere."""
        return self.combine(other, lambda mine, theirs: where_models(mask, mine, theirs))

    def with_fixed(self, fixed: "Params | None") -> "Params":
        """The same with the ``fixed`` ones (a subset of the names) put in."""
        if fixed is None:
            return self
        return Params({n: fixed.latent.get(n, v) for n, v in self.latent.items()},
                      {n: fixed.emission.get(n, v) for n, v in self.emission.items()})

    def models(self, index: torch.Tensor) -> "Params":
        """The models at flat positions ``index`` (A,) of (R, M), as a working batch (1, A)."""
        return self.map(lambda value: value.flatten(0, 1)[index].unsqueeze(0))

    def put_models(self, index: torch.Tensor, values: "Params") -> "Params":
        """These parameters with the models at flat positions ``index`` taken from ``values`` (1, A)."""
        def put(full: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
            return full.flatten(0, 1).index_copy(0, index, part[0].to(full.dtype)).view_as(full)
        return self.combine(values, put)

    @staticmethod
    def cat(parts: list["Params"]) -> "Params":
        """Batches of restarts (R_i, M, ...) joined along the restart axis."""
        first = parts[0]
        return Params({n: torch.cat([p.latent[n] for p in parts]) for n in first.latent},
                      {n: torch.cat([p.emission[n] for p in parts]) for n in first.emission})


def where_models(mask: torch.Tensor, chosen: torch.Tensor | float, other: torch.Tensor) -> torch.Tensor:
    """``chosen`` for the models of ``mask`` (the leading dimensions of ``other``), else ``other``."""
    return torch.where(mask.reshape(tuple(mask.shape) + (1,) * (other.dim() - mask.dim())), chosen, other)

