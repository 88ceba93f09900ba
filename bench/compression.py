#!/usr/bin/env python
"""Step-time cost of pruning masks and of quantisation-aware training against the dense step, side by side.

    python bench/compression.py --device cpu --width-mult 0.25 --depth-mult 0.2 --batch-size 64 \
        --json bench/results/cpu-compress-ex-narrow.json
    python bench/compression.py --device cuda --batch-size 256 --amp bf16 --json OUT.json

Every mode steps with train.py's own step (engine.step.train_step) and SGD (foreach), on one random
batch on the device, as bench/step.py does.

  dense        the plain model
  masks        compress.Pruner at --sparsity (global magnitude), attached to the optimizer: after
               every optimizer step the weights and momentum buffers are multiplied by the masks
  qat8         compress.quantize(model, 8, 8): fake-quantised weights (per channel) and inputs
               (per tensor, fused observer) of every conv, linear and cosine layer
  qat4         the same at 4 bits
  qat8+masks   both

Eval is a forward pass in eval mode under no_grad (for QAT: the frozen-range quantised numerics).
The modes are timed in turn for --rounds rounds; the ratios to dense are medians of per-round ratios.
"""
import os
import statistics
import sys

# `python bench/NAME.py` puts bench/ on sys.path, not the root that holds the project's packages.
if not __package__:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

import compress
import models
from bench import common
from micronet_cifar100.cli import args as cli_args
from micronet_cifar100.cli.errors import run_main
from engine import distributed, optim, speed
from engine.step import HardLabels, StepParts
from loss import make_criterion

MODES = {
    "dense": {},
    "masks": {"prune": True},
    "qat8": {"quant": (8, 8)},
    "qat4": {"quant": (4, 4)},
    "qat8+masks": {"prune": True, "quant": (8, 8)},
}


class Runner(common.FixedBatch):
    """One mode's model, optimizer, pruner and batch, ready to step."""

    def __init__(self, mode, args):
        cfg = MODES[mode]
        super().__init__(mode, args.batch_size, args.seed, args.device)
        torch.manual_seed(args.seed)
        self.net = models.create(args.model, width_mult=args.width_mult, depth_mult=args.depth_mult)
        if "quant" in cfg:
            compress.quantize(self.net, *cfg["quant"])
        self.net = self.net.to(args.device).train()
        optimizer = optim.make_optimizer(self.net.parameters(), common.LR, common.MOMENTUM, common.WEIGHT_DECAY)
        self.pruner = None
        if cfg.get("prune"):
            self.pruner = compress.Pruner(self.net, compress.PruneSchedule(args.sparsity, 1, 1), scope="global")
            self.pruner.attach(optimizer)
            self.pruner.step(1)
        autocast = speed.resolve(amp=args.amp, channels_last=False, compile=False, fused_optimizer=False,
                                 device=args.device).autocast(args.device)
        self.parts = StepParts(self.net, HardLabels(make_criterion(True, common.S)), optimizer,
                               torch.amp.GradScaler("cuda", enabled=False), autocast)

    def seconds_per_step(self, n):
        return self.train_steps(n)[1] / n

    @torch.no_grad()
    def seconds_per_eval_batch(self, n):
        def forward(batches):
            for _ in range(batches):
                self.net(self.x)
        self.net.eval()
        try:
            with self.parts.autocast:
                forward(1)  # the first eval batch after training: the mode switch, untimed
                return common.timed(self.device, lambda: forward(n))[1] / n
        finally:
            self.net.train()


def parse_args(argv=None):
    p = common.parser(__doc__)
    common.add_model_args(p, batch_size=64)
    p.add_argument("--amp", default="off", choices=("off", "bf16"))
    p.add_argument("--modes", type=common.one_of(MODES), default=list(MODES),
                   help=f"comma-separated, from {', '.join(MODES)}")
    p.add_argument("--sparsity", type=cli_args.probability, default=0.5, help="the masks' sparsity (default 0.5)")
    p.add_argument("--steps", type=cli_args.positive_int, default=10, help="timed train steps per mode and round")
    p.add_argument("--eval-steps", type=common.nonneg_int, default=5,
                   help="timed eval batches per mode and round (0: none)")
    p.add_argument("--warmup", type=common.nonneg_int, default=2,
                   help="untimed train steps per mode before the first round")
    p.add_argument("--rounds", type=cli_args.positive_int, default=3)
    p.add_argument("--threads", type=cli_args.positive_int, default=None, help="torch threads (default: torch's)")
    common.add_output_args(p, json_help="write the results here")
    a = p.parse_args(argv)
    a.modes = list(dict.fromkeys(["dense"] + a.modes))  # dense: the baseline every ratio is taken against
    a.device = distributed.pick_device(a.device)
    return a


def summarise(a, per_round):
    """Median ms per step / batch, and median of the per-round ratios to dense."""
    modes = {}
    for mode in a.modes:
        rounds = per_round[mode]
        ratio = lambda k: statistics.median(r[k] / d[k] for r, d in zip(rounds, per_round["dense"]))
        train = [r["train_s"] for r in rounds]
        modes[mode] = {"config": MODES[mode], "train_ms_per_step": 1e3 * statistics.median(train),
                       "train_ms_rounds": [round(1e3 * t, 3) for t in train], "train_vs_dense": ratio("train_s")}
        if a.eval_steps:
            modes[mode].update(eval_ms_per_batch=1e3 * statistics.median(r["eval_s"] for r in rounds),
                               eval_vs_dense=ratio("eval_s"))
    return modes


def table(a, modes):
    rows = [(mode, common.fmt(m["train_ms_per_step"], 1), f"{m['train_vs_dense']:.2f}x",
             common.fmt(m.get("eval_ms_per_batch"), 1), f"{m['eval_vs_dense']:.2f}x" if "eval_vs_dense" in m else "-")
            for mode, m in modes.items()]
    return (f"{a.model} width {a.width_mult} depth {a.depth_mult}, batch {a.batch_size}, {a.device.type}, "
            f"amp {a.amp}, {a.rounds} round(s) x {a.steps} steps\n"
            + common.markdown_table(("mode", "train ms/step", "vs dense", "eval ms/batch", "vs dense"), rows))


def main(argv=None):
    a = parse_args(argv)
    log = common.logger("compress", a.quiet)
    with common.torch_threads(a.threads):
        runners = {}
        for mode in a.modes:
            log(f"{mode}: building")
            runners[mode] = Runner(mode, a)
            for _ in range(a.warmup):
                runners[mode].train_step()
        per_round = {mode: [] for mode in a.modes}
        for rnd in range(a.rounds):
            for mode, r in runners.items():
                out = {"train_s": r.seconds_per_step(a.steps)}
                if a.eval_steps:
                    out["eval_s"] = r.seconds_per_eval_batch(a.eval_steps)
                per_round[mode].append(out)
                log(f"round {rnd + 1}: {mode} {1e3 * out['train_s']:.1f} ms/step")
    modes = summarise(a, per_round)
    net = runners["dense"].net
    doc = {"bench": "compress", "model": a.model, "width_mult": net.width_mult, "depth_mult": net.depth_mult,
           "params": sum(p.numel() for p in net.parameters()), "batch_size": a.batch_size, "amp": a.amp,
           "sparsity": a.sparsity, "steps": a.steps, "eval_steps": a.eval_steps, "warmup": a.warmup,
           "rounds": a.rounds, **common.environment(a.device), "modes": modes}
    if "masks" in runners:
        doc["measured_sparsity"] = runners["masks"].pruner.sparsity()
    if a.json:
        common.write_json(a.json, doc)
    print(table(a, modes))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
