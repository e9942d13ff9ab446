"""Tracking (issue 12 #5): the event stream of a real run reaches TensorBoard / Trackio through one adapter.

TensorBoard's writer is replaced by the adapter's own ``MemoryWriter`` (same calls as ``SummaryWriter``) when
the ``tensorboard`` package is absent, as here; Trackio by a stand-in module with its three functions. What
is checked: every curve (step loss, epoch train/val metrics), the final metrics equal to the checkpoint card's,
one tracker run per Study run, and the clear message when the package is missing.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types

import pytest

from covid_cls import events as ev
from covid_cls import tracking
from covid_cls.__main__ import main
from covid_cls.checkpoints import read_card

from helpers import small_config


def writers():
    made = []

    def factory(log_dir):
        w = tracking.MemoryWriter(log_dir)
        made.append(w)
        return w

    return made, factory


def test_a_real_fit_writes_curves_and_final_metrics(demo_data, tmp_path):
    from covid_cls import fit

    made, factory = writers()
    cfg = small_config(demo_data, tmp_path / "ck", epochs=2)
    with tracking.make_tracker("tensorboard", "run-a", cfg.to_dict(), logdir=tmp_path / "tb",
                               writer_factory=factory) as track:
        path = fit(cfg, on_event=track)
    [w] = made
    assert w.log_dir == str(tmp_path / "tb" / "run-a") and w.closed
    card = read_card(path)
    loss = w.scalars["train/step_loss"]
    assert len(loss) >= 2 and [s for s, _ in loss] == sorted(s for s, _ in loss)   # global steps increase
    assert [v for _, v in w.scalars["epoch"]] == [1.0, 2.0]
    for key in ("loss", "accuracy", "auc", "sensitivity", "specificity"):
        assert len(w.scalars[f"epoch/val_{key}"]) == 2, key
    assert len(w.scalars["epoch/train_loss"]) == 2
    for h, (_, v) in zip(card.history, w.scalars["epoch/val_auc"], strict=True):
        assert v == pytest.approx(h["val"]["auc"])
    test = card.split_metrics("test")
    assert w.scalars["final/test/auc"][-1][1] == pytest.approx(test["auc"])
    assert w.scalars["final/test/auc_ci_low"][-1][1] == pytest.approx(test["ci"]["auc"][0])
    assert w.scalars["final/test/auc_ci_high"][-1][1] == pytest.approx(test["ci"]["auc"][1])
    assert w.scalars["final/validation/threshold"][-1][1] == pytest.approx(card.threshold)
    assert w.texts["checkpoint"] == [str(path)]
    assert '"arch": "resnet18"' in w.texts["config"][0]


def _study_events():
    def tag(e, i, name):
        return e.tagged(i, 2, name)

    out = []
    for i, name in ((1, "resnet18-fc"), (2, "resnet18-partial")):
        out += [ev.RunStart(run=i, runs=2, name=name),
                tag(ev.Step(epoch=1, epochs=1, step=1, steps=2, loss=0.7, lr=1e-3, images_per_s=10.0), i, name),
                tag(ev.Step(epoch=1, epochs=1, step=2, steps=2, loss=0.6, lr=1e-3, images_per_s=10.0), i, name),
                tag(ev.Epoch(epoch=1, epochs=1, train={"loss": 0.65}, val={"auc": 0.5 + i / 10}, seconds=1.0), i,
                    name),
                tag(ev.Done(checkpoint=f"/ck/{name}.safetensors", metrics={"test": {"auc": 0.8, "ci": {
                    "auc": [0.7, 0.9]}}}), i, name)]
    return out + [ev.StudyDone(rows=[])]


def test_a_study_gets_one_tracker_run_per_model():
    made, factory = writers()
    track = tracking.make_tracker("tensorboard", "study-x", {"epochs": 1}, logdir="tb", writer_factory=factory)
    for e in _study_events():
        track(e)
    assert [w.log_dir for w in made] == ["tb/study-x/resnet18-fc", "tb/study-x/resnet18-partial"]
    assert all(w.closed for w in made)
    assert made[1].scalars["epoch/val_auc"] == [(2, pytest.approx(0.7))]   # epoch 1 ends at global step 2
    assert made[0].scalars["final/test/auc_ci_high"] == [(2, 0.9)]
    assert '"level": "partial"' in made[1].texts["config"][0]


def test_trackio_backend_logs_through_init_log_finish(monkeypatch):
    calls = []
    fake = types.ModuleType("trackio")
    fake.__spec__ = importlib.machinery.ModuleSpec("trackio", None)
    fake.init = lambda **kw: calls.append(("init", kw)) or object()
    fake.log = lambda metrics, step=None: calls.append(("log", step, dict(metrics)))
    fake.finish = lambda: calls.append(("finish",))
    monkeypatch.setitem(sys.modules, "trackio", fake)
    track = tracking.make_tracker("trackio", "study-y", {"lr": 1e-3})
    for e in _study_events():
        track(e)
    inits = [c for c in calls if c[0] == "init"]
    assert [c[1]["name"] for c in inits] == ["study-y/resnet18-fc", "study-y/resnet18-partial"]
    assert inits[0][1]["project"] == "covid_cls" and inits[0][1]["config"]["lr"] == 1e-3
    assert [c[0] for c in calls].count("finish") == 2
    logged = [c for c in calls if c[0] == "log"]
    assert logged[0] == ("log", 1, {"train/step_loss": 0.7, "train/lr": 1e-3, "train/images_per_s": 10.0})
    assert any(c[2].get("final/test/auc") == 0.8 for c in logged)


@pytest.mark.parametrize("kind", tracking.KINDS)
def test_missing_package_is_a_clear_message(kind, monkeypatch, capsys, demo_data, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == kind else real(name, *a))
    with pytest.raises(tracking.TrackingUnavailable, match=f"pip install {kind}"):
        tracking.make_tracker(kind, "r", {})
    # the CLI says so before any training starts (no checkpoint written)
    code = main(["train", "--data", str(demo_data), "--weights", "none", "--epochs", "1", "--out",
                 str(tmp_path / "ck"), "--track", kind])
    assert code == 2 and f"pip install {kind}" in capsys.readouterr().err
    assert not (tmp_path / "ck").exists() or not list((tmp_path / "ck").iterdir())


def test_unknown_kind_and_no_tracker():
    with pytest.raises(ValueError, match="tensorboard, trackio"):
        tracking.make_tracker("wandb", "r", {})
    seen = []
    tracking.tee(seen.append, None)(ev.Log(message="x"))
    assert len(seen) == 1
