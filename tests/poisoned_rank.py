"""train.py with one rank's loss made non-finite at one step, for torchrun:
`torchrun ... tests/poisoned_rank.py TRAIN_ARGS...`.

Environment: POISON_RANK (the rank whose loss turns to +inf) and POISON_STEP (1-based count of that
rank's training steps). Only used by tests/test_faults.py.
"""
import os
import sys

from bench.common import load_script

train = load_script("train")  # the repository's train.py, loaded by path


class PoisonedLabels(train.HardLabels):
    steps = 0

    def __call__(self, out, x, y):
        loss, teacher = super().__call__(out, x, y)
        PoisonedLabels.steps += 1
        if (int(os.environ.get("RANK", "0")) == int(os.environ["POISON_RANK"])
                and PoisonedLabels.steps == int(os.environ["POISON_STEP"])):
            loss = loss + float("inf")
        return loss, teacher


if __name__ == "__main__":
    train.HardLabels = PoisonedLabels
    sys.exit(train.run_main(train.main))
