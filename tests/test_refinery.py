"""Label refinery: the frozen teacher, the refined objective, refined runs and the staged chain."""
import contextlib
import csv
import io
import json
import os
import re
import signal

import pytest
import torch
from torch import nn

import chain
import models
import refinery
import torchscope
from refinery import load_teacher
from micronet_cifar100.cli.errors import run_main
from conftest import TINY, first_test_images, load_model, run_train
from engine import checkpoint
from micronet_cifar100.errors import ToolkitError as UserError
from loss import am_softmax_loss
from models.heads import CosineLinear, L2Norm

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_ARGS = ["--width-mult", "0.25", "--depth-mult", "0.2"]
QUICK = ["--train-limit", "320", "--test-limit", "200", "--batch-size", "32", "--aug", "none",
         "--lr-regime", "1", "3", "0.05", "--bn-momentum", "0.1", "--no-progress"]


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory, synthetic_dir, one_thread):
    """A tiny ex trained one epoch on the synthetic data: a real teacher checkpoint."""
    save = tmp_path_factory.mktemp("teacher")
    r = run_train([*TINY, *QUICK, "--data_dir", synthetic_dir, "--save", str(save), "--epochs", "1"])
    return os.path.join(r["folder"], "model_best.pytar")


def tiny_teacher(path, bn_mode="eval", memory_format=torch.contiguous_format):
    t, meta = load_teacher("efficientnet_ex", path, width_mult=0.25, depth_mult=0.2, bn_mode=bn_mode,
                           memory_format=memory_format)
    return t, meta


def refined_argv(data_dir, save, teacher, *extra):
    return [*TINY, *QUICK, "--data_dir", data_dir, "--save", str(save), "--epochs", "1",
            "--label-refinery-model", "efficientnet_ex", "--label-refinery-state-file", teacher,
            "--label-refinery-width-mult", "0.25", "--label-refinery-depth-mult", "0.2", *extra]


def percent_equal(a, b):
    return 100.0 * int((a.argmax(1) == b.argmax(1) if b.dim() == 2 else a.argmax(1) == b).sum()) / len(a)


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_refined_run_folder_log_and_metrics(tmp_path, synthetic_dir, teacher_file):
    r = run_train(refined_argv(synthetic_dir, tmp_path, teacher_file))
    folder = r["folder"]
    assert os.path.basename(folder).startswith("efficientnet_ex_cos_rfn_")
    log = open(os.path.join(folder, "log.txt")).read()
    # The teacher's hard-label accuracy (BatchNorm on running statistics) and the student's
    # agreement with it, computed here from the two checkpoints on the 200 test images.
    teacher, _ = tiny_teacher(teacher_file, memory_format=torch.channels_last)
    student = load_model(os.path.join(folder, "model_state_01.pytar"))
    x, y = first_test_images(synthetic_dir, 200)
    with torch.no_grad():
        t_out, s_out = teacher(x), student(x)
    correct = int((t_out.argmax(1) == y).sum())
    assert (f"teacher efficientnet_ex from {teacher_file}: test top-1 {correct / 2:.2f}% ({correct}/200), "
            f"BatchNorm eval mode") in log
    rows = list(csv.DictReader(open(os.path.join(folder, "metrics.csv"))))
    assert {"train_agreement", "test_agreement"} <= set(rows[0])
    agreement = percent_equal(s_out, t_out)
    assert r["history"][0]["test_agreement"] == pytest.approx(agreement, abs=1e-9)
    assert float(rows[0]["test_agreement"]) == pytest.approx(agreement, rel=1e-5)
    assert r["history"][0]["test_top1"] == pytest.approx(percent_equal(s_out, y), abs=1e-9)
    # The student alone is saved, in the same format as a plain run.
    best = torch.load(os.path.join(folder, "model_best.pytar"), weights_only=True)
    assert set(best["model"]) == set(models.create("efficientnet_ex", width_mult=0.25,
                                                   depth_mult=0.2).state_dict())
    bare = torch.load(os.path.join(folder, "model_state_01.pytar"), weights_only=True)
    assert checkpoint.is_state_dict(bare) and len(bare) == len(best["model"])


@pytest.mark.slow
def test_refinery_bn_train_end_to_end(tmp_path, synthetic_dir, teacher_file):
    """--refinery-bn train: the run's teacher normalises with each batch's statistics (the
    original's quirk). Its logged accuracy and the student's agreement are those of a train-mode-BN
    teacher on the evaluation batch (the 200 images at once), not of the running statistics; the
    teacher file is untouched."""
    before = torch.load(teacher_file, weights_only=True)["model"]
    r = run_train(refined_argv(synthetic_dir, tmp_path, teacher_file, "--refinery-bn", "train"))
    folder = r["folder"]
    x, y = first_test_images(synthetic_dir, 200)
    batch_stats, _ = tiny_teacher(teacher_file, "train", memory_format=torch.channels_last)
    running_stats, _ = tiny_teacher(teacher_file, "eval", memory_format=torch.channels_last)
    student = load_model(os.path.join(folder, "model_state_01.pytar"))
    with torch.no_grad():
        t_out, t_eval, s_out = batch_stats(x), running_stats(x), student(x)
    assert not torch.equal(t_out.argmax(1), t_eval.argmax(1))  # the two modes do predict differently
    correct = int((t_out.argmax(1) == y).sum())
    log = open(os.path.join(folder, "log.txt")).read()
    assert f"test top-1 {correct / 2:.2f}% ({correct}/200), BatchNorm train mode" in log
    assert r["history"][0]["test_agreement"] == pytest.approx(percent_equal(s_out, t_out), abs=1e-9)
    assert json.load(open(os.path.join(folder, "args.json")))["refinery_bn"] == "train"
    after = torch.load(teacher_file, weights_only=True)["model"]
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
def test_teacher_in_the_original_format_is_accepted(tmp_path, synthetic_dir, teacher_file):
    state = torch.load(teacher_file, weights_only=True)["model"]
    original = tmp_path / "model_state_ex.pytar"
    torch.save({f"module.{k}": v for k, v in state.items()}, original)
    t, _ = load_teacher("efficientnet_ex", str(original), width_mult=0.25, depth_mult=0.2)
    x = torch.randn(2, 3, 32, 32)
    ours, _ = tiny_teacher(teacher_file)
    with torch.no_grad():
        assert torch.equal(t(x), ours(x))


@pytest.mark.slow
def test_bad_teacher_inputs(tmp_path, synthetic_dir, teacher_file):
    base = [*TINY, *QUICK, "--data_dir", synthetic_dir, "--save", str(tmp_path), "--epochs", "1"]
    with pytest.raises(UserError, match="does not exist"):
        run_train([*base, "--label-refinery-model", "efficientnet_ex",
                   "--label-refinery-state-file", str(tmp_path / "nope.pytar")])
    with pytest.raises(SystemExit):  # argparse's one-line error, exit 2
        run_train([*base, "--label-refinery-model", "efficientnet_ex"])
    # The file is a tiny ex; naming b3 as the teacher is caught before training, naming both.
    with pytest.raises(UserError, match=r"model efficientnet_b3 contradicts .*a checkpoint of efficientnet_ex "
                                        r"\(width 0.25"):
        run_train([*base, "--label-refinery-model", "efficientnet_b3",
                   "--label-refinery-state-file", teacher_file])
    junk = tmp_path / "junk.pytar"
    junk.write_text("not a checkpoint")
    with pytest.raises(UserError, match="not a readable checkpoint"):
        run_train([*base, "--label-refinery-model", "efficientnet_ex",
                   "--label-refinery-state-file", str(junk)])
    assert not [d for d in os.listdir(tmp_path) if d.startswith("efficientnet")]  # nothing started


# ------------------------------------------------------------------ the chain (on the synthetic data)

CHAIN = ["--stages", "efficientnet_ex,efficientnet_ex,efficientnet_exx", "--epochs", "1", "--width-mult", "0.25",
         "--depth-mult", "0.2", "--train-limit", "160", "--test-limit", "200", "--aug", "none", "--batch-size", "32",
         "--bn-momentum", "0.1", "--no-progress", "--no-download"]
EX, EXX = "efficientnet_ex", "efficientnet_exx"


def run_chain(argv):
    """chain.main in this process; returns (exit code, what it printed)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = chain.main(argv)
    return code, out.getvalue()


def run_folders(save):
    return sorted(d for d in os.listdir(save) if os.path.isdir(os.path.join(save, d)))


def tiny_madds(name, mul_factor=1.0):
    return torchscope.count(models.create(name, width_mult=0.25, depth_mult=0.2), mul_factor=mul_factor).madds(
        mul_factor)


def duration(text):
    """Seconds, and the resolution, of engine.progress.format_duration's text: '42s', '2m05s', '1h02m',
    '3d04h'."""
    m = re.fullmatch(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", text)
    assert m and text, text
    d, h, mi, s = (int(g or 0) for g in m.groups())
    return d * 86400 + h * 3600 + mi * 60 + s, (3600 if d else 60 if h else 1)


def chain_eta(text):
    """(seconds, their resolution, stage, img/s) of the chain's ETA line."""
    m = re.search(r"\[chain\] ETA for the whole chain: (\S+) at the measured speed of stage (\d+) "
                  r"\(([\d.e+]+) img/s\)", text)
    assert m, text
    return (*duration(m.group(1)), int(m.group(2)), float(m.group(3)))


@pytest.fixture(scope="module")
def chained(tmp_path_factory, synthetic_dir, one_thread):
    """The three-stage chain ex -> ex -> exx, one epoch each: (save folder, argv, what it printed)."""
    save = tmp_path_factory.mktemp("chain") / "chain"
    argv = [*CHAIN, "--data_dir", synthetic_dir, "--save", str(save)]
    code, out = run_chain(argv)
    assert code == 0, out
    return save, argv, out


@pytest.mark.slow
def test_chain_reports_every_stage_and_the_final_model(chained, synthetic_dir):
    save, _, out = chained
    report = json.load(open(save / "chain_report.json"))
    stages = report["stages"]
    assert [s["model"] for s in stages] == [EX, EX, EXX]
    assert stages[0]["teacher"] is None and stages[0]["teacher_checkpoint"] is None
    for a, b in zip(stages, stages[1:]):
        assert b["teacher"] == a["model"] and b["teacher_checkpoint"] == a["checkpoint"]
        assert os.path.basename(os.path.dirname(b["checkpoint"])).startswith(b["model"] + "_cos_rfn_")
    x, y = first_test_images(synthetic_dir, 200)
    for s in stages:
        history = checkpoint.load_file(os.path.join(os.path.dirname(s["checkpoint"]), "last.pytar"))["history"]
        assert s["epochs"] == len(history) == 1
        assert s["seconds"] == pytest.approx(sum(h["seconds"] for h in history)) and s["seconds"] > 0
        # Each stage's best top-1 is its best epoch's, and its checkpoint's hard-label accuracy.
        assert s["best_top1"] == max(h["test_top1"] for h in history)
        with torch.no_grad():
            cos = load_model(s["checkpoint"], name=s["model"])(x)
        assert s["best_top1"] == pytest.approx(percent_equal(cos, y), abs=1e-9)
    final = report["final"]
    net = models.create(EXX, width_mult=0.25, depth_mult=0.2)
    assert final["params"] == sum(p.numel() for p in net.parameters())
    # The final model's mult-adds are torchscope's count of that model, at both multiply weights.
    assert final["madds"] == torchscope.count(net, mul_factor=0.5).madds(0.5) == tiny_madds(EXX, 0.5)
    assert final["madds_mf1"] == tiny_madds(EXX, 1.0)
    assert final["total"] == 200 and final["reached_80"] is False
    assert final["correct"] == round(final["top1"] * 2)
    assert final["score"] == pytest.approx(0.5 * final["params"] / 36.5e6 + final["madds"] / 10.49e9)
    assert final["top1"] == pytest.approx(stages[-1]["best_top1"])
    md = (save / "chain_report.md").read_text()
    assert md.startswith("# Label-refinery chain report")
    assert f"parameters {final['params']:,}; mult-adds {final['madds']:,.0f} (mul_factor 0.5)" in md
    assert (save / "chain_curves.png").stat().st_size > 0
    # The chain's ETA, said once: stage 1's own time left (train.py's first ETA line for the run)
    # plus stages 2 and 3 at stage 1's speed there, scaled by their cost per sample (3 student
    # forwards + the teacher's, in mult-adds) relative to stage 1's.
    assert out.count("ETA for the whole chain") == 1
    m = re.search(r"ETA: \S+ for the rest of epoch 1, (\S+) for the run \(1 epoch\(s\) left, ([\d.e+]+) img/s\)",
                  out)
    assert m, out
    (stage_left, stage_res), images_s = duration(m.group(1)), float(m.group(2))
    seconds, res, stage, chain_images_s = chain_eta(out)
    assert stage == 1 and chain_images_s == images_s
    costs = [3 * tiny_madds(EX), 3 * tiny_madds(EX) + tiny_madds(EX), 3 * tiny_madds(EXX) + tiny_madds(EX)]
    later = sum(1 * 160 * c / (images_s * costs[0]) for c in costs[1:])
    # Rounding: both printed durations (whole units, the last one truncated), img/s to 3 digits.
    assert abs(seconds - (stage_left + later)) <= res + stage_res + 1 + later * 0.01, (seconds, stage_left, later)


@pytest.mark.slow
def test_chain_rerun_skips_finished_stages(chained):
    save, argv, _ = chained
    folders = run_folders(save)
    code, out = run_chain(argv)
    assert code == 0
    assert out.count("finished before") == 3 and "ETA" not in out  # nothing trained
    assert run_folders(save) == folders


@pytest.mark.slow
def test_chain_refuses_a_changed_stage_list(chained):
    save, argv, _ = chained
    folders = run_folders(save)
    with pytest.raises(UserError, match="belongs to a chain of stages efficientnet_ex,efficientnet_ex,"
                                        "efficientnet_exx; use another --save folder"):
        run_chain([*argv, "--stages", "efficientnet_ex,efficientnet_exx"])
    assert run_folders(save) == folders


@pytest.mark.slow
@pytest.mark.parametrize("flags,needle", [
    (["--seed", "3"], "--seed 3 (before: 0)"),
    (["--lr-regime", "1", "1", "0.1"], "--lr-regime 1 1 0.1 (before: 1 25 0.07"),
    (["--aug", "standard"], "--aug standard (before: none)"),
])
def test_chain_refuses_changed_flags(chained, capsys, flags, needle):
    save, argv, _ = chained
    folders = run_folders(save)
    with pytest.raises(SystemExit) as e:
        run_main(chain.main, [*argv, *flags])
    assert e.value.code == 1   # the flags are valid; the save folder holds a chain of other settings
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stage 1 (efficientnet_ex)" in err[0] and needle in err[0], err
    assert "use the same flags as before or another --save folder" in err[0]
    assert run_folders(save) == folders


@pytest.mark.slow
def test_chain_resumes_an_unfinished_stage(tmp_path, synthetic_dir, monkeypatch):
    """A chain stopped (SIGTERM, as a scheduler preempts) after stage 2's first epoch: the same
    command again skips stage 1 and continues stage 2 in its own folder from epoch 2."""
    save = tmp_path / "chain"
    argv = [*CHAIN, "--stages", f"{EX},{EXX}", "--epochs", "2", "--data_dir", synthetic_dir, "--save", str(save)]
    from engine.trainer import Trainer
    real = Trainer.fit

    def preempted(trainer):
        def after(row):
            if trainer.cfg.model == EXX and row["epoch"] == 1:
                os.kill(os.getpid(), signal.SIGTERM)  # arrives before the run's next stop check
        trainer.hooks.on_epoch = after
        return real(trainer)
    monkeypatch.setattr(Trainer, "fit", preempted)  # chain.py trains each stage with a Trainer
    code, out = run_chain(argv)
    assert code == 0 and "[chain] stopped; run the same command again to continue" in out, out
    state = json.load(open(save / "chain_state.json"))
    assert [(s["model"], s["finished"]) for s in state["stages"]] == [(EX, True), (EXX, False)]
    folder = state["stages"][1]["folder"]
    before = checkpoint.load_file(os.path.join(folder, "last.pytar"))
    assert before["train"]["next_epoch"] == 2 and [h["epoch"] for h in before["history"]] == [1]
    folders = run_folders(save)
    monkeypatch.undo()
    code, out = run_chain(argv)
    assert code == 0, out
    assert f"[chain] stage 1/2 {EX}: finished before" in out
    assert f"stage 2/2 {EXX} refined by {EX}" in out
    assert run_folders(save) == folders  # no new run: stage 2 continued in its folder
    state = json.load(open(save / "chain_state.json"))
    assert [(s["model"], s["finished"], s["epochs"]) for s in state["stages"]] == [(EX, True, 2), (EXX, True, 2)]
    assert state["stages"][1]["folder"] == folder
    after = checkpoint.load_file(os.path.join(folder, "last.pytar"))
    assert [h["epoch"] for h in after["history"]] == [1, 2] and after["history"][0] == before["history"][0]
    assert f"resuming {folder}" in open(os.path.join(folder, "log.txt")).read()
    assert json.load(open(save / "chain_report.json"))["stages"][1]["epochs"] == 2


def eta_lines(stages, i, images_per_s, stage_left_s, *flags):
    lines = []
    cfg = chain.parse_args(["--stages", ",".join(stages), "--width-mult", "0.25", *flags])
    eta = chain.ChainEta(cfg, lines.append)
    eta.on_speed(i, images_per_s, stage_left_s)
    eta.on_speed(i, images_per_s, stage_left_s)  # said once, for the first stage the command trains
    return lines


def near(printed, expected):
    """A format_duration figure (whole seconds rounded; minutes and hours cut) for `expected` s."""
    seconds, resolution = printed
    return -0.5 <= expected - seconds < resolution + 0.5


def test_chain_eta_adds_the_later_stages_at_the_measured_speed_scaled_by_cost():
    """ETA = the measured stage's own time left + for each later stage: its epochs x the samples
    of an epoch x its cost / (the measured speed x the measured stage's cost). A stage's cost is 3
    student forwards plus its teacher's forward, in mult-adds (here at width 0.25, each model at
    its own depth); epochs are --epochs or each model's own (ex 75); an epoch holds the
    augmentation's copies of the training images."""
    count = lambda name: torchscope.count(models.create(name, width_mult=0.25), mul_factor=1.0).madds(1.0)
    ex, exx, b3 = count(EX), count(EXX), count("efficientnet_b3")
    assert exx < ex < b3  # depth 0.7, 0.8 and 1.4
    lines = eta_lines([EX, EXX], 0, 250.0, 600.0, "--epochs", "3", "--train-limit", "1000", "--aug", "uci")
    assert len(lines) == 1
    seconds, res, stage, images_s = chain_eta(lines[0])
    later = 3 * (3 * 1000) * (3 * exx + ex) / (250.0 * 3 * ex)
    assert stage == 1 and images_s == 250 and near((seconds, res), 600 + later), (seconds, 600 + later)
    # The last stage: its own time left only.
    (line,) = eta_lines([EX, EXX], 1, 250.0, 600.0, "--epochs", "3")
    assert chain_eta(line) == (600, 1, 2, 250.0)
    # Defaults: every training image, once per epoch (--aug none), and ex's own 75 epochs.
    lines = eta_lines(["efficientnet_b3", EX], 0, 1000.0, 30.0, "--aug", "none")
    expected = 30 + 75 * 50_000 * (3 * ex + b3) / (1000.0 * 3 * b3)
    assert near(chain_eta(lines[0])[:2], expected), (lines, expected)
    # More than a day on a CPU: a second line says how to make the run quick.
    lines = eta_lines(["efficientnet_b3", EX], 0, 10.0, 30.0, "--aug", "none")
    if not torch.cuda.is_available():
        assert len(lines) == 2 and "the chain would take days" in lines[1]


def test_chain_flag_errors(capsys):
    with pytest.raises(SystemExit) as e:
        chain.main(["--stages", "efficientnet_ex,resnet18"])
    assert e.value.code == 2
    assert "unknown model(s) resnet18" in capsys.readouterr().err
