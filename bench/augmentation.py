#!/usr/bin/env python
"""Images/s of our batched augmentation against torchvision's transforms of the same recipe.

    python bench/augmentation.py --device cuda --data_dir D --json OUT.json
    python bench/augmentation.py --device cpu --data_dir D --seconds 60 --json OUT.json

ours:        data.TrainLoader with the `uci` recipe, iterated as train.py does: uint8 images on the
             device, each batch gathered, jittered, crop-resized, flipped and normalised there, in
             train.py's default channels_last layout, ready for the model. Where the device has a
             fast path (the CPU: data/augment_cpu.py), the same loader with fast=False, the
             reference definition of data/augment.py, is timed too, at each --threads count, and
             the fast path's gain reported.
torchvision: what the original did: a DataLoader (shuffle, --workers worker processes) over a
             ConcatDataset of three CIFAR-style datasets of PIL images, one per recipe copy:
               1. ColorJitter(0.2, 0.2) + RandomHorizontalFlip
               2. ColorJitter(0.4, 0.4) + RandomResizedCrop(32, (0.3, 1), (0.8, 1.2)) + flip
               3. RandomResizedCrop(32) + flip
             each then ToTensor + Normalize(MEAN, STD). On CUDA each batch is also copied to the GPU
             (pinned, non-blocking), since ours is already there.

Both run in one process, in alternating timed phases (--rounds of each), so a shared machine's
load changes hit both alike. Besides images per second of wall time, each side's images per
CPU-second are reported (ours: this process's CPU time; theirs: the workers' plus this process's),
which a busy machine distorts far less: under contention the scheduler gives torchvision's three
processes a larger share of the cores than our one, and wall time rewards that. (On CUDA our CPU
time is mostly the host waiting in synchronize, so there the wall-time figure is the one to read.) The torchvision workers are let fill their prefetch queue before each
phase of ours and that queue is drained before each timed phase of theirs, so neither side is timed
on work done during the other's phase. On the CPU, ours is timed at each --threads count.
"""
import argparse
import os
import sys
import time

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset

import data as D
from bench import common
from cli.args import default_data_dir
from data import augment_cpu

RECIPE = "uci"
PREFETCH = 2  # DataLoader's default prefetch_factor, named so the drain below can count on it


class CifarArrays(Dataset):
    """torchvision.datasets.CIFAR100's __getitem__ over arrays already in memory (HWC uint8).

    CIFAR100 itself cannot be used: it insists on the original archive's md5, which the shared copy
    does not have, and it would re-read the pickles.
    """

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
    tail = [T.ToTensor(), T.Normalize(D.MEAN, D.STD)]
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


def endless(make_iter):
    """Batches forever, starting a new pass when one ends (and reporting each new pass to make_iter)."""
    epoch = 1
    while True:
        for batch in make_iter(epoch):
            yield batch
        epoch += 1


def load_images(a):
    if a.synthetic:
        gen = np.random.default_rng(0)
        images = torch.from_numpy(gen.integers(0, 256, (a.synthetic, 3, 32, 32), dtype=np.uint8))
        return images, torch.arange(a.synthetic) % D.NUM_CLASSES, f"synthetic ({a.synthetic} random images)"
    images, labels = D.load_cifar100(a.data_dir, train=True, download=False)
    images, labels = D.subset(images, labels, a.limit)
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


def timed(batches, seconds, device, to_device=False, pids=()):
    """(images, wall seconds, CPU seconds) of pulling batches for about `seconds`; at least one batch."""
    common.sync(device)
    c0 = cpu_seconds(pids)
    t0 = time.perf_counter()
    n = 0
    while True:
        x, y = next(batches)
        if to_device:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        n += len(y)
        if time.perf_counter() - t0 >= seconds:
            break
    common.sync(device)
    wall = time.perf_counter() - t0
    c1 = cpu_seconds(pids)
    return n, wall, (c1 - c0 if c0 is not None and c1 is not None else None)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--data_dir", "--data-dir", dest="data_dir", default=default_data_dir(),
                   help="folder holding cifar-100-python/ (default: $CIFAR100_DIR or ~/.cache/cifar100)")
    p.add_argument("--limit", type=int, default=None, help="use the first N training images only")
    p.add_argument("--synthetic", type=int, default=None, metavar="N",
                   help="N random images instead of CIFAR-100 (the speed does not depend on the pixels)")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--workers", type=int, default=2, help="torchvision DataLoader workers (the original's 2)")
    p.add_argument("--seconds", type=float, default=20.0, help="timed seconds in all, shared by the phases")
    p.add_argument("--rounds", type=int, default=2, help="alternations of ours and torchvision")
    p.add_argument("--threads", default=None,
                   help="torch threads for ours, a list on the CPU (default cpu: 1 and torch's default; "
                        "cuda: torch's default)")
    p.add_argument("--json", default=None)
    return p


def main(argv=None):
    a = build_parser().parse_args(argv)
    device = common.pick_device(a.device)
    default_threads = torch.get_num_threads()
    if a.threads:
        threads = [int(t) for t in a.threads.split(",") if t]
    else:
        threads = sorted({1, default_threads}) if device.type == "cpu" else [default_threads]
    if a.batch_size < 1 or a.rounds < 1 or a.seconds <= 0 or any(t < 1 for t in threads):
        raise SystemExit("error: --batch-size, --rounds, --threads must be >= 1 and --seconds > 0")
    images, labels, source = load_images(a)
    has_fast = augment_cpu.supports(RECIPE, device)
    phases = len(threads) * (1 + has_fast) + 1
    phase_s = a.seconds / (a.rounds * phases)
    say = lambda *m: print("[data]", *m, file=sys.stderr, flush=True)
    say(f"{source}; batch {a.batch_size}; {a.rounds} rounds of {phase_s:.1f} s phases; "
        f"ours at threads {threads}" + (", and the reference definition" if has_fast else ""))

    def endless_loader(fast):
        loader = D.TrainLoader(images, labels, a.batch_size, aug=RECIPE, seed=0,
                               place=D.Placement(device, memory_format=torch.channels_last), fast=fast)

        def epoch_iter(epoch):
            loader.set_epoch(epoch)
            return iter(loader)

        return endless(epoch_iter)

    ours = endless_loader(fast=True)
    reference = endless_loader(fast=False) if has_fast else None
    tv_loader = torchvision_loader(images, labels, a.batch_size, a.workers, device)
    tv = endless(lambda epoch: iter(tv_loader))

    # Warm-up, untimed: our first batches allocate, theirs start the workers.
    for t in threads:
        torch.set_num_threads(t)
        for _ in range(2):
            next(ours)
    for t in threads if has_fast else ():
        torch.set_num_threads(t)
        next(reference)
    torch.set_num_threads(default_threads)
    common.sync(device)
    drain = max(a.workers, 1) * PREFETCH
    for _ in range(drain + 2):
        next(tv)

    pids = worker_pids(tv_loader)
    ours_sum = {t: [0, 0.0, 0.0] for t in threads}
    tv_sum = [0, 0.0, 0.0]
    ref_sum = {t: [0, 0.0, 0.0] for t in threads}
    rounds = []
    tv_rate = None
    for r in range(a.rounds):
        row = {"round": r + 1}
        # Let their workers fill the queue now, so they do not compete with our timed phase.
        if a.workers:
            time.sleep(min(5.0, 0.2 + (drain * a.batch_size / tv_rate if tv_rate else 1.0)))
        for t in threads:
            torch.set_num_threads(t)
            n, s, c = timed(ours, phase_s, device)
            _add(ours_sum[t], n, s, c)
            row[f"ours_{t}t"] = n / s
            row[f"ours_{t}t_per_cpu_s"] = n / c if c else None
            say(f"round {r + 1}: ours ({t} thread{'s' if t > 1 else ''}) {n / s:,.0f} img/s"
                + (f", {n / c:,.0f} per CPU-s" if c else ""))
        for t in threads if has_fast else ():
            torch.set_num_threads(t)
            n, s, c = timed(reference, phase_s, device)
            _add(ref_sum[t], n, s, c)
            row[f"reference_{t}t"] = n / s
            say(f"round {r + 1}: reference definition ({t} thread{'s' if t > 1 else ''}) {n / s:,.0f} img/s")
        torch.set_num_threads(default_threads)
        for _ in range(drain if a.workers else 0):
            next(tv)  # made while ours ran: not theirs to count
        n, s, c = timed(tv, phase_s, device, to_device=device.type == "cuda", pids=pids)
        tv_rate = n / s
        _add(tv_sum, n, s, c)
        row["torchvision"] = n / s
        row["torchvision_per_cpu_s"] = n / c if c else None
        say(f"round {r + 1}: torchvision ({a.workers} workers) {n / s:,.0f} img/s"
            + (f", {n / c:,.0f} per CPU-s" if c else ""))
        rounds.append(row)

    ours_by = {str(t): ours_sum[t][0] / ours_sum[t][1] for t in threads}
    ours_cpu = {str(t): _per_cpu(ours_sum[t]) for t in threads}
    best_t = max(threads, key=lambda t: ours_by[str(t)])
    tv_ips = tv_sum[0] / tv_sum[1]
    tv_cpu = _per_cpu(tv_sum)
    env = common.environment(device)
    env["torch_threads"] = default_threads
    ref_by = {str(t): ref_sum[t][0] / ref_sum[t][1] for t in threads} if has_fast else {}
    doc = {
        "bench": "data",
        "recipe": RECIPE,
        "data": source,
        "images": len(labels),
        "batch_size": a.batch_size,
        "workers": a.workers,
        "ours_images_per_s": ours_by[str(best_t)],
        "ours_threads": best_t,
        "ours_images_per_s_by_threads": ours_by,
        "torchvision_images_per_s": tv_ips,
        "ratio": ours_by[str(best_t)] / tv_ips,
        "ratio_by_threads": {k: v / tv_ips for k, v in ours_by.items()},
        # Images per CPU-second: throughput per core actually used, much less hostage to other load.
        "ours_images_per_cpu_s_by_threads": ours_cpu,
        "torchvision_images_per_cpu_s": tv_cpu,
        "ratio_per_cpu_s_by_threads": {k: (v / tv_cpu if v and tv_cpu else None) for k, v in ours_cpu.items()},
        # The device's fast path against the reference definition it equals, thread for thread.
        "fast_path": "data/augment_cpu.py" if has_fast else None,
        "reference_images_per_s_by_threads": ref_by,
        "fast_path_gain_by_threads": {k: ours_by[k] / v for k, v in ref_by.items()},
        "fast_path_gain": ours_by[str(best_t)] / ref_by[str(best_t)] if has_fast else None,
        "seconds_per_phase": phase_s,
        "rounds": rounds,
        "ours_layout": "channels_last (train.py's default)",
        **env,
    }
    if a.json:
        common.write_json(a.json, doc)
    cpu_ratio = doc["ratio_per_cpu_s_by_threads"]
    rows = [[f"ours, {t} thread{'s' if t > 1 else ''}", common.fmt(ours_by[str(t)]),
             common.fmt(ours_by[str(t)] / tv_ips, 1), common.fmt(ours_cpu[str(t)]),
             common.fmt(cpu_ratio[str(t)], 1)] for t in threads]
    rows += [[f"reference definition, {t} thread{'s' if t > 1 else ''}", common.fmt(ref_by[str(t)]),
              common.fmt(ref_by[str(t)] / tv_ips, 1), "-", "-"] for t in threads if has_fast]
    rows.append([f"torchvision, {a.workers} workers", common.fmt(tv_ips), "1.0", common.fmt(tv_cpu),
                 "1.0" if tv_cpu else "-"])
    print(f"{RECIPE} augmentation, batch {a.batch_size}, {env['device_name']}, {env['cpu_count']} CPUs, "
          f"torch {env['torch']}; {source}")
    print(common.markdown_table(["pipeline", "images/s", "x torchvision", "images/CPU-s", "x torchvision"],
                                rows))
    return 0


def _add(acc, n, wall, cpu):
    acc[0] += n
    acc[1] += wall
    acc[2] = None if cpu is None or acc[2] is None else acc[2] + cpu


def _per_cpu(acc):
    return acc[0] / acc[2] if acc[2] else None


if __name__ == "__main__":
    sys.exit(main())
