"""Shared fixtures. Everything runs on the CPU, offline, with small synthetic images.

Helpers and builders that test modules import live in helpers.py; test modules never import each other.
Markers (registered in pyproject.toml): slow, http, browser, gpu (skipped here when CUDA is not available).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import make_services, small_config

# Offline and isolated: no weight downloads, no cache outside the test run's temp folder.
os.environ["COVID_CLS_OFFLINE"] = "1"


def pytest_collection_modifyitems(config, items):
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu:
        return   # torch is imported only when a gpu test was collected
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in gpu:
            item.add_marker(skip)


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


@pytest.fixture(scope="session")
def fc_checkpoint(demo_data, tmp_path_factory) -> Path:
    """A ResNet18 · fc model trained on the demo data (seconds on a CPU)."""
    from covid_cls import fit

    return fit(small_config(demo_data, tmp_path_factory.mktemp("ckpt"), epochs=4))


@pytest.fixture(scope="session")
def three_class_data(tmp_path_factory) -> Path:
    """A synthetic 3-class set (covid: small bilateral opacities, normal, pneumonia: one large opacity), 96 px."""
    from covid_cls.synthetic import THREE_CLASSES, make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("three") / "data", n_per_class=24, size=96, seed=3,
                             classes=THREE_CLASSES)


@pytest.fixture(scope="session")
def three_class_checkpoint(three_class_data, tmp_path_factory) -> Path:
    """A ResNet18 · fc model trained on the 3-class set (seconds on a CPU)."""
    from covid_cls import fit

    return fit(small_config(three_class_data, tmp_path_factory.mktemp("ckpt3"), epochs=20))


@pytest.fixture
def svc(tmp_path):
    """The app's Services (no server) over an empty checkpoint folder, training on; test modules that need other
    settings define their own."""
    return make_services(tmp_path, training=True)
