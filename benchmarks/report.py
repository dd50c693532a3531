"""What the table-writing benchmarks share: their command line (repetitions, threads, output
file) with the thread count pinned before torch is imported, and writing the table."""
from __future__ import annotations

import argparse
import os
from pathlib import Path


def arguments(doc: str, reps: int = 3) -> argparse.Namespace:
    """``--reps``, ``--threads`` (pinned for OpenMP, MKL and OpenBLAS here, before the caller
    imports torch; the caller sets ``torch.set_num_threads``) and ``--output``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--reps", type=int, default=reps)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[name] = str(args.threads)
    return args


def emit(lines: list[str], output: Path | None) -> None:
    """Print the markdown table and write it to ``output`` when given."""
    text = "\n".join(lines) + "\n"
    print(text)
    if output is not None:
        output.write_text(text)
