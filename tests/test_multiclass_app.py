"""Your own classes in the app (issue 13 #4): a 3-class model (covid / normal / pneumonia) predicts with every
class's probability, explains any class it knows, and every table, plot and text takes its class names from the
card or the dataset. The app's handlers are called directly (no server), as in test_ui_handlers.py; one test
goes through HTTP."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from helpers import copy_checkpoint, flat_labelled_folder, launched_app

gr = pytest.importorskip("gradio")

THREE = ["covid", "normal", "pneumonia"]
PREDICT_PARAMETERS = ["path", "arch", "level", "checkpoint"]   # what API clients of /predict send, in order


@pytest.fixture
def three_svc(svc, three_class_checkpoint):
    copy_checkpoint(three_class_checkpoint, svc.settings.checkpoints)
    return svc


@pytest.fixture(scope="module")
def app_info(tmp_path_factory):
    """The built app (no server) and its API description."""
    from covid_cls.ui import Settings, build_app

    root = tmp_path_factory.mktemp("built")
    demo = build_app(Settings(checkpoints=root / "checkpoints", runs=root / "runs"))
    return demo, demo.get_api_info()


def _upload(data: Path, tmp_path: Path, cls: str = "pneumonia", name: str = "xray.png") -> str:
    """A fresh copy of one test image of class ``cls`` (the handlers delete the uploads they read)."""
    src = sorted((data / "test" / cls).glob("*.png"))[0]
    dst = tmp_path / name
    shutil.copy(src, dst)
    return str(dst)


# ---------------------------------------------------------------------------------------------
# the Predictor
# ---------------------------------------------------------------------------------------------


def test_the_predictor_answers_in_the_cards_classes_and_explains_any_of_them(three_class_checkpoint,
                                                                           three_class_data):
    from covid_cls import Predictor
    from covid_cls.errors import ConfigError, CovidClsError

    pred = Predictor(three_class_checkpoint.parent, device="cpu")
    image = _upload(three_class_data, three_class_checkpoint.parent.parent, name="p.png")
    p = pred.predict(image, checkpoint=three_class_checkpoint)
    assert list(p.probs) == THREE == p.card.classes and abs(sum(p.probs.values()) - 1) < 1e-5
    assert p.explained == max(p.probs, key=p.probs.get)   # by default the map explains the most probable class
    other = next(c for c in THREE if c != p.explained)
    q = pred.predict(image, checkpoint=three_class_checkpoint, explain_class=other)
    assert q.explained == other and q.probs == p.probs
    assert q.cam.shape == p.cam.shape and not np.allclose(q.cam, p.cam)
    with pytest.raises(ConfigError, match="no class 'viral'.*covid, normal, pneumonia") as info:
        pred.predict(image, checkpoint=three_class_checkpoint, explain_class="viral")
    assert isinstance(info.value, CovidClsError)
    # a batch explains the named class for every image; an unknown one is refused before any file is read
    batch = pred.predict_batch([image, image], checkpoint=three_class_checkpoint, explain_class=other)
    assert [b.explained for b in batch] == [other, other] and np.allclose(batch[0].cam, q.cam, atol=1e-4)
    with pytest.raises(ConfigError, match="covid, normal, pneumonia"):
        pred.predict_batch(["/no/such/file.png"], checkpoint=three_class_checkpoint, explain_class="infected")


# ---------------------------------------------------------------------------------------------
# Predict tab
# ---------------------------------------------------------------------------------------------


def test_the_predict_tab_shows_three_probabilities_and_redraws_for_a_chosen_class(three_svc, three_class_data,
                                                                                  tmp_path, app_info):
    from covid_cls.ui.predict import (
        BEST,
        PREDICTED,
        explain,
        explain_after_predict,
        explain_options,
        predict,
    )

    svc = three_svc
    value, overlay, info, state = predict(svc, _upload(three_class_data, tmp_path), "resnet18", "fc", BEST, None)
    label, probs = value
    assert list(probs) == THREE and abs(sum(probs.values()) - 1) < 1e-5
    # what the app's label component sends: every class, none cut by num_top_classes
    demo, _ = app_info
    [component] = [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "cc-label"]
    assert {c.label for c in component.postprocess(value).confidences} == set(THREE)
    predicted = max(probs, key=probs.get)
    assert f"Grad-CAM of **{predicted}** (the most probable class)" in info
    assert "chosen on validation" not in info   # no threshold rule with three classes
    # the dropdown offers the model's classes, after a prediction and for the chosen model
    assert explain_after_predict(state)["choices"] == [PREDICTED, *THREE]
    assert explain_options(svc, "resnet18", "fc", BEST)["choices"] == [PREDICTED, *THREE]
    assert explain_options(svc, "vgg16", "full", BEST)["choices"] == [PREDICTED]   # no model for that pair
    # a re-draw for another class: a new overlay and map, the info says which class it explains
    other = next(c for c in THREE if c != predicted)
    drawn, info2, state2 = explain(svc, other, 0.45, state)
    assert drawn.mode == "RGB" and drawn.size == overlay.size
    assert f"Grad-CAM of **{other}** (chosen under *Explain class*)" in info2 and predicted not in info2.split(
        "**Heatmap:**")[1].split("\n")[0]
    assert not np.array_equal(state2["cam"], state["cam"]) and state2["classes"] == THREE
    # back to the predicted class: the map of the prediction again
    _, info3, state3 = explain(svc, PREDICTED, 0.45, state2)
    assert np.array_equal(state3["cam"], state["cam"]) and "(the most probable class)" in info3
    with pytest.raises(gr.Error, match="Press Predict first"):
        explain(svc, other, 0.45, None)
    with pytest.raises(gr.Error, match="whose classes are covid, normal, pneumonia"):
        explain(svc, "infected", 0.45, state)


def test_the_predict_endpoint_keeps_its_signature(app_info):
    _, info = app_info
    predict = info["named_endpoints"]["/predict"]
    assert [p["parameter_name"] for p in predict["parameters"]] == PREDICT_PARAMETERS
    assert [r["component"] for r in predict["returns"]] == ["Label", "Image", "Markdown"]
    assert "into the model's classes" in predict["description"]


# ---------------------------------------------------------------------------------------------
# Train, Models, Compare, batch: columns and plots from the classes
# ---------------------------------------------------------------------------------------------


def test_the_scan_table_has_one_column_per_class(svc, three_class_data, demo_data):
    from covid_cls.ui.train import scan

    svc.settings.roots_env = f"{three_class_data.parent}:{demo_data.parent}"
    md, rows, root = scan(svc, "server folder", str(three_class_data), None)
    assert rows.headers == ["split", *THREE] and [r[0] for r in rows] == ["train", "validation", "test"]
    assert all(len(r) == 4 for r in rows) and f"{sum(sum(r[1:]) for r in rows)} images, 3 classes" in md
    sent = gr.Dataframe().postprocess({"headers": rows.headers, "data": [list(r) for r in rows]})
    assert sent.headers == ["split", *THREE]
    _, binary, _ = scan(svc, "server folder", str(demo_data), None)
    assert binary.headers == ["split", "infected", "normal"]


def test_models_compare_and_batch_name_the_three_classes(three_svc, three_class_data, tmp_path):
    from covid_cls.ui.batch import predict_batch
    from covid_cls.ui.common import confusion_figure
    from covid_cls.ui.compare import compare
    from covid_cls.ui.models import model_details, models_json, models_table

    svc = three_svc
    rows, _ = models_table(svc)
    assert rows[0][-1] == "covid, normal, pneumonia" and models_json(svc)[0]["classes"] == THREE
    md, _, roc = model_details(svc, rows[0][0])
    assert "**Classes:** covid, normal, pneumonia" in md and "macro AUC" in md
    assert set(THREE) <= {t.split(" (")[0] for t in roc.axes[0].get_legend_handles_labels()[1]}
    [card] = svc.cards()
    cm = confusion_figure(card.split_metrics("test"), "test", card)
    assert [t.get_text() for t in cm.axes[0].get_xticklabels()] == THREE
    gallery, table = compare(svc, _upload(three_class_data, tmp_path), None)
    assert len(gallery) == len(table) == 1 and table.headers[3] == "p(covid)"
    assert table.headers[-1] == "probabilities (all classes)" and all(c in table[0][-1] for c in THREE)
    frame, csv_path, _ = predict_batch(svc, [_upload(three_class_data, tmp_path, "covid", "a.png"),
                                             _upload(three_class_data, tmp_path, "normal", "b.png")],
                                       "resnet18", "fc", "", progress=lambda *a, **k: None)
    assert [c for c in frame.columns if c.startswith("p_")] == [f"p_{c}" for c in THREE]
    assert Path(csv_path).read_text().splitlines()[0].count("p_") == 3


# ---------------------------------------------------------------------------------------------
# Evaluate on a flat folder: the model's classes
# ---------------------------------------------------------------------------------------------


def test_the_flat_folder_check_wants_the_models_classes(three_svc, three_class_data, demo_data, tmp_path):
    from covid_cls.ui import evaluate as ev

    svc = three_svc
    svc.settings.roots_env = str(tmp_path / "allowed")
    three = flat_labelled_folder(three_class_data, tmp_path / "allowed" / "three")
    binary = flat_labelled_folder(demo_data, tmp_path / "allowed" / "binary")
    [name] = [Path(c.path).name for c in svc.cards()]
    table, _, md, roc, _ = ev.evaluate(svc, name, "server folder", str(three), None, ev.FLAT)
    assert table[0][0] == "test (macro)" and {r[0] for r in table[1:]} == {f"test · {c}" for c in THREE}
    n = {c: len(list((three / c).glob("*.png"))) for c in THREE}
    assert f"({n['covid']} covid, {n['normal']} normal, {n['pneumonia']} pneumonia)" in md
    assert set(THREE) <= {t.split(" (")[0] for t in roc.axes[0].get_legend_handles_labels()[1]}
    # infected/ is no class of this model (normal/ alone would be measured: only some classes is allowed)
    with pytest.raises(gr.Error, match=r"unexpected folder\(s\) infected \(expected exactly covid, normal, pneumonia"):
        ev.evaluate(svc, name, "server folder", str(binary), None, ev.FLAT)
    shutil.rmtree(binary / "normal")
    shutil.rmtree(binary / "infected")
    (binary / "cats").mkdir()
    with pytest.raises(gr.Error, match=r"not a flat labelled folder for this model.*covid/ normal/ pneumonia/"):
        ev.evaluate(svc, name, "server folder", str(binary), None, ev.FLAT)


# ---------------------------------------------------------------------------------------------
# the Hub model card
# ---------------------------------------------------------------------------------------------


def test_the_model_card_names_the_three_classes(three_class_checkpoint):
    from covid_cls import modelcard
    from covid_cls.checkpoints import read_card

    text = modelcard.render(read_card(three_class_checkpoint), "alice/three")
    assert "Chest X-ray: covid vs normal vs pneumonia" in text
    assert "tell `covid`, `normal` and `pneumonia` chest X-rays apart" in text
    assert "most probable of the 3 classes" in text and "infected" not in text.split("## Licence")[0]
    assert "| class | n | AUC |" in text and all(f"| {c} |" in text for c in THREE)


# ---------------------------------------------------------------------------------------------
# over HTTP
# ---------------------------------------------------------------------------------------------


@pytest.mark.http
def test_predict_over_http_returns_three_confidences(three_class_checkpoint, three_class_data, tmp_path):
    from gradio_client import handle_file

    from covid_cls.ui import Settings

    settings = Settings(checkpoints=tmp_path / "checkpoints", runs=tmp_path / "runs", training=False)
    copy_checkpoint(three_class_checkpoint, settings.checkpoints)
    with launched_app(settings) as served:
        label, _, info = served.client().predict(handle_file(_upload(three_class_data, tmp_path)), "resnet18", "fc",
                                                 "", api_name="/predict")
    assert {c["label"] for c in label["confidences"]} == set(THREE)
    assert "**Heatmap:** Grad-CAM of" in info


@pytest.mark.browser
@pytest.mark.http
@pytest.mark.slow
def test_in_a_browser_explain_class_offers_the_classes_and_redraws(three_class_checkpoint, three_class_data,
                                                                    tmp_path):
    """The real page: after Predict the dropdown lists the model's classes; picking one re-draws the overlay and
    the info names it (headless Debian Chromium, as tests/test_browser.py)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.skip("Debian chromium is not installed (apt-get install -y chromium)")
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    from covid_cls.ui import Settings

    settings = Settings(checkpoints=tmp_path / "checkpoints", runs=tmp_path / "runs")
    copy_checkpoint(three_class_checkpoint, settings.checkpoints)
    with launched_app(settings) as app, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--headless", "--no-sandbox", "--disable-gpu"])
        pg = browser.new_page(viewport={"width": 1300, "height": 1000})
        pg.goto(app.url, wait_until="domcontentloaded")
        pg.get_by_role("button", name="Predict", exact=True).wait_for(timeout=60_000)
        pg.locator("input[type=file]").first.set_input_files(_upload(three_class_data, tmp_path))
        pg.locator("#cc-preview img").wait_for(timeout=30_000)
        pg.get_by_role("button", name="Predict", exact=True).click()
        pg.locator("#cc-info").get_by_text("Heatmap:").wait_for(timeout=60_000)
        label = pg.locator("#cc-label").inner_text()
        assert all(c in label for c in THREE)
        before = pg.locator("#cc-overlay img").get_attribute("src")
        shown = pg.locator("#cc-info").inner_text()
        predicted = shown.split("Grad-CAM of ")[1].split(" (")[0]
        other = next(c for c in THREE if c != predicted)
        pg.locator("#cc-explain input").click()
        options = [o.split("\n")[-1] for o in pg.get_by_role("option").all_inner_texts()]
        assert options == ["most probable class", *THREE]
        pg.get_by_role("option", name=other, exact=True).click()
        pg.locator("#cc-info").get_by_text("chosen under").wait_for(timeout=60_000)
        assert f"Grad-CAM of {other} (chosen under Explain class)" in pg.locator("#cc-info").inner_text()
        pg.wait_for_function("src => document.querySelector('#cc-overlay img').src !== src", arg=before,
                             timeout=30_000)
        assert pg.get_by_text("Error").count() == 0
        browser.close()
