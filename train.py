#!/usr/bin/env python
"""Train one stage on CIFAR-100: hard labels, or refined by a frozen teacher (label refinery).

    python train.py --model efficientnet_ex --data_dir D
    python train.py --model efficientnet_b0 --label-refinery-model efficientnet_b3 \
        --label-refinery-state-file RUN/model_best.pytar
    torchrun --standalone --nproc_per_node 2 train.py ...      # one process per GPU (or CPU)

A run folder under --save holds args.json, log.txt, metrics.csv, curves.png, model_state_XX.pytar
(the original's format), model_best.pytar and last.pytar (everything needed to resume).
"""
import argparse
import json
import os
import random
import shlex
import sys
import time

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

import data
import models
import refinery
from engine import checkpoint, distributed, runs, speed
from engine.cli import (add_data_args, add_model_args, model_name, nonneg_float, positive_float,
                        positive_int, probability, str2bool)
from engine.errors import UserError, run_main
from engine.evaluate import evaluate
from engine.regime import default_regime, format_regime, lr_at, parse_regime, regime_end
from engine.signals import StopRequest
from loss import make_criterion


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p)
    add_data_args(p)
    g = p.add_argument_group("loss")
    g.add_argument("--s", type=positive_float, default=5.0, help="AM-softmax scale")
    g.add_argument("--m", type=nonneg_float, default=0.0, help="AM-softmax margin")
    g.add_argument("--label-smoothing", type=probability, default=0.0)
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr-regime", nargs="+", default=None, metavar="START END LR",
                   help="triples 'start end lr' (default: the original's regime for the model)")
    g.add_argument("--lr-scale", choices=("linear", "none"), default="linear",
                   help="scale the regime's LRs by the number of ranks (global batch / --batch-size)")
    g.add_argument("--epochs", type=positive_int, default=None, help="default: the regime's end")
    g.add_argument("--batch-size", type=positive_int, default=128, help="per rank")
    g.add_argument("--eval-batch-size", type=positive_int, default=1000)
    g.add_argument("--momentum", type=nonneg_float, default=0.9)
    g.add_argument("--weight-decay", type=nonneg_float, default=1e-4)
    g.add_argument("--drop-connect", type=probability, default=None, help="override the model's rate")
    g.add_argument("--dropout", type=probability, default=None, help="override (plain head only)")
    g.add_argument("--bn-momentum", type=probability, default=None,
                   help="override BatchNorm's momentum (0.01); 0.1 makes short runs' test figures "
                        "meaningful")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--aug", default="seed", help=f"one of {', '.join(data.AUG_RECIPES)}")
    g.add_argument("--train-limit", type=positive_int, default=None,
                   help="train on the first N training images only")
    g.add_argument("--nan-policy", choices=("stop", "skip"), default="stop",
                   help="on a non-finite loss: stop (keep the last good checkpoint) or skip the step "
                        "(skip syncs with the host every step)")
    g = p.add_argument_group("label refinery")
    g.add_argument("--label-refinery-model", type=model_name, default=None,
                   help="teacher architecture; its soft predictions replace the labels")
    g.add_argument("--label-refinery-state-file", default=None, help="the teacher's weights")
    g.add_argument("--label-refinery-width-mult", type=positive_float, default=None)
    g.add_argument("--label-refinery-depth-mult", type=positive_float, default=None)
    g.add_argument("--label-refinery-coslinear", type=str2bool, default=True, metavar="true|false")
    g.add_argument("--refinery-bn", choices=("eval", "train"), default="eval",
                   help="teacher BatchNorm: running statistics (eval) or the original's batch "
                        "statistics (train)")
    g = p.add_argument_group("run")
    g.add_argument("--save", default="checkpoints", help="root of the run folders")
    g.add_argument("--resume", default=None, metavar="PATH|auto",
                   help="a run folder or its last.pytar, or auto: the newest unfinished run of "
                        "these arguments under --save")
    g.add_argument("--checkpoint-every", type=positive_int, default=None, metavar="STEPS",
                   help="also write last.pytar every N steps inside an epoch")
    g.add_argument("--keep-epoch-states", type=str2bool, default=True, metavar="true|false",
                   help="write model_state_XX.pytar every epoch, as the original did")
    g.add_argument("--log-interval", type=positive_int, default=50, metavar="STEPS")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
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


def given_flags(parser, argv):
    """Destinations the user set explicitly (a resume takes the rest from the saved run)."""
    shadow = argparse.ArgumentParser(add_help=False)
    for a in parser._actions:
        if a.option_strings and a.dest != "help":
            kw = {"nargs": a.nargs} if a.nargs not in (None, 0) else {}
            if isinstance(a, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
                shadow.add_argument(*a.option_strings, dest=a.dest, action="store_const", const=True,
                                    default=argparse.SUPPRESS)
            elif isinstance(a, argparse.BooleanOptionalAction):
                shadow.add_argument(*a.option_strings, dest=a.dest, action=argparse.BooleanOptionalAction,
                                    default=argparse.SUPPRESS)
            else:
                shadow.add_argument(*a.option_strings, dest=a.dest, default=argparse.SUPPRESS, **kw)
    known, _ = shadow.parse_known_args(argv)
    return set(vars(known))


def parse_args(argv=None):
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv
    args.given = sorted(given_flags(parser, argv))
    if args.aug not in data.AUG_RECIPES:
        parser.error(f"argument --aug: unknown recipe {args.aug!r}; use one of {', '.join(data.AUG_RECIPES)}")
    try:
        regime = parse_regime(args.lr_regime) if args.lr_regime else default_regime(args.model)
    except UserError as e:
        parser.error(str(e))
    args.lr_regime = format_regime(regime)
    if args.label_refinery_state_file and not args.label_refinery_model:
        parser.error("--label-refinery-state-file needs --label-refinery-model NAME (the teacher's "
                     "architecture)")
    return args


# ----------------------------------------------------------------------------- resume

def resolve_resume(args, log):
    """(run folder, loaded last.pytar) to continue, or (None, None) for a fresh run."""
    if not args.resume:
        return None, None
    if args.resume == "auto":
        folder = runs.find_resumable(args.save, vars(args))
        if folder is None:
            log(f"--resume auto: no unfinished run of these arguments under {args.save}; starting a "
                "new one")
            return None, None
    else:
        folder = args.resume if os.path.isdir(args.resume) else os.path.dirname(args.resume)
    path = os.path.join(folder, "last.pytar") if os.path.isdir(args.resume) or args.resume == "auto" \
        else args.resume
    if not os.path.exists(path):
        raise UserError(f"--resume {args.resume}: {path} does not exist; give a run folder that "
                        "holds last.pytar, or the file itself")
    state = checkpoint.load_file(path)
    if not isinstance(state, dict) or state.get("format") != checkpoint.FORMAT or "train" not in state:
        raise UserError(f"--resume {path} is not a training state (last.pytar) of this toolkit; "
                        "pass a run folder or its last.pytar")
    saved = state["args"]
    # Flags the user did not give come from the saved run; those given must agree with it.
    mismatched = [k for k in runs.IDENTITY_ARGS if k in args.given and getattr(args, k) != saved.get(k)]
    if mismatched:
        what = ", ".join(f"--{k.replace('_', '-')} {getattr(args, k)!r} (run: {saved.get(k)!r})"
                         for k in mismatched)
        raise UserError(f"--resume {path} belongs to a run with other arguments: {what}; drop those "
                        "flags or start a new run")
    for k in runs.IDENTITY_ARGS + runs.INHERITED_ARGS:
        if k in saved and k not in args.given:
            setattr(args, k, saved[k])
    return folder, state


# ----------------------------------------------------------------------------- the run

def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(device):
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def load_data(args, ctx, log):
    root = args.data_dir
    train_x, train_y = data.load_cifar100(root, train=True, download=not args.no_download)
    test_x, test_y = data.load_cifar100(root, train=False, download=False)
    train_x, train_y = data.subset(train_x, train_y, args.train_limit)
    test_x, test_y = data.subset(test_x, test_y, args.test_limit)
    fmt = speed.memory_format(args)
    train = data.TrainLoader(train_x, train_y, args.batch_size, aug=args.aug, seed=args.seed,
                             device=ctx.device, rank=ctx.rank, world_size=ctx.world_size,
                             memory_format=fmt,
                             # A compiled step would recompile for the short last batch (and then
                             # run every batch through a dynamic-shape graph): drop it instead.
                             drop_last=bool(args.compile))
    test = data.EvalLoader(test_x, test_y, args.eval_batch_size, device=ctx.device, rank=ctx.rank,
                           world_size=ctx.world_size, memory_format=fmt)
    log(f"data: {len(train_x)} train images x {data.copies(args.aug)} ({args.aug} augmentation), "
        f"{len(test_x)} test images, from {root}")
    return train, test


def build_model(args, ctx):
    net = models.create(args.model, coslinear=args.coslinear, width_mult=args.width_mult,
                        depth_mult=args.depth_mult, drop_connect=args.drop_connect, dropout=args.dropout,
                        bn_momentum=args.bn_momentum)
    if args.sync_bn and ctx.distributed:
        if ctx.device.type != "cuda":
            raise UserError("--sync-bn needs CUDA devices (PyTorch's SyncBatchNorm has no CPU "
                            "implementation); drop --sync-bn for CPU runs")
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
        net.name = args.model
    net.activation_checkpointing = args.activation_checkpointing
    return net.to(device=ctx.device, memory_format=speed.memory_format(args))


def state_of(net):
    """The bare student state_dict, without DDP or compile prefixes (the original's format)."""
    return {k: v.detach().clone(memory_format=torch.contiguous_format) for k, v in net.state_dict().items()}


def run(argv=None, on_epoch=None):
    """Train one stage; returns {"folder", "best", "history", "stopped", "exit_code"}.

    chain.py calls this once per stage in the same process (and the same process group).
    on_epoch(row) is called after each epoch on every rank.
    """
    args = parse_args(argv)
    owns_group = not torch.distributed.is_initialized()
    ctx = distributed.setup(args.device)
    try:
        return train(args, ctx, on_epoch)
    finally:
        if owns_group:
            distributed.teardown()


def main(argv=None):
    return run(argv)["exit_code"]


def train(args, ctx, on_epoch=None):
    log = runs.RunLog(enabled=ctx.is_main)
    speed.resolve(args, ctx.device)
    folder, resumed = resolve_resume(args, log)
    regime = parse_regime(args.lr_regime)
    epochs = args.epochs or regime_end(regime)
    refined = bool(args.label_refinery_model)
    lr_factor = ctx.world_size if args.lr_scale == "linear" else 1

    # Everything that can fail on bad input fails here, before any training.
    if ctx.is_main:
        runs.check_save_root(args.save)
    seed_everything(args.seed)
    net = build_model(args, ctx)
    teacher = None
    if refined:
        teacher, _ = refinery.load_teacher(
            args.label_refinery_model, args.label_refinery_state_file,
            width_mult=args.label_refinery_width_mult, depth_mult=args.label_refinery_depth_mult,
            coslinear=args.label_refinery_coslinear, bn_mode=args.refinery_bn, device=ctx.device,
            memory_format=speed.memory_format(args))
    train_loader, test_loader = load_data(args, ctx, log)
    optimizer = speed.make_optimizer(net.parameters(), args, lr_at(regime, 1) * lr_factor)
    scaler = torch.amp.GradScaler("cuda", enabled=args.amp == "fp16")
    start_epoch, start_step, best, history, partial = 1, 0, None, [], None
    if resumed:
        checkpoint.fit_state_dict(net, resumed["model"], folder)
        optimizer.load_state_dict(resumed["optimizer"])
        if resumed.get("scaler") and args.amp == "fp16":
            scaler.load_state_dict(resumed["scaler"])
        t = resumed["train"]
        start_epoch, start_step, best = t["next_epoch"], t["next_step"], t["best"]
        history, partial = list(resumed["history"]), t.get("partial")
        if partial is not None and t.get("world_size", 1) != ctx.world_size:
            # Steps and RNG streams are per rank: another world size restarts the epoch.
            log(f"the mid-epoch checkpoint was written by {t.get('world_size', 1)} rank(s), this run has "
                f"{ctx.world_size}: epoch {start_epoch} restarts from its first step")
            start_step, partial = 0, None
        if start_step >= len(train_loader):
            start_epoch, start_step, partial = start_epoch + 1, 0, None
        if start_epoch > epochs:
            raise UserError(f"--resume: the run already reached epoch {start_epoch - 1} of {epochs}; "
                            "raise --epochs to train further")

    # The run folder: created (or reopened) only once every check passed.
    if ctx.is_main:
        if folder is None:
            folder = runs.create_run_dir(args.save, args.model, args.coslinear, refined)
        log.attach(os.path.join(folder, "log.txt"))
        saved_args = {k: v for k, v in vars(args).items() if k not in ("argv", "given")}
        runs.write_text_atomic(os.path.join(folder, "args.json"), json.dumps(saved_args, indent=2) + "\n")
    folder = distributed.broadcast_object(folder)

    criterion = make_criterion(args.coslinear, args.s, args.m, args.label_smoothing)
    autocast = speed.autocast(args, ctx.device)
    n_params = sum(p.numel() for p in net.parameters())
    log(f"{'resuming' if resumed else 'run'} {folder}")
    log(f"model {args.model} (width {net.width_mult:g}, depth {net.depth_mult:g}, "
        f"{'cosine head, s=%g m=%g' % (args.s, args.m) if args.coslinear else 'plain head'}), "
        f"{n_params:,} parameters; {epochs} epochs, LR regime {args.lr_regime}"
        f"{f' x{lr_factor}' if lr_factor != 1 else ''}")
    log(f"device {ctx.device} x{ctx.world_size} rank(s), batch {args.batch_size}/rank, amp {args.amp}, "
        f"channels_last {args.channels_last}, compile {args.compile}, fused SGD {args.fused_optimizer}")

    # fast_net: the (compiled) student, used alone for evaluation; model: what the step calls,
    # DDP around fast_net when there are several ranks.
    fast_net, teacher_forward = net, teacher
    if args.compile:
        fast_net = speed.try_compile(net, lambda m: _probe(m, net, train_loader, autocast), log)
        if teacher is not None:
            teacher_forward = speed.try_compile(
                teacher, lambda m: _probe_eval(m, train_loader, autocast), log)
    model = fast_net
    if ctx.distributed:
        model = DistributedDataParallel(fast_net, device_ids=[ctx.device] if ctx.device.type == "cuda"
                                        else None)
    objective = refinery.Refinery(teacher, args.s, args.label_refinery_coslinear, args.coslinear,
                                  forward=teacher_forward) if refined else None
    if refined:
        t_eval = evaluate(teacher_forward, test_loader, make_criterion(args.label_refinery_coslinear, args.s),
                          autocast, keep_mode=True)
        log(f"teacher {args.label_refinery_model} from {args.label_refinery_state_file}: test top-1 "
            f"{t_eval['top1']:.2f}% ({t_eval['correct']}/{t_eval['total']}), BatchNorm {args.refinery_bn} mode")

    run_state = {"folder": folder, "history": history, "best": best, "args": args, "ctx": ctx,
                 "net": net, "optimizer": optimizer, "scaler": scaler, "log": log}
    with StopRequest() as stop:
        for epoch in range(start_epoch, epochs + 1):
            lr = lr_at(regime, epoch) * lr_factor
            for group in optimizer.param_groups:
                group["lr"] = lr
            first_step = start_step if epoch == start_epoch else 0
            stats, stopped = train_epoch(model, net, objective, criterion, autocast, optimizer, scaler,
                                         train_loader, epoch, epochs, first_step,
                                         partial if epoch == start_epoch else None, run_state, stop)
            if stopped:
                code = finish_stopped(args, ctx, folder, stop, log)
                return {"folder": folder, "best": run_state["best"], "history": history,
                        "stopped": True, "exit_code": code}
            test = evaluate(fast_net, test_loader, criterion, autocast,
                            teacher=teacher_forward if refined else None)
            row = {"epoch": epoch, "lr": lr, "train_loss": stats["loss"], "train_top1": stats["top1"],
                   "test_loss": test["loss"], "test_top1": test["top1"], "test_top5": test["top5"],
                   "images_per_s": stats["images_per_s"], "seconds": stats["seconds"]}
            if refined:
                row["train_agreement"], row["test_agreement"] = stats["agreement"], test["agreement"]
            history.append(row)
            is_best = run_state["best"] is None or test["top1"] > run_state["best"]["top1"]
            if is_best:
                run_state["best"] = {"epoch": epoch, "top1": test["top1"], "top5": test["top5"],
                                     "correct": test["correct"], "total": test["total"]}
            log(f"epoch {epoch:3d}/{epochs} lr {lr:.5g} | train loss {stats['loss']:.4f} top-1 "
                f"{stats['top1']:.2f}% | test loss {test['loss']:.4f} top-1 {test['top1']:.2f}% top-5 "
                f"{test['top5']:.2f}% ({test['correct']}/{test['total']})"
                f"{' | agreement %.1f%%' % test['agreement'] if refined else ''} | "
                f"{stats['images_per_s']:.0f} img/s, {stats['seconds']:.1f}s{' *best*' if is_best else ''}")
            save_epoch(run_state, epoch, epochs, is_best, test)
            distributed.barrier()
            if on_epoch:
                on_epoch(row)
    if ctx.distributed:
        log(check_ranks_in_sync(net, ctx))
    b = run_state["best"]
    log(f"done: best test top-1 {b['top1']:.2f}% ({b['correct']}/{b['total']}) at epoch {b['epoch']}; "
        f"{os.path.join(folder, 'model_best.pytar')}")
    log.close()
    return {"folder": folder, "best": b, "history": history, "stopped": False, "exit_code": 0}


def check_ranks_in_sync(net, ctx):
    """DDP keeps replicas identical; a checksum per rank proves it (and catches a silent split)."""
    with torch.no_grad():
        local = torch.stack([p.detach().double().sum() for p in net.parameters()]).sum().item()
    sums = distributed.gather_objects(local)
    if len(set(sums)) == 1:
        return f"weights identical on all {ctx.world_size} ranks (checksum {sums[0]:.10g})"
    return f"WARNING: weights differ across ranks: checksums {sums}"


def _probe(compiled, net, loader, autocast):
    """One compiled forward/backward, leaving weights, BN statistics and RNG as they were."""
    buffers = {k: v.clone() for k, v in net.named_buffers()}
    rng = torch.get_rng_state()
    x, _ = next(loader.iterate(0))  # a real batch: real shape, dtype and memory format
    with autocast:
        out = compiled(x)
    out.float().sum().backward()
    net.zero_grad(set_to_none=True)
    with torch.no_grad():
        for k, v in net.named_buffers():
            v.copy_(buffers[k])
    torch.set_rng_state(rng)


def _probe_eval(compiled, loader, autocast):
    x, _ = next(loader.iterate(0))
    with torch.no_grad(), autocast:
        compiled(x)


def nan_check_every(args, device):
    """Steps between reads of the on-device non-finite-loss counter. A read waits for the device,
    so on a GPU it happens once per log interval; on the CPU (where it is free) and under
    --nan-policy skip (which must decide before each update), every step."""
    return 1 if device.type == "cpu" or args.nan_policy == "skip" else args.log_interval


def train_epoch(model, net, objective, criterion, autocast, optimizer, scaler, loader, epoch, epochs,
                first_step, partial, run_state, stop):
    """One epoch from `first_step`; returns (stats, stopped). Nothing syncs with the host per step,
    except a non-finite check every log interval (every step on the CPU, where it is free)."""
    args, ctx, log = run_state["args"], run_state["ctx"], run_state["log"]
    device = ctx.device
    if partial is None:
        # Dropout and drop-connect draw from a stream that depends on (seed, epoch, rank) only.
        torch.manual_seed(data.derive_seed("model", args.seed, epoch, ctx.rank))
        sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss*n, correct, n, agree
        elapsed, first_step = 0.0, 0
    else:
        set_rng_state(partial["rng"][ctx.rank], device)
        sums = partial["sums"].to(device=device, dtype=torch.float64)
        elapsed = partial["seconds"]
    model.train()
    loader.set_epoch(epoch)
    check_every = nan_check_every(args, device)
    bar = None
    if ctx.is_main and not args.no_progress and sys.stdout.isatty():
        from tqdm import tqdm
        bar = tqdm(total=len(loader), initial=first_step, desc=f"epoch {epoch}/{epochs}",
                   dynamic_ncols=True, leave=False, unit="batch")
        run_state["log"].bar_active = True
    bad_steps = torch.zeros((), dtype=torch.int64, device=device)
    n_start = float(partial["sums"][2]) if partial is not None else 0.0
    skipped = 0
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    step = first_step
    for step, (x, y) in enumerate(loader.iterate(first_step), start=first_step):
        with autocast:
            out = model(x)
            if objective is None:
                loss = criterion(out, y)
                agree = None
            else:
                loss, t_logits = objective(out, x)
                agree = (t_logits.argmax(1) == out.argmax(1)).sum()
        finite = torch.isfinite(loss)
        if args.nan_policy == "skip" and not bool(finite):
            skipped += 1
            optimizer.zero_grad(set_to_none=True)
            continue
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        with torch.no_grad():
            n = y.shape[0]
            correct = (out.argmax(1) == y).sum()
            sums += torch.stack([loss.detach().double() * n, correct.double(),
                                 torch.ones((), dtype=torch.float64, device=device) * n,
                                 (agree if agree is not None else correct * 0).double()])
            bad_steps += (~finite).long()
        if (step + 1) % check_every == 0 or step + 1 == len(loader):
            if int(bad_steps) and args.nan_policy == "stop":
                if bar:
                    bar.close()
                    run_state["log"].bar_active = False
                where = (f"step {step + 1}" if check_every == 1 else
                         f"one of steps {step + 2 - check_every}..{step + 1}")
                raise UserError(
                    f"non-finite loss in epoch {epoch} at {where} of {len(loader)}; the last good "
                    f"checkpoint is {os.path.join(run_state['folder'], 'last.pytar')}. Lower the LR "
                    "(--lr-regime), try --amp off, or --nan-policy skip")
        if bar and (step + 1) % args.log_interval == 0:
            s = sums.tolist()
            bar.set_postfix(loss=f"{s[0] / max(s[2], 1):.3f}", top1=f"{100 * s[1] / max(s[2], 1):.1f}%",
                            img_s=f"{(s[2] - n_start) / max(time.perf_counter() - t0, 1e-9):.0f}")
        if bar:
            bar.update(1)
        if args.checkpoint_every and (step + 1) % args.checkpoint_every == 0 and step + 1 < len(loader):
            save_partial(run_state, epoch, step + 1, sums, elapsed + time.perf_counter() - t0)
        # Ranks must stop at the same step, so with several ranks they agree every 10 steps.
        if ctx.distributed:
            want_stop = (step + 1) % 10 == 0 and distributed.any_rank(stop.requested, device)
        else:
            want_stop = stop.requested
        if want_stop:
            save_partial(run_state, epoch, step + 1, sums, elapsed + time.perf_counter() - t0)
            if bar:
                bar.close()
                run_state["log"].bar_active = False
            return None, True
    sync()
    seconds = elapsed + time.perf_counter() - t0
    if bar:
        bar.close()
        run_state["log"].bar_active = False
    if skipped:
        log(f"epoch {epoch}: skipped {skipped} steps with a non-finite loss (--nan-policy skip)")
    distributed.all_reduce_sum(sums)
    loss_sum, correct, n, agree = sums.tolist()
    n = max(n, 1.0)
    return {"loss": loss_sum / n, "top1": 100.0 * correct / n, "agreement": 100.0 * agree / n,
            "images_per_s": n / max(seconds, 1e-9), "seconds": seconds}, False


def training_state(run_state, next_epoch, next_step, partial=None, finished=False):
    args = run_state["args"]
    return {
        "format": checkpoint.FORMAT,
        "model": state_of(run_state["net"]),
        "arch": models.describe(run_state["net"]),
        "optimizer": run_state["optimizer"].state_dict(),
        "scaler": run_state["scaler"].state_dict() if run_state["scaler"].is_enabled() else None,
        "train": {"next_epoch": next_epoch, "next_step": next_step, "best": run_state["best"],
                  "partial": partial, "world_size": run_state["ctx"].world_size},
        "history": list(run_state["history"]),
        "args": {k: v for k, v in vars(args).items() if k not in ("argv", "given")},
        # Informational: each epoch reseeds from (seed, epoch, rank), and a mid-epoch state keeps
        # every rank's streams in train.partial.rng.
        "rng": {**rng_state(run_state["ctx"].device), "python": random.getstate()},
        "finished": finished,
    }


def save_partial(run_state, epoch, next_step, sums, seconds):
    """Mid-epoch last.pytar: everything needed to continue at `next_step` of `epoch`, bit-exact."""
    ctx = run_state["ctx"]
    rngs = distributed.gather_objects(rng_state(ctx.device))
    if not ctx.is_main:
        return
    partial = {"sums": sums.detach().cpu(), "seconds": seconds, "rng": rngs}
    save_last(run_state["folder"], training_state(run_state, epoch, next_step, partial))


def save_last(folder, state):
    """last.pytar, then status.json from the same position (read by --resume auto and chain.py)."""
    checkpoint.save_atomic(state, os.path.join(folder, "last.pytar"))
    t = state["train"]
    runs.write_text_atomic(os.path.join(folder, "status.json"), json.dumps(
        {"next_epoch": t["next_epoch"], "next_step": t["next_step"], "finished": state["finished"],
         "best": t["best"]}) + "\n")


def save_epoch(run_state, epoch, epochs, is_best, test):
    """End of an epoch: the epoch's bare state, the best weights, last.pytar, status, metrics, curves.
    Each epoch reseeds its RNG from (seed, epoch, rank), so no RNG state is needed to resume here."""
    if not run_state["ctx"].is_main:
        return
    folder, net, args = run_state["folder"], run_state["net"], run_state["args"]
    finished = epoch >= epochs
    if args.keep_epoch_states:
        checkpoint.save_atomic(state_of(net), os.path.join(folder, f"model_state_{epoch:02}.pytar"))
    if is_best:
        checkpoint.save_atomic(checkpoint.weights_file(net, epoch=epoch, test=test, args=args.model),
                               os.path.join(folder, "model_best.pytar"))
    save_last(folder, training_state(run_state, epoch + 1, 0, finished=finished))
    runs.write_metrics(folder, run_state["history"], bool(args.label_refinery_model))
    runs.draw_curves(os.path.join(folder, "curves.png"), run_state["history"], os.path.basename(folder))


def finish_stopped(args, ctx, folder, stop, log):
    last = os.path.join(folder, "last.pytar")
    argv = [a for a in args.argv]
    if "--resume" in argv:
        i = argv.index("--resume")
        del argv[i:i + 2]
    argv = [a for a in argv if not a.startswith("--resume=")]
    launcher = (["torchrun", f"--nproc_per_node={ctx.world_size}"] if ctx.distributed else ["python"])
    cmd = shlex.join(launcher + ["train.py"] + argv + ["--resume", last])
    log(f"stopped by signal {stop.signum}; state saved to {last}")
    log(f"resume with: {cmd}")
    log.close()
    return stop.exit_code


if __name__ == "__main__":
    sys.exit(run_main(main))
