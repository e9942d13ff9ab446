"""Hugging Face Hub in and out (issue 12 #1), without the network.

What is tested for real: the files a push would upload (an ``HfApi``-like fake copies the folder it is given),
the model card's metadata parsed back with huggingface_hub's own ``ModelCard.load`` / ``metadata_load``,
installing a snapshot laid out as the Hub lays it (verified like any checkpoint), the offline path through the
real ``snapshot_download`` (local cache only), the app's background pulls and the Models tab note, and the app
serving a Hub model in Predict without any local training. conftest sets COVID_CLS_OFFLINE=1, so even a bug
could not reach the Hub from here.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
from PIL import Image

from covid_cls import hub
from covid_cls.__main__ import main
from covid_cls.card import Card
from covid_cls.checkpoints import card_path, list_checkpoints, load_checkpoint, read_card
from covid_cls.errors import CheckpointError

from helpers import copy_checkpoint, launched_app

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeApi:
    """What ``hub.upload`` calls on an ``HfApi``: create_repo and upload_folder; the folder is copied aside."""

    def __init__(self, remote: Path):
        self.remote, self.calls = remote, []

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, **kw):
        self.calls.append(("upload_folder", repo_id, kw))
        shutil.copytree(folder_path, self.remote / repo_id, dirs_exist_ok=True)


@pytest.fixture(scope="module")
def pushed(fc_checkpoint, tmp_path_factory):
    """The repository a push of the demo checkpoint would create, as the Hub would hold it."""
    api = FakeApi(tmp_path_factory.mktemp("remote"))
    url = hub.push(fc_checkpoint, "alice/resnet18-demo", private=True, api=api)
    return url, api, api.remote / "alice/resnet18-demo"


def hub_cache(repo_folder: Path, root: Path, repo_id: str = "alice/resnet18-demo") -> Path:
    """Lay ``repo_folder``'s files out as huggingface_hub's cache does: models--USER--NAME/snapshots/<commit>/,
    refs/main. Returns the models--USER--NAME folder."""
    cached = root / ("models--" + repo_id.replace("/", "--"))
    snap = cached / "snapshots" / COMMIT
    shutil.copytree(repo_folder, snap)
    (cached / "refs").mkdir(parents=True)
    (cached / "refs" / "main").write_text(COMMIT)
    return cached


def xray(tmp_path: Path) -> Path:
    from covid_cls.synthetic import synthetic_xray

    path = tmp_path / "xray.png"
    Image.fromarray(synthetic_xray(256, infected=True, seed=3)[0]).save(path)
    return path


# ---------------------------------------------------------------------------------------------------
# push
# ---------------------------------------------------------------------------------------------------

def test_push_uploads_weights_card_and_model_card(pushed, fc_checkpoint):
    url, api, remote = pushed
    assert url == "https://huggingface.co/alice/resnet18-demo"
    assert [c[0] for c in api.calls] == ["create_repo", "upload_folder"]
    assert api.calls[0][2]["private"] is True and api.calls[0][2]["exist_ok"] is True
    assert sorted(p.name for p in remote.iterdir()) == ["README.md", "card.json", "model.safetensors"]
    assert (remote / "model.safetensors").read_bytes() == Path(fc_checkpoint).read_bytes()
    assert (remote / "card.json").read_bytes() == card_path(fc_checkpoint).read_bytes()


def test_model_card_metadata_round_trips_through_huggingface_hub(pushed, fc_checkpoint):
    from huggingface_hub import ModelCard, metadata_load

    _, _, remote = pushed
    card = read_card(fc_checkpoint)
    mc = ModelCard.load(remote / "README.md")
    data = mc.data
    assert data.library_name == "covid-cls"
    assert {"medical-imaging", "chest-xray", "research-only", "resnet18", "fine-tuning-fc",
            "trained-from-scratch"} <= set(data.tags)
    assert data.datasets == ["data"] and data.license == "other"
    # every metric of the model-index is the card's own number, with the card's CI
    results = {(r.dataset_split, r.metric_type): r for r in data.eval_results}
    expected = 0
    for split in ("test", "validation"):
        m = card.split_metrics(split)
        for key, mtype in (("auc", "roc_auc"), ("sensitivity", "sensitivity"), ("specificity", "specificity"),
                           ("f1", "f1"), ("accuracy", "accuracy"), ("ece", "ece")):
            if m.get(key) is None:
                continue
            expected += 1
            r = results[(split, mtype)]
            assert r.metric_value == pytest.approx(m[key], abs=1e-6)
            assert r.task_type == "image-classification"
            if key in m.get("ci", {}):
                assert r.metric_args["ci_95"] == pytest.approx(m["ci"][key])
                assert "95% CI" in r.metric_name
            assert r.metric_args["threshold"] == pytest.approx(m["threshold"])
    assert expected >= 8 and len(results) == expected
    # metadata_load (the plain YAML reader) sees the same model-index
    meta = metadata_load(remote / "README.md")
    assert meta["model-index"][0]["name"] == "resnet18-demo"
    assert meta["library_name"] == "covid-cls"
    text = mc.text
    for phrase in ("not a diagnosis", "Research and teaching only", "Intended use", "known confounds",
                   "Fine-tuning level `fc`", "Trained from scratch", "python -m covid_cls pull alice/resnet18-demo",
                   "DeGrave"):   # the demo data folder is not a known data set: the generic confound warning
        assert phrase in text, phrase


def test_model_card_names_the_cxr_real_confound():
    from covid_cls import modelcard

    card = Card(arch="vgg16", level="partial", weights_origin="imagenet", stored="trained",
                base_weights={"name": "VGG16_Weights.IMAGENET1K_V1", "sha256": "ab" * 32},
                data={"root": "/x/shared/data/cxr-real", "counts": {"train": {"infected": 785, "normal": 410}}},
                metrics={"test": {"n": 146, "auc": 0.9, "threshold": 0.4, "ci": {"auc": [0.85, 0.95]}}})
    text = modelcard.render(card, "bob/vgg16-partial")
    assert "Source confound" in text and "NIH-only subset" in text and "Shape cue" in text
    assert "stores **only the trained part**" in text and "VGG16_Weights.IMAGENET1K_V1" in text
    assert "0.900 [0.850, 0.950]" in text
    assert "datasets:\n- cxr-real" in text


def test_push_refuses_a_tampered_checkpoint(fc_checkpoint, tmp_path):
    bad = copy_checkpoint(fc_checkpoint, tmp_path / "ck")
    raw = bytearray(bad.read_bytes())
    raw[-1] ^= 0xFF
    bad.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="changed since it was saved"):
        hub.push(bad, "alice/x", api=FakeApi(tmp_path / "remote"))
    assert not (tmp_path / "remote").exists()


def test_push_offline_says_so_and_dry_run_writes_the_files(fc_checkpoint, tmp_path, capsys):
    assert hub.offline()   # conftest: COVID_CLS_OFFLINE=1
    assert main(["push", str(fc_checkpoint), "--repo", "alice/x"]) == 2
    assert "offline" in capsys.readouterr().err
    assert main(["push", str(fc_checkpoint), "--repo", "alice/x", "--dry-run", str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["README.md", "card.json", "model.safetensors"]
    assert main(["push", str(fc_checkpoint), "--repo", "not a repo"]) == 2
    assert "USER/NAME" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# pull
# ---------------------------------------------------------------------------------------------------

def test_pull_installs_a_hub_snapshot_verified(pushed, fc_checkpoint, tmp_path):
    _, _, remote = pushed
    cached = hub_cache(remote, tmp_path / "hf")
    ck = tmp_path / "checkpoints"
    path = hub.pull(str(cached), ck)
    assert path == ck / "resnet18-demo.safetensors"
    assert path.read_bytes() == Path(fc_checkpoint).read_bytes()
    [listed] = list_checkpoints(ck)
    assert listed.name == "resnet18-demo" and listed.file == path.name
    assert listed.extra["hub"]["source"] == "alice/resnet18-demo" and listed.extra["hub"]["revision"] == COMMIT
    assert load_checkpoint(path).card.sha256 == read_card(fc_checkpoint).sha256
    assert not [p for p in ck.iterdir() if p.name.startswith(".")]   # no staging folder left
    # the same source again: the same file, not a second copy; the snapshot folder and the cache root work too
    assert hub.pull(str(cached / "snapshots" / COMMIT), ck) == path
    assert hub.pull(str(tmp_path / "hf"), ck) == path
    assert len(list_checkpoints(ck)) == 1


def test_pull_never_overwrites_a_different_local_checkpoint(pushed, fc_checkpoint, tmp_path):
    import torch

    from covid_cls.checkpoints import model_from_checkpoint, save_checkpoint

    _, _, remote = pushed
    ck = tmp_path / "checkpoints"
    loaded = load_checkpoint(fc_checkpoint)
    model = model_from_checkpoint(loaded)
    with torch.no_grad():
        model.head[0].bias.add_(0.01)   # another model that happens to have the same name
    card = Card.from_dict({**loaded.card.to_dict(), "file": "", "bytes": None, "sha256": None})
    local = save_checkpoint(ck, model, card, name="resnet18-demo", ood_stats=loaded.ood_stats)
    path = hub.pull(str(remote), ck)
    assert path == ck / "resnet18-demo-1.safetensors"
    assert load_checkpoint(local).card.sha256 != load_checkpoint(path).card.sha256
    assert sorted(c.name for c in list_checkpoints(ck)) == ["resnet18-demo", "resnet18-demo-1"]
    assert hub.pull(str(remote), ck) == path   # pulled again: the pulled copy, the local one untouched


def test_pull_refuses_tampered_or_foreign_snapshots(pushed, tmp_path):
    _, _, remote = pushed
    bad = tmp_path / "bad"
    shutil.copytree(remote, bad)
    raw = bytearray((bad / "model.safetensors").read_bytes())
    raw[-1] ^= 0xFF
    (bad / "model.safetensors").write_bytes(bytes(raw))
    ck = tmp_path / "checkpoints"
    with pytest.raises(CheckpointError, match="failed verification"):
        hub.pull(str(bad), ck)
    assert list(ck.iterdir()) == []   # nothing listed, nothing half-installed
    (bad / "model.safetensors").write_bytes(b"\0" * 10)
    with pytest.raises(CheckpointError, match="incomplete download"):
        hub.pull(str(bad), ck)
    (bad / "card.json").unlink()
    with pytest.raises(hub.HubError, match="not a covid_cls model|no covid_cls model"):
        hub.pull(str(bad), ck)
    assert list(ck.iterdir()) == []


def test_pull_offline_uses_the_local_hub_cache_or_says_why(pushed, tmp_path, monkeypatch, capsys):
    """The real ``snapshot_download`` in offline mode (local files only): a cached repo installs, a missing one
    gives a clear message."""
    from huggingface_hub import constants

    _, _, remote = pushed
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    hub_cache(remote, tmp_path / "hf")
    ck = tmp_path / "checkpoints"
    assert hub.pull("alice/resnet18-demo", ck) == ck / "resnet18-demo.safetensors"
    with pytest.raises(hub.HubError, match="offline .* not in the local Hugging Face cache"):
        hub.pull("alice/not-cached", ck)
    assert main(["pull", "alice/not-cached", "--checkpoints", str(ck)]) == 2
    assert "offline" in capsys.readouterr().err
    assert main(["pull", "alice/resnet18-demo", "--checkpoints", str(ck)]) == 0
    assert "verified" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------
# the app
# ---------------------------------------------------------------------------------------------------

def settings_for(root: Path, hub_models: str):
    from covid_cls.ui import Settings

    return Settings(checkpoints=root / "checkpoints", runs=root / "runs", training=False,
                    roots_env="", hub_models=hub_models)


def test_settings_read_covid_cls_hub_models(monkeypatch):
    from covid_cls.ui import Settings

    monkeypatch.setenv("COVID_CLS_HUB_MODELS", "alice/a, /mirror/models--bob--b")
    s = Settings.from_env()
    assert hub.parse_sources(s.hub_models) == ["alice/a", "/mirror/models--bob--b"]


def test_app_starts_at_once_and_serves_the_hub_model_when_it_arrives(pushed, tmp_path, monkeypatch):
    """The page is built while the pull is still running; the model is listed and predicts once it is in;
    a source that cannot be had (offline) is noted in the Models tab, not raised."""
    from covid_cls.ui import Services, build_app
    from covid_cls.ui import predict as predict_tab
    from covid_cls.ui.common import BEST

    _, _, remote = pushed
    cached = hub_cache(remote, tmp_path / "mirror")
    settings = settings_for(tmp_path, f"{cached},alice/not-cached-anywhere")
    gate, real_resolve = threading.Event(), hub.resolve
    monkeypatch.setattr(hub, "resolve", lambda *a, **k: (gate.wait(60), real_resolve(*a, **k))[1])
    build_app(settings)    # returns while the first pull waits at the gate
    assert "downloading" in hub.pulls_markdown(settings.checkpoints)
    svc = Services(settings)
    assert svc.cards() == []
    gate.set()
    assert hub.wait_for_pulls(settings.checkpoints, timeout=60)
    note = hub.pulls_markdown(settings.checkpoints)
    assert "✅" in note and "resnet18-demo.safetensors" in note
    assert "⚠️" in note and "alice/not-cached-anywhere" in note and "offline" in note
    [card] = svc.cards("resnet18", "fc")
    assert card.name == "resnet18-demo"
    label, overlay, info, _ = predict_tab.predict(svc, str(xray(tmp_path)), "resnet18", "fc", BEST)
    assert label[0] in ("infected", "normal") or label[0].startswith("uncertain")
    assert set(label[1]) == {"infected", "normal"}
    assert "resnet18-demo" in info and "trained from scratch" in info


@pytest.mark.http
def test_fresh_app_serves_a_snapshot_folder_model_over_http(pushed, tmp_path):
    """Done-when of issue 12: COVID_CLS_HUB_MODELS pointing at a snapshot folder laid out as the Hub lays it,
    no local training, and /predict answers with that model."""
    from gradio_client import handle_file

    _, _, remote = pushed
    cached = hub_cache(remote, tmp_path / "mirror")
    settings = settings_for(tmp_path, str(cached / "snapshots" / COMMIT))
    with launched_app(settings) as app:
        assert hub.wait_for_pulls(settings.checkpoints, timeout=60)
        client = app.client()
        label, overlay, info = client.predict(handle_file(str(xray(tmp_path))), "resnet18", "fc", "",
                                              api_name="/predict")
        assert set(c["label"] for c in label["confidences"]) == {"infected", "normal"}
        assert "resnet18-demo" in info
        models = client.predict(api_name="/models")
        assert [m["file"] for m in models] == ["resnet18-demo.safetensors"]
