"""Count parameters, operations and memory of a model with forward hooks on its modules.

One random batch of BATCH samples runs through the model in eval mode; every figure is per
sample. Every leaf module is costed by its layer kind (rules.layer_kind: its torch type, or the
`layer_kind` it declares) under the chosen rule set (rules.py); docs/counting.md gives the
conventions and the reference figures. Imports nothing but torch and the standard library.
"""
import math
from dataclasses import asdict, dataclass, field

import torch

from . import rules as R
from . import score as S

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
    # Parameters as the score counts them, at 32 and at 16 bits (sparse-aware under micronet).
    params32: float = 0.0
    params16: float = 0.0
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
    # Weight tensors with exact zeros (micronet rules): name -> (non-zeros, numel).
    sparse: dict = field(default_factory=dict)

    def _sum(self, attr):
        return sum(getattr(r, attr) for r in self.rows)

    @property
    def non_trainable_params(self):
        return self.total_params - self.trainable_params

    @property
    def flops(self):
        return self._sum("flops")

    @property
    def mults(self):
        return self._sum("mults")

    @property
    def adds(self):
        return self._sum("adds")

    @property
    def macs(self):
        return self._sum("macs")

    @property
    def activations(self):
        return self._sum("activations")

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
        return S.scores(self)

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
            "scores": self.scores(),
            "sparse_weights": {k: {"nonzero": nz, "numel": n} for k, (nz, n) in self.sparse.items()},
            "uncounted": [list(u) for u in self.uncounted],
            "notes": list(self.notes),
            "layers": [dict(asdict(r), output_shape=list(r.output_shape),
                            madds=r.madds(self.mul_factor)) for r in self.rows],
        }


def _first_tensor(x):
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (list, tuple)):
        for item in x:
            t = _first_tensor(item)
            if t is not None:
                return t
    return None


def _param_cost(p, sparse_aware):
    """(cost at 32 bits, cost at 16 bits) of one parameter tensor, and its non-zeros.

    A weight tensor (2+ dims) with exact zeros may be stored sparse: its non-zeros plus a 1-bit
    mask over the whole tensor (numel / 32). An entry would only do that when it is cheaper,
    so each precision takes the smaller of dense and sparse.
    """
    n = p.numel()
    if not sparse_aware or p.dim() < 2:
        return float(n), 0.5 * n, n
    nz = int(p.detach().ne(0).sum())
    mask = n / 32
    return min(float(n), nz + mask), min(0.5 * n, 0.5 * nz + mask), nz


class _Counter:
    def __init__(self, model, rules):
        self.model = model
        self.rules = rules
        self.table = R.RULESETS[rules]
        self.names = {m: n for n, m in model.named_modules()}
        self.calls = {}
        self.rows = []
        self.seen_params = set()
        self.uncounted = []
        self.sparse = {}
        # Rows (by id) of BatchNorms folded into a conv, and of convs given a bias by a fold.
        self.folded, self.gained_bias = set(), set()
        # Output tensor id -> (row, module, kind, tensor) for conv/linear/identity outputs.
        # Holding the tensor keeps its id from being reused during the pass.
        self.producers = {}

    def _new_row(self, module, out):
        name = self.names.get(module, type(module).__name__) or "(model)"
        k = self.calls[module] = self.calls.get(module, 0) + 1
        if k > 1:
            name = f"{name}#{k}"
        return Row(name=name, type=type(module).__name__, output_shape=tuple(out.shape[1:]))

    def _own_params(self, module, row):
        sparse_aware = self.rules == "micronet"
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in self.seen_params:
                continue
            self.seen_params.add(id(p))
            row.params += p.numel()
            if id(row) in self.folded:
                # Folded away: its scale and shift live on in the conv's weights and bias.
                continue
            c32, c16, nz = _param_cost(p, sparse_aware)
            row.params32 += c32
            row.params16 += c16
            if sparse_aware and p.dim() >= 2 and nz < p.numel():
                self.sparse[f"{self.names.get(module, '')}.{pname}".lstrip(".")] = (nz, p.numel())

    def leaf_hook(self, module, inputs, output):
        kind, rule = R.find_rule(self.table, module)
        if rule is R.UNSEEN:
            return
        x, out = _first_tensor(inputs), _first_tensor(output)
        if out is None:
            return
        self._check_batch(module, out)
        row = self._new_row(module, out)
        in_shape = tuple(x.shape[1:]) if x is not None else ()
        row.activations = 0 if kind in R.INLINE_KINDS else out[0].numel()

        if kind == "batchnorm" and self.rules == "micronet":
            prod = self.producers.get(id(x)) if x is not None else None
            if prod is not None and prod[3] is x and prod[2] in ("conv", "linear"):
                self._fold_bn(prod, row, out)

        if id(row) not in self.folded:
            if rule is None:
                self.uncounted.append((row.name, row.type))
            else:
                self._apply(row, rule(module, in_shape, tuple(out.shape[1:])))

        if kind == "conv":
            self._materialised_padding(module, x)
        if kind in ("conv", "linear") or isinstance(module, torch.nn.Identity):
            self.producers[id(out)] = (row, module, kind, out)
        self._own_params(module, row)
        self.rows.append(row)

    def _fold_bn(self, prod, bn_row, out):
        conv_row, conv, _, _ = prod
        self.folded.add(id(bn_row))
        if conv.bias is None and id(conv_row) not in self.gained_bias:
            # The fold leaves the conv a bias: one add per output and C_out parameters.
            conv_row.adds += out[0].numel()
            conv_row.params32 += out.shape[1]
            conv_row.params16 += 0.5 * out.shape[1]
            self.gained_bias.add(id(conv_row))

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


def count(model, input_size=(3, 32, 32), mul_factor=0.5, rules="uci"):
    """Count `model` on one random batch of shape (BATCH, *input_size); figures per sample.

    rules: "uci" (the original entry's count.py; "seed" is an alias) or "micronet" (the
    challenge organisers' counting); docs/counting.md gives both, torchscope.rules every formula.
    mul_factor weights multiplies in the original's Madds (0.5: the fp16 freebie, 1: full); the
    report gives Madds at any factor. ValueError for a mul_factor outside (0, 1] or unknown rules.
    """
    if not 0 < mul_factor <= 1:
        raise ValueError(f"mul_factor must be in (0, 1], got {mul_factor}")
    rules = R.ruleset_name(rules)
    input_size = tuple(int(s) for s in input_size)
    c = _Counter(model, rules)
    handles = [m.register_forward_hook(c.leaf_hook) for m in model.modules()
               if not any(True for _ in m.children())]

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
                model(x)
        finally:
            model.train(was_training)
    finally:
        for h in handles:
            h.remove()
        c.producers.clear()

    params = list({id(p): p for p in model.parameters()}.values())
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    legacy = sum(p.numel() for m in model.modules() for n, p in m.named_parameters(recurse=False)
                 if n not in ("weight", "bias"))
    idle = sum(p.numel() for p in params if id(p) not in c.seen_params)

    report = Report(rules=rules, input_size=input_size, mul_factor=float(mul_factor), rows=c.rows,
                    total_params=total, trainable_params=trainable, legacy_nontrainable=legacy,
                    uncounted=c.uncounted, idle_params=idle, sparse=c.sparse)
    if c.uncounted:
        kinds = sorted({t for _, t in c.uncounted})
        report.notes.append(f"no {rules} rule for {', '.join(kinds)} ({len(c.uncounted)} module calls): "
                            "their operations are NOT counted")
    if idle:
        report.notes.append(f"{idle:,} parameters belong to modules that did not run; counted dense")
    return report
