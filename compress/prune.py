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
a stable sort of the scores, so the masks are the same on every run and every rank.

No layer collapses: whatever the scope, a layer is pruned to at most MAX_SPARSITY (a Pruner
argument) and every output unit keeps KEEP_PER_UNIT weight; `exclude` leaves layers dense by name or
group (resolve_exclude), DEFAULT_EXCLUDE being what a run leaves dense by default.
"""
import math

import torch

from micronet_cifar100 import errors

from . import layers as L

# "global": one threshold on |w| over every pruned weight. "global-bn": one threshold on the
# magnitude of the effective weight |w_c * gamma_c / sqrt(var_c + eps)|, with the BatchNorm that
# follows the layer: BatchNorm undoes any per-channel rescaling of the conv's weights (weight decay's
# or the optimiser's), so the effective weight, not w, is what the layer contributes.
# "global-lamp": one threshold on LAMP scores of the effective weights (Lee et al. 2021, "Layer-
# adaptive sparsity for the magnitude-based pruning", arXiv 2010.07611): w_u^2 / sum_{|w_v| >= |w_u|}
# w_v^2 within the layer, which no per-layer rescaling changes either. "layer": every layer to the
# scheduled sparsity by its own |w|.
SCOPES = ("global", "global-bn", "global-lamp", "layer")
# The scopes that read BatchNorm statistics, which differ between ranks until DDP broadcasts them
# again: their masks are taken from rank 0.
BN_SCOPES = ("global-bn", "global-lamp")
# No layer is pruned past this share of its weights, whatever the scope. A global threshold otherwise
# empties the small-magnitude layers first (on efficientnet_ex at random init, 50% global empties a
# whole layer and 6,132 output channels; 70% also every weight of the head's linear). Past 95% a
# layer saves little more: under the MicroNet rules a sparse tensor still pays a 1-bit mask per
# entry, so an 8-bit layer at 95% already costs 1.4 bits an entry against 1.0 at 100%.
MAX_SPARSITY = 0.95
# Every output unit (conv filter, linear row, cosine class) keeps at least this many weights: a unit
# without weights outputs a constant, a channel lost for every later layer.
KEEP_PER_UNIT = 1
# What a run leaves dense unless told otherwise (the run's --prune-exclude default; the Pruner's own
# default is to prune every layer). The stem conv is tiny (0.02% of efficientnet_ex's weights) and
# every later layer sees the image through it: pruning it saves next to nothing for what it risks, so
# it stays dense, as in Distiller and
# Gale et al. 2019 ("The state of sparsity in deep neural networks"). The head's magnitudes do not
# compare with the convs': classifier.0's output and the cosine kernel's columns are L2-normalised in
# the forward pass, so their scale is arbitrary and a global threshold prunes them by accident
# (all of classifier.0 at 70% global).
DEFAULT_EXCLUDE = ("stem", "head")


def resolve_exclude(model, exclude):
    """The bare names of the layers `exclude` leaves dense, in module order. Each entry is a group
    (layers.GROUPS: "stem", "head", "conv", "linear", "cosine", "depthwise", "pointwise", "se"), a
    layer's name, or the name of a module whose conv, linear and cosine layers are all meant;
    ConfigError (setting "prune_exclude") naming the first entry that is none of these."""
    if isinstance(exclude, str):
        exclude = (exclude,)
    layers = L.compressible(model)
    groups = L.layer_groups(model)
    chosen = set()
    for entry in exclude:
        if not isinstance(entry, str):
            raise errors.ConfigError(f"layers to leave dense are named by strings, got {entry!r}",
                                     setting="prune_exclude")
        if entry in groups:
            chosen.update(groups[entry])
            continue
        inside = [n for n in layers if n == entry or n.startswith(entry + ".")]
        if not inside:
            raise errors.ConfigError(f"cannot leave {entry} dense: the model has no conv, linear or cosine layer "
                                     f"of that name or inside a module of that name, and it is not a group "
                                     f"({', '.join(L.GROUPS)})", setting="prune_exclude")
        chosen.update(inside)
    return [n for n in layers if n in chosen]


class PruneSchedule:
    """Target sparsity per epoch, the cubic schedule of Zhu & Gupta (from an initial sparsity of 0):

        s(e) = target * (1 - (1 - (e - start_epoch) / (end_epoch - start_epoch))^3)

    for start_epoch <= e <= end_epoch; 0 before start_epoch (nothing pruned), `target` after
    end_epoch. s(start_epoch) = 0 (the first pruning step prunes nothing), s(end_epoch) = target;
    start_epoch == end_epoch prunes to the target at once. Epochs count from 1, and a step prunes at
    the start of its epoch.
    """

    def __init__(self, target, start_epoch, end_epoch):
        if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 <= target < 1:
            raise errors.ConfigError(f"the target sparsity must be in [0, 1), got {target!r}", setting="prune")
        for v in (start_epoch, end_epoch):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise errors.ConfigError(f"pruning epochs must be whole numbers from 1, got {v!r}",
                                         setting="prune_schedule")
        if end_epoch < start_epoch:
            raise errors.ConfigError(f"the pruning span ends (epoch {end_epoch}) before it starts "
                                     f"(epoch {start_epoch})", setting="prune_schedule")
        self.target = float(target)
        self.start_epoch, self.end_epoch = start_epoch, end_epoch

    def sparsity_at(self, epoch):
        if epoch < self.start_epoch:
            return 0.0
        if epoch >= self.end_epoch:
            return self.target
        frac = (epoch - self.start_epoch) / (self.end_epoch - self.start_epoch)
        return self.target * (1.0 - (1.0 - frac) ** 3)

    def state_dict(self):
        return {"target": self.target, "start_epoch": self.start_epoch, "end_epoch": self.end_epoch}

    @classmethod
    def from_state(cls, d):
        # States written before the initial sparsity was dropped carry "initial": always 0 from a run.
        initial = d.get("initial", 0.0)
        if initial:
            raise errors.CheckpointError(f"the saved pruning schedule starts from sparsity {initial}, which this "
                                         "version does not support; start the run again")
        return cls(d["target"], d["start_epoch"], d["end_epoch"])

    def __repr__(self):
        return f"PruneSchedule(target={self.target}, start_epoch={self.start_epoch}, end_epoch={self.end_epoch})"


def _count(fraction, n):
    # Round half up, identically everywhere (Python's round() would round half to even).
    return min(n, int(math.floor(fraction * n + 0.5)))


def _unit_view(t, axis):
    """t as [units, entries per unit] (a view when axis is 0)."""
    return t.movedim(axis, 0).reshape(t.shape[axis], -1)


def _lamp(e, kept):
    """LAMP scores (float64) of the magnitudes `e` of one layer, over its kept weights: e_u^2 divided
    by the sum of e_v^2 over the kept weights at or above e_u in a stable ascending order."""
    sq = torch.where(kept, e.double().square(), torch.zeros((), dtype=torch.float64, device=e.device))
    order = torch.argsort(sq, stable=True)
    ranked = sq[order]
    above = ranked.flip(0).cumsum(0).flip(0)
    out = torch.empty_like(sq)
    out[order] = ranked / above.clamp_min(torch.finfo(torch.float64).tiny)
    return out


class Pruner:
    """Magnitude masks for the conv, linear and cosine weights of `model`, on `schedule`.

    scope: one of SCOPES (see there). exclude: layers left dense, by group or name (resolve_exclude).
    max_sparsity: no layer is pruned past it (MAX_SPARSITY), and every output unit keeps
    KEEP_PER_UNIT weight, whatever the scope: the limits bind where a global threshold would go
    further, and the weights they keep are those the threshold would prune last. Masks only ever
    grow: a pruned weight stays pruned.

        pruner = Pruner(model, PruneSchedule(0.5, 1, 30), scope="global-bn", exclude=DEFAULT_EXCLUDE)
        pruner.attach(optimizer)          # masks applied after every optimizer.step()
        for epoch in ...: pruner.step(epoch); train the epoch; log pruner.report_text()
    """

    def __init__(self, model, schedule, scope="global", exclude=(), max_sparsity=MAX_SPARSITY):
        if scope not in SCOPES:
            raise errors.ConfigError(f"the pruning scope must be one of {', '.join(SCOPES)}, got {scope!r}",
                                     setting="prune_scope")
        if isinstance(max_sparsity, bool) or not isinstance(max_sparsity, (int, float)) \
                or not 0 < max_sparsity <= 1:
            raise errors.ConfigError(f"the maximum sparsity of a layer must be in (0, 1], got {max_sparsity!r}",
                                     setting="prune_max_sparsity")
        self.exclude = tuple(resolve_exclude(model, exclude))
        layers = {n: m for n, m in L.compressible(model).items() if n not in self.exclude}
        if not layers:
            raise errors.ConfigError("every layer is left dense: nothing to prune", setting="prune_exclude")
        self.scope = scope
        self.params = {n: L.weight_of(m) for n, m in layers.items()}
        self.axes = {n: L.output_axis(m) for n, m in layers.items()}
        self._bns = L.following_batchnorm(model) if scope in BN_SCOPES else {}
        self._set_limits(max_sparsity)
        self.masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in self.params.items()}
        self._check_reachable(schedule)
        self.schedule = schedule
        self._keep = None  # float copies of the masks, for the multiplies after each step
        self.last_epoch = None
        self.optimizer = None
        self._handle = None

    # ------------------------------------------------------------------ the limits

    def _set_limits(self, max_sparsity):
        self.max_sparsity = float(max_sparsity)
        self.limits, self.limit_reasons = {}, {}
        for n, p in self.params.items():
            by_max = int(math.floor(self.max_sparsity * p.numel() + 1e-9))
            by_unit = p.numel() - KEEP_PER_UNIT * p.shape[self.axes[n]]
            self.limits[n] = max(0, min(by_max, by_unit))
            self.limit_reasons[n] = "max_sparsity" if by_max <= by_unit else "per_unit"

    def _limit(self, name):
        # A state saved before the limits existed may hold more: masks never shrink.
        return max(self.limits[name], int((~self.masks[name]).sum()))

    def _check_reachable(self, schedule):
        total = sum(p.numel() for p in self.params.values())
        if self.scope == "layer":
            if schedule.target > self.max_sparsity:
                raise errors.ConfigError(f"the target sparsity {schedule.target:g} is above the limit of "
                                         f"{self.max_sparsity:g} on every layer; lower the target",
                                         setting="prune")
            return
        room = sum(self.limits.values())
        if _count(schedule.target, total) > room:
            raise errors.ConfigError(f"the target sparsity {schedule.target:g} is out of reach: with no layer past "
                                     f"{self.max_sparsity:g} and {KEEP_PER_UNIT} weight kept in each output unit, "
                                     f"at most {room / total:.4f} of these {total} weights can go; lower the "
                                     "target or leave fewer layers dense", setting="prune")

    # ------------------------------------------------------------------ the schedule

    def step(self, epoch):
        """At the start of `epoch`, on every rank: prune to the schedule's sparsity, zero what is
        newly pruned (weights and optimizer state). Once per epoch: a second call for the same or an
        earlier epoch (a resumed run) changes nothing. Returns the scheduled sparsity."""
        target = self.schedule.sparsity_at(epoch)
        if self.last_epoch is not None and epoch <= self.last_epoch:
            return target
        with torch.no_grad():
            if self.scope == "layer":
                for name, p in self.params.items():
                    self._select([name], _count(target, p.numel()))
            else:
                self._select(list(self.params), _count(target, sum(p.numel() for p in self.params.values())))
            if self.scope in BN_SCOPES:
                self._agree()
        self.last_epoch = epoch
        self._keep = None
        self.apply()
        return target

    def _magnitude(self, name):
        """|w| (float32), times |gamma / sqrt(var + eps)| of the following BatchNorm in the BN scopes."""
        p = self.params[name]
        e = p.detach().abs().float()
        bn = self._bns.get(name)
        if bn is not None:
            g = torch.ones(bn.num_features, device=p.device) if bn.weight is None else bn.weight.detach().float().abs()
            if bn.running_var is not None:
                g = g / torch.sqrt(bn.running_var.detach().float() + bn.eps)
            shape = [1] * p.dim()
            shape[self.axes[name]] = -1
            e = e * g.to(p.device).reshape(shape)
        return e

    def _scores(self, name):
        """Flat scores of one layer: already pruned weights -inf (so that masks only grow), each
        output unit's last kept weight in the ascending order +inf (never pruned)."""
        mask, axis = self.masks[name], self.axes[name]
        e = self._magnitude(name)
        if self.scope == "global-lamp":
            e = _lamp(e.reshape(-1), mask.reshape(-1)).reshape(e.shape)
        s = torch.where(mask, e, torch.full((), -math.inf, dtype=e.dtype, device=e.device))
        units = _unit_view(s, axis).clone()
        width = units.shape[1]
        # The last maximum, as a stable ascending sort would order it: argmax on the reversed rows.
        top = (width - 1) - torch.argmax(units.flip(1), dim=1)
        alive = units.amax(dim=1) > -math.inf
        rows = torch.arange(units.shape[0], device=units.device)[alive]
        units[rows, top[alive]] = math.inf
        return units.reshape(s.movedim(axis, 0).shape).movedim(0, axis).reshape(-1)

    def _select(self, names, k):
        """Prune the k lowest-scoring weights of `names` together (at least those already pruned),
        no layer past its limit: a stable sort, then the first k weights whose layer has room."""
        already = sum(int((~self.masks[n]).sum()) for n in names)
        limits = [self._limit(n) for n in names]
        k = min(max(k, already), sum(limits))
        if k == 0:
            return
        device = self.params[names[0]].device
        sizes = [self.params[n].numel() for n in names]
        scores = torch.cat([self._scores(n).to(device) for n in names])
        order = torch.argsort(scores, stable=True)
        if len(names) == 1:
            chosen = order[:k]
        else:
            owner = torch.repeat_interleave(torch.arange(len(names), device=device),
                                            torch.tensor(sizes, device=device))[order]
            # Rank of each sorted weight among its own layer's: a stable sort by owner keeps the order.
            by_owner = torch.argsort(owner, stable=True)
            starts = torch.tensor([0] + sizes[:-1], device=device).cumsum(0)
            rank = torch.empty_like(by_owner)
            rank[by_owner] = torch.arange(len(order), device=device) - starts[owner[by_owner]]
            room = rank < torch.tensor(limits, device=device)[owner]
            chosen = order[room][:k]
        flat = torch.ones(scores.numel(), dtype=torch.bool, device=device)
        flat[chosen] = False
        for n, part in zip(names, torch.split(flat, sizes)):
            self.masks[n] = part.reshape(self.params[n].shape).to(self.params[n].device)

    def _agree(self):
        """Every rank takes rank 0's masks (one broadcast): the BN scopes score with each rank's own
        running statistics."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return
        names = list(self.masks)
        flat = torch.cat([self.masks[n].reshape(-1) for n in names]).to(torch.uint8)
        dist.broadcast(flat, src=0)
        for n, part in zip(names, torch.split(flat.bool(), [self.masks[n].numel() for n in names])):
            self.masks[n] = part.reshape(self.masks[n].shape)

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

    def at_target(self):
        """True once the masks hold the schedule's final sparsity, as far as the limits allow (the
        epochs a best checkpoint may be chosen from)."""
        c = self.counts()
        target = self.schedule.target
        if self.scope == "layer":
            return all(p >= min(_count(target, n), self._limit(name)) for name, (p, n) in c.items())
        want = min(_count(target, sum(n for _, n in c.values())), sum(self._limit(name) for name in c))
        return sum(p for p, _ in c.values()) >= want

    def report(self, top=5):
        """What a run logs after a pruning step, as plain values:

            {"sparsity": measured over the pruned layers, "layers": how many are pruned,
             "sparsest": the `top` sparsest layers, sparsest first,
             "at_limit": every layer whose mask reached its limit, in module order}

        each layer as {"name", "pruned", "numel", "sparsity", "limit" (the most weights it may lose),
        "reason": "max_sparsity" | "per_unit" (which limit that is)}."""
        rows = [{"name": n, "pruned": p, "numel": t, "sparsity": p / t, "limit": self._limit(n),
                 "reason": self.limit_reasons[n]} for n, (p, t) in self.counts().items()]
        sparsest = sorted(rows, key=lambda r: -r["sparsity"])[:top]   # sorted() is stable: module order on ties
        return {"sparsity": self.sparsity(), "layers": len(rows), "sparsest": sparsest,
                "at_limit": [r for r in rows if r["pruned"] >= r["limit"]]}

    def report_text(self, top=3):
        """report() as one log line, e.g. "pruned 60.0% of 35 layers; sparsest features.6.conv.1.1 95.0%,
        ...; 2 at their limit: features.6.conv.1.1 (max 95%), features.1.conv.1.se.3 (1 per unit)"."""
        return report_text(self.report(top), top)

    def summary(self):
        """Plain values for logs and the compression record."""
        return {**self.schedule.state_dict(), "scope": self.scope, "sparsity": self.sparsity(),
                "last_epoch": self.last_epoch, "layers": len(self.params), "exclude": list(self.exclude),
                "max_sparsity": self.max_sparsity}

    # ----------------------------------------------------------------- saving, resuming

    def state_dict(self):
        """Everything a resumed run needs: masks (bool, on the CPU), the schedule, the last epoch, the
        limit."""
        return {"scope": self.scope, "schedule": self.schedule.state_dict(), "last_epoch": self.last_epoch,
                "max_sparsity": self.max_sparsity,
                "masks": {n: m.detach().cpu().clone() for n, m in self.masks.items()}}

    def load_state_dict(self, state, source="the pruning state"):
        """Restore masks, schedule, limit and position (CheckpointError, one line, for masks that do not
        fit), then zero the pruned weights and optimizer state. The saved schedule and limit replace
        those given at construction: a run continues on the schedule it started with."""
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
        limit = state.get("max_sparsity", self.max_sparsity)
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not 0 < limit <= 1:
            raise errors.CheckpointError(f"{source}: maximum layer sparsity {limit!r} is not in (0, 1]")
        self.masks = {n: m.to(device=self.params[n].device, dtype=torch.bool).clone() for n, m in masks.items()}
        self._set_limits(limit)
        if state.get("schedule"):
            self.schedule = PruneSchedule.from_state(state["schedule"])
        self.last_epoch = state.get("last_epoch")
        self._keep = None
        self.apply()


def report_text(report, top=3):
    """A Pruner.report() (or a saved copy) as one line for logs."""
    def pct(v):
        return f"{100 * v:.1f}%"

    reasons = {"max_sparsity": lambda r: f"max {pct(r['limit'] / r['numel'])}",
               "per_unit": lambda r: f"{KEEP_PER_UNIT} per unit"}
    line = f"pruned {pct(report['sparsity'])} of {report['layers']} layers"
    if report["sparsest"]:
        line += "; sparsest " + ", ".join(f"{r['name']} {pct(r['sparsity'])}" for r in report["sparsest"][:top])
    limited = report["at_limit"]
    if limited:
        shown = ", ".join(f"{r['name']} ({reasons[r['reason']](r)})" for r in limited[:top])
        more = f" and {len(limited) - top} more" if len(limited) > top else ""
        line += f"; {len(limited)} at their limit: {shown}{more}"
    return line


def check_mask(mask, weight, name, source):
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise errors.CheckpointError(f"{source}: the mask of {name} is not a bool tensor")
    if tuple(mask.shape) != tuple(weight.shape):
        raise errors.CheckpointError(f"{source}: the mask of {name} has shape {tuple(mask.shape)}, its weight "
                                     f"{tuple(weight.shape)}")
