"""One on-device meter for training, evaluation and the benchmarks: named sums, read once at the end.

Every update adds to float64 sums that stay on the batch's device, so a step never waits for the
host; `totals()` (optionally all-reduced across ranks) is the only read.
"""
import torch

from . import distributed

FIELDS = ("loss", "correct", "correct5", "agree", "count")


class Meter:
    """Sums of loss x n, top-1 and top-5 hits, agreement with a teacher, and samples seen."""

    def __init__(self, device, sums=None):
        self.device = torch.device(device)
        self.sums = torch.zeros(len(FIELDS), dtype=torch.float64, device=self.device)
        if sums is not None:
            self.load(sums)

    @torch.no_grad()
    def update(self, loss, out, y, teacher_logits=None, top5=False):
        """Add one batch: its mean loss, the model's outputs, the labels, optionally the teacher's
        logits (agreement of the two argmaxes) and top-5 hits (evaluation only: a top-k costs)."""
        n = y.shape[0]
        if top5:
            best = out.float().topk(min(5, out.shape[1]), dim=1).indices
            pred, hit5 = best[:, 0], (best == y[:, None]).any(dim=1).sum()
        else:
            pred, hit5 = out.argmax(1), torch.zeros((), device=out.device, dtype=torch.int64)
        agree = ((teacher_logits.argmax(1) == pred).sum() if teacher_logits is not None
                 else torch.zeros((), device=out.device, dtype=torch.int64))
        self.sums += torch.stack([loss.detach().double() * n, (pred == y).sum().double(), hit5.double(),
                                  agree.double(), torch.full((), n, dtype=torch.float64, device=out.device)])

    def state(self):
        """The sums as a CPU tensor (for a mid-epoch checkpoint)."""
        return self.sums.detach().cpu()

    def load(self, sums):
        """Sums in FIELDS order (older checkpoints are converted on load: checkpoint.upgrade)."""
        self.sums.copy_(torch.as_tensor(sums, dtype=torch.float64))

    def totals(self, reduce=False):
        """The sums as a dict of floats (one host read), summed over ranks when `reduce`."""
        sums = distributed.all_reduce_sum(self.sums.clone()) if reduce else self.sums
        return dict(zip(FIELDS, sums.tolist()))

    def summary(self, reduce=False):
        """Mean loss and percentages: loss, top1, top5, agreement, correct, total."""
        t = self.totals(reduce)
        n = max(t["count"], 1.0)
        return {"loss": t["loss"] / n, "top1": 100.0 * t["correct"] / n, "top5": 100.0 * t["correct5"] / n,
                "agreement": 100.0 * t["agree"] / n, "correct": int(round(t["correct"])),
                "total": int(round(t["count"]))}
