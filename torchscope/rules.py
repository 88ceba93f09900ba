"""Per-module cost rules, per sample (shapes below exclude the batch dimension).

Every rule returns a `Cost` with the multiplies and the adds kept apart, so that one forward pass
gives the Madds at any mul_factor (Madds(mf) = mf * mults + adds) and the MicroNet score, which
weighs the two differently.

`seed` rules: the original entry's `count.py` (a modified torchscope), SPEC §4. With output
C x H x W, groups g, kernel k x k, K = k*k*C_in/g (the dot-product length of one output):

    module             FLOPs                          Madds(mf) = mf * mults + adds
    Conv2d             K*C_out*H*W (+ C_out*H*W bias)  mults K*C_out*H*W, adds (K - 1 + bias)*C_out*H*W
    BatchNorm2d        2*C*H*W                         mults 2*C*H*W, adds 2*C*H*W      -> (2mf + 2) CHW
    Swish              0                               mults 3*C*H*W, adds C*H*W        -> (3mf + 1) CHW
    Sigmoid            0                               mults 2*C*H*W, adds C*H*W        -> (2mf + 1) CHW
    AdaptiveAvgPool2d  0                               adds = input numel
    AvgPool2d          input numel                     adds = kh*kw * output numel (64*C for the 8x8 head)
    Linear             in*out                          mults in*out, adds (in - 1)*out  (bias ignored)
    L2Norm (D-vector)  0                               D*(D - 1 + mf*D + 1): mults D*D, adds D*D
                                                       (quirk of the original: quadratic, an over-count)
    CosineLinear       0                               like Linear: mults in*out, adds (in - 1)*out
    Identity, ZeroPad2d, Dropout: nothing.  Residual adds and the SE multiply are not counted.

`micronet` rules: the MicroNet Challenge organisers' conventions (google-research
micronet_challenge/counting.py), SPEC §5. Multiplies and adds are counted apart; a
transcendental op (sqrt) counts 1 and goes with the adds, because the fp16 freebie halves
multiplies only.

    Conv2d / Linear    per output, a dot product over the non-zero weights of its filter (n of them):
                       n mults and n - 1 adds, + 1 add for a bias. Dense: mults = K*C_out*H*W.
                       A zero weight is skipped: an entry that prunes does not multiply by it.
    BatchNorm2d        folded into the conv (or linear) that produced its input: costs nothing
                       itself, and that conv gains a bias add (1 per output, unless it had a bias)
                       and a bias vector (C_out parameters) in place of BN's 2*C. A BN on any
                       other input costs 1 mult + 1 add per element (scale and shift).
    Swish              3 mults + 1 add per element      Sigmoid   2 mults + 1 add per element
    average pool       per output: 1 mult + (window - 1) adds; global pool: C mults + (H*W - 1)*C adds
    L2Norm (D-vector)  D mults + (D - 1) adds for the square-sum, 1 sqrt (an add-bucket op),
                       D divides counted as mults: 2D mults, D adds per vector
    CosineLinear       the column normalisation of the kernel depends on the weights only, so an
                       entry precomputes it once (as it folds BN); what remains is the in x out
                       matmul, counted like a Linear without bias. The clamp to [-1, 1] only
                       guards rounding and is not counted.
    MBConv residual    1 add per output element (the add sits in MBConv.forward, not in a leaf)
    SqueezeExcite      1 mult per element (x * gate, in SqueezeExcite.forward)
    Identity, ZeroPad2d, Dropout (inference): nothing.
"""
import math
from dataclasses import dataclass

from torch import nn

import models
from models.efficientnet import MBConv, SqueezeExcite


@dataclass
class Cost:
    flops: int = 0
    mults: int = 0
    adds: int = 0
    # Dense multiply-accumulates of a conv/linear/matmul, the quantity FlopCounterMode reports
    # (as 2 * MACs): kept so that the counter can be checked against it.
    macs: int = 0


def numel(shape):
    return math.prod(shape)


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _conv_geometry(module, out_shape):
    kh, kw = module.kernel_size
    c_out, h, w = out_shape
    k = kh * kw * module.in_channels // module.groups
    return k, c_out, h * w


# ----------------------------------------------------------------------------- seed rules

def seed_conv(module, in_shape, out_shape):
    k, c_out, hw = _conv_geometry(module, out_shape)
    bias = 0 if module.bias is None else 1
    macs = k * c_out * hw
    return Cost(flops=macs + bias * c_out * hw, mults=macs, adds=(k - 1 + bias) * c_out * hw, macs=macs)


def seed_bn(module, in_shape, out_shape):
    n = numel(out_shape)
    return Cost(flops=2 * n, mults=2 * n, adds=2 * n)


def seed_swish(module, in_shape, out_shape):
    n = numel(out_shape)
    return Cost(mults=3 * n, adds=n)


def seed_sigmoid(module, in_shape, out_shape):
    n = numel(out_shape)
    return Cost(mults=2 * n, adds=n)


def seed_adaptive_pool(module, in_shape, out_shape):
    return Cost(adds=numel(in_shape))


def seed_avg_pool(module, in_shape, out_shape):
    kh, kw = _pair(module.kernel_size)
    return Cost(flops=numel(in_shape), adds=kh * kw * numel(out_shape))


def seed_linear(module, in_shape, out_shape):
    n_in, n_out = in_shape[-1], out_shape[-1]
    vectors = numel(out_shape[:-1])
    macs = vectors * n_in * n_out
    return Cost(flops=macs, mults=macs, adds=vectors * (n_in - 1) * n_out, macs=macs)


def _norm_length(module, in_shape):
    # `dim` indexes the batched tensor; the shapes here have lost the batch dimension.
    return in_shape[module.dim - 1 if module.dim >= 0 else module.dim]


def seed_l2norm(module, in_shape, out_shape):
    d = _norm_length(module, in_shape)
    vectors = numel(in_shape) // d
    return Cost(mults=vectors * d * d, adds=vectors * d * d)


def seed_cosine(module, in_shape, out_shape):
    n_in, n_out = module.kernel.shape
    vectors = numel(out_shape[:-1])
    macs = vectors * n_in * n_out
    return Cost(mults=macs, adds=vectors * (n_in - 1) * n_out, macs=macs)


def free(module, in_shape, out_shape):
    return Cost()


SEED_RULES = {
    nn.Conv2d: seed_conv,
    nn.BatchNorm2d: seed_bn,
    models.Swish: seed_swish,
    nn.Sigmoid: seed_sigmoid,
    nn.AdaptiveAvgPool2d: seed_adaptive_pool,
    nn.AvgPool2d: seed_avg_pool,
    nn.Linear: seed_linear,
    models.L2Norm: seed_l2norm,
    models.CosineLinear: seed_cosine,
    nn.Identity: free,
    nn.ZeroPad2d: free,
    nn.Dropout: free,
    nn.Flatten: free,
}

# The seed counted only leaf modules: no composite rules.
SEED_COMPOSITE = {}


# ------------------------------------------------------------------------- micronet rules

def _sparse_dot(nnz_per_output_unit, positions):
    """mults and adds of `positions` dot products per unit whose non-zero lengths are given."""
    mults = positions * sum(nnz_per_output_unit)
    adds = positions * sum(max(n - 1, 0) for n in nnz_per_output_unit)
    return mults, adds


def _nnz_per_row(weight):
    """Non-zero weights of each output unit (dim 0 of a conv/linear weight)."""
    return weight.detach().reshape(weight.shape[0], -1).ne(0).sum(dim=1).tolist()


def micronet_conv(module, in_shape, out_shape):
    k, c_out, hw = _conv_geometry(module, out_shape)
    mults, adds = _sparse_dot(_nnz_per_row(module.weight), hw)
    if module.bias is not None:
        adds += c_out * hw
    return Cost(mults=mults, adds=adds, macs=k * c_out * hw)


def micronet_linear(module, in_shape, out_shape):
    n_in, n_out = in_shape[-1], out_shape[-1]
    vectors = numel(out_shape[:-1])
    mults, adds = _sparse_dot(_nnz_per_row(module.weight), vectors)
    if module.bias is not None:
        adds += vectors * n_out
    return Cost(mults=mults, adds=adds, macs=vectors * n_in * n_out)


def micronet_cosine(module, in_shape, out_shape):
    n_in, n_out = module.kernel.shape
    vectors = numel(out_shape[:-1])
    # The kernel is [in, classes]: a class's dot product runs over its column.
    mults, adds = _sparse_dot(_nnz_per_row(module.kernel.t()), vectors)
    return Cost(mults=mults, adds=adds, macs=vectors * n_in * n_out)


def micronet_bn_unfolded(module, in_shape, out_shape):
    n = numel(out_shape)
    return Cost(mults=n, adds=n)


def micronet_swish(module, in_shape, out_shape):
    n = numel(out_shape)
    return Cost(mults=3 * n, adds=n)


def micronet_sigmoid(module, in_shape, out_shape):
    n = numel(out_shape)
    return Cost(mults=2 * n, adds=n)


def micronet_avg_pool(module, in_shape, out_shape):
    n_in, n_out = numel(in_shape), numel(out_shape)
    if n_in % n_out:
        raise ValueError(f"{type(module).__name__} with overlapping or uneven windows "
                         f"({tuple(in_shape)} -> {tuple(out_shape)}) has no micronet rule")
    # Non-overlapping windows tile the input: one mult (the 1/window scale) per output and
    # window - 1 adds, so a global pool gives C mults + (H*W - 1)*C adds.
    window = n_in // n_out
    return Cost(mults=n_out, adds=(window - 1) * n_out)


def micronet_l2norm(module, in_shape, out_shape):
    d = _norm_length(module, in_shape)
    vectors = numel(in_shape) // d
    return Cost(mults=2 * d * vectors, adds=d * vectors)


MICRONET_RULES = {
    nn.Conv2d: micronet_conv,
    # Replaced by a fold when its input comes straight from a conv or linear (see counter.py).
    nn.BatchNorm2d: micronet_bn_unfolded,
    models.Swish: micronet_swish,
    nn.Sigmoid: micronet_sigmoid,
    nn.AdaptiveAvgPool2d: micronet_avg_pool,
    nn.AvgPool2d: micronet_avg_pool,
    nn.Linear: micronet_linear,
    models.L2Norm: micronet_l2norm,
    models.CosineLinear: micronet_cosine,
    nn.Identity: free,
    nn.ZeroPad2d: free,
    nn.Dropout: free,
    nn.Flatten: free,
}


def micronet_residual(module, in_shape, out_shape):
    if not module.residual:
        return None
    return Cost(adds=numel(out_shape))


def micronet_se_multiply(module, in_shape, out_shape):
    return Cost(mults=numel(out_shape))


# Ops that live in a container's forward rather than in a leaf; the label names the extra row.
MICRONET_COMPOSITE = {
    MBConv: ("residual add", micronet_residual),
    SqueezeExcite: ("SE multiply", micronet_se_multiply),
}

RULESETS = {
    "seed": (SEED_RULES, SEED_COMPOSITE),
    "micronet": (MICRONET_RULES, MICRONET_COMPOSITE),
}


def find_rule(table, module):
    """The rule for the most specific class of `module` in `table`, or None."""
    for cls in type(module).__mro__:
        if cls in table:
            return table[cls]
    return None
