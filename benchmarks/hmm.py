"""Baum-Welch benchmarks: torch_em's hidden Markov models against hmmlearn and pomegranate.

Run from the repository root (all cases, CPU, threads pinned to 2)::

    python benchmarks/hmm.py
    python benchmarks/hmm.py --quick                          # smoke test, < 1 minute
    python benchmarks/hmm.py --output benchmarks/results/hmm-cpu.md
    python benchmarks/hmm.py --device cuda                    # torch_em on the GPU (peers stay on the CPU)

Cases (diagonal Gaussian emissions unless noted; data sampled from a known HMM, fixed seed):

(i)   50 sequences x T=1,000, K=8, D=4                        target >= 1.5x hmmlearn
(ii)  1 sequence x T=100,000, K=8, D=4                        target >= 1.3x
(iii) 10,000 sequences x T=50, K=4, D=2                       target >= 5x
(iv)  categorical, 200 sequences x T=500, K=16, 32 symbols    target >= 2.5x
(v)   1,000 independent HMMs, each 20 sequences x T=200, K=4, D=2, fitted to convergence;
      torch_em fits all of them as one ``batch_shape=(1000,)`` model, hmmlearn one by one
      (a subset, extrapolated linearly)                        target >= 50x

Methodology
-----------
* Same work on every side: every case carries fixed initial parameters (uniform start
  probabilities, a transition matrix with 0.5 on the diagonal, K distinct random data points as
  means and the data's variances for every state; categorical: a random emission matrix). hmmlearn
  gets them as ``startprob_`` / ``transmat_`` / ``means_`` / ``covars_`` (``emissionprob_``) with
  ``init_params=""``, torch_em as ``*_init`` (so no initialisation runs), pomegranate as
  initialised ``Normal`` / ``Categorical`` distributions with ``starts`` / ``edges``.
* Per-iteration time (i)-(iv): one fit of exactly n Baum-Welch iterations (``--iters n``) from
  those parameters, timed as a whole (construction plus ``fit``), divided by n; median over
  ``--reps`` repetitions. Convergence tests are off: hmmlearn ``tol=-inf``, torch_em ``tol=0``,
  pomegranate ``tol=-inf``; every fit checks that it ran n iterations.
* hmmlearn: ``implementation="scaling"`` (its fastest), ``covars_prior=0`` so that its M-step is
  the maximum-likelihood one (its default ``1e-2`` is a prior); torch_em ``reg_covar=1e-6``.
  From identical starts both run the same EM: a ``check`` line compares the log-likelihood
  (``score``) of the data under both final models.
* pomegranate 1.x ``DenseHMM`` also learns end probabilities (hmmlearn and torch_em have none),
  runs in float32 (its default) and gets the same start; its log-likelihood is not compared.
* (v): whole fits to convergence, from per-model fixed starts, ``max_iter=200``. torch_em stops a
  model when its mean log-likelihood per time step improves by less than ``tol=1e-4``; hmmlearn's
  ``tol`` is on the total log-likelihood, so it gets ``tol = 1e-4 * 20 * 200 = 0.4`` (the same
  criterion). hmmlearn fits ``--subset`` models (default 50, a different block per repetition)
  one after the other and its time is multiplied by 1,000 / subset: a linear extrapolation.
  pomegranate is skipped in (v).
* Warm-up: every contender runs once before timing ((v): a fit of the first 10 models, hmmlearn
  one); contenders are interleaved within every repetition, in rotating order, so background load
  hits all of them alike. Python's garbage collector is paused during a timed fit; CUDA is
  synchronised before and after. (v) has its own repetition count (``--batched-reps``, default 3).
* Threads: OMP/MKL/OPENBLAS set to 2 (``--threads``) before numpy is imported,
  ``torch.set_num_threads(2)`` (torch_em and pomegranate, which is torch-based). hmmlearn's
  recursions are single-threaded C++. On a machine shared with other work, two torch threads on
  two busy cores lose more to waiting for each other than they gain: the header records the load.
* float32 accuracy: one sequence of T=100,000, K=8: ``|LL_f32 - LL_f64| / |LL_f64|`` of ``score``
  for the same parameters held in float32 and in float64.
"""
from __future__ import annotations

import os
import sys


def threads_argument(argv: list[str], default: int = 2) -> int:
    """``--threads N`` of the command line, read before numpy is imported (BLAS reads the
    environment once, at import); the full parser validates it again."""
    for i, arg in enumerate(argv):
        value = arg.split("=", 1)[1] if arg.startswith("--threads=") else (argv[i + 1] if arg == "--threads" and i + 1 < len(argv) else None)
        if value is not None and value.isdigit() and int(value) > 0:
            return int(value)
    return default


THREADS = threads_argument(sys.argv[1:])
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = str(THREADS)  # before numpy is imported

import argparse  # noqa: E402
import copy  # noqa: E402
import gc  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass, field, replace  # noqa: E402
from datetime import datetime  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

SEED = 0
TOL_PER_STEP = 1e-4  # (v): convergence threshold on the mean log-likelihood per time step
MAX_ITER = 200  # (v)
WARM_UP_MODELS = 10  # (v): the untimed warm-up fits this many of the models


# --- cases ----------------------------------------------------------------------------------------
@dataclass
class Case:
    """One workload: S sequences of length T, K states, D features (categorical: D symbols), and
    B independent models (B=0: one model)."""

    name: str
    S: int
    T: int
    K: int
    D: int
    target: float
    categorical: bool = False
    B: int = 0

    @property
    def description(self) -> str:
        data = f"{self.S:,} x T={self.T:,}, K={self.K}, " + (f"{self.D} symbols" if self.categorical else f"D={self.D}")
        if self.categorical:
            data = "categorical, " + data
        return f"{self.B:,} HMMs, each {data}, to convergence" if self.B else data


CASES = [
    Case("(i)", S=50, T=1_000, K=8, D=4, target=1.5),
    Case("(ii)", S=1, T=100_000, K=8, D=4, target=1.3),
    Case("(iii)", S=10_000, T=50, K=4, D=2, target=5.0),
    Case("(iv)", S=200, T=500, K=16, D=32, target=2.5, categorical=True),
    Case("(v)", S=20, T=200, K=4, D=2, target=50.0, B=1_000),
]
QUICK_CASES = [replace(case, **smaller) for case, smaller in
               zip(CASES, [dict(S=10, T=500), dict(T=10_000), dict(S=1_000), dict(S=40, T=250), dict(B=100)])]
ACCURACY = dict(T=100_000, K=8, D=4, iters=10)


# --- data -----------------------------------------------------------------------------------------
def sticky_transmat(rng: np.random.Generator, batch: tuple, K: int, stay: float) -> np.ndarray:
    """Transition matrices (*batch, K, K): ``stay`` on the diagonal plus random off-diagonal mass."""
    off = rng.dirichlet(np.ones(K), size=batch + (K,))  # (*batch, K, K)
    return stay * np.eye(K) + (1.0 - stay) * off


def true_hmm(rng: np.random.Generator, case: Case) -> dict:
    """Parameters of the generating HMM, with a leading model axis (B or 1)."""
    batch, K, D = (max(case.B, 1),), case.K, case.D
    params = dict(startprob=rng.dirichlet(np.ones(K), size=batch), transmat=sticky_transmat(rng, batch, K, 0.9))
    if case.categorical:
        params["emissionprob"] = rng.dirichlet(np.full(D, 0.3), size=batch + (K,))  # (B, K, D)
    else:
        params["means"] = rng.normal(scale=2.0, size=batch + (K, D))
        params["variances"] = rng.uniform(0.5, 2.0, size=batch + (K, D))
    return params


def categorical_draw(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """One category per row of ``probs`` (..., K) by inverse CDF: (...) int64."""
    u = rng.random(probs.shape[:-1] + (1,))
    return np.minimum((u > np.cumsum(probs, -1)).sum(-1), probs.shape[-1] - 1)


def sample(rng: np.random.Generator, params: dict, S: int, T: int) -> tuple[np.ndarray, np.ndarray]:
    """S sequences of length T from every model of ``params`` (leading axis B):
    X (B, S, T, D) float64 or codes (B, S, T) int64, and the states (B, S, T)."""
    startprob, transmat = params["startprob"], params["transmat"]
    B = startprob.shape[0]
    models = np.arange(B)[:, None]  # (B, 1)
    states = np.empty((B, S, T), dtype=np.int64)
    states[:, :, 0] = categorical_draw(rng, np.broadcast_to(startprob[:, None, :], (B, S, startprob.shape[-1])))
    for t in range(1, T):
        states[:, :, t] = categorical_draw(rng, transmat[models, states[:, :, t - 1]])  # rows (B, S, K)
    index = (np.arange(B)[:, None, None], states)
    if "emissionprob" in params:
        return categorical_draw(rng, params["emissionprob"][index]), states
    means, scales = params["means"][index], np.sqrt(params["variances"][index])  # (B, S, T, D)
    return means + scales * rng.standard_normal(means.shape), states


def initial_parameters(rng: np.random.Generator, X: np.ndarray, case: Case) -> dict:
    """The fixed start of every contender, per model (leading axis B): uniform start
    probabilities, 0.5 on the transition diagonal, K distinct random data points as means and the
    data's variances for every state (categorical: a random emission matrix)."""
    B, K = X.shape[0], case.K
    off = (1.0 - 0.5) / (K - 1)
    init = dict(startprob=np.full((B, K), 1.0 / K), transmat=np.broadcast_to(np.full((K, K), off) + (0.5 - off) * np.eye(K), (B, K, K)).copy())
    if case.categorical:
        init["emissionprob"] = rng.dirichlet(np.full(case.D, 5.0), size=(B, K))
        return init
    points = X.reshape(B, -1, case.D)  # (B, S*T, D)
    chosen = np.stack([rng.choice(points.shape[1], size=K, replace=False) for _ in range(B)])  # (B, K)
    init["means"] = np.take_along_axis(points, chosen[:, :, None], 1)  # (B, K, D)
    init["variances"] = np.broadcast_to(points.var(1)[:, None, :], (B, K, case.D)).copy()
    return init


@dataclass
class Problem:
    """Data with a leading model axis: X (B, S, T, D) or codes (B, S, T); init as above."""

    case: Case
    X: np.ndarray
    init: dict

    def model(self, b: int) -> tuple[np.ndarray, dict]:
        """Data and start of model b: X (S, T, D) or (S, T), parameters without the model axis."""
        return self.X[b], {name: value[b] for name, value in self.init.items()}


def make_problem(case: Case, seed: int) -> Problem:
    rng = np.random.default_rng(seed)
    X, _ = sample(rng, true_hmm(rng, case), case.S, case.T)
    return Problem(case, X, initial_parameters(rng, X, case))


# --- contenders -----------------------------------------------------------------------------------
class Unavailable(Exception):
    """A peer that is not installed."""


def concatenated(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """hmmlearn's format: (S, T, D) or codes (S, T) -> (S*T, D) or (S*T, 1), lengths (S,)."""
    S, T = X.shape[:2]
    return X.reshape(S * T, -1), np.full(S, T)


def hmmlearn_model(X: np.ndarray, init: dict, n_iter: int, tol: float):
    """An hmmlearn model holding ``init`` (no initialisation of its own, scaling implementation,
    maximum-likelihood M-step) and the data in its concatenated format."""
    try:
        from hmmlearn import hmm
    except ImportError as error:
        raise Unavailable("pip install hmmlearn") from error
    logging.getLogger("hmmlearn").setLevel(logging.ERROR)  # "not converging" reports of tiny decreases
    K = init["startprob"].shape[-1]
    options = dict(n_iter=n_iter, tol=tol, init_params="", implementation="scaling")
    if "emissionprob" in init:
        model = hmm.CategoricalHMM(K, n_features=init["emissionprob"].shape[-1], params="ste", **options)
        model.emissionprob_ = init["emissionprob"].copy()
    else:
        model = hmm.GaussianHMM(K, covariance_type="diag", covars_prior=0.0, params="stmc", **options)
        model.means_, model.covars_ = init["means"].copy(), init["variances"].copy()
    model.startprob_, model.transmat_ = init["startprob"].copy(), init["transmat"].copy()
    return model, concatenated(X)


def pomegranate_model(X: np.ndarray, init: dict, n_iter: int):
    """A pomegranate ``DenseHMM`` holding ``init`` (float32, its default) and the data (S, T, 1 or D)."""
    try:
        from pomegranate.distributions import Categorical, Normal
        from pomegranate.hmm import DenseHMM
    except ImportError as error:
        raise Unavailable("pip install pomegranate") from error
    f32 = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
    K = init["startprob"].shape[-1]
    if "emissionprob" in init:
        distributions = [Categorical(f32(init["emissionprob"][k][None, :])) for k in range(K)]
        data = torch.as_tensor(X[..., None], dtype=torch.int64)  # (S, T, 1)
    else:
        distributions = [Normal(f32(init["means"][k]), f32(init["variances"][k]), covariance_type="diag") for k in range(K)]
        data = f32(X)  # (S, T, D)
    ends = f32(np.full(K, 1e-3))  # pomegranate learns end probabilities too; a small start
    model = DenseHMM(distributions, edges=f32(init["transmat"]), starts=f32(init["startprob"]), ends=ends,
                     max_iter=n_iter, tol=1e-12)  # its smallest: tol must be > 0
    return model, data


def torch_em_model(init: dict, dtype: torch.dtype, device: str, **options):
    """A torch_em HMM holding ``init`` (every ``*_init`` given: no initialisation runs)."""
    import torch_em

    as_t = lambda a: torch.as_tensor(np.asarray(a), dtype=dtype, device=device)  # noqa: E731
    start, trans = as_t(init["startprob"]), as_t(init["transmat"])
    batch_shape = tuple(start.shape[:-1])
    K = start.shape[-1]
    common = dict(startprob_init=start, transmat_init=trans, batch_shape=batch_shape, dtype=dtype, device=device, **options)
    if "emissionprob" in init:
        return torch_em.CategoricalHMM(K, n_features=init["emissionprob"].shape[-1], emissionprob_init=as_t(init["emissionprob"]),
                                       **common)
    return torch_em.GaussianHMM(K, covariance_type="diag", reg_covar=1e-6, means_init=as_t(init["means"]),
                                precisions_init=1.0 / as_t(init["variances"]), **common)


def torch_em_data(X: np.ndarray, dtype: torch.dtype, device: str) -> torch.Tensor:
    """Padded sequences (.., S, T, D) in ``dtype``, or codes (.., S, T) as int64, on ``device``."""
    if np.issubdtype(X.dtype, np.integer):
        return torch.as_tensor(X, dtype=torch.int64, device=device)
    return torch.as_tensor(X, dtype=dtype, device=device)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def timed(fit: Callable[[], object], device: str = "cpu") -> float:
    """Seconds of ``fit()`` with Python's garbage collector off (collected just before)."""
    gc.collect()
    sync(device)
    gc.disable()
    try:
        start = time.perf_counter()
        fit()
        sync(device)
        return time.perf_counter() - start
    finally:
        gc.enable()


@dataclass
class Contender:
    """One library (and dtype) on one case: ``run(rep)`` performs one timed fit and returns its
    seconds; ``score()`` the log-likelihood of the data under the last fitted model (or None)."""

    key: str
    run: Callable[[int], float]
    score: Callable[[], float | None] = lambda: None
    note: str = ""
    warm_up: Callable[[], object] | None = None  # untimed first run; default: run(0)
    samples: list[float] = field(default_factory=list)
    status: str = "ok"

    @property
    def ok(self) -> bool:
        return self.status == "ok" and bool(self.samples)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)


def check_iterations(library: str, ran: int, n_iter: int) -> None:
    if ran != n_iter:
        raise RuntimeError(f"{library} ran {ran} iterations instead of {n_iter}")


def per_iteration_contenders(problem: Problem, n_iter: int, device: str, peers: list[str]) -> list[Contender]:
    """(i)-(iv): each contender's ``run`` fits exactly ``n_iter`` iterations and returns s/iteration."""
    X, init = problem.model(0)
    contenders = []

    def hmmlearn_contender() -> Contender:
        last = {}

        def run(rep: int) -> float:
            def fit():
                model, (data, lengths) = hmmlearn_model(X, init, n_iter, tol=-math.inf)
                last.update(model=model.fit(data, lengths), data=data, lengths=lengths)
            seconds = timed(fit)
            check_iterations("hmmlearn", last["model"].monitor_.iter, n_iter)
            return seconds / n_iter
        return Contender("hmmlearn", run, lambda: float(last["model"].score(last["data"], last["lengths"])),
                         note='float64, implementation="scaling"')

    def pomegranate_contender() -> Contender:
        def run(rep: int) -> float:
            model, data = pomegranate_model(X, init, n_iter)
            steps = count_calls(model, "from_summaries")
            seconds = timed(lambda: model.fit(data))
            check_iterations("pomegranate", steps[0], n_iter)
            return seconds / n_iter
        return Contender("pomegranate", run, note="float32, DenseHMM")

    def torch_em_contender(dtype: torch.dtype) -> Contender:
        data = torch_em_data(X, dtype, device)
        last = {}

        def run(rep: int) -> float:
            def fit():
                last["model"] = torch_em_model(init, dtype, device, max_iter=n_iter, tol=0.0).fit(data)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "did not converge" after n iterations
                seconds = timed(fit, device)
            check_iterations("torch_em", int(last["model"].n_iter_), n_iter)
            return seconds / n_iter
        score = lambda: float(last["model"].score(data))  # noqa: E731
        return Contender(f"torch_em {'f64' if dtype == torch.float64 else 'f32'}", run, score, note=device)

    contenders.append(guarded("hmmlearn", hmmlearn_contender))
    if "pomegranate" in peers:
        contenders.append(guarded("pomegranate", pomegranate_contender))
    contenders += [guarded("torch_em f64", lambda: torch_em_contender(torch.float64)),
                   guarded("torch_em f32", lambda: torch_em_contender(torch.float32))]
    return contenders


def count_calls(obj, method: str) -> list[int]:
    """Wrap ``obj.method`` so that its calls are counted in the returned one-element list."""
    counter = [0]
    original = getattr(obj, method)

    def counted(*args, **kwargs):
        counter[0] += 1
        return original(*args, **kwargs)
    setattr(obj, method, counted)
    return counter


def guarded(key: str, make: Callable[[], Contender]) -> Contender:
    """``make()``, or a contender marked unavailable / failed when preparing it raises."""
    try:
        return make()
    except Unavailable as error:
        return Contender(key, lambda rep: math.nan, status=f"unavailable ({error})")
    except Exception as error:
        return Contender(key, lambda rep: math.nan, status=f"failed ({type(error).__name__}: {error})")


def batched_contenders(problem: Problem, subset: int, device: str) -> list[Contender]:
    """(v): whole fits to convergence; ``run`` returns the seconds for all B models (hmmlearn: a
    block of ``subset`` models, a different one per repetition, times B / subset)."""
    case = problem.case
    B = case.B
    hmmlearn_tol = TOL_PER_STEP * case.S * case.T  # the same criterion on the total log-likelihood
    iterations: dict[str, dict[int, int]] = {"hmmlearn": {}, "torch_em f64": {}, "torch_em f32": {}}

    def hmmlearn_fits(block: list[int]) -> list:
        """hmmlearn models of ``block`` with their data, ready to fit."""
        models = []
        for b in block:
            X, init = problem.model(b)
            models.append((b, *hmmlearn_model(X, init, MAX_ITER, tol=hmmlearn_tol)))
        return models

    def hmmlearn_warm_up() -> None:
        for _, model, (data, lengths) in hmmlearn_fits([0]):
            model.fit(data, lengths)

    def hmmlearn_run(rep: int) -> float:
        models = hmmlearn_fits([(rep * subset + i) % B for i in range(subset)])

        def fit():
            for _, model, (data, lengths) in models:
                model.fit(data, lengths)
        seconds = timed(fit)
        iterations["hmmlearn"] = {b: model.monitor_.iter for b, model, _ in models}
        return seconds * B / subset

    def torch_em_contender(dtype: torch.dtype) -> Contender:
        key = f"torch_em {'f64' if dtype == torch.float64 else 'f32'}"
        data = torch_em_data(problem.X, dtype, device)  # (B, S, T, D): one set per model

        def run(rep: int) -> float:
            last = {}

            def fit():
                last["model"] = torch_em_model(problem.init, dtype, device, max_iter=MAX_ITER, tol=TOL_PER_STEP).fit(data)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                seconds = timed(fit, device)
            iterations[key] = dict(enumerate(last["model"].n_iter_.reshape(-1).tolist()))
            return seconds
        def warm_up() -> None:  # the code paths of a batched fit, on a few of the models
            few = {name: value[:WARM_UP_MODELS] for name, value in problem.init.items()}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch_em_model(few, dtype, device, max_iter=MAX_ITER, tol=TOL_PER_STEP).fit(data[:WARM_UP_MODELS])
        return Contender(key, run, note=f"all {B:,} in one call, {device}", warm_up=warm_up)

    contenders = [
        guarded("hmmlearn", lambda: Contender("hmmlearn", hmmlearn_run, warm_up=hmmlearn_warm_up,
                                              note=f"one by one, {subset} timed, x{B / subset:g} extrapolated")),
        guarded("torch_em f64", lambda: torch_em_contender(torch.float64)),
        guarded("torch_em f32", lambda: torch_em_contender(torch.float32)),
    ]
    for contender in contenders:
        contender.iterations = iterations  # read by the report
    return contenders


def measure(contenders: list[Contender], reps: int, log: Callable[[str], None], label: str) -> None:
    """Warm every contender up once (untimed), then ``reps`` repetitions in rotating order. A
    contender that raises is marked failed and left out from then on."""
    live = [c for c in contenders if c.status == "ok"]
    for rep in range(-1, reps):  # rep -1: warm-up
        order = live[rep % len(live):] + live[: rep % len(live)] if live and rep >= 0 else live
        for contender in order:
            if contender.status != "ok":
                continue
            try:
                if rep < 0 and contender.warm_up is not None:
                    contender.warm_up()
                    log(f"  {label} warm-up {contender.key}: done")
                    continue
                value = contender.run(max(rep, 0))
            except Exception as error:  # a failing peer is reported, the run goes on
                contender.status = f"failed ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"[:300]
                log(f"  {label} {contender.key}: {contender.status}")
                continue
            if rep >= 0:
                contender.samples.append(value)
            log(f"  {label} {'warm-up' if rep < 0 else f'rep {rep + 1}/{reps}'} {contender.key}: {value * 1e3:.2f} ms")


# --- float32 accuracy ----------------------------------------------------------------------------
def float32_accuracy(seed: int, T: int, K: int, D: int, iters: int, device: str) -> dict:
    """|LL_f32 - LL_f64| / |LL_f64| of ``score`` on one sequence of length T: the parameters of a
    float64 fit (``iters`` iterations from the fixed start), evaluated in float64 and, rounded to
    float32, in float32 (the float64 reference evaluates exactly the float32-rounded parameters)."""
    case = Case("accuracy", S=1, T=T, K=K, D=D, target=0.0)
    problem = make_problem(case, seed)
    X, init = problem.model(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fitted = torch_em_model(init, torch.float64, device, max_iter=iters, tol=0.0).fit(torch_em_data(X, torch.float64, device))
    single = copy.deepcopy(fitted).float()
    double = copy.deepcopy(single).double()  # the float32-rounded parameters, in float64
    ll32 = float(single.score(torch_em_data(X, torch.float32, device)))
    ll64 = float(double.score(torch_em_data(X.astype(np.float32).astype(np.float64), torch.float64, device)))
    return dict(T=T, K=K, D=D, ll32=ll32, ll64=ll64, relative=abs(ll32 - ll64) / abs(ll64))


# --- report ---------------------------------------------------------------------------------------
def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    parts = [f"torch {torch.__version__}", f"numpy {np.__version__}"]
    for name in ("hmmlearn", "pomegranate"):
        try:
            parts.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            parts.append(f"{name} not installed")
    return ", ".join(parts)


def cell(contender: Contender | None, batched: bool) -> str:
    if contender is None:
        return "skipped"
    if not contender.ok:
        return contender.status
    if batched:
        return f"{contender.median:.3g} s" + (f" [{min(contender.samples):.3g}]" if len(contender.samples) > 1 else "")
    return f"{contender.median * 1e3:.3g} [{min(contender.samples) * 1e3:.3g}]"


def speedups(by_key: dict[str, Contender]) -> tuple[str, float | None]:
    """'f64 / f32' speed-ups over hmmlearn (its time / torch_em's) and the f64 one."""
    peer = by_key.get("hmmlearn")
    if not (peer and peer.ok):
        return "-", None
    ratios = {key: peer.median / c.median for key in ("torch_em f64", "torch_em f32")
              if (c := by_key.get(key)) and c.ok and c.median > 0}
    text = " / ".join(f"{ratios[key]:.1f}x" if key in ratios else "-" for key in ("torch_em f64", "torch_em f32"))
    return text, ratios.get("torch_em f64")


def likelihood_check(case: Case, by_key: dict[str, Contender], n_iter: int) -> str:
    """The data's log-likelihood under hmmlearn's and torch_em float64's final models."""
    try:
        ours, theirs = by_key["torch_em f64"].score(), by_key["hmmlearn"].score()
    except Exception as error:
        return f"{case.name}: log-likelihoods not compared ({type(error).__name__}: {error})"
    return (f"{case.name}: same start, {n_iter} iterations: log-likelihood torch_em f64 {ours:.10g}, hmmlearn {theirs:.10g} "
            f"(relative difference {abs(ours - theirs) / abs(theirs):.1e})")


def iterations_check(case: Case, contenders: list[Contender]) -> str:
    """(v): EM iterations to convergence, hmmlearn vs torch_em on hmmlearn's last subset."""
    iterations = getattr(contenders[0], "iterations", {})
    theirs = iterations.get("hmmlearn", {})
    if not theirs:
        return f"{case.name}: iteration counts not compared (hmmlearn did not run)"
    parts = [f"hmmlearn mean {np.mean(list(theirs.values())):.1f} iterations on its last {len(theirs)} models"]
    for key in ("torch_em f64", "torch_em f32"):
        ours = iterations.get(key, {})
        if ours:
            same = sum(ours[b] == n for b, n in theirs.items())
            parts.append(f"{key} mean {np.mean([ours[b] for b in theirs]):.1f} on them ({same}/{len(theirs)} identical counts), "
                         f"{np.mean(list(ours.values())):.1f} over all {len(ours):,} (at most {max(ours.values())})")
    return f"{case.name}: " + "; ".join(parts)


def report(results: list[tuple[Case, list[Contender], str]], accuracy: dict | None, args, load: tuple) -> str:
    lines = [f"# torch_em HMM benchmarks{' (--quick: sizes shrunk, targets not assessed)' if args.quick else ''}", "",
             f"`python benchmarks/hmm.py {' '.join(sys.argv[1:])}`".replace(" `", "`"), "",
             f"{datetime.now():%Y-%m-%d %H:%M}, torch_em on `{args.device}`, peers on the CPU; "
             f"torch.set_num_threads({torch.get_num_threads()}), OMP/MKL/OPENBLAS_NUM_THREADS={THREADS}; {versions()}; "
             f"median of {args.reps} repetitions ((v): {args.batched_reps}) after a warm-up; 1-minute load average {load[0]:.2f} at start, "
             f"{load[1]:.2f} at end" + (" (above 1 on 2 cores: other work shared the machine, numbers indicative)." if max(load) > 1 else "."),
             "",
             "Time per Baum-Welch iteration in ms (a fit of exactly "
             f"{args.iters} iterations from fixed initial parameters, divided by {args.iters}): median [fastest "
             "repetition]; (v): seconds to fit all models to convergence. Speed-ups are ratios of medians.", "",
             "| case | data | hmmlearn ms/iter | pomegranate ms/iter | torch_em f64 ms/iter | torch_em f32 ms/iter | "
             "speed-up vs hmmlearn (f64 / f32) | target (f64) | met |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    checks = []
    for case, contenders, check in results:
        by_key = {c.key: c for c in contenders}
        batched = bool(case.B)
        text, ratio = speedups(by_key)
        met = "n/a (quick)" if args.quick else ("?" if ratio is None else ("yes" if ratio >= case.target else "**no**"))
        lines.append(f"| {case.name} | {case.description} | {cell(by_key.get('hmmlearn'), batched)} | "
                     f"{cell(by_key.get('pomegranate'), batched)} | {cell(by_key.get('torch_em f64'), batched)} | "
                     f"{cell(by_key.get('torch_em f32'), batched)} | {text} | >= {case.target:g}x | {met} |")
        checks.append(check)
    batched_case = next((case for case, _, _ in results if case.B), None)
    if batched_case:
        lines += ["", f"(v): the warm-up fits {WARM_UP_MODELS} of the models (hmmlearn: 1); hmmlearn fits {args.subset} of the {batched_case.B:,} models one by one per repetition (a "
                      f"different block each time), its time x{batched_case.B / args.subset:g} (linear extrapolation); "
                      f"torch_em fits all {batched_case.B:,} as one `batch_shape=({batched_case.B},)` model with data "
                      f"({batched_case.B}, {batched_case.S}, {batched_case.T}, {batched_case.D}). Convergence: torch_em "
                      f"`tol={TOL_PER_STEP:g}` on the mean log-likelihood per time step, hmmlearn "
                      f"`tol={TOL_PER_STEP * batched_case.S * batched_case.T:g}` on the total (the same criterion), "
                      f"both `max_iter={MAX_ITER}`; pomegranate skipped."]
    lines += ["", "hmmlearn: float64, `implementation=\"scaling\"`, `covars_prior=0`; pomegranate: `DenseHMM`, float32, "
                  "also learns end probabilities; torch_em `reg_covar=1e-6`. Contenders interleaved in rotating order."]
    lines += [""] + [f"- check: {c}" for c in checks]
    if accuracy:
        lines += ["", "## float32 accuracy", "",
                  "| data | LL f64 | LL f32 | abs(LL_f32 - LL_f64) / abs(LL_f64) |", "| --- | ---: | ---: | ---: |",
                  f"| one sequence, T={accuracy['T']:,}, K={accuracy['K']}, D={accuracy['D']} | {accuracy['ll64']:.10g} | "
                  f"{accuracy['ll32']:.10g} | {accuracy['relative']:.1e} |", "",
                  f"Parameters of a float64 fit ({ACCURACY['iters']} iterations), rounded to float32; the float64 "
                  "score evaluates exactly those rounded parameters and the float32-rounded data."]
    return "\n".join(lines) + "\n"


# --- main -----------------------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shrunk sizes, 1 repetition, 2 iterations (< 1 minute)")
    parser.add_argument("--reps", type=int, default=None, help="repetitions per contender (default 5, --quick 1)")
    parser.add_argument("--iters", type=int, default=None, help="Baum-Welch iterations per timed fit (default 5, --quick 2)")
    parser.add_argument("--subset", type=int, default=None, help="(v): models hmmlearn fits per repetition (default 50, --quick 5)")
    parser.add_argument("--batched-reps", type=int, default=None, help="(v): repetitions (default 3, --quick 1)")
    parser.add_argument("--threads", type=int, default=2, help="torch and BLAS threads (default 2)")
    parser.add_argument("--cases", nargs="+", default=None, help="which cases, e.g. i iv (default all)")
    parser.add_argument("--peers", nargs="*", default=["pomegranate"], choices=["pomegranate"],
                        help="peers besides hmmlearn (pass --peers with nothing to skip pomegranate)")
    parser.add_argument("--device", default="cpu", help="device of torch_em (peers always on the CPU)")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--output", default=None, help="also write the table to this file")
    parser.add_argument("--quiet", action="store_true", help="no per-repetition log on stderr")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda requested but torch.cuda.is_available() is False")
    args.reps = max(1, args.reps or (1 if args.quick else 5))
    args.iters = max(1, args.iters or (2 if args.quick else 5))
    args.subset = max(1, args.subset or (5 if args.quick else 50))
    args.batched_reps = max(1, args.batched_reps or (1 if args.quick else 3))
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(THREADS)
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    load_start = os.getloadavg()[0]
    wanted = {f"({c.strip('()')})" for c in args.cases} if args.cases else None
    results = []
    for index, case in enumerate(QUICK_CASES if args.quick else CASES):
        if wanted and case.name not in wanted:
            continue
        log(f"== {case.name} {case.description}")
        problem = make_problem(case, args.seed + index)
        if case.B:
            args.subset = min(args.subset, case.B)
            contenders = batched_contenders(problem, args.subset, args.device)
            measure(contenders, args.batched_reps, log, case.name)
            check = iterations_check(case, contenders)
        else:
            contenders = per_iteration_contenders(problem, args.iters, args.device, args.peers)
            measure(contenders, args.reps, log, case.name)
            check = likelihood_check(case, {c.key: c for c in contenders}, args.iters)
        torch.set_num_threads(THREADS)  # in case a peer changed it
        results.append((case, contenders, check))
    accuracy = None
    try:
        size = dict(ACCURACY, T=10_000) if args.quick else ACCURACY
        accuracy = float32_accuracy(args.seed + 10, size["T"], size["K"], size["D"], size["iters"], args.device)
    except Exception as error:
        log(f"float32 accuracy failed: {type(error).__name__}: {error}")
    text = report(results, accuracy, args, (load_start, os.getloadavg()[0]))
    print(text)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text)
        log(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
