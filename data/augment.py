"""Augmentation recipes as data, and the small batched ops they are made of (the reference definition).

Images are float [B,3,H,W] in [0,1], on any device. Each op is two functions: `draw_<op>` makes the
op's random choices for n samples at once, on the generator's device, and `<op>` applies given
choices to a batch. One row per sample, one column per choice: the choices of all of a recipe's ops
are the columns of one float tensor `draws` [n, K], so any slice of rows is a sub-batch's draws.

A recipe is a tuple of copies of the training set that one epoch holds; a copy is a dict
{op name: the op's numbers}. Samples of every copy share a batch, so each op of a recipe runs on
every sample, with numbers under which it changes nothing (`Op.identity`) for copies that lack it.
Ops run in the order of `OPS`. A device's fast path (augment_cpu.py) must equal `pipeline` here.
"""
from functools import lru_cache
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from micronet_cifar100.errors import ConfigError

from .cifar import MEAN, STD

_GREY = (0.2989, 0.587, 0.114)  # torchvision's grey-level weights of R, G, B


# ---------------------------------------------------------------- ColorJitter(brightness, contrast)


def draw_jitter(numbers, gen, size):
    """ColorJitter's choices [n,3]: brightness and contrast factors ~ U[max(0, 1-v), 1+v], contrast first?"""
    lo = (1 - numbers).clamp(min=0)  # numbers [n,2] = (brightness, contrast)
    u = torch.rand(len(numbers), 3, generator=gen, device=gen.device)
    # Of torchvision's random order of its four ops, only the order of these two matters: a coin.
    return torch.cat((lo + u[:, :2] * (1 + numbers - lo), (u[:, 2:] < 0.5).float()), 1)


def grey_mean(x):
    """Each image's mean grey level [B] (what torchvision's contrast blends towards)."""
    m = x.mean((2, 3))  # the grey image's mean is the weighted sum of the channel means
    return _GREY[0] * m[:, 0] + _GREY[1] * m[:, 1] + _GREY[2] * m[:, 2]


def brightness(x, f):
    return (x * f).clamp(0, 1)


def contrast(x, f):
    return (x * f + (1 - f) * grey_mean(x).view(-1, 1, 1, 1)).clamp(0, 1)


def jitter(x, choices):
    """Brightness and contrast by per-sample factors, in each sample's drawn order."""
    b, c, first = (choices[:, i].view(-1, 1, 1, 1) for i in range(3))
    first = first.bool()
    x = torch.where(first, contrast(x, c), brightness(x, b))
    return torch.where(first, brightness(x, b), contrast(x, c))


# ---------------------------------------------------------------- RandomResizedCrop(size of the input)


def draw_crop(numbers, gen, size, attempts=10):
    """RandomResizedCrop.get_params's boxes [n,4] (top, left, h, w): numbers [n,4] = scale lo/hi, ratio lo/hi.

    All `attempts` candidates are drawn at once and the first that fits is kept; a sample where none
    fits gets torchvision's fallback, the central crop with its aspect ratio clamped to the range.
    """
    (height, width), dev, n = size, gen.device, len(numbers)
    s_lo, s_hi, r_lo, r_hi = numbers.T[:, :, None]  # each [n,1]
    u = torch.rand(2, n, attempts, generator=gen, device=dev)
    area = height * width * (s_lo + u[0] * (s_hi - s_lo))
    aspect = torch.exp(r_lo.log() + u[1] * (r_hi.log() - r_lo.log()))  # log-uniform, as torchvision
    w, h = (area * aspect).sqrt().round(), (area / aspect).sqrt().round()  # halves to even, as round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.uint8).argmax(1, keepdim=True)  # argmax returns the first maximum
    w, h, found = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0], fits.any(1)
    r_lo, r_hi = r_lo[:, 0], r_hi[:, 0]
    w = torch.where(found, w, torch.where(width / height > r_hi, (height * r_hi).round(), float(width)))
    h = torch.where(found, h, torch.where(width / height < r_lo, (width / r_lo).round(), float(height)))
    v = torch.rand(2, n, generator=gen, device=dev)
    # floor(v * k) is uniform on 0..k-1; the minimum guards against float32 rounding v * k up to k.
    top = torch.where(found, torch.minimum((v[0] * (height - h + 1)).floor(), height - h),
                      ((height - h) / 2).floor())
    left = torch.where(found, torch.minimum((v[1] * (width - w + 1)).floor(), width - w),
                       ((width - w) / 2).floor())
    return torch.stack((top, left, h, w), 1)


def crop_coords(start, length, out):
    """Pixel coordinates [B,out] where torch's bilinear resize (align_corners=False) of the crops
    [start, start+length) to `out` pixels reads, clamped to the crop (start, length: float [B])."""
    centres = torch.arange(out, device=start.device, dtype=start.dtype) + 0.5
    src = (centres * (length[:, None] / out) - 0.5).clamp(min=0)
    return torch.minimum(src, length[:, None] - 1) + start[:, None]


def resized_crop(x, choices):
    """Crop each sample to its box and resize it bilinearly to the input size, in one grid_sample:
    sampling where torch's resize of the cropped image reads equals torchvision's resized_crop."""
    (B, _, H, W), (top, left, h, w) = x.shape, choices.T
    grid = torch.empty(B, H, W, 2, device=x.device, dtype=x.dtype)
    grid[..., 0] = ((2 * crop_coords(left, w, W) + 1) / W - 1)[:, None, :]  # pixel -> [-1, 1]
    grid[..., 1] = ((2 * crop_coords(top, h, H) + 1) / H - 1)[:, :, None]
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


# ---------------------------------------------------------------- RandomCrop(size, padding) and flip


def draw_shift(numbers, gen, size):
    """RandomCrop(size, padding=pad)'s offsets as shifts [n,2] (dy, dx) in -pad..pad: numbers [n,1] = pad."""
    k = 2 * numbers + 1
    u = torch.rand(len(numbers), 2, generator=gen, device=gen.device)
    return torch.minimum((u * k).floor(), k - 1) - numbers  # floor(u*k) uniform on 0..k-1, as above


def shift(x, choices):
    """Zero-pad and crop back to size at the drawn offsets: each pixel moves by (dy, dx), zeros fill in."""
    B, C, H, W = x.shape
    rows = torch.arange(H, device=x.device) + choices[:, :1].long()  # [B,H]: where output row i reads
    cols = torch.arange(W, device=x.device) + choices[:, 1:].long()
    inside = ((rows >= 0) & (rows < H))[:, None, :, None] & ((cols >= 0) & (cols < W))[:, None, None, :]
    b = torch.arange(B, device=x.device).view(B, 1, 1, 1)
    c = torch.arange(C, device=x.device).view(1, C, 1, 1)
    read = x[b, c, rows.clamp(0, H - 1)[:, None, :, None], cols.clamp(0, W - 1)[:, None, None, :]]
    return torch.where(inside, read, 0.0)


def draw_flip(numbers, gen, size):
    """RandomHorizontalFlip(p)'s choices [n,1]: 1 where the sample is mirrored; numbers [n,1] = p."""
    return (torch.rand(len(numbers), 1, generator=gen, device=gen.device) < numbers).float()


def flip(x, choices):
    return torch.where(choices.view(-1, 1, 1, 1).bool(), x.flip(-1), x)


# ---------------------------------------------------------------- ops and recipes


class Op(NamedTuple):
    identity: tuple  # its numbers for a copy that lacks it: the op then leaves images unchanged
    columns: int     # c, how many choices it makes per sample
    draw: Callable   # (numbers [n,k], generator, (H, W)) -> choices [n,c]
    apply: Callable  # (images [B,3,H,W], choices [B,c]) -> images


# In the order they apply.
OPS = {
    "jitter": Op((0.0, 0.0), 3, draw_jitter, jitter),               # brightness, contrast
    "crop": Op((1.0, 1.0, 1.0, 1.0), 4, draw_crop, resized_crop),   # scale lo, hi, ratio lo, hi
    "shift": Op((0.0,), 2, draw_shift, shift),                      # padding
    "flip": Op((0.0,), 1, draw_flip, flip),                         # probability
}

RECIPES = {
    # The original entry's enlarged epoch: three copies of the training set, each its own transform.
    "uci": ({"jitter": (0.2, 0.2), "flip": (0.5,)},
            {"jitter": (0.4, 0.4), "crop": (0.3, 1.0, 0.8, 1.2), "flip": (0.5,)},
            {"crop": (0.08, 1.0, 3 / 4, 4 / 3), "flip": (0.5,)}),  # RandomResizedCrop's defaults
    "standard": ({"shift": (4.0,), "flip": (0.5,)},),  # pad 4 + random crop + flip
    "none": ({},),
}
AUG_RECIPES = tuple(RECIPES)
ALIASES = {"seed": "uci"}  # the recipe's old name


def recipe_name(aug):
    """The recipe `aug` names (an alias resolved); ConfigError if there is none."""
    name = ALIASES.get(aug, aug)
    if name not in RECIPES:
        raise ConfigError(f"unknown augmentation recipe {aug!r}; choose one of {', '.join(AUG_RECIPES)}",
                          setting="aug")
    return name


def copies(aug):
    """How many augmented copies of the training set one epoch holds under recipe `aug`."""
    return len(RECIPES[recipe_name(aug)])


def ops(aug):
    """The names of the ops recipe `aug` runs on every sample, in order."""
    recipe = RECIPES[recipe_name(aug)]
    return tuple(name for name in OPS if any(name in copy for copy in recipe))


@lru_cache(maxsize=None)
def _numbers(aug, name, device):
    """Op `name`'s numbers for each copy of recipe `aug`, [copies, k] on device (made once: a host
    copy at every epoch could wait on the device)."""
    rows = [copy.get(name, OPS[name].identity) for copy in RECIPES[aug]]
    return torch.tensor(rows, dtype=torch.float32, device=device)


def draw(aug, copy_id, gen, size=(32, 32)):
    """Every random choice recipe `aug` makes for samples of copies `copy_id` [n] (on gen's device):
    float [n, K], each op's columns in turn. A whole epoch's draws cost a few dozen small ops."""
    aug = recipe_name(aug)
    cols = [OPS[name].draw(_numbers(aug, name, gen.device).index_select(0, copy_id), gen, tuple(size))
            for name in ops(aug)]
    return torch.cat(cols, 1) if cols else torch.zeros(len(copy_id), 0, device=gen.device)


def apply(aug, x, draws):
    """Recipe `aug` on float images x [B,3,H,W] in [0,1], with its choices `draws` [B,K] (see `draw`)."""
    col = 0
    for op in (OPS[name] for name in ops(aug)):
        x = op.apply(x, draws[:, col:col + op.columns])
        col += op.columns
    return x


def pipeline(aug, device, memory_format=torch.contiguous_format):
    """Recipe `aug` as a function (images uint8 [B,3,H,W], draws [B,K]) -> normalised float images
    (x / 255 augmented - MEAN) / STD in `memory_format`, on `device`."""
    aug = recipe_name(aug)
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)  # made once, not per batch
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1)

    def run(images_u8, draws):
        x = apply(aug, images_u8.float().div_(255), draws)  # a new tensor: normalised in place
        return x.sub_(mean).div_(std).contiguous(memory_format=memory_format)

    return run
