"""Serving within a memory budget (issue 12 #6): checkpoints load each tensor once, into the process's own
memory (no file mapping left behind), models are built without a second random copy, and the Predictor's LRU
makes room before it loads (``bench/serve_memory.py`` measures the peaks)."""

from __future__ import annotations

from pathlib import Path

import torch

from helpers import copy_checkpoint


def _mapped(path: Path) -> bool:
    return any(str(path.resolve()) in line for line in Path("/proc/self/maps").read_text().splitlines())


def test_a_checkpoint_loads_the_same_tensors_without_mapping_the_file(fc_checkpoint):
    from safetensors.torch import load_file

    from covid_cls.checkpoints import load_checkpoint, model_from_checkpoint
    from covid_cls.models import build_model

    ck = load_checkpoint(fc_checkpoint)
    assert not _mapped(fc_checkpoint)          # safe_open's get_tensor kept a private map of the whole file
    ref = load_file(str(fc_checkpoint))
    assert set(ck.state) | set(ck.extras) == set(ref)
    assert all(torch.equal(v, ref[k]) for k, v in {**ck.state, **ck.extras}.items())
    model = model_from_checkpoint(ck)
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trains == {n for n, _ in model.named_parameters() if n.startswith("head.")}   # level fc: the head
    plain = build_model(ck.card.arch, ck.card.level, weights="none", num_classes=ck.card.num_classes,
                        hidden=ck.card.hidden)
    plain.load_state_dict(ck.state)                                        # the old way: build, then copy
    x = torch.rand(2, 3, 64, 64)
    assert torch.equal(model.eval()(x), plain.eval()(x))


def test_the_lru_makes_room_before_loading(fc_checkpoint, tmp_path, monkeypatch):
    import covid_cls.predictor as predictor_mod
    from covid_cls import Predictor

    for name in ("a", "b", "c"):
        copy_checkpoint(fc_checkpoint, tmp_path, name)
    one = predictor_mod._expected_bytes(tmp_path / "a.safetensors")
    assert 50e6 < one < 60e6                                               # ResNet18 with our head, fp32
    pred = Predictor(tmp_path, max_models=3, max_bytes=int(2.5 * one))     # two fit, three do not
    held_while_loading = []
    real = predictor_mod.load_checkpoint

    def spy(path):
        held_while_loading.append(len(pred._cache))
        return real(path)

    monkeypatch.setattr(predictor_mod, "load_checkpoint", spy)
    img = torch.rand(96, 96).numpy()
    for name in ("a", "b", "c"):
        pred.predict(img, checkpoint=tmp_path / f"{name}.safetensors")
    assert held_while_loading == [0, 1, 1]      # "a" was dropped before "c" was read, not after
    assert [Path(p).stem for p in pred.loaded()] == ["b", "c"] and pred.loaded_bytes() <= 2.5 * one
    pred = Predictor(tmp_path, max_models=2, max_bytes=10**12)             # the count alone
    held_while_loading.clear()
    for name in ("a", "b", "c"):
        pred.predict(img, checkpoint=tmp_path / f"{name}.safetensors")
    assert held_while_loading == [0, 1, 1] and len(pred.loaded()) == 2
