"""The command line: ``torch-em`` (console script) or ``python -m torch_em``.

    torch-em fit DATA [--components 1..10] [--covariance full,diag] [--criterion bic|aic|icl]
                      [--n-init 1] [--seed 0] [--device cpu|cuda] [--dtype float64] [--out model.pt]
                      [--plot bic.png] [--verbose]
    torch-em predict MODEL DATA [--out labels.npy]      one component per row
    torch-em score MODEL DATA                           mean log-likelihood per row

DATA is a CSV file (a header row of column names is allowed; every column must be numeric), an
``.npy`` array, or a Parquet file when pyarrow is installed. ``fit`` fits a GaussianMixture for
every number of components and covariance type of the grid (:func:`torch_em.select`: one batched
fit per covariance type), prints the table of BIC, AIC, ICL, log-likelihood and convergence,
saves the model of the lowest criterion with :func:`torch_em.load`'s format (``model.save``)
and, with ``--plot FILE.png``, a plot of the criterion against K.
"""
from __future__ import annotations

import argparse
import csv
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .em import ConvergenceWarning
from .families.base import IllConditionedError
from .selection import select
from .serialization import load


def read_data(path: str) -> np.ndarray:
    """The rows (N, D) of a CSV, ``.npy`` or Parquet file, or ValueError saying what is wrong."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"DATA: no such file {path!r}")
    suffix = file.suffix.lower()
    if suffix == ".npy":
        try:
            array = np.load(file, allow_pickle=False)
        except ValueError as error:
            raise ValueError(f"DATA: {path!r} is not a readable .npy array ({error})") from None
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet as parquet
        except ImportError:
            raise ValueError("DATA: reading Parquet needs pyarrow (pip install pyarrow)") from None
        array = parquet.read_table(file).to_pandas().to_numpy()
    else:
        array = _read_csv(file)
    array = np.asarray(array)
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2 or array.shape[0] == 0:
        raise ValueError(f"DATA: expected rows of features (N, D), got shape {array.shape} from {path!r}")
    if not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"DATA: every column must be numeric, got dtype {array.dtype} from {path!r}")
    return array.astype(np.float64)


def _read_csv(file: Path) -> np.ndarray:
    with file.open(newline="") as handle:
        rows = [row for row in csv.reader(handle) if row]
    if not rows:
        raise ValueError(f"DATA: {str(file)!r} is empty")
    header = rows[0]
    named = not all(_is_number(cell) for cell in header)  # a first row of column names
    values = []
    for line, row in enumerate(rows[1:] if named else rows, start=2 if named else 1):
        if len(row) != len(header):
            raise ValueError(f"DATA: line {line} of {str(file)!r} has {len(row)} values, the first has {len(header)}")
        bad = [(column, cell) for column, cell in enumerate(row) if not _is_number(cell)]
        if bad:
            column, cell = bad[0]
            name = f"column {header[column]!r}" if named else f"column {column}"
            raise ValueError(f"DATA: {name} of {str(file)!r} is not numeric (line {line}: {cell!r})")
        values.append([float(cell) for cell in row])
    return np.array(values, dtype=np.float64)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _components(text: str) -> list[int]:
    """``"3"``, ``"1..10"`` or ``"2,4,8"`` as a list of positive integers."""
    try:
        if ".." in text:
            first, last = (int(part) for part in text.split(".."))
            values = list(range(first, last + 1))
        else:
            values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, a range like 1..10 or a list like 2,4,8, got {text!r}")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"numbers of components must be positive, got {text!r}")
    return values


def fit(args: argparse.Namespace) -> int:
    X = torch.as_tensor(read_data(args.data), dtype=getattr(torch, args.dtype), device=args.device)
    components = [k for k in args.components if k <= X.shape[0]]
    if not components:
        raise ValueError(f"DATA: {X.shape[0]} rows are fewer than every number of components asked for")
    try:
        kinds = args.covariance.split(",")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            result = select(X, components, kinds, n_init=args.n_init, criterion=args.criterion, seed=args.seed,
                            device=args.device, dtype=X.dtype, verbose=args.verbose)
    except IllConditionedError as error:
        raise ValueError(f"DATA: {error}") from None
    best, columns = result.best_, result.table.columns
    print(f"{'covariance':>10} {'K':>3} {'BIC':>14} {'AIC':>14} {'ICL':>14} {'log-lik/row':>12} converged")
    for i in range(len(result.table)):
        kind, k = columns["covariance_type"][i], columns["n_components"][i]
        chosen = " <- best" if (kind, k) == (best.covariance_type, best.n_components) else ""
        print(f"{kind:>10} {k:>3} {columns['bic'][i]:>14.2f} {columns['aic'][i]:>14.2f} {columns['icl'][i]:>14.2f} "
              f"{columns['log_likelihood'][i] / X.shape[0]:>12.4f} {columns['converged'][i]!s:>9}{chosen}")
    best.save(args.out)
    print(f"saved the {best.covariance_type} model with K={best.n_components} ({args.criterion}) to {args.out}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        axes = result.plot()
        axes.figure.tight_layout()
        axes.figure.savefig(args.plot, dpi=120)
        print(f"saved the {args.criterion.upper()} plot to {args.plot}")
    return 0


def predict(args: argparse.Namespace) -> int:
    model: Any = load(args.model)  # a saved model: predict, dtype and device
    X = torch.as_tensor(read_data(args.data), dtype=model.dtype, device=model.device)
    labels = model.predict(X).cpu().numpy()
    if args.out:
        np.save(args.out, labels)
        print(f"saved {len(labels)} labels to {args.out}")
    else:
        print("\n".join(map(str, labels.tolist())))
    return 0


def score(args: argparse.Namespace) -> int:
    model: Any = load(args.model)  # a saved model: score, dtype and device
    X = torch.as_tensor(read_data(args.data), dtype=model.dtype, device=model.device)
    print(f"{float(model.score(X)):.6f}")
    return 0


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(prog="torch-em", description="Fit, apply and score Gaussian mixtures.")
    commands = main.add_subparsers(dest="command", required=True)
    fitting = commands.add_parser("fit", help="fit a grid of Gaussian mixtures and save the best")
    fitting.add_argument("data", help="CSV, .npy or Parquet file of rows")
    fitting.add_argument("--components", type=_components, default=list(range(1, 11)), help="e.g. 3, 1..10 or 2,4,8")
    fitting.add_argument("--covariance", default="full", help="covariance types, comma separated (full,tied,diag,spherical)")
    fitting.add_argument("--criterion", choices=("bic", "aic", "icl"), default="bic")
    fitting.add_argument("--n-init", type=int, default=1)
    fitting.add_argument("--seed", type=int, default=0)
    fitting.add_argument("--device", default="cpu")
    fitting.add_argument("--dtype", choices=("float32", "float64"), default="float64")
    fitting.add_argument("--out", default="model.pt", help="where the best model is saved")
    fitting.add_argument("--plot", default=None, help="save a PNG of the criterion against K (needs matplotlib)")
    fitting.add_argument("--verbose", action="store_true", help="progress bars of the fits")
    fitting.set_defaults(run=fit)
    for name, run, text in (("predict", predict, "the most probable component of every row"),
                            ("score", score, "the mean log-likelihood per row")):
        command = commands.add_parser(name, help=text)
        command.add_argument("model", help="a model saved by fit (or model.save)")
        command.add_argument("data", help="CSV, .npy or Parquet file of rows")
        if name == "predict":
            command.add_argument("--out", help="save the labels as .npy instead of printing them")
        command.set_defaults(run=run)
    return main


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except ValueError as error:
        print(f"torch-em {args.command}: {error}", file=sys.stderr)
        return 2
