"""``HMM``: hidden Markov models with emissions of any component family, as an ``nn.Module``.

The latent structure is a Markov chain (:class:`torch_em.latent.MarkovChain`); everything else
is the engine every model shares (:class:`torch_em.latent_model.LatentModel`): Baum-Welch is the
shared EM map with forward-backward as the posterior, so restarts, thousands of independent
models (``batch_shape``), per-model convergence, isolation of failing models, held parameters
(``em_parameters``), online EM (``partial_fit``) and gradients work as for mixtures.

Parameters (unconstrained, ``(*batch_shape, ...)``): ``start_logits (*b, K)``,
``transition_logits (*b, K, K)`` (logits over the last axis), with ``n_mix > 1``
``mix_logits (*b, K, n_mix)``, then the family's with ``K * n_mix`` components (component
``k * n_mix + c`` is mixture component c of state k).
"""
from __future__ import annotations

import math
from typing import Any, cast

import torch

from . import em
from ._random import resolve_seed
from ._precision import keeps_dtype_when_rejected, without_autocast
from ._tracing import is_traced
from . import _workspace, distributed
from ._validation import (
    as_float_tensor, check_family, check_int, check_sample_weight, data_dtype,
)
from .data import CHUNK_ELEMENTS, SequenceData, sequence_row_weights
from .families.base import ComponentFamily, Theta
from .families.categorical import Categorical
from .latent import MarkovChain
from .latent_model import LatentModel
from .missing import check_missing_values, mean_imputed, observed_means, pattern_share, with_observed_values
from .markov_inference import forward_backward, log_likelihood, sample_states, viterbi
from .sequences import Sequences, as_sequences
from .streaming import BatchSource, StreamSample, batch_source

#: Emission log-density elements per E-step chunk of an HMM: larger than a mixture's, since the
#: forward-backward recursion over a chunk costs a loop over its time steps whatever its width.
HMM_CHUNK_ELEMENTS = 16 * CHUNK_ELEMENTS
#: Share of the uniform in the initial responsibilities of an HMM (see :class:`HMM`).
INITIAL_SOFTENING = 0.2


class HMM(LatentModel):
    """A batch of hidden Markov models with ``n_states`` states emitting from ``family``.

    The emissions are initialised by an M-step from the clustering of ``init_params`` softened
    towards uniform (``resp = 0.8 * hard + 0.2 / K``): from hard clusters a discrete emission
    would start with probability 0 for the symbols of the other clusters, which Baum-Welch could
    never give back.

    Args:
        n_states: K, hidden states per model.
        family: the emission family (any of :mod:`torch_em.families`), e.g.
            ``torch_em.Gaussian("diag")``; with ``n_mix > 1`` every state emits from a mixture of
            ``n_mix`` components of it.
        n_features: D. When given, parameters exist at construction; otherwise they are
            ``UninitializedParameter`` s materialised in place by the first fit (as for
            :class:`torch_em.Mixture`). (``n_components``, as for
            every model, is the family's number of components, ``n_states * n_mix``.)
        startprob_init: initial state probabilities ``(K,)`` or ``(*batch_shape, K)``.
        transmat_init: initial transition matrix ``(K, K)`` or ``(*batch_shape, K, K)``, rows
            summing to 1 (zeros allowed: a transition that never happens stays impossible).
        mix_weights_init: with ``n_mix > 1``, initial within-state weights ``(K, n_mix)``.
        init_params: how the emissions are initialised from the data's steps (``"kmeans"``,
            ``"k-means++"``, ``"random"``, ``"random_from_data"``); the chain starts uniform
            unless given. With every initial value given, no data-driven initialisation runs.
        options: as :class:`torch_em.Mixture`'s, forwarded: ``batch_shape=()``, ``n_init=1``,
            ``tol=1e-3`` (on the mean log-likelihood per time step), ``max_iter=100``,
            ``seed=None``, ``chunk_size``, ``em_parameters`` (names above), ``warm_start``,
            ``on_error``, the online-EM step sizes, ``prior_count``, ``device=None``, ``dtype=None``.
        missing: what NaN at a valid step of X means. ``"reject"`` (default): an error that names
            this option. ``"marginalize"``: a missing entry, integrated out exactly (Baum-Welch
            for incomplete data): every state's emission density of a step is that of its
            observed entries (the missing ones marginalised, as for :class:`torch_em.Mixture`),
            forward-backward runs on these densities, and the emission statistics add the
            expected statistics of the missing entries given the observed ones under each state,
            weighted by the state posteriors. A step with nothing observed is allowed (a dropped
            observation): its emission density is 1 under every state, so the chain carries the
            state through it, and its statistics are the states' own moments. ``fit``,
            ``partial_fit``, ``initialize``, batch sources, ``log_prob``, ``score_samples``,
            ``score``, ``predict_proba``, ``predict``, ``decode``, ``bic`` and ``aic`` then take
            such sequences; the emissions are initialised on the steps with every missing entry
            at its coordinate's mean. Supported by Gaussian emissions (every covariance type),
            the families with independent features and ``Product`` blocks; others (von
            Mises-Fisher) say so.

    Data (``X``): padded ``(S, T, D)`` for every model of the batch or ``(*batch_shape, S, T, D)``,
    with ``lengths (S,)`` or a prefix ``mask (S, T)``; or hmmlearn's concatenated ``(N, D)`` with
    ``lengths`` summing to N (see :mod:`torch_em.sequences`). ``sample_weight``: per sequence,
    ``(S,)`` or ``(*batch_shape, S)``.

    Shape:
        log_prob, score_samples: ``(*batch_shape, S)``; predict: ``(*batch_shape, S, T)`` (-1 at
        padding) or ``(*batch_shape, N)``; predict_proba: ``(*batch_shape, S, T, K)`` or
        ``(*batch_shape, N, K)``.
    """

    _initial_softening = INITIAL_SOFTENING
    _marginalises_missing = True

    def __init__(
        self,
        n_states: int,
        family: ComponentFamily,
        n_features: int | None = None,
        *,
        init_params: str = "kmeans",
        startprob_init: Any = None,
        transmat_init: Any = None,
        n_mix: int = 1,
        mix_weights_init: Any = None,
        **options: Any,
    ) -> None:
        check_family(family)
        check_int(n_states, "n_states", minimum=1)
        check_int(n_mix, "n_mix", minimum=1)
        names = {"start_logits": "log_startprob", "transition_logits": "log_transmat"}
        if n_mix > 1:
            names["mix_logits"] = "log_mix_weights"
        super().__init__(MarkovChain(n_mix), names, family, n_states * n_mix, n_features, init_params=init_params,
                         **options)
        self.n_states = int(n_states)
        self.n_mix = int(n_mix)
        self.startprob_init = startprob_init
        self.transmat_init = transmat_init
        self.mix_weights_init = mix_weights_init
        self._create_initial_parameters()

    def _config(self) -> dict[str, Any]:
        return {"n_states": self.n_states, "family": self.family, "startprob_init": self.startprob_init,
                "transmat_init": self.transmat_init, "n_mix": self.n_mix, "mix_weights_init": self.mix_weights_init,
                **super()._config(), "missing": self.missing}

    # --- basic properties -----------------------------------------------------------------
    @property
    def startprob(self) -> torch.Tensor:
        """Initial state probabilities ``(*batch_shape, K)``."""
        self._require_parameters()
        return self.start_logits.softmax(-1)

    @property
    def transmat(self) -> torch.Tensor:
        """Transition matrix ``(*batch_shape, K, K)``: row i is ``p(z_t = . | z_{t-1} = i)``."""
        self._require_parameters()
        return self.transition_logits.softmax(-1)

    @property
    def mix_weights(self) -> torch.Tensor:
        """Within-state mixture weights ``(*batch_shape, K, n_mix)`` (1 when ``n_mix`` is 1)."""
        self._require_parameters()
        if self.n_mix == 1:
            return self.start_logits.new_ones(*self.batch_shape, self.n_states, 1)
        return self.mix_logits.softmax(-1)

    def extra_repr(self) -> str:
        batch = f", batch_shape={tuple(self.batch_shape)}" if self.batch_shape else ""
        mix = f", n_mix={self.n_mix}" if self.n_mix > 1 else ""
        return f"n_states={self.n_states}{mix}, n_features={self.n_features}{batch}"

    # --- fitting ----------------------------------------------------------------------------
    @keeps_dtype_when_rejected
    @without_autocast
    @torch.no_grad()
    def fit(self, X: Any, lengths: Any = None, sample_weight: Any = None, *, mask: Any = None,
            verbose: bool = False, process_group: Any = None) -> "HMM":
        """Baum-Welch for every model of the batch (restarts as an extra batch dimension), or,
        with ``warm_start`` and existing parameters, EM continued from them.

        ``X``, ``lengths``/``mask`` and ``sample_weight`` (per sequence) as in the class doc.
        Raises ValueError before changing anything for malformed input. ``process_group``: the
        torch.distributed group whose ranks hold the other sequences (None: the default group
        when one is initialised; False: this rank's sequences alone).
        """
        with distributed.using(process_group, f"{type(self).__name__}.fit"), _workspace.reused_buffers():
            return self._fit(self._fit_data(X, lengths, mask, sample_weight), verbose, self.max_iter)

    @keeps_dtype_when_rejected
    @without_autocast
    @torch.no_grad()
    def initialize(self, X: Any, lengths: Any = None, sample_weight: Any = None, *, mask: Any = None,
                   process_group: Any = None) -> "HMM":
        """The initial parameters of :meth:`fit` without EM (``n_iter_`` 0, ``lower_bound_`` -inf)."""
        with distributed.using(process_group, f"{type(self).__name__}.initialize"):
            return self._initialize(self._fit_data(X, lengths, mask, sample_weight))

    @keeps_dtype_when_rejected
    @without_autocast
    @torch.no_grad()
    def partial_fit(self, X: Any, lengths: Any = None, sample_weight: Any = None, *, mask: Any = None,
                    process_group: Any = None) -> "HMM":
        """One stepwise (online) EM update from a batch of sequences: the running statistics
        (emission sums, expected start and transition counts, per time step) move towards the
        batch's by ``rho_t``, and the parameters are their M-step (see
        :meth:`torch_em.Mixture.partial_fit` for the step sizes, averaging and failures)."""
        started = self.stream_steps is not None
        sequences = self._sequences(X, lengths, mask, min_points=1 if started else self.n_components)
        weights = self._row_weights(sequences, sample_weight)

        def data(reference: torch.Tensor | None, chunk: int) -> SequenceData:
            return SequenceData(self.family, sequences.rows, sequences.lengths, sequences.n_steps, reference,
                                self._hmm_chunk_size(sequences.rows.shape[-1], pattern_share(sequences.rows)),
                                weights=weights)

        with distributed.using(process_group, f"{type(self).__name__}.partial_fit"):
            return self._partial_fit(sequences.rows, data)

    def _fit_data(self, X: Any, lengths: Any, mask: Any, sample_weight: Any) -> SequenceData | em.StreamData:
        """The engine's data of ``fit``'s arguments: sequences in memory, or a batch source
        whose batches are padded sequences ``X`` or ``(X, lengths, ...)``."""
        source = batch_source(X)
        if source is None:
            return self._data(X, lengths, mask, sample_weight)
        if lengths is not None or mask is not None or sample_weight is not None:
            raise ValueError("with a batch source X, every batch carries its own lengths: a batch is X or "
                             "(X, lengths, ...); lengths, mask and sample_weight must be None")
        return self._stream(source)

    def _stream(self, source: BatchSource) -> em.StreamData:
        """First pass over a source of batches of sequences: validated, counted, the reference
        point of their steps and a uniform sample of steps for initialisation."""
        sample = StreamSample(self._sample_size(), self._generator())
        n_points, n_rows, total, n_observed, n_features, missing = 0, 0, None, None, self.n_features, False
        for raw in source():
            sequences, _ = self._batch(raw, n_features)
            n_features = sequences.rows.shape[-1]
            n_rows += sequences.rows.shape[-2]
            steps = sequences.valid_rows()
            n_points += steps.shape[-2]
            missing = missing or bool(torch.isnan(steps).any())
            if self.family.uses_reference:  # sums and counts of the observed entries
                seen = ~torch.isnan(steps)
                batch_sum = torch.where(seen, steps, 0.0).sum(-2, keepdim=True)
                batch_count = seen.sum(-2, keepdim=True)
                total = batch_sum if total is None else total + batch_sum
                n_observed = batch_count if n_observed is None else n_observed + batch_count
            sample.add(steps)
        if n_points == 0:
            raise ValueError("X (the batch source) yielded no batch")
        # (total and n_observed are set together; a batch was seen: its number of features, its steps in the sample)
        mean = None if total is None or n_observed is None else torch.where(
            n_observed > 0, total / n_observed.clamp_min(1), 0.0)
        reference = distributed.combined_reference(mean, n_points)
        seen_features = cast(int, n_features)
        chunk = self._hmm_chunk_size(seen_features, 1.0 if missing else 0.0)  # at worst, every step its own pattern
        n_total = distributed.total_points(n_points, self.device)
        if n_total < self.n_components:
            raise ValueError(f"X must have at least {self.n_components} time step(s) in all (one per component), "
                             f"got {n_total} in all batches")

        def batches():
            for raw in source():
                sequences, weights = self._batch(raw, n_features)
                yield sequences.rows, weights, sequences.lengths

        points = cast(torch.Tensor, sample.points)
        if missing:  # initialisation works on the sample with missing entries at the coordinates' means
            points = mean_imputed(points, observed_means(points) if reference is None else reference)
        sample_data = em.Data(self.family, points, reference, self._hmm_chunk_size(seen_features))
        return em.StreamData(self.family, batches, reference, distributed.total_weight(float(n_points), self.device),
                             chunk, sample_data, n_local=n_rows, name="X (the batch source)")

    def _batch(self, raw: Any, n_features: int | None) -> tuple[Sequences, torch.Tensor | None]:
        """One batch of a source: ``X`` or ``(X, lengths, ...)``, validated, with its row weights."""
        X, lengths = (raw[0], raw[1]) if isinstance(raw, (tuple, list)) and len(raw) >= 2 else (raw, None)
        sequences = self._sequences(X, lengths, None, n_features=n_features)
        return sequences, self._row_weights(sequences, None)

    def _data(self, X: Any, lengths: Any, mask: Any, sample_weight: Any) -> SequenceData:
        """The engine's data of ``fit``'s arguments, with the reference point of the valid steps
        and a uniform sample of steps for initialisation when the data are large. With missing
        entries the reference is the mean of the observed ones, and initialisation works on the
        steps with every missing entry at its coordinate's mean."""
        sequences = self._sequences(X, lengths, mask, min_points=self.n_components)
        weights = self._row_weights(sequences, sample_weight)
        rows = sequences.rows
        valid = sequences.valid.flatten()
        steps = rows[..., valid, :]
        share = pattern_share(steps)
        complete = mean_imputed(steps) if share else steps
        reference = distributed.combined_reference(self.family.reference(complete), steps.shape[-2])
        chunk = self._hmm_chunk_size(rows.shape[-1], share)
        data = SequenceData(self.family, rows, sequences.lengths, sequences.n_steps, reference, chunk, weights=weights)
        data.total_weight = distributed.total_weight(data.total_weight, rows.device)
        step_weights = None if weights is None else weights[..., valid]
        if steps.shape[-2] > self._sample_size() or not bool(valid.all()) or share:
            keep = torch.arange(steps.shape[-2], device=rows.device)
            if steps.shape[-2] > self._sample_size():
                generator = torch.Generator().manual_seed(resolve_seed(self.seed))
                keep = torch.randperm(steps.shape[-2], generator=generator)[: self._sample_size()].sort().values
                keep = keep.to(rows.device)
            data.sample = em.Data(self.family, complete[..., keep, :], reference, self._hmm_chunk_size(rows.shape[-1]),
                                  weights=None if step_weights is None else step_weights[..., keep])
        return data

    def _sequences(self, X: Any, lengths: Any, mask: Any, min_points: int = 1, n_features: int | None = None) -> Sequences:
        """Validated sequences in the model's dtype (a model without parameters that follows its
        data's dtype adopts X's). NaN at a valid step marks a missing entry with
        ``missing="marginalize"`` (a step may have nothing observed), else it is an error."""
        adopts = self._dtype_follows_data and not self.is_initialized
        dtype = data_dtype(X) if adopts else self.dtype
        X = as_float_tensor(X, "X", device=self.device, dtype=dtype, allow_bool=self.family.accepts_bool)
        sequences = as_sequences(X, lengths, mask, name="X", n_features=n_features or self.n_features,
                                 batch_shape=tuple(self.batch_shape), codes=self._takes_codes(), finite=False)
        if is_traced(X):  # no values to check (see torch_em._tracing.is_traced)
            return sequences
        steps = sequences.valid_rows()
        if check_missing_values(steps, "X", self.missing, self._marginalises_missing, allow_empty=True):
            self.family.check_missing("X")
            steps = with_observed_values(steps)  # the support is checked on the observed entries
        if sequences.n_points < min_points:
            raise ValueError(f"X must have at least {min_points} time step(s) in all (one per component), "
                             f"got {sequences.n_points}")
        self.family.check_domain(steps, "X")
        if adopts and dtype != self.dtype:
            self._anchor = self._anchor.to(dtype)
        return sequences

    def _takes_codes(self) -> bool:
        """Whether X may be categorical codes without their axis of size 1."""
        return isinstance(self.family, Categorical) and self.n_features in (None, 1)

    def _row_weights(self, sequences: Sequences, sample_weight: Any) -> torch.Tensor | None:
        """Per-row weights (S * T,) or (M, S * T): the sequence weights at valid steps, 0 at
        padding; None when every step counts once."""
        weights = None
        if sample_weight is not None:
            weights = check_sample_weight(sample_weight, "sample_weight", n_points=sequences.n_sequences,
                                          batch_shape=self.batch_shape, device=sequences.rows.device,
                                          dtype=sequences.rows.dtype)
            weights = self._layout.weights(weights)
        if weights is None and bool(sequences.valid.all()):
            return None
        return sequence_row_weights(sequences.lengths, sequences.n_steps, weights, sequences.rows.dtype)

    def _hmm_chunk_size(self, n_features: int, pattern_share: float = 0.0) -> int:
        """Rows per E-step chunk: ``chunk_size``, or HMM_CHUNK_ELEMENTS emission log-densities.
        Steps with missing entries in ``pattern_share`` distinct patterns per step also hold a
        few offsets per step and component and three matrices per pattern and component
        (:mod:`torch_em.missing`), in the same budget."""
        if self.chunk_size:
            return self.chunk_size
        per_row: float = self.n_models * self.n_components
        if pattern_share:
            per_row = per_row * (4 * n_features + 3 * n_features ** 2 * pattern_share)
        return max(1, HMM_CHUNK_ELEMENTS // max(1, int(per_row) + self.family.n_statistics(n_features)))

    # --- evaluation ---------------------------------------------------------------------------
    def _log_emission(self, sequences: Sequences) -> torch.Tensor:
        """``log p(x_{s,t} | state k)`` (M, S, T, K), differentiable (a state's mixture density
        with ``n_mix > 1``)."""
        lp = self._emission_log_joint(sequences.rows)[0]  # (M, K * C, S * T)
        M, S, T = self.n_models, sequences.n_sequences, sequences.n_steps
        if self.n_mix > 1:
            lp = lp.view(M, self.n_states, self.n_mix, S * T).logsumexp(2)
        return lp.view(M, self.n_states, S, T).permute(0, 2, 3, 1)

    def _chain(self) -> tuple[torch.Tensor, torch.Tensor]:
        """log start probabilities (M, K) and log transition matrix (M, K, K)."""
        latent = self._working_parameters().latent
        return latent["log_startprob"][0], latent["log_transmat"][0]

    def _evaluated(self, X: Any, lengths: Any, mask: Any) -> tuple[Sequences, torch.Tensor]:
        self._require_parameters()
        sequences = self._sequences(X, lengths, mask)
        return sequences, self._log_emission(sequences)

    def log_prob(self, X: Any, lengths: Any = None, *, mask: Any = None) -> torch.Tensor:
        """Log-likelihood of every sequence ``(*batch_shape, S)``; differentiable and pure (the
        density of the parameters held, also for models in ``failed_``)."""
        sequences, log_emission = self._evaluated(X, lengths, mask)
        log_start, log_trans = self._chain()
        values = log_likelihood(log_emission, log_start, log_trans, sequences.lengths)  # (M, S)
        return values.reshape(*self.batch_shape, sequences.n_sequences)

    def forward(self, X: Any, lengths: Any = None, *, mask: Any = None) -> torch.Tensor:
        """Same as :meth:`log_prob`."""
        return self.log_prob(X, lengths, mask=mask)

    @torch.no_grad()
    def score_samples(self, X: Any, lengths: Any = None, *, mask: Any = None) -> torch.Tensor:
        """Log-likelihood per sequence ``(*batch_shape, S)`` (no graph); NaN for models in ``failed_``."""
        return self._reported(self.log_prob(X, lengths, mask=mask), "score_samples")

    @torch.no_grad()
    def score(self, X: Any, lengths: Any = None, *, mask: Any = None) -> torch.Tensor:
        """Total log-likelihood of all sequences of X ``(*batch_shape)`` (hmmlearn's meaning)."""
        return self._reported(self.log_prob(X, lengths, mask=mask).sum(-1), "score")

    @torch.no_grad()
    def predict_proba(self, X: Any, lengths: Any = None, *, mask: Any = None) -> torch.Tensor:
        """State posteriors ``(*batch_shape, S, T, K)`` (0 at padding) or ``(*batch_shape, N, K)``
        for concatenated X; NaN for models in ``failed_``."""
        sequences, log_emission = self._evaluated(X, lengths, mask)
        log_start, log_trans = self._chain()
        result = forward_backward(log_emission, log_start, log_trans, sequences.lengths)
        self._finite(result.log_evidence.reshape(*self.batch_shape, -1), "predict_proba")
        posteriors = result.posteriors.reshape(*self.batch_shape, *result.posteriors.shape[1:])
        return self._without_failed(sequences.per_step(posteriors, n_trailing=1), math.nan)

    @torch.no_grad()
    def predict(self, X: Any, lengths: Any = None, *, mask: Any = None) -> torch.Tensor:
        """Most probable state sequences (Viterbi) ``(*batch_shape, S, T)`` (-1 at padding) or
        ``(*batch_shape, N)`` for concatenated X; -1 for models in ``failed_``."""
        sequences, log_emission = self._evaluated(X, lengths, mask)
        log_start, log_trans = self._chain()
        states, best = viterbi(log_emission, log_start, log_trans, sequences.lengths)
        self._finite(best.reshape(*self.batch_shape, -1), "predict")
        states = states.reshape(*self.batch_shape, *states.shape[1:])
        return self._without_failed(sequences.per_step(states), -1)

    def decode(self, X: Any, lengths: Any = None, *, mask: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """hmmlearn's ``decode``: the log-probability of the best path per sequence
        ``(*batch_shape, S)`` and the states as :meth:`predict` returns them."""
        with torch.no_grad():
            sequences, log_emission = self._evaluated(X, lengths, mask)
            log_start, log_trans = self._chain()
            states, best = viterbi(log_emission, log_start, log_trans, sequences.lengths)
        best = self._reported(best.reshape(*self.batch_shape, -1), "decode")
        return best, self._without_failed(sequences.per_step(states.reshape(*self.batch_shape, *states.shape[1:])), -1)

    @torch.no_grad()
    def bic(self, X: Any, lengths: Any = None, *, mask: Any = None) -> torch.Tensor:
        """Bayesian information criterion per model ``(*batch_shape)`` over all time steps of X."""
        sequences = self._sequences(X, lengths, mask)
        total = self.log_prob(X, lengths, mask=mask).sum(-1)
        return self._reported(-2 * total + self.n_parameters() * math.log(sequences.n_points), "bic")

    @torch.no_grad()
    def aic(self, X: Any, lengths: Any = None, *, mask: Any = None) -> torch.Tensor:
        """Akaike information criterion per model ``(*batch_shape)``."""
        return self._reported(-2 * self.log_prob(X, lengths, mask=mask).sum(-1) + 2 * self.n_parameters(), "aic")

    @torch.no_grad()
    def sample(self, n_sequences: int = 1, length: int = 100, seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``n_sequences`` sequences of ``length`` steps per model: observations
        ``(*batch_shape, n, length, D)`` and their states ``(*batch_shape, n, length)``."""
        self._require_parameters()
        check_int(n_sequences, "n_sequences", minimum=1)
        check_int(length, "length", minimum=1)
        generator = self._draw_generator(seed)
        log_start, log_trans = self._chain()
        states = sample_states(log_start, log_trans, n_sequences, length, generator)  # (M, n, T)
        M = self.n_models
        components = states
        if self.n_mix > 1:  # the mixture component of each step within its state
            weights = self.mix_weights.reshape(M, self.n_states, self.n_mix)
            rows = weights.gather(1, states.reshape(M, -1, 1).expand(M, n_sequences * length, self.n_mix))
            within = torch.multinomial(rows.reshape(-1, self.n_mix), 1, generator=generator).view(M, n_sequences, length)
            components = states * self.n_mix + within
        theta = {name: self._layout.working(value)[0] for name, value in self.theta().items()}
        samples = self.family.sample(theta, components.reshape(M, -1), generator)
        return (samples.reshape(*self.batch_shape, n_sequences, length, -1),
                states.reshape(*self.batch_shape, n_sequences, length))

    # --- internals ---------------------------------------------------------------------------
    def _user_latent_initial(self) -> Theta:
        """``startprob_init``, ``transmat_init`` and ``mix_weights_init`` validated, as logits."""
        given = {"start_logits": ("startprob_init", self.startprob_init, (self.n_states,)),
                 "transition_logits": ("transmat_init", self.transmat_init, (self.n_states, self.n_states))}
        if self.n_mix > 1:
            given["mix_logits"] = ("mix_weights_init", self.mix_weights_init, (self.n_states, self.n_mix))
        logits = {}
        for module_name, (name, value, event) in given.items():
            if value is not None:
                logits[module_name] = self._probabilities_logits(value, name, event)
        return logits
