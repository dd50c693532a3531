"""Data-parallel EM with torch.distributed: every rank reads its shard, the statistics are
all-reduced once per iteration, and every rank ends with the same model.

Run on one machine with two processes (gloo on CPU; use NCCL and one GPU per rank on GPUs):

    torchrun --nproc_per_node=2 examples/distributed.py

Each rank streams its shard through a DataLoader with a DistributedSampler.

Which ranks pool their data is ``fit``'s ``process_group``: None (the default) uses the default
group whenever one is initialised, as here; a ProcessGroup pools the data of its ranks only;
``process_group=False`` fits every rank's own model on its own data (e.g. one model per rank in
a data-parallel training job). A fit that only some ranks of its group call raises
``torch_em.distributed.RanksDisagreeError`` within ``torch_em.distributed.PEER_TIMEOUT`` seconds
(120) instead of waiting for the group's own timeout.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import torch_em


def main() -> None:
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", rank % torch.cuda.device_count()) if torch.cuda.is_available() else torch.device("cpu")

    generator = torch.Generator().manual_seed(0)  # the same dataset on every rank; each reads a shard
    means = torch.tensor([[0.0, 0.0], [4.0, 4.0], [-3.0, 5.0]])
    X = means[torch.randint(3, (300_000,), generator=generator)] + torch.randn(300_000, 2, generator=generator)
    shard = DistributedSampler(TensorDataset(X), shuffle=False)
    loader = DataLoader(TensorDataset(X), batch_size=50_000, sampler=shard)

    model = torch_em.GaussianMixture(3, seed=0, device=device).fit(loader)
    print(f"rank {rank}: {len(shard)} points, n_iter {int(model.n_iter_)}, "
          f"means {model.means.detach().cpu().numpy().round(3).tolist()}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
