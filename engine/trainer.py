"""The Trainer: one training stage from a RunConfig, top to bottom, with resume, checkpoints,
compression and the early ETA.

    trainer = Trainer(cfg, ctx, Hooks(on_epoch=print))
    result = trainer.fit()      # {"folder", "best", "history", "stopped", "exit_code"}

train.py and chain.py drive it; bench/ and the tests use the hooks. The configuration is read,
never written: a resumed run's inherited settings make a new RunConfig (RunConfig.inherit), and what
a run derives from its settings (the LR regime, the epochs, the device's speed switches) are the
Trainer's own attributes.
"""
import contextlib
import os
import random
import shlex
import shutil
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

import data
from micronet_cifar100 import errors
import models
import refinery
from loss import make_criterion

from . import checkpoint, compression, distributed, precise_bn, run_folder, speed
from .evaluate import evaluate
from .meter import Meter
from .optim import (FINE_TUNE, default_prune_span, fine_tune_regime, format_regime, lr_at, make_optimizer,
                    parse_regime, regime_end, set_lr)
from .progress import DAY_S, Progress, format_duration
from .saver import CheckpointSaver, reconcile, set_rng_state
from .signals import StopRequest
from .state import RunState
from .step import HardLabels, StepParts, train_step

# Ranks agree on a stop request every this many steps (an all-reduce and a host read each time).
STOP_AGREE_STEPS = 10
# The probe that estimates a CPU run's speed before its first step: this many samples.
PROBE_SAMPLES = 8
# A forward pass costs about a third of a training step's forward and backward.
FORWARD_SHARE = 1 / 3


@dataclass
class Hooks:
    """What a caller can watch or steer in fit(), all optional:
    - on_epoch(row): after each epoch, on every rank, with the epoch's metrics row;
    - on_speed(images_per_s, run_left_s): once, with the early ETA (chain.py's whole-chain ETA);
    - around_epoch(loader, first_step): a context manager entered around each epoch's steps
      (bench/sync_check.py counts the host synchronisations inside it);
    - check_cadence_device: the device whose cadence the non-finite loss check follows (by default
      the run's own; bench/sync_check.py counts a GPU's cadence on a CPU);
    - on_folder(folder): once, on every rank, when the run folder is open and locked, before any
      training (chain.py records each stage's folder then)."""
    on_epoch: Optional[Callable] = None
    on_speed: Optional[Callable] = None
    around_epoch: Optional[Callable] = None
    check_cadence_device: Optional[torch.device] = None
    on_folder: Optional[Callable] = None


def nan_check_every(nan_policy, log_interval, device):
    """Steps between reads of the on-device non-finite-loss counter. A read waits for the device,
    so on a GPU it happens once per log interval; on the CPU (where it is free) and under
    --nan-policy skip (which must decide before each update), every step."""
    return 1 if device.type == "cpu" or nan_policy == "skip" else log_interval


def run_regime(cfg):
    """The LR regime: the given or the model's own; a run started from trained weights (--init-from)
    without one fine-tunes (optim.FINE_TUNE over --epochs). Derived after a resumed run's --epochs
    was inherited, so that it stays out of the run's identity."""
    if cfg.lr_regime:
        return parse_regime(cfg.lr_regime)
    return fine_tune_regime(cfg.epochs or FINE_TUNE.epochs)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    def __init__(self, cfg, ctx, hooks=None):
        self.cfg, self.ctx, self.hooks = cfg, ctx, hooks or Hooks()
        self.log = self.stop = self.saver = self.state = None
        self.speed = None
        self.qat = None   # the QAT schedule (compress.QATSchedule) of a quantised run
        self.compressed = False
        self.epochs, self.test_images, self.precise_batches = 0, 0, 0
        # Steps per second of an epoch that ended before the early ETA was due: announced once its
        # evaluation has run, with that evaluation's measured time.
        self.epoch_rate = None
        # The early ETA is shown once per process, after ~30 s of steps.
        self.eta_due = True

    # ------------------------------------------------------------------------- the stage

    def fit(self):
        """Train the stage; returns {"folder", "best", "history", "stopped", "exit_code"}."""
        ctx = self.ctx
        self.log = log = run_folder.RunLog(enabled=ctx.is_main)
        # From the first moment a signal stops cleanly; the run folder's lock goes with any exit.
        with StopRequest() as self.stop, run_folder.RunLock() as lock, log:
            folder, saved = self.find_resume(lock)   # a resumed run inherits its saved settings
            cfg = self.cfg
            compression.check(cfg)
            self.speed = speed.of_config(cfg, ctx.device, quantised=bool(cfg.quant))
            speed.set_global_switches(ctx.device)
            regime = run_regime(cfg)
            self.epochs = epochs = cfg.epochs or regime_end(regime)
            if saved is not None and saved["train"]["next_epoch"] > epochs:
                return self.already_finished(folder, saved)
            lr_factor = ctx.world_size if cfg.lr_scale == "linear" else 1

            # Everything that can fail on bad input fails here, before a run folder exists.
            if ctx.is_main:
                run_folder.check_save_root(cfg.save)
            seed_everything(cfg.seed)
            net = self.build_model()
            init_note = compression.init_from(net, cfg.init_from) if cfg.init_from and saved is None else None
            # Before the optimizer (LSQ's steps are parameters), DDP and compile.
            compression.quantise(net, cfg.quant, cfg.quant_first_last, cfg.quant_method)
            teacher = self.build_teacher()
            train_loader, test_loader = self.load_data()
            optimizer = make_optimizer(compression.param_groups(net), lr_at(regime, 1) * lr_factor, cfg.momentum,
                                       cfg.weight_decay, fused=self.speed.fused_optimizer)
            pruner = compression.make_pruner(net, optimizer, cfg, cfg.prune_schedule or default_prune_span(epochs))
            self.qat = qat = compression.make_qat(net, cfg)
            self.compressed = compression.is_compressed(net, pruner)
            scaler = torch.amp.GradScaler("cuda", enabled=self.speed.amp == "fp16")
            self.state = state = restore(saved, net, optimizer, scaler, pruner, folder, qat) if saved else RunState()
            compression.check_span(pruner, epochs, "prune_schedule" if "prune_schedule" in cfg.given else "epochs")
            self.check_position(len(train_loader))

            folder = self.open_folder(folder, lock, saved)
            self.saver = saver = CheckpointSaver(folder, net, optimizer, scaler, cfg, ctx, log, (pruner, qat))
            if saved is not None:  # a kill may have come between last.pytar and its derived files
                saver.refresh(state)
            criterion = make_criterion(cfg.coslinear, cfg.s, cfg.m, cfg.label_smoothing)
            regime_text = format_regime(regime) + (f" x{lr_factor}" if lr_factor != 1 else "")
            self.log_header(net, regime_text, saved is not None, folder)
            for line in (init_note, compression.log_line(net, pruner, qat)):
                if line:
                    log(line)
            parts, eval_net, teacher_forward = self.make_step_parts(net, teacher, optimizer, scaler, criterion)
            autocast = parts.autocast
            # Quantised layers are evaluated in float32: their integer-grid numerics are exact only there.
            eval_autocast = compression.eval_autocast(net, autocast)
            if teacher is not None:
                self.report_teacher(teacher_forward, test_loader, autocast)
            self.test_images = test_loader.stop - test_loader.start
            self.precise_batches = precise_bn.batches_for(cfg.precise_bn, net, cfg.batch_size, len(train_loader),
                                                          self.compressed)
            if self.agreed_stop():
                return self.stopped()
            if ctx.device.type == "cpu":  # a CPU step can take minutes: an estimate now, measured later
                self.estimate_eta(net, len(train_loader), autocast)

            for epoch in range(state.next_epoch, epochs + 1):
                lr = set_lr(optimizer, lr_at(regime, epoch) * lr_factor)
                # The schedule's sparsity and freezes for this epoch (once: a resumed epoch keeps them).
                pruned = compression.step_pruner(pruner, epoch, log)
                froze = compression.step_qat(qat, epoch, log)
                if qat is not None and qat.frozen()["batchnorm"] and (froze or pruned):
                    self.refreeze_statistics(net, train_loader, epoch, autocast)
                stats = self.train_one_epoch(parts, train_loader, epoch)
                if stats is None:  # stopped by a signal; last.pytar holds the position
                    return self.stopped()
                t_eval = time.perf_counter()
                precise = self.precise_stats(net, train_loader, autocast)
                with precise_bn.overlay(net, precise):
                    test = evaluate(eval_net, test_loader, criterion, eval_autocast, teacher=teacher_forward)
                if self.epoch_rate is not None:
                    self.eta_announcer(len(train_loader), epoch, time.perf_counter() - t_eval)(
                        self.epoch_rate, len(train_loader))
                row = epoch_row(epoch, lr, stats, test)
                if pruner is not None:
                    row["sparsity"] = pruner.sparsity()
                # A pruned run's best is chosen among the epochs at the target sparsity only.
                is_best = state.add_epoch(row, test, eligible=pruner is None or pruner.at_target())
                log(epoch_line(row, test, epochs, is_best) + (" | precise BN" if precise else ""))
                state.next_epoch, state.next_step, state.finished = epoch + 1, 0, epoch >= epochs
                saver.save_epoch(state, test, precise)
                distributed.barrier()
                if self.hooks.on_epoch:
                    self.hooks.on_epoch(row)
                if epoch < epochs and self.agreed_stop():
                    return self.stopped()
            return self.finish(net)

    # ------------------------------------------------------------------------- one epoch

    def train_one_epoch(self, parts, loader, epoch):
        """The epoch's steps from where the run stands; returns the epoch's training figures, or None
        when a signal stopped it (after saving the position). The host waits for the device only for
        the non-finite check (once per log interval on a GPU, every step on the CPU where it is free)
        and, with several ranks, to agree on a stop request every STOP_AGREE_STEPS steps."""
        cfg, ctx, state = self.cfg, self.ctx, self.state
        meter, first_step, seconds_before = self.start_epoch(epoch, loader)
        parts.model.train()
        check_every = nan_check_every(cfg.nan_policy, cfg.log_interval,
                                      self.hooks.check_cadence_device or ctx.device)
        progress = Progress(self.log, len(loader), first_step, f"epoch {epoch}/{self.epochs}", cfg.log_interval,
                            enabled=ctx.is_main and not cfg.no_progress,
                            on_rate=self.eta_announcer(len(loader), epoch) if self.eta_due else None,
                            warmup=2 if self.speed.compile else 0)
        failed = torch.zeros((), dtype=torch.int64, device=ctx.device)
        watch = self.hooks.around_epoch(loader, first_step) if self.hooks.around_epoch else contextlib.nullcontext()
        with watch:
            sync(ctx.device)
            t0 = time.perf_counter()
            for step, (x, y) in enumerate(loader.iterate(first_step), start=first_step):
                failed += ~train_step(parts, x, y, meter)
                if (step + 1) % check_every == 0 or step + 1 == len(loader):
                    self.check_finite(failed, epoch, step, len(loader), check_every, progress)
                progress.update(step + 1, meter)
                stopping = step + 1 < len(loader) and self.agreed_stop(step)
                if stopping or self.checkpoint_due(step, len(loader)):
                    state.next_epoch, state.next_step = epoch, step + 1
                    self.saver.save_recovery(state, meter, seconds_before + time.perf_counter() - t0)
                if stopping:
                    progress.close()
                    return None
            sync(ctx.device)
        progress.close()
        if self.eta_due:  # an epoch shorter than the ETA's wait: its own speed gives the ETA, after its evaluation
            self.epoch_rate = (len(loader) - first_step) / max(time.perf_counter() - t0, 1e-9)
        seconds = seconds_before + time.perf_counter() - t0
        self.report_skipped(failed, epoch, len(loader) - first_step)
        s = meter.summary(reduce=True)
        return {"loss": s["loss"], "top1": s["top1"], "agreement": s["agreement"],
                "images_per_s": s["total"] / max(seconds, 1e-9), "seconds": seconds}

    def eta_announcer(self, steps, epoch, evaluated_s=None):
        """The early ETA, from the measured steps per second: this epoch, and the run with each epoch's
        forward passes besides its steps (the evaluation of this rank's test images and the precise
        BatchNorm batches). `evaluated_s`: the time this epoch's evaluation took, when the ETA comes
        after it (an epoch shorter than the ETA's wait); else each of those images is estimated at
        FORWARD_SHARE of a training step's cost per image. On a CPU, a plain word when the run would
        take more than a day."""
        cfg, ctx = self.cfg, self.ctx

        def announce(steps_per_s, step):
            self.eta_due, self.epoch_rate = False, None
            images_per_s = steps_per_s * cfg.batch_size * ctx.world_size
            if evaluated_s is not None:   # the epoch and its evaluation are done
                run_left = (self.epochs - epoch) * (steps / steps_per_s + evaluated_s)
                where = f"after epoch {epoch}"
            else:
                epoch_left = (steps - step) / steps_per_s
                forward_images = self.test_images + self.precise_batches * cfg.batch_size
                extra_s = forward_images * FORWARD_SHARE / max(images_per_s / ctx.world_size, 1e-9)
                run_left = epoch_left + extra_s + (self.epochs - epoch) * (steps / steps_per_s + extra_s)
                where = f"{format_duration(epoch_left)} for the rest of epoch {epoch}"
            left = self.epochs - epoch + (evaluated_s is None)
            self.log(f"ETA: {where}, {format_duration(run_left)} for the run ({left} epoch(s) left, "
                     f"{images_per_s:.3g} img/s)")
            if ctx.device.type == "cpu" and run_left > DAY_S:
                self.log(f"ETA: on this CPU the run would take about {run_left / DAY_S:.0f} days. For a "
                         "quick run, narrow the model and the data (--width-mult 0.25 --depth-mult 0.34 "
                         "--train-limit 10000 --epochs 2), or train on a GPU")
            if self.hooks.on_speed:
                self.hooks.on_speed(images_per_s, run_left)
        return announce

    def estimate_eta(self, net, steps, autocast):
        """The early ETA from a probe of PROBE_SAMPLES samples (two forward/backward passes, the second
        timed, that change nothing), for CPUs where the first steps alone may outlast a user's patience."""
        x = torch.zeros(min(PROBE_SAMPLES, self.cfg.batch_size), 3, 32, 32).contiguous(
            memory_format=self.speed.memory_format)
        per_sample = speed.seconds_per_sample(net, x, autocast)
        self.log("ETA (estimated from a probe; measured after ~30 s of steps):")
        self.eta_announcer(steps, self.state.next_epoch)(1.0 / (per_sample * self.cfg.batch_size),
                                                         self.state.next_step)
        self.eta_due = True  # the measured ETA follows

    def start_epoch(self, epoch, loader):
        """(meter, first step, seconds already spent): fresh at step 0, or the saved mid-epoch position."""
        state, ctx = self.state, self.ctx
        loader.set_epoch(epoch)
        partial = state.partial if epoch == state.next_epoch else None
        state.partial = None
        if partial is None:
            # Dropout and drop-connect draw from a stream that depends on (seed, epoch, rank) only.
            torch.manual_seed(data.derive_seed("model", self.cfg.seed, epoch, ctx.rank))
            return Meter(ctx.device), 0, 0.0
        set_rng_state(partial["rng"][ctx.rank], ctx.device)
        return Meter(ctx.device, partial["sums"]), state.next_step, partial["seconds"]

    def refreeze_statistics(self, net, loader, epoch, autocast):
        """BatchNorm statistics about to be frozen, or frozen while pruning changed the weights under
        them, are first recomputed from this epoch's batches with the current weights and made the
        model's own: frozen statistics are what the network trains and is evaluated with, so they
        must describe these weights, not those of before the last pruning step. Deterministic (the
        epoch's own batches), and saved with the model, so a resumed run has them."""
        n = precise_bn.batches_for("auto", net, self.cfg.batch_size, len(loader), compressed=True)
        loader.set_epoch(epoch)
        batches = (xy for _, xy in zip(range(n), loader.iterate(0)))
        compression.thaw_batchnorm(net)
        try:
            precise_bn.write(net, precise_bn.recompute(net, batches, autocast))
        finally:
            compression.refreeze_batchnorm(net)
        self.log(f"epoch {epoch}: frozen BatchNorm statistics recomputed from {n * self.cfg.batch_size} "
                 "training images with the current weights")

    def precise_stats(self, net, loader, autocast):
        """BatchNorm statistics recomputed for this epoch's evaluation, or {} (engine.precise_bn):
        with --precise-bn auto only while the running statistics still hold over 1% of their
        initialisation, which the original recipe's 70 epochs never do after their first."""
        n = precise_bn.batches_for(self.cfg.precise_bn, net, self.cfg.batch_size, len(loader),
                                   compressed=self.compressed)
        if not n or (self.qat is not None and self.qat.frozen()["batchnorm"]):
            # Frozen statistics are what the network trains with: recomputing them would change that.
            return {}
        batches = (xy for _, xy in zip(range(n), loader.iterate(0)))
        return precise_bn.recompute(net, batches, autocast)

    def check_finite(self, failed, epoch, step, steps, check_every, progress):
        """Under --nan-policy stop, a non-finite loss since the last check ends the run with one line."""
        if self.cfg.nan_policy != "stop" or not int(failed):
            return
        progress.close()
        where = f"step {step + 1}" if check_every == 1 else f"one of steps {step + 2 - check_every}..{step + 1}"
        fixes = ["lower the LR (--lr-regime)"] + (["try --amp off"] if self.speed.amp != "off" else []) + \
            ["or --nan-policy skip"]
        raise errors.RunError(f"non-finite loss in epoch {epoch} at {where} of {steps}; {self.last_good()}. "
                              f"{', '.join(fixes)}")

    def report_skipped(self, failed, epoch, steps):
        """Under --nan-policy skip: say how many steps were skipped; an epoch of nothing but skipped
        steps learned nothing, and stops the run as --nan-policy stop would."""
        if self.cfg.nan_policy != "skip":
            return
        skipped = int(distributed.all_reduce_sum(failed.clone()))
        if skipped >= steps * self.ctx.world_size:
            raise errors.RunError(f"every step of epoch {epoch} had a non-finite loss and was skipped; "
                                  f"{self.last_good()}. Lower the LR (--lr-regime) or check the data")
        if skipped:
            self.log(f"epoch {epoch}: skipped {skipped} steps with a non-finite loss (--nan-policy skip)")

    def last_good(self):
        last = os.path.join(self.saver.folder, "last.pytar")
        return f"the last good checkpoint is {last}" if os.path.exists(last) else "no checkpoint was written yet"

    def checkpoint_due(self, step, steps):
        every = self.cfg.checkpoint_every
        return bool(every) and (step + 1) % every == 0 and step + 1 < steps

    def agreed_stop(self, step=None):
        """Whether to stop for a signal. Ranks must stop at the same step, so with several ranks they
        agree every STOP_AGREE_STEPS steps (and at epoch ends, step None)."""
        if not self.ctx.distributed:
            return self.stop.requested
        if step is not None and (step + 1) % STOP_AGREE_STEPS:
            return False
        return distributed.any_rank(self.stop.requested, self.ctx.device)

    # ------------------------------------------------------------------------- set-up

    def build_model(self):
        cfg, ctx = self.cfg, self.ctx
        net = models.create(cfg.model, head=models.head_name(cfg.coslinear), width_mult=cfg.width_mult,
                            depth_mult=cfg.depth_mult, drop_connect=cfg.drop_connect, dropout=cfg.dropout,
                            bn_momentum=cfg.bn_momentum)
        if cfg.sync_bn and ctx.distributed:
            if ctx.device.type != "cuda":
                raise errors.ConfigError("synchronised BatchNorm needs CUDA devices (PyTorch's SyncBatchNorm "
                                         "has no CPU implementation); drop it for CPU runs", setting="sync_bn")
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
            net.name = cfg.model
        net.activation_checkpointing = cfg.activation_checkpointing
        return net.to(device=ctx.device, memory_format=self.speed.memory_format)

    def build_teacher(self):
        cfg = self.cfg
        if not cfg.label_refinery_model:
            return None
        teacher, _ = refinery.load_teacher(cfg.label_refinery_model, cfg.label_refinery_state_file,
                                           head=models.head_name(cfg.label_refinery_coslinear),
                                           width_mult=cfg.label_refinery_width_mult,
                                           depth_mult=cfg.label_refinery_depth_mult, bn_mode=cfg.refinery_bn,
                                           device=self.ctx.device, memory_format=self.speed.memory_format)
        return teacher

    def load_data(self):
        cfg, ctx = self.cfg, self.ctx
        train_x, train_y = data.load_cifar100(cfg.data_dir, train=True, download=not cfg.no_download)
        test_x, test_y = data.load_cifar100(cfg.data_dir, train=False, download=False)
        train_x, train_y = data.subset(train_x, train_y, cfg.train_limit, setting="train_limit")
        test_x, test_y = data.subset(test_x, test_y, cfg.test_limit, setting="test_limit")
        place = data.Placement(ctx.device, ctx.rank, ctx.world_size, self.speed.memory_format)
        # A compiled step would recompile for the short last batch (and then run every batch through a
        # dynamic-shape graph): drop it instead.
        train = data.TrainLoader(train_x, train_y, cfg.batch_size, aug=cfg.aug, seed=cfg.seed, place=place,
                                 drop_last=self.speed.compile)
        test = data.EvalLoader(test_x, test_y, cfg.eval_batch_size, place=place)
        self.log(f"data: {len(train_x)} train images x {data.copies(cfg.aug)} ({cfg.aug} augmentation), "
                 f"{len(test_x)} test images, from {cfg.data_dir}")
        return train, test

    def make_step_parts(self, net, teacher, optimizer, scaler, criterion):
        """The step's parts; returns (parts, the student to evaluate, the teacher's forward or None).
        Compiled modules are proven on a zero batch of the real shape; DDP wraps the student alone."""
        cfg, ctx = self.cfg, self.ctx
        autocast = self.speed.autocast(ctx.device)
        eval_net, teacher_forward = net, teacher
        if self.speed.compile:
            probe = torch.zeros(cfg.batch_size, 3, 32, 32, device=ctx.device).contiguous(
                memory_format=self.speed.memory_format)
            eval_net = speed.compile_module(net, probe, autocast, self.log)
            if teacher is not None:
                teacher_forward = speed.compile_module(teacher, probe, autocast, self.log, train=False)
        model = eval_net
        if ctx.distributed:
            model = DistributedDataParallel(eval_net, device_ids=[ctx.device] if ctx.device.type == "cuda" else None)
        objective = (refinery.Refinery(teacher, cfg.s, cfg.label_refinery_coslinear, cfg.coslinear,
                                       forward=teacher_forward) if teacher is not None else HardLabels(criterion))
        parts = StepParts(model, objective, optimizer, scaler, autocast, skip_nonfinite=cfg.nan_policy == "skip")
        return parts, eval_net, teacher_forward

    def report_teacher(self, teacher_forward, test_loader, autocast):
        cfg = self.cfg
        t = evaluate(teacher_forward, test_loader, make_criterion(cfg.label_refinery_coslinear, cfg.s),
                     autocast, keep_mode=True)
        self.log(f"teacher {cfg.label_refinery_model} from {cfg.label_refinery_state_file}: test top-1 "
                 f"{t['top1']:.2f}% ({t['correct']}/{t['total']}), BatchNorm {cfg.refinery_bn} mode")

    def log_header(self, net, regime_text, resumed, folder):
        cfg, ctx, sp = self.cfg, self.ctx, self.speed
        n_params = sum(p.numel() for p in net.parameters())
        head = f"cosine head, s={cfg.s:g} m={cfg.m:g}" if cfg.coslinear else "linear head"
        state = self.state
        self.log(f"resuming {folder} at epoch {state.next_epoch}, step {state.next_step}" if resumed
                 else f"run {folder}")
        self.log(f"model {cfg.model} (width {net.width_mult:g}, depth {net.depth_mult:g}, {head}), {n_params:,} "
                 f"parameters; {self.epochs} epochs, LR regime {regime_text}")
        self.log(f"device {ctx.device} x{ctx.world_size} rank(s), batch {cfg.batch_size}/rank, amp {sp.amp}, "
                 f"channels_last {sp.channels_last}, compile {sp.compile}, fused SGD {sp.fused_optimizer}")

    # ------------------------------------------------------------------------- run folders and resume

    def find_resume(self, lock):
        """(run folder, its loaded last.pytar) to continue; (run folder, None) to start over in a folder
        that no commit covers (a run killed before its first epoch ended); or (None, None) for a new
        run. The folder is locked (on the main rank) before its state is read, so two processes never
        share a run. A resumed run's configuration becomes the saved run's (last.pytar's arguments, or
        args.json's without a commit) for every setting the user did not give."""
        cfg, ctx = self.cfg, self.ctx
        if not cfg.resume:
            return None, None
        if cfg.resume == "auto":
            folder = run_folder.find_run(cfg.save, cfg.settings()) if ctx.is_main else None
            folder = distributed.broadcast_object(folder)
            if folder is None:
                self.log(f"--resume auto: no run of these arguments under {cfg.save}; starting a new one")
                return None, None
            path = os.path.join(folder, "last.pytar")
        elif os.path.isdir(cfg.resume):
            folder, path = cfg.resume, os.path.join(cfg.resume, "last.pytar")
        else:
            folder, path = os.path.dirname(cfg.resume), cfg.resume
            if not os.path.exists(path):
                raise errors.RunError(f"--resume {cfg.resume}: {path} does not exist; give a run folder that "
                                      "holds last.pytar, or the file itself")
        if (cfg.resume == "auto" or os.path.isdir(cfg.resume)) and not run_folder.is_committed(folder):
            return folder, self.start_over(folder, lock)
        if ctx.is_main:
            lock.acquire(folder)
        saved = checkpoint.load_file(path)
        if not checkpoint.is_training_state(saved):
            raise errors.RunError(f"--resume {path} is not a training state (last.pytar) of this toolkit; "
                                  "pass a run folder or its last.pytar")
        checkpoint.upgrade(saved)
        self.cfg = cfg.inherit(saved["args"], path)
        return folder, saved

    def start_over(self, folder, lock):
        """A run folder without a commit (killed before its first epoch ended, or a chain's stage
        recorded before it trained): its args.json says which run it is for; the folder is locked and
        the run starts over there. Returns None (no state to resume)."""
        path = os.path.join(folder, "args.json")
        args = run_folder.read_json(path)
        if not isinstance(args, dict):  # no run folder of ours: left untouched, not even locked
            raise errors.RunError(f"--resume {self.cfg.resume}: {folder} holds neither last.pytar nor a readable "
                                  "args.json, so no run of this toolkit can be continued there; give a run "
                                  "folder, or start a new run without --resume")
        if self.ctx.is_main:
            lock.acquire(folder)
        self.cfg = self.cfg.inherit(args, path)
        self.log(f"--resume {self.cfg.resume}: reusing {folder}, a run of these arguments stopped before its "
                 "first commit (no last.pytar); it starts over there")
        return None

    def check_position(self, steps):
        state, ctx = self.state, self.ctx
        if state.partial is not None and state.world_size != ctx.world_size:
            # Steps and RNG streams are per rank: another world size restarts the epoch.
            self.log(f"the mid-epoch checkpoint was written by {state.world_size} rank(s), this run has "
                     f"{ctx.world_size}: epoch {state.next_epoch} restarts from its first step")
            state.next_step, state.partial = 0, None
        state.world_size = ctx.world_size
        if state.next_step >= steps:
            state.next_epoch, state.next_step, state.partial = state.next_epoch + 1, 0, None
        state.finished = False

    def open_folder(self, folder, lock, saved):
        """Create, or reopen, the locked run folder once every check passed: clear what killed
        processes left there and at its root, make its weights files those its commit covers
        (`saved`: the loaded last.pytar, None without one), write args.json and the log; then tell
        the on_folder hook. Returns the folder on every rank."""
        cfg, ctx = self.cfg, self.ctx
        if ctx.is_main:
            root = cfg.save if folder is None else os.path.dirname(os.path.abspath(folder))
            run_folder.remove_leftovers(root, keep=folder)
            if folder is None:
                folder = run_folder.create_run_dir(cfg.save, cfg.model, cfg.coslinear, cfg.refined,
                                                   cfg.settings(), lock)
                self.log.attach(os.path.join(folder, "log.txt"))
            else:
                run_folder.remove_temporaries(folder)
                self.log.attach(os.path.join(folder, "log.txt"))
                self.reconcile(folder, saved)
                run_folder.write_json(os.path.join(folder, "args.json"), cfg.settings())
        folder = distributed.broadcast_object(folder)
        if self.hooks.on_folder:
            self.hooks.on_folder(folder)
        return folder

    def reconcile(self, folder, saved):
        """The run's weights files made to agree with its commit (saver.reconcile), said in one line
        when a kill had left them otherwise."""
        removed, written = reconcile(folder, saved, self.cfg.keep_epoch_states)
        if removed or written:
            self.log(f"{folder}: " + "; ".join(
                part for part in (removed and f"removed {', '.join(removed)}, which no commit covers",
                                  written and f"wrote {', '.join(written)} from last.pytar") if part))

    def already_finished(self, folder, saved):
        """--resume of a run that already trained every epoch asked for: repair its files (a kill may
        have come between last.pytar and them), say so, exit 0."""
        state = RunState.from_checkpoint(saved)
        state.finished = True
        if self.ctx.is_main:
            run_folder.remove_leftovers(os.path.dirname(os.path.abspath(folder)), keep=folder)
            run_folder.remove_temporaries(folder)
            self.reconcile(folder, saved)
            run_folder.write_derived(folder, state, bool(saved["args"].get("label_refinery_model")), self.log)
        b = state.best
        if b is None:  # a pruned run whose epochs ended before its target sparsity (no eligible epoch)
            raise errors.RunError(f"the run {folder} trained every epoch asked for without reaching its target "
                                  "sparsity, so it has no best checkpoint; resume it with more epochs (to the "
                                  "end of its pruning span at least)")
        self.log(f"the run {folder} is already finished: best test top-1 {b['top1']:.2f}% "
                 f"({b['correct']}/{b['total']}) at epoch {b['epoch']}; {os.path.join(folder, 'model_best.pytar')}")
        return {"folder": folder, "best": b, "history": state.history, "stopped": False, "exit_code": 0}

    def stopped(self):
        """After a signal: print the exact command that continues the run, release it, return."""
        folder = self.saver.folder
        last = os.path.join(folder, "last.pytar")
        if self.ctx.is_main and not os.path.exists(last):
            # Stopped during start-up: nothing was trained, so the fresh folder goes (it held no state).
            self.log(f"stopped by signal {self.stop.signum} before training began; nothing to resume")
            self.log.close()
            shutil.rmtree(folder, ignore_errors=True)
            return {"folder": None, "best": None, "history": [], "stopped": True, "exit_code": self.stop.exit_code}
        self.log(f"stopped by signal {self.stop.signum}; state saved to {last}")
        self.log(f"resume with: {resume_command(self.cfg, self.ctx, last)}")
        self.log.close()
        return {"folder": folder, "best": self.state.best, "history": self.state.history, "stopped": True,
                "exit_code": self.stop.exit_code}

    def finish(self, net):
        if self.ctx.distributed:
            self.log(check_ranks_in_sync(net, self.ctx))
        b = self.state.best
        self.log(f"done: best test top-1 {b['top1']:.2f}% ({b['correct']}/{b['total']}) at epoch {b['epoch']}; "
                 f"{os.path.join(self.saver.folder, 'model_best.pytar')}")
        self.log.close()
        return {"folder": self.saver.folder, "best": b, "history": self.state.history, "stopped": False,
                "exit_code": 0}


def restore(saved, net, optimizer, scaler, pruner, folder, qat=None):
    checkpoint.fit_state_dict(net, saved["model"], folder)
    compression.restore(net, pruner, saved, os.path.join(folder, "last.pytar"), qat)
    optimizer.load_state_dict(saved["optimizer"])
    if saved.get("scaler") and scaler.is_enabled():
        scaler.load_state_dict(saved["scaler"])
    return RunState.from_checkpoint(saved)


def resume_command(cfg, ctx, last):
    """The exact command that continues: train.py's own with --resume LAST, or the chain's again."""
    launcher = ["torchrun", f"--nproc_per_node={ctx.world_size}"] if ctx.distributed else ["python"]
    if cfg.script != "train.py":
        return shlex.join(launcher + [cfg.script] + list(cfg.argv))
    argv = list(cfg.argv)
    if "--resume" in argv:
        i = argv.index("--resume")
        del argv[i:i + 2]
    argv = [a for a in argv if not a.startswith("--resume=")]
    return shlex.join(launcher + ["train.py"] + argv + ["--resume", last])


def check_ranks_in_sync(net, ctx):
    """DDP keeps replicas identical; a checksum per rank proves it (and catches a silent split)."""
    with torch.no_grad():
        local = torch.stack([p.detach().double().sum() for p in net.parameters()]).sum().item()
    sums = distributed.gather_objects(local)
    if len(set(sums)) == 1:
        return f"weights identical on all {ctx.world_size} ranks (checksum {sums[0]:.10g})"
    return f"WARNING: weights differ across ranks: checksums {sums}"


def epoch_row(epoch, lr, stats, test):
    row = {"epoch": epoch, "lr": lr, "train_loss": stats["loss"], "train_top1": stats["top1"],
           "test_loss": test["loss"], "test_top1": test["top1"], "test_top5": test["top5"],
           "images_per_s": stats["images_per_s"], "seconds": stats["seconds"]}
    if "agreement" in test:
        row["train_agreement"], row["test_agreement"] = stats["agreement"], test["agreement"]
    return row


def epoch_line(row, test, epochs, is_best):
    agreement = f" | agreement {row['test_agreement']:.1f}%" if "test_agreement" in row else ""
    sparsity = f" | sparsity {100 * row['sparsity']:.1f}%" if "sparsity" in row else ""
    return (f"epoch {row['epoch']:3d}/{epochs} lr {row['lr']:.5g} | train loss {row['train_loss']:.4f} top-1 "
            f"{row['train_top1']:.2f}% | test loss {row['test_loss']:.4f} top-1 {row['test_top1']:.2f}% top-5 "
            f"{row['test_top5']:.2f}% ({test['correct']}/{test['total']}){agreement}{sparsity} | "
            f"{row['images_per_s']:.0f} img/s, {row['seconds']:.1f}s{' *best*' if is_best else ''}")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(cfg, hooks=None):
    """Train `cfg` (Trainer.fit) inside a process group when torchrun started several ranks; a
    caller that set up the group (chain.py, for all its stages) keeps it."""
    owns_group = not torch.distributed.is_initialized()
    ctx = distributed.setup(cfg.device)
    try:
        return Trainer(cfg, ctx, hooks).fit()
    finally:
        if owns_group:
            distributed.teardown()
