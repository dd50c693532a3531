"""The command line end to end: fit a grid from a CSV, predict and score with the saved model."""
import subprocess
import sys

import numpy as np
import pytest
import torch

import torch_em
from torch_em import cli
from conftest import blobs


@pytest.fixture
def data_csv(tmp_path):
    X = blobs(100)
    path = tmp_path / "data.csv"
    np.savetxt(path, X, delimiter=",", header=",".join(f"x{i}" for i in range(X.shape[1])), comments="")
    return path, X


def test_fit_prints_the_table_and_saves_the_best_model(tmp_path, data_csv, capsys):
    path, X = data_csv
    out = tmp_path / "model.pt"
    assert cli.main(["fit", str(path), "--components", "1..4", "--covariance", "full,diag", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("\n") >= 9 and "<- best" in printed
    model = torch_em.load(out)
    assert isinstance(model, torch_em.GaussianMixture)
    bics = {(line.split()[0], int(line.split()[1])): float(line.split()[2])
            for line in printed.splitlines()[1:9]}
    assert bics[(model.covariance_type, model.n_components)] == min(bics.values())
    reference = torch_em.GaussianMixture(model.n_components, covariance_type=model.covariance_type, seed=0,
                                         dtype=torch.float64).fit(X)
    assert float(reference.bic(X)) == pytest.approx(min(bics.values()), abs=0.006)  # printed to 2 decimals


def test_predict_and_score_with_a_saved_model(tmp_path, data_csv, capsys):
    path, X = data_csv
    out = tmp_path / "model.pt"
    cli.main(["fit", str(path), "--components", "3", "--out", str(out)])
    capsys.readouterr()
    labels = tmp_path / "labels.npy"
    assert cli.main(["predict", str(out), str(path), "--out", str(labels)]) == 0
    model = torch_em.load(out)
    np.testing.assert_array_equal(np.load(labels), model.predict(X).numpy())
    capsys.readouterr()
    assert cli.main(["score", str(out), str(path)]) == 0
    assert float(capsys.readouterr().out) == pytest.approx(float(model.score(X)), rel=1e-6)


def test_npy_input_and_python_dash_m(tmp_path):
    np.save(tmp_path / "data.npy", blobs(50))
    result = subprocess.run([sys.executable, "-m", "torch_em", "fit", str(tmp_path / "data.npy"), "--components", "2",
                             "--out", str(tmp_path / "m.pt")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "m.pt").is_file()


@pytest.mark.parametrize("content, message", [
    ("a,b\n1,2\n3,x\n", "column 'b'"),
    ("1,2\n3\n", "line 2"),
    ("", "empty"),
])
def test_unreadable_files_give_clear_errors(tmp_path, capsys, content, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    assert cli.main(["fit", str(path), "--components", "2"]) == 2
    assert message in capsys.readouterr().err


def test_a_missing_file_and_a_bad_range(tmp_path, capsys):
    assert cli.main(["fit", str(tmp_path / "none.csv")]) == 2
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["fit", str(tmp_path / "none.csv"), "--components", "0..3"])


def test_fit_with_plot_saves_a_png(tmp_path, data_csv, capsys):
    pytest.importorskip("matplotlib")
    path, _ = data_csv
    plot = tmp_path / "bic.png"
    assert cli.main(["fit", str(path), "--components", "1..3", "--covariance", "full,spherical", "--criterion", "icl",
                     "--out", str(tmp_path / "m.pt"), "--plot", str(plot)]) == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "ICL plot" in capsys.readouterr().out
