"""torchscope: parameters, FLOPs, Madds, memory and MicroNet score of a PyTorch model.

    import models, torchscope
    report = torchscope.count(models.create("efficientnet_ex"), input_size=(3, 32, 32),
                              mul_factor=0.5, rules="uci")
    report.total_params, report.flops, report.madds(), report.madds(1.0), report.scores()

Every leaf module, and every module that has a layer kind, is costed by its kind: torch layers by
their type, a layer of one's own by the `layer_kind` class attribute it declares (torchscope.rules
lists the kinds; docs/counting.md the conventions). The counting core (counter, rules, score, text)
imports nothing from the project.

A compressed model is scored under the micronet rules from its compression record (a plain dict,
compress.record: per layer its weight bits, input bits and mask; docs/compression.md):

    report = torchscope.count(model, rules="micronet", compression=record)
    report.score()      # the one score the rules allow: no 16-bit freebie once a layer is below 16 bits

`python torchscope/count.py` (or `python -m torchscope.count`; its help lists the options) is the
command-line front end, in torchscope/command.py.
"""
from .counter import BATCH, Report, Row, count
from .rules import RULE_ALIASES, RULESETS, TORCH_KINDS, layer_kind
from .score import (DEFAULT_BITS, FREEBIE_BITS, OPS_BASELINE, PARAMS_BASELINE, allowed, micronet_score, mult_bits,
                    scores)

__all__ = ["count", "Report", "Row", "BATCH", "RULESETS", "RULE_ALIASES", "TORCH_KINDS", "layer_kind",
           "scores", "allowed", "FREEBIE_BITS", "micronet_score", "mult_bits", "DEFAULT_BITS", "PARAMS_BASELINE", "OPS_BASELINE"]
