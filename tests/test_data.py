"""Tests for data/: CIFAR-100 reading and validation, the augmentation recipes against torchvision's
transforms, the CPU fast path against the reference, and the device-resident loaders."""
import builtins
import math
import os
import pickle
import subprocess
import sys
import urllib.error

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF

import data
from micronet_cifar100 import errors
from data import (AUG_RECIPES, MEAN, STD, EvalLoader, Placement, TrainLoader, augment, augment_cpu, copies,
                  load_cifar100, make_pipeline, recipe_name, subset)

# Small tensors: on a shared 2-core machine a second OpenMP thread mostly waits for the first.
pytestmark = pytest.mark.usefixtures("one_thread")


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def ks_stat(a, b):
    """Two-sample Kolmogorov-Smirnov statistic; exact for discrete values too (CDFs at all points)."""
    a, b = np.sort(np.asarray(a, float)), np.sort(np.asarray(b, float))
    points = np.concatenate([a, b])
    fa = np.searchsorted(a, points, side="right") / len(a)
    fb = np.searchsorted(b, points, side="right") / len(b)
    return np.abs(fa - fb).max()


def assert_plain(e):
    """A library message: one line, naming no command-line flag (the scripts add those)."""
    msg = str(e.value)
    assert "\n" not in msg and "--" not in msg, msg
    return msg


def test_data_imports_no_engine_refinery_torchscope_or_scripts():
    code = ("import sys, data; print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'engine', 'refinery', 'torchscope', 'cli', 'train', 'test', 'chain', 'models', 'loss'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------- CIFAR-100 files


def fake_split(n=10_000, seed=0):
    rng = np.random.default_rng(seed)
    return {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            "fine_labels": [i % 100 for i in range(n)],
            "coarse_labels": [0] * n, "batch_label": "testing batch 1 of 1"}


def write_split(root, obj, split="test", protocol=5):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / split
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)
    return path


@pytest.mark.parametrize("protocol", [2, 5])
@pytest.mark.parametrize("bytes_keys", [False, True])
def test_reads_valid_pickle_and_keeps_pixel_layout(tmp_path, protocol, bytes_keys):
    obj = fake_split()
    raw = obj["data"]
    if bytes_keys:
        obj = {k.encode(): v for k, v in obj.items()}
    write_split(tmp_path, obj, protocol=protocol)
    x, y = load_cifar100(tmp_path, train=False, download=False)
    assert x.shape == (10_000, 3, 32, 32) and x.dtype == torch.uint8
    assert y.shape == (10_000,) and y.dtype == torch.int64
    assert y[:3].tolist() == [0, 1, 2]
    # R plane first, each plane row-major.
    assert x[5, 0, 0, 0] == raw[5, 0] and x[5, 0, 1, 0] == raw[5, 32]
    assert x[5, 1, 0, 0] == raw[5, 1024] and x[5, 2, 31, 31] == raw[5, 3071]


@pytest.mark.parametrize("change, needle", [
    (lambda o: o.update(data=o["data"][:, :3071].copy()), "3072"),
    (lambda o: o.update(data=o["data"].astype(np.int16)), "uint8"),
    (lambda o: o["fine_labels"].__setitem__(7, 100), "0..99"),
    (lambda o: o["fine_labels"].__setitem__(7, -1), "0..99"),
    (lambda o: o.update(data=o["data"][:9_999], fine_labels=o["fine_labels"][:9_999]), "10000"),
    (lambda o: o.update(fine_labels=[0 if v == 42 else v for v in o["fine_labels"]]), "class 42"),
    (lambda o: o.pop("fine_labels"), "fine_labels"),
    (lambda o: o.update(fine_labels=[float(v) for v in o["fine_labels"]]), "fine_labels"),
])
def test_rejects_invalid_contents(tmp_path, change, needle):
    obj = fake_split()
    change(obj)
    path = write_split(tmp_path, obj)
    with pytest.raises(errors.DataError, match=needle) as e:
        load_cifar100(tmp_path, train=False, download=False)
    assert str(path) in assert_plain(e) and "delete it" in str(e.value)
    assert type(e.value) is errors.DataError


def test_rejects_train_file_of_test_size(tmp_path):
    write_split(tmp_path, fake_split(), split="train")
    with pytest.raises(errors.DataError, match="50000"):
        load_cifar100(tmp_path, train=True, download=False)


def test_rejects_non_dict(tmp_path):
    write_split(tmp_path, [1, 2, 3])
    with pytest.raises(errors.DataError, match="expected a dict"):
        load_cifar100(tmp_path, train=False, download=False)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_rejects_truncated_or_corrupt_file(tmp_path, damage):
    path = write_split(tmp_path, fake_split())
    blob = path.read_bytes()
    blob = {"truncate": blob[:len(blob) // 2], "garbage": os.urandom(5000), "empty": b""}[damage]
    path.write_bytes(blob)
    with pytest.raises(errors.DataError, match="delete it") as e:
        load_cifar100(tmp_path, train=False, download=False)
    assert str(path) in assert_plain(e) and "corrupt" in str(e.value)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _Eval:
    def __reduce__(self):
        return eval, ("__import__('os').getcwd()",)


@pytest.mark.parametrize("protocol", [2, 5])
@pytest.mark.parametrize("payload", ["system", "eval"])
def test_restricted_unpickler_refuses_foreign_globals(tmp_path, payload, protocol):
    marker = tmp_path / "pwned"
    obj = fake_split(n=100)
    obj["data"] = _Exploit(marker) if payload == "system" else _Eval()
    write_split(tmp_path, obj, protocol=protocol)
    with pytest.raises(errors.DataError, match="refusing to unpickle") as e:
        load_cifar100(tmp_path, train=False, download=False)
    assert (".system" if payload == "system" else ".eval") in assert_plain(e)
    assert "not a CIFAR-100 pickle" in str(e.value)
    assert not marker.exists()


def test_missing_data_without_download_names_path(tmp_path, monkeypatch):
    monkeypatch.setattr(data.cifar, "_download", lambda root: pytest.fail("must not download"))
    with pytest.raises(errors.DataNotFound) as e:
        load_cifar100(tmp_path / "nowhere", train=True, download=False)
    msg = assert_plain(e)
    assert str(tmp_path / "nowhere" / "cifar-100-python" / "train") in msg and "not found" in msg


def test_download_failure_says_where(tmp_path, monkeypatch):
    calls = []

    def offline(root):
        calls.append(root)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(data.cifar, "_download", offline)
    with pytest.raises(errors.DownloadFailed) as e:
        load_cifar100(tmp_path, train=False, download=True)
    msg = assert_plain(e)
    assert calls == [str(tmp_path)]
    assert str(tmp_path / "cifar-100-python") in msg and "name resolution" in msg


def test_download_is_used_when_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(data.cifar, "_download", lambda root: write_split(tmp_path, fake_split()))
    x, y = load_cifar100(tmp_path, train=False)
    assert len(x) == len(y) == 10_000


def assert_permission_error(e, path):
    msg = assert_plain(e)
    assert type(e.value) is errors.DataPermission and isinstance(e.value, errors.DataError)
    assert "permission" in msg and str(path) in msg
    assert "corrupt" not in msg and "not found" not in msg


def test_unreadable_file_is_a_permission_error(tmp_path, monkeypatch):
    # As root chmod 000 does not stop reads: the OS's refusal is simulated (the real one is below).
    path = write_split(tmp_path, fake_split())
    real_open = builtins.open

    def refusing_open(file, *args, **kwargs):
        if os.fspath(file) == str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing_open)
    with pytest.raises(errors.DataPermission) as e:
        load_cifar100(tmp_path, train=False, download=False)
    assert_permission_error(e, path)


@pytest.mark.parametrize("download", [False, True])
def test_unsearchable_folder_is_a_permission_error_not_missing_data(tmp_path, monkeypatch, download):
    path = write_split(tmp_path, fake_split())
    real_stat = os.stat
    monkeypatch.setattr(data.cifar, "_download", lambda root: pytest.fail("must not download"))

    def refusing_stat(p, *args, **kwargs):  # what stat says inside a folder without search permission
        if os.fspath(p).startswith(str(path.parent) + os.sep):
            raise PermissionError(13, "Permission denied", os.fspath(p))
        return real_stat(p, *args, **kwargs)

    monkeypatch.setattr(os, "stat", refusing_stat)
    with pytest.raises(errors.DataPermission) as e:
        load_cifar100(tmp_path, train=False, download=download)
    assert_permission_error(e, path)


def test_download_into_unwritable_folder_is_a_permission_error(tmp_path, monkeypatch):
    def denied(root):
        raise PermissionError(13, "Permission denied", root)

    monkeypatch.setattr(data.cifar, "_download", denied)
    with pytest.raises(errors.DataPermission) as e:
        load_cifar100(tmp_path, train=False, download=True)
    assert_permission_error(e, tmp_path / "cifar-100-python")


@pytest.mark.parametrize("what", ["file", "folder"])
def test_chmod_000_is_a_permission_error(tmp_path, what):
    path = write_split(tmp_path, fake_split())
    target = path if what == "file" else path.parent
    target.chmod(0)
    try:
        try:
            with open(path, "rb"):
                pytest.skip("chmod has no effect for this user (root): covered by the simulated tests")
        except PermissionError:
            pass
        with pytest.raises(errors.DataPermission) as e:
            load_cifar100(tmp_path, train=False, download=False)
        assert_permission_error(e, path)
    finally:
        target.chmod(0o755)


# ---------------------------------------------------------------- real CIFAR-100 (CIFAR100_DIR)


@pytest.fixture(scope="module")
def real_dir(cifar_dir):
    return cifar_dir  # $CIFAR100_DIR, or the shared copy unpacked (conftest)


@pytest.mark.parametrize("train, n", [(True, 50_000), (False, 10_000)])
def test_real_cifar100(real_dir, train, n):
    x, y = load_cifar100(real_dir, train=train, download=False)
    assert x.shape == (n, 3, 32, 32) and x.dtype == torch.uint8
    assert y.shape == (n,) and y.dtype == torch.int64
    assert (torch.bincount(y, minlength=100) == n // 100).all()
    with open(os.path.join(real_dir, "cifar-100-python", "train" if train else "test"), "rb") as f:
        plain = pickle.load(f, encoding="latin1")
    assert torch.equal(x[0], torch.from_numpy(plain["data"][0].reshape(3, 32, 32)))
    assert torch.equal(x[-1], torch.from_numpy(plain["data"][-1].reshape(3, 32, 32)))
    assert y[0] == plain["fine_labels"][0] and y[-1] == plain["fine_labels"][-1]
    assert y[:100].tolist() == plain["fine_labels"][:100]


# ---------------------------------------------------------------- recipes


def images(b=64, seed=0, lo=0.0, hi=1.0):
    return lo + (hi - lo) * torch.rand(b, 3, 32, 32, generator=gen(seed))


def split(aug, draws):
    """A recipe's draws [n, K] as {op name: its columns}."""
    names = augment.ops(aug)
    parts = draws.split([augment.OPS[name].columns for name in names], 1)
    return dict(zip(names, parts))


def test_recipes_and_copies():
    assert AUG_RECIPES == ("uci", "standard", "none")
    assert [copies(a) for a in AUG_RECIPES] == [3, 1, 1]
    assert augment.ops("uci") == ("jitter", "crop", "flip") and augment.ops("standard") == ("shift", "flip")
    assert augment.ops("none") == ()
    for bad in ("autoaugment", "cutmix"):
        with pytest.raises(errors.ConfigError, match="uci, standard, none") as e:
            copies(bad)
        assert e.value.setting == "aug" and bad in assert_plain(e)
    x = images(32)
    draws = augment.draw("none", torch.zeros(32, dtype=torch.long), gen())
    assert draws.shape == (32, 0) and torch.equal(augment.apply("none", x, draws), x)


def test_seed_is_an_alias_of_uci():
    assert recipe_name("seed") == "uci" == recipe_name("uci") and copies("seed") == 3
    copy_id = torch.arange(30) % 3
    assert torch.equal(augment.draw("seed", copy_id, gen(2)), augment.draw("uci", copy_id, gen(2)))
    x, y = fake_data(60)
    a, b = TrainLoader(x, y, 32, aug="seed", seed=1), TrainLoader(x, y, 32, aug="uci", seed=1)
    assert a.aug == "uci" and a.copies == 3
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_uci_recipe_is_the_originals():
    # docs/original-entry.md, "Label refinery and the recipe": the enlarged epoch, one transform per copy.
    assert augment.RECIPES["uci"] == (
        {"jitter": (0.2, 0.2), "flip": (0.5,)},
        {"jitter": (0.4, 0.4), "crop": (0.3, 1.0, 0.8, 1.2), "flip": (0.5,)},
        {"crop": (0.08, 1.0, 3 / 4, 4 / 3), "flip": (0.5,)})
    assert augment.RECIPES["standard"] == ({"shift": (4.0,), "flip": (0.5,)},)
    assert MEAN == (0.4914, 0.4822, 0.4465) and STD == (0.2470, 0.2435, 0.2616)


def torchvision_ops(copy, choices):
    """One sample's transform of a recipe copy, as torchvision's functional ops with given choices."""
    steps = []
    if "jitter" in copy:
        b, c, contrast_first = choices["jitter"].tolist()
        pair = [lambda t: TF.adjust_brightness(t, b), lambda t: TF.adjust_contrast(t, c)]
        steps += pair[::-1] if contrast_first else pair
    if "crop" in copy:
        top, left, h, w = (int(v) for v in choices["crop"])
        steps.append(lambda t: TF.resized_crop(t, top, left, h, w, [32, 32], antialias=True))
    if "shift" in copy:
        pad = int(copy["shift"][0])
        dy, dx = (int(v) + pad for v in choices["shift"])  # RandomCrop's top, left in the padded image
        steps.append(lambda t: TF.crop(TF.pad(t, [pad]), dy, dx, 32, 32))
    if choices["flip"].item():
        steps.append(TF.hflip)
    return steps


@pytest.mark.parametrize("aug", ["uci", "standard"])
def test_recipe_outputs_equal_torchvision_transforms(aug):
    # Every sample of every copy: our batched ops = torchvision's transforms with the same choices.
    n = 96
    x, copy_id = images(n), torch.arange(n) % copies(aug)
    draws = augment.draw(aug, copy_id, gen(3))
    out = augment.apply(aug, x, draws)
    choices = split(aug, draws)
    for i in range(n):
        ref = x[i]
        for step in torchvision_ops(augment.RECIPES[aug][copy_id[i]], {k: v[i] for k, v in choices.items()}):
            ref = step(ref)
        torch.testing.assert_close(out[i], ref, atol=2e-6, rtol=0)
    assert out.min() >= 0 and out.max() <= 1


def test_ops_with_identity_numbers_change_nothing():
    x, n = images(64), 64
    for name, op in augment.OPS.items():
        numbers = torch.tensor([op.identity] * n)
        assert torch.equal(op.apply(x, op.draw(numbers, gen(), (32, 32))), x), name


@pytest.mark.parametrize("v", [0.2, 0.4, 1.5])
def test_jitter_factor_distribution(v):
    n = 20_000
    choices = augment.draw_jitter(torch.full((n, 2), v), gen(), (32, 32))
    lo, hi = max(0.0, 1 - v), 1 + v
    for f in (choices[:, 0], choices[:, 1]):
        assert f.min() >= lo and f.max() <= hi
        assert abs(f.mean().item() - (lo + hi) / 2) < 0.01 * (hi - lo) + 1e-3
        ref = np.random.default_rng(0).uniform(lo, hi, n)
        assert ks_stat(f.numpy(), ref) < 0.03
    assert abs(choices[:, 2].mean().item() - 0.5) < 0.02


def crop_params_torchvision(n, scale, ratio):
    torch.manual_seed(1)
    return np.array([T.RandomResizedCrop.get_params(torch.zeros(3, 32, 32), scale, ratio) for _ in range(n)])


@pytest.mark.parametrize("scale, ratio", [((0.3, 1.0), (0.8, 1.2)), ((0.08, 1.0), (3 / 4, 4 / 3))])
def test_crop_box_distribution_matches_torchvision(scale, ratio):
    n = 20_000
    boxes = augment.draw_crop(torch.tensor([[*scale, *ratio]]).expand(n, 4), gen(1), (32, 32))
    top, left, h, w = boxes.numpy().T
    ref = crop_params_torchvision(n, scale, ratio)
    assert (h >= 1).all() and (w >= 1).all() and (top + h <= 32).all() and (left + w <= 32).all()
    assert (top >= 0).all() and (left >= 0).all() and (boxes == boxes.round()).all()
    assert ks_stat(h * w / 1024, ref[:, 2] * ref[:, 3] / 1024) < 0.03
    assert ks_stat(w / h, ref[:, 3] / ref[:, 2]) < 0.03
    assert ks_stat(top, ref[:, 0]) < 0.03 and ks_stat(left, ref[:, 1]) < 0.03
    assert abs((h * w).mean() - (ref[:, 2] * ref[:, 3]).mean()) < 0.02 * 1024


@pytest.mark.parametrize("scale, ratio", [((2.0, 3.0), (3 / 4, 4 / 3)), ((5.0, 6.0), (2.0, 3.0)),
                                          ((5.0, 6.0), (0.2, 0.5))])
def test_crop_box_fallback_matches_torchvision(scale, ratio):
    # No attempt can fit, so both fall back to the same deterministic central crop.
    ours = augment.draw_crop(torch.tensor([[*scale, *ratio]]).expand(4, 4), gen(), (32, 32))[0].tolist()
    assert ours == list(T.RandomResizedCrop.get_params(torch.zeros(3, 32, 32), scale, ratio))


def test_uci_draws_follow_each_copys_transform():
    # The recipe's draws, copy by copy, have the distributions of that copy's torchvision transform.
    n = 20_000
    for copy in range(3):
        c = split("uci", augment.draw("uci", torch.full((n,), copy), gen(copy)))
        factors = c["jitter"][:, :2]
        if copy == 2:
            assert (factors == 1).all()  # no ColorJitter in copy 3
        else:
            v = (0.2, 0.4)[copy]
            assert factors.min() >= 1 - v and factors.max() <= 1 + v
            assert ks_stat(factors[:, 0].numpy(), np.random.default_rng(0).uniform(1 - v, 1 + v, n)) < 0.03
        top, left, h, w = c["crop"].numpy().T
        if copy == 0:
            assert (h == 32).all() and (w == 32).all() and (top == 0).all() and (left == 0).all()
        else:
            scale, ratio = ((0.3, 1.0), (0.8, 1.2)) if copy == 1 else ((0.08, 1.0), (3 / 4, 4 / 3))
            ref = crop_params_torchvision(n, scale, ratio)
            assert ks_stat(h * w, ref[:, 2] * ref[:, 3]) < 0.03
            assert ks_stat(w / h, ref[:, 3] / ref[:, 2]) < 0.03
        assert abs(c["flip"].mean().item() - 0.5) < 0.02


def test_standard_shifts_cover_every_offset():
    n = 4000
    c = split("standard", augment.draw("standard", torch.zeros(n, dtype=torch.long), gen()))
    offsets = {tuple(v) for v in c["shift"].long().tolist()}
    assert offsets == {(dy, dx) for dy in range(-4, 5) for dx in range(-4, 5)}
    assert abs(c["flip"].mean().item() - 0.5) < 0.03


def test_draws_are_reproducible():
    x, copy_id = images(64), torch.arange(64) % 3
    a, b = augment.draw("uci", copy_id, gen(7)), augment.draw("uci", copy_id, gen(7))
    assert torch.equal(a, b) and torch.equal(augment.apply("uci", x, a), augment.apply("uci", x, b))
    assert not torch.equal(a, augment.draw("uci", copy_id, gen(8)))


# ---------------------------------------------------------------- the CPU fast path


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_fast_path_equals_reference(memory_format):
    assert augment_cpu.supports("uci", "cpu") and augment_cpu.supports("seed", "cpu")
    assert not augment_cpu.supports("standard", "cpu") and not augment_cpu.supports("uci", "cuda")
    u8 = torch.randint(0, 256, (300, 3, 32, 32), dtype=torch.uint8, generator=gen(1))
    u8[:20] = 0  # flat and saturated images exercise the clamps
    u8[20:40] = 255
    draws = augment.draw("uci", torch.arange(300) % 3, gen(4))
    fast = make_pipeline("uci", "cpu", memory_format)
    ref = make_pipeline("uci", "cpu", memory_format, fast=False)
    out = fast(u8, draws)
    torch.testing.assert_close(out, ref(u8, draws), atol=1e-5, rtol=0)
    assert out.is_contiguous(memory_format=memory_format)
    # Any sub-batch gives the same images: slicing never changes a sample's result.
    torch.testing.assert_close(fast(u8[37:74], draws[37:74]), out[37:74], atol=1e-6, rtol=0)
    # Extreme jitter factors: brightness and contrast factor 0 and 2, both orders.
    wild = draws.clone()
    wild[:, 0] = torch.tensor([0.0, 2.0]).repeat(150)
    wild[:, 1] = torch.tensor([0.0, 0.0, 2.0, 2.0]).repeat(75)
    wild[:, 2] = torch.arange(300) % 3 == 0
    torch.testing.assert_close(fast(u8, wild), ref(u8, wild), atol=1e-5, rtol=0)


def test_fast_loader_equals_reference_loader():
    x, y = fake_data()
    fast = TrainLoader(x, y, 64, aug="uci", seed=3, place=Placement(memory_format=torch.channels_last))
    ref = TrainLoader(x, y, 64, aug="uci", seed=3, fast=False, place=Placement(memory_format=torch.channels_last))
    for (xa, ya), (xb, yb) in zip(fast, ref):
        assert torch.equal(ya, yb)
        torch.testing.assert_close(xa, xb, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- loaders


def fake_data(n=300):
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen(9))
    return x, torch.arange(n)  # label = image index, so batches reveal which images they hold


def normalised(u8):
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return (u8.float() / 255 - mean) / std


def collect(loader, **kw):
    return list(loader.iterate(**kw))


@pytest.mark.parametrize("aug, ws, drop_last, expected", [
    ("uci", 1, False, math.ceil(900 / 64)), ("uci", 1, True, 900 // 64),
    ("uci", 2, False, math.ceil(450 / 64)), ("standard", 1, False, math.ceil(300 / 64)),
    ("none", 3, True, 100 // 64)])
def test_train_loader_len(aug, ws, drop_last, expected):
    x, y = fake_data()
    loader = TrainLoader(x, y, 64, aug=aug, drop_last=drop_last, place=Placement(world_size=ws))
    assert len(loader) == expected == len(collect(loader))
    sizes = [len(b[1]) for b in collect(loader)]
    assert all(s == 64 for s in sizes[:-1]) and (sizes[-1] == 64 or not drop_last)


def test_train_epoch_visits_every_sample_once():
    x, y = fake_data()
    loader = TrainLoader(x, y, 64, aug="uci", seed=3)
    loader.set_epoch(2)
    idx = loader.indices()
    assert torch.equal(idx.sort().values, torch.arange(900))
    batches = collect(loader)
    seen = torch.cat([b[1] for b in batches])
    assert torch.equal(seen, idx % 300)
    assert (torch.bincount(seen, minlength=300) == 3).all()
    for xb, yb in batches:
        assert xb.shape[1:] == (3, 32, 32) and xb.dtype == torch.float32 and yb.dtype == torch.int64


def test_train_none_yields_normalised_images_in_permuted_order():
    x, y = fake_data()
    loader = TrainLoader(x, y, 100, aug="none")
    xs, ys = zip(*collect(loader))
    torch.testing.assert_close(torch.cat(xs), normalised(x[torch.cat(ys)]), atol=1e-6, rtol=0)
    assert not torch.equal(torch.cat(ys), y)


def test_train_permutation_depends_on_seed_and_epoch_only():
    x, y = fake_data()
    a, b = TrainLoader(x, y, 64, seed=1), TrainLoader(x, y, 64, seed=1)
    a.set_epoch(0)
    perm0 = a.indices().clone()
    a.set_epoch(1)
    assert not torch.equal(a.indices(), perm0)
    b.set_epoch(1)
    for (xa, ya), (xb, yb) in zip(collect(a), collect(b)):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    c = TrainLoader(x, y, 64, seed=2)
    c.set_epoch(1)
    assert not torch.equal(c.indices(), a.indices())


@pytest.mark.parametrize("fast", [True, False])
def test_train_resume_mid_epoch_is_bit_exact(fast):
    x, y = fake_data()
    full = TrainLoader(x, y, 64, aug="uci", seed=5, fast=fast)
    full.set_epoch(4)
    reference = collect(full)
    resumed = TrainLoader(x, y, 64, aug="uci", seed=5, fast=fast)
    resumed.set_epoch(4)
    for k in (0, 7, len(reference) - 1, len(reference)):
        tail = collect(resumed, start_step=k)
        assert len(tail) == len(reference) - k
        for (xa, ya), (xb, yb) in zip(tail, reference[k:]):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    with pytest.raises(errors.RunError, match="step") as e:
        resumed.iterate(start_step=len(reference) + 1)
    assert_plain(e)


@pytest.mark.parametrize("n", [300, 333])
def test_train_ddp_shards_are_disjoint_and_cover_the_permutation(n):
    x, y = fake_data(n)
    single = TrainLoader(x, y, 64, seed=4)
    shards = []
    for rank in range(2):
        loader = TrainLoader(x, y, 64, seed=4, place=Placement(rank=rank, world_size=2))
        seen = torch.cat([b[1] for b in collect(loader)])
        assert torch.equal(seen, loader.indices() % n)
        shards.append(loader.indices())
    assert len(shards[0]) == len(shards[1]) == 3 * n // 2
    both = torch.cat(shards)
    assert len(both.unique()) == len(both)
    assert torch.equal(torch.stack(shards, 1).flatten(), single.indices()[:len(both)])


@pytest.mark.parametrize("aug", ["uci", "standard"])
def test_train_draws_belong_to_samples_not_batches(aug):
    # A sample's augmentation depends on (seed, epoch, rank, position in the epoch) only, so the
    # batch size changes how an epoch is cut, never what it holds.
    x, y = fake_data()
    runs = []
    for bs in (64, 100):
        loader = TrainLoader(x, y, bs, aug=aug, seed=6)
        loader.set_epoch(3)
        xs, ys = zip(*collect(loader))
        runs.append((torch.cat(xs), torch.cat(ys)))
    assert torch.equal(runs[0][1], runs[1][1])
    torch.testing.assert_close(runs[0][0], runs[1][0], atol=1e-5, rtol=0)
    # ... and each batch is the recipe applied with the draws of its slice of the epoch.
    loader = TrainLoader(x, y, 64, aug=aug, seed=6)
    loader.set_epoch(3)
    draws = loader.draws()
    assert draws.shape == (loader.per_rank, sum(augment.OPS[o].columns for o in augment.ops(aug)))
    xb, yb = collect(loader)[2]
    ref = augment.apply(aug, x[yb].float() / 255, draws[128:192])
    torch.testing.assert_close(xb, normalised_float(ref), atol=1e-5, rtol=0)


def normalised_float(x):
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return (x - mean) / std


def test_train_ranks_and_steps_draw_different_augmentation():
    # Identical images, so any difference between batches comes from the augmentation draws.
    x = torch.full((400, 3, 32, 32), 128, dtype=torch.uint8)
    x[:, :, :16] = 30
    y = torch.zeros(400, dtype=torch.long)
    r0 = collect(TrainLoader(x, y, 64, seed=4, place=Placement(rank=0, world_size=2)))
    r1 = collect(TrainLoader(x, y, 64, seed=4, place=Placement(rank=1, world_size=2)))
    assert not torch.equal(r0[0][0], r1[0][0])
    assert not torch.equal(r0[0][0], r0[1][0])


def test_train_batches_are_independent_tensors():
    x, y = fake_data()
    loader = TrainLoader(x, y, 64, aug="uci", seed=2, place=Placement(memory_format=torch.channels_last))
    batches = collect(loader)
    kept = [b[0].clone() for b in batches]
    again = collect(loader)
    lo, hi = (0 - max(MEAN)) / min(STD) - 1e-5, (1 - min(MEAN)) / min(STD) + 1e-5
    for (xb, _), k, (xa, _) in zip(batches, kept, again):
        assert torch.equal(xb, k) and torch.equal(xa, k)
        assert xb.is_contiguous(memory_format=torch.channels_last)
        assert xb.min() >= lo and xb.max() <= hi


def test_train_loader_options_and_errors():
    x, y = fake_data(100)
    loader = TrainLoader(x, y, 16, aug="standard", place=Placement(memory_format=torch.channels_last))
    xb, _ = next(iter(loader))
    assert xb.is_contiguous(memory_format=torch.channels_last)
    for bad in (0, -4):
        with pytest.raises(errors.ConfigError, match="batch size") as e:
            TrainLoader(x, y, bad)
        assert e.value.setting == "batch_size" and assert_plain(e)
        with pytest.raises(errors.ConfigError, match="batch size") as e:
            EvalLoader(x, y, bad)
        assert e.value.setting == "eval_batch_size"
    with pytest.raises(errors.ConfigError, match="uci, standard, none") as e:
        TrainLoader(x, y, 16, aug="cutmix")
    assert e.value.setting == "aug"
    with pytest.raises(errors.ConfigError, match="cannot be split over 4 ranks") as e:
        TrainLoader(x[:1], y[:1], 16, aug="none", place=Placement(world_size=4))
    assert e.value.setting == "train_limit" and assert_plain(e)


@pytest.mark.parametrize("ws", [1, 2, 3])
def test_eval_loader_covers_every_image_once_in_order(ws):
    x, y = fake_data(1000)
    xs, ys = [], []
    for rank in range(ws):
        loader = EvalLoader(x, y, 64, place=Placement(rank=rank, world_size=ws))
        batches = list(loader)
        assert len(batches) == len(loader)
        xs += [b[0] for b in batches]
        ys += [b[1] for b in batches]
    assert torch.equal(torch.cat(ys), y)
    torch.testing.assert_close(torch.cat(xs), normalised(x), atol=1e-6, rtol=0)


def test_subset():
    x, y = fake_data(50)
    assert subset(x, y, None)[0] is x
    xs, ys = subset(x, y, 10)
    assert torch.equal(xs, x[:10]) and torch.equal(ys, y[:10])
    assert len(subset(x, y, 50)[1]) == 50
    for bad in (0, -1, 51):
        with pytest.raises(errors.ConfigError, match="1..50") as e:
            subset(x, y, bad, setting="test_limit")
        assert e.value.setting == "test_limit" and assert_plain(e)


@pytest.mark.parametrize("aug, fast, kernel", [("uci", True, "bmm"), ("uci", False, "grid_sampler_2d"),
                                               ("standard", True, "index")])
def test_loader_makes_no_host_round_trips(aug, fast, kernel):
    # No .item()/nonzero/host-made tensors per epoch or batch: on CUDA each would wait for the device.
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.add(func.__name__.split(".")[0])
            return func(*args, **(kwargs or {}))

    x, y = fake_data(100)
    loader = TrainLoader(x, y, 32, aug=aug, seed=1, fast=fast)
    collect(loader)  # warm caches (constants made once)
    loader.set_epoch(1)
    with Ops() as ops:
        loader.draws()
        collect(loader)
    assert kernel in ops.seen  # the path expected ran
    assert not ops.seen & {"_local_scalar_dense", "nonzero", "masked_select", "lift_fresh", "item"}
