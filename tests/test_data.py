"""Data sets: the embedded ones against their sources, and tiny files in each on-disk format read back."""
from __future__ import annotations

import os
import pickle
import random

import numpy as np
import pytest
import torch
from PIL import Image

from saq import data as sdata
from saq.data import DATASETS, DataBundle, TransformSubset, build_datasets


def _rows(t: torch.Tensor) -> set[bytes]:
    return {r.numpy().tobytes() for r in t}


# -- embedded data sets ----------------------------------------------------------------------------------

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
    assert set(DATASETS) == {"mnist1d", "digits", "cifar10", "cifar100", "imagenet", "imagefolder",
                             "flowers102", "pets"}


# -- tiny on-disk data sets ------------------------------------------------------------------------------

def _accept_any_md5(monkeypatch):
    """torchvision checks the real files' md5; the tiny test files only need to exist."""
    import torchvision.datasets.cifar as cifar
    import torchvision.datasets.flowers102 as flowers

    ok = lambda fpath, md5=None: os.path.isfile(fpath)
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
