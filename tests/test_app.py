"""The Gradio app through its HTTP API (gradio_client), launched on a local port."""

from __future__ import annotations

import time

import pytest
from PIL import Image

from covid_cls.predictor import UNCERTAIN

from helpers import CXR_FULLRES, launched_app

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import handle_file  # noqa: E402

pytestmark = pytest.mark.http


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from covid_cls.ui import Settings

    root = tmp_path_factory.mktemp("app")
    settings = Settings(checkpoints=root / "checkpoints", runs=root / "runs", training=True)
    with launched_app(settings) as served:
        print(f"\nlaunch to listening: {served.launch_seconds:.2f}s")
        yield served.demo, served.client(), settings, served.port


def _image(tmp_path) -> str:
    real = sorted(CXR_FULLRES.glob("*.png")) if CXR_FULLRES.is_dir() else []
    if real:
        return str(real[0])
    from covid_cls.synthetic import synthetic_xray

    path = tmp_path / "synthetic.png"
    Image.fromarray(synthetic_xray(512, infected=True, seed=3)[0]).save(path)
    return str(path)


TRAIN_ARGS = dict(source="synthetic demo set", folder="", zip_path=None, arch="resnet18", level="fc", lr=1e-3,
                  bs=16, opt="adam", sched="none", loss="ce", weights="none", augment=False, image_size=64, seed=0)


def _train(client, epochs: int, level: str = "fc"):
    a = TRAIN_ARGS
    return client.submit(a["source"], a["folder"], a["zip_path"], a["arch"], level, epochs, a["lr"], a["bs"],
                         a["opt"], a["sched"], a["loss"], a["weights"], a["augment"], a["image_size"], a["seed"],
                         api_name="/train")


def test_endpoints_are_named(app):
    _, client, _, _ = app
    names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/predict", "/train", "/study", "/models", "/stop", "/evaluate"} <= names


def test_predict_without_a_model_says_so(app, tmp_path):
    _, client, _, _ = app
    with pytest.raises(Exception, match="No trained model"):
        client.predict(handle_file(_image(tmp_path)), "vgg16", "full", "", api_name="/predict")


def test_train_streams_epochs_then_model_is_listed_and_predicts(app, tmp_path):
    _, client, settings, _ = app
    job = _train(client, epochs=3)
    updates = list(job)
    logs = [u[2] for u in updates]
    epochs_seen = {n for n in (1, 2, 3) if any(f"epoch {n}/3" in text for text in logs)}
    assert epochs_seen == {1, 2, 3}, logs[-1]
    assert len(updates) >= 3 and "done" in updates[-1][0]
    metrics = updates[-1][3]
    assert [row[0] for row in metrics["data"]] == ["validation", "test"]
    models = client.predict(api_name="/models")
    assert len(models) == 1 and models[0]["arch"] == "resnet18" and models[0]["level"] == "fc"
    assert "sensitivity" in models[0]["metrics"]["test"]

    probs, overlay, info = client.predict(handle_file(_image(tmp_path)), "resnet18", "fc", "",
                                          api_name="/predict")
    assert probs["label"] in ("infected", "normal", UNCERTAIN)   # the answer at the model's operating point
    assert f"### Prediction: **{probs['label']}**" in info
    assert abs(sum(c["confidence"] for c in probs["confidences"]) - 1) < 1e-4
    assert "not a diagnosis" in info and "trained from scratch" in info and "cpu" in info
    with Image.open(overlay) as im:
        assert im.mode == "RGB" and min(im.size) > 100


def test_compare_shows_every_trained_pair(app, tmp_path):
    _, client, settings, _ = app
    gallery, table = client.predict(handle_file(_image(tmp_path)), api_name="/compare")
    trained = {(c["arch"], c["level"]) for c in client.predict(api_name="/models")}
    assert len(gallery) == len(table["data"]) == len(trained) >= 1
    assert all(0.0 <= row[3] <= 1.0 for row in table["data"])
    assert "· fc" in gallery[0]["caption"]


def test_a_flagged_prediction_does_not_get_a_confident_headline(app, tmp_path):
    from covid_cls.synthetic import non_xray_images

    _, client, _, _ = app
    photo = tmp_path / "holiday.png"
    non_xray_images(1, 200, seed=3)["colour_scene"][0].save(photo)
    probs, overlay, info = client.predict(handle_file(str(photo)), "resnet18", "fc", "", api_name="/predict")
    assert probs["label"] == UNCERTAIN                  # the label's headline, where a class would be
    assert {c["label"] for c in probs["confidences"]} == {"infected", "normal"}   # probabilities still shown
    assert f"### Prediction: **{UNCERTAIN}**" in info and "Why:" in info and "coloured" in info
    assert "not a diagnosis" in info


def test_evaluate_endpoint_on_the_demo_data_returns_metrics_with_cis(app):
    import re

    _, client, _, _ = app
    name = client.predict(api_name="/models")[0]["file"]
    table, sources, summary, roc, rc = client.predict(name, "synthetic demo set", "", None, "test",
                                                      api_name="/evaluate")
    assert table["headers"][:3] == ["split", "AUC [95% CI]", "sensitivity [95% CI]"]
    [row] = table["data"]
    assert row[0] == "test" and re.fullmatch(r"\d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]", row[1]), row
    assert "of images flagged" in summary and "SYNTHETIC" in summary and roc is not None
    with pytest.raises(Exception, match="outside the folders"):
        client.predict(name, "server folder", "/etc", None, "test", api_name="/evaluate")


def test_study_runs_each_pair_and_reports_a_table(app):
    _, client, settings, _ = app
    updates = list(client.submit("synthetic demo set", "", None, ["resnet18"], ["fc", "partial"], 1, 1e-3, "adam",
                                 "none", 64, api_name="/study"))
    progress, plot, table, log = updates[-1]
    assert "done" in progress
    assert [(r[0], r[1]) for r in table["data"]] == [("resnet18", "fc"), ("resnet18", "partial")]
    vs_fc = table["headers"].index("vs fc (paired, test)")
    assert "[" in table["data"][0][table["headers"].index("test AUC [95% CI]")]
    assert table["data"][0][vs_fc] == "–" and "p" in table["data"][1][vs_fc]   # partial tested against fc
    assert "run 1/2" in "".join(u[0] for u in updates) or "=== run 1/2" in log
    assert list((settings.runs / "studies").glob("*/study.csv"))


def test_stop_ends_the_run_without_a_checkpoint(app):
    _, client, settings, _ = app
    before = set(settings.checkpoints.glob("*"))   # weights, cards, temporary files: nothing may be added
    # level full: seconds per epoch even at 64 px (fc on cached features could finish 50 epochs in a second,
    # before the second Start below is even sent)
    job = _train(client, epochs=50, level="full")
    # wait until it is really training, then stop
    deadline = time.time() + 120
    while time.time() < deadline and not any("epoch 1/50" in (u[2] or "") for u in job.outputs()):
        time.sleep(0.2)
    with pytest.raises(Exception, match="already in progress"):
        _train(client, epochs=1).result()
    assert "Stopping" in client.predict(api_name="/stop")
    last = job.result(timeout=60)
    assert "stopped" in last[0]
    assert set(settings.checkpoints.glob("*")) == before


def test_bad_upload_is_a_clear_error(app, tmp_path):
    _, client, _, _ = app
    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image")
    with pytest.raises(Exception, match="(?i)not an image|cannot|unreadable|not a"):
        client.predict(handle_file(str(bad)), "resnet18", "fc", "", api_name="/predict")


def test_folder_outside_allowed_roots_is_refused(app, tmp_path):
    _, client, _, _ = app
    with pytest.raises(Exception, match="outside the folders"):
        client.predict("server folder", str(tmp_path), None, api_name="/scan")
