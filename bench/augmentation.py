#!/usr/bin/env python
"""Images/s of our batched augmentation against torchvision's transforms of the same recipe.

    python bench/augmentation.py --device cuda --data_dir D --json OUT.json
    python bench/augmentation.py --device cpu --data_dir D --seconds 60 --json OUT.json

ours:        data.TrainLoader with the `uci` recipe, iterated as train.py does: uint8 images on the
             device, each batch gathered, jittered, crop-resized, flipped and normalised there, in
             train.py's default channels_last layout. Where the device has a fast path (the CPU:
             data/augment_cpu.py), the same loader with fast=False (the reference definition,
             data/augment.py) is timed too, and the fast path's gain reported.
torchvision: what the original did: a DataLoader (shuffle, --workers worker processes) over three
             CIFAR-style datasets of PIL images, one per recipe copy (torchvision_recipe), each then
             ToTensor + Normalize. On CUDA each batch is also copied to the GPU (pinned, non-blocking).

Both run in one process, in alternating timed phases (--rounds of each), so a shared machine's
load changes hit both alike; ours at each --threads count. Besides images per second of wall time,
each side's images per CPU-second are reported (ours: this process's CPU time; theirs: the workers'
too), which a busy machine distorts far less: under contention the scheduler gives torchvision's
three processes a larger share of the cores than our one. (On CUDA our CPU time is mostly the host
waiting in synchronize: there read the wall-time figure.) The torchvision workers fill their
prefetch queue during our phases and it is drained before theirs, so neither side is timed on work
done during the other's phase.
"""
import itertools
import os
import sys
import time

# `python bench/NAME.py` puts bench/ on sys.path, not the root that holds the project's packages.
if not __package__:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset

import data
from bench import common, summary
from micronet_cifar100.cli import args as cli_args
from micronet_cifar100.cli.errors import run_main
from data import augment_cpu
from engine import distributed
from engine.trainer import sync

RECIPE = "uci"
PREFETCH = 2  # DataLoader's default prefetch_factor, named so the drain below can count on it


class CifarArrays(Dataset):
    """torchvision.datasets.CIFAR100's __getitem__ over arrays in memory (HWC uint8): CIFAR100 itself
    insists on the original archive's md5, which the shared copy lacks, and would re-read the pickles."""

    def __init__(self, images_hwc, targets, transform):
        self.data, self.targets, self.transform = images_hwc, targets, transform

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        from PIL import Image
        img, target = Image.fromarray(self.data[index]), self.targets[index]
        return self.transform(img), target


def torchvision_recipe():
    import torchvision.transforms as T
    tail = [T.ToTensor(), T.Normalize(data.MEAN, data.STD)]
    return [
        T.Compose([T.ColorJitter(0.2, 0.2), T.RandomHorizontalFlip()] + tail),
        T.Compose([T.ColorJitter(0.4, 0.4), T.RandomResizedCrop(32, scale=(0.3, 1.0), ratio=(0.8, 1.2)),
                   T.RandomHorizontalFlip()] + tail),
        T.Compose([T.RandomResizedCrop(32), T.RandomHorizontalFlip()] + tail),
    ]


def torchvision_loader(images_u8, labels, batch_size, workers, device):
    hwc = images_u8.permute(0, 2, 3, 1).contiguous().numpy()
    targets = labels.tolist()
    dataset = ConcatDataset([CifarArrays(hwc, targets, t) for t in torchvision_recipe()])
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                      pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                      prefetch_factor=PREFETCH if workers > 0 else None)


def endless(loader):
    """Batches forever: a new pass when one ends (a new epoch, for a loader that has one)."""
    for epoch in itertools.count(1):
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        yield from loader


def load_images(a):
    if a.synthetic:
        gen = np.random.default_rng(0)
        images = torch.from_numpy(gen.integers(0, 256, (a.synthetic, 3, 32, 32), dtype=np.uint8))
        return images, torch.arange(a.synthetic) % data.NUM_CLASSES, f"synthetic ({a.synthetic} random images)"
    images, labels = data.load_cifar100(a.data_dir, train=True, download=False)
    images, labels = data.subset(images, labels, a.limit)
    return images, labels, f"CIFAR-100 train from {a.data_dir}" + (f", first {a.limit}" if a.limit else "")


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids=()):
    """CPU time (user + system) of this process and of `pids`, read from /proc."""
    total = time.process_time()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime
        except (OSError, IndexError, ValueError):
            return None
    return total


def worker_pids(loader):
    # DataLoader keeps its persistent iterator's worker processes in private attributes; without
    # them the CPU-time figure is left out, the wall-time one stands.
    workers = getattr(getattr(loader, "_iterator", None), "_workers", None) or []
    return [w.pid for w in workers]


class Tally:
    """Images, wall seconds and CPU seconds of one pipeline, summed over its timed phases."""

    def __init__(self):
        self.images, self.wall, self.cpu = 0, 0.0, 0.0

    def add(self, images, wall, cpu):
        self.images, self.wall = self.images + images, self.wall + wall
        self.cpu = None if cpu is None or self.cpu is None else self.cpu + cpu

    def per_s(self):
        return self.images / self.wall

    def per_cpu_s(self):
        return self.images / self.cpu if self.cpu else None


def timed(batches, seconds, device, to_device=False, pids=()):
    """(images, wall seconds, CPU seconds) of pulling batches for about `seconds`; at least one batch."""
    def work():
        t0, n = time.perf_counter(), 0
        while not n or time.perf_counter() - t0 < seconds:
            x, y = next(batches)
            if to_device:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            n += len(y)
        return n

    c0 = cpu_seconds(pids)
    n, wall = common.timed(device, work)
    c1 = cpu_seconds(pids)
    return n, wall, (c1 - c0 if c0 is not None and c1 is not None else None)


def build_parser():
    p = common.parser(__doc__)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--data_dir", "--data-dir", dest="data_dir", default=cli_args.default_data_dir(),
                   help="folder holding cifar-100-python/ (default: $CIFAR100_DIR or ~/.cache/cifar100)")
    p.add_argument("--limit", type=cli_args.positive_int, default=None,
                   help="use the first N training images only")
    p.add_argument("--synthetic", type=cli_args.positive_int, default=None, metavar="N",
                   help="N random images instead of CIFAR-100 (the speed does not depend on the pixels)")
    p.add_argument("--batch-size", type=cli_args.positive_int, default=512)
    p.add_argument("--workers", type=common.nonneg_int, default=2,
                   help="torchvision DataLoader workers (the original's 2)")
    p.add_argument("--seconds", type=cli_args.positive_float, default=20.0,
                   help="timed seconds in all, shared by the phases")
    p.add_argument("--rounds", type=cli_args.positive_int, default=2, help="alternations of ours and torchvision")
    p.add_argument("--threads", type=common.thread_counts, default=None,
                   help="torch threads for ours, a list on the CPU (default cpu: 1 and torch's default; "
                        "cuda: torch's default)")
    p.add_argument("--json", default=None)
    return p


def main(argv=None):
    a = build_parser().parse_args(argv)
    device = distributed.pick_device(a.device)
    default_threads = torch.get_num_threads()
    threads = a.threads or (sorted({1, default_threads}) if device.type == "cpu" else [default_threads])
    images, labels, source = load_images(a)
    has_fast = augment_cpu.supports(RECIPE, device)
    phase_s = a.seconds / (a.rounds * (len(threads) * (1 + has_fast) + 1))
    say = common.logger("data")
    say(f"{source}; batch {a.batch_size}; {a.rounds} rounds of {phase_s:.1f} s phases; "
        f"ours at threads {threads}" + (", and the reference definition" if has_fast else ""))

    def ours_loader(fast):
        return endless(data.TrainLoader(images, labels, a.batch_size, aug=RECIPE, seed=0, fast=fast,
                                        place=data.Placement(device, memory_format=torch.channels_last)))

    ours_sum, ref_sum, tv_sum = {t: Tally() for t in threads}, {t: Tally() for t in threads}, Tally()
    # Ours, then the reference definition that the fast path equals, each at every thread count.
    pipelines = [("ours", "ours", ours_loader(True), ours_sum)]
    pipelines += [("reference", "reference definition", ours_loader(False), ref_sum)] if has_fast else []
    tv_loader = torchvision_loader(images, labels, a.batch_size, a.workers, device)
    tv = endless(tv_loader)

    def phase(row, key, label, batches, tally, **kw):
        n, wall, cpu = timed(batches, phase_s, device, **kw)
        tally.add(n, wall, cpu)
        row[key], row[f"{key}_per_cpu_s"] = n / wall, (n / cpu if cpu else None)
        say(f"round {row['round']}: {label} {n / wall:,.0f} img/s" + (f", {n / cpu:,.0f} per CPU-s" if cpu else ""))

    with common.torch_threads():
        # Warm-up, untimed: our first batches allocate, theirs start the workers.
        for t in threads:
            torch.set_num_threads(t)
            for _, _, batches, _ in pipelines:
                for _ in range(2):
                    next(batches)
        torch.set_num_threads(default_threads)
        sync(device)
        drain = max(a.workers, 1) * PREFETCH
        for _ in range(drain + 2):
            next(tv)

        pids = worker_pids(tv_loader)
        rounds = []
        for r in range(a.rounds):
            row = {"round": r + 1}
            # Let their workers fill the queue now, so they do not compete with our timed phase.
            if a.workers:
                time.sleep(min(5.0, 0.2 + (drain * a.batch_size / tv_sum.per_s() if tv_sum.wall else 1.0)))
            for key, name, batches, sums in pipelines:
                for t in threads:
                    torch.set_num_threads(t)
                    phase(row, f"{key}_{t}t", f"{name} ({common.thread_label(t)})", batches, sums[t])
            torch.set_num_threads(default_threads)
            for _ in range(drain if a.workers else 0):
                next(tv)  # made while ours ran: not theirs to count
            phase(row, "torchvision", f"torchvision ({a.workers} workers)", tv, tv_sum,
                  to_device=device.type == "cuda", pids=pids)
            rounds.append(row)

    ours_by = {str(t): ours_sum[t].per_s() for t in threads}
    ours_cpu = {str(t): ours_sum[t].per_cpu_s() for t in threads}
    ref_by = {str(t): ref_sum[t].per_s() for t in threads} if has_fast else {}
    best_t = max(threads, key=lambda t: ours_by[str(t)])
    tv_ips, tv_cpu = tv_sum.per_s(), tv_sum.per_cpu_s()
    env = dict(common.environment(device), torch_threads=default_threads)
    doc = {
        "bench": "data", "recipe": RECIPE, "data": source, "images": len(labels), "batch_size": a.batch_size,
        "workers": a.workers, "ours_images_per_s": ours_by[str(best_t)], "ours_threads": best_t,
        "ours_images_per_s_by_threads": ours_by, "torchvision_images_per_s": tv_ips,
        "ratio": ours_by[str(best_t)] / tv_ips, "ratio_by_threads": {k: v / tv_ips for k, v in ours_by.items()},
        # Images per CPU-second: throughput per core actually used, much less hostage to other load.
        "ours_images_per_cpu_s_by_threads": ours_cpu, "torchvision_images_per_cpu_s": tv_cpu,
        "ratio_per_cpu_s_by_threads": {k: (v / tv_cpu if v and tv_cpu else None) for k, v in ours_cpu.items()},
        # The device's fast path against the reference definition it equals, thread for thread.
        "fast_path": "data/augment_cpu.py" if has_fast else None, "reference_images_per_s_by_threads": ref_by,
        "fast_path_gain_by_threads": {k: ours_by[k] / v for k, v in ref_by.items()},
        "fast_path_gain": ours_by[str(best_t)] / ref_by[str(best_t)] if has_fast else None,
        "seconds_per_phase": phase_s, "rounds": rounds, "ours_layout": "channels_last (train.py's default)", **env,
    }
    if a.json:
        common.write_json(a.json, doc)
    print(f"{RECIPE} augmentation, batch {a.batch_size}, {env['device_name']}, {env['cpu_count']} CPUs, "
          f"torch {env['torch']}; {source}")
    print(summary.data_table(doc))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
