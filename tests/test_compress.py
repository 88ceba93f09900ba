"""compress: the pruning schedule and masks (zeros that stay zero through SGD with momentum and weight
decay, global against layer scope, state round trips and a bit-exact continuation), quantisation-aware
layers against an integer simulation (BatchNorm folded), and the compression record's checks."""
import io
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import compress
from micronet_cifar100 import errors
import models
from compress import layers as L
from compress import quant as Q
from engine import checkpoint
from engine.meter import Meter
from engine.step import HardLabels, StepParts, train_step
from loss import make_criterion

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("one_thread")


def narrow(seed=0, head="cosine"):
    torch.manual_seed(seed)
    return models.create("efficientnet_ex", head=head, width_mult=0.25, depth_mult=0.2)


def batches(n, size=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 32, 32, generator=g), torch.randint(0, 100, (size,), generator=g))
            for _ in range(n)]


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)


def step_parts(model, optimizer):
    return StepParts(model, HardLabels(make_criterion(True, 5.0)), optimizer,
                     torch.amp.GradScaler("cuda", enabled=False), torch.autocast("cpu", enabled=False))


# ------------------------------------------------------------------------------ the schedule

def test_cubic_schedule():
    s = compress.PruneSchedule(0.8, 2, 6)
    assert [s.sparsity_at(e) for e in (1, 2, 6, 7, 100)] == [0.0, 0.0, 0.8, 0.8, 0.8]
    # Zhu & Gupta: s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3
    assert s.sparsity_at(4) == pytest.approx(0.8 * (1 - 0.5 ** 3))
    assert s.sparsity_at(3) == pytest.approx(0.8 * (1 - 0.75 ** 3))
    values = [s.sparsity_at(e) for e in range(1, 8)]
    assert values == sorted(values)
    # The gains shrink: most of the pruning happens early.
    gains = [b - a for a, b in zip(values[1:], values[2:6])]
    assert gains == sorted(gains, reverse=True)
    assert compress.PruneSchedule(0.5, 3, 3).sparsity_at(3) == 0.5       # one shot


@pytest.mark.parametrize("args,setting", [((1.0, 1, 2), "prune"), ((-0.1, 1, 2), "prune"),
                                          ((0.5, 0, 2), "prune_schedule"), ((0.5, 3, 2), "prune_schedule"),
                                          ((0.5, 1.5, 2), "prune_schedule")])
def test_schedule_rejects_bad_values(args, setting):
    with pytest.raises(errors.ConfigError) as e:
        compress.PruneSchedule(*args)
    assert e.value.setting == setting and "\n" not in str(e.value)


# -------------------------------------------------------------------------------- the masks

def _unit_tops(weight, axis):
    """The largest |w| of each output unit (the weight the per-unit limit keeps): True there."""
    rows = weight.detach().abs().movedim(axis, 0).reshape(weight.shape[axis], -1)
    top = torch.zeros_like(rows, dtype=torch.bool)
    top[torch.arange(rows.shape[0]), rows.argmax(dim=1)] = True
    return top.reshape(weight.movedim(axis, 0).shape).movedim(0, axis)


def _threshold_holds(weights, masks, ignore=None):
    """Every pruned |w| <= every kept |w| (among the given tensors; kept weights in `ignore` left out)."""
    ignore = ignore or [torch.zeros_like(m) for m in masks]
    pruned = torch.cat([w.detach().abs().reshape(-1)[~m.reshape(-1)] for w, m in zip(weights, masks)])
    kept = torch.cat([w.detach().abs().reshape(-1)[(m & ~i).reshape(-1)] for w, m, i in zip(weights, masks, ignore)])
    return pruned.numel() == 0 or kept.numel() == 0 or pruned.max() <= kept.min()


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_measured_sparsity_follows_the_schedule(scope):
    model = narrow()
    opt = sgd(model)
    schedule = compress.PruneSchedule(0.7, 2, 5)
    pruner = compress.Pruner(model, schedule, scope=scope).attach(opt)
    parts = step_parts(model, opt)
    data = batches(2)
    total = sum(n for _, n in pruner.counts().values())
    before = None
    for epoch in range(1, 8):
        target = pruner.step(epoch)
        assert target == schedule.sparsity_at(epoch)
        counts = pruner.counts()
        if scope == "global":
            assert sum(p for p, _ in counts.values()) == int(target * total + 0.5)
            assert abs(pruner.sparsity() - target) <= 0.5 * len(counts) / total
        else:
            # Uniform, except where a layer's limit binds (the squeeze-excite convs of this narrow
            # model have two weights per output channel: they stop at 50%).
            assert all(p == min(int(target * n + 0.5), pruner.limits[name]) for name, (p, n) in counts.items())
        assert pruner.at_target() == (epoch >= 5)
        masks = {n: m.clone() for n, m in pruner.masks.items()}
        if before is not None:  # a pruned weight stays pruned
            assert all(bool((masks[n] <= before[n]).all()) for n in masks)
        before = masks
        for x, y in data:
            train_step(parts, x, y, Meter(torch.device("cpu")))
    # A second call for an epoch already stepped (a resumed run) changes nothing.
    again = pruner.step(7)
    assert again == 0.7 and all(torch.equal(pruner.masks[n], before[n]) for n in before)


def test_global_and_layer_scope_differ_as_they_should():
    g_model, l_model = narrow(), narrow()
    g = compress.Pruner(g_model, compress.PruneSchedule(0.5, 1, 1), scope="global")
    lay = compress.Pruner(l_model, compress.PruneSchedule(0.5, 1, 1), scope="layer")
    # The same initial weights; magnitudes judged before pruning zeroes them.
    dense = {n: p.detach().clone() for n, p in g.params.items()}
    g.step(1)
    lay.step(1)
    assert g.sparsity() == pytest.approx(0.5, abs=1e-5) and lay.sparsity() == pytest.approx(0.5, abs=1e-3)
    # Layer scope: every layer at 50%, each by its own threshold.
    assert all(abs(p / n - 0.5) <= 0.5 / n for p, n in lay.counts().values())
    assert all(_threshold_holds([dense[n]], [lay.masks[n]], [_unit_tops(dense[n], lay.axes[n])]) for n in dense)
    assert not _threshold_holds(list(dense.values()), [lay.masks[n] for n in dense])
    # Global scope: one threshold over all weights, except where the limits bind (a layer at its
    # maximum sparsity; each output unit's last weight); layers end far apart (small-magnitude
    # layers, such as the depthwise convs, lose more).
    limited = {r["name"] for r in g.report()["at_limit"]}
    free = [n for n in dense if n not in limited]
    assert limited and free
    assert _threshold_holds([dense[n] for n in free], [g.masks[n] for n in free],
                            [_unit_tops(dense[n], g.axes[n]) for n in free])
    assert not _threshold_holds([dense[n] for n in free], [g.masks[n] for n in free])   # the per-unit limit bound
    spread = [p / n for p, n in g.counts().values()]
    assert max(spread) - min(spread) > 0.3
    assert any(torch.ne(g.masks[n], lay.masks[n]).any() for n in g.masks)


def test_pruned_weights_stay_exactly_zero_through_sgd_with_momentum_and_decay():
    model = narrow()
    opt = sgd(model)
    pruner = compress.Pruner(model, compress.PruneSchedule(0.6, 1, 2), scope="global").attach(opt)
    parts = step_parts(model, opt)
    meter = Meter(torch.device("cpu"))
    data = batches(3)
    for epoch in (1, 2, 3):
        pruner.step(epoch)
        for _ in range(4):
            for x, y in data:
                assert bool(train_step(parts, x, y, meter))
                for name, p in pruner.params.items():
                    dead = ~pruner.masks[name]
                    assert bool((p.detach()[dead] == 0).all()), name
                    buf = opt.state[p]["momentum_buffer"]
                    assert bool((buf[dead] == 0).all()), name
    # The kept weights did train.
    assert pruner.sparsity() == pytest.approx(0.6, abs=1e-5)
    w = pruner.params["features.2.conv.0.1"]
    assert bool(w.detach()[pruner.masks["features.2.conv.0.1"]].ne(0).all())


def test_without_attach_apply_does_it_by_hand_and_exclude_keeps_layers_dense():
    model = narrow()
    pruner = compress.Pruner(model, compress.PruneSchedule(0.5, 1, 1), scope="layer", exclude=("features.0.1",))
    assert "features.0.1" not in pruner.params
    pruner.step(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    pruner.apply()
    assert all(bool((p.detach()[~pruner.masks[n]] == 0).all()) for n, p in pruner.params.items())
    with pytest.raises(errors.ConfigError, match="no conv, linear or cosine layer"):
        compress.Pruner(model, compress.PruneSchedule(0.5, 1, 1), exclude=("features.0.2",))
    with pytest.raises(errors.ConfigError, match="scope"):
        compress.Pruner(model, compress.PruneSchedule(0.5, 1, 1), scope="row")


def test_saved_weights_keep_the_plain_keys():
    plain_keys = list(narrow().state_dict())
    model = narrow()
    compress.quantize(model, 4, 4, first_last_bits=8)
    pruner = compress.Pruner(model, compress.PruneSchedule(0.5, 1, 1))
    pruner.step(1)
    with torch.no_grad():
        model.train()(torch.randn(4, 3, 32, 32))
    state = model.state_dict()
    assert list(state) == plain_keys
    fresh = narrow(seed=5)
    fresh.load_state_dict(state)                  # strict: the plain model takes it as it is
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())
    model.load_state_dict(narrow(seed=6).state_dict())   # and a plain state loads into the quantised model


# ------------------------------------------------------------ state round trip, bit-exact continuation

def _train(model, opt, pruner, epochs, data):
    parts = step_parts(model, opt)
    for epoch in epochs:
        pruner.step(epoch)
        for x, y in data:
            train_step(parts, x, y, Meter(torch.device("cpu")))


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _full_state(model):
    """Weights plus every buffer of the input quantisers (which state_dict leaves out)."""
    out = dict(model.state_dict())
    for name, m in compress.quantised_layers(model).items():
        for k, v in (Q.input_state(m) or {}).items():
            out[f"{name}.{k}"] = v
    return out


def test_masks_and_quantiser_state_round_trip_and_continue_bit_exactly():
    data = batches(3, seed=3)
    schedule = compress.PruneSchedule(0.6, 1, 3)

    def build():
        model = narrow()
        compress.quantize(model, 8, 8)
        opt = sgd(model)
        return model, opt, compress.Pruner(model, schedule, scope="global").attach(opt)

    model, opt, pruner = build()
    _train(model, opt, pruner, (1, 2), data)
    saved = _roundtrip({"model": model.state_dict(), "optimizer": opt.state_dict(),
                        "pruner": pruner.state_dict(), "compression": compress.record(model, pruner)})
    assert all(m.dtype == torch.bool for m in saved["pruner"]["masks"].values())
    _train(model, opt, pruner, (3, 4), data)

    # What a resumed run does: the same construction, then the saved state.
    model2, opt2, pruner2 = build()
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["optimizer"])
    compress.apply_record(model2, saved["compression"])
    pruner2.load_state_dict(saved["pruner"])
    assert pruner2.last_epoch == 2 and all(torch.equal(pruner2.masks[n], m) for n, m in saved["pruner"]["masks"].items())
    _train(model2, opt2, pruner2, (3, 4), data)

    a, b = _full_state(model), _full_state(model2)
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert all(torch.equal(pruner.masks[n], pruner2.masks[n]) for n in pruner.masks)


def test_pruner_state_that_does_not_fit_is_one_line():
    model = narrow()
    pruner = compress.Pruner(model, compress.PruneSchedule(0.5, 1, 1))
    state = pruner.state_dict()
    state["masks"]["features.0.1"] = torch.ones(2, 2, dtype=torch.bool)
    with pytest.raises(errors.CheckpointError, match=r"mask of features.0.1 has shape \(2, 2\)"):
        compress.Pruner(model, compress.PruneSchedule(0.5, 1, 1)).load_state_dict(state)
    state = pruner.state_dict()
    del state["masks"]["classifier.0"]
    with pytest.raises(errors.CheckpointError, match="1 missing"):
        compress.Pruner(model, compress.PruneSchedule(0.5, 1, 1)).load_state_dict(state)


# ----------------------------------------------------------------------- quantisation-aware layers

def _int_conv_simulation(x, conv, bn, wbits, abits, fq):
    """The deployed integer layer: BatchNorm folded into the conv first, weights rounded per output
    channel to wbits, the input to abits with the frozen range, products accumulated in int32, the
    sum rescaled and the folded bias added. Returns (output, one output step per channel)."""
    g = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    w = conv.weight.detach() * g.reshape(-1, *([1] * (conv.weight.dim() - 1)))
    bias = bn.bias - bn.running_mean * g + (conv.bias * g if conv.bias is not None else 0)
    qmax = 2 ** (wbits - 1) - 1
    sw = (w.abs().reshape(w.shape[0], -1).amax(dim=1) / qmax).clamp_min(1e-12)
    qw = torch.clamp(torch.round(w / sw.reshape(-1, *([1] * (w.dim() - 1)))), -qmax, qmax)
    sa, za = float(fq.scale), int(fq.zero_point)
    qa = torch.clamp(torch.round(x / sa) + za, 0, 2 ** abits - 1)
    # Integer products summed exactly (float64 holds these integers exactly), then int32.
    acc = nn.functional.conv2d((qa - za).double(), qw.double(), None, conv.stride, conv.padding,
                               conv.dilation, conv.groups)
    acc = acc.round().to(torch.int32)
    assert int(acc.abs().max()) < 2 ** 31
    step = (sa * sw).reshape(1, -1, 1, 1)
    return acc.double() * step + bias.detach().double().reshape(1, -1, 1, 1), step


@pytest.mark.parametrize("wbits,abits,groups", [(8, 8, 1), (4, 4, 1), (4, 8, 6), (2, 4, 1)])
def test_fake_quantised_conv_equals_integer_simulation(wbits, abits, groups):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 6 if groups > 1 else 5, 3, padding=1, groups=groups, bias=False)
    bn = nn.BatchNorm2d(conv.out_channels)
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(-1.5, 2.0, conv.out_channels))   # one negative scale
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-0.3, 0.3)
        bn.running_var.uniform_(0.5, 2.0)
    qconv = Q.QuantConv2d.from_float(conv, wbits, abits)
    layer = nn.Sequential(qconv, bn)
    layer.train()
    bn.momentum = 0.0  # keep the running statistics set above
    for _ in range(3):
        layer(torch.randn(4, 6, 8, 8) * 2 + 0.5)      # learns the input range
    layer.eval()
    x = torch.randn(4, 6, 8, 8) * 2 + 0.5
    with torch.no_grad():
        y = layer(x).double()
    with torch.no_grad():
        sim, step = _int_conv_simulation(x.double(), conv, bn, wbits, abits, qconv.input_quant)
    assert bool(((y - sim).abs() <= step).all()), float(((y - sim).abs() / step).max())
    # In fact much closer: only float32 rounding separates them.
    assert float(((y - sim).abs() / step).max()) < 0.1


def test_fake_quantised_linear_equals_integer_simulation():
    torch.manual_seed(0)
    lin = nn.Linear(12, 7)
    q = Q.QuantLinear.from_float(lin, 4, 8)
    q.train()
    q(torch.randn(16, 12))
    q.eval()
    x = torch.randn(16, 12)
    with torch.no_grad():
        y = q(x).double()
    qmax = 7
    sw = lin.weight.detach().abs().amax(dim=1) / qmax
    qw = torch.round(lin.weight.detach() / sw[:, None])
    fq = q.input_quant
    sa, za = float(fq.scale), int(fq.zero_point)
    qa = torch.clamp(torch.round(x / sa) + za, 0, 255)
    acc = ((qa - za).double() @ qw.double().t()).round().to(torch.int32)
    sim = acc.double() * (sa * sw.double()) + lin.bias.detach().double()
    assert bool(((y - sim).abs() <= sa * sw.double()).all())


def test_input_quantiser_is_torch_ao_bit_for_bit():
    """The CPU path (torch.ao's fused observer, then the rounding in vectorised ops) gives exactly
    what torch.ao's FusedMovingAvgObsFakeQuantize gives: outputs, range, scale, zero point, gradients."""
    import copy
    torch.manual_seed(0)
    for bits in (2, 4, 8):
        q = Q.QuantConv2d.from_float(nn.Conv2d(4, 4, 3, padding=1), 8, bits)
        ref = copy.deepcopy(q.input_quant)
        for i in range(4):
            if i == 3:
                q.eval()
                ref.disable_observer()
            x = (torch.randn(2, 4, 8, 8) * (i + 1) + i).requires_grad_()
            x_ref = x.detach().clone().requires_grad_()
            y, y_ref = q.quant_input(x), ref(x_ref)
            assert torch.equal(y, y_ref)
            g = torch.randn_like(y)
            y.backward(g)
            y_ref.backward(g)
            assert torch.equal(x.grad, x_ref.grad)
            mine, theirs = Q.input_state(q), {"act_min": ref.activation_post_process.min_val,
                                              "act_max": ref.activation_post_process.max_val,
                                              "act_scale": ref.scale, "act_zero_point": ref.zero_point}
            assert all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_quantize_and_prune_leave_the_random_stream_alone():
    model = narrow()
    state = torch.get_rng_state()
    compress.quantize(model, 8, 8)
    compress.Pruner(model, compress.PruneSchedule(0.5, 1, 1)).step(1)
    assert torch.equal(state, torch.get_rng_state())


def test_bn_folding_is_exact_for_per_channel_symmetric_weights():
    """q(w * g) = g * q(w) per output channel: folding before or after rounding gives the same grid."""
    torch.manual_seed(0)
    w = torch.randn(16, 8, 3, 3)
    g = torch.randn(16).abs() + 0.1
    g[3] = -g[3]
    for bits in (2, 4, 8):
        folded = Q.fake_quant_weight(w * g[:, None, None, None], bits)
        after = Q.fake_quant_weight(w, bits) * g[:, None, None, None]
        assert torch.allclose(folded, after, rtol=1e-6, atol=0)
        levels = (folded / Q.weight_scale(w * g[:, None, None, None], bits)[:, None, None, None]).round()
        assert levels.abs().max() <= 2 ** (bits - 1) - 1


def test_weight_rounding_passes_gradients_straight_through():
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    q = Q.fake_quant_weight(w, 4)
    assert len(torch.unique(q.detach()[0])) <= 15
    q.backward(torch.arange(w.numel(), dtype=torch.float32).reshape(w.shape))
    assert torch.equal(w.grad, torch.arange(w.numel(), dtype=torch.float32).reshape(w.shape))


def test_quantize_bits_and_first_last_and_frozen_range_in_eval():
    model = narrow()
    compress.quantize(model, 4, 6, first_last_bits=(8, 16))
    q = compress.quantised_layers(model)
    assert len(q) == len(L.compressible(model)) == 38
    assert (q["features.0.1"].weight_bits, q["features.0.1"].act_bits) == (8, 16)
    assert q["features.0.1"].input_quant is None            # 16 bits: left in floating point
    assert {(q[n].weight_bits, q[n].act_bits) for n in ("classifier.0", "classifier.2")} == {(8, 16)}
    assert (q["features.8.1"].weight_bits, q["features.8.1"].act_bits) == (4, 6)
    assert isinstance(q["classifier.2"], models.heads.CosineLinear)
    model.train()(torch.randn(4, 3, 32, 32))
    fq = q["features.1.conv.0.1"].input_quant
    before = Q.input_state(q["features.1.conv.0.1"])
    model.eval()(torch.randn(4, 3, 32, 32) * 10)
    after = Q.input_state(q["features.1.conv.0.1"])
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert int(fq.zero_point) <= 63
    for bad in (1, 9, 40, "8", True, None):
        with pytest.raises(errors.ConfigError, match="bits must be one of 2 to 8, 16 or 32"):
            compress.quantize(narrow(), bad, 8)


@torch.no_grad()
def _settle_batchnorm(model, xs):
    """Running statistics from these batches (a random-init net in eval mode otherwise lets its
    activations fade to nothing, which no 8-bit grid resolves)."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None   # a cumulative average
    model.train()
    for x in xs:
        model(x)
    for m in bns:
        m.momentum = 0.01


def test_8bit_numerics_stay_close_to_float():
    model = narrow()
    _settle_batchnorm(model, [torch.randn(32, 3, 32, 32) for _ in range(4)])
    model.eval()
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    compress.quantize(model, 8, 8)
    compress.calibrate(model, [torch.randn(16, 3, 32, 32) for _ in range(4)] + [x])
    with torch.no_grad():
        out = model(x)
    assert float((out - ref).abs().max()) < 0.05
    assert float((out.argmax(1) == ref.argmax(1)).float().mean()) >= 0.8


# -------------------------------------------------------------------------------- the record

def _trained_compressed(wbits=4, abits=8):
    model = narrow()
    compress.quantize(model, wbits, abits, first_last_bits=8)
    opt = sgd(model)
    pruner = compress.Pruner(model, compress.PruneSchedule(0.5, 1, 2), scope="global").attach(opt)
    _train(model, opt, pruner, (1, 2), batches(2, seed=4))
    return model, pruner


def test_record_rebuilds_the_same_numerics_in_a_plain_model(tmp_path):
    model, pruner = _trained_compressed()
    rec = compress.record(model, pruner)
    assert rec["format"] == compress.RECORD_FORMAT and rec["prune"]["scope"] == "global"
    e = rec["layers"]["features.1.conv.0.1"]
    assert (e["weight_bits"], e["act_bits"], e["mask"].dtype) == (4, 8, torch.bool)
    assert rec["layers"]["classifier.2"]["weight_bits"] == 8
    # Through a real checkpoint file: plain values only, checksummed, weights_only loadable.
    path = str(tmp_path / "model_best.pytar")
    checkpoint.save_atomic(checkpoint.weights_file(model, epoch=2, compression=rec), path)
    loaded = checkpoint.load_file(path)
    plain = narrow(seed=9)
    checkpoint.fit_state_dict(plain, loaded["model"], path, loaded)
    compress.apply_record(plain, loaded["compression"], source=path)
    x = torch.randn(8, 3, 32, 32)
    model.eval()
    plain.eval()
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))
    assert "W4/A8 x35, W8/A8 x3" in compress.summary(rec)
    assert compress.masks_of(rec).keys() == {n for n, m in pruner.masks.items() if not bool(m.all())}


def _bad(mutate):
    model, pruner = _trained_compressed()
    rec = compress.record(model, pruner)
    mutate(rec)
    return narrow(), rec


@pytest.mark.parametrize("mutate,needle", [
    (lambda r: r["layers"]["features.0.1"].update(weight_bits=40), "weight bits 40 out of range (2 to 8, 16 or 32"),
    (lambda r: r["layers"]["features.0.1"].update(weight_bits=1), "weight bits 1 out of range"),
    (lambda r: r["layers"]["features.0.1"].update(act_bits="8"), "activation bits '8' out of range"),
    (lambda r: r["layers"]["features.0.1"].update(act_bits=True), "activation bits True out of range"),
    (lambda r: r["layers"]["features.0.1"].update(act_bits=None), "give both or neither"),
    (lambda r: r["layers"]["features.1.conv.0.1"].update(mask=torch.ones(8, 3, 3, dtype=torch.bool)),
     "the mask of features.1.conv.0.1 has shape (8, 3, 3), its weight (8, 1, 3, 3)"),
    (lambda r: r["layers"]["features.1.conv.0.1"].update(mask=torch.ones(8, 8, 1, 1)), "not a bool tensor"),
    (lambda r: r["layers"].update({"features.0.2": {}}), "features.0.2 is not a conv, linear or cosine layer"),
    (lambda r: r["layers"]["features.0.1"].pop("act_scale"), "8-bit inputs but no act scale"),
    (lambda r: r["layers"]["features.0.1"].update(act_min=torch.tensor(float("nan"))), "not a trained range"),
    (lambda r: r["layers"]["features.0.1"].update(act_zero_point=torch.tensor(300)), "zero point 300 outside 0..255"),
    (lambda r: r.update(layers=[]), "not a compression record"),
])
def test_bad_records_are_one_line_checkpoint_errors(mutate, needle):
    model, rec = _bad(mutate)
    with pytest.raises(errors.CheckpointError) as e:
        compress.apply_record(model, rec, source="run/model_best.pytar")
    msg = str(e.value)
    assert needle in msg and msg.startswith("run/model_best.pytar: ") and "\n" not in msg, msg


def test_compress_imports_only_torch_models_errors():
    code = ("import sys, compress; print(sorted({m for m in sys.modules} & {'models', 'loss', 'data', 'refinery', "
            "'engine', 'torchscope', 'micronet_cifar100.cli', 'bench', 'micronet_cifar100.errors'}))")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert eval(p.stdout) == ["micronet_cifar100.errors", "models"]


def test_bench_compress_runs_as_a_script(tmp_path):
    """bench/compression.py as a user runs it: every mode timed beside the dense step, ratios to dense."""
    out = tmp_path / "compress.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "compression.py"), "--device", "cpu",
                        "--width-mult", "0.1", "--depth-mult", "0.1", "--batch-size", "2", "--steps", "1",
                        "--eval-steps", "1", "--warmup", "0", "--rounds", "2", "--threads", "1", "--quiet",
                        "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    doc = json.loads(out.read_text())
    assert list(doc["modes"]) == ["dense", "masks", "qat8", "qat4", "qat8+masks"]
    assert doc["modes"]["dense"]["train_vs_dense"] == 1.0
    assert all(m["train_ms_per_step"] > 0 and m["eval_vs_dense"] > 0 for m in doc["modes"].values())
    assert doc["measured_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert "| qat8+masks" in p.stdout
