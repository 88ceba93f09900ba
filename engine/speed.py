"""The fast path per device: autocast dtype, memory format, torch.compile, optimizer kernels.

Each speed-up has a setting; `None` means "pick the fastest for this device".
"""
import contextlib
import time
from dataclasses import dataclass

import torch

from micronet_cifar100 import errors

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Speed:
    """The speed switches a run uses on its device: the configuration's, with its automatic
    choices (None) made (`resolve`)."""
    amp: str = "off"
    channels_last: bool = False
    compile: bool = False
    fused_optimizer: bool = False

    @property
    def memory_format(self):
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def autocast(self, device):
        if self.amp == "off":
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[self.amp])


def resolve(amp=None, channels_last=None, compile=None, fused_optimizer=None, device=None, quantised=False):
    """The Speed for `device` from settings that may be None (pick the fastest); ConfigError for an
    autocast type the device cannot run."""
    cuda = device is not None and device.type == "cuda"
    # bf16 needs no loss scaling and halves activation traffic; on CPUs autocast mostly slows.
    amp = amp if amp is not None else ("bf16" if cuda else "off")
    if amp not in ("bf16", "fp16", "off"):
        raise errors.ConfigError(f"unknown autocast type {amp!r}; use bf16, fp16 or off", setting="amp")
    if amp == "fp16" and not cuda:
        raise errors.ConfigError("fp16 autocast needs a CUDA device; use bf16 or off on the CPU",
                                 setting="amp")
    if compile is None:
        # Compiling fuses the BN/Swish/SE elementwise chains that dominate this network's step; on
        # CPUs the compile time outweighs the gain for the short runs people do there. Fake
        # quantisers under torch.compile are untried: QAT runs eager unless asked.
        compile = cuda and not quantised
    return Speed(amp=amp,
                 # NHWC suits this network's depthwise and 1x1 convs on both cuDNN and oneDNN
                 # (measured 1.4x on CPU for a narrow ex train step; see bench/step.py).
                 channels_last=True if channels_last is None else channels_last,
                 compile=compile, fused_optimizer=cuda if fused_optimizer is None else fused_optimizer)


def of_config(cfg, device, quantised=False):
    """The Speed of a run configuration (or anything with its four speed settings) on `device`."""
    return resolve(cfg.amp, cfg.channels_last, cfg.compile, cfg.fused_optimizer, device, quantised)


def set_global_switches(device):
    """torch's process-wide switches for speed on `device`: cuDNN's autotuner and TF32 matmuls on
    CUDA (the one place this toolkit changes global torch state)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def probe(module, x, autocast_ctx):
    """One forward and backward of `module` on x that changes nothing: gradients, BatchNorm
    statistics and the RNG are put back as they were."""
    buffers = [b.clone() for b in module.buffers()]
    rng = torch.get_rng_state()
    with autocast_ctx:
        out = module(x)
    out.float().sum().backward()
    module.zero_grad(set_to_none=True)
    with torch.no_grad():
        for b, saved in zip(module.buffers(), buffers):
            b.copy_(saved)
    torch.set_rng_state(rng)


def seconds_per_sample(module, x, autocast_ctx):
    """The time of a training forward and backward per sample, from a second probe (the first
    warms up): an estimate of the step's speed before any step ran."""
    probe(module, x, autocast_ctx)
    t0 = time.perf_counter()
    probe(module, x, autocast_ctx)
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    return (time.perf_counter() - t0) / x.shape[0]


def compile_module(module, x, autocast_ctx, log, train=True):
    """torch.compile `module`, proven on one call on the batch x; on any failure, the eager module.
    A training probe changes no result (see `probe`)."""
    try:
        compiled = torch.compile(module)
        if train:
            probe(compiled, x, autocast_ctx)
        else:
            with torch.no_grad(), autocast_ctx:
                compiled(x)
        return compiled
    except Exception as e:  # compile back-ends fail in many ways (no compiler, no triton, ...)
        log(f"torch.compile is unavailable here ({type(e).__name__}: {errors.first_line(e)}); running eager")
        return module
