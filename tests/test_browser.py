"""The app in a real browser: headless Debian Chromium driven by Playwright (never `playwright install`).

Set UPDATE_SCREENSHOTS=1 to refresh the README screenshots in docs/ (served with a quick demo model, trained
first: ~25 s more; docs/predict.png shows the first example).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from helpers import CXR_FULLRES, copy_checkpoint, launched_app

pytestmark = [pytest.mark.browser, pytest.mark.http, pytest.mark.slow]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if not CHROMIUM and not os.environ.get("CI"):
    pytest.skip("Debian chromium is not installed (apt-get install -y chromium)", allow_module_level=True)
sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright

DOCS = Path(__file__).resolve().parents[1] / "docs"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic"]


@pytest.fixture(scope="module")
def served(tmp_path_factory, fc_checkpoint):
    from covid_cls.ui import Settings

    root = tmp_path_factory.mktemp("browser")
    ck = root / "checkpoints"
    if os.environ.get("UPDATE_SCREENSHOTS"):   # the README shows what the quick demo model gives (~25 s more)
        from dataclasses import replace

        from covid_cls import TrainConfig, fit, make_demo_dataset
        from covid_cls.ui.train import QUICK_DEMO

        data = make_demo_dataset(root / "demo", n_per_class=40, size=256)
        fit(replace(TrainConfig(data_dir=str(data), out_dir=str(ck), weights="none"), **QUICK_DEMO))
    else:
        copy_checkpoint(fc_checkpoint, ck)
    settings = Settings(checkpoints=ck, runs=root / "runs", training=True)
    with launched_app(settings) as app:
        yield app.url, root


@pytest.fixture(scope="module")
def page(served):
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        pg = browser.new_page(viewport={"width": 1300, "height": 1000})
        pg.goto(served[0], wait_until="domcontentloaded")
        pg.get_by_role("button", name="Predict", exact=True).wait_for(timeout=60_000)
        yield pg
        browser.close()


def _shot(page, name: str, tmp_path: Path) -> None:
    target = DOCS / name if os.environ.get("UPDATE_SCREENSHOTS") else tmp_path / name
    target.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(target), full_page=False)
    if os.environ.get("UPDATE_SCREENSHOTS"):  # keep committed screenshots small: 256-colour PNG
        from PIL import Image

        with Image.open(target) as im:
            im.convert("RGB").quantize(256).save(target, optimize=True)


def test_upload_predict_shows_overlay_and_label(page, served, tmp_path):
    real = sorted(CXR_FULLRES.glob("*.png")) if CXR_FULLRES.is_dir() else []
    if real:
        image = real[0]
    else:
        from PIL import Image

        from covid_cls.synthetic import synthetic_xray

        image = tmp_path / "synthetic.png"
        Image.fromarray(synthetic_xray(384, infected=True, seed=5)[0]).save(image)
    page.locator("input[type=file]").first.set_input_files(str(image))
    page.locator("#cc-preview img").wait_for(timeout=30_000)   # the preview of the decoded upload
    page.get_by_role("button", name="Predict", exact=True).click()
    page.locator("#cc-overlay img").wait_for(timeout=60_000)
    info = page.locator("#cc-info")
    info.get_by_text("Prediction:").wait_for(timeout=30_000)
    text = info.inner_text()
    assert "not a diagnosis" in text and ("infected" in text or "normal" in text)
    assert page.locator("#cc-overlay img").evaluate("img => img.naturalWidth") > 100
    assert page.get_by_text("Error").count() == 0


def test_an_example_fills_the_upload_and_predicts(page, served, tmp_path):
    """The Predict tab's examples (issue 12 #4): a click shows the image; Predict gives label and heatmap."""
    page.get_by_role("tab", name="Predict").click()
    page.get_by_text("synthetic X-ray with a lesion").first.click()
    page.locator("#cc-preview img").wait_for(timeout=30_000)
    page.get_by_role("button", name="Predict", exact=True).click()
    info = page.locator("#cc-info")
    page.wait_for_function("() => (document.querySelector('#cc-info')?.innerText || '').includes('Prediction:')"
                           " && document.querySelector('#cc-overlay img')", timeout=60_000)
    assert "not a diagnosis" in info.inner_text()
    assert page.locator(ERROR_STYLED).count() == 0
    time.sleep(1)   # let the overlay paint
    _shot(page, "predict.png", tmp_path)


ERROR_STYLED = ".toast-body.error, [data-testid='status-tracker'] .error"   # Gradio's red toast, red output box


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """The app on a fresh machine: no model at all."""
    from covid_cls.ui import Settings

    root = tmp_path_factory.mktemp("fresh")
    settings = Settings(checkpoints=root / "checkpoints", runs=root / "runs", training=True)
    with launched_app(settings) as app:
        yield app.url


def test_predict_without_a_model_guides_and_paints_no_error(page, fresh):
    """Issue 12 #4: before, a red "Error" toast and two red "Error" boxes; now the hint and the button."""
    pg = page.context.browser.new_page(viewport={"width": 1300, "height": 1000})
    try:
        pg.goto(fresh, wait_until="domcontentloaded")
        pg.get_by_role("button", name="Predict", exact=True).wait_for(timeout=60_000)
        pg.get_by_text("synthetic X-ray with a lesion").first.click()
        pg.locator("#cc-preview img").wait_for(timeout=30_000)
        pg.get_by_role("button", name="Predict", exact=True).click()
        pg.locator("#cc-info").get_by_text("No model for ResNet18 · fc yet").wait_for(timeout=30_000)
        time.sleep(1.5)   # a toast would have appeared by now
        assert pg.locator(ERROR_STYLED).count() == 0
        assert pg.get_by_text("Error", exact=True).count() == 0
        assert pg.get_by_role("button", name="Train quick demo model").is_visible()
        assert "Train quick demo model" in pg.locator("#cc-info").inner_text()
    finally:
        pg.close()


def test_a_colour_photo_shows_uncertain_in_the_label_area(page, served, tmp_path):
    from covid_cls.synthetic import non_xray_images

    photo = tmp_path / "holiday.png"
    non_xray_images(1, 200, seed=3)["colour_scene"][0].save(photo)
    pg = page.context.browser.new_page(viewport={"width": 1300, "height": 1000})   # a fresh session
    try:
        pg.goto(served[0], wait_until="domcontentloaded")
        pg.get_by_role("button", name="Predict", exact=True).wait_for(timeout=60_000)
        pg.locator("input[type=file]").first.set_input_files(str(photo))
        pg.locator("#cc-preview img").wait_for(timeout=30_000)
        pg.get_by_role("button", name="Predict", exact=True).click()
        label = pg.locator("#cc-label")
        label.get_by_text("uncertain — outside what this model was trained on").first.wait_for(timeout=60_000)
        text = label.inner_text()
        assert "uncertain" in text and "infected" in text and "normal" in text   # headline + probability bars
        assert "Why:" in pg.locator("#cc-info").inner_text()
    finally:
        pg.close()


def test_tiny_training_run_updates_the_plot(page, served, tmp_path):
    page.get_by_role("tab", name="Train").click()
    epochs = page.get_by_label("number input for Epochs")
    epochs.fill("3")
    epochs.press("Enter")
    page.get_by_role("button", name="Advanced").click()
    size = page.get_by_label("number input for Image size")
    size.fill("64")
    size.press("Enter")
    page.get_by_role("button", name="Start", exact=True).click()
    progress = page.locator("#cc-train-progress")
    progress.get_by_text("running").wait_for(timeout=60_000)
    page.locator("#cc-curves img, #cc-curves svg, #cc-curves canvas").first.wait_for(timeout=60_000)
    deadline = time.time() + 180
    while time.time() < deadline and "done" not in progress.inner_text():
        time.sleep(0.5)
    assert "done" in progress.inner_text(), progress.inner_text()
    assert "epoch 3/3" in page.get_by_label("Log").input_value()
    time.sleep(1)  # let the final plot render
    page.evaluate("document.querySelector('#cc-train-progress').scrollIntoView()")   # progress, curves, log
    time.sleep(0.5)
    _shot(page, "train.png", tmp_path)
