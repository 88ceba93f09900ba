#!/usr/bin/env python
"""Evaluate a checkpoint on the CIFAR-100 test set with hard labels.

    python test.py --model efficientnet_ex --model-state-file RUN/model_best.pytar --data_dir D

Accepts the original entry's bare state_dicts (model_state_*.pytar), and our model_best.pytar and
last.pytar. Prints loss, top-1, top-5, the correct count and whether the MicroNet 80% bar is met.
"""
import argparse
import json
import sys

import compress
import data
from micronet_cifar100 import errors
import torchscope
from micronet_cifar100.cli.args import add_data_args, add_model_args, parse_for_checkpoint, positive_int, typed
from micronet_cifar100.cli.errors import run_main
from engine import distributed
from engine.evaluate import evaluate_checkpoint


def parse_args(argv=None):
    """test.py's flags; the architecture comes from the checkpoint unless the flags say it."""
    return parse_for_checkpoint(build_parser(), argv)


def main(argv=None):
    args = parse_args(argv)
    ctx = distributed.Context(device=distributed.pick_device(args.device))
    r, model, meta = evaluate_checkpoint(args, args.model_state_file, ctx, tta=args.tta)
    r.update(model=args.model, checkpoint=args.model_state_file, tta=args.tta)
    trained = meta.get("epoch")
    print(f"{args.model} {args.model_state_file}" + (f" (epoch {trained})" if trained else ""))
    if meta.get("compression"):
        r["compression"] = compress.summary(meta["compression"])
        numerics = "its quantised numerics and masks" if compress.quantised_layers(model) else "its masks"
        print(f"compressed: {r['compression']} (evaluated with {numerics})")
    r["empty_layers"] = compress.empty_layers(model)
    if r["empty_layers"]:
        print(f"warning: {len(r['empty_layers'])} layer(s) have only zero weights: {', '.join(r['empty_layers'])} "
              "(each outputs a constant: the model is broken there)")
    print(f"test loss {r['loss']:.4f} | top-1 {r['top1']:.2f}% | top-5 {r['top5']:.2f}% | "
          f"correct {r['correct']}/{r['total']}{' (flip TTA)' if args.tta else ''}")
    tta_note = ""
    if args.tta:
        # This accuracy costs two forward passes and their average: it goes with the TTA score,
        # never the single-pass one count.py prints without --tta.
        r["tta_score"] = torchscope.count(model, rules="micronet", compression=meta.get("compression"),
                                          tta=True).score()["score"]
        tta_note = (f" with flip TTA, whose score is {r['tta_score']:.6f} (count.py --rules micronet --tta), "
                    "not the single-pass score")
        print(f"flip TTA: two forward passes per image and their average; MicroNet score with TTA "
              f"{r['tta_score']:.6f} (count.py --rules micronet --tta)")
    if r["total"] == data.TEST_IMAGES:
        verdict = "meets" if r["reached_80"] else "misses"
        print(f"MicroNet CIFAR-100 bar (80% top-1): {verdict} it{tta_note}")
    else:
        print(f"MicroNet CIFAR-100 bar (80% top-1): not judged on a {r['total']}-image subset")
    if args.json:
        try:
            with open(args.json, "w") as f:
                json.dump(r, f, indent=2)
        except OSError as e:
            raise errors.storage_error(args.json, e, setting="json") from None
    return 0


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p)
    add_data_args(p)
    p.add_argument("--model-state-file", required=True, help="checkpoint to evaluate")
    p.add_argument("--batch-size", dest="eval_batch_size", type=positive_int, default=1000)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--amp", default=None, choices=("bf16", "fp16", "off"),
                   help="autocast dtype (default bf16 on CUDA, off on CPU, as in training)")
    p.add_argument("--s", type=typed(float, lambda x: 0 < x <= 100, "a number in (0, 100]"), default=5.0,
                   help="AM-softmax scale for the loss")
    p.add_argument("--tta", action="store_true",
                   help="average the outputs on each image and its mirror (twice the operations: the score that "
                        "goes with this accuracy is count.py --tta's, which test.py prints)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the figures as JSON")
    return p


if __name__ == "__main__":
    sys.exit(run_main(main))
