"""Grad-CAM: the fast path equals the package default, it localises lesions, and the Predictor agrees
with evaluate_checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from covid_cls import (
    UNCERTAIN,
    ImageError,
    NoCheckpointError,
    Predictor,
    TrainConfig,
    build_model,
    evaluate_checkpoint,
    fit,
    load_image,
    load_model,
    make_demo_dataset,
)
from covid_cls.data import eval_batch, to_square_u8
from covid_cls.explain import CamExplainer, overlay, reference_cam, resize_cam

from helpers import CXR_FULLRES, arch_params, cam_peak, lesion_mask


@pytest.mark.parametrize("level", ["fc", "full"])
@pytest.mark.parametrize("arch", arch_params(["resnet18", "vgg16"]))
def test_our_gradcam_equals_pytorch_grad_cam(arch, level):
    """Same map as the reference library, also on a fully frozen backbone (level fc: no parameter below
    the head requires grad), for the predicted class and for a chosen one, in a batch too."""
    torch.manual_seed(0)
    model = build_model(arch, level, weights="none").eval()
    x = torch.randn(2, 3, 96, 96)
    logits_b, cams = CamExplainer(model)(x)
    assert cams.shape == (2, 96, 96)
    peaks = []
    for i in range(2):
        for target in (None, i):
            ref = reference_cam(model, x[i:i + 1], target_class=target)
            logits, ours = CamExplainer(model)(x[i:i + 1], target_class=target)
            assert ours.shape == ref.shape == (96, 96)
            assert np.abs(ours - ref).max() < 1e-3
            peaks.append(float(ours.max()))
            with torch.no_grad():
                assert torch.allclose(logits, model(x[i:i + 1]), atol=1e-5)
        assert np.abs(cams[i] - reference_cam(model, x[i:i + 1])).max() < 1e-3
    assert max(peaks) > 0.99   # real, normalised maps (a map may be all zero when no evidence is positive)


def test_gradcam_backward_never_goes_below_the_target_layer():
    """Nothing below the Grad-CAM layer is traced and no parameter receives a gradient."""
    model = build_model("resnet18", "full", weights="none").eval()   # every parameter requires grad
    below: list[str] = []
    model.backbone.layer3.register_full_backward_hook(lambda *a: below.append("layer3"))
    model.backbone.layer4[0].register_full_backward_hook(lambda *a: below.append("layer4.0"))
    CamExplainer(model)(torch.randn(1, 3, 64, 64))
    assert below == []
    assert all(p.grad is None for p in model.parameters())


def test_other_cam_methods_through_the_reference_library():
    model = build_model("resnet18", "fc", weights="none").eval()
    for method in ("gradcam++", "eigencam"):
        cam = reference_cam(model, torch.randn(1, 3, 64, 64), method=method)
        assert cam.shape == (64, 64) and 0 <= cam.min() and cam.max() <= 1
    assert not any(p.requires_grad for p in model.backbone.parameters())   # restored afterwards


@pytest.fixture(scope="module")
def lesion_model(tmp_path_factory):
    """ResNet18 trained from scratch at 224 px on synthetic lesions (about a minute on 2 CPU cores)."""
    root = make_demo_dataset(tmp_path_factory.mktemp("lesions") / "d", n_per_class=48, size=224, seed=7)
    cfg = TrainConfig(data_dir=str(root), arch="resnet18", level="full", epochs=8, image_size=224, cache_size=224,
                      weights="none", optimizer="adam", lr=1e-3, batch_size=16,
                      out_dir=str(tmp_path_factory.mktemp("lesion_ckpt")))
    return root, fit(cfg)


@pytest.mark.slow
def test_gradcam_peak_falls_inside_the_lesion(lesion_model):
    root, path = lesion_model
    model, card = load_model(path)
    ex = CamExplainer(model)
    files = sorted((root / "test" / "infected").glob("*.png"))
    hits = 0
    for f in files:
        img = load_image(f)
        x = eval_batch(torch.from_numpy(to_square_u8(img, card.cache_size))[None, None], card.image_size)
        _, cam = ex(x, target_class=card.classes.index("infected"))
        r, c = cam_peak(resize_cam(cam, img.size))
        hits += bool(lesion_mask(root, f.relative_to(root))[r, c])
    assert hits / len(files) >= 0.8, f"peak inside the lesion on {hits}/{len(files)} images"


def test_predictor_matches_evaluate_checkpoint(fc_checkpoint, demo_data):
    ev = evaluate_checkpoint(fc_checkpoint, demo_data, split="test")
    pred = Predictor(fc_checkpoint.parent)
    for i in (0, len(ev["files"]) - 1):
        p = pred.predict(demo_data / ev["files"][i], checkpoint=fc_checkpoint)
        got = [p.probs[c] for c in ev["classes"]]
        assert np.allclose(got, ev["probs"][i], atol=1e-5)
        thr = ev["threshold"]      # the card's operating point, chosen on validation
        want = int(np.argmax(ev["probs"][i])) if thr is None else (0 if ev["probs"][i][0] >= thr else 1)
        assert p.decision == ev["classes"][want]
        assert p.label == (UNCERTAIN if p.abstain else p.decision) and bool(p.reasons) == p.abstain
        assert p.abstain == ev["flagged"][i] or p.ood["reasons"]   # same rule (the CLI adds cheap image checks)
    assert abs(sum(p.probs.values()) - 1) < 1e-6
    assert ev["n"] == 24 and 0 <= ev["auc"] <= 1 and len(ev["confusion"]) == 2


def test_prediction_fields_and_cam_at_input_size(fc_checkpoint):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (150, 200), dtype=np.uint8))  # 200 wide, 150 high
    p = Predictor(fc_checkpoint.parent).predict(img)  # default: best resnet18 · fc
    assert p.cam.shape == (150, 200) and p.cam.dtype == np.float32
    assert 0 <= p.cam.min() and p.cam.max() <= 1
    assert p.overlay.mode == "RGB" and p.overlay.size == (200, 150)
    assert p.device == "cpu" and p.latency_ms > 0 and p.checkpoint.endswith(".safetensors")
    assert "not a diagnosis" in p.disclaimer


def test_predictor_caches_models_and_bounds_the_cache(fc_checkpoint, tmp_path):
    import shutil

    copies = []
    for i in range(3):
        dst = tmp_path / f"m{i}.safetensors"
        shutil.copy(fc_checkpoint, dst)
        card = json.loads(fc_checkpoint.with_suffix(".json").read_text())
        dst.with_suffix(".json").write_text(json.dumps({**card, "file": dst.name}))   # a card names its file
        copies.append(dst)
    pred = Predictor(tmp_path, max_models=2)
    img = Image.new("L", (64, 64), 100)
    for c in copies:
        pred.predict(img, checkpoint=c)
    assert len(pred.loaded()) == 2 and str(copies[0].resolve()) not in pred.loaded()


def test_no_checkpoint_and_bad_image_errors(fc_checkpoint, tmp_path):
    with pytest.raises(NoCheckpointError, match="No trained model for VGG16 · partial"):
        Predictor(tmp_path).predict(Image.new("L", (64, 64)), arch="vgg16", level="partial")
    with pytest.raises(ImageError):
        Predictor(fc_checkpoint.parent).predict(b"this is not an image")


def test_overlay_blends_and_bounds_size():
    img = Image.new("L", (3000, 1500), 0)
    cam = np.zeros((1500, 3000), np.float32)
    cam[:, 1500:] = 1
    out = overlay(img, cam, alpha=0.5)
    assert out.size == (1024, 512)
    left, right = np.asarray(out)[256, 100], np.asarray(out)[256, 900]
    assert tuple(left) != tuple(right)  # hot half is coloured differently from the cold half


@pytest.mark.slow
@pytest.mark.skipif(not CXR_FULLRES.is_dir(), reason="../shared/data/cxr-fullres not present")
def test_predict_on_real_fullres_uploads(fc_checkpoint):
    pred = Predictor(fc_checkpoint.parent)
    for f in sorted(CXR_FULLRES.iterdir()):
        if f.suffix.lower() not in (".png", ".jpeg", ".jpg"):
            continue
        p = pred.predict(f.read_bytes())
        with Image.open(f) as im:
            assert p.cam.shape == (im.height, im.width)
        assert set(p.probs) == {"infected", "normal"}


def test_batch_prediction_equals_one_by_one_and_survives_bad_files(fc_checkpoint, demo_data):
    files = sorted((demo_data / "test" / "infected").glob("*.png"))[:3] + sorted(
        (demo_data / "test" / "normal").glob("*.png"))[:2]
    images = [f.read_bytes() for f in files]
    images.insert(2, b"not an image at all")
    pred = Predictor(fc_checkpoint.parent)
    progress = []
    batch = pred.predict_batch(images, checkpoint=fc_checkpoint, batch_size=4,
                               on_progress=lambda d, t: progress.append((d, t)))
    assert len(batch) == 6 and isinstance(batch[2], ImageError)
    assert progress == [(4, 6), (6, 6)]
    for img, got in zip([im for k, im in enumerate(images) if k != 2], [b for k, b in enumerate(batch) if k != 2]):
        one = pred.predict(img, checkpoint=fc_checkpoint)
        assert np.allclose([got.probs[c] for c in one.probs], list(one.probs.values()), atol=1e-5)
        assert np.abs(got.cam - one.cam).max() < 1e-4 and got.label == one.label


def test_model_cache_is_bounded_by_bytes(fc_checkpoint, tmp_path):
    from helpers import copy_checkpoint

    copies = [copy_checkpoint(fc_checkpoint, tmp_path, f"b{i}") for i in range(3)]
    one = Predictor(tmp_path)
    one.predict(Image.new("L", (64, 64), 90), checkpoint=copies[0])
    size = one.loaded_bytes()
    pred = Predictor(tmp_path, max_models=10, max_bytes=int(2.5 * size))   # room for two models
    for c in copies:
        pred.predict(Image.new("L", (64, 64), 90), checkpoint=c)
    assert len(pred.loaded()) == 2 and pred.loaded_bytes() <= 2.5 * size
    tiny = Predictor(tmp_path, max_bytes=1)            # below one model: the newest still stays
    tiny.predict(Image.new("L", (64, 64), 90), checkpoint=copies[1])
    assert tiny.loaded() == [str(copies[1].resolve())]
