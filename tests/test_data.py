"""Dataset scanning, the decoded cache and the presets."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from covid_cls import DatasetError, DecodedCache, make_demo_dataset, scan_dataset
from covid_cls.data import eval_batch, to_square_u8, train_batch


@pytest.fixture
def tiny(tmp_path):
    return make_demo_dataset(tmp_path / "d", n_per_class=4, size=48)


def test_scan_counts_and_ignores_masks(tiny):
    info = scan_dataset(tiny)
    assert info.counts() == {"train": {"infected": 4, "normal": 4}, "validation": {"infected": 4, "normal": 4},
                             "test": {"infected": 4, "normal": 4}}
    assert all("masks" not in str(p) for s in info.splits.values() for p in s.files)


def test_scan_accepts_val_alias(tiny):
    (tiny / "validation").rename(tiny / "val")
    assert scan_dataset(tiny).splits["validation"].folder.name == "val"


@pytest.mark.parametrize("breakage,message", [
    (lambda r: shutil.rmtree(r / "test"), "missing split folder 'test/'"),
    (lambda r: shutil.rmtree(r / "train" / "normal"), "train/ lacks class folder(s) normal"),
    # a folder in one split is a class the others lack (classes come from the folders: issue 13 #4)
    (lambda r: (r / "validation" / "covid").mkdir(), "train/ lacks class folder(s) covid"),
    (lambda r: (r / "validation" / "covid").mkdir(), "validation/covid/ contains no images"),
    (lambda r: shutil.rmtree(r / "train" / "normal") or shutil.rmtree(r / "validation" / "normal")
     or shutil.rmtree(r / "test" / "normal"), "has 1 class folder(s) (infected); a dataset needs 2 to 20"),
    (lambda r: [p.unlink() for p in (r / "test" / "infected").iterdir()], "test/infected/ contains no images"),
])
def test_scan_errors_are_clear(tiny, breakage, message):
    breakage(tiny)
    with pytest.raises(DatasetError) as exc:
        scan_dataset(tiny)
    assert message in str(exc.value)


def test_scan_takes_the_classes_from_the_folders(tiny):
    """Three classes from the folders, in ImageFolder (alphabetical) order; a model's classes can be required."""
    for split in ("train", "validation", "test"):
        shutil.copytree(tiny / split / "normal", tiny / split / "covid")
    info = scan_dataset(tiny)
    assert info.classes == ("covid", "infected", "normal")
    assert info.counts()["train"] == {"covid": 4, "infected": 4, "normal": 4}
    assert info.positive == "infected"
    assert set(info.splits["test"].labels) == {0, 1, 2}
    with pytest.raises(DatasetError, match="unexpected folder"):
        scan_dataset(tiny, classes=("infected", "normal"))


def test_positive_class_rule():
    from covid_cls.data import positive_class

    assert positive_class(("infected", "normal")) == "infected"
    assert positive_class(("normal", "pneumonia")) == "pneumonia"
    assert positive_class(("cat", "dog")) == "cat"
    assert positive_class(("covid", "normal", "pneumonia")) == "covid"


def test_scan_lists_all_problems_at_once(tiny):
    shutil.rmtree(tiny / "test")
    (tiny / "train" / "other").mkdir()
    msg = str(pytest.raises(DatasetError, scan_dataset, tiny).value)
    assert "test/" in msg and "other" in msg


def test_scan_missing_folder(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        scan_dataset(tmp_path / "nope")


def test_non_images_skipped_and_bad_images_skipped_when_decoding(tiny, tmp_path, monkeypatch):
    (tiny / "train" / "normal" / "notes.txt").write_text("hello")
    (tiny / "train" / "normal" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    info = scan_dataset(tiny)
    assert [s for s, _ in info.skipped] == ["train/normal/notes.txt"]
    cache = DecodedCache(32, cache_dir=tmp_path / "c", workers=2)
    d = cache.get(info.splits["train"], info.root)
    assert len(d) == 8 and [s for s, _ in d.skipped] == ["train/normal/broken.png"]
    assert d.images.shape == (8, 1, 32, 32) and d.images.dtype == torch.uint8


def test_decoded_cache_reuses_memory_then_disk(tiny, tmp_path, monkeypatch):
    info = scan_dataset(tiny)
    cache = DecodedCache(40, cache_dir=tmp_path / "c", workers=1)
    first = cache.get(info.splits["test"], info.root)
    assert cache.get(info.splits["test"], info.root) is first          # memory hit
    DecodedCache.clear_memory()
    calls = []
    monkeypatch.setattr("covid_cls.data._decode_one", lambda *a: calls.append(a))
    again = cache.get(info.splits["test"], info.root)                  # disk hit: nothing decoded
    assert calls == [] and torch.equal(again.images, first.images) and again.files == first.files


def test_to_square_is_the_whole_image():
    img = Image.fromarray(np.tile(np.arange(200, dtype=np.uint8), (100, 1)))  # 200 wide, 100 high ramp
    sq = to_square_u8(img, 50)
    assert sq.shape == (50, 50)
    assert sq[:, 0].mean() < 10 and sq[:, -1].mean() > 190      # left and right ends both kept


def test_eval_batch_shape_and_normalisation():
    u8 = torch.full((2, 1, 40, 40), 255, dtype=torch.uint8)
    x = eval_batch(u8, 32)
    assert x.shape == (2, 3, 32, 32)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(x[0, :, 0, 0], (1 - mean) / std)


def test_train_batch_is_reproducible_and_random():
    u8 = torch.randint(0, 255, (4, 1, 48, 48), dtype=torch.uint8)
    a = train_batch(u8, 32, torch.Generator().manual_seed(3))
    b = train_batch(u8, 32, torch.Generator().manual_seed(3))
    c = train_batch(u8, 32, torch.Generator().manual_seed(4))
    assert a.shape == (4, 3, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)


def test_train_batch_identity_warp_equals_eval():
    """With no rotation, full-image crop and no flip the warp must reduce to the eval preset."""
    u8 = torch.randint(0, 255, (2, 1, 32, 32), dtype=torch.uint8)

    g = torch.Generator().manual_seed(0)
    x = train_batch(u8, 32, g, rotation=0.0, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    y = eval_batch(u8, 32)
    # a flip may have been drawn: compare against both orientations per sample
    for i in range(2):
        assert torch.allclose(x[i], y[i], atol=1e-5) or torch.allclose(x[i], y[i].flip(-1), atol=1e-5)
