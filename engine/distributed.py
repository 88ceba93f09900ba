"""torch.distributed set-up for torchrun (NCCL on GPUs, gloo on CPUs) and the few collectives we use."""
import datetime
import os

import torch
import torch.distributed as dist

from micronet_cifar100 import errors


class Context:
    def __init__(self, rank=0, world_size=1, local_rank=0, device=torch.device("cpu")):
        self.rank, self.world_size, self.local_rank, self.device = rank, world_size, local_rank, device

    @property
    def distributed(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0


def pick_device(name, local_rank=0):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise errors.ConfigError("CUDA was asked for but no CUDA GPU is available; use cpu or auto",
                                     setting="device")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if name == "cpu":
        return torch.device("cpu")
    raise errors.ConfigError(f"unknown device {name!r}; use auto, cpu or cuda", setting="device")


def setup(device_name):
    """Read torchrun's environment; start the process group when there is more than one rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name, local_rank)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=30))
    return Context(rank, world, local_rank, device)


def teardown():
    if dist.is_initialized():
        dist.destroy_process_group()


def is_distributed():
    return dist.is_initialized() and dist.get_world_size() > 1


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def all_reduce_sum(tensor):
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag, device):
    """True on every rank when the flag is set on at least one (so all ranks stop together)."""
    if not dist.is_initialized():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_object(obj, src=0):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj):
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier():
    if dist.is_initialized():
        dist.barrier()
