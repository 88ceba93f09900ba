"""A deployed Graph as an ONNX model (opset 17), for ONNX Runtime and any other ONNX runtime.

    deploy.onnx_export.export(graph, path) -> onnx.ModelProto

Quantised layers are QuantizeLinear/DequantizeLinear pairs (the "QDQ" format) with the trained
numbers: the input of an integer-input layer goes through QuantizeLinear and DequantizeLinear with
its scale and zero point (uint8 storage; below 8 bits a Clip to the grid's range comes first, since
uint8 saturates at 255, not at 2^b - 1), and integer weights are int8 initialisers dequantised per
output unit with their scales (BatchNorm folded into them). A runtime that has integer kernels for
a pattern fuses it; ONNX Runtime's CPU provider fuses DequantizeLinear -> Conv only with a
QuantizeLinear after the conv, and DequantizeLinear -> MatMul without one (docs/deploying.md says what
it did with these models). 16-bit layers round their inputs through float16 (two Casts) and keep
their weights as float16 initialisers, cast to float32: the float16 simulation of compress.quant.
The graph's input is `image` [batch, 3, H, W] (normalised as training and test.py normalise); its
output `cosines` (cosine head) or `logits` [batch, classes].

Needs the optional `onnx` package (`pip install -e .[export]`).
"""
import numpy as np

import data
from engine.checkpoint import write_atomic
from micronet_cifar100 import errors

from . import graph

OPSET = 17
# onnx's IR version for opset 17: runtimes that read opset 17 read it.
IR_VERSION = 8


def require(module):
    """Import an optional export dependency, or a one-line error saying how to install it."""
    try:
        return __import__(module)
    except ImportError:
        # Not a usage error: the environment lacks an optional part (exit 1).
        raise errors.ToolkitError(f"the {module} package is not installed; run `pip install -e .[export]` "
                                  "(onnx and onnxruntime)") from None


class _Builder:
    def __init__(self, onnx):
        self.onnx, self.h = onnx, onnx.helper
        self.nodes, self.inits, self.names = [], [], set()

    def const(self, name, array):
        array = np.ascontiguousarray(array)
        self.inits.append(self.onnx.numpy_helper.from_array(array, name))
        return name

    def node(self, op, inputs, output, name, **attrs):
        self.nodes.append(self.h.make_node(op, inputs, [output], name=name, **attrs))
        return output


def _np(t, dtype=np.float32):
    return t.detach().cpu().numpy().astype(dtype)


def _input(b, L, x):
    """The layer's input as the layer reads it: on its integer grid, through float16, or as it is."""
    if L.int_inputs:
        qmax = 2 ** L.act_bits - 1
        scale = b.const(f"{L.name}.input_scale", _np(L.in_scale).reshape(()))
        zp = b.const(f"{L.name}.input_zero_point", _np(L.in_zero_point, np.uint8).reshape(()))
        if qmax < 255:
            # The grid's ends in float, computed as torch computes them: (q - zp) * scale.
            s, z = L.in_scale.float(), L.in_zero_point.float()
            lo = b.const(f"{L.name}.input_min", _np((0 - z) * s).reshape(()))
            hi = b.const(f"{L.name}.input_max", _np((qmax - z) * s).reshape(()))
            x = b.node("Clip", [x, lo, hi], f"{L.name}.input_clipped", f"{L.name}/clip")
        q = b.node("QuantizeLinear", [x, scale, zp], f"{L.name}.input_q", f"{L.name}/quantize")
        return b.node("DequantizeLinear", [q, scale, zp], f"{L.name}.input_dq", f"{L.name}/dequantize")
    if L.act_bits == graph.HALF_BITS:
        h = b.node("Cast", [x], f"{L.name}.input_fp16", f"{L.name}/to_fp16", to=b.onnx.TensorProto.FLOAT16)
        return b.node("Cast", [h], f"{L.name}.input_rounded", f"{L.name}/from_fp16", to=b.onnx.TensorProto.FLOAT)
    return x


def _weight(b, L, transpose=False):
    """The layer's weights as a float tensor name; `transpose` gives a linear's [in, out]."""
    w, axis = L.weight, graph.OUTPUT_AXIS[L.kind]
    if transpose:
        w, axis = w.t(), 1
    if L.int_weights:
        q = b.const(f"{L.name}.weight_q", _np(w, np.int8))
        s = b.const(f"{L.name}.weight_scale", _np(L.scale))
        z = b.const(f"{L.name}.weight_zero_point", np.zeros(L.out_units, np.int8))
        return b.node("DequantizeLinear", [q, s, z], f"{L.name}.weight", f"{L.name}/weight_dequantize", axis=axis)
    if L.weight_bits == graph.HALF_BITS:
        h = b.const(f"{L.name}.weight_fp16", _np(w, np.float16))
        return b.node("Cast", [h], f"{L.name}.weight", f"{L.name}/weight_cast", to=b.onnx.TensorProto.FLOAT)
    return b.const(f"{L.name}.weight", _np(w))


def _layer(b, L, x, out):
    x = _input(b, L, x)
    if L.kind == "conv":
        ins = [x, _weight(b, L)] + ([b.const(f"{L.name}.bias", _np(L.bias))] if L.bias is not None else [])
        a = L.attrs
        return b.node("Conv", ins, out, f"{L.name}/conv", kernel_shape=list(a["kernel"]), strides=list(a["stride"]),
                      dilations=list(a["dilation"]), group=a["groups"], pads=list(a["pads"]))
    if L.kind == "linear":
        y = b.node("MatMul", [x, _weight(b, L, transpose=True)],
                   out if L.bias is None else f"{L.name}.matmul", f"{L.name}/matmul")
        if L.bias is None:
            return y
        return b.node("Add", [y, b.const(f"{L.name}.bias", _np(L.bias))], out, f"{L.name}/bias")
    y = b.node("MatMul", [x, _weight(b, L)], f"{L.name}.matmul", f"{L.name}/matmul")
    lo, hi = b.const(f"{L.name}.min", np.array(-1.0, np.float32)), b.const(f"{L.name}.max", np.array(1.0, np.float32))
    return b.node("Clip", [y, lo, hi], out, f"{L.name}/clamp")


def _op(b, op, ins, out):
    k, n = op.kind, op.name
    if k == "layer":
        return _layer(b, op.layer, ins[0], out)
    if k == "affine":
        shape = (1, -1, 1, 1)
        s = b.const(f"{n}.scale", _np(op.params["scale"]).reshape(shape))
        t = b.const(f"{n}.shift", _np(op.params["shift"]).reshape(shape))
        return b.node("Add", [b.node("Mul", [ins[0], s], f"{n}.scaled", f"{n}/scale"), t], out, f"{n}/shift")
    if k == "silu":
        sig = b.node("Sigmoid", ins, f"{n}.sigmoid", f"{n}/sigmoid")
        return b.node("Mul", [ins[0], sig], out, f"{n}/mul")
    if k == "sigmoid":
        return b.node("Sigmoid", ins, out, f"{n}/sigmoid")
    if k in ("add", "mul"):
        return b.node(k.capitalize(), ins, out, f"{n}/{k}")
    if k == "global_pool":
        return b.node("GlobalAveragePool", ins, out, f"{n}/pool")
    if k == "avg_pool":
        a = op.attrs
        if a["divisor_override"] is not None:
            raise errors.ConfigError(f"{n}: average pooling with a divisor override has no ONNX equivalent")
        ph, pw = a["padding"]
        return b.node("AveragePool", ins, out, f"{n}/pool", kernel_shape=list(a["kernel"]), strides=list(a["stride"]),
                      pads=[ph, pw, ph, pw], ceil_mode=int(a["ceil_mode"]),
                      count_include_pad=int(a["count_include_pad"]))
    if k == "l2norm":
        norm = b.node("ReduceL2", ins, f"{n}.norm", f"{n}/norm", axes=[op.attrs["dim"]], keepdims=1)
        eps = b.const(f"{n}.eps", np.array(op.attrs["eps"], np.float32))
        floor = b.node("Max", [norm, eps], f"{n}.norm_clamped", f"{n}/clamp")
        return b.node("Div", [ins[0], floor], out, f"{n}/div")
    if k == "flatten":
        return b.node("Flatten", ins, out, f"{n}/flatten", axis=op.attrs["start_dim"])
    raise errors.ConfigError(f"{n}: op {k} has no ONNX export")


def build(graph):
    """The onnx.ModelProto of a Graph."""
    onnx = require("onnx")
    b = _Builder(onnx)
    arch = graph.arch
    out_name = "cosines" if arch.get("coslinear", True) else "logits"
    names = {0: "image"}
    for i, op in enumerate(graph.ops):
        names[op.output] = out_name if op.output == graph.output else f"{op.name}.out"
        _op(b, op, [names[v] for v in op.inputs], names[op.output])
    if graph.output not in names or graph.output == 0:
        raise errors.ConfigError("the model returns its input unchanged: nothing to export")
    c, h, w = graph.input_size
    classes = arch.get("num_classes")
    g = onnx.helper.make_graph(
        b.nodes, arch.get("model", "model"),
        [onnx.helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, ["batch", c, h, w])],
        [onnx.helper.make_tensor_value_info(out_name, onnx.TensorProto.FLOAT, ["batch", classes])],
        initializer=b.inits)
    model = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", OPSET)],
                                   producer_name="micronet-cifar100 export.py")
    model.ir_version = IR_VERSION
    desc = ", ".join(f"{k}={v}" for k, v in sorted(arch.items()))
    onnx.helper.set_model_props(model, {"architecture": desc, "input": f"RGB in [0, 1], minus mean "
                                        f"{tuple(data.MEAN)}, divided by std {tuple(data.STD)}"})
    onnx.checker.check_model(model)
    return model


def export(graph, path):
    """Write the Graph to `path` as ONNX; returns the ModelProto."""
    model = build(graph)
    write_atomic(str(path), lambda f: f.write(model.SerializeToString()))
    return model
