"""CIFAR-100 loading, batched on-device augmentation and device-resident loaders.

Imports nothing from engine, refinery, torchscope or the scripts; errors are those of `errors`.

Files (data/cifar.py):
    load_cifar100(root, train, download=True) -> (images uint8 [N,3,32,32], labels int64 [N])
        raises errors.DataNotFound, DownloadFailed, DataPermission, DataError (corrupt or foreign file)
    MEAN, STD, NUM_CLASSES, TRAIN_IMAGES (50,000), TEST_IMAGES (10,000)

Augmentation (data/augment.py; recipes are data, see RECIPES and OPS there):
    AUG_RECIPES = ("uci", "standard", "none"); ALIASES = {"seed": "uci"}
    recipe_name(aug) -> the recipe's name, an alias resolved; errors.ConfigError(setting="aug") if unknown
    copies(aug) -> copies of the training set in one epoch (uci 3, standard 1, none 1)
    draw(aug, copy_id, gen, size=(32, 32)) -> float [n, K], every random choice, a row per sample
    apply(aug, x, draws) -> x augmented (float [B,3,H,W] in [0,1])
    make_pipeline(aug, device, memory_format=contiguous, fast=True) -> (uint8 [B,3,H,W], draws [B,K])
        -> normalised float images; the CPU fast path (data/augment_cpu.py) where it applies

Loaders (data/loader.py):
    Placement(device="cpu", rank=0, world_size=1, memory_format=contiguous): where batches go
    TrainLoader(images_u8, labels, batch_size, aug="uci", seed=0, place=Placement(), drop_last=False,
                fast=True)
        .set_epoch(e), .iterate(start_step=0), iter(), len(), .device, .aug (resolved name),
        .copies, .per_rank, .indices() [per_rank], .draws() float [per_rank, K]
        errors.ConfigError(setting="batch_size" / "aug" / "train_limit"); RunError from iterate()
    EvalLoader(images_u8, labels, batch_size, place=Placement())
        errors.ConfigError(setting="eval_batch_size")
    subset(images, labels, limit, setting=None) -> the first `limit` samples; ConfigError(setting=setting)
    derive_seed(*parts) -> a 63-bit random seed hashed from a tuple of tags and ints
"""
from .augment import ALIASES, AUG_RECIPES, RECIPES, apply, copies, draw, recipe_name
from .cifar import MEAN, NUM_CLASSES, STD, TEST_IMAGES, TRAIN_IMAGES, load_cifar100
from .loader import EvalLoader, Placement, TrainLoader, derive_seed, make_pipeline, subset

__all__ = [
    "ALIASES", "AUG_RECIPES", "MEAN", "NUM_CLASSES", "RECIPES", "STD", "TEST_IMAGES", "TRAIN_IMAGES", "EvalLoader", "Placement", "TrainLoader", "apply",
    "copies", "derive_seed", "draw", "load_cifar100", "make_pipeline", "recipe_name", "subset",
]
