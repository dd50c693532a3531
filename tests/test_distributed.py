"""torch.distributed: two gloo processes, each with half the data, equal one process on all of it."""
from __future__ import annotations

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
