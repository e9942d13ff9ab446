"""The Gradio app through its HTTP API (gradio_client), launched on a local port."""

from __future__ import annotations

import socket
import time

import pytest
from PIL import Image

from conftest import CXR_FULLRES

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from covid_cls.ui import CSS, Settings, build_app

    root = tmp_path_factory.mktemp("app")
    settings = Settings(checkpoints=root / "checkpoints", runs=root / "runs", training=True,
                        max_upload=50 * 2**20, roots_env="")
    demo = build_app(settings)
    port = _free_port()
    t0 = time.perf_counter()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, css=CSS, quiet=True)
    print(f"\nlaunch to listening: {time.perf_counter() - t0:.2f}s")
    client = Client(f"http://127.0.0.1:{port}", verbose=False)
    yield demo, client, settings, port
    demo.close()


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
    assert {"/predict", "/train", "/study", "/models", "/stop"} <= names


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
    assert probs["label"] in ("infected", "normal")
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


def test_study_runs_each_pair_and_reports_a_table(app):
    _, client, settings, _ = app
    updates = list(client.submit("synthetic demo set", "", None, ["resnet18"], ["fc", "partial"], 1, 1e-3, "adam",
                                 "none", 64, api_name="/study"))
    progress, plot, table, log = updates[-1]
    assert "done" in progress
    assert [(r[0], r[1]) for r in table["data"]] == [("resnet18", "fc"), ("resnet18", "partial")]
    assert "run 1/2" in "".join(u[0] for u in updates) or "=== run 1/2" in log
    assert list((settings.runs / "studies").glob("*/study.csv"))


def test_stop_ends_the_run_without_a_checkpoint(app):
    _, client, settings, _ = app
    before = set(settings.checkpoints.glob("*.pt"))
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
    assert set(settings.checkpoints.glob("*.pt")) == before


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
