"""Text output of a Report: the block the original entry's count.py printed, the micronet figures,
the per-layer table."""
from .score import OPS_BASELINE, PARAMS_BASELINE


def num(x):
    """1,234,567 for whole numbers (also whole floats such as 0.5 * an even count), else 2 decimals."""
    if float(x).is_integer():
        return f"{int(x):,}"
    return f"{x:,.2f}"


def _mf_phrase(mf):
    if mf == 0.5:
        return "Counting multiplication operations as 1/2 operation"
    if mf == 1:
        return "Counting multiplication as 1 operation"
    return f"Counting multiplication operations as {mf:g} operation"


def _baselines():
    return f"{PARAMS_BASELINE / 1e6:g}M", f"{OPS_BASELINE / 1e9:g}B"


def uci_block(report):
    """The lines the original count.py printed, with the true trainable count."""
    mem = report.memory()
    lines = [
        _mf_phrase(report.mul_factor),
        "",
        f"Total params: {num(report.total_params)}",
        f"Trainable params: {num(report.trainable_params)}",
        f"Non-trainable params: {num(report.non_trainable_params)}",
    ]
    if report.legacy_nontrainable:
        lines.append(f"  (the original printed {num(report.legacy_nontrainable)} of these as non-trainable: "
                     "parameters not named weight/bias, i.e. the cosine matrix; they are trained)")
    lines += [
        f"Total FLOPs: {num(report.flops)}",
        f"Total Madds: {num(report.madds())}",
        "",
        f"Input size (MB): {mem['input_mb']:.2f}",
        f"Forward/backward pass size (MB): {mem['forward_backward_mb']:.2f}",
        f"Params size (MB): {mem['params_mb']:.2f}",
        f"Estimated Total Size (MB): {mem['total_mb']:.2f}",
        f"FLOPs size (GB): {mem['flops_gb']:.2f}",
        f"Madds size (GB): {mem['madds_gb']:.2f}",
    ]
    return lines


def _score_line(report, allowed):
    p, o = _baselines()
    return [f"MicroNet score: {allowed['score']:.6f}  (the score the rules allow)",
            f"  = {num(allowed['params'])}/{p} + {num(allowed['ops'])}/{o}  (parameters {allowed['params_term']:.6f} "
            f"+ operations {allowed['ops_term']:.6f})",
            f"  {allowed['rule']}"]


def _tta_line(report):
    return ["Flip TTA counted: every layer runs twice (the image and its mirror), then the outputs are "
            "averaged (1 add + 1 multiply per output); parameters are counted once"] if report.tta else []


def uci_scores(report, mul_factor_name="mul_factor"):
    """The score lines under the original's conventions; `mul_factor_name` is what the caller
    calls the report's mul_factor (the score uses 0.5 and 1 whatever it is). A model quantised
    below 16 bits gets no freebie line: the rules allow it no freebie."""
    s = report.scores()
    allowed = report.score()
    p, o = _baselines()
    fb, full = s["freebie"], s["full"]
    lines = [f"MicroNet score (baselines {p} params, {o} ops; Madds at mul_factor 0.5 and 1, "
             f"whatever {mul_factor_name} is):"]
    if allowed["freebie_allowed"]:
        lines += ["Count all parameters as 16-bit and 1 multiplication operation as 1/2 operation:",
                  f"(0.5 x {num(report.total_params)})/{p} + {num(fb['ops'])}/{o} = {fb['score']:.6f}"]
    lines += ["Count all parameters as 32-bit and 1 multiplication operation as 1 operation:",
              f"{num(report.total_params)}/{p} + {num(full['ops'])}/{o} = {full['score']:.6f}",
              *_tta_line(report), "", *_score_line(report, allowed)]
    return lines


def _bits(v):
    return "-" if v is None else str(v)


def micronet_block(report):
    s = report.scores()
    allowed = report.score()
    p, o = _baselines()
    fb, full = s["freebie"], s["full"]
    compressed = report.compressed or any(r.weight_bits or r.act_bits for r in report.rows)
    unit = "in 32-bit units: bits / 32" if compressed else "32-bit"
    lines = [
        "Counting by the MicroNet Challenge rules (google-research micronet_challenge counting.py):",
        "multiplies and adds apart, BatchNorm folded into its conv, residual adds, SE multiply,",
        "swish 3 mults + 1 add, sigmoid 2 + 1, pools C mults + (H*W - 1)*C adds",
    ]
    if compressed:
        unquantised = "16 with the freebie, 32 without" if allowed["freebie_allowed"] else "32"
        lines.append(f"a multiply costs the larger of its inputs' bit widths (unquantised: {unquantised}); an add "
                     "costs 32 bits (the accumulator); an integer layer also stores its scales and zero point "
                     "(32 bits each) and pays 32-bit multiplies to quantise its input and rescale its output")
    lines += [
        "",
        f"Parameters ({unit}): {num(report.params32)}"
        f"  ({num(report.total_params)} stored; BatchNorm folded into the convs"
        + (", sparse weights as non-zeros + 1-bit mask" if report.sparse else "")
        + (f", {num(report.qparams)} quantisation scales and zero points" if report.qparams else "") + ")",
    ]
    if allowed["freebie_allowed"]:
        lines.append(f"Parameters with unquantised values at 16 bits (fp16 freebie): {num(report.params16)}"
                     if compressed else f"Parameters at 16 bits (fp16 freebie): {num(report.params16)}")
    lines += [f"Multiplies: {num(report.mults)}"
              + (f" (+ {num(report.scale_mults)} 32-bit multiplies quantising inputs and rescaling outputs)"
                 if report.scale_mults else ""),
              f"Adds: {num(report.adds)}"]
    if compressed:
        lines.append(f"Operations, bit-weighted, unquantised at 32 bits: {num(full['ops'])}")
        if allowed["freebie_allowed"]:
            lines.append(f"Operations, bit-weighted, unquantised at 16 bits (fp16 freebie): {num(fb['ops'])}")
    else:
        lines += [f"Operations (mults + adds): {num(full['ops'])}",
                  f"Operations with fp16 multiplies (0.5 x mults + adds): {num(fb['ops'])}"]
    if report.sparse:
        nz = sum(v[0] for v in report.sparse.values())
        n = sum(v[1] for v in report.sparse.values())
        lines.append(f"Sparse weight tensors: {len(report.sparse)} ({num(nz)} of {num(n)} weights non-zero, "
                     f"{100 * (1 - nz / n):.1f}% zeros); their layers' ops shrink by their sparsity")
    lines += _tta_line(report)
    lines += ["", *_score_line(report, allowed)]
    if allowed["freebie_allowed"]:
        lines.append(f"Without the freebie (every value at 32 bits): {num(full['params'])}/{p} + "
                     f"{num(full['ops'])}/{o} = {full['score']:.6f}")
    return lines


def layer_table(report, live=None):
    """One row per module call; under the micronet rules with `live` ({row name: live activation
    bits or None}, torchscope.mtas) a column of the activation bits alive while the layer runs."""
    micronet = report.rules == "micronet"
    live = live if micronet else None
    # A model quantised below 16 bits has no freebie: its table shows no 16-bit column either.
    freebie = report.score()["freebie_allowed"]
    if micronet:
        head = ("Layer", "Type", "Output shape", "Bits W/A", "Sparsity", *(("Param bits fp16",) if freebie else ()),
                "Param bits fp32", "Q params", "Mults", "Scale mults", "Adds",
                *(("Live act bits",) if live is not None else ()))
    else:
        head = ("Layer", "Type", "Output shape", "Params", "FLOPs", "Madds")
    text_cols = 5 if micronet else 3
    rows = []
    for r in report.rows:
        shape = "x".join(str(d) for d in r.output_shape) or "-"
        if micronet:
            bits = "-" if r.weight_bits is None and r.act_bits is None else f"{_bits(r.weight_bits)}/{_bits(r.act_bits)}"
            rows.append((r.name, r.type, shape, bits, f"{100 * r.sparsity:.1f}%" if r.sparsity else "-",
                         *((num(32 * r.params16),) if freebie else ()), num(32 * r.params32), num(r.qparams),
                         num(r.mults), num(r.scale_mults), num(r.adds),
                         *((_live(live.get(r.name)),) if live is not None else ())))
        else:
            rows.append((r.name, r.type, shape, num(r.params), num(r.flops), num(r.madds(report.mul_factor))))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    fmt = lambda row: "  ".join(str(v).ljust(w) if i < text_cols else str(v).rjust(w)
                                for i, (v, w) in enumerate(zip(row, widths)))
    rule = "-" * len(fmt(head))
    out = [rule, fmt(head), rule, *(fmt(r) for r in rows), rule]
    if micronet:
        out.append("Bits W/A: weight/input widths ('-': float32); Param bits: the layer's parameters "
                   "(BatchNorm folded), unquantised values at " + ("16 / 32 bits" if freebie else "32 bits")
                   + "; sparse weights as non-zeros x bits "
                   "+ a 1-bit mask; Q params: 32-bit weight scales (one per output channel) and input scale + "
                   "zero point of an integer layer, included in Param bits; Scale mults: its 32-bit multiplies "
                   "quantising the input and rescaling the output"
                   + ("; Live act bits: the activations alive while the layer runs (MTAS, docs/counting.md)"
                      if live is not None else ""))
    return out


def _live(bits):
    return "-" if bits is None else num(bits)


def mtas_line(m):
    """The maximum transient activation size of a torchscope.mtas report, in one line."""
    return (f"Maximum transient activation size (MTAS): {num(m.total_bits)} bits "
            f"({m.total_bits / 8 / 1024:,.1f} KiB) per sample, at {m.peak}")
