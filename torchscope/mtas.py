"""Maximum transient activation size (MTAS): the most activation bits alive at once during one
forward pass of one sample, in the deployed graph that the micronet rules score.

The organisers named this metric in the appendix of their scoring page
(https://micronet-challenge.github.io/scoring_and_submission.html, "Maximum Transient Activation
Size": "the maximum amount of activations that must be kept around at any point during inference")
and left it out of the 2019 score because no tool computed it. docs/deploying.md gives the
definition used here; in short:

- The ops are the modules the op counter costs (every leaf, and every module with a layer kind,
  torchscope.rules), called in order on one sample. Two of them materialise nothing, as in the
  deployed graph (deploy/, and the counter's micronet rules): a BatchNorm whose input comes straight
  from a conv or linear is folded into it (the folded layer's output is the BatchNorm's), and a
  "noop" kind (Identity, ZeroPad2d, Dropout, Flatten) passes its input on (padding is done inside
  the conv that reads it). Views and reshapes share their tensor.
- Every other op reads its inputs and writes a new output tensor (no op works in place).
- A tensor is live from the op that produces it (the model's input: from the first op) to the last
  op that reads it, both included: the residual input of a block stays live through the whole
  block, and the squeeze-excite input through the gate's branch. A tensor nothing reads (the
  model's output) is live during the op that produces it.
- A tensor is stored at the widest width any of its readers reads it at: a quantised layer reads its
  input at the record's input bits (2..8 on the integer grid, 16 as float16); every other reader (an
  activation, a pool, the residual add, the SE multiply, a layer left at 32 bits) reads float32,
  `float_bits`. A tensor read only by 4-bit layers costs 4 bits an element, one the residual add
  also reads costs 32.
- The live bits of an op are the sum over the tensors live while it runs; MTAS is their maximum.

Imports torch and the standard library only, like the rest of torchscope's core.

    report = torchscope.mtas.mtas(model, input_size=(3, 32, 32), compression=record)
    report.total_bits, report.peak, report.rows   # rows: one per module call, in call order
"""
from dataclasses import asdict, dataclass, field

import torch

from . import rules as layer_rules

# What a reader that is not a quantised layer reads: float32.
FLOAT_BITS = 32
# Kinds that compute nothing in the deployed graph: their output is their input.
PASS_THROUGH = frozenset({"noop"})
# Kinds a BatchNorm folds into when it reads their output directly.
FOLDS_BN = frozenset({"conv", "linear"})


@dataclass
class MtasRow:
    """One module call. `live_bits` is None for a call that materialises nothing (a folded
    BatchNorm, a noop); `output_bits` is the size of the tensor it writes, at its stored width."""
    name: str
    type: str
    kind: object
    output_shape: tuple
    output_bits: object = None
    live_bits: object = None
    note: str = ""


@dataclass
class MtasReport:
    total_bits: int
    # The row at which the total is reached (the first, if several tie).
    peak: str
    rows: list
    input_size: tuple
    float_bits: int
    compressed: bool
    notes: list = field(default_factory=list)

    @property
    def total_bytes(self):
        return self.total_bits / 8

    def to_dict(self):
        return {"mtas_bits": self.total_bits, "mtas_bytes": self.total_bytes, "peak": self.peak,
                "input_size": list(self.input_size), "float_bits": self.float_bits,
                "compressed": self.compressed, "notes": list(self.notes),
                "layers": [dict(asdict(r), output_shape=list(r.output_shape)) for r in self.rows]}


class _Tensor:
    """An activation tensor of the deployed graph: its size per sample, the op that wrote it
    (-1: the model's input) and the (op, width) of each read."""

    def __init__(self, numel, producer):
        self.numel, self.producer, self.reads = numel, producer, []

    def width(self, float_bits):
        return max((w for _, w in self.reads), default=float_bits)

    def last_op(self):
        return max((op for op, _ in self.reads), default=self.producer)


def _tensors(x):
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in _tensors(item)]
    if isinstance(x, dict):
        return [t for item in x.values() for t in _tensors(item)]
    return []


def _key(t):
    # Views share their base's storage: one tensor of the deployed graph. Every tensor of the pass
    # is kept referenced until the end, so no storage is reused within it.
    return t.untyped_storage().data_ptr()


def _read_bits(entry, kind, float_bits):
    """The width a module reads its input at: a quantised layer's input bits below 32, else float."""
    if entry is None or kind not in layer_rules.WEIGHT_ATTR:
        return float_bits
    bits = entry.get("act_bits")
    return bits if isinstance(bits, int) and not isinstance(bits, bool) and bits < 32 else float_bits


def _check(input_size, float_bits, compression):
    if isinstance(float_bits, bool) or not isinstance(float_bits, int) or not 1 <= float_bits <= 64:
        raise ValueError(f"float_bits must be a whole number of bits from 1 to 64, got {float_bits!r}")
    if compression is not None and not isinstance(compression.get("layers") if isinstance(compression, dict)
                                                  else None, dict):
        raise ValueError("compression must be a record with per-layer entries (compress.record)")
    return tuple(int(s) for s in input_size)


def mtas(model, input_size=(3, 32, 32), compression=None, float_bits=FLOAT_BITS):
    """The maximum transient activation size of `model` on one sample of shape `input_size`, in
    bits (see the module's doc). compression: a compression record (compress.record; its "layers" ->
    name -> "act_bits" are read) giving the widths quantised layers read their inputs at; without
    one every activation is `float_bits` wide. Returns an MtasReport; ValueError for a record that
    is not one or a float_bits outside 1..64."""
    input_size = _check(input_size, float_bits, compression)
    entries = compression["layers"] if compression is not None else {}
    names = {m: n for n, m in model.named_modules()}
    calls = []

    def hook(module, args, output):
        calls.append((module, _tensors(args), _tensors(output)))

    handles = [m.register_forward_hook(hook) for m in layer_rules.units(model)]
    try:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
        dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
        gen = torch.Generator().manual_seed(0)  # private: the caller's random stream stays as it was
        x = torch.randn((1, *input_size), generator=gen).to(device=device, dtype=dtype)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                model(x)
        finally:
            model.train(was_training)
    finally:
        for h in handles:
            h.remove()

    tensors = {_key(x): _Tensor(x.numel(), -1)}
    rows, ops, counted, notes = [], [], {}, []
    for module, inputs, outputs in calls:
        kind = layer_rules.layer_kind(module)
        name = names.get(module, type(module).__name__) or "(model)"
        counted[module] = counted.get(module, 0) + 1
        if counted[module] > 1:
            name = f"{name}#{counted[module]}"
        out = outputs[0] if outputs else None
        row = MtasRow(name=name, type=type(module).__name__, kind=kind,
                      output_shape=tuple(out.shape[1:]) if out is not None else ())
        rows.append(row)
        sources = []
        for t in inputs:
            if _key(t) not in tensors:
                # Made by an op no hook sees (inline in a container's forward): live from here on.
                tensors[_key(t)] = _Tensor(t.numel(), len(ops))
                notes.append(f"{name} reads a tensor made inline, not by a module: counted from {name} on")
            sources.append(tensors[_key(t)])
        if out is None:
            row.note = "returns no tensor"
            continue
        if kind in PASS_THROUGH and sources:
            tensors[_key(out)] = sources[0]
            row.note = "passes its input on (no tensor of its own)"
            continue
        producer = ops[sources[0].producer] if sources and sources[0].producer >= 0 else None
        if kind == "batchnorm" and producer is not None and producer[1] in FOLDS_BN and \
                producer[2] is sources[0]:
            tensors[_key(out)] = sources[0]
            row.note = f"folded into {producer[0].name}"
            continue
        if _key(out) in tensors:
            # Written in place: the input's tensor, read once more.
            target = tensors[_key(out)]
            target.reads.append((len(ops), _read_bits(entries.get(names.get(module)), kind, float_bits)))
            ops.append((row, kind, target))
            row.note = "in place"
            continue
        width = _read_bits(entries.get(names.get(module)), kind, float_bits)
        for s in sources:
            s.reads.append((len(ops), width))
        made = tensors[_key(out)] = _Tensor(out[0].numel(), len(ops))
        ops.append((row, kind, made))

    distinct = list({id(t): t for t in tensors.values()}.values())
    total, peak = 0, rows[0].name if rows else ""
    for i, (row, _, made) in enumerate(ops):
        row.output_bits = made.numel * made.width(float_bits)
        row.live_bits = sum(t.numel * t.width(float_bits) for t in distinct
                            if max(t.producer, 0) <= i <= t.last_op())
        if row.live_bits > total:
            total, peak = row.live_bits, row.name
    return MtasReport(total_bits=total, peak=peak, rows=rows, input_size=input_size, float_bits=float_bits,
                      compressed=compression is not None, notes=sorted(set(notes)))
