"""Crash consistency: no kill, full disk or second process loses or wedges a run or a chain.

Kills are simulated at every rename of a run's bookkeeping, and at file-system events drawn over a whole
chain (tests/killer/sitecustomize.py: os._exit just before or just after it, so no cleanup runs, as
with SIGKILL); full disks by making the N-th file write or file creation fail with ENOSPC. After
each, the same command again must complete with the weights of an uninterrupted run, bit for bit,
without training any epoch or stage twice, and leave nothing else behind: one folder per run or
stage, no temporary, no weights file that no commit covers."""
import contextlib
import errno
import io
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import zipfile

import pytest
import torch

import chain
from micronet_cifar100 import errors
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


def start_killed_run(script, argv, **kill):
    """killed_run, started in the background (Popen; its output is read with communicate())."""
    return subprocess.Popen([sys.executable, os.path.join(ROOT, script), *map(str, argv)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
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
        # Nothing else either: no folder of an abandoned start, no temporary at any level.
        assert os.listdir(save) == [os.path.basename(r["folder"])], f"{when}: {os.listdir(save)}"
        assert_same_weights(weights, load_weights_file(os.path.join(r["folder"], "last.pytar")))
        status = json.load(open(os.path.join(r["folder"], "status.json")))
        assert status["finished"] and status["next_epoch"] == 3
        assert len(open(os.path.join(r["folder"], "metrics.csv")).read().splitlines()) == 3
        assert temporaries(save) == [], when
        assert uncommitted_weights(r["folder"]) == [], when
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


def test_a_run_killed_before_its_first_commit_starts_over_in_its_own_folder(tmp_path, synthetic_dir, capsys):
    """Killed while writing its first last.pytar, a run leaves a folder with args.json, log.txt and a
    .tmp-*.part: --resume auto reuses it, says so in one line, and leaves no temporary behind."""
    argv = argv_for(synthetic_dir, tmp_path / "runs", "--epochs", "1", "--resume", "auto")
    p = killed_run("train.py", argv, KILL_FILE="last.pytar", KILL_NTH=1, KILL_WHEN="before")
    assert p.returncode == 137, p.stdout + p.stderr
    (name,) = os.listdir(tmp_path / "runs")
    folder = str(tmp_path / "runs" / name)
    assert {"args.json", "log.txt"} <= set(os.listdir(folder)) and temporaries(folder)
    assert not os.path.exists(os.path.join(folder, "last.pytar"))
    capsys.readouterr()
    r = run_train(argv)
    said = [line for line in capsys.readouterr().out.splitlines() if "reusing" in line]
    assert said == [f"--resume auto: reusing {folder}, a run of these arguments stopped before its first commit "
                    "(no last.pytar); it starts over there"]
    assert r["folder"] == folder and [row["epoch"] for row in r["history"]] == [1]
    assert os.listdir(tmp_path / "runs") == [name] and temporaries(tmp_path / "runs") == []
    # A folder that holds neither last.pytar nor args.json is no run: refused, and left as it was.
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    with pytest.raises(SystemExit) as e:
        run_main(train_main, argv_for(synthetic_dir, tmp_path / "runs", "--resume", str(stranger)))
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds neither last.pytar nor a readable args.json" in err[0], err
    assert os.listdir(stranger) == []


def test_leftovers_are_removed_only_where_no_live_process_writes(tmp_path):
    """A run folder's temporaries go unless a live run holds it; the save root's (files, and folders
    that were being made) unless a live process is writing there."""
    from engine import run_folder
    idle, busy = tmp_path / "idle_run", tmp_path / "busy_run"
    for folder in (idle, busy):
        folder.mkdir()
        (folder / ".lock").touch()
        (folder / ".tmp-a.part").write_text("half")
    (tmp_path / ".tmp-b.part").write_text("half")
    (tmp_path / ".tmp-c").mkdir()  # a run folder that was being made
    (tmp_path / ".tmp-c" / "args.json").write_text("{}")
    with run_folder.RunLock() as lock:
        lock.acquire(str(busy))  # a live run: its temporaries are its own
        with run_folder.root_writes(str(tmp_path)):  # a live process writing at the root
            run_folder.remove_leftovers(str(tmp_path))
        assert sorted(os.listdir(tmp_path)) == [".tmp-b.part", ".tmp-c", "busy_run", "idle_run"]
        assert temporaries(idle) == [] and temporaries(busy) == [".tmp-a.part"]
        run_folder.remove_leftovers(str(tmp_path))
        assert sorted(os.listdir(tmp_path)) == ["busy_run", "idle_run"]
        assert temporaries(busy) == [".tmp-a.part"]
    run_folder.remove_leftovers(str(tmp_path))
    assert temporaries(tmp_path) == []


# ------------------------------------------------------------------ chains

# The tiniest chain: two stages of one epoch, two steps each.
TINY_CHAIN = ["--stages", "efficientnet_ex,efficientnet_ex", "--width-mult", "0.1", "--depth-mult", "0.1",
              "--train-limit", "64", "--test-limit", "32", "--batch-size", "32", "--aug", "none", "--epochs", "1",
              "--no-progress"]
# Kill points of the randomised test: one drawn from each of RANDOM_KILLS equal slices of the
# uninterrupted chain's file-system events, with this seed.
RANDOM_KILLS, KILL_SEED = 20, 22


def chain_argv(data_dir, save):
    return [*TINY_CHAIN, "--data_dir", data_dir, "--save", str(save)]


@contextlib.contextmanager
def one_torch_thread():
    """The chains' tests run on one thread, here and in their subprocesses (env() passes the count
    on): a tiny model's steps gain nothing from a second one, and two processes that each spin two
    OpenMP threads on two cores run several times slower than on one each."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def chain_threads():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def chain_reference(tmp_path_factory, synthetic_dir):
    """The uninterrupted tiny chain: its stages (chain_state.json), and in order the names of its
    renames and its file-system events (tests/killer/sitecustomize.py)."""
    tmp = tmp_path_factory.mktemp("chain_ref")
    save = tmp / "chain"
    with one_torch_thread():
        p = killed_run("chain.py", chain_argv(synthetic_dir, save), KILL_LOG=tmp / "renames.txt", KILL_ROOT=save,
                       KILL_EVENTS=tmp / "events.txt")
    assert p.returncode == 0, p.stdout + p.stderr
    stages = json.load(open(save / "chain_state.json"))["stages"]
    # Events name the reference's folders; the stages' order is what a reader needs.
    events = (tmp / "events.txt").read_text()
    for i, stage in enumerate(stages, 1):
        events = events.replace(os.path.basename(stage["folder"]), f"<stage {i}>")
    return {"save": save, "stages": stages, "names": (tmp / "renames.txt").read_text().split(),
            "events": events.splitlines()}


def chain_differences(stages, reference):
    """The weights files of a finished chain's stages that differ from the reference chain's."""
    different = []
    for i, (got, want) in enumerate(zip(stages, reference), 1):
        for name in ("model_best.pytar", "last.pytar"):
            a = load_weights_file(os.path.join(want["folder"], name))
            b = load_weights_file(os.path.join(got["folder"], name))
            if a.keys() != b.keys() or any(not torch.equal(a[k], b[k]) for k in a):
                different.append(f"stage {i} {name}")
    return different


def test_a_kill_around_the_chain_bookkeeping_never_trains_a_stage_twice(tmp_path, synthetic_dir, chain_reference,
                                                                        chain_threads):
    names = chain_reference["names"]
    # Stage 1's commit point, the chain's record that stage 1 finished, and stage 2's first write.
    stage1_commit = names.index("last.pytar")
    points = [("last.pytar", 1), ("chain_state.json", names[:names.index("chain_state.json", stage1_commit)]
                                  .count("chain_state.json") + 1), ("args.json", 2)]
    for name, nth in points:
        for when in ("before", "after"):
            save = tmp_path / f"{when}-{name}-{nth}"
            p = killed_run("chain.py", chain_argv(synthetic_dir, save), KILL_FILE=name, KILL_NTH=nth,
                           KILL_WHEN=when)
            assert p.returncode == 137, f"{name}#{nth} {when}\n{p.stdout}{p.stderr}"
            # Stage 1 trained, so the chain had recorded its folder; the rerun keeps every recorded one.
            recorded = [s["folder"] for s in json.load(open(save / "chain_state.json"))["stages"]]
            assert os.path.isdir(recorded[0]), f"{name}#{nth} {when}"
            with contextlib.redirect_stdout(io.StringIO()):
                assert chain.main(chain_argv(synthetic_dir, save)) == 0
            stages = json.load(open(save / "chain_state.json"))["stages"]
            assert [s["folder"] for s in stages][:len(recorded)] == recorded, f"{name}#{nth} {when}"
            assert what_is_left(save, [s["folder"] for s in stages]) == [], f"{name}#{nth} {when}"
            assert chain_differences(stages, chain_reference["stages"]) == [], f"{name}#{nth} {when}"


# ------------------------------------------------------------------ randomised kills


def kill_points(n_events, n, seed):
    """n event numbers in 1..n_events, one drawn from each of n equal slices, so that they spread over
    the whole run."""
    rng = random.Random(seed)
    edges = [1 + round(i * n_events / n) for i in range(n + 1)]
    return [rng.randrange(lo, max(hi, lo + 1)) for lo, hi in zip(edges, edges[1:])]


def temporaries(save):
    """Every temporary file or folder under save, at any depth."""
    return sorted(os.path.relpath(os.path.join(b, n), save) for b, ds, fs in os.walk(save)
                  for n in ds + fs if n.startswith(".tmp-"))


def uncommitted_weights(folder):
    """Weights files that no commit covers: any without last.pytar; with it, a model_state_XX of an
    epoch not yet committed, or a model_best.pytar of another epoch than the committed best."""
    names = sorted(n for n in os.listdir(folder) if n.startswith("model_") and n.endswith(".pytar"))
    last = os.path.join(folder, "last.pytar")
    if not os.path.isfile(last):
        return names
    train = torch.load(last, map_location="cpu", weights_only=True)["train"]
    best = (train["best"] or {}).get("epoch")
    bad = [n for n in names if n.startswith("model_state_") and int(n[12:-6]) >= train["next_epoch"]]
    if "model_best.pytar" in names and torch.load(os.path.join(folder, "model_best.pytar"), map_location="cpu",
                                                  weights_only=True).get("epoch") != best:
        bad.append("model_best.pytar")
    return bad


def what_is_left(save, stage_folders):
    """What a finished chain left beside its stages' folders, one line each: folders that are no
    stage's, temporaries anywhere, weights files that no commit covers. Empty when clean."""
    lines = []
    for d in sorted(set(os.listdir(save)) - {os.path.basename(f) for f in stage_folders}):
        path = os.path.join(save, d)
        if os.path.isdir(path) and not d.startswith(".tmp-"):
            lines.append(f"orphan folder {d}: {', '.join(sorted(os.listdir(path))) or 'empty'}")
    lines += [f"temporary {t}" for t in temporaries(save)]
    for d in sorted(os.listdir(save)):
        path = os.path.join(save, d)
        if os.path.isdir(path) and not d.startswith(".tmp-"):
            lines += [f"uncommitted {d}/{n}" for n in uncommitted_weights(path)]
    return lines


def rerun_until_finished(argv, tries=3):
    """chain.main(argv) again until it finishes; returns the problems met (a failed or unfinished rerun
    is a finding to report with the others, not the end of the test)."""
    for attempt in range(1, tries + 1):
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                if chain.main(argv) == 0:
                    return []
        except Exception as e:
            return [f"rerun {attempt} failed: {type(e).__name__}: {errors.first_line(e)}"]
    return [f"not finished after {tries} reruns"]


def test_a_chain_killed_at_random_file_system_events_finishes_clean_and_bit_exact(tmp_path, synthetic_dir,
                                                                                  chain_reference, chain_threads):
    """The tiny chain killed at the K-th file-system event (tests/killer: every folder made, file
    created, rename and removal under its --save), for RANDOM_KILLS values of K spread over the whole
    chain, then run again until it finishes: its weights equal the uninterrupted chain's bit for bit,
    and it leaves one folder per stage, no temporary, and no weights file that no commit covers."""
    t0 = time.perf_counter()
    events, reference = chain_reference["events"], chain_reference["stages"]
    assert what_is_left(chain_reference["save"], [s["folder"] for s in reference]) == []
    points = kill_points(len(events), RANDOM_KILLS, KILL_SEED)
    print(f"\n{len(events)} events in the uninterrupted chain; kill points (seed {KILL_SEED}): {points}")
    failures = []

    def start(k):
        return start_killed_run("chain.py", chain_argv(synthetic_dir, tmp_path / f"kill-{k}"),
                                KILL_ROOT=tmp_path / f"kill-{k}", KILL_EVENT=k)

    following = start(points[0])
    try:
        for i, k in enumerate(points):
            save, killed = tmp_path / f"kill-{k}", following
            output = killed.communicate(timeout=600)[0]
            # The next point's killed run goes on beside this point's reruns: each is mostly one core's
            # Python, so the two share a two-core machine well, and neither writes where the other reads.
            following = start(points[i + 1]) if i + 1 < len(points) else None
            where = f"before event {events[k - 1]}"
            assert killed.returncode == 137, f"{where}: the kill did not happen\n{output}"
            problems = rerun_until_finished(chain_argv(synthetic_dir, save))
            if not problems:
                stages = json.load(open(save / "chain_state.json"))["stages"]
                assert [s["finished"] for s in stages] == [True, True], where
                problems += what_is_left(save, [s["folder"] for s in stages])
                problems += [f"{d} differs from the uninterrupted chain's"
                             for d in chain_differences(stages, reference)]
            print(f"kill {where}: {'; '.join(problems) or 'clean'}")
            failures += [f"kill {where}: {line}" for line in problems]
    finally:
        if following is not None:
            following.kill()
            following.communicate()
    print(f"{len(points)} kill points in {time.perf_counter() - t0:.0f} s")
    assert failures == [], "\n".join(failures)


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
