"""Training faults: a worker SIGKILLed at random points, a half-written event stream, a wedged worker, a
server restart, corrupt or truncated checkpoints, NaN loss, an empty class folder and a full disk.

The kill trials drive ``JobManager`` directly (no web app: the worker is the same spawned process the
app uses, and the app's server is not involved in a worker's death). The random delays come from a fixed
seed (``COVID_CLS_FAULT_SEED``, default 5) so a failure can be replayed; ``COVID_CLS_KILL_TRIALS``
(default 10) sets the number of random trials. Run with ``-s`` to see where each kill landed.

Stand-in workers (functions below whose names start with ``_worker_``) are passed to the spawned process
by reference, so this module must stay importable without side effects and light at import time.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import struct
import threading
import time
import warnings
from collections import Counter
from pathlib import Path

import pytest

from helpers import small_config

N_TRIALS = int(os.environ.get("COVID_CLS_KILL_TRIALS", "10"))
SEED = int(os.environ.get("COVID_CLS_FAULT_SEED", "5"))


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _registry_is_consistent(out: Path) -> list[dict]:
    """No temp files, no weights without a card, and every listed checkpoint loads. Returns the cards."""
    from covid_cls.checkpoints import card_path, list_checkpoints, load_checkpoint

    if not out.exists():
        return []
    leftovers = sorted(p.name for p in out.iterdir() if p.name.endswith(".tmp"))
    assert not leftovers, f"temporary files left behind: {leftovers}"
    orphans = sorted(p.name for p in [*out.glob("*.safetensors"), *out.glob("*.pt")] if not card_path(p).exists())
    assert not orphans, f"weights without a card left behind: {orphans}"
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # nothing in the folder may need skipping
        cards = list_checkpoints(out)
    for card in cards:
        ckpt = load_checkpoint(card.path)
        assert ckpt.card.arch == card.arch and ckpt.state
    return cards


def _phase(run) -> str:
    """Where a run was, judged by what its worker had reported so far."""
    if any(line.startswith("saved ") for line in run.log):
        return "after saving"
    if run.progress >= 1.0:
        return "final evaluation / saving"
    if run.history:
        return "training"
    if run.log:
        return "scanning / decoding / building the model"
    return "starting (imports)"


def _wait_for(predicate, timeout: float, what: str, poll: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(poll)


def _kill(mgr, pid: int) -> bool:
    """SIGKILL the worker if it is still the active one (never a recycled pid)."""
    if mgr.pid != pid:
        return False
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True


def _send(conn, event: dict) -> None:
    """Send an event from a stand-in worker, whatever the manager handed it (pipe or queue)."""
    if hasattr(conn, "put"):
        conn.put(event)
    else:
        from covid_cls.jobs import _EventSender

        _EventSender(conn).put(event)


# ---------------------------------------------------------------------------------------------
# stand-in workers (run in the spawned process)
# ---------------------------------------------------------------------------------------------


def _worker_dies_mid_event(kind, cfg, extra, conn, stop):
    """Writes the start of an event frame — a length header promising 1 MB and a few bytes — then dies the
    way an OOM kill would. A reader that trusts the header waits forever for the rest."""
    _send(conn, {"type": "log", "message": "about to die mid-event"})
    fd = (getattr(conn, "_writer", None) or conn).fileno()
    os.write(fd, struct.pack("!i", 1 << 20) + b"\x80\x05partial event")
    os.kill(os.getpid(), signal.SIGKILL)


def _worker_wedged_holding_stop_lock(kind, cfg, extra, conn, stop):
    """Holds whatever lock guards the stop flag (multiprocessing.Event has one, shared with the server)
    and hangs — what a worker killed inside ``stop.is_set()`` leaves behind."""
    lock = getattr(stop, "_cond", None)
    if lock is not None:
        lock.acquire()
    _send(conn, {"type": "log", "message": "wedged"})
    time.sleep(120)


def _worker_sleeps(kind, cfg, extra, conn, stop):
    """A run that does nothing until stopped."""
    _send(conn, {"type": "log", "message": "sleeping"})
    deadline = time.monotonic() + 120
    while not stop.is_set() and time.monotonic() < deadline:
        time.sleep(0.05)
    _send(conn, {"type": "stopped", "message": "stopped on request; nothing was saved"})


def _nan_loss_factory(cfg, train_labels, device, *_):
    import torch.nn.functional as F

    calls = {"n": 0}

    def loss(logits, target):
        calls["n"] += 1
        value = F.cross_entropy(logits, target)
        return value * float("nan") if calls["n"] >= 2 else value

    return loss


def _worker_nan_loss(kind, cfg, extra, conn, stop):
    """The real worker, with a loss that turns NaN at the second step."""
    import covid_cls.engine as engine
    from covid_cls.jobs import _worker

    engine.make_loss = _nan_loss_factory
    _worker(kind, cfg, extra, conn, stop)


# ---------------------------------------------------------------------------------------------
# SIGKILL at random points
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kill_setup(demo_data, tmp_path_factory):
    from covid_cls.jobs import JobManager

    root = tmp_path_factory.mktemp("faults")
    out = root / "checkpoints"
    # level fc with many (cheap) epochs: a whole run takes ~7-10 s on 2 cores, so delays of 0.5-6 s land in the
    # imports, the dataset scan/decode, training, the final evaluation, the save, or after the end.
    cfg = small_config(demo_data, out, epochs=200, log_every=1).to_dict()
    return JobManager(root / "runs"), out, cfg


@pytest.mark.slow
def test_sigkill_at_random_points_leaves_a_working_manager_and_a_clean_registry(kill_setup):
    mgr, out, cfg = kill_setup
    rng = random.Random(SEED)
    outcomes: Counter[str] = Counter()
    for trial in range(N_TRIALS):
        delay = rng.uniform(0.5, 6.0)
        run = mgr.start(cfg)
        pid = mgr.pid
        assert pid is not None and pid != os.getpid()
        t0 = time.monotonic()
        while time.monotonic() - t0 < delay and run.status == "running":
            time.sleep(0.01)
        phase = _phase(run)
        killed = run.status == "running" and _kill(mgr, pid)
        mgr.wait(run.id, timeout=30)
        assert mgr.active() is None and mgr.pid is None, f"trial {trial}: manager still busy ({run.status})"
        if killed and run.status == "failed":
            assert "SIGKILL" in run.message and "nothing was saved" in run.message, run.message
            assert run.checkpoint is None
            outcomes[f"killed while {phase} -> failed"] += 1
        else:   # it finished before the kill landed
            assert run.status == "done", (run.status, run.message)
            assert run.checkpoint and Path(run.checkpoint).exists()
            outcomes[f"finished before the kill ({delay:.1f} s) -> done"] += 1
        assert mgr.get(run.id).status == run.status
        saved = json.loads((mgr.runs_dir / f"run-{run.id}.json").read_text())
        assert saved["status"] == run.status and saved["message"] == run.message
        _registry_is_consistent(out)
    print(f"\n{N_TRIALS} SIGKILL trials (seed {SEED}): " + "; ".join(f"{n} x {k}" for k, n in sorted(outcomes.items())))
    assert sum(n for k, n in outcomes.items() if "failed" in k) >= N_TRIALS // 2, outcomes


@pytest.mark.slow
def test_sigkill_while_the_checkpoint_is_being_written(kill_setup):
    """Deterministic: the kill lands while the weights are being written to their temporary file."""
    from covid_cls.checkpoints import list_checkpoints

    mgr, out, cfg = kill_setup
    before = {c.file for c in list_checkpoints(out)}
    run = mgr.start({**cfg, "epochs": 3})
    pid = mgr.pid
    caught = False
    deadline = time.monotonic() + 60
    while run.status == "running" and time.monotonic() < deadline:
        if any(out.glob(f".*.{pid}.*.tmp")):
            caught = _kill(mgr, pid)
            break
        time.sleep(0.002)
    assert caught, f"never saw the checkpoint being written ({run.status}: {run.message})"
    mgr.wait(run.id, timeout=30)
    assert run.status == "failed" and "SIGKILL" in run.message, (run.status, run.message)
    assert {c.file for c in _registry_is_consistent(out)} == before


@pytest.mark.slow
def test_weights_whose_card_never_followed_are_removed_after_a_kill(kill_setup):
    """A kill between the rename of the weights and the card leaves complete weights without a card (never
    listed, but disk space lost). The manager removes such files written during the dead run — and only
    those: an older card-less file is somebody else's business."""
    mgr, out, cfg = kill_setup
    out.mkdir(parents=True, exist_ok=True)
    old = out / "resnet18-fc-older-orphan.safetensors"
    old.write_bytes(b"an older orphan")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    run = mgr.start(cfg)
    pid = mgr.pid
    fresh = out / "resnet18-fc-20990101-000000.safetensors"   # what a killed save would leave
    fresh.write_bytes(b"weights without their card")
    _wait_for(lambda: run.log, 60, "the worker's first event")
    assert _kill(mgr, pid)
    mgr.wait(run.id, timeout=30)
    assert run.status == "failed"
    assert not fresh.exists()
    assert old.exists()
    old.unlink()
    _registry_is_consistent(out)


@pytest.mark.slow
def test_after_the_kills_a_new_run_trains_to_the_end(kill_setup):
    from covid_cls.checkpoints import list_checkpoints, load_model

    mgr, out, cfg = kill_setup
    run = mgr.start({**cfg, "epochs": 2})
    mgr.wait(run.id, timeout=120)
    assert run.status == "done", (run.status, run.message)
    assert Path(run.checkpoint).name in {c.file for c in list_checkpoints(out)}
    model, card = load_model(run.checkpoint)
    assert card.arch == "resnet18" and card.level == "fc"
    _registry_is_consistent(out)
    # Start right after "done": waits for the ending process instead of "already in progress".
    again = mgr.start({**cfg, "epochs": 1})
    mgr.wait(again.id, timeout=120)
    assert again.status == "done", (again.status, again.message)


# ---------------------------------------------------------------------------------------------
# the event stream and the stop flag can never wedge the server
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_worker_killed_mid_event_cannot_hang_the_watcher(tmp_path, monkeypatch):
    import covid_cls.jobs as jobs

    monkeypatch.setattr(jobs, "_worker", _worker_dies_mid_event)
    mgr = jobs.JobManager(tmp_path / "runs")
    run = mgr.start({"epochs": 1, "out_dir": str(tmp_path / "ckpt")})
    mgr.wait(run.id, timeout=30)
    assert run.status == "failed", f"watcher hung on a half-written event ({run.status})"
    assert "SIGKILL" in run.message
    assert any("about to die" in line for line in run.log)   # the complete event before it was read
    assert mgr.active() is None
    # and the manager takes the next run
    monkeypatch.setattr(jobs, "_worker", _worker_sleeps)
    nxt = mgr.start({"epochs": 1})
    _wait_for(lambda: nxt.log, 30, "the next run")
    assert mgr.stop(nxt.id)
    mgr.wait(nxt.id, timeout=30)
    assert nxt.status == "stopped"


def test_stop_never_blocks_on_a_wedged_worker(tmp_path, monkeypatch):
    import covid_cls.jobs as jobs

    monkeypatch.setattr(jobs, "_worker", _worker_wedged_holding_stop_lock)
    mgr = jobs.JobManager(tmp_path / "runs")
    run = mgr.start({"epochs": 1})
    _wait_for(lambda: run.log, 30, "the wedged worker to report")
    result: dict = {}
    t = threading.Thread(target=lambda: result.setdefault("ok", mgr.stop(run.id, grace_s=0.5)), daemon=True)
    t0 = time.monotonic()
    t.start()
    t.join(5)
    assert not t.is_alive(), "stop() blocked on a lock held by the worker"
    assert result["ok"] and time.monotonic() - t0 < 5
    mgr.wait(run.id, timeout=30)
    assert run.status == "stopped" and "nothing was saved" in run.message, (run.status, run.message)
    assert mgr.active() is None


@pytest.mark.slow
def test_a_restart_marks_the_running_run_interrupted_and_keeps_history(tmp_path, monkeypatch):
    import covid_cls.jobs as jobs

    runs = tmp_path / "runs"
    monkeypatch.setattr(jobs, "_worker", _worker_sleeps)
    first = jobs.JobManager(runs)
    finished = first.start({"epochs": 1})
    _wait_for(lambda: finished.log, 30, "the first run")
    first.stop(finished.id)
    first.wait(finished.id, timeout=30)
    assert finished.status == "stopped"
    running = first.start({"epochs": 2})
    _wait_for(lambda: running.log, 30, "the second run")
    (runs / "run-broken.json").write_text('{"id": "broken", "kind": ')          # torn write
    (runs / "run-alien.json").write_text(json.dumps({"unexpected": True}))    # not a run

    # "restart": a new manager on the same folder while the old process (the first manager) is gone
    second = jobs.JobManager(runs)
    assert second.active() is None and second.pid is None
    assert second.get(running.id).status == "interrupted"
    assert "server stopped" in second.get(running.id).message
    assert second.get(finished.id).status == "stopped"
    assert [r.id for r in second.history()] == [running.id, finished.id]
    on_disk = json.loads((runs / f"run-{running.id}.json").read_text())
    assert on_disk["status"] == "interrupted"
    # a third manager reads the same history again
    assert jobs.JobManager(runs).get(running.id).status == "interrupted"
    first.stop(running.id)
    first.wait(running.id, timeout=30)


@pytest.mark.slow
def test_nan_loss_in_the_worker_fails_the_run_with_a_clear_message(demo_data, tmp_path, monkeypatch):
    import covid_cls.jobs as jobs

    monkeypatch.setattr(jobs, "_worker", _worker_nan_loss)
    mgr = jobs.JobManager(tmp_path / "runs")
    out = tmp_path / "ckpt"
    run = mgr.start(small_config(demo_data, out, level="partial", epochs=2).to_dict())
    mgr.wait(run.id, timeout=120)
    assert run.status == "failed"
    assert "loss became nan" in run.message and "Lower the learning rate" in run.message, run.message
    assert any("diverged" in line for line in run.log)
    assert not out.exists() or not any(out.iterdir())


# ---------------------------------------------------------------------------------------------
# in-process faults: NaN loss, empty class folder, disk full
# ---------------------------------------------------------------------------------------------


def test_nan_loss_in_process(demo_data, tmp_path, monkeypatch):
    import covid_cls.engine as engine
    from covid_cls import fit

    monkeypatch.setattr(engine, "make_loss", _nan_loss_factory)
    events = []
    with pytest.raises(engine.TrainingError, match="loss became nan at epoch 1, step 2: training diverged"):
        fit(small_config(demo_data, tmp_path / "ckpt", level="partial", epochs=2), on_event=events.append)
    assert events[-1].type == "error" and "Lower the learning rate" in events[-1].message
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").iterdir())


def test_empty_class_folder_is_named_before_any_work(demo_data, tmp_path):
    from covid_cls import fit
    from covid_cls.data import DatasetError

    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    for f in (data / "train" / "normal").iterdir():
        f.unlink()
    events = []
    t0 = time.perf_counter()
    with pytest.raises(DatasetError) as info:
        fit(small_config(data, tmp_path / "ckpt"), on_event=events.append)
    msg = str(info.value)
    assert "train/normal/ contains no images" in msg, msg
    assert events[-1].type == "error" and "train/normal/ contains no images" in events[-1].message
    assert time.perf_counter() - t0 < 5   # found by the scan, before decoding or building a model
    assert not (tmp_path / "ckpt").exists()


def _disk_full(f):
    f.write(b"\0" * 4096)   # some bytes made it, then the disk filled up
    raise OSError(28, "No space left on device")


def test_disk_full_while_writing_the_weights(demo_data, tmp_path, monkeypatch):
    import covid_cls.checkpoints as checkpoints
    from covid_cls import fit

    real = checkpoints.atomic_write

    def failing_for_weights(path, write):
        return real(path, _disk_full if str(path).endswith(".safetensors") else write)

    out = tmp_path / "ckpt"
    monkeypatch.setattr(checkpoints, "atomic_write", failing_for_weights)
    events = []
    with pytest.raises(OSError) as info:
        fit(small_config(demo_data, out, epochs=1), on_event=events.append)
    msg = str(info.value)
    assert "No space left on device" in msg and "could not save the checkpoint" in msg, msg
    assert "nothing was saved" in msg and "Free some disk space" in msg
    assert events[-1].type == "error" and "No space left on device" in events[-1].message
    assert sorted(p.name for p in out.iterdir()) == []


def test_disk_full_while_writing_the_card_leaves_no_weights(demo_data, tmp_path, monkeypatch):
    import covid_cls.checkpoints as checkpoints
    from covid_cls import fit

    real = checkpoints.atomic_write

    def failing_for_cards(path, write):
        if str(path).endswith(".json"):
            return real(path, _disk_full)
        return real(path, write)

    out = tmp_path / "ckpt"
    monkeypatch.setattr(checkpoints, "atomic_write", failing_for_cards)
    with pytest.raises(OSError, match="No space left on device"):
        fit(small_config(demo_data, out, epochs=1))
    assert sorted(p.name for p in out.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# corrupt or truncated checkpoints
# ---------------------------------------------------------------------------------------------


@pytest.fixture()
def damaged_dir(fc_checkpoint, tmp_path):
    """A folder with one good checkpoint and damaged copies of it, each with a valid-looking card."""
    src = Path(fc_checkpoint)
    data = src.read_bytes()
    card = json.loads(src.with_suffix(".json").read_text())
    variants = {
        "good": data,
        "truncated": data[: len(data) // 2],
        "cut-last-byte": data[:-1],
        "empty": b"",
        "bit-flipped": data[: len(data) // 2] + bytes(b ^ 0xFF for b in data[len(data) // 2: len(data) // 2 + 64])
        + data[len(data) // 2 + 64:],
    }
    for name, content in variants.items():
        (tmp_path / f"{name}.safetensors").write_bytes(content)
        (tmp_path / f"{name}.json").write_text(json.dumps({**card, "file": f"{name}.safetensors"}))
    return tmp_path


def test_listing_skips_truncated_checkpoints_with_a_warning(damaged_dir):
    from covid_cls.checkpoints import best_checkpoint, list_checkpoints

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        files = sorted(c.file for c in list_checkpoints(damaged_dir))
    # same size, different bytes: only loading can tell (below)
    assert files == ["bit-flipped.safetensors", "good.safetensors"]
    skipped = sorted(str(w.message).split(":")[0] for w in caught if "skipping" in str(w.message))
    assert skipped == ["skipping cut-last-byte.safetensors", "skipping empty.safetensors",
                       "skipping truncated.safetensors"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        best = best_checkpoint(damaged_dir, "resnet18", "fc")
    assert best in (damaged_dir / "good.safetensors", damaged_dir / "bit-flipped.safetensors")


@pytest.mark.parametrize("name", ["truncated", "cut-last-byte", "empty", "bit-flipped"])
def test_predictor_gives_a_clear_error_for_a_damaged_checkpoint(damaged_dir, name):
    from covid_cls import Predictor
    from covid_cls.checkpoints import CheckpointError
    from covid_cls.synthetic import synthetic_xray

    image = synthetic_xray(96, infected=True, seed=1)[0]
    pred = Predictor(damaged_dir)
    with pytest.raises(CheckpointError, match=f"{name}.safetensors: it is corrupt or truncated"):
        pred.predict(image, checkpoint=damaged_dir / f"{name}.safetensors")
    assert pred.loaded() == []
    good = pred.predict(image, checkpoint=damaged_dir / "good.safetensors")
    assert abs(sum(good.probs.values()) - 1) < 1e-5


def test_a_damaged_best_checkpoint_falls_back_to_the_next_valid_one(damaged_dir):
    """An altered file whose card claims the best AUC must not break the default prediction (issue 11 #14)."""
    from covid_cls import Predictor
    from covid_cls.synthetic import synthetic_xray

    card = json.loads((damaged_dir / "bit-flipped.json").read_text())
    card["metrics"]["validation"]["auc"] = 1.5            # "best" by its own claim
    (damaged_dir / "bit-flipped.json").write_text(json.dumps(card))
    image = synthetic_xray(96, infected=True, seed=1)[0]
    pred = Predictor(damaged_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        p = pred.predict(image)                           # default: best for resnet18 · fc
        again = pred.predict(image)
    assert Path(p.checkpoint).name == "good.safetensors" == Path(again.checkpoint).name
    assert sum("skipping bit-flipped" in str(w.message) for w in caught) == 1   # remembered, not retried
