"""CIFAR-10 and ResNet-18 on a tiny generated fixture in CIFAR's on-disk format (pickled python batches):
loader (folder, archive, search order, errors, download from a file:// URL, safe unpickling), seeded
augmentation, ResNet-18 and its BatchNorm handling, the CUDA determinism helper, and a few training steps
through byztrain.run with BTARD validators recomputing augmented batches. Kept to a few seconds on a CPU."""

from __future__ import annotations

import hashlib
import itertools
import json
import pickle
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import byztrain
from byztrain.config import Config, ConfigError
from byztrain.runtime.device import configure_determinism
from byztrain.runtime.majority import HonestMajorityLost
from byztrain.tasks import (
    DatasetNotFoundError,
    build_model,
    cifar,
    count_parameters,
    find_data_dir,
    load_dataset,
    resnet,
)
from byztrain.tasks.cifar import augment_seed, normalize, random_crop_flip

PER_TRAIN_BATCH = 40  # 5 x 40 = 200 training images
N_TEST = 24


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared; intra-op threads only add contention
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No $BYZTRAIN_DATA, an empty home (so ~/.cache/byztrain/cifar10 is empty), no real network, fresh
    in-process caches."""
    monkeypatch.delenv("BYZTRAIN_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(cifar, "URL", "file://" + str(tmp_path / "nowhere" / cifar.ARCHIVE))
    cifar.clear_cache()
    yield
    cifar.clear_cache()


def _write_batches(folder, seed=0):
    """The six batch files in CIFAR's format (dict with bytes keys, uint8 (N, 3072) data, list labels);
    returns (train data, train labels, test data, test labels) as written."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, n in [(f, PER_TRAIN_BATCH) for f in cifar.TRAIN_FILES] + [(cifar.TEST_FILE, N_TEST)]:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).tolist()
        entry = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                 b"filenames": [f"img{i}.png".encode() for i in range(n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
        out[name] = (data, np.array(labels))
    train = [out[f] for f in cifar.TRAIN_FILES]
    return (np.concatenate([d for d, _ in train]), np.concatenate([y for _, y in train]), *out[cifar.TEST_FILE])


@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory):
    """<root>/cifar-10-batches-py/ with the six files, and <root>/archive/cifar-10-python.tar.gz of it."""
    root = tmp_path_factory.mktemp("cifar")
    arrays = _write_batches(root / cifar.FOLDER)
    (root / "archive").mkdir()
    with tarfile.open(root / "archive" / cifar.ARCHIVE, "w:gz") as tar:
        tar.add(root / cifar.FOLDER, arcname=cifar.FOLDER)
    return root, arrays


def _expected(data):
    mean = np.array(cifar.MEAN, dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.array(cifar.STD, dtype=np.float32).reshape(1, 3, 1, 1)
    return ((data.reshape(-1, 3, 32, 32).astype(np.float32) / np.float32(255)) - mean) / std


# ---- loader ------------------------------------------------------------------------------------------------


def test_loader_round_trip(fixture_root):
    root, (train_x, train_y, test_x, test_y) = fixture_root
    ds = load_dataset("cifar10", str(root), download=False)
    assert (ds.name, ds.num_classes, ds.in_channels, ds.image_size) == ("cifar10", 10, 3, 32)
    assert ds.train_x.shape == (200, 3, 32, 32) and ds.train_x.dtype == torch.uint8  # raw pixels, 1/4 memory
    assert ds.test_x.shape == (N_TEST, 3, 32, 32) and ds.test_x.dtype == torch.float32
    assert torch.equal(ds.train_y, torch.from_numpy(train_y)) and torch.equal(ds.test_y, torch.from_numpy(test_y))
    # layout: row n is 1024 red, 1024 green, 1024 blue values, each 32 rows of 32
    assert ds.train_x[57, 2, 5, 9].item() == train_x[57, 2 * 1024 + 5 * 32 + 9]
    np.testing.assert_allclose(ds.test_x.numpy(), _expected(test_x), rtol=0, atol=1e-5)
    idx = torch.tensor([3, 199, 3])
    x, y = ds.train_batch(idx, seed=7)
    assert x.dtype == torch.float32 and torch.equal(y, torch.from_numpy(train_y[[3, 199, 3]]))
    np.testing.assert_allclose(x.numpy(), _expected(train_x[[3, 199, 3]]), rtol=0, atol=1e-5)
    # normalisation is elementwise: an image gets the same bits alone or inside any batch
    assert torch.equal(normalize(ds.train_x[[199]]), x[1:2])
    x.zero_()  # batches are copies
    assert ds.train_x[3].sum() > 0
    assert load_dataset("cifar10", str(root), download=False) is ds  # cached in-process


def test_archive_subfolder_and_env_forms(fixture_root, tmp_path, monkeypatch):
    root, _ = fixture_root
    folder = load_dataset("cifar10", str(root), download=False)
    # the .tar.gz, read in place
    assert find_data_dir("cifar10", root / "archive") == root / "archive" / cifar.ARCHIVE
    arch = load_dataset("cifar10", root / "archive", download=False)
    assert arch is not folder
    for a, b in [(arch.train_x, folder.train_x), (arch.test_x, folder.test_x), (arch.train_y, folder.train_y)]:
        assert torch.equal(a, b)
    # <dir>/cifar10/ and $BYZTRAIN_DATA, after an explicit data_dir that does not exist
    nested = tmp_path / "data"
    (nested / "cifar10").mkdir(parents=True)
    (nested / "cifar10" / cifar.ARCHIVE).symlink_to(root / "archive" / cifar.ARCHIVE)
    assert find_data_dir("cifar10", nested) == nested / "cifar10" / cifar.ARCHIVE
    monkeypatch.setenv("BYZTRAIN_DATA", str(root))
    assert find_data_dir("cifar10", tmp_path / "missing") == root / cifar.FOLDER


def test_missing_files_error_lists_searched_dirs(tmp_path, fixture_root):
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "data_batch_1").write_bytes((fixture_root[0] / cifar.FOLDER / "data_batch_1").read_bytes())
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("cifar10", str(partial), download=False)
    err = info.value
    assert str(partial) in err.searched and str(tmp_path / "home" / ".cache" / "byztrain" / "cifar10") in err.searched
    text = str(err)
    assert "incomplete (1 of the 6 batch files)" in text and "$BYZTRAIN_DATA is not set" in text
    assert cifar.URL.split("/")[-1] in text and "task.data_dir" in text and "downloading was disabled" in text
    # download on: the (unreachable) URL is tried, the failure explained, no empty cache folder left behind
    with pytest.raises(DatasetNotFoundError, match="Downloading .* failed"):
        load_dataset("cifar10", str(partial))
    assert not (tmp_path / "home" / ".cache" / "byztrain" / "cifar10").exists()


def test_download_checks_md5(fixture_root, tmp_path, monkeypatch):
    archive = fixture_root[0] / "archive" / cifar.ARCHIVE
    monkeypatch.setattr(cifar, "URL", archive.as_uri())
    cache = tmp_path / "home" / ".cache" / "byztrain" / "cifar10"
    monkeypatch.setattr(cifar, "MD5", "0" * 32)
    with pytest.raises(DatasetNotFoundError, match="MD5"):
        load_dataset("cifar10")
    assert not cache.exists()
    monkeypatch.setattr(cifar, "MD5", hashlib.md5(archive.read_bytes()).hexdigest())
    ds = load_dataset("cifar10")
    assert (cache / cifar.ARCHIVE).is_file() and not [p for p in cache.iterdir() if p.name.startswith(".")]
    assert ds.train_x.shape == (200, 3, 32, 32)


def test_unpickler_refuses_code(tmp_path, fixture_root):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    folder = tmp_path / "evil"
    folder.mkdir()
    for name in cifar.FILES:
        (folder / name).write_bytes((fixture_root[0] / cifar.FOLDER / name).read_bytes())
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="refusing to load .*print"):
        load_dataset("cifar10", folder, download=False)


# ---- augmentation ------------------------------------------------------------------------------------------


def test_augmentation_is_a_function_of_the_seed(fixture_root):
    ds = load_dataset("cifar10", str(fixture_root[0]), download=False)
    idx = torch.arange(0, 200, 7)
    a, ya = ds.train_batch(idx, seed=12345, augment=True)
    b, yb = ds.train_batch(idx, seed=12345, augment=True)
    assert torch.equal(a, b) and torch.equal(ya, yb)  # bit for bit
    torch.manual_seed(99)  # the global RNG plays no part
    assert torch.equal(ds.train_batch(idx, seed=12345, augment=True)[0], a)
    c, yc = ds.train_batch(idx, seed=12346, augment=True)
    assert not torch.equal(a, c) and torch.equal(ya, yc)
    plain, _ = ds.train_batch(idx, seed=12345)
    assert not torch.equal(a, plain)
    # padding is black before normalisation: the smallest value of each channel is (0 - mean) / std
    floor = (-torch.tensor(cifar.MEAN) / torch.tensor(cifar.STD)).view(1, 3, 1, 1)
    assert torch.all(a >= floor - 1e-6)
    assert augment_seed(1) != augment_seed(2) and augment_seed(5) == augment_seed(5) < 2**63


def test_crop_and_flip_match_a_per_image_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 256, (64, 3, 32, 32), generator=g, dtype=torch.uint8)  # no zeros: padding visible
    out = random_crop_flip(x, torch.Generator().manual_seed(42))
    ref_g = torch.Generator().manual_seed(42)  # same draws, same order: dy, dx, flip
    dy = torch.randint(0, 9, (64,), generator=ref_g)
    dx = torch.randint(0, 9, (64,), generator=ref_g)
    flip = torch.randint(0, 2, (64,), generator=ref_g)
    padded = F.pad(x, (4, 4, 4, 4))
    for i in range(64):
        crop = padded[i, :, dy[i] : dy[i] + 32, dx[i] : dx[i] + 32]
        assert torch.equal(out[i], crop.flip(-1) if flip[i] else crop)
    assert flip.sum() not in (0, 64) and len(set(dy.tolist())) > 1  # both branches and several offsets seen
    # a crop keeps the content, shifted: the centre offset (4, 4) without flip is the identity
    centred = (dy == 4) & (dx == 4) & (flip == 0)
    assert torch.equal(out[centred], x[centred])
    # without padding only the flip remains, and the same draws flip twice back to the original
    once = random_crop_flip(x, torch.Generator().manual_seed(7), padding=0)
    assert not torch.equal(once, x)
    assert torch.equal(random_crop_flip(once, torch.Generator().manual_seed(7), padding=0), x)


# ---- ResNet-18 ---------------------------------------------------------------------------------------------


def test_resnet18_shape_parameters_and_seeded_init(fixture_root):
    ds = load_dataset("cifar10", str(fixture_root[0]), download=False)
    before = torch.random.get_rng_state()
    a, b, c = (build_model("resnet18", ds, seed=s) for s in (1, 1, 2))
    assert torch.equal(torch.random.get_rng_state(), before)
    assert count_parameters(a) == 11_173_962  # kuangliu's CIFAR ResNet-18
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters(), strict=True))
    assert a.conv1.kernel_size == (3, 3) and a.conv1.stride == (1, 1)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in a.modules())
    assert a.calibration.shape == (200, 3, 32, 32)  # capped at the training set
    assert a(ds.test_x[:3]).shape == (3, 10)


def test_batchnorm_keeps_gradients_pure_and_evaluation_public(fixture_root, monkeypatch):
    monkeypatch.setattr(resnet, "CALIBRATION_SIZE", 16)
    monkeypatch.setattr(resnet, "CALIBRATION_BATCH", 8)
    ds = load_dataset("cifar10", str(fixture_root[0]), download=False)
    model = build_model("resnet18", ds, seed=0)
    params = list(model.parameters())
    x, y = ds.train_batch(torch.arange(4), seed=3, augment=True)

    def grad():
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(F.cross_entropy(model(x), y), params)])

    g1 = grad()
    buffers = [b.clone() for b in model.buffers()]
    g2 = grad()
    assert torch.equal(g1, g2)  # training mode touches no state
    assert all(torch.equal(u, v) for u, v in zip(buffers, model.buffers(), strict=True))
    model.eval()  # recalibrates the statistics from the current parameters
    bn = model.bn1
    assert int(bn.num_batches_tracked) == 2 and not torch.equal(bn.running_mean, torch.zeros(64))
    with torch.no_grad():
        out = model(ds.test_x[:6])
        assert torch.allclose(model(ds.test_x[:1]), out[:1], atol=1e-5)  # eval is per-sample
    other = build_model("resnet18", ds, seed=0).eval()  # another peer, same public state
    assert torch.equal(other.bn1.running_var, bn.running_var)
    model.train()
    assert torch.equal(grad(), g1)  # the calibrated buffers do not enter the training gradient


# ---- device ------------------------------------------------------------------------------------------------


def test_configure_determinism_cpu_and_missing_cuda():
    assert configure_determinism("cpu") is False
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the missing-CUDA error cannot be shown here")
    with pytest.raises(ConfigError, match="runtime.device.*no CUDA GPU is usable"):
        configure_determinism("cuda")
    cfg = Config.from_dict({"peers": 2, "runtime": {"device": "cuda"}, "log": {"tensorboard": False}})
    with pytest.raises(ConfigError, match="runtime.device"):
        byztrain.run(cfg, quiet=True)


def test_augment_on_a_dataset_without_augmentation(tmp_path, monkeypatch):
    from byztrain.tasks import Dataset

    ds = Dataset("synthetic", 4, 1, 8, torch.randn(40, 1, 8, 8), torch.arange(40) % 4, torch.randn(8, 1, 8, 8),
                 torch.arange(8) % 4)
    monkeypatch.setattr("byztrain.runtime.workload.load_dataset", lambda name, data_dir=None: ds)
    cfg = {"peers": 2, "task": {"augment": True}, "train": {"steps": 1, "batch_size": 2},
           "log": {"tensorboard": False, "out": str(tmp_path / "run")}}
    with pytest.raises(ConfigError, match="task.augment"):
        byztrain.run(cfg, quiet=True)


# ---- end to end --------------------------------------------------------------------------------------------


def _run(root, out):
    cfg = {
        "name": "cifar-smoke",
        "seed": 0,
        # BTARD needs 3 peers for one validator (validators < peers - 1): each step one peer sits out and
        # recomputes another peer's previous (augmented) batch and gradient
        "peers": 3,
        "task": {"dataset": "cifar10", "model": "resnet18", "data_dir": str(root), "augment": True},
        # a large tau: CenteredClip converges in 2 iterations (tau = 1 takes ~300 over 11 M coordinates on
        # fresh ResNet gradients: minutes on a CPU), and clipping is not what this test is about
        "defense": {"name": "btard", "tau": 1000.0, "validators": 1},
        "train": {"steps": 2, "batch_size": 2, "lr": 0.01, "momentum": 0.9, "nesterov": True,
                  "weight_decay": 5e-4, "eval_every": 2},
        "log": {"tensorboard": False, "out": str(out)},
    }
    summary = byztrain.run(cfg, quiet=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return summary, rows[-1]


def test_training_steps_with_btard_validators(fixture_root, tmp_path, monkeypatch):
    """ResNet-18 on the fixture with augmentation through byztrain.run: validators recompute augmented
    batches bit for bit, so nobody is accused."""
    monkeypatch.setattr(resnet, "CALIBRATION_SIZE", 8)
    summary, last = _run(fixture_root[0], tmp_path / "run")
    assert summary["steps"] == 2 and summary["banned"] == {} and summary["honest_banned"] == 0
    assert last["step"] == 2 and last["validator_pairs"] > 0 and last["accusations"] == 0
    assert np.isfinite(last["train_loss"]) and 0.0 <= last["test_accuracy"] <= 1.0


def test_impure_augmentation_is_caught_by_validators(fixture_root, tmp_path, monkeypatch):
    """Control for the test above: augmentation that is not a function of the public seed alone (here a
    counter) makes the validator's recomputation differ, and an honest peer gets banned; with no Byzantine
    peer in the run, that stops it (runtime/majority.py)."""
    monkeypatch.setattr(resnet, "CALIBRATION_SIZE", 8)
    calls = itertools.count()
    pure = cifar.augment_seed
    monkeypatch.setattr(cifar, "augment_seed", lambda seed: pure(seed + next(calls)))
    with pytest.raises(HonestMajorityLost, match=r"1 peer\(s\) banned but only 0 Byzantine"):
        _run(fixture_root[0], tmp_path / "run")
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 2 and len(last["banned"]) == 1 and last["accusations"] > 0
    events = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    assert any(e.get("type") == "ban" and "differs from the recomputation" in e.get("reason", "") for e in events)
    assert [e["type"] for e in events][-1] == "majority_lost"
