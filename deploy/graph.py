"""The deployed graph: a model as the score counts it, BatchNorm folded, masks applied, quantised
layers as integers and scales.

`fold(model, record)` traces a model (torch.fx, with every module that has a layer kind as one op)
and gives a `Graph`: ops in execution order over numbered values, where each conv, linear and cosine
layer is a `Layer` holding exactly what a deployment stores and the score charges:

- weights: on the integer grid (2..8 bits) as integers `q` with one float32 scale per output unit;
  at 16 bits as float16 values; at 32 bits as float32. A BatchNorm that reads a conv's output is
  folded into it: g = gamma / sqrt(var + eps) multiplies the output unit's scale (an integer layer:
  per-channel symmetric rounding is invariant under a per-channel factor, so its integers stay, their
  sign flipped where g < 0) or its float weights (rounded to float16 again at 16 bits), and the conv
  gets the bias (b - mean) * g + beta.
- biases in float32; an integer-input layer's input scale (float32) and zero point (int32).
- which entries are stored: `keep`, decided as the op counter decides what it charges sparse
  (torchscope.counter): with a record, a layer with a mask stores its non-zero kept entries plus
  the 1-bit mask; without one, a tensor more than 1/16 exact zeros is stored sparse. Entries not
  stored are zero.

`DeployedNet(graph)` runs a graph in PyTorch with the arithmetic of the checkpoint's modules (the
same input rounding as compress.quant, the same functional ops), except that BatchNorm is folded.
Folding rounds differently from a conv followed by a BatchNorm, so a DeployedNet agrees with its
checkpoint to float rounding, not bit for bit (docs/deploying.md has the measured agreement); what
is exact is everything after the fold: the packed file (deploy.packed) loads back into a DeployedNet
whose outputs equal, bit for bit, those of the DeployedNet it was written from, and the ONNX file
(deploy.onnx_export) holds the same numbers.
"""
import itertools
import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

import compress
from compress import quant
from micronet_cifar100 import errors
from models.heads import NORM_EPS
from torchscope.rules import layer_kind

INT_BITS = compress.INT_BITS
HALF_BITS = 16
FLOAT_BITS = 32
# Without a record, a tensor more than 1/SPARSE_AT zeros is stored sparse (torchscope.counter's rule).
SPARSE_AT = 16
# The axis of a layer's weight that indexes its output units.
OUTPUT_AXIS = {"conv": 0, "linear": 0, "cosine": 1}
# Elementwise kinds: each is one op of the same name.
ELEMENTWISE = ("silu", "sigmoid", "add", "mul")


@dataclass
class Layer:
    """A conv, linear or cosine layer as deployed. `weight`: int32 integers on the grid (2..8 bits),
    or float32 values (float16-exact at 16 bits), in the module's layout ([out, in/g, kh, kw],
    [out, in], the cosine's [in, out]); zero wherever `keep` is False."""
    kind: str
    name: str
    weight_bits: int
    act_bits: int
    weight: torch.Tensor
    scale: object = None          # float32 [out]: integer weights only
    bias: object = None           # float32 [out] or None
    in_scale: object = None       # float32 [1]: integer inputs only
    in_zero_point: object = None  # int32 [1]
    keep: object = None           # bool like weight: the entries stored (sparse); None: dense
    attrs: dict = field(default_factory=dict)
    folded: tuple = ()            # the BatchNorms folded in

    @property
    def int_weights(self):
        return self.weight_bits in INT_BITS

    @property
    def int_inputs(self):
        return self.act_bits in INT_BITS

    @property
    def out_units(self):
        return self.weight.shape[OUTPUT_AXIS[self.kind]]

    def float_weight(self):
        """The weights as the layer multiplies them: integers times their scale, in float32."""
        if not self.int_weights:
            return self.weight
        shape = [1] * self.weight.dim()
        shape[OUTPUT_AXIS[self.kind]] = -1
        return self.weight.to(torch.float32) * self.scale.view(shape)


@dataclass
class Op:
    """One op of the graph: `kind` is "layer" (see `layer`), "affine" (a BatchNorm not after a conv:
    params scale and shift), "silu", "sigmoid", "add", "mul", "global_pool", "avg_pool", "l2norm" or
    "flatten"; `inputs` and `output` are value numbers (0: the model's input)."""
    kind: str
    name: str
    inputs: tuple
    output: int
    attrs: dict = field(default_factory=dict)
    layer: object = None
    params: dict = field(default_factory=dict)


@dataclass
class Graph:
    ops: list
    output: int
    input_size: tuple
    # What was traced: models.describe's dict (model, width_mult, depth_mult, coslinear, num_classes).
    arch: dict

    def layers(self):
        return [op.layer for op in self.ops if op.kind == "layer"]


class _Tracer(fx.Tracer):
    """Every module the op counter costs (it has a layer kind) is one op: a quantised conv stays
    one op with its input quantiser inside."""

    def is_leaf_module(self, m, qualname):
        return layer_kind(m) is not None or super().is_leaf_module(m, qualname)


def trace(model):
    """(fx graph, {name: module}) of `model` in eval mode."""
    was = model.training
    model.eval()
    try:
        g = _Tracer().trace(model)
    except Exception as e:  # fx's own errors name the construct it cannot trace
        raise errors.ConfigError(f"cannot trace {type(model).__name__} for export: {str(e).splitlines()[0]}") \
            from None
    finally:
        model.train(was)
    return g, dict(model.named_modules())


def _bits(module):
    if isinstance(module, quant.Quantised):
        return module.weight_bits, module.act_bits
    return FLOAT_BITS, FLOAT_BITS


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _storage(w, entry):
    """The entries stored (bool like w), or None for dense: the op counter's decision."""
    nonzero = w.detach().ne(0)
    if entry is not None:
        mask = entry.get("mask")
        if mask is None:
            return None
        keep = nonzero & mask.to(w.device).bool()
        return keep if int(keep.sum()) < w.numel() else None
    zeros = w.numel() - int(nonzero.sum())
    return nonzero if zeros * SPARSE_AT > w.numel() else None


def _bn_factor(bn):
    g = bn.weight.detach().float() / torch.sqrt(bn.running_var.float() + bn.eps)
    return g, bn.bias.detach().float() - bn.running_mean.float() * g


def _unit_shape(w, axis):
    shape = [1] * w.dim()
    shape[axis] = -1
    return shape


@torch.no_grad()
def _layer(name, module, kind, bn, entry, pad):
    """The Layer of `module` (followed by the BatchNorm `bn`, or None), with an explicit zero
    padding `pad` (left, right, top, bottom) before it merged into a conv's."""
    wb, ab = _bits(module)
    axis = OUTPUT_AXIS[kind]
    raw = (module.kernel if kind == "cosine" else module.weight).detach().float()
    # The cosine layer's columns are normalised from the weights alone: the deployment stores them so.
    src = F.normalize(raw, dim=0, eps=NORM_EPS) if kind == "cosine" else raw
    keep = _storage(raw, entry)
    g, shift = _bn_factor(bn) if bn is not None else (None, None)
    scale = None
    if wb in INT_BITS:
        # The layer's own rounding and scale (min/max or learned steps): exactly what its forward uses.
        param = module.kernel if kind == "cosine" else module.weight
        rounded = module.quant_weight(src, source=param).detach().float()
        scale_of = getattr(module, "weight_scale_of", None)
        scale = (scale_of(src) if scale_of is not None else quant.weight_scale(src, wb, axis)).detach().float()
        weight = torch.round(rounded / scale.view(_unit_shape(src, axis))).to(torch.int32)
        # What is stored must give back, as integers times scales, the very weights the layer multiplies.
        if int(weight.abs().max()) > 2 ** (wb - 1) - 1 or \
                not torch.equal(weight.float() * scale.view(_unit_shape(src, axis)), rounded):
            raise errors.ConfigError(f"layer {name}: its rounded weights are not integers of {wb} bits times one "
                                     "scale per output unit; this quantiser cannot be deployed")
        if g is not None:
            # q(w * g)_c = g_c * q(w)_c: the integers stay, the sign of g goes into them.
            weight = weight * torch.where(g < 0, -1, 1).to(torch.int32).view(_unit_shape(src, axis))
            scale = scale * g.abs()
    elif wb == HALF_BITS:
        weight = src.to(torch.float16).float()
        if g is not None:
            weight = (weight * g.view(_unit_shape(src, axis))).to(torch.float16).float()
    else:
        weight = src * g.view(_unit_shape(src, axis)) if g is not None else src.clone()
    if keep is not None:
        weight = torch.where(keep, weight, torch.zeros((), dtype=weight.dtype))
    bias = module.bias.detach().float().clone() if getattr(module, "bias", None) is not None else None
    if g is not None:
        bias = (bias if bias is not None else torch.zeros_like(g)) - bn.running_mean.float()
        bias = bias * g + bn.bias.detach().float()
    layer = Layer(kind=kind, name=name, weight_bits=wb, act_bits=ab, weight=weight.contiguous(),
                  scale=scale, bias=bias, keep=keep, folded=(bn._deploy_name,) if bn is not None else ())
    if ab in INT_BITS:
        st = quant.input_state(module)
        layer.in_scale = st["act_scale"].float().reshape(1)
        layer.in_zero_point = st["act_zero_point"].to(torch.int32).reshape(1)
    if kind == "conv":
        ph, pw = _pair(module.padding) if not isinstance(module.padding, str) else (None, None)
        if ph is None:
            raise errors.ConfigError(f"layer {name}: padding {module.padding!r} is not supported for export; "
                                     "give the conv explicit padding")
        left, right, top, bottom = pad or (0, 0, 0, 0)
        layer.attrs = {"stride": _pair(module.stride), "dilation": _pair(module.dilation),
                       "groups": module.groups, "kernel": _pair(module.kernel_size),
                       "pads": (top + ph, left + pw, bottom + ph, right + pw)}
    elif pad:
        raise errors.ConfigError(f"layer {name}: zero padding before a {kind} layer is not supported for export")
    return layer


def _pool_attrs(m):
    if isinstance(m, nn.AdaptiveAvgPool2d):
        if _pair(m.output_size) != (1, 1):
            raise errors.ConfigError(f"adaptive pooling to {m.output_size} is not supported for export "
                                     "(only to 1x1)")
        return "global_pool", {}
    return "avg_pool", {"kernel": _pair(m.kernel_size), "stride": _pair(m.stride or m.kernel_size),
                        "padding": _pair(m.padding), "ceil_mode": bool(m.ceil_mode),
                        "count_include_pad": bool(m.count_include_pad),
                        "divisor_override": m.divisor_override}


def fold(model, record=None, input_size=(3, 32, 32), arch=None):
    """The deployed Graph of `model` (weights loaded, a record already applied): see the module's
    doc. `record`: the compression record the model was given (decides which tensors are stored
    sparse, as the op counter does); `arch`: models.describe(model) when the model is registered."""
    g, modules = trace(model)
    for name, m in modules.items():
        m._deploy_name = name
    entries = record.get("layers", {}) if record is not None else None
    values, pads, producers, ops = {}, {}, {}, []
    pending = []  # [op, module, kind, bn, pad] of layers, built once their BatchNorm is known
    numbers = itertools.count(1)

    def new_value():
        return next(numbers)

    try:
        for node in g.nodes:
            if node.op == "placeholder":
                if values:
                    raise errors.ConfigError("the model takes more than one input: not supported for export")
                values[node] = 0
                continue
            if node.op == "output":
                out = node.args[0]
                if not isinstance(out, fx.Node):
                    raise errors.ConfigError("the model returns more than one tensor: not supported for export")
                output = values[out]
                continue
            ins = [a for a in node.args if isinstance(a, fx.Node)]
            src = [values[a] for a in ins]
            if node.op in ("call_method", "call_function") and node.target in ("flatten", torch.flatten):
                start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
                if start != 1 or (len(node.args) > 2 and node.args[2] != -1):
                    raise errors.ConfigError("only flatten(1) is supported for export")
                values[node] = new_value()
                ops.append(Op("flatten", "flatten", tuple(src), values[node], {"start_dim": 1}))
                continue
            if node.op != "call_module":
                what = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", node.target)
                raise errors.ConfigError(f"{what} written inline in a forward is not supported for export; "
                                         "make it a module with a layer kind (docs/counting.md)")
            name, m = node.target, modules[node.target]
            kind = layer_kind(m)
            if kind == "noop":
                values[node] = src[0]
                if isinstance(m, nn.ZeroPad2d):
                    pads[node] = tuple(m.padding)  # (left, right, top, bottom)
                    if float(m.value) != 0.0:
                        raise errors.ConfigError(f"{name}: padding with {m.value} is not supported for export")
                elif ins and ins[0] in pads:
                    pads[node] = pads[ins[0]]
                continue
            pad = pads.get(ins[0]) if ins else None
            if pad is not None and kind != "conv":
                raise errors.ConfigError(f"{name}: zero padding before a {kind} is not supported for export")
            if kind == "batchnorm":
                prod = producers.get(ins[0])
                if prod is not None and prod[2] == "conv" and prod[3] is None and len(ins[0].users) == 1:
                    prod[3] = m
                    values[node] = values[ins[0]]
                    continue
                values[node] = new_value()
                ops.append(Op("affine", name, tuple(src), values[node], params=dict(zip(("scale", "shift"),
                                                                                        _bn_factor(m)))))
                continue
            values[node] = new_value()
            if kind in ("conv", "linear", "cosine"):
                op = Op("layer", name, tuple(src), values[node])
                ops.append(op)
                item = [op, m, kind, None, pad]
                pending.append(item)
                producers[node] = item
            elif kind in ELEMENTWISE:
                ops.append(Op(kind, name, tuple(src), values[node]))
            elif kind in ("adaptive_avg_pool", "avg_pool"):
                k, attrs = _pool_attrs(m)
                ops.append(Op(k, name, tuple(src), values[node], attrs))
            elif kind == "l2norm":
                ops.append(Op("l2norm", name, tuple(src), values[node], {"dim": m.dim, "eps": m.eps}))
            else:
                raise errors.ConfigError(f"{name} ({type(m).__name__}, kind {kind}) is not supported for export")
        for op, m, kind, bn, pad in pending:
            # With a record, a layer it does not list is stored dense (as the counter charges it).
            entry = entries.get(op.name, {}) if entries is not None else None
            op.layer = _layer(op.name, m, kind, bn, entry, pad)
    finally:
        for m in modules.values():
            m.__dict__.pop("_deploy_name", None)
    return Graph(ops=ops, output=output, input_size=tuple(input_size), arch=dict(arch or {}))


# ------------------------------------------------------------------------ running a graph in torch

def _quant_input(layer, x):
    if layer.int_inputs:
        return quant.round_input(x, layer.in_scale, layer.in_zero_point, 2 ** layer.act_bits - 1)
    if layer.act_bits == HALF_BITS:
        return x.to(torch.float16).to(x.dtype)
    return x


def _run_layer(layer, w, x):
    x = _quant_input(layer, x)
    if layer.kind == "conv":
        top, left, bottom, right = layer.attrs["pads"]
        if (top, left) == (bottom, right):
            padding = (top, left)
        else:
            x, padding = F.pad(x, (left, right, top, bottom)), (0, 0)
        return F.conv2d(x, w, layer.bias, layer.attrs["stride"], padding, layer.attrs["dilation"],
                        layer.attrs["groups"])
    if layer.kind == "linear":
        return F.linear(x, w, layer.bias)
    return (x @ w.to(x.dtype)).clamp(-1.0, 1.0)


def _run(op, w, args):
    k = op.kind
    if k == "layer":
        return _run_layer(op.layer, w, args[0])
    if k == "affine":
        shape = (1, -1) + (1,) * (args[0].dim() - 2)
        return args[0] * op.params["scale"].view(shape) + op.params["shift"].view(shape)
    if k == "silu":
        return F.silu(args[0])
    if k == "sigmoid":
        return torch.sigmoid(args[0])
    if k == "add":
        return operator.add(*args)
    if k == "mul":
        return operator.mul(*args)
    if k == "global_pool":
        return F.adaptive_avg_pool2d(args[0], 1)
    if k == "avg_pool":
        a = op.attrs
        return F.avg_pool2d(args[0], a["kernel"], a["stride"], a["padding"], a["ceil_mode"],
                            a["count_include_pad"], a["divisor_override"])
    if k == "l2norm":
        return F.normalize(args[0], dim=op.attrs["dim"], eps=op.attrs["eps"])
    if k == "flatten":
        return args[0].flatten(op.attrs["start_dim"])
    raise ValueError(f"unknown op kind {k}")


class DeployedNet(nn.Module):
    """A Graph run in PyTorch (eval only). The float weights of integer layers are computed once,
    here, from the integers and scales: a net built from a loaded packed file and one built from the
    fold compute from the same numbers the same way."""

    def __init__(self, graph):
        super().__init__()
        self.graph = graph
        self._weights = [op.layer.float_weight() if op.kind == "layer" else None for op in graph.ops]
        # Each value is dropped after its last reader, so a pass holds no more than it needs.
        self._last_use = {v: i for i, op in enumerate(graph.ops) for v in op.inputs}
        self.eval()

    def forward(self, x):
        values = {0: x}
        for i, op in enumerate(self.graph.ops):
            values[op.output] = _run(op, self._weights[i], [values[v] for v in op.inputs])
            for v in op.inputs:
                if self._last_use[v] == i and v != self.graph.output:
                    values.pop(v, None)
        return values[self.graph.output]


def describe(graph):
    """Counts for a log line: layers, BatchNorms folded, masked layers, widths."""
    layers = graph.layers()
    widths = compress.widths_text([(L.weight_bits, L.act_bits) for L in layers
                                   if (L.weight_bits, L.act_bits) != (FLOAT_BITS, FLOAT_BITS)])
    return {"layers": len(layers), "folded": sum(len(L.folded) for L in layers),
            "sparse": sum(L.keep is not None for L in layers), "widths": widths,
            "ops": len(graph.ops)}
