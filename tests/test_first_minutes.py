"""The first minutes tell the truth: a short run's accuracy reflects what it learned (precise
BatchNorm statistics), progress shows without a terminal, and an ETA comes before the first epoch
ends."""
import json
import os

import pytest
import torch

import chain
import models
import test as test_script
from conftest import TINY, assert_same_weights, load_weights_file, run_train
from engine import precise_bn
from engine import progress as progress_mod


def test_auto_decides_from_the_initial_statistics_left():
    net = models.create("efficientnet_ex", width_mult=0.25, depth_mult=0.2)
    assert precise_bn.init_weight(net) == 1.0  # never updated
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bns:
        m.num_batches_tracked.fill_(156)  # 0.99 ** 156 = 0.209: a 156-step run
    assert precise_bn.init_weight(net) == pytest.approx(0.99 ** 156)
    assert precise_bn.batches_for("auto", net, batch_size=64, steps=156) == 156  # ceil(10000/64) = 157 batches, capped at the epoch's 156
    for m in bns:
        m.num_batches_tracked.fill_(1172)  # one epoch of the original recipe
    assert precise_bn.batches_for("auto", net, batch_size=128, steps=1172) == 0
    assert precise_bn.batches_for("off", net, batch_size=128, steps=1172) == 0
    assert precise_bn.batches_for("7", net, batch_size=128, steps=1172) == 7


def test_recompute_leaves_the_model_and_the_rng_alone():
    torch.manual_seed(0)
    net = models.create("efficientnet_b0", width_mult=0.25, depth_mult=0.2)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    batches = [(torch.randn(8, 3, 32, 32) * 2 + 1, None) for _ in range(3)]
    rng = torch.get_rng_state()
    precise = precise_bn.recompute(net, batches, torch.autocast("cpu", enabled=False))
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    # The statistics are the batches' own: the stem's BN sees the conv of inputs with mean ~1.
    stem = "features.0.2.running_mean"
    assert stem in precise and not torch.allclose(precise[stem], before[stem])
    assert int(precise["features.0.2.num_batches_tracked"]) == 3
    with precise_bn.overlay(net, precise):
        assert torch.equal(net.state_dict()[stem], precise[stem])
    assert torch.equal(net.state_dict()[stem], before[stem])


@pytest.mark.slow
def test_the_issue_s_short_run_with_default_flags_reports_what_it_learned(short_real_run, cifar_dir, tmp_path):
    """The run of the issue, with the original's BatchNorm momentum (0.01): without precise BN it
    logged exactly 1.00% / 5.00% (one ranking for every image)."""
    r = short_real_run
    assert "precise BN" in open(os.path.join(r["folder"], "log.txt")).read()
    assert r["best"]["top1"] > 5.0, r["history"]
    logged = r["best"]
    for name in ("model_best.pytar", f"model_state_{logged['epoch']:02}.pytar"):
        got = tmp_path / "t.json"
        assert test_script.main(["--model", "efficientnet_ex", "--width-mult", "0.25", "--depth-mult", "0.34",
                                 "--data_dir", cifar_dir, "--test-limit", "2000", "--device", "cpu",
                                 "--model-state-file", os.path.join(r["folder"], name), "--json", str(got)]) == 0
        doc = json.load(open(got))
        assert doc["correct"] == logged["correct"] and doc["top1"] == pytest.approx(logged["top1"]), name


@pytest.mark.slow
def test_auto_leaves_a_converged_run_untouched(tmp_path, synthetic_dir):
    """With statistics that converged (momentum 0.5 converges in a few steps), auto is exactly off:
    the same weights, buffers and figures."""
    base = [*TINY, "--train-limit", "320", "--test-limit", "200", "--batch-size", "32", "--aug", "none",
            "--lr-regime", "1", "2", "0.05", "--bn-momentum", "0.5", "--no-progress", "--data_dir", synthetic_dir]
    auto = run_train([*base, "--save", str(tmp_path / "auto")])
    off = run_train([*base, "--precise-bn", "off", "--save", str(tmp_path / "off")])
    assert_same_weights(load_weights_file(os.path.join(auto["folder"], "model_best.pytar")),
                        load_weights_file(os.path.join(off["folder"], "model_best.pytar")))
    assert_same_weights(load_weights_file(os.path.join(auto["folder"], "last.pytar")),
                        load_weights_file(os.path.join(off["folder"], "last.pytar")))
    assert [h["test_top1"] for h in auto["history"]] == [h["test_top1"] for h in off["history"]]


@pytest.mark.slow
def test_precise_bn_changes_neither_training_nor_resume(tmp_path, synthetic_dir):
    """Forced precise BN every epoch: the training trajectory (last.pytar's weights and statistics)
    equals a run without it, so bit-exact resume is untouched; only the evaluation differs."""
    base = [*TINY, "--train-limit", "320", "--test-limit", "200", "--batch-size", "32", "--aug", "standard",
            "--lr-regime", "1", "2", "0.05", "--no-progress", "--data_dir", synthetic_dir]
    forced = run_train([*base, "--precise-bn", "4", "--save", str(tmp_path / "on")])
    off = run_train([*base, "--precise-bn", "off", "--save", str(tmp_path / "off")])
    a = torch.load(os.path.join(forced["folder"], "last.pytar"), weights_only=True)
    b = torch.load(os.path.join(off["folder"], "last.pytar"), weights_only=True)
    assert_same_weights(a["model"], b["model"])
    assert a["eval_bn"] and b["eval_bn"] is None
    assert [h["train_loss"] for h in forced["history"]] == [h["train_loss"] for h in off["history"]]
    assert [h["test_top1"] for h in forced["history"]] != [h["test_top1"] for h in off["history"]]


@pytest.mark.slow
def test_progress_lines_without_a_terminal_and_an_early_eta(tmp_path, synthetic_dir, capsys, monkeypatch):
    monkeypatch.setattr(progress_mod, "LINE_SECONDS", 0.0)
    monkeypatch.setattr(progress_mod, "ETA_AFTER", 0.0)
    r = run_train([*TINY, "--train-limit", "320", "--test-limit", "100", "--batch-size", "32", "--aug", "none",
                   "--epochs", "2", "--lr-regime", "1", "2", "0.05", "--log-interval", "3",
                   "--data_dir", synthetic_dir, "--save", str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    steps = [l for l in lines if l.strip().startswith("epoch 1/2 step")]
    assert [l.split()[3] for l in steps] == ["3/10", "6/10", "9/10"], steps
    assert all("img/s" in l and "epoch ETA" in l and "loss" in l for l in steps)
    eta = [i for i, l in enumerate(lines) if l.startswith("ETA: ")]
    first_epoch = next(i for i, l in enumerate(lines) if l.startswith("epoch   1/2"))
    # On a CPU: the probe's estimate before the first step, then the measured one; both before the
    # first epoch ends.
    assert lines[eta[0] - 1].startswith("ETA (estimated from a probe")
    assert len(eta) == 2 and eta[-1] < first_epoch, lines
    assert all("for the run (2 epoch(s) left" in lines[i] for i in eta)
    assert r["exit_code"] == 0


@pytest.mark.slow
def test_the_eta_projects_the_remaining_work(tmp_path, synthetic_dir, capsys, monkeypatch):
    """At a measured speed, the run's ETA is its remaining steps over that speed plus evaluations:
    with 10 steps an epoch and 3 epochs, about 3x the epoch's."""
    seen = []
    monkeypatch.setattr(progress_mod, "ETA_AFTER", 0.0)
    r = run_train([*TINY, "--train-limit", "320", "--test-limit", "100", "--batch-size", "32", "--aug", "none",
                   "--epochs", "3", "--lr-regime", "1", "3", "0.05", "--no-progress", "--data_dir", synthetic_dir,
                   "--save", str(tmp_path)], on_speed=lambda ips, left: seen.append((ips, left)))
    assert len(seen) == 2  # the probe's estimate, then the measured speed
    for ips, left in seen:
        steps_per_s = ips / 32
        expected_train = 3 * 10 / steps_per_s
        assert expected_train * 0.9 < left < expected_train * 2, (ips, left)
    assert r["exit_code"] == 0


@pytest.mark.slow
def test_the_chain_says_how_long_it_will_take_before_its_first_epoch_ends(tmp_path, synthetic_dir, capsys,
                                                                          monkeypatch):
    monkeypatch.setattr(progress_mod, "ETA_AFTER", 0.0)
    argv = ["--stages", "efficientnet_ex,efficientnet_exx", "--width-mult", "0.1", "--depth-mult", "0.1",
            "--train-limit", "320", "--test-limit", "50", "--batch-size", "32", "--aug", "none", "--epochs", "2",
            "--data_dir", synthetic_dir, "--save", str(tmp_path), "--no-progress"]
    assert chain.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    eta = [i for i, l in enumerate(lines) if "ETA for the whole chain" in l]
    first_epoch = next(i for i, l in enumerate(lines) if l.startswith("epoch   1/2"))
    assert len(eta) == 1 and eta[0] < first_epoch
