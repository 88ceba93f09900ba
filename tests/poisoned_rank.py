"""train.py with one rank's loss made non-finite at one step, for torchrun:
`torchrun ... tests/poisoned_rank.py TRAIN_ARGS...`.

Environment: POISON_RANK (the rank whose loss turns to +inf) and POISON_STEP (1-based count of that
rank's training steps). Only used by tests/test_faults.py.
"""
import os
import sys

from micronet_cifar100.cli.errors import run_main
from micronet_cifar100.cli.train_flags import parse_config
from engine import trainer


class PoisonedLabels(trainer.HardLabels):
    steps = 0

    def __call__(self, out, x, y):
        loss, teacher = super().__call__(out, x, y)
        PoisonedLabels.steps += 1
        if (int(os.environ.get("RANK", "0")) == int(os.environ["POISON_RANK"])
                and PoisonedLabels.steps == int(os.environ["POISON_STEP"])):
            loss = loss + float("inf")
        return loss, teacher


if __name__ == "__main__":
    trainer.HardLabels = PoisonedLabels
    sys.exit(run_main(lambda argv: trainer.train(parse_config(argv))["exit_code"], sys.argv[1:]))
