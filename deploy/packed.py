"""The packed file: what the MicroNet score counts as a model's parameters, and nothing more.

    deploy.packed.write(graph, path) -> {"bytes", "header_bytes", "body_bits", ...}
    graph = deploy.packed.read(path)          # a Graph; deploy.DeployedNet(graph) runs it

Layout (docs/deploying.md):

    header: b"MCNP" | version (1 byte) | header length (4 bytes, little-endian) | JSON | per layer 2 bytes
    body:   one bit stream, most significant bit first, padded with zeros to a whole byte at the end

The JSON names the architecture (models.describe's dict: model, width and depth multipliers, head,
classes) and the input size; the loader rebuilds the graph's structure from it (deploy.graph.fold on
a fresh model of that architecture: which BatchNorms fold, the order of the layers). Each layer's
2 bytes give its weight bits (6 bits), its input bits (6 bits) and whether its weights are stored
sparse (1 bit).

The body holds, for each op in graph order, exactly what the op counter charges it (micronet rules,
torchscope.counter), at those widths:
- a layer: if sparse, its 1-bit mask over every weight entry (1 = stored); then its stored weights
  in the layout's row-major order, each at the layer's width (2..8: two's complement integers; 16:
  float16; 32: float32); then, for integer weights, one float32 scale per output unit; then its
  float32 bias (the conv's own, or the one a folded BatchNorm leaves); then, for integer inputs, the
  input's float32 scale and int32 zero point;
- a BatchNorm that is not folded: float32 scale and shift per channel.
So the body's size is the score's parameter bits (the micronet rules' params32 x 32, count.py's
"score_params_32bit" x 32) to the bit, plus at most 7 bits of padding.
"""
import json
import struct

import numpy as np
import torch

import models
from engine.checkpoint import write_atomic
from micronet_cifar100 import errors

from . import graph

MAGIC = b"MCNP"
VERSION = 1
_CHUNK = 1 << 18


class BitWriter:
    """Values of any width from 1 to 64 bits, appended most significant bit first."""

    def __init__(self):
        self.parts, self.tail, self.bits = [], np.zeros(0, np.uint8), 0

    def write(self, values, width):
        v = np.ascontiguousarray(np.asarray(values, dtype=np.uint64).ravel())
        for i in range(0, len(v), _CHUNK):
            chunk = v[i:i + _CHUNK]
            bits = np.unpackbits(chunk.astype(">u8").view(np.uint8)).reshape(-1, 64)[:, 64 - width:].ravel()
            bits = np.concatenate([self.tail, bits])
            whole = len(bits) // 8 * 8
            self.parts.append(np.packbits(bits[:whole]).tobytes())
            self.tail = bits[whole:]
        self.bits += len(v) * width

    def getvalue(self):
        return b"".join(self.parts) + (np.packbits(self.tail).tobytes() if len(self.tail) else b"")


class BitReader:
    def __init__(self, data, what):
        self.data, self.pos, self.what = np.frombuffer(data, dtype=np.uint8), 0, what

    def read(self, n, width):
        out = np.empty(n, dtype=np.uint64)
        for i in range(0, n, _CHUNK):
            k = min(_CHUNK, n - i)
            start, stop = self.pos // 8, -(-(self.pos + k * width) // 8)
            if stop > len(self.data):
                raise errors.CheckpointError(f"{self.what} is truncated: its body ends before its last layer; "
                                             "write it again with export.py")
            bits = np.unpackbits(self.data[start:stop])[self.pos % 8:self.pos % 8 + k * width].reshape(k, width)
            wide = np.zeros((k, 64), np.uint8)
            wide[:, 64 - width:] = bits
            out[i:i + k] = np.packbits(wide, axis=1).view(">u8").ravel()
            self.pos += k * width
        return out


def _float_bits(t, bits):
    if bits == 32:
        return t.detach().to(torch.float32).contiguous().numpy().view(np.uint32)
    return t.detach().to(torch.float16).contiguous().numpy().view(np.uint16)


def _from_float_bits(v, bits):
    if bits == 32:
        return torch.from_numpy(v.astype(np.uint32).view(np.float32).copy())
    return torch.from_numpy(v.astype(np.uint16).view(np.float16).copy()).float()


def _code(layer):
    for b in (layer.weight_bits, layer.act_bits):
        if not 1 <= b < 64:
            raise errors.ConfigError(f"layer {layer.name}: {b} bits cannot be packed")
    return (layer.weight_bits << 10) | (layer.act_bits << 4) | (1 if layer.keep is not None else 0)


def _decode(code):
    return code >> 10, (code >> 4) & 63, bool(code & 1)


def _write_layer(w, L):
    flat = L.weight.reshape(-1)
    if L.keep is not None:
        keep = L.keep.reshape(-1)
        w.write(keep.numpy().astype(np.uint64), 1)
        flat = flat[keep]
    if L.int_weights:
        w.write(flat.to(torch.int64).numpy().astype(np.uint64) & np.uint64((1 << L.weight_bits) - 1),
                L.weight_bits)
        w.write(_float_bits(L.scale, 32), 32)
    else:
        w.write(_float_bits(flat, L.weight_bits), L.weight_bits)
    if L.bias is not None:
        w.write(_float_bits(L.bias, 32), 32)
    if L.int_inputs:
        w.write(_float_bits(L.in_scale, 32), 32)
        w.write(L.in_zero_point.to(torch.int64).numpy().astype(np.uint64) & np.uint64(0xFFFFFFFF), 32)


def _read_layer(r, L, wbits, abits, sparse):
    """Fill Layer `L` (its structure from a fresh fold) with the file's numbers."""
    shape, n = L.weight.shape, L.weight.numel()
    keep = torch.from_numpy(r.read(n, 1).astype(bool)).reshape(shape) if sparse else None
    stored = int(keep.sum()) if sparse else n
    L.weight_bits, L.act_bits, L.keep = wbits, abits, keep
    if wbits in graph.INT_BITS:
        raw = r.read(stored, wbits).astype(np.int64)
        raw = np.where(raw >= 1 << (wbits - 1), raw - (1 << wbits), raw)
        values = torch.from_numpy(raw).to(torch.int32)
        L.scale = _from_float_bits(r.read(L.out_units, 32), 32)
        dtype = torch.int32
    else:
        values = _from_float_bits(r.read(stored, wbits), wbits)
        L.scale = None
        dtype = torch.float32
    weight = torch.zeros(n, dtype=dtype)
    if sparse:
        weight[keep.reshape(-1)] = values
    else:
        weight = values
    L.weight = weight.reshape(shape).contiguous()
    if L.bias is not None:
        L.bias = _from_float_bits(r.read(L.out_units, 32), 32)
    if abits in graph.INT_BITS:
        L.in_scale = _from_float_bits(r.read(1, 32), 32)
        zp = r.read(1, 32).astype(np.int64)
        L.in_zero_point = torch.from_numpy(np.where(zp >= 1 << 31, zp - (1 << 32), zp)).to(torch.int32)
    else:
        L.in_scale = L.in_zero_point = None


def body(graph):
    """(body bytes, body bits) of a Graph."""
    w = BitWriter()
    for op in graph.ops:
        if op.kind == "layer":
            _write_layer(w, op.layer)
        elif op.kind == "affine":
            w.write(_float_bits(op.params["scale"], 32), 32)
            w.write(_float_bits(op.params["shift"], 32), 32)
    return w.getvalue(), w.bits


def header(graph):
    if not graph.arch.get("model"):
        raise errors.ConfigError("the packed format needs a registered model's architecture (models.describe)")
    meta = json.dumps({"arch": graph.arch, "input_size": list(graph.input_size)}, separators=(",", ":"),
                      sort_keys=True).encode()
    layers = graph.layers()
    codes = struct.pack(f"<{len(layers)}H", *(_code(L) for L in layers))
    head = MAGIC + bytes([VERSION]) + struct.pack("<I", len(meta)) + meta + struct.pack("<H", len(layers)) + codes
    return head


def write(graph, path):
    """Write `graph` packed to `path`; returns its sizes."""
    head = header(graph)
    data, bits = body(graph)
    # Atomic (a temporary file renamed into place): a failed write leaves no half file; StorageError.
    write_atomic(str(path), lambda f: f.write(head + data))
    return {"bytes": len(head) + len(data), "header_bytes": len(head), "body_bytes": len(data), "body_bits": bits}


def _structure(arch, input_size):
    """A Graph of the architecture with placeholder numbers: the loader's skeleton."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = models.create(arch["model"], head=models.head_name(arch.get("coslinear", True)),
                            num_classes=arch.get("num_classes", 100), width_mult=arch.get("width_mult"),
                            depth_mult=arch.get("depth_mult"), input_size=input_size[1])
    return graph.fold(net, None, input_size, arch=models.describe(net))


def read(path):
    """The Graph stored in a packed file; CheckpointError with one line for a file that is not one."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise errors.CheckpointError(f"packed file {path} does not exist") from None
    except OSError as e:
        raise errors.CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    if data[:4] != MAGIC or len(data) < 11:
        raise errors.CheckpointError(f"{path} is not a packed model file (export.py writes them)")
    if data[4] != VERSION:
        raise errors.CheckpointError(f"{path} is packed format version {data[4]}; this toolkit reads version {VERSION}")
    (n,) = struct.unpack_from("<I", data, 5)
    try:
        meta = json.loads(data[9:9 + n].decode())
        (count,) = struct.unpack_from("<H", data, 9 + n)
        codes = struct.unpack_from(f"<{count}H", data, 11 + n)
    except (ValueError, struct.error):
        raise errors.CheckpointError(f"{path} has a damaged header; write it again with export.py") from None
    arch, input_size = meta.get("arch", {}), tuple(meta.get("input_size", (3, 32, 32)))
    if arch.get("model") not in models.names():
        raise errors.CheckpointError(f"{path} holds a {arch.get('model')!r}, which this toolkit does not know; "
                                     f"known models: {', '.join(models.names())}")
    g = _structure(arch, input_size)
    layers = g.layers()
    if len(layers) != count:
        raise errors.CheckpointError(f"{path} has {count} layers where {models.label(arch)} has {len(layers)}")
    r = BitReader(data[11 + n + 2 * count:], path)
    it = iter(zip(layers, codes))
    for op in g.ops:
        if op.kind == "layer":
            L, code = next(it)
            _read_layer(r, L, *_decode(code))
        elif op.kind == "affine":
            c = op.params["scale"].numel()
            op.params = {"scale": _from_float_bits(r.read(c, 32), 32), "shift": _from_float_bits(r.read(c, 32), 32)}
    if -(-r.pos // 8) != len(r.data):
        raise errors.CheckpointError(f"{path} has {len(r.data) - -(-r.pos // 8)} bytes after its last layer: "
                                     "not a file export.py wrote")
    return g
