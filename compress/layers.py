"""The layers compression acts on: every conv, linear and cosine (a linear on unit vectors) layer.

Each is found by its torch base class (so the quantised versions, subclasses, are found too) and
named as in `model.named_modules()`, without the prefixes that DDP and torch.compile add.
"""
from collections import OrderedDict

from torch import nn

from models.heads import CosineLinear

# Wrappers that add a prefix to every name: DataParallel/DDP and torch.compile.
_PREFIXES = ("module.", "_orig_mod.")

# Allowed bit widths: 2..8 are simulated on an integer grid (fake quantisation); 16 is simulated as
# float16 (weights and inputs rounded to half precision); 32 is float32 as it is. Every width below
# 32 is simulated in training and evaluation, so the accuracy pays for each bit the score charges.
INT_BITS = tuple(range(2, 9))
FLOAT_BITS = (16, 32)
HALF_BITS = 16
SIMULATED_BITS = INT_BITS + (HALF_BITS,)
BITS = INT_BITS + FLOAT_BITS
BITS_TEXT = "2 to 8, 16 or 32"


def bare_name(name):
    for p in _PREFIXES:
        while name.startswith(p):
            name = name[len(p):]
    return name


def kind_of(module):
    """"conv", "linear", "cosine", or None for a layer compression does not touch."""
    if isinstance(module, nn.Conv2d):
        return "conv"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, CosineLinear):
        return "cosine"
    return None


def weight_name(module):
    """The parameter holding the layer's weights: "kernel" for the cosine layer, else "weight"."""
    return "kernel" if isinstance(module, CosineLinear) else "weight"


def weight_of(module):
    return getattr(module, weight_name(module))


def output_axis(module):
    """The axis of the weight that indexes output units: 0 for conv/linear, 1 (classes) for the
    cosine layer's [in, out] kernel."""
    return 1 if isinstance(module, CosineLinear) else 0


def compressible(model):
    """OrderedDict bare name -> module of every conv, linear and cosine layer, in module order."""
    out = OrderedDict()
    for name, m in model.named_modules():
        if kind_of(m) is not None:
            out[bare_name(name)] = m
    return out


def first_and_head(model):
    """(names of the first layer, names of the head): the first compressible layer, and every
    compressible layer inside the model's `classifier` (the last one when it has none)."""
    names = list(compressible(model))
    if not names:
        return set(), set()
    head = {n for n in names if n == "classifier" or n.startswith("classifier.")}
    return {names[0]}, head or {names[-1]}


def set_module(model, name, new):
    """Put `new` in place of the submodule called `name` (its real name in `model`, prefixes and all)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
