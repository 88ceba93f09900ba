#!/usr/bin/env python
"""Accuracy and score of each compression recipe, on real CIFAR-100, from one dense model.

    python bench/compression_quality.py --data_dir D                  # about 1.5 h on an idle 2-core CPU
    python bench/compression_quality.py --data_dir D --quick --out /tmp/cq    # a few minutes

1. A narrow efficientnet_ex (width 0.25, depth 0.34: the README's quick model) is trained dense
   once with train.py's Trainer and kept under OUT/runs/dense; each row's run goes to
   OUT/rows/NAME. A rerun reuses the dense model and every finished row (resume auto): the
   benchmark continues where it stopped.
2. Every recipe fine-tunes that model with the same budget: the same epochs, the same training
   images, the fine-tuning LR regime of train.py --init-from, distilled (label refinery) from the
   same dense teacher. Pruning follows the default span (the first two thirds of the epochs), QAT
   its schedule (observers frozen from epoch 2, BatchNorm statistics from epoch 3, unless a row
   says otherwise), precise BatchNorm the run's default (auto: recomputed before each evaluation
   of a compressed run).
3. Each recipe's last-epoch weights file is evaluated as test.py evaluates it (its compression
   record applied, float32 numerics) on all 10,000 test images (--quick: the first 2,000), and
   counted as count.py counts it: the score the MicroNet rules allow. The sparsest layer is read
   from the file's masks; a layer past the run's maximum sparsity, or one with only zero weights,
   is reported, which no row may have.

Rows (names in --rows): dense (the baseline fine-tune); prune{50,75,90}-SCOPE for every scope;
w8a8-METHOD and w4a4-METHOD (8-bit first and last layers) for minmax and lsq; w4a4-METHOD-prune75-SCOPE
for every method and scope; and w4a4-lsq-prune75-{global-bn,global-lamp}-nofreeze (QAT without freezing).

Writes OUT/compression-quality.json after every row (the machine, the settings, each row with its
command-line equivalent) and OUT/table.md, the README's table: rows by score, with the best
accuracy at each score marked (no row with a lower or equal score is more accurate).
"""
import argparse
import contextlib
import io
import math
import os
import platform
import sys
import time

if not __package__:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

import compress
import torchscope
from bench import common
from compress.layers import weight_of
from micronet_cifar100 import errors
from micronet_cifar100.cli import args as cli_args
from micronet_cifar100.cli.errors import run_main
from engine import distributed, precise_bn
from engine.config import RunConfig
from engine.evaluate import evaluate_checkpoint
from engine.trainer import train

MODEL = "efficientnet_ex"
SCOPES = compress.SCOPES
METHODS = compress.METHODS


def sizes(quick):
    """The budget: the dense model's training, each recipe's fine-tune, the test images."""
    # The dense model trains with the original entry's augmentation (three copies of each image an
    # epoch); the fine-tunes with one copy (standard: crop and flip), so that their budget is spent
    # on distinct images. The dense run stops after 2 epochs of its regime (its LR never decays).
    if quick:
        return {"width_mult": 0.25, "depth_mult": 0.34, "dense_epochs": 1, "dense_images": 2000,
                "dense_regime": "1 1 0.07", "epochs": 2, "images": 1000, "aug": "standard", "test_images": 2000}
    return {"width_mult": 0.25, "depth_mult": 0.34, "dense_epochs": 2, "dense_images": 50000,
            "dense_regime": "1 3 0.07 4 4 0.007", "epochs": 3, "images": 4000, "aug": "standard",
            "test_images": 10000}


def all_rows():
    """{name: compression settings} in the order they run."""
    # The rows that choose the defaults first (a benchmark stopped early still has them).
    rows = {"dense": {}}
    for method in METHODS:
        for scope in SCOPES:
            rows[f"w4a4-{method}-prune75-{scope}"] = {**quant(4, method), "prune": 0.75, "prune_scope": scope}
    # The freeze epochs measured against no freezing, at two scopes.
    for scope in ("global-bn", "global-lamp"):
        rows[f"w4a4-lsq-prune75-{scope}-nofreeze"] = {**quant(4, "lsq"), "prune": 0.75, "prune_scope": scope,
                                                      "qat_freeze_observers": 0, "qat_freeze_bn": 0}
    for target in (0.5, 0.75, 0.9):
        for scope in SCOPES:
            rows[f"prune{round(100 * target)}-{scope}"] = {"prune": target, "prune_scope": scope}
    for bits in (8, 4):
        for method in METHODS:
            rows[f"w{bits}a{bits}-{method}"] = quant(bits, method)
    return rows


QUICK_ROWS = ("dense", "prune75-global", "prune75-global-bn", "w4a4-minmax-prune75-global-bn",
              "w4a4-lsq-prune75-global-bn")


def quant(bits, method):
    q = {"quant": [bits, bits], "quant_method": method, "qat_freeze_observers": compress.FREEZE_OBSERVERS_EPOCH or 0,
         "qat_freeze_bn": compress.FREEZE_BN_EPOCH or 0}
    if bits < 8:
        q["quant_first_last"] = [8, 8]
    return q


def settings_of(row):
    """A row's compression settings with the run's defaults filled in, as train.py fills them."""
    ns = argparse.Namespace(**{k: None for k in cli_args.PRUNE_ONLY + cli_args.QUANT_ONLY}, prune=None, quant=None)
    for k, v in row.items():
        setattr(ns, k, v)
    cli_args.fill_compression_defaults(ns)
    return {k: getattr(ns, k) for k in ("prune",) + cli_args.PRUNE_ONLY + ("quant",) + cli_args.QUANT_ONLY
            if getattr(ns, k) is not None and k != "prune_schedule"}


def flags_of(settings):
    """train.py's flags for a row's settings (for the JSON: how to rerun a row by hand)."""
    out = []
    for k, v in settings.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, (list, tuple)):
            out += [flag] + ([str(x) for x in v] if v else ["none"])
        else:
            out += [flag, "never" if k.startswith("qat_freeze") and v == 0 else f"{v:g}" if isinstance(v, float)
                    else str(v)]
    return out


def run_config(size, data_dir, save, **changes):
    base = dict(model=MODEL, width_mult=size["width_mult"], depth_mult=size["depth_mult"], data_dir=data_dir,
                no_download=False, save=save, resume="auto", seed=0, no_progress=True, device=size["device"],
                test_limit=min(size["test_images"], 1000))
    settings = {**base, **changes}
    # Every setting counts as given: a resumed (or finished) run takes the benchmark's epochs, not the
    # ones it was saved with, and a run saved with other settings is refused, not silently reused.
    return RunConfig(**settings, given=tuple(k for k in settings if k != "resume"))


def run(cfg, quiet):
    """Train (or find finished) the run `cfg`; its result dict. The run's log goes to its log.txt,
    and to stdout unless quiet."""
    out = io.StringIO() if quiet else contextlib.nullcontext()
    with contextlib.redirect_stdout(out) if quiet else contextlib.nullcontext():
        result = train(cfg)
    if result.get("exit_code") or result.get("stopped"):
        raise errors.RunError(f"the run in {cfg.save} was stopped; rerun the benchmark to continue it")
    return result


def dense_teacher(size, data_dir, out, quiet):
    cfg = run_config(size, data_dir, os.path.join(out, "runs", "dense"),
                     epochs=size["dense_epochs"], train_limit=size["dense_images"], lr_regime=size["dense_regime"])
    t0 = time.perf_counter()
    result = run(cfg, quiet)
    return os.path.join(result["folder"], "model_best.pytar"), time.perf_counter() - t0


def last_weights(folder, epochs):
    return os.path.join(folder, f"model_state_{epochs:02}.pytar")


def measure(path, size, data_dir):
    """test.py's evaluation and count.py's score of one weights file, and its layers' sparsity."""
    args = argparse.Namespace(model=MODEL, coslinear=True, width_mult=size["width_mult"],
                              depth_mult=size["depth_mult"], s=RunConfig.s, amp=None, eval_batch_size=500,
                              test_limit=size["test_images"], data_dir=data_dir, no_download=True)
    ctx = distributed.Context(device=distributed.pick_device(size["device"]))
    r, model, meta = evaluate_checkpoint(args, path, ctx)
    record = meta.get("compression")
    score = torchscope.count(model, rules="micronet", compression=record).score()
    layers = {}
    for name, m in compress.compressible(model).items():
        layers[name] = float((weight_of(m).detach() == 0).float().mean())
    sparsest = max(layers, key=layers.get)
    return {"top1": r["top1"], "correct": r["correct"], "total": r["total"], "score": score["score"],
            "score_rule": score.get("rule"), "sparsest_layer": sparsest, "sparsest": layers[sparsest],
            "empty_layers": compress.empty_layers(model),
            "compression": compress.summary(record) if record else "dense"}


def pareto(rows):
    """Names of the rows no other row beats: none with a lower or equal score is more accurate."""
    best, out = -1.0, []
    for r in sorted(rows, key=lambda r: (r["score"], -r["top1"])):
        if r["top1"] > best:
            out.append(r["name"])
            best = r["top1"]
    return out


def table(result):
    rows = result["rows"]
    dense = next((r for r in rows if r["name"] == "dense"), None)
    front = set(pareto(rows))
    lines = ["| recipe | compression | top-1 | vs dense | score | sparsest layer |",
             "| --- | --- | ---: | ---: | ---: | --- |"]
    for r in sorted(rows, key=lambda r: r["score"]):
        delta = f"{r['top1'] - dense['top1']:+.2f}" if dense else ""
        mark = " **best at its score**" if r["name"] in front else ""
        lines.append(f"| `{r['name']}`{mark} | {r['compression']} | {r['top1']:.2f}% | {delta} | {r['score']:.6f} | "
                     f"{r['sparsest_layer']} {100 * r['sparsest']:.1f}% |")
    return "\n".join(lines) + "\n"


def build_parser():
    p = common.parser(__doc__)
    p.add_argument("--data_dir", required=True, help="holds cifar-100-python/ (downloaded there if missing)")
    p.add_argument("--out", default=os.path.join(common.ROOT, "bench", "results", "compression-quality"),
                   help="where the runs, the JSON and the table go")
    p.add_argument("--quick", action="store_true", help="a few rows, small budget, 2,000 test images")
    p.add_argument("--rows", type=common.one_of(tuple(all_rows())), default=None,
                   help="only these rows (comma-separated; the dense baseline always runs)")
    p.add_argument("--quiet", action="store_true", help="the runs' logs go to their log.txt only")
    p.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    p.add_argument("--width-mult", type=cli_args.multiplier, default=None,
                   help="another width for the model (a GPU: 1 for the full ex)")
    p.add_argument("--depth-mult", type=cli_args.multiplier, default=None)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    size = {**sizes(args.quick), "device": args.device}
    for key in ("width_mult", "depth_mult"):
        if getattr(args, key) is not None:
            size[key] = getattr(args, key)
    every = all_rows()
    names = list(args.rows or (QUICK_ROWS if args.quick else every))
    if "dense" not in names:
        names.insert(0, "dense")
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, "compression-quality.json")
    t_start = time.perf_counter()
    teacher, dense_s = dense_teacher(size, args.data_dir, args.out, args.quiet)
    print(f"[quality] dense model: {teacher} ({dense_s:.0f} s)", flush=True)
    result = {"machine": platform.platform(), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "model": MODEL, "sizes": size, "quick": args.quick, "teacher": os.path.relpath(teacher, args.out),
              "command": "python bench/compression_quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "rows": []}
    for name in names:
        settings = settings_of(every[name])
        t0 = time.perf_counter()
        # The dense baseline evaluates as every compressed row does (precise BN auto recomputes the
        # statistics of a compressed run from COMPRESSED_SAMPLES images): the rows differ by their
        # compression alone.
        extra = {} if settings else {"precise_bn": str(math.ceil(precise_bn.COMPRESSED_SAMPLES / RunConfig.batch_size))}
        cfg = run_config(size, args.data_dir, os.path.join(args.out, "rows", name),
                         init_from=teacher, epochs=size["epochs"], train_limit=size["images"], aug=size["aug"],
                         label_refinery_model=MODEL, label_refinery_state_file=teacher,
                         label_refinery_width_mult=size["width_mult"], label_refinery_depth_mult=size["depth_mult"],
                         **settings, **extra)
        res = run(cfg, args.quiet)
        row = {"name": name, "settings": settings, "flags": flags_of(settings),
               **measure(last_weights(res["folder"], size["epochs"]), size, args.data_dir),
               "seconds": round(time.perf_counter() - t0, 1),
               # The run's own training time (a row reused from an earlier invocation keeps it).
               "train_seconds": round(sum(h["seconds"] for h in res["history"]), 1)}
        limit = settings.get("prune_max_sparsity")
        row["max_sparsity"] = limit
        row["above_limit"] = bool(limit) and row["sparsest"] > limit + 1e-9
        result["rows"].append(row)
        result["wall_s"] = round(time.perf_counter() - t_start, 1)
        common.write_json(json_path, result)
        print(f"[quality] {name}: top-1 {row['top1']:.2f}% ({row['correct']}/{row['total']}), score "
              f"{row['score']:.6f}, sparsest {row['sparsest_layer']} {100 * row['sparsest']:.1f}%, "
              f"{row['seconds']:.0f} s", flush=True)
    result["best_at_score"] = pareto(result["rows"])
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    common.write_json(json_path, result)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table(result))
    print(table(result))
    print(f"[quality] wrote {json_path} ({result['wall_s'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
