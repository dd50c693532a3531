"""Saving and loading models: one file that ``torch.load(path, weights_only=True)`` reads as is.

``model.save(path)`` writes, with ``torch.save``, a dict of plain Python values and tensors only
(no pickled class or function), so torch's safe loader reads it without any allow-listing, and
:func:`load` rebuilds the model from it, bit for bit. Format 1:

- ``"format"``: 1; ``"class"``: the model's registered name (``"GaussianMixture"``, ...).
- ``"config"``: the constructor's keyword arguments: ints, floats, strings, bools, None, tuples
  and lists; a family as ``{"__family__": name, "config": {...}}`` (its own constructor
  arguments, recursively for :class:`torch_em.Product`); initial values (``means_init``, ...) as
  tensors (a numpy array becomes a tensor of its dtype) or as the Python lists they were given as.
- ``"state_dict"``: the parameters and buffers (online-EM state included).
- ``"attributes"``: the fit attributes (``converged_``, ``n_iter_``, ``lower_bound_``,
  ``lower_bound_history_``, ``failed_``, ``failure_reasons_``, ``n_features``; a KMeans'
  ``labels_``, ``inertia_``, ``n_iter_``, ``converged_``).
- ``"module"``: ``anchor``, an empty tensor of the model's device and dtype (``map_location``
  moves it with the rest), whether the dtype still follows the data, the training flag and the
  parameters that do not require gradients.

Whole modules: ``torch.save(model, path)`` pickles a model as a call of :func:`from_payload` on
the same dict. That one function is registered with ``torch.serialization.add_safe_globals``
when torch_em is imported, so ``torch.load(path, weights_only=True)`` rebuilds the model too. It
is safe: it builds only registered classes from plain values, through their validating
constructors and the checked ``load_state_dict``. ``copy.deepcopy`` and ``copy.copy`` keep their
usual attribute-by-attribute meaning. A model the format cannot hold (a KMeans with a callable
``init``, a class that is not registered) pickles as before and is rejected by :func:`save`.
"""
from __future__ import annotations

import copy
import os
import pickle
from typing import IO, Any, Callable, SupportsIndex, TypeGuard, Union

import numpy as np
import torch

from . import priors
from .families.base import ComponentFamily

#: The newest file format this version writes and reads.
FORMAT = 1
#: Keys every model file has.
KEYS = ("format", "class", "config", "state_dict", "attributes", "module")
#: Fit attributes of the models built on :class:`torch_em.latent_model.LatentModel`, and of KMeans.
LATENT_MODEL_ATTRIBUTES = ("converged_", "n_iter_", "lower_bound_", "lower_bound_history_", "failed_",
                           "failure_reasons_", "n_features")
KMEANS_ATTRIBUTES = ("labels_", "inertia_", "n_iter_", "converged_")
#: The marker of an encoded family in a configuration.
FAMILY_KEY = "__family__"
#: The marker of an encoded prior (:mod:`torch_em.priors`) in a configuration.
PRIOR_KEY = "__prior__"

Path = Union[str, os.PathLike, IO[bytes]]
_REGISTERED: dict[str, type] = {}
_PACKAGE_REGISTERED = False


def register(cls: type, name: str | None = None) -> type:
    """Let :func:`save` and :func:`load` handle ``cls`` (a model or a component family) under
    ``name`` (default: its class name). A model class gives ``_config()``, its constructor's
    keyword arguments; a family's constructor arguments must be attributes of the same names
    (or it overrides :meth:`ComponentFamily.config`). Returns ``cls`` (usable as a decorator)."""
    if not isinstance(cls, type):
        raise TypeError(f"register needs a class, got {type(cls).__name__} {cls!r}")
    name = cls.__name__ if name is None else name
    if _REGISTERED.get(name, cls) is not cls:
        raise ValueError(f"the name {name!r} is registered for {_REGISTERED[name]!r} already, got {cls!r}")
    _REGISTERED[name] = cls
    return cls


def registered_classes() -> dict[str, type]:
    """Every class a model file may name, by name (the package's models and families first)."""
    _register_package_classes()
    return dict(_REGISTERED)


def _register_package_classes() -> None:
    global _PACKAGE_REGISTERED
    if _PACKAGE_REGISTERED:
        return
    _PACKAGE_REGISTERED = True
    from . import families
    from .bayesian_mixture import BayesianGaussianMixture
    from .gaussian_mixture import GaussianMixture
    from .hmm import HMM
    from .hmm_models import CategoricalHMM, GMMHMM, GaussianHMM, PoissonHMM
    from .kmeans import KMeans
    from .mixture import Mixture

    for cls in (Mixture, GaussianMixture, BayesianGaussianMixture, KMeans, HMM, GaussianHMM, GMMHMM, CategoricalHMM, PoissonHMM,
                families.Bernoulli, families.Categorical, families.Exponential, families.Gamma, families.Gaussian,
                families.Poisson, families.Product, families.VonMisesFisher):
        register(cls)


def _name_of(cls: type) -> str | None:
    return next((name for name, known in registered_classes().items() if known is cls), None)


# --- writing --------------------------------------------------------------------------------------
def payload(model: Any) -> dict[str, Any]:
    """The model as format 1's dict of plain values and tensors (see the module doc); raises
    ValueError when the format cannot hold it (an unregistered class, a callable option).
    (``model``: an ``nn.Module`` of a registered class, with ``_config()`` and ``_dtype_buffer``.)"""
    name = _name_of(type(model))
    if name is None:
        raise ValueError(f"{type(model).__name__} is not a registered model class; register it with "
                         "torch_em.serialization.register(cls) (it must give _config())")
    anchor = getattr(model, model._dtype_buffer)  # the buffer that carries the model's device and dtype
    state = {key: value.detach() for key, value in model.state_dict().items()}
    return {
        "format": FORMAT,
        "class": name,
        "config": _encode(model._config(), f"{name} configuration"),
        "state_dict": state,
        "attributes": {key: _encode(getattr(model, key), key) for key in _attributes(type(model))},
        "module": {
            "anchor": torch.empty(0, device=anchor.device, dtype=anchor.dtype),
            "dtype_follows_data": bool(model._dtype_follows_data),
            "training": bool(model.training),
            "frozen": [key for key, parameter in model.named_parameters() if not parameter.requires_grad],
        },
    }


def _attributes(cls: type) -> tuple[str, ...]:
    """The fit attributes a file holds for a model of class ``cls``."""
    from .kmeans import KMeans

    return KMEANS_ATTRIBUTES if issubclass(cls, KMeans) else LATENT_MODEL_ATTRIBUTES


def save(model: Any, path: Path) -> None:  # (a model as payload takes)
    """Write ``model`` to ``path`` (a file name or a binary file object) in format 1."""
    torch.save(payload(model), path)


def _encode(value: Any, where: str) -> Any:
    """A configuration or attribute value as plain values and tensors (families by name)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (np.ndarray, np.generic)):
        return torch.from_numpy(np.array(value))
    if isinstance(value, (list, tuple)):  # torch.Size too
        items = [_encode(item, where) for item in value]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, dict):
        return {_encode(key, where): _encode(item, where) for key, item in value.items()}
    if isinstance(value, ComponentFamily):
        name = _name_of(type(value))
        if name is None:
            raise ValueError(f"{where}: the family {type(value).__name__} is not registered; register it with "
                             "torch_em.serialization.register(cls)")
        return {FAMILY_KEY: name, "config": _encode(value.config(), f"{where} ({name})")}
    if isinstance(value, priors.Prior):
        return {PRIOR_KEY: type(value).__name__, "config": _encode(value._hyperparameters(), where)}
    if hasattr(value, "__array__") and not callable(value):
        return torch.from_numpy(np.array(value))
    raise ValueError(f"{where}: a model file holds plain values, arrays and tensors, got {type(value).__name__} "
                     f"{value!r}; set it to such a value (e.g. KMeans' init to the centres) before saving")


# --- reading --------------------------------------------------------------------------------------
def load(path: Path, map_location: Any = None) -> torch.nn.Module:
    """The model of a file written by :meth:`save` (or ``torch.save(model)``), rebuilt: the same
    class, configuration, parameters, buffers and fit attributes, in the saved dtype, on the
    device ``map_location`` gives (``torch.load``'s meaning; default: the saved one).

    Raises ValueError for a file that is not a torch_em model, of a newer format, or naming an
    unknown class."""
    try:
        content = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
        raise ValueError(f"{path!r} is not a torch_em model file that torch.load(weights_only=True) reads "
                         f"({type(error).__name__}: {str(error)[:200]})") from error
    if isinstance(content, torch.nn.Module):  # torch.save(model): already rebuilt by from_payload
        return content
    return from_payload(content)


def from_payload(content: Any) -> torch.nn.Module:
    """The model of format 1's dict (see the module doc), checked first: ValueError for
    anything else, a newer format or an unknown class."""
    _check_payload(content)
    cls = registered_classes()[content["class"]]
    module = content["module"]
    anchor = module["anchor"]
    config = _decode(content["config"])
    try:
        model = cls(**config, device=anchor.device, dtype=anchor.dtype)
    except TypeError as error:  # e.g. an option this version of the class does not take
        raise ValueError(f"the model file's configuration {sorted(config)} does not fit {cls.__name__}: {error}") from error
    model.load_state_dict(content["state_dict"])
    for key in _attributes(cls):
        if key in content["attributes"]:
            setattr(model, key, content["attributes"][key])
    model._dtype_follows_data = bool(module["dtype_follows_data"])
    model.train(bool(module["training"]))
    parameters = dict(model.named_parameters())
    for key in module["frozen"]:
        if key not in parameters:
            raise ValueError(f"the model file lists {key!r} among the parameters without gradients, but "
                             f"{cls.__name__} has only {sorted(parameters)}")
        parameters[key].requires_grad = False  # (requires_grad_ is refused by an UninitializedParameter)
    return model


def _check_payload(content: Any) -> None:
    if not isinstance(content, dict) or "format" not in content:
        found = sorted(map(str, content)) if isinstance(content, dict) else type(content).__name__
        raise ValueError(f"a torch_em model file holds a dict with the keys {list(KEYS)}, got {found}")
    version = content["format"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"a torch_em model file has a positive integer 'format', got {version!r}")
    if version > FORMAT:
        raise ValueError(f"the model file has format {version}, newer than the formats up to {FORMAT} this "
                         "torch_em reads; load it with a newer torch_em")
    missing = [key for key in KEYS if key not in content]
    if missing:
        raise ValueError(f"a torch_em model file of format {version} has the keys {list(KEYS)}, it lacks {missing}")
    known = registered_classes()
    if content["class"] not in known or _is_family(known.get(content["class"])):
        models = [name for name, cls in known.items() if not _is_family(cls)]
        raise ValueError(f"the model file names the class {content['class']!r}, expected one of {models} "
                         "(or a class registered with torch_em.serialization.register)")
    if not isinstance(content["config"], dict) or not isinstance(content["state_dict"], dict):
        raise ValueError("a torch_em model file holds its 'config' and 'state_dict' as dicts, got "
                         f"{type(content['config']).__name__} and {type(content['state_dict']).__name__}")
    anchor = content["module"].get("anchor") if isinstance(content["module"], dict) else None
    if not isinstance(anchor, torch.Tensor) or not anchor.is_floating_point():
        raise ValueError(f"the model file's 'module' must hold 'anchor', a floating-point tensor, got {anchor!r}")


def _is_family(cls: type | None) -> TypeGuard[type[ComponentFamily]]:
    return isinstance(cls, type) and issubclass(cls, ComponentFamily)


def _decode(value: Any) -> Any:
    """The inverse of :func:`_encode` (families rebuilt by their registered names)."""
    if isinstance(value, dict) and PRIOR_KEY in value:
        cls = getattr(priors, str(value[PRIOR_KEY]), None)
        if not (isinstance(cls, type) and issubclass(cls, priors.Prior)):
            raise ValueError(f"the model file names the prior {value[PRIOR_KEY]!r}, which torch_em.priors does not have")
        return cls(**_decode(value["config"]))
    if isinstance(value, dict) and FAMILY_KEY in value:
        name = value[FAMILY_KEY]
        cls = registered_classes().get(name)
        if not _is_family(cls):
            families = [key for key, known in registered_classes().items() if _is_family(known)]
            raise ValueError(f"the model file names the family {name!r}, expected one of {families}")
        return cls(**_decode(value["config"]))
    if isinstance(value, dict):
        return {key: _decode(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_decode(item) for item in value]
        return items if isinstance(value, list) else tuple(items)
    return value


# --- whole modules --------------------------------------------------------------------------------
class Saveable:
    """``save(path)``, and pickling (``torch.save(model)``) as a call of :func:`from_payload` on
    the format's dict, for a model class with ``_config()``; copies keep the default meaning."""

    def save(self, path: Path) -> None:
        """Write the model to ``path`` (a file name or binary file object): configuration,
        parameters, buffers and fit attributes, as plain values and tensors that
        ``torch.load(path, weights_only=True)`` reads; :func:`torch_em.load` rebuilds the model."""
        save(self, path)

    def __reduce_ex__(self, protocol: SupportsIndex) -> tuple[Callable[..., Any], tuple[Any, ...]] | Any:
        try:
            return from_payload, (payload(self),)
        except ValueError:  # not representable: pickled attribute by attribute (weights_only=False to load)
            return object.__reduce_ex__(self, protocol)

    def __copy__(self) -> Any:
        return copy._reconstruct(self, None, *object.__reduce_ex__(self, 4))  # type: ignore[attr-defined]  # private; not in typeshed

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        return copy._reconstruct(self, memo, *object.__reduce_ex__(self, 4))  # type: ignore[attr-defined]  # private; not in typeshed


torch.serialization.add_safe_globals([from_payload])
