"""The decoding worker pool (covid_cls/sandbox.py): limits enforced, overruns killed and replaced, the same
contract as ``load_image``.

The hostile-file corpus and the per-upload cost bounds are in tests/test_bad_inputs.py (section 4).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from covid_cls import sandbox
from covid_cls.imaging import ImageError, load_image, load_image_bounded
from covid_cls.sandbox import DecodePool

from helpers import REJECTS, dicom_rejections, encode, make_dicom, noise, ramp

pytestmark = pytest.mark.skipif(os.name != "posix", reason="worker processes need POSIX pipes")


@pytest.fixture(scope="module")
def pool():
    with DecodePool(2, timeout_s=10.0, cpu_s=2.0, memory_mb=512) as p:
        yield p


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is gone for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _png(seed: int = 0, size: int = 64) -> bytes:
    return encode(Image.fromarray(noise(size, size, 3, seed=seed)), "PNG")


# ---------------------------------------------------------------------------------------------
# Same contract as load_image
# ---------------------------------------------------------------------------------------------


GOOD = {
    "png-rgb": lambda: _png(1),
    "png-16bit": lambda: encode(Image.fromarray(ramp(40, 48, 0, 65535, np.uint16)), "PNG"),
    "jpeg-progressive": lambda: encode(Image.fromarray(noise(48, 40, 3)), "JPEG", progressive=True),
    "webp": lambda: encode(Image.fromarray(noise(24, 24, 4)), "WEBP", lossless=True),
    "dicom-16bit-window": lambda: make_dicom(ramp(20, 24, 100, 4000, np.uint16), RescaleSlope=2,
                                             RescaleIntercept=-1024, WindowCenter=1500, WindowWidth=3000),
    "dicom-monochrome1": lambda: make_dicom(ramp(20, 24, 0, 255, np.uint8), photometric="MONOCHROME1"),
}


@pytest.mark.parametrize("name", list(GOOD))
def test_decoded_exactly_like_load_image(pool, name):
    data = GOOD[name]()
    got, ref = pool.load(data), load_image(data)
    assert got.mode == "L" and got.size == ref.size
    assert got.tobytes() == ref.tobytes()
    assert got.info == ref.info   # the colourfulness travels back too


@pytest.mark.parametrize("name", list(REJECTS))
def test_refused_with_the_same_message(pool, name, tmp_path):
    make, filename, _ = REJECTS[name]
    data = make()
    for source in (data, tmp_path / filename):
        if not isinstance(source, bytes):
            source.write_bytes(data)
        with pytest.raises(ImageError) as ref:
            load_image(source)
        with pytest.raises(ImageError) as got:
            pool.load(source)
        assert type(got.value) is ImageError and str(got.value) == str(ref.value)


@pytest.mark.parametrize("name", ["no-pixel-data", "jpeg2000-garbage", "huge-declared-size"])
def test_dicom_refusals_match(pool, name):
    data, _ = dicom_rejections()[name]
    with pytest.raises(ImageError) as ref:
        load_image(data)
    with pytest.raises(ImageError) as got:
        pool.load(data)
    assert str(got.value) == str(ref.value)


@pytest.mark.parametrize("bad", [None, 42, "", "/no/such/file.png"])
def test_odd_sources_are_refused_without_a_worker(bad):
    p = DecodePool(1)
    with pytest.raises(ImageError) as ref:
        load_image(bad)
    with pytest.raises(ImageError) as got:
        p.load(bad)
    assert str(got.value) == str(ref.value)
    assert p.worker_pids() == [] and p._state.live == 0   # nothing was started for these
    p.close()


def test_decoded_inputs_are_converted_in_process():
    p = DecodePool(1)
    arr = ramp(16, 16, 0, 255, np.uint8)
    assert p.load(arr).tobytes() == load_image(arr).tobytes()
    assert p._state.live == 0
    p.close()


def test_load_image_bounded_uses_the_shared_pool(tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(_png(3))
    assert load_image_bounded(path).tobytes() == load_image(path).tobytes()
    assert sandbox.default_pool() is sandbox.default_pool()


# ---------------------------------------------------------------------------------------------
# Limits: each overrun kills that worker, and the pool goes on
# ---------------------------------------------------------------------------------------------


def test_pool_is_lazy():
    p = DecodePool(2)
    assert p._state.live == 0 and p.worker_pids() == []
    p.load(_png())
    assert p._state.live == 1      # one request, one worker
    p.close()


def test_a_hanging_decode_is_killed_at_the_timeout_and_the_pool_goes_on():
    with DecodePool(1, timeout_s=1.0) as p:
        p.load(_png())
        (pid,) = p.worker_pids()
        t0 = time.monotonic()
        with pytest.raises(ImageError, match=r"took longer than 1 s to decode") as info:
            p._run_test_task("sleep", 60)
        assert time.monotonic() - t0 < 5
        assert info.value.stats.outcome == "timeout"
        deadline = time.monotonic() + 5
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(pid), "the stuck worker must be killed"
        img = p.load(_png(2))          # the next request is served (by a fresh worker)
        assert img.mode == "L"
        assert p.worker_pids() and p.worker_pids() != [pid]


def test_cpu_time_is_limited():
    with DecodePool(1, cpu_s=0.5, timeout_s=30) as p:
        with pytest.raises(ImageError, match=r"more than 0.5 s of processor time") as info:
            p._run_test_task("burn", 20)
        stats = info.value.stats
        assert stats.outcome == "cpu" and stats.cpu_s < 1.0, stats
        assert p.load(_png()).mode == "L"


def test_memory_is_limited():
    with DecodePool(1, memory_mb=128) as p:
        assert p._run_test_task("allocate", 64).peak_mb >= 60      # under the limit: fine, and measured
        with pytest.raises(ImageError, match=r"needed more than 128 MB of memory") as info:
            p._run_test_task("allocate", 400)
        assert info.value.stats.outcome == "memory"
        assert p.load(_png()).mode == "L"


def test_a_crashing_decoder_gives_a_message_and_is_replaced():
    with DecodePool(1) as p:
        with pytest.raises(ImageError, match="stopped unexpectedly"):
            p._run_test_task("crash", 0)
        assert p.load(_png()).mode == "L"


def test_a_worker_killed_while_idle_is_replaced_transparently():
    with DecodePool(1) as p:
        p.load(_png())
        (pid,) = p.worker_pids()
        os.kill(pid, 9)
        time.sleep(0.2)
        assert p.load(_png(1)).mode == "L"


def test_four_threads_share_two_workers():
    datas = [_png(i, 96) for i in range(16)]
    refs = [load_image(d).tobytes() for d in datas]
    with DecodePool(2) as p:
        peak = 0
        lock = threading.Lock()

        def one(i: int) -> bytes:
            nonlocal peak
            out = p.load(datas[i]).tobytes()
            with lock:
                peak = max(peak, p._state.live)
            return out

        with ThreadPoolExecutor(4) as ex:
            got = list(ex.map(one, range(16)))
        assert got == refs
        assert peak <= 2 and len(p.worker_pids()) <= 2


@pytest.mark.slow   # ~2 s: a deliberately slow decode
def test_a_slow_request_does_not_block_the_other_worker():
    with DecodePool(2, timeout_s=1.5) as p:
        with ThreadPoolExecutor(2) as ex:
            list(ex.map(p.load, [_png(1), _png(2)]))   # both workers started
            hang = ex.submit(lambda: pytest.raises(ImageError, p._run_test_task, "sleep", 60))
            time.sleep(0.1)
            t0 = time.monotonic()
            assert p.load(_png(5)).mode == "L"
            assert time.monotonic() - t0 < 1.0, "served by the other worker, not after the timeout"
            hang.result()


def test_close_stops_the_workers():
    p = DecodePool(2)
    with ThreadPoolExecutor(2) as ex:
        list(ex.map(p.load, [_png(1, 256), _png(2, 256)]))
    pids = p.worker_pids()
    assert pids
    p.close()
    deadline = time.monotonic() + 5
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in pids)
    with pytest.raises(ImageError, match="shutting down"):
        p.load(_png())


@pytest.mark.slow
def test_idle_workers_are_retired():
    p = DecodePool(1, idle_ttl_s=1.0)
    p.load(_png())
    (pid,) = p.worker_pids()
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid) and p.worker_pids() == []
    assert p.load(_png()).mode == "L"    # and a new one starts on demand
    p.close()


def test_workers_env(monkeypatch):
    monkeypatch.setenv("COVID_CLS_DECODE_WORKERS", "3")
    assert DecodePool().workers == 3
    monkeypatch.setenv("COVID_CLS_DECODE_WORKERS", "lots")
    assert DecodePool().workers == sandbox.DEFAULT_WORKERS


def test_in_process_fallback_is_logged(monkeypatch, caplog):
    monkeypatch.setenv("COVID_CLS_DECODE_IN_PROCESS", "1")
    monkeypatch.setattr(sandbox, "_warned_in_process", False)
    p = DecodePool(1)
    with caplog.at_level(logging.WARNING, logger="covid_cls.sandbox"):
        img, err, stats = p.decode(_png())
    assert img is not None and err is None and stats is None and p._state.live == 0
    assert "in-process" in caplog.text


def test_spawn_failure_falls_back_in_process(monkeypatch, caplog):
    def broken():
        raise OSError("no processes here")

    monkeypatch.setattr(sandbox, "_spawn_worker", broken)
    monkeypatch.setattr(sandbox, "_warned_in_process", False)
    p = DecodePool(1)
    with caplog.at_level(logging.WARNING, logger="covid_cls.sandbox"):
        assert p.load(_png()).mode == "L"
    assert "could not be started" in caplog.text and p._state.live == 0
    p.close()
