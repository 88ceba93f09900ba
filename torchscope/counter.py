"""Count parameters, operations and memory of a model with forward hooks on its modules.

One random batch of BATCH samples runs through the model in eval mode; every figure is per
sample. Every leaf module, and every module with a layer kind (its children are then part of it,
as a quantised conv's input quantiser is), is costed by its kind (rules.layer_kind: its torch type,
or the `layer_kind` it declares) under the chosen rule set (rules.py); docs/counting.md gives the
conventions and the reference figures. Imports nothing but torch and the standard library.

Under the micronet rules a compression record (compress.record's plain dict; only its
"layers" -> name -> "weight_bits" / "act_bits" / "mask" are read) gives each conv, linear and cosine
layer its bit widths and its mask. A weight tensor is stored sparse, and then its ops shrink by its
sparsity, when the record gives it a mask with pruned entries; without a record, when more than
1/16 of its entries are exact zeros (the 1-bit mask then pays for itself even at 16 bits). Any
other tensor is dense: it pays for every entry and gets no op credit for its zeros.
"""
import math
from dataclasses import asdict, dataclass, field

import torch

from . import rules as layer_rules
from . import score as scoring

# The original ran a batch of 2 so that BatchNorm sees more than one value per channel; its
# memory lines (below) depend on that batch size.
BATCH = 2
MiB = 1024 ** 2


@dataclass
class Row:
    name: str
    type: str
    output_shape: tuple
    # Parameters this module holds itself (counted on its first call only).
    params: int = 0
    flops: int = 0
    mults: int = 0
    adds: int = 0
    macs: int = 0
    # Elements this module materialises per sample, for the "Forward/backward pass size" line.
    activations: int = 0
    # Parameters as the score counts them, in 32-bit units (bits / 32), with unquantised values at
    # 32 and at 16 bits (the fp16 freebie); sparse-aware and bit-aware under micronet.
    params32: float = 0.0
    params16: float = 0.0
    # Micronet rules, conv/linear/cosine rows: the layer's weight and input bit widths from the
    # compression record (None: not quantised, counted at the score's default width), and the
    # sparsity of its weights when they are counted sparse (0.0 when stored dense).
    weight_bits: object = None
    act_bits: object = None
    sparsity: float = 0.0
    # Quantisation parameters (micronet rules), 32-bit values, included in params32/params16: a
    # scale per output channel of integer weights, a scale and a zero point of integer inputs.
    qparams: int = 0
    # The multiplies an integer layer adds in deployment, charged at the score's default width:
    # one per input element to quantise it (x / scale; the zero point folds into the bias), and
    # one per output element to rescale the int32 accumulator (weight scale x input scale, with a
    # folded BatchNorm's gamma / sigma in it).
    scale_mults: int = 0
    # Every row is a leaf module's call (ops inline in a container's forward are leaf modules of
    # kind "add"/"mul"); kept for readers of the JSON's layer rows.
    leaf: bool = True

    def madds(self, mul_factor):
        return mul_factor * self.mults + self.adds


@dataclass
class Report:
    rules: str
    input_size: tuple
    mul_factor: float
    rows: list
    total_params: int
    trainable_params: int
    # Parameters not held as a module's `.weight`/`.bias`: the original's torchsummary-style
    # count filed these (the 200x100 cosine matrix) as "non-trainable".
    legacy_nontrainable: int
    uncounted: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    # Parameters of modules that never ran: in total_params, and dense in params32/params16.
    idle_params: int = 0
    # Weight tensors counted sparse (micronet rules): name -> (non-zeros, numel).
    sparse: dict = field(default_factory=dict)
    # Whether a compression record was applied (micronet rules).
    compressed: bool = False
    # Layers the compression record quantises below 16 bits (under either rule set): the rules
    # then allow no 16-bit freebie.
    low_bit_layers: list = field(default_factory=list)
    # Flip test-time augmentation counted: every layer runs twice, then the two outputs are averaged.
    tta: bool = False

    def _sum(self, attr):
        return sum(getattr(r, attr) for r in self.rows)

    @property
    def non_trainable_params(self):
        return self.total_params - self.trainable_params

    # Totals over the rows.
    flops = property(lambda self: self._sum("flops"))
    mults = property(lambda self: self._sum("mults"))
    adds = property(lambda self: self._sum("adds"))
    macs = property(lambda self: self._sum("macs"))
    scale_mults = property(lambda self: self._sum("scale_mults"))
    qparams = property(lambda self: self._sum("qparams"))
    activations = property(lambda self: self._sum("activations"))

    @property
    def params32(self):
        return self._sum("params32") + self.idle_params

    @property
    def params16(self):
        return self._sum("params16") + 0.5 * self.idle_params

    def madds(self, mul_factor=None):
        """mf * multiplies + adds; the original entry's "Total Madds" at its mul_factor."""
        mf = self.mul_factor if mul_factor is None else mul_factor
        return mf * self.mults + self.adds

    def memory(self):
        """The original entry's memory lines, in its own conventions (sizes in MB = 2**20, GB = 1e9).

        Derived by matching the original entry's README (UCI/Qualcomm, 2019) for efficientnet_ex
        (0.01 / 42.61 / 2.66 / 45.28; docs/counting.md):
        the original counted *elements*, not bytes (no x4 for float32), over its batch of 2:
        - input      = BATCH * C*H*W / 2**20                  (0.00586 -> "0.01")
        - fwd/bwd    = 2 ("for gradients") * BATCH * sum over every leaf module of its output
                       numel per sample / 2**20. Each conv unit of the original began with a
                       ZeroPad2d whose padded output counted; ours folds symmetric padding into
                       the conv, so the Identity in that slot counts the padded size. The
                       original's leaves did not include the residual add or the SE multiply
                       (kinds "add"/"mul"), so those outputs are not counted here.
                       ex: 11,170,808 elements per sample -> 42.61
        - params     = parameter count / 2**20                 (no x4 either: 2.66)
        - total      = input + fwd/bwd + params                (45.2827 -> "45.28"; with an input
                       line of 4 bytes x 1 sample (0.0117) the sum would print 45.29)
        - FLOPs, Madds in GB = count / 1e9 (0.25, 0.38 and 0.51 in the README).
        The factors 2 x BATCH happen to equal 4 bytes per float32 sample, so the fwd/bwd line
        also reads as "float32 bytes of one sample's activations".
        """
        input_mb = BATCH * math.prod(self.input_size) / MiB
        fwd_bwd_mb = 2 * BATCH * self.activations / MiB
        params_mb = self.total_params / MiB
        return {
            "input_mb": input_mb,
            "forward_backward_mb": fwd_bwd_mb,
            "params_mb": params_mb,
            "total_mb": input_mb + fwd_bwd_mb + params_mb,
            "flops_gb": self.flops / 1e9,
            "madds_gb": self.madds() / 1e9,
        }

    def scores(self):
        return scoring.scores(self)

    def score(self):
        """The one score the rules allow for this model (score.allowed)."""
        return scoring.allowed(self)

    def to_dict(self):
        return {
            "rules": self.rules,
            "input_size": list(self.input_size),
            "mul_factor": self.mul_factor,
            "batch_for_counting": BATCH,
            "per_sample": True,
            "total_params": self.total_params,
            "trainable_params": self.trainable_params,
            "non_trainable_params": self.non_trainable_params,
            "legacy_nontrainable_params": self.legacy_nontrainable,
            "flops": self.flops,
            "mults": self.mults,
            "adds": self.adds,
            "macs": self.macs,
            "madds": self.madds(),
            "madds_mf_0.5": self.madds(0.5),
            "madds_mf_1": self.madds(1.0),
            "score_params_32bit": self.params32,
            "score_params_16bit": self.params16,
            "memory": self.memory(),
            **_score_fields(self),
            "sparse_weights": {k: {"nonzero": nz, "numel": n} for k, (nz, n) in self.sparse.items()},
            "add_bits": scoring.ADD_BITS,
            "compressed": self.compressed,
            "low_bit_layers": list(self.low_bit_layers),
            "tta": self.tta,
            "scale_mults": self.scale_mults,
            "quantisation_params": self.qparams,
            "uncounted": [list(u) for u in self.uncounted],
            "notes": list(self.notes),
            "layers": [dict(asdict(r), output_shape=list(r.output_shape),
                            madds=r.madds(self.mul_factor)) for r in self.rows],
        }


def _score_fields(report):
    """The JSON's score: the allowed figure on top, and under "scores" the conventions the rules
    allow this model (a quantised model's freebie figure is left out: it is not a score)."""
    allowed = report.score()
    conventions = report.scores()
    if not allowed["freebie_allowed"]:
        conventions = {k: v for k, v in conventions.items() if k != "freebie"}
    return {"score": allowed["score"], "score_convention": allowed["convention"],
            "score_rule": allowed["rule"], "freebie_allowed": allowed["freebie_allowed"], "scores": conventions}


def _first_tensor(x):
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (list, tuple)):
        for item in x:
            t = _first_tensor(item)
            if t is not None:
                return t
    return None


def _tensor_bits(n, nonzero, sparse, bits):
    """Bits to store a tensor of n entries at `bits` each: dense n * bits; sparse, its non-zeros
    plus a 1-bit mask over every entry (the organisers' get_sparse_size)."""
    return nonzero * bits + n if sparse else n * bits


def charged_bits(bits):
    """The width a record's bits are charged at: None (the score's default width: 16 with the
    freebie, 32 without) for a layer left in float32, whether the record says None or 32."""
    return None if bits is None or bits >= 32 else bits


def on_integer_grid(bits):
    """Widths below 16 are integer grids, which need scales; 16 is float16 and needs none."""
    return bits is not None and bits < scoring.FREEBIE_BITS


# Without a record, a weight tensor is stored sparse when more than 1/SPARSE_AT of it is exact zeros:
# then nz * 16 + n < 16 * n, the mask pays for itself at 16 bits (and at 32).
SPARSE_AT = 16


class _Counter:
    def __init__(self, model, rules, compression=None):
        self.model = model
        self.rules = rules
        self.table = layer_rules.RULESETS[rules]
        self.names = {m: n for n, m in model.named_modules()}
        self.micronet = rules == "micronet"
        # name -> record entry; None: no record (exact zeros decide what is sparse).
        self.entries = compression["layers"] if (compression is not None and self.micronet) else None
        self.storage = {}
        self.calls = {}
        self.rows = []
        self.seen_params = set()
        self.uncounted = []
        self.sparse = {}
        # Rows (by id) of BatchNorms folded into a conv, and of convs given a bias by a fold.
        self.folded, self.gained_bias = set(), set()
        # Convs whose folded bias is already counted as parameters.
        self.bias_stored = set()
        # Output tensor id -> (row, module, kind, tensor) for conv/linear/identity outputs.
        # Holding the tensor keeps its id from being reused during the pass.
        self.producers = {}

    def _new_row(self, module, out):
        name = self.names.get(module, type(module).__name__) or "(model)"
        k = self.calls[module] = self.calls.get(module, 0) + 1
        if k > 1:
            name = f"{name}#{k}"
        return Row(name=name, type=type(module).__name__, output_shape=tuple(out.shape[1:]))

    def _entry(self, module):
        if self.entries is None:
            return None
        return self.entries.get(self.names.get(module, ""))

    def _storage(self, module, p):
        """(non-zeros, sparse?) of a weight tensor (2+ dims) under the micronet rules."""
        key = id(p)
        if key not in self.storage:
            n = p.numel()
            if self.entries is not None:
                entry = self._entry(module)
                mask = entry.get("mask") if entry else None
                if mask is None:
                    self.storage[key] = (n, False)
                else:
                    nz = int((p.detach().ne(0) & mask.to(p.device)).sum())
                    self.storage[key] = (nz, nz < n)
            else:
                nz = int(p.detach().ne(0).sum())
                self.storage[key] = (nz, (n - nz) * SPARSE_AT > n)
        return self.storage[key]

    def _layer_weight(self, module, kind):
        """(non-zeros if counted sparse else None, the weight tensor) of a conv/linear/cosine."""
        attr = layer_rules.WEIGHT_ATTR.get(kind)
        w = getattr(module, attr, None) if attr else None
        if not self.micronet or not isinstance(w, torch.Tensor) or w.dim() < 2:
            return None, w
        nz, sparse = self._storage(module, w)
        return (nz if sparse else None), w

    def _own_params(self, module, row):
        entry = self._entry(module)
        wbits = charged_bits(entry.get("weight_bits")) if entry else None
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in self.seen_params:
                continue
            self.seen_params.add(id(p))
            n = p.numel()
            row.params += n
            if id(row) in self.folded:
                # Folded away: its scale and shift live on in the conv's weights and bias.
                continue
            if not self.micronet:
                row.params32 += n
                row.params16 += 0.5 * n
                continue
            nz, sparse = self._storage(module, p) if p.dim() >= 2 else (n, False)
            # Only a layer's weights are quantised; biases stay at the default width.
            qbits = wbits if p.dim() >= 2 else None
            row.params32 += _tensor_bits(n, nz, sparse, qbits or 32) / 32
            row.params16 += _tensor_bits(n, nz, sparse, qbits or 16) / 32
            if sparse:
                self.sparse[f"{self.names.get(module, '')}.{pname}".lstrip(".")] = (nz, n)

    def leaf_hook(self, module, inputs, output):
        kind, rule = layer_rules.find_rule(self.table, module)
        if rule is layer_rules.UNSEEN:
            return
        x, out = _first_tensor(inputs), _first_tensor(output)
        if out is None:
            return
        self._check_batch(module, out)
        row = self._new_row(module, out)
        in_shape = tuple(x.shape[1:]) if x is not None else ()
        row.activations = 0 if kind in layer_rules.INLINE_KINDS else out[0].numel()

        if kind == "batchnorm" and self.rules == "micronet":
            prod = self.producers.get(id(x)) if x is not None else None
            if prod is not None and prod[3] is x and prod[2] in ("conv", "linear"):
                self._fold_bn(prod, row, out)

        if id(row) not in self.folded:
            if rule is None:
                self.uncounted.append((row.name, row.type))
            elif self.micronet and kind in layer_rules.WEIGHT_ATTR:
                nonzero, w = self._layer_weight(module, kind)
                self._apply(row, rule(module, in_shape, tuple(out.shape[1:]), nonzero=nonzero))
                entry = self._entry(module)
                if entry:
                    row.weight_bits = charged_bits(entry.get("weight_bits"))
                    row.act_bits = charged_bits(entry.get("act_bits"))
                    self._quantisation_costs(module, kind, row, w, x, out)
                if nonzero is not None:
                    row.sparsity = 1.0 - nonzero / w.numel()
            else:
                self._apply(row, rule(module, in_shape, tuple(out.shape[1:])))

        if kind == "conv":
            self._materialised_padding(module, x)
        if kind in ("conv", "linear") or isinstance(module, torch.nn.Identity):
            self.producers[id(out)] = (row, module, kind, out)
        self._own_params(module, row)
        self.rows.append(row)

    def _quantisation_costs(self, module, kind, row, w, x, out):
        """What an integer layer needs beyond its products (Row.qparams, Row.scale_mults): its input
        quantised (a scale and a zero point; one multiply per input element), its weights' scales
        (one per output channel), and its int32 accumulator rescaled (one multiply per output)."""
        int_w, int_a = on_integer_grid(row.weight_bits), on_integer_grid(row.act_bits)
        first_call = self.calls[module] == 1
        qparams = 0
        if int_w:
            qparams += w.shape[layer_rules.OUTPUT_AXIS[kind]]
        if int_a:
            qparams += 2
            row.scale_mults += x[0].numel()
        if int_w or int_a:
            row.scale_mults += out[0].numel()
        if first_call:
            row.qparams += qparams
            row.params32 += qparams
            row.params16 += qparams

    def _fold_bn(self, prod, bn_row, out):
        conv_row, conv, _, _ = prod
        self.folded.add(id(bn_row))
        if conv.bias is None and id(conv_row) not in self.gained_bias:
            # The fold leaves the conv a bias: one add per output at each call, and C_out
            # parameters once (a second call, as in flip TTA, stores nothing new).
            conv_row.adds += out[0].numel()
            self.gained_bias.add(id(conv_row))
            if conv not in self.bias_stored:
                conv_row.params32 += out.shape[1]
                conv_row.params16 += 0.5 * out.shape[1]
                self.bias_stored.add(conv)

    def _materialised_padding(self, conv, x):
        # The original padded in a separate ZeroPad2d before every conv; where ours pads inside
        # the conv, the Identity that stands in the pad's slot gets the padded size for the
        # memory line.
        ph, pw = conv.padding if isinstance(conv.padding, tuple) else (0, 0)
        if not (ph or pw) or x is None:
            return
        prod = self.producers.get(id(x))
        if prod is not None and prod[3] is x and isinstance(prod[1], torch.nn.Identity):
            c, h, w = x.shape[1:]
            prod[0].activations = c * (h + 2 * ph) * (w + 2 * pw)

    @staticmethod
    def _apply(row, cost):
        row.flops += cost.flops
        row.mults += cost.mults
        row.adds += cost.adds
        row.macs += cost.macs

    @staticmethod
    def _check_batch(module, out):
        if out.dim() == 0 or out.shape[0] != BATCH:
            raise ValueError(f"{type(module).__name__} returned shape {tuple(out.shape)}: the counter "
                             f"needs the batch dimension ({BATCH}) first to give per-sample figures")


def _check_compression(model, compression):
    layers = compression.get("layers") if isinstance(compression, dict) else None
    if not isinstance(layers, dict):
        raise ValueError("compression must be a record with per-layer entries (compress.record)")
    modules = dict(model.named_modules())
    for name, entry in layers.items():
        m = modules.get(name)
        if m is None or layer_rules.layer_kind(m) not in layer_rules.WEIGHT_ATTR:
            raise ValueError(f"the compression record names {name}, not a conv, linear or cosine layer of "
                             "the model counted")
        mask = entry.get("mask")
        w = getattr(m, layer_rules.WEIGHT_ATTR[layer_rules.layer_kind(m)])
        if mask is not None and tuple(mask.shape) != tuple(w.shape):
            raise ValueError(f"the compression record's mask of {name} has shape {tuple(mask.shape)}, "
                             f"its weight {tuple(w.shape)}")
        for key in ("weight_bits", "act_bits"):
            b = entry.get(key)
            if b is not None and (isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= 32):
                raise ValueError(f"the compression record gives {name} {key.replace('_', ' ')} {b!r}")


def _average_row(out):
    """Flip TTA's last step: the two passes' outputs summed and halved, per output element."""
    n = out[0].numel()
    return Row(name="tta.average", type="TTA average", output_shape=tuple(out.shape[1:]), flops=2 * n,
               mults=n, adds=n)


def low_bit_layers(compression):
    """Names of the layers a compression record puts on an integer grid (below 16 bits)."""
    if compression is None:
        return []
    return sorted(name for name, e in compression["layers"].items()
                  if on_integer_grid(e.get("weight_bits")) or on_integer_grid(e.get("act_bits")))


def count(model, input_size=(3, 32, 32), mul_factor=0.5, rules="uci", compression=None, tta=False):
    """Count `model` on one random batch of shape (BATCH, *input_size); figures per sample.

    rules: "uci" (the original entry's count.py; "seed" is an alias) or "micronet" (the
    challenge organisers' counting); docs/counting.md gives both, torchscope.rules every formula.
    mul_factor weights multiplies in the original's Madds (0.5: the fp16 freebie, 1: full); the
    report gives Madds at any factor. compression: a compression record (compress.record: per
    layer weight bits, input bits, mask) scored under the micronet rules (the uci rules ignore it).
    Adds cost 32 bits (score.ADD_BITS): a narrower accumulator is nothing evaluation simulates.
    tta: count flip test-time augmentation (evaluate.evaluate's tta): every layer twice, then the
    outputs averaged. ValueError for a mul_factor outside (0, 1], unknown rules or a record that
    does not fit the model.
    """
    if not 0 < mul_factor <= 1:
        raise ValueError(f"mul_factor must be in (0, 1], got {mul_factor}")
    rules = layer_rules.ruleset_name(rules)
    input_size = tuple(int(s) for s in input_size)
    if compression is not None:
        _check_compression(model, compression)
    c = _Counter(model, rules, compression)
    units = layer_rules.units(model)
    handles = [m.register_forward_hook(c.leaf_hook) for m in units]

    try:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
        dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
        # A private generator: counting must not shift the caller's random stream.
        gen = torch.Generator().manual_seed(0)
        x = torch.randn((BATCH, *input_size), generator=gen).to(device=device, dtype=dtype)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = model(x)
                if tta:
                    # The mirror image is a re-indexing of the input: it costs no arithmetic.
                    model(x.flip(-1))
        finally:
            model.train(was_training)
    finally:
        for h in handles:
            h.remove()
        c.producers.clear()

    # A layer with a kind counts whole; parameters of its children are its quantiser's (learned step
    # sizes), which the micronet rules charge as the layer's quantisation parameters: not weights.
    machinery = {id(p) for u in units if layer_rules.layer_kind(u) is not None
                 for child in u.children() for p in child.parameters()}
    params = [p for p in {id(p): p for p in model.parameters()}.values() if id(p) not in machinery]
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    legacy = sum(p.numel() for m in model.modules() for n, p in m.named_parameters(recurse=False)
                 if n not in ("weight", "bias") and id(p) not in machinery)
    idle = sum(p.numel() for p in params if id(p) not in c.seen_params)

    if tta:
        c.rows.append(_average_row(_first_tensor(out)))
    report = Report(rules=rules, input_size=input_size, mul_factor=float(mul_factor), rows=c.rows,
                    total_params=total, trainable_params=trainable, legacy_nontrainable=legacy,
                    uncounted=c.uncounted, idle_params=idle, sparse=c.sparse,
                    compressed=c.entries is not None, low_bit_layers=low_bit_layers(compression), tta=tta)
    if compression is not None and rules != "micronet":
        report.notes.append(f"the {rules} rules ignore the compression record (bit widths and masks); "
                            "the micronet rules score it")
    if c.uncounted:
        kinds = sorted({t for _, t in c.uncounted})
        report.notes.append(f"no {rules} rule for {', '.join(kinds)} ({len(c.uncounted)} module calls): "
                            "their operations are NOT counted")
    if idle:
        report.notes.append(f"{idle:,} parameters belong to modules that did not run; counted dense")
    return report
