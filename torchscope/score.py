"""The MicroNet Challenge 2019 score, CIFAR-100 track (docs/counting.md).

score = params / 36.5M + ops / 10.49B, both relative to WideResNet-28-10.

Two conventions, from the same counts (a report's 32- and 16-bit parameter costs, multiplies
and adds):
- "freebie": a model without quantisation may count every parameter at 16 bits (x0.5) and
  every multiply at 16 bits (x0.5); adds stay 32-bit. Under the uci rules this is the original
  entry's 0.5 * params / 36.5M + Madds(mf 0.5) / 10.49B.
- "full": everything at 32 bits: params / 36.5M + (mults + adds) / 10.49B, i.e. the original's
  Madds at mf 1 (the organisers' leaderboard figure for the entry, 0.12541).
The counter assumes floating-point weights; a quantised model below 16 bits loses the freebie
and would need its own bit widths.
"""
PARAMS_BASELINE = 36.5e6
OPS_BASELINE = 10.49e9


def micronet_score(params, ops):
    return params / PARAMS_BASELINE + ops / OPS_BASELINE


def scores(report):
    """{"freebie": {...}, "full": {...}}, each with the params, ops and score it used."""
    out = {}
    for key, params, mul_weight in (("freebie", report.params16, 0.5), ("full", report.params32, 1.0)):
        ops = mul_weight * report.mults + report.adds
        out[key] = {"params": params, "ops": ops, "score": micronet_score(params, ops)}
    return out
