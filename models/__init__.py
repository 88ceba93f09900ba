"""The model family: EfficientNet-32 variants of the original entry (UCI/Qualcomm, 2019), each
registered with its own facts (scaling, regularisation, LR regime).

    import models
    net = models.create("efficientnet_ex", head="cosine")
    models.card("efficientnet_ex").epochs   # 75
"""
from .efficientnet import EfficientNet32
from .registry import (HEADS, ModelCard, card, create, describe, head_name, identify, label, names,
                       register_model)

# The original entry's step LR regime (docs/original-entry.md): 0.07, then /10 at epochs 26, 51, 66.
UCI_REGIME = ((1, 25, 0.07), (26, 50, 0.007), (51, 65, 0.0007), (66, 70, 0.00007))
# ex and exx trained 5 epochs longer in the last step.
UCI_REGIME_75 = UCI_REGIME[:-1] + ((66, 75, 0.00007),)
# The original entry's label-refinery chain: each model refined by the one before it.
UCI_CHAIN = ("efficientnet_b3", "efficientnet_b3", "efficientnet_b0", "efficientnet_ex")


# The original entry's variants: compound scaling (width, depth, dropout), and drop-connect only
# where the original had it (b0, b3). All four are EfficientNet32 with other facts.
VARIANTS = {
    "efficientnet_b0": dict(width=1.0, depth=1.0, dropout=0.2, drop_connect=0.2, lr_regime=UCI_REGIME),
    "efficientnet_b3": dict(width=1.2, depth=1.4, dropout=0.3, drop_connect=0.2, lr_regime=UCI_REGIME),
    "efficientnet_ex": dict(width=0.8, depth=0.8, dropout=0.0, drop_connect=0.0, lr_regime=UCI_REGIME_75),
    "efficientnet_exx": dict(width=0.8, depth=0.7, dropout=0.0, drop_connect=0.0, lr_regime=UCI_REGIME_75),
}
for _name, _facts in VARIANTS.items():
    register_model(name=_name, **_facts)(EfficientNet32)


__all__ = ["create", "card", "names", "describe", "identify", "label", "head_name", "register_model",
           "ModelCard", "HEADS", "EfficientNet32", "UCI_REGIME", "UCI_REGIME_75", "UCI_CHAIN"]
