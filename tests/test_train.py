"""train.py and test.py end to end: run folders, metrics, resume equivalence, the best checkpoint,
the flags that change what a run computes (head, label smoothing, epoch files, speed switches), the
original's checkpoint layout, and the one-line errors for bad input."""
import csv
import json
import os
import pickle

import pytest
import torch
import torch.nn.functional as F

import models
import test as test_script
import torchscope
from micronet_cifar100.cli.errors import run_main
from micronet_cifar100.cli.train_flags import parse_config
from conftest import TINY, assert_same_weights, first_test_images, load_model, load_weights_file, run_train, train_main
from engine import checkpoint
from micronet_cifar100.errors import ToolkitError as UserError
from engine.optim import lr_at, parse_regime

# The tensors of the tiny models are too small to share between cores: one thread is faster, and the
# same in every run (the bit-exact comparisons need the same reduction order).
pytestmark = pytest.mark.usefixtures("one_thread")

QUICK = [*TINY, "--train-limit", "640", "--test-limit", "300", "--batch-size", "32", "--aug", "none",
         "--lr-regime", "1", "3", "0.05", "--bn-momentum", "0.1", "--no-progress"]


def one_run(tmp_path, data_dir, *extra, save="runs"):
    return run_train([*QUICK, "--data_dir", data_dir, "--save", str(tmp_path / save), *extra])


def final_weights(result):
    return load_weights_file(os.path.join(result["folder"], "last.pytar"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synthetic_dir, one_thread):
    """One epoch of QUICK: a trained run for the tests that evaluate its checkpoints."""
    return run_train([*QUICK, "--data_dir", synthetic_dir, "--save", str(tmp_path_factory.mktemp("trained")),
                      "--epochs", "1"])


# ------------------------------------------------------------------ LR regime

def test_regime_parsing_and_lookup():
    r = parse_regime(["1", "25", "0.07", "26", "50", "0.007"])
    assert r == ((1, 25, 0.07), (26, 50, 0.007))
    assert lr_at(r, 1) == lr_at(r, 25) == 0.07 and lr_at(r, 26) == 0.007 and lr_at(r, 99) == 0.007
    assert parse_regime("1 2 0.1, 3 4 0.01") == ((1, 2, 0.1), (3, 4, 0.01))


@pytest.mark.parametrize("tokens,needle", [
    (["1", "25"], "multiple of 3"),
    (["1", "25", "x"], "not 'int int float'"),
    (["2", "25", "0.1"], "should start at epoch 1"),
    (["1", "10", "0.1", "12", "20", "0.01"], "should start at epoch 11"),
    (["1", "10", "-0.1"], "must be positive"),
])
def test_regime_errors(tokens, needle):
    with pytest.raises(UserError, match=needle):
        parse_regime(tokens)


def test_default_regimes_follow_the_original():
    a = parse_config(["--model", "efficientnet_b3"])
    b = parse_config(["--model", "efficientnet_ex"])
    assert a.lr_regime == "1 25 0.07 26 50 0.007 51 65 0.0007 66 70 7e-05"
    assert b.lr_regime.endswith("66 75 7e-05")
    assert a.batch_size == 128 and a.momentum == 0.9 and a.weight_decay == 1e-4
    assert a.s == 5.0 and a.m == 0.0 and a.coslinear is True
    assert parse_config(["--coslinear", "False"]).coslinear is False  # the original's bug


# ------------------------------------------------------------------ a whole run

@pytest.mark.slow
def test_end_to_end_on_synthetic_data(tmp_path, synthetic_dir):
    r = one_run(tmp_path, synthetic_dir, "--epochs", "2")
    folder = r["folder"]
    name = os.path.basename(folder)
    assert name.startswith("efficientnet_ex_cos_") and "_rfn" not in name
    for f in ("args.json", "log.txt", "metrics.csv", "curves.png", "model_state_01.pytar",
              "model_state_02.pytar", "model_best.pytar", "last.pytar", "status.json"):
        assert os.path.getsize(os.path.join(folder, f)) > 0, f
    rows = list(csv.DictReader(open(os.path.join(folder, "metrics.csv"))))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert set(rows[0]) == {"epoch", "lr", "train_loss", "train_top1", "test_loss", "test_top1",
                            "test_top5", "images_per_s", "seconds"}
    assert float(rows[1]["train_loss"]) < float(rows[0]["train_loss"])
    # Synthetic classes are colour patterns: two short epochs reach far above chance (1%).
    assert max(float(r["test_top1"]) for r in rows) > 10
    log = open(os.path.join(folder, "log.txt")).read()
    assert "epoch   1/2" in log and "epoch   2/2" in log and "done: best test top-1" in log
    args = json.load(open(os.path.join(folder, "args.json")))
    assert args["model"] == "efficientnet_ex" and args["width_mult"] == 0.25
    status = json.load(open(os.path.join(folder, "status.json")))
    assert status["finished"]
    assert status["best"]["top1"] == pytest.approx(max(float(r["test_top1"]) for r in rows), abs=1e-4)
    # model_state_XX is the original's bare state_dict; model_best carries what it is.
    bare = torch.load(os.path.join(folder, "model_state_02.pytar"), weights_only=True)
    assert checkpoint.is_state_dict(bare) and not any(k.startswith("module.") for k in bare)
    best = torch.load(os.path.join(folder, "model_best.pytar"), weights_only=True)
    assert best["arch"]["model"] == "efficientnet_ex" and best["test"]["top1"] == status["best"]["top1"]


@pytest.mark.slow
def test_test_py_reproduces_logged_accuracy(trained, tmp_path, synthetic_dir, capsys):
    best = trained["best"]
    out_json = tmp_path / "test.json"
    for ckpt in ("model_best.pytar", "last.pytar", "model_state_01.pytar"):
        assert test_script.main([*TINY, "--data_dir", synthetic_dir, "--test-limit", "300",
                                 "--model-state-file", os.path.join(trained["folder"], ckpt),
                                 "--json", str(out_json)]) == 0
        got = json.load(open(out_json))
        assert got["top1"] == pytest.approx(best["top1"], abs=1e-9)
        assert got["correct"] == best["correct"] and got["total"] == 300
    out = capsys.readouterr().out
    assert f"correct {best['correct']}/300" in out and "not judged on a 300-image subset" in out


@pytest.mark.slow
def test_tta_averages_flipped_predictions(trained, tmp_path, synthetic_dir, capsys):
    """test.py --tta gives the loss and accuracy of the average of the model's outputs on each image
    and on its mirror, computed here from the model; the plain evaluation gives other figures. The
    TTA accuracy is shown with the TTA score (two passes and the average), not the single-pass one."""
    path = os.path.join(trained["folder"], "model_best.pytar")
    figures = {}
    for tta in (False, True):
        out = tmp_path / f"tta-{tta}.json"
        assert test_script.main([*TINY, "--data_dir", synthetic_dir, "--test-limit", "300",
                                 "--model-state-file", path, "--json", str(out)] + (["--tta"] if tta else [])) == 0
        figures[tta] = json.load(open(out))
    net = load_model(path)
    x, y = first_test_images(synthetic_dir, 300)
    with torch.no_grad():
        plain, mirrored = net(x), net(x.flip(3))  # NCHW: dimension 3 is the width, a mirror image
    for tta, cos in ((False, plain), (True, (plain + mirrored) / 2)):
        got = figures[tta]
        assert got["tta"] is tta and got["total"] == 300
        assert got["correct"] == int((cos.argmax(1) == y).sum()), tta
        assert got["top1"] == pytest.approx(100 * got["correct"] / 300, abs=1e-9)
        assert got["loss"] == pytest.approx(F.cross_entropy(5.0 * cos, y).item(), rel=1e-5), tta
    # Each figure matches its own computation to 5e-5; the two are further apart than that
    # (seen: 3.4e-4 for this barely trained model).
    assert abs(figures[True]["loss"] - figures[False]["loss"]) > 2e-4, figures
    import torchscope
    tta_score = torchscope.count(net, rules="micronet", tta=True).score()["score"]
    assert figures[True]["tta_score"] == pytest.approx(tta_score, rel=1e-12) and "tta_score" not in figures[False]
    assert tta_score > 1.9 * torchscope.count(net, rules="micronet").score()["ops_term"]
    assert f"MicroNet score with TTA {tta_score:.6f} (count.py --rules micronet --tta)" in capsys.readouterr().out


@pytest.mark.slow
def test_resume_after_epoch_is_bit_identical(tmp_path, synthetic_dir):
    few = ["--train-limit", "96"]  # three steps an epoch: resume is as exact after three as after thirty
    full = one_run(tmp_path, synthetic_dir, *few, "--epochs", "2", save="full")
    part = one_run(tmp_path, synthetic_dir, *few, "--epochs", "1", save="part")
    resumed = one_run(tmp_path, synthetic_dir, *few, "--epochs", "2", "--resume", part["folder"], save="part")
    assert resumed["folder"] == part["folder"]
    assert_same_weights(final_weights(full), final_weights(resumed))
    rows = list(csv.DictReader(open(os.path.join(part["folder"], "metrics.csv"))))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    full_rows = list(csv.DictReader(open(os.path.join(full["folder"], "metrics.csv"))))
    assert [r["test_top1"] for r in rows] == [r["test_top1"] for r in full_rows]


# Runs whose training does not matter (folders, resume bookkeeping): three steps an epoch.
SHORT = ["--train-limit", "96"]


@pytest.mark.slow
def test_resume_auto_picks_the_unfinished_run_of_the_same_arguments(tmp_path, synthetic_dir, capsys):
    first = one_run(tmp_path, synthetic_dir, *SHORT, "--epochs", "1")
    # Mark it unfinished as a crash would leave it (status written before the last epoch ended).
    status_path = os.path.join(first["folder"], "status.json")
    status = json.load(open(status_path))
    status["finished"] = False
    json.dump(status, open(status_path, "w"))
    again = one_run(tmp_path, synthetic_dir, *SHORT, "--epochs", "2", "--resume", "auto")
    assert again["folder"] == first["folder"] and len(again["history"]) == 2
    other = one_run(tmp_path, synthetic_dir, *SHORT, "--epochs", "1", "--seed", "7", "--resume", "auto")
    assert other["folder"] != first["folder"]
    assert "no run of these arguments" in capsys.readouterr().out


@pytest.mark.slow
def test_resume_with_other_arguments_is_refused(tmp_path, synthetic_dir):
    r = one_run(tmp_path, synthetic_dir, *SHORT, "--epochs", "1")
    with pytest.raises(UserError, match=r"--seed 5 \(run: 0\)"):
        one_run(tmp_path, synthetic_dir, *SHORT, "--epochs", "2", "--resume", r["folder"], "--seed", "5")


@pytest.mark.slow
def test_new_runs_never_reuse_a_folder(tmp_path, synthetic_dir):
    a = one_run(tmp_path, synthetic_dir, *SHORT, "--epochs", "1")
    b = one_run(tmp_path, synthetic_dir, *SHORT, "--epochs", "1")
    assert a["folder"] != b["folder"]
    assert os.path.exists(os.path.join(a["folder"], "model_best.pytar"))


# ------------------------------------------------------------------ the original's layout

# Blocks per stage (SPEC's table after depth scaling); stage 1's blocks have expand ratio 1.
REPEATS = {"efficientnet_b0": (1, 2, 2, 3, 3, 4, 1), "efficientnet_b3": (2, 3, 3, 5, 5, 6, 2),
           "efficientnet_ex": (1, 2, 2, 3, 3, 4, 1), "efficientnet_exx": (1, 2, 2, 3, 3, 3, 1)}


def seed_layout_keys(model_name):
    """SPEC §6 key names, generated from the literal stage table alone (not from our modules)."""
    unit = lambda p: [f"{p}.1.weight"] + [f"{p}.2.{b}" for b in
                                          ("weight", "bias", "running_mean", "running_var",
                                           "num_batches_tracked")]
    keys = unit("features.0")
    repeats = REPEATS[model_name]
    expands = [1] * repeats[0] + [6] * sum(repeats[1:])
    for i, expand in enumerate(expands, start=1):
        j = 0
        if expand != 1:
            keys += unit(f"features.{i}.conv.0")
            j = 1
        keys += unit(f"features.{i}.conv.{j}")
        keys += [f"features.{i}.conv.{j + 1}.se.{a}.{b}" for a in (1, 3) for b in ("weight", "bias")]
        keys += [f"features.{i}.conv.{j + 2}.{b}" for b in ("weight", "bias")]
        keys += [f"features.{i}.conv.{j + 3}.{b}" for b in ("weight", "bias", "running_mean",
                                                            "running_var", "num_batches_tracked")]
    keys += unit(f"features.{len(expands) + 1}")
    keys += ["classifier.0.weight", "classifier.0.bias", "classifier.2.kernel"]
    return keys


def test_state_dict_keys_are_the_original_layout():
    keys = seed_layout_keys("efficientnet_ex")
    assert len(keys) == 377 and "features.17.1.weight" in keys
    with torch.device("meta"):  # key names only
        assert set(keys) == set(models.create("efficientnet_ex").state_dict())
        for name in models.names():
            assert set(seed_layout_keys(name)) == set(models.create(name).state_dict()), name


def test_original_checkpoint_loads_and_gives_the_same_outputs(tmp_path, synthetic_dir, capsys):
    torch.manual_seed(0)
    net = models.create("efficientnet_ex", width_mult=0.25, depth_mult=0.2).eval()
    # An original-format file: a bare state_dict, keys as the original wrote them, with the
    # `module.` prefix its DataParallel runs added.
    state = {f"module.{k}": v for k, v in net.state_dict().items()}
    path = tmp_path / "model_state_ex.pytar"
    torch.save(state, path)
    other = models.create("efficientnet_ex", width_mult=0.25, depth_mult=0.2).eval()
    checkpoint.load_weights(other, str(path))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(net(x), other(x))
    assert test_script.main([*TINY, "--data_dir", synthetic_dir, "--test-limit", "200",
                             "--model-state-file", str(path)]) == 0
    assert "correct" in capsys.readouterr().out


# ------------------------------------------------------------------ bad input

def expect_exit(capsys, fn, needle, code=2):
    """fn() exits with `code` (2: a usage error; 1: a failure at run time) and one line naming `needle`."""
    with pytest.raises(SystemExit) as e:
        fn()
    assert e.value.code == code
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "no error printed"
    assert "Traceback" not in "\n".join(err)
    assert needle in err[-1], err[-1]
    return err[-1]


def train_cli(*argv):
    return lambda: run_main(train_main, list(argv))


def test_cli_flag_errors(capsys, tmp_path):
    expect_exit(capsys, train_cli("--batch-size", "0"), "--batch-size")
    expect_exit(capsys, train_cli("--lr-regime", "1", "25"), "multiple of 3")
    expect_exit(capsys, train_cli("--model", "resnet"), "known models: efficientnet_b0")
    expect_exit(capsys, train_cli("--aug", "fancy"), "choose one of uci, standard, none")
    expect_exit(capsys, train_cli("--coslinear", "maybe"), "expected true or false")
    # A teacher's file is read for its architecture: a missing one is a failure at run time.
    expect_exit(capsys, train_cli("--label-refinery-state-file", "x.pytar"), "does not exist", code=1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_without_gpu(capsys, tmp_path):
    expect_exit(capsys, train_cli("--device", "cuda", "--save", str(tmp_path)), "no CUDA GPU")


def test_missing_data_folder(capsys, tmp_path):
    line = expect_exit(capsys, train_cli(*QUICK, "--data_dir", str(tmp_path / "nowhere"), "--no-download",
                                          "--save", str(tmp_path / "runs")), "nowhere", code=1)
    assert "--data_dir" in line
    assert not os.path.exists(tmp_path / "runs") or not os.listdir(tmp_path / "runs")


def test_corrupt_and_truncated_data_files(capsys, tmp_path, synthetic_dir):
    bad = tmp_path / "bad"
    (bad / "cifar-100-python").mkdir(parents=True)
    src = open(os.path.join(synthetic_dir, "cifar-100-python", "train"), "rb").read()
    (bad / "cifar-100-python" / "train").write_bytes(src[: len(src) // 3])
    (bad / "cifar-100-python" / "test").write_bytes(
        open(os.path.join(synthetic_dir, "cifar-100-python", "test"), "rb").read())
    expect_exit(capsys, train_cli(*QUICK, "--data_dir", str(bad), "--no-download", "--save",
                                   str(tmp_path / "runs")), "train", code=1)
    (bad / "cifar-100-python" / "train").write_bytes(b"this is not a pickle at all")
    expect_exit(capsys, train_cli(*QUICK, "--data_dir", str(bad), "--no-download", "--save",
                                   str(tmp_path / "runs")), "train", code=1)


@pytest.mark.slow
def test_checkpoint_errors_in_test_py(capsys, tmp_path, synthetic_dir):
    run = lambda path, *extra: (lambda: test_script.run_main(test_script.main, [
        *TINY, "--data_dir", synthetic_dir, "--model-state-file", str(path), *extra]))
    expect_exit(capsys, run(tmp_path / "missing.pytar"), "does not exist", code=1)
    junk = tmp_path / "junk.pytar"
    junk.write_bytes(b"\x00garbage" * 100)
    expect_exit(capsys, run(junk), "not a readable checkpoint", code=1)
    # A checkpoint of another model: the error names both architectures.
    b0 = tmp_path / "b0.pytar"
    torch.save(models.create("efficientnet_b0").state_dict(), b0)
    # The flags (--model efficientnet_ex, width 0.25) contradict what the file holds: refused, naming both.
    line = expect_exit(capsys, run(b0), "efficientnet_b0 (width 1, depth 1, cosine head)", code=2)
    assert line.startswith("error: --model: model efficientnet_ex contradicts")
    # Another width of the same model, in our wrapped format.
    wide = models.create("efficientnet_ex", width_mult=0.5, depth_mult=0.2)
    wide_path = tmp_path / "wide.pytar"
    torch.save(checkpoint.weights_file(wide), wide_path)
    line = expect_exit(capsys, run(wide_path), "a checkpoint of efficientnet_ex (width 0.5", code=2)
    assert line.startswith("error: --width-mult: width 0.25 contradicts")


class Payload:
    """Unpickling this object would create a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_checkpoint_is_refused_and_never_runs(capsys, tmp_path, synthetic_dir):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pytar"
    torch.save({"model": Payload(str(marker))}, evil)
    line = expect_exit(capsys, lambda: test_script.run_main(test_script.main, [
        *TINY, "--data_dir", synthetic_dir, "--model-state-file", str(evil)]), "refusing to load", code=1)
    assert "would call io.open" in line  # names what the file tried to run
    assert not marker.exists()
    with open(tmp_path / "evil2.pytar", "wb") as f:
        pickle.dump(Payload(str(marker)), f)
    with pytest.raises(UserError):
        checkpoint.load_file(str(tmp_path / "evil2.pytar"))
    assert not marker.exists()


@pytest.mark.slow
def test_checkpoint_of_another_model_in_resume(tmp_path, synthetic_dir):
    r = one_run(tmp_path, synthetic_dir, *SHORT, "--epochs", "1")
    with pytest.raises(UserError, match="--width-mult 0.5"):
        one_run(tmp_path, synthetic_dir, *SHORT, "--epochs", "2", "--resume", r["folder"], "--width-mult", "0.5")


def test_unwritable_save_folder(tmp_path, synthetic_dir, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            # root ignores permission bits: a regular file where the folder should be fails for all.
            target = tmp_path / "file"
            target.write_text("x")
            expect_exit(capsys, train_cli(*QUICK, "--data_dir", synthetic_dir, "--save", str(target / "runs")),
                         "--save: could not create the save folder", code=1)
        else:
            expect_exit(capsys, train_cli(*QUICK, "--data_dir", synthetic_dir, "--save", str(locked)),
                         "not writable", code=1)
    finally:
        locked.chmod(0o700)


# ------------------------------------------------------------------ real data

# Real data learning: tests/test_first_minutes.py trains the narrow ex of issue "The first minutes tell
# the truth" on 10,000 real images with the default flags and asserts > 5% top-1 in train.py and test.py.


def test_missing_real_data_fails_on_ci_and_is_skipped_elsewhere(tmp_path):
    from conftest import locate_cifar
    nowhere = str(tmp_path / "no-unpack-script.sh")
    with pytest.raises(pytest.fail.Exception, match="CI is set"):
        locate_cifar(None, environ={"CI": "true"}, unpack=nowhere)
    with pytest.raises(pytest.skip.Exception, match="set CIFAR100_DIR"):
        locate_cifar(None, environ={}, unpack=nowhere)
    (tmp_path / "cifar-100-python").mkdir()
    (tmp_path / "cifar-100-python" / "train").write_bytes(b"")
    assert locate_cifar(None, environ={"CI": "true", "CIFAR100_DIR": str(tmp_path)}, unpack=nowhere) == str(tmp_path)


def test_data_dir_may_name_the_cifar_folder_itself(synthetic_dir):
    import data
    a = data.load_cifar100(synthetic_dir, train=False, download=False)
    b = data.load_cifar100(os.path.join(synthetic_dir, "cifar-100-python"), train=False, download=False)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.slow
def test_channels_last_trains_like_nchw_and_bf16_like_fp32(tmp_path, synthetic_dir):
    """The CPU fast path changes no result beyond rounding: five fp32 steps in channels_last end
    with the NCHW run's weights to 1e-4; bf16 autocast (here on NCHW) gives the fp32 losses to
    bf16's precision. The saved weights are plain fp32 NCHW tensors either way."""
    few = ["--train-limit", "160", "--epochs", "1"]  # five steps of 32
    eager = one_run(tmp_path, synthetic_dir, *few, "--no-channels-last", "--amp", "off", save="eager")
    nhwc = one_run(tmp_path, synthetic_dir, *few, "--channels-last", "--amp", "off", save="nhwc")
    bf16 = one_run(tmp_path, synthetic_dir, *few, "--no-channels-last", "--amp", "bf16", save="bf16")
    a, b, c = final_weights(eager), final_weights(nhwc), final_weights(bf16)
    assert a.keys() == b.keys() == c.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype == c[k].dtype and b[k].is_contiguous() and c[k].is_contiguous(), k
        # (seen: 1.8e-6 at most after five steps)
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-4, msg=k)
    e, f = eager["history"][-1], bf16["history"][-1]
    assert e["train_loss"] != f["train_loss"]  # autocast was on
    # bf16 keeps ~3 significant digits; the losses (about 4.6) are computed in fp32 from bf16
    # outputs (seen: 4e-4 apart after five steps).
    assert abs(e["train_loss"] - f["train_loss"]) < 5e-3, (e, f)
    assert abs(e["test_loss"] - f["test_loss"]) < 5e-3, (e, f)


# ------------------------------------------------------------------ the best checkpoint

@pytest.mark.slow
def test_best_checkpoint_is_an_earlier_epoch_when_the_last_is_worse(tmp_path, synthetic_dir):
    """An LR step to 5.0 in epoch 3 wrecks the model: model_best.pytar must hold an earlier epoch's
    weights, and each model_state_XX.pytar its own epoch's (it reproduces that epoch's test loss)."""
    r = run_train([*TINY, "--train-limit", "320", "--test-limit", "200", "--batch-size", "32", "--aug", "none",
                   "--lr-regime", "1", "2", "0.2", "3", "3", "5.0", "--bn-momentum", "0.5", "--no-progress",
                   "--data_dir", synthetic_dir, "--save", str(tmp_path), "--epochs", "3"])
    folder, history = r["folder"], r["history"]
    top1 = [row["test_top1"] for row in history]
    best_epoch = top1.index(max(top1)) + 1  # the first of equals: a later tie is not "better"
    assert best_epoch < 3 and top1[2] < max(top1), top1  # the premise: the last epoch is worse
    assert r["best"]["epoch"] == best_epoch
    assert json.load(open(os.path.join(folder, "status.json")))["best"]["epoch"] == best_epoch
    best = torch.load(os.path.join(folder, "model_best.pytar"), weights_only=True)
    assert best["epoch"] == best_epoch and best["test"]["top1"] == max(top1)
    states = {e: torch.load(os.path.join(folder, f"model_state_{e:02}.pytar"), weights_only=True)
              for e in (1, 2, 3)}
    assert_same_weights(best["model"], states[best_epoch])
    # The last epoch's weights (BatchNorm statistics aside: a weights file holds those the epoch was
    # evaluated with, which precise BN may have recomputed) are last.pytar's.
    last = final_weights(r)
    weights = [k for k in last if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert_same_weights({k: last[k] for k in weights}, {k: states[3][k] for k in weights})
    x, y = first_test_images(synthetic_dir, 200)
    losses = set()
    for e, row in enumerate(history, 1):
        with torch.no_grad():
            cos = load_model(os.path.join(folder, f"model_state_{e:02}.pytar"))(x)
        assert row["test_loss"] == pytest.approx(F.cross_entropy(5.0 * cos, y).item(), rel=1e-5), e
        assert row["test_top1"] == pytest.approx(100 * int((cos.argmax(1) == y).sum()) / 200, abs=1e-9), e
        losses.add(round(row["test_loss"], 5))
    assert len(losses) == 3  # the three files are told apart by their losses


# ------------------------------------------------------------------ flags that change what a run computes

@pytest.mark.slow
def test_plain_head_end_to_end(tmp_path, synthetic_dir, capsys):
    """--coslinear false: the dropout+linear head trains on plain cross-entropy of its logits, is
    saved under classifier.1.*, evaluates with test.py --coslinear false, and counts every parameter."""
    r = one_run(tmp_path, synthetic_dir, "--epochs", "1", "--train-limit", "160", "--coslinear", "false")
    folder = r["folder"]
    assert os.path.basename(folder).startswith("efficientnet_ex_2")  # no _cos in the name
    bare = torch.load(os.path.join(folder, "model_state_01.pytar"), weights_only=True)
    assert sorted(k for k in bare if k.startswith("classifier.")) == ["classifier.1.bias", "classifier.1.weight"]
    assert bare["classifier.1.weight"].shape == (100, 320)  # head width make_divisible(1280 x 0.25) = 320
    best_path = os.path.join(folder, "model_best.pytar")
    best = torch.load(best_path, weights_only=True)
    assert best["arch"]["coslinear"] is False and best["model"].keys() == bare.keys()
    net = load_model(best_path, head="linear")
    x, y = first_test_images(synthetic_dir, 300)
    with torch.no_grad():
        logits = net(x)
    row = r["history"][0]
    assert row["test_loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)  # no scale s
    correct = int((logits.argmax(1) == y).sum())
    assert row["test_top1"] == pytest.approx(100 * correct / 300, abs=1e-9)
    out = tmp_path / "plain.json"
    assert test_script.main([*TINY, "--coslinear", "false", "--data_dir", synthetic_dir, "--test-limit", "300",
                             "--model-state-file", best_path, "--json", str(out)]) == 0
    assert json.load(open(out))["correct"] == correct
    # The file knows its head: without the flag test.py evaluates it as it is; a contradicting flag is refused.
    assert test_script.main([*TINY, "--data_dir", synthetic_dir, "--test-limit", "300", "--model-state-file",
                             best_path, "--json", str(out)]) == 0
    assert json.load(open(out))["correct"] == correct
    line = expect_exit(capsys, lambda: test_script.run_main(test_script.main, [
        *TINY, "--coslinear", "true", "--data_dir", synthetic_dir, "--model-state-file", best_path]),
        "--coslinear: a cosine head contradicts")
    assert "linear head" in line
    # Counting: every parameter of the file; the plain head has 320 x 100 + 100 where the cosine head
    # has 320 x 200 + 200 + 200 x 100, i.e. 52,100 fewer; mult-adds do not depend on the weights.
    params = sum(v.numel() for k, v in best["model"].items()
                 if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    counted = torchscope.count(net.to(memory_format=torch.contiguous_format), mul_factor=0.5)
    assert counted.total_params == counted.trainable_params == params
    cosine = torchscope.count(models.create("efficientnet_ex", width_mult=0.25, depth_mult=0.2), mul_factor=0.5)
    assert cosine.total_params - counted.total_params == 52_100
    fresh = torchscope.count(models.create("efficientnet_ex", head="linear", width_mult=0.25, depth_mult=0.2),
                             mul_factor=0.5)
    assert counted.madds() == fresh.madds() > 0


@pytest.mark.slow
def test_label_smoothing_reaches_the_loss(tmp_path, synthetic_dir):
    """--label-smoothing 0.2: the logged test loss is the smoothed AM-softmax loss of the saved model,
    (1 - 0.2) x CE + 0.2 x the mean of -log p over the classes, computed here."""
    r = one_run(tmp_path, synthetic_dir, "--epochs", "1", "--train-limit", "160", "--label-smoothing", "0.2")
    net = load_model(os.path.join(r["folder"], "model_best.pytar"))
    x, y = first_test_images(synthetic_dir, 300)
    with torch.no_grad():
        logp = torch.log_softmax(5.0 * net(x), 1)
    nll, uniform = -logp.gather(1, y[:, None]).squeeze(1), -logp.mean(1)
    row = r["history"][0]
    assert row["test_loss"] == pytest.approx((0.8 * nll + 0.2 * uniform).mean().item(), rel=1e-5)
    assert abs(row["test_loss"] - nll.mean().item()) > 1e-2  # and not the unsmoothed loss
    assert json.load(open(os.path.join(r["folder"], "args.json")))["label_smoothing"] == 0.2


@pytest.mark.slow
def test_keep_epoch_states_false_writes_no_epoch_files(tmp_path, synthetic_dir):
    r = one_run(tmp_path, synthetic_dir, "--epochs", "1", "--train-limit", "160", "--keep-epoch-states", "false")
    files = set(os.listdir(r["folder"]))
    assert not [f for f in files if f.startswith("model_state_")], files
    assert {"model_best.pytar", "last.pytar", "metrics.csv", "status.json"} <= files
    # A resume that does not give the flag keeps the run's setting.
    again = one_run(tmp_path, synthetic_dir, "--epochs", "2", "--train-limit", "160", "--resume", r["folder"])
    assert again["folder"] == r["folder"] and len(again["history"]) == 2
    assert not [f for f in os.listdir(r["folder"]) if f.startswith("model_state_")]


@pytest.mark.slow
def test_compiled_and_wrapped_prefixes_are_stripped(tmp_path):
    """A state_dict saved from a torch.compile'd model carries `_orig_mod.`, one from DDP around it
    `module._orig_mod.`: both load into a plain model and give its outputs."""
    torch.manual_seed(0)
    net = models.create("efficientnet_ex", width_mult=0.25, depth_mult=0.2).eval()
    compiled = torch.compile(net)  # never called: nothing is compiled, the keys are what matter
    state = compiled.state_dict()
    assert state and all(k.startswith("_orig_mod.") for k in state)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = net(x)
    for prefix in ("", "module."):
        path = tmp_path / f"{prefix or 'bare'}.pytar"
        torch.save({prefix + k: v for k, v in state.items()}, path)
        torch.manual_seed(1)
        other = models.create("efficientnet_ex", width_mult=0.25, depth_mult=0.2).eval()
        checkpoint.load_weights(other, str(path))
        with torch.no_grad():
            assert torch.equal(other(x), want), prefix


def test_checkpoint_format_is_versioned_and_old_training_states_still_resume(tmp_path):
    """/1 files (before the meter had five named sums) are read and upgraded; /2 files as written."""
    from engine.meter import FIELDS, Meter
    old_sums = torch.tensor([12.5, 7.0, 32.0, 3.0], dtype=torch.float64)  # loss, correct, count, agree
    old = checkpoint.with_checksum({"format": checkpoint.FORMAT_V1, "model": {}, "train": {
        "next_epoch": 2, "next_step": 3, "best": None, "world_size": 1,
        "partial": {"sums": old_sums, "seconds": 1.0, "rng": []}}})
    path = tmp_path / "last.pytar"
    torch.save(old, path)
    loaded = checkpoint.upgrade(checkpoint.load_file(str(path)))   # the checksum of a /1 file still holds
    assert loaded["format"] == checkpoint.FORMAT
    totals = Meter("cpu", loaded["train"]["partial"]["sums"]).totals()
    assert totals == dict(zip(FIELDS, [12.5, 7.0, 0.0, 3.0, 32.0]))
    new_sums = torch.arange(5, dtype=torch.float64)
    current = {"format": checkpoint.FORMAT, "train": {"partial": {"sums": new_sums}}}
    assert torch.equal(checkpoint.upgrade(current)["train"]["partial"]["sums"], new_sums)
