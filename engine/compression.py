"""Compression inside a training run (the `compress` package, docs/compression.md): the student
quantised before the optimizer, DDP or torch.compile see it; the pruner attached to the optimizer
and stepped at each epoch's start; both restored on resume; and the record the checkpoints carry.

A dense run (no pruning, no quantisation) stores nothing of this: its files are as before.
"""
import contextlib
import os

import compress
from micronet_cifar100 import errors

from . import checkpoint


def quantise(net, quant, first_last=None):
    """Fake-quantise `net` in place for QAT when `quant` is a (weight bits, activation bits) pair;
    `first_last` gives the stem conv and the head their own pair."""
    if quant:
        compress.quantize(net, quant[0], quant[1], first_last_bits=tuple(first_last) if first_last else None)
    return net


def check(cfg):
    """Settings that go together, checked once a resumed run's settings are inherited (a resume that
    repeats its run's own settings is fine), and what QAT refuses."""
    if cfg.quant_first_last and not cfg.quant:
        raise errors.ConfigError("widths for the first layer and the head need the other layers' widths "
                                 "(quantisation of the whole model)", setting="quant_first_last")
    if not cfg.prune and (cfg.prune_schedule or cfg.prune_scope):
        raise errors.ConfigError("a pruning span or scope needs a target sparsity", setting="prune_schedule")
    if cfg.quant and cfg.activation_checkpointing:
        raise errors.ConfigError("recomputing each block in the backward pass cannot be combined with "
                                 "quantisation-aware training: it would observe the block's input ranges twice",
                                 setting="activation_checkpointing")


def make_pruner(net, optimizer, target, span, scope):
    """The run's pruner (None without a target) on the cubic schedule over `span` (start, end),
    attached to the optimizer."""
    if not target:
        return None
    schedule = compress.PruneSchedule(target, int(span[0]), int(span[1]))
    return compress.Pruner(net, schedule, scope=scope).attach(optimizer)


def check_span(pruner, epochs, setting):
    """The pruning span must end by the last epoch: the best checkpoint is chosen among the epochs at
    the target sparsity, so a run that never reaches it would have none."""
    if pruner is not None and pruner.schedule.end_epoch > epochs:
        raise errors.ConfigError(f"the pruning span ends at epoch {pruner.schedule.end_epoch}, after the run's "
                                 f"last epoch {epochs}; end it by epoch {epochs} (the best checkpoint is chosen "
                                 "among the epochs that reached the target sparsity)", setting=setting)


def is_compressed(net, pruner):
    return pruner is not None or bool(compress.quantised_layers(net))


def record(net, pruner):
    """The compression record the checkpoints carry, or None for a dense run."""
    return compress.record(net, pruner) if is_compressed(net, pruner) else None


def restore(net, pruner, saved, path):
    """A resumed run's input ranges (from the record in last.pytar) and masks (its pruner state).
    The model is already quantised with the run's own bits, so its layers are kept as they are."""
    rec = saved.get("compression")
    if rec is not None:
        compress.apply_record(net, rec, source=path)
    if pruner is not None:
        if not saved.get("pruner"):
            raise errors.CheckpointError(f"{path} holds no pruning state, but this run prunes; resume it "
                                         "with the settings it was started with")
        # Masks, position and the schedule the run started with (a default span follows --epochs,
        # which a resume may change).
        pruner.load_state_dict(saved["pruner"], source=path)


def exact_numerics(net):
    """Whether evaluation must run in float32: integer-grid (2..8-bit) and float16 layers are exact
    only without autocast (bf16 holds neither every product of a grid value and its scale nor every
    float16 value)."""
    return any(m.weight_bits in compress.SIMULATED_BITS or m.act_bits in compress.SIMULATED_BITS
               for m in compress.quantised_layers(net).values())


def eval_autocast(net, autocast):
    return contextlib.nullcontext() if exact_numerics(net) else autocast


def init_from(net, path):
    """Start a run from trained weights (fine-tuning, e.g. to compress them): the weights only, with
    the BatchNorm statistics they were evaluated with. The optimizer state and the compression record
    of the source are not carried over. Returns a line for the log."""
    if not os.path.isfile(path):
        raise errors.CheckpointError(f"{path} does not exist; give the model_best.pytar of a trained "
                                     "model to start from", setting="init_from")
    try:
        obj = checkpoint.load_file(path)
        state, meta = checkpoint.state_dict_of(obj, path)
        checkpoint.fit_state_dict(net, state, path, meta)
    except errors.CheckpointError as e:
        e.setting = "init_from"  # the message names the file; the setting names the flag to change
        raise
    rec = meta.get("compression") if isinstance(meta, dict) else None
    what = f" (its compression, {compress.summary(rec)}, is not carried over)" if rec else ""
    epoch = meta.get("epoch") if isinstance(meta, dict) else None
    return f"initialised from {path}" + (f" (epoch {epoch})" if epoch else "") + what


def log_line(net, pruner):
    """One log line for a compressed run, or None."""
    parts = []
    q = compress.quantised_layers(net)
    if q:
        parts.append("QAT " + compress.widths_text([(m.weight_bits, m.act_bits) for m in q.values()]))
    if pruner is not None:
        s = pruner.schedule
        parts.append(f"pruning to {100 * s.target:g}% ({pruner.scope} scope) over epochs {s.start_epoch}..{s.end_epoch}, "
                     f"{len(pruner.params)} layers pruned")
    return "compression: " + "; ".join(parts) if parts else None
