"""Checkpoint safety: round trip, atomic writes, refusal of pickled objects, corrupt files."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

from covid_cls import (CheckpointError, best_checkpoint, delete_checkpoint, list_checkpoints, load_checkpoint,
                       load_model, save_checkpoint)
from covid_cls.checkpoints import atomic_write


class Evil:
    """Anything that needs pickle to load; with weights_only=False its __reduce__ could run code."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_round_trip_reproduces_the_model(fc_checkpoint):
    model, card = load_model(fc_checkpoint)
    raw = load_checkpoint(fc_checkpoint)
    for k, v in model.state_dict().items():
        assert torch.equal(v, raw["state_dict"][k]), k
    on_disk = json.loads(fc_checkpoint.with_suffix(".json").read_text())
    for key in ("arch", "level", "classes", "hidden", "weights_origin", "config", "metrics", "temperature",
                "data", "versions", "created", "history"):
        assert key in on_disk, key
    assert on_disk["data"]["counts"]["train"] == {"infected": 24, "normal": 24}
    assert on_disk["weights_origin"] == "scratch" and "scratch" in on_disk["weights_note"]


def test_pickled_object_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"arch": "resnet18", "level": "fc", "state_dict": {}, "payload": Evil()}, path)
    with pytest.raises(CheckpointError, match="refusing"):
        load_checkpoint(path)
    whole_module = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(2, 2), whole_module)
    with pytest.raises(CheckpointError, match="refusing"):
        load_checkpoint(whole_module)


@pytest.mark.parametrize("content", [b"", b"not a zip", None])
def test_corrupt_or_truncated_files_give_clear_errors(fc_checkpoint, tmp_path, content):
    path = tmp_path / "bad.pt"
    data = fc_checkpoint.read_bytes()
    path.write_bytes(data[: len(data) // 2] if content is None else content)
    with pytest.raises(CheckpointError, match="corrupt|truncated"):
        load_checkpoint(path)


def test_listing_skips_incomplete_checkpoints(fc_checkpoint, tmp_path):
    good = tmp_path / fc_checkpoint.name
    good.write_bytes(fc_checkpoint.read_bytes())
    good.with_suffix(".json").write_text(fc_checkpoint.with_suffix(".json").read_text())
    (tmp_path / "orphan.pt").write_bytes(b"half written")              # no card
    (tmp_path / "broken.pt").write_bytes(b"x")
    (tmp_path / "broken.json").write_text("{not json")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cards = list_checkpoints(tmp_path)
    assert [c["file"] for c in cards] == [fc_checkpoint.name]
    assert sum("skipping" in str(w.message) for w in caught) == 2
    assert best_checkpoint(tmp_path, "resnet18", "fc") == good
    assert best_checkpoint(tmp_path, "vgg16", "fc") is None
    delete_checkpoint(good)
    assert list_checkpoints(tmp_path) == [] and not good.exists()


def test_a_failing_writer_leaves_nothing_behind(tmp_path):
    target = tmp_path / "x.pt"
    target.write_bytes(b"previous version")

    def explode(f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_write(target, explode)
    assert target.read_bytes() == b"previous version"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.pt"]


def test_save_refuses_nothing_plain_and_never_overwrites(tmp_path):
    m = torch.nn.Linear(2, 2)
    a = save_checkpoint(tmp_path, m, {"arch": "resnet18", "level": "fc", "classes": ["infected", "normal"]},
                        name="same")
    b = save_checkpoint(tmp_path, m, {"arch": "resnet18", "level": "fc", "classes": ["infected", "normal"]},
                        name="same")
    assert a != b and a.exists() and b.exists()
    assert load_checkpoint(a)["classes"] == ["infected", "normal"]
    assert oct(a.stat().st_mode & 0o777) != oct(0o600)
