"""torchscope: parameters, FLOPs, Madds, memory and MicroNet score of a PyTorch model.

    import models, torchscope
    report = torchscope.count(models.create("efficientnet_ex"), input_size=(3, 32, 32),
                              mul_factor=0.5, rules="seed")
    report.total_params, report.flops, report.madds(), report.madds(1.0), report.scores()

`python torchscope/count.py --help` is the command-line front end.
"""
from .counter import BATCH, Report, Row, count
from .rules import RULESETS
from .score import OPS_BASELINE, PARAMS_BASELINE, micronet_score, scores

__all__ = ["count", "Report", "Row", "BATCH", "RULESETS", "scores", "micronet_score",
           "PARAMS_BASELINE", "OPS_BASELINE"]
