#!/usr/bin/env python
"""Make CIFAR-100 available under DEST/cifar-100-python for gpu.sh, where the shared unpack.sh is not.

    python bench/prepare_data.py DEST [--parts-dir DIR] [--synthetic-fallback]

In order: DEST already holds a readable copy -> nothing to do; DIR holds the shared copy's parts
(cifar-100-python.tar.xz.part0, part1, ...) -> check them against DIR/SHA256SUMS when it is there,
join them, and unpack with lzma + tarfile, as shared/data/cifar100/unpack.sh does; otherwise, with
--synthetic-fallback, random images of the right shapes (50,000 / 10,000, every class present), which
serve every speed measurement but make any accuracy meaningless. Prints one JSON line:
{"data_dir": DEST, "source": "existing" | "parts" | "synthetic"}; exit 1 if no data could be made.
"""
import argparse
import hashlib
import io
import json
import lzma
import os
import pickle
import re
import sys
import tarfile

# `python bench/NAME.py` puts bench/ on sys.path, not the root that holds the project's packages.
if not __package__:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

import data
from micronet_cifar100 import errors
from micronet_cifar100.cli.errors import run_main
from data.cifar import FOLDER

SPLITS = {"train": data.TRAIN_IMAGES, "test": data.TEST_IMAGES}


def readable(dest):
    """True when DEST holds both splits that data.load_cifar100 accepts."""
    try:
        data.load_cifar100(dest, train=True, download=False)
        data.load_cifar100(dest, train=False, download=False)
        return True
    except errors.ToolkitError:
        return False


def find_parts(parts_dir):
    if not parts_dir or not os.path.isdir(parts_dir):
        return []
    parts = [p for p in os.listdir(parts_dir) if re.search(r"\.part\d+$", p)]
    # part10 must come after part9: sort on the number, not the text.
    return [os.path.join(parts_dir, p) for p in sorted(parts, key=lambda p: int(p.rsplit("part", 1)[1]))]


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def unpack_parts(parts, dest):
    sums_path = os.path.join(os.path.dirname(parts[0]), "SHA256SUMS")
    if os.path.exists(sums_path):
        with open(sums_path) as f:
            want = dict(line.split()[::-1] for line in f if line.strip())
        for p in parts:
            name = os.path.basename(p)
            if name in want and _sha256(p) != want[name]:
                raise errors.DataError(f"{p}: checksum mismatch; the copy of the parts is damaged")
    blob = b"".join(open(p, "rb").read() for p in parts)
    os.makedirs(dest, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(lzma.decompress(blob))) as tar:
        # filter="data" refuses absolute paths and links out of DEST (Python >= 3.12, and 3.8+ patches).
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")
        else:
            tar.extractall(dest)


def write_synthetic(dest, seed=0, sizes=SPLITS):
    folder = os.path.join(dest, FOLDER)
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in sizes.items():
        obj = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
               "fine_labels": [i % 100 for i in range(n)], "coarse_labels": [i % 20 for i in range(n)],
               "batch_label": f"synthetic {split}"}
        with open(os.path.join(folder, split), "wb") as f:
            pickle.dump(obj, f, protocol=4)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dest")
    p.add_argument("--parts-dir", default=None)
    p.add_argument("--synthetic-fallback", action="store_true")
    a = p.parse_args(argv)
    if readable(a.dest):
        source = "existing"
    elif find_parts(a.parts_dir):
        unpack_parts(find_parts(a.parts_dir), a.dest)
        if not readable(a.dest):
            raise errors.DataError(f"the parts in {a.parts_dir} did not unpack to a readable CIFAR-100")
        source = "parts"
    elif a.synthetic_fallback:
        write_synthetic(a.dest)
        source = "synthetic"
    else:
        raise errors.DataError(f"no CIFAR-100 in {a.dest} and no *.partN files in {a.parts_dir}; "
                               "add --synthetic-fallback for random images")
    print(json.dumps({"data_dir": os.path.abspath(a.dest), "source": source}))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
