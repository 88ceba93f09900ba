"""The command line behind `python torchscope/count.py` (or `python -m torchscope.count`):
parameters, FLOPs, Madds, memory and the MicroNet score of a model.

    python torchscope/count.py                                   # ex, uci rules, mul_factor 0.5
    python torchscope/count.py --mul-factor 1
    python torchscope/count.py --rules micronet --model-state-file model_state_ex.pytar
    python torchscope/count.py --model efficientnet_b3 --per-layer --json b3.json
    python torchscope/count.py --rules micronet --per-layer --model-state-file RUN/model_best.pytar

A checkpoint with a compression record (bit widths and masks, compress.record) is counted with
them: its layers get the record's quantised numerics and the micronet rules charge its bits and
sparsity. Without a record, a weight tensor counts as sparse when more than 1/16 of it is zeros.

Not named cli.py: run as a script, torchscope/ heads sys.path, and a torchscope/cli.py would stand
in for the project's `cli` package.
"""
import argparse
import json
import math
import os
import sys

import torch

from compress import empty_layers
from micronet_cifar100 import errors
import models
import torchscope
from micronet_cifar100.cli.args import add_model_args, parse_for_checkpoint, positive_int, typed
from micronet_cifar100.cli.errors import run_main
from engine.checkpoint import load_weights
from torchscope import text
from torchscope.mtas import mtas
from torchscope.rules import ruleset_name

# The scores the original entry's README (UCI/Qualcomm, 2019) gives for efficientnet_ex
# (docs/counting.md), shown next to ours when they apply.
UCI_README_SCORES = ("0.074762", "0.12541")


# (0, 1]: 0.5 counts a multiply as half an operation (the fp16 freebie), 1 as a whole one.
mul_factor = typed(float, lambda x: 0 < x <= 1, "a number in (0, 1] (0.5: multiplies count half, 1: full)")


def add_bits(v):
    """--add-bits: only 32. A narrower accumulator would be a width that nothing in training or
    evaluation simulates, and a score may charge only what the evaluated model computes."""
    try:
        b = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{v!r} is not a whole number of bits") from None
    if b != 32:
        raise argparse.ArgumentTypeError(
            f"{b}-bit adds are refused: nothing in training or evaluation simulates a {b}-bit accumulator, so "
            "the accuracy would not pay for it; adds are counted at 32 bits (the accumulator test.py runs)")
    return b


def rules_name(v):
    """--rules: a rule set, or an alias of one (seed -> uci), as its canonical name."""
    try:
        return ruleset_name(v)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid choice: {v!r} (choose from {', '.join(torchscope.RULESETS)})") from None


def build_parser():
    p = argparse.ArgumentParser(
        prog="count.py",
        description="Count parameters, FLOPs, Madds, memory and the MicroNet score of a model "
                    "(per sample, one random batch of 2).")
    add_model_args(p)
    p.add_argument("--mul-factor", type=mul_factor, default=0.5, metavar="F",
                   help="weight of a multiply in Madds, 0 < F <= 1 (default 0.5, the fp16 freebie)")
    p.add_argument("--input-size", type=positive_int, nargs=3, default=[3, 32, 32], metavar=("C", "H", "W"),
                   help="one sample's shape (default 3 32 32)")
    p.add_argument("--rules", type=rules_name, default="uci", metavar="{uci,micronet}",
                   help="uci: the original entry's count.py formulas (default; 'seed' is an alias); "
                        "micronet: the challenge's counting (separate mults/adds, BN folded, sparsity "
                        "credited)")
    p.add_argument("--model-state-file", default=None, metavar="PATH",
                   help="load these weights first; a compressed checkpoint's record (bits, masks) is "
                        "applied and scored under --rules micronet; without one, a weight tensor more "
                        "than 1/16 zeros counts as sparse")
    p.add_argument("--add-bits", type=add_bits, default=32, metavar="32",
                   help="the accumulator's width, what an add costs: 32, the only width evaluation simulates")
    p.add_argument("--tta", action="store_true",
                   help="count flip test-time augmentation (test.py --tta): two forward passes and the average "
                        "of their outputs; the score that goes with a TTA accuracy")
    p.add_argument("--per-layer", action="store_true", help="print one row per module")
    p.add_argument("--json", default=None, metavar="PATH", help="write every figure to this JSON file")
    return p


def parse_args(argv):
    parser = build_parser()
    args = parse_for_checkpoint(parser, argv)   # a checkpoint knows its model: the flags only have to agree
    c, h, w = args.input_size
    if c != 3:
        parser.error(f"argument --input-size: the models take 3 (RGB) channels, got {c}")
    if h != w:
        parser.error(f"argument --input-size: the models take square inputs, got {h}x{w}")
    if h % 4:
        parser.error(f"argument --input-size: H and W must be multiples of 4 (two stride-2 stages), got {h}")
    return args


def build_model(args):
    try:
        # Random weights from a fixed seed, so that a count without --model-state-file gives the
        # same figures on every run (and the caller's random stream is left as it was).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return models.create(args.model, head=models.head_name(args.coslinear),
                                 width_mult=args.width_mult, depth_mult=args.depth_mult,
                                 input_size=args.input_size[1])
    except errors.ToolkitError:
        raise
    except ValueError as e:
        raise errors.ConfigError(str(e)) from None


def load_state(model, path):
    """Load the weights of `path` into `model`; a compression record in the file is validated and
    applied (quantised layers, masks). Returns the record, or None."""
    meta = load_weights(model, path)
    return meta.get("compression") if isinstance(meta, dict) else None


def run_count(model, args, record=None):
    try:
        return torchscope.count(model, input_size=tuple(args.input_size), mul_factor=args.mul_factor,
                                rules=args.rules, compression=record, tta=args.tta)
    except (RuntimeError, ValueError) as e:
        raise errors.ConfigError(f"cannot count {args.model} on input {'x'.join(map(str, args.input_size))}: "
                                 f"{errors.first_line(e)}", setting="input_size") from None


def is_uci_setting(args):
    """The setting of the original entry's README: efficientnet_ex as published, cosine head, 32x32."""
    return (args.model == "efficientnet_ex" and args.coslinear and args.width_mult is None
            and args.depth_mult is None and list(args.input_size) == [3, 32, 32])


def write_json(path, payload):
    try:
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        with open(path, "w") as f:
            json.dump(payload, f, indent=2)
            f.write("\n")
    except OSError as e:
        raise errors.storage_error(path, e, setting="json") from None


def main(argv=None):
    args = parse_args(argv)
    model = build_model(args)
    state_info = record = None
    if args.model_state_file:
        record = load_state(model, args.model_state_file)
        state_info = args.model_state_file
    report = run_count(model, args, record)
    # The peak of the activations alive at once (the organisers' MTAS), under the challenge's rules.
    activations = None
    if args.rules == "micronet":
        activations = mtas(model, input_size=tuple(args.input_size), compression=record)

    desc = models.describe(model)
    print(f"Model: {args.model} (width {desc['width_mult']:g}, depth {desc['depth_mult']:g}, "
          f"{'cosine' if desc['coslinear'] else 'plain'} head), input {'x'.join(map(str, args.input_size))}, "
          f"weights: {state_info or 'random init'}, rules: {args.rules}; figures per sample")
    if record is not None:
        import compress
        print(f"Compression record: {compress.summary(record)}")
    print()
    if args.per_layer:
        print("\n".join(text.layer_table(report, {r.name: r.live_bits for r in activations.rows}
                                          if activations else None)))
        print()
    if args.rules == "uci":
        print("\n".join(text.uci_block(report)))
        print()
        print("\n".join(text.uci_scores(report, mul_factor_name="--mul-factor")))
        if is_uci_setting(args):
            s = report.scores()
            print(f"(the original entry's README (UCI/Qualcomm, 2019): {UCI_README_SCORES[0]} and "
                  f"{UCI_README_SCORES[1]}; the exact first is {s['freebie']['score']:.8f}, which the "
                  "README rounded up)")
        if state_info and any(p.detach().eq(0).any() for p in model.parameters() if p.dim() >= 2):
            print("(the uci rules count every weight, zero or not; --rules micronet credits sparsity)")
    else:
        print("\n".join(text.micronet_block(report)))
        print(text.mtas_line(activations))
    for note in report.notes:
        print(f"note: {note}")
    empty = empty_layers(model) if args.model_state_file else []
    if empty:
        print(f"warning: {len(empty)} layer(s) have only zero weights: {', '.join(empty)}. Each outputs a "
              "constant, so this score describes a broken model, not a smaller one: test.py shows its accuracy")

    if args.json:
        payload = {"model": desc, "model_state_file": state_info, **report.to_dict(), "empty_layers": empty}
        if activations is not None:
            payload["mtas_bits"], payload["mtas"] = activations.total_bits, activations.to_dict()
        if record is not None:
            import compress
            payload["compression"] = compress.summary(record)
        if not math.isfinite(payload["score"]):
            raise errors.ConfigError("the score is not finite; check the model and its weights")
        write_json(args.json, payload)
        print(f"\nwrote {args.json}")
    return 0


def script(argv=None):
    # One batch of two 32x32 images is too small to gain from threads, and on a busy machine
    # OpenMP's spinning threads make it many times slower.
    torch.set_num_threads(1)
    try:
        return run_main(main, argv)
    except BrokenPipeError:
        # The reader went away (`count.py --per-layer | head`): nothing left to report. Point
        # stdout at /dev/null so that the flush at exit does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
