"""Per-layer cost rules, keyed by layer kind, per sample (shapes below exclude the batch dimension).

The counter costs every leaf module by its *kind*, never by a project class, so that a new
architecture needs no edit here. A module's kind is:
- its class attribute `layer_kind`, when it declares one (the protocol for layers of one's own);
- else the kind of the nearest torch class in its MRO (TORCH_KINDS: Conv2d -> "conv", SiLU ->
  "silu", ...), so subclasses of torch layers are costed as those layers;
- else None: the module is listed as uncounted and the report says so.

Kinds, and what a module of that kind must have (torch layers have it already):

    kind                 the layer computes                           attributes the rules read
    "conv"               a 2-d convolution                            kernel_size, in_channels, groups,
                                                                      weight [out, in/g, kh, kw], bias
    "linear"             x @ weight.T (+ bias)                        weight [out, in], bias
    "batchnorm"          per-channel scale and shift                  -
    "silu"               x * sigmoid(x) (swish)                       -
    "sigmoid"            sigmoid(x)                                   -
    "adaptive_avg_pool"  average over adaptive windows                -
    "avg_pool"           average over fixed windows                   kernel_size
    "l2norm"             x / ||x|| along one dimension                dim (of the batched input)
    "cosine"             x @ normalise(kernel, columns)               kernel [in, out]
    "add"                a + b, elementwise                           forward(a, b)
    "mul"                a * b, elementwise (broadcast)               forward(a, b)
    "noop"               nothing to count (identity, padding, flatten, dropout at inference)

A parameter-free op written inline in a container's forward (`x + branch`) is invisible to
forward hooks: make it a leaf module of kind "add" or "mul" (models.efficientnet.Add and Mul).
docs/counting.md gives the conventions behind every number below, with the reference figures.

Every rule returns a `Cost` with the multiplies and the adds kept apart, so that one forward pass
gives the Madds at any mul_factor (Madds(mf) = mf * mults + adds) and the MicroNet score, which
weighs the two differently.

`uci` rules: the original entry's `count.py` (a modified torchscope; UCI/Qualcomm, 2019). With
output C x H x W, groups g, kernel k x k, K = k*k*C_in/g (the dot-product length of one output):

    kind               FLOPs                          Madds(mf) = mf * mults + adds
    conv               K*C_out*H*W (+ C_out*H*W bias)  mults K*C_out*H*W, adds (K - 1 + bias)*C_out*H*W
    batchnorm          2*C*H*W                         mults 2*C*H*W, adds 2*C*H*W      -> (2mf + 2) CHW
    silu (Swish)       0                               mults 3*C*H*W, adds C*H*W        -> (3mf + 1) CHW
    sigmoid            0                               mults 2*C*H*W, adds C*H*W        -> (2mf + 1) CHW
    adaptive_avg_pool  0                               adds = input numel
    avg_pool           input numel                     adds = kh*kw * output numel (64*C for the 8x8 head)
    linear             in*out                          mults in*out, adds (in - 1)*out  (bias ignored)
    l2norm (D-vector)  0                               D*(D - 1 + mf*D + 1): mults D*D, adds D*D
                                                       (quirk of the original: quadratic, an over-count)
    cosine             0                               like linear: mults in*out, adds (in - 1)*out
    noop: nothing.  add, mul: unseen (UNSEEN): the original wrote the residual add and the SE
    multiply inline in its containers' forward, so its hooks never saw them: no row, no cost.

`micronet` rules: the MicroNet Challenge organisers' conventions (google-research
micronet_challenge/counting.py). Multiplies and adds are counted apart; a transcendental op
(sqrt) counts 1 and goes with the adds, because the fp16 freebie halves multiplies only.

    conv / linear      per output, a dot product of length K (dense) or K * (1 - sparsity) when the
                       layer is counted sparse: the library's vector_length. With nz non-zero weights
                       of C_out filters that is nz * positions mults and (nz - C_out) * positions adds
                       (floored at 0: the library would go negative past 1 - 1/K sparsity), + 1 add
                       per output for a bias. Only a layer stored sparse (it pays for a 1-bit mask,
                       see counter.py) gets this credit: a dense-stored tensor's exact zeros do not.
    batchnorm          folded into the conv (or linear) that produced its input: costs nothing
                       itself, and that conv gains a bias add (1 per output, unless it had a bias)
                       and a bias vector (C_out parameters) in place of BN's 2*C. A BN on any
                       other input costs 1 mult + 1 add per element (scale and shift).
    silu               3 mults + 1 add per element      sigmoid   2 mults + 1 add per element
    avg pools          per output: 1 mult + (window - 1) adds; global pool: C mults + (H*W - 1)*C adds
    l2norm (D-vector)  D mults + (D - 1) adds for the square-sum, 1 sqrt (an add-bucket op),
                       D divides counted as mults: 2D mults, D adds per vector
    cosine             the column normalisation of the kernel depends on the weights only, so an
                       entry precomputes it once (as it folds BN); what remains is the in x out
                       matmul, counted like a linear without bias (its sparsity too). The clamp to
                       [-1, 1] only guards rounding and is not counted.
    add                1 add per output element (MBConv's residual add)
    mul                1 mult per output element (the SE gate, x * gate)
    noop               nothing.

Bit widths (what a multiply and an add cost) are the score's business (score.py): rules count ops.
"""
import math
from dataclasses import dataclass

from torch import nn


@dataclass
class Cost:
    flops: int = 0
    mults: int = 0
    adds: int = 0
    # Dense multiply-accumulates of a conv/linear/matmul, the quantity FlopCounterMode reports
    # (as 2 * MACs): kept so that the counter can be checked against it.
    macs: int = 0


# The kinds of torch's own layers (and of their subclasses, through the MRO).
TORCH_KINDS = {
    nn.Conv2d: "conv",
    nn.Linear: "linear",
    nn.BatchNorm2d: "batchnorm",
    nn.SiLU: "silu",
    nn.Sigmoid: "sigmoid",
    nn.AdaptiveAvgPool2d: "adaptive_avg_pool",
    nn.AvgPool2d: "avg_pool",
    nn.Identity: "noop",
    nn.ZeroPad2d: "noop",
    nn.Dropout: "noop",
    nn.Flatten: "noop",
}

# Elementwise ops that the original wrote inline in a container's forward. Its memory line counted
# the outputs of the layers its hooks saw, which never included these: they add no activations
# (see counter.Report.memory), under either rule set.
INLINE_KINDS = frozenset({"add", "mul"})


def layer_kind(module):
    """The kind a module is costed as: its declared `layer_kind`, else its torch class's, else None."""
    declared = getattr(type(module), "layer_kind", None)
    if declared is not None:
        return declared
    for cls in type(module).__mro__:
        if cls in TORCH_KINDS:
            return TORCH_KINDS[cls]
    return None


def units(model):
    """The modules whose calls are costed: each leaf, and each module with a layer kind, whose
    children are then part of it (a quantised conv's input quantiser), not costed themselves."""
    seen, out = set(), []

    def walk(m):
        if id(m) in seen:
            return
        seen.add(id(m))
        children = list(m.children())
        if not children or layer_kind(m) is not None:
            out.append(m)
            return
        for child in children:
            walk(child)

    walk(model)
    return out


def numel(shape):
    return math.prod(shape)


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _conv_geometry(module, out_shape):
    kh, kw = _pair(module.kernel_size)
    c_out, h, w = out_shape
    k = kh * kw * module.in_channels // module.groups
    return k, c_out, h * w


def free(module, in_shape, out_shape):
    return Cost()


class _Unseen:
    """A rule-table entry for a kind that the rule set does not see at all: no row, no cost."""

    def __repr__(self):
        return "UNSEEN"


UNSEEN = _Unseen()


# ------------------------------------------------------------------------------ uci rules

def uci_conv(module, in_shape, out_shape):
    k, c_out, hw = _conv_geometry(module, out_shape)
    bias = 0 if module.bias is None else 1
    macs = k * c_out * hw
    return Cost(flops=macs + bias * c_out * hw, mults=macs, adds=(k - 1 + bias) * c_out * hw, macs=macs)


def uci_bn(module, in_shape, out_shape):
    n = numel(out_shape)
    return Cost(flops=2 * n, mults=2 * n, adds=2 * n)


def uci_silu(module, in_shape, out_shape):
    n = numel(out_shape)
    return Cost(mults=3 * n, adds=n)


def uci_sigmoid(module, in_shape, out_shape):
    n = numel(out_shape)
    return Cost(mults=2 * n, adds=n)


def uci_adaptive_pool(module, in_shape, out_shape):
    return Cost(adds=numel(in_shape))


def uci_avg_pool(module, in_shape, out_shape):
    kh, kw = _pair(module.kernel_size)
    return Cost(flops=numel(in_shape), adds=kh * kw * numel(out_shape))


def uci_linear(module, in_shape, out_shape):
    n_in, n_out = in_shape[-1], out_shape[-1]
    vectors = numel(out_shape[:-1])
    macs = vectors * n_in * n_out
    return Cost(flops=macs, mults=macs, adds=vectors * (n_in - 1) * n_out, macs=macs)


def _norm_length(module, in_shape):
    # `dim` indexes the batched tensor; the shapes here have lost the batch dimension.
    return in_shape[module.dim - 1 if module.dim >= 0 else module.dim]


def uci_l2norm(module, in_shape, out_shape):
    d = _norm_length(module, in_shape)
    vectors = numel(in_shape) // d
    return Cost(mults=vectors * d * d, adds=vectors * d * d)


def uci_cosine(module, in_shape, out_shape):
    n_in, n_out = module.kernel.shape
    vectors = numel(out_shape[:-1])
    macs = vectors * n_in * n_out
    return Cost(mults=macs, adds=vectors * (n_in - 1) * n_out, macs=macs)


UCI_RULES = {
    "conv": uci_conv,
    "batchnorm": uci_bn,
    "silu": uci_silu,
    "sigmoid": uci_sigmoid,
    "adaptive_avg_pool": uci_adaptive_pool,
    "avg_pool": uci_avg_pool,
    "linear": uci_linear,
    "l2norm": uci_l2norm,
    "cosine": uci_cosine,
    "add": UNSEEN,
    "mul": UNSEEN,
    "noop": free,
}


# ------------------------------------------------------------------------- micronet rules

# The kinds whose rule takes the layer's counted non-zero weights (None: dense), and the attribute
# holding those weights.
WEIGHT_ATTR = {"conv": "weight", "linear": "weight", "cosine": "kernel"}
# The axis of that tensor that indexes output units (a per-channel quantisation scale each).
OUTPUT_AXIS = {"conv": 0, "linear": 0, "cosine": 1}


def _dot(numel, c_out, positions, nonzero):
    """mults and adds of C_out dot products at `positions` places over the non-zeros (the library's
    vector_length * (1 - sparsity) per output: nz / C_out), adds floored at 0."""
    nz = numel if nonzero is None else nonzero
    return positions * nz, positions * max(nz - c_out, 0)


def micronet_conv(module, in_shape, out_shape, nonzero=None):
    k, c_out, hw = _conv_geometry(module, out_shape)
    mults, adds = _dot(module.weight.numel(), c_out, hw, nonzero)
    if module.bias is not None:
        adds += c_out * hw
    return Cost(mults=mults, adds=adds, macs=k * c_out * hw)


def micronet_linear(module, in_shape, out_shape, nonzero=None):
    n_in, n_out = in_shape[-1], out_shape[-1]
    vectors = numel(out_shape[:-1])
    mults, adds = _dot(module.weight.numel(), n_out, vectors, nonzero)
    if module.bias is not None:
        adds += vectors * n_out
    return Cost(mults=mults, adds=adds, macs=vectors * n_in * n_out)


def micronet_cosine(module, in_shape, out_shape, nonzero=None):
    n_in, n_out = module.kernel.shape
    vectors = numel(out_shape[:-1])
    mults, adds = _dot(module.kernel.numel(), n_out, vectors, nonzero)
    return Cost(mults=mults, adds=adds, macs=vectors * n_in * n_out)


def micronet_bn_unfolded(module, in_shape, out_shape):
    n = numel(out_shape)
    return Cost(mults=n, adds=n)


# Swish (3 mults + 1 add) and sigmoid (2 mults + 1 add) per element: both rule sets agree.
micronet_silu = uci_silu
micronet_sigmoid = uci_sigmoid


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


def micronet_add(module, in_shape, out_shape):
    return Cost(adds=numel(out_shape))


def micronet_mul(module, in_shape, out_shape):
    return Cost(mults=numel(out_shape))


MICRONET_RULES = {
    "conv": micronet_conv,
    # Replaced by a fold when its input comes straight from a conv or linear (see counter.py).
    "batchnorm": micronet_bn_unfolded,
    "silu": micronet_silu,
    "sigmoid": micronet_sigmoid,
    "adaptive_avg_pool": micronet_avg_pool,
    "avg_pool": micronet_avg_pool,
    "linear": micronet_linear,
    "l2norm": micronet_l2norm,
    "cosine": micronet_cosine,
    "add": micronet_add,
    "mul": micronet_mul,
    "noop": free,
}

RULESETS = {
    "uci": UCI_RULES,
    "micronet": MICRONET_RULES,
}

# Earlier names of a rule set, still accepted: "seed" was the original entry's rules.
RULE_ALIASES = {"seed": "uci"}


def ruleset_name(rules):
    """The canonical name of a rule set (an alias gives its target); ValueError if unknown."""
    name = RULE_ALIASES.get(rules, rules)
    if name not in RULESETS:
        raise ValueError(f"unknown rules {rules!r}; choose one of {', '.join(RULESETS)}")
    return name


def find_rule(table, module):
    """(kind, rule) for `module` in a rule table; rule is None when the table has none."""
    kind = layer_kind(module)
    return kind, table.get(kind)
