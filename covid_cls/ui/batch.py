"""Batch prediction in the Predict tab and ``/predict_batch`` (issue 12 #3): several files or one zip -> a table
(file, label or "uncertain", probabilities, reasons), a CSV download and a gallery of overlays."""

from __future__ import annotations

import shutil
import tempfile
import time
from functools import partial
from pathlib import Path

import gradio as gr

from .common import BEST, check_text, discard_upload, unique_image, user_errors
from .services import Services

CSV_PREFIX = "covid_cls-csv-"
CSV_KEEP_S = 1800     # a CSV's own temporary folder is removed this long after it was written (Gradio serves a copy)

PREDICT_BATCH_API_DESCRIPTION = (
    "RESEARCH DEMO - NOT A DIAGNOSIS. Classifies many chest X-ray images at once: files = a list of image files "
    "and/or .zip files of images (at most 200 images, each within the upload limit, 512 MB together); arch, level "
    "and checkpoint as for /predict. Returns (1) a table with one row per image: file, label (the class at the "
    "model's operating point, 'uncertain' when the image is out of distribution or ambiguous, or 'error' for a "
    "file that could not be read), decision, one probability column per class, reasons, error; (2) the same "
    "table as a CSV file; (3) a gallery of Grad-CAM overlays. One bad file never fails the batch.")


def _sources(files: list | None) -> list[tuple[str, str]]:
    """The uploads (Gradio: a list of file paths) as (shown name, path)."""
    if files is None or (isinstance(files, list) and not files):
        raise gr.Error("Upload images (or a .zip of images) first.")
    if isinstance(files, str):
        files = [files]
    if not isinstance(files, (list, tuple)):
        raise gr.Error("files must be a list of files")
    out = []
    for f in files:
        path = f.get("path") if isinstance(f, dict) else f     # a FileData dict when called without Gradio
        check_text("each file's path", path)
        out.append((Path(path).name, path))
    return out


def _csv_file(text: str) -> str:
    """Write the CSV into a fresh temporary folder (Gradio serves a copy from its cache); older such folders go."""
    now = time.time()
    for old in Path(tempfile.gettempdir()).glob(f"{CSV_PREFIX}*"):
        try:
            if now - old.stat().st_mtime > CSV_KEEP_S:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass
    path = Path(tempfile.mkdtemp(prefix=CSV_PREFIX)) / "predictions.csv"
    path.write_text(text, encoding="utf-8")
    return str(path)


@user_errors
def predict_batch(svc: Services, files: list | None, arch: str, level: str, checkpoint: str | None,
                  progress=gr.Progress()):
    """Predict many chest X-rays at once -> table, CSV file, gallery of Grad-CAM overlays.

    Research demo, not a diagnosis. One row per image; an image the model abstains on is "uncertain" with its
    reasons, a file that cannot be read is an "error" row. Bounded: 200 images, the upload limit per file,
    512 MB per batch (COVID_CLS_BATCH_MAX_FILES, COVID_CLS_BATCH_MAX_MB)."""
    import pandas as pd

    from .. import batch
    from .predict import no_model_guidance

    sources = _sources(files)
    ck = None if not checkpoint or checkpoint == BEST else checkpoint
    keep_uploads = False
    try:
        if no_model_guidance(svc, arch, level, checkpoint) is not None:
            # In the browser, no model yet is guidance, not a red error (as the Predict button: issue 12 #4); the
            # uploads stay so that "Predict all" works once the quick demo model is trained. API calls get the error.
            keep_uploads = True
            _no_model_warning(svc, arch, level)
            return None, None, []
        # the model first: unknown arch/level or no model at all is said before any file is touched
        svc.predictor.candidates(arch, level, str(svc.checkpoint_path(ck)) if ck else None)
        gallery: list[tuple] = []

        def keep(item, p) -> None:
            caption = f"{item.name}: {'uncertain' if p.abstain else p.label}"
            gallery.append((unique_image(batch.thumbnail(p.overlay)), caption))

        def report(done: int, total: int) -> None:
            progress(done / max(total, 1), desc=f"{done}/{total} images")

        with batch.workdir() as tmp:
            got = batch.collect(sources, tmp, folders=False, **batch.app_limits(svc.settings.max_upload))
            rows = batch.run(got.items, lambda paths: svc.predict_batch([str(p) for p in paths], arch, level, ck),
                             on_progress=report, on_prediction=keep)
    finally:
        for _, path in sources if not keep_uploads else ():
            discard_upload(path)   # only this request's own uploads are deleted (issue 11 #9)
    head, body = batch.table(rows)
    try:
        gr.Info(batch.summary(rows, got.skipped))
    except Exception:  # noqa: BLE001 - outside a Gradio event (tests, scripts)
        pass
    return pd.DataFrame(body, columns=head), _csv_file(batch.to_csv(rows)), gallery


def _no_model_warning(svc: Services, arch: str, level: str) -> None:
    how = ("press “Train quick demo model” under the Predict button (or train one in the Train tab), then “Predict "
           "all” again" if svc.settings.training else "training is off on this server; models come from its "
           "checkpoint folder or the Hugging Face Hub")
    try:
        gr.Warning(f"No model for {arch} · {level} yet: {how}.")
    except Exception:  # noqa: BLE001 - outside a Gradio event (tests, scripts)
        pass


def build(svc: Services, arch, level, ckpt) -> None:
    """The batch section of the Predict tab (uses the tab's arch, level and checkpoint)."""
    with gr.Accordion("Batch: several images or a .zip → table, CSV and overlays", open=False):
        gr.Markdown("<small>At most 200 images per batch (each within the upload limit, 512 MB together); a "
                    "file that cannot be read gets an <b>error</b> row and the others are still answered.</small>")
        with gr.Row():
            files = gr.File(label="Images and/or .zip files", file_count="multiple", type="filepath", scale=3)
            run_btn = gr.Button("Predict all", variant="primary", scale=1)
        table = gr.Dataframe(label="Predictions (label: class at the operating point, or uncertain / error)",
                             interactive=False, wrap=True, elem_id="cc-batch-table")
        csv_file = gr.File(label="CSV", interactive=False)
        gallery = gr.Gallery(label="Grad-CAM overlays", columns=6, height="auto", format="jpeg",
                             elem_id="cc-batch-gallery")
    run_btn.click(partial(predict_batch, svc), [files, arch, level, ckpt], [table, csv_file, gallery],
                  api_name="predict_batch", concurrency_limit=1, concurrency_id="predict_batch",
                  api_description=PREDICT_BATCH_API_DESCRIPTION)
