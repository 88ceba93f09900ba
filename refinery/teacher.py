"""The teacher: loaded from a checkpoint file (ours or the original entry's) and frozen, and the
refined objective (label refinery, arXiv 1805.02641).

The teacher sees the very same augmented batch as the student, inside the same autocast region and
memory format, under no_grad; its parameters never change. DDP wraps the student alone, so each
rank runs its own teacher copy on its own shard and no teacher buffer is ever broadcast.
"""
import os

import torch
from torch import nn

from micronet_cifar100 import errors
import models
from engine.checkpoint import load_weights
from loss import logits_from_output, soft_target_loss

BN_MODES = ("eval", "train")


def freeze(teacher, bn_mode="eval"):
    """Eval mode, no gradients. bn_mode "train" reproduces the original entry's quirk: its teacher
    stayed in train mode, so BatchNorm normalised with the batch's statistics; not tracking them
    keeps every buffer (and so the teacher) untouched."""
    if bn_mode not in BN_MODES:
        raise errors.ConfigError(f"unknown teacher BatchNorm mode {bn_mode!r}; use eval or train",
                                 setting="refinery_bn")
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    if bn_mode == "train":
        for m in teacher.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train()
                m.track_running_stats = False
    return teacher


def load_teacher(name, path, head="cosine", width_mult=None, depth_mult=None, bn_mode="eval",
                 device="cpu", memory_format=torch.contiguous_format):
    """Build `name`, load its weights from `path` (applying a compression record it holds) and
    freeze it; returns (teacher, file metadata)."""
    if not path:
        raise errors.ConfigError("a teacher model needs its checkpoint file (the teacher's "
                                 "model_best.pytar)", setting="label_refinery_state_file")
    if not os.path.exists(path):
        raise errors.CheckpointError(f"teacher checkpoint {path} does not exist; give the teacher's "
                                     "model_best.pytar")
    teacher = models.create(name, head=head, width_mult=width_mult, depth_mult=depth_mult)
    try:
        meta = load_weights(teacher, path)
    except errors.CheckpointError as e:
        e.setting = e.setting or "label_refinery_state_file"   # the teacher's file, not the student's
        raise
    teacher = freeze(teacher, bn_mode).to(device=device, memory_format=memory_format)
    return teacher, meta


class Refinery:
    """Objective of a refined stage: -sum softmax(s * teacher cos) * log_softmax(s * student cos).

    Called as objective(student_out, x, y) like every objective of engine.step; the labels y are not
    used (evaluation uses them)."""

    def __init__(self, teacher, s, teacher_cosine=True, student_cosine=True, forward=None):
        self.teacher = teacher
        self.s = s
        self.teacher_cosine, self.student_cosine = teacher_cosine, student_cosine
        # A compiled forward may replace the module call; the module itself stays the one we froze.
        self.forward = forward or teacher

    @torch.no_grad()
    def targets(self, x):
        return logits_from_output(self.forward(x), self.s, self.teacher_cosine)

    def __call__(self, student_out, x, y=None):
        """(loss, teacher logits) for a batch x on which the student produced `student_out`."""
        teacher_logits = self.targets(x)
        student_logits = logits_from_output(student_out, self.s, self.student_cosine)
        return soft_target_loss(student_logits, teacher_logits), teacher_logits
