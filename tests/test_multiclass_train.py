"""Your own classes (issue 13 #4): a 3-class set trains, evaluates and predicts through the library and the CLI,
with the classes taken from the folders and stored in the card; the zip check and the errors speak of them."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from covid_cls import DatasetError, load_checkpoint
from covid_cls.__main__ import main
from covid_cls.data import check_layout_names, scan_dataset
from covid_cls.synthetic import THREE_CLASSES, make_demo_dataset

from helpers import flat_labelled_folder


def test_the_card_holds_the_folders_classes_and_per_class_metrics(three_class_checkpoint):
    card = load_checkpoint(three_class_checkpoint).card
    assert card.classes == list(THREE_CLASSES) and card.num_classes == 3
    assert card.threshold is None   # no binary operating point: the most probable class answers
    test = card.metrics["test"]
    assert np.array(test["confusion"]).shape == (3, 3) and np.sum(test["confusion"]) == test["n"] == 36
    assert set(test["per_class"]) == set(THREE_CLASSES)
    for name, m in test["per_class"].items():
        assert m["n"] == 12 and m["auc"] > 0.5, name   # every class above chance, one-vs-rest
    macro = np.mean([m["auc"] for m in test["per_class"].values()])
    assert test["auc"] == pytest.approx(macro)          # the headline AUC is the macro one-vs-rest mean
    assert test["ci"]["auc"][0] <= test["auc"] <= test["ci"]["auc"][1]
    assert set(test["roc_per_class"]) == set(THREE_CLASSES)
    assert all("auc" in h["val"] for h in card.history)   # the epochs were chosen on macro AUC
    # the OOD statistics were fitted per class (three class means), so an ordinary test image is not flagged
    ck = load_checkpoint(three_class_checkpoint)
    assert ck.ood_stats and ck.ood_stats["features"]["means"].shape[0] == 3


def test_predictor_answers_with_the_three_names(three_class_checkpoint, three_class_data):
    from covid_cls import Predictor

    pred = Predictor(three_class_checkpoint.parent, device="cpu")
    img = next((three_class_data / "test" / "pneumonia").glob("*.png"))
    p = pred.predict(img, "resnet18", "fc")
    assert list(p.probs) == list(THREE_CLASSES) and sum(p.probs.values()) == pytest.approx(1.0, abs=1e-5)
    assert p.decision in THREE_CLASSES and p.decision == max(p.probs, key=p.probs.get)


def test_evaluate_and_the_cli_on_a_flat_three_class_folder(three_class_checkpoint, three_class_data, tmp_path,
                                                         capsys):
    flat = flat_labelled_folder(three_class_data, tmp_path / "flat")
    assert sorted(p.name for p in flat.iterdir() if p.is_dir()) == sorted(THREE_CLASSES)
    assert main(["evaluate", "--checkpoint", str(three_class_checkpoint), "--data", str(flat), "--boot", "200",
                 "--json", str(tmp_path / "r.json"), "--plots", str(tmp_path / "plots")]) == 0
    out = capsys.readouterr().out
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["classes"] == list(THREE_CLASSES) and np.array(r["confusion"]).shape == (3, 3)
    assert set(r["per_class"]) == set(THREE_CLASSES)
    for name in THREE_CLASSES:
        assert name in out   # per-class lines
    assert (tmp_path / "plots" / "confusion.png").stat().st_size > 1000
    # a folder without the model's classes is refused, naming them
    binary = make_demo_dataset(tmp_path / "binary", n_per_class=4, size=64)
    assert main(["evaluate", "--checkpoint", str(three_class_checkpoint), "--data", str(binary), "--boot", "0"]) != 0
    err = capsys.readouterr().err
    assert "unexpected folder(s) infected" in err and "covid, normal, pneumonia" in err


def test_a_set_with_only_some_of_the_models_classes_is_measured_and_says_so(three_class_checkpoint,
                                                                           three_class_data, tmp_path):
    """E.g. normal X-rays only from another hospital: specificity is measured, sensitivity and AUC of the absent
    class are not (and the report says why), instead of refusing the folder. Training still needs every class."""
    from covid_cls.evaluation import evaluate_checkpoint

    flat = tmp_path / "some"
    for cls in ("covid", "normal"):
        shutil.copytree(three_class_data / "test" / cls, flat / cls)
    r = evaluate_checkpoint(three_class_checkpoint, flat, n_boot=100)
    assert r["n"] == 24 and r["per_class"]["pneumonia"]["n"] == 0 and r["per_class"]["pneumonia"]["auc"] is None
    assert r["per_class"]["normal"]["specificity"] is not None
    assert r["notes"] == ["test: no images of class pneumonia; its sensitivity and AUC cannot be measured here"]
    with pytest.raises(DatasetError, match="lacks class folder"):
        scan_dataset(flat, splits=("test",), classes=THREE_CLASSES)   # without partial_ok: refused


def test_classes_must_agree_across_splits_and_zips_are_checked_alike(tmp_path):
    root = make_demo_dataset(tmp_path / "d", n_per_class=4, size=48, classes=THREE_CLASSES)
    names = [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and "masks" not in p.parts]
    check_layout_names(names)   # 3 classes in every split: fine
    shutil.rmtree(root / "test" / "covid")
    with pytest.raises(DatasetError, match="test/ lacks class folder.*covid"):
        scan_dataset(root)
    with pytest.raises(DatasetError, match="test/ lacks class folder covid"):
        check_layout_names([n for n in names if not n.startswith("test/covid/")])
    many = tmp_path / "many"
    for split in ("train", "validation", "test"):
        for k in range(21):
            (many / split / f"c{k:02d}").mkdir(parents=True)
    with pytest.raises(DatasetError, match="21 class folder.*2 to 20"):
        scan_dataset(many)


def test_cli_writes_a_three_class_demo_set(tmp_path, capsys):
    assert main(["demo-data", str(tmp_path / "d"), "--n", "4", "--size", "48", "--classes",
                 "covid,normal,pneumonia"]) == 0
    assert scan_dataset(tmp_path / "d").classes == THREE_CLASSES
    assert main(["demo-data", str(tmp_path / "e"), "--classes", "cat,dog"]) == 2
    assert "no synthetic pattern" in capsys.readouterr().err


def test_the_synthetic_classes_differ_in_shape_not_only_presence():
    """covid: several small opacities in both lungs; pneumonia: one large one in one lung (masks tell)."""
    from scipy import ndimage

    from covid_cls.synthetic import synthetic_xray

    for seed in range(5):
        _, covid = synthetic_xray(128, pattern="bilateral", seed=seed)
        _, lobar = synthetic_xray(128, pattern="lobar", seed=seed)
        _, normal = synthetic_xray(128, seed=seed)
        assert not normal.any()
        parts, n = ndimage.label(covid)
        sides = {int(ndimage.center_of_mass(covid, parts, k)[1] >= 64) for k in range(1, n + 1)}
        assert n >= 2 and sides == {0, 1}                             # several opacities, in both lungs
        assert ndimage.label(lobar)[1] == 1                           # one opacity ...
        assert lobar.sum() > 1.5 * max(np.sum(parts == k) for k in range(1, n + 1))   # ... larger than each


def test_cli_compare_of_two_three_class_models_tests_the_macro_auc(three_class_checkpoint, three_class_data,
                                                                   tmp_path, capsys):
    from covid_cls import fit

    from helpers import small_config

    other = fit(small_config(three_class_data, tmp_path / "other", epochs=2))
    assert main(["compare", str(three_class_checkpoint), str(other), "--data", str(three_class_data), "--boot",
                 "200", "--json", str(tmp_path / "c.json")]) == 0
    out = capsys.readouterr().out
    assert "12 covid, 12 normal, 12 pneumonia; macro one-vs-rest AUC" in out and "verdict:" in out
    r = json.loads((tmp_path / "c.json").read_text())
    assert r["about"] == "macro" and r["method"].startswith("paired class-stratified bootstrap")
    assert r["auc_a"] == pytest.approx(load_checkpoint(three_class_checkpoint).card.metrics["test"]["auc"], abs=0.02)
