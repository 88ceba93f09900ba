"""Where a run stands: its position, best epoch and history, as one object that last.pytar stores."""
import math
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class RunState:
    next_epoch: int = 1
    next_step: int = 0
    # The best epoch so far: {"epoch", "top1", "top5", "correct", "total"}.
    best: Optional[dict] = None
    # One row per finished epoch (what metrics.csv holds).
    history: list = field(default_factory=list)
    # Mid-epoch position: {"sums": meter sums, "seconds": time spent, "rng": per-rank RNG states}.
    partial: Optional[dict] = None
    # Ranks that wrote the state: steps and RNG streams are per rank.
    world_size: int = 1
    finished: bool = False

    def add_epoch(self, row, test, eligible=True):
        """Add an epoch's row; returns whether its test top-1 is the best so far among the eligible
        epochs (a pruned run's: those at the target sparsity). An epoch whose test loss is not
        finite is never the best: its weights compute NaN somewhere."""
        self.history.append(row)
        eligible = eligible and math.isfinite(test["loss"])
        is_best = eligible and (self.best is None or test["top1"] > self.best["top1"])
        if is_best:
            self.best = {"epoch": row["epoch"], "top1": test["top1"], "top5": test["top5"],
                         "correct": test["correct"], "total": test["total"]}
        return is_best

    def to_dict(self):
        """The `train` section of last.pytar (with the history kept beside it, as before)."""
        return {"next_epoch": self.next_epoch, "next_step": self.next_step, "best": self.best,
                "partial": self.partial, "world_size": self.world_size}

    @classmethod
    def from_checkpoint(cls, saved):
        t = saved["train"]
        return cls(next_epoch=t["next_epoch"], next_step=t["next_step"], best=t["best"],
                   history=list(saved.get("history", [])), partial=t.get("partial"),
                   world_size=t.get("world_size", 1), finished=bool(saved.get("finished")))
