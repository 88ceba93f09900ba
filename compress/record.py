"""The compression record: what was done to a model, per layer, as plain values a checkpoint can hold
(torch.load with weights_only=True reads it) and the op counter can score.

    {"format": RECORD_FORMAT or RECORD_FORMAT_LSQ,
     "layers": {name: {"kind": "conv" | "linear" | "cosine",
                       "weight_bits": int | None,      # None: not quantised (floating point)
                       "act_bits": int | None,         # bits of the layer's input
                       "method": "minmax" | "lsq" | None,   # the quantiser (None: not quantised)
                       "mask": bool tensor | None,     # True = kept; None: stored dense
                       # only with 2..8-bit inputs, the input grid: a min/max observer's range, or
                       # LSQ's grid range (0 - z) * s .. (2^b - 1 - z) * s
                       "act_min": tensor, "act_max": tensor, "act_scale": tensor, "act_zero_point": tensor,
                       # only for LSQ with 2..8-bit weights: the learned step of each output unit
                       "weight_step": float tensor [units]},
                ...},
     "prune": Pruner.summary() | None,
     "qat": QATSchedule.summary() | None}

Every conv, linear and cosine layer has an entry, compressed or not. Names are the model's module
names without DDP/compile prefixes. A record with learned steps is format 2: a reader of format 1
would evaluate those layers with min/max weight scales, so it must refuse them; every other record
stays format 1, which older readers take.
"""
import math

import torch

from micronet_cifar100 import errors

from . import layers as L
from . import quant as Q
from .prune import check_mask

RECORD_FORMAT = "micronet-cifar100/compression/1"
RECORD_FORMAT_LSQ = "micronet-cifar100/compression/2"
RECORD_FORMATS = (RECORD_FORMAT, RECORD_FORMAT_LSQ)
_ACT_KEYS = ("act_min", "act_max", "act_scale", "act_zero_point")


def record(model, pruner=None, qat=None):
    """The record of `model` as it stands: each layer's bit widths and quantiser (from its quantised
    version, or None), its mask (from `pruner`, None for a layer left dense or not pruned at all), its
    input grid and learned steps; `qat` (a QATSchedule) says what was frozen."""
    masks = pruner.masks if pruner is not None else {}
    layers = {}
    for name, m in L.compressible(model).items():
        quantised = isinstance(m, Q.Quantised)
        mask = masks.get(name)
        entry = {"kind": L.kind_of(m),
                 "weight_bits": m.weight_bits if quantised else None,
                 "act_bits": m.act_bits if quantised else None,
                 "method": m.method if quantised else None,
                 "mask": mask.detach().cpu().clone() if mask is not None and not bool(mask.all()) else None}
        if quantised:
            entry.update(Q.input_state(m) or {})
            entry.update(Q.weight_state(m))
        layers[name] = entry
    learned = any(e["method"] == "lsq" for e in layers.values())
    return {"format": RECORD_FORMAT_LSQ if learned else RECORD_FORMAT, "layers": layers,
            "prune": pruner.summary() if pruner is not None else None,
            "qat": qat.summary() if qat is not None else None}


def _bits_ok(v):
    return v is None or (isinstance(v, int) and not isinstance(v, bool) and v in L.BITS)


def _fail(source, msg):
    raise errors.CheckpointError(f"{source}: {msg}")


def validate_record(record, model, source="the compression record"):
    """Check `record` against `model`; CheckpointError with one line naming the layer and the problem
    (not a record, unknown layer, bits out of range, a mask of the wrong shape or type, a missing or
    non-finite input range)."""
    if not isinstance(record, dict) or not isinstance(record.get("layers"), dict):
        _fail(source, "not a compression record (a dict with per-layer entries)")
    if record.get("format", RECORD_FORMAT) not in RECORD_FORMATS:
        _fail(source, f"format {record.get('format')!r} is not one of {', '.join(RECORD_FORMATS)}")
    layers = L.compressible(model)
    for name, entry in record["layers"].items():
        if name not in layers:
            _fail(source, f"layer {name} is not a conv, linear or cosine layer of this model")
        if not isinstance(entry, dict):
            _fail(source, f"layer {name}: its entry is not a dict")
        for key in ("weight_bits", "act_bits"):
            if not _bits_ok(entry.get(key)):
                what = key.replace("act", "activation").replace("_", " ")
                _fail(source, f"layer {name}: {what} {entry.get(key)!r} out of range ({L.BITS_TEXT}, or none)")
        wb, ab = entry.get("weight_bits"), entry.get("act_bits")
        if (wb is None) != (ab is None):
            _fail(source, f"layer {name}: weight bits {wb} with activation bits {ab}: give both or neither")
        method = entry.get("method")
        if method is not None and (wb is None or method not in Q.METHODS):
            _fail(source, f"layer {name}: quantiser {method!r} is not one of {', '.join(Q.METHODS)} "
                          "on a quantised layer")
        if method == "lsq" and record.get("format") != RECORD_FORMAT_LSQ:
            _fail(source, f"layer {name}: learned steps in a record of format {record.get('format')!r}, "
                          f"not {RECORD_FORMAT_LSQ}")
        mask = entry.get("mask")
        if mask is not None:
            check_mask(mask, L.weight_of(layers[name]), name, source)
        if ab in L.INT_BITS:
            _check_act_state(entry, name, ab, source)
            if method == "lsq" and int(entry["act_zero_point"]) > 2 ** (ab - 1):
                _fail(source, f"layer {name}: learned-step input zero point {int(entry['act_zero_point'])} "
                              f"above {2 ** (ab - 1)} (the signed grid)")
        if method == "lsq" and wb in L.INT_BITS:
            _check_steps(entry.get("weight_step"), layers[name], name, source)
    return record


def _check_steps(steps, module, name, source):
    units = L.units_of(module)
    if not isinstance(steps, torch.Tensor) or not steps.is_floating_point() or tuple(steps.shape) != (units,):
        _fail(source, f"layer {name}: learned weight steps must be {units} floating-point values, one per "
                      f"output unit, got {tuple(steps.shape) if isinstance(steps, torch.Tensor) else steps!r}")
    if not bool(torch.isfinite(steps).all()) or not bool((steps > 0).all()):
        _fail(source, f"layer {name}: learned weight steps must be finite and positive")


def _check_act_state(entry, name, bits, source):
    for key in _ACT_KEYS:
        v = entry.get(key)
        if not isinstance(v, torch.Tensor) or v.numel() != 1:
            _fail(source, f"layer {name}: {bits}-bit inputs but no {key.replace('_', ' ')} (one value)")
    lo, hi, scale = (float(entry[k]) for k in _ACT_KEYS[:3])
    if not all(math.isfinite(v) for v in (lo, hi, scale)) or scale <= 0 or lo > hi:
        _fail(source, f"layer {name}: input range [{lo:g}, {hi:g}] with scale {scale:g} is not a trained range")
    zp = int(entry["act_zero_point"])
    if not 0 <= zp <= 2 ** bits - 1:
        _fail(source, f"layer {name}: input zero point {zp} outside 0..{2 ** bits - 1}")


def apply_record(model, record, source="the compression record"):
    """Give `model` (weights already loaded) the record's numerics: quantised layers with their input
    grids and learned steps, and the masks' pruned weights set to zero. Validates first. Returns the
    model (changed in place); evaluate it in eval mode. (What a QATSchedule froze is not applied: it
    concerns training only, and a resumed run restores it from QATSchedule.state_dict.)"""
    validate_record(record, model, source)
    entries = record["layers"]
    quantised = {n: e for n, e in entries.items() if e.get("weight_bits") is not None}
    Q.quantize_layers(model, {n: (e["weight_bits"], e["act_bits"]) for n, e in quantised.items()},
                      {n: e.get("method") or "minmax" for n, e in quantised.items()})
    layers = L.compressible(model)
    with torch.no_grad():
        for name, e in entries.items():
            m = layers[name]
            if e.get("act_bits") in L.INT_BITS:
                Q.load_input_state(m, e)
            if e.get("method") == "lsq" and e.get("weight_bits") in L.INT_BITS:
                Q.load_weight_state(m, e)
            if e.get("mask") is not None:
                w = L.weight_of(m)
                w.mul_(e["mask"].to(device=w.device, dtype=w.dtype))
    return model


def masks_of(record):
    """{name: mask} of the record's masked layers."""
    return {n: e["mask"] for n, e in record["layers"].items() if e.get("mask") is not None}


def widths_text(pairs):
    """"W4/A8 x35, W8/A8 x3" for (weight bits, input bits) pairs, the commonest first; "not quantised"
    for none."""
    counts = {}
    for pair in pairs:
        counts[pair] = counts.get(pair, 0) + 1
    return ", ".join(f"W{w}/A{a} x{n}" for (w, a), n in sorted(counts.items(), key=lambda kv: -kv[1])) \
        or "not quantised"


def summary(record):
    """One line: what the record says was done (for logs and the count's header)."""
    entries = list(record["layers"].values())
    quant = widths_text([(e.get("weight_bits"), e.get("act_bits")) for e in entries if e.get("weight_bits")])
    learned = sum(e.get("method") == "lsq" for e in entries)
    if learned:
        quant += f" (learned steps x{learned})"
    masked = list(masks_of(record).values())
    if masked:
        pruned = sum(int((~m).sum()) for m in masked)
        total = sum(m.numel() for m in masked)
        # The pruner's layers that kept every weight carry no mask: say so, or the count reads short.
        prunable = (record.get("prune") or {}).get("layers")
        of = f" (of {prunable} pruned)" if prunable and prunable != len(masked) else ""
        prune = f"{len(masked)} masked layers{of}, {100 * pruned / total:.1f}% of their weights pruned"
    else:
        prune = "not pruned"
    return f"{quant}; {prune}"
