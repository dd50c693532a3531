"""Benchmark harness for torch_em: speed-ups over scikit-learn, torchgmm and pomegranate.

Run from the repository root (all benchmarks, CPU, 5 repetitions)::

    python benchmarks/run.py
    python benchmarks/run.py --quick                      # smoke test, < 1 minute
    python benchmarks/run.py --bench full diag --reps 7 --device cuda

It prints a markdown table and writes ``benchmarks/results/<name>.md`` and ``<name>.json``.

Benchmarks (sizes from the project issue; ``--quick`` shrinks them):

``full``
    Full covariance, N=100,000, D=16, K=16. Time per EM iteration of torch_em float64 vs
    scikit-learn float64 (target >= 6x) and of torch_em float32 vs torchgmm float32 (target >= 2x)
    and pomegranate float32 (reported, no target).
``diag``
    Diagonal covariance, N=500,000, D=32, K=32. Time per EM iteration of torch_em float32 vs
    scikit-learn given the same float32 data (target >= 6x).
``batched``
    1,000 independent problems of N=500, D=2, K=3, exactly 100 EM iterations each (tol=0).
    torch_em fits all of them in one call (X (1000, 500, 2), batch_shape=(1000,)), in float64
    and float32; scikit-learn fits a subset (default 50) one after the other and its time is
    extrapolated linearly to all 1,000 (labelled "extrapolated"). Target >= 100x (float64 vs
    float64). An extra, informational pair times both with their default initialisation
    (torch_em k-means++, scikit-learn k-means) instead of the shared initial parameters.
``kmeans``
    k-means (Lloyd), N=1,000,000, D=32, K=64, data from a 64-component Gaussian mixture. Time per
    Lloyd iteration of torch_em.KMeans float32 vs scikit-learn KMeans(algorithm="lloyd") given
    the same float32 data, both from the same initial centres (K distinct data points), tol=0
    (target >= 2x). The check line compares their final inertias and centres.

Methodology
-----------
* Same starting point: every problem comes with initial weights, means and precisions
  (weights uniform, means K distinct random data points, every precision the inverse of the
  data's covariance / variances). torch_em and scikit-learn receive them as ``weights_init``,
  ``means_init``, ``precisions_init``; pomegranate as initialised components; torchgmm only takes
  ``init_means`` (see ``peers.py``). With identical starts torch_em and scikit-learn run the same
  EM iterations; the report shows their final mean log-likelihoods side by side as a check.
* Exact iteration counts: convergence tests are disabled (``tol=0`` or the peer's equivalent) and
  every fit checks afterwards that it ran exactly the requested number of iterations.
* Per-iteration time (``full``, ``diag``, ``kmeans``) excludes initialisation and every other per-fit
  constant on all sides alike: each repetition times one fit with 1 iteration and one with
  ``1 + n`` iterations (``--iters n``, default 10) from the same initial parameters; the time per
  iteration is ``(median t(1 + n) - median t(1)) / n`` over the repetitions (a difference of
  medians, robust to one slow run; the table's [min-max] is the range of the per-repetition
  ``(t(1 + n) - t(1)) / n``). The timed region is estimator construction plus ``fit``, with
  Python's garbage collector paused; data are converted to the library's dtype and device
  beforehand. CUDA work is synchronised before and after.
* ``batched`` times whole fits (100 iterations, from the shared initial parameters): the
  quantity a user waits for when fitting 1,000 small models.
* Warm-up: every contender runs once (1 and 2 iterations, or one whole fit) before timing.
* Repetitions: ``--reps`` (default 5). Contenders are interleaved within each repetition (in a
  rotating order) so that load from other processes hits all of them alike. A speed-up is the
  ratio of the two reported (median-based) times, peer / torch_em.
* Threads: torch uses ``torch.set_num_threads(--threads)``, by default all cores available to
  this process; scikit-learn uses numpy's BLAS with its default thread count (reported via
  threadpoolctl). scikit-learn always runs on the CPU, also with ``--device cuda``.
* Numbers are indicative when other processes share the machine: the report records the load
  average before and after.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import os
import platform
import socket
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402
from peers import Problem, Runner, Unavailable  # noqa: E402

HERE = Path(__file__).resolve().parent
BENCHMARKS = ("full", "diag", "batched", "kmeans")


# --- configuration --------------------------------------------------------------------------------
@dataclass
class Sizes:
    full: dict = field(default_factory=lambda: dict(N=100_000, D=16, K=16))
    diag: dict = field(default_factory=lambda: dict(N=500_000, D=32, K=32))
    batched: dict = field(default_factory=lambda: dict(B=1000, N=500, D=2, K=3, iters=100, subset=50))
    kmeans: dict = field(default_factory=lambda: dict(N=1_000_000, D=32, K=64))
    iters: int = 10  # n in (t(1 + n) - t(1)) / n
    reps: int = 5


QUICK = Sizes(
    full=dict(N=20_000, D=16, K=8),
    diag=dict(N=100_000, D=16, K=16),
    batched=dict(B=200, N=500, D=2, K=3, iters=50, subset=10),
    kmeans=dict(N=100_000, D=16, K=16),
    iters=4,
    reps=3,
)

TARGETS = {
    ("full", "scikit-learn"): 6.0,
    ("full", "torchgmm"): 2.0,
    ("diag", "scikit-learn"): 6.0,
    ("batched", "scikit-learn"): 100.0,
    ("kmeans", "scikit-learn"): 2.0,
}


# --- data ---------------------------------------------------------------------------------------------
def mixture_data(rng: np.random.Generator, n: int, d: int, k: int, covariance_type: str, spread: float = 4.0):
    """n points (n, d) from a random k-component Gaussian mixture."""
    weights = rng.dirichlet(np.full(k, 5.0))
    means = rng.normal(scale=spread, size=(k, d))
    labels = rng.choice(k, size=n, p=weights)
    z = rng.standard_normal((n, d))
    if covariance_type == "full":
        A = rng.normal(size=(k, d, d)) / math.sqrt(d)
        chol = np.linalg.cholesky(A @ np.swapaxes(A, -1, -2) + 0.5 * np.eye(d))
        X = means[labels] + np.einsum("nij,nj->ni", chol[labels], z)
    else:
        scale = np.sqrt(rng.uniform(0.5, 2.0, size=(k, d)))
        X = means[labels] + scale[labels] * z
    return X


def initial_parameters(rng: np.random.Generator, X: np.ndarray, k: int, covariance_type: str):
    """Uniform weights, k distinct random points as means, the data's (co)variance for all."""
    n, d = X.shape
    means = X[rng.choice(n, size=k, replace=False)]
    if covariance_type == "full":
        precision = np.linalg.inv(np.cov(X, rowvar=False) + 1e-6 * np.eye(d))
        precisions = np.broadcast_to(precision, (k, d, d)).copy()
    else:
        precisions = np.broadcast_to(1.0 / (X.var(0) + 1e-6), (k, d)).copy()
    return np.full(k, 1.0 / k), means, precisions


def single_problem(seed: int, N: int, D: int, K: int, covariance_type: str) -> Problem:
    rng = np.random.default_rng(seed)
    X = mixture_data(rng, N, D, K, covariance_type)
    return Problem(X, *initial_parameters(rng, X, K, covariance_type), covariance_type)


def batched_problem(seed: int, B: int, N: int, D: int, K: int) -> Problem:
    rng = np.random.default_rng(seed)
    Xs, ws, ms, ps = [], [], [], []
    for _ in range(B):
        X = mixture_data(rng, N, D, K, "full", spread=3.0)
        w, m, p = initial_parameters(rng, X, K, "full")
        Xs.append(X), ws.append(w), ms.append(m), ps.append(p)
    return Problem(np.stack(Xs), np.stack(ws), np.stack(ms), np.stack(ps), "full")


# --- measurement --------------------------------------------------------------------------------------
@dataclass
class Entry:
    """One contender of one benchmark and its measurements."""

    key: str  # e.g. "torch_em float64"
    library: str
    dtype: str
    device: str
    unit: str  # "s/iteration" or "s/fit"
    note: str = ""
    samples: list[float] = field(default_factory=list)  # the reported quantity, one per repetition
    raw: list[dict] = field(default_factory=list)  # per repetition: t1, tn, ...
    status: str = "ok"  # "ok", "unavailable (...)", "failed (...)"
    lower_bound: Any = None
    final: dict = field(default_factory=dict)  # runner.info of the last timed fit
    runner: Runner | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok" and bool(self.samples)

    @property
    def median(self) -> float:
        """The reported value. Per iteration: (median t(1+n) - median t(1)) / n over the
        repetitions (a difference of medians: one slow t(1) cannot make it negative, unlike
        the per-repetition differences whose range the table shows). Whole fits: the median."""
        if self.unit == "s/iteration" and self.raw:
            t1 = statistics.median(r["t_1"] for r in self.raw)
            tn = statistics.median(r["t_1_plus_n"] for r in self.raw)
            return (tn - t1) / self.raw[0]["n"]
        return statistics.median(self.samples)


def make_entry(key: str, unit: str, factory: Callable[[], Runner], note: str = "", library: str = "",
               dtype: str = "", device: str = "") -> Entry:
    try:
        runner = factory()
    except Unavailable as error:
        return Entry(key, library, dtype, device, unit, note, status=f"unavailable ({error})")
    except Exception as error:  # a peer that breaks while preparing is reported, not fatal
        return Entry(key, library, dtype, device, unit, note, status=f"failed ({type(error).__name__}: {error})")
    return Entry(key, runner.library, runner.dtype, runner.device, unit, note or runner.note, runner=runner)


def timed_fit(runner: Runner, n_iter: int) -> float:
    """``runner.fit(n_iter)`` with Python's garbage collector off (collected just before), as timeit does."""
    gc.collect()
    gc.disable()
    try:
        return runner.fit(n_iter)
    finally:
        gc.enable()


def _fail(entry: Entry, error: BaseException) -> None:
    entry.status = f"failed ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
    entry.runner = None
    print(f"    {entry.key}: {entry.status}", file=sys.stderr)
    traceback.print_exc(file=sys.stderr)


def interleaved(entries: list[Entry], reps: int, warm_up: Callable[[Runner], None],
                time_one: Callable[[Entry, int], Any], record: Callable[[Entry, int, Any], None]) -> None:
    """Warm every contender up once (``warm_up(runner)``), then ``reps`` repetitions with the
    contenders in rotating order: ``record(entry, rep, time_one(entry, rep))``. A contender whose
    warm-up or timing raises is marked failed and left out from then on."""
    for entry in entries:
        if entry.runner is None:
            continue
        try:
            warm_up(entry.runner)
        except Exception as error:
            _fail(entry, error)
    live = [e for e in entries if e.runner is not None]
    for rep in range(reps):
        order = live[rep % len(live):] + live[: rep % len(live)] if live else []
        for entry in order:
            if entry.runner is None:
                continue
            try:
                timed = time_one(entry, rep)
            except Exception as error:
                _fail(entry, error)
                continue
            record(entry, rep, timed)


def _keep_final(entry: Entry) -> None:
    """What the last timed fit reported (final lower bound, inertia, centres) for the checks."""
    entry.final = dict(entry.runner.info)
    entry.lower_bound = entry.final.get("lower_bound")


def measure_per_iteration(entries: list[Entry], n: int, reps: int, log: Callable[[str], None]) -> None:
    """(t(1 + n) - t(1)) / n per repetition, contenders interleaved in rotating order."""
    def warm_up(runner: Runner) -> None:
        runner.fit(1)
        runner.fit(2)

    def time_one(entry: Entry, rep: int) -> tuple[float, float]:
        return timed_fit(entry.runner, 1), timed_fit(entry.runner, 1 + n)

    def record(entry: Entry, rep: int, timed: tuple[float, float]) -> None:
        t1, tn = timed
        entry.samples.append((tn - t1) / n)
        entry.raw.append({"t_1": t1, "t_1_plus_n": tn, "n": n})
        _keep_final(entry)
        log(f"    rep {rep + 1}/{reps} {entry.key}: t(1)={t1:.4f}s t({1 + n})={tn:.4f}s -> {(tn - t1) / n * 1e3:.3f} ms/iter")

    interleaved(entries, reps, warm_up, time_one, record)


def measure_whole_fits(entries: list[Entry], n_iter: int, reps: int, log: Callable[[str], None],
                       scale: dict[str, float] | None = None,
                       refresh: dict[str, Callable[[int], Runner]] | None = None) -> None:
    """One whole fit of ``n_iter`` iterations per repetition; ``scale[key]`` multiplies the time
    (subset extrapolation); ``refresh[key](rep)`` gives a new runner per repetition (new subset)."""
    scale = scale or {}
    refresh = refresh or {}

    def time_one(entry: Entry, rep: int) -> float:
        if entry.key in refresh:
            entry.runner = refresh[entry.key](rep)
        return timed_fit(entry.runner, n_iter)

    def record(entry: Entry, rep: int, t: float) -> None:
        factor = scale.get(entry.key, 1.0)
        entry.samples.append(t * factor)
        entry.raw.append({"t_measured": t, "factor": factor, **entry.runner.info.get("extra", {})})
        _keep_final(entry)
        entry.raw[-1]["subset"] = entry.runner.info.get("subset")
        log(f"    rep {rep + 1}/{reps} {entry.key}: {t:.4f}s" + (f" x {factor:g} = {t * factor:.3f}s" if factor != 1 else ""))

    interleaved(entries, reps, lambda runner: runner.fit(n_iter), time_one, record)


# --- benchmarks ---------------------------------------------------------------------------------------
@dataclass
class Comparison:
    benchmark: str
    ours: str  # entry key of torch_em
    theirs: str  # entry key of the peer
    target: float | None
    note: str = ""


@dataclass
class BenchResult:
    name: str
    description: str
    unit: str
    entries: list[Entry]
    comparisons: list[Comparison]
    checks: list[str] = field(default_factory=list)


def per_iteration_result(name: str, what: str, kind: str, entries: list[Entry], comparisons: list[Comparison],
                         sizes: Sizes, log, check: Callable[[], str]) -> BenchResult:
    """Measure ``entries`` per iteration, then run ``check()`` on what their last fits reported."""
    measure_per_iteration(entries, sizes.iters, sizes.reps, log)
    desc = f"{what}; time per {kind} iteration = (median t(1+{sizes.iters}) - median t(1))/{sizes.iters}"
    return BenchResult(name, desc, "s/iteration", entries, comparisons, [check()])


def bench_full(args, sizes: Sizes, log) -> BenchResult:
    N, D, K = sizes.full["N"], sizes.full["D"], sizes.full["K"]
    problem = single_problem(args.seed, N, D, K, "full")
    dev = args.device
    unit = "s/iteration"
    entries = [
        make_entry("torch_em float64", unit, lambda: peers.torch_em_runner(problem, "float64", dev)),
        make_entry("scikit-learn float64", unit, lambda: peers.sklearn_runner(problem, "float64"), library="scikit-learn", dtype="float64", device="cpu"),
        make_entry("torch_em float32", unit, lambda: peers.torch_em_runner(problem, "float32", dev)),
    ]
    if "torchgmm" in args.peers:
        entries.append(make_entry("torchgmm float32", unit, lambda: peers.torchgmm_runner(problem, "float32", dev), library="torchgmm", dtype="float32", device=dev))
    if "pomegranate" in args.peers:
        entries.append(make_entry("pomegranate float32", unit, lambda: peers.pomegranate_runner(problem, "float32", dev), library="pomegranate", dtype="float32", device=dev))
    torch.set_num_threads(args.threads)  # in case a peer's import changed it
    comparisons = [
        Comparison("full", "torch_em float64", "scikit-learn float64", TARGETS[("full", "scikit-learn")]),
        Comparison("full", "torch_em float32", "torchgmm float32", TARGETS[("full", "torchgmm")]),
        Comparison("full", "torch_em float32", "pomegranate float32", None),
    ]
    comparisons = [c for c in comparisons if any(e.key == c.theirs for e in entries)]
    return per_iteration_result(
        "full", f"full covariance, N={N:,}, D={D}, K={K}", "EM", entries, comparisons, sizes, log,
        lambda: lower_bound_check(entries, "torch_em float64", "scikit-learn float64", 1 + sizes.iters))


def float32_vs_sklearn(name: str, args, sizes: Sizes, log, size: dict, seed_offset: int, ours: Callable[..., Runner],
                       theirs: Callable[..., Runner], note: str, what: str, kind: str,
                       check: Callable[[list[Entry], str, str], str]) -> BenchResult:
    """torch_em float32 against scikit-learn given the same float32 data, on one diagonal-mixture
    problem of ``size`` (N, D, K): runners ``ours(problem, "float32", device)`` and
    ``theirs(problem, "float32")``; ``what`` is formatted with N, D, K; ``check(entries, ours,
    theirs)`` compares their last fits."""
    N, D, K = size["N"], size["D"], size["K"]
    problem = single_problem(args.seed + seed_offset, N, D, K, "diag")
    dev = args.device
    unit = "s/iteration"
    entries = [
        make_entry("torch_em float32", unit, lambda: ours(problem, "float32", dev)),
        make_entry("scikit-learn float32", unit, lambda: theirs(problem, "float32"), note=note, library="scikit-learn", dtype="float32", device="cpu"),
    ]
    comparisons = [Comparison(name, "torch_em float32", "scikit-learn float32", TARGETS[(name, "scikit-learn")])]
    return per_iteration_result(name, what.format(N=N, D=D, K=K), kind, entries, comparisons, sizes, log,
                                lambda: check(entries, "torch_em float32", "scikit-learn float32"))


def bench_diag(args, sizes: Sizes, log) -> BenchResult:
    return float32_vs_sklearn(
        "diag", args, sizes, log, sizes.diag, 1, peers.torch_em_runner, peers.sklearn_runner, "float32 input",
        "diagonal covariance, N={N:,}, D={D}, K={K}, float32 data", "EM",
        lambda entries, ours, theirs: lower_bound_check(entries, ours, theirs, 1 + sizes.iters))


def bench_batched(args, sizes: Sizes, log) -> BenchResult:
    cfg = sizes.batched
    B, N, D, K, iters, subset = cfg["B"], cfg["N"], cfg["D"], cfg["K"], cfg["iters"], min(cfg["subset"], cfg["B"])
    if args.sklearn_subset:
        subset = min(args.sklearn_subset, B)
    problem = batched_problem(args.seed + 2, B, N, D, K)
    dev = args.device
    unit = "s/fit"
    factor = B / subset

    def subset_of(rep: int) -> list[int]:  # a different block of problems every repetition
        return [(rep * subset + i) % B for i in range(subset)]

    def per_subset(make: Callable[[list[int]], Runner]) -> Callable[[int], Runner]:
        """rep -> a runner for that repetition's subset, which records the subset after each fit."""
        def refresh(rep: int) -> Runner:
            runner = make(subset_of(rep))
            original = runner.fit

            def fit(n):
                t = original(n)
                runner.info["subset"] = subset_of(rep)
                return t
            runner.fit = fit
            return runner
        return refresh

    sk = per_subset(lambda subset: peers.sklearn_runner(problem, "float64", subset=subset))
    sk_default = per_subset(lambda subset: peers.sklearn_default_init_runner(problem, subset, seed=args.seed))

    extrapolated = f"{subset} fits timed, x{factor:g} extrapolated to {B:,}"
    entries = [
        make_entry("torch_em float64", unit, lambda: peers.torch_em_runner(problem, "float64", dev), note=f"all {B:,} in one call"),
        make_entry("torch_em float32", unit, lambda: peers.torch_em_runner(problem, "float32", dev), note=f"all {B:,} in one call"),
        make_entry("scikit-learn float64", unit, lambda: sk(0), note=f"one by one; {extrapolated}", library="scikit-learn", dtype="float64", device="cpu"),
    ]
    if not args.no_default_init:
        entries += [
            make_entry("torch_em float64 default-init", unit, lambda: peers.torch_em_default_init_runner(problem, "float64", dev, seed=args.seed), note="k-means++ init; all in one call"),
            make_entry("scikit-learn float64 default-init", unit, lambda: sk_default(0), note=f"k-means init; {extrapolated}", library="scikit-learn", dtype="float64", device="cpu"),
        ]
    scale = {"scikit-learn float64": factor, "scikit-learn float64 default-init": factor}
    refresh = {"scikit-learn float64": sk, "scikit-learn float64 default-init": sk_default}
    measure_whole_fits(entries, iters, sizes.reps, log, scale=scale, refresh=refresh)
    comparisons = [
        Comparison("batched", "torch_em float64", "scikit-learn float64", TARGETS[("batched", "scikit-learn")]),
        Comparison("batched", "torch_em float32", "scikit-learn float64", None),
    ]
    if not args.no_default_init:
        comparisons.append(Comparison("batched", "torch_em float64 default-init", "scikit-learn float64 default-init", None, "each with its default initialisation"))
    checks = [batched_lower_bound_check(entries)]
    desc = (f"{B:,} independent problems, N={N}, D={D}, K={K}, exactly {iters} EM iterations each (tol=0); "
            f"time to fit all {B:,}; scikit-learn: {extrapolated}")
    return BenchResult("batched", desc, unit, entries, comparisons, checks)


def bench_kmeans(args, sizes: Sizes, log) -> BenchResult:
    # Data from a K-component Gaussian mixture; its K distinct random data points (problem.means)
    # are the initial centres of both contenders.
    return float32_vs_sklearn(
        "kmeans", args, sizes, log, sizes.kmeans, 3, peers.torch_em_kmeans_runner, peers.sklearn_kmeans_runner,
        'algorithm="lloyd", float32 input',
        "k-means (Lloyd), N={N:,}, D={D}, K={K}, float32 data from a {K}-component Gaussian mixture, same initial centres, tol=0",
        "Lloyd", inertia_check)


def _entry(entries: list[Entry], key: str) -> Entry | None:
    return next((e for e in entries if e.key == key), None)


def lower_bound_check(entries: list[Entry], ours: str, theirs: str, n_iter: int) -> str:
    a, b = _entry(entries, ours), _entry(entries, theirs)
    if not (a and b and a.ok and b.ok) or a.lower_bound is None or b.lower_bound is None:
        return f"{ours} vs {theirs}: final mean log-likelihood not compared (missing)"
    la, lb = float(np.asarray(a.lower_bound)), float(np.asarray(b.lower_bound))
    return (f"same start, {n_iter} iterations: mean log-likelihood {ours} {la:.10g}, {theirs} {lb:.10g} "
            f"(|difference| {abs(la - lb):.2e})")


def inertia_check(entries: list[Entry], ours: str, theirs: str) -> str:
    a, b = _entry(entries, ours), _entry(entries, theirs)
    if not (a and b and a.ok and b.ok) or "inertia" not in a.final or "inertia" not in b.final:
        return f"{ours} vs {theirs}: final inertia not compared (missing)"
    ia, ib = a.final["inertia"], b.final["inertia"]
    centres = np.abs(a.final["centres"] - b.final["centres"]).max()
    return (f"same initial centres, {a.final['n_iter']} Lloyd iterations: inertia {ours} {ia:.10g}, {theirs} {ib:.10g} "
            f"(relative difference {abs(ia - ib) / abs(ib):.2e}); max |centre difference| {centres:.2e}")


def batched_lower_bound_check(entries: list[Entry]) -> str:
    a, b = _entry(entries, "torch_em float64"), _entry(entries, "scikit-learn float64")
    if not (a and b and a.ok and b.ok) or a.lower_bound is None or b.lower_bound is None:
        return "batched: final lower bounds not compared (missing)"
    subset = b.raw[-1].get("subset") if b.raw else None
    ours = np.asarray(a.lower_bound).reshape(-1)[subset]
    theirs = np.asarray(b.lower_bound).reshape(-1)
    diff = np.abs(ours - theirs)
    close = int((diff < 1e-6).sum())
    return (f"same starts: torch_em float64 and scikit-learn agree on the final mean log-likelihood of "
            f"{close}/{diff.size} problems of the last timed subset to 1e-6 (max |difference| {diff.max():.2e})")


# --- environment & reporting --------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def environment(args) -> dict:
    import numpy
    info: dict[str, Any] = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cores_available": available_cores(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numpy": numpy.__version__,
        "scikit-learn": peers.sklearn_version(),
        "torchgmm": peers.torchgmm_version(),
        "pomegranate": peers.pomegranate_version(),
        "device": args.device,
        "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    try:
        import torch_em
        info["torch_em"] = getattr(torch_em, "__version__", "?")
    except Exception as error:
        info["torch_em"] = f"import failed: {error!r}"
    try:
        import subprocess
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE.parent, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "torch_em"], cwd=HERE.parent, capture_output=True, text=True, timeout=10)
        if head.returncode == 0:
            info["git"] = head.stdout.strip() + (" (torch_em/ has uncommitted changes)" if dirty.stdout.strip() else "")
    except Exception:
        pass
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
        info["cuda"] = torch.version.cuda
    try:
        from threadpoolctl import threadpool_info
        info["threadpools"] = [
            {k: p.get(k) for k in ("user_api", "internal_api", "num_threads", "version", "threading_layer") if k in p}
            for p in threadpool_info()
        ]
    except Exception as error:
        info["threadpools"] = f"threadpoolctl unavailable: {error!r}"
    return info


def fmt_time(seconds: float) -> str:
    if seconds != seconds:  # nan
        return "nan"
    a = abs(seconds)
    if a >= 1:
        return f"{seconds:.3g} s"
    if a >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} µs"


def fmt_entry(entry: Entry) -> str:
    if not entry.ok:
        return entry.status
    per = "/iter" if entry.unit == "s/iteration" else ""
    return f"{fmt_time(entry.median)}{per}"


def comparison_rows(result: BenchResult, quick: bool) -> list[dict]:
    rows = []
    for c in result.comparisons:
        a, b = _entry(result.entries, c.ours), _entry(result.entries, c.theirs)
        row = {"benchmark": c.benchmark, "torch_em": c.ours, "peer": c.theirs, "target": c.target, "note": c.note}
        row["torch_em_time"] = fmt_entry(a) if a else "missing"
        row["peer_time"] = fmt_entry(b) if b else "missing"
        if a and b and a.ok and b.ok and a.median > 0 and b.median > 0:
            row["speedup"] = b.median / a.median
        else:
            row["speedup"] = None
            if a and b and a.ok and b.ok:
                row["note"] = (row["note"] + "; " if row["note"] else "") + "non-positive median: too noisy, use more --iters/--reps"
        if c.target is None:
            row["met"] = "-"
        elif quick:
            row["met"] = "n/a (quick)"
        elif row["speedup"] is None:
            row["met"] = "?"
        else:
            row["met"] = "yes" if row["speedup"] >= c.target else "**no**"
        rows.append(row)
    return rows


def markdown(results: list[BenchResult], env: dict, args, sizes: Sizes, started: float) -> str:
    lines = [f"# torch_em benchmarks: {args.name}", ""]
    if args.quick:
        lines += ["**Quick smoke run (`--quick`): sizes shrunk, targets not assessed.**", ""]
    lines += [
        f"- date {env['date']}, host `{env['host']}`, {env['cpu']}, {env['cores_available']} cores available",
        f"- device `{env['device']}`" + (f" ({env.get('gpu')}, CUDA {env.get('cuda')})" if env.get("gpu") else "")
        + "; scikit-learn always on the CPU",
        f"- torch {env['torch']} with torch.set_num_threads({env['torch_threads']}); numpy {env['numpy']}; "
        f"scikit-learn {env['scikit-learn']}; torchgmm {env['torchgmm'] or 'not installed'}; "
        f"pomegranate {env['pomegranate'] or 'not installed'}; torch_em {env['torch_em']}" + (f" at {env['git']}" if env.get("git") else ""),
    ]
    if isinstance(env.get("threadpools"), list):
        pools = ", ".join(f"{p.get('internal_api')} {p.get('version') or ''} ({p.get('user_api')}, {p.get('num_threads')} threads)" for p in env["threadpools"])
        lines.append(f"- numpy/scikit-learn thread pools (threadpoolctl): {pools}")
    lines.append(
        f"- repetitions {sizes.reps}; per-iteration time = (median t(1+n) - median t(1))/n with n={sizes.iters}, [min-max] of the per-repetition (t(1+n) - t(1))/n; whole fits: median [min-max]; "
        f"speed-up = ratio of medians; load average {fmt_load(env.get('loadavg_start'))} at start, {fmt_load(env.get('loadavg_end'))} at end; "
        f"total {time.perf_counter() - started:.0f} s"
    )
    lines += ["", "## Speed-ups", "", "| benchmark | torch_em | peer | torch_em time | peer time | speed-up | target | met |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for result in results:
        for row in comparison_rows(result, args.quick):
            speed = f"**{row['speedup']:.1f}x**" if row["speedup"] is not None else "-"
            target = f">= {row['target']:g}x" if row["target"] is not None else "-"
            peer = row["peer"] + (f" ({row['note']})" if row["note"] else "")
            lines.append(f"| {row['benchmark']} | {row['torch_em']} | {peer} | {row['torch_em_time']} | {row['peer_time']} | {speed} | {target} | {row['met']} |")
    lines += ["", "## All timings", ""]
    for result in results:
        lines += [f"### {result.name}: {result.description}", "", "| contender | device | time | [min - max] | reps | note |", "| --- | --- | --- | --- | --- | --- |"]
        for e in result.entries:
            if e.ok:
                per = "/iter" if e.unit == "s/iteration" else " per fit of all"
                lines.append(f"| {e.key} | {e.device} | {fmt_time(e.median)}{per} | [{fmt_time(min(e.samples))} - {fmt_time(max(e.samples))}] | {len(e.samples)} | {e.note} |")
            else:
                lines.append(f"| {e.key} | {e.device or '-'} | {e.status} | | 0 | {e.note} |")
        lines += [""] + [f"- check: {c}" for c in result.checks] + [""]
    return "\n".join(lines)


def fmt_load(load) -> str:
    return "?" if not load else "/".join(f"{x:.2f}" for x in load)


def to_json(results: list[BenchResult], env: dict, args, sizes: Sizes) -> dict:
    def clean(v):
        if isinstance(v, np.ndarray):
            return v.tolist()
        if isinstance(v, (np.floating, np.integer)):
            return v.item()
        return v

    out = {
        "name": args.name, "quick": args.quick, "environment": env,
        "config": {"reps": sizes.reps, "iters": sizes.iters, "full": sizes.full, "diag": sizes.diag, "batched": sizes.batched, "kmeans": sizes.kmeans, "seed": args.seed},
        "benchmarks": {},
    }
    for r in results:
        out["benchmarks"][r.name] = {
            "description": r.description,
            "unit": r.unit,
            "entries": [
                {
                    "key": e.key, "library": e.library, "dtype": e.dtype, "device": e.device, "unit": e.unit,
                    "note": e.note, "status": e.status, "median": e.median if e.ok else None,
                    "min": min(e.samples) if e.ok else None, "max": max(e.samples) if e.ok else None,
                    "samples": e.samples, "raw": [{k: clean(v) for k, v in raw.items()} for raw in e.raw],
                    "final_lower_bound": clean(e.lower_bound) if e.lower_bound is not None and np.ndim(e.lower_bound) == 0 else None,
                    **({"final_inertia": e.final["inertia"]} if "inertia" in e.final else {}),
                }
                for e in r.entries
            ],
            "comparisons": comparison_rows(r, args.quick),
            "checks": r.checks,
        }
    return out


# --- main ---------------------------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS), help="benchmarks to run (default: all)")
    parser.add_argument("--reps", type=int, default=None, help="repetitions per contender (default 5; 3 with --quick)")
    parser.add_argument("--iters", type=int, default=None, help="n in (t(1+n) - t(1))/n for per-iteration benchmarks (default 10; 4 with --quick)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available; default)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: cores available)")
    parser.add_argument("--peers", nargs="*", default=["torchgmm", "pomegranate"], choices=["torchgmm", "pomegranate"],
                        help="peer libraries to try besides scikit-learn (default: both; pass --peers with nothing to skip)")
    parser.add_argument("--sklearn-subset", type=int, default=None, help="batched: problems fitted by scikit-learn per repetition (default 50)")
    parser.add_argument("--no-default-init", action="store_true", help="batched: skip the informational default-initialisation pair")
    parser.add_argument("--quick", action="store_true", help="shrunk sizes for a smoke test (< 1 minute)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default=None, help="result file name (default: <device>[-quick]-<timestamp>)")
    parser.add_argument("--out-dir", default=str(HERE / "results"), help="where <name>.md and <name>.json go")
    parser.add_argument("--quiet", action="store_true", help="no per-repetition log")
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda requested but torch.cuda.is_available() is False")
    if args.threads is None:
        args.threads = available_cores()
    if args.name is None:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        args.name = f"{args.device.replace(':', '')}{'-quick' if args.quick else ''}-{stamp}"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else Sizes()
    if args.reps is not None:
        sizes.reps = max(1, args.reps)
    if args.iters is not None:
        sizes.iters = max(1, args.iters)
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    env = environment(args)
    runners = {"full": bench_full, "diag": bench_diag, "batched": bench_batched, "kmeans": bench_kmeans}
    results = []
    for name in [b for b in BENCHMARKS if b in args.bench]:
        log(f"== {name}")
        t0 = time.perf_counter()
        results.append(runners[name](args, sizes, log))
        log(f"   {name} done in {time.perf_counter() - t0:.1f} s")
    env["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    env["torch_threads_end"] = torch.get_num_threads()
    report = markdown(results, env, args, sizes, started)
    print(report)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{args.name}.md").write_text(report + "\n")
    (out_dir / f"{args.name}.json").write_text(json.dumps(to_json(results, env, args, sizes), indent=2, default=str) + "\n")
    print(f"\nwritten: {out_dir / (args.name + '.md')} and .json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
