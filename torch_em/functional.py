"""EM as a differentiable layer: a fixed number of EM iterations on a batch of sets.

``em(X, init, n_iter)`` fits one mixture to each set of ``X (*batch, N, D)`` starting from
``init`` (given or learned unconstrained parameters) and returns the fitted parameters and the
responsibilities, with gradients to the data and to the initial parameters. It is the building
block of EM attention, slot-attention-style and set-encoding models; the same families,
statistics and closed-form M-steps serve it as every other training mode of the library.

Gradient modes (``gradient=``):

    unrolled   backpropagate through every iteration; memory grows with n_iter.
    last       the first n_iter - 1 iterations without a graph, the last one with it: the gradient
               of one EM step from the detached previous state (a first-order implicit gradient).
               Memory does not depend on n_iter; the initial parameters get a gradient only when
               n_iter == 1.
    implicit   implicit-function theorem at the fixed point theta* = F(theta*, X): the adjoint
               solves v = g + J^T v (J = dF/dtheta at theta*) by fixed-point iteration, which
               converges because EM contracts near its fixed point; v then flows through one step
               to X (sets with at most 256 parameters solve their system directly instead).
               The fixed point does not depend on where EM started: no gradient to init. EM must
               have converged (enough n_iter): a forward pass that is not at a fixed point warns
               (ImplicitGradientWarning), a singular or diverging system raises IllConditionedError.
    none       stop-gradient: the parameters and responsibilities carry no graph (the EMANet
               pattern, where initial parameters are updated by a moving average instead).

Sets of different sizes are padded and described by ``mask (*batch, N)`` (True / 1 for the points
of the set; float weights in [0, 1] weight the points). Padded points contribute nothing.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence, cast

import torch

from . import em as engine
from ._validation import (
    check_choice, check_em_parameters, check_family, check_finite, check_int, check_positive, check_sample_weight,
)
from .families.base import ComponentFamily, IllConditionedError, Theta
from .latent import MIXTURE
from .layout import Layout

if TYPE_CHECKING:
    from .families.gaussian import Gaussian

GRADIENT_MODES = ("unrolled", "last", "implicit", "none")
#: The adjoint iteration has diverged once an update exceeds the incoming gradient by this factor.
DIVERGENCE_FACTOR = 1e8
#: Up to this many parameters per set the implicit gradient solves each set's system directly.
DIRECT_SOLVE_PARAMETERS = 256


@dataclass
class EMState:
    """Mixtures fitted to a batch of sets.

    Shape:
        logits: ``(*batch, K)`` normalised log mixing weights.
        theta: the family's unconstrained parameters ``(*batch, K, ...)`` by name.
        responsibilities: ``(*batch, N, K)`` posteriors under the returned parameters (0 at
            padded points).
        log_likelihood: ``(*batch,)`` mean log-likelihood per (weighted) point of each set.
    """

    family: ComponentFamily
    logits: torch.Tensor
    theta: Theta
    responsibilities: torch.Tensor
    log_likelihood: torch.Tensor

    @property
    def weights(self) -> torch.Tensor:
        """Mixing weights ``(*batch, K)``."""
        return self.logits.exp()

    @property
    def means(self) -> torch.Tensor:
        """Component means ``(*batch, K, D)`` (Gaussian families)."""
        self._require_gaussian("means")
        return self.theta["loc"]

    @property
    def covariances(self) -> torch.Tensor:
        """Covariances in scikit-learn's per-type shapes with the batch in front (Gaussian families)."""
        self._require_gaussian("covariances")
        return cast("Gaussian", self.family).covariance(self.theta)  # (checked: a Gaussian family)

    def parameters(self) -> Theta:
        """``{"logits": ..., **theta}``: usable as ``init`` of another call (a warm start)."""
        return {"logits": self.logits, **self.theta}

    def _require_gaussian(self, what: str) -> None:
        if not hasattr(self.family, "covariance"):
            raise AttributeError(
                f"{what} is defined for Gaussian families, not {type(self.family).__name__}; read the family's "
                "own views of state.theta instead"
            )


class _Sets:
    """Validated, padded sets as the engine's data: M = prod(batch) models, one dataset each.

    X (M, N, D) with padded points replaced by the set's first point (in the family's domain);
    the mask's weights (M, N) are the points' weights (0 at padded points). Features are computed
    once (with their graph). ``held``: the names of the parameters held at their initial values.
    """

    def __init__(self, family: ComponentFamily, X: torch.Tensor, mask: torch.Tensor | None, prior_count: float,
                 fixed: engine.Params | None = None):
        batch = X.shape[:-2]
        self.batch_shape = batch
        self.n_models = math.prod(batch)
        X = X.reshape(self.n_models, *X.shape[-2:])
        weights = None if mask is None else mask.reshape(self.n_models, X.shape[-2]).to(X.dtype)
        if weights is not None:
            present = weights > 0
            first = present.to(torch.int8).argmax(-1)  # (M,) index of each set's first point
            first_point = X.gather(1, first.view(-1, 1, 1).expand(-1, 1, X.shape[-1]))  # (M, 1, D)
            X = torch.where(present.unsqueeze(-1), X, first_point)
        check_finite(X.detach(), "X")
        family.check_domain(X.detach(), "X")
        reference = family.reference(X.detach())  # a reference point only conditions the arithmetic
        self.family = family
        self.data = engine.Data(family, X, reference, chunk_size=X.shape[-2], cache="always", weights=weights)
        # EM as the modules run it, without what is data-dependent control flow there: no
        # re-seeding of empty components (prior_count > 0 keeps them alive), no direct path.
        self.em_map = engine.EMMap(MIXTURE, family, self.data, fixed=fixed, pseudo_count=prior_count, reseed=False,
                                   own_reference=False, reduce=False)
        self.every_model = torch.ones(1, self.n_models, dtype=torch.bool, device=X.device)

    def posterior(self, params: engine.Params) -> tuple[torch.Tensor, torch.Tensor]:
        """Responsibilities (1, M, K, N), zero at padded points, and the mean (weighted)
        log-likelihood per point (1, M)."""
        resp, log_likelihood = engine.posterior(MIXTURE, self.family, params, self.data)
        return resp, log_likelihood / self.data.total_weight

    def step(self, params: engine.Params, iteration: int) -> engine.Params:
        """One EM iteration: E-step statistics (with the pseudo-points), closed-form M-step."""
        step = self.em_map(params, self.every_model)
        try:
            engine.record_failures(None, step.invalid.any(-1),
                                   engine.invalid_component_reason(self.family, f"em iteration {iteration}", step.invalid))
        except engine.ModelFailed as error:
            raise IllConditionedError(error.failure.message(self._describe(error.model))) from None
        return step.params

    def _describe(self, model: int) -> str:
        return f"set {Layout(self.batch_shape).model_index(model)}" if self.batch_shape else "the set"


def em(
    X: torch.Tensor,
    init: Mapping[str, torch.Tensor],
    n_iter: int,
    *,
    family: ComponentFamily,
    mask: torch.Tensor | None = None,
    sample_weight: torch.Tensor | None = None,
    gradient: str = "unrolled",
    prior_count: float = 0.0,
    em_parameters: Sequence[str] | None = None,
    implicit_max_iter: int = 100,
    implicit_tol: float | None = None,
) -> EMState:
    """``n_iter`` EM iterations on every set of ``X``, differentiable.

    Args:
        X: the sets, ``(*batch, N, D)`` (``(N, D)`` is one set).
        init: initial unconstrained parameters: ``"logits" (K,)`` and the family's parameters
            (e.g. ``loc (K, D)`` and ``raw_precision_cholesky`` for Gaussians), each in its
            per-model shape or with the batch dimensions in front. May require grad (learned).
        n_iter: EM iterations (>= 1).
        family: the component family (e.g. ``torch_em.Gaussian("diag")``).
        mask: ``(*batch, N)``: True / 1 for the points of each set, or weights in [0, 1].
        sample_weight: ``(N,)`` or ``(*batch, N)`` non-negative weights of the points (a point
            of weight w counts as w copies of it: integer weights fit as repeated points do),
            multiplying the mask's. Not differentiated.
        gradient: ``"unrolled"``, ``"last"``, ``"implicit"`` or ``"none"`` (module docstring).
        prior_count: pseudo-points per component distributed like the whole set, added to the
            statistics before every M-step (MAP-style smoothing: a component that loses all its
            points drifts to the set's mean and spread instead of collapsing). 0: plain EM.
        em_parameters: names of the parameters EM updates (default: all of ``init``); the others
            stay at their ``init`` values (which may carry gradients, e.g. learned means) and EM
            maximises the rest given them (the family's conditional M-step), as the modules'
            ``em_parameters``.
        implicit_max_iter, implicit_tol: the adjoint iteration of ``gradient="implicit"`` (sets
            with more than 256 parameters; smaller ones solve directly) stops
            when an update changes it by at most ``implicit_tol`` relative to the incoming
            gradient (default: the square root of the dtype's eps). Not converging warns.

    Returns:
        :class:`EMState` with the parameters after the last M-step and the responsibilities
        and mean log-likelihood under them.

    Raises:
        ValueError for invalid arguments (before any computation); IllConditionedError naming
        the set and component when an M-step produces an invalid component.
    """
    check_int(n_iter, "n_iter", minimum=1)
    check_choice(gradient, "gradient", GRADIENT_MODES)
    check_positive(prior_count, "prior_count", allow_zero=True)
    check_int(implicit_max_iter, "implicit_max_iter", minimum=1)
    if implicit_tol is not None:
        check_positive(implicit_tol, "implicit_tol")
    check_family(family)
    X = _checked_sets(X)
    mask = _weights_of(_checked_mask(mask, X), sample_weight, X)
    params = _working_init(family, init, X)
    fixed = _held_parameters(family, params, em_parameters)
    sets = _Sets(family, X if gradient != "none" else X.detach(), mask, float(prior_count), fixed)
    if gradient == "none":
        with torch.no_grad():
            params = _iterate(sets, params.map(torch.Tensor.detach), 0, n_iter)
            return _finish(sets, params)
    if gradient == "unrolled":
        params = _iterate(sets, params, 0, n_iter)
    elif gradient == "last":
        with torch.no_grad():
            params = _iterate(sets, params, 0, n_iter - 1)
        if n_iter > 1:
            params = params.map(torch.Tensor.detach).with_fixed(fixed)
        params = sets.step(params, n_iter)
    else:
        with torch.no_grad():
            params = _iterate(sets, params, 0, n_iter)
        params = _implicit_step(sets, params, n_iter, implicit_max_iter, implicit_tol)
    return _finish(sets, params)


def _held_parameters(family: ComponentFamily, params: engine.Params, em_parameters: Sequence[str] | None,
                     ) -> engine.Params | None:
    """The initial values of the parameters EM does not update (``"logits"`` as log-weights)."""
    if em_parameters is None:
        return None
    names = ("logits", *params.emission)
    held = set(names) - set(check_em_parameters(em_parameters, names, family))
    if not held:
        return None
    latent = {"log_weights": params.latent["log_weights"]} if "logits" in held else {}
    return engine.Params(latent, {name: value for name, value in params.emission.items() if name in held})


def _iterate(sets: _Sets, params: engine.Params, start: int, stop: int) -> engine.Params:
    for iteration in range(start + 1, stop + 1):
        params = sets.step(params, iteration)
    return params


def _finish(sets: _Sets, params: engine.Params) -> EMState:
    """The E-step under the final parameters, reshaped to the caller's batch."""
    resp, mean_ll = sets.posterior(params)
    mean_ll = mean_ll[0]  # (M,)
    if not bool(torch.isfinite(mean_ll.detach()).all()):
        raise IllConditionedError(
            "em: the log-likelihood of a set is not finite; use float64, scale the data or set prior_count > 0"
        )
    batch = tuple(sets.batch_shape)
    log_weights = params.latent["log_weights"]
    return EMState(
        family=sets.family,
        logits=log_weights[0].reshape(*batch, log_weights.shape[-1]),
        theta={name: value[0].reshape(*batch, *value.shape[2:]) for name, value in params.emission.items()},
        responsibilities=resp[0].mT.reshape(*batch, resp.shape[-1], resp.shape[-2]),
        log_likelihood=mean_ll.reshape(batch),
    )


def _implicit_step(
    sets: _Sets, params: engine.Params, iteration: int, max_iter: int, tol: float | None
) -> engine.Params:
    """One differentiable step from the fixed point whose backward applies (I - J^T)^{-1} (J
    over the parameters EM updates; held ones are constants of the map)."""
    held = sets.em_map.fixed
    held_names = set() if held is None else {*held.latent, *held.emission}
    values = {**params.latent, **params.emission}
    names = [name for name in values if name not in held_names]
    shapes = [values[name].shape for name in names]
    sizes = [math.prod(shape[2:]) for shape in shapes]

    def pack(p: engine.Params) -> torch.Tensor:  # -> (1, M, P)
        every = {**p.latent, **p.emission}
        return torch.cat([every[name].reshape(*every[name].shape[:2], -1) for name in names], -1)

    def unpack(z: torch.Tensor) -> engine.Params:
        parts = dict(zip(names, (part.reshape(shape) for part, shape in zip(z.split(sizes, -1), shapes))))
        every = {**values, **parts}
        return engine.Params({n: every[n] for n in params.latent}, {n: every[n] for n in params.emission}).with_fixed(held)

    def fixed_point_map(z: torch.Tensor) -> torch.Tensor:
        return pack(sets.step(unpack(z), iteration))

    z_star = pack(params).detach()
    z = fixed_point_map(z_star)  # graph to X through one step
    _warn_if_not_converged(z.detach(), z_star)
    if z.requires_grad:
        z_leaf = z.detach().requires_grad_()
        with torch.enable_grad():
            f_leaf = fixed_point_map(z_leaf)
        z.register_hook(_adjoint_solver(f_leaf, z_leaf, max_iter, tol))
    return unpack(z)


def _warn_if_not_converged(z: torch.Tensor, z_star: torch.Tensor) -> None:
    """The implicit gradient is that of the fixed point: say so when EM has not reached it."""
    residual = float(((z - z_star).abs() / (1 + z_star.abs())).max())
    tolerance = math.sqrt(torch.finfo(z.dtype).eps)
    if residual > tolerance:
        warnings.warn(
            f"em: EM has not converged after n_iter iterations (relative step {residual:.2g} > {tolerance:.2g}); "
            "gradient='implicit' differentiates the fixed point, so raise n_iter",
            ImplicitGradientWarning, stacklevel=4,
        )


def _adjoint_solver(f: torch.Tensor, z: torch.Tensor, max_iter: int, tol: float | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """Gradient hook: g -> v with (I - J^T) v = g, J = df/dz (block diagonal: one block per set).

    With at most DIRECT_SOLVE_PARAMETERS parameters per set, every set's J is formed from P
    vector-Jacobian products and the system solved directly (exact, also where EM contracts
    slowly); larger problems iterate v <- g + J^T v, which converges because EM contracts.
    """
    tol = math.sqrt(torch.finfo(f.dtype).eps) if tol is None else tol

    def solve(grad: torch.Tensor) -> torch.Tensor:
        solver = _direct_adjoint if grad.shape[-1] <= DIRECT_SOLVE_PARAMETERS else _iterative_adjoint
        v = solver(f, z, grad, max_iter, tol)
        if not bool(torch.isfinite(v).all()):
            raise IllConditionedError(
                "em: the implicit gradient is not finite (I - J is singular at this point: EM is not at a fixed point "
                "that contracts); run more iterations (n_iter) or use gradient='unrolled' or 'last'"
            )
        return v

    return solve


def _direct_adjoint(f: torch.Tensor, z: torch.Tensor, grad: torch.Tensor, max_iter: int, tol: float) -> torch.Tensor:
    """(I - J^T)^{-1} g per set, J (1, M, P, P) from P vector-Jacobian products."""
    n_parameters = grad.shape[-1]
    rows = []
    for i in range(n_parameters):
        basis = torch.zeros_like(grad)
        basis[..., i] = 1
        rows.append(torch.autograd.grad(f, z, basis, retain_graph=True)[0])  # row i of every set's J
    jacobian = torch.stack(rows, -2)  # (1, M, P, P)
    eye = torch.eye(n_parameters, dtype=grad.dtype, device=grad.device)
    solution, info = torch.linalg.solve_ex(eye - jacobian.mT, grad.unsqueeze(-1))
    return torch.where((info == 0)[..., None, None], solution, math.inf).squeeze(-1)


def _iterative_adjoint(f: torch.Tensor, z: torch.Tensor, grad: torch.Tensor, max_iter: int, tol: float) -> torch.Tensor:
    """v = g + J^T v by fixed-point iteration (converges where EM contracts)."""
    v = grad
    scale = max(float(grad.abs().max()), torch.finfo(grad.dtype).tiny)
    for _ in range(max_iter):
        update = torch.autograd.grad(f, z, v, retain_graph=True)[0] + grad
        change = float((update - v).abs().max())
        v = update
        # For a contraction |v| stays within |g| / (1 - rho); growth by 1e8 means rho >= 1.
        if not math.isfinite(change) or change > DIVERGENCE_FACTOR * scale:
            return torch.full_like(v, math.inf)
        if change <= tol * scale:
            return v
    warnings.warn(
        f"em: the implicit-gradient iteration did not converge in {max_iter} steps (last change {change:.3g}, "
        f"tolerance {tol * scale:.3g}); raise n_iter so EM reaches its fixed point, or implicit_max_iter",
        ImplicitGradientWarning, stacklevel=2,
    )
    return v


class ImplicitGradientWarning(UserWarning):
    """The adjoint iteration of ``gradient="implicit"`` stopped before it converged."""


def _checked_sets(X: Any) -> torch.Tensor:
    if not isinstance(X, torch.Tensor) or not X.is_floating_point():
        kind = f"a {X.dtype} tensor" if isinstance(X, torch.Tensor) else type(X).__name__
        raise ValueError(f"X must be a floating-point tensor (*batch, N, D), got {kind}")
    if X.is_meta:
        raise ValueError(f"X must hold data, got a tensor on the meta device (shape {tuple(X.shape)} only)")
    if X.dim() < 2 or X.shape[-1] < 1 or X.shape[-2] < 1 or X.numel() == 0:
        raise ValueError(f"X must have shape (*batch, N, D) with N, D >= 1, got {tuple(X.shape)}")
    return X


def _checked_mask(mask: Any, X: torch.Tensor) -> torch.Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"mask must be a tensor (*batch, N) = {tuple(X.shape[:-1])}, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(X.shape[:-1]):
        raise ValueError(f"mask must have shape (*batch, N) = {tuple(X.shape[:-1])}, got {tuple(mask.shape)}")
    mask = mask.detach()
    if mask.dtype != torch.bool:
        if not mask.is_floating_point():
            raise ValueError(f"mask must be boolean or hold float weights in [0, 1], got dtype {mask.dtype}")
        if not bool(((mask >= 0) & (mask <= 1)).all()):
            raise ValueError(
                f"mask must be boolean or hold float weights in [0, 1], got values in "
                f"[{mask.min().item():g}, {mask.max().item():g}]"
            )
    if not bool((mask > 0).any(-1).all()):
        raise ValueError("mask must keep at least one point of every set, got a set without points")
    return mask.to(device=X.device)


def _weights_of(mask: torch.Tensor | None, sample_weight: Any, X: torch.Tensor) -> torch.Tensor | None:
    """The points' weights (*batch, N): the mask's times ``sample_weight``'s, or None."""
    weights = check_sample_weight(sample_weight, "sample_weight", n_points=X.shape[-2], batch_shape=X.shape[:-2],
                                  device=X.device, dtype=X.dtype)
    if weights is None:
        return mask
    weights = weights.detach().expand(X.shape[:-1])
    weights = weights if mask is None else weights * mask.to(X.dtype)
    if not bool((weights > 0).any(-1).all()):
        raise ValueError("mask and sample_weight must keep at least one point of every set, got a set without points")
    return weights


def _working_init(family: ComponentFamily, init: Mapping[str, torch.Tensor], X: torch.Tensor) -> engine.Params:
    """Validated initial parameters in the working layout (1, M, ...): log-weights and theta."""
    if not isinstance(init, Mapping) or "logits" not in init:
        raise ValueError("init must be a mapping with 'logits' (K,) and the family's parameters")
    logits = init["logits"]
    if not isinstance(logits, torch.Tensor) or logits.dim() < 1:
        raise ValueError(f"init['logits'] must be a tensor (K,) or (*batch, K), got {logits!r}")
    K, D, batch = logits.shape[-1], X.shape[-1], tuple(X.shape[:-2])
    expected = {"logits": (K,), **family.event_shapes(K, D)}
    if set(init) != set(expected):
        raise ValueError(f"init must hold exactly {sorted(expected)}, got {sorted(init)}")
    M = math.prod(batch)
    working = {}
    for name, shape in expected.items():
        value = init[name]
        if not isinstance(value, torch.Tensor) or tuple(value.shape) not in (shape, batch + shape):
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"init[{name!r}] must have shape {shape} or {batch + shape}, got {got}")
        if value.dtype != X.dtype or value.device != X.device:
            raise ValueError(
                f"init[{name!r}] must match X's dtype and device ({X.dtype}, {X.device}), got ({value.dtype}, {value.device})"
            )
        check_finite(value.detach(), f"init[{name!r}]")
        working[name] = value.expand(*batch, *shape).reshape(1, M, *shape)
    log_weights = working.pop("logits").log_softmax(-1)
    return engine.Params({"log_weights": log_weights}, working)
