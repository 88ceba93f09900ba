#!/usr/bin/env python
"""Train one stage on CIFAR-100: hard labels, or refined by a frozen teacher (label refinery).

    python train.py --model efficientnet_ex --data_dir D
    python train.py --model efficientnet_b0 --label-refinery-model efficientnet_b3 \
        --label-refinery-state-file RUN/model_best.pytar
    torchrun --standalone --nproc_per_node 2 train.py ...      # one process per GPU (or CPU)

A run folder under --save holds args.json, log.txt, metrics.csv, curves.png, model_state_XX.pytar
(the original entry's format), model_best.pytar and last.pytar (everything needed to resume).
The flags are in cli/train_flags.py, the training loop in engine/trainer.py.
"""
import sys

from micronet_cifar100.cli.errors import run_main
from micronet_cifar100.cli.train_flags import parse_config
from engine.trainer import train


def main(argv=None):
    cfg = parse_config(argv)          # every flag checked: a bad one exits 2 before anything runs
    result = train(cfg)               # Trainer(cfg, ctx).fit(), in a process group under torchrun
    return result["exit_code"]        # 0, or the signal's code when stopped (the log says how to resume)


if __name__ == "__main__":
    sys.exit(run_main(main))
