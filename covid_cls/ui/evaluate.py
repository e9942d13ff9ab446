"""Models tab, "Evaluate on another dataset": a saved model on a labelled folder it was not trained on (a server
folder under the data roots, an uploaded zip, or the demo set) -> metrics with 95 % CIs, one row per source of a
MANIFEST.csv, how the abstention rule behaves there, ROC and risk-coverage. Endpoint ``/evaluate``.

Runs in the request thread, bounded: at most MAX_IMAGES images (about a second per 100 images for ResNet18 on
a CPU), one evaluation at a time. Allowed with training switched off: it trains nothing and starts no worker.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path

import gradio as gr

from ..errors import DatasetError
from .common import DISCLAIMER, discard_upload, user_errors
from .services import Services
from .train import METRIC_HEADERS, SOURCES, DataSource, metrics_rows, resolve_dataset

MAX_IMAGES = 5000
# The flat-folder choice's VALUE is what /evaluate and /compare_models clients send: kept as it always was; the
# label users see says what a flat folder holds for any model (its classes' folders)
FLAT = "flat folder (infected/ normal/ directly inside)"
FLAT_LABEL = "flat folder (one folder per class directly inside, e.g. infected/ normal/)"
SPLIT_CHOICES = ["test", "validation", "train", FLAT]
SOURCE_HEADERS = ["source"] + METRIC_HEADERS[1:]


def eval_dataset(svc: Services, source: str, folder: str | None, zip_path: str | None,
                 split: str, classes: Sequence[str] = ("infected", "normal")) -> tuple[Path, str]:
    """(resolved root, split name to evaluate) after the Train tab's checks (data roots, safe zip), the
    layout check against the model's ``classes`` and the size bound; nothing is decoded before these pass."""
    from ..data import scan_dataset

    if source not in SOURCES:
        raise gr.Error(f"Pick a dataset source: {', '.join(SOURCES)}.")
    if split not in SPLIT_CHOICES:
        raise gr.Error(f"Pick a split: {', '.join(SPLIT_CHOICES)}.")
    folders = " ".join(f"{c}/" for c in classes)
    if source == SOURCES[2] and not zip_path:
        raise gr.Error(f"Upload a .zip with train/ validation/ test/ splits, each with one folder per class of "
                       f"the model ({folders}).")
    root = resolve_dataset(svc, DataSource(source, folder or "", zip_path), for_training=False)
    name = "test" if split == FLAT else split
    if split == FLAT and not any((root / c).is_dir() for c in classes):
        raise DatasetError(f"{root.name}/ is not a flat labelled folder for this model: it needs folders named "
                           f"like the model's classes ({folders}) directly inside (or pick a split)")
    n = len(scan_dataset(root, splits=(name,), classes=list(classes), partial_ok=True).splits[name].files)
    if n > MAX_IMAGES:
        raise DatasetError(f"{n:,} images: evaluation here is limited to {MAX_IMAGES:,}; use the command line "
                           f"(python -m covid_cls evaluate --checkpoint ... --data {root.name})")
    return root, name


@user_errors
def evaluate(svc: Services, checkpoint: str | None, source: str, folder: str | None, zip_path: str | None,
             split: str = "test"):
    """/evaluate -> metrics table (with CIs), per-source table, summary markdown, ROC, risk-coverage."""
    from ..evaluation import evaluate_checkpoint

    try:
        [card] = checkpoint_cards(svc, checkpoint)
        root, name = eval_dataset(svc, source, folder, zip_path, split, card.classes)
    finally:
        discard_upload(zip_path)   # read or refused, an upload is not kept (only this request's: issue 11 #9)
    r = evaluate_checkpoint(svc.checkpoint_path(checkpoint), root, split=name,
                            roots=svc.settings.roots())   # every file checked when opened (symlinks)
    sources = metrics_rows(r["subsets"], tuple(r["subsets"]))
    return (metrics_rows({name: r}, (name,)), sources, evaluation_markdown(card, r, root, split),
            *evaluation_figures(r))


def checkpoint_cards(svc: Services, *names: str | None) -> list:
    """The cards of the named checkpoints (names in the checkpoint folder), or a message saying which is missing."""
    cards = []
    for name in names:
        if not name:
            raise gr.Error("Select a checkpoint first.")
        card = svc.card(name)
        if card is None:
            raise gr.Error(f"`{name}` is no longer available.")
        cards.append(card)
    return cards


def evaluation_markdown(card, r: dict, root: Path, split: str) -> str:
    from .. import report as rp

    labels, classes = r["labels"], list(r["classes"])
    # per class, the positive one first ("12 infected, 12 normal"; "8 covid, 8 normal, 8 pneumonia")
    order = [card.positive] + [c for c in classes if c != card.positive]
    counts = ", ".join(f"{sum(1 for y in labels if y == classes.index(c))} {c}" for c in order)
    where = "the whole folder (flat)" if split == FLAT else f"split **{split}**"
    synthetic = "  \n_SYNTHETIC images — they say nothing about real X-rays._" if "demo_data" in str(root) else ""
    sel = r["selective"]
    rule = rp.threshold_text(r["threshold"], card.positive, len(classes))
    lines = [
        f"**{card.title}** `{Path(card.path).name}` on `{root.name}`, {where}: {len(labels)} images "
        f"({counts}){synthetic}",
        f"**Decision:** {rule} · 95 % CIs: stratified bootstrap",
        f"**Says \"uncertain\":** {rp.selective_line(sel)}",
        f"**Near-duplicates of training images:** {rp.duplicates_line(r['duplicates'], len(labels))}",
    ]
    if rp.reasons_line(sel):
        lines.insert(3, f"<small>flagged by: {rp.reasons_line(sel)}</small>")
    if r.get("skipped"):
        lines.append(f"Skipped {len(r['skipped'])} unreadable file(s).")
    lines += [f"**Note:** {note}" for note in r.get("notes", [])]
    return "  \n".join(lines) + f"\n\n**{DISCLAIMER}**"


def evaluation_figures(r: dict):
    from .. import plots

    sel = r["selective"]
    acc = sel.get("answered_accuracy")
    rule = (1.0 - sel["flagged"], 1.0 - acc) if acc is not None else None
    if r.get("roc_per_class"):   # more than two classes: one curve per class vs the rest
        roc = plots.roc_one_vs_rest(r["roc_per_class"], r.get("per_class"))
    else:
        roc = plots.roc({"all": (r["roc"]["fpr"], r["roc"]["tpr"], r["auc"])},
                        title=f"ROC (positive: {r.get('positive', 'infected')})")
    return roc, plots.risk_coverage(sel["risk_coverage"], sel.get("aurc"), rule)


def build(svc: Services, pick: gr.Dropdown) -> None:
    """The section, under the Models tab's checkpoint picker (``pick``: the model evaluated)."""
    with gr.Accordion("Evaluate on another dataset", open=False):
        gr.Markdown("The selected checkpoint on labelled X-rays it was not trained on — e.g. from other hospitals "
                    "— with 95 % confidence intervals, one row per source (`MANIFEST.csv`), and how often it says "
                    f"\"uncertain\" (and on which wrong answers). At most {MAX_IMAGES:,} images.")
        with gr.Row():
            with gr.Column(scale=1):
                inputs = data_inputs()
                run = gr.Button("Evaluate", variant="primary")
            with gr.Column(scale=2):
                summary = gr.Markdown(elem_id="cc-eval-summary")
                table = gr.Dataframe(headers=METRIC_HEADERS, interactive=False, label="Metrics (95 % CIs)")
                sources = gr.Dataframe(headers=SOURCE_HEADERS, interactive=False, label="Per source")
                with gr.Row():
                    roc = gr.Plot(label="ROC")
                    rc = gr.Plot(label="Risk-coverage")
    run.click(partial(evaluate, svc), [pick, *inputs], [table, sources, summary, roc, rc],
              api_name="evaluate", concurrency_limit=1, concurrency_id="evaluate")


def data_inputs() -> list:
    """Dataset source, server folder, zip upload and split inputs (also the Compare tab's paired test)."""
    source = gr.Radio(SOURCES, value=SOURCES[1], label="Dataset")
    folder = gr.Textbox(label="Server folder (under COVID_CLS_DATA_ROOTS)", placeholder="/data/cxr-shift")
    zip_up = gr.File(label="Labelled .zip", file_types=[".zip"], visible=False, type="filepath")
    split = gr.Radio([(FLAT_LABEL if c == FLAT else c, c) for c in SPLIT_CHOICES], value="test", label="Split")
    source.change(lambda s: (gr.update(visible=s == SOURCES[1]), gr.update(visible=s == SOURCES[2])),
                  [source], [folder, zip_up], api_visibility="private")
    return [source, folder, zip_up, split]
