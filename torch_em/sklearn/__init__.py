"""scikit-learn estimators backed by torch_em's modules.

``GaussianMixture``, ``KMeans`` and ``MiniBatchKMeans`` take scikit-learn's constructor
parameters with their meanings, follow the ``BaseEstimator`` protocol (``get_params`` /
``set_params``, ``clone``, pipelines, grid searches, ``check_estimator``), take numpy arrays,
pandas DataFrames and lists, and return numpy arrays in the float dtype of the data they were
fitted on. Each also takes ``device=`` and ``dtype=`` (where the torch module computes; default:
the CPU, in the data's dtype), and its fitted ``nn.Module`` is ``estimator.module_``.

scikit-learn is an optional dependency: ``pip install "torch-expectation-maximization[sklearn]"``.
``import torch_em`` does not import it; ``import torch_em.sklearn`` does.
"""
import re
from typing import cast

INSTALL = 'pip install "torch-expectation-maximization[sklearn]"'
#: The oldest scikit-learn with the estimator API used here (``__sklearn_tags__``, ``validate_data``).
MINIMUM_VERSION = (1, 6)

try:
    import sklearn
except ImportError as error:  # pragma: no cover - exercised only without scikit-learn
    raise ImportError(f"torch_em.sklearn needs scikit-learn: {INSTALL}") from error
if tuple(int(part) for part in cast(re.Match[str], re.match(r"(\d+)\.(\d+)", sklearn.__version__)).groups()) < MINIMUM_VERSION:
    raise ImportError(f"torch_em.sklearn needs scikit-learn >= 1.6, found {sklearn.__version__}: {INSTALL}")

from ._kmeans import KMeans, MiniBatchKMeans
from ._mixture import GaussianMixture

__all__ = ["GaussianMixture", "KMeans", "MiniBatchKMeans"]
