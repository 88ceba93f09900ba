"""The optimiser and its schedule: SGD as the original entry used it, step LR regimes (triples
`start end lr`, epochs 1-based and inclusive, set once per epoch), and the fine-tuning recipe of a
run started from trained weights. A model's own regime is on its card (models.card(name).lr_regime).
"""
import math
from dataclasses import dataclass

import torch

from micronet_cifar100 import errors

_FIX = "give triples 'start end lr' covering epochs 1..N, e.g. 1 25 0.07 26 50 0.007"


def _bad(text):
    return errors.ConfigError(f"{text}; {_FIX}", setting="lr_regime")


def parse_regime(tokens):
    """`["1", "25", "0.07", "26", "50", "0.007"]` (or one comma/space separated string) -> triples."""
    if isinstance(tokens, str):
        tokens = [tokens]
    flat = [t for tok in tokens for t in str(tok).replace(",", " ").split()]
    if not flat or len(flat) % 3:
        raise _bad(f"the LR regime has {len(flat)} values, not a multiple of 3")
    triples = []
    for i in range(0, len(flat), 3):
        try:
            start, end, lr = int(flat[i]), int(flat[i + 1]), float(flat[i + 2])
        except ValueError:
            raise _bad(f"triple {' '.join(flat[i:i + 3])!r} is not 'int int float'") from None
        expected = triples[-1][1] + 1 if triples else 1
        if start != expected or end < start:
            raise _bad(f"triple {start} {end} {lr:g} should start at epoch {expected} and end at or after it")
        if not (lr > 0 and math.isfinite(lr)):
            raise _bad(f"learning rate {lr:g} must be positive and finite")
        triples.append((start, end, lr))
    return tuple(triples)


def format_regime(regime):
    return " ".join(f"{s} {e} {lr:g}" for s, e, lr in regime)


def lr_at(regime, epoch):
    """The LR of a 1-based epoch; past the regime's end the last LR holds."""
    for start, end, lr in regime:
        if start <= epoch <= end:
            return lr
    return regime[-1][2]


def regime_end(regime):
    return regime[-1][1]


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def make_optimizer(params, lr, momentum, weight_decay, fused=False):
    """SGD as the original entry: momentum, weight decay on all parameters, no Nesterov; torch's
    fused kernel when asked and available, else the multi-tensor one."""
    kw = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=False)
    if fused:
        try:
            return torch.optim.SGD(params, fused=True, **kw)
        except (RuntimeError, TypeError):
            pass
    return torch.optim.SGD(params, foreach=True, **kw)


@dataclass(frozen=True)
class FineTuneRecipe:
    """How a run started from trained weights (e.g. to compress them) trains when no
    regime is given: `epochs` long (unless the run sets its epochs), the original regime's second LR
    while the pruning span runs (its first `prune_share` of the epochs: Zhu & Gupta prune early and
    let the rest of training recover), then a tenth and a hundredth of it, as the original regime ends."""
    epochs: int = 30
    lr: float = 0.007
    prune_share: float = 2 / 3
    decays: tuple = (10, 100)


FINE_TUNE = FineTuneRecipe()


def default_prune_span(epochs, recipe=FINE_TUNE):
    """Prune from epoch 1 over the recipe's share of the run; train at the target for the rest."""
    return [1, max(1, math.ceil(recipe.prune_share * epochs - 1e-9))]


def fine_tune_regime(epochs, recipe=FINE_TUNE):
    """The LR regime of a fine-tuning run of `epochs` (FineTuneRecipe): triples (start, end, lr)."""
    span_end = default_prune_span(epochs, recipe)[1]
    if span_end >= epochs:
        return ((1, epochs, recipe.lr),)
    mid = span_end + max(1, (epochs - span_end) // 2)
    phases = [(1, span_end, recipe.lr), (span_end + 1, mid, round(recipe.lr / recipe.decays[0], 12))]
    if mid < epochs:
        phases.append((mid + 1, epochs, round(recipe.lr / recipe.decays[1], 12)))
    return tuple(phases)
