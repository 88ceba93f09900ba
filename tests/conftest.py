"""Shared fixtures: real CIFAR-100 (when available), a learnable synthetic CIFAR-100, and helpers to
run the scripts in-process or as subprocesses."""
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_UNPACK = os.path.join(ROOT, "..", "shared", "data", "cifar100", "unpack.sh")


def locate_cifar(tmp_path_factory, environ=os.environ, unpack=SHARED_UNPACK):
    """The real CIFAR-100 folder: $CIFAR100_DIR, else unpacked from ../shared when present; else the
    test is skipped, or fails when the CI variable is set (a CI machine without the data is broken:
    its real-data tests must not vanish as skips)."""
    root = environ.get("CIFAR100_DIR")
    if root and os.path.exists(os.path.join(root, "cifar-100-python", "train")):
        return root
    if os.path.exists(unpack):
        root = str(tmp_path_factory.mktemp("cifar100"))
        subprocess.run(["bash", unpack, root], check=True, capture_output=True)
        return root
    message = "real CIFAR-100 not found: set CIFAR100_DIR to a folder holding cifar-100-python/"
    if environ.get("CI"):
        pytest.fail(message + " (CI is set: the real-data tests must run)")
    pytest.skip(message)


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory):
    """The real CIFAR-100 (locate_cifar). Only tests that need real images use it: the rest (chain,
    torchrun) run on `synthetic_dir`."""
    return locate_cifar(tmp_path_factory)


# The short real-data run of issue 11 (two epochs of 10,000 images, narrow ex, default flags): the
# first-minutes test checks what it reports, the QAT test compares an 8-bit run of the same flags.
SHORT_REAL = ["--model", "efficientnet_ex", "--width-mult", "0.25", "--depth-mult", "0.34", "--epochs", "2",
              "--lr-regime", "1", "2", "0.05", "--train-limit", "10000", "--aug", "standard", "--device", "cpu",
              "--test-limit", "2000", "--no-download"]


def run_train(argv, on_epoch=None, on_speed=None, **hooks):
    """What `python train.py ARGV` does, through the library: the flags parsed into a RunConfig,
    then trained (engine.trainer.train); returns the Trainer's result."""
    from micronet_cifar100.cli.train_flags import parse_config
    from engine.trainer import Hooks, train
    return train(parse_config([str(a) for a in argv]), Hooks(on_epoch=on_epoch, on_speed=on_speed, **hooks))


def train_main(argv=None):
    """train.py's main through the library (for cli.errors.run_main): the exit code."""
    return run_train(argv)["exit_code"]


@pytest.fixture(scope="session")
def short_real_run(cifar_dir, tmp_path_factory):
    return run_train([*SHORT_REAL, "--data_dir", cifar_dir, "--save", str(tmp_path_factory.mktemp("short_real"))])


def write_cifar(root, train, test):
    folder = os.path.join(root, "cifar-100-python")
    os.makedirs(folder, exist_ok=True)
    for name, (x, y) in (("train", train), ("test", test)):
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({"data": x.reshape(len(x), -1), "fine_labels": y.tolist(),
                         "coarse_labels": [0] * len(y), "filenames": [], "batch_label": name}, f,
                        protocol=4)


def synthetic_split(n, seed):
    """Each class is a fixed low-frequency colour pattern plus noise: learnable in a few steps."""
    rng = np.random.default_rng(1234)
    patterns = rng.integers(40, 216, (100, 3, 4, 4)).repeat(8, axis=2).repeat(8, axis=3)
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 100
    rng.shuffle(y)
    noise = rng.normal(0, 25, (n, 3, 32, 32))
    x = np.clip(patterns[y] + noise, 0, 255).astype(np.uint8)
    return x, y


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synthetic_cifar"))
    write_cifar(root, synthetic_split(50_000, 1), synthetic_split(10_000, 2))
    return root


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module whose tensors are too small to share between cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Narrow, shallow models keep CPU tests short (the network keeps 32x32 maps for two stages).
TINY = ["--model", "efficientnet_ex", "--width-mult", "0.25", "--depth-mult", "0.2"]


def run_script(script, *argv, timeout=900, env=None, check=False):
    """Run a script as a user would, in a subprocess; returns CompletedProcess."""
    e = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, argv)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=e)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def load_weights_file(path):
    obj = torch.load(path, map_location="cpu", weights_only=True)
    return obj["model"] if "format" in obj else obj


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert different == [], f"{len(different)} tensors differ, e.g. {different[:3]}"


def first_test_images(data_dir, n, memory_format=torch.channels_last):
    """The first n test images, normalised as training evaluates them (one batch), and their labels.
    channels_last by default: the CPU default of train.py and test.py, so that a model in the same
    format gives the logged figures to the last bit."""
    import data
    images, labels = data.subset(*data.load_cifar100(data_dir, train=False, download=False), n)
    loader = data.EvalLoader(images, labels, n, place=data.Placement(memory_format=memory_format))
    (x, y), = list(loader)
    return x, y


def load_model(path, name="efficientnet_ex", head="cosine", width=0.25, depth=0.2,
               memory_format=torch.channels_last):
    """A model built as the tiny runs build it, with the weights of a checkpoint file, in eval mode."""
    import models
    from engine import checkpoint
    net = models.create(name, head=head, width_mult=width, depth_mult=depth)
    checkpoint.load_weights(net, str(path))
    return net.to(memory_format=memory_format).eval()
