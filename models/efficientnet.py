"""EfficientNet for 32x32 inputs, built from one stage table.

Module names follow the original entry's checkpoint layout (docs/original-entry.md), so that its
`.pytar` files load without any key mapping: `features.0` stem unit, `features.1..N` MBConv blocks,
`features.N+1` head unit, `classifier` head.
"""
import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from torch.utils.checkpoint import checkpoint

from .heads import make_classifier

# (expand t, channels c, repeats n, stride s, kernel k). Only stages 3 and 6 downsample,
# so a 32x32 input ends at 8x8 (the ImageNet table would end at 1x1).
BASE_STAGES = (
    (1, 16, 1, 1, 3),
    (6, 24, 2, 1, 3),
    (6, 40, 2, 2, 5),
    (6, 80, 3, 1, 3),
    (6, 112, 3, 1, 5),
    (6, 192, 4, 2, 5),
    (6, 320, 1, 1, 3),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280

# BatchNorm momentum 0.01 in PyTorch's convention (TF's 0.99 decay).
BN_EPS = 1e-5
BN_MOMENTUM = 0.01


def make_divisible(v, divisor=8):
    """The original's channel rounding: nearest multiple of 8, never more than 10% below v."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def round_channels(c, width_mult):
    # The original skips rounding at width 1.0, which leaves b0's table untouched.
    return c if width_mult == 1.0 else make_divisible(c * width_mult)


def round_repeats(n, depth_mult):
    return n if depth_mult == 1.0 else max(1, math.ceil(depth_mult * n))


@dataclass(frozen=True)
class BlockSpec:
    expand: int
    c_in: int
    c_out: int
    stride: int
    kernel: int


def resolve(width_mult, depth_mult, stages=BASE_STAGES):
    """Expand the stage table into (stem channels, block specs, head channels)."""
    stem = round_channels(STEM_CHANNELS, width_mult)
    blocks, c_in = [], stem
    for t, c, n, s, k in stages:
        c_out = round_channels(c, width_mult)
        for i in range(round_repeats(n, depth_mult)):
            blocks.append(BlockSpec(t, c_in, c_out, s if i == 0 else 1, k))
            c_in = c_out
    return stem, blocks, round_channels(HEAD_CHANNELS, width_mult)


class Swish(nn.SiLU):
    """x * sigmoid(x), the original's name for SiLU: F.silu computes it in one fused kernel
    (forward and backward). A subclass, so that counting by layer type costs it as SiLU."""


class Add(nn.Module):
    """a + b, elementwise: MBConv's residual add as a parameter-free leaf module, so that forward
    hooks (the op counter, docs/counting.md) see it. No parameters, so no state-dict keys."""

    layer_kind = "add"

    def forward(self, a, b):
        return a + b


class Mul(nn.Module):
    """a * b, elementwise with broadcasting: the squeeze-excite gate `x * gate` as a parameter-free
    leaf module, so that forward hooks see it. No parameters, so no state-dict keys."""

    layer_kind = "mul"

    def forward(self, a, b):
        return a * b


def same_padding(kernel, stride):
    """TF "same" padding for an even input size: total max(k - s, 0), extra pixel after."""
    total = max(kernel - stride, 0)
    return total // 2, total - total // 2


class ConvUnit(nn.Sequential):
    """pad -> conv (no bias) -> BN -> Swish, indexed 0..3 as in the original's checkpoints.

    Symmetric padding goes into the conv itself (cheaper than a separate pad kernel); only an
    asymmetric split, which stride 2 needs, keeps an explicit ZeroPad2d at index 0.
    """

    def __init__(self, c_in, c_out, kernel, stride=1, groups=1, act=True):
        before, after = same_padding(kernel, stride)
        if before == after:
            pad, conv_pad = nn.Identity(), before
        else:
            pad, conv_pad = nn.ZeroPad2d((before, after, before, after)), 0
        super().__init__(
            pad,
            nn.Conv2d(c_in, c_out, kernel, stride, conv_pad, groups=groups, bias=False),
            nn.BatchNorm2d(c_out, eps=BN_EPS, momentum=BN_MOMENTUM),
            Swish() if act else nn.Identity(),
        )


class SqueezeExcite(nn.Module):
    def __init__(self, channels, squeezed):
        super().__init__()
        # Index layout (pool, conv, swish, conv, sigmoid) gives the original's `se.1`/`se.3` keys.
        self.se = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, squeezed, 1),
            Swish(),
            nn.Conv2d(squeezed, channels, 1),
            nn.Sigmoid(),
        )
        # Outside `se`, so that its indices (and the state-dict keys) stay the original's.
        self.mul = Mul()

    def forward(self, x):
        return self.mul(x, self.se(x))


def drop_connect(x, rate, training):
    """Stochastic depth: drop the whole residual branch per sample, rescale survivors."""
    if not training or rate == 0.0:
        return x
    keep = 1.0 - rate
    mask = torch.empty((x.shape[0], 1, 1, 1), dtype=x.dtype, device=x.device).bernoulli_(keep)
    return x * mask / keep


class MBConv(nn.Module):
    """Inverted residual: [expand 1x1] -> depthwise kxk -> SE -> project 1x1 (+bias) -> BN."""

    def __init__(self, spec: BlockSpec, drop_connect_rate=0.0):
        super().__init__()
        mid = spec.c_in * spec.expand
        layers = []
        if spec.expand != 1:
            layers.append(ConvUnit(spec.c_in, mid, 1))
        layers += [
            ConvUnit(mid, mid, spec.kernel, spec.stride, groups=mid),
            SqueezeExcite(mid, max(1, int(spec.c_in / 4))),
            nn.Conv2d(mid, spec.c_out, 1, bias=True),
            nn.BatchNorm2d(spec.c_out, eps=BN_EPS, momentum=BN_MOMENTUM),
        ]
        self.conv = nn.Sequential(*layers)
        self.residual = spec.stride == 1 and spec.c_in == spec.c_out
        self.drop_connect_rate = drop_connect_rate if self.residual else 0.0
        # Beside `conv`, not in it: the Sequential's indices are the original's checkpoint keys.
        self.add = Add()

    def forward(self, x):
        out = self.conv(x)
        if self.residual:
            out = self.add(x, drop_connect(out, self.drop_connect_rate, self.training))
        return out


class EfficientNet32(nn.Module):
    def __init__(self, width_mult=1.0, depth_mult=1.0, dropout=0.2, drop_connect_rate=0.2,
                 num_classes=100, coslinear=True, input_size=32, stages=BASE_STAGES):
        super().__init__()
        if input_size % 4:
            raise ValueError(f"input size {input_size} is not a multiple of 4: the network downsamples twice")
        stem, blocks, head = resolve(width_mult, depth_mult, stages)
        self.width_mult, self.depth_mult = width_mult, depth_mult
        self.block_specs = tuple(blocks)
        layers = [ConvUnit(3, stem, 3, 1)]
        layers += [MBConv(b, drop_connect_rate) for b in blocks]
        layers.append(ConvUnit(blocks[-1].c_out, head, 1))
        self.features = nn.Sequential(*layers)
        # A fixed average pool over the final map, 8x8 at 32x32 input, as in the original.
        self.pool = nn.AvgPool2d(input_size // 4)
        self.classifier = make_classifier(head, num_classes, coslinear, dropout)
        self.coslinear = coslinear
        # Recompute each MBConv block in backward instead of keeping its activations (small GPUs).
        self.activation_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -bound, bound)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif hasattr(m, "reset_kernel"):
                m.reset_kernel()

    def forward(self, x):
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            x = self.features[0](x)
            for block in self.features[1:-1]:
                x = checkpoint(block, x, use_reentrant=False,
                               context_fn=lambda b=block: (contextlib.nullcontext(), _bn_stats_frozen(b)))
            x = self.features[-1](x)
        else:
            x = self.features(x)
        x = self.pool(x)
        return self.classifier(x.flatten(1))


@contextlib.contextmanager
def _bn_stats_frozen(module):
    """During a checkpoint's recompute, BatchNorm must not update its running statistics twice:
    momentum 0 leaves them exactly as they are, and the batch counter is put back afterwards."""
    bns = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, count) in zip(bns, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)
