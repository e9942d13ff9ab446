"""Shared fixtures. Everything runs on the CPU, offline, with small synthetic images."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Offline and isolated: no weight downloads, no cache outside the test run's temp folder.
os.environ["COVID_CLS_OFFLINE"] = "1"

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CXR_REAL = SHARED_DATA / "cxr-real"
CXR_FULLRES = SHARED_DATA / "cxr-fullres"


@pytest.fixture(autouse=True, scope="session")
def _isolated_caches(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("COVID_CLS_CACHE", str(tmp_path_factory.mktemp("decoded")))
    mp.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch_home")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """A small synthetic ImageFolder set (96 px)."""
    from covid_cls import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "data", n_per_class=24, size=96, seed=1)


def small_config(data: Path, out: Path, **over):
    from covid_cls import TrainConfig

    kw = dict(data_dir=str(data), arch="resnet18", level="fc", epochs=3, image_size=64, cache_size=96,
              weights="none", optimizer="adam", lr=1e-3, batch_size=16, out_dir=str(out), num_workers=2)
    kw.update(over)
    return TrainConfig(**kw)


@pytest.fixture(scope="session")
def fc_checkpoint(demo_data, tmp_path_factory) -> Path:
    """A ResNet18 · fc model trained on the demo data (seconds on a CPU)."""
    from covid_cls import fit

    return fit(small_config(demo_data, tmp_path_factory.mktemp("ckpt"), epochs=4))
