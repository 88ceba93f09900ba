"""Checkpoint files: atomic writes, safe loads, and fitting weights to a model with clear errors.

Formats we read:
- a bare state_dict (the original's `model_state_*.pytar`, our `model_state_{epoch:02}.pytar`);
- our wrapped files, `{"format": FORMAT, "model": state_dict, "arch": {...}, ...}`
  (`model_best.pytar`, and `last.pytar`, which also holds the full training state).
Every load is `torch.load(weights_only=True)`: a file that would run code when unpickled is refused.
"""
import os
import pickle
import re
import tempfile
import zipfile

import torch

import models
from .errors import UserError

FORMAT = "micronet-cifar100/1"
# Wrappers that add a prefix to every key: DataParallel/DDP and torch.compile.
_PREFIXES = ("module.", "_orig_mod.")


def save_atomic(obj, path):
    """Write to a temporary file in the same folder, fsync, then rename: never a half-written file."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pytar", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise UserError(f"could not write checkpoint {path}: {e.strerror or e}; free disk space "
                        "or choose another --save folder") from None
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_file(path):
    """torch.load with weights_only=True, turning every failure into one clear line."""
    if not os.path.exists(path):
        raise UserError(f"checkpoint {path} does not exist; check the path")
    if os.path.isdir(path):
        raise UserError(f"checkpoint {path} is a folder; give a .pytar file inside it")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        found = re.search(r"Unsupported global: (?:GLOBAL )?([\w.]+)", msg)
        if found:
            raise UserError(f"refusing to load {path}: unpickling it would call {found.group(1)}, which "
                            "could run code; only checkpoints holding tensors and plain values load") from None
        reason = re.search(r"WeightsUnpickler error: \s*(.+)", msg)
        detail = reason.group(1).strip().splitlines()[0] if reason else (msg.strip().splitlines() or [""])[0]
        raise UserError(f"{path} is not a readable checkpoint ({detail[:120]}); it may be truncated "
                        "or corrupt: use another file") from None
    except (EOFError, RuntimeError, zipfile.BadZipFile, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} is not a readable checkpoint ({first[:160]}); it may be truncated "
                        "or corrupt: use another file") from None


def is_state_dict(obj):
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def strip_prefixes(state):
    out = {}
    for k, v in state.items():
        for p in _PREFIXES:
            while k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


def state_dict_of(obj, path):
    """The model state_dict inside a loaded file, and our metadata (empty for a bare state_dict)."""
    if isinstance(obj, dict) and obj.get("format") == FORMAT and is_state_dict(obj.get("model")):
        return strip_prefixes(obj["model"]), obj
    if is_state_dict(obj):
        return strip_prefixes(obj), {}
    raise UserError(f"{path} holds no model weights (neither a state_dict nor a {FORMAT} file); "
                    "give a model_state_*.pytar, model_best.pytar or last.pytar")


def arch_label(arch):
    return (f"{arch['model']} (width {arch['width_mult']:g}, depth {arch['depth_mult']:g}, "
            f"{'cosine' if arch['coslinear'] else 'plain'} head)")


def _guess_arch(state):
    """Which named model (at its own scaling, either head) has exactly these keys and shapes."""
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    for name in models.names():
        for cos in (True, False):
            with torch.device("meta"):
                ref = models.create(name, coslinear=cos)
            if {k: tuple(v.shape) for k, v in ref.state_dict().items()} == shapes:
                return arch_label(models.describe(ref))
    return None


def fit_state_dict(model, state, path, meta=None):
    """Load `state` into `model`, or raise one line naming both architectures."""
    want = models.describe(model)
    arch = (meta or {}).get("arch")
    if arch and any(arch.get(k) != want[k] for k in ("model", "width_mult", "depth_mult", "coslinear",
                                                      "num_classes")):
        raise UserError(f"{path} is a checkpoint of {arch_label(arch)}, not of {arch_label(want)}; "
                        "pass the matching --model/--width-mult/--depth-mult/--coslinear")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        guess = _guess_arch(state)
        what = f"a checkpoint of {guess}" if guess else "a checkpoint of another model or width"
        detail = (f"{wrong[0]} is {tuple(state[wrong[0]].shape)} in the file, "
                  f"{tuple(own[wrong[0]].shape)} in the model" if wrong else
                  f"{len(missing)} keys missing, {len(unexpected)} unexpected, e.g. "
                  f"{(missing or unexpected)[0]}")
        raise UserError(f"{path} is {what}, not of {arch_label(want)} ({detail}); pass the matching "
                        "--model/--width-mult/--depth-mult/--coslinear")
    model.load_state_dict(state)


def load_weights(model, path):
    """Load model weights from any supported file into `model`; returns the file's metadata."""
    obj = load_file(path)
    state, meta = state_dict_of(obj, path)
    fit_state_dict(model, state, path, meta)
    return meta


def weights_file(model, **extra):
    """The wrapped format for model_best.pytar: weights plus what they are and how good they were."""
    return {"format": FORMAT, "model": model.state_dict(), "arch": models.describe(model), **extra}
