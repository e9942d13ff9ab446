"""Shared by the tabs: the one error path, choice lists from the registry, option components generated from
``TrainConfig``'s fields, and the formatting of cards, metrics and progress."""

from __future__ import annotations

import functools
import html
import inspect
import math
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr

from ..config import TrainConfig, choices_of
from ..errors import ConfigError, CovidClsError, ImageError, UploadTooLarge
from ..report import DISCLAIMER  # noqa: F401 - the tabs import it from here

if TYPE_CHECKING:
    from ..card import Card
    from ..jobs import Run

TRAINING_OFF = "Training is switched off on this server (COVID_CLS_TRAINING=0)."
BEST = "best for this pair"
CSS = """
.cc-banner {background:#fff3cd;color:#5c4400;border:1px solid #e0c36a;border-radius:6px;padding:6px 10px;
            font-weight:600;margin:4px 0}
.cc-progress {height:10px;background:#e0e0e0;border-radius:5px;overflow:hidden;margin:4px 0}
.cc-progress > div {height:100%}
"""


# ------------------------------------------------------------------------------------------------- errors
MAX_MESSAGE = 600   # characters of a message shown (and logged): an argument quoted in it stays short


def user_message(exc: CovidClsError) -> str:
    if isinstance(exc, UploadTooLarge) and hasattr(exc, "size"):
        return f"The file is {exc.size / 2**20:.1f} MB; the limit is {exc.limit / 2**20:.0f} MB."
    return shorten(str(exc), MAX_MESSAGE)


def shorten(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters (saying how much was cut), NUL bytes shown as \\x00."""
    text = text.replace("\x00", "\\x00")
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text) - limit:,} more characters)"


def user_errors(fn: Callable) -> Callable:
    """THE error path of the app: a ``CovidClsError`` (bad upload, no model, unsafe path, busy, ...) becomes a
    ``gr.Error`` carrying its message. Anything else is a bug and stays one (Gradio reports a server error).
    Works for plain and generator (streaming) handlers.

    Before the handler runs, every argument is checked against its annotation (``check_arguments``): an HTTP
    client can send ``None``, numbers, dicts, NUL bytes or a megabyte of text where a name is expected, and
    gets a clear message instead of a server error (issue 11 #16)."""
    check = argument_checker(fn)
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def streaming(*args, **kw):
            try:
                check(args, kw)
                yield from fn(*args, **kw)
            except CovidClsError as exc:
                raise gr.Error(user_message(exc)) from None
        return streaming

    @functools.wraps(fn)
    def plain(*args, **kw):
        try:
            check(args, kw)
            return fn(*args, **kw)
        except CovidClsError as exc:
            raise gr.Error(user_message(exc)) from None
    return plain


# ------------------------------------------------------------------------------------------------- arguments
MAX_TEXT = 4096        # characters of any text argument (a folder path, a checkpoint name, a choice)
MAX_ITEMS = 64         # entries of a list argument


def _expect(name: str, value: Any, what: str) -> ConfigError:
    shown = shorten(repr(value), 60)
    return ConfigError(f"{name} must be {what}, not {shown} ({type(value).__name__})")


def check_text(name: str, value: Any, optional: bool = False, limit: int = MAX_TEXT) -> str | None:
    """A text argument: a ``str`` without NUL bytes and at most ``limit`` characters (None if ``optional``)."""
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise _expect(name, value, "text")
    if "\x00" in value:
        raise ConfigError(f"{name} contains a NUL character; refused")
    if len(value) > limit:
        raise ConfigError(f"{name} is {len(value):,} characters long; the limit is {limit:,}")
    return value


def check_number(name: str, value: Any, optional: bool = False, integer: bool = False) -> float | int | None:
    """A finite number (an integer when ``integer``); None if ``optional``."""
    if value is None and optional:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (integer and float(value) != int(value)):
        raise _expect(name, value, "an integer" if integer else "a number")
    return value


def check_text_list(name: str, value: Any, optional: bool = False) -> list[str] | None:
    """A list of distinct texts, at most MAX_ITEMS of them (a duplicate would repeat work: issue 11 #8)."""
    if value is None and optional:
        return None
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list):
        raise _expect(name, value, "a list of names")
    if len(value) > MAX_ITEMS:
        raise ConfigError(f"{name} has {len(value):,} entries; the limit is {MAX_ITEMS}")
    for v in value:
        check_text(f"each entry of {name}", v, limit=256)
    dups = sorted({v for v in value if value.count(v) > 1})
    if dups:
        raise ConfigError(f"{name} lists {', '.join(repr(d)[:40] for d in dups)} more than once; pick each once")
    return value


# annotation (as written in the handler) -> check; ``dict`` (a session's gr.State) and ``Services`` are not
# sent by clients and are not checked
_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "str": check_text,
    "str | None": lambda n, v: check_text(n, v, optional=True),
    "list[str]": check_text_list,
    "list[str] | None": lambda n, v: check_text_list(n, v, optional=True),
    "float": check_number,
    "float | None": lambda n, v: check_number(n, v, optional=True),
    "int": lambda n, v: check_number(n, v, integer=True),
    "int | None": lambda n, v: check_number(n, v, optional=True, integer=True),
    "bool": lambda n, v: v if isinstance(v, bool) else (_ for _ in ()).throw(_expect(n, v, "true or false")),
}


def argument_checker(fn: Callable) -> Callable[[tuple, dict], None]:
    """A function checking ``(args, kwargs)`` of a call to ``fn`` against ``fn``'s annotations."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return lambda args, kw: None
    checks = {p.name: _CHECKS[p.annotation] for p in sig.parameters.values()
              if isinstance(p.annotation, str) and p.annotation in _CHECKS}
    if not checks:
        return lambda args, kw: None

    def check(args: tuple, kw: dict) -> None:
        try:
            bound = sig.bind_partial(*args, **kw)
        except TypeError as exc:
            raise ConfigError(f"wrong arguments: {exc}") from None
        for name, value in bound.arguments.items():
            if name in checks:
                checks[name](name, value)
    return check


def raw_input_problem(block: Any, value: Any) -> str | None:
    """What is wrong with ``value`` as the raw (JSON) input of component ``block``, before Gradio preprocesses it
    (where a wrong type is an unhandled exception, i.e. HTTP 500, and a wrong choice is echoed in full)."""
    what = f"{getattr(block, 'label', None) or block.__class__.__name__}"
    if isinstance(block, gr.State):
        return None   # from the session, not from the client
    if value is None:
        return f"{what}: a list of choices is required, not None" if isinstance(block, gr.CheckboxGroup) else None
    if isinstance(block, gr.File) and getattr(block, "file_count", "single") != "single":   # a batch (issue 12)
        if not isinstance(value, list) or len(value) > MAX_FILES_LIST:
            return f"{what}: expected a list of at most {MAX_FILES_LIST} files, not {_short(value)}"
        for v in value:
            if not (isinstance(v, dict) and isinstance(v.get("path"), str) and len(v["path"]) <= MAX_TEXT
                    and "\x00" not in v["path"]):
                return f"{what}: expected files (gradio_client: [handle_file(path), ...]), not {_short(v)}"
        return None
    if isinstance(block, gr.File):
        ok = isinstance(value, dict) and isinstance(value.get("path"), str) and len(value["path"]) <= MAX_TEXT
        ok = ok and "\x00" not in value["path"]
        return None if ok else f"{what}: expected a file (gradio_client: handle_file(path)), not {_short(value)}"
    if isinstance(block, gr.CheckboxGroup):
        if not isinstance(value, list) or len(value) > MAX_ITEMS:
            return f"{what}: expected a list of at most {MAX_ITEMS} choices, not {_short(value)}"
        return next((p for p in (_scalar_problem(what, v) for v in value) if p), None)
    if isinstance(block, (gr.Checkbox,)):
        return None if isinstance(value, bool) else f"{what}: expected true or false, not {_short(value)}"
    if isinstance(block, (gr.Radio, gr.Dropdown, gr.Textbox, gr.Number, gr.Slider)):
        return _scalar_problem(what, value)
    return None


MAX_FILES_LIST = 1000   # files of one multi-file input (a batch counts its images itself: at most 200)


def _scalar_problem(what: str, value: Any) -> str | None:
    if isinstance(value, bool) or isinstance(value, (int, float)):
        return None if math.isfinite(value) else f"{what}: {value} is not a finite number"
    if isinstance(value, str):
        if "\x00" in value:
            return f"{what} contains a NUL character; refused"
        if len(value) > MAX_TEXT:
            return f"{what} is {len(value):,} characters long; the limit is {MAX_TEXT:,}"
        return None
    return f"{what}: expected text or a number, not {_short(value)}"


def _short(value: Any) -> str:
    return f"{shorten(repr(value), 60)} ({type(value).__name__})"


def harden_inputs(demo: gr.Blocks) -> gr.Blocks:
    """Check every event's raw inputs before Gradio preprocesses them, and keep every message short.

    Gradio answers a wrong type in a File or CheckboxGroup input, or too few arguments, with an unhandled
    exception (HTTP 500, "upstream app raised an exception"), and echoes a wrong Radio choice in full (a 1 MB
    argument became a 1 MB message and log line). Here each raw input is checked against its component
    (``raw_input_problem``), anything Gradio still raises while preprocessing becomes a short message, and a
    longer message is cut to MAX_MESSAGE characters (issue 11 #16)."""
    original = demo.preprocess_data

    async def preprocess_data(block_fn, inputs, *args, **kw):
        where = f"/{block_fn.api_name}" if isinstance(getattr(block_fn, "api_name", None), str) else "this event"
        if not isinstance(inputs, list) or len(inputs) < len(block_fn.inputs):
            n = len(inputs) if isinstance(inputs, list) else 0
            raise gr.Error(f"{where} takes {len(block_fn.inputs)} arguments; {n} were sent", print_exception=False)
        for block, value in zip(block_fn.inputs, inputs):
            problem = raw_input_problem(block, value)
            if problem:
                raise gr.Error(f"{where}: {problem}", print_exception=False)
        try:
            return await original(block_fn, inputs, *args, **kw)
        except gr.Error as exc:
            if len(str(exc.message)) > MAX_MESSAGE:
                raise gr.Error(shorten(str(exc.message), MAX_MESSAGE), print_exception=False) from None
            raise
        except Exception as exc:  # noqa: BLE001 - Gradio's own preprocessing failed on what a client sent
            raise gr.Error(f"{where}: an argument is not valid for its input ({exc.__class__.__name__})",
                           print_exception=False) from None

    demo.preprocess_data = preprocess_data
    return demo


def is_own_upload(path: str) -> bool:
    """Whether ``path`` is a file Gradio's upload route created (so this request may delete it after reading).

    A client can name any file in Gradio's cache as an input, including another session's result image;
    only uploads are deleted (issue 11 #9). Outside a Gradio event (tests, scripts) the caller hands over
    its own file, which is deleted as before."""
    try:
        from gradio.context import LocalContext

        blocks = LocalContext.blocks.get(None)
    except Exception:  # noqa: BLE001 - no Gradio context at all
        return True
    if blocks is None:
        return True
    uploads = getattr(blocks, "upload_file_set", None)
    if uploads is None:
        return False
    import os

    return path in uploads or os.path.abspath(path) in uploads


def forget_upload(path: str) -> None:
    """Drop a deleted upload from Gradio's upload set (it would otherwise keep the name forever) — unless the same
    content was uploaded again meanwhile (same name: Gradio names uploads after their content)."""
    import os

    if os.path.exists(path):
        return
    try:
        from gradio.context import LocalContext

        blocks = LocalContext.blocks.get(None)
        uploads = getattr(blocks, "upload_file_set", None)
        if uploads is not None:
            import os

            uploads.discard(path)
            uploads.discard(os.path.abspath(path))
    except Exception:  # noqa: BLE001 - best effort
        pass


def discard_upload(path: str | None) -> None:
    """Delete ``path`` if it is an upload this request may delete (``is_own_upload``); never anything else."""
    if not path or not isinstance(path, str) or "\x00" in path or len(path) > MAX_TEXT:
        return
    if is_own_upload(path):
        try:
            Path(path).unlink(missing_ok=True)
        except (OSError, ValueError):
            pass
        forget_upload(path)


_purged = {"at": 0.0}
PURGE_MIN_AGE_S, PURGE_EVERY_S = 60.0, 30.0


def purge_gradio_temp(min_age_s: float | None = None, every_s: float | None = None) -> int:
    """Delete the empty ``tmp*`` files Gradio's File input leaves at the top of its cache folder, one per request
    (``gr.File(type="filepath")`` preprocessing opens a NamedTemporaryFile it never uses or removes: issue 11
    #17). Only empty regular files older than ``min_age_s``; at most once per ``every_s``. Returns how many."""
    import os

    min_age_s = PURGE_MIN_AGE_S if min_age_s is None else min_age_s
    every_s = PURGE_EVERY_S if every_s is None else every_s
    now = time.time()
    if now - _purged["at"] < every_s:
        return 0
    _purged["at"] = now
    try:
        from gradio.utils import get_upload_folder

        folder = get_upload_folder()
        removed = 0
        with os.scandir(folder) as it:
            for entry in it:
                if not entry.name.startswith("tmp") or not entry.is_file(follow_symlinks=False):
                    continue
                st = entry.stat(follow_symlinks=False)
                if st.st_size == 0 and now - st.st_mtime > min_age_s:
                    os.unlink(entry.path)
                    removed += 1
        return removed
    except (OSError, ImportError):
        return 0


# ------------------------------------------------------------------------------------------------- per session
SESSION_MAX_SIDE = 1024   # longest side of any image kept in a session's state (uint8 grayscale: <= 1 MB)
STATE_TTL_S = 1800        # a session's state is dropped this long after it was set (API sessions never close)


def is_api_call() -> bool:
    """Whether this request comes from gradio_client (which never moves an opacity slider)."""
    try:
        from gradio.context import LocalContext

        request = LocalContext.request.get(None)
        headers = getattr(request, "headers", None) or {}
        return str(headers.get("x-gradio-user", "")).lower() == "api"
    except Exception:  # noqa: BLE001 - not inside a Gradio event
        return False


def session_copy(img):
    """``img`` as kept in a session: grayscale uint8, longest side at most SESSION_MAX_SIDE (the same object
    when it already is); keeps the ``colourfulness`` the OOD check reads."""
    from PIL import Image

    small = img if img.mode == "L" else img.convert("L")
    if max(small.size) > SESSION_MAX_SIDE:
        scale = SESSION_MAX_SIDE / max(small.size)
        small = small.resize((max(1, round(small.width * scale)), max(1, round(small.height * scale))),
                             Image.BILINEAR)
    if small is not img and "colourfulness" in img.info:
        small.info["colourfulness"] = img.info["colourfulness"]
    return small


def slider_state(p: Any, name: str | None) -> dict | None:
    """What the opacity slider re-blends from: the image and the Grad-CAM map at display size (<= 1024 px),
    both uint8 — never the full-size image or the float32 map (a 58-megapixel upload would keep 285 MB per
    session: issue 11 #2). None for API calls."""
    import numpy as np

    from ..explain import resize_cam

    if is_api_call():
        return None
    img = session_copy(p.image)
    cam = np.clip(resize_cam(p.cam, img.size), 0.0, 1.0)
    return {"image": img, "cam": (cam * 255).astype(np.uint8), "name": name}


def reblend_state(alpha: float, state: dict | None):
    """The overlay at ``alpha`` from a ``slider_state`` (None when there is none, e.g. it expired)."""
    import numpy as np

    from ..explain import overlay

    if not state or state.get("cam") is None:
        return None
    cam = state["cam"]
    if cam.dtype == np.uint8:   # +0.5: overlay() maps it back to the same uint8 heat index
        cam = (cam.astype(np.float32) + 0.5) / 255.0
    return unique_image(overlay(state["image"], cam, alpha))


def read_upload(path: str | None, limit: int) -> bytes:
    """Read an uploaded file into memory and delete it: uploads are not kept after the request. A file that is
    not an upload (another session's result, say) is read but never deleted."""
    from ..safety import recently_taken, take_upload

    if not path:
        raise gr.Error("Upload an X-ray image first.")
    check_text("the upload's path", path)
    purge_gradio_temp()
    # an upload, or one read moments ago by a request for the same content (which dropped it from the set)
    own = is_own_upload(path) or recently_taken(path)
    try:
        # Also serves a second request for the same content (same path) that arrives just after the first.
        return take_upload(path, limit, delete=own)
    except FileNotFoundError:
        raise ImageError("The upload is no longer on the server; upload the file again.") from None
    finally:
        if own:
            forget_upload(path)


# ------------------------------------------------------------------------------------------------- choices
def arch_choices() -> list[tuple[str, str]]:
    from ..models import ARCHS

    return [(spec.title, name) for name, spec in ARCHS.items()]


def level_choices() -> list[tuple[str, str]]:
    """(label, level) for every level, the label saying what the level trains (from the registry)."""
    from ..models import ARCHS, LEVELS

    def trains(level: str) -> str:
        per_arch = [spec.level_modules.get(level) for spec in ARCHS.values()]
        if any(m is None for m in per_arch):
            return "everything"        # a level no arch lists modules for trains the whole network
        return "new head only" if not any(per_arch) else "last conv block + head"

    return [(f"{lv} — {trains(lv)}", lv) for lv in LEVELS]


def option(name: str, **override: Any) -> gr.components.Component:
    """The input for one TrainConfig option, from its field: label, help (shown as info), choices, default.
    ``override``: Gradio arguments of this tab (a ``minimum``/``maximum`` makes a number a slider)."""
    f = next(f for f in fields(TrainConfig) if f.name == name)
    kw: dict[str, Any] = {"label": f.metadata.get("label", name), "value": f.default, "info": f.metadata["help"]}
    if name in ("arch", "level"):   # radios whose labels say enough
        choices = arch_choices() if name == "arch" else level_choices()
        return gr.Radio(choices, **{**kw, "info": None, **override})
    kw.update(override)
    if isinstance(f.default, bool):
        return gr.Checkbox(**{**kw, "info": None})
    choices = choices_of(f) or f.metadata.get("suggest")
    if choices:
        return gr.Dropdown(list(choices), **kw)
    if "minimum" in kw:
        return gr.Slider(**{"step": 1, **kw})
    return gr.Number(**{"precision": 0 if isinstance(f.default, int) else None, **kw})


# What /train and /study have always called these options (gradio_client takes them as keywords).
HTTP_NAMES = {"batch_size": "bs", "optimizer": "opt", "schedule": "sched"}


def endpoint(handler: Callable, svc: Any, leading: Sequence[str], options: Sequence[str]) -> Callable:
    """``handler`` bound to ``svc``, taking ``*leading`` then the option values; its signature (which names
    the HTTP endpoint's parameters) lists ``leading`` and the options under their HTTP names."""
    bound = functools.partial(handler, svc)
    names = [*leading, *(HTTP_NAMES.get(n, n) for n in options)]
    bound.__signature__ = inspect.Signature(
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names])
    return bound


def config_from(names: tuple[str, ...], values: tuple, **fixed: Any) -> TrainConfig:
    """A TrainConfig from the values of the option inputs ``names`` (in that order), typed like the fields;
    an empty input takes the field's default. Raises ConfigError for a bad value."""
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    kw = {}
    if len(values) != len(names):
        raise ConfigError(f"expected {len(names)} option values ({', '.join(names)}), got {len(values)}")
    for name, v in zip(names, values, strict=True):
        kind = type(defaults[name])
        # an HTTP client can send anything: text where a number goes, a dict, NUL bytes, a megabyte of text
        if v is None:
            kw[name] = defaults[name]
            continue
        if kind is str:
            check_text(name, v, limit=256)
        elif kind is bool:
            if not isinstance(v, (bool, int)) or isinstance(v, int) and v not in (0, 1):
                raise _expect(name, v, "true or false")
        elif isinstance(v, str):
            check_text(name, v, limit=64)   # "3" is taken for 3, as before; a megabyte of digits is not
        try:
            value = kind(v)
            if kind in (int, float) and not math.isfinite(value):
                raise ValueError
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{name} must be {kind.__name__}, not {shorten(repr(v), 40)}") from None
        lo, hi = OPTION_LIMITS.get(name, (-math.inf, math.inf))
        if kind in (int, float) and not lo <= value <= hi:
            raise ConfigError(f"{name} must be between {lo:g} and {hi:g}, not {shorten(repr(v), 40)}")
        kw[name] = value
    return TrainConfig(**kw, **fixed)


# Bounds of numeric options sent over HTTP (the sliders' ranges, or what a 2-core CPU or one GPU can take):
# a run of 10^9 epochs or 10^5-pixel inputs would hold the one training slot (or the worker's memory).
OPTION_LIMITS: dict[str, tuple[float, float]] = {
    "epochs": (1, 1000), "lr": (1e-8, 10), "batch_size": (0, 4096), "image_size": (32, 1024),
    "cache_size": (16, 1024), "seed": (0, 2**63 - 1), "hidden": (1, 16384), "num_workers": (0, 256),
}


# ------------------------------------------------------------------------------------------------- formatting
def fmt(v: Any, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def metrics_line(m: dict | None) -> str:
    """Metrics with their 95 % bootstrap intervals where the card has them (``report.with_ci``); with more than
    two classes (``per_class`` present) AUC, sensitivity, specificity and F1 are macro averages and say so."""
    from ..report import with_ci

    if not m:
        return "–"
    macro = "macro " if m.get("per_class") else ""
    return (f"{macro}AUC {with_ci(m, 'auc')} · {macro}sens {with_ci(m, 'sensitivity')} · {macro}spec "
            f"{with_ci(m, 'specificity')} · {macro}F1 {with_ci(m, 'f1')} · acc {fmt(m.get('accuracy'))} "
            f"(n={m.get('n', '–')})")


def per_class_line(m: dict | None) -> str:
    """One-vs-rest AUC / sensitivity / specificity of each class of a multi-class split ("" for a binary one),
    as the CLI prints them (``report.per_class_lines``)."""
    from ..report import per_class_lines

    return " · ".join(per_class_lines(m))


def operating_point(card: Card) -> str:
    """The card's decision threshold and what calibration could (not) do."""
    from ..report import threshold_text

    note = f" · ⚠️ calibration: {card.calibration_note}" if card.calibration_note else ""
    return f"**Decision:** {threshold_text(card.threshold, card.positive, card.num_classes)}{note}"


def weights_text(card: Card) -> str:
    if card.weights_origin == "imagenet":
        return "ImageNet pretrained"
    if card.from_scratch:
        return "⚠️ **trained from scratch** (ImageNet weights were not available)"
    return card.weights_note or card.weights_origin


def file_name(card: Card) -> str:
    """The name the checkpoint is listed and picked under (its weights file in the checkpoint folder)."""
    return Path(card.path).name if card.path else card.file


def card_markdown(card: Card) -> str:
    counts = card.data.get("counts") or {}
    count_txt = ", ".join(f"{s} {sum(c.values())}" for s, c in counts.items() if isinstance(c, dict))
    read = card.data.get("read")
    if isinstance(read, dict) and all(isinstance(v, int) for v in read.values()):
        count_txt += f"; {sum(read.values())} files read"
    trained_on = f" · trained on {card.device}, {card.precision}" if card.device else ""
    test = card.split_metrics("test")
    lines = [
        f"**Model:** {card.title} — `{file_name(card)}` (created {card.created or '?'})",
        f"**Weights:** {weights_text(card)}",
        f"**Data:** `{card.data.get('root', '?')}` ({count_txt})",
        f"**Validation:** {metrics_line(card.split_metrics('validation'))}",
        f"**Test:** {metrics_line(test)}",
        operating_point(card),
        f"**Temperature:** {fmt(card.temperature, 2)} · best epoch {card.best_epoch}{trained_on}",
    ]
    if card.num_classes > 2:   # the binary card reads as before; its classes are named by the decision line
        lines.insert(1, f"**Classes:** {', '.join(card.classes)}")
        if per_class_line(test):
            lines.insert(6, f"**Test, each class vs the rest:** {per_class_line(test)}")
    return "  \n".join(lines)


def roc_figure(metrics: dict[str, Any], positive: str | None = None):
    """ROC of the validation and test splits that have a curve in ``metrics`` (a card's or a run's). With more
    than two classes (a split has ``roc_per_class``): one curve per class vs the rest, of the test split (else
    the validation one). ``positive`` names the binary curves' positive class in the title."""
    from .. import plots

    for split in ("test", "validation"):
        m = metrics.get(split)
        if isinstance(m, dict) and m.get("roc_per_class"):
            return plots.roc_one_vs_rest(m["roc_per_class"], m.get("per_class"),
                                         title=f"ROC ({split}), each class vs the rest")
    splits = [s for s in ("validation", "test") if isinstance(metrics.get(s), dict) and metrics[s].get("roc")]
    curves = {s: (metrics[s]["roc"]["fpr"], metrics[s]["roc"]["tpr"], metrics[s].get("auc")) for s in splits}
    return plots.roc(curves, title=f"ROC (positive: {positive})") if positive else plots.roc(curves)


def confusion_figure(m: dict | None, title: str, card: Card | None = None):
    """The confusion matrix of one split's metrics (None when it has none), its rows and columns named from the
    card: the classes in order (N x N), or for two classes the positive one first, as ``binary_metrics`` counts."""
    from .. import plots

    cm = (m or {}).get("confusion")
    if not cm:
        return None
    names = None
    if card is not None and len(cm) == card.num_classes:
        names = plots.confusion_names(card.classes, card.positive)
    elif (m or {}).get("per_class") and len(m["per_class"]) == len(cm):
        names = list(m["per_class"])   # a run's metrics without its card: per_class keeps the class order
    return plots.confusion(cm, title, classes=names)


class Rows(list):
    """Table rows that carry their column names, for tables whose columns come from the data (one per class):
    a plain list of rows to the code that reads them, ``{"headers", "data"}`` to a ``headed_table``."""

    def __init__(self, rows, headers):
        super().__init__(rows)
        self.headers = list(headers)


def headed_table(**kw) -> gr.Dataframe:
    """A ``gr.Dataframe`` that takes its headers from a ``Rows`` value (anything else as ``gr.Dataframe``). The
    instance's ``postprocess`` is wrapped (see ``predict.headline_label`` for why not a subclass)."""
    table = gr.Dataframe(**kw)
    plain = table.postprocess

    def postprocess(value):
        if isinstance(value, Rows):
            value = {"headers": value.headers, "data": [list(r) for r in value]}
        return plain(value)

    table.postprocess = postprocess
    return table


def banner() -> str:
    return f"<div class='cc-banner'>⚠️ {DISCLAIMER}</div>"


def progress_html(run: Run | None) -> str:
    if run is None:
        return ""
    pct = int(round(run.progress * 100))
    eta = ""
    if run.eta_s and run.status == "running":
        m, s = divmod(int(run.eta_s), 60)
        eta = f" · ETA {m}m{s:02d}s"
    colour = {"done": "#2e7d32", "failed": "#c62828", "stopped": "#9e9e9e", "interrupted": "#9e9e9e"}.get(
        run.status, "#1565c0")
    current = run.study.get("current") if run.kind == "study" else None
    study = f" · run {html.escape(current)}" if current else ""
    return (f"<div class='cc-progress'><div style='width:{pct}%;background:{colour}'></div></div>"
            f"<div><b>{html.escape(run.status)}</b> · {pct}%{eta}{study} · {html.escape(run.message or '')}</div>")


def unique_image(img):
    """Tag a result image with a unique EXIF ImageUniqueID (Gradio keeps it when encoding).

    Gradio names a result file after the hash of its bytes and writes it in place (truncate, write), so two
    requests returning the same picture at the same moment share one file, and one of them can be served
    a half-written copy. A unique tag gives each response its own file.
    """
    from PIL import Image

    exif = Image.Exif()
    exif[0xA420] = uuid.uuid4().hex
    img.info["exif"] = exif.tobytes()
    return img


def stream(run: Run, render: Callable[[Run], Any], poll_s: float = 0.5):
    """Yield ``render(snapshot)`` whenever the run changed, until it ends.

    ``render`` gets a copy of the run taken under its lock (``Run.snapshot``), never the live object the
    watcher thread appends to: curves drawn from ``history`` and ``steps`` of one moment (issue 11 #12).
    """
    import matplotlib.pyplot as plt

    from ..jobs import TERMINAL

    seen, snap = -1, None
    while True:
        if run.version != seen:
            snap = run.snapshot()
            seen = snap.version
            yield render(snap)
            plt.close("all")
        if snap is not None and snap.status in TERMINAL and run.version == seen:
            break
        time.sleep(poll_s)
