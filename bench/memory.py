#!/usr/bin/env python
"""Activation memory of a training step, estimated from torchscope's count, with and without
per-block activation checkpointing.

    python bench/memory.py [--batch-size 128 512] [--models efficientnet_ex ...] [--json OUT]

torchscope's memory() gives the original's "forward/backward pass size": 2 x 2 x (elements every leaf
module outputs per sample) / 2**20, which reads as float32 MB per sample of all the activations a
backward pass keeps (the original count.py's convention; see torchscope.counter.Report.memory). Autograd keeps about
that much: each conv, BN and Swish saves its input or output. From it:

  fp32        per-sample MB x batch
  bf16        half of it: under autocast the convs, BN and Swish outputs are bf16
  checkpoint  per-block checkpointing (torch.utils.checkpoint around each MBConv): kept are only the
              blocks' inputs, plus the internals of the one block being recomputed in backward

These are estimates of the activations alone; add weights, gradients and momentum (3 x 4 bytes x
params, a few tens of MB here), cuDNN workspaces and the allocator's slack. bench/step.py measures
the real peak.
"""
import argparse
import os
import sys

# `python bench/NAME.py` puts bench/ on sys.path, not the root that holds the project's packages.
if not __package__:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

import models
import torchscope
from bench.common import MiB, markdown_table, write_json
from micronet_cifar100.cli import args as cli_args
from micronet_cifar100.cli.errors import run_main


def block_elements(model):
    """Per sample: (sum of the inputs of features' children, the largest child's leaf outputs)."""
    report = torchscope.count(model)
    inside = {}
    for row in report.rows:
        if not row.leaf or not row.name.startswith("features."):
            continue
        block = ".".join(row.name.split(".")[:2])
        inside[block] = inside.get(block, 0) + row.activations
    inputs = []
    hooks = [m.register_forward_hook(lambda m, i, o: inputs.append(i[0][0].numel()))
             for m in model.features]
    model.eval()
    with torch.no_grad():
        model(torch.zeros(2, 3, 32, 32))
    for h in hooks:
        h.remove()
    head = report.activations - sum(inside.values())  # pool and classifier: kept whole
    return report, sum(inputs) + head, max(inside.values())


def estimate(name, batches):
    model = models.create(name)
    report, kept, largest = block_elements(model)
    per_sample_mb = report.memory()["forward_backward_mb"]
    ckpt_mb = 4 * (kept + largest) / MiB
    out = {"model": name, "params": report.total_params, "fp32_mb_per_sample": per_sample_mb,
           "checkpoint_fp32_mb_per_sample": ckpt_mb, "by_batch": {}}
    for b in batches:
        out["by_batch"][str(b)] = {"fp32_gb": per_sample_mb * b / 1024, "bf16_gb": per_sample_mb * b / 2048,
                                   "checkpoint_fp32_gb": ckpt_mb * b / 1024,
                                   "checkpoint_bf16_gb": ckpt_mb * b / 2048}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=cli_args.positive_int, nargs="+", default=[128, 512])
    p.add_argument("--models", type=cli_args.model_name, nargs="+", default=models.names())
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    rows, docs = [], []
    for name in a.models:
        e = estimate(name, a.batch_size)
        docs.append(e)
        for b in a.batch_size:
            g = e["by_batch"][str(b)]
            rows.append([name.replace("efficientnet_", ""), b, f"{e['fp32_mb_per_sample']:.1f}",
                         f"{g['fp32_gb']:.2f}", f"{g['bf16_gb']:.2f}", f"{g['checkpoint_fp32_gb']:.2f}",
                         f"{g['checkpoint_bf16_gb']:.2f}"])
    print(markdown_table(["model", "batch", "MB/sample fp32", "fp32 GB", "bf16 GB", "checkpointed fp32 GB",
                          "checkpointed bf16 GB"], rows))
    if a.json:
        write_json(a.json, {"bench": "memory-estimate", "estimates": docs})
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
