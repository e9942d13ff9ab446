"""The Hugging Face model card (``README.md``) of a checkpoint pushed to the Hub: metadata + text, from its Card.

The metadata block is what the Hub indexes: ``library_name: covid-cls``, tags, the dataset, a research-only
licence note and a ``model-index`` whose results are the card's measured metrics (validation and test
splits, at the model's operating point), each with its 95 % bootstrap interval in ``args`` and in its display
name. It is built with huggingface_hub's own ``ModelCardData``/``EvalResult``, so what ``ModelCard.load``
parses back is what the card says (``tests/test_hub.py`` checks the round trip).

The text says what the model is for (research and teaching, never diagnosis), what it was trained on and the
known confounds of that data, the fine-tuning level, where its weights came from ("trained from scratch"
when so) and how to load it with covid_cls. Nothing here touches the network.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .card import Card

LIBRARY_NAME = "covid-cls"
TASK = "image-classification"
# (card key, model-index metric type, display name); the card keeps CIs for all but accuracy
METRICS = (("auc", "roc_auc", "ROC AUC"), ("sensitivity", "sensitivity", "Sensitivity"),
           ("specificity", "specificity", "Specificity"), ("f1", "f1", "F1"), ("accuracy", "accuracy", "Accuracy"),
           ("ece", "ece", "ECE (after temperature scaling)"))
SPLITS = (("test", "test"), ("validation", "validation"))
LEVEL_TEXT = {   # formatted with the card's head: hidden units and number of classes
    "fc": "only the new head (`in_features → {hidden} → {num_classes}`) was trained; the backbone stayed frozen",
    "partial": "the last block of the backbone (ResNet18 `layer4`, VGG16 `features[24:]` + `classifier`) and the "
               "new head were trained; the rest stayed frozen",
    "full": "every layer was trained",
}
RESEARCH_ONLY = ("**Research and teaching only — not a diagnosis.** This model must not be used to diagnose, "
                 "triage or treat anyone, nor to support any claim of clinical performance.")

# The 2020 task's classes: the wording of that task (and what is known about its data sets) applies to them only.
TASK_CLASSES = ["infected", "normal"]
# What is known about the data sets this project is used with; matched by the data folder's name.
CONFOUNDS = {
    "cxr-real": (
        "Trained on **cxr-real** (1,492 chest X-rays: NIH ChestX-ray8/14 and the COVID-19 image data collection "
        "of Cohen et al.). Known confounds — read before trusting any metric:\n"
        "- **Source confound:** `normal` is almost all NIH (one hospital), `infected` is about half NIH and half "
        "figures from publications (many hospitals, crops, arrows, text). A model can score well by recognising "
        "\"not NIH-looking\" images instead of disease; judge it on the NIH-only subset (both classes from one "
        "hospital) as well — `python -m covid_cls evaluate` reports it per `MANIFEST.csv` source.\n"
        "- **Shape cue:** every NIH image is square, about two thirds of the publication images are not.\n"
        "- **Mixed `infected` class:** COVID-19 (from publications only), other pneumonias from case reports and "
        "NIH \"Pneumonia\" (text-mined labels, cause unknown) are pooled.\n"
        "- **Adults only, noisy labels** (NLP-mined NIH labels; case-report labels).\n"
        "- Several source images are licensed non-commercial and/or no-derivatives (CC BY-NC-SA, CC BY-NC-ND)."),
    "demo_data": (
        "Trained on the **synthetic demo set** made by `python -m covid_cls demo-data`: generated X-ray-like "
        "pictures with drawn lesions, **not medical images**. The model says nothing about real chest X-rays."),
}
GENERIC_CONFOUND = (
    "The training images come from the folder named below; this card cannot tell where they came from. Models "
    "trained on chest X-rays pooled from different hospitals learn the hospitals (markers, exposure, scanner, "
    "age) as much as the disease and can be confidently wrong elsewhere (DeGrave et al. 2021, *AI for "
    "radiographic COVID-19 detection selects shortcuts over signal*). Evaluate on X-rays from other sources "
    "before believing any number here.")


def task_name(card: Card) -> str:
    """The model-index task: "Chest X-ray: infected vs normal", or the card's own classes in their order."""
    return "Chest X-ray: " + " vs ".join(card.classes)


def confound_text(card: Card) -> str:
    """What is known about the training data: a known folder's notes when they describe this model's classes
    (the cxr-real notes speak of its infected / normal classes), else the generic warning."""
    data = dataset_id(card)
    if data == "cxr-real" and list(card.classes) != TASK_CLASSES:
        return GENERIC_CONFOUND
    return CONFOUNDS.get(data, GENERIC_CONFOUND)


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def dataset_id(card: Card) -> str:
    """A name for the training data: the data folder's name ("cxr-real", "demo_data", ...)."""
    root = str(card.data.get("root") or "").rstrip("/")
    return Path(root).name or "unknown"


def _ci(m: dict[str, Any], key: str) -> list[float] | None:
    ci = (m.get("ci") or {}).get(key)
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(_num(x) is not None for x in ci):
        return [float(ci[0]), float(ci[1])]
    return None


def eval_results(card: Card, repo_name: str | None = None):
    """The card's metrics as huggingface_hub ``EvalResult`` entries (model-index): for the test and validation
    splits, AUC, sensitivity, specificity, F1, accuracy and ECE at the model's operating point. The 95 % CI goes
    in ``metric_args`` (``ci_95``, with the threshold and the method) and in the display name."""
    from huggingface_hub import EvalResult

    data = dataset_id(card)
    several = card.num_classes > 2   # AUC, sensitivity, specificity, F1: macro averages of one-vs-rest values
    out = []
    for split, split_name in SPLITS:
        m = card.split_metrics(split)
        n = m.get("n")
        for key, mtype, title in METRICS:
            value = _num(m.get(key))
            if value is None:
                continue
            ci = _ci(m, key)
            args: dict[str, Any] = {"threshold": _num(m.get("threshold")), "positive_class": card.positive}
            if several:
                args = {"threshold": None, "classes": list(card.classes)}
                if key in ("auc", "sensitivity", "specificity", "f1"):
                    args["average"] = "macro, one-vs-rest"
            if isinstance(n, int):
                args["n_images"] = n
            name = f"{title} (macro)" if several and "average" in args else title
            if ci:
                args.update(ci_95=ci, ci_method="stratified percentile bootstrap, 2000 resamples")
                name = f"{name} (95% CI {ci[0]:.3f}-{ci[1]:.3f})"
            out.append(EvalResult(
                task_type=TASK, task_name=task_name(card), dataset_type=data,
                dataset_name=f"{data} ({split_name} split)", dataset_split=split_name, metric_type=mtype,
                metric_value=round(value, 6), metric_name=name, metric_args=args))
    return out


def metadata(card: Card, repo_id: str):
    """The ``ModelCardData`` (YAML front matter) of ``card`` pushed as ``repo_id``."""
    from huggingface_hub import ModelCardData

    tags = ["medical-imaging", "chest-xray", "research-only", "not-for-clinical-use", "grad-cam", "covid-cls",
            card.arch, f"fine-tuning-{card.level}", "safetensors"]
    tags.append("trained-from-scratch" if card.from_scratch else f"weights-{card.weights_origin}")
    results = eval_results(card)
    return ModelCardData(
        library_name=LIBRARY_NAME, pipeline_tag=TASK, tags=tags, datasets=[dataset_id(card)],
        license="other", license_name="research-only-not-for-clinical-use",
        metrics=sorted({r.metric_type for r in results}) or None,
        model_name=repo_id.split("/")[-1], eval_results=results or None)


def _metric_rows(card: Card) -> str:
    rows = ["| split | n | AUC | sensitivity | specificity | F1 | ECE | accuracy |",
            "|---|---|---|---|---|---|---|---|"]
    for split, _ in SPLITS:
        m = card.split_metrics(split)
        if not m:
            continue
        cells = []
        for key in ("auc", "sensitivity", "specificity", "f1", "ece", "accuracy"):
            v, ci = _num(m.get(key)), _ci(m, key)
            cells.append("–" if v is None else f"{v:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""))
        rows.append(f"| {split} | {m.get('n', '?')} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + _per_class_rows(card)


def _per_class_rows(card: Card) -> str:
    """For more than two classes: the test split's one-vs-rest numbers of each class ("" otherwise)."""
    per_class = card.split_metrics("test").get("per_class") or {}
    if card.num_classes <= 2 or not isinstance(per_class, dict) or not per_class:
        return ""
    rows = ["", "", "AUC, sensitivity, specificity and F1 above are macro averages over the classes. Each class "
            "against the rest (test split):", "", "| class | n | AUC | sensitivity | specificity | F1 |",
            "|---|---|---|---|---|---|"]
    for name, pc in per_class.items():
        pc = pc if isinstance(pc, dict) else {}
        cells = []
        for key in ("auc", "sensitivity", "specificity", "f1"):
            v, ci = _num(pc.get(key)), _ci(pc, key)
            cells.append("–" if v is None else f"{v:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""))
        rows.append(f"| {name} | {pc.get('n', '?')} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _weights_text(card: Card) -> str:
    if card.from_scratch:
        return ("**Trained from scratch** — ImageNet weights were not available when it was trained, so every "
                "layer was learnt from the training images alone. Expect it to know little beyond them."
                + (f" ({card.weights_note})" if card.weights_note else ""))
    if card.weights_origin == "imagenet":
        base = card.base_weights.get("name", "")
        stored = ("This repository stores **only the trained part**; the frozen rest is rebuilt from torchvision's "
                  f"ImageNet weights `{base}` (SHA-256 `{card.base_weights.get('sha256', '?')[:16]}…`), which "
                  "torchvision downloads on first use (or put the file in `$TORCH_HOME/hub/checkpoints`)."
                  if card.stored == "trained" else "This repository stores every weight.")
        return f"Started from torchvision's **ImageNet** weights. {stored}"
    return f"Weights origin: {card.weights_origin}" + (f" ({card.weights_note})" if card.weights_note else "")


def _rule_and_task(card: Card) -> tuple[str, str]:
    """The decision rule's wording and the lab's question, for this card's classes (the 2020 wording for
    infected / normal)."""
    thr = f"P({card.positive}) ≥ {card.threshold:.3f}" if card.threshold is not None else "the most probable class"
    if card.num_classes > 2:   # no positive class to threshold: the answer is the most probable class
        rule = f"the answer is the most probable of the {card.num_classes} classes"
    else:
        rule = f"called `{card.positive}` when\n  {thr} (threshold chosen on validation)"
    task = ("tell infected from normal chest X-rays" if list(card.classes) == TASK_CLASSES
            else f"tell {_names(card.classes)} chest X-rays apart")
    return rule, task


def render(card: Card, repo_id: str) -> str:
    """The full model card: YAML metadata between ``---`` lines, then the text.

    Over ~80 lines because most of it is the card's text itself, kept in reading order as one template.
    """
    from .models import ARCHS

    data = dataset_id(card)
    counts = card.data.get("counts") or {}
    count_txt = "; ".join(f"{s}: " + ", ".join(f"{c} {k}" for k, c in v.items())
                          for s, v in counts.items() if isinstance(v, dict)) or "not recorded"
    dup = card.data.get("near_duplicates") or []
    rule, task = _rule_and_task(card)
    cfg = card.config
    recipe = ", ".join(f"{k} {cfg[k]}" for k in ("optimizer", "lr", "epochs", "batch_size", "schedule", "loss",
                                                  "image_size", "augment", "seed") if k in cfg)
    name = repo_id.split("/")[-1]
    calibration = f" Calibration note: {card.calibration_note}" if card.calibration_note else ""
    body = f"""
# {name} — {ARCHS[card.arch].title} · level `{card.level}` (covid_cls)

> {RESEARCH_ONLY}

A chest X-ray classifier (`{"` / `".join(card.classes)}`) fine-tuned with
covid_cls — a lab for one question: how much of a pretrained CNN must be fine-tuned to
{task}, and what does the model look at (every prediction comes with a
Grad-CAM map and an out-of-distribution check that abstains: "uncertain — outside what this model was trained on").

## Intended use

- **For:** research and teaching — comparing fine-tuning levels, studying shortcut learning, demonstrating
  Grad-CAM and abstention.
- **Not for:** diagnosis, triage, screening or any clinical decision; not validated on any population; not a
  medical device. Its numbers below come from the same sources it was trained on and say little about X-rays
  from elsewhere.

## Training data and its known confounds

Data folder: `{data}` ({count_txt}; {card.data.get('skipped', 0)} unreadable file(s) skipped;
{len(dup)} near-duplicate pair(s) across splits found at training time).

{confound_text(card)}

## Model

- **Architecture:** {ARCHS[card.arch].title} with a new head `in_features → {card.hidden} → {card.num_classes}` (ReLU,
  dropout {card.dropout}).
- **Fine-tuning level `{card.level}`:** {LEVEL_TEXT.get(card.level, card.level).format(
    hidden=card.hidden, num_classes=card.num_classes)}.
- **Weights origin:** {_weights_text(card)}
- **Training:** {recipe or "see card.json"}; best epoch {card.best_epoch}; {card.device or "?"}, {card.precision};
  {card.train_seconds:.0f} s.
- **Decision rule:** calibrated probabilities (temperature {card.temperature:.3f}); {rule}.{calibration}

## Evaluation (measured at training time)

At the model's operating point; 95 % intervals from a stratified percentile bootstrap (2,000 resamples).
The `model-index` metadata holds the same numbers (`metric_args.ci_95`).

{_metric_rows(card)}

## How to use it with covid_cls

```bash
pip install -e .        # in a clone of the covid_cls project
python -m covid_cls pull {repo_id}          # -> checkpoints/{name}.safetensors + .json, verified (SHA-256, header)
python -m covid_cls predict xray.png --checkpoint checkpoints/{name}.safetensors
```

```python
from covid_cls import Predictor
from covid_cls.hub import pull
path = pull("{repo_id}", "checkpoints")
p = Predictor("checkpoints").predict("xray.png", checkpoint=path)
print(p.label, p.probs, p.reasons)   # label is "uncertain — ..." when the image is unlike the training data
```

Or in the web app: `COVID_CLS_HUB_MODELS={repo_id} python app.py`.

Files: `model.safetensors` (tensors only, no pickle), `card.json` (everything covid_cls knows about the model:
config, metrics with CIs, history, OOD statistics' scalars, size and SHA-256 of the weights), this README.

## Licence

`other` — research and teaching only, not for clinical use. The weights derive from their training images,
whose licences apply (for cxr-real several are non-commercial and/or no-derivatives) and, when started from
ImageNet, from torchvision's ImageNet weights and their terms.
"""
    return f"---\n{metadata(card, repo_id).to_yaml()}\n---\n{body}"


def _names(classes) -> str:
    """`a`, `b` and `c`."""
    quoted = [f"`{c}`" for c in classes]
    return ", ".join(quoted[:-1]) + f" and {quoted[-1]}"


__all__ = ["render", "metadata", "eval_results", "dataset_id", "task_name", "LIBRARY_NAME", "RESEARCH_ONLY"]
