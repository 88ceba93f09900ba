"""Evaluation on hard labels: loss, top-1, top-5, correct count, and agreement with a teacher."""
import torch

import data
import models
from loss import make_criterion

from . import checkpoint, compression, speed
from .meter import Meter

CHALLENGE_BAR = 80.0  # MicroNet CIFAR-100 track: at least 8,000 of the 10,000 test images


@torch.inference_mode()
def evaluate(model, loader, criterion, autocast, teacher=None, tta=False, keep_mode=False):
    """Figures over this rank's shard, summed across ranks, so every test image counts once.

    Nothing is read back to the host until the end. With tta the outputs on each image and its
    mirror are averaged. keep_mode leaves the module's train/eval state alone (a teacher whose
    BatchNorm deliberately runs in train mode)."""
    was_training = model.training
    if not keep_mode:
        model.eval()
    meter = Meter(loader.device)
    for x, y in loader:
        with autocast:
            out = model(x)
            if tta:
                out = (out + model(x.flip(-1))) / 2
            loss = criterion(out, y)
            t_out = teacher(x) if teacher is not None else None
        meter.update(loss, out, y, t_out.float() if t_out is not None else None, top5=True)
    result = meter.summary(reduce=True)
    if not keep_mode:
        model.train(was_training)
    if teacher is None:
        del result["agreement"]
    return result


def evaluate_checkpoint(cfg, path, ctx, tta=False):
    """test.py's figures for a checkpoint file: (result with reached_80, the loaded model, file meta).

    cfg is anything with the settings model, coslinear, width_mult, depth_mult, s, amp,
    eval_batch_size, test_limit, data_dir and no_download (test.py's parsed flags, a RunConfig); it
    is only read. Inference runs as training evaluated: bf16 and channels_last on CUDA, fp32 on the
    CPU; a checkpoint with quantised layers (its compression record) in fp32 everywhere, the
    numerics it was trained for."""
    model = models.create(cfg.model, head=models.head_name(cfg.coslinear), width_mult=cfg.width_mult,
                          depth_mult=cfg.depth_mult)
    meta = checkpoint.load_weights(model, path)
    amp = "off" if compression.exact_numerics(model) else cfg.amp
    fast = speed.resolve(amp=amp, compile=False, device=ctx.device)
    model.to(device=ctx.device, memory_format=fast.memory_format)
    images, labels = data.load_cifar100(cfg.data_dir, train=False, download=not cfg.no_download)
    images, labels = data.subset(images, labels, cfg.test_limit)
    loader = data.EvalLoader(images, labels, cfg.eval_batch_size,
                             place=data.Placement(ctx.device, ctx.rank, ctx.world_size, fast.memory_format))
    r = evaluate(model, loader, make_criterion(cfg.coslinear, cfg.s), fast.autocast(ctx.device), tta=tta)
    r["reached_80"] = r["total"] == data.TEST_IMAGES and r["top1"] >= CHALLENGE_BAR
    return r, model, meta
