"""Label refinery: the frozen teacher, the refined objective, refined runs and the staged chain."""
import csv
import json
import os

import pytest
import torch
from torch import nn

import chain
import models
import refinery
from engine.teacher import load_teacher
import train
from conftest import TINY
from engine import checkpoint
from errors import ToolkitError as UserError
from loss import am_softmax_loss
from models.heads import CosineLinear, L2Norm

TINY_ARGS = ["--width-mult", "0.25", "--depth-mult", "0.2"]
QUICK = ["--train-limit", "320", "--test-limit", "200", "--batch-size", "32", "--aug", "none",
         "--lr-regime", "1", "3", "0.05", "--bn-momentum", "0.1", "--no-progress"]


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory, synthetic_dir):
    """A tiny ex trained one epoch on the synthetic data: a real teacher checkpoint."""
    save = tmp_path_factory.mktemp("teacher")
    r = train.run([*TINY, *QUICK, "--data_dir", synthetic_dir, "--save", str(save), "--epochs", "1"])
    return os.path.join(r["folder"], "model_best.pytar")


def tiny_teacher(path, bn_mode="eval"):
    t, meta = load_teacher("efficientnet_ex", path, width_mult=0.25, depth_mult=0.2,
                                    bn_mode=bn_mode)
    return t, meta


@pytest.mark.parametrize("bn_mode", ["eval", "train"])
def test_teacher_is_frozen_and_bit_identical_after_training(teacher_file, bn_mode):
    teacher, _ = tiny_teacher(teacher_file, bn_mode)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    assert all(not p.requires_grad for p in teacher.parameters())
    bns = [m for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(m.training == (bn_mode == "train") for m in bns)
    assert not teacher.training
    torch.manual_seed(0)
    student = models.create("efficientnet_ex", width_mult=0.25, depth_mult=0.2)
    objective = refinery.Refinery(teacher, s=5.0)
    opt = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        x = torch.randn(8, 3, 32, 32)
        loss, t_logits = objective(student(x), x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert t_logits.requires_grad is False
    assert all(p.grad is None for p in teacher.parameters())
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_train_mode_bn_uses_batch_statistics(teacher_file):
    """The original's quirk: with --refinery-bn train, outputs depend on the batch's statistics."""
    t_eval, _ = tiny_teacher(teacher_file, "eval")
    t_train, _ = tiny_teacher(teacher_file, "train")
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        a, b = t_eval(x), t_train(x)
        half = t_train(x[:8])
    assert not torch.allclose(a, b)
    assert not torch.allclose(half, b[:8])  # another batch, other statistics
    with torch.no_grad():
        assert torch.equal(t_eval(x[:8]), a[:8]) or torch.allclose(t_eval(x[:8]), a[:8], atol=1e-6)


def test_refined_loss_is_the_soft_target_loss_of_scaled_cosines(teacher_file):
    teacher, _ = tiny_teacher(teacher_file)
    x = torch.randn(4, 3, 32, 32)
    student_cos = torch.rand(4, 100) * 2 - 1
    loss, t_logits = refinery.Refinery(teacher, s=5.0)(student_cos, x)
    with torch.no_grad():
        p = torch.softmax(5.0 * teacher(x), 1)
    expected = -(p * torch.log_softmax(5.0 * student_cos, 1)).sum(1).mean()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(t_logits, 5.0 * teacher(x).detach())


class CosNet(nn.Module):
    def __init__(self, d, k):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d, 64), nn.ReLU(), nn.Linear(64, 32), L2Norm(),
                                  CosineLinear(32, k))

    def forward(self, x):
        return self.body(x)


def test_refined_student_learns_at_least_as_well_as_from_hard_labels():
    """Gaussian blobs with 40% of the training labels flipped: a teacher's soft labels carry the
    structure the noisy hard labels hide, so the refined student does at least as well on clean test
    labels (averaged over seeds to keep the comparison stable)."""
    d, k, n = 16, 8, 2000
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(k, d, generator=g) * 1.2

    def blobs(m, noise_frac, gen):
        y = torch.randint(0, k, (m,), generator=gen)
        x = centers[y] + torch.randn(m, d, generator=gen)
        noisy = y.clone()
        flip = torch.rand(m, generator=gen) < noise_frac
        noisy[flip] = torch.randint(0, k, (int(flip.sum()),), generator=gen)
        return x, noisy, y

    def fit(net, x, loss_fn, steps=300):
        opt = torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9)
        for i in range(steps):
            idx = torch.randint(0, len(x), (128,), generator=g)
            loss = loss_fn(net, x[idx], idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return net

    def acc(net, x, y):
        with torch.no_grad():
            return (net(x).argmax(1) == y).float().mean().item()

    hard_accs, refined_accs = [], []
    for seed in range(3):
        gen = torch.Generator().manual_seed(100 + seed)
        x, noisy, _ = blobs(n, 0.4, gen)
        xt, _, yt = blobs(2000, 0.0, gen)
        hard = lambda net, xb, idx: am_softmax_loss(net(xb), noisy[idx], s=5.0)
        torch.manual_seed(seed)
        teacher = fit(CosNet(d, k), x, hard).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        torch.manual_seed(1000 + seed)
        hard_student = fit(CosNet(d, k), x, hard)
        objective = refinery.Refinery(teacher, s=5.0)
        torch.manual_seed(1000 + seed)
        refined_student = fit(CosNet(d, k), x, lambda net, xb, idx: objective(net(xb), xb)[0])
        hard_accs.append(acc(hard_student, xt, yt))
        refined_accs.append(acc(refined_student, xt, yt))
    hard_mean = sum(hard_accs) / 3
    refined_mean = sum(refined_accs) / 3
    assert hard_mean > 0.5  # the task is learnable at all
    assert refined_mean >= hard_mean - 0.005, (hard_accs, refined_accs)


def test_refined_run_folder_log_and_metrics(tmp_path, synthetic_dir, teacher_file):
    r = train.run([*TINY, *QUICK, "--data_dir", synthetic_dir, "--save", str(tmp_path), "--epochs", "1",
                   "--label-refinery-model", "efficientnet_ex", "--label-refinery-state-file", teacher_file,
                   "--label-refinery-width-mult", "0.25", "--label-refinery-depth-mult", "0.2"])
    folder = r["folder"]
    assert os.path.basename(folder).startswith("efficientnet_ex_cos_rfn_")
    log = open(os.path.join(folder, "log.txt")).read()
    assert f"teacher efficientnet_ex from {teacher_file}: test top-1" in log
    rows = list(csv.DictReader(open(os.path.join(folder, "metrics.csv"))))
    assert {"train_agreement", "test_agreement"} <= set(rows[0])
    assert 0 <= float(rows[0]["test_agreement"]) <= 100
    # The student alone is saved, in the same format as a plain run.
    best = torch.load(os.path.join(folder, "model_best.pytar"), weights_only=True)
    assert set(best["model"]) == set(models.create("efficientnet_ex", width_mult=0.25,
                                                   depth_mult=0.2).state_dict())
    bare = torch.load(os.path.join(folder, "model_state_01.pytar"), weights_only=True)
    assert checkpoint.is_state_dict(bare) and len(bare) == len(best["model"])


def test_teacher_in_the_original_format_is_accepted(tmp_path, synthetic_dir, teacher_file):
    state = torch.load(teacher_file, weights_only=True)["model"]
    original = tmp_path / "model_state_ex.pytar"
    torch.save({f"module.{k}": v for k, v in state.items()}, original)
    t, _ = load_teacher("efficientnet_ex", str(original), width_mult=0.25, depth_mult=0.2)
    x = torch.randn(2, 3, 32, 32)
    ours, _ = tiny_teacher(teacher_file)
    with torch.no_grad():
        assert torch.equal(t(x), ours(x))


def test_bad_teacher_inputs(tmp_path, synthetic_dir, teacher_file):
    base = [*TINY, *QUICK, "--data_dir", synthetic_dir, "--save", str(tmp_path), "--epochs", "1"]
    with pytest.raises(UserError, match="does not exist"):
        train.run([*base, "--label-refinery-model", "efficientnet_ex",
                   "--label-refinery-state-file", str(tmp_path / "nope.pytar")])
    with pytest.raises(SystemExit):  # argparse's one-line error, exit 2
        train.run([*base, "--label-refinery-model", "efficientnet_ex"])
    # The file is a tiny ex; naming b3 as the teacher is caught before training, naming both.
    with pytest.raises(UserError, match=r"efficientnet_ex \(width 0.25.*not of efficientnet_b3"):
        train.run([*base, "--label-refinery-model", "efficientnet_b3",
                   "--label-refinery-state-file", teacher_file])
    junk = tmp_path / "junk.pytar"
    junk.write_text("not a checkpoint")
    with pytest.raises(UserError, match="not a readable checkpoint"):
        train.run([*base, "--label-refinery-model", "efficientnet_ex",
                   "--label-refinery-state-file", str(junk)])
    assert not [d for d in os.listdir(tmp_path) if d.startswith("efficientnet")]  # nothing started


def test_chain_on_real_data_reports_and_reruns_skip(tmp_path, cifar_dir, capsys):
    save = tmp_path / "chain"
    argv = ["--stages", "efficientnet_ex,efficientnet_ex,efficientnet_exx", "--data_dir", cifar_dir,
            "--no-download", "--save", str(save), "--epochs", "1", "--width-mult", "0.25",
            "--depth-mult", "0.34", "--train-limit", "1000", "--test-limit", "500", "--aug", "none",
            "--batch-size", "50", "--no-progress"]
    assert chain.main(argv) == 0
    out = capsys.readouterr().out
    assert "ETA for the whole chain" in out
    report = json.load(open(save / "chain_report.json"))
    stages = report["stages"]
    assert [s["model"] for s in stages] == ["efficientnet_ex", "efficientnet_ex", "efficientnet_exx"]
    assert stages[0]["teacher"] is None and stages[0]["teacher_checkpoint"] is None
    for a, b in zip(stages, stages[1:]):
        assert b["teacher"] == a["model"] and b["teacher_checkpoint"] == a["checkpoint"]
        assert os.path.basename(os.path.dirname(b["checkpoint"])).startswith(b["model"] + "_cos_rfn_")
    for s in stages:
        assert os.path.exists(s["checkpoint"]) and s["epochs"] == 1 and s["seconds"] > 0
        assert 0 <= s["best_top1"] <= 100
    final = report["final"]
    net = models.create("efficientnet_exx", width_mult=0.25, depth_mult=0.34)
    assert final["params"] == sum(p.numel() for p in net.parameters())
    assert final["total"] == 500 and final["reached_80"] is False
    assert final["correct"] == round(final["top1"] * 5)
    assert final["score"] == pytest.approx(0.5 * final["params"] / 36.5e6 + final["madds"] / 10.49e9)
    assert final["top1"] == pytest.approx(stages[-1]["best_top1"])
    assert (save / "chain_report.md").read_text().startswith("# Label-refinery chain report")
    assert (save / "chain_curves.png").stat().st_size > 0
    folders = sorted(os.listdir(save))
    # Running the same command again skips every stage and starts no new run.
    assert chain.main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("finished before") == 3
    assert sorted(os.listdir(save)) == folders


def test_chain_flag_errors(capsys):
    with pytest.raises(SystemExit) as e:
        chain.main(["--stages", "efficientnet_ex,resnet18"])
    assert e.value.code == 2
    assert "unknown model(s) resnet18" in capsys.readouterr().err
