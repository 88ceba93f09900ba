#!/usr/bin/env python
"""Train-step and evaluation throughput, and peak memory, of one model under each speed-up mode.

    python bench/step.py --model efficientnet_ex --device cuda --batch-size 256 --json OUT.json
    python bench/step.py --model efficientnet_ex --width-mult 0.25 --depth-mult 0.34 --device cpu \
        --batch-size 128 --modes eager-fp32,channels_last,bf16,fused-sgd,all-eager --json OUT.json

Every mode is train.py with the matching speed flags, stepping with train.py's own step
(engine.step.train_step, plus the finite-loss check train.py makes every CPU step) on one random batch
on the device, so that no data loading is timed (bench/augmentation.py times that).

  eager-fp32     --amp off --no-channels-last --no-compile --no-fused-optimizer: eager, fp32 tensors,
                 NCHW, SGD(foreach=True). On CUDA train.py's TF32 and cudnn.benchmark settings hold.
  channels_last  eager-fp32 + --channels-last (NHWC weights and activations)
  bf16           eager-fp32 + --amp bf16 (autocast)
  compile        eager-fp32 + --compile (torch.compile of the student; eval uses it too)
  fused-sgd      eager-fp32 + --fused-optimizer: SGD(fused=True), one kernel for the whole update
  forloop-sgd    eager-fp32 with SGD(foreach=False), torch's default for CPU tensors: what foreach buys
  all-eager      channels_last + bf16 + fused-sgd (train.py's CPU default is channels_last alone)
  all            channels_last + bf16 + fused-sgd + compile (train.py's CUDA default)
  refined/MODE   MODE with a frozen --refined-teacher: teacher forward under no_grad on the same batch,
                 soft-target loss (refinery.Refinery, as train.py does); its eval also runs the teacher

Eval is engine.evaluate (train.py's test pass) over the same batch, at the training batch size. With
--rounds R > 1 the modes stay alive side by side and are timed in turn R times, so that drift in a
shared machine's load hits every mode alike; speed-ups are medians of the per-round ratios.
"""
import gc
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass, replace

# `python bench/NAME.py` puts bench/ on sys.path, not the root that holds the project's packages.
if not __package__:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

import models
import refinery
from bench import common, summary
from micronet_cifar100.cli import args as cli_args
from micronet_cifar100.cli.errors import run_main
from engine import distributed, optim, speed
from engine.evaluate import evaluate
from engine.step import HardLabels, StepParts
from loss import make_criterion


@dataclass(frozen=True)
class Mode:
    channels_last: bool = False
    amp: str = "off"
    compile: bool = False
    optimizer: str = "foreach"  # foreach | fused | forloop


_BASE = Mode()
MODES = {
    "eager-fp32": _BASE,
    "channels_last": replace(_BASE, channels_last=True),
    "bf16": replace(_BASE, amp="bf16"),
    "compile": replace(_BASE, compile=True),
    "fused-sgd": replace(_BASE, optimizer="fused"),
    "forloop-sgd": replace(_BASE, optimizer="forloop"),
    "all-eager": Mode(channels_last=True, amp="bf16", compile=False, optimizer="fused"),
    "all": Mode(channels_last=True, amp="bf16", compile=True, optimizer="fused"),
}
REFINED = "refined/"
# What a device times unless told: its modes, its refined modes (with --refined-teacher), the steps.
DEFAULTS = {
    "cuda": dict(modes=["eager-fp32", "channels_last", "bf16", "compile", "fused-sgd", "all"],
                 refined_modes=["eager-fp32", "all"], steps=50, warmup=10, rounds=1),
    "cpu": dict(modes=["eager-fp32", "channels_last", "bf16", "fused-sgd", "all-eager"],
                refined_modes=["eager-fp32", "all-eager"], steps=10, warmup=2, rounds=3),
}


def split_label(label):
    """'refined/all-eager@2t' -> (True, 'all-eager', 2); no '@Nt' suffix -> threads None."""
    refined = label.startswith(REFINED)
    name = label[len(REFINED):] if refined else label
    name, _, threads = name.partition("@")
    return refined, name, int(threads[:-1]) if threads else None


def mode_of(label):
    return MODES[split_label(label)[1]]


def baseline_of(label, labels):
    """The label a mode's speed-up is taken against: eager-fp32, refined or not, at the first
    thread count; a refined mode falls back to the plain baseline when no refined one ran."""
    refined, _, threads = split_label(label)
    first = split_label(labels[0])[2] if labels else None
    suffix = f"@{first}t" if threads is not None and first is not None else ""
    for base in ([REFINED + "eager-fp32" + suffix] if refined else []) + ["eager-fp32" + suffix]:
        if base in labels:
            return base
    return None


class _Repeat(list):
    """What engine.evaluate needs of a loader: (x, y) batches and a .device; here one batch n times."""

    def __init__(self, x, y, n):
        super().__init__([(x, y)] * n)
        self.device = x.device


class Runner(common.FixedBatch):
    """One mode's student (and teacher), optimizer and batch, ready to step."""

    def __init__(self, label, args, log):
        self.refined, name, self.threads = split_label(label)
        self.mode = mode = MODES[name]
        device = args.device
        fast = speed.resolve(mode.amp, mode.channels_last, mode.compile, mode.optimizer == "fused", device)
        super().__init__(label, args.batch_size, args.seed, device, fast.memory_format)
        torch.manual_seed(args.seed)
        self.net = models.create(args.model, width_mult=args.width_mult, depth_mult=args.depth_mult)
        self.net = self.net.to(device=device, memory_format=fast.memory_format).train()
        if mode.optimizer == "forloop":  # torch's default for CPU tensors: what foreach buys
            self.optimizer = torch.optim.SGD(self.net.parameters(), lr=common.LR, momentum=common.MOMENTUM,
                                             weight_decay=common.WEIGHT_DECAY, foreach=False)
        else:
            self.optimizer = optim.make_optimizer(self.net.parameters(), common.LR, common.MOMENTUM,
                                                  common.WEIGHT_DECAY, fused=fast.fused_optimizer)
        d = self.optimizer.defaults
        self.optimizer_impl = "fused" if d.get("fused") else "foreach" if d.get("foreach") else "for-loop"
        self.autocast = fast.autocast(device)
        self.criterion = make_criterion(True, common.S)
        self.teacher = None
        if self.refined:
            # A random-weight teacher, frozen as train.py freezes one: the cost does not depend on weights.
            teacher = models.create(args.refined_teacher, width_mult=args.teacher_width_mult,
                                    depth_mult=args.teacher_depth_mult)
            self.teacher = refinery.freeze(teacher).to(device=device, memory_format=fast.memory_format)
        self.model, self.teacher_forward, self.compiled, self.compile_s = self.net, self.teacher, None, None
        if mode.compile:
            t0 = time.perf_counter()
            self.model = speed.compile_module(self.net, self.x, self.autocast, log)
            self.compiled = self.model is not self.net
            if self.teacher is not None:
                self.teacher_forward = speed.compile_module(self.teacher, self.x, self.autocast, log, train=False)
                self.compiled = self.compiled and self.teacher_forward is not self.teacher
            self.eval_batches(1)  # the eval graph compiles on its first call: here, outside any timing
            self.compile_s = time.perf_counter() - t0
        objective = (refinery.Refinery(self.teacher, common.S, True, True, forward=self.teacher_forward)
                     if self.refined else HardLabels(self.criterion))
        scaler = torch.amp.GradScaler("cuda", enabled=mode.amp == "fp16")
        self.parts = StepParts(self.model, objective, self.optimizer, scaler, self.autocast)

    def eval_batches(self, batches):
        """(images, seconds) of engine.evaluate over the batch `batches` times."""
        loader = _Repeat(self.x, self.y, batches)
        teacher = self.teacher_forward if self.refined else None
        _, secs = common.timed(self.device, lambda: evaluate(self.model, loader, self.criterion, self.autocast,
                                                              teacher=teacher))
        return batches * self.batch_size, secs

    def describe(self):
        return {"config": asdict(self.mode), "refined": self.refined, "threads": self.threads,
                "optimizer_impl": self.optimizer_impl, "compiled": self.compiled, "compile_s": self.compile_s}


def measure(runner, args, meter, warmup):
    """One timed chunk of a mode: warm-up steps, timed train steps, then timed eval batches."""
    if runner.threads:
        torch.set_num_threads(runner.threads)
    for _ in range(warmup):
        runner.train_step()
    meter.start()
    steps, secs = runner.train_steps(args.steps, args.seconds)
    out = {"train_mem": meter.peak_mb(), "train_ips": steps * runner.batch_size / secs, "train_steps": steps}
    if args.eval_steps:
        runner.eval_batches(1)  # its first batch switches the model to eval and, if compiled, its graph
        meter.start()
        images, secs = runner.eval_batches(args.eval_steps)
        out.update(eval_mem=meter.peak_mb(), eval_ips=images / secs)
    return out


def parse_args(argv=None):
    p = common.parser(__doc__)
    common.add_model_args(p, batch_size=128)
    default = lambda key: f"default cuda: {','.join(DEFAULTS['cuda'][key])}; cpu: {','.join(DEFAULTS['cpu'][key])}"
    p.add_argument("--modes", type=common.one_of(MODES), default=None,
                   help=f"comma-separated, from {', '.join(MODES)} ({default('modes')})")
    p.add_argument("--refined-teacher", type=cli_args.model_name, default=None,
                   help="also time refined steps with this (random-weight, frozen) teacher")
    p.add_argument("--refined-modes", type=common.one_of(MODES), default=None,
                   help=f"modes to time refined ({default('refined_modes')})")
    p.add_argument("--teacher-width-mult", type=cli_args.multiplier, default=None)
    p.add_argument("--teacher-depth-mult", type=cli_args.multiplier, default=None)
    p.add_argument("--steps", type=cli_args.positive_int, default=None,
                   help="timed train steps per mode and round (default 50 on cuda, 10 on cpu)")
    p.add_argument("--warmup", type=common.nonneg_int, default=None,
                   help="untimed steps first (default 10 cuda, 2 cpu)")
    p.add_argument("--eval-steps", type=common.nonneg_int, default=None,
                   help="timed eval batches (default: --steps; 0: none)")
    p.add_argument("--seconds", type=cli_args.positive_float, default=None,
                   help="cut a mode's timed steps after this long")
    p.add_argument("--rounds", type=cli_args.positive_int, default=None,
                   help="time the modes in turn this many times (default 1 on cuda, 3 on cpu)")
    p.add_argument("--threads", type=common.thread_counts, default=[],
                   help="torch CPU threads (default: torch's); a list such as 1,2 times every mode at "
                        "each count, labelled MODE@Nt")
    common.add_output_args(p, json_help="write the results here (rewritten after each mode)")
    p.add_argument("--lock", default=None, help="flock file serialising timed parts across processes")
    p.add_argument("--timing-cpus", default=None, help="cores to time on while holding --lock, e.g. 0-1")
    a = p.parse_args(argv)
    a.device = distributed.pick_device(a.device)
    for key, value in DEFAULTS[a.device.type].items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    a.eval_steps = a.steps if a.eval_steps is None else a.eval_steps
    labels = a.modes + ([REFINED + m for m in a.refined_modes] if a.refined_teacher else [])
    if len(a.threads) > 1:
        labels = [f"{m}@{t}t" for m in labels for t in a.threads]
    a.labels = list(dict.fromkeys(labels))
    return a


def figures(chunks, base, batch_size):
    """A mode's figures from its timed chunks; speed-ups against its baseline's chunks of the same rounds."""
    col = lambda k: [c.get(k) for c in chunks]
    peak = lambda k: max((v for v in col(k) if v is not None), default=None)
    ratio = lambda k: common.median([c[k] / b[k] for c, b in zip(chunks, base) if c.get(k) and b.get(k)])
    train = common.median(col("train_ips"))
    return {"train_images_per_s": train, "eval_images_per_s": common.median(col("eval_ips")),
            "train_images_per_s_rounds": col("train_ips"), "eval_images_per_s_rounds": col("eval_ips"),
            "step_ms": 1000 * batch_size / train, "peak_mem_mb": peak("train_mem"),
            "eval_peak_mem_mb": peak("eval_mem"), "train_speedup": ratio("train_ips"),
            "eval_speedup": ratio("eval_ips")}


def table(d):
    return (f"{d['model']} (width {d['width_mult']:g}, depth {d['depth_mult']:g}, {d['params']:,} params), "
            f"batch {d['batch_size']}, {d['device_name']}, torch {d['torch']}, "
            f"{d['torch_threads']} threads, {d['rounds']} round(s) x {d['steps']} steps"
            + (f", teacher {d['teacher']}" if d["teacher"] else "") + "\n" + summary.step_section([d]))


def main(argv=None):
    a = parse_args(argv)
    with common.torch_threads(a.threads[0] if len(a.threads) == 1 else None):
        return run(a)


def run(a):
    log, device = common.logger("step", a.quiet), a.device
    meter, lock = common.MemoryMeter(device), common.TimingLock(a.lock, a.timing_cpus)
    probe = models.create(a.model, width_mult=a.width_mult, depth_mult=a.depth_mult)
    doc = {"bench": "step", "model": a.model, "width_mult": probe.width_mult, "depth_mult": probe.depth_mult,
           "params": sum(p.numel() for p in probe.parameters()), "batch_size": a.batch_size,
           "teacher": a.refined_teacher, "teacher_width_mult": a.teacher_width_mult,
           "teacher_depth_mult": a.teacher_depth_mult, "steps": a.steps, "warmup": a.warmup,
           "eval_steps": a.eval_steps, "rounds": a.rounds, "seconds_cap": a.seconds, "peak_mem_kind": meter.kind,
           **common.environment(device), "modes": {}}
    del probe
    modes, chunks = doc["modes"], {}

    def save():
        if a.json:
            common.write_json(a.json, doc)

    def attempt(label, work):
        try:
            return work()
        except Exception as e:  # a mode that cannot run (no compiler, OOM) must not lose the others
            traceback.print_exc()
            modes.setdefault(label, {})["error"] = f"{type(e).__name__}: {str(e).strip()[:300]}"
            save()
            _free(device)
            return None

    def build(label):
        log(f"{label}: building" + (" and compiling" if mode_of(label).compile else ""))
        r = attempt(label, lambda: Runner(label, a, log))
        if r is not None:
            modes.setdefault(label, {}).update(r.describe())
            _free(device)  # return the compile probe's cached blocks before waiting for the lock
        return r

    def run_chunk(label, runner, warmup):
        def work():
            with lock.hold():
                return measure(runner, a, meter, warmup)
        chunk = attempt(label, work)
        if chunk is None:
            return False
        chunks.setdefault(label, []).append(chunk)
        for mode, done in chunks.items():  # all again: a baseline may come after the modes it is for
            base = baseline_of(mode, list(modes))
            modes[mode].update(figures(done, chunks.get(base, []), a.batch_size), baseline=base)
        save()
        log(f"{label}: {chunk['train_ips']:.0f} train img/s, "
            f"{chunk.get('eval_ips', 0):.0f} eval img/s, peak {chunk['train_mem'] or 0:.0f} MB")
        return True

    if a.rounds == 1:
        # One at a time, each freed before the next, so a CUDA peak is that mode's alone.
        for label in a.labels:
            r = build(label)
            if r is not None:
                run_chunk(label, r, a.warmup)
            del r
            _free(device)
    else:
        runners = {label: build(label) for label in a.labels}
        for rnd in range(a.rounds):
            for label, r in runners.items():
                if r is not None and not run_chunk(label, r, a.warmup if rnd == 0 else 1):
                    runners[label] = None
    doc["lock_wait_s"] = round(lock.waited_s, 1)
    save()
    print(table(doc))
    return 0 if any("train_images_per_s" in m for m in modes.values()) else 1


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(run_main(main))
