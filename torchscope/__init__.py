"""torchscope: parameters, FLOPs, Madds, memory and MicroNet score of a PyTorch model.

    import models, torchscope
    report = torchscope.count(models.create("efficientnet_ex"), input_size=(3, 32, 32),
                              mul_factor=0.5, rules="uci")
    report.total_params, report.flops, report.madds(), report.madds(1.0), report.scores()

Every leaf module is costed by its layer kind: torch layers by their type, a layer of one's own by
the `layer_kind` class attribute it declares (torchscope.rules lists the kinds; docs/counting.md the
conventions). The counting core (counter, rules, score, text) imports nothing from the project.
`python torchscope/count.py --help` (or `python -m torchscope.count`) is the command-line front
end, in torchscope/command.py.
"""
from .counter import BATCH, Report, Row, count
from .rules import RULE_ALIASES, RULESETS, TORCH_KINDS, layer_kind
from .score import OPS_BASELINE, PARAMS_BASELINE, micronet_score, scores

__all__ = ["count", "Report", "Row", "BATCH", "RULESETS", "RULE_ALIASES", "TORCH_KINDS", "layer_kind",
           "scores", "micronet_score", "PARAMS_BASELINE", "OPS_BASELINE"]
