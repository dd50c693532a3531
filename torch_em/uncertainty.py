"""Standard errors and confidence intervals of a fitted model's parameters.

    se = torch_em.standard_errors(model, X)               # observed information (default)
    se.means, se.covariances, se.weights                  # shaped like the model's properties
    lower, upper = se.confidence_intervals(0.95)["means"]

Methods:

- ``"observed"``: the observed information, the negative Hessian of the observed-data
  log-likelihood, by autograd in the model's own unconstrained parameters; the covariance of the
  reported (constrained) parameters follows by the delta method, ``J I^+ J^T`` (Louis 1982 gives
  the same matrix from complete-data quantities). The parametrisation is redundant (a softmax's
  logits are defined up to a constant, entries below a Cholesky factor's diagonal are unused):
  those directions have zero curvature and move no reported parameter, so the Moore-Penrose
  pseudo-inverse ``I^+`` is exact for what is reported.
- ``"opg"``: the outer product of the per-point (per-sequence) scores, ``sum_n s_n s_n^T``.
- ``"sandwich"``: the robust ``I^+ (sum_n s_n s_n^T) I^+`` (misspecified models).
- ``"bootstrap"``: ``n_boot`` nonparametric bootstrap refits as one batched fit, each resample
  multinomial counts as sample weights on the same rows (each refit evaluates only the rows its
  resample drew, about 63 % of them, with their counts), started from the fitted parameters
  (so components keep their labels); the standard deviation over the refits, percentile
  intervals. ``"parametric_bootstrap"``: the same with ``n_boot`` datasets of N points drawn
  from the fitted model (``sample``). Both are for one mixture (``batch_shape == ()``).

Per model of a batch: models are independent, so the information is block diagonal and each
model's block is inverted on its own. Use float64; a fit that has not converged, or an
information matrix that is not positive definite on the identified directions, gives an
:class:`UncertaintyWarning`.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, cast

import torch

from ._validation import check_choice, check_int, check_sample_weight
from .data import features_fit_in_cache
from .families.base import ComponentFamily, NotFittedError, Theta
from .families.bernoulli import Bernoulli
from .families.categorical import Categorical
from .families.exponential import Exponential
from .families.gaussian import Gaussian
from .families.poisson import Poisson
from .families.product import Product
from .latent_model import LatentModel
from .mixture import Mixture

METHODS = ("observed", "opg", "sandwich", "bootstrap", "parametric_bootstrap")
#: Eigenvalues of a model's information below this fraction of its largest are its parametrisation's
#: redundant directions (exactly 0 in exact arithmetic).
REDUNDANT = 1e-10


class UncertaintyWarning(UserWarning):
    """Standard errors of a model that has not converged, or whose information is not positive definite."""


@dataclass
class StandardErrors:
    """Standard errors of the reported parameters (attributes named like the model's
    properties, each shaped like it, e.g. ``means (*batch_shape, K, D)``); ``estimates`` holds
    the parameters themselves and ``method`` how the errors were obtained."""

    estimates: dict[str, torch.Tensor]
    errors: dict[str, torch.Tensor]
    method: str
    samples: dict[str, torch.Tensor] | None = field(default=None, repr=False)  # the bootstrap's (B, ...)
    resample_weights: torch.Tensor | None = field(default=None, repr=False)  # the bootstrap's (B, N)

    def __getattr__(self, name: str) -> torch.Tensor:
        errors = self.__dict__.get("errors", {})
        if name in errors:
            return errors[name]
        raise AttributeError(f"no standard errors named {name!r}; there are {sorted(errors)}")

    def confidence_intervals(self, level: float = 0.95) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``(lower, upper)`` per parameter: ``estimate -+ z se`` (normal approximation), or the
        bootstrap's percentiles for ``method="bootstrap"``."""
        if not 0 < level < 1:
            raise ValueError(f"level must be in (0, 1), got {level!r}")
        if self.samples is not None:
            tail = (1 - level) / 2
            return {name: (values.quantile(tail, dim=0), values.quantile(1 - tail, dim=0))
                    for name, values in self.samples.items()}
        z = math.sqrt(2) * torch.special.erfinv(torch.tensor(level, dtype=torch.float64)).item()
        return {name: (self.estimates[name] - z * se, self.estimates[name] + z * se) for name, se in self.errors.items()}


def standard_errors(model: Any, X: Any, *args: Any, method: str = "observed", n_boot: int = 200,
                    seed: int | None = None, sample_weight: Any = None) -> StandardErrors:
    """Standard errors of a fitted mixture's or HMM's parameters on data ``X`` (and the
    model's further evaluation arguments ``*args``, e.g. an HMM's ``lengths``): see the module
    doc for the methods. ``n_boot``, ``seed`` and ``sample_weight`` (the data's own weights)
    serve the bootstrap, which is for a mixture of one model (``batch_shape == ()``)."""
    check_choice(method, "method", METHODS)
    if not isinstance(model, LatentModel):
        raise ValueError(f"standard_errors takes a fitted mixture or HMM, got a {type(model).__name__}")
    if not model.is_initialized or model.n_iter_ is None:
        raise NotFittedError(f"{type(model).__name__} is not fitted yet; call fit before standard_errors")
    if model.converged_ is not None and not bool(model.converged_.all()):
        warnings.warn("the fit has not converged: standard errors assume an interior optimum", UncertaintyWarning,
                      stacklevel=2)
    if method.endswith("bootstrap"):
        check_int(n_boot, "n_boot", minimum=2)
        return _bootstrap(model, X, n_boot, seed, sample_weight, parametric=method == "parametric_bootstrap")
    if sample_weight is not None:
        raise ValueError("sample_weight serves method='bootstrap' only, got it with method=" + repr(method))
    layout = _Flat(model)
    flat = layout.flatten().requires_grad_(True)

    def per_point(vector: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(model, layout.unflatten(vector), (X, *args))  # (*batch, n)

    def total(vector: torch.Tensor) -> torch.Tensor:
        return per_point(vector).sum()

    estimates = {name: value.detach() for name, value in layout.reported(flat.detach()).items()}
    columns = layout.columns()  # (M, P_m)
    jacobian = _block_jacobian(layout.reported_vector, flat, columns)  # (M, Q_m, P_m)
    information = -_hessian_blocks(total, flat, columns) if method in ("observed", "sandwich") else None
    if method in ("opg", "sandwich"):
        scores = _block_jacobian(per_point, flat, columns)  # (M, n, P_m)
        outer = scores.mT @ scores
    if method == "opg":
        covariance = _pseudo_inverse(outer)
    else:
        information = cast(torch.Tensor, information)  # (computed for "observed" and "sandwich")
        covariance = _pseudo_inverse(0.5 * (information + information.mT))
        if method == "sandwich":
            covariance = covariance @ outer @ covariance
    variances = (jacobian @ covariance @ jacobian.mT).diagonal(dim1=-2, dim2=-1).clamp_min(0)  # (M, Q_m)
    errors = layout.reported_shapes(variances.sqrt(), estimates)
    return StandardErrors(estimates, errors, method)


def _model_tangents(columns: torch.Tensor, n_parameters: int) -> torch.Tensor:
    """(P_m, P): tangent j is 1 at the j-th parameter of every model at once. Models are
    independent, so one product with it gives column j of every model's block."""
    M, P_m = columns.shape
    tangents = torch.zeros(P_m, n_parameters, dtype=torch.float64)
    tangents[torch.arange(P_m).expand(M, P_m), columns] = 1.0
    return tangents


def _hessian_blocks(total: Callable[[torch.Tensor], torch.Tensor], flat: torch.Tensor,
                    columns: torch.Tensor) -> torch.Tensor:
    """Every model's block (M, P_m, P_m) of the Hessian of ``total`` (a sum over independent
    models) by P_m Hessian-vector products, not one per entry of the whole batch."""
    point = flat.detach().requires_grad_(True)
    (gradient,) = torch.autograd.grad(total(point), point, create_graph=True)
    tangents = _model_tangents(columns, point.numel()).to(point)
    blocks = [torch.autograd.grad(gradient, point, tangent, retain_graph=True)[0][columns] for tangent in tangents]
    return torch.stack(blocks, -1)  # (M, P_m, P_m)


def _block_jacobian(function: Callable[[torch.Tensor], torch.Tensor], flat: torch.Tensor,
                    columns: torch.Tensor) -> torch.Tensor:
    """Every model's Jacobian (M, Q_m, P_m) of ``function`` (flat -> (M, Q_m) outputs, model m's
    depending on its own parameters only). A column (every output of every model) is a
    Jacobian-vector product, taken by reverse mode twice: ``J v = d/du <J^T u, v>``."""
    point = flat.detach().requires_grad_(True)
    values = function(point).reshape(columns.shape[0], -1)  # (M, Q_m)
    probe = torch.zeros_like(values, requires_grad=True)
    (pulled,) = torch.autograd.grad(values, point, probe, create_graph=True)  # J^T u, linear in u
    tangents = _model_tangents(columns, point.numel()).to(point)
    return torch.stack([torch.autograd.grad(pulled, probe, tangent, retain_graph=True)[0] for tangent in tangents], -1)


def _pseudo_inverse(matrices: torch.Tensor) -> torch.Tensor:
    """Moore-Penrose inverses of symmetric information matrices (M, P_m, P_m); warns for a
    model whose matrix is not positive semi-definite beyond rounding."""
    eigenvalues, vectors = torch.linalg.eigh(matrices)
    scale = eigenvalues.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(matrices.dtype).tiny)
    indefinite = (eigenvalues < -1e3 * REDUNDANT * scale).any(-1).nonzero().flatten().tolist()
    if indefinite:
        warnings.warn(f"the information of model(s) {indefinite[:10]} is not positive definite (smallest eigenvalue "
                      f"{float(eigenvalues.min()):.3g}): not at a maximum of the likelihood", UncertaintyWarning,
                      stacklevel=3)
    kept = eigenvalues > REDUNDANT * scale
    inverse = torch.where(kept, 1 / eigenvalues.clamp_min(torch.finfo(matrices.dtype).tiny), 0.0)
    return (vectors * inverse.unsqueeze(-2)) @ vectors.mT


class _Flat:
    """A model's parameters as one flat vector (every model of the batch, parameter after
    parameter), and the reported parameters as functions of it."""

    def __init__(self, model: Any):
        self.model = model
        self.names = list(model._parameter_names)
        self.batch_shape = tuple(model.batch_shape)
        self.n_models = math.prod(self.batch_shape)
        self.shapes = {name: tuple(getattr(model, name).shape) for name in self.names}
        self.sizes = {name: math.prod(shape) for name, shape in self.shapes.items()}
        # Reported parameters: the latent probabilities (softmax of their logits) and the family's views.
        self.latent = {name: working.removeprefix("log_") for name, working in model._latent_names.items()}

    def flatten(self) -> torch.Tensor:
        return torch.cat([getattr(self.model, name).detach().reshape(-1) for name in self.names])

    def unflatten(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = vector.split([self.sizes[name] for name in self.names])
        return {name: part.reshape(self.shapes[name]) for name, part in zip(self.names, parts)}

    def columns(self) -> torch.Tensor:
        """(M, P_m): the positions of each model's entries in the flat vector."""
        index, offset = [], 0
        for name in self.names:
            per_model = self.sizes[name] // self.n_models
            index.append(offset + per_model * torch.arange(self.n_models).unsqueeze(-1) + torch.arange(per_model))
            offset += self.sizes[name]
        return torch.cat(index, -1)

    def reported(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        values = self.unflatten(vector)
        reported = {public: values[name].softmax(-1) for name, public in self.latent.items()}
        theta = {name: values[name] for name in self.model._family_names}
        reported.update(family_views(self.model.family, theta))
        return reported

    def reported_vector(self, vector: torch.Tensor) -> torch.Tensor:
        """Every reported parameter, per model: (M, Q_m)."""
        return torch.cat([value.reshape(self.n_models, -1) for value in self.reported(vector).values()], -1)

    def reported_shapes(self, values: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-model values (M, Q_m) in the order of :meth:`reported` -> the shapes of ``like``."""
        sizes = [value.numel() // self.n_models for value in like.values()]
        return {name: part.reshape(like[name].shape) for name, part in zip(like, values.split(sizes, -1))}

def family_views(family: ComponentFamily, theta: Theta, prefix: str = "") -> dict[str, torch.Tensor]:
    """The constrained parameters a family reports, by the names of the models' properties:
    a Gaussian's ``means`` and ``covariances``, ``probs`` of Bernoulli and Categorical
    components, ``rates`` of Poisson and Exponential ones, a Product's per block (prefixed);
    any other family's own parameters."""
    if isinstance(family, Gaussian):
        return {prefix + "means": theta["loc"], prefix + "covariances": family.covariance(theta)}
    if isinstance(family, (Bernoulli, Categorical)):
        return {prefix + "probs": family.probs(theta)}
    if isinstance(family, (Poisson, Exponential)):
        return {prefix + "rates": family.rates(theta)}
    if isinstance(family, Product):
        views = {}
        for position, block in enumerate(family.blocks):
            views.update(family_views(block.family, family.block_theta(theta, position), prefix + block.prefix))
        return views
    return {prefix + name: value for name, value in theta.items()}


def _bootstrap(model: Any, X: Any, n_boot: int, seed: int | None, sample_weight: Any,
               parametric: bool) -> StandardErrors:
    """``n_boot`` refits as one batched fit started from the fit: of the same data with
    multinomial resample weights (nonparametric), or of ``n_boot`` datasets drawn from the
    fitted model (parametric)."""
    if tuple(model.batch_shape) != () or not isinstance(model, Mixture):
        raise ValueError(f"the bootstrap is for one model (a mixture with batch_shape ()), got a {type(model).__name__} with "
                         f"batch_shape {tuple(model.batch_shape)}")
    X = torch.as_tensor(X, dtype=model.dtype, device=model.device)
    n = X.shape[-2]
    generator = torch.Generator(device="cpu")
    if seed is None:
        generator.seed()  # a fresh nondeterministic seed, leaving torch's global generator alone
    else:
        generator.manual_seed(seed)
    if parametric:
        if sample_weight is not None:
            raise ValueError("sample_weight serves the nonparametric bootstrap, got it with method='parametric_bootstrap'")
        data = model.sample(n_boot * n, seed=int(torch.randint(2**62, (), generator=generator)))[0]
        data, weights, drawn = data.reshape(n_boot, n, -1), None, None  # (B, N, D), the refits' data
    else:
        weights = _resample_counts(n, n_boot, sample_weight, generator).to(model.dtype).to(model.device)
        data, drawn = _drawn_rows(model, X, weights)  # the refits' data and weights
    config = {**model._config(), "batch_shape": (n_boot,), "warm_start": True, "n_init": 1, "on_error": "isolate"}
    config.pop("n_features", None)
    refits = type(model)(**config, n_features=model.n_features, device=model.device, dtype=model.dtype)
    refits._assign({name: getattr(model, name).detach().expand(n_boot, *getattr(model, name).shape)
                    for name in model._parameter_names}, create=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        refits.fit(data, sample_weight=drawn)
    layout = _Flat(model)
    estimates = {name: value.detach() for name, value in layout.reported(layout.flatten()).items()}
    kept = ~refits.failed_ if refits.failed_ is not None else torch.ones(n_boot, dtype=torch.bool)
    samples = {name: value.detach()[kept] for name, value in _Flat(refits).reported(_Flat(refits).flatten()).items()}
    errors = {name: value.std(0) for name, value in samples.items()}
    method = "parametric_bootstrap" if parametric else "bootstrap"
    return StandardErrors(estimates, errors, method, samples, None if weights is None else weights[kept])


def _drawn_rows(model: Mixture, X: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The refits' data: each resample's drawn rows only (about 63 % of them) as per-model data,
    X (N, D) and counts (B, N) -> rows (B, L, D) and their counts (B, L), L the most rows any
    resample draws (a resample with fewer ends in rows of count 0): the same weighted sums, a
    third less work. Where those rows' features would not fit in the feature cache (large N, B
    or D: B copies of the data), the shared X (N, D) and the counts as they are."""
    drawn = counts > 0
    length = int(drawn.sum(-1).max())
    n_stats = model.family.n_statistics(X.shape[-1])
    if not features_fit_in_cache(counts.shape[0] * length, n_stats, X.element_size()):
        return X, counts
    order = torch.sort((~drawn).to(torch.uint8), dim=-1, stable=True).indices[:, :length]  # drawn rows first
    return X[order], counts.gather(-1, order)


def _resample_counts(n: int, n_boot: int, sample_weight: Any, generator: torch.Generator) -> torch.Tensor:
    """(B, N) multinomial counts: how often each row is drawn into each of ``n_boot`` resamples of
    size N (rows drawn in proportion to ``sample_weight``; the counts then rescaled to its total)."""
    if sample_weight is None:
        base = torch.ones(n, dtype=torch.float64)
    else:
        base = cast(torch.Tensor, check_sample_weight(  # (given: a tensor)
            sample_weight, "sample_weight", n_points=n, batch_shape=(), device=torch.device("cpu"), dtype=torch.float64))
    if sample_weight is None:  # rows equally likely: uniform draws (much faster than multinomial)
        rows = torch.randint(0, n, (n_boot, n), generator=generator)  # (B, N)
    else:
        rows = torch.multinomial(base.expand(n_boot, n), n, replacement=True, generator=generator)
    counts = torch.zeros(n_boot, n, dtype=torch.float64).scatter_add_(1, rows, torch.ones(n_boot, n, dtype=torch.float64))
    return counts if sample_weight is None else counts * (float(base.sum()) / n)
