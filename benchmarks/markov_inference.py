"""Speed of the hidden-Markov inference core (:mod:`torch_em.markov_inference`) per schedule.

One full ``forward_backward`` (posteriors, start and transition counts, log-evidence) per call,
from given emission log-densities (their computation is not timed), for every workload below and
every schedule; ``viterbi`` too with ``--viterbi``. Prints a markdown table of the median
milliseconds per call and the schedule ``"auto"`` picks.

    python benchmarks/markov_inference.py [--threads 2] [--reps 7] [--dtype float32] [--device cpu] [--viterbi]
    python benchmarks/markov_inference.py --before /tmp/old_tree   # also another revision's "auto"

``--before`` takes a source tree of torch_em at another revision (``git worktree add /tmp/old_tree
<rev>``); its ``forward_backward`` (schedule ``"auto"``) is timed too, alternating call by call
with this tree's in the same process, for a before/after ratio under the same machine state.
"""
from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import statistics
import sys
import time
from pathlib import Path

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


def medians_ms(calls: list, reps: int, device: str) -> list[float]:
    """Median wall time in milliseconds of each of ``calls``, called alternately ``reps`` times
    (one warm-up call each first), CUDA synchronised around every call."""
    for call in calls:
        call()
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(reps):
        for call, record in zip(calls, times):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            call()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            record.append(time.perf_counter() - start)
    return [1e3 * statistics.median(record) for record in times]


def median_ms(call, reps: int, device: str) -> float:
    """Median wall time of ``call()`` in milliseconds (one warm-up call first)."""
    return medians_ms([call], reps, device)[0]


def inference_module_of(tree: str):
    """``markov_inference`` of the torch_em package under ``tree``, imported as ``torch_em_before``."""
    init = Path(tree) / "torch_em" / "__init__.py"
    spec = importlib.util.spec_from_file_location("torch_em_before", init, submodule_search_locations=[str(init.parent)])
    if spec is None or spec.loader is None:
        raise SystemExit(f"--before: no torch_em package under {tree}")
    package = importlib.util.module_from_spec(spec)
    sys.modules["torch_em_before"] = package
    spec.loader.exec_module(package)
    return importlib.import_module("torch_em_before.markov_inference")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--viterbi", action="store_true", help="time viterbi as well")
    parser.add_argument("--only", nargs="*", default=None, help="workload names to run (default all)")
    parser.add_argument("--before", default=None, help="a torch_em source tree at another revision (see above)")
    args = parser.parse_args()
    before = inference_module_of(args.before) if args.before else None
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    functions = {"forward_backward": mi.forward_backward}
    if args.viterbi:
        functions["viterbi"] = mi.viterbi
    print(f"threads={args.threads} dtype={args.dtype} device={args.device} reps={args.reps} (median ms per call)\n")
    extra = " | before: auto | after / before" if before else ""
    print("| workload | G | S | T | K | function | " + " | ".join(METHODS) + " | auto picks" + extra + " |")
    print("| --- " * (7 + len(METHODS) + (2 if before else 0)) + "|")
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
            if before is not None:
                old = functools.partial(getattr(before, label), log_emission, log_startprob, log_transmat, lengths)
                new = functools.partial(function, log_emission, log_startprob, log_transmat, lengths)
                after_ms, before_ms = medians_ms([new, old], args.reps, args.device)
                picked += f" | {before_ms:.1f} | {after_ms / before_ms:.2f} (after {after_ms:.1f})"
            print(f"| {name} | {G} | {S} | {T} | {K} | {label} | " + " | ".join(cells) + f" | {picked} |")


if __name__ == "__main__":
    main()
