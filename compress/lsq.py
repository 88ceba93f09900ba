"""Learned step size quantisation (LSQ; Esser et al. 2020, "Learned step size quantization",
arXiv 1902.08153): the step of each grid is a parameter the optimizer trains.

    v_hat = clamp(round(v / s), -Qn, Qp) * s

with the straight-through gradient for v (1 where -Qn < v/s < Qp, 0 outside) and, for s,

    d v_hat / d s = round(v/s) - v/s   where -Qn < v/s < Qp,
                    -Qn                where v/s <= -Qn,
                    Qp                 where v/s >= Qp,

summed over the values that share the step and multiplied by the gradient scale g = 1/sqrt(N * Qp),
N the number of values that share the step in one example (a weight channel's entries; an input's
features per sample). Steps start as the paper's 2 * mean(|v|) / sqrt(Qp).

- Weights: one step per output unit (conv filter, linear row, cosine class), on the symmetric grid
  {-(2^(b-1) - 1) .. 2^(b-1) - 1} of the min/max quantiser, so that BatchNorm folding stays exact
  (compress.quant) and the counter's cost holds: one 32-bit scale per output unit.
- Inputs: one step per tensor, on {0 .. 2^b - 1} minus an integer zero point z, i.e. Qn = z and
  Qp = 2^b - 1 - z. z is fixed at the first training batch from the data's signs: the grid's share
  of negative levels is the data's share of its range, z = round((2^b - 1) * r / (1 + r)) with
  r = -min / max, at most 2^(b-1). After a ReLU (min 0) that is LSQ's unsigned grid (z = 0); around
  zero (BatchNorm outputs, normalised images: r near 1) its signed grid (z = 2^(b-1)); after swish,
  whose outputs dip to -0.278, a few negative levels (z = 12 of 255 for r = 0.05 at 8 bits; 0 at
  2 bits). As the step learns, the grid scales as a whole, so that share stays. The input's cost is
  the one the counter charges any quantised input: a 32-bit scale and zero point. Until the
  optimizer first changes the step, each training forward initialises it again: a probe on a
  made-up batch before training (a run's speed or compile probe) does not fix the grid. The
  batch statistics are reduced over the ranks (torch.distributed), so every rank must run the same
  training forwards until then, as DDP training does.

In evaluation an input is computed exactly as compress.quant.round_input computes a min/max input
with the same scale and zero point (v * (1/s), rounded half to even): the deployed arithmetic.
"""
import math

import torch
from torch import nn

# A step never falls below this (the min/max quantiser's floor for an all-zero channel).
STEP_MIN = 1e-12


class _LSQ(torch.autograd.Function):
    """clamp(round(v * (1/s)), qmin, qmax) * s with LSQ's gradients (see the module's doc); `step`
    broadcasts against v. The backward recomputes v/s rather than keeping a tensor of v's size."""

    @staticmethod
    def forward(ctx, v, step, qmin, qmax, grad_scale):
        s = step.clamp_min(STEP_MIN)
        q = torch.round(v * s.reciprocal()).clamp_(qmin, qmax)
        ctx.save_for_backward(v, step)
        ctx.qmin, ctx.qmax, ctx.grad_scale = qmin, qmax, grad_scale
        return q * s

    @staticmethod
    def backward(ctx, grad):
        v, step = ctx.saved_tensors
        s = step.clamp_min(STEP_MIN)
        z = v * s.reciprocal()
        inside = (z > ctx.qmin) & (z < ctx.qmax)
        grad_v = grad * inside if ctx.needs_input_grad[0] else None
        grad_s = None
        if ctx.needs_input_grad[1]:
            q = torch.round(z).clamp_(ctx.qmin, ctx.qmax)
            ds = torch.where(inside, q - z, q)   # outside, q is the clamped end: -Qn or Qp
            grad_s = (grad * ds).sum_to_size(step.shape) * ctx.grad_scale
        return grad_v, grad_s, None, None, None


def lsq_quantise(v, step, qmin, qmax, grad_scale):
    """v on the grid {qmin..qmax} x step with LSQ's gradients; `step` broadcasts against v, and its
    gradient is multiplied by `grad_scale`."""
    return _LSQ.apply(v, step, qmin, qmax, grad_scale)


def grad_scale(n, qp):
    """LSQ's g = 1 / sqrt(N * Qp)."""
    return 1.0 / math.sqrt(n * qp)


def initial_step(mean_abs, qp):
    """The paper's initial step 2 * mean(|v|) / sqrt(Qp)."""
    return max(2.0 * mean_abs / math.sqrt(qp), STEP_MIN)


def _agreed(mean_abs, lo, hi):
    """(mean |x|, min, max) over every rank's first batch, so that every rank starts from the same step
    and zero point (the ranks' batches are equal in size: the mean of means is the mean)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return mean_abs, lo, hi
    mean_abs = mean_abs.clone()
    dist.all_reduce(mean_abs)
    mean_abs /= dist.get_world_size()
    lo, hi = lo.clone(), hi.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return mean_abs, lo, hi


def zero_point_for(lo, hi, bits):
    """The input grid's zero point for data in [lo, hi]: the negative levels' share of {0..2^b - 1}
    is the data's share of negatives, rounded to whole levels, at most 2^(b-1) (the signed grid)."""
    qmax, half = 2 ** bits - 1, 2 ** (bits - 1)
    if lo >= 0:
        return 0
    if hi <= 0:
        return half
    r = -lo / hi
    return min(half, int(math.floor(qmax * r / (1.0 + r) + 0.5)))


class LSQWeight(nn.Module):
    """One learned step per output unit for the weights of a layer with `bits`-bit weights, on the
    symmetric grid; `w` (the tensor the layer rounds) gives the initial steps."""

    def __init__(self, w, bits, axis):
        super().__init__()
        self.bits, self.axis = bits, axis
        self.qmax = 2 ** (bits - 1) - 1
        dims = [d for d in range(w.dim()) if d != axis]
        mean_abs = w.detach().abs().float().mean(dim=dims)
        self.step = nn.Parameter((2.0 * mean_abs / math.sqrt(self.qmax)).clamp_min(STEP_MIN))

    def _shape(self, w):
        shape = [1] * w.dim()
        shape[self.axis] = -1
        return shape

    def scale(self):
        """The step each unit is rounded with (what the record stores and a deployment multiplies by)."""
        return self.step.detach().clamp_min(STEP_MIN)

    def forward(self, w):
        g = grad_scale(w.numel() // w.shape[self.axis], self.qmax)
        return lsq_quantise(w, self.step.to(w.dtype).view(self._shape(w)), -self.qmax, self.qmax, g)


class LSQInput(nn.Module):
    """A learned step for a layer's `bits`-bit input (per tensor), with the zero point fixed at the
    first training batch (see the module's doc). Until then evaluation uses step 1 and zero point 0,
    as an untrained min/max observer does."""

    def __init__(self, bits, device=None):
        super().__init__()
        self.bits = bits
        self.qmax = 2 ** bits - 1
        self.step = nn.Parameter(torch.ones(1, device=device))
        # Plain Python values, not tensors: read at every forward without a device sync. They travel
        # in the compression record (compress.quant.input_state), with the step.
        self.zero_point = 0
        self.initialised = False
        # The step as first initialised, until the optimizer has changed it: a training forward
        # before any optimizer step (a run's speed or compile probe on an all-zero batch) must not
        # fix the grid, so the next one initialises again. None once trained or loaded.
        self._provisional = None

    def _needs_init(self):
        if not self.initialised:
            return True
        if self._provisional is None:
            return False
        if torch.equal(self.step.detach(), self._provisional.to(self.step.device)):
            return True
        self._provisional = None
        return False

    @torch.no_grad()
    def initialise(self, x):
        """Step and zero point from a batch, the same on every rank."""
        xf = x.detach().float()
        mean_abs, lo, hi = _agreed(xf.abs().mean(), xf.amin(), xf.amax())
        mean_abs, lo, hi = float(mean_abs), float(lo), float(hi)
        self.zero_point = zero_point_for(lo, hi, self.bits)
        self.step.fill_(initial_step(mean_abs, self.qmax - self.zero_point))
        self.initialised = True
        self._provisional = self.step.detach().clone()

    def set_state(self, scale, zero_point):
        with torch.no_grad():
            self.step.copy_(torch.as_tensor(scale, dtype=self.step.dtype).reshape(self.step.shape))
        self.zero_point = int(zero_point)
        self.initialised = True
        self._provisional = None

    def scale(self):
        return self.step.detach().clamp_min(STEP_MIN)

    def forward(self, x):
        if self.training and self._needs_init():
            self.initialise(x)
        qp = self.qmax - self.zero_point
        g = grad_scale(x[0].numel() if x.dim() > 1 else x.numel(), qp)
        return lsq_quantise(x, self.step.to(x.dtype), -self.zero_point, qp, g)

    def extra_repr(self):
        return f"bits={self.bits}, zero_point={self.zero_point}, initialised={self.initialised}"
