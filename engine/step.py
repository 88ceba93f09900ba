"""The training step: the Trainer and bench/step.py call `train_step`, the one place where gradients
update the weights. (A pruner's step post-hook then zeroes the pruned weights, and loading a
compression record sets quantised numerics: neither is a training update.)
"""
from dataclasses import dataclass
from typing import Any, Callable

import torch

from . import distributed


class HardLabels:
    """The objective of a stage trained on labels: criterion(out, y), no teacher."""

    def __init__(self, criterion):
        self.criterion = criterion

    def __call__(self, out, x, y):
        return self.criterion(out, y), None


@dataclass
class StepParts:
    """What a step needs besides the batch. `model` is what the step calls (DDP or compiled
    around the student); `objective(out, x, y) -> (loss, teacher logits or None)`."""
    model: torch.nn.Module
    objective: Callable
    optimizer: torch.optim.Optimizer
    scaler: Any  # torch.amp.GradScaler (enabled for fp16 only)
    autocast: Any  # a context manager
    # Skip a step whose loss is not finite (reads the loss on the host every step).
    skip_nonfinite: bool = False


def train_step(parts, x, y, meter):
    """Forward and loss under autocast, backward, optimizer step, then the meter's update.

    Returns the loss's finiteness as a device tensor, so nothing waits for the device here. With
    skip_nonfinite, a non-finite loss leaves the model exactly as it was (weights, optimizer state,
    BatchNorm statistics) and the step is not metered; that check reads the loss on the host.
    """
    model = parts.model
    if parts.skip_nonfinite:
        buffers = [b.clone() for b in model.buffers()]
    with parts.autocast:
        out = model(x)
        loss, teacher_logits = parts.objective(out, x, y)
    finite = torch.isfinite(loss)
    # Every rank must skip together, or the others would wait in the gradient all-reduce.
    if parts.skip_nonfinite and distributed.any_rank(not bool(finite), loss.device):
        finite = torch.zeros((), dtype=torch.bool, device=loss.device)
        with torch.no_grad():
            for b, saved in zip(model.buffers(), buffers):
                b.copy_(saved)
        return finite
    parts.optimizer.zero_grad(set_to_none=True)
    parts.scaler.scale(loss).backward()
    parts.scaler.step(parts.optimizer)
    parts.scaler.update()
    meter.update(loss, out, y, teacher_logits)
    return finite
