"""The late phase of quantisation-aware training: freezing the input observers and the BatchNorm
statistics at epoch boundaries, as torchvision's references/classification/train_quantization.py
does after set numbers of epochs (Krishnamoorthi 2018, "Quantizing deep convolutional networks for
efficient inference", arXiv 1806.08342, recommends moving BatchNorm to its long-term statistics
after sufficient training).

- Observers: the min/max input quantisers stop updating their range, scale and zero point; the
  grids the network trains against from then on are the ones it is evaluated and deployed with.
  LSQ layers have no observer (their steps are trained): freezing leaves them alone.
- BatchNorm: every BatchNorm normalises with its running statistics in training too, and stops
  updating them; its affine weights still train. The folded weights (compress.quant) are then the
  same in training and evaluation.

Both survive model.train() (the way every training loop re-enters training after an evaluation):
Quantised.train leaves a frozen observer off, and a frozen BatchNorm turns itself back to eval mode
at the start of each forward (a forward pre-hook; its `training` attribute may read True between
model.train() and its next forward, but no forward ever sees it). Precise BatchNorm statistics
(engine/precise_bn.py) recompute statistics by running BatchNorm in training mode, which a frozen
BatchNorm refuses: a run skips them once the statistics are frozen (they are then what the network
trains with).

    qat = compress.QATSchedule(model, observers_epoch=21, batchnorm_epoch=21)
    for epoch in ...: qat.step(epoch); train the epoch       # every rank, at the epoch's start
    saved["qat"] = qat.state_dict(); ...; qat.load_state_dict(saved["qat"])   # resume
"""
import torch

from micronet_cifar100 import errors

from . import quant as Q

# Set on a BatchNorm whose statistics are frozen (a plain attribute: not in the state_dict).
FROZEN_BN = "_compress_frozen_stats"


def _batchnorms(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def _observed(model):
    """The quantised layers with a min/max input observer."""
    return [m for m in Q.quantised_layers(model).values()
            if m.method == "minmax" and getattr(m, Q.QUANT_CHILD, None) is not None]


def freeze_observers(model, frozen=True):
    """Stop (or, frozen=False, let resume in training) every min/max input observer of `model`.
    Returns the model."""
    for m in Q.quantised_layers(model).values():
        m.observer_frozen = bool(frozen)
        m.train(m.training)   # applies the flag to the observer now
    return model


def _hold_statistics(module, args):
    if getattr(module, FROZEN_BN, False) and module.training:
        module.training = False


def freeze_batchnorm(model, frozen=True):
    """Make every BatchNorm of `model` normalise with its running statistics and stop updating them,
    in training too (or, frozen=False, undo that from the next model.train()). Returns the model."""
    for bn in _batchnorms(model):
        if frozen and _hold_statistics not in bn._forward_pre_hooks.values():
            bn.register_forward_pre_hook(_hold_statistics)
        setattr(bn, FROZEN_BN, bool(frozen))
        if frozen:
            bn.train(False)
    return model


def frozen_state(model):
    """{"observers": bool, "batchnorm": bool}: whether every min/max input observer, and every
    BatchNorm, of `model` is frozen (False where it has none)."""
    observed, bns = _observed(model), _batchnorms(model)
    return {"observers": bool(observed) and all(m.observer_frozen for m in observed),
            "batchnorm": bool(bns) and all(getattr(bn, FROZEN_BN, False) for bn in bns)}


def _epoch(v, what):
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
        raise errors.ConfigError(f"the epoch to freeze {what} from must be a whole number from 1, got {v!r}",
                                 setting="qat_freeze")
    return v


class QATSchedule:
    """When the late phase of QAT starts: the input observers frozen from the start of
    `observers_epoch`, the BatchNorm statistics from the start of `batchnorm_epoch` (epochs count
    from 1; None: never). Freezing is one-way: a frozen model stays frozen."""

    def __init__(self, model, observers_epoch=None, batchnorm_epoch=None):
        self.model = model
        self.observers_epoch = _epoch(observers_epoch, "the input observers")
        self.batchnorm_epoch = _epoch(batchnorm_epoch, "the BatchNorm statistics")
        self.last_epoch = None

    def step(self, epoch):
        """At the start of `epoch`, on every rank, before its first training step: freeze what is due.
        Calling it again, or for an earlier epoch (a resumed run), changes nothing. Returns
        frozen_state."""
        if self.observers_epoch is not None and epoch >= self.observers_epoch:
            freeze_observers(self.model)
        if self.batchnorm_epoch is not None and epoch >= self.batchnorm_epoch:
            freeze_batchnorm(self.model)
        self.last_epoch = epoch if self.last_epoch is None else max(self.last_epoch, epoch)
        return self.frozen()

    def frozen(self):
        return frozen_state(self.model)

    def summary(self):
        """Plain values for logs and the compression record."""
        state = self.frozen()
        return {"observers_epoch": self.observers_epoch, "batchnorm_epoch": self.batchnorm_epoch,
                "observers_frozen": state["observers"], "batchnorm_frozen": state["batchnorm"]}

    def state_dict(self):
        """What a resumed run needs (plain values): the schedule, the last epoch stepped, what is
        frozen."""
        return {**self.summary(), "last_epoch": self.last_epoch}

    def load_state_dict(self, state, source="the QAT state"):
        """Restore the schedule the run started with and freeze what was frozen (CheckpointError, one
        line, for a state that is not one)."""
        keys = ("observers_epoch", "batchnorm_epoch", "observers_frozen", "batchnorm_frozen")
        if not isinstance(state, dict) or any(k not in state for k in keys):
            raise errors.CheckpointError(f"{source} is not a QAT schedule state (it needs {', '.join(keys)})")
        try:
            self.observers_epoch = _epoch(state["observers_epoch"], "the input observers")
            self.batchnorm_epoch = _epoch(state["batchnorm_epoch"], "the BatchNorm statistics")
        except errors.ConfigError as e:
            raise errors.CheckpointError(f"{source}: {e}") from None
        self.last_epoch = state.get("last_epoch")
        if state["observers_frozen"]:
            freeze_observers(self.model)
        if state["batchnorm_frozen"]:
            freeze_batchnorm(self.model)
