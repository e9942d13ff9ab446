"""Checkpoint safety: safetensors round trip, format-1 .pt still loads, atomic writes, refusal of pickled
objects, corrupt or altered files and cards that lie about the tensors."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
import torchvision

from covid_cls import (
    ARCHS,
    CheckpointError,
    WeightsUnavailable,
    best_checkpoint,
    build_model,
    delete_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_model,
    migrate_checkpoint,
    save_checkpoint,
)
from covid_cls.card import Card
from covid_cls.fsio import atomic_write

from helpers import arch_params


class Evil:
    """Anything that needs pickle to load; with weights_only=False its __reduce__ could run code."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _copy(ckpt, dst_dir, name=None):
    """Copy a checkpoint pair under a new name (the card names its weights file)."""
    dst = dst_dir / (name or ckpt.name)
    dst.write_bytes(ckpt.read_bytes())
    card = json.loads(ckpt.with_suffix(".json").read_text())
    dst.with_suffix(".json").write_text(json.dumps({**card, "file": dst.name}))
    return dst


def _edit_card(weights, **changes):
    card = json.loads(weights.with_suffix(".json").read_text())
    weights.with_suffix(".json").write_text(json.dumps({**card, **changes}))


def test_round_trip_is_safetensors_with_the_card_beside_it(fc_checkpoint):
    from safetensors import safe_open

    assert fc_checkpoint.suffix == ".safetensors"
    model, card = load_model(fc_checkpoint)
    raw = load_checkpoint(fc_checkpoint)
    assert isinstance(card, Card) and raw.card.stored == "all"   # trained from scratch: everything stored
    for k, v in model.state_dict().items():
        assert torch.equal(v, raw.state[k]), k
    assert set(raw.ood_stats) == {"features", "layout"} and raw.ood_stats["features"]["threshold"] > 0
    with safe_open(str(fc_checkpoint), framework="pt") as f:
        header = json.loads(f.metadata()["covid_cls"])
    assert header["arch"] == "resnet18" and header["classes"] == ["infected", "normal"]
    on_disk = json.loads(fc_checkpoint.with_suffix(".json").read_text())
    for key in ("arch", "level", "classes", "hidden", "weights_origin", "config", "metrics", "temperature",
                "data", "versions", "created", "history", "sha256", "bytes", "format"):
        assert key in on_disk, key
    assert on_disk["format"] == 2 and on_disk["data"]["counts"]["train"] == {"infected": 24, "normal": 24}
    assert on_disk["weights_origin"] == "scratch" and "scratch" in on_disk["weights_note"]


def _legacy_pt(tmp_path, arch="resnet18", level="partial"):
    """A format-1 checkpoint as covid_cls wrote them before safetensors: the whole torchvision model with
    our head in its Linear slot, pickled-free torch zip, a card beside it."""
    torch.manual_seed(3)
    new = build_model(arch, level, weights="none")
    head = ARCHS[arch].head_path
    state = {(head + k[4:] if k.startswith("head") else k[len("backbone."):]): v
             for k, v in new.state_dict().items()}
    card = {"format": 1, "arch": arch, "level": level, "classes": ["infected", "normal"], "hidden": 4300,
            "num_classes": 2, "image_size": 64, "cache_size": 96, "temperature": 1.7, "weights_origin": "scratch",
            "created": "2026-11-20T10:00:00+0000"}
    path = tmp_path / f"old-{arch}.pt"
    torch.save({**card, "state_dict": state}, path)
    path.with_suffix(".json").write_text(json.dumps({**card, "file": path.name}))
    # the reference: torchvision's own model with the head in its slot, as the old code ran it
    ref = getattr(torchvision.models, arch)(weights=None)
    parent, _, leaf = head.rpartition(".")
    setattr(ref.get_submodule(parent) if parent else ref, leaf, torch.nn.Sequential(*new.head))
    ref.load_state_dict(state)
    return path, ref.eval()


@pytest.mark.parametrize("arch", arch_params(ARCHS))
def test_format_1_pt_still_loads_and_predicts_the_same(tmp_path, arch):
    path, ref = _legacy_pt(tmp_path, arch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, card = load_model(path)
    assert any("format-1" in str(w.message) and "migrate" in str(w.message) for w in caught)
    assert card.temperature == 1.7 and card.stored == "all"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(torch.softmax(model(x), 1), torch.softmax(ref(x), 1), atol=1e-6)
    new = migrate_checkpoint(path)
    assert new.suffix == ".safetensors" and not path.exists() and not path.with_suffix(".json").exists()
    migrated, card2 = load_model(new)
    assert card2.temperature == 1.7
    with torch.no_grad():
        assert torch.equal(migrated(x), model(x))


def test_pickled_object_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"arch": "resnet18", "level": "fc", "state_dict": {}, "payload": Evil()}, path)
    with pytest.raises(CheckpointError, match="refusing"):
        load_checkpoint(path)
    whole_module = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(2, 2), whole_module)
    with pytest.raises(CheckpointError, match="refusing"):
        load_checkpoint(whole_module)


@pytest.mark.parametrize("content", [b"", b"not a safetensors file", None, "flip"])
def test_corrupt_truncated_or_altered_files_give_clear_errors(fc_checkpoint, tmp_path, content):
    path = _copy(fc_checkpoint, tmp_path, "bad.safetensors")
    data = bytearray(path.read_bytes())
    if content == "flip":
        data[-100] ^= 0xFF          # same size, one weight changed: only the SHA-256 can tell
    else:
        data = data[: len(data) // 2] if content is None else content
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt|truncated"):
        load_checkpoint(path)


@pytest.mark.parametrize("change,message", [
    ({"classes": ["infected", "normal", "covid"]}, "does not match the tensors"),
    ({"level": "full"}, "does not match the tensors"),
    ({"hidden": 100_000}, "'hidden' must be an integer"),
    ({"classes": [f"c{i}" for i in range(100_000)]}, "'classes' must be 2 to 20"),
    ({"temperature": -1}, "'temperature' must be a positive number"),
    ({"arch": "resnet50"}, "unknown architecture"),
])
def test_a_card_that_lies_is_refused_before_anything_is_built(fc_checkpoint, tmp_path, change, message):
    path = _copy(fc_checkpoint, tmp_path)
    _edit_card(path, **change)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_listing_skips_incomplete_checkpoints(fc_checkpoint, tmp_path):
    good = _copy(fc_checkpoint, tmp_path)
    (tmp_path / "orphan.safetensors").write_bytes(b"half written")     # no card
    (tmp_path / "broken.safetensors").write_bytes(b"x")
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "old.pt").write_bytes(b"x")                            # legacy without a card
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cards = list_checkpoints(tmp_path)
    assert [c.file for c in cards] == [fc_checkpoint.name]
    assert sum("skipping" in str(w.message) for w in caught) == 3
    assert best_checkpoint(tmp_path, "resnet18", "fc") == good
    assert best_checkpoint(tmp_path, "vgg16", "fc") is None
    delete_checkpoint(good)
    assert list_checkpoints(tmp_path) == [] and not good.exists()


def test_a_failing_writer_leaves_nothing_behind(tmp_path):
    target = tmp_path / "x.safetensors"
    target.write_bytes(b"previous version")

    def explode(f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_write(target, explode)
    assert target.read_bytes() == b"previous version"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]


def test_save_never_overwrites(tmp_path):
    m = build_model("resnet18", "fc", weights="none")
    card = {"arch": "resnet18", "level": "fc", "classes": ["infected", "normal"]}
    a = save_checkpoint(tmp_path, m, card, name="same")
    b = save_checkpoint(tmp_path, m, card, name="same")
    assert a != b and a.exists() and b.exists()
    assert load_checkpoint(a).card.classes == ["infected", "normal"]
    assert oct(a.stat().st_mode & 0o777) != oct(0o600)


@pytest.fixture
def fake_imagenet(tmp_path, monkeypatch):
    """A torchvision ResNet18 state_dict where torchvision keeps downloaded ImageNet weights (stands in for
    them: nothing can be downloaded here, the file and its hash are what matters)."""
    from covid_cls.models import _cached_weights_file

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    torch.manual_seed(11)
    target = _cached_weights_file(ARCHS["resnet18"])
    target.parent.mkdir(parents=True)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), target)
    return target


@pytest.mark.parametrize("level", ["fc", "partial", "full"])
def test_from_public_weights_only_the_trained_part_is_stored(fake_imagenet, tmp_path, level):
    model = build_model("resnet18", level, weights="imagenet")
    with torch.no_grad():                       # "training": change what the level trains
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.01)
    path = save_checkpoint(tmp_path / "ck", model, {"arch": "resnet18", "level": level})
    card = load_checkpoint(path).card
    assert card.stored == ("all" if level == "full" else "trained")
    full_size = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    if level == "fc":
        assert path.stat().st_size < 0.25 * full_size   # the 2.2 M-parameter head, not the 11 M backbone
    loaded, _ = load_model(path)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
    if level != "full":                          # the frozen part must come from THAT file
        fake_imagenet.write_bytes(fake_imagenet.read_bytes() + b"\0")
        with pytest.raises(WeightsUnavailable, match="SHA-256"):
            load_model(path)
