"""torch_em: GPU-accelerated, differentiable Expectation-Maximization in PyTorch."""
from .em import ConvergenceWarning, FitFailedWarning
from .families.base import NotFittedError
from .families import Bernoulli, Categorical, ComponentFamily, Exponential, Gamma, Gaussian, IllConditionedError, Poisson, Product, VonMisesFisher
from .bayesian_mixture import BayesianGaussianMixture
from .gaussian_mixture import GaussianMixture
from .hmm import HMM
from .hmm_models import CategoricalHMM, GMMHMM, GaussianHMM, PoissonHMM
from .kmeans import KMeans, kmeans_plusplus
from .mixture import Mixture
from .selection import SelectionResult, select
from .uncertainty import StandardErrors, UncertaintyWarning, standard_errors
from . import functional, nn, priors, serialization
from .functional import EMState, ImplicitGradientWarning
from .nn import EMLayer
from .serialization import load
from .training import reset_optimizer_state, saved_tensor_bytes

__version__ = "0.1.0"

__all__ = [
    "BayesianGaussianMixture",
    "Bernoulli",
    "Categorical",
    "Exponential",
    "Gamma",
    "Poisson",
    "Product",
    "VonMisesFisher",
    "ComponentFamily",
    "ConvergenceWarning",
    "EMLayer",
    "EMState",
    "FitFailedWarning",
    "Gaussian",
    "GaussianMixture",
    "GaussianHMM",
    "GMMHMM",
    "HMM",
    "CategoricalHMM",
    "PoissonHMM",
    "IllConditionedError",
    "ImplicitGradientWarning",
    "KMeans",
    "Mixture",
    "NotFittedError",
    "functional",
    "kmeans_plusplus",
    "load",
    "nn",
    "reset_optimizer_state",
    "saved_tensor_bytes",
    "priors",
    "select",
    "standard_errors",
    "StandardErrors",
    "UncertaintyWarning",
    "SelectionResult",
    "serialization",
]
