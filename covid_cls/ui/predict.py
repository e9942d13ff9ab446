"""Predict tab: an upload -> calibrated probabilities of every class of the model, the Grad-CAM overlay (of the
predicted class, or of one picked under "Explain class") and the model's card."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import gradio as gr

from .common import (  # bounded session state (issue 11 #2)
    BEST,
    DISCLAIMER,
    STATE_TTL_S,
    card_markdown,
    file_name,
    option,
    read_upload,
    reblend_state,
    session_copy,
    slider_state,
    unique_image,
    user_errors,
)
from .services import Services

if TYPE_CHECKING:
    from ..predictor import Prediction

PREDICTED = "most probable class"   # the "Explain class" choice: the map of the model's most probable class


def checkpoint_choices(svc: Services, arch: str, level: str):
    """Checkpoint dropdown for (arch, level), the "no model yet" note, and whether to offer the quick demo."""
    from .train import QUICK_DEMO_TIME, quick_demo_title

    names = [file_name(c) for c in svc.cards(arch, level)]
    note = "" if names else (f"No trained model for **{arch} · {level}** yet. Train one in the Train tab, or "
                             f"press **Train quick demo model** ({quick_demo_title()} on synthetic data, "
                             f"{QUICK_DEMO_TIME}).")
    return (gr.update(choices=[BEST] + names, value=BEST), note,
            gr.update(visible=not names and svc.settings.training))


@user_errors
def upload_preview(svc: Services, path: str | None):
    """On upload: decode once, keep the image in the session, delete the file, show a preview."""
    from ..imaging import load_image_bounded

    if not path:
        return None, None
    if not Path(path).exists():   # a Predict click already consumed (and deleted) the upload
        return gr.skip(), gr.skip()
    img = session_copy(load_image_bounded(read_upload(path, svc.settings.max_upload)))   # <= 1024 px (#2)
    return img, {"name": Path(path).name, "image": img}


def session_image(svc: Services, path: str | None, session: dict | None):
    """The image to use: the one decoded at upload time when this is (still) that upload, else the file."""
    if session and (not path or (Path(path).name == session.get("name") and not Path(path).exists())):
        return session["image"]
    return read_upload(path, svc.settings.max_upload)


@user_errors
def predict(svc: Services, path: str | None, arch: str, level: str, checkpoint: str | None,
            session: dict | None = None):
    """-> (headline, probabilities) for the label, overlay, info markdown, the state the opacity slider
    re-blends from. The headline is "uncertain — ..." when the model abstains (``headline``).

    No model for the pair yet (a fresh machine): the guidance to train the quick demo model, as plain
    markdown — no error toast, no error boxes (issue 12 #4); API calls still get the error."""
    guide = no_model_guidance(svc, arch, level, checkpoint)
    if guide is not None:
        return None, None, guide, None
    image = session_image(svc, path, session)
    p = svc.predict(image, arch, level, None if not checkpoint or checkpoint == BEST else checkpoint)
    info = prediction_markdown(p)
    state = slider_state(p, Path(path).name if path else session.get("name"))   # bounded (issue 11 #2)
    if state is not None:   # what "Explain class" re-draws from: the model that answered, and the text to amend
        state.update(explain_state(p, info))
    return headline(p), unique_image(p.overlay), info, state


def explain_state(p: Prediction, info: str) -> dict:
    """What the "Explain class" re-draw needs besides the image (a few hundred bytes, at most 20 class names): the
    checkpoint that made the prediction (by name; a newer "best" must not explain an older answer), its classes,
    and the info markdown with its heatmap line."""
    return {"checkpoint": Path(p.checkpoint).name, "arch": p.card.arch, "level": p.card.level,
            "classes": list(p.card.classes), "line": explained_line(p.explained or p.decision, chosen=False),
            "info": info}


def explained_line(explained: str, chosen: bool) -> str:
    """The info markdown's line saying which class the heatmap explains."""
    why = "chosen under *Explain class*" if chosen else "the most probable class"
    return f"**Heatmap:** Grad-CAM of **{explained}** ({why})."


def explain_choices(classes) -> list[str]:
    return [PREDICTED, *classes]


@user_errors
def explain_options(svc: Services, arch: str, level: str, checkpoint: str | None):
    """The "Explain class" dropdown for the model Predict would use now: "most probable class" + its classes."""
    card = svc.model_card(arch, level, None if not checkpoint or checkpoint == BEST else checkpoint)
    return gr.update(choices=explain_choices(card.classes if card else []), value=PREDICTED)


def explain_after_predict(state: dict | None):
    """After a prediction: the classes of the model that made it, "most probable class" picked (as drawn). Unchanged
    when there is no state (an API call, or the no-model guidance)."""
    if not state or not state.get("classes"):
        return gr.skip()
    return gr.update(choices=explain_choices(state["classes"]), value=PREDICTED)


@user_errors
def explain(svc: Services, choice: str | None, alpha: float, state: dict | None):
    """Re-draw the last prediction's Grad-CAM for class ``choice`` (or the predicted class) -> overlay, info
    markdown, the new state. Runs the same checkpoint on the session's copy of the image (<= 1024 px, which the
    model sees at its own input size anyway); the probabilities shown stay those of the prediction."""
    if not state or state.get("image") is None or not state.get("checkpoint"):
        raise gr.Error("Press Predict first: the heatmap is re-drawn for this page's last prediction "
                       "(kept for 30 minutes).")
    cls = None if not choice or choice == PREDICTED else choice
    if cls is not None and cls not in state["classes"]:
        raise gr.Error(f"The heatmap shown comes from {state['checkpoint']}, whose classes are "
                       f"{', '.join(state['classes'])}; press Predict to use the model chosen above.")
    p = svc.predict(state["image"], state["arch"], state["level"], state["checkpoint"], explain_class=cls)
    new = slider_state(p, state.get("name"))
    if new is None:
        return gr.skip(), gr.skip(), gr.skip()
    line = explained_line(p.explained, chosen=cls is not None)
    new.update({k: state[k] for k in ("checkpoint", "arch", "level", "classes")}, line=line,
               info=state["info"].replace(state["line"], line))
    return reblend_state(alpha, new), new["info"], new


def no_model_guidance(svc: Services, arch: str, level: str, checkpoint: str | None) -> str | None:
    """What the Predict button shows in the browser when no model exists for (arch, level) and none was named:
    how to get one (the quick demo model: what it is and how long it takes), never an error. None otherwise,
    and always for API calls (a client needs the error to notice)."""
    from ..models import check_level, get_spec
    from .common import is_api_call
    from .train import QUICK_DEMO_TIME, quick_demo_title

    title = f"{get_spec(arch).title} · {check_level(level)}"   # unknown names: the usual error
    if (checkpoint and checkpoint != BEST) or is_api_call() or svc.cards(arch, level):
        return None
    others = sorted({f"{c.title}" for c in svc.cards()})
    there = f"Models on this server: {', '.join(others)} — pick one of those pairs above." if others else ""
    if svc.settings.training:
        steps = (f"Press **Train quick demo model** (under the Predict button): {quick_demo_title()} trained on "
                 f"synthetic images, {QUICK_DEMO_TIME}. When it is ready"
                 + ("" if quick_demo_title() == title else f", choose **{quick_demo_title()}** above and")
                 + " press **Predict** again — your upload stays where it is.\n\nOr train a model on your own "
                 "data in the **Train** tab.")
    else:
        steps = ("Training is switched off on this server; models come from its checkpoint folder or the "
                 "Hugging Face Hub (`COVID_CLS_HUB_MODELS`).")
    return "\n\n".join(p for p in (f"### No model for {title} yet\nThere is no trained model for this pair on "
                                      "this server yet, so there is nothing to predict with (your image is fine).",
                                      steps, there, f"_{DISCLAIMER}_") if p)


def headline_label(**kw) -> gr.Label:
    """A ``gr.Label`` whose headline is stated, not taken from the most probable class: the Predictor's
    ``label`` (the class at the model's operating point, or "uncertain — ..." when it abstains) above the
    probability bars, one per class of the model (all of them: the pair is never cut to ``num_top_classes``).
    It takes a ``(headline, {class: probability})`` pair; anything else as ``gr.Label``.
    (The instance's ``postprocess`` is wrapped rather than subclassed: Gradio writes a ``.pyi`` stub beside the
    module of every Component subclass, which a read-only deployment cannot do.)"""
    from gradio.components.label import LabelConfidence, LabelData

    label = gr.Label(**kw)
    plain = label.postprocess

    def postprocess(value):
        if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], dict):
            ranked = sorted(value[1].items(), key=lambda kv: kv[1], reverse=True)
            return LabelData(label=str(value[0]),
                             confidences=[LabelConfidence(label=k, confidence=v) for k, v in ranked])
        return plain(value)

    label.postprocess = postprocess
    return label


def headline(p: Prediction) -> tuple[str, dict[str, float]]:
    """The label component's value: a flagged image never gets a class as its headline."""
    return p.label, p.probs


def prediction_markdown(p: Prediction) -> str:
    probs = " · ".join(f"{k} {v:.1%}" for k, v in p.probs.items()) + " (temperature-calibrated)"
    if p.abstain:
        why = "\n".join(f"- {r}" for r in p.reasons)
        head = (f"### Prediction: **{p.label}**\nThe model does not answer for this image. Why:\n{why}\n\n"
                f"Probabilities, for information only: {probs}")
    else:
        # a threshold on P(positive) is a two-class rule; with more classes the answer is the most probable one
        rule = "" if p.card.threshold is None or p.card.num_classes != 2 else \
            f" (called {p.card.positive} when P({p.card.positive}) ≥ {p.card.threshold:.2f}, chosen on validation)"
        head = f"### Prediction: **{p.label}**{rule}  \n{probs}"
    return "\n\n".join([
        head,
        explained_line(p.explained or p.decision, chosen=False),
        f"Ran on **{p.device}** in **{p.latency_ms:.0f} ms** (forward + Grad-CAM).",
        card_markdown(p.card),
        f"**{DISCLAIMER}**",
    ])


# --- the /predict endpoint as an API / MCP tool (issue 12 #7): what an assistant reads before calling it ---
PREDICT_API_DESCRIPTION = (
    "RESEARCH DEMO - NOT A DIAGNOSIS: never use the result to diagnose, triage or treat anyone. Classifies one "
    "chest X-ray image (PNG, JPEG, TIFF, BMP, WebP or DICOM) into the model's classes (e.g. infected / normal; a "
    "model trained on other class folders names its own) with a fine-tuned ResNet18 or VGG16 and explains it with "
    "a Grad-CAM heatmap of the most probable class. Parameters: path = the image file; arch = 'resnet18' or "
    "'vgg16'; level = fine-tuning level 'fc', 'partial' or 'full'; checkpoint = a checkpoint file name, or "
    f"'{BEST}' / empty for the best one for arch and level. Returns: (1) a label whose 'label' is the answer at the "
    "model's operating point OR the abstention flag 'uncertain — outside what this model was trained on' when the "
    "image is out of distribution or ambiguous (then do not report a class), and whose 'confidences' are the "
    "calibrated probabilities of every class of the model; (2) the Grad-CAM overlay image; (3) markdown with the "
    "reasons for an abstention, the class the heatmap explains, the model card (training data, weights origin "
    "such as 'trained from scratch', test metrics with 95% confidence intervals) and the disclaimer.")


def reblend(alpha: float, state: dict | None):
    return reblend_state(alpha, state)


def build(svc: Services, session: gr.State, demo: gr.Blocks) -> None:
    from ..imaging import describe_limits
    from . import batch as batch_ui
    from .examples import example_paths
    from .train import quick_demo

    with gr.Row():
        with gr.Column(scale=1):
            upload = gr.File(label="Chest X-ray (PNG, JPEG, TIFF, BMP, WebP, DICOM)", type="filepath")
            gr.Markdown(f"<small>{describe_limits()}</small>")
            examples_at = gr.Column()   # filled below, once the preview exists
            arch = option("arch")
            level = option("level", label="Fine-tuning level")
            ckpt = gr.Dropdown([BEST], value=BEST, label="Checkpoint", allow_custom_value=True)
            predict_btn = gr.Button("Predict", variant="primary")
            no_model = gr.Markdown()
            demo_btn = gr.Button("Train quick demo model", visible=False)
            demo_status = gr.HTML()
        with gr.Column(scale=2):
            # every class of the model (2 to 20): no num_top_classes cut
            probs = headline_label(label="Prediction and probabilities (calibrated)", elem_id="cc-label")
            with gr.Row():
                preview = gr.Image(label="Image", type="pil", interactive=False, format="jpeg", elem_id="cc-preview")
                overlay_img = gr.Image(label="Grad-CAM overlay", type="pil", interactive=False, format="jpeg",
                                       elem_id="cc-overlay")
            with gr.Row():
                alpha = gr.Slider(0.0, 1.0, value=0.45, step=0.05, label="Heatmap opacity")
                explain_dd = gr.Dropdown([PREDICTED], value=PREDICTED, label="Explain class",
                                         info="the class the Grad-CAM heatmap explains", elem_id="cc-explain")
            info = gr.Markdown(elem_id="cc-info")
            cam_state = gr.State(None, time_to_live=STATE_TTL_S)   # API sessions never close (issue 11 #2)

    with examples_at:   # issue 12 #4: synthetic images we may ship; nothing predicted or cached ahead
        examples = example_paths()
        gr.Examples([[p] for p, _ in examples], inputs=[upload], outputs=[preview, session],
                    fn=partial(upload_preview, svc), run_on_click=True, cache_examples=False,
                    label="Examples (synthetic — not patient data)", example_labels=[lab for _, lab in examples],
                    api_visibility="private")
    batch_ui.build(svc, arch, level, ckpt)   # several files or a zip (issue 12 #3)

    choices = partial(checkpoint_choices, svc)
    upload.upload(partial(upload_preview, svc), [upload], [preview, session], api_visibility="private")
    # /predict keeps its inputs and outputs (API clients); "Explain class" is a private event on the session state
    predict_btn.click(partial(predict, svc), [upload, arch, level, ckpt, session],
                      [probs, overlay_img, info, cam_state], api_name="predict", concurrency_limit=4,
                      concurrency_id="predict", api_description=PREDICT_API_DESCRIPTION).success(
        explain_after_predict, [cam_state], [explain_dd], api_visibility="private")
    alpha.change(reblend, [alpha, cam_state], [overlay_img], api_visibility="private", show_progress="hidden")
    # .input: only the user's pick re-draws (the choices reset after a prediction must not run the model again)
    explain_dd.input(partial(explain, svc), [explain_dd, alpha, cam_state], [overlay_img, info, cam_state],
                     api_visibility="private", concurrency_id="predict")
    options = partial(explain_options, svc)
    for comp in (arch, level):
        comp.change(choices, [arch, level], [ckpt, no_model, demo_btn], api_visibility="private")
    for comp in (arch, level, ckpt):
        comp.change(options, [arch, level, ckpt], [explain_dd], api_visibility="private")
    ckpt.focus(lambda a, lv: choices(a, lv)[0], [arch, level], [ckpt], api_visibility="private")
    demo_btn.click(partial(quick_demo, svc), None, [demo_status], api_name="quick_demo", concurrency_limit=4).then(
        choices, [arch, level], [ckpt, no_model, demo_btn], api_visibility="private").then(
        options, [arch, level, ckpt], [explain_dd], api_visibility="private")
    demo.load(choices, [arch, level], [ckpt, no_model, demo_btn], api_visibility="private").then(
        options, [arch, level, ckpt], [explain_dd], api_visibility="private")
