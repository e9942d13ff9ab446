"""The Gradio app: Predict | Train | Study | Models | Compare. A thin shell over the library.

Nothing heavy happens at import or in ``build_app()``: torch loads on the first prediction or training
request, models on first use (then cached). Training runs in a worker process (``jobs.py``).

Settings (environment):
  COVID_CLS_CHECKPOINTS  checkpoint folder (default ``checkpoints``)
  COVID_CLS_RUNS         run history, uploaded datasets, demo data (default ``runs``)
  COVID_CLS_DATA_ROOTS   folders the Train tab may read, separated by ``:`` (default: the demo data only)
  COVID_CLS_TRAINING     ``0`` switches training off (public deployments)
  COVID_CLS_MAX_UPLOAD_MB upload limit (default 50)
"""

from __future__ import annotations

import hashlib
import html
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr

from .imaging import MAX_BYTES, ImageError, describe_limits

DISCLAIMER = "Research demo — not a diagnosis. Do not use for clinical decisions."
ARCH_CHOICES = [("ResNet18", "resnet18"), ("VGG16", "vgg16")]
LEVEL_CHOICES = [("fc — new head only", "fc"), ("partial — last conv block + head", "partial"),
                 ("full — everything", "full")]
BEST = "best for this pair"
SOURCES = ["synthetic demo set", "server folder", "upload .zip"]
QUICK_DEMO = dict(arch="resnet18", level="fc", epochs=8, opt="adam", lr=1e-3, image_size=224)

try:  # Hugging Face ZeroGPU: request a GPU for the duration of a call; a no-op everywhere else
    import spaces  # type: ignore

    gpu = spaces.GPU
except Exception:  # noqa: BLE001
    def gpu(fn=None, **_kw):
        return fn if fn is not None else (lambda f: f)


@dataclass
class Settings:
    checkpoints: Path
    runs: Path
    training: bool
    max_upload: int
    roots_env: str

    @classmethod
    def from_env(cls) -> "Settings":
        return cls(checkpoints=Path(os.environ.get("COVID_CLS_CHECKPOINTS", "checkpoints")),
                   runs=Path(os.environ.get("COVID_CLS_RUNS", "runs")),
                   training=os.environ.get("COVID_CLS_TRAINING", "1") != "0",
                   max_upload=int(float(os.environ.get("COVID_CLS_MAX_UPLOAD_MB", MAX_BYTES / 2**20)) * 2**20),
                   roots_env=os.environ.get("COVID_CLS_DATA_ROOTS", ""))

    @property
    def demo_data(self) -> Path:
        return self.runs / "demo_data"

    @property
    def uploads(self) -> Path:
        return self.runs / "datasets"

    def roots(self) -> list[Path]:
        from .safety import allowed_roots

        self.demo_data.mkdir(parents=True, exist_ok=True)
        self.uploads.mkdir(parents=True, exist_ok=True)
        return allowed_roots(self.roots_env, default=self.demo_data) + [self.demo_data.resolve(),
                                                                         self.uploads.resolve()]


@dataclass
class Services:
    """Lazily created heavy objects shared by all sessions."""

    settings: Settings
    _predictor: Any = None
    _jobs: Any = None
    _unpacked: dict = field(default_factory=dict)   # uploaded zip path -> where it was extracted

    @property
    def predictor(self):
        if self._predictor is None:
            from .predictor import Predictor

            self._predictor = Predictor(self.settings.checkpoints)
        return self._predictor

    @property
    def jobs(self):
        if self._jobs is None:
            from .jobs import JobManager

            self._jobs = JobManager(self.settings.runs)
        return self._jobs


# -------------------------------------------------------------------------------------------------
# helpers
# -------------------------------------------------------------------------------------------------

def _fmt(v, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _metrics_line(m: dict | None) -> str:
    if not m:
        return "–"
    return (f"acc {_fmt(m.get('accuracy'))} · sens {_fmt(m.get('sensitivity'))} · spec {_fmt(m.get('specificity'))}"
            f" · F1 {_fmt(m.get('f1'))} · AUC {_fmt(m.get('auc'))} (n={m.get('n', '–')})")


def _weights_text(card: dict) -> str:
    if card.get("weights_origin") == "imagenet":
        return "ImageNet pretrained"
    if card.get("weights_origin") == "scratch":
        return "⚠️ **trained from scratch** (ImageNet weights were not available)"
    return card.get("weights_note") or str(card.get("weights_origin", "unknown"))


def _card_markdown(card: dict) -> str:
    from .models import ARCHS

    metrics = card.get("metrics") or {}
    data = card.get("data") or {}
    counts = data.get("counts") or {}
    count_txt = ", ".join(f"{s} {sum(c.values())}" for s, c in counts.items())
    title = f"{ARCHS[card['arch']].title} · {card['level']}" if card.get("arch") in ARCHS else card.get("arch")
    return "  \n".join([
        f"**Model:** {title} — `{card.get('file', '')}` (created {card.get('created', '?')})",
        f"**Weights:** {_weights_text(card)}",
        f"**Data:** `{data.get('root', '?')}` ({count_txt})",
        f"**Validation:** {_metrics_line(metrics.get('validation'))}",
        f"**Test:** {_metrics_line(metrics.get('test'))}",
        f"**Temperature:** {_fmt(card.get('temperature'), 2)} · best epoch {card.get('best_epoch', '?')}"
        + (f" · trained on {card['device']}, {card.get('precision', 'fp32')}" if card.get("device") else ""),
    ])


def _banner() -> str:
    return f"<div class='cc-banner'>⚠️ {DISCLAIMER}</div>"


def _progress_html(run) -> str:
    if run is None:
        return ""
    pct = int(round(run.progress * 100))
    eta = ""
    if run.eta_s and run.status == "running":
        m, s = divmod(int(run.eta_s), 60)
        eta = f" · ETA {m}m{s:02d}s"
    colour = {"done": "#2e7d32", "failed": "#c62828", "stopped": "#9e9e9e", "interrupted": "#9e9e9e"}.get(
        run.status, "#1565c0")
    study = f" · run {html.escape(run.study.get('current', ''))}" if run.kind == "study" and run.study.get("current") else ""
    return (f"<div class='cc-progress'><div style='width:{pct}%;background:{colour}'></div></div>"
            f"<div><b>{html.escape(run.status)}</b> · {pct}%{eta}{study} · {html.escape(run.message or '')}</div>")


def _read_upload(path: str | None, limit: int) -> bytes:
    """Read an uploaded file into memory and delete it: uploads are not kept after the request."""
    from .safety import UploadTooLarge, take_upload

    if not path:
        raise gr.Error("Upload an X-ray image first.")
    try:
        # Also serves a second request for the same content (same path) that arrives just after the first.
        return take_upload(path, limit)
    except UploadTooLarge as exc:
        raise gr.Error(f"The file is {exc.size / 2**20:.1f} MB; the limit is {limit / 2**20:.0f} MB.") from None
    except FileNotFoundError:
        raise gr.Error("The upload is no longer on the server; upload the file again.") from None


def _unique_image(img):
    """Tag a result image with a unique EXIF ImageUniqueID (Gradio keeps it when encoding).

    Gradio names a result file after the hash of its bytes and writes it in place (truncate, write), so two
    requests returning the same picture at the same moment share one file, and one of them can be served
    a half-written copy. A unique tag gives each response its own file.
    """
    import uuid

    from PIL import Image

    exif = Image.Exif()
    exif[0xA420] = uuid.uuid4().hex
    img.info["exif"] = exif.tobytes()
    return img


# -------------------------------------------------------------------------------------------------
# the app
# -------------------------------------------------------------------------------------------------

CSS = """
.cc-banner {background:#fff3cd;color:#5c4400;border:1px solid #e0c36a;border-radius:6px;padding:6px 10px;
            font-weight:600;margin:4px 0}
.cc-progress {height:10px;background:#e0e0e0;border-radius:5px;overflow:hidden;margin:4px 0}
.cc-progress > div {height:100%}
"""


def build_app(settings: Settings | None = None) -> gr.Blocks:
    settings = settings or Settings.from_env()
    svc = Services(settings)

    # ---------------- predict ----------------
    def checkpoint_choices(arch: str, level: str):
        from .checkpoints import list_checkpoints

        cards = [c for c in list_checkpoints(settings.checkpoints) if c["arch"] == arch and c["level"] == level]
        choices = [BEST] + [c["file"] for c in cards]
        note = "" if cards else (f"No trained model for **{arch} · {level}** yet. Train one in the Train tab, or "
                                 "press **Train quick demo model** (ResNet18 · fc on synthetic data, about a "
                                 "minute on a CPU).")
        return gr.update(choices=choices, value=BEST), note, gr.update(visible=not cards and settings.training)

    def upload_preview(path: str | None):
        """On upload: decode once, keep the image in the session, delete the file, show a preview."""
        from .imaging import load_image

        if not path:
            return None, None
        if not Path(path).exists():   # a Predict click already consumed (and deleted) the upload
            return gr.skip(), gr.skip()
        data = _read_upload(path, settings.max_upload)
        try:
            img = load_image(data)
        except ImageError as exc:
            raise gr.Error(str(exc)) from None
        return img, {"name": Path(path).name, "image": img}

    @gpu
    def _predict_core(image, arch, level, checkpoint):
        return svc.predictor.predict(image, arch=arch, level=level, checkpoint=checkpoint)

    def predict(path: str | None, arch: str, level: str, checkpoint: str | None, session: dict | None = None):
        from .checkpoints import CheckpointError
        from .predictor import NoCheckpointError

        if session and path and Path(path).name == session.get("name") and not Path(path).exists():
            image = session["image"]          # already decoded when it was uploaded
        elif session and not path:
            image = session["image"]
        else:
            image = _read_upload(path, settings.max_upload)
        # A file NAME in the checkpoint folder: "../x.pt" or "/abs/x.pt" must not reach other folders.
        ck = None if not checkpoint or checkpoint == BEST else str(settings.checkpoints / Path(checkpoint).name)
        try:
            p = _predict_core(image, arch, level, ck)
        except ImageError as exc:
            raise gr.Error(str(exc)) from None
        except (NoCheckpointError, CheckpointError) as exc:   # no model; a corrupt or unsafe checkpoint
            raise gr.Error(str(exc)) from None
        warning = ("> ⚠️ **This does not look like the chest X-rays this model was trained on** — "
                   + "; ".join(p.ood["reasons"]) + ". The prediction below is unreliable.") if p.ood.get("flagged") else ""
        info = "\n\n".join([
            warning,
            f"### Prediction: **{p.label}**  \n" + " · ".join(f"{k} {v:.1%}" for k, v in p.probs.items())
            + " (temperature-calibrated)",
            f"Ran on **{p.device}** in **{p.latency_ms:.0f} ms** (forward + Grad-CAM).",
            _card_markdown(p.card),
            f"**{DISCLAIMER}**",
        ])
        state = {"image": p.image, "cam": p.cam, "name": Path(path).name if path else session.get("name")}
        return p.probs, _unique_image(p.overlay), info, state

    def reblend(alpha: float, state: dict | None):
        from .explain import overlay

        if not state or state.get("cam") is None:
            return None
        return _unique_image(overlay(state["image"], state["cam"], alpha))

    # ---------------- datasets ----------------
    def ensure_demo() -> Path:
        from .synthetic import make_demo_dataset

        if not (settings.demo_data / "train").is_dir():
            make_demo_dataset(settings.demo_data, n_per_class=40, size=256)
        return settings.demo_data

    def resolve_dataset(source: str, folder: str, zip_path: str | None) -> Path:
        from .safety import UnsafePath, check_allowed, safe_extract_zip

        try:
            if not settings.training:   # refused before any work: no demo set made, no folder read, no zip unpacked
                raise gr.Error("Training is switched off on this server (COVID_CLS_TRAINING=0).")
            if source == SOURCES[0]:
                return ensure_demo()
            if source == SOURCES[1]:
                return check_allowed(folder, settings.roots())
            if not zip_path:
                raise gr.Error("Upload a .zip with train/ validation/ test/ × infected/ normal/ folders.")
            if not Path(zip_path).exists() and zip_path in svc._unpacked:
                return svc._unpacked[zip_path]   # Scan, then Start: the browser sends the (deleted) upload again
            digest = hashlib.sha1(Path(zip_path).read_bytes()).hexdigest()[:16]
            dest = settings.uploads / digest
            root = dest if (dest / "train").is_dir() else safe_extract_zip(zip_path, dest)
            svc._unpacked[zip_path] = root
            return root
        except UnsafePath as exc:
            raise gr.Error(str(exc)) from None
        except FileNotFoundError:
            raise gr.Error("The uploaded .zip is no longer on the server; upload it again.") from None
        finally:
            if zip_path:   # uploads are not kept, whichever source was picked
                Path(zip_path).unlink(missing_ok=True)

    def scan(source: str, folder: str, zip_path: str | None):
        from .data import DatasetError, scan_dataset

        root = resolve_dataset(source, folder, zip_path)
        try:
            info = scan_dataset(root)
        except DatasetError as exc:
            raise gr.Error(str(exc)) from None
        rows = [[s, c["infected"], c["normal"]] for s, c in info.counts().items()]
        skipped = "".join(f"\n- `{f}`: {why}" for f, why in info.skipped[:10])
        md = f"**{root}** — {sum(r[1] + r[2] for r in rows)} images" + (
            f"; skipped {len(info.skipped)} file(s):{skipped}" if info.skipped else "")
        if "demo_data" in str(root):
            md += "  \n_SYNTHETIC images — a model trained on them knows nothing about real X-rays._"
        return md, rows, str(root)

    # ---------------- training ----------------
    def _config(root: Path, arch, level, epochs, lr, bs, opt, sched, loss, weights, augment, image_size, seed):
        from .config import TrainConfig

        try:
            return TrainConfig(data_dir=str(root), arch=arch, level=level, epochs=int(epochs), lr=float(lr),
                               batch_size=int(bs or 0), optimizer=opt, schedule=sched, loss=loss, weights=weights,
                               augment=bool(augment), image_size=int(image_size), seed=int(seed),
                               out_dir=str(settings.checkpoints))
        except ValueError as exc:
            raise gr.Error(str(exc)) from None

    def _start(cfg, kind="train", extra=None):
        from .jobs import JobBusy

        if not settings.training:
            raise gr.Error("Training is switched off on this server (COVID_CLS_TRAINING=0).")
        try:
            return svc.jobs.start(cfg.to_dict(), kind=kind, extra=extra)
        except JobBusy as exc:
            raise gr.Error(str(exc)) from None

    def _train_outputs(run):
        from . import plots

        fig = plots.curves(run.history, run.steps, title=f"{run.config.get('arch')} · {run.config.get('level')}")
        log = "\n".join(run.log[-30:]) + (f"\n{run.message}" if run.status in ("failed", "stopped") else "")
        metrics_rows, cm_fig, roc_fig = [], None, None
        if run.metrics:
            for split in ("validation", "test"):
                m = run.metrics.get(split) or {}
                metrics_rows.append([split] + [m.get(k) for k in ("accuracy", "sensitivity", "specificity", "f1",
                                                                  "auc", "n")])
            test = run.metrics.get("test") or {}
            if test.get("confusion"):
                cm_fig = plots.confusion(test["confusion"], "test confusion matrix")
            roc_fig = plots.roc({s: (run.metrics[s]["roc"]["fpr"], run.metrics[s]["roc"]["tpr"], run.metrics[s].get("auc"))
                                 for s in ("validation", "test") if (run.metrics.get(s) or {}).get("roc")})
        return _progress_html(run), fig, log, metrics_rows, cm_fig, roc_fig

    def _stream(run, render, poll_s: float = 0.5):
        """Yield ``render(run)`` whenever the run changed, until it ends."""
        import matplotlib.pyplot as plt

        seen = -1
        while True:
            if run.version != seen:
                seen = run.version
                out = render(run)
                yield out
                plt.close("all")
            if run.status in ("done", "failed", "stopped", "interrupted") and run.version == seen:
                break
            time.sleep(poll_s)

    def train(source, folder, zip_path, arch, level, epochs, lr, bs, opt, sched, loss, weights, augment,
              image_size, seed):
        root = resolve_dataset(source, folder, zip_path)
        run = _start(_config(root, arch, level, epochs, lr, bs, opt, sched, loss, weights, augment, image_size, seed))
        yield from _stream(run, _train_outputs)

    def quick_demo():
        if not settings.training:   # before making the demo data set
            raise gr.Error("Training is switched off on this server (COVID_CLS_TRAINING=0).")
        root = ensure_demo()
        run = _start(_config(root, weights="auto", bs=0, sched="none", loss="ce", augment=True, seed=0,
                             **QUICK_DEMO))
        for out in _stream(run, lambda r: _progress_html(r)):
            yield out
        if run.status == "done":
            yield _progress_html(run) + "<div>✅ Quick demo model ready — press <b>Predict</b>.</div>"

    def stop():
        ok = svc.jobs.stop() if svc._jobs is not None else False
        return "Stopping… the run ends within one step and saves nothing." if ok else "No run in progress."

    def history_rows():
        if not settings.training:
            return []
        rows = []
        for r in svc.jobs.history()[:50]:
            val = ((r.metrics or {}).get("validation") or {})
            test = ((r.metrics or {}).get("test") or {})
            rows.append([r.id, r.kind, f"{r.config.get('arch')} · {r.config.get('level')}" if r.kind == "train" else "2×3",
                         r.config.get("epochs"), r.status, val.get("auc"), test.get("auc"),
                         Path(r.checkpoint).name if r.checkpoint else "", (r.message or "")[:120]])
        return rows

    # ---------------- study ----------------
    def _study_outputs(run):
        from . import plots

        hists = dict(run.study.get("histories") or {})
        if run.status == "running" and run.history:
            hists[run.study.get("current", "current")] = run.history
        fig = plots.overlaid_validation(hists, "auc") if hists else None
        rows = [[r["arch"], r["level"], r["trainable_params"], r["best_val_auc"], r["test_accuracy"],
                 r["test_sensitivity"], r["test_specificity"], r["test_f1"], r["test_auc"], r["seconds"],
                 r["weights"]] for r in run.study.get("rows", [])]
        return _progress_html(run), fig, rows, "\n".join(run.log[-20:])

    def study(source, folder, zip_path, archs, levels, epochs, lr, opt, weights, image_size):
        if not archs or not levels:
            raise gr.Error("Pick at least one architecture and one level.")
        root = resolve_dataset(source, folder, zip_path)
        cfg = _config(root, "resnet18", "fc", epochs, lr, 0, opt, "none", "ce", weights, True, image_size, 0)
        report = settings.runs / "studies" / time.strftime("%Y%m%d-%H%M%S")
        run = _start(cfg, kind="study", extra={"archs": list(archs), "levels": list(levels),
                                               "report_dir": str(report)})
        yield from _stream(run, _study_outputs)

    # ---------------- models ----------------
    def models_json() -> list[dict]:
        from .checkpoints import list_checkpoints

        keep = ("file", "arch", "level", "created", "weights_origin", "metrics", "temperature", "data", "params")
        out = []
        for c in list_checkpoints(settings.checkpoints):
            d = {k: c.get(k) for k in keep}
            d["metrics"] = {s: {k: v for k, v in (m or {}).items() if k != "roc"}
                            for s, m in (c.get("metrics") or {}).items()}
            out.append(d)
        return out

    def models_table():
        rows = []
        for c in models_json():
            val, test = c["metrics"].get("validation", {}), c["metrics"].get("test", {})
            rows.append([c["file"], c["arch"], c["level"], c["weights_origin"], val.get("auc"), test.get("accuracy"),
                         test.get("sensitivity"), test.get("specificity"), test.get("auc"), c["created"]])
        return rows, gr.update(choices=[r[0] for r in rows], value=rows[0][0] if rows else None)

    def model_details(name: str | None):
        from . import plots
        from .checkpoints import read_card

        if not name:
            return "No checkpoint selected.", None, None
        card = read_card(settings.checkpoints / name)
        if card is None:
            return f"`{name}` is no longer available.", None, None
        m = card.get("metrics") or {}
        roc = plots.roc({s: (m[s]["roc"]["fpr"], m[s]["roc"]["tpr"], m[s].get("auc"))
                         for s in ("validation", "test") if (m.get(s) or {}).get("roc")})
        return _card_markdown(card), plots.curves(card.get("history") or [], title=name), roc

    def delete_model(name: str | None, confirmed: bool):
        from .checkpoints import delete_checkpoint

        if not name:
            raise gr.Error("Select a checkpoint first.")
        if not confirmed:
            raise gr.Error("Tick 'yes, delete it' to confirm.")
        path = settings.checkpoints / Path(name).name
        delete_checkpoint(path)
        if svc._predictor is not None:
            svc.predictor.evict(path)
        rows, dd = models_table()
        return rows, dd, False, f"Deleted `{name}`."

    # ---------------- compare ----------------
    def compare(path: str | None, session: dict | None = None):
        from .checkpoints import CheckpointError, best_checkpoint
        from .models import ARCHS, LEVELS

        image = session["image"] if session and (not path or not Path(path).exists()) else _read_upload(
            path, settings.max_upload)
        gallery, rows = [], []
        for arch in ARCHS:
            for level in LEVELS:
                ck = best_checkpoint(settings.checkpoints, arch, level)
                if ck is None:
                    continue
                try:
                    p = _predict_core(image, arch, level, str(ck))
                except (ImageError, CheckpointError) as exc:
                    raise gr.Error(str(exc)) from None
                pinf = p.probs.get("infected", 0.0)
                gallery.append((_unique_image(p.overlay),
                                f"{ARCHS[arch].title} · {level}: {p.label} (infected {pinf:.0%})"))
                rows.append([ARCHS[arch].title, level, p.label, pinf, p.card.get("weights_origin"),
                             round(p.latency_ms, 1)])
        if not rows:
            raise gr.Error("No trained models yet: train one in the Train tab first.")
        return gallery, rows

    # =============================== layout ===============================
    with gr.Blocks(title="covid_cls — chest X-ray fine-tuning lab", delete_cache=(600, 1800)) as demo:
        gr.Markdown("# covid_cls — chest X-ray fine-tuning lab\n"
                    "How much of a pretrained CNN must be fine-tuned to tell infected from normal chest X-rays, "
                    "and what does it look at?")
        gr.HTML(_banner())
        session = gr.State(None)

        with gr.Tab("Predict"):
            with gr.Row():
                with gr.Column(scale=1):
                    upload = gr.File(label="Chest X-ray (PNG, JPEG, TIFF, BMP, WebP, DICOM)", type="filepath")
                    gr.Markdown(f"<small>{describe_limits()}</small>")
                    arch = gr.Radio(ARCH_CHOICES, value="resnet18", label="Architecture")
                    level = gr.Radio(LEVEL_CHOICES, value="fc", label="Fine-tuning level")
                    ckpt = gr.Dropdown([BEST], value=BEST, label="Checkpoint", allow_custom_value=True)
                    predict_btn = gr.Button("Predict", variant="primary")
                    no_model = gr.Markdown()
                    demo_btn = gr.Button("Train quick demo model", visible=False)
                    demo_status = gr.HTML()
                with gr.Column(scale=2):
                    probs = gr.Label(label="Probabilities (calibrated)", num_top_classes=2)
                    with gr.Row():
                        preview = gr.Image(label="Image", type="pil", interactive=False, format="jpeg",
                                           elem_id="cc-preview")
                        overlay_img = gr.Image(label="Grad-CAM overlay", type="pil", interactive=False,
                                               format="jpeg", elem_id="cc-overlay")
                    alpha = gr.Slider(0.0, 1.0, value=0.45, step=0.05, label="Heatmap opacity")
                    info = gr.Markdown(elem_id="cc-info")
                    cam_state = gr.State(None)

            upload.upload(upload_preview, [upload], [preview, session], api_visibility="private")
            predict_btn.click(predict, [upload, arch, level, ckpt, session], [probs, overlay_img, info, cam_state],
                              api_name="predict", concurrency_limit=4, concurrency_id="predict")
            alpha.change(reblend, [alpha, cam_state], [overlay_img], api_visibility="private",
                         show_progress="hidden")
            for comp in (arch, level):
                comp.change(checkpoint_choices, [arch, level], [ckpt, no_model, demo_btn], api_visibility="private")
            ckpt.focus(lambda a, lv: checkpoint_choices(a, lv)[0], [arch, level], [ckpt], api_visibility="private")
            demo_btn.click(quick_demo, None, [demo_status], api_name="quick_demo", concurrency_limit=4).then(
                checkpoint_choices, [arch, level], [ckpt, no_model, demo_btn], api_visibility="private")

        with gr.Tab("Train"):
            if not settings.training:
                gr.Markdown("### Training is switched off on this server\nThis deployment sets "
                            "`COVID_CLS_TRAINING=0` (a public Space shares one machine between all visitors, and "
                            "fine-tuning would block it for minutes). Run the app locally to train: "
                            "`python app.py`.")
            with gr.Row(visible=settings.training):
                with gr.Column(scale=1):
                    source = gr.Radio(SOURCES, value=SOURCES[0], label="Dataset")
                    folder = gr.Textbox(label="Server folder (under COVID_CLS_DATA_ROOTS)",
                                        placeholder="/data/cxr", visible=False)
                    zip_up = gr.File(label="ImageFolder .zip", file_types=[".zip"], visible=False, type="filepath")
                    scan_btn = gr.Button("Scan dataset")
                    scan_md = gr.Markdown()
                    scan_df = gr.Dataframe(headers=["split", "infected", "normal"], interactive=False)
                    resolved = gr.State("")
                    with gr.Group():
                        t_arch = gr.Radio(ARCH_CHOICES, value="resnet18", label="Architecture")
                        t_level = gr.Radio(LEVEL_CHOICES, value="fc", label="Level")
                        epochs = gr.Slider(1, 50, value=10, step=1, label="Epochs")
                        with gr.Row():
                            lr = gr.Number(1e-3, label="Learning rate")
                            bs = gr.Number(0, label="Batch size (0 = auto)", precision=0)
                        with gr.Row():
                            opt = gr.Dropdown(["sgd", "adam", "adamw"], value="sgd", label="Optimizer")
                            sched = gr.Dropdown(["none", "cosine", "onecycle"], value="none", label="Schedule")
                        with gr.Row():
                            loss = gr.Dropdown(["ce", "weighted_ce", "focal"], value="ce", label="Loss")
                            weights = gr.Dropdown(["auto", "imagenet", "none"], value="auto", label="Weights")
                        augment = gr.Checkbox(True, label="Augmentation (rotation ±30°, random resized crop, flip)")
                        with gr.Accordion("Advanced", open=False):
                            image_size = gr.Slider(64, 320, value=224, step=32, label="Image size")
                            seed = gr.Number(0, label="Seed", precision=0)
                    with gr.Row():
                        start_btn = gr.Button("Start", variant="primary")
                        stop_btn = gr.Button("Stop", variant="stop")
                with gr.Column(scale=2):
                    progress = gr.HTML(elem_id="cc-train-progress")
                    curves = gr.Plot(label="Live curves", elem_id="cc-curves")
                    log = gr.Textbox(label="Log", lines=8, max_lines=12, autoscroll=True)
                    results = gr.Dataframe(headers=["split", "accuracy", "sensitivity", "specificity", "F1", "AUC", "n"],
                                           interactive=False, label="Metrics (best epoch, temperature applied)")
                    with gr.Row():
                        cm_plot = gr.Plot(label="Confusion matrix (test)")
                        roc_plot = gr.Plot(label="ROC")
                    stop_md = gr.Markdown()
                    with gr.Accordion("Run history", open=False):
                        hist_df = gr.Dataframe(headers=["id", "kind", "model", "epochs", "status", "val AUC",
                                                        "test AUC", "checkpoint", "message"], interactive=False)
                        hist_btn = gr.Button("Refresh history")

            def toggle(src):
                return gr.update(visible=src == SOURCES[1]), gr.update(visible=src == SOURCES[2])

            source.change(toggle, [source], [folder, zip_up], api_visibility="private")
            scan_btn.click(scan, [source, folder, zip_up], [scan_md, scan_df, resolved], api_name="scan")
            start_btn.click(train, [source, folder, zip_up, t_arch, t_level, epochs, lr, bs, opt, sched, loss, weights,
                                    augment, image_size, seed],
                            [progress, curves, log, results, cm_plot, roc_plot], api_name="train",
                            concurrency_limit=4, concurrency_id="train").then(
                history_rows, None, [hist_df], api_visibility="private")
            stop_btn.click(stop, None, [stop_md], api_name="stop")
            hist_btn.click(history_rows, None, [hist_df], api_visibility="private")

        with gr.Tab("Study"):
            gr.Markdown("The 2020 notebook's whole experiment in one click: every architecture × level with shared "
                        "settings, one after another, reusing the decoded data. Uses the dataset chosen in the "
                        "Train tab.")
            if not settings.training:
                gr.Markdown("### Training is switched off on this server\nThis deployment sets "
                            "`COVID_CLS_TRAINING=0`, so studies (which train six models) are off too. Run the app "
                            "locally to run one: `python app.py`.")
            with gr.Row(visible=settings.training):
                with gr.Column(scale=1):
                    s_archs = gr.CheckboxGroup(ARCH_CHOICES, value=["resnet18", "vgg16"], label="Architectures")
                    s_levels = gr.CheckboxGroup(["fc", "partial", "full"], value=["fc", "partial", "full"],
                                                label="Levels")
                    s_epochs = gr.Slider(1, 50, value=10, step=1, label="Epochs")
                    s_lr = gr.Number(1e-3, label="Learning rate")
                    s_opt = gr.Dropdown(["sgd", "adam", "adamw"], value="sgd", label="Optimizer")
                    s_weights = gr.Dropdown(["auto", "imagenet", "none"], value="auto", label="Weights")
                    s_size = gr.Slider(64, 320, value=224, step=32, label="Image size")
                    with gr.Row():
                        s_start = gr.Button("Run study", variant="primary")
                        s_stop = gr.Button("Stop", variant="stop")
                with gr.Column(scale=2):
                    s_progress = gr.HTML()
                    s_plot = gr.Plot(label="Validation AUC per run")
                    s_table = gr.Dataframe(headers=["arch", "level", "trainable params", "best val AUC", "test acc",
                                                    "test sens", "test spec", "test F1", "test AUC", "seconds",
                                                    "weights"], interactive=False)
                    s_log = gr.Textbox(label="Log", lines=6, max_lines=10, autoscroll=True)
            s_start.click(study, [source, folder, zip_up, s_archs, s_levels, s_epochs, s_lr, s_opt, s_weights, s_size],
                          [s_progress, s_plot, s_table, s_log], api_name="study", concurrency_limit=4,
                          concurrency_id="train")
            s_stop.click(stop, None, [s_log], api_visibility="private")

        with gr.Tab("Models") as models_tab:
            with gr.Row():
                refresh = gr.Button("Refresh")
            models_df = gr.Dataframe(headers=["file", "arch", "level", "weights", "val AUC", "test acc", "test sens",
                                              "test spec", "test AUC", "created"], interactive=False)
            with gr.Row():
                with gr.Column(scale=1):
                    pick = gr.Dropdown([], label="Checkpoint")
                    card_md = gr.Markdown()
                    confirm = gr.Checkbox(False, label="yes, delete it")
                    del_btn = gr.Button("Delete checkpoint", variant="stop")
                    del_md = gr.Markdown()
                with gr.Column(scale=2):
                    m_curves = gr.Plot(label="Training curves")
                    m_roc = gr.Plot(label="ROC")
            models_api = gr.JSON(visible=False)
            for trigger in (refresh.click, models_tab.select):
                trigger(models_table, None, [models_df, pick], api_visibility="private")
            refresh.click(models_json, None, [models_api], api_name="models")
            pick.change(model_details, [pick], [card_md, m_curves, m_roc], api_visibility="private")
            del_btn.click(delete_model, [pick, confirm], [models_df, pick, confirm, del_md], api_visibility="private")

        with gr.Tab("Compare"):
            gr.Markdown("One image → Grad-CAM of every available (architecture, level), to see what deeper "
                        "fine-tuning changes. Uses the image from the Predict tab, or upload one here.")
            c_upload = gr.File(label="Chest X-ray", type="filepath")
            c_btn = gr.Button("Compare all models", variant="primary")
            c_gallery = gr.Gallery(label="Grad-CAM per model", columns=3, height="auto", format="jpeg")
            c_table = gr.Dataframe(headers=["arch", "level", "prediction", "p(infected)", "weights", "ms"],
                                   interactive=False)
            c_upload.upload(upload_preview, [c_upload], [gr.Image(visible=False), session], api_visibility="private")
            c_btn.click(compare, [c_upload, session], [c_gallery, c_table], api_name="compare", concurrency_id="predict")

        demo.load(checkpoint_choices, [arch, level], [ckpt, no_model, demo_btn], api_visibility="private")

    demo.queue(max_size=64, default_concurrency_limit=2)
    return demo


def launch(demo: gr.Blocks | None = None, **kw) -> None:
    settings = Settings.from_env()
    demo = demo or build_app(settings)
    demo.launch(max_file_size=settings.max_upload, theme=gr.themes.Soft(), css=CSS, **kw)
