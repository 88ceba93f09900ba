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


def quantise(net, quant, first_last=None, method=None):
    """Fake-quantise `net` in place for QAT when `quant` is a (weight bits, activation bits) pair;
    `first_last` gives the stem conv and the head their own pair; `method` the quantiser (None: the
    library's default)."""
    if quant:
        compress.quantize(net, quant[0], quant[1], first_last_bits=tuple(first_last) if first_last else None,
                          method=method or compress.DEFAULT_METHOD)
    return net


def param_groups(net):
    """The optimizer's parameters: `net.parameters()` as they are (a dense or min/max run: the same
    single group as ever), or, with learned step sizes, the steps in a second group without weight
    decay (decay would pull every step towards 0, i.e. towards a finer grid that clips more)."""
    steps = compress.step_sizes(net)
    if not steps:
        return net.parameters()
    ids = {id(p) for p in steps}
    return [{"params": [p for p in net.parameters() if id(p) not in ids]},
            {"params": steps, "weight_decay": 0.0}]


def make_qat(net, cfg):
    """The run's QAT schedule (freezing observers and BatchNorm statistics), or None without QAT.
    0 (the flags' "never") and None freeze nothing."""
    if not cfg.quant:
        return None
    return compress.QATSchedule(net, observers_epoch=cfg.qat_freeze_observers or None,
                                batchnorm_epoch=cfg.qat_freeze_bn or None)


def thaw_batchnorm(net):
    """Let frozen BatchNorms run in training mode for a moment (refreeze_batchnorm undoes it)."""
    compress.freeze_batchnorm(net, frozen=False)


def refreeze_batchnorm(net):
    compress.freeze_batchnorm(net)


def step_qat(qat, epoch, log):
    """At the start of an epoch: freeze what the schedule says, and log what froze now. Returns
    whether anything froze."""
    if qat is None:
        return False
    before = qat.frozen()
    after = qat.step(epoch)
    now = [what for key, what in (("observers", "input observers (min/max ranges fixed)"),
                                  ("batchnorm", "BatchNorm statistics (running statistics used in training)"))
           if after[key] and not before[key]]
    if now:
        log(f"epoch {epoch}: QAT froze the {' and the '.join(now)}")
    return bool(now)


def check(cfg):
    """Settings that go together, checked once a resumed run's settings are inherited (a resume that
    repeats its run's own settings is fine), and what QAT refuses."""
    if cfg.quant_first_last and not cfg.quant:
        raise errors.ConfigError("widths for the first layer and the head need the other layers' widths "
                                 "(quantisation of the whole model)", setting="quant_first_last")
    if not cfg.prune and (cfg.prune_schedule or cfg.prune_scope or cfg.prune_exclude is not None
                          or cfg.prune_max_sparsity):
        raise errors.ConfigError("a pruning span, scope, exclusion or limit needs a target sparsity",
                                 setting="prune_schedule")
    if not cfg.quant and (cfg.quant_method or cfg.qat_freeze_observers or cfg.qat_freeze_bn):
        raise errors.ConfigError("a quantiser or a QAT freeze epoch needs quantisation of the whole model",
                                 setting="quant_method")
    if cfg.quant and cfg.activation_checkpointing:
        raise errors.ConfigError("recomputing each block in the backward pass cannot be combined with "
                                 "quantisation-aware training: it would observe the block's input ranges twice",
                                 setting="activation_checkpointing")


def make_pruner(net, optimizer, cfg, span):
    """The run's pruner (None without a target sparsity) on the cubic schedule over `span` (start, end),
    attached to the optimizer: scope, exclusions and the layer limit as the run says, the library's
    defaults where it is silent (an older run's saved settings)."""
    if not cfg.prune:
        return None
    schedule = compress.PruneSchedule(cfg.prune, int(span[0]), int(span[1]))
    exclude = compress.DEFAULT_EXCLUDE if cfg.prune_exclude is None else tuple(cfg.prune_exclude)
    return compress.Pruner(net, schedule, scope=cfg.prune_scope or compress.DEFAULT_SCOPE, exclude=exclude,
                           max_sparsity=cfg.prune_max_sparsity or compress.MAX_SPARSITY).attach(optimizer)


def step_pruner(pruner, epoch, log):
    """At the start of an epoch: prune to the schedule; after a step that pruned more, log the sparsest
    layers, and warn (one line) for the layers that reached their limit this epoch. Returns whether
    it pruned more."""
    if pruner is None:
        return False
    before = pruner.sparsity()
    limited = {r["name"] for r in pruner.report(top=0)["at_limit"]}
    pruner.step(epoch)
    if pruner.sparsity() == before:
        return False
    report = pruner.report(top=3)
    log(f"epoch {epoch}: {compress.report_text(report)}")
    new = [r for r in report["at_limit"] if r["name"] not in limited]
    if new:
        def why(r):
            return f"max {100 * pruner.max_sparsity:g}%" if r["reason"] == "max_sparsity" else "1 weight per unit"
        shown = ", ".join(f"{r['name']} {100 * r['sparsity']:.1f}% ({why(r)})" for r in new)
        log(f"warning: {len(new)} layer(s) reached their pruning limit (at most {pruner.max_sparsity:g} of a "
            f"layer's weights, one weight kept per output unit), the other layers take the rest of the "
            f"target: {shown}")
    return True


def check_span(pruner, epochs, setting):
    """The pruning span must end by the last epoch: the best checkpoint is chosen among the epochs at
    the target sparsity, so a run that never reaches it would have none."""
    if pruner is not None and pruner.schedule.end_epoch > epochs:
        raise errors.ConfigError(f"the pruning span ends at epoch {pruner.schedule.end_epoch}, after the run's "
                                 f"last epoch {epochs}; end it by epoch {epochs} (the best checkpoint is chosen "
                                 "among the epochs that reached the target sparsity)", setting=setting)


def is_compressed(net, pruner):
    return pruner is not None or bool(compress.quantised_layers(net))


def saved_state(net, pruner, qat=None):
    """What a compressed run's last.pytar holds besides the training state: the compression record,
    the pruner's state and the QAT schedule's; {} for a dense run."""
    rec = record(net, pruner, qat)
    if rec is None:
        return {}
    return {"compression": rec, "pruner": pruner.state_dict() if pruner else None,
            "qat": qat.state_dict() if qat else None}


def record(net, pruner, qat=None):
    """The compression record the checkpoints carry, or None for a dense run."""
    return compress.record(net, pruner, qat) if is_compressed(net, pruner) else None


def restore(net, pruner, saved, path, qat=None):
    """A resumed run's input grids and learned steps (from the record in last.pytar), what its QAT
    schedule froze, and its masks (its pruner state). The model is already quantised with the run's
    own bits and quantiser, so its layers are kept as they are."""
    rec = saved.get("compression")
    if rec is not None:
        compress.apply_record(net, rec, source=path)
    if qat is not None and saved.get("qat"):
        qat.load_state_dict(saved["qat"], source=path)
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


def log_line(net, pruner, qat=None):
    """One log line for a compressed run, or None."""
    parts = []
    q = compress.quantised_layers(net)
    if q:
        methods = sorted({m.method for m in q.values()})
        parts.append("QAT " + compress.widths_text([(m.weight_bits, m.act_bits) for m in q.values()])
                     + f" ({', '.join(methods)})")
        if qat is not None:
            parts.append("freezing " + ", ".join(
                f"{what} from epoch {e}" if e else f"{what} never"
                for what, e in (("observers", qat.observers_epoch), ("BatchNorm statistics", qat.batchnorm_epoch))))
    if pruner is not None:
        s = pruner.schedule
        dense = f", {len(pruner.exclude)} left dense ({', '.join(pruner.exclude)})" if pruner.exclude else ""
        parts.append(f"pruning to {100 * s.target:g}% ({pruner.scope} scope) over epochs {s.start_epoch}..{s.end_epoch}, "
                     f"{len(pruner.params)} layers pruned{dense}, none past {100 * pruner.max_sparsity:g}%")
    return "compression: " + "; ".join(parts) if parts else None
