"""fit(): learning, events, stopping, errors, determinism."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from covid_cls import DatasetError, TrainingError, TrainingStopped, fit, list_checkpoints, load_checkpoint
from covid_cls import events as ev
from covid_cls.engine import make_loss

from helpers import small_config


def test_fc_learns_the_synthetic_set_and_reports_all_metrics(fc_checkpoint):
    card = load_checkpoint(fc_checkpoint).card
    val = card.metrics["validation"]
    assert val["auc"] >= 0.95
    for split in ("train", "validation", "test"):
        assert {"accuracy", "sensitivity", "specificity", "precision", "f1", "auc", "ece", "confusion",
                "n"} <= set(card.metrics[split])
    assert card.weights_origin == "scratch"
    assert card.classes == ["infected", "normal"] and card.positive == "infected"
    assert card.best_epoch == max(range(1, 5), key=lambda e: (card.history[e - 1]["val"]["auc"],
                                                              -card.history[e - 1]["val"]["loss"]))
    assert 0.05 <= card.temperature <= 20


@pytest.mark.slow
def test_partial_level_learns_with_augmentation(demo_data, tmp_path):
    events = []
    path = fit(small_config(demo_data, tmp_path, level="partial", epochs=4, augment=True), on_event=events.append)
    assert load_checkpoint(path).card.metrics["validation"]["auc"] >= 0.95
    kinds = [e.type for e in events]
    assert kinds.count("epoch") == 4 and kinds[-1] == "done" and "step" in kinds
    ep = [e for e in events if isinstance(e, ev.Epoch)][0]
    assert {"loss", "accuracy", "auc", "sensitivity", "specificity"} <= set(ep.val)
    assert all(ev.from_dict(json.loads(json.dumps(e.to_dict()))) == e for e in events)   # JSON-safe events
    assert "epoch 1/4" in ev.describe(ep) and "AUC" in ev.describe(ep)


def test_stop_ends_the_run_and_saves_nothing(demo_data, tmp_path):
    stop = threading.Event()
    seen = []

    def on_event(e):
        seen.append(e.type)
        if isinstance(e, ev.Step):
            stop.set()

    with pytest.raises(TrainingStopped):
        fit(small_config(demo_data, tmp_path, level="full", epochs=5, log_every=1), on_event=on_event, stop=stop)
    # ended within one step of the request
    assert seen.count("step") == 1 and seen[-1] == "stopped"
    assert list(tmp_path.iterdir()) == []


def test_nan_loss_stops_with_a_clear_error(demo_data, tmp_path, monkeypatch):
    def nan_loss(cfg, labels, device, *_):
        return lambda logits, y: (logits.sum() * float("nan"))

    monkeypatch.setattr("covid_cls.engine.make_loss", nan_loss)
    events = []
    with pytest.raises(TrainingError, match="loss became nan.*learning rate"):
        fit(small_config(demo_data, tmp_path), on_event=events.append)
    assert isinstance(events[-1], ev.Error) and "learning rate" in events[-1].message
    assert list(tmp_path.iterdir()) == []


def test_bad_dataset_fails_before_any_work(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(DatasetError, match="missing split"):
        fit(small_config(tmp_path, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cpu_training_is_deterministic(demo_data, tmp_path):
    a = load_checkpoint(fit(small_config(demo_data, tmp_path / "a", level="partial", epochs=1)))
    b = load_checkpoint(fit(small_config(demo_data, tmp_path / "b", level="partial", epochs=1)))
    for k in a.state:
        assert torch.equal(a.state[k], b.state[k]), k
    assert a.card.metrics == b.card.metrics


@pytest.mark.parametrize("loss", ["weighted_ce", "focal"])
def test_losses_run_and_weight_the_rare_class(loss):
    from covid_cls import TrainConfig

    cfg = TrainConfig(loss=loss)
    labels = torch.tensor([0] * 30 + [1] * 10)
    fn = make_loss(cfg, labels, torch.device("cpu"))
    logits = torch.zeros(2, 2)
    # with equal logits the loss on the rare class (normal, 1) must be at least that of the common one
    l0, l1 = fn(logits[:1], torch.tensor([0])), fn(logits[1:], torch.tensor([1]))
    assert torch.isfinite(l0) and l1 >= l0 if loss == "weighted_ce" else torch.isfinite(l1)


@pytest.mark.slow
def test_every_optimizer_and_schedule(demo_data, tmp_path):
    for opt, sched in [("sgd", "cosine"), ("adamw", "onecycle")]:
        path = fit(small_config(demo_data, tmp_path, epochs=1, optimizer=opt, schedule=sched))
        assert path.exists()
    assert len(list_checkpoints(tmp_path)) == 2


def test_precision_is_decided_once_per_device(monkeypatch):
    from covid_cls.engine import Runtime, cpu_has_native_bf16

    cpu = torch.device("cpu")
    for native in (False, True):
        monkeypatch.setattr("covid_cls.runtime.cpu_has_native_bf16", lambda native=native: native)
        assert Runtime.create(cpu, "auto").bf16 is native     # emulated bf16 is slower than fp32: off
    assert Runtime.create(cpu, "fp32").bf16 is False and Runtime.create(cpu, "bf16").bf16 is True
    with pytest.raises(ValueError, match="unknown precision"):
        Runtime.create(cpu, "fp16")
    rt = Runtime.create(cpu, "bf16")
    conv = rt.model(torch.nn.Conv2d(3, 4, 3))
    with rt.autocast():
        assert conv(rt.input(torch.rand(2, 3, 8, 8))).dtype == torch.bfloat16
    with Runtime.create(cpu, "fp32").autocast():
        assert conv(torch.rand(2, 3, 8, 8)).dtype == torch.float32
    assert isinstance(cpu_has_native_bf16.__wrapped__(), bool)   # reads /proc/cpuinfo where there is one


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_both_precisions_learn_and_the_card_says_which(demo_data, tmp_path, precision):
    ckpt = load_checkpoint(fit(small_config(demo_data, tmp_path, level="partial", epochs=3, precision=precision)))
    assert ckpt.card.precision == precision
    assert ckpt.card.metrics["validation"]["auc"] >= 0.9
    assert all(v.dtype != torch.bfloat16 for v in ckpt.state.values())   # weights stay fp32


@pytest.mark.slow
def test_the_saved_model_is_the_best_epochs(demo_data, tmp_path, monkeypatch):
    """Validation AUC is forced to peak at epoch 1: the saved weights must be epoch 1's, not the last."""
    import covid_cls.engine as engine

    real, calls, snap = engine.evaluate, [], {}
    fake_auc = [0.9, 0.5, 0.4]

    def evaluate(model, *a, **kw):
        m, logits = real(model, *a, **kw)
        if len(calls) < len(fake_auc):          # the per-epoch validation calls come first
            if not calls:
                snap.update({k: v.detach().clone() for k, v in model.state_dict().items()})
            m = {**m, "auc": fake_auc[len(calls)]}
            calls.append(1)
        return m, logits

    monkeypatch.setattr(engine, "evaluate", evaluate)
    ckpt = load_checkpoint(fit(small_config(demo_data, tmp_path, level="partial", epochs=3, lr=3e-3)))
    assert ckpt.card.best_epoch == 1
    changed = [k for k in snap if not torch.equal(ckpt.state[k], snap[k])]
    assert changed == [], changed
