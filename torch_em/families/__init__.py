"""Component families: interchangeable distributions a mixture is made of."""
from .base import ComponentFamily, IllConditionedError
from .bernoulli import Bernoulli
from .categorical import Categorical
from .exponential import Exponential
from .gamma import Gamma
from .gaussian import COVARIANCE_TYPES, Gaussian
from .poisson import Poisson
from .product import Product
from .variational_gaussian import GaussianWishartPrior, VariationalGaussian
from .von_mises_fisher import VonMisesFisher

__all__ = [
    "COVARIANCE_TYPES",
    "Bernoulli",
    "Categorical",
    "ComponentFamily",
    "Exponential",
    "Gamma",
    "Gaussian",
    "GaussianWishartPrior",
    "IllConditionedError",
    "Poisson",
    "Product",
    "VariationalGaussian",
    "VonMisesFisher",
]
