import math

import pytest
import torch

from loss import AMSoftmaxLoss, am_softmax_loss, make_criterion, soft_target_loss


def hand_am_softmax(cos, y, s, m, eps=0.0):
    """Cross-entropy of s*(cos - m*onehot), written out with plain Python floats."""
    total = 0.0
    for row, t in zip(cos.tolist(), y.tolist()):
        z = [s * (c - (m if k == t else 0.0)) for k, c in enumerate(row)]
        mx = max(z)
        lse = mx + math.log(sum(math.exp(v - mx) for v in z))
        logp = [v - lse for v in z]
        k = len(row)
        total += -((1 - eps) * logp[t] + eps * sum(logp) / k)
    return total / len(y)


@pytest.mark.parametrize("s,m", [(5.0, 0.0), (5.0, 0.35), (30.0, 0.2)])
def test_am_softmax_matches_hand_computation(s, m):
    torch.manual_seed(0)
    cos = torch.rand(6, 10) * 2 - 1
    y = torch.randint(0, 10, (6,))
    got = am_softmax_loss(cos, y, s=s, m=m).item()
    assert got == pytest.approx(hand_am_softmax(cos, y, s, m), rel=1e-5)


def test_margin_applies_to_true_class_only():
    cos = torch.tensor([[0.5, 0.2, -0.1]])
    y = torch.tensor([0])
    with_margin = am_softmax_loss(cos, y, s=5.0, m=0.3)
    shifted = am_softmax_loss(torch.tensor([[0.2, 0.2, -0.1]]), y, s=5.0, m=0.0)
    assert with_margin.item() == pytest.approx(shifted.item(), rel=1e-6)


def test_label_smoothing_matches_hand_computation():
    torch.manual_seed(1)
    cos = torch.rand(4, 7) * 2 - 1
    y = torch.randint(0, 7, (4,))
    got = AMSoftmaxLoss(s=5.0, m=0.1, label_smoothing=0.1)(cos, y).item()
    assert got == pytest.approx(hand_am_softmax(cos, y, 5.0, 0.1, eps=0.1), rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_are_computed_in_fp32(dtype):
    torch.manual_seed(2)
    cos = (torch.rand(8, 100) * 2 - 1)
    y = torch.randint(0, 100, (8,))
    low = cos.to(dtype)
    got = am_softmax_loss(low, y, s=30.0, m=0.35)
    assert got.dtype == torch.float32
    ref = am_softmax_loss(low.float(), y, s=30.0, m=0.35)
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    st = soft_target_loss(low * 30, low.flip(0) * 30)
    assert st.dtype == torch.float32 and torch.isfinite(st)


def test_extreme_cosines_stay_finite():
    cos = torch.tensor([[1.0, -1.0, -1.0], [-1.0, 1.0, 1.0]])
    y = torch.tensor([0, 2])
    loss = am_softmax_loss(cos, y, s=64.0, m=0.5)
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(hand_am_softmax(cos, y, 64.0, 0.5), rel=1e-5)
    st = soft_target_loss(cos * 1000, cos.flip(1) * 1000)
    assert torch.isfinite(st)


def test_soft_target_loss_matches_hand_computation():
    torch.manual_seed(3)
    s = 5.0
    cs, ct = torch.rand(5, 6) * 2 - 1, torch.rand(5, 6) * 2 - 1
    total = 0.0
    for a, b in zip(cs.tolist(), ct.tolist()):
        zt = [s * v for v in b]
        p = [math.exp(v) / sum(math.exp(u) for u in zt) for v in zt]
        zs = [s * v for v in a]
        lse = math.log(sum(math.exp(u) for u in zs))
        total += -sum(pk * (zk - lse) for pk, zk in zip(p, zs))
    assert soft_target_loss(s * cs, s * ct).item() == pytest.approx(total / 5, rel=1e-5)


def test_soft_target_loss_is_minimal_when_student_equals_teacher():
    torch.manual_seed(4)
    t = torch.randn(3, 10)
    base = soft_target_loss(t, t)
    # Cross-entropy H(p, q) >= H(p, p), with equality only at q = p.
    assert soft_target_loss(t + 0.3 * torch.randn_like(t), t) > base
    p = torch.softmax(t, 1)
    entropy = -(p * p.log()).sum(1).mean()
    assert base.item() == pytest.approx(entropy.item(), rel=1e-5)


def test_soft_target_gives_teacher_no_gradient():
    t = torch.randn(2, 5, requires_grad=True)
    st = torch.randn(2, 5, requires_grad=True)
    soft_target_loss(st, t).backward()
    assert t.grad is None and st.grad is not None


def test_criterion_by_head():
    cos = torch.tensor([[0.9, 0.1]])
    y = torch.tensor([0])
    assert make_criterion(True, s=5.0)(cos, y).item() == pytest.approx(
        hand_am_softmax(cos, y, 5.0, 0.0), rel=1e-5)
    assert make_criterion(False)(cos, y).item() == pytest.approx(
        hand_am_softmax(cos, y, 1.0, 0.0), rel=1e-5)
    with pytest.raises(ValueError):
        AMSoftmaxLoss(s=0)


def test_criterion_by_head_passes_label_smoothing_on():
    """--label-smoothing reaches both heads' losses: AM-softmax on cosines, cross-entropy on logits."""
    torch.manual_seed(5)
    cos = torch.rand(4, 7) * 2 - 1
    logits = torch.randn(4, 7) * 3
    y = torch.randint(0, 7, (4,))
    assert make_criterion(True, s=5.0, m=0.1, label_smoothing=0.2)(cos, y).item() == pytest.approx(
        hand_am_softmax(cos, y, 5.0, 0.1, eps=0.2), rel=1e-5)
    assert make_criterion(False, label_smoothing=0.2)(logits, y).item() == pytest.approx(
        hand_am_softmax(logits, y, 1.0, 0.0, eps=0.2), rel=1e-5)
