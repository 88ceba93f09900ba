"""Writing a run's checkpoints, in the spirit of timm's CheckpointSaver: the epoch's bare state,
the best weights, and the recovery state (last.pytar), in an order that every crash leaves usable.

At the end of an epoch, in this order:
  model_state_XX.pytar  the bare student state_dict (the original entry's format), if kept;
  model_best.pytar      when the epoch is the best so far;
  last.pytar            the commit point: everything to resume, finished or not;
  status.json, metrics.csv, curves.png   derived from last.pytar, rewritten whenever the run opens.
A kill before last.pytar's rename repeats the epoch on resume (bit-exact on the CPU); a kill after
it loses nothing. Only the main rank writes; the others return at once.
"""
import os
import random

import torch

import models

from . import checkpoint, compression, distributed, run_folder


def rng_state(device):
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


class CheckpointSaver:
    def __init__(self, folder, net, optimizer, scaler, cfg, ctx, log, pruner=None):
        self.folder, self.net, self.optimizer, self.scaler = folder, net, optimizer, scaler
        self.cfg, self.ctx, self.log, self.pruner = cfg, ctx, log, pruner
        self.refined = cfg.refined

    def path(self, name):
        return os.path.join(self.folder, name)

    def training_state(self, state, eval_bn=None, record=None):
        """The content of last.pytar; a compressed run's also holds its compression record (bits,
        input ranges, masks; `record` when the caller has it) and the pruner's state."""
        extra = {}
        record = record or compression.record(self.net, self.pruner)
        if record is not None:
            extra = {"compression": record, "pruner": self.pruner.state_dict() if self.pruner else None}
        return checkpoint.with_checksum({
            "format": checkpoint.FORMAT,
            "model": checkpoint.bare_state(self.net),
            "arch": models.describe(self.net),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "train": state.to_dict(),
            "history": list(state.history),
            "args": self.cfg.settings(),
            # Informational: each epoch reseeds from (seed, epoch, rank), and a mid-epoch state keeps
            # every rank's streams in train.partial.rng.
            "rng": {**rng_state(self.ctx.device), "python": random.getstate()},
            "finished": state.finished,
            # BatchNorm statistics of the last evaluation when they were recomputed (precise BN):
            # what test.py evaluates; "model" keeps the training statistics that a resume needs.
            "eval_bn": eval_bn or None,
            **extra,
        })

    def save_recovery(self, state, meter, seconds):
        """Mid-epoch last.pytar at state.next_epoch / state.next_step, bit-exact to continue from.
        Every rank must call it (the RNG states are gathered)."""
        rngs = distributed.gather_objects(rng_state(self.ctx.device))
        if not self.ctx.is_main:
            return
        state.partial = {"sums": meter.state(), "seconds": seconds, "rng": rngs}
        self._commit(state)
        state.partial = None

    def save_epoch(self, state, epoch, is_best, test, eval_bn=None):
        """End of an epoch (state already advanced to the next one). The weights files hold the
        BatchNorm statistics the epoch was evaluated with (`eval_bn`, when recomputed), so that
        test.py reproduces the logged figures."""
        if not self.ctx.is_main:
            return
        weights = {**checkpoint.bare_state(self.net), **(eval_bn or {})}
        record = compression.record(self.net, self.pruner)
        if self.cfg.keep_epoch_states:
            # The original entry's bare state_dict; a compressed run's epoch states are wrapped, so
            # that each carries the record it is evaluated and counted with.
            epoch_file = weights if record is None else checkpoint.weights_file(
                self.net, state=weights, epoch=epoch, test=test, compression=record)
            checkpoint.save_atomic(epoch_file, self.path(f"model_state_{epoch:02}.pytar"))
        if is_best:
            extra = {} if record is None else {"compression": record}
            checkpoint.save_atomic(checkpoint.weights_file(self.net, state=weights, epoch=epoch, test=test,
                                                           args=self.cfg.model, **extra),
                                   self.path("model_best.pytar"))
        self._commit(state, eval_bn, record)
        self.refresh(state)

    def _commit(self, state, eval_bn=None, record=None):
        checkpoint.save_atomic(self.training_state(state, eval_bn, record), self.path("last.pytar"))
        run_folder.write_json(self.path("status.json"), run_folder.status_of(state))

    def refresh(self, state):
        """The derived files, rewritten from the state (after every epoch and when a run opens)."""
        if self.ctx.is_main:
            run_folder.write_derived(self.folder, state, self.refined, self.log)
