"""Loading a label-refinery teacher from a checkpoint file (ours or the original entry's)."""
import os

import torch

import errors
import models
import refinery

from .checkpoint import load_weights


def load_teacher(name, path, head="cosine", width_mult=None, depth_mult=None, bn_mode="eval",
                 device="cpu", memory_format=torch.contiguous_format):
    """Build `name`, load its weights from `path` and freeze it; returns (teacher, file metadata)."""
    if not path:
        raise errors.ConfigError("a teacher model needs its checkpoint file (the teacher's "
                                 "model_best.pytar)", setting="label_refinery_state_file")
    if not os.path.exists(path):
        raise errors.CheckpointError(f"teacher checkpoint {path} does not exist; give the teacher's "
                                     "model_best.pytar")
    teacher = models.create(name, head=head, width_mult=width_mult, depth_mult=depth_mult)
    meta = load_weights(teacher, path)
    teacher = refinery.freeze(teacher, bn_mode).to(device=device, memory_format=memory_format)
    return teacher, meta
