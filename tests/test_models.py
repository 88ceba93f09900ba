import math

import pytest
import torch

import models
from models.efficientnet import ConvUnit, MBConv, make_divisible, resolve, same_padding


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_make_divisible_matches_spec():
    # max(8, int(v + 4) // 8 * 8), plus 8 if that is below 0.9 v
    assert make_divisible(32 * 0.8) == 24
    assert make_divisible(40 * 0.8) == 32
    assert make_divisible(112 * 0.8) == 88
    assert make_divisible(32 * 1.2) == 40
    assert make_divisible(3) == 8
    for v in [1, 5, 11.9, 13, 17.6, 100.3, 1280 * 0.8]:
        r = max(8, int(v + 4) // 8 * 8)
        assert make_divisible(v) == (r + 8 if r < 0.9 * v else r)


@pytest.mark.parametrize("width,depth,stem,stages,head", [
    (0.8, 0.8, 24, [(16, 1), (24, 2), (32, 2), (64, 3), (88, 3), (152, 4), (256, 1)], 1024),
    (0.8, 0.7, 24, [(16, 1), (24, 2), (32, 2), (64, 3), (88, 3), (152, 3), (256, 1)], 1024),
    (1.2, 1.4, 40, [(24, 2), (32, 3), (48, 3), (96, 5), (136, 5), (232, 6), (384, 2)], 1536),
    (1.0, 1.0, 32, [(16, 1), (24, 2), (40, 2), (80, 3), (112, 3), (192, 4), (320, 1)], 1280),
])
def test_resolved_tables_match_spec(width, depth, stem, stages, head):
    s, blocks, h = resolve(width, depth)
    assert (s, h) == (stem, head)
    got, i = [], 0
    for c, n in stages:
        got.append((blocks[i].c_out, sum(1 for b in blocks[i:i + n] if b.c_out == c)))
        i += n
    assert got == stages and len(blocks) == sum(n for _, n in stages)


def test_width_depth_override_rounds_like_spec():
    m = models.create("efficientnet_ex", width_mult=0.25, depth_mult=0.34)
    stem, blocks, head = resolve(0.25, 0.34)
    assert stem == make_divisible(32 * 0.25) == 8
    assert head == make_divisible(1280 * 0.25) == 320
    # repeats = max(1, ceil(depth * n)) for n = 1,2,2,3,3,4,1
    assert len(blocks) == sum(max(1, math.ceil(0.34 * n)) for n in (1, 2, 2, 3, 3, 4, 1))
    assert m.features[0][1].out_channels == 8
    assert m.width_mult == 0.25 and m.depth_mult == 0.34


def test_only_stages_3_and_6_downsample():
    _, blocks, _ = resolve(1.0, 1.0)
    strides = [b.stride for b in blocks]
    assert [i for i, s in enumerate(strides) if s == 2] == [3, 11]  # first block of stages 3 and 6


def test_same_padding_split():
    assert same_padding(3, 1) == (1, 1)
    assert same_padding(5, 1) == (2, 2)
    assert same_padding(5, 2) == (1, 2)
    assert same_padding(3, 2) == (0, 1)
    assert same_padding(1, 1) == (0, 0)


def test_pads_inside_conv_except_asymmetric():
    m = models.create("efficientnet_b0")
    for unit in m.modules():
        if isinstance(unit, ConvUnit):
            conv = unit[1]
            if conv.stride[0] == 2:
                assert isinstance(unit[0], torch.nn.ZeroPad2d) and conv.padding == (0, 0)
            else:
                assert isinstance(unit[0], torch.nn.Identity)


def test_ex_parameter_count_and_keys():
    m = models.create("efficientnet_ex")
    assert n_params(m) == 2_793_064
    sd = m.state_dict()
    assert len(sd) == 377
    assert "features.17.1.weight" in sd and "features.18.1.weight" not in sd
    assert sd["classifier.2.kernel"].shape == (200, 100)


def test_unknown_model_lists_known():
    with pytest.raises(ValueError, match="efficientnet_b0, efficientnet_b3, efficientnet_ex"):
        models.create("resnet50")


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


def test_drop_connect_only_in_b0_b3_residual_blocks():
    b0 = models.create("efficientnet_b0")
    ex = models.create("efficientnet_ex")
    rates = {blk.drop_connect_rate for blk in b0.modules() if isinstance(blk, MBConv) and blk.residual}
    assert rates == {0.2}
    assert all(blk.drop_connect_rate == 0 for blk in b0.modules()
               if isinstance(blk, MBConv) and not blk.residual)
    assert {blk.drop_connect_rate for blk in ex.modules() if isinstance(blk, MBConv)} == {0.0}


def test_channels_last_input_gives_same_output():
    torch.manual_seed(0)
    m = models.create("efficientnet_ex", width_mult=0.25, depth_mult=0.34).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        a = m(x)
        m2 = m.to(memory_format=torch.channels_last)
        b = m2(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("coslinear", [True, False])
def test_gradients_reach_every_parameter(coslinear):
    torch.manual_seed(0)
    m = models.create("efficientnet_b0", head=models.head_name(coslinear), width_mult=0.25, depth_mult=0.34,
                      drop_connect=0.0)
    out = m(torch.randn(4, 3, 32, 32))
    (out * torch.randn_like(out)).sum().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


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


def test_activation_checkpointing_changes_nothing_but_memory():
    """Same loss, gradients and BatchNorm statistics (drop-connect masks included) with and
    without per-block recomputation."""
    def step(ckpt):
        torch.manual_seed(0)
        m = models.create("efficientnet_b0", width_mult=0.25, depth_mult=0.34)  # drop-connect 0.2
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
