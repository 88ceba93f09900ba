"""Evaluation on hard labels: loss, top-1, top-5, correct count, and teacher agreement."""
import argparse

import torch

import data
import models
from loss import make_criterion

from . import checkpoint, speed
from .distributed import all_reduce_sum

CHALLENGE_BAR = 80.0  # MicroNet CIFAR-100 track: at least 8,000 of 10,000 test images


@torch.inference_mode()
def evaluate(model, loader, criterion, autocast, teacher=None, tta=False, keep_mode=False):
    """Sums over this rank's shard, all-reduced, so every test image counts once across ranks.

    Nothing is read back to the host until the end: the sums stay on the device. keep_mode leaves
    the module's train/eval state alone (a teacher whose BatchNorm deliberately runs in train mode).
    """
    was_training = model.training
    if not keep_mode:
        model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=loader.device)
    count = 0
    for x, y in loader:
        with autocast:
            out = model(x)
            if tta:
                out = (out + model(x.flip(-1))) / 2
            loss = criterion(out, y)
            t_out = teacher(x) if teacher is not None else None
        top5 = out.float().topk(min(5, out.shape[1]), dim=1).indices
        agree = (t_out.float().argmax(1) == top5[:, 0]).sum() if t_out is not None else torch.zeros(
            (), device=sums.device)
        sums += torch.stack([loss.double() * len(y), (top5[:, 0] == y).sum().double(),
                             (top5 == y[:, None]).any(dim=1).sum().double(), agree.double()])
        count += len(y)
    totals = torch.cat([sums, torch.tensor([float(count)], dtype=torch.float64).to(sums.device)])
    loss_sum, c1, c5, agree, n = all_reduce_sum(totals).tolist()
    if not keep_mode:
        model.train(was_training)
    n = max(n, 1.0)
    result = {"loss": loss_sum / n, "top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n,
              "correct": int(round(c1)), "total": int(round(n))}
    if teacher is not None:
        result["agreement"] = 100.0 * agree / n
    return result


def evaluate_checkpoint(model_name, path, data_dir, device, *, coslinear=True, width_mult=None,
                        depth_mult=None, s=5.0, amp=None, batch_size=1000, test_limit=None, tta=False,
                        download=False, rank=0, world_size=1):
    """test.py's figures for a checkpoint file: (result with reached_80, the loaded model, file meta).

    Inference runs as training evaluated: bf16 and channels_last on CUDA, fp32 on the CPU."""
    fast = argparse.Namespace(amp=amp, channels_last=None, compile=False, fused_optimizer=None)
    speed.resolve(fast, device)
    fmt = speed.memory_format(fast)
    model = models.create(model_name, coslinear=coslinear, width_mult=width_mult, depth_mult=depth_mult)
    meta = checkpoint.load_weights(model, path)
    model.to(device=device, memory_format=fmt)
    images, labels = data.load_cifar100(data_dir, train=False, download=download)
    images, labels = data.subset(images, labels, test_limit)
    loader = data.EvalLoader(images, labels, batch_size, device=device, rank=rank, world_size=world_size,
                             memory_format=fmt)
    r = evaluate(model, loader, make_criterion(coslinear, s), speed.autocast(fast, device), tta=tta)
    r["reached_80"] = r["total"] == 10000 and r["top1"] >= CHALLENGE_BAR
    return r, model, meta
