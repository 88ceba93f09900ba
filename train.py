#!/usr/bin/env python
"""Train one stage on CIFAR-100: hard labels, or refined by a frozen teacher (label refinery).

    python train.py --model efficientnet_ex --data_dir D
    python train.py --model efficientnet_b0 --label-refinery-model efficientnet_b3 \
        --label-refinery-state-file RUN/model_best.pytar
    torchrun --standalone --nproc_per_node 2 train.py ...      # one process per GPU (or CPU)

A run folder under --save holds args.json, log.txt, metrics.csv, curves.png, model_state_XX.pytar
(the original entry's format), model_best.pytar and last.pytar (everything needed to resume).
"""
import argparse
import os
import random
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

import data
import errors
import models
import refinery
from cli.args import (add_compression_args, add_data_args, add_model_args, check_compression_args, given_flags,
                      model_name, multiplier, nonneg_float, positive_int, probability, seed_int, str2bool, typed)
from cli.errors import run_main
from engine import checkpoint, compression, distributed, precise_bn, runs, speed
from engine.evaluate import evaluate
from engine.meter import Meter
from engine.progress import Progress, format_duration
from engine.regime import format_regime, lr_at, parse_regime, regime_end
from engine.saver import CheckpointSaver, set_rng_state, write_derived
from engine.signals import StopRequest
from engine.state import RunState
from engine.step import HardLabels, StepParts, train_step
from engine.teacher import load_teacher
from loss import make_criterion


@dataclass
class Run:
    """What the epoch loop needs besides the step: the settings, the ranks, the log, the saver,
    where the run stands, and the stop request of a signal."""
    args: argparse.Namespace
    ctx: distributed.Context
    log: runs.RunLog
    saver: CheckpointSaver
    state: RunState
    stop: StopRequest
    # The early ETA: shown once per process, after ~30 s of steps; on_speed passes it on (chain.py).
    epochs: int = 0
    test_images: int = 0
    eta_due: bool = True
    on_speed: Optional[Callable] = None


# ----------------------------------------------------------------------------- the stage

def train(args, ctx, on_epoch=None, on_speed=None):
    """One stage, top to bottom; returns {"folder", "best", "history", "stopped", "exit_code"}.

    on_epoch(row) is called after each epoch on every rank; on_speed(images_per_s, run_left_s)
    once, with the early ETA (chain.py's whole-chain ETA)."""
    log = runs.RunLog(enabled=ctx.is_main)
    # From the first moment a signal stops cleanly; the run folder's lock goes with any exit.
    with StopRequest() as stop, runs.RunLock() as lock, log:
        folder, saved = find_resume(args, ctx, log, lock)
        compression.check_settings(args)  # with the saved run's settings inherited
        speed.resolve(args, ctx.device)
        regime = run_regime(args)
        epochs = args.epochs or regime_end(regime)
        if saved is not None and saved["train"]["next_epoch"] > epochs:
            return already_finished(ctx, folder, saved, log)
        lr_factor = ctx.world_size if args.lr_scale == "linear" else 1

        # Everything that can fail on bad input fails here, before a run folder exists.
        if ctx.is_main:
            runs.check_save_root(args.save)
        seed_everything(args.seed)
        net = build_model(args, ctx)
        init_note = compression.init_from(net, args.init_from) if args.init_from and saved is None else None
        compression.quantise(net, args.quant, args.quant_first_last)  # before the optimizer, DDP, compile
        teacher = build_teacher(args, ctx)
        train_loader, test_loader = load_data(args, ctx, log)
        optimizer = speed.make_optimizer(net.parameters(), args, lr_at(regime, 1) * lr_factor)
        pruner = compression.make_pruner(net, optimizer, args.prune, args.prune_schedule or
                                         compression.default_prune_span(epochs), args.prune_scope)
        scaler = torch.amp.GradScaler("cuda", enabled=args.amp == "fp16")
        state = restore(saved, net, optimizer, scaler, pruner, folder) if saved else RunState()
        compression.check_span(pruner, epochs, "prune_schedule" if "prune_schedule" in args.given else "epochs")
        check_position(state, ctx, len(train_loader), epochs, log)

        folder = open_folder(args, ctx, folder, lock, log)
        saver = CheckpointSaver(folder, net, optimizer, scaler, args, ctx, log, pruner)
        if saved is not None:  # a kill may have come between last.pytar and its derived files
            saver.refresh(state)
        criterion = make_criterion(args.coslinear, args.s, args.m, args.label_smoothing)
        regime_text = format_regime(regime) + (f" x{lr_factor}" if lr_factor != 1 else "")
        describe_run(args, ctx, net, epochs, regime_text, saved is not None, folder, log)
        for line in (init_note, compression.describe(net, pruner)):
            if line:
                log(line)
        parts, eval_net, teacher_forward = make_step_parts(args, ctx, net, teacher, optimizer, scaler,
                                                           criterion, log)
        autocast = parts.autocast
        # Quantised layers are evaluated in float32: their integer-grid numerics are exact only there.
        eval_autocast = compression.eval_autocast(net, autocast)
        if teacher is not None:
            report_teacher(args, teacher_forward, test_loader, autocast, log)
        run = Run(args, ctx, log, saver, state, stop, epochs, test_loader.stop - test_loader.start,
                  on_speed=on_speed)
        if agreed_stop(run):
            return stopped(run)
        if ctx.device.type == "cpu":  # a CPU step can take minutes: an estimate now, measured later
            estimate_eta(run, net, len(train_loader), parts.autocast)

        for epoch in range(state.next_epoch, epochs + 1):
            lr = set_lr(optimizer, lr_at(regime, epoch) * lr_factor)
            if pruner is not None:
                pruner.step(epoch)  # the schedule's sparsity for this epoch (once: a resumed epoch keeps it)
            stats = train_one_epoch(parts, train_loader, epoch, epochs, run)
            if stats is None:  # stopped by a signal; last.pytar holds the position
                return stopped(run)
            precise = precise_stats(run, net, train_loader, autocast)
            with precise_bn.overlay(net, precise):
                test = evaluate(eval_net, test_loader, criterion, eval_autocast, teacher=teacher_forward)
            row = epoch_row(epoch, lr, stats, test)
            if pruner is not None:
                row["sparsity"] = pruner.sparsity()
            # A pruned run's best is chosen among the epochs at the target sparsity only.
            is_best = state.record(row, test, eligible=pruner is None or pruner.at_target())
            log(epoch_line(row, test, epochs, is_best) + (" | precise BN" if precise else ""))
            state.next_epoch, state.next_step, state.finished = epoch + 1, 0, epoch >= epochs
            saver.save_epoch(state, epoch, is_best, test, precise)
            distributed.barrier()
            if on_epoch:
                on_epoch(row)
            if epoch < epochs and agreed_stop(run):
                return stopped(run)
        return finish(run, net)


# ----------------------------------------------------------------------------- one epoch

def train_one_epoch(parts, loader, epoch, epochs, run):
    """The epoch's steps from where the run stands; returns the epoch's training figures, or None
    when a signal stopped it (after saving the position). Nothing waits for the device per step
    except the non-finite check, once per log interval (every step on the CPU, where it is free)."""
    args, ctx = run.args, run.ctx
    meter, first_step, seconds_before = start_epoch(run, epoch, loader)
    parts.model.train()
    check_every = nan_check_every(args, ctx.device)
    progress = Progress(run.log, len(loader), first_step, f"epoch {epoch}/{epochs}", args.log_interval,
                        enabled=ctx.is_main and not args.no_progress,
                        on_rate=eta_announcer(run, len(loader), epoch) if run.eta_due else None,
                        warmup=2 if args.compile else 0)
    failed = torch.zeros((), dtype=torch.int64, device=ctx.device)
    sync(ctx.device)
    t0 = time.perf_counter()
    for step, (x, y) in enumerate(loader.iterate(first_step), start=first_step):
        failed += ~train_step(parts, x, y, meter)
        if (step + 1) % check_every == 0 or step + 1 == len(loader):
            check_finite(run, failed, epoch, step, len(loader), check_every, progress)
        progress.update(step + 1, meter)
        stopping = step + 1 < len(loader) and agreed_stop(run, step)
        if stopping or checkpoint_due(args, step, len(loader)):
            run.state.next_epoch, run.state.next_step = epoch, step + 1
            run.saver.save_recovery(run.state, meter, seconds_before + time.perf_counter() - t0)
        if stopping:
            progress.close()
            return None
    sync(ctx.device)
    progress.close()
    if run.eta_due:  # an epoch shorter than the ETA's wait: its own speed gives the ETA
        eta_announcer(run, len(loader), epoch)((len(loader) - first_step) / max(time.perf_counter() - t0, 1e-9),
                                              len(loader))
    seconds = seconds_before + time.perf_counter() - t0
    report_skipped(run, failed, epoch, len(loader) - first_step)
    s = meter.summary(reduce=True)
    return {"loss": s["loss"], "top1": s["top1"], "agreement": s["agreement"],
            "images_per_s": s["total"] / max(seconds, 1e-9), "seconds": seconds}


def eta_announcer(run, steps, epoch):
    """The early ETA, from the measured steps per second: this epoch, the run (its evaluations
    estimated as a forward pass, a third of a training step, per test image), and on a CPU a plain
    word when the run would take more than a day."""
    def announce(steps_per_s, step):
        run.eta_due = False
        images_per_s = steps_per_s * run.args.batch_size * run.ctx.world_size
        epoch_left = (steps - step) / steps_per_s
        eval_s = 3 * run.test_images / max(images_per_s / run.ctx.world_size, 1e-9)
        run_left = epoch_left + eval_s + (run.epochs - epoch) * (steps / steps_per_s + eval_s)
        run.log(f"ETA: {format_duration(epoch_left)} for the rest of epoch {epoch}, {format_duration(run_left)} "
                f"for the run ({run.epochs - epoch + 1} epoch(s) left, {images_per_s:.3g} img/s)")
        if run.ctx.device.type == "cpu" and run_left > 86400:
            run.log(f"ETA: on this CPU the run would take about {run_left / 86400:.0f} days. For a quick run, "
                    "narrow the model and the data (--width-mult 0.25 --depth-mult 0.34 --train-limit 10000 "
                    "--epochs 2), or train on a GPU")
        if run.on_speed:
            run.on_speed(images_per_s, run_left)
    return announce


def estimate_eta(run, net, steps, autocast):
    """The early ETA from a probe of 8 samples (two forward/backward passes, the second timed, that
    change nothing), for CPUs where the first steps alone may outlast a user's patience."""
    x = torch.zeros(min(8, run.args.batch_size), 3, 32, 32).contiguous(memory_format=speed.memory_format(run.args))
    per_sample = speed.seconds_per_sample(net, x, autocast)
    run.log("ETA (estimated from a probe; measured after ~30 s of steps):")
    eta_announcer(run, steps, run.state.next_epoch)(1.0 / (per_sample * run.args.batch_size), run.state.next_step)
    run.eta_due = True  # the measured ETA follows


def start_epoch(run, epoch, loader):
    """(meter, first step, seconds already spent): fresh at step 0, or the saved mid-epoch position."""
    state, ctx = run.state, run.ctx
    loader.set_epoch(epoch)
    partial = state.partial if epoch == state.next_epoch else None
    state.partial = None
    if partial is None:
        # Dropout and drop-connect draw from a stream that depends on (seed, epoch, rank) only.
        torch.manual_seed(data.derive_seed("model", run.args.seed, epoch, ctx.rank))
        return Meter(ctx.device), 0, 0.0
    set_rng_state(partial["rng"][ctx.rank], ctx.device)
    return Meter(ctx.device, partial["sums"]), state.next_step, partial["seconds"]


def precise_stats(run, net, loader, autocast):
    """BatchNorm statistics recomputed for this epoch's evaluation, or {} (engine.precise_bn):
    with --precise-bn auto only while the running statistics still hold over 1% of their
    initialisation, which the original recipe's 70 epochs never do after their first."""
    n = precise_bn.batches_for(run.args.precise_bn, net, run.args.batch_size, len(loader))
    if not n:
        return {}
    batches = (xy for _, xy in zip(range(n), loader.iterate(0)))
    return precise_bn.recompute(net, batches, autocast)


def nan_check_every(args, device):
    """Steps between reads of the on-device non-finite-loss counter. A read waits for the device,
    so on a GPU it happens once per log interval; on the CPU (where it is free) and under
    --nan-policy skip (which must decide before each update), every step."""
    return 1 if device.type == "cpu" or args.nan_policy == "skip" else args.log_interval


def check_finite(run, failed, epoch, step, steps, check_every, progress):
    """Under --nan-policy stop, a non-finite loss since the last check ends the run with one line."""
    if run.args.nan_policy != "stop" or not int(failed):
        return
    progress.close()
    where = f"step {step + 1}" if check_every == 1 else f"one of steps {step + 2 - check_every}..{step + 1}"
    last = os.path.join(run.saver.folder, "last.pytar")
    keep = (f"the last good checkpoint is {last}" if os.path.exists(last)
            else "no checkpoint was written yet")
    fixes = ["lower the LR (--lr-regime)"] + (["try --amp off"] if run.args.amp != "off" else []) + \
        ["or --nan-policy skip"]
    raise errors.RunError(f"non-finite loss in epoch {epoch} at {where} of {steps}; {keep}. "
                          f"{', '.join(fixes)}")


def report_skipped(run, failed, epoch, steps):
    """Under --nan-policy skip: say how many steps were skipped; an epoch of nothing but skipped
    steps learned nothing, and stops the run as --nan-policy stop would."""
    if run.args.nan_policy != "skip":
        return
    skipped = int(distributed.all_reduce_sum(failed.clone()))
    if skipped >= steps * run.ctx.world_size:
        last = os.path.join(run.saver.folder, "last.pytar")
        keep = f"the last good checkpoint is {last}" if os.path.exists(last) else "no checkpoint was written"
        raise errors.RunError(f"every step of epoch {epoch} had a non-finite loss and was skipped; {keep}. "
                              "Lower the LR (--lr-regime) or check the data")
    if skipped:
        run.log(f"epoch {epoch}: skipped {skipped} steps with a non-finite loss (--nan-policy skip)")


def checkpoint_due(args, step, steps):
    return bool(args.checkpoint_every) and (step + 1) % args.checkpoint_every == 0 and step + 1 < steps


def agreed_stop(run, step=None):
    """Whether to stop for a signal. Ranks must stop at the same step, so with several ranks they
    agree every 10 steps (and at epoch ends, step None)."""
    if not run.ctx.distributed:
        return run.stop.requested
    if step is not None and (step + 1) % 10:
        return False
    return distributed.any_rank(run.stop.requested, run.ctx.device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- set-up

def run_regime(args):
    """The LR regime: the given or the model's own; a run started from trained weights (--init-from)
    without one fine-tunes (engine.compression.fine_tune_regime over --epochs, 30 by default). Derived
    here, after a resumed run's --epochs was inherited, so that it stays out of the run's identity."""
    if args.lr_regime:
        return parse_regime(args.lr_regime)
    return compression.fine_tune_regime(args.epochs or compression.FINE_TUNE_EPOCHS)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_model(args, ctx):
    net = models.create(args.model, head=models.head_name(args.coslinear), width_mult=args.width_mult,
                        depth_mult=args.depth_mult, drop_connect=args.drop_connect, dropout=args.dropout,
                        bn_momentum=args.bn_momentum)
    if args.sync_bn and ctx.distributed:
        if ctx.device.type != "cuda":
            raise errors.ConfigError("synchronised BatchNorm needs CUDA devices (PyTorch's SyncBatchNorm "
                                     "has no CPU implementation); drop it for CPU runs", setting="sync_bn")
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
        net.name = args.model
    net.activation_checkpointing = args.activation_checkpointing
    return net.to(device=ctx.device, memory_format=speed.memory_format(args))


def build_teacher(args, ctx):
    if not args.label_refinery_model:
        return None
    teacher, _ = load_teacher(args.label_refinery_model, args.label_refinery_state_file,
                              head=models.head_name(args.label_refinery_coslinear),
                              width_mult=args.label_refinery_width_mult,
                              depth_mult=args.label_refinery_depth_mult, bn_mode=args.refinery_bn,
                              device=ctx.device, memory_format=speed.memory_format(args))
    return teacher


def load_data(args, ctx, log):
    train_x, train_y = data.load_cifar100(args.data_dir, train=True, download=not args.no_download)
    test_x, test_y = data.load_cifar100(args.data_dir, train=False, download=False)
    train_x, train_y = data.subset(train_x, train_y, args.train_limit, setting="train_limit")
    test_x, test_y = data.subset(test_x, test_y, args.test_limit, setting="test_limit")
    place = data.Placement(ctx.device, ctx.rank, ctx.world_size, speed.memory_format(args))
    # A compiled step would recompile for the short last batch (and then run every batch through a
    # dynamic-shape graph): drop it instead.
    train = data.TrainLoader(train_x, train_y, args.batch_size, aug=args.aug, seed=args.seed, place=place,
                             drop_last=bool(args.compile))
    test = data.EvalLoader(test_x, test_y, args.eval_batch_size, place=place)
    log(f"data: {len(train_x)} train images x {data.copies(args.aug)} ({args.aug} augmentation), "
        f"{len(test_x)} test images, from {args.data_dir}")
    return train, test


def make_step_parts(args, ctx, net, teacher, optimizer, scaler, criterion, log):
    """The step's parts; returns (parts, the student to evaluate, the teacher's forward or None).
    Compiled modules are proven on a zero batch of the real shape; DDP wraps the student alone."""
    autocast = speed.autocast(args, ctx.device)
    eval_net, teacher_forward = net, teacher
    if args.compile:
        probe = torch.zeros(args.batch_size, 3, 32, 32, device=ctx.device).contiguous(
            memory_format=speed.memory_format(args))
        eval_net = speed.compile_module(net, probe, autocast, log)
        if teacher is not None:
            teacher_forward = speed.compile_module(teacher, probe, autocast, log, train=False)
    model = eval_net
    if ctx.distributed:
        model = DistributedDataParallel(eval_net, device_ids=[ctx.device] if ctx.device.type == "cuda" else None)
    objective = (refinery.Refinery(teacher, args.s, args.label_refinery_coslinear, args.coslinear,
                                   forward=teacher_forward) if teacher is not None else HardLabels(criterion))
    parts = StepParts(model, objective, optimizer, scaler, autocast, skip_nonfinite=args.nan_policy == "skip")
    return parts, eval_net, teacher_forward


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def report_teacher(args, teacher_forward, test_loader, autocast, log):
    t = evaluate(teacher_forward, test_loader, make_criterion(args.label_refinery_coslinear, args.s),
                 autocast, keep_mode=True)
    log(f"teacher {args.label_refinery_model} from {args.label_refinery_state_file}: test top-1 "
        f"{t['top1']:.2f}% ({t['correct']}/{t['total']}), BatchNorm {args.refinery_bn} mode")


def describe_run(args, ctx, net, epochs, regime_text, resumed, folder, log):
    n_params = sum(p.numel() for p in net.parameters())
    head = f"cosine head, s={args.s:g} m={args.m:g}" if args.coslinear else "linear head"
    log(f"{'resuming' if resumed else 'run'} {folder}")
    log(f"model {args.model} (width {net.width_mult:g}, depth {net.depth_mult:g}, {head}), {n_params:,} "
        f"parameters; {epochs} epochs, LR regime {regime_text}")
    log(f"device {ctx.device} x{ctx.world_size} rank(s), batch {args.batch_size}/rank, amp {args.amp}, "
        f"channels_last {args.channels_last}, compile {args.compile}, fused SGD {args.fused_optimizer}")


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


# ----------------------------------------------------------------------------- run folders and resume

def find_resume(args, ctx, log, lock):
    """(run folder, its loaded last.pytar) to continue, or (None, None) for a new run. The folder is
    locked (on the main rank) before its state is read, so two processes never share a run."""
    if not args.resume:
        return None, None
    if args.resume == "auto":
        folder = runs.find_run(args.save, vars(args)) if ctx.is_main else None
        folder = distributed.broadcast_object(folder)
        if folder is None:
            log(f"--resume auto: no run of these arguments under {args.save}; starting a new one")
            return None, None
        path = os.path.join(folder, "last.pytar")
    else:
        folder = args.resume if os.path.isdir(args.resume) else os.path.dirname(args.resume)
        path = os.path.join(args.resume, "last.pytar") if os.path.isdir(args.resume) else args.resume
        if not os.path.exists(path):
            raise errors.RunError(f"--resume {args.resume}: {path} does not exist; give a run folder that "
                                  "holds last.pytar, or the file itself")
    if ctx.is_main:
        lock.acquire(folder)
    saved = checkpoint.load_file(path)
    if not isinstance(saved, dict) or saved.get("format") != checkpoint.FORMAT or "train" not in saved:
        raise errors.RunError(f"--resume {path} is not a training state (last.pytar) of this toolkit; "
                              "pass a run folder or its last.pytar")
    inherit_run_args(args, saved["args"], path)
    return folder, saved


def inherit_run_args(args, saved, path):
    """Flags the user did not give come from the saved run; those given must agree with it."""
    mismatched = [k for k in runs.IDENTITY_ARGS if k in args.given and getattr(args, k) != saved.get(k)]
    if mismatched:
        what = ", ".join(f"--{k.replace('_', '-')} {getattr(args, k)!r} (run: {saved.get(k)!r})"
                         for k in mismatched)
        raise errors.RunError(f"--resume {path} belongs to a run with other arguments: {what}; drop those "
                              "flags or start a new run")
    for k in runs.IDENTITY_ARGS + runs.INHERITED_ARGS:
        if k in saved and k not in args.given:
            setattr(args, k, saved[k])


def restore(saved, net, optimizer, scaler, pruner, folder):
    checkpoint.fit_state_dict(net, saved["model"], folder)
    compression.restore(net, pruner, saved, os.path.join(folder, "last.pytar"))
    optimizer.load_state_dict(saved["optimizer"])
    if saved.get("scaler") and scaler.is_enabled():
        scaler.load_state_dict(saved["scaler"])
    return RunState.from_checkpoint(saved)


def check_position(state, ctx, steps, epochs, log):
    if state.partial is not None and state.world_size != ctx.world_size:
        # Steps and RNG streams are per rank: another world size restarts the epoch.
        log(f"the mid-epoch checkpoint was written by {state.world_size} rank(s), this run has "
            f"{ctx.world_size}: epoch {state.next_epoch} restarts from its first step")
        state.next_step, state.partial = 0, None
    state.world_size = ctx.world_size
    if state.next_step >= steps:
        state.next_epoch, state.next_step, state.partial = state.next_epoch + 1, 0, None
    state.finished = False


def open_folder(args, ctx, folder, lock, log):
    """Create (or reopen) and lock the run folder once every check passed; clear what killed writes
    left; write args.json and the log. Returns the folder on every rank."""
    if ctx.is_main:
        if folder is None:
            folder = runs.create_run_dir(args.save, args.model, args.coslinear, bool(args.label_refinery_model))
            lock.acquire(folder)
        runs.remove_temporaries(folder)
        log.attach(os.path.join(folder, "log.txt"))
        runs.write_json(os.path.join(folder, "args.json"),
                        {k: v for k, v in vars(args).items() if k not in ("argv", "given", "script")})
    return distributed.broadcast_object(folder)


def already_finished(ctx, folder, saved, log):
    """--resume of a run that already trained every epoch asked for: repair its derived files (a
    kill may have come between last.pytar and them), say so, exit 0."""
    state = RunState.from_checkpoint(saved)
    state.finished = True
    if ctx.is_main:
        runs.remove_temporaries(folder)
        write_derived(folder, state, bool(saved["args"].get("label_refinery_model")), log)
    b = state.best
    if b is None:  # a pruned run whose epochs ended before its target sparsity (no eligible epoch)
        raise errors.RunError(f"the run {folder} trained every epoch asked for without reaching its target "
                              "sparsity, so it has no best checkpoint; resume it with more epochs (to the "
                              "end of its pruning span at least)")
    log(f"the run {folder} is already finished: best test top-1 {b['top1']:.2f}% ({b['correct']}/{b['total']}) "
        f"at epoch {b['epoch']}; {os.path.join(folder, 'model_best.pytar')}")
    return {"folder": folder, "best": b, "history": state.history, "stopped": False, "exit_code": 0}


def stopped(run):
    """After a signal: print the exact command that continues the run, release it, return."""
    args, ctx, folder = run.args, run.ctx, run.saver.folder
    last = os.path.join(folder, "last.pytar")
    if ctx.is_main and not os.path.exists(last):
        # Stopped during start-up: nothing was trained, so the fresh folder goes (it held no state).
        run.log(f"stopped by signal {run.stop.signum} before training began; nothing to resume")
        run.log.close()
        shutil.rmtree(folder, ignore_errors=True)
        return {"folder": None, "best": None, "history": [], "stopped": True, "exit_code": run.stop.exit_code}
    run.log(f"stopped by signal {run.stop.signum}; state saved to {last}")
    run.log(f"resume with: {resume_command(args, ctx, last)}")
    run.log.close()
    return {"folder": folder, "best": run.state.best, "history": run.state.history, "stopped": True,
            "exit_code": run.stop.exit_code}


def resume_command(args, ctx, last):
    """The exact command that continues: train.py's own with --resume LAST, or the chain's again."""
    launcher = ["torchrun", f"--nproc_per_node={ctx.world_size}"] if ctx.distributed else ["python"]
    if getattr(args, "script", "train.py") != "train.py":
        return shlex.join(launcher + [args.script] + list(args.argv))
    argv = list(args.argv)
    if "--resume" in argv:
        i = argv.index("--resume")
        del argv[i:i + 2]
    argv = [a for a in argv if not a.startswith("--resume=")]
    return shlex.join(launcher + ["train.py"] + argv + ["--resume", last])


def finish(run, net):
    if run.ctx.distributed:
        run.log(check_ranks_in_sync(net, run.ctx))
    b = run.state.best
    run.log(f"done: best test top-1 {b['top1']:.2f}% ({b['correct']}/{b['total']}) at epoch {b['epoch']}; "
            f"{os.path.join(run.saver.folder, 'model_best.pytar')}")
    run.log.close()
    return {"folder": run.saver.folder, "best": b, "history": run.state.history, "stopped": False,
            "exit_code": 0}


def check_ranks_in_sync(net, ctx):
    """DDP keeps replicas identical; a checksum per rank proves it (and catches a silent split)."""
    with torch.no_grad():
        local = torch.stack([p.detach().double().sum() for p in net.parameters()]).sum().item()
    sums = distributed.gather_objects(local)
    if len(set(sums)) == 1:
        return f"weights identical on all {ctx.world_size} ranks (checksum {sums[0]:.10g})"
    return f"WARNING: weights differ across ranks: checksums {sums}"


# ----------------------------------------------------------------------------- command line

def precise_bn_setting(v):
    if v in ("auto", "off"):
        return v
    try:
        return str(positive_int(v))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected auto, off or a positive number of batches, got {v!r}") from None


def build_parser(stage_flags=True):
    """train.py's flags. chain.py reuses them with stage_flags=False: each stage's model and teacher
    come from --stages there."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    if stage_flags:
        add_model_args(p)
    else:
        p.add_argument("--width-mult", type=multiplier, default=None, help="every stage's width (quick runs)")
        p.add_argument("--depth-mult", type=multiplier, default=None, help="every stage's depth")
        p.add_argument("--coslinear", type=str2bool, default=True, metavar="true|false",
                       help="cosine-linear heads (true) or dropout+linear (false)")
    add_data_args(p)
    g = p.add_argument_group("loss")
    g.add_argument("--s", type=typed(float, lambda x: 0 < x <= 100, "a number in (0, 100]"), default=5.0,
                   help="AM-softmax scale")
    g.add_argument("--m", type=typed(float, lambda x: 0 <= x <= 2, "a number in [0, 2] (cosines lie in "
                                     "[-1, 1])"), default=0.0, help="AM-softmax margin")
    g.add_argument("--label-smoothing", type=probability, default=0.0)
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr-regime", nargs="+", default=None, metavar="START END LR",
                   help="triples 'start end lr' (default: the model's regime, the original entry's)")
    g.add_argument("--lr-scale", choices=("linear", "none"), default="linear",
                   help="scale the regime's LRs by the number of ranks (global batch / --batch-size)")
    g.add_argument("--epochs", type=positive_int, default=None, help="default: the regime's end")
    g.add_argument("--batch-size", type=positive_int, default=128, help="per rank")
    g.add_argument("--eval-batch-size", type=positive_int, default=1000)
    g.add_argument("--momentum", type=probability, default=0.9)
    g.add_argument("--weight-decay", type=nonneg_float, default=1e-4)
    g.add_argument("--drop-connect", type=probability, default=None, help="override the model's rate")
    g.add_argument("--dropout", type=probability, default=None, help="override (linear head only)")
    g.add_argument("--bn-momentum", type=probability, default=None,
                   help="override BatchNorm's momentum (0.01, the original entry's)")
    g.add_argument("--precise-bn", type=precise_bn_setting, default="auto", metavar="auto|off|N",
                   help="recompute BatchNorm statistics from N training batches before evaluating; auto: "
                        "only while the running statistics are far from converged (short runs)")
    g.add_argument("--seed", type=seed_int, default=0, help="the random seed (0..2^63-1)")
    g.add_argument("--aug", default="uci",
                   help=f"augmentation recipe: one of {', '.join(data.AUG_RECIPES)} ('seed' is an old name of uci)")
    g.add_argument("--train-limit", type=positive_int, default=None,
                   help="train on the first N training images only")
    g.add_argument("--nan-policy", choices=("stop", "skip"), default="stop",
                   help="on a non-finite loss: stop (keep the last good checkpoint) or skip the step "
                        "(skip syncs with the host every step)")
    g = p.add_argument_group("label refinery")
    if stage_flags:
        g.add_argument("--label-refinery-model", type=model_name, default=None,
                       help="teacher architecture; its soft predictions replace the labels")
        g.add_argument("--label-refinery-state-file", default=None, help="the teacher's weights")
        g.add_argument("--label-refinery-width-mult", type=multiplier, default=None)
        g.add_argument("--label-refinery-depth-mult", type=multiplier, default=None)
        g.add_argument("--label-refinery-coslinear", type=str2bool, default=True, metavar="true|false")
    g.add_argument("--refinery-bn", choices=refinery.BN_MODES, default="eval",
                   help="teacher BatchNorm: running statistics (eval) or the original entry's batch "
                        "statistics (train)")
    add_compression_args(p)
    g = p.add_argument_group("run")
    g.add_argument("--save", default="checkpoints", help="root of the run folders")
    if stage_flags:
        g.add_argument("--init-from", default=None, metavar="CHECKPOINT",
                       help="start from these weights (a model_best.pytar of the same model), e.g. to "
                            "prune and quantise a trained model; the optimizer starts afresh")
        g.add_argument("--resume", default=None, metavar="PATH|auto",
                       help="a run folder or its last.pytar, or auto: the newest run of these arguments "
                            "under --save (a finished one is reported, not retrained)")
    g.add_argument("--checkpoint-every", type=positive_int, default=None, metavar="STEPS",
                   help="also write last.pytar every N steps inside an epoch")
    g.add_argument("--keep-epoch-states", type=str2bool, default=True, metavar="true|false",
                   help="write model_state_XX.pytar every epoch, as the original did")
    g.add_argument("--log-interval", type=positive_int, default=50, metavar="STEPS")
    g.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    g = p.add_argument_group("speed (default: the fastest for the device)")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    g.add_argument("--amp", default=None, choices=("bf16", "fp16", "off"),
                   help="autocast dtype (default bf16 on CUDA, off on CPU)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile student and teacher (default on CUDA)")
    g.add_argument("--fused-optimizer", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--sync-bn", action="store_true", help="synchronise BatchNorm across ranks (CUDA)")
    g.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each MBConv block in backward: ~8x less activation memory for about "
                        "one extra forward (small GPUs)")
    return p


def finish_args(parser, args, argv):
    """Checks across flags, canonical names, and what the user gave (for resume inheritance)."""
    args.argv = list(argv)
    args.given = sorted(given_flags(parser, argv))
    try:
        args.aug = data.recipe_name(args.aug)
    except errors.ToolkitError as e:
        parser.error(f"argument --aug: {e}")
    if getattr(args, "lr_regime", None):
        try:
            args.lr_regime = format_regime(parse_regime(args.lr_regime))
        except errors.ToolkitError as e:
            parser.error(f"argument --lr-regime: {e}")
    check_compression_args(parser, args)
    return args


def parse_args(argv=None):
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = finish_args(parser, parser.parse_args(argv), argv)
    if not args.lr_regime and not args.init_from:  # fine-tuning runs derive theirs (run_regime)
        args.lr_regime = format_regime(models.card(args.model).lr_regime)
    if args.label_refinery_state_file and not args.label_refinery_model:
        parser.error("--label-refinery-state-file needs --label-refinery-model NAME (the teacher's "
                     "architecture)")
    if args.label_refinery_model and not args.label_refinery_state_file:
        parser.error("--label-refinery-model needs --label-refinery-state-file PATH (the teacher's "
                     "model_best.pytar)")
    return args


def run(argv=None, on_epoch=None, on_speed=None):
    """Parse train.py's flags and train; returns train()'s result."""
    return run_stage(parse_args(argv), on_epoch, on_speed)


def run_stage(args, on_epoch=None, on_speed=None):
    """Train a parsed configuration, inside a process group when torchrun started several ranks
    (chain.py calls this once per stage, in one process and one process group)."""
    owns_group = not torch.distributed.is_initialized()
    ctx = distributed.setup(args.device)
    try:
        return train(args, ctx, on_epoch, on_speed)
    finally:
        if owns_group:
            distributed.teardown()


def main(argv=None):
    return run(argv)["exit_code"]


if __name__ == "__main__":
    sys.exit(run_main(main))
