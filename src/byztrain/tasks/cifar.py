"""CIFAR-10 from the canonical python batches, and its seeded augmentation.

Files: ``cifar-10-batches-py/`` with ``data_batch_1`` .. ``data_batch_5`` and ``test_batch``, each a pickled
dict with ``data`` (uint8, N x 3072: 1024 red, 1024 green, 1024 blue values, rows top to bottom) and
``labels`` (N ints in 0..9); distributed as https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz.

Where they are looked for, first hit wins (the same order as the MNIST family, README: Data):
``task.data_dir`` (the directory itself, then ``<dir>/cifar10``), ``$BYZTRAIN_DATA`` (same two), then
``~/.cache/byztrain/cifar10``. In each directory, any of: the six files directly, the extracted folder
``cifar-10-batches-py/``, or the archive ``cifar-10-python.tar.gz`` itself (read in place, not extracted).
When nothing is found, ``load_cifar10`` downloads the archive into ``~/.cache/byztrain/cifar10`` (checked
against its published MD5) unless downloading is disabled; failing that, ``DatasetNotFoundError`` lists every
directory searched and says how to get the files. No Debian/Ubuntu package ships CIFAR-10.

The batches are pickles. They are read with an unpickler that only accepts what numpy arrays, lists, strings
and numbers need, so a tampered file cannot run code.

Storage: training images stay uint8 (N, 3, 32, 32) -- 154 MB for 50,000 instead of 614 MB as float32, which
matters when a sweep runs one process per core -- and ``train_batch`` converts and normalises only the batch
(per-channel mean (0.4914, 0.4822, 0.4465), std (0.2023, 0.1994, 0.2010), the paper's code). Test images
are stored normalised float32, as evaluation feeds them to the model directly.

Augmentation (``train_batch(..., augment=True)``, the paper's torchvision ``RandomCrop(32, padding=4)`` +
``RandomHorizontalFlip()``): zero-pad 4 pixels per side, crop 32x32 at offsets (dy, dx) in 0..8, then flip
left-right with probability 1/2. The randomness is a pure function of the public seed: a CPU
``torch.Generator`` seeded with ``augment_seed(seed)`` draws, in this order, B row offsets, B column offsets
and B flip bits (``torch.randint``) for a batch of B images. A validator holding the seed recomputes the
same batch bit for bit, on any device. The whole batch is cropped and flipped with one gather (no Python
loop over images).
"""

from __future__ import annotations

import functools
import hashlib
import http.client
import io
import os
import pickle
import struct
import tarfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from byztrain.registry import DATASETS, Entry

from .datasets import (
    ENV_VAR,
    Dataset,
    DatasetNotFoundError,
    DatasetSource,
    cache_dir,
    candidate_dirs,
    fetch_file,
)

__all__ = [
    "ARCHIVE",
    "CifarDataset",
    "FOLDER",
    "MEAN",
    "STD",
    "URL",
    "augment_seed",
    "download_cifar10",
    "find_cifar10",
    "load_cifar10",
    "normalize",
    "random_crop_flip",
]

NAME = "cifar10"
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
#: Published MD5 of the archive (the same value torchvision checks); only downloads are checked.
MD5: str | None = "c58f30108f718f92721af3b95e74349a"
ARCHIVE = "cifar-10-python.tar.gz"
FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
FILES = TRAIN_FILES + (TEST_FILE,)
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2023, 0.1994, 0.2010)
PADDING = 4
NUM_CLASSES = 10
IMAGE_SIZE = 32
#: Seconds urllib waits on any single network operation before giving up.
DOWNLOAD_TIMEOUT_S = 30.0

_MEAN_T = torch.tensor(MEAN, dtype=torch.float32).view(1, 3, 1, 1)
_STD_T = torch.tensor(STD, dtype=torch.float32).view(1, 3, 1, 1)


# ---- normalisation and augmentation ----------------------------------------------------------------------


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 ``(x / 255 - mean) / std`` per channel (a new tensor). Elementwise, so an
    image normalises to the same bits alone or in any batch."""
    x = images.to(torch.float32)
    return x.div_(255.0).sub_(_MEAN_T).div_(_STD_T)


def augment_seed(seed: int) -> int:
    """The generator seed of a batch's augmentation: a hash of the public seed, so the augmentation stream is
    independent of the sampler's stream (which uses ``seed`` itself)."""
    blob = b"byztrain/cifar10/augment\x00" + struct.pack("<Q", int(seed) & 0xFFFFFFFFFFFFFFFF)
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "little") >> 1


def random_crop_flip(images: torch.Tensor, generator: torch.Generator, padding: int = PADDING) -> torch.Tensor:
    """Random ``H x W`` crop of the zero-padded images, then a random horizontal flip, per image.

    ``images``: (B, C, H, W), any dtype (zero padding is black for uint8 pixels). Draws from ``generator``,
    in order: B row offsets, B column offsets (each uniform in 0..2*padding) and B flip bits.
    """
    b, c, h, w = images.shape
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    flip = torch.randint(0, 2, (b,), generator=generator).bool()
    hp, wp = h + 2 * padding, w + 2 * padding
    padded = F.pad(images, (padding, padding, padding, padding)).reshape(b, c, hp * wp)
    rows = dy[:, None] + torch.arange(h)  # (B, H)
    cols = dx[:, None] + torch.arange(w)  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)  # crop then mirror == read the crop right to left
    where = (rows[:, :, None] * wp + cols[:, None, :]).reshape(b, 1, h * w).expand(b, c, h * w)
    return padded.gather(2, where).reshape(b, c, h, w)


@dataclass(eq=False)
class CifarDataset(Dataset):
    """CIFAR-10 in memory. Unlike the base class, ``train_x`` holds the raw uint8 pixels (N, 3, 32, 32);
    ``train_batch`` returns normalised float32. ``test_x`` is normalised float32 as usual."""

    augmentation: ClassVar[str | None] = "random crop 32 (zero padding 4) + horizontal flip"

    def __post_init__(self) -> None:
        c, s = self.in_channels, self.image_size
        if self.train_x.dim() != 4 or tuple(self.train_x.shape[1:]) != (c, s, s) or self.train_x.dtype != torch.uint8:
            raise ValueError(f"{self.name} train_x: expected uint8 (N, {c}, {s}, {s}), got "
                             f"{self.train_x.dtype} {tuple(self.train_x.shape)}")
        if self.test_x.dim() != 4 or tuple(self.test_x.shape[1:]) != (c, s, s) or self.test_x.dtype != torch.float32:
            raise ValueError(f"{self.name} test_x: expected float32 (N, {c}, {s}, {s}), got "
                             f"{self.test_x.dtype} {tuple(self.test_x.shape)}")
        for split, x, y in (("train", self.train_x, self.train_y), ("test", self.test_x, self.test_y)):
            if y.dtype != torch.int64 or tuple(y.shape) != (x.shape[0],):
                raise ValueError(
                    f"{self.name} {split}_y: expected int64 ({x.shape[0]},), got {y.dtype} {tuple(y.shape)}"
                )

    def train_batch(
        self, indices: torch.Tensor, seed: int, augment: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training samples ``indices`` as normalised float32 (new tensors); with ``augment``, randomly
        cropped and flipped from the public ``seed`` alone (module docstring)."""
        indices = torch.as_tensor(indices, dtype=torch.int64)
        raw = self.train_x.index_select(0, indices)
        if augment:
            raw = random_crop_flip(raw, torch.Generator().manual_seed(augment_seed(seed)))
        return normalize(raw), self.train_y.index_select(0, indices)


# ---- finding, downloading, reading -----------------------------------------------------------------------


def _candidates(data_dir: str | os.PathLike | None) -> list[tuple[Path, str]]:
    return candidate_dirs(NAME, data_dir)  # no Debian package for CIFAR-10


def _complete(directory: Path) -> bool:
    return all((directory / f).is_file() for f in FILES)


def _search(data_dir) -> tuple[Path | None, list[str], list[str]]:
    searched: list[str] = []
    report: list[str] = []
    for directory, origin in _candidates(data_dir):
        searched.append(str(directory))
        if not directory.is_dir():
            report.append(f"{directory} ({origin}): no such directory")
            continue
        for hit in (directory, directory / FOLDER):
            if _complete(hit):
                return hit, searched, report
        if (directory / ARCHIVE).is_file():
            return directory / ARCHIVE, searched, report
        partial = [f for f in FILES if (directory / f).is_file() or (directory / FOLDER / f).is_file()]
        what = f"incomplete ({len(partial)} of the 6 batch files)" if partial else f"no {FOLDER}/ nor {ARCHIVE}"
        report.append(f"{directory} ({origin}): {what}")
    if not os.environ.get(ENV_VAR):
        report.insert(2 if data_dir is not None and str(data_dir) != "" else 0, f"${ENV_VAR} is not set")
    return None, searched, report


def _how_to_get() -> str:
    return "\n".join(
        [
            "How to get them:",
            f"  - download {URL} (163 MB) into {cache_dir(NAME)} (kept as is, or extracted there),",
            f"    or into any directory DIR and set task.data_dir=DIR (or ${ENV_VAR}=DIR);",
            f"    DIR or DIR/{NAME} may hold the archive, the extracted {FOLDER}/ folder, or its six files.",
            "  - Online, byztrain downloads the archive into the user cache by itself.",
        ]
    )


def _not_found_message(report: list[str]) -> str:
    wanted = f"{ARCHIVE}, {FOLDER}/ or its files ({', '.join(FILES)})"
    return "\n".join([f"CIFAR-10 not found. Looked for {wanted} in:"] + [f"  - {r}" for r in report]
                     + [_how_to_get()])


def find_cifar10(data_dir: str | os.PathLike | None = None) -> Path:
    """The first CIFAR-10 source in the search order: a directory holding the six batch files, or the
    archive. Raises ``DatasetNotFoundError`` (listing every directory searched); never downloads."""
    found, searched, report = _search(data_dir)
    if found is None:
        raise DatasetNotFoundError(_not_found_message(report), name=NAME, searched=tuple(searched))
    return found


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download_cifar10(dest: str | os.PathLike | None = None, *, url: str | None = None) -> Path:
    """Download the archive into ``dest`` (default ``~/.cache/byztrain/cifar10``; created) and return its
    path. Fetched to a temporary name, checked (MD5, then readable batches), then renamed: an interrupted
    download never leaves a half file. Failures raise ``DatasetNotFoundError``."""
    dest = Path(dest).expanduser() if dest is not None else cache_dir(NAME)
    return _fetch(dest, url or URL, (), [])


def _fetch(dest: Path, url: str, searched: tuple[str, ...], report: list[str]) -> Path:
    target = dest / ARCHIVE
    if target.is_file():
        return target
    created = not dest.exists()

    def validate(path: Path) -> None:
        if MD5 is not None and (digest := _md5(path)) != MD5:
            raise ValueError(f"MD5 {digest} differs from the published {MD5}")
        _read_archive(path)

    try:
        fetch_file(url, target, validate)
        return target
    except (OSError, urllib.error.URLError, http.client.HTTPException, ValueError, tarfile.TarError,
            pickle.UnpicklingError, EOFError) as exc:
        if created and dest.is_dir() and not any(dest.iterdir()):
            dest.rmdir()  # leave no empty cache folder behind
        message = _not_found_message(report) if report else f"CIFAR-10 is not available in {dest}.\n{_how_to_get()}"
        raise DatasetNotFoundError(
            f"{message}\nDownloading {url} into {dest} failed: {type(exc).__name__}: {exc}",
            name=NAME,
            searched=tuple(dict.fromkeys(searched + (str(dest),))),
        ) from exc


class _BatchUnpickler(pickle.Unpickler):
    """Resolves only the globals a pickled numpy array needs (for the Python 2 originals and for files
    written by Python 3 / numpy 1 or 2); anything else is refused."""

    _RECONSTRUCT = np.arange(2).__reduce_ex__(2)[0]
    _FROMBUFFER = np.arange(2).__reduce_ex__(5)[0]
    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
        ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
        ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
        ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): __import__("codecs").encode,
    }

    def find_class(self, module: str, name: str):
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR-10 batch") from None


def _read_batch(f: BinaryIO, where: str) -> tuple[np.ndarray, np.ndarray]:
    obj = _BatchUnpickler(f, encoding="latin1").load()
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a pickled dict, got {type(obj).__name__}")
    entries = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}
    if "data" not in entries or "labels" not in entries:
        raise ValueError(f"{where}: expected keys 'data' and 'labels', got {sorted(map(str, entries))}")
    data = np.asarray(entries["data"])
    labels = np.asarray(entries["labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * IMAGE_SIZE * IMAGE_SIZE:
        raise ValueError(f"{where}: expected uint8 data of shape (N, 3072), got {data.dtype} {data.shape}")
    if labels.shape != (data.shape[0],):
        raise ValueError(f"{where}: expected {data.shape[0]} labels, got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(f"{where}: labels must lie in [0, 10), got [{labels.min()}, {labels.max()}]")
    return data, labels


def _read_folder(directory: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for name in FILES:
        with open(directory / name, "rb") as f:
            out[name] = _read_batch(f, str(directory / name))
    return out


def _read_archive(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    with tarfile.open(path, "r:gz") as tar:
        for member in tar:
            base = member.name.rsplit("/", 1)[-1]
            if member.isfile() and base in FILES and base not in out:
                f = tar.extractfile(member)
                assert f is not None
                out[base] = _read_batch(io.BytesIO(f.read()), f"{path}:{member.name}")
    missing = [n for n in FILES if n not in out]
    if missing:
        raise ValueError(f"{path}: the archive lacks {', '.join(missing)}")
    return out


@functools.lru_cache(maxsize=2)
def _load_cached(source: str) -> CifarDataset:
    path = Path(source)
    batches = _read_archive(path) if path.is_file() else _read_folder(path)
    train_x = np.concatenate([batches[n][0] for n in TRAIN_FILES])
    train_y = np.concatenate([batches[n][1] for n in TRAIN_FILES])
    test_x, test_y = batches[TEST_FILE]
    shape = (-1, 3, IMAGE_SIZE, IMAGE_SIZE)
    return CifarDataset(
        name=NAME,
        num_classes=NUM_CLASSES,
        in_channels=3,
        image_size=IMAGE_SIZE,
        train_x=torch.from_numpy(train_x.reshape(shape)).contiguous(),
        train_y=torch.from_numpy(train_y),
        test_x=normalize(torch.from_numpy(test_x.reshape(shape))).contiguous(),
        test_y=torch.from_numpy(test_y),
    )


def clear_cache() -> None:
    _load_cached.cache_clear()


def load_cifar10(data_dir: str | os.PathLike | None = None, *, download: bool = True) -> CifarDataset:
    """Load CIFAR-10 (search order in the module docstring; downloads into the user cache when nothing is
    found, unless ``download`` is false). Cached in-process by resolved source path."""
    found, searched, report = _search(data_dir)
    if found is None:
        if not download:
            raise DatasetNotFoundError(
                _not_found_message(report) + "\n(downloading was disabled)", name=NAME, searched=tuple(searched)
            )
        found = _fetch(cache_dir(NAME), URL, tuple(searched), report)
    return _load_cached(str(found.resolve()))


DATASETS.add(
    Entry(
        NAME, "CIFAR-10: 10 classes, 32x32 RGB, the python batches (optional crop + flip: task.augment)",
        obj=DatasetSource(load_cifar10, find_cifar10, clear_cache), reference="Krizhevsky 2009",
    )
)
