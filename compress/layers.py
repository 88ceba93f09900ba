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


def units_of(module):
    """The number of output units of a layer (conv filters, linear rows, cosine classes)."""
    return weight_of(module).shape[output_axis(module)]


# Layer groups that a pruning exclusion may name besides module names (compress.prune.resolve_exclude).
GROUPS = {
    "stem": "the first layer (the conv on the image)",
    "head": "every layer inside the model's classifier (cosine head: classifier.0 and the cosine layer)",
    "conv": "every conv",
    "linear": "every linear layer",
    "cosine": "the cosine layer",
    "depthwise": "the depthwise convs (one group per input channel)",
    "pointwise": "the 1x1 convs without groups (expansion, projection, head unit, squeeze-excite)",
    "se": "the squeeze-excite convs",
}


def _is_depthwise(m):
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels


def _is_pointwise(m):
    return isinstance(m, nn.Conv2d) and m.groups == 1 and tuple(m.kernel_size) == (1, 1)


def layer_groups(model):
    """{group: [bare names]} for every group of GROUPS, in module order (a group may be empty)."""
    from models.efficientnet import SqueezeExcite  # a model-specific group: found by its module class
    layers = compressible(model)
    first, head = first_and_head(model)
    se_prefixes = tuple(bare_name(n) + "." for n, m in model.named_modules() if isinstance(m, SqueezeExcite))
    member = {
        "stem": lambda n, m: n in first,
        "head": lambda n, m: n in head,
        "conv": lambda n, m: kind_of(m) == "conv",
        "linear": lambda n, m: kind_of(m) == "linear",
        "cosine": lambda n, m: kind_of(m) == "cosine",
        "depthwise": lambda n, m: _is_depthwise(m),
        "pointwise": lambda n, m: _is_pointwise(m),
        "se": lambda n, m: bool(se_prefixes) and n.startswith(se_prefixes),
    }
    return {g: [n for n, m in layers.items() if member[g](n, m)] for g in GROUPS}


def following_batchnorm(model):
    """{bare name: BatchNorm} for each layer whose next sibling in the same Sequential is a BatchNorm
    over its output units: the BatchNorm that rescales that layer's output channels (in these models
    every conv unit is conv, BatchNorm, activation, and each block's projection conv has its own)."""
    out = {}
    for prefix, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        kids = list(seq.named_children())
        for (name, a), (_, b) in zip(kids, kids[1:]):
            if (kind_of(a) is not None and isinstance(b, nn.modules.batchnorm._BatchNorm)
                    and b.num_features == units_of(a)):
                out[bare_name(f"{prefix}.{name}" if prefix else name)] = b
    return out


def empty_layers(model):
    """The bare names of the conv, linear and cosine layers whose weights are all zero, in module
    order: such a layer outputs a constant (its bias), so the network after it sees nothing of the
    image through it."""
    return [n for n, m in compressible(model).items() if not bool(weight_of(m).detach().ne(0).any())]
