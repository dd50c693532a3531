"""Speed of the hidden-Markov inference core (:mod:`torch_em.markov_inference`) per schedule.

One full ``forward_backward`` (posteriors, start and transition counts, log-evidence) per call,
from given emission log-densities (their computation is not timed), for every workload below and
every schedule; ``viterbi`` too with ``--viterbi``. Prints a markdown table of the median
milliseconds per call and the schedule ``"auto"`` picks.

    python benchmarks/markov_inference.py [--threads 2] [--reps 7] [--dtype float32] [--device cpu] [--viterbi]
"""
from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch

from torch_em import markov_inference as mi

#: (name, G, S, T, K)
WORKLOADS = (
    ("a", 1, 50, 1000, 8),
    ("b", 1, 1, 100_000, 8),
    ("c", 1, 10_000, 50, 4),
    ("d", 1, 200, 500, 16),
    ("e", 1000, 20, 200, 4),
)
METHODS = ("sequential", "blocked", "auto")


def problem(G: int, S: int, T: int, K: int, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, ...]:
    """Gaussian-like emission log-densities (D = 4 features) and random normalised parameters."""
    generator = torch.Generator().manual_seed(0)
    means = torch.randn(G, 1, 1, K, 4, generator=generator) * 2
    x = torch.randn(G, S, T, 1, 4, generator=generator) * 2
    log_emission = -0.5 * ((x - means) ** 2).sum(-1) - 2 * torch.log(torch.tensor(2 * torch.pi))
    log_startprob = torch.log_softmax(torch.randn(G, K, generator=generator), -1)
    log_transmat = torch.log_softmax(torch.randn(G, K, K, generator=generator) + 3 * torch.eye(K), -1)
    lengths = torch.randint(T // 2, T + 1, (S,), generator=generator)
    return tuple(t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)
                 for t in (log_emission, log_startprob, log_transmat, lengths))


def median_ms(call, reps: int, device: str) -> float:
    """Median wall time of ``call()`` in milliseconds (one warm-up call first)."""
    call()
    times = []
    for _ in range(reps):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        call()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--viterbi", action="store_true", help="time viterbi as well")
    parser.add_argument("--only", nargs="*", default=None, help="workload names to run (default all)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    functions = {"forward_backward": mi.forward_backward}
    if args.viterbi:
        functions["viterbi"] = mi.viterbi
    print(f"threads={args.threads} dtype={args.dtype} device={args.device} reps={args.reps} (median ms per call)\n")
    print("| workload | G | S | T | K | function | " + " | ".join(METHODS) + " | auto picks |")
    print("| --- " * (7 + len(METHODS)) + "|")
    for name, G, S, T, K in WORKLOADS:
        if args.only and name not in args.only:
            continue
        log_emission, log_startprob, log_transmat, lengths = problem(G, S, T, K, dtype, args.device)
        for label, function in functions.items():
            cells = []
            for method in METHODS:
                call = functools.partial(function, log_emission, log_startprob, log_transmat, lengths, method=method)
                cells.append(f"{median_ms(call, args.reps, args.device):.1f}")
            factor = mi.VITERBI_PRODUCT_FACTOR if label == "viterbi" else 1.0
            picked = mi._resolve_method("auto", G, S, T, K, factor)
            print(f"| {name} | {G} | {S} | {T} | {K} | {label} | " + " | ".join(cells) + f" | {picked} |")


if __name__ == "__main__":
    main()
