"""The hidden-Markov inference core against brute-force enumeration and against itself.

Brute force enumerates all K^T state paths of tiny problems in float64: the log-evidence is the
logsumexp of the path log-probabilities, the posteriors and expected counts their probability-weighted
indicator sums, the Viterbi path their argmax.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from torch_em import markov_inference as mi

METHODS = ["sequential", "blocked"]
DTYPE = torch.float64


def random_problem(G, S, T, K, seed=0, dtype=DTYPE, scale=2.0):
    generator = torch.Generator().manual_seed(seed)
    log_emission = (torch.randn(G, S, T, K, generator=generator, dtype=torch.float64) * scale).to(dtype)
    log_startprob = torch.log_softmax(torch.randn(G, K, generator=generator, dtype=torch.float64), -1).to(dtype)
    log_transmat = torch.log_softmax(torch.randn(G, K, K, generator=generator, dtype=torch.float64), -1).to(dtype)
    return log_emission, log_startprob, log_transmat


def poison_padding(log_emission, lengths):
    """NaN at every padded step: they must never reach a result."""
    poisoned = log_emission.clone()
    T = log_emission.shape[2]
    padded = torch.arange(T) >= lengths.expand(log_emission.shape[:2]).unsqueeze(-1)  # (G, S, T)
    poisoned[padded] = math.nan
    return poisoned


def brute_force(log_emission, log_startprob, log_transmat, lengths, weights):
    """Every quantity by enumerating all paths of every sequence (float64)."""
    G, S, T, K = log_emission.shape
    lengths = lengths.expand(G, S)
    weights = weights.expand(G, S)
    log_evidence = torch.zeros(G, S, dtype=DTYPE)
    posteriors = torch.zeros(G, S, T, K, dtype=DTYPE)
    start = torch.zeros(G, K, dtype=DTYPE)
    transitions = torch.zeros(G, K, K, dtype=DTYPE)
    best_path = torch.full((G, S, T), -1, dtype=torch.int64)
    best_score = torch.zeros(G, S, dtype=DTYPE)
    for g in range(G):
        for s in range(S):
            n = int(lengths[g, s])
            paths = list(itertools.product(range(K), repeat=n))
            scores = []
            for path in paths:
                score = log_startprob[g, path[0]] + log_emission[g, s, 0, path[0]]
                for t in range(1, n):
                    score = score + log_transmat[g, path[t - 1], path[t]] + log_emission[g, s, t, path[t]]
                scores.append(score)
            scores = torch.stack(scores)
            log_evidence[g, s] = torch.logsumexp(scores, 0)
            probabilities = (scores - log_evidence[g, s]).exp()
            best = int(scores.argmax())
            best_score[g, s] = scores[best]
            best_path[g, s, :n] = torch.tensor(paths[best])
            for path, p in zip(paths, probabilities):
                for t in range(n):
                    posteriors[g, s, t, path[t]] += p
                start[g, path[0]] += weights[g, s] * p
                for t in range(1, n):
                    transitions[g, path[t - 1], path[t]] += weights[g, s] * p
    return log_evidence, posteriors, start, transitions, best_path, best_score


def assert_close(actual, expected, atol=1e-10, rtol=1e-10):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("lengths_shape", ["per_sequence", "per_group"])
def test_against_brute_force(method, lengths_shape):
    G, S, T, K = 2, 4, 6, 3
    log_emission, log_startprob, log_transmat = random_problem(G, S, T, K, seed=1)
    if lengths_shape == "per_sequence":
        lengths = torch.tensor([6, 1, 3, 5])
        weights = torch.tensor([1.0, 0.5, 2.0, 0.25], dtype=DTYPE)
    else:
        lengths = torch.tensor([[6, 1, 3, 5], [2, 6, 1, 4]])
        weights = torch.tensor([[1.0, 0.5, 2.0, 0.25], [3.0, 1.0, 0.1, 1.5]], dtype=DTYPE)
    expected = brute_force(log_emission, log_startprob, log_transmat, lengths, weights)
    poisoned = poison_padding(log_emission, lengths)

    result = mi.forward_backward(poisoned, log_startprob, log_transmat, lengths, weights, method=method)
    assert_close(result.log_evidence, expected[0])
    assert_close(result.posteriors, expected[1])
    assert_close(result.start, expected[2])
    assert_close(result.transitions, expected[3])
    assert_close(mi.log_likelihood(poisoned, log_startprob, log_transmat, lengths, method=method), expected[0])

    states, log_prob = mi.viterbi(poisoned, log_startprob, log_transmat, lengths, method=method)
    assert torch.equal(states, expected[4])
    assert_close(log_prob, expected[5])


@pytest.mark.parametrize("method", METHODS)
def test_full_length_and_no_weights_against_brute_force(method):
    log_emission, log_startprob, log_transmat = random_problem(3, 2, 5, 2, seed=2)
    full = torch.full((2,), 5)
    expected = brute_force(log_emission, log_startprob, log_transmat, full, torch.ones(2, dtype=DTYPE))
    result = mi.forward_backward(log_emission, log_startprob, log_transmat, method=method)
    assert_close(result.log_evidence, expected[0])
    assert_close(result.posteriors, expected[1])
    assert_close(result.start, expected[2])
    assert_close(result.transitions, expected[3])
    states, log_prob = mi.viterbi(log_emission, log_startprob, log_transmat, method=method)
    assert torch.equal(states, expected[4])
    assert_close(log_prob, expected[5])


@pytest.mark.parametrize("method", METHODS)
def test_left_to_right_chain_with_structural_zeros(method):
    G, S, T, K = 1, 3, 6, 3
    log_emission, _, _ = random_problem(G, S, T, K, seed=3)
    transmat = torch.tensor([[0.6, 0.4, 0.0], [0.0, 0.7, 0.3], [0.0, 0.0, 1.0]], dtype=DTYPE)
    log_transmat = transmat.log().unsqueeze(0)
    log_startprob = torch.tensor([[0.0, -math.inf, -math.inf]], dtype=DTYPE)
    lengths = torch.tensor([6, 2, 4])
    weights = torch.ones(S, dtype=DTYPE)
    expected = brute_force(log_emission, log_startprob, log_transmat, lengths, weights)
    result = mi.forward_backward(log_emission, log_startprob, log_transmat, lengths, method=method)
    for value in result:
        assert torch.isfinite(value).all()
    assert_close(result.log_evidence, expected[0])
    assert_close(result.posteriors, expected[1])
    assert_close(result.transitions, expected[3])
    assert (result.transitions[0][transmat == 0] == 0).all()
    assert (result.posteriors[0, :, 0, 1:] == 0).all()  # the chain starts in state 0
    states, log_prob = mi.viterbi(log_emission, log_startprob, log_transmat, lengths, method=method)
    assert torch.equal(states, expected[4])
    assert_close(log_prob, expected[5])


@pytest.mark.parametrize("T", [1, 2, 3, 10, 17, 50, 101])
def test_blocked_equals_sequential(T):
    G, S, K = 2, 5, 4
    log_emission, log_startprob, log_transmat = random_problem(G, S, T, K, seed=T)
    lengths = torch.tensor([T, 1, max(1, T // 2), max(1, T - 1), max(1, T // 3)])
    weights = torch.rand(G, S, generator=torch.Generator().manual_seed(T), dtype=DTYPE)
    sequential = mi.forward_backward(log_emission, log_startprob, log_transmat, lengths, weights, method="sequential")
    blocked = mi.forward_backward(log_emission, log_startprob, log_transmat, lengths, weights, method="blocked")
    for a, b in zip(blocked, sequential):
        assert_close(a, b)
    seq_states, seq_score = mi.viterbi(log_emission, log_startprob, log_transmat, lengths, method="sequential")
    blk_states, blk_score = mi.viterbi(log_emission, log_startprob, log_transmat, lengths, method="blocked")
    assert torch.equal(blk_states, seq_states)
    assert_close(blk_score, seq_score)


@pytest.mark.parametrize("L", [1, 2, 3, 7, 22])
@pytest.mark.parametrize("ragged", [False, True])
def test_blocked_equals_sequential_for_every_block_length(monkeypatch, L, ragged):
    """B = 22, 11, 8, 4, 1 blocks (even, odd, one): the scan over the blocks and a last block
    padded beyond T (L = 3, 7) give the sequential results."""
    G, S, T, K = 2, 3, 23, 4
    log_emission, log_startprob, log_transmat = random_problem(G, S, T, K, seed=L)
    lengths = torch.tensor([T, 9, 2]) if ragged else None
    monkeypatch.setattr(mi, "_forward_backward_block_length", lambda *shape: L)
    sequential = mi.forward_backward(log_emission, log_startprob, log_transmat, lengths, method="sequential")
    blocked = mi.forward_backward(log_emission, log_startprob, log_transmat, lengths, method="blocked")
    for a, b in zip(blocked, sequential):
        assert_close(a, b)


@pytest.mark.parametrize("L", [1, 2, 4])
def test_left_to_right_chain_for_every_block_length(monkeypatch, L):
    """A chain forced into its absorbing last state while later data favour the first states by
    400 nats a step: in the later blocks' products that row is ~1e-350 (and below) of the others,
    and the whole log-evidence rests on it."""
    K, T = 3, 7
    log_emission = torch.zeros(1, 2, T, K, dtype=DTYPE)
    log_emission[:, :, 0] = torch.tensor([0.0, -1e4, -1e4])  # state 0, then 1, then 2
    log_emission[:, :, 1] = torch.tensor([-1e4, 0.0, -1e4])
    log_emission[:, :, 2] = torch.tensor([-1e4, -1e4, 0.0])
    log_emission[:, :, 3:, 2] = -400.0
    log_emission[:, 1] += torch.randn(T, K, generator=torch.Generator().manual_seed(L), dtype=DTYPE)
    log_transmat = torch.tensor([[0.6, 0.4, 0.0], [0.0, 0.7, 0.3], [0.0, 0.0, 1.0]], dtype=DTYPE).log().unsqueeze(0)
    log_startprob = torch.tensor([[0.0, -math.inf, -math.inf]], dtype=DTYPE)
    lengths = torch.tensor([7, 6])
    expected = brute_force(log_emission, log_startprob, log_transmat, lengths, torch.ones(2, dtype=DTYPE))
    assert expected[0].max() < -1000  # the evidence rests on the stuck chain
    monkeypatch.setattr(mi, "_forward_backward_block_length", lambda *shape: L)
    alone = mi.log_likelihood(log_emission[:, :1], log_startprob, log_transmat, method="blocked")  # no mask
    assert_close(alone, expected[0][:, :1])
    assert_close(mi.log_likelihood(log_emission, log_startprob, log_transmat, lengths, method="blocked"), expected[0])


@pytest.mark.parametrize("dtype, penalty", [(torch.float64, 400.0), (torch.float32, 40.0)])
@pytest.mark.parametrize("method", METHODS)
def test_posteriors_of_a_chain_stuck_where_the_data_disagree(method, dtype, penalty):
    """The chain sits in an absorbing state whose emissions are ``penalty`` nats a step worse than
    the other states' (1,600 / 160 nats in all, beyond the dtype's range): its backward value is
    that far below theirs, and all the posterior mass is on it."""
    K, T = 3, 5
    log_emission = torch.zeros(1, 1, T, K, dtype=DTYPE)
    log_emission[0, 0, 0] = torch.tensor([-1e4, -1e4, 0.0])  # starts (and stays) in the absorbing state
    log_emission[0, 0, 1:, 2] = -penalty
    log_transmat = torch.tensor([[0.6, 0.4, 0.0], [0.3, 0.7, 0.0], [0.0, 0.0, 1.0]], dtype=DTYPE).log().unsqueeze(0)
    log_startprob = torch.full((1, K), -math.log(K), dtype=DTYPE)
    expected = brute_force(log_emission, log_startprob, log_transmat, torch.tensor([T]), torch.ones(1, dtype=DTYPE))
    result = mi.forward_backward(log_emission.to(dtype), log_startprob.to(dtype), log_transmat.to(dtype), method=method)
    tolerance = 1e-10 if dtype == torch.float64 else 1e-5
    assert_close(result.posteriors.double(), expected[1], atol=tolerance, rtol=tolerance)
    assert_close(result.transitions.double(), expected[3], atol=tolerance, rtol=tolerance)
    assert_close(result.log_evidence.double(), expected[0], atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("T", [12, 37, 64])
def test_blocked_equals_sequential_without_lengths(T):
    log_emission, log_startprob, log_transmat = random_problem(3, 2, T, 3, seed=10 + T)
    sequential = mi.forward_backward(log_emission, log_startprob, log_transmat, method="sequential")
    blocked = mi.forward_backward(log_emission, log_startprob, log_transmat, method="blocked")
    for a, b in zip(blocked, sequential):
        assert_close(a, b)


def test_padded_batch_equals_each_sequence_alone():
    G, S, T, K = 2, 4, 9, 3
    log_emission, log_startprob, log_transmat = random_problem(G, S, T, K, seed=4)
    lengths = torch.tensor([[9, 3, 1, 6], [5, 9, 2, 7]])
    poisoned = poison_padding(log_emission, lengths)
    for method in METHODS:
        batch = mi.forward_backward(poisoned, log_startprob, log_transmat, lengths, method=method)
        states, score = mi.viterbi(poisoned, log_startprob, log_transmat, lengths, method=method)
        for g in range(G):
            for s in range(S):
                n = int(lengths[g, s])
                alone = mi.forward_backward(
                    log_emission[g : g + 1, s : s + 1, :n], log_startprob[g : g + 1], log_transmat[g : g + 1],
                    method=method,
                )
                assert_close(batch.log_evidence[g, s], alone.log_evidence[0, 0])
                assert_close(batch.posteriors[g, s, :n], alone.posteriors[0, 0])
                assert (batch.posteriors[g, s, n:] == 0).all()
                alone_states, alone_score = mi.viterbi(
                    log_emission[g : g + 1, s : s + 1, :n], log_startprob[g : g + 1], log_transmat[g : g + 1],
                    method=method,
                )
                assert torch.equal(states[g, s, :n], alone_states[0, 0])
                assert (states[g, s, n:] == -1).all()
                assert_close(score[g, s], alone_score[0, 0])


def gaussian_like_problem(T, K, D=4, seed=0):
    """Emission log-densities of unit-variance Gaussians in D dimensions, float64 (1, 1, T, K)."""
    generator = torch.Generator().manual_seed(seed)
    means = torch.randn(K, D, generator=generator, dtype=torch.float64) * 1.5
    states = torch.randint(K, (T,), generator=generator)
    x = means[states] + torch.randn(T, D, generator=generator, dtype=torch.float64)
    log_emission = -0.5 * ((x[:, None, :] - means) ** 2).sum(-1) - 0.5 * D * math.log(2 * math.pi)
    log_transmat = torch.log_softmax(torch.randn(K, K, generator=generator, dtype=torch.float64) + 2 * torch.eye(K), -1)
    log_startprob = torch.full((K,), -math.log(K), dtype=torch.float64)
    return log_emission[None, None], log_startprob[None], log_transmat[None]


@pytest.fixture(scope="module")
def long_problem():
    """T = 100,000, K = 8 and its float64 forward-backward by the plain recursion."""
    log_emission, log_startprob, log_transmat = gaussian_like_problem(100_000, 8)
    reference = mi.forward_backward(log_emission, log_startprob, log_transmat, method="sequential")
    return log_emission, log_startprob, log_transmat, reference


@pytest.mark.parametrize("method", METHODS)
def test_float32_long_sequence_matches_float64(method, long_problem):
    log_emission, log_startprob, log_transmat, reference = long_problem
    single = mi.forward_backward(log_emission.float(), log_startprob.float(), log_transmat.float(), method=method)
    assert single.log_evidence.dtype == torch.float32
    relative = ((single.log_evidence.double() - reference.log_evidence) / reference.log_evidence.abs()).abs().item()
    assert relative <= 1e-6
    assert torch.isfinite(single.posteriors).all()
    assert (single.posteriors.double() - reference.posteriors).abs().max().item() <= 1e-3
    transition_error = (single.transitions.double() - reference.transitions).abs() / reference.transitions.clamp_min(1)
    assert transition_error.max() <= 1e-3


@pytest.mark.parametrize("method", METHODS)
def test_gradient_of_log_likelihood_is_the_posteriors_and_counts(method):
    G, S, T, K = 2, 3, 7, 3
    log_emission, log_startprob, log_transmat = random_problem(G, S, T, K, seed=5)
    lengths = torch.tensor([7, 2, 5])
    upstream = torch.tensor([[1.0, -0.5, 2.0], [0.3, 1.0, 0.0]], dtype=DTYPE)
    inputs = [x.clone().requires_grad_() for x in (log_emission, log_startprob, log_transmat)]
    log_z = mi.log_likelihood(*inputs, lengths, method=method)
    (log_z * upstream).sum().backward()
    fb = mi.forward_backward(log_emission, log_startprob, log_transmat, lengths, upstream, method=method)
    assert_close(inputs[0].grad, fb.posteriors * upstream[:, :, None, None])
    assert_close(inputs[1].grad, fb.start)
    assert_close(inputs[2].grad, fb.transitions)
    padded = torch.arange(T) >= lengths[:, None]
    assert (inputs[0].grad[:, padded] == 0).all()


@pytest.mark.parametrize("method", METHODS)
def test_gradcheck(method):
    log_emission, _, _ = random_problem(2, 2, 4, 2, seed=6)
    # unnormalised parameters on purpose: the gradients are exact for any inputs
    generator = torch.Generator().manual_seed(7)
    log_startprob = torch.randn(2, 2, generator=generator, dtype=DTYPE)
    log_transmat = torch.randn(2, 2, 2, generator=generator, dtype=DTYPE)
    lengths = torch.tensor([4, 3])
    inputs = tuple(x.clone().requires_grad_() for x in (log_emission, log_startprob, log_transmat))
    assert torch.autograd.gradcheck(lambda e, p, a: mi.log_likelihood(e, p, a, lengths, method=method), inputs)


def test_log_likelihood_without_grad_equals_forward_backward():
    log_emission, log_startprob, log_transmat = random_problem(2, 3, 20, 3, seed=8)
    lengths = torch.tensor([20, 11, 1])
    for method in METHODS + ["auto"]:
        with torch.no_grad():
            log_z = mi.log_likelihood(log_emission, log_startprob, log_transmat, lengths, method=method)
        fb = mi.forward_backward(log_emission, log_startprob, log_transmat, lengths, method=method)
        assert_close(log_z, fb.log_evidence)


def test_float32_inputs_keep_their_dtype():
    log_emission, log_startprob, log_transmat = random_problem(1, 2, 30, 3, seed=9, dtype=torch.float32)
    for method in METHODS:
        fb = mi.forward_backward(log_emission, log_startprob, log_transmat, method=method)
        assert all(x.dtype == torch.float32 for x in fb)
        states, log_prob = mi.viterbi(log_emission, log_startprob, log_transmat, method=method)
        assert states.dtype == torch.int64 and log_prob.dtype == torch.float32


def test_auto_picks_blocked_for_one_long_sequence_and_sequential_for_many_short():
    assert mi._resolve_method("auto", 1, 1, 100_000, 8) == "blocked"
    assert mi._resolve_method("auto", 1, 10_000, 50, 4) == "sequential"
    assert mi._resolve_method("sequential", 1, 1, 100_000, 8) == "sequential"
    assert mi._resolve_method("auto", 1, 1, 100_000, 8, mi.VITERBI_PRODUCT_FACTOR) == "blocked"


def test_sample_states_transition_frequencies_match_transmat():
    transmat = torch.tensor(
        [[[0.7, 0.2, 0.1], [0.0, 0.5, 0.5], [0.3, 0.0, 0.7]], [[0.1, 0.8, 0.1], [0.25, 0.25, 0.5], [0.6, 0.3, 0.1]]],
        dtype=DTYPE,
    )
    startprob = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]], dtype=DTYPE)
    generator = torch.Generator().manual_seed(0)
    states = mi.sample_states(startprob.log(), transmat.log(), 400, 60, generator)
    assert states.shape == (2, 400, 60) and states.dtype == torch.int64
    G, K = 2, 3
    # transition counts from every state, per group
    previous, following = states[:, :, :-1], states[:, :, 1:]
    counts = torch.zeros(G, K, K, dtype=DTYPE)
    for g in range(G):
        pairs = (previous[g].reshape(-1), following[g].reshape(-1))
        counts[g].index_put_(pairs, torch.ones(previous[g].numel(), dtype=DTYPE), accumulate=True)
    visits = counts.sum(-1, keepdim=True)
    frequencies = counts / visits
    standard_error = (transmat * (1 - transmat) / visits).sqrt()
    assert ((frequencies - transmat).abs() <= 5 * standard_error + 1e-12).all()
    assert (counts[transmat == 0] == 0).all()  # structural zeros are never drawn
    first = torch.stack([torch.bincount(states[g, :, 0], minlength=K) for g in range(G)]).to(DTYPE) / 400
    start_error = (startprob * (1 - startprob) / 400).sqrt()
    assert ((first - startprob).abs() <= 5 * start_error + 1e-12).all()
    again = mi.sample_states(startprob.log(), transmat.log(), 400, 60, torch.Generator().manual_seed(0))
    assert torch.equal(states, again)


def test_transition_counts_by_blocked_product_equal_the_plain_product(monkeypatch):
    """Over more than BLOCKED_MIN_POINTS steps and sequences with 16 states (float64, CPU) the
    expected transitions are summed block by block; they equal the one-GEMM sum."""
    from torch_em import _products

    G, S, T, K = 1, 40, 1700, _products.BLOCKED_MIN_FEATURES
    assert S * (T - 1) >= _products.BLOCKED_MIN_POINTS
    log_emission, log_startprob, log_transmat = random_problem(G, S, T, K, seed=7)
    calls = []
    blocked = mi.blocked_product
    monkeypatch.setattr(mi, "blocked_product", lambda A, B: calls.append(1) or blocked(A, B))
    result = mi.forward_backward(log_emission, log_startprob, log_transmat, method="sequential")
    assert calls == [1]
    monkeypatch.setattr(mi, "uses_blocks", lambda B: False)
    plain = mi.forward_backward(log_emission, log_startprob, log_transmat, method="sequential")
    assert calls == [1]
    assert_close(result.transitions, plain.transitions, atol=1e-9, rtol=1e-12)
    assert_close(result.transitions.sum(), torch.tensor(S * (T - 1), dtype=DTYPE))


@pytest.mark.parametrize("method", METHODS)
def test_reused_buffers_give_the_fresh_results_and_never_alias_them(method):
    """Within ``reused_buffers`` (as in a fit) a pass rewrites the previous pass's working
    buffers: its results equal those of fresh buffers, bit for bit, and the results of the
    earlier pass are untouched (nothing returned is one of those buffers)."""
    from torch_em import _workspace

    lengths = torch.tensor([9, 4, 1])
    first_problem = random_problem(2, 3, 9, 3, seed=11)
    second_problem = random_problem(2, 3, 9, 3, seed=12)
    fresh = [mi.forward_backward(*problem, lengths, method=method) for problem in (first_problem, second_problem)]
    with _workspace.reused_buffers():
        first = mi.forward_backward(*first_problem, lengths, method=method)
        kept = [x.clone() for x in first]
        second = mi.forward_backward(*second_problem, lengths, method=method)
        assert _workspace._local.buffers  # the scope holds the buffers
    assert _workspace._local.buffers is None  # and releases them at its end
    for result, reference in ((first, fresh[0]), (second, fresh[1])):
        assert all(torch.equal(a, b) for a, b in zip(result, reference))
    assert all(torch.equal(a, b) for a, b in zip(first, kept))


def test_reused_buffers_leave_the_gradient_path_alone():
    """autograd keeps the forward pass for backward: a pass in between must not overwrite it."""
    from torch_em import _workspace

    log_emission, log_startprob, log_transmat = random_problem(1, 2, 12, 3, seed=13)
    lengths = torch.tensor([12, 5])
    reference = mi.forward_backward(log_emission, log_startprob, log_transmat, lengths)
    with _workspace.reused_buffers():
        emission = log_emission.clone().requires_grad_()
        log_z = mi.log_likelihood(emission, log_startprob, log_transmat, lengths)
        mi.forward_backward(*random_problem(1, 2, 12, 3, seed=14), lengths)  # same shapes, other values
        log_z.sum().backward()
    assert_close(emission.grad, reference.posteriors)
