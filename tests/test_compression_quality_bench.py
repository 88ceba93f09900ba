"""bench/compression_quality.py --quick on real CIFAR-100, as a user runs it: a dense narrow ex, then
each recipe fine-tuned from it with the same budget and evaluated with test.py's path and counted with
count.py's rules."""
import json
import os
import subprocess
import sys

import pytest

from bench import compression_quality as cq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_quick_benchmark_rows_on_real_data(cifar_dir, tmp_path):
    out = tmp_path / "cq"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "compression_quality.py"), "--quick",
                           "--data_dir", cifar_dir, "--out", str(out), "--quiet"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.load(open(out / "compression-quality.json"))
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == list(cq.QUICK_ROWS)
    dense = rows["dense"]
    for name, r in rows.items():
        assert r["total"] == 2000 and 0 <= r["top1"] <= 100 and r["correct"] == round(r["top1"] * 20)
        assert not r["above_limit"] and not r["empty_layers"], name
        assert r["score"] > 0
        if name != "dense":
            assert r["score"] < dense["score"], name
            assert 0.75 <= r["sparsest"] <= r["max_sparsity"] + 1e-9, name
            assert "--prune" in r["flags"] and r["settings"]["prune_exclude"] == ["stem", "head"]
    # 4-bit weights and inputs cost less than fp32 at the same sparsity and scope.
    assert rows["w4a4-lsq-prune75-global-bn"]["score"] < rows["prune75-global-bn"]["score"]
    assert rows["w4a4-lsq-prune75-global-bn"]["settings"]["quant_method"] == "lsq"
    # Each row is a run of its own, from the one dense model.
    for name in cq.QUICK_ROWS:
        assert len(os.listdir(out / "rows" / name)) == 1, name
    assert len([d for d in os.listdir(out / "runs" / "dense") if not d.startswith(".")]) == 1
    table = (out / "table.md").read_text()
    assert all(f"`{name}`" in table for name in cq.QUICK_ROWS) and "best at its score" in table
    assert set(result["best_at_score"]) <= set(rows) and result["best_at_score"]


def test_rows_cover_the_issue_and_fill_the_run_defaults():
    rows = cq.all_rows()
    assert {f"prune{t}-{s}" for t in (50, 75, 90) for s in cq.SCOPES} <= set(rows)
    assert {f"w{b}a{b}-{m}" for b in (8, 4) for m in cq.METHODS} <= set(rows)
    assert {f"w4a4-{m}-prune75-{s}" for m in cq.METHODS for s in cq.SCOPES} <= set(rows)
    s = cq.settings_of(rows["w4a4-minmax-prune75-layer"])
    assert s["quant_first_last"] == [8, 8] and s["prune_scope"] == "layer" and s["prune_max_sparsity"] == 0.95
    assert cq.flags_of(cq.settings_of(rows["w4a4-lsq-prune75-global-bn-nofreeze"]))[-4:] == \
        ["--qat-freeze-observers", "never", "--qat-freeze-bn", "never"]
    front = cq.pareto([{"name": "a", "score": 1.0, "top1": 50.0}, {"name": "b", "score": 0.5, "top1": 40.0},
                       {"name": "c", "score": 0.6, "top1": 30.0}, {"name": "d", "score": 0.4, "top1": 45.0}])
    assert front == ["d", "a"]


def test_the_defaults_are_the_benchmarks_best_recipe_at_75_percent_w4a4():
    """compress/defaults.py says its defaults are the measured best: the committed full benchmark
    (bench/results/compression-quality/) must agree. Among its rows at 75% sparsity with W4/A4, the
    one with the run's default scope, quantiser and freeze epochs loses the fewest points against
    the dense fine-tune, and no row has a layer past its limit or without weights."""
    import compress
    path = os.path.join(ROOT, "bench", "results", "compression-quality", "compression-quality.json")
    result = json.load(open(path))
    assert not result["quick"] and result["sizes"]["test_images"] == 10000
    rows = result["rows"]
    assert all(r["total"] == 10000 and not r["above_limit"] and not r["empty_layers"] for r in rows)
    w4a4 = [r for r in rows if r["settings"].get("quant") == [4, 4] and r["settings"].get("prune") == 0.75]
    best = max(w4a4, key=lambda r: r["top1"])
    s = best["settings"]
    assert (s["prune_scope"], s["quant_method"], s["qat_freeze_observers"], s["qat_freeze_bn"]) == \
        (compress.DEFAULT_SCOPE, compress.DEFAULT_METHOD, compress.FREEZE_OBSERVERS_EPOCH or 0,
         compress.FREEZE_BN_EPOCH or 0)
    assert {r["name"] for r in rows} == set(cq.all_rows())
