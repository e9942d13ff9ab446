"""The decoded cache on disk, read through a memory map when a split is larger than COVID_CLS_CACHE_MEMORY_MB
(issue 13 #3): the same images as the in-RAM decode, nothing half-written ever read, bounded decoding memory,
and training from it gives the same model as training from RAM."""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from covid_cls import data
from covid_cls.data import DecodedCache, DecodedSplit, scan_dataset
from covid_cls.synthetic import make_demo_dataset

from helpers import small_config

TINY_MB = "0.001"   # COVID_CLS_CACHE_MEMORY_MB: every split here is larger, so every split is memory-mapped


@pytest.fixture(scope="module")
def hundreds(tmp_path_factory):
    """400 small images (train 200, validation 100, test 100) and one file that does not decode."""
    root = make_demo_dataset(tmp_path_factory.mktemp("hundreds") / "d", n_per_class=100, size=64, seed=3)
    (root / "train" / "normal" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    return root


@pytest.fixture
def tiny(tmp_path):
    return make_demo_dataset(tmp_path / "d", n_per_class=4, size=48)


@pytest.fixture(autouse=True)
def _fresh_memory():
    DecodedCache.clear_memory()
    yield
    DecodedCache.clear_memory()


def test_the_memory_mapped_cache_holds_the_in_ram_decode_bit_for_bit(hundreds, tmp_path, monkeypatch):
    split = scan_dataset(hundreds).splits["train"]
    ram = DecodedCache(64, cache_dir=tmp_path / "unused", workers=2, use_disk=False).get(split, hundreds)
    assert not ram.mapped and not (tmp_path / "unused").exists()
    DecodedCache.clear_memory()
    monkeypatch.setenv("COVID_CLS_CACHE_MEMORY_MB", TINY_MB)
    cache = DecodedCache(64, cache_dir=tmp_path / "c", workers=2)
    disk = cache.get(split, hundreds)
    assert disk.mapped and "read through a memory map" in cache.info[0] and not cache.notes
    assert torch.equal(disk.images, ram.images) and torch.equal(disk.labels, ram.labels)
    assert disk.files == ram.files and disk.skipped == ram.skipped == [("train/normal/broken.png", ram.skipped[0][1])]
    # the file keeps a row per listed file (the broken one's is an unused hole at the end); the index says how many
    [npy] = (tmp_path / "c").glob("decoded-*.npy")
    index = json.loads(npy.with_suffix(".json").read_text())
    assert index["shape"] == [201, 1, 64, 64] and index["rows"] == len(disk) == 200
    # within COVID_CLS_CACHE_MEMORY_MB the same entry is read into RAM, not mapped
    monkeypatch.delenv("COVID_CLS_CACHE_MEMORY_MB")
    DecodedCache.clear_memory()
    again = DecodedCache(64, cache_dir=tmp_path / "c", workers=2).get(split, hundreds)
    assert not again.mapped and torch.equal(again.images, ram.images)


def _truncate(npy):
    with open(npy, "r+b") as f:
        f.truncate(npy.stat().st_size // 2)


def _reshape(npy):
    np.save(npy, np.zeros((8, 1, 16, 16), np.uint8))   # 16 px squares where 32 px were asked for


def _other_key(npy):
    meta = npy.with_suffix(".json")
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "key": "0123456789abcdef"}))


def _other_writers_images(npy):
    """Another process built the same entry meanwhile: same shape, other rows, its file renamed over this one."""
    other = npy.with_name("other.npy")
    np.save(other, np.load(npy)[::-1].copy())
    other.replace(npy)


@pytest.mark.parametrize("breakage", [lambda npy: npy.with_suffix(".json").unlink(), _truncate, _reshape,
                                      _other_key, _other_writers_images],
                         ids=["no index", "truncated", "wrong shape", "another key", "another writer's images"])
def test_a_half_written_or_foreign_entry_is_never_read_but_rebuilt(tiny, tmp_path, monkeypatch, breakage):
    monkeypatch.setenv("COVID_CLS_CACHE_MEMORY_MB", TINY_MB)
    split = scan_dataset(tiny).splits["train"]
    cache = DecodedCache(32, cache_dir=tmp_path / "c", workers=1)
    good = cache.get(split, tiny).images.clone()
    [npy] = (tmp_path / "c").glob("decoded-*.npy")
    breakage(npy)
    DecodedCache.clear_memory()
    calls = []
    real = data._decode_one
    monkeypatch.setattr(data, "_decode_one", lambda *a: calls.append(a) or real(*a))
    assert torch.equal(cache.get(split, tiny).images, good) and len(calls) == 8   # decoded again
    DecodedCache.clear_memory()
    calls.clear()
    assert torch.equal(cache.get(split, tiny).images, good) and calls == []   # and the rebuilt entry is a hit


def test_a_killed_writers_temporary_file_is_removed_and_a_mapped_entry_is_never_pruned(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("COVID_CLS_CACHE_MEMORY_MB", TINY_MB)
    info = scan_dataset(tiny)
    cache = DecodedCache(32, cache_dir=tmp_path / "c", workers=1)
    train = cache.get(info.splits["train"], tiny)
    assert train.mapped
    dead = tmp_path / "c" / ".decoded-0123456789abcdef.npy.99999999.abcd1234.tmp"   # no such pid
    live = tmp_path / "c" / f".decoded-0123456789abcdef.npy.{os.getpid()}.abcd1234.tmp"
    for p in (dead, live):
        p.write_bytes(b"x")
        os.utime(p, (time.time() - 3600, time.time() - 3600))
    monkeypatch.setenv("COVID_CLS_CACHE_MAX_MB", "0.001")   # far below one entry
    cache.get(info.splits["test"], tiny)   # writing it prunes
    assert not dead.exists() and live.exists()
    assert len(list((tmp_path / "c").glob("decoded-*.npy"))) == 2   # the mapped train entry stayed


def test_mapped_splits_do_not_count_as_memory(monkeypatch):
    monkeypatch.setenv("COVID_CLS_CACHE_MEMORY_MB", "1")
    big = DecodedSplit(torch.zeros(1000, 1, 64, 64, dtype=torch.uint8), torch.zeros(1000), [], [], mapped=True)
    for key, split in (("mapped", big), ("a", DecodedSplit(torch.zeros(100, 1, 64, 64, dtype=torch.uint8),
                                                            torch.zeros(100), [], []))):
        with DecodedCache._lock:
            DecodedCache._memory[key] = split
            DecodedCache._trim_memory()
    assert list(DecodedCache._memory) == ["mapped", "a"]   # 4 MB mapped + 0.4 MB in RAM: within 1 MB
    for i in range(data.MAPPED_KEPT):   # but open maps are bounded in number: each holds its file
        with DecodedCache._lock:
            DecodedCache._memory[f"m{i}"] = big
            DecodedCache._trim_memory()
    assert list(DecodedCache._memory) == ["a"] + [f"m{i}" for i in range(data.MAPPED_KEPT)]


def test_decoding_keeps_a_bounded_number_of_images_in_flight():
    started, lock, window = [0], threading.Lock(), 6

    def fn(i):
        with lock:
            started[0] += 1
        return i

    with ThreadPoolExecutor(4) as pool:
        for k, res in enumerate(data._bounded_map(pool, fn, range(500), window)):
            assert res == k and started[0] <= k + window   # never more than `window` ahead of the consumer
            if k % 50 == 0:
                time.sleep(0.01)   # a slow consumer (the disk): the decoders wait, they do not pile up results
    assert started[0] == 500


def test_the_cache_decodes_through_the_bounded_window(tiny, tmp_path, monkeypatch):
    seen = []
    real = data._bounded_map

    def spy(pool, fn, items, window):
        seen.append(window)
        return real(pool, fn, items, window)

    monkeypatch.setattr(data, "_bounded_map", spy)
    DecodedCache(32, cache_dir=tmp_path / "c", workers=3).get(scan_dataset(tiny).splits["train"], tiny)
    assert seen == [data.DECODE_WINDOW * 3]


def test_layout_features_in_chunks_equal_the_whole_stack():
    from covid_cls.ood import layout_features

    u8 = torch.randint(0, 256, (10, 1, 24, 24), dtype=torch.uint8)
    assert torch.equal(layout_features(u8, chunk=3), layout_features(u8, chunk=100))
    assert layout_features(u8[:0]).shape == (0, 80)


def _train(data_dir, out, cache_dir, monkeypatch, memory_mb):
    from covid_cls import fit
    from covid_cls.checkpoints import load_checkpoint

    DecodedCache.clear_memory()
    monkeypatch.setenv("COVID_CLS_CACHE", str(cache_dir))
    monkeypatch.setenv("COVID_CLS_CACHE_MEMORY_MB", memory_mb)
    events = []
    path = fit(small_config(data_dir, out, level="partial", epochs=1, image_size=32, cache_size=48, batch_size=32),
               on_event=events.append)
    logs = [e.message for e in events if e.type == "log"]
    return load_checkpoint(path), logs


def test_training_from_the_memory_map_gives_the_same_model_as_from_ram(hundreds, tmp_path, monkeypatch):
    mapped, logs = _train(hundreds, tmp_path / "a", tmp_path / "ca", monkeypatch, TINY_MB)
    assert sum("read through a memory map" in m for m in logs) == 3   # train, validation and test
    ram, logs = _train(hundreds, tmp_path / "b", tmp_path / "cb", monkeypatch, "2048")
    assert not any("memory map" in m for m in logs)
    timeless = lambda card: [{**e, "seconds": 0, "train": {**e["train"], "images_per_s": 0}}  # noqa: E731
                             for e in card.history]
    assert mapped.card.metrics == ram.card.metrics and timeless(mapped.card) == timeless(ram.card)
    assert mapped.state.keys() == ram.state.keys()
    assert all(torch.equal(mapped.state[k], ram.state[k]) for k in ram.state)


@pytest.mark.gpu
def test_on_cuda_images_beyond_the_budget_stay_on_the_host_and_only_batches_move(monkeypatch):
    from covid_cls import engine
    from covid_cls.runtime import Runtime

    rt = Runtime.create("cuda")
    d = DecodedSplit(torch.randint(0, 256, (40, 1, 16, 16), dtype=torch.uint8), torch.arange(40) % 2,
                     [f"f{i}" for i in range(40)], [])
    monkeypatch.setattr(engine, "GPU_IMAGES_SHARE", 0.0)
    placed, note = engine._place({"train": d}, rt)
    x, y = placed["train"]
    assert x.device.type == "cpu" and y.device.type == "cuda" and "stay in host memory" in note
    order = torch.randperm(40).to(y.device)
    got = list(engine._Batches(x, y, 16).steps(order))
    assert all(xb.device == y.device == yb.device for xb, yb, _ in got)
    assert torch.equal(torch.cat([xb for xb, _, _ in got]).cpu(), d.images[order.cpu()])
    monkeypatch.setattr(engine, "GPU_IMAGES_SHARE", 0.5)
    placed, note = engine._place({"train": d}, rt)
    assert placed["train"][0].device.type == "cuda" and note == ""


def test_a_disk_too_small_for_the_cache_is_said_before_decoding_and_the_split_decodes_into_ram(
        tiny, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9, 10**6))   # 1 MB free
    calls = []
    real = data._decode_one
    monkeypatch.setattr(data, "_decode_one", lambda *a: calls.append(a) or real(*a))
    cache = DecodedCache(32, cache_dir=tmp_path / "c", workers=1)
    d = cache.get(scan_dataset(tiny).splits["train"], tiny)
    assert len(d) == 8 and not d.mapped and len(calls) == 8   # decoded once, into RAM
    assert "the disk is full" in cache.notes[0] and "training goes on without it" in cache.notes[0]
    assert not list((tmp_path / "c").iterdir())
