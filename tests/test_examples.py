"""Run the differentiable-EM examples end to end at tiny sizes: they must finish, print their
results table and return finite, in-range figures (no timing or accuracy targets)."""
from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("scipy")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module", autouse=True)
def examples_on_path():
    """The examples import their shared helpers as ``_common`` (as when run as scripts)."""
    sys.path.insert(0, str(EXAMPLES))
    yield
    sys.path.remove(str(EXAMPLES))


def example(name: str):
    return importlib.import_module(name)


def assert_unit_interval(value: float, what: str) -> None:
    assert math.isfinite(value) and 0.0 <= value <= 1.0, f"{what} = {value}"


def test_deep_clustering(capsys, tmp_path):
    plot = tmp_path / "codes.png"
    results = example("deep_clustering").main([
        "--seeds", "1", "--limit", "300", "--hidden", "32", "--pretrain-epochs", "5", "--epochs", "5",
        "--n-init", "1", "--batch-size", "64", "--plot", str(plot),
    ])
    assert "ACC" in capsys.readouterr().out
    assert len(results["scores"]) == 4  # two scikit-learn baselines, before and after joint training
    for name, runs in results["scores"].items():
        for scores in runs:
            assert_unit_interval(scores["acc"], f"{name} ACC")
            assert_unit_interval(scores["nmi"], f"{name} NMI")
    loss = results["losses"][0]
    assert all(math.isfinite(value) for value in loss)
    assert loss[-1] < loss[0], loss
    assert plot.exists() or importlib.util.find_spec("matplotlib") is None


def test_anomaly_detection(capsys):
    results = example("anomaly_detection").main(["--seeds", "1", "--pretrain-epochs", "5", "--epochs", "5", "--n-init", "1"])
    assert "roc_auc" in capsys.readouterr().out
    assert len(results["scores"]) == 4
    for name, runs in results["scores"].items():
        for scores in runs:
            for metric in ("precision", "recall", "f1", "roc_auc"):
                assert_unit_interval(scores[metric], f"{name} {metric}")
    loss = results["losses"][0]
    assert all(math.isfinite(value) for value in loss)
    assert loss[-1] < loss[0], loss


def test_set_classifier(capsys):
    results = example("set_classifier").main([
        "--limit", "300", "--epochs", "3", "--n-iter", "2", "--modes", "unrolled", "last", "--hidden", "16",
    ])
    assert "test accuracy" in capsys.readouterr().out
    assert set(results) == {("unrolled", 2), ("last", 2), "pixel MLP"}
    for key, run in results.items():
        assert_unit_interval(run["accuracy"], f"{key} accuracy")
        assert math.isfinite(run["seconds_per_epoch"]) and run["seconds_per_epoch"] > 0
        assert all(math.isfinite(value) for value in run["loss"])
    assert results[("unrolled", 2)]["loss"][-1] < results[("unrolled", 2)]["loss"][0]
