"""Models tab: every checkpoint with its card, training curves and ROC; delete with confirmation; evaluate on
another dataset (``evaluate.py``)."""

from __future__ import annotations

from functools import partial

import gradio as gr

from . import evaluate
from .common import card_markdown, file_name, roc_figure, user_errors
from .services import Services

# sens / spec / AUC: of the positive class for two classes, macro one-vs-rest averages for more (see "classes")
TABLE_HEADERS = ["file", "arch", "level", "weights", "val AUC", "test acc", "test sens", "test spec", "test AUC",
                 "created", "classes"]


def models_json(svc: Services) -> list[dict]:
    """/models: what each checkpoint says about itself (ROC points left out)."""
    return [{"file": file_name(c), "arch": c.arch, "level": c.level, "created": c.created,
             "classes": list(c.classes), "positive": c.positive,
             "weights_origin": c.weights_origin, "temperature": c.temperature, "data": c.data, "params": c.params,
             "metrics": {s: {k: v for k, v in m.items() if k != "roc"}
                         for s, m in c.metrics.items() if isinstance(m, dict)}}
            for c in svc.cards()]


def models_table(svc: Services):
    """-> table rows, the checkpoint dropdown (newest picked)."""
    rows = []
    for c in svc.cards():
        val, test = c.split_metrics("validation"), c.split_metrics("test")
        rows.append([file_name(c), c.arch, c.level, c.weights_origin, val.get("auc"), test.get("accuracy"),
                     test.get("sensitivity"), test.get("specificity"), test.get("auc"), c.created,
                     ", ".join(c.classes)])
    return rows, gr.update(choices=[r[0] for r in rows], value=rows[0][0] if rows else None)


@user_errors
def model_details(svc: Services, name: str | None):
    """-> the card as markdown, training curves, ROC of one checkpoint (a name in the checkpoint folder)."""
    from .. import plots

    if not name:
        return "No checkpoint selected.", None, None
    card = svc.card(name)
    if card is None:
        return f"`{name}` is no longer available.", None, None
    positive = card.positive if card.num_classes == 2 else None   # more classes: one curve per class
    return card_markdown(card), plots.curves(card.history, title=card.name), roc_figure(card.metrics, positive)


@user_errors
def delete_model(svc: Services, name: str | None, confirmed: bool):
    """-> table rows, dropdown, the confirmation box (cleared), a message."""
    if not name:
        raise gr.Error("Select a checkpoint first.")
    if not confirmed:
        raise gr.Error("Tick 'yes, delete it' to confirm.")
    svc.delete_checkpoint(name)
    rows, dropdown = models_table(svc)
    return rows, dropdown, False, f"Deleted `{name}`."


def build(svc: Services, tab: gr.Tab) -> None:
    with gr.Row():
        refresh = gr.Button("Refresh")
    # --- models pulled from the Hub at start-up (COVID_CLS_HUB_MODELS, issue 12): how each pull went ---
    from ..hub import pulls_markdown

    hub_note = gr.Markdown(pulls_markdown(svc.settings.checkpoints))
    for trigger in (refresh.click, tab.select):
        trigger(lambda: pulls_markdown(svc.settings.checkpoints), None, [hub_note], api_visibility="private")
    table = gr.Dataframe(headers=TABLE_HEADERS, interactive=False)
    with gr.Row():
        with gr.Column(scale=1):
            # custom values: /evaluate names a checkpoint in a session whose choices were never filled in
            pick = gr.Dropdown([], label="Checkpoint", allow_custom_value=True)
            card_md = gr.Markdown()
            confirm = gr.Checkbox(False, label="yes, delete it")
            delete_btn = gr.Button("Delete checkpoint", variant="stop")
            delete_md = gr.Markdown()
        with gr.Column(scale=2):
            curves = gr.Plot(label="Training curves")
            roc = gr.Plot(label="ROC")
    evaluate.build(svc, pick)
    api = gr.JSON(visible=False)
    for trigger in (refresh.click, tab.select):
        trigger(partial(models_table, svc), None, [table, pick], api_visibility="private")
    refresh.click(partial(models_json, svc), None, [api], api_name="models")
    pick.change(partial(model_details, svc), [pick], [card_md, curves, roc], api_visibility="private")
    delete_btn.click(partial(delete_model, svc), [pick, confirm], [table, pick, confirm, delete_md],
                     api_visibility="private")
