"""Train tab: pick a dataset (demo set, server folder, uploaded zip), scan it, train one model in a worker
process with live curves, stop it, see the run history. Also the Predict tab's quick demo model."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields, replace
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import gradio as gr

from ..config import TrainConfig
from ..report import METRIC_HEADERS, metrics_rows  # noqa: F401 - the tables' wording lives in report
from .common import (
    TRAINING_OFF,
    Rows,
    config_from,
    confusion_figure,
    discard_upload,  # deletes only this request's upload (issue 11 #9)
    endpoint,
    headed_table,
    option,
    progress_html,
    roc_figure,
    stream,
    user_errors,
)
from .services import Services

if TYPE_CHECKING:
    from ..jobs import Run

SOURCES = ["synthetic demo set", "server folder", "upload .zip"]
# The options of /train, in the order of its HTTP arguments (after source, folder, zip): a public API.
TRAIN_INPUTS = ("arch", "level", "epochs", "lr", "batch_size", "optimizer", "schedule", "loss", "weights", "augment",
                "image_size", "seed")
# How the tab lays them out: rows of the main group, then the "Advanced" accordion.
MAIN_ROWS = (("arch",), ("level",), ("epochs",), ("lr", "batch_size"), ("optimizer", "schedule"),
             ("loss", "weights"), ("augment",))
ADVANCED_ROWS = (("image_size",), ("seed",))
SLIDERS = {"epochs": dict(minimum=1, maximum=50, step=1), "image_size": dict(minimum=64, maximum=320, step=32)}
QUICK_DEMO = dict(epochs=8, optimizer="adam", lr=1e-3, image_size=224)   # arch and level: TrainConfig's defaults
# How long the quick demo takes, as measured through the `quick_demo` handler (issue 12 #4; README "Quick start").
QUICK_DEMO_TIME = "about 25 s on a 2-core CPU"
OFF_NOTE = ("### Training is switched off on this server\nThis deployment sets `COVID_CLS_TRAINING=0` (a public "
            "Space shares one machine between all visitors, and fine-tuning would block it for minutes). Run the "
            "app locally to train: `python app.py`.")


@dataclass
class DataSource:
    """The dataset picked in the Train tab (the Study tab uses the same one)."""

    kind: str                 # one of SOURCES
    folder: str = ""
    zip_path: str | None = None


def quick_demo_title() -> str:
    from ..models import ARCHS

    default = {f.name: f.default for f in fields(TrainConfig)}
    return f"{ARCHS[default['arch']].title} · {default['level']}"


def require_training(svc: Services) -> None:
    if not svc.settings.training:
        raise gr.Error(TRAINING_OFF)


def resolve_dataset(svc: Services, data: DataSource, for_training: bool = True) -> Path:
    """The dataset folder to train on. Refused before any work when training is off: no demo set made, no
    folder read, no zip unpacked. An uploaded zip is deleted whichever source was picked.
    ``for_training=False``: a folder to evaluate on (Models tab), allowed with training off, same checks."""
    from ..safety import check_allowed

    try:
        if for_training:
            require_training(svc)
        if data.kind == SOURCES[0]:
            return svc.demo_data()
        if data.kind == SOURCES[1]:
            return check_allowed(data.folder, svc.settings.roots())
        if not data.zip_path:
            raise gr.Error("Upload a .zip with train/ validation/ test/ × one folder per class (e.g. infected/ "
                           "normal/).")
        return svc.unpack_zip(data.zip_path)
    finally:
        discard_upload(data.zip_path)   # only an upload of this request, never another session's file (#9)


@user_errors
def scan(svc: Services, source: str, folder: str, zip_path: str | None):
    """-> summary markdown, counts per split and class (one column per class folder), the resolved folder."""
    from ..data import scan_dataset

    root = resolve_dataset(svc, DataSource(source, folder, zip_path))
    info = scan_dataset(root, roots=svc.settings.roots())   # symlinks leading out are skipped and listed (#4)
    # the classes are the dataset's folders (2 to 20), so the table's columns are known only now
    rows = Rows([[s, *(c[k] for k in info.classes)] for s, c in info.counts().items()], ["split", *info.classes])
    n_images = sum(sum(r[1:]) for r in rows)
    skipped = "".join(f"\n- `{f}`: {why}" for f, why in info.skipped[:10])
    md = f"**{root}** — {n_images} images, {len(info.classes)} classes ({', '.join(info.classes)})" + (
        f"; skipped {len(info.skipped)} file(s):{skipped}" if info.skipped else "")
    if "demo_data" in str(root):
        md += "  \n_SYNTHETIC images — a model trained on them knows nothing about real X-rays._"
    return md + leakage_markdown(svc, root, n_images), rows, str(root)


LEAKAGE_SCAN_MAX = 5000   # decoding is the cost (~5-10 ms per image); larger sets are checked when training starts


def leakage_markdown(svc: Services, root, n_images: int) -> str:
    """Near-duplicate images across splits (issue 10): decoded once here, reused by training (DecodedCache)."""
    from ..leakage import dataset_leakage
    from ..report import leakage_text

    if n_images > LEAKAGE_SCAN_MAX:
        return leakage_text(None, n_images, LEAKAGE_SCAN_MAX)
    return leakage_text(dataset_leakage(root, roots=svc.settings.roots()))


@user_errors
def train_endpoint(svc: Services, source: str, folder: str, zip_path: str | None, *options):
    """/train: Gradio passes the dataset inputs, then the TRAIN_INPUTS values; packed into a TrainConfig here."""
    yield from train(svc, DataSource(source, folder, zip_path), config_from(TRAIN_INPUTS, options))


def train(svc: Services, data: DataSource, cfg: TrainConfig):
    """Train ``cfg`` on ``data`` in a worker process; yields the tab's outputs whenever the run changes."""
    root = resolve_dataset(svc, data)
    run = svc.start_run(replace(cfg, data_dir=str(root), out_dir=str(svc.settings.checkpoints)))
    yield from stream(run, train_outputs)


def train_outputs(run: Run):
    """-> progress html, live curves, log, metrics rows, confusion matrix, ROC."""
    from .. import plots

    fig = plots.curves(run.history, run.steps, title=f"{run.config.get('arch')} · {run.config.get('level')}")
    log = "\n".join(run.log[-30:])
    if run.status in ("failed", "stopped") and not (run.log and run.log[-1].endswith(run.message)):
        log += f"\n{run.message}"
    rows, cm_fig, roc_fig = [], None, None
    card = run_card(run)
    if run.metrics:
        rows = metrics_rows(run.metrics)
        # N x N with the card's class names (the run's metrics alone name the classes only for N > 2)
        cm_fig = confusion_figure(run.metrics.get("test"), "test confusion matrix", card)
        roc_fig = roc_figure(run.metrics, card.positive if card is not None and card.num_classes == 2 else None)
    return progress_html(run) + operating_point_html(run, card), fig, log, rows, cm_fig, roc_fig


def run_card(run: Run):
    """The card of a finished training run's checkpoint (None before it is done, or for a study)."""
    from ..checkpoints import read_card

    return read_card(run.checkpoint) if run.status == "done" and run.kind == "train" and run.checkpoint else None


def operating_point_html(run: Run, card=None) -> str:
    """When the run is done: its checkpoint's decision threshold and calibration note (from the card)."""
    import html

    from ..report import threshold_text

    card = card if card is not None else run_card(run)
    if card is None:
        return ""
    note = f" · ⚠️ calibration: {card.calibration_note}" if card.calibration_note else ""
    rule = threshold_text(card.threshold, card.positive, card.num_classes)
    return f"<div>Decision: {html.escape(rule)} · temperature {card.temperature:.2f}{html.escape(note)}</div>"


@user_errors
def quick_demo(svc: Services):
    """Train the quick demo model on the synthetic set; yields progress html."""
    require_training(svc)   # before making the demo data set
    cfg = TrainConfig(data_dir=str(svc.demo_data()), out_dir=str(svc.settings.checkpoints), **QUICK_DEMO)
    run = svc.start_run(cfg)
    yield from stream(run, progress_html)
    if run.status == "done":
        yield progress_html(run) + "<div>✅ Quick demo model ready — press <b>Predict</b>.</div>"


def stop(svc: Services) -> str:
    if svc.stop_run():
        return "Stopping… the run ends within one step and saves nothing."
    return "No run in progress."


def history_rows(svc: Services) -> list[list]:
    if not svc.settings.training:
        return []
    rows = []
    for r in svc.history():
        val, test = ((r.metrics or {}).get(s) or {} for s in ("validation", "test"))
        model = (f"{r.config.get('arch')} · {r.config.get('level')}" if r.kind == "train"
                 else f"{len(r.study.get('runs', []))} runs")
        rows.append([r.id, r.kind, model, r.config.get("epochs"), r.status, val.get("auc"), test.get("auc"),
                     Path(r.checkpoint).name if r.checkpoint else "", (r.message or "")[:120]])
    return rows


def option_rows(rows: tuple[tuple[str, ...], ...], inputs: dict) -> None:
    for row in rows:
        with gr.Row() if len(row) > 1 else contextlib.nullcontext():
            for name in row:
                inputs[name] = option(name, **SLIDERS.get(name, {}))


def build(svc: Services) -> SimpleNamespace:
    """The tab; returns the dataset inputs (the Study tab trains on the same dataset)."""
    if not svc.settings.training:
        gr.Markdown(OFF_NOTE)
    opts: dict = {}
    with gr.Row(visible=svc.settings.training):
        with gr.Column(scale=1):
            source = gr.Radio(SOURCES, value=SOURCES[0], label="Dataset")
            # "hidden", not False: an unrendered Textbox reaches the handlers as None from the browser, which
            # their argument check refuses ("folder must be text"); a hidden one keeps sending its "" value
            folder = gr.Textbox(label="Server folder (under COVID_CLS_DATA_ROOTS)", placeholder="/data/cxr",
                                visible="hidden")
            zip_up = gr.File(label="ImageFolder .zip", file_types=[".zip"], visible=False, type="filepath")
            scan_btn = gr.Button("Scan dataset")
            scan_md = gr.Markdown()
            # columns: split + one per class folder of the scanned dataset (``scan`` returns them with the rows)
            scan_df = headed_table(headers=["split", "images per class"], interactive=False)
            resolved = gr.State("")
            with gr.Group():
                option_rows(MAIN_ROWS, opts)
                with gr.Accordion("Advanced", open=False):
                    option_rows(ADVANCED_ROWS, opts)
            with gr.Row():
                start_btn = gr.Button("Start", variant="primary")
                stop_btn = gr.Button("Stop", variant="stop")
        with gr.Column(scale=2):
            out = _outputs()
    source.change(lambda s: (gr.update(visible=True if s == SOURCES[1] else "hidden"),
                             gr.update(visible=s == SOURCES[2])),
                  [source], [folder, zip_up], api_visibility="private")
    scan_btn.click(partial(scan, svc), [source, folder, zip_up], [scan_md, scan_df, resolved], api_name="scan")
    start_btn.click(endpoint(train_endpoint, svc, ("source", "folder", "zip_path"), TRAIN_INPUTS),
                    [source, folder, zip_up] + [opts[n] for n in TRAIN_INPUTS],
                    out.train, api_name="train", concurrency_limit=4, concurrency_id="train").then(
        partial(history_rows, svc), None, [out.history], api_visibility="private")
    stop_btn.click(partial(stop, svc), None, [out.stop_md], api_name="stop")
    out.refresh.click(partial(history_rows, svc), None, [out.history], api_visibility="private")
    return SimpleNamespace(source=source, folder=folder, zip_up=zip_up)


def _outputs() -> SimpleNamespace:
    progress = gr.HTML(elem_id="cc-train-progress")
    curves = gr.Plot(label="Live curves", elem_id="cc-curves")
    log = gr.Textbox(label="Log", lines=8, max_lines=12, autoscroll=True)
    results = gr.Dataframe(headers=METRIC_HEADERS, interactive=False,
                           label="Metrics at the model's operating point, 95 % bootstrap CIs (best epoch)")
    with gr.Row():
        cm_plot = gr.Plot(label="Confusion matrix (test)")
        roc_plot = gr.Plot(label="ROC")
    stop_md = gr.Markdown()
    with gr.Accordion("Run history", open=False):
        history = gr.Dataframe(headers=["id", "kind", "model", "epochs", "status", "val AUC", "test AUC",
                                        "checkpoint", "message"], interactive=False)
        refresh = gr.Button("Refresh history")
    return SimpleNamespace(train=[progress, curves, log, results, cm_plot, roc_plot], stop_md=stop_md,
                           history=history, refresh=refresh)
