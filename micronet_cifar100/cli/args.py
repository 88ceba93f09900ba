"""argparse types and flag groups shared by the scripts: each bad value becomes argparse's one-line
error (exit 2) that names the flag, the value and the range it must be in."""
import argparse
import math
import os
import sys

import compress
import models
from compress import BITS, BITS_TEXT
from micronet_cifar100 import errors

SEED_MAX = 2 ** 63 - 1  # torch.manual_seed takes a 64-bit seed; numpy's is reduced modulo 2**32
# Width and depth multipliers above 4 build models of hundreds of millions of parameters (memory
# grows with the square of the width); b3, the largest of the original entry, is width 1.2, depth 1.4.
MULT_MAX = 4.0


def str2bool(v):
    """A real boolean: the original's `type=bool` made `--coslinear False` mean True."""
    s = str(v).strip().lower()
    if s in ("true", "yes", "1", "on", "t", "y"):
        return True
    if s in ("false", "no", "0", "off", "f", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {v!r}")


def typed(convert, ok, what):
    """An argparse type: convert the text, then check the value; each failure is one clear line.
    Non-finite numbers (inf, nan) are refused whatever `ok` says."""
    def parse(v):
        try:
            x = convert(v)
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"expected {what}, got {v!r}") from None
        if isinstance(x, float) and not math.isfinite(x):
            raise argparse.ArgumentTypeError(f"must be a finite number ({what}), got {v}")
        if not ok(x):
            raise argparse.ArgumentTypeError(f"must be {what}, got {v}")
        return x
    return parse


positive_int = typed(int, lambda n: n > 0, "a positive integer")
positive_float = typed(float, lambda x: x > 0, "a positive number")
nonneg_float = typed(float, lambda x: x >= 0, "a number >= 0")
probability = typed(float, lambda x: 0 <= x < 1, "a number in [0, 1)")
seed_int = typed(int, lambda n: 0 <= n <= SEED_MAX, f"an integer in 0..2^63-1 ({SEED_MAX})")
multiplier = typed(float, lambda x: 0 < x <= MULT_MAX,
                   f"a number in (0, {MULT_MAX:g}] (larger models do not fit in memory)")


sparsity = typed(float, lambda x: 0 < x < 1, "a sparsity in (0, 1), e.g. 0.5 for half the weights pruned")


def bit_width(v):
    """A quantisation width: 2..8 (simulated on the integer grid), or 16/32 (floating point)."""
    return typed(int, lambda b: b in BITS, f"a bit width: {BITS_TEXT}")(v)


def freeze_epoch(v):
    """An epoch to freeze from (1..), or never (stored as 0)."""
    if v == "never":
        return 0
    try:
        return positive_int(v)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected an epoch (1, 2, ...) or never, got {v!r}") from None


max_sparsity = typed(float, lambda x: 0 < x <= 1, "a share of a layer's weights in (0, 1], e.g. 0.95")


def add_compression_args(p):
    """--prune, --prune-schedule, --prune-scope, --prune-exclude, --prune-max-sparsity, --quant,
    --quant-first-last, --quant-method, --qat-freeze-observers, --qat-freeze-bn (docs/compression.md)."""
    g = p.add_argument_group("compression (docs/compression.md)")
    g.add_argument("--prune", type=sparsity, default=None, metavar="SPARSITY",
                   help="magnitude-prune conv, linear and head weights to this sparsity (e.g. 0.5), on the "
                        "cubic schedule of Zhu & Gupta 2017")
    g.add_argument("--prune-schedule", type=positive_int, nargs=2, default=None, metavar=("START", "END"),
                   help="epochs over which the sparsity rises from 0 to --prune (default: 1 to two "
                        "thirds of the run); the best checkpoint comes from epoch END on")
    g.add_argument("--prune-scope", choices=compress.SCOPES, default=None,
                   help="global: one |w| threshold for all layers; global-bn: one threshold on |w| x the "
                        "gamma/sigma of the BatchNorm after it; global-lamp: one threshold on LAMP scores; "
                        f"layer: every layer to the same sparsity (default {compress.DEFAULT_SCOPE}, the best "
                        "measured by bench/compression_quality.py)")
    g.add_argument("--prune-exclude", nargs="+", default=None, metavar="NAME|GROUP",
                   help="layers left dense: groups (" + ", ".join(compress.GROUPS) + "), layer or module "
                        f"names, or none (default: {' '.join(compress.DEFAULT_EXCLUDE)})")
    g.add_argument("--prune-max-sparsity", type=max_sparsity, default=None, metavar="SHARE",
                   help=f"no layer pruned past this share of its weights (default {compress.MAX_SPARSITY:g}); "
                        "every output unit keeps one weight whatever it is")
    g.add_argument("--quant", type=bit_width, nargs=2, default=None, metavar=("W", "A"),
                   help="quantisation-aware training: weights to W bits (per output channel), the inputs "
                        "of every conv and linear to A bits, e.g. 8 8 or 4 4")
    g.add_argument("--quant-first-last", type=bit_width, nargs=2, default=None, metavar=("W", "A"),
                   help="other widths for the first conv and the head (e.g. 8 8 with --quant 4 4)")
    g.add_argument("--quant-method", choices=compress.METHODS, default=None,
                   help="minmax: scales from the weights' max and a moving average of the inputs' range; "
                        "lsq: learned step sizes (Esser et al. 2020) "
                        f"(default {compress.DEFAULT_METHOD}, the best measured)")
    g.add_argument("--qat-freeze-observers", type=freeze_epoch, default=None, metavar="EPOCH|never",
                   help="min/max input ranges fixed from this epoch on "
                        f"(default {compress.FREEZE_OBSERVERS_EPOCH or 'never'})")
    g.add_argument("--qat-freeze-bn", type=freeze_epoch, default=None, metavar="EPOCH|never",
                   help="BatchNorm normalises with its running statistics, and stops updating them, from this "
                        f"epoch on (default {compress.FREEZE_BN_EPOCH or 'never'})")
    return g


PRUNE_ONLY = ("prune_schedule", "prune_scope", "prune_exclude", "prune_max_sparsity")
QUANT_ONLY = ("quant_first_last", "quant_method", "qat_freeze_observers", "qat_freeze_bn")


def fill_compression_defaults(args):
    """The library's defaults for what a compressed run leaves unsaid, written into its settings (so
    a resume, and args.json, say what the run did even if a later version measures other defaults).
    Settings of a compression the run does not do stay None: a dense run's settings are unchanged."""
    if args.prune:
        for key, value in (("prune_scope", compress.DEFAULT_SCOPE),
                           ("prune_exclude", list(compress.DEFAULT_EXCLUDE)),
                           ("prune_max_sparsity", compress.MAX_SPARSITY)):
            if getattr(args, key, None) is None:
                setattr(args, key, value)
        if args.prune_exclude == ["none"]:
            args.prune_exclude = []
    if args.quant:
        for key, value in (("quant_method", compress.DEFAULT_METHOD),
                           ("qat_freeze_observers", compress.FREEZE_OBSERVERS_EPOCH or 0),
                           ("qat_freeze_bn", compress.FREEZE_BN_EPOCH or 0)):
            if getattr(args, key, None) is None:
                setattr(args, key, value)
    return args


def check_compression_args(parser, args):
    """Flags that only make sense together; fills the compression defaults (fill_compression_defaults).
    A resumed run takes its --prune and --quant from the run it continues, so what they pair with is
    checked once they are inherited (engine.compression.check)."""
    if not getattr(args, "resume", None):
        if not args.quant:
            given = [k for k in QUANT_ONLY if getattr(args, k, None) is not None]
            if given:
                parser.error(f"--{given[0].replace('_', '-')} needs --quant W A (quantisation of the whole model)")
        if not args.prune:
            given = [k for k in PRUNE_ONLY if getattr(args, k, None) is not None]
            if given:
                parser.error(f"--{given[0].replace('_', '-')} needs --prune SPARSITY")
    if args.prune and args.prune_schedule and args.prune_schedule[1] < args.prune_schedule[0]:
        parser.error(f"argument --prune-schedule: the span ends (epoch {args.prune_schedule[1]}) before it "
                     f"starts (epoch {args.prune_schedule[0]})")
    if args.prune_exclude and "none" in args.prune_exclude and len(args.prune_exclude) > 1:
        parser.error("argument --prune-exclude: none stands alone (every layer pruned)")
    fill_compression_defaults(args)


def model_name(v):
    if v not in models.names():
        raise argparse.ArgumentTypeError(f"unknown model {v!r}; known models: {', '.join(models.names())}")
    return v


def default_data_dir():
    return os.environ.get("CIFAR100_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "cifar100")


def add_model_args(p):
    p.add_argument("--model", type=model_name, default="efficientnet_ex",
                   help=f"one of {', '.join(models.names())}")
    p.add_argument("--width-mult", type=multiplier, default=None,
                   help="override the model's width multiplier (compound scaling)")
    p.add_argument("--depth-mult", type=multiplier, default=None,
                   help="override the model's depth multiplier")
    p.add_argument("--coslinear", type=str2bool, default=True, metavar="true|false",
                   help="cosine-linear head (true, the original's setting) or dropout+linear (false)")


def add_data_args(p):
    p.add_argument("--data_dir", "--data-dir", dest="data_dir", default=default_data_dir(),
                   help="folder holding cifar-100-python/ (default: $CIFAR100_DIR, else ~/.cache/cifar100; "
                        "here %(default)s)")
    p.add_argument("--no-download", action="store_true",
                   help="never download CIFAR-100; fail if it is not under --data_dir")
    p.add_argument("--test-limit", type=positive_int, default=None,
                   help="evaluate on the first N test images only")


def fill_arch(args, given, path_setting, attrs=None):
    """Complete the parsed architecture flags `attrs` (model, width, depth, head; a teacher's are
    label_refinery_*) from the checkpoint named by the flag `path_setting`, where the user gave none
    (`given`: given_flags). A given flag that contradicts the file is a ConfigError naming that flag;
    a file that does not say (a narrow bare state_dict) leaves the flags as they are; a file that
    cannot be read is a CheckpointError naming `path_setting`. Returns whether the file said."""
    from engine import checkpoint
    attrs = attrs or checkpoint.ARCH_KEYS
    values = {k: (getattr(args, a) if a in given else None) for k, a in zip(checkpoint.ARCH_KEYS, attrs)}
    try:
        arch = checkpoint.resolve_arch(getattr(args, path_setting), values, settings=attrs)
    except errors.CheckpointError as e:
        e.setting = e.setting or path_setting
        raise
    for k, a in zip(checkpoint.ARCH_KEYS, attrs):
        if arch[k] is not None:
            setattr(args, a, arch[k])
    return arch["model"] is not None


def parse_for_checkpoint(parser, argv=None, check=None):
    """Parse `argv` (sys.argv[1:] when None) with a parser that has --model-state-file; a checkpoint
    knows its model, so the architecture flags the user left out come from it (fill_arch). `check`
    (parser, args) runs the script's own flag checks first, before the file is read."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if check is not None:
        check(parser, args)
    if args.model_state_file:
        fill_arch(args, given_flags(parser, argv), "model_state_file")
    return args


def given_flags(parser, argv):
    """Destinations the user set explicitly on the command line (a resume takes the rest from the
    saved run)."""
    shadow = argparse.ArgumentParser(add_help=False)
    for a in parser._actions:
        if not a.option_strings or a.dest == "help":
            continue
        if isinstance(a, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            shadow.add_argument(*a.option_strings, dest=a.dest, action="store_const", const=True,
                                default=argparse.SUPPRESS)
        elif isinstance(a, argparse.BooleanOptionalAction):
            shadow.add_argument(*a.option_strings, dest=a.dest, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS)
        else:
            kw = {"nargs": a.nargs} if a.nargs not in (None, 0) else {}
            shadow.add_argument(*a.option_strings, dest=a.dest, default=argparse.SUPPRESS, **kw)
    known, _ = shadow.parse_known_args(argv)
    return set(vars(known))
