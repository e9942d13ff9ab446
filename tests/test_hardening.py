"""Hardening, round two (issue 11): the rows not about decoding (those are in test_imaging / test_bad_inputs /
test_sandbox). Every hostile input is generated here; each test names its row of the issue's table.

  #4  roots mean roots: a symlink inside an allowed root that leads out, a class folder swapped after Scan
  #9  the upload handler deletes only uploads, never another session's result
  #2  nothing grows: bounded per-session state, API sessions, Gradio's empty temp files, the upload and
      decoded-cache policies, a refused zip leaves nothing (#6)
  #5  a damaged run history file is skipped and never disables training
  #7  identical training images fail early; the OOD fit cannot be singular
  #8  a study with duplicate pairs is refused
  #12 the live curves render a snapshot, never the list the watcher appends to
  #13 a card claiming 100,000 classes is refused through the app, memory flat
  #14 a damaged "best" checkpoint falls back to the next valid one through the app
  #15 every disk-full path says so
  #16 no argument is a 500, and no long argument becomes a long message or log line

Stand-in workers (``_worker_*``) run in a spawned process, so this module stays light at import time.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import threading
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from helpers import app_error, call_raw, copy_checkpoint, launched_app, make_services, small_config
from helpers import copy_dataset as _copy_dataset
from helpers import synthetic_png as _png
from helpers import zip_bytes as _zip


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@pytest.fixture()
def tree(demo_data, tmp_path):
    """allowed/data (a small dataset) with a file symlink leading out, and outside/normal with images."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    data = _copy_dataset(demo_data, allowed / "data")
    (outside / "normal").mkdir(parents=True)
    for i in range(4):
        (outside / "normal" / f"secret-{i}.png").write_bytes(_png(seed=40 + 2 * i))
    (data / "train" / "normal" / "evil.png").symlink_to(outside / "normal" / "secret-0.png")
    (allowed / "link-in").symlink_to(data, target_is_directory=True)
    return SimpleNamespace(allowed=allowed.resolve(), outside=outside.resolve(), data=data.resolve(), root=tmp_path)


@pytest.fixture()
def svc(tmp_path):
    return make_services(tmp_path, roots_env=str(tmp_path / "allowed"))


# =============================================================================================
# #4 roots mean roots
# =============================================================================================


def test_scan_skips_and_reports_a_symlink_that_leads_out(tree):
    from covid_cls.data import scan_dataset

    info = scan_dataset(tree.data, roots=[tree.allowed])
    files = [p.name for p in info.splits["train"].files]
    assert "evil.png" not in files and len(files) == 6
    assert ("train/normal/evil.png", "leads outside the folders this server may read (a symlink?); not read") \
        in info.skipped
    assert info.root == tree.data
    # the CLI passes no roots: no restriction, as before
    assert "evil.png" in [p.name for p in scan_dataset(tree.data).splits["train"].files]
    # a root outside the allowed folders is refused outright
    from covid_cls.errors import UnsafePath

    with pytest.raises(UnsafePath, match="outside the folders"):
        scan_dataset(tree.outside, roots=[tree.allowed])


def _swap_for_symlink(folder: Path, target: Path) -> None:
    folder.rename(folder.with_name(folder.name + ".orig"))
    folder.symlink_to(target, target_is_directory=True)


def test_a_class_folder_swapped_for_a_symlink_after_the_scan_is_not_read(tree, tmp_path):
    """The check is made on the open file, so a swap between Scan and decoding cannot smuggle data in."""
    from covid_cls.data import CLASSES, DecodedCache, scan_dataset

    info = scan_dataset(tree.data, roots=[tree.allowed])
    split = info.splits["train"]
    # same names as before, now outside: what the scan listed no longer lies inside the roots
    for f in split.files:
        if f.parent.name == "normal":
            shutil.copy(tree.outside / "normal" / "secret-1.png", tree.outside / "normal" / f.name)
    _swap_for_symlink(tree.data / "train" / "normal", tree.outside / "normal")
    d = DecodedCache(96, cache_dir=tmp_path / "cache", workers=1, use_disk=False, roots=[tree.allowed]).get(
        split, info.root)
    assert [CLASSES[i] for i in d.labels.tolist()] == ["infected"] * 3
    assert len(d.skipped) == 3 and all("leads outside" in why for _, why in d.skipped), d.skipped
    # guard: without the check the swapped files are read
    DecodedCache.clear_memory()
    unchecked = DecodedCache(96, cache_dir=tmp_path / "cache", workers=1, use_disk=False).get(split, info.root)
    assert len(unchecked) == 6


def test_training_with_roots_refuses_a_class_folder_that_leads_out(tree, tmp_path):
    from covid_cls import fit
    from covid_cls.errors import DatasetError

    _swap_for_symlink(tree.data / "train" / "normal", tree.outside / "normal")
    events = []
    with pytest.raises(DatasetError, match=r"train/normal/ contains no images inside the folders this server may "
                                           r"read \(4 lead outside\)"):
        fit(small_config(tree.data, tmp_path / "ckpt"), on_event=events.append, roots=[tree.allowed])
    assert not (tmp_path / "ckpt").exists()


def test_evaluate_and_compare_in_the_app_never_read_a_symlink_that_leads_out(tree, svc, fc_checkpoint):
    """The Models tab's /evaluate and the Compare tab check every file against the data roots when it is
    opened, as training does: a test image inside the root that is a symlink to a file outside is not read."""
    from covid_cls.ui.compare import compare_models
    from covid_cls.ui.evaluate import evaluate

    (tree.data / "test" / "normal" / "evil.png").symlink_to(tree.outside / "normal" / "secret-0.png")
    name = copy_checkpoint(fc_checkpoint, svc.settings.checkpoints).name
    table = evaluate(svc, name, "server folder", str(tree.data), None, "test")[0]
    assert table[0][-1] == 6   # n: the six test images inside, not the seventh that leads out
    r = compare_models(svc, name, name, "server folder", str(tree.data), None, "test")
    assert "on 6 images" in r[1]


@pytest.mark.slow
def test_the_card_records_the_resolved_root_and_what_was_read(tree, tmp_path):
    from covid_cls import fit
    from covid_cls.checkpoints import read_card

    path = fit(small_config(tree.allowed / "link-in", tmp_path / "ckpt", epochs=1), roots=[tree.allowed])
    card = read_card(path)
    assert card.data["root"] == str(tree.data)   # resolved: not the symlink's name
    assert card.data["read"] == {"train": 6, "validation": 6, "test": 6} and card.data["roots_checked"]
    assert card.data["skipped"] == 1             # evil.png, reported


def test_the_app_passes_its_data_roots_to_every_run(svc, monkeypatch):
    from covid_cls import TrainConfig

    started = []
    svc._jobs = SimpleNamespace(start=lambda cfg, kind, extra: started.append((kind, extra)))
    svc.start_run(TrainConfig(data_dir="x"))
    svc.start_run(TrainConfig(data_dir="x"), kind="study", extra={"archs": ["resnet18"], "levels": ["fc"]})
    roots = [str(r) for r in svc.settings.roots()]
    assert [extra["roots"] for _, extra in started] == [roots, roots]
    assert str((svc.settings.runs / "datasets").resolve()) in roots


def test_the_worker_hands_the_roots_to_fit(monkeypatch):
    import covid_cls.engine as engine
    from covid_cls.jobs_worker import _worker

    seen = {}
    monkeypatch.setattr(engine, "fit", lambda config, on_event, stop, roots=None: seen.setdefault("roots", roots))

    class Pipe:
        def fileno(self):
            return os.open(os.devnull, os.O_WRONLY)

    with warnings.catch_warnings():   # the worker silences warnings for its whole process
        _worker("train", {"data_dir": "x"}, {"roots": ["/data"]}, Pipe(), None)
    assert seen["roots"] == ["/data"]


# =============================================================================================
# #9 the upload handler deletes only uploads
# =============================================================================================


@pytest.fixture()
def gradio_context():
    """A stand-in for the Gradio event context (its Blocks' set of uploaded files)."""
    from gradio.context import LocalContext

    blocks = SimpleNamespace(upload_file_set=set())
    token = LocalContext.blocks.set(blocks)
    yield blocks
    LocalContext.blocks.reset(token)


def test_read_upload_deletes_uploads_but_never_other_files(gradio_context, tmp_path):
    from covid_cls.ui.common import discard_upload, read_upload

    upload, result = tmp_path / "upload.png", tmp_path / "someone-elses-result.jpeg"
    upload.write_bytes(b"upload")
    result.write_bytes(b"result")
    gradio_context.upload_file_set.add(str(upload))
    assert read_upload(str(result), 1000) == b"result" and result.exists()   # read, not deleted
    discard_upload(str(result))
    assert result.exists()
    assert read_upload(str(upload), 1000) == b"upload"
    assert not upload.exists() and str(upload) not in gradio_context.upload_file_set


# =============================================================================================
# #2 bounded per-session state
# =============================================================================================


def _prediction(w: int, h: int):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8))
    image.info["colourfulness"] = 3.0
    yy, xx = np.mgrid[0:h, 0:w]
    cam = (np.sin(xx / 37.0) * np.cos(yy / 23.0) * 0.5 + 0.5).astype(np.float32)
    return SimpleNamespace(image=image, cam=cam)


@pytest.mark.slow   # ~3 s: blends a 4000 px overlay twice
def test_the_slider_state_is_bounded_and_blends_like_the_first_overlay():
    from covid_cls.explain import overlay
    from covid_cls.ui.common import SESSION_MAX_SIDE, reblend_state, session_copy, slider_state

    big = slider_state(_prediction(6000, 4000), "x.tif")
    assert max(big["image"].size) == SESSION_MAX_SIDE and big["image"].mode == "L"
    assert big["cam"].dtype == np.uint8 and big["cam"].shape == big["image"].size[::-1]
    kept = big["cam"].nbytes + big["image"].width * big["image"].height
    assert kept <= 2 * SESSION_MAX_SIDE**2   # was 6000 x 4000 x (1 + 4) bytes = 120 MB
    assert big["image"].info["colourfulness"] == 3.0   # the OOD check reads it from the session's copy
    p = _prediction(300, 200)
    small = slider_state(p, "x.png")
    for alpha in (0.0, 0.45, 1.0):   # the same pixels as the overlay made from the full map
        assert np.array_equal(np.asarray(reblend_state(alpha, small)), np.asarray(overlay(p.image, p.cam, alpha)))
    assert reblend_state(0.5, None) is None
    image = p.image.convert("L")
    assert session_copy(image) is image and max(session_copy(_prediction(3000, 100).image).size) == 1024


def test_api_calls_keep_no_slider_state():
    from gradio.context import LocalContext

    from covid_cls.ui.common import slider_state

    token = LocalContext.request.set(SimpleNamespace(headers={"x-gradio-user": "api"}))
    try:
        assert slider_state(_prediction(100, 100), "x") is None
    finally:
        LocalContext.request.reset(token)


# =============================================================================================
# #2 / #6 uploads extracted for training and decoded caches: a stated policy; refused zips leave nothing
# =============================================================================================


def _dataset_entries(demo_data: Path, wrapper: str = "mydata", per_class: int = 2):
    for split in ("train", "validation", "test"):
        for cls in ("infected", "normal"):
            for f in sorted((demo_data / split / cls).iterdir())[:per_class]:
                yield f"{wrapper}/{split}/{cls}/{f.name}", f.read_bytes()


def test_a_zip_without_the_dataset_layout_is_refused_before_anything_is_extracted(svc, tmp_path, monkeypatch):
    import covid_cls.safety as safety
    from covid_cls.errors import DatasetError

    def never(*a, **k):
        raise AssertionError("a member was extracted")

    monkeypatch.setattr(safety, "_extract_member", never)
    z = tmp_path / "no-layout.zip"
    # ~189:1 per member, like the probe's: under the bomb limit, 200 MB of it would have been written
    z.write_bytes(_zip([(f"pics/{i}.png", bytes(190 << 10)) for i in range(8)]))
    with pytest.raises(DatasetError, match="not an ImageFolder dataset") as info:
        svc.unpack_zip(str(z))
    assert "missing split folder 'train/'" in str(info.value)
    assert not svc.settings.uploads.exists() or not any(svc.settings.uploads.iterdir())


def test_a_zip_that_the_scan_refuses_after_extraction_leaves_nothing(svc, demo_data, tmp_path):
    from covid_cls.errors import DatasetError

    z = tmp_path / "extra-class.zip"
    z.write_bytes(_zip([*_dataset_entries(demo_data), ("mydata/train/covid/x.png", _png())]))
    with pytest.raises(DatasetError, match="lacks class folder covid"):   # a class in one split only (issue 13)
        svc.unpack_zip(str(z))
    assert not svc.settings.uploads.exists() or list(svc.settings.uploads.iterdir()) == []
    ok = tmp_path / "ok.zip"
    ok.write_bytes(_zip(_dataset_entries(demo_data)))
    root = svc.unpack_zip(str(ok))
    assert root.name == "mydata" and len(list(root.rglob("*.png"))) == 12


def _fake_upload(folder: Path, name: str, mb: float, age_h: float) -> Path:
    d = folder / name / "mydata" / "train"
    d.mkdir(parents=True)
    (d / "x.png").write_bytes(bytes(int(mb * 2**20)))
    t = time.time() - age_h * 3600
    os.utime(folder / name, (t, t))
    return folder / name


def test_extracted_uploads_follow_the_size_and_age_policy(tmp_path, monkeypatch):
    from covid_cls.safety import prune_uploads

    uploads = tmp_path / "datasets"
    _fake_upload(uploads, "old", 0.1, age_h=30)              # over the 24 h default
    _fake_upload(uploads, "lru", 1.0, age_h=2)
    in_use = _fake_upload(uploads, "in-use", 1.0, age_h=3)    # older, but a run reads it
    new = _fake_upload(uploads, "new", 1.0, age_h=1)
    stale = uploads / ".abc.xyz.partial"                      # an extraction that never finished
    stale.mkdir()
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    monkeypatch.setenv("COVID_CLS_UPLOADS_MAX_MB", "2.5")
    removed = prune_uploads(uploads, keep=[in_use / "mydata"])
    assert sorted(p.name for p in removed) == sorted([".abc.xyz.partial", "old", "lru"])
    assert in_use.exists() and new.exists()
    monkeypatch.setenv("COVID_CLS_UPLOADS_MAX_AGE_HOURS", "0.5")
    monkeypatch.setenv("COVID_CLS_UPLOADS_MAX_MB", "0")     # 0 = no size limit
    assert [p.name for p in prune_uploads(uploads)] == ["in-use", "new"]   # least recently used first


def test_the_decoded_cache_follows_the_size_and_age_policy(tmp_path, monkeypatch):
    import torch

    from covid_cls.data import DecodedCache, DecodedSplit

    cache = DecodedCache(64, cache_dir=tmp_path)

    def entry(key: str, age_days: float) -> None:
        split = DecodedSplit(torch.zeros(64, 1, 64, 64, dtype=torch.uint8), torch.zeros(64, dtype=torch.long),
                             [f"f{i}" for i in range(64)], [])
        cache._save_disk(key, split)   # 256 KB each
        t = time.time() - age_days * 86400
        for p in tmp_path.glob(f"decoded-{key}.*"):
            os.utime(p, (t, t))

    monkeypatch.setenv("COVID_CLS_CACHE_MAX_MB", "0.6")
    for key, age in (("a", 20), ("b", 3), ("c", 2), ("d", 1)):
        entry(key, age)
    # "a" went for its age (14 days), then the least recently used until <= 0.6 MB remained
    assert sorted({p.name.split(".")[0] for p in tmp_path.glob("decoded-*")}) == ["decoded-c", "decoded-d"]
    assert cache._load_disk("c") is not None   # a hit counts as a use
    entry("e", 0)
    assert sorted({p.name.split(".")[0] for p in tmp_path.glob("decoded-*")}) == ["decoded-c", "decoded-e"]


def test_decoded_splits_kept_in_memory_are_bounded(tmp_path, monkeypatch):
    import torch

    from covid_cls.data import DecodedCache, DecodedSplit

    DecodedCache.clear_memory()
    monkeypatch.setenv("COVID_CLS_CACHE_MEMORY_MB", "1")
    for key in "abcd":
        with DecodedCache._lock:
            DecodedCache._memory[key] = DecodedSplit(torch.zeros(100, 1, 64, 64, dtype=torch.uint8),
                                                     torch.zeros(100), [], [])   # 400 KB
            DecodedCache._trim_memory()
    assert list(DecodedCache._memory) == ["c", "d"]
    DecodedCache.clear_memory()


# =============================================================================================
# #5 a damaged run history file
# =============================================================================================


def _good_run(run_id: str) -> dict:
    return {"id": run_id, "kind": "train", "config": {"arch": "resnet18", "level": "fc", "epochs": 1},
            "status": "done", "message": "finished", "created": time.time(), "history": [], "steps": [[0.5, 0.7]],
            "log": ["ok"], "metrics": {"validation": {"auc": 0.9}, "test": {"auc": 0.8}}, "checkpoint": "x.pt"}


DAMAGED_RUNS = {
    "null": b"null",
    "a list": b"[1, 2, 3]",
    "garbage": b"\xff\xfe\x00garbage{",
    "torn": b'{"id": "torn", "kind": ',
    "deep nesting": b"[" * 100_000 + b"]" * 100_000,
    "created is text": {"created": "yesterday"},
    "history is a number": {"history": 5},
    "steps are not pairs": {"steps": [["a", None]]},
    "config is null": {"config": None},
    "status unknown": {"status": 7},
    "study runs is a number": {"study": {"runs": 5}},
    "id leaves the folder": {"id": "../../evil"},
    "created is NaN": {"created": float("nan")},
}


def _write_damaged(runs: Path) -> None:
    runs.mkdir(parents=True, exist_ok=True)
    for i, (name, content) in enumerate(DAMAGED_RUNS.items()):
        run_id = f"bad{i}"
        data = content if isinstance(content, bytes) else json.dumps({**_good_run(run_id), **content}).encode()
        (runs / f"run-{run_id}.json").write_bytes(data)


def test_damaged_run_history_files_are_skipped_with_a_warning(svc):
    from covid_cls.jobs import JobManager
    from covid_cls.ui.train import history_rows

    runs = svc.settings.runs
    _write_damaged(runs)
    (runs / "run-good.json").write_text(json.dumps(_good_run("good")))
    (runs / "run-sane.json").write_text(json.dumps({**_good_run("sane"), "metrics": {"validation": 5}}))
    with pytest.warns(RuntimeWarning, match="skipping the damaged run history file") as caught:
        mgr = JobManager(runs)
    assert sorted(r.id for r in mgr.history()) == ["good", "sane"]
    assert len(mgr.skipped_history) == len(DAMAGED_RUNS) == sum("skipping" in str(w.message) for w in caught)
    assert not (runs.parent.parent / "evil.json").exists()
    svc._jobs = mgr
    rows = history_rows(svc)
    assert sorted(r[0] for r in rows) == ["good", "sane"]


def _worker_reports_done(kind, cfg, extra, conn, stop):
    """Reports a finished run at once (no training)."""
    from covid_cls import events as ev
    from covid_cls.jobs_worker import _EventSender

    _EventSender(conn).put(ev.Done(checkpoint="", metrics={}))


@pytest.mark.slow
def test_a_damaged_history_never_disables_training(tmp_path, monkeypatch):
    import covid_cls.jobs as jobs

    _write_damaged(tmp_path / "runs")
    monkeypatch.setattr(jobs, "_worker", _worker_reports_done)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mgr = jobs.JobManager(tmp_path / "runs")
    run = mgr.start({"epochs": 1})
    mgr.wait(run.id, timeout=60)
    assert run.status == "done", (run.status, run.message)
    with warnings.catch_warnings():   # and after a restart, the new run is there beside the damage
        warnings.simplefilter("ignore")
        assert [r.id for r in jobs.JobManager(tmp_path / "runs").history()] == [run.id]


# =============================================================================================
# #7 identical images; a singular covariance
# =============================================================================================


def test_the_ood_fit_cannot_be_singular():
    import torch

    from covid_cls.ood import fit_all, fit_stats, score

    for feats in (torch.ones(21, 512), torch.zeros(21, 80), torch.full((3, 512), 1e6)):
        stats = fit_stats(feats, torch.zeros(len(feats), dtype=torch.long), feats[:5])
        assert torch.isfinite(stats["precision"]).all() and np.isfinite(stats["threshold"])
        assert torch.isfinite(score(feats[:2] + 0.5, stats)).all()
    same = torch.ones(21, 512)
    fit_all({"train": same, "validation": same}, {"train": same[:, :80], "validation": same[:, :80]},
            torch.tensor([0, 1] * 10 + [0]))


def test_identical_training_images_fail_early_with_a_clear_message(tmp_path):
    from covid_cls import fit
    from covid_cls.errors import TrainingError

    png = _png(seed=3, size=16)
    for split in ("train", "validation", "test"):
        for cls in ("infected", "normal"):
            (tmp_path / "same" / split / cls).mkdir(parents=True)
            for i in range(12):
                (tmp_path / "same" / split / cls / f"{i}.png").write_bytes(png)
    events = []
    with pytest.raises(TrainingError, match="all images identical"):
        fit(small_config(tmp_path / "same", tmp_path / "ckpt", epochs=1), on_event=events.append)
    assert not any(e.type in ("step", "epoch") for e in events)   # before any training
    assert not (tmp_path / "ckpt").exists()


# =============================================================================================
# #8 a study's pairs
# =============================================================================================


def test_a_study_with_duplicate_or_unknown_pairs_is_refused_before_starting(svc):
    from covid_cls import TrainConfig
    from covid_cls.errors import ConfigError
    from covid_cls.ui.common import check_text_list
    from covid_cls.ui.services import check_study

    svc._jobs = SimpleNamespace(start=lambda *a, **k: pytest.fail("a study was started"))
    cases = {"duplicate levels": (["resnet18"], ["fc"] * 60, "more than once"),
             "duplicate archs": (["vgg16", "vgg16"], ["fc"], "more than once"),
             "unknown level": (["resnet18"], ["fc", "x" * 5000], "unknown level"),
             "no arch": ([], ["fc"], "at least one"),
             "not a list": ("resnet18", ["fc"], "at least one")}
    for name, (archs, levels, expected) in cases.items():
        with pytest.raises(ConfigError, match=expected):
            svc.start_run(TrainConfig(data_dir="x"), kind="study", extra={"archs": archs, "levels": levels})
    check_study(["resnet18", "vgg16"], ["fc", "partial", "full"])   # every pair once: fine
    with pytest.raises(ConfigError, match="more than once"):
        check_text_list("levels", ["fc", "fc"])
    with pytest.raises(ConfigError, match="the limit is 64"):
        check_text_list("levels", [str(i) for i in range(65)])


# =============================================================================================
# #12 the live curves read a snapshot
# =============================================================================================


def _epoch(n: int):
    from covid_cls import events as ev

    return ev.Epoch(epoch=n, epochs=50, train={"loss": 1.0 / n, "accuracy": 0.5}, val={"loss": 1.0, "auc": 0.5},
                    seconds=0.1)


def _step(n: int):
    from covid_cls import events as ev

    return ev.Step(epoch=1, epochs=50, step=n, steps=10, loss=0.5, lr=1e-3, images_per_s=1.0)


def test_the_live_curves_render_a_snapshot_while_the_watcher_appends(tmp_path):
    import itertools

    from covid_cls.jobs import JobManager, Run
    from covid_cls.ui.common import stream
    from covid_cls.ui.train import train_outputs

    mgr = JobManager(tmp_path / "runs")
    run = Run(id="live", kind="train", config={"arch": "resnet18", "level": "fc"}, status="running")
    t0 = time.time()
    counter = itertools.count(1)

    def render(r):
        seen = (len(r.history), len(r.steps))
        n = next(counter)
        mgr._apply_safely(run, _step(n), t0)     # what the watcher thread does meanwhile
        mgr._apply_safely(run, _epoch(n), t0)
        assert r is not run and (len(r.history), len(r.steps)) == seen, "render saw the live run change"
        return train_outputs(r)

    outputs = list(itertools.islice(stream(run, render, poll_s=0), 4))
    assert len(outputs) == 4 and len(run.history) == 4


@pytest.mark.slow
def test_the_live_curves_survive_a_watcher_appending_as_fast_as_it_can(tmp_path):
    from covid_cls.jobs import JobManager, Run
    from covid_cls.ui.train import train_outputs

    mgr = JobManager(tmp_path / "runs")
    run = Run(id="race", kind="train", config={"arch": "resnet18", "level": "fc"}, status="running")
    done = threading.Event()

    def watcher():
        n = 0
        while not done.is_set():
            n += 1
            mgr._apply_safely(run, _step(n), 0.0)
            if n % 5 == 0:
                mgr._apply_safely(run, _epoch(n), 0.0)

    t = threading.Thread(target=watcher, daemon=True)
    t.start()
    try:
        import matplotlib.pyplot as plt

        for _ in range(40):
            snap = run.snapshot()
            train_outputs(snap)
            plt.close("all")
            assert len(snap.history) == len({h["epoch"] for h in snap.history})
    finally:
        done.set()
        t.join(5)


# =============================================================================================
# #15 disk full
# =============================================================================================


def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_while_saving_the_run_history_is_said(tmp_path, monkeypatch):
    import covid_cls.jobs as jobs

    mgr = jobs.JobManager(tmp_path / "runs")
    run = jobs.Run(id="full", kind="train", config={})
    monkeypatch.setattr(jobs, "atomic_write", _enospc)
    with pytest.warns(RuntimeWarning, match="the disk is full"):
        mgr._save(run)
    assert "could not save the run history" in run.log[-1] and "Free some disk space" in run.log[-1]
    mgr._save(run)
    assert len(run.log) == 1   # said once, not once per event


def test_a_full_disk_while_extracting_a_zip_is_said_and_leaves_nothing(demo_data, tmp_path, monkeypatch):
    import covid_cls.safety as safety

    z = tmp_path / "data.zip"
    z.write_bytes(_zip(_dataset_entries(demo_data)))
    monkeypatch.setattr(safety, "_extract_member", _enospc)
    with pytest.raises(safety.UnsafePath, match=r"the disk is full .*Free some disk space"):
        safety.safe_extract_zip(z, tmp_path / "uploads" / "abc")
    assert list((tmp_path / "uploads").iterdir()) == []


def test_a_full_disk_while_writing_the_decoded_cache_is_said(demo_data, tmp_path, monkeypatch):
    import covid_cls.engine as engine
    import covid_cls.fsio as fsio
    from covid_cls.data import DecodedCache

    DecodedCache.clear_memory()
    monkeypatch.setenv("COVID_CLS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fsio, "atomic_write", _enospc)
    events = []
    info, decoded = engine._decode(small_config(demo_data, tmp_path / "ckpt", cache_size=72), events.append)
    assert len(decoded["train"]) == sum(info.splits["train"].counts().values())   # goes on without the cache ...
    warned = [e.message for e in events if e.type == "log" and e.message.startswith("WARNING")]
    assert warned and "could not save the decoded image cache" in warned[0] and "disk is full" in warned[0]
    assert not list((tmp_path / "cache").glob("decoded-*"))   # ... and nothing half-written stays
    DecodedCache.clear_memory()


# =============================================================================================
# #16 argument checks in the handlers (no server needed)
# =============================================================================================


def test_handlers_check_their_arguments_before_any_work(svc, tmp_path):
    import gradio as gr

    from covid_cls.ui.models import model_details
    from covid_cls.ui.predict import predict
    from covid_cls.ui.train import scan

    png = tmp_path / "x.png"
    png.write_bytes(_png())
    big = "a" * (1 << 20)
    cases = [
        (lambda: predict(svc, str(png), None, "fc", ""), "arch must be text, not None"),
        (lambda: predict(svc, str(png), "resnet18", 5, ""), "level must be text, not 5"),
        (lambda: predict(svc, str(png), "resnet18", "fc", {"a": 1}), "checkpoint must be text"),
        (lambda: predict(svc, str(png), "resnet18", "fc", "a\x00b"), "checkpoint contains a NUL"),
        (lambda: predict(svc, str(png), "resnet18", "fc", big), "1,048,576 characters long; the limit is 4,096"),
        (lambda: scan(svc, "server folder", None, None), "folder must be text"),
        (lambda: model_details(svc, ["x"]), "name must be text"),
    ]
    for call, expected in cases:
        with pytest.raises(gr.Error) as info:
            call()
        assert expected in str(info.value) and len(str(info.value)) < 700, str(info.value)[:300]
    assert png.exists()   # refused before the upload was even read


def test_option_values_from_http_are_typed_and_bounded():
    from covid_cls.errors import ConfigError
    from covid_cls.ui.common import config_from

    good = config_from(("epochs", "lr", "seed", "augment"), ("3", 0.01, None, True))
    assert (good.epochs, good.lr, good.seed, good.augment) == (3, 0.01, 0, True)
    for names, values, expected in [
        (("lr",), (float("nan"),), "lr must be float"),
        (("lr",), ({"a": 1},), "lr must be float"),
        (("epochs",), (10**9,), "epochs must be between 1 and 1000"),
        (("image_size",), (100_000,), "image_size must be between 32 and 1024"),
        (("seed",), ("9" * 100_000,), "seed is 100,000 characters long"),
        (("optimizer",), ("sgd\x00",), "optimizer contains a NUL"),
        (("augment",), ({"a": 1},), "augment must be true or false"),
        (("epochs", "lr"), (3,), "expected 2 option values"),
    ]:
        with pytest.raises(ConfigError, match=expected):
            config_from(names, values)


# =============================================================================================
# through the app: #9, #2 (state, RSS, temp files), #13, #14, #16
# =============================================================================================


@pytest.fixture(scope="module")
def app(fc_checkpoint, demo_data, tmp_path_factory):
    from covid_cls.ui import Settings

    root = tmp_path_factory.mktemp("hardening_app")
    mp = pytest.MonkeyPatch()
    gtmp = root / "gradio_tmp"
    mp.setenv("GRADIO_TEMP_DIR", str(gtmp))
    ckpts = root / "checkpoints"
    copy_checkpoint(fc_checkpoint, ckpts)
    allowed = root / "allowed"
    _copy_dataset(demo_data, allowed / "data")
    settings = Settings(checkpoints=ckpts, runs=root / "runs", training=True,
                        roots_env=str(allowed))
    with launched_app(settings, max_file_size=settings.max_upload) as served:
        yield SimpleNamespace(root=root, settings=settings, gtmp=gtmp, demo=served.demo, url=served.url,
                              client=served.client(), served=served, allowed=allowed,
                              good=Path(fc_checkpoint).name)
    mp.undo()


def _call_raw(url: str, api: str, data: list) -> tuple[str, object]:
    return call_raw(f"{url}/gradio_api", api, data)


def _upload(url: str, path: Path) -> dict:
    import httpx

    with path.open("rb") as f:
        r = httpx.post(f"{url}/gradio_api/upload", files={"files": (path.name, f, "image/png")}, timeout=30)
    r.raise_for_status()
    return {"path": r.json()[0], "meta": {"_type": "gradio.FileData"}, "orig_name": path.name}


@pytest.mark.http
def test_another_sessions_result_image_is_never_deleted(app):
    png = app.root / "mine.png"
    png.write_bytes(_png(seed=5))
    kind, out = _call_raw(app.url, "predict", [_upload(app.url, png), "resnet18", "fc", ""])
    assert kind == "complete", out
    result = Path(out[1]["path"])   # session A's overlay, in Gradio's cache
    assert result.is_file()
    kind, out = _call_raw(app.url, "predict", [{"path": str(result), "meta": {"_type": "gradio.FileData"}},
                                               "resnet18", "fc", ""])
    assert kind in ("complete", "error") and result.is_file(), "another session's result was deleted"
    # the upload itself is still deleted after use, and forgotten by Gradio's upload set
    up = _upload(app.url, png)
    kind, _ = _call_raw(app.url, "predict", [up, "resnet18", "fc", ""])
    assert kind == "complete" and not Path(up["path"]).exists()
    assert up["path"] not in app.demo.upload_file_set


@pytest.mark.http
def test_gradios_empty_temp_files_are_purged(app, monkeypatch):
    from gradio_client import handle_file

    import covid_cls.ui.common as common

    def empties() -> list[Path]:
        return [p for p in app.gtmp.iterdir() if p.name.startswith("tmp") and p.is_file() and not p.stat().st_size]

    png = app.root / "t.png"
    png.write_bytes(_png(seed=7))
    monkeypatch.setattr(common, "PURGE_MIN_AGE_S", 0.0)
    monkeypatch.setattr(common, "PURGE_EVERY_S", 0.0)
    for _ in range(4):
        app.client.predict(handle_file(str(png)), "resnet18", "fc", "", api_name="/predict")
    # each call leaves one (Gradio's File preprocessing); the next call purges it
    assert len(empties()) <= 1, empties()


def _state_bytes(demo) -> int:
    """Bytes of images and arrays held in every session's gr.State values."""
    total = 0
    for session in list(demo.state_holder.session_data.values()):
        for value in list(session.state_data.values()):
            for v in (value.values() if isinstance(value, dict) else [value]):
                if isinstance(v, np.ndarray):
                    total += v.nbytes
                elif isinstance(v, Image.Image):
                    total += v.width * v.height * len(v.getbands())
    return total


@pytest.mark.http
@pytest.mark.slow
def test_api_sessions_do_not_accumulate_state_or_memory(app):
    """Every call from a new gradio_client session (which never closes) with a 20-megapixel upload."""
    from gradio_client import Client, handle_file

    big = app.root / "big.tif"
    rng = np.random.default_rng(1)
    arr = np.tile(rng.integers(0, 256, (1, 5000), dtype=np.uint8), (4000, 1))   # 20 MP, compresses well
    Image.fromarray(arr).save(big, compression="tiff_deflate")
    calls = int(os.environ.get("COVID_CLS_RSS_CALLS", "20"))
    for _ in range(2):   # warm-up: models loaded, pools started, allocator settled
        Client(app.url, verbose=False).predict(handle_file(str(big)), "resnet18", "fc", "", api_name="/predict")
    sessions0, rss0 = len(app.demo.state_holder.session_data), _rss_mb()
    for _ in range(calls):
        Client(app.url, verbose=False).predict(handle_file(str(big)), "resnet18", "fc", "", api_name="/predict")
    grown = _rss_mb() - rss0
    print(f"\n{calls} API sessions x 20 MP /predict: RSS {rss0:.0f} -> {rss0 + grown:.0f} MB ({grown:+.0f}); "
          f"state held {_state_bytes(app.demo) / 2**20:.1f} MB in {len(app.demo.state_holder.session_data)} sessions")
    assert len(app.demo.state_holder.session_data) >= sessions0 + calls
    assert _state_bytes(app.demo) < 4 * 2**20   # before: 20 MP x 5 bytes = 100 MB per session
    assert grown < 150, f"RSS grew {grown:.0f} MB over {calls} calls"


def _damaged_copy(app, name: str, card_update: dict, flip: bool = False) -> Path:
    good = app.settings.checkpoints / app.good
    dst = app.settings.checkpoints / name
    data = good.read_bytes()
    if flip:
        mid = len(data) // 2
        data = data[:mid] + bytes(b ^ 0xFF for b in data[mid:mid + 64]) + data[mid + 64:]
    dst.write_bytes(data)
    card = json.loads(good.with_suffix(".json").read_text())
    for key, value in card_update.items():
        if isinstance(value, dict) and isinstance(card.get(key), dict):
            card[key] = {**card[key], **value}
        else:
            card[key] = value
    card["file"] = name
    dst.with_suffix(".json").write_text(json.dumps(card))
    return dst


@pytest.mark.http
def test_a_card_claiming_100000_classes_is_refused_and_memory_stays_flat(app):
    from gradio_client import handle_file

    bad = _damaged_copy(app, "huge-classes.safetensors", {"classes": [f"class-{i}" for i in range(100_000)],
                                                            "metrics": {"validation": {"auc": 2.0}}})
    try:
        png = app.root / "c.png"
        png.write_bytes(_png(seed=9))
        rss0 = _rss_mb()
        msg = app_error(lambda: app.client.predict(handle_file(str(png)), "resnet18", "fc", bad.name,
                                                    api_name="/predict"))
        assert "classes" in msg and "2 to 20" in msg and len(msg) < 700, msg[:300]
        assert _rss_mb() - rss0 < 100
        # the default ("best") ignores it and predicts with the valid checkpoint
        *_, info = app.client.predict(handle_file(str(png)), "resnet18", "fc", "", api_name="/predict")
        assert app.good in info and bad.name not in info
    finally:
        bad.unlink()
        bad.with_suffix(".json").unlink()


@pytest.mark.http
def test_predict_and_compare_fall_back_from_a_damaged_best_checkpoint(app):
    from gradio_client import handle_file

    bad = _damaged_copy(app, "altered-best.safetensors", {"metrics": {"validation": {"auc": 1.5}}}, flip=True)
    try:
        png = app.root / "f.png"
        png.write_bytes(_png(seed=11))
        for _ in range(2):   # skipped, then remembered as broken
            *_, info = app.client.predict(handle_file(str(png)), "resnet18", "fc", "", api_name="/predict")
            assert app.good in info and bad.name not in info
        gallery, table = app.client.predict(handle_file(str(png)), api_name="/compare")
        assert [row[1] for row in table["data"]] == ["fc"]
        # named explicitly, it is refused with a message (never silently replaced)
        msg = app_error(lambda: app.client.predict(handle_file(str(png)), "resnet18", "fc", bad.name,
                                                    api_name="/predict"))
        assert "altered-best.safetensors" in msg
    finally:
        bad.unlink()
        bad.with_suffix(".json").unlink()


BIG = "a" * (1 << 20)
MISSING = "/definitely/missing"
TRAIN_OK = ["server folder", MISSING, None, "resnet18", "fc", 1, 1e-3, 16, "adam", "none", "ce", "none", False, 64,
            0]
STUDY_OK = ["server folder", MISSING, None, ["resnet18"], ["fc"], 1, 1e-3, "adam", "none", 64]


def _with(base: list, i: int, value) -> list:
    args = list(base)
    args[i] = value
    return args


def _file(app):
    from gradio_client import handle_file

    png = app.root / "arg.png"
    if not png.exists():
        png.write_bytes(_png(seed=13))
    return handle_file(str(png))


# endpoint, arguments (a callable of the app), a substring of the expected message. Every case sends one
# hostile value among valid ones; a folder that does not exist keeps /train and /study from starting a run.
HOSTILE = {
    "predict: arch None": ("/predict", lambda a: [_file(a), None, "fc", ""], "arch must be text"),
    "predict: arch int": ("/predict", lambda a: [_file(a), 5, "fc", ""], "not in the list of choices"),
    "predict: arch 1 MB": ("/predict", lambda a: [_file(a), BIG, "fc", ""], "the limit is 4,096"),
    "predict: level dict": ("/predict", lambda a: [_file(a), "resnet18", {"a": 1}, ""], "expected text or a number"),
    "predict: checkpoint int": ("/predict", lambda a: [_file(a), "resnet18", "fc", 7], "checkpoint must be text"),
    "predict: checkpoint dict": ("/predict", lambda a: [_file(a), "resnet18", "fc", {"x": 1}], "expected text"),
    "predict: checkpoint list": ("/predict", lambda a: [_file(a), "resnet18", "fc", ["x"]], "expected text"),
    "predict: checkpoint NUL": ("/predict", lambda a: [_file(a), "resnet18", "fc", "a\x00b"], "NUL character"),
    "predict: checkpoint 1 MB": ("/predict", lambda a: [_file(a), "resnet18", "fc", BIG], "the limit is 4,096"),
    "predict: file is text": ("/predict", lambda a: ["hello", "resnet18", "fc", ""], "expected a file"),
    "predict: file is a number": ("/predict", lambda a: [5, "resnet18", "fc", ""], "expected a file"),
    "predict: no file": ("/predict", lambda a: [None, "resnet18", "fc", ""], "Upload an X-ray image first"),
    "compare: file is text": ("/compare", lambda a: ["hello"], "expected a file"),
    "compare: no file": ("/compare", lambda a: [None], "Upload an X-ray image first"),
    "scan: source None": ("/scan", lambda a: [None, "", None], "source must be text"),
    "scan: folder dict": ("/scan", lambda a: ["server folder", {"a": 1}, None], "expected text or a number"),
    "scan: folder NUL": ("/scan", lambda a: ["server folder", "/tmp\x00x", None], "NUL character"),
    "scan: folder 1 MB": ("/scan", lambda a: ["server folder", BIG, None], "the limit is 4,096"),
    "scan: zip is text": ("/scan", lambda a: ["upload .zip", "", "hello"], "expected a file"),
    "train: lr None (default; folder missing)": ("/train", lambda a: _with(TRAIN_OK, 6, None), "does not exist"),
    "train: lr text": ("/train", lambda a: _with(TRAIN_OK, 6, "fast"), "lr must be float"),
    "train: lr dict": ("/train", lambda a: _with(TRAIN_OK, 6, {"a": 1}), "expected text or a number"),
    "train: seed None (default; folder missing)": ("/train", lambda a: _with(TRAIN_OK, 14, None), "does not exist"),
    "train: seed 10^30": ("/train", lambda a: _with(TRAIN_OK, 14, 10**30), "seed must be between"),
    "train: arch None": ("/train", lambda a: _with(TRAIN_OK, 3, None), "does not exist"),
    "train: arch 1 MB": ("/train", lambda a: _with(TRAIN_OK, 3, BIG), "the limit is 4,096"),
    "train: epochs 10^9": ("/train", lambda a: _with(TRAIN_OK, 5, 10**9), "greater than maximum"),
    "train: weights a server path": ("/train", lambda a: _with(TRAIN_OK, 11, "/etc/passwd"), "not in the list"),
    "train: augment dict": ("/train", lambda a: _with(TRAIN_OK, 12, {"a": 1}), "expected true or false"),
    "study: levels fc x 60": ("/study", lambda a: _with(STUDY_OK, 4, ["fc"] * 60), "more than once"),
    "study: archs None": ("/study", lambda a: _with(STUDY_OK, 3, None), "a list of choices is required"),
    "study: archs text": ("/study", lambda a: _with(STUDY_OK, 3, "resnet18"), "expected a list"),
    "study: archs of 100": ("/study", lambda a: _with(STUDY_OK, 3, ["x"] * 100), "at most 64"),
    "study: lr NUL": ("/study", lambda a: _with(STUDY_OK, 6, "1\x00"), "NUL character"),
}


@pytest.mark.http
def test_no_argument_is_a_server_error(app, capfd):
    """Every named endpoint with wrong-typed, NUL-carrying or over-long arguments: a clear, short message."""
    assert {"/predict", "/compare", "/scan", "/train", "/study"} <= {api for api, _, _ in HOSTILE.values()}
    capfd.readouterr()
    problems = []
    for case, (api, args, expected) in HOSTILE.items():
        try:
            msg = app_error(lambda: app.client.submit(*args(app), api_name=api).result(timeout=120))
        except AssertionError as exc:
            problems.append(f"{case}: {str(exc)[:200]}")
            continue
        if expected not in msg or len(msg) > 700:
            problems.append(f"{case}: {msg[:200]!r} ({len(msg)} characters)")
    assert not problems, "\n".join(problems)
    logged = capfd.readouterr()
    longest = max((len(line) for line in (logged.out + logged.err).splitlines()), default=0)
    assert longest < 2000, f"a {longest}-character log line"   # a 1 MB argument once wrote a 1 MB line
    assert not list(app.settings.runs.glob("run-*.json"))   # no run was started
    # the endpoints without arguments answer too
    assert "No run in progress" in app.client.predict(api_name="/stop")


@pytest.mark.http
def test_every_named_endpoint_refuses_every_hostile_argument(app):
    """Fuzz: each parameter of each named endpoint (as the API lists them now, so new endpoints are covered) in
    turn replaced by a dict, a NUL-carrying text and a megabyte of text, the others at their defaults (a folder
    that does not exist: nothing can start). Each call: a clear, short message, never a server error."""
    api = app.client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    hostile = {"a dict": {"x": [1, 2]}, "NUL": "fc\x00", "1 MB": BIG}
    problems, calls = [], 0
    for name, endpoint in api.items():
        params = endpoint["parameters"]
        base = []
        for p in params:
            value = p.get("parameter_default") if p.get("parameter_has_default") else None
            value = {"folder": MISSING, "source": "server folder"}.get(p["parameter_name"], value)
            base.append(value)
        for i, p in enumerate(params):
            for what, value in hostile.items():
                calls += 1
                try:
                    msg = app_error(lambda: app.client.submit(*_with(base, i, value), api_name=name).result(
                        timeout=120))
                except AssertionError as exc:
                    problems.append(f"{name} {p['parameter_name']}={what}: {str(exc)[:150]}")
                    continue
                if len(msg) > 700:
                    problems.append(f"{name} {p['parameter_name']}={what}: a {len(msg)}-character message")
    assert calls >= 100 and not problems, "\n".join(problems)
    assert not list(app.settings.runs.glob("run-*.json"))
