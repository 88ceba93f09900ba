"""Tests for bench/ (and tools/score_table.py): the step and data benchmarks as commands, the ETA
arithmetic, the summary, the data preparation of gpu.sh and its shell syntax, the scripts without an
installed project. All on the CPU, with tiny models and budgets."""
import io
import json
import lzma
import os
import pickle
import subprocess
import sys
import tarfile

import pytest
import torch

from micronet_cifar100 import errors
from bench import common, eta, prepare_data, step, summary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--width-mult", "0.1", "--depth-mult", "0.1"]


# Small tensors: on a shared 2-core machine a second OpenMP thread mostly waits for the first.
pytestmark = pytest.mark.usefixtures("one_thread")


def run_script(name, *args, timeout=120):
    """Run bench/NAME as a user would (its own sys.path handling included)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", name), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


# ---------------------------------------------------------------- step.py


def test_step_command_writes_every_mode(tmp_path):
    out = tmp_path / "step.json"
    proc = run_script("step.py", "--model", "efficientnet_ex", *TINY, "--device", "cpu", "--batch-size", "4",
                      "--modes", "eager-fp32,channels_last", "--refined-teacher", "efficientnet_b0",
                      "--teacher-width-mult", "0.1", "--teacher-depth-mult", "0.1", "--refined-modes",
                      "eager-fp32", "--steps", "2", "--warmup", "1", "--eval-steps", "1", "--rounds", "1",
                      "--threads", "1", "--json", str(out))
    doc = json.loads(out.read_text())
    for key in ("model", "batch_size", "device", "torch", "cpu_count", "params", "peak_mem_kind", "modes"):
        assert key in doc
    assert doc["device"] == "cpu" and doc["batch_size"] == 4 and doc["teacher"] == "efficientnet_b0"
    assert list(doc["modes"]) == ["eager-fp32", "channels_last", "refined/eager-fp32"]
    for label, m in doc["modes"].items():
        assert m["train_images_per_s"] > 0 and m["eval_images_per_s"] > 0, label
        assert m["peak_mem_mb"] is None or m["peak_mem_mb"] >= 0
        assert m["train_speedup"] > 0 and m["eval_speedup"] > 0
    assert doc["modes"]["eager-fp32"]["train_speedup"] == 1.0
    assert doc["modes"]["channels_last"]["baseline"] == "eager-fp32"
    assert doc["modes"]["refined/eager-fp32"]["baseline"] == "refined/eager-fp32"
    assert doc["modes"]["channels_last"]["config"]["channels_last"] is True
    assert doc["modes"]["eager-fp32"]["optimizer_impl"] == "foreach"
    assert "| channels_last" in proc.stdout  # the table


def test_step_rounds_in_process(capsys):
    """Interleaved rounds keep one figure per round and take speed-ups per round."""
    rc = step.main(["--model", "efficientnet_exx", *TINY, "--device", "cpu", "--batch-size", "2",
                    "--modes", "eager-fp32,forloop-sgd", "--steps", "1", "--warmup", "0", "--eval-steps", "0",
                    "--rounds", "2", "--threads", "1", "--quiet"])
    assert rc == 0
    table = capsys.readouterr().out
    assert "| forloop-sgd" in table and "2 round(s) x 1 steps" in table


def test_step_thread_list_labels():
    a = step.parse_args(["--device", "cpu", "--modes", "eager-fp32,bf16", "--threads", "1,2"])
    assert a.labels == ["eager-fp32@1t", "eager-fp32@2t", "bf16@1t", "bf16@2t"]
    a = step.parse_args(["--device", "cpu", "--modes", "bf16", "--refined-teacher", "efficientnet_b0",
                         "--refined-modes", "eager-fp32"])
    assert a.labels == ["bf16", "refined/eager-fp32"] and a.threads == []


def test_step_labels_and_baselines():
    assert step.split_label("refined/all-eager@2t") == (True, "all-eager", 2)
    assert step.split_label("bf16") == (False, "bf16", None)
    labels = ["eager-fp32@1t", "bf16@1t", "eager-fp32@2t", "refined/eager-fp32@1t", "refined/all@2t"]
    assert step.baseline_of("bf16@1t", labels) == "eager-fp32@1t"
    assert step.baseline_of("eager-fp32@2t", labels) == "eager-fp32@1t"
    assert step.baseline_of("refined/all@2t", labels) == "refined/eager-fp32@1t"
    assert step.baseline_of("refined/all", ["eager-fp32", "refined/all"]) == "eager-fp32"
    assert step.mode_of("all") == step.Mode(channels_last=True, amp="bf16", compile=True, optimizer="fused")


def test_step_rejects_unknown_mode():
    with pytest.raises(SystemExit):
        step.parse_args(["--device", "cpu", "--modes", "eager-fp32,warp-speed"])


# ---------------------------------------------------------------- augmentation.py


def test_augmentation_bench(tmp_path, capsys):
    """Real CIFAR-100 (first 1,000 images) when CIFAR100_DIR is set, else synthetic images."""
    from bench import augmentation
    out = tmp_path / "data.json"
    src = os.environ.get("CIFAR100_DIR")
    data_args = ["--data_dir", src, "--limit", "1000"] if src else ["--synthetic", "1000"]
    assert augmentation.main(["--device", "cpu", *data_args, "--batch-size", "64", "--seconds", "1",
                              "--rounds", "1", "--threads", "1", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    for key in ("ours_images_per_s", "torchvision_images_per_s", "ratio", "device", "batch_size", "torch",
                "cpu_count"):
        assert key in doc
    assert doc["bench"] == "data" and doc["recipe"] == "uci"
    assert doc["ours_images_per_s"] > 0 and doc["torchvision_images_per_s"] > 0
    assert doc["ratio"] == pytest.approx(doc["ours_images_per_s"] / doc["torchvision_images_per_s"])
    assert doc["images"] == 1000 and doc["batch_size"] == 64
    # On the CPU the fast path is timed against the reference definition it equals.
    assert doc["fast_path"] == "data/augment_cpu.py" and list(doc["reference_images_per_s_by_threads"]) == ["1"]
    assert doc["fast_path_gain"] == pytest.approx(
        doc["ours_images_per_s"] / doc["reference_images_per_s_by_threads"]["1"])
    printed = capsys.readouterr().out
    assert "torchvision, 2 workers" in printed and "reference definition, 1 thread" in printed


def test_augmentation_bench_runs_as_a_script():
    # The script puts the repository root on sys.path: the project's `data` package, not a file in
    # bench/, is imported.
    proc = run_script("augmentation.py", "--help")
    assert "torchvision" in proc.stdout


def test_torchvision_side_is_the_original_recipe():
    from bench import augmentation
    images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    loader = augmentation.torchvision_loader(images, torch.arange(10), 4, 0, torch.device("cpu"))
    assert len(loader.dataset) == 30  # three copies
    x, y = next(iter(loader))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y.shape == (4,)
    names = [[type(t).__name__ for t in c.transforms] for c in augmentation.torchvision_recipe()]
    assert names == [["ColorJitter", "RandomHorizontalFlip", "ToTensor", "Normalize"],
                     ["ColorJitter", "RandomResizedCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"],
                     ["RandomResizedCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]]
    crop = augmentation.torchvision_recipe()[1].transforms[1]
    assert crop.scale == (0.3, 1.0) and crop.ratio == (0.8, 1.2)


# ---------------------------------------------------------------- eta.py


def step_doc(model, batch, modes, teacher=None):
    w, d = eta.FULL_SIZE[model]
    return {"bench": "step", "model": model, "width_mult": w, "depth_mult": d, "batch_size": batch,
            "teacher": teacher,
            "modes": {k: {"train_images_per_s": t, "eval_images_per_s": e} for k, (t, e) in modes.items()}}


SPEEDS = [
    step_doc("efficientnet_b3", 256, {"all": (1000, 3000)}),
    step_doc("efficientnet_b0", 256, {"all": (2000, 6000), "refined/all": (1500, 2000)}, "efficientnet_b3"),
    step_doc("efficientnet_ex", 256, {"all": (3000, 9000), "eager-fp32": (1000, 4000)}, "efficientnet_b0"),
]


def test_eta_equals_hand_computation():
    speeds = eta.speeds_from_docs(SPEEDS)
    result = eta.chain_eta(speeds, 256, ["all"])
    # Per epoch: 150,000 training samples and 10,000 test images; a refined stage adds the
    # teacher's eval forward to both.
    b3 = 70 * (150_000 / 1000 + 10_000 / 3000)
    b3_by_b3 = 70 * (150_000 / 1000 + 150_000 / 3000 + 10_000 / 3000 + 10_000 / 3000)
    b0_by_b3 = 70 * (150_000 / 2000 + 150_000 / 3000 + 10_000 / 6000 + 10_000 / 3000)
    ex_by_b0 = 75 * (150_000 / 3000 + 150_000 / 6000 + 10_000 / 9000 + 10_000 / 6000)
    assert [s["seconds"] for s in result["stages"]] == pytest.approx([b3, b3_by_b3, b0_by_b3, ex_by_b0])
    assert result["seconds"] == pytest.approx(b3 + b3_by_b3 + b0_by_b3 + ex_by_b0)
    assert result["seconds"] == pytest.approx(40133.333, abs=0.01)
    # b0's JSON measured its refined step with the b3 teacher: that figure replaces the sum for it.
    b0_measured = 70 * (150_000 / 1500 + 10_000 / 2000)
    assert result["stages"][2]["measured_seconds"] == pytest.approx(b0_measured)
    assert result["seconds_with_measured_refined"] == pytest.approx(b3 + b3_by_b3 + b0_measured + ex_by_b0)


def test_eta_fallback_missing_and_epochs_within():
    speeds = eta.speeds_from_docs(SPEEDS)
    assert "error" in eta.chain_eta(speeds, 256, ["compile"])["stages"][0]
    assert eta.chain_eta(speeds, 512, ["all"])["seconds"] is None
    # ex epoch at "all": 150,000 / 3000 + 10,000 / 9000 = 51.11 s; 300 s - 40 s overhead -> 5 epochs.
    assert eta.epochs_within(speeds, "efficientnet_ex", 256, ["all"], 300, 40) == 5
    assert eta.epochs_within(speeds, "efficientnet_ex", 256, ["compile", "eager-fp32"], 300) == 1
    assert eta.epochs_within(speeds, "efficientnet_ex", 128, ["all"], 300) is None
    # A teacher lacking the student's mode falls back along the same list, and says so.
    only_eager_b0 = [SPEEDS[0], step_doc("efficientnet_b0", 256, {"eager-fp32": (500, 1500)}), SPEEDS[2]]
    last = eta.chain_eta(eta.speeds_from_docs(only_eager_b0), 256, ["all", "eager-fp32"])["stages"][3]
    assert last["mode"] == "all" and last["teacher_mode"] == "eager-fp32"
    assert last["seconds"] == pytest.approx(75 * (150_000 / 3000 + 150_000 / 1500 + 10_000 / 9000 + 10_000 / 1500))
    # Narrowed models do not stand for the chain's unless asked.
    narrow = dict(SPEEDS[0], width_mult=0.25)
    assert eta.speeds_from_docs([narrow]) == {}
    assert eta.speeds_from_docs([narrow], full_size_only=False)


def test_eta_command(tmp_path):
    for i, doc in enumerate(SPEEDS):
        (tmp_path / f"step-{i}.json").write_text(json.dumps(doc))
    (tmp_path / "data.json").write_text(json.dumps({"bench": "data"}))
    assert eta.main([str(tmp_path), "--json", str(tmp_path / "eta.out")]) == 0
    doc = json.loads((tmp_path / "eta.out").read_text())
    assert doc["etas"][0]["seconds"] == pytest.approx(40133.333, abs=0.01)
    assert eta.main([str(tmp_path), "--epochs-within", "300", "--overhead", "40", "--batch-size", "256"]) == 0


# ---------------------------------------------------------------- summary, common, prepare_data, gpu.sh


def test_summary_tables(tmp_path):
    docs = [dict(d, peak_mem_kind="k", rounds=1, steps=2, device="cuda") for d in SPEEDS]
    for d in docs:
        for m in d["modes"].values():
            m.update(step_ms=1.0, peak_mem_mb=100.0, train_speedup=1.0, eval_speedup=1.0)
    for i, doc in enumerate(docs):
        (tmp_path / f"s{i}.json").write_text(json.dumps(doc))
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text(
        "epoch,lr,train_loss,train_top1,test_loss,test_top1,test_top5,images_per_s,seconds\n"
        "1,0.07,4.1,5.0,4.0,8.0,25.0,900,60\n2,0.07,3.5,15.0,3.4,18.5,45.0,3000,50\n")
    text = summary.build([str(tmp_path)], str(run), "T", {"epochs": 2})
    assert "## Train and eval step" in text and "## Peak memory (MB)" in text
    assert "test top-1 after the last epoch (2): 18.50%" in text and "median of the rest 50.0" in text
    assert "total: 11.15 h" in text  # 40,133 s


def test_markdown_table_and_cpus():
    t = common.markdown_table(["a", "bb"], [[1, None], ["xyz", 2]])
    assert t.splitlines() == ["| a   | bb |", "| --- | -- |", "| 1   |    |", "| xyz | 2  |"]
    assert common.parse_cpus("0-1,4") == {0, 1, 4}


def test_cpu_memory_meter_sees_a_big_allocation():
    meter = common.MemoryMeter(torch.device("cpu"))
    meter.start()
    x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    peak = meter.peak_mb()
    del x
    if meter.exact:
        assert 60 <= peak <= 200
    else:
        assert peak is None


def test_prepare_data_joins_checked_parts(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        payload = b"hello cifar"
        info = tarfile.TarInfo("cifar-100-python/meta")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    blob = lzma.compress(buf.getvalue())
    parts = tmp_path / "parts"
    parts.mkdir()
    cut = [0, 5, 11, len(blob)]
    # Eleven parts' worth of names would sort part10 before part2 as text; three suffice to check order.
    for i in range(3):
        (parts / f"cifar-100-python.tar.xz.part{i}").write_bytes(blob[cut[i]:cut[i + 1]])
    found = prepare_data.find_parts(str(parts))
    assert [os.path.basename(p)[-5:] for p in found] == ["part0", "part1", "part2"]
    prepare_data.unpack_parts(found, str(tmp_path / "out"))
    assert (tmp_path / "out" / "cifar-100-python" / "meta").read_bytes() == b"hello cifar"
    (parts / "SHA256SUMS").write_text("0" * 64 + "  cifar-100-python.tar.xz.part1\n")
    with pytest.raises(errors.DataError, match="checksum mismatch"):
        prepare_data.unpack_parts(found, str(tmp_path / "out2"))


def test_prepare_data_synthetic_files(tmp_path):
    prepare_data.write_synthetic(str(tmp_path), sizes={"train": 300, "test": 200})
    with open(tmp_path / "cifar-100-python" / "train", "rb") as f:
        obj = pickle.load(f)
    assert obj["data"].shape == (300, 3072) and obj["data"].dtype.name == "uint8"
    assert sorted(set(obj["fine_labels"])) == list(range(100))


def test_gpu_script_parses():
    subprocess.run(["bash", "-n", os.path.join(ROOT, "bench", "gpu.sh")], check=True)


# Each script run as `python DIR/NAME.py`, in one process (the libraries are imported once), with the
# project's modules forgotten and sys.path restored between scripts.
RUN_EACH = """
import runpy, sys
path0, project = list(sys.path), set(sys.argv[1].split(","))
for script in sys.argv[2:]:
    sys.path[:] = path0
    for name in [n for n in sys.modules if n.split(".")[0] in project]:
        del sys.modules[name]
    sys.argv = [script, "--help"]
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        assert e.code == 0, (script, e.code)
"""


def test_scripts_need_no_installed_project(tmp_path):
    """bench/ and tools/ scripts put the repository root on sys.path themselves: -S leaves out the
    .pth files of site-packages (the editable install), PYTHONPATH gives back the libraries alone."""
    import site
    project = "bench,tools,models,loss,data,refinery,compress,engine,torchscope,deploy,micronet_cifar100"
    scripts = [os.path.join(ROOT, "bench", f"{n}.py") for n in
               ("augmentation", "compression", "eta", "memory", "prepare_data", "step", "summary", "sync_check",
                "deploy_latency")]
    scripts.append(os.path.join(ROOT, "tools", "score_table.py"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(site.getsitepackages()), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-S", "-c", RUN_EACH, project, *scripts], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("usage:") == len(scripts)


def test_memory_estimate_matches_the_seed_readme():
    from bench import memory
    e = memory.estimate("efficientnet_ex", [128])
    # The seed README's forward/backward line for ex: 42.61 (MB per sample, fp32 convention).
    assert e["fp32_mb_per_sample"] == pytest.approx(42.61, abs=0.01)
    g = e["by_batch"]["128"]
    assert g["fp32_gb"] == pytest.approx(42.61 * 128 / 1024, rel=1e-3)
    assert g["bf16_gb"] == pytest.approx(g["fp32_gb"] / 2)
    assert 0 < g["checkpoint_fp32_gb"] < g["fp32_gb"] / 4


# ---------------------------------------------------------------- sync_check.py


def _in_function(location, fn):
    """Whether 'PATH:LINE' (PATH relative to the repository) lies inside the source of function `fn`."""
    import inspect
    path, line = location.rsplit(":", 1)
    lines, start = inspect.getsourcelines(fn)
    return (os.path.join(ROOT, path) == inspect.getsourcefile(fn)
            and start <= int(line) < start + len(lines))


def test_sync_check_sees_only_the_per_interval_check(tmp_path, synthetic_dir, monkeypatch):
    from bench import sync_check
    from engine import trainer
    argv = ["--device", "cpu", "--model", "efficientnet_ex", *TINY, "--data_dir", synthetic_dir,
            "--train-limit", "200", "--test-limit", "50", "--batch-size", "32", "--epochs", "1",
            "--log-interval", "4", "--save", str(tmp_path / "runs")]
    out = tmp_path / "sync.json"
    assert sync_check.main(["--json", str(out), "--", *argv]) == 0
    doc = json.loads(out.read_text())
    steps = doc["steps"]
    assert steps == 19  # 600 samples / 32
    # The GPU cadence: one read of the non-finite counter every 4 steps and at the last step.
    (where, count), = doc["syncs"].items()
    assert _in_function(where, trainer.Trainer.check_finite) and count == steps // 4 + 1, doc["syncs"]

    # A stray .item() in the step is caught, by line.
    make = trainer.make_criterion

    def chatty(*a, **k):
        criterion = make(*a, **k)

        def loss(out, y):
            value = criterion(out, y)
            value.item()  # the stall the check exists to find
            return value
        return loss

    monkeypatch.setattr(trainer, "make_criterion", chatty)
    assert sync_check.main(["--json", str(out), "--", *argv]) == 0
    syncs = json.loads(out.read_text())["syncs"]
    stray = [k for k in syncs if k.startswith("tests/test_bench.py:")]
    assert len(stray) == 1 and syncs[stray[0]] == steps


# ---------------------------------------------------------------- tools/score_table.py

def test_score_table_commands_and_table():
    """The grid's train.py flags per cell, and the markdown table (rows: sparsity; columns: bits)."""
    from tools import score_table
    assert score_table.compression_flags(0.0, 32, 1) == []
    assert score_table.compression_flags(0.5, 32, 30) == ["--prune", "0.5"]
    assert score_table.compression_flags(0.75, 4, 1) == ["--prune", "0.75", "--prune-schedule", "1", "1",
                                                          "--quant", "4", "4"]
    assert score_table.compression_flags(0.0, 16, 1) == ["--quant", "16", "16"]
    cells = [{"sparsity": s, "bits": b, "score": s + b / 1000, "score_convention": "freebie" if b >= 16 else "full"}
             for s in score_table.SPARSITIES for b in score_table.BITS]
    lines = score_table.markdown(cells).splitlines()
    assert lines[0] == "| sparsity \\ bits | float32 (no --quant) | W16/A16 (float16) | W8/A8 | W4/A4 |"
    assert len(lines) == 5
    # One figure a cell, the one the rules allow, and the rule beside it.
    assert lines[3] == ("| 50% | 0.532000 (freebie) | 0.516000 (freebie) | 0.508000 (no freebie) | "
                        "0.504000 (no freebie) |")
