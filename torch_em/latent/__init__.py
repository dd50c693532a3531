"""Latent structures: how the hidden states of a model are distributed (see :mod:`.base`)."""
from .base import LatentParams, LatentStructure
from .independent import MIXTURE, IndependentCategorical
from .markov import MarkovChain
from .variational_weights import VariationalWeights

__all__ = ["LatentParams", "LatentStructure", "IndependentCategorical", "MIXTURE", "MarkovChain", "VariationalWeights"]
