"""Gradual magnitude pruning (Zhu & Gupta 2017, "To prune, or not to prune", arXiv 1710.01878).

The masks live here, beside the model, as one bool tensor per pruned weight (True = kept): the
weights themselves are plain parameters whose pruned entries are exactly zero, so a saved
state_dict keeps the model's own keys and loads into an unpruned model. After every optimizer step
the pruner multiplies the weights, and every optimizer state tensor of a weight's shape (SGD's
momentum buffer, Adam's moments), by the masks, so a pruned weight is exactly zero after each step
and nothing accumulated for it leaks back; weight decay of a zero weight is zero.

Why not torch.nn.utils.prune: it re-parametrises each weight as `weight_orig * weight_mask`
(a forward pre-hook), which renames the state-dict keys (`weight_orig`, `weight_mask`), lets momentum
and weight decay keep moving `weight_orig` at pruned positions (only the product is zero), and costs
a multiply and a weight-sized tensor per layer in every forward. Its amounts are also fractions of
the weights still unpruned, where the schedule below is in absolute sparsity. Mask selection here is
a stable sort of |w|, so the masks are the same on every run and every rank.
"""
import math

import torch

import errors

from . import layers as L

SCOPES = ("global", "layer")


class PruneSchedule:
    """Target sparsity per epoch, the cubic schedule of Zhu & Gupta:

        s(e) = target + (initial - target) * (1 - (e - start_epoch) / (end_epoch - start_epoch))^3

    for start_epoch <= e <= end_epoch; 0 before start_epoch (nothing pruned), `target` after
    end_epoch. s(start_epoch) = initial (0 by default: the first pruning step prunes nothing),
    s(end_epoch) = target; start_epoch == end_epoch prunes to the target at once. Epochs count
    from 1, and a step prunes at the start of its epoch.
    """

    def __init__(self, target, start_epoch, end_epoch, initial=0.0):
        if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 <= target < 1:
            raise errors.ConfigError(f"the target sparsity must be in [0, 1), got {target!r}", setting="prune")
        if not isinstance(initial, (int, float)) or not 0 <= initial <= target:
            raise errors.ConfigError(f"the initial sparsity must be in [0, target {target}], got {initial!r}",
                                     setting="prune_schedule")
        for v in (start_epoch, end_epoch):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise errors.ConfigError(f"pruning epochs must be whole numbers from 1, got {v!r}",
                                         setting="prune_schedule")
        if end_epoch < start_epoch:
            raise errors.ConfigError(f"the pruning span ends (epoch {end_epoch}) before it starts "
                                     f"(epoch {start_epoch})", setting="prune_schedule")
        self.target, self.initial = float(target), float(initial)
        self.start_epoch, self.end_epoch = start_epoch, end_epoch

    def sparsity_at(self, epoch):
        if epoch < self.start_epoch:
            return 0.0
        if epoch >= self.end_epoch:
            return self.target
        frac = (epoch - self.start_epoch) / (self.end_epoch - self.start_epoch)
        return self.target + (self.initial - self.target) * (1.0 - frac) ** 3

    def state_dict(self):
        return {"target": self.target, "initial": self.initial, "start_epoch": self.start_epoch,
                "end_epoch": self.end_epoch}

    @classmethod
    def from_state(cls, d):
        return cls(d["target"], d["start_epoch"], d["end_epoch"], d.get("initial", 0.0))

    def __repr__(self):
        return (f"PruneSchedule(target={self.target}, start_epoch={self.start_epoch}, "
                f"end_epoch={self.end_epoch}, initial={self.initial})")


def _count(fraction, n):
    # Round half up, identically everywhere (Python's round() would round half to even).
    return min(n, int(math.floor(fraction * n + 0.5)))


class Pruner:
    """Magnitude masks for the conv, linear and cosine weights of `model`, on `schedule`.

    scope "global": one threshold over all pruned weights together (layers end at different
    sparsities); "layer": every layer pruned to the scheduled sparsity. `exclude`: bare layer names
    left dense. Masks only ever grow: a pruned weight stays pruned.

        pruner = Pruner(model, PruneSchedule(0.5, 1, 30), scope="global")
        pruner.attach(optimizer)          # masks applied after every optimizer.step()
        for epoch in ...: pruner.step(epoch); train the epoch
    """

    def __init__(self, model, schedule, scope="global", exclude=()):
        if scope not in SCOPES:
            raise errors.ConfigError(f"the pruning scope must be one of {', '.join(SCOPES)}, got {scope!r}",
                                     setting="prune_scope")
        layers = L.compressible(model)
        unknown = sorted(set(exclude) - set(layers))
        if unknown:
            raise errors.ConfigError(f"cannot leave {unknown[0]} dense: the model has no conv, linear or "
                                     "cosine layer of that name", setting="prune")
        self.schedule, self.scope = schedule, scope
        self.params = {n: L.weight_of(m) for n, m in layers.items() if n not in exclude}
        if not self.params:
            raise errors.ConfigError("the model has no weights to prune", setting="prune")
        self.masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in self.params.items()}
        self._keep = None  # float copies of the masks, for the multiplies after each step
        self.last_epoch = None
        self.optimizer = None
        self._handle = None

    # ------------------------------------------------------------------ the schedule

    def step(self, epoch):
        """At the start of `epoch`: prune to the schedule's sparsity by magnitude, zero what is newly
        pruned (weights and optimizer state). Once per epoch: a second call for the same or an earlier
        epoch (a resumed run) changes nothing. Returns the scheduled sparsity."""
        target = self.schedule.sparsity_at(epoch)
        if self.last_epoch is not None and epoch <= self.last_epoch:
            return target
        with torch.no_grad():
            if self.scope == "global":
                self._prune_global(target)
            else:
                for name in self.params:
                    self._prune_layer(name, target)
        self.last_epoch = epoch
        self._keep = None
        self.apply()
        return target

    @staticmethod
    def _scores(p, mask):
        # Already pruned weights sort first, so that masks only grow.
        return torch.where(mask, p.detach().abs().float(), torch.full_like(p, -1.0, dtype=torch.float32))

    def _prune_layer(self, name, target):
        p, mask = self.params[name], self.masks[name]
        k = max(_count(target, p.numel()), int((~mask).sum()))
        if k == 0:
            return
        order = torch.argsort(self._scores(p, mask).reshape(-1), stable=True)
        flat = torch.ones(p.numel(), dtype=torch.bool, device=p.device)
        flat[order[:k]] = False
        self.masks[name] = flat.reshape(p.shape)

    def _prune_global(self, target):
        names = list(self.params)
        sizes = [self.params[n].numel() for n in names]
        total = sum(sizes)
        k = max(_count(target, total), sum(int((~m).sum()) for m in self.masks.values()))
        if k == 0:
            return
        device = self.params[names[0]].device
        scores = torch.cat([self._scores(self.params[n], self.masks[n]).reshape(-1).to(device) for n in names])
        order = torch.argsort(scores, stable=True)
        flat = torch.ones(total, dtype=torch.bool, device=device)
        flat[order[:k]] = False
        for n, part in zip(names, torch.split(flat, sizes)):
            self.masks[n] = part.reshape(self.params[n].shape).to(self.params[n].device)

    # ------------------------------------------------------------- keeping zeros zero

    def attach(self, optimizer):
        """Apply the masks after every `optimizer.step()` (a step post-hook), to the weights and to
        the optimizer's state; also used by step() for newly pruned weights. Returns self."""
        self.detach()
        self.optimizer = optimizer
        self._handle = optimizer.register_step_post_hook(lambda opt, args, kwargs: self.apply())
        return self

    def detach(self):
        if self._handle is not None:
            self._handle.remove()
        self._handle, self.optimizer = None, None

    @torch.no_grad()
    def apply(self):
        """Zero the pruned weights, and the optimizer state kept for them (momentum, moments)."""
        if self._keep is None:
            self._keep = {n: m.to(dtype=self.params[n].dtype) for n, m in self.masks.items()
                          if not bool(m.all())}
        if not self._keep:
            return
        tensors, keeps = [], []
        for n, keep in self._keep.items():
            p = self.params[n]
            tensors.append(p)
            keeps.append(keep)
            state = self.optimizer.state.get(p, {}) if self.optimizer is not None else {}
            for v in state.values():
                if isinstance(v, torch.Tensor) and v.shape == p.shape and v.is_floating_point():
                    tensors.append(v)
                    keeps.append(keep if v.dtype == keep.dtype else keep.to(v.dtype))
        torch._foreach_mul_(tensors, keeps)

    # -------------------------------------------------------------------- measures

    def counts(self):
        """{name: (pruned, numel)} per pruned weight."""
        return {n: (int((~m).sum()), m.numel()) for n, m in self.masks.items()}

    def sparsity(self):
        """Measured: the fraction of the prunable weights that are pruned."""
        c = self.counts().values()
        return sum(p for p, _ in c) / sum(n for _, n in c)

    def layer_sparsity(self):
        return {n: p / t for n, (p, t) in self.counts().items()}

    def at_target(self):
        """True once the masks hold the schedule's final sparsity (the epochs a best checkpoint may be
        chosen from)."""
        c = self.counts()
        if self.scope == "global":
            return sum(p for p, _ in c.values()) >= _count(self.schedule.target, sum(n for _, n in c.values()))
        return all(p >= _count(self.schedule.target, n) for p, n in c.values())

    def describe(self):
        """Plain values for logs and the compression record."""
        return {**self.schedule.state_dict(), "scope": self.scope, "sparsity": self.sparsity(),
                "last_epoch": self.last_epoch, "layers": len(self.params)}

    # ----------------------------------------------------------------- saving, resuming

    def state_dict(self):
        """Everything a resumed run needs: masks (bool, on the CPU), the schedule, the last epoch."""
        return {"scope": self.scope, "schedule": self.schedule.state_dict(), "last_epoch": self.last_epoch,
                "masks": {n: m.detach().cpu().clone() for n, m in self.masks.items()}}

    def load_state_dict(self, state, source="the pruning state"):
        """Restore masks, schedule and position (CheckpointError, one line, for masks that do not fit),
        then zero the pruned weights and optimizer state. The saved schedule replaces the one given
        at construction: a run continues on the schedule it started with."""
        masks = state.get("masks") if isinstance(state, dict) else None
        if not isinstance(masks, dict):
            raise errors.CheckpointError(f"{source} holds no masks")
        missing = sorted(set(self.params) - set(masks))
        extra = sorted(set(masks) - set(self.params))
        if missing or extra:
            raise errors.CheckpointError(f"{source} has masks for other layers than this model's "
                                         f"({len(missing)} missing, {len(extra)} unexpected, e.g. "
                                         f"{(missing or extra)[0]})")
        for n, m in masks.items():
            check_mask(m, self.params[n], n, source)
        if state.get("scope", self.scope) != self.scope:
            raise errors.CheckpointError(f"{source} was pruned with scope {state['scope']}, not {self.scope}")
        self.masks = {n: m.to(device=self.params[n].device, dtype=torch.bool).clone() for n, m in masks.items()}
        if state.get("schedule"):
            self.schedule = PruneSchedule.from_state(state["schedule"])
        self.last_epoch = state.get("last_epoch")
        self._keep = None
        self.apply()


def check_mask(mask, weight, name, source):
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise errors.CheckpointError(f"{source}: the mask of {name} is not a bool tensor")
    if tuple(mask.shape) != tuple(weight.shape):
        raise errors.CheckpointError(f"{source}: the mask of {name} has shape {tuple(mask.shape)}, its weight "
                                     f"{tuple(weight.shape)}")
