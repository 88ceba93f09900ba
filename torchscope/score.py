"""The MicroNet Challenge 2019 score, CIFAR-100 track (docs/counting.md).

score = params / 36.5M + ops / 10.49B, both relative to WideResNet-28-10, in 32-bit units: a b-bit
parameter counts b/32 of one, a b-bit op b/32 of one.

Two conventions, from the same counts (a report's parameter costs, and its rows' multiplies, adds
and bit widths):
- "freebie": every value that is not quantised counts at 16 bits: parameters x0.5, a multiply x0.5;
  adds stay at the accumulator's width (32, ADD_BITS). Under the uci rules this is the original entry's
  0.5 * params / 36.5M + Madds(mf 0.5) / 10.49B.
- "full": unquantised values at 32 bits: params / 36.5M + (mults + adds) / 10.49B for a model
  without compression, i.e. the original's Madds at mf 1 (the organisers' leaderboard figure for
  the entry, 0.12541).
A quantised layer's weights cost their own bits in both (plus a 1-bit mask per entry when sparse);
its multiplies cost the larger of their two inputs' widths, weight and activation, an unquantised
input counting at the convention's width (16 or 32): a 4-bit weight times an 8-bit input costs 8/32.

Which one is *the* score (`allowed`): the rules let a model count its unquantised values at 16 bits
only while nothing in it is quantised below 16 bits ("If an entry quantizes any part of their model
to less than 16-bits, then no 'free' quantization to 16-bits is allowed"). So a dense, pruned or
float16 model's score is the freebie figure, and a model with any integer-grid layer has only the
full one.
"""
PARAMS_BASELINE = 36.5e6
OPS_BASELINE = 10.49e9
# The width every value may be counted at, without quantising it, while nothing is below it.
FREEBIE_BITS = 16
# The width of a value that is not quantised, under each convention.
DEFAULT_BITS = {"freebie": FREEBIE_BITS, "full": 32}
# An add's width: the accumulator's 32 bits under both conventions ("we do not allow 'freebie'
# quantization for addition operations"), and what evaluation computes.
ADD_BITS = 32
# The rules' words on the freebie, quoted where a score is explained.
FREEBIE_RULE = ("If an entry quantizes any part of their model to less than 16-bits, then no 'free' "
                "quantization to 16-bits is allowed")


def micronet_score(params, ops):
    return params / PARAMS_BASELINE + ops / OPS_BASELINE


def mult_bits(row, default):
    """The width a row's multiplies are charged at: the larger of its weight and input widths, an
    unquantised side (None) at `default`."""
    return max(row.weight_bits or default, row.act_bits or default)


def scores(report):
    """{"freebie": {...}, "full": {...}}, each with the params, ops, their two terms and the score:
    both conventions, whether the rules allow them for this model or not (see `allowed`)."""
    out = {}
    adds = sum(r.adds for r in report.rows)
    for key, default in DEFAULT_BITS.items():
        params = report.params16 if default == FREEBIE_BITS else report.params32
        # Sums of whole bit counts first, one division last: exact for every dense model. A
        # quantised layer's scaling multiplies work on 32-bit values: the default width.
        mult_bit_ops = sum(r.mults * mult_bits(r, default) + r.scale_mults * default for r in report.rows)
        ops = mult_bit_ops / 32 + adds * ADD_BITS / 32
        out[key] = {"params": params, "ops": ops, "params_term": params / PARAMS_BASELINE,
                    "ops_term": ops / OPS_BASELINE, "score": micronet_score(params, ops)}
    return out


def allowed(report):
    """The one score the rules allow: {"score", "convention" ("freebie" or "full"),
    "freebie_allowed", "rule" (why, in a sentence), and the convention's params/ops/terms}."""
    low = list(report.low_bit_layers)
    convention = "full" if low else "freebie"
    figures = scores(report)[convention]
    if low:
        rule = (f"no 16-bit freebie: {len(low)} layer{'s are' if len(low) != 1 else ' is'} quantised below "
                f"16 bits, and the rules then count unquantised values at 32 bits (\"{FREEBIE_RULE}\")")
    else:
        rule = ("16-bit freebie applied: nothing is quantised below 16 bits, so the rules let unquantised "
                "parameters and multiplies count at 16 bits (adds stay at 32)")
    return {**figures, "convention": convention, "freebie_allowed": not low, "rule": rule}
