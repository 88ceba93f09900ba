"""Exit codes, as a shell or a scheduler sees them: 2 for a usage error (a flag's value or a
combination of flags), 1 for a failure at run time (a missing or damaged file, the data, storage,
a diverged run), each with one line on stderr and no traceback. Every script is run as a user runs
it, in a subprocess."""
import os
import subprocess
import sys

import pytest
import torch

import models
from conftest import ROOT, TINY
from engine import checkpoint

QUICK = [*TINY, "--train-limit", "96", "--test-limit", "64", "--batch-size", "32", "--aug", "none",
         "--no-progress", "--no-download", "--device", "cpu"]


def run(script, *argv):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, script, *map(str, argv)], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env=env)
    err = p.stderr.strip().splitlines()
    assert "Traceback" not in p.stderr, p.stderr
    return p.returncode, err[-1] if err else ""


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    """A model_best.pytar with one flipped byte inside its tensor data (its checksum catches it)."""
    path = tmp_path_factory.mktemp("damaged") / "model_best.pytar"
    m = models.create("efficientnet_ex", width_mult=0.25, depth_mult=0.2)
    torch.save(checkpoint.weights_file(m, epoch=1), path)
    raw = bytearray(path.read_bytes())
    at = raw.index(b"data/0") + 200   # inside the zip member of the first tensor
    raw[at] ^= 0xFF
    path.write_bytes(bytes(raw))
    return str(path)


def test_train_py(tmp_path, synthetic_dir):
    code, line = run("train.py", "--batch-size", "0")
    assert code == 2 and "--batch-size" in line
    code, line = run("train.py", *QUICK, "--data_dir", tmp_path / "empty", "--save", tmp_path)
    assert code == 1 and line.startswith("error: ") and "--data_dir" in line


@pytest.mark.slow
def test_train_py_exits_1_when_the_run_diverges(tmp_path, synthetic_dir):
    code, line = run("train.py", *QUICK, "--lr-regime", "1", "1", "1e30", "--epochs", "1", "--data_dir",
                     synthetic_dir, "--save", tmp_path)
    assert code == 1 and "non-finite loss in epoch 1" in line


@pytest.mark.slow
def test_test_py(synthetic_dir, damaged):
    code, line = run("test.py", "--model-state-file", damaged, "--batch-size", "-3")
    assert code == 2 and "--batch-size" in line
    code, line = run("test.py", *TINY, "--model-state-file", damaged, "--data_dir", synthetic_dir, "--device", "cpu")
    assert code == 1 and "is damaged" in line


@pytest.mark.slow
def test_chain_py(tmp_path):
    code, line = run("chain.py", "--stages", "efficientnet_zz")
    assert code == 2 and "--stages" in line
    code, line = run("chain.py", *QUICK[2:], "--stages", "efficientnet_ex", "--epochs", "1",  # no --model
                     "--data_dir", tmp_path / "empty", "--save", tmp_path / "chain")
    assert code == 1 and "--data_dir" in line


@pytest.mark.slow
def test_count_py(damaged):
    code, line = run(os.path.join("torchscope", "count.py"), "--mul-factor", "2")
    assert code == 2 and "--mul-factor" in line
    code, line = run(os.path.join("torchscope", "count.py"), *TINY, "--model-state-file", damaged)
    assert code == 1 and "is damaged" in line
