#!/usr/bin/env python
"""Train-step and evaluation throughput, and peak memory, of one model under each speed-up mode.

    python bench/step.py --model efficientnet_ex --device cuda --batch-size 256 --json OUT.json
    python bench/step.py --model efficientnet_ex --width-mult 0.25 --depth-mult 0.34 --device cpu \
        --batch-size 128 --modes eager-fp32,channels_last,bf16,fused-sgd,all-eager --json OUT.json

Every mode is train.py with the matching speed flags; the step is train.py's own
(engine.step.train_step: forward and loss under autocast, zero_grad, backward, optimizer step through
the GradScaler, the on-device meter), plus the per-step finite-loss check that train.py does on the CPU. Inputs are one random batch made on
the device, so no data loading is timed (bench/augmentation.py times that).

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

Eval is engine.evaluate.evaluate (train.py's per-epoch test pass) over the same batch, at the
training batch size: that is also what the refinery's teacher forward costs inside a refined step.
With --rounds R > 1 the modes are kept alive side by side and timed in turn R times, so drift in a
shared machine's load hits every mode alike; speed-ups are medians of the per-round ratios.
"""
import argparse
import gc
import sys
import time
import traceback
from dataclasses import asdict, dataclass, replace

import torch

import models
import refinery
from bench import common
from engine import speed
from engine.evaluate import evaluate
from engine.meter import Meter
from engine.step import HardLabels, StepParts, train_step
from loss import make_criterion

LR = 0.07          # the regime's first LR: the update's cost does not depend on it, but keep it real
S = 5.0            # AM-softmax / refinery scale, train.py's default
MOMENTUM, WEIGHT_DECAY = 0.9, 1e-4


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
DEFAULT_MODES = {"cuda": "eager-fp32,channels_last,bf16,compile,fused-sgd,all",
                 "cpu": "eager-fp32,channels_last,bf16,fused-sgd,all-eager"}
DEFAULT_REFINED = {"cuda": "eager-fp32,all", "cpu": "eager-fp32,all-eager"}


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


class _RepeatLoader:
    """What engine.evaluate needs of a loader: (x, y) batches and a .device; here one batch n times."""

    def __init__(self, x, y, n):
        self.x, self.y, self.n, self.device = x, y, n, x.device

    def __len__(self):
        return self.n

    def __iter__(self):
        for _ in range(self.n):
            yield self.x, self.y


class Runner:
    """One mode's student (and teacher), optimizer and batch, ready to step."""

    def __init__(self, label, args, device, log):
        self.label, self.mode, self.device = label, mode_of(label), device
        self.refined, _, self.threads = split_label(label)
        self.batch_size = args.batch_size
        self.check_every_step = device.type == "cpu"  # train.py reads the finite flag every CPU step
        mode = self.mode
        torch.manual_seed(args.seed)
        self.sargs = argparse.Namespace(amp=mode.amp, channels_last=mode.channels_last,
                                        compile=mode.compile, fused_optimizer=mode.optimizer == "fused",
                                        momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
        speed.resolve(self.sargs, device)
        fmt = speed.memory_format(self.sargs)
        self.net = models.create(args.model, width_mult=args.width_mult, depth_mult=args.depth_mult)
        self.net = self.net.to(device=device, memory_format=fmt).train()
        if mode.optimizer == "forloop":
            self.optimizer = torch.optim.SGD(self.net.parameters(), lr=LR, momentum=MOMENTUM,
                                             weight_decay=WEIGHT_DECAY, foreach=False)
        else:
            self.optimizer = speed.make_optimizer(self.net.parameters(), self.sargs, LR)
        d = self.optimizer.defaults
        self.optimizer_impl = "fused" if d.get("fused") else "foreach" if d.get("foreach") else "for-loop"
        self.autocast = speed.autocast(self.sargs, device)
        self.criterion = make_criterion(True, S)
        gen = torch.Generator().manual_seed(args.seed)
        # Made on the CPU from a seeded generator so every mode and device steps on the same numbers.
        self.x = torch.randn((args.batch_size, 3, 32, 32), generator=gen).to(device).contiguous(
            memory_format=fmt)
        self.y = torch.randint(0, 100, (args.batch_size,), generator=gen).to(device)
        self.teacher = self.teacher_forward = None
        if self.refined:
            # A random-weight teacher, frozen as train.py freezes one: the cost does not depend on weights.
            teacher = models.create(args.refined_teacher, width_mult=args.teacher_width_mult,
                                    depth_mult=args.teacher_depth_mult)
            self.teacher = self.teacher_forward = refinery.freeze(teacher).to(device=device, memory_format=fmt)
        self.model = self.net
        self.compiled = None
        t0 = time.perf_counter()
        if mode.compile:
            self.model = speed.compile_module(self.net, self.x, self.autocast, log)
            self.compiled = self.model is not self.net
            if self.teacher is not None:
                self.teacher_forward = speed.compile_module(self.teacher, self.x, self.autocast, log, train=False)
                self.compiled = self.compiled and self.teacher_forward is not self.teacher
            # The eval graph compiles on its first call; do that here, outside any timing.
            self.eval_batches(1)
        self.compile_s = time.perf_counter() - t0 if mode.compile else None
        objective = (refinery.Refinery(self.teacher, S, True, True, forward=self.teacher_forward)
                     if self.refined else HardLabels(self.criterion))
        scaler = torch.amp.GradScaler("cuda", enabled=mode.amp == "fp16")
        self.parts = StepParts(self.model, objective, self.optimizer, scaler, self.autocast)
        self.meter = Meter(device)
        self.bad = torch.zeros((), dtype=torch.int64, device=device)

    def train_step(self):
        self.bad += ~train_step(self.parts, self.x, self.y, self.meter)
        if self.check_every_step and int(self.bad):
            raise FloatingPointError(f"{self.label}: non-finite loss")

    def train_steps(self, steps, seconds=None):
        """(images, seconds) of up to `steps` steps, cut short once `seconds` have passed."""
        common.sync(self.device)
        t0 = time.perf_counter()
        done = 0
        for _ in range(steps):
            self.train_step()
            done += 1
            # On CUDA the host runs ahead of the GPU, so this cut is approximate; the sync below
            # makes the figure itself exact.
            if seconds and done >= 2 and time.perf_counter() - t0 > seconds:
                break
        common.sync(self.device)
        return done * self.batch_size, time.perf_counter() - t0

    def eval_batches(self, batches):
        loader = _RepeatLoader(self.x, self.y, batches)
        common.sync(self.device)
        t0 = time.perf_counter()
        evaluate(self.model, loader, self.criterion, self.autocast,
                 teacher=self.teacher_forward if self.refined else None)
        common.sync(self.device)  # evaluate reads its sums back, but say so explicitly
        return batches * self.batch_size, time.perf_counter() - t0

    def describe(self):
        return {"config": asdict(self.mode), "refined": self.refined, "threads": self.threads,
                "optimizer_impl": self.optimizer_impl, "compiled": self.compiled,
                "compile_s": self.compile_s}


def measure(runner, args, meter, warmup):
    """One timed chunk of a mode: warm-up steps, timed train steps, then timed eval batches."""
    out = {}
    if runner.threads:
        torch.set_num_threads(runner.threads)
    for _ in range(warmup):
        runner.train_step()
    meter.start()
    images, secs = runner.train_steps(args.steps, args.seconds)
    out["train_mem"] = meter.peak_mb()
    out["train_ips"], out["train_steps"] = images / secs, images // runner.batch_size
    if args.eval_steps:
        runner.eval_batches(1)  # its first batch switches the model to eval and, if compiled, its graph
        meter.start()
        images, secs = runner.eval_batches(args.eval_steps)
        out["eval_mem"] = meter.peak_mb()
        out["eval_ips"] = images / secs
    return out


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    common.add_model_args(p, batch_size=128)
    p.add_argument("--modes", default=None,
                   help=f"comma-separated, from {', '.join(MODES)} (default cuda: {DEFAULT_MODES['cuda']}; "
                        f"cpu: {DEFAULT_MODES['cpu']})")
    p.add_argument("--refined-teacher", default=None, choices=models.names(),
                   help="also time refined steps with this (random-weight, frozen) teacher")
    p.add_argument("--refined-modes", default=None,
                   help=f"modes to time refined (default cuda: {DEFAULT_REFINED['cuda']}; "
                        f"cpu: {DEFAULT_REFINED['cpu']})")
    p.add_argument("--teacher-width-mult", type=float, default=None)
    p.add_argument("--teacher-depth-mult", type=float, default=None)
    p.add_argument("--steps", type=int, default=None, help="timed train steps per mode and round "
                   "(default 50 on cuda, 10 on cpu)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 10 cuda, 2 cpu)")
    p.add_argument("--eval-steps", type=int, default=None, help="timed eval batches (default: --steps; 0: none)")
    p.add_argument("--seconds", type=float, default=None, help="cut a mode's timed steps after this long")
    p.add_argument("--rounds", type=int, default=None,
                   help="time the modes in turn this many times (default 1 on cuda, 3 on cpu)")
    p.add_argument("--threads", default=None,
                   help="torch CPU threads (default: torch's); a list such as 1,2 times every mode at "
                        "each count, labelled MODE@Nt")
    common.add_output_args(p, json_help="write the results here (rewritten after each mode)")
    p.add_argument("--lock", default=None, help="flock file serialising timed parts across processes")
    p.add_argument("--timing-cpus", default=None, help="cores to time on while holding --lock, e.g. 0-1")
    return p


def parse_args(argv=None):
    p = build_parser()
    a = p.parse_args(argv)
    a.device = common.pick_device(a.device)
    kind = a.device.type
    a.steps = a.steps if a.steps is not None else (50 if kind == "cuda" else 10)
    a.warmup = a.warmup if a.warmup is not None else (10 if kind == "cuda" else 2)
    a.eval_steps = a.steps if a.eval_steps is None else a.eval_steps
    a.rounds = a.rounds or (1 if kind == "cuda" else 3)
    modes = [m for m in (a.modes or DEFAULT_MODES[kind]).split(",") if m]
    refined = [m for m in (a.refined_modes or DEFAULT_REFINED[kind]).split(",") if m] \
        if a.refined_teacher else []
    for m in modes + refined:
        if m not in MODES:
            p.error(f"unknown mode {m!r}; use some of {', '.join(MODES)}")
    if a.batch_size < 1 or a.steps < 1 or a.rounds < 1 or a.warmup < 0 or a.eval_steps < 0:
        p.error("--batch-size, --steps and --rounds must be >= 1; --warmup and --eval-steps >= 0")
    try:
        a.threads = [int(t) for t in a.threads.split(",") if t] if a.threads else []
    except ValueError:
        p.error(f"--threads takes counts such as 1 or 1,2, got {a.threads!r}")
    if any(t < 1 for t in a.threads):
        p.error("--threads counts must be >= 1")
    labels = modes + [REFINED + m for m in refined]
    if len(a.threads) > 1:
        labels = [f"{m}@{t}t" for m in labels for t in a.threads]
    a.labels = list(dict.fromkeys(labels))
    return a


class Results:
    def __init__(self, args, net_info, meter):
        self.args, self.rounds = args, {}
        self.doc = {
            "bench": "step",
            "model": args.model,
            "width_mult": net_info["width_mult"],
            "depth_mult": net_info["depth_mult"],
            "params": net_info["params"],
            "batch_size": args.batch_size,
            "teacher": args.refined_teacher,
            "teacher_width_mult": args.teacher_width_mult,
            "teacher_depth_mult": args.teacher_depth_mult,
            "steps": args.steps, "warmup": args.warmup, "eval_steps": args.eval_steps,
            "rounds": args.rounds, "seconds_cap": args.seconds,
            "peak_mem_kind": meter.kind,
            **common.environment(args.device),
            "modes": {},
        }

    def setup(self, label, info):
        self.doc["modes"].setdefault(label, {}).update(info)
        self.rounds.setdefault(label, [])

    def error(self, label, exc):
        self.doc["modes"].setdefault(label, {})["error"] = f"{type(exc).__name__}: {str(exc).strip()[:300]}"

    def add(self, label, chunk):
        self.rounds.setdefault(label, []).append(chunk)
        self._summarise()

    def _summarise(self):
        labels = list(self.doc["modes"])
        for label, chunks in self.rounds.items():
            if not chunks:
                continue
            m = self.doc["modes"][label]
            col = lambda k: [c.get(k) for c in chunks]
            m["train_images_per_s"] = common.median(col("train_ips"))
            m["eval_images_per_s"] = common.median(col("eval_ips"))
            m["train_images_per_s_rounds"] = col("train_ips")
            m["eval_images_per_s_rounds"] = col("eval_ips")
            m["step_ms"] = 1000 * self.args.batch_size / m["train_images_per_s"]
            mems = [v for v in col("train_mem") if v is not None]
            m["peak_mem_mb"] = max(mems) if mems else None
            mems = [v for v in col("eval_mem") if v is not None]
            m["eval_peak_mem_mb"] = max(mems) if mems else None
            base = baseline_of(label, labels)
            m["baseline"] = base
            for kind in ("train", "eval"):
                ratios = []
                for c, b in zip(chunks, self.rounds.get(base, [])):
                    if c.get(f"{kind}_ips") and b.get(f"{kind}_ips"):
                        ratios.append(c[f"{kind}_ips"] / b[f"{kind}_ips"])
                m[f"{kind}_speedup"] = common.median(ratios)

    def write(self):
        if self.args.json:
            common.write_json(self.args.json, self.doc)

    def table(self):
        rows = []
        for label, m in self.doc["modes"].items():
            if "train_images_per_s" not in m:
                rows.append([label, "-", "-", "-", "-", "-", m.get("error", "not run")[:60]])
                continue
            rows.append([label, common.fmt(m["train_images_per_s"]), common.fmt(m.get("train_speedup"), 2),
                         common.fmt(m.get("eval_images_per_s")), common.fmt(m.get("eval_speedup"), 2),
                         common.fmt(m.get("peak_mem_mb")), m.get("error", "")])
        d = self.doc
        head = (f"{d['model']} (width {d['width_mult']:g}, depth {d['depth_mult']:g}, {d['params']:,} params), "
                f"batch {d['batch_size']}, {d['device_name']}, torch {d['torch']}, "
                f"{d['torch_threads']} threads, {d['rounds']} round(s) x {d['steps']} steps"
                + (f", teacher {d['teacher']}" if d["teacher"] else ""))
        return head + "\n" + common.markdown_table(
            ["mode", "train img/s", "x", "eval img/s", "x", "peak MB", "note"], rows) + \
            f"\npeak MB: {d['peak_mem_kind']}"


def main(argv=None):
    before = torch.get_num_threads()
    try:
        return _main(argv)
    finally:
        torch.set_num_threads(before)  # for callers in the same process (tests)


def _main(argv):
    a = parse_args(argv)
    if len(a.threads) == 1:
        torch.set_num_threads(a.threads[0])
    log = (lambda *m: None) if a.quiet else (lambda *m: print("[step]", *m, file=sys.stderr, flush=True))
    device = a.device
    probe = models.create(a.model, width_mult=a.width_mult, depth_mult=a.depth_mult)
    info = {"width_mult": probe.width_mult, "depth_mult": probe.depth_mult,
            "params": sum(p.numel() for p in probe.parameters())}
    del probe
    meter = common.MemoryMeter(device)
    lock = common.TimingLock(a.lock, a.timing_cpus)
    res = Results(a, info, meter)

    def build(label):
        log(f"{label}: building" + (" and compiling" if mode_of(label).compile else ""))
        try:
            r = Runner(label, a, device, log)
        except Exception as e:  # a mode that cannot run (no compiler, OOM) must not lose the others
            traceback.print_exc()
            res.error(label, e)
            res.write()
            _free(device)
            return None
        res.setup(label, r.describe())
        _free(device)  # return the compile probe's cached blocks before waiting for the lock
        return r

    def run_chunk(label, runner, warmup):
        try:
            with lock.hold():
                chunk = measure(runner, a, meter, warmup)
        except Exception as e:
            traceback.print_exc()
            res.error(label, e)
            res.write()
            _free(device)
            return False
        res.add(label, chunk)
        res.write()
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
    res.doc["lock_wait_s"] = round(lock.waited_s, 1)
    res.write()
    print(res.table())
    ok = any("train_images_per_s" in m for m in res.doc["modes"].values())
    return 0 if ok else 1


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
