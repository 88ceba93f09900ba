"""The MicroNet Challenge 2019 score, CIFAR-100 track (docs/counting.md).

score = params / 36.5M + ops / 10.49B, both relative to WideResNet-28-10, in 32-bit units: a b-bit
parameter counts b/32 of one, a b-bit op b/32 of one.

Two conventions, from the same counts (a report's parameter costs, and its rows' multiplies, adds
and bit widths):
- "freebie": every value that is not quantised counts at 16 bits: parameters x0.5, a multiply x0.5;
  adds stay at the accumulator's width (32 unless given). Under the uci rules this is the original
  entry's 0.5 * params / 36.5M + Madds(mf 0.5) / 10.49B.
- "full": unquantised values at 32 bits: params / 36.5M + (mults + adds) / 10.49B for a model
  without compression, i.e. the original's Madds at mf 1 (the organisers' leaderboard figure for
  the entry, 0.12541).
A quantised layer's weights cost their own bits in both (plus a 1-bit mask per entry when sparse);
its multiplies cost the larger of their two inputs' widths, weight and activation, an unquantised
input counting at the convention's width (16 or 32): a 4-bit weight times an 8-bit input costs 8/32.
"""
PARAMS_BASELINE = 36.5e6
OPS_BASELINE = 10.49e9
# The width of a value that is not quantised, under each convention.
DEFAULT_BITS = {"freebie": 16, "full": 32}


def micronet_score(params, ops):
    return params / PARAMS_BASELINE + ops / OPS_BASELINE


def mult_bits(row, default):
    """The width a row's multiplies are charged at: the larger of its weight and input widths, an
    unquantised side (None) at `default`."""
    return max(row.weight_bits or default, row.act_bits or default)


def scores(report):
    """{"freebie": {...}, "full": {...}}, each with the params, ops, their two terms and the score."""
    out = {}
    add_bits = getattr(report, "add_bits", 32)
    adds = sum(r.adds for r in report.rows)
    for key, default in DEFAULT_BITS.items():
        params = report.params16 if default == 16 else report.params32
        # Sums of whole bit counts first, one division last: exact for every dense model.
        mult_bit_ops = sum(r.mults * mult_bits(r, default) for r in report.rows)
        ops = mult_bit_ops / 32 + adds * add_bits / 32
        out[key] = {"params": params, "ops": ops, "params_term": params / PARAMS_BASELINE,
                    "ops_term": ops / OPS_BASELINE, "score": micronet_score(params, ops)}
    return out
