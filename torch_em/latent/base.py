"""The protocol every latent structure implements.

A latent structure says how the hidden variable of a model is distributed: one categorical per
point (a mixture, :mod:`torch_em.latent.independent`) or a Markov chain over each sequence (a
hidden Markov model). Given the emission log-densities of every point under every state, it
gives the posterior over the states, the log-evidence and its own expected statistics; from the
summed statistics its closed-form M-step gives its parameters. It never sees the emission
family, and a family never sees it: any family works under any latent structure.

Its parameters are a dict of tensors in the working layout ``(R, M, ...)`` (e.g.
``{"log_weights": (R, M, K)}``), travelling with the family's as :class:`torch_em.em.Params`.
"""
from __future__ import annotations

import torch

from ..statistics import Statistics

LatentParams = dict[str, torch.Tensor]


class LatentStructure:
    """The distribution of the hidden states of a batch of models, as EM needs it."""

    #: Names of its parameters (working layout, (R, M, ...) each).
    parameter_names: tuple[str, ...] = ()
    #: Names of its own statistics in :attr:`Statistics.latent` (none for a mixture).
    statistic_names: tuple[str, ...] = ()
    #: The statistic each parameter's M-step normalises: one of :attr:`statistic_names`, or
    #: ``"counts"`` (the emission counts, reshaped to the parameter). A Dirichlet prior's
    #: pseudo-counts are added there (:mod:`torch_em.priors`).
    parameter_statistics: dict[str, str] = {}
    #: The units (per nat) its :meth:`posterior` takes log-densities in: the E-step scales the
    #: emission GEMM's parameters by it (free), where a pass over the block would cost time.
    log_joint_scale: float = 1.0
    #: Whether :meth:`posterior` takes an inverse temperature ``beta`` other than 1 (a tempered
    #: E-step, for deterministic annealing: :mod:`torch_em.annealing`).
    tempers: bool = False

    def log_prior(self, latent: LatentParams) -> torch.Tensor | None:
        """A log-probability per state (R, M, K) that does not depend on the point, added to
        every emission log-density before the posterior (folded into the emission GEMM's
        constant, so it costs nothing), or None."""
        raise NotImplementedError

    def posterior(
        self, log_joint: torch.Tensor, latent: LatentParams, weights: torch.Tensor | None,
        lengths: torch.Tensor | None = None, beta: float = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Posterior over the states of every point of a chunk.

        ``log_joint``: (R, M, K, n) emission log-densities plus :meth:`log_prior`, in units of
        :attr:`log_joint_scale` per nat, which the structure may overwrite (its storage is the
        posterior's); ``weights``: (n,) / (M, n) or None; ``lengths``: (s,) when the chunk's n
        points are s sequences padded to n // s steps each (:class:`torch_em.data.SequenceData`;
        padded steps have weight 0), None for independent points. Returns the weighted
        posteriors (R, M, K, n) (``weights`` applied: what the emission statistics sum), the
        weighted log-evidence of the chunk (R, M) and the chunk's own statistics by name
        (additive over chunks).

        ``beta`` (only for a structure that :attr:`tempers`; the E-step passes it only when it is
        not 1): a tempered posterior. ``log_joint`` is then ``beta`` times the log joint (in units of
        :attr:`log_joint_scale` per nat), the posteriors are its softmax over the states and the
        log-evidence is the tempered one, ``(1 / beta) sum_n w_n log sum_k p(x_n, k) ** beta``.
        """
        raise NotImplementedError

    def log_evidence(
        self, log_joint: torch.Tensor, latent: LatentParams, weights: torch.Tensor | None,
        lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The weighted log-evidence (R, M) of a chunk that :meth:`posterior` returns, alone (the
        same number; ``log_joint`` may be overwritten). Default: from :meth:`posterior`; a
        structure may skip forming the posteriors."""
        return self.posterior(log_joint, latent, weights, lengths)[1]

    def m_step(self, stats: Statistics, fixed: LatentParams) -> LatentParams:
        """Closed-form maximiser given summed statistics; ``fixed`` parameters are kept."""
        raise NotImplementedError

    def variational_bound(self, stats: Statistics, latent: LatentParams) -> torch.Tensor | None:
        """For a structure whose parameters have a variational distribution (variational Bayes):
        its part of the lower bound (R, M) that EM monitors instead of the log-likelihood, from
        the statistics of an E-step and the parameters ``latent`` of the M-step from them.
        None (the default): EM maximises the likelihood."""
        return None

    def select_models(self, models: torch.Tensor) -> "LatentStructure":
        """The structure for the models ``models`` (A,) of its batch only, in that order: itself,
        unless it holds hyperparameters per model (a fit that computes only its running models
        selects them with their data)."""
        return self

    def statistic_shapes(self, n_states: int) -> dict[str, tuple[int, ...]]:
        """The shape of each of its statistics for one model (e.g. ``{"transitions": (K, K)}``)."""
        return {}

    def default_parameters(self, shape: tuple[int, ...], n_states: int, like: torch.Tensor) -> LatentParams:
        """Uninformative parameters for a batch ``shape`` (e.g. (R, M)), on ``like``'s device and dtype."""
        raise NotImplementedError

    def n_free_parameters(self, n_states: int) -> int:
        """Free parameters of one model's latent structure (for BIC/AIC)."""
        raise NotImplementedError
