"""Component families: interchangeable distributions a mixture is made of."""
from .base import ComponentFamily, IllConditionedError
from .gaussian import COVARIANCE_TYPES, Gaussian

__all__ = ["COVARIANCE_TYPES", "ComponentFamily", "Gaussian", "IllConditionedError"]
