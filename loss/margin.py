"""Additive-margin softmax ("angle loss", arXiv 1801.05599) for cosine outputs."""
import torch.nn.functional as F
from torch import nn


def logits_from_output(output, s, coslinear):
    """A cosine head's outputs become logits by the scale s; a plain head's already are."""
    output = output.float()  # softmax in fp32: bf16 logits of scale s*1 lose ~3 digits
    return output * s if coslinear else output


def am_softmax_loss(cos, target, s=5.0, m=0.0, label_smoothing=0.0):
    """Cross-entropy of s * (cos - m * onehot(target)): the margin applies to the true class only."""
    cos = cos.float()
    if m:
        cos = cos - m * F.one_hot(target, cos.shape[1]).to(cos.dtype)
    return F.cross_entropy(s * cos, target, label_smoothing=label_smoothing)


class AMSoftmaxLoss(nn.Module):
    def __init__(self, s=5.0, m=0.0, label_smoothing=0.0):
        super().__init__()
        if s <= 0:
            raise ValueError(f"scale s must be positive, got {s}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label smoothing must be in [0, 1), got {label_smoothing}")
        self.s, self.m, self.label_smoothing = s, m, label_smoothing

    def forward(self, cos, target):
        return am_softmax_loss(cos, target, self.s, self.m, self.label_smoothing)

    def extra_repr(self):
        return f"s={self.s}, m={self.m}, label_smoothing={self.label_smoothing}"


def make_criterion(coslinear, s=5.0, m=0.0, label_smoothing=0.0):
    """Hard-label loss for a head: AM-softmax on cosines, plain cross-entropy on logits."""
    if coslinear:
        return AMSoftmaxLoss(s, m, label_smoothing)
    return nn.CrossEntropyLoss(label_smoothing=label_smoothing)
