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

import errors
import models
import torchscope
from models.efficientnet import BlockSpec, ConvUnit, MBConv
from torchscope import command

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL = [(name, head) for name in models.names() for head in ("cosine", "linear")]
# The project's top-level packages and modules (pyproject.toml).
PROJECT = ("models", "loss", "data", "refinery", "engine", "cli", "bench", "errors", "torchscope")


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
    # Linear: one mult per non-zero weight; per output, (non-zeros - 1) adds, floored at 0, + bias.
    assert r.mults == dense.mults - 40 + 21
    assert r.adds == dense.adds - (7 * 5 + 5) + ((0 + 0 + 4 + 7 + 7) + 5)
    # Weights: non-zeros + 1-bit mask over the tensor (40 / 32), when cheaper than dense.
    assert r.params32 == dense.params32 - 40 + (21 + 40 / 32)
    assert r.params16 == dense.params16 - 20 + (21 / 2 + 40 / 32)
    assert r.sparse == {"fc.weight": (21, 40)}
    # A single zero does not pay for a mask: the tensor stays dense.
    with torch.no_grad():
        model.fc.weight.fill_(1.0)
        model.fc.weight[0, 0] = 0
    one = torchscope.count(model, input_size=TINY_INPUT, rules="micronet")
    assert one.params32 == dense.params32 and one.mults == dense.mults - 1


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
    got = dict(re.findall(r"^MicroNet score, (fp16 freebie|no freebie):.*= ([\d.]+)$", p.stdout, re.M))
    assert set(got) == {"fp16 freebie", "no freebie"}
    sparse_scores = {k: float(v) for k, v in got.items()}
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
    assert "MicroNet score, fp16 freebie: 1,387,396/36.5M + 377,311,408/10.49B = 0.073980" in lines
    assert "MicroNet score, no freebie:   2,774,792/36.5M + 504,857,292/10.49B = 0.124149" in lines


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
    (["--json", "/proc/no/such/dir/x.json", "--model", "efficientnet_exx"], "cannot write"),
])
def test_cli_user_errors_exit_2(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        command.script(argv)
    assert e.value.code == 2
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
