"""torch_em: GPU-accelerated, differentiable Expectation-Maximization in PyTorch."""
from .em import ConvergenceWarning
from .families import ComponentFamily, Gaussian, IllConditionedError
from .gaussian_mixture import GaussianMixture
from .kmeans import KMeans
from .mixture import Mixture

__version__ = "0.1.0"

__all__ = [
    "ComponentFamily",
    "ConvergenceWarning",
    "Gaussian",
    "GaussianMixture",
    "IllConditionedError",
    "KMeans",
    "Mixture",
]
