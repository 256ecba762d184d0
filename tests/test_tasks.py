"""Tasks: IDX reader, data directory search, partitioning, real Fashion-MNIST loading, models."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from byztrain import tasks
from byztrain.tasks import (
    DatasetNotFoundError,
    build_model,
    count_parameters,
    find_data_dir,
    load_dataset,
    partition,
    read_idx,
    write_idx,
)
from byztrain.tasks import datasets as ds_mod
from byztrain.tasks.partition import default_min_size

STEMS = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
]


# ---------------------------------------------------------------------------------------------- IDX reader


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip_images_and_labels(tmp_path, gz):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=(7,), dtype=np.uint8)
    suffix = ".gz" if gz else ""
    ip = write_idx(tmp_path / f"img{suffix}", images)
    lp = write_idx(tmp_path / f"lbl{suffix}", labels)
    assert (ip.read_bytes()[:2] == b"\x1f\x8b") == gz
    # Header is the canonical one: 0x00000803 then big-endian sizes.
    raw = gzip.decompress(ip.read_bytes()) if gz else ip.read_bytes()
    assert struct.unpack(">IIII", raw[:16]) == (0x803, 7, 28, 28)
    got_i, got_l = read_idx(ip), read_idx(lp)
    assert got_i.dtype == np.uint8 and got_l.dtype == np.uint8
    np.testing.assert_array_equal(got_i, images)
    np.testing.assert_array_equal(got_l, labels)


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.float32, np.float64])
def test_idx_other_type_codes(tmp_path, dtype):
    arr = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
    p = write_idx(tmp_path / "a.idx", arr)
    got = read_idx(p)
    assert got.dtype == np.dtype(dtype) and got.dtype.isnative
    np.testing.assert_array_equal(got, arr)


def test_idx_gzip_detected_by_content_not_name(tmp_path):
    arr = np.arange(10, dtype=np.uint8)
    p = write_idx(tmp_path / "labels-no-suffix", arr, compress=True)
    np.testing.assert_array_equal(read_idx(p), arr)


def test_idx_bad_magic(tmp_path):
    p = tmp_path / "bad.idx"
    p.write_bytes(b"\x12\x34\x08\x01" + struct.pack(">I", 3) + b"\x00\x01\x02")
    with pytest.raises(ValueError, match=r"bad\.idx.*magic number 0x12340801.*expected"):
        read_idx(p)
    p.write_bytes(b"\x00\x00\x07\x01" + struct.pack(">I", 3) + b"\x00\x01\x02")  # unknown type code
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(p)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_truncated(tmp_path, gz):
    arr = np.arange(100, dtype=np.uint8).reshape(4, 5, 5)
    full = write_idx(tmp_path / "full.idx", arr, compress=False).read_bytes()
    cut = full[:-7]
    p = tmp_path / "cut.idx"
    p.write_bytes(gzip.compress(cut) if gz else cut)
    with pytest.raises(ValueError, match=r"cut\.idx.*truncated.*\(4, 5, 5\)"):
        read_idx(p)
    p.write_bytes(full[:6])  # inside the header
    with pytest.raises(ValueError, match="truncated"):
        read_idx(p)
    if gz:  # a cut gzip stream
        p.write_bytes(gzip.compress(full)[:-20])
        with pytest.raises(ValueError, match=r"cut\.idx.*gzip"):
            read_idx(p)


# ------------------------------------------------------------------------------------------ data directory


def _fake_dataset(directory: Path, gz: bool = True, n_train: int = 20, n_test: int = 10) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    sfx = ".gz" if gz else ""
    write_idx(directory / f"{STEMS[0]}{sfx}", rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8))
    write_idx(directory / f"{STEMS[1]}{sfx}", (np.arange(n_train) % 10).astype(np.uint8))
    write_idx(directory / f"{STEMS[2]}{sfx}", rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8))
    write_idx(directory / f"{STEMS[3]}{sfx}", (np.arange(n_test) % 10).astype(np.uint8))
    return directory


@pytest.fixture
def isolated_data(tmp_path, monkeypatch):
    """No $BYZTRAIN_DATA, an empty home, no system dataset folder: nothing is found unless a test puts it."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("BYZTRAIN_DATA", raising=False)
    monkeypatch.setattr(ds_mod, "SYSTEM_DATASET_ROOT", tmp_path / "system")
    return tmp_path


def test_find_data_dir_search_order(isolated_data, monkeypatch):
    root = isolated_data
    cache = _fake_dataset(root / "home" / ".cache" / "byztrain" / "mnist")
    assert find_data_dir("mnist", None) == cache
    env = _fake_dataset(root / "env" / "mnist", gz=False)  # $BYZTRAIN_DATA/<name>, raw files
    monkeypatch.setenv("BYZTRAIN_DATA", str(root / "env"))
    assert find_data_dir("mnist", None) == env
    explicit = _fake_dataset(root / "explicit")  # the directory itself
    assert find_data_dir("mnist", str(explicit)) == explicit
    # A data_dir without the files falls through to $BYZTRAIN_DATA.
    (root / "empty").mkdir()
    assert find_data_dir("mnist", str(root / "empty")) == env


def test_find_data_dir_system_folder_only_for_fashion(isolated_data):
    system = _fake_dataset(isolated_data / "system" / "fashion-mnist")
    _fake_dataset(isolated_data / "system" / "mnist")
    assert find_data_dir("fashion-mnist", None) == system
    with pytest.raises(DatasetNotFoundError):
        find_data_dir("mnist", None)


def test_missing_everywhere_lists_searched_dirs(isolated_data, monkeypatch):
    root = isolated_data
    monkeypatch.setenv("BYZTRAIN_DATA", str(root / "env"))
    partial = root / "given"
    _fake_dataset(partial)
    (partial / f"{STEMS[3]}.gz").unlink()
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("fashion-mnist", str(partial), download=False)
    err = info.value
    assert isinstance(err, FileNotFoundError)
    msg = str(err)
    expected_dirs = [
        partial,
        partial / "fashion-mnist",
        root / "env",
        root / "env" / "fashion-mnist",
        root / "home" / ".cache" / "byztrain" / "fashion-mnist",
        root / "system" / "fashion-mnist",
    ]
    assert list(err.searched) == [str(d) for d in expected_dirs]
    for d in expected_dirs:
        assert str(d) in msg
    assert f"missing {STEMS[3]}" in msg
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "BYZTRAIN_DATA" in msg and "task.data_dir" in msg
    assert "fashion-mnist.s3-website.eu-central-1.amazonaws.com" in msg
    assert "disabled" in msg


def test_download_failure_explains(isolated_data, monkeypatch):
    import urllib.error
    import urllib.request

    def offline(url, timeout=None):
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("mnist")
    msg = str(info.value)
    assert "ossci-datasets.s3.amazonaws.com/mnist/" in msg and "network unreachable" in msg
    assert str(isolated_data / "home" / ".cache" / "byztrain" / "mnist") in msg
    assert "no Debian/Ubuntu package" in msg
    assert not (isolated_data / "home" / ".cache" / "byztrain" / "mnist").exists()
    with pytest.raises(DatasetNotFoundError, match="network unreachable"):
        tasks.download("mnist", isolated_data / "dl")


def test_load_dataset_from_fake_files_and_cache(isolated_data):
    d = _fake_dataset(isolated_data / "x", n_train=20, n_test=10)
    a = load_dataset("mnist", str(d), download=False)
    assert a.train_x.shape == (20, 1, 28, 28) and a.test_x.shape == (10, 1, 28, 28)
    assert a.train_y.dtype == torch.int64 and a.num_classes == 10
    assert load_dataset("mnist", str(d), download=False) is a  # cached in-process
    x, y = a.train_batch(torch.tensor([3, 0, 3]), seed=5)
    assert torch.equal(x[1], a.train_x[0]) and torch.equal(y, torch.tensor([3, 0, 3]))
    x.zero_()  # a batch is a copy: poisoning it must not touch the shared dataset
    assert a.train_x[0].abs().sum() > 0


def test_unknown_names():  # cifar10 (tasks/cifar.py) is tested in test_cifar.py
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("imagenet")


# --------------------------------------------------------------------------------------------- partitioning


def _labels(per_class=300, classes=10, seed=0):
    y = np.repeat(np.arange(classes), per_class)
    return torch.from_numpy(np.random.default_rng(seed).permutation(y))


def _check_cover(shards, n):
    allidx = torch.cat(shards)
    assert allidx.dtype == torch.int64
    assert len(allidx) == n and torch.equal(torch.sort(allidx).values, torch.arange(n))


def test_partition_iid():
    y = _labels()
    shards = partition(y, 7, "iid", alpha=0.5, seed=3)
    assert len(shards) == 7
    _check_cover(shards, len(y))
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1


def _mean_max_share(y, shards, classes=10):
    return float(np.mean([np.bincount(y[s].numpy(), minlength=classes).max() / len(s) for s in shards]))


def test_partition_dirichlet_properties():
    y = _labels()
    skewed = partition(y, 10, "dirichlet", alpha=0.1, seed=0)
    _check_cover(skewed, len(y))
    assert min(len(s) for s in skewed) >= default_min_size(len(y), 10)
    flat = partition(y, 10, "dirichlet", alpha=100.0, seed=0)
    _check_cover(flat, len(y))
    assert _mean_max_share(y, skewed) > 0.5
    assert _mean_max_share(y, flat) < 0.2


def test_partition_dirichlet_no_empty_peer_with_tiny_alpha():
    y = _labels(per_class=50)
    for seed in range(5):
        shards = partition(y, 32, "dirichlet", alpha=0.01, seed=seed)
        _check_cover(shards, len(y))
        assert min(len(s) for s in shards) >= 1
    shards = partition(y, 20, "dirichlet", alpha=0.01, seed=0, min_size=25)
    assert min(len(s) for s in shards) == 25


@pytest.mark.parametrize("split", ["iid", "dirichlet"])
def test_partition_deterministic(split):
    y = _labels()
    a = partition(y, 5, split, alpha=0.3, seed=11)
    b = partition(y, 5, split, alpha=0.3, seed=11)
    c = partition(y, 5, split, alpha=0.3, seed=12)
    assert all(torch.equal(s, t) for s, t in zip(a, b, strict=True))
    assert not all(torch.equal(s, t) for s, t in zip(a, c, strict=True))


def test_partition_bad_arguments():
    y = _labels(per_class=2)
    with pytest.raises(ValueError, match="unknown split"):
        partition(y, 2, "pathological", alpha=1.0, seed=0)
    with pytest.raises(ValueError):
        partition(y, 100, "iid", alpha=1.0, seed=0)
    with pytest.raises(ValueError):
        partition(y, 2, "dirichlet", alpha=0.0, seed=0)


# ------------------------------------------------------------------------------------- real Fashion-MNIST


@pytest.fixture(scope="module")
def fashion():
    return load_dataset("fashion-mnist", download=False)


def test_load_real_fashion_mnist(fashion):
    d = fashion
    assert d.name == "fashion-mnist" and d.num_classes == 10 and d.in_channels == 1 and d.image_size == 28
    assert d.train_x.shape == (60000, 1, 28, 28) and d.test_x.shape == (10000, 1, 28, 28)
    assert d.train_x.dtype == torch.float32 and d.train_y.dtype == torch.int64
    assert d.train_y.shape == (60000,) and d.test_y.shape == (10000,)
    assert torch.equal(torch.bincount(d.train_y), torch.full((10,), 6000))
    assert abs(d.train_x.mean().item()) < 0.01
    assert abs(d.train_x.std().item() - 1) < 0.01


def test_partition_real_labels(fashion):
    shards = partition(fashion.train_y, 16, "dirichlet", alpha=0.5, seed=0)
    _check_cover(shards, 60000)
    assert min(len(s) for s in shards) >= 32


# ------------------------------------------------------------------------------------------------- models


def _tiny_dataset():
    return tasks.Dataset(
        "t",
        10,
        1,
        28,
        torch.zeros(2, 1, 28, 28),
        torch.zeros(2, dtype=torch.int64),
        torch.zeros(2, 1, 28, 28),
        torch.zeros(2, dtype=torch.int64),
    )


def test_build_model_cnn():
    ds = _tiny_dataset()
    before = torch.random.get_rng_state()
    a, b, c = build_model("cnn", ds, seed=1), build_model("cnn", ds, seed=1), build_model("cnn", ds, seed=2)
    assert torch.equal(torch.random.get_rng_state(), before)  # global RNG untouched
    assert 50_000 <= count_parameters(a) <= 150_000
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters(), strict=True))
    assert not any(
        isinstance(m, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.Dropout)) for m in a.modules()
    )
    assert a(torch.randn(5, 1, 28, 28)).shape == (5, 10)
    with pytest.raises(ValueError):
        build_model("mlp", ds, seed=0)
