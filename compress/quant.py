"""Quantisation-aware training: fake-quantised weights (per output channel) and inputs (per tensor)
of every conv, linear and cosine layer, with straight-through gradients.

Each compressible layer is replaced, under the same name, by a subclass of its own class
(QuantConv2d is an nn.Conv2d, ...) that holds the same Parameter objects: the optimizer, the state-dict
keys and the op counter (which costs a layer by its torch base class) see the layer they saw before.

- Weights: symmetric, per output channel, on the grid {-(2^(b-1) - 1), ..., 2^(b-1) - 1} x scale_c,
  scale_c = max|w_c| / (2^(b-1) - 1) from the current weights at every forward (no state); rounding by
  torch.fake_quantize_per_channel_affine, whose gradient is the straight-through estimator.
- Inputs: asymmetric, per tensor, on {0, ..., 2^b - 1} with a zero point, from a moving average of the
  batch min/max (constant 0.01): torch.ao.quantization's FusedMovingAvgObsFakeQuantize (one fused kernel
  observes, updates the range and fake-quantises). The observer runs in training mode only; in eval
  mode the last range is frozen, so evaluation uses the same numerics as the deployed integer layer.
- BatchNorm folding: a BatchNorm after a conv folds into it as w' = w * g_c (g_c = gamma_c /
  sqrt(var_c + eps), one factor per output channel) and a bias. Per-output-channel symmetric rounding
  is invariant under a per-channel factor: q(w * g)_c = g_c * q(w)_c exactly (the channel's scale
  scales with it, and rounding is odd-symmetric for a negative g_c). So quantising the conv's own
  weights per channel and keeping the BatchNorm as it is gives the same integer weights as folding
  first and quantising after, in training (batch statistics) and in eval (running statistics) alike;
  the folded bias is a 32-bit add. This is the documented equivalent of folding: the BatchNorm keys
  stay where they were, and nothing differs between training and evaluation numerics.
- Bit widths 2..8 are simulated on the integer grid; 16 is simulated as float16: the layer's weights
  and inputs are rounded to half precision (straight-through gradient), and the products of two
  float16 values are exact in float32, so a float32 evaluation is a float16 multiply with a float32
  accumulator. 32 leaves the layer as it is. A width the counter charges is a width the model runs.
- Method: "minmax" is the above; "lsq" learns the weights' per-channel steps and the inputs' step
  instead (compress.lsq: same grids, same record fields, same counted cost). Any other width than
  2..8 is handled the same way by both.
- One set of numerics: a layer that rounds either side computes its conv or linear in float32, in
  training and in evaluation, with autocast on or off (autocast is switched off inside it and its
  result cast to autocast's dtype), so the rounded values reach the multiply exactly as an fp32
  evaluation and the deployed layer see them. The rest of the network runs as autocast has it.
- The input observer runs in training mode only, unless frozen (compress.qat.freeze_observers),
  which stays so through model.train().

The quantisers' state (the observer's min, max, scale, zero point; LSQ's steps and zero point) is
not in the model's state_dict: saved weights keep the plain model's keys, and that state travels in
the compression record (compress.record).
"""
import math

import torch
from torch import nn
from torch.ao.quantization import FusedMovingAvgObsFakeQuantize, MovingAverageMinMaxObserver

from micronet_cifar100 import errors
from models.heads import NORM_EPS, CosineLinear

from . import layers as L
from . import lsq

# torch.ao.quantization's default for activation observers in QAT.
ACT_AVERAGING = 0.01
# A channel whose weights are all zero (pruned) gets this scale instead of 0: it quantises to 0.
SCALE_MIN = 1e-12
# The child holding the input fake-quantiser, and (LSQ) the one holding the weights' steps: their
# state is kept out of the state_dict and travels in the compression record.
QUANT_CHILD = "input_quant"
QUANT_CHILDREN = (QUANT_CHILD, "weight_quant")
# The quantisers: "minmax" (scales from the weights' max and a moving average of the inputs' range)
# and "lsq" (learned step sizes, compress.lsq).
METHODS = ("minmax", "lsq")


def check_bits(bits, what):
    """`bits` as an int in layers.BITS, or ConfigError naming `what`."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in L.BITS:
        raise errors.ConfigError(f"{what} must be one of {L.BITS_TEXT}, got {bits!r}", setting="quant")
    return bits


def weight_qmax(bits):
    return 2 ** (bits - 1) - 1


def weight_scale(w, bits, axis=0):
    """Per-channel scale of the symmetric grid: max |w_c| / (2^(b-1) - 1), never below SCALE_MIN."""
    dims = [d for d in range(w.dim()) if d != axis]
    amax = w.detach().abs().amax(dim=dims) if dims else w.detach().abs()
    return (amax.float() / weight_qmax(bits)).clamp_min(SCALE_MIN)


def fake_quant_weight(w, bits, axis=0):
    """w rounded to `bits`-bit symmetric integers per channel along `axis`, times the channel's scale;
    the gradient passes straight through."""
    qmax = weight_qmax(bits)
    scale = weight_scale(w, bits, axis)
    zero = torch.zeros(scale.shape, dtype=torch.int32, device=scale.device)
    return torch.fake_quantize_per_channel_affine(w, scale, zero, axis, -qmax, qmax)


def make_input_quant(bits):
    """Per-tensor asymmetric fake quantiser with a moving-average min/max observer (torch.ao)."""
    return FusedMovingAvgObsFakeQuantize(observer=MovingAverageMinMaxObserver, quant_min=0,
                                         quant_max=2 ** bits - 1, dtype=torch.quint8,
                                         qscheme=torch.per_tensor_affine, averaging_constant=ACT_AVERAGING)


class _RoundInput(torch.autograd.Function):
    """x on the grid {0..qmax} - zero_point times scale, with the straight-through gradient of
    torch's fake quantisation (passed where the grid value was in range, zero elsewhere). The same
    arithmetic as torch's fake_quantize_per_tensor_affine kernel, bit for bit, in vectorised ops:
    on the CPU that kernel is several times slower than these."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmax):
        zp = zero_point.to(x.dtype)
        r = torch.round(x * scale.reciprocal()).add_(zp)
        q = r.clamp(0, qmax)
        ctx.save_for_backward(q == r)   # in range (NaN: not)
        return q.sub_(zp).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None


def round_input(x, scale, zero_point, qmax):
    if torch.is_grad_enabled() and x.requires_grad:
        return _RoundInput.apply(x, scale, zero_point, qmax)
    zp = zero_point.to(x.dtype)
    return torch.round(x * scale.reciprocal()).add_(zp).clamp_(0, qmax).sub_(zp).mul_(scale)


class _RoundHalf(torch.autograd.Function):
    """x rounded to float16 (round to nearest even, overflow to inf, as a float16 store does), in
    x's dtype, with the gradient passed straight through (the rounding's own derivative is 0 almost
    everywhere, and a cast's backward would round the gradient to float16 too)."""

    @staticmethod
    def forward(ctx, x):
        return x.to(torch.float16).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad


def round_half(x):
    """The float16 simulation of a 16-bit layer's weights or inputs."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _RoundHalf.apply(x)
    return x.to(torch.float16).to(x.dtype)


def _drop_quant_keys(module, state_dict, prefix, local_metadata):
    quant = tuple(prefix + child + "." for child in QUANT_CHILDREN)
    for k in [k for k in state_dict if k.startswith(quant)]:
        del state_dict[k]


def _forgive_quant_keys(module, incompatible_keys):
    incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys
                                         if not set(QUANT_CHILDREN) & set(k.split("."))]


def check_method(method):
    if method not in METHODS:
        raise errors.ConfigError(f"the quantiser must be one of {', '.join(METHODS)}, got {method!r}",
                                 setting="quant_method")
    return method


def _autocast_dtype(x):
    """The dtype autocast gives a conv or linear on x's device, or None when autocast is off there."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


class Quantised:
    """What the quantised layers share: their bit widths, the quantiser (method), the input
    quantiser, the weight rounding, and float32 arithmetic under autocast."""

    weight_bits = 32
    act_bits = 32
    method = "minmax"
    # Set by compress.qat.freeze_observers: the min/max input observer stays off in training too.
    observer_frozen = False

    def _setup_quant(self, weight_bits, act_bits, method="minmax"):
        self.weight_bits = check_bits(weight_bits, "weight bits")
        self.act_bits = check_bits(act_bits, "activation bits")
        self.method = check_method(method)
        device = L.weight_of(self).device
        if act_bits in L.INT_BITS and method == "lsq":
            setattr(self, QUANT_CHILD, lsq.LSQInput(act_bits, device=device))
        elif act_bits in L.INT_BITS:
            fq = make_input_quant(act_bits).to(device)
            setattr(self, QUANT_CHILD, fq)
            # Flags off and on, and a 1-element probe, for the CPU path of quant_input.
            dev = fq.scale.device
            self.register_buffer("_fq_off", torch.zeros(1, dtype=torch.long, device=dev), persistent=False)
            self.register_buffer("_fq_on", torch.ones(1, dtype=torch.long, device=dev), persistent=False)
            self.register_buffer("_fq_probe", torch.zeros(1, device=dev), persistent=False)
        else:
            setattr(self, QUANT_CHILD, None)
        if weight_bits in L.INT_BITS and method == "lsq":
            self.weight_quant = lsq.LSQWeight(self._weight_to_round().detach(), weight_bits, L.output_axis(self))
        else:
            self.weight_quant = None
        self.register_state_dict_post_hook(_drop_quant_keys)
        self.register_load_state_dict_post_hook(_forgive_quant_keys)

    def _weight_to_round(self):
        """The tensor the layer rounds to its weight grid (the cosine layer: its normalised columns)."""
        return L.weight_of(self)

    @property
    def quantises_weights(self):
        """Whether the weights are rounded (integer grid or float16): 32-bit weights are left alone."""
        return self.weight_bits in L.SIMULATED_BITS

    @property
    def simulates(self):
        """Whether any side is rounded (integer grid or float16): then the layer computes in float32."""
        return self.weight_bits in L.SIMULATED_BITS or self.act_bits in L.SIMULATED_BITS

    def weight_scale_of(self, w):
        """The per-unit scale the layer rounds `w` (its _weight_to_round()) with on the integer grid:
        the learned step (LSQ), or max|w_c| / (2^(b-1) - 1) (min/max); None off the integer grid."""
        if self.weight_bits not in L.INT_BITS:
            return None
        if self.weight_quant is not None:
            return self.weight_quant.scale()
        return weight_scale(w, self.weight_bits, L.output_axis(self))

    def _round_weight(self, w):
        if self.weight_bits == L.HALF_BITS:
            return round_half(w)
        if self.weight_quant is not None:
            return self.weight_quant(w)
        return fake_quant_weight(w, self.weight_bits, L.output_axis(self))

    def quant_input(self, x):
        """x on the layer's input grid, in float32 (the layer's arithmetic, autocast or not)."""
        xf = x if x.dtype == torch.float32 else x.float()
        if self.act_bits == L.HALF_BITS:
            return round_half(xf)
        fq = getattr(self, QUANT_CHILD)
        if fq is None:
            return xf
        if self.method == "lsq":
            return fq(xf)
        if x.is_cuda:
            # One fused kernel observes (while the observer is on) and rounds.
            return fq(xf)
        if bool(fq.observer_enabled[0]):
            # torch.ao's fused op twice, each time on the cheap side: observing x with its rounding
            # off (moving min/max), then rounding a 1-element probe with its observer off, which
            # makes it choose the scale and zero point from that range (as the one fused call
            # on CUDA does).
            with torch.no_grad():
                obs, off, on = fq.activation_post_process, self._fq_off, self._fq_on
                for inp, observe, rnd in ((xf, on, off), (self._fq_probe, off, on)):
                    torch.fused_moving_avg_obs_fake_quant(
                        inp, observe, rnd, obs.min_val, obs.max_val, fq.scale, fq.zero_point,
                        obs.averaging_constant, obs.quant_min, obs.quant_max, fq.ch_axis,
                        fq.is_per_channel, fq.is_symmetric_quant)
        return round_input(xf, fq.scale, fq.zero_point, fq.activation_post_process.quant_max)

    def quant_weight(self, w, source=None):
        """`w` rounded to the layer's grid. In eval mode without autograd the result is kept until
        `source` (the parameter `w` derives from; `w` itself by default) or the learned steps change:
        evaluation rounds each weight once, not once per batch."""
        if not self.quantises_weights:
            return w
        source = w if source is None else source
        if self.training or torch.is_grad_enabled():
            self._qcache = None
            return self._round_weight(w)
        step = self.weight_quant.step if self.weight_quant is not None else None
        key = (source.data_ptr(), source._version, source.device, w.dtype,
               None if step is None else (step.data_ptr(), step._version))
        cache = getattr(self, "_qcache", None)
        if cache is None or cache[0] != key:
            cache = self._qcache = (key, self._round_weight(w))
        return cache[1]

    def forward(self, x):
        if not self.simulates:
            return super().forward(x)
        # Rounded values are exact in float32 only (bf16 holds neither every grid value times its
        # scale nor every float16 value), so the layer computes in float32 in training and in
        # evaluation alike, autocast or not, and hands autocast's dtype on.
        cast = _autocast_dtype(x)
        if cast is None:
            return self._quantised_forward(x)
        with torch.autocast(x.device.type, enabled=False):
            y = self._quantised_forward(x)
        return y.to(cast)

    def train(self, mode=True):
        super().train(mode)
        fq = getattr(self, QUANT_CHILD, None)
        if fq is not None and self.method == "minmax":
            # The range is learnt in training (until frozen) and fixed for evaluation.
            fq.enable_observer(mode and not self.observer_frozen)
        return self

    def extra_repr(self):
        return f"{super().extra_repr()}, weight_bits={self.weight_bits}, act_bits={self.act_bits}, method={self.method}"


class QuantConv2d(Quantised, nn.Conv2d):
    @classmethod
    def from_float(cls, conv, weight_bits, act_bits, method="minmax"):
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode, device="meta")
        q.weight, q.bias = conv.weight, conv.bias
        q._setup_quant(weight_bits, act_bits, method)
        return q.train(conv.training)

    def _quantised_forward(self, x):
        return self._conv_forward(self.quant_input(x), self.quant_weight(self.weight), self.bias)


class QuantLinear(Quantised, nn.Linear):
    @classmethod
    def from_float(cls, linear, weight_bits, act_bits, method="minmax"):
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        q.weight, q.bias = linear.weight, linear.bias
        q._setup_quant(weight_bits, act_bits, method)
        return q.train(linear.training)

    def _quantised_forward(self, x):
        return nn.functional.linear(self.quant_input(x), self.quant_weight(self.weight), self.bias)


class QuantCosine(Quantised, CosineLinear):
    """The cosine head with its column-normalised kernel quantised per class (the normalisation
    depends on the weights only: a deployed model stores the normalised, quantised columns)."""

    @classmethod
    def from_float(cls, cos, weight_bits, act_bits, method="minmax"):
        n_in, n_out = cos.kernel.shape
        with torch.device("meta"):  # no random init: the caller's random stream stays as it was
            q = cls(n_in, n_out)
        q.kernel = cos.kernel
        q._setup_quant(weight_bits, act_bits, method)
        return q.train(cos.training)

    def _weight_to_round(self):
        return nn.functional.normalize(self.kernel, dim=0, eps=NORM_EPS)

    def _quantised_forward(self, x):
        xq = self.quant_input(x)
        w = self.quant_weight(self._weight_to_round(), source=self.kernel)
        return (xq @ w.to(xq.dtype)).clamp(-1.0, 1.0)


QUANT_CLASSES = {"conv": QuantConv2d, "linear": QuantLinear, "cosine": QuantCosine}


def layer_bits(model, weight_bits, act_bits, first_last_bits=None):
    """{bare name: (weight bits, activation bits)} for every compressible layer: the given widths,
    and `first_last_bits` (an int for both, or a (weight, activation) pair) on the first layer and
    the head (layers.first_and_head)."""
    weight_bits = check_bits(weight_bits, "weight bits")
    act_bits = check_bits(act_bits, "activation bits")
    bits = {name: (weight_bits, act_bits) for name in L.compressible(model)}
    if first_last_bits is not None:
        pair = first_last_bits if isinstance(first_last_bits, (tuple, list)) else (first_last_bits,) * 2
        if len(pair) != 2:
            raise errors.ConfigError(f"first/last layer bits must be one width or a (weight, activation) "
                                     f"pair, got {first_last_bits!r}", setting="quant")
        pair = (check_bits(pair[0], "first/last layer weight bits"),
                check_bits(pair[1], "first/last layer activation bits"))
        first, head = L.first_and_head(model)
        for name in first | head:
            bits[name] = pair
    return bits


def quantize_layers(model, bits, method="minmax"):
    """Replace each layer named in `bits` ({bare name: (weight bits, activation bits)}) by its
    quantised version, with `method` (one for all, or {bare name: method}); returns the model
    (changed in place). A layer already quantised so is kept, with its quantisers' state."""
    methods = method if isinstance(method, dict) else {}
    for real, module in list(model.named_modules()):
        name = L.bare_name(real)
        if name not in bits:
            continue
        kind = L.kind_of(module)
        how = check_method(methods.get(name, "minmax") if isinstance(method, dict) else method)
        if isinstance(module, Quantised) and (module.weight_bits, module.act_bits, module.method) \
                == (*bits[name], how):
            continue  # already so: keeps its quantisers (a resumed run loads their state into them)
        if kind is None:
            raise errors.ConfigError(f"layer {name} is a {type(module).__name__}, not a conv, linear or "
                                     "cosine layer: it cannot be quantised")
        L.set_module(model, real, QUANT_CLASSES[kind].from_float(module, *bits[name], how))
    return model


def quantize(model, weight_bits, act_bits, first_last_bits=None, method="minmax"):
    """Fake-quantise every conv, linear and cosine layer of `model` in place (see the module's doc):
    weights to `weight_bits` per output channel, inputs to `act_bits` per tensor; `first_last_bits`
    (an int, or a (weight, activation) pair) for the first layer and the head. Widths: 2..8
    (the integer grid), 16 (float16) or 32 (left as it is). `method`: "minmax" (scales from the
    weights' and a moving average of the inputs' ranges) or "lsq" (learned step sizes, nn.Parameters
    of the model: build the optimizer after this call; compress.step_sizes lists them). Returns the
    model."""
    check_method(method)
    return quantize_layers(model, layer_bits(model, weight_bits, act_bits, first_last_bits), method)


def quantised_layers(model):
    """{bare name: module} of the quantised layers."""
    return {n: m for n, m in L.compressible(model).items() if isinstance(m, Quantised)}


def step_sizes(model):
    """The learned step sizes (LSQ) of `model`, as a list of Parameters: they are in
    model.parameters() too, so a plain optimizer trains them; a run that wants them without weight
    decay gives them a group of their own."""
    out = []
    for m in quantised_layers(model).values():
        for child in (getattr(m, QUANT_CHILD, None), getattr(m, "weight_quant", None)):
            if isinstance(child, (lsq.LSQInput, lsq.LSQWeight)):
                out.append(child.step)
    return out


def input_state(module):
    """The input quantiser's state {min, max, scale, zero_point} (plain values), or None. For LSQ
    the range is that of its grid, (0 - z) * s .. (2^b - 1 - z) * s, and inf..-inf (no range, as an
    untrained observer has) before its first training batch."""
    fq = getattr(module, QUANT_CHILD, None)
    if fq is None:
        return None
    if isinstance(fq, lsq.LSQInput):
        s = fq.scale().float().cpu().reshape(1).clone()
        z = fq.zero_point
        lo, hi = (-z * s, (fq.qmax - z) * s) if fq.initialised else \
            (torch.full((1,), math.inf), torch.full((1,), -math.inf))
        return {"act_min": lo, "act_max": hi, "act_scale": s,
                "act_zero_point": torch.tensor([z], dtype=torch.int32)}
    obs = fq.activation_post_process
    return {"act_min": obs.min_val.detach().cpu().clone(), "act_max": obs.max_val.detach().cpu().clone(),
            "act_scale": fq.scale.detach().cpu().clone(), "act_zero_point": fq.zero_point.detach().cpu().clone()}


@torch.no_grad()
def load_input_state(module, state):
    fq = getattr(module, QUANT_CHILD)
    if isinstance(fq, lsq.LSQInput):
        fq.set_state(state["act_scale"], int(state["act_zero_point"]))
        return
    obs = fq.activation_post_process
    obs.min_val.copy_(state["act_min"].reshape(obs.min_val.shape))
    obs.max_val.copy_(state["act_max"].reshape(obs.max_val.shape))
    fq.scale.copy_(state["act_scale"].reshape(fq.scale.shape))
    fq.zero_point.copy_(state["act_zero_point"].reshape(fq.zero_point.shape))


def weight_state(module):
    """{"weight_step": the learned per-unit steps} of an LSQ layer with integer weights, else {}."""
    wq = getattr(module, "weight_quant", None)
    return {"weight_step": wq.scale().float().cpu().clone()} if wq is not None else {}


@torch.no_grad()
def load_weight_state(module, state):
    module.weight_quant.step.copy_(state["weight_step"].reshape(module.weight_quant.step.shape))


@torch.no_grad()
def calibrate(model, batches):
    """Observe input ranges on `batches` (an iterable of input tensors) in eval mode, as
    post-training quantisation does; for a quantised model that was not trained with its quantisers
    (deploy's export tests and latency benchmark). Min/max observers only: an LSQ input takes its
    grid from its first training batch. The model's mode, and frozen observers, are put back."""
    was_training = model.training
    model.eval()
    fqs = [getattr(m, QUANT_CHILD) for m in quantised_layers(model).values()
           if m.method == "minmax" and getattr(m, QUANT_CHILD) is not None]
    try:
        for fq in fqs:
            fq.enable_observer(True)
        for x in batches:
            model(x)
    finally:
        for fq in fqs:
            fq.enable_observer(False)
        model.train(was_training)
    return model
