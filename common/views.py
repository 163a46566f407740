"""Batched random augmentations ("views") of image tensors.

Every op works on a whole batch ``[B, C, H, W]`` of float32 images in ``[0, 1]`` (``C`` = 1 or 3) at
once, and every sample draws its own parameters from an optional :class:`torch.Generator`, so a
seeded generator gives the same views again. No per-sample Python loop and no torchvision transform
objects: a batch of 256 images takes milliseconds on a CPU. Normalisation is *not* part of the views;
the models of this project normalise inside.

The ops follow torchvision's semantics (``RandomResizedCrop``, ``RandomHorizontalFlip``,
``ColorJitter``, ``RandomGrayscale``, ``GaussianBlur``, ``RandomSolarize``), applied in that order,
each to a per-sample Bernoulli mask:

- random resized crop + horizontal flip: one batched affine ``F.affine_grid`` + ``F.grid_sample``
  (bilinear, ``align_corners=False``, border padding) with a per-sample matrix. The box is sampled as
  torchvision does (area fraction in ``crop_scale``, log-uniform aspect ratio in ``crop_ratio``,
  width and height rounded to whole pixels, up to 10 attempts, a uniform integer position, and the
  centre-crop fallback when no attempt fits). Unlike torchvision's resize of the cut-out box, the
  bilinear samples at the box's edge may read the pixel just outside it.
- colour jitter (Chen et al. 2020 / torchvision ``ColorJitter``): brightness, contrast, saturation
  and hue factors drawn per sample, applied in a random order drawn *per sample* (torchvision draws
  one order per call); ``ViewConfig.jitter_random_order = False`` gives the fixed order brightness,
  contrast, saturation, hue. Hue goes through a batched RGB <-> HSV conversion.
- grayscale: ``0.299 R + 0.587 G + 0.114 B`` replicated to the three channels.
- Gaussian blur: per-sample sigma, separable depthwise convolution with per-sample kernels, reflect
  padding; kernel size about 10% of the image side, odd, at least 3 (SimCLR's rule).
- solarize: ``x -> where(x >= threshold, 1 - x, x)``.

For single-channel images, saturation, hue and grayscale are no-ops (as in torchvision).

Presets: :meth:`ViewConfig.simclr` (SimCLR CIFAR views), :meth:`ViewConfig.rda_prototype` and
:meth:`ViewConfig.rda_train` (RDA, Wu et al. ECCV 2024, released code), and
:meth:`ViewConfig.stolen_encoder` (a mild view for the StolenEncoder baseline).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Self

import pydantic
import torch
import torch.nn.functional as F

__all__ = [
    "ViewConfig",
    "ViewGenerator",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "blur_kernel_size",
    "gaussian_blur",
    "grayscale",
    "hsv_to_rgb",
    "rgb_to_hsv",
    "sample_crop_boxes",
    "solarize",
    "to_float",
    "to_uint8",
]

_LUMA = (0.299, 0.587, 0.114)
_CROP_ATTEMPTS = 10


class ViewConfig(pydantic.BaseModel):
    """Parameters of one family of random views (frozen, validated).

    The defaults are the SimCLR ImageNet-style views of Chen et al. 2020 ("A Simple Framework for
    Contrastive Learning of Visual Representations"): RandomResizedCrop scale (0.08, 1), ratio
    (3/4, 4/3); flip 0.5; ColorJitter(0.4, 0.4, 0.4, 0.1) with p 0.8; grayscale 0.2; blur p 0.5 with
    sigma in [0.1, 2.0]; no solarisation.

    Attributes:
        crop_scale: range of the crop's area as a fraction of the image area, in (0, 1].
        crop_ratio: range of the crop's aspect ratio (width / height), sampled log-uniformly.
        flip_p: probability of a horizontal flip.
        jitter: colour-jitter strengths (brightness, contrast, saturation, hue); factors are drawn
            uniformly in ``[max(0, 1 - s), 1 + s]`` for the first three and ``[-h, h]`` for hue
            (``h <= 0.5``), as torchvision's ``ColorJitter`` does. A strength of 0 disables that op.
        jitter_p: probability of applying the colour jitter.
        jitter_random_order: draw a random order of the four jitter ops per sample (torchvision
            draws one per call); ``False`` uses brightness, contrast, saturation, hue.
        grayscale_p: probability of converting to grayscale.
        blur_p: probability of a Gaussian blur.
        blur_sigma: range of the blur's sigma, drawn uniformly per sample.
        blur_kernel_size: odd kernel size; ``None`` for about 10% of the shorter image side, odd,
            at least 3 (SimCLR's choice).
        solarize_p: probability of solarisation.
        solarize_threshold: pixels ``>= threshold`` are inverted.
    """

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = pydantic.Field(default=0.5, ge=0.0, le=1.0)
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    jitter_p: float = pydantic.Field(default=0.8, ge=0.0, le=1.0)
    jitter_random_order: bool = True
    grayscale_p: float = pydantic.Field(default=0.2, ge=0.0, le=1.0)
    blur_p: float = pydantic.Field(default=0.5, ge=0.0, le=1.0)
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel_size: int | None = pydantic.Field(default=None, ge=1)
    solarize_p: float = pydantic.Field(default=0.0, ge=0.0, le=1.0)
    solarize_threshold: float = pydantic.Field(default=0.5, ge=0.0, le=1.0)

    @pydantic.model_validator(mode="after")
    def _check(self) -> Self:
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        lo, hi = self.crop_ratio
        if not 0.0 < lo <= hi:
            raise ValueError(f"crop_ratio must satisfy 0 < low <= high, got {self.crop_ratio}")
        if any(s < 0.0 for s in self.jitter):
            raise ValueError(f"jitter strengths must be >= 0, got {self.jitter}")
        if self.jitter[3] > 0.5:
            raise ValueError(f"hue jitter must be in [0, 0.5], got {self.jitter[3]}")
        lo, hi = self.blur_sigma
        if not 0.0 < lo <= hi:
            raise ValueError(f"blur_sigma must satisfy 0 < low <= high, got {self.blur_sigma}")
        if self.blur_kernel_size is not None and self.blur_kernel_size % 2 == 0:
            raise ValueError(f"blur_kernel_size must be odd, got {self.blur_kernel_size}")
        return self

    @classmethod
    def simclr(cls) -> ViewConfig:
        """SimCLR's CIFAR views (Chen et al. 2020, appendix B.9).

        RandomResizedCrop scale (0.08, 1), ratio (3/4, 4/3); flip 0.5; colour distortion of strength
        0.5, i.e. ColorJitter(0.4, 0.4, 0.4, 0.1) with p 0.8; grayscale 0.2; no Gaussian blur (the
        paper drops it for CIFAR's 32x32 images); no solarisation.
        """
        return cls(blur_p=0.0)

    @classmethod
    def rda_prototype(cls) -> ViewConfig:
        """RDA's prototype views (Wu et al., ECCV 2024, released code; see PAPERS.md).

        RandomResizedCrop scale (0.9, 0.9) (the code notes this scale is critical), ratio (1, 1);
        flip 0.5; ColorJitter(0.4, 0.4, 0.4, 0.2) with p 0.8; grayscale 0.2; Gaussian blur p 0.1,
        sigma in [0.1, 2.0]; solarisation p 0.1 (threshold 0.5). The code's Normalize(0.5, 0.5) is
        left to the models.
        """
        return cls(
            crop_scale=(0.9, 0.9),
            crop_ratio=(1.0, 1.0),
            flip_p=0.5,
            jitter=(0.4, 0.4, 0.4, 0.2),
            jitter_p=0.8,
            grayscale_p=0.2,
            blur_p=0.1,
            blur_sigma=(0.1, 2.0),
            solarize_p=0.1,
            solarize_threshold=0.5,
        )

    @classmethod
    def rda_train(cls) -> ViewConfig:
        """RDA's training views: the prototype views with crop scale (0.75, 0.75) (released code)."""
        return cls.rda_prototype().model_copy(update={"crop_scale": (0.75, 0.75)})

    @classmethod
    def stolen_encoder(cls) -> ViewConfig:
        """A mild view for the StolenEncoder baseline (Liu et al., CCS 2022).

        StolenEncoder trains on the victim's embedding of the clean image and of one augmented view;
        the augmentation only has to perturb the image a little. Chosen here (not from the paper):
        RandomResizedCrop scale (0.5, 1), ratio (3/4, 4/3); flip 0.5; light ColorJitter(0.2, 0.2,
        0.2, 0.05) with p 0.5; no grayscale, blur or solarisation.
        """
        return cls(
            crop_scale=(0.5, 1.0),
            crop_ratio=(3 / 4, 4 / 3),
            flip_p=0.5,
            jitter=(0.2, 0.2, 0.2, 0.05),
            jitter_p=0.5,
            grayscale_p=0.0,
            blur_p=0.0,
            solarize_p=0.0,
        )


# --------------------------------------------------------------------------------------------------
# uint8 <-> float


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] to uint8: ``round(x * 255)`` clamped to [0, 255]."""
    return (x * 255.0).round().clamp(0, 255).to(torch.uint8)


def to_float(x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 images to float32 in [0, 1] (``x / 255``)."""
    return x_uint8.to(torch.float32) / 255.0


# --------------------------------------------------------------------------------------------------
# Per-sample colour ops: ``x`` is [B, C, H, W], ``factor`` is [B].


def _per_sample(factor: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return factor.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma ``0.299 R + 0.587 G + 0.114 B`` replicated to 3 channels; a 1-channel image is returned as is."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(dim=1)
    luma = _LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b
    return luma.unsqueeze(1).expand_as(x).contiguous()


def _luma(x: torch.Tensor) -> torch.Tensor:
    return x if x.shape[1] == 1 else grayscale(x)[:, :1]


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``clamp(factor * x, 0, 1)`` per sample (torchvision ``adjust_brightness``)."""
    return (x * _per_sample(factor, x)).clamp(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend each image with the mean of its luma (torchvision ``adjust_contrast``)."""
    f = _per_sample(factor, x)
    mean = _luma(x).mean(dim=(1, 2, 3), keepdim=True)
    return (f * x + (1.0 - f) * mean).clamp(0.0, 1.0)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend each image with its grayscale version (torchvision ``adjust_saturation``); no-op for C = 1."""
    if x.shape[1] == 1:
        return x
    f = _per_sample(factor, x)
    return (f * x + (1.0 - f) * grayscale(x)).clamp(0.0, 1.0)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """Batched RGB -> HSV, all channels in [0, 1] (the formulas of torchvision's tensor backend)."""
    r, g, b = x.unbind(dim=1)
    maxc = x.amax(dim=1)
    minc = x.amin(dim=1)
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    cr_div = torch.where(eqc, ones, cr)
    rc = (maxc - r) / cr_div
    gc = (maxc - g) / cr_div
    bc = (maxc - b) / cr_div
    is_r = maxc == r
    is_g = (maxc == g) & ~is_r
    is_b = ~is_g & ~is_r
    h = is_r * (bc - gc) + is_g * (2.0 + rc - bc) + is_b * (4.0 + gc - rc)
    h = torch.fmod(h / 6.0 + 1.0, 1.0)
    return torch.stack((h, s, maxc), dim=1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """Batched HSV -> RGB: channel n of (R, G, B) is ``v - v s clamp(min(k, 4 - k), 0, 1)``,
    ``k = (n + 6 h) mod 6`` with n = 5, 3, 1."""
    h, s, v = x.unbind(dim=1)
    n = torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = torch.remainder(n + 6.0 * h.unsqueeze(1), 6.0)
    a = torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)
    return (v.unsqueeze(1) * (1.0 - s.unsqueeze(1) * a)).clamp(0.0, 1.0)


def adjust_hue(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by ``factor`` [B] (a fraction of the colour wheel, in [-0.5, 0.5]); no-op for C = 1."""
    if x.shape[1] == 1:
        return x
    hsv = rgb_to_hsv(x)
    h = torch.remainder(hsv[:, 0] + factor.to(device=x.device, dtype=x.dtype).view(-1, 1, 1), 1.0)
    return hsv_to_rgb(torch.stack((h, hsv[:, 1], hsv[:, 2]), dim=1))


def solarize(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """``where(x >= threshold, 1 - x, x)`` (torchvision ``solarize`` for float images)."""
    return torch.where(x >= threshold, 1.0 - x, x)


def blur_kernel_size(height: int, width: int) -> int:
    """About 10% of the shorter side, odd, at least 3 (SimCLR: 23 for 224), and smaller than the image."""
    side = min(height, width)
    size = max(3, int(0.1 * side))
    if size % 2 == 0:
        size += 1
    # Reflect padding needs kernel_size // 2 < side.
    while size > 1 and size // 2 >= side:
        size -= 2
    return size


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur with a per-sample ``sigma`` [B] and reflect padding.

    The kernel is torchvision's: ``exp(-0.5 (t / sigma)^2)`` at ``t = -(k-1)/2 .. (k-1)/2``,
    normalised to sum 1; one depthwise convolution per axis with per-sample kernels.
    """
    B, C, H, W = x.shape
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
    half = (kernel_size - 1) / 2
    t = torch.linspace(-half, half, kernel_size, device=x.device, dtype=x.dtype)
    s = sigma.to(device=x.device, dtype=x.dtype).view(-1, 1)
    kernel = torch.exp(-0.5 * (t.view(1, -1) / s) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    kernel = kernel.repeat_interleave(C, dim=0)  # [B*C, k]
    pad = kernel_size // 2
    y = x.reshape(1, B * C, H, W)
    y = F.pad(y, (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, kernel.view(B * C, 1, 1, kernel_size), groups=B * C)
    y = F.conv2d(y, kernel.view(B * C, 1, kernel_size, 1), groups=B * C)
    return y.reshape(B, C, H, W)


# --------------------------------------------------------------------------------------------------
# Geometry


def sample_crop_boxes(
    batch: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per-sample RandomResizedCrop boxes ``[B, 4]`` as (top, left, h, w) in pixels (float64).

    torchvision's ``RandomResizedCrop.get_params``, batched: up to 10 attempts of an area fraction
    in ``scale`` and a log-uniform aspect ratio in ``ratio``, ``w, h`` rounded; the first attempt
    that fits is placed at a uniform integer position; if none fits, a centre crop of the whole image
    clipped to the ratio range.
    """
    device = generator.device if generator is not None else torch.device("cpu")
    f64 = torch.float64
    area = float(height * width)
    u_scale = torch.rand(batch, _CROP_ATTEMPTS, generator=generator, device=device, dtype=f64)
    u_ratio = torch.rand(batch, _CROP_ATTEMPTS, generator=generator, device=device, dtype=f64)
    u_pos = torch.rand(batch, 2, generator=generator, device=device, dtype=f64)

    target = area * (scale[0] + (scale[1] - scale[0]) * u_scale)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u_ratio)
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.int8).argmax(dim=1, keepdim=True)
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)
    found = fits.any(dim=1)

    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = float(width), float(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fh, fw = float(height), float(round(height * max(ratio)))
    else:
        fw, fh = float(width), float(height)
    w = torch.where(found, w, torch.full_like(w, fw))
    h = torch.where(found, h, torch.full_like(h, fh))

    top = torch.floor(u_pos[:, 0] * (height - h + 1)).clamp(max=height - h)
    left = torch.floor(u_pos[:, 1] * (width - w + 1)).clamp(max=width - w)
    top = torch.where(found, top, torch.floor((height - h) / 2))
    left = torch.where(found, left, torch.floor((width - w) / 2))
    return torch.stack((top, left, h, w), dim=1)


def _crop_flip_theta(boxes: torch.Tensor, flip: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Affine matrices [B, 2, 3] mapping output coordinates to the crop box (and mirroring x if flip)."""
    top, left, h, w = boxes.unbind(dim=1)
    sx = w / width
    sy = h / height
    tx = 2.0 * (left + w / 2.0) / width - 1.0
    ty = 2.0 * (top + h / 2.0) / height - 1.0
    sign = torch.where(flip, -1.0, 1.0).to(boxes.dtype)
    zeros = torch.zeros_like(sx)
    row0 = torch.stack((sx * sign, zeros, tx), dim=1)
    row1 = torch.stack((zeros, sy, ty), dim=1)
    return torch.stack((row0, row1), dim=1)


# --------------------------------------------------------------------------------------------------


def _apply_masked(
    x: torch.Tensor, mask: torch.Tensor, fn: Callable[..., torch.Tensor], *params: torch.Tensor
) -> None:
    """``x[mask] = fn(x[mask], *params[mask])`` in place, computing only the selected samples."""
    idx = mask.nonzero().squeeze(1)
    if idx.numel() == 0:
        return
    idx = idx.to(x.device)
    picked = [p[idx.to(p.device)] for p in params]
    x[idx] = fn(x[idx], *picked)


class ViewGenerator:
    """Makes random views of whole batches according to a :class:`ViewConfig`.

    ``view(x)`` and ``view.views(x, n)`` take float32 ``[B, C, H, W]`` in [0, 1] (C = 1 or 3) and
    return float32 in [0, 1] of the same shape (``views``: ``[n, B, C, H, W]``). All parameters are
    drawn from ``generator`` (on the generator's device) or, when it is ``None``, from torch's
    global RNG; a seeded generator reproduces the views exactly.
    """

    def __init__(self, config: ViewConfig) -> None:
        self.config = config

    def __repr__(self) -> str:
        return f"ViewGenerator({self.config!r})"

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"expected images [B, C, H, W] with C in (1, 3), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"expected float images in [0, 1], got {x.dtype}; use to_float first")
        cfg = self.config
        B, C, H, W = x.shape
        x = x.to(torch.float32)
        rdev = generator.device if generator is not None else torch.device("cpu")

        def rand(*shape: int) -> torch.Tensor:
            return torch.rand(*shape, generator=generator, device=rdev)

        # Draw every parameter for every sample first, so the stream does not depend on the masks.
        boxes = sample_crop_boxes(B, H, W, cfg.crop_scale, cfg.crop_ratio, generator)
        flip = rand(B) < cfg.flip_p
        jitter_on = rand(B) < cfg.jitter_p
        u_jit = rand(B, 4)
        order = torch.argsort(rand(B, 4), dim=1)
        gray_on = rand(B) < cfg.grayscale_p
        blur_on = rand(B) < cfg.blur_p
        u_sigma = rand(B)
        solar_on = rand(B) < cfg.solarize_p

        # 1. Random resized crop + horizontal flip: one batched affine resampling.
        theta = _crop_flip_theta(boxes, flip, H, W)
        identity = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=theta.dtype, device=theta.device)
        if bool((theta != identity).any()):
            grid = F.affine_grid(theta.to(x.device, torch.float32), [B, C, H, W], align_corners=False)
            out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        else:
            out = x.clone()

        # 2. Colour jitter.
        b_s, c_s, s_s, h_s = cfg.jitter
        factors = [
            max(0.0, 1.0 - b_s) + (1.0 + b_s - max(0.0, 1.0 - b_s)) * u_jit[:, 0],
            max(0.0, 1.0 - c_s) + (1.0 + c_s - max(0.0, 1.0 - c_s)) * u_jit[:, 1],
            max(0.0, 1.0 - s_s) + (1.0 + s_s - max(0.0, 1.0 - s_s)) * u_jit[:, 2],
            -h_s + 2.0 * h_s * u_jit[:, 3],
        ]
        ops = [adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue]
        active = [b_s > 0, c_s > 0, s_s > 0 and C == 3, h_s > 0 and C == 3]
        if bool(jitter_on.any()) and any(active):
            if cfg.jitter_random_order:
                for position in range(4):
                    for op_index in range(4):
                        if active[op_index]:
                            mask = jitter_on & (order[:, position] == op_index)
                            _apply_masked(out, mask, ops[op_index], factors[op_index])
            else:
                for op_index in range(4):
                    if active[op_index]:
                        _apply_masked(out, jitter_on, ops[op_index], factors[op_index])

        # 3. Grayscale.
        if C == 3:
            _apply_masked(out, gray_on, grayscale)

        # 4. Gaussian blur.
        lo, hi = cfg.blur_sigma
        sigma = lo + (hi - lo) * u_sigma
        size = cfg.blur_kernel_size or blur_kernel_size(H, W)
        _apply_masked(out, blur_on, lambda t, s: gaussian_blur(t, s, size), sigma)

        # 5. Solarisation.
        threshold = cfg.solarize_threshold
        _apply_masked(out, solar_on, lambda t: solarize(t, threshold))

        return out.clamp_(0.0, 1.0)

    def views(self, x: torch.Tensor, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` independent views of every image: ``[n, B, C, H, W]`` (one batched call over n*B)."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        B = x.shape[0]
        stacked = x.unsqueeze(0).expand(n, *x.shape).reshape(n * B, *x.shape[1:])
        return self(stacked, generator).view(n, B, *x.shape[1:])
