"""The command line: demo-data -> train -> evaluate -> predict, as a user would type it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from covid_cls.__main__ import main


def test_demo_train_evaluate_predict(tmp_path, capsys):
    data, ck, plots = tmp_path / "data", tmp_path / "ck", tmp_path / "plots"
    assert main(["demo-data", str(data), "--n", "12", "--size", "64"]) == 0
    assert "SYNTHETIC" in (data / "README.md").read_text()
    assert main(["train", "--data", str(data), "--arch", "resnet18", "--level", "fc", "--epochs", "2",
                 "--weights", "none", "--image-size", "64", "--out", str(ck), "--optimizer", "adam",
                 "--precision", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "saved" in out and "sens" in out and "spec" in out and "not a diagnosis" in out
    [pt] = list(ck.glob("*.pt"))
    assert json.loads(pt.with_suffix(".json").read_text())["precision"] == "fp32"
    assert main(["evaluate", "--checkpoint", str(pt), "--data", str(data), "--json", str(tmp_path / "r.json"),
                 "--plots", str(plots)]) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert {"accuracy", "sensitivity", "specificity", "auc", "f1", "ece", "confusion"} <= set(r)
    assert (plots / "confusion.png").stat().st_size > 1000 and (plots / "roc.png").stat().st_size > 1000
    img = next((data / "test" / "infected").glob("*.png"))
    assert main(["predict", str(img), "--checkpoints", str(ck), "--overlay-dir", str(tmp_path / "ov")]) == 0
    out = capsys.readouterr().out
    assert "infected" in out and "ms]" in out
    assert (tmp_path / "ov" / f"{img.stem}_gradcam.png").exists()


def test_errors_are_messages_not_tracebacks(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "missing"), "--weights", "none"]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "x.png"
    bad.write_text("hello")
    (tmp_path / "ck").mkdir()
    assert main(["predict", str(bad), "--checkpoints", str(tmp_path / "ck")]) == 2
    assert "No trained model" in capsys.readouterr().err


def test_module_entry_point_help():
    r = subprocess.run([sys.executable, "-m", "covid_cls", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    for cmd in ("train", "evaluate", "predict", "study", "demo-data"):
        assert cmd in r.stdout


@pytest.mark.parametrize("argv", [["train", "--data", "x", "--arch", "alexnet"], ["train", "--data", "x", "--level", "most"]])
def test_bad_choices_rejected_by_argparse(argv):
    with pytest.raises(SystemExit):
        main(argv)


def test_study_writes_table_and_plots(tmp_path, capsys):
    data = tmp_path / "data"
    main(["demo-data", str(data), "--n", "8", "--size", "48"])
    assert main(["study", "--data", str(data), "--archs", "resnet18", "--levels", "fc", "partial", "--epochs", "1",
                 "--weights", "none", "--image-size", "64", "--out", str(tmp_path / "ck"),
                 "--report", str(tmp_path / "rep")]) == 0
    table = (tmp_path / "rep" / "study.md").read_text()
    assert "| resnet18 | fc |" in table and "| resnet18 | partial |" in table and "not a diagnosis" in table
    csv_rows = (tmp_path / "rep" / "study.csv").read_text().strip().splitlines()
    assert len(csv_rows) == 3 and csv_rows[0].startswith("arch,level,trainable_params")
    assert (tmp_path / "rep" / "study_val_auc.png").stat().st_size > 1000
    assert len(list((tmp_path / "ck").glob("*.pt"))) == 2
