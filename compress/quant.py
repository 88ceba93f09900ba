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

The observer's state (min, max, scale, zero point) is not in the model's state_dict: saved weights
keep the plain model's keys, and that state travels in the compression record (compress.record).
"""
import torch
from torch import nn
from torch.ao.quantization import FusedMovingAvgObsFakeQuantize, MovingAverageMinMaxObserver

import errors
from models.heads import NORM_EPS, CosineLinear

from . import layers as L

# torch.ao.quantization's default for activation observers in QAT.
ACT_AVERAGING = 0.01
# A channel whose weights are all zero (pruned) gets this scale instead of 0: it quantises to 0.
SCALE_MIN = 1e-12
# The child holding the input fake-quantiser; its state is kept out of the state_dict.
QUANT_CHILD = "input_quant"


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
    for k in [k for k in state_dict if k.startswith(prefix + QUANT_CHILD + ".")]:
        del state_dict[k]


def _forgive_quant_keys(module, incompatible_keys):
    incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys
                                         if QUANT_CHILD not in k.split(".")]


class Quantised:
    """What the quantised layers share: their bit widths, the input quantiser, the weight rounding."""

    weight_bits = 32
    act_bits = 32

    def _setup_quant(self, weight_bits, act_bits):
        self.weight_bits = check_bits(weight_bits, "weight bits")
        self.act_bits = check_bits(act_bits, "activation bits")
        if act_bits in L.INT_BITS:
            fq = make_input_quant(act_bits).to(L.weight_of(self).device)
            setattr(self, QUANT_CHILD, fq)
            # Flags off and on, and a 1-element probe, for the CPU path of quant_input.
            dev = fq.scale.device
            self.register_buffer("_fq_off", torch.zeros(1, dtype=torch.long, device=dev), persistent=False)
            self.register_buffer("_fq_on", torch.ones(1, dtype=torch.long, device=dev), persistent=False)
            self.register_buffer("_fq_probe", torch.zeros(1, device=dev), persistent=False)
        else:
            setattr(self, QUANT_CHILD, None)
        self.register_state_dict_post_hook(_drop_quant_keys)
        self.register_load_state_dict_post_hook(_forgive_quant_keys)

    @property
    def quantises_weights(self):
        """Whether the weights are rounded (integer grid or float16): 32-bit weights are left alone."""
        return self.weight_bits in L.SIMULATED_BITS

    def _round_weight(self, w):
        if self.weight_bits == L.HALF_BITS:
            return round_half(w)
        return fake_quant_weight(w, self.weight_bits, L.output_axis(self))

    def quant_input(self, x):
        if self.act_bits == L.HALF_BITS:
            return round_half(x if x.dtype == torch.float32 else x.float()).to(x.dtype)
        fq = getattr(self, QUANT_CHILD)
        if fq is None:
            return x
        # The quantiser works in float32; under autocast the layer casts the result again.
        xf = x if x.dtype == torch.float32 else x.float()
        if x.is_cuda:
            # One fused kernel observes (while the observer is on) and rounds.
            y = fq(xf)
        else:
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
            y = round_input(xf, fq.scale, fq.zero_point, fq.activation_post_process.quant_max)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def quant_weight(self, w, source=None):
        """`w` rounded to the layer's grid. In eval mode without autograd the result is kept until
        `source` (the parameter `w` derives from; `w` itself by default) changes: evaluation rounds
        each weight once, not once per batch."""
        if not self.quantises_weights:
            return w
        source = w if source is None else source
        if self.training or torch.is_grad_enabled():
            self._qcache = None
            return self._round_weight(w)
        key = (source.data_ptr(), source._version, source.device, w.dtype)
        cache = getattr(self, "_qcache", None)
        if cache is None or cache[0] != key:
            cache = self._qcache = (key, self._round_weight(w))
        return cache[1]

    def train(self, mode=True):
        super().train(mode)
        fq = getattr(self, QUANT_CHILD, None)
        if fq is not None:
            # The range is learnt in training and frozen for evaluation.
            fq.enable_observer(mode)
        return self

    def extra_repr(self):
        return f"{super().extra_repr()}, weight_bits={self.weight_bits}, act_bits={self.act_bits}"


class QuantConv2d(Quantised, nn.Conv2d):
    @classmethod
    def from_float(cls, conv, weight_bits, act_bits):
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode, device="meta")
        q.weight, q.bias = conv.weight, conv.bias
        q._setup_quant(weight_bits, act_bits)
        return q.train(conv.training)

    def forward(self, x):
        return self._conv_forward(self.quant_input(x), self.quant_weight(self.weight), self.bias)


class QuantLinear(Quantised, nn.Linear):
    @classmethod
    def from_float(cls, linear, weight_bits, act_bits):
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        q.weight, q.bias = linear.weight, linear.bias
        q._setup_quant(weight_bits, act_bits)
        return q.train(linear.training)

    def forward(self, x):
        return nn.functional.linear(self.quant_input(x), self.quant_weight(self.weight), self.bias)


class QuantCosine(Quantised, CosineLinear):
    """The cosine head with its column-normalised kernel quantised per class (the normalisation
    depends on the weights only: a deployed model stores the normalised, quantised columns)."""

    @classmethod
    def from_float(cls, cos, weight_bits, act_bits):
        n_in, n_out = cos.kernel.shape
        with torch.device("meta"):  # no random init: the caller's random stream stays as it was
            q = cls(n_in, n_out)
        q.kernel = cos.kernel
        q._setup_quant(weight_bits, act_bits)
        return q.train(cos.training)

    def forward(self, x):
        w = self.quant_weight(nn.functional.normalize(self.kernel, dim=0, eps=NORM_EPS), source=self.kernel)
        return (self.quant_input(x) @ w.to(x.dtype)).clamp(-1.0, 1.0)


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


def quantize_layers(model, bits):
    """Replace each layer named in `bits` ({bare name: (weight bits, activation bits)}) by its
    quantised version; returns the model (changed in place)."""
    for real, module in list(model.named_modules()):
        name = L.bare_name(real)
        if name not in bits:
            continue
        kind = L.kind_of(module)
        if isinstance(module, Quantised) and (module.weight_bits, module.act_bits) == tuple(bits[name]):
            continue  # already so: keeps its input quantiser (a resumed run loads its range into it)
        if kind is None:
            raise errors.ConfigError(f"layer {name} is a {type(module).__name__}, not a conv, linear or "
                                     "cosine layer: it cannot be quantised")
        L.set_module(model, real, QUANT_CLASSES[kind].from_float(module, *bits[name]))
    return model


def quantize(model, weight_bits, act_bits, first_last_bits=None):
    """Fake-quantise every conv, linear and cosine layer of `model` in place (see the module's doc):
    weights to `weight_bits` per output channel, inputs to `act_bits` per tensor; `first_last_bits`
    (an int, or a (weight, activation) pair) for the first layer and the head. Widths: 2..8
    (the integer grid), 16 (float16) or 32 (left as it is). Returns the model."""
    return quantize_layers(model, layer_bits(model, weight_bits, act_bits, first_last_bits))


def quantised_layers(model):
    """{bare name: module} of the quantised layers."""
    return {n: m for n, m in L.compressible(model).items() if isinstance(m, Quantised)}


def input_state(module):
    """The input quantiser's state {min, max, scale, zero_point} (plain values), or None."""
    fq = getattr(module, QUANT_CHILD, None)
    if fq is None:
        return None
    obs = fq.activation_post_process
    return {"act_min": obs.min_val.detach().cpu().clone(), "act_max": obs.max_val.detach().cpu().clone(),
            "act_scale": fq.scale.detach().cpu().clone(), "act_zero_point": fq.zero_point.detach().cpu().clone()}


@torch.no_grad()
def load_input_state(module, state):
    fq = getattr(module, QUANT_CHILD)
    obs = fq.activation_post_process
    obs.min_val.copy_(state["act_min"].reshape(obs.min_val.shape))
    obs.max_val.copy_(state["act_max"].reshape(obs.max_val.shape))
    fq.scale.copy_(state["act_scale"].reshape(fq.scale.shape))
    fq.zero_point.copy_(state["act_zero_point"].reshape(fq.zero_point.shape))


@torch.no_grad()
def calibrate(model, batches):
    """Observe input ranges on `batches` (an iterable of input tensors) in eval mode, as
    post-training quantisation does; for a quantised model that was not trained with its quantisers.
    The model's mode is put back."""
    was_training = model.training
    model.eval()
    fqs = [getattr(m, QUANT_CHILD) for m in quantised_layers(model).values()
           if getattr(m, QUANT_CHILD) is not None]
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
