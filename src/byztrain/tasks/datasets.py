"""Datasets: locate, (optionally) download and load MNIST-family data into normalised tensors.

Where the files are looked for (``find_data_dir``), first hit wins:

1. ``data_dir`` (``task.data_dir``): the directory itself, then ``data_dir/<name>``;
2. ``$BYZTRAIN_DATA``: the directory itself, then ``$BYZTRAIN_DATA/<name>``;
3. ``~/.cache/byztrain/<name>`` (also where ``download`` puts files);
4. the system dataset folder ``/usr/share/datasets/<name>``, where Debian/Ubuntu's package
   ``dataset-fashion-mnist`` installs Fashion-MNIST. Only Fashion-MNIST has such a package:
   ``apt-cache search mnist`` lists ``dataset-fashion-mnist`` and nothing for plain MNIST.

A directory qualifies when it holds all four canonical files, each either gzip-compressed (``*.gz``) or
raw: ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
``t10k-labels-idx1-ubyte``. When nothing qualifies, ``load_dataset`` downloads into the cache directory
(unless ``download=False``); any failure raises ``DatasetNotFoundError`` explaining where the files were
looked for and how to get them. Synthetic data is never substituted.

Normalisation (per-dataset constants, pixel values scaled to [0, 1] first, then ``(x - mean) / std``):
the training-set pixel mean and standard deviation, MNIST 0.1307 / 0.3081 (the usual constants) and
Fashion-MNIST 0.2860 / 0.3530 (measured here on the 60k training images: 0.28604 / 0.35302).

No checksums are checked: the Debian package ships re-compressed ``.gz`` files whose MD5 differ from the
upstream ones. Files are validated structurally instead (IDX header, shapes, label range).
"""

from __future__ import annotations

import functools
import http.client
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from byztrain.registry import DATASETS, Entry

from .idx import read_idx

__all__ = [
    "Dataset",
    "DatasetNotFoundError",
    "DOWNLOAD_TIMEOUT_S",
    "clear_dataset_cache",
    "download",
    "find_data_dir",
    "load_dataset",
]

ENV_VAR = "BYZTRAIN_DATA"
#: Root of the Debian/Ubuntu system dataset folder (``dpkg -L dataset-fashion-mnist``). A module attribute
#: so tests can point it elsewhere.
SYSTEM_DATASET_ROOT = Path("/usr/share/datasets")
#: Seconds urllib waits on any single network operation (connect, each read) before giving up.
DOWNLOAD_TIMEOUT_S = 15.0

_SPLIT_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


@dataclass(frozen=True)
class _IdxSpec:
    name: str
    title: str
    base_url: str
    mean: float
    std: float
    apt_package: str | None  # Debian/Ubuntu package installing it under SYSTEM_DATASET_ROOT/<name>
    num_classes: int = 10
    image_size: int = 28


_SPECS: dict[str, _IdxSpec] = {
    "fashion-mnist": _IdxSpec(
        name="fashion-mnist",
        title="Fashion-MNIST",
        # The zalando S3 bucket (github.com/zalandoresearch/fashion-mnist README).
        base_url="http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        mean=0.2860,
        std=0.3530,
        apt_package="dataset-fashion-mnist",
    ),
    "mnist": _IdxSpec(
        name="mnist",
        title="MNIST",
        # PyTorch's S3 mirror (yann.lecun.com no longer serves the files reliably).
        base_url="https://ossci-datasets.s3.amazonaws.com/mnist/",
        mean=0.1307,
        std=0.3081,
        apt_package=None,
    ),
}


@dataclass(frozen=True)
class DatasetSource:
    """How a registered dataset is found and loaded (a DATASETS entry's ``obj``)."""

    load: Callable[..., Dataset]  # (data_dir, *, download) -> Dataset
    find: Callable[..., Path]  # (data_dir) -> the directory holding it; never downloads
    clear: Callable[[], None]  # forget the copies kept in memory


class DatasetNotFoundError(FileNotFoundError):
    """The dataset files are nowhere to be found and could not be downloaded.

    ``searched`` lists every directory that was looked at; the message also says how to get the files.
    """

    def __init__(self, message: str, *, name: str = "", searched: tuple[str, ...] = ()):
        super().__init__(message)
        self.name = name
        self.searched = tuple(searched)

    def __str__(self) -> str:  # FileNotFoundError's default __str__ would print "[Errno None] ..."
        return str(self.args[0])


def cache_dir(name: str) -> Path:
    """``~/.cache/byztrain/<name>``: where downloads go and the third place searched."""
    return Path.home() / ".cache" / "byztrain" / name


def _candidates(name: str, data_dir: str | os.PathLike | None, spec: _IdxSpec) -> list[tuple[Path, str]]:
    return candidate_dirs(name, data_dir, spec.apt_package)


def candidate_dirs(
    name: str, data_dir: str | os.PathLike | None, apt_package: str | None = None
) -> list[tuple[Path, str]]:
    """Every directory to look in for dataset `name`, in order, with where it came from (README, Data)."""
    out: list[tuple[Path, str]] = []
    if data_dir is not None and str(data_dir) != "":
        root = Path(data_dir).expanduser()
        out += [(root, "task.data_dir"), (root / name, "task.data_dir")]
    env = os.environ.get(ENV_VAR)
    if env:
        root = Path(env).expanduser()
        out += [(root, f"${ENV_VAR}"), (root / name, f"${ENV_VAR}")]
    out.append((cache_dir(name), "user cache"))
    if apt_package:
        out.append((SYSTEM_DATASET_ROOT / name, f"system folder of the package {apt_package}"))
    return out


def _file_in(directory: Path, stem: str) -> Path | None:
    """The raw file if present (fastest to read), else the gzip one, else None."""
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _how_to_get(spec: _IdxSpec) -> str:
    files = ", ".join(f"{spec.base_url}{stem}.gz" for stem in _SPLIT_FILES.values())
    lines = ["How to get them:"]
    if spec.apt_package:
        lines.append(f"  - Debian/Ubuntu: sudo apt-get install {spec.apt_package}")
        lines.append(f"  - or download the four files ({files}) into {cache_dir(spec.name)},")
    else:
        lines.append(f"  - no Debian/Ubuntu package ships {spec.title}; download the four files ({files})")
        lines.append(f"    into {cache_dir(spec.name)},")
    lines += [
        f"    or into any directory and set task.data_dir=DIR (or ${ENV_VAR}=DIR) to it",
        f"    (files may stay gzip-compressed; DIR or DIR/{spec.name} is searched).",
    ]
    return "\n".join(lines)


def _not_found_message(spec: _IdxSpec, report: list[str]) -> str:
    wanted = ", ".join(f"{stem}[.gz]" for stem in _SPLIT_FILES.values())
    return "\n".join(
        [f"{spec.title} not found. Looked for {wanted} in:"]
        + [f"  - {line}" for line in report]
        + [_how_to_get(spec)]
    )


def _search(name: str, data_dir: str | os.PathLike | None) -> tuple[Path | None, list[str], list[str]]:
    spec = _SPECS[name]
    searched: list[str] = []
    report: list[str] = []
    for directory, origin in _candidates(name, data_dir, spec):
        searched.append(str(directory))
        if not directory.is_dir():
            report.append(f"{directory} ({origin}): no such directory")
            continue
        missing = [stem for stem in _SPLIT_FILES.values() if _file_in(directory, stem) is None]
        if not missing:
            return directory, searched, report
        report.append(f"{directory} ({origin}): missing {', '.join(missing)}")
    if not os.environ.get(ENV_VAR):
        report.insert(2 if data_dir is not None and str(data_dir) != "" else 0, f"${ENV_VAR} is not set")
    return None, searched, report


def find_data_dir(name: str, data_dir: str | os.PathLike | None) -> Path:
    """The first directory (search order in the module docstring) holding all four files of ``name``.

    Raises ``DatasetNotFoundError`` (listing every directory searched) when there is none; never downloads.
    """
    return DATASETS.lookup(name, "dataset").obj.find(data_dir)


def _find_idx(name: str, data_dir: str | os.PathLike | None) -> Path:
    found, searched, report = _search(name, data_dir)
    if found is None:
        spec = _SPECS[name]
        raise DatasetNotFoundError(_not_found_message(spec, report), name=name, searched=tuple(searched))
    return found


def download(name: str, dest: str | os.PathLike) -> Path:
    """Download the four canonical ``.gz`` files of ``name`` into ``dest`` (created) and return ``dest``.

    Files already present are kept. Each file is fetched to a temporary name, checked to be a readable IDX
    file, then renamed, so an interrupted download never leaves a half file behind. Any failure raises
    ``DatasetNotFoundError`` with the full explanation.
    """
    return _fetch(name, Path(dest).expanduser(), (), [])


def fetch_file(url: str, target: Path, validate) -> None:
    """Download `url` to `target` atomically: a temporary file in the same folder, `validate(path)` (raises
    on a bad file), then a rename, so an interrupted or corrupt download never becomes visible. Errors
    propagate; the temporary file is always removed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_name = None
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.", delete=False) as tmp:
                tmp_name = tmp.name
                shutil.copyfileobj(response, tmp)
        validate(Path(tmp_name))
        os.replace(tmp_name, target)
        tmp_name = None
    finally:
        if tmp_name is not None:
            Path(tmp_name).unlink(missing_ok=True)


def _fetch(name: str, dest: Path, searched: tuple[str, ...], report: list[str]) -> Path:
    spec = _SPECS[name]
    created = not dest.exists()
    for stem in _SPLIT_FILES.values():
        if _file_in(dest, stem) is not None:
            continue
        url = f"{spec.base_url}{stem}.gz"
        try:
            fetch_file(url, dest / f"{stem}.gz", read_idx)
        except (OSError, urllib.error.URLError, http.client.HTTPException, ValueError) as exc:
            if created and dest.is_dir() and not any(dest.iterdir()):
                dest.rmdir()  # leave no empty cache folder behind
            if report:
                message = _not_found_message(spec, report)
            else:
                message = f"{spec.title} is not available in {dest}.\n{_how_to_get(spec)}"
            raise DatasetNotFoundError(
                f"{message}\nDownloading {url} into {dest} failed: {type(exc).__name__}: {exc}",
                name=name,
                searched=tuple(dict.fromkeys(searched + (str(dest),))),
            ) from exc
    return dest


@dataclass(eq=False)
class Dataset:
    """A loaded image-classification dataset, normalised, in memory.

    Shared between runs of one process (``load_dataset`` caches it): treat the tensors as read-only.
    ``train_batch`` returns fresh tensors, so callers (e.g. data-poisoning attacks) may modify its output.
    """

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    train_x: torch.Tensor = field(repr=False)  # float32 (N, C, H, W), normalised
    train_y: torch.Tensor = field(repr=False)  # int64 (N,)
    test_x: torch.Tensor = field(repr=False)
    test_y: torch.Tensor = field(repr=False)
    #: What ``train_batch(..., augment=True)`` does; None: the dataset has no augmentation.
    augmentation: ClassVar[str | None] = None

    def __post_init__(self) -> None:
        c, s = self.in_channels, self.image_size
        for split, x, y in (("train", self.train_x, self.train_y), ("test", self.test_x, self.test_y)):
            if x.dim() != 4 or tuple(x.shape[1:]) != (c, s, s) or x.dtype != torch.float32:
                raise ValueError(
                    f"{self.name} {split}_x: expected float32 (N, {c}, {s}, {s}), "
                    f"got {x.dtype} {tuple(x.shape)}"
                )
            if y.dtype != torch.int64 or tuple(y.shape) != (x.shape[0],):
                raise ValueError(
                    f"{self.name} {split}_y: expected int64 ({x.shape[0]},), got {y.dtype} {tuple(y.shape)}"
                )

    @property
    def num_train(self) -> int:
        return int(self.train_y.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.test_y.shape[0])

    def train_batch(
        self, indices: torch.Tensor, seed: int, augment: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather training samples ``indices`` (new tensors). ``seed`` drives augmentation: MNIST-family
        datasets have none, so it is unused here (CIFAR-10 crops and flips from it, tasks/cifar.py)."""
        del seed
        if augment:
            raise ValueError(f"{self.name} has no data augmentation (task.augment is for cifar10)")
        indices = torch.as_tensor(indices, dtype=torch.int64)
        return self.train_x.index_select(0, indices), self.train_y.index_select(0, indices)


def _load_split(
    spec: _IdxSpec, directory: Path, images: str, labels: str
) -> tuple[torch.Tensor, torch.Tensor]:
    img_path = _file_in(directory, _SPLIT_FILES[images])
    lbl_path = _file_in(directory, _SPLIT_FILES[labels])
    assert img_path is not None and lbl_path is not None
    x = read_idx(img_path)
    y = read_idx(lbl_path)
    s = spec.image_size
    if x.dtype != np.uint8 or x.ndim != 3 or x.shape[1:] != (s, s):
        raise ValueError(f"{img_path}: expected uint8 images of shape (N, {s}, {s}), got {x.dtype} {x.shape}")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(
            f"{lbl_path}: expected {x.shape[0]} labels (one per image in {img_path.name}), "
            f"got shape {y.shape}"
        )
    if y.size and (int(y.min()) < 0 or int(y.max()) >= spec.num_classes):
        raise ValueError(
            f"{lbl_path}: labels must lie in [0, {spec.num_classes}), got [{int(y.min())}, {int(y.max())}]"
        )
    xt = torch.from_numpy(x).unsqueeze(1).to(torch.float32)
    xt.div_(255.0).sub_(spec.mean).div_(spec.std)
    return xt.contiguous(), torch.from_numpy(y.astype(np.int64))


@functools.lru_cache(maxsize=4)
def _load_cached(name: str, directory: str) -> Dataset:
    spec = _SPECS[name]
    path = Path(directory)
    train_x, train_y = _load_split(spec, path, "train_images", "train_labels")
    test_x, test_y = _load_split(spec, path, "test_images", "test_labels")
    return Dataset(
        name=name,
        num_classes=spec.num_classes,
        in_channels=1,
        image_size=spec.image_size,
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
    )


def clear_dataset_cache() -> None:
    """Forget the datasets ``load_dataset`` keeps in memory."""
    for entry in DATASETS.values():
        entry.obj.clear()


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, *, download: bool = True) -> Dataset:
    """Load ``name``, a DATASETS entry ("fashion-mnist", "mnist"; "cifar10" from tasks/cifar.py).

    Searches as ``find_data_dir`` does; if nothing is found and ``download`` is true, downloads into
    ``~/.cache/byztrain/<name>``. Loaded datasets are cached in-process, keyed by (name, resolved
    directory), so a sweep running many runs in one process reads the files once.
    """
    return DATASETS.lookup(name, "dataset").obj.load(data_dir, download=download)


def _load_idx(name: str, data_dir: str | os.PathLike | None = None, *, download: bool = True) -> Dataset:
    spec = _SPECS[name]
    found, searched, report = _search(name, data_dir)
    if found is None:
        if not download:
            raise DatasetNotFoundError(
                _not_found_message(spec, report) + "\n(downloading was disabled)",
                name=name,
                searched=tuple(searched),
            )
        found = _fetch(name, cache_dir(name), tuple(searched), report)
    return _load_cached(name, str(found.resolve()))


for _name, _idx in _SPECS.items():
    DATASETS.add(
        Entry(
            _name,
            f"{_idx.title}: {_idx.num_classes} classes, {_idx.image_size}x{_idx.image_size} greyscale, IDX files",
            obj=DatasetSource(
                functools.partial(_load_idx, _name), functools.partial(_find_idx, _name), _load_cached.cache_clear
            ),
            variant="normalised with the training set's mean and std",
        )
    )
