"""The command line: demo-data -> train -> evaluate -> predict, as a user would type it."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from covid_cls.__main__ import main

from helpers import copy_checkpoint, flat_labelled_folder

WITH_CI = r"\d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]"   # "0.903 [0.851, 0.947]"


@pytest.mark.slow
def test_demo_train_evaluate_predict(tmp_path, capsys):
    data, ck, plots = tmp_path / "data", tmp_path / "ck", tmp_path / "plots"
    assert main(["demo-data", str(data), "--n", "12", "--size", "64"]) == 0
    assert "SYNTHETIC" in (data / "README.md").read_text()
    assert main(["train", "--data", str(data), "--arch", "resnet18", "--level", "fc", "--epochs", "2",
                 "--weights", "none", "--image-size", "64", "--out", str(ck), "--optimizer", "adam",
                 "--precision", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "saved" in out and "sens" in out and "spec" in out and "not a diagnosis" in out
    assert "epoch 2/2: train loss" in out   # the log line of events.describe
    [weights] = [p for p in ck.iterdir() if p.suffix in (".safetensors", ".pt")]
    assert json.loads(weights.with_suffix(".json").read_text())["precision"] == "fp32"
    assert main(["evaluate", "--checkpoint", str(weights), "--data", str(data), "--json", str(tmp_path / "r.json"),
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
    for cmd in ("train", "evaluate", "compare", "predict", "study", "migrate", "demo-data"):
        assert cmd in r.stdout


@pytest.mark.parametrize("argv", [["train", "--data", "x", "--arch", "alexnet"],
                                  ["train", "--data", "x", "--level", "most"]])
def test_bad_choices_rejected_by_argparse(argv):
    with pytest.raises(SystemExit):
        main(argv)


@pytest.mark.slow
def test_study_writes_table_and_plots_with_external_columns_and_paired_comparisons(tmp_path, capsys):
    data = tmp_path / "data"
    main(["demo-data", str(data), "--n", "8", "--size", "48"])
    external = flat_labelled_folder(data, tmp_path / "elsewhere", split="validation")
    assert main(["study", "--data", str(data), "--archs", "resnet18", "--levels", "fc", "partial", "--epochs", "1",
                 "--weights", "none", "--image-size", "64", "--out", str(tmp_path / "ck"),
                 "--report", str(tmp_path / "rep"), "--external", str(external)]) == 0
    table = (tmp_path / "rep" / "study.md").read_text()
    assert "| resnet18 | fc |" in table and "| resnet18 | partial |" in table and "not a diagnosis" in table
    header = table.splitlines()[0]
    for col in ("test AUC [95% CI]", "ext AUC [95% CI]", "ext sens", "ext spec", "ext wrong flagged", "vs fc"):
        assert col in header, col
    cells = {line.split(" | ")[1]: line.split(" | ") for line in table.splitlines()[2:4]}
    heads = [h.strip() for h in header.strip("| ").split(" | ")]
    fc, partial = cells["fc"], cells["partial"]
    assert re.fullmatch(WITH_CI, fc[heads.index("test AUC [95% CI]")].strip())
    assert re.fullmatch(WITH_CI, fc[heads.index("ext AUC [95% CI]")].strip())
    assert re.fullmatch(r"\d+/\d+|–", fc[heads.index("ext wrong flagged")].strip())
    # partial is compared with fc of the same arch on the same test images; fc itself is the reference
    assert re.search(r"p[=<][\d.]+|p=–", partial[heads.index("vs fc (paired, test)")])
    assert fc[heads.index("vs fc (paired, test)")].strip() == "–"
    assert re.search(r"- resnet18 partial vs fc: [+-]\d\.\d{3} AUC \[.+\], p.+: (no significant difference|"
                     r"partial is better|fc is better)", table)
    csv_rows = (tmp_path / "rep" / "study.csv").read_text().strip().splitlines()
    assert len(csv_rows) == 3 and csv_rows[0].startswith("arch,level,trainable_params")
    for col in ("test_auc_low", "test_auc_high", "vs_fc", "ext_auc", "ext_auc_low", "ext_sensitivity",
                "ext_specificity", "ext_wrong_flagged"):
        assert col in csv_rows[0].split(","), col
    assert (tmp_path / "rep" / "study_val_auc.png").stat().st_size > 1000
    assert len(list((tmp_path / "ck").glob("*.json"))) == 2   # one card per checkpoint
    assert "ext AUC [95% CI]" in capsys.readouterr().out     # the CLI prints the same table


def test_evaluate_a_flat_folder_prints_cis_sources_and_the_abstention_summary(fc_checkpoint, demo_data, tmp_path,
                                                                             capsys):
    flat = flat_labelled_folder(demo_data, tmp_path / "elsewhere")
    out_json, plots = tmp_path / "r.json", tmp_path / "plots"
    assert main(["evaluate", "--checkpoint", str(fc_checkpoint), "--data", str(flat), "--boot", "300",
                 "--json", str(out_json), "--plots", str(plots)]) == 0
    out = capsys.readouterr().out
    assert "[flat folder]" in out
    for metric in ("AUC", "sens", "spec", "F1"):
        assert re.search(rf"{metric} {WITH_CI}", out), metric
    assert re.search(r"threshold +(P\(infected\) >= \d\.\d{3}|most probable class)", out)
    for source in ("Hospital A", "Hospital B"):   # one line per MANIFEST source, each with its own CIs
        assert re.search(rf"source: {source}\n +n=12 +AUC {WITH_CI}", out), out
    assert re.search(r"\d+\.\d % of images flagged; \d+ of \d+ wrong answers flagged", out)
    assert "near-duplicates of training images:" in out and "not a diagnosis" in out
    r = json.loads(out_json.read_text())
    assert set(r["ci"]) >= {"auc", "sensitivity", "specificity", "f1", "ece"}
    lo, hi = r["ci"]["auc"]
    assert lo <= r["auc"] <= hi
    assert set(r["subsets"]) == {"Hospital A", "Hospital B"} and all("ci" in m for m in r["subsets"].values())
    sel = r["selective"]
    assert {"flagged", "wrong", "wrong_flagged", "aurc", "risk_coverage"} <= set(sel)
    assert len(sel["risk_coverage"]["coverage"]) == len(sel["risk_coverage"]["risk"]) > 1
    assert len(r["files"]) == len(r["labels"]) == len(r["probs"]) == len(r["flagged"]) == 24
    for name in ("confusion.png", "roc.png", "risk_coverage.png"):
        assert (plots / name).stat().st_size > 1000, name


def test_compare_gives_a_plain_verdict(fc_checkpoint, demo_data, tmp_path, capsys):
    twin = copy_checkpoint(fc_checkpoint, tmp_path / "twin")   # the same model: no difference by construction
    out_json = tmp_path / "c.json"
    assert main(["compare", str(fc_checkpoint), str(twin), "--data", str(demo_data), "--boot", "200",
                 "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"A .+: AUC {WITH_CI}", out) and re.search(rf"B .+: AUC {WITH_CI}", out)
    assert "difference A - B: +0.000 AUC" in out and "p=1" in out
    assert "verdict: no significant difference" in out
    r = json.loads(out_json.read_text())
    assert r["diff"] == 0 and r["p_value"] == 1 and r["n"] == 24 and len(r["auc_a_ci"]) == 2


def test_compare_detects_a_model_that_ranks_worse(fc_checkpoint, demo_data, tmp_path, capsys):
    """A planted difference: B is A with its two output logits swapped (its scores run backwards)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from covid_cls.checkpoints import file_sha256

    flipped = copy_checkpoint(fc_checkpoint, tmp_path / "flipped")
    state = load_file(str(flipped))
    with safe_open(str(flipped), framework="pt") as f:
        meta = f.metadata()
    last = sorted(k for k in state if k.startswith("head.") and k.endswith(".weight"))[-1]
    bias = last.replace(".weight", ".bias")
    state[last], state[bias] = torch.flip(state[last], [0]).contiguous(), torch.flip(state[bias], [0]).contiguous()
    save_file(state, str(flipped), metadata=meta)
    card = json.loads(flipped.with_suffix(".json").read_text())
    card.update(sha256=file_sha256(flipped), bytes=flipped.stat().st_size)
    flipped.with_suffix(".json").write_text(json.dumps(card))
    assert main(["compare", str(fc_checkpoint), str(flipped), "--data", str(demo_data), "--boot", "200"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"verdict: \S+ is better \(p<0\.001", out), out


def test_predict_says_uncertain_for_a_colour_photo(fc_checkpoint, tmp_path, capsys):
    from covid_cls.synthetic import non_xray_images

    photo = tmp_path / "holiday.png"
    non_xray_images(1, 160, seed=3)["colour_scene"][0].save(photo)
    assert main(["predict", str(photo), "--checkpoint", str(fc_checkpoint)]) == 0
    out = capsys.readouterr().out
    headline = out.splitlines()[0]
    assert headline.startswith(f"{photo}: uncertain — outside what this model was trained on")
    assert re.search(r"infected 0\.\d{3}\s+normal 0\.\d{3}", headline)     # the probabilities stay visible
    reasons = [line for line in out.splitlines() if line.startswith("    - ")]
    assert reasons and any("coloured" in r for r in reasons)
    assert "not a diagnosis" in out


def test_migrate_rewrites_format_1_checkpoints(fc_checkpoint, tmp_path, capsys):
    import torch

    from covid_cls import load_checkpoint, load_model
    from covid_cls.models import ARCHS

    ck = load_checkpoint(fc_checkpoint)
    model, card = load_model(fc_checkpoint)
    head = ARCHS[card.arch].head_path   # format 1: the torchvision model, our head in its Linear slot
    state = {(head + k[4:] if k.startswith("head") else k[len("backbone."):]): v
             for k, v in model.state_dict().items()}
    old = {**card.to_dict(), "format": 1, "file": "old.pt", "sha256": None, "bytes": None}
    folder = tmp_path / "ck"
    folder.mkdir()
    torch.save({**old, "state_dict": state}, folder / "old.pt")
    (folder / "old.json").write_text(json.dumps(old))
    assert main(["migrate", str(folder)]) == 0
    out = capsys.readouterr().out
    [new] = folder.glob("*.safetensors")
    assert f"{folder / 'old.pt'} -> {new}" in out and not (folder / "old.pt").exists()
    migrated, card2 = load_model(new)
    x = torch.randn(1, 3, card.image_size, card.image_size)
    with torch.no_grad():
        assert torch.allclose(migrated(x), model(x), atol=1e-6)
    assert card2.threshold == card.threshold and ck.card.arch == card2.arch
    assert main(["migrate", str(folder)]) == 0
    assert "no format-1 .pt checkpoints found" in capsys.readouterr().out


def test_the_seed_recipe_is_the_2020_notebook():
    from covid_cls.config import TrainConfig

    cfg = TrainConfig.from_recipe("seed", data_dir="d")
    assert (cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay) == ("sgd", 1e-3, 0.9, 0.0)
    assert (cfg.epochs, cfg.schedule, cfg.loss, cfg.threshold_rule) == (10, "none", "ce", "argmax")
    assert (cfg.warmup_epochs, cfg.patience, cfg.intensity_aug, cfg.blur_noise, cfg.erase_corners) == (0, 0, 0, 0, 0)
    assert cfg.augment and cfg.rotation == 30.0 and cfg.recipe == "seed"   # rotation, crop and flip, as in 2020
    from covid_cls.__main__ import _config, build_parser

    assert _config(build_parser().parse_args(["train", "--data", "d", "--recipe", "seed"])) == cfg


def test_a_recipe_takes_only_the_flags_typed_on_top():
    from covid_cls.__main__ import _config, build_parser
    from covid_cls.config import RECIPES, TrainConfig

    cfg = _config(build_parser().parse_args(["train", "--data", "d", "--recipe", "robust", "--epochs", "3"]))
    assert cfg.recipe == "robust" and cfg.epochs == 3
    assert (cfg.optimizer, cfg.schedule) == (RECIPES["robust"]["optimizer"], RECIPES["robust"]["schedule"])
    plain = _config(build_parser().parse_args(["train", "--data", "d", "--no-augment"]))
    assert plain == TrainConfig(data_dir="d", augment=False)
