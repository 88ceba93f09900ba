"""Step LR regimes: triples `start end lr`, epochs 1-based and inclusive, set once per epoch.
A model's own regime is on its card (models.card(name).lr_regime)."""
import math

import errors

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
