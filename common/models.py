"""Architectures: a decorator registry of backbones (:data:`BACKBONES`), and the two heads the range serves.

A backbone maps float images in [0, 1] to a feature vector. Normalisation lives inside the model
(:class:`Normalize`), so a served model, a surrogate and a probe all take the same [0, 1] input and
the API never has to trust a client's preprocessing.

- ``small_cnn``: about 1M parameters, the quick profile's model (Fashion-MNIST on a 2-core CPU).
- ``resnet18``: the CIFAR-style ResNet-18 (3x3 stem, no max-pool) of the paper-scale profile, as
  used by SimCLR on CIFAR-10 and by the RDA, AST and SEP released code.

An **encoder** is backbone + projection head; the API serves the backbone's representation (the
SimCLR convention: downstream tasks use the features before the projection). A **classifier** is
backbone + linear head.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import nn

from common.registry import Registry

BackboneFactory = Callable[..., "Backbone"]
# Backbone factories ``(in_channels=..., **kwargs) -> Backbone`` by name: ``@BACKBONES.register(name=...)``.
BACKBONES = Registry[BackboneFactory]("backbone")

ModelKind = Literal["classifier", "encoder"]


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` as a module, so checkpoints carry their preprocessing."""

    mean: torch.Tensor  # buffers [1, C, 1, 1]
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Backbone(nn.Module):
    """Base class: ``forward`` maps [B, C, H, W] floats in [0, 1] to [B, feature_dim]."""

    feature_dim: int


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


@BACKBONES.register(name="small_cnn")
class SmallCNN(Backbone):
    """A VGG-style CNN of about 1M parameters for 28x28 / 32x32 inputs.

    Three stages of two 3x3 conv-BN-ReLU layers (``widths``, default 32-64-128) with 2x2 max-pool,
    then a 3x3 adaptive average pool and a fully connected layer to ``feature_dim`` (default 512)
    with BN and ReLU. Sized so it trains on 2 CPU cores in minutes (DESIGN.md: ~120 s per 50k
    images per epoch) and serves well above 1,000 images/s.
    """

    def __init__(
        self,
        in_channels: int = 1,
        widths: Sequence[int] = (32, 64, 128),
        feature_dim: int = 512,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for width in widths:
            layers += [*_conv_bn(cin, width), *_conv_bn(width, width), nn.MaxPool2d(2)]
            cin = width
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(3), nn.Flatten())
        self.fc = nn.Sequential(
            nn.Linear(cin * 9, feature_dim, bias=False), nn.BatchNorm1d(feature_dim), nn.ReLU(inplace=True)
        )
        self.feature_dim = feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


@BACKBONES.register(name="resnet18")
class ResNet18(Backbone):
    """CIFAR-style ResNet-18 (He et al. 2016): 3x3 stem with stride 1, no max-pool, 512-d features."""

    def __init__(self, in_channels: int = 3, feature_dim: int = 512) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True)
        )
        blocks: list[nn.Module] = []
        cin = 64
        for width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [_BasicBlock(cin, width, stride), _BasicBlock(width, width, 1)]
            cin = width
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.proj: nn.Module = nn.Identity() if feature_dim == 512 else nn.Linear(512, feature_dim)
        self.feature_dim = feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.pool(self.layers(self.stem(x))))


@BACKBONES.register(name="small_resnet")
class SmallResNet(Backbone):
    """A small residual network (about 0.2M parameters) for 28x28 / 32x32 inputs: a 3x3 stem of 16
    channels and three stages of two basic blocks (16, 32, 64 channels; stride 2 from the second),
    global average pooling and a linear projection to ``feature_dim`` (default 64). The quick
    profile's "other architecture" (Robust Representation Matching's student)."""

    def __init__(self, in_channels: int = 1, feature_dim: int = 64) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True)
        )
        blocks: list[nn.Module] = []
        cin = 16
        for width, stride in ((16, 1), (32, 2), (64, 2)):
            blocks += [_BasicBlock(cin, width, stride), _BasicBlock(width, width, 1)]
            cin = width
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.proj = nn.Sequential(
            nn.Linear(64, feature_dim, bias=False), nn.BatchNorm1d(feature_dim), nn.ReLU()
        )
        self.feature_dim = feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.pool(self.layers(self.stem(x))))


def build_backbone(name: str, in_channels: int, **kwargs: object) -> Backbone:
    """Instantiate a registered backbone; unknown names are a ``ValueError`` listing the known ones."""
    return BACKBONES.get(name)(in_channels=in_channels, **kwargs)


class ImageModel(nn.Module):
    """Normalisation + backbone + head. ``features()`` is the representation, ``forward()`` the head."""

    kind: ModelKind

    def __init__(self, backbone: Backbone, head: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.backbone = backbone
        self.head = head

    @property
    def feature_dim(self) -> int:
        return self.backbone.feature_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone representation of images in [0, 1]: the encoder's served embedding."""
        return self.backbone(self.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def representation(self) -> nn.Sequential:
        """Normalisation + backbone as one module sharing this model's parameters: calling it is
        :meth:`features`. Training a representation through it (DDP) leaves the head out."""
        return nn.Sequential(self.normalize, self.backbone)

    def features_module(self) -> nn.Module:
        """A module whose forward is :meth:`features` (for feature extraction helpers)."""
        return FeaturesOf(self)


class FeaturesOf(nn.Module):
    """Wraps an :class:`ImageModel` so that calling it returns its representation."""

    def __init__(self, model: ImageModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.features(x)


class Classifier(ImageModel):
    """Backbone + linear head to ``num_classes`` logits."""

    kind: ModelKind = "classifier"
    head: nn.Linear

    def __init__(self, backbone: Backbone, num_classes: int, mean: Sequence[float], std: Sequence[float]):
        super().__init__(backbone, nn.Linear(backbone.feature_dim, num_classes), mean, std)
        self.num_classes = num_classes


class Encoder(ImageModel):
    """Backbone + SimCLR projection head (Linear-BN-ReLU-Linear to ``projection_dim``, default 128)."""

    kind: ModelKind = "encoder"

    def __init__(
        self,
        backbone: Backbone,
        mean: Sequence[float],
        std: Sequence[float],
        projection_dim: int = 128,
    ) -> None:
        dim = backbone.feature_dim
        head = nn.Sequential(
            nn.Linear(dim, dim, bias=False),
            nn.BatchNorm1d(dim),
            nn.ReLU(inplace=True),
            nn.Linear(dim, projection_dim),
        )
        super().__init__(backbone, head, mean, std)
        self.projection_dim = projection_dim


def build_model(
    kind: ModelKind,
    architecture: str,
    in_channels: int,
    mean: Sequence[float],
    std: Sequence[float],
    num_classes: int = 10,
    feature_dim: int | None = None,
    projection_dim: int = 128,
) -> ImageModel:
    """Build a classifier or an encoder from a registered backbone name."""
    kwargs: dict[str, object] = {} if feature_dim is None else {"feature_dim": feature_dim}
    backbone = build_backbone(architecture, in_channels, **kwargs)
    if kind == "classifier":
        return Classifier(backbone, num_classes, mean, std)
    if kind == "encoder":
        return Encoder(backbone, mean, std, projection_dim)
    raise ValueError(f"unknown model kind {kind!r}; expected 'classifier' or 'encoder'")


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
