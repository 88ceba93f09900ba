"""Evaluation on hard labels: loss, top-1, top-5, correct count, and teacher agreement."""
import torch

from .distributed import all_reduce_sum


@torch.inference_mode()
def evaluate(model, loader, criterion, autocast, teacher=None, tta=False, keep_mode=False):
    """Sums over this rank's shard, all-reduced, so every test image counts once across ranks.

    Nothing is read back to the host until the end: the sums stay on the device. keep_mode leaves
    the module's train/eval state alone (a teacher whose BatchNorm deliberately runs in train mode).
    """
    was_training = model.training
    if not keep_mode:
        model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=loader.device)
    count = 0
    for x, y in loader:
        with autocast:
            out = model(x)
            if tta:
                out = (out + model(x.flip(-1))) / 2
            loss = criterion(out, y)
            t_out = teacher(x) if teacher is not None else None
        top5 = out.float().topk(min(5, out.shape[1]), dim=1).indices
        agree = (t_out.float().argmax(1) == top5[:, 0]).sum() if t_out is not None else torch.zeros(
            (), device=sums.device)
        sums += torch.stack([loss.double() * len(y), (top5[:, 0] == y).sum().double(),
                             (top5 == y[:, None]).any(dim=1).sum().double(), agree.double()])
        count += len(y)
    totals = torch.cat([sums, torch.tensor([float(count)], dtype=torch.float64).to(sums.device)])
    loss_sum, c1, c5, agree, n = all_reduce_sum(totals).tolist()
    if not keep_mode:
        model.train(was_training)
    n = max(n, 1.0)
    result = {"loss": loss_sum / n, "top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n,
              "correct": int(round(c1)), "total": int(round(n))}
    if teacher is not None:
        result["agreement"] = 100.0 * agree / n
    return result
