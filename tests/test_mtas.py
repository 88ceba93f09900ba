"""Maximum transient activation size (torchscope.mtas): against counts made by hand on a small net
with a residual and a squeeze-excite branch, dense and quantised, and its behaviour on the real
models."""
import pytest
import torch
from torch import nn

import compress
import models
from models.efficientnet import Add, Mul
from torchscope.mtas import mtas


class SE(nn.Module):
    def __init__(self):
        super().__init__()
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(8, 2, 1), nn.SiLU(), nn.Conv2d(2, 8, 1),
                                nn.Sigmoid())
        self.mul = Mul()

    def forward(self, x):
        return self.mul(x, self.se(x))


class Small(nn.Module):
    """stem conv 3->4 (+BN, swish) -> [expand 4->8 (+BN, swish) -> SE -> project 8->4 (+BN)] + residual
    -> global pool -> flatten -> linear 4->10, on 3x8x8 inputs."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.SiLU())
        self.expand = nn.Sequential(nn.Conv2d(4, 8, 1, bias=False), nn.BatchNorm2d(8), nn.SiLU())
        self.se = SE()
        self.project = nn.Sequential(nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4))
        self.add = Add()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        a = self.stem(x)
        return self.fc(self.pool(self.add(a, self.project(self.se(self.expand(a))))).flatten(1))


# The tensors of one sample, counted by hand (elements): the input, and each op's output.
X = 3 * 8 * 8        # 192, the input
C0 = 4 * 8 * 8       # 256, stem conv (its BatchNorm folded in: the BN writes no tensor of its own)
A = 4 * 8 * 8        # 256, stem swish: the block's input, read again by the residual add
E = 8 * 8 * 8        # 512, expand conv (+BN)
B = 8 * 8 * 8        # 512, expand swish: the SE's input, read again by the SE multiply
P, S1, S2, S3, G = 8, 2, 2, 8, 8   # SE: pool, conv, swish, conv, sigmoid
M = 8 * 8 * 8        # 512, SE multiply
C = 4 * 8 * 8        # 256, project conv (+BN)
R = 4 * 8 * 8        # 256, residual add
Q, Y = 4, 10         # head pool (flatten is a view of it), linear

# Live while each op runs: its inputs, its output, and every tensor a later op still reads.
DENSE_LIVE = {
    "stem.0": X + C0,
    "stem.2": C0 + A,
    "expand.0": A + E,
    "expand.2": A + E + B,
    "se.se.0": A + B + P,
    "se.se.1": A + B + P + S1,
    "se.se.2": A + B + S1 + S2,
    "se.se.3": A + B + S2 + S3,
    "se.se.4": A + B + S3 + G,
    "se.mul": A + B + G + M,          # 1,288 elements: the peak
    "project.0": A + M + C,
    "add": A + C + R,
    "pool": R + Q,
    "fc": Q + Y,
}


def test_mtas_of_a_small_net_with_residual_and_se_equals_the_count_by_hand():
    r = mtas(Small(), input_size=(3, 8, 8))
    live = {row.name: row.live_bits for row in r.rows if row.live_bits is not None}
    assert live == {k: 32 * v for k, v in DENSE_LIVE.items()}
    assert r.total_bits == 32 * (A + B + G + M) == 41_216 and r.peak == "se.mul"
    # BatchNorms after a conv are folded: no op, no tensor.
    folded = {row.name: row.note for row in r.rows if row.live_bits is None}
    assert folded == {"stem.1": "folded into stem.0", "expand.1": "folded into expand.0",
                      "project.1": "folded into project.0"}


def test_quantised_inputs_are_stored_at_their_bits_unless_a_float_op_also_reads_them():
    """4-bit inputs for every conv and the linear: a tensor read only by them costs 4 bits an element
    (the input, the SE pool's output, the SE swish, the SE product, the head pool); the block input A
    is also read by the residual add (float), so it stays at 32."""
    layers = ["stem.0", "expand.0", "se.se.1", "se.se.3", "project.0", "fc"]
    record = {"layers": {n: {"act_bits": 4} for n in layers}}
    r = mtas(Small(), input_size=(3, 8, 8), compression=record)
    live = {row.name: row.live_bits for row in r.rows if row.live_bits is not None}
    by_hand = {
        "stem.0": 4 * X + 32 * C0,
        "se.mul": 32 * A + 32 * B + 32 * G + 4 * M,
        "expand.2": 32 * (A + E + B),
        "pool": 32 * R + 4 * Q,
        "fc": 4 * Q + 32 * Y,
        "se.se.2": 32 * (A + B + S1) + 4 * S2,
    }
    assert {k: live[k] for k in by_hand} == by_hand
    assert r.total_bits == 32 * (A + E + B) == 40_960 and r.peak == "expand.2"
    out = {row.name: row.output_bits for row in r.rows if row.output_bits is not None}
    assert out["se.mul"] == 4 * M and out["expand.2"] == 32 * B


def test_the_report_serialises_and_the_caller_s_random_stream_is_untouched():
    net = Small()
    state = torch.get_rng_state()
    d = mtas(net, input_size=(3, 8, 8)).to_dict()
    assert torch.equal(state, torch.get_rng_state())
    assert d["mtas_bits"] == 41_216 and len(d["layers"]) == 17 and d["peak"] == "se.mul"
    with pytest.raises(ValueError, match="float_bits"):
        mtas(net, input_size=(3, 8, 8), float_bits=0)


@pytest.mark.parametrize("name", models.names())
def test_registered_models_peak_inside_a_block_and_shrink_with_their_activation_bits(name):
    """On the real models: the peak is inside an MBConv block (its input held for the residual add or
    the SE multiply), above twice the largest tensor any op writes, and quantising every
    layer's inputs to 4 bits lowers it."""
    net = models.create(name, width_mult=0.25, depth_mult=0.34)
    dense = mtas(net)
    assert dense.peak.startswith("features.") and ".conv." in dense.peak
    sizes = {row.name: row.output_bits for row in dense.rows if row.output_bits}
    assert dense.total_bits > 2 * max(sizes.values())
    compress.quantize(net, 4, 4)
    q = mtas(net, compression=compress.record(net))
    assert q.total_bits < dense.total_bits
