"""Writing a run's checkpoints, in the spirit of timm's CheckpointSaver: the recovery state
(last.pytar), the epoch's bare state and the best weights, in an order that every crash leaves usable.

At the end of an epoch, in this order:
  last.pytar            the commit point: everything to resume, finished or not, and the epoch's
                        evaluation, so that the two weights files below can be made from it alone;
  model_state_XX.pytar  the bare student state_dict (the original entry's format), if kept;
  model_best.pytar      when the epoch is the best so far;
  status.json, metrics.csv, curves.png   derived from last.pytar.
A kill before last.pytar's rename repeats the epoch on resume (bit-exact on the CPU); a kill after
it loses nothing. Every weights file on disk is one that a commit covers: the commit comes first, and
a run that opens writes the files its commit implies and a kill kept from being written, and
removes any that no commit covers (reconcile; a folder written before this order may hold some).
Only the main rank writes; the others return at once.
"""
import os
import random
import re

import torch

import models

from micronet_cifar100 import errors

from . import checkpoint, compression, distributed, run_folder


def rng_state(device):
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


EPOCH_STATE = re.compile(r"model_state_(\d+)\.pytar")
BEST = "model_best.pytar"
# Files derived from last.pytar, which a folder without one cannot hold (log.txt, a record of what
# happened, stays).
DERIVED = ("status.json", "metrics.csv", "curves.png")


def epoch_state_name(epoch):
    return f"model_state_{epoch:02}.pytar"


def epoch_weights(saved, keep_epoch_states):
    """{file name: content} of the weights files of the epoch that the training state `saved` (a
    last.pytar's content) ends: model_state_XX.pytar when kept, model_best.pytar when that epoch is
    the best. Both hold the BatchNorm statistics the epoch was evaluated with (`eval_bn`, when
    recomputed), so that test.py reproduces the logged figures. Empty for a mid-epoch state, or one
    written before last.pytar kept the epoch's evaluation ("test"): the files of such a state were
    written before it, in the earlier order."""
    train, test, history = saved["train"], saved.get("test"), saved.get("history") or []
    if train.get("partial") is not None or test is None or not history:
        return {}
    epoch = history[-1]["epoch"]
    if train["next_epoch"] != epoch + 1:
        return {}
    weights = {**saved["model"], **(saved.get("eval_bn") or {})}
    record = saved.get("compression")
    files = {}
    if keep_epoch_states:
        # The original entry's bare state_dict; a compressed run's epoch states are wrapped, so
        # that each carries the record it is evaluated and counted with.
        files[epoch_state_name(epoch)] = weights if record is None else wrapped_weights(
            saved, weights, epoch=epoch, test=test, compression=record)
    if (train.get("best") or {}).get("epoch") == epoch:
        extra = {} if record is None else {"compression": record}
        files[BEST] = wrapped_weights(saved, weights, epoch=epoch, test=test, args=saved["args"]["model"], **extra)
    return files


def wrapped_weights(saved, weights, **extra):
    """checkpoint.weights_file's layout, with the architecture the training state recorded."""
    return checkpoint.with_checksum({"format": checkpoint.FORMAT, "model": weights, "arch": saved["arch"],
                                     **extra})


def stored_epoch(path):
    """The epoch a wrapped weights file says it holds; None when it cannot be read."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # unreadable for any reason: nothing to compare
        return None
    return obj.get("epoch") if isinstance(obj, dict) else None


def reconcile(folder, saved, keep_epoch_states):
    """On opening a run (under its lock): make its weights files the ones its commit covers. With no
    commit (`saved` None), every weights file and derived file goes. With one, an epoch state of an
    epoch it does not cover goes, and so does a model_best.pytar of another epoch than its best; then
    the files of the epoch it ends that a kill after the commit kept from being written are written
    from it. Returns (removed, written) names."""
    names = set(os.listdir(folder))
    due, removed = {}, sorted(n for n in names if n == BEST or EPOCH_STATE.fullmatch(n) or n in DERIVED)
    held = None
    if saved is not None:
        due = epoch_weights(saved, keep_epoch_states)
        best = (saved["train"].get("best") or {}).get("epoch")
        held = stored_epoch(os.path.join(folder, BEST)) if BEST in names else None
        removed = [n for n in removed
                   if (m := EPOCH_STATE.fullmatch(n)) and int(m.group(1)) >= saved["train"]["next_epoch"]]
        if held is not None and held != best and BEST not in due:
            removed.append(BEST)
    for name in removed:
        try:
            os.unlink(os.path.join(folder, name))
        except FileNotFoundError:
            pass
        except OSError as e:
            raise errors.storage_error(os.path.join(folder, name), e, doing="remove") from None
    written = sorted(n for n in due if n not in names or (n == BEST and held != due[n]["epoch"]))
    for name in written:
        checkpoint.save_atomic(due[name], os.path.join(folder, name))
    return removed, written


class CheckpointSaver:
    def __init__(self, folder, net, optimizer, scaler, cfg, ctx, log, compressed=(None, None)):
        """`compressed`: the run's (pruner, QAT schedule), each None when the run does not do it."""
        self.folder, self.net, self.optimizer, self.scaler = folder, net, optimizer, scaler
        self.cfg, self.ctx, self.log = cfg, ctx, log
        self.pruner, self.qat = compressed
        self.refined = cfg.refined

    def path(self, name):
        return os.path.join(self.folder, name)

    def training_state(self, state, eval_bn=None, test=None):
        """The content of last.pytar; a compressed run's also holds its compression record (bits,
        input grids, learned steps, masks), the pruner's state and the QAT schedule's. At an epoch's
        end it keeps the epoch's evaluation (`test`): with the weights and `eval_bn`, all that the epoch's weights files hold
        (epoch_weights)."""
        extra = compression.saved_state(self.net, self.pruner, self.qat)
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
            "test": test,
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

    def save_epoch(self, state, test, eval_bn=None):
        """End of an epoch (state already advanced to the next one, its row and best added): the
        commit, then the weights files made from it (epoch_weights), then the derived files."""
        if not self.ctx.is_main:
            return
        committed = self.training_state(state, eval_bn, test=test)
        checkpoint.save_atomic(committed, self.path("last.pytar"))
        for name, content in epoch_weights(committed, self.cfg.keep_epoch_states).items():
            checkpoint.save_atomic(content, self.path(name))
        self.refresh(state)

    def _commit(self, state):
        checkpoint.save_atomic(self.training_state(state), self.path("last.pytar"))
        run_folder.write_json(self.path("status.json"), run_folder.status_of(state))

    def refresh(self, state):
        """The derived files, rewritten from the state (after every epoch and when a run opens)."""
        if self.ctx.is_main:
            run_folder.write_derived(self.folder, state, self.refined, self.log)
