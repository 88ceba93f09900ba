"""train.py's flags, and the RunConfig they make: built and checked once, here, from the command line.
chain.py takes the same flags (without the per-stage ones) and builds each stage's RunConfig from them."""
import argparse
import sys

import data
from micronet_cifar100 import errors
import models
import refinery
from engine.config import RunConfig
from engine.optim import format_regime, parse_regime

from .args import (add_compression_args, add_data_args, add_model_args, check_compression_args, fill_arch,
                   given_flags, model_name, multiplier, nonneg_float, positive_int, probability, seed_int, str2bool,
                   typed)

# The teacher's architecture flags, in the order of engine.checkpoint.ARCH_KEYS.
TEACHER_ARCH = ("label_refinery_model", "label_refinery_width_mult", "label_refinery_depth_mult",
                "label_refinery_coslinear")
TRAIN_DESCRIPTION = "Train one stage on CIFAR-100: hard labels, or refined by a frozen teacher (label refinery)."


def precise_bn_setting(v):
    if v in ("auto", "off"):
        return v
    try:
        return str(positive_int(v))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected auto, off or a positive number of batches, got {v!r}") from None


def build_parser(stage_flags=True, description=TRAIN_DESCRIPTION):
    """train.py's flags. chain.py reuses them with stage_flags=False: each stage's model and teacher
    come from --stages there."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    if stage_flags:
        add_model_args(p)
    else:
        p.add_argument("--width-mult", type=multiplier, default=None, help="every stage's width (quick runs)")
        p.add_argument("--depth-mult", type=multiplier, default=None, help="every stage's depth")
        p.add_argument("--coslinear", type=str2bool, default=True, metavar="true|false",
                       help="cosine-linear heads (true) or dropout+linear (false)")
    add_data_args(p)
    g = p.add_argument_group("loss")
    g.add_argument("--s", type=typed(float, lambda x: 0 < x <= 100, "a number in (0, 100]"), default=5.0,
                   help="AM-softmax scale")
    g.add_argument("--m", type=typed(float, lambda x: 0 <= x <= 2, "a number in [0, 2] (cosines lie in "
                                     "[-1, 1])"), default=0.0, help="AM-softmax margin")
    g.add_argument("--label-smoothing", type=probability, default=0.0)
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr-regime", nargs="+", default=None, metavar="START END LR",
                   help="triples 'start end lr' (default: the model's regime, the original entry's)")
    g.add_argument("--lr-scale", choices=("linear", "none"), default="linear",
                   help="scale the regime's LRs by the number of ranks (global batch / --batch-size)")
    g.add_argument("--epochs", type=positive_int, default=None, help="default: the regime's end")
    g.add_argument("--batch-size", type=positive_int, default=128, help="per rank")
    g.add_argument("--eval-batch-size", type=positive_int, default=1000)
    g.add_argument("--momentum", type=probability, default=0.9)
    g.add_argument("--weight-decay", type=nonneg_float, default=1e-4)
    g.add_argument("--drop-connect", type=probability, default=None, help="override the model's rate")
    g.add_argument("--dropout", type=probability, default=None, help="override (linear head only)")
    g.add_argument("--bn-momentum", type=probability, default=None,
                   help="override BatchNorm's momentum (0.01, the original entry's)")
    g.add_argument("--precise-bn", type=precise_bn_setting, default="auto", metavar="auto|off|N",
                   help="recompute BatchNorm statistics from N training batches before evaluating; auto: "
                        "only while the running statistics are far from converged (short runs)")
    g.add_argument("--seed", type=seed_int, default=0, help="the random seed (0..2^63-1)")
    g.add_argument("--aug", default="uci",
                   help=f"augmentation recipe: one of {', '.join(data.AUG_RECIPES)} ('seed' is an old name of uci)")
    g.add_argument("--train-limit", type=positive_int, default=None,
                   help="train on the first N training images only")
    g.add_argument("--nan-policy", choices=("stop", "skip"), default="stop",
                   help="on a non-finite loss: stop (keep the last good checkpoint) or skip the step "
                        "(skip syncs with the host every step)")
    g = p.add_argument_group("label refinery")
    if stage_flags:
        g.add_argument("--label-refinery-model", type=model_name, default=None,
                       help="teacher architecture; its soft predictions replace the labels")
        g.add_argument("--label-refinery-state-file", default=None, help="the teacher's weights")
        g.add_argument("--label-refinery-width-mult", type=multiplier, default=None)
        g.add_argument("--label-refinery-depth-mult", type=multiplier, default=None)
        g.add_argument("--label-refinery-coslinear", type=str2bool, default=True, metavar="true|false")
    g.add_argument("--refinery-bn", choices=refinery.BN_MODES, default="eval",
                   help="teacher BatchNorm: running statistics (eval) or the original entry's batch "
                        "statistics (train)")
    add_compression_args(p)
    g = p.add_argument_group("run")
    g.add_argument("--save", default="checkpoints", help="root of the run folders")
    if stage_flags:
        g.add_argument("--init-from", default=None, metavar="CHECKPOINT",
                       help="start from these weights (a model_best.pytar of the same model), e.g. to "
                            "prune and quantise a trained model; the optimizer starts afresh")
        g.add_argument("--resume", default=None, metavar="PATH|auto",
                       help="a run folder or its last.pytar, or auto: the newest run of these arguments "
                            "under --save (a finished one is reported, not retrained)")
    g.add_argument("--checkpoint-every", type=positive_int, default=None, metavar="STEPS",
                   help="also write last.pytar every N steps inside an epoch")
    g.add_argument("--keep-epoch-states", type=str2bool, default=True, metavar="true|false",
                   help="write model_state_XX.pytar every epoch, as the original did")
    g.add_argument("--log-interval", type=positive_int, default=50, metavar="STEPS")
    g.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    g = p.add_argument_group("speed (default: the fastest for the device)")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    g.add_argument("--amp", default=None, choices=("bf16", "fp16", "off"),
                   help="autocast dtype (default bf16 on CUDA, off on CPU)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile student and teacher (default on CUDA)")
    g.add_argument("--fused-optimizer", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--sync-bn", action="store_true", help="synchronise BatchNorm across ranks (CUDA)")
    g.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each MBConv block in backward: ~8x less activation memory for about "
                        "one extra forward (small GPUs)")
    return p


def finish_args(parser, args, argv):
    """Checks across flags, canonical names, and what the user gave (for resume inheritance); the
    parsed Namespace, made ready for RunConfig.from_mapping (chain.py adds its own settings)."""
    args.argv = list(argv)
    args.given = sorted(given_flags(parser, argv))
    try:
        args.aug = data.recipe_name(args.aug)
    except errors.ToolkitError as e:
        parser.error(f"argument --aug: {e}")
    if getattr(args, "lr_regime", None):
        try:
            args.lr_regime = format_regime(parse_regime(args.lr_regime))
        except errors.ToolkitError as e:
            parser.error(f"argument --lr-regime: {e}")
    check_compression_args(parser, args)
    return args


def parse_config(argv=None):
    """train.py's command line -> its RunConfig, every flag checked."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = finish_args(parser, parser.parse_args(argv), argv)
    # A checkpoint knows its model: the student of --init-from and the teacher are the models their
    # files hold, unless the flags say otherwise (and a flag that contradicts its file is refused).
    if args.init_from:
        fill_arch(args, args.given, "init_from")
    if args.label_refinery_state_file:
        fill_arch(args, args.given, "label_refinery_state_file", TEACHER_ARCH)
    if not args.lr_regime and not args.init_from:  # fine-tuning runs derive theirs (run_regime)
        args.lr_regime = format_regime(models.card(args.model).lr_regime)
    if args.label_refinery_state_file and not args.label_refinery_model:
        parser.error("--label-refinery-state-file needs --label-refinery-model NAME: the file does not say "
                     "which model it holds (a bare state_dict of a narrow model)")
    if args.label_refinery_model and not args.label_refinery_state_file:
        parser.error("--label-refinery-model needs --label-refinery-state-file PATH (the teacher's "
                     "model_best.pytar)")
    return RunConfig.from_mapping(vars(args), argv=tuple(args.argv), given=tuple(args.given), script="train.py")
