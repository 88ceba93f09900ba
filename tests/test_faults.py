"""Scale-out and faults: torchrun with gloo, SIGTERM/SIGKILL and resume, divergence, bad files."""
import errno
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch

import train
from conftest import ROOT, TINY, assert_same_weights, load_weights_file
from engine import checkpoint
from errors import ToolkitError as UserError

QUICK = [*TINY, "--train-limit", "480", "--test-limit", "200", "--batch-size", "32", "--aug", "standard",
         "--lr-regime", "1", "3", "0.05", "--bn-momentum", "0.1", "--no-progress"]


def start(argv, env=None):
    # The same thread count as this process: CPU reductions must run in the same order for the
    # resumed run to match the in-process reference bit for bit.
    e = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(torch.get_num_threads()))
    e.update(env or {})
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *map(str, argv)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=e)


def wait_for_status(save, predicate, proc, timeout=300):
    """Poll the run's status.json until predicate(status) holds (the run is then mid-training)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for d in os.listdir(save) if os.path.isdir(save) else []:
            st = os.path.join(save, d, "status.json")
            if os.path.exists(st):
                try:
                    status = json.load(open(st))
                except ValueError:
                    continue
                if predicate(status):
                    return os.path.join(save, d), status
        if proc.poll() is not None:
            raise AssertionError(f"run ended early:\n{proc.stdout.read()}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("timed out waiting for the run's status")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, synthetic_dir):
    """An uninterrupted 2-epoch run (checkpointing mid-epoch too, which must not change the result)."""
    save = tmp_path_factory.mktemp("reference")
    r = train.run([*QUICK, "--data_dir", synthetic_dir, "--save", str(save), "--epochs", "2"])
    return load_weights_file(os.path.join(r["folder"], "last.pytar"))


@pytest.mark.parametrize("where", ["epoch boundary", "mid-epoch"])
def test_sigkill_then_resume_auto_is_bit_identical(tmp_path, synthetic_dir, reference, where):
    save = tmp_path / "runs"
    argv = [*QUICK, "--data_dir", synthetic_dir, "--save", save, "--epochs", "2"]
    extra = ["--checkpoint-every", "4"] if where == "mid-epoch" else []
    proc = start(argv + extra)
    if where == "mid-epoch":
        folder, status = wait_for_status(str(save), lambda s: s["next_epoch"] == 1 and s["next_step"] >= 4, proc)
    else:
        folder, status = wait_for_status(str(save), lambda s: s["next_epoch"] == 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not json.load(open(os.path.join(folder, "status.json")))["finished"]
    r = train.run([*map(str, argv), *extra, "--resume", "auto"])
    assert r["folder"] == folder
    assert_same_weights(reference, load_weights_file(os.path.join(folder, "last.pytar")))


def test_sigterm_checkpoints_prints_resume_command_and_exits_0(tmp_path, synthetic_dir, reference):
    save = tmp_path / "runs"
    argv = [*QUICK, "--data_dir", synthetic_dir, "--save", save, "--epochs", "2"]
    proc = start(argv)
    # Wait for the first epoch to end, then stop during the second.
    wait_for_status(str(save), lambda s: s["next_epoch"] == 2, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    if "done: best" in out:
        pytest.fail("the run finished before SIGTERM arrived; make the run longer")
    assert proc.returncode == 0, out
    m = re.search(r"resume with: (.*)", out)
    assert m, out
    cmd = shlex.split(m.group(1))
    assert cmd[:2] == ["python", "train.py"] and "--resume" in cmd
    last = cmd[cmd.index("--resume") + 1]
    state = torch.load(last, weights_only=True)
    assert state["train"]["next_epoch"] == 2
    # The printed command, run as printed, finishes the run with the uninterrupted weights.
    proc = subprocess.run([sys.executable, *cmd[1:]], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads())))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert_same_weights(reference, load_weights_file(last))


def torchrun(nproc, argv, timeout=600, script="train.py"):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.join(ROOT, script), *map(str, argv)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))


def test_torchrun_two_processes_gloo(tmp_path, cifar_dir):
    save = tmp_path / "ddp"
    argv = [*TINY, "--data_dir", cifar_dir, "--no-download", "--train-limit", "600", "--test-limit", "333",
            "--batch-size", "25", "--aug", "none", "--epochs", "1", "--bn-momentum", "0.1",
            "--device", "cpu", "--no-progress", "--save", save]
    p = torchrun(2, argv)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "x2 rank(s)" in p.stdout
    assert "weights identical on all 2 ranks" in p.stdout
    # Rank 0 alone logs: one summary line for the epoch, and the 333 test images counted once.
    lines = [l for l in p.stdout.splitlines() if l.startswith("epoch ")]
    assert len(lines) == 1 and "/333)" in lines[0], p.stdout
    folder = str(next(save.iterdir()))
    rows = open(os.path.join(folder, "metrics.csv")).read().splitlines()
    assert len(rows) == 2
    # The global batch is 2 x 25 and the regime's LR is scaled linearly.
    state = torch.load(os.path.join(folder, "last.pytar"), weights_only=True)
    assert state["train"]["world_size"] == 2
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(2 * 0.07)
    # A checkpoint written by 2 ranks resumes on 1.
    r = train.run([*map(str, argv), "--epochs", "2", "--resume", folder])
    assert len(r["history"]) == 2 and r["folder"] == folder


def test_sync_bn_on_cpu_ranks_is_a_clear_error():
    from engine.distributed import Context
    args = train.parse_args([*TINY, "--sync-bn"])
    train.speed.resolve(args, torch.device("cpu"))
    with pytest.raises(UserError, match="--sync-bn needs CUDA devices"):
        train.build_model(args, Context(rank=0, world_size=2))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, synthetic_dir):
    argv = [*QUICK[:-7], "--lr-regime", "1", "1", "0.05", "2", "2", "1e30", "--bn-momentum", "0.1",
            "--no-progress", "--data_dir", synthetic_dir, "--save", str(tmp_path), "--epochs", "2"]
    with pytest.raises(UserError, match=r"non-finite loss in epoch 2 at step \d+ of 15"):
        train.run(argv)
    folder = str(next(tmp_path.iterdir()))
    state = torch.load(os.path.join(folder, "last.pytar"), weights_only=True)
    assert state["train"]["next_epoch"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    r = train.run([*argv, "--nan-policy", "skip", "--save", str(tmp_path / "skip")])
    assert len(r["history"]) == 2
    assert "skipped" in open(os.path.join(r["folder"], "log.txt")).read()


def test_truncated_resume_file_is_reported(tmp_path, synthetic_dir):
    r = train.run([*QUICK, "--data_dir", synthetic_dir, "--save", str(tmp_path), "--epochs", "1"])
    last = os.path.join(r["folder"], "last.pytar")
    data = open(last, "rb").read()
    open(last, "wb").write(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        train.run([*QUICK, "--data_dir", synthetic_dir, "--save", str(tmp_path), "--epochs", "2",
                   "--resume", r["folder"]])


def test_full_disk_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "last.pytar"
    checkpoint.save_atomic({"a": torch.ones(3)}, str(path))

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(UserError, match="No space left on device; free disk space"):
        checkpoint.save_atomic({"a": torch.zeros(3)}, str(path))
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(3))
    assert os.listdir(tmp_path) == ["last.pytar"]  # no temporary file left behind


def test_memory_does_not_grow_across_epochs(tmp_path, synthetic_dir):
    def rss_mb():
        with open("/proc/self/status") as f:
            return int(next(l for l in f if l.startswith("VmRSS")).split()[1]) / 1024
    seen = []
    train.run([*TINY, "--train-limit", "64", "--test-limit", "64", "--batch-size", "32", "--aug", "seed",
               "--lr-regime", "1", "12", "0.05", "--no-progress", "--keep-epoch-states", "false",
               "--data_dir", synthetic_dir, "--save", str(tmp_path), "--epochs", "12"],
              on_epoch=lambda row: seen.append(rss_mb()))
    assert len(seen) == 12
    # After warm-up, twelve epochs must not keep adding memory (a leak adds per epoch).
    assert seen[-1] - seen[3] < 40, seen


def test_chain_under_torchrun(tmp_path, cifar_dir):
    """chain.py launched by torchrun: every stage and the final evaluation run on both ranks."""
    save = tmp_path / "chain"
    p = torchrun(2, ["--stages", "efficientnet_ex,efficientnet_exx", "--data_dir", cifar_dir, "--no-download",
                     "--save", save, "--epochs", "1", "--width-mult", "0.25", "--depth-mult", "0.2",
                     "--train-limit", "400", "--test-limit", "201", "--aug", "none", "--batch-size", "25",
                     "--device", "cpu", "--no-progress"], script="chain.py")
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("weights identical on all 2 ranks") == 2
    report = json.load(open(save / "chain_report.json"))
    assert [s["model"] for s in report["stages"]] == ["efficientnet_ex", "efficientnet_exx"]
    assert report["final"]["total"] == 201  # the two ranks' uneven shards, each image once
