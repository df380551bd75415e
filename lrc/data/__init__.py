"""Registry of data sets: ``build_data(name, data_dir, batch_size, seed)`` → train/test loaders.

``digits`` (scikit-learn's 8×8 handwritten digits, shipped with the package) needs no
download and is the built-in default. The others read torchvision's formats from
``data_dir``; a missing data set is a :class:`DataError` saying where to put it.
"""

from __future__ import annotations

import gzip
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

__all__ = ["DATASETS", "DataError", "Data", "build_data", "cifar_transforms", "ucm_transforms"]

FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")


class DataError(RuntimeError):
    """A data set cannot be found or read; the message says what to do."""


@dataclass
class Data:
    train: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, ...]

    def loaders(self, batch_size: int, seed: int, eval_batch_size: int | None = None,
                workers: int = 0) -> tuple[DataLoader, DataLoader]:
        g = torch.Generator().manual_seed(seed)
        train = DataLoader(self.train, batch_size=batch_size, shuffle=True, generator=g, num_workers=workers,
                           drop_last=False)
        test = DataLoader(self.test, batch_size=eval_batch_size or max(batch_size, 256), num_workers=workers)
        return train, test


DATASETS: dict[str, Callable[..., Data]] = {}


def register_data(name: str):
    def wrap(fn):
        DATASETS[name] = fn
        return fn
    return wrap


def build_data(name: str, data_dir: str | Path | None = None, seed: int = 0, image_size: int | None = None,
               channels: int | None = None, train_samples: int | None = None, text: dict | None = None,
               test_samples: int | None = None) -> Data:
    """A registered data set; ``image_size`` resizes images (e.g. CIFAR to 224 for ViT-B/16)
    where the data set has images, ``None`` keeps its native size; ``channels: 3`` repeats a
    grey-scale image into three channels (for networks pretrained on RGB); ``train_samples``
    keeps that many training samples, the same fixed subset for every seed and method (and
    ``test_samples`` of the test set, e.g. to evaluate a large text corpus quickly). ``text``
    holds the options of the ``text`` data set (:mod:`lrc.data.text`: tokenizer, columns,
    max_length)."""
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose one of: {', '.join(sorted(DATASETS))}")
    builder = DATASETS[name]
    accepted = inspect.signature(builder).parameters
    options = {}
    if image_size is not None:
        if "image_size" not in accepted:
            raise ValueError(f"data.image_size: {name} keeps its native size (only CIFAR, UCM and the MNISTs "
                             "resize); drop the setting")
        if image_size < 8:
            raise ValueError(f"data.image_size = {image_size}: must be at least 8 pixels")
        options["image_size"] = image_size
    if channels is not None:
        if "channels" not in accepted:
            raise ValueError(f"data.channels: {name} keeps its own channels (only the MNISTs repeat theirs); "
                             "drop the setting")
        if channels not in (1, 3):
            raise ValueError(f"data.channels = {channels}: choose 1 or 3")
        options["channels"] = channels
    if name == "text":
        from .text import text_data

        data = text_data(data_dir, seed, **(text or {}))
    else:
        data = builder(Path(data_dir) if data_dir else None, seed, **options)
    if train_samples is not None:
        if not 1 <= train_samples <= len(data.train):
            raise ValueError(f"data.train_samples = {train_samples}: {name} has {len(data.train)} training samples")
        keep = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(1234))[:train_samples]
        data.train = Subset(data.train, sorted(keep.tolist()))
    if test_samples is not None:
        if not 1 <= test_samples <= len(data.test):
            raise ValueError(f"data.test_samples = {test_samples}: {name} has {len(data.test)} test samples")
        keep = torch.randperm(len(data.test), generator=torch.Generator().manual_seed(4321))[:test_samples]
        data.test = Subset(data.test, sorted(keep.tolist()))
    return data


@register_data("digits")
def digits(data_dir: Path | None, seed: int) -> Data:
    """scikit-learn's 1,797 8×8 digits, a fixed seeded 80/20 split, scaled to [0, 1] and
    standardised with the training mean/std."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("the digits data set comes with scikit-learn: pip install scikit-learn") from None
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))  # split fixed across runs
    cut = int(0.8 * len(x))
    tr, te = perm[:cut], perm[cut:]
    mean, std = x[tr].mean(), x[tr].std()
    x = (x - mean) / std
    return Data(TensorDataset(x[tr], y[tr]), TensorDataset(x[te], y[te]), 10, (1, 8, 8))


@register_data("synthetic")
def synthetic(data_dir: Path | None, seed: int, image_size: int = 32, channels: int = 3) -> Data:
    """Random images (standard normal, ``channels×image_size×image_size``) with random labels
    of 10 classes: 5,000 for training, 1,000 for testing, the same for every seed. For timing a
    preset's training throughput without its data (``--set data.name=synthetic``); nothing to
    learn."""
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(6000, channels, image_size, image_size, generator=g)
    y = torch.randint(0, 10, (6000,), generator=g)
    return Data(TensorDataset(x[:5000], y[:5000]), TensorDataset(x[5000:], y[5000:]), 10,
                (channels, image_size, image_size))


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find_idx(dirs: list[Path], stem: str) -> Path | None:
    for d in dirs:
        for sub in ("", "raw", "FashionMNIST/raw", "MNIST/raw"):
            for suffix in ("", ".gz"):
                p = d / sub / f"{stem}{suffix}"
                if p.is_file():
                    return p
    return None


def _mnist_like(name: str, data_dir: Path | None, mean: float, std: float, extra_dirs: list[Path],
                image_size: int = 28, channels: int = 1) -> Data:
    dirs = ([data_dir] if data_dir else []) + extra_dirs
    files = {k: _find_idx(dirs, f"{k}-ubyte") for k in
             ("train-images-idx3", "train-labels-idx1", "t10k-images-idx3", "t10k-labels-idx1")}
    missing = [k for k, v in files.items() if v is None]
    if missing:
        where = ", ".join(str(d) for d in dirs) or "(no --data-dir given)"
        raise DataError(f"{name} not found in {where}: put the four IDX files ({', '.join(missing)}-ubyte[.gz]) "
                        f"there, e.g. with torchvision.datasets.{'FashionMNIST' if 'fashion' in name else 'MNIST'}"
                        f"(DIR, download=True), and pass --data-dir DIR")

    def load(images, labels):
        x = torch.tensor(_read_idx(files[images]).copy(), dtype=torch.float32).unsqueeze(1) / 255.0
        x = (x - mean) / std
        if image_size != 28:  # bilinear, once at load time (6 MB per 1,000 images at 32×32, 3 channels)
            x = torch.cat([torch.nn.functional.interpolate(c, size=(image_size, image_size), mode="bilinear",
                                                           align_corners=False, antialias=image_size < 28)
                           for c in x.split(4096)])
        x = x.expand(-1, channels, -1, -1)  # a view: grey repeated into RGB without copies
        return TensorDataset(x, torch.tensor(_read_idx(files[labels]).copy(), dtype=torch.long))

    return Data(load("train-images-idx3", "train-labels-idx1"), load("t10k-images-idx3", "t10k-labels-idx1"),
                10, (channels, image_size, image_size))


@register_data("fashion-mnist")
def fashion_mnist(data_dir: Path | None, seed: int, image_size: int = 28, channels: int = 1) -> Data:
    """Fashion-MNIST from IDX files in ``data_dir`` or, without download, in
    /usr/share/datasets/fashion-mnist (Debian's package ``dataset-fashion-mnist``);
    optionally resized and repeated into three channels."""
    return _mnist_like("fashion-mnist", data_dir, 0.2860, 0.3530, [FASHION_MNIST_SYSTEM_DIR], image_size, channels)


@register_data("mnist")
def mnist(data_dir: Path | None, seed: int, image_size: int = 28, channels: int = 1) -> Data:
    return _mnist_like("mnist", data_dir, 0.1307, 0.3081, [], image_size, channels)


# the paper's Section 10: per-channel mean and std of each training set
CIFAR_STATS = {"cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
               "cifar100": ((0.5071, 0.4867, 0.4408), (0.2673, 0.2564, 0.2762))}


def cifar_transforms(name: str, image_size: int = 32):
    """``(train, test)`` transforms of the paper's Section 10: a random horizontal flip on the
    training set, then normalisation with the data set's mean and std; test images are
    normalised only. ``image_size`` other than 32 resizes first (224 for the ViTs)."""
    from torchvision import transforms as T

    norm = T.Normalize(*CIFAR_STATS[name])
    resize = [T.Resize(image_size)] if image_size != 32 else []  # 32×32 → e.g. 224 for ViT-B/16
    return (T.Compose([*resize, T.RandomHorizontalFlip(), T.ToTensor(), norm]),
            T.Compose([*resize, T.ToTensor(), norm]))


def _cifar(name: str, cls_name: str, num_classes: int):
    def build(data_dir: Path | None, seed: int, image_size: int = 32) -> Data:
        import torchvision

        if data_dir is None:
            raise DataError(f"{name} needs --data-dir DIR holding torchvision's {cls_name} files "
                            f"(torchvision.datasets.{cls_name}(DIR, download=True) fetches them)")
        train_tf, test_tf = cifar_transforms(name, image_size)
        cls = getattr(torchvision.datasets, cls_name)
        try:
            train = cls(str(data_dir), train=True, transform=train_tf, download=False)
            test = cls(str(data_dir), train=False, transform=test_tf, download=False)
        except RuntimeError as e:
            raise DataError(f"{name} not found in {data_dir} ({e}); torchvision.datasets.{cls_name}"
                            f"({str(data_dir)!r}, download=True) fetches it") from None
        return Data(train, test, num_classes, (3, image_size, image_size))

    return build


register_data("cifar10")(_cifar("cifar10", "CIFAR10", 10))
register_data("cifar100")(_cifar("cifar100", "CIFAR100", 100))


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class _Subset(Dataset):
    """Indices of an ImageFolder with their own transform."""

    def __init__(self, folder, indices, transform) -> None:
        self.folder, self.indices, self.transform = folder, indices, transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        path, label = self.folder.samples[self.indices[i]]
        return self.transform(self.folder.loader(path)), label


def ucm_transforms(image_size: int = 224):
    """``(train, test)`` transforms of the paper's Section 10 for UC Merced: resized to
    ``image_size``×``image_size`` (256, the native size, for the CNNs; 224 for the ViTs) and
    normalised with ImageNet's mean and std, training and test alike (no augmentation)."""
    from torchvision import transforms as T

    tf = T.Compose([T.Resize((image_size, image_size)), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    return tf, tf


@register_data("ucm")
def uc_merced(data_dir: Path | None, seed: int, image_size: int = 224) -> Data:
    """UC Merced land use (21 classes, 100 images each) from an ImageFolder tree
    (``DIR/<class>/*.tif``, or ``DIR/Images/<class>/…`` as the archive unpacks), with a fixed
    seeded 80/20 split per class; :func:`ucm_transforms` (the paper's: 256×256 for the CNNs,
    224×224 for the ViTs, ImageNet normalisation)."""
    import torchvision

    if data_dir is None:
        raise DataError("ucm needs --data-dir DIR with the UC Merced land-use images (one folder per class), "
                        "from http://weegee.vision.ucmerced.edu/datasets/landuse.html")
    root = data_dir / "Images" if (data_dir / "Images").is_dir() else data_dir
    try:
        folder = torchvision.datasets.ImageFolder(str(root))
    except (FileNotFoundError, RuntimeError) as e:
        raise DataError(f"ucm not found in {root} ({e}); unpack UCMerced_LandUse there, one folder per class") from None
    if len(folder.classes) != 21:
        raise DataError(f"{root} holds {len(folder.classes)} class folders; UC Merced has 21")
    g = torch.Generator().manual_seed(1234)  # the split is fixed across runs and seeds
    by_class: dict[int, list[int]] = {}
    for i, (_, label) in enumerate(folder.samples):
        by_class.setdefault(label, []).append(i)
    train_idx, test_idx = [], []
    for label in sorted(by_class):
        idx = by_class[label]
        perm = torch.randperm(len(idx), generator=g).tolist()
        cut = int(0.8 * len(idx))
        train_idx += [idx[j] for j in perm[:cut]]
        test_idx += [idx[j] for j in perm[cut:]]
    train_tf, test_tf = ucm_transforms(image_size)
    return Data(_Subset(folder, train_idx, train_tf), _Subset(folder, test_idx, test_tf), 21, (3, image_size, image_size))


@register_data("text")
def text(data_dir: Path | None, seed: int) -> Data:
    """Text classification from CSV/JSON-lines files (``data.text_column``, ``data.label_column``,
    ``data.max_length``, ``data.tokenizer``), see :mod:`lrc.data.text`."""
    from .text import text_data

    return text_data(data_dir, seed, None)

