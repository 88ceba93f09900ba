"""deploy: the deployment the MicroNet score imagines, made real (docs/deploying.md).

    graph = deploy.fold(model, record)          # BatchNorm folded, masks applied, integers and scales
    net = deploy.DeployedNet(graph)             # that graph run in PyTorch
    deploy.packed.write(graph, "model.bin")     # exactly what the score counts, bit for bit
    graph = deploy.packed.read("model.bin")     # ... and back: DeployedNet outputs equal, bit for bit
    deploy.onnx_export.export(graph, "model.onnx")   # QDQ ONNX for ONNX Runtime (needs .[export])
    deploy.runtime.session("model.onnx")        # ONNX Runtime, CPU; deploy.runtime.kernels(path)

Imports torch, numpy, models, data, compress, the checkpoint format's atomic writer, torchscope's
rules and the project's errors; onnx and onnxruntime only when an ONNX function is called.
"""
from . import packed
from .graph import FLOAT_BITS, HALF_BITS, DeployedNet, Graph, Layer, Op, describe, fold

__all__ = ["fold", "DeployedNet", "Graph", "Layer", "Op", "describe", "packed", "FLOAT_BITS", "HALF_BITS"]
