"""Models on the Hugging Face Hub, in and out: ``push``, ``pull`` and the app's background pulls.

The ONLY module that calls huggingface_hub's network APIs (``create_repo``, ``upload_folder``,
``snapshot_download``); everything around them — the files a push uploads, the model card, the installation
of a downloaded snapshot into the checkpoint folder — is plain local code that the tests run for real.

A repository holds three files: ``model.safetensors`` (the weights, byte for byte), ``card.json`` (the
checkpoint's ``Card``, which vouches for the weights' size and SHA-256) and ``README.md`` (the model card,
``modelcard.render``). ``pull`` installs one as ``<name>.safetensors`` + ``<name>.json`` in the checkpoint
folder and verifies it like any checkpoint (card validated, size, SHA-256, safetensors header vs card)
before it is listed; a pulled card remembers where it came from (``hub``: repo, revision, time), so pulling
again replaces that copy and leaves a local checkpoint of the same name alone.

Sources ``pull`` takes: ``user/name`` (optionally ``user/name@revision``), or a local folder laid out as the
Hub lays it — a snapshot folder holding ``model.safetensors`` and ``card.json``, a ``models--user--name``
cache folder (its ``refs/main`` snapshot, else the newest), or a Hub cache root (every covid_cls model in it).
Local folders serve tests and offline mirrors; nothing then touches the network.

Offline (``HF_HUB_OFFLINE=1`` or ``COVID_CLS_OFFLINE=1``): repo ids resolve from the local Hugging Face cache
only, and a model that is not there is reported with a clear message — never a crash, never a network call.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import CheckpointError, CovidClsError

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
CARD_FILE = "card.json"
README_FILE = "README.md"
FILES = [MODEL_FILE, CARD_FILE, README_FILE]
MAX_MODEL_BYTES = 2 * 2**30     # a VGG16 stored whole is ~0.55 GB; refuse anything far beyond what we write
MAX_CARD_BYTES = 32 * 2**20
ENV_MODELS = "COVID_CLS_HUB_MODELS"


class HubError(CovidClsError, RuntimeError):
    """The Hub cannot be reached, refused, or a repository is not a covid_cls model; the message says which."""


# ---------------------------------------------------------------------------------------------------
# names and sources
# ---------------------------------------------------------------------------------------------------

def offline() -> bool:
    """No network for the Hub: HF_HUB_OFFLINE (huggingface_hub's own switch) or COVID_CLS_OFFLINE."""
    for var in ("HF_HUB_OFFLINE", "COVID_CLS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() not in ("", "0", "false", "no", "off"):
            return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # noqa: BLE001
        return False


def check_repo_id(repo_id: str) -> str:
    """``user/name`` or raise HubError saying what a repo id looks like."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise HubError(f"{repo_id!r} is not a Hub repository id ({exc}); use USER/NAME") from None
    if "/" not in repo_id:
        raise HubError(f"{repo_id!r}: give the repository as USER/NAME (or ORG/NAME)")
    return repo_id


def _safe_name(name: str) -> str:
    name = Path(name).name.lstrip(".") or "hub-model"
    return "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in name)[:100]


@dataclass
class Snapshot:
    """A folder with ``model.safetensors`` + ``card.json``, the name it installs under and where it came from."""

    folder: Path
    name: str
    source: str          # repo id or local path
    revision: str = ""   # commit hash when known


def _snapshot_of_repo_folder(repo_folder: Path) -> Path | None:
    """``models--user--name``: the snapshot ``refs/main`` points at, else the newest complete one."""
    snaps = repo_folder / "snapshots"
    ref = repo_folder / "refs" / "main"
    if ref.is_file():
        cand = snaps / ref.read_text().strip()
        if _complete(cand):
            return cand
    found = sorted((p for p in snaps.glob("*") if _complete(p)), key=lambda p: p.stat().st_mtime, reverse=True)
    return found[0] if found else None


def _complete(folder: Path) -> bool:
    return (folder / MODEL_FILE).is_file() and (folder / CARD_FILE).is_file()


def _repo_name_from_cache(folder: Path) -> tuple[str, str] | None:
    """(repo id, name) from a ``models--user--name`` folder name."""
    parts = folder.name.split("--")
    if len(parts) >= 3 and parts[0] == "models":
        return "/".join(parts[1:]), parts[-1]
    return None


def local_snapshots(path: str | os.PathLike) -> list[Snapshot]:
    """Every snapshot a local folder offers (see the module docstring for the layouts); [] if none."""
    p = Path(path).expanduser()
    if not p.is_dir():
        return []
    if _complete(p):   # a plain snapshot folder; inside a cache its grandparent names the repository
        named = _repo_name_from_cache(p.parent.parent) if p.parent.name == "snapshots" else None
        return [Snapshot(p, _safe_name(named[1] if named else p.name), named[0] if named else str(p),
                         p.name if named else "")]
    named = _repo_name_from_cache(p)
    if named:
        snap = _snapshot_of_repo_folder(p)
        return [Snapshot(snap, _safe_name(named[1]), named[0], snap.name)] if snap else []
    out = []   # a cache root: every models--*--* folder in it (hub/ inside HF_HOME included)
    for root in (p, p / "hub"):
        for repo_folder in sorted(root.glob("models--*--*")):
            out += local_snapshots(repo_folder)
    return out


def parse_sources(spec: str) -> list[str]:
    """``COVID_CLS_HUB_MODELS``: comma-separated repo ids (``user/name`` or ``user/name@rev``) or local paths."""
    return [s.strip() for s in (spec or "").split(",") if s.strip()]


def _is_local(source: str) -> bool:
    return source.startswith(("/", ".", "~")) or os.sep in source.replace("/", "", 1) or Path(source).is_dir()


# ---------------------------------------------------------------------------------------------------
# installing a snapshot into the checkpoint folder (local, verified)
# ---------------------------------------------------------------------------------------------------

def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard link when both are on one file system (a Hub cache under /data and checkpoints in /data: no second
    copy of the weights), else copy."""
    try:
        os.link(src.resolve(), dst)
    except OSError:
        shutil.copyfile(src, dst)


def _read_snapshot_card(snap: Snapshot):
    from .card import Card

    model, card_file = snap.folder / MODEL_FILE, snap.folder / CARD_FILE
    where = snap.source
    if not _complete(snap.folder):
        raise HubError(f"{where} is not a covid_cls model: it needs {MODEL_FILE} and {CARD_FILE}")
    size, card_size = model.stat().st_size, card_file.stat().st_size
    if size > MAX_MODEL_BYTES or card_size > MAX_CARD_BYTES:
        raise HubError(f"{where}: {MODEL_FILE} ({size:,} bytes) or {CARD_FILE} ({card_size:,} bytes) is larger than "
                       "any covid_cls model; refusing it")
    try:
        raw = json.loads(card_file.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{where}: {CARD_FILE} is not readable JSON ({exc})") from None
    card = Card.from_dict(raw, source=f"{where}/{CARD_FILE}")
    if not isinstance(card.sha256, str) or not isinstance(card.bytes, int):
        raise CheckpointError(f"{where}: {CARD_FILE} does not give the size and SHA-256 of the weights, so they "
                              "cannot be verified; push it again with `python -m covid_cls push`")
    if card.bytes != size:
        raise CheckpointError(f"{where}: {MODEL_FILE} has {size:,} bytes, its card says {card.bytes:,} (an incomplete "
                              "download?); try again")
    return raw, card


def _target(checkpoints: Path, name: str, source: str, sha: str) -> tuple[Path, bool]:
    """Where ``name`` installs: the first of name, name-1, ... that is free or already holds this source (or
    these very weights). Returns (path, already there with the same weights)."""
    from .checkpoints import LEGACY_SUFFIX, SUFFIX, card_path, read_card

    for i in range(100):
        path = checkpoints / (f"{name}{SUFFIX}" if i == 0 else f"{name}-{i}{SUFFIX}")
        taken = [p for p in (path, card_path(path), path.with_suffix(LEGACY_SUFFIX)) if p.exists()]
        if not taken:
            return path, False
        card = read_card(path) if path.exists() else None
        if card is not None and card.sha256 == sha:
            return path, True
        if card is not None and (card.extra.get("hub") or {}).get("source") == source:
            return path, False
    raise HubError(f"no free name for {name} in {checkpoints}")


def install(snap: Snapshot, checkpoints_dir: str | os.PathLike) -> Path:
    """Install a downloaded (or local) snapshot as ``<name>.safetensors`` + ``<name>.json`` in the checkpoint
    folder, verified before it is listed. Returns the weights path."""
    from .checkpoints import card_path, load_checkpoint

    checkpoints = Path(checkpoints_dir)
    checkpoints.mkdir(parents=True, exist_ok=True)
    raw, card = _read_snapshot_card(snap)
    target, same = _target(checkpoints, snap.name, snap.source, card.sha256)
    if same:
        return target
    staging = Path(tempfile.mkdtemp(prefix=f".pull-{snap.name}.{os.getpid()}.", dir=checkpoints))
    try:
        staged = staging / target.name
        _link_or_copy(snap.folder / MODEL_FILE, staged)
        # the card now vouches for its new file name; size and SHA-256 stay those of the pushed weights
        provenance = {"source": snap.source, "revision": snap.revision,
                      "pulled": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        card_card = {**raw, "file": staged.name, "hub": provenance}
        card_path(staged).write_text(json.dumps(card_card, indent=2))
        try:
            load_checkpoint(staged)   # card, size, SHA-256 and header: as for any checkpoint
        except CheckpointError as exc:
            raise CheckpointError(f"{snap.source}: the downloaded model failed verification: {exc}") from None
        card_path(target).unlink(missing_ok=True)   # unlisted while the weights are swapped
        os.replace(staged, target)
        os.replace(card_path(staged), card_path(target))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------------------------------
# the network (huggingface_hub), behind two small functions
# ---------------------------------------------------------------------------------------------------

def _hub_cache_dir() -> str | None:
    """Spaces: keep the Hub cache on the persistent disk when there is one and HF_HOME/HF_HUB_CACHE are not set
    (HF's own advice), so a restart does not download the models again."""
    if os.environ.get("HF_HOME") or os.environ.get("HF_HUB_CACHE"):
        return None
    from .fsio import persistent_dir

    base = persistent_dir()
    return str(base / ".huggingface" / "hub") if base else None


def _explain(exc: BaseException, what: str) -> HubError:
    from huggingface_hub import errors as e

    if isinstance(exc, e.GatedRepoError):
        msg = f"{what} is gated: accept its terms on the Hub and set HF_TOKEN (or `hf auth login`)"
    elif isinstance(exc, e.RepositoryNotFoundError):
        msg = (f"{what} was not found on the Hub, or it is private and no token with access was given (set HF_TOKEN "
               "or run `hf auth login`)")
    elif isinstance(exc, e.RevisionNotFoundError):
        msg = f"{what}: that revision does not exist"
    elif isinstance(exc, (e.LocalEntryNotFoundError, e.OfflineModeIsEnabled)):
        msg = (f"could not get {what}: the Hugging Face Hub cannot be reached (offline?) and it is not in the local "
               "cache. Connect, or point COVID_CLS_HUB_MODELS / `pull` at a local snapshot folder")
    elif isinstance(exc, e.HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        msg = (f"the Hub refused {what} (HTTP {status}): log in with a token that can write there (HF_TOKEN or "
               "`hf auth login`)" if status in (401, 403) else f"the Hub answered an error for {what}: {exc}")
    else:
        msg = f"could not reach the Hugging Face Hub for {what}: {exc.__class__.__name__}: {exc}"
    return HubError(msg)


def download(repo_id: str, revision: str | None = None, token: str | None = None) -> Snapshot:
    """``snapshot_download`` of the three files; the size is checked (dry run) before anything is fetched.
    Offline: the local Hugging Face cache only, or a clear HubError."""
    from huggingface_hub import snapshot_download

    check_repo_id(repo_id)
    what = repo_id + (f"@{revision}" if revision else "")
    kw: dict[str, Any] = dict(revision=revision, allow_patterns=FILES, token=token, cache_dir=_hub_cache_dir())
    if offline():
        try:
            folder = Path(snapshot_download(repo_id, local_files_only=True, **kw))
        except Exception as exc:  # noqa: BLE001
            raise HubError(f"offline (HF_HUB_OFFLINE / COVID_CLS_OFFLINE is set) and {what} is not in the local "
                           "Hugging Face cache; unset it to download, or point COVID_CLS_HUB_MODELS / `pull` at a "
                           f"local snapshot folder ({exc.__class__.__name__})") from None
    else:
        try:
            try:
                infos = snapshot_download(repo_id, dry_run=True, **kw)
            except TypeError:   # a huggingface_hub without dry runs: no size check before the download
                infos = []
            for info in infos or []:
                if info.filename == MODEL_FILE and (info.file_size or 0) > MAX_MODEL_BYTES:
                    raise HubError(f"{what}: {MODEL_FILE} has {info.file_size:,} bytes, more than any covid_cls "
                                   "model; refusing to download it")
            folder = Path(snapshot_download(repo_id, **kw))
        except HubError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise _explain(exc, what) from None
    return Snapshot(folder, _safe_name(repo_id.split("/")[-1]), repo_id, folder.name)


def upload(folder: Path, repo_id: str, private: bool = False, token: str | None = None,
           commit_message: str | None = None, api: Any = None) -> str:
    """``create_repo`` (exist_ok) + ``upload_folder``; returns the repository URL. ``api``: an ``HfApi``-like
    object (tests pass a fake that copies the folder)."""
    if offline() and api is None:
        raise HubError("offline (HF_HUB_OFFLINE / COVID_CLS_OFFLINE is set): nothing can be pushed to the Hub; "
                       "`python -m covid_cls push CKPT --repo USER/NAME --dry-run DIR` writes the files instead")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                          commit_message=commit_message or "Upload covid_cls model (weights, card, model card)")
    except HubError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise _explain(exc, repo_id) from None
    return str(url)


# ---------------------------------------------------------------------------------------------------
# push and pull
# ---------------------------------------------------------------------------------------------------

def stage(checkpoint: str | os.PathLike, repo_id: str, dest: str | os.PathLike) -> dict[str, Path]:
    """Write the files a push uploads into ``dest``: ``model.safetensors`` (the weights, verified first),
    ``card.json`` (the card as saved) and ``README.md`` (the model card). Returns {name: path}."""
    from . import modelcard
    from .checkpoints import LEGACY_SUFFIX, card_path, load_checkpoint

    check_repo_id(repo_id)
    checkpoint = Path(checkpoint)
    if checkpoint.suffix == LEGACY_SUFFIX:
        raise CheckpointError(f"{checkpoint.name} is a format-1 .pt checkpoint; run `python -m covid_cls migrate` "
                              "first (the Hub gets safetensors only)")
    card = load_checkpoint(checkpoint).card   # verified: card, size, SHA-256, header
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    files = {MODEL_FILE: dest / MODEL_FILE, CARD_FILE: dest / CARD_FILE, README_FILE: dest / README_FILE}
    _link_or_copy(checkpoint, files[MODEL_FILE])
    shutil.copyfile(card_path(checkpoint), files[CARD_FILE])
    files[README_FILE].write_text(modelcard.render(replace(card), repo_id))
    return files


def push(checkpoint: str | os.PathLike, repo_id: str, private: bool = False, token: str | None = None,
         commit_message: str | None = None, api: Any = None) -> str:
    """Upload a checkpoint as ``model.safetensors`` + ``card.json`` + ``README.md``; returns the repo URL."""
    with tempfile.TemporaryDirectory(prefix="covid_cls-push-") as tmp:
        stage(checkpoint, repo_id, tmp)
        return upload(Path(tmp), repo_id, private=private, token=token, commit_message=commit_message, api=api)


def resolve(source: str, revision: str | None = None, token: str | None = None) -> list[Snapshot]:
    """The snapshot(s) a source names: a local folder (no network) or a repo id (downloaded)."""
    if _is_local(source):
        snaps = local_snapshots(source)
        if not snaps:
            raise HubError(f"{source}: no covid_cls model there (expected a folder with {MODEL_FILE} and {CARD_FILE}, "
                           "a models--USER--NAME cache folder, or a Hub cache holding such folders)")
        return snaps
    if "@" in source and revision is None:
        source, revision = source.split("@", 1)
    return [download(source, revision=revision or None, token=token)]


def pull(source: str, checkpoints_dir: str | os.PathLike = "checkpoints", revision: str | None = None,
         token: str | None = None) -> Path:
    """Download ``user/name`` (or take a local snapshot folder) and install it in the checkpoint folder,
    verified. Returns the installed weights path (the first, for a cache root with several models)."""
    paths = [install(s, checkpoints_dir) for s in resolve(source, revision, token)]
    return paths[0]


# ---------------------------------------------------------------------------------------------------
# the app: pulls at start-up, in the background
# ---------------------------------------------------------------------------------------------------

@dataclass
class PullStatus:
    source: str
    state: str = "waiting"         # waiting | downloading | done | failed
    message: str = ""
    paths: list[str] = field(default_factory=list)


_pulls: dict[str, list[PullStatus]] = {}
_threads: dict[str, threading.Thread] = {}
_pulls_lock = threading.Lock()


def _key(checkpoints_dir: str | os.PathLike) -> str:
    return str(Path(checkpoints_dir).resolve())


def start_pulls(spec: str, checkpoints_dir: str | os.PathLike) -> threading.Thread | None:
    """Pull every source of ``spec`` (``COVID_CLS_HUB_MODELS``) into the checkpoint folder in one background
    thread; each model is listed as soon as it is installed. A failure is logged and noted
    (``pulls_markdown``), never raised. Returns the thread (None when there is nothing to pull)."""
    sources = parse_sources(spec)
    if not sources:
        return None
    key = _key(checkpoints_dir)
    statuses = [PullStatus(s) for s in sources]
    with _pulls_lock:
        running = _threads.get(key)
        if running is not None and running.is_alive():   # the app built twice (reload): one puller per folder
            return running
        _pulls[key] = statuses

    def run() -> None:
        for st in statuses:
            st.state = "downloading"
            try:
                st.paths = [str(install(s, checkpoints_dir)) for s in resolve(st.source)]
                st.state, st.message = "done", ", ".join(Path(p).name for p in st.paths)
                print(f"covid_cls: Hub model {st.source} -> {st.message}", file=sys.stderr, flush=True)
            except Exception as exc:  # noqa: BLE001 - the app must come up whatever the Hub says
                st.state = "failed"
                st.message = str(exc) if isinstance(exc, CovidClsError) else f"{exc.__class__.__name__}: {exc}"
                log.warning("covid_cls: could not pull Hub model %s: %s", st.source, st.message)

    thread = threading.Thread(target=run, name="covid_cls-hub-pull", daemon=True)
    with _pulls_lock:
        _threads[key] = thread
    thread.start()
    return thread


def wait_for_pulls(checkpoints_dir: str | os.PathLike, timeout: float | None = None) -> bool:
    """Block until the start-up pulls for this folder are over (tests, scripts); True if they are."""
    thread = _threads.get(_key(checkpoints_dir))
    if thread is not None:
        thread.join(timeout)
        return not thread.is_alive()
    return True


def pull_statuses(checkpoints_dir: str | os.PathLike) -> list[PullStatus]:
    with _pulls_lock:
        return list(_pulls.get(_key(checkpoints_dir), []))


def pulls_markdown(checkpoints_dir: str | os.PathLike) -> str:
    """A note for the Models tab: what COVID_CLS_HUB_MODELS asked for and how each pull went ("" if nothing)."""
    rows = pull_statuses(checkpoints_dir)
    if not rows:
        return ""
    icon = {"waiting": "⏳", "downloading": "⏳", "done": "✅", "failed": "⚠️"}
    lines = [f"- {icon[r.state]} `{r.source}`: {r.state}" + (f" — {r.message}" if r.message else "") for r in rows]
    return "**Models from the Hugging Face Hub** (`COVID_CLS_HUB_MODELS`):\n" + "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# command line: push | pull (registered by __main__.build_parser)
# ---------------------------------------------------------------------------------------------------

def cmd_push(a) -> int:
    if a.dry_run:
        files = stage(a.checkpoint, a.repo, a.dry_run)
        print("would upload " + ", ".join(str(p) for p in files.values()) + f" to {a.repo} (nothing sent)")
        return 0
    url = push(a.checkpoint, a.repo, private=a.private)
    print(f"pushed {Path(a.checkpoint).name} to {url} ({', '.join(FILES)})")
    print("Research demo — not a diagnosis.")
    return 0


def cmd_pull(a) -> int:
    from .checkpoints import read_card

    for snap in resolve(a.source, a.revision):
        path = install(snap, a.checkpoints)
        card = read_card(path)
        origin = " (trained from scratch)" if card is not None and card.from_scratch else ""
        print(f"{snap.source}{'@' + snap.revision[:12] if snap.revision else ''} -> {path}  "
              f"[{card.title if card else '?'}{origin}; verified: size, SHA-256, header]")
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("push", help="upload a checkpoint to the Hugging Face Hub (weights, card, model card)")
    p.add_argument("checkpoint", metavar="CKPT", help="a .safetensors checkpoint (its .json card beside it)")
    p.add_argument("--repo", required=True, metavar="USER/NAME", help="the model repository (created if needed)")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--dry-run", metavar="DIR", help="write the files that would be uploaded into DIR; send nothing")
    p.set_defaults(fn=cmd_push)
    p = sub.add_parser("pull", help="download a covid_cls model from the Hub into the checkpoint folder (verified)")
    p.add_argument("source", metavar="USER/NAME", help="a Hub repository, or a local snapshot folder")
    p.add_argument("--revision", help="branch, tag or commit (default: main)")
    p.add_argument("--checkpoints", default=os.environ.get("COVID_CLS_CHECKPOINTS", "checkpoints"),
                   help="checkpoint folder (default: %(default)s)")
    p.set_defaults(fn=cmd_pull)


__all__ = ["push", "pull", "stage", "install", "download", "upload", "resolve", "local_snapshots", "Snapshot",
           "start_pulls", "wait_for_pulls", "pulls_markdown", "pull_statuses", "HubError", "offline",
           "MODEL_FILE", "CARD_FILE", "README_FILE"]
