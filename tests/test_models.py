"""The model family: the stage tables and their rounding (literal tables from the original's spec),
the README's parameter counts, the registry's facts, and one interface test set run over every
registered model and both heads (timm's tests/test_models.py is the model): forward and backward
reaching every parameter, state-dict round trip, channels_last, activation checkpointing."""
import copy
import math

import pytest
import torch
from torch import nn

import models
from conftest import assert_same_weights
from engine import checkpoint
from models.efficientnet import make_divisible

REGISTRY = [(name, head) for name in models.names() for head in models.HEADS]

pytestmark = pytest.mark.usefixtures("one_thread")


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def feature_shapes(name, width=None, depth=None):
    """(channels, height, width) after the stem, each block and the head unit, for a 32x32 input
    (on the meta device: shapes only, no arithmetic)."""
    with torch.device("meta"):
        m = models.create(name, width_mult=width, depth_mult=depth).eval()
        shapes = []
        for f in m.features:
            f.register_forward_hook(lambda mod, inputs, out: shapes.append(tuple(out.shape[1:])))
        m(torch.empty(1, 3, 32, 32))
    return shapes


def stages_of(channels):
    """Consecutive blocks of equal width as (channels, repeats)."""
    out = []
    for c in channels:
        if out and out[-1][0] == c:
            out[-1] = (c, out[-1][1] + 1)
        else:
            out.append((c, 1))
    return out


# ------------------------------------------------------------------ tables and rounding

@pytest.mark.parametrize("v,expected", [
    (1, 8), (3, 8), (5, 8), (10, 16), (11.9, 16), (13, 16), (17.6, 16), (19, 24), (25.6, 24), (32, 32),
    (38.4, 40), (89.6, 88), (100.3, 104), (1024, 1024),
])
def test_make_divisible_matches_spec(v, expected):
    # max(8, int(v + 4) // 8 * 8), plus 8 if that is below 0.9 v (10 -> 8 < 9 -> 16; 19 -> 16 < 17.1 -> 24)
    assert make_divisible(v) == expected


@pytest.mark.parametrize("name,stem,stages,head", [
    ("efficientnet_ex", 24, [(16, 1), (24, 2), (32, 2), (64, 3), (88, 3), (152, 4), (256, 1)], 1024),
    ("efficientnet_exx", 24, [(16, 1), (24, 2), (32, 2), (64, 3), (88, 3), (152, 3), (256, 1)], 1024),
    ("efficientnet_b3", 40, [(24, 2), (32, 3), (48, 3), (96, 5), (136, 5), (232, 6), (384, 2)], 1536),
    ("efficientnet_b0", 32, [(16, 1), (24, 2), (40, 2), (80, 3), (112, 3), (192, 4), (320, 1)], 1280),
])
def test_built_models_have_the_readme_tables(name, stem, stages, head):
    shapes = feature_shapes(name)
    assert shapes[0][0] == stem and shapes[-1][0] == head
    assert stages_of([c for c, _, _ in shapes[1:-1]]) == stages


def test_width_depth_override_rounds_like_spec():
    """width 0.25, depth 0.34 on the base table: channels make_divisible(c x 0.25) (40 x 0.25 = 10
    rounds up to 16: 8 would be more than 10% below), repeats max(1, ceil(0.34 n))."""
    shapes = feature_shapes("efficientnet_ex", width=0.25, depth=0.34)
    assert shapes[0][0] == 8 and shapes[-1][0] == 320
    assert [c for c, _, _ in shapes[1:-1]] == [8, 8, 16, 24, 24, 32, 32, 48, 48, 80]
    m = models.create("efficientnet_ex", width_mult=0.25, depth_mult=0.34)
    assert m.features[0][1].out_channels == 8
    assert m.width_mult == 0.25 and m.depth_mult == 0.34


def test_only_stages_3_and_6_downsample():
    sizes = [h for _, h, _ in feature_shapes("efficientnet_b0")]
    # stem; stages 1-2 (3 blocks) at 32; stages 3-5 (8 blocks) at 16; stages 6-7 (5 blocks) at 8; head
    assert sizes == [32] + [32] * 3 + [16] * 8 + [8] * 5 + [8]


def test_convolutions_pad_tf_same():
    """Every convolution gives ceil(input / stride) (TF "same"); stride-1 convs pad symmetrically
    inside the conv, the two stride-2 (5x5 depthwise) ones through the ZeroPad2d in their unit's
    pad slot (index 0): TF pads 3 pixels there, 1 before and 2 after."""
    m = models.create("efficientnet_b0").eval()
    sizes = {}  # module name -> (input width, output width)
    modules = dict(m.named_modules())
    convs = {name: mod for name, mod in modules.items() if isinstance(mod, nn.Conv2d)}
    for name, mod in modules.items():
        if isinstance(mod, (nn.Conv2d, nn.ZeroPad2d)):
            mod.register_forward_hook(lambda mod, inputs, out, name=name: sizes.__setitem__(
                name, (inputs[0].shape[-1], out.shape[-1])))
    with torch.no_grad():
        m(torch.randn(1, 3, 32, 32))
    assert convs.keys() <= sizes.keys()
    for name, conv in convs.items():
        pad = name.rsplit(".", 1)[0] + ".0"  # a conv unit's pad slot (an explicit pad, or none)
        h = sizes[pad][0] if pad in sizes else sizes[name][0]
        assert sizes[name][1] == math.ceil(h / conv.stride[0]), (name, h, sizes[name])
    strided = [name for name, mod in convs.items() if mod.stride[0] == 2]
    pads = [mod for mod in modules.values() if isinstance(mod, nn.ZeroPad2d)]
    assert len(strided) == len(pads) == 2  # stage 3's and stage 6's first depthwise conv
    for name in strided:
        slot = modules[name.rsplit(".", 1)[0] + ".0"]
        assert isinstance(slot, nn.ZeroPad2d) and slot.padding == (1, 2, 1, 2)
        assert convs[name].padding == (0, 0) and convs[name].kernel_size == (5, 5)
    for mod in convs.values():
        if mod.stride[0] == 1:
            assert mod.padding == ((mod.kernel_size[0] - 1) // 2,) * 2


def test_ex_parameter_count_and_keys():
    m = models.create("efficientnet_ex")
    assert n_params(m) == 2_793_064
    sd = m.state_dict()
    assert len(sd) == 377
    assert "features.17.1.weight" in sd and "features.18.1.weight" not in sd
    assert sd["classifier.2.kernel"].shape == (200, 100)


@pytest.mark.parametrize("name,cosine,linear", [
    # cosine: the README's table; linear: head x 100 + 100 in place of head x 200 + 200 + 200 x 100
    ("efficientnet_b0", 4_285_556, 4_137_456),
    ("efficientnet_b3", 11_027_240, 10_853_540),
    ("efficientnet_ex", 2_793_064, 2_670_564),
    ("efficientnet_exx", 2_418_650, 2_296_150),
])
def test_parameter_counts_of_the_readme_table(name, cosine, linear):
    with torch.device("meta"):
        assert n_params(models.create(name)) == cosine
        assert n_params(models.create(name, head="linear")) == linear
        assert all(p.requires_grad for p in models.create(name).parameters())


@pytest.mark.parametrize("name,width,depth,dropout,drop_connect,epochs", [
    ("efficientnet_b0", 1.0, 1.0, 0.2, 0.2, 70),
    ("efficientnet_b3", 1.2, 1.4, 0.3, 0.2, 70),
    ("efficientnet_ex", 0.8, 0.8, 0.0, 0.0, 75),
    ("efficientnet_exx", 0.8, 0.7, 0.0, 0.0, 75),
])
def test_registry_cards_hold_the_originals_facts(name, width, depth, dropout, drop_connect, epochs):
    c = models.card(name)
    assert (c.width, c.depth, c.dropout, c.drop_connect, c.epochs) == (width, depth, dropout, drop_connect, epochs)
    assert [lr for _, _, lr in c.lr_regime] == [0.07, 0.007, 0.0007, 0.00007]
    m = models.create(name, head="linear", width_mult=0.25, depth_mult=0.34)
    assert (m.width_mult, m.depth_mult, m.classifier[0].p) == (0.25, 0.34, dropout)


def test_registry_names_the_four_models():
    assert models.names() == ["efficientnet_b0", "efficientnet_b3", "efficientnet_ex", "efficientnet_exx"]


def test_unknown_model_lists_known():
    with pytest.raises(ValueError, match="efficientnet_b0, efficientnet_b3, efficientnet_ex"):
        models.create("resnet50")


# ------------------------------------------------------------------ behaviour

@pytest.mark.parametrize("name", models.names())
@pytest.mark.parametrize("coslinear", [True, False])
def test_output_shape_batch_1_and_n(name, coslinear):
    torch.manual_seed(0)
    m = models.create(name, head=models.head_name(coslinear), width_mult=0.25, depth_mult=0.34)
    m.eval()
    with torch.no_grad():
        assert m(torch.randn(1, 3, 32, 32)).shape == (1, 100)
        out = m(torch.randn(5, 3, 32, 32))
    assert out.shape == (5, 100)
    if coslinear:
        assert out.abs().max() <= 1.0
    m.train()
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, 100)  # the original broke at batch 1


def test_train_and_eval_behaviour_differ_only_where_expected():
    torch.manual_seed(0)
    m = models.create("efficientnet_b0", width_mult=0.25, depth_mult=0.34)
    x = torch.randn(4, 3, 32, 32)
    m.eval()
    with torch.no_grad():
        a, b = m(x), m(x)
    assert torch.equal(a, b)  # eval is deterministic (no drop-connect, running BN stats)
    m.train()
    before = m.features[0][2].running_mean.clone()
    with torch.no_grad():
        m(x)
    assert not torch.equal(before, m.features[0][2].running_mean)  # BN updates in train mode
    m.eval()
    with torch.no_grad():
        c = m(x)
    assert not torch.equal(a, c)


def train_forwards_differ(name, depth, width=0.25, **kw):
    """Whether two training-mode forwards of one batch (BatchNorm on batch statistics, dropout off)
    differ under two seeds: whether the model draws random numbers."""
    m = models.create(name, head="linear", width_mult=width, depth_mult=depth, dropout=0.0, **kw)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.manual_seed(1)
        a = m(x)
        torch.manual_seed(2)
        return not torch.equal(a, m(x))


def test_drop_connect_only_in_b0_b3_residual_blocks():
    b0 = models.create("efficientnet_b0")
    ex = models.create("efficientnet_ex")
    blocks = lambda m: [b for b in m.modules() if hasattr(b, "drop_connect_rate")]
    assert len(blocks(b0)) == 16 and len(blocks(ex)) == 16
    assert {b.drop_connect_rate for b in blocks(b0) if b.residual} == {0.2}
    assert all(b.drop_connect_rate == 0 for b in blocks(b0) if not b.residual)
    assert {b.drop_connect_rate for b in blocks(ex)} == {0.0}
    # In behaviour: b0 and b3 draw masks in training, ex and exx do not, and neither does b0 without
    # residual blocks (width 1, depth 0.2: one block a stage, each changing the width) or with
    # drop_connect 0.
    assert train_forwards_differ("efficientnet_b0", 0.34) and train_forwards_differ("efficientnet_b3", 0.34)
    assert not train_forwards_differ("efficientnet_ex", 0.34)
    assert not train_forwards_differ("efficientnet_exx", 0.34)
    assert not train_forwards_differ("efficientnet_b0", 0.2, width=1.0)
    assert not train_forwards_differ("efficientnet_b0", 0.34, drop_connect=0.0)


def test_determinism_under_seed():
    def build():
        torch.manual_seed(123)
        return models.create("efficientnet_ex", width_mult=0.25, depth_mult=0.34)
    a, b = build().state_dict(), build().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    torch.manual_seed(124)
    c = models.create("efficientnet_ex", width_mult=0.25, depth_mult=0.34).state_dict()
    assert not torch.equal(a["features.0.1.weight"], c["features.0.1.weight"])


def test_init_follows_spec():
    torch.manual_seed(0)
    m = models.create("efficientnet_b3")
    conv = m.features[-1][1]  # 1x1 head conv, 1536 outputs
    assert abs(conv.weight.std().item() - math.sqrt(2 / 1536)) / math.sqrt(2 / 1536) < 0.05
    lin = m.classifier[0]
    assert lin.weight.abs().max() <= 1 / math.sqrt(200) and torch.count_nonzero(lin.bias) == 0
    k = m.classifier[2].kernel
    torch.testing.assert_close(k.norm(dim=0), torch.ones(100))
    bn = m.features[0][2]
    assert bn.eps == 1e-5 and bn.momentum == 0.01
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)


def test_se_width_uses_block_input_channels():
    m = models.create("efficientnet_ex")
    blk = m.features[2]  # second stage, first block: 16 -> 24, expand 6
    se = blk.conv[2].se
    assert se[1].in_channels == 16 * 6 and se[1].out_channels == int(16 / 4)
    assert blk.conv[3].bias is not None  # projection conv has a bias


def test_cosine_head_handles_zero_feature():
    head = models.create("efficientnet_ex").classifier
    out = head(torch.zeros(2, 1024))
    assert torch.isfinite(out).all()


# ------------------------------------------------------------------ every model, both heads

def narrow(name, head, **kw):
    """The registered model at width 0.25, depth 0.34 (residual blocks kept), with its own dropout
    and drop-connect."""
    return models.create(name, head=head, width_mult=0.25, depth_mult=0.34, **kw)


def head_keys(head):
    if head == "cosine":
        return ["classifier.0.bias", "classifier.0.weight", "classifier.2.kernel"]
    return ["classifier.1.bias", "classifier.1.weight"]


@pytest.mark.parametrize("name,head", REGISTRY)
def test_forward_backward_reaches_every_parameter(name, head):
    """At the registered size, in training mode (dropout and drop-connect on): finite outputs of
    the right shape; a finite gradient reaches every parameter, and it is non-zero on every weight
    (a bias in front of a training-mode BatchNorm has, in exact arithmetic, a zero gradient)."""
    torch.manual_seed(0)
    m = models.create(name, head=head)
    out = m(torch.randn(4, 3, 32, 32))
    assert out.shape == (4, 100) and torch.isfinite(out).all()
    (out * torch.linspace(-1, 1, 100)).sum().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []
    dead = [n for n, p in m.named_parameters() if not n.endswith(".bias") and not p.grad.abs().sum() > 0]
    assert dead == []
    assert sorted(k for k in m.state_dict() if k.startswith("classifier.")) == head_keys(head)


@pytest.mark.parametrize("name,head", REGISTRY)
def test_state_dict_round_trip(name, head, tmp_path):
    """Saved (bare, as the original did, and in our wrapped format) and loaded into a model of other
    random weights: every tensor, BatchNorm statistics included, and so every output, comes back."""
    torch.manual_seed(0)
    a = narrow(name, head)
    with torch.no_grad():
        a(torch.randn(8, 3, 32, 32))  # moves the BatchNorm statistics off their initial values
    a.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = a(x)
    for kind, obj in (("bare", a.state_dict()), ("wrapped", checkpoint.weights_file(a))):
        path = tmp_path / f"{kind}.pytar"
        torch.save(obj, path)
        torch.manual_seed(1)
        b = narrow(name, head)
        assert not torch.equal(b.state_dict()["features.0.1.weight"], a.state_dict()["features.0.1.weight"])
        checkpoint.load_weights(b, str(path))
        assert_same_weights(a.state_dict(), b.state_dict())
        with torch.no_grad():
            assert torch.equal(b.eval()(x), want), kind


@pytest.mark.parametrize("name,head", REGISTRY)
def test_channels_last_gives_the_same_outputs_and_gradients(name, head):
    torch.manual_seed(0)
    a = narrow(name, head)
    b = copy.deepcopy(a).to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 32, 32)
    outs = []
    for m, xi in ((a, x), (b, x.contiguous(memory_format=torch.channels_last))):
        torch.manual_seed(5)  # the same dropout and drop-connect masks
        out = m(xi)
        (out * torch.linspace(-1, 1, 100)).sum().backward()
        with torch.no_grad():
            outs.append((out, m.eval()(xi)))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=1e-4, atol=1e-5)
    # Each gradient to 1e-4 of its norm; the biases in front of a BatchNorm, whose exact gradient is
    # zero, carry rounding noise of ~1e-6 either way.
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert (q.grad - p.grad).norm() <= 1e-4 * p.grad.norm() + 1e-5, n


@pytest.mark.parametrize("name,head", REGISTRY)
def test_activation_checkpointing_changes_nothing_but_memory(name, head):
    """Same loss, gradients and BatchNorm statistics (drop-connect and dropout masks included) with
    and without per-block recomputation."""
    def step(ckpt):
        torch.manual_seed(0)
        m = narrow(name, head)
        m.activation_checkpointing = ckpt
        torch.manual_seed(1)
        out = m(torch.randn(4, 3, 32, 32))
        loss = (out * torch.linspace(-1, 1, 100)).sum()
        loss.backward()
        return loss, m
    la, a = step(False)
    lb, b = step(True)
    assert torch.equal(la, lb)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-6, msg=n)
    for (n, x), (_, y) in zip(a.named_buffers(), b.named_buffers()):
        assert torch.equal(x, y), n
