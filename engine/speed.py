"""The fast path per device: autocast dtype, memory format, torch.compile, optimizer kernels.

Each speed-up has a setting; `None` means "pick the fastest for this device".
"""
import contextlib
import time

import torch

import errors

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve(args, device):
    """Fill in the automatic choices of args (amp, channels_last, compile, fused) for `device`."""
    cuda = device.type == "cuda"
    if args.amp is None:
        # bf16 needs no loss scaling and halves activation traffic; on CPUs autocast mostly slows.
        args.amp = "bf16" if cuda else "off"
    if args.amp not in ("bf16", "fp16", "off"):
        raise errors.ConfigError(f"unknown autocast type {args.amp!r}; use bf16, fp16 or off", setting="amp")
    if args.amp == "fp16" and not cuda:
        raise errors.ConfigError("fp16 autocast needs a CUDA device; use bf16 or off on the CPU",
                                 setting="amp")
    if args.channels_last is None:
        # NHWC suits this network's depthwise and 1x1 convs on both cuDNN and oneDNN (measured
        # 1.4x on CPU for a narrow ex train step; see bench/step.py).
        args.channels_last = True
    if args.compile is None:
        # Compiling fuses the BN/Swish/SE elementwise chains that dominate this network's step;
        # on CPUs the compile time outweighs the gain for the short runs people do there.
        args.compile = cuda
    if args.fused_optimizer is None:
        args.fused_optimizer = cuda
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return args


def memory_format(args):
    return torch.channels_last if args.channels_last else torch.contiguous_format


def autocast(args, device):
    if args.amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[args.amp])


def make_optimizer(params, args, lr):
    """SGD as the original entry: momentum, weight decay on all parameters, no Nesterov."""
    kw = dict(lr=lr, momentum=args.momentum, weight_decay=args.weight_decay, nesterov=False)
    if args.fused_optimizer:
        try:
            return torch.optim.SGD(params, fused=True, **kw)
        except (RuntimeError, TypeError):
            pass
    return torch.optim.SGD(params, foreach=True, **kw)


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
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        log(f"torch.compile is unavailable here ({type(e).__name__}: {first[:120]}); running eager")
        return module
