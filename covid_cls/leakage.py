"""Near-duplicate images across dataset splits (leakage), by a DCT perceptual hash.

Why: public COVID X-ray collections list the same radiograph more than once (re-uploads, crops from
papers, different patient ids). A copy in both train and test inflates every test metric, and an evaluated
"external" set that shares images with the training set is not external. Exact file hashes miss copies that
were resized or recompressed; a perceptual hash does not.

The hash is the DCT pHash (Zauner, "Implementation and benchmarking of perceptual image hash functions",
2010; the phash.org algorithm): shrink to 32x32, 2-D DCT-II, keep the 8x8 lowest frequencies without the
DC row/column (coefficients [1:9, 1:9]), 1 bit per coefficient = above their median (here generalised to
a 4k x 4k thumbnail and k x k coefficients, k = ``hash_size``). Low frequencies
survive resizing and JPEG; dropping DC and thresholding at the median makes it insensitive to brightness
and contrast changes. Two images are near-duplicates when their hashes differ in few bits
(Hamming distance <= ``DEFAULT_MAX_DISTANCE``). The hash is 256 bits by default rather than the classic 64
because X-rays are too alike for 64 (see ``DEFAULT_HASH_SIZE``).

Pure numpy (no scipy): the resize is an exact area average written as two matrix products, and the DCT is
a matrix product with the orthonormal DCT-II basis.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

#: Hash side: 16 -> 16 x 16 = 256 bits (4 uint64 words per image). The classic pHash is 8 (64 bits), but chest
#: X-rays share one layout (body, lungs, mediastinum), so their 64 lowest frequencies agree a lot: on cxr-real two
#: DIFFERENT radiographs came as close as 6 bits of 64, while a copy resized, recompressed and brightness-shifted
#: drifted up to 8 — the two overlap. With 256 bits the gap is wide (measurements in tests/test_leakage.py).
DEFAULT_HASH_SIZE = 16

#: Hamming distance (bits of 256) at or below which two images count as the same radiograph. Measured on
#: cxr-real (1,492 X-rays decoded to 256 x 256, 1.1 M pairs): distinct images >= 46 bits apart, and the closest
#: (46-54) are follow-up studies of one patient, not copies; median 124. A copy resized to 0.7x, JPEG quality
#: 60 and brightness +-12 moved 4 bits (median) to 22 (max); harsher copies (0.35x, q30, +30; or -20 with
#: clipping) up to 28. 32 sits between, nearer the copies: a false pair costs a needless alarm on every scan.
DEFAULT_MAX_DISTANCE = 32


def _area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) averaging weights of an exact area (box) resize: output cell i covers input
    [i * n_in / n_out, (i + 1) * n_in / n_out), each input pixel weighted by its overlap."""
    edges = np.arange(n_out + 1) * (n_in / n_out)
    left, right = edges[:-1, None], edges[1:, None]
    px = np.arange(n_in)[None, :]
    overlap = np.clip(np.minimum(right, px + 1) - np.maximum(left, px), 0.0, None)
    return overlap / overlap.sum(axis=1, keepdims=True)


def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II basis (n, n): X = D @ x for a vector; D @ A @ D.T for a 2-D block."""
    k, i = np.arange(n)[:, None], np.arange(n)[None, :]
    d = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    d[0] /= np.sqrt(2.0)
    return d


def _as_stack(images) -> np.ndarray:
    if hasattr(images, "detach"):  # a torch tensor (the project's decoded cache)
        images = images.detach().cpu().numpy()
    a = np.asarray(images)
    if a.ndim == 4:
        if a.shape[1] != 1:
            raise ValueError(f"expected grayscale (N, 1, H, W), got {a.shape}")
        a = a[:, 0]
    elif a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise ValueError(f"expected (N, H, W), (N, 1, H, W) or (H, W) images, got shape {a.shape}")
    return a


def phash(images, hash_size: int = DEFAULT_HASH_SIZE, batch: int = 64) -> np.ndarray:
    """DCT perceptual hashes of grayscale images (N, H, W), (N, 1, H, W) or one (H, W): (N, hash_size**2 // 64) uint64.

    Images are uint8 (or any numeric range — only relative values matter), e.g. the decoded N x 1 x 256 x 256
    cache as a numpy array or torch tensor. The thumbnail is 4 x hash_size square (32 x 32 for the classic
    64-bit hash_size=8, as phash.org); coefficients [1:hash_size+1, 1:hash_size+1] row-major give the bits, the
    first in the most significant bit of word 0. ``hash_size`` must be a multiple of 8.
    """
    if hash_size < 8 or hash_size % 8:
        raise ValueError(f"hash_size must be a positive multiple of 8, not {hash_size}")
    a = _as_stack(images)
    n, h, w = a.shape
    grid = 4 * hash_size
    low = slice(1, hash_size + 1)  # lowest frequencies without the DC row and column (brightness, mean gradients)
    d = _dct_matrix(grid)[low]  # only the kept frequencies are ever computed
    left, right = d @ _area_matrix(h, grid), _area_matrix(w, grid).T @ d.T  # resize + DCT in one product a side
    words = hash_size * hash_size // 64
    out = np.empty((n, words), dtype=np.uint64)
    for s in range(0, n, batch):
        x = a[s:s + batch].astype(np.float64)
        # columns first as one big 2-D product (BLAS), then rows per image: left @ x @ right
        coef = np.matmul(left, (x.reshape(-1, w) @ right).reshape(len(x), h, -1)).reshape(len(x), -1)
        bits = coef > np.median(coef, axis=1, keepdims=True)
        out[s:s + batch] = np.packbits(bits, axis=1).view(">u8").astype(np.uint64)
    return out


def hash_to_hex(hashes: np.ndarray) -> list[str]:
    """Hashes as hex strings (e.g. to store the training set's hashes in a checkpoint card as JSON)."""
    h = _as_words(hashes)
    return ["".join(f"{int(v):016x}" for v in row) for row in h]


def hash_from_hex(strings: list[str]) -> np.ndarray:
    """Inverse of :func:`hash_to_hex`: (N, words) uint64."""
    if not len(strings):
        return np.zeros((0, 1), dtype=np.uint64)
    return np.array([[int(s[k:k + 16], 16) for k in range(0, len(s), 16)] for s in strings], dtype=np.uint64)


def _as_words(hashes: np.ndarray) -> np.ndarray:
    h = np.asarray(hashes, dtype=np.uint64)
    return h[:, None] if h.ndim == 1 else h


_POP8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _popcount(x: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(x).astype(np.uint8)
    return _POP8[x[..., None].view(np.uint8)].sum(axis=-1, dtype=np.uint8)


def hamming(hashes_a: np.ndarray, hashes_b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) matrix of Hamming distances (bits) between two hash arrays (XOR + popcount).

    Hashes are (N,) uint64 or (N, words) uint64 as :func:`phash` returns.
    """
    a, b = _as_words(hashes_a), _as_words(hashes_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"hashes of different sizes: {a.shape[1]} vs {b.shape[1]} words")
    return _popcount(a[:, None, :] ^ b[None, :, :]).sum(axis=-1, dtype=np.uint16)


def near_duplicates(hashes_a: np.ndarray, hashes_b: np.ndarray | None = None,
                    max_distance: int | None = None, chunk: int = 512) -> list[tuple[int, int, int]]:
    """Pairs (i, j, distance) with Hamming distance <= max_distance, sorted by distance then indices.

    With ``hashes_b``: i indexes a, j indexes b (e.g. test vs train). Without: pairs within ``hashes_a``,
    i < j (an image is not its own duplicate, and each pair is listed once). Rows are processed in chunks so
    memory stays O(chunk x len(b)). ``max_distance`` defaults to ``DEFAULT_MAX_DISTANCE``, which was measured for
    the default 256-bit hash only; other hash sizes must give it.
    """
    a = _as_words(hashes_a)
    within = hashes_b is None
    b = a if within else _as_words(hashes_b)
    max_distance = _default_distance(a, max_distance)
    found = []
    for s in range(0, len(a), chunk):
        dist = hamming(a[s:s + chunk], b)
        ii, jj = np.nonzero(dist <= max_distance)
        if within:
            keep = jj > ii + s
            ii, jj = ii[keep], jj[keep]
        found += [(int(i + s), int(j), int(dist[i, j])) for i, j in zip(ii, jj)]
    return sorted(found, key=lambda t: (t[2], t[0], t[1]))


def _default_distance(h: np.ndarray, max_distance: int | None) -> int:
    if max_distance is not None:
        return int(max_distance)
    if h.shape[1] * 64 != DEFAULT_HASH_SIZE ** 2:
        raise ValueError(f"DEFAULT_MAX_DISTANCE was measured for {DEFAULT_HASH_SIZE ** 2}-bit hashes; "
                         f"give max_distance for {h.shape[1] * 64}-bit ones")
    return DEFAULT_MAX_DISTANCE


def split_duplicates(hashes: Mapping[str, np.ndarray], max_distance: int | None = None,
                     within: bool = False) -> list[tuple[str, int, str, int, int]]:
    """Near-duplicates between every pair of splits: (split_a, i, split_b, j, distance).

    ``hashes``: {split name: hashes of its images}, e.g. {"train": ..., "validation": ..., "test": ...}.
    Pairs across splits are leakage; ``within=True`` also lists pairs inside one split (repeated images
    weigh twice in training or evaluation — worth knowing, but not leakage).
    """
    names = list(hashes)
    out = []
    for x, na in enumerate(names):
        for nb in names[x:]:
            if na == nb:
                if within:
                    out += [(na, i, na, j, d) for i, j, d in near_duplicates(hashes[na], None, max_distance)]
            else:
                out += [(na, i, nb, j, d) for i, j, d in near_duplicates(hashes[na], hashes[nb], max_distance)]
    return out


def dataset_leakage(root, cache_size: int = 256, decoded: Mapping | None = None, limit: int = 50,
                    roots=None) -> dict:
    """Near-duplicate images across the splits of a dataset folder: what Scan reports before training.

    Decodes through ``DecodedCache`` (decode once: training reuses the same squares) unless ``decoded``
    ({split: DecodedSplit}) is given; ``roots`` as in ``scan_dataset`` (the app's allowed folders). Returns
    ``{"pairs": [{"a": "train/x.png", "b": "test/y.png", "distance": d}, ...], "count": n, "train_hashes":
    [...]}``; a test image that is a copy of a training
    image makes every metric look better than it is.
    """
    if decoded is None:
        from .data import DecodedCache, scan_dataset

        info = scan_dataset(root, roots=roots)
        cache = DecodedCache(cache_size, roots=roots)
        decoded = {k: cache.get(s, info.root) for k, s in info.splits.items()}
    hashes = {k: phash(d.images) for k, d in decoded.items()}
    pairs = split_duplicates(hashes)
    shown = [{"a": f"{a}: {decoded[a].files[i]}", "b": f"{b}: {decoded[b].files[j]}", "distance": d}
             for a, i, b, j, d in pairs[:limit]]
    return {"count": len(pairs), "pairs": shown,
            "train_hashes": hash_to_hex(hashes["train"]) if "train" in hashes else []}
