"""Scale-out and faults: torchrun with gloo, SIGTERM/SIGINT/SIGKILL and resume (bit-exact with dropout,
drop-connect and the original's augmentation, on one rank and on two), divergence, bad files."""
import copy
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

import models
from micronet_cifar100.cli.errors import message
from micronet_cifar100.cli.train_flags import parse_config
from conftest import ROOT, TINY, assert_same_weights, load_weights_file, run_train
from engine import checkpoint, speed
from micronet_cifar100.errors import ToolkitError as UserError

# One torch thread here and in every subprocess (start() and torchrun() pass it on): the tiny
# models run faster so, and a run resumed in this process matches a subprocess's bit for bit.
pytestmark = pytest.mark.usefixtures("one_thread")

QUICK = [*TINY, "--train-limit", "480", "--test-limit", "200", "--batch-size", "32", "--aug", "standard",
         "--lr-regime", "1", "3", "0.05", "--bn-momentum", "0.1", "--no-progress"]

# Every random stream of a run matters here: a narrow b0 with its dropout (plain head) and
# drop-connect (depth 0.34 keeps residual blocks, where drop-connect lives), and the original's
# augmentation (three copies, random crops, jitter and flips). 96 images x 3 copies: 9 steps of 32.
RANDOM_B0 = ["--model", "efficientnet_b0", "--width-mult", "0.25", "--depth-mult", "0.34", "--coslinear", "false",
             "--train-limit", "96", "--test-limit", "100", "--batch-size", "32", "--aug", "uci",
             "--lr-regime", "1", "2", "0.05", "--bn-momentum", "0.1", "--no-progress"]


def test_random_b0_is_random_in_training():
    """The premise of the bit-exact tests below: RANDOM_B0's model draws random numbers in training
    (two training forwards of one batch differ), and only there."""
    net = models.create("efficientnet_b0", head="linear", width_mult=0.25, depth_mult=0.34)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.manual_seed(1)
        a = net(x)
        torch.manual_seed(2)
        b = net(x)
        net.eval()
        assert torch.equal(net(x), net(x))
    assert not torch.equal(a, b)
    # Without dropout, drop-connect alone still draws.
    net = models.create("efficientnet_b0", head="linear", width_mult=0.25, depth_mult=0.34, dropout=0.0)
    with torch.no_grad():
        torch.manual_seed(1)
        a = net(x)
        torch.manual_seed(2)
        assert not torch.equal(a, net(x))


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
def reference(tmp_path_factory, synthetic_dir, one_thread):
    """An uninterrupted 2-epoch run (checkpointing mid-epoch too, which must not change the result)."""
    save = tmp_path_factory.mktemp("reference")
    r = run_train([*QUICK, "--data_dir", synthetic_dir, "--save", str(save), "--epochs", "2"])
    return load_weights_file(os.path.join(r["folder"], "last.pytar"))


@pytest.mark.slow
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
    r = run_train([*map(str, argv), *extra, "--resume", "auto"])
    assert r["folder"] == folder
    assert_same_weights(reference, load_weights_file(os.path.join(folder, "last.pytar")))


@pytest.mark.slow
def test_sigkill_mid_epoch_with_dropout_drop_connect_and_uci_augmentation_resumes_bit_exact(tmp_path, synthetic_dir):
    """Killed in the middle of an epoch, after a mid-epoch checkpoint: --resume auto restores the
    saved RNG state, so the dropout and drop-connect masks after the kill are those of the
    uninterrupted run, and so are the final weights and the epoch's training loss."""
    argv = [*RANDOM_B0, "--data_dir", synthetic_dir, "--epochs", "1", "--checkpoint-every", "3"]
    ref = run_train([*argv, "--save", str(tmp_path / "reference")])
    save = tmp_path / "runs"
    proc = start([*argv, "--save", save])
    folder, _ = wait_for_status(str(save), lambda s: s["next_step"] >= 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = torch.load(os.path.join(folder, "last.pytar"), weights_only=True)
    assert saved["train"]["next_epoch"] == 1 and saved["train"]["next_step"] in (3, 6)
    assert saved["train"]["partial"]["rng"]  # a mid-epoch state, with the RNG to continue from
    r = run_train([*argv, "--save", str(save), "--resume", "auto"])
    assert r["folder"] == folder and [h["epoch"] for h in r["history"]] == [1]
    assert_same_weights(load_weights_file(os.path.join(ref["folder"], "last.pytar")),
                        load_weights_file(os.path.join(folder, "last.pytar")))
    assert r["history"][0]["train_loss"] == ref["history"][0]["train_loss"]


@pytest.mark.slow
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


# train.py, with every training evaluation announced on stdout, and the $EVAL_PAUSE_AT-th one held
# for $EVAL_PAUSE_S seconds: a signal sent after that announcement arrives at a known point of the run.
PAUSED_EVAL = """
import os, runpy, sys, time
import engine.evaluate
real, count = engine.evaluate.evaluate, [0]
def paused(*a, **k):
    count[0] += 1
    print("EVALUATING", flush=True)
    if count[0] == int(os.environ["EVAL_PAUSE_AT"]):
        time.sleep(float(os.environ["EVAL_PAUSE_S"]))
    return real(*a, **k)
engine.evaluate.evaluate = paused
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def start_paused(argv, pause_at, pause_s):
    e = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(torch.get_num_threads()),
             EVAL_PAUSE_AT=str(pause_at), EVAL_PAUSE_S=str(pause_s))
    return subprocess.Popen([sys.executable, "-c", PAUSED_EVAL, os.path.join(ROOT, "train.py"), *map(str, argv)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e)


def wait_for_evaluation(proc, nth=1):
    """Read the run's output until its nth evaluation starts; returns what was read."""
    seen, lines = 0, []
    while seen < nth:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError("the run ended before evaluating:\n" + "".join(lines) + proc.stderr.read())
        lines.append(line)
        seen += line.strip() == "EVALUATING"
    return "".join(lines)


@pytest.mark.slow
def test_sigint_stops_at_the_epoch_end_and_exits_130(tmp_path, synthetic_dir):
    """Ctrl-C during epoch 1's evaluation: the epoch is saved, the resume command printed, exit 130."""
    save = tmp_path / "runs"
    proc = start_paused([*QUICK, "--train-limit", "96", "--data_dir", synthetic_dir, "--save", save,
                         "--epochs", "2"], pause_at=1, pause_s=1)
    before = wait_for_evaluation(proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, before + out + err
    assert "Traceback" not in err and "EVALUATING" not in out  # epoch 2 never started
    assert "stopped by signal 2" in out
    m = re.search(r"resume with: (.*)", out)
    cmd = shlex.split(m.group(1))
    assert cmd[:2] == ["python", "train.py"] and cmd[-2] == "--resume"
    state = checkpoint.load_file(cmd[-1])
    assert state["train"]["next_epoch"] == 2 and state["train"]["partial"] is None
    assert [h["epoch"] for h in state["history"]] == [1]


@pytest.mark.slow
def test_second_ctrl_c_exits_at_once_with_one_line(tmp_path, synthetic_dir):
    """A second Ctrl-C while the first is being honoured (here: during epoch 2's evaluation, held
    for a minute) exits at once with code 130, one line on stderr and no traceback; the last
    checkpoint written (epoch 1's) is intact and resumable."""
    save = tmp_path / "runs"
    argv = [*QUICK, "--train-limit", "96", "--data_dir", synthetic_dir, "--save", save, "--epochs", "3"]
    proc = start_paused(argv, pause_at=2, pause_s=60)
    wait_for_evaluation(proc, nth=2)
    t0 = time.time()
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and time.time() - t0 < 30, (out, err)
    assert err.strip().splitlines() == ["interrupted again: exiting now; the last checkpoint written is intact"]
    (folder,) = [os.path.join(save, d) for d in os.listdir(save)]
    assert not [f for f in os.listdir(folder) if f.startswith(".tmp-")]
    state = checkpoint.load_file(os.path.join(folder, "last.pytar"))  # verifies its checksum
    assert state["train"]["next_epoch"] == 2 and not state["finished"]
    r = run_train([*map(str, argv), "--epochs", "2", "--resume", "auto"])
    assert r["folder"] == folder and [h["epoch"] for h in r["history"]] == [1, 2]


def torchrun(nproc, argv, timeout=600, script="train.py"):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.join(ROOT, script), *map(str, argv)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))


def children(pid):
    """The process ids whose parent is pid (torchrun starts its workers in sessions of their own)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


@pytest.mark.slow
def test_torchrun_two_ranks_killed_mid_epoch_resume_on_two_ranks_bit_exact(tmp_path, synthetic_dir):
    """2 ranks -> SIGKILL mid-epoch -> 2 ranks with --resume auto: each rank continues its own RNG
    streams (dropout, drop-connect) from the checkpoint, so the weights are the uninterrupted
    run's bit for bit. With --lr-scale none the regime's LR is used as given."""
    argv = [*RANDOM_B0, "--train-limit", "96", "--batch-size", "16", "--lr-scale", "none", "--device", "cpu",
            "--data_dir", synthetic_dir, "--epochs", "1", "--checkpoint-every", "3"]
    ref = torchrun(2, [*argv, "--save", tmp_path / "reference"])
    assert ref.returncode == 0, ref.stdout + ref.stderr
    (ref_folder,) = (tmp_path / "reference").iterdir()
    ref_state = torch.load(ref_folder / "last.pytar", weights_only=True)
    # 96 images x 3 copies / 2 ranks / 16: 9 steps; the LR is the regime's 0.05, not 2 x 0.05.
    assert ref_state["optimizer"]["param_groups"][0]["lr"] == 0.05
    save = tmp_path / "runs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train.py"), *map(str, [*argv, "--save", save])]
    agent = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))
    try:
        folder, _ = wait_for_status(str(save), lambda s: s["next_step"] >= 3, agent)
    finally:
        for pid in children(agent.pid) + [agent.pid]:
            os.kill(pid, signal.SIGKILL)
        agent.communicate()
    saved = torch.load(os.path.join(folder, "last.pytar"), weights_only=True)
    assert saved["train"]["world_size"] == 2 and saved["train"]["next_step"] in (3, 6)
    assert len(saved["train"]["partial"]["rng"]) == 2  # one RNG state per rank
    p = torchrun(2, [*argv, "--save", save, "--resume", "auto"])
    assert p.returncode == 0, p.stdout + p.stderr
    assert "resuming" in p.stdout and "weights identical on all 2 ranks" in p.stdout
    assert_same_weights(ref_state["model"], load_weights_file(os.path.join(folder, "last.pytar")))


@pytest.mark.slow
def test_nan_policy_skip_under_torchrun_skips_the_step_on_every_rank(tmp_path, synthetic_dir):
    """Rank 1 alone gets a non-finite loss at its second step (tests/poisoned_rank.py): every rank
    must skip that step, and the run end with the same weights on both ranks."""
    argv = [*TINY, "--train-limit", "64", "--test-limit", "50", "--batch-size", "16", "--aug", "none",
            "--lr-regime", "1", "1", "0.05", "--no-progress", "--nan-policy", "skip", "--epochs", "1",
            "--device", "cpu", "--data_dir", synthetic_dir, "--save", tmp_path]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "tests", "poisoned_rank.py"), *map(str, argv)]
    agent = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", POISON_RANK="1",
                                      POISON_STEP="2"))
    try:
        out, _ = agent.communicate(timeout=60)  # two steps a rank: seconds when nothing hangs
    except subprocess.TimeoutExpired:
        for pid in children(agent.pid) + [agent.pid]:
            os.kill(pid, signal.SIGKILL)
        out, _ = agent.communicate()
        pytest.fail("the two ranks hung after rank 1 skipped a step:\n" + out[-3000:])
    assert agent.returncode == 0, out
    assert "weights identical on all 2 ranks" in out and "skipped" in out, out


@pytest.mark.slow
def test_torchrun_two_processes_gloo(tmp_path, synthetic_dir):
    save = tmp_path / "ddp"
    argv = [*TINY, "--data_dir", synthetic_dir, "--no-download", "--train-limit", "600", "--test-limit", "333",
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
    r = run_train([*map(str, argv), "--epochs", "2", "--resume", folder])
    assert len(r["history"]) == 2 and r["folder"] == folder


def test_sync_bn_on_cpu_ranks_is_a_clear_error():
    from engine.distributed import Context
    from engine.trainer import Trainer
    trainer = Trainer(parse_config([*TINY, "--sync-bn"]), Context(rank=0, world_size=2))
    trainer.speed = speed.of_config(trainer.cfg, torch.device("cpu"))
    with pytest.raises(UserError) as e:
        trainer.build_model()
    # As the command line prints it: the flag, then the problem.
    assert message(e.value).startswith("--sync-bn: synchronised BatchNorm needs CUDA devices")


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, synthetic_dir):
    argv = [*QUICK[:-7], "--lr-regime", "1", "1", "0.05", "2", "2", "1e30", "--bn-momentum", "0.1",
            "--no-progress", "--data_dir", synthetic_dir, "--save", str(tmp_path), "--epochs", "2"]
    with pytest.raises(UserError, match=r"non-finite loss in epoch 2 at step \d+ of 15"):
        run_train(argv)
    folder = str(next(tmp_path.iterdir()))
    state = torch.load(os.path.join(folder, "last.pytar"), weights_only=True)
    assert state["train"]["next_epoch"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    r = run_train([*argv, "--nan-policy", "skip", "--save", str(tmp_path / "skip")])
    assert len(r["history"]) == 2
    assert "skipped" in open(os.path.join(r["folder"], "log.txt")).read()


@pytest.mark.slow
def test_nan_policy_skip_leaves_the_model_exactly_as_before(tmp_path, synthetic_dir, monkeypatch):
    """Steps 1 (inf) and 4 (NaN) of six get a non-finite loss. Under --nan-policy skip, each of
    them leaves every parameter, every BatchNorm buffer (statistics and batch count: the model is
    exactly as before the forward pass), the optimizer state and the epoch's figures unchanged;
    the other steps change all of those."""
    poison = {1: float("inf"), 4: float("nan")}
    calls = []

    from engine import trainer
    class PoisonedLabels(trainer.HardLabels):
        def __call__(self, out, x, y):
            loss, teacher = super().__call__(out, x, y)
            calls.append(len(calls) + 1)
            return (loss + poison[calls[-1]] if calls[-1] in poison else loss), teacher

    seen = []
    real_step = trainer.train_step

    def watched_step(parts, x, y, meter):
        before = (copy.deepcopy(parts.model.state_dict()), copy.deepcopy(parts.optimizer.state_dict()),
                  meter.state().clone())
        finite = real_step(parts, x, y, meter)
        model, opt = parts.model.state_dict(), parts.optimizer.state_dict()
        seen.append({"finite": bool(finite),
                     "changed": sorted(k for k in model if not torch.equal(model[k], before[0][k])),
                     "optimizer_same": opt["state"].keys() == before[1]["state"].keys() and all(
                         torch.equal(opt["state"][i]["momentum_buffer"], before[1]["state"][i]["momentum_buffer"])
                         for i in opt["state"]),
                     "meter_same": torch.equal(meter.state(), before[2])})
        return finite

    monkeypatch.setattr(trainer, "HardLabels", PoisonedLabels)
    monkeypatch.setattr(trainer, "train_step", watched_step)
    r = run_train([*TINY, "--train-limit", "192", "--test-limit", "100", "--batch-size", "32", "--aug", "none",
                   "--lr-regime", "1", "1", "0.05", "--no-progress", "--nan-policy", "skip", "--epochs", "1",
                   "--data_dir", synthetic_dir, "--save", str(tmp_path)])
    assert [s["finite"] for s in seen] == [False, True, True, False, True, True]
    keys = models.create("efficientnet_ex", width_mult=0.25, depth_mult=0.2).state_dict().keys()
    for step, s in enumerate(seen, 1):
        if s["finite"]:
            # Every parameter and buffer moves (running statistics, batch counts, weights).
            assert set(s["changed"]) == set(keys) and not s["optimizer_same"] and not s["meter_same"], step
        else:
            assert s["changed"] == [] and s["optimizer_same"] and s["meter_same"], (step, s["changed"][:3])
    # Skipped steps are not metered: the epoch's figures count the 4 x 32 images of the others.
    assert "epoch 1: skipped 2 steps with a non-finite loss" in open(os.path.join(r["folder"], "log.txt")).read()
    state = torch.load(os.path.join(r["folder"], "last.pytar"), weights_only=True)
    assert int(state["model"]["features.0.2.num_batches_tracked"]) == 4


@pytest.mark.slow
def test_truncated_resume_file_is_reported(tmp_path, synthetic_dir):
    r = run_train([*QUICK, "--data_dir", synthetic_dir, "--save", str(tmp_path), "--epochs", "1"])
    last = os.path.join(r["folder"], "last.pytar")
    data = open(last, "rb").read()
    open(last, "wb").write(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        run_train([*QUICK, "--data_dir", synthetic_dir, "--save", str(tmp_path), "--epochs", "2",
                   "--resume", r["folder"]])


def test_full_disk_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "last.pytar"
    checkpoint.save_atomic({"a": torch.ones(3)}, str(path))

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(UserError) as e:
        checkpoint.save_atomic({"a": torch.zeros(3)}, str(path))
    assert "No space left on device; free disk space" in message(e.value)  # as the command line prints it
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(3))
    assert os.listdir(tmp_path) == ["last.pytar"]  # no temporary file left behind


@pytest.mark.slow
def test_memory_does_not_grow_across_epochs(tmp_path, synthetic_dir):
    def rss_mb():
        with open("/proc/self/status") as f:
            return int(next(l for l in f if l.startswith("VmRSS")).split()[1]) / 1024
    seen = []
    run_train([*TINY, "--train-limit", "64", "--test-limit", "64", "--batch-size", "32", "--aug", "seed",
               "--lr-regime", "1", "12", "0.05", "--no-progress", "--keep-epoch-states", "false",
               "--data_dir", synthetic_dir, "--save", str(tmp_path), "--epochs", "12"],
              on_epoch=lambda row: seen.append(rss_mb()))
    assert len(seen) == 12
    # After warm-up, twelve epochs must not keep adding memory (a leak adds per epoch).
    assert seen[-1] - seen[3] < 40, seen


@pytest.mark.slow
def test_chain_under_torchrun(tmp_path, synthetic_dir):
    """chain.py launched by torchrun: every stage and the final evaluation run on both ranks."""
    save = tmp_path / "chain"
    p = torchrun(2, ["--stages", "efficientnet_ex,efficientnet_exx", "--data_dir", synthetic_dir, "--no-download",
                     "--save", save, "--epochs", "1", "--width-mult", "0.25", "--depth-mult", "0.2",
                     "--train-limit", "400", "--test-limit", "201", "--aug", "none", "--batch-size", "25",
                     "--device", "cpu", "--no-progress"], script="chain.py")
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("weights identical on all 2 ranks") == 2
    report = json.load(open(save / "chain_report.json"))
    assert [s["model"] for s in report["stages"]] == ["efficientnet_ex", "efficientnet_exx"]
    assert report["final"]["total"] == 201  # the two ranks' uneven shards, each image once
