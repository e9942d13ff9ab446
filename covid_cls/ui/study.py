"""Study tab: every chosen architecture x level with shared settings, one run after another in one worker,
on the dataset picked in the Train tab; a results table and the validation AUC of every run overlaid."""

from __future__ import annotations

import time
from dataclasses import replace
from functools import partial
from types import SimpleNamespace
from typing import TYPE_CHECKING

import gradio as gr

from .common import arch_choices, config_from, endpoint, option, progress_html, stream, user_errors
from .services import Services
from .train import SLIDERS, DataSource, resolve_dataset, stop

if TYPE_CHECKING:
    from ..config import TrainConfig
    from ..jobs import Run

# The options of /study, in the order of its HTTP arguments (after source, folder, zip, archs, levels).
STUDY_INPUTS = ("epochs", "lr", "optimizer", "weights", "image_size")


@user_errors
def study_endpoint(svc: Services, source: str, folder: str, zip_path: str | None, archs: list[str],
                   levels: list[str], *options):
    """/study: the dataset inputs, the pairs, then the STUDY_INPUTS values (packed into a TrainConfig here)."""
    yield from study(svc, DataSource(source, folder, zip_path), archs, levels, config_from(STUDY_INPUTS, options))


def study(svc: Services, data: DataSource, archs: list[str], levels: list[str], cfg: TrainConfig):
    """Run the study in a worker process; yields the tab's outputs whenever it changes."""
    if not archs or not levels:
        raise gr.Error("Pick at least one architecture and one level.")
    root = resolve_dataset(svc, data)
    report = svc.settings.runs / "studies" / time.strftime("%Y%m%d-%H%M%S")
    extra = {"archs": list(archs), "levels": list(levels), "report_dir": str(report)}
    devices = svc.settings.study_devices()   # several GPUs: one run per GPU at once (issue 13 #2)
    if devices:
        extra["devices"] = ",".join(devices)
    run = svc.start_run(replace(cfg, data_dir=str(root), out_dir=str(svc.settings.checkpoints)), kind="study",
                        extra=extra)
    yield from stream(run, study_outputs)


def study_outputs(run: Run):
    """-> progress html, overlaid validation AUC, results table, log."""
    from .. import plots

    # every run's curve so far (several at once when the runs go in parallel), finished ones as recorded
    hists = {**(run.study.get("live") or {}), **(run.study.get("histories") or {})}
    fig = plots.overlaid_validation(hists, "auc") if hists else None
    return progress_html(run), fig, study_table(run.study.get("rows", [])), "\n".join(run.log[-20:])


def study_table(rows: list[dict]) -> dict:
    """The study's rows as the CLI's markdown shows them: test AUC with its 95 % CI and, for every level
    but fc, the paired comparison with fc of the same arch (and external columns when there are any)."""
    from ..study import table

    headers, cells = table(rows)
    return {"headers": headers, "data": cells}


def build(svc: Services, data: SimpleNamespace) -> None:
    """The tab; ``data``: the Train tab's dataset inputs."""
    from ..errors import ConfigError
    from ..models import ARCHS, LEVELS

    try:
        devices = svc.settings.study_devices()
        how = (f"in parallel, one run per device ({', '.join(devices)}), after one shared decode" if devices else
               "one after another, reusing the decoded data")
    except ConfigError as exc:   # a wrong COVID_CLS_STUDY_DEVICES: the app starts, the tab says it, a study refuses
        how = f"— but COVID_CLS_STUDY_DEVICES cannot be used ({exc}), so a study will refuse to start"
    gr.Markdown("The 2020 notebook's whole experiment in one click: every architecture × level with shared "
                f"settings, {how}. Uses the dataset chosen in the Train tab.")
    if not svc.settings.training:
        gr.Markdown("### Training is switched off on this server\nThis deployment sets "
                    f"`COVID_CLS_TRAINING=0`, so studies (which train {len(ARCHS) * len(LEVELS)} models) are off "
                    "too. Run the app locally to run one: `python app.py`.")
    with gr.Row(visible=svc.settings.training):
        with gr.Column(scale=1):
            archs = gr.CheckboxGroup(arch_choices(), value=list(ARCHS), label="Architectures")
            levels = gr.CheckboxGroup(list(LEVELS), value=list(LEVELS), label="Levels")
            opts = [option(name, **SLIDERS.get(name, {})) for name in STUDY_INPUTS]
            with gr.Row():
                start = gr.Button("Run study", variant="primary")
                stop_btn = gr.Button("Stop", variant="stop")
        with gr.Column(scale=2):
            progress = gr.HTML()
            plot = gr.Plot(label="Validation AUC per run")
            table = gr.Dataframe(headers=study_table([])["headers"], interactive=False,
                                 label="Results (95 % bootstrap CIs; 'vs fc': paired DeLong test on the test split)")
            log = gr.Textbox(label="Log", lines=6, max_lines=10, autoscroll=True)
    start.click(endpoint(study_endpoint, svc, ("source", "folder", "zip_path", "archs", "levels"), STUDY_INPUTS),
                [data.source, data.folder, data.zip_up, archs, levels] + opts,
                [progress, plot, table, log], api_name="study", concurrency_limit=4, concurrency_id="train")
    stop_btn.click(partial(stop, svc), None, [log], api_visibility="private")
