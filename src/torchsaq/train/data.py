"""Data sets: two embedded ones (MNIST-1D, scikit-learn digits), Fashion-MNIST and the paper's image sets.

    bundle = saq.data.build_datasets("cifar100", data_dir="/data", val_split=0.1)
    bundle.train, bundle.val, bundle.test, bundle.num_classes, bundle.input_shape

Data sets are a registry, as models are: :func:`list_datasets`, :func:`dataset_info` (default model,
description, the modules it needs) and :func:`register_dataset` for your own (``torchsaq train --dataset NAME``
then trains on it). numpy, mnist1d, scikit-learn and torchvision are imported only by the data sets that use
them (the ``data`` extra).

Nothing is downloaded: "mnist1d" is generated locally, "digits" ships with scikit-learn, "fashion_mnist"
is read from its four IDX files (``data_dir``, else the Debian package's folder), and the image sets are
read from ``data_dir`` in the layout torchvision uses (a wrong path raises ValueError showing the layout
expected). Transforms follow the paper's setting: CIFAR random crop (padding 4) + flip; ImageNet-style
random-resized crop + flip for training and resize to size/0.875 + center crop for evaluation.
Fashion-MNIST trains with random crop 28 (padding 2) + horizontal flip. The embedded sets get no
augmentation. ``augment=False`` turns training augmentation off (training items then look like evaluation
items). ``val_split`` carves a seeded validation subset out of the *training* set (evaluated with the
evaluation transform); the test set is never used for it.

The tensor data sets (mnist1d, digits, fashion_mnist) are :class:`~torch.utils.data.TensorDataset` s;
:class:`DeviceLoader` keeps such a split whole on the training device and makes shuffled, augmented
batches there (``torchsaq train`` uses it for them instead of a DataLoader).
"""
from __future__ import annotations

import functools
import gzip
import math
import os
import random
import zlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Sequence, TypeVar, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import ConcatDataset, Dataset, Subset, TensorDataset

from .._optional import missing, require
from ..registry import Registry

if TYPE_CHECKING:  # numpy is imported where it is used (the "data" extra): `import torchsaq.data` needs torch only
    import numpy as np

__all__ = ["DATASETS", "DEFAULT_MODELS", "DataBundle", "DatasetInfo", "TransformSubset", "TensorAugment",
           "AugmentedTensorDataset", "DeviceLoader", "build_datasets", "default_model", "register_dataset",
           "list_datasets", "dataset_info", "image_transforms", "read_idx",
           "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD", "IMAGENET_MEAN", "IMAGENET_STD",
           "FASHION_MNIST_MEAN", "FASHION_MNIST_STD", "FASHION_MNIST_FILES", "FASHION_MNIST_SYSTEM_DIR"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_CROP_FRACTION = 0.875  # eval: resize to size / 0.875 (256 for 224), then center-crop size
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530  # of the 60,000 training images, pixels in [0, 1]
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]
#: (train images, train labels, test images, test labels), each read as NAME or NAME.gz
FASHION_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                       "t10k-labels-idx1-ubyte")
FASHION_MNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"  # Debian/Ubuntu package dataset-fashion-mnist
FASHION_MNIST_URL = "https://github.com/zalandoresearch/fashion-mnist"

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


@dataclass(frozen=True)
class TensorAugment:
    """Random crop with ``pad`` pixels of ``fill`` on each side, then a random horizontal flip (``flip``).

    torchvision's ``RandomCrop(size, padding=pad)`` + ``RandomHorizontalFlip()`` on images that are already
    tensors (``fill`` is the normalised value of a black pixel), batched: :meth:`draw` the parameters,
    :meth:`apply` them to a (B, C, H, W) batch on any device. Calling it on one (C, H, W) item draws from
    the global torch generator, as torchvision's transforms do.
    """

    pad: int = 0
    flip: bool = False
    fill: float = 0.0

    def draw(self, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """(n, 3) int64 parameters on the CPU: row offset and column offset in 0..2*pad, flip 0/1."""
        offsets = torch.randint(0, 2 * self.pad + 1, (n, 2), generator=generator)
        flips = (torch.randint(0, 2, (n, 1), generator=generator) if self.flip
                 else torch.zeros(n, 1, dtype=torch.int64))
        return torch.cat([offsets, flips], 1)

    def apply(self, x: Tensor, params: Tensor) -> Tensor:
        """Crop and flip each image of ``x`` (B, C, H, W) as its row of ``params`` (B, 3) says; same shape."""
        if not (self.pad or self.flip):
            return x
        b, c, h, w = x.shape
        p = self.pad
        params = params.to(x.device)
        padded = F.pad(x, (p, p, p, p), value=self.fill) if p else x
        cols = torch.arange(w, device=x.device)
        # output pixel (i, j) <- padded pixel (oy + i, ox + j), or (oy + i, ox + w - 1 - j) when flipped
        col = params[:, 1:2] + torch.where(params[:, 2:3].bool(), w - 1 - cols, cols) if self.flip else \
            params[:, 1:2] + cols
        row = params[:, :1] + torch.arange(h, device=x.device)
        flat = (row[:, :, None] * (w + 2 * p) + col[:, None, :]).reshape(b, 1, h * w).expand(b, c, h * w)
        return padded.reshape(b, c, -1).gather(2, flat).reshape(b, c, h, w)

    def __call__(self, x: Tensor) -> Tensor:
        """One augmented (C, H, W) item, its parameters drawn from the global torch generator."""
        return self.apply(x[None], self.draw(1))[0]


class AugmentedTensorDataset(TensorDataset):
    """(input, label) tensors whose items are augmented by ``augment`` (a training set).

    Read item by item (a DataLoader) each item is augmented with the global torch generator;
    :class:`DeviceLoader` augments whole batches on the device instead, from a seeded generator.
    """

    def __init__(self, x: Tensor, y: Tensor, augment: TensorAugment):
        super().__init__(x, y)
        self.augment = augment

    def __getitem__(self, i: Any) -> tuple[Tensor, Tensor]:
        x, y = super().__getitem__(i)
        return self.augment(x), y

    def __repr__(self) -> str:
        return f"AugmentedTensorDataset(n={len(self)}, augment={self.augment})"


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


#: the data sets that read no files (generated or embedded): an explicit data_dir would be ignored
EMBEDDED = ("mnist1d", "digits")


def check_data_dir_read(name: str, data_dir: Optional[PathLike]) -> None:
    """An explicit ``data_dir`` for a data set that reads no files (mnist1d, digits: generated or embedded) is a
    ValueError naming it: the run would silently use the embedded copy, not the files there."""
    if data_dir is not None and name in EMBEDDED:
        raise ValueError(f"{name} is built in (generated or embedded) and reads no files: --data-dir "
                         f"{str(data_dir)!r} would be ignored; drop it")


def _tensor_bundle(name: str, x: Any, y: Any, xt: Any, yt: Any, num_classes: int, val_split: float, seed: int,
                   augment: Optional[TensorAugment] = None, classes: Optional[list[str]] = None) -> DataBundle:
    """A bundle of TensorDatasets; numpy arrays are copied, tensors used as they are; ``augment``: training set only."""
    X, Y, Xt, Yt = (a if isinstance(a, Tensor) else torch.tensor(a) for a in (x, y, xt, yt))
    X, Xt, Y, Yt = X.float(), Xt.float(), Y.long(), Yt.long()
    val = None
    if val_split > 0:
        tr, va = _split_indices(len(X), val_split, seed)
        val = TensorDataset(X[va], Y[va])
        X, Y = X[tr], Y[tr]
    train = AugmentedTensorDataset(X, Y, augment) if augment is not None else TensorDataset(X, Y)
    return DataBundle(name, train, val, TensorDataset(Xt, Yt), num_classes, int(X.shape[1]), tuple(X.shape[1:]),
                      classes)


# -- embedded data sets --------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _mnist1d_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """MNIST-1D generated locally with its default arguments (fixed seed 42): 4000 train / 1000 test.

    mnist1d seeds Python's and NumPy's global generators; their states are restored afterwards.
    """
    require("numpy", "data", "the mnist1d data set")
    import numpy as np

    mnist1d_data = require("mnist1d.data", "data", "the mnist1d data set")

    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        d = mnist1d_data.make_dataset(mnist1d_data.get_dataset_args())
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
    require("numpy", "data", "the digits data set")
    import numpy as np

    sk_datasets = require("sklearn.datasets", "data", "the digits data set")
    sk_model_selection = require("sklearn.model_selection", "data", "the digits data set")
    load_digits, train_test_split = sk_datasets.load_digits, sk_model_selection.train_test_split

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    y = d.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=360, stratify=y, random_state=0)
    mean, std = float(xtr.mean()), float(xtr.std())
    arrays = ((xtr - mean) / std, ytr, (xte - mean) / std, yte)
    for a in arrays:
        a.setflags(write=False)
    return arrays


# -- Fashion-MNIST (IDX files) -------------------------------------------------------------------------

#: IDX type code -> numpy dtype (big-endian where it matters)
_IDX_TYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: PathLike, magic: Optional[int] = None) -> np.ndarray:
    """The array in an IDX file (gzip-compressed or not); a ValueError naming the file if it is not a valid one.

    Format (big-endian): two zero bytes, a dtype code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64), the number of dimensions, one uint32 per dimension, then the data.
    ``magic``: the expected first four bytes as an int (2051 for uint8 images N x H x W, 2049 for labels).
    """
    require("numpy", "data", "reading IDX files")
    import numpy as np

    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":  # gzip, whatever the file is called
            raw = gzip.decompress(raw)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise ValueError(f"{path}: damaged or truncated gzip file ({e})") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror or e})") from None
    if len(raw) < 4:
        raise ValueError(f"{path}: truncated IDX file ({len(raw)} bytes, shorter than the 4-byte magic number)")
    found = int.from_bytes(raw[:4], "big")
    if raw[0] or raw[1] or raw[2] not in _IDX_TYPES:
        raise ValueError(f"{path}: not an IDX file (magic number 0x{found:08x}"
                         f"{f', expected {magic} = 0x{magic:08x}' if magic is not None else ''})")
    if magic is not None and found != magic:
        raise ValueError(f"{path}: wrong IDX magic number {found} (0x{found:08x}), expected {magic} (0x{magic:08x})")
    dtype, ndim = np.dtype(_IDX_TYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX file ({len(raw)} bytes, shorter than its {header}-byte header)")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, 4))
    need = math.prod(dims) * dtype.itemsize
    have = len(raw) - header
    if have != need:
        what = "truncated IDX file" if have < need else "IDX file with trailing bytes"
        raise ValueError(f"{path}: {what}: its header announces {'x'.join(map(str, dims))} {dtype.name} "
                         f"({need} data bytes), the file holds {have}")
    return np.frombuffer(raw, dtype, math.prod(dims), header).reshape(dims).astype(dtype.newbyteorder("="))


def _fashion_mnist_files(data_dir: Optional[PathLike]) -> list[Path]:
    """The four IDX files, from ``data_dir`` if one is given (it must hold them: never another copy instead),
    else from the Debian package's folder."""
    folders = [Path(data_dir).expanduser()] if data_dir is not None else [Path(FASHION_MNIST_SYSTEM_DIR)]
    if data_dir is not None and not folders[0].is_dir():
        raise ValueError(f"fashion_mnist: --data-dir {str(data_dir)!r} "
                         f"{'is a file, not a folder' if folders[0].exists() else 'does not exist'}; give the "
                         "folder of the four IDX files, or leave --data-dir out to read the Debian package's copy")
    for folder in folders:
        found = [next((folder / n for n in (stem, stem + ".gz") if (folder / n).is_file()), None)
                 for stem in FASHION_MNIST_FILES]
        if all(found):
            return found  # type: ignore[return-value]
        if any(found):  # some but not all: the user meant this folder
            missing = ", ".join(stem for stem, f in zip(FASHION_MNIST_FILES, found) if f is None)
            raise ValueError(f"fashion_mnist: {str(folder)!r} holds only some of the four IDX files: missing {missing} "
                             f"(or .gz); download them from {FASHION_MNIST_URL} into that folder")
    searched = " and ".join(f"{str(f)!r}" + (" (--data-dir)" if i == 0 and data_dir is not None else
                                                " (Debian package dataset-fashion-mnist)")
                            for i, f in enumerate(folders))
    raise ValueError(f"fashion_mnist: the four IDX files ({', '.join(FASHION_MNIST_FILES)}, each .gz or not) are "
                     f"not in {searched}; install them with 'apt-get install dataset-fashion-mnist', or download "
                     f"the four files from {FASHION_MNIST_URL} into DIR and pass --data-dir DIR")


def _fashion_mnist_split(images: Path, labels: Path) -> tuple[Tensor, Tensor]:
    """(N, 1, 28, 28) float images normalised with the training mean/std, (N,) int64 labels; checked."""
    import numpy as np  # read_idx has checked that it is installed

    x = read_idx(images, magic=0x0803)
    y = read_idx(labels, magic=0x0801)
    if x.shape[1:] != (28, 28):
        raise ValueError(f"{images}: expected 28x28 images, found {x.shape[1]}x{x.shape[2]}")
    if len(x) != len(y):
        raise ValueError(f"{images} holds {len(x)} images but {labels} holds {len(y)} labels")
    bad = np.flatnonzero(y > 9)
    if bad.size:
        raise ValueError(f"{labels}: label {int(y[bad[0]])} at index {int(bad[0])} is outside 0..9 "
                         f"({bad.size} labels out of range)")
    xt = torch.from_numpy(x).unsqueeze(1).float().div_(255.0).sub_(FASHION_MNIST_MEAN).div_(FASHION_MNIST_STD)
    return xt, torch.from_numpy(y.astype(np.int64))


def _fashion_mnist_bundle(data_dir: Optional[PathLike], val_split: float, seed: int, augment: bool) -> DataBundle:
    files = _fashion_mnist_files(data_dir)
    try:
        (x, y), (xt, yt) = _fashion_mnist_split(files[0], files[1]), _fashion_mnist_split(files[2], files[3])
    except ValueError as e:
        raise ValueError(f"fashion_mnist: {e}") from None
    aug = TensorAugment(pad=2, flip=True, fill=-FASHION_MNIST_MEAN / FASHION_MNIST_STD) if augment else None
    return _tensor_bundle("fashion_mnist", x, y, xt, yt, 10, val_split, seed, aug, list(FASHION_MNIST_CLASSES))


# -- transforms ----------------------------------------------------------------------------------------

def image_transforms(name: str, img_size: Optional[int] = None) -> tuple[Callable, Callable]:
    """(train transform, eval transform) for an image data set, following the paper's setting.

    CIFAR: RandomCrop(32, padding=4) + flip + normalise; at ``img_size`` != 32 (e.g. 224 for ViT
    fine-tuning) the image is first resized to ``img_size`` and the crop padding scaled (img_size // 8).
    ImageNet-style sets: RandomResizedCrop(size) + flip / Resize(size / 0.875) + CenterCrop(size).
    """
    T = require("torchvision.transforms", "data", f"the {name} data set")

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


def _torchvision_call(name: str, data_dir: PathLike, build: Callable[[], Any]) -> Any:
    try:
        return build()
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted" (md5 mismatch)
        raise ValueError(f"{name}: the files under {str(data_dir)!r} did not pass torchvision's check ({e}); "
                         f"expected the original, unmodified files: {_LAYOUTS[name]}") from e


def _image_folder(name: str, data_dir: Optional[PathLike], split: str) -> Any:
    ImageFolder = require("torchvision.datasets", "data", f"the {name} data set").ImageFolder

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
    tvd = require("torchvision.datasets", "data", f"the {name} data set")

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
        parts = [_torchvision_call(name, root, functools.partial(tvd.Flowers102, str(root), split=s, download=False))
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


# -- the registry --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DatasetInfo:
    """What a registered data set is: the model trained on it by default and what building it needs.

    ``needs_data_dir``: read from ``data_dir`` (never downloaded); ``requires``: modules its builder imports
    (checked before a run starts; :func:`missing_requirements`), installed by ``pip install 'torchsaq[EXTRA]'``.
    """

    name: str
    default_model: str
    description: str = ""
    needs_data_dir: bool = False
    requires: tuple[str, ...] = ()
    extra: str = "data"


#: ``build(data_dir=, img_size=, val_split=, seed=, augment=) -> DataBundle``
Builder = Callable[..., DataBundle]
B = TypeVar("B", bound=Builder)
#: the data sets: name -> (builder, DatasetInfo)
_REGISTRY: Registry[tuple[Builder, DatasetInfo]] = Registry("data set")
#: the registered data set names (kept up to date by :func:`register_dataset`; :func:`list_datasets` is the same)
DATASETS: tuple[str, ...] = ()
#: data set -> the model ``torchsaq train --dataset NAME`` trains when no ``--model`` is given (updated in place)
DEFAULT_MODELS: dict[str, str] = {}


def register_dataset(fn: Optional[B] = None, *, name: Optional[str] = None, default_model: str,
                     description: str = "", needs_data_dir: bool = False, requires: Sequence[str] = (),
                     extra: str = "data") -> Any:
    """Register a data set builder under ``name`` (default: the function's name); a decorator, or call it with ``fn``.

    The builder is called with keyword arguments ``data_dir``, ``img_size``, ``val_split``, ``seed`` and
    ``augment`` (checked by :func:`build_datasets` first) and returns a :class:`DataBundle`.
    ``default_model`` is the registered model (``torchsaq.models``) trained on it when none is named.
    Registering a taken name is an error.
    """

    def wrap(f: B) -> B:
        key = name or getattr(f, "__name__", None)
        if not key:
            raise ValueError("register_dataset: give name= for a builder without a __name__")
        if key in _REGISTRY:
            raise ValueError(f"data set {key!r} is already registered")
        if not isinstance(default_model, str) or not default_model:
            raise ValueError(f"data set {key!r}: default_model must be a model name, got {default_model!r}")
        global DATASETS
        _REGISTRY.register(key, (f, DatasetInfo(key, default_model, description, needs_data_dir, tuple(requires),
                                                 extra)), description=description)
        DATASETS = tuple(_REGISTRY)
        DEFAULT_MODELS[key] = default_model
        return f

    return wrap(fn) if fn is not None else wrap


def list_datasets() -> list[str]:
    """The registered data set names, in registration order (the built-in ones first, ``mnist1d`` leading)."""
    return list(_REGISTRY)


def _unknown_dataset(name: str) -> ValueError:
    import difflib

    close = difflib.get_close_matches(str(name), list(_REGISTRY), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return ValueError(f"unknown data set {name!r}{hint}; choose one of {', '.join(_REGISTRY)}")


def dataset_info(name: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of a registered data set (a ValueError with suggestions for an unknown name)."""
    if name not in _REGISTRY:
        raise _unknown_dataset(name)
    return _REGISTRY[name][1]


def default_model(dataset: str) -> str:
    """The model trained on ``dataset`` when none is named (its :class:`DatasetInfo`)."""
    return dataset_info(dataset).default_model


def missing_requirements(dataset: str) -> list[str]:
    """The distributions that building ``dataset`` needs and that are not installed (nothing is imported)."""
    return missing(dataset_info(dataset).requires)


def build_datasets(name: str = "mnist1d", data_dir: Optional[PathLike] = None, img_size: Optional[int] = None,
                   val_split: float = 0.0, seed: int = 0, augment: bool = True) -> DataBundle:
    """Build the train / val / test sets of the registered data set ``name`` (:func:`list_datasets`).

    ``data_dir`` is required for the image sets (never downloaded); "fashion_mnist" reads its four IDX
    files from ``data_dir``, or from /usr/share/datasets/fashion-mnist (Debian package
    dataset-fashion-mnist) when ``data_dir`` is None or holds none of them. ``img_size``: image side for the
    image sets (default 32 for CIFAR, 224 otherwise). ``val_split``: fraction of the training set held
    out as a validation set, chosen with a ``seed``-ed generator (deterministic; evaluation transforms).
    ``augment``: random training augmentation (CIFAR, ImageNet-style sets, Fashion-MNIST); False gives
    the training set the evaluation transform. Validation and test sets are never augmented.
    "imagefolder" tests on ``data_dir/test`` if present (else ``data_dir/val``); with both present,
    ``data_dir/val`` becomes the validation set. Flowers-102 trains on its train+val splits.
    """
    if name not in _REGISTRY:
        raise _unknown_dataset(name)
    if not 0 <= val_split < 1:
        raise ValueError(f"val_split must be in [0, 1), got {val_split}")
    if img_size is not None and (isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 1):
        raise ValueError(f"img_size must be a positive int or None, got {img_size!r}")
    build, _ = _REGISTRY[name]
    return build(data_dir=data_dir, img_size=img_size, val_split=val_split, seed=seed, augment=augment)


# -- the built-in data sets -----------------------------------------------------------------------------

@register_dataset(name="mnist1d", default_model="cnn1d", requires=("numpy", "mnist1d"),
                  description="MNIST-1D, generated locally, 4,000 train / 1,000 test sequences of 40 values")
def _mnist1d(data_dir: Optional[PathLike] = None, img_size: Optional[int] = None, val_split: float = 0.0,
            seed: int = 0, augment: bool = True) -> DataBundle:
    _check_no_img_size("mnist1d", img_size, 40)
    return _tensor_bundle("mnist1d", *_mnist1d_arrays(), num_classes=10, val_split=val_split, seed=seed)


@register_dataset(name="digits", default_model="cnn_digits", requires=("numpy", "sklearn"),
                  description="scikit-learn's 8x8 digits, embedded, 1,437 train / 360 test")
def _digits(data_dir: Optional[PathLike] = None, img_size: Optional[int] = None, val_split: float = 0.0,
           seed: int = 0, augment: bool = True) -> DataBundle:
    _check_no_img_size("digits", img_size, 8)
    return _tensor_bundle("digits", *_digits_arrays(), num_classes=10, val_split=val_split, seed=seed)


@register_dataset(name="fashion_mnist", default_model="cnn_fmnist", requires=("numpy",),
                  description=f"Fashion-MNIST from its four IDX files in data_dir or {FASHION_MNIST_SYSTEM_DIR}")
def _fashion_mnist(data_dir: Optional[PathLike] = None, img_size: Optional[int] = None, val_split: float = 0.0,
                  seed: int = 0, augment: bool = True) -> DataBundle:
    _check_no_img_size("fashion_mnist", img_size, 28)
    return _fashion_mnist_bundle(data_dir, val_split, seed, augment)


def _image_bundle(name: str, data_dir: Optional[PathLike] = None, img_size: Optional[int] = None,
                  val_split: float = 0.0, seed: int = 0, augment: bool = True) -> DataBundle:
    """An image data set read from ``data_dir`` (:func:`_path_dataset`) with the paper's transforms."""
    train_base, test_base, own_val, num_classes, classes = _path_dataset(name, data_dir)
    train_tf, eval_tf = image_transforms(name, img_size)
    if not augment:
        train_tf = eval_tf
    size = img_size or (32 if name.startswith("cifar") else 224)
    if own_val is not None and val_split > 0:
        raise ValueError(f"{name}: {data_dir!r} has its own val/ folder next to test/; drop val_split "
                         "(or remove val/ to carve the validation set out of train/)")
    val: Optional[TransformSubset]
    if val_split > 0:
        tr, va = _split_indices(len(train_base), val_split, seed)  # type: ignore[arg-type]
        train, val = TransformSubset(train_base, tr, train_tf), TransformSubset(train_base, va, eval_tf)
    else:
        train = TransformSubset(train_base, None, train_tf)
        val = TransformSubset(own_val, None, eval_tf) if own_val is not None else None
    return DataBundle(name, train, val, TransformSubset(test_base, None, eval_tf), num_classes, 3,
                      (3, size, size), classes)


for _name, _model, _description in (
        ("cifar10", "resnet20", "CIFAR-10, python version, from data_dir"),
        ("cifar100", "resnet20", "CIFAR-100, python version, from data_dir"),
        ("imagenet", "resnet18", "ImageNet: train/ and val/ class folders under data_dir"),
        ("imagefolder", "resnet18", "any class-per-folder image set: train/ and test/ or val/ under data_dir"),
        ("flowers102", "resnet18", "Oxford Flowers-102 from data_dir, trained on its train+val splits"),
        ("pets", "resnet18", "Oxford-IIIT Pets from data_dir")):
    register_dataset(functools.partial(_image_bundle, _name), name=_name, default_model=_model,
                     description=_description, needs_data_dir=True, requires=("torchvision", "PIL"))


def subset_train(bundle: DataBundle, n: int, seed: int = 0) -> DataBundle:
    """Keep ``n`` training examples (0: all): the first ``n`` of a permutation with a fixed seed (``seed``, not
    the run's), so every run seed trains on the same images (paired comparisons); the validation and test sets
    are unchanged. Another ``seed`` gives another fixed subset."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"train_subset must be an int >= 0 (0: the whole training set), got {n!r}")
    size = len(bundle.train)  # type: ignore[arg-type]
    if n == 0 or n >= size:
        return bundle
    keep = torch.randperm(size, generator=torch.Generator().manual_seed(int(seed)))[:n].sort().values
    ds = bundle.train
    if isinstance(ds, AugmentedTensorDataset):
        train: Dataset = AugmentedTensorDataset(ds.tensors[0][keep], ds.tensors[1][keep], ds.augment)
    elif isinstance(ds, TensorDataset):
        train = TensorDataset(*(t[keep] for t in ds.tensors))
    else:
        train = Subset(ds, keep.tolist())
    return dataclasses.replace(bundle, train=train)


# -- batches made on the device ------------------------------------------------------------------------

def _augment_seed(seed: int, epoch: int) -> int:
    """A generator seed for the augmentation of (seed, epoch), apart from the shuffling's seed + epoch."""
    return (int(seed) * 0x9E3779B1 + int(epoch) * 0x85EBCA77 + 0x5A17) % (2**63)


class DeviceLoader:
    """Batches of a TensorDataset kept whole on ``device``, shuffled and augmented there: no per-item work.

    Stands in for ``DataLoader(dataset, batch_size, sampler=DistributedSampler(...))``: with ``shuffle``
    the order is the DistributedSampler's (``randperm`` seeded with ``seed + epoch``; rank ``rank`` of
    ``world`` takes every world-th index, padded so all ranks get ``ceil(N / world)``), and sample i of
    epoch e is augmented (the dataset's ``augment``, if any) with parameters drawn for (seed, e) -- so the
    batches depend only on (seed, epoch) and a run resumed at an epoch boundary, or ``start`` samples into
    one, sees exactly the batches of an uninterrupted run. The random numbers are drawn on the CPU once
    per epoch (CPU and GPU runs see the same data); gathering, cropping and flipping run on ``device``.
    Without ``shuffle`` (evaluation) it yields the rank's indices rank, rank + world, ... in order, unpadded
    and never augmented. Call :meth:`set_epoch` before each epoch.
    """

    def __init__(self, dataset: TensorDataset, batch_size: int, device: Union[str, torch.device] = "cpu",
                 seed: int = 0, shuffle: bool = True, drop_last: bool = False, rank: int = 0, world: int = 1):
        tensors = getattr(dataset, "tensors", None)
        if tensors is None or len(tensors) != 2:
            raise ValueError("DeviceLoader needs a TensorDataset of (inputs, labels)")
        if batch_size < 1 or not 0 <= rank < world:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world, got {batch_size}, {rank}, {world}")
        self.device = torch.device(device)
        self.x, self.y = (t.to(self.device) for t in tensors)
        self.batch_size, self.seed, self.shuffle, self.drop_last = int(batch_size), int(seed), shuffle, drop_last
        self.rank, self.world = rank, world
        self.augment: Optional[TensorAugment] = getattr(dataset, "augment", None) if shuffle else None
        n = len(self.x)
        self.num_samples = math.ceil(n / world) if shuffle else len(range(rank, n, world))
        self.epoch = 0
        self.start = 0  # samples of this rank's epoch to skip (resuming mid-epoch)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation the next iteration yields."""
        self.epoch = int(epoch)

    def indices(self) -> Tensor:
        """This rank's sample indices for the current epoch, from ``start`` on (CPU, int64)."""
        n = len(self.x)
        if not self.shuffle:
            return torch.arange(self.rank, n, self.world)[self.start:]
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        total = self.num_samples * self.world
        if total > n:
            idx = idx.repeat(math.ceil(total / n))[:total]
        return idx[self.rank:total:self.world][self.start:]

    def __len__(self) -> int:
        left = max(self.num_samples - self.start, 0)
        return left // self.batch_size if self.drop_last else math.ceil(left / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        idx = self.indices().to(self.device)
        params = None
        if self.augment is not None:  # per sample of the whole data set: independent of rank, world and start
            gen = torch.Generator().manual_seed(_augment_seed(self.seed, self.epoch))
            params = self.augment.draw(len(self.x), gen).to(self.device)
        for b in range(len(self)):
            j = idx[b * self.batch_size:(b + 1) * self.batch_size]
            x = self.x[j]
            if params is not None:
                x = self.augment.apply(x, params[j])  # type: ignore[union-attr]
            yield x, self.y[j]

    def __repr__(self) -> str:
        return (f"DeviceLoader(n={len(self.x)}, batch_size={self.batch_size}, device={self.device}, "
                f"shuffle={self.shuffle}, augment={self.augment}, rank={self.rank}/{self.world})")
