"""The app's tab handlers called directly — no server, no HTTP: plain functions over a Services object."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path

import pytest
from PIL import Image

from helpers import copy_checkpoint, flat_labelled_folder

gr = pytest.importorskip("gradio")


@pytest.fixture
def trained_svc(svc, fc_checkpoint):
    copy_checkpoint(fc_checkpoint, svc.settings.checkpoints)
    return svc


def _upload(tmp_path, name: str = "xray.png", seed: int = 3) -> str:
    """A fresh upload (the handlers delete what they read, as they do with Gradio's uploads)."""
    from covid_cls.synthetic import synthetic_xray

    path = tmp_path / name
    Image.fromarray(synthetic_xray(128, infected=True, seed=seed)[0]).save(path)
    return str(path)


# ---------------------------------------------------------------------------------------------
# the one error path
# ---------------------------------------------------------------------------------------------


def test_user_errors_turns_library_errors_into_messages_and_lets_bugs_through():
    from covid_cls.errors import CovidClsError, DatasetError, JobBusy
    from covid_cls.ui import user_errors

    @user_errors
    def fails(exc):
        raise exc

    @user_errors
    def streams(exc):
        yield 1
        raise exc

    for exc in (DatasetError("no train/ folder"), JobBusy("already in progress"), CovidClsError("plain root")):
        with pytest.raises(gr.Error, match=str(exc)):
            fails(exc)
        with pytest.raises(gr.Error, match=str(exc)):
            list(streams(exc))
    with pytest.raises(KeyError):   # a programming error stays one (Gradio reports it as a server error)
        fails(KeyError("oops"))
    with pytest.raises(KeyError):
        list(streams(KeyError("oops")))


def test_an_upload_over_the_limit_says_how_big_it_is(trained_svc, tmp_path):
    from covid_cls.ui.predict import predict

    svc = trained_svc   # with no model at all, Predict guides to the quick demo model first (issue 12 #4)
    svc.settings.max_upload = 1000
    with pytest.raises(gr.Error, match=r"The file is 0\.\d MB; the limit is 0 MB"):
        predict(svc, _upload(tmp_path), "resnet18", "fc", "", None)


# ---------------------------------------------------------------------------------------------
# choices and options come from the registry and TrainConfig
# ---------------------------------------------------------------------------------------------


def _values(component) -> list:
    return [v for _, v in component.choices]


def test_choice_lists_equal_the_registry_and_the_config():
    from covid_cls.config import LOSSES, OPTIMIZERS, SCHEDULES, WEIGHTS
    from covid_cls.models import ARCHS, LEVELS
    from covid_cls.ui.common import arch_choices, level_choices, option

    assert [v for _, v in arch_choices()] == list(ARCHS)
    assert [v for _, v in level_choices()] == list(LEVELS)
    assert [label for label, _ in arch_choices()] == [spec.title for spec in ARCHS.values()]
    assert _values(option("optimizer")) == list(OPTIMIZERS)
    assert _values(option("schedule")) == list(SCHEDULES)
    assert _values(option("loss")) == list(LOSSES)
    assert _values(option("weights")) == list(WEIGHTS)
    assert isinstance(option("augment"), gr.Checkbox) and option("augment").value is True
    epochs = option("epochs", minimum=1, maximum=50)
    assert isinstance(epochs, gr.Slider) and epochs.label == "Epochs" and epochs.value == 10


def test_train_and_study_inputs_are_config_fields_packed_into_a_train_config():
    from covid_cls.config import TrainConfig
    from covid_cls.errors import ConfigError
    from covid_cls.ui.common import config_from
    from covid_cls.ui.study import STUDY_INPUTS
    from covid_cls.ui.train import ADVANCED_ROWS, MAIN_ROWS, TRAIN_INPUTS

    names = {f.name for f in fields(TrainConfig)}
    assert set(TRAIN_INPUTS) <= names and set(STUDY_INPUTS) <= names
    assert sorted(n for row in MAIN_ROWS + ADVANCED_ROWS for n in row) == sorted(TRAIN_INPUTS)
    # what Gradio sends: numbers as floats, an empty number box as None
    cfg = config_from(TRAIN_INPUTS, ("vgg16", "partial", 3.0, 0.01, None, "adam", "cosine", "focal", "none",
                                     False, 64.0, 7.0))
    assert (cfg.arch, cfg.level, cfg.epochs, cfg.lr, cfg.batch_size, cfg.optimizer, cfg.schedule, cfg.loss,
            cfg.weights, cfg.augment, cfg.image_size, cfg.seed) == ("vgg16", "partial", 3, 0.01, 0, "adam",
                                                                    "cosine", "focal", "none", False, 64, 7)
    with pytest.raises(ConfigError, match="unknown optimizer"):
        config_from(("optimizer",), ("rmsprop",))
    with pytest.raises(ConfigError, match="epochs must be int"):
        config_from(("epochs",), ("many",))


def test_the_cli_has_one_flag_per_train_config_option():
    from covid_cls.__main__ import build_parser
    from covid_cls.config import TrainConfig

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for cmd, skip in (("train", set()), ("study", {"arch", "level"})):
        actions = [a for a in sub.choices[cmd]._actions if a.dest != "help"]
        by_dest = {}
        for a in actions:
            by_dest.setdefault(a.dest, []).append(a)
        for f in fields(TrainConfig):
            if f.name in skip:
                assert f.name not in by_dest
                continue
            [action] = by_dest[f.name]   # exactly one flag
            assert len(action.option_strings) == 1 and action.help.startswith(
                ("switch off ", f.metadata["help"])), (f.name, action.help)
    flags = {s for a in sub.choices["train"]._actions for s in a.option_strings}
    assert {"--optimizer", "--schedule", "--loss", "--batch-size", "--image-size", "--no-augment", "--device",
            "--seed", "--precision", "--epochs", "--lr", "--weights", "--arch", "--level", "--out", "--data",
            "--workers"} <= flags
    a = build_parser().parse_args(["train", "--data", "d", "--no-augment", "--batch-size", "8", "--out", "o"])
    assert (a.data_dir, a.augment, a.batch_size, a.out_dir) == ("d", False, 8, "o")


# ---------------------------------------------------------------------------------------------
# Predict, Models and Compare handlers
# ---------------------------------------------------------------------------------------------


def test_predict_without_a_model_guides_the_user(svc, tmp_path, fc_checkpoint):
    from covid_cls.ui.predict import checkpoint_choices, predict

    # issue 12 #4: a fresh machine's Predict button guides (plain markdown), it does not raise an error
    upload = _upload(tmp_path)
    label, overlay, info, state = predict(svc, upload, "vgg16", "full", "", None)
    assert label is None and overlay is None and state is None
    assert "No model for VGG16 · full yet" in info and "Train quick demo model" in info
    assert "choose **ResNet18 · fc**" in info and "about" in info and "not a diagnosis" in info
    assert Path(upload).exists()                          # the upload waits for the model
    info = predict(svc, None, "resnet18", "fc", "", None)[2]
    assert "No model for ResNet18 · fc yet" in info and "choose" not in info
    dropdown, note, demo_button = checkpoint_choices(svc, "vgg16", "full")
    assert dropdown["choices"] == ["best for this pair"] and "quick demo" in note and demo_button["visible"]
    svc.settings.training = False                         # no quick demo to offer: says where models come from
    assert "Training is switched off" in predict(svc, upload, "resnet18", "fc", "", None)[2]
    with pytest.raises(gr.Error, match="unknown fine-tuning level"):
        predict(svc, upload, "resnet18", "nope", "", None)
    svc.settings.training = True
    copy_checkpoint(fc_checkpoint, svc.settings.checkpoints)
    with pytest.raises(gr.Error, match="Upload an X-ray image first"):
        predict(svc, None, "resnet18", "fc", "", None)


def test_a_trained_checkpoint_predicts_through_the_handler(trained_svc, tmp_path):
    from covid_cls.ui.predict import checkpoint_choices, predict, reblend, upload_preview

    svc = trained_svc
    dropdown, note, demo_button = checkpoint_choices(svc, "resnet18", "fc")
    [name] = dropdown["choices"][1:]
    assert note == "" and not demo_button["visible"]
    for checkpoint in ("", name):
        (label, probs), overlay, info, state = predict(svc, _upload(tmp_path), "resnet18", "fc", checkpoint, None)
        assert set(probs) == {"infected", "normal"} and abs(sum(probs.values()) - 1) < 1e-5
        assert f"### Prediction: **{label}**" in info   # the label's headline is the Predictor's answer
        assert overlay.mode == "RGB" and state["cam"].shape == state["image"].size[::-1]
        assert "not a diagnosis" in info and "trained from scratch" in info and "ResNet18 · fc" in info
    assert reblend(0.8, state).size == overlay.size
    # the image decoded at upload time serves the click after the upload file is gone
    path = _upload(tmp_path, "again.png")
    preview, session = upload_preview(svc, path)
    assert not Path(path).exists() and session["image"] is preview
    (_, probs2), *_ = predict(svc, path, "resnet18", "fc", "", session)
    assert set(probs2) == set(probs)


def test_a_flagged_image_never_gets_a_confident_headline(trained_svc, tmp_path):
    from covid_cls.predictor import UNCERTAIN
    from covid_cls.synthetic import non_xray_images
    from covid_cls.ui.predict import headline_label, predict

    photo = tmp_path / "holiday.png"
    non_xray_images(1, 160, seed=3)["colour_scene"][0].save(photo)
    value, _, info, _ = predict(trained_svc, str(photo), "resnet18", "fc", "", None)
    label, probs = value
    assert label == UNCERTAIN and set(probs) == {"infected", "normal"}
    shown = headline_label(num_top_classes=2).postprocess(value)   # what the Label component sends
    assert shown.label == UNCERTAIN and {c.label for c in shown.confidences} == {"infected", "normal"}
    assert f"### Prediction: **{UNCERTAIN}**" in info and "Why:" in info and "coloured" in info
    assert "infected" in info.split("Why:")[1] and "not a diagnosis" in info   # probabilities stay visible
    # a plain dict still renders as gr.Label does (the most probable class on top)
    assert headline_label().postprocess({"a": 0.2, "b": 0.8}).label == "b"


def test_checkpoint_names_stay_inside_the_checkpoint_folder(trained_svc, tmp_path):
    from covid_cls.ui.models import model_details
    from covid_cls.ui.predict import predict

    svc = trained_svc
    [card] = svc.cards()
    outside = f"../elsewhere/{Path(card.path).name}"
    (tmp_path / "elsewhere").mkdir()
    copy_checkpoint(Path(card.path), tmp_path / "elsewhere")
    md, _, _ = model_details(svc, outside)   # the same name, read in the checkpoint folder
    assert md.startswith("**Model:**") and str(tmp_path) not in md
    with pytest.raises(gr.Error) as info:
        predict(svc, _upload(tmp_path), "resnet18", "fc", "../elsewhere/missing.pt", None)
    assert str(tmp_path) not in str(info.value)


def test_models_handlers_list_show_and_delete(trained_svc):
    from covid_cls.ui.models import delete_model, model_details, models_json, models_table

    svc = trained_svc
    [entry] = models_json(svc)
    assert entry["arch"] == "resnet18" and entry["level"] == "fc" and "roc" not in entry["metrics"]["test"]
    assert "sensitivity" in entry["metrics"]["test"]
    rows, dropdown = models_table(svc)
    assert [r[0] for r in rows] == [entry["file"]] == [dropdown["value"]]
    md, curves, roc = model_details(svc, entry["file"])
    assert "**Test:**" in md and curves is not None and roc is not None
    assert model_details(svc, "gone.safetensors")[0] == "`gone.safetensors` is no longer available."
    with pytest.raises(gr.Error, match="Tick"):
        delete_model(svc, entry["file"], False)
    rows, dropdown, confirm, message = delete_model(svc, entry["file"], True)
    assert rows == [] and confirm is False and "Deleted" in message and svc.cards() == []


def test_compare_shows_every_trained_pair(trained_svc, tmp_path):
    from covid_cls.ui.compare import compare

    gallery, rows = compare(trained_svc, _upload(tmp_path), None)
    assert len(gallery) == len(rows) == 1 and "ResNet18 · fc" in gallery[0][1]
    assert rows[0][:2] == ["ResNet18", "fc"] and 0.0 <= rows[0][3] <= 1.0


def test_compare_without_models_says_so(svc, tmp_path):
    from covid_cls.ui.compare import compare

    with pytest.raises(gr.Error, match="No trained models yet"):
        compare(svc, _upload(tmp_path), None)


def test_evaluate_on_another_dataset_gives_cis_per_source_and_the_abstention_summary(trained_svc, demo_data,
                                                                                     tmp_path, monkeypatch):
    import re

    from covid_cls.ui import evaluate as ev

    svc = trained_svc
    svc.settings.roots_env = str(tmp_path / "allowed")
    flat = flat_labelled_folder(demo_data, tmp_path / "allowed" / "elsewhere")
    [name] = [Path(c.path).name for c in svc.cards()]
    table, sources, md, roc, rc = ev.evaluate(svc, name, "server folder", str(flat), None, ev.FLAT)
    [row] = table
    assert row[0] == "test" and row[-1] == 24 and len(row) == len(ev.METRIC_HEADERS)
    for cell in row[1:6]:   # AUC, sensitivity, specificity, F1, ECE, each with its interval
        assert re.fullmatch(r"\d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]", cell), cell
    assert [r[0] for r in sources] == ["Hospital A", "Hospital B"] and [r[-1] for r in sources] == [12, 12]
    assert "the whole folder (flat): 24 images (12 infected, 12 normal)" in md
    assert re.search(r"\d+\.\d % of images flagged; \d+ of \d+ wrong answers flagged", md)
    assert "**Decision:**" in md and "not a diagnosis" in md and roc is not None and rc is not None
    with pytest.raises(gr.Error, match="outside the folders"):
        ev.evaluate(svc, name, "server folder", str(demo_data), None, "test")
    with pytest.raises(gr.Error, match="not a flat labelled folder"):
        ev.evaluate(svc, name, "server folder", str(tmp_path / "allowed"), None, ev.FLAT)
    with pytest.raises(gr.Error, match="no longer available"):
        ev.evaluate(svc, "gone.safetensors", "server folder", str(flat), None, ev.FLAT)
    monkeypatch.setattr(ev, "MAX_IMAGES", 10)
    with pytest.raises(gr.Error, match="24 images: evaluation here is limited to 10"):
        ev.evaluate(svc, name, "server folder", str(flat), None, ev.FLAT)
    # with training switched off, evaluating (which trains nothing) still works
    svc.settings.training = False
    monkeypatch.setattr(ev, "MAX_IMAGES", 5000)
    assert ev.evaluate(svc, name, "server folder", str(flat), None, "test")[0][0][-1] == 24


def test_two_models_compared_on_a_dataset_get_a_paired_verdict(trained_svc):
    from covid_cls.ui.compare import compare_models

    svc = trained_svc
    [card] = svc.cards()
    twin = Path(card.path).with_name("twin.safetensors")
    copy_checkpoint(Path(card.path), svc.settings.checkpoints / "tmp")
    for src in (svc.settings.checkpoints / "tmp").iterdir():   # the same model under another name
        src.rename(twin.with_suffix(src.suffix))
    card_json = twin.with_suffix(".json")
    card_json.write_text(card_json.read_text().replace(Path(card.path).name, twin.name))
    rows, md = compare_models(svc, Path(card.path).name, twin.name, "synthetic demo set", "", None, "test")
    assert [r[0] for r in rows] == [Path(card.path).name, twin.name] and rows[0][1] == rows[1][1]
    assert md.startswith("**no significant difference**") and "+0.000 AUC" in md and "p=1" in md
    with pytest.raises(gr.Error, match="Select a checkpoint"):
        compare_models(svc, "", twin.name, "synthetic demo set", "", None, "test")


def test_train_and_study_tables_show_cis_threshold_and_paired_comparisons(trained_svc):
    from types import SimpleNamespace

    from covid_cls.ui.study import study_table
    from covid_cls.ui.train import metrics_rows, operating_point_html

    [card] = trained_svc.cards()
    val, test = metrics_rows(card.metrics)
    assert val[0] == "validation" and test[0] == "test" and "[" in test[1] and "[" in test[2]
    run = SimpleNamespace(status="done", kind="train", checkpoint=card.path)
    note = operating_point_html(run)
    assert "Decision:" in note and f"{card.temperature:.2f}" in note
    assert (f"P(infected) &gt;= {card.threshold:.3f}" if card.threshold is not None else "argmax") in note
    rows = [{"arch": "resnet18", "level": "fc", "test_auc": 0.9, "test_auc_low": 0.85, "test_auc_high": 0.95},
            {"arch": "resnet18", "level": "partial", "test_auc": 0.912, "test_auc_low": 0.86, "test_auc_high": 0.96,
             "vs_fc": "partial vs fc: +0.012 AUC [-0.020, 0.040], p=0.41: no significant difference"}]
    t = study_table(rows)
    auc, vs = t["headers"].index("test AUC [95% CI]"), t["headers"].index("vs fc (paired, test)")
    assert t["data"][0][auc] == "0.900 [0.850, 0.950]" and t["data"][0][vs] == "–"
    assert t["data"][1][vs] == "+0.012 AUC [-0.020, 0.040], p=0.41: no significant difference"
    assert not any(h.startswith("ext") for h in t["headers"])   # no external set given


# ---------------------------------------------------------------------------------------------
# Train handlers (no run is started here: tests/test_app.py trains through the server)
# ---------------------------------------------------------------------------------------------


def test_scan_reads_an_allowed_folder_and_refuses_others(svc, demo_data, tmp_path):
    from covid_cls.ui.train import scan

    svc.settings.roots_env = str(demo_data.parent)
    md, rows, root = scan(svc, "server folder", str(demo_data), None)
    assert [r[0] for r in rows] == ["train", "validation", "test"] and Path(root) == demo_data.resolve()
    with pytest.raises(gr.Error, match="outside the folders"):
        scan(svc, "server folder", str(tmp_path), None)


def test_training_off_refuses_before_any_work(svc, tmp_path):
    from covid_cls.ui.study import study_endpoint
    from covid_cls.ui.train import history_rows, quick_demo, scan, stop, train_endpoint

    svc.settings.training = False
    zip_path = tmp_path / "data.zip"
    zip_path.write_bytes(b"PK")
    for call in (lambda: scan(svc, "upload .zip", "", str(zip_path)),
                 lambda: list(train_endpoint(svc, "synthetic demo set", "", None, "resnet18", "fc", 1, 1e-3, 0,
                                             "sgd", "none", "ce", "none", True, 64, 0)),
                 lambda: list(study_endpoint(svc, "synthetic demo set", "", None, ["resnet18"], ["fc"], 1, 1e-3,
                                             "sgd", "none", 64)),
                 lambda: list(quick_demo(svc))):
        with pytest.raises(gr.Error, match=r"Training is switched off on this server \(COVID_CLS_TRAINING=0\)"):
            call()
    assert not zip_path.exists()                       # the upload is not kept
    assert not (svc.settings.runs / "demo_data" / "train").exists()
    assert stop(svc) == "No run in progress." and history_rows(svc) == []


def test_the_event_pipe_carries_typed_events_and_skips_garbage():
    import multiprocessing as mp
    import os
    import struct

    from covid_cls import events as ev
    from covid_cls.jobs import JobManager, Run, _EventReader, _EventSender

    reader_end, writer_end = mp.Pipe(duplex=False)
    sender = _EventSender(writer_end)
    sent = [ev.Log(message="hello"),
            ev.Epoch(epoch=1, epochs=2, train={"loss": 0.5, "accuracy": 0.7}, val={"loss": 0.4, "auc": 0.9},
                     seconds=1.5)]
    sender.put(sent[0])
    junk = b"\x80\x05junk"
    os.write(writer_end.fileno(), struct.pack("!I", len(junk)) + junk)        # not JSON: skipped
    sender.put({"type": "nonsense"})                                         # not an event: skipped
    sender.put(sent[1])
    os.write(writer_end.fileno(), struct.pack("!I", 1 << 20) + b"partial")   # cut off: kept waiting, harmless
    reader = _EventReader(reader_end)
    got = reader.read(1.0)
    assert got == sent and reader.partial
    run = Run(id="r", kind="train", config={})
    for e in got:
        JobManager._apply(run, e)
    assert run.log == ["hello", ev.describe(sent[1])] and run.progress == 0.5 and run.history == [sent[1].record()]
    reader.close()
    writer_end.close()


def test_scan_reports_near_duplicates_across_splits(svc, tmp_path):
    """Issue 10: Scan names a test image that is a resized, recompressed copy of a training image."""
    import io

    from PIL import Image

    from covid_cls import make_demo_dataset
    from covid_cls.ui.train import scan

    root = make_demo_dataset(tmp_path / "data" / "d", n_per_class=6, size=96, seed=9)
    svc.settings.roots_env = str(tmp_path / "data")
    md, _, _ = scan(svc, "server folder", str(root), None)
    assert "none found" in md
    src = sorted((root / "train" / "infected").glob("*.png"))[0]
    buf = io.BytesIO()
    with Image.open(src) as im:
        im.convert("L").resize((80, 80)).save(buf, "JPEG", quality=60)
    (root / "test" / "infected" / "copy.jpg").write_bytes(buf.getvalue())
    md, _, _ = scan(svc, "server folder", str(root), None)
    assert "near-duplicate pair" in md and "copy.jpg" in md and src.name in md


def test_the_study_tab_spreads_its_runs_over_the_servers_devices(svc, monkeypatch):
    """Issue 13 #2: with several devices (COVID_CLS_STUDY_DEVICES, or every GPU when there are several) the
    Study tab's job carries them to the worker, which runs one process per device; "none" keeps one worker."""
    from covid_cls.config import TrainConfig
    from covid_cls.ui.study import study, study_endpoint
    from covid_cls.ui.train import DataSource

    started = []

    def fake_start(cfg, kind="train", extra=None):
        started.append((kind, dict(extra or {})))
        raise RuntimeError("not started in this test")

    monkeypatch.setattr(svc, "start_run", fake_start)
    for env, want in (("cpu,cpu", "cpu,cpu"), ("none", None)):
        svc.settings.study_devices_env = env
        with pytest.raises(RuntimeError, match="not started"):
            list(study(svc, DataSource("synthetic demo set", "", None), ["resnet18"], ["fc"], TrainConfig()))
        assert started[-1][0] == "study" and started[-1][1].get("devices") == want
    svc.settings.study_devices_env = "7"   # a GPU this machine does not have: the app starts, a study refuses
    with pytest.raises(gr.Error, match="CUDA GPU"):
        list(study_endpoint(svc, "synthetic demo set", "", None, ["resnet18"], ["fc"], 1, 1e-3, "sgd", "none", 64))
    from covid_cls.ui import build_app

    build_app(svc.settings)


def test_the_worker_passes_the_study_devices_on(monkeypatch, tmp_path):
    from covid_cls import jobs_worker, study

    seen = {}

    def fake_run_study(config, **kw):
        seen.update(kw)
        return []

    monkeypatch.setattr(study, "run_study", fake_run_study)
    monkeypatch.setattr(study, "write_outputs", lambda rows, out: {})
    jobs_worker._study(None, {"archs": ["resnet18"], "levels": ["fc"], "devices": "cpu,cpu", "report_dir": "x"},
                       type("E", (), {"put": lambda self, e: None})(), None)
    assert seen["devices"] == "cpu,cpu" and seen["archs"] == ["resnet18"]


def test_a_parallel_studys_interleaved_events_keep_one_curve_per_run_and_an_honest_progress():
    """Issue 13 #2: with one run per device, epochs of different runs arrive interleaved; each run keeps its
    own curve in the Study tab's plot and the progress is the mean of the runs' progress."""
    from covid_cls import events as ev
    from covid_cls.jobs import JobManager, Run
    from covid_cls.ui.study import study_outputs

    def epoch(i, name, k):
        return ev.Epoch(epoch=k, epochs=2, train={"loss": 1.0 / k}, val={"auc": 0.5 + 0.1 * k + 0.01 * i},
                        seconds=1.0).tagged(i, 2, name)

    run = Run(id="s", kind="study", config={})
    for e in (ev.RunStart().tagged(1, 2, "resnet18·fc"), ev.RunStart().tagged(2, 2, "resnet18·full"),
              epoch(1, "resnet18·fc", 1), epoch(2, "resnet18·full", 1), epoch(1, "resnet18·fc", 2)):
        JobManager._apply(run, e)
    assert run.progress == (1.0 + 0.5) / 2
    live = run.study["live"]
    assert [h["val"]["auc"] for h in live["resnet18·fc"]] == [0.61, 0.71]
    assert [h["val"]["auc"] for h in live["resnet18·full"]] == [0.62]
    JobManager._apply(run, ev.Done(checkpoint="x", metrics={}, best_epoch=2, temperature=1.0,
                                   seconds=1.0).tagged(1, 2, "resnet18·fc"))
    assert run.study["histories"]["resnet18·fc"] == live["resnet18·fc"]   # not the interleaved run.history
    fig = study_outputs(run)[1]
    assert {t.get_text() for t in fig.axes[0].get_legend().get_texts()} >= {"resnet18·fc", "resnet18·full"}
    saved = json.loads(json.dumps({k: v for k, v in run.to_dict().items() if k != "version"}))
    assert Run.from_saved(saved, "s").study["live"] == live   # saved and read back


def test_batch_with_no_model_yet_guides_instead_of_failing(svc, tmp_path, monkeypatch):
    """Issue 12 #4 for the batch section: no model for the pair in the browser is a hint (and nothing is
    predicted), while an API client still gets the error it needs to notice."""
    from covid_cls.ui import batch as batch_ui
    from covid_cls.ui import common

    warned = []
    monkeypatch.setattr(batch_ui.gr, "Warning", lambda msg, *a, **k: warned.append(msg))
    upload = _upload(tmp_path)
    assert batch_ui.predict_batch(svc, [upload], "resnet18", "fc", common.BEST) == (None, None, [])
    assert "Train quick demo model" in warned[0] and Path(upload).exists()   # the upload stays for the retry
    monkeypatch.setattr(common, "is_api_call", lambda: True)
    with pytest.raises(Exception, match="(?i)no .*model|checkpoint"):
        batch_ui.predict_batch(svc, [upload], "resnet18", "fc", common.BEST)
