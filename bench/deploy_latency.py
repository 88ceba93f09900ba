#!/usr/bin/env python
"""CPU latency per image of the deployed model: ONNX Runtime against PyTorch eager, float32 and
8-bit, side by side in one run.

    python bench/deploy_latency.py --model efficientnet_ex --threads 1 --rounds 5 \
        --json bench/results/deploy-ex-cpu.json

Modes (every model of one architecture, weights random with BatchNorm statistics of random batches;
latency does not depend on the values):

  torch-fp32     the dense model in PyTorch eager, as test.py evaluates it (channels_last, no_grad)
  torch-w8a8     the W8/A8 model as test.py evaluates it: fake-quantised weights and inputs
  ort-fp32       the dense model exported (export.py --onnx), in ONNX Runtime's CPU provider
  ort-w8a8       the W8/A8 model exported as QDQ (int8 weights, uint8 inputs), in ONNX Runtime
  ort-w4a4       the W4/A4 model (8/8 first and last, 75% sparse) exported as QDQ, in ONNX Runtime

Latency is one image per call (batch 1); throughput per image at --batch. The modes are built once
and timed in turn for --rounds rounds, so drift in a shared machine's load hits every mode alike;
each figure is the median over rounds of the round's median call, and each speed-up the median
of the rounds' ratios.
"""
import argparse
import json
import os
import sys
import tempfile
import time

# `python bench/NAME.py` puts bench/ on sys.path, not the root that holds the project's packages.
if not __package__:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

import compress
import deploy
import models
from bench import common
from deploy import onnx_export, runtime
from micronet_cifar100.cli.errors import run_main

MODES = ("torch-fp32", "torch-w8a8", "ort-fp32", "ort-w8a8", "ort-w4a4")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", default="efficientnet_ex", choices=models.names())
    p.add_argument("--width-mult", type=float, default=None)
    p.add_argument("--depth-mult", type=float, default=None)
    p.add_argument("--threads", type=int, default=1, help="torch and ONNX Runtime intra-op threads")
    p.add_argument("--batch", type=int, default=64, help="batch of the throughput measurement")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=20, help="batch-1 calls per mode per round")
    p.add_argument("--modes", type=common.one_of(MODES), default=list(MODES))
    common.add_output_args(p, "write every figure to this JSON file")
    return p


def make(args, quant=None, prune=None):
    torch.manual_seed(args.seed)
    net = models.create(args.model, width_mult=args.width_mult, depth_mult=args.depth_mult)
    net.train()
    with torch.no_grad():
        for _ in range(2):
            net(torch.randn(16, 3, 32, 32))
    pruner = None
    if prune:
        pruner = compress.Pruner(net, compress.PruneSchedule(prune, 1, 1), scope="layer")
        pruner.step(1)
    if quant:
        compress.quantize(net, *quant)
        compress.calibrate(net, [torch.randn(16, 3, 32, 32)])
    net.eval()
    return net, compress.record(net, pruner) if (quant or prune) else None


def torch_runner(net):
    net = net.to(memory_format=torch.channels_last)

    def call(x):
        with torch.no_grad():
            return net(x.contiguous(memory_format=torch.channels_last))
    return call


def ort_runner(net, record, folder, tag, threads, info):
    path = os.path.join(folder, f"{tag}.onnx")
    graph = deploy.fold(net, record, arch=models.describe(net))
    onnx_export.export(graph, path)
    k = runtime.kernels(path)
    info[tag] = {"onnx_bytes": os.path.getsize(path),
                 "integer_kernels": {op: len(v) for op, v in k["integer"].items()},
                 "float_layer_kernels": {op: len(v) for op, v in k["float_layers"].items()},
                 "onnxruntime": k["version"]}
    sess = runtime.session(path, threads=threads)
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x.numpy()})[0]


def timed(call, x, n):
    times = []
    for _ in range(n):
        t = time.perf_counter()
        call(x)
        times.append(time.perf_counter() - t)
    return common.median(times)


def main(argv=None):
    args = build_parser().parse_args(argv)
    modes = args.modes
    torch.set_num_threads(args.threads)
    dense, _ = make(args)
    w8, rec8 = make(args, quant=(8, 8))
    w4, rec4 = make(args, quant=(4, 4, (8, 8)), prune=0.75)
    info = {}
    with tempfile.TemporaryDirectory() as tmp:
        build = {
            "torch-fp32": lambda: torch_runner(dense),
            "torch-w8a8": lambda: torch_runner(w8),
            "ort-fp32": lambda: ort_runner(dense, None, tmp, "ort-fp32", args.threads, info),
            "ort-w8a8": lambda: ort_runner(w8, rec8, tmp, "ort-w8a8", args.threads, info),
            "ort-w4a4": lambda: ort_runner(w4, rec4, tmp, "ort-w4a4", args.threads, info),
        }
        runners = {m: build[m]() for m in modes}
        one = torch.randn(1, 3, 32, 32)
        many = torch.randn(args.batch, 3, 32, 32)
        latency = {m: [] for m in modes}
        batched = {m: [] for m in modes}
        for m in modes:  # warm-up: first calls allocate and pick kernels
            runners[m](one)
            runners[m](many)
        for r in range(args.rounds):
            for m in modes:
                latency[m].append(timed(runners[m], one, args.calls))
                batched[m].append(timed(runners[m], many, 2) / args.batch)
            if not args.quiet:
                print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{m} {latency[m][-1] * 1e3:.2f} ms" for m in modes),
                      flush=True)
    base = latency.get("torch-fp32")
    result = {"bench": "deploy_latency", "model": args.model, "width_mult": dense.width_mult,
              "depth_mult": dense.depth_mult, "threads": args.threads, "batch": args.batch, "rounds": args.rounds,
              "calls": args.calls, **common.environment(torch.device("cpu")), "exports": info, "modes": {}}
    for m in modes:
        lat, thr = common.median(latency[m]), common.median(batched[m])
        # Ratios per round, then their median: a round's load hits both sides of its ratio alike.
        ratio = common.median([b / v for b, v in zip(base, latency[m])]) if base else None
        result["modes"][m] = {"ms_per_image_batch1": lat * 1e3, "ms_per_image_batch": thr * 1e3,
                              "rounds_ms_batch1": [round(v * 1e3, 3) for v in latency[m]],
                              "vs_torch_fp32_batch1": ratio}
    rows = [[m, common.fmt(result["modes"][m]["ms_per_image_batch1"], 2),
             common.fmt(result["modes"][m]["ms_per_image_batch"], 2),
             common.fmt(result["modes"][m]["vs_torch_fp32_batch1"], 2)] for m in modes]
    print(common.markdown_table(["mode", "ms/image, batch 1", f"ms/image, batch {args.batch}",
                                 "speed vs torch-fp32 (batch 1)"], rows))
    if args.json:
        folder = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(folder, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
