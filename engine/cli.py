"""argparse types shared by the scripts: each bad value becomes argparse's one-line error, exit 2."""
import argparse
import os

import models


def str2bool(v):
    """A real boolean: the original's `type=bool` made `--coslinear False` mean True."""
    s = str(v).strip().lower()
    if s in ("true", "yes", "1", "on", "t", "y"):
        return True
    if s in ("false", "no", "0", "off", "f", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {v!r}")


def typed(convert, ok, what):
    """An argparse type: convert the text, then check the value; each failure is one clear line."""
    def parse(v):
        try:
            x = convert(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {v!r}") from None
        if not ok(x):
            raise argparse.ArgumentTypeError(f"must be {what}, got {v}")
        return x
    return parse


positive_int = typed(int, lambda n: n > 0, "a positive integer")
positive_float = typed(float, lambda x: x > 0, "a positive number")
nonneg_float = typed(float, lambda x: x >= 0, "a number >= 0")
probability = typed(float, lambda x: 0 <= x < 1, "a number in [0, 1)")


def model_name(v):
    if v not in models.MODELS:
        raise argparse.ArgumentTypeError(f"unknown model {v!r}; known models: {', '.join(models.names())}")
    return v


def default_data_dir():
    return os.environ.get("CIFAR100_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "cifar100")


def add_model_args(p):
    p.add_argument("--model", type=model_name, default="efficientnet_ex",
                   help=f"one of {', '.join(models.names())}")
    p.add_argument("--width-mult", type=positive_float, default=None,
                   help="override the model's width multiplier (compound scaling)")
    p.add_argument("--depth-mult", type=positive_float, default=None,
                   help="override the model's depth multiplier")
    p.add_argument("--coslinear", type=str2bool, default=True, metavar="true|false",
                   help="cosine-linear head (true, the original's setting) or dropout+linear (false)")


def add_data_args(p):
    p.add_argument("--data_dir", "--data-dir", dest="data_dir", default=default_data_dir(),
                   help="folder holding cifar-100-python/ (default: $CIFAR100_DIR or ~/.cache/cifar100)")
    p.add_argument("--no-download", action="store_true",
                   help="never download CIFAR-100; fail if it is not under --data_dir")
    p.add_argument("--test-limit", type=positive_int, default=None,
                   help="evaluate on the first N test images only")
