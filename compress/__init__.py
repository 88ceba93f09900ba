"""compress: pruning, quantisation-aware training, and the record of what was done to a model
(docs/compression.md). Imports torch, models and errors only.

Pruning (compress.prune): gradual magnitude pruning of conv, linear and cosine weights on the cubic
schedule of Zhu & Gupta (2017); masks kept beside the model, applied after every optimizer step; no
layer past max_sparsity (MAX_SPARSITY, 0.95) and one weight kept per output unit, whatever the scope.

    schedule = compress.PruneSchedule(target=0.5, start_epoch=1, end_epoch=30)
    schedule.sparsity_at(epoch) -> float
    compress.resolve_exclude(model, ["stem", "head", "features.3", ...]) -> [layer names]  # ConfigError
    pruner = compress.Pruner(model, schedule, scope="global" | "global-bn" | "global-lamp" | "layer",
                             exclude=compress.DEFAULT_EXCLUDE, max_sparsity=compress.MAX_SPARSITY)
    pruner.attach(optimizer)        # after every optimizer.step(): weights and momentum zeroed where pruned
    pruner.step(epoch)              # at the start of each epoch, every rank: masks to the schedule (once)
    pruner.apply()                  # zero pruned weights and optimizer state now (attach does it per step)
    pruner.sparsity(), pruner.counts(), pruner.at_target(), pruner.summary()
    pruner.report(top=5) -> {"sparsity", "layers", "sparsest": [...], "at_limit": [...]}; pruner.report_text()
    pruner.state_dict() / pruner.load_state_dict(state)   # masks (bool), schedule, limit, last epoch

Quantisation-aware training (compress.quant, compress.lsq): fake-quantised weights (symmetric, per
output channel) and layer inputs (per tensor, with a zero point), by min/max ranges (torch.ao's
FusedMovingAvgObsFakeQuantize for inputs) or learned step sizes (LSQ); straight-through gradients;
BatchNorm folding by per-channel invariance; float32 arithmetic in quantised layers under autocast.

    compress.quantize(model, weight_bits, act_bits, first_last_bits=None, method="minmax" | "lsq") -> model
    compress.step_sizes(model) -> [Parameter]   # LSQ steps: in model.parameters(); build the optimizer after quantize
    compress.calibrate(model, batches)          # observe min/max input ranges without training (PTQ)
    compress.quantised_layers(model) -> {name: layer}

The late phase of QAT (compress.qat): freezing observers and BatchNorm statistics, through model.train().

    qat = compress.QATSchedule(model, observers_epoch=None, batchnorm_epoch=None)
    qat.step(epoch)                  # at the start of each epoch, every rank
    qat.state_dict() / qat.load_state_dict(state); qat.summary()
    compress.freeze_observers(model), compress.freeze_batchnorm(model), compress.frozen_state(model)

Widths: 2..8 (simulated on the integer grid), 16 (simulated as float16) or 32 (float32 as it is).
A quantised model's state_dict has the plain model's keys; the quantisers' state lives in the record.

The record (compress.record): per layer its weight bits, input bits, quantiser, mask, input grid and
learned steps.

    rec = compress.record(model, pruner=None, qat=None) -> dict of plain values (for checkpoints)
    compress.validate_record(rec, model, source=...)   # errors.CheckpointError, one line
    compress.apply_record(model, rec, source=...)      # quantised numerics + masks, for evaluation
    compress.summary(rec) -> str; compress.masks_of(rec) -> {name: mask}
    compress.widths_text([(w, a), ...]) -> "W8/A8 x38"; compress.bare_name(name) without DDP/compile prefixes

torchscope.count(model, rules="micronet", compression=rec) scores a compressed model.
"""
from .layers import (BITS, BITS_TEXT, FLOAT_BITS, GROUPS, HALF_BITS, INT_BITS, SIMULATED_BITS, bare_name,
                     compressible, empty_layers, first_and_head, layer_groups)
from .prune import DEFAULT_EXCLUDE, MAX_SPARSITY, SCOPES, PruneSchedule, Pruner, report_text, resolve_exclude
from .qat import QATSchedule, freeze_batchnorm, freeze_observers, frozen_state
from .quant import (METHODS, QuantConv2d, QuantCosine, Quantised, QuantLinear, calibrate, fake_quant_weight,
                    layer_bits, quantize, quantize_layers, quantised_layers, step_sizes)
from .defaults import DEFAULT_METHOD, DEFAULT_SCOPE, FREEZE_BN_EPOCH, FREEZE_OBSERVERS_EPOCH
from .record import (RECORD_FORMAT, RECORD_FORMAT_LSQ, RECORD_FORMATS, apply_record, masks_of, record, summary,
                     validate_record, widths_text)

__all__ = ["DEFAULT_SCOPE", "DEFAULT_METHOD", "FREEZE_OBSERVERS_EPOCH", "FREEZE_BN_EPOCH", "empty_layers",
           "PruneSchedule", "Pruner", "SCOPES", "MAX_SPARSITY", "DEFAULT_EXCLUDE", "GROUPS", "resolve_exclude",
           "layer_groups", "report_text",
           "quantize", "quantize_layers", "layer_bits", "quantised_layers", "step_sizes", "METHODS", "calibrate",
           "fake_quant_weight", "Quantised", "QuantConv2d", "QuantLinear", "QuantCosine",
           "QATSchedule", "freeze_observers", "freeze_batchnorm", "frozen_state",
           "record", "validate_record", "apply_record", "masks_of", "summary", "widths_text",
           "RECORD_FORMAT", "RECORD_FORMAT_LSQ", "RECORD_FORMATS",
           "BITS", "BITS_TEXT", "INT_BITS", "FLOAT_BITS", "HALF_BITS", "SIMULATED_BITS", "compressible",
           "first_and_head", "bare_name"]
