"""The model registry: each named model declares its own facts next to its builder.

    @register_model(width=0.8, depth=0.8, dropout=0.0, drop_connect=0.0, lr_regime=UCI_REGIME_75)
    def efficientnet_ex(**kw):
        return EfficientNet32(**kw)

A card holds what the rest of the toolkit needs to know about a model without building it: its
compound scaling, its regularisation and its LR regime (and so its epochs). `create` builds one with
any of those overridden; the head is chosen by name ("cosine" or "linear").
"""
from dataclasses import dataclass
from typing import Callable

import torch

from micronet_cifar100 import errors

HEADS = ("cosine", "linear")


@dataclass(frozen=True)
class ModelCard:
    name: str
    build: Callable
    width: float
    depth: float
    dropout: float
    drop_connect: float
    # ((first epoch, last epoch, lr), ...), 1-based and inclusive, set per epoch.
    lr_regime: tuple

    @property
    def epochs(self):
        return self.lr_regime[-1][1]


_CARDS = {}


def register_model(*, width, depth, dropout, drop_connect, lr_regime, name=None):
    """Decorator: register `fn(**kw) -> nn.Module` under `name` (default: its own) with the given facts."""
    def register(fn):
        key = name or fn.__name__
        _CARDS[key] = ModelCard(key, fn, width, depth, dropout, drop_connect, tuple(lr_regime))
        return fn
    return register


def names():
    return sorted(_CARDS)


def card(name):
    """The registered facts of `name`; an unknown name lists the known ones."""
    if name not in _CARDS:
        raise errors.ConfigError(f"unknown model {name!r}; known models: {', '.join(names())}",
                                 setting="model")
    return _CARDS[name]


def head_name(coslinear):
    """A cosine-head switch (true or false) as a head name."""
    return "cosine" if coslinear else "linear"


def create(name, head="cosine", num_classes=100, width_mult=None, depth_mult=None,
           drop_connect=None, dropout=None, bn_momentum=None, input_size=32):
    """Build `name`; any of width/depth/drop-connect/dropout given overrides the card's value.

    bn_momentum overrides BatchNorm's momentum (0.01 in the original entry) for every layer.
    """
    c = card(name)
    if head not in HEADS:
        raise errors.ConfigError(f"unknown head {head!r}; use one of {', '.join(HEADS)}", setting="head")
    pick = lambda override, default: default if override is None else float(override)
    width, depth = pick(width_mult, c.width), pick(depth_mult, c.depth)
    if not (0 < width < float("inf") and 0 < depth < float("inf")):
        raise errors.ConfigError(f"width and depth multipliers must be positive and finite, got {width} "
                                 f"and {depth}", setting="width_mult")
    model = c.build(width_mult=width, depth_mult=depth, dropout=pick(dropout, c.dropout),
                    drop_connect_rate=pick(drop_connect, c.drop_connect), num_classes=num_classes,
                    coslinear=head == "cosine", input_size=input_size)
    if bn_momentum is not None:
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
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


def label(arch):
    """A describe() dict as words: 'efficientnet_ex (width 0.8, depth 0.8, cosine head)'."""
    return (f"{arch['model']} (width {arch['width_mult']:g}, depth {arch['depth_mult']:g}, "
            f"{'cosine' if arch['coslinear'] else 'linear'} head)")


def identify(state_dict):
    """The registered model (at its own scaling, either head) whose keys and shapes are exactly
    these, as a describe() dict; None when no registered model matches."""
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    for name in names():
        for head in HEADS:
            with torch.device("meta"):
                ref = create(name, head=head)
            if {k: tuple(v.shape) for k, v in ref.state_dict().items()} == shapes:
                return describe(ref)
    return None
