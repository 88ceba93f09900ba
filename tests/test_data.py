"""Tests for data/: CIFAR-100 reading and validation, batched augmentation, device-resident loaders."""
import math
import os
import pickle
import urllib.error

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF

import data
from data import augment
from data import (AUG_RECIPES, MEAN, STD, EvalLoader, TrainLoader, color_jitter, copies, crop_boxes,
                  hflip, jitter_params, load_cifar100, make_augment, pad_crop, random_resized_crop,
                  resized_crop, subset)
from engine.errors import UserError


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
    with pytest.raises(UserError, match=needle) as e:
        load_cifar100(tmp_path, train=False, download=False)
    assert str(path) in str(e.value) and "delete it" in str(e.value)
    assert "\n" not in str(e.value)


def test_rejects_train_file_of_test_size(tmp_path):
    write_split(tmp_path, fake_split(), split="train")
    with pytest.raises(UserError, match="50000"):
        load_cifar100(tmp_path, train=True, download=False)


def test_rejects_non_dict(tmp_path):
    write_split(tmp_path, [1, 2, 3])
    with pytest.raises(UserError, match="expected a dict"):
        load_cifar100(tmp_path, train=False, download=False)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_rejects_truncated_or_corrupt_file(tmp_path, damage):
    path = write_split(tmp_path, fake_split())
    blob = path.read_bytes()
    blob = {"truncate": blob[:len(blob) // 2], "garbage": os.urandom(5000), "empty": b""}[damage]
    path.write_bytes(blob)
    with pytest.raises(UserError, match="delete it") as e:
        load_cifar100(tmp_path, train=False, download=False)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


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
    with pytest.raises(UserError, match="refusing to unpickle") as e:
        load_cifar100(tmp_path, train=False, download=False)
    assert (".system" if payload == "system" else ".eval") in str(e.value)
    assert "not a CIFAR-100 pickle" in str(e.value)
    assert not marker.exists()


def test_missing_data_without_download_names_path(tmp_path, monkeypatch):
    monkeypatch.setattr(data.cifar, "_download", lambda root: pytest.fail("must not download"))
    with pytest.raises(UserError) as e:
        load_cifar100(tmp_path / "nowhere", train=True, download=False)
    msg = str(e.value)
    assert str(tmp_path / "nowhere" / "cifar-100-python" / "train") in msg and "--data_dir" in msg


def test_download_failure_says_where_and_how(tmp_path, monkeypatch):
    calls = []

    def offline(root):
        calls.append(root)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(data.cifar, "_download", offline)
    with pytest.raises(UserError) as e:
        load_cifar100(tmp_path, train=False, download=True)
    msg = str(e.value)
    assert calls == [str(tmp_path)]
    assert str(tmp_path / "cifar-100-python") in msg
    assert "internet" in msg and "--data_dir" in msg and "--no-download" in msg


def test_download_is_used_when_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(data.cifar, "_download", lambda root: write_split(tmp_path, fake_split()))
    x, y = load_cifar100(tmp_path, train=False)
    assert len(x) == len(y) == 10_000


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


# ---------------------------------------------------------------- augmentation


def images(b=64, seed=0, lo=0.0, hi=1.0):
    return lo + (hi - lo) * torch.rand(b, 3, 32, 32, generator=gen(seed))


def test_color_jitter_identity_and_range():
    x = images()
    assert torch.equal(color_jitter(x, 0.0, 0.0, gen()), x)
    y = color_jitter(x, 0.4, 0.4, gen())
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1 and not torch.equal(x, y)


@pytest.mark.parametrize("v", [0.2, 0.4, 1.5])
def test_jitter_factor_distribution(v):
    n = 20_000
    fb, fc, contrast_first = jitter_params(n, v, v, gen())
    lo, hi = max(0.0, 1 - v), 1 + v
    for f in (fb, fc):
        assert f.min() >= lo and f.max() <= hi
        assert abs(f.mean().item() - (lo + hi) / 2) < 0.01 * (hi - lo) + 1e-3
        ref = np.random.default_rng(0).uniform(lo, hi, n)
        assert ks_stat(f.numpy(), ref) < 0.03
    assert abs(contrast_first.float().mean().item() - 0.5) < 0.02


def test_color_jitter_matches_torchvision_per_sample():
    x = images(32)
    out = color_jitter(x, 0.4, 0.4, gen(3))
    fb, fc, contrast_first = jitter_params(32, 0.4, 0.4, gen(3))
    for i in range(32):
        ref = x[i]
        ops = [lambda t: TF.adjust_brightness(t, fb[i].item()), lambda t: TF.adjust_contrast(t, fc[i].item())]
        for op in (ops[::-1] if contrast_first[i] else ops):
            ref = op(ref)
        # torchvision weighs red 0.2989 in its grey level, we use 0.299.
        torch.testing.assert_close(out[i], ref, atol=1e-3, rtol=0)


def test_random_resized_crop_identity_and_range():
    x = images()
    assert torch.equal(random_resized_crop(x, (1.0, 1.0), (1.0, 1.0), gen()), x)
    y = random_resized_crop(x, (0.08, 1.0), (3 / 4, 4 / 3), gen())
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1


def test_resized_crop_matches_torchvision():
    x = images(48)
    boxes = crop_boxes(48, 32, 32, (0.08, 1.0), (3 / 4, 4 / 3), gen(5))
    out = resized_crop(x, *boxes)
    for i in range(48):
        top, left, h, w = (int(b[i]) for b in boxes)
        ref = TF.resized_crop(x[i], top, left, h, w, [32, 32], antialias=True)
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("scale, ratio", [((0.3, 1.0), (0.8, 1.2)), ((0.08, 1.0), (3 / 4, 4 / 3))])
def test_crop_box_distribution_matches_torchvision(scale, ratio):
    n = 20_000
    top, left, h, w = (t.numpy() for t in crop_boxes(n, 32, 32, scale, ratio, gen(1)))
    torch.manual_seed(1)
    img = torch.zeros(3, 32, 32)
    ref = np.array([T.RandomResizedCrop.get_params(img, scale, ratio) for _ in range(n)])
    assert (h >= 1).all() and (w >= 1).all() and (top + h <= 32).all() and (left + w <= 32).all()
    assert (top >= 0).all() and (left >= 0).all()
    assert ks_stat(h * w / 1024, ref[:, 2] * ref[:, 3] / 1024) < 0.03
    assert ks_stat(w / h, ref[:, 3] / ref[:, 2]) < 0.03
    assert ks_stat(top, ref[:, 0]) < 0.03 and ks_stat(left, ref[:, 1]) < 0.03
    assert abs((h * w).mean() - (ref[:, 2] * ref[:, 3]).mean()) < 0.02 * 1024


@pytest.mark.parametrize("scale, ratio", [((2.0, 3.0), (3 / 4, 4 / 3)), ((5.0, 6.0), (2.0, 3.0)),
                                          ((5.0, 6.0), (0.2, 0.5))])
def test_crop_box_fallback_matches_torchvision(scale, ratio):
    # No attempt can fit, so both fall back to the same deterministic central crop.
    ours = [int(t[0]) for t in crop_boxes(4, 32, 32, scale, ratio, gen())]
    assert ours == list(T.RandomResizedCrop.get_params(torch.zeros(3, 32, 32), scale, ratio))


def test_crop_boxes_per_sample_parameters():
    scale = torch.tensor([[1.0, 1.0], [0.08, 0.1]]).repeat(500, 1)
    ratio = torch.tensor([[1.0, 1.0], [3 / 4, 4 / 3]]).repeat(500, 1)
    top, left, h, w = crop_boxes(1000, 32, 32, scale, ratio, gen())
    assert (h[0::2] == 32).all() and (w[0::2] == 32).all() and (top[0::2] == 0).all()
    assert (h[1::2] * w[1::2] <= 0.1 * 1024 + 12).all()


def test_hflip():
    x = images()
    assert torch.equal(hflip(x, 0.0, gen=gen()), x)
    assert torch.equal(hflip(x, 1.0, gen=gen()), x.flip(-1))
    y = hflip(x, 0.5, gen=gen())
    flipped = (y == x.flip(-1)).flatten(1).all(1)
    assert (flipped | (y == x).flatten(1).all(1)).all()
    rate = hflip(torch.arange(20_000.0).view(-1, 1, 1, 2), 0.5, gen=gen()).flatten(1)[:, 0] % 2
    assert abs(rate.mean().item() - 0.5) < 0.02


def test_pad_crop_gives_shifted_copies():
    x = images(400)
    y = pad_crop(x, 4, gen=gen())
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    seen = set()
    for i in range(len(x)):
        hits = [(dy, dx) for dy in range(9) for dx in range(9)
                if torch.equal(y[i], padded[i, :, dy:dy + 32, dx:dx + 32])]
        assert len(hits) == 1
        seen.add(hits[0])
    assert len(seen) == 81
    assert torch.equal(pad_crop(x, 0, gen=gen()), x)


def test_recipes_and_copies():
    assert AUG_RECIPES == ("seed", "standard", "none")
    assert [copies(a) for a in AUG_RECIPES] == [3, 1, 1]
    with pytest.raises(UserError, match="seed, standard, none"):
        copies("autoaugment")
    x = images(32)
    assert torch.equal(make_augment("none")(x, torch.zeros(32, dtype=torch.long), gen()), x)


def test_standard_recipe_is_shift_and_flip():
    x = images(64)
    y = make_augment("standard")(x, torch.zeros(64, dtype=torch.long), gen())
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(64):
        views = [padded[i, :, dy:dy + 32, dx:dx + 32] for dy in range(9) for dx in range(9)]
        assert any(torch.equal(y[i], v) or torch.equal(y[i], v.flip(-1)) for v in views)


def test_seed_recipe_applies_each_copys_ops():
    aug = make_augment("seed")
    n = 256
    # Copy 0: jitter + flip only, so each image is an exact affine map of itself or its mirror.
    x = images(n, lo=0.35, hi=0.65)
    y = aug(x, torch.zeros(n, dtype=torch.long), gen())
    corr = [max(np.corrcoef(y[i].flatten(), x[i].flatten())[0, 1],
                np.corrcoef(y[i].flatten(), x[i].flip(-1).flatten())[0, 1]) for i in range(n)]
    assert min(corr) > 0.9999
    assert not torch.equal(y, x)
    # Copies 1 and 2 crop, which breaks that for most images.
    for copy in (1, 2):
        y = aug(x, torch.full((n,), copy), gen())
        corr = [max(np.corrcoef(y[i].flatten(), x[i].flatten())[0, 1],
                    np.corrcoef(y[i].flatten(), x[i].flip(-1).flatten())[0, 1]) for i in range(n)]
        assert np.mean(np.array(corr) < 0.999) > 0.5
    # Copy 2 has no jitter: a flat colour stays exactly that colour; copy 1 changes it.
    flat = torch.rand(n, 3, 1, 1, generator=gen(2)).expand(n, 3, 32, 32).contiguous() * 0.5 + 0.25
    assert torch.allclose(aug(flat, torch.full((n,), 2), gen()), flat, atol=1e-6)
    changed = (aug(flat, torch.full((n,), 1), gen()) - flat).abs().flatten(1).amax(1) > 1e-3
    assert changed.float().mean() > 0.9


def test_augment_is_reproducible():
    aug = make_augment("seed")
    x, copy_id = images(64), torch.arange(64) % 3
    assert torch.equal(aug(x, copy_id, gen(7)), aug(x, copy_id, gen(7)))
    assert not torch.equal(aug(x, copy_id, gen(7)), aug(x, copy_id, gen(8)))


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
    ("seed", 1, False, math.ceil(900 / 64)), ("seed", 1, True, 900 // 64),
    ("seed", 2, False, math.ceil(450 / 64)), ("standard", 1, False, math.ceil(300 / 64)),
    ("none", 3, True, 100 // 64)])
def test_train_loader_len(aug, ws, drop_last, expected):
    x, y = fake_data()
    loader = TrainLoader(x, y, 64, aug=aug, world_size=ws, drop_last=drop_last)
    assert len(loader) == expected == len(collect(loader))
    sizes = [len(b[1]) for b in collect(loader)]
    assert all(s == 64 for s in sizes[:-1]) and (sizes[-1] == 64 or not drop_last)


def test_train_epoch_visits_every_sample_once():
    x, y = fake_data()
    loader = TrainLoader(x, y, 64, aug="seed", seed=3)
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


def test_train_resume_mid_epoch_is_bit_exact():
    x, y = fake_data()
    full = TrainLoader(x, y, 64, aug="seed", seed=5)
    full.set_epoch(4)
    reference = collect(full)
    resumed = TrainLoader(x, y, 64, aug="seed", seed=5)
    resumed.set_epoch(4)
    for k in (0, 7, len(reference) - 1, len(reference)):
        tail = collect(resumed, start_step=k)
        assert len(tail) == len(reference) - k
        for (xa, ya), (xb, yb) in zip(tail, reference[k:]):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    with pytest.raises(UserError, match="step"):
        resumed.iterate(start_step=len(reference) + 1)


@pytest.mark.parametrize("n", [300, 333])
def test_train_ddp_shards_are_disjoint_and_cover_the_permutation(n):
    x, y = fake_data(n)
    single = TrainLoader(x, y, 64, seed=4)
    shards = []
    for rank in range(2):
        loader = TrainLoader(x, y, 64, seed=4, rank=rank, world_size=2)
        seen = torch.cat([b[1] for b in collect(loader)])
        assert torch.equal(seen, loader.indices() % n)
        shards.append(loader.indices())
    assert len(shards[0]) == len(shards[1]) == 3 * n // 2
    both = torch.cat(shards)
    assert len(both.unique()) == len(both)
    assert torch.equal(torch.stack(shards, 1).flatten(), single.indices()[:len(both)])


@pytest.mark.parametrize("aug", ["seed", "standard"])
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
    assert all(len(d) == loader.per_rank for d in draws)
    part = slice(128, 192)
    xb, yb = collect(loader)[2]
    ref = augment.apply(aug, x[yb].float() / 255, tuple(d[part] for d in draws))
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(xb, (ref - mean) / std, atol=1e-4, rtol=0)


def test_train_ranks_and_steps_draw_different_augmentation():
    # Identical images, so any difference between batches comes from the augmentation draws.
    x = torch.full((400, 3, 32, 32), 128, dtype=torch.uint8)
    x[:, :, :16] = 30
    y = torch.zeros(400, dtype=torch.long)
    r0 = collect(TrainLoader(x, y, 64, seed=4, rank=0, world_size=2))
    r1 = collect(TrainLoader(x, y, 64, seed=4, rank=1, world_size=2))
    assert not torch.equal(r0[0][0], r1[0][0])
    assert not torch.equal(r0[0][0], r0[1][0])


def test_train_loader_options_and_errors():
    x, y = fake_data(100)
    loader = TrainLoader(x, y, 16, aug="standard", memory_format=torch.channels_last)
    xb, _ = next(iter(loader))
    assert xb.is_contiguous(memory_format=torch.channels_last)
    for bad in (0, -4):
        with pytest.raises(UserError, match="batch size"):
            TrainLoader(x, y, bad)
        with pytest.raises(UserError, match="batch size"):
            EvalLoader(x, y, bad)
    with pytest.raises(UserError, match="seed, standard, none"):
        TrainLoader(x, y, 16, aug="cutmix")


@pytest.mark.parametrize("ws", [1, 2, 3])
def test_eval_loader_covers_every_image_once_in_order(ws):
    x, y = fake_data(1000)
    xs, ys = [], []
    for rank in range(ws):
        loader = EvalLoader(x, y, 64, rank=rank, world_size=ws)
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
        with pytest.raises(UserError, match="1..50"):
            subset(x, y, bad)


# ---------------------------------------------------------------- fused seed pipeline


def test_flip_folded_into_crop_matches_crop_then_flip():
    from data.augment import _separable_resized_crop
    x = images(48)
    boxes = crop_boxes(48, 32, 32, (0.08, 1.0), (3 / 4, 4 / 3), gen(5))
    flip = torch.rand(48, generator=gen(6)) < 0.5
    plain = resized_crop(x, *boxes)
    expected = torch.where(flip.view(-1, 1, 1, 1), plain.flip(-1), plain)
    torch.testing.assert_close(resized_crop(x, *boxes, flip=flip), expected, atol=1e-5, rtol=0)
    for chunk in (None, 7):
        sep = _separable_resized_crop(x, *boxes, flip=flip, bufs={}, chunk=chunk)
        assert sep.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(sep, expected, atol=1e-5, rtol=0)
    # Identity boxes are exact.
    full = [torch.zeros(48, dtype=torch.long)] * 2 + [torch.full((48,), 32)] * 2
    assert torch.equal(_separable_resized_crop(x, *full), x)
    mirrored = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    assert torch.equal(_separable_resized_crop(x, *full, flip=flip), mirrored)


def test_interpolation_table_rows_are_the_built_matrices():
    from data.augment import _interp_matrix, _interp_table, _table_rows
    table = _interp_table(32, torch.float32, "cpu")
    assert table.shape == (2 * 32 * 33, 32, 32)
    top, left, h, w = crop_boxes(200, 32, 32, (0.08, 1.0), (3 / 4, 4 / 3), gen(8))
    flip = torch.rand(200, generator=gen(9)) < 0.5
    assert torch.equal(table[_table_rows(left, w, 32, flip)], _interp_matrix(left, w, 32, 32, torch.float32, flip))
    assert torch.equal(table[_table_rows(top, h, 32)], _interp_matrix(top, h, 32, 32, torch.float32))
    # Every row of a possible crop sums to 1; impossible crops (length 0, or past the edge) are zeros.
    start, length = torch.tensor([0, 31, 5, 20]), torch.tensor([32, 1, 0, 13])
    sums = table[_table_rows(start, length, 32)].sum(-1)
    torch.testing.assert_close(sums[:2], torch.ones(2, 32))
    assert not sums[2:].any()


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_seed_pipeline_equals_unit_augment_normalise(memory_format):
    from data.augment import draw, make_seed_pipeline
    u8 = torch.randint(0, 256, (300, 3, 32, 32), dtype=torch.uint8, generator=gen(1))
    copy_id = torch.arange(300) % 3
    pipe = make_seed_pipeline("cpu", MEAN, STD, memory_format)
    out = pipe(u8, draw("seed", copy_id, gen(4)))
    ref = make_augment("seed")(u8.float() / 255, copy_id, gen(4))
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(out, (ref - mean) / std, atol=1e-4, rtol=0)
    assert out.is_contiguous(memory_format=memory_format)
    # Reused work buffers never leak into results: a second call leaves the first result alone,
    # and a different batch size works too.
    kept = out.clone()
    pipe(u8.flip(0), draw("seed", copy_id, gen(5)))
    assert torch.equal(out, kept)
    assert torch.equal(pipe(u8, draw("seed", copy_id, gen(4))), kept)
    fresh = make_seed_pipeline("cpu", MEAN, STD, memory_format)
    few = draw("seed", copy_id[:37], gen(4))
    assert torch.equal(pipe(u8[:37], few), fresh(u8[:37], few))


def test_seed_loader_batches_are_independent_tensors():
    x, y = fake_data()
    loader = TrainLoader(x, y, 64, aug="seed", seed=2, memory_format=torch.channels_last)
    batches = collect(loader)
    kept = [b[0].clone() for b in batches]
    again = collect(loader)
    for (xb, _), k, (xa, _) in zip(batches, kept, again):
        assert torch.equal(xb, k) and torch.equal(xa, k)
        assert xb.is_contiguous(memory_format=torch.channels_last)
        assert xb.min() >= (0 - max(MEAN)) / min(STD) - 1e-5 and xb.max() <= (1 - min(MEAN)) / min(STD) + 1e-5


@pytest.mark.parametrize("u8", [False, True])
def test_seed_matmul_crop_matches_grid_sample_path(u8):
    # The CPU's matmul crop and the grid_sample one used on CUDA give the same images.
    from data.augment import _seed, draw
    x = torch.randint(0, 256, (96, 3, 32, 32), dtype=torch.uint8, generator=gen(2))
    x = x if u8 else x.float() / 255
    scale = 1 / 255 if u8 else 1.0
    copy_id = torch.arange(96) % 3
    params = draw("seed", copy_id, gen(3))
    grid = _seed(x, params, in_scale=scale, separable=False)
    mat = _seed(x, params, in_scale=scale, bufs={"crop": {}}, chunk=40, separable=True)
    torch.testing.assert_close(mat, grid, atol=1e-5, rtol=0)


@pytest.mark.parametrize("separable", [True, False])
def test_seed_pipeline_makes_no_host_round_trips(separable):
    # No .item()/nonzero/host-made tensors per batch: on CUDA each would wait for the device.
    from torch.utils._python_dispatch import TorchDispatchMode

    from data.augment import _seed, draw

    class Ops(TorchDispatchMode):
        seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.add(func.__name__.split(".")[0])
            return func(*args, **(kwargs or {}))

    u8 = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=gen(1))
    norm = (torch.tensor(MEAN), torch.tensor(STD), [0.0] * 3, [1.0] * 3)
    params = draw("seed", torch.arange(64) % 3, gen())
    _seed(u8, params, 1 / 255, norm, separable=separable)  # warm caches
    with Ops() as ops:
        _seed(u8, params, 1 / 255, norm, {"crop": {}}, 16, separable)
        draw("seed", torch.arange(64) % 3, gen())
    assert "bmm" in ops.seen if separable else "grid_sampler_2d" in ops.seen
    assert not ops.seen & {"_local_scalar_dense", "nonzero", "masked_select", "lift_fresh", "item"}
