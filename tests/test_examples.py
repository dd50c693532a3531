"""Run the examples end to end at tiny sizes: they must finish, print their results table and
return finite, in-range figures (no timing targets; the differentiable-EM ones have no accuracy
targets either, the HMM example must recover its well-separated synthetic regimes)."""
from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
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


def test_hmm_regimes(capsys, tmp_path):
    plot = tmp_path / "regimes.png"
    results = example("hmm_regimes").main(["--output", str(plot)])
    out = capsys.readouterr().out
    assert "decoding accuracy" in out and "transition matrix" in out
    synthetic = results["synthetic"]
    # Three regimes 1-3.5 standard deviations apart, 2,000 steps: Viterbi recovers most of them.
    assert synthetic["accuracy"] >= 0.9, synthetic["accuracy"]
    np.testing.assert_allclose(synthetic["means"], synthetic["true_means"], atol=0.5)
    np.testing.assert_allclose(synthetic["transmat"].sum(1), 1.0, atol=1e-9)
    assert set(np.unique(synthetic["regimes"])) <= {0, 1, 2}
    if importlib.util.find_spec("statsmodels") is None:
        assert "statsmodels is not installed" in out
    else:
        gdp = results["gdp"]
        assert gdp["means"][0] < 0 < gdp["means"][1], gdp["means"]  # a contracting and a growing regime
        assert any("2008" in spell for spell in gdp["spells"]), gdp["spells"]  # the 2008-09 recession
    assert plot.exists() or importlib.util.find_spec("matplotlib") is None


def test_variational_bayes(capsys):
    results = example("variational_bayes").main(["--components", "6", "--max-iter", "200"])
    assert "components (torch_em / sklearn)" in capsys.readouterr().out
    assert len(results["rows"]) == 5
    for row in results["rows"]:
        assert 1 <= row["components"] <= 6 and math.isfinite(row["lower_bound"])
        assert -1.0 <= row["ari"] <= 1.0 and row["ari"] > 0.3  # the species are recovered in part
