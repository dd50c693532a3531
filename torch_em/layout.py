"""``Layout``: a module's ``(*batch_shape, ...)`` tensors and the engine's working layout ``(R, M, ...)``.

Modules hold a batch of independent models shaped ``batch_shape``; the engine works on
``(R, M)``: R restarts times the M = prod(batch_shape) models. This is the one place that
converts between the two and picks each model's best restart.
"""
from __future__ import annotations

import math

import numpy as np
import torch


#: Restarts whose scores differ by at most this many eps (relative) are equally good.
RESTART_TIE_EPS = 64


class Layout:
    """Conversions for a module whose models are shaped ``batch_shape``."""

    def __init__(self, batch_shape: tuple[int, ...]):
        self.batch_shape = tuple(batch_shape)
        self.n_models = math.prod(self.batch_shape)

    def working(self, value: torch.Tensor) -> torch.Tensor:
        """(*batch_shape, *event) -> (1, M, *event): one restart (a view)."""
        return value.reshape(1, self.n_models, *value.shape[len(self.batch_shape):])

    def restarts(self, value: torch.Tensor, n_restarts: int) -> torch.Tensor:
        """(*batch_shape, *event) -> (R, M, *event), the same for every restart."""
        working = self.working(value)
        return working.expand(n_restarts, *working.shape[1:])

    def module(self, value: torch.Tensor) -> torch.Tensor:
        """(M, *event) -> (*batch_shape, *event)."""
        return value.reshape((*self.batch_shape, *value.shape[1:]))

    def data(self, X: torch.Tensor) -> torch.Tensor:
        """Points (N, D) stay shared; (*batch_shape, N, D) -> (M, N, D)."""
        return X if X.dim() == 2 else X.reshape(self.n_models, *X.shape[-2:])

    def weights(self, weights: torch.Tensor | None) -> torch.Tensor | None:
        """Point weights (N,) stay shared; (*batch_shape, N) -> (M, N)."""
        return weights if weights is None or weights.dim() == 1 else weights.reshape(self.n_models, weights.shape[-1])

    @staticmethod
    def best_restart(score: torch.Tensor) -> torch.Tensor:
        """(M,) the restart of highest ``score`` (R, M) per model; NaN loses (restart 0 when all
        are). Scores within rounding (RESTART_TIE_EPS relative) of the highest tie, and the
        earliest of them wins, so that the choice does not hang on the last bit of a sum."""
        score = score.nan_to_num(nan=-math.inf)
        best = score.amax(0, keepdim=True)
        slack = RESTART_TIE_EPS * torch.finfo(score.dtype).eps * best.abs().clamp_min(1.0)
        return (score >= best - slack).to(torch.int8).argmax(0)

    def pick(self, value: torch.Tensor, best: torch.Tensor) -> torch.Tensor:
        """(R, M, ...) -> (*batch_shape, ...) at restart ``best`` (M,) of each model."""
        index = best.view(1, self.n_models, *([1] * (value.dim() - 2))).expand(1, *value.shape[1:])
        return self.module(value.gather(0, index)[0])

    def model_index(self, model: int) -> tuple[int, ...]:
        """The index in ``batch_shape`` of working model ``model``."""
        return tuple(int(i) for i in np.unravel_index(model, self.batch_shape))

    def describe(self, restart: int, model: int, n_restarts: int) -> str:
        """How messages name model ``model`` (restart ``restart`` of ``n_restarts``)."""
        where = f"model {self.model_index(model)}" if self.batch_shape else "the model"
        return where + (f" (restart {restart})" if n_restarts > 1 else "")
