"""The package type-checks clean with mypy in its default mode (configured in pyproject.toml)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mypy")

ROOT = Path(__file__).resolve().parents[1]


def test_mypy_reports_no_errors(tmp_path):
    # One run with its cache in a temporary directory (the checkout stays clean).
    env = {**os.environ, "MYPY_CACHE_DIR": str(tmp_path / "mypy_cache")}
    completed = subprocess.run(
        [sys.executable, "-m", "mypy", "torch_em"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
