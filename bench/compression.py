#!/usr/bin/env python
"""Step-time cost of pruning masks and of quantisation-aware training against the dense step, side by side.

    python bench/compression.py --device cpu --width-mult 0.25 --depth-mult 0.2 --batch-size 64 \
        --json bench/results/cpu-compress-ex-narrow.json
    python bench/compression.py --device cuda --batch-size 256 --amp bf16 --json OUT.json

Every mode steps with train.py's own step (engine.step.train_step: forward and loss under autocast,
zero_grad, backward, optimizer step through the GradScaler, the on-device meter), SGD with momentum
0.9 and weight decay 1e-4 (foreach), on one random batch made on the device (no data loading timed).
On the CPU the finite-loss flag is read every step, as train.py does there.

  dense        the plain model
  masks        compress.Pruner at --sparsity (global magnitude), attached to the optimizer: after
               every optimizer step the weights and momentum buffers are multiplied by the masks
  qat8         compress.quantize(model, 8, 8): fake-quantised weights (per channel) and inputs
               (per tensor, fused observer) of every conv, linear and cosine layer
  qat4         the same at 4 bits
  qat8+masks   both

Eval is a forward pass in eval mode under no_grad (for QAT: the frozen-range quantised numerics).
The modes are kept alive side by side and timed in turn for --rounds rounds, so drift in a shared
machine's load hits every mode alike; the ratios to dense are medians of the per-round ratios.
"""
import argparse
import contextlib
import statistics
import sys
import time

import torch

import compress
import models
from bench import common


from engine.meter import Meter
from engine.step import HardLabels, StepParts, train_step
from loss import make_criterion

LR, MOMENTUM, WEIGHT_DECAY, S = 0.07, 0.9, 1e-4, 5.0
MODES = {
    "dense": {},
    "masks": {"prune": True},
    "qat8": {"quant": (8, 8)},
    "qat4": {"quant": (4, 4)},
    "qat8+masks": {"prune": True, "quant": (8, 8)},
}


class Runner:
    """One mode's model, optimizer, pruner and batch, ready to step."""

    def __init__(self, mode, args, device):
        cfg = MODES[mode]
        self.mode, self.device, self.batch_size = mode, device, args.batch_size
        torch.manual_seed(args.seed)
        net = models.create(args.model, width_mult=args.width_mult, depth_mult=args.depth_mult)
        if "quant" in cfg:
            compress.quantize(net, *cfg["quant"])
        self.net = net.to(device).train()
        self.optimizer = torch.optim.SGD(self.net.parameters(), lr=LR, momentum=MOMENTUM,
                                         weight_decay=WEIGHT_DECAY, foreach=True)
        self.pruner = None
        if cfg.get("prune"):
            self.pruner = compress.Pruner(self.net, compress.PruneSchedule(args.sparsity, 1, 1), scope="global")
            self.pruner.attach(self.optimizer)
            self.pruner.step(1)
        autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.amp == "bf16"
                    else contextlib.nullcontext())
        self.parts = StepParts(self.net, HardLabels(make_criterion(True, S)), self.optimizer,
                               torch.amp.GradScaler("cuda", enabled=False), autocast)
        gen = torch.Generator().manual_seed(args.seed)
        self.x = torch.randn((args.batch_size, 3, 32, 32), generator=gen).to(device)
        self.y = torch.randint(0, 100, (args.batch_size,), generator=gen).to(device)
        self.meter = Meter(device)
        self.check_every_step = device.type == "cpu"

    def train_steps(self, n):
        common.sync(self.device)
        t0 = time.perf_counter()
        for _ in range(n):
            finite = train_step(self.parts, self.x, self.y, self.meter)
            if self.check_every_step and not bool(finite):
                raise FloatingPointError(f"{self.mode}: non-finite loss")
        common.sync(self.device)
        return (time.perf_counter() - t0) / n

    @torch.no_grad()
    def eval_batches(self, n):
        self.net.eval()
        try:
            with self.parts.autocast:
                self.net(self.x)  # the first eval batch after training: mode switch, untimed
                common.sync(self.device)
                t0 = time.perf_counter()
                for _ in range(n):
                    self.net(self.x)
                common.sync(self.device)
        finally:
            self.net.train()
        return (time.perf_counter() - t0) / n


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    common.add_model_args(p, batch_size=64)
    p.add_argument("--amp", default="off", choices=("off", "bf16"))
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {', '.join(MODES)}")
    p.add_argument("--sparsity", type=float, default=0.5, help="the masks' sparsity (default 0.5)")
    p.add_argument("--steps", type=int, default=10, help="timed train steps per mode and round")
    p.add_argument("--eval-steps", type=int, default=5, help="timed eval batches per mode and round (0: none)")
    p.add_argument("--warmup", type=int, default=2, help="untimed train steps per mode before the first round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    common.add_output_args(p, json_help="write the results here")
    return p


def parse_args(argv=None):
    p = build_parser()
    a = p.parse_args(argv)
    a.modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    unknown = [m for m in a.modes if m not in MODES]
    if unknown:
        p.error(f"argument --modes: unknown mode {unknown[0]!r}; choose from {', '.join(MODES)}")
    if "dense" not in a.modes:
        a.modes.insert(0, "dense")  # the baseline every ratio is taken against
    if not 0 <= a.sparsity < 1:
        p.error(f"argument --sparsity: must be in [0, 1), got {a.sparsity}")
    for name in ("steps", "rounds", "batch_size"):
        if getattr(a, name) < 1:
            p.error(f"argument --{name.replace('_', '-')}: must be at least 1")
    a.device = common.pick_device(a.device)
    return a


def summarise(a, per_round):
    """Median ms per step / batch, and median of the per-round ratios to dense."""
    modes = {}
    for mode in a.modes:
        rounds = per_round[mode]
        train = [r["train_s"] for r in rounds]
        entry = {"config": MODES[mode], "train_ms_per_step": 1e3 * statistics.median(train),
                 "train_ms_rounds": [round(1e3 * t, 3) for t in train],
                 "train_vs_dense": statistics.median(r["train_s"] / d["train_s"]
                                                     for r, d in zip(rounds, per_round["dense"]))}
        if a.eval_steps:
            entry["eval_ms_per_batch"] = 1e3 * statistics.median(r["eval_s"] for r in rounds)
            entry["eval_vs_dense"] = statistics.median(r["eval_s"] / d["eval_s"]
                                                       for r, d in zip(rounds, per_round["dense"]))
        modes[mode] = entry
    return modes


def table(a, modes):
    rows = []
    for mode, m in modes.items():
        rows.append((mode, common.fmt(m["train_ms_per_step"], 1), f"{m['train_vs_dense']:.2f}x",
                     common.fmt(m.get("eval_ms_per_batch"), 1),
                     f"{m['eval_vs_dense']:.2f}x" if "eval_vs_dense" in m else "-"))
    head = ("mode", "train ms/step", "vs dense", "eval ms/batch", "vs dense")
    return (f"{a.model} width {a.width_mult} depth {a.depth_mult}, batch {a.batch_size}, {a.device.type}, "
            f"amp {a.amp}, {a.rounds} round(s) x {a.steps} steps\n" + common.markdown_table(head, rows))


def main(argv=None):
    before = torch.get_num_threads()
    try:
        return _main(argv)
    finally:
        torch.set_num_threads(before)


def _main(argv):
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    log = (lambda *m: None) if a.quiet else (lambda *m: print("[compress]", *m, file=sys.stderr, flush=True))
    runners = {}
    for mode in a.modes:
        log(f"{mode}: building")
        runners[mode] = Runner(mode, a, a.device)
        for _ in range(a.warmup):
            runners[mode].train_steps(1)
    per_round = {mode: [] for mode in a.modes}
    for rnd in range(a.rounds):
        for mode, r in runners.items():
            out = {"train_s": r.train_steps(a.steps)}
            if a.eval_steps:
                out["eval_s"] = r.eval_batches(a.eval_steps)
            per_round[mode].append(out)
            log(f"round {rnd + 1}: {mode} {1e3 * out['train_s']:.1f} ms/step")
    modes = summarise(a, per_round)
    net = runners["dense"].net
    doc = {"bench": "compress", "model": a.model, "width_mult": net.width_mult, "depth_mult": net.depth_mult,
           "params": sum(p.numel() for p in net.parameters()), "batch_size": a.batch_size, "amp": a.amp,
           "sparsity": a.sparsity, "steps": a.steps, "eval_steps": a.eval_steps, "warmup": a.warmup,
           "rounds": a.rounds, **common.environment(a.device), "modes": modes}
    if "masks" in runners and runners["masks"].pruner is not None:
        doc["measured_sparsity"] = runners["masks"].pruner.sparsity()
    if a.json:
        common.write_json(a.json, doc)
    print(table(a, modes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
