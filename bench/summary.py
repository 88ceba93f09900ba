#!/usr/bin/env python
"""Markdown tables from benchmark results: the data bench, step benches, memory, a training run, ETA.

    python bench/summary.py RESULTS_DIR_OR_JSONS... [--train-run RUN_DIR] [--title T] [--out summary.md]

gpu.sh writes its summary.md with this; the CPU tables of bench/PERFORMANCE.md come from it too, and
the benchmarks print their own results with the same tables.
"""
import argparse
import csv
import os
import sys

# `python bench/NAME.py` puts bench/ on sys.path, not the root that holds the project's packages.
if not __package__:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import eta as eta_mod
from bench.common import fmt, load_results, markdown_table, median, thread_label, write_json
from micronet_cifar100.cli.errors import run_main
from engine import run_folder


def environment_section(docs):
    d = next((d for d in docs if d.get("torch")), None)
    if d is None:
        return ""
    parts = [f"device: {d.get('device_name')}", f"torch {d.get('torch')}"]
    if d.get("cuda"):
        parts.append(f"CUDA {d['cuda']}, cuDNN {d.get('cudnn')}")
    parts += [f"{d.get('cpu_count')} CPUs ({d.get('cpu_model')})", f"commit {d.get('commit')}"]
    return "; ".join(str(p) for p in parts)


def data_table(d):
    """A data bench's images/s: ours at each thread count, the reference definition, torchvision."""
    per_cpu, cpu_ratio = d.get("ours_images_per_cpu_s_by_threads", {}), d.get("ratio_per_cpu_s_by_threads", {})
    tv, tv_cpu = d["torchvision_images_per_s"], d.get("torchvision_images_per_cpu_s")
    rows = [[f"ours, {thread_label(t)}", fmt(v), fmt(d["ratio_by_threads"][t], 1), fmt(per_cpu.get(t)),
             fmt(cpu_ratio.get(t), 1)] for t, v in d["ours_images_per_s_by_threads"].items()]
    rows += [[f"reference definition, {thread_label(t)}", fmt(v), fmt(v / tv, 1), "-", "-"]
             for t, v in d.get("reference_images_per_s_by_threads", {}).items()]
    rows.append([f"torchvision, {d['workers']} workers", fmt(tv), "1.0", fmt(tv_cpu), "1.0" if tv_cpu else "-"])
    return markdown_table(["pipeline", "images/s", "x torchvision", "images/CPU-s", "x torchvision"], rows)


def data_section(docs):
    return "\n\n".join(
        f"`{d.get('recipe', 'uci')}` augmentation, batch {d['batch_size']}, on {d['device']} ({d['data']}; "
        f"load average {d.get('load_average_1min', 0):.1f} at the start):\n\n" + data_table(d)
        for d in docs if d["bench"] == "data")


def sync_table(d):
    """A sync_check result's host synchronisations by source line, most frequent first."""
    rows = [[where, str(n), f"{n / max(d['steps'], 1):.3f}"] for where, n in
            sorted(d["syncs"].items(), key=lambda kv: -kv[1])] or [["(none)", "0", "0"]]
    return markdown_table(["where", "syncs", "per step"], rows)


def sync_section(docs):
    return "\n\n".join(
        f"{d['syncs_total']} in {d['steps']} steps on {d['device']} (the non-finite check runs every "
        f"{d.get('nan_check_every', '?')} steps; detector: {d['detector']}):\n\n" + sync_table(d)
        for d in docs if d["bench"] == "sync_check")


def _model_label(d):
    full = eta_mod.FULL_SIZE.get(d["model"]) == (d.get("width_mult"), d.get("depth_mult"))
    name = eta_mod.SHORT.get(d["model"], d["model"])
    return name if full else f"{name} (w {d['width_mult']:g}, d {d['depth_mult']:g})"


def _teacher_label(d):
    name = eta_mod.SHORT.get(d["teacher"], d["teacher"])
    w, dm = d.get("teacher_width_mult"), d.get("teacher_depth_mult")
    return name + (f" w {w:g} d {dm:g}" if w is not None or dm is not None else "")


def step_section(docs):
    """Every mode of the step benches, one row each; bench/step.py prints its own result with it."""
    steps = [d for d in docs if d["bench"] == "step"]
    rows = []
    for d in sorted(steps, key=lambda d: (d["model"], d.get("width_mult") or 0, d["batch_size"], d.get("_file", ""))):
        for mode, m in d["modes"].items():
            label = mode + (f" ({_teacher_label(d)} teacher)" if mode.startswith("refined/") else "")
            if "train_images_per_s" not in m:
                rows.append([_model_label(d), d["batch_size"], label] + ["-"] * 6
                            + [(m.get("error") or "not run")[:70]])
                continue
            note = (["compile failed: eager"] if m.get("compiled") is False else []) + \
                ([f"compile {m['compile_s']:.0f} s"] if m.get("compile_s") else [])
            rows.append([_model_label(d), d["batch_size"], label, fmt(m["train_images_per_s"]),
                         fmt(m.get("train_speedup"), 2), f"{m['step_ms']:.1f}", fmt(m.get("eval_images_per_s")),
                         fmt(m.get("eval_speedup"), 2), fmt(m.get("peak_mem_mb")), ", ".join(note)])
    if not rows:
        return ""
    kinds = sorted({d["peak_mem_kind"] for d in steps})
    rounds = sorted({(d["rounds"], d["steps"]) for d in steps})
    return (markdown_table(["model", "batch", "mode", "train img/s", "x", "ms/step", "eval img/s", "x",
                            "peak MB", "note"], rows)
            + "\n\nx: speed-up over eager-fp32 (a refined mode: over refined/eager-fp32), median of the "
              "per-round ratios. Peak MB: " + "; ".join(kinds)
            + ". Rounds x timed steps: " + ", ".join(f"{r} x {s}" for r, s in rounds) + ".")


def memory_section(docs):
    """Peak MB per model (rows) and batch size / mode (columns)."""
    table, cols = {}, set()
    for d in (d for d in docs if d["bench"] == "step"):
        for mode, m in d["modes"].items():
            if m.get("peak_mem_mb") is not None and not mode.startswith("refined/"):
                cols.add((d["batch_size"], mode))
                table.setdefault(_model_label(d), {})[d["batch_size"], mode] = m["peak_mem_mb"]
    cols = sorted(cols)
    rows = [[name] + [fmt(v.get(c)) for c in cols] for name, v in sorted(table.items())]
    return markdown_table(["model"] + [f"batch {b} {m}" for b, m in cols], rows) if rows else ""


def train_section(run_dir, info=None):
    path = os.path.join(run_dir, "metrics.csv") if run_dir else None
    if not path or not os.path.exists(path):
        return "no training run results" + (f" ({info.get('note')})" if info and info.get("note") else "")
    with open(path) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return "the training run finished no epoch"
    col = lambda k: [float(r[k]) for r in rows]
    secs, speeds = col("seconds"), col("images_per_s")
    last, best = rows[-1], max(rows, key=lambda r: float(r["test_top1"]))
    planned = f" of {info['epochs']} planned" if info and info.get("epochs") else ""
    lines = [f"epochs finished: {len(rows)}{planned}",
             f"seconds per epoch (train part, from metrics.csv): first {secs[0]:.1f} (includes any compile), "
             f"median of the rest {median(secs[1:] or secs):.1f}",
             f"train images/s (median of epochs 2+): {fmt(median(speeds[1:] or speeds))}",
             f"test top-1 after the last epoch ({last['epoch']}): {float(last['test_top1']):.2f}%; best "
             f"{float(best['test_top1']):.2f}% at epoch {best['epoch']}"]
    lines += [f"{k.replace('_', ' ')}: {info[k]}" for k in ("command", "wall_s", "exit_code", "data", "note")
              if info and info.get(k) is not None]
    table = markdown_table(["epoch", "lr", "train loss", "train top-1", "test top-1", "img/s", "seconds"],
                           [[r["epoch"], r["lr"], f"{float(r['train_loss']):.3f}", f"{float(r['train_top1']):.2f}",
                             f"{float(r['test_top1']):.2f}", fmt(float(r["images_per_s"])),
                             f"{float(r['seconds']):.1f}"] for r in rows])
    return "\n".join(f"- {x}" for x in lines) + "\n\n" + table


def eta_section(docs, any_width=False):
    speeds = eta_mod.speeds_from_docs(docs, full_size_only=not any_width)
    return "\n\n".join(eta_mod.format_eta(eta_mod.chain_eta(speeds, b, ["all", "all-eager", "eager-fp32"]))
                       for b in sorted({b for _, b in speeds}))


def build(paths, train_run=None, title="Benchmark results", train_info=None, extra=None, any_width=False,
          eta=True):
    docs = load_results(paths)
    parts = [f"# {title}", environment_section(docs)]
    for head, body in (("Data pipeline", data_section(docs)), ("Train and eval step", step_section(docs)),
                       ("Peak memory (MB)", memory_section(docs)),
                       ("Host synchronisations in the epoch loop", sync_section(docs)),
                       ("Training run", train_section(train_run, train_info) if train_run or train_info else ""),
                       ("Whole-chain ETA at these speeds", eta_section(docs, any_width) if eta else "")):
        if body:
            parts.append(f"## {head}\n\n{body}")
    if extra:
        parts.append(extra)
    return "\n\n".join(p for p in parts if p) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+", help="result JSONs or folders of them")
    p.add_argument("--train-run", default=None, help="a train.py run folder (its metrics.csv)")
    p.add_argument("--train-info", default=None, help="JSON with the run's command, planned epochs, ...")
    p.add_argument("--notes", default=None, help="a text file appended under 'Notes'")
    p.add_argument("--title", default="Benchmark results")
    p.add_argument("--any-width", action="store_true", help="ETA from narrowed models' results too")
    p.add_argument("--no-eta", action="store_true", help="leave the chain ETA out")
    p.add_argument("--results-json", default=None, help="also write every result JSON merged into one")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    info = run_folder.read_json(a.train_info) if a.train_info else None
    extra = None
    if a.notes and os.path.exists(a.notes):
        with open(a.notes) as f:
            extra = "## Notes\n\n" + f.read().strip()
    text = build(a.paths, a.train_run, a.title, info, extra, a.any_width, not a.no_eta)
    if a.results_json:
        merged = {d.pop("_file"): d for d in load_results(a.paths)}
        if info:
            merged["train_info"] = info
        write_json(a.results_json, merged)
    if a.out:
        run_folder.write_text_atomic(a.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
