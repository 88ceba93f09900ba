"""What a new user meets (issue 20): a checkpoint knows its model, damaged weights are refused on
load, and every message names the flag the user should change, in the user's own terms."""
import errno
import math
import os

import pytest
import torch

import chain
import models
from conftest import TINY
from engine import checkpoint, compression, optim
from engine.config import RunConfig
from engine.state import RunState
from micronet_cifar100 import errors
from micronet_cifar100.cli.errors import message
from micronet_cifar100.cli.train_flags import parse_config
from refinery import load_teacher
from torchscope import command


@pytest.fixture(scope="module")
def narrow(tmp_path_factory):
    """A narrow ex as our wrapped model_best.pytar and as the original entry's bare state_dict."""
    folder = tmp_path_factory.mktemp("narrow")
    torch.manual_seed(0)
    m = models.create("efficientnet_ex", width_mult=0.25, depth_mult=0.2)
    torch.save(checkpoint.weights_file(m, epoch=1), folder / "model_best.pytar")
    torch.save(m.state_dict(), folder / "model_state_01.pytar")
    return folder


# ----------------------------------------------------------------- a checkpoint knows its model

def test_count_and_test_read_the_architecture_from_the_checkpoint(narrow):
    args = command.parse_args(["--model-state-file", str(narrow / "model_best.pytar")])
    assert (args.model, args.width_mult, args.depth_mult, args.coslinear) == ("efficientnet_ex", 0.25, 0.2, True)
    import test as test_script
    args = test_script.parse_args(["--model-state-file", str(narrow / "model_best.pytar")])
    assert (args.width_mult, args.depth_mult) == (0.25, 0.2)


def test_a_flag_that_contradicts_the_file_is_refused_naming_both(narrow):
    with pytest.raises(errors.ConfigError) as e:
        command.parse_args(["--model-state-file", str(narrow / "model_best.pytar"), "--width-mult", "0.5"])
    line = message(e.value)
    assert line.startswith("--width-mult: width 0.5 contradicts ") and "(width 0.25, depth 0.2, cosine head)" in line
    with pytest.raises(errors.ConfigError, match="a linear head contradicts"):
        command.parse_args(["--model-state-file", str(narrow / "model_best.pytar"), "--coslinear", "false"])
    # Agreeing flags are fine.
    args = command.parse_args(["--model-state-file", str(narrow / "model_best.pytar"), "--width-mult", "0.25"])
    assert args.depth_mult == 0.2


def test_bare_state_dicts_keep_working_with_flags_and_full_size_ones_are_recognised(narrow, tmp_path):
    args = command.parse_args(["--model-state-file", str(narrow / "model_state_01.pytar"), *TINY[2:]])
    assert (args.width_mult, args.depth_mult) == (0.25, 0.2)
    full = tmp_path / "b0.pytar"
    with torch.device("meta"):
        shapes = models.create("efficientnet_b0").state_dict()
    torch.save({k: torch.zeros(v.shape, dtype=v.dtype) for k, v in shapes.items()}, full)
    args = command.parse_args(["--model-state-file", str(full)])   # models.identify tells
    assert args.model == "efficientnet_b0"


def test_init_from_and_the_teacher_take_their_architecture_from_their_files(narrow):
    best = str(narrow / "model_best.pytar")
    cfg = parse_config(["--init-from", best, "--label-refinery-state-file", best])
    assert (cfg.model, cfg.width_mult, cfg.depth_mult) == ("efficientnet_ex", 0.25, 0.2)
    assert (cfg.label_refinery_model, cfg.label_refinery_width_mult, cfg.label_refinery_depth_mult) == \
        ("efficientnet_ex", 0.25, 0.2)
    with pytest.raises(errors.ConfigError) as e:
        parse_config(["--label-refinery-state-file", best, "--label-refinery-depth-mult", "0.5"])
    assert message(e.value).startswith("--label-refinery-depth-mult: depth 0.5 contradicts")


def test_a_narrow_teachers_mismatch_names_the_teachers_flags(narrow):
    with pytest.raises(errors.ArchitectureMismatch) as e:
        load_teacher("efficientnet_ex", str(narrow / "model_state_01.pytar"), width_mult=0.5, depth_mult=0.2)
    line = message(e.value)
    assert line.startswith("--label-refinery-state-file: ")
    assert "--label-refinery-width-mult" in line and "--width-mult/" not in line


def test_init_from_a_folder_says_it_is_a_folder(narrow):
    with pytest.raises(errors.CheckpointError) as e:
        parse_config(["--init-from", str(narrow)])
    assert message(e.value) == f"--init-from: checkpoint {narrow} is a folder; give a .pytar file inside it"


# ----------------------------------------------------------------- damaged weights

def test_non_finite_weights_or_buffers_are_refused_on_load(narrow, tmp_path):
    state = torch.load(narrow / "model_state_01.pytar", weights_only=True)
    state["features.1.conv.0.2.running_var"][3] = float("nan")
    bad = tmp_path / "nan.pytar"
    torch.save(state, bad)
    m = models.create("efficientnet_ex", width_mult=0.25, depth_mult=0.2)
    with pytest.raises(errors.CheckpointError, match=r"1 non-finite value \(NaN or inf\) in "
                                                     r"features\.1\.conv\.0\.2\.running_var"):
        checkpoint.load_weights(m, str(bad))
    with pytest.raises(errors.CheckpointError) as e:   # --init-from loads through the same check
        compression.init_from(m, str(bad))
    assert message(e.value).startswith("--init-from: ")


def test_an_epoch_with_a_non_finite_test_loss_is_never_the_best():
    state = RunState()
    test = {"top1": 50.0, "top5": 80.0, "correct": 5, "total": 10}
    assert not state.add_epoch({"epoch": 1}, {**test, "loss": float("nan")})
    assert state.best is None
    assert state.add_epoch({"epoch": 2}, {**test, "top1": 10.0, "loss": 4.2})
    assert state.best["epoch"] == 2 and math.isfinite(4.2)


# ----------------------------------------------------------------- a resume repeats its own settings

@pytest.mark.parametrize("flags", [["--prune-schedule", "1", "2"], ["--quant-first-last", "8", "8"],
                                   ["--prune-scope", "layer"]])
def test_a_resume_that_repeats_its_runs_settings_is_accepted(flags):
    cfg = parse_config(["--resume", "RUN", *flags])
    saved = RunConfig(prune=0.5, prune_schedule=[1, 2], prune_scope="layer", quant=[4, 4],
                      quant_first_last=[8, 8]).settings()
    compression.check(cfg.inherit(saved, "RUN/last.pytar"))
    # Without a resume the same flags still need their partner.
    with pytest.raises(SystemExit):
        parse_config(flags)


# ----------------------------------------------------------------- storage, in the right words

@pytest.mark.parametrize("err,advice", [
    (errno.ENOSPC, "free disk space or inodes"),
    (errno.EROFS, "mounted read-only"),
    (errno.EACCES, "fix the permissions"),
])
def test_storage_advice_follows_the_cause(tmp_path, monkeypatch, err, advice):
    from engine import run_folder

    def refuse(path, *a, **k):
        raise OSError(err, os.strerror(err), path)
    monkeypatch.setattr(os, "makedirs", refuse)
    with pytest.raises(errors.StorageError) as e:
        run_folder.check_save_root(str(tmp_path / "runs"))
    line = message(e.value)
    assert line.startswith("--save: could not create the save folder") and advice in line
    others = {"free disk space", "mounted read-only", "fix the permissions"} - {advice.split(" or")[0]}
    assert not any(o in line for o in others if o not in advice), line


# ----------------------------------------------------------------- the chain's words

def test_a_chain_mismatch_names_the_flags_the_user_gave_in_their_own_terms():
    base = ["--stages", "efficientnet_ex", "--prune", "0.5", "--quant", "8", "8"]
    before = chain.parse_args([*base, "--compress-epochs", "3"])
    now = chain.parse_args([*base, "--compress-epochs", "2"])
    teacher = ("efficientnet_ex", "runs/ex/model_best.pytar")
    known = {"identity": chain.stage_config(before, 1, teacher).identity()}
    with pytest.raises(errors.RunError) as e:
        chain.check_stage(known, chain.stage_config(now, 1, teacher), 1, "chain_state.json")
    line = str(e.value)
    regime = lambda epochs: optim.format_regime(optim.fine_tune_regime(epochs))
    assert (f"--compress-epochs/--compress-lr-regime (its LR regime) {regime(2)} (before: {regime(3)})"
            in line), line
    assert "--lr-regime" not in line.replace("--compress-lr-regime", "") and "None" not in line and "'" not in line
    # A setting the user dropped reads "(not given)", a list as typed.
    assert chain.as_typed(None) == "(not given)" and chain.as_typed([8, 8]) == "8 8" and chain.as_typed(True) == "true"


# ----------------------------------------------------------------- the run's ETA

@pytest.mark.slow
def test_the_run_eta_is_within_a_quarter_of_the_time_it_took(tmp_path, synthetic_dir):
    """A short CPU run: the ETA announced after the first epoch (shorter than the ETA's wait, so it
    comes once that epoch's evaluation and precise BatchNorm have run and their time is known) against
    the time the two later epochs took."""
    import time
    from conftest import run_train
    said = []
    r = run_train([*TINY, "--train-limit", "640", "--test-limit", "1000", "--batch-size", "32", "--aug", "none",
                   "--epochs", "3", "--lr-regime", "1", "3", "0.05", "--no-progress", "--device", "cpu",
                   "--data_dir", synthetic_dir, "--save", tmp_path],
                  on_speed=lambda ips, left: said.append((time.perf_counter(), ips, left)))
    end = time.perf_counter()
    assert len(r["history"]) == 3 and len(said) == 2   # the probe's estimate, then the measured one
    at, _, left = said[-1]
    took = end - at
    assert abs(left - took) <= 0.25 * took, (left, took, said, r["history"])
