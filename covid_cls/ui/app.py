"""The app: the five tabs composed into one ``gr.Blocks``, and ``launch``."""

from __future__ import annotations

import gradio as gr

from . import compare, models, predict, study, train
from .common import CSS, STATE_TTL_S, banner, harden_inputs
from .services import Services, Settings


def build_app(settings: Settings | None = None) -> gr.Blocks:
    """Predict | Train | Study | Models | Compare over one ``Services``. Loads no model and no data."""
    svc = Services(settings or Settings.from_env())
    with gr.Blocks(title="covid_cls — chest X-ray fine-tuning lab", delete_cache=(600, 1800)) as demo:
        gr.Markdown("# covid_cls — chest X-ray fine-tuning lab\n"
                    "How much of a pretrained CNN must be fine-tuned to tell infected from normal chest X-rays, "
                    "and what does it look at?")
        gr.HTML(banner())
        # the image decoded at upload time (<= 1024 px), shared by Predict and Compare; dropped after STATE_TTL_S
        session = gr.State(None, time_to_live=STATE_TTL_S)
        with gr.Tab("Predict"):
            predict.build(svc, session, demo)
        with gr.Tab("Train"):
            data = train.build(svc)
        with gr.Tab("Study"):
            study.build(svc, data)
        with gr.Tab("Models") as models_tab:
            models.build(svc, models_tab)
        with gr.Tab("Compare"):
            compare.build(svc, session)
    demo.queue(max_size=64, default_concurrency_limit=2)
    return harden_inputs(demo)   # raw inputs checked before Gradio preprocesses them (issue 11 #16)


def launch(demo: gr.Blocks | None = None, **kw) -> None:
    settings = Settings.from_env()
    demo = demo or build_app(settings)
    demo.launch(max_file_size=settings.max_upload, theme=gr.themes.Soft(), css=CSS, **kw)
