"""Execute every tutorial notebook in ``notebooks/`` and fail on any cell error.

The kernel runs this very interpreter (``sys.executable``), so a notebook sees exactly the
packages that pytest sees, whatever Jupyter kernels happen to be registered on the machine (a
user-level ``python3`` kernelspec may point at another Python). Skips cleanly when the notebook
tooling (``pip install -e ".[test]"``) is not installed.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("jupyter_client")
# What the notebooks themselves import, beyond torch and torch_em (all in the test extras).
pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")

from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402
from jupyter_client.manager import AsyncKernelManager  # noqa: E402
from jupyter_core.utils import run_sync  # noqa: E402

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
KERNEL_NAME = "python3"
#: A guard against a hung kernel, not a speed check: generous, so a loaded machine does not fail it.
CELL_TIMEOUT_S = 1800


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory) -> Path:
    """A private kernelspec directory whose ``python3`` kernel is ``sys.executable``."""
    root = tmp_path_factory.mktemp("kernels")
    spec = root / KERNEL_NAME
    spec.mkdir()
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (pytest)",
        "language": "python",
    }))
    return root


def test_notebooks_found():
    assert NOTEBOOKS, f"no notebooks found in {NOTEBOOK_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.name for path in NOTEBOOKS])
def test_notebook_executes(path: Path, kernel_dir: Path):
    notebook = nbformat.read(path, as_version=4)
    kernel_manager = AsyncKernelManager(
        kernel_name=KERNEL_NAME,
        kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernel_dir)]),
    )
    client = nbclient.NotebookClient(
        notebook,
        km=kernel_manager,
        timeout=CELL_TIMEOUT_S,
        allow_errors=False,
        record_timing=False,
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},  # the kernel's working directory
    )
    # Raises nbclient.exceptions.CellExecutionError (with the cell and its traceback) on an error.
    try:
        client.execute()
    finally:  # the kernel (and the memory it holds) goes now, not when pytest exits
        if kernel_manager.has_kernel:
            run_sync(kernel_manager.shutdown_kernel)(now=True)
    errors = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if output.get("output_type") == "error"
    ]
    assert not errors, f"{path.name}: {len(errors)} cell(s) raised"
