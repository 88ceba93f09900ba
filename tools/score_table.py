#!/usr/bin/env python
"""The README's "Lowering the score" table: efficientnet_ex at sparsity 0/50/75% x bits 32/16/8/4,
each cell a real checkpoint made by train.py from one dense checkpoint (--init-from) and scored by
torchscope/count.py --rules micronet, with the commands the README documents. Each cell is the one
score the rules allow for it (count.py's "score"), with the rule it follows.

    python tools/score_table.py --data_dir D --dense RUN/model_best.pytar     # compress a trained ex
    python tools/score_table.py --data_dir D                                  # CPU: a short dense run first

The counts (and so the scores) depend on the architecture, the bits and the masks, not on how long
the runs trained; accuracy does. --epochs and --train-limit make short runs that give the table's
counts on a CPU; a real table of accuracies needs full runs on a GPU (the README says which).
Writes the table (table.md), the scores (score-table.json) and the commands (commands.log) under
--out (default bench/results/score-table/, where the README's table came from); each cell's run
folder and full count (CELL/count.json) stay beside them, out of git. It makes documentation, not a
measurement, so it lives in tools/ rather than among the benchmarks.
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import time

# `python tools/NAME.py` puts tools/ on sys.path, not the root that holds the project's packages.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if not __package__:
    sys.path.insert(0, ROOT)

import torch

from micronet_cifar100 import errors
from bench.common import environment
from micronet_cifar100.cli import args as cli_args
from micronet_cifar100.cli.errors import run_main
from engine.run_folder import write_json, write_text_atomic

SPARSITIES = (0.0, 0.5, 0.75)
BITS = (32, 16, 8, 4)


def run(cmd, log):
    """Run a documented command as a user would; its output goes to the log, a failure stops here."""
    line = shlex.join(cmd)
    print(f"$ {line}", flush=True)
    with open(log, "a") as f:
        f.write(f"$ {line}\n")
        f.flush()
        p = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, text=True)
    if p.returncode:
        raise errors.RunError(f"{cmd[1]} failed (exit {p.returncode}); see {log}")


def newest_run(save):
    runs = [os.path.join(save, d) for d in os.listdir(save) if os.path.isdir(os.path.join(save, d))]
    return max(runs, key=os.path.getmtime)


def compression_flags(sparsity, bits, epochs):
    flags = []
    if sparsity:
        # A short run prunes at its first epoch; a real one uses the default span (2/3 of the run).
        flags += ["--prune", f"{sparsity:g}"] + (["--prune-schedule", "1", "1"] if epochs <= 2 else [])
    if bits < 32:
        flags += ["--quant", str(bits), str(bits)]
    return flags


def score(checkpoint_file, out_json, log):
    run([sys.executable, "torchscope/count.py", "--rules", "micronet", "--model-state-file", checkpoint_file,
         "--json", out_json], log)
    with open(out_json) as f:
        return json.load(f)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_dir", "--data-dir", dest="data_dir", required=True)
    p.add_argument("--dense", default=None, help="a trained efficientnet_ex model_best.pytar (default: a "
                                                 "short dense run is made first)")
    p.add_argument("--epochs", type=cli_args.positive_int, default=1, help="epochs of each compression run")
    p.add_argument("--train-limit", type=cli_args.positive_int, default=512)
    p.add_argument("--test-limit", type=cli_args.positive_int, default=500)
    p.add_argument("--batch-size", type=cli_args.positive_int, default=64)
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "score-table"))
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    log = os.path.join(args.out, "commands.log")
    short = ["--train-limit", str(args.train_limit), "--test-limit", str(args.test_limit), "--batch-size",
             str(args.batch_size), "--aug", "standard", "--no-download", "--no-progress", "--data_dir", args.data_dir]
    t0 = time.time()
    dense = args.dense
    if dense is None:
        save = os.path.join(args.out, "dense")
        run([sys.executable, "train.py", "--model", "efficientnet_ex", "--epochs", "1", *short, "--save", save], log)
        dense = os.path.join(newest_run(save), "model_best.pytar")
    cells = []
    for sparsity in SPARSITIES:
        for bits in BITS:
            name = f"s{int(100 * sparsity)}-w{bits}"
            if not sparsity and bits == 32:
                ckpt = dense  # the dense fp32 model itself
                top1 = None
            else:
                save = os.path.join(args.out, name)
                run([sys.executable, "train.py", "--model", "efficientnet_ex", "--init-from", dense,
                     "--epochs", str(args.epochs), *compression_flags(sparsity, bits, args.epochs), *short,
                     "--save", save], log)
                ckpt = os.path.join(newest_run(save), "model_best.pytar")
                with open(os.path.join(newest_run(save), "status.json")) as f:
                    top1 = json.load(f)["best"]["top1"]
            os.makedirs(os.path.join(args.out, name), exist_ok=True)
            counted = score(ckpt, os.path.join(args.out, name, "count.json"), log)
            cells.append({"sparsity": sparsity, "bits": bits, "checkpoint": os.path.relpath(ckpt, ROOT),
                          "short_run_top1": top1,
                          "score": counted["score"], "score_convention": counted["score_convention"],
                          "score_rule": counted["score_rule"]})
    table = markdown(cells)
    write_text_atomic(os.path.join(args.out, "table.md"), table)
    write_json(os.path.join(args.out, "score-table.json"),
               {"environment": environment(torch.device("cpu")), "dense": os.path.relpath(dense, ROOT),
                "epochs": args.epochs, "train_limit": args.train_limit, "cells": cells,
                "seconds": round(time.time() - t0)})
    print(table)
    return 0


# Column heads: what each width means in the runs (32: no --quant at all; 16: simulated float16).
BITS_HEAD = {32: "float32 (no --quant)", 16: "W16/A16 (float16)", 8: "W8/A8", 4: "W4/A4"}
RULE_MARK = {"freebie": "freebie", "full": "no freebie"}


def markdown(cells):
    """Rows: sparsity; columns: bits; each cell the one MicroNet score the rules allow, and which
    rule it follows (the 16-bit freebie, or none once a layer is below 16 bits)."""
    head = "| sparsity \\ bits | " + " | ".join(BITS_HEAD[b] for b in BITS) + " |"
    lines = [head, "|---" * (len(BITS) + 1) + "|"]
    for s in SPARSITIES:
        row = [c for c in cells if c["sparsity"] == s]
        lines.append(f"| {int(100 * s)}% | " + " | ".join(
            f"{c['score']:.6f} ({RULE_MARK[c['score_convention']]})" for c in sorted(row, key=lambda c: -c["bits"]))
            + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(run_main(main))
