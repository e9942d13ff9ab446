"""The app: the five tabs composed into one ``gr.Blocks``, and ``launch``."""

from __future__ import annotations

import gradio as gr

from . import compare, models, predict, study, train
from .common import CSS, STATE_TTL_S, banner, harden_inputs
from .services import Services, Settings


def build_app(settings: Settings | None = None) -> gr.Blocks:
    """Predict | Train | Study | Models | Compare over one ``Services``. Loads no model and no data."""
    svc = Services(settings or Settings.from_env())
    if svc.settings.hub_models:   # COVID_CLS_HUB_MODELS: pulled in the background; the page is up at once (issue 12)
        from ..hub import start_pulls

        start_pulls(svc.settings.hub_models, svc.settings.checkpoints)
    with gr.Blocks(title="covid_cls — chest X-ray fine-tuning lab", delete_cache=(600, 1800)) as demo:
        gr.Markdown("# covid_cls — chest X-ray fine-tuning lab\n"
                    "How much of a pretrained CNN must be fine-tuned to tell infected from normal chest X-rays "
                    "(or your own classes: one folder per class), and what does it look at?")
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
    _describe_api(demo)
    return harden_inputs(demo)   # raw inputs checked before Gradio preprocesses them (issue 11 #16)


def _describe_api(demo: gr.Blocks) -> None:
    """Handlers are bound as ``functools.partial(handler, svc)``, which has neither a name nor a docstring:
    Gradio's MCP server (COVID_CLS_MCP=1, issue 12 #7) would list them as tools "partial", "partial_1", ...
    described by partial's own docstring. Name each public endpoint's function after its api_name and, where
    the event gives no api_description, describe it with its handler's first docstring paragraph."""
    import functools
    import inspect

    for fn in demo.fns.values():
        if fn.api_name and isinstance(fn.fn, functools.partial):
            fn.fn.__name__ = fn.api_name
            if fn.api_description is None:
                fn.api_description = (inspect.getdoc(fn.fn.func) or fn.api_name).split("\n\n")[0]


def launch(demo: gr.Blocks | None = None, **kw) -> None:
    settings = Settings.from_env()
    demo = demo or build_app(settings)
    if settings.mcp and "mcp_server" not in kw:
        kw["mcp_server"] = mcp_available()
    kw.setdefault("state_session_capacity", settings.max_sessions)   # API sessions never close (issue 11 #2)
    demo.launch(max_file_size=settings.max_upload, theme=gr.themes.Soft(), css=CSS, **kw)


def mcp_available() -> bool:
    """COVID_CLS_MCP=1 (issue 12 #7): Gradio's MCP server needs its ``mcp`` extra, installed only by those who
    ask for the feature. Without it the app still starts, and says why there is no MCP server."""
    import importlib.util
    import sys

    if importlib.util.find_spec("mcp") is None:
        print('covid_cls: COVID_CLS_MCP=1 but the `mcp` package is missing: pip install "gradio[mcp]"; '
              "starting without the MCP server", file=sys.stderr, flush=True)
        return False
    return True
