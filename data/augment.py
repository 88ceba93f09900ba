"""Batched augmentation on float images [B,3,H,W] in [0,1], on the batch's device.

Every sample gets its own random parameters, drawn from an explicit torch.Generator that lives on the
batch's device, so results are reproducible and nothing waits on the host. Parameters such as
brightness or crop scale may be a float or a per-sample tensor, which lets one pass serve a batch whose
samples follow different recipes.
"""
import torch
import torch.nn.functional as F

from engine.errors import UserError

AUG_RECIPES = ("seed", "standard", "none")
_COPIES = {"seed": 3, "standard": 1, "none": 1}

# The "seed" recipe's copies of the training set, one row each: brightness, contrast, scale lo/hi,
# ratio lo/hi. Jitter 0 and scale = ratio = (1, 1) make an op the identity for copies that lack it.
_SEED_TABLE = (
    (0.2, 0.2, 1.0, 1.0, 1.0, 1.0),            # ColorJitter(.2, .2) + hflip
    (0.4, 0.4, 0.3, 1.0, 0.8, 1.2),            # ColorJitter(.4, .4) + RandomResizedCrop(.3-1, .8-1.2) + hflip
    (0.0, 0.0, 0.08, 1.0, 3 / 4, 4 / 3),       # RandomResizedCrop (torchvision defaults) + hflip
)


def copies(aug):
    """How many augmented copies of the training set one epoch holds under recipe `aug`."""
    if aug not in _COPIES:
        raise UserError(f"unknown --aug {aug!r}; choose one of {', '.join(AUG_RECIPES)}")
    return _COPIES[aug]


def _per_sample(value, n, device):
    """A float or a [n] tensor -> a [n] float tensor on device (a fill kernel, not a host copy)."""
    if torch.is_tensor(value):
        return value.to(torch.float32)
    return torch.full((n,), float(value), device=device)


def _bounds(pair, n, device):
    """A (lo, hi) pair of floats or an [n,2] tensor -> two [n,1] tensors."""
    if torch.is_tensor(pair):
        pair = pair.to(torch.float32)
        return pair[:, 0:1], pair[:, 1:2]
    return (torch.full((n, 1), float(pair[0]), device=device),
            torch.full((n, 1), float(pair[1]), device=device))


def jitter_params(n, brightness, contrast, gen):
    """Per-sample (brightness factor, contrast factor, contrast-first flag), as torchvision's ColorJitter."""
    dev = gen.device
    b, c = _per_sample(brightness, n, dev), _per_sample(contrast, n, dev)
    u = torch.rand(3, n, generator=gen, device=dev)
    b_lo, c_lo = (1 - b).clamp(min=0), (1 - c).clamp(min=0)
    return b_lo + u[0] * (1 + b - b_lo), c_lo + u[1] * (1 + c - c_lo), u[2] < 0.5


def _blend(x, factor, use_mean):
    # Brightness is a blend towards black and contrast a blend towards the grey mean, so both are
    # f*x + (1-f)*m with m = 0 or the mean; one formula lets samples pick either op in the same pass.
    grey = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    mean = grey.mean(dim=(1, 2)) * use_mean
    f = factor.view(-1, 1, 1, 1)
    return (f * x + (1 - f) * mean.view(-1, 1, 1, 1)).clamp_(0, 1)


def apply_jitter(x, brightness_factor, contrast_factor, contrast_first):
    """Brightness and contrast with given per-sample factors, in the given per-sample order."""
    first = torch.where(contrast_first, contrast_factor, brightness_factor)
    second = torch.where(contrast_first, brightness_factor, contrast_factor)
    x = _blend(x, first, contrast_first.to(x.dtype))
    return _blend(x, second, (~contrast_first).to(x.dtype))


def color_jitter(x, brightness, contrast, gen):
    """ColorJitter(brightness, contrast) per sample: factors ~ U[max(0, 1-v), 1+v], random op order."""
    return apply_jitter(x, *jitter_params(x.shape[0], brightness, contrast, gen))


def crop_boxes(n, height, width, scale, ratio, gen, attempts=10):
    """Per-sample crop boxes (top, left, h, w) as int64 [n], sampled like RandomResizedCrop.get_params.

    All `attempts` candidates are drawn at once and the first that fits is kept; samples where none
    fits get torchvision's fallback, the central crop with its aspect ratio clamped to `ratio`.
    """
    dev = gen.device
    s_lo, s_hi = _bounds(scale, n, dev)
    r_lo, r_hi = _bounds(ratio, n, dev)
    u = torch.rand(2, n, attempts, generator=gen, device=dev)
    area = height * width * (s_lo + u[0] * (s_hi - s_lo))
    log_lo, log_hi = r_lo.log(), r_hi.log()
    aspect = torch.exp(log_lo + u[1] * (log_hi - log_lo))
    # torch.round, like Python's round, rounds halves to even.
    w = torch.sqrt(area * aspect).round()
    h = torch.sqrt(area / aspect).round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # argmax returns the first maximum
    w, h, found = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0], fits.any(dim=1)

    r_lo, r_hi, in_ratio = r_lo[:, 0], r_hi[:, 0], width / height
    fallback_w = torch.where(in_ratio > r_hi, (height * r_hi).round(), float(width))
    fallback_h = torch.where(in_ratio < r_lo, (width / r_lo).round(), float(height))
    w, h = torch.where(found, w, fallback_w), torch.where(found, h, fallback_h)

    v = torch.rand(2, n, generator=gen, device=dev)
    # floor(v * k) is uniform on 0..k-1; the minimum guards against float32 rounding v * k up to k.
    top = torch.minimum((v[0] * (height - h + 1)).floor(), height - h)
    left = torch.minimum((v[1] * (width - w + 1)).floor(), width - w)
    top = torch.where(found, top, ((height - h) / 2).floor())
    left = torch.where(found, left, ((width - w) / 2).floor())
    return top.long(), left.long(), h.long(), w.long()


def resized_crop(x, top, left, h, w, size=None):
    """Crop each sample to its box and resize it bilinearly to `size`, in one grid_sample call.

    Sample points are where torch's bilinear resize (align_corners=False) of the cropped image would
    read, clamped to the box, so the result equals torchvision's resized_crop on an upscale.
    """
    B, _, H, W = x.shape
    out_h, out_w = size if size is not None else (H, W)

    def axis(start, length, out, full):
        centres = torch.arange(out, device=x.device, dtype=x.dtype) + 0.5
        length = length.to(x.dtype)[:, None]
        src = (centres * (length / out) - 0.5).clamp(min=0)
        src = torch.minimum(src, length - 1) + start.to(x.dtype)[:, None]
        return (2 * src + 1) / full - 1  # pixel coordinate -> grid_sample's [-1, 1] (align_corners=False)

    gx = axis(left, w, out_w, W)[:, None, :].expand(B, out_h, out_w)
    gy = axis(top, h, out_h, H)[:, :, None].expand(B, out_h, out_w)
    grid = torch.stack((gx, gy), dim=-1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def random_resized_crop(x, scale, ratio, gen):
    """RandomResizedCrop to the input size, with per-sample boxes (see `crop_boxes`)."""
    B, _, H, W = x.shape
    return resized_crop(x, *crop_boxes(B, H, W, scale, ratio, gen))


def hflip(x, p=0.5, *, gen):
    """Mirror each sample left-right with probability p."""
    flip = torch.rand(x.shape[0], generator=gen, device=x.device) < p
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


def pad_crop(x, pad=4, *, gen):
    """Zero-pad by `pad` then take a random crop of the original size, per sample."""
    B, C, H, W = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    shift = torch.randint(0, 2 * pad + 1, (2, B), generator=gen, device=x.device)
    rows = shift[0, :, None] + torch.arange(H, device=x.device)
    cols = shift[1, :, None] + torch.arange(W, device=x.device)
    b = torch.arange(B, device=x.device).view(B, 1, 1, 1)
    c = torch.arange(C, device=x.device).view(1, C, 1, 1)
    return padded[b, c, rows[:, None, :, None], cols[:, None, None, :]]


def make_augment(aug, device):
    """The recipe `aug` as a function (x, copy_id, gen) -> x, where copy_id [B] says which copy of
    the training set each sample belongs to (always 0 for one-copy recipes)."""
    copies(aug)
    if aug == "none":
        return lambda x, copy_id, gen: x
    if aug == "standard":
        return lambda x, copy_id, gen: hflip(pad_crop(x, 4, gen=gen), 0.5, gen=gen)
    table = torch.tensor(_SEED_TABLE, dtype=torch.float32, device=device)  # built once, not per batch

    def seed(x, copy_id, gen):
        p = table.index_select(0, copy_id)
        x = color_jitter(x, p[:, 0], p[:, 1], gen)
        x = random_resized_crop(x, p[:, 2:4], p[:, 4:6], gen)
        return hflip(x, 0.5, gen=gen)

    return seed
