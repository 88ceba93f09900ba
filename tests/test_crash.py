"""Crash consistency: no kill, full disk or second process loses or wedges a run or a chain.

Kills are simulated at every rename of a run's bookkeeping (tests/killer/sitecustomize.py: os._exit just before
or just after it, so no cleanup runs, as with SIGKILL); full disks by making the N-th file write
or file creation fail with ENOSPC. After each, the same command again must complete with the
weights of an uninterrupted run, bit for bit, without training any epoch or stage twice."""
import errno
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import zipfile

import pytest
import torch

import chain
from micronet_cifar100.cli.errors import run_main
from conftest import ROOT, assert_same_weights, load_weights_file, run_train, train_main

pytestmark = pytest.mark.slow

# Three steps an epoch (96 images, batch 32), a mid-epoch checkpoint after step 2, two epochs.
QUICK = ["--model", "efficientnet_ex", "--width-mult", "0.1", "--depth-mult", "0.1", "--train-limit", "96",
         "--test-limit", "50", "--batch-size", "32", "--aug", "standard", "--lr-regime", "1", "2", "0.05",
         "--no-progress", "--epochs", "2", "--checkpoint-every", "2"]


def argv_for(data_dir, save, *extra):
    return [*QUICK, "--data_dir", data_dir, "--save", str(save), *extra]


def env(**extra):
    # The same thread count as this process: CPU reductions must run in the same order for a run
    # resumed here to match the reference bit for bit.
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(torch.get_num_threads()), **extra)


def killed_run(script, argv, **kill):
    """Run a script with tests/killer/sitecustomize.py and the given KILL_* settings."""
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, argv)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          env=env(PYTHONPATH=os.path.join(ROOT, "tests", "killer"),
                                  **{k: str(v) for k, v in kill.items()}))


def run_folders(save):
    return sorted(os.path.join(save, d) for d in os.listdir(save)
                  if os.path.isfile(os.path.join(save, d, "last.pytar")))


def leftovers(save):
    return [os.path.join(b, f) for b, _, fs in os.walk(save) for f in fs if f.startswith(".tmp-")]


def uninterrupted(script, argv, log):
    """Run a script to the end, logging its renames; returns them in order."""
    p = killed_run(script, argv, KILL_LOG=log)
    assert p.returncode == 0, p.stdout + p.stderr
    return log.read_text().split()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, synthetic_dir):
    """The uninterrupted run's final weights, and the renames it makes, in order."""
    save = tmp_path_factory.mktemp("reference")
    names = uninterrupted("train.py", argv_for(synthetic_dir, save / "runs"), save / "renames.txt")
    (folder,) = run_folders(save / "runs")
    return load_weights_file(os.path.join(folder, "last.pytar")), names


def test_the_reference_run_renames_every_bookkeeping_file(reference):
    names = set(reference[1])
    assert {"args.json", "last.pytar", "status.json", "model_state_01.pytar", "model_state_02.pytar",
            "model_best.pytar", "metrics.csv", "curves.png"} <= names
    # Two mid-epoch checkpoints and two epoch ends.
    assert reference[1].count("last.pytar") == 4


# Each bookkeeping file at its last rename (the final epoch's, where a kill used to wedge a run), and
# the first mid-epoch last.pytar; killed just before and just after each.
KILL_POINTS = [("args.json", 1), ("last.pytar", 1), ("last.pytar", -1), ("status.json", -1),
               ("model_state_02.pytar", 1), ("model_best.pytar", -1), ("metrics.csv", -1), ("curves.png", -1)]


@pytest.mark.parametrize("name,nth", KILL_POINTS, ids=[f"{n}#{k}" for n, k in KILL_POINTS])
def test_a_kill_at_a_rename_then_the_same_command_completes_bit_exact(tmp_path, synthetic_dir, reference,
                                                                     name, nth):
    weights, names = reference
    nth = names.count(name) if nth == -1 else nth
    assert nth >= 1, f"the reference run never renames {name}"
    for when in ("before", "after"):
        save = tmp_path / when
        argv = argv_for(synthetic_dir, save, "--resume", "auto")
        p = killed_run("train.py", argv, KILL_FILE=name, KILL_NTH=nth, KILL_WHEN=when)
        assert p.returncode == 137, f"{name}#{nth} {when}: the kill did not happen\n{p.stdout}{p.stderr}"
        r = run_train(argv)
        assert r["exit_code"] == 0 and not r["stopped"]
        assert [row["epoch"] for row in r["history"]] == [1, 2], when
        folders = run_folders(save)
        assert folders == [r["folder"]], f"{when}: a second run started: {folders}"
        assert_same_weights(weights, load_weights_file(os.path.join(r["folder"], "last.pytar")))
        status = json.load(open(os.path.join(r["folder"], "status.json")))
        assert status["finished"] and status["next_epoch"] == 3
        assert len(open(os.path.join(r["folder"], "metrics.csv")).read().splitlines()) == 3
        assert leftovers(r["folder"]) == [], when
        # Once more: the run is finished, and says so instead of starting again.
        again = run_train(argv)
        assert again["folder"] == r["folder"] and run_folders(save) == folders


def test_a_finished_run_with_damaged_small_files_is_still_finished(tmp_path, synthetic_dir, capsys):
    argv = argv_for(synthetic_dir, tmp_path, "--epochs", "1")
    first = run_train(argv)
    for name in ("status.json", "args.json", "metrics.csv"):
        with open(os.path.join(first["folder"], name), "w") as f:
            f.write("{garbage")
    again = run_train([*argv, "--resume", "auto"])
    assert again["folder"] == first["folder"] and "already finished" in capsys.readouterr().out
    assert json.load(open(os.path.join(first["folder"], "status.json")))["finished"]
    # An unfinished run whose status.json is gone continues from its intact last.pytar.
    os.unlink(os.path.join(first["folder"], "status.json"))
    more = run_train([*argv[:-2], "--epochs", "2", "--resume", "auto"])
    assert more["folder"] == first["folder"] and len(more["history"]) == 2


# ------------------------------------------------------------------ chains


@pytest.fixture(scope="module")
def chain_reference(tmp_path_factory, synthetic_dir):
    save = tmp_path_factory.mktemp("chain_ref")
    names = uninterrupted("chain.py", chain_argv(synthetic_dir, save / "chain"), save / "renames.txt")
    report = json.load(open(save / "chain" / "chain_report.json"))
    return load_weights_file(report["stages"][-1]["checkpoint"]), names


def chain_argv(data_dir, save):
    return ["--stages", "efficientnet_ex,efficientnet_exx", "--width-mult", "0.1", "--depth-mult", "0.1",
            "--train-limit", "64", "--test-limit", "50", "--batch-size", "32", "--aug", "none", "--epochs", "1",
            "--no-progress", "--data_dir", data_dir, "--save", str(save)]


def test_a_kill_around_the_chain_bookkeeping_never_trains_a_stage_twice(tmp_path, synthetic_dir, chain_reference):
    weights, names = chain_reference
    # Each stage's commit point and derived files, the chain's record, the next stage's first write.
    # Stage 1's commit point, the chain's first record of it, and stage 2's first write.
    first = {n: names.index(n) for n in set(names)}
    stage1_last = max(i for i, n in enumerate(names[:first["chain_state.json"]]) if n == "last.pytar")
    points = [("last.pytar", names[:stage1_last + 1].count("last.pytar")), ("chain_state.json", 1),
              ("args.json", 2)]
    for name, nth in points:
        for when in ("before", "after"):
            save = tmp_path / f"{when}-{name}-{nth}"
            p = killed_run("chain.py", chain_argv(synthetic_dir, save), KILL_FILE=name, KILL_NTH=nth,
                           KILL_WHEN=when)
            assert p.returncode == 137, f"{name}#{nth} {when}\n{p.stdout}{p.stderr}"
            assert chain.main(chain_argv(synthetic_dir, save)) == 0
            report = json.load(open(save / "chain_report.json"))
            assert len(run_folders(save)) == 2, f"{name}#{nth} {when}: a stage was trained twice"
            assert_same_weights(weights, load_weights_file(report["stages"][-1]["checkpoint"]))


# ------------------------------------------------------------------ full disks


class DiskFull:
    """Make the n-th file fsync (disk full) or the n-th temporary file creation (no inodes) fail."""

    def __init__(self, monkeypatch, kind, n):
        self.kind, self.n, self.calls = kind, n, 0
        if kind == "space":
            real = os.fsync

            def fsync(fd):
                if os.path.isfile(f"/proc/self/fd/{fd}"):
                    self.hit()
                return real(fd)
            monkeypatch.setattr(os, "fsync", fsync)
        else:
            real = tempfile.mkstemp

            def mkstemp(*a, **k):
                self.hit()
                return real(*a, **k)
            monkeypatch.setattr(tempfile, "mkstemp", mkstemp)

    def hit(self):
        self.calls += 1
        if self.calls == self.n:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("kind", ["space", "inodes"])
def test_a_full_disk_at_any_write_is_one_line_and_resumable(tmp_path, synthetic_dir, reference, kind, capsys,
                                                            monkeypatch):
    weights, _ = reference
    n = 1
    while True:
        save = tmp_path / f"{kind}-{n}"
        argv = argv_for(synthetic_dir, save, "--resume", "auto")
        with monkeypatch.context() as m:
            full = DiskFull(m, kind, n)
            try:
                code = run_main(train_main, argv)
            except SystemExit as e:
                code = e.code
        if full.calls < n:  # the run made fewer writes than n: every write has been failed once
            assert code == 0
            break
        out = capsys.readouterr()
        err = out.err.strip().splitlines()
        if code == 0:  # only curves.png could not be written: drawing never stops training
            assert "warning: curves.png not drawn (OSError: [Errno 28] No space left on device" in out.out, n
            n += 1
            continue
        assert code == 1 and len(err) == 1 and "No space left on device" in err[0], (n, err)
        assert "Traceback" not in err[0]
        r = run_train(argv)  # space is back
        assert not r["stopped"] and len(r["history"]) == 2, n
        assert_same_weights(weights, load_weights_file(os.path.join(r["folder"], "last.pytar")))
        assert leftovers(save) == []
        n += 1
    assert n > 10  # every checkpoint and bookkeeping write was reached


def test_curves_that_cannot_be_drawn_are_skipped_with_a_warning(tmp_path, synthetic_dir, monkeypatch, capsys):
    import matplotlib.figure

    def broken(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken)
    r = run_train(argv_for(synthetic_dir, tmp_path, "--epochs", "1"))
    assert r["exit_code"] == 0
    assert "warning: curves.png not drawn" in capsys.readouterr().out


# ------------------------------------------------------------------ two processes, one run


def test_two_processes_on_one_run_the_second_gets_the_lock_message(tmp_path, synthetic_dir, capsys):
    save = tmp_path / "runs"
    slow = [*QUICK[:QUICK.index("--train-limit")], "--train-limit", "2000", *QUICK[QUICK.index("--train-limit") + 2:]]
    argv = [*slow, "--data_dir", synthetic_dir, "--save", str(save), "--resume", "auto"]
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *argv], cwd=ROOT, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while not (os.path.isdir(save) and run_folders(save)):
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
            time.sleep(0.1)
        with pytest.raises(SystemExit) as e:
            run_main(train_main, argv)
        assert e.value.code == 1   # the run is in use: a failure at run time
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"in use by process {proc.pid}" in err[0], err
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # The holder is gone (the kernel dropped its lock): the same command takes the run over.
    (folder,) = run_folders(save)
    r = run_train([*argv[:argv.index("--epochs")], "--epochs", "1", *argv[argv.index("--epochs") + 2:]])
    assert r["folder"] == folder and leftovers(folder) == []


# ------------------------------------------------------------------ damage and odd input


def flip_tensor_bytes(path):
    """Flip bytes in the middle of the largest tensor record of a torch.save zip, in place."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + info.file_size // 2)
        chunk = f.read(8)
        f.seek(-8, 1)
        f.write(bytes(b ^ 0xFF for b in chunk))


def test_flipped_bytes_in_a_checkpoint_are_caught(tmp_path, synthetic_dir, capsys):
    r = run_train(argv_for(synthetic_dir, tmp_path, "--epochs", "1"))
    for name in ("last.pytar", "model_best.pytar"):
        path = os.path.join(r["folder"], name)
        flip_tensor_bytes(path)
        with pytest.raises(SystemExit):
            run_main(lambda argv: train_main(argv),
                     argv_for(synthetic_dir, tmp_path, "--epochs", "2", "--resume", path) if name == "last.pytar"
                     else [*QUICK[:6], "--label-refinery-model", "efficientnet_ex",
                           "--label-refinery-width-mult", "0.1", "--label-refinery-depth-mult", "0.1",
                           "--label-refinery-state-file", path, "--data_dir", synthetic_dir,
                           "--save", str(tmp_path / "other")])
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is damaged: its contents do not match their checksum" in err[0], err


def test_every_step_skipped_stops_the_run(tmp_path, synthetic_dir, capsys):
    # An LR of 1e30 sends the weights to infinity after the first step; every later loss is NaN.
    argv = argv_for(synthetic_dir, tmp_path, "--lr-regime", "1", "2", "1e30", "--nan-policy", "skip")
    with pytest.raises(SystemExit) as e:
        run_main(train_main, argv)
    assert e.value.code == 1   # diverged: a failure at run time
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "every step of epoch 2 had a non-finite loss" in err[0], err
    (folder,) = run_folders(tmp_path)
    assert json.load(open(os.path.join(folder, "status.json")))["next_epoch"] == 2


@pytest.mark.parametrize("flags,needle", [
    (["--seed", "99999999999999999999999"], "--seed: must be an integer in 0..2^63-1"),
    (["--seed", "-1"], "--seed: must be an integer in 0..2^63-1"),
    (["--width-mult", "inf"], "--width-mult: must be a finite number"),
    (["--depth-mult", "inf"], "--depth-mult: must be a finite number"),
    (["--width-mult", "100"], "--width-mult: must be a number in (0, 4]"),
    (["--s", "inf"], "--s: must be a finite number"),
    (["--m", "inf"], "--m: must be a finite number"),
    (["--m", "1e30"], "--m: must be a number in [0, 2]"),
    (["--lr-regime", "1", "1", "inf"], "learning rate inf must be positive and finite"),
    (["--lr-regime", "1", "1", "nan"], "learning rate nan must be positive and finite"),
    (["--momentum", "nan"], "--momentum: must be a finite number"),
])
def test_bad_numbers_are_one_line_errors(capsys, flags, needle):
    with pytest.raises(SystemExit) as e:
        run_main(train_main, [*flags, "--device", "cpu"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert needle in err[-1] and "Traceback" not in "\n".join(err), err


def test_non_finite_loss_message_names_only_what_exists(tmp_path, synthetic_dir, capsys):
    argv = argv_for(synthetic_dir, tmp_path, "--lr-regime", "1", "2", "1e30", "--amp", "off",
                    "--checkpoint-every", "100")
    with pytest.raises(SystemExit):
        run_main(train_main, argv)
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "non-finite loss in epoch 1" in line
    assert "no checkpoint was written yet" in line and "last.pytar" not in line
    assert "--amp off" not in line  # amp is already off


@pytest.mark.parametrize("phase", ["load_data", "report_teacher"])
def test_sigterm_during_start_up_stops_cleanly_and_leaves_no_run_folder(tmp_path, synthetic_dir, phase,
                                                                         monkeypatch, capsys):
    teacher = run_train(argv_for(synthetic_dir, tmp_path / "teacher", "--epochs", "1"))
    from engine.trainer import Trainer
    real = getattr(Trainer, phase)

    def signalled(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while start-up is in progress
        return real(*a, **k)
    monkeypatch.setattr(Trainer, phase, signalled)
    save = tmp_path / "runs"
    r = run_train(argv_for(synthetic_dir, save, "--label-refinery-model", "efficientnet_ex",
                           "--label-refinery-width-mult", "0.1", "--label-refinery-depth-mult", "0.1",
                           "--label-refinery-state-file", os.path.join(teacher["folder"], "model_best.pytar")))
    assert r["stopped"] and r["exit_code"] == 0 and r["history"] == []
    assert "before training began" in capsys.readouterr().out
    assert os.listdir(save) == []
