"""The original's step LR regime: triples `start end lr`, epochs 1-based and inclusive."""
from .errors import UserError

# SPEC §3: 0.07 -> 0.007 -> 0.0007 -> 0.00007 at epochs 26, 51 and 66.
DEFAULT_REGIME = ((1, 25, 0.07), (26, 50, 0.007), (51, 65, 0.0007), (66, 70, 0.00007))
# ex/exx train 5 epochs longer in the last step.
LONG_REGIME = DEFAULT_REGIME[:-1] + ((66, 75, 0.00007),)


def default_regime(model_name):
    return LONG_REGIME if model_name in ("efficientnet_ex", "efficientnet_exx") else DEFAULT_REGIME


def parse_regime(tokens):
    """`["1", "25", "0.07", "26", "50", "0.007"]` (or one comma/space separated string) -> triples."""
    if isinstance(tokens, str):
        tokens = [tokens]
    flat = [t for tok in tokens for t in tok.replace(",", " ").split()]
    fix = "give triples 'start end lr' covering epochs 1..N, e.g. --lr-regime 1 25 0.07 26 50 0.007"
    if not flat or len(flat) % 3:
        raise UserError(f"--lr-regime has {len(flat)} values, not a multiple of 3; {fix}")
    triples = []
    for i in range(0, len(flat), 3):
        try:
            start, end, lr = int(flat[i]), int(flat[i + 1]), float(flat[i + 2])
        except ValueError:
            raise UserError(f"--lr-regime triple {' '.join(flat[i:i + 3])!r} is not 'int int float'; "
                            f"{fix}") from None
        expected = triples[-1][1] + 1 if triples else 1
        if start != expected or end < start:
            raise UserError(f"--lr-regime triple {start} {end} {lr:g} should start at epoch {expected} "
                            f"and end at or after it; {fix}")
        if not lr > 0:
            raise UserError(f"--lr-regime learning rate {lr:g} must be positive; {fix}")
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
