"""Compare tab: one image -> the Grad-CAM and probabilities of the best model of every (arch, level); and two
models on one labelled dataset -> a paired test of their AUCs (the same images, DeLong)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import gradio as gr

from .common import Rows, discard_upload, headed_table, read_upload, unique_image, user_errors
from .evaluate import data_inputs
from .predict import upload_preview
from .services import Services

HEADERS = ["arch", "level", "prediction", "p(infected)", "weights", "ms"]   # the 2020 task's models


def compare_headers(positives: set[str], several: bool) -> list[str]:
    """The table's columns: p(<the models' positive class>) (``p(positive class)`` when they differ), and a
    column with every class's probability when some model has more than two classes."""
    pos = f"p({next(iter(positives))})" if len(positives) == 1 else "p(positive class)"
    return [*HEADERS[:3], pos, *HEADERS[4:]] + (["probabilities (all classes)"] if several else [])
PAIRED_HEADERS = ["model", "AUC [95% CI]"]


@user_errors
def compare(svc: Services, path: str | None, session: dict | None = None):
    """-> gallery of (overlay, caption), table rows. Uses this tab's upload, else the Predict tab's image."""
    from ..models import ARCHS, LEVELS

    if session and (not path or not Path(path).exists()):
        image = session["image"]
    else:
        image = read_upload(path, svc.settings.max_upload)
    trained = {(c.arch, c.level) for c in svc.cards()}
    gallery, preds = [], []
    for arch in ARCHS:
        for level in LEVELS:
            if (arch, level) not in trained:
                continue
            p = svc.predict(image, arch, level)   # the best for the pair, exactly as Predict picks it
            pinf = p.probs.get(p.card.positive, 0.0)
            gallery.append((unique_image(p.overlay), f"{p.card.title}: {p.label} ({p.card.positive} {pinf:.0%})"))
            preds.append(p)
    if not preds:
        raise gr.Error("No trained models yet: train one in the Train tab first.")
    several = any(p.card.num_classes > 2 for p in preds)
    rows = []
    for p in preds:
        row = [ARCHS[p.card.arch].title, p.card.level, p.label, p.probs.get(p.card.positive, 0.0),
               p.card.weights_origin, round(p.latency_ms, 1)]
        rows.append(row + ([" · ".join(f"{k} {v:.2f}" for k, v in p.probs.items())] if several else []))
    return gallery, Rows(rows, compare_headers({p.card.positive for p in preds}, several))


@user_errors
def compare_models(svc: Services, a: str | None, b: str | None, source: str, folder: str | None,
                   zip_path: str | None, split: str = "test"):
    """/compare_models: two checkpoints on the same labelled images -> (AUC rows with CIs, verdict markdown)."""
    from .. import report as rp
    from ..evaluation import compare_checkpoints
    from .evaluate import checkpoint_cards, eval_dataset

    try:
        card_a, _ = checkpoint_cards(svc, a, b)
        root, name = eval_dataset(svc, source, folder, zip_path, split, card_a.classes)
    finally:
        discard_upload(zip_path)   # read or refused, an upload is not kept (only this request's: issue 11 #9)
    try:
        r = compare_checkpoints(svc.checkpoint_path(a), svc.checkpoint_path(b), root, split=name,
                                roots=svc.settings.roots())   # every file checked when opened (symlinks)
    except ValueError as exc:   # different classes or images: the user's choice, not a bug
        raise gr.Error(str(exc)) from None
    rows = [[n, rp.with_ci({"auc": r[f"auc_{k}"], "ci": {"auc": r.get(f"auc_{k}_ci")}}, "auc")]
            for n, k in ((a, "a"), (b, "b"))]
    # two classes: "12 infected, 12 normal"; more: the counts per class and the macro AUC (paired bootstrap)
    test = ("(DeLong), paired bootstrap " + rp.interval([r["boot_ci_low"], r["boot_ci_high"]])
            if r.get("about") != "macro" else "(paired class-stratified bootstrap)")
    md = (f"**{rp.verdict(r, a, b)}** — on {r['n']} images of `{root.name}` ({rp.compared_images(r)}), both "
          f"models on the same images.  \n"
          f"Difference A − B: {rp.signed(r['diff'])} AUC {rp.interval([r['ci_low'], r['ci_high']])} {test}, "
          f"{rp.p_text(r['p_value'])}.")
    return rows, md


def checkpoint_names(svc: Services):
    names = [Path(c.path).name for c in svc.cards()]
    return gr.update(choices=names), gr.update(choices=names)


def build(svc: Services, session: gr.State) -> None:
    gr.Markdown("One image → Grad-CAM of every available (architecture, level), to see what deeper "
                "fine-tuning changes. Uses the image from the Predict tab, or upload one here.")
    upload = gr.File(label="Chest X-ray", type="filepath")
    button = gr.Button("Compare all models", variant="primary")
    gallery = gr.Gallery(label="Grad-CAM per model", columns=3, height="auto", format="jpeg")
    table = headed_table(headers=HEADERS, interactive=False)   # columns from the models' classes (compare_headers)
    upload.upload(partial(upload_preview, svc), [upload], [gr.Image(visible=False), session],
                  api_visibility="private")
    button.click(partial(compare, svc), [upload, session], [gallery, table], api_name="compare",
                 concurrency_id="predict")
    with gr.Accordion("Compare two models on a dataset (paired test)", open=False):
        gr.Markdown("Is one model really better, or is the difference noise? Both models score the same labelled "
                    "images; the AUC difference gets a 95 % interval and a p-value (DeLong test).")
        with gr.Row():
            # custom values: /compare_models names checkpoints in a session whose choices were never filled in
            a = gr.Dropdown([], label="Model A", allow_custom_value=True)
            b = gr.Dropdown([], label="Model B", allow_custom_value=True)
        inputs = data_inputs()
        run = gr.Button("Compare on this dataset")
        verdict = gr.Markdown()
        aucs = gr.Dataframe(headers=PAIRED_HEADERS, interactive=False)
    for dd in (a, b):
        dd.focus(partial(checkpoint_names, svc), None, [a, b], api_visibility="private")
    run.click(partial(compare_models, svc), [a, b, *inputs], [aucs, verdict], api_name="compare_models",
              concurrency_limit=1, concurrency_id="evaluate")
