"""Data sets: two embedded ones (MNIST-1D, scikit-learn digits) and the paper's image sets from a local path.

    bundle = saq.data.build_datasets("cifar100", data_dir="/data", val_split=0.1)
    bundle.train, bundle.val, bundle.test, bundle.num_classes, bundle.input_shape

Nothing is downloaded: "mnist1d" is generated locally, "digits" ships with scikit-learn, and the image
sets are read from ``data_dir`` in the layout torchvision uses (a wrong path raises ValueError showing
the layout expected). Transforms follow the paper's setting: CIFAR random crop (padding 4) + flip;
ImageNet-style random-resized crop + flip for training and resize to size/0.875 + center crop for
evaluation. The embedded sets get no augmentation. ``val_split`` carves a seeded validation subset out
of the *training* set (evaluated with the evaluation transform); the test set is never used for it.
"""
from __future__ import annotations

import functools
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset, TensorDataset

__all__ = ["DATASETS", "DataBundle", "TransformSubset", "build_datasets", "image_transforms",
           "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD", "IMAGENET_MEAN", "IMAGENET_STD"]

DATASETS = ("mnist1d", "digits", "cifar10", "cifar100", "imagenet", "imagefolder", "flowers102", "pets")

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_CROP_FRACTION = 0.875  # eval: resize to size / 0.875 (256 for 224), then center-crop size

PathLike = Union[str, os.PathLike]


@dataclass
class DataBundle:
    """Train / validation / test sets of one data set plus what a model needs to know about them.

    ``val`` is ``None`` unless ``val_split > 0`` (or an "imagefolder" set brings its own val/ next to
    test/). ``input_shape`` is one sample's shape, channels first: (1, 40), (1, 8, 8), (3, 32, 32), ...
    """

    name: str
    train: Dataset
    val: Optional[Dataset]
    test: Dataset
    num_classes: int
    in_chans: int
    input_shape: tuple[int, ...]
    classes: Optional[list[str]] = None


class TransformSubset(Dataset):
    """``dataset[indices[i]]`` with ``transform`` applied to the input (all items when ``indices`` is None).

    Lets a training subset and a validation subset of the same data carry different transforms.
    """

    def __init__(self, dataset: Dataset, indices: Optional[Sequence[int]] = None,
                 transform: Optional[Callable] = None):
        self.dataset = dataset
        self.indices = None if indices is None else [int(i) for i in indices]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices) if self.indices is not None else len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        x, y = self.dataset[self.indices[i] if self.indices is not None else i]
        return (self.transform(x) if self.transform is not None else x), y

    def __repr__(self) -> str:
        return f"TransformSubset(n={len(self)}, transform={self.transform})"


# -- helpers -------------------------------------------------------------------------------------------

def _split_indices(n: int, val_split: float, seed: int) -> tuple[list[int], list[int]]:
    """Disjoint (train, val) index lists; the val set is a seeded random ``val_split`` fraction of ``n``."""
    n_val = int(round(n * val_split))
    if n_val < 1 or n_val >= n:
        raise ValueError(f"val_split={val_split} of {n} training samples gives {n_val} validation samples; "
                         "need at least 1 and fewer than all")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).tolist()
    return sorted(perm[n_val:]), sorted(perm[:n_val])


def _check_no_img_size(name: str, img_size: Optional[int], native: int) -> None:
    if img_size is not None and img_size != native:
        raise ValueError(f"{name} has a fixed input size ({native}); img_size={img_size} is not supported")


def _tensor_bundle(name: str, x: np.ndarray, y: np.ndarray, xt: np.ndarray, yt: np.ndarray, num_classes: int,
                   val_split: float, seed: int) -> DataBundle:
    X, Y = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.long)
    Xt, Yt = torch.tensor(xt, dtype=torch.float32), torch.tensor(yt, dtype=torch.long)
    val = None
    if val_split > 0:
        tr, va = _split_indices(len(X), val_split, seed)
        val = TensorDataset(X[va], Y[va])
        X, Y = X[tr], Y[tr]
    return DataBundle(name, TensorDataset(X, Y), val, TensorDataset(Xt, Yt), num_classes,
                      int(X.shape[1]), tuple(X.shape[1:]))


# -- embedded data sets --------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _mnist1d_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """MNIST-1D generated locally with its default arguments (fixed seed 42): 4000 train / 1000 test.

    mnist1d seeds Python's and NumPy's global generators; their states are restored afterwards.
    """
    import mnist1d.data

    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        d = mnist1d.data.make_dataset(mnist1d.data.get_dataset_args())
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    arrays = (d["x"][:, None, :].astype(np.float32), d["y"].astype(np.int64),
              d["x_test"][:, None, :].astype(np.float32), d["y_test"].astype(np.int64))
    for a in arrays:
        a.setflags(write=False)
    return arrays


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn digits as (N, 1, 8, 8) in [0, 1], standardised with the training set's mean/std;
    a fixed stratified split of 1437 train / 360 test (random_state=0)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    y = d.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=360, stratify=y, random_state=0)
    mean, std = float(xtr.mean()), float(xtr.std())
    arrays = ((xtr - mean) / std, ytr, (xte - mean) / std, yte)
    for a in arrays:
        a.setflags(write=False)
    return arrays


# -- transforms ----------------------------------------------------------------------------------------

def image_transforms(name: str, img_size: Optional[int] = None) -> tuple[Callable, Callable]:
    """(train transform, eval transform) for an image data set, following the paper's setting.

    CIFAR: RandomCrop(32, padding=4) + flip + normalise; at ``img_size`` != 32 (e.g. 224 for ViT
    fine-tuning) the image is first resized to ``img_size`` and the crop padding scaled (img_size // 8).
    ImageNet-style sets: RandomResizedCrop(size) + flip / Resize(size / 0.875) + CenterCrop(size).
    """
    from torchvision import transforms as T

    if name in ("cifar10", "cifar100"):
        mean, std = (CIFAR10_MEAN, CIFAR10_STD) if name == "cifar10" else (CIFAR100_MEAN, CIFAR100_STD)
        size = img_size or 32
        resize = [] if size == 32 else [T.Resize(size)]
        train = T.Compose([*resize, T.RandomCrop(size, padding=max(size // 8, 1)), T.RandomHorizontalFlip(),
                           T.ToTensor(), T.Normalize(mean, std)])
        test = T.Compose([*resize, T.ToTensor(), T.Normalize(mean, std)])
        return train, test
    if name in ("imagenet", "imagefolder", "flowers102", "pets"):
        size = img_size or 224
        train = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        test = T.Compose([T.Resize(int(size / EVAL_CROP_FRACTION)), T.CenterCrop(size), T.ToTensor(),
                          T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        return train, test
    raise ValueError(f"no image transforms for data set {name!r}")


# -- data sets read from a path ------------------------------------------------------------------------

_LAYOUTS = {
    "cifar10": "<dir>/cifar-10-batches-py/ holding data_batch_1..5, test_batch and batches.meta "
               "(the python version of CIFAR-10 from https://www.cs.toronto.edu/~kriz/cifar.html, "
               "cifar-10-python.tar.gz extracted into <dir>)",
    "cifar100": "<dir>/cifar-100-python/ holding train, test and meta (the python version of CIFAR-100 from "
                "https://www.cs.toronto.edu/~kriz/cifar.html, cifar-100-python.tar.gz extracted into <dir>)",
    "imagenet": "<dir>/train/<class>/*.JPEG and <dir>/val/<class>/*.JPEG (one folder per class, the same "
                "class folders in both; the validation images sorted into class folders)",
    "imagefolder": "<dir>/train/<class>/<images> and <dir>/test/<class>/<images> or <dir>/val/<class>/<images> "
                   "(one folder per class, the same class folders in each split)",
    "flowers102": "<dir>/flowers-102/jpg/image_00001.jpg ... image_08189.jpg, <dir>/flowers-102/imagelabels.mat "
                  "and <dir>/flowers-102/setid.mat (102flowers.tgz, imagelabels.mat and setid.mat from "
                  "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/, as torchvision.datasets.Flowers102 reads them)",
    "pets": "<dir>/oxford-iiit-pet/images/<Breed_N>.jpg and <dir>/oxford-iiit-pet/annotations/trainval.txt, "
            "test.txt (images.tar.gz and annotations.tar.gz from https://www.robots.ox.ac.uk/~vgg/data/pets/ "
            "extracted into <dir>/oxford-iiit-pet, as torchvision.datasets.OxfordIIITPet reads them; trimaps are "
            "not needed)",
}


def _layout_error(name: str, data_dir: Optional[PathLike], problem: str) -> ValueError:
    where = "no data_dir given" if data_dir is None else f"{problem} under {str(data_dir)!r}"
    return ValueError(f"{name}: {where}; expected {_LAYOUTS[name]}")


def _root(name: str, data_dir: Optional[PathLike], folder: str, required: Sequence[str]) -> Path:
    """The directory holding ``folder``; ``data_dir`` may be it or its parent. Checks ``required`` files."""
    if data_dir is None:
        raise _layout_error(name, None, "")
    d = Path(data_dir).expanduser()
    if not d.is_dir():
        raise _layout_error(name, data_dir, "directory not found")
    root = d.parent if d.name == folder else d
    missing = [f for f in required if not (root / folder / f).exists()]
    if missing:
        raise _layout_error(name, data_dir, "missing " + ", ".join(f"{folder}/{f}" for f in missing))
    return root


def _torchvision_call(name: str, data_dir: PathLike, build: Callable[[], Dataset]) -> Dataset:
    try:
        return build()
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted" (md5 mismatch)
        raise ValueError(f"{name}: the files under {str(data_dir)!r} did not pass torchvision's check ({e}); "
                         f"expected the original, unmodified files: {_LAYOUTS[name]}") from e


def _image_folder(name: str, data_dir: Optional[PathLike], split: str) -> Any:
    from torchvision.datasets import ImageFolder

    assert data_dir is not None
    path = Path(data_dir).expanduser() / split
    try:
        return ImageFolder(str(path))
    except (FileNotFoundError, OSError) as e:
        raise _layout_error(name, data_dir, f"cannot read {split}/ ({e})") from e


def _same_classes(name: str, data_dir: PathLike, train: Any, other: Any, split: str) -> None:
    if train.classes != other.classes:
        only_train = sorted(set(train.classes) - set(other.classes))[:5]
        only_other = sorted(set(other.classes) - set(train.classes))[:5]
        raise ValueError(f"{name}: train/ and {split}/ under {str(data_dir)!r} have different class folders "
                         f"(only in train: {only_train}, only in {split}: {only_other}); labels would not match")


def _path_dataset(name: str, data_dir: Optional[PathLike]) -> tuple[Dataset, Dataset, Optional[Dataset], int,
                                                                      Optional[list[str]]]:
    """(train base, test base, own val base or None, num_classes, classes); bases carry no transform."""
    from torchvision import datasets as tvd

    if name in ("cifar10", "cifar100"):
        folder, files, cls = (("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)]
                               + ["test_batch", "batches.meta"], tvd.CIFAR10) if name == "cifar10" else
                              ("cifar-100-python", ["train", "test", "meta"], tvd.CIFAR100))
        root = _root(name, data_dir, folder, files)
        train = _torchvision_call(name, root, lambda: cls(str(root), train=True, download=False))
        test = _torchvision_call(name, root, lambda: cls(str(root), train=False, download=False))
        return train, test, None, len(train.classes), list(train.classes)
    if name == "flowers102":
        root = _root(name, data_dir, "flowers-102", ["jpg", "imagelabels.mat", "setid.mat"])
        parts = [_torchvision_call(name, root, lambda s=s: tvd.Flowers102(str(root), split=s, download=False))
                 for s in ("train", "val", "test")]
        # train on the official train+val splits (2,040 images), test on the test split, as in ViT/BiT
        return ConcatDataset(parts[:2]), parts[2], None, 102, list(tvd.Flowers102.classes)
    if name == "pets":
        root = _root(name, data_dir, "oxford-iiit-pet", ["images", "annotations/trainval.txt", "annotations/test.txt"])
        train = _torchvision_call(name, root, lambda: tvd.OxfordIIITPet(str(root), split="trainval", download=False))
        test = _torchvision_call(name, root, lambda: tvd.OxfordIIITPet(str(root), split="test", download=False))
        return train, test, None, 37, None
    if name in ("imagenet", "imagefolder"):
        if data_dir is None or not Path(data_dir).expanduser().is_dir():
            raise _layout_error(name, data_dir, "directory not found")
        d = Path(data_dir).expanduser()
        has = {s: (d / s).is_dir() for s in ("train", "val", "test")}
        if name == "imagenet":
            splits = ("train", "val")
            if not (has["train"] and has["val"]):
                raise _layout_error(name, data_dir, "missing train/ or val/")
        else:
            if not has["train"] or not (has["val"] or has["test"]):
                raise _layout_error(name, data_dir, "missing train/, or both val/ and test/")
            splits = ("train", "test" if has["test"] else "val")
        train = _image_folder(name, d, splits[0])
        test = _image_folder(name, d, splits[1])
        _same_classes(name, d, train, test, splits[1])
        own_val = None
        if name == "imagefolder" and has["test"] and has["val"]:
            own_val = _image_folder(name, d, "val")
            _same_classes(name, d, train, own_val, "val")
        return train, test, own_val, len(train.classes), list(train.classes)
    raise AssertionError(name)


def build_datasets(name: str = "mnist1d", data_dir: Optional[PathLike] = None, img_size: Optional[int] = None,
                   val_split: float = 0.0, seed: int = 0) -> DataBundle:
    """Build the train / val / test sets of data set ``name`` (one of :data:`DATASETS`).

    ``data_dir`` is required for the image sets (never downloaded). ``img_size``: image side for the
    image sets (default 32 for CIFAR, 224 otherwise). ``val_split``: fraction of the training set held
    out as a validation set, chosen with a ``seed``-ed generator (deterministic; evaluation transforms).
    "imagefolder" tests on ``data_dir/test`` if present (else ``data_dir/val``); with both present,
    ``data_dir/val`` becomes the validation set. Flowers-102 trains on its train+val splits.
    """
    if name not in DATASETS:
        import difflib

        close = difflib.get_close_matches(name, DATASETS, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"unknown data set {name!r}{hint}; choose one of {', '.join(DATASETS)}")
    if not 0 <= val_split < 1:
        raise ValueError(f"val_split must be in [0, 1), got {val_split}")
    if img_size is not None and (isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 1):
        raise ValueError(f"img_size must be a positive int or None, got {img_size!r}")

    if name == "mnist1d":
        _check_no_img_size(name, img_size, 40)
        return _tensor_bundle(name, *_mnist1d_arrays(), num_classes=10, val_split=val_split, seed=seed)
    if name == "digits":
        _check_no_img_size(name, img_size, 8)
        return _tensor_bundle(name, *_digits_arrays(), num_classes=10, val_split=val_split, seed=seed)

    train_base, test_base, own_val, num_classes, classes = _path_dataset(name, data_dir)
    train_tf, eval_tf = image_transforms(name, img_size)
    size = img_size or (32 if name.startswith("cifar") else 224)
    if own_val is not None and val_split > 0:
        raise ValueError(f"{name}: {data_dir!r} has its own val/ folder next to test/; drop val_split "
                         "(or remove val/ to carve the validation set out of train/)")
    if val_split > 0:
        tr, va = _split_indices(len(train_base), val_split, seed)  # type: ignore[arg-type]
        train, val = TransformSubset(train_base, tr, train_tf), TransformSubset(train_base, va, eval_tf)
    else:
        train = TransformSubset(train_base, None, train_tf)
        val = TransformSubset(own_val, None, eval_tf) if own_val is not None else None
    return DataBundle(name, train, val, TransformSubset(test_base, None, eval_tf), num_classes, 3,
                      (3, size, size), classes)
