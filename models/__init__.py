"""Model registry: `models.create(name, ...)` builds a named EfficientNet-32 variant."""
from dataclasses import dataclass

import torch

from .efficientnet import (BASE_STAGES, EfficientNet32, MBConv, ConvUnit, Swish, make_divisible,
                           resolve)
from .heads import CosineLinear, L2Norm


@dataclass(frozen=True)
class Scaling:
    width: float
    depth: float
    dropout: float
    drop_connect: float


# Compound scaling (width, depth, dropout) of the original entry; drop-connect only where the
# original had it (b0/b3).
MODELS = {
    "efficientnet_b0": Scaling(1.0, 1.0, 0.2, 0.2),
    "efficientnet_b3": Scaling(1.2, 1.4, 0.3, 0.2),
    "efficientnet_ex": Scaling(0.8, 0.8, 0.0, 0.0),
    "efficientnet_exx": Scaling(0.8, 0.7, 0.0, 0.0),
}


def names():
    return sorted(MODELS)


def check_name(name):
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(names())}")


def create(name, num_classes=100, coslinear=True, width_mult=None, depth_mult=None,
           drop_connect=None, dropout=None, input_size=32, bn_momentum=None):
    """Build `name`; any of width/depth/drop-connect/dropout given overrides the named scaling.

    bn_momentum overrides the original's 0.01, which needs a few hundred steps before the running
    statistics (and so the test accuracy) mean anything: short runs want 0.1.
    """
    check_name(name)
    s = MODELS[name]
    pick = lambda override, default: default if override is None else float(override)
    width, depth = pick(width_mult, s.width), pick(depth_mult, s.depth)
    if width <= 0 or depth <= 0:
        raise ValueError(f"width and depth multipliers must be positive, got {width} and {depth}")
    model = EfficientNet32(
        width_mult=width, depth_mult=depth,
        dropout=pick(dropout, s.dropout), drop_connect_rate=pick(drop_connect, s.drop_connect),
        num_classes=num_classes, coslinear=coslinear, input_size=input_size,
    )
    if bn_momentum is not None:
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = float(bn_momentum)
    model.name = name
    return model


def describe(model):
    """Short identity of a built model, stored with checkpoints to catch mismatches on load."""
    return {
        "model": getattr(model, "name", type(model).__name__),
        "width_mult": model.width_mult,
        "depth_mult": model.depth_mult,
        "coslinear": model.coslinear,
        "num_classes": model.classifier[-1].kernel.shape[1] if model.coslinear
        else model.classifier[-1].out_features,
    }


__all__ = ["create", "names", "check_name", "describe", "MODELS", "EfficientNet32", "MBConv",
           "ConvUnit", "Swish", "CosineLinear", "L2Norm", "make_divisible", "resolve", "BASE_STAGES"]
