"""Tests of common.views: batched views against literal formulas and torchvision's functional ops."""

from __future__ import annotations

import colorsys
import importlib

import pydantic
import pytest
import torch

from common.compat import torchvision  # noqa: F401  (defines the ops torchvision needs)
from common.views import (
    ViewConfig,
    ViewGenerator,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    blur_kernel_size,
    gaussian_blur,
    hsv_to_rgb,
    rgb_to_hsv,
    sample_crop_boxes,
    to_float,
    to_uint8,
)

TF = importlib.import_module("torchvision.transforms.v2.functional")

IDENTITY = {
    "crop_scale": (1.0, 1.0),
    "crop_ratio": (1.0, 1.0),
    "flip_p": 0.0,
    "jitter_p": 0.0,
    "grayscale_p": 0.0,
    "blur_p": 0.0,
    "solarize_p": 0.0,
}


def identity(**changes: object) -> ViewConfig:
    return ViewConfig(**{**IDENTITY, **changes})


def images(b: int = 8, c: int = 3, h: int = 16, w: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, c, h, w, generator=torch.Generator().manual_seed(seed))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


PRESETS = [ViewConfig(), ViewConfig.simclr(), ViewConfig.rda_prototype(), ViewConfig.rda_train()]
PRESETS.append(ViewConfig.stolen_encoder())


@pytest.mark.parametrize("config", PRESETS)
@pytest.mark.parametrize("shape", [(6, 1, 28, 28), (6, 3, 32, 32)])
def test_shape_dtype_range(config, shape):
    x = torch.rand(shape, generator=gen(1))
    y = ViewGenerator(config)(x, gen(2))
    assert y.shape == x.shape
    assert y.dtype == torch.float32
    assert torch.isfinite(y).all()
    assert y.min() >= 0.0 and y.max() <= 1.0


def test_views_shape_and_independence():
    x = images(b=4)
    v = ViewGenerator(ViewConfig.rda_prototype()).views(x, 5, gen(0))
    assert v.shape == (5, 4, 3, 16, 16)
    for i in range(1, 5):
        assert not torch.allclose(v[0], v[i])


def test_reproducible_with_seed_and_different_across_seeds():
    x = images()
    vg = ViewGenerator(ViewConfig.rda_prototype())
    assert torch.equal(vg(x, gen(7)), vg(x, gen(7)))
    assert torch.equal(vg.views(x, 3, gen(7)), vg.views(x, 3, gen(7)))
    assert not torch.allclose(vg(x, gen(7)), vg(x, gen(8)))


def test_global_rng_when_no_generator():
    x = images()
    vg = ViewGenerator(ViewConfig())
    torch.manual_seed(3)
    a = vg(x)
    torch.manual_seed(3)
    assert torch.equal(a, vg(x))


def test_input_is_not_modified():
    x = images()
    before = x.clone()
    ViewGenerator(ViewConfig.rda_prototype())(x, gen(0))
    assert torch.equal(x, before)


@pytest.mark.parametrize("c", [1, 3])
def test_identity_config_returns_input(c):
    x = images(c=c)
    y = ViewGenerator(identity())(x, gen(0))
    torch.testing.assert_close(y, x, atol=1e-5, rtol=0)


@pytest.mark.parametrize("c", [1, 3])
def test_flip_equals_torch_flip(c):
    x = images(c=c, h=16, w=16)
    y = ViewGenerator(identity(flip_p=1.0))(x, gen(0))
    torch.testing.assert_close(y, torch.flip(x, dims=[3]), atol=1e-5, rtol=0)
    # A non-square image is left uncropped when the ratio range holds its own aspect ratio.
    x = images(c=c, h=12, w=20)
    y = ViewGenerator(identity(flip_p=1.0, crop_ratio=(20 / 12, 20 / 12)))(x, gen(0))
    torch.testing.assert_close(y, torch.flip(x, dims=[3]), atol=1e-5, rtol=0)


def test_grayscale_gives_equal_channels():
    x = images()
    y = ViewGenerator(identity(grayscale_p=1.0))(x, gen(0))
    torch.testing.assert_close(y[:, 0], y[:, 1], atol=0, rtol=0)
    torch.testing.assert_close(y[:, 0], y[:, 2], atol=0, rtol=0)
    expected = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    torch.testing.assert_close(y[:, 0], expected, atol=1e-6, rtol=0)


def test_grayscale_is_noop_for_one_channel():
    x = images(c=1)
    y = ViewGenerator(identity(grayscale_p=1.0, jitter=(0.0, 0.0, 0.4, 0.2), jitter_p=1.0))(x, gen(0))
    torch.testing.assert_close(y, x, atol=1e-6, rtol=0)


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.8])
def test_solarize_literal(threshold):
    x = images(c=3)
    y = ViewGenerator(identity(solarize_p=1.0, solarize_threshold=threshold))(x, gen(0))
    expected = torch.where(x >= threshold, 1.0 - x, x)
    torch.testing.assert_close(y, expected, atol=1e-6, rtol=0)


def test_blur_preserves_constant_and_smooths_delta():
    config = identity(blur_p=1.0, blur_sigma=(1.0, 1.0))
    const = torch.full((2, 3, 16, 16), 0.37)
    torch.testing.assert_close(ViewGenerator(config)(const, gen(0)), const, atol=1e-6, rtol=0)

    delta = torch.zeros(2, 1, 15, 15)
    delta[:, :, 7, 7] = 1.0
    y = ViewGenerator(config)(delta, gen(0))
    assert y.max() < 0.5
    torch.testing.assert_close(y.sum(dim=(1, 2, 3)), torch.ones(2), atol=1e-5, rtol=0)
    assert y[0, 0, 7, 6] > 0.0 and y[0, 0, 6, 7] > 0.0
    # kernel size 3 for a 15x15 image: separable 1-D Gaussian of sigma 1, outer product around (7, 7).
    k = torch.exp(-0.5 * torch.tensor([-1.0, 0.0, 1.0]) ** 2)
    k = k / k.sum()
    torch.testing.assert_close(y[0, 0, 6:9, 6:9], torch.outer(k, k), atol=1e-6, rtol=0)


def test_gaussian_blur_matches_torchvision_per_sample():
    x = images(b=3, c=3, h=20, w=24)
    sigmas = torch.tensor([0.3, 1.0, 1.9])
    y = gaussian_blur(x, sigmas, 5)
    for i, s in enumerate(sigmas.tolist()):
        ref = TF.gaussian_blur(x[i : i + 1], kernel_size=[5, 5], sigma=[s, s])
        torch.testing.assert_close(y[i : i + 1], ref, atol=1e-5, rtol=0)


def test_blur_kernel_size_rule():
    assert blur_kernel_size(32, 32) == 3
    assert blur_kernel_size(28, 28) == 3
    assert blur_kernel_size(96, 96) == 9
    assert blur_kernel_size(224, 224) == 23
    assert blur_kernel_size(2, 2) == 3 or blur_kernel_size(2, 2) // 2 < 2


def test_colour_ops_match_torchvision():
    x = images(b=4, c=3, h=6, w=7)
    factors = torch.tensor([0.6, 1.0, 1.3, 0.9])
    hue = torch.tensor([-0.2, 0.0, 0.1, 0.45])
    y_b = adjust_brightness(x, factors)
    y_c = adjust_contrast(x, factors)
    y_s = adjust_saturation(x, factors)
    y_h = adjust_hue(x, hue)
    for i in range(4):
        xi = x[i : i + 1]
        f, h = factors[i].item(), hue[i].item()
        torch.testing.assert_close(y_b[i : i + 1], TF.adjust_brightness(xi, f), atol=1e-5, rtol=0)
        # torchvision's luma uses 0.2989 for red, ours 0.299: allow the tiny difference.
        torch.testing.assert_close(y_c[i : i + 1], TF.adjust_contrast(xi, f), atol=1e-3, rtol=0)
        torch.testing.assert_close(y_s[i : i + 1], TF.adjust_saturation(xi, f), atol=1e-3, rtol=0)
        torch.testing.assert_close(y_h[i : i + 1], TF.adjust_hue(xi, h), atol=1e-4, rtol=0)


def test_hsv_roundtrip_and_colorsys():
    x = images(b=2, c=3, h=4, w=5)
    hsv = rgb_to_hsv(x)
    torch.testing.assert_close(hsv_to_rgb(hsv), x, atol=1e-5, rtol=0)
    for b, i, j in [(0, 0, 0), (1, 3, 4), (0, 2, 1)]:
        r, g, bl = x[b, :, i, j].tolist()
        expected = colorsys.rgb_to_hsv(r, g, bl)
        torch.testing.assert_close(hsv[b, :, i, j], torch.tensor(expected), atol=1e-5, rtol=0)


def test_per_sample_parameters_differ_within_batch():
    x = images(b=1).expand(16, -1, -1, -1).contiguous()
    y = ViewGenerator(ViewConfig.rda_prototype())(x, gen(0))
    distinct = {tuple(torch.round(y[i] * 1e4).flatten()[:64].tolist()) for i in range(16)}
    assert len(distinct) >= 12
    # Jitter alone (no geometry) also draws per-sample factors.
    y = ViewGenerator(identity(jitter_p=1.0))(x, gen(0))
    assert len({round(v, 6) for v in y.mean(dim=(1, 2, 3)).tolist()}) == 16


def test_crop_boxes_follow_torchvision_rules():
    boxes = sample_crop_boxes(500, 32, 32, (0.08, 1.0), (3 / 4, 4 / 3), gen(0))
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= 32).all() and (left + w <= 32).all()
    assert torch.equal(h, h.round()) and torch.equal(top, top.round())
    area = h * w / 1024
    assert area.min() > 0.05 and area.max() <= 1.0
    assert len(set(area.tolist())) > 50

    # RDA prototype crop: scale 0.9, ratio 1 on 32x32 -> a 30x30 box (round(sqrt(921.6)) = 30).
    boxes = sample_crop_boxes(50, 32, 32, (0.9, 0.9), (1.0, 1.0), gen(0))
    assert (boxes[:, 2] == 30).all() and (boxes[:, 3] == 30).all()
    assert set(boxes[:, 0].tolist()) <= {0.0, 1.0, 2.0} and len(set(boxes[:, 0].tolist())) > 1

    # No attempt fits (a square of the full area in a 16x32 image): centre crop at the max ratio.
    boxes = sample_crop_boxes(3, 16, 32, (1.0, 1.0), (1.0, 1.0), gen(0))
    assert boxes.tolist() == [[0.0, 8.0, 16.0, 16.0]] * 3


def test_crop_zooms_into_a_ramp():
    w = 32
    ramp = (torch.arange(w, dtype=torch.float32) / (w - 1)).view(1, 1, 1, w).expand(4, 1, w, w).contiguous()
    y = ViewGenerator(identity(crop_scale=(0.25, 0.25)))(ramp, gen(0))
    # A 16-pixel box resized to 32 samples x = left + u / 2 - 1/4 for u = 0..31: a span of 15.5 pixels
    # (15.25 where the box touches the border, which clamps), i.e. about half the ramp, increasing.
    span = y[:, 0, :, -1] - y[:, 0, :, 0]
    assert ((span >= 15.25 / 31 - 1e-5) & (span <= 15.5 / 31 + 1e-5)).all()
    assert (y[..., 1:] >= y[..., :-1] - 1e-6).all()


def test_uint8_roundtrip():
    x = torch.tensor([0.0, 0.5, 1.0, 1.2, -0.1, 0.998])
    u = to_uint8(x)
    assert u.dtype == torch.uint8
    assert u.tolist() == [0, 128, 255, 255, 0, 254]
    back = to_float(u)
    assert back.dtype == torch.float32
    assert torch.equal(to_uint8(back), u)


def test_config_validation_and_presets():
    with pytest.raises(pydantic.ValidationError):
        ViewConfig(flip_p=1.5)
    with pytest.raises(pydantic.ValidationError):
        ViewConfig(crop_scale=(0.9, 0.5))
    with pytest.raises(pydantic.ValidationError):
        ViewConfig(crop_ratio=(0.0, 1.0))
    with pytest.raises(pydantic.ValidationError):
        ViewConfig(blur_sigma=(2.0, 0.1))
    with pytest.raises(pydantic.ValidationError):
        ViewConfig(jitter=(0.4, 0.4, 0.4, 0.7))
    with pytest.raises(pydantic.ValidationError):
        ViewConfig(unknown=1)
    config = ViewConfig()
    with pytest.raises(pydantic.ValidationError):
        config.flip_p = 0.1  # type: ignore[misc]

    proto = ViewConfig.rda_prototype()
    assert proto.crop_scale == (0.9, 0.9) and proto.crop_ratio == (1.0, 1.0)
    assert proto.jitter == (0.4, 0.4, 0.4, 0.2) and proto.jitter_p == 0.8
    assert (proto.flip_p, proto.grayscale_p, proto.blur_p, proto.solarize_p) == (0.5, 0.2, 0.1, 0.1)
    assert proto.blur_sigma == (0.1, 2.0)
    train = ViewConfig.rda_train()
    assert train.crop_scale == (0.75, 0.75)
    assert train.model_dump(exclude={"crop_scale"}) == proto.model_dump(exclude={"crop_scale"})
    assert ViewConfig.simclr().blur_p == 0.0


def test_rejects_bad_input():
    vg = ViewGenerator(ViewConfig())
    with pytest.raises(ValueError):
        vg(torch.rand(2, 2, 8, 8))
    with pytest.raises(TypeError):
        vg(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
