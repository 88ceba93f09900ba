"""The frozen teacher and the refined objective.

The teacher sees the very same augmented batch as the student, inside the same autocast region and
memory format, under no_grad; its parameters never change. DDP wraps the student alone, so each
rank runs its own teacher copy on its own shard and no teacher buffer is ever broadcast.
"""
import os

import torch
from torch import nn

import models
from engine.checkpoint import load_weights
from engine.errors import UserError
from loss import logits_from_output, soft_target_loss

BN_MODES = ("eval", "train")


def _freeze(teacher, bn_mode):
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    if bn_mode == "train":
        # The original's quirk: the teacher stayed in train mode, so BatchNorm normalised with the
        # batch's statistics. Not tracking keeps every buffer (and so the teacher) untouched.
        for m in teacher.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train()
                m.track_running_stats = False
    return teacher


def load_teacher(name, state_file, width_mult=None, depth_mult=None, coslinear=True,
                 bn_mode="eval", device="cpu", memory_format=torch.contiguous_format):
    """Build `name`, load `state_file` (original or our format) and freeze it; errors are one line."""
    if bn_mode not in BN_MODES:
        raise UserError(f"unknown --refinery-bn {bn_mode!r}; use eval or train")
    if not state_file:
        raise UserError("--label-refinery-model needs --label-refinery-state-file PATH (the teacher's "
                        "model_best.pytar)")
    if not os.path.exists(state_file):
        raise UserError(f"teacher checkpoint {state_file} does not exist; pass the teacher's "
                        "model_best.pytar with --label-refinery-state-file")
    try:
        teacher = models.create(name, coslinear=coslinear, width_mult=width_mult, depth_mult=depth_mult)
    except ValueError as e:
        raise UserError(f"--label-refinery-model: {e}") from None
    meta = load_weights(teacher, state_file)
    teacher = _freeze(teacher, bn_mode).to(device=device, memory_format=memory_format)
    return teacher, meta


class Refinery:
    """Loss of a refined stage: -sum softmax(s * teacher cos) * log_softmax(s * student cos)."""

    def __init__(self, teacher, s, teacher_coslinear=True, student_coslinear=True, forward=None):
        self.teacher = teacher
        self.s = s
        self.teacher_coslinear, self.student_coslinear = teacher_coslinear, student_coslinear
        # A compiled forward may replace the module call; the module itself stays the one we froze.
        self.forward = forward or teacher

    @torch.no_grad()
    def targets(self, x):
        return logits_from_output(self.forward(x), self.s, self.teacher_coslinear)

    def __call__(self, student_out, x):
        """(loss, teacher logits) for a batch the student produced `student_out` on."""
        teacher_logits = self.targets(x)
        student_logits = logits_from_output(student_out, self.s, self.student_coslinear)
        return soft_target_loss(student_logits, teacher_logits), teacher_logits
