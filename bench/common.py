"""What the benchmarks share beyond engine/ and cli/: their flags, the record of the machine, the timed
fixed-batch step, statistics and tables, the memory meter and the GPU timing lock."""
import argparse
import contextlib
import ctypes
import fcntl
import gc
import glob
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

import data
from micronet_cifar100.cli import args as cli_args
from engine import run_folder
from engine.config import RunConfig
from engine.meter import Meter
from engine.step import train_step
from engine.trainer import sync

MiB = 1024 ** 2
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The step benchmarks' SGD and loss: train.py's defaults, and the regime's first LR (an update costs
# the same at any LR, but keep it real).
LR = 0.07
MOMENTUM, WEIGHT_DECAY, S = RunConfig.momentum, RunConfig.weight_decay, RunConfig.s
# engine's atomic write: a benchmark killed by its time budget never leaves half a file.
write_json = run_folder.write_json

nonneg_int = cli_args.typed(int, lambda n: n >= 0, "an integer >= 0")
thread_counts = cli_args.typed(lambda v: [int(t) for t in v.split(",") if t], lambda ts: ts and min(ts) >= 1,
                               "thread counts >= 1, such as 1 or 1,2")


def one_of(names):
    """An argparse type: a comma-separated list of some of `names`."""
    return cli_args.typed(lambda v: [n.strip() for n in v.split(",") if n.strip()],
                          lambda ns: ns and set(ns) <= set(names), f"some of {', '.join(names)}, comma-separated")


def parser(doc):
    """A script's parser: its docstring's first paragraph as the description, all of it as the epilog."""
    return argparse.ArgumentParser(description=doc.split("\n\n")[0], epilog=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def add_model_args(p, batch_size):
    """The flags every step benchmark shares: the model, its scaling, the device, the batch."""
    p.add_argument("--model", type=cli_args.model_name, default="efficientnet_ex")
    p.add_argument("--width-mult", type=cli_args.multiplier, default=None)
    p.add_argument("--depth-mult", type=cli_args.multiplier, default=None)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--batch-size", type=cli_args.positive_int, default=batch_size)


def add_output_args(p, json_help):
    """The seed of the benchmark's random inputs, where its JSON goes, and --quiet."""
    p.add_argument("--seed", type=cli_args.seed_int, default=0)
    p.add_argument("--json", default=None, help=json_help)
    p.add_argument("--quiet", action="store_true")


def logger(tag, quiet=False):
    """Progress lines go to stderr, so that stdout holds the results alone."""
    return (lambda *m: None) if quiet else (lambda *m: print(f"[{tag}]", *m, file=sys.stderr, flush=True))


@contextlib.contextmanager
def torch_threads(n=None):
    """n torch threads inside (None: as they are), the count before restored after: the tests run
    the benchmarks in their own process."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def thread_label(n):
    return f"{n} thread{'s' if int(n) > 1 else ''}"


def load_results(paths):
    """The benchmark results among `paths` (JSON files, or folders of them), each with its file name
    under "_file"; other JSON (gpu.sh's train_info.json) is passed over, unreadable files with a line."""
    docs = []
    for path in paths:
        for file in sorted(glob.glob(os.path.join(path, "*.json"))) if os.path.isdir(path) else [path]:
            doc = run_folder.read_json(file)
            if doc is None:
                print(f"skipping {file}: not readable JSON", file=sys.stderr)
            elif isinstance(doc, dict) and "bench" in doc:
                docs.append(dict(doc, _file=os.path.basename(file)))
    return docs


def git_commit():
    git = lambda *a: subprocess.run(["git", "-C", ROOT, *a], capture_output=True, text=True, timeout=5)
    try:
        head, dirty = git("rev-parse", "--short", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if head.returncode == 0 else None


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        name = None
    return name or platform.processor() or None


def environment(device):
    env = {"device": device.type, "torch": torch.__version__, "python": platform.python_version(),
           "cpu_count": os.cpu_count(),
           # What this process may use; under taskset or a container quota it is fewer than cpu_count.
           "cpus_usable": len(os.sched_getaffinity(0)),
           "torch_threads": torch.get_num_threads(), "cpu_model": cpu_model(),
           "load_average_1min": os.getloadavg()[0], "commit": git_commit(),
           "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if device.type != "cuda":
        return dict(env, device_name=env["cpu_model"])
    p = torch.cuda.get_device_properties(device)
    return dict(env, device_name=p.name, device_memory_gb=round(p.total_memory / 1e9, 1), cuda=torch.version.cuda,
                cudnn=torch.backends.cudnn.version())


def timed(device, work):
    """(work(), wall seconds) with the device's queued work inside the clock: CUDA kernels run
    asynchronously, and a clock read without waiting for them would time their launches only."""
    sync(device)
    t0 = time.perf_counter()
    out = work()
    sync(device)
    return out, time.perf_counter() - t0


class FixedBatch:
    """train.py's step (engine.step.train_step) on one random batch made once, so that no data
    loading is timed. A subclass sets `parts` (engine.step.StepParts)."""

    def __init__(self, label, batch_size, seed, device, memory_format=torch.contiguous_format):
        self.label, self.batch_size, self.device, self.parts = label, batch_size, device, None
        # Made on the CPU from a seeded generator so every mode and device steps on the same numbers.
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn((batch_size, 3, 32, 32), generator=gen).to(device).contiguous(memory_format=memory_format)
        self.y = torch.randint(0, data.NUM_CLASSES, (batch_size,), generator=gen).to(device)
        self.meter = Meter(device)
        self.failed = torch.zeros((), dtype=torch.int64, device=device)

    def train_step(self):
        self.failed += ~train_step(self.parts, self.x, self.y, self.meter)
        # train.py reads its non-finite counter every step on the CPU, where the read costs nothing.
        if self.device.type == "cpu" and int(self.failed):
            raise FloatingPointError(f"{self.label}: non-finite loss")

    def train_steps(self, steps, seconds=None):
        """(steps done, seconds) of up to `steps` steps, cut short once `seconds` have passed (on CUDA
        the host runs ahead, so the cut is approximate; the figure is exact)."""
        def work():
            t0, done = time.perf_counter(), 0
            while done < steps and not (seconds and done >= 2 and time.perf_counter() - t0 > seconds):
                self.train_step()
                done += 1
            return done
        return timed(self.device, work)


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def markdown_table(headers, rows):
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
    return "\n".join([line(cells[0]), line(["-" * w for w in widths])] + [line(r) for r in cells[1:]])


def fmt(x, digits=0):
    return "-" if x is None else f"{x:,.{digits}f}"


def _proc_status_kb(field):
    with open("/proc/self/status") as f:
        return next((int(line.split()[1]) for line in f if line.startswith(field + ":")), None)


class MemoryMeter:
    """Peak memory of a stretch of work. CUDA: torch.cuda.max_memory_allocated, absolute. CPU: the
    rise of peak RSS over the RSS at the start (VmHWM - VmRSS), so weights and optimizer state made
    before are left out; None where the peak cannot be reset (`exact` False), rather than a number
    from some earlier peak."""

    def __init__(self, device):
        self.device, self.exact, self._base = device, True, None
        self.kind = ("cuda max_memory_allocated (absolute)" if device.type == "cuda"
                     else "cpu peak RSS rise over the pre-step RSS (/proc VmHWM - VmRSS)")

    def start(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        # Freed tensors stay in glibc's heap and so in RSS; trimming first makes the next RSS rise
        # come from the step itself instead of being absorbed by memory a previous mode left behind.
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        # Writing 5 to clear_refs resets VmHWM (the peak RSS) to the current RSS (Linux >= 4.0).
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.exact = True
        except OSError:
            self.exact = False
        self._base = _proc_status_kb("VmRSS")

    def peak_mb(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / MiB
        if not self.exact or self._base is None:
            return None
        return max(0, _proc_status_kb("VmHWM") - self._base) / 1024


def parse_cpus(spec):
    """'0-1,4' -> {0, 1, 4}."""
    cpus = set()
    for part in filter(None, spec.split(",")):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def _set_affinity_all_threads(cpus):
    # sched_setaffinity on a pid moves one thread only; autograd's device thread launches the
    # backward kernels, so every thread of the process has to move.
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(tid), cpus)


class TimingLock:
    """Serialises the timed parts of several benchmark processes that share one GPU (gpu.sh runs the
    models' benchmarks at once so that their CPU-bound torch.compile work overlaps). Inside the lock
    the process moves to `timing_cpus`, cores the others' compile workers are kept off, so that their
    compiling does not slow its kernel launches. Without a path it is a no-op."""

    def __init__(self, path=None, timing_cpus=None):
        self.path, self.waited_s = path, 0.0
        self.timing_cpus = parse_cpus(timing_cpus) if timing_cpus else None

    @contextlib.contextmanager
    def hold(self):
        if not self.path:
            yield
            return
        t0 = time.perf_counter()
        with open(self.path, "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            self.waited_s += time.perf_counter() - t0
            before = os.sched_getaffinity(0)
            if self.timing_cpus:
                _set_affinity_all_threads(self.timing_cpus & set(range(os.cpu_count())) or before)
            try:
                yield
            finally:
                if self.timing_cpus:
                    _set_affinity_all_threads(before)
                fcntl.flock(f, fcntl.LOCK_UN)
