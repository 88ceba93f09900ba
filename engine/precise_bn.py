"""Precise BatchNorm statistics for evaluation ("Rethinking Batch in BatchNorm", Wu & Johnson 2021).

BatchNorm's running statistics are an exponential average with momentum m (0.01 in the original
entry): after t steps the initial mean 0 / variance 1 still weighs (1 - m)^t in them. A short run
(156 steps: 21% of the statistics are still the initialisation) therefore evaluates with statistics
that describe no data, and predicts one ranking for every image. Before such an evaluation the
statistics are recomputed from training batches with the current weights, as an equal-weight
average (torch.optim.swa_utils.update_bn), and used for that evaluation and the weights files of
that epoch only: the training model keeps its own running statistics, so training, and a resume
from last.pytar, are exactly as without it.
"""
import contextlib
import math

import torch
from torch.optim.swa_utils import update_bn

from . import distributed

# `auto` recomputes while any layer's statistics still hold more than this share of their
# initialisation. At momentum 0.01 that is the first 459 steps; the original recipe's first epoch
# has 1,172, so it never triggers there.
INIT_WEIGHT_TOL = 0.01
# Samples averaged over (Wu & Johnson find ~10^4 enough for CIFAR-sized models).
SAMPLES = 10_000
# A compressed run (pruned or quantised) under `auto` recomputes before every evaluation, from this
# many samples: pruning changes the weights at once, and at momentum 0.01 the running statistics take
# hundreds of steps to follow (measured by bench/compression_quality.py: a narrow ex pruned 65% in one
# step evaluates at chance with its running statistics, at 14-22% with recomputed ones).
COMPRESSED_SAMPLES = 2_048


def _bns(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def init_weight(model):
    """The largest share of the initial statistics left in any BatchNorm layer's running averages
    (0 when there is none; cumulative averages count as converged once they saw a batch)."""
    worst = 0.0
    for m in _bns(model):
        if not m.track_running_stats or m.running_mean is None:
            continue
        t = int(m.num_batches_tracked)
        left = (0.0 if t else 1.0) if m.momentum is None else (1.0 - m.momentum) ** t
        worst = max(worst, left)
    return worst


def batches_for(setting, model, batch_size, steps, compressed=False):
    """How many training batches to average over for this evaluation: 0 for none. `setting` is
    "off", "auto" or a number of batches; `compressed`: the run prunes or quantises (auto then
    always recomputes, from COMPRESSED_SAMPLES samples at least)."""
    if setting == "off":
        return 0
    if setting == "auto":
        if init_weight(model) > INIT_WEIGHT_TOL:
            return min(steps, math.ceil(SAMPLES / batch_size))
        return min(steps, math.ceil(COMPRESSED_SAMPLES / batch_size)) if compressed else 0
    return min(int(setting), steps)


def buffer_names(model):
    """State-dict names of the BatchNorm statistics (running mean and variance, batch count)."""
    names = []
    for prefix, m in model.named_modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            names += [f"{prefix}.{b}" for b in ("running_mean", "running_var", "num_batches_tracked")]
    return names


def _buffers(model):
    return dict(model.named_buffers())


def recompute(model, batches, autocast):
    """Precise statistics of `model` over `batches` (x, y), averaged across ranks, as a dict of
    state-dict names to tensors. The model's own buffers and the RNG are left as they were."""
    own = {k: v.clone() for k, v in _buffers(model).items()}
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    with autocast:
        update_bn(batches, model)
    bufs = _buffers(model)
    precise = {}
    for name in buffer_names(model):
        t = bufs[name].detach().clone()
        if t.is_floating_point() and distributed.is_distributed():
            distributed.all_reduce_sum(t)
            t /= distributed.world_size()
        precise[name] = t
    with torch.no_grad():
        for k, v in bufs.items():
            v.copy_(own[k])
    torch.set_rng_state(rng)
    if cuda_rng is not None:
        torch.cuda.set_rng_state(cuda_rng)
    return precise


def write(model, precise):
    """Make `precise` (recompute's statistics) the model's own running statistics."""
    bufs = _buffers(model)
    with torch.no_grad():
        for k, v in precise.items():
            bufs[k].copy_(v)


@contextlib.contextmanager
def overlay(model, precise):
    """Inside, `model` evaluates with the precise statistics; afterwards its own are back."""
    if not precise:
        yield
        return
    bufs = _buffers(model)
    own = {k: bufs[k].clone() for k in precise}
    with torch.no_grad():
        for k, v in precise.items():
            bufs[k].copy_(v)
    try:
        yield
    finally:
        with torch.no_grad():
            for k, v in own.items():
                bufs[k].copy_(v)
