"""The checkpoint file format, in one place: atomic writes, safe loads, checksums, and fitting
weights to a model.

Formats we read:
- a bare state_dict (the original entry's `model_state_*.pytar`, our `model_state_{epoch:02}.pytar`);
- our wrapped files, `{"format": FORMAT, "model": state_dict, "arch": {...}, "checksum": ..., ...}`
  (`model_best.pytar`, and `last.pytar`, which also holds the full training state).
Every load is `torch.load(weights_only=True)`: a file that would run code when unpickled is refused.
A wrapped file carries a checksum of all its tensors and plain values, verified on every load, so
flipped bytes inside tensor data are caught instead of resumed from.

Every write is atomic: a uniquely named temporary file in the same folder, fsync, rename, fsync of
the folder. The file under its real name is always whole, old or new; any OSError (disk full, no
inodes, permissions) becomes a StorageError and leaves the previous file as it was, and no
temporary behind (a killed write leaves one, which run_folder.remove_temporaries clears).
"""
import hashlib
import os
import pickle
import pickletools
import re
import tempfile
import zipfile

import torch

import compress
from micronet_cifar100 import errors
import models

# The wrapped files' layout, versioned: /2 stores a mid-epoch meter as its five named sums (meter.FIELDS);
# /1 files, still read, may hold the four sums written before the meter had names.
FORMAT = "micronet-cifar100/2"
FORMAT_V1 = "micronet-cifar100/1"
FORMATS = (FORMAT, FORMAT_V1)

TMP_PREFIX = ".tmp-"


def write_atomic(path, write, binary=True):
    """Call write(f) on a temporary file, then put it in place of `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=".part", dir=folder)
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        fsync_dir(folder)
    except OSError as e:
        raise errors.storage_error(path, e) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def fsync_dir(folder):
    """Make a rename inside `folder` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_atomic(obj, path):
    """torch.save `obj` to `path` atomically (write_atomic)."""
    write_atomic(path, lambda f: torch.save(obj, f))


def checksum(obj):
    """BLAKE2b over every tensor's dtype, shape and bytes and every plain value, in a fixed order."""
    h = hashlib.blake2b(digest_size=16)

    def walk(x):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, dict):
            keys = sorted((k for k in x if k != "checksum"), key=repr)
            h.update(b"D%d" % len(keys))
            for k in keys:
                h.update(repr(k).encode())
                walk(x[k])
        elif isinstance(x, (list, tuple)):
            h.update(b"L%d" % len(x))
            for v in x:
                walk(v)
        else:
            h.update(repr(x).encode())

    walk(obj)
    return h.hexdigest()


def with_checksum(obj):
    """A wrapped file's dict with its checksum added (the checksum covers everything else)."""
    return {**obj, "checksum": checksum(obj)}


def load_file(path, mmap=False):
    """torch.load with weights_only=True, turning every failure into one clear error."""
    if not os.path.exists(path):
        raise errors.CheckpointError(f"checkpoint {path} does not exist")
    if os.path.isdir(path):
        raise errors.CheckpointError(f"checkpoint {path} is a folder; give a .pytar file inside it")
    if not os.access(path, os.R_OK):
        raise errors.CheckpointError(f"checkpoint {path} cannot be read: permission denied")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: (?:GLOBAL )?([\w.]+)", str(e))
        callable_name = found.group(1) if found else _named_callable(path)
        if callable_name:
            raise errors.UnsafeCheckpoint(
                f"refusing to load {path}: unpickling it would call {callable_name}, which could run code; "
                "only checkpoints holding tensors and plain values load") from None
        detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(e))
        raise errors.CheckpointError(f"{path} is not a readable checkpoint "
                                     f"({detail.group(1).strip() if detail else errors.first_line(e)}); it may be "
                                     "truncated or corrupt: use another file") from None
    except PermissionError:
        raise errors.CheckpointError(f"checkpoint {path} cannot be read: permission denied") from None
    except (EOFError, RuntimeError, zipfile.BadZipFile, ValueError, OSError, KeyError, IndexError) as e:
        # KeyError/IndexError: torch's legacy (non-zip) reader on bytes that are no pickle at all.
        detail = "not a PyTorch file" if isinstance(e, (KeyError, IndexError)) else errors.first_line(e)
        raise errors.CheckpointError(f"{path} is not a readable checkpoint ({detail}); it may be "
                                     "truncated or corrupt: use another file") from None
    if isinstance(obj, dict) and obj.get("format") in FORMATS and "checksum" in obj:
        if checksum(obj) != obj["checksum"]:
            raise errors.CheckpointError(f"{path} is damaged: its contents do not match their checksum; "
                                         "use another file (a run resumes from an intact last.pytar)")
    return obj


def is_wrapped(obj):
    """Whether `obj` is one of our wrapped files (any FORMATS version)."""
    return isinstance(obj, dict) and obj.get("format") in FORMATS


def is_training_state(obj):
    """Whether `obj` is a last.pytar: a wrapped file with the training position."""
    return is_wrapped(obj) and "train" in obj


def upgrade(obj):
    """A wrapped file in the current layout (FORMAT): a /1 last.pytar's mid-epoch meter with four sums
    (loss, correct, count, agree) gets the five of meter.FIELDS (loss, correct, correct5, agree,
    count; no top-5 in training). Returns obj, changed in place."""
    if is_training_state(obj) and obj["format"] == FORMAT_V1:
        partial = obj["train"].get("partial")
        if partial is not None and torch.as_tensor(partial["sums"]).numel() == 4:
            sums = torch.as_tensor(partial["sums"], dtype=torch.float64)
            zero = torch.zeros((), dtype=torch.float64)
            partial["sums"] = torch.stack([sums[0], sums[1], zero, sums[3], sums[2]])
        obj["format"] = FORMAT
    return obj


def _named_callable(path):
    """The first callable a pickle names (GLOBAL / STACK_GLOBAL), read with pickletools, which parses
    opcodes without running any; None for a file that names none or is no pickle at all."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                name = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
                raw = z.read(name) if name else b""
        else:
            with open(path, "rb") as f:
                raw = f.read(1 << 20)
        strings = []
        for op, arg, _ in pickletools.genops(raw):
            if op.name == "GLOBAL":
                return str(arg).replace(" ", ".")
            if op.name == "STACK_GLOBAL" and len(strings) >= 2:
                return f"{strings[-2]}.{strings[-1]}"
            if isinstance(arg, str):
                strings.append(arg)
    except Exception:  # not a pickle, or cut short: nothing to name
        return None
    return None


def is_state_dict(obj):
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def strip_prefixes(state):
    """Keys without the prefixes DataParallel/DDP and torch.compile add (compress.bare_name)."""
    return {compress.bare_name(k): v for k, v in state.items()}


def state_dict_of(obj, path):
    """The model state_dict inside a loaded file, and our metadata (empty for a bare state_dict)."""
    if is_wrapped(obj) and is_state_dict(obj.get("model")):
        # last.pytar keeps the training statistics for resuming, and beside them the BatchNorm
        # statistics its last evaluation used (engine.precise_bn): weights are evaluated with those.
        return {**strip_prefixes(obj["model"]), **(obj.get("eval_bn") or {})}, obj
    if is_state_dict(obj):
        return strip_prefixes(obj), {}
    raise errors.CheckpointError(f"{path} holds no model weights (neither a state_dict nor a {FORMAT} "
                                 "file); give a model_state_*.pytar, model_best.pytar or last.pytar")


def fit_state_dict(model, state, path, meta=None):
    """Load `state` into `model`, or raise one line naming both architectures."""
    want = models.describe(model)
    arch = (meta or {}).get("arch")
    if arch and any(arch.get(k) != want[k] for k in ("model", "width_mult", "depth_mult", "coslinear",
                                                      "num_classes")):
        raise errors.ArchitectureMismatch(f"{path} is a checkpoint of {models.label(arch)}, not of "
                                          f"{models.label(want)}")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        guess = models.identify(state)
        what = f"a checkpoint of {models.label(guess)}" if guess else "a checkpoint of another model or width"
        detail = (f"{wrong[0]} is {tuple(state[wrong[0]].shape)} in the file, "
                  f"{tuple(own[wrong[0]].shape)} in the model" if wrong else
                  f"{len(missing)} keys missing, {len(unexpected)} unexpected, e.g. "
                  f"{(missing or unexpected)[0]}")
        raise errors.ArchitectureMismatch(f"{path} is {what}, not of {models.label(want)} ({detail})")
    check_finite(state, path)
    model.load_state_dict(state)


def check_finite(state, path):
    """Refuse weights or buffers holding NaN or inf: a model loaded from them computes nothing but
    NaN, and a bare state_dict has no checksum that would say it is damaged."""
    for key, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise errors.CheckpointError(f"{path} holds {bad} non-finite value{'s' if bad > 1 else ''} (NaN or "
                                         f"inf) in {key}; these weights are damaged: use another checkpoint")


# The settings that say which model a checkpoint holds, as models.describe() names them.
ARCH_KEYS = ("model", "width_mult", "depth_mult", "coslinear")


def arch_of(path):
    """The architecture in a checkpoint file (a models.describe() dict): the one our wrapped files
    record, else the registered model at its own scaling whose keys and shapes a bare state_dict has
    (models.identify); None when the file does not tell (e.g. a narrow model's bare state_dict)."""
    state, meta = state_dict_of(load_file(path), path)
    return meta.get("arch") or models.identify(state)


def resolve_arch(path, given, settings=ARCH_KEYS):
    """The architecture to build for the checkpoint `path`: `given` ({ARCH_KEYS key: value or None,
    None where the user gave nothing}) completed from the file's own (arch_of). A given value that
    contradicts the file raises ConfigError with the setting's name (`settings`, aligned with
    ARCH_KEYS: a teacher's are label_refinery_*). Returns {ARCH_KEYS key: value}; values the file
    cannot tell stay None (the caller's defaults apply)."""
    arch = arch_of(path)
    if arch is None:
        return {k: given.get(k) for k in ARCH_KEYS}
    for key, setting in zip(ARCH_KEYS, settings):
        value = given.get(key)
        if value is not None and value != arch[key]:
            raise errors.ConfigError(f"{_word(key, value)} contradicts {path}, a checkpoint of {models.label(arch)}; "
                                     "leave it out (the file says which model it holds) or give the file's value",
                                     setting=setting)
    return {k: arch[k] for k in ARCH_KEYS}


def _word(key, value):
    if key == "coslinear":
        return "a cosine head" if value else "a linear head"
    return f"{key.replace('_mult', '')} {value:g}" if isinstance(value, float) else f"{key} {value}"


def load_weights(model, path):
    """Load model weights from any supported file into `model`; returns the file's metadata. A
    compressed checkpoint's record (bits, input ranges, masks) is applied: `model` then computes with
    the quantised numerics it was trained with (its layers are replaced in place)."""
    obj = load_file(path)
    state, meta = state_dict_of(obj, path)
    fit_state_dict(model, state, path, meta)
    if meta.get("compression") is not None:
        compress.apply_record(model, meta["compression"], source=path)
    return meta


def bare_state(model):
    """The model's state_dict without DDP or compile prefixes, contiguous (the original's format)."""
    return {k: v.detach().clone(memory_format=torch.contiguous_format)
            for k, v in strip_prefixes(model.state_dict()).items()}


def weights_file(model, state=None, **extra):
    """The wrapped format for model_best.pytar: weights (the model's own, or `state`) plus what they
    are and how good they were."""
    return with_checksum({"format": FORMAT, "model": bare_state(model) if state is None else state,
                          "arch": models.describe(model), **extra})
