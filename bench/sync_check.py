#!/usr/bin/env python
"""Where does the training loop wait for the device? Runs train.py's training (engine.trainer)
and lists every host synchronisation made inside its epoch loop, by source line.

    python bench/sync_check.py --json OUT.json -- --device cuda --epochs 1 --train-limit 20000 ...
    python bench/sync_check.py -- --device cpu --model efficientnet_ex --width-mult 0.25 ...

Everything after `--` goes to train.py unchanged. On CUDA the detector is PyTorch's own
(torch.cuda.set_sync_debug_mode("warn"), which flags every blocking copy, .item(), nonzero and
synchronize). On the CPU nothing ever waits, so the same calls are caught where they would wait on
a GPU: the ops that read a tensor's value on the host (`.item()`, `bool(t)`, `int(t)`, nonzero,
masked_select), seen through a TorchDispatchMode. (On the CPU a `.tolist()` or `.cpu()` is not an
op and escapes that net; CUDA's detector sees them.)

By design train.py reads the device once per log interval (the non-finite loss check) and at the
end of the epoch; anything else is a stall to remove. On the CPU, where that check is free, train.py
makes it every step; here the GPU's cadence is used unless --cpu-cadence is given.
"""
import collections
import contextlib
import os
import sys
import traceback
import warnings

# `python bench/NAME.py` puts bench/ on sys.path, not the root that holds the project's packages.
if not __package__:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from micronet_cifar100 import errors
from bench import common, summary
from micronet_cifar100.cli.errors import run_main
from micronet_cifar100.cli.train_flags import parse_config
from engine import trainer

_HERE = os.path.dirname(os.path.abspath(__file__))
# aten ops that copy a device value to the host, so that on a GPU the host waits for the device.
HOST_READS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "repeat_interleave"}


def _ours(path):
    """Whether `path` is this project's code (outside bench/ and the virtual environment)."""
    path = os.path.abspath(path)
    return path.startswith(common.ROOT + os.sep) and not path.startswith(_HERE) and ".venv" not in path


def _location(path, line):
    return f"{os.path.relpath(path, common.ROOT) if _ours(path) else path}:{line}"


def _where(stack):
    """The innermost frame of this project as 'path:line', else the innermost frame."""
    frame = next((f for f in reversed(stack) if _ours(f.filename)), stack[-1])
    return _location(frame.filename, frame.lineno)


class HostReads(TorchDispatchMode):
    """Counts, by calling line, the ops that read device values on the host."""

    def __init__(self, counts):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in HOST_READS:
            self.counts[_where(traceback.extract_stack())] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def detect(device, counts):
    """Record every host synchronisation made inside the block into counts (a Counter by line)."""
    if device.type == "cuda":
        previous = torch.cuda.get_sync_debug_mode()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield
            finally:
                torch.cuda.set_sync_debug_mode(previous)
        for w in caught:
            if "synchroniz" in str(w.message):
                counts[_location(w.filename, w.lineno)] += 1
    else:
        with HostReads(counts):
            yield


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    ours, train_argv = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = common.parser(__doc__)
    p.add_argument("--json", default=None)
    p.add_argument("--cpu-cadence", action="store_true",
                   help="on the CPU keep its every-step non-finite check; by default the GPU's cadence "
                        "(once per log interval) is used, so the count shows what a GPU run would do")
    a = p.parse_args(ours)

    cfg = parse_config(train_argv + ["--no-progress"])
    counts = collections.Counter()
    steps, devices = [], set()

    @contextlib.contextmanager
    def watched(loader, first_step):
        devices.add(loader.device)
        with detect(loader.device, counts):
            yield
        steps.append(len(loader) - first_step)

    # By default the GPU's cadence of the non-finite check, so the count shows what a GPU run does.
    cadence = None if a.cpu_cadence else torch.device("cuda")
    result = trainer.train(cfg, trainer.Hooks(around_epoch=watched, check_cadence_device=cadence))
    if not steps:
        raise errors.RunError("train.py trained no epoch, so there is nothing to check; give it --epochs "
                              "and a new --save folder")
    (device,) = devices
    n_steps = sum(steps)
    doc = {"bench": "sync_check", "device": str(device), "steps": n_steps, "log_interval": cfg.log_interval,
           "nan_check_every": trainer.nan_check_every(cfg.nan_policy, cfg.log_interval, cadence or device),
           "syncs": dict(counts), "syncs_total": sum(counts.values()),
           "syncs_per_step": sum(counts.values()) / max(n_steps, 1), "train_folder": result["folder"],
           "detector": ("torch.cuda.set_sync_debug_mode('warn')" if device.type == "cuda"
                        else "TorchDispatchMode over host-reading aten ops"),
           **common.environment(device)}
    if a.json:
        common.write_json(a.json, doc)
    print(f"host synchronisations inside train.py's epoch loop: {doc['syncs_total']} in {n_steps} steps "
          f"({doc['syncs_per_step']:.3f} a step; log interval {cfg.log_interval}) on {device}")
    print(summary.sync_table(doc))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
