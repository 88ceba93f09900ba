"""The score count.py names is the one the MicroNet rules allow, recomputed here without torchscope.

`recount` below is written from the rules' text (micronet-challenge.github.io, "Scoring") and the
organisers' counting library's conventions (docs/counting.md), layer by layer, with forward hooks of
its own on torch's and the models' classes:
- parameters: every value needed for inference; b-bit values count b/32; a sparse tensor its
  non-zeros plus a 1-bit mask; BatchNorm folded into the conv before it (a bias if it had none);
  an integer layer's weight scales (one per output channel) and input scale and zero point, 32 bits;
- operations: multiplies and adds apart; a multiply at the larger of its inputs' widths, an add at
  32 bits; swish 3 mults + 1 add, sigmoid 2 + 1, global pool C mults + (HW - 1) C adds, residual add
  1 add, SE gate 1 mult, L2 normalisation 2D mults + D adds; an integer layer's input quantised (one
  32-bit multiply per element) and its accumulator rescaled (one per output);
- the freebie: unquantised values at 16 bits, multiplies only, and only while nothing is below 16
  bits ("If an entry quantizes any part of their model to less than 16-bits, then no 'free'
  quantization to 16-bits is allowed").
"""
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from torch import nn

import compress
import models
from engine import checkpoint
from models.efficientnet import Add, Mul
from models.heads import CosineLinear, L2Norm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOOPS = (nn.Identity, nn.ZeroPad2d, nn.Dropout, nn.Flatten)


def recount(model, record):
    """The allowed MicroNet score of `model` (weights loaded) with its compression record (or None)."""
    layers = (record or {}).get("layers", {})
    names = {m: n for n, m in model.named_modules()}
    quantised_below_16 = any(b is not None and b < 16 for e in layers.values()
                             for b in (e.get("weight_bits"), e.get("act_bits")))
    default = 32 if quantised_below_16 else 16

    def width(bits):
        return default if bits is None or bits >= 32 else bits

    param_bits = 0.0
    op_bits = 0.0   # bit-weighted: a b-bit op adds b
    last_conv = {}

    def hook(module, inputs, output):
        nonlocal param_bits, op_bits
        x = inputs[0]
        out = output
        per = out[0].numel()   # output elements per sample
        if isinstance(module, NOOPS):
            return
        if isinstance(module, (nn.Conv2d, nn.Linear, CosineLinear)):
            entry = layers.get(names[module], {})
            w = module.kernel if isinstance(module, CosineLinear) else module.weight
            n = w.numel()
            mask = entry.get("mask")
            nz = int((w.ne(0) & mask).sum()) if mask is not None else n
            sparse = mask is not None and nz < n
            c_out = w.shape[1] if isinstance(module, CosineLinear) else w.shape[0]
            positions = per // c_out
            wb, ab = entry.get("weight_bits"), entry.get("act_bits")
            param_bits += (nz * width(wb) + n) if sparse else n * width(wb)
            mults = nz * positions
            adds = max(nz - c_out, 0) * positions
            bias = getattr(module, "bias", None)
            if bias is not None:
                param_bits += bias.numel() * default
                adds += per
            op_bits += mults * max(width(wb), width(ab)) + adds * 32
            int_w, int_a = wb is not None and wb < 16, ab is not None and ab < 16
            if int_w:
                param_bits += 32 * c_out
            if int_a:
                param_bits += 32 * 2
                op_bits += 32 * x[0].numel()
            if int_w or int_a:
                op_bits += 32 * per
            last_conv["module"], last_conv["per"] = module, per
        elif isinstance(module, nn.BatchNorm2d):
            conv = last_conv.pop("module")   # every BatchNorm here follows a conv: folded into it
            if conv.bias is None:
                param_bits += module.num_features * default
                op_bits += last_conv["per"] * 32
        elif isinstance(module, nn.SiLU):
            op_bits += per * (3 * default + 32)
        elif isinstance(module, nn.Sigmoid):
            op_bits += per * (2 * default + 32)
        elif isinstance(module, (nn.AdaptiveAvgPool2d, nn.AvgPool2d)):
            # Each output averages a window of the input (global: H*W of a channel): the window's
            # sum and one multiply by 1/window.
            window = x[0].numel() // per
            op_bits += per * default + (window - 1) * per * 32
        elif isinstance(module, Add):
            op_bits += per * 32
        elif isinstance(module, Mul):
            op_bits += per * default
        elif isinstance(module, L2Norm):
            d = x.shape[module.dim]
            vectors = x[0].numel() // d
            op_bits += vectors * (2 * d * default + d * 32)
        else:
            raise AssertionError(f"recount has no rule for {type(module).__name__}")

    leaves = [m for m in model.modules() if not list(m.children()) or isinstance(m, (nn.Conv2d, nn.Linear,
                                                                                     CosineLinear))]
    hooked = [m for m in leaves if not any(m is not p and m in p.modules() for p in leaves)]
    handles = [m.register_forward_hook(hook) for m in hooked]
    try:
        model.eval()
        with torch.no_grad():
            model(torch.randn(2, 3, 32, 32))
    finally:
        for h in handles:
            h.remove()
    return param_bits / 32 / 36.5e6 + op_bits / 32 / 10.49e9


def _checkpoint(path, prune=None, quant=None, first_last=None):
    """A model_best.pytar of full-size efficientnet_ex with its compression record: the counts depend
    on the architecture, the bits and the masks, not on training."""
    torch.manual_seed(0)
    m = models.create("efficientnet_ex")
    if quant:
        compress.quantize(m, *quant, first_last_bits=first_last)
    pruner = None
    if prune:
        pruner = compress.Pruner(m, compress.PruneSchedule(prune, 1, 1), scope="layer")
        pruner.step(1)
    with torch.no_grad():
        m.train()(torch.randn(8, 3, 32, 32))   # input ranges for the quantisers
    rec = compress.record(m, pruner)
    torch.save(checkpoint.weights_file(m, epoch=1, compression=rec), path)
    return rec


def _count(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, os.path.join("torchscope", "count.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=env)


def _loaded(path):
    m = models.create("efficientnet_ex")
    meta = checkpoint.load_weights(m, str(path))
    return m, meta.get("compression")


CASES = {
    "pruned fp32 (50%)": dict(prune=0.5),
    "W8/A8": dict(quant=(8, 8)),
    "W4/A4, 75%, first/last 8": dict(prune=0.75, quant=(4, 4), first_last=8),
}


# The fast tier runs the hardest case; the slow tier all three.
@pytest.mark.parametrize("case", [pytest.param(c, marks=() if c.startswith("W4") else pytest.mark.slow)
                                  for c in CASES])
def test_count_py_score_equals_an_independent_recount(tmp_path, case):
    path, out = tmp_path / "model_best.pytar", tmp_path / "count.json"
    _checkpoint(path, **CASES[case])
    p = _count("--rules", "micronet", "--model-state-file", str(path), "--json", str(out))
    assert p.returncode == 0, p.stderr
    data = json.loads(out.read_text())
    model, record = _loaded(path)
    expected = recount(model, record)
    assert data["score"] == pytest.approx(expected, rel=1e-12), case
    quantised = "quant" in CASES[case]
    assert data["freebie_allowed"] is (not quantised)
    assert data["score_convention"] == ("full" if quantised else "freebie")
    # The text names the same figure, once.
    found = re.findall(r"^MicroNet score: ([\d.]+)  \(the score the rules allow\)$", p.stdout, re.M)
    assert found == [f"{expected:.6f}"]


@pytest.mark.parametrize("rules", ["micronet", pytest.param("uci", marks=pytest.mark.slow)])
def test_no_quantised_model_is_shown_a_freebie_score(tmp_path, rules):
    path = tmp_path / "model_best.pytar"
    _checkpoint(path, quant=(8, 8))
    p = _count("--rules", rules, "--per-layer", "--model-state-file", str(path))
    assert p.returncode == 0, p.stderr
    text = p.stdout
    assert "no 16-bit freebie" in text
    for claim in ("16-bit freebie applied", "Count all parameters as 16-bit", "Without the freebie",
                  "fp16 freebie", "Param bits fp16"):
        assert claim not in text, claim
    # A dense model of the same architecture still gets the freebie, and says so.
    dense = _count("--rules", rules)
    assert "16-bit freebie applied" in dense.stdout and "no 16-bit freebie" not in dense.stdout


def test_float16_layers_are_simulated_and_charged_16_bits():
    """--quant 16 16 rounds weights and inputs to float16 in training and evaluation (so test.py's
    accuracy pays for it), and is charged 16 bits: exactly the dense model's freebie score."""
    import torchscope
    from engine import compression
    torch.manual_seed(0)
    m = models.create("efficientnet_ex", width_mult=0.25, depth_mult=0.2)
    dense = torchscope.count(m, rules="micronet").score()
    compress.quantize(m, 16, 16)
    assert compression.exact_numerics(m)   # evaluated in float32, not bf16
    conv = compress.quantised_layers(m)["features.0.1"]
    x = torch.randn(2, 3, 32, 32) * 3
    conv.eval()
    with torch.no_grad():
        got = conv(x)
        want = nn.functional.conv2d(x.half().float(), conv.weight.half().float(), None, conv.stride, conv.padding)
        plain = nn.functional.conv2d(x, conv.weight, None, conv.stride, conv.padding)
    assert torch.equal(got, want) and not torch.equal(got, plain)
    # Training passes the gradient straight through the rounding.
    conv.train()
    w = conv.weight
    xg = x.clone().requires_grad_()
    conv(xg).sum().backward()
    ones = torch.ones_like(got)
    ref = torch.autograd.grad(nn.functional.conv2d(xg, w.half().float(), None, conv.stride, conv.padding),
                              xg, ones)[0]
    assert torch.allclose(xg.grad, ref, rtol=1e-5, atol=1e-5) and w.grad.abs().sum() > 0
    rec = compress.record(m)
    r = torchscope.count(m, rules="micronet", compression=rec).score()
    assert r["freebie_allowed"] and r["score"] == dense["score"]


def test_first_and_last_at_16_bits_are_charged_16_not_32(tmp_path):
    import torchscope
    torch.manual_seed(0)
    m = models.create("efficientnet_ex", width_mult=0.25, depth_mult=0.2)
    compress.quantize(m, 4, 4, first_last_bits=16)
    with torch.no_grad():
        m.train()(torch.randn(4, 3, 32, 32))
    rec = compress.record(m)
    rows = {r.name: r for r in torchscope.count(m, rules="micronet", compression=rec).rows}
    first = rows["features.0.1"]
    assert (first.weight_bits, first.act_bits, first.qparams) == (16, 16, 0)
    # 16-bit weights: 16 bits per weight (none at 32), the BatchNorm's folded bias at 32 (no freebie).
    assert 32 * first.params32 == 16 * first.params + 32 * 8


def test_count_py_tta_counts_two_passes_and_the_average():
    import torchscope
    m = models.create("efficientnet_ex", width_mult=0.25, depth_mult=0.2)
    one = torchscope.count(m, rules="micronet")
    two = torchscope.count(m, rules="micronet", tta=True)
    assert two.params32 == one.params32 and two.total_params == one.total_params
    assert two.mults == 2 * one.mults + 100 and two.adds == 2 * one.adds + 100
    s1, s2 = one.score(), two.score()
    assert s2["score"] > s1["score"] and s2["params"] == s1["params"]
    assert s2["ops"] == pytest.approx(2 * s1["ops"] + (100 * 16 + 100 * 32) / 32, rel=1e-12)
    p = _count("--rules", "micronet", "--width-mult", "0.25", "--depth-mult", "0.2", "--tta", "--json", os.devnull)
    assert p.returncode == 0, p.stderr
    assert "Flip TTA counted" in p.stdout
    assert re.search(rf"^MicroNet score: {s2['score']:.6f}  ", p.stdout, re.M)


def test_count_py_refuses_an_unsimulated_accumulator_width():
    p = _count("--add-bits", "16")
    assert p.returncode == 2
    assert "16-bit adds are refused: nothing in training or evaluation simulates a 16-bit accumulator" in p.stderr
    assert "Traceback" not in p.stderr
    assert _count("--add-bits", "32").returncode == 0
