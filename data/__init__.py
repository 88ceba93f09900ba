"""CIFAR-100 loading, batched on-device augmentation and device-resident loaders."""
from .augment import (AUG_RECIPES, color_jitter, copies, crop_boxes, hflip, jitter_params,
                      make_augment, mirror, pad_crop, random_resized_crop, resized_crop, shift_crop)
from .cifar import MEAN, NUM_CLASSES, STD, load_cifar100
from .loader import EvalLoader, TrainLoader, derive_seed, subset

__all__ = [
    "AUG_RECIPES", "MEAN", "NUM_CLASSES", "STD", "EvalLoader", "TrainLoader", "color_jitter",
    "copies", "crop_boxes", "derive_seed", "hflip", "jitter_params", "load_cifar100",
    "make_augment", "mirror", "pad_crop", "random_resized_crop", "resized_crop", "shift_crop", "subset",
]
