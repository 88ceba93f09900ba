"""Helpers shared by the benchmarks: environment record, clocks, memory meters, the GPU timing lock."""
import contextlib
import ctypes
import fcntl
import gc
import json
import os
import platform
import statistics
import subprocess
import time

import torch

MiB = 1024 ** 2
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pick_device(name):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no CUDA GPU; use --device cpu")
    return torch.device(name)


def sync(device):
    # CUDA kernels run asynchronously: a clock read without this times the launches, not the work.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def git_commit():
    try:
        out = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device):
    env = {
        "device": device.type,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        # What this process may use; under taskset or a container quota it is fewer than cpu_count.
        "cpus_usable": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "cpu_model": _cpu_model(),
        "load_average_1min": os.getloadavg()[0],
        "commit": git_commit(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(device_name=p.name, device_memory_gb=round(p.total_memory / 1e9, 1),
                   cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    else:
        env["device_name"] = env["cpu_model"]
    return env


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(name):
    """A top-level script of the repository (train, chain) as a module, loaded from its file once:
    scripts are not installed packages, and loading by path needs no sys.path edit."""
    import importlib.util
    import sys
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def add_model_args(p, batch_size):
    """The flags every step benchmark shares: the model, its scaling, the device, the batch."""
    import models
    p.add_argument("--model", default="efficientnet_ex", choices=models.names())
    p.add_argument("--width-mult", type=float, default=None)
    p.add_argument("--depth-mult", type=float, default=None)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--batch-size", type=int, default=batch_size)


def add_output_args(p, json_help):
    """The seed of the benchmark's random inputs, where its JSON goes, and --quiet."""
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help=json_help)
    p.add_argument("--quiet", action="store_true")


def write_json(path, obj):
    """Write atomically, so a benchmark killed by its time budget never leaves half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def markdown_table(headers, rows):
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
    sep = "| " + " | ".join("-" * w for w in widths) + " |"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def fmt(x, digits=0):
    if x is None:
        return "-"
    return f"{x:,.{digits}f}"


# ----------------------------------------------------------------------------- memory

def _proc_status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def _malloc_trim():
    # Freed tensors stay in glibc's heap and so in RSS; trimming first makes the next RSS rise
    # come from the step itself instead of being absorbed by memory a previous mode left behind.
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_rss_peak():
    # Writing 5 to clear_refs resets VmHWM (the peak RSS) to the current RSS (Linux >= 4.0).
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class MemoryMeter:
    """Peak memory of a stretch of work.

    CUDA: torch.cuda.max_memory_allocated over the stretch, absolute (weights, gradients, optimizer
    state, activations, everything this process holds on the GPU then).
    CPU: the rise of peak RSS above the RSS at the start (VmHWM - VmRSS from /proc), so weights and
    optimizer state made before the start are excluded and activations, gradients created inside
    and library workspaces are counted. Where the peak cannot be reset (`exact` False) the CPU
    figure reads None rather than a number from some earlier peak.
    """

    def __init__(self, device):
        self.device = device
        self.kind = ("cuda max_memory_allocated (absolute)" if device.type == "cuda"
                     else "cpu peak RSS rise over the pre-step RSS (/proc VmHWM - VmRSS)")
        self._base = None
        self.exact = True

    def start(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _malloc_trim()
            self.exact = _reset_rss_peak()
            self._base = _proc_status_kb("VmRSS")

    def peak_mb(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / MiB
        if not self.exact or self._base is None:
            return None
        return max(0, _proc_status_kb("VmHWM") - self._base) / 1024


# ----------------------------------------------------------------------------- timing lock

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
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:
            pass


class TimingLock:
    """Serialises the timed parts of several benchmark processes that share one GPU.

    gpu.sh runs the benchmarks of all models at once so that their torch.compile work (CPU bound)
    overlaps; only the measurements must not overlap. Inside the lock the process also moves to
    `timing_cpus`, cores the others' compile workers are kept off, so its kernel launches are not
    slowed by their compiling. Without a path it is a no-op.
    """

    def __init__(self, path=None, timing_cpus=None):
        self.path = path
        self.timing_cpus = parse_cpus(timing_cpus) if timing_cpus else None
        self.waited_s = 0.0

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
