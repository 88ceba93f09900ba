"""Running an exported ONNX file with ONNX Runtime (CPU), and what ONNX Runtime made of it.

    sess = deploy.runtime.session(path, threads=1)
    deploy.runtime.run(sess, images)          # numpy float32 outputs, in batches
    deploy.runtime.kernels(path)              # the op types ONNX Runtime runs, integer ones apart

Needs the optional `onnxruntime` package (`pip install -e .[export]`).
"""
import collections
import os
import tempfile

import numpy as np

from .onnx_export import require

# ONNX Runtime ops that compute on integers (the QDQ fusions of its CPU provider, and the
# integer ops of the ONNX standard).
INTEGER_OPS = frozenset({"QLinearConv", "QLinearMatMul", "MatMulIntegerToFloat", "ConvInteger", "MatMulInteger",
                         "QGemm", "QLinearAdd", "QLinearMul", "QLinearSigmoid", "QLinearGlobalAveragePool",
                         "QLinearAveragePool", "DynamicQuantizeMatMul", "MatMulNBits", "QLinearLeakyRelu",
                         "QLinearSoftmax", "QLinearConcat"})
# The ops that do a layer's arithmetic in float: where a quantised layer was not fused.
FLOAT_LAYER_OPS = frozenset({"Conv", "FusedConv", "MatMul", "Gemm", "FusedMatMul", "FusedGemm"})


def _options(ort, threads, optimized=None):
    so = ort.SessionOptions()
    # Warnings about serialising an optimised model for this machine only are not for users.
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if optimized:
        so.optimized_model_filepath = optimized
    return so


def session(path, threads=None):
    """An ONNX Runtime CPU session of `path` at the default (full) graph optimisation."""
    ort = require("onnxruntime")
    return ort.InferenceSession(path, _options(ort, threads), providers=["CPUExecutionProvider"])


def run(sess, images, batch_size=500):
    """Outputs of `sess` on `images` (a float32 array or tensor [N, C, H, W]), batch by batch."""
    x = images.detach().float().contiguous().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    name = sess.get_inputs()[0].name
    outs = [sess.run(None, {name: x[i:i + batch_size]})[0] for i in range(0, len(x), batch_size)]
    return np.concatenate(outs) if outs else np.zeros((0,), np.float32)


def kernels(path):
    """What ONNX Runtime's CPU provider runs for `path` after its graph optimisations:
    {"version", "integer": {op type: [node names]}, "float_layers": {op type: [node names]}, "ops": {op type: n}}."""
    ort = require("onnxruntime")
    onnx = require("onnx")
    with tempfile.TemporaryDirectory() as tmp:
        optimized = os.path.join(tmp, "optimized.onnx")
        ort.InferenceSession(path, _options(ort, 1, optimized), providers=["CPUExecutionProvider"])
        model = onnx.load(optimized)
    integer, float_layers = collections.defaultdict(list), collections.defaultdict(list)
    for n in model.graph.node:
        if n.op_type in INTEGER_OPS:
            integer[n.op_type].append(n.name)
        elif n.op_type in FLOAT_LAYER_OPS:
            float_layers[n.op_type].append(n.name)
    return {"version": ort.__version__, "integer": dict(integer), "float_layers": dict(float_layers),
            "ops": dict(collections.Counter(n.op_type for n in model.graph.node))}


def layer_of(node_name, layer_names):
    """The layer a (possibly fused and renamed) node came from: the longest layer name it starts with."""
    best = None
    for name in layer_names:
        if node_name.startswith(name + "/") or node_name.startswith(name + ".") or node_name == name:
            if best is None or len(name) > len(best):
                best = name
    return best
