"""A CPU fast path for recipes of ColorJitter, RandomResizedCrop and flip (`uci`), behind the same
interface as `augment.pipeline` and equal to it up to float rounding (tests/test_data.py checks);
bench/augmentation.py measures the gain. Three tricks:

- Brightness and contrast are each y = clamp(a*x + k*grey_mean(x), 0, 1) per sample, so the jitter
  is two such passes in the drawn order, with /255 folded into the first and the normalisation
  into the second (clamping to [0,1] and then normalising is clamping the normalised value).
- Bilinear resizing is separable: each sample's crop + resize + flip is two matmuls by per-sample
  interpolation matrices, batched as bmm; the second one's operand order writes channels_last.
- The batch goes in slices of 128 samples per thread, each converted, jittered and resized while
  it is still in cache.
"""
import torch

from . import augment
from .cifar import MEAN, STD

_OPS = ("jitter", "crop", "flip")
_SLICE = 128  # samples per slice and thread; 2 threads x 128 measured 10% faster than 128 in all


def supports(aug, device):
    """Whether this path runs recipe `aug` on `device`."""
    return torch.device(device).type == "cpu" and augment.ops(aug) == _OPS


def interp_matrices(start, length, size, flip=None):
    """Per-sample bilinear resize matrices [B,size,size] of the crops [start, start+length) (float
    [B]), row o holding output pixel o's weights; rows reversed where `flip` [B] (bool) is true."""
    src = augment.crop_coords(start, length, size)
    if flip is not None:
        src = torch.where(flip[:, None], src.flip(-1), src)  # a mirrored output reads right to left
    # Bilinear reading at src weighs input pixel i by the tent max(0, 1 - |src - i|).
    return (src[:, :, None] - torch.arange(size, dtype=src.dtype)).abs_().neg_().add_(1).clamp_(min=0)


def pipeline(aug, device="cpu", memory_format=torch.contiguous_format):
    """`augment.pipeline(aug, device, memory_format)`, fast; needs `supports(aug, device)`."""
    if not supports(aug, device):
        raise ValueError(f"the CPU fast path does not run recipe {aug!r} on {device}")
    mean, std = torch.tensor(MEAN), torch.tensor(STD)
    b2, lo, hi = -mean / std, (-mean / std).view(1, 3, 1, 1), ((1 - mean) / std).view(1, 3, 1, 1)
    widths = [augment.OPS[name].columns for name in _OPS]

    def run(images_u8, draws):
        B, C, H, W = images_u8.shape
        (b, c, first), (top, left, h, w), (flip,) = (d.T for d in draws.split(widths, 1))
        first = first.bool()
        # Brightness is (a, k) = (f, 0), contrast (f, 1 - f); pass 1 reads 0..255.
        a1, k1 = torch.where(first, c, b) / 255, torch.where(first, 1 - c, 0.0) / 255
        a2, k2 = torch.where(first, b, c)[:, None] / std, torch.where(first, 0.0, 1 - c)[:, None] / std
        ry, rx = interp_matrices(top, h, H), interp_matrices(left, w, W, flip.bool())
        step = _SLICE * torch.get_num_threads()
        width_pass = torch.empty(min(step, B), W, C * H)  # one slice's, reused: it stays in cache
        out = torch.empty(B, H, W * C)
        for s in range(0, B, step):
            p, n = slice(s, s + step), min(step, B - s)
            x = images_u8[p].float()
            o1 = k1[p] * augment.grey_mean(x)  # offsets first: the passes below work in place
            x.mul_(a1[p].view(-1, 1, 1, 1)).add_(o1.view(-1, 1, 1, 1)).clamp_(0, 1)
            o2 = k2[p] * augment.grey_mean(x)[:, None] + b2
            x.mul_(a2[p].view(-1, C, 1, 1)).add_(o2.view(-1, C, 1, 1)).clamp_(lo, hi)
            torch.bmm(rx[p], x.view(n, C * H, W).transpose(1, 2), out=width_pass[:n])  # [n, W', C*H]
            torch.bmm(ry[p], width_pass[:n].view(n, W * C, H).transpose(1, 2), out=out[p])  # [n, H', W'*C]
        return out.view(B, H, W, C).permute(0, 3, 1, 2).contiguous(memory_format=memory_format)

    return run
