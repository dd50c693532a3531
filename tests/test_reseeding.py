"""A step that re-seeds an empty component is not an EM step: its change of the objective says
nothing about convergence, so a model does not converge in it (run_em)."""
from __future__ import annotations

import torch

from torch_em import em
from torch_em.params import Params


class ReseedingMap:
    """An EM map whose parameters and objective stand still, re-seeding model 0 in calls 2 and 3."""

    def __init__(self, index: torch.Tensor | None = None, calls: list[int] | None = None):
        self.index = torch.arange(2) if index is None else index  # the models of the working batch
        self.calls = [0] if calls is None else calls

    def models(self, index: torch.Tensor, n_models: int) -> "ReseedingMap":  # run_em's compaction
        return ReseedingMap(self.index[index], self.calls)

    def __call__(self, params: Params, active: torch.Tensor) -> em.EMStep:
        self.calls[0] += 1
        shape = (1, len(self.index))  # (R, M) of the working batch
        reseeded = ((self.index == 0) & (self.calls[0] in (2, 3))).view(shape)
        return em.EMStep(params, torch.full(shape, -1.0, dtype=torch.float64),
                         torch.zeros(*shape, 1, dtype=torch.bool), reseeded)


def test_a_model_does_not_converge_in_a_re_seeding_step():
    params = Params({}, {"theta": torch.zeros(1, 2, 1, dtype=torch.float64)})
    result = em.run_em(ReseedingMap(), params, max_iter=10, tol=1e-3)
    # model 1 converges in iteration 2 (the first comparison); model 0 only in 4, its first
    # step after the re-seeding ones
    assert result.n_iter.tolist() == [[4, 2]]
    assert bool(result.converged.all())
