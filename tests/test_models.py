"""The registry, the head, and freezing checked by what actually receives gradients."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from covid_cls import ARCHS, LEVELS, WeightsUnavailable, build_model
from covid_cls.models import trainable_roots

from helpers import arch_params

_BUILT: dict = {}


def model_for(arch: str, level: str) -> nn.Module:
    # VGG16 costs seconds to initialise; build each pair once per test session.
    if (arch, level) not in _BUILT:
        torch.manual_seed(0)
        _BUILT[(arch, level)] = build_model(arch, level, weights="none")
    return _BUILT[(arch, level)]


def expected_trainable(model: nn.Module, arch: str, level: str) -> set[str]:
    """Parameter names the level should train, written out from DESIGN.md's table (not from the code)."""
    names = [n for n, _ in model.named_parameters()]
    if level == "full":
        return set(names)
    if arch == "resnet18":
        prefixes = ("head.",) if level == "fc" else ("head.", "backbone.layer4.")
    else:
        prefixes = ("head.",) if level == "fc" else ("head.", "backbone.classifier.") + tuple(
            f"backbone.features.{i}." for i in range(24, 31))
    return {n for n in names if n.startswith(prefixes)}


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("arch", arch_params(ARCHS))
def test_gradient_flow_matches_level(arch, level):
    model = model_for(arch, level)
    model.zero_grad(set_to_none=True)
    model.train()
    frozen_bn = {n: (m.running_mean.clone(), m.running_var.clone()) for n, m in model.named_modules()
                 if isinstance(m, nn.BatchNorm2d) and not any(p.requires_grad for p in m.parameters())}
    x = torch.randn(4, 3, 64, 64)
    loss = nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 0, 1]))
    loss.backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    want = expected_trainable(model, arch, level)
    assert got == want, f"unexpected: {sorted(got - want)[:5]} missing: {sorted(want - got)[:5]}"
    # frozen BatchNorm layers stay in eval mode and their running statistics never move
    for n, (mean, var) in frozen_bn.items():
        bn = model.get_submodule(n)
        assert not bn.training, n
        assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var), n
    model.zero_grad(set_to_none=True)


def test_trainable_batchnorm_does_update_in_full():
    """The counterpart of the frozen-BN check: at level full the statistics must move."""
    model = model_for("resnet18", "full")
    model.train()
    before = model.backbone.bn1.running_mean.clone()
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    assert not torch.equal(before, model.backbone.bn1.running_mean)


@pytest.mark.parametrize("arch,slot,in_features", [("resnet18", "fc", 512), ("vgg16", "classifier.6", 4096)])
def test_head_shape_and_place(arch, slot, in_features):
    """torchvision's last Linear is gone (Identity), our head follows the backbone's own forward."""
    model = model_for(arch, "fc")
    head = model.head
    assert isinstance(model.backbone.get_submodule(slot), nn.Identity)
    with torch.no_grad():
        assert model.forward_features(torch.randn(2, 3, 64, 64)).shape == (2, in_features)
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(in_features, 4300), (4300, 2)]
    assert any(isinstance(m, nn.ReLU) for m in head.modules())
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 2)


def test_every_head_layer_is_used():
    """The 2020 notebook defined a second head layer and never called it; ours must affect the output."""
    model = model_for("resnet18", "fc").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x).clone()
        model.head[3].weight.mul_(2)
        after = model(x)
        model.head[3].weight.div_(2)
    assert not torch.allclose(before, after)


def test_unknown_names_are_value_errors_listing_choices():
    with pytest.raises(ValueError, match="resnet18.*vgg16"):
        build_model("resnet50", "fc", weights="none")
    with pytest.raises(ValueError, match="fc, partial, full"):
        build_model("resnet18", "everything", weights="none")
    with pytest.raises(ValueError, match="auto"):
        build_model("resnet18", "fc", weights="/no/such/file.pth")


def test_auto_weights_offline_fall_back_and_say_so(monkeypatch, tmp_path):
    monkeypatch.setenv("COVID_CLS_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = build_model("resnet18", "fc", weights="auto")
    assert model.weights_origin == "scratch" and model.base_weights == {}
    assert "FROM SCRATCH" in model.weights_note
    assert any("FROM SCRATCH" in str(w.message) for w in caught)
    with pytest.raises(WeightsUnavailable, match="TORCH_HOME"):
        # explicit "imagenet" must not silently fall back; an unreachable host fails fast here
        def unreachable(spec, download):
            raise OSError("network is unreachable")

        monkeypatch.setattr("covid_cls.models._imagenet_state_dict", unreachable)
        build_model("resnet18", "fc", weights="imagenet")


def test_auto_weights_use_the_torch_hub_cache(monkeypatch, tmp_path):
    """A cached ImageNet file (as Spaces or an online machine would have) is loaded, head swapped after."""
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    from covid_cls.models import _cached_weights_file

    torch.manual_seed(123)
    reference = torchvision.models.resnet18(weights=None)
    target = _cached_weights_file(ARCHS["resnet18"])
    target.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), target)
    model = build_model("resnet18", "partial", weights="auto")
    assert model.weights_origin == "imagenet"
    assert model.base_weights["name"] == "ResNet18_Weights.IMAGENET1K_V1" and len(model.base_weights["sha256"]) == 64
    assert torch.equal(model.backbone.conv1.weight, reference.conv1.weight)
    assert torch.equal(model.backbone.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    assert model.head[0].in_features == 512


def test_weights_from_a_state_dict_file(tmp_path):
    import torchvision

    ref = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(ref.state_dict(), path)
    model = build_model("resnet18", "fc", weights=path)
    assert model.weights_origin == "file"
    assert torch.equal(model.backbone.layer1[0].conv1.weight, ref.layer1[0].conv1.weight)


def test_trainable_roots_cover_full():
    assert trainable_roots("vgg16", "full") == ("",)
    assert trainable_roots("resnet18", "partial") == ("backbone.layer4", "head")


def test_model_owns_its_structure_without_patching():
    """The level lives in the model (no methods set on an instance) and can change in place."""
    model = build_model("resnet18", "fc", weights="none")
    assert "train" not in vars(model) and model.level == "fc"
    model.set_level("partial")
    assert {n.split(".")[1] for n, p in model.named_parameters() if p.requires_grad and n.startswith("backbone")} \
        == {"layer4"}
    model.train()
    assert model.backbone.layer4.training and not model.backbone.layer3.training
    assert set(model.trained_state_dict()) == {k for k in model.state_dict()
                                              if k.startswith(("backbone.layer4.", "head."))}
