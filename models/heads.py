"""Classifier heads: the cosine-linear head of the "angle loss" entry, and the plain one."""
import torch
import torch.nn.functional as F
from torch import nn

EMBED_DIM = 200
# The original normalised without an epsilon, which gives NaN for an all-zero feature.
NORM_EPS = 1e-12


class L2Norm(nn.Module):
    """Scale each row to unit length (parameter-free: index 1 of the original's cosine head)."""

    # How the op counter costs this layer (docs/counting.md): normalisation along `self.dim`.
    layer_kind = "l2norm"

    def __init__(self, dim=1, eps=NORM_EPS):
        super().__init__()
        self.dim, self.eps = dim, eps

    def forward(self, x):
        return F.normalize(x, dim=self.dim, eps=self.eps)


class CosineLinear(nn.Module):
    """cos(theta) between a unit feature and each class vector (columns of `kernel`).

    The model returns cosines in [-1, 1]; the scale s lives in the loss, not here.
    `kernel` is [in_features, num_classes], the original's shape and key name.
    """

    # How the op counter costs this layer (docs/counting.md): a matmul of the input against the
    # column-normalised `self.kernel` ([in, out]).
    layer_kind = "cosine"

    def __init__(self, in_features, num_classes):
        super().__init__()
        self.kernel = nn.Parameter(torch.empty(in_features, num_classes))
        self.reset_kernel()

    @torch.no_grad()
    def reset_kernel(self):
        self.kernel.uniform_(-1.0, 1.0)
        self.kernel.div_(self.kernel.norm(dim=0, keepdim=True).clamp_min(NORM_EPS))

    def forward(self, x):
        w = F.normalize(self.kernel, dim=0, eps=NORM_EPS)
        # Both sides are unit vectors, but rounding (and bf16) can step just outside [-1, 1].
        return (x @ w.to(x.dtype)).clamp(-1.0, 1.0)


def make_classifier(in_features, num_classes, coslinear, dropout):
    if coslinear:
        # Keys: classifier.0 (Linear to 200), classifier.1 (L2Norm), classifier.2.kernel.
        return nn.Sequential(
            nn.Linear(in_features, EMBED_DIM),
            L2Norm(),
            CosineLinear(EMBED_DIM, num_classes),
        )
    # Keys: classifier.0 (Dropout), classifier.1 (Linear).
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, num_classes))
