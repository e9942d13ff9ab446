"""The out-of-distribution warning: X-rays pass, obvious non-X-rays are flagged."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from covid_cls import Predictor, load_checkpoint, load_image
from covid_cls.ood import MARGIN, cheap_checks, fit_stats, score
from covid_cls.synthetic import non_xray_images, synthetic_xray


def test_threshold_is_margin_times_the_validation_quantile():
    g = torch.Generator().manual_seed(0)
    train = torch.randn(400, 8, generator=g)
    labels = torch.randint(0, 2, (400,), generator=g)
    val = torch.randn(200, 8, generator=g)
    st = fit_stats(train, labels, val, quantile=0.95)
    assert abs(st["threshold"] - MARGIN * float(torch.quantile(score(val, st), 0.95))) < 1e-4
    far = torch.full((5, 8), 10.0)
    assert (score(far, st) > st["threshold"]).all()
    assert (score(val, st) > st["threshold"]).float().mean() < 0.05


def test_cheap_checks():
    gray = Image.fromarray(synthetic_xray(128, seed=1)[0])
    assert cheap_checks(load_image(gray)) == []
    colour = Image.fromarray(np.dstack([np.full((128, 128), 255, np.uint8), np.zeros((128, 128), np.uint8),
                                        np.zeros((128, 128), np.uint8)]))
    assert any("coloured" in r for r in cheap_checks(load_image(colour)))
    banner = Image.fromarray(synthetic_xray(128, seed=1)[0]).resize((600, 100))
    assert any("aspect ratio" in r for r in cheap_checks(load_image(banner)))
    assert any("blank" in r for r in cheap_checks(load_image(Image.new("L", (64, 64), 90))))


def test_checkpoint_carries_ood_statistics(fc_checkpoint):
    ck = load_checkpoint(fc_checkpoint)
    feats = ck.ood_stats["features"]
    assert feats["means"].shape == (2, 512) and feats["precision"].shape == (512, 512)
    assert ck.card.ood["features"]["threshold"] > 0 and ck.card.ood["layout"]["threshold"] > 0


@pytest.mark.slow
def test_xrays_pass_and_non_xrays_are_flagged(fc_checkpoint, demo_data):
    pred = Predictor(fc_checkpoint.parent)
    xrays = sorted((demo_data / "test").rglob("*.png"))
    flagged_x = sum(pred.predict(p, checkpoint=fc_checkpoint).ood["flagged"] for p in xrays)
    others = non_xray_images(8, 160, seed=3)
    kinds = ("colour_scene", "text", "noise", "shapes")
    flagged_o = {k: sum(pred.predict(im, checkpoint=fc_checkpoint).ood["flagged"] for im in others[k]) for k in kinds}
    assert flagged_x / len(xrays) <= 0.1, flagged_x
    assert sum(flagged_o.values()) / (8 * len(kinds)) >= 0.95, flagged_o
    p = pred.predict(others["colour_scene"][0], checkpoint=fc_checkpoint)
    assert p.ood["flagged"] and any("coloured" in r for r in p.ood["reasons"])
