"""torch.distributed: two gloo processes, each with half the data, equal one process on all of it."""
from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import torch_em
from conftest import blobs

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend")

WORLD = 2
F64 = torch.float64


def start_values(X: torch.Tensor) -> dict:
    return dict(weights_init=np.full(3, 1 / 3), means_init=X[[0, 300, 600]].numpy(),
                precisions_init=np.broadcast_to(np.eye(3), (3, 3, 3)).copy())


def run(model: torch_em.GaussianMixture, data: torch.Tensor, mode: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch_em.ConvergenceWarning)
        if mode == "fit":
            model.fit(data)
        elif mode == "stream":
            model.fit(lambda: iter(data.split(64)))
        else:  # partial: the same number of batches on every rank
            for batch in data.chunk(5):
                model.partial_fit(batch)


def worker(rank: int, init_file: str, X: torch.Tensor, kwargs: dict, mode: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model = torch_em.GaussianMixture(3, **kwargs)
        run(model, X.chunk(WORLD)[rank], mode)
        torch.save(model.state_dict(), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def distributed_state(tmp_path: Path, X: torch.Tensor, kwargs: dict, mode: str) -> list[dict]:
    mp.spawn(worker, args=(str(tmp_path / "init"), X, kwargs, mode, str(tmp_path)), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def shuffled_blobs(seed: int) -> torch.Tensor:
    X = torch.as_tensor(blobs(300))
    return X[torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))]


def assert_every_rank_equals(states: list[dict], single: torch_em.GaussianMixture) -> None:
    for state in states:
        for key, value in single.state_dict().items():
            torch.testing.assert_close(state[key], value, rtol=1e-10, atol=1e-12, msg=key)


@pytest.mark.parametrize("mode", ["fit", "stream"])
def test_two_ranks_with_half_the_data_equal_one_process_with_all(tmp_path, mode):
    X = shuffled_blobs(seed=0)
    kwargs = dict(dtype=F64, tol=1e-9, max_iter=50, **start_values(X))
    states = distributed_state(tmp_path, X, kwargs, mode)
    single = torch_em.GaussianMixture(3, **kwargs)
    run(single, X, "fit")
    assert_every_rank_equals(states, single)


def test_partial_fit_across_ranks_equals_the_concatenated_batches(tmp_path):
    X = shuffled_blobs(seed=1)
    kwargs = dict(n_features=3, dtype=F64, **start_values(X))
    states = distributed_state(tmp_path, X, kwargs, "partial")
    single = torch_em.GaussianMixture(3, **kwargs)
    halves = X.chunk(WORLD)
    for pieces in zip(*(half.chunk(5) for half in halves)):  # step t sees every rank's t-th batch
        single.partial_fit(torch.cat(pieces))
    assert_every_rank_equals(states, single)


def test_default_initialisation_is_shared_from_rank_zero(tmp_path):
    X = shuffled_blobs(seed=2)
    first, second = distributed_state(tmp_path, X, dict(dtype=F64, max_iter=5, tol=0.0), "fit")
    for key, value in first.items():
        assert torch.equal(second[key], value), key


@pytest.mark.parametrize("mode", ["fit", "partial"])
def test_map_em_on_two_ranks_equals_one_process(tmp_path, mode):
    X = shuffled_blobs(seed=3)
    prior = {"weights": torch_em.priors.Dirichlet(2.0),
             "components": torch_em.priors.NormalInverseWishart(shrinkage=0.5, mean=torch.zeros(3, dtype=F64),
                                                                degrees_of_freedom=6.0, scale=torch.eye(3, dtype=F64))}
    kwargs = dict(n_features=3, dtype=F64, tol=1e-9, max_iter=50, prior=prior, **start_values(X))
    states = distributed_state(tmp_path, X, kwargs, mode)
    single = torch_em.GaussianMixture(3, **kwargs)
    if mode == "fit":
        run(single, X, "fit")
    else:
        for pieces in zip(*(half.chunk(5) for half in X.chunk(WORLD))):
            single.partial_fit(torch.cat(pieces))
    assert_every_rank_equals(states, single)


def test_default_prior_is_the_same_on_every_rank(tmp_path):
    X = shuffled_blobs(seed=4)
    first, second = distributed_state(tmp_path, X, dict(dtype=F64, max_iter=5, tol=0.0, prior="default"), "fit")
    for key, value in first.items():
        assert torch.equal(second[key], value), key


def hmm_worker(rank: int, init_file: str, X: torch.Tensor, lengths: torch.Tensor, kwargs: dict, mode: str,
               out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model = torch_em.GaussianHMM(3, "full", **kwargs)
        mine, my_lengths = X.chunk(WORLD)[rank], lengths.chunk(WORLD)[rank]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch_em.ConvergenceWarning)
            if mode == "fit":
                model.fit(mine, my_lengths)
            else:  # a batch source of (sequences, lengths)
                model.fit(lambda: iter(zip(mine.split(3), my_lengths.split(3))))
        torch.save(model.state_dict(), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["fit", "stream"])
def test_hmm_on_two_ranks_with_half_the_sequences_equals_one_process(tmp_path, mode):
    rng = np.random.default_rng(0)
    means = np.array([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]])
    states = rng.integers(0, 3, (10, 1)).repeat(30, 1)  # one regime per sequence, switching halfway
    states[:, 15:] = (states[:, 15:] + 1) % 3
    X = torch.as_tensor(means[states] + rng.normal(0, 1, (10, 30, 2)))
    lengths = torch.as_tensor([30, 12, 30, 25, 30, 7, 30, 30, 18, 30])
    kwargs = dict(dtype=F64, tol=1e-9, max_iter=30, startprob_init=np.full(3, 1 / 3),
                  transmat_init=np.full((3, 3), 1 / 3), means_init=means + 0.5,
                  precisions_init=np.broadcast_to(np.eye(2), (3, 2, 2)).copy())
    mp.spawn(hmm_worker, args=(str(tmp_path / "init"), X, lengths, kwargs, mode, str(tmp_path)), nprocs=WORLD,
             join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    single = torch_em.GaussianHMM(3, "full", **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch_em.ConvergenceWarning)
        single.fit(X, lengths)
    assert_every_rank_equals(ranks, single)


def group_worker(rank: int, init_file: str, X: torch.Tensor, scenario: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        from torch_em import distributed as em_distributed

        em_distributed.PEER_TIMEOUT = 3.0
        model = torch_em.GaussianMixture(3, dtype=F64, tol=1e-9, max_iter=50, **start_values(X))
        mine = X.chunk(WORLD)[rank]
        outcome = "fitted"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch_em.ConvergenceWarning)
            if scenario == "local":
                model.fit(mine, process_group=False)
            elif scenario == "group":
                model.fit(mine, process_group=dist.new_group(ranks=list(range(WORLD))))
            elif scenario == "one rank calls":
                if rank == 0:
                    try:
                        model.fit(mine)
                    except em_distributed.RanksDisagreeError as error:
                        outcome = str(error)
        (Path(out_dir) / f"outcome{rank}.txt").write_text(outcome)
        torch.save(model.state_dict(), Path(out_dir) / f"rank{rank}.pt")
        if scenario == "one rank calls":
            # The collective rank 0 gave up on is still pending: a peer that exits before rank 0 is
            # done makes gloo abort rank 0. Rank 1 waits for rank 0's results, then both leave at once
            # (no teardown of the group with a pending collective).
            deadline = time.monotonic() + 300
            while rank == 1 and not (Path(out_dir) / "rank0.pt").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.5 if rank == 1 else 0.0)
            os._exit(0)
    finally:
        if scenario != "one rank calls":
            dist.destroy_process_group()


def group_outcome(tmp_path: Path, X: torch.Tensor, scenario: str) -> tuple[list[dict], list[str]]:
    mp.spawn(group_worker, args=(str(tmp_path / "init"), X, scenario, str(tmp_path)), nprocs=WORLD, join=True)
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    return states, [(tmp_path / f"outcome{r}.txt").read_text() for r in range(WORLD)]


def test_process_group_false_fits_every_rank_on_its_own_data(tmp_path):
    X = shuffled_blobs(seed=3)
    states, _ = group_outcome(tmp_path, X, "local")
    for rank, state in enumerate(states):
        alone = torch_em.GaussianMixture(3, dtype=F64, tol=1e-9, max_iter=50, **start_values(X))
        run(alone, X.chunk(WORLD)[rank], "fit")
        assert_every_rank_equals([state], alone)
    assert not torch.equal(states[0]["loc"], states[1]["loc"])


def test_an_explicit_process_group_pools_the_data(tmp_path):
    X = shuffled_blobs(seed=4)
    states, _ = group_outcome(tmp_path, X, "group")
    single = torch_em.GaussianMixture(3, dtype=F64, tol=1e-9, max_iter=50, **start_values(X))
    run(single, X, "fit")
    assert_every_rank_equals(states, single)


def test_a_fit_called_on_one_rank_only_raises_instead_of_hanging(tmp_path):
    X = shuffled_blobs(seed=5)
    _, outcomes = group_outcome(tmp_path, X, "one rank calls")
    assert "not every rank of the process group" in outcomes[0] and "process_group=False" in outcomes[0]
    assert outcomes[1] == "fitted"  # rank 1 never called fit


def test_a_bad_process_group_is_rejected():
    with pytest.raises(ValueError, match="process_group must be None"):
        torch_em.GaussianMixture(2).fit(np.random.default_rng(0).normal(size=(20, 2)), process_group="world")
