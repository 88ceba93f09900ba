"""torchscope: the original entry's published counts (docs/counting.md), cross-checks against PyTorch's
own counters, hand-counted tiny networks under both rule sets (one of them an architecture from outside
models/, counted through the layer-kind protocol), the import boundaries, and the count.py command line."""
import contextlib
import io
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
import torchsummary
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from micronet_cifar100 import errors
import models
import torchscope
from models.efficientnet import BlockSpec, ConvUnit, MBConv
from torchscope import command

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL = [(name, head) for name in models.names() for head in ("cosine", "linear")]
# The project's top-level packages and modules (pyproject.toml).
PROJECT = ("models", "loss", "data", "refinery", "engine", "cli", "bench", "errors", "torchscope", "compress")


# Small tensors: on a shared 2-core machine a second OpenMP thread mostly waits for the first.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ex():
    torch.manual_seed(0)
    return models.create("efficientnet_ex")


@pytest.fixture(scope="module")
def ex_uci(ex):
    return torchscope.count(ex, input_size=(3, 32, 32), mul_factor=0.5, rules="uci")


# ------------------------------------- the original entry's README (UCI/Qualcomm, 2019) figures

def test_ex_matches_original_readme(ex_uci):
    r = ex_uci
    assert r.total_params == 2_793_064
    assert r.trainable_params == 2_793_064 and r.non_trainable_params == 0
    # What the original mislabelled as non-trainable: the 200x100 cosine matrix.
    assert r.legacy_nontrainable == 20_000
    assert r.flops == 251_891_224
    assert r.madds() == r.madds(0.5) == 382_885_052
    assert r.madds(1.0) == 512_835_116
    assert r.uncounted == [] and r.notes == []


def test_ex_memory_lines(ex_uci):
    mem = ex_uci.memory()
    shown = {k: f"{v:.2f}" for k, v in mem.items()}
    assert shown == {"input_mb": "0.01", "forward_backward_mb": "42.61", "params_mb": "2.66",
                     "total_mb": "45.28", "flops_gb": "0.25", "madds_gb": "0.38"}
    # The convention behind 42.61: every leaf output per sample (pads at their padded size).
    assert ex_uci.activations == 11_170_808


def test_ex_scores(ex_uci):
    s = ex_uci.scores()
    freebie = 0.5 * 2_793_064 / 36.5e6 + 382_885_052 / 10.49e9
    full = 2_793_064 / 36.5e6 + 512_835_116 / 10.49e9
    assert s["freebie"]["score"] == pytest.approx(freebie, abs=1e-15)
    assert s["full"]["score"] == pytest.approx(full, abs=1e-15)
    assert round(s["full"]["score"], 5) == 0.12541
    # The README prints 0.074762; the same arithmetic gives 0.07476116, so that figure is its
    # last digit rounded up: within one unit of the 6th decimal, but rounding gives ...761.
    assert abs(s["freebie"]["score"] - 0.074762) < 1e-6
    assert round(s["freebie"]["score"], 6) == 0.074761
    # Both mul factors, whatever the report's own.
    assert torchscope.count(models.create("efficientnet_ex"), mul_factor=1.0).scores() == s


def test_ex_micronet_reference(ex):
    """README: 0.073980 with the fp16 freebie, 0.124149 without (docs/counting.md has the counts)."""
    r = torchscope.count(ex, rules="micronet")
    assert r.uncounted == [] and r.sparse == {}
    assert r.total_params == 2_793_064
    assert (r.params32, r.params16) == (2_774_792, 1_387_396)
    assert (r.mults, r.adds) == (255_091_768, 249_765_524)
    s = r.scores()
    assert s["freebie"]["ops"] == 377_311_408 and s["full"]["ops"] == 504_857_292
    assert round(s["freebie"]["score"], 6) == 0.073980
    assert round(s["full"]["score"], 6) == 0.124149
    # One row per residual add (9 in ex) and per SE multiply (16 blocks), which the uci rules skip.
    kinds = [row.type for row in r.rows]
    assert kinds.count("Add") == 9 and kinds.count("Mul") == 16


def test_rules_seed_is_an_alias_of_uci(ex, ex_uci):
    r = torchscope.count(ex, rules="seed")
    assert r.rules == "uci"
    assert r.to_dict() == ex_uci.to_dict()


# --------------------------------------------------------------- cross-checks, every model

def _flop_counter_macs(model):
    mode = FlopCounterMode(display=False)
    with mode, torch.no_grad():
        model(torch.randn(torchscope.BATCH, 3, 32, 32))
    by_op = {str(k): v for k, v in mode.get_flop_counts()["Global"].items()}
    return mode.get_total_flops(), by_op


def _torchsummary_total(model):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        torchsummary.summary(model, (3, 32, 32), device="cpu")
    return int(re.search(r"Total params: ([\d,]+)", out.getvalue()).group(1).replace(",", ""))


@pytest.mark.parametrize("name,head", ALL)
def test_every_model_against_torch_counters(name, head):
    cos = head == "cosine"
    model = models.create(name, head=head).eval()
    r = torchscope.count(model)
    assert r.uncounted == []

    # FlopCounterMode counts conv, addmm (nn.Linear) and mm (the cosine matmul) as 2 * MACs
    # for the whole batch and nothing else in these models.
    total, by_op = _flop_counter_macs(model)
    assert set(by_op) == {"aten.convolution", "aten.addmm"} | ({"aten.mm"} if cos else set())
    assert total % (2 * torchscope.BATCH) == 0
    assert r.macs == total // (2 * torchscope.BATCH)
    per_type = {}
    for row in r.rows:
        per_type[row.type] = per_type.get(row.type, 0) + row.macs
    assert per_type["Conv2d"] == by_op["aten.convolution"] // (2 * torchscope.BATCH)
    assert per_type["Linear"] == by_op["aten.addmm"] // (2 * torchscope.BATCH)
    assert per_type.get("CosineLinear", 0) == by_op.get("aten.mm", 0) // (2 * torchscope.BATCH)
    assert sum(per_type.values()) == r.macs  # no other row carries MACs
    # The uci rules' mults for conv/linear/cosine rows are exactly those MACs.
    assert sum(row.mults for row in r.rows if row.macs) == r.macs

    # Parameters: PyTorch's own sum, and torchsummary, which only sees `.weight`/`.bias`
    # (it misses the cosine matrix, as the original's count did).
    assert r.total_params == sum(p.numel() for p in model.parameters())
    assert _torchsummary_total(model) + r.legacy_nontrainable == r.total_params
    assert r.legacy_nontrainable == (200 * 100 if cos else 0)
    assert sum(row.params for row in r.rows) == r.total_params

    # Micronet rules count the same conv/linear MACs as multiplies (dense weights).
    m = torchscope.count(model, rules="micronet")
    assert m.macs == r.macs and m.uncounted == []
    assert math.isfinite(m.scores()["full"]["score"])


# ----------------------------------------------------------- hand-counted tiny network

class Tiny(nn.Module):
    """stem ConvUnit(3->8, 3x3) -> MBConv(t=1, 8->8, 3x3, SE 8->2->8, residual) -> 4x4 avg pool -> Linear(8->5)."""

    def __init__(self):
        super().__init__()
        self.stem = ConvUnit(3, 8, 3, 1)
        self.block = MBConv(BlockSpec(expand=1, c_in=8, c_out=8, stride=1, kernel=3))
        self.pool = nn.AvgPool2d(4)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.pool(self.block(self.stem(x))).flatten(1))


TINY_INPUT = (3, 4, 4)  # 16 output positions everywhere before the pool


def test_tiny_uci_by_hand():
    r = torchscope.count(Tiny(), input_size=TINY_INPUT, rules="uci")
    assert r.uncounted == []
    # The residual add and the SE multiply are not counted, nor given a row.
    assert [row.type for row in r.rows if row.type in ("Add", "Mul")] == []
    HW = 16
    # FLOPs: conv K*C_out*HW (+ C_out*HW bias), BN 2*C*HW, pool = input numel, linear in*out.
    flops = (27 * 8 * HW            # stem conv, K = 3*3*3
             + 2 * 8 * HW           # stem BN
             + 9 * 8 * HW           # depthwise conv, K = 3*3*1
             + 2 * 8 * HW           # its BN
             + (8 * 2 + 2)          # SE reduce 1x1 conv 8->2 with bias
             + (2 * 8 + 8)          # SE expand 1x1 conv 2->8 with bias
             + (8 * 8 * HW + 8 * HW)  # projection 1x1 conv with bias
             + 2 * 8 * HW           # its BN
             + 8 * HW               # avg pool: input numel
             + 8 * 5)               # linear
    assert flops == 6738
    mults = (27 * 8 * HW + 2 * 8 * HW + 3 * 8 * HW      # stem conv, BN, swish
             + 9 * 8 * HW + 2 * 8 * HW + 3 * 8 * HW     # depthwise conv, BN, swish
             + 8 * 2 + 3 * 2 + 2 * 8 + 2 * 8            # SE: conv, swish, conv, sigmoid
             + 8 * 8 * HW + 2 * 8 * HW                  # projection conv, BN
             + 8 * 5)                                   # linear
    adds = ((27 - 1) * 8 * HW + 2 * 8 * HW + 8 * HW     # stem conv, BN, swish
            + (9 - 1) * 8 * HW + 2 * 8 * HW + 8 * HW    # depthwise conv, BN, swish
            + 8 * HW                                    # SE adaptive pool: input numel
            + (8 - 1 + 1) * 2 + 2 + (2 - 1 + 1) * 8 + 8  # SE conv (bias), swish, conv (bias), sigmoid
            + (8 - 1 + 1) * 8 * HW + 2 * 8 * HW         # projection conv with bias, BN
            + 4 * 4 * 8                                 # 4x4 avg pool: kh*kw*output numel
            + (8 - 1) * 5)                              # linear, bias ignored
    assert (mults, adds) == (7262, 6733)
    assert (r.flops, r.mults, r.adds) == (flops, mults, adds)
    assert r.madds(0.5) == 0.5 * mults + adds == 10364
    assert r.madds(1.0) == mults + adds == 13995
    params = 27 * 8 + 16 + 9 * 8 + 16 + (8 * 2 + 2) + (2 * 8 + 8) + (8 * 8 + 8) + 16 + (8 * 5 + 5)
    assert r.total_params == params == 495
    # Memory: pads count at their padded size (3x6x6 before the stem, 8x6x6 before the depthwise).
    acts = (3 * 6 * 6 + 3 * 8 * HW) + (8 * 6 * 6 + 3 * 8 * HW) + (8 + 2 + 2 + 8 + 8) + 8 * HW * 2 + 8 + 5
    assert r.activations == acts


def test_tiny_micronet_by_hand():
    r = torchscope.count(Tiny(), input_size=TINY_INPUT, rules="micronet")
    assert r.uncounted == []
    HW = 16
    mults = (27 * 8 * HW + 3 * 8 * HW          # stem conv (BN folded), swish
             + 9 * 8 * HW + 3 * 8 * HW         # depthwise conv (BN folded), swish
             + 8                               # SE global pool: C mults
             + 8 * 2 + 3 * 2 + 2 * 8 + 2 * 8   # SE conv, swish, conv, sigmoid
             + 8 * HW                          # SE multiply
             + 8 * 8 * HW                      # projection conv (BN folded into its bias)
             + 8                               # head global pool
             + 8 * 5)                          # linear
    adds = ((27 - 1) * 8 * HW + 8 * HW + 8 * HW    # stem conv, its folded-BN bias add, swish
            + (9 - 1) * 8 * HW + 8 * HW + 8 * HW   # depthwise conv, bias add, swish
            + (HW - 1) * 8                         # SE global pool
            + (8 - 1) * 2 + 2 + 2 + (2 - 1) * 8 + 8 + 8  # SE conv+bias, swish, conv+bias, sigmoid
            + (8 - 1) * 8 * HW + 8 * HW            # projection conv + its own bias (BN adds none)
            + 8 * HW                               # residual add
            + (HW - 1) * 8                         # head global pool
            + (8 - 1) * 5 + 5)                     # linear + bias
    assert (mults, adds) == (6638, 6338)
    assert (r.mults, r.adds) == (mults, adds)
    assert r.flops == 0
    # BN folded: its 2*C parameters become a C bias on a conv without one, vanish otherwise.
    params = (27 * 8 + 8) + (9 * 8 + 8) + (8 * 2 + 2) + (2 * 8 + 8) + (8 * 8 + 8) + (8 * 5 + 5)
    assert r.params32 == params == 463
    assert r.params16 == params / 2
    assert r.total_params == 495  # what is stored does not change
    s = r.scores()
    assert s["full"]["score"] == pytest.approx(params / 36.5e6 + (mults + adds) / 10.49e9, abs=1e-15)
    assert s["freebie"]["score"] == pytest.approx(params / 2 / 36.5e6 + (mults / 2 + adds) / 10.49e9,
                                                  abs=1e-15)
    extra = [(row.name, row.type, row.mults, row.adds) for row in r.rows if row.type in ("Add", "Mul")]
    assert extra == [("block.conv.1.mul", "Mul", 8 * HW, 0), ("block.add", "Add", 0, 8 * HW)]


def test_tiny_micronet_sparse_by_hand():
    model = Tiny()
    with torch.no_grad():
        model.fc.weight[:2].zero_()      # two of five output rows pruned: 24 of 40 weights left
        model.fc.weight[2, :3].zero_()   # and three weights of a third row: 21 left
    dense = torchscope.count(Tiny(), input_size=TINY_INPUT, rules="micronet")
    r = torchscope.count(model, input_size=TINY_INPUT, rules="micronet")
    # 19 of 40 zeros, more than 1/16: stored sparse, so its ops shrink. The organisers' library:
    # a dot product of length in * (1 - sparsity) per output, i.e. nz mults and nz - out adds in all.
    assert r.mults == dense.mults - 40 + 21
    assert r.adds == dense.adds - (7 * 5 + 5) + ((21 - 5) + 5)
    # Weights: non-zeros + 1-bit mask over the tensor (40 / 32).
    assert r.params32 == dense.params32 - 40 + (21 + 40 / 32)
    assert r.params16 == dense.params16 - 20 + (21 / 2 + 40 / 32)
    assert r.sparse == {"fc.weight": (21, 40)}
    assert [row.sparsity for row in r.rows if row.name == "fc"] == [19 / 40]
    # A single zero does not pay for a mask: the tensor stays dense, and a dense-stored tensor gets
    # no op credit for its zeros (the organisers' library gives none).
    with torch.no_grad():
        model.fc.weight.fill_(1.0)
        model.fc.weight[0, 0] = 0
    one = torchscope.count(model, input_size=TINY_INPUT, rules="micronet")
    assert one.params32 == dense.params32 and one.sparse == {}
    assert (one.mults, one.adds) == (dense.mults, dense.adds)
    # Two zeros of 40 (1/20) are still dense; three (3/40 > 1/16) pay for the mask.
    with torch.no_grad():
        model.fc.weight[0, 1] = 0
    assert torchscope.count(model, input_size=TINY_INPUT, rules="micronet").sparse == {}
    with torch.no_grad():
        model.fc.weight[0, 2] = 0
    three = torchscope.count(model, input_size=TINY_INPUT, rules="micronet")
    assert three.sparse == {"fc.weight": (37, 40)} and three.mults == dense.mults - 3


# ------------------------------------------- compressed models: bits and sparsity, by the library

def _sparse_size(n, bits, sparsity):
    """The organisers' get_sparse_size (micronet_challenge/counting.py): bits to store n values."""
    size = n * bits * (1 - sparsity)
    if sparsity > 0:
        size += n  # the 1-bit mask
    return size


def _library_conv(out_size, k, c_in, c_out, sparsity, bits, use_bias, depthwise=False):
    """The organisers' count_ops for Conv2D / DepthWiseConv2D (activation counted apart): (weight
    bits, bias values, mults, adds)."""
    n = k * k * c_in * (1 if depthwise else c_out)
    vector = k * k * (1 if depthwise else c_in) * (1 - sparsity)
    n_out = out_size * out_size * c_out
    mults, adds = vector * n_out, (vector - 1) * n_out
    if use_bias:
        adds += n_out
    return _sparse_size(n, bits, sparsity), c_out if use_bias else 0, mults, adds


def _library_fc(c_in, c_out, sparsity, bits):
    n_elements = c_in * (1 - sparsity)
    return _sparse_size(c_in * c_out, bits, sparsity), c_out, n_elements * c_out, (n_elements - 1) * c_out + c_out


def _mask(shape, pruned, seed):
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    keep = torch.ones(n, dtype=torch.bool)
    keep[torch.randperm(n, generator=g)[:pruned]] = False
    return keep.reshape(shape)


def _compressed_tiny():
    """Tiny with a hand-made compression record: every weight layer its own widths, four of them sparse."""
    torch.manual_seed(0)
    model = Tiny()
    plan = {  # name: (weight bits, input bits, pruned weights)
        "stem.1": (8, 8, 108),              # 216 weights, 50% sparse
        "block.conv.0.1": (4, 8, 36),       # depthwise, 72 weights, 50%
        "block.conv.1.se.1": (4, 4, 0),     # SE reduce, dense
        "block.conv.1.se.3": (2, 4, 0),     # SE expand, dense
        "block.conv.2": (4, 6, 48),         # projection, 64 weights, 75%
        "fc": (8, 16, 30),                  # 40 weights, 75%; 16-bit inputs
    }
    modules = dict(model.named_modules())
    layers = {}
    with torch.no_grad():
        for i, (name, (wb, ab, pruned)) in enumerate(plan.items()):
            w = modules[name].weight
            w.copy_(torch.randn(w.shape).abs() + 0.1)   # no stray zeros
            mask = _mask(tuple(w.shape), pruned, i) if pruned else None
            if mask is not None:
                w.mul_(mask)
            layers[name] = {"weight_bits": wb, "act_bits": ab, "mask": mask}
    return model, {"layers": layers}


def test_tiny_compressed_equals_the_organisers_formulas():
    """conv, depthwise conv, SE, projection, residual add, pool and linear at given bits and sparsity:
    parameter bits, mults and adds per layer as the organisers' count_ops gives them (their
    activations apart), each multiply at the larger of its inputs' widths, adds at 32 bits."""
    model, rec = _compressed_tiny()
    r = torchscope.count(model, input_size=TINY_INPUT, rules="micronet", compression=rec)
    assert r.uncounted == [] and r.compressed
    rows = {row.name: row for row in r.rows}
    # (weight bits, bias values, mults, adds) per weight layer; 4x4 maps, 'same' padding.
    lib = {
        "stem.1": _library_conv(4, 3, 3, 8, 0.5, 8, use_bias=True),             # BN folded: a bias
        "block.conv.0.1": _library_conv(4, 3, 8, 8, 0.5, 4, use_bias=True, depthwise=True),
        "block.conv.1.se.1": _library_conv(1, 1, 8, 2, 0.0, 4, use_bias=True),
        "block.conv.1.se.3": _library_conv(1, 1, 2, 8, 0.0, 2, use_bias=True),
        "block.conv.2": _library_conv(4, 1, 8, 8, 0.75, 4, use_bias=True),       # own bias; BN adds none
        "fc": _library_fc(8, 5, 0.75, 8),
    }
    # Beyond the library (which has no quantisation parameters): each integer layer's 32-bit weight
    # scales (one per output channel) and its input's scale and zero point (not fc's: 16-bit inputs).
    qparams = {"stem.1": 8 + 2, "block.conv.0.1": 8 + 2, "block.conv.1.se.1": 2 + 2, "block.conv.1.se.3": 8 + 2,
               "block.conv.2": 8 + 2, "fc": 5}
    # ...and its 32-bit multiplies: one per input element (quantising it), one per output (rescaling).
    in_out = {"stem.1": (3 * 16, 8 * 16), "block.conv.0.1": (8 * 16, 8 * 16), "block.conv.1.se.1": (8, 2),
              "block.conv.1.se.3": (2, 8), "block.conv.2": (8 * 16, 8 * 16), "fc": (0, 5)}
    for name, (wbits, bias, mults, adds) in lib.items():
        row = rows[name]
        assert (row.mults, row.adds) == (mults, adds), name
        assert row.qparams == qparams[name] and row.scale_mults == sum(in_out[name]), name
        # Biases are not quantised: they cost the default width, 16 or 32 bits; scales 32 bits.
        assert 32 * row.params16 == wbits + 16 * bias + 32 * qparams[name], name
        assert 32 * row.params32 == wbits + 32 * bias + 32 * qparams[name], name
    assert [rows[n].sparsity for n in lib] == [0.5, 0.5, 0.0, 0.0, 0.75, 0.75]
    # By hand, two of them: stem 216 weights, half kept, 8 bits + a 216-bit mask; 13.5 mults per output.
    assert lib["stem.1"] == (108 * 8 + 216, 8, 13.5 * 128, 12.5 * 128 + 128)
    assert lib["fc"] == (10 * 8 + 40, 5, 10, 10)
    # The unweighted ops: swish (3 + 1), sigmoid (2 + 1), pools (C, (HW - 1) C), SE multiply, add.
    HW = 16
    elementwise = {
        "stem.3": (3 * 8 * HW, 8 * HW), "block.conv.0.3": (3 * 8 * HW, 8 * HW),
        "block.conv.1.se.0": (8, (HW - 1) * 8), "block.conv.1.se.2": (6, 2), "block.conv.1.se.4": (16, 8),
        "block.conv.1.mul": (8 * HW, 0), "block.add": (0, 8 * HW), "pool": (8, (HW - 1) * 8),
    }
    for name, (mults, adds) in elementwise.items():
        assert (rows[name].mults, rows[name].adds) == (mults, adds), name
        assert rows[name].weight_bits is None and rows[name].act_bits is None
    assert r.mults == sum(v[2] for v in lib.values()) + sum(v[0] for v in elementwise.values())
    assert r.adds == sum(v[3] for v in lib.values()) + sum(v[1] for v in elementwise.values())

    # The score: a multiply costs max(weight bits, input bits) / 32; unquantised data 16 bits with
    # the freebie, 32 without; an add its accumulator's 32 bits.
    widths = {"stem.1": 8, "block.conv.0.1": 8, "block.conv.1.se.1": 4, "block.conv.1.se.3": 4,
              "block.conv.2": 6, "fc": 16}
    quantised_mult_bits = sum(lib[n][2] * widths[n] for n in lib)
    assert quantised_mult_bits == 1728 * 8 + 576 * 8 + 16 * 4 + 16 * 4 + 256 * 6 + 10 * 16
    float_mults = sum(v[0] for v in elementwise.values())
    weight_bits = sum(v[0] for v in lib.values())
    biases = sum(v[1] for v in lib.values())
    scale_mults = sum(map(sum, in_out.values()))
    s = r.scores()
    for key, default in (("freebie", 16), ("full", 32)):
        params = (weight_bits + default * biases) / 32 + sum(qparams.values())
        ops = (quantised_mult_bits + default * (float_mults + scale_mults)) / 32 + r.adds
        assert s[key]["params"] == params and s[key]["ops"] == ops
        assert s[key]["score"] == pytest.approx(params / 36.5e6 + ops / 10.49e9, rel=1e-12)
        assert s[key]["params_term"] + s[key]["ops_term"] == pytest.approx(s[key]["score"], rel=1e-12)
    assert s["freebie"]["params"] == (1640 + 39 * 16) / 32 + 49
    # Every weight layer is below 16 bits: the rules allow no freebie, the score is the full figure.
    allowed = r.score()
    assert not allowed["freebie_allowed"] and allowed["convention"] == "full"
    assert allowed["score"] == s["full"]["score"] and r.low_bit_layers == sorted(lib)


def test_only_layers_stored_sparse_get_op_credit():
    """With a record, a layer is sparse only when the record gives it a mask (and pays for it): the
    same zeros in a layer the record keeps dense cost every multiply."""
    model, rec = _compressed_tiny()
    dense_rec = {"layers": {n: dict(e, mask=None) for n, e in rec["layers"].items()}}
    r = torchscope.count(model, input_size=TINY_INPUT, rules="micronet", compression=dense_rec)
    assert r.sparse == {}
    dense_model = Tiny()
    plain = torchscope.count(dense_model, input_size=TINY_INPUT, rules="micronet")
    assert (r.mults, r.adds) == (plain.mults, plain.adds)
    rows = {row.name: row for row in r.rows}
    assert 32 * rows["fc"].params32 == 40 * 8 + 5 * 32 + 5 * 32   # dense at 8 bits, no mask; 5 scales
    # The same weights without any record: the zeros are many, so the tensors count as sparse.
    inferred = torchscope.count(model, input_size=TINY_INPUT, rules="micronet")
    assert set(inferred.sparse) == {"stem.1.weight", "block.conv.0.1.weight", "block.conv.2.weight", "fc.weight"}


def test_uci_rules_ignore_the_compression_record():
    model, rec = _compressed_tiny()
    plain = torchscope.count(model, input_size=TINY_INPUT, rules="uci")
    r = torchscope.count(model, input_size=TINY_INPUT, rules="uci", compression=rec)
    assert (r.flops, r.mults, r.adds, r.total_params) == (plain.flops, plain.mults, plain.adds, plain.total_params)
    assert r.scores() == plain.scores()
    assert any("ignore the compression record" in n for n in r.notes)


def test_compression_record_that_does_not_fit_is_refused():
    model, rec = _compressed_tiny()
    bad = {"layers": {**rec["layers"], "fc": {"weight_bits": 8, "act_bits": 8, "mask": torch.ones(3, 3, dtype=torch.bool)}}}
    with pytest.raises(ValueError, match="mask of fc"):
        torchscope.count(model, input_size=TINY_INPUT, rules="micronet", compression=bad)
    with pytest.raises(ValueError, match="stem.2"):
        torchscope.count(model, input_size=TINY_INPUT, rules="micronet", compression={"layers": {"stem.2": {}}})


def test_a_layer_with_a_kind_is_counted_whole():
    """A module with a layer kind is one row even with children (a quantised conv holds its input
    quantiser): the children get no row of their own."""
    import compress
    model = Tiny()
    plain = torchscope.count(model, input_size=TINY_INPUT, rules="micronet")
    compress.quantize(model, 8, 8)
    q = torchscope.count(model, input_size=TINY_INPUT, rules="micronet")
    assert [row.name for row in q.rows] == [row.name for row in plain.rows]
    assert not any("input_quant" in row.name for row in q.rows) and q.uncounted == []
    assert (q.mults, q.adds, q.params32) == (plain.mults, plain.adds, plain.params32)


def test_count_restores_state_and_rejects_bad_arguments():
    model = Tiny().train()
    rng = torch.get_rng_state()
    bn = model.stem[2]
    before = bn.running_mean.clone()
    torchscope.count(model, input_size=TINY_INPUT)
    assert model.training and torch.equal(bn.running_mean, before)
    assert torch.equal(torch.get_rng_state(), rng)
    with pytest.raises(ValueError):
        torchscope.count(model, input_size=TINY_INPUT, mul_factor=0)
    with pytest.raises(ValueError):
        torchscope.count(model, input_size=TINY_INPUT, rules="nope")


def test_unknown_leaf_is_reported_not_silently_skipped():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU())
    r = torchscope.count(model, input_size=(3, 2, 2))
    assert r.uncounted == [("1", "ReLU")]
    assert any("ReLU" in n and "NOT counted" in n for n in r.notes)


# --------------------------------------- a new architecture, from outside models/, by layer kind

class Residual(nn.Module):
    """The protocol: an elementwise add declared as such."""
    layer_kind = "add"

    def forward(self, a, b):
        return a + b


class Gate(nn.Module):
    layer_kind = "mul"

    def forward(self, a, b):
        return a * b


class UnitNorm(nn.Module):
    layer_kind = "l2norm"

    def __init__(self):
        super().__init__()
        self.dim = 1

    def forward(self, x):
        return x / x.norm(dim=self.dim, keepdim=True)


class Cosine(nn.Module):
    layer_kind = "cosine"

    def __init__(self, n_in, n_out):
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(n_in, n_out))

    def forward(self, x):
        return x @ (self.kernel / self.kernel.norm(dim=0, keepdim=True))


class NewNet(nn.Module):
    """conv 3->4 (3x3, pad 1, no bias) -> BN -> SiLU = h; 1x1 conv 4->4 (bias) = z; gate
    z * sigmoid(pool(z)); h + z; 4x4 avg pool; flatten; Linear 4->6; unit norm; cosine 6->3."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.SiLU()
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.squeeze = nn.AdaptiveAvgPool2d(1)
        self.sigmoid = nn.Sigmoid()
        self.gate = Gate()
        self.residual = Residual()
        self.pool = nn.AvgPool2d(4)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(4, 6)
        self.norm = UnitNorm()
        self.cos = Cosine(6, 3)

    def forward(self, x):
        h = self.act(self.bn(self.conv1(x)))
        z = self.conv2(h)
        z = self.gate(z, self.sigmoid(self.squeeze(z)))
        y = self.residual(h, z)
        return self.cos(self.norm(self.fc(self.flatten(self.pool(y)))))


def test_new_architecture_uci_by_hand():
    torch.manual_seed(0)
    r = torchscope.count(NewNet(), input_size=(3, 4, 4), rules="uci")
    assert r.uncounted == [] and r.notes == []
    # Per sample, 4x4 maps of 4 channels: 64 elements. conv1 K = 27 -> 1,728 MACs.
    assert r.flops == 1728 + 128 + 320 + 64 + 24 == 2264  # conv1, BN, conv2 + bias, avg pool, fc
    # conv1 1728, BN 128, SiLU 192, conv2 256, sigmoid 8, fc 24, norm 6*6, cosine 18
    assert r.mults == 2390
    # conv1 26*64, BN 128, SiLU 64, conv2 (3+1)*64, squeeze 64, sigmoid 4, pool 16*4, fc 3*6, norm 36,
    # cosine 5*3; the gate multiply and the residual add are not counted
    assert r.adds == 2313
    assert r.madds(0.5) == 3508
    assert r.total_params == 108 + 8 + 20 + 30 + 18 == 184
    assert r.legacy_nontrainable == 18  # the cosine kernel
    # conv1, bn, act, conv2 outputs (64 each), squeeze, sigmoid, pool, flatten (4 each), fc, norm, cos
    assert r.activations == 287
    assert [row.name for row in r.rows] == ["conv1", "bn", "act", "conv2", "squeeze", "sigmoid", "pool",
                                            "flatten", "fc", "norm", "cos"]


def test_new_architecture_micronet_by_hand():
    torch.manual_seed(0)
    r = torchscope.count(NewNet(), input_size=(3, 4, 4), rules="micronet")
    assert r.uncounted == [] and r.sparse == {}
    by_name = {row.name: (row.mults, row.adds) for row in r.rows}
    assert by_name == {
        "conv1": (1728, 1664 + 64),   # + the bias add BN folds into it
        "bn": (0, 0),                 # folded
        "act": (192, 64),
        "conv2": (256, 192 + 64),
        "squeeze": (4, 60),           # C mults, (HW - 1) * C adds
        "sigmoid": (8, 4),
        "gate": (64, 0),
        "residual": (0, 64),
        "pool": (4, 60),
        "flatten": (0, 0),
        "fc": (24, 18 + 6),
        "norm": (12, 6),              # 2D mults, D adds
        "cos": (18, 15),
    }
    assert (r.mults, r.adds) == (2310, 2281)
    # BN's 8 parameters become a 4-vector bias on conv1.
    assert r.params32 == 108 + 4 + 20 + 30 + 18 == 180


def test_layer_kinds():
    assert torchscope.layer_kind(nn.Conv2d(1, 1, 1)) == "conv"
    assert torchscope.layer_kind(models.efficientnet.Swish()) == "silu"   # a subclass of nn.SiLU
    assert torchscope.layer_kind(Gate()) == "mul"
    assert torchscope.layer_kind(nn.ReLU()) is None


# ------------------------------------------------------------------------ import boundaries

def _imported_after(statement):
    code = (f"import sys; {statement}; "
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {PROJECT!r}))")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return eval(p.stdout)


def test_counting_core_imports_nothing_from_the_project():
    loaded = _imported_after("import torchscope, torchscope.counter, torchscope.rules, torchscope.score, "
                             "torchscope.text")
    assert loaded and all(m.split(".")[0] == "torchscope" for m in loaded), loaded
    assert "torchscope.command" not in loaded


def test_models_import_nothing_from_torchscope():
    loaded = _imported_after("import models")
    assert "models" in loaded and not [m for m in loaded if m.startswith("torchscope")]


# ------------------------------------------------------------------------------ the CLI

def _run(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, os.path.join("torchscope", "count.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env=env)


def test_cli_uci_mf_half_with_json(tmp_path):
    out = tmp_path / "sub" / "ex.json"
    p = _run("--model", "efficientnet_ex", "--mul-factor", "0.5", "--per-layer", "--json", str(out))
    assert p.returncode == 0, p.stderr
    text = p.stdout
    for line in ["Counting multiplication operations as 1/2 operation", "Total params: 2,793,064",
                 "Trainable params: 2,793,064", "Non-trainable params: 0", "Total FLOPs: 251,891,224",
                 "Total Madds: 382,885,052", "Input size (MB): 0.01",
                 "Forward/backward pass size (MB): 42.61", "Params size (MB): 2.66",
                 "Estimated Total Size (MB): 45.28", "FLOPs size (GB): 0.25", "Madds size (GB): 0.38",
                 "(0.5 x 2,793,064)/36.5M + 382,885,052/10.49B = 0.074761",
                 "2,793,064/36.5M + 512,835,116/10.49B = 0.125410",
                 "(the original entry's README (UCI/Qualcomm, 2019): 0.074762 and 0.12541; the exact first "
                 "is 0.07476116, which the README rounded up)"]:
        assert line in text.splitlines(), line
    assert re.search(r"^classifier\.2\s+CosineLinear\s+100\s+20,000\s+0\s+29,900$", text, re.M)
    data = json.loads(out.read_text())
    assert data["total_params"] == 2_793_064 and data["flops"] == 251_891_224
    assert data["madds_mf_0.5"] == 382_885_052 and data["madds_mf_1"] == 512_835_116
    assert round(data["scores"]["full"]["score"], 5) == 0.12541
    assert f"{data['memory']['forward_backward_mb']:.2f}" == "42.61"
    assert data["model"]["model"] == "efficientnet_ex"
    assert data["rules"] == "uci"
    # One row per leaf call the original counted: no residual add or SE multiply rows.
    assert len(data["layers"]) == 248


def test_cli_uci_mf_one():
    p = _run("--model", "efficientnet_ex", "--mul-factor", "1")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert "Counting multiplication as 1 operation" in lines
    assert "Total Madds: 512,835,116" in lines and "Madds size (GB): 0.51" in lines
    assert "Total FLOPs: 251,891,224" in lines


def allowed_score(text):
    """The one score count.py names (its "MicroNet score:" line)."""
    found = re.findall(r"^MicroNet score: ([\d.]+)  \(the score the rules allow\)$", text, re.M)
    assert len(found) == 1, text
    return float(found[0])


def score_without_freebie(text):
    return float(re.search(r"^Without the freebie \(every value at 32 bits\): .* = ([\d.]+)$", text, re.M).group(1))


def test_cli_micronet_dense_and_sparse(tmp_path):
    model = models.create("efficientnet_ex")
    dense = torchscope.count(model, rules="micronet")
    state = model.state_dict()
    with torch.no_grad():
        for k, v in state.items():
            if k.endswith("weight") and v.dim() == 4 and v.shape[2:] == (1, 1):
                v.view(-1)[::2] = 0   # half of every 1x1 conv's weights
    path = tmp_path / "model_state_sparse.pytar"
    torch.save(state, path)
    p = _run("--rules", "micronet", "--model-state-file", str(path))
    assert p.returncode == 0, p.stderr
    # A pruned float model keeps the freebie: its score is the freebie figure, the other is printed beside.
    sparse_scores = {"fp16 freebie": allowed_score(p.stdout), "no freebie": score_without_freebie(p.stdout)}
    assert "16-bit freebie applied" in p.stdout
    dense_scores = dense.scores()
    assert 0 < sparse_scores["no freebie"] < dense_scores["full"]["score"] < 0.2
    assert 0 < sparse_scores["fp16 freebie"] < dense_scores["freebie"]["score"]
    ops = int(re.search(r"^Operations \(mults \+ adds\): ([\d,]+)$", p.stdout, re.M).group(1).replace(",", ""))
    params = float(re.search(r"^Parameters \(32-bit\): ([\d,.]+)", p.stdout, re.M).group(1).replace(",", ""))
    assert ops < dense.mults + dense.adds and params < dense.params32
    assert "Sparse weight tensors:" in p.stdout


def test_cli_micronet_prints_readme_scores():
    p = _run("--rules", "micronet")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert "MicroNet score: 0.073980  (the score the rules allow)" in lines
    assert "  = 1,387,396/36.5M + 377,311,408/10.49B  (parameters 0.038011 + operations 0.035969)" in lines
    assert "Without the freebie (every value at 32 bits): 2,774,792/36.5M + 504,857,292/10.49B = 0.124149" in lines


def test_cli_rules_seed_equals_uci(capsys):
    assert command.main(["--rules", "seed", "--per-layer", "--model", "efficientnet_exx"]) == 0
    seed = capsys.readouterr().out
    assert command.main(["--rules", "uci", "--per-layer", "--model", "efficientnet_exx"]) == 0
    assert capsys.readouterr().out == seed
    assert "rules: uci;" in seed


def test_cli_bad_flag_subprocess_one_line():
    p = _run("--model", "efficientnet_zz")
    assert p.returncode == 2 and p.stdout == ""
    errors = [l for l in p.stderr.splitlines() if "error" in l]
    assert len(errors) == 1 and "efficientnet_ex" in errors[0] and "Traceback" not in p.stderr


@pytest.mark.parametrize("argv,needle", [
    (["--mul-factor", "0"], "--mul-factor"),
    (["--mul-factor", "1.5"], "--mul-factor"),
    (["--mul-factor", "half"], "--mul-factor"),
    (["--coslinear", "maybe"], "--coslinear"),
    (["--model", "resnet"], "unknown model"),
    (["--input-size", "3", "30", "30"], "multiples of 4"),
    (["--input-size", "3", "32"], "--input-size"),
    (["--rules", "tf"], "--rules"),
    (["--width-mult", "0"], "--width-mult"),
])
def test_cli_bad_flags_exit_2(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        command.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    errors = [l for l in err.splitlines() if "error:" in l]
    assert len(errors) == 1 and needle in errors[0]


@pytest.mark.parametrize("argv,needle", [
    (["--model-state-file", "/nonexistent/model.pytar"], "does not exist"),
    (["--json", "/proc/no/such/dir/x.json", "--model", "efficientnet_exx"], "could not write"),
])
def test_cli_runtime_failures_exit_1(argv, needle, capsys):
    """A missing checkpoint or an unwritable --json is a failure at run time (exit 1), not a usage error."""
    with pytest.raises(SystemExit) as e:
        command.script(argv)
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0]


def test_cli_unknown_model_from_create_is_a_user_error():
    args = command.parse_args([])
    args.model = "efficientnet_zz"   # past argparse, models.create's error must be a typed one
    with pytest.raises(errors.ConfigError, match="known models"):
        command.build_model(args)


def test_cli_coslinear_parses_real_booleans(capsys):
    for value, expected in [("false", False), ("no", False), ("0", False), ("true", True), ("yes", True),
                            ("1", True)]:
        assert command.parse_args(["--coslinear", value]).coslinear is expected
    assert command.main(["--coslinear", "false", "--model", "efficientnet_exx"]) == 0
    assert "plain head" in capsys.readouterr().out


def test_count_runs_as_a_module():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torchscope.count", "--mul-factor", "1"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stderr
    assert "Total Madds: 512,835,116" in p.stdout.splitlines()
    assert callable(torchscope.count)


def test_count_without_the_project_installed_says_how_to_fix_it():
    # -S: no site-packages, so no editable install; the script's folder heads sys.path.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run([sys.executable, "-S", os.path.join("torchscope", "count.py")], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 2 and p.stdout == ""
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install -e ." in lines[0] and "repository root" in lines[0], p.stderr


# ------------------------------------------------------------ the CLI on compressed checkpoints

NARROW = ["--width-mult", "0.25", "--depth-mult", "0.2"]


def _compressed_checkpoint(path, mutate=None):
    """A model_best.pytar of a narrow ex, 4-bit weights / 8-bit inputs (8/8 first and head), half of
    every layer pruned, with its compression record."""
    import compress
    from engine import checkpoint
    torch.manual_seed(0)
    m = models.create("efficientnet_ex", width_mult=0.25, depth_mult=0.2)
    compress.quantize(m, 4, 8, first_last_bits=8)
    pruner = compress.Pruner(m, compress.PruneSchedule(0.5, 1, 1), scope="layer")
    pruner.step(1)
    with torch.no_grad():
        m.train()(torch.randn(8, 3, 32, 32))   # the input ranges
    rec = compress.record(m, pruner)
    if mutate:
        mutate(rec)
    torch.save(checkpoint.weights_file(m, epoch=1, compression=rec), path)
    return m, rec


def test_cli_counts_a_compressed_checkpoint(tmp_path, capsys):
    path, out = tmp_path / "model_best.pytar", tmp_path / "c.json"
    _compressed_checkpoint(path)
    assert command.main(["--rules", "micronet", *NARROW]) == 0
    dense = capsys.readouterr().out
    assert command.main(["--rules", "micronet", "--per-layer", *NARROW, "--model-state-file", str(path),
                         "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Compression record: W4/A8 x35, W8/A8 x3; 38 masked layers, 50.0% of their weights pruned" in text
    assert re.search(r"^features\.0\.1\s+QuantConv2d\s+8x32x32\s+8/8\s+50\.0%", text, re.M)
    assert re.search(r"^features\.1\.conv\.0\.1\s+QuantConv2d\s+8x32x32\s+4/8\s+50\.0%", text, re.M)
    assert "Bits W/A" in text and "(parameters " in text

    # Quantised below 16 bits: one score, the full figure, and no freebie figure anywhere.
    assert 0 < allowed_score(text) < score_without_freebie(dense) / 2
    assert "no 16-bit freebie" in text and "Without the freebie" not in text and "fp16" not in text
    data = json.loads(out.read_text())
    assert data["score"] == data["scores"]["full"]["score"] and "freebie" not in data["scores"]
    assert data["freebie_allowed"] is False and data["score_convention"] == "full"
    assert data["compressed"] and data["compression"].startswith("W4/A8")
    rows = {r["name"]: r for r in data["layers"]}
    assert (rows["classifier.0"]["weight_bits"], rows["classifier.0"]["act_bits"]) == (8, 8)
    assert rows["features.1.conv.0.1"]["sparsity"] == 0.5
    assert round(data["score"], 6) == allowed_score(text)


@pytest.mark.parametrize("mutate,needle", [
    (lambda r: r["layers"]["features.1.conv.0.1"].update(weight_bits=40), "weight bits 40 out of range"),
    (lambda r: r["layers"]["features.0.1"].update(act_bits=1), "activation bits 1 out of range"),
    (lambda r: r["layers"]["features.0.1"].update(mask=torch.ones(3, 3, dtype=torch.bool)),
     "the mask of features.0.1 has shape (3, 3), its weight (8, 3, 3, 3)"),
    (lambda r: r["layers"]["features.0.1"].update(mask=torch.ones(8, 3, 3, 3)), "not a bool tensor"),
    (lambda r: r["layers"].update({"features.0.2": {"weight_bits": 8, "act_bits": 8}}),
     "features.0.2 is not a conv, linear or cosine layer"),
])
def test_cli_bad_compression_record_one_line(tmp_path, capsys, mutate, needle):
    path = tmp_path / "bad.pytar"
    _compressed_checkpoint(path, mutate)
    with pytest.raises(SystemExit) as e:
        command.script(["--rules", "micronet", *NARROW, "--model-state-file", str(path)])
    assert e.value.code == 1   # a damaged file: a failure at run time
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0] and str(path) in err[0], err
