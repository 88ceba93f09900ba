"""The run configuration: one frozen RunConfig per training run, built and validated once by the
command line (cli/train_flags.py) or by chain.py, and read, never written, by everything below.

A resumed run takes the settings the user did not give from the run it continues (`inherit`),
which returns a new RunConfig. What a run derives from its settings (the LR regime of a fine-tuning
run, the pruning span, the speed switches for the device) lives with the Trainer, not here: the
saved settings stay what the user asked for, so a resume recomputes the same derivations.
"""
import dataclasses
from dataclasses import dataclass
from typing import Optional

from micronet_cifar100 import errors

# Settings that define what a run computes: a resume must agree on all of them. The rest (device,
# speed switches, progress, paths) may change between the original run and its resume.
IDENTITY = ("model", "width_mult", "depth_mult", "coslinear", "s", "m", "label_smoothing",
            "lr_regime", "batch_size", "momentum", "weight_decay", "seed", "aug", "train_limit",
            "test_limit", "label_refinery_model", "label_refinery_state_file",
            "label_refinery_width_mult", "label_refinery_depth_mult", "refinery_bn",
            "drop_connect", "dropout", "bn_momentum", "lr_scale", "sync_bn", "nan_policy",
            "init_from", "prune", "prune_schedule", "prune_scope", "prune_exclude", "prune_max_sparsity",
            "quant", "quant_first_last", "quant_method", "qat_freeze_observers", "qat_freeze_bn")

# Not part of a run's identity, but a resume that does not give them keeps the run's values.
INHERITED = ("epochs", "data_dir", "eval_batch_size", "checkpoint_every", "keep_epoch_states",
             "no_download", "precise_bn")

# How the run was started, kept for the command that resumes it; not a setting, never saved.
LAUNCH = ("argv", "given", "script")


@dataclass(frozen=True)
class RunConfig:
    """Every setting of one training run (train.py's flags, by their argparse names)."""
    # model
    model: str = "efficientnet_ex"
    width_mult: Optional[float] = None
    depth_mult: Optional[float] = None
    coslinear: bool = True
    # data
    data_dir: str = "."
    no_download: bool = False
    test_limit: Optional[int] = None
    train_limit: Optional[int] = None
    aug: str = "uci"
    # loss
    s: float = 5.0
    m: float = 0.0
    label_smoothing: float = 0.0
    # optimisation
    lr_regime: Optional[str] = None
    lr_scale: str = "linear"
    epochs: Optional[int] = None
    batch_size: int = 128
    eval_batch_size: int = 1000
    momentum: float = 0.9
    weight_decay: float = 1e-4
    drop_connect: Optional[float] = None
    dropout: Optional[float] = None
    bn_momentum: Optional[float] = None
    precise_bn: str = "auto"
    seed: int = 0
    nan_policy: str = "stop"
    # label refinery
    label_refinery_model: Optional[str] = None
    label_refinery_state_file: Optional[str] = None
    label_refinery_width_mult: Optional[float] = None
    label_refinery_depth_mult: Optional[float] = None
    label_refinery_coslinear: bool = True
    refinery_bn: str = "eval"
    # compression
    prune: Optional[float] = None
    prune_schedule: Optional[list] = None
    prune_scope: Optional[str] = None
    prune_exclude: Optional[list] = None       # layers left dense (None: compress.DEFAULT_EXCLUDE)
    prune_max_sparsity: Optional[float] = None  # None: compress.MAX_SPARSITY
    quant: Optional[list] = None
    quant_first_last: Optional[list] = None
    quant_method: Optional[str] = None          # None: compress.DEFAULT_METHOD
    qat_freeze_observers: Optional[int] = None  # the epoch to freeze from; 0: never
    qat_freeze_bn: Optional[int] = None
    # run
    save: str = "checkpoints"
    init_from: Optional[str] = None
    resume: Optional[str] = None
    checkpoint_every: Optional[int] = None
    keep_epoch_states: bool = True
    log_interval: int = 50
    no_progress: bool = False
    # speed (None: the fastest for the device, engine.speed.resolve)
    device: str = "auto"
    amp: Optional[str] = None
    channels_last: Optional[bool] = None
    compile: Optional[bool] = None
    fused_optimizer: Optional[bool] = None
    sync_bn: bool = False
    activation_checkpointing: bool = False
    # how the run was launched (LAUNCH): the command line, the flags given on it, the script
    argv: tuple = ()
    given: tuple = ()
    script: str = "train.py"

    @classmethod
    def from_mapping(cls, values, **changes):
        """A RunConfig from a mapping holding (at least) its settings, e.g. vars() of parsed flags;
        keys that are no setting are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{**{k: v for k, v in dict(values).items() if k in names}, **changes})

    def settings(self):
        """The settings as plain values, without the launch details: what args.json and last.pytar
        hold, and what a later resume compares against."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in LAUNCH}

    def identity(self):
        return identity(self.settings())

    @property
    def refined(self):
        return bool(self.label_refinery_model)

    def inherit(self, saved, path):
        """This configuration resumed from a run saved with the settings `saved`: settings the user
        did not give come from the saved run; those given must agree with it (RunError otherwise)."""
        mismatched = [k for k in IDENTITY if k in self.given and getattr(self, k) != saved.get(k)]
        if mismatched:
            what = ", ".join(f"--{k.replace('_', '-')} {getattr(self, k)!r} (run: {saved.get(k)!r})"
                             for k in mismatched)
            raise errors.RunError(f"--resume {path} belongs to a run with other arguments: {what}; drop those "
                                  "flags or start a new run")
        return dataclasses.replace(self, **{k: saved[k] for k in IDENTITY + INHERITED
                                            if k in saved and k not in self.given})


def identity(settings):
    """The identity settings of a saved run's settings (a dict, e.g. last.pytar's "args")."""
    return {k: settings.get(k) for k in IDENTITY}


def identity_diff(a, b):
    """Identity settings on which two settings dicts differ."""
    ia, ib = identity(a), identity(b)
    return [k for k in IDENTITY if ia[k] != ib[k]]
