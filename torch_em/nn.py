"""Neural-network layers built on the EM engine."""
from __future__ import annotations

import torch
from torch import nn

from ._random import resolve_seed
from ._validation import check_choice, check_device, check_dtype, check_int, check_positive
from .families.base import ComponentFamily
from .families.gaussian import Gaussian
from .functional import GRADIENT_MODES, EMState, check_family, em


class EMLayer(nn.Module):
    """``n_iter`` EM iterations on each set of a batch, from learned initial parameters.

    The initial mixture (``initial["logits"]`` and the family's unconstrained parameters, e.g.
    ``initial["loc"]``) is shared by every set and is an ``nn.ParameterDict``: trained by the
    network's optimizer through the EM iterations (``gradient="unrolled"``; with ``"last"`` only
    when ``n_iter == 1``), frozen with ``learn_init=False``, or updated by the caller (e.g. a
    moving average of the fitted parameters, the EMANet pattern with ``gradient="none"``).

    Args:
        n_components: K, components per set.
        n_features: D.
        family: component family (default ``Gaussian("diag")``).
        n_iter: EM iterations per forward.
        gradient: ``"unrolled"``, ``"last"``, ``"implicit"`` or ``"none"``
            (see :mod:`torch_em.functional`).
        learn_init: whether the initial parameters require grad.
        prior_count: pseudo-points per component (see :func:`torch_em.functional.em`).
        seed: seed of the random initial parameters.

    Shape:
        X: ``(*batch, N, D)``; mask: ``(*batch, N)``. The returned :class:`EMState` holds
        ``logits (*batch, K)``, ``theta`` (``(*batch, K, ...)`` each), ``responsibilities
        (*batch, N, K)`` and ``log_likelihood (*batch,)``.
    """

    def __init__(
        self,
        n_components: int,
        n_features: int,
        *,
        family: ComponentFamily | None = None,
        n_iter: int = 3,
        gradient: str = "unrolled",
        learn_init: bool = True,
        prior_count: float = 0.0,
        seed: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_int(n_components, "n_components", minimum=1)
        check_int(n_features, "n_features", minimum=1)
        check_int(n_iter, "n_iter", minimum=1)
        check_choice(gradient, "gradient", GRADIENT_MODES)
        check_positive(prior_count, "prior_count", allow_zero=True)
        if family is not None:
            check_family(family)
        if not isinstance(learn_init, bool):
            raise ValueError(f"learn_init must be True or False, got {learn_init!r}")
        self.family = family if family is not None else Gaussian("diag")
        self.n_components, self.n_features = int(n_components), int(n_features)
        self.n_iter, self.gradient, self.prior_count = int(n_iter), gradient, float(prior_count)
        dtype, device = check_dtype(dtype), check_device(device)
        dtype = dtype if dtype is not None else torch.get_default_dtype()
        device = device if device is not None else torch.device("cpu")
        generator = torch.Generator(device=device).manual_seed(resolve_seed(seed))
        theta = self.family.default_parameters((), self.n_components, self.n_features, generator, device, dtype)
        theta = {"logits": torch.zeros(self.n_components, device=device, dtype=dtype), **theta}
        self.initial = nn.ParameterDict(
            {name: nn.Parameter(value, requires_grad=learn_init) for name, value in theta.items()}
        )

    def forward(self, X: torch.Tensor, mask: torch.Tensor | None = None) -> EMState:
        if isinstance(X, torch.Tensor) and X.dim() >= 2 and X.shape[-1] != self.n_features:
            raise ValueError(f"X must have shape (*batch, N, D={self.n_features}), got {tuple(X.shape)}")
        return em(
            X, dict(self.initial), self.n_iter, family=self.family, mask=mask,
            gradient=self.gradient, prior_count=self.prior_count,
        )

    def extra_repr(self) -> str:
        return (f"n_components={self.n_components}, n_features={self.n_features}, n_iter={self.n_iter}, "
                f"gradient={self.gradient!r}, family={type(self.family).__name__}")
