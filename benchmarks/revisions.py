"""torch_em against itself at another revision: the rows of ``run.py`` for two source trees,
interleaved in one run (a before/after comparison of a change on the same machine and load).

    python benchmarks/revisions.py --before /path/to/old/checkout [--reps 5] [--bench full diag batched]

Each repetition runs one worker process per tree (alternating which goes first); a worker imports
torch_em from its tree (``PYTHONPATH``), times each benchmark once as ``run.py`` does (per EM
iteration: ``t(1 + n) - t(1)``; batched: one whole fit) and prints JSON. The table gives
medians over the repetitions and the ratio after / before.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROWS = {  # name -> (benchmark, dtype)
    "full float64": ("full", "float64"), "full float32": ("full", "float32"),
    "diag float32": ("diag", "float32"),
    "batched float64": ("batched", "float64"), "batched float32": ("batched", "float32"),
    "batched float64 default-init": ("batched", "default-init"),
    "kmeans float32": ("kmeans", "float32"),
}


def worker(benches: list[str], n: int, threads: int) -> None:
    import torch

    sys.path.insert(0, str(HERE))
    import peers
    import run

    torch.set_num_threads(threads)
    sizes = run.Sizes()
    results = {}
    for row, (bench, dtype) in ROWS.items():
        if bench not in benches:
            continue
        if bench == "batched":
            b = sizes.batched
            problem = run.batched_problem(2, b["B"], b["N"], b["D"], b["K"])  # the seed run.py uses
            if dtype == "default-init":
                runner = peers.torch_em_default_init_runner(problem, "float64", "cpu", seed=0)
            else:
                runner = peers.torch_em_runner(problem, dtype, "cpu")
            runner.fit(b["iters"])  # warm-up
            results[row] = run.timed_fit(runner, b["iters"])
        else:
            size = getattr(sizes, bench)
            problem = run.single_problem({"full": 0, "diag": 1, "kmeans": 3}[bench], size["N"], size["D"], size["K"],
                                         "full" if bench == "full" else "diag")
            make = peers.torch_em_kmeans_runner if bench == "kmeans" else peers.torch_em_runner
            runner = make(problem, dtype, "cpu")
            runner.fit(1), runner.fit(2)  # warm-up
            results[row] = (run.timed_fit(runner, 1 + n) - run.timed_fit(runner, 1)) / n
    print(json.dumps(results))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="root of the other checkout")
    parser.add_argument("--after", default=str(HERE.parent), help="root of this checkout (default)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--bench", nargs="+", default=["full", "diag", "batched", "kmeans"],
                        choices=["full", "diag", "batched", "kmeans"])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.bench, args.iters, args.threads)
        return 0
    trees = {"before": args.before, "after": args.after}
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in trees}
    for rep in range(args.reps):
        order = list(trees) if rep % 2 == 0 else list(reversed(trees))
        for name in order:
            env = dict(os.environ, PYTHONPATH=str(Path(trees[name]).resolve()))
            command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--before", ".", "--iters",
                       str(args.iters), "--threads", str(args.threads), "--bench", *args.bench]
            out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
            for row, value in json.loads(out.strip().splitlines()[-1]).items():
                samples[name].setdefault(row, []).append(value)
        print(f"repetition {rep + 1}/{args.reps} done", file=sys.stderr, flush=True)
    print("| row | before | after | after / before |\n| --- | --- | --- | --- |")
    for row in samples["after"]:
        before, after = statistics.median(samples["before"][row]), statistics.median(samples["after"][row])
        unit = "s/fit" if row.startswith("batched") else "ms/iter"
        scale = 1.0 if unit == "s/fit" else 1e3
        print(f"| {row} | {before * scale:.4g} {unit} | {after * scale:.4g} {unit} | {after / before:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
