"""Tests of common.models: the backbone registry, parameter budgets, forward shapes, Normalize."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from common.models import (
    BACKBONES,
    Backbone,
    Classifier,
    Encoder,
    Normalize,
    ResNet18,
    SmallCNN,
    build_backbone,
    build_model,
    count_parameters,
)


@pytest.fixture
def scratch_name() -> Iterator[str]:
    """A backbone name that the test may register; removed from the registry afterwards."""
    name = "test_scratch_backbone"
    yield name
    BACKBONES.unregister(name)


def test_builtin_backbones_are_registered():
    names = BACKBONES.names()
    assert "small_cnn" in names
    assert "resnet18" in names
    assert names == sorted(names)


def test_register_and_build(scratch_name: str):
    @BACKBONES.register(name=scratch_name)
    class Tiny(Backbone):
        def __init__(self, in_channels: int = 1, feature_dim: int = 4) -> None:
            super().__init__()
            self.pool = torch.nn.AdaptiveAvgPool2d(1)
            self.fc = torch.nn.Linear(in_channels, feature_dim)
            self.feature_dim = feature_dim

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.pool(x).flatten(1))

    assert scratch_name in BACKBONES
    backbone = build_backbone(scratch_name, 3, feature_dim=6)
    assert isinstance(backbone, Tiny)
    assert backbone(torch.rand(2, 3, 8, 8)).shape == (2, 6)
    model = build_model("classifier", scratch_name, 3, [0.5] * 3, [0.5] * 3, num_classes=5)
    assert model(torch.rand(2, 3, 8, 8)).shape == (2, 5)


def test_double_registration_is_an_error():
    before = BACKBONES.items()
    with pytest.raises(ValueError, match="small_cnn"):
        BACKBONES.register(name="small_cnn")(SmallCNN)
    assert before == BACKBONES.items()


def test_unknown_backbone_lists_known_names():
    with pytest.raises(ValueError) as info:
        build_backbone("no_such_net", 3)
    message = str(info.value)
    assert "no_such_net" in message
    for name in BACKBONES.names():
        assert name in message


def test_unknown_kind_is_an_error():
    with pytest.raises(ValueError, match="kind"):
        build_model("regressor", "small_cnn", 1, [0.5], [0.5])  # type: ignore[arg-type]


@pytest.mark.parametrize("channels", [1, 3])
def test_small_cnn_parameter_budget(channels: int):
    backbone = build_backbone("small_cnn", channels)
    assert 700_000 <= count_parameters(backbone) <= 1_300_000
    clf = build_model("classifier", "small_cnn", channels, [0.5] * channels, [0.5] * channels)
    assert 700_000 <= count_parameters(clf) <= 1_300_000


def test_count_parameters_counts_only_trainable():
    layer = torch.nn.Linear(3, 2)
    assert count_parameters(layer) == 8
    layer.bias.requires_grad_(False)
    assert count_parameters(layer) == 6


SHAPES = [("small_cnn", 1, 28), ("small_cnn", 3, 32), ("resnet18", 3, 32)]


@pytest.mark.parametrize(("arch", "channels", "size"), SHAPES)
def test_classifier_shapes(arch: str, channels: int, size: int):
    torch.manual_seed(0)
    model = build_model("classifier", arch, channels, [0.5] * channels, [0.25] * channels, num_classes=7)
    assert isinstance(model, Classifier)
    assert model.kind == "classifier"
    model.eval()
    x = torch.rand(2, channels, size, size)
    with torch.no_grad():
        logits = model(x)
        feats = model.features(x)
    assert logits.shape == (2, 7)
    assert feats.shape == (2, model.feature_dim)
    assert model.feature_dim == 512
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(("arch", "channels", "size"), SHAPES)
def test_encoder_shapes(arch: str, channels: int, size: int):
    torch.manual_seed(0)
    model = build_model(
        "encoder", arch, channels, [0.5] * channels, [0.25] * channels, feature_dim=64, projection_dim=16
    )
    assert isinstance(model, Encoder)
    assert model.kind == "encoder"
    model.eval()
    x = torch.rand(2, channels, size, size)
    with torch.no_grad():
        feats = model.features(x)
        proj = model(x)
    assert model.feature_dim == 64
    assert model.projection_dim == 16
    assert feats.shape == (2, 64)
    assert proj.shape == (2, 16)
    # forward() is the projection head applied to features().
    with torch.no_grad():
        torch.testing.assert_close(proj, model.head(feats))


def test_resnet18_default_features_have_no_projection():
    net = ResNet18(in_channels=3)
    assert isinstance(net.proj, torch.nn.Identity)
    assert net.feature_dim == 512


def test_normalize_matches_literal_formula():
    mean, std = [0.1, 0.5, 0.9], [0.2, 0.3, 0.7]
    norm = Normalize(mean, std)
    x = torch.rand(2, 3, 4, 5, generator=torch.Generator().manual_seed(1))
    out = norm(x)
    assert out.shape == x.shape
    for b in range(2):
        for c in range(3):
            for i in range(4):
                for j in range(5):
                    expected = (x[b, c, i, j].item() - mean[c]) / std[c]
                    assert out[b, c, i, j].item() == pytest.approx(expected, rel=1e-6, abs=1e-6)


def test_normalize_is_saved_with_the_model():
    model = build_model("classifier", "small_cnn", 1, [0.3], [0.7], feature_dim=16)
    state = model.state_dict()
    assert torch.equal(state["normalize.mean"].flatten(), torch.tensor([0.3]))
    assert torch.equal(state["normalize.std"].flatten(), torch.tensor([0.7]))
    # The model normalises its own input: features() == backbone(literal normalisation).
    model.eval()
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model.features(x), model.backbone((x - 0.3) / 0.7))
