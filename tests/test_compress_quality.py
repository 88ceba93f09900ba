"""compress, issue 23 (compression that keeps accuracy): no layer collapses under any scope, exclusions
by name and group, the BatchNorm-aware and LAMP scopes, the QAT freezes (through model.train() and a
save/restore), LSQ's gradients against finite differences and its record, and one set of numerics for
a quantised model evaluated by the training loop and by test.py's loading path."""
import io
import math

import pytest
import torch
from torch import nn

import compress
import data
from micronet_cifar100 import errors
import models
from compress import layers as L
from compress import lsq
from compress import quant as Q
from engine import checkpoint, compression
from engine.evaluate import evaluate
from engine.meter import Meter
from engine.step import HardLabels, StepParts, train_step
from loss import make_criterion

pytestmark = pytest.mark.usefixtures("one_thread")
ARCH = dict(width_mult=0.25, depth_mult=0.2)


def narrow(seed=0):
    torch.manual_seed(seed)
    return models.create("efficientnet_ex", **ARCH)


def random_batches(n, size=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 32, 32, generator=g), torch.randint(0, 100, (size,), generator=g))
            for _ in range(n)]


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)


def steps(model, opt, batches):
    parts = StepParts(model, HardLabels(make_criterion(True, 5.0)), opt,
                      torch.amp.GradScaler("cuda", enabled=False), torch.autocast("cpu", enabled=False))
    model.train()
    for x, y in batches:
        assert bool(train_step(parts, x, y, Meter(torch.device("cpu"))))


def units_without_weights(mask, axis):
    dims = [d for d in range(mask.dim()) if d != axis]
    return int((mask.sum(dim=dims) == 0).sum())


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# ------------------------------------------------------------------------- no layer collapses

TINY = "features.4.conv.0.1"


def with_a_tiny_layer():
    model = narrow()
    with torch.no_grad():
        L.compressible(model)[TINY].weight.mul_(1e-4)
    return model


@pytest.mark.parametrize("scope", ["global", "global-bn", "global-lamp"])
def test_no_layer_collapses_under_a_global_threshold(scope):
    model = with_a_tiny_layer()
    # Allowing up to 99% a layer makes 95% reachable; the tiny layer would go first and entirely.
    pruner = compress.Pruner(model, compress.PruneSchedule(0.95, 1, 1), scope=scope, max_sparsity=0.99)
    pruner.step(1)
    total = sum(n for _, n in pruner.counts().values())
    assert sum(p for p, _ in pruner.counts().values()) == int(0.95 * total + 0.5)
    for name, (pruned, n) in pruner.counts().items():
        assert pruned <= math.floor(0.99 * n + 1e-9), name
        assert units_without_weights(pruner.masks[name], pruner.axes[name]) == 0, name
    assert pruner.at_target()
    if scope != "global-lamp":   # LAMP does not see a layer's scale: the tiny layer is not special to it
        at_limit = {r["name"]: r for r in pruner.report()["at_limit"]}
        assert TINY in at_limit and at_limit[TINY]["pruned"] == at_limit[TINY]["limit"]


def test_default_limit_and_unreachable_targets():
    model = with_a_tiny_layer()
    pruner = compress.Pruner(model, compress.PruneSchedule(0.9, 1, 1), scope="global")
    assert pruner.max_sparsity == compress.MAX_SPARSITY == 0.95
    pruner.step(1)
    counts = pruner.counts()
    assert max(p / n for p, n in counts.values()) <= 0.95
    # Stopped by its limit, not emptied: here one weight per output channel (16 weights each).
    n, units = counts[TINY][1], L.units_of(L.compressible(model)[TINY])
    assert counts[TINY][0] == pruner.limits[TINY] == min(math.floor(0.95 * n), n - units) == n - units
    report = pruner.report(top=3)
    assert [r["sparsity"] for r in report["sparsest"]] == sorted((p / n for p, n in counts.values()), reverse=True)[:3]
    assert all(r["pruned"] == r["limit"] for r in report["at_limit"])
    line = pruner.report_text()
    assert "\n" not in line and TINY in line and "at their limit" in line
    # Past what the limits allow: refused before anything is pruned, with the reachable maximum.
    with pytest.raises(errors.ConfigError) as e:
        compress.Pruner(with_a_tiny_layer(), compress.PruneSchedule(0.95, 1, 1), scope="global")
    assert e.value.setting == "prune" and "out of reach" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(errors.ConfigError, match="above the limit"):
        compress.Pruner(narrow(), compress.PruneSchedule(0.97, 1, 1), scope="layer")


def test_masks_only_grow_and_are_deterministic_under_the_limits():
    runs = []
    for _ in range(2):
        model = with_a_tiny_layer()
        pruner = compress.Pruner(model, compress.PruneSchedule(0.9, 1, 4), scope="global-lamp")
        history = []
        g = torch.Generator().manual_seed(2)
        for epoch in range(1, 6):
            pruner.step(epoch)
            with torch.no_grad():   # weights move between steps, as in training (pruned ones stay 0)
                for n, p in pruner.params.items():
                    p.add_(torch.randn(p.shape, generator=g) * 0.01).mul_(pruner.masks[n])
            history.append({n: m.clone() for n, m in pruner.masks.items()})
        for before, after in zip(history, history[1:]):
            assert all(bool((after[n] <= before[n]).all()) for n in after)
        runs.append(history[-1])
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])


# ------------------------------------------------------------------------------- exclusions

def test_exclusions_by_group_and_name():
    model = narrow()
    layers = L.compressible(model)
    names = list(layers)
    depthwise = [n for n, m in layers.items() if isinstance(m, nn.Conv2d) and m.groups > 1]
    block3 = [n for n in names if n.startswith("features.3.")]
    want = {names[0], "classifier.0", "classifier.2", *depthwise, *block3, "features.8.1"}
    got = compress.resolve_exclude(model, ["stem", "head", "depthwise", "features.3", "features.8.1"])
    assert set(got) == want and got == [n for n in names if n in want]
    assert compress.resolve_exclude(model, ["linear", "cosine"]) == ["classifier.0", "classifier.2"]
    assert set(compress.resolve_exclude(model, ["conv"])) == set(names) - {"classifier.0", "classifier.2"}
    assert compress.resolve_exclude(model, compress.DEFAULT_EXCLUDE) == [names[0], "classifier.0", "classifier.2"]

    dense = {n: L.weight_of(layers[n]).detach().clone() for n in want}
    pruner = compress.Pruner(model, compress.PruneSchedule(0.6, 1, 1), scope="global-bn",
                             exclude=["stem", "head", "depthwise", "features.3", "features.8.1"])
    assert set(pruner.params) == set(names) - want and pruner.exclude == tuple(got)
    pruner.step(1)
    assert all(torch.equal(L.weight_of(layers[n]), w) for n, w in dense.items())
    rec = compress.record(model, pruner)
    assert all(rec["layers"][n]["mask"] is None for n in want)
    assert rec["prune"]["exclude"] == got


@pytest.mark.parametrize("entry", ["features.0.2", "nonsense", "Head", ""])
def test_an_unknown_exclusion_is_one_line(entry):
    with pytest.raises(errors.ConfigError) as e:
        compress.resolve_exclude(narrow(), ["stem", entry])
    msg = str(e.value)
    assert e.value.setting == "prune_exclude" and "\n" not in msg and f"cannot leave {entry} dense" in msg
    assert "stem, head, conv" in msg   # the groups it could have named


def test_excluding_everything_is_refused():
    with pytest.raises(errors.ConfigError, match="nothing to prune") as e:
        compress.Pruner(narrow(), compress.PruneSchedule(0.5, 1, 1), exclude=["conv", "head"])
    assert e.value.setting == "prune_exclude"


# ----------------------------------------------------------------------------------- scopes

def test_global_bn_scores_what_batchnorm_cannot_rescale():
    """Scaling a conv's output channel by a and its BatchNorm's running variance by a^2 changes nothing
    the network computes (with eps 0): global-bn's masks stay, global's move. LAMP ignores a
    whole layer's scale."""
    def pruned(scope, scale_channel=None, scale_layer=None):
        model = narrow()
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eps = 0.0
                with torch.no_grad():
                    m.running_var.uniform_(0.5, 2.0, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            if scale_channel:
                conv = L.compressible(model)["features.3.conv.1.1"]
                bn = L.following_batchnorm(model)["features.3.conv.1.1"]
                conv.weight[:4].mul_(4.0)
                bn.running_var[:4].mul_(16.0)
            if scale_layer:
                L.compressible(model)["features.5.conv.0.1"].weight.mul_(4.0)
        pruner = compress.Pruner(model, compress.PruneSchedule(0.5, 1, 1), scope=scope)
        pruner.step(1)
        return pruner.masks

    def same(a, b):
        return all(torch.equal(a[n], b[n]) for n in a)

    assert same(pruned("global-bn"), pruned("global-bn", scale_channel=True))
    assert not same(pruned("global"), pruned("global", scale_channel=True))
    assert same(pruned("global-lamp"), pruned("global-lamp", scale_layer=True))
    assert not same(pruned("global-bn"), pruned("global-bn", scale_layer=True))
    assert set(compress.SCOPES) == {"global", "global-bn", "global-lamp", "layer"}


def test_old_schedule_states_still_load():
    state = {"target": 0.5, "initial": 0.0, "start_epoch": 1, "end_epoch": 3}
    s = compress.PruneSchedule.from_state(state)
    assert s.sparsity_at(2) == pytest.approx(0.5 * (1 - 0.5 ** 3)) and "initial" not in s.state_dict()
    with pytest.raises(errors.CheckpointError, match="initial|starts from sparsity 0.1"):
        compress.PruneSchedule.from_state({**state, "initial": 0.1})


# ------------------------------------------------------------------------- QAT freezing

def _observer_state(model):
    return {n: Q.input_state(m) for n, m in compress.quantised_layers(model).items() if Q.input_state(m)}


def _bn_state(model):
    return {k: v.clone() for k, v in model.state_dict().items()
            if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


def _same(a, b):
    return a.keys() == b.keys() and all(
        (torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else _same(a[k], b[k])) for k in a)


def test_frozen_observers_and_batchnorm_stay_frozen_through_train_and_a_restore():
    model = narrow()
    compress.quantize(model, 8, 8)
    opt = sgd(model)
    qat = compress.QATSchedule(model, observers_epoch=2, batchnorm_epoch=2)
    data_ = random_batches(2)
    assert qat.step(1) == {"observers": False, "batchnorm": False}
    obs, bn = _observer_state(model), _bn_state(model)
    steps(model, opt, data_)
    assert not _same(obs, _observer_state(model)) and not _same(bn, _bn_state(model))   # both learning

    assert qat.step(2) == {"observers": True, "batchnorm": True}
    obs, bn = _observer_state(model), _bn_state(model)
    model.eval()
    model.train()   # how a training loop re-enters training after an evaluation
    steps(model, opt, data_)
    assert _same(obs, _observer_state(model)) and _same(bn, _bn_state(model))
    # A frozen BatchNorm normalises with its running statistics in training too.
    some_bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    x = torch.randn(4, some_bn.num_features, 8, 8)
    model.train()
    train_out = some_bn(x)
    assert torch.equal(train_out, nn.functional.batch_norm(x, some_bn.running_mean, some_bn.running_var,
                                                           some_bn.weight, some_bn.bias, False, 0.0, some_bn.eps))

    # Save as a run does, restore into a fresh model and schedule, continue both: bit-exact.
    saved = roundtrip({"model": model.state_dict(), "optimizer": opt.state_dict(),
                       "compression": compress.record(model, qat=qat), "qat": qat.state_dict()})
    assert saved["compression"]["qat"]["batchnorm_frozen"] and saved["qat"]["observers_frozen"]
    model2 = narrow(seed=5)
    compress.quantize(model2, 8, 8)
    opt2 = sgd(model2)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["optimizer"])
    compress.apply_record(model2, saved["compression"])
    qat2 = compress.QATSchedule(model2)   # the saved schedule replaces this one
    qat2.load_state_dict(saved["qat"])
    assert (qat2.observers_epoch, qat2.batchnorm_epoch, qat2.last_epoch) == (2, 2, 2)
    assert qat2.step(3) == qat.step(3) == {"observers": True, "batchnorm": True}
    more = random_batches(2, seed=7)
    steps(model, opt, more)
    steps(model2, opt2, more)
    assert _same(model.state_dict(), model2.state_dict())
    assert _same(_observer_state(model), _observer_state(model2)) and _same(obs, _observer_state(model2))


def test_unfreezing_and_bad_freeze_settings():
    model = narrow()
    compress.quantize(model, 8, 8)
    compress.freeze_batchnorm(compress.freeze_observers(model))
    compress.freeze_batchnorm(compress.freeze_observers(model, False), False)
    assert compress.frozen_state(model) == {"observers": False, "batchnorm": False}
    bn = _bn_state(model)
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 32, 32))
    assert not _same(bn, _bn_state(model))
    with pytest.raises(errors.ConfigError) as e:
        compress.QATSchedule(model, observers_epoch=0)
    assert e.value.setting == "qat_freeze"
    with pytest.raises(errors.CheckpointError, match="not a QAT schedule state"):
        compress.QATSchedule(model).load_state_dict({"observers_epoch": 1})


# ------------------------------------------------------------------------------------ LSQ

def _surrogate(v, s, qmin, qmax, c):
    """LSQ's forward with round(z) taken as z + c (c held fixed): the function whose derivatives are
    LSQ's gradients (the straight-through estimator of the rounding)."""
    z = v / s
    return s * (z.clamp(qmin, qmax) + c)


def _fd_check(module, v, axis, qmin, qmax, n_shared, qp):
    """Autograd's gradients of sum(coef * module(v)) against central differences of the surrogate,
    for the step (times LSQ's gradient scale) and for v."""
    g = torch.Generator().manual_seed(0)
    coef = torch.randn(v.shape, generator=g, dtype=torch.float64)
    v = v.clone().requires_grad_()
    out = module(v)
    (out * coef).sum().backward()
    s = module.step.detach().clamp_min(lsq.STEP_MIN)
    shape = [1] * v.dim()
    shape[axis] = -1
    s_b = s.reshape(shape) if s.numel() > 1 else s
    vd = v.detach()
    z = vd / s_b
    c = torch.round(z).clamp(qmin, qmax) - z.clamp(qmin, qmax)
    assert torch.equal(out.detach(), (torch.round(z).clamp(qmin, qmax) * s_b))   # the forward
    h = 1e-6
    fd_s = torch.empty_like(s)
    for i in range(s.numel()):
        up, down = s.clone(), s.clone()
        up.view(-1)[i] += h
        down.view(-1)[i] -= h
        f = [(_surrogate(vd, t.reshape(shape) if t.numel() > 1 else t, qmin, qmax, c) * coef).sum()
             for t in (up, down)]
        fd_s.view(-1)[i] = (f[0] - f[1]) / (2 * h)
    scale = 1.0 / math.sqrt(n_shared * qp)
    assert torch.allclose(module.step.grad, fd_s * scale, rtol=1e-6, atol=1e-9)
    idx = torch.randperm(vd.numel(), generator=g)[:40]
    for i in idx.tolist():
        up, down = vd.clone(), vd.clone()
        up.view(-1)[i] += h
        down.view(-1)[i] -= h
        fd = ((_surrogate(up, s_b, qmin, qmax, c) - _surrogate(down, s_b, qmin, qmax, c)) * coef).sum() / (2 * h)
        assert abs(float(v.grad.view(-1)[i]) - float(fd)) < 1e-6
    # Both kinds of input gradient occur: inside the grid (passed) and clipped (zero).
    inside = (z > qmin) & (z < qmax)
    assert bool(inside.any()) and bool((~inside).any())
    assert torch.equal(v.grad, coef * inside)


def test_lsq_weight_gradients_match_finite_differences():
    torch.manual_seed(0)
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    for bits in (2, 4):
        q = lsq.LSQWeight(w, bits, axis=0).double()
        qmax = 2 ** (bits - 1) - 1
        # The paper's initial step, one per output channel.
        assert torch.allclose(q.step, 2 * w.abs().mean(dim=(1, 2, 3)) / math.sqrt(qmax))
        with torch.no_grad():
            q.step.mul_(0.5)   # some weights beyond the grid's ends
        _fd_check(q, w, 0, -qmax, qmax, n_shared=4 * 3 * 3, qp=qmax)


def test_lsq_input_gradients_match_finite_differences():
    torch.manual_seed(0)
    x = torch.randn(5, 3, 4, 4, dtype=torch.float64) * 2
    q = lsq.LSQInput(4).double()
    q.train()
    q(x)   # first training batch: step and zero point
    z = q.zero_point
    assert 6 <= z <= 8   # data around zero: (nearly) the signed grid {-8..7}
    with torch.no_grad():
        q.step.mul_(0.3)   # LSQ's initial step clips nothing of this batch: make some values clip
    _fd_check(q, x, 0, -z, 15 - z, n_shared=3 * 4 * 4, qp=15 - z)


def test_lsq_input_grids_follow_the_data_signs():
    torch.manual_seed(0)
    t = torch.randn(64, 8, 4, 4) * 2
    cases = {"relu": torch.relu(t), "around zero": t, "swish": nn.functional.silu(t)}
    zero = {}
    for what, x in cases.items():
        q = lsq.LSQInput(8)
        q.train()
        q(x)
        qp = 255 - q.zero_point
        assert float(q.step.detach()) == pytest.approx(2 * float(x.abs().mean()) / math.sqrt(qp), rel=1e-6)
        zero[what] = q.zero_point
        r = -float(x.min()) / float(x.max())
        assert abs(q.zero_point - min(128, 255 * r / (1 + r))) <= 0.5
    # ReLU: LSQ's unsigned grid; symmetric data: (nearly) its signed grid; swish: a few negative levels.
    assert zero["relu"] == 0 and 120 <= zero["around zero"] <= 128 and 0 < zero["swish"] < 20
    # An LSQ input evaluates exactly as the deployed arithmetic (compress.quant.round_input).
    q.eval()
    x = cases["swish"]
    st = Q.input_state(_layer_with(q))
    assert torch.equal(q(x), Q.round_input(x, st["act_scale"], st["act_zero_point"], 255))


def test_lsq_inputs_are_not_fixed_by_a_probe_before_training():
    """A run probes its model with an all-zero batch in training mode before the first step (the
    speed estimate, torch.compile's proof): the first real batch still sets the input grids."""
    probed, direct = narrow(), narrow()
    for m in (probed, direct):
        compress.quantize(m, 4, 8, method="lsq")
    probed.train()
    probed(torch.zeros(4, 3, 32, 32)).sum().backward()
    probed.zero_grad(set_to_none=True)
    assert {Q.input_state(m)["act_zero_point"].item() for m in compress.quantised_layers(probed).values()} == {0}
    first = random_batches(1, seed=4)
    for m in (probed, direct):
        steps(m, sgd(m), first)
    assert _same(_observer_state(probed), _observer_state(direct))
    assert len({Q.input_state(m)["act_zero_point"].item() for m in compress.quantised_layers(direct).values()}) > 1
    # Trained: a later forward, zeros or not, leaves the grids alone.
    trained = _observer_state(direct)
    with torch.no_grad():
        direct(torch.zeros(4, 3, 32, 32))
    assert _same(trained, _observer_state(direct))


def _layer_with(input_quant):
    layer = Q.QuantConv2d.from_float(nn.Conv2d(8, 4, 1), 8, 8, "lsq")
    layer.input_quant = input_quant
    return layer


def _trained_lsq(method="lsq"):
    model = narrow()
    compress.quantize(model, 4, 8, first_last_bits=8, method=method)
    opt = sgd(model)
    pruner = compress.Pruner(model, compress.PruneSchedule(0.5, 1, 1), scope="global-bn",
                             exclude=compress.DEFAULT_EXCLUDE).attach(opt)
    pruner.step(1)
    steps(model, opt, random_batches(2, seed=4))
    return model, pruner


def test_lsq_steps_train_and_the_record_round_trip_evaluates_identically(tmp_path):
    plain_keys = list(narrow().state_dict())
    model = narrow()
    compress.quantize(model, 4, 8, first_last_bits=8, method="lsq")
    learned = compress.step_sizes(model)
    assert len(learned) == 2 * len(L.compressible(model))
    assert {id(p) for p in learned} <= {id(p) for p in model.parameters()}   # the optimizer sees them
    assert list(model.state_dict()) == plain_keys                            # the checkpoint does not
    initial = [p.detach().clone() for p in learned]
    opt = sgd(model)
    steps(model, opt, random_batches(2, seed=4))
    assert all(not torch.equal(a, p.detach()) for a, p in zip(initial, learned))

    rec = compress.record(model)
    assert rec["format"] == compress.RECORD_FORMAT_LSQ
    e = rec["layers"]["features.2.conv.1.1"]
    assert e["method"] == "lsq" and e["weight_step"].shape == (L.units_of(L.compressible(model)["features.2.conv.1.1"]),)
    assert "(learned steps x38)" in compress.summary(rec)
    layer = L.compressible(model)["features.2.conv.1.1"]
    assert torch.equal(layer.weight_scale_of(layer.weight), e["weight_step"])   # what a deployment multiplies by
    path = str(tmp_path / "model_best.pytar")
    checkpoint.save_atomic(checkpoint.weights_file(model, epoch=1, compression=rec), path)
    fresh = narrow(seed=9)
    checkpoint.load_weights(fresh, path)
    assert all(m.method == "lsq" for m in compress.quantised_layers(fresh).values())
    x = torch.randn(8, 3, 32, 32)
    model.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))
    # A min/max record is still format 1.
    assert compress.record(_trained_lsq("minmax")[0])["format"] == compress.RECORD_FORMAT


@pytest.mark.parametrize("mutate,needle", [
    (lambda r: r["layers"]["features.2.conv.1.1"].update(weight_step=torch.ones(3)), "one per output unit"),
    (lambda r: r["layers"]["features.2.conv.1.1"]["weight_step"].neg_(), "finite and positive"),
    (lambda r: r["layers"]["features.2.conv.1.1"].pop("weight_step"), "learned weight steps must be"),
    (lambda r: r["layers"]["features.2.conv.1.1"].update(act_zero_point=torch.tensor([200])), "above 128"),
    (lambda r: r["layers"]["features.2.conv.1.1"].update(method="magic"), "quantiser 'magic'"),
    (lambda r: r.update(format=compress.RECORD_FORMAT), "learned steps in a record of format"),
])
def test_bad_lsq_records_are_one_line(mutate, needle):
    model, pruner = _trained_lsq()
    rec = compress.record(model, pruner)
    mutate(rec)
    with pytest.raises(errors.CheckpointError) as e:
        compress.apply_record(narrow(), rec, source="run/model_best.pytar")
    msg = str(e.value)
    assert needle in msg and msg.startswith("run/model_best.pytar: layer ") and "\n" not in msg, msg


# ------------------------------------------------------------------ one set of numerics

@pytest.mark.parametrize("method", ["minmax", "lsq"])
def test_quantised_layers_compute_in_float32_under_autocast(method):
    torch.manual_seed(0)
    layers = [Q.QuantConv2d.from_float(nn.Conv2d(8, 6, 3, padding=1), 4, 8, method),
              Q.QuantLinear.from_float(nn.Linear(8, 6), 4, 8, method),
              Q.QuantCosine.from_float(models.heads.CosineLinear(8, 6), 8, 16, method)]
    for layer, shape in zip(layers, [(4, 8, 5, 5), (4, 8), (4, 8)]):
        layer.train()
        layer(torch.randn(shape))   # the input grid from a first batch
        compress.freeze_observers(layer)
        x = torch.randn(shape).bfloat16()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y_auto = layer(x)
        y_ref = layer(x.float())
        assert y_auto.dtype == torch.bfloat16
        assert torch.equal(y_auto, y_ref.bfloat16()), type(layer).__name__


@pytest.mark.parametrize("method", ["minmax", "lsq"])
def test_training_path_eval_equals_test_py_path(method, cifar_dir, tmp_path):
    """A pruned, quantised model trained on real images, evaluated as train.py evaluates it (the
    same module, model.eval() inside evaluate(), the run's eval autocast), and as test.py does (a
    fresh model given the saved checkpoint and its record by engine.checkpoint.load_weights): the
    same outputs to the bit, the same figures."""
    fmt = torch.channels_last
    images, labels = data.subset(*data.load_cifar100(cifar_dir, train=False, download=False), 48)
    place = data.Placement(memory_format=fmt)
    (x, y), = list(data.EvalLoader(images, labels, 48, place=place))   # normalised, as evaluation sees them
    model = narrow().to(memory_format=fmt)
    compress.quantize(model, 4, 8, first_last_bits=8, method=method)
    opt = sgd(model)
    pruner = compress.Pruner(model, compress.PruneSchedule(0.5, 1, 2), scope="global-bn",
                             exclude=compress.DEFAULT_EXCLUDE).attach(opt)
    qat = compress.QATSchedule(model, observers_epoch=2, batchnorm_epoch=2)
    for epoch in (1, 2):
        pruner.step(epoch)
        qat.step(epoch)
        steps(model, opt, [(x[i:i + 16], y[i:i + 16]) for i in (0, 16)])
    criterion = make_criterion(True, 5.0)
    loader = data.EvalLoader(images, labels, 24, place=place)
    run_autocast = torch.autocast("cpu", enabled=False)
    trained = evaluate(model, loader, criterion, compression.eval_autocast(model, run_autocast))
    assert model.training                          # evaluate() put it back, the freezes held
    assert compress.frozen_state(model) == {"observers": method == "minmax", "batchnorm": True}
    model.eval()
    with torch.inference_mode():
        out_trained = model(x)

    path = str(tmp_path / "model_state_02.pytar")
    checkpoint.save_atomic(checkpoint.weights_file(model, epoch=2,
                                                   compression=compress.record(model, pruner, qat)), path)
    fresh = models.create("efficientnet_ex", **ARCH)
    checkpoint.load_weights(fresh, path)
    fresh = fresh.to(memory_format=fmt).eval()
    with torch.inference_mode():
        out_loaded = fresh(x)
    assert torch.equal(out_trained, out_loaded)
    loaded = evaluate(fresh, loader, criterion, compression.eval_autocast(fresh, run_autocast))
    assert loaded == trained
