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


def uci_scores(report, mul_factor_name="mul_factor"):
    """The score lines under the original's conventions; `mul_factor_name` is what the caller
    calls the report's mul_factor (the score uses 0.5 and 1 whatever it is)."""
    s = report.scores()
    p, o = _baselines()
    fb, full = s["freebie"], s["full"]
    return [
        f"MicroNet score (baselines {p} params, {o} ops; Madds at mul_factor 0.5 and 1, "
        f"whatever {mul_factor_name} is):",
        "Count all parameters as 16-bit and 1 multiplication operation as 1/2 operation:",
        f"(0.5 x {num(report.total_params)})/{p} + {num(fb['ops'])}/{o} = {fb['score']:.6f}",
        "Count all parameters as 32-bit and 1 multiplication operation as 1 operation:",
        f"{num(report.total_params)}/{p} + {num(full['ops'])}/{o} = {full['score']:.6f}",
    ]


def _bits(v):
    return "-" if v is None else str(v)


def micronet_block(report):
    s = report.scores()
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
        lines.append("a multiply costs the larger of its inputs' bit widths (unquantised: 16 with the freebie, "
                     f"32 without); an add costs {report.add_bits} bits (the accumulator)")
    elif report.add_bits != 32:
        lines.append(f"an add costs {report.add_bits} bits (the accumulator)")
    lines += [
        "",
        f"Parameters ({unit}): {num(report.params32)}"
        f"  ({num(report.total_params)} stored; BatchNorm folded into the convs"
        + (", sparse weights as non-zeros + 1-bit mask" if report.sparse else "") + ")",
        f"Parameters with unquantised values at 16 bits (fp16 freebie): {num(report.params16)}"
        if compressed else f"Parameters at 16 bits (fp16 freebie): {num(report.params16)}",
        f"Multiplies: {num(report.mults)}",
        f"Adds: {num(report.adds)}",
    ]
    if compressed or report.add_bits != 32:
        lines += [f"Operations, bit-weighted, unquantised at 32 bits: {num(full['ops'])}",
                  f"Operations, bit-weighted, unquantised at 16 bits (fp16 freebie): {num(fb['ops'])}"]
    else:
        lines += [f"Operations (mults + adds): {num(full['ops'])}",
                  f"Operations with fp16 multiplies (0.5 x mults + adds): {num(fb['ops'])}"]
    if report.sparse:
        nz = sum(v[0] for v in report.sparse.values())
        n = sum(v[1] for v in report.sparse.values())
        lines.append(f"Sparse weight tensors: {len(report.sparse)} ({num(nz)} of {num(n)} weights non-zero, "
                     f"{100 * (1 - nz / n):.1f}% zeros); their layers' ops shrink by their sparsity")
    lines += [
        "",
        f"MicroNet score, fp16 freebie: {num(fb['params'])}/{p} + {num(fb['ops'])}/{o} = {fb['score']:.6f}",
        f"  (parameters {fb['params_term']:.6f} + operations {fb['ops_term']:.6f})",
        f"MicroNet score, no freebie:   {num(full['params'])}/{p} + {num(full['ops'])}/{o} = {full['score']:.6f}",
        f"  (parameters {full['params_term']:.6f} + operations {full['ops_term']:.6f})",
    ]
    return lines


def layer_table(report):
    micronet = report.rules == "micronet"
    if micronet:
        head = ("Layer", "Type", "Output shape", "Bits W/A", "Sparsity", "Param bits fp16", "Param bits fp32",
                "Mults", "Adds")
    else:
        head = ("Layer", "Type", "Output shape", "Params", "FLOPs", "Madds")
    text_cols = 5 if micronet else 3
    rows = []
    for r in report.rows:
        shape = "x".join(str(d) for d in r.output_shape) or "-"
        if micronet:
            bits = "-" if r.weight_bits is None and r.act_bits is None else f"{_bits(r.weight_bits)}/{_bits(r.act_bits)}"
            rows.append((r.name, r.type, shape, bits, f"{100 * r.sparsity:.1f}%" if r.sparsity else "-",
                         num(32 * r.params16), num(32 * r.params32), num(r.mults), num(r.adds)))
        else:
            rows.append((r.name, r.type, shape, num(r.params), num(r.flops), num(r.madds(report.mul_factor))))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    fmt = lambda row: "  ".join(str(v).ljust(w) if i < text_cols else str(v).rjust(w)
                                for i, (v, w) in enumerate(zip(row, widths)))
    rule = "-" * len(fmt(head))
    out = [rule, fmt(head), rule, *(fmt(r) for r in rows), rule]
    if micronet:
        out.append("Bits W/A: weight/input widths ('-': not quantised); Param bits: the layer's parameters "
                   "(BatchNorm folded), unquantised values at 16 / 32 bits; sparse weights as non-zeros x bits "
                   "+ a 1-bit mask")
    return out
