"""compress: pruning, quantisation-aware training, and the record of what was done to a model
(docs/compression.md). Imports torch, models and errors only.

Pruning (compress.prune): gradual magnitude pruning of conv, linear and cosine weights on the cubic
schedule of Zhu & Gupta (2017); masks kept beside the model, applied after every optimizer step.

    schedule = compress.PruneSchedule(target=0.5, start_epoch=1, end_epoch=30, initial=0.0)
    schedule.sparsity_at(epoch) -> float
    pruner = compress.Pruner(model, schedule, scope="global" | "layer", exclude=())
    pruner.attach(optimizer)        # after every optimizer.step(): weights and momentum zeroed where pruned
    pruner.step(epoch)              # at the start of each epoch: masks to the schedule (once per epoch)
    pruner.apply()                  # zero pruned weights and optimizer state now (attach does it per step)
    pruner.sparsity(), pruner.layer_sparsity(), pruner.counts(), pruner.at_target(), pruner.describe()
    pruner.state_dict() / pruner.load_state_dict(state)   # masks (bool), schedule, last epoch

Quantisation-aware training (compress.quant): fake-quantised weights (symmetric, per output channel)
and layer inputs (asymmetric, per tensor, torch.ao's FusedMovingAvgObsFakeQuantize) with
straight-through gradients; BatchNorm folding by per-channel invariance (see compress.quant).

    compress.quantize(model, weight_bits, act_bits, first_last_bits=None) -> model (in place)
    compress.calibrate(model, batches)          # observe input ranges without training (PTQ)
    compress.quantised_layers(model) -> {name: layer}

Widths: 2..8 (simulated on the integer grid), 16 (simulated as float16) or 32 (float32 as it is).
A quantised model's state_dict has the plain model's keys; the input ranges live in the record.

The record (compress.record): per layer its weight bits, input bits, mask and input range.

    rec = compress.record(model, pruner=None) -> dict of plain values (for checkpoints)
    compress.validate_record(rec, model, source=...)   # errors.CheckpointError, one line
    compress.apply_record(model, rec, source=...)      # quantised numerics + masks, for evaluation
    compress.summary(rec) -> str; compress.masks_of(rec) -> {name: mask}
    compress.widths_text([(w, a), ...]) -> "W8/A8 x38"; compress.bare_name(name) without DDP/compile prefixes

torchscope.count(model, rules="micronet", compression=rec) scores a compressed model.
"""
from .layers import (BITS, BITS_TEXT, FLOAT_BITS, HALF_BITS, INT_BITS, SIMULATED_BITS, bare_name, compressible,
                     first_and_head)
from .prune import SCOPES, PruneSchedule, Pruner
from .quant import (QuantConv2d, QuantCosine, Quantised, QuantLinear, calibrate, fake_quant_weight,
                    layer_bits, quantize, quantize_layers, quantised_layers)
from .record import RECORD_FORMAT, apply_record, masks_of, record, summary, validate_record, widths_text

__all__ = ["PruneSchedule", "Pruner", "SCOPES", "quantize", "quantize_layers", "layer_bits", "calibrate",
           "quantised_layers", "fake_quant_weight", "Quantised", "QuantConv2d", "QuantLinear", "QuantCosine",
           "record", "validate_record", "apply_record", "masks_of", "summary", "RECORD_FORMAT", "BITS",
           "BITS_TEXT", "INT_BITS", "FLOAT_BITS", "HALF_BITS", "SIMULATED_BITS", "compressible", "first_and_head", "widths_text", "bare_name"]
