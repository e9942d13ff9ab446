"""Near-duplicate detection (covid_cls.leakage): the hash, the distance, planted copies, and real X-rays.

A planted copy = the same image resized (0.7x), JPEG-recompressed (quality 60) and brightness-shifted, then
decoded back to 256 x 256 the way the project decodes every image.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from covid_cls import leakage
from covid_cls.leakage import (
    DEFAULT_MAX_DISTANCE,
    hamming,
    hash_from_hex,
    hash_to_hex,
    near_duplicates,
    phash,
    split_duplicates,
)
from covid_cls.synthetic import synthetic_xray

CXR_REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "cxr-real"


def decode(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("L").resize((256, 256)))


def planted_copy(a: np.ndarray, scale: float = 0.7, quality: int = 60, shift: int = 12) -> np.ndarray:
    im = Image.fromarray(a)
    im = im.resize((int(im.width * scale), int(im.height * scale)), Image.BILINEAR)
    arr = np.clip(np.asarray(im).astype(int) + shift, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=quality)
    buf.seek(0)
    return decode(Image.open(buf))


@pytest.fixture(scope="module")
def synthetic_images() -> np.ndarray:
    return np.stack([synthetic_xray(256, infected=bool(i % 2), seed=i, n_lesions=1 + i % 3)[0] for i in range(24)])


# ---------------------------------------------------------------------------------------------------
# the hash itself
# ---------------------------------------------------------------------------------------------------


def test_hash_shapes_and_input_layouts(synthetic_images):
    h = phash(synthetic_images)
    assert h.dtype == np.uint64 and h.shape == (24, 4)  # 256 bits
    assert phash(synthetic_images, hash_size=8).shape == (24, 1)  # the classic 64-bit pHash
    assert (phash(torch.from_numpy(synthetic_images[:, None])) == h).all()  # the decoded cache: N x 1 x S x S
    assert (phash(synthetic_images[3]) == h[3:4]).all()
    assert phash(synthetic_images[:, :200, :]).shape == (24, 4)  # not square, not a multiple of the grid
    assert (np.bitwise_count(h).sum(axis=1) == 128).all()  # median threshold: half the bits set
    with pytest.raises(ValueError):
        phash(synthetic_images, hash_size=12)


def test_hash_ignores_brightness_and_contrast():
    img = synthetic_xray(256, seed=5)[0].astype(np.float64)
    assert (phash(img * 0.6 + 40) == phash(img)).all()  # affine intensity change: DC dropped, median invariant


def test_dct_and_resize_matrices():
    d = leakage._dct_matrix(32)
    assert np.allclose(d @ d.T, np.eye(32))
    scipy_fft = pytest.importorskip("scipy.fft")
    x = np.random.default_rng(0).random(32)
    assert np.allclose(d @ x, scipy_fft.dct(x, norm="ortho"))
    r = leakage._area_matrix(256, 64)
    img = np.random.default_rng(1).random((256, 256))
    assert np.allclose(r @ img @ r.T, img.reshape(64, 4, 64, 4).mean(axis=(1, 3)))  # exact block mean


def test_hamming_and_popcount_fallback():
    rng = np.random.default_rng(2)
    a = rng.integers(0, 2**63, size=(5, 4), dtype=np.uint64)
    b = rng.integers(0, 2**63, size=(7, 4), dtype=np.uint64)
    brute = np.array([[sum(bin(int(x) ^ int(y)).count("1") for x, y in zip(ra, rb)) for rb in b] for ra in a])
    assert (hamming(a, b) == brute).all()
    x = a[:, None, :] ^ b[None, :, :]
    assert (leakage._POP8[x[..., None].view(np.uint8)].sum(axis=-1) == np.bitwise_count(x)).all()
    assert (hash_from_hex(hash_to_hex(a)) == a).all()


def test_near_duplicates_within_and_across_sets():
    h = np.array([[0], [1], [3], [7 << 40]], dtype=np.uint64)  # 0-1: 1 bit, 0-2: 2, 1-2: 1, 3: >= 3 from all
    assert near_duplicates(h, max_distance=1) == [(0, 1, 1), (1, 2, 1)]  # i < j, never (i, i)
    assert near_duplicates(h, h[:1], max_distance=0) == [(0, 0, 0)]  # across sets, i == j is a real pair
    assert near_duplicates(h[:3], chunk=1, max_distance=2) == near_duplicates(h[:3], max_distance=2)
    with pytest.raises(ValueError):
        near_duplicates(h)  # the default distance belongs to 256-bit hashes
    hs = {"train": np.zeros((2, 4), np.uint64), "test": np.ones((1, 4), np.uint64)}
    assert split_duplicates(hs) == [("train", 0, "test", 0, 4), ("train", 1, "test", 0, 4)]
    assert ("train", 0, "train", 1, 0) in split_duplicates(hs, within=True)


# ---------------------------------------------------------------------------------------------------
# planted copies
# ---------------------------------------------------------------------------------------------------


def check_planted(originals: np.ndarray) -> list[int]:
    """Each planted copy must be found, and only as a copy of its own original; returns the copy distances."""
    h = phash(originals)
    dists = []
    for shift in (12, -12):
        copies = phash(np.stack([planted_copy(a, shift=shift) for a in originals]))
        d = hamming(copies, h).astype(int)
        assert (d.argmin(axis=1) == np.arange(len(h))).all()
        pairs = near_duplicates(copies, h)
        assert sorted((i, j) for i, j, _ in pairs) == [(k, k) for k in range(len(h))]
        dists += np.diag(d).tolist()
    return dists


def test_planted_copies_of_synthetic_xrays_are_found_and_nothing_else(synthetic_images):
    check_planted(synthetic_images)
    assert near_duplicates(phash(synthetic_images)) == []


def real_images(every: int = 1) -> tuple[list[Path], np.ndarray]:
    paths = sorted(CXR_REAL.glob("*/*/*.jpg"))[::every]
    return paths, np.stack([decode(Image.open(p)) for p in paths])


@pytest.mark.slow  # decodes 1,492 JPEGs (~6 s)
@pytest.mark.skipif(not CXR_REAL.is_dir(), reason="cxr-real not available")
def test_no_false_pair_among_real_xrays_and_planted_real_copies_are_found():
    paths, imgs = real_images()
    h = phash(imgs)
    # measured (2026-11): distinct images >= 46 bits apart, the closest being follow-up studies of one patient
    pairs = near_duplicates(h)
    assert pairs == [], [(paths[i].relative_to(CXR_REAL), paths[j].relative_to(CXR_REAL), d) for i, j, d in pairs]
    splits = {s: h[[k for k, p in enumerate(paths) if p.parts[-3] == s]] for s in ("train", "validation", "test")}
    assert split_duplicates(splits, within=True) == []
    dists = check_planted(imgs[::10])  # measured: median 4, max 22 bits
    assert max(dists) <= DEFAULT_MAX_DISTANCE


def test_dataset_leakage_names_a_planted_cross_split_copy(tmp_path):
    """What Scan and fit report: a training image resized and recompressed into test is found, by file."""
    import io
    import shutil

    from PIL import Image

    from covid_cls import make_demo_dataset
    from covid_cls.leakage import dataset_leakage

    root = make_demo_dataset(tmp_path / "d", n_per_class=8, size=96, seed=5)
    src = sorted((root / "train" / "normal").glob("*.png"))[0]
    with Image.open(src) as im:
        buf = io.BytesIO()
        im.convert("L").resize((70, 70)).save(buf, "JPEG", quality=60)
    (root / "test" / "normal" / "copy.jpg").write_bytes(buf.getvalue())
    found = dataset_leakage(root, cache_size=96)
    assert found["count"] >= 1
    assert any("copy.jpg" in p["a"] + p["b"] and src.name in p["a"] + p["b"] for p in found["pairs"])
    assert len(found["train_hashes"]) == 16
    (root / "test" / "normal" / "copy.jpg").unlink()
    shutil.rmtree(tmp_path / "d" / "masks", ignore_errors=True)
    assert dataset_leakage(root, cache_size=96)["count"] == 0
