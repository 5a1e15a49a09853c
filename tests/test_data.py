"""Data sets: the embedded ones against their sources, tiny files in each on-disk format read back, the device
loader."""
from __future__ import annotations

import gzip
import os
import pickle
import random
import signal
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from torchsaq.train import data as sdata
from torchsaq.train.data import (DATASETS, DEFAULT_MODELS, AugmentedTensorDataset, DataBundle, DeviceLoader,
                                 TensorAugment, TransformSubset, build_datasets, read_idx)


def _rows(t: torch.Tensor) -> set[bytes]:
    return {r.numpy().tobytes() for r in t}


# -- embedded data sets ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_mnist1d_matches_generator_and_keeps_global_rng():
    import mnist1d.data

    sdata._mnist1d_arrays.cache_clear()
    random.seed(123)
    np.random.seed(123)
    expect_py, expect_np = random.random(), np.random.rand()
    random.seed(123)
    np.random.seed(123)
    b = build_datasets("mnist1d")
    assert (random.random(), np.random.rand()) == (expect_py, expect_np)  # mnist1d's seeding undone

    ref = mnist1d.data.make_dataset(mnist1d.data.get_dataset_args())
    assert isinstance(b, DataBundle) and b.name == "mnist1d" and b.val is None
    x, y = b.train.tensors
    xt, yt = b.test.tensors
    assert x.shape == (4000, 1, 40) and xt.shape == (1000, 1, 40) and x.dtype == torch.float32
    assert b.input_shape == (1, 40) and b.in_chans == 1 and b.num_classes == 10
    np.testing.assert_allclose(x[:, 0].numpy(), ref["x"], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(yt.numpy(), ref["y_test"])
    assert set(y.tolist()) == set(range(10))


def test_mnist1d_cached_and_independent():
    a = build_datasets("mnist1d")
    a.train.tensors[0].zero_()  # a caller mutating its copy must not affect the next build
    b = build_datasets("mnist1d")
    assert b.train.tensors[0].abs().sum() > 0
    assert sdata._mnist1d_arrays.cache_info().hits >= 1


def test_mnist1d_val_split_disjoint_and_deterministic():
    full = build_datasets("mnist1d")
    b1 = build_datasets("mnist1d", val_split=0.1, seed=3)
    b2 = build_datasets("mnist1d", val_split=0.1, seed=3)
    b3 = build_datasets("mnist1d", val_split=0.1, seed=4)
    assert len(b1.train) == 3600 and len(b1.val) == 400 and len(b1.test) == 1000
    tr, va, all_rows = _rows(b1.train.tensors[0]), _rows(b1.val.tensors[0]), _rows(full.train.tensors[0])
    assert not tr & va and tr | va == all_rows
    assert torch.equal(b1.val.tensors[0], b2.val.tensors[0]) and torch.equal(b1.val.tensors[1], b2.val.tensors[1])
    assert _rows(b3.val.tensors[0]) != va
    assert torch.equal(b1.test.tensors[0], full.test.tensors[0])  # the test set is never touched


def test_digits_split_and_normalisation():
    from sklearn.datasets import load_digits

    b = build_datasets("digits")
    x, y = b.train.tensors
    xt, yt = b.test.tensors
    assert x.shape == (1437, 1, 8, 8) and xt.shape == (360, 1, 8, 8)
    assert b.input_shape == (1, 8, 8) and b.num_classes == 10 and b.in_chans == 1
    assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1) < 1e-3
    counts = torch.bincount(yt, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: 36 per class
    # undo the normalisation and find every sample among scikit-learn's images (as a 0..16 integer grid)
    d = load_digits()
    ref = {(img.astype(np.int64).tobytes(), int(t)) for img, t in zip(d.images, d.target)}
    m, s = _affine_from(x)
    for xs, ys in ((x, y), (xt, yt)):
        grid = np.rint((xs.numpy() * s + m) * 16).astype(np.int64)[:, 0]
        assert all((g.tobytes(), int(t)) in ref for g, t in zip(grid, ys))
    b2 = build_datasets("digits", val_split=0.2, seed=1)
    assert len(b2.train) + len(b2.val) == 1437 and not _rows(b2.train.tensors[0]) & _rows(b2.val.tensors[0])


def _affine_from(x: torch.Tensor) -> tuple[float, float]:
    """(offset, scale) mapping normalised values back to [0, 1], from the min (raw 0) and max (raw 1) pixels."""
    lo, hi = float(x.min()), float(x.max())
    s = 1.0 / (hi - lo)  # normalised max - min spans raw 1 - 0
    return -lo * s, s


def test_bad_names_and_options():
    with pytest.raises(ValueError, match="unknown data set 'cifar'.*cifar10"):
        build_datasets("cifar")
    with pytest.raises(ValueError, match="fixed input size"):
        build_datasets("mnist1d", img_size=32)
    with pytest.raises(ValueError, match="val_split"):
        build_datasets("digits", val_split=1.0)
    assert set(DATASETS) == {"mnist1d", "digits", "fashion_mnist", "cifar10", "cifar100", "imagenet", "imagefolder",
                             "flowers102", "pets"}


# -- tiny on-disk data sets ------------------------------------------------------------------------------

def _accept_any_md5(monkeypatch):
    """torchvision checks the real files' md5; the tiny test files only need to exist."""
    import torchvision.datasets.cifar as cifar
    import torchvision.datasets.flowers102 as flowers

    def ok(fpath, md5=None):
        return os.path.isfile(fpath)
    monkeypatch.setattr(cifar, "check_integrity", ok)
    monkeypatch.setattr(flowers, "check_integrity", ok)


def _write_cifar(root, hundred: bool, rng: np.random.Generator) -> dict:
    """CIFAR python-version pickles with a few images each; returns the arrays written."""
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    classes = 100 if hundred else 10
    key = "fine_labels" if hundred else "labels"
    written = {}
    names = ["train", "test"] if hundred else [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = 4 if "test" in name else 3
        x = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        y = rng.integers(0, classes, size=n).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({"data": x, key: y}, f)
        written[name] = (x, y)
    meta = {"fine_label_names": [f"c{i}" for i in range(100)]} if hundred else \
        {"label_names": [f"c{i}" for i in range(10)]}
    with open(folder / ("meta" if hundred else "batches.meta"), "wb") as f:
        pickle.dump(meta, f)
    return written


@pytest.mark.parametrize("hundred", [False, True])
def test_cifar_from_python_pickles(tmp_path, monkeypatch, hundred):
    _accept_any_md5(monkeypatch)
    written = _write_cifar(tmp_path, hundred, np.random.default_rng(0))
    name = "cifar100" if hundred else "cifar10"
    b = build_datasets(name, data_dir=tmp_path)
    assert b.num_classes == (100 if hundred else 10) and b.input_shape == (3, 32, 32) and b.in_chans == 3
    assert len(b.train) == (3 if hundred else 15) and len(b.test) == 4 and b.val is None
    # the test image through the eval transform: (pixel / 255 - mean) / std, written out in float64
    x_raw, y_raw = written["test" if hundred else "test_batch"]
    mean = np.array(sdata.CIFAR100_MEAN if hundred else sdata.CIFAR10_MEAN)[:, None, None]
    std = np.array(sdata.CIFAR100_STD if hundred else sdata.CIFAR10_STD)[:, None, None]
    img, label = b.test[2]
    expected = (x_raw[2].reshape(3, 32, 32).astype(np.float64) / 255.0 - mean) / std
    assert label == y_raw[2]
    np.testing.assert_allclose(img.numpy(), expected, atol=1e-5)
    x_tr, _ = b.train[0]
    assert x_tr.shape == (3, 32, 32) and x_tr.dtype == torch.float32
    # data_dir may also point at the extracted folder itself
    b_inner = build_datasets(name, data_dir=tmp_path / ("cifar-100-python" if hundred else "cifar-10-batches-py"))
    assert len(b_inner.test) == 4


def test_cifar_val_split_uses_eval_transform_and_is_deterministic(tmp_path, monkeypatch):
    _accept_any_md5(monkeypatch)
    written = _write_cifar(tmp_path, False, np.random.default_rng(1))
    b = build_datasets("cifar10", data_dir=tmp_path, val_split=0.2, seed=5)
    b_again = build_datasets("cifar10", data_dir=tmp_path, val_split=0.2, seed=5)
    assert isinstance(b.train, TransformSubset) and isinstance(b.val, TransformSubset)
    assert len(b.train) == 12 and len(b.val) == 3
    assert not set(b.train.indices) & set(b.val.indices)
    assert sorted(b.train.indices + b.val.indices) == list(range(15))
    assert b.val.indices == b_again.val.indices
    # val items are the training images under the deterministic eval transform
    train_x = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    train_y = sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    mean, std = np.array(sdata.CIFAR10_MEAN)[:, None, None], np.array(sdata.CIFAR10_STD)[:, None, None]
    for j, idx in enumerate(b.val.indices):
        img, label = b.val[j]
        assert label == train_y[idx]
        expected = (train_x[idx].reshape(3, 32, 32) / 255.0 - mean) / std
        np.testing.assert_allclose(img.numpy(), expected, atol=1e-5)


def test_cifar_upsampled_for_vit(tmp_path, monkeypatch):
    _accept_any_md5(monkeypatch)
    _write_cifar(tmp_path, True, np.random.default_rng(2))
    b = build_datasets("cifar100", data_dir=tmp_path, img_size=64)
    assert b.input_shape == (3, 64, 64)
    assert b.train[0][0].shape == (3, 64, 64) and b.test[0][0].shape == (3, 64, 64)


def test_cifar_md5_mismatch_is_a_value_error(tmp_path):
    _write_cifar(tmp_path, False, np.random.default_rng(3))
    with pytest.raises(ValueError, match="did not pass torchvision's check.*cifar-10-batches-py"):
        build_datasets("cifar10", data_dir=tmp_path)


def _png(path, rng, size=(20, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)).save(path)


def _write_folders(root, splits, classes=("cat", "dog"), per_class=2, ext="png"):
    rng = np.random.default_rng(0)
    for split in splits:
        for c in classes:
            for i in range(per_class):
                _png(root / split / c / f"{i}.{ext}", rng)


@pytest.mark.parametrize("name", ["imagenet", "imagefolder"])
def test_image_folder_sets(tmp_path, name):
    _write_folders(tmp_path, ["train", "val"], per_class=3)
    b = build_datasets(name, data_dir=tmp_path, img_size=32)
    assert b.num_classes == 2 and b.classes == ["cat", "dog"] and b.input_shape == (3, 32, 32)
    assert len(b.train) == 6 and len(b.test) == 6 and b.val is None
    img, label = b.test[5]
    assert img.shape == (3, 32, 32) and label == 1
    assert b.train[0][0].shape == (3, 32, 32)
    torch.testing.assert_close(b.test[0][0], b.test[0][0])  # eval transform is deterministic
    bv = build_datasets(name, data_dir=tmp_path, img_size=32, val_split=0.5, seed=0)
    assert len(bv.train) == 3 and len(bv.val) == 3 and not set(bv.train.indices) & set(bv.val.indices)


def test_imagefolder_with_val_and_test(tmp_path):
    _write_folders(tmp_path, ["train", "val", "test"])
    b = build_datasets("imagefolder", data_dir=tmp_path, img_size=24)
    assert b.val is not None and len(b.val) == 4 and len(b.test) == 4
    with pytest.raises(ValueError, match="own val/"):
        build_datasets("imagefolder", data_dir=tmp_path, val_split=0.5)


def test_imagefolder_class_mismatch(tmp_path):
    _write_folders(tmp_path, ["train"], classes=("a", "b", "c"))
    _write_folders(tmp_path, ["test"], classes=("a", "c"))
    with pytest.raises(ValueError, match="different class folders.*'b'"):
        build_datasets("imagefolder", data_dir=tmp_path)


def test_flowers102(tmp_path, monkeypatch):
    from scipy.io import savemat

    _accept_any_md5(monkeypatch)
    base = tmp_path / "flowers-102"
    rng = np.random.default_rng(0)
    for i in range(1, 9):
        _png(base / "jpg" / f"image_{i:05d}.jpg", rng, size=(40, 30))
    labels = np.array([[5, 5, 102, 1, 7, 7, 3, 3]])  # 1-based labels of image 1..8
    savemat(base / "imagelabels.mat", {"labels": labels})
    savemat(base / "setid.mat", {"trnid": np.array([[1, 2, 3]]), "valid": np.array([[4, 5]]),
                                 "tstid": np.array([[6, 7, 8]])})
    b = build_datasets("flowers102", data_dir=tmp_path, img_size=32)
    assert b.num_classes == 102 and b.input_shape == (3, 32, 32)
    assert len(b.train) == 5 and len(b.test) == 3  # train + val splits for training
    assert [b.train[i][1] for i in range(5)] == [4, 4, 101, 0, 6]
    assert [b.test[i][1] for i in range(3)] == [6, 2, 2]
    assert b.test[0][0].shape == (3, 32, 32)


def test_pets_without_trimaps(tmp_path):
    base = tmp_path / "oxford-iiit-pet"
    rng = np.random.default_rng(0)
    rows = {"trainval": [("Abyssinian_1", 1, 1), ("Abyssinian_2", 1, 1), ("american_bulldog_1", 2, 2)],
            "test": [("Abyssinian_3", 1, 1), ("american_bulldog_2", 2, 2)]}
    for split, items in rows.items():
        for image_id, _, _ in items:
            _png(base / "images" / f"{image_id}.jpg", rng, size=(30, 30))
        (base / "annotations").mkdir(parents=True, exist_ok=True)
        (base / "annotations" / f"{split}.txt").write_text(
            "".join(f"{i} {c} {s} 1\n" for i, c, s in items))
    assert not (base / "annotations" / "trimaps").exists()
    b = build_datasets("pets", data_dir=tmp_path, img_size=32)
    assert b.num_classes == 37 and len(b.train) == 3 and len(b.test) == 2
    assert [b.train[i][1] for i in range(3)] == [0, 0, 1] and b.test[1][1] == 1
    assert b.train[0][0].shape == (3, 32, 32)


@pytest.mark.parametrize("name,expect", [
    ("cifar10", "cifar-10-batches-py/.*python version of CIFAR-10"),
    ("cifar100", "cifar-100-python/.*python version of CIFAR-100"),
    ("imagenet", "<dir>/train/<class>/.*<dir>/val/<class>/"),
    ("imagefolder", "<dir>/train/<class>/.*test/<class>/.*val/<class>/"),
    ("flowers102", "flowers-102/jpg/image_00001.jpg.*imagelabels.mat.*setid.mat"),
    ("pets", "oxford-iiit-pet/images/.*annotations/trainval.txt"),
])
def test_wrong_path_names_expected_layout(tmp_path, name, expect):
    with pytest.raises(ValueError, match=f"{name}: no data_dir given; expected .*{expect}"):
        build_datasets(name)
    with pytest.raises(ValueError, match=f"directory not found.*expected .*{expect}"):
        build_datasets(name, data_dir=tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=f"missing .*expected .*{expect}"):
        build_datasets(name, data_dir=tmp_path / "empty")



# -- Fashion-MNIST from IDX files --------------------------------------------------------------------------

_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(">i2"): 0x0B, np.dtype(">i4"): 0x0C,
          np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}


def _idx_bytes(a: np.ndarray) -> bytes:
    """An IDX file's bytes written out by hand: 0, 0, dtype code, ndim, big-endian uint32 dims, big-endian data."""
    big = a.astype(a.dtype.newbyteorder(">")) if a.dtype.itemsize > 1 else a
    return bytes([0, 0, _CODES[big.dtype], a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape) + big.tobytes()


def _write(path, payload: bytes, gz: bool):
    path = path.with_name(path.name + ".gz") if gz else path
    path.write_bytes(gzip.compress(payload) if gz else payload)
    return path


def _write_fmnist(root, n_train=40, n_test=12, gz=(True, False, False, True), seed=0) -> dict:
    """The four Fashion-MNIST files with random content (some gzip-ed); returns the arrays written."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
              "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
              "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8)}
    for (name, a), z in zip(arrays.items(), gz):
        _write(root / name, _idx_bytes(a), z)
    return arrays


@pytest.fixture
def no_system_fmnist(monkeypatch, tmp_path):
    """Tests never read the Debian package's copy: its folder points at an empty place."""
    nowhere = tmp_path / "no-system-fashion-mnist"
    monkeypatch.setattr(sdata, "FASHION_MNIST_SYSTEM_DIR", str(nowhere))
    return nowhere


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dtype,shape", [(np.uint8, (5, 3, 4)), (np.uint8, (7,)), (np.int8, (2, 3)),
                                         (">i2", (4, 2)), (">i4", (3,)), (">f4", (2, 2, 2)), (">f8", (3, 1))])
def test_read_idx_matches_numpy(tmp_path, gz, dtype, shape):
    rng = np.random.default_rng(1)
    a = (rng.standard_normal(shape) * 100).astype(dtype)
    path = _write(tmp_path / "x-idx", _idx_bytes(a), gz)
    got = read_idx(path)
    assert got.shape == a.shape and got.dtype == a.dtype.newbyteorder("=")
    np.testing.assert_array_equal(got, a)
    got.reshape(-1)[0] = 0  # a writable copy, native byte order


@pytest.mark.parametrize("val_split", [0.0, 0.25])
def test_fashion_mnist_from_idx_files(tmp_path, no_system_fmnist, val_split):
    arrays = _write_fmnist(tmp_path)
    b = build_datasets("fashion_mnist", data_dir=tmp_path, val_split=val_split, seed=2)
    assert b.name == "fashion_mnist" and b.num_classes == 10 and b.in_chans == 1 and b.input_shape == (1, 28, 28)
    assert b.classes[0] == "T-shirt/top" and b.classes[9] == "Ankle boot"
    norm = lambda u8: (u8.astype(np.float64) / 255.0 - 0.2860) / 0.3530  # noqa: E731
    xt, yt = b.test.tensors
    assert xt.shape == (12, 1, 28, 28) and xt.dtype == torch.float32 and yt.dtype == torch.int64
    np.testing.assert_allclose(xt[:, 0].numpy(), norm(arrays["t10k-images-idx3-ubyte"]), atol=1e-5)
    np.testing.assert_array_equal(yt.numpy(), arrays["t10k-labels-idx1-ubyte"])
    # training set: augmented per item (AugmentedTensorDataset), its stored tensors are the plain images
    assert isinstance(b.train, AugmentedTensorDataset)
    assert b.train.augment == TensorAugment(pad=2, flip=True, fill=-0.2860 / 0.3530)
    x, y = b.train.tensors
    rows = {(r.numpy().round(4).tobytes(), int(t)) for r, t in zip(x, y)}
    ref = {(norm(img).astype(np.float32).round(4).tobytes(), int(t))
           for img, t in zip(arrays["train-images-idx3-ubyte"], arrays["train-labels-idx1-ubyte"])}
    assert rows <= ref and len(x) == 40 - round(40 * val_split)
    # evaluation sets are never augmented: plain TensorDatasets, items identical on every read
    for ds in (b.val, b.test):
        if ds is not None:
            assert type(ds) is torch.utils.data.TensorDataset and not hasattr(ds, "augment")
            assert torch.equal(ds[3][0], ds[3][0])
    if val_split:
        assert len(b.val) == 10 and not _rows(b.val.tensors[0]) & _rows(x)
    # augment=False: the training set is plain too
    plain = build_datasets("fashion_mnist", data_dir=tmp_path, augment=False)
    assert type(plain.train) is torch.utils.data.TensorDataset
    with pytest.raises(ValueError, match="fixed input size"):
        build_datasets("fashion_mnist", data_dir=tmp_path, img_size=32)


def test_fashion_mnist_default_folder_is_the_debian_package(tmp_path, monkeypatch):
    system = tmp_path / "usr-share-datasets-fashion-mnist"
    _write_fmnist(system, gz=(True,) * 4)
    monkeypatch.setattr(sdata, "FASHION_MNIST_SYSTEM_DIR", str(system))
    assert len(build_datasets("fashion_mnist").train) == 40
    (tmp_path / "empty").mkdir()  # a --data-dir without the files is an error, never this copy (issue 21)
    with pytest.raises(ValueError, match="empty"):
        build_datasets("fashion_mnist", data_dir=tmp_path / "empty")


def _one_line_error(match: str, **kw) -> str:
    with pytest.raises(ValueError) as e:
        build_datasets("fashion_mnist", **kw)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("fashion_mnist: "), msg
    import re

    assert re.search(match, msg), msg
    return msg


def test_fashion_mnist_missing_files_say_where_and_how(tmp_path, no_system_fmnist):
    (tmp_path / "empty").mkdir()
    msg = _one_line_error("not in .*empty.* \\(--data-dir\\); install", data_dir=tmp_path / "empty")
    assert "apt-get install dataset-fashion-mnist" in msg and "into DIR and pass --data-dir DIR" in msg
    assert all(f in msg for f in sdata.FASHION_MNIST_FILES)
    msg = _one_line_error("not in .*no-system-fashion-mnist.*apt-get install dataset-fashion-mnist")
    assert "--data-dir)" not in msg
    _one_line_error("missing.* does not exist", data_dir=tmp_path / "missing")
    # some files but not all: that folder was meant, name what is missing there
    _write_fmnist(tmp_path / "part")
    (tmp_path / "part" / "t10k-labels-idx1-ubyte.gz").unlink()
    _one_line_error("'.*part' holds only some .*missing t10k-labels-idx1-ubyte", data_dir=tmp_path / "part")


def _corrupt(root, name: str, payload: bytes, gz: bool = False) -> None:
    for old in root.glob(name + "*"):
        old.unlink()
    _write(root / name, payload, gz)


@pytest.mark.parametrize("case", ["labels_as_images", "not_idx", "truncated", "truncated_header", "trailing",
                                  "truncated_gz", "not_gzip", "count_mismatch", "label_range", "image_size"])
def test_fashion_mnist_bad_files_name_the_file(tmp_path, no_system_fmnist, case):
    arrays = _write_fmnist(tmp_path)
    imgs, labels = arrays["train-images-idx3-ubyte"], arrays["train-labels-idx1-ubyte"]
    full = _idx_bytes(imgs)
    name, payload, gz, expect = {
        "labels_as_images": ("train-images-idx3-ubyte", _idx_bytes(labels), False,
                             "train-images-idx3-ubyte: wrong IDX magic number 2049 .*expected 2051"),
        "not_idx": ("t10k-labels-idx1-ubyte", b"PK\x03\x04 a zip file", False,
                    "t10k-labels-idx1-ubyte: not an IDX file \\(magic number 0x504b0304, expected 2049"),
        "truncated": ("train-images-idx3-ubyte", full[:-100], False,
                      "train-images-idx3-ubyte: truncated IDX file: .*40x28x28 uint8 \\(31360 data bytes\\), "
                      "the file holds 31260"),
        "truncated_header": ("t10k-images-idx3-ubyte", full[:10], True,
                             "t10k-images-idx3-ubyte.gz: truncated IDX file \\(10 bytes, shorter than its 16-byte"),
        "trailing": ("train-labels-idx1-ubyte", _idx_bytes(labels) + b"\0", False,
                     "train-labels-idx1-ubyte: IDX file with trailing bytes"),
        "truncated_gz": ("train-images-idx3-ubyte", gzip.compress(full)[:-20], False,
                         "train-images-idx3-ubyte: damaged or truncated gzip file"),
        "not_gzip": ("train-images-idx3-ubyte", b"\x1f\x8b" + b"\0" * 30, False,
                     "train-images-idx3-ubyte: damaged or truncated gzip file"),
        "count_mismatch": ("train-labels-idx1-ubyte", _idx_bytes(labels[:-1]), True,
                           "train-images-idx3-ubyte.gz holds 40 images but .*train-labels-idx1-ubyte.gz holds "
                           "39 labels"),
        "label_range": ("t10k-labels-idx1-ubyte", _idx_bytes(np.array([1, 2, 10, 3, 255] + [0] * 7, np.uint8)),
                        False,
                        "t10k-labels-idx1-ubyte: label 10 at index 2 is outside 0..9 \\(2 labels out of range\\)"),
        "image_size": ("t10k-images-idx3-ubyte", _idx_bytes(np.zeros((12, 32, 32), np.uint8)), False,
                       "t10k-images-idx3-ubyte: expected 28x28 images, found 32x32"),
    }[case]
    if case in ("truncated_gz", "not_gzip"):  # gzip bytes under the raw name: detected by content
        gz = False
    _corrupt(tmp_path, name, payload, gz)
    _one_line_error(expect, data_dir=tmp_path)


# -- default model per data set, models on 28x28 grey-scale ------------------------------------------------

def test_every_data_set_has_a_registered_default_model():
    from torchsaq.train.config import TrainConfig
    from torchsaq.train.models import list_models

    assert set(DEFAULT_MODELS) == set(DATASETS) and set(DEFAULT_MODELS.values()) <= set(list_models())
    assert {d: TrainConfig(dataset=d).model for d in ("mnist1d", "digits", "fashion_mnist", "cifar100", "imagenet")} \
        == {"mnist1d": "cnn1d", "digits": "cnn_digits", "fashion_mnist": "cnn_fmnist", "cifar100": "resnet20",
            "imagenet": "resnet18"}
    assert TrainConfig().model == "cnn1d"  # `torchsaq train` alone is unchanged
    assert TrainConfig(dataset="fashion_mnist", model="resnet20").model == "resnet20"
    assert TrainConfig.from_dict(TrainConfig(dataset="digits").to_dict()).model == "cnn_digits"  # stored resolved
    with pytest.raises(ValueError, match="unknown data set 'fashion-mnist' \\(did you mean fashion_mnist\\?\\)"):
        TrainConfig(dataset="fashion-mnist")
    with pytest.raises(ValueError, match="model_kwargs may not set num_classes: the data set gives"):
        TrainConfig(dataset="fashion_mnist", model="resnet20", model_kwargs={"num_classes": 10})
    with pytest.raises(ValueError, match="in_chans must be a positive int"):
        TrainConfig(model_kwargs={"in_chans": "1"})
    # in_chans in model_kwargs (the paper's ResNet-20 on grey-scale images) is accepted where it matches the data
    cfg = TrainConfig(dataset="fashion_mnist", model="resnet20", model_kwargs={"in_chans": 1, "shortcut": "B"})
    assert cfg.model_options(1) == {"shortcut": "B"}
    with pytest.raises(ValueError, match="in_chans=1 does not match the fashion_mnist inputs \\(3 channel"):
        cfg.model_options(3)


@pytest.mark.parametrize("name", ["cnn_fmnist", "resnet20", "preresnet20"])
def test_models_take_28x28_grey_scale(name):
    import torch.nn.functional as F

    import torchsaq as saq
    from torchsaq.train.models import create_model

    model = create_model(name, 10, in_chans=1)
    seen = {}
    model.pool.register_forward_pre_hook(lambda m, i: seen.update(shape=tuple(i[0].shape[-2:])))
    x = torch.randn(4, 1, 28, 28)
    saq.quantize(model, saq.QuantConfig(w_bits=4, a_bits=4), example_inputs=x[:1])
    loss = F.cross_entropy(model.train()(x), torch.arange(4))
    loss.backward()
    assert seen["shape"] == (7, 7)  # 28 -> 14 -> 7 before global pooling
    roles = [m.quant_role for _, m in saq.quant_layers(model)]
    assert roles[0] == "first" and roles[-1] == "last"
    if name == "cnn_fmnist":
        assert 100_000 <= sum(p.numel() for p in create_model(name, 10).parameters()) <= 300_000


# -- batch augmentation and the device loader --------------------------------------------------------------

def _reference_augment(img: torch.Tensor, oy: int, ox: int, flip: int, pad: int, fill: float) -> torch.Tensor:
    """torchvision's RandomCrop(padding=pad, fill) + flip on one image, written with F.pad and slicing."""
    import torch.nn.functional as F

    h, w = img.shape[-2:]
    out = F.pad(img, (pad,) * 4, value=fill)[:, oy:oy + h, ox:ox + w]
    return out.flip(-1) if flip else out


@pytest.mark.parametrize("pad,flip", [(2, True), (3, False), (0, True)])
def test_tensor_augment_is_crop_with_padding_and_flip(pad, flip):
    aug = TensorAugment(pad=pad, flip=flip, fill=-0.81)
    x = torch.randn(64, 2, 9, 7)
    params = aug.draw(64, torch.Generator().manual_seed(0))
    assert params.shape == (64, 3) and params[:, :2].min() == 0 and params[:, :2].max() == 2 * pad
    assert set(params[:, 2].tolist()) == ({0, 1} if flip else {0})
    out = aug.apply(x, params)
    for i in range(64):
        torch.testing.assert_close(out[i], _reference_augment(x[i], *params[i].tolist(), pad=pad, fill=-0.81),
                                   rtol=0, atol=0)
    centre = torch.tensor([[pad, pad, 0]]).expand(64, 3)
    assert torch.equal(aug.apply(x, centre), x)  # no shift, no flip: the image itself
    assert torch.equal(TensorAugment().apply(x, params), x)  # nothing enabled: identity
    assert aug(x[0]).shape == (2, 9, 7)  # one item, global generator


def _labelled(n: int, augment=None) -> torch.utils.data.TensorDataset:
    """Images whose pixels and label are the sample index (so every batch shows which samples it holds)."""
    x = torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, 1, 6, 6).clone()
    y = torch.arange(n)
    return AugmentedTensorDataset(x, y, augment) if augment else torch.utils.data.TensorDataset(x, y)


def _epoch(loader: DeviceLoader, epoch: int, start: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(epoch)
    loader.start = start
    return list(loader)


def test_device_loader_is_a_function_of_seed_and_epoch():
    ds = _labelled(50, TensorAugment(pad=2, flip=True, fill=-1.0))
    a, b = DeviceLoader(ds, 8, seed=3), DeviceLoader(ds, 8, seed=3)
    e0, e1 = _epoch(a, 0), _epoch(a, 1)
    assert len(e0) == len(a) == 7 and e0[-1][1].numel() == 2
    same = lambda p, q: len(p) == len(q) and all(torch.equal(x, u) and torch.equal(y, v)  # noqa: E731
                                                 for (x, y), (u, v) in zip(p, q))
    assert same(_epoch(b, 1), e1) and same(_epoch(b, 0), e0)  # any order of epochs, any loader object
    assert same(_epoch(a, 0), e0)  # repeatable
    assert not torch.equal(torch.cat([y for _, y in e0]), torch.cat([y for _, y in e1]))  # new order each epoch
    assert not same(_epoch(DeviceLoader(ds, 8, seed=4), 0), e0)
    # the augmentation of a sample depends on (seed, epoch) too, not on its batch
    aug0 = {int(y): x for xs, ys in e0 for x, y in zip(xs, ys)}
    aug1 = {int(y): x for xs, ys in e1 for x, y in zip(xs, ys)}
    assert any(not torch.equal(aug0[i], aug1[i]) for i in range(50))
    # resuming `start` samples into an epoch yields the rest of that epoch exactly
    tail = _epoch(DeviceLoader(ds, 8, seed=3), 1, start=16)
    assert same(tail, e1[2:])


@pytest.mark.parametrize("n,batch,world,drop_last", [(50, 8, 1, False), (50, 8, 1, True), (51, 8, 2, False),
                                                     (7, 4, 3, False)])
def test_device_loader_covers_every_sample_once_per_epoch(n, batch, world, drop_last):
    ds = _labelled(n, TensorAugment(pad=1, flip=True))
    seen = []
    for rank in range(world):
        loader = DeviceLoader(ds, batch, seed=0, drop_last=drop_last, rank=rank, world=world)
        batches = _epoch(loader, 2)
        assert len(batches) == len(loader)
        for x, y in batches:
            assert x.shape[1:] == (1, 6, 6) and y.dtype == torch.int64 and x.dtype == torch.float32
            assert torch.equal(x.amax(dim=(1, 2, 3)), y.float())  # a sample's pixels stay with its label
        seen.append(torch.cat([y for _, y in batches]))
    counts = torch.bincount(torch.cat(seen), minlength=n)
    if world == 1 and not drop_last:
        assert torch.equal(counts, torch.ones(n, dtype=torch.int64))  # every sample exactly once
    elif world == 1:
        assert counts.sum() == (n // batch) * batch and counts.max() == 1
    else:  # padded like DistributedSampler: every sample at least once, all ranks the same count
        assert counts.min() >= 1 and counts.sum() == world * -(-n // world)
        assert len({len(s) for s in seen}) == 1


def test_device_loader_matches_the_sampler_order_of_saq_train():
    """For data without augmentation the batches are the DataLoader + sampler ones train.py used before."""
    from torch.utils.data import DataLoader

    from torchsaq.train.runner import _ResumableSampler

    ds = _labelled(45)
    ds = torch.utils.data.TensorDataset(torch.randn(45, 1, 40), ds.tensors[1])
    for world, rank, start in ((1, 0, 0), (1, 0, 10), (2, 1, 4)):
        sampler = _ResumableSampler(ds, world, rank, seed=7)
        ref = DataLoader(ds, batch_size=10, sampler=sampler, drop_last=True)
        mine = DeviceLoader(ds, 10, seed=7, drop_last=True, rank=rank, world=world)
        assert mine.num_samples == sampler.num_samples
        for epoch in (0, 3):
            sampler.set_epoch(epoch)
            sampler.start = start
            got, want = _epoch(mine, epoch, start), list(ref)
            assert len(got) == len(want) == len(mine)
            for (x, y), (u, v) in zip(got, want):
                assert torch.equal(x, u) and torch.equal(y, v)


def test_device_loader_for_evaluation_is_in_order_and_unaugmented():
    ds = _labelled(11, TensorAugment(pad=2, flip=True, fill=-5.0))
    ev = DeviceLoader(ds, 4, shuffle=False)
    xs, ys = zip(*_epoch(ev, 5))
    assert torch.equal(torch.cat(ys), torch.arange(11)) and torch.equal(torch.cat(xs), ds.tensors[0])
    shards = [torch.cat([y for _, y in DeviceLoader(ds, 4, shuffle=False, rank=r, world=2)]) for r in (0, 1)]
    assert shards[0].tolist() == list(range(0, 11, 2)) and shards[1].tolist() == list(range(1, 11, 2))
    with pytest.raises(ValueError, match="TensorDataset"):
        DeviceLoader(TransformSubset(ds), 4)


# -- torchsaq train on Fashion-MNIST end to end -----------------------------------------------------------------

@pytest.mark.slow
def test_saq_train_fashion_mnist_end_to_end(tmp_path, no_system_fmnist, capsys):
    from torchsaq.train.checkpoint import load_checkpoint
    from torchsaq.cli import main

    _write_fmnist(tmp_path / "fm", n_train=300, n_test=40)
    out = tmp_path / "run"
    assert main(["train", "--dataset", "fashion_mnist", "--data-dir", str(tmp_path / "fm"), "--epochs", "1",
                 "--limit-train-batches", "2", "--output", str(out)]) == 0
    assert "cnn_fmnist on fashion_mnist" in capsys.readouterr().out
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["config"]["model"] == "cnn_fmnist" and state["config"]["augment"] is True
    assert state["data"] == {"dataset": "fashion_mnist", "num_classes": 10, "in_chans": 1, "input_shape": [1, 28, 28]}
    assert state["global_step"] == 2 and 0 <= state["metrics"]["test_acc"] <= 100
    assert main(["eval", str(out / "checkpoint.pt")]) == 0
    assert "(40 samples)" in capsys.readouterr().out
    # the paper's ResNet-20 with one input channel, asked for as in model_kwargs, trains and reloads
    assert main(["train", "--dataset", "fashion_mnist", "--data-dir", str(tmp_path / "fm"), "--model", "resnet20",
                 "--model-kwargs", "{in_chans: 1}", "--epochs", "1", "--limit-train-batches", "1",
                 "--batch-size", "32", "--output", str(tmp_path / "r20")]) == 0
    assert main(["summary", str(tmp_path / "r20" / "checkpoint.pt")]) == 0
    assert "resnet20 on fashion_mnist" in capsys.readouterr().out


@pytest.mark.slow
def test_fashion_mnist_resume_with_augmentation_is_bit_for_bit(tmp_path, no_system_fmnist):
    """Data order and augmentation on the device depend on (seed, epoch) only: an interrupted run resumes exactly."""
    from torchsaq.train.checkpoint import load_checkpoint
    from torchsaq.train.config import TrainConfig
    from torchsaq.train.runner import TrainingInterrupted, train

    _write_fmnist(tmp_path / "fm", n_train=96, n_test=16)
    common = dict(dataset="fashion_mnist", data_dir=str(tmp_path / "fm"), model_kwargs={"width": 4}, epochs=2,
                  batch_size=32, sharpness="case3", device="cpu")
    ref = train(TrainConfig(output=str(tmp_path / "ref"), **common), progress=False)
    cfg = TrainConfig(output=str(tmp_path / "cut"), **common)

    def ctrl_c_at_step_4(step: int) -> None:
        if step == 4:
            signal.raise_signal(signal.SIGINT)

    with pytest.raises(TrainingInterrupted):
        train(cfg, progress=False, step_callback=ctrl_c_at_step_4)
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["step_in_epoch"] == 1  # mid-epoch 2
    out = train(TrainConfig(**{**cfg.to_dict(), "resume": True}), progress=False)
    a, b = load_checkpoint(ref["checkpoint"])["model"], load_checkpoint(out["checkpoint"])["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert out["test_acc"] == ref["test_acc"]


def test_train_subset_is_fixed_and_leaves_eval_sets_alone():
    from torchsaq.train.data import build_datasets, subset_train

    full = build_datasets("digits", val_split=0.1, seed=3)
    a = subset_train(full, 100)
    b = subset_train(build_datasets("digits", val_split=0.1, seed=3), 100)
    assert len(a.train) == 100 and torch.equal(a.train.tensors[0], b.train.tensors[0])
    # the kept rows are rows of the full training split, each once
    rows = {tuple(r.tolist()) for r in full.train.tensors[0].flatten(1)}
    kept = [tuple(r.tolist()) for r in a.train.tensors[0].flatten(1)]
    assert all(r in rows for r in kept)
    assert a.val is full.val and a.test is full.test
    assert subset_train(full, 0) is full and subset_train(full, 10**6) is full
    with pytest.raises(ValueError, match="train_subset"):
        subset_train(full, -1)
    # another subset seed: another fixed subset (the same one every time), of the same size
    c, d = subset_train(full, 100, seed=1), subset_train(full, 100, seed=1)
    assert torch.equal(c.train.tensors[0], d.train.tensors[0]) and len(c.train) == 100
    assert {tuple(r.tolist()) for r in c.train.tensors[0].flatten(1)} != set(kept)


# -- the data set registry ---------------------------------------------------------------------------------

@pytest.fixture
def own_registry(monkeypatch):
    """Registrations made by a test are dropped afterwards (the module's registry attributes are restored)."""
    monkeypatch.setattr(sdata, "_REGISTRY", sdata._REGISTRY.copy())
    monkeypatch.setattr(sdata, "DATASETS", sdata.DATASETS)
    monkeypatch.setattr(sdata, "DEFAULT_MODELS", dict(sdata.DEFAULT_MODELS))


def test_registry_lists_the_built_in_data_sets_with_default_models():
    assert sdata.list_datasets() == list(DATASETS) == ["mnist1d", "digits", "fashion_mnist", "cifar10", "cifar100",
                                                      "imagenet", "imagefolder", "flowers102", "pets"]
    assert DEFAULT_MODELS == {d: sdata.dataset_info(d).default_model for d in DATASETS}
    info = sdata.dataset_info("cifar100")
    assert (info.name, info.default_model, info.needs_data_dir, info.extra) == ("cifar100", "resnet20", True, "data")
    assert "torchvision" in info.requires and sdata.dataset_info("mnist1d").requires == ("numpy", "mnist1d")
    assert all(sdata.dataset_info(d).description for d in DATASETS)
    with pytest.raises(ValueError, match="unknown data set 'digit' \\(did you mean digits"):
        sdata.dataset_info("digit")


def test_a_registered_data_set_builds_trains_and_shows_in_the_cli(own_registry, tmp_path, capsys):
    from torchsaq.cli import build_parser, check_train_requirements, main
    from torchsaq.train.config import TrainConfig

    calls = []

    @sdata.register_dataset(default_model="cnn_digits", description="random 8x8 images for a test")
    def toy8(data_dir=None, img_size=None, val_split=0.0, seed=0, augment=True):
        calls.append(dict(data_dir=data_dir, img_size=img_size, val_split=val_split, seed=seed, augment=augment))
        g = torch.Generator().manual_seed(seed)
        x, y = torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 3, (64,), generator=g)
        return sdata._tensor_bundle("toy8", x, y, x[:16], y[:16], 3, val_split, seed)

    assert sdata.list_datasets()[-1] == "toy8" and sdata.DATASETS[-1] == "toy8"
    assert sdata.DEFAULT_MODELS["toy8"] == "cnn_digits" and sdata.default_model("toy8") == "cnn_digits"
    bundle = build_datasets("toy8", data_dir="somewhere", val_split=0.25, seed=3, augment=False)
    assert calls == [dict(data_dir="somewhere", img_size=None, val_split=0.25, seed=3, augment=False)]
    assert len(bundle.train) == 48 and len(bundle.val) == 16 and bundle.num_classes == 3
    with pytest.raises(ValueError, match="val_split"):  # the shared checks run before the builder
        build_datasets("toy8", val_split=1.5)
    assert len(calls) == 1
    cfg = TrainConfig(dataset="toy8")
    assert cfg.model == "cnn_digits"
    check_train_requirements(cfg)  # nothing missing
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    assert "toy8 (model cnn_digits): random 8x8 images for a test" in " ".join(train.format_help().split())
    assert main(["train", "--dataset", "toy8", "--epochs", "1", "--batch-size", "16", "--no-save"]) == 0
    assert "test      top-1" in capsys.readouterr().out and len(calls) == 2
    with pytest.raises(ValueError, match="already registered"):
        sdata.register_dataset(toy8, name="toy8", default_model="cnn1d")


def test_missing_requirements_are_named_before_a_run(own_registry, tmp_path, capsys):
    from torchsaq.cli import main

    sdata.register_dataset(lambda **kw: None, name="needs_more", default_model="cnn1d", extra="data",
                           requires=("numpy", "a_module_nobody_installs"))
    assert sdata.missing_requirements("needs_more") == ["a_module_nobody_installs"]
    assert sdata.missing_requirements("mnist1d") == []
    assert main(["train", "--dataset", "needs_more", "--output", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("torchsaq: error: torchsaq train (needs_more, cnn1d) needs a_module_nobody_installs")
    assert "pip install 'torchsaq[data]'" in err and "\n" not in err
    assert not (tmp_path / "run").exists()
