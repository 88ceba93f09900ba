"""Device-resident loaders: uint8 data lives on the device, batches are gathered and augmented there.

All training randomness is a pure function of (seed, epoch, rank) and the position in the epoch: the
epoch permutation comes from a generator seeded by hash(seed, epoch), the augmentation's draws for
all of a rank's samples of the epoch from one seeded by hash(seed, epoch, rank), made at once when
the epoch starts. A run resumed at any step therefore sees bit-identical batches without saving any
RNG state, and a sample's augmentation does not depend on the batch size.
"""
import hashlib
import math
from dataclasses import dataclass

import torch

from micronet_cifar100.errors import ConfigError, RunError

from . import augment, augment_cpu


def derive_seed(*parts):
    """A 63-bit seed from a tuple of tags and ints; hashing keeps nearby tuples' streams unrelated."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def subset(images, labels, limit, setting=None):
    """The first `limit` samples (all when limit is None). `setting` names the option the limit
    came from (e.g. "train_limit"), for the error."""
    if limit is None:
        return images, labels
    if not 0 < limit <= len(labels):
        raise ConfigError(f"sample limit {limit} is out of range: it must be 1..{len(labels)}, or unset "
                          f"for all", setting=setting)
    return images[:limit], labels[:limit]


def make_pipeline(aug, device, memory_format=torch.contiguous_format, fast=True):
    """Recipe `aug` as (images uint8 [B,3,H,W], draws [B,K]) -> normalised float images: the
    device's fast path where one exists and `fast`, else the reference definition."""
    if fast and augment_cpu.supports(aug, device):
        return augment_cpu.pipeline(aug, device, memory_format)
    return augment.pipeline(aug, device, memory_format)


def _check_data(images, labels, rank, world_size):
    if images.dtype != torch.uint8 or images.dim() != 4 or len(images) != len(labels):
        raise ValueError(f"expected uint8 images [N,C,H,W] and N labels, got {images.dtype} "
                         f"{tuple(images.shape)} and {tuple(labels.shape)}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")


def _check_batch_size(batch_size, setting):
    if batch_size <= 0:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}", setting=setting)


@dataclass(frozen=True)
class Placement:
    """Where a loader's batches go: the device, this process's rank among world_size ranks, and the
    memory format of the images."""
    device: object = "cpu"
    rank: int = 0
    world_size: int = 1
    memory_format: torch.memory_format = torch.contiguous_format


class TrainLoader:
    """Shuffled, augmented training batches (x float32 normalised [B,3,H,W], y int64), on `device`.

    An epoch is `copies(aug)` copies of the data, shuffled together; sample t of the epoch space is
    image t % N in copy t // N. Each rank takes perm[rank::world_size], cut to equal lengths.
    Call set_epoch(e) before iterating; iterate(start_step) resumes mid-epoch. `fast=False` uses
    the reference augmentation even where a faster equal one exists.
    """

    def __init__(self, images_u8, labels, batch_size, aug="uci", seed=0, place=Placement(), drop_last=False,
                 fast=True):
        device, rank, world_size, memory_format = place.device, place.rank, place.world_size, place.memory_format
        _check_batch_size(batch_size, "batch_size")
        _check_data(images_u8, labels, rank, world_size)
        self.aug = augment.recipe_name(aug)
        self.copies = augment.copies(self.aug)
        self.device = torch.device(device)
        self.images = images_u8.to(self.device)
        self.labels = labels.to(self.device, torch.int64)
        self.n = len(labels)
        # int() so a numpy or tensor seed hashes like the plain int it stands for.
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, int(seed), rank, world_size
        self.drop_last = drop_last
        self.per_rank = self.copies * self.n // world_size
        if self.per_rank == 0:
            raise ConfigError(f"{self.n} training samples cannot be split over {world_size} ranks",
                              setting="train_limit")
        self._pipeline = make_pipeline(self.aug, self.device, memory_format, fast)
        self._gen = torch.Generator(device=self.device)
        self.epoch, self._shard, self._draws = 0, None, None

    def __len__(self):
        div = self.per_rank // self.batch_size
        return div if self.drop_last else math.ceil(self.per_rank / self.batch_size)

    def set_epoch(self, epoch):
        if int(epoch) != self.epoch:
            self.epoch, self._shard, self._draws = int(epoch), None, None

    def indices(self):
        """This rank's epoch-space indices for the current epoch, in batch order ([per_rank], on device)."""
        if self._shard is None:
            # The permutation is drawn on the CPU so every rank gets the same one whatever its device.
            gen = torch.Generator().manual_seed(derive_seed("perm", self.seed, self.epoch))
            perm = torch.randperm(self.copies * self.n, generator=gen)
            shard = perm[self.rank:self.per_rank * self.world_size:self.world_size]
            self._shard = shard.to(self.device)
        return self._shard

    def draws(self):
        """This rank's augmentation draws for the current epoch: float [per_rank, K], a row per
        sample in batch order (see augment.draw)."""
        if self._draws is None:
            # manual_seed only resets the generator's state, so this never waits for the device.
            self._gen.manual_seed(derive_seed("aug", self.seed, self.epoch, self.rank))
            copy_id = torch.div(self.indices(), self.n, rounding_mode="floor")
            self._draws = augment.draw(self.aug, copy_id, self._gen, self.images.shape[2:])
        return self._draws

    def iterate(self, start_step=0):
        """Batches of the current epoch from `start_step` on; equal to the tail of a full pass."""
        if not 0 <= start_step <= len(self):
            raise RunError(f"cannot resume at step {start_step}: an epoch has {len(self)} steps; "
                           f"the checkpoint does not match this batch size / data / world size")
        return self._batches(start_step)

    def __iter__(self):
        return self.iterate(0)

    def _batches(self, start_step):
        shard, draws, bs = self.indices(), self.draws(), self.batch_size
        for step in range(start_step, len(self)):
            src = torch.remainder(shard[step * bs:(step + 1) * bs], self.n)
            x = self._pipeline(self.images.index_select(0, src), draws[step * bs:(step + 1) * bs])
            yield x, self.labels.index_select(0, src)


class EvalLoader:
    """In-order batches with normalisation only. With several ranks each gets a contiguous slice
    [start, stop), so every image is evaluated exactly once in total (slices may differ by one)."""

    def __init__(self, images_u8, labels, batch_size, place=Placement()):
        device, rank, world_size, memory_format = place.device, place.rank, place.world_size, place.memory_format
        _check_batch_size(batch_size, "eval_batch_size")
        _check_data(images_u8, labels, rank, world_size)
        n = len(labels)
        self.start, self.stop = n * rank // world_size, n * (rank + 1) // world_size
        self.device = torch.device(device)
        self.images = images_u8[self.start:self.stop].to(self.device)
        self.labels = labels[self.start:self.stop].to(self.device, torch.int64)
        self.batch_size = batch_size
        self._pipeline = augment.pipeline("none", self.device, memory_format)

    def __len__(self):
        return math.ceil((self.stop - self.start) / self.batch_size)

    def __iter__(self):
        for i in range(0, self.stop - self.start, self.batch_size):
            yield self._pipeline(self.images[i:i + self.batch_size], None), self.labels[i:i + self.batch_size]
