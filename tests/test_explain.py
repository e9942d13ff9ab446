"""Grad-CAM: the fast path equals the package default, it localises lesions, and the Predictor agrees
with evaluate_checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from covid_cls import (ImageError, NoCheckpointError, Predictor, TrainConfig, build_model, evaluate_checkpoint, fit,
                       load_image, load_model, make_demo_dataset)
from covid_cls.data import eval_batch, to_square_u8
from covid_cls.explain import CamExplainer, cam_peak, default_gradcam, overlay, resize_cam
from covid_cls.synthetic import lesion_mask
from conftest import CXR_FULLRES


@pytest.mark.parametrize("arch", ["resnet18", "vgg16"])
def test_fast_gradcam_equals_package_default(arch):
    torch.manual_seed(0)
    model = build_model(arch, "full", weights="none").eval()
    x = torch.randn(2, 3, 96, 96)
    for i in range(2):
        ref = default_gradcam(model, arch, x[i:i + 1], target_class=i)
        logits, fast = CamExplainer(model, arch)(x[i:i + 1], target_class=i)
        assert fast.shape == ref.shape == (96, 96)
        assert np.abs(fast - ref).max() < 1e-4
        assert fast.max() > 0.99  # a real, normalised map, not all zeros
        with torch.no_grad():
            assert torch.allclose(logits, model(x[i:i + 1]), atol=1e-5)


def test_fast_gradcam_backpropagates_only_into_the_target_layer():
    model = build_model("resnet18", "full", weights="none").eval()
    ex = CamExplainer(model, "resnet18")
    # run the package directly (CamExplainer clears .grad afterwards)
    ex.cam(input_tensor=torch.randn(1, 3, 64, 64), targets=None)
    with_grad = {n.split(".")[0] + "." + n.split(".")[1] for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {"layer4.1"}


@pytest.fixture(scope="module")
def lesion_model(tmp_path_factory):
    """ResNet18 trained from scratch at 224 px on synthetic lesions (about a minute on 2 CPU cores)."""
    root = make_demo_dataset(tmp_path_factory.mktemp("lesions") / "d", n_per_class=48, size=224, seed=7)
    cfg = TrainConfig(data_dir=str(root), arch="resnet18", level="full", epochs=8, image_size=224, cache_size=224,
                      weights="none", optimizer="adam", lr=1e-3, batch_size=16,
                      out_dir=str(tmp_path_factory.mktemp("lesion_ckpt")))
    return root, fit(cfg)


def test_gradcam_peak_falls_inside_the_lesion(lesion_model):
    root, path = lesion_model
    model, card = load_model(path)
    ex = CamExplainer(model, "resnet18")
    files = sorted((root / "test" / "infected").glob("*.png"))
    hits = 0
    for f in files:
        img = load_image(f)
        x = eval_batch(torch.from_numpy(to_square_u8(img, card["cache_size"]))[None, None], card["image_size"])
        _, cam = ex(x, target_class=card["classes"].index("infected"))
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
        assert p.label == ev["classes"][int(np.argmax(ev["probs"][i]))]
    assert abs(sum(p.probs.values()) - 1) < 1e-6
    assert ev["n"] == 24 and 0 <= ev["auc"] <= 1 and len(ev["confusion"]) == 2


def test_prediction_fields_and_cam_at_input_size(fc_checkpoint):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (150, 200), dtype=np.uint8))  # 200 wide, 150 high
    p = Predictor(fc_checkpoint.parent).predict(img)  # default: best resnet18 · fc
    assert p.cam.shape == (150, 200) and p.cam.dtype == np.float32
    assert 0 <= p.cam.min() and p.cam.max() <= 1
    assert p.overlay.mode == "RGB" and p.overlay.size == (200, 150)
    assert p.device == "cpu" and p.latency_ms > 0 and p.checkpoint.endswith(".pt")
    assert "not a diagnosis" in p.disclaimer


def test_predictor_caches_models_and_bounds_the_cache(fc_checkpoint, tmp_path):
    import shutil

    copies = []
    for i in range(3):
        dst = tmp_path / f"m{i}.pt"
        shutil.copy(fc_checkpoint, dst)
        shutil.copy(fc_checkpoint.with_suffix(".json"), dst.with_suffix(".json"))
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
