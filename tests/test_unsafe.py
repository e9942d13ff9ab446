"""Unsafe files: pickled checkpoints, dataset paths outside the allowed roots, hostile zips, uploads that
must not stay on the server, DICOM tags that must not be echoed, and training switched off.

Each guard is checked in the library and through the launched app's HTTP API (gradio_client, plus raw
HTTP where the client would refuse to send what a hostile client can).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import struct
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from covid_cls.safety import UnsafePath, check_allowed, safe_extract_zip

from helpers import SECRET, SECRET_ID, call_raw, copy_checkpoint, launched_app, make_dicom, ramp
from helpers import copy_dataset as _copy_dataset
from helpers import synthetic_png as _png
from helpers import zip_bytes as _zip

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from helpers import GENERIC_SERVER_ERROR, app_error  # noqa: E402


class TouchOnLoad:
    """A pickled object whose unpickling creates a file (a stand-in for running any code)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _evil_checkpoint(folder: Path, name: str, marker: Path, arch="vgg16", level="partial") -> Path:
    path = folder / name
    torch.save({"arch": arch, "level": level, "classes": ["infected", "normal"], "state_dict": {},
                "payload": TouchOnLoad(marker)}, path)
    card = {"arch": arch, "level": level, "file": name, "created": "2099-01-01T00:00:00",
            "metrics": {"validation": {"auc": 1.0}}, "classes": ["infected", "normal"]}
    path.with_suffix(".json").write_text(json.dumps(card))
    return path


# ---------------------------------------------------------------------------------------------
# fixtures: one app with training on (uploads land in our own GRADIO_TEMP_DIR), one with it off
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def roots(demo_data, tmp_path_factory):
    """The folders only: an allowed root (with symlinks pointing in and out) and a folder outside it."""
    root = tmp_path_factory.mktemp("unsafe")
    allowed, outside = root / "allowed", root / "outside"
    _copy_dataset(demo_data, allowed / "data")
    _copy_dataset(demo_data, outside / "secret")
    (allowed / "link-out").symlink_to(outside / "secret", target_is_directory=True)
    (allowed / "link-in").symlink_to(allowed / "data", target_is_directory=True)
    return SimpleNamespace(root=root, allowed=allowed, outside=outside)


@pytest.fixture(scope="module")
def env(fc_checkpoint, demo_data, roots):
    """The app on those folders, training on."""
    from covid_cls.ui import Settings

    root, allowed, outside = roots.root, roots.allowed, roots.outside
    mp = pytest.MonkeyPatch()
    gtmp = root / "gradio_tmp"
    mp.setenv("GRADIO_TEMP_DIR", str(gtmp))   # read by Gradio when the Blocks and the server are created
    ckpts = root / "checkpoints"
    copy_checkpoint(fc_checkpoint, ckpts)
    settings = Settings(checkpoints=ckpts, runs=root / "runs", training=True,
                        roots_env=str(allowed))
    with launched_app(settings, max_file_size=settings.max_upload) as app:
        yield SimpleNamespace(root=root, client=app.client(), settings=settings, gtmp=gtmp, allowed=allowed,
                              outside=outside, demo=app.demo, demo_data=demo_data)
    mp.undo()


@pytest.fixture(scope="module")
def off(tmp_path_factory):
    from covid_cls.ui import Settings

    root = tmp_path_factory.mktemp("training_off")
    settings = Settings(checkpoints=root / "checkpoints", runs=root / "runs", training=False)
    with launched_app(settings, max_file_size=settings.max_upload) as app:
        yield SimpleNamespace(root=root, client=app.client(), settings=settings, demo=app.demo)


# ---------------------------------------------------------------------------------------------
# 1. checkpoints carrying pickled objects; checkpoint names reaching outside the folder
# ---------------------------------------------------------------------------------------------


def test_pickled_checkpoint_is_refused_by_the_predictor(tmp_path):
    from covid_cls import Predictor
    from covid_cls.checkpoints import CheckpointError, list_checkpoints

    marker = tmp_path / "code-ran"
    evil = _evil_checkpoint(tmp_path, "evil.pt", marker)
    assert [c.file for c in list_checkpoints(tmp_path)] == ["evil.pt"]   # it looks like a checkpoint
    with pytest.raises(CheckpointError, match="refusing to load evil.pt"):
        Predictor(tmp_path).predict(_png(), "vgg16", "partial")
    with pytest.raises(CheckpointError, match="refusing"):
        Predictor(tmp_path).predict(_png(), checkpoint=evil)
    assert not marker.exists()
    # guard: the payload really does run when loaded the unsafe way
    torch.load(evil, weights_only=False)
    assert marker.exists()


@pytest.mark.http
def test_pickled_checkpoint_is_refused_through_the_app(env):
    marker = env.root / "code-ran-via-app"
    _evil_checkpoint(env.settings.checkpoints, "evil.pt", marker)
    try:
        png = env.root / "x.png"
        png.write_bytes(_png())
        msg = app_error(lambda: env.client.predict(handle_file(str(png)), "vgg16", "partial", "",
                                                    api_name="/predict"))
        assert "refusing to load evil.pt" in msg
        msg = app_error(lambda: env.client.predict(handle_file(str(png)), "resnet18", "fc", "evil.pt",
                                                    api_name="/predict"))
        assert "refusing" in msg
        assert not marker.exists()
    finally:
        for p in env.settings.checkpoints.glob("evil.*"):
            p.unlink()


@pytest.mark.http
@pytest.mark.parametrize("how", ["dotdot", "absolute"])
def test_checkpoint_names_cannot_reach_other_folders(env, fc_checkpoint, how):
    """The dropdown accepts custom values, so a client can send any string as the checkpoint."""
    elsewhere = env.root / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    for p in (Path(fc_checkpoint), Path(fc_checkpoint).with_suffix(".json")):
        shutil.copy(p, elsewhere / f"outside{p.suffix}")
    name = "../elsewhere/outside.pt" if how == "dotdot" else str(elsewhere / "outside.pt")
    png = env.root / "x.png"
    png.write_bytes(_png())
    msg = app_error(lambda: env.client.predict(handle_file(str(png)), "resnet18", "fc", name,
                                                api_name="/predict"))
    assert "outside.pt does not exist" in msg
    assert str(env.root) not in msg   # no server paths in messages


# ---------------------------------------------------------------------------------------------
# 2. dataset folders outside the allowed roots
# ---------------------------------------------------------------------------------------------

ALLOWED_CASES = {"inside": "data", "root itself": ".", "symlink to a folder inside": "link-in",
                 "dotdot staying inside": "data/train/../validation"}
REFUSED_CASES = {
    "outside": ("{outside}/secret", "outside the folders"),
    "dotdot escape": ("{allowed}/data/../../outside/secret", "outside the folders"),
    "symlink pointing outside": ("{allowed}/link-out", "outside the folders"),
    "below a symlink pointing outside": ("{allowed}/link-out/train", "outside the folders"),
    "filesystem root": ("/", "outside the folders"),
    "relative to the server's cwd": (".", "outside the folders"),
    "missing": ("{allowed}/missing", "does not exist"),
    "NUL byte": ("{allowed}/data\x00/../x", "does not exist"),
    "empty": ("  ", "no folder given"),
}


def _fill(template: str, env) -> str:
    return template.format(allowed=env.allowed, outside=env.outside)


@pytest.mark.parametrize("case", list(REFUSED_CASES))
def test_check_allowed_refuses(roots, case):
    from covid_cls.safety import allowed_roots

    template, expected = REFUSED_CASES[case]
    with pytest.raises(UnsafePath, match=expected):
        check_allowed(_fill(template, roots), allowed_roots(str(roots.allowed)))


@pytest.mark.parametrize("case", list(ALLOWED_CASES))
def test_check_allowed_accepts(roots, case):
    from covid_cls.safety import allowed_roots

    got = check_allowed(roots.allowed / ALLOWED_CASES[case], allowed_roots(str(roots.allowed)))
    assert got.is_relative_to(roots.allowed.resolve()) and got.is_dir()


@pytest.mark.http
def test_scan_endpoint_enforces_the_roots(env):
    for case, (template, expected) in REFUSED_CASES.items():
        msg = app_error(lambda: env.client.predict("server folder", _fill(template, env), None, api_name="/scan"))
        # over HTTP a NUL byte is refused as such before the folder is looked at (issue 11 #16)
        assert expected in msg or (case == "NUL byte" and "NUL character" in msg), (case, msg)
    md, table = env.client.predict("server folder", str(env.allowed / "link-in"), None, api_name="/scan")
    assert f"**{(env.allowed / 'data').resolve()}**" in md   # the symlink is resolved before use
    assert sum(row[1] + row[2] for row in table["data"]) == 18


@pytest.mark.http
def test_scan_endpoint_skips_and_lists_a_symlink_inside_a_root_that_leads_out(env):
    """Only the folder was resolved once; every file is now resolved too (issue 11 #4)."""
    link = env.allowed / "data" / "train" / "normal" / "zz-escape.png"
    link.symlink_to(sorted((env.outside / "secret" / "train" / "normal").iterdir())[0])
    try:
        md, table = env.client.predict("server folder", str(env.allowed / "data"), None, api_name="/scan")
        assert "`train/normal/zz-escape.png`: leads outside the folders this server may read" in md, md
        assert sum(row[1] + row[2] for row in table["data"]) == 18   # not counted
    finally:
        link.unlink()


# ---------------------------------------------------------------------------------------------
# 3. zips: refused before anything is written
# ---------------------------------------------------------------------------------------------


def _info(name: str, mode: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = mode << 16
    return info


def _lying_size() -> bytes:
    """A stored member whose central directory claims half its real size."""
    data = _zip([("train/normal/a.png", os.urandom(3 << 20))], zipfile.ZIP_STORED)
    buf = bytearray(data)
    cd = buf.index(b"PK\x01\x02")
    struct.pack_into("<I", buf, cd + 24, 1 << 20)
    return bytes(buf)


def _bad_crc() -> bytes:
    """A member whose bytes were damaged after the CRC was computed: found only after ~3 MB were read."""
    buf = bytearray(_zip([("train/normal/a.png", os.urandom(3 << 20))], zipfile.ZIP_STORED))
    buf[len(buf) // 2] ^= 0xFF
    return bytes(buf)


def _encrypted() -> bytes:
    """Marked as encrypted (general purpose flag bit 0) in both headers; zipfile cannot write that itself."""
    buf = bytearray(_zip([("train/normal/x.png", PNG)]))
    for sig, flag_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        i = buf.index(sig) + flag_at
        buf[i] |= 0x1
    return bytes(buf)


def _overall_bomb() -> bytes:
    # 20 members of 900 KB zeros: none over 1 MB, so no single member looks like a bomb; 18 MB from ~20 KB
    return _zip([(f"train/normal/{i}.png", bytes(900 << 10)) for i in range(20)])


PNG = b"\x89PNG\r\n\x1a\n" + bytes(64)
ZIP_CASES = {
    "dotdot": (lambda: _zip([("train/normal/ok.png", PNG), ("../evil.png", PNG)]), "points outside"),
    "dotdot inside the path": (lambda: _zip([("train/../../evil.png", PNG)]), "points outside"),
    "backslash dotdot": (lambda: _zip([("..\\evil.png", PNG)]), "points outside"),
    "absolute path": (lambda: _zip([("/tmp/evil.png", PNG)]), "points outside"),
    "windows drive": (lambda: _zip([("C:/evil.png", PNG)]), "points outside"),
    "symlink": (lambda: _zip([(_info("train/normal/x.png", stat.S_IFLNK | 0o777), "/etc/passwd")]),
                "link or special file"),
    "fifo": (lambda: _zip([(_info("train/normal/x.png", stat.S_IFIFO | 0o644), "")]), "link or special file"),
    "zip bomb": (lambda: _zip([("train/normal/bomb.png", bytes(10 << 20))]), "zip bomb"),
    "bomb spread over members": (_overall_bomb, "zip bomb"),
    "encrypted": (_encrypted, "password"),
    "size lies": (_lying_size, "damaged"),
    "bad crc": (_bad_crc, "damaged"),
    "not a zip": (lambda: b"PK\x03\x04 this is not really a zip", "not a readable zip"),
}


@pytest.mark.parametrize("case", list(ZIP_CASES))
def test_hostile_zip_is_refused_and_nothing_is_written(tmp_path, case):
    make, expected = ZIP_CASES[case]
    src = tmp_path / "upload.zip"
    src.write_bytes(make())
    dest = tmp_path / "uploads" / "abc"
    with pytest.raises(UnsafePath, match=expected):
        safe_extract_zip(src, dest)
    assert not dest.exists()
    assert not (dest.parent.exists() and any(dest.parent.iterdir())), list(dest.parent.iterdir())
    assert not (tmp_path / "evil.png").exists() and not Path("/tmp/evil.png").exists()


def test_too_many_files_and_too_large_are_refused_before_writing(tmp_path, monkeypatch):
    import covid_cls.safety as safety

    dest = tmp_path / "out"
    src = tmp_path / "many.zip"
    src.write_bytes(_zip([(f"train/normal/{i}.png", PNG) for i in range(6)]))
    monkeypatch.setattr(safety, "MAX_ZIP_FILES", 5)
    with pytest.raises(UnsafePath, match="6 entries; the limit is 5"):
        safe_extract_zip(src, dest)
    monkeypatch.setattr(safety, "MAX_ZIP_FILES", 50_000)
    monkeypatch.setattr(safety, "MAX_ZIP_BYTES", 300)
    with pytest.raises(UnsafePath, match="expands to"):
        safe_extract_zip(src, dest)
    assert not dest.exists()


def _dataset_zip(demo_data: Path, wrapper: str = "mydata") -> bytes:
    entries = []
    for split in ("train", "validation", "test"):
        for cls in ("infected", "normal"):
            for f in sorted((demo_data / split / cls).iterdir())[:2]:
                entries.append((f"{wrapper}/{split}/{cls}/{f.name}", f.read_bytes()))
    return _zip(entries)


def test_good_zip_is_extracted_and_unwrapped(tmp_path, demo_data):
    src = tmp_path / "data.zip"
    src.write_bytes(_dataset_zip(demo_data))
    root = safe_extract_zip(src, tmp_path / "uploads" / "abc")
    assert root == tmp_path / "uploads" / "abc" / "mydata"
    assert len(list(root.rglob("*.png"))) == 12
    assert [p.name for p in (tmp_path / "uploads").iterdir()] == ["abc"]   # no staging folder left
    again = safe_extract_zip(src, tmp_path / "uploads" / "abc")   # same upload twice: same result
    assert again == root and len(list(root.rglob("*.png"))) == 12


@pytest.mark.http
def test_scan_endpoint_refuses_hostile_zips_and_keeps_nothing(env):
    uploads = env.settings.uploads
    for case in ("dotdot", "symlink", "zip bomb", "bad crc", "not a zip"):
        make, expected = ZIP_CASES[case]
        z = env.root / f"{case.replace(' ', '_')}.zip"
        z.write_bytes(make())
        msg = app_error(lambda: env.client.predict("upload .zip", "", handle_file(str(z)), api_name="/scan"))
        # the dataset layout is checked on the names before extraction (issue 11 #6): a damaged member of a zip
        # without train/validation/test is refused for its layout before a byte is read (library test above)
        assert expected in msg or (case == "bad crc" and "not an ImageFolder dataset" in msg), (case, msg)
        leftovers = [p for p in uploads.rglob("*")] if uploads.exists() else []
        assert leftovers == [], (case, leftovers)
        assert _copies_of(z.read_bytes(), env.gtmp) == [], f"{case}: the upload was kept"


# ---------------------------------------------------------------------------------------------
# 4. uploads are deleted after use
# ---------------------------------------------------------------------------------------------


def _copies_of(data: bytes, folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and p.stat().st_size == len(data) and p.read_bytes() == data]


def _raw_upload(env, path: Path) -> str:
    import httpx

    with path.open("rb") as f:
        r = httpx.post(env.client.upload_url, files={"files": (path.name, f, "application/octet-stream")}, timeout=30)
    r.raise_for_status()
    return r.json()[0]


def _call_raw(env, api: str, data: list) -> tuple[str, object]:
    """Gradio's REST protocol by hand (what a browser or curl does): returns ("complete"|"error", payload)."""
    return call_raw(env.client.upload_url.rsplit("/upload", 1)[0], api, data)


@pytest.mark.http
def test_uploads_land_in_our_temp_dir_and_are_deleted_after_use(env):
    png = env.root / "upload-me.png"
    data = _png(seed=11)
    png.write_bytes(data)
    # guard: an upload that no event consumed is there (so the folder watched below is the right one)
    stored = Path(_raw_upload(env, png))
    assert stored.is_relative_to(env.gtmp) and _copies_of(data, env.gtmp)
    stored.unlink()

    calls = {
        "predict": lambda f: env.client.predict(handle_file(f), "resnet18", "fc", "", api_name="/predict"),
        "predict, no model": lambda f: env.client.predict(handle_file(f), "vgg16", "full", "", api_name="/predict"),
        "compare": lambda f: env.client.predict(handle_file(f), api_name="/compare"),
    }
    for what, call in calls.items():
        try:
            call(str(png))
        except AppError as exc:
            assert GENERIC_SERVER_ERROR not in str(exc)
        assert _copies_of(data, env.gtmp) == [], f"{what}: the upload is still on the server"
    bad = env.root / "not-an-image.png"
    bad.write_bytes(b"not an image at all " * 50)
    app_error(lambda: env.client.predict(handle_file(str(bad)), "resnet18", "fc", "", api_name="/predict"))
    assert _copies_of(bad.read_bytes(), env.gtmp) == []


@pytest.mark.http
def test_zip_upload_is_deleted_and_scan_then_start_still_finds_it(env, demo_data):
    """In the browser the File component sends the same (by then deleted) upload again on Start."""
    z = env.root / "dataset.zip"
    z.write_bytes(_dataset_zip(demo_data))
    server_path = _raw_upload(env, z)
    file_data = {"path": server_path, "meta": {"_type": "gradio.FileData"}, "orig_name": "dataset.zip"}
    kind, first = _call_raw(env, "scan", ["upload .zip", "", file_data])
    assert kind == "complete", first
    assert not Path(server_path).exists() and _copies_of(z.read_bytes(), env.gtmp) == []
    kind, second = _call_raw(env, "scan", ["upload .zip", "", file_data])
    assert kind == "complete", second
    assert first[0] == second[0] and f"**{env.settings.uploads.resolve()}/" in first[0], (first[0], second[0])
    # a different server path that never existed is a clear message, not a server error
    kind, payload = _call_raw(env, "scan", ["upload .zip", "", {**file_data, "path": server_path + "-gone"}])
    assert kind == "error"


@pytest.mark.http
def test_zip_upload_is_deleted_even_when_another_source_is_picked(env, demo_data):
    z = env.root / "unused.zip"
    z.write_bytes(_dataset_zip(demo_data, wrapper="unused"))
    env.client.predict("server folder", str(env.allowed / "data"), handle_file(str(z)), api_name="/scan")
    assert _copies_of(z.read_bytes(), env.gtmp) == []


# ---------------------------------------------------------------------------------------------
# 5. DICOM tags are never echoed
# ---------------------------------------------------------------------------------------------


@pytest.mark.http
def test_dicom_tags_never_appear_in_predict_output_or_errors(env):
    from pydicom.uid import JPEGLSLossless

    good = make_dicom(ramp(64, 64, 0, 4000, np.uint16), WindowCenter=2000, WindowWidth=4000,
                      InstitutionName=SECRET, StudyDescription=SECRET)
    bad = {
        "no pixel data": make_dicom(None),
        "compressed": make_dicom(None, rows_cols=(16, 16), transfer_syntax=JPEGLSLossless,
                                 pixel_data=b"\xfe\xff\x00\xe0\x00\x00\x00\x00" + b"\xfe\xff\x00\xe0\x08\x00\x00\x00"
                                 + b"\xff\xd8\xff\xf7" + bytes(4) + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"),
        "truncated": make_dicom(None, rows_cols=(64, 64), pixel_data=b"\x01\x02" * 100),
    }
    path = env.root / f"{SECRET_ID}.dcm"   # even the file name carries the patient id
    path.write_bytes(good)
    probs, overlay, info = env.client.predict(handle_file(str(path)), "resnet18", "fc", "", api_name="/predict")
    text = json.dumps(probs) + info
    for secret in (SECRET, "SECRET", SECRET_ID):
        assert secret not in text
    for what, data in bad.items():
        path.write_bytes(data)
        msg = app_error(lambda: env.client.predict(handle_file(str(path)), "resnet18", "fc", "",
                                                    api_name="/predict"))
        assert "DICOM" in msg, (what, msg)
        for secret in (SECRET, "SECRET", SECRET_ID):
            assert secret not in msg, (what, msg)


# ---------------------------------------------------------------------------------------------
# 6. training switched off
# ---------------------------------------------------------------------------------------------


@pytest.mark.http
def test_training_off_refuses_train_study_scan_and_demo_and_says_why(off, demo_data):
    c = off.client
    train_args = ["synthetic demo set", "", None, "resnet18", "fc", 1, 1e-3, 16, "adam", "none", "ce", "none",
                  False, 64, 0]
    calls = {
        "/train": lambda: c.submit(*train_args, api_name="/train").result(timeout=60),
        "/study": lambda: c.submit("synthetic demo set", "", None, ["resnet18"], ["fc"], 1, 1e-3, "adam", "none",
                                   64, api_name="/study").result(timeout=60),
        "/quick_demo": lambda: c.submit(api_name="/quick_demo").result(timeout=60),
        "/scan (demo)": lambda: c.predict("synthetic demo set", "", None, api_name="/scan"),
        "/scan (folder)": lambda: c.predict("server folder", str(demo_data), None, api_name="/scan"),
    }
    for name, call in calls.items():
        msg = app_error(call)
        assert "Training is switched off on this server (COVID_CLS_TRAINING=0)" in msg, (name, msg)
    z = off.root / "data.zip"
    z.write_bytes(_dataset_zip(demo_data))
    msg = app_error(lambda: c.predict("upload .zip", "", handle_file(str(z)), api_name="/scan"))
    assert "switched off" in msg
    # nothing was made, read or unpacked, and no run was started
    runs = off.settings.runs
    assert not (runs / "demo_data" / "train").exists()
    assert not (runs / "datasets").exists() or not any((runs / "datasets").iterdir())
    assert not list(runs.glob("run-*.json")) if runs.exists() else True
    # the Train and Study tabs explain why
    texts = [str(comp.get("props", {}).get("value", "")) for comp in off.demo.config["components"]]
    notes = [t for t in texts if "Training is switched off on this server" in t]
    assert len(notes) == 2 and all("COVID_CLS_TRAINING=0" in t for t in notes), notes
    # prediction keeps working (no model here: a clear message, not a server error)
    png = off.root / "x.png"
    png.write_bytes(_png())
    assert "No trained model" in app_error(lambda: c.predict(handle_file(str(png)), "resnet18", "fc", "",
                                                              api_name="/predict"))
