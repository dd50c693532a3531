"""Cost of EM as a differentiable layer: time of forward + backward and the memory the backward
pass keeps, per gradient mode and number of EM iterations.

Run:  python benchmarks/em_layer.py [--device cuda] [--reps 5] [--name NAME]

The workload is a batch of sets, as in set encoders and EM attention: B=256 sets of N=256
points, D=8 features, K=8 diagonal (or full) Gaussian components, float32. Per mode and n_iter:
the median wall time of ``em(...)`` plus ``backward()`` of a loss on the fitted means and the
responsibilities, and the bytes of tensors autograd saves for the backward pass (a
device-independent measure of the graph's memory; on CUDA also the peak allocated memory).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch_em  # noqa: E402
from torch_em.functional import ImplicitGradientWarning, em  # noqa: E402

MODES = ("unrolled", "last", "implicit", "none")
N_ITERS = (3, 10, 30, 100)


def problem(device: str, covariance_type: str, B: int = 256, N: int = 256, D: int = 8, K: int = 8):
    g = torch.Generator().manual_seed(0)
    centres = 3 * torch.randn(B, K, D, generator=g)
    labels = torch.randint(K, (B, N), generator=g)
    X = (centres.gather(1, labels.unsqueeze(-1).expand(B, N, D)) + torch.randn(B, N, D, generator=g)).to(device)
    family = torch_em.Gaussian(covariance_type, reg_covar=1e-4)
    init = {name: value.to(device) for name, value in family.default_parameters((), K, D, g, torch.device("cpu"), torch.float32).items()}
    init["logits"] = torch.zeros(K, device=device)
    # Per-set initial means near the set's centres (as an encoder's slots would be): EM then
    # converges to a stable fixed point, which the implicit gradient needs.
    init["loc"] = (centres + 0.5 * torch.randn(B, K, D, generator=g)).to(device)
    # X requires grad as the output of an encoder would; "last" and "implicit" differentiate only to X.
    return X.requires_grad_(), family, {name: value.requires_grad_() for name, value in init.items()}


def run_once(X, family, init, mode: str, n_iter: int) -> None:
    state = em(X, init, n_iter, family=family, gradient=mode, prior_count=1e-2)
    if mode != "none":
        (state.means.square().mean() + state.responsibilities[..., 0].mean()).backward()


def timed(X, family, init, mode: str, n_iter: int, reps: int) -> tuple[float, float | None]:
    cuda = X.device.type == "cuda"
    run_once(X, family, init, mode, n_iter)  # warm-up
    times, peak = [], None
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        run_once(X, family, init, mode, n_iter)
        if cuda:
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        times.append(time.perf_counter() - start)
    return statistics.median(times), peak


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--covariance-type", default="diag", choices=torch_em.families.COVARIANCE_TYPES)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--name", default=None)
    parser.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    X, family, init = problem(args.device, args.covariance_type)
    cuda = X.device.type == "cuda"
    lines = [
        f"# EM layer: B={X.shape[0]} sets, N={X.shape[1]}, D={X.shape[2]}, K={init['logits'].shape[0]}, "
        f"{args.covariance_type} covariance, float32, device {args.device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; median of {args.reps}",
        "",
        "| mode | n_iter | forward + backward | saved for backward" + (" | peak CUDA memory" if cuda else "") + " | note |",
        "| --- | --- | --- | ---" + (" | ---" if cuda else "") + " | --- |",
    ]
    for mode in MODES:
        for n_iter in N_ITERS:
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", ImplicitGradientWarning)
                    seconds, peak = timed(X, family, init, mode, n_iter, args.reps)
                    saved = torch_em.saved_tensor_bytes(lambda: run_once(X, family, init, mode, n_iter)) / 2**20
            except torch_em.IllConditionedError as err:
                lines.append(f"| {mode} | {n_iter} | failed: {str(err).split(';')[0]} | | " + ("| |" if cuda else "|"))
            else:
                note = "EM not converged: warned" if caught else ""
                row = f"| {mode} | {n_iter} | {seconds * 1e3:.1f} ms | {saved:.1f} MiB |"
                lines.append(row + (f" {peak:.1f} MiB |" if cuda else "") + f" {note} |")
            print(lines[-1], file=sys.stderr)
    report = "\n".join(lines) + "\n"
    print(report)
    if args.name:
        out = Path(args.out_dir) / f"{args.name}.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
